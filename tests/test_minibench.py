"""MiniBench end to end: the default suite (the shipped ``configs.py``) and the story its report tells.

The suite is run into a temporary output folder with the same data and mini CLIP the demo uses, so these tests check
what the README's first command prints: every job succeeds; every trained method beats zero-shot on the base classes;
the few-shot curves of CoOp and Skip Tuning rise strictly from 1 to 16 shots; Skip Tuning's training peak memory is
below full fine-tuning's and the Res-Tuning bypass's below ResAdapter's (one meter, deterministic on a CPU); the report
names every method. Times are reported by the suite, never asserted here (a loaded machine would make that flaky).
"""

from __future__ import annotations

import os
from statistics import mean

import pytest
from conftest import REPO

import parallel_runner
from vltune.results.compare import cost_numbers
from vltune.results.record import find_records
from vltune.results.report import render_report
from vltune.runner.jobs import expand
from vltune.runner.schema import load_experiments

SHIPPED = load_experiments(str(REPO / "configs.py"), str(REPO))
LEARNERS = sorted({t.trainer for t in SHIPPED.tasks.values() if not t.eval_only})
FAMILIES = {"ZeroshotCLIP", "CoOp", "CLIPAdapter", "FinetuneCLIP", "SkipTuning", "ResAdapter", "ResTuningBypass"}
PROTOCOLS = ("b2n", "fewshot", "xd")


# The suite run takes about 10 minutes on 2 cores: every test that reads it is marked slow (`make test-fast` skips it).
@pytest.fixture(scope="module")
def suite(minibench, tmp_path_factory):
    """The shipped configs.py suite, run by ``parallel_runner.py`` into a temporary output folder, as ``make demo``
    runs it: the default (warm) executor, two jobs at a time with one thread each, so the numbers are the demo's."""
    root, weights = minibench
    out = tmp_path_factory.mktemp("suite")
    config = out / "configs.py"
    config.write_text(f"exec(open({str(REPO / 'configs.py')!r}).read())\n"
                      f"base.update(data=dict(root={root!r}), output=dict(root={str(out / 'output')!r}),\n"
                      f"            model=dict(base['model'], weights={weights!r}), prepare='')\n")
    assert parallel_runner.main(["--config", str(config), "--plain", "--no-mail"]) == 0
    return find_records(str(out / "output")), str(out / "output")


def _records(rows, trainer: str, protocol: str, **match):
    return [r for r in rows if r.job.trainer == trainer and r.job.protocol == protocol
            and all(getattr(r.job, k) == v for k, v in match.items())]


def _acc(rows, trainer: str, protocol: str, **match) -> list[float]:
    return [r.metrics["accuracy"] for r in _records(rows, trainer, protocol, **match)]


def _curve(rows, trainer: str, shots: list[int]) -> list[float]:
    """The report's few-shot average: per K, the mean over datasets of the per-dataset seed means."""
    datasets = sorted({r.job.dataset for r in _records(rows, trainer, "fewshot")})
    return [mean(mean(_acc(rows, trainer, "fewshot", shots=k, dataset=d)) for d in datasets) for k in shots]


def test_the_default_suite_covers_every_family_on_every_protocol():
    tasks = SHIPPED.tasks.values()
    assert FAMILIES <= {t.trainer for t in tasks}
    prompt_learners = {"CoOp", "CoCoOp", "KgCoOp", "ProGrad", "MaPLe", "PromptSRC", "TCP", "CoPrompt"}
    assert len(prompt_learners & {t.trainer for t in tasks}) >= 3
    for trainer in {t.trainer for t in tasks}:
        assert {t.protocol for t in tasks if t.trainer == trainer} == set(PROTOCOLS), trainer
    xd = [t for t in tasks if t.protocol == "xd"]
    assert all(t.variants for t in xd)  # domain generalisation rides on every cross-dataset task


