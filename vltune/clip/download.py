"""Getting CLIP weights onto the disk: OpenAI's files by URL, open_clip's pretrained tags through its own cache.

OpenAI's files (what ``clip.load`` fetches for a Dassl name) are published under URLs that carry the file's SHA256 as
their second-to-last path component; ``download`` streams one to a ``<target>.part-<pid>-*`` file beside the target,
hashing while it writes, and renames it into place only when the digest matches, so an interrupted or corrupt
download never leaves a file that a later run would load. A ``<target>.lock`` file lock makes a second process wait
for the first one's download and then find the file, instead of fetching it again.

open_clip pretrained tags (``laion2b_s34b_b88k``, ...) resolve to open_clip's own caches: the Hugging Face hub cache
for ``hf_hub`` entries, ``~/.cache/clip`` for URL entries. ``cached_pretrained`` looks there without any network
access; ``download_pretrained`` fetches through open_clip (hub) or ``download`` (URL).

Offline (``VLTUNE_OFFLINE=1`` or the hub's ``HF_HUB_OFFLINE=1``) nothing is downloaded.
"""

from __future__ import annotations

import difflib
import fcntl
import hashlib
import os
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import open_clip
from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME
from tqdm import tqdm

#: where OpenAI publishes CLIP's weights (clip.py ``_MODELS``); ``$VLTUNE_WEIGHTS_URL`` replaces it (a mirror, tests)
OPENAI_BASE_URL = "https://openaipublic.azureedge.net/clip/models"
BASE_URL_ENV = "VLTUNE_WEIGHTS_URL"
OFFLINE_ENVS = ("VLTUNE_OFFLINE", "HF_HUB_OFFLINE")

#: OpenAI's file name -> its SHA256, the second-to-last component of its URL in OpenAI's clip.py
OPENAI_SHA256: dict[str, str] = {
    "RN50.pt": "afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762",
    "RN101.pt": "8fa8567bab74a42d41c5915025a8e4538c3bdbe8804a470a72f30b0d94fab599",
    "RN50x4.pt": "7e526bd135e493cef0776de27d5f42653e6b4c8bf9e0f653bb11773263205fdd",
    "RN50x16.pt": "52378b407f34354e150460fe41077663dd5b39c54cd0bfd2b27167a4a06ec9aa",
    "RN50x64.pt": "be1cfb55d75a9666199fb2206c106743da0f6468c9d327f3e0d0a543a9919d9c",
    "ViT-B-32.pt": "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af",
    "ViT-B-16.pt": "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f",
    "ViT-L-14.pt": "b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836",
    "ViT-L-14-336px.pt": "3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02",
}

CHUNK = 1 << 20
TIMEOUT_S = 60.0


class DownloadError(RuntimeError):
    """A download that failed or was refused (wrong checksum, short body, network error); nothing was left behind."""


def is_offline() -> bool:
    """Whether downloads are off: ``VLTUNE_OFFLINE`` or ``HF_HUB_OFFLINE`` set to 1/true/yes/on."""
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on") for v in OFFLINE_ENVS)


def offline_reason() -> str:
    """Which variable makes vltune offline, for error messages (``VLTUNE_OFFLINE=1``)."""
    return ", ".join(f"{v}={os.environ[v]}" for v in OFFLINE_ENVS if os.environ.get(v)) or "offline"


def openai_url(file_name: str) -> str:
    """The download URL of one of OpenAI's files (``ViT-B-16.pt``), or "" for a file OpenAI does not publish."""
    digest = OPENAI_SHA256.get(file_name)
    if not digest:
        return ""
    base = (os.environ.get(BASE_URL_ENV) or OPENAI_BASE_URL).rstrip("/")
    return f"{base}/{digest}/{file_name}"


def url_sha256(url: str) -> str:
    """The SHA256 an OpenAI-style URL carries (its second-to-last path component), or "" when it carries none."""
    parts = url.rstrip("/").split("/")
    candidate = parts[-2].lower() if len(parts) >= 2 else ""
    return candidate if len(candidate) == 64 and all(c in "0123456789abcdef" for c in candidate) else ""


