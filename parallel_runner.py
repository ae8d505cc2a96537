"""Run the experiment suite of ``configs.py`` and write its accuracy and cost tables (``<output>/report.md``).

    python parallel_runner.py                  # the default suite (MiniBench, offline, CPU)
    python parallel_runner.py --only coop_b2n  # some tasks
    python parallel_runner.py --dry-run        # list the jobs
    python parallel_runner.py --tables-only    # rebuild the tables from the output folder

With ``base["prepare"] = "minibench"`` the MiniBench datasets and the mini CLIP are generated on first use. Jobs run
one after another in this process; a finished job (``result.json`` with status success and the same config) is
skipped, so an interrupted suite continues where it stopped. The GPU-pipelined executor (job graph, GPU slots,
process groups, mail) replaces the sequential loop with the runner issue; tasks and tables stay as they are.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

REPO = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, REPO)

import vltune  # noqa: E402,F401  (compat shim first)
from vltune.fileio import atomic_write  # noqa: E402
from vltune.logs import setup_logging  # noqa: E402
from vltune.results.tables import collect, render_report  # noqa: E402
from vltune.runner.suite import expand_pipeline, load_experiments, run_inline  # noqa: E402


def prepare_minibench(base: dict) -> None:
    """Generate the MiniBench datasets and pretrain the mini CLIP on their train splits when they are missing."""
    from vltune.clip.pretrain import build_minibench_clip
    from vltune.data.minibench import write_minibench

    started = time.time()
    folders = write_minibench(base["data"]["root"])
    weights = base["model"]["weights"]
    if not os.path.isfile(weights):
        print(f"Pretraining the mini CLIP on the MiniBench train splits -> {weights} (about 1-2 min on 2 cores)",
              flush=True)
        build_minibench_clip(folders, weights, arch=base["model"]["backbone"])
    print(f"MiniBench ready in {time.time() - started:.0f} s: {', '.join(sorted(folders))}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=os.path.join(REPO, "configs.py"), help="experiment file")
    parser.add_argument("--only", nargs="+", help="run only these tasks")
    parser.add_argument("--dry-run", action="store_true", help="print the jobs and exit")
    parser.add_argument("--tables-only", action="store_true", help="rebuild the tables from the output folder")
    args = parser.parse_args(argv)
    setup_logging(console=False)  # jobs log to their own log.txt; this console shows progress and tables only
    try:
        experiments = load_experiments(args.config)
        base = experiments["base"]
    except (FileNotFoundError, KeyError) as e:
        print(f"error: {args.config}: {e} (an experiment file defines base, the tasks and pipeline)", file=sys.stderr)
        return 2
    report_path = os.path.join(base["output"]["root"], "report.md")
    if args.tables_only:
        report = render_report(collect(base["output"]["root"]))
        atomic_write(report_path, report.encode())
        print(report)
        return 0
    try:
        jobs = expand_pipeline(experiments, REPO, args.only)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        for j in jobs:
            print(f"{j.task:16s} {j.role:8s} {j.dataset:20s} seed {j.seed} shots {j.shots:2d} -> {j.out}")
        print(f"{len(jobs)} jobs")
        return 0
    if base.get("prepare") == "minibench":
        prepare_minibench(base)
    started = time.time()
    rows = run_inline(jobs)
    report = render_report(rows)
    atomic_write(report_path, report.encode())
    failed = sum(1 for _, r in rows if not r or r.get("status") != "success")
    print(f"\n{report}\n{len(rows) - failed}/{len(rows)} jobs succeeded in {time.time() - started:.0f} s; "
          f"tables in {report_path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
