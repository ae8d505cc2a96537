"""Res-Tuning-Bypass on any torch model, wired by module-name regexes: ``ResTuningConfig`` and ``prepare_model``.

A side network (``BypassChain`` of ``vltune.tuners.res_tuners``) runs on detached probes of a frozen model: the
*root* probe ``r`` (a module's first positional input or its output) and one *stem* probe ``s_i`` per selected module.
Its output is fed to every *target* module: with the default ``identity`` recurrence it is ADDED to the target's
input or output, and the prepared model equals the frozen one exactly at step 0 for every configuration the
recurrence accepts (tuners that are 0 at init; an identity or missing vertical tuner passes the correction on, and in
block 0 starts it at 0 instead of leaking the root); ``ResTuningConfig`` refuses, naming the key, the two that cannot
start there: an identity or missing lateral tuner and the ungated ``res_prompt``. With ``paper`` or ``swift`` the
output REPLACES that value, as ms-swift does (methods.md §14.3). Typical use::

    config = ResTuningConfig(dims=768, root_modules=r"blocks\\.0", stem_modules=r"blocks\\.\\d+",
                             target_modules=r"norm", tuner_cfg="res_adapter")
    tuned = prepare_model(model, config)   # patches ``model`` in place and returns a ResTunedModel around it
    tuned.save_pretrained("out/")          # restuning.safetensors + restuning_config.json
    tuned = ResTunedModel.from_pretrained(fresh_model, "out/")   # or prepare_model(...).load_tuner("out/")

Differences from swift's ``ResTuningConfig`` (methods.md §14.2, §14.6), and why:

* Hooks instead of replacing ``forward``: forward (pre-)hooks on the model's own modules capture the probes and
  patch the targets, so the original model object keeps working and ``remove()`` restores it exactly.
* The chain is a submodule of the model (``model.restuning``): it moves with ``.to()``, is in ``state_dict()``, and
  its parameters are the only trainable ones (``prepare_model`` freezes everything else).
* Patterns are anchored (``re.fullmatch``); a pattern matching nothing, an ambiguous root, containers without a
  ``forward`` and a ``tuner_cfg`` of the wrong length fail at preparation with the candidates named, instead of
  swift's ``IndexError``/``UnboundLocalError``/silent first match.
* The probe state of one forward lives on the ``ResTunedModel`` (no global or thread-local state) and is released as
  soon as every target has used it; a target that runs before the root and every stem were captured fails.
* Res-Prefix and Res-Prompt tuners use block i's frozen attention (the stem's ``attn`` submodule; Res-Prompt also the
  stem's ``norm1``/``ln_1``), which swift never implemented.
* Saving writes only the tuner weights (safetensors) and the config; loading is strict about keys, shapes and config.
* swift's ``res_adapter`` forms are accepted: ``adapter_weight`` None, ``scale``, ``scale_channel``, ``gate``,
  ``scalar_<float>`` (the gate averages over the token axis ``token_dim``, not swift's fixed ``dim=1``, which is the
  batch axis of sequence-first tokens), ``adapter_length`` as an int, a per-block list or an ``(in, hidden, out)``
  tuple (stored as its hidden width). ``scale_kv``/``scale_kv_channel`` (no-ops in swift), ``use_upsample``,
  ``upsample_out_channels`` (4-D feature maps only) and ``use_bypass=False`` (never read by swift) are refused by name.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import inspect
import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.hooks import RemovableHandle

from vltune.tuners.res_tuners import (
    RECURRENCES,
    TUNER_OPTIONS,
    TUNERS,
    BypassChain,
    FrozenAttention,
    adapter_rank,
    adapter_weight_kind,
    build_tuner,
    count_line,
    identity_problem,
)

SUBMODULE_NAME = "restuning"
WEIGHTS_FILE = "restuning.safetensors"
CONFIG_FILE = "restuning_config.json"

_BLOCK_KEYS = ("lateral_cfg", "vertical_cfg", "aux_cfg")
_ATTENTION_TUNERS = ("res_prefix", "res_prompt")
_HOOKS = {"root_modules_hook": ("input", "output"), "stem_modules_hook": ("output", "input"),
          "target_modules_hook": ("input", "output")}


@dataclass
class ResTuningConfig:
    """Where the bypass reads and writes, and which tuners it holds (field semantics follow swift, methods.md §14.2).

    Attributes:
        dims: width of each bypass block; an int for all, or one int per stem.
        root_modules: regex (fullmatch) selecting exactly one module whose probe is the chain's initial state.
        stem_modules: regex (every fullmatch, in ``named_modules()`` order) or a list of exact module names (in list
            order); the number of stems is the bypass depth N.
        target_modules: regex (every fullmatch) of the modules that receive the bypass output.
        tuner_cfg: a tuner name (lateral and vertical in every block), a block dict
            ``{'lateral_cfg': spec, 'vertical_cfg': spec, 'aux_cfg': spec}`` (a missing key is the identity), a
            single tuner spec ``{name: {options}}`` (lateral and vertical), or a list with one of these per stem.
            A spec is a name of ``TUNERS`` or ``{name: {options}}`` (see ``build_tuner``).
        root_modules_hook: ``input`` (the root's first positional input) or ``output``.
        stem_modules_hook: ``output`` or ``input`` (the stem's first positional input).
        target_modules_hook: ``input`` (patch an argument before the target runs) or ``output`` (patch its result).
        target_hidden_pos: input hook: positional index or keyword name of the patched argument; output hook: index or
            key inside a tuple/list/dict output (a plain tensor output is patched whole).
        zero_init_last: ``paper``/``swift`` only: zero-initialise the last block's tuners (swift's semantics); the
            ``identity`` recurrence always zero-initialises every tuner.
        recurrence: ``identity`` (output added, exactly the frozen model at init) | ``paper`` | ``swift`` (output
            replaces). ``identity`` refuses an identity or missing ``lateral_cfg`` and ``res_prompt`` with
            ``gate: False``: neither is 0 at init.
        lam: λ of the ``identity``/``paper`` recurrences, a float in [0, 1] or ``"learnable"``.
        token_dim: the token axis of the probed tensors: 1 for batch-first (N, L, D) tokens (timm, open_clip 3.x:
            swift's ``dim=1``), 0 for sequence-first (L, N, D) ones. Only the ``res_adapter`` gate reads it (it
            averages over the tokens); every other tuner acts on each token alone.
        use_upsample: swift's upsample aux tuner for 4-D (B, C, H, W) feature maps; only False is accepted.
        upsample_out_channels: swift's channel count for that upsample tuner; only None is accepted.
        use_bypass: never read by swift (its bypass always runs); only True is accepted.

    ``res_adapter`` options follow swift: ``adapter_length`` (int, per-block list, or an ``(in, hidden, out)`` tuple
    with in = out = dims, stored as its hidden width so that the JSON form is unambiguous), ``adapter_weight`` (None,
    ``scale``, ``scale_channel``, ``gate``, ``scalar_<float>``; ``scale_kv*`` are no-ops in swift and refused) and
    ``adapter_type`` (no effect, as in swift). ``res_prefix``: ``n_tokens``; ``res_prompt``: ``n_tokens``, ``gate``.
    """

    dims: int | list[int]
    root_modules: str
    stem_modules: str | list[str]
    target_modules: str
    tuner_cfg: str | dict[str, Any] | list[str | dict[str, Any]] | None
    root_modules_hook: str = "input"
    stem_modules_hook: str = "output"
    target_modules_hook: str = "input"
    target_hidden_pos: int | str = 0
    zero_init_last: bool = False
    recurrence: str = "identity"
    lam: float | str = 0.5
    token_dim: int = 1
    use_upsample: bool = False
    upsample_out_channels: int | list[int] | None = None
    use_bypass: bool = True

    def __post_init__(self) -> None:
        self.validate()
        self.tuner_cfg = _normalised(self.tuner_cfg)

    def validate(self) -> None:
        """Check every field that can be checked without the model; raises ValueError/TypeError naming the field."""
        dims = self.dims if isinstance(self.dims, (list, tuple)) else [self.dims]
        if not dims or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in dims):
            raise ValueError(f"dims must be a positive int or a non-empty list of positive ints, got {self.dims!r}")
        for name in ("root_modules", "target_modules"):
            _compile(getattr(self, name), name)
        if isinstance(self.stem_modules, str):
            _compile(self.stem_modules, "stem_modules")
        elif isinstance(self.stem_modules, (list, tuple)):
            if not self.stem_modules or not all(isinstance(s, str) and s for s in self.stem_modules):
                raise ValueError(f"stem_modules as a list must hold module names, got {self.stem_modules!r}")
            duplicates = sorted({s for s in self.stem_modules if list(self.stem_modules).count(s) > 1})
            if duplicates:
                raise ValueError(f"stem_modules lists {duplicates} more than once")
        else:
            raise TypeError(f"stem_modules must be a regex string or a list of module names, got "
                            f"{type(self.stem_modules).__name__}")
        for name, allowed in _HOOKS.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        pos = self.target_hidden_pos
        if isinstance(pos, bool) or not isinstance(pos, (int, str)):
            raise TypeError(f"target_hidden_pos must be an int or a str, got {pos!r}")
        if not isinstance(self.zero_init_last, bool):
            raise TypeError(f"zero_init_last must be a bool, got {self.zero_init_last!r}")
        if self.recurrence not in RECURRENCES:
            raise ValueError(f"recurrence must be one of {RECURRENCES}, got {self.recurrence!r}")
        if self.lam != "learnable":
            if isinstance(self.lam, bool) or not isinstance(self.lam, (int, float)) or not 0.0 <= self.lam <= 1.0:
                raise ValueError(f"lam must be a float in [0, 1] or 'learnable', got {self.lam!r}")
        if isinstance(self.token_dim, bool) or not isinstance(self.token_dim, int) or self.token_dim < 0:
            raise ValueError(f"token_dim must be the token axis of the probes, an int >= 0 (1 for (N, L, D), 0 for "
                             f"(L, N, D) tokens), got {self.token_dim!r}")
        self._validate_swift_fields()
        blocks = _block_specs(self.tuner_cfg, None)
        dims = list(self.dims) if isinstance(self.dims, (list, tuple)) else [self.dims]
        listed = isinstance(self.tuner_cfg, (list, tuple))
        for i, block in enumerate(blocks):
            # a block's options must fit its own width; a shared entry must fit every width in dims
            widths = [dims[i]] if listed and len(dims) > 1 and i < len(dims) else sorted(set(dims))
            for key, spec in block.items():
                where = f"tuner_cfg[{i}] {key}" if listed else f"tuner_cfg {key}"
                for width in widths:
                    _check_options(spec, width, where)
                problem = identity_problem(spec, key.removesuffix("_cfg"))
                if self.recurrence == "identity" and problem:
                    value = " (missing: the identity)" if spec is None else f"={spec!r}"
                    raise ValueError(f"{where}{value} is refused with recurrence='identity': {problem}. Choose "
                                     f"a tuner that starts at 0 ({', '.join(_zero_at_init(key))}), or recurrence "
                                     "'paper'/'swift' (which replace the target's value and are not identity at "
                                     "init)")

    def _validate_swift_fields(self) -> None:
        """swift's fields for 4-D feature maps and its unread ``use_bypass``: accepted at their defaults only."""
        if not isinstance(self.use_upsample, bool) or self.use_upsample:
            raise ValueError(f"use_upsample={self.use_upsample!r}: swift's upsample aux tuner interpolates 4-D "
                             "(B, C, H, W) feature maps (e.g. Stable Diffusion's UNet); vltune's bypass works on "
                             "token tensors (..., L, D) only, so leave use_upsample False")
        if self.upsample_out_channels is not None:
            raise ValueError(f"upsample_out_channels={self.upsample_out_channels!r}: it sets the channels of swift's "
                             "upsample aux tuner, which applies to 4-D (B, C, H, W) feature maps only; vltune's "
                             "bypass works on token tensors (..., L, D), so leave it None")
        if not isinstance(self.use_bypass, bool) or not self.use_bypass:
            raise ValueError(f"use_bypass={self.use_bypass!r}: swift never reads this field (its bypass always runs), "
                             "and vltune refuses to ignore it silently; leave it True, and call "
                             "ResTunedModel.remove() to run the model without the bypass")

    def to_dict(self) -> dict[str, Any]:
        """The fields as JSON-compatible values (tuples become lists), e.g. for ``restuning_config.json``."""
        data = dataclasses.asdict(self)
        data["tuner_cfg"] = _normalised(data["tuner_cfg"])
        return json.loads(json.dumps(data))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ResTuningConfig:
        """The config of ``to_dict()``'s output; unknown or missing fields fail by name."""
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(names))
        if unknown:
            raise ValueError(f"unknown ResTuningConfig fields {unknown}; the fields are {names}")
        required = [f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING]
        missing = [n for n in required if n not in data]
        if missing:
            raise ValueError(f"ResTuningConfig needs the fields {missing}")
        return cls(**dict(data))


