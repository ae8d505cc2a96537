"""Run the experiments of ``configs.py`` and print an accuracy and cost table from their ``result.json`` records.

This is the sequential first version: it prepares the offline demo assets (digits data, tiny CLIP weights) when the
configured ones are missing, runs each job as its own ``train.py`` process (an argv list, never a shell string) and
skips jobs whose output dir already holds a successful record. The GPU-pipelined runner (job graph, slots per GPU,
resume, tables, mail) replaces the loop below.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.abspath(__file__))


def load_experiments(path: str) -> dict:
    spec = importlib.util.spec_from_file_location("vltune_experiments", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return {k: getattr(module, k) for k in dir(module) if not k.startswith("_")}


def prepare_demo_assets(data_root: str, weights: str, backbone: str) -> None:
    """Generate the digits dataset and pretrain the tiny CLIP on its train split when they are missing."""
    sys.path.insert(0, REPO)
    from vltune.data.synthetic import write_digits_dataset

    folder = write_digits_dataset(data_root)
    if not os.path.isfile(weights):
        from vltune.clip.pretrain import pretrain

        print(f"Pretraining {backbone} on the digits train split -> {weights} (about 30 s on 2 cores)")
        pretrain(os.path.join(folder, "split_zhou_Digits.json"), os.path.join(folder, "images"), weights,
                 arch=backbone)


def job_argv(task: dict, base: dict, dataset: str, seed: int, out: str) -> list[str]:
    trainer, config = task["trainer"], task["config"]
    argv = [sys.executable, os.path.join(REPO, "train.py"), "--root", base["data"]["root"], "--seed", str(seed),
            "--trainer", trainer, "--dataset-config-file", os.path.join(REPO, "configs/datasets", f"{dataset}.yaml"),
            "--config-file", os.path.join(REPO, "configs/trainers", trainer, f"{config}.yaml"), "--output-dir", out]
    if task.get("eval_only"):
        argv.append("--eval-only")
    argv += ["MODEL.BACKBONE.NAME", base["model"]["backbone"], "MODEL.BACKBONE.WEIGHTS", base["model"]["weights"]]
    if task.get("shots"):
        argv += ["DATASET.NUM_SHOTS", str(task["shots"])]
    return argv + [str(x) for x in task.get("opts", [])]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=os.path.join(REPO, "configs.py"), help="experiment file")
    args = parser.parse_args(argv)
    exp = load_experiments(args.config)
    base = exp["base"]
    if base["model"]["backbone"] == "vltune-tiny":
        prepare_demo_assets(base["data"]["root"], base["model"]["weights"], base["model"]["backbone"])
    rows, failed = [], 0
    for stage in exp["pipeline"]:
        for name in stage["tasks"]:
            task = exp[name]
            for dataset in task["datasets"]:
                for seed in task["seeds"]:
                    out = os.path.join(base["output"]["root"], task["trainer"], dataset, task["config"], f"seed{seed}")
                    print(f"[{name}] {task['trainer']} on {dataset}, seed {seed} -> {out}", flush=True)
                    job = job_argv(task, base, dataset, seed, out)
                    code = subprocess.run(job, stdout=subprocess.DEVNULL).returncode
                    failed += code != 0
                    path = os.path.join(out, "result.json")
                    record = json.load(open(path)) if os.path.isfile(path) else {"status": f"exit {code}"}
                    rows.append((name, dataset, seed, record))
    print("\n| task | dataset | seed | status | accuracy | macro-F1 | train s | eval s | trainable params |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, dataset, seed, r in rows:
        m, c = r.get("metrics", {}), r.get("cost", {})
        print(f"| {name} | {dataset} | {seed} | {r['status']} | {m.get('accuracy', float('nan')):.2f} | "
              f"{m.get('macro_f1', float('nan')):.2f} | {c.get('train_time_s', 0):.1f} | "
              f"{c.get('eval_time_s', 0):.1f} | {c.get('trainable_params', 0):,} |")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
