"""Accuracy and cost tables derived from ``result.json`` records (never from logs), one table per task and grid point.

Conventions (protocols_and_numbers.md §2-5), each implemented once here:

* base-to-new: per dataset, average base and new accuracy over seeds first, then H = HM(base, new); the average row
  is HM(mean base, mean new), not the mean of per-dataset H (the CoCoOp convention). Its per-seed H is the HM of that
  seed's averages over datasets.
* few-shot: per dataset and K, the mean ± std over seeds; the average row is the mean of the per-dataset means.
* cross-dataset: the source accuracy, each target's, and ``average_xd`` over the targets (source excluded);
  domain generalisation: each variant's and ``average_dg`` over the variants. Every value is a seed mean.
* spreads are population std (ddof 0) over seeds, as CoOp's ``parse_test_res.py``.

Only records with status ``success`` count; a missing or failed record shows as ``-`` and is left out of averages.
A job may carry ``grid`` (config key -> value) and ``grid_name``; each grid point of a task gets its own tables.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from statistics import fmean, mean, pstdev
from types import SimpleNamespace
from typing import Any

from vltune.fileio import atomic_write
from vltune.results.formats import Cell, Stat, Table, slug
from vltune.results.record import read_record

Row = tuple[Any, dict[str, Any] | None]  # (job with .task .protocol .role .dataset .seed .shots [.grid], record)


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


def _ordered(values: Iterable[Any]) -> list[Any]:
    return list(dict.fromkeys(values))


def _std(values: list[float]) -> float | None:
    """Population std over seeds; None for a single seed (a spread of one run would read as certainty)."""
    return pstdev(values) if len(values) > 1 else None


def _mean_if_all(values: list[float | None]) -> float | None:
    """The mean when every value is present (a partial average would not compare with other rows), else None."""
    return mean(values) if values and all(v is not None for v in values) else None


def _accuracies(rows: list[Row]) -> dict[tuple[str, str, int], float]:
    """``{(role, dataset, seed): accuracy}`` of the successful runs (one shots value per table but few-shot's)."""
    return {(j.role, j.dataset, j.seed): a for j, r in rows if (a := _accuracy(r)) is not None}


def _over_seeds(rows: list[Row], key: str) -> dict[tuple[str, Any], list[float]]:
    """``{(dataset, job.<key>): successful accuracies over seeds}``."""
    out: dict[tuple[str, Any], list[float]] = {}
    for j, r in rows:
        if (a := _accuracy(r)) is not None:
            out.setdefault((j.dataset, getattr(j, key)), []).append(a)
    return out


def _title(label: str, text: str) -> str:
    return f"{label}: {text}" if label else text


def group_rows(rows: Iterable[Row]) -> dict[str, dict[str, list[Row]]]:
    """``{task: {grid_name: rows}}`` in first-seen order (``grid_name`` is ``""`` for a task without a grid)."""
    out: dict[str, dict[str, list[Row]]] = {}
    for job, record in rows:
        out.setdefault(job.task, {}).setdefault(getattr(job, "grid_name", ""), []).append((job, record))
    return out


def b2n_table(rows: list[Row], name: str = "b2n", label: str = "") -> Table:
    """Per dataset and seed: base, new, H; then base, new, H as mean ± std over seeds; an average row.

    H's mean is the HM of the mean base and new (not the mean of per-seed H), its std the spread of the per-seed H.
    The average row's per-seed cells average each seed over the datasets (``-`` where one lacks that seed), and its
    std is the spread of those per-seed averages.
    """
    datasets, seeds = _ordered(j.dataset for j, _ in rows), sorted(_ordered(j.seed for j, _ in rows))
    acc = _accuracies(rows)
    per_seed = {role: {d: [acc.get((role, d, s)) for s in seeds] for d in datasets} for role in ("base", "new")}
    present = {role: {d: [a for a in v if a is not None] for d, v in per_seed[role].items()} for role in per_seed}
    summary = b2n_summary(present["base"], present["new"])

    def seed_cells(bs: list[float | None], ns: list[float | None]) -> list[Cell]:
        hs = [harmonic_mean(b, n) if b is not None and n is not None else None for b, n in zip(bs, ns)]
        return [c for triple in zip(bs, ns, hs) for c in triple]

    body: list[list[Cell]] = []
    for d in datasets:
        bs, ns = per_seed["base"][d], per_seed["new"][d]
        cells = seed_cells(bs, ns)
        if d in summary:
            hs = [h for h in cells[2::3] if h is not None]
            b, n, h = summary[d]
            cells += [Stat(b, _std(present["base"][d])), Stat(n, _std(present["new"][d])), Stat(h, _std(hs))]
        else:  # no base or no new accuracy at all: nothing to summarise, and left out of the average row
            cells += [None, None, None]
        body.append([d, *cells])
    included = [d for d in datasets if d in summary]
    avg_b = [_mean_if_all([per_seed["base"][d][i] for d in included]) for i in range(len(seeds))]
    avg_n = [_mean_if_all([per_seed["new"][d][i] for d in included]) for i in range(len(seeds))]
    cells = seed_cells(avg_b, avg_n)
    if "average" in summary:
        b, n, h = summary["average"]
        spread = [[v for v in cells[k::3] if v is not None] for k in range(3)]
        cells += [Stat(b, _std(spread[0])), Stat(n, _std(spread[1])), Stat(h, _std(spread[2]))]
    else:
        cells += [None, None, None]
    body.append(["average", *cells])
    header = ["dataset", *(f"{c} s{s}" for s in seeds for c in ("base", "new", "H")), "base", "new", "H"]
    title = _title(label, "base-to-new accuracy (%) per seed, and mean ± std over seeds; H = HM of the mean base and "
                   "new; average row: mean over the datasets that have both, H = HM of those means")
    return Table(name, title, header, body, footer=1, stat_columns=tuple(range(len(header) - 3, len(header))))


def fewshot_averages(rows: list[Row]) -> dict[int, float | None]:
    """``{K: mean over datasets of the per-dataset seed means}``; None where a dataset has no result for K."""
    datasets, shots = _ordered(j.dataset for j, _ in rows), sorted(_ordered(j.shots for j, _ in rows))
    means = {key: mean(v) for key, v in _over_seeds(rows, "shots").items()}
    return {k: _mean_if_all([means.get((d, k)) for d in datasets]) for k in shots}


def fewshot_table(rows: list[Row], name: str = "fewshot", label: str = "") -> Table:
    """Per dataset and K (0 = zero-shot): mean ± std over seeds; an average row of the per-dataset means."""
    datasets, shots = _ordered(j.dataset for j, _ in rows), sorted(_ordered(j.shots for j, _ in rows))
    acc = _over_seeds(rows, "shots")
    body: list[list[Cell]] = [[d, *(Stat(mean(v), _std(v)) if (v := acc.get((d, k))) else None for k in shots)]
                              for d in datasets]
    body.append(["average", *fewshot_averages(rows).values()])
    header = ["dataset", *(f"{k}-shot" if k else "zero-shot" for k in shots)]
    title = _title(label, "few-shot accuracy (%), mean ± std over seeds; average row: mean of the dataset means")
    return Table(name, title, header, body, footer=1, stat_columns=tuple(range(1, len(header))))


def _transfer(rows: list[Row], roles: tuple[str, ...], average: str) -> tuple[list[str], list[list[Cell]]]:
    """Header and rows (one per seed, then the seed means) of a cross-dataset or domain-generalisation table."""
    acc = _accuracies(rows)
    columns = [(r, d) for r in roles for d in _ordered(j.dataset for j, _ in rows if j.role == r)]
    seeds = sorted(_ordered(j.seed for j, _ in rows))
    body: list[list[Cell]] = []
    for s in seeds:
        cells = [acc.get((r, d, s)) for r, d in columns]
        body.append([f"seed {s}", *cells, _mean_if_all([c for (r, _), c in zip(columns, cells) if r != "source"])])
    means = [mean(v) if (v := [a for (r2, d2, _), a in acc.items() if (r2, d2) == (r, d)]) else None
             for r, d in columns]
    body.append(["mean", *means, _mean_if_all([m for (r, _), m in zip(columns, means) if r != "source"])])
    return ["seed", *(d for _, d in columns), average], body


def transfer_averages(rows: list[Row]) -> dict[str, float | None]:
    """``average_xd`` (and ``average_dg`` when the task has variants) of the seed means."""
    out = {"average_xd": _transfer(rows, ("source", "target"), "average_xd")[1][-1][-1]}
    if any(j.role == "variant" for j, _ in rows):
        out["average_dg"] = _transfer(rows, ("variant",), "average_dg")[1][-1][-1]
    return out


def xd_tables(rows: list[Row], name: str = "", label: str = "") -> list[Table]:
    """The cross-dataset table and, when the task has variants, the domain-generalisation table."""
    header, body = _transfer(rows, ("source", "target"), "average_xd")
    title = f"cross-dataset accuracy (%) per seed and seed means; source {header[1]}, average_xd over the targets"
    tables = [Table(f"{name}xd", _title(label, title), header, body, footer=1)]
    if any(j.role == "variant" for j, _ in rows):
        header, body = _transfer(rows, ("variant",), "average_dg")
        title = "domain-generalisation accuracy (%) per seed and seed means; average_dg over the variants"
        tables.append(Table(f"{name}dg", _title(label, title), header, body, footer=1))
    return tables


def headline(rows: list[Row]) -> dict[str, float | None]:
    """The protocol's summary numbers of one task (grid point): b2n base, new, H; few-shot the average per K;
    cross-dataset average_xd and average_dg."""
    protocol = rows[0][0].protocol
    if protocol == "b2n":
        by_role: dict[str, dict[str, list[float]]] = {"base": {}, "new": {}}
        for (role, d, _), a in _accuracies(rows).items():
            by_role[role].setdefault(d, []).append(a)
        return dict(zip(("base", "new", "H"), b2n_summary(by_role["base"], by_role["new"]).get("average", [None] * 3)))
    if protocol == "fewshot":
        return {f"{k}-shot" if k else "zero-shot": v for k, v in fewshot_averages(rows).items()}
    return transfer_averages(rows)


def headline_accuracy(rows: list[Row]) -> tuple[str, float | None]:
    """The one accuracy that stands for a task: b2n H (average row), few-shot the average at the largest K,
    cross-dataset average_xd; with its name."""
    protocol = rows[0][0].protocol
    if protocol == "fewshot":
        k, v = list(fewshot_averages(rows).items())[-1]
        return (f"average at {k} shots" if k else "zero-shot average"), v
    if protocol == "b2n":
        return "average H", headline(rows)["H"]
    return "average_xd", headline(rows)["average_xd"]


def grid_table(task: str, points: dict[str, list[Row]]) -> Table:
    """One row per grid point: its name, the value of each grid key, and the protocol's headline numbers."""
    grids = {g: getattr(rs[0][0], "grid", {}) or {} for g, rs in points.items()}
    keys = _ordered(k for grid in grids.values() for k in grid)
    numbers = {g: headline(rs) for g, rs in points.items()}
    columns = _ordered(k for n in numbers.values() for k in n)
    body: list[list[Cell]] = []
    for g in points:
        values = [grids[g].get(k) for k in keys]
        values = [v if v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)) else str(v)
                  for v in values]
        body.append([g, *values, *(numbers[g].get(c) for c in columns)])
    header = ["grid point", *keys, *columns]
    return Table(f"{slug(task)}.grid", f"{task}: headline accuracy (%) per grid point", header, body)


