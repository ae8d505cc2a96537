"""Methods compared as rows: one accuracy table per protocol and one cost table, from every record of a folder.

A *method* is a trainer + config + grid point within one protocol, as run by one runner task or by hand (records with
no task). Its row label is the trainer name, extended with ``/config`` only when two configs of that trainer appear in
the protocol, then with ``[grid point]`` where it has one, then with ``@task`` if labels still collide.

An ``xd`` evaluation names the run it evaluated (``Record.source_folder()``); that run is its method's source (its
accuracy the source column, its training cost part of the method's cost), so a hand-run training job whose model was
evaluated cross-dataset serves as that method's xd source and still counts as a few-shot record of its own.

The accuracy conventions are those of ``tables.py`` (reused, not repeated); cost numbers count successful jobs only.
"""

from __future__ import annotations

import dataclasses
import os
from collections import Counter
from dataclasses import dataclass, field
from statistics import fmean
from typing import Any

from vltune.results.formats import Cell, Table
from vltune.results.record import PROTOCOLS, Record
from vltune.results.tables import (
    DG_ROLES,
    XD_ROLES,
    b2n_numbers,
    fewshot_averages,
    fewshot_k,
    fewshot_means,
    ordered,
    seed_stat,
    shots_name,
    transfer_numbers,
)

PROTOCOL_NAMES = {"b2n": "base-to-new", "fewshot": "few-shot", "xd": "cross-dataset"}
PEAK_PHASES = ("train", "eval")


@dataclass
class Method:
    """One compared method: its records in one protocol (any status), and for ``xd`` the runs its evaluations load
    (relabelled ``role=source``)."""

    protocol: str
    task: str
    trainer: str
    config: str
    grid_name: str
    records: list[Record] = field(default_factory=list)
    label: str = ""
    first: int = 0  # position of its first record in the input (the pipeline's order)

    @property
    def eval_only(self) -> bool:
        """Zero-shot: no record trains or loads a trained model."""
        return all(r.job.phase == "eval" and not r.job.source for r in self.records)


@dataclass
class TaskGroup:
    """The records of one runner task in one protocol (a hand-run method stands for its own task), by grid point."""

    name: str
    protocol: str
    trainer: str
    config: str
    hand_run: bool
    points: dict[str, list[Record]]
    first: int


def _as_source(record: Record) -> Record:
    """A copy of a trained run in its role as the source of a cross-dataset evaluation."""
    return dataclasses.replace(record, job=dataclasses.replace(record.job, protocol="xd", role="source"))


def _label(methods: list[Method]) -> None:
    """Set the row labels of one protocol's methods (see the module docstring)."""
    configs: dict[str, set[str]] = {}
    for m in methods:
        configs.setdefault(m.trainer, set()).add(m.config)
    for m in methods:
        m.label = m.trainer + (f"/{m.config}" if len(configs[m.trainer]) > 1 else "")
        m.label += f" [{m.grid_name}]" if m.grid_name else ""
    counts = Counter(m.label for m in methods)
    for m in methods:
        if counts[m.label] > 1:
            m.label += f" @{m.task or 'hand-run'}"


def find_methods(records: list[Record]) -> list[Method]:
    """The methods of ``records`` (from ``find_records``), ordered by protocol (b2n, few-shot, xd), then by the
    position of their first record; labels set."""
    by_key: dict[tuple[str, str, str, str, str], Method] = {}
    for i, r in enumerate(records):
        key = (r.job.protocol, r.job.task, r.job.trainer, r.job.config, r.job.grid_name)
        by_key.setdefault(key, Method(*key, first=i)).records.append(r)
    by_folder = {os.path.normpath(r.folder): r for r in records}
    for m in by_key.values():
        if m.protocol != "xd":
            continue
        have = {r.path for r in m.records}
        for r in list(m.records):
            evaluates = r.job.role in ("target", "variant") and r.job.source
            source = by_folder.get(r.source_folder()) if evaluates else None
            if source is not None and source.path not in have:
                m.records.append(_as_source(source))
                have.add(source.path)
    order = {p: i for i, p in enumerate(PROTOCOLS)}
    methods = sorted(by_key.values(), key=lambda m: (order.get(m.protocol, len(order)), m.first))
    for protocol in ordered(m.protocol for m in methods):
        _label([m for m in methods if m.protocol == protocol])
    return methods