def _compile(pattern: Any, field: str) -> re.Pattern[str]:
    if not isinstance(pattern, str) or not pattern:
        raise ValueError(f"{field} must be a non-empty regex string, got {pattern!r}")
    try:
        return re.compile(pattern)
    except re.error as err:
        raise ValueError(f"{field}={pattern!r} is not a valid regex: {err}") from None


def _zero_at_init(key: str) -> list[str]:
    """The tuner names the identity recurrence accepts for ``key`` (``lateral_cfg``/``vertical_cfg``)."""
    return [n for n in TUNERS if identity_problem(n, key.removesuffix("_cfg")) is None]


def _adapter_options(options: Any) -> Any:
    """``res_adapter`` options with each ``(in, hidden, out)`` adapter_length replaced by its hidden width."""
    if not isinstance(options, Mapping) or "adapter_length" not in options:
        return options

    def hidden(value: Any) -> Any:
        return value[1] if isinstance(value, tuple) and len(value) == 3 else value

    length = options["adapter_length"]
    return {**options, "adapter_length": [hidden(v) for v in length] if isinstance(length, list) else hidden(length)}


def _normalised(tuner_cfg: Any) -> Any:
    """``tuner_cfg`` with every res_adapter ``(in, hidden, out)`` tuple as its hidden width (validated: in = out =
    dims, so it is the same adapter); JSON has no tuples, and a 3-list would read as a per-block list."""
    if isinstance(tuner_cfg, (list, tuple)):
        return [_normalised(entry) for entry in tuner_cfg]
    if isinstance(tuner_cfg, Mapping):
        return {k: _adapter_options(v) if k == "res_adapter" else _normalised(v) for k, v in tuner_cfg.items()}
    return tuner_cfg


