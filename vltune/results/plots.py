"""Plots of a folder's results, from the same methods and aggregation as the tables (``compare.py``, ``tables.py``).

* ``fewshot.png``: each few-shot method's average over datasets against K (log2 axis); an eval-only (zero-shot)
  method is a dashed horizontal line;
* ``efficiency_time.png``: each method's headline accuracy (b2n: average H; few-shot: the average at its largest K;
  xd: average_xd) against its training cost, a panel per protocol. The cost is train + cache time as the **mean per
  training job** (one job = one dataset and seed), so methods run on different numbers of datasets or seeds compare;
* ``efficiency_memory_<meter>.png``: the same accuracy against the training peak memory, one plot per meter (a
  CUDA peak and a CPU-profiler peak are different quantities and never share an axis);
* ``grid_<task>.png``: the headline accuracy per grid point of a task with a grid;
* ``train_loss_<protocol>_<dataset>.png``: the training loss (epoch mean of the summed objective) against the epoch,
  a panel per number of shots, a line per method: the mean over its seeds, each seed a faint line. Read from each
  successful training record's ``train`` list; the epochs a resumed run did before it resumed come from the
  ``metrics.jsonl`` beside its record (``vltune.engine.curves``).

In the efficiency plots an eval-only method (zero-shot) has no training cost: it is a labelled dashed horizontal
line. Point labels are placed by ``place_labels`` so that no two overlap.

Only plots that have data are written. PNG at a fixed dpi through the non-interactive Agg backend, so this runs on
machines without a display (the runner's, a CI box).
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from statistics import fmean
from typing import Any

import matplotlib

matplotlib.use("Agg")  # before pyplot: no display is needed or wanted

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.text import Annotation, Text  # noqa: E402
from matplotlib.ticker import MaxNLocator, NullLocator  # noqa: E402
from matplotlib.transforms import Bbox  # noqa: E402

from vltune.engine.curves import METRICS_FILE, read_metrics  # noqa: E402
from vltune.fileio import atomic_write  # noqa: E402
from vltune.results.compare import (  # noqa: E402
    PROTOCOL_NAMES,
    Method,
    TaskGroup,
    cost_numbers,
    find_methods,
    task_groups,
)
from vltune.results.formats import slug  # noqa: E402
from vltune.results.record import Record  # noqa: E402
from vltune.results.tables import fewshot_averages, headline_accuracy, point_grid  # noqa: E402

DPI = 120
SHOT_TICKS = (1, 2, 4, 8, 16)
LABEL_PAD_PX = 2.0
LOG_RATIO = 30.0  # an x range wider than this factor is drawn on a log axis

Point = tuple[str, float, float]  # (label, x, accuracy)
Reference = tuple[str, float]  # (label, accuracy) of an eval-only method


def _figure(panels: int = 1) -> tuple[Figure, Any]:
    """A figure at the saved dpi, so label boxes measured on its renderer are the ones written."""
    return plt.subplots(1, panels, figsize=(5.6 * panels, 4.4), squeeze=False, dpi=DPI)


def _save(fig: Figure, out_dir: str, name: str) -> str:
    """Write the figure to ``out_dir/plots/<name>`` atomically, close it, and return the path relative to out_dir."""
    try:
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    finally:
        plt.close(fig)
    path = os.path.join("plots", name)
    atomic_write(os.path.join(out_dir, path), buf.getvalue())
    return path


def label_box(annotation: Annotation, renderer: Any) -> Bbox:
    """The display box of an annotation's text alone (``Annotation.get_window_extent`` adds its leader line)."""
    annotation.update_positions(renderer)
    return Text.get_window_extent(annotation, renderer)


def _overlap(a: Bbox, b: Bbox, pad: float) -> bool:
    return a.x0 < b.x1 + pad and b.x0 < a.x1 + pad and a.y0 < b.y1 + pad and b.y0 < a.y1 + pad


def place_labels(fig: Figure, annotations: list[Annotation], pad: float = LABEL_PAD_PX) -> None:
    """Move labels (annotations with ``textcoords="offset points"``) up until no two text boxes overlap.

    Deterministic greedy sweep: labels are taken bottom-up (then left to right) by their initial position; each is
    raised just above every already placed label it overlaps, until it overlaps none. It only moves up, so it ends,
    and a label that overlaps nothing stays where it was. The axes limits must be final (they place the anchors).
    """
    renderer = fig.canvas.get_renderer()
    start = {id(a): label_box(a, renderer) for a in annotations}
    placed: list[Bbox] = []
    for a in sorted(annotations, key=lambda a: (start[id(a)].y0, start[id(a)].x0)):
        box = start[id(a)]
        while over := [p for p in placed if _overlap(box, p, pad)]:
            rise_px = max(p.y1 for p in over) + pad + 0.5 - box.y0  # 0.5 px: no float-rounding stalemate
            x, y = a.xyann
            a.xyann = (x, y + rise_px * 72.0 / fig.dpi)
            box = label_box(a, renderer)
        placed.append(box)


