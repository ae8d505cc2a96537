"""CoPrompt specifics (the registry matrix in test_trainers.py covers the shared invariants): the disabled switch
equals zero-shot CLIP, deep prompts reach exactly the first J blocks, the description teacher and its fallback, and
scripts/build_descriptions.py."""

from __future__ import annotations

import importlib.util
import json
import logging
import os

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO, tiny_opts

import train
from trainers.coprompt import read_descriptions
from vltune.clip import BlockHooks
from vltune.config import get_cfg
from vltune.engine import build_trainer
from vltune.results.record import read_record

_spec = importlib.util.spec_from_file_location("build_descriptions", REPO / "scripts" / "build_descriptions.py")
build_descriptions = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build_descriptions)


def _trainer(root: str, weights: str, out: str, **opts):
    base = {"TRAINER.NAME": "CoPrompt", "OUTPUT_DIR": out, "DATASET.NUM_SHOTS": 2, "SEED": 1,
            "TRAINER.CoPrompt.DESCRIPTIONS_FALLBACK": "dataset", "TRAINER.CoPrompt.PROMPT_DEPTH": 2}
    return build_trainer(get_cfg(opts=tiny_opts(root, weights, **{**base, **opts})))


def _images(trainer, n: int = 6) -> torch.Tensor:
    return next(iter(trainer.test_loader))["img"][:n]


@torch.no_grad()
def test_disabled_prompts_and_adapters_equal_zero_shot_clip(digits_root, tiny_clip_weights, tmp_path):
    trainer = _trainer(digits_root, tiny_clip_weights, str(tmp_path), **{
        "TRAINER.CoPrompt.PROMPT_DEPTH": 0, "TRAINER.CoPrompt.IMAGE_ADAPTER_RATIO": 0.0,
        "TRAINER.CoPrompt.TEXT_ADAPTER_RATIO": 0.0, "TRAINER.CoPrompt.CTX_INIT": "a photo of a"})
    clip, images = trainer.model.clip, _images(trainer)
    weights = clip.zero_shot_classifier(trainer.classnames, ["a photo of a {}."])
    expected = clip.logit_scale * clip.encode_image(images, normalize=True) @ weights.t()
    trainer.before_evaluate()
    logits = trainer.inference(images)
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-5)
    trainer.model.text_ratio = 0.2  # the switch matters: with the text adapter on, the logits move
    trainer.before_evaluate()
    assert not torch.allclose(trainer.inference(images), expected, atol=1e-3)


class Spy(BlockHooks):
    """Records, per (tower, block), whether the wrapped hook changed the block input."""

    def __init__(self, inner: BlockHooks | None) -> None:
        self.inner, self.changed, self.inputs = inner, {}, {}

    def before_block(self, tower: str, i: int, x: torch.Tensor) -> torch.Tensor:
        y = x if self.inner is None else self.inner.before_block(tower, i, x)
        self.changed[(tower, i)] = y.shape != x.shape or not torch.equal(y, x)
        self.inputs[(tower, i)] = y
        return y


@pytest.mark.parametrize("depth", [0, 1, 2])
@torch.no_grad()
def test_depth_d_prompts_exactly_the_first_d_blocks(depth, digits_root, random_clip_weights, tmp_path):
    trainer = _trainer(digits_root, random_clip_weights, str(tmp_path), **{"TRAINER.CoPrompt.PROMPT_DEPTH": depth})
    model, n = trainer.model, trainer.cfg.TRAINER.CoPrompt.N_CTX
    learner, clip = model.prompt_learner, model.clip
    spy = Spy(learner.hooks())
    prompts, eot = learner()
    torch.testing.assert_close(prompts[:, 1:1 + n], learner.ctx.expand(len(trainer.classnames), -1, -1))
    clip.encode_text_from_embeddings(prompts, eot, hooks=spy)
    images = _images(trainer, 2)
    clip.encode_image(images, hooks=spy)
    n_patches = clip.embed_image(images).shape[1]
    # text block 0 gets P_0 through the embeddings; the hook replaces tokens 1..M before blocks 1..J-1
    assert [i for i in range(2) if spy.changed[("text", i)]] == list(range(1, depth))
    assert [i for i in range(2) if spy.changed[("image", i)]] == list(range(depth))
    for i in range(1, depth):
        torch.testing.assert_close(spy.inputs[("text", i)][0, 1:1 + n], learner.compound_prompts_text[i - 1])
        coupled = learner.compound_prompt_projections[i - 1](learner.compound_prompts_text[i - 1])
        torch.testing.assert_close(spy.inputs[("image", i)][0, -n:], coupled)
    expected_len = n_patches + (n if depth else 0)
    assert all(spy.inputs[("image", i)].shape[1] == expected_len for i in range(2))
    if depth:
        torch.testing.assert_close(spy.inputs[("image", 0)][0, -n:], learner.proj(learner.ctx))


def _digits_descriptions(classnames: list[str]) -> dict[str, list[str]]:
    # a different number of sentences per class: the teacher is a mean, not a stacked tensor as upstream
    return {c: [f"a handwritten digit {c}.", f"the number {c} drawn in ink.", f"digit {c}"][:1 + i % 3]
            for i, c in enumerate(classnames)}


