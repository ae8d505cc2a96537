"""Parsing of what a ``ResTuningConfig`` names, without the model: module-name patterns and ``tuner_cfg``.

``block_specs`` turns every accepted ``tuner_cfg`` form (a name, a block dict, a single tuner spec, a per-stem list)
into one ``{'lateral_cfg': spec, 'vertical_cfg': spec}`` dict per block; ``check_options`` checks a spec's options
against a width, and ``normalised`` gives the JSON-safe form of ``tuner_cfg``. They live apart from the config class
because two modules read them: ``config`` validates with them before any model is seen, and ``wiring`` builds the
chain from the same parsed blocks.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from typing import Any

from vltune.tuners.res_tuners import TUNER_OPTIONS, TUNERS, adapter_rank, adapter_weight_kind, identity_problem

_BLOCK_KEYS = ("lateral_cfg", "vertical_cfg", "aux_cfg")


def compile_pattern(pattern: Any, field: str) -> re.Pattern[str]:
    """The compiled regex of the module-name field ``field``; ValueError naming it for a non-string or bad regex."""
    if not isinstance(pattern, str) or not pattern:
        raise ValueError(f"{field} must be a non-empty regex string, got {pattern!r}")
    try:
        return re.compile(pattern)
    except re.error as err:
        raise ValueError(f"{field}={pattern!r} is not a valid regex: {err}") from None


def zero_at_init(key: str) -> list[str]:
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


def normalised(tuner_cfg: Any) -> Any:
    """``tuner_cfg`` with every res_adapter ``(in, hidden, out)`` tuple as its hidden width (validated: in = out =
    dims, so it is the same adapter); JSON has no tuples, and a 3-list would read as a per-block list."""
    if isinstance(tuner_cfg, (list, tuple)):
        return [normalised(entry) for entry in tuner_cfg]
    if isinstance(tuner_cfg, Mapping):
        return {k: _adapter_options(v) if k == "res_adapter" else normalised(v) for k, v in tuner_cfg.items()}
    return tuner_cfg


def check_options(spec: Any, width: int, where: str) -> None:
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


def spec_name(spec: Any) -> str | None:
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
            raise TypeError(f"{where}: the options of {spec_name(spec)!r} must be a dict, got {options!r}")
    elif not isinstance(spec, str):
        raise TypeError(f"{where}: a tuner spec is a name or {{name: {{options}}}}, got {spec!r}")
    if spec_name(spec) not in TUNERS:
        raise ValueError(f"{where}: unknown tuner {spec_name(spec)!r}; choose from {', '.join(TUNERS)}")


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


def block_specs(tuner_cfg: Any, n_stems: int | None) -> list[dict[str, Any]]:
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

