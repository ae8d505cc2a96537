"""Classification evaluator: accuracy, macro-F1 and per-class accuracy, printed in Dassl's exact lines.

Existing parsers read ``=> result`` and ``* accuracy: X%`` (one decimal, Dassl ≥ 0.6.2), so those lines are kept;
the full-precision numbers go to result.json.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from yacs.config import CfgNode

from vltune.registry import EVALUATORS

logger = logging.getLogger(__name__)


@EVALUATORS.register()
class Classification:
    """Accumulates predictions over batches; ``evaluate()`` returns and prints the metrics."""

    def __init__(self, cfg: CfgNode | None = None, lab2cname: dict[int, str] | None = None) -> None:
        self.per_class_result = bool(cfg.TEST.PER_CLASS_RESULT) if cfg is not None else False
        self.lab2cname = dict(lab2cname or {})
        self.reset()

    def reset(self) -> None:
        self._pred: list[torch.Tensor] = []
        self._true: list[torch.Tensor] = []

    def process(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        """Add one batch. Input: logits (B, C), labels (B,)."""
        self._pred.append(logits.argmax(dim=1).detach().cpu())
        self._true.append(labels.detach().cpu())

    def evaluate(self) -> dict[str, Any]:
        """Metrics in percent: accuracy, error, macro_f1, per_class (class name → accuracy), total, correct."""
        pred = torch.cat(self._pred) if self._pred else torch.zeros(0, dtype=torch.long)
        true = torch.cat(self._true) if self._true else torch.zeros(0, dtype=torch.long)
        total, correct = int(true.numel()), int((pred == true).sum())
        acc = 100.0 * correct / max(total, 1)
        per_class: dict[str, float] = {}
        f1s = []
        for label in torch.unique(true).tolist():  # macro-F1 over the classes present in the ground truth (Dassl)
            is_true, is_pred = true == label, pred == label
            tp = int((is_true & is_pred).sum())
            fp, fn = int((~is_true & is_pred).sum()), int((is_true & ~is_pred).sum())
            f1s.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
            per_class[self.lab2cname.get(label, str(label))] = 100.0 * tp / int(is_true.sum())
        macro_f1 = 100.0 * sum(f1s) / max(len(f1s), 1)
        logger.info("=> result")
        logger.info(f"* total: {total:,}")
        logger.info(f"* correct: {correct:,}")
        logger.info(f"* accuracy: {acc:.1f}%")
        logger.info(f"* error: {100.0 - acc:.1f}%")
        logger.info(f"* macro_f1: {macro_f1:.1f}%")
        if self.per_class_result:
            for label in torch.unique(true).tolist():
                name = self.lab2cname.get(label, str(label))
                n, ok = int((true == label).sum()), int(((true == label) & (pred == label)).sum())
                logger.info(f"* class: {label} ({name})\ttotal: {n:,}\tcorrect: {ok:,}\tacc: {per_class[name]:.1f}%")
            logger.info(f"* average: {sum(per_class.values()) / max(len(per_class), 1):.1f}%")
        return {"accuracy": acc, "error": 100.0 - acc, "macro_f1": macro_f1, "per_class": per_class,
                "total": total, "correct": correct}


def build_evaluator(cfg: CfgNode, lab2cname: dict[int, str]) -> Classification:
    """The evaluator named by ``TEST.EVALUATOR``."""
    if cfg.VERBOSE:
        logger.info(f"Loading evaluator: {cfg.TEST.EVALUATOR}")
    return EVALUATORS.get(cfg.TEST.EVALUATOR)(cfg, lab2cname=lab2cname)