def _check_options(spec: Any, width: int, where: str) -> None:
    """Validate a spec's options before the model is seen (names, swift's res_adapter forms, prompt gate)."""
    if not isinstance(spec, Mapping):
        return
    name, options = next(iter(spec.items()))
    options = options or {}
    allowed = TUNER_OPTIONS.get(name, ())
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise ValueError(f"{where}: {name} does not take {unknown}; it takes {sorted(allowed) or 'no options'}")
    if name == "res_adapter":
        adapter_rank(options.get("adapter_length", 32), width, where=where)
        adapter_weight_kind(options.get("adapter_weight"), where)
    if "n_tokens" in options:
        n = options["n_tokens"]
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"{where}: {name} n_tokens must be an int >= 1, got {n!r}")
    if not isinstance(options.get("gate", True), bool):
        raise ValueError(f"{where}: res_prompt gate must be True (gated, vltune's default) or False (the paper's "
                         f"ungated form), got {options['gate']!r}")


def _spec_name(spec: Any) -> str | None:
    """The tuner name of a spec (None for the identity)."""
    if spec is None:
        return None
    if isinstance(spec, Mapping):
        return str(next(iter(spec))) if len(spec) == 1 else None
    return str(spec)


def _check_spec(spec: Any, where: str) -> None:
    if spec is None:
        return
    if isinstance(spec, Mapping):
        if len(spec) != 1:
            raise ValueError(f"{where}: a tuner spec dict holds exactly one tuner name, got {list(spec)}")
        options = next(iter(spec.values()))
        if options is not None and not isinstance(options, Mapping):
            raise TypeError(f"{where}: the options of {_spec_name(spec)!r} must be a dict, got {options!r}")
    elif not isinstance(spec, str):
        raise TypeError(f"{where}: a tuner spec is a name or {{name: {{options}}}}, got {spec!r}")
    if _spec_name(spec) not in TUNERS:
        raise ValueError(f"{where}: unknown tuner {_spec_name(spec)!r}; choose from {', '.join(TUNERS)}")


