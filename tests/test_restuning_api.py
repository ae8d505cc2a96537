"""The generic Res-Tuning API (``vltune.tuners.restuning``): swift's snippet on timm's ViT-B/16, identity at init,
the gradient cut, config errors, tuner_cfg forms and recurrences, strict save/load, an open_clip image tower, removal.
"""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

import vltune  # noqa: F401  (compat shim: must precede timm/open_clip/torchvision)

# isort: split
import timm
from timm.models.vision_transformer import VisionTransformer

from vltune.tuners.res_tuners import ResAdapter, ResPrefix, ResPrompt, Zero
from vltune.tuners.restuning import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    ResTunedModel,
    ResTuningConfig,
    prepare_model,
)

COUNT_LINE = r"trainable params: ([\d,]+) \|\| all params: ([\d,]+) \|\| trainable%: [\d.]+"


def tiny_vit(seed: int = 0) -> VisionTransformer:
    torch.manual_seed(seed)
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=10).eval()


def vit_config(tuner_cfg=None, **overrides) -> ResTuningConfig:
    fields = dict(dims=64, root_modules=r"blocks\.0", stem_modules=r"blocks\.\d+", target_modules="norm",
                  tuner_cfg="res_adapter" if tuner_cfg is None else tuner_cfg)
    fields.update(overrides)
    return ResTuningConfig(**fields)


def images(n: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def chain_params(model: nn.Module) -> dict[str, torch.Tensor]:
    return dict(model.restuning.named_parameters())


def backbone_params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.named_parameters() if not n.startswith("restuning.")}


def randomise_chain(model: nn.Module, seed: int = 3) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.restuning.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.1)


