"""The table conventions on hand-made records: HM of seed means, averages, failures shown as "-"."""

from __future__ import annotations

import pytest

from vltune.results.record import JobInfo, Record
from vltune.results.tables import b2n_summary, b2n_table, fewshot_table, harmonic_mean, xd_tables


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


def _row(role: str, dataset: str, acc: float, shots: int = 16, seed: int = 1, status: str = "success") -> Record:
    job = JobInfo(task="t", protocol="b2n", role=role, dataset=dataset, shots=shots, seed=seed)
    return Record(status=status, job=job, metrics={"accuracy": acc})


def test_b2n_table_skips_failed_runs_and_marks_missing_ones():
    rows = [_row("base", "x", 80.0), _row("new", "x", 60.0), _row("base", "y", 90.0),
            _row("new", "y", 10.0, status="failed"), _row("base", "x", 84.0, seed=2), _row("new", "x", 66.0, seed=2)]
    table = b2n_table(rows).to_markdown()
    assert "| dataset | base s1 | new s1 | H s1 | base s2 | new s2 | H s2 | base | new | H |" in table
    # x: base 80, 84 -> 82 ± 2, new 60, 66 -> 63 ± 3, H = HM(82, 63) = 71.26; per-seed H 68.57 and 73.92 -> std 2.67
    assert "| x | 80.00 | 60.00 | 68.57 | 84.00 | 66.00 | 73.92 | 82.00 ± 2.00 | 63.00 ± 3.00 | 71.26 ± 2.67 |" \
        in table
    assert "| y | 90.00 | - | - | - | - | - | - | - | - |" in table  # no new accuracy: out of the average
    assert "| **average** | 80.00 | 60.00 | 68.57 | 84.00 | 66.00 | 73.92 | 82.00 ± 2.00 |" in table


def test_fewshot_and_xd_tables():
    rows = [_row("fewshot", d, acc, shots=k, seed=s) for d, k, s, acc in
            [("x", 1, 1, 50.0), ("x", 1, 2, 60.0), ("x", 4, 1, 70.0), ("y", 1, 1, 30.0), ("y", 4, 1, 90.0),
             ("y", 8, 1, 95.0)]]
    table = fewshot_table(rows).to_markdown()
    assert "| dataset | 1-shot | 4-shot | 8-shot |" in table and "| x | 55.00 ± 5.00 | 70.00 | - |" in table
    assert "| **average** | 42.50 | 80.00 | - |" in table  # x has no 8-shot result: no 8-shot average
    rows = [_row("source", "union", 70.0), _row("target", "a", 40.0), _row("target", "b", 60.0),
            _row("variant", "v1", 20.0), _row("variant", "v2", 30.0)]
    xd, dg = (t.to_markdown() for t in xd_tables(rows))
    assert "| seed | union | a | b | average_xd |" in xd and "| **mean** | 70.00 | 40.00 | 60.00 | 50.00 |" in xd
    assert "| seed 1 | 20.00 | 30.00 | 25.00 |" in dg
