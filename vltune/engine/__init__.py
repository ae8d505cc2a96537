"""The training engine: trainer base with hooks, optimizer/schedule builders, checkpoints, precision, cost."""

from __future__ import annotations

import logging

from yacs.config import CfgNode

from vltune.engine.base import TrainerBase
from vltune.engine.trainer import TrainerX, set_random_seed
from vltune.registry import TRAINERS

__all__ = ["TrainerBase", "TrainerX", "set_random_seed", "build_trainer"]

logger = logging.getLogger(__name__)


def build_trainer(cfg: CfgNode, *, eval_only: bool = False) -> TrainerX:
    """Instantiate ``TRAINER.NAME`` (unknown names fail with a did-you-mean)."""
    cls = TRAINERS.get(cfg.TRAINER.NAME)
    if cfg.VERBOSE:
        logger.info(f"Loading trainer: {cfg.TRAINER.NAME}")
    return cls(cfg, eval_only=eval_only)
