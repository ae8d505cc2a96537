"""The trainer base: Dassl's lifecycle and hooks; the loop, precision, schedule, checkpoints and cost in one place.

A method subclasses ``TrainerX`` and implements:

* ``build_model()``: build ``self.model`` (an ``nn.Module`` holding the CLIP backbone and the method's modules) and
  call ``register_model(name, module)`` for each trainable part. The name is the checkpoint sub-folder (Dassl's
  ``prompt_learner``, ``clip_adapter``, …); by default a registered module's parameters are the trainable set.
* ``losses(batch) -> {name: term}``: the weighted loss terms on a batch already on the device; the objective is
  their sum (open_clip's ``*_loss`` convention). Every term is logged per step (``loss_<name>``) and per epoch, and
  each epoch's means are recorded in ``result.json``'s ``train`` list; ``log_metric`` adds other step metrics
  (training accuracy).
* ``inference(images) -> logits``: (B, 3, H, W) → (B, C) for the current class set.

Optional: ``trainable_parameters()`` (a narrower set), ``param_groups(name, module, params)`` (per-group LR),
``build_teachers()`` (frozen reference features, once the model is on its device and in its precision),
``before_evaluate`` (cache text features once per evaluation), the epoch/train hooks (call ``super()``), and
``forward_backward`` only when the update itself differs from "backward the sum, step" (ProGrad), with a comment
saying so.

The engine freezes everything outside the trainable set, asserts the optimizers hold exactly that set, steps the LR
once per epoch, owns precision (fp32 / amp / fp16), gradient clipping, checkpoints of the trainable state, resume,
the cost meter and the training curves (``metrics.jsonl`` and TensorBoard events, ``vltune.engine.curves``).
"""

from __future__ import annotations

import datetime
import logging
import os
import random
import time
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch import nn
from yacs.config import CfgNode

from vltune.engine.base import TrainerBase
from vltune.engine.checkpoint import load_checkpoint, saved_epochs
from vltune.engine.cost import CostMeter, peak_rss_mb
from vltune.engine.curves import Curves
from vltune.engine.optim import build_lr_scheduler, build_optimizer
from vltune.engine.precision import Precision, precision_setting
from vltune.evaluation import build_evaluator

logger = logging.getLogger(__name__)


