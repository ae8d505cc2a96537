"""Drawing primitives of MiniBench (``vltune.data.minibench``): 32×32 shapes, textures and the domain shifts.

Every random choice comes from an explicit ``numpy.random.Generator``, so an image depends only on its seed; the
image functions return ``(32, 32, 3)`` uint8 RGB arrays. Shapes are drawn on a 4× canvas and box-downsampled
(anti-aliasing); textures are evaluated on a 2× grid and averaged.
"""

from __future__ import annotations

import colorsys
import math

import numpy as np
from PIL import Image, ImageDraw

SIZE = 32  # output side in pixels
SUPER = 4  # shape canvas = SIZE * SUPER

# Outlines in unit coordinates (bounding radius about 1); circle, ring and crescent are drawn from discs instead.
_STAR = [(math.cos(a), math.sin(a)) for a in (math.pi / 2 + k * math.pi / 5 for k in range(10))]
_CROSS = [(-0.3, -1), (0.3, -1), (0.3, -0.3), (1, -0.3), (1, 0.3), (0.3, 0.3), (0.3, 1), (-0.3, 1), (-0.3, 0.3),
          (-1, 0.3), (-1, -0.3), (-0.3, -0.3)]  # fmt: skip
POLYGONS: dict[str, list[tuple[float, float]]] = {
    "square": [(-0.72, -0.72), (0.72, -0.72), (0.72, 0.72), (-0.72, 0.72)],
    "triangle": [(math.cos(a), math.sin(a)) for a in (math.pi / 2 + k * 2 * math.pi / 3 for k in range(3))],
    "star": [(x * (1.0 if k % 2 == 0 else 0.42), y * (1.0 if k % 2 == 0 else 0.42)) for k, (x, y) in enumerate(_STAR)],
    "cross": _CROSS,
    "hexagon": [(math.cos(k * math.pi / 3), math.sin(k * math.pi / 3)) for k in range(6)],
    "diamond": [(0, -1), (0.58, 0), (0, 1), (-0.58, 0)],  # a tall rhombus, so it never reads as a rotated square
    "arrow": [(-1, -0.2), (0.15, -0.2), (0.15, -0.55), (1, 0), (0.15, 0.55), (0.15, 0.2), (-1, 0.2)],
}
# Square, cross and diamond turn only a little: a square at 45° would be a diamond, a cross at 45° an "x".
ROTATION = {"square": 15, "cross": 15, "diamond": 15, "circle": 0, "ring": 0}  # others: any angle


def shape_mask(kind: str, rng: np.random.Generator, min_frac: float = 0.4, max_frac: float = 0.8) -> np.ndarray:
    """Coverage mask of one shape, float32 ``(32, 32)`` in [0, 1].

    Diameter ``min_frac..max_frac`` of the image, centre jittered while the shape stays inside, random rotation.
    """
    radius = rng.uniform(min_frac, max_frac) * SIZE / 2
    slack = max(SIZE / 2 - radius - 1, 0)
    cx, cy = SIZE / 2 + rng.uniform(-slack, slack), SIZE / 2 + rng.uniform(-slack, slack)
    limit = ROTATION.get(kind, 180)
    theta = math.radians(rng.uniform(-limit, limit))
    cos, sin = math.cos(theta), math.sin(theta)

    def to_canvas(x: float, y: float) -> tuple[float, float]:
        return (SUPER * (cx + radius * (cos * x - sin * y)), SUPER * (cy + radius * (sin * x + cos * y)))

    def disc(x: float, y: float, r: float, fill: int) -> None:
        (px, py), rr = to_canvas(x, y), SUPER * radius * r
        draw.ellipse((px - rr, py - rr, px + rr, py + rr), fill=fill)

    canvas = Image.new("L", (SIZE * SUPER, SIZE * SUPER), 0)
    draw = ImageDraw.Draw(canvas)
    if kind in POLYGONS:
        draw.polygon([to_canvas(x, y) for x, y in POLYGONS[kind]], fill=255)
    elif kind in ("circle", "ring", "crescent"):
        disc(0, 0, 1, 255)
        if kind == "ring":
            disc(0, 0, 0.55, 0)
        elif kind == "crescent":
            disc(0.45, 0, 0.85, 0)
    else:
        raise ValueError(f"unknown shape {kind!r}; valid: {', '.join([*POLYGONS, 'circle', 'ring', 'crescent'])}")
    return np.asarray(canvas.reduce(SUPER), dtype=np.float32) / 255.0


