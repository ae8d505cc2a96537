"""Res-Tuning's tuners and the bypass recurrence, as plain modules shared by the module-regex API
(``vltune.tuners.restuning``) and the CLIP trainers (``trainers/restuning.py``).

Jiang et al., *Res-Tuning: A Flexible and Efficient Tuning Paradigm via Unbinding Tuner from Backbone*, NeurIPS 2023
(https://arxiv.org/abs/2310.19859); methods.md §14. A tuner ``T`` maps tokens (..., L, D) to tokens of the same shape:

* ``ResAdapter``: ``s ⊙ (W₂ GELU(W₁ z + b₁) + b₂)`` (rank r), the last layer zero-initialised by default; ``s`` is
  swift's ``adapter_weight`` (none, a learnable scalar or per-channel scale, a token-averaged sigmoid gate, or a
  fixed scalar);
* ``ResPrefix``: attention of the queries ``z W_qᵀ + b_q`` of a frozen attention module over ``n`` trainable keys and
  values (the values start at 0), through the module's frozen output weight ``W_o`` (2nD parameters). There is no
  gate: the zero values alone make the branch start at exactly 0;
* ``ResPrompt``: the same with ``n`` trainable prompt tokens projected by the frozen ``W_k``, ``W_v``. By default the
  branch is multiplied by a per-channel gate that starts at 0 (nD + D), vltune's addition so that the branch starts
  at exactly 0; ``gate=False`` is the paper's ungated branch (nD), which is not 0 at init;
* ``Zero`` (constant 0) and ``nn.Identity``.

With ``residual=True`` a tuner returns ``z + T(z)`` (swift's convention). ``BypassChain`` runs a side network over
detached features ``r`` (root) and ``s_0..s_{N-1}`` (stems), with the recurrence

* ``identity`` (default): ``d_{i+1} = λ·H_i(s_i) + (1 − λ)·V_i(d_i)`` with non-residual zero-initialised tuners, so
  ``d`` is a correction: the result ``d_N`` is ADDED to the original value, and at step 0 the model is exactly the
  frozen one. The root enters only through block 0's vertical tuner, ``V_0(r)``; an identity vertical tuner passes
  the correction on unchanged, and in block 0 (where there is no correction yet: ``r`` is a feature) it starts the
  chain at ``d_0 = 0``. An identity lateral tuner (a feature added to the correction) and the ungated Res-Prompt are
  refused: neither is 0 at init;
* ``paper``: ``b_0 = r``, ``b_{i+1} = λ·T_lat(s_i) + (1 − λ)·T_vert(b_i)`` with residual tuners; ``b_N`` REPLACES
  the value (not identity at init);
* ``swift``: ``b_{i+1} = T_lat(s_i) + T_vert(b_i)`` with residual tuners, as ms-swift computes it; replaces too.

λ is a float or ``"learnable"`` (``sigmoid`` of a scalar initialised to 0, i.e. 0.5).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

TUNERS = ("res_adapter", "res_prefix", "res_prompt", "zero", "identity")
RECURRENCES = ("identity", "paper", "swift")
#: the options of each tuner's ``{name: {options}}`` spec (see ``build_tuner``)
TUNER_OPTIONS = {"res_adapter": ("adapter_length", "adapter_weight", "adapter_type"), "res_prefix": ("n_tokens",),
                 "res_prompt": ("n_tokens", "gate")}
#: swift's ``adapter_weight`` values; ``scalar_<float>`` is a fixed factor such as ``scalar_0.1``
ADAPTER_WEIGHTS = (None, "scale", "scale_channel", "gate", "scalar_<float>")


class FrozenAttention:
    """Read access to a frozen attention module's projections: ``nn.MultiheadAttention`` (open_clip, torch) or timm's
    ``Attention`` (``qkv``/``proj``, with its ``q_norm``/``k_norm``). Held as a plain object, so its weights are never
    a tuner's parameters. Tokens are batch-first (..., L, D), as in open_clip 3.x and timm."""

    def __init__(self, module: nn.Module) -> None:
        if isinstance(module, nn.MultiheadAttention):
            if not module._qkv_same_embed_dim:
                raise NotImplementedError("nn.MultiheadAttention with separate q/k/v projections is not supported")
            self.kind = "mha"
        elif hasattr(module, "qkv") and hasattr(module, "proj") and hasattr(module, "num_heads"):
            self.kind = "timm"
        else:
            raise TypeError(f"{type(module).__name__} is not an attention module with q/k/v and output projections "
                            "(nn.MultiheadAttention or timm Attention)")
        self.module = module
        self.num_heads = int(module.num_heads)

    def _qkv(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        m = self.module
        return (m.in_proj_weight, m.in_proj_bias) if self.kind == "mha" else (m.qkv.weight, m.qkv.bias)

    def project(self, x: torch.Tensor, which: int) -> torch.Tensor:
        """``x W_whichᵀ + b`` for which = 0 (q), 1 (k), 2 (v)."""
        weight, bias = self._qkv()
        d = weight.shape[1]
        b = None if bias is None else bias[which * d:(which + 1) * d].to(x.dtype)
        return F.linear(x, weight[which * d:(which + 1) * d].to(x.dtype), b)

    def out(self, x: torch.Tensor) -> torch.Tensor:
        """``x W_oᵀ`` without the bias: a parallel branch adds to an attention output that already holds it."""
        proj = self.module.out_proj if self.kind == "mha" else self.module.proj
        return F.linear(x, proj.weight.to(x.dtype))

    def attend(self, z: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Queries of ``z`` (..., L, D) over projected ``keys``/``values`` (n, D) per head, then the out projection."""
        h, d = self.num_heads, z.shape[-1]
        q = self.project(z, 0).unflatten(-1, (h, d // h)).transpose(-2, -3)  # (..., H, L, dh)
        k = keys.to(z.dtype).unflatten(-1, (h, d // h)).transpose(0, 1)  # (H, n, dh)
        if self.kind == "timm":  # per-head q/k norms (Identity unless the ViT has qk_norm)
            q, k = self.module.q_norm(q), self.module.k_norm(k)
        v = values.to(z.dtype).unflatten(-1, (h, d // h)).transpose(0, 1)
        o = F.scaled_dot_product_attention(q, k.expand(*q.shape[:-2], -1, -1), v.expand(*q.shape[:-2], -1, -1))
        return self.out(o.transpose(-2, -3).flatten(-2))


def adapter_weight_kind(value: Any, where: str = "") -> tuple[str | None, float | None]:
    """Parse swift's ``adapter_weight``: ``(kind, factor)`` with kind in None, ``scale``, ``scale_channel``, ``gate``,
    ``scalar`` (factor: the fixed float of ``scalar_<float>``). Raises ValueError naming ``where`` otherwise.

    swift's ``scale_kv``/``scale_kv_channel`` are refused: swift builds their parameters as a plain tuple (never
    registered, so never saved or trained) and never applies them, i.e. they compute exactly ``adapter_weight=None``.
    """
    if value is None or value in ("scale", "scale_channel", "gate"):
        return value, None
    if value in ("scale_kv", "scale_kv_channel"):
        raise ValueError(f"{where}: adapter_weight={value!r} is refused: in ms-swift it creates unregistered "
                         "parameters that are never trained, saved or applied, so it computes exactly "
                         "adapter_weight=None; use None for that, or 'scale'/'scale_channel' for a learnable scale")
    if isinstance(value, str) and value.startswith("scalar_"):
        try:
            factor = float(value[len("scalar_"):])
        except ValueError:
            factor = math.nan
        if math.isfinite(factor):
            return "scalar", factor
    raise ValueError(f"{where}: adapter_weight={value!r} is not one of None, 'scale', 'scale_channel', 'gate', "
                     "'scalar_<float>' (e.g. 'scalar_0.1')")


def adapter_rank(length: Any, dim: int, index: int = 0, depth: int | None = None, where: str = "") -> int:
    """The bottleneck width that swift's ``adapter_length`` gives block ``index`` of a bypass with ``depth`` blocks.

    ``length`` is an int, a list with one int or tuple per block (indexed by the block, as swift does), or an
    ``(in, hidden, out)`` tuple. On tokens the adapter's output is added to its input, so a tuple needs in = out =
    ``dim`` and is then the same adapter as its hidden width. ``depth`` None (validation before the stems are known)
    checks every list entry and skips the length check. Raises ValueError naming ``where``.
    """
    if isinstance(length, list):
        if not length or (depth is not None and len(length) != depth):
            raise ValueError(f"{where}: adapter_length lists {len(length)} widths but the bypass has "
                             f"{depth if depth is not None else 'at least one'} blocks; give one per block (or one "
                             "int for all)")
        if any(isinstance(item, list) for item in length):
            raise ValueError(f"{where}: a per-block adapter_length list holds ints or (in, hidden, out) tuples, got "
                             f"{length!r}")
        ranks = [adapter_rank(item, dim, where=f"{where} adapter_length[{i}]") for i, item in enumerate(length)]
        return ranks[index if depth is not None else 0]
    if isinstance(length, tuple):
        if len(length) != 3 or not all(isinstance(v, int) and not isinstance(v, bool) for v in length):
            raise ValueError(f"{where}: an adapter_length tuple is (in, hidden, out) with three ints, got {length!r}")
        if length[0] != dim or length[2] != dim:
            raise ValueError(f"{where}: adapter_length={length!r} needs in = out = {dim} (the block's dims): on "
                             f"tokens the adapter's output is added to its input; use ({dim}, hidden, {dim}) or the "
                             "int hidden")
        length = length[1]
    if isinstance(length, bool) or not isinstance(length, int) or length < 1:
        raise ValueError(f"{where}: adapter_length must be an int >= 1, a per-block list or an (in, hidden, out) "
                         f"tuple, got {length!r}")
    return length


class ResAdapter(nn.Module):
    """Bottleneck ``a = W₂ GELU(W₁ z + b₁) + b₂`` times swift's ``adapter_weight`` ``s`` (``z +`` that with
    ``residual``); ``zero_init`` zeroes W₂ and b₂.

    ``weight``: None (s = 1); ``scale`` (a learnable scalar, 1 at init); ``scale_channel`` (learnable, (D,), ones);
    ``gate`` (``s = mean over tokens of sigmoid(Linear(D, 1)(a))``, one value per sample; the mean runs over axis
    ``token_dim``, which is swift's ``dim=1`` for batch-first tokens, and a 2-D ``(N, D)`` input is one token per row);
    ``scalar_<float>`` (a fixed factor). The weight's parameters are created after W₁, W₂ are initialised, in swift's
    order, so a seeded model draws the same numbers as swift.
    """

    def __init__(self, dim: int, rank: int, residual: bool = False, zero_init: bool = True,
                 weight: str | None = None, token_dim: int = 1) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"res_adapter rank (adapter_length) must be >= 1, got {rank}")
        self.residual, self.token_dim = residual, token_dim
        self.kind, self.factor = adapter_weight_kind(weight, "res_adapter")
        self.down, self.up = nn.Linear(dim, rank), nn.Linear(rank, dim)
        nn.init.xavier_uniform_(self.down.weight)
        nn.init.normal_(self.down.bias, std=1e-6)
        if zero_init:
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)
        else:
            nn.init.xavier_uniform_(self.up.weight)
            nn.init.normal_(self.up.bias, std=1e-6)
        if self.kind == "gate":
            self.gate = nn.Linear(dim, 1)
        elif self.kind in ("scale", "scale_channel"):
            self.scale = nn.Parameter(torch.ones(1 if self.kind == "scale" else dim))

    def weighted(self, a: torch.Tensor) -> torch.Tensor:
        """``a`` times the adapter weight. Input and output: (..., L, D) tokens, or (N, D)."""
        if self.kind == "gate":
            g = torch.sigmoid(self.gate(a))
            if a.dim() <= 2:
                return a * g
            if not 0 <= self.token_dim < a.dim() - 1:
                raise ValueError(f"res_adapter gate: token_dim={self.token_dim} is not a token axis of its "
                                 f"{a.dim()}-D input {tuple(a.shape)} (the last axis holds the channels)")
            return a * g.mean(dim=self.token_dim, keepdim=True)
        if self.kind in ("scale", "scale_channel"):
            return a * self.scale
        if self.kind == "scalar":
            return a * self.factor
        return a

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        out = self.weighted(self.up(F.gelu(self.down(z.to(self.down.weight.dtype))))).to(z.dtype)
        return z + out if self.residual else out


class _ParallelAttention(nn.Module):
    """A parallel attention branch: the frozen queries of ``attn`` over ``keys_values()``, times ``scale()``."""

    def __init__(self, attn: FrozenAttention, residual: bool) -> None:
        super().__init__()
        self.attn, self.residual = attn, residual

    def keys_values(self) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def scale(self) -> torch.Tensor | float:
        return 1.0

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        k, v = self.keys_values()
        out = self.scale() * self.attn.attend(z, k, v)
        return z + out if self.residual else out


class ResPrefix(_ParallelAttention):
    """Res-Prefix (methods.md §14.5): ``softmax(Q K_preᵀ/√d_h) V_pre`` per head through the frozen ``W_o``, with the
    frozen queries of ``attn`` and trainable keys and values (n, D). No gate: the values start at 0, so the branch
    starts at exactly 0 while the values get a gradient at once (2nD parameters)."""

    def __init__(self, attn: FrozenAttention, dim: int, n_tokens: int, residual: bool = False) -> None:
        super().__init__(attn, residual)
        self.keys = nn.Parameter(torch.randn(n_tokens, dim) * 0.02)
        self.values = nn.Parameter(torch.zeros(n_tokens, dim))

    def keys_values(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.keys, self.values


class ResPrompt(_ParallelAttention):
    """Res-Prompt (methods.md §14.5): ``softmax(Q K_pᵀ/√d_h) V_p`` per head through the frozen ``W_o``, where
    ``K_p``, ``V_p`` are trainable prompt tokens P (n, D) after the block's ``norm`` (if any), projected by the frozen
    ``W_k``, ``W_v`` (with their biases).

    ``gate=True`` (default, vltune's addition, not in the paper): the branch is multiplied by a per-channel gate
    (D,) that starts at 0, so it starts at exactly 0 (nD + D parameters); nothing else can be zero-initialised, since
    ``V_p`` holds the frozen biases. ``gate=False`` is the paper's ungated branch (nD parameters), non-zero at init:
    the identity recurrence refuses it.
    """

    def __init__(self, attn: FrozenAttention, dim: int, n_tokens: int, norm: nn.Module | None = None,
                 residual: bool = False, gate: bool = True) -> None:
        super().__init__(attn, residual)
        self.prompts = nn.Parameter(torch.randn(n_tokens, dim) * 0.02)
        self.gate = nn.Parameter(torch.zeros(dim)) if gate else None
        self._norm = (norm,)  # the backbone's frozen module; a tuple keeps it out of this module's parameters

    def keys_values(self) -> tuple[torch.Tensor, torch.Tensor]:
        norm, p = self._norm[0], self.prompts
        weight = getattr(norm, "weight", None)
        if norm is not None:
            p = norm(p.to(weight.dtype) if weight is not None else p)
        return self.attn.project(p, 1), self.attn.project(p, 2)

    def scale(self) -> torch.Tensor | float:
        return 1.0 if self.gate is None else self.gate


class Zero(nn.Module):
    """A tuner that contributes nothing (swift's ``'zero'``)."""

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(z)


def build_tuner(spec: str | dict[str, Any] | None, dim: int, *, residual: bool, zero_init: bool,
                attn: FrozenAttention | None = None, norm: nn.Module | None = None, where: str = "",
                index: int = 0, depth: int | None = None, token_dim: int = 1) -> nn.Module:
    """A tuner from its spec: a name of ``TUNERS`` or ``{name: {options}}`` (None: identity).

    Options (``TUNER_OPTIONS``): ``res_adapter``: ``adapter_length`` (an int (default 32), a list with one per block,
    or an ``(in, hidden, out)`` tuple; see ``adapter_rank``), ``adapter_weight`` (``ADAPTER_WEIGHTS``; see
    ``ResAdapter``), ``adapter_type`` (read but never used by swift; accepted for its configs, no effect);
    ``res_prefix``: ``n_tokens`` (default 10); ``res_prompt``: ``n_tokens``, ``gate`` (default True).
    ``attn``/``norm``: the frozen attention module (and the norm before it) the attention tuners use; ``index`` and
    ``depth``: this block's index and the number of blocks (per-block ``adapter_length`` lists); ``token_dim``: the
    token axis of the inputs (the ``gate`` weight averages over it).
    """
    if spec is None:
        return nn.Identity()
    if isinstance(spec, dict):
        if len(spec) != 1:
            raise ValueError(f"{where}: a tuner spec dict holds exactly one tuner name, got {list(spec)}")
        name, options = next(iter(spec.items()))
        options = dict(options or {})
    else:
        name, options = str(spec), {}
    if name not in TUNERS:
        raise ValueError(f"{where}: unknown tuner {name!r}; choose from {', '.join(TUNERS)}")
    allowed = TUNER_OPTIONS.get(name, ())
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"{where}: {name} does not take {unknown}; it takes {sorted(allowed) or 'no options'}")
    if name == "zero":
        return Zero()
    if name == "identity":
        return nn.Identity()
    if name == "res_adapter":
        rank = adapter_rank(options.get("adapter_length", 32), dim, index, depth, where)
        adapter_weight_kind(options.get("adapter_weight"), where)
        return ResAdapter(dim, rank, residual=residual, zero_init=zero_init, weight=options.get("adapter_weight"),
                          token_dim=token_dim)
    if attn is None:
        raise ValueError(f"{where}: {name} needs the block's attention module (q/k/v and output projections)")
    n = int(options.get("n_tokens", 10))
    if name == "res_prefix":
        return ResPrefix(attn, dim, n, residual=residual)
    gate = options.get("gate", True)
    if not isinstance(gate, bool):
        raise ValueError(f"{where}: res_prompt gate must be True or False, got {gate!r}")
    return ResPrompt(attn, dim, n, norm=norm, residual=residual, gate=gate)


def identity_problem(spec: Any, position: str) -> str | None:
    """Why ``spec`` cannot serve as the ``position`` (``lateral``/``vertical``) tuner of the identity recurrence
    (None: it can). Every accepted tuner is exactly 0 at init there, or passes the chain's correction on."""
    if isinstance(spec, Mapping):
        name, options = next(iter(spec.items()))
    else:
        name, options = (None if spec is None else str(spec)), None
    if position == "lateral" and name in (None, "identity"):
        return ("an identity (or missing) lateral tuner adds block i's own feature to the correction that the "
                "identity recurrence adds to the frozen output, so the model would not start at the frozen one")
    if name == "res_prompt" and (options or {}).get("gate", True) is False:
        return ("the ungated res_prompt (gate False, the paper's form) is not 0 at init (its values are the frozen "
                "W_v and bias applied to the prompts), so the model would not start at the frozen one")
    return None


class Lambda(nn.Module):
    """λ of the recurrence: a fixed float, or ``learnable`` (sigmoid of a scalar, 0.5 at init)."""

    def __init__(self, value: float | str) -> None:
        super().__init__()
        if value == "learnable":
            self.logit = nn.Parameter(torch.zeros(()))
            self.fixed = None
        else:
            value = float(value)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"λ must be in [0, 1] or 'learnable', got {value}")
            self.logit, self.fixed = None, value

    def forward(self) -> torch.Tensor | float:
        return self.fixed if self.logit is None else torch.sigmoid(self.logit)


class BypassChain(nn.Module):
    """The side network: ``forward(root, stems) -> value`` (see the module docstring for the recurrences).

    Args:
        lateral, vertical: N tuners each (``H_i``/``T_lat`` on stem i, ``V_i``/``T_vert`` on the chain state).
        aux: N modules applied to each new state (identity unless given).
        recurrence: ``identity`` | ``paper`` | ``swift``.
        lam: λ (unused by ``swift``).
    """

    def __init__(self, lateral: list[nn.Module], vertical: list[nn.Module], aux: list[nn.Module] | None = None,
                 recurrence: str = "identity", lam: float | str = 0.5) -> None:
        super().__init__()
        if recurrence not in RECURRENCES:
            raise ValueError(f"recurrence {recurrence!r}: choose from {', '.join(RECURRENCES)}")
        if len(lateral) != len(vertical) or not lateral:
            raise ValueError(f"a bypass needs one lateral and one vertical tuner per stem, got {len(lateral)} and "
                             f"{len(vertical)}")
        self.lateral, self.vertical = nn.ModuleList(lateral), nn.ModuleList(vertical)
        self.aux = nn.ModuleList(aux or [nn.Identity() for _ in lateral])
        self.recurrence = recurrence
        self.lam = Lambda(lam)
        if recurrence == "identity":  # the configs refuse these by key first; this guards direct construction
            for i, (lat, vert) in enumerate(zip(self.lateral, self.vertical)):
                if isinstance(lat, nn.Identity) or any(isinstance(t, ResPrompt) and t.gate is None
                                                       for t in (lat, vert)):
                    raise ValueError(f"bypass block {i}: the identity recurrence needs tuners that are 0 at init "
                                     "(not an identity lateral tuner nor an ungated res_prompt); use recurrence "
                                     "'paper' or 'swift' for those")

    @property
    def adds(self) -> bool:
        """True: the output is added to the original value (identity at init); False: it replaces it."""
        return self.recurrence == "identity"

    def forward(self, root: torch.Tensor, stems: list[torch.Tensor]) -> torch.Tensor:
        if len(stems) != len(self.lateral):
            raise ValueError(f"the bypass has {len(self.lateral)} blocks but got {len(stems)} stem features")
        state = root.detach()
        if self.recurrence == "identity" and isinstance(self.vertical[0], nn.Identity):
            state = torch.zeros_like(state)  # the root is a feature, not a correction: nothing to pass on yet
        lam = self.lam()
        for lat, vert, aux, s in zip(self.lateral, self.vertical, self.aux, stems):
            s = s.detach()
            if self.recurrence == "swift":
                state = aux(lat(s) + vert(state))
            else:
                state = aux(lam * lat(s) + (1 - lam) * vert(state))
        return state


def count_line(model: nn.Module) -> str:
    """``trainable params: T || all params: A || trainable%: P`` (swift's format)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    share = 100 * trainable / max(total, 1)
    return f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {share:.4f}"


__all__ = ["TUNERS", "RECURRENCES", "TUNER_OPTIONS", "ADAPTER_WEIGHTS", "FrozenAttention", "ResAdapter", "ResPrefix",
           "ResPrompt", "Zero", "adapter_weight_kind", "adapter_rank", "build_tuner", "identity_problem", "Lambda",
           "BypassChain", "count_line"]
