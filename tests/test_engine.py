"""Engine pieces that need no model: LR schedule, optimizers, checkpoint files, precision rules, evaluator."""

from __future__ import annotations

import os
import pickle

import pytest
import torch

from vltune.config import get_cfg_default
from vltune.engine.checkpoint import load_checkpoint, resolve_checkpoint, save_checkpoint, saved_epochs
from vltune.engine.optim import build_lr_scheduler, build_optimizer
from vltune.engine.precision import Precision
from vltune.evaluation import Classification


def _optim_cfg(**kw: object):
    cfg = get_cfg_default()
    cfg.OPTIM.NAME, cfg.OPTIM.LR, cfg.OPTIM.LR_SCHEDULER = "sgd", 0.002, "cosine"
    cfg.OPTIM.MAX_EPOCH, cfg.OPTIM.WARMUP_EPOCH, cfg.OPTIM.WARMUP_TYPE = 10, 1, "constant"
    cfg.OPTIM.WARMUP_CONS_LR = 1e-5
    for k, v in kw.items():
        setattr(cfg.OPTIM, k, v)
    return cfg.OPTIM


def _lrs(optim_cfg, epochs: int) -> list[float]:
    opt = build_optimizer([torch.nn.Parameter(torch.zeros(1))], optim_cfg)
    sched = build_lr_scheduler(opt, optim_cfg)
    out = []
    for _ in range(epochs):
        out.append(opt.param_groups[0]["lr"])
        sched.step()
    return out


def test_cosine_with_constant_warmup_matches_cocoop_example():
    # dassl_contract.md §5: CoCoOp, η = 0.002, 10 epochs, one constant warmup epoch at 1e-5.
    expected = [1e-5, 2.000e-3, 1.951e-3, 1.809e-3, 1.588e-3, 1.309e-3, 1.000e-3, 0.691e-3, 0.412e-3, 0.191e-3]
    assert _lrs(_optim_cfg(), 10) == pytest.approx(expected, abs=1e-6)


def test_linear_warmup_and_step_schedules():
    lin = _lrs(_optim_cfg(WARMUP_EPOCH=2, WARMUP_TYPE="linear", WARMUP_MIN_LR=1e-4, LR_SCHEDULER="constant"), 4)
    assert lin == pytest.approx([1e-4, 0.001, 0.002, 0.002])
    step = _lrs(_optim_cfg(WARMUP_EPOCH=0, LR_SCHEDULER="single_step", STEPSIZE=(2,), GAMMA=0.5), 5)
    assert step == pytest.approx([0.002, 0.002, 0.001, 0.001, 0.0005])
    lin_decay = _lrs(_optim_cfg(WARMUP_EPOCH=0, LR_SCHEDULER="linear", MAX_EPOCH=4), 4)
    assert lin_decay == pytest.approx([0.002, 0.0015, 0.001, 0.0005])


def test_schedule_state_round_trip_resumes_the_same_lr():
    cfg = _optim_cfg()
    opt = build_optimizer([torch.nn.Parameter(torch.zeros(1))], cfg)
    sched = build_lr_scheduler(opt, cfg)
    for _ in range(4):
        sched.step()
    opt2 = build_optimizer([torch.nn.Parameter(torch.zeros(1))], cfg)
    sched2 = build_lr_scheduler(opt2, cfg)
    sched2.load_state_dict(sched.state_dict())
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"] != cfg.LR


def test_unknown_optimizer_and_scheduler_list_choices():
    with pytest.raises(ValueError, match="sgd"):
        build_optimizer([torch.nn.Parameter(torch.zeros(1))], _optim_cfg(NAME="lion"))
    opt = build_optimizer([torch.nn.Parameter(torch.zeros(1))], _optim_cfg())
    with pytest.raises(ValueError, match="cosine"):
        build_lr_scheduler(opt, _optim_cfg(LR_SCHEDULER="poly"))


