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
import json
import logging
import os
import platform
import signal
import sys
import threading
import traceback
from typing import Any

import yaml

import vltune  # noqa: F401  (compat shim before torchvision/open_clip)
from vltune.cli import PROBE_ENV, build_parser
from vltune.config import ConfigError, get_cfg
from vltune.config.identity import format_diff, identity, identity_diff, identity_hash
from vltune.config.validate import trainer_trains, validate_cfg
from vltune.engine import build_trainer, set_random_seed
from vltune.logs import setup_logging
from vltune.plugins import load_builtins
from vltune.registry import RegistryError
from vltune.results.record import (
    JobInfo,
    Record,
    config_to_dict,
    environment,
    infer_protocol_role,
    load_record,
    read_record,
    record_identity,
    write_json_atomic,
)

logger = logging.getLogger("train")


def job_info(args: argparse.Namespace, cfg: Any) -> JobInfo:
    """The record's ``job``: what ran, and its place in a benchmark (given by the runner, or inferred)."""
    config = os.path.splitext(os.path.basename(args.config_file))[0] if args.config_file else ""
    meta = json.loads(args.job_meta) if args.job_meta else {}
    info = JobInfo(trainer=cfg.TRAINER.NAME, config=config, dataset=cfg.DATASET.NAME,
                   shots=int(cfg.DATASET.NUM_SHOTS), subsample=cfg.DATASET.SUBSAMPLE_CLASSES, seed=int(cfg.SEED),
                   phase="eval" if args.eval_only else "train", task=str(meta.get("task", "")),
                   grid=dict(meta.get("grid") or {}), grid_name=str(meta.get("grid_name", "")),
                   index=int(meta.get("index", -1)))
    if args.eval_only and args.model_dir:
        info.source = os.path.relpath(os.path.abspath(args.model_dir), os.path.abspath(cfg.OUTPUT_DIR))
        info.source_dataset = _trained_dataset(args.model_dir)
    info.protocol, info.role = meta.get("protocol", ""), meta.get("role", "")
    if not (info.protocol and info.role):
        info.protocol, info.role = infer_protocol_role(info.phase, info.subsample, info.dataset, info.source_dataset,
                                                       _variant_of(info.dataset))
    return info


def _check_job_meta(text: str) -> None:
    try:
        meta = json.loads(text) if text else {}
    except json.JSONDecodeError as e:
        raise ConfigError(f"--job-meta is not valid JSON ({e}): {text!r}") from None
    if not isinstance(meta, dict):
        raise ConfigError(f"--job-meta must be a JSON object, got {text!r}")


def _trained_dataset(model_dir: str) -> str:
    """The dataset the run in ``model_dir`` trained on (its record, else its saved config)."""
    record = read_record(os.path.join(model_dir, "result.json"))
    if record and (record.get("job") or {}).get("dataset"):
        return str(record["job"]["dataset"])
    try:
        with open(os.path.join(model_dir, "config.yaml")) as f:
            return str((yaml.safe_load(f) or {}).get("DATASET", {}).get("NAME", ""))
    except (OSError, yaml.YAMLError, AttributeError):
        return ""


def _variant_of(dataset: str) -> str:
    """The dataset whose domain-shifted variant ``dataset`` is (ImageNetV2 → ImageNet), or ""."""
    from vltune.registry import DATASETS

    return getattr(DATASETS.get(dataset), "variant_of", "") if dataset in DATASETS else ""


def make_record(status: str, args: argparse.Namespace, cfg: Any, trainer: Any, ident: dict[str, Any],
                error: str = "") -> dict[str, Any]:
    """The run's ``result.json`` (``vltune.results.record.Record``)."""
    import torch

    device = trainer.device if trainer is not None else torch.device("cpu")
    metrics = {k: v for k, v in (trainer.last_metrics if trainer is not None else {}).items()
               if k in ("accuracy", "error", "macro_f1", "per_class")}
    job = job_info(args, cfg)
    if trainer is not None:
        job.resumed_from_epoch = trainer.resumed_from
        job.load_epoch = trainer.loaded_epoch
    record = Record(status=status, job=job, metrics=metrics,
                    cost=trainer.cost_record() if trainer is not None else {},
                    method=trainer.method_record() if trainer is not None else {},
                    train=trainer.train_history if trainer is not None else [], env=environment(device),
                    identity=ident, identity_hash=identity_hash(ident), config=config_to_dict(cfg),
                    created_at=datetime.datetime.now().isoformat(timespec="seconds"), error=error)
    return record.to_dict()


