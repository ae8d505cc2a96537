"""Training curves: every run's ``metrics.jsonl`` and TensorBoard events (``vltune.engine.curves``) on a tiny KgCoOp
run (2 epochs of 5 batches, a line every 2 steps: steps 1, 3 | 6, 8), a crash that still closes them and a resume
that redoes no epoch twice, and the report's training-loss plot (``vltune.results.plots``)."""

from __future__ import annotations

import json
import logging
import os
import sys
import threading

import pytest
from conftest import tiny_opts
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import train
from vltune.engine.curves import METRICS_FILE, read_metrics
from vltune.results.plots import loss_curve, mean_curve, write_plots
from vltune.results.record import JobInfo, Record, read_record, write_json_atomic
from vltune.results.report import rebuild_files

KGCOOP = {"DATASET.NUM_SHOTS": 2, "DATALOADER.TRAIN_X.BATCH_SIZE": 4, "OPTIM.MAX_EPOCH": 2, "TRAIN.PRINT_FREQ": 2,
          "OPTIM.NAME": "sgd", "OPTIM.LR": 0.01, "SEED": 1}
STEPS = [1, 3, 6, 8]  # 20 training images / 4 = 5 batches per epoch; every 2nd step
EPOCH_STEPS = [4, 9]  # an epoch's last iteration


def _lines(out, kind: str) -> list[dict]:
    return [e for e in read_metrics(os.path.join(out, METRICS_FILE)) if e["kind"] == kind]


def _events(out) -> EventAccumulator:
    acc = EventAccumulator(os.path.join(out, "tensorboard"))
    acc.Reload()
    return acc


def _steps(acc: EventAccumulator, tag: str) -> list[int]:
    return [e.step for e in acc.Scalars(tag)]


def test_steps_have_every_term_lr_and_time_and_epochs_the_record_s_means(digits_root, random_clip_weights, tmp_path):
    out = str(tmp_path / "run")
    opts = tiny_opts(digits_root, random_clip_weights, **KGCOOP, **{"TEST.FINAL_MODEL": "best_val"})
    assert train.main(["--trainer", "KgCoOp", "--output-dir", out, *opts], console=False) == 0
    record = read_record(os.path.join(out, "result.json"))

    steps = _lines(out, "step")
    assert [e["step"] for e in steps] == STEPS and [e["epoch"] for e in steps] == [1, 1, 2, 2]
    for e in steps:
        assert {"loss", "loss_ce", "loss_kg", "acc", "lr", "lr/prompt_learner/0", "time/step", "time/data"} <= set(e)
        assert e["loss"] == pytest.approx(e["loss_ce"] + e["loss_kg"], rel=1e-5)
        assert e["time/step"] >= e["time/data"] >= 0 and e["time/step"] > 0
        assert e["lr/prompt_learner/0"] == e["lr"]
    epochs = _lines(out, "epoch")
    assert [e["epoch"] for e in epochs] == [1, 2] and [e["step"] for e in epochs] == EPOCH_STEPS
    assert len(record["train"]) == 2
    for line, recorded in zip(epochs, record["train"]):
        assert {k: line[k] for k in recorded} == recorded  # the same means, bit for bit
    evals = _lines(out, "eval")
    assert [(e["split"], e["final"], e["step"]) for e in evals] == [("val", False, 4), ("val", False, 9),
                                                                     ("test", True, 10)]
    assert evals[-1]["accuracy"] == record["metrics"]["accuracy"]

    acc = _events(out)
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/loss_ce", "train/loss_kg", "train/acc", "train/lr", "train/lr/prompt_learner/0",
            "train/time/step", "train/time/data", "epoch/loss", "epoch/loss_kg", "val/accuracy", "test/accuracy",
            "test/error_rate", "test/macro_f1"} <= tags
    assert all(_steps(acc, t) == STEPS for t in ("train/loss", "train/loss_kg", "train/lr"))
    assert _steps(acc, "epoch/loss") == EPOCH_STEPS and _steps(acc, "val/accuracy") == EPOCH_STEPS
    assert [e.value for e in acc.Scalars("epoch/loss")] == pytest.approx([e["loss"] for e in record["train"]])
    assert [(e.step, e.value) for e in acc.Scalars("test/accuracy")] == [(10, pytest.approx(evals[-1]["accuracy"]))]


def test_a_crash_closes_the_curves_and_the_resumed_run_redoes_no_epoch_twice(make_trainer, tmp_path):
    out = tmp_path / "run"
    threads = set(threading.enumerate())
    trainer = make_trainer("KgCoOp", out, opts=KGCOOP)
    losses, calls = trainer.losses, []

    def crash_at_step_7(batch):
        calls.append(1)
        if len(calls) == 8:  # epoch 2, batch 2: after the step-6 line
            raise RuntimeError("planted crash")
        return losses(batch)

    trainer.losses = crash_at_step_7
    with pytest.raises(RuntimeError, match="planted crash"):
        trainer.train()
    assert trainer.curves.closed and set(threading.enumerate()) <= threads  # the event writer's thread is gone
    assert [e["step"] for e in _lines(out, "step")] == [1, 3, 6] and [e["epoch"] for e in _lines(out, "epoch")] == [1]
    assert _steps(_events(out), "train/loss") == [1, 3, 6]  # flushed on the way out

    resumed = make_trainer("KgCoOp", out, opts=KGCOOP)
    resumed.train()
    assert resumed.resumed_from == 1
    assert [e["step"] for e in _lines(out, "step")] == STEPS  # the crashed epoch's step line is gone, not doubled
    assert [e["epoch"] for e in _lines(out, "epoch")] == [1, 2]
    assert [e["epoch"] for e in resumed.train_history] == [1, 2]  # the record's train list: the crashed run's too
    assert resumed.train_history[0] == {k: v for k, v in _lines(out, "epoch")[0].items()
                                        if k not in ("kind", "step") and not k.startswith("lr/")}
    assert [(e["split"], e["final"]) for e in _lines(out, "eval")] == [("test", True)]
    acc = _events(out)
    assert _steps(acc, "train/loss") == STEPS and _steps(acc, "epoch/loss") == EPOCH_STEPS  # stale events purged

    again = make_trainer("KgCoOp", out, opts=KGCOOP)  # e.g. the first attempt died writing its record
    again.train()
    assert again.resumed_from == 2 and [e["epoch"] for e in _lines(out, "epoch")] == [1, 2]
    assert [(e["split"], e["final"]) for e in _lines(out, "eval")] == [("test", True)]  # the old final test replaced
    assert _steps(_events(out), "test/accuracy") == [10]
    assert set(threading.enumerate()) <= threads