def task_groups(methods: list[Method]) -> list[TaskGroup]:
    """The per-task appendix's groups, in pipeline order: a runner task's methods (its grid points) together; a
    hand-run method alone, named by its label (which already names its grid point)."""
    groups: dict[tuple[str, str, bool], TaskGroup] = {}
    for m in methods:
        name = m.task or m.label
        group = groups.setdefault((name, m.protocol, not m.task),
                                  TaskGroup(name, m.protocol, m.trainer, m.config, not m.task, {}, m.first))
        group.points[m.grid_name if m.task else ""] = m.records
    return sorted(groups.values(), key=lambda g: g.first)


def _of(methods: list[Method], protocol: str) -> list[Method]:
    return [m for m in methods if m.protocol == protocol]


def compare_b2n(methods: list[Method]) -> list[Table]:
    """Methods × (per dataset Base, New, H; the Average group), and the average-only table; none without b2n."""
    ms = _of(methods, "b2n")
    if not ms:
        return []
    numbers = {m.label: b2n_numbers(m.records) for m in ms}
    datasets = ordered(d for n in numbers.values() for d in n.datasets)
    empty = (None, None, None)
    body: list[list[Cell]] = [[label, *(c for d in [*datasets, "average"] for c in n.stats.get(d, empty))]
                              for label, n in numbers.items()]
    header = ["method", *(f"{d} {c}" for d in [*datasets, "Average"] for c in ("Base", "New", "H"))]
    title = ("base-to-new accuracy (%) per method: per dataset the seed means of base and new (± population std over "
             "seeds) and H = HM of those means (± spread of the per-seed H); Average: mean base and mean new over the "
             "method's datasets that have both, H = HM of those means (the CoCoOp convention)")
    full = Table("compare_b2n", title, header, body, stat_columns=tuple(range(1, len(header))))
    average = Table("compare_b2n_average", "base-to-new accuracy (%) per method, average over its datasets: "
                    "mean base, mean new, H = HM of those means", ["method", "Base", "New", "H"],
                    [[label, *n.stats.get("average", empty)] for label, n in numbers.items()], stat_columns=(1, 2, 3))
    return [full, average]


def compare_fewshot(methods: list[Method]) -> list[Table]:
    """Methods × K (the average over datasets; zero-shot for eval-only methods), then one methods × datasets table
    per K; none without few-shot records."""
    ms = _of(methods, "fewshot")
    if not ms:
        return []
    averages = {m.label: fewshot_averages(m.records) for m in ms}
    shots = sorted(ordered(k for a in averages.values() for k in a))
    tables = [Table("compare_fewshot", "few-shot accuracy (%) per method and K: the mean over the method's datasets "
                    "of the per-dataset seed means; '-' where a dataset lacks K",
                    ["method", *map(shots_name, shots)], [[label, *(a.get(k) for k in shots)]
                                                         for label, a in averages.items()])]
    for k in shots:
        at_k = [m for m in ms if any(fewshot_k(r) == k for r in m.records)]
        datasets = ordered(r.job.dataset for m in at_k for r in m.records if fewshot_k(r) == k)
        body: list[list[Cell]] = []
        for m in at_k:
            means = fewshot_means(m.records)
            body.append([m.label, *(seed_stat(means.get((d, k), [])) for d in datasets), averages[m.label][k]])
        tables.append(Table(f"compare_fewshot_{shots_name(k)}",
                            f"few-shot accuracy (%) at {shots_name(k)} per method and dataset: mean ± std over seeds; "
                            "average: mean of the dataset means", ["method", *datasets, "average"], body,
                            stat_columns=tuple(range(1, len(datasets) + 1))))
    return tables