def task_tables(task: str, points: dict[str, list[Row]]) -> tuple[Table | None, dict[str, list[Table]]]:
    """(the grid summary, when there is more than one grid point; ``{grid_name: accuracy tables}``)."""
    out = {}
    for grid_name, rs in points.items():
        name = f"{slug(task)}.{slug(grid_name) + '.' if grid_name else ''}"
        label = f"{task} [{grid_name}]" if grid_name else task
        protocol = rs[0][0].protocol
        if protocol == "b2n":
            out[grid_name] = [b2n_table(rs, name + "b2n", label)]
        elif protocol == "fewshot":
            out[grid_name] = [fewshot_table(rs, name + "fewshot", label)]
        else:
            out[grid_name] = xd_tables(rs, name, label)
    return (grid_table(task, points) if len(points) > 1 else None), out


def cost_numbers(rows: list[Row]) -> dict[str, Any]:
    """Cost of one task (grid point) from its successful records; a value no record has is None."""
    costs = [r.get("cost") or {} for _, r in rows if _accuracy(r) is not None]

    def values(key: str) -> list[Any]:
        return [c[key] for c in costs if c.get(key) is not None]

    train, evals = values("train_time_s"), values("eval_time_s")
    trained = [t for t in train if t > 0]  # train_time_s == 0: an eval-only job
    training = [c for c in costs if (c.get("train_time_s") or 0) > 0]
    caches = [c.get("cache_time_s") or 0.0 for c in training]
    speeds = [v for v in values("images_per_s") if v > 0]  # training throughput; 0 on eval-only jobs
    eval_speeds = [v for v in values("eval_images_per_s") if v > 0]
    # peak memory: of the training jobs when the task trains (its evaluations are measured another way)
    memory = [(c["peak_mem_mb"], c.get("peak_mem_method")) for c in (training or costs) if c.get("peak_mem_mb")]
    methods = sorted({m for _, m in memory if m})
    return {"jobs": len(costs), "train_mean": fmean(trained) if trained else None,
            "train_total": sum(train) if train else None, "cache_mean": fmean(caches) if caches else None,
            "eval_mean": fmean(evals) if evals else None,
            "eval_total": sum(evals) if evals else None, "images_per_s": fmean(speeds) if speeds else None,
            "eval_images_per_s": fmean(eval_speeds) if eval_speeds else None,
            "peak_mem_mb": max((m for m, _ in memory), default=None),
            "mem_method": ", ".join(methods) if methods else None,
            "peak_rss_mb": max(values("peak_rss_mb"), default=None),
            "ckpt_mb": max(values("ckpt_bytes"), default=0) / 2**20 if values("ckpt_bytes") else None,
            "trainable_params": max(values("trainable_params"), default=None),
            "total_params": max(values("total_params"), default=None)}


