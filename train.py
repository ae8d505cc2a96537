"""Run one job with Dassl's command line: train (then test), or ``--eval-only`` a saved run.

    python train.py --root DATA --seed 1 --trainer CoOp \
        --dataset-config-file configs/datasets/oxford_pets.yaml \
        --config-file configs/trainers/CoOp/vit_b16_ep50.yaml \
        --output-dir output/coop/oxford_pets/seed1 DATASET.NUM_SHOTS 16

Writes ``log.txt`` (Dassl's lines), ``config.yaml`` and ``result.json`` (the record tables are built from) into the
output dir. A finished output dir (``result.json`` with status success and the same config) is not run again; an
interrupted one resumes from its newest checkpoint. A failure writes ``exceptions.txt`` and a ``failed`` record.
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import platform
import signal
import sys
import threading
import traceback
from typing import Any

import vltune  # noqa: F401  (compat shim before torchvision/open_clip)
from vltune.cli import build_parser
from vltune.config import ConfigError, get_cfg
from vltune.engine import build_trainer, set_random_seed
from vltune.logs import setup_logging
from vltune.registry import RegistryError
from vltune.results.record import SCHEMA, config_hash, config_to_dict, environment, read_record, write_json_atomic

logger = logging.getLogger("train")


def job_identity(args: argparse.Namespace, cfg: Any) -> dict[str, Any]:
    config = os.path.splitext(os.path.basename(args.config_file))[0] if args.config_file else ""
    return {"trainer": cfg.TRAINER.NAME, "config": config, "dataset": cfg.DATASET.NAME,
            "shots": int(cfg.DATASET.NUM_SHOTS), "subsample": cfg.DATASET.SUBSAMPLE_CLASSES, "seed": int(cfg.SEED),
            "phase": "eval" if args.eval_only else "train", "source": os.path.abspath(args.model_dir) if
            args.model_dir else ""}


def make_record(status: str, args: argparse.Namespace, cfg: Any, trainer: Any, error: str = "") -> dict[str, Any]:
    import torch

    device = trainer.device if trainer is not None else torch.device("cpu")
    metrics = {k: v for k, v in (trainer.last_metrics if trainer is not None else {}).items()
               if k in ("accuracy", "error", "macro_f1", "per_class")}
    record = {"schema": SCHEMA, "status": status, "created_at": datetime.datetime.now().isoformat(timespec="seconds"),
              "job": job_identity(args, cfg), "metrics": metrics,
              "cost": trainer.cost_record() if trainer is not None else {},
              "method": trainer.method_record() if trainer is not None else {}, "env": environment(device),
              "config_hash": config_hash(cfg), "config": config_to_dict(cfg)}
    if trainer is not None:
        record["job"]["resumed_from_epoch"] = trainer.resumed_from
        if trainer.loaded_epoch is not None:
            record["job"]["load_epoch"] = trainer.loaded_epoch
    if error:
        record["error"] = error
    return record


def already_finished(output_dir: str, cfg: Any) -> bool:
    """True when ``output_dir`` holds a successful record of this config; raise if it holds another config's."""
    record = read_record(os.path.join(output_dir, "result.json"))
    if not record or record.get("status") != "success":
        return False
    if record.get("config_hash") != config_hash(cfg):
        raise SystemExit(f"error: {output_dir} holds a finished run of a different config "
                         f"(hash {record.get('config_hash')} vs {config_hash(cfg)}); use another --output-dir, "
                         "or delete that folder to rerun")
    return True


def _cancel_on_sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None, console: bool = True) -> int:
    """Run one job; returns the exit code. ``console=False`` logs to ``log.txt`` only (suites run in-process)."""
    args = build_parser().parse_args(argv)
    try:
        cfg = get_cfg(args)
    except (ConfigError, RegistryError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = cfg.OUTPUT_DIR
    if already_finished(out, cfg):
        print("This task was already finished")
        return 0
    os.makedirs(out, exist_ok=True)
    if os.path.exists(os.path.join(out, "exceptions.txt")):
        os.remove(os.path.join(out, "exceptions.txt"))
    setup_logging(out, console=console)
    if cfg.SEED >= 0:
        logger.info(f"Setting fixed seed: {cfg.SEED}")
        set_random_seed(cfg.SEED)
    logger.info("***************\n** Arguments **\n***************")
    for key in sorted(vars(args)):
        logger.info(f"{key}: {getattr(args, key)}")
    logger.info("************\n** Config **\n************")
    logger.info(cfg.dump())
    logger.info(f"Collecting env info ...\n** System info **\nPython {platform.python_version()} on "
                f"{platform.platform()}")
    with open(os.path.join(out, "config.yaml"), "w") as f:
        f.write(cfg.dump())

    trainer = None
    # A runner stops jobs with SIGTERM: record them as cancelled instead of dying without a record.
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _cancel_on_sigterm) if in_main_thread else None
    try:
        trainer = build_trainer(cfg, eval_only=args.eval_only)
        if args.eval_only:
            if args.model_dir:
                trainer.load_model(args.model_dir, epoch=args.load_epoch)
            trainer.test()
        elif args.no_train:
            return 0
        else:
            trainer.train()
    except KeyboardInterrupt:
        write_json_atomic(os.path.join(out, "result.json"), make_record("cancelled", args, cfg, trainer))
        logger.info("Cancelled")
        return 130
    except Exception as e:  # noqa: BLE001  (any failure is recorded, then reported through the exit code)
        tb = traceback.format_exc()
        with open(os.path.join(out, "exceptions.txt"), "w") as f:
            f.write(tb)
        logger.error(tb)
        write_json_atomic(os.path.join(out, "result.json"),
                          make_record("failed", args, cfg, trainer, error=f"{type(e).__name__}: {e}"))
        return 1
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)
    write_json_atomic(os.path.join(out, "result.json"), make_record("success", args, cfg, trainer))
    return 0


if __name__ == "__main__":
    sys.exit(main())