def _one_block(entry: Any, where: str) -> dict[str, Any]:
    """``{'lateral_cfg', 'vertical_cfg'}`` specs of one block from a name, a block dict or a single tuner spec."""
    if isinstance(entry, str):
        block = {"lateral_cfg": entry, "vertical_cfg": entry}
    elif isinstance(entry, Mapping) and entry and set(entry) <= set(_BLOCK_KEYS):
        aux = entry.get("aux_cfg")
        if aux not in (None, "identity"):
            raise ValueError(f"{where}: aux_cfg={aux!r} is not supported (swift's aux tuners upsample convolutional "
                             "feature maps); leave it out or use 'identity'")
        block = {"lateral_cfg": entry.get("lateral_cfg"), "vertical_cfg": entry.get("vertical_cfg")}
    elif isinstance(entry, Mapping) and len(entry) == 1:
        name = next(iter(entry))
        if name not in TUNERS:
            raise ValueError(f"{where}: {dict(entry)!r} is neither a block dict (keys among {list(_BLOCK_KEYS)}) nor "
                             f"a tuner spec {{name: {{options}}}} (unknown tuner {name!r}; choose from "
                             f"{', '.join(TUNERS)})")
        block = {"lateral_cfg": copy.deepcopy(dict(entry)), "vertical_cfg": copy.deepcopy(dict(entry))}
    elif isinstance(entry, Mapping):
        raise ValueError(f"{where}: a dict is either a block with keys among {list(_BLOCK_KEYS)} or one tuner "
                         f"{{name: {{options}}}}, got keys {sorted(map(str, entry))}")
    else:
        raise TypeError(f"{where}: expected a tuner name, a block dict or a tuner spec dict, got {entry!r}")
    for key, spec in block.items():
        _check_spec(spec, f"{where} {key}")
    return block


