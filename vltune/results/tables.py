"""Accuracy and cost tables derived from ``result.json`` records (never from logs), one table per task.

Conventions (protocols_and_numbers.md §2-5), each implemented once here:

* base-to-new: per dataset, average base and new accuracy over seeds first, then H = HM(base, new); the average row
  is HM(mean base, mean new), not the mean of per-dataset H (the CoCoOp convention).
* few-shot: per dataset and K, the mean over seeds; the average row is the mean of the per-dataset means.
* cross-dataset: the source accuracy, each target's, and ``average_xd`` over the targets (source excluded);
  domain generalisation: each variant's and ``average_dg`` over the variants.

Only records with status ``success`` count; a missing or failed record shows as ``-`` and is left out of averages.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from collections.abc import Iterable, Sequence
from statistics import mean
from typing import Any

from vltune.results.record import read_record

Row = tuple[Any, dict[str, Any] | None]  # (job with .task .protocol .role .dataset .seed .shots, record)


def harmonic_mean(a: float, b: float) -> float:
    """HM of two accuracies; 0 when either is 0 (upstream divides by zero there)."""
    return 2 * a * b / (a + b) if a > 0 and b > 0 else 0.0


def b2n_summary(base: dict[str, list[float]], new: dict[str, list[float]]) -> dict[str, tuple[float, float, float]]:
    """``{dataset: (base, new, H)}`` from per-seed accuracies, plus ``"average"`` (HM of the averaged means)."""
    out = {}
    for d in base:
        if base[d] and new.get(d):
            b, n = mean(base[d]), mean(new[d])
            out[d] = (b, n, harmonic_mean(b, n))
    if out:
        b, n = mean(v[0] for v in out.values()), mean(v[1] for v in out.values())
        out["average"] = (b, n, harmonic_mean(b, n))
    return out


def _accuracy(record: dict[str, Any] | None) -> float | None:
    if not record or record.get("status") != "success":
        return None
    return float(record["metrics"]["accuracy"])


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def _markdown(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _by_task(rows: Iterable[Row]) -> dict[str, list[Row]]:
    grouped: dict[str, list[Row]] = defaultdict(list)
    for job, record in rows:
        grouped[job.task].append((job, record))
    return grouped


def b2n_table(rows: list[Row]) -> str:
    base, new = defaultdict(list), defaultdict(list)
    order = []
    for job, record in rows:
        acc = _accuracy(record)
        if job.dataset not in order:
            order.append(job.dataset)
        if acc is not None:
            (base if job.role == "base" else new)[job.dataset].append(acc)
    summary = b2n_summary({d: base[d] for d in order}, new)
    body = [(d, *map(_fmt, summary.get(d, (None, None, None)))) for d in order]
    if "average" in summary:
        body.append(("**average**", *map(_fmt, summary["average"])))
    return _markdown(("dataset", "base", "new", "H"), body)


def fewshot_table(rows: list[Row]) -> str:
    acc: dict[tuple[str, int], list[float]] = defaultdict(list)
    order, shots = [], []
    for job, record in rows:
        order += [job.dataset] if job.dataset not in order else []
        shots += [job.shots] if job.shots not in shots else []
        if (a := _accuracy(record)) is not None:
            acc[job.dataset, job.shots].append(a)
    shots.sort()
    means = {key: mean(v) for key, v in acc.items() if v}
    body = [(d, *(_fmt(means.get((d, k))) for k in shots)) for d in order]
    avg = [mean(means[d, k] for d in order) if all((d, k) in means for d in order) else None for k in shots]
    body.append(("**average**", *map(_fmt, avg)))
    return _markdown(("dataset", *(f"{k} shots" if k else "zero-shot" for k in shots)), body)


def xd_tables(rows: list[Row]) -> tuple[str, str]:
    """(cross-dataset table, domain-generalisation table)."""
    acc: dict[tuple[str, str], list[float]] = defaultdict(list)
    order: dict[str, list[str]] = defaultdict(list)
    for job, record in rows:
        order[job.role] += [job.dataset] if job.dataset not in order[job.role] else []
        if (a := _accuracy(record)) is not None:
            acc[job.role, job.dataset].append(a)
    means = {key: mean(v) for key, v in acc.items() if v}

    def table(roles: Sequence[str], label: str) -> str:
        names = [(r, d) for r in roles for d in order[r]]
        cells = [_fmt(means.get(key)) for key in names]
        wanted = [means.get((r, d)) for r, d in names if r != "source"]
        avg = mean(wanted) if wanted and all(v is not None for v in wanted) else None
        return _markdown((*(d for _, d in names), label), [(*cells, _fmt(avg))])

    return table(("source", "target"), "average_xd"), table(("variant",), "average_dg")


def cost_table(rows: list[Row]) -> str:
    """Per task: mean over jobs of the training and evaluation time, peak memory and trainable parameters."""
    body = []
    for task, task_rows in _by_task(rows).items():
        costs = [r["cost"] for _, r in task_rows if r and r.get("status") == "success"]
        trained = [c for c in costs if c.get("train_time_s", 0) > 0]
        if not costs:
            body.append((task, "-", "-", "-", "-", "-", 0))
            continue
        body.append((task, _fmt(mean(c["train_time_s"] for c in trained)) if trained else "0.00",
                     _fmt(sum(c["train_time_s"] for c in costs)), _fmt(mean(c["eval_time_s"] for c in costs)),
                     _fmt(max(c["peak_mem_mb"] for c in costs)) + f" ({costs[0]['peak_mem_method']})",
                     f"{max(c['trainable_params'] for c in costs):,}", len(costs)))
    return _markdown(("task", "train s / job", "train s total", "eval s / job", "peak mem MB", "trainable params",
                      "runs"), body)


def render_report(rows: list[Row]) -> str:
    """All tables of a suite as one markdown document."""
    parts = ["# Results", ""]
    for task, task_rows in _by_task(rows).items():
        job = task_rows[0][0]
        title = f"## {task}: {job.trainer} `{job.config}`, {job.protocol}"
        if job.protocol == "b2n":
            parts += [title, "", b2n_table(task_rows), ""]
        elif job.protocol == "fewshot":
            parts += [title, "", fewshot_table(task_rows), ""]
        else:
            xd, dg = xd_tables(task_rows)
            parts += [title, "", "Cross-dataset:", "", xd, "", "Domain generalisation:", "", dg, ""]
    parts += ["## Cost", "", cost_table(rows), ""]
    return "\n".join(parts)


def collect(output_root: str) -> list[Row]:
    """Rebuild the rows from an output folder: every ``job.json`` with its ``result.json`` (None if missing)."""
    from types import SimpleNamespace

    rows = []
    for folder, _, files in sorted(os.walk(output_root)):
        if "job.json" in files:
            with open(os.path.join(folder, "job.json")) as f:
                job = SimpleNamespace(**json.load(f))
            rows.append((job, read_record(os.path.join(folder, "result.json"))))
    return rows
