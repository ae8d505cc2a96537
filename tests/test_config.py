"""Config merge order, strict keys with suggestions, seed handling, and the registries' did-you-mean errors."""

from __future__ import annotations

import argparse

import pytest
from yacs.config import CfgNode as CN

from vltune.config import ConfigError, extend_cfg, get_cfg, get_cfg_default
from vltune.registry import TRAINERS, Registry, RegistryError


def _args(**kw: object) -> argparse.Namespace:
    base = dict(root="", output_dir="", resume="", seed=-1, source_domains=None, target_domains=None,
                transforms=None, trainer="", backbone="", head="", config_file="", dataset_config_file="", opts=[])
    base.update(kw)
    return argparse.Namespace(**base)


def test_merge_order_dataset_then_trainer_then_flags_then_opts(tmp_path):
    ds = tmp_path / "ds.yaml"
    ds.write_text("DATASET:\n  NAME: OxfordPets\nOPTIM:\n  LR: 0.1\n  MAX_EPOCH: 3\n")
    tr = tmp_path / "tr.yaml"
    tr.write_text("OPTIM:\n  LR: 0.2\nMODEL:\n  BACKBONE:\n    NAME: RN50\n")
    cfg = get_cfg(_args(dataset_config_file=str(ds), config_file=str(tr), backbone="ViT-B/16", trainer="CoOp",
                        opts=["OPTIM.LR", "0.3", "OPTIM.LR", "0.4", "TRAINER.COOP.N_CTX", "4"]))
    assert cfg.DATASET.NAME == "OxfordPets"
    assert cfg.OPTIM.MAX_EPOCH == 3  # dataset yaml, untouched later
    assert cfg.MODEL.BACKBONE.NAME == "ViT-B/16"  # flag beats trainer yaml
    assert cfg.OPTIM.LR == 0.4  # opts beat everything; the last occurrence wins
    assert cfg.TRAINER.COOP.N_CTX == 4 and cfg.TRAINER.NAME == "CoOp"
    assert cfg.is_frozen()


def test_dassl_pretrained_bool_still_merges_and_a_tag_is_kept(tmp_path):
    """Dassl's MODEL.BACKBONE.PRETRAINED is a bool; vltune's is an open_clip tag. A Dassl yaml or flag with the bool
    keeps working (no tag); a tag stays a tag."""
    tr = tmp_path / "tr.yaml"
    tr.write_text("MODEL:\n  BACKBONE:\n    NAME: ViT-B/16\n    PRETRAINED: True\n")
    assert get_cfg(config_file=str(tr)).MODEL.BACKBONE.PRETRAINED == ""
    assert get_cfg(_args(config_file=str(tr), opts=["MODEL.BACKBONE.PRETRAINED", "False"])).MODEL.BACKBONE.PRETRAINED \
        == ""
    tagged = get_cfg(_args(config_file=str(tr), opts=["MODEL.BACKBONE.PRETRAINED", "laion2b_s34b_b88k"]))
    assert tagged.MODEL.BACKBONE.PRETRAINED == "laion2b_s34b_b88k"


def test_yaml_tuple_strings_and_exponents_are_literal_evaluated(tmp_path):
    tr = tmp_path / "tr.yaml"
    tr.write_text('INPUT:\n  SIZE: (224, 224)\nOPTIM:\n  WARMUP_CONS_LR: 1e-5\n')
    cfg = get_cfg(config_file=str(tr))
    assert tuple(cfg.INPUT.SIZE) == (224, 224) and cfg.OPTIM.WARMUP_CONS_LR == 1e-5


def test_unknown_key_in_yaml_names_file_key_and_suggestion(tmp_path):
    tr = tmp_path / "bad.yaml"
    tr.write_text("OPTIM:\n  MAX_EPOHC: 3\n")
    with pytest.raises(ConfigError) as e:
        get_cfg(config_file=str(tr))
    msg = str(e.value)
    assert "OPTIM.MAX_EPOHC" in msg and "bad.yaml" in msg and "OPTIM.MAX_EPOCH" in msg


def test_unknown_key_in_opts_suggests_trainer_node_key():
    with pytest.raises(ConfigError, match=r"TRAINER\.COOP\.N_CTX"):
        get_cfg(opts=["TRAINER.COOP.NCTX", "4"])


def test_odd_opts_and_wrong_type_fail_clearly():
    with pytest.raises(ConfigError, match="odd number"):
        get_cfg(opts=["OPTIM.LR"])
    with pytest.raises(ConfigError):
        get_cfg(opts=["OPTIM.MAX_EPOCH", "'ten'"])


def test_seed_zero_is_honoured_and_negative_is_unset():
    assert get_cfg(_args(seed=0)).SEED == 0
    assert get_cfg(_args(seed=-1)).SEED == -1


def test_every_registered_trainer_node_exists_before_yaml_merge():
    cfg = get_cfg()
    for name in TRAINERS.registered_names():
        probe = get_cfg_default()
        add = TRAINERS.meta(name).get("add_config")
        if add:
            add(probe)
            for node in probe.TRAINER:
                assert node in cfg.TRAINER, f"{name} node TRAINER.{node} missing from the merged defaults"


