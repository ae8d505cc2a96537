"""Result identity and config-node ownership: a finished run stays done when vltune grows (a new trainer, a new key
at its default, a moved weights file), changing a key the job reads makes it stale, and no trainer can define or
alter another trainer's config node."""

from __future__ import annotations

import os
import shutil

import pytest
from conftest import tiny_opts
from yacs.config import CfgNode as CN

from vltune.config import get_cfg
from vltune.config.identity import (
    file_digest,
    identity,
    identity_diff,
    identity_hash,
    identity_of_saved,
    trainer_units,
)
from vltune.config.nodes import under
from vltune.engine import build_trainer
from vltune.registry import TRAINERS, ConfigOwnershipError, RegistryError
from vltune.results.record import config_to_dict

get_cfg()  # fills the registry
NAMES = TRAINERS.registered_names()


# ---- every node a trainer reads is part of its identity ---------------------------------------------------------
class _Reads:
    """Records every config key read through attribute, item or ``get`` access while active."""

    def __init__(self, cfg: CN) -> None:
        self.paths: dict[int, str] = {}
        self.keys: set[str] = set()
        self._walk(cfg, "")

    def _walk(self, node: CN, prefix: str) -> None:
        self.paths[id(node)] = prefix
        for k, v in node.items():
            if isinstance(v, CN):
                self._walk(v, f"{prefix}{k}.")

    def __enter__(self) -> _Reads:
        reads = self
        self._saved = {name: CN.__dict__.get(name) for name in ("__getattr__", "__getitem__", "get")}
        getattr_, get = CN.__getattr__, dict.get

        def note(node: CN, key: object) -> None:
            prefix = reads.paths.get(id(node))
            if prefix is not None and isinstance(key, str):
                reads.keys.add(prefix + key)

        def tracked_getattr(node, name):
            note(node, name)
            return getattr_(node, name)

        def tracked_getitem(node, key):
            note(node, key)
            return dict.__getitem__(node, key)

        def tracked_get(node, key, default=None):
            note(node, key)
            return get(node, key, default)

        CN.__getattr__, CN.__getitem__, CN.get = tracked_getattr, tracked_getitem, tracked_get
        return self

    def __exit__(self, *exc: object) -> None:
        for name, value in self._saved.items():
            if value is None:
                delattr(CN, name)
            else:
                setattr(CN, name, value)


RUN = {"DATASET.NUM_SHOTS": 2, "DATALOADER.TRAIN_X.BATCH_SIZE": 4, "DATALOADER.TEST.BATCH_SIZE": 8,
       "OPTIM.MAX_EPOCH": 1, "SEED": 1, "DATASET.SUBSAMPLE_CLASSES": "base"}


@pytest.mark.parametrize("name", NAMES)
def test_every_config_node_a_trainer_reads_is_in_its_identity(name, make_cfg):
    cfg = make_cfg(name, opts=RUN, test_overrides=True)
    owned_elsewhere = set(TRAINERS.owners())
    with _Reads(cfg) as reads:
        trainer = build_trainer(cfg)
        trainer.set_model_mode("train")
        batch = next(iter(trainer.train_loader_x))
        if trainer._models:
            trainer.forward_backward(trainer.to_device(batch))
        trainer.test()
    units = trainer_units(name)
    outside = sorted(k for k in reads.keys
                     if (k.startswith("TRAINER.") and k not in ("TRAINER.NAME", "TRAINER.PREC")
                         or under(k, owned_elsewhere)) and not under(k, units))
    assert not outside, (f"{name} reads {outside}, which its identity leaves out: list the node in the trainer "
                         f"class's config_reads (identity units now: {units})")


# ---- ownership: one owner per config node ----------------------------------------------------------------------
def _throwaway(name: str, add_config, cls=None):
    from vltune.engine import TrainerX

    cls = cls or type(name, (TrainerX,), {})
    TRAINERS.register(name, cls, add_config=add_config)
    return cls


def test_a_trainer_redefining_another_trainers_node_fails_at_registration_naming_both():
    def add_config(cfg: CN) -> None:
        cfg.TRAINER.LINEAR_PROBE = CN()
        cfg.TRAINER.LINEAR_PROBE.WEIGHT = 0.1

    owner = TRAINERS.owner("TRAINER.LINEAR_PROBE")
    with pytest.raises(ConfigOwnershipError) as e:
        _throwaway("ProbeHijack", add_config)
    assert "ProbeHijack" in str(e.value) and owner in str(e.value) and "TRAINER.LINEAR_PROBE" in str(e.value)
    assert "ProbeHijack" not in TRAINERS


def test_a_trainer_altering_another_trainers_node_in_place_or_a_core_default_fails():
    def alter(cfg: CN) -> None:
        cfg.TRAINER.COOP.N_CTX = 4

    with pytest.raises(ConfigOwnershipError, match=r"'CoOpAlter'.*TRAINER\.COOP.*'CoOp'"):
        _throwaway("CoOpAlter", alter)

    def add_key(cfg: CN) -> None:
        cfg.TRAINER.COOP.EXTRA = 1

    with pytest.raises(ConfigOwnershipError, match=r"TRAINER\.COOP.*'CoOp'"):
        _throwaway("CoOpExtra", add_key)

    def core(cfg: CN) -> None:
        cfg.OPTIM.LR = 0.5

    with pytest.raises(ConfigOwnershipError, match=r"OPTIM\.LR.*vltune's defaults"):
        _throwaway("CoreLR", core)
    assert not {"CoOpAlter", "CoOpExtra", "CoreLR"} & set(TRAINERS.registered_names())


