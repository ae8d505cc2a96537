"""train.py end to end on real data (digits in CoOp layout) with a tiny CLIP pretrained on the digits train split.

Covers: CoOp learns (beats the same model's zero-shot accuracy on the same test split by a margin), the Dassl log
lines old parsers read, result.json, ``--eval-only --model-dir --load-epoch`` reproducing the final accuracy
exactly, a finished output dir not being retrained, and a run killed mid-way resuming from its last checkpoint to the
same result as an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
from conftest import REPO

import train

COOP_CFG = str(REPO / "configs/trainers/CoOp/tiny_ep10.yaml")
ZS_CFG = str(REPO / "configs/trainers/ZeroshotCLIP/tiny.yaml")
DIGITS = str(REPO / "configs/datasets/digits.yaml")
MARGIN = 5.0
# Runs train.py and sends itself signal SIG in the middle of the third epoch (after epoch 2's checkpoint is written).
SIGNAL_IN_EPOCH_3 = """
import os, signal, sys
sys.path.insert(0, os.getcwd())
import train
from vltune.engine import TrainerX
step = TrainerX.forward_backward
def forward_backward(self, batch):
    if self.epoch == 2 and self.batch_idx == 1:
        os.kill(os.getpid(), signal.SIG)
    return step(self, batch)
