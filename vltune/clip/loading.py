"""Build an open_clip ``CLIP`` from a name and load its weights strictly from one file.

Names: Dassl/OpenAI names (``ViT-B/16``, ``RN50``, ...) map to the open_clip QuickGELU architecture that matches
OpenAI's weights; any ``open_clip.list_models()`` name and vltune's tiny configs (``vltune/clip/model_configs/``) are
accepted as they are.

Where the file comes from (``fetch_weights``): ``MODEL.BACKBONE.WEIGHTS`` if set; else an open_clip pretrained tag
(``MODEL.BACKBONE.PRETRAINED``) through open_clip's cache; else ``$VLTUNE_WEIGHTS_DIR`` then ``~/.cache/clip``, where
a Dassl name missing there is downloaded from OpenAI and checksum-verified (``vltune.clip.download``), unless offline.

Formats: four are auto-detected: an OpenAI TorchScript archive (what ``clip.load`` downloads to ``~/.cache/clip``), a
plain state dict saved with ``torch.save``, an open_clip training checkpoint (``{"epoch", "state_dict", ...}``, keys
possibly prefixed ``module.``) and ``.safetensors``. The key set and every shape are checked against the
architecture before ``load_state_dict(strict=True)`` (nanoGPT's ``from_pretrained`` rule), so a wrong file or a wrong
architecture fails with the offending keys and shapes instead of upstream's silent ``strict=False``; pretrained tags
go through the same check.
"""

from __future__ import annotations

import contextlib
import difflib
import logging
import os
import struct
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path

import open_clip  # vltune/__init__ (the parent package) has installed the torchvision compat shim by now
import torch
from open_clip.model import CLIP

from vltune.clip import download

logger = logging.getLogger(__name__)

CONFIG_DIR = Path(__file__).parent / "model_configs"
open_clip.add_model_config(CONFIG_DIR)

# Dassl/OpenAI name -> (open_clip architecture trained like OpenAI's weights, OpenAI's download file name).
DASSL_NAMES: dict[str, tuple[str, str]] = {
    "RN50": ("RN50-quickgelu", "RN50.pt"),
    "RN101": ("RN101-quickgelu", "RN101.pt"),
    "RN50x4": ("RN50x4-quickgelu", "RN50x4.pt"),
    "RN50x16": ("RN50x16-quickgelu", "RN50x16.pt"),
    "RN50x64": ("RN50x64-quickgelu", "RN50x64.pt"),
    "ViT-B/32": ("ViT-B-32-quickgelu", "ViT-B-32.pt"),
    "ViT-B/16": ("ViT-B-16-quickgelu", "ViT-B-16.pt"),
    "ViT-L/14": ("ViT-L-14-quickgelu", "ViT-L-14.pt"),
    "ViT-L/14@336px": ("ViT-L-14-336-quickgelu", "ViT-L-14-336px.pt"),
}

# Entries of OpenAI's JIT state dict that are model metadata, not parameters (open_clip drops them too).
OPENAI_META_KEYS = ("input_resolution", "context_length", "vocab_size")


def list_backbones() -> list[str]:
    """Every accepted backbone name: the Dassl names, then open_clip's architectures (vltune's tiny ones included)."""
    return [*DASSL_NAMES, *open_clip.list_models()]


def resolve_arch(name: str) -> str:
    """The open_clip architecture for a backbone name.

    Raises:
        ValueError: unknown name; the message suggests close names and how to list them all.
    """
    if name in DASSL_NAMES:
        return DASSL_NAMES[name][0]
    models = open_clip.list_models()
    for candidate in (name, name.replace("/", "-")):
        if candidate in models:
            return candidate
    close = difflib.get_close_matches(name, list_backbones(), n=3, cutoff=0.6)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise ValueError(
        f"unknown CLIP backbone {name!r}.{hint} Dassl names: {', '.join(DASSL_NAMES)}; any open_clip architecture "
        'also works (list them with `python -c "import vltune.clip as c; print(c.list_backbones())"`).'
    )


def weight_file_names(name: str) -> list[str]:
    """File names searched for when no weights path is given: OpenAI's file name for Dassl names, else ``<name>.pt``.

    An open_clip QuickGELU twin of an OpenAI model (``ViT-B-16-quickgelu``) also finds OpenAI's file (``ViT-B-16.pt``).
    """
    if name in DASSL_NAMES:
        return [DASSL_NAMES[name][1]]
    names = [f"{name.replace('/', '-')}.pt"]
    names += [file for arch, file in DASSL_NAMES.values() if arch == name and file not in names]
    return names


