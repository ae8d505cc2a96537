"""Training precision, owned by the engine for every method (methods never cast or scale themselves).

* ``fp32``: float weights, no autocast.
* ``amp``: float weights (master copy), autocast to fp16 on CUDA (with a GradScaler) or bf16 on CPU.
* ``fp16``: CUDA only. Frozen weights are stored in half (upstream's memory footprint), trainable parameters stay
  float as master weights, the forward runs under fp16 autocast, and a GradScaler guards the backward. Upstream's
  fp16 trains the parameters themselves in half with plain SGD; updates of ``lr·grad`` below the fp16 spacing of a
  weight are then rounded away (methods.md §0.3-6), which is why the master copy stays float here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

MODES = ("fp32", "amp", "fp16")


def precision_setting(cfg: Any, node: str | None) -> tuple[str, str]:
    """``(key, mode)``: the config key that decides a run's precision and its value. A non-empty ``PREC`` in the
    method's node ``TRAINER.<node>`` wins over ``TRAINER.PREC`` (upstream's per-method keys, e.g.
    ``TRAINER.COOP.PREC``); the runner's presets use the key to switch an fp16 config to amp on a CPU."""
    sub = cfg.TRAINER.get(node) if node else None
    if sub is not None and sub.get("PREC"):
        return f"TRAINER.{node}.PREC", str(sub.PREC)
    return "TRAINER.PREC", str(cfg.TRAINER.PREC)


class Precision:
    """Autocast context, gradient scaler and weight casting for one run."""

    def __init__(self, mode: str, device: torch.device) -> None:
        if mode not in MODES:
            raise ValueError(f"precision {mode!r} is not supported; choose one of {', '.join(MODES)}")
        if mode == "fp16" and device.type != "cuda":
            raise ValueError(
                f"precision 'fp16' needs a CUDA device (this run uses {device.type}); set the trainer's PREC "
                "(e.g. TRAINER.COOP.PREC) or TRAINER.PREC to 'amp' (bf16 autocast on CPU) or 'fp32'"
            )
        self.mode, self.device = mode, device
        self.dtype = None if mode == "fp32" else (torch.float16 if device.type == "cuda" else torch.bfloat16)
        self.scaler = torch.amp.GradScaler("cuda") if self.dtype == torch.float16 else None

    def autocast(self) -> contextlib.AbstractContextManager:
        """The forward-pass context (a no-op for fp32)."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def prepare(self, model: nn.Module) -> None:
        """Cast frozen floating-point weights to half for ``fp16``; trainable parameters stay float."""
        if self.mode != "fp16":
            return
        for p in _frozen_float_params(model):
            p.data = p.data.half()

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler else loss).backward()

    def unscale(self, optimizer: torch.optim.Optimizer) -> None:
        """Undo loss scaling on the gradients (before clipping or inspecting them)."""
        if self.scaler:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler:
            self.scaler.step(optimizer)
        else:
            optimizer.step()

    def update(self) -> None:
        if self.scaler:
            self.scaler.update()


def _frozen_float_params(model: nn.Module) -> Iterator[nn.Parameter]:
    for p in model.parameters():
        if not p.requires_grad and p.is_floating_point():
            yield p
