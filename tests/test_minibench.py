"""MiniBench end to end: the mini CLIP's zero-shot accuracy, and the default suite's protocols on it.

The suite below is the shipped ``configs.py`` (every protocol, ZeroshotCLIP and CoOp) run into a temporary output
folder with the same data and mini CLIP the demo uses, so these tests check the numbers the README's first command
prints: zero-shot well above chance everywhere, CoOp above zero-shot on the base classes, and few-shot accuracy
growing with the number of shots.
"""

from __future__ import annotations

import os
from statistics import mean

import pytest
from conftest import CACHE, REPO, _source_key

from vltune.results.tables import collect, render_report
from vltune.runner.suite import expand_pipeline, load_experiments, run_inline

FEWSHOT_TOLERANCE = 2.0  # points a larger K may lose to the K before it on the dataset average (one seed is noisy)


@pytest.fixture(scope="session")
def minibench(tmp_path_factory):
    """(data root, mini CLIP weights), generated and pretrained once, cached by the code that makes them."""
    from vltune.clip.pretrain import build_minibench_clip
    from vltune.data.minibench import write_minibench

    key = _source_key("vltune/data/minibench.py", "vltune/data/mini_render.py", "vltune/data/synthetic.py")
    root = str(CACHE / f"minibench-{key}")
    folders = write_minibench(root)
    weights = CACHE / f"minibench-clip-{_source_key('vltune/clip/pretrain.py', extra=key)}.pt"
    if not weights.exists():
        build_minibench_clip(folders, str(weights))
    return root, str(weights)


@pytest.fixture(scope="module")
def suite(minibench, tmp_path_factory):
    """The shipped configs.py suite, run into a temporary output folder."""
    root, weights = minibench
    experiments = load_experiments(str(REPO / "configs.py"))
    out = str(tmp_path_factory.mktemp("suite"))
    experiments["base"] = {**experiments["base"], "data": {"root": root},
                           "model": {**experiments["base"]["model"], "weights": weights}, "output": {"root": out}}
    rows = run_inline(expand_pipeline(experiments, str(REPO)))
    return experiments, rows, out


def _acc(rows, task: str, **match) -> list[float]:
    return [r["metrics"]["accuracy"] for j, r in rows
            if j.task == task and all(getattr(j, k) == v for k, v in match.items())]


def test_every_job_of_the_default_suite_succeeds(suite):
    _, rows, out = suite
    failed = [(j.task, j.role, j.dataset) for j, r in rows if not r or r["status"] != "success"]
    assert not failed
    assert len(rows) == len(collect(out))  # job.json + result.json on disk rebuild the same rows


def test_mini_clip_zero_shot_is_well_above_chance_on_every_mini_dataset(suite):
    _, rows, _ = suite
    for j, r in rows:
        if j.task in ("zs_fewshot", "zs_xd"):  # all classes of every mini dataset, source and variants included
            n_classes = len(r["metrics"]["per_class"])
            assert r["metrics"]["accuracy"] > 100 / n_classes + 20, (j.dataset, r["metrics"]["accuracy"])


def test_coop_16_shot_base_accuracy_beats_zero_shot(suite):
    _, rows, _ = suite
    zs, coop = _acc(rows, "zs_b2n", role="base"), _acc(rows, "coop_b2n", role="base")
    assert len(zs) == len(coop) == 4
    assert mean(coop) > mean(zs) + 1, (coop, zs)


def test_few_shot_accuracy_grows_with_shots_on_average(suite):
    experiments, rows, _ = suite
    shots = experiments["coop_fewshot"]["shots"]
    curve = [mean(_acc(rows, "coop_fewshot", shots=k)) for k in shots]
    assert all(b >= a - FEWSHOT_TOLERANCE for a, b in zip(curve, curve[1:])), curve
    assert curve[-1] > curve[0], curve
    assert curve[0] > mean(_acc(rows, "zs_fewshot")) + 1, curve  # even one shot beats zero-shot


def test_report_has_every_protocol_table(suite):
    _, rows, out = suite
    report = render_report(rows)
    for heading in ("coop_b2n", "coop_fewshot", "coop_xd", "average_xd", "average_dg", "## Cost", "**average**"):
        assert heading in report
    assert render_report(collect(out)).count("|") == report.count("|")
    assert os.path.isdir(out)
