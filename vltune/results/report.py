"""Rebuild a suite's report, tables and plots from its output folder alone (``job.json`` + ``result.json`` per job).

Used by ``python -m vltune.results OUTPUT_DIR`` and by the runner after a suite, so both write the same files:
``report.md``, ``tables/<name>.csv`` and ``.tex``, ``plots/*.png``.
"""

from __future__ import annotations

import os

from vltune.fileio import atomic_write
from vltune.results.tables import collect, render_report, write_tables


def rebuild_files(output_root: str, plots: bool = True) -> tuple[str, list[str]]:
    """(the report text, every path written: report.md, tables, plots).

    Raises:
        FileNotFoundError: ``output_root`` is not a folder.
        ValueError: it holds no ``job.json`` (not a suite's output folder, or nothing ran yet).
    """
    if not os.path.isdir(output_root):
        raise FileNotFoundError(f"output folder not found: {output_root}")
    rows = collect(output_root)
    if not rows:
        raise ValueError(f"no job.json under {output_root}; is it a suite's output folder?")
    written = write_tables(rows, output_root)
    plot_paths: list[str] = []
    if plots:
        from vltune.results.plots import write_plots  # matplotlib is only needed here

        plot_paths = write_plots(rows, output_root)
    report = render_report(rows, plot_paths)  # plot paths are relative to output_root, where report.md goes
    report_path = os.path.join(output_root, "report.md")
    atomic_write(report_path, report.encode())
    return report, [report_path, *written, *(os.path.join(output_root, p) for p in plot_paths)]


def rebuild(output_root: str, plots: bool = True) -> str:
    """Write ``report.md``, the tables and (unless ``plots`` is False) the plots of ``output_root``.

    Returns the report text.

    Raises:
        FileNotFoundError: ``output_root`` is not a folder.
        ValueError: it holds no ``job.json``.
    """
    return rebuild_files(output_root, plots)[0]