def weight_search_paths(name: str) -> list[Path]:
    """Every path ``load_clip`` looks at, in order, when ``weights`` and ``pretrained`` are empty; a download goes
    to the first."""
    dirs = []
    if os.environ.get("VLTUNE_WEIGHTS_DIR"):
        dirs.append(Path(os.environ["VLTUNE_WEIGHTS_DIR"]).expanduser())
    dirs.append(Path("~/.cache/clip").expanduser())
    return [d / f for d in dirs for f in weight_file_names(name)]


def _dassl_url(name: str) -> str:
    return download.openai_url(DASSL_NAMES[name][1]) if name in DASSL_NAMES else ""


def _not_found(name: str, paths: list[Path], url: str = "", explicit: bool = False) -> FileNotFoundError:
    looked = "\n".join(f"  {p}" for p in paths)
    if explicit:
        how = "A MODEL.BACKBONE.WEIGHTS file is never downloaded."
    elif not url:
        how = "Nothing is downloaded for this name (only OpenAI's files for Dassl names are)."
    elif download.is_offline():
        how = (f"Offline ({download.offline_reason()}): nothing is downloaded; fetch it by hand: "
               f"{url} → {paths[0]}")
    else:
        how = f"load_clip downloads it from {url} to {paths[0]} (VLTUNE_OFFLINE=1 turns that off)."
    return FileNotFoundError(
        f"no weights file for CLIP backbone {name!r}; looked at:\n{looked}\n"
        "Provide one with MODEL.BACKBONE.WEIGHTS <path> (or load_clip(name, weights=<path>)), or place OpenAI's file "
        f"(e.g. ViT-B-16.pt) in $VLTUNE_WEIGHTS_DIR or ~/.cache/clip. {how}"
    )


def _check_source(weights: str | os.PathLike, pretrained: str) -> None:
    if str(weights) and pretrained:
        raise ValueError(f"MODEL.BACKBONE.WEIGHTS {str(weights)!r} and MODEL.BACKBONE.PRETRAINED {pretrained!r} are "
                         "both set; set one of them (a file, or an open_clip pretrained tag)")


def _pretrained(name: str, tag: str) -> dict:
    arch = resolve_arch(name)
    cfg = download.pretrained_cfg(arch, tag)
    download.check_quick_gelu(arch, tag, cfg)
    return cfg


def find_weights(name: str, weights: str | os.PathLike = "", pretrained: str = "") -> Path:
    """The weights file for ``name`` already on disk; never downloads (``fetch_weights`` does).

    ``weights`` if given; else, with an open_clip ``pretrained`` tag, the tag's file in open_clip's caches; else the
    first existing path of ``weight_search_paths``.

    Raises:
        FileNotFoundError: no file; the message lists every path looked at and how to provide one (for a Dassl name
            also the URL it is downloaded from, or, offline, that URL to fetch by hand).
        ValueError: both ``weights`` and ``pretrained`` set, an unknown name or tag, or a tag trained with another
            activation than the architecture.
    """
    _check_source(weights, pretrained)
    if pretrained:
        cfg = _pretrained(name, pretrained)
        found = download.cached_pretrained(cfg)
        if found is not None:
            return found
        how = (f"offline ({download.offline_reason()}): nothing is downloaded" if download.is_offline()
               else "load_clip downloads it through open_clip")
        looked = "\n".join(f"  {p}" for p in download.pretrained_places(cfg))
        raise FileNotFoundError(f"no cached file for MODEL.BACKBONE.PRETRAINED {pretrained!r} of {name!r}; looked "
                                f"at:\n{looked}\n{how}.")
    paths = [Path(weights).expanduser()] if str(weights) else weight_search_paths(name)
    for path in paths:
        if path.is_file():
            return path
    raise _not_found(name, paths, _dassl_url(name), explicit=bool(str(weights)))