_COST_COLUMNS = {"jobs": "jobs", "train_mean": "train time s", "train_total": "train time total s",
                 "cache_mean": "cache time s", "eval_mean": "eval time s", "eval_total": "eval time total s",
                 "images_per_s": "images/s", "eval_images_per_s": "eval images/s",
                 "peak_mem_mb": "peak memory MB", "mem_method": "memory method", "peak_rss_mb": "peak RSS MB",
                 "ckpt_mb": "checkpoint MB",
                 "trainable_params": "trainable params", "total_params": "total params"}
_ADDITIVE = ("jobs", "train_total", "eval_total")
_NOT_AVERAGED = ("trainable_params", "total_params", "ckpt_mb")  # averages of model sizes mean nothing


def cost_table(rows: list[Row]) -> Table:
    """Per task (and grid point): successful jobs, time, throughput, peak memory, parameters; average and total."""
    body: list[list[Cell]] = []
    for task, points in group_rows(rows).items():
        for grid_name, rs in points.items():
            c = cost_numbers(rs)
            label = f"{task} [{grid_name}]" if grid_name else task
            body.append([label, rs[0][0].trainer, *(c[k] for k in _COST_COLUMNS)])
    average: list[Cell] = ["average", None]
    total: list[Cell] = ["total", None]
    for j, key in enumerate(_COST_COLUMNS, start=2):
        numbers = [r[j] for r in body if isinstance(r[j], (int, float))]
        average.append(fmean(numbers) if numbers and key not in _NOT_AVERAGED else None)
        total.append(sum(numbers) if key in _ADDITIVE else None)
    title = ("cost per task over its successful jobs: train time (training steps) and cache time (building feature "
             "caches, e.g. Skip Tuning's) means over training jobs only (eval-only jobs excluded), eval time mean per "
             "job, images/s the training (eval images/s the test) throughput, peak memory the max over the training "
             "jobs (over all jobs when none trains) measured as its method says, peak RSS the process peak resident "
             "set (all jobs), checkpoint the saved trainable state, params the max; "
             "average: mean of the task rows; total: sums of the job counts and time totals")
    return Table("cost", title, ["task", "trainer", *_COST_COLUMNS.values()], [*body, average, total], footer=2)


