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
from conftest import REPO

import parallel_runner
from vltune.results.record import find_records
from vltune.results.report import render_report
from vltune.runner.jobs import expand
from vltune.runner.schema import load_experiments

FEWSHOT_TOLERANCE = 2.0  # points a larger K may lose to the K before it on the dataset average (one seed is noisy)


@pytest.fixture(scope="module")
def suite(minibench, tmp_path_factory):
    """The shipped configs.py suite, run by ``parallel_runner.py`` into a temporary output folder.

    Jobs run in-process (``--debug``) to spare 58 interpreter start-ups; the subprocess executor is covered by
    test_runner.py and test_runner_minibench.py.
    """
    root, weights = minibench
    out = tmp_path_factory.mktemp("suite")
    config = out / "configs.py"
    config.write_text(f"exec(open({str(REPO / 'configs.py')!r}).read())\n"
                      f"base.update(data=dict(root={root!r}), output=dict(root={str(out / 'output')!r}),\n"
                      f"            model=dict(base['model'], weights={weights!r}), prepare='')\n")
    assert parallel_runner.main(["--config", str(config), "--debug", "--plain"]) == 0
    experiments = load_experiments(str(REPO / "configs.py"), str(REPO))
    return experiments, find_records(str(out / "output")), str(out / "output")


def _acc(rows, task: str, **match) -> list[float]:
    return [r.metrics["accuracy"] for r in rows
            if r.job.task == task and all(getattr(r.job, k) == v for k, v in match.items())]


def test_every_job_of_the_default_suite_succeeds(suite):
    experiments, rows, _ = suite
    failed = [(r.job.task, r.job.role, r.job.dataset) for r in rows if r.status != "success"]
    assert not failed
    assert len(rows) == len(expand(experiments, str(REPO), hashes=False))  # every job left a record


def test_mini_clip_zero_shot_is_well_above_chance_on_every_mini_dataset(suite):
    _, rows, _ = suite
    for r in rows:
        if r.job.task in ("zs_fewshot", "zs_xd"):  # all classes of every mini dataset, source and variants included
            n_classes = len(r.metrics["per_class"])
            assert r.metrics["accuracy"] > 100 / n_classes + 20, (r.job.dataset, r.metrics["accuracy"])


def test_coop_16_shot_base_accuracy_beats_zero_shot(suite):
    _, rows, _ = suite
    zs, coop = _acc(rows, "zs_b2n", role="base"), _acc(rows, "coop_b2n", role="base")
    assert len(zs) == len(coop) == 4
    assert mean(coop) > mean(zs) + 1, (coop, zs)


def test_few_shot_accuracy_grows_with_shots_on_average(suite):
    experiments, rows, _ = suite
    shots = experiments.tasks["coop_fewshot"].shots
    curve = [mean(_acc(rows, "coop_fewshot", shots=k)) for k in shots]
    assert all(b >= a - FEWSHOT_TOLERANCE for a, b in zip(curve, curve[1:])), curve
    assert curve[-1] > curve[0], curve
    assert curve[0] > mean(_acc(rows, "zs_fewshot")) + 1, curve  # even one shot beats zero-shot


def test_report_has_every_protocol_table(suite):
    _, rows, out = suite
    report = render_report(rows)
    for heading in ("## Comparison", "coop_b2n", "coop_fewshot", "coop_xd", "average_xd", "average_dg",
                    "cost per method", "**average**"):
        assert heading in report
    assert report.index("## Comparison") < report.index("coop_b2n")  # the comparison opens the report
    written = open(os.path.join(out, "report.md")).read()  # the runner's report: the same tables, plus plots
    assert written.split("## Plots")[0].strip() == report.split("## Per task")[0].strip()
    assert os.path.isdir(out)