def _block_specs(tuner_cfg: Any, n_stems: int | None) -> list[dict[str, Any]]:
    """One ``{'lateral_cfg', 'vertical_cfg'}`` dict per stem (``n_stems`` None: validate only, one entry)."""
    if tuner_cfg is None:
        raise ValueError("tuner_cfg is required: a tuner name such as 'res_adapter', a block dict "
                         "{'lateral_cfg': ..., 'vertical_cfg': ...}, or a list with one of these per stem")
    if isinstance(tuner_cfg, (list, tuple)):
        if n_stems is not None and len(tuner_cfg) != n_stems:
            raise ValueError(f"tuner_cfg is a list of {len(tuner_cfg)} entries but stem_modules selects {n_stems} "
                             "stems; give one entry per stem (or a single name/dict for all)")
        if not tuner_cfg:
            raise ValueError("tuner_cfg is an empty list")
        return [_one_block(entry, f"tuner_cfg[{i}]") for i, entry in enumerate(tuner_cfg)]
    block = _one_block(tuner_cfg, "tuner_cfg")
    return [copy.deepcopy(block) for _ in range(n_stems or 1)]


def _no_match_message(field: str, pattern: str, names: list[str]) -> str:
    plain = re.sub(r"[\\^$.*+?()\[\]{}|]+", ".", pattern).strip(".")
    close = difflib.get_close_matches(pattern, names, n=5, cutoff=0.5) or difflib.get_close_matches(plain, names, n=5)
    partial = [n for n in names if re.search(pattern, n)][:5]
    sample = names[:8]
    hints = [f"close matches: {close}" if close else "", f"names containing a match (the pattern must match the "
             f"whole name): {partial}" if partial else "", f"first module names: {sample}"]
    return f"{field}={pattern!r} matches no module name (re.fullmatch); " + "; ".join(h for h in hints if h)


