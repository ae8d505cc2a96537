"""The cost meter: a train and an eval peak, each from the device's one meter or None with a note, never a fallback.

Unit tests of ``CostMeter`` (a known CPU allocation; the CUDA peak bookkeeping against a fake allocator), then tiny
CoOp / ZeroshotCLIP runs on the digits data with a random tiny CLIP: a one-batch-per-epoch run, a one-step run, an
evaluation-only run and a trained run with its test.
"""

from __future__ import annotations

import pytest
import torch

from vltune.engine import cost as cost_mod
from vltune.engine.cost import CostMeter, live_tensor_bytes

CPU_METHOD = "cpu_profiler_tensor_bytes"


def test_cpu_eval_meter_sees_a_known_allocation_and_is_timed_apart():
    held = torch.zeros(16 * 2**20, dtype=torch.uint8)  # e.g. cached class text features: live when the batch starts
    meter = CostMeter(torch.device("cpu"))
    before = live_tensor_bytes()
    assert before >= held.numel()

    def batch() -> int:
        block = torch.ones(256 * 2**20, dtype=torch.uint8)  # 256 MB at the batch's peak
        return int(block[::4096].sum())

    with meter.phase("eval"):
        assert meter.metered_step(batch, "eval") == 256 * 2**20 // 4096
        meter.count("eval", 100)
    peak, method = meter.peak_mb("eval")
    assert method == CPU_METHOD and abs(peak - before / 2**20 - 256) <= 25.6, (peak, before)
    assert 0 < meter.seconds["eval_meter"] <= meter.seconds["eval"]
    assert meter.net_seconds("eval") == pytest.approx(meter.seconds["eval"] - meter.seconds["eval_meter"])
    assert meter.throughput("eval") == pytest.approx(100 / meter.net_seconds("eval"))
    assert "meter" not in meter.seconds and "train" not in meter.cpu_peak_bytes
    assert meter.peak_mb("train") == (None, None)  # an eval-only meter has no training peak, and says why
    assert meter.notes == ["train peak: no training step ran"]
    meter.peak_mb("train")
    assert meter.notes == ["train peak: no training step ran"]  # noted once however often the record is built
    del held


def test_an_unmetered_eval_keeps_its_reason():
    meter = CostMeter(torch.device("cpu"))
    meter.unmetered("eval", "the test loader has no batches")
    with meter.phase("eval"):
        pass
    assert meter.peak_mb("eval") == (None, None)
    assert meter.notes == ["eval peak: the test loader has no batches"]


class _FakeAllocator:
    """torch.cuda's peak statistics, driven by hand."""

    def __init__(self) -> None:
        self.current = self.peak = 0

    def set(self, nbytes: int) -> None:
        self.current = nbytes
        self.peak = max(self.peak, nbytes)

    def reset(self, device: object = None) -> None:
        self.peak = self.current