def build_tables(rows: list[Row]) -> list[Table]:
    """Every table: the accuracy tables in task order, then the grid summaries, then the cost table."""
    accuracy, grids = [], []
    for task, points in group_rows(rows).items():
        summary, per_point = task_tables(task, points)
        grids += [summary] if summary else []
        accuracy += [t for tables in per_point.values() for t in tables]
    return [*accuracy, *grids, cost_table(rows)]


def _section(table: Table) -> list[str]:
    return [f"*{table.title}*", "", table.to_markdown(), ""]


def render_report(rows: list[Row], plots: list[str] | None = None) -> str:
    """All tables of a suite as one markdown document; ``plots`` are image paths relative to the report's folder."""
    parts = ["# Results", ""]
    for task, points in group_rows(rows).items():
        job = next(iter(points.values()))[0][0]
        parts += [f"## {task}: {job.trainer} `{job.config}`, {job.protocol}", ""]
        summary, per_point = task_tables(task, points)
        parts += _section(summary) if summary else []
        for grid_name, tables in per_point.items():
            parts += [f"### {grid_name}", ""] if grid_name else []
            parts += [line for t in tables for line in _section(t)]
    parts += ["## Cost", "", *_section(cost_table(rows))]
    if plots:
        parts += ["## Plots", "", *(f"![{os.path.splitext(os.path.basename(p))[0]}]({p})" for p in plots), ""]
    return "\n".join(parts)


def write_tables(rows: list[Row], out_dir: str) -> list[str]:
    """Write ``out_dir/tables/<name>.csv`` and ``.tex`` for every table (atomically); returns the paths."""
    paths = []
    for table in build_tables(rows):
        for ext, text in (("csv", table.to_csv()), ("tex", table.to_latex())):
            path = os.path.join(out_dir, "tables", f"{table.name}.{ext}")
            atomic_write(path, text.encode())
            paths.append(path)
    return paths


def collect(output_root: str) -> list[Row]:
    """Rebuild the rows from an output folder: every ``job.json`` with its ``result.json`` (None if missing)."""
    rows = []
    for folder, _, files in sorted(os.walk(output_root)):
        if "job.json" in files:
            with open(os.path.join(folder, "job.json")) as f:
                job = SimpleNamespace(**json.load(f))
            rows.append((job, read_record(os.path.join(folder, "result.json"))))
    rows.sort(key=lambda row: getattr(row[0], "index", 0))  # the pipeline's order (stable: folder order within)
    return rows