def pending_download(name: str, weights: str | os.PathLike = "", pretrained: str = "") -> str:
    """What ``fetch_weights`` would download for these settings (``<url> → <path>``), or "" when the file is on disk.

    Raises:
        FileNotFoundError: no file on disk and none can be downloaded (an explicit ``weights`` path, a name OpenAI
            does not publish, or offline), with ``find_weights``'s message.
        ValueError: as ``find_weights``.
    """
    try:
        find_weights(name, weights, pretrained)
        return ""
    except FileNotFoundError:
        if download.is_offline():
            raise
        if pretrained:
            cfg = _pretrained(name, pretrained)
            source = f"the Hugging Face hub ({os.path.dirname(cfg['hf_hub'])})" if cfg.get("hf_hub") else cfg["url"]
            return f"open_clip {resolve_arch(name)}:{pretrained} from {source}"
        url = "" if str(weights) else _dassl_url(name)
        if not url:
            raise
        return f"{url} → {weight_search_paths(name)[0]}"


def fetch_weights(name: str, weights: str | os.PathLike = "", pretrained: str = "") -> Path:
    """The weights file for ``name``, downloaded first when it is missing and can be (``find_weights`` otherwise).

    A Dassl name with no file in the search path gets OpenAI's file, checksum-verified, into the first search folder
    (``$VLTUNE_WEIGHTS_DIR``, else ``~/.cache/clip``), as ``clip.load`` does; an open_clip ``pretrained`` tag gets
    its file into open_clip's cache. Offline (``VLTUNE_OFFLINE=1``, ``HF_HUB_OFFLINE=1``) nothing is downloaded.

    Raises:
        FileNotFoundError: as ``find_weights`` (nothing to download, or offline).
        DownloadError: the download failed or its checksum did not match; no file was left.
        ValueError: as ``find_weights``.
    """
    if not pending_download(name, weights, pretrained):
        return find_weights(name, weights, pretrained)
    if pretrained:
        return download.download_pretrained(_pretrained(name, pretrained))
    return download.download(_dassl_url(name), weight_search_paths(name)[0])


class _DropRandomInitWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "initialized randomly" not in record.getMessage()


@contextlib.contextmanager
def _quiet_random_init() -> Iterator[None]:
    """Silence open_clip's "initialized randomly" root-logger warning while we build an architecture to fill.

    ``logging.warning`` also calls ``logging.basicConfig()`` when the root logger has no handler, which would install a
    stderr handler behind the CLI's back; a temporary NullHandler prevents that.
    """
    root = logging.getLogger()
    null = logging.NullHandler() if not root.handlers else None
    drop = _DropRandomInitWarning()
    if null is not None:
        root.addHandler(null)
    root.addFilter(drop)
    try:
        yield
    finally:
        root.removeFilter(drop)
        if null is not None:
            root.removeHandler(null)


def create_clip(name: str, device: str | torch.device = "cpu") -> CLIP:
    """A randomly initialised fp32 ``CLIP`` of architecture ``name``, in eval mode (seed torch before calling).

    Raises:
        ValueError: unknown name, or an architecture that is not a plain open_clip ``CLIP`` (HF text towers, CoCa).
    """
    arch = resolve_arch(name)
    cfg = open_clip.get_model_config(arch) or {}
    if cfg.get("custom_text") or "hf_model_name" in cfg.get("text_cfg", {}) or "multimodal_cfg" in cfg:
        raise ValueError(
            f"architecture {arch!r} builds a CustomTextCLIP/CoCa model; vltune's backbone needs an open_clip CLIP "
            "with its own text transformer (OpenAI-style architectures)"
        )
    with _quiet_random_init():
        model = open_clip.create_model(arch, pretrained=None, precision="fp32", device="cpu")
    if not isinstance(model, CLIP):
        raise TypeError(f"architecture {arch!r} built a {type(model).__name__}, not an open_clip CLIP")
    return model.to(device).eval()


def _is_torchscript_zip(path: Path) -> bool:
    # torch.save and torch.jit.save both write zip archives; only TorchScript ones hold code/ and constants.pkl.
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(n.endswith("constants.pkl") or "/code/" in n for n in archive.namelist())


def _is_safetensors(path: Path) -> bool:
    if path.suffix == ".safetensors":
        return True
    with open(path, "rb") as f:  # safetensors: u64 header length, then a JSON header
        head = f.read(9)
    return len(head) == 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] < path.stat().st_size