@pytest.mark.slow
def test_every_job_of_the_default_suite_succeeds(suite):
    rows, _ = suite
    failed = [(r.job.task, r.job.role, r.job.dataset) for r in rows if r.status != "success"]
    assert not failed
    assert len(rows) == len(expand(SHIPPED, str(REPO), hashes=False))  # every job left a record


@pytest.mark.slow
def test_mini_clip_zero_shot_is_well_above_chance_where_it_knows_the_rendition(suite):
    """The pretraining renditions (MiniUnion, its new sample V2, Digits, MiniTextures); MiniShapes and MiniObjects
    are drawn otherwise on purpose (see vltune.data.minibench)."""
    rows, _ = suite
    known = ("MiniUnion", "MiniUnionV2", "Digits", "MiniTextures")
    checked = [r for r in rows if r.job.trainer == "ZeroshotCLIP" and r.job.protocol in ("fewshot", "xd")
               and r.job.dataset in known]  # all classes
    assert {r.job.dataset for r in checked} == set(known)
    for r in checked:
        assert r.metrics["accuracy"] > 100 / len(r.metrics["per_class"]) + 20, (r.job.dataset, r.metrics["accuracy"])


@pytest.mark.slow
@pytest.mark.parametrize("trainer", LEARNERS)
def test_every_trained_method_beats_zero_shot_on_the_base_classes(suite, trainer):
    rows, _ = suite
    zs, learned = _acc(rows, "ZeroshotCLIP", "b2n", role="base"), _acc(rows, trainer, "b2n", role="base")
    assert len(learned) == len(zs) == 4
    assert mean(learned) > mean(zs) + 1, (trainer, learned, zs)


@pytest.mark.slow
@pytest.mark.parametrize("trainer", ["CoOp", "SkipTuning"])
def test_few_shot_accuracy_rises_strictly_from_1_to_16_shots(suite, trainer):
    rows, _ = suite
    shots = next(t.shots for t in SHIPPED.tasks.values() if t.trainer == trainer and t.protocol == "fewshot")
    assert shots == [1, 2, 4, 8, 16]
    curve = _curve(rows, trainer, shots)
    assert all(b > a for a, b in zip(curve, curve[1:])), curve
    assert curve[0] > mean(_acc(rows, "ZeroshotCLIP", "fewshot")), curve  # one shot already beats zero-shot


@pytest.mark.slow
@pytest.mark.parametrize("lighter, heavier", [("SkipTuning", "FinetuneCLIP"), ("ResTuningBypass", "ResAdapter")])
def test_training_peak_memory_orders_as_the_papers_claim(suite, lighter, heavier):
    rows, _ = suite
    peaks = {}
    for trainer in (lighter, heavier):
        numbers = cost_numbers(_records(rows, trainer, "b2n"))
        assert list(numbers["peaks"]["train"]) == ["cpu_profiler_tensor_bytes"], numbers["peaks"]  # one meter
        peaks[trainer] = numbers["peaks"]["train"]["cpu_profiler_tensor_bytes"]
    assert peaks[lighter] < peaks[heavier], peaks


@pytest.mark.slow
def test_report_names_every_method_in_every_protocol_and_the_cost_table(suite):
    rows, out = suite
    report = render_report(rows)
    comparison = report.split("## Per task")[0]
    for trainer in {t.trainer for t in SHIPPED.tasks.values()}:
        for protocol in ("b2n", "fewshot", "xd"):
            assert f"| {trainer} ({protocol}) |" in comparison, (trainer, protocol)  # its cost row
        assert f"| {trainer} |" in comparison, trainer  # its accuracy rows
    for heading in ("## Comparison", "average_xd", "average_dg", "cost per method"):
        assert heading in report
    written = open(os.path.join(out, "report.md")).read()  # the runner's report: the same tables, plus plots
    assert written.split("## Plots")[0].strip() == report.split("## Per task")[0].strip()
