"""Res-Tuning's ``identity`` recurrence is exactly frozen CLIP at step 0 for every lateral/vertical pair it accepts,
and refuses by name, at config validation, the pairs that cannot be: through the module-regex API
(``ResTuningConfig``/``prepare_model``) and through ``TRAINER.RESTUNING`` (``trainers/restuning.py``), on the image
tower and on both towers.

The pairs are enumerated from the code's own lists (``TUNERS``, ``TUNER_OPTIONS``' option values, and swift's
"missing key" form), so a newly added tuner is covered without editing this file. The refusals are stated here
independently of the code: an identity or missing lateral tuner (it adds a block's own feature to the correction)
and the ungated Res-Prompt (non-zero at init). Every other pair must give bitwise the frozen model's features.
"""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F
from clip_fixtures import make_deep_backbone
from conftest import eval_logits

from vltune.engine import build_trainer
from vltune.tuners.res_tuners import ADAPTER_WEIGHTS, TUNERS
from vltune.tuners.restuning import ResTuningConfig, prepare_model

MISSING = "<missing>"  # a block dict without the key: swift's Identity
DEPTH = 4  # blocks per tower: the root's leak through identity vertical tuners is (1 − λ)^DEPTH


def _option_variants() -> list[dict]:
    """One spec per non-default option value a tuner takes (swift's adapter weights, the ungated prompt)."""
    weights = [w.replace("<float>", "0.5") for w in ADAPTER_WEIGHTS if w is not None]
    return [{"res_adapter": {"adapter_weight": w}} for w in weights] + [{"res_prompt": {"gate": False}}]


def _name(spec) -> str:
    return spec if isinstance(spec, str) else "-".join(f"{k}:{v}" for k, v in spec.items())


def _refused(lateral, vertical) -> str | None:
    """The key the identity recurrence must refuse, by this test's own rule (None: must be exactly frozen)."""
    if lateral in ("identity", MISSING):
        return "lateral_cfg"
    for key, spec in (("lateral_cfg", lateral), ("vertical_cfg", vertical)):
        if isinstance(spec, dict) and spec.get("res_prompt", {}).get("gate") is False:
            return key
    return None


SPECS = [*TUNERS, MISSING]
API_PAIRS = list(itertools.product(SPECS, SPECS)) + [
    pair for variant in _option_variants() for pair in ((variant, "res_adapter"), ("res_adapter", variant))]


def _block(lateral, vertical) -> dict:
    """A swift block dict; with both keys missing it holds only ``aux_cfg`` (an empty dict is not a block)."""
    block = {key: spec for key, spec in (("lateral_cfg", lateral), ("vertical_cfg", vertical)) if spec != MISSING}
    return block or {"aux_cfg": "identity"}


def _config(prefix: str, target: str, tuner_cfg: dict) -> ResTuningConfig:
    return ResTuningConfig(dims=64, root_modules=rf"{prefix}resblocks\.0", stem_modules=rf"{prefix}resblocks\.\d+",
                           target_modules=target, target_modules_hook="output", tuner_cfg=tuner_cfg)


def _randomise(modules) -> bool:
    """Give every parameter of ``modules`` random values; False if they have none (e.g. zero + identity)."""
    params = [p for m in modules for p in m.parameters()]
    generator = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=generator) * 0.5)
    return bool(params)


@pytest.fixture(scope="module")
def deep_clip():
    """(open_clip CLIP with DEPTH blocks per tower, images, token ids, frozen image and text features). Frozen
    before the reference runs: torch's attention rounds differently (~1e-7) when its weights require grad."""
    backbone = make_deep_backbone(DEPTH, DEPTH, seed=3)
    backbone.model.requires_grad_(False)
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    ids = backbone.tokenize(["a photo of a cat.", "a sea lion", "x"])
    with torch.no_grad():
        return backbone.model, images, ids, backbone.model.encode_image(images), backbone.model.encode_text(ids)


@pytest.mark.parametrize("towers", ["image", "image+text"])
@pytest.mark.parametrize(("lateral", "vertical"), API_PAIRS,
                         ids=[f"{_name(a)}|{_name(b)}" for a, b in API_PAIRS])
