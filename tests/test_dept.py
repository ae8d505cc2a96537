"""DePT as one plugin (trainers/dept.py): staged LR, the training loss, where the head is fused at test time, strict
checkpoints across class sets, the config aliases, and the registration of the variants.

Runs on the random tiny CLIP (E = 64) and the generated digits dataset: 10 classes, ``base`` = the first 5, ``new``
= the last 5 (relabelled from 0).
"""

from __future__ import annotations

import dataclasses
import glob
import os

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO

import trainers  # noqa: F401  (fills the registry: every DePT variant, MaPLe's included)
import trainers.dept as dept
from trainers.coop import CoOp
from trainers.dept import DePTHead, DePTMixin, register_dept, resolve_settings, with_dept
from vltune.config import get_cfg
from vltune.registry import TRAINERS, Registry
from vltune.tuners.prompting import SimParts

COOP = "ExtrasLinearProbeCoOp"
#: every registered DePT variant (ExtrasLinearProbe<Base>), from the registry
VARIANTS = [n for n in TRAINERS.registered_names() if issubclass(TRAINERS.get(n), DePTMixin)]


# Built with test_overrides=True: the variant's registered tiny-CLIP opts (MaPLe: a depth the tiny CLIP has).
DEPT = {"DATASET.NUM_SHOTS": 2, "DATALOADER.TRAIN_X.BATCH_SIZE": 4, "DATALOADER.TEST.BATCH_SIZE": 8,
        "OPTIM.NAME": "sgd", "OPTIM.LR": 0.05, "OPTIM.MAX_EPOCH": 1, "OPTIM.LR_SCHEDULER": "cosine",
        "TRAINER.COOP.N_CTX": 4, "SEED": 1}


def _train(trainer, steps: int = 3):
    trainer.set_model_mode("train")
    done = 0
    while done < steps:
        for batch in trainer.train_loader_x:
            trainer.forward_backward(trainer.to_device(batch))
            done += 1
            if done == steps:
                break
    return trainer


