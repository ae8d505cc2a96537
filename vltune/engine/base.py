"""Dassl's ``TrainerBase``: registered modules, the epoch-loop skeleton, and the trainable state they save and load.

A registered module's name is its checkpoint sub-folder (``prompt_learner/model.pth.tar-N``). Only its trainable
parameters and persistent buffers are saved, and loading is strict on exactly those keys: upstream's
``strict=False`` loads hide missing keys.

Each checkpoint records the trainer that wrote it (``checkpoint_meta``); loading a file another trainer wrote fails
naming both trainers and the file, since methods share module names and shapes (KgCoOp would load CoOp's
``prompt_learner`` and report CoOp's accuracy as its own). Resume skips a corrupt newest epoch for the newest intact
one; an explicit load of a corrupt file fails naming it.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from vltune.engine.checkpoint import (
    CorruptCheckpointError,
    load_checkpoint,
    module_folders,
    resolve_checkpoint,
    run_trainer,
    save_checkpoint,
    saved_epochs,
)

logger = logging.getLogger(__name__)


class CheckpointMismatchError(ValueError):
    """A checkpoint (or run folder) was written by another trainer than the one loading it."""


def _canonical_trainer(name: str) -> str:
    """``name`` as registered (aliases resolved), or ``name`` itself when the registry does not know it."""
    from vltune.registry import TRAINERS, RegistryError

    try:
        return TRAINERS.canonical(name)
    except RegistryError:
        return name


def _trainer_config(cfg: Any, trainer: str) -> dict[str, Any]:
    """The values of the config nodes ``trainer`` owns or reads (``TRAINER.COOP.N_CTX``, ...): what fixes the shapes
    of its trainable state. Plain JSON values, so the checkpoint still loads with ``weights_only``."""
    import json

    from vltune.config.identity import trainer_units
    from vltune.config.nodes import flat_keys, under
    from vltune.registry import RegistryError

    try:
        units = trainer_units(trainer)
    except RegistryError:
        return {}
    flat = {k: v for k, v in flat_keys(cfg).items() if under(k, units)}
    return json.loads(json.dumps(flat, default=str))


class TrainerBase:
    """Model registration, the epoch loop skeleton, checkpoints and resume (Dassl's ``TrainerBase``)."""

    #: checkpoint keys that older files carry but that are rebuilt rather than loaded (CoOp's prompt buffers)
    checkpoint_ignore_keys: tuple[str, ...] = ()

    def __init__(self) -> None:
        self._models: OrderedDict[str, nn.Module] = OrderedDict()
        self._optims: OrderedDict[str, torch.optim.Optimizer | None] = OrderedDict()
        self._scheds: OrderedDict[str, Any] = OrderedDict()

    def register_model(self, name: str = "model", model: nn.Module | None = None, optim: Any = None,
                       sched: Any = None) -> None:
        """Declare a trainable module; ``name`` becomes its checkpoint sub-folder. The engine builds optim/sched."""
        if "_models" not in self.__dict__:
            raise AttributeError("call super().__init__() before register_model()")
        assert name not in self._models, f"model name {name!r} is already registered"
        self._models[name], self._optims[name], self._scheds[name] = model, optim, sched

    def get_model_names(self, names: Iterable[str] | str | None = None) -> list[str]:
        if names is None:
            return list(self._models)
        names = [names] if isinstance(names, str) else list(names)
        for n in names:
            if n not in self._models:
                raise KeyError(f"no registered model {n!r}; registered: {list(self._models)}")
        return names

    def update_lr(self, names: Iterable[str] | None = None) -> None:
        for name in self.get_model_names(names):
            if self._scheds[name] is not None:
                self._scheds[name].step()

    def get_current_lr(self, names: Iterable[str] | None = None) -> float:
        name = self.get_model_names(names)[0]
        return self._optims[name].param_groups[0]["lr"] if self._optims[name] else 0.0

    def train(self, start_epoch: int | None = None, max_epoch: int | None = None) -> None:
        """``before_train; for each epoch: before_epoch, run_epoch, after_epoch; after_train``."""
        if start_epoch is not None:
            self.start_epoch = start_epoch
        if max_epoch is not None:
            self.max_epoch = max_epoch
        self.before_train()
        for self.epoch in range(self.start_epoch, self.max_epoch):
            self.before_epoch()
            self.run_epoch()
            self.after_epoch()
        self.after_train()

    def before_train(self) -> None: ...

    def after_train(self) -> None: ...

    def before_epoch(self) -> None: ...

    def after_epoch(self) -> None: ...

    def run_epoch(self) -> None:
        raise NotImplementedError

    # ---- trainable state -------------------------------------------------------------------------------------
    def checkpoint_meta(self) -> dict[str, Any]:
        """What each checkpoint records about its writer: ``trainer`` (``cfg.TRAINER.NAME``, as registered) and
        ``trainer_config`` (its config nodes' values); empty for a trainer without a config."""
        cfg = getattr(self, "cfg", None)
        name = str(cfg.TRAINER.NAME) if cfg is not None and cfg.get("TRAINER") is not None else ""
        if not name:
            return {}
        name = _canonical_trainer(name)
        return {"trainer": name, "trainer_config": _trainer_config(cfg, name)}

    def check_checkpoint_writer(self, ckpt: dict[str, Any], path: str, folder_trainer: str | None = None) -> None:
        """Fail when ``ckpt`` (or, for a file that predates the field, the run folder it came from) was written by
        another trainer; a file that names no trainer in a folder that names none loads (Dassl, older vltune)."""
        mine = self.checkpoint_meta().get("trainer")
        recorded = ckpt.get("trainer")
        theirs = recorded or folder_trainer
        if not mine or not theirs or _canonical_trainer(str(theirs)) == mine:
            return
        where = "" if recorded else " (by its run folder's result.json/config.yaml)"
        raise CheckpointMismatchError(
            f"checkpoint {path} was written by trainer {theirs}{where}, but this run's trainer is {mine}: "
            f"{mine} would report {theirs}'s weights as its own; pass --model-dir of a {mine} run")

    def _read_checkpoints(self, directory: str, epoch: int | None,
                          folder_trainer: str | None = None) -> dict[str, tuple[str, dict[str, Any]]]:
        """Read every registered module's checkpoint for ``epoch`` (see ``resolve_checkpoint``) and check its writer,
        before anything is loaded into a module: ``{name: (path, checkpoint)}``."""
        out = {}
        for name in self.get_model_names():
            path = resolve_checkpoint(os.path.join(directory, name), epoch)
            ckpt = load_checkpoint(path, getattr(self, "device", "cpu"))
            self.check_checkpoint_writer(ckpt, path, folder_trainer)
            out[name] = (path, ckpt)
        return out

    def trainable_state(self, name: str) -> OrderedDict[str, torch.Tensor]:
        """The registered module's trainable parameters and persistent buffers (never frozen weights)."""
        module = self._models[name]
        keep = {n for n, p in module.named_parameters() if p.requires_grad} | {n for n, _ in module.named_buffers()}
        return OrderedDict((k, v.detach().clone()) for k, v in self._models[name].state_dict().items() if k in keep)

    def load_trainable_state(self, name: str, state_dict: dict[str, torch.Tensor], source: str) -> None:
        """Load exactly the expected keys: missing, unexpected or mis-shaped keys fail naming the key and file."""
        module = self._models[name]
        state = {k.removeprefix("module."): v for k, v in state_dict.items()}
        ignored = [k for k in state if k.split(".")[-1] in self.checkpoint_ignore_keys]
        for k in ignored:
            del state[k]
        expected = self.trainable_state(name)
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if missing or unexpected:
            raise KeyError(f"{source}: checkpoint keys do not match module {name!r}: missing {missing}, "
                           f"unexpected {unexpected}")
        for k, v in state.items():
            if tuple(v.shape) != tuple(expected[k].shape):
                raise ValueError(f"{source}: key {k!r} has shape {tuple(v.shape)} but module {name!r} expects "
                                 f"{tuple(expected[k].shape)} (was it trained with another class set or N_CTX?)")
        module.load_state_dict(state, strict=False)

    def save_model(self, epoch: int, directory: str, is_best: bool = False, val_result: float | None = None) -> None:
        """One checkpoint per registered module in ``directory/<name>/``; ``epoch`` is 0-based."""
        for name in self._models:
            state = {"state_dict": self.trainable_state(name), "epoch": epoch + 1, "val_result": val_result,
                     "optimizer": self._optims[name].state_dict() if self._optims[name] else None,
                     "scheduler": self._scheds[name].state_dict() if self._scheds[name] else None,
                     **self.checkpoint_meta()}
            save_checkpoint(state, os.path.join(directory, name), is_best=is_best)

    def resume_model_if_exist(self, directory: str) -> int:
        """Resume every registered module from the newest epoch they all saved intact; return the epoch to start from.

        A run killed between two modules' saves leaves them an epoch apart: the common epoch keeps them consistent.
        A corrupt file (a truncated copy, a disk fault) is skipped with a warning naming it, for the next older epoch
        they all hold; every module's file of an epoch is read before any is loaded, so modules never mix epochs.
        """
        names = self.get_model_names()
        common = set.intersection(*(set(saved_epochs(os.path.join(directory, n))) for n in names)) if names else set()
        if not common:
            logger.info("No checkpoint found, train from scratch")
            return 0
        logger.info(f"Found checkpoint at {directory} (will resume training)")
        for epoch in sorted(common, reverse=True):
            try:
                ckpts = self._read_checkpoints(directory, epoch)
            except CorruptCheckpointError as e:
                logger.warning(f"{e}; resuming from an older epoch checkpoint instead")
                continue
            for name, (path, ckpt) in ckpts.items():
                self.load_trainable_state(name, ckpt["state_dict"], path)
                if self._optims[name] is not None and ckpt.get("optimizer"):
                    self._optims[name].load_state_dict(ckpt["optimizer"])
                if self._scheds[name] is not None and ckpt.get("scheduler"):
                    self._scheds[name].load_state_dict(ckpt["scheduler"])
            if epoch != max(common):
                logger.warning(f"Resumed from epoch {epoch}, not {max(common)}: newer checkpoints are corrupt")
            return epoch
        logger.warning(f"Every checkpoint in {directory} is corrupt, train from scratch")
        return 0

    def load_model(self, directory: str, epoch: int | None = None) -> None:
        """Load trainable weights from a previous run folder (``--model-dir``/``--load-epoch``).

        Fails naming the file for a corrupt checkpoint or one another trainer wrote, and, for a missing module
        folder, names the module folders the run holds and the trainer that made it.
        """
        names = self.get_model_names()
        if not names:
            logger.warning("Note that load_model() is skipped as no pretrained model is given")
            return
        folder_trainer = run_trainer(directory)
        missing = [n for n in names if not os.path.isdir(os.path.join(directory, n))]
        if missing and os.path.isdir(directory):
            mine = self.checkpoint_meta().get("trainer") or type(self).__name__
            held = module_folders(directory)
            made_by = f", written by trainer {folder_trainer}" if folder_trainer else ""
            raise FileNotFoundError(
                f"{directory} has no checkpoint folder {', '.join(missing)} that {mine} needs; it holds module "
                f"folders: {', '.join(held) or 'none'}{made_by}. Pass --model-dir of a {mine} run")
        for name, (path, ckpt) in self._read_checkpoints(directory, epoch, folder_trainer).items():
            logger.info(f'Loading weights to {name} from "{path}" (epoch = {ckpt.get("epoch")})')
            self.load_trainable_state(name, ckpt["state_dict"], path)
            self.loaded_epoch = ckpt.get("epoch")
