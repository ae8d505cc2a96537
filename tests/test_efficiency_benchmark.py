"""benchmarks/efficiency.py on the tiny backbone: its rows, the upstream-style variants and the target arithmetic.

Timings are not asserted (a benchmark measures; tests check what it measures and how it reports it).
"""

from __future__ import annotations

import importlib.util
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("efficiency", os.path.join(ROOT, "benchmarks", "efficiency.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# The benchmark run on seven variants takes ~20 s on 2 cores: the tests that read it are marked slow.
@pytest.fixture(scope="module")
def report(bench, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    variants = ["FinetuneCLIP", "SkipTuning", "CoOp", "CoOp-upstream", "CoOp@40", "CoOp+CSkip@40",
                "CLIPAdapter-upstream"]
    assert bench.main(["--backbone", "vltune-tiny", "--classes", "12", "--steps", "2", "--eval-images", "30",
                       "--eval-batch-size", "8", "--out", str(out), "--variants", *variants,
                       "--opts", "TRAINER.SKIP.START_LAYER", "1"]) == 0
    return json.loads((out / "efficiency.json").read_text()), (out / "efficiency.md").read_text()


@pytest.mark.slow
def test_one_row_per_variant_with_its_class_count(report):
    data, table = report
    rows = {r["variant"]: r for r in data["rows"]}
    assert list(rows) == ["FinetuneCLIP", "SkipTuning", "CoOp", "CoOp-upstream", "CoOp@40", "CoOp+CSkip@40",
                          "CLIPAdapter-upstream"]
    assert rows["CoOp@40"]["classes"] == rows["CoOp+CSkip@40"]["classes"] == 40 and rows["CoOp"]["classes"] == 12
    assert rows["CoOp+CSkip@40"]["text_classes"] < 40 == rows["CoOp@40"]["text_classes"]
    assert rows["CoOp-upstream"]["text_positions"] == "all" and rows["CoOp"]["text_positions"] == "to last EOT"
    assert rows["CLIPAdapter-upstream"]["trainer"] == "OriginCLIPAdapter"
    for r in rows.values():
        assert 1 <= len(r["step_s_all"]) <= 2 and r["step_s"] > 0
        assert r["peak_mb"] == pytest.approx(r["model_mb"] + r["optimizer_mb"] + r["step_peak_mb"])
        assert r["memory_method"] == "cpu_profiler_tensor_bytes" and f"| {r['variant']} |" in table
    assert rows["CoOp-upstream"]["step_peak_mb"] > rows["CoOp"]["step_peak_mb"]  # 77 positions hold more activations


@pytest.mark.slow
def test_the_eval_row_times_the_whole_test_and_the_encoder_on_the_same_images(report):
    data, table = report
    total, encoder = data["eval"]
    assert total["variant"] == "ZeroshotCLIP eval" and encoder["variant"] == "ZeroshotCLIP eval:encoder"
    assert total["images"] == encoder["images"] == 30 and total["classes"] == 12
    assert 0 < total["text_features_s"] and 0 < encoder["seconds"]
    assert "image encoder only" in table


@pytest.mark.slow
def test_targets_are_the_ratios_of_the_rows_they_name(bench, report):
    data, table = report
    rows = {r["variant"]: r for r in data["rows"] + data["eval"]}
    checked = {t["target"]: t for t in data["targets"]}
    assert len(checked) == 4  # the 1000-class CSkip target needs rows named CoOp@1000
    for target in bench.TARGETS:
        if target.what not in checked:
            continue
        t = checked[target.what]
        ratio = rows[target.num][target.key] / rows[target.den][target.key]
        assert t["ratio"] == pytest.approx(ratio)
        assert t["pass"] == (ratio >= target.bound if target.at_least else ratio <= target.bound)
        assert f"| {target.what} | {ratio:.2f}x |" in table and ("PASS" if t["pass"] else "MISS") in table


def test_variant_names_resolve_to_a_trainer_and_its_settings(bench):
    assert bench.resolve("CLIPAdapter-upstream") == ("OriginCLIPAdapter", {"MODEL.BACKBONE.TRUNCATE_TEXT": False},
                                                     None)  # re-encodes the class text every step
    assert bench.resolve("CoOp-upstream") == ("CoOp", {"MODEL.BACKBONE.TRUNCATE_TEXT": False}, None)
    assert bench.resolve("CoOp+CSkip") == ("CoOp", {"TRAINER.SKIP_PLUGIN.CSKIP": True}, None)
    assert bench.resolve("KgCoOp") == ("KgCoOp", {}, None)
    assert bench.parse_variant("CoOp+CSkip@1000", 100) == ("CoOp+CSkip", 1000)
    assert bench.parse_variant("CoOp", 100) == ("CoOp", 100)
    with pytest.raises(SystemExit, match="class count"):
        bench.parse_variant("CoOp@many", 100)


def test_compile_variants_put_every_transformer_block_under_torch_compile(bench, make_trainer):
    name, opts, patch = bench.resolve("CoOp-upstream+compile")
    assert name == "CoOp" and opts == {"MODEL.BACKBONE.TRUNCATE_TEXT": False}
    trainer = make_trainer(name)
    clip = trainer.model.clip
    blocks = [*clip.model.transformer.resblocks, *clip.model.visual.transformer.resblocks]
    assert all(b._compiled_call_impl is None for b in blocks)
    patch(trainer)
    assert all(b._compiled_call_impl is not None for b in blocks)