def download(url: str, target: str | os.PathLike, sha256: str = "") -> Path:
    """Download ``url`` to ``target`` unless it is already there; verify its SHA256 before it appears.

    The body goes to ``<target>.part-<pid>-*`` with a progress bar on stderr (on a terminal), hashed while written;
    only a complete body with the expected digest is renamed to ``target``. Any failure (network, short body, wrong
    digest, Ctrl-C) removes the partial file. ``<target>.lock`` serialises processes fetching the same file: the
    second one waits, then finds the file and returns it. The lock file is removed afterwards (no litter in
    ``~/.cache/clip``); in the rare case of a failed download with two waiters, both may retry at once, each into
    its own partial file, which costs bandwidth but never a wrong file.

    Args:
        url: where to fetch from.
        target: the file to create.
        sha256: the expected hex digest; empty takes it from the URL (``url_sha256``), and a URL without one is
            taken as it comes.

    Raises:
        DownloadError: naming the URL, the target and what went wrong (expected vs received digest).
    """
    target = Path(target).expanduser()
    expected = (sha256 or url_sha256(url)).lower()
    target.parent.mkdir(parents=True, exist_ok=True)
    lock_path = target.with_name(target.name + ".lock")
    with open(lock_path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or by the kernel if this process dies
        try:
            if not target.is_file():
                _download_locked(url, target, expected)
        finally:
            lock_path.unlink(missing_ok=True)  # a waiter still holding the old file finds the target and returns
    return target


def _download_locked(url: str, target: Path, expected: str) -> None:
    fd, name = tempfile.mkstemp(prefix=f"{target.name}.part-{os.getpid()}-", dir=target.parent)
    os.close(fd)
    part = Path(name)
    try:
        got = _fetch(url, part, target)
        if expected and got != expected:
            raise DownloadError(f"download of {url} refused: SHA256 {got} does not match the expected {expected}; "
                                f"{target} was not written (a corrupted transfer or a wrong mirror)")
        os.replace(part, target)
    finally:
        part.unlink(missing_ok=True)


def _fetch(url: str, part: Path, target: Path) -> str:
    """Stream ``url`` into ``part``; returns the body's SHA256. A body shorter than its Content-Length fails."""
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response, open(part, "wb") as out:
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            received = 0
            with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=target.name, file=sys.stderr,
                      disable=None, leave=False) as bar:
                for chunk in iter(lambda: response.read(CHUNK), b""):
                    out.write(chunk)
                    digest.update(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
    except (urllib.error.URLError, OSError) as e:
        raise DownloadError(f"download of {url} to {target} failed: {e}; fetch it by hand: {url} → {target} "
                            "(or set VLTUNE_WEIGHTS_URL to a mirror)") from e
    if total is not None and received != total:
        raise DownloadError(f"download of {url} ended after {received} of {total} bytes; {target} was not written "
                            "(run again to retry)")
    return digest.hexdigest()


# ---- open_clip pretrained tags ------------------------------------------------------------------------------------
def hf_cache_dir() -> Path:
    """The Hugging Face hub cache, read from the environment now (``HF_HUB_CACHE``, ``HF_HOME``/hub, else
    ``~/.cache/huggingface/hub``): huggingface_hub reads it once at import, which would miss a later change."""
    explicit = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return Path(home).expanduser() / "hub"


def url_cache_dir() -> Path:
    """Where open_clip (and ``clip.load``) keep files downloaded by URL: its ``cache_dir`` default."""
    return Path("~/.cache/clip").expanduser()


def pretrained_cfg(arch: str, tag: str) -> dict:
    """open_clip's pretrained entry for ``arch``/``tag``.

    Raises:
        ValueError: unknown tag; the message lists the architecture's tags (closest first), and the architectures
            that do have this tag.
    """
    cfg = open_clip.get_pretrained_cfg(arch, tag)
    if cfg:
        return cfg
    tags = open_clip.list_pretrained_tags_by_model(arch)
    close = difflib.get_close_matches(tag.lower().replace("-", "_"), tags, n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    known = (f"tags for {arch!r}: {', '.join(tags)}" if tags
             else f"architecture {arch!r} has no open_clip pretrained tags")
    others = open_clip.list_pretrained_models_by_tag(tag)
    elsewhere = (f" Tag {tag!r} exists for {', '.join(others[:8])}: set MODEL.BACKBONE.NAME to one of them."
                 if others else "")
    raise ValueError(f"MODEL.BACKBONE.PRETRAINED {tag!r}: not an open_clip pretrained tag of {arch!r}.{hint} "
                     f"{known}.{elsewhere}")


def check_quick_gelu(arch: str, tag: str, cfg: dict) -> None:
    """Refuse weights trained with another activation than the architecture's (open_clip only warns; the features
    would be silently off).

    Raises:
        ValueError: naming the tag, both activations and the architecture to use instead.
    """
    trained = bool(cfg.get("quick_gelu", False))
    model = bool((open_clip.get_model_config(arch) or {}).get("quick_gelu", False))
    if trained != model:
        fix = f"{arch}-quickgelu" if trained else arch.removesuffix("-quickgelu")
        raise ValueError(f"MODEL.BACKBONE.PRETRAINED {tag!r} was trained with {'QuickGELU' if trained else 'GELU'} "
                         f"but architecture {arch!r} uses {'QuickGELU' if model else 'GELU'}; set "
                         f"MODEL.BACKBONE.NAME {fix}")


def _hub_files(cfg: dict) -> tuple[str, list[str]]:
    """The hub repository of a pretrained entry and the file names open_clip tries there, safetensors first."""
    model_id, filename = os.path.split(cfg.get("hf_hub", ""))
    filename = filename or HF_WEIGHTS_NAME
    names = [HF_SAFE_WEIGHTS_NAME] if filename == HF_WEIGHTS_NAME else []
    if filename != HF_WEIGHTS_NAME and filename.endswith((".bin", ".pth")):
        names.append(filename[:-4] + ".safetensors")
    return model_id, [*names, filename]


def pretrained_places(cfg: dict) -> list[str]:
    """Where a pretrained entry's file is looked for (for error messages)."""
    places = []
    if cfg.get("hf_hub"):
        model_id, names = _hub_files(cfg)
        places += [f"hub {model_id}/{n} in {hf_cache_dir()}" for n in names]
    if cfg.get("url"):
        places.append(str(url_cache_dir() / os.path.basename(cfg["url"])))
    return places


def cached_pretrained(cfg: dict) -> Path | None:
    """The file of a pretrained entry already in open_clip's caches, found without any network access."""
    if cfg.get("hf_hub"):
        from huggingface_hub import try_to_load_from_cache

        model_id, names = _hub_files(cfg)
        for name in names:
            found = try_to_load_from_cache(model_id, name, cache_dir=hf_cache_dir())
            if isinstance(found, str) and os.path.isfile(found):
                return Path(found)
    if cfg.get("url"):
        path = url_cache_dir() / os.path.basename(cfg["url"])
        if path.is_file():
            return path
    return None


def download_pretrained(cfg: dict) -> Path:
    """Fetch a pretrained entry's file into open_clip's cache (hub entries through open_clip, URL entries with
    ``download``); returns its path.

    Raises:
        DownloadError: the fetch failed.
    """
    if cfg.get("hf_hub"):
        from open_clip.pretrained import download_pretrained_from_hf

        model_id, filename = os.path.split(cfg["hf_hub"])
        try:
            found = download_pretrained_from_hf(model_id, filename=filename or None, cache_dir=str(hf_cache_dir()))
            return Path(found)
        except Exception as e:  # noqa: BLE001  (open_clip wraps every hub error in its own types)
            if not cfg.get("url"):
                raise DownloadError(f"download of {model_id} from the Hugging Face hub failed: {e}") from e
    return download(cfg["url"], url_cache_dir() / os.path.basename(cfg["url"]))
