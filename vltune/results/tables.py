"""Accuracy aggregation over ``result.json`` records (never logs, never ``job.json``), and the per-task tables.

Conventions (protocols_and_numbers.md §2-5), each implemented once here and reused by the comparison tables
(``compare.py``) and the plots:

* base-to-new: per dataset, average base and new accuracy over seeds first, then H = HM(base, new); the average row
  is HM(mean base, mean new), not the mean of per-dataset H (the CoCoOp convention). Its per-seed H is the HM of that
  seed's averages over datasets.
* few-shot: per dataset and K, the mean ± std over seeds; the average row is the mean of the per-dataset means. An
  eval-only run that loads no trained model is zero-shot (K = 0) whatever shots it was given.
* cross-dataset: the source accuracy, each target's, and ``average_xd`` over the targets (source excluded);
  domain generalisation: each variant's and ``average_dg`` over the variants. Every value is a seed mean.
* spreads are population std (ddof 0) over seeds, as CoOp's ``parse_test_res.py``.

Only records with status ``success`` count; a missing or failed record shows as ``-`` and is left out of averages.
A record's place comes from its own ``job`` (``protocol``, ``role``, ``dataset``, ``seed``, ``shots``, ``grid``);
the functions here take the records of one task (or method) and one grid point.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from statistics import mean, pstdev
from typing import Any

from vltune.results.formats import Cell, Stat, Table, slug
from vltune.results.record import Record


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


def fewshot_k(record: Record) -> int:
    """The K of a few-shot record: 0 for a zero-shot run (eval-only, loading no trained model), else its shots."""
    return 0 if record.job.phase == "eval" and not record.job.source else record.job.shots


def ordered(values: Iterable[Any]) -> list[Any]:
    """The distinct values in first-seen order (datasets, seeds, columns keep the pipeline's order)."""
    return list(dict.fromkeys(values))


def _std(values: list[float]) -> float | None:
    """Population std over seeds; None for a single seed (a spread of one run would read as certainty)."""
    return pstdev(values) if len(values) > 1 else None


def _mean_if_all(values: list[float | None]) -> float | None:
    """The mean when every value is present (a partial average would not compare with other rows), else None."""
    return mean(values) if values and all(v is not None for v in values) else None


def _present(values: Iterable[float | None]) -> list[float]:
    return [v for v in values if v is not None]


def seed_stat(values: list[float]) -> Stat | None:
    """Mean ± population std over seeds; None when no seed has a value."""
    return Stat(mean(values), _std(values)) if values else None


def _accuracies(records: list[Record]) -> dict[tuple[str, str, int], float]:
    """``{(role, dataset, seed): accuracy}`` of the successful runs (one shots value per table but few-shot's)."""
    return {(r.job.role, r.job.dataset, r.job.seed): a for r in records if (a := r.accuracy) is not None}


def _over_seeds(records: list[Record], key: Callable[[Record], Any]) -> dict[tuple[str, Any], list[float]]:
    """``{(dataset, key(record)): successful accuracies over seeds}``."""
    out: dict[tuple[str, Any], list[float]] = {}
    for r in records:
        if (a := r.accuracy) is not None:
            out.setdefault((r.job.dataset, key(r)), []).append(a)
    return out


def _title(label: str, text: str) -> str:
    return f"{label}: {text}" if label else text


@dataclass
class B2N:
    """Base-to-new numbers of one method (or task grid point).

    ``per_seed``: ``{dataset: (base per seed, new per seed)}`` over ``seeds`` (None where a seed has no result), and
    ``"average"``: each seed's mean over the summarised datasets (None unless all have that seed).
    ``stats``: ``{dataset: (base, new, H)}`` as ``Stat`` for the datasets with both a base and a new result, and
    ``"average"``; H's mean is the HM of the means, its std the spread of the per-seed H.
    """

    datasets: list[str]
    seeds: list[int]
    per_seed: dict[str, tuple[list[float | None], list[float | None]]]
    stats: dict[str, tuple[Stat, Stat, Stat]]

    @staticmethod
    def seed_h(base: list[float | None], new: list[float | None]) -> list[float | None]:
        return [harmonic_mean(b, n) if b is not None and n is not None else None for b, n in zip(base, new)]


def b2n_numbers(records: list[Record]) -> B2N:
    """Base-to-new aggregation of one method's records (the CoCoOp convention, via ``b2n_summary``)."""
    datasets, seeds = ordered(r.job.dataset for r in records), sorted(ordered(r.job.seed for r in records))
    acc = _accuracies(records)
    per_seed = {d: ([acc.get(("base", d, s)) for s in seeds], [acc.get(("new", d, s)) for s in seeds])
                for d in datasets}
    summary = b2n_summary({d: _present(v[0]) for d, v in per_seed.items()},
                          {d: _present(v[1]) for d, v in per_seed.items()})
    stats = {}
    for d, (b, n, h) in summary.items():
        if d == "average":
            continue
        bs, ns = per_seed[d]
        stats[d] = (Stat(b, _std(_present(bs))), Stat(n, _std(_present(ns))),
                    Stat(h, _std(_present(B2N.seed_h(bs, ns)))))
    included = [d for d in datasets if d in stats]
    avg_b = [_mean_if_all([per_seed[d][0][i] for d in included]) for i in range(len(seeds))]
    avg_n = [_mean_if_all([per_seed[d][1][i] for d in included]) for i in range(len(seeds))]
    per_seed["average"] = (avg_b, avg_n)
    if "average" in summary:
        b, n, h = summary["average"]
        stats["average"] = (Stat(b, _std(_present(avg_b))), Stat(n, _std(_present(avg_n))),
                            Stat(h, _std(_present(B2N.seed_h(avg_b, avg_n)))))
    return B2N(datasets, seeds, per_seed, stats)


def b2n_table(records: list[Record], name: str = "b2n", label: str = "") -> Table:
    """Per dataset and seed: base, new, H; then base, new, H as mean ± std over seeds; an average row.

    H's mean is the HM of the mean base and new (not the mean of per-seed H), its std the spread of the per-seed H.
    The average row's per-seed cells average each seed over the datasets (``-`` where one lacks that seed), and its
    std is the spread of those per-seed averages.
    """
    numbers = b2n_numbers(records)
    body: list[list[Cell]] = []
    for d in [*numbers.datasets, "average"]:
        bs, ns = numbers.per_seed[d]
        cells: list[Cell] = [c for triple in zip(bs, ns, B2N.seed_h(bs, ns)) for c in triple]
        # no base or no new accuracy at all: nothing to summarise, and left out of the average row
        body.append([d, *cells, *numbers.stats.get(d, (None, None, None))])
    header = ["dataset", *(f"{c} s{s}" for s in numbers.seeds for c in ("base", "new", "H")), "base", "new", "H"]
    title = _title(label, "base-to-new accuracy (%) per seed, and mean ± std over seeds; H = HM of the mean base and "
                   "new; average row: mean over the datasets that have both, H = HM of those means")
    return Table(name, title, header, body, footer=1, stat_columns=tuple(range(len(header) - 3, len(header))))


def fewshot_means(records: list[Record]) -> dict[tuple[str, int], list[float]]:
    """``{(dataset, K): successful accuracies over seeds}`` (K = 0: zero-shot)."""
    return _over_seeds(records, fewshot_k)


def fewshot_averages(records: list[Record]) -> dict[int, float | None]:
    """``{K: mean over datasets of the per-dataset seed means}``; None where a dataset has no result for K."""
    datasets, shots = ordered(r.job.dataset for r in records), sorted(ordered(fewshot_k(r) for r in records))
    means = {key: mean(v) for key, v in fewshot_means(records).items()}
    return {k: _mean_if_all([means.get((d, k)) for d in datasets]) for k in shots}


def shots_name(k: int) -> str:
    return f"{k}-shot" if k else "zero-shot"


def fewshot_table(records: list[Record], name: str = "fewshot", label: str = "") -> Table:
    """Per dataset and K (0 = zero-shot): mean ± std over seeds; an average row of the per-dataset means."""
    datasets, shots = ordered(r.job.dataset for r in records), sorted(ordered(fewshot_k(r) for r in records))
    acc = fewshot_means(records)
    body: list[list[Cell]] = [[d, *(seed_stat(acc.get((d, k), [])) for k in shots)] for d in datasets]
    body.append(["average", *fewshot_averages(records).values()])
    header = ["dataset", *map(shots_name, shots)]
    title = _title(label, "few-shot accuracy (%), mean ± std over seeds; average row: mean of the dataset means")
    return Table(name, title, header, body, footer=1, stat_columns=tuple(range(1, len(header))))


@dataclass
class Transfer:
    """Cross-dataset or domain-generalisation numbers of one method: ``values[(role, dataset)]`` per seed of
    ``seeds`` (None where missing), columns in order (the source first); ``average`` the name of the average over the
    non-source columns."""

    columns: list[tuple[str, str]]
    seeds: list[int]
    values: dict[tuple[str, str], list[float | None]]
    average: str

    def seed_average(self, i: int) -> float | None:
        """Seed ``seeds[i]``'s average over the non-source columns; None unless every one has that seed."""
        return _mean_if_all([self.values[c][i] for c in self.columns if c[0] != "source"])

    def means(self) -> dict[tuple[str, str], float | None]:
        return {c: mean(v) if (v := _present(self.values[c])) else None for c in self.columns}

    def mean_average(self) -> float | None:
        """The average over the non-source columns of their seed means (None when one has no result)."""
        return _mean_if_all([m for c, m in self.means().items() if c[0] != "source"])

    def average_stat(self) -> Stat | None:
        """``mean_average`` ± the spread of the complete per-seed averages."""
        average = self.mean_average()
        spread = _present(self.seed_average(i) for i in range(len(self.seeds)))
        return None if average is None else Stat(average, _std(spread))


def transfer_numbers(records: list[Record], roles: tuple[str, ...], average: str) -> Transfer:
    """The accuracies of ``records`` in ``roles`` (``source`` + ``target`` or ``source`` + ``variant``)."""
    acc = _accuracies(records)
    columns = [(role, d) for role in roles for d in ordered(r.job.dataset for r in records if r.job.role == role)]
    seeds = sorted(ordered(r.job.seed for r in records))
    return Transfer(columns, seeds, {c: [acc.get((*c, s)) for s in seeds] for c in columns}, average)


def _transfer_table(numbers: Transfer, name: str, title: str) -> Table:
    body: list[list[Cell]] = [[f"seed {s}", *(numbers.values[c][i] for c in numbers.columns), numbers.seed_average(i)]
                              for i, s in enumerate(numbers.seeds)]
    body.append(["mean", *numbers.means().values(), numbers.mean_average()])
    return Table(name, title, ["seed", *(d for _, d in numbers.columns), numbers.average], body, footer=1)


XD_ROLES, DG_ROLES = ("source", "target"), ("source", "variant")


def transfer_averages(records: list[Record]) -> dict[str, float | None]:
    """``average_xd`` (and ``average_dg`` when there are variants) of the seed means."""
    out = {"average_xd": transfer_numbers(records, XD_ROLES, "average_xd").mean_average()}
    if any(r.job.role == "variant" for r in records):
        out["average_dg"] = transfer_numbers(records, ("variant",), "average_dg").mean_average()
    return out


def xd_tables(records: list[Record], name: str = "", label: str = "") -> list[Table]:
    """The cross-dataset table and, when there are variants, the domain-generalisation table."""
    xd = transfer_numbers(records, XD_ROLES, "average_xd")
    source = ", ".join(d for r, d in xd.columns if r == "source") or "-"
    tables = [_transfer_table(xd, f"{name}xd", _title(label, "cross-dataset accuracy (%) per seed and seed means; "
                                                      f"source {source}, average_xd over the targets"))]
    if any(r.job.role == "variant" for r in records):
        dg = transfer_numbers(records, ("variant",), "average_dg")
        title = "domain-generalisation accuracy (%) per seed and seed means; average_dg over the variants"
        tables.append(_transfer_table(dg, f"{name}dg", _title(label, title)))
    return tables


def headline(records: list[Record]) -> dict[str, float | None]:
    """The protocol's summary numbers of one method (grid point): b2n base, new, H; few-shot the average per K;
    cross-dataset average_xd and average_dg."""
    protocol = records[0].job.protocol
    if protocol == "b2n":
        average = b2n_numbers(records).stats.get("average")
        return dict(zip(("base", "new", "H"), (s.mean for s in average) if average else [None] * 3))
    if protocol == "fewshot":
        return {shots_name(k): v for k, v in fewshot_averages(records).items()}
    return transfer_averages(records)


def headline_accuracy(records: list[Record]) -> tuple[str, float | None]:
    """The one accuracy that stands for a method: b2n H (average row), few-shot the average at the largest K,
    cross-dataset average_xd; with its name."""
    protocol = records[0].job.protocol
    if protocol == "fewshot":
        k, v = list(fewshot_averages(records).items())[-1]
        return (f"average at {k} shots" if k else "zero-shot average"), v
    if protocol == "b2n":
        return "average H", headline(records)["H"]
    return "average_xd", headline(records)["average_xd"]


def point_grid(records: list[Record]) -> dict[str, Any]:
    """The grid values a grid point's records share (few-shot's per-job shots value is not the point's)."""
    first = records[0].job.grid or {}
    return {k: v for k, v in first.items() if all((r.job.grid or {}).get(k) == v for r in records)}


def grid_table(task: str, points: dict[str, list[Record]]) -> Table:
    """One row per grid point: its name, the value of each grid key, and the protocol's headline numbers."""
    grids = {g: point_grid(rs) for g, rs in points.items()}
    keys = ordered(k for grid in grids.values() for k in grid)
    numbers = {g: headline(rs) for g, rs in points.items()}
    columns = ordered(k for n in numbers.values() for k in n)
    body: list[list[Cell]] = []
    for g in points:
        values = [grids[g].get(k) for k in keys]
        values = [v if v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)) else str(v)
                  for v in values]
        body.append([g, *values, *(numbers[g].get(c) for c in columns)])
    header = ["grid point", *keys, *columns]
    return Table(f"{slug(task)}.grid", f"{task}: headline accuracy (%) per grid point", header, body)


def task_tables(task: str, points: dict[str, list[Record]]) -> tuple[Table | None, dict[str, list[Table]]]:
    """(the grid summary, when there is more than one grid point; ``{grid_name: accuracy tables}``) of one task."""
    out = {}
    for grid_name, rs in points.items():
        name = f"{slug(task)}.{slug(grid_name) + '.' if grid_name else ''}"
        label = f"{task} [{grid_name}]" if grid_name else task
        protocol = rs[0].job.protocol
        if protocol == "b2n":
            out[grid_name] = [b2n_table(rs, name + "b2n", label)]
        elif protocol == "fewshot":
            out[grid_name] = [fewshot_table(rs, name + "fewshot", label)]
        else:
            out[grid_name] = xd_tables(rs, name, label)
    return (grid_table(task, points) if len(points) > 1 else None), out
