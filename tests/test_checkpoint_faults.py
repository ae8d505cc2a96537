"""Checkpoint faults: another trainer's checkpoint, a missing module folder, a corrupt file.

Unit tests on a two-module ``TrainerBase`` (fast), then ``train.py`` end to end on the tiny CLIP: KgCoOp and
CLIPAdapter evaluating a CoOp run fail naming the trainers and files, a truncated newest resume checkpoint is skipped
for the previous epoch with the same final accuracy as an uninterrupted run, and an explicit load of a truncated file
fails naming it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil

import pytest
import torch
from conftest import REPO
from torch import nn

import train
from vltune.config import get_cfg_default
from vltune.engine import TrainerX
from vltune.engine.base import CheckpointMismatchError, TrainerBase
from vltune.engine.checkpoint import CorruptCheckpointError, load_checkpoint, save_checkpoint

DIGITS = str(REPO / "configs/datasets/digits.yaml")
CFG = {name: str(REPO / f"configs/trainers/{name}/tiny_ep10.yaml") for name in ("CoOp", "KgCoOp", "CLIPAdapter")}


def _truncate(path: str) -> None:
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])


class _TwoModules(TrainerBase):
    """Two registered linear modules and a config naming the trainer ``name``."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.cfg = get_cfg_default()
        self.cfg.TRAINER.NAME = name
        self.device = torch.device("cpu")
        for module in ("a", "b"):
            self.register_model(module, nn.Linear(2, 2))

    def set_all(self, value: float) -> None:
        for module in self._models.values():
            for p in module.parameters():
                p.data.fill_(value)


@pytest.mark.parametrize("blob", [b"", b"not a checkpoint" * 4, None], ids=["empty", "garbage", "truncated"])
def test_an_unreadable_file_raises_corrupt_checkpoint_error_naming_it(tmp_path, blob):
    path = str(tmp_path / "model.pth.tar-3")
    torch.save({"state_dict": {"w": torch.ones(64)}, "epoch": 3}, path)
    if blob is None:
        _truncate(path)
    else:
        with open(path, "wb") as f:
            f.write(blob)
    with pytest.raises(CorruptCheckpointError, match="model.pth.tar-3") as info:
        load_checkpoint(path)
    assert info.value.path == path


def test_checkpoints_record_their_trainer_and_refuse_another_one(tmp_path):
    writer = _TwoModules("MethodA")
    writer.set_all(1.0)
    writer.save_model(0, str(tmp_path))
    assert load_checkpoint(str(tmp_path / "a" / "model.pth.tar-1"))["trainer"] == "MethodA"
    with pytest.raises(CheckpointMismatchError, match=r"model\.pth\.tar-1 was written by trainer MethodA.*MethodB"):
        _TwoModules("MethodB").load_model(str(tmp_path), epoch=1)
    same = _TwoModules("MethodA")
    same.load_model(str(tmp_path), epoch=1)
    assert all(p.eq(1).all() for m in same._models.values() for p in m.parameters())


def test_a_checkpoint_without_a_trainer_field_still_loads(tmp_path):
    for module in ("a", "b"):
        state = {"state_dict": nn.Linear(2, 2).state_dict(), "epoch": 5, "optimizer": None, "scheduler": None,
                 "val_result": None}
        save_checkpoint(state, str(tmp_path / module))
    reader = _TwoModules("MethodB")
    reader.load_model(str(tmp_path), epoch=5)
    assert reader.loaded_epoch == 5


def test_resume_skips_a_corrupt_newest_epoch_for_every_module(tmp_path, caplog):
    writer = _TwoModules("MethodA")
    for epoch in (1, 2):
        writer.set_all(float(epoch))
        writer.save_model(epoch - 1, str(tmp_path))
    bad = str(tmp_path / "b" / "model.pth.tar-2")
    _truncate(bad)
    reader = _TwoModules("MethodA")
    with caplog.at_level(logging.WARNING):
        assert reader.resume_model_if_exist(str(tmp_path)) == 1
    assert bad in caplog.text
    assert all(p.eq(1).all() for m in reader._models.values() for p in m.parameters())  # "a" is not left at epoch 2


def _argv(trainer: str, root: str, out: str, weights: str, *extra: str, epochs: int = 2) -> list[str]:
    return ["--root", root, "--seed", "1", "--trainer", trainer, "--dataset-config-file", DIGITS, "--config-file",
            CFG[trainer], "--output-dir", out, *extra, "MODEL.BACKBONE.WEIGHTS", weights, "USE_CUDA", "False",
            "DATASET.NUM_SHOTS", "4", "OPTIM.MAX_EPOCH", str(epochs)]