def compare_transfer(methods: list[Method]) -> list[Table]:
    """Methods × (source, targets, average_xd) and methods × (source, variants, average_dg); each only when some
    method has targets (variants)."""
    tables = []
    for name, roles, average, what in (("compare_xd", XD_ROLES, "average_xd", "cross-dataset"),
                                       ("compare_dg", DG_ROLES, "average_dg", "domain-generalisation")):
        numbers = {m.label: transfer_numbers(m.records, roles, average) for m in _of(methods, "xd")
                   if any(r.job.role == roles[1] for r in m.records)}
        if not numbers:
            continue
        columns = ordered(c for n in numbers.values() for c in n.columns)
        body: list[list[Cell]] = [[label, *(seed_stat([v for v in n.values.get(c, []) if v is not None])
                                            for c in columns), n.average_stat()] for label, n in numbers.items()]
        header = ["method", *(f"{d} (source)" if role == "source" else d for role, d in columns), average]
        title = (f"{what} accuracy (%) per method: seed means ± population std over seeds; {average}: the mean over "
                 f"the {roles[1]}s of their seed means (source excluded), ± the spread of the per-seed averages")
        tables.append(Table(name, title, header, body, stat_columns=tuple(range(1, len(header)))))
    return tables


def trained(record: Record) -> bool:
    """Whether the run trained (eval-only runs record ``train_time_s`` 0)."""
    return (record.cost.get("train_time_s") or 0) > 0


def memory_peaks(record: Record) -> dict[str, tuple[float, str]]:
    """``{"train"|"eval": (MB, meter)}``: the tensor-memory peaks a record measured, by phase.

    New records carry ``<phase>_peak_mb`` and ``<phase>_peak_method`` (null when not measured). Older ones carry one
    ``peak_mem_mb`` with its ``peak_mem_method``: the training peak of a run that trained, else the evaluation's; an
    ``rss`` value is a process measure, not a tensor peak (it is read by ``rss_mb``).
    """
    cost = record.cost
    if any(f"{p}_peak_mb" in cost for p in PEAK_PHASES):
        return {p: (float(cost[f"{p}_peak_mb"]), str(cost.get(f"{p}_peak_method") or "unknown"))
                for p in PEAK_PHASES if cost.get(f"{p}_peak_mb") is not None}
    value, meter = cost.get("peak_mem_mb"), cost.get("peak_mem_method")
    if value is None or meter in (None, "rss"):
        return {}
    return {"train" if trained(record) else "eval": (float(value), str(meter))}


def rss_mb(record: Record) -> float | None:
    """The process's peak resident set (MB): ``peak_rss_mb``, or an older record's ``rss``-measured peak."""
    cost = record.cost
    if cost.get("peak_rss_mb") is not None:
        return float(cost["peak_rss_mb"])
    if cost.get("peak_mem_method") == "rss" and cost.get("peak_mem_mb") is not None:
        return float(cost["peak_mem_mb"])
    return None


def _fmean(values: list[float]) -> float | None:
    return fmean(values) if values else None


def cost_numbers(records: list[Record]) -> dict[str, Any]:
    """Cost of one method from its successful records; a value no record has is None.

    Times are means per job (train and cache time over the jobs that trained), throughputs means over the jobs that
    measured them, memory the max per phase and meter (``peaks[phase][meter]``), sizes the max.
    """
    ok = [r for r in records if r.accuracy is not None]
    training = [r for r in ok if trained(r)]

    def values(rs: list[Record], key: str) -> list[Any]:
        return [r.cost[key] for r in rs if r.cost.get(key) is not None]

    train = [float(r.cost["train_time_s"]) for r in training]
    cache = [float(r.cost.get("cache_time_s") or 0.0) for r in training]
    peaks: dict[str, dict[str, float]] = {p: {} for p in PEAK_PHASES}
    for r in ok:
        for phase, (mb, meter) in memory_peaks(r).items():
            peaks[phase][meter] = max(mb, peaks[phase].get(meter, mb))
    rss = [v for r in ok if (v := rss_mb(r)) is not None]
    ckpt = values(ok, "ckpt_bytes")
    return {"jobs": len(ok), "train_time_s": _fmean(train), "cache_time_s": _fmean(cache),
            "train_cache_s": _fmean([t + c for t, c in zip(train, cache)]),
            "eval_time_s": _fmean([float(v) for v in values(ok, "eval_time_s")]),
            "images_per_s": _fmean([v for v in values(ok, "images_per_s") if v > 0]),
            "eval_images_per_s": _fmean([v for v in values(ok, "eval_images_per_s") if v > 0]),
            "peaks": peaks, "peak_rss_mb": max(rss, default=None),
            "ckpt_mb": max(ckpt) / 2**20 if ckpt else None,
            "trainable_params": max(values(ok, "trainable_params"), default=None)}


