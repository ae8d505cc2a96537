"""Adding a method is one file plus one import line, and nothing else in the repository changes.

A lab's own package, written to a temporary folder: ``toy_methods/__init__.py`` is one import line and
``toy_methods/toy.py`` one method file (``ToyProbe``: a learnable per-channel scale and shift of frozen CLIP image
features and a learnable temperature, classified against frozen zero-shot text features), with its yaml beside it.
Named in ``VLTUNE_PLUGINS`` (its folder on ``PYTHONPATH``), the method is then picked up by (a) the registry-driven
test matrix (``tests/test_trainers.py``), (b) the paper presets (a dry run lists its jobs, and says why it is left
out of the protocol it has no preset for) and (c) the runner (a two-job suite on the digits dataset succeeds). Each
part runs in a subprocess, as a user would, so this session's registry never sees the toy method.
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import textwrap

import pytest
from conftest import REPO

pytestmark = pytest.mark.slow  # end-to-end runs (train.py / the runner in subprocesses)

TOY = "ToyProbe"
INIT = "import toy_methods.toy\n"
METHOD = '''
"""ToyProbe: frozen CLIP; a learnable per-channel scale and shift of the image features and a learnable temperature,
classified against the frozen zero-shot text features of the dataset's template (a toy method for the tests).

Trainable: ``scale``, ``shift`` (E each) and ``log_temperature`` (with ``TRAINER.TOYPROBE.LEARN_TEMPERATURE``),
registered as ``probe``. logits = exp(t) · norm(scale ⊙ f + shift) · Wᵀ; L = CE.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from yacs.config import CfgNode as CN

from vltune.engine import TrainerX
from vltune.registry import TRAINERS

#: the method's yaml, kept beside it (the presets take an absolute path to a plugin's own yaml)
TINY_YAML = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny.yaml")


def add_config(cfg: CN) -> None:
    """``TRAINER.TOYPROBE``: the method's own config node."""
    cfg.TRAINER.TOYPROBE = CN()
    cfg.TRAINER.TOYPROBE.LEARN_TEMPERATURE = True  # False: keep CLIP's logit scale
    cfg.TRAINER.TOYPROBE.PREC = ""  # fp16 | amp | fp32; empty: TRAINER.PREC


