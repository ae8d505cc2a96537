"""The generic Res-Tuning API (``vltune.tuners.restuning``): swift's snippet on timm's ViT-B/16, identity at init,
the gradient cut, config errors, tuner_cfg forms and recurrences, swift's res_adapter forms (adapter_weight,
adapter_length) against swift's formulas, swift's 4-D-only fields, strict save/load, an open_clip image tower, removal.
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

from vltune.tuners.res_tuners import BypassChain, ResAdapter, ResPrefix, ResPrompt, Zero, build_tuner
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
    with pytest.raises(ValueError, match=r"unknown ResTuningConfig fields \['use_dora'\]"):
        ResTuningConfig.from_dict({**config.to_dict(), "use_dora": True})


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


# ---- swift's res_adapter forms (methods.md §14.2, restuning_components.py) -------------------------------------
def swift_adapter(adapter: ResAdapter, z: torch.Tensor, weight: str | None) -> torch.Tensor:
    """swift's ResAdapter on batch-first tokens, written out from its formulas with ``adapter``'s parameters:
    ``z + s ⊙ (W₂ GELU(W₁ z + b₁) + b₂)``; the gate is the mean over dim 1 of sigmoid(gate(a)), viewed (B, 1, 1)."""
    a = F.linear(F.gelu(F.linear(z, adapter.down.weight, adapter.down.bias)), adapter.up.weight, adapter.up.bias)
    if weight == "gate":
        a = a * torch.sigmoid(F.linear(a, adapter.gate.weight, adapter.gate.bias)).mean(dim=1).view(-1, 1, 1)
    elif weight in ("scale", "scale_channel"):
        a = a * adapter.scale
    elif weight is not None:
        a = a * float(weight.split("_")[-1])
    return z + a


WEIGHT_PARAMS = {None: 0, "scale": 1, "scale_channel": 64, "gate": 64 + 1, "scalar_0.25": 0}


@pytest.mark.parametrize("weight", list(WEIGHT_PARAMS))
def test_adapter_weight_forms_compute_swifts_formulas(weight):
    model = tiny_vit()
    tuned = prepare_model(model, vit_config({"res_adapter": {"adapter_weight": weight, "adapter_length": 8}},
                                            recurrence="swift"))
    chain = model.restuning
    per_adapter = 2 * 64 * 8 + 8 + 64 + WEIGHT_PARAMS[weight]
    assert sum(p.numel() for p in chain.parameters()) == 2 * 2 * per_adapter
    randomise_chain(model)  # non-trivial scales and gate
    generator = torch.Generator().manual_seed(5)
    root, stems = (torch.randn(3, 17, 64, generator=generator) for _ in range(2))
    stems = [stems, torch.randn(3, 17, 64, generator=generator)]
    expected = root
    for lat, vert, s in zip(chain.lateral, chain.vertical, stems):  # swift: b_{i+1} = T_lat(s_i) + T_vert(b_i)
        expected = swift_adapter(lat, s, weight) + swift_adapter(vert, expected, weight)
    torch.testing.assert_close(chain(root, stems), expected, rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        assert torch.isfinite(tuned(images())).all()


def test_gate_averages_over_the_token_axis():
    torch.manual_seed(0)
    adapter = ResAdapter(64, 8, residual=False, zero_init=False, weight="gate")
    tokens = torch.randn(2, 5, 64)  # (N, L, D)
    with torch.no_grad():
        a = adapter.up(F.gelu(adapter.down(tokens)))
        gate = torch.sigmoid(adapter.gate(a))  # (N, L, 1)
        expected = a * gate.mean(dim=1, keepdim=True)  # one gate per sample, averaged over its tokens
        assert not torch.allclose(expected, a * gate.mean(dim=0, keepdim=True))  # (averaging over the batch)
        torch.testing.assert_close(adapter(tokens), expected)
        torch.testing.assert_close(adapter(tokens), swift_adapter(adapter, tokens, "gate") - tokens)  # swift's dim=1
        adapter.token_dim = 0  # sequence-first (L, N, D) tokens: still averaged over the tokens, not the batch
        lnd = tokens.transpose(0, 1)
        torch.testing.assert_close(adapter(lnd).transpose(0, 1), expected)
        assert not torch.allclose(adapter(lnd), swift_adapter(adapter, lnd, "gate") - lnd)  # swift's dim=1 = batch
        torch.testing.assert_close(adapter(tokens[:, 0]), a[:, 0] * gate[:, 0])  # (N, D): one token per row


def test_token_dim_reaches_the_gate_and_is_validated():
    model = tiny_vit()
    prepare_model(model, vit_config({"res_adapter": {"adapter_weight": "gate"}}, token_dim=0))
    assert all(t.token_dim == 0 for t in model.restuning.lateral)
    with pytest.raises(ValueError, match="token_dim must be the token axis"):
        vit_config(token_dim=-1)
    adapter = ResAdapter(64, 4, zero_init=False, weight="gate", token_dim=2)
    with pytest.raises(ValueError, match="token_dim=2 is not a token axis"):
        adapter(torch.randn(2, 5, 64))


def test_adapter_parameters_are_drawn_in_swifts_order():
    torch.manual_seed(7)
    adapter = ResAdapter(64, 8, residual=True, zero_init=False, weight="gate")
    torch.manual_seed(7)  # swift: ln1, ln2 built, then xavier/normal(1e-6) on each, then the gate Linear(D, 1)
    ln1, ln2 = nn.Linear(64, 8), nn.Linear(8, 64)
    for layer in (ln1, ln2):
        nn.init.xavier_uniform_(layer.weight)
        nn.init.normal_(layer.bias, std=1e-6)
    gate = nn.Linear(64, 1)
    mine = [adapter.down.weight, adapter.down.bias, adapter.up.weight, adapter.up.bias, adapter.gate.weight,
            adapter.gate.bias]
    for a, b in zip(mine, [ln1.weight, ln1.bias, ln2.weight, ln2.bias, gate.weight, gate.bias]):
        assert torch.equal(a, b)


@pytest.mark.parametrize(("weight", "message"), [
    ("scale_kv", r"adapter_weight='scale_kv' is refused: in ms-swift .*never .*applied.*adapter_weight=None"),
    ("scale_kv_channel", r"adapter_weight='scale_kv_channel' is refused"),
    ("scalar_x", r"adapter_weight='scalar_x' is not one of None, 'scale', 'scale_channel', 'gate', 'scalar_<float>'"),
    ("channel", r"adapter_weight='channel' is not one of"),
])
def test_unsupported_adapter_weights_are_refused_by_name(weight, message):
    with pytest.raises(ValueError, match=rf"tuner_cfg lateral_cfg: {message}"):
        vit_config({"res_adapter": {"adapter_weight": weight}})


def test_adapter_length_forms():
    def ranks(model):
        return [t.down.out_features for t in model.restuning.lateral], [t.down.out_features
                                                                         for t in model.restuning.vertical]

    model = tiny_vit()
    prepare_model(model, vit_config({"res_adapter": {"adapter_length": 4}}))
    assert ranks(model) == ([4, 4], [4, 4])
    model = tiny_vit()
    prepare_model(model, vit_config({"res_adapter": {"adapter_length": [4, 8]}}))  # indexed by block, as swift
    assert ranks(model) == ([4, 8], [4, 8])
    assert sum(p.numel() for p in model.restuning.parameters()) == 2 * sum(2 * 64 * r + r + 64 for r in (4, 8))

    config = vit_config({"lateral_cfg": {"res_adapter": {"adapter_length": (64, 4, 64)}},
                         "vertical_cfg": {"res_adapter": {"adapter_length": [(64, 2, 64), 6]}}})
    assert config.tuner_cfg["lateral_cfg"]["res_adapter"]["adapter_length"] == 4  # stored as its hidden width
    assert config.tuner_cfg["vertical_cfg"]["res_adapter"]["adapter_length"] == [2, 6]
    assert ResTuningConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    model = tiny_vit()
    prepare_model(model, config)
    assert ranks(model) == ([4, 4], [2, 6])

    with pytest.raises(ValueError, match=r"adapter_length lists 3 widths but the bypass has 2 blocks"):
        prepare_model(tiny_vit(), vit_config({"res_adapter": {"adapter_length": [4, 8, 16]}}))
    with pytest.raises(ValueError, match=r"adapter_length=\(32, 4, 64\) needs in = out = 64 .*added to its input"):
        vit_config({"res_adapter": {"adapter_length": (32, 4, 64)}})
    with pytest.raises(ValueError, match=r"an adapter_length tuple is \(in, hidden, out\) with three ints"):
        vit_config({"res_adapter": {"adapter_length": (64, 4)}})
    with pytest.raises(ValueError, match=r"adapter_length must be an int >= 1.*got 0"):
        vit_config({"res_adapter": {"adapter_length": 0}})
    with pytest.raises(ValueError, match=r"adapter_length=\(32, 4, 32\) needs in = out = 64"):
        vit_config(["res_adapter", {"res_adapter": {"adapter_length": (32, 4, 32)}}], dims=[32, 64])


def test_adapter_type_is_accepted_without_effect():
    torch.manual_seed(0)
    plain = build_tuner("res_adapter", 64, residual=True, zero_init=False)
    torch.manual_seed(0)
    typed = build_tuner({"res_adapter": {"adapter_type": "parallel"}}, 64, residual=True, zero_init=False)
    z = torch.randn(2, 5, 64)
    assert torch.equal(plain(z), typed(z))


def test_swift_feature_map_fields_fail_with_a_clear_error():
    config = vit_config(use_bypass=True, use_upsample=False, upsample_out_channels=None)  # swift's defaults
    assert config.to_dict()["use_bypass"] is True
    with pytest.raises(ValueError, match=r"use_upsample=True: .*4-D \(B, C, H, W\) feature maps.*leave use_upsample"):
        vit_config(use_upsample=True)
    with pytest.raises(ValueError, match=r"upsample_out_channels=\[64, 64\]: .*4-D \(B, C, H, W\) feature maps only"):
        vit_config(upsample_out_channels=[64, 64])
    with pytest.raises(ValueError, match=r"use_bypass=False: swift never reads this field"):
        vit_config(use_bypass=False)


def test_ungated_res_prompt_needs_a_replacing_recurrence():
    with pytest.raises(ValueError, match=r"tuner_cfg vertical_cfg=.*'gate': False.* refused with "
                                         r"recurrence='identity': the ungated res_prompt"):
        vit_config({"lateral_cfg": "res_adapter", "vertical_cfg": {"res_prompt": {"gate": False}}})
    with pytest.raises(ValueError, match=r"res_prompt gate must be True .*or False .*got 'no'"):
        vit_config({"res_prompt": {"gate": "no"}}, recurrence="paper")
    model = tiny_vit()
    prepare_model(model, vit_config({"res_prompt": {"gate": False, "n_tokens": 3}}, recurrence="paper"))
    assert all(t.gate is None for t in model.restuning.lateral)
    assert sum(p.numel() for p in model.restuning.parameters()) == 2 * 2 * 3 * 64  # nD per tuner, no gate


def test_identity_chain_guards_direct_construction():
    with pytest.raises(ValueError, match=r"bypass block 0: the identity recurrence needs tuners that are 0 at init"):
        BypassChain([nn.Identity()], [Zero()])
    chain = BypassChain([Zero()], [nn.Identity()])  # an identity vertical tuner never passes the root on
    root = torch.randn(2, 3, 8)
    assert torch.equal(chain(root, [torch.randn(2, 3, 8)]), torch.zeros_like(root))
    swift = BypassChain([Zero()], [nn.Identity()], recurrence="swift")  # swift's b_0 = root, passed on unchanged
    assert torch.equal(swift(root, [torch.randn(2, 3, 8)]), root)