def scatter_labelled(ax: Axes, points: Sequence[Point], references: Sequence[Reference] = ()) -> list[Annotation]:
    """Points with non-overlapping labels, and each reference as a labelled dashed horizontal line; returns the
    labels (points' first, then the references')."""
    ax.scatter([p[1] for p in points], [p[2] for p in points], zorder=3)
    for _, y in references:
        ax.axhline(y, linestyle="--", color="0.45", linewidth=1)
    xs = [p[1] for p in points]
    if xs and min(xs) > 0 and max(xs) / min(xs) > LOG_RATIO:
        ax.set_xscale("log")
    ax.margins(0.12)
    ax.autoscale_view()
    ax.set_xlim(ax.get_xlim())  # fixed from here: label placement measures anchors in display space
    ax.set_ylim(ax.get_ylim())
    leader = dict(arrowstyle="-", color="0.6", linewidth=0.6, shrinkA=0, shrinkB=3)
    labels = [ax.annotate(name, (x, y), xytext=(5, 4), textcoords="offset points", fontsize="small",
                          annotation_clip=False, arrowprops=leader) for name, x, y in points]
    labels += [ax.annotate(f"{name} (zero-shot)", (1, y), xycoords=("axes fraction", "data"), xytext=(-3, 3),
                           textcoords="offset points", ha="right", fontsize="small", color="0.3",
                           annotation_clip=False) for name, y in references]
    place_labels(ax.figure, labels)
    return labels


def _fewshot(methods: list[Method], out_dir: str) -> list[str]:
    fig, axes = _figure()
    ax = axes[0][0]
    shots: set[int] = set()
    drawn = 0
    for m in methods:
        if m.protocol != "fewshot":
            continue
        averages = fewshot_averages(m.records)
        curve = [(k, v) for k, v in averages.items() if k > 0 and v is not None]
        color = f"C{drawn % 10}"
        if curve:
            ax.plot(*zip(*curve), marker="o", color=color, label=m.label)
            shots.update(k for k, _ in curve)
        if averages.get(0) is not None:
            ax.axhline(averages[0], linestyle="--", color=color, label=f"{m.label} zero-shot")
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


@dataclass
class _Panel:
    """One protocol's efficiency data: the accuracy's name per trained method, trained methods, eval-only
    references (their zero-shot accuracy is drawn as a line, whatever its name)."""

    metrics: list[str] = field(default_factory=list)
    trained: list[tuple[str, float, dict[str, Any]]] = field(default_factory=list)  # (label, accuracy, cost_numbers)
    references: list[Reference] = field(default_factory=list)

    @property
    def metric(self) -> str:
        names = set(self.metrics)
        return self.metrics[0] if len(names) == 1 else "average at each method's largest K"


def _panels(methods: list[Method]) -> dict[str, _Panel]:
    panels: dict[str, _Panel] = {}
    for m in methods:
        name, accuracy = headline_accuracy(m.records)
        if accuracy is None:
            continue
        panel = panels.setdefault(m.protocol, _Panel())
        if m.eval_only:
            panel.references.append((m.label, accuracy))
        else:
            panel.metrics.append(name)
            panel.trained.append((m.label, accuracy, cost_numbers(m.records)))
    return panels


def _efficiency_plot(panels: dict[str, _Panel], x: Callable[[dict[str, Any]], float | None], xlabel: str, title: str,
                     out_dir: str, name: str) -> list[str]:
    """One figure, a panel per protocol that has a trained method with an ``x(cost_numbers)``."""
    drawn = {p: [(label, v, acc) for label, acc, cost in panel.trained if (v := x(cost)) is not None]
             for p, panel in panels.items()}
    drawn = {p: points for p, points in drawn.items() if points}
    if not drawn:
        return []
    fig, axes = _figure(len(drawn))
    for ax, (protocol, points) in zip(axes[0], drawn.items()):
        scatter_labelled(ax, points, panels[protocol].references)
        ax.set(xlabel=xlabel, ylabel=f"{panels[protocol].metric} (%)", title=PROTOCOL_NAMES.get(protocol, protocol))
        ax.title.set_fontsize("medium")
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize="medium")
    return [_save(fig, out_dir, name)]