class Probe(nn.Module):
    """(B, E) frozen image features, (C, E) text weights → (B, C) logits."""

    def __init__(self, dim: int, logit_scale: float, learn_temperature: bool) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))
        self.shift = nn.Parameter(torch.zeros(dim))
        t = torch.tensor(math.log(logit_scale))
        if learn_temperature:
            self.log_temperature = nn.Parameter(t)
        else:
            self.register_buffer("log_temperature", t)

    def forward(self, features: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        f = F.normalize(features * self.scale + self.shift, dim=-1)
        return self.log_temperature.exp() * f @ weights.t().to(f.dtype)


class ToyModel(nn.Module):
    def __init__(self, clip: nn.Module, probe: Probe) -> None:
        super().__init__()
        self.clip, self.probe = clip, probe


@TRAINERS.register("ToyProbe", add_config=add_config, family="adapter",
                   test_overrides=dict(trainable_params=2 * 64 + 1),  # the tiny CLIP's E = 64: scale, shift, t
                   presets=dict(b2n=TINY_YAML, fewshot=TINY_YAML),
                   no_preset=dict(xd="ToyProbe is a test method; no cross-dataset experiment is defined for it"))
class ToyProbe(TrainerX):
    """Scale, shift and temperature over frozen zero-shot CLIP; the text weights are encoded once per run and
    once per evaluation."""

    config_node = "TOYPROBE"

    def build_model(self) -> None:
        clip = self.build_clip()
        probe = Probe(clip.embed_dim, float(clip.logit_scale), bool(self.cfg.TRAINER.TOYPROBE.LEARN_TEMPERATURE))
        self.model = ToyModel(clip, probe)
        self.register_model("probe", probe)
        self._weights: torch.Tensor | None = None

    def text_weights(self) -> torch.Tensor:
        if self._weights is None:
            with torch.no_grad():
                self._weights = self.model.clip.zero_shot_classifier(self.classnames, [self.template])
        return self._weights

    def before_evaluate(self) -> None:
        self._weights = None
        self.text_weights()

    def after_evaluate(self) -> None:
        self._weights = None

    def inference(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():  # the image encoder is frozen
            features = self.model.clip.encode_image(images)
        return self.model.probe(features, self.text_weights())

    def losses(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        logits = self.inference(batch["img"])
        self.log_metric("acc", (logits.argmax(dim=-1) == batch["label"]).float().mean().item() * 100)
        return {"ce": F.cross_entropy(logits, batch["label"])}
'''
YAML = """\
# ToyProbe on the offline tiny CLIP (vltune-tiny, 32 px): CPU-friendly, fp32, no workers.
DATALOADER:
  TRAIN_X:
    BATCH_SIZE: 8
  TEST:
    BATCH_SIZE: 100
  NUM_WORKERS: 0
INPUT:
  SIZE: (32, 32)
  INTERPOLATION: "bicubic"
  PIXEL_MEAN: [0.48145466, 0.4578275, 0.40821073]
  PIXEL_STD: [0.26862954, 0.26130258, 0.27577711]
  TRANSFORMS: ["normalize"]
OPTIM:
  NAME: "sgd"
  LR: 0.01
  MAX_EPOCH: 2
  LR_SCHEDULER: "cosine"
MODEL:
  BACKBONE:
    NAME: "vltune-tiny"
TRAINER:
  TOYPROBE:
    LEARN_TEMPERATURE: True
  PREC: "fp32"
"""
SUITE = """
base = dict(data=dict(root={root!r}), model=dict(backbone="vltune-tiny", weights={weights!r}),
            output=dict(root={out!r}))
toy = dict(trainer="ToyProbe", config={config!r}, protocol="b2n", datasets=["digits"], seeds=[1], shots=2,
           opts=["OPTIM.MAX_EPOCH", "1"])
pipeline = [dict(gpu_ids=[], tasks=["toy"])]
"""


def _package(tmp_path) -> str:
    """The lab's package: one import line, one method file, its yaml. Returns the yaml's path."""
    package = tmp_path / "plugins" / "toy_methods"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(INIT)
    (package / "toy.py").write_text(METHOD.lstrip())
    (package / "tiny.yaml").write_text(YAML)
    return str(package / "tiny.yaml")


def _env(tmp_path) -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(tmp_path / "plugins"), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "VLTUNE_PLUGINS": "toy_methods", "PYTHONPATH": path, "PYTHON": sys.executable,
            "VLTUNE_CACHE_DIR": str(tmp_path / "cache")}


def _run(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, env=env, cwd=str(REPO), timeout=600)


def _matrix_tests() -> int:
    """The tests of tests/test_trainers.py parametrised over every registered trainer name."""
    tree = ast.parse((REPO / "tests" / "test_trainers.py").read_text())
    return sum(1 for node in tree.body if isinstance(node, ast.FunctionDef) and any(
        isinstance(d, ast.Call) and d.args and isinstance(d.args[0], ast.Constant) and d.args[0].value == "name"
        for d in node.decorator_list))


def test_a_method_in_a_plugin_package_joins_the_matrix_the_presets_and_the_runner(tmp_path, coop_layout_root,
                                                                                   digits_root, random_clip_weights):
    yaml = _package(tmp_path)
    env = _env(tmp_path)

    # (a) the registry-driven matrix runs every invariant check on it
    run = _run([sys.executable, "-m", "pytest", "tests/test_trainers.py", "-k", TOY, "-q", "-p", "no:cacheprovider"],
               env)
    summary = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else ""
    passed = re.search(r"(\d+) passed", summary)
    assert run.returncode == 0 and passed and "failed" not in summary and "error" not in summary, \
        run.stdout[-3000:] + run.stderr[-3000:]
    assert int(passed.group(1)) >= _matrix_tests() >= 8, summary

    # (b) the paper presets: base-to-new lists its 66 jobs; cross-dataset leaves it out and says why
    common = ["--data", str(coop_layout_root), "--weights", random_clip_weights, "--backbone", "vltune-tiny",
              "--gpus", "cpu", "--dry-run"]
    run = _run(["bash", str(REPO / "scripts" / "base2new.sh"), "--methods", TOY, *common], env)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "66 jobs: 66 to run" in run.stdout and "toyprobe_b2n" in run.stdout, run.stdout[-2000:]
    run = _run(["bash", str(REPO / "scripts" / "cross_dataset.sh"), "--methods", f"{TOY} CoOp", *common], env)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "33 jobs: 33 to run" in run.stdout and "toyprobe" not in run.stdout, run.stdout[-2000:]
    assert "preset xd: ToyProbe left out: ToyProbe is a test method; no cross-dataset experiment" in run.stderr

    # (c) a two-job runner suite (train on the base classes, evaluate on the new ones) succeeds
    out = tmp_path / "suite"
    config = tmp_path / "configs.py"
    config.write_text(textwrap.dedent(SUITE.format(root=digits_root, weights=random_clip_weights, out=str(out),
                                                   config=yaml)))
    run = _run([sys.executable, "parallel_runner.py", "--config", str(config), "--plain", "--no-mail"], env)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    records = []
    for folder, _, files in os.walk(out):
        if "result.json" in files:
            with open(os.path.join(folder, "result.json")) as f:
                records.append(json.load(f))
    assert sorted((r["status"], r["job"]["trainer"], r["job"]["role"]) for r in records) == [
        ("success", TOY, "base"), ("success", TOY, "new")]
    assert all(r["config"]["TRAINER"]["TOYPROBE"]["LEARN_TEMPERATURE"] is True for r in records)
    assert next(r for r in records if r["job"]["role"] == "base")["cost"]["trainable_params"] == 2 * 64 + 1
