"""Per-step training cost of vltune trainers at real backbone shapes (random weights): a benchmark, not a test.

For each variant, one trainer is built on a generated dataset with ``--classes`` classes (``--batch-size`` images
each) and the real ``--backbone`` architecture with random weights; after ``--warmup`` steps, ``--steps`` training
steps (``forward_backward``: forward, loss, backward, optimizer step) are timed one by one (median reported) and one
more step is measured for memory:

* peak memory = the model's parameters and buffers + optimizer state + the step's own peak (activations, gradients,
  temporaries) from ``vltune.engine.cost.step_peak_bytes`` (CPU: torch profiler memory events; CUDA:
  ``max_memory_allocated``). Dataset-wide feature caches (Skip Tuning's) are not part of a step and not counted;
* Skip Tuning steps consume the block-ω−1 tokens its cache would hold (computed for the batch, outside the timing).

    python benchmarks/efficiency.py                                  # FinetuneCLIP, SkipTuning, CoOp, CoOp+CSkip
    python benchmarks/efficiency.py --variants CoOp CoOp+CSkip --classes 1000
    python benchmarks/efficiency.py --device cuda --out results/bench
    python benchmarks/efficiency.py --backbone vltune-tiny --classes 20 --opts TRAINER.SKIP.START_LAYER 1   # smoke

Writes ``<out>/efficiency.json`` and ``<out>/efficiency.md`` and prints the table with the ratios between variants.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # silence the profiler's start/stop lines

import torch  # noqa: E402
from PIL import Image  # noqa: E402

import vltune  # noqa: E402,F401  (compat shim first)
from vltune.fileio import atomic_write  # noqa: E402
from vltune.results.record import write_json_atomic  # noqa: E402

#: variant name → (trainer, config opts); any other registered trainer name runs with its defaults
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "CoOp+CSkip": ("CoOp", {"TRAINER.SKIP_PLUGIN.CSKIP": True}),
    "KgCoOp+CSkip": ("KgCoOp", {"TRAINER.SKIP_PLUGIN.CSKIP": True}),
    "CLIPAdapter+cache": ("CLIPAdapter", {"TRAINER.SKIP_PLUGIN.CACHE_IMAGE": True}),
}
DEFAULT = ["FinetuneCLIP", "SkipTuning", "CoOp", "CoOp+CSkip"]
#: (numerator, denominator, what the ratio shows) printed when both variants ran
RATIOS = [("FinetuneCLIP", "SkipTuning", "SkipTuning vs FinetuneCLIP"), ("CoOp", "CoOp+CSkip", "CoOp+CSkip vs CoOp"),
          ("ResAdapter", "ResTuningBypass", "ResTuningBypass vs ResAdapter")]


def write_dataset(root: str, classes: int, per_class: int) -> None:
    """A Digits-layout dataset (the CoOp split format) with ``classes`` classes of tiny solid images."""
    folder = os.path.join(root, "digits")
    items = []
    for c in range(classes):
        name = f"class {c:04d}"
        os.makedirs(os.path.join(folder, "images", f"c{c:04d}"), exist_ok=True)
        for i in range(per_class):
            rel = f"c{c:04d}/{i}.png"
            Image.new("RGB", (8, 8), ((c * 37 + i) % 256, (c * 11) % 256, (i * 53) % 256)).save(
                os.path.join(folder, "images", rel))
            items.append([rel, c, name])
    split = {"train": items, "val": items[:1], "test": items[:classes]}
    atomic_write(os.path.join(folder, "split_zhou_Digits.json"), json.dumps(split).encode())


def build(variant: str, root: str, weights: str, size: int, args: argparse.Namespace) -> Any:
    from vltune.config import get_cfg
    from vltune.engine import build_trainer

    trainer_name, extra = VARIANTS.get(variant, (variant, {}))
    cuda = args.device == "cuda"
    opts = {"TRAINER.NAME": trainer_name, "DATASET.ROOT": root, "DATASET.NAME": "Digits",
            "DATASET.NUM_SHOTS": args.batch_size, "DATALOADER.TRAIN_X.BATCH_SIZE": args.batch_size,
            "DATALOADER.NUM_WORKERS": 0, "MODEL.BACKBONE.NAME": args.backbone, "MODEL.BACKBONE.WEIGHTS": weights,
            "INPUT.SIZE": (size, size), "INPUT.TRANSFORMS": ("normalize",), "OPTIM.NAME": "sgd", "OPTIM.LR": 1e-5,
            "OPTIM.MAX_EPOCH": 1,
            "TRAINER.PREC": "amp" if cuda else "fp32", "USE_CUDA": cuda, "SEED": 1,
            "OUTPUT_DIR": tempfile.mkdtemp(prefix="vltune-bench-")}
    opts.update(extra)
    return build_trainer(get_cfg(opts=[x for k, v in opts.items() for x in (k, str(v))] + list(args.opts)))


def training_batch(trainer: Any) -> dict[str, Any]:
    batch = trainer.to_device(next(iter(trainer.train_loader_x)))
    if hasattr(trainer, "image_prefix"):  # Skip Tuning: what its per-epoch cache holds for these images
        trainer.build_text_cache()
        batch = {**batch, "img": trainer.image_prefix(batch["img"]), "cached": True}
    return batch


def text_classes(trainer: Any, batch: dict[str, Any]) -> int:
    """How many classes the text side of the last step computed (CSkip keeps a subset)."""
    if getattr(trainer, "kept_counts", None):
        return trainer.kept_counts[-1]
    if trainer.cfg.TRAINER.SKIP_PLUGIN.CSKIP:
        with torch.no_grad():
            return len(trainer._skip_parts(batch)[1]["classes"])
    return trainer.num_classes


def measure(variant: str, root: str, weights: str, size: int, args: argparse.Namespace) -> dict[str, Any]:
    from vltune.engine.cost import step_peak_bytes

    trainer = build(variant, root, weights, size, args)
    batch = training_batch(trainer)
    trainer.set_model_mode("train")
    sync = torch.cuda.synchronize if trainer.device.type == "cuda" else (lambda: None)
    for _ in range(args.warmup):
        trainer.forward_backward(batch)
    times = []
    for _ in range(args.steps):
        sync()
        start = time.perf_counter()
        trainer.forward_backward(batch)
        sync()
        times.append(time.perf_counter() - start)
    _, step_bytes, method = step_peak_bytes(lambda: trainer.forward_backward(batch), trainer.device)
    tensors = [*trainer.model.parameters(), *trainer.model.buffers()]
    model_bytes = sum(t.numel() * t.element_size() for t in tensors)
    optim_bytes = sum(v.numel() * v.element_size() for o in trainer._optims.values() if o
                      for state in o.state.values() for v in state.values() if torch.is_tensor(v))
    row = {"variant": variant, "trainer": type(trainer).__name__, "step_s": statistics.median(times),
           "step_s_all": times, "peak_mb": (model_bytes + optim_bytes + step_bytes) / 2**20,
           "step_peak_mb": step_bytes / 2**20, "model_mb": model_bytes / 2**20, "optimizer_mb": optim_bytes / 2**20,
           "memory_method": method, "trainable_params": trainer.n_trainable, "classes": trainer.num_classes,
           "batch_size": args.batch_size, "text_classes": text_classes(trainer, batch)}
    return row


def markdown(rows: list[dict[str, Any]], ratios: list[str], header: str) -> str:
    lines = [header, "", "| variant | step s (median) | peak MB | step peak MB | trainable params | text classes "
             "per step |", "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['step_s']:.3f} | {r['peak_mb']:.0f} | {r['step_peak_mb']:.0f} | "
                     f"{r['trainable_params']:,} | {r['text_classes']} |")
    return "\n".join(lines + [""] + ratios) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", nargs="+", default=DEFAULT, help=f"trainers or {', '.join(VARIANTS)}")
    p.add_argument("--backbone", default="ViT-B/16")
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--steps", type=int, default=3, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--opts", nargs="*", default=[], help="KEY VALUE config overrides for every variant")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from vltune.clip import create_clip

    with tempfile.TemporaryDirectory(prefix="vltune-bench-") as tmp:
        write_dataset(tmp, args.classes, args.batch_size)
        weights = os.path.join(tmp, "random.pt")
        torch.manual_seed(0)
        model = create_clip(args.backbone)
        size = model.visual.image_size
        size = size if isinstance(size, int) else size[0]
        torch.save(model.state_dict(), weights)
        del model
        rows = []
        for variant in args.variants:
            rows.append(measure(variant, tmp, weights, size, args))
            r = rows[-1]
            print(f"{variant}: {r['step_s']:.3f} s/step, peak {r['peak_mb']:.0f} MB", flush=True)
    by_name = {r["variant"]: r for r in rows}
    ratios = []
    for slow, fast, what in RATIOS:
        if slow in by_name and fast in by_name:
            a, b = by_name[slow], by_name[fast]
            ratios.append(f"- {what}: {a['step_s'] / b['step_s']:.2f}x faster step, "
                          f"{a['peak_mb'] / b['peak_mb']:.2f}x lower peak memory")
    header = (f"Training step cost, {args.backbone} shapes (random weights), {args.classes} classes, batch "
              f"{args.batch_size}, {args.device} ({platform.processor() or platform.machine()}, "
              f"{torch.get_num_threads()} threads), torch {torch.__version__}; median of {args.steps} steps after "
              f"{args.warmup} warm-up; memory: {rows[0]['memory_method'] if rows else '-'}")
    table = markdown(rows, ratios, header)
    os.makedirs(args.out, exist_ok=True)
    write_json_atomic(os.path.join(args.out, "efficiency.json"), {"args": vars(args), "rows": rows, "ratios": ratios})
    atomic_write(os.path.join(args.out, "efficiency.md"), table.encode())
    print("\n" + table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
