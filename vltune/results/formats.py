"""The ``Table`` the results are built into, and its three renderings.

* markdown (the report): numbers to 2 decimals, ``mean ± std`` cells, summary rows in bold;
* CSV (for scripts): numbers at full precision, a ``mean ± std`` column split into ``<col> mean`` and ``<col> std``,
  ``""`` for a missing value, so a parsed cell gives back the exact float;
* LaTeX (for papers): a booktabs ``tabular``, cells escaped, a ``\\midrule`` before the bold summary rows.

A table's ``notes`` (how its numbers are measured) follow it in markdown and precede it as comments in LaTeX; CSV
holds the numbers only.

A missing value is ``None`` in ``Table.rows`` and shows as ``-`` in markdown and LaTeX.

The renderers are written here rather than with ``tabulate`` (checked with tabulate 0.10): its ``github`` format pads
every cell to the column width (the report's rows would no longer read ``| caltech101 | 62.00 ± 2.00 |``) and leaves a
``|`` inside a cell unescaped, and its ``latex_booktabs`` format escapes every cell, so a ``$\\pm$`` cell or a bold
``\\textbf`` summary label would print as text; its raw LaTeX format has no booktabs rules. Neither saves lines.
"""

from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass
from typing import NamedTuple


class Stat(NamedTuple):
    """A mean over seeds and its population std (ddof 0, as CoOp's parse_test_res); std None: no spread shown."""

    mean: float
    std: float | None = None


Cell = str | int | float | Stat | None

_LATEX_SPECIAL = re.compile(r"([_%&#$])")


def slug(text: str) -> str:
    """A file-safe name: ``=`` becomes ``-``, anything but letters, digits, ``.``, ``_`` and ``-`` becomes ``_``."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", text.replace("=", "-"))


def _number(x: float | int) -> str:
    return f"{x:,}" if isinstance(x, int) else f"{x:.2f}"


def _text(cell: Cell, pm: str) -> str:
    """A cell for markdown (``pm`` = ``±``) or LaTeX (``pm`` = ``$\\pm$``); strings are returned as given."""
    if cell is None:
        return "-"
    if isinstance(cell, Stat):
        return _number(cell.mean) if cell.std is None else f"{cell.mean:.2f} {pm} {cell.std:.2f}"
    if isinstance(cell, (int, float)) and not isinstance(cell, bool):
        return _number(cell)
    return str(cell)


def _latex_escape(text: str) -> str:
    return _LATEX_SPECIAL.sub(r"\\\1", text)


@dataclass
class Table:
    """One result table.

    Args:
        name: file-safe slug, used for ``tables/<name>.csv`` and ``.tex`` (e.g. ``coop_b2n.b2n``).
        title: one line saying what the numbers are.
        header: column names; the first column labels the rows.
        rows: cells, summary rows (average, total) last.
        footer: how many trailing rows are summaries (bold, after a rule).
        stat_columns: indices of the columns holding ``Stat`` cells; each becomes two CSV columns (mean, std).
        notes: footnotes, one sentence each (e.g. how a cost column is measured).
    """

    name: str
    title: str
    header: list[str]
    rows: list[list[Cell]]
    footer: int = 0
    stat_columns: tuple[int, ...] = ()
    notes: tuple[str, ...] = ()

    def _is_footer(self, i: int) -> bool:
        return i >= len(self.rows) - self.footer

    def to_markdown(self) -> str:
        """A GitHub markdown table; summary rows have their label in bold; the notes follow as a list."""

        def line(cells: list[str]) -> str:
            return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

        out = [line(self.header), "|" + "---|" * len(self.header)]
        for i, row in enumerate(self.rows):
            cells = [_text(c, "±") for c in row]
            if self._is_footer(i) and cells:
                cells[0] = f"**{cells[0]}**"
            out.append(line(cells))
        if self.notes:
            out += ["", *(f"- {note}" for note in self.notes)]
        return "\n".join(out)

    def to_csv(self) -> str:
        """CSV at full precision: ``repr`` of every float, ``""`` for missing, ``Stat`` columns split in two."""

        def raw(x: Cell) -> str:
            return "" if x is None else repr(x) if isinstance(x, float) else str(x)

        header: list[str] = []
        for j, h in enumerate(self.header):
            header += [f"{h} mean", f"{h} std"] if j in self.stat_columns else [h]
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(header)
        for row in self.rows:
            cells: list[str] = []
            for j, c in enumerate(row):
                if j not in self.stat_columns:
                    cells.append(raw(c.mean if isinstance(c, Stat) else c))
                elif isinstance(c, Stat):
                    cells += [raw(c.mean), raw(c.std)]
                else:
                    cells += [raw(c), ""]
            writer.writerow(cells)
        return buf.getvalue()

    def to_latex(self) -> str:
        """A booktabs ``tabular`` (needs ``\\usepackage{booktabs}``), preceded by the title and notes as comments."""
        numeric = [any(isinstance(r[j], (int, float, Stat)) for r in self.rows) for j in range(len(self.header))]
        spec = "".join("r" if n else "l" for n in numeric)
        out = [f"% {self.title}", *(f"% {note}" for note in self.notes), f"\\begin{{tabular}}{{{spec}}}", "\\toprule",
               " & ".join(_latex_escape(h) for h in self.header) + " \\\\", "\\midrule"]
        for i, row in enumerate(self.rows):
            cells = [_latex_escape(c) if isinstance(c, str) else _text(c, "$\\pm$") for c in row]
            if self._is_footer(i):
                if i == len(self.rows) - self.footer and i > 0:
                    out.append("\\midrule")
                cells[0] = f"\\textbf{{{cells[0]}}}"
            out.append(" & ".join(cells) + " \\\\")
        out += ["\\bottomrule", "\\end{tabular}", ""]
        return "\n".join(out)
