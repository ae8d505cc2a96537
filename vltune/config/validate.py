"""Value checks on a built config, run before any model or dataset is built.

Key names are checked when the config is merged (``vltune.config``); this module checks the values: an unknown
optimizer or LR schedule, a negative LR or a zero batch size would otherwise fail only after CLIP is loaded, and
``OPTIM.MAX_EPOCH 0`` on a trained method would "succeed" with the untrained accuracy and no checkpoint. Every
error is a ``ConfigError`` naming the key, the value and the valid range or choices.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from typing import Any

from yacs.config import CfgNode

from vltune.config import ConfigError

ZERO_SHOT_FAMILY = "zero-shot"


def _choices(key: str, value: Any, valid: Iterable[str]) -> ConfigError:
    valid = list(valid)
    close = difflib.get_close_matches(str(value).lower(), valid, n=3, cutoff=0.5)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    return ConfigError(f"{key} = {value!r}{hint}; choose one of {', '.join(valid)}")


def _number(key: str, value: Any, *, minimum: float, strict: bool = False, integer: bool = False) -> None:
    """Raise unless ``value`` is a number (an int if ``integer``) ``>= minimum`` (``> minimum`` if ``strict``)."""
    kind = int if integer else (int, float)
    expected = "an integer" if integer else "a number"
    bound = f"> {minimum:g}" if strict else f">= {minimum:g}"
    if isinstance(value, bool) or not isinstance(value, kind):
        raise ConfigError(f"{key} = {value!r} ({type(value).__name__}); expected {expected} {bound}")
    if value < minimum or (strict and value == minimum):
        raise ConfigError(f"{key} = {value!r}; it must be {bound}")


def trainer_trains(trainer: str, eval_only: bool = False) -> bool:
    """Whether a run of ``trainer`` trains anything: not for ``--eval-only`` nor a zero-shot trainer (registry
    ``family="zero-shot"``: ZeroshotCLIP, ZeroshotCLIP2), which may therefore have ``OPTIM.MAX_EPOCH 0``.
    The registry is filled by ``get_cfg``, which every caller has run to build the config it validates."""
    if eval_only:
        return False
    from vltune.registry import TRAINERS

    return TRAINERS.meta(trainer).get("family") != ZERO_SHOT_FAMILY if trainer else True


def validate_cfg(cfg: CfgNode, trains: bool) -> None:
    """Check the values of ``cfg`` that the engine reads (optimizer, schedule, epochs, batch sizes).

    Args:
        cfg: a built config (``get_cfg``).
        trains: the run trains (see ``trainer_trains``); then ``OPTIM.MAX_EPOCH`` and ``OPTIM.LR`` must be positive.

    Raises:
        ConfigError: naming the first bad key, its value and the valid range or choices.
    """
    from vltune.engine.optim import OPTIMIZERS, SCHEDULERS, WARMUPS

    optim = cfg.OPTIM
    if str(optim.NAME).lower() not in OPTIMIZERS:
        raise _choices("OPTIM.NAME", optim.NAME, OPTIMIZERS)
    if optim.LR_SCHEDULER not in SCHEDULERS:
        raise _choices("OPTIM.LR_SCHEDULER", optim.LR_SCHEDULER, SCHEDULERS)
    if int(optim.WARMUP_EPOCH) > 0 and optim.WARMUP_TYPE not in WARMUPS:
        raise _choices("OPTIM.WARMUP_TYPE", optim.WARMUP_TYPE, WARMUPS)
    _number("OPTIM.LR", optim.LR, minimum=0, strict=trains)
    _number("OPTIM.WEIGHT_DECAY", optim.WEIGHT_DECAY, minimum=0)
    try:
        _number("OPTIM.MAX_EPOCH", optim.MAX_EPOCH, minimum=1 if trains else 0, integer=True)
    except ConfigError as e:
        why = "; a trained method needs at least 1 epoch (0 suits zero-shot trainers and --eval-only)"
        raise ConfigError(f"{e}{why if trains else ''}") from None
    _number("DATALOADER.TRAIN_X.BATCH_SIZE", cfg.DATALOADER.TRAIN_X.BATCH_SIZE, minimum=1, integer=True)
    _number("DATALOADER.TEST.BATCH_SIZE", cfg.DATALOADER.TEST.BATCH_SIZE, minimum=1, integer=True)
    _number("DATALOADER.NUM_WORKERS", cfg.DATALOADER.NUM_WORKERS, minimum=0, integer=True)
    backbone = cfg.MODEL.BACKBONE
    if backbone.WEIGHTS and backbone.PRETRAINED:
        raise ConfigError(f"MODEL.BACKBONE.WEIGHTS {backbone.WEIGHTS!r} and MODEL.BACKBONE.PRETRAINED "
                          f"{backbone.PRETRAINED!r} are both set; keep one (a weights file, or an open_clip tag)")
