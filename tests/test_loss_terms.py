"""Every loss term a method adds reaches the per-epoch log and ``result.json``'s ``train`` list, and the logged total
is their sum: the regularisers of PromptSRC, KgCoOp, ProGrad, TCP, CoPrompt and DePT are no longer folded into one
scalar that nobody sees."""

from __future__ import annotations

import math
import os

import pytest
from conftest import REPO

import train
from vltune.results.record import read_record

pytestmark = pytest.mark.slow  # end-to-end runs (train.py / the runner in subprocesses)

#: the loss terms each method logs (``loss_<term>``), from its ``losses``/``regularizers``
TERMS = {
    "CoOp": {"ce"},
    "KgCoOp": {"ce", "kg"},
    "ProGrad": {"ce", "kl"},  # prograd's update projects L_ce against L_kl: L_kl is logged beside the objective
    "TCP": {"ce", "kg"},
    "PromptSRC": {"ce", "text_l1", "image_l1", "kl"},
    "CoPrompt": {"ce", "text_consistency", "image_consistency"},
    "KgDePT": {"sim", "head", "kg"},
}


@pytest.mark.parametrize("trainer", sorted(TERMS))
def test_every_loss_term_is_logged_per_epoch_and_recorded(trainer, digits_root, random_clip_weights, tmp_path):
    out = str(tmp_path / trainer)
    folder = "ExtrasLinearProbeKgCoOp" if trainer == "KgDePT" else trainer
    argv = ["--root", digits_root, "--seed", "1", "--trainer", trainer,
            "--dataset-config-file", str(REPO / "configs" / "datasets" / "digits.yaml"),
            "--config-file", str(REPO / "configs" / "trainers" / folder / "tiny_ep10.yaml"), "--output-dir", out,
            "MODEL.BACKBONE.WEIGHTS", random_clip_weights, "OPTIM.MAX_EPOCH", "2", "DATASET.NUM_SHOTS", "2"]
    assert train.main(argv, console=False) == 0
    history = read_record(os.path.join(out, "result.json"))["train"]
    assert [e["epoch"] for e in history] == [1, 2]
    log = open(os.path.join(out, "log.txt"), encoding="utf-8").read()
    for epoch in history:
        terms = {k.removeprefix("loss_") for k in epoch if k.startswith("loss_")}
        assert terms == TERMS[trainer]
        assert all(math.isfinite(epoch[f"loss_{t}"]) for t in terms) and "acc" in epoch and "lr" in epoch
        summed = ["ce"] if trainer == "ProGrad" else terms  # prograd's objective is L_ce alone
        assert epoch["loss"] == pytest.approx(sum(epoch[f"loss_{t}"] for t in summed), rel=1e-5, abs=1e-6)
        line = next(ln for ln in log.splitlines() if f"epoch [{epoch['epoch']}/2] means:" in ln)
        assert all(f"loss_{t} " in line for t in terms), line