_COST_BEFORE = {"jobs": "jobs", "train_time_s": "train time s", "cache_time_s": "cache time s",
                "train_cache_s": "train+cache s", "eval_time_s": "eval time s", "images_per_s": "images/s",
                "eval_images_per_s": "eval images/s"}
_COST_AFTER = {"peak_rss_mb": "peak RSS MB (process)", "ckpt_mb": "checkpoint MB",
               "trainable_params": "trainable params"}
_NOT_AVERAGED = ("ckpt_mb", "trainable_params")  # averages of model sizes mean nothing
COST_NOTES = (
    "train time: mean over the method's training jobs (eval-only jobs excluded) of the time in training steps; cache "
    "time: building frozen-feature caches before training (e.g. Skip Tuning's), 0 when none; train+cache: their sum, "
    "the training cost plotted",
    "eval time: mean per job of the final test (training jobs included); images/s: training throughput, eval "
    "images/s: test throughput, means over the jobs that measured them",
    "train/eval peak MB: the max over the jobs of the peak tensor memory of the training/test phase, one column per "
    "meter: cuda_max_allocated = torch.cuda.max_memory_allocated (GPU), cpu_profiler_tensor_bytes = the CPU "
    "profiler's peak of live tensor bytes (CPU); '-' where not measured (e.g. the training peak of an eval-only "
    "method)",
    "peak RSS MB: the process's peak resident set size (weights, libraries, data loading included), max over the jobs",
    "checkpoint MB: the saved trainable state; trainable params: the max over the jobs",
    "xd rows include the training runs their evaluations load; average: the mean over the rows that have the column "
    "(never across meters; not for model sizes)",
)


def compare_cost(methods: list[Method]) -> Table | None:
    """Methods (one row per method per protocol) × cost columns, with the memory peaks split per meter; an average
    row. None without methods."""
    if not methods:
        return None
    numbers = [cost_numbers(m.records) for m in methods]
    meters = {p: ordered(meter for n in numbers for meter in n["peaks"][p]) for p in PEAK_PHASES}
    peak_columns = [(p, meter) for p in PEAK_PHASES for meter in meters[p]]
    header = ["method", *_COST_BEFORE.values(), *(f"{p} peak MB ({meter})" for p, meter in peak_columns),
              *_COST_AFTER.values()]
    body: list[list[Cell]] = []
    for m, n in zip(methods, numbers):
        body.append([f"{m.label} ({m.protocol})", *(n[k] for k in _COST_BEFORE),
                     *(n["peaks"][p].get(meter) for p, meter in peak_columns),
                     *(n[k] for k in _COST_AFTER)])
    averaged = [True] * (len(header) - 1 - len(_COST_AFTER)) + [k not in _NOT_AVERAGED for k in _COST_AFTER]
    average: list[Cell] = ["average"]
    for j, keep in enumerate(averaged, start=1):
        column = [row[j] for row in body if isinstance(row[j], (int, float))]
        average.append(fmean(column) if keep and column else None)
    title = "cost per method and protocol, over its successful jobs"
    return Table("compare_cost", title, header, [*body, average], footer=1, notes=COST_NOTES)


