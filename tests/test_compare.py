"""The comparison tables (methods as rows, one per protocol), the report and the plots' label placement, on folders of
synthetic ``result.json`` files.

Expected numbers are computed here from the accuracies and costs the suite was written with (``Suite.truth`` and the
written records), by the protocols' definitions, never copied from an output.

The runner suite: CoOp and MaPLe (trained) and ZeroshotCLIP (eval-only), 2 seeds, each in base-to-new (2 datasets),
few-shot (2 datasets, K in {1, 4}; zero-shot at K = 0) and cross-dataset (ImageNet source, 2 targets, 2 variants).
CoOp and ZeroshotCLIP measure memory with the CPU profiler, MaPLe with CUDA. One MaPLe few-shot run failed.
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import os
import random
from dataclasses import dataclass, field
from statistics import mean, pstdev
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from vltune.results.__main__ import main  # noqa: E402
from vltune.results.compare import comparison_tables, cost_numbers, find_methods, memory_peaks, rss_mb  # noqa: E402
from vltune.results.formats import Stat  # noqa: E402
from vltune.results.plots import label_box, place_labels, scatter_labelled, write_plots  # noqa: E402
from vltune.results.record import JobInfo, Record, find_records, write_json_atomic  # noqa: E402
from vltune.results.report import build_tables, render_report  # noqa: E402

SEEDS = (1, 2)
B2N_DATASETS = ("caltech101", "oxford_pets")
FEW_DATASETS = ("caltech101", "dtd")
FEW_SHOTS = (1, 4)
TARGETS, VARIANTS, SOURCE = ("caltech101", "dtd"), ("imagenet_a", "imagenet_r"), "imagenet"
CPU, CUDA = "cpu_profiler_tensor_bytes", "cuda_max_allocated"
METHODS = {"CoOp": ("vit_b16_ep50", False, CPU), "MaPLe": ("vit_b16_c2_ep5", False, CUDA),
           "ZeroshotCLIP": ("vit_b16", True, CPU)}  # trainer: (config, eval-only, memory meter)
FAILED = ("MaPLe", "fewshot", "dtd", 2, 4)  # (trainer, protocol, dataset, seed, K) of the failed run


def write_record(root: str, folder: str, accuracy: float | None, cost: dict[str, Any] | None = None,
                 status: str = "success", **job: Any) -> Record:
    """Write ``root/folder/result.json`` as ``train.py`` does (``Record.to_dict`` + ``write_json_atomic``)."""
    record = Record(status=status, job=JobInfo(**job), metrics={} if accuracy is None else {"accuracy": accuracy},
                    cost=cost or {})
    path = os.path.join(root, folder, "result.json")
    write_json_atomic(path, record.to_dict())
    return dataclasses.replace(record, path=path)


def make_cost(key: str, trains: bool, meter: str, params: int) -> dict[str, Any]:
    """A new-schema cost dict with values drawn from ``key`` (eval-only: no training time, throughput or peak)."""
    rng = random.Random(key)
    return {"train_time_s": rng.uniform(5, 60) if trains else 0.0,
            "cache_time_s": rng.uniform(0, 3) if trains else 0.0, "meter_time_s": 0.1,
            "eval_time_s": rng.uniform(1, 5), "images_per_s": rng.uniform(20, 80) if trains else 0.0,
            "eval_images_per_s": rng.uniform(100, 400), "train_peak_mb": rng.uniform(500, 900) if trains else None,
            "train_peak_method": meter if trains else None, "eval_peak_mb": rng.uniform(100, 300),
            "eval_peak_method": meter, "peak_rss_mb": rng.uniform(1000, 2000), "meter_notes": [],
            "trainable_params": params, "total_params": 10_000 + params,
            "ckpt_bytes": 4 * params if trains else 0}


@dataclass
class Suite:
    root: str
    records: list[Record] = field(default_factory=list)
    truth: dict[tuple, float] = field(default_factory=dict)  # (trainer, role, dataset, seed, K) -> accuracy

    def add(self, folder: str, trainer: str, protocol: str, role: str, dataset: str, seed: int, shots: int,
            phase: str, source: str = "", **job: Any) -> None:
        config, eval_only, meter = METHODS[trainer]
        rng = random.Random(f"{trainer}/{protocol}/{role}/{dataset}/{seed}/{shots}")
        acc = round(rng.uniform(40, 95), 3)
        failed = (trainer, protocol, dataset, seed, shots) == FAILED
        if not failed:
            self.truth[(trainer, protocol, role, dataset, seed, shots)] = acc
        params = 0 if eval_only else len(trainer) * 1000
        cost = make_cost(folder, phase == "train", meter, params)
        self.records.append(write_record(
            self.root, folder, None if failed else acc, cost, status="failed" if failed else "success",
            trainer=trainer, config=config, dataset=dataset, shots=shots, seed=seed, phase=phase, protocol=protocol,
            role=role, task=f"{trainer.lower()}_{protocol}", index=len(self.records), source=source,
            source_dataset=SOURCE if role in ("target", "variant") else "", **job))

    def acc(self, trainer: str, protocol: str, role: str, dataset: str, shots: int) -> list[float]:
        return [a for s in SEEDS if (a := self.truth.get((trainer, protocol, role, dataset, s, shots))) is not None]


def write_runner_suite(root: str) -> Suite:
    """Runner-style folders (``<task>/train_base/<d>/shots16/seed1`` ...) with task, protocol and role set."""
    suite = Suite(root)
    for trainer, (_, eval_only, _) in METHODS.items():
        task, train = trainer.lower(), "eval" if eval_only else "train"
        k = 0 if eval_only else 16
        for seed, d in itertools.product(SEEDS, B2N_DATASETS):
            base = f"{task}_b2n/train_base/{d}/shots{k}/seed{seed}"
            new = f"{task}_b2n/test_new/{d}/shots{k}/seed{seed}"
            suite.add(base, trainer, "b2n", "base", d, seed, k, train, subsample="base")
            suite.add(new, trainer, "b2n", "new", d, seed, k, "eval", "" if eval_only else os.path.relpath(base, new),
                      subsample="new")
        for seed, shots, d in itertools.product(SEEDS, [0] if eval_only else FEW_SHOTS, FEW_DATASETS):
            suite.add(f"{task}_fewshot/{d}/shots{shots}/seed{seed}", trainer, "fewshot", "fewshot", d, seed, shots,
                      train, grid={} if eval_only else {"DATASET.NUM_SHOTS": shots})
        for seed in SEEDS:
            source = f"{task}_xd/{SOURCE}/shots{k}/seed{seed}"
            suite.add(source, trainer, "xd", "source", SOURCE, seed, k, train)
            for role, d in [*(("target", d) for d in TARGETS), *(("variant", d) for d in VARIANTS)]:
                folder = f"{task}_xd/{d}/eval/seed{seed}"
                suite.add(folder, trainer, "xd", role, d, seed, 0, "eval",
                          "" if eval_only else os.path.relpath(source, folder))
    return suite


@pytest.fixture
def suite(tmp_path) -> Suite:
    return write_runner_suite(str(tmp_path / "out"))


def _tables(records: list[Record]) -> dict:
    return {t.name: t for t in comparison_tables(find_methods(records))}


def _rows(table) -> dict[str, list]:
    return {r[0]: r[1:] for r in table.rows}


def _hm(a: float, b: float) -> float:
    return 2 * a * b / (a + b)


def _stat(values: list[float]) -> Stat:
    return Stat(pytest.approx(mean(values)), pytest.approx(pstdev(values)) if len(values) > 1 else None)


def test_b2n_comparison_per_dataset_and_average(suite):
    records = find_records(suite.root)
    tables = _tables(records)
    full, average = tables["compare_b2n"], tables["compare_b2n_average"]
    assert full.header == ["method", *(f"{d} {c}" for d in [*B2N_DATASETS, "Average"] for c in ("Base", "New", "H"))]
    assert list(_rows(full)) == list(METHODS) == list(_rows(average))
    for trainer, (_, eval_only, _) in METHODS.items():
        k = 0 if eval_only else 16
        row, means = _rows(full)[trainer], {}
        for i, d in enumerate(B2N_DATASETS):
            base, new = suite.acc(trainer, "b2n", "base", d, k), suite.acc(trainer, "b2n", "new", d, k)
            hs = [_hm(b, n) for b, n in zip(base, new)]
            assert row[3 * i:3 * i + 2] == [_stat(base), _stat(new)]
            assert row[3 * i + 2] == Stat(pytest.approx(_hm(mean(base), mean(new))), pytest.approx(pstdev(hs)))
            assert row[3 * i + 2].mean != pytest.approx(mean(hs))  # HM of the seed means, not the mean of H
            means[d] = mean(base), mean(new)
        b, n = mean(v[0] for v in means.values()), mean(v[1] for v in means.values())
        assert [s.mean for s in row[-3:]] == pytest.approx([b, n, _hm(b, n)])
        assert [s.mean for s in _rows(average)[trainer]] == pytest.approx([b, n, _hm(b, n)])
        seed_b = [mean(suite.acc(trainer, "b2n", "base", d, k)[i] for d in B2N_DATASETS) for i in range(2)]
        assert row[-3].std == pytest.approx(pstdev(seed_b))


def test_fewshot_comparison_per_k_and_per_dataset(suite):
    tables = _tables(find_records(suite.root))
    by_k = tables["compare_fewshot"]
    assert by_k.header == ["method", "zero-shot", "1-shot", "4-shot"]
    rows = _rows(by_k)
    for trainer in ("CoOp", "MaPLe"):
        expected = [mean(mean(suite.acc(trainer, "fewshot", "fewshot", d, k)) for d in FEW_DATASETS)
                    for k in FEW_SHOTS]
        assert rows[trainer] == [None, *map(pytest.approx, expected)]
    zs = mean(mean(suite.acc("ZeroshotCLIP", "fewshot", "fewshot", d, 0)) for d in FEW_DATASETS)
    assert rows["ZeroshotCLIP"] == [pytest.approx(zs), None, None]
    # the failed MaPLe run is left out: its dtd 4-shot value is seed 1's alone, with no spread
    at4 = _rows(tables["compare_fewshot_4-shot"])
    assert tables["compare_fewshot_4-shot"].header == ["method", *FEW_DATASETS, "average"]
    assert at4["MaPLe"][1] == Stat(suite.truth[("MaPLe", "fewshot", "fewshot", "dtd", 1, 4)], None)
    assert at4["CoOp"][0] == _stat(suite.acc("CoOp", "fewshot", "fewshot", "caltech101", 4))
    assert at4["CoOp"][-1] == rows["CoOp"][-1] and "ZeroshotCLIP" not in at4
    assert list(_rows(tables["compare_fewshot_zero-shot"])) == ["ZeroshotCLIP"]


def test_xd_and_dg_comparison(suite):
    tables = _tables(find_records(suite.root))
    xd, dg = tables["compare_xd"], tables["compare_dg"]
    assert xd.header == ["method", f"{SOURCE} (source)", *TARGETS, "average_xd"]
    assert dg.header == ["method", f"{SOURCE} (source)", *VARIANTS, "average_dg"]
    for trainer, (_, eval_only, _) in METHODS.items():
        k = 0 if eval_only else 16
        source = suite.acc(trainer, "xd", "source", SOURCE, k)
        targets = [suite.acc(trainer, "xd", "target", d, 0) for d in TARGETS]
        variants = [suite.acc(trainer, "xd", "variant", d, 0) for d in VARIANTS]
        assert _rows(xd)[trainer][:-1] == [_stat(source), *map(_stat, targets)]
        assert _rows(xd)[trainer][-1].mean == pytest.approx(mean(map(mean, targets)))  # source excluded
        assert _rows(dg)[trainer][-1].mean == pytest.approx(mean(map(mean, variants)))
        assert _rows(dg)[trainer][0] == _stat(source)


def test_cost_comparison_columns(suite):
    records = find_records(suite.root)
    table = _tables(records)["compare_cost"]
    columns = {h: [row[j] for row in table.rows] for j, h in enumerate(table.header)}
    labels = columns["method"]
    assert labels[:3] == ["CoOp (b2n)", "MaPLe (b2n)", "ZeroshotCLIP (b2n)"] and labels[-1] == "average"
    assert len(labels) == 3 * 3 + 1
    for label in labels[:-1]:
        trainer, protocol = label[:-1].split(" (")
        mine = [r for r in records
                if (r.job.trainer, r.job.protocol, r.status) == (trainer, protocol, "success")]
        trained = [r.cost for r in mine if r.job.phase == "train"]
        meter = METHODS[trainer][2]
        row = {h: columns[h][labels.index(label)] for h in table.header}
        expected = {
            "jobs": len(mine),
            "train time s": mean(c["train_time_s"] for c in trained) if trained else None,
            "cache time s": mean(c["cache_time_s"] for c in trained) if trained else None,
            "train+cache s": mean(c["train_time_s"] + c["cache_time_s"] for c in trained) if trained else None,
            "eval time s": mean(r.cost["eval_time_s"] for r in mine),
            "images/s": mean(c["images_per_s"] for c in trained) if trained else None,
            "eval images/s": mean(r.cost["eval_images_per_s"] for r in mine),
            f"train peak MB ({meter})": max(c["train_peak_mb"] for c in trained) if trained else None,
            f"eval peak MB ({meter})": max(r.cost["eval_peak_mb"] for r in mine),
            "peak RSS MB (process)": max(r.cost["peak_rss_mb"] for r in mine),
            "checkpoint MB": max(r.cost["ckpt_bytes"] for r in mine) / 2**20,
            "trainable params": max(r.cost["trainable_params"] for r in mine)}
        assert row == {**row, **{k: v if v is None else pytest.approx(v) for k, v in expected.items()}}, label
        other = CUDA if meter == CPU else CPU
        assert row[f"train peak MB ({other})"] is None and row[f"eval peak MB ({other})"] is None
    for h in table.header[1:]:
        values = [v for v in columns[h][:-1] if v is not None]
        average = columns[h][-1]
        if h in ("checkpoint MB", "trainable params"):
            assert average is None  # no averages of model sizes
        else:
            assert average == pytest.approx(mean(values))
    assert any("cuda_max_allocated = torch.cuda.max_memory_allocated" in n for n in table.notes)


def test_no_cost_column_mixes_meters_and_zero_shot_shares_the_trained_meter(suite):
    records = find_records(suite.root)
    table = _tables(records)["compare_cost"]
    peak_headers = [h for h in table.header if "peak MB" in h and "RSS" not in h]
    assert sorted(peak_headers) == sorted(f"{p} peak MB ({m})" for p in ("train", "eval") for m in (CPU, CUDA))
    rows = _rows(table)
    for h in peak_headers:
        phase, meter = h.split(" peak MB (")[0], h.split("(")[1].rstrip(")")
        j = table.header.index(h) - 1
        for label, row in list(rows.items())[:-1]:
            trainer, protocol = label[:-1].split(" (")
            measured = [r.cost[f"{phase}_peak_mb"] for r in records
                        if (r.job.trainer, r.job.protocol) == (trainer, protocol) and r.status == "success"
                        and r.cost[f"{phase}_peak_method"] == meter]
            assert row[j] == (pytest.approx(max(measured)) if measured else None), (label, h)
    eval_cpu = table.header.index(f"eval peak MB ({CPU})") - 1
    train_cpu = table.header.index(f"train peak MB ({CPU})") - 1
    assert rows["ZeroshotCLIP (fewshot)"][eval_cpu] is not None and rows["CoOp (fewshot)"][eval_cpu] is not None
    assert rows["ZeroshotCLIP (fewshot)"][train_cpu] is None and rows["CoOp (fewshot)"][train_cpu] is not None
    assert "rss" not in " ".join(peak_headers)


def test_older_records_peak_is_read_by_phase_and_rss_is_never_a_tensor_peak():
    job = JobInfo(trainer="CoOp", config="c", dataset="d", seed=1, protocol="fewshot", role="fewshot")
    train = Record("success", job, {"accuracy": 80.0},
                   {"train_time_s": 5.0, "peak_mem_mb": 15.0, "peak_mem_method": CPU}, schema=1)
    evaluation = Record("success", dataclasses.replace(job, phase="eval", seed=2), {"accuracy": 70.0},
                        {"train_time_s": 0.0, "peak_mem_mb": 400.0, "peak_mem_method": "rss"}, schema=1)
    zero_shot = Record("success", dataclasses.replace(job, phase="eval", seed=3), {"accuracy": 60.0},
                       {"train_time_s": 0.0, "peak_mem_mb": 9.0, "peak_mem_method": CPU}, schema=1)
    assert memory_peaks(train) == {"train": (15.0, CPU)} and memory_peaks(zero_shot) == {"eval": (9.0, CPU)}
    assert memory_peaks(evaluation) == {} and rss_mb(evaluation) == 400.0 and rss_mb(train) is None
    numbers = cost_numbers([train, evaluation, zero_shot])
    assert numbers["peaks"] == {"train": {CPU: 15.0}, "eval": {CPU: 9.0}} and numbers["peak_rss_mb"] == 400.0


def test_labels_add_config_grid_and_task_only_when_needed():
    def rec(trainer, config, task, protocol="b2n", grid_name=""):
        return Record("success", JobInfo(trainer=trainer, config=config, task=task, protocol=protocol, role="base",
                                         grid_name=grid_name), {"accuracy": 50.0})

    methods = find_methods([rec("CoOp", "ep50", "a"), rec("CoOp", "ep10", "b"), rec("CoOp", "ep50", "c"),
                            rec("SkipTuning", "fs", "d", grid_name="START_LAYER=4"), rec("MaPLe", "m", "e"),
                            rec("CoOp", "ep50", "f", protocol="fewshot")])
    assert [(m.protocol, m.label) for m in methods] == [
        ("b2n", "CoOp/ep50 @a"), ("b2n", "CoOp/ep10"), ("b2n", "CoOp/ep50 @c"), ("b2n", "SkipTuning [START_LAYER=4]"),
        ("b2n", "MaPLe"), ("fewshot", "CoOp")]


def _csv_rows(path) -> dict[str, dict[str, str]]:
    with open(path) as f:
        return {r["method"]: r for r in csv.DictReader(f)}


def test_cli_writes_comparison_csv_that_parses_back(suite, capsys):
    assert main([suite.root]) == 0
    out = capsys.readouterr().out
    report = open(os.path.join(suite.root, "report.md")).read()
    assert report in out
    tables = {t.name: t for t in build_tables(find_records(suite.root))}
    for name in ("compare_b2n", "compare_b2n_average", "compare_fewshot", "compare_fewshot_1-shot", "compare_xd",
                 "compare_dg", "compare_cost"):
        table = tables[name]
        parsed = _csv_rows(os.path.join(suite.root, "tables", f"{name}.csv"))
        assert os.path.isfile(os.path.join(suite.root, "tables", f"{name}.tex"))
        for row in table.rows:
            for j, cell in enumerate(row[1:], start=1):
                h = table.header[j]
                mean_text = parsed[row[0]][f"{h} mean" if j in table.stat_columns else h]
                value = cell.mean if isinstance(cell, Stat) else cell
                assert (mean_text == "") == (value is None), (name, row[0], h)
                if value is not None:
                    assert float(mean_text) == value  # full precision: exact
    h = _csv_rows(os.path.join(suite.root, "tables", "compare_b2n.csv"))["CoOp"]["caltech101 H mean"]
    base, new = (mean(suite.acc("CoOp", "b2n", r, "caltech101", 16)) for r in ("base", "new"))
    assert float(h) == pytest.approx(_hm(base, new), rel=1e-12)
    # every table, comparison and per task, has its CSV and TeX
    assert sorted(os.listdir(os.path.join(suite.root, "tables"))) == sorted(
        f"{t}.{e}" for t in tables for e in ("csv", "tex"))


def test_report_opens_with_the_comparison_section(suite):
    records = find_records(suite.root)
    report = render_report(records, ["plots/fewshot.png"])
    assert report.startswith("# Results\n\n## Comparison\n")
    titles = [t.title for t in comparison_tables(find_methods(records))]
    order = ["## Comparison", *titles, "## Plots", "![fewshot](plots/fewshot.png)", "## Per task",
             "### coop_b2n: CoOp `vit_b16_ep50`, b2n", "### zeroshotclip_xd: ZeroshotCLIP `vit_b16`, xd"]
    positions = [report.index(s) for s in order]
    assert positions == sorted(positions)
    assert [t.split(" ")[0] for t in titles[:2]] == ["base-to-new", "base-to-new"]
    assert "| ZeroshotCLIP (b2n) |" in report and "- train time: mean over" in report


def _write_hand_run(root: str) -> dict[tuple, float]:
    """Hand-run ``train.py`` folders (no task, protocol and role inferred): ``CoOp/<d>/base/seed1`` trained on the
    base classes, ``CoOp/<d>/new/seed1`` evaluating it (source ``../../base/seed1``); ``CoOp/imagenet/seed1`` trained
    on all classes and ``CoOp/xd/<d>/seed1`` evaluating it on other datasets; ``ZeroshotCLIP/imagenet/seed1`` an
    eval-only run given 16 shots (zero-shot all the same: it loads no trained model)."""
    truth = {}
    for d, seed in itertools.product(B2N_DATASETS, SEEDS):
        for sub in ("base", "new"):
            acc = truth[(sub, d, seed)] = random.Random(f"{sub}{d}{seed}").uniform(50, 90)
            write_record(root, f"CoOp/{d}/{sub}/seed{seed}", acc, make_cost(f"{d}{sub}", sub == "base", CPU, 2048),
                         trainer="CoOp", config="vit_b16_ep50", dataset=d, shots=16, subsample=sub, seed=seed,
                         phase="train" if sub == "base" else "eval",
                         source="" if sub == "base" else f"../../base/seed{seed}")
    for seed in SEEDS:
        acc = truth[("source", SOURCE, seed)] = random.Random(f"in{seed}").uniform(60, 70)
        write_record(root, f"CoOp/{SOURCE}/seed{seed}", acc, make_cost(f"in{seed}", True, CPU, 2048), trainer="CoOp",
                     config="vit_b16_ep50", dataset=SOURCE, shots=16, seed=seed)
        acc = truth[("zero-shot", SOURCE, seed)] = random.Random(f"zs{seed}").uniform(50, 60)
        write_record(root, f"ZeroshotCLIP/{SOURCE}/seed{seed}", acc, make_cost(f"zs{seed}", False, CPU, 0),
                     trainer="ZeroshotCLIP", config="vit_b16", dataset=SOURCE, shots=16, seed=seed, phase="eval")
        for d in TARGETS:
            acc = truth[("target", d, seed)] = random.Random(f"t{d}{seed}").uniform(40, 90)
            write_record(root, f"CoOp/xd/{d}/seed{seed}", acc, make_cost(f"t{d}", False, CPU, 2048), trainer="CoOp",
                         config="vit_b16_ep50", dataset=d, seed=seed, phase="eval", source_dataset=SOURCE,
                         source=f"../../../{SOURCE}/seed{seed}")
    return truth


def test_hand_run_folder_gives_comparison_tables(tmp_path, capsys):
    root = str(tmp_path / "runs")
    truth = _write_hand_run(root)
    assert main([root, "--no-plots"]) == 0
    records = find_records(root)
    assert {r.job.task for r in records} == {""}
    tables = _tables(records)
    row = _rows(tables["compare_b2n"])["CoOp"]
    base = {d: mean(truth[("base", d, s)] for s in SEEDS) for d in B2N_DATASETS}
    new = {d: mean(truth[("new", d, s)] for s in SEEDS) for d in B2N_DATASETS}
    for i, d in enumerate(B2N_DATASETS):
        assert [c.mean for c in row[3 * i:3 * i + 3]] == pytest.approx([base[d], new[d], _hm(base[d], new[d])])
    b, n = mean(base.values()), mean(new.values())
    assert [c.mean for c in row[-3:]] == pytest.approx([b, n, _hm(b, n)])
    # the ImageNet training runs are the xd source and stay few-shot records (16 shots)
    xd = _rows(tables["compare_xd"])["CoOp"]
    assert xd[0].mean == pytest.approx(mean(truth[("source", SOURCE, s)] for s in SEEDS))
    assert xd[-1].mean == pytest.approx(mean(mean(truth[("target", d, s)] for s in SEEDS) for d in TARGETS))
    few = _rows(tables["compare_fewshot"])
    assert tables["compare_fewshot"].header == ["method", "zero-shot", "16-shot"]
    assert few == {"CoOp": [None, pytest.approx(xd[0].mean)],
                   "ZeroshotCLIP": [pytest.approx(mean(truth[("zero-shot", SOURCE, s)] for s in SEEDS)), None]}
    cost = _rows(tables["compare_cost"])
    assert list(cost) == ["CoOp (b2n)", "CoOp (fewshot)", "ZeroshotCLIP (fewshot)", "CoOp (xd)", "average"]
    assert cost["CoOp (xd)"][0] == len(SEEDS) * (1 + len(TARGETS))  # its evaluations and the runs they load
    report = open(os.path.join(root, "report.md")).read()
    assert "### CoOp (hand-run): CoOp `vit_b16_ep50`, b2n" in report
    assert main([str(tmp_path / "empty_dir_missing")]) == 2
    (tmp_path / "empty").mkdir()
    assert main([str(tmp_path / "empty")]) == 2
    assert "no result.json" in capsys.readouterr().err


def _overlaps(boxes) -> list[tuple[int, int]]:
    return [(i, j) for (i, a), (j, b) in itertools.combinations(enumerate(boxes), 2)
            if a.x0 < b.x1 and b.x0 < a.x1 and a.y0 < b.y1 and b.y0 < a.y1]


def test_place_labels_separates_close_labels_and_leaves_lone_ones():
    fig, ax = plt.subplots(dpi=120)
    points = [(f"Method{i} [g={i}]", 100 + 0.4 * i, 70 + 0.03 * i) for i in range(7)] + [("Far", 300.0, 90.0)]
    ax.scatter([p[1] for p in points], [p[2] for p in points])
    ax.set_xlim(50, 350)
    ax.set_ylim(60, 95)
    labels = [ax.annotate(name, (x, y), xytext=(5, 4), textcoords="offset points") for name, x, y in points]
    renderer = fig.canvas.get_renderer()
    before = [label_box(a, renderer) for a in labels]
    assert len(_overlaps(before)) >= 6  # the test is only meaningful if they start overlapping
    place_labels(fig, labels)
    after = [label_box(a, renderer) for a in labels]
    assert _overlaps(after) == []
    assert labels[-1].xyann == (5, 4)  # nothing near it: not moved
    assert [a.xyann[0] for a in labels] == [5] * len(labels)  # moved vertically only
    plt.close(fig)


def test_efficiency_panel_labels_do_not_overlap_with_a_zero_shot_line():
    fig, ax = plt.subplots(dpi=120)
    points = [(f"M{i} (b2n)", 40 + i * 0.2, 75 + 0.02 * i) for i in range(6)] + [("CoOp", 400.0, 60.0)]
    labels = scatter_labelled(ax, points, [("ZeroshotCLIP", 75.05)])
    fig.canvas.draw()
    boxes = [label_box(a, fig.canvas.get_renderer()) for a in labels]
    assert len(boxes) == 8 and _overlaps(boxes) == []
    assert ax.get_xscale() == "linear" and any(line.get_linestyle() == "--" for line in ax.get_lines())
    plt.close(fig)


def test_write_plots_has_a_memory_plot_per_meter(suite):
    records = find_records(suite.root)
    paths = write_plots(records, suite.root)
    assert paths == ["plots/fewshot.png", "plots/efficiency_time.png", f"plots/efficiency_memory_{CPU}.png",
                     f"plots/efficiency_memory_{CUDA}.png"]
    for p in paths:
        assert open(os.path.join(suite.root, p), "rb").read(8) == b"\x89PNG\r\n\x1a\n"
