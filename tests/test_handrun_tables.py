"""Hand-run results give comparison tables: three methods run with ``train.py`` into a CoOp-script layout (train on
the base classes, evaluate on the new ones, two seeds), then ``python -m vltune.results DIR`` writes the base-to-new
comparison with the numbers computed here from the records. No runner, no job.json."""

from __future__ import annotations

import csv
import json
import os
import shutil
from statistics import mean, pstdev

import pytest
from conftest import REPO

import train
from vltune.results.__main__ import main as results_main
from vltune.results.record import load_record
from vltune.results.tables import harmonic_mean

DIGITS = str(REPO / "configs/datasets/digits.yaml")
METHODS = {"ZeroshotCLIP": "tiny", "CoOp": "tiny_ep10", "KgCoOp": "tiny_ep10"}
SEEDS = (1, 2)


def _run(trainer: str, root: str, weights: str, out: str, seed: int, subsample: str, *extra: str) -> None:
    config = str(REPO / "configs" / "trainers" / trainer / f"{METHODS[trainer]}.yaml")
    argv = ["--root", root, "--seed", str(seed), "--trainer", trainer, "--dataset-config-file", DIGITS,
            "--config-file", config, "--output-dir", out, *extra, "MODEL.BACKBONE.WEIGHTS", weights,
            "USE_CUDA", "False", "DATASET.NUM_SHOTS", "4", "OPTIM.MAX_EPOCH", "2",
            "DATASET.SUBSAMPLE_CLASSES", subsample]
    assert train.main(argv, console=False) == 0


# Six real train.py runs: every test that reads them is marked slow.
@pytest.fixture(scope="module")
def handrun(tmp_path_factory, digits_root, tiny_clip_weights):
    """``output/base2new/{train_base,test_new}/digits/shots_4/<trainer>/<config>/seed<S>``, as CoOp's scripts lay
    out their runs."""
    root = tmp_path_factory.mktemp("handrun") / "output"
    folders = {}
    for trainer, config in METHODS.items():
        for seed in SEEDS:
            train_dir = str(root / "base2new" / "train_base" / "digits" / "shots_4" / trainer / config / f"seed{seed}")
            test_dir = str(root / "base2new" / "test_new" / "digits" / "shots_4" / trainer / config / f"seed{seed}")
            _run(trainer, digits_root, tiny_clip_weights, train_dir, seed, "base")
            _run(trainer, digits_root, tiny_clip_weights, test_dir, seed, "new", "--eval-only", "--model-dir",
                 train_dir, "--load-epoch", "2" if trainer != "ZeroshotCLIP" else "-1")
            folders[trainer, seed] = (train_dir, test_dir)
    return str(root), folders


@pytest.mark.slow
def test_records_say_what_a_hand_run_job_was(handrun):
    _, folders = handrun
    train_dir, test_dir = folders["CoOp", 1]
    base, new = load_record(os.path.join(train_dir, "result.json")), load_record(os.path.join(test_dir, "result.json"))
    assert (base.job.protocol, base.job.role, base.job.phase, base.job.task) == ("b2n", "base", "train", "")
    assert (new.job.protocol, new.job.role, new.job.phase) == ("b2n", "new", "eval")
    assert new.source_folder() == os.path.normpath(train_dir) and new.job.source_dataset == "Digits"
    assert not os.path.exists(os.path.join(train_dir, "job.json"))


@pytest.mark.slow
def test_results_cli_writes_the_b2n_comparison_of_hand_run_jobs(handrun, capsys):
    root, folders = handrun
    assert results_main([root, "--no-plots"]) == 0
    report = open(os.path.join(root, "report.md")).read()
    assert report.startswith("# Results") and "## Comparison" in report
    with open(os.path.join(root, "tables", "compare_b2n.csv")) as f:
        table = {row["method"]: row for row in csv.DictReader(f)}
    assert set(table) == set(METHODS)
    for trainer in METHODS:
        base = [load_record(os.path.join(folders[trainer, s][0], "result.json")).accuracy for s in SEEDS]
        new = [load_record(os.path.join(folders[trainer, s][1], "result.json")).accuracy for s in SEEDS]
        row = table[trainer]
        assert float(row["Digits Base mean"]) == pytest.approx(mean(base))
        assert float(row["Digits Base std"]) == pytest.approx(pstdev(base))
        assert float(row["Digits New mean"]) == pytest.approx(mean(new))
        assert float(row["Digits H mean"]) == pytest.approx(harmonic_mean(mean(base), mean(new)))
        assert float(row["Average H mean"]) == pytest.approx(harmonic_mean(mean(base), mean(new)))
    with open(os.path.join(root, "tables", "compare_cost.csv")) as f:
        cost = {row["method"]: row for row in csv.DictReader(f)}
    meter = "eval peak MB (cpu_profiler_tensor_bytes)"
    assert cost["ZeroshotCLIP (b2n)"][meter] and cost["CoOp (b2n)"][meter]  # one meter for zero-shot and trained