@torch.no_grad()
def _eval(trainer, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(DePT logits, z_sim, raw image features) of ``images`` in one evaluation."""
    trainer.set_model_mode("eval")
    trainer.before_evaluate()
    try:
        logits = trainer.model_inference(images)
        parts = trainer.forward_parts(images)
        return logits, parts.logits, parts.raw_image
    finally:
        trainer.after_evaluate()


def _head(trainer, image: torch.Tensor) -> torch.Tensor:
    """head(FiLM_img(f)) written out, f the raw image features: (B, E) → (B, C_train)."""
    d = trainer.dept
    return (image * d.film_img.scale + d.film_img.bias) @ d.head.weight.t() + d.head.bias


def _images(trainer, n: int = 8) -> torch.Tensor:
    return next(iter(trainer.test_loader))["img"][:n]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, make_trainer):
    """subsample → (trainer after 3 steps, folder with its epoch-1 checkpoint)."""
    cache = {}

    def get(subsample: str):
        if subsample not in cache:
            out = str(tmp_path_factory.mktemp(f"dept-{subsample}"))
            trainer = _train(make_trainer(COOP, out, opts=DEPT, test_overrides=True,
                                          **{"DATASET.SUBSAMPLE_CLASSES": subsample}))
            trainer.save_model(0, out)
            cache[subsample] = trainer, out
        return cache[subsample]

    return get


def _eval_only(make_trainer, source: str | None, **extra):
    trainer = make_trainer(COOP, eval_only=True, opts=DEPT, test_overrides=True, **extra)
    if source:
        trainer.load_model(source, epoch=1)
    return trainer


# ---- training ------------------------------------------------------------------------------------------------------
def test_film_and_head_train_at_lr_times_lr_exp_after_a_shared_warmup(make_trainer):
    trainer = make_trainer(COOP, opts=DEPT, test_overrides=True, **{
        "OPTIM.MAX_EPOCH": 3, "OPTIM.WARMUP_EPOCH": 1, "OPTIM.WARMUP_TYPE": "constant",
        "OPTIM.WARMUP_CONS_LR": 1e-5, "TRAINER.DEPT.LR_EXP": 4.0})
    dept_params = {id(p) for p in trainer.dept.parameters()}
    assert {id(p) for g in trainer._optims["dept"].param_groups for p in g["params"]} == dept_params
    assert len(dept_params) == 6  # FiLM scale/bias ×2, head weight/bias
    lrs = lambda name: [g["lr"] for g in trainer._optims[name].param_groups]  # noqa: E731
    assert lrs("dept") == lrs("prompt_learner") == [1e-5]  # warmup holds every group
    trainer.update_lr()  # epoch 1: cosine at its start, the base LR
    assert lrs("prompt_learner") == [pytest.approx(0.05)] and lrs("dept") == [pytest.approx(0.05 * 4.0)]
    before = {k: v.detach().clone() for k, v in trainer.dept.named_parameters()}
    ctx = trainer.model.prompt_learner.ctx.detach().clone()
    _train(trainer)
    for k, p in trainer.dept.named_parameters():
        assert not torch.equal(p.detach(), before[k]), f"{k} did not train"
    assert not torch.equal(trainer.model.prompt_learner.ctx.detach(), ctx)


@pytest.mark.parametrize("name", VARIANTS)
def test_loss_is_the_weighted_sum_plus_the_base_regularizers(name, make_trainer):
    trainer = make_trainer(name, opts=DEPT, test_overrides=True,
                           **{"TRAINER.DEPT.SIM_WEIGHT": 0.4, "TRAINER.DEPT.CLS_WEIGHT": 0.5})
    _train(trainer, 2)  # FiLM away from the identity
    batch = trainer.to_device(next(iter(trainer.train_loader_x)))
    y = batch["label"]
    with torch.no_grad():
        loss, _ = trainer.loss(batch)
        parts = trainer.forward_parts(batch["img"])
        plain = TRAINERS.get(name).__mro__[2].forward_parts(trainer, batch["img"])  # the base, without raw features
        assert plain.raw_image is None and plain.raw_text is None
        torch.testing.assert_close(parts.logits, plain.logits, rtol=0, atol=0)  # asking for raw changes nothing
        torch.testing.assert_close(parts.image, F.normalize(parts.raw_image, dim=-1), rtol=0, atol=0)
        torch.testing.assert_close(parts.text, F.normalize(parts.raw_text, dim=-1), rtol=0, atol=0)
        raw = parts.raw_text  # FiLM and the head read the raw features; z_sim and the regularizers the normalised ones
        t_y = raw[y] if raw.dim() == 2 else raw[torch.arange(len(y)), y]  # CoCoOp: per image
        d = trainer.dept
        feats = torch.cat([t_y * d.film_txt.scale + d.film_txt.bias,
                           parts.raw_image * d.film_img.scale + d.film_img.bias])
        extra = sum(trainer.regularizers(batch, parts).values())
        expected = (0.4 * F.cross_entropy(parts.logits, y) + 0.5 * F.cross_entropy(d.head(feats), torch.cat([y, y]))
                    + extra)
    torch.testing.assert_close(loss, expected)
    if name == "ExtrasLinearProbeKgCoOp":
        assert float(extra) > 0  # W · L_kg of the trained context
    trainer.regularizers = lambda batch, parts: {"x": parts.logits.new_tensor(2.5)}  # called, and added once
    with torch.no_grad():
        torch.testing.assert_close(trainer.loss(batch)[0], expected - extra + 2.5)


def test_per_image_text_features_use_each_images_own_true_class(make_trainer):
    trainer = make_trainer(COOP, opts=DEPT, test_overrides=True)
    g = torch.Generator().manual_seed(0)
    raw_image = 3 * torch.randn(4, 64, generator=g)
    raw_text = 3 * torch.randn(4, 10, 64, generator=g)  # (B, C, E), as CoCoOp's
    image, text = F.normalize(raw_image, dim=-1), F.normalize(raw_text, dim=-1)
    logits = torch.randn(4, 10, generator=g)
    trainer.forward_parts = lambda images, text_=None, raw=True: SimParts(image, text, logits, raw_image, raw_text)
    trainer.regularizers = lambda batch, parts: {}
    y = torch.tensor([3, 0, 7, 3])
    with torch.no_grad():
        loss, _ = trainer.loss({"img": None, "label": y})
        head = trainer.dept.head(torch.cat([raw_text[torch.arange(4), y], raw_image]))  # FiLM: identity at init
        expected = 0.3 * F.cross_entropy(logits, y) + 0.7 * F.cross_entropy(head, torch.cat([y, y]))
    torch.testing.assert_close(loss, expected)


def test_a_base_without_raw_features_fails_naming_the_contract(make_trainer):
    trainer = make_trainer(COOP, opts=DEPT, test_overrides=True)
    parts = SimParts(torch.zeros(2, 64), torch.zeros(10, 64), torch.zeros(2, 10))  # normalised features only
    trainer.forward_parts = lambda images, text_=None, raw=True: parts
    with pytest.raises(RuntimeError, match="raw_text"):
        trainer.loss({"img": None, "label": torch.tensor([0, 1])})


def test_a_base_with_a_narrower_trainable_set_still_trains_film_and_head(make_cfg):
    class CtxOnly(CoOp):
        def trainable_parameters(self):
            return [self.model.prompt_learner.ctx]

    trainer = with_dept(CtxOnly)(make_cfg(COOP, opts=DEPT, test_overrides=True))
    declared = {id(p) for p in trainer.trainable_parameters()}
    assert {id(p) for p in trainer.dept.parameters()} <= declared
    assert all(p.requires_grad for p in trainer.dept.parameters())
    assert trainer.n_trainable == 4 * 64 + 2 * 2 * 64 + 65 * 10


# ---- test-time fusion ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", VARIANTS)
def test_fused_logits_apply_film_and_head_to_the_raw_image_features(name, make_trainer):
    """Upstream (Koorye/DePT ``elp_*.py``, every base) feeds the encoder outputs before normalisation to FiLM and the
    head; only z_sim normalises. Written out from the base model's own raw image features, for each variant."""
    trainer = _train(make_trainer(name, opts=DEPT, test_overrides=True), 2)  # FiLM and the head away from their init
    images = _images(trainer)
    trainer.set_model_mode("eval")
    with torch.no_grad():
        raw = trainer.model.image_features(images, normalize=False)  # the base's image encoder output
    norms = raw.norm(dim=-1)
    assert not torch.allclose(norms, torch.ones_like(norms), atol=0.05), "raw features too close to unit norm"
    logits, z_sim, _ = _eval(trainer, images)
    w = trainer.dept_settings
    torch.testing.assert_close(logits, w.sim_weight * z_sim + w.cls_weight * _head(trainer, raw), rtol=1e-5,
                               atol=1e-5)
    on_normalised = w.sim_weight * z_sim + w.cls_weight * _head(trainer, F.normalize(raw, dim=-1))
    assert not torch.allclose(logits, on_normalised, atol=1e-3)


def test_training_classes_fuse_by_the_formula(runs):
    trainer, _ = runs("all")
    logits, z_sim, image = _eval(trainer, _images(trainer))
    expected = 0.3 * z_sim + 0.7 * _head(trainer, image)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(logits, z_sim, atol=1e-2)


def test_a_subset_of_the_training_classes_fuses_with_its_rows(runs, make_trainer):
    trainer, source = runs("all")
    new = _eval_only(make_trainer, source, **{"DATASET.SUBSAMPLE_CLASSES": "new"})
    assert new.classnames == trainer.classnames[5:] and new.dept.head.weight.shape[0] == 10
    logits, z_sim, image = _eval(new, _images(new))
    torch.testing.assert_close(logits, 0.3 * z_sim + 0.7 * _head(new, image)[:, 5:], rtol=1e-5, atol=1e-5)


def test_rows_follow_the_evaluated_names_and_order():
    head = DePTHead(4, ["a", "b", "c", "d", "e"])
    assert head.trained_classnames() == ["a", "b", "c", "d", "e"]
    assert head.rows_for(["e", "d", "c", "b", "a"]).tolist() == [4, 3, 2, 1, 0]
    assert head.rows_for(["b", "c", "d"]).tolist() == [1, 2, 3]
    assert head.rows_for(["d", "a"]).tolist() == [3, 0]
    assert head.rows_for(["a", "x"]) is None  # one unseen class: the head does not apply
    assert head.rows_for(["a", "a"]) is None
    twice = DePTHead(4, ["crane", "b", "crane"])  # a name of two classes maps in order; a partial set is ambiguous
    assert twice.rows_for(["crane", "b", "crane"]).tolist() == [0, 1, 2]
    assert twice.rows_for(["b", "crane"]) is None
    image = torch.randn(3, 4)
    torch.testing.assert_close(head.image_logits(image)[:, head.rows_for(["e", "a"])],
                               head.image_logits(image)[:, [4, 0]], rtol=0, atol=0)


@pytest.mark.parametrize("key", ["TRAINER.DEPT.TEST_TIME_FUSION", "TRAINER.LINEAR_PROBE.TEST_TIME_FUSION"])
def test_fusion_off_gives_the_heads_logits_on_its_classes_as_upstream(key, runs, make_trainer):
    _, source = runs("all")
    off = _eval_only(make_trainer, source, **{key: False})
    logits, z_sim, raw = _eval(off, _images(off))
    torch.testing.assert_close(logits, _head(off, raw), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(logits, z_sim, atol=1e-3)


# ---- checkpoints across class sets ---------------------------------------------------------------------------------
@pytest.mark.parametrize("subsample", ["new", "all"])
def test_base_checkpoint_loads_strictly_elsewhere_and_gives_z_sim(subsample, runs, make_trainer):
    base, source = runs("base")
    # loading raises on any missing/unexpected/misshaped key
    other = _eval_only(make_trainer, source, **{"DATASET.SUBSAMPLE_CLASSES": subsample})
    assert other.dept.trained_classnames() == base.classnames != other.classnames
    for k, v in base.dept.state_dict().items():
        assert torch.equal(other.dept.state_dict()[k], v), k
    logits, z_sim, _ = _eval(other, _images(other))
    assert logits.shape == (8, other.num_classes) and torch.equal(logits, z_sim)


def test_same_classes_reload_reproduces_the_fused_logits(runs, make_trainer):
    base, source = runs("base")
    again = _eval_only(make_trainer, source, **{"DATASET.SUBSAMPLE_CLASSES": "base"})
    images = _images(base)
    expected, z_sim, _ = _eval(base, images)
    torch.testing.assert_close(_eval(again, images)[0], expected, rtol=0, atol=1e-6)
    assert not torch.allclose(expected, z_sim, atol=1e-2)


def test_loading_stays_strict_on_the_dept_keys(runs, tmp_path, make_trainer):
    _, source = runs("base")
    path = os.path.join(source, "dept", "model.pth.tar-1")
    ckpt = torch.load(path, weights_only=True)

    def write(folder: str, state: dict) -> str:
        os.makedirs(os.path.join(tmp_path, folder, "dept"))
        os.symlink(os.path.join(source, "prompt_learner"), os.path.join(tmp_path, folder, "prompt_learner"))
        torch.save({**ckpt, "state_dict": state}, os.path.join(tmp_path, folder, "dept", "model.pth.tar-1"))
        return str(tmp_path / folder)

    state = ckpt["state_dict"]
    extra = write("extra", {**state, "linear_probe.weight": torch.zeros(1)})
    missing = write("missing", {k: v for k, v in state.items() if k != "classnames"})
    film = write("film", {**state, "film_img.scale": torch.ones(32)})
    opts = {"DATASET.SUBSAMPLE_CLASSES": "new"}
    with pytest.raises(KeyError, match=r"unexpected \['linear_probe.weight'\]"):
        _eval_only(make_trainer, extra, **opts)
    with pytest.raises(KeyError, match=r"missing \['classnames'\]"):
        _eval_only(make_trainer, missing, **opts)
    with pytest.raises(ValueError, match="film_img.scale"):
        _eval_only(make_trainer, film, **opts)
    training = make_trainer(COOP, tmp_path / "d", opts=DEPT, test_overrides=True)  # 10 classes, optimizer
    with pytest.raises(ValueError, match="another class set"):  # the head's names or rows: 5 vs 10 classes
        training.load_model(source, epoch=1)


# ---- configuration -------------------------------------------------------------------------------------------------
def _settings(**opts):
    return resolve_settings(get_cfg(opts=[x for kv in opts.items() for x in (kv[0], str(kv[1]))]))


def test_defaults_and_the_linear_probe_alias(make_trainer):
    assert _settings() == dept.Settings(0.3, 0.7, 6.5, True)
    assert _settings(**{"TRAINER.LINEAR_PROBE.WEIGHT": 0.6}) == dept.Settings(pytest.approx(0.4), 0.6, 6.5, True)
    assert _settings(**{"TRAINER.LINEAR_PROBE.WEIGHT": 0.6, "TRAINER.DEPT.CLS_WEIGHT": 0.6}).cls_weight == 0.6
    assert _settings(**{"OPTIM.LR_EXP": 3.0}).lr_exp == 3.0
    assert _settings(**{"TRAINER.DEPT.SIM_WEIGHT": 0.5, "TRAINER.DEPT.CLS_WEIGHT": 0.5}) == dept.Settings(
        0.5, 0.5, 6.5, True)  # SkipTuning's independent weights
    trainer = make_trainer(COOP, eval_only=True, opts=DEPT, test_overrides=True,
                           **{"TRAINER.LINEAR_PROBE.WEIGHT": 0.6})
    assert dataclasses.astuple(trainer.dept_settings) == pytest.approx((0.4, 0.6, 6.5, True))


@pytest.mark.parametrize("opts,keys", [
    ({"TRAINER.DEPT.CLS_WEIGHT": 0.5, "TRAINER.LINEAR_PROBE.WEIGHT": 0.6},
     ("TRAINER.DEPT.CLS_WEIGHT", "TRAINER.LINEAR_PROBE.WEIGHT")),
    ({"TRAINER.DEPT.SIM_WEIGHT": 0.5, "TRAINER.LINEAR_PROBE.WEIGHT": 0.6},
     ("TRAINER.DEPT.SIM_WEIGHT", "TRAINER.LINEAR_PROBE.WEIGHT")),
    ({"TRAINER.DEPT.LR_EXP": 2.0, "OPTIM.LR_EXP": 3.0}, ("TRAINER.DEPT.LR_EXP", "OPTIM.LR_EXP")),
    ({"TRAINER.DEPT.TEST_TIME_FUSION": False, "TRAINER.LINEAR_PROBE.TEST_TIME_FUSION": False}, ()),
    ({"TRAINER.LINEAR_PROBE.TYPE": "mlp"}, ("TRAINER.LINEAR_PROBE.TYPE",)),
])
def test_disagreeing_spellings_fail_naming_both_keys(opts, keys, make_trainer):
    if not keys:  # agreeing spellings are fine
        assert _settings(**opts).fusion is False
        return
    with pytest.raises(ValueError) as info:
        make_trainer(COOP, eval_only=True, opts=DEPT, test_overrides=True, **opts)
    assert all(k in str(info.value) for k in keys), info.value


@pytest.mark.parametrize("path", sorted(glob.glob(str(REPO / "configs/trainers/ExtrasLinearProbe*/*.yaml"))))
def test_shipped_yaml_files_merge(path):
    name = os.path.basename(os.path.dirname(path))
    cfg = get_cfg(config_file=path, opts=["TRAINER.NAME", name])
    assert cfg.TRAINER.NAME == name and resolve_settings(cfg) == dept.Settings(0.3, 0.7, 6.5, True)
    assert cfg.OPTIM.MAX_EPOCH == 10 and cfg.OPTIM.WARMUP_EPOCH == 1 and cfg.OPTIM.WARMUP_CONS_LR == 1e-5


# ---- registration --------------------------------------------------------------------------------------------------
def test_variants_are_the_mixin_over_each_registered_base():
    assert VARIANTS == ["ExtrasLinearProbeCoOp", "ExtrasLinearProbeCoCoOp", "ExtrasLinearProbeKgCoOp",
                        "ExtrasLinearProbeMaPLe"]
    for name, base in zip(VARIANTS, ["CoOp", "CoCoOp", "KgCoOp", "MaPLe"]):
        cls = TRAINERS.get(name)
        assert cls.__name__ == name and cls.__mro__[1:3] == (DePTMixin, TRAINERS.get(base))
        assert not [k for k, v in vars(cls).items() if callable(v)], "no per-base code"
    assert TRAINERS.canonical("KgDePT") == "ExtrasLinearProbeKgCoOp"


def test_register_dept_is_one_line_for_a_new_base(monkeypatch):
    registry = Registry("trainer")
    monkeypatch.setattr(dept, "TRAINERS", registry)

    class MaPLe(CoOp):
        pass

    registry.register("MaPLe", MaPLe, family="prompt", test_overrides=dict(trainable_params=7, opts={"X": 1}))
    cls = register_dept("MaPLe", "MaPLeDePT", trainable_params=913)
    assert registry.get("MaPLeDePT") is cls and cls.__name__ == "ExtrasLinearProbeMaPLe"
    assert registry.meta("ExtrasLinearProbeMaPLe") == {"family": "prompt", "add_config": dept.add_config,
                                                       "test_overrides": {"trainable_params": 913, "opts": {"X": 1}}}
    assert with_dept(MaPLe).__mro__[1:3] == (DePTMixin, MaPLe)
