"""Paste what a folder of runs measured into README.md, so the README's figures are generated, never typed.

Two blocks, each between its markers:

* ``<!-- demo:begin -->`` … ``<!-- demo:end -->``: the overview (one row per method over every protocol, with its
  training cost), the measured cost ratios the Skip Tuning and Res-Tuning papers claim (full fine-tuning vs Skip
  Tuning; ResAdapter vs the Res-Tuning bypass), and how many jobs the folder holds and how long they took;
* ``<!-- comparison:begin -->`` … ``<!-- comparison:end -->``: the report's comparison tables
  (``vltune.results.compare``) without the per-K few-shot tables.

Both are built from the records under the folder exactly as ``python -m vltune.results`` builds them.

Usage: ``python scripts/readme_tables.py output/minibench [--readme README.md]`` (after ``make demo``).
"""

from __future__ import annotations

import argparse
import os
import sys
from datetime import datetime

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vltune.fileio import atomic_write  # noqa: E402
from vltune.results.compare import (  # noqa: E402
    Method,
    compare_overview,
    comparison_tables,
    cost_ratios,
    find_methods,
)
from vltune.results.record import Record, find_records  # noqa: E402

DEMO = ("<!-- demo:begin -->", "<!-- demo:end -->")
COMPARISON = ("<!-- comparison:begin -->", "<!-- comparison:end -->")
RATIO_PAIRS = [("FinetuneCLIP", "SkipTuning"), ("ResAdapter", "ResTuningBypass")]


def _records(root: str) -> list[Record]:
    records = find_records(root)
    if not records:
        raise ValueError(f"no result.json under {root}; run the suite first (make demo)")
    return records


def job_span(records: list[Record]) -> str:
    """``"N jobs (M trained), the first to the last record T min apart"``: the job phase's wall time, from records."""
    stamps = sorted(datetime.fromisoformat(r.created_at) for r in records if r.created_at)
    trained = sum(1 for r in records if (r.cost.get("train_time_s") or 0) > 0)
    span = (stamps[-1] - stamps[0]).total_seconds() / 60 if len(stamps) > 1 else 0.0
    return f"{len(records)} jobs ({trained} of them trained), their records written over {span:.1f} minutes"


def demo_markdown(methods: list[Method], records: list[Record]) -> str:
    """The overview table, the cost ratios and the job count of one folder of runs."""
    overview = compare_overview(methods)
    parts = [f"*{overview.title}*", "", overview.to_markdown(), ""] if overview else []
    ratios = cost_ratios(methods, RATIO_PAIRS)
    if ratios:
        parts += ["Measured cost ratios (base-to-new jobs, same meter):", ""]
        parts += [f"- {line}" for line in ratios] + [""]
    parts.append(f"This run: {job_span(records)}.")
    return "\n".join(parts)


def comparison_markdown(methods: list[Method]) -> str:
    """The comparison tables of ``methods`` as markdown (titles in italics, notes kept)."""
    parts = []
    for table in comparison_tables(methods):
        if table.name.startswith("compare_fewshot_"):  # one table per K: the report has them
            continue
        parts += [f"*{table.title}*", "", table.to_markdown(), ""]
    return "\n".join(parts)


def paste(readme: str, block: str, markers: tuple[str, str] = COMPARISON) -> str:
    """``readme`` with the text between the markers replaced by ``block``."""
    begin, end = markers
    if readme.count(begin) != 1 or readme.count(end) != 1 or readme.index(begin) > readme.index(end):
        raise ValueError(f"README must hold one {begin} line followed by one {end} line")
    head, rest = readme.split(begin)
    _, tail = rest.split(end)
    return f"{head}{begin}\n{block.rstrip()}\n{end}{tail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output_dir", help="a folder of runs, e.g. output/minibench after make demo")
    parser.add_argument("--readme", default=os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                                         "README.md"))
    args = parser.parse_args(argv)
    try:
        records = _records(args.output_dir)
        methods = find_methods(records)
        with open(args.readme) as f:
            text = f.read()
        text = paste(text, demo_markdown(methods, records), DEMO)
        text = paste(text, comparison_markdown(methods), COMPARISON)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    atomic_write(args.readme, text.encode())
    print(f"pasted the demo and comparison blocks into {args.readme}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