def _finish(image: np.ndarray, rng: np.random.Generator, noise: float) -> np.ndarray:
    """Add Gaussian pixel noise (std ``noise`` grey levels) and clip to uint8."""
    return np.clip(image + rng.normal(0, noise, image.shape), 0, 255).round().astype(np.uint8)


# Grey shapes: (ground, shape) grey level ranges per ground.
GRAY_GROUNDS = {"dark": ((0, 80), (150, 255)), "light": ((175, 255), (0, 100))}


def gray_shape(kind: str, rng: np.random.Generator, ground: str = "dark") -> np.ndarray:
    """A shape on a noisy ground, random grey levels; grey RGB. ``ground="dark"``: a light shape on a dark ground;
    ``"light"``: a dark shape on a light ground, like ink on paper."""
    if ground not in GRAY_GROUNDS:
        raise ValueError(f"unknown ground {ground!r}; valid: {', '.join(GRAY_GROUNDS)}")
    mask = shape_mask(kind, rng)
    (b0, b1), (s0, s1) = GRAY_GROUNDS[ground]
    back, shape = rng.uniform(b0, b1), rng.uniform(s0, s1)
    image = _finish(back + (shape - back) * mask, rng, rng.uniform(4, 16))
    return np.repeat(image[:, :, None], 3, axis=2)


# Hue (degrees), saturation and value ranges of the object colours; yellow needs a high value to stay yellow.
COLOURS = {
    "red": (0, (0.65, 1.0), (0.6, 1.0)),
    "green": (120, (0.55, 1.0), (0.45, 0.9)),
    "blue": (225, (0.55, 1.0), (0.55, 1.0)),
    "yellow": (55, (0.65, 1.0), (0.85, 1.0)),
}


GROUNDS = {"light": (175, 235), "dark": (10, 70)}  # coloured shapes: grey level range of the ground


def coloured_shape(colour: str, kind: str, rng: np.random.Generator, ground: str = "light") -> np.ndarray:
    """A coloured shape (hue ±10°, jittered saturation and brightness) on a slightly tinted noisy ground:
    ``ground="light"`` (grey levels 175-235) or ``"dark"`` (10-70)."""
    if ground not in GROUNDS:
        raise ValueError(f"unknown ground {ground!r}; valid: {', '.join(GROUNDS)}")
    hue, (s0, s1), (v0, v1) = COLOURS[colour]
    rgb = colorsys.hsv_to_rgb(((hue + rng.uniform(-10, 10)) % 360) / 360, rng.uniform(s0, s1), rng.uniform(v0, v1))
    mask = shape_mask(kind, rng)[:, :, None]
    background = rng.uniform(*GROUNDS[ground]) + rng.uniform(-10, 10, size=3)
    image = background * (1 - mask) + 255 * np.asarray(rgb) * mask
    return _finish(image, rng, rng.uniform(3, 10))


