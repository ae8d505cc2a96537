"""Dassl's ``train.py`` command line, shared by ``train.py`` and the runner (which builds each job's config from the
same argv before running it, to validate it and to know its config hash)."""

from __future__ import annotations

import argparse
from typing import Any

#: ``train.py`` measures the job's peak memory into this file instead of running the job (``--probe-memory``); the
#: runner's memory packing sets it for its probes (``vltune.runner.packing``)
PROBE_ENV = "VLTUNE_PROBE_MEMORY"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Run one job: train (then test), or --eval-only a saved run.")
    p.add_argument("--root", type=str, default="", help="path to the datasets' parent folder")
    p.add_argument("--output-dir", type=str, default="", help="run folder")
    p.add_argument("--resume", type=str, default="", help="checkpoint folder to resume from (default: output dir)")
    p.add_argument("--seed", type=int, default=-1, help="fixed seed if >= 0 (0 included)")
    p.add_argument("--source-domains", type=str, nargs="+", help="accepted and ignored (Dassl DA/DG)")
    p.add_argument("--target-domains", type=str, nargs="+", help="accepted and ignored (Dassl DA/DG)")
    p.add_argument("--transforms", type=str, nargs="+", help="training augmentations")
    p.add_argument("--trainer", type=str, default="", help="trainer name (CoOp, ZeroshotCLIP, ...)")
    p.add_argument("--backbone", type=str, default="", help="CLIP architecture (ViT-B/16, RN50, ...)")
    p.add_argument("--head", type=str, default="", help="accepted and ignored")
    p.add_argument("--config-file", type=str, default="", help="trainer yaml")
    p.add_argument("--dataset-config-file", type=str, default="", help="dataset yaml")
    p.add_argument("--eval-only", action="store_true", help="evaluate only")
    p.add_argument("--model-dir", type=str, default="", help="run folder whose checkpoints --eval-only loads")
    p.add_argument("--load-epoch", type=int, help="checkpoint epoch to load (-1: newest; absent: model-best)")
    p.add_argument("--no-train", action="store_true", help="build the trainer but do not train")
    p.add_argument("--pre_train_exp_name", type=str, default="", help="accepted for CoPrompt scripts")
    p.add_argument("--job-meta", type=str, default="",
                   help="JSON of the job's place in a benchmark (task, protocol, role, grid, grid_name, index), set "
                        "by the runner and saved in result.json; a job run by hand has its protocol and role inferred")
    p.add_argument("--probe-memory", type=str, default="", metavar="FILE",
                   help=f"measure one training step and one evaluation batch of this job's config, write "
                        f"{{peak_mb, method}} to FILE and exit; nothing else is written (also: env {PROBE_ENV})")
    p.add_argument("opts", default=None, nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    return p


def job_config(argv: list[str]) -> Any:
    """The frozen config ``train.py argv`` would run with (raises ConfigError/RegistryError on bad input)."""
    from vltune.config import get_cfg

    return get_cfg(build_parser().parse_args(argv))


def dispatch(prog: str, commands: dict[str, str], argv: list[str]) -> int:
    """``python -m <package> COMMAND ...``: run ``main(argv)`` of the module ``commands[COMMAND]``; 2 with a usage line
    when the command is missing or unknown."""
    import importlib
    import sys

    from vltune.plugins import load_builtins

    if not argv or argv[0] not in commands:
        usage = f"usage: {prog} {{{','.join(commands)}}} ... (--help after the command for its options)"
        print(usage, file=sys.stderr)
        return 2
    load_builtins()
    return importlib.import_module(commands[argv[0]]).main(argv[1:])
