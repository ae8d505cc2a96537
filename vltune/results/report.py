"""The report, tables and plots of any folder of runs, from its ``result.json`` records alone.

Used by ``python -m vltune.results DIR`` and by the runner after a suite, so both write the same files:
``report.md``, ``tables/<name>.csv`` and ``.tex``, ``plots/*.png``. The folder may hold the runner's output, hand-run
``train.py`` jobs, or both.

report.md opens with the comparison tables (methods as rows, one per protocol, then cost; ``compare.py``), then the
plots, then the per-task tables as an appendix (``tables.py``).
"""

from __future__ import annotations

import logging
import os

from vltune.fileio import atomic_write
from vltune.results.compare import Method, comparison_tables, find_methods, task_groups
from vltune.results.formats import Table
from vltune.results.record import Record, find_records
from vltune.results.tables import task_tables

logger = logging.getLogger(__name__)


def _all_tables(methods: list[Method]) -> list[Table]:
    tables = comparison_tables(methods)
    for group in task_groups(methods):
        summary, per_point = task_tables(group.name, group.points)
        tables += [t for ts in per_point.values() for t in ts] + ([summary] if summary else [])
    return tables


def build_tables(records: list[Record]) -> list[Table]:
    """Every table: the comparison tables, then each task's accuracy tables and grid summary, in pipeline order."""
    return _all_tables(find_methods(records))


def _section(table: Table) -> list[str]:
    return [f"*{table.title}*", "", table.to_markdown(), ""]


def render_report(records: list[Record], plots: list[str] | None = None,
                  skipped: list[tuple[str, str]] | None = None) -> str:
    """report.md's text: the comparison section, the plots (paths relative to the report's folder), the per-task
    appendix; ``skipped`` records (path, reason) are listed first, so a damaged file is seen, not silently lost."""
    methods = find_methods(records)
    parts = ["# Results", ""]
    if skipped:
        parts += [f"**{len(skipped)} record(s) skipped** (unreadable or malformed; fix or delete them, then rebuild "
                  "with `python -m vltune.results DIR`):", "", *(f"- `{path}`: {reason}" for path, reason in skipped),
                  ""]
    parts += ["## Comparison", ""]
    parts += [line for t in comparison_tables(methods) for line in _section(t)]
    if plots:
        parts += ["## Plots", "", *(f"![{os.path.splitext(os.path.basename(p))[0]}]({p})" for p in plots), ""]
    parts += ["## Per task", ""]
    for group in task_groups(methods):
        name = f"{group.name} (hand-run)" if group.hand_run else group.name
        parts += [f"### {name}: {group.trainer} `{group.config}`, {group.protocol}", ""]
        summary, per_point = task_tables(group.name, group.points)
        parts += _section(summary) if summary else []
        for grid_name, tables in per_point.items():
            parts += [f"#### {grid_name}", ""] if grid_name else []
            parts += [line for t in tables for line in _section(t)]
    return "\n".join(parts)


def write_tables(records: list[Record], out_dir: str) -> list[str]:
    """Write ``out_dir/tables/<name>.csv`` and ``.tex`` for every table (atomically); returns the paths."""
    paths = []
    for table in build_tables(records):
        for ext, text in (("csv", table.to_csv()), ("tex", table.to_latex())):
            path = os.path.join(out_dir, "tables", f"{table.name}.{ext}")
            atomic_write(path, text.encode())
            paths.append(path)
    return paths


def rebuild_files(root: str, plots: bool = True) -> tuple[str, list[str]]:
    """(the report text, every path written: report.md, tables, plots) of the records under ``root``.

    Raises:
        FileNotFoundError: ``root`` is not a folder.
        ValueError: it holds no ``result.json`` (nothing ran yet, or the wrong folder).
    """
    if not os.path.isdir(root):
        raise FileNotFoundError(f"output folder not found: {root}")
    skipped: list[tuple[str, str]] = []
    records = find_records(root, skipped)
    for path, reason in skipped:
        logger.warning(f"skipped {path}: {reason}")
    if not records:
        raise ValueError(f"no result.json under {root}{' that could be read' if skipped else ''}; is it a folder "
                         "of runs?" + "".join(f"\n  skipped {p}: {r}" for p, r in skipped))
    written = write_tables(records, root)
    plot_paths: list[str] = []
    if plots:
        from vltune.results.plots import write_plots  # matplotlib is only needed here

        plot_paths = write_plots(records, root)
    report = render_report(records, plot_paths, skipped)  # plot paths are relative to root, where report.md goes
    report_path = os.path.join(root, "report.md")
    atomic_write(report_path, report.encode())
    return report, [report_path, *written, *(os.path.join(root, p) for p in plot_paths)]


def rebuild(root: str, plots: bool = True) -> str:
    """Write ``report.md``, the tables and (unless ``plots`` is False) the plots of ``root``; returns the report.

    Raises:
        FileNotFoundError: ``root`` is not a folder.
        ValueError: it holds no ``result.json``.
    """
    return rebuild_files(root, plots)[0]