def test_api_identity_recurrence_is_frozen_clip_or_refused(lateral, vertical, towers, deep_clip):
    frozen_model, images, ids, frozen_image, frozen_text = deep_clip
    tuner_cfg = _block(lateral, vertical)
    refused = _refused(lateral, vertical)
    if refused:
        with pytest.raises(ValueError, match=rf"tuner_cfg {refused}.* refused with recurrence='identity': .*init"):
            _config(r"transformer\.", r"transformer", tuner_cfg)
        return
    clip = copy.deepcopy(frozen_model)
    if towers == "image+text":  # the text chain is clip.restuning, the image chain clip.visual.restuning
        prepare_model(clip, _config(r"transformer\.", r"transformer", tuner_cfg))
    prepare_model(clip.visual, _config(r"transformer\.", r"transformer", tuner_cfg))
    assert len(clip.visual.restuning.lateral) == DEPTH
    with torch.no_grad():
        torch.testing.assert_close(clip.encode_image(images), frozen_image, rtol=0, atol=0)
        torch.testing.assert_close(clip.encode_text(ids), frozen_text, rtol=0, atol=0)
        chains = [clip.visual.restuning] + ([clip.restuning] if towers == "image+text" else [])
        if _randomise(chains):  # the chains are live: tuners away from their init move the features
            assert not torch.allclose(clip.encode_image(images), frozen_image, atol=1e-5)
            if towers == "image+text":
                assert not torch.allclose(clip.encode_text(ids), frozen_text, atol=1e-5)


# ---- TRAINER.RESTUNING ------------------------------------------------------------------------------------------
TRAINER_PAIRS = [(lat, vert, gate) for lat, vert in itertools.product(TUNERS, TUNERS)
                 for gate in ([True, False] if "res_prompt" in (lat, vert) else [True])]


def _trainer_refused(lateral: str, vertical: str, gate: bool) -> str | None:
    """The ``TRAINER.RESTUNING`` key that must be refused (None: must be exactly frozen CLIP)."""
    def as_spec(name: str):
        return {"res_prompt": {"gate": gate}} if name == "res_prompt" else name

    refused = _refused(as_spec(lateral), as_spec(vertical))
    return None if refused is None else refused.removesuffix("_cfg").upper()


@pytest.fixture(scope="module")
def frozen_logits(make_trainer):
    """The images and frozen CLIP's logits for them with the dataset template: the reference of every pair."""
    trainer = make_trainer("ResTuningBypass", **{"DATASET.NUM_SHOTS": 2, "SEED": 1})
    images = next(iter(trainer.test_loader))["img"][:6]
    clip = trainer.backbone  # frozen by the engine; only its own forward is used here
    with torch.no_grad():
        text = clip.zero_shot_classifier(trainer.classnames, [trainer.template])
        return images, clip.logit_scale * F.normalize(clip.encode_image(images), dim=-1) @ text.t()


@pytest.mark.parametrize("towers", ["('image',)", "('image', 'text')"])
@pytest.mark.parametrize(("lateral", "vertical", "gate"), TRAINER_PAIRS,
                         ids=[f"{a}|{b}|gate={g}" for a, b, g in TRAINER_PAIRS])
def test_trainer_identity_recurrence_is_frozen_clip_or_refused(lateral, vertical, gate, towers, frozen_logits,
                                                               make_cfg):
    cfg = make_cfg("ResTuningBypass", **{"DATASET.NUM_SHOTS": 2, "SEED": 1, "TRAINER.RESTUNING.TOWERS": towers,
                                         "TRAINER.RESTUNING.LATERAL": lateral, "TRAINER.RESTUNING.VERTICAL": vertical,
                                         "TRAINER.RESTUNING.PROMPT_GATE": gate})
    assert cfg.TRAINER.RESTUNING.RECURRENCE == "identity"  # the default
    refused = _trainer_refused(lateral, vertical, gate)
    if refused:
        with pytest.raises(ValueError, match=rf"TRAINER\.RESTUNING\.{refused} .* refused with RECURRENCE identity"):
            build_trainer(cfg)
        return
    trainer = build_trainer(cfg)
    images, frozen = frozen_logits
    torch.testing.assert_close(eval_logits(trainer, images), frozen, rtol=0, atol=0)
    if _randomise([trainer.model["tuners"]]):  # the bypass is live
        assert not torch.allclose(eval_logits(trainer, images), frozen, atol=1e-4)