def test_trainers_sharing_one_add_config_share_its_nodes_and_a_new_node_is_fine():
    def add_config(cfg: CN) -> None:
        cfg.TRAINER.TOYNODE = CN()
        cfg.TRAINER.TOYNODE.ALPHA = 0.5

    try:
        _throwaway("ToyA", add_config)
        _throwaway("ToyB", add_config)
        assert TRAINERS.owner("TRAINER.TOYNODE") == "ToyA"
        assert TRAINERS.owned_units("ToyB") == ("TRAINER.TOYNODE",)
        assert trainer_units("ToyB") == ("TRAINER.TOYNODE",)
        TRAINERS.unregister("ToyA")
        assert TRAINERS.owner("TRAINER.TOYNODE") == "ToyB"
    finally:
        for name in ("ToyA", "ToyB"):
            if name in TRAINERS:
                TRAINERS.unregister(name)
    assert TRAINERS.owner("TRAINER.TOYNODE") is None
    with pytest.raises(RegistryError):
        TRAINERS.get("ToyB")


# ---- identity ------------------------------------------------------------------------------------------------------
def _coop_cfg(root: str, weights: str, **opts: object):
    return get_cfg(opts=tiny_opts(root, weights, **{"TRAINER.NAME": "CoOp", **opts}))


def test_identity_leaves_out_other_trainers_nodes_and_paths_and_keeps_what_the_job_reads(digits_root,
                                                                                         random_clip_weights):
    ident = identity(_coop_cfg(digits_root, random_clip_weights))
    assert "TRAINER.COOP.N_CTX" in ident and "OPTIM.LR" in ident and "DATASET.NAME" in ident
    assert not any(k.startswith(("TRAINER.COCOOP", "TRAINER.MAPLE", "TRAINER.DEPT", "LOSS.")) for k in ident)
    assert "DATASET.ROOT" not in ident and "OUTPUT_DIR" not in ident and "MODEL.BACKBONE.WEIGHTS" not in ident
    assert ident["weights"] == f"sha256:{file_digest(random_clip_weights)}"
    other = identity(_coop_cfg(digits_root, random_clip_weights, **{"TRAINER.COCOOP.N_CTX": 9, "OUTPUT_DIR": "/x"}))
    assert identity_diff(ident, other) == [] and identity_hash(ident) == identity_hash(other)
    changed = identity(_coop_cfg(digits_root, random_clip_weights, **{"OPTIM.LR": 0.123}))
    assert identity_diff(ident, changed) == [("OPTIM.LR", ident["OPTIM.LR"], 0.123)]
    assert identity_hash(changed) != identity_hash(ident)


def test_a_key_added_at_its_default_changes_neither_the_diff_nor_the_hash(digits_root, random_clip_weights):
    old = identity(_coop_cfg(digits_root, random_clip_weights))
    add_config = TRAINERS.meta("CoOp")["add_config"]

    def with_new_key(cfg: CN) -> None:
        add_config(cfg)
        cfg.TRAINER.COOP.NEW_KNOB = 0.25

    TRAINERS.meta("CoOp")["add_config"] = with_new_key
    from vltune.config import identity as identity_module

    identity_module._defaults_of.cache_clear()
    try:
        new = identity(_coop_cfg(digits_root, random_clip_weights))
        assert new["TRAINER.COOP.NEW_KNOB"] == 0.25 and "TRAINER.COOP.NEW_KNOB" not in old
        assert identity_diff(old, new) == [] and identity_hash(old) == identity_hash(new)
        set_away = identity(_coop_cfg(digits_root, random_clip_weights, **{"TRAINER.COOP.NEW_KNOB": 0.5}))
        assert identity_diff(old, set_away) == [("TRAINER.COOP.NEW_KNOB", "(absent)", 0.5)]
    finally:
        TRAINERS.meta("CoOp")["add_config"] = add_config
        identity_module._defaults_of.cache_clear()


def test_weights_are_identified_by_content_and_hashed_once(tmp_path, monkeypatch, random_clip_weights):
    from vltune.config import identity as identity_module

    monkeypatch.setenv("VLTUNE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(identity_module, "_MEMO", {})
    moved = tmp_path / "elsewhere" / "clip.pt"
    moved.parent.mkdir()
    shutil.copy(random_clip_weights, moved)
    calls = []
    real_sha = identity_module.hashlib.sha256
    monkeypatch.setattr(identity_module.hashlib, "sha256", lambda *a: calls.append(1) or real_sha(*a))
    first = identity_module.weights_identity("vltune-tiny", str(moved))
    assert first == identity_module.weights_identity("vltune-tiny", random_clip_weights)
    n = len(calls)
    monkeypatch.setattr(identity_module, "_MEMO", {})  # a new process: the file cache answers
    assert identity_module.weights_identity("vltune-tiny", str(moved)) == first and len(calls) == n
    with open(moved, "ab") as f:
        f.write(b"x")
    os.utime(moved, ns=(1, 1))
    assert identity_module.weights_identity("vltune-tiny", str(moved)) != first  # changed content, new digest


def test_a_schema_1_record_is_compared_from_its_saved_config(digits_root, random_clip_weights):
    cfg = _coop_cfg(digits_root, random_clip_weights, **{"TRAINER.COCOOP.N_CTX": 3})
    saved = config_to_dict(cfg)
    assert identity_diff(identity_of_saved(saved), identity(_coop_cfg(digits_root, random_clip_weights))) == []