def _headline(m: Method) -> tuple[Cell, ...]:
    """A method's one number per protocol for the overview: b2n average H; few-shot first → last K average
    (zero-shot for an eval-only method); xd and dg averages."""
    if m.protocol == "b2n":
        stats = b2n_numbers(m.records).stats.get("average")
        return (stats[2] if stats else None,)
    if m.protocol == "fewshot":
        averages = fewshot_averages(m.records)
        ks = sorted(averages)
        return (averages[ks[0]], averages[ks[-1]]) if ks else (None, None)
    return tuple(transfer_numbers(m.records, roles, name).average_stat()
                 for roles, name in ((XD_ROLES, "average_xd"), (DG_ROLES, "average_dg")))


def compare_overview(methods: list[Method]) -> Table | None:
    """One row per method label over every protocol: base-to-new H, few-shot at the smallest and largest K,
    cross-dataset and domain-generalisation averages, and its training cost on base-to-new (mean train+cache time
    per job, training peak per meter). None without methods."""
    if not methods:
        return None
    labels = ordered(m.label for m in methods)
    by = {(m.label, m.protocol): m for m in methods}
    fewshot = [m for m in methods if m.protocol == "fewshot"]
    ks = sorted(ordered(fewshot_k(r) for m in fewshot for r in m.records if fewshot_k(r) > 0))
    first, last = (shots_name(ks[0]), shots_name(ks[-1])) if ks else ("first K", "last K")
    b2n_costs = {label: cost_numbers(by[label, "b2n"].records) for label in labels if (label, "b2n") in by}
    meters = ordered(meter for n in b2n_costs.values() for meter in n["peaks"]["train"])
    header = ["method", "b2n H", f"few-shot {first}", f"few-shot {last}", "xd average", "dg average",
              "b2n train+cache s/job", *(f"b2n train peak MB ({meter})" for meter in meters)]
    body: list[list[Cell]] = []
    for label in labels:
        row: list[Cell] = [label]
        for protocol, width in (("b2n", 1), ("fewshot", 2), ("xd", 2)):
            row += list(_headline(by[label, protocol])) if (label, protocol) in by else [None] * width
        cost = b2n_costs.get(label)
        row.append(cost["train_cache_s"] if cost else None)
        row += [cost["peaks"]["train"].get(meter) if cost else None for meter in meters]
        body.append(row)
    title = ("overview per method: base-to-new H (average over datasets), few-shot average accuracy at the smallest "
             "and largest K (zero-shot for zero-shot CLIP), cross-dataset and domain-generalisation averages (%); "
             "training cost of its base-to-new jobs")
    return Table("compare_overview", title, header, body, stat_columns=(1, 4, 5))


def cost_ratios(methods: list[Method], pairs: list[tuple[str, str]]) -> list[str]:
    """``"A / B: training time ×t, training peak memory ×m (meter)"`` per pair of method labels, measured on their
    base-to-new jobs (time: mean train+cache seconds per job; memory: the max training peak of one meter both
    have). A pair without both methods is left out."""
    by = {m.label: cost_numbers(m.records) for m in methods if m.protocol == "b2n"}
    lines = []
    for heavy, light in pairs:
        if heavy not in by or light not in by:
            continue
        h, lt = by[heavy], by[light]
        parts = []
        if h["train_cache_s"] and lt["train_cache_s"]:
            parts.append(f"training time ×{h['train_cache_s'] / lt['train_cache_s']:.2f} "
                         f"({h['train_cache_s']:.2f} s vs {lt['train_cache_s']:.2f} s per job)")
        for meter in ordered(k for k in h["peaks"]["train"] if k in lt["peaks"]["train"]):
            a, b = h["peaks"]["train"][meter], lt["peaks"]["train"][meter]
            parts.append(f"training peak memory ×{a / b:.2f} ({a:.1f} MB vs {b:.1f} MB, {meter})")
        if parts:
            lines.append(f"{heavy} / {light}: " + "; ".join(parts))
    return lines


def comparison_tables(methods: list[Method]) -> list[Table]:
    """The comparison section's tables: b2n, b2n average-only, few-shot (per K, then per dataset), xd, dg, cost."""
    cost = compare_cost(methods)
    return [*compare_b2n(methods), *compare_fewshot(methods), *compare_transfer(methods), *([cost] if cost else [])]
