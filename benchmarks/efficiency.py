"""Training-step and zero-shot evaluation cost of vltune trainers at real backbone shapes: a benchmark, not a test.

Training rows. For each variant, one trainer is built on a generated dataset (``--classes`` classes, or the count
after ``@``: ``CoOp@1000``; ``--batch-size`` images each) with the real ``--backbone`` architecture and random
weights. After ``--warmup`` steps, up to ``--steps`` training steps (``forward_backward``: forward, loss, backward,
optimizer step) are timed one by one and the median is reported; a row whose warm-up step is slow times fewer steps
(at least one) so that it stays near ``--row-budget`` seconds. One more step is measured for memory:

* peak memory = the model's parameters and buffers on the training device + optimizer state + the step's own peak
  (activations, gradients, temporaries) from ``vltune.engine.cost.step_peak_bytes`` (CPU: torch profiler memory
  events; CUDA: ``max_memory_allocated``). Dataset-wide feature caches (Skip Tuning's) are not part of a step and not
  counted; on a GPU, Skip Tuning's frozen prefix is offloaded as in training (``OFFLOAD_FROZEN``);
* Skip Tuning steps consume the block-ω−1 tokens its cache would hold (computed for the batch, outside the timing).

Variants: any registered trainer (``all``: every one), the plugin rows in ``VARIANTS`` (``CoOp+CSkip``, ...) and the
upstream-style rows ``<trainer>-upstream``, which compute the way the public reference code does: text runs over all
77 context positions (``MODEL.BACKBONE.TRUNCATE_TEXT False``) and CLIP-Adapter runs as ``OriginCLIPAdapter``, which
re-encodes the class text at every step as its reference ``CustomCLIP.forward`` does. Prompt learners
recompute text per step anyway, and no upstream row caches anything. ``<variant>+compile`` runs the variant with
every transformer block under ``torch.compile`` (compiled during the warm-up step; use ``--warmup 2``).

Evaluation row (``--eval-images`` > 0): ZeroshotCLIP's whole ``test()`` over that many generated images of the
``--classes`` classes (data loading, class text features once, logits, metrics) against the image encoder alone on
the same, already loaded images. The text features are a fixed cost, so fewer images make the ratio stricter.

    python benchmarks/efficiency.py                                  # the default subset and the targets
    python benchmarks/efficiency.py --variants CoOp CoOp+CSkip --classes 1000 --eval-images 0
    python benchmarks/efficiency.py --device cuda --out results/bench
    python benchmarks/efficiency.py --backbone vltune-tiny --classes 20 --opts TRAINER.SKIP.START_LAYER 1   # smoke

Writes ``<out>/efficiency.json`` and ``<out>/efficiency.md`` and prints the tables and the targets (PASS/MISS).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # silence the profiler's start/stop lines

import torch  # noqa: E402
from PIL import Image  # noqa: E402

import vltune  # noqa: E402,F401  (compat shim first)
from vltune.fileio import atomic_write  # noqa: E402
from vltune.results.record import write_json_atomic  # noqa: E402


def _compile_blocks(trainer: Any) -> None:
    from vltune.clip.backbone import CLIPBackbone

    for clip in (m for m in trainer.model.modules() if isinstance(m, CLIPBackbone)):
        towers = [clip.model.transformer] + ([clip.model.visual.transformer] if clip.is_vit else [])
        for block in (b for tower in towers for b in tower.resblocks):
            block.compile()  # per block: hooks and the block loop stay eager


#: variant name → (trainer, config opts, change applied to the built trainer)
VARIANTS: dict[str, tuple[str, dict[str, Any], Callable[[Any], None] | None]] = {
    "CoOp+CSkip": ("CoOp", {"TRAINER.SKIP_PLUGIN.CSKIP": True}, None),
    "KgCoOp+CSkip": ("KgCoOp", {"TRAINER.SKIP_PLUGIN.CSKIP": True}, None),
    "CLIPAdapter+cache": ("CLIPAdapter", {"TRAINER.SKIP_PLUGIN.CACHE_IMAGE": True}, None),
}
UPSTREAM_SUFFIX = "-upstream"
COMPILE_SUFFIX = "+compile"  # any variant with its transformer blocks under torch.compile (the first step compiles)
#: the registered trainer that computes as the reference code does, where ours caches what it recomputes
UPSTREAM_TRAINERS = {"CLIPAdapter": "OriginCLIPAdapter"}
DEFAULT = ["FinetuneCLIP", "SkipTuning", "CoOp", "CoOp-upstream", "CoOp@1000", "CoOp+CSkip@1000"]
EVAL_ROW = "ZeroshotCLIP eval"


class Target:
    """A ratio between two rows' measurements and the bound it must meet."""

    def __init__(self, what: str, num: str, den: str, key: str, bound: float, at_least: bool) -> None:
        self.what, self.num, self.den, self.key, self.bound, self.at_least = what, num, den, key, bound, at_least

    def check(self, rows: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
        if self.num not in rows or self.den not in rows:
            return None
        ratio = rows[self.num][self.key] / rows[self.den][self.key]
        ok = ratio >= self.bound if self.at_least else ratio <= self.bound
        bound = f"{'≥' if self.at_least else '≤'} {self.bound:g}x"
        return {"target": self.what, "ratio": ratio, "bound": bound, "pass": ok}


TARGETS = [
    Target("SkipTuning vs FinetuneCLIP: step time (FT / Skip)", "FinetuneCLIP", "SkipTuning", "step_s", 3, True),
    Target("SkipTuning vs FinetuneCLIP: peak memory (FT / Skip)", "FinetuneCLIP", "SkipTuning", "peak_mb", 3, True),
    Target("CoOp+CSkip vs CoOp at 1000 classes: step time (CoOp / CSkip)", "CoOp@1000", "CoOp+CSkip@1000", "step_s",
           5, True),
    Target("our CoOp vs upstream-style CoOp: step time (ours / upstream)", "CoOp", "CoOp-upstream", "step_s", 0.5,
           False),
    Target("zero-shot eval vs image encoder only: time (eval / encoder)", EVAL_ROW, EVAL_ROW + ":encoder", "seconds",
           1.2, False),
]


def parse_variant(spec: str, default_classes: int) -> tuple[str, int]:
    """``CoOp@1000`` → ("CoOp", 1000); ``CoOp`` → ("CoOp", default_classes)."""
    name, _, classes = spec.partition("@")
    if classes and not classes.isdigit():
        raise SystemExit(f"variant {spec!r}: the part after '@' must be a class count, e.g. CoOp@1000")
    return name, int(classes) if classes else default_classes


def resolve(name: str) -> tuple[str, dict[str, Any], Callable[[Any], None] | None]:
    """(registered trainer, config opts, patch) of a variant name."""
    if name.endswith(COMPILE_SUFFIX):
        trainer, opts, patch = resolve(name[: -len(COMPILE_SUFFIX)])

        def compiled(t: Any) -> None:
            if patch is not None:
                patch(t)
            _compile_blocks(t)

        return trainer, opts, compiled
    if name in VARIANTS:
        return VARIANTS[name]
    if name.endswith(UPSTREAM_SUFFIX):
        trainer = name[: -len(UPSTREAM_SUFFIX)]
        return UPSTREAM_TRAINERS.get(trainer, trainer), {"MODEL.BACKBONE.TRUNCATE_TEXT": False}, None
    return name, {}, None


def write_dataset(root: str, classes: int, per_class: int, test_images: int) -> str:
    """A Digits-layout dataset (the CoOp split format) of tiny solid images; returns its root."""
    root = os.path.join(root, f"c{classes}_n{per_class}_t{test_images}")
    folder = os.path.join(root, "digits")
    if os.path.isdir(folder):
        return root
    per_class = max(per_class, math.ceil(test_images / classes))
    items = []
    for c in range(classes):
        os.makedirs(os.path.join(folder, "images", f"c{c:04d}"), exist_ok=True)
        for i in range(per_class):
            rel = f"c{c:04d}/{i}.png"
            Image.new("RGB", (8, 8), ((c * 37 + i) % 256, (c * 11) % 256, (i * 53) % 256)).save(
                os.path.join(folder, "images", rel))
            items.append([rel, c, f"class {c:04d}"])
    test = [items[c * per_class + i] for i in range(per_class) for c in range(classes)][: max(test_images, classes)]
    split = {"train": items, "val": items[:1], "test": test}
    atomic_write(os.path.join(folder, "split_zhou_Digits.json"), json.dumps(split).encode())
    return root


def build(trainer_name: str, extra: dict[str, Any], root: str, weights: str, size: int,
          args: argparse.Namespace) -> Any:
    from vltune.config import get_cfg
    from vltune.engine import build_trainer
    from vltune.registry import TRAINERS

    cuda = args.device == "cuda"
    opts = {"TRAINER.NAME": trainer_name, "DATASET.ROOT": root, "DATASET.NAME": "Digits",
            "DATASET.NUM_SHOTS": args.batch_size, "DATALOADER.TRAIN_X.BATCH_SIZE": args.batch_size,
            "DATALOADER.TEST.BATCH_SIZE": args.eval_batch_size, "DATALOADER.NUM_WORKERS": 0,
            "MODEL.BACKBONE.NAME": args.backbone, "MODEL.BACKBONE.WEIGHTS": weights,
            "INPUT.SIZE": (size, size), "INPUT.TRANSFORMS": ("normalize",), "OPTIM.NAME": "sgd", "OPTIM.LR": 1e-5,
            "OPTIM.MAX_EPOCH": 1, "TRAINER.PREC": "amp" if cuda else "fp32", "USE_CUDA": cuda, "SEED": 1,
            "OUTPUT_DIR": tempfile.mkdtemp(prefix="vltune-bench-")}
    opts.update(extra)
    defaults = get_cfg(opts=["TRAINER.NAME", trainer_name])  # also fills the trainer registry
    node = TRAINERS.get(trainer_name).config_node  # a method's own PREC key overrides TRAINER.PREC
    if node and "PREC" in defaults.TRAINER.get(node, {}):
        opts[f"TRAINER.{node}.PREC"] = opts["TRAINER.PREC"]
    return build_trainer(get_cfg(opts=[x for k, v in opts.items() for x in (k, str(v))] + list(args.opts)))


def training_batch(trainer: Any) -> dict[str, Any]:
    batch = trainer.to_device(next(iter(trainer.train_loader_x)))
    if hasattr(trainer, "image_prefix"):  # Skip Tuning: what its per-epoch cache holds for these images
        trainer.build_text_cache()
        batch = {**batch, "img": trainer.image_prefix(batch["img"]), "cached": True}
    return batch


def text_classes(trainer: Any, batch: dict[str, Any]) -> int:
    """How many classes the text side of the last step computed (CSkip keeps a subset)."""
    if getattr(trainer, "kept_counts", None):
        return trainer.kept_counts[-1]
    if trainer.cfg.TRAINER.SKIP_PLUGIN.CSKIP:
        with torch.no_grad():
            return len(trainer._skip_parts(batch)[1]["classes"])
    return trainer.num_classes


def _sync(device: torch.device) -> Callable[[], None]:
    return (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)


def _timed(fn: Callable[[], Any], sync: Callable[[], None]) -> float:
    sync()
    start = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - start


def measure(spec: str, tmp: str, weights: str, size: int, args: argparse.Namespace) -> dict[str, Any]:
    """One training row: median step time and peak memory of ``spec``."""
    from vltune.engine.cost import step_peak_bytes

    name, classes = parse_variant(spec, args.classes)
    trainer_name, extra, patch = resolve(name)
    root = write_dataset(tmp, classes, args.batch_size, 0)
    trainer = build(trainer_name, extra, root, weights, size, args)
    if patch is not None:
        patch(trainer)
    batch = training_batch(trainer)
    if hasattr(trainer, "_place_prefix"):  # Skip Tuning's steps run with the frozen prefix offloaded (GPU only)
        trainer._place_prefix(torch.device("cpu"))
    trainer.set_model_mode("train")
    sync = _sync(trainer.device)
    step = lambda: trainer.forward_backward(batch)  # noqa: E731
    warm = [_timed(step, sync) for _ in range(args.warmup)]
    n = args.steps if not warm else max(1, min(args.steps, int(args.row_budget / max(warm[-1], 1e-9))))
    times = [_timed(step, sync) for _ in range(n)]
    _, step_bytes, method = step_peak_bytes(step, trainer.device)
    resident = [t for t in (*trainer.model.parameters(), *trainer.model.buffers())
                if t.device.type == trainer.device.type]  # an offloaded prefix is not the device's memory
    model_bytes = sum(t.numel() * t.element_size() for t in resident)
    optim_bytes = sum(v.numel() * v.element_size() for o in trainer._optims.values() if o
                      for state in o.state.values() for v in state.values() if torch.is_tensor(v))
    return {"variant": spec, "trainer": type(trainer).__name__, "step_s": statistics.median(times),
            "step_s_all": times, "peak_mb": (model_bytes + optim_bytes + step_bytes) / 2**20,
            "step_peak_mb": step_bytes / 2**20, "model_mb": model_bytes / 2**20, "optimizer_mb": optim_bytes / 2**20,
            "memory_method": method, "trainable_params": trainer.n_trainable, "classes": trainer.num_classes,
            "batch_size": args.batch_size, "text_classes": text_classes(trainer, batch),
            "text_positions": "to last EOT" if trainer.cfg.MODEL.BACKBONE.TRUNCATE_TEXT else "all"}


@torch.no_grad()
def measure_eval(tmp: str, weights: str, size: int, args: argparse.Namespace) -> list[dict[str, Any]]:
    """ZeroshotCLIP's whole evaluation vs the image encoder alone on the same images (two rows)."""
    root = write_dataset(tmp, args.classes, args.batch_size, args.eval_images)
    trainer = build("ZeroshotCLIP", {}, root, weights, size, args)
    trainer.set_model_mode("eval")
    clip, sync = trainer.model, _sync(trainer.device)
    images = [b["img"].to(trainer.device) for b in trainer.test_loader]
    n = sum(len(x) for x in images)
    with trainer.precision.autocast():
        clip.encode_image(images[0])  # warm-up at full batch size (first-touch allocations)
        encoder = _timed(lambda: [clip.encode_image(x) for x in images], sync)
        text = _timed(lambda: clip.zero_shot_classifier(trainer.classnames, trainer.templates()), sync)
    total = _timed(trainer.test, sync)
    common = {"images": n, "classes": trainer.num_classes, "batch_size": args.eval_batch_size}
    return [{"variant": EVAL_ROW, "seconds": total, "text_features_s": text, "accuracy": trainer.last_metrics[
                "accuracy"], **common},
            {"variant": EVAL_ROW + ":encoder", "seconds": encoder, **common}]


def markdown(rows: list[dict[str, Any]], evals: list[dict[str, Any]], targets: list[dict[str, Any]],
             header: str) -> str:
    lines = [header, "", "| variant | classes | step s (median) | steps timed | peak MB | step peak MB | trainable "
             "params | text classes per step | text positions |", "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['classes']} | {r['step_s']:.3f} | {len(r['step_s_all'])} | "
                     f"{r['peak_mb']:.0f} | {r['step_peak_mb']:.0f} | {r['trainable_params']:,} | "
                     f"{r['text_classes']} | {r['text_positions']} |")
    if evals:
        lines += ["", "| evaluation | images | classes | seconds | images/s |", "|---|---:|---:|---:|---:|"]
        for r in evals:
            what = "image encoder only" if r["variant"].endswith(":encoder") else (
                f"ZeroshotCLIP test() (class text features: {r['text_features_s']:.2f} s)")
            lines.append(f"| {what} | {r['images']} | {r['classes']} | {r['seconds']:.2f} | "
                         f"{r['images'] / r['seconds']:.1f} |")
    if targets:
        lines += ["", "| target | measured | bound | |", "|---|---:|---|---|"]
        lines += [f"| {t['target']} | {t['ratio']:.2f}x | {t['bound']} | {'PASS' if t['pass'] else 'MISS'} |"
                  for t in targets]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from vltune.plugins import load_builtins

    load_builtins()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", nargs="*", default=DEFAULT,
                   help=f"trainers (all: every registered one), {', '.join(VARIANTS)}, <trainer>-upstream, "
                        "<variant>+compile; @N sets the class count")
    p.add_argument("--backbone", default="ViT-B/16")
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--steps", type=int, default=3, help="timed steps at most (median reported)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--row-budget", type=float, default=30.0,
                   help="seconds of timed steps per row; slow rows time fewer steps (at least one)")
    p.add_argument("--eval-images", type=int, default=None,
                   help="images of the zero-shot evaluation row (0: none; default 1000 on CUDA, 100 on CPU)")
    p.add_argument("--eval-batch-size", type=int, default=100)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--opts", nargs="*", default=[], help="KEY VALUE config overrides for every variant")
    args = p.parse_args(argv)
    if args.eval_images is None:
        args.eval_images = 1000 if args.device == "cuda" else 100
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.variants == ["all"]:
        from vltune.config import get_cfg
        from vltune.registry import TRAINERS

        get_cfg()
        args.variants = TRAINERS.registered_names()
    from vltune.clip import create_clip

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="vltune-bench-") as tmp:
        weights = os.path.join(tmp, "random.pt")
        torch.manual_seed(0)
        model = create_clip(args.backbone)
        size = model.visual.image_size
        size = size if isinstance(size, int) else size[0]
        torch.save(model.state_dict(), weights)
        del model
        rows = []
        for spec in args.variants:
            rows.append(measure(spec, tmp, weights, size, args))
            r = rows[-1]
            print(f"{spec}: {r['step_s']:.3f} s/step, peak {r['peak_mb']:.0f} MB", flush=True)
        evals = measure_eval(tmp, weights, size, args) if args.eval_images > 0 else []
        if evals:
            print(f"{EVAL_ROW}: {evals[0]['seconds']:.2f} s, encoder only {evals[1]['seconds']:.2f} s", flush=True)
    by_name = {r["variant"]: r for r in rows + evals}
    targets = [t for t in (target.check(by_name) for target in TARGETS) if t is not None]
    header = (f"Cost at {args.backbone} shapes (random weights), batch {args.batch_size}, {args.device} "
              f"({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads), torch "
              f"{torch.__version__}; step time: median of the timed steps after {args.warmup} warm-up; memory: "
              f"{rows[0]['memory_method'] if rows else '-'}; total {time.perf_counter() - started:.0f} s")
    table = markdown(rows, evals, targets, header)
    os.makedirs(args.out, exist_ok=True)
    write_json_atomic(os.path.join(args.out, "efficiency.json"),
                      {"args": vars(args), "rows": rows, "eval": evals, "targets": targets})
    atomic_write(os.path.join(args.out, "efficiency.md"), table.encode())
    print("\n" + table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
