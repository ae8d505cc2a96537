"""Paste the comparison tables of a folder of runs into README.md, between ``<!-- comparison:begin -->`` and
``<!-- comparison:end -->``, so the README's example is generated, never typed.

The tables are the report's comparison section (``vltune.results.compare``) without the per-K few-shot tables,
built from the records under the folder exactly as ``python -m vltune.results`` builds them.

Usage: ``python scripts/readme_tables.py output/minibench [--readme README.md]`` (after ``make demo``).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vltune.fileio import atomic_write  # noqa: E402
from vltune.results.compare import comparison_tables, find_methods  # noqa: E402
from vltune.results.record import find_records  # noqa: E402

BEGIN, END = "<!-- comparison:begin -->", "<!-- comparison:end -->"


def comparison_markdown(root: str) -> str:
    """The comparison tables of the records under ``root`` as markdown (titles in italics, notes kept)."""
    records = find_records(root)
    if not records:
        raise ValueError(f"no result.json under {root}; run the suite first (make demo)")
    parts = []
    for table in comparison_tables(find_methods(records)):
        if table.name.startswith("compare_fewshot_"):  # one table per K: the report has them
            continue
        parts += [f"*{table.title}*", "", table.to_markdown(), ""]
    return "\n".join(parts)


def paste(readme: str, block: str) -> str:
    """``readme`` with the text between the markers replaced by ``block``."""
    if readme.count(BEGIN) != 1 or readme.count(END) != 1 or readme.index(BEGIN) > readme.index(END):
        raise ValueError(f"README must hold one {BEGIN} line followed by one {END} line")
    head, rest = readme.split(BEGIN)
    _, tail = rest.split(END)
    return f"{head}{BEGIN}\n{block.rstrip()}\n{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output_dir", help="a folder of runs, e.g. output/minibench after make demo")
    parser.add_argument("--readme", default=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                         "README.md"))
    args = parser.parse_args(argv)
    try:
        block = comparison_markdown(args.output_dir)
        with open(args.readme) as f:
            text = paste(f.read(), block)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    atomic_write(args.readme, text.encode())
    print(f"pasted {block.count(chr(10))} lines into {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
