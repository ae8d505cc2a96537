"""``python -m vltune.results DIR [--no-plots]``: rebuild report.md, tables and plots from the records under DIR.

DIR is any folder of runs (the runner's output, hand-run ``train.py`` jobs, or both). Exit status 0 on success, 2
when DIR does not exist or holds no ``result.json``.
"""

from __future__ import annotations

import argparse
import sys

from vltune.results.report import rebuild_files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m vltune.results", description=__doc__.splitlines()[0])
    parser.add_argument("output_dir", help="a folder of runs (one result.json per run, at any depth)")
    parser.add_argument("--no-plots", action="store_true", help="write the report and tables only")
    args = parser.parse_args(argv)
    try:
        report, paths = rebuild_files(args.output_dir, plots=not args.no_plots)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report)
    print("written:")
    print("\n".join(f"  {p}" for p in paths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
