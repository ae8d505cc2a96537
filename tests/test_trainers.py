"""The same invariant checks for every registered trainer (the registry is enumerated, so new methods join for free).

Per-trainer differences live in one table: the ``test_overrides`` given at registration
(``TRAINERS.register(..., test_overrides=dict(trainable_params=N, opts={...}, trainable=False))``), never in ``if``
chains here. ``trainable_params`` is required: the recorded trainable-parameter count on the tiny CLIP (width 64).
The checks run on a randomly initialised tiny CLIP and the generated digits dataset:
finite (B, C) logits; training on the base classes then evaluating the saved model on the new ones; after 3
steps every trainable tensor changed and got a gradient while every other tensor is
bitwise equal and gradient-free; the optimizers hold exactly the trainable set; save → load in a fresh trainer
gives equal logits; batched inference equals per-sample inference; full-length text gives the truncated-text logits;
class text is encoded before an evaluation's first batch, never inside one (``text_per_image=True``: CoCoOp's
instance-conditioned prompts, which must run per batch).
"""

from __future__ import annotations

import pytest
import torch
from conftest import eval_logits, tiny_opts

from vltune.clip.backbone import CLIPBackbone
from vltune.config import get_cfg
from vltune.engine import build_trainer
from vltune.registry import TRAINERS

NAMES = TRAINERS.registered_names()  # conftest loaded the plugin packages (and VLTUNE_PLUGINS's) at import


def _overrides(name: str) -> dict:
    return dict(TRAINERS.meta(name).get("test_overrides") or {})


def _cfg(name: str, root: str, weights: str, out: str, subsample: str = "all"):
    opts = {"TRAINER.NAME": name, "OUTPUT_DIR": out, "DATASET.NUM_SHOTS": 2, "DATALOADER.TRAIN_X.BATCH_SIZE": 4,
            "DATALOADER.TEST.BATCH_SIZE": 8, "OPTIM.NAME": "sgd", "OPTIM.LR": 0.05, "OPTIM.MAX_EPOCH": 1,
            "OPTIM.LR_SCHEDULER": "cosine", "DATASET.SUBSAMPLE_CLASSES": subsample,
            "SEED": 1}
    opts.update(_overrides(name).get("opts", {}))
    return get_cfg(opts=tiny_opts(root, weights, **opts))


def _train_steps(trainer, n: int = 3) -> None:
    trainer.set_model_mode("train")
    batches = iter(trainer.train_loader_x)
    for _ in range(n):
        trainer.forward_backward(trainer.to_device(next(batches)))