def read_state_dict(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], str]:
    """Read a CLIP state dict from any supported file, as fp32 tensors on the CPU, with metadata entries dropped.

    Returns:
        The state dict and the detected format (``"torchscript"``, ``"safetensors"``, ``"open_clip checkpoint"`` or
        ``"state dict"``).

    Raises:
        ValueError: the file cannot be read in any supported format, or does not hold a state dict.
    """
    path = Path(path)
    try:
        if _is_torchscript_zip(path):
            with warnings.catch_warnings():  # torch.jit is deprecated, but OpenAI's archives are TorchScript
                warnings.filterwarnings("ignore", category=DeprecationWarning)
                fmt, state = "torchscript", torch.jit.load(str(path), map_location="cpu").state_dict()
        elif _is_safetensors(path):
            from safetensors.torch import load_file

            fmt, state = "safetensors", load_file(str(path), device="cpu")
        else:
            fmt, state = "state dict", torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(
            f"weights {path}: cannot read it as an OpenAI TorchScript archive, a torch.save state dict / open_clip "
            f"checkpoint (loaded with weights_only=True) or a safetensors file: {type(e).__name__}: {e}"
        ) from e
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        fmt, state = "open_clip checkpoint", state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        found = sorted(state)[:8] if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"weights {path}: expected a state dict of tensors, found {found}")
    state = dict(state)
    if state and all(k.startswith("module.") for k in state):  # saved from DistributedDataParallel
        state = {k[len("module.") :]: v for k, v in state.items()}
    for key in OPENAI_META_KEYS:
        state.pop(key, None)
    # OpenAI archives keep conv/linear/projection weights in fp16; the backbone is built in fp32.
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    return state, fmt


def _non_persistent_buffers(model: torch.nn.Module) -> set[str]:
    # Derived buffers (the text attn_mask) are rebuilt by the architecture; a file that carries them is not wrong.
    names = set()
    for prefix, module in model.named_modules():
        names |= {f"{prefix}.{b}" if prefix else b for b in module._non_persistent_buffers_set}
    return names


def _shape(t: torch.Tensor) -> str:
    return str(tuple(t.shape))


def check_state_dict(state: dict[str, torch.Tensor], model: torch.nn.Module, arch: str, source: str) -> None:
    """Check that ``state`` has exactly the keys of ``model.state_dict()`` and the same shapes.

    Raises:
        ValueError: one line per problem (missing keys, unexpected keys, shape mismatches), naming the file, the
            keys and both shapes.
    """
    expected = model.state_dict()
    problems = []
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing:
        problems.append(f"{len(missing)} key(s) missing: {', '.join(repr(k) for k in missing[:20])}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): {', '.join(repr(k) for k in unexpected[:20])}")
    for key, value in state.items():
        if key in expected and value.shape != expected[key].shape:
            problems.append(
                f"key {key!r} has shape {_shape(value)} but architecture {arch!r} expects {_shape(expected[key])}"
            )
    if problems:
        hint = (
            "\nDoes MODEL.BACKBONE.NAME match the weights (e.g. ViT-B/16 for ViT-B-16.pt)?"
            if missing or unexpected
            else ""
        )
        raise ValueError(f"weights {source} do not fit architecture {arch!r}:\n  " + "\n  ".join(problems) + hint)


def load_clip(name: str, weights: str | os.PathLike = "", device: str | torch.device = "cpu",
              pretrained: str = "") -> CLIP:
    """Build the architecture for ``name`` and load its weights strictly; fp32, eval mode, on ``device``.

    Args:
        name: a Dassl name (``ViT-B/16``), an open_clip architecture or a vltune tiny config (``vltune-tiny``).
        weights: the weights file; empty searches ``$VLTUNE_WEIGHTS_DIR`` then ``~/.cache/clip`` (see
            ``weight_search_paths``) and, for a Dassl name, downloads OpenAI's file there when none is found.
        device: where the model goes after loading.
        pretrained: an open_clip pretrained tag of the architecture (``laion2b_s34b_b88k``), fetched through
            open_clip's cache (``MODEL.BACKBONE.PRETRAINED``); excludes ``weights``.

    Raises:
        ValueError: unknown name or tag, unreadable file, or a file whose keys or shapes do not fit the
            architecture.
        FileNotFoundError: no weights file found and none downloadable (or offline).
        DownloadError: a download failed or its checksum did not match.
    """
    arch = resolve_arch(name)
    path = fetch_weights(name, weights, pretrained)
    state, fmt = read_state_dict(path)
    model = create_clip(arch)
    state = {k: v for k, v in state.items() if k not in _non_persistent_buffers(model)}
    check_state_dict(state, model, arch, str(path))
    model.load_state_dict(state, strict=True)
    logger.info("loaded CLIP %s (architecture %s) from %s (%s)", name, arch, path, fmt)
    return model.float().to(device).eval()