def _colour_pair(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Two random RGB colours at least 60 grey levels apart in luminance (so edges survive the sketch shift)."""
    while True:
        a, b = rng.uniform(0, 255, size=3), rng.uniform(0, 255, size=3)
        if abs(_luma(a) - _luma(b)) >= 60:
            return a, b


def _luma(rgb: np.ndarray) -> np.ndarray:
    return rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114


def _bands(t: np.ndarray, period: float, rng: np.random.Generator) -> np.ndarray:
    """1 where ``t`` (pixels) falls in the first half-ish of each period, random phase and duty."""
    return ((t / period + rng.uniform(0, 1)) % 1.0) < rng.uniform(0.35, 0.65)


def texture_pattern(kind: str, rng: np.random.Generator) -> np.ndarray:
    """Pattern of one texture class, float ``(32, 32)`` in [0, 1] (2× supersampled, then averaged)."""
    if kind == "speckle":
        block = int(rng.integers(1, 3))
        cells = rng.random((SIZE // block, SIZE // block)) < rng.uniform(0.3, 0.7)
        return np.kron(cells, np.ones((block, block))).astype(np.float32)
    y, x = np.mgrid[0 : 2 * SIZE, 0 : 2 * SIZE].astype(np.float32) / 2 + 0.25
    period = rng.uniform(5, 10)
    if kind in ("zigzag", "waves") and rng.random() < 0.5:  # curvy stripes run either way
        x, y = y, x
    if kind == "horizontal stripes":
        pattern = _bands(y, period, rng)
    elif kind == "vertical stripes":
        pattern = _bands(x, period, rng)
    elif kind == "diagonal stripes":
        pattern = _bands((x + rng.choice([-1, 1]) * y) / math.sqrt(2), period, rng)
    elif kind == "checkerboard":
        cell = period * 0.8
        pattern = (np.floor(x / cell + rng.uniform(0, 1)) + np.floor(y / cell + rng.uniform(0, 1))) % 2 == 1
    elif kind == "polka dots":
        u, v = (x / period + rng.uniform(0, 1)) % 1.0 - 0.5, (y / period + rng.uniform(0, 1)) % 1.0 - 0.5
        pattern = np.hypot(u, v) < rng.uniform(0.2, 0.32)
    elif kind == "grid":
        width = rng.uniform(1.0, 2.0) / period
        pattern = ((x / period + rng.uniform(0, 1)) % 1.0 < width) | ((y / period + rng.uniform(0, 1)) % 1.0 < width)
    elif kind in ("zigzag", "waves"):
        wavelength, amplitude = rng.uniform(8, 14), rng.uniform(2, 4)
        phase = (x / wavelength + rng.uniform(0, 1)) % 1.0
        offset = 2 * np.abs(2 * phase - 1) - 1 if kind == "zigzag" else np.sin(2 * math.pi * phase)
        pattern = _bands(y + amplitude * offset, period, rng)
    elif kind == "concentric rings":
        cx, cy = rng.uniform(4, SIZE - 4, size=2)
        pattern = _bands(np.hypot(x - cx, y - cy), period * 0.8, rng)
    else:
        raise ValueError(f"unknown texture {kind!r}")
    return pattern.astype(np.float32).reshape(SIZE, 2, SIZE, 2).mean(axis=(1, 3))


def texture(kind: str, rng: np.random.Generator) -> np.ndarray:
    """A full-frame texture in a random colour pair, with mild pixel noise."""
    pattern = texture_pattern(kind, rng)[:, :, None]
    a, b = _colour_pair(rng)
    return _finish(a * (1 - pattern) + b * pattern, rng, rng.uniform(3, 10))


# ------------------------------------------------------------------ domain shifts (MiniUnion's test-only variants)
def sketch(image: np.ndarray, shading: float = 0.35) -> np.ndarray:
    """A pencil sketch: dark strokes on white over a faint grey shading of the image, grey RGB.

    Strokes: Sobel gradient magnitude over the three colour channels (a yellow shape on light grey has little
    luminance contrast), after a 3×3 binomial blur that keeps pixel noise out of the strokes; max-normalised.
    ``shading`` mixes in the grey image, as hand sketches shade their subject.
    """
    x = np.pad(image.astype(np.float32), ((2, 2), (2, 2), (0, 0)), mode="edge")
    x = (x[:-2] + 2 * x[1:-1] + x[2:]) / 4  # blur rows
    x = (x[:, :-2] + 2 * x[:, 1:-1] + x[:, 2:]) / 4  # blur columns; now (34, 34, 3)
    smooth_y = x[:-2] + 2 * x[1:-1] + x[2:]
    smooth_x = x[:, :-2] + 2 * x[:, 1:-1] + x[:, 2:]
    gx, gy = smooth_y[:, 2:] - smooth_y[:, :-2], smooth_x[2:] - smooth_x[:-2]
    edges = np.sqrt((gx**2 + gy**2).sum(axis=2))
    edges = np.clip((edges / max(float(edges.max()), 1e-6) - 0.15) / 0.6, 0, 1)  # drop faint (noise) edges
    out = (1 - shading) * 255 * (1 - edges) + shading * _luma(image.astype(np.float32))
    return np.repeat(out.round().clip(0, 255).astype(np.uint8)[:, :, None], 3, axis=2)


def noisy_occluded(image: np.ndarray, rng: np.random.Generator, noise: float = 55.0) -> np.ndarray:
    """A random solid patch (8-14 px a side, random colour) over the image, then heavy Gaussian noise."""
    out = image.astype(np.float64)
    h, w = rng.integers(8, 15, size=2)
    top, left = rng.integers(0, SIZE - h + 1), rng.integers(0, SIZE - w + 1)
    out[top : top + h, left : left + w] = rng.uniform(0, 255, size=3)
    return _finish(out, rng, noise)


def luminance_inverted(image: np.ndarray) -> np.ndarray:
    """Brightness inverted with hue kept (Y of YCbCr → 255 - Y): dark scenes turn light, a red circle stays red.

    Plain RGB inversion would turn blue into yellow and yellow into blue, i.e. relabel MiniObjects classes.
    """
    y, cb, cr = Image.fromarray(image, "RGB").convert("YCbCr").split()
    y = y.point(lambda v: 255 - v)
    return np.asarray(Image.merge("YCbCr", (y, cb, cr)).convert("RGB"))
