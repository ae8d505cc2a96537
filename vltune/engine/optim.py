"""Optimizer and per-epoch LR schedule builders (Dassl semantics, plain-number state).

The schedule is stepped once per epoch by the engine, never by a method. Its state is one integer, so checkpoints
hold no pickled scheduler objects and load with ``weights_only=True`` (upstream's warmup wrapper pickles its
successor scheduler together with a copy of the optimizer, dassl_contract.md §5).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from yacs.config import CfgNode

OPTIMIZERS = ("sgd", "adam", "adamw", "amsgrad", "rmsprop", "radam")
SCHEDULERS = ("cosine", "constant", "linear", "single_step", "multi_step")
WARMUPS = ("constant", "linear")


def build_optimizer(params: Iterable[torch.nn.Parameter] | list[dict[str, Any]], optim: CfgNode
                    ) -> torch.optim.Optimizer:
    """Build ``OPTIM.NAME`` over ``params`` (tensors or param-group dicts that may carry their own ``lr``)."""
    name, lr, wd = optim.NAME.lower(), optim.LR, optim.WEIGHT_DECAY
    betas = (optim.ADAM_BETA1, optim.ADAM_BETA2)
    eps = optim.get("ADAM_EPS", 1e-8)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=optim.MOMENTUM, weight_decay=wd,
                               dampening=optim.SGD_DAMPNING, nesterov=optim.SGD_NESTEROV)
    if name in ("adam", "amsgrad"):
        return torch.optim.Adam(params, lr=lr, weight_decay=wd, betas=betas, eps=eps, amsgrad=name == "amsgrad")
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=wd, betas=betas, eps=eps)
    if name == "rmsprop":
        return torch.optim.RMSprop(params, lr=lr, momentum=optim.MOMENTUM, weight_decay=wd, alpha=optim.RMSPROP_ALPHA)
    if name == "radam":
        return torch.optim.RAdam(params, lr=lr, weight_decay=wd, betas=betas, eps=eps)
    raise ValueError(f"OPTIM.NAME {optim.NAME!r} is not supported; choose one of {', '.join(OPTIMIZERS)}")


class EpochLRSchedule:
    """LR as a pure function of the epoch index, applied to every param group.

    Epoch ``e`` (0-based) uses, with ``W = WARMUP_EPOCH`` and ``t = e - W`` (``WARMUP_RECOUNT``) or ``t = e``:
      * ``e < W``: constant warmup → ``WARMUP_CONS_LR`` for every group; linear warmup → ``WARMUP_MIN_LR`` at e = 0,
        then ``base_lr · e / W`` (Dassl's LinearWarmupScheduler);
      * otherwise the main schedule at ``t``: cosine ``base·(1 + cos(π t / MAX_EPOCH)) / 2`` (eta_min 0), constant,
        linear ``base·(1 - t / MAX_EPOCH)``, single_step ``base·γ^(t // STEPSIZE[-1])``, multi_step
        ``base·γ^(#milestones <= t)``.
    With one constant warmup epoch, epoch e ≥ 1 gets ``base·(1 + cos(π(e-1)/E))/2``, as CoOp's runs do.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, optim: CfgNode) -> None:
        self.optimizer = optimizer
        self.kind = optim.LR_SCHEDULER
        if self.kind not in SCHEDULERS:
            raise ValueError(f"OPTIM.LR_SCHEDULER {self.kind!r} is not supported; choose from {', '.join(SCHEDULERS)}")
        self.warmup_epochs = max(int(optim.WARMUP_EPOCH), 0)
        self.warmup_type = optim.WARMUP_TYPE
        if self.warmup_epochs and self.warmup_type not in WARMUPS:
            raise ValueError(f"OPTIM.WARMUP_TYPE {self.warmup_type!r} is not supported; choose one of {WARMUPS}")
        self.warmup_cons_lr, self.warmup_min_lr = optim.WARMUP_CONS_LR, optim.WARMUP_MIN_LR
        self.recount = optim.WARMUP_RECOUNT
        self.max_epoch = int(optim.MAX_EPOCH)
        stepsize = optim.STEPSIZE if isinstance(optim.STEPSIZE, (list, tuple)) else (optim.STEPSIZE,)
        # Dassl's default STEPSIZE (-1,) reaches torch's StepLR(step_size=-1), which decays every epoch: keep that.
        self.stepsize, self.gamma = [max(int(s), 1) for s in stepsize], optim.GAMMA
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
        self.base_lrs = [g["initial_lr"] for g in optimizer.param_groups]
        self.last_epoch = 0
        self._apply()

    def lr_at(self, epoch: int, base_lr: float) -> float:
        """The LR of a group with ``base_lr`` during epoch ``epoch``."""
        if epoch < self.warmup_epochs:
            if self.warmup_type == "constant":
                return self.warmup_cons_lr
            return self.warmup_min_lr if epoch == 0 else base_lr * epoch / self.warmup_epochs
        t = epoch - self.warmup_epochs if self.recount else epoch
        if self.kind == "cosine":
            return base_lr * (1 + math.cos(math.pi * t / self.max_epoch)) / 2
        if self.kind == "linear":
            return base_lr * max(0.0, 1 - t / self.max_epoch)
        if self.kind == "single_step":
            return base_lr * self.gamma ** (t // self.stepsize[-1])
        if self.kind == "multi_step":
            return base_lr * self.gamma ** sum(t >= m for m in self.stepsize)
        return base_lr

    def _apply(self) -> None:
        for group, base in zip(self.optimizer.param_groups, self.base_lrs):
            group["lr"] = self.lr_at(self.last_epoch, base)

    def step(self) -> None:
        """Advance to the next epoch (called by the engine once, after the last batch of an epoch)."""
        self.last_epoch += 1
        self._apply()

    def get_last_lr(self) -> list[float]:
        return [g["lr"] for g in self.optimizer.param_groups]

    def state_dict(self) -> dict[str, Any]:
        return {"last_epoch": self.last_epoch, "base_lrs": list(self.base_lrs)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last_epoch = int(state["last_epoch"])
        self.base_lrs = [float(x) for x in state.get("base_lrs", self.base_lrs)]
        self._apply()


def build_lr_scheduler(optimizer: torch.optim.Optimizer, optim: CfgNode) -> EpochLRSchedule:
    """The per-epoch schedule for ``optimizer`` from ``OPTIM``."""
    return EpochLRSchedule(optimizer, optim)