def already_finished(output_dir: str, ident: dict[str, Any]) -> bool:
    """True when ``output_dir`` holds a successful record of this job; raise if it holds another config's."""
    record = load_record(os.path.join(output_dir, "result.json"))
    if record is None or record.status != "success":
        return False
    diff = identity_diff(record_identity(record), ident)
    if diff:
        raise SystemExit(f"error: {output_dir} holds a finished run of a different config ({format_diff(diff)}); "
                         "use another --output-dir, or delete that folder to rerun")
    return True


def probe_memory(args: argparse.Namespace, cfg: Any, file: str) -> int:
    """The runner's memory probe (``vltune.runner.packing``): build the trainer with the job's full config, run one
    metered training step (trained jobs) and one metered evaluation batch, and write the larger peak as
    ``{"peak_mb", "method", "train_peak_mb", "eval_peak_mb"}`` to ``file``. A measurement, never a guess: the cost
    meter's own numbers (CUDA ``max_memory_allocated`` on a GPU). Logs and curves go to ``file``'s folder; the job's
    folder gets no record and no checkpoint. Returns 0, or 1 (with the error on stderr) when nothing was measured."""
    import torch

    folder = os.path.dirname(os.path.abspath(file))
    os.makedirs(folder, exist_ok=True)
    cfg.defrost()
    cfg.OUTPUT_DIR, cfg.RESUME = folder, ""
    cfg.freeze()
    setup_logging(folder, console=False)
    try:
        trainer = build_trainer(cfg, eval_only=args.eval_only)
        if args.eval_only and args.model_dir:
            trainer.load_model(args.model_dir, epoch=args.load_epoch)
        if not args.eval_only and trainer._models:
            trainer.before_train()
            trainer.epoch = trainer.start_epoch
            trainer.before_epoch()
            trainer.set_model_mode("train")
            batch = trainer.to_device(next(iter(trainer.train_loader_x)))
            trainer.cost.metered_step(lambda: trainer.forward_backward(batch), "train", apart=False)
        trainer.set_model_mode("eval")
        with torch.no_grad(), trainer.cost.phase("eval"):
            with trainer.precision.autocast():
                trainer.before_evaluate()
            try:
                batch = next(iter(trainer.test_loader))
                trainer.cost.metered_step(lambda: trainer._evaluate_batch(batch), "eval", apart=False)
            finally:
                trainer.after_evaluate()
        train_peak, train_method = trainer.cost.peak_mb("train")
        eval_peak, eval_method = trainer.cost.peak_mb("eval")
    except Exception as e:  # noqa: BLE001  (a failed probe: the runner falls back to its default and says why)
        logger.error(traceback.format_exc())
        print(f"memory probe failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    peaks = [p for p in (train_peak, eval_peak) if p is not None]
    if not peaks:
        print("memory probe measured nothing (no training step and no evaluation batch)", file=sys.stderr)
        return 1
    write_json_atomic(file, {"peak_mb": max(peaks), "method": train_method or eval_method,
                             "train_peak_mb": train_peak, "eval_peak_mb": eval_peak})
    logger.info(f"memory probe: {max(peaks):.1f} MB ({train_method or eval_method}) -> {file}")
    return 0


def _cancel_on_sigterm(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None, console: bool = True) -> int:
    """Run one job; returns the exit code. ``console=False`` logs to ``log.txt`` only (suites run in-process)."""
    args = build_parser().parse_args(argv)
    load_builtins()
    try:
        cfg = get_cfg(args)
        validate_cfg(cfg, trainer_trains(cfg.TRAINER.NAME, eval_only=args.eval_only or args.no_train))
        _check_job_meta(args.job_meta)
    except (ConfigError, RegistryError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    probe = args.probe_memory or os.environ.get(PROBE_ENV, "")
    if probe:
        return probe_memory(args, cfg, probe)
    out = cfg.OUTPUT_DIR
    ident = identity(cfg)
    if already_finished(out, ident):
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
        write_json_atomic(os.path.join(out, "result.json"), make_record("cancelled", args, cfg, trainer, ident))
        logger.info("Cancelled")
        return 130
    except Exception as e:  # noqa: BLE001  (any failure is recorded, then reported through the exit code)
        tb = traceback.format_exc()
        with open(os.path.join(out, "exceptions.txt"), "w") as f:
            f.write(tb)
        logger.error(tb)
        write_json_atomic(os.path.join(out, "result.json"),
                          make_record("failed", args, cfg, trainer, ident, error=f"{type(e).__name__}: {e}"))
        return 1
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)
    write_json_atomic(os.path.join(out, "result.json"), make_record("success", args, cfg, trainer, ident))
    return 0


if __name__ == "__main__":
    sys.exit(main())
