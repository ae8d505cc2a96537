"""Every method learns: trained on MiniBench ``digits`` (base classes, 16 shots, seed 1) with its ``mini.yaml``, each
registered trainer beats zero-shot CLIP's base accuracy, measured here with the same mini CLIP.

The registry is enumerated, so a new method joins by shipping ``configs/trainers/<Name>/mini.yaml``; trainers that
train nothing (``test_overrides=dict(trainable=False)``) are the baseline, not a subject.
"""

from __future__ import annotations

import os

import pytest
from conftest import REPO

import train
from vltune.config import get_cfg
from vltune.registry import TRAINERS
from vltune.results.record import read_record

get_cfg()
LEARNERS = [n for n in TRAINERS.registered_names()
            if (TRAINERS.meta(n).get("test_overrides") or {}).get("trainable", True)]
MARGIN = 1.0  # points above zero-shot


def _run(root: str, weights: str, out: str, trainer: str, config: str, eval_only: bool = False) -> float:
    argv = ["--root", root, "--seed", "1", "--trainer", trainer, *(["--eval-only"] if eval_only else []),
            "--dataset-config-file", str(REPO / "configs" / "datasets" / "digits.yaml"),
            "--config-file", str(REPO / "configs" / "trainers" / trainer / f"{config}.yaml"), "--output-dir", out,
            "MODEL.BACKBONE.NAME", "vltune-tiny", "MODEL.BACKBONE.WEIGHTS", weights,
            "DATASET.NUM_SHOTS", "16", "DATASET.SUBSAMPLE_CLASSES", "base"]
    assert train.main(argv, console=False) == 0, out
    return read_record(os.path.join(out, "result.json"))["metrics"]["accuracy"]


@pytest.fixture(scope="module")
def zero_shot(minibench, tmp_path_factory) -> float:
    root, weights = minibench
    return _run(root, weights, str(tmp_path_factory.mktemp("zs")), "ZeroshotCLIP", "tiny", eval_only=True)


def test_every_learning_method_ships_a_minibench_config():
    missing = [n for n in LEARNERS if not (REPO / "configs" / "trainers" / n / "mini.yaml").is_file()]
    assert not missing, f"add configs/trainers/<Name>/mini.yaml for {missing}"


@pytest.mark.slow  # one MiniBench training run per method: minutes in all
@pytest.mark.parametrize("name", [n for n in LEARNERS if (REPO / "configs" / "trainers" / n / "mini.yaml").is_file()])
def test_method_beats_zero_shot_on_minibench_base_classes(name, minibench, zero_shot, tmp_path):
    root, weights = minibench
    accuracy = _run(root, weights, str(tmp_path), name, "mini")
    assert accuracy > zero_shot + MARGIN, f"{name}: {accuracy:.2f} vs zero-shot {zero_shot:.2f}"