@pytest.mark.parametrize("how", ["switched off", "not installed"])
def test_without_tensorboard_metrics_jsonl_is_still_written(how, make_trainer, tmp_path, monkeypatch, caplog):
    settings = {"TRAIN.TENSORBOARD": False} if how == "switched off" else {}
    if how == "not installed":
        monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # importing it raises ImportError
    trainer = make_trainer("KgCoOp", tmp_path, opts=KGCOOP, **settings)
    with caplog.at_level(logging.WARNING, logger="vltune.engine.curves"):
        trainer.train()
    assert [e["step"] for e in _lines(tmp_path, "step")] == STEPS
    assert not (tmp_path / "tensorboard").exists()
    warnings = [r.getMessage() for r in caplog.records if "TensorBoard" in r.getMessage()]
    assert len(warnings) == (1 if how == "not installed" else 0), warnings


def test_evaluation_only_runs_write_no_curves(make_trainer, tmp_path):
    for folder in ("eval", "zs"):
        (tmp_path / folder).mkdir()
    make_trainer("KgCoOp", tmp_path / "eval", eval_only=True, opts=KGCOOP).test()
    make_trainer("ZeroshotCLIP", tmp_path / "zs", opts=KGCOOP).train()  # nothing to train: straight to the test
    for folder in ("eval", "zs"):
        assert sorted(os.listdir(tmp_path / folder)) == []


def test_learning_rates_are_named_by_optimizer_and_group(make_trainer):
    trainer = make_trainer("FinetuneCLIP", opts=KGCOOP, **{"TRAINER.FINETUNE.TEXT_LR": 0.5})
    (name,) = trainer._optims
    lrs = trainer.group_lrs()
    assert lrs == {f"lr/{name}/text": 0.5, f"lr/{name}/image": pytest.approx(0.01)}
    assert make_trainer("KgCoOp", opts=KGCOOP).group_lrs() == {"lr/prompt_learner/0": pytest.approx(0.01)}


# ---- the report's training-loss plot ----------------------------------------------------------------------------
def _record(trainer: str, seed: int, losses: dict[int, float], resumed_from: int = 0) -> Record:
    job = JobInfo(trainer=trainer, config="tiny", dataset="digits", shots=2, seed=seed, phase="train",
                  protocol="fewshot", role="fewshot", resumed_from_epoch=resumed_from)
    train = [{"epoch": e, "loss": v, "loss_ce": v, "lr": 0.01} for e, v in losses.items()]
    return Record(status="success", job=job, metrics={"accuracy": 50.0}, train=train)


def test_loss_curve_takes_the_record_and_completes_a_resumed_run_from_metrics_jsonl(tmp_path):
    record = _record("CoOp", 1, {3: 1.5, 4: 1.25}, resumed_from=2)
    record.path = str(tmp_path / "result.json")
    lines = [{"kind": "step", "epoch": 1, "step": 0, "loss": 9.0}, {"kind": "epoch", "epoch": 1, "loss": 2.0},
             {"kind": "epoch", "epoch": 2, "loss": 1.75}, {"kind": "epoch", "epoch": 3, "loss": 7.0}]
    (tmp_path / METRICS_FILE).write_text("".join(json.dumps(e) + "\n" for e in lines) + '{"kind": "ep')  # torn
    assert loss_curve(record) == {1: 2.0, 2: 1.75, 3: 1.5, 4: 1.25}  # the record's own epochs win
    assert mean_curve([{1: 2.0, 2: 1.0}, {1: 4.0, 2: 3.0, 3: 1.0}]) == {1: 3.0, 2: 2.0, 3: 1.0}


def test_report_plots_training_loss_per_method_for_a_dataset(tmp_path):
    records = [_record("CoOp", s, {1: 2.0 + s, 2: 1.0 + s}) for s in (1, 2)]
    records += [_record("KgCoOp", s, {1: 3.0, 2: 2.5, 3: 2.0}) for s in (1, 2)]
    records.append(Record(status="success", job=JobInfo(trainer="ZeroshotCLIP", dataset="digits", phase="eval",
                                                        protocol="fewshot", role="fewshot"),
                          metrics={"accuracy": 40.0}))
    for i, r in enumerate(records):
        write_json_atomic(str(tmp_path / f"{i:02d}" / "result.json"), r.to_dict())
    report, written = rebuild_files(str(tmp_path))
    plot = "plots/train_loss_fewshot_digits.png"
    assert f"![train_loss_fewshot_digits]({plot})" in report and str(tmp_path / plot) in written
    data = (tmp_path / plot).read_bytes()
    assert data.startswith(b"\x89PNG") and len(data) > 5_000
    assert [p for p in write_plots(records[-1:], str(tmp_path / "zs")) if "train_loss" in p] == []
