"""Weights that download like ``clip.load``: checksum-verified, atomic, once per suite; open_clip pretrained tags from
the hub cache; offline mode. A loopback HTTP server (127.0.0.1, started and stopped here) plays OpenAI's host, and a
tiny Dassl-style name (``Tiny/8`` → ``vltune-tiny``, file ``Tiny-8.pt``) is added to the name and URL tables."""

from __future__ import annotations

import hashlib
import http.server
import json
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch

import vltune  # noqa: F401  (compat shim: must precede open_clip/torchvision)

# isort: split
import open_clip
from clip_fixtures import TINY, make_tiny_clip, write_openai_jit, write_state_dict
from open_clip.pretrained import _pcfg

import parallel_runner
from vltune.clip import download, load_clip
from vltune.clip.loading import DASSL_NAMES, pending_download
from vltune.config.identity import identity, weights_identity
from vltune.runner.jobs import Job, _missing_weights, fetch_weights_once
from vltune.runner.schema import SuiteError

NAME, FILE = "Tiny/8", "Tiny-8.pt"


class Host:
    """What the loopback server serves and what it was asked for."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.gets: list[str] = []
        self.truncate: set[str] = set()  # paths whose body stops halfway (Content-Length promises it all)
        self.delay_s = 0.0
        self.url = ""


@pytest.fixture
def host():
    state = Host()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802  (http.server's name)
            state.gets.append(self.path)
            body = state.files.get(self.path)
            if body is None:
                self.send_error(404)
                return
            time.sleep(state.delay_s)
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body[: len(body) // 2] if self.path in state.truncate else body)
            self.close_connection = True

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture(scope="module")
def original():
    return make_tiny_clip(seed=3)


@pytest.fixture(scope="module")
def archive(original, tmp_path_factory) -> bytes:
    """The tiny CLIP as an OpenAI TorchScript archive, the format OpenAI serves."""
    return write_openai_jit(original, tmp_path_factory.mktemp("served") / FILE).read_bytes()


@pytest.fixture
def dassl(host: Host, archive: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``Tiny/8`` served by ``host`` under ``/<sha256>/Tiny-8.pt``; returns the folder it downloads into."""
    digest = hashlib.sha256(archive).hexdigest()
    host.files[f"/{digest}/{FILE}"] = archive
    monkeypatch.setitem(DASSL_NAMES, NAME, (TINY, FILE))
    monkeypatch.setitem(download.OPENAI_SHA256, FILE, digest)
    monkeypatch.setenv(download.BASE_URL_ENV, host.url)
    monkeypatch.setenv("VLTUNE_WEIGHTS_DIR", str(tmp_path / "weights"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("VLTUNE_CACHE_DIR", str(tmp_path / "vltune-cache"))
    for var in download.OFFLINE_ENVS:
        monkeypatch.delenv(var, raising=False)
    return tmp_path / "weights"


def _listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_dassl_name_downloads_a_verified_file_then_loads_it(dassl: Path, host: Host, archive: bytes, original) -> None:
    assert weights_identity(NAME, "") == f"missing:{NAME}"  # identities never download
    assert host.gets == []
    model = load_clip(NAME)
    assert torch.allclose(model.visual.proj, original.visual.proj.half().float())
    assert _listing(dassl) == [FILE]  # no partial file, no lock file left
    digest = hashlib.sha256(archive).hexdigest()
    assert hashlib.sha256((dassl / FILE).read_bytes()).hexdigest() == digest
    assert weights_identity(NAME, "") == f"sha256:{digest}"
    load_clip(NAME)
    assert host.gets == [f"/{digest}/{FILE}"]  # the second load finds the file


def test_a_wrong_checksum_is_refused_and_leaves_no_file(dassl: Path, host: Host, archive: bytes,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    claimed = "0" * 64
    host.files[f"/{claimed}/{FILE}"] = archive
    monkeypatch.setitem(download.OPENAI_SHA256, FILE, claimed)
    with pytest.raises(download.DownloadError) as err:
        load_clip(NAME)
    text = str(err.value)
    assert claimed in text and hashlib.sha256(archive).hexdigest() in text and f"{host.url}/{claimed}/{FILE}" in text
    assert _listing(dassl) == []


def test_an_interrupted_download_leaves_no_file(dassl: Path, host: Host, monkeypatch: pytest.MonkeyPatch) -> None:
    host.truncate = set(host.files)  # the server closes the connection halfway through the body
    with pytest.raises(download.DownloadError, match="ended after"):
        load_clip(NAME)
    assert _listing(dassl) == []

    host.truncate = set()

    class CtrlC:  # a Ctrl-C while the body streams in (the progress bar is updated after each chunk is written)
        def __init__(self, *args: object, **kwargs: object) -> None:
            pass

        def __enter__(self) -> CtrlC:
            return self

        def __exit__(self, *exc: object) -> None:
            pass

        def update(self, n: int) -> None:
            raise KeyboardInterrupt

    monkeypatch.setattr(download, "tqdm", CtrlC)
    with pytest.raises(KeyboardInterrupt):
        load_clip(NAME)
    assert _listing(dassl) == []


@pytest.mark.parametrize("variable", download.OFFLINE_ENVS)
def test_offline_names_the_url_to_fetch_by_hand_and_touches_no_network(dassl: Path, host: Host, variable: str,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    assert _missing_weights(NAME, "") == ""  # online, a downloadable name is not missing for the pre-flight
    monkeypatch.setenv(variable, "1")
    with pytest.raises(FileNotFoundError) as err:
        load_clip(NAME)
    text = str(err.value)
    url = download.openai_url(FILE)
    assert "looked at" in text and f"fetch it by hand: {url} → {dassl / FILE}" in text
    assert "looked at" in _missing_weights(NAME, "")  # offline, the pre-flight reports it missing
    assert host.gets == [] and _listing(dassl) == []


def test_a_name_openai_does_not_publish_is_never_downloaded(dassl: Path, host: Host) -> None:
    with pytest.raises(FileNotFoundError, match="Nothing is downloaded"):
        load_clip(TINY)
    assert "looked at" in _missing_weights(TINY, "")
    assert host.gets == []


def _hub_cache(root: Path, repo: str, weights: Path) -> Path:
    """A Hugging Face hub cache holding ``repo``'s ``open_clip_pytorch_model.bin`` at revision ``main``."""
    folder = root / "hub" / f"models--{repo.replace('/', '--')}"
    revision = "0123456789abcdef0123456789abcdef01234567"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(revision)
    snapshot = folder / "snapshots" / revision
    snapshot.mkdir(parents=True)
    target = snapshot / "open_clip_pytorch_model.bin"
    target.write_bytes(weights.read_bytes())
    return target


def test_a_pretrained_tag_loads_offline_from_the_hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           original, make_cfg) -> None:
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, TINY,
                        {"digits_s1k": _pcfg(hf_hub="vltune-test/tiny-clip/", quick_gelu=True)})
    cached = _hub_cache(tmp_path / "hf", "vltune-test/tiny-clip", write_state_dict(original, tmp_path / "sd.pt"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("VLTUNE_CACHE_DIR", str(tmp_path / "vltune-cache"))
    model = load_clip(TINY, pretrained="digits-s1k")  # open_clip's tag spelling rules: case and '-' → '_'
    assert torch.equal(model.visual.proj, original.visual.proj)
    cfg = make_cfg("ZeroshotCLIP", weights="", **{"MODEL.BACKBONE.PRETRAINED": "digits_s1k"})
    assert identity(cfg)["weights"] == f"sha256:{hashlib.sha256(cached.read_bytes()).hexdigest()}"

    with pytest.raises(ValueError, match="Did you mean 'digits_s1k'"):
        load_clip(TINY, pretrained="digits_s2k")
    cached.unlink()
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE=1"):
        load_clip(TINY, pretrained="digits_s1k")


def test_a_pretrained_tag_of_the_other_activation_is_refused() -> None:
    with pytest.raises(ValueError, match="MODEL.BACKBONE.NAME ViT-B-16-quickgelu"):
        pending_download("ViT-B-16", "", "openai")  # OpenAI's weights use QuickGELU; ViT-B-16 is GELU


def _job(i: int, weights: tuple[str, str, str]) -> Job:
    return Job(task="t", out=f"/nowhere/{i}", argv=[], clip_weights=weights)


def test_the_runner_fetches_each_missing_file_once_before_any_job(dassl: Path, host: Host, random_clip_weights: str,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    jobs = [_job(i, (NAME, "", "")) for i in range(3)] + [_job(3, (TINY, random_clip_weights, ""))]
    lines = fetch_weights_once(jobs, dry_run=True, echo=lambda line: None)
    assert lines == [f"would download weights for {NAME}: {download.openai_url(FILE)} → {dassl / FILE}"]
    assert host.gets == []
    assert len(fetch_weights_once(jobs, echo=lambda line: None)) == 1
    assert len(host.gets) == 1 and _listing(dassl) == [FILE]
    assert fetch_weights_once(jobs, echo=lambda line: None) == []  # on disk now: nothing to do

    (dassl / FILE).unlink()
    monkeypatch.setitem(download.OPENAI_SHA256, FILE, "f" * 64)  # not on the server: one error before any job
    with pytest.raises(SuiteError, match=r"(?s)3 job\(s\).*HTTP Error 404.*no job was started"):
        fetch_weights_once(jobs, echo=lambda line: None)


def test_two_processes_fetching_one_file_download_it_once(dassl: Path, host: Host) -> None:
    host.delay_s = 0.5  # the first download is still running when the second one asks
    errors: list[BaseException] = []

    def fetch() -> None:
        try:
            download.download(download.openai_url(FILE), dassl / FILE)
        except BaseException as e:  # noqa: BLE001  (reported by the assertion below)
            errors.append(e)

    threads = [threading.Thread(target=fetch) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(host.gets) == 1 and _listing(dassl) == [FILE]


def _zero_shot_suite(tmp_path: Path, data_root: str) -> str:
    path = tmp_path / "configs.py"
    path.write_text(textwrap.dedent(f"""
        base = dict(data=dict(root={data_root!r}), model=dict(backbone={NAME!r}), output=dict(root="out"))
        zs = dict(trainer="ZeroshotCLIP", config="tiny", protocol="fewshot", datasets=["digits"], seeds=[1, 2, 3],
                  eval_only=True, opts=["OPTIM.MAX_EPOCH", "0"])
        pipeline = [dict(gpu_ids=[], tasks=["zs"])]
    """))
    return str(path)


def test_a_suite_of_three_jobs_downloads_its_weights_once(dassl: Path, host: Host, archive: bytes, digits_root: str,
                                                          tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    suite = _zero_shot_suite(tmp_path, digits_root)
    assert parallel_runner.main(["--config", suite, "--dry-run"]) == 0
    assert f"would download weights for {NAME}" in capsys.readouterr().out and host.gets == []
    assert parallel_runner.main(["--config", suite, "--debug", "--plain", "--no-mail"]) == 0
    assert capsys.readouterr().out.count(f"downloading weights for {NAME}") == 1
    assert len(host.gets) == 1
    records = [json.loads(p.read_text()) for p in (tmp_path / "out").rglob("result.json")]
    digest = hashlib.sha256(archive).hexdigest()
    assert len(records) == 3 and all(r["identity"]["weights"] == f"sha256:{digest}" for r in records)


def test_a_failed_download_stops_the_suite_before_any_job(dassl: Path, host: Host, digits_root: str, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setitem(download.OPENAI_SHA256, FILE, "e" * 64)  # the server has no such file
    assert parallel_runner.main(["--config", _zero_shot_suite(tmp_path, digits_root), "--plain", "--no-mail"]) == 2
    assert "no job was started" in capsys.readouterr().err
    assert len(host.gets) == 1 and not list((tmp_path / "out").rglob("result.json"))