def test_checkpoint_files_follow_dassl_layout_and_load_weights_only(tmp_path):
    folder = str(tmp_path / "prompt_learner")
    for epoch in (1, 2):
        save_checkpoint({"state_dict": {"ctx": torch.full((2, 3), float(epoch))}, "epoch": epoch,
                         "optimizer": None, "scheduler": {"last_epoch": epoch}, "val_result": None}, folder)
    assert saved_epochs(folder) == [1, 2]
    assert open(os.path.join(folder, "checkpoint")).read().strip() == "model.pth.tar-2"
    assert resolve_checkpoint(folder, -1).endswith("model.pth.tar-2")
    state = torch.load(resolve_checkpoint(folder, 1), weights_only=True)
    assert state["state_dict"]["ctx"].eq(1).all()
    with pytest.raises(FileNotFoundError, match="model.pth.tar-1, model.pth.tar-2"):
        resolve_checkpoint(folder, 7)


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_legacy_checkpoint_with_pickled_objects_loads_tensors_without_running_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "model.pth.tar-50"
    torch.save({"state_dict": {"ctx": torch.ones(4, 8).half()}, "epoch": 50, "scheduler": _Payload()}, path)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path, weights_only=True)
    state = load_checkpoint(str(path))
    assert state["state_dict"]["ctx"].dtype == torch.float16 and state["epoch"] == 50
    assert not (tmp_path / "PWNED").exists()


def test_precision_rules_on_cpu():
    with pytest.raises(ValueError, match="needs a CUDA device.*'amp'"):
        Precision("fp16", torch.device("cpu"))
    with pytest.raises(ValueError, match="fp32, amp, fp16"):
        Precision("half", torch.device("cpu"))
    amp = Precision("amp", torch.device("cpu"))
    lin = torch.nn.Linear(4, 4)
    with amp.autocast():
        assert lin(torch.randn(2, 4)).dtype == torch.bfloat16
    assert amp.scaler is None
    with Precision("fp32", torch.device("cpu")).autocast():
        assert lin(torch.randn(2, 4)).dtype == torch.float32


def test_evaluator_metrics_match_sklearn():
    from sklearn.metrics import f1_score

    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 5, (200,), generator=gen)
    logits = torch.randn(200, 6, generator=gen)  # class 5 is predicted but never true
    ev = Classification(lab2cname={i: f"c{i}" for i in range(6)})
    for chunk in range(4):
        ev.process(logits[chunk * 50:(chunk + 1) * 50], labels[chunk * 50:(chunk + 1) * 50])
    res = ev.evaluate()
    pred = logits.argmax(1)
    assert res["accuracy"] == pytest.approx(100 * (pred == labels).float().mean().item())
    assert res["macro_f1"] == pytest.approx(100 * f1_score(labels, pred, average="macro", labels=labels.unique()))
    assert res["per_class"]["c0"] == pytest.approx(100 * (pred[labels == 0] == 0).float().mean().item())
    assert res["total"] == 200 and res["error"] == pytest.approx(100 - res["accuracy"])


def test_cpu_step_meter_sees_a_known_allocation_within_ten_percent():
    from vltune.engine.cost import CostMeter, live_tensor_bytes

    held = torch.zeros(16 * 2**20, dtype=torch.uint8)  # live before the step: counted in the step's start
    meter = CostMeter(torch.device("cpu"))
    before = live_tensor_bytes()
    assert before >= held.numel()

    def step():
        block = torch.ones(256 * 2**20, dtype=torch.uint8)  # 256 MB at the step's peak
        return int(block[::4096].sum())

    assert meter.metered_step(step) == 256 * 2**20 // 4096
    peak_mb = (meter.cpu_peak_bytes["train"] - before) / 2**20
    assert abs(peak_mb - 256) <= 25.6, peak_mb
    assert meter.peak_mb("train") == (meter.cpu_peak_bytes["train"] / 2**20, "cpu_profiler_tensor_bytes")
    assert meter.seconds["meter"] > 0
    del held


def test_a_training_run_records_measured_memory_and_keeps_the_metered_step_out_of_train_time(make_trainer):
    trainer = make_trainer("CoOp", **{"DATASET.NUM_SHOTS": 4, "DATALOADER.TRAIN_X.BATCH_SIZE": 4,
                                      "OPTIM.MAX_EPOCH": 1, "SEED": 1, "TEST.NO_TEST": True})
    trainer.train()
    cost = trainer.cost_record()
    params_mb = sum(p.numel() * p.element_size() for p in trainer.model.parameters()) / 2**20
    assert cost["train_peak_method"] == "cpu_profiler_tensor_bytes" and cost["train_peak_mb"] > params_mb
    assert cost["peak_rss_mb"] > cost["train_peak_mb"]
    assert "peak_mem_mb" not in cost and "peak_mem_method" not in cost
    assert cost["meter_time_s"] > 0
    assert cost["train_time_s"] == pytest.approx(trainer.cost.seconds["train"] - cost["meter_time_s"])
    batches = len(trainer.train_loader_x)
    assert trainer.cost.images["train_batches"] == batches - 1  # the metered step is not in the throughput