def test_cuda_train_and_eval_peaks_keep_out_of_each_other(monkeypatch):
    fake = _FakeAllocator()
    monkeypatch.setattr(cost_mod.torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(cost_mod.torch.cuda, "reset_peak_memory_stats", fake.reset)
    monkeypatch.setattr(cost_mod.torch.cuda, "max_memory_allocated", lambda device=None: fake.peak)
    meter = CostMeter(torch.device("cuda"))
    fake.set(2000)  # setup (building the model) is reset away
    fake.set(100)
    meter.reset_peak()
    with meter.phase("cache"):  # caching features: nobody's peak
        fake.set(5000)
        fake.set(100)
    with meter.phase("train"):
        meter.metered_step(lambda: fake.set(300), "train")
        fake.set(150)
        fake.set(100)
    with meter.phase("val"):  # model selection: nobody's peak
        fake.set(4000)
        fake.set(100)
    with meter.phase("eval"):
        meter.metered_step(lambda: fake.set(700), "eval")
        with meter.phase("cache"):  # a cache inside the evaluation does not lose the evaluation's peak so far
            fake.set(6000)
            fake.set(100)
        fake.set(100)
    assert meter.peak_mb("train") == (300 / 2**20, "cuda_max_allocated")
    assert meter.peak_mb("eval") == (700 / 2**20, "cuda_max_allocated")
    assert meter.seconds["meter"] > 0 and meter.seconds["eval_meter"] > 0
    assert meter.notes == []


COST = {"SEED": 1, "DATALOADER.TEST.BATCH_SIZE": 100}


def _params_mb(trainer) -> float:
    return sum(p.numel() * p.element_size() for p in trainer.model.parameters()) / 2**20


def test_a_run_with_one_batch_per_epoch_samples_its_second_epoch(make_trainer):
    # 10 classes × 1 shot < batch 16: every epoch is a single batch, so the run's second step is epoch 2's.
    trainer = make_trainer("CoOp", opts=COST, **{
        "DATASET.NUM_SHOTS": 1, "DATALOADER.TRAIN_X.BATCH_SIZE": 16, "OPTIM.MAX_EPOCH": 3, "TEST.NO_TEST": True})
    assert len(trainer.train_loader_x) == 1
    trainer.train()
    cost = trainer.cost_record()
    assert cost["train_peak_method"] == CPU_METHOD, cost
    assert _params_mb(trainer) < cost["train_peak_mb"] < cost["peak_rss_mb"] / 4  # tensors, far below the RSS
    assert cost["meter_time_s"] > 0 and trainer.cost.images["train_batches"] == 2  # the sampled step timed apart
    assert cost["eval_peak_mb"] is None and cost["eval_peak_method"] is None
    assert cost["meter_notes"] == ["eval peak: no test evaluation ran"]


def test_a_one_step_run_samples_its_only_step_and_counts_it_as_training(make_trainer):
    trainer = make_trainer("CoOp", opts=COST, **{
        "DATASET.NUM_SHOTS": 1, "DATALOADER.TRAIN_X.BATCH_SIZE": 16, "OPTIM.MAX_EPOCH": 1, "TEST.NO_TEST": True,
        "TEST.FINAL_MODEL": "best_val"})
    trainer.train()
    cost = trainer.cost_record()
    assert cost["train_peak_method"] == CPU_METHOD and cost["train_peak_mb"] > _params_mb(trainer)
    assert cost["meter_time_s"] == 0 and cost["train_time_s"] > 0 and cost["images_per_s"] > 0
    assert trainer.cost.images["train_batches"] == 1 and trainer.cost.images["train"] == 10
    assert trainer.cost.seconds.get("val", 0) > 0  # best_val evaluated on val: not metered as the eval
    assert cost["eval_peak_mb"] is None and "eval_meter_time_s" in cost and cost["eval_meter_time_s"] == 0


def test_an_eval_only_zero_shot_run_meters_its_evaluation(make_trainer):
    trainer = make_trainer("ZeroshotCLIP", eval_only=True, opts=COST)
    trainer.test()
    cost = trainer.cost_record()
    assert cost["eval_peak_method"] == CPU_METHOD, cost
    assert _params_mb(trainer) < cost["eval_peak_mb"] < cost["peak_rss_mb"] / 4
    assert cost["train_peak_mb"] is None and cost["train_peak_method"] is None
    assert cost["meter_notes"] == ["train peak: no training step ran"]
    batches, total = len(trainer.test_loader), len(trainer.test_loader.dataset)
    assert batches > 1
    sampled = len(next(b for i, b in enumerate(trainer.test_loader) if i == 1)["label"])
    assert trainer.cost.images["eval"] == total - sampled  # the profiled batch is not in the throughput
    assert cost["eval_meter_time_s"] > 0
    assert cost["eval_time_s"] == pytest.approx(trainer.cost.seconds["eval"] - cost["eval_meter_time_s"])
    assert trainer.last_metrics["total"] == total  # every image is still evaluated


def test_a_trained_run_has_both_peaks_from_one_meter(make_trainer):
    trainer = make_trainer("CoOp", opts=COST, **{
        "DATASET.NUM_SHOTS": 4, "DATALOADER.TRAIN_X.BATCH_SIZE": 16, "OPTIM.MAX_EPOCH": 1})
    trainer.train()
    cost = trainer.cost_record()
    assert cost["train_peak_method"] == cost["eval_peak_method"] == CPU_METHOD, cost
    for key in ("train_peak_mb", "eval_peak_mb"):
        assert _params_mb(trainer) < cost[key] < cost["peak_rss_mb"] / 4
    assert cost["meter_notes"] == []
    assert cost["meter_time_s"] > 0 and cost["eval_meter_time_s"] > 0
    assert {"peak_mem_mb", "peak_mem_method"}.isdisjoint(cost)
