"""``ResTunedModel`` and ``prepare_model``: the hook-based bypass on a frozen model, and its save/load.

``prepare_model`` resolves the config on the model and builds the chain (``wiring``); ``ResTunedModel`` attaches it
as ``model.restuning``, registers the hooks that capture the probes and patch the targets, and holds the state of one
forward. Save/load write and read only the tuner weights (safetensors) and the config (JSON), strictly.
"""

from __future__ import annotations

import copy
import functools
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.hooks import RemovableHandle

from vltune.tuners.res_tuners import BypassChain, count_line
from vltune.tuners.restuning.config import ResTuningConfig
from vltune.tuners.restuning.wiring import build_chain, patch_item, probe_tensor, resolve, signature_index

SUBMODULE_NAME = "restuning"
WEIGHTS_FILE = "restuning.safetensors"
CONFIG_FILE = "restuning_config.json"


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
            self._kwarg_index.append(signature_index(target, cfg.target_hidden_pos))
            if cfg.target_modules_hook == "input":
                hook = target.register_forward_pre_hook(functools.partial(self._on_target_input, i), with_kwargs=True)
            else:
                hook = target.register_forward_hook(functools.partial(self._on_target_output, i))
            self._handles.append(hook)
        self._attached = True

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
            tensor = probe_tensor(value, what).detach()
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
            return patch_item(output, self.config.target_hidden_pos, functools.partial(self._patched, index),
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
    roots = resolve(model, config.root_modules, "root_modules")
    if len(roots) > 1:
        raise ValueError(f"root_modules={config.root_modules!r} matches {len(roots)} modules "
                         f"{[name for name, _ in roots]}; it must select exactly one (anchor the pattern)")
    stems = resolve(model, config.stem_modules, "stem_modules")
    targets = resolve(model, config.target_modules, "target_modules")
    chain = build_chain(config, stems)
    return ResTunedModel(model, config, chain, roots[0][0], [n for n, _ in stems], [n for n, _ in targets])

