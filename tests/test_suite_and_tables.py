"""Task expansion into jobs (per protocol) and the tables built from records, on hand-made records."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from conftest import REPO

from vltune.results.tables import b2n_summary, b2n_table, fewshot_table, harmonic_mean, xd_tables
from vltune.runner.suite import expand_task

BASE = dict(data=dict(root="D"), model=dict(backbone="vltune-tiny", weights="W.pt"), output=dict(root="O"))


def test_b2n_averages_seeds_before_the_harmonic_mean():
    base = {"a": [80.0, 90.0], "b": [60.0]}
    new = {"a": [60.0, 70.0], "b": [20.0]}
    s = b2n_summary(base, new)
    assert s["a"] == pytest.approx((85.0, 65.0, harmonic_mean(85.0, 65.0)))
    assert s["a"][2] != pytest.approx((harmonic_mean(80, 60) + harmonic_mean(90, 70)) / 2)  # not the mean of H
    assert s["average"] == pytest.approx((72.5, 42.5, harmonic_mean(72.5, 42.5)))
    assert s["average"][2] != pytest.approx((s["a"][2] + s["b"][2]) / 2)
    # the CoCoOp paper's CoOp row (protocols_and_numbers.md §2): 82.69 / 63.22 → 71.66
    assert harmonic_mean(82.69, 63.22) == pytest.approx(71.66, abs=0.005)
    assert harmonic_mean(0.0, 50.0) == 0.0


def _row(role: str, dataset: str, acc: float | None, shots: int = 16, seed: int = 1, status: str = "success"):
    job = SimpleNamespace(task="t", protocol="b2n", role=role, dataset=dataset, shots=shots, seed=seed)
    record = None if acc is None else {"status": status, "metrics": {"accuracy": acc}}
    return job, record


def test_b2n_table_skips_failed_runs_and_marks_missing_ones():
    rows = [_row("base", "x", 80.0), _row("new", "x", 60.0), _row("base", "y", 90.0),
            _row("new", "y", 10.0, status="failed")]
    table = b2n_table(rows)
    assert "| x | 80.00 | 60.00 | 68.57 |" in table
    assert "| y | - | - | - |" in table
    assert "| **average** | 80.00 | 60.00 | 68.57 |" in table


def test_fewshot_and_xd_tables():
    rows = [_row("fewshot", d, acc, shots=k, seed=s) for d, k, s, acc in
            [("x", 1, 1, 50.0), ("x", 1, 2, 60.0), ("x", 4, 1, 70.0), ("y", 1, 1, 30.0), ("y", 4, 1, 90.0)]]
    table = fewshot_table(rows)
    assert "| dataset | 1 shots | 4 shots |" in table and "| x | 55.00 | 70.00 |" in table
    assert "| **average** | 42.50 | 80.00 |" in table
    rows = [_row("source", "union", 70.0), _row("target", "a", 40.0), _row("target", "b", 60.0),
            _row("variant", "v1", 20.0), _row("variant", "v2", 30.0)]
    xd, dg = xd_tables(rows)
    assert "| union | a | b | average_xd |" in xd and "| 70.00 | 40.00 | 60.00 | 50.00 |" in xd
    assert "| 20.00 | 30.00 | 25.00 |" in dg


def test_expansion_per_protocol_and_dependencies():
    b2n = expand_task("coop_b2n", dict(trainer="CoOp", config="tiny_ep10", protocol="b2n", datasets=["digits"],
                                       seeds=[1, 2], shots=16), BASE, str(REPO))
    assert [(j.role, j.seed) for j in b2n] == [("base", 1), ("new", 1), ("base", 2), ("new", 2)]
    train, new = b2n[0], b2n[1]
    assert "--eval-only" not in train.argv and train.argv[train.argv.index("DATASET.SUBSAMPLE_CLASSES") + 1] == "base"
    assert new.depends_on == train.out and new.argv[new.argv.index("--model-dir") + 1] == train.out
    assert "--eval-only" in new.argv and new.argv[new.argv.index("DATASET.SUBSAMPLE_CLASSES") + 1] == "new"
    assert "train_base" in train.out and "test_new" in new.out and "shots16" in train.out

    few = expand_task("coop_few", dict(trainer="CoOp", config="tiny_ep10", protocol="fewshot", datasets=["digits"],
                                       shots=[1, 2, 4]), BASE, str(REPO))
    assert [j.shots for j in few] == [1, 2, 4] and all(f"shots{j.shots}" in j.out for j in few)

    xd = expand_task("coop_xd", dict(trainer="CoOp", config="tiny_ep10", protocol="xd", source="digits",
                                     datasets=["oxford_pets"], variants=["imagenet_a"], shots=16), BASE, str(REPO))
    assert [j.role for j in xd] == ["source", "target", "variant"]
    assert all(j.depends_on == xd[0].out for j in xd[1:])

    zs = expand_task("zs", dict(trainer="ZeroshotCLIP", config="tiny", protocol="b2n", datasets=["digits"],
                                eval_only=True), BASE, str(REPO))
    assert all("--eval-only" in j.argv and not j.depends_on for j in zs)


def test_bad_tasks_fail_naming_the_problem():
    with pytest.raises(ValueError, match="unknown keys \\['shot'\\]"):
        expand_task("t", dict(trainer="CoOp", config="tiny_ep10", protocol="b2n", datasets=["digits"], shot=4),
                    BASE, str(REPO))
    with pytest.raises(ValueError, match="protocol 'b2m'"):
        expand_task("t", dict(trainer="CoOp", config="tiny_ep10", protocol="b2m", datasets=["digits"]), BASE,
                    str(REPO))
    with pytest.raises(FileNotFoundError, match="configs/datasets/digit.yaml"):
        expand_task("t", dict(trainer="CoOp", config="tiny_ep10", protocol="b2n", datasets=["digit"]), BASE,
                    str(REPO))
