"""Res-Tuning's tuners and the bypass recurrence, as plain modules shared by the module-regex API
(``vltune.tuners.restuning``) and the CLIP trainers (``trainers/restuning.py``).

Jiang et al., *Res-Tuning: A Flexible and Efficient Tuning Paradigm via Unbinding Tuner from Backbone*, NeurIPS 2023
(https://arxiv.org/abs/2310.19859); methods.md §14. A tuner ``T`` maps tokens (..., L, D) to tokens of the same shape:

* ``ResAdapter``: ``W₂ GELU(W₁ z + b₁) + b₂`` (rank r), the last layer zero-initialised by default;
* ``ResPrefix``: attention of the queries ``z W_qᵀ + b_q`` of a frozen attention module over ``n`` trainable keys and
  values (the values start at 0), through the module's frozen output weight ``W_o`` (2nD parameters);
* ``ResPrompt``: the same with ``n`` trainable prompt tokens projected by the frozen ``W_k``, ``W_v``, times a
  per-channel gate that starts at 0 (nD + D);
* ``Zero`` (constant 0) and ``nn.Identity``.

With ``residual=True`` a tuner returns ``z + T(z)`` (swift's convention). ``BypassChain`` runs a side network over
detached features ``r`` (root) and ``s_0..s_{N-1}`` (stems), with the recurrence

* ``identity`` (default): ``d_0 = r``, ``d_{i+1} = λ·H_i(s_i) + (1 − λ)·V_i(d_i)`` with non-residual zero-initialised
  tuners; the result ``d_N`` is ADDED to the original value, so at step 0 the model is exactly the frozen one;
* ``paper``: ``b_0 = r``, ``b_{i+1} = λ·T_lat(s_i) + (1 − λ)·T_vert(b_i)`` with residual tuners; ``b_N`` REPLACES
  the value (not identity at init);
* ``swift``: ``b_{i+1} = T_lat(s_i) + T_vert(b_i)`` with residual tuners, as ms-swift computes it; replaces too.

λ is a float or ``"learnable"`` (``sigmoid`` of a scalar initialised to 0, i.e. 0.5).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

TUNERS = ("res_adapter", "res_prefix", "res_prompt", "zero", "identity")
RECURRENCES = ("identity", "paper", "swift")


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


class ResAdapter(nn.Module):
    """Bottleneck ``W₂ GELU(W₁ z + b₁) + b₂`` (``z +`` that with ``residual``); ``zero_init`` zeroes W₂ and b₂."""

    def __init__(self, dim: int, rank: int, residual: bool = False, zero_init: bool = True) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"res_adapter rank (adapter_length) must be >= 1, got {rank}")
        self.residual = residual
        self.down, self.up = nn.Linear(dim, rank), nn.Linear(rank, dim)
        nn.init.xavier_uniform_(self.down.weight)
        nn.init.normal_(self.down.bias, std=1e-6)
        if zero_init:
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)
        else:
            nn.init.xavier_uniform_(self.up.weight)
            nn.init.normal_(self.up.bias, std=1e-6)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        out = self.up(F.gelu(self.down(z.to(self.down.weight.dtype)))).to(z.dtype)
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
    """Trainable keys and values (n, D) attended by the frozen queries of ``attn``; the values start at 0, so the
    branch starts at exactly 0 while the values get a gradient at once."""

    def __init__(self, attn: FrozenAttention, dim: int, n_tokens: int, residual: bool = False) -> None:
        super().__init__(attn, residual)
        self.keys = nn.Parameter(torch.randn(n_tokens, dim) * 0.02)
        self.values = nn.Parameter(torch.zeros(n_tokens, dim))

    def keys_values(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.keys, self.values


class ResPrompt(_ParallelAttention):
    """Trainable prompt tokens (n, D) projected by the frozen ``W_k``/``W_v`` (after the block's ``norm``, if any).
    The projections carry biases, so a per-channel gate that starts at 0 makes the branch start at exactly 0."""

    def __init__(self, attn: FrozenAttention, dim: int, n_tokens: int, norm: nn.Module | None = None,
                 residual: bool = False) -> None:
        super().__init__(attn, residual)
        self.prompts = nn.Parameter(torch.randn(n_tokens, dim) * 0.02)
        self.gate = nn.Parameter(torch.zeros(dim))
        self._norm = (norm,)  # the backbone's frozen module; a tuple keeps it out of this module's parameters

    def keys_values(self) -> tuple[torch.Tensor, torch.Tensor]:
        norm, p = self._norm[0], self.prompts
        weight = getattr(norm, "weight", None)
        if norm is not None:
            p = norm(p.to(weight.dtype) if weight is not None else p)
        return self.attn.project(p, 1), self.attn.project(p, 2)

    def scale(self) -> torch.Tensor:
        return self.gate


class Zero(nn.Module):
    """A tuner that contributes nothing (swift's ``'zero'``)."""

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(z)


def build_tuner(spec: str | dict[str, Any] | None, dim: int, *, residual: bool, zero_init: bool,
                attn: FrozenAttention | None = None, norm: nn.Module | None = None, where: str = "") -> nn.Module:
    """A tuner from its spec: a name of ``TUNERS`` or ``{name: {options}}`` (None: identity).

    Options: ``res_adapter``: ``adapter_length`` (rank, default 32); ``res_prefix``/``res_prompt``: ``n_tokens``
    (default 10). ``attn``/``norm``: the frozen attention module (and the norm before it) the attention tuners use.
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
    allowed = {"res_adapter": {"adapter_length"}, "res_prefix": {"n_tokens"},
               "res_prompt": {"n_tokens"}}.get(name, set())
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ValueError(f"{where}: {name} does not take {unknown}; it takes {sorted(allowed) or 'no options'}")
    if name == "zero":
        return Zero()
    if name == "identity":
        return nn.Identity()
    if name == "res_adapter":
        length = options.get("adapter_length", 32)
        return ResAdapter(dim, int(length), residual=residual, zero_init=zero_init)
    if attn is None:
        raise ValueError(f"{where}: {name} needs the block's attention module (q/k/v and output projections)")
    n = int(options.get("n_tokens", 10))
    if name == "res_prefix":
        return ResPrefix(attn, dim, n, residual=residual)
    return ResPrompt(attn, dim, n, norm=norm, residual=residual)


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

    @property
    def adds(self) -> bool:
        """True: the output is added to the original value (identity at init); False: it replaces it."""
        return self.recurrence == "identity"

    def forward(self, root: torch.Tensor, stems: list[torch.Tensor]) -> torch.Tensor:
        if len(stems) != len(self.lateral):
            raise ValueError(f"the bypass has {len(self.lateral)} blocks but got {len(stems)} stem features")
        state = root.detach()
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


__all__ = ["TUNERS", "RECURRENCES", "FrozenAttention", "ResAdapter", "ResPrefix", "ResPrompt", "Zero", "build_tuner",
           "Lambda", "BypassChain", "count_line"]