class Pair(nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x, x.sum(-1)


class Head(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 3)

    def forward(self, scale: float, hidden: torch.Tensor) -> torch.Tensor:
        return self.fc(hidden) * scale


class Toy(nn.Module):
    """Linear layers in a ModuleList, a tuple-returning module, two identities and a head called with keywords."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 8)
        self.layers = nn.ModuleList([nn.Linear(8, 8) for _ in range(2)])
        self.pair = Pair()
        self.post = nn.Sequential(nn.Identity(), nn.Identity())
        self.head = Head()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inp(x)
        for layer in self.layers:
            x = torch.tanh(layer(x))
        x, _ = self.pair(x=x)
        return self.head(2.0, self.post(x))


def toy_config(**overrides) -> ResTuningConfig:
    fields = dict(dims=8, root_modules="inp", root_modules_hook="output", stem_modules=r"layers\.\d+",
                  target_modules="head", target_hidden_pos="hidden", tuner_cfg="res_adapter")
    fields.update(overrides)
    return ResTuningConfig(**fields)


def test_swift_snippet_on_timm_vit_base(capsys):
    torch.manual_seed(0)
    config = ResTuningConfig(dims=768, root_modules=r'.*blocks.0$', stem_modules=r'.*blocks\.\d+$',
                             target_modules=r'norm', tuner_cfg='res_adapter')
    model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=100)
    model_tune = prepare_model(model, config)
    print(model_tune.get_trainable_parameters())
    print(model(torch.ones(1, 3, 224, 224)).shape)
    line, shape = capsys.readouterr().out.splitlines()
    assert shape == "torch.Size([1, 100])"
    match = re.fullmatch(COUNT_LINE, line)
    assert match, line
    trainable, total = (int(g.replace(",", "")) for g in match.groups())
    assert trainable == sum(p.numel() for p in model.restuning.parameters()) == 1_198_848  # methods.md §14.3
    assert total == sum(p.numel() for p in model.parameters())
    assert model_tune.stem_names == [f"blocks.{i}" for i in range(12)]
    assert model_tune.root_name == "blocks.0" and model_tune.target_names == ["norm"]
    assert not model_tune.pending
    print(line)


@pytest.mark.parametrize("tuner", ["res_adapter", "res_prefix", "res_prompt"])
def test_identity_recurrence_is_the_frozen_model_at_init(tuner):
    model = tiny_vit()
    reference = copy.deepcopy(model).requires_grad_(False)
    tuned = prepare_model(model, vit_config(tuner))
    x = images()
    with torch.no_grad():
        expected = reference(x)
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
    torch.testing.assert_close(tuned(x), expected, rtol=0, atol=0)
    kinds = {"res_adapter": ResAdapter, "res_prefix": ResPrefix, "res_prompt": ResPrompt}
    assert all(isinstance(t, kinds[tuner]) for t in [*model.restuning.lateral, *model.restuning.vertical])
    if tuner != "res_adapter":  # block i's tuners read block i's frozen attention, not a copy of it
        assert model.restuning.lateral[1].attn.module is model.blocks[1].attn
        assert not any(n.startswith("restuning.") and "qkv" in n for n, _ in model.named_parameters())
    if tuner == "res_prompt":
        assert model.restuning.lateral[0]._norm[0] is model.blocks[0].norm1


def test_only_tuners_train_and_probes_are_detached():
    model = tiny_vit()
    tuned = prepare_model(model, vit_config())
    seen = {}
    model.restuning.register_forward_pre_hook(lambda m, args: seen.update(chain_args=args))
    model.blocks[1].register_forward_hook(lambda m, args, out: seen.update(stem_requires_grad=out.requires_grad))
    x = images().requires_grad_(True)  # backbone activations now require grad; the bypass must still cut them
    loss = F.cross_entropy(tuned(x), torch.tensor([1, 2]))
    loss.backward()

    root, stems = seen["chain_args"]
    assert seen["stem_requires_grad"]
    assert all(t.grad_fn is None and not t.requires_grad for t in [root, *stems])
    assert all(p.grad is None and not p.requires_grad for p in backbone_params(model).values())
    params = chain_params(model)
    assert all(p.grad is not None for p in params.values())
    for name in ("lateral.1.up.weight", "lateral.1.up.bias", "vertical.1.up.bias"):  # the last block's W₂/b₂
        assert params[name].grad.abs().sum() > 0, name
    assert not tuned.pending

    before = {n: p.detach().clone() for n, p in params.items()}
    optimizer = torch.optim.Adam(params.values(), lr=1e-2)
    for _ in range(5):
        optimizer.zero_grad()
        F.cross_entropy(tuned(images()), torch.tensor([1, 2])).backward()
        optimizer.step()
    unchanged = [n for n, p in params.items() if torch.equal(p, before[n])]
    assert not unchanged


def test_configuration_errors():
    model = tiny_vit()
    with pytest.raises(ValueError, match=r"target_modules='nrom' matches no module.*'norm'"):
        prepare_model(model, vit_config(target_modules="nrom"))
    with pytest.raises(ValueError, match=r"stem_modules='attn' matches no module.*names containing.*blocks\.0\.attn"):
        prepare_model(model, vit_config(stem_modules="attn"))
    with pytest.raises(ValueError, match=r"root_modules=.* matches 2 modules \['blocks\.0', 'blocks\.1'\]"):
        prepare_model(model, vit_config(root_modules=r"blocks\.\d+"))
    with pytest.raises(ValueError, match="tuner_cfg is required"):
        ResTuningConfig(dims=64, root_modules="a", stem_modules="b", target_modules="c", tuner_cfg=None)
    with pytest.raises(ValueError, match=r"tuner_cfg is a list of 3 entries but stem_modules selects 2 stems"):
        prepare_model(model, vit_config(["res_adapter"] * 3))
    with pytest.raises(ValueError, match=r"unknown tuner 'res_adaptor'"):
        vit_config("res_adaptor")
    with pytest.raises(ValueError, match=r"tuner_cfg\[1\] vertical_cfg: unknown tuner 'lora'"):
        vit_config(["res_adapter", {"lateral_cfg": "res_adapter", "vertical_cfg": "lora"}])
    with pytest.raises(ValueError, match="aux_cfg='upsample' is not supported"):
        vit_config({"lateral_cfg": "res_adapter", "aux_cfg": "upsample"})
    with pytest.raises(ValueError, match=r"dims lists 3 widths but stem_modules selects 2 stems"):
        prepare_model(model, vit_config(dims=[64, 64, 64]))
    with pytest.raises(ValueError, match="lam must be"):
        vit_config(lam=1.5)
    with pytest.raises(ValueError, match="is not a valid regex"):
        vit_config(root_modules="blocks.(")
    with pytest.raises(ValueError, match=r"selects 'layers', a ModuleList"):
        prepare_model(Toy(), toy_config(stem_modules="layers"))
    with pytest.raises(ValueError, match=r"stem 'layers\.0' \(Linear\) has no 'attn' submodule"):
        prepare_model(Toy(), toy_config(tuner_cfg="res_prefix"))
    assert all(p.requires_grad for p in model.parameters()) and not hasattr(model, "restuning")

    prepare_model(model, vit_config())
    with pytest.raises(ValueError, match="already has an attribute 'restuning'"):
        prepare_model(model, vit_config())


def test_runtime_errors_leave_no_state():
    model = Toy()
    tuned = prepare_model(model, toy_config(target_modules="inp", target_hidden_pos=0, root_modules="post"))
    with pytest.raises(RuntimeError, match=r"target 'inp' ran before .*missing: root post, stem layers\.0"):
        model(torch.randn(2, 8))
    assert not tuned.pending

    model = tiny_vit()
    tuned = prepare_model(model, vit_config(dims=32))
    with pytest.raises(ValueError, match=r"root blocks\.0 has shape \(2, 17, 64\).*dims=32"):
        model(images())
    assert not tuned.pending


def test_keyword_tuple_and_positional_targets():
    x = torch.randn(4, 8)
    cases = [{},  # head's 'hidden', passed positionally: found by its position in head.forward's signature
             {"target_hidden_pos": 1},  # the same argument by index
             {"target_modules": "pair", "target_hidden_pos": "x"},  # an argument passed as a keyword
             {"target_modules": "pair", "target_modules_hook": "output", "target_hidden_pos": 0}]  # tuple output
    for overrides in cases:
        torch.manual_seed(0)
        model = Toy()
        reference = copy.deepcopy(model)
        tuned = prepare_model(model, toy_config(**overrides))
        torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)
        randomise_chain(model)
        assert not torch.allclose(model(x), reference(x)), overrides
        assert not tuned.pending


def test_two_targets_share_one_bypass_per_forward():
    x = torch.randn(4, 8)
    torch.manual_seed(0)
    model = Toy()
    reference = copy.deepcopy(model)
    tuned = prepare_model(model, toy_config(target_modules=r"post\.[01]", target_hidden_pos=0))
    assert tuned.target_names == ["post.0", "post.1"]
    torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)
    randomise_chain(model)
    calls = []
    model.restuning.register_forward_hook(lambda m, args, out: calls.append(out))
    model(x)
    model(x)
    assert len(calls) == 2 and not tuned.pending  # one bypass per forward, used by both targets, then released


def test_tuner_cfg_forms():
    x = images()
    reference = tiny_vit().requires_grad_(False)
    with torch.no_grad():
        frozen = reference(x)

    model = tiny_vit()
    prepare_model(model, vit_config({"lateral_cfg": "res_adapter", "vertical_cfg": "zero"}))
    assert all(isinstance(v, Zero) for v in model.restuning.vertical)
    torch.testing.assert_close(model(x), frozen, rtol=0, atol=0)

    model = tiny_vit()
    prepare_model(model, vit_config(["res_adapter", "res_prompt"]))
    assert isinstance(model.restuning.lateral[0], ResAdapter) and isinstance(model.restuning.lateral[1], ResPrompt)
    torch.testing.assert_close(model(x), frozen, rtol=0, atol=0)

    model = tiny_vit()
    prepare_model(model, vit_config({"res_adapter": {"adapter_length": 4}}))
    assert all(t.down.out_features == 4 for t in [*model.restuning.lateral, *model.restuning.vertical])

    model = tiny_vit()
    prepare_model(model, vit_config({"lateral_cfg": {"res_prefix": {"n_tokens": 3}}}, lam="learnable"))
    assert model.restuning.lateral[0].keys.shape == (3, 64)
    assert all(isinstance(v, nn.Identity) for v in model.restuning.vertical)
    assert "lam.logit" in chain_params(model)


@pytest.mark.parametrize("recurrence,zero_init_last", [("swift", True), ("swift", False), ("paper", False)])
def test_swift_and_paper_recurrences_replace_the_target(recurrence, zero_init_last):
    x = images()
    with torch.no_grad():
        frozen = tiny_vit().requires_grad_(False)(x)
    model = tiny_vit()
    tuned = prepare_model(model, vit_config(recurrence=recurrence, zero_init_last=zero_init_last))
    chain = model.restuning
    assert all(t.residual for t in [*chain.lateral, *chain.vertical])
    assert bool(chain.lateral[-1].up.weight.count_nonzero() == 0) == zero_init_last
    assert chain.lateral[0].up.weight.count_nonzero() > 0  # only the last block is ever zero-initialised
    out = tuned(x)
    assert torch.isfinite(out).all() and out.shape == frozen.shape
    assert not torch.allclose(out, frozen, atol=1e-3)  # methods.md §14.3: swift's wiring is not identity at init
    out.sum().backward()
    assert all(p.grad is not None for p in chain.parameters())


def test_config_json_round_trip():
    block = {"lateral_cfg": {"res_adapter": {"adapter_length": 4}}, "vertical_cfg": "zero"}
    config = vit_config(["res_adapter", block], dims=[64, 64], lam="learnable", recurrence="paper")
    assert ResTuningConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ValueError, match=r"unknown ResTuningConfig fields \['use_bypass'\]"):
        ResTuningConfig.from_dict({**config.to_dict(), "use_bypass": True})


def test_save_and_load_are_strict_and_bit_exact(tmp_path):
    config = vit_config(["res_adapter", "res_prefix"], lam="learnable")
    model = tiny_vit()
    tuned = prepare_model(model, config)
    randomise_chain(model)
    x = images()
    expected = model(x)
    tuned.save_pretrained(tmp_path)
    saved = load_file(str(tmp_path / WEIGHTS_FILE))
    assert set(saved) == set(model.restuning.state_dict())
    assert set(f"restuning.{k}" for k in saved) <= set(model.state_dict())
    assert json.loads((tmp_path / CONFIG_FILE).read_text()) == config.to_dict()

    loaded = ResTunedModel.from_pretrained(tiny_vit(), tmp_path)
    assert torch.equal(loaded(x), expected)
    fresh = tiny_vit()
    prepare_model(fresh, ResTuningConfig.from_dict(config.to_dict())).load_tuner(tmp_path)
    assert torch.equal(fresh(x), expected)

    other = prepare_model(tiny_vit(), vit_config(["res_adapter", {"res_prefix": {"n_tokens": 4}}], lam="learnable"))
    with pytest.raises(ValueError, match=r"restuning_config\.json differs .*tuner_cfg: saved"):
        other.load_tuner(tmp_path)

    target = prepare_model(tiny_vit(), config)
    save_file({k: v for k, v in saved.items() if k != "lam.logit"}, str(tmp_path / WEIGHTS_FILE))
    with pytest.raises(ValueError, match=r"restuning\.safetensors: missing keys \['lam\.logit'\]"):
        target.load_tuner(tmp_path)
    save_file({**saved, "lateral.0.up.weight": torch.zeros(64, 5)}, str(tmp_path / WEIGHTS_FILE))
    with pytest.raises(ValueError, match=r"restuning\.safetensors: lateral\.0\.up\.weight has shape \(64, 5\)"):
        target.load_tuner(tmp_path)
    save_file({**saved, "extra": torch.zeros(1)}, str(tmp_path / WEIGHTS_FILE))
    with pytest.raises(ValueError, match=r"unexpected keys \['extra'\]"):
        target.load_tuner(tmp_path)


def test_open_clip_image_tower():
    from vltune.clip import create_clip

    torch.manual_seed(0)
    clip = create_clip("vltune-tiny")
    reference = copy.deepcopy(clip).requires_grad_(False)
    config = ResTuningConfig(dims=64, root_modules=r"visual\.transformer\.resblocks\.0", root_modules_hook="input",
                             stem_modules=r"visual\.transformer\.resblocks\.\d+", stem_modules_hook="output",
                             target_modules=r"visual\.transformer", target_modules_hook="output",
                             tuner_cfg="res_adapter")
    tuned = prepare_model(clip, config)
    assert tuned.stem_names == ["visual.transformer.resblocks.0", "visual.transformer.resblocks.1"]
    x = images()
    with torch.no_grad():
        expected = reference.encode_image(x)
        torch.testing.assert_close(clip.encode_image(x), expected, rtol=0, atol=0)

    before = {n: p.detach().clone() for n, p in backbone_params(clip).items()}
    optimizer = torch.optim.SGD(chain_params(clip).values(), lr=0.5)
    loss = (clip.encode_image(x) * torch.randn(2, 64, generator=torch.Generator().manual_seed(2))).sum()
    loss.backward()
    optimizer.step()
    with torch.no_grad():
        assert not torch.allclose(clip.encode_image(x), expected)
    assert all(torch.equal(p, before[n]) and p.grad is None for n, p in backbone_params(clip).items())


def test_remove_restores_the_plain_model():
    model = tiny_vit()
    reference = copy.deepcopy(model)
    tuned = prepare_model(model, vit_config("res_prompt"))
    randomise_chain(model)
    x = images()
    with torch.no_grad():
        expected = reference(x)
        assert not torch.allclose(model(x), expected)
        assert tuned.remove() is model
        torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
    assert not hasattr(model, "restuning")
    assert set(model.state_dict()) == set(reference.state_dict())
    assert all(p.requires_grad for p in model.parameters())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