TrainerX.forward_backward = forward_backward
sys.exit(train.main(sys.argv[1:]))
"""  # CoOp must beat zero-shot by at least this many accuracy points


def _argv(trainer: str, cfg: str, root: str, out: str, weights: str, *extra: str, opts: tuple = ()) -> list[str]:
    return ["--root", root, "--seed", "1", "--trainer", trainer, "--dataset-config-file", DIGITS, "--config-file",
            cfg, "--output-dir", out, *extra, "MODEL.BACKBONE.WEIGHTS", weights, "USE_CUDA", "False", *opts]


def _record(out: str) -> dict:
    with open(os.path.join(out, "result.json")) as f:
        return json.load(f)


def _coop_opts(epochs: int = 10) -> tuple:
    return ("DATASET.NUM_SHOTS", "4", "OPTIM.MAX_EPOCH", str(epochs))


@pytest.fixture(scope="module")
def runs(tmp_path_factory, digits_root, tiny_clip_weights):
    """The zero-shot run and a 4-shot CoOp run of the same pretrained tiny CLIP."""
    base = tmp_path_factory.mktemp("cli")
    zs, coop = str(base / "zs"), str(base / "coop")
    assert train.main(_argv("ZeroshotCLIP", ZS_CFG, digits_root, zs, tiny_clip_weights, "--eval-only")) == 0
    assert train.main(_argv("CoOp", COOP_CFG, digits_root, coop, tiny_clip_weights, opts=_coop_opts())) == 0
    return {"zs": zs, "coop": coop, "root": digits_root, "weights": tiny_clip_weights}


def test_coop_beats_zero_shot_on_the_same_test_split(runs):
    zs, coop = _record(runs["zs"]), _record(runs["coop"])
    assert zs["status"] == coop["status"] == "success"
    assert zs["metrics"]["accuracy"] > 30.0, "the pretrained tiny CLIP should be well above chance (10 %)"
    assert coop["metrics"]["accuracy"] >= zs["metrics"]["accuracy"] + MARGIN, (zs["metrics"], coop["metrics"])
    assert zs["cost"]["trainable_params"] == 0
    assert coop["cost"]["trainable_params"] == 4 * 64  # N_CTX 4 × width 64


def test_result_record_and_dassl_log_lines(runs):
    rec = _record(runs["coop"])
    assert rec["job"] == {**rec["job"], "trainer": "CoOp", "config": "tiny_ep10", "dataset": "Digits", "shots": 4,
                          "subsample": "all", "seed": 1, "phase": "train"}
    assert set(rec["metrics"]) >= {"accuracy", "macro_f1", "per_class", "error"}
    assert len(rec["metrics"]["per_class"]) == 10
    assert rec["method"] == {}  # CoOp reports nothing beyond its config (CoPrompt reports its descriptions source)
    for key in ("train_time_s", "eval_time_s", "train_peak_mb", "train_peak_method", "eval_peak_mb",
                "eval_peak_method", "peak_rss_mb", "meter_notes", "trainable_params", "total_params"):
        assert key in rec["cost"]
    assert rec["cost"]["train_time_s"] > 0 and rec["cost"]["train_peak_mb"] > 0 and rec["cost"]["eval_peak_mb"] > 0
    assert rec["cost"]["train_peak_method"] == rec["cost"]["eval_peak_method"] == "cpu_profiler_tensor_bytes"
    zs = _record(runs["zs"])["cost"]  # evaluation only: an eval peak, no train peak, and a note saying why
    assert zs["eval_peak_method"] == "cpu_profiler_tensor_bytes" and zs["train_peak_mb"] is None
    assert zs["meter_notes"] == ["train peak: no training step ran"]
    assert rec["config"]["OPTIM"]["MAX_EPOCH"] == 10 and rec["env"]["torch"]
    log = open(os.path.join(runs["coop"], "log.txt")).read().splitlines()
    for line in ("Finish training", "=> result", "Deploy the last-epoch model", "Setting fixed seed: 1"):
        assert line in log
    acc_lines = [x for x in log if x.startswith("* accuracy: ")]
    assert acc_lines and acc_lines[-1] == f"* accuracy: {rec['metrics']['accuracy']:.1f}%"
    assert any(x.startswith("* macro_f1: ") for x in log) and any(x.startswith("epoch [10/10]") for x in log)
    assert os.path.isfile(os.path.join(runs["coop"], "config.yaml"))
    assert os.path.isfile(os.path.join(runs["coop"], "prompt_learner", "model.pth.tar-10"))


def test_eval_only_reproduces_the_final_accuracy_exactly(runs, tmp_path):
    out = str(tmp_path / "eval")
    argv = _argv("CoOp", COOP_CFG, runs["root"], out, runs["weights"], "--eval-only", "--model-dir", runs["coop"],
                 "--load-epoch", "10", opts=_coop_opts())
    assert train.main(argv) == 0
    trained, evaluated = _record(runs["coop"]), _record(out)
    assert evaluated["job"]["phase"] == "eval" and evaluated["job"]["load_epoch"] == 10
    assert evaluated["metrics"]["accuracy"] == trained["metrics"]["accuracy"]
    assert evaluated["metrics"]["per_class"] == trained["metrics"]["per_class"]


def test_rerun_into_a_finished_dir_does_not_retrain(runs, capsys):
    before = _record(runs["coop"])
    ckpt = os.path.join(runs["coop"], "prompt_learner", "model.pth.tar-10")
    mtime = os.path.getmtime(ckpt)
    argv = _argv("CoOp", COOP_CFG, runs["root"], runs["coop"], runs["weights"], opts=_coop_opts())
    assert train.main(argv) == 0
    assert "This task was already finished" in capsys.readouterr().out
    assert _record(runs["coop"]) == before and os.path.getmtime(ckpt) == mtime
    with pytest.raises(SystemExit, match="different config.*OPTIM.MAX_EPOCH 10 → 11"):
        train.main(argv[:-2] + ["OPTIM.MAX_EPOCH", "11"])


def test_unknown_key_fails_before_anything_runs(runs, tmp_path, capsys):
    out = str(tmp_path / "bad")
    argv = _argv("CoOp", COOP_CFG, runs["root"], out, runs["weights"], opts=("TRAINER.COOP.NCTX", "4"))
    assert train.main(argv) == 2
    assert "TRAINER.COOP.N_CTX" in capsys.readouterr().err and not os.path.exists(out)


def test_failure_writes_exceptions_and_a_failed_record(runs, tmp_path):
    out = str(tmp_path / "fail")
    argv = _argv("CoOp", COOP_CFG, runs["root"], out, str(tmp_path / "missing.pt"), opts=_coop_opts(1))
    assert train.main(argv) == 1
    rec = _record(out)
    assert rec["status"] == "failed" and "missing.pt" in rec["error"]
    assert "Traceback" in open(os.path.join(out, "exceptions.txt")).read()


def test_a_job_console_has_no_native_profiler_chatter(runs, tmp_path):
    """The CPU memory meter profiles a step; kineto's USDT lines and c10's CPUAllocator warning stay out of the job's
    console (and so out of the runner's stdout.log / stderr.log), while the meter still measures."""
    out = str(tmp_path / "quiet")
    argv = _argv("CoOp", COOP_CFG, runs["root"], out, runs["weights"], opts=_coop_opts(1))
    env = {k: v for k, v in os.environ.items() if k not in ("KINETO_LOG_LEVEL", "TORCH_CPP_LOG_LEVEL")}
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), *argv], cwd=REPO, capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    console = proc.stdout + proc.stderr
    assert "USDT" not in console and "CPUAllocator" not in console, console[-2000:]
    assert _record(out)["cost"]["train_peak_method"] == "cpu_profiler_tensor_bytes"