def _resolve(model: nn.Module, pattern: str | Sequence[str], field: str) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` pairs a regex fullmatches (model order) or a list names (list order), containers rejected."""
    modules = {name: m for name, m in model.named_modules() if name}
    names = list(modules)
    if isinstance(pattern, str):
        regex = _compile(pattern, field)
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


def _build_chain(config: ResTuningConfig, stems: list[tuple[str, nn.Module]]) -> BypassChain:
    """The bypass chain with one lateral and one vertical tuner per stem, built with that block's dims."""
    n = len(stems)
    dims = list(config.dims) if isinstance(config.dims, (list, tuple)) else [config.dims] * n
    if len(dims) != n:
        raise ValueError(f"dims lists {len(dims)} widths but stem_modules selects {n} stems "
                         f"({[name for name, _ in stems]})")
    identity = config.recurrence == "identity"
    lateral, vertical = [], []
    for i, (block, (stem_name, stem)) in enumerate(zip(_block_specs(config.tuner_cfg, n), stems)):
        zero_init = identity or (config.zero_init_last and i == n - 1)
        built = []
        for key in ("lateral_cfg", "vertical_cfg"):
            where = f"tuner_cfg block {i} ({stem_name}) {key}"
            attn = norm = None
            if _spec_name(block[key]) in _ATTENTION_TUNERS:
                attn, norm = _stem_attention(stem, stem_name, dims[i], where)
            built.append(build_tuner(block[key], dims[i], residual=not identity, zero_init=zero_init, attn=attn,
                                     norm=norm, where=where, index=i, depth=n, token_dim=config.token_dim))
        lateral.append(built[0])
        vertical.append(built[1])
    return BypassChain(lateral, vertical, recurrence=config.recurrence, lam=config.lam)


def _probe_tensor(value: Any, what: str) -> torch.Tensor:
    """The tensor a root/stem probe reads: the value itself, or the first element of a tuple/list."""
    if isinstance(value, (tuple, list)) and value:
        value = value[0]
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{what} is a {type(value).__name__}, not a tensor (or a tuple/list starting with one)")
    return value


def _patch_item(container: Any, pos: int | str, patch: Callable[[Any], Any], what: str) -> Any:
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


class ResTunedModel(nn.Module):
    """A model patched with a Res-Tuning bypass; calling it (or the original model) runs the tuned model.

    Built by ``prepare_model`` (or ``from_pretrained``). The chain is ``model.restuning``; the hooks that feed and
    apply it hold their per-forward state here. ``root_name``, ``stem_names`` and ``target_names`` are the resolved
    module names, so the wiring can be asserted (e.g. the stem count and order).
    """

    def __init__(self, model: nn.Module, config: ResTuningConfig, chain: BypassChain, root_name: str,
                 stem_names: list[str], target_names: list[str]) -> None:
        super().__init__()
        self.model = model
        self.config = copy.deepcopy(config)  # later edits of the caller's object must not change what was built
        self.root_name, self.stem_names, self.target_names = root_name, list(stem_names), list(target_names)
        self._handles: list[RemovableHandle] = []
        self._kwarg_index: list[int | None] = []
        self._requires_grad: dict[str, bool] = {}
        self._attached = False
        self._reset()
        self._attach(chain)

    # -- wiring -------------------------------------------------------------------------------------------------

    def _attach(self, chain: BypassChain) -> None:
        if hasattr(self.model, SUBMODULE_NAME):
            raise ValueError(f"the model already has an attribute {SUBMODULE_NAME!r}: it was prepared before (call "
                             "remove() on its ResTunedModel first) or uses that name itself")
        self._requires_grad = {name: p.requires_grad for name, p in self.model.named_parameters()}
        self.model.requires_grad_(False)
        first = next(self.model.parameters(), None)
        if first is not None:
            chain.to(first.device)
        self.model.add_module(SUBMODULE_NAME, chain)
        modules = dict(self.model.named_modules())
        cfg = self.config
        # registration order matters for hooks on the same module: root before stems before targets
        root = modules[self.root_name]
        if cfg.root_modules_hook == "input":
            self._handles.append(root.register_forward_pre_hook(self._on_root_input))
        else:
            self._handles.append(root.register_forward_hook(self._on_root_output))
        for i, name in enumerate(self.stem_names):
            if cfg.stem_modules_hook == "input":
                hook = modules[name].register_forward_pre_hook(functools.partial(self._on_stem_input, i))
            else:
                hook = modules[name].register_forward_hook(functools.partial(self._on_stem_output, i))
            self._handles.append(hook)
        for i, name in enumerate(self.target_names):
            target = modules[name]
            self._kwarg_index.append(self._signature_index(target, cfg.target_hidden_pos))
            if cfg.target_modules_hook == "input":
                hook = target.register_forward_pre_hook(functools.partial(self._on_target_input, i), with_kwargs=True)
            else:
                hook = target.register_forward_hook(functools.partial(self._on_target_output, i))
            self._handles.append(hook)
        self._attached = True

    @staticmethod
    def _signature_index(module: nn.Module, pos: int | str) -> int | None:
        """The positional index of keyword ``pos`` in ``module.forward`` (None if not positional or unknown)."""
        if not isinstance(pos, str):
            return None
        try:
            params = list(inspect.signature(module.forward).parameters.values())
        except (TypeError, ValueError):
            return None
        positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        return positional.index(pos) if pos in positional else None

    @property
    def chain(self) -> BypassChain:
        """The bypass chain (``model.restuning``)."""
        if not self._attached:
            raise RuntimeError("this ResTunedModel was removed; prepare the model again")
        return self.model._modules[SUBMODULE_NAME]

    # -- per-forward state --------------------------------------------------------------------------------------

    def _reset(self) -> None:
        """Drop the probes and the bypass output of the current forward."""
        self._root: torch.Tensor | None = None
        self._stems: list[torch.Tensor | None] = [None] * len(self.stem_names)
        self._output: torch.Tensor | None = None
        self._served: set[int] = set()

    @property
    def pending(self) -> bool:
        """True while probes or a bypass output of an unfinished forward are held (False after a complete forward)."""
        return self._root is not None or any(s is not None for s in self._stems) or self._output is not None

    def _store(self, slot: int | None, value: Any, what: str) -> None:
        """Keep the detached probe of the root (``slot`` None) or of stem ``slot``."""
        try:
            tensor = _probe_tensor(value, what).detach()
        except Exception:
            self._reset()
            raise
        if self._output is not None:
            self._reset()  # a probe after the bypass already ran: a new forward started while targets were pending
        if slot is None:
            self._root = tensor
        else:
            self._stems[slot] = tensor

    def _first_input(self, args: tuple[Any, ...], what: str) -> Any:
        if not args:
            self._reset()
            raise RuntimeError(f"{what} does not exist: the module was called without positional inputs; hook its "
                               "output instead")
        return args[0]

    def _on_root_input(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        what = f"the first input of root {self.root_name!r}"
        self._store(None, self._first_input(args, what), what)

    def _on_root_output(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        self._store(None, output, f"the output of root {self.root_name!r}")

    def _on_stem_input(self, index: int, module: nn.Module, args: tuple[Any, ...]) -> None:
        what = f"the first input of stem {self.stem_names[index]!r}"
        self._store(index, self._first_input(args, what), what)

    def _on_stem_output(self, index: int, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        self._store(index, output, f"the output of stem {self.stem_names[index]!r}")

    def _bypass_output(self, index: int) -> torch.Tensor:
        """The chain's output for this forward: computed by the first target, shared by the others, then released."""
        if self._output is None:
            missing = ([f"root {self.root_name}"] if self._root is None else []) + [
                f"stem {name}" for name, s in zip(self.stem_names, self._stems) if s is None]
            if missing:
                raise RuntimeError(f"target {self.target_names[index]!r} ran before the bypass probes of this "
                                   f"forward were captured (missing: {', '.join(missing)}); the root and every stem "
                                   "must run before each target")
            root, stems = self._root, list(self._stems)
            self._root, self._stems = None, [None] * len(self.stem_names)
            dims = self.config.dims if isinstance(self.config.dims, (list, tuple)) else [self.config.dims] * len(stems)
            probes = [(f"root {self.root_name}", root, dims[0])]
            probes += [(f"stem {name}", s, d) for name, s, d in zip(self.stem_names, stems, dims)]
            for what, probe, dim in probes:
                if probe.shape[-1] != dim:
                    raise ValueError(f"the probe of {what} has shape {tuple(probe.shape)}, but its bypass block has "
                                     f"dims={dim} (the last dimension); fix dims or the module selection")
            self._output = self.chain(root, stems)
        output = self._output
        self._served.add(index)
        if len(self._served) == len(self.target_names):
            self._reset()
        return output

    def _patched(self, index: int, original: Any) -> torch.Tensor:
        """The target's new value: ``original + bypass`` (identity recurrence) or the bypass output alone."""
        name = self.target_names[index]
        if not isinstance(original, torch.Tensor):
            raise TypeError(f"target {name!r}: the patched value is a {type(original).__name__}, not a tensor; check "
                            "target_modules_hook and target_hidden_pos")
        output = self._bypass_output(index)
        if output.shape != original.shape:
            raise ValueError(f"target {name!r}: the bypass output has shape {tuple(output.shape)} but the value it "
                             f"patches has shape {tuple(original.shape)} (a different layout or module?)")
        output = output.to(original.dtype)
        return original + output if self.chain.adds else output

    def _on_target_input(self, index: int, module: nn.Module, args: tuple[Any, ...],
                         kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        pos = self.config.target_hidden_pos
        try:
            if isinstance(pos, str) and pos in kwargs:
                kwargs = dict(kwargs)
                kwargs[pos] = self._patched(index, kwargs[pos])
                return args, kwargs
            slot = self._kwarg_index[index] if isinstance(pos, str) else pos
            if slot is None or not -len(args) <= slot < len(args):
                raise IndexError(f"target {self.target_names[index]!r} was called with {len(args)} positional "
                                 f"inputs and keywords {sorted(kwargs)}; target_hidden_pos={pos!r} selects none")
            args = list(args)
            args[slot] = self._patched(index, args[slot])
            return tuple(args), kwargs
        except Exception:
            self._reset()
            raise

    def _on_target_output(self, index: int, module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
        try:
            if isinstance(output, torch.Tensor):
                return self._patched(index, output)
            return _patch_item(output, self.config.target_hidden_pos, functools.partial(self._patched, index),
                               f"target {self.target_names[index]!r}")
        except Exception:
            self._reset()
            raise

    # -- public API ---------------------------------------------------------------------------------------------

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Call the patched model (any state left by an interrupted forward is dropped first)."""
        self._reset()
        return self.model(*args, **kwargs)

    def get_trainable_parameters(self) -> str:
        """``trainable params: T || all params: A || trainable%: P`` over the model including the chain."""
        return count_line(self)

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write the chain's weights (``restuning.safetensors``) and the config (``restuning_config.json``)."""
        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().to("cpu").contiguous() for k, v in self.chain.state_dict().items()}
        save_file(state, str(path / WEIGHTS_FILE), metadata={"format": "pt", "writer": "vltune.tuners.restuning"})
        (path / CONFIG_FILE).write_text(json.dumps(self.config.to_dict(), indent=2, sort_keys=True) + "\n")

    def load_tuner(self, directory: str | os.PathLike) -> ResTunedModel:
        """Load weights written by ``save_pretrained`` into this chain, strictly.

        Fails (ValueError naming the file) when the saved config differs from the one this model was prepared with,
        when a key is missing or unexpected, or when a shape differs. Returns ``self``.
        """
        path = Path(directory)
        config_file, weights_file = path / CONFIG_FILE, path / WEIGHTS_FILE
        for file in (config_file, weights_file):
            if not file.is_file():
                raise FileNotFoundError(f"{file} does not exist; save_pretrained writes {CONFIG_FILE} and "
                                        f"{WEIGHTS_FILE}")
        saved = ResTuningConfig.from_dict(json.loads(config_file.read_text())).to_dict()
        own = self.config.to_dict()
        diffs = [f"{k}: saved {saved[k]!r}, this model {own[k]!r}" for k in own if saved[k] != own[k]]
        if diffs:
            raise ValueError(f"{config_file} differs from the config this model was prepared with ("
                             f"{'; '.join(diffs)}); prepare the model with the saved config (ResTunedModel."
                             "from_pretrained does)")
        state = load_file(str(weights_file))
        expected = self.chain.state_dict()
        missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        if missing or unexpected:
            raise ValueError(f"{weights_file}: missing keys {missing}, unexpected keys {unexpected}")
        for key, tensor in expected.items():
            if state[key].shape != tensor.shape:
                raise ValueError(f"{weights_file}: {key} has shape {tuple(state[key].shape)}, the model's "
                                 f"{tuple(tensor.shape)}")
        self.chain.load_state_dict(state, strict=True)
        return self

    @classmethod
    def from_pretrained(cls, model: nn.Module, directory: str | os.PathLike) -> ResTunedModel:
        """Prepare ``model`` with the config saved in ``directory`` and load the saved tuner weights into it."""
        config_file = Path(directory) / CONFIG_FILE
        if not config_file.is_file():
            raise FileNotFoundError(f"{config_file} does not exist")
        config = ResTuningConfig.from_dict(json.loads(config_file.read_text()))
        return prepare_model(model, config).load_tuner(directory)

    def remove(self) -> nn.Module:
        """Remove the hooks and ``model.restuning``, restore each parameter's ``requires_grad``; returns the model."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        if self._attached:
            del self.model._modules[SUBMODULE_NAME]
            self._attached = False
        for name, p in self.model.named_parameters():
            if name in self._requires_grad:
                p.requires_grad_(self._requires_grad[name])
        self._reset()
        return self.model


def prepare_model(model: nn.Module, config: ResTuningConfig) -> ResTunedModel:
    """Patch ``model`` in place with the bypass of ``config`` and return the ``ResTunedModel`` around it.

    Every parameter of ``model`` is frozen; the chain becomes ``model.restuning`` (placed on the model's device, in
    fp32: tuners cast at their boundary) and holds the only trainable parameters. Raises ValueError naming the field
    for patterns that match nothing, an ambiguous root, containers, or tuner/dims lists of the wrong length.
    """
    if not isinstance(config, ResTuningConfig):
        raise TypeError(f"config must be a ResTuningConfig, got {type(config).__name__}")
    config.validate()
    roots = _resolve(model, config.root_modules, "root_modules")
    if len(roots) > 1:
        raise ValueError(f"root_modules={config.root_modules!r} matches {len(roots)} modules "
                         f"{[name for name, _ in roots]}; it must select exactly one (anchor the pattern)")
    stems = _resolve(model, config.stem_modules, "stem_modules")
    targets = _resolve(model, config.target_modules, "target_modules")
    chain = _build_chain(config, stems)
    return ResTunedModel(model, config, chain, roots[0][0], [n for n, _ in stems], [n for n, _ in targets])


__all__ = ["ResTuningConfig", "ResTunedModel", "prepare_model", "SUBMODULE_NAME", "WEIGHTS_FILE", "CONFIG_FILE"]
