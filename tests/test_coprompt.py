"""CoPrompt specifics (the registry matrix in test_trainers.py covers the shared invariants): the disabled switch
equals zero-shot CLIP, deep prompts reach exactly the first J blocks (the block-0 vision prompt through ln_pre), the
description teacher (one description drawn per step, reproducible from the seed and across a resume; or the mean) and
its fallback, and scripts/build_descriptions.py."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import random

import pytest
import torch
import torch.nn.functional as F
from clip_fixtures import make_deep_backbone
from conftest import REPO

import train
from trainers.coprompt import read_descriptions
from vltune.clip import BlockHooks
from vltune.results.record import read_record
from vltune.tuners.deep_prompts import CoupledPrompts

_spec = importlib.util.spec_from_file_location("build_descriptions", REPO / "scripts" / "build_descriptions.py")
build_descriptions = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(build_descriptions)


COPROMPT = {"DATASET.NUM_SHOTS": 2, "SEED": 1, "TRAINER.CoPrompt.DESCRIPTIONS_FALLBACK": "dataset",
            "TRAINER.CoPrompt.PROMPT_DEPTH": 2}


def _images(trainer, n: int = 6) -> torch.Tensor:
    return next(iter(trainer.test_loader))["img"][:n]


@torch.no_grad()
def test_disabled_prompts_and_adapters_equal_zero_shot_clip(make_trainer):
    trainer = make_trainer("CoPrompt", weights="pretrained", opts=COPROMPT, **{
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
    """Records, per (tower, block), whether the wrapped hooks (one per tower) changed the block input."""

    def __init__(self, text: BlockHooks | None, image: BlockHooks | None) -> None:
        self.inner, self.changed, self.inputs = {"text": text, "image": image}, {}, {}

    def before_block(self, tower: str, i: int, x: torch.Tensor) -> torch.Tensor:
        inner = self.inner[tower]
        y = x if inner is None else inner.before_block(tower, i, x)
        self.changed[(tower, i)] = y.shape != x.shape or not torch.equal(y, x)
        self.inputs[(tower, i)] = y
        return y


@pytest.mark.parametrize("depth", [0, 1, 2])
@torch.no_grad()
def test_depth_d_prompts_exactly_the_first_d_blocks(depth, make_trainer):
    trainer = make_trainer("CoPrompt", opts=COPROMPT, **{"TRAINER.CoPrompt.PROMPT_DEPTH": depth})
    model, n = trainer.model, trainer.cfg.TRAINER.CoPrompt.N_CTX
    learner, clip = model.prompt_learner, model.clip
    spy = Spy(model.text_hooks(), model.image_hooks())
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
    if depth:  # upstream appends F_0(P_0) before ln_pre: the block-0 vision prompt is layer-normalised
        ln_pre = clip.model.visual.ln_pre
        torch.testing.assert_close(spy.inputs[("image", 0)][0, -n:], ln_pre(learner.proj(learner.ctx)))
        assert not torch.allclose(ln_pre(learner.proj(learner.ctx)), learner.proj(learner.ctx), atol=1e-3)


def test_deeper_projections_start_as_copies_of_one_linear_of_their_own():
    """Upstream (MaPLe's learner): F_1..F_{J−1} are clones of one Linear drawn apart from F_0 (equal to each other at
    init, separate tensors, not equal to F_0)."""
    learner = CoupledPrompts(make_deep_backbone(3, 3), ["cat", "dog"], 2, "a photo of a", 3, shallow=True)
    deep = list(learner.compound_prompt_projections)
    assert len(deep) == 2 and deep[0].weight is not deep[1].weight
    assert torch.equal(deep[0].weight, deep[1].weight) and torch.equal(deep[0].bias, deep[1].bias)
    assert not torch.allclose(deep[0].weight, learner.proj.weight)


def _digits_descriptions(classnames: list[str]) -> dict[str, list[str]]:
    # a different number of sentences per class (1, 2, 3, 1, ...): upstream stacks them and needs equal counts
    return {c: [f"a handwritten digit {c}.", f"the number {c} drawn in ink.", f"digit {c}"][:1 + i % 3]
            for i, c in enumerate(classnames)}


def _with_descriptions(make_trainer, tmp_path, **opts):
    """(trainer on a descriptions file, its descriptions per class in class order)."""
    probe = make_trainer("CoPrompt", tmp_path / "probe", opts=COPROMPT)
    descriptions = _digits_descriptions(probe.classnames)
    path = tmp_path / "desc.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(descriptions))
    trainer = make_trainer("CoPrompt", tmp_path / "run", opts=COPROMPT,
                           **{"TRAINER.CoPrompt.DESCRIPTIONS_FILE": str(path), **opts})
    return trainer, [descriptions[c] for c in trainer.classnames]


@torch.no_grad()
def test_the_teacher_is_one_drawn_description_per_class_and_step(tmp_path, make_trainer):
    trainer, descriptions = _with_descriptions(make_trainer, tmp_path)
    assert trainer.cfg.TRAINER.CoPrompt.TEACHER == "draw"  # upstream's teacher is the default
    clip, counts = trainer.model.clip, [len(s) for s in descriptions]
    # with the draw fixed, g_c is the frozen feature of class c's drawn sentence
    fixed = torch.tensor([(3 * c + 1) % n for c, n in enumerate(counts)])
    trainer.description_indices = lambda: fixed
    want = torch.stack([clip.encode_text(clip.tokenize([s[k]]), normalize=True)[0]
                        for s, k in zip(descriptions, fixed.tolist())])
    torch.testing.assert_close(trainer.step_text_teacher(), want, atol=1e-5, rtol=1e-5)
    del trainer.description_indices
    # the draws: each index within its class's count, one shared index where counts are equal, and several steps
    # draw several descriptions (every sentence of a 3-sentence class within 60 steps)
    draws = torch.stack([trainer.description_indices() for _ in range(60)])
    assert ((draws >= 0) & (draws < torch.tensor(counts))).all()
    for n in set(counts):
        same = [c for c, m in enumerate(counts) if m == n]
        assert (draws[:, same] == draws[:, same[:1]]).all()
    three = counts.index(3)
    assert set(draws[:, three].tolist()) == {0, 1, 2}
    # the training loss uses the drawn teacher: its text term changes with the draw
    batch = next(iter(trainer.train_loader_x))
    parts = trainer.forward_parts(trainer.views(batch)[0])
    losses = set()
    for k in range(3):
        trainer.description_indices = lambda k=k: torch.tensor([min(k, n - 1) for n in counts])
        losses.add(round(float(trainer.regularizers(batch, parts)["text_consistency"]), 6))
    assert len(losses) == 3


def test_draws_depend_only_on_the_seed_and_epoch(tmp_path, make_trainer):
    a, _ = _with_descriptions(make_trainer, tmp_path / "a")
    b, _ = _with_descriptions(make_trainer, tmp_path / "b")
    c, _ = _with_descriptions(make_trainer, tmp_path / "c", SEED=2)

    def epoch_draws(trainer, epoch: int) -> list[list[int]]:
        trainer.epoch = epoch
        trainer.before_epoch()
        return [trainer.description_indices().tolist() for _ in range(8)]

    first = epoch_draws(a, 1)
    for epoch in (0, 2):  # other epochs in between, as an uninterrupted run
        epoch_draws(b, epoch)
    assert epoch_draws(b, 1) == first
    assert epoch_draws(a, 2) != first  # another epoch, other draws
    assert epoch_draws(c, 1) != first  # another seed, other draws
    random.seed(0)  # the global RNG plays no part
    assert epoch_draws(a, 1) == first


RESUME = {"OPTIM.MAX_EPOCH": 3, "TEST.NO_TEST": True, "DATALOADER.TRAIN_X.BATCH_SIZE": 4}


def _train_recording_draws(trainer, stop_after: int | None = None) -> dict[int, list[list[int]]]:
    """Train; the description indices drawn in each epoch (by the training loss), and the run killed at the start of
    epoch ``stop_after`` (0-based) if given."""
    draws: dict[int, list[list[int]]] = {}
    draw, run_epoch = trainer.description_indices, trainer.run_epoch

    def recorded() -> torch.Tensor:
        indices = draw()
        draws.setdefault(trainer.epoch, []).append(indices.tolist())
        return indices

    def epoch() -> None:
        if stop_after is not None and trainer.epoch == stop_after:
            raise KeyboardInterrupt  # a killed run
        run_epoch()

    trainer.description_indices, trainer.run_epoch = recorded, epoch
    try:
        trainer.train()
    except KeyboardInterrupt:
        pass
    return draws


def test_a_resumed_run_draws_what_an_uninterrupted_one_did(tmp_path, make_trainer):
    full, _ = _with_descriptions(make_trainer, tmp_path / "full", **RESUME)
    want = _train_recording_draws(full)
    assert sorted(want) == [0, 1, 2] and len({str(d) for d in want.values()}) == 3
    killed, _ = _with_descriptions(make_trainer, tmp_path / "cut", **RESUME)
    assert _train_recording_draws(killed, stop_after=2) == {e: want[e] for e in (0, 1)}
    resumed, _ = _with_descriptions(make_trainer, tmp_path / "cut", **RESUME)
    got = _train_recording_draws(resumed)
    assert resumed.resumed_from == 2 and got == {2: want[2]}


@torch.no_grad()
def test_the_mean_option_averages_the_descriptions(tmp_path, make_trainer):
    trainer, descriptions = _with_descriptions(make_trainer, tmp_path, **{"TRAINER.CoPrompt.TEACHER": "mean"})
    clip = trainer.model.clip
    rows = [F.normalize(clip.encode_text(clip.tokenize(s), normalize=True).mean(0), dim=-1) for s in descriptions]
    torch.testing.assert_close(trainer.step_text_teacher(), torch.stack(rows), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(trainer.step_text_teacher(), torch.stack(rows), atol=1e-5, rtol=1e-5)  # fixed
    probe = make_trainer("CoPrompt", tmp_path / "templates", opts=COPROMPT)
    assert not torch.allclose(trainer.step_text_teacher(), probe.step_text_teacher(), atol=1e-3)
    assert trainer.method_record() == {"descriptions": f"file: {tmp_path / 'desc.json'}"}


def test_missing_class_fails_naming_file_and_class(tmp_path, make_trainer):
    probe = make_trainer("CoPrompt", tmp_path / "probe", opts=COPROMPT)
    descriptions = _digits_descriptions(probe.classnames)
    gone = probe.classnames[-1]
    del descriptions[gone]
    path = tmp_path / "desc.json"
    path.write_text(json.dumps(descriptions))
    with pytest.raises(ValueError, match=rf"{path}.*'{gone}'.*build_descriptions"):
        make_trainer("CoPrompt", tmp_path / "run", opts=COPROMPT,
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


def test_build_descriptions_round_trip(tmp_path, capsys, make_trainer):
    probe = make_trainer("CoPrompt", tmp_path / "probe", opts=COPROMPT)
    expected = _digits_descriptions(probe.classnames)
    lines = ["# digits, one sentence a line", ""] + [f"{c}: {s}" for c, ss in expected.items() for s in ss]
    lines.append(f"{probe.classnames[0]}: {expected[probe.classnames[0]][0]}")  # a duplicate is dropped
    (tmp_path / "desc.txt").write_text("\n".join(lines) + "\n")
    out = tmp_path / "desc.json"
    assert build_descriptions.main([str(tmp_path / "desc.txt"), "-o", str(out), "--classes", *probe.classnames]) == 0
    assert json.loads(out.read_text()) == expected
    assert read_descriptions(str(out), probe.classnames) == [expected[c] for c in probe.classnames]
    trainer = make_trainer("CoPrompt", tmp_path / "run", opts=COPROMPT,
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


def test_second_view_is_the_loaders_second_transform_else_a_flip(make_trainer):
    trainer = make_trainer("CoPrompt", opts=COPROMPT)
    a, b = torch.randn(3, 3, 32, 32), torch.randn(3, 3, 32, 32)
    x1, x2 = trainer.views({"img": [a, b]})
    assert x1 is a and x2 is b
    torch.manual_seed(0)
    x1, x2 = trainer.views({"img": a})
    assert x1 is a
    flipped = [torch.equal(x2[i], a[i].flip(-1)) for i in range(3)]
    assert all(f or torch.equal(x2[i], a[i]) for i, f in enumerate(flipped)) and any(flipped)