def set_random_seed(seed: int) -> None:
    """Seed python, numpy and torch (every CUDA device)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.cuda.manual_seed_all(seed)


class _Meter:
    def __init__(self) -> None:
        self.val, self.sum, self.n = 0.0, 0.0, 0

    def update(self, v: float, n: int = 1) -> None:
        self.val, self.sum, self.n = v, self.sum + v * n, self.n + n

    @property
    def avg(self) -> float:
        return self.sum / max(self.n, 1)


class TrainerX(TrainerBase):
    """A supervised trainer on labelled data (``train_loader_x``); every vltune method derives from it."""

    def __init__(self, cfg: CfgNode, *, eval_only: bool = False) -> None:
        super().__init__()
        self.cfg = cfg
        self.eval_only = eval_only
        self.check_cfg(cfg)
        use_cuda = cfg.USE_CUDA and torch.cuda.is_available()
        self.device = torch.device("cuda") if use_cuda else torch.device("cpu")
        self.precision = Precision(self.precision_mode(), self.device)
        self.start_epoch = self.epoch = 0
        self.max_epoch = int(cfg.OPTIM.MAX_EPOCH)
        self.output_dir = cfg.OUTPUT_DIR
        self.cost = CostMeter(self.device)
        self.steps_run = 0  # training steps this run has taken (the cost meter samples the second)
        self.loaded_epoch: int | None = None
        self.resumed_from = 0
        self.last_metrics: dict[str, Any] = {}
        self.best_result = -float("inf")
        self.teachers: dict[str, torch.Tensor] = {}  # frozen references from build_teachers (never saved)
        self.train_history: list[dict[str, float]] = []  # per trained epoch: the means of every logged metric
        self._step_metrics: dict[str, float] = {}
        self.curves: Curves | None = None  # metrics.jsonl and tensorboard, open while train() runs
        self.last_split = ""
        self.build_data_loader()
        self.build_model()
        self._setup_model()
        self.evaluator = build_evaluator(cfg, lab2cname=self.lab2cname)
        self.cost.reset_peak()

    # ---- configuration ---------------------------------------------------------------------------------------
    #: the method's config node under TRAINER (e.g. "COOP"); a non-empty PREC there wins over TRAINER.PREC
    config_node: str | None = None
    #: other config nodes the method reads (e.g. a plugin's node, a parent method's node): with the nodes its
    #: add_config creates and ``config_node`` they form the config part of a run's identity; collected along the
    #: class hierarchy (``vltune.config.identity.trainer_units``)
    config_reads: tuple[str, ...] = ()

    def check_cfg(self, cfg: CfgNode) -> None:
        """Validate settings before anything is built (methods override and call super)."""
        if cfg.TEST.FINAL_MODEL not in ("last_step", "best_val"):
            raise ValueError(f"TEST.FINAL_MODEL {cfg.TEST.FINAL_MODEL!r}: choose 'last_step' or 'best_val'")

    def precision_mode(self) -> str:
        return precision_setting(self.cfg, self.config_node)[1]

    # ---- building --------------------------------------------------------------------------------------------
    def build_data_loader(self) -> None:
        """Build ``self.dm`` and Dassl's loader attributes (no training split in eval-only runs)."""
        from vltune.data import DataManager

        self.dm = DataManager(self.cfg, load_train=not self.eval_only)
        self.train_loader_x = self.dm.train_loader_x
        self.val_loader = self.dm.val_loader
        self.test_loader = self.dm.test_loader
        self.num_classes = self.dm.num_classes
        self.lab2cname = self.dm.lab2cname
        self.classnames = list(self.dm.classnames)

    def build_model(self) -> None:
        raise NotImplementedError

    def build_clip(self) -> nn.Module:
        """The shared CLIP backbone from ``MODEL.BACKBONE.NAME``/``WEIGHTS``/``PRETRAINED`` (fp32, CPU; the engine
        moves it)."""
        from vltune.clip import build_backbone

        backbone = self.cfg.MODEL.BACKBONE
        clip = build_backbone(backbone.NAME, backbone.WEIGHTS, pretrained=backbone.PRETRAINED)
        clip.truncate_text = bool(backbone.TRUNCATE_TEXT)
        size = tuple(self.cfg.INPUT.SIZE)
        if size[0] != clip.image_size:
            n = clip.image_size
            raise ValueError(f"INPUT.SIZE {size} does not match the backbone's input resolution {n} "
                             f"({backbone.NAME}); set INPUT.SIZE ({n}, {n})")
        return clip

    @property
    def template(self) -> str:
        """The dataset's hand-written prompt template (CoOp's CUSTOM_TEMPLATES entry), e.g. "{} texture."."""
        return self.dm.dataset.template

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The declared trainable set; by default every parameter of the registered modules."""
        seen, out = set(), []
        for module in self._models.values():
            for p in module.parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
        return out

    def param_groups(self, name: str, module: nn.Module, params: list[nn.Parameter]) -> list[dict[str, Any]] | None:
        """Per-group settings for ``name``'s optimizer (e.g. staged LR); None means one group at ``OPTIM.LR``."""
        return None

    def _setup_model(self) -> None:
        if not isinstance(getattr(self, "model", None), nn.Module):
            raise TypeError(f"{type(self).__name__}.build_model() must set self.model to an nn.Module")
        inside = {id(m) for m in self.model.modules()}
        for name, module in self._models.items():
            if id(module) not in inside:
                raise ValueError(f"registered module {name!r} is not a submodule of self.model")
        trainable = self.trainable_parameters()
        wanted = {id(p) for p in trainable}
        for p in self.model.parameters():
            p.requires_grad_(id(p) in wanted)
        if len(wanted) != sum(1 for p in self.model.parameters() if id(p) in wanted):
            raise ValueError("trainable_parameters() returned parameters that are not part of self.model")
        if self.cfg.MODEL.INIT_WEIGHTS:
            self._load_init_weights(self.cfg.MODEL.INIT_WEIGHTS)
        self.model.to(self.device)
        self.precision.prepare(self.model)
        with torch.no_grad():
            self.build_teachers()
        if not self.eval_only:
            in_optim: set[int] = set()
            for name, module in self._models.items():
                params = [p for p in module.parameters() if p.requires_grad and id(p) not in in_optim]
                if not params:
                    continue
                in_optim |= {id(p) for p in params}
                groups = self.param_groups(name, module, params)
                optim = build_optimizer(groups if groups is not None else params, self.cfg.OPTIM)
                self._optims[name], self._scheds[name] = optim, build_lr_scheduler(optim, self.cfg.OPTIM)
            held = {id(p) for o in self._optims.values() if o for g in o.param_groups for p in g["params"]}
            if held != wanted:
                raise AssertionError(f"optimizers hold {len(held)} tensors but the trainable set has {len(wanted)}")
        n_train = sum(p.numel() for p in trainable)
        n_total = sum(p.numel() for p in self.model.parameters())
        self.n_trainable, self.n_total = n_train, n_total
        logger.info(f"trainable params: {n_train:,} || all params: {n_total:,} || "
                    f"trainable%: {100.0 * n_train / max(n_total, 1):.4f}")
        logger.info(f"Trainable params: {n_train}")

    def build_teachers(self) -> None:
        """Compute the method's frozen references (a teacher's class text features, zero-shot weights) into
        ``self.teachers``: called once, without autograd, after ``build_model`` when the model is on its device and in
        its precision, in training and evaluation runs alike (``self.eval_only`` tells a method what it can skip)."""

    def _load_init_weights(self, path: str) -> None:
        """``MODEL.INIT_WEIGHTS``: a checkpoint file of the (single) registered module, loaded strictly."""
        if len(self._models) != 1:
            raise ValueError(f"MODEL.INIT_WEIGHTS needs exactly one registered module, {type(self).__name__} has "
                             f"{list(self._models)}; use --model-dir with --eval-only instead")
        name = next(iter(self._models))
        state = load_checkpoint(path)
        self.load_trainable_state(name, state.get("state_dict", state), path)
        logger.info(f'Initialised {name} from "{path}"')

    # ---- training --------------------------------------------------------------------------------------------
    def train(self, start_epoch: int | None = None, max_epoch: int | None = None) -> None:
        """Train, then test; a method without trainable modules (zero-shot) goes straight to testing."""
        if not self._models:
            logger.info(f"{type(self).__name__} has no trainable parameters: evaluating without training")
            self.time_start = time.time()
            self.after_train()
            return
        try:
            super().train(start_epoch, max_epoch)
        finally:
            if self.curves is not None:  # a crash still flushes what was written and stops the writer's thread
                self.curves.close()

    def set_model_mode(self, mode: str = "train") -> None:
        """Frozen parts stay in eval mode (BatchNorm statistics of RN backbones); registered modules follow mode."""
        self.model.eval()
        for module in self._models.values():
            module.train(mode == "train")

    def to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        out = dict(batch)
        for key in ("img", "label"):
            v = batch[key]
            out[key] = [t.to(self.device, non_blocking=True) for t in v] if isinstance(v, list) else v.to(
                self.device, non_blocking=True)
        return out

    def losses(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The method's weighted loss terms on a batch (each a scalar tensor); the objective is their sum."""
        raise NotImplementedError

    def log_metric(self, name: str, value: float) -> None:
        """Report a step metric besides the loss terms (e.g. ``acc``), from inside ``losses``."""
        self._step_metrics[name] = float(value)

    def loss(self, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        """The objective on a batch, ``sum(losses(batch))``, and the step metrics: every term as ``loss_<name>``
        and what ``losses`` reported through ``log_metric``."""
        self._step_metrics = {}
        terms = self.losses(batch)
        if not terms:
            raise ValueError(f"{type(self).__name__}.losses() returned no loss term")
        total = sum(terms.values())
        values = torch.stack([term.detach().float().reshape(()) for term in terms.values()]).tolist()  # one sync
        return total, {**{f"loss_{name}": v for name, v in zip(terms, values)}, **self._step_metrics}

    def inference(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def model_inference(self, images: torch.Tensor) -> torch.Tensor:
        """Dassl's name for ``inference``."""
        return self.inference(images)

    def forward_backward(self, batch: dict[str, Any]) -> dict[str, float]:
        """One optimisation step: loss under the precision context, backward, clip, step."""
        with self.precision.autocast():
            loss, metrics = self.loss(batch)
        self.model_backward_and_update(loss)
        return {"loss": float(loss.detach()), **metrics}

    def model_backward_and_update(self, loss: torch.Tensor, names: Iterable[str] | None = None) -> None:
        names = [n for n in self.get_model_names(names) if self._optims[n] is not None]
        if not torch.isfinite(loss).all():
            raise FloatingPointError("Loss is infinite or NaN!")
        if not names:  # nothing trainable (zero-shot): a step changes nothing
            return
        for n in names:
            self._optims[n].zero_grad(set_to_none=True)
        self.precision.backward(loss)
        self.step_optimizers(names)

    def step_optimizers(self, names: Iterable[str] | None = None) -> None:
        """Unscale, clip (``OPTIM.MAX_GRAD_NORM``) and step; for methods that produce gradients themselves."""
        names = [n for n in self.get_model_names(names) if self._optims[n] is not None]
        max_norm = float(self.cfg.OPTIM.MAX_GRAD_NORM)
        for n in names:
            self.precision.unscale(self._optims[n])
            if max_norm > 0:
                params = [p for g in self._optims[n].param_groups for p in g["params"]]
                torch.nn.utils.clip_grad_norm_(params, max_norm)
            self.precision.step(self._optims[n])
        self.precision.update()

    def before_train(self) -> None:
        directory = self.cfg.RESUME or self.output_dir
        self.start_epoch = self.resumed_from = self.resume_model_if_exist(directory)
        self.curves = Curves(self.output_dir, self.start_epoch, tensorboard=bool(self.cfg.TRAIN.TENSORBOARD))
        self.train_history = self.curves.history()  # a resumed run's record covers the epochs before the resume too
        self.time_start = time.time()

    def before_epoch(self) -> None:
        # Seeding per epoch makes a resumed run replay exactly what an uninterrupted run would have done.
        if self.cfg.SEED >= 0:
            epoch_seed = self.cfg.SEED * 100_003 + self.epoch
            set_random_seed(epoch_seed)
            generator = getattr(self.train_loader_x, "generator", None)
            if generator is not None:
                generator.manual_seed(epoch_seed)

    def run_epoch(self) -> None:
        self.set_model_mode("train")
        meters: dict[str, _Meter] = {}
        batch_time, data_time = _Meter(), _Meter()
        self.num_batches = len(self.train_loader_x)
        if self.curves is not None:
            self.curves.open_tensorboard(purge_step=self.epoch * self.num_batches)
        with self.cost.phase("train"):
            end = time.time()
            for self.batch_idx, batch in enumerate(self.train_loader_x):
                self.cost.first_batch()
                data_time.update(time.time() - end)
                batch = self.to_device(batch)
                n = len(batch["label"])
                # The meter samples the run's second step (after a warm one), counted across epochs, so a run with
                # one batch per epoch samples its second epoch's. A one-step run samples its only step, whose time
                # then counts as training time (there is no other), profiling included.
                only = self.steps_run == 0 and self.num_batches * (self.max_epoch - self.start_epoch) == 1
                if self.steps_run == 1 or only:
                    metrics = self.cost.metered_step(lambda: self.forward_backward(batch), "train", apart=not only)
                else:
                    metrics = self.forward_backward(batch)
                if self.steps_run != 1:
                    self.cost.count("train", n)
                    self.cost.count("train_batches", 1)
                self.steps_run += 1
                for k, v in metrics.items():
                    meters.setdefault(k, _Meter()).update(float(v), n)
                batch_time.update(time.time() - end)
                end = time.time()
                if self._should_print():
                    self._print_progress(meters, batch_time, data_time)
                    if self.curves is not None:
                        step = self.epoch * self.num_batches + self.batch_idx
                        self.curves.step(self.epoch + 1, step, {**metrics, "lr": self.get_current_lr(),
                                                                **self.group_lrs(), "time/step": batch_time.val,
                                                                "time/data": data_time.val})
        self._end_epoch_metrics(meters)

    def _end_epoch_metrics(self, meters: dict[str, _Meter]) -> None:
        """Log this epoch's mean of every step metric (each loss term included) and keep it for the record."""
        summary = {"epoch": self.epoch + 1, **{k: m.avg for k, m in meters.items()}, "lr": self.get_current_lr()}
        self.train_history.append(summary)
        if self.curves is not None:
            self.curves.epoch(self.epoch + 1, (self.epoch + 1) * self.num_batches - 1, {**summary, **self.group_lrs()})
        logger.info(f"epoch [{self.epoch + 1}/{self.max_epoch}] means: "
                    + " ".join(f"{k} {v:.4f}" if k != "lr" else f"lr {v:.4e}" for k, v in summary.items()
                               if k != "epoch"))

    def group_lrs(self) -> dict[str, float]:
        """The learning rate of every parameter group, ``lr/<optimizer>/<group>``: the optimizer by its registered
        name, the group by its ``name`` entry or else its index."""
        return {f"lr/{name}/{group.get('name', i)}": group["lr"] for name, optim in self._optims.items() if optim
                for i, group in enumerate(optim.param_groups)}

    def _write_evaluation(self, final: bool) -> None:
        """The evaluation just run, into the curves of a training run (none in evaluation-only runs)."""
        if self.curves is None or self.curves.closed:
            return
        batches = getattr(self, "num_batches", 0) or len(self.train_loader_x)
        epoch, step = (self.max_epoch, self.max_epoch * batches) if final else (self.epoch + 1,
                                                                                 (self.epoch + 1) * batches - 1)
        self.curves.evaluation(epoch, step, self.last_split, self.last_metrics, final)

    def _should_print(self) -> bool:
        freq = self.cfg.TRAIN.PRINT_FREQ
        return (self.batch_idx + 1) % freq == 0 or self.num_batches < freq

    def _print_progress(self, meters: dict[str, _Meter], batch_time: _Meter, data_time: _Meter) -> None:
        left = (self.num_batches - self.batch_idx - 1) + (self.max_epoch - self.epoch - 1) * self.num_batches
        eta = str(datetime.timedelta(seconds=int(batch_time.avg * left)))
        parts = [f"epoch [{self.epoch + 1}/{self.max_epoch}]", f"batch [{self.batch_idx + 1}/{self.num_batches}]",
                 f"time {batch_time.val:.3f} ({batch_time.avg:.3f})",
                 f"data {data_time.val:.3f} ({data_time.avg:.3f})"]
        parts += [f"{k} {m.val:.4f} ({m.avg:.4f})" for k, m in meters.items()]
        parts += [f"lr {self.get_current_lr():.4e}", f"eta {eta}"]
        logger.info(" ".join(parts))

    def after_epoch(self) -> None:
        self.update_lr()
        if self.cfg.TEST.FINAL_MODEL == "best_val" and self.val_loader is not None:
            result = self.test(split="val")
            self._write_evaluation(final=False)
            if result > self.best_result:
                self.best_result = result
                self.save_model(self.epoch, self.output_dir, is_best=True, val_result=result)
        last = self.epoch + 1 == self.max_epoch
        freq = self.cfg.TRAIN.CHECKPOINT_FREQ
        keep = last or (freq > 0 and (self.epoch + 1) % freq == 0)
        if keep or self.cfg.TRAIN.RESUME_CHECKPOINT:
            self.save_model(self.epoch, self.output_dir)
            self._drop_stale_resume_checkpoints(keep_epoch=self.epoch + 1)

    def _drop_stale_resume_checkpoints(self, keep_epoch: int) -> None:
        """Keep only the two newest resume checkpoints besides the ones Dassl's rules keep (last, every FREQ).

        The one before the newest is what resume falls back to when the newest turns out corrupt.
        """
        freq = self.cfg.TRAIN.CHECKPOINT_FREQ
        for name in self._models:
            folder = os.path.join(self.output_dir, name)
            for e in saved_epochs(folder):
                kept_by_rule = e == self.max_epoch or (freq > 0 and e % freq == 0)
                if e not in (keep_epoch, keep_epoch - 1) and not kept_by_rule:
                    os.remove(os.path.join(folder, f"model.pth.tar-{e}"))

    def after_train(self) -> None:
        logger.info("Finish training")
        seconds = self.cost.seconds.get("train", 0.0) - self.cost.seconds.get("meter", 0.0)
        batches_per_s = self.cost.images.get("train_batches", 0) / seconds if seconds > 0 else 0.0
        logger.info(f"Training time: {seconds:.2f}s, Speed: {batches_per_s:.2f} batch/s")  # SkipTuning's line
        if not self.cfg.TEST.NO_TEST:
            if self.cfg.TEST.FINAL_MODEL == "best_val" and self._models and self.val_loader is not None:
                logger.info("Deploy the model with the best val performance")
                self.load_model(self.output_dir)
            else:
                logger.info("Deploy the last-epoch model")
            self.test()
            self._write_evaluation(final=True)
        elapsed = str(datetime.timedelta(seconds=round(time.time() - self.time_start)))
        logger.info(f"Elapsed: {elapsed}")

    # ---- evaluation ------------------------------------------------------------------------------------------
    def before_evaluate(self) -> None:
        """Called once per evaluation under no_grad: cache class text features here."""

    def after_evaluate(self) -> None:
        """Drop what ``before_evaluate`` cached."""

    @torch.no_grad()
    def test(self, split: str | None = None) -> float:
        """Evaluate on ``split`` (default ``TEST.SPLIT``); returns accuracy and keeps all metrics in last_metrics."""
        self.set_model_mode("eval")
        self.evaluator.reset()
        split = split or self.cfg.TEST.SPLIT
        loader = self.val_loader if split == "val" and self.val_loader is not None else self.test_loader
        split = "val" if loader is self.val_loader else "test"
        logger.info(f"Evaluate on the *{split}* set")
        phase = "eval" if split == "test" else "val"  # model selection on val is not the reported eval cost
        # The test evaluation's memory is metered on its second batch (or its only one), timed apart like the
        # training step's unless it is the only batch.
        n_batches = len(loader)
        sample = (1 if n_batches > 1 else 0) if phase == "eval" else -1
        if phase == "eval" and n_batches == 0:
            self.cost.unmetered("eval", "the test loader has no batches")
        with self.cost.phase(phase):
            with self.precision.autocast():
                self.before_evaluate()
            try:
                for i, batch in enumerate(loader):
                    self.cost.first_batch()  # an evaluation-only job's start-up ends here
                    if i == sample:
                        n = self.cost.metered_step(lambda: self._evaluate_batch(batch), "eval", apart=n_batches > 1)
                    else:
                        n = self._evaluate_batch(batch)
                    if i != sample or n_batches == 1:
                        self.cost.count(phase, n)
            finally:
                self.after_evaluate()
        self.last_metrics, self.last_split = self.evaluator.evaluate(), split
        if phase == "eval":
            seconds, speed = self.cost.net_seconds("eval"), self.cost.throughput("eval")
            logger.info(f"Test time: {seconds:.2f}s, Speed: {speed:.2f} img/s")
        return self.last_metrics["accuracy"]

    def _evaluate_batch(self, batch: dict[str, Any]) -> int:
        """Infer one evaluation batch into the evaluator; returns its number of images."""
        images = batch["img"].to(self.device, non_blocking=True)
        with self.precision.autocast():
            logits = self.model_inference(images)
        self.evaluator.process(logits.float(), batch["label"])
        return len(images)

    # ---- the record ------------------------------------------------------------------------------------------
    def method_record(self) -> dict[str, Any]:
        """Facts a method reports about how it ran (e.g. which class descriptions it used); result.json's
        ``method`` entry. Override to add them; JSON-serialisable values only."""
        return {}

    def cost_record(self) -> dict[str, Any]:
        """Measured cost of this run so far, in result.json's units.

        The sampled steps run inside the train and eval phases but are profiled: their time counts as metering
        (``meter_time_s``, ``eval_meter_time_s``), not as training or evaluation. A peak that could not be metered
        is None, with the reason in ``meter_notes``. ``startup_s``: from the runner's launch of the job to its first
        batch (None outside a runner)."""
        train_peak, train_method = self.cost.peak_mb("train")
        eval_peak, eval_method = self.cost.peak_mb("eval")
        ckpt_bytes = sum(t.numel() * t.element_size() for n in self._models for t in self.trainable_state(n).values())
        seconds = self.cost.seconds
        return {"train_time_s": self.cost.net_seconds("train"), "cache_time_s": seconds.get("cache", 0.0),
                "meter_time_s": seconds.get("meter", 0.0), "eval_time_s": self.cost.net_seconds("eval"),
                "eval_meter_time_s": seconds.get("eval_meter", 0.0), "images_per_s": self.cost.throughput("train"),
                "eval_images_per_s": self.cost.throughput("eval"), "train_peak_mb": train_peak,
                "train_peak_method": train_method, "eval_peak_mb": eval_peak, "eval_peak_method": eval_method,
                "peak_rss_mb": peak_rss_mb(), "startup_s": self.cost.startup_s(), "meter_notes": list(self.cost.notes),
                "trainable_params": self.n_trainable, "total_params": self.n_total, "ckpt_bytes": ckpt_bytes}