@torch.no_grad()
def test_description_file_mean_is_the_text_teacher(digits_root, random_clip_weights, tmp_path):
    probe = _trainer(digits_root, random_clip_weights, str(tmp_path / "probe"))
    descriptions = _digits_descriptions(probe.classnames)
    path = tmp_path / "desc.json"
    path.write_text(json.dumps(descriptions))
    trainer = _trainer(digits_root, random_clip_weights, str(tmp_path / "run"),
                       **{"TRAINER.CoPrompt.DESCRIPTIONS_FILE": str(path)})
    clip = trainer.model.clip
    rows = [F.normalize(clip.encode_text(clip.tokenize(descriptions[c]), normalize=True).mean(0), dim=-1)
            for c in trainer.classnames]
    torch.testing.assert_close(trainer.model.teacher_text, torch.stack(rows), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(trainer.model.teacher_text, probe.model.teacher_text, atol=1e-3)
    assert trainer.method_record() == {"descriptions": f"file: {path}"}


def test_missing_class_fails_naming_file_and_class(digits_root, random_clip_weights, tmp_path):
    probe = _trainer(digits_root, random_clip_weights, str(tmp_path / "probe"))
    descriptions = _digits_descriptions(probe.classnames)
    gone = probe.classnames[-1]
    del descriptions[gone]
    path = tmp_path / "desc.json"
    path.write_text(json.dumps(descriptions))
    with pytest.raises(ValueError, match=rf"{path}.*'{gone}'.*build_descriptions"):
        _trainer(digits_root, random_clip_weights, str(tmp_path / "run"),
                 **{"TRAINER.CoPrompt.DESCRIPTIONS_FILE": str(path)})


def test_no_file_falls_back_to_templates_recorded_and_logged_once(digits_root, random_clip_weights, tmp_path,
                                                                   caplog):
    out = str(tmp_path / "run")
    argv = ["--root", digits_root, "--seed", "1", "--trainer", "CoPrompt",
            "--dataset-config-file", str(REPO / "configs" / "datasets" / "digits.yaml"),
            "--config-file", str(REPO / "configs" / "trainers" / "CoPrompt" / "tiny_ep10.yaml"), "--output-dir", out,
            "MODEL.BACKBONE.WEIGHTS", random_clip_weights, "OPTIM.MAX_EPOCH", "1", "DATASET.NUM_SHOTS", "2"]
    with caplog.at_level(logging.INFO, logger="trainers.coprompt"):
        assert train.main(argv, console=False) == 0
    record = read_record(os.path.join(out, "result.json"))
    assert record["method"]["descriptions"] == "templates"
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("CoPrompt descriptions:")]
    assert len(lines) == 1 and "template" in lines[0], lines


def test_build_descriptions_round_trip(digits_root, random_clip_weights, tmp_path, capsys):
    probe = _trainer(digits_root, random_clip_weights, str(tmp_path / "probe"))
    expected = _digits_descriptions(probe.classnames)
    lines = ["# digits, one sentence a line", ""] + [f"{c}: {s}" for c, ss in expected.items() for s in ss]
    lines.append(f"{probe.classnames[0]}: {expected[probe.classnames[0]][0]}")  # a duplicate is dropped
    (tmp_path / "desc.txt").write_text("\n".join(lines) + "\n")
    out = tmp_path / "desc.json"
    assert build_descriptions.main([str(tmp_path / "desc.txt"), "-o", str(out), "--classes", *probe.classnames]) == 0
    assert json.loads(out.read_text()) == expected
    assert read_descriptions(str(out), probe.classnames) == [expected[c] for c in probe.classnames]
    trainer = _trainer(digits_root, random_clip_weights, str(tmp_path / "run"),
                       **{"TRAINER.CoPrompt.DESCRIPTIONS_FILE": str(out)})
    assert trainer.method_record()["descriptions"] == f"file: {out}"


def test_build_descriptions_malformed_line_names_its_number(tmp_path, capsys):
    (tmp_path / "bad.txt").write_text("zero: a round digit.\n\nthis line has no colon\n")
    with pytest.raises(ValueError, match=r"bad\.txt:3: expected 'classname: sentence'"):
        build_descriptions.parse_descriptions((tmp_path / "bad.txt").read_text(), str(tmp_path / "bad.txt"))
    with pytest.raises(SystemExit) as exit_info:
        build_descriptions.main([str(tmp_path / "bad.txt"), "-o", str(tmp_path / "out.json")])
    assert exit_info.value.code == 2 and "bad.txt:3" in capsys.readouterr().err
    assert not (tmp_path / "out.json").exists()


def test_second_view_is_the_loaders_second_transform_else_a_flip(digits_root, random_clip_weights, tmp_path):
    trainer = _trainer(digits_root, random_clip_weights, str(tmp_path))
    a, b = torch.randn(3, 3, 32, 32), torch.randn(3, 3, 32, 32)
    x1, x2 = trainer.views({"img": [a, b]})
    assert x1 is a and x2 is b
    torch.manual_seed(0)
    x1, x2 = trainer.views({"img": a})
    assert x1 is a
    flipped = [torch.equal(x2[i], a[i].flip(-1)) for i in range(3)]
    assert all(f or torch.equal(x2[i], a[i]) for i, f in enumerate(flipped)) and any(flipped)