@pytest.mark.slow  # kills a train.py subprocess, then resumes
def test_killed_run_resumes_from_its_last_checkpoint(runs, tmp_path):
    epochs = 6
    reference = str(tmp_path / "reference")
    assert train.main(_argv("CoOp", COOP_CFG, runs["root"], reference, runs["weights"], opts=_coop_opts(epochs))) == 0

    out = str(tmp_path / "killed")
    argv = _argv("CoOp", COOP_CFG, runs["root"], out, runs["weights"], opts=_coop_opts(epochs))
    script = SIGNAL_IN_EPOCH_3.replace("SIG)", "SIGKILL)")
    proc = subprocess.run([sys.executable, "-c", script, *argv], cwd=REPO, capture_output=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert os.path.isfile(os.path.join(out, "prompt_learner", "model.pth.tar-2"))
    assert not os.path.exists(os.path.join(out, "result.json"))

    assert train.main(_argv("CoOp", COOP_CFG, runs["root"], out, runs["weights"], opts=_coop_opts(epochs))) == 0
    rec = _record(out)
    assert rec["status"] == "success" and rec["job"]["resumed_from_epoch"] >= 2
    logs = "".join(open(os.path.join(out, f)).read() for f in os.listdir(out) if f.startswith("log.txt"))
    assert f"Found checkpoint at {out} (will resume training)" in logs
    assert rec["metrics"]["accuracy"] == _record(reference)["metrics"]["accuracy"]
    assert rec["metrics"]["per_class"] == _record(reference)["metrics"]["per_class"]


def test_best_val_model_is_deployed_and_reloaded_by_default(runs, tmp_path):
    out, opts = str(tmp_path / "best"), (*_coop_opts(4), "TEST.FINAL_MODEL", "best_val")
    assert train.main(_argv("CoOp", COOP_CFG, runs["root"], out, runs["weights"], opts=opts)) == 0
    assert os.path.isfile(os.path.join(out, "prompt_learner", "model-best.pth.tar"))
    log = open(os.path.join(out, "log.txt")).read()
    assert "Deploy the model with the best val performance" in log and "Evaluate on the *val* set" in log
    again = str(tmp_path / "again")
    argv = _argv("CoOp", COOP_CFG, runs["root"], again, runs["weights"], "--eval-only", "--model-dir", out, opts=opts)
    assert train.main(argv) == 0  # no --load-epoch: model-best.pth.tar, as in Dassl
    assert _record(again)["metrics"]["accuracy"] == _record(out)["metrics"]["accuracy"]


@pytest.mark.slow  # signals a train.py subprocess, then resumes
def test_sigterm_records_a_cancelled_run_that_a_rerun_resumes(runs, tmp_path):
    out = str(tmp_path / "terminated")
    argv = _argv("CoOp", COOP_CFG, runs["root"], out, runs["weights"], opts=_coop_opts(4))
    script = SIGNAL_IN_EPOCH_3.replace("SIG)", "SIGTERM)")
    proc = subprocess.run([sys.executable, "-c", script, *argv], cwd=REPO, capture_output=True, timeout=300)
    assert proc.returncode == 130, proc.stderr.decode()[-2000:]
    assert _record(out)["status"] == "cancelled"
    assert train.main(argv) == 0
    assert _record(out)["status"] == "success" and _record(out)["job"]["resumed_from_epoch"] == 2
