"""``ResTuningConfig``: where the bypass reads and writes, and which tuners it holds.

The config is checked in full before any model is seen (``validate``, run on construction and again by
``prepare_model``), so a bad field fails by name at the user's call site; the parsing of the module patterns and of
``tuner_cfg`` it relies on lives in ``spec``. ``to_dict``/``from_dict`` are the JSON form saved next to the weights
(``restuning_config.json``).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from vltune.tuners.res_tuners import RECURRENCES, identity_problem
from vltune.tuners.restuning.spec import block_specs, check_options, compile_pattern, normalised, zero_at_init

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
        self.tuner_cfg = normalised(self.tuner_cfg)

    def validate(self) -> None:
        """Check every field that can be checked without the model; raises ValueError/TypeError naming the field."""
        dims = self.dims if isinstance(self.dims, (list, tuple)) else [self.dims]
        if not dims or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in dims):
            raise ValueError(f"dims must be a positive int or a non-empty list of positive ints, got {self.dims!r}")
        for name in ("root_modules", "target_modules"):
            compile_pattern(getattr(self, name), name)
        if isinstance(self.stem_modules, str):
            compile_pattern(self.stem_modules, "stem_modules")
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
        blocks = block_specs(self.tuner_cfg, None)
        dims = list(self.dims) if isinstance(self.dims, (list, tuple)) else [self.dims]
        listed = isinstance(self.tuner_cfg, (list, tuple))
        for i, block in enumerate(blocks):
            # a block's options must fit its own width; a shared entry must fit every width in dims
            widths = [dims[i]] if listed and len(dims) > 1 and i < len(dims) else sorted(set(dims))
            for key, spec in block.items():
                where = f"tuner_cfg[{i}] {key}" if listed else f"tuner_cfg {key}"
                for width in widths:
                    check_options(spec, width, where)
                problem = identity_problem(spec, key.removesuffix("_cfg"))
                if self.recurrence == "identity" and problem:
                    value = " (missing: the identity)" if spec is None else f"={spec!r}"
                    raise ValueError(f"{where}{value} is refused with recurrence='identity': {problem}. Choose "
                                     f"a tuner that starts at 0 ({', '.join(zero_at_init(key))}), or recurrence "
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
        data["tuner_cfg"] = normalised(data["tuner_cfg"])
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

