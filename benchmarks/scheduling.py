"""Simulated makespan of the base-to-new benchmark on 8 GPUs under three scheduling policies: a benchmark, not a test.

The job table (``benchmarks/scheduling_jobs.json``, written by ``build_table``): every registered method with a b2n
preset × the 11 datasets × seeds 1-3; a trained method has a train job (``role`` base: trains on the base classes,
then tests on them) and an evaluation (``role`` new, after its train job); an eval-only method (zero-shot CLIP) has
two evaluations (base, new) and no dependency. Each row's duration and peak memory come from published figures where
they exist and from the efficiency benchmark's measured ratios otherwise; the file lists every assumption and each
row names the source of each number.

Policies, each on the real scheduler (``vltune.runner.simulate``), ``--gpus`` GPUs of ``--gpu-gb`` GB:

* (a) the Skip Tuning runner: one job per GPU, tasks one after another, a barrier between a task's train and eval
  jobs (``BarrierPlacement``);
* (b) vltune's fixed slots, 1, 2 and 4 jobs per GPU (``SlotPlacement``): a job that does not fit fails (no retry);
* (c) memory packing (``MemoryPlacement``, the packing defaults: 10 % headroom) with each job's table peak as its
  estimate (as if every key had finished once); ``--estimate-scale 0.7`` makes the estimates too low.

    python benchmarks/scheduling.py                 # simulate, print the table, write benchmarks/results/
    python benchmarks/scheduling.py --write-table   # regenerate benchmarks/scheduling_jobs.json first
    python benchmarks/scheduling.py --readme README.md  # also fill the README's scheduling block

Writes ``<out>/scheduling.json`` and ``<out>/scheduling.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import statistics
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import yaml  # noqa: E402

from vltune.fileio import atomic_write  # noqa: E402
from vltune.results.record import write_json_atomic  # noqa: E402
from vltune.runner.jobs import Job  # noqa: E402
from vltune.runner.scheduler import Lane, SlotPlacement  # noqa: E402
from vltune.runner.simulate import BarrierPlacement, SimJob, SimReport, TablePeaks, simulate  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
TABLE = os.path.join(HERE, "scheduling_jobs.json")
REF = "protocols_and_numbers.md"

#: dataset -> (base classes, new classes, test images); protocols_and_numbers.md §2 (class split) and
#: dassl_contract.md §9 (test split sizes, recalled from the CoOp paper)
DATASETS = {"imagenet": (500, 500, 50000), "caltech101": (50, 50, 2465), "oxford_pets": (19, 18, 3669),
            "stanford_cars": (98, 98, 8041), "oxford_flowers": (51, 51, 2463), "food101": (51, 50, 30300),
            "fgvc_aircraft": (50, 50, 3333), "sun397": (199, 198, 19850), "dtd": (24, 23, 1692),
            "eurosat": (5, 5, 8100), "ucf101": (51, 50, 3783)}
SHOTS = 16
SEEDS = [1, 2, 3]

#: method -> (b2n time s, b2n mem M, xd mem M): the Skip Tuning paper, protocols_and_numbers.md §7.3 and §7.4
#: (time: per-dataset average training time, testing excluded; mem: torchinfo's estimate, not a measurement)
PUBLISHED = {"CoOp": (1186, 3204, 15412), "CoCoOp": (2851, 1556, 13622), "ProGrad": (2311, 3204, 15412),
             "KgCoOp": (1191, 3188, 15254), "MaPLe": (413, 1729, 13786), "PromptSRC": (1735, 2041, 14107),
             "TCP": (619, 3189, 15263), "CoPrompt": (684, 2060, 14131), "SkipTuning": (239, 404, 656)}
#: linear-probe variants: their base method's published figures (time scaled by the configs' epochs)
LIKE = {"ExtrasLinearProbeCoOp": "CoOp", "ExtrasLinearProbeCoCoOp": "CoCoOp", "ExtrasLinearProbeKgCoOp": "KgCoOp",
        "ExtrasLinearProbeMaPLe": "MaPLe"}
#: training time per image, ms (KgCoOp README, protocols_and_numbers.md §7.9)
TRAIN_MS_PER_IMAGE = {"CoOp": 6, "ProGrad": 22, "CoCoOp": 160, "KgCoOp": 6}
#: measured by ``python benchmarks/efficiency.py --variants CoOp SkipTuning FinetuneCLIP CLIPAdapter
#: OriginCLIPAdapter ResAdapter ResPrefix ResPrompt ResTuningBypass --steps 1 --warmup 1 --eval-images 0 --threads 1``
#: (ViT-B/16 shapes, random weights, 100 classes, batch 4, CPU 1 thread on a shared 2-core machine, one timed step,
#: memory: cpu_profiler_tensor_bytes), 2026-12-07: variant -> (step s, peak MB)
EFFICIENCY = {"CoOp": (6.528, 1422), "SkipTuning": (3.626, 1273), "FinetuneCLIP": (12.600, 2239),
              "CLIPAdapter": (1.878, 609), "OriginCLIPAdapter": (3.186, 612), "ResAdapter": (5.671, 986),
              "ResPrefix": (5.739, 1035), "ResPrompt": (37.429, 1063), "ResTuningBypass": (6.601, 633)}
EFFICIENCY_SOURCE = "benchmarks/efficiency.py, CPU, 1 step (see EFFICIENCY in benchmarks/scheduling.py)"
ANCHOR = "CoOp"  # the published method the measured ratios are taken against

CONTEXT_MB = 500  # CUDA context + framework per process [I]
MAPLE_MEASURED_MB = 22000  # MaPLe ImageNet (1000 classes) DG training: ~20-24 GB measured (§7.9, MaPLe #64)
CALIBRATION = (MAPLE_MEASURED_MB - CONTEXT_MB) / PUBLISHED["MaPLe"][2]  # measured / torchinfo estimate
STARTUP_S = 30.0  # launch -> first batch: imports, CLIP load, dataset build [I]
EVAL_PEAK_MB = 2000  # an evaluation job: weights + test batch 100 without autograd + context [I]
EVAL_MS_DEFAULT = TRAIN_MS_PER_IMAGE["CoOp"] / 3  # forward-only ≈ 1/3 of forward+backward [I]

ASSUMPTIONS = [
    "Jobs: every registered method with a b2n preset (vltune.runner.presets.methods()) x the 11 datasets x seeds "
    "1, 2, 3; trained methods: a train job (base classes; its final test on the base test split is part of it) "
    "and an eval job on the new classes that depends on it; eval-only methods: a base and a new evaluation. A row "
    "stands for its 3 seeds (identical numbers).",
    f"Class counts (base/new) from {REF} §2; test split sizes from dassl_contract.md §9 (recalled from the CoOp "
    "paper); a role's test images = the split's size x its share of the classes.",
    "Training images seen = 16 shots x base classes x epochs; epochs from each method's b2n config "
    "(OPTIM.MAX_EPOCH, and its PER_DATASET block: Skip Tuning trains ImageNet, SUN397 and Food101 for 5 epochs).",
    f"Published training time ({REF} §7.3, Skip Tuning paper) is read as the mean over the 11 datasets of one "
    "seed's training time [I]; a dataset's time = that mean x (its images seen / the mean images seen). The "
    "text encoder's per-class cost is not modelled, so ImageNet jobs of prompt learners are probably too short "
    "(the xd rows of §7.4 grow faster than linearly in the classes). Hardware of the figures is unstated.",
    "Training memory: torchinfo's estimate (§7.3 b2n mean, §7.4 ImageNet with 1000 classes) is fitted as fixed + "
    "per-class MB (linear in the classes: the text encoder runs over every class), then calibrated to a measured "
    f"peak: x{CALIBRATION:.3f} = ({MAPLE_MEASURED_MB} - {CONTEXT_MB}) / {PUBLISHED['MaPLe'][2]} (MaPLe's ImageNet "
    f"DG training needs ~20-24 GB, §7.9; 22 GB taken) + {CONTEXT_MB} MB CUDA context per process [I]. One "
    "calibration point for all methods; Skip Tuning's estimate covers only its unskipped blocks, so its peak is "
    "probably low.",
    f"Methods without published figures ({', '.join(EFFICIENCY)} minus the anchors): the anchor {ANCHOR}'s "
    "figures x the efficiency benchmark's measured ratio to it (step time at batch 4 -> time per image; peak "
    "memory), x their epochs / the anchor's epochs for time. One timed step on a shared CPU: noisy (ResPrompt's "
    "single step is an outlier-prone 37 s).",
    "Linear-probe variants (Extras*): their base method's published figures, time x their epochs / the base "
    "config's epochs; batch-size differences are ignored.",
    "Evaluation time per test image: 1/3 of the method's training time per image from the KgCoOp README (CoOp 6, "
    "KgCoOp 6, ProGrad 22, CoCoOp 160 ms) [I: forward only]; ProGrad tests like CoOp (its extra cost is in the "
    f"gradient); CoCoOp-style methods 53.3 ms; every other method {EVAL_MS_DEFAULT:.1f} ms (a CLIP forward).",
    f"Every job also has a start-up of {STARTUP_S:.0f} s (imports, CLIP weights, dataset build) [I]; an "
    f"evaluation job peaks at {EVAL_PEAK_MB} MB [I].",
    "A job's peak memory is held for its whole run; a job whose peak would overcommit its GPU fails with "
    "'CUDA out of memory' after its start-up (vltune.runner.simulate).",
]


def _config_epochs(method: str, config: str) -> tuple[int, dict[str, int]]:
    """(OPTIM.MAX_EPOCH of the method's b2n config, {dataset yaml name: epochs} from its PER_DATASET block)."""
    from vltune.runner import presets

    cfg = presets._config_cfg(method, config, [])
    path = config if os.path.isabs(config) else os.path.join(REPO, "configs", "trainers", method, f"{config}.yaml")
    with open(path) as f:
        per_name = (yaml.safe_load(f) or {}).get("PER_DATASET") or {}
    per_dataset = {}
    for d in DATASETS:
        with open(os.path.join(REPO, "configs", "datasets", f"{d}.yaml")) as f:
            name = yaml.safe_load(f)["DATASET"]["NAME"]
        if "OPTIM.MAX_EPOCH" in per_name.get(name, {}):
            per_dataset[d] = int(per_name[name]["OPTIM.MAX_EPOCH"])
    return int(cfg.OPTIM.MAX_EPOCH), per_dataset


def _eval_ms(method: str) -> tuple[float, str]:
    base = LIKE.get(method, method)
    if base in TRAIN_MS_PER_IMAGE and base != "ProGrad":
        return TRAIN_MS_PER_IMAGE[base] / 3, f"KgCoOp README: {base} {TRAIN_MS_PER_IMAGE[base]} ms/image train / 3"
    return EVAL_MS_DEFAULT, f"KgCoOp README: CoOp 6 ms/image train / 3 (assumed for {method})"


def build_table() -> dict[str, Any]:
    """The b2n job table with its assumptions and each number's source (reproducible: constants + configs)."""
    import vltune.plugins
    from vltune.runner import presets

    vltune.plugins.load_builtins()
    table = presets.methods()
    eval_only = presets.eval_only_methods()
    mean_c = statistics.mean(c for c, _, _ in DATASETS.values())
    epochs = {m: _config_epochs(m, e["b2n"]) for m, e in table.items() if e.get("b2n") and m not in eval_only}
    methods: dict[str, Any] = {}
    rows: list[dict[str, Any]] = []
    for method, entry in table.items():
        config = entry.get("b2n")
        if not config:
            continue
        task = f"{method.lower()}_b2n"
        ms, ms_src = _eval_ms(method)
        info: dict[str, Any] = {"config": os.path.basename(config), "eval_only": method in eval_only,
                                "eval_ms_per_image": round(ms, 2), "eval_source": ms_src}
        methods[method] = info
        if method in eval_only:
            for role, col in (("base", 0), ("new", 1)):
                for d, counts in DATASETS.items():
                    images = round(counts[2] * counts[col] / (counts[0] + counts[1]))
                    rows.append(dict(method=method, task=task, config=info["config"], dataset=d, role=role,
                                     phase="eval", seeds=SEEDS, depends_on_role="",
                                     duration_s=round(images * ms / 1000, 1), peak_mb=EVAL_PEAK_MB,
                                     startup_s=STARTUP_S, source=dict(
                                         duration_s=f"{images} {role} test images x {ms:.2f} ms ({ms_src})",
                                         peak_mb="assumed eval peak (ASSUMPTIONS)", startup_s="assumed")))
            continue
        base_epochs, per_dataset = epochs[method]
        seen = {d: SHOTS * c * per_dataset.get(d, base_epochs) for d, (c, _, _) in DATASETS.items()}
        if method in PUBLISHED or method in LIKE:
            ref = LIKE.get(method, method)
            t_avg, m_b2n, m_xd = PUBLISHED[ref]
            ref_epochs = _config_epochs(ref, table[ref]["b2n"])
            time_factor, mem_factor = base_epochs / ref_epochs[0], 1.0
            src = f"Skip Tuning paper ({REF} §7.3/§7.4): {ref}" + (
                f", time x epochs {base_epochs}/{ref_epochs[0]}" if ref != method else "")
            if ref != method:  # the base method's per-dataset epochs do not carry over: same images seen ratio
                seen_ref = {d: SHOTS * c * ref_epochs[1].get(d, ref_epochs[0]) for d, (c, _, _) in DATASETS.items()}
                seen = {d: seen_ref[d] * base_epochs / ref_epochs[0] for d in DATASETS}
        else:
            ref = ANCHOR
            t_avg, m_b2n, m_xd = PUBLISHED[ANCHOR]
            anchor_epochs = epochs[ANCHOR][0]
            time_factor = EFFICIENCY[method][0] / EFFICIENCY[ANCHOR][0] * base_epochs / anchor_epochs
            mem_factor = EFFICIENCY[method][1] / EFFICIENCY[ANCHOR][1]
            src = (f"{ANCHOR}'s published figures x measured ratio ({EFFICIENCY_SOURCE}): step time "
                   f"{EFFICIENCY[method][0]}/{EFFICIENCY[ANCHOR][0]} s x epochs {base_epochs}/{anchor_epochs}, peak "
                   f"{EFFICIENCY[method][1]}/{EFFICIENCY[ANCHOR][1]} MB")
        per_class = (m_xd - m_b2n) / (1000 - mean_c)
        fixed = m_b2n - per_class * mean_c
        mean_seen = statistics.mean(seen.values())
        info.update(epochs=base_epochs, per_dataset_epochs=per_dataset, reference=ref,
                    train_time_mean_s=round(t_avg * time_factor, 1), torchinfo_fixed_mb=round(fixed, 1),
                    torchinfo_per_class_mb=round(per_class, 3), memory_factor=round(mem_factor, 3), source=src)
        for d, (c_base, c_new, test) in DATASETS.items():
            train_s = t_avg * time_factor * seen[d] / mean_seen
            base_images = round(test * c_base / (c_base + c_new))
            new_images = test - base_images
            peak = CONTEXT_MB + CALIBRATION * mem_factor * (fixed + per_class * c_base)
            rows.append(dict(method=method, task=task, config=info["config"], dataset=d, role="base", phase="train",
                             seeds=SEEDS, depends_on_role="", duration_s=round(train_s + base_images * ms / 1000, 1),
                             peak_mb=round(peak), startup_s=STARTUP_S, source=dict(
                                 duration_s=f"{src}; mean {t_avg * time_factor:.0f} s x images seen {seen[d]:.0f} / "
                                            f"mean {mean_seen:.0f}, + {base_images} base test images x {ms:.2f} ms "
                                            f"({ms_src})",
                                 peak_mb=f"{src}; torchinfo fit {fixed:.0f} + {per_class:.2f} x {c_base} classes, x "
                                         f"{CALIBRATION:.3f} calibration" + (f" x {mem_factor:.3f}" if mem_factor != 1
                                                                              else "") + f" + {CONTEXT_MB} MB context",
                                 startup_s="assumed")))
            rows.append(dict(method=method, task=task, config=info["config"], dataset=d, role="new", phase="eval",
                             seeds=SEEDS, depends_on_role="base", duration_s=round(new_images * ms / 1000, 1),
                             peak_mb=EVAL_PEAK_MB, startup_s=STARTUP_S, source=dict(
                                 duration_s=f"{new_images} new test images x {ms:.2f} ms ({ms_src})",
                                 peak_mb="assumed eval peak (ASSUMPTIONS)", startup_s="assumed")))
    return {"about": "b2n job table for the scheduling simulator; generated by benchmarks/scheduling.py "
                     "build_table() (python benchmarks/scheduling.py --write-table), never edited by hand",
            "units": {"duration_s": "seconds after start-up", "peak_mb": "MB (MiB) of GPU memory, whole process",
                      "startup_s": "seconds"},
            "assumptions": ASSUMPTIONS, "datasets": {d: dict(base_classes=b, new_classes=n, test_images=t)
                                                     for d, (b, n, t) in DATASETS.items()},
            "methods": methods, "rows": rows}


def load_table(path: str = TABLE) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise SystemExit(f"{path} is missing: run python benchmarks/scheduling.py --write-table")
    with open(path) as f:
        return json.load(f)


def sim_jobs(table: dict[str, Any]) -> list[SimJob]:
    """The table's rows as simulated jobs (one per seed), in vltune's job order (task, seed, dataset, role)."""
    by_task: dict[str, list[dict[str, Any]]] = {}
    for row in table["rows"]:
        by_task.setdefault(row["task"], []).append(row)
    jobs = []
    for task, rows in by_task.items():
        for seed in SEEDS:
            for row in sorted(rows, key=lambda r: (list(DATASETS).index(r["dataset"]), r["role"] != "base")):
                if seed not in row["seeds"]:
                    continue
                folder = "train_base" if row["role"] == "base" and row["phase"] == "train" else f"test_{row['role']}"
                out = f"{task}/{folder}/{row['dataset']}/shots{SHOTS}/seed{seed}"
                dep = f"{task}/train_base/{row['dataset']}/shots{SHOTS}/seed{seed}" if row["depends_on_role"] else ""
                argv = ["python", "train.py"] + (["--eval-only"] if row["phase"] == "eval" else [])
                job = Job(task=task, out=out, argv=argv, depends_on=dep, protocol="b2n", role=row["role"],
                          trainer=row["method"], config=row["config"], dataset=row["dataset"], seed=seed, shots=SHOTS)
                jobs.append(SimJob(job, row["duration_s"], row["peak_mb"], row["startup_s"]))
    return jobs


def policies(jobs: list[SimJob], gpu_mb: float, estimate_scale: float) -> dict[str, Any]:
    """name -> (placement factory, slots per GPU)."""
    from vltune.runner.packing import MemoryPlacement
    from vltune.runner.schema import ScheduleSettings

    settings = ScheduleSettings()
    peaks = TablePeaks(jobs, estimate_scale)

    def packing(lanes: list[Lane], cap: int | None = None) -> MemoryPlacement:
        return MemoryPlacement(lanes, gpu_mb * (1 - settings.headroom), peaks,
                               default_mb=settings.default_gb * 1024, max_jobs_per_device=cap)

    return {"(a) Skip Tuning runner: 1 job/GPU, task barriers": (BarrierPlacement, 1),
            "(b) fixed slots 1/GPU": (SlotPlacement, 1), "(b) fixed slots 2/GPU": (SlotPlacement, 2),
            "(b) fixed slots 4/GPU": (SlotPlacement, 4),
            f"(c) memory packing ({settings.headroom:.0%} headroom)": (packing, 1),
            "(c) memory packing, at most 4 jobs/GPU": (lambda lanes: packing(lanes, 4), 1)}


def run(gpus: int, gpu_gb: float, estimate_scale: float = 1.0, table: dict[str, Any] | None = None,
        compute: float = 0.0) -> dict[str, Any]:
    """Every policy on the table's jobs, each job keeping ``compute`` of its GPU busy when alone (0: jobs sharing a
    GPU never slow each other; 1: each saturates its GPU, so sharing one slows them in proportion)."""
    table = table or load_table()
    jobs = [dataclasses.replace(sj, compute=compute) for sj in sim_jobs(table)]
    gpu_mb = gpu_gb * 1024
    tasks = list(dict.fromkeys(sj.job.task for sj in jobs))
    rows, baseline = [], None
    for name, (factory, slots) in policies(jobs, gpu_mb, estimate_scale).items():
        lanes = [Lane(devices=list(range(gpus)), slots=slots, tasks=tasks)]
        t0 = time.perf_counter()
        report: SimReport = simulate(jobs, lanes, factory, memory_mb=gpu_mb)
        baseline = baseline or report.makespan_s
        rows.append(dict(policy=name, **report.summary(), speedup_vs_a=round(baseline / report.makespan_s, 2),
                         failed_jobs=report.counts.get("failed", 0), skipped_jobs=report.counts.get("skipped", 0),
                         sim_wall_s=round(time.perf_counter() - t0, 2)))
    return {"date": datetime.date.today().isoformat(), "gpus": gpus, "gpu_gb": gpu_gb, "jobs": len(jobs),
            "estimate_scale": estimate_scale, "compute": compute, "gpu_hours_of_work": round(
                sum(sj.duration_s + sj.startup_s for sj in jobs) / 3600, 1), "rows": rows}


def markdown(result: dict[str, Any]) -> str:
    lines = [f"Simulated ({result['date']}): base-to-new, {result['jobs']} jobs "
             f"({result['gpu_hours_of_work']} GPU-hours of work), {result['gpus']} GPUs x {result['gpu_gb']:g} GB, "
             "job table benchmarks/scheduling_jobs.json" + (f", packing estimates x {result['estimate_scale']}"
                                                             if result["estimate_scale"] != 1 else "")
             + f"; each job keeps {result['compute']:g} of a GPU busy alone ("
             + ("jobs sharing a GPU never slow each other: memory only" if result["compute"] == 0 else
                "jobs sharing a GPU share its compute") + ")", "",
             "| policy | makespan h | speed-up vs (a) | utilisation % | idle GPU-h | OOM attempts | failed jobs | "
             "skipped jobs |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['policy']} | {r['makespan_h']:.2f} | {r['speedup_vs_a']:.2f}x | "
                     f"{100 * r['utilisation']:.1f} | {r['idle_gpu_h']:.1f} | {r['oom_attempts']} | "
                     f"{r['failed_jobs']} | {r['skipped_jobs']} |")
    lines += ["", "utilisation: the successful jobs' peak MB x run time over GPUs x memory x makespan; idle GPU-h: "
              "GPU time with no job; OOM attempts: starts that overcommitted a GPU (packing retries them alone "
              "once; fixed slots record them failed and skip their evaluations)."]
    return "\n".join(lines) + "\n"


README_MARKERS = ("<!-- scheduling:begin -->", "<!-- scheduling:end -->")


def readme_block(runs: list[dict[str, Any]]) -> str:
    """The README's summary of ``runs`` (one per ``compute`` value): each policy's simulated makespan and speed-up
    over the Skip Tuning runner's policy, a column per compute value."""
    first = runs[0]
    head = [f"Simulated {first['date']}: base-to-new, {first['jobs']} jobs ({first['gpu_hours_of_work']} GPU-hours of "
            f"work), {first['gpus']} GPUs x {first['gpu_gb']:g} GB; makespan in hours (speed-up vs (a)) when each job "
            "keeps this fraction of a GPU busy alone:", "",
            "| policy | " + " | ".join(f"compute {r['compute']:g}" for r in runs) + " |",
            "|---|" + "---:|" * len(runs)]
    for i, row in enumerate(first["rows"]):
        cells = [f"{r['rows'][i]['makespan_h']:.2f} ({r['rows'][i]['speedup_vs_a']:.2f}x)" for r in runs]
        head.append(f"| {row['policy']} | " + " | ".join(cells) + " |")
    return "\n".join(head)


def write_readme(path: str, runs: list[dict[str, Any]]) -> None:
    """Replace the block between ``README_MARKERS`` in ``path`` with ``readme_block(runs)``."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    begin, end = README_MARKERS
    if begin not in text or end not in text:
        raise ValueError(f"{path}: no {begin} … {end} block to fill")
    before, rest = text.split(begin, 1)
    after = rest.split(end, 1)[1]
    atomic_write(path, f"{before}{begin}\n{readme_block(runs)}\n{end}{after}".encode())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--write-table", action="store_true", help=f"regenerate {os.path.relpath(TABLE, REPO)} first")
    p.add_argument("--gpus", type=int, default=8)
    p.add_argument("--gpu-gb", type=float, default=80.0)
    p.add_argument("--estimate-scale", type=float, default=1.0, help="packing's estimates x this (< 1: too low)")
    p.add_argument("--compute", type=float, nargs="+", default=[0.0, 0.25, 0.5, 1.0],
                   help="the fraction of a GPU each job keeps busy alone, one simulation per value (default: 0, "
                        "memory only; then jobs using a quarter, half and all of a GPU)")
    p.add_argument("--out", default=os.path.join(HERE, "results"))
    p.add_argument("--readme", default="", help="also fill this README's scheduling block (README.md)")
    args = p.parse_args(argv)
    if args.write_table:
        atomic_write(TABLE, (json.dumps(build_table(), indent=1) + "\n").encode())
        print(f"wrote {TABLE}")
    results = [run(args.gpus, args.gpu_gb, args.estimate_scale, compute=c) for c in args.compute]
    text = "\n".join(markdown(r) for r in results)
    print(text)
    os.makedirs(args.out, exist_ok=True)
    write_json_atomic(os.path.join(args.out, "scheduling.json"), {"runs": results})
    if args.readme:
        write_readme(args.readme, results)
    atomic_write(os.path.join(args.out, "scheduling.md"), text.encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