def _record(out: str) -> dict:
    with open(os.path.join(out, "result.json")) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def coop_run(tmp_path_factory, digits_root, tiny_clip_weights):
    """A finished 4-epoch CoOp run: (data root, weights, run folder)."""
    out = str(tmp_path_factory.mktemp("faults") / "coop")
    assert train.main(_argv("CoOp", digits_root, out, tiny_clip_weights, epochs=4)) == 0
    return digits_root, tiny_clip_weights, out


def _evaluate_with(trainer: str, coop_run: tuple[str, str, str], out: str) -> str:
    """Run ``trainer`` --eval-only on the CoOp run's epoch-4 checkpoint; it must fail: returns the recorded error."""
    root, weights, coop = coop_run
    argv = _argv(trainer, root, out, weights, "--eval-only", "--model-dir", coop, "--load-epoch", "4", epochs=4)
    assert train.main(argv) == 1
    return _record(out)["error"]


def test_kgcoop_evaluating_a_coop_run_fails_naming_both_trainers_and_the_file(coop_run, tmp_path):
    coop = coop_run[2]
    error = _evaluate_with("KgCoOp", coop_run, str(tmp_path / "kg"))
    assert "CoOp" in error and "KgCoOp" in error
    assert os.path.join(coop, "prompt_learner", "model.pth.tar-4") in error


def test_a_coop_run_from_before_the_trainer_field_is_refused_by_its_folder_and_loads_without_one(coop_run, tmp_path):
    root, weights, coop = coop_run
    old = str(tmp_path / "old")
    shutil.copytree(coop, old)
    path = os.path.join(old, "prompt_learner", "model.pth.tar-4")
    state = torch.load(path, weights_only=True)
    del state["trainer"], state["trainer_config"]
    torch.save(state, path)
    argv = _argv("KgCoOp", root, str(tmp_path / "kg"), weights, "--eval-only", "--model-dir", old, "--load-epoch", "4",
                 epochs=4)
    assert train.main(argv) == 1
    assert "written by trainer CoOp" in _record(str(tmp_path / "kg"))["error"]
    for f in ("result.json", "config.yaml"):
        os.remove(os.path.join(old, f))
    again = str(tmp_path / "again")
    argv = _argv("CoOp", root, again, weights, "--eval-only", "--model-dir", old, "--load-epoch", "4", epochs=4)
    assert train.main(argv) == 0
    assert _record(again)["metrics"]["accuracy"] == _record(coop)["metrics"]["accuracy"]


def test_clip_adapter_on_a_coop_run_names_the_folders_it_holds_and_their_trainer(coop_run, tmp_path):
    error = _evaluate_with("CLIPAdapter", coop_run, str(tmp_path / "adapter"))
    assert "clip_adapter" in error and "prompt_learner" in error and "CoOp" in error


def test_a_truncated_newest_resume_checkpoint_resumes_from_the_previous_epoch(coop_run, tmp_path, monkeypatch):
    root, weights, coop = coop_run
    out = str(tmp_path / "killed")
    step = TrainerX.forward_backward

    def interrupted(self, batch):
        if self.epoch == 3 and self.batch_idx == 1:
            raise KeyboardInterrupt
        return step(self, batch)

    monkeypatch.setattr(TrainerX, "forward_backward", interrupted)
    assert train.main(_argv("CoOp", root, out, weights, epochs=4)) == 130
    monkeypatch.setattr(TrainerX, "forward_backward", step)
    folder = os.path.join(out, "prompt_learner")
    assert sorted(os.listdir(folder)) == ["checkpoint", "model.pth.tar-2", "model.pth.tar-3"]
    bad = os.path.join(folder, "model.pth.tar-3")
    _truncate(bad)

    assert train.main(_argv("CoOp", root, out, weights, epochs=4)) == 0
    rec = _record(out)
    assert rec["status"] == "success" and rec["job"]["resumed_from_epoch"] == 2
    logs = "".join(open(os.path.join(out, f)).read() for f in os.listdir(out) if f.startswith("log.txt"))
    assert f"corrupt checkpoint {bad}" in logs
    assert rec["metrics"]["accuracy"] == _record(coop)["metrics"]["accuracy"]
    assert rec["metrics"]["per_class"] == _record(coop)["metrics"]["per_class"]


def test_eval_only_of_a_truncated_checkpoint_fails_naming_the_file(coop_run, tmp_path):
    root, weights, coop = coop_run
    run = str(tmp_path / "run")
    shutil.copytree(coop, run)
    bad = os.path.join(run, "prompt_learner", "model.pth.tar-4")
    _truncate(bad)
    out = str(tmp_path / "eval")
    argv = _argv("CoOp", root, out, weights, "--eval-only", "--model-dir", run, "--load-epoch", "4", epochs=4)
    assert train.main(argv) == 1
    assert f"corrupt checkpoint {bad}" in _record(out)["error"]