def test_conflicting_trainer_defaults_are_rejected(monkeypatch):
    def a(cfg: CN) -> None:
        cfg.TRAINER.SHARED = CN()
        cfg.TRAINER.SHARED.X = 1

    def b(cfg: CN) -> None:
        cfg.TRAINER.SHARED = CN()
        cfg.TRAINER.SHARED.X = 2

    reg = Registry("trainer")
    reg.register("A", obj=type("A", (), {}), add_config=a)
    monkeypatch.setattr("vltune.config.TRAINERS", reg)
    assert extend_cfg(get_cfg_default()).TRAINER.SHARED.X == 1  # checked once for this registry, then remembered
    reg.register("B", obj=type("B", (), {}), add_config=b)  # a new registry state is checked again
    with pytest.raises(ConfigError, match="TRAINER.SHARED.X"):
        extend_cfg(get_cfg_default())


def test_registry_did_you_mean_and_aliases():
    get_cfg()  # imports the trainers
    with pytest.raises(RegistryError) as e:
        TRAINERS.get("Coop")
    assert "did you mean 'CoOp'" in str(e.value)
    assert isinstance(e.value, KeyError) and isinstance(e.value, ValueError)
    assert TRAINERS.get("ZeroShotCLIP") is TRAINERS.get("ZeroshotCLIP")
    assert TRAINERS.canonical("ZeroShotCLIP") == "ZeroshotCLIP"
    with pytest.raises(RegistryError, match="already registered"):
        TRAINERS.register("CoOp", obj=object)


def test_unknown_trainer_in_cfg_fails_with_suggestion():
    with pytest.raises(RegistryError, match="did you mean 'CoOp'"):
        get_cfg(_args(trainer="COOP"))


def test_registries_are_mirrored_into_dassl_when_it_is_installed(monkeypatch):
    import sys
    import types

    from vltune.registry import DATASETS, mirror_into_dassl

    get_cfg()
    fake = Registry("TRAINER")  # same register()/registered_names() surface as Dassl's Registry
    module = types.ModuleType("dassl.engine")
    module.TRAINER_REGISTRY = fake
    monkeypatch.setitem(sys.modules, "dassl", types.ModuleType("dassl"))
    monkeypatch.setitem(sys.modules, "dassl.engine", module)
    assert mirror_into_dassl(TRAINERS, "dassl.engine", "TRAINER_REGISTRY")
    assert {"CoOp", "ZeroshotCLIP", "ZeroshotCLIP2"} <= set(fake.registered_names())
    assert fake.get("CoOp") is TRAINERS.get("CoOp")
    assert not mirror_into_dassl(DATASETS, "dassl_is_not_installed", "DATASET_REGISTRY")


def test_unknown_dataset_fails_at_config_time_with_suggestion():
    with pytest.raises(RegistryError, match="did you mean 'OxfordPets'"):
        get_cfg(opts=["DATASET.NAME", "OxfordPet"])


def _per_dataset_yaml(tmp_path, block: str):
    path = tmp_path / "method.yaml"
    path.write_text("OPTIM:\n  MAX_EPOCH: 20\n  LR: 0.01\nPER_DATASET:\n" + block)
    return str(path)


def test_per_dataset_block_applies_only_to_the_named_dataset_and_opts_still_win(tmp_path):
    block = "  ImageNet: {OPTIM.MAX_EPOCH: 5}\n  SUN397:\n    OPTIM: {MAX_EPOCH: 4, LR: 0.5}\n"
    path = _per_dataset_yaml(tmp_path, block)
    assert get_cfg(config_file=path, opts=["DATASET.NAME", "ImageNet"]).OPTIM.MAX_EPOCH == 5
    sun = get_cfg(config_file=path, opts=["DATASET.NAME", "SUN397"])
    assert (sun.OPTIM.MAX_EPOCH, sun.OPTIM.LR) == (4, 0.5)
    assert get_cfg(config_file=path, opts=["DATASET.NAME", "OxfordPets"]).OPTIM.MAX_EPOCH == 20
    assert get_cfg(config_file=path, opts=["DATASET.NAME", "ImageNet", "OPTIM.MAX_EPOCH", "7"]).OPTIM.MAX_EPOCH == 7
    dataset_yaml = tmp_path / "imagenet.yaml"
    dataset_yaml.write_text("DATASET:\n  NAME: ImageNet\n")
    assert get_cfg(dataset_config_file=str(dataset_yaml), config_file=path).OPTIM.MAX_EPOCH == 5


def test_per_dataset_block_rejects_unknown_datasets_and_keys_naming_the_file(tmp_path):
    path = _per_dataset_yaml(tmp_path, "  ImageNett: {OPTIM.MAX_EPOCH: 5}\n")
    with pytest.raises(ConfigError, match=r"method\.yaml: PER_DATASET: .*did you mean 'ImageNet'"):
        get_cfg(config_file=path, opts=["DATASET.NAME", "OxfordPets"])
    path = _per_dataset_yaml(tmp_path, "  ImageNet: {OPTIM.MAX_EPOCHS: 5}\n")
    with pytest.raises(ConfigError, match=r"OPTIM\.MAX_EPOCHS.*PER_DATASET\.ImageNet.*OPTIM\.MAX_EPOCH"):
        get_cfg(config_file=path, opts=["DATASET.NAME", "ImageNet"])
    path = _per_dataset_yaml(tmp_path, "  ImageNet: 5\n")
    with pytest.raises(ConfigError, match="PER_DATASET.ImageNet must be a mapping"):
        get_cfg(config_file=path, opts=["DATASET.NAME", "ImageNet"])