@pytest.mark.slow
def test_readme_script_pastes_the_generated_blocks_between_their_markers(handrun, tmp_path):
    import importlib.util

    from vltune.results.compare import find_methods
    from vltune.results.record import find_records

    spec = importlib.util.spec_from_file_location("readme_tables", REPO / "scripts" / "readme_tables.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    root, _ = handrun
    (demo_begin, demo_end), (begin, end) = script.DEMO, script.COMPARISON
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{demo_begin}\nold demo\n{demo_end}\nmiddle\n{begin}\nold text\n{end}\noutro\n")
    assert script.main([root, "--readme", str(readme)]) == 0
    text = readme.read_text()
    records = find_records(root)
    methods = find_methods(records)
    block = text.split(begin)[1].split(end)[0]
    assert block.strip() == script.comparison_markdown(methods).strip() and "old text" not in text
    assert "| method |" in block and "| KgCoOp |" in block and text.endswith(f"{end}\noutro\n")
    demo = text.split(demo_begin)[1].split(demo_end)[0]
    assert demo.strip() == script.demo_markdown(methods, records).strip() and "old demo" not in text
    assert "| method | b2n H |" in demo and f"This run: {len(records)} jobs" in demo
    assert script.main([root, "--readme", str(readme)]) == 0 and readme.read_text() == text  # idempotent
    readme.write_text(f"no demo markers\n{begin}\n{end}\n")
    assert script.main([root, "--readme", str(readme)]) == 2


def test_the_readme_shows_a_generated_comparison_and_demo_overview():
    readme = (REPO / "README.md").read_text()
    block = readme.split("<!-- comparison:begin -->")[1].split("<!-- comparison:end -->")[0]
    assert "| method |" in block and "train peak MB (cpu_profiler_tensor_bytes)" in block
    demo = readme.split("<!-- demo:begin -->")[1].split("<!-- demo:end -->")[0]
    for trainer in ("ZeroshotCLIP", "CoOp", "FinetuneCLIP", "SkipTuning", "ResAdapter", "ResTuningBypass"):
        assert f"| {trainer} |" in demo, trainer
    assert "FinetuneCLIP / SkipTuning: training time ×" in demo and "ResAdapter / ResTuningBypass:" in demo


@pytest.mark.slow
def test_malformed_records_are_named_skipped_and_the_report_is_still_written(handrun, tmp_path, capsys):
    root, folders = handrun
    copy = tmp_path / "runs"
    shutil.copytree(root, copy)
    bad_accuracy = copy / os.path.relpath(folders["CoOp", 1][1], root) / "result.json"
    record = json.loads(bad_accuracy.read_text())
    record["metrics"]["accuracy"] = "high"
    bad_accuracy.write_text(json.dumps(record))
    cut = copy / os.path.relpath(folders["KgCoOp", 2][0], root) / "result.json"
    cut.write_text(cut.read_text()[:200])
    wrong_shape = copy / "extra" / "result.json"
    wrong_shape.parent.mkdir()
    wrong_shape.write_text(json.dumps({"status": "success", "job": ["not", "a", "mapping"]}))
    untouched = {p: p.read_bytes() for p in copy.rglob("result.json")}
    assert results_main([str(copy), "--no-plots"]) == 0
    report = (copy / "report.md").read_text()
    assert "**3 record(s) skipped**" in report
    for path, why in ((bad_accuracy, "metrics.accuracy 'high' is not a number"), (cut, "unreadable"),
                      (wrong_shape, "malformed")):
        assert f"`{path}`: " in report and why in report.split(f"`{path}`: ")[1].splitlines()[0]
    assert "| CoOp |" in report and "| ZeroshotCLIP |" in report  # the rest is still compared
    assert {p: p.read_bytes() for p in copy.rglob("result.json")} == untouched  # nothing rewritten


@pytest.mark.slow
def test_overview_and_cost_ratios_restate_the_methods_numbers(handrun):
    from vltune.results.compare import compare_overview, cost_numbers, cost_ratios, find_methods
    from vltune.results.record import find_records
    from vltune.results.tables import b2n_numbers

    root, _ = handrun
    methods = find_methods(find_records(root))
    overview = compare_overview(methods)
    rows = {row[0]: row for row in overview.rows}
    assert set(rows) == {m.label for m in methods}
    meter = "cpu_profiler_tensor_bytes"
    for m in methods:
        numbers = cost_numbers(m.records)
        assert rows[m.label][1].mean == b2n_numbers(m.records).stats["average"][2].mean
        assert rows[m.label][overview.header.index("b2n train+cache s/job")] == numbers["train_cache_s"]
        assert rows[m.label][overview.header.index(f"b2n train peak MB ({meter})")] == numbers["peaks"]["train"].get(
            meter)
    coop, kg = (cost_numbers(next(m for m in methods if m.label == name).records) for name in ("CoOp", "KgCoOp"))
    [line] = cost_ratios(methods, [("CoOp", "KgCoOp"), ("CoOp", "NotRun")])  # a pair with a missing method: left out
    assert line.startswith("CoOp / KgCoOp: training time ×")
    assert f"×{coop['train_cache_s'] / kg['train_cache_s']:.2f}" in line
    assert f"×{coop['peaks']['train'][meter] / kg['peaks']['train'][meter]:.2f}" in line and meter in line
