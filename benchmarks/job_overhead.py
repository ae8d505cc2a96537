"""Per-job overhead of the runner: a fresh interpreter per job (``--cold``, ``LocalExecutor``) against jobs forked
from the warm worker (``WarmExecutor``, the default): a benchmark, not a test.

A small suite of tiny jobs on the generated digits dataset with a random ``vltune-tiny`` CLIP (``--seeds`` K gives
2K ZeroshotCLIP base/new evaluations and K one-epoch, 1-shot CoOp runs) is run through ``parallel_runner.main``
once per executor, each into an empty output folder, on the CPU with ``--slots`` jobs at once. From the records:

* launch → first batch: ``cost.startup_s`` (the runner's launch of the job to its first training batch, or first
  evaluation batch for an evaluation-only job): interpreter start, imports, data and model setup. The warm run's
  first job also waits for the worker's own start (its imports), once per run: see the max column;
* wall per job: ``runner.wall_s`` (launch to the runner seeing the exit);
* suite wall: the whole ``parallel_runner.main`` call (tables and report included).

Run it on an otherwise idle machine if you can: the load average before and after each run is printed with the
numbers, since other work on the cores slows both executors.

    python benchmarks/job_overhead.py                    # 4 seeds: 12 jobs per executor, 2 at once
    python benchmarks/job_overhead.py --seeds 8 --slots 1 --repeat 2
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import vltune  # noqa: E402,F401  (compat shim before open_clip)

SUITE = """
base = dict(data=dict(root={root!r}), model=dict(backbone="vltune-tiny", weights={weights!r}),
            output=dict(root={out!r}), slots_per_gpu={slots})
zs = dict(trainer="ZeroshotCLIP", config="tiny", protocol="b2n", datasets=["digits"], seeds={seeds!r},
          eval_only=True)
coop = dict(trainer="CoOp", config="tiny_ep10", protocol="fewshot", datasets=["digits"], seeds={seeds!r}, shots=1,
            opts=["OPTIM.MAX_EPOCH", "1"])
pipeline = [dict(gpu_ids=[], tasks=["zs", "coop"])]
"""


def prepare(cache: str) -> tuple[str, str]:
    """(data root with digits/, random tiny CLIP weights), generated once into ``cache``."""
    import open_clip
    import torch

    import vltune.clip  # noqa: F401  (registers vltune-tiny)
    from vltune.data.synthetic import write_digits_dataset

    root = os.path.join(cache, "data")
    write_digits_dataset(root)
    weights = os.path.join(cache, "tiny-random.pt")
    if not os.path.exists(weights):
        torch.manual_seed(0)
        torch.save(open_clip.create_model("vltune-tiny", pretrained=None).state_dict(), weights)
    return root, weights


def run_suite(kind: str, root: str, weights: str, out: str, seeds: int, slots: int) -> dict:
    """Run the suite with one executor into an empty ``out``; its numbers from the records."""
    import parallel_runner
    from vltune.results.record import find_records

    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    config = os.path.join(out, "configs.py")
    with open(config, "w") as f:
        f.write(SUITE.format(root=root, weights=weights, out=os.path.join(out, "output"), slots=slots,
                             seeds=list(range(1, seeds + 1))))
    load_before = os.getloadavg()[0]
    started = time.time()
    with contextlib.redirect_stdout(io.StringIO()):
        code = parallel_runner.main(["--config", config, "--plain", "--no-mail"] + (["--cold"] if kind == "cold"
                                                                                    else []))
    suite_s = time.time() - started
    records = find_records(os.path.join(out, "output"))
    if code != 0 or any(r.status != "success" for r in records):
        raise SystemExit(f"{kind}: the suite did not succeed (exit code {code}); see {out}")
    startup = [float(r.cost["startup_s"]) for r in records]
    wall = [float(r.runner["wall_s"]) for r in records]
    return dict(kind=kind, jobs=len(records), suite_s=suite_s, startup_mean=statistics.mean(startup),
                startup_median=statistics.median(startup), startup_max=max(startup), wall_mean=statistics.mean(wall),
                wall_median=statistics.median(wall), load=(load_before, os.getloadavg()[0]))


def table(rows: list[dict]) -> str:
    lines = ["| executor | jobs | launch → first batch: mean / median / max (s) | wall per job: mean / median (s) "
             "| suite wall (s) | load avg before → after |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['kind']} | {r['jobs']} | {r['startup_mean']:.2f} / {r['startup_median']:.2f} / "
                     f"{r['startup_max']:.2f} | {r['wall_mean']:.2f} / {r['wall_median']:.2f} | {r['suite_s']:.1f} "
                     f"| {r['load'][0]:.2f} → {r['load'][1]:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], epilog="\n".join(__doc__.split("\n")[1:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=4, help="K: 2K zero-shot evaluations and K CoOp runs per executor")
    p.add_argument("--slots", type=int, default=2, help="jobs at once")
    p.add_argument("--repeat", type=int, default=1, help="runs per executor, cold and warm alternating")
    p.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "vltune-job-overhead"),
                   help="where the data, weights and run folders go")
    p.add_argument("--json", help="also write the rows to this file")
    args = p.parse_args(argv)
    root, weights = prepare(args.cache)
    print(f"{os.cpu_count()} cores, {args.slots} jobs at once, {3 * args.seeds} jobs per run", flush=True)
    rows = []
    for i in range(args.repeat):
        for kind in ("cold", "warm"):
            rows.append(run_suite(kind, root, weights, os.path.join(args.cache, f"run-{kind}"), args.seeds,
                                  args.slots))
            print(f"run {i + 1} {kind}: {rows[-1]['suite_s']:.1f} s", flush=True)
    print(table(rows))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