def _test_images(trainer, n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    batch = next(iter(trainer.test_loader))
    return batch["img"][:n], batch["label"][:n]




@pytest.fixture(scope="module")
def built(tmp_path_factory, digits_root, random_clip_weights):
    """name → a trainer after 3 training steps, plus the parameters it started from."""
    cache = {}

    def get(name: str):
        if name not in cache:
            out = str(tmp_path_factory.mktemp(name))
            trainer = build_trainer(_cfg(name, digits_root, random_clip_weights, out))
            before = {k: v.detach().clone() for k, v in trainer.model.named_parameters()}
            _train_steps(trainer)
            cache[name] = (trainer, before, out)
        return cache[name]

    return get


@pytest.mark.parametrize("name", NAMES)
def test_logits_are_finite_with_one_column_per_class(name, built):
    trainer, _, _ = built(name)
    images, _ = _test_images(trainer)
    logits = eval_logits(trainer, images)
    assert logits.shape == (len(images), trainer.num_classes)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("name", NAMES)
def test_only_declared_trainable_parameters_change(name, built):
    trainer, before, _ = built(name)
    trainable = {id(p) for p in trainer.trainable_parameters()}
    params = dict(trainer.model.named_parameters())
    changed = {k for k, p in params.items() if not torch.equal(p.detach(), before[k])}
    declared = {k for k, p in params.items() if id(p) in trainable}
    if _overrides(name).get("trainable", True):
        assert declared, f"{name} declares no trainable parameters"
        assert changed == declared, f"changed but frozen: {changed - declared}; declared but unchanged: " \
                                    f"{declared - changed}"
        assert all(params[k].grad is not None for k in declared)
    else:
        assert not declared and not changed and trainer.n_trainable == 0
    assert all(p.grad is None for k, p in params.items() if k not in declared), "a frozen parameter got a gradient"
    assert all(not p.requires_grad for k, p in params.items() if k not in declared)
    held = {id(p) for o in trainer._optims.values() if o for g in o.param_groups for p in g["params"]}
    assert held == trainable


@pytest.mark.parametrize("name", NAMES)
def test_trainable_parameter_count_equals_the_recorded_value(name, built):
    trainer, _, _ = built(name)
    recorded = _overrides(name).get("trainable_params")
    assert recorded is not None, f"record {name}'s count in TRAINERS.register(test_overrides=dict(trainable_params=N))"
    assert trainer.n_trainable == sum(p.numel() for p in trainer.trainable_parameters()) == recorded


@pytest.mark.parametrize("name", NAMES)
def test_save_then_load_gives_equal_logits(name, built, digits_root, random_clip_weights, tmp_path):
    trainer, _, out = built(name)
    images, _ = _test_images(trainer)
    expected = eval_logits(trainer, images)
    trainer.save_model(0, str(tmp_path))
    fresh = build_trainer(_cfg(name, digits_root, random_clip_weights, str(tmp_path / "fresh")), eval_only=True)
    if _overrides(name).get("trainable", True):
        assert not torch.allclose(eval_logits(fresh, images), expected), "training changed nothing"
    fresh.load_model(str(tmp_path), epoch=1)
    torch.testing.assert_close(eval_logits(fresh, images), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_batched_inference_equals_per_sample(name, built):
    trainer, _, _ = built(name)
    images, _ = _test_images(trainer)
    batched = eval_logits(trainer, images)
    single = torch.cat([eval_logits(trainer, images[i:i + 1]) for i in range(len(images))])
    torch.testing.assert_close(batched, single, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_train_on_base_classes_then_evaluate_on_new_ones(name, digits_root, random_clip_weights, tmp_path):
    trainer = build_trainer(_cfg(name, digits_root, random_clip_weights, str(tmp_path / "base"), "base"))
    _train_steps(trainer, 1)
    trainer.save_model(0, str(tmp_path / "base"))
    new = build_trainer(_cfg(name, digits_root, random_clip_weights, str(tmp_path / "new"), "new"), eval_only=True)
    new.load_model(str(tmp_path / "base"), epoch=1)
    assert set(new.classnames).isdisjoint(trainer.classnames) and new.num_classes == 10 - trainer.num_classes
    images, labels = _test_images(new)
    logits = eval_logits(new, images)
    assert logits.shape == (len(images), new.num_classes) and torch.isfinite(logits).all()
    assert int(labels.max()) < new.num_classes  # labels relabelled from 0 within the new classes


@pytest.mark.parametrize("name", NAMES)
def test_full_length_text_gives_the_same_logits_as_truncated_text(name, built, digits_root, random_clip_weights,
                                                                  tmp_path):
    """MODEL.BACKBONE.TRUNCATE_TEXT (on by default) only saves compute: every position after the last EOT is masked."""
    trainer, _, _ = built(name)
    images, _ = _test_images(trainer)
    trainer.save_model(0, str(tmp_path))
    cfg = _cfg(name, digits_root, random_clip_weights, str(tmp_path / "full"))
    cfg.defrost()
    cfg.MODEL.BACKBONE.TRUNCATE_TEXT = False
    full = build_trainer(cfg, eval_only=True)
    full.load_model(str(tmp_path), epoch=1)
    backbones = [m for m in full.model.modules() if isinstance(m, CLIPBackbone)]
    assert backbones and not any(b.truncate_text for b in backbones)
    torch.testing.assert_close(eval_logits(full, images), eval_logits(trainer, images), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", NAMES)
def test_class_text_is_encoded_once_per_evaluation_not_per_batch(name, built, monkeypatch):
    """Text features depend on the class set, not the image, except for instance-conditioned prompts (CoCoOp):
    an evaluation encodes them before its first batch. ``test_overrides=dict(text_per_image=True)`` flips the check."""
    trainer, _, _ = built(name)
    assert len(trainer.test_loader) >= 2
    in_batch, calls = [False], []
    text_blocks, inference = CLIPBackbone.text_blocks, trainer.model_inference

    def counting_text_blocks(self, *args, **kwargs):
        calls.append(in_batch[0])
        return text_blocks(self, *args, **kwargs)

    def flagged_inference(images):
        in_batch[0] = True
        try:
            return inference(images)
        finally:
            in_batch[0] = False

    monkeypatch.setattr(CLIPBackbone, "text_blocks", counting_text_blocks)
    monkeypatch.setattr(trainer, "model_inference", flagged_inference)
    trainer.test()
    per_batch = sum(calls)
    if _overrides(name).get("text_per_image"):
        assert per_batch >= len(trainer.test_loader), "instance-conditioned text should run for every batch"
    else:
        assert per_batch == 0, f"{per_batch} text encoder runs inside evaluation batches; cache them before the loop"
        assert len(calls) <= 1, f"{len(calls)} text encoder runs before the loop: encode the classes once"


@pytest.mark.parametrize("name", [n for n in NAMES if _overrides(n).get("trainable", True)])
def test_amp_trains_float_master_weights_under_bf16_autocast(name, digits_root, random_clip_weights, tmp_path):
    """``amp`` on CPU: bf16 autocast, no scaler, and the trainable tensors stay float32 master weights that move."""
    cfg = _cfg(name, digits_root, random_clip_weights, str(tmp_path))
    cfg.defrost()
    cfg.TRAINER.PREC = "amp"
    node = TRAINERS.get(name).config_node
    if node and "PREC" in cfg.TRAINER.get(node, {}):
        cfg.TRAINER[node].PREC = "amp"  # a method's own PREC wins over TRAINER.PREC
    trainer = build_trainer(cfg)
    assert trainer.precision.dtype == torch.bfloat16 and trainer.precision.scaler is None
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    _train_steps(trainer, 2)
    params = dict(trainer.model.named_parameters())
    assert before and all(params[n].dtype == torch.float32 for n in before)
    assert any(not torch.equal(params[n].detach(), v) for n, v in before.items()), "amp steps changed nothing"


#: the methods whose papers define them on CoOp: the only CoOp subclasses besides DePT's combinations
ON_COOP = {"KgCoOp", "ProGrad", "CoCoOp"}


@pytest.mark.parametrize("name", NAMES)
def test_inheritance_is_honest_and_shallow(name):
    """A CLIP method sits at most two classes below the prompt base (DePT's mixin adds one over its base, as a plugin);
    only methods defined on CoOp subclass CoOp."""
    from trainers.coop import CoOp
    from trainers.dept import DePTMixin
    from vltune.tuners.prompting import PromptTrainer

    cls = TRAINERS.get(name)
    if issubclass(cls, DePTMixin):
        assert cls.__bases__[0] is DePTMixin and len(cls.__bases__) == 2
        cls = cls.__bases__[1]  # the base method the plugin combines with
    if issubclass(cls, CoOp) and cls is not CoOp:
        assert cls.__name__ in ON_COOP, f"{cls.__name__} subclasses CoOp but is not a CoOp-derived method"
    if issubclass(cls, PromptTrainer):
        chain = cls.__mro__[: cls.__mro__.index(PromptTrainer)]
        below = [c for c in chain if issubclass(c, PromptTrainer)]
        assert 1 <= len(below) <= 2, f"{name}: {[c.__name__ for c in below]} below PromptTrainer"
    else:
        assert cls.__mro__[1].__name__ in ("TrainerX", "ZeroshotCLIP"), cls.__mro__
