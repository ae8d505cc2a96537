"""Plots of a suite's results, from the same rows and aggregation as the tables (``tables.py``).

* ``fewshot.png``: the few-shot average over datasets against K (log2 axis), one line per few-shot task; an eval-only
  (zero-shot) task is a dashed horizontal line;
* ``efficiency_time.png``, ``efficiency_memory.png``: each training task's headline accuracy against its total
  training time and its peak memory;
* ``grid_<task>.png``: the headline accuracy per grid point of a task with a grid.

Only plots that have data are written. PNG at a fixed dpi through the non-interactive Agg backend, so this runs on
machines without a display (the runner's, a CI box).
"""

from __future__ import annotations

import io
import os
from typing import Any

import matplotlib

matplotlib.use("Agg")  # before pyplot: no display is needed or wanted

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import NullLocator  # noqa: E402

from vltune.fileio import atomic_write  # noqa: E402
from vltune.results.formats import slug  # noqa: E402
from vltune.results.tables import Row, cost_numbers, fewshot_averages, group_rows, headline_accuracy  # noqa: E402

DPI = 120
SHOT_TICKS = (1, 2, 4, 8, 16)
PROTOCOL_NAMES = {"b2n": "base-to-new", "fewshot": "few-shot", "xd": "cross-dataset"}


def _save(fig: Any, out_dir: str, name: str) -> str:
    """Write the figure to ``out_dir/plots/<name>`` atomically, close it, and return the path relative to out_dir."""
    try:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    finally:
        plt.close(fig)
    path = os.path.join("plots", name)
    atomic_write(os.path.join(out_dir, path), buf.getvalue())
    return path


def _label(trainer: str, task: str, grid_name: str) -> str:
    return f"{trainer} ({task}, {grid_name})" if grid_name else f"{trainer} ({task})"


def _fewshot(groups: dict[str, dict[str, list[Row]]], out_dir: str) -> list[str]:
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    shots: set[int] = set()
    drawn = 0
    for task, points in groups.items():
        for grid_name, rs in points.items():
            job = rs[0][0]
            if job.protocol != "fewshot":
                continue
            averages = fewshot_averages(rs)
            curve = [(k, v) for k, v in averages.items() if k > 0 and v is not None]
            color = f"C{drawn % 10}"
            if curve:
                ax.plot(*zip(*curve), marker="o", color=color, label=_label(job.trainer, task, grid_name))
                shots.update(k for k, _ in curve)
            if averages.get(0) is not None:
                zs = f"{job.trainer} zero-shot" + (f" ({grid_name})" if grid_name else "")
                ax.axhline(averages[0], linestyle="--", color=color, label=zs)
            drawn += bool(curve) or averages.get(0) is not None
    if not drawn:
        plt.close(fig)
        return []
    low, high = (min(shots), max(shots)) if shots else (SHOT_TICKS[0], SHOT_TICKS[-1])
    ticks = sorted(shots | {k for k in SHOT_TICKS if low <= k <= high})
    ax.set_xscale("log", base=2)
    ax.set_xticks(ticks, labels=[str(k) for k in ticks])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlim(low / 1.3, high * 1.3)
    ax.set(xlabel="shots per class", ylabel="accuracy (%), average over datasets", title="Few-shot accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return [_save(fig, out_dir, "fewshot.png")]


def _efficiency(groups: dict[str, dict[str, list[Row]]], out_dir: str) -> list[str]:
    """Accuracy vs training cost, one panel per protocol (their headline accuracies do not compare)."""
    points: dict[str, list[tuple]] = {}  # protocol -> (label, accuracy, train seconds, peak MB, memory method)
    metric: dict[str, str] = {}
    for task, by_grid in groups.items():
        for grid_name, rs in by_grid.items():
            cost, (name, accuracy) = cost_numbers(rs), headline_accuracy(rs)
            if cost["train_total"] and accuracy is not None:  # eval-only tasks have no training cost to plot
                protocol = rs[0][0].protocol
                label = f"{rs[0][0].trainer} ({task}{f' [{grid_name}]' if grid_name else ''})"
                points.setdefault(protocol, []).append((label, accuracy, cost["train_total"], cost["peak_mem_mb"],
                                                        cost["mem_method"]))
                metric[protocol] = name
    paths = []
    methods = ", ".join(sorted({p[4] for ps in points.values() for p in ps if p[4]}))
    for filename, column, xlabel in (("efficiency_time.png", 2, "total training time (s)"),
                                     ("efficiency_memory.png", 3, f"peak memory (MB, {methods or 'unknown'})")):
        panels = {proto: [p for p in ps if p[column] is not None] for proto, ps in points.items()}
        panels = {proto: ps for proto, ps in panels.items() if ps}
        if not panels:
            continue
        fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2), squeeze=False)
        for ax, (protocol, drawn) in zip(axes[0], panels.items()):
            ax.scatter([p[column] for p in drawn], [p[1] for p in drawn])
            for p in drawn:
                ax.annotate(p[0], (p[column], p[1]), textcoords="offset points", xytext=(4, 4), fontsize="small")
            ax.set(xlabel=xlabel, ylabel=f"{metric[protocol]} (%)", title=f"{PROTOCOL_NAMES.get(protocol, protocol)}")
            ax.title.set_fontsize("medium")
            ax.grid(alpha=0.3)
        fig.suptitle(f"Accuracy vs {'training time' if column == 2 else 'peak memory'}", fontsize="medium")
        paths.append(_save(fig, out_dir, filename))
    return paths


def _grid(task: str, points: dict[str, list[Row]], out_dir: str) -> list[str]:
    values = {g: headline_accuracy(rs) for g, rs in points.items()}
    if len(points) < 2 or all(v is None for _, v in values.values()):
        return []
    metric = next(iter(values.values()))[0]
    grids = {g: getattr(rs[0][0], "grid", {}) or {} for g, rs in points.items()}
    keys = {k for grid in grids.values() for k in grid}
    numeric = len(keys) == 1 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for grid in grids.values() for v in grid.values())
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    if numeric:
        (key,) = keys
        xy = sorted((grids[g][key], v) for g, (_, v) in values.items() if v is not None and key in grids[g])
        ax.plot(*zip(*xy), marker="o")
        ax.set_xlabel(key)
    else:
        names = list(values)
        ax.plot(range(len(names)), [v[1] if v[1] is not None else float("nan") for v in values.values()], marker="o")
        ax.set_xticks(range(len(names)), labels=names, rotation=30, ha="right", fontsize="small")
        ax.set_xlabel("grid point")
    ax.set(ylabel=f"accuracy (%): {metric}", title=f"{task}: {metric} per grid point")
    ax.grid(alpha=0.3)
    return [_save(fig, out_dir, f"grid_{slug(task)}.png")]


def write_plots(rows: list[Row], out_dir: str) -> list[str]:
    """Write the plots that have data into ``out_dir/plots/``; returns their paths relative to ``out_dir``."""
    groups = group_rows(rows)
    paths = _fewshot(groups, out_dir) + _efficiency(groups, out_dir)
    for task, points in groups.items():
        paths += _grid(task, points, out_dir)
    return paths
