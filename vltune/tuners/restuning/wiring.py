"""How a ``ResTuningConfig`` meets a concrete model; ``prepare_model`` and the hooks of ``ResTunedModel`` call these.

* ``resolve``: the module names a pattern (or list) selects, with the candidates named when it selects nothing;
* ``build_chain``: the bypass chain for the resolved stems (Res-Prefix/Res-Prompt borrow each stem's frozen
  attention and pre-norm);
* ``probe_tensor``, ``patch_item``, ``signature_index``: what a hook reads from a module's input or output and where
  ``target_hidden_pos`` points inside it.

None of them holds per-forward state, which stays on ``ResTunedModel`` (``model``).
"""

from __future__ import annotations

import copy
import difflib
import inspect
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from vltune.tuners.res_tuners import BypassChain, FrozenAttention, build_tuner
from vltune.tuners.restuning.config import ResTuningConfig
from vltune.tuners.restuning.spec import block_specs, compile_pattern, spec_name

_ATTENTION_TUNERS = ("res_prefix", "res_prompt")


def _no_match_message(field: str, pattern: str, names: list[str]) -> str:
    plain = re.sub(r"[\\^$.*+?()\[\]{}|]+", ".", pattern).strip(".")
    close = difflib.get_close_matches(pattern, names, n=5, cutoff=0.5) or difflib.get_close_matches(plain, names, n=5)
    partial = [n for n in names if re.search(pattern, n)][:5]
    sample = names[:8]
    hints = [f"close matches: {close}" if close else "", f"names containing a match (the pattern must match the "
             f"whole name): {partial}" if partial else "", f"first module names: {sample}"]
    return f"{field}={pattern!r} matches no module name (re.fullmatch); " + "; ".join(h for h in hints if h)


def resolve(model: nn.Module, pattern: str | Sequence[str], field: str) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` pairs a regex fullmatches (model order) or a list names (list order), containers rejected."""
    modules = {name: m for name, m in model.named_modules() if name}
    names = list(modules)
    if isinstance(pattern, str):
        regex = compile_pattern(pattern, field)
        found = [n for n in names if regex.fullmatch(n)]
        if not found:
            raise ValueError(_no_match_message(field, pattern, names))
    else:
        unknown = [n for n in pattern if n not in modules]
        if unknown:
            close = {n: difflib.get_close_matches(n, names, n=3) for n in unknown}
            raise ValueError(f"{field} names modules the model does not have: {unknown}; close matches: {close}")
        found = list(pattern)
    for name in found:
        if isinstance(modules[name], (nn.ModuleList, nn.ModuleDict)):
            raise ValueError(f"{field} selects {name!r}, a {type(modules[name]).__name__} (a container without a "
                             f"forward, so no hook ever fires); select its elements, e.g. {name}.0")
    return [(n, modules[n]) for n in found]


def _stem_attention(stem: nn.Module, stem_name: str, dim: int, where: str) -> tuple[FrozenAttention, nn.Module | None]:
    """Block i's frozen attention (the stem's ``attn``) and its pre-norm (``norm1``/``ln_1``) for prefix/prompt."""
    attn = getattr(stem, "attn", None)
    if not isinstance(attn, nn.Module):
        raise ValueError(f"{where}: res_prefix/res_prompt use the block's attention, but stem {stem_name!r} "
                         f"({type(stem).__name__}) has no 'attn' submodule; select transformer blocks as stems")
    try:
        frozen = FrozenAttention(attn)
    except (TypeError, NotImplementedError) as err:
        raise ValueError(f"{where}: {stem_name}.attn cannot drive res_prefix/res_prompt: {err}") from None
    width = attn.embed_dim if isinstance(attn, nn.MultiheadAttention) else attn.qkv.in_features
    if width != dim:
        raise ValueError(f"{where}: dims={dim} but {stem_name}.attn has width {width}")
    norm = getattr(stem, "norm1", None)
    norm = norm if isinstance(norm, nn.Module) else getattr(stem, "ln_1", None)
    if not isinstance(norm, nn.Module) or isinstance(norm, nn.Identity):
        return frozen, None
    if not isinstance(getattr(norm, "weight", None), torch.Tensor):
        raise ValueError(f"{where}: the norm before {stem_name}.attn ({type(norm).__name__}) has no weight tensor; "
                         "res_prompt needs an affine norm or none")
    return frozen, norm


def build_chain(config: ResTuningConfig, stems: list[tuple[str, nn.Module]]) -> BypassChain:
    """The bypass chain with one lateral and one vertical tuner per stem, built with that block's dims."""
    n = len(stems)
    dims = list(config.dims) if isinstance(config.dims, (list, tuple)) else [config.dims] * n
    if len(dims) != n:
        raise ValueError(f"dims lists {len(dims)} widths but stem_modules selects {n} stems "
                         f"({[name for name, _ in stems]})")
    identity = config.recurrence == "identity"
    lateral, vertical = [], []
    for i, (block, (stem_name, stem)) in enumerate(zip(block_specs(config.tuner_cfg, n), stems)):
        zero_init = identity or (config.zero_init_last and i == n - 1)
        built = []
        for key in ("lateral_cfg", "vertical_cfg"):
            where = f"tuner_cfg block {i} ({stem_name}) {key}"
            attn = norm = None
            if spec_name(block[key]) in _ATTENTION_TUNERS:
                attn, norm = _stem_attention(stem, stem_name, dims[i], where)
            built.append(build_tuner(block[key], dims[i], residual=not identity, zero_init=zero_init, attn=attn,
                                     norm=norm, where=where, index=i, depth=n, token_dim=config.token_dim))
        lateral.append(built[0])
        vertical.append(built[1])
    return BypassChain(lateral, vertical, recurrence=config.recurrence, lam=config.lam)


def probe_tensor(value: Any, what: str) -> torch.Tensor:
    """The tensor a root/stem probe reads: the value itself, or the first element of a tuple/list."""
    if isinstance(value, (tuple, list)) and value:
        value = value[0]
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{what} is a {type(value).__name__}, not a tensor (or a tuple/list starting with one)")
    return value


def patch_item(container: Any, pos: int | str, patch: Callable[[Any], Any], what: str) -> Any:
    """A copy of a tuple/list/dict output whose item at ``pos`` is replaced by ``patch(item)``."""
    if isinstance(container, (tuple, list)):
        if isinstance(pos, bool) or not isinstance(pos, int) or not -len(container) <= pos < len(container):
            raise IndexError(f"{what}: target_hidden_pos={pos!r} is not an index of its {len(container)}-item "
                             f"{type(container).__name__} output")
        items = list(container)
        items[pos] = patch(items[pos])
        if isinstance(container, list):
            return items
        if hasattr(container, "_fields"):
            return type(container)(*items)
        return tuple(items) if type(container) is tuple else type(container)(items)
    if isinstance(container, Mapping):
        if pos not in container:
            raise KeyError(f"{what}: target_hidden_pos={pos!r} is not a key of its output (keys: {list(container)})")
        patched = copy.copy(container)
        patched[pos] = patch(container[pos])
        return patched
    raise TypeError(f"{what}: cannot patch an output of type {type(container).__name__}; the output hook handles a "
                    "tensor, or a tuple/list/dict holding one at target_hidden_pos")


def signature_index(module: nn.Module, pos: int | str) -> int | None:
    """The positional index of keyword ``pos`` in ``module.forward`` (None if not positional or unknown)."""
    if not isinstance(pos, str):
        return None
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return positional.index(pos) if pos in positional else None