def _efficiency(methods: list[Method], out_dir: str) -> list[str]:
    """Accuracy vs training time, and vs training peak memory per meter; a panel per protocol (their headline
    accuracies do not compare)."""
    panels = _panels(methods)
    paths = _efficiency_plot(panels, lambda c: c["train_cache_s"], "train + cache time per training job (s)",
                             "Accuracy vs training time", out_dir, "efficiency_time.png")
    meters = list(dict.fromkeys(meter for panel in panels.values() for _, _, cost in panel.trained
                                for meter in cost["peaks"]["train"]))
    for meter in meters:
        paths += _efficiency_plot(panels, lambda c, meter=meter: c["peaks"]["train"].get(meter),
                                  "training peak memory per method (MB, max over jobs)",
                                  f"Accuracy vs training peak memory ({meter})", out_dir,
                                  f"efficiency_memory_{slug(meter)}.png")
    return paths


def _grid(group: TaskGroup, out_dir: str) -> list[str]:
    values = {g: headline_accuracy(rs) for g, rs in group.points.items()}
    if len(group.points) < 2 or all(v is None for _, v in values.values()):
        return []
    metric = next(iter(values.values()))[0]
    grids = {g: point_grid(rs) for g, rs in group.points.items()}
    keys = {k for grid in grids.values() for k in grid}
    numeric = len(keys) == 1 and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for grid in grids.values() for v in grid.values())
    fig, axes = _figure()
    ax = axes[0][0]
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
    ax.set(ylabel=f"accuracy (%): {metric}", title=f"{group.name}: {metric} per grid point")
    ax.grid(alpha=0.3)
    return [_save(fig, out_dir, f"grid_{slug(group.name)}.png")]


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def loss_curve(record: Record) -> dict[int, float]:
    """``{epoch: mean training loss}`` of a run, epochs ascending: its record's ``train`` list, completed from the
    epoch lines of the ``metrics.jsonl`` beside it where the record lacks epochs (a resumed run records only the
    epochs it trained after resuming)."""
    curve = {int(e["epoch"]): float(e["loss"]) for e in record.train
             if _number(e.get("epoch")) and _number(e.get("loss"))}
    if record.path and (not curve or min(curve) > 1):
        for line in read_metrics(os.path.join(record.folder, METRICS_FILE)):
            if line.get("kind") == "epoch" and _number(line.get("epoch")) and _number(line.get("loss")):
                curve.setdefault(int(line["epoch"]), float(line["loss"]))
    return dict(sorted(curve.items()))


def mean_curve(curves: list[dict[int, float]]) -> dict[int, float]:
    """The seed mean of loss curves: at each epoch any of them has, the mean over those that have it."""
    epochs = sorted({e for curve in curves for e in curve})
    return {e: fmean(c[e] for c in curves if e in c) for e in epochs}


def _train_loss(methods: list[Method], out_dir: str) -> list[str]:
    """One figure per protocol and dataset, a panel per shots, a line per method (seed mean, seeds faint)."""
    figures: dict[tuple[str, str], dict[int, dict[str, list[dict[int, float]]]]] = {}
    for m in methods:
        for r in m.records:
            curve = loss_curve(r) if r.status == "success" and r.job.phase == "train" else {}
            if curve:
                panels = figures.setdefault((m.protocol, r.job.dataset), {})
                panels.setdefault(r.job.shots, {}).setdefault(m.label, []).append(curve)
    paths = []
    for (protocol, dataset), panels in figures.items():
        fig, axes = _figure(len(panels))
        for ax, (shots, lines) in zip(axes[0], sorted(panels.items())):
            for i, (label, curves) in enumerate(lines.items()):
                color = f"C{i % 10}"
                if len(curves) > 1:
                    for curve in curves:
                        ax.plot(list(curve), list(curve.values()), color=color, alpha=0.25, linewidth=0.8)
                mean = mean_curve(curves)
                seeds = f" ({len(curves)} seeds)" if len(curves) > 1 else ""
                ax.plot(list(mean), list(mean.values()), color=color, marker="o" if len(mean) <= 20 else None,
                        markersize=3, label=label + seeds)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set(xlabel="epoch", ylabel="training loss (epoch mean)", title=f"{shots}-shot" if shots else "")
            ax.title.set_fontsize("medium")
            ax.grid(alpha=0.3)
            ax.legend(fontsize="small")
        fig.suptitle(f"Training loss: {dataset} ({PROTOCOL_NAMES.get(protocol, protocol)})", fontsize="medium")
        paths.append(_save(fig, out_dir, f"train_loss_{slug(protocol)}_{slug(dataset)}.png"))
    return paths


def write_plots(records: list[Record], out_dir: str) -> list[str]:
    """Write the plots that have data into ``out_dir/plots/``; returns their paths relative to ``out_dir``."""
    methods = find_methods(records)
    paths = _fewshot(methods, out_dir) + _efficiency(methods, out_dir)
    for group in task_groups(methods):
        paths += _grid(group, out_dir)
    return paths + _train_loss(methods, out_dir)
