"""Per-task tables, the cost table, plots and the rebuild command on a hand-made suite of ``Record``s: every expected
number is worked out by hand below.

The suite: a base-to-new task (2 datasets x 2 seeds, plus a dataset whose runs failed), a few-shot task (2 datasets x
K in {1, 4} x 2 seeds), a zero-shot few-shot task, a cross-dataset task (source, 2 targets, 2 variants, 2 seeds) and
a base-to-new task with a 2-point grid. Cost per record: a training job trains 10 s x seed, evaluates 2 s, runs at
50 images/s with a training peak of 1000 + seed MB and an evaluation peak of 400 + seed MB (CPU profiler); an
eval-only job trains 0 s, evaluates 1 s, 0 images/s, 300 MB evaluation peak. The comparison tables (methods as rows)
are tested in test_compare.py.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import subprocess
import sys
from statistics import mean

import pytest
from conftest import REPO

from vltune.results.__main__ import main
from vltune.results.formats import Stat, Table
from vltune.results.plots import write_plots
from vltune.results.record import JobInfo, Record, find_records, write_json_atomic
from vltune.results.report import build_tables, render_report, write_tables
from vltune.results.tables import harmonic_mean, task_tables

TRAINING_ROLES = ("base", "fewshot", "source")
CPU = "cpu_profiler_tensor_bytes"


def _row(task, protocol, role, dataset, seed, shots, acc, status="success", trainer="CoOp", grid=None, trainable=2048):
    """One record; ``status=None``: the job never ran, so there is no record (None, dropped by ``_records``)."""
    if status is None:
        return None
    trains = role in TRAINING_ROLES and trainer != "ZeroshotCLIP"
    job = JobInfo(task=task, protocol=protocol, role=role, trainer=trainer, config="vit_b16", dataset=dataset,
                  seed=seed, shots=shots, phase="train" if trains else "eval", grid=grid or {},
                  grid_name=",".join(f"{k}={v}" for k, v in (grid or {}).items()))
    cost = {"train_time_s": 10.0 * seed if trains else 0.0, "eval_time_s": 2.0 if trains else 1.0,
            "images_per_s": 50.0 if trains else 0.0, "train_peak_mb": 1000.0 + seed if trains else None,
            "train_peak_method": CPU if trains else None, "eval_peak_mb": 400.0 + seed if trains else 300.0,
            "eval_peak_method": CPU, "trainable_params": trainable, "total_params": 10_000,
            "eval_images_per_s": 400.0, "peak_rss_mb": 2000.0 if trains else 500.0,
            "ckpt_bytes": 4 * trainable if trains else 0}
    if trains and trainer == "SkipTuning":
        cost["cache_time_s"] = 3.0
    return Record(status=status, job=job, metrics={"accuracy": acc}, cost=cost)


def _records(rows) -> list[Record]:
    """The records in pipeline order (``job.index``), as ``find_records`` gives them back from a folder."""
    out = [r for r in rows if r is not None]
    for i, r in enumerate(out):
        r.job.index = i
    return out


def _b2n_rows():
    rows = []
    for seed, (cb, cn, pb, pn) in {1: (80.0, 60.0, 90.0, 70.0), 2: (84.0, 66.0, 92.0, 74.0)}.items():
        rows += [_row("coop_b2n", "b2n", "base", "caltech101", seed, 16, cb),
                 _row("coop_b2n", "b2n", "new", "caltech101", seed, 16, cn),
                 _row("coop_b2n", "b2n", "base", "oxford_pets", seed, 16, pb),
                 _row("coop_b2n", "b2n", "new", "oxford_pets", seed, 16, pn)]
    # dtd: base only for seed 1 (seed 2 cancelled); new failed for seed 1 and never ran for seed 2
    rows += [_row("coop_b2n", "b2n", "base", "dtd", 1, 16, 70.0), _row("coop_b2n", "b2n", "base", "dtd", 2, 16, 99.0,
                                                                         status="cancelled"),
             _row("coop_b2n", "b2n", "new", "dtd", 1, 16, 99.0, status="failed"),
             _row("coop_b2n", "b2n", "new", "dtd", 2, 16, None, status=None)]
    return rows


def _fewshot_rows():
    acc = {("caltech101", 1): (60.0, 64.0), ("caltech101", 4): (70.0, 71.0), ("oxford_pets", 1): (80.0, 86.0),
           ("oxford_pets", 4): (88.0, 90.0)}
    rows = [_row("coop_few", "fewshot", "fewshot", d, s, k, a[s - 1]) for (d, k), a in acc.items() for s in (1, 2)]
    rows += [_row("zs_few", "fewshot", "fewshot", d, s, 0, a, trainer="ZeroshotCLIP", trainable=0)
             for d, a in (("caltech101", 55.0), ("oxford_pets", 75.0)) for s in (1, 2)]
    return rows


def _xd_rows():
    acc = {("source", "imagenet"): (70.0, 72.0), ("target", "caltech101"): (90.0, 92.0),
           ("target", "oxford_pets"): (85.0, 89.0), ("variant", "imagenet_a"): (50.0, 52.0),
           ("variant", "imagenet_r"): (74.0, 78.0)}
    return [_row("coop_xd", "xd", role, d, s, 16 if role == "source" else 0, a[s - 1])
            for s in (1, 2) for (role, d), a in acc.items()]


def _grid_rows():
    acc = {4: ((80.0, 82.0), (70.0, 72.0)), 8: ((84.0, 86.0), (60.0, 62.0))}  # START_LAYER: (base, new) per seed
    return [_row("skip_b2n", "b2n", role, "caltech101", s, 16, a[s - 1], trainer="SkipTuning",
                 grid={"START_LAYER": layer}, trainable=5000)
            for layer, (base, new) in acc.items() for s in (1, 2) for role, a in (("base", base), ("new", new))]


@pytest.fixture
def rows():
    return _records(_b2n_rows() + _fewshot_rows() + _xd_rows() + _grid_rows())


def _tables(rows) -> dict:
    return {t.name: t for t in build_tables(rows)}


def _per_task(rows) -> list[str]:
    return [name for name in _tables(rows) if not name.startswith("compare_")]


def _csv(table) -> dict[str, dict[str, str]]:
    return {r[table.header[0]]: r for r in csv.DictReader(io.StringIO(table.to_csv()))}


def test_b2n_table_numbers_follow_the_cocoop_convention(rows):
    table = _tables(rows)["coop_b2n.b2n"]
    assert table.header == ["dataset", "base s1", "new s1", "H s1", "base s2", "new s2", "H s2", "base", "new", "H"]
    by_name = {r[0]: r[1:] for r in table.rows}
    # caltech101: base 80, 84 -> 82 ± 2; new 60, 66 -> 63 ± 3; H = HM(82, 63), its std over the per-seed H
    h1, h2 = 2 * 80 * 60 / (80 + 60), 2 * 84 * 66 / (84 + 66)
    assert by_name["caltech101"][:6] == pytest.approx([80.0, 60.0, h1, 84.0, 66.0, h2])
    assert by_name["caltech101"][6:] == [Stat(82.0, 2.0), Stat(63.0, 3.0),
                                         Stat(pytest.approx(2 * 82 * 63 / 145), pytest.approx(abs(h1 - h2) / 2))]
    assert by_name["caltech101"][8].mean != pytest.approx((h1 + h2) / 2)  # HM of the means, not the mean of H
    # oxford_pets: base 90, 92 -> 91 ± 1; new 70, 74 -> 72 ± 2
    assert by_name["oxford_pets"][6][:2] == (91.0, 1.0) and by_name["oxford_pets"][7] == (72.0, 2.0)
    # dtd: one base result, no new one: "-" everywhere but its base s1, and left out of the average
    assert by_name["dtd"] == [70.0, None, None, None, None, None, None, None, None]
    # average over caltech101 and oxford_pets: base (82 + 91) / 2 = 86.5, new (63 + 72) / 2 = 67.5
    # per seed: base s1 (80 + 90) / 2 = 85, s2 (84 + 92) / 2 = 88; new s1 (60 + 70) / 2 = 65, s2 (66 + 74) / 2 = 70
    hs1, hs2 = 2 * 85 * 65 / (85 + 65), 2 * 88 * 70 / (88 + 70)
    average = by_name["average"]
    assert average[:6] == pytest.approx([85.0, 65.0, hs1, 88.0, 70.0, hs2])
    assert average[6] == Stat(86.5, 1.5) and average[7] == Stat(67.5, 2.5)
    assert average[8].mean == pytest.approx(2 * 86.5 * 67.5 / (86.5 + 67.5))
    assert average[8].std == pytest.approx(abs(hs1 - hs2) / 2)
    assert average[8].mean != pytest.approx((by_name["caltech101"][8].mean + by_name["oxford_pets"][8].mean) / 2)
    md = table.to_markdown()
    assert "| dtd | 70.00 | - | - | - | - | - | - | - | - |" in md
    assert "| **average** | 85.00 | 65.00 |" in md and "| 86.50 ± 1.50 | 67.50 ± 2.50 |" in md


def test_b2n_csv_keeps_full_precision_and_splits_mean_and_std(rows):
    table = _tables(rows)["coop_b2n.b2n"]
    parsed = _csv(table)
    assert list(parsed["caltech101"])[-6:] == ["base mean", "base std", "new mean", "new std", "H mean", "H std"]
    caltech = parsed["caltech101"]
    assert float(caltech["H mean"]) == 2 * 82.0 * 63.0 / (82.0 + 63.0)  # exact: not rounded to 2 decimals
    assert float(caltech["H s1"]) == 2 * 80.0 * 60.0 / (80.0 + 60.0)
    assert float(caltech["base mean"]) == 82.0 and float(caltech["new std"]) == 3.0
    assert float(parsed["average"]["H mean"]) == harmonic_mean(86.5, 67.5)
    assert parsed["dtd"]["base s1"] == "70.0" and parsed["dtd"]["new s1"] == "" and parsed["dtd"]["H mean"] == ""


def test_latex_is_booktabs_with_escaped_cells(rows):
    tables = _tables(rows)
    tex = tables["coop_b2n.b2n"].to_latex()
    lines = tex.splitlines()
    assert lines[1].startswith("\\begin{tabular}{l") and lines[2] == "\\toprule" and lines[-1] == "\\end{tabular}"
    assert "\\bottomrule" in lines and "oxford\\_pets & 90.00" in tex and "oxford_pets" not in tex.replace("\\_", "")
    assert "86.50 $\\pm$ 1.50" in tex
    assert lines[lines.index("\\bottomrule") - 2] == "\\midrule"  # a rule before the bold average row
    assert lines[lines.index("\\bottomrule") - 1].startswith("\\textbf{average} & 85.00")
    cost = tables["compare_cost"].to_latex()
    assert "CoOp (b2n) & 9 & 14.00" in cost and "\\textbf{average}" in cost
    assert "\n% train/eval peak MB: the max over the jobs" in cost  # the notes, as comments above the tabular
    odd = Table("odd", "odd cells", ["name_x", "value"], [["a_b 50% x&y #1", 1.0]]).to_latex()
    assert "name\\_x & value \\\\" in odd and "a\\_b 50\\% x\\&y \\#1 & 1.00 \\\\" in odd


def test_fewshot_table_mean_and_population_std(rows):
    tables = _tables(rows)
    table = tables["coop_few.fewshot"]
    assert table.header == ["dataset", "1-shot", "4-shot"]
    by_name = {r[0]: r[1:] for r in table.rows}
    assert by_name["caltech101"] == [Stat(62.0, 2.0), Stat(70.5, 0.5)]  # (60 + 64) / 2 ± 2; (70 + 71) / 2 ± 0.5
    assert by_name["oxford_pets"] == [Stat(83.0, 3.0), Stat(89.0, 1.0)]
    assert by_name["average"] == [(62.0 + 83.0) / 2, (70.5 + 89.0) / 2]
    assert "| caltech101 | 62.00 ± 2.00 | 70.50 ± 0.50 |" in table.to_markdown()
    parsed = _csv(table)
    assert float(parsed["average"]["4-shot mean"]) == 79.75 and parsed["average"]["4-shot std"] == ""
    zs = tables["zs_few.fewshot"]
    assert zs.header == ["dataset", "zero-shot"] and zs.rows[-1] == ["average", (55.0 + 75.0) / 2]


def test_xd_and_dg_tables_per_seed_and_seed_means(rows):
    tables = _tables(rows)
    xd, dg = tables["coop_xd.xd"], tables["coop_xd.dg"]
    assert xd.header == ["seed", "imagenet", "caltech101", "oxford_pets", "average_xd"]
    assert xd.rows == [["seed 1", 70.0, 90.0, 85.0, (90.0 + 85.0) / 2], ["seed 2", 72.0, 92.0, 89.0, (92 + 89) / 2],
                       ["mean", 71.0, 91.0, 87.0, (91.0 + 87.0) / 2]]  # the source is not in average_xd
    assert dg.header == ["seed", "imagenet_a", "imagenet_r", "average_dg"]
    assert dg.rows[-1] == ["mean", 51.0, 76.0, (51.0 + 76.0) / 2]
    assert "| **mean** | 71.00 | 91.00 | 87.00 | 89.00 |" in xd.to_markdown()


def test_xd_average_is_missing_when_a_target_failed(rows):
    rows = [dataclasses.replace(r, status="failed") if (r.job.dataset, r.job.seed) == ("oxford_pets", 2) else r
            for r in _records(_xd_rows())]
    xd = _tables(rows)["coop_xd.xd"]
    assert xd.rows[1] == ["seed 2", 72.0, 92.0, None, None]
    assert xd.rows[2] == ["mean", 71.0, 91.0, 85.0, (91.0 + 85.0) / 2]  # the seed mean of what succeeded


def test_grid_task_gets_tables_per_point_and_a_summary(rows):
    tables = _tables(rows)
    assert _per_task(rows) == ["coop_b2n.b2n", "coop_few.fewshot", "zs_few.fewshot", "coop_xd.xd", "coop_xd.dg",
                               "skip_b2n.START_LAYER-4.b2n", "skip_b2n.START_LAYER-8.b2n", "skip_b2n.grid"]
    grid = tables["skip_b2n.grid"]
    assert grid.header == ["grid point", "START_LAYER", "base", "new", "H"]
    # START_LAYER=4: base (80 + 82) / 2 = 81, new (70 + 72) / 2 = 71; START_LAYER=8: base 85, new 61
    assert grid.rows[0] == ["START_LAYER=4", 4, 81.0, 71.0, pytest.approx(2 * 81 * 71 / (81 + 71))]
    assert grid.rows[1] == ["START_LAYER=8", 8, 85.0, 61.0, pytest.approx(2 * 85 * 61 / (85 + 61))]
    assert tables["skip_b2n.START_LAYER-8.b2n"].rows[-1][-3] == Stat(85.0, 1.0)
    summary, per_point = task_tables("coop_b2n", {"": _records(_b2n_rows())})
    assert summary is None and list(per_point) == [""]  # no grid: no summary


def test_cost_table_has_a_row_per_method_and_protocol_and_an_average(rows):
    table = _tables(rows)["compare_cost"]
    assert table.header == ["method", "jobs", "train time s", "cache time s", "train+cache s", "eval time s",
                            "images/s", "eval images/s", f"train peak MB ({CPU})", f"eval peak MB ({CPU})",
                            "peak RSS MB (process)", "checkpoint MB", "trainable params"]
    by_name = {r[0]: r[1:] for r in table.rows}
    assert list(by_name) == ["CoOp (b2n)", "SkipTuning [START_LAYER=4] (b2n)", "SkipTuning [START_LAYER=8] (b2n)",
                             "CoOp (fewshot)", "ZeroshotCLIP (fewshot)", "CoOp (xd)", "average"]
    # coop_b2n: 9 successful jobs (dtd's cancelled and failed ones do not count): 5 trained (10, 20, 10, 20, 10 s)
    # and 4 evaluations; eval time 5 x 2 s + 4 x 1 s = 14 s; peaks: training 1000 + seed, evaluation 400 + seed
    assert by_name["CoOp (b2n)"] == [9, 14.0, 0.0, 14.0, pytest.approx(14 / 9), 50.0, 400.0, 1002.0, 402.0, 2000.0,
                                     4 * 2048 / 2**20, 2048]
    # zero-shot: nothing trained, so no train time, throughput or training peak; its evaluation peak shares the column
    assert by_name["ZeroshotCLIP (fewshot)"] == [4, None, None, None, 1.0, None, 400.0, None, 300.0, 500.0, 0.0, 0]
    assert by_name["CoOp (xd)"][:5] == [10, 15.0, 0.0, 15.0, 1.2]  # 2 trained + 8 eval; (2 x 2 + 8 x 1) / 10 s
    assert by_name["SkipTuning [START_LAYER=4] (b2n)"][:5] == [4, 15.0, 3.0, 18.0, 1.5]  # cache: trained jobs only
    jobs = [9, 4, 4, 8, 4, 10]  # CoOp b2n, SkipTuning x 2 grid points, CoOp few-shot, zero-shot, CoOp xd
    average = by_name["average"]
    assert average[0] == pytest.approx(mean(jobs))
    assert average[1] == pytest.approx(mean([14.0, 15.0, 15.0, 15.0, 15.0]))  # zero-shot has no train time
    assert average[2] == pytest.approx(mean([0.0, 3.0, 3.0, 0.0, 0.0]))  # cache time: methods that trained
    assert average[9] == pytest.approx(mean([2000.0, 2000.0, 2000.0, 2000.0, 500.0, 2000.0]))
    assert average[10] is None and average[11] is None  # no average over sizes
    assert "| **average** | 6.50 | 14.80 | 1.20 |" in table.to_markdown()


def test_report_sections_and_plot_links(rows):
    report = render_report(rows, ["plots/fewshot.png"])
    order = ["# Results", "## Comparison", "*cost per method", "## Plots", "![fewshot](plots/fewshot.png)",
             "## Per task", "### coop_b2n: CoOp `vit_b16`, b2n", "### coop_few: CoOp `vit_b16`, fewshot",
             "### coop_xd: CoOp `vit_b16`, xd", "coop_xd: domain-generalisation",
             "### skip_b2n: SkipTuning `vit_b16`, b2n", "| grid point | START_LAYER | base | new | H |",
             "#### START_LAYER=4", "#### START_LAYER=8"]
    positions = [report.index(s) for s in order]
    assert positions == sorted(positions)
    assert "## Plots" not in render_report(rows)


def test_write_tables_writes_csv_and_tex_per_table(rows, tmp_path):
    paths = write_tables(rows, str(tmp_path))
    names = [t.name for t in build_tables(rows)]
    assert sorted(paths) == sorted(str(tmp_path / "tables" / f"{n}.{e}") for n in names for e in ("csv", "tex"))
    assert (tmp_path / "tables" / "compare_cost.csv").read_text() == _tables(rows)["compare_cost"].to_csv()


def _is_png(path) -> bool:
    data = open(path, "rb").read()
    return data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 5_000


def test_write_plots_writes_only_plots_with_data(rows, tmp_path):
    paths = write_plots(rows, str(tmp_path / "all"))
    assert paths == ["plots/fewshot.png", "plots/efficiency_time.png", f"plots/efficiency_memory_{CPU}.png",
                     "plots/grid_skip_b2n.png"]
    assert all(_is_png(tmp_path / "all" / p) for p in paths)
    no_fewshot = [r for r in rows if r.job.protocol != "fewshot"]
    assert "plots/fewshot.png" not in write_plots(no_fewshot, str(tmp_path / "b"))
    assert not (tmp_path / "b" / "plots" / "fewshot.png").exists()
    # zero-shot only: its dashed line is a few-shot plot, but nothing trained and there is no grid
    assert write_plots([r for r in rows if r.job.task == "zs_few"], str(tmp_path / "zs")) == ["plots/fewshot.png"]


def _write_output_folder(rows, root) -> None:
    """One result.json per record, in folders whose sorted order is the rows' order; records without a grid are
    written in the older layout (schema 1: the task, protocol, role and index only in a job.json beside them)."""
    legacy = ("task", "protocol", "role", "index")
    for i, record in enumerate(rows):
        folder = root / f"{i:03d}"
        data = record.to_dict()
        if not record.job.grid:
            data["schema"] = 1
            job = data["job"]
            (folder / "job.json").parent.mkdir(parents=True)
            (folder / "job.json").write_text(json.dumps({k: job.pop(k) for k in legacy} | {"config_hash": "abc"}))
        write_json_atomic(str(folder / "result.json"), data)


@pytest.mark.slow  # a `python -m vltune.results` subprocess
def test_rebuild_command_writes_report_tables_and_plots(rows, tmp_path):
    _write_output_folder(rows, tmp_path / "out")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "vltune.results", str(tmp_path / "out")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = (tmp_path / "out" / "report.md").read_text()
    plots = ["plots/fewshot.png", "plots/efficiency_time.png", f"plots/efficiency_memory_{CPU}.png",
             "plots/grid_skip_b2n.png"]
    assert report == render_report(rows, plots)  # the folder alone rebuilds what the rows give
    assert report in proc.stdout and str(tmp_path / "out" / "tables" / "compare_cost.tex") in proc.stdout
    assert all(_is_png(tmp_path / "out" / p) for p in plots)
    assert (tmp_path / "out" / "tables" / "skip_b2n.grid.csv").is_file()
    assert len(find_records(str(tmp_path / "out"))) == len(rows)


def test_rebuild_command_without_plots_and_on_bad_folders(rows, tmp_path, capsys):
    _write_output_folder(_records(_b2n_rows()), tmp_path / "out")
    assert main([str(tmp_path / "out"), "--no-plots"]) == 0
    assert (tmp_path / "out" / "report.md").is_file() and not (tmp_path / "out" / "plots").exists()
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty")]) == 2
    assert "no result.json" in capsys.readouterr().err
    assert main([str(tmp_path / "missing")]) == 2
    assert "not found" in capsys.readouterr().err
