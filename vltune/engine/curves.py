"""Training curves: ``metrics.jsonl`` and TensorBoard event files in a run's output folder.

The training loop owns one ``Curves`` per ``train()`` call (opened in ``before_train``, closed when training ends or
fails), so ``tensorboard --logdir output/`` works as it does for Dassl users and the report can plot training loss
without reading logs. Eval-only runs never open one.

``<output>/metrics.jsonl`` holds one JSON object per line, each flushed as it is written (a crash keeps what was
written; a line torn by a kill is skipped when read):

* ``{"kind": "step", "epoch", "step", "loss", "loss_<term>"..., "acc", "lr", "lr/<optimizer>/<group>"...,
  "time/step", "time/data"}`` every ``TRAIN.PRINT_FREQ`` steps, with the log's progress line: that step's values;
* ``{"kind": "epoch", "epoch", "step", ...}`` at each epoch's end: the epoch's means (what result.json's ``train``
  list records) plus the learning rate of every parameter group;
* ``{"kind": "eval", "epoch", "step", "split", "final", "accuracy", "error", "macro_f1"}`` after each evaluation
  of a training run (per epoch on val with ``TEST.FINAL_MODEL best_val``; ``final``: the test after training).

``epoch`` counts from 1; ``step`` is the global iteration, Dassl's ``epoch * num_batches + batch_idx``: an epoch line
and that epoch's evaluation sit at its last iteration, the final test one past the last.

``<output>/tensorboard/`` (Dassl's place) gets the same numbers as scalars at the same steps: ``train/<key>``
(``train/loss``, ``train/loss_ce``, ``train/acc``, ``train/lr``...), ``epoch/<key>`` and Dassl's ``<split>/accuracy``,
``<split>/error_rate``, ``<split>/macro_f1``. The ``tensorboard`` package is imported only here and only when wanted;
without it one warning is logged and metrics.jsonl is still written.

Resume: a run resumed at epoch ``E`` (``E`` epochs done) keeps the lines of epochs ``<= E`` and drops the rest
(a partial epoch, epochs past the checkpoint, an earlier final test), so no epoch appears twice; its event file
starts with TensorBoard's purge marker at the first step it redoes, which hides the stale events of the run before.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from vltune.fileio import atomic_write

logger = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
#: the evaluator's metrics under Dassl's tensorboard names (``test/accuracy``, ``test/error_rate``, ...)
EVAL_TAGS = {"accuracy": "accuracy", "error": "error_rate", "macro_f1": "macro_f1"}


def read_metrics(path: str) -> list[dict[str, Any]]:
    """The objects of a ``metrics.jsonl`` in order ([] when the file is missing); a line that is not a JSON object
    (the last one, torn by a killed process) is skipped."""
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except FileNotFoundError:
        return []
    out = []
    for line in lines:
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            out.append(obj)
    return out


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class Curves:
    """The writer of one training run's curves; see the module docstring for the files and their fields.

    Args:
        output_dir: the run's folder (``cfg.OUTPUT_DIR``).
        start_epoch: epochs already done (the resume point, 0 for a fresh run); lines of later epochs are dropped.
        tensorboard: also write TensorBoard event files (``TRAIN.TENSORBOARD``).
    """

    def __init__(self, output_dir: str, start_epoch: int = 0, *, tensorboard: bool = True) -> None:
        self.path = os.path.join(output_dir, METRICS_FILE)
        self.tensorboard_dir = os.path.join(output_dir, TENSORBOARD_DIR)
        old = read_metrics(self.path)
        kept = [e for e in old if not e.get("final") and _is_number(e.get("epoch")) and e["epoch"] <= start_epoch]
        if os.path.exists(self.path):
            atomic_write(self.path, "".join(json.dumps(e) + "\n" for e in kept).encode())
        if len(kept) < len(old):
            logger.info(f"{self.path}: dropped {len(old) - len(kept)} line(s) past epoch {start_epoch} (resumed run)")
        os.makedirs(output_dir, exist_ok=True)
        self._file = open(self.path, "a", encoding="utf-8")
        self._want_tensorboard = tensorboard
        self._writer: Any = None
        self.closed = False

    def history(self) -> list[dict[str, Any]]:
        """The epoch means this file holds (a resumed run's epochs before the resume), as ``result.json``'s ``train``
        list records them: ``epoch``, every logged mean, ``lr`` (without the per-group learning rates)."""
        return [{k: v for k, v in e.items() if k not in ("kind", "step") and not k.startswith("lr/")}
                for e in read_metrics(self.path) if e.get("kind") == "epoch"]

    def open_tensorboard(self, purge_step: int) -> None:
        """Start the event file (once; later calls do nothing); events of an earlier run at steps >= ``purge_step``
        are hidden, so call it with the first step this run writes."""
        if self._writer is not None or not self._want_tensorboard or self.closed:
            return
        self._want_tensorboard = False  # one try: a missing package warns once
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            logger.warning(f"TensorBoard event files are not written ({e}): pip install tensorboard, or set "
                           "TRAIN.TENSORBOARD False to silence this; metrics.jsonl is still written")
            return
        self._writer = SummaryWriter(log_dir=self.tensorboard_dir, purge_step=purge_step)

    def _write(self, kind: str, epoch: int, step: int, values: dict[str, Any], prefix: str,
               tags: dict[str, str] | None = None) -> None:
        line = {"kind": kind, "epoch": epoch, "step": step, **{k: v for k, v in values.items() if k != "epoch"}}
        self._file.write(json.dumps(line) + "\n")
        self._file.flush()
        self.open_tensorboard(step)
        if self._writer is None:
            return
        for key, value in values.items():
            name = key if tags is None else tags.get(key)
            if name and key != "epoch" and _is_number(value):
                self._writer.add_scalar(f"{prefix}/{name}", value, step)

    def step(self, epoch: int, step: int, values: dict[str, float]) -> None:
        """A training step's values (losses, metrics, learning rates, times) as ``train/<key>``."""
        self._write("step", epoch, step, values, "train")

    def epoch(self, epoch: int, step: int, means: dict[str, float]) -> None:
        """An epoch's means as ``epoch/<key>``."""
        self._write("epoch", epoch, step, means, "epoch")
        if self._writer is not None:
            self._writer.flush()

    def evaluation(self, epoch: int, step: int, split: str, metrics: dict[str, Any], final: bool) -> None:
        """An evaluation's scalar metrics as Dassl's ``<split>/<name>``; ``final``: the test after training."""
        values = {k: v for k, v in metrics.items() if _is_number(v) and k in EVAL_TAGS}
        self._write("eval", epoch, step, {"split": split, "final": final, **values}, split, EVAL_TAGS)

    def close(self) -> None:
        """Flush and close both files (and the event writer's thread); safe to call twice."""
        if self.closed:
            return
        self.closed = True
        try:
            self._file.close()
        finally:
            if self._writer is not None:
                self._writer.close()
