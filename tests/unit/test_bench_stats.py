"""The benchmark's arithmetic (hack/bench/stats.py): medians, per-env figures, ratios, goals.

Pure functions only; the kernel-facing parts of the benchmark are exercised by running it.
"""

from __future__ import annotations

import pytest

from hack.bench.stats import (
    Goal,
    Sample,
    fmt,
    median,
    median_ms_per_env,
    median_seconds,
    per_env_ms,
    ratio,
    round_ratios,
    select,
    table,
)


def _samples() -> list[Sample]:
    return [
        Sample("floor", "create", 200, 1, 0.60),
        Sample("floor", "create", 200, 2, 0.80),
        Sample("floor", "create", 200, 3, 0.70),
        Sample("reconciler", "create", 200, 2, 1.60),
        Sample("reconciler", "create", 200, 1, 0.90),
        Sample("reconciler", "create", 200, 3, 1.40),
        Sample("reconciler", "create", 50, 1, 0.50),
    ]


def test_median_of_nothing_is_none() -> None:
    assert median([]) is None
    assert median([3.0, 1.0, 2.0]) == 2.0
    assert median([1.0, 2.0]) == 1.5


def test_per_env_ms_converts_a_total_in_seconds() -> None:
    assert per_env_ms(0.6, 200) == pytest.approx(3.0)
    assert per_env_ms(None, 200) is None
    assert per_env_ms(1.0, 0) is None


def test_ratio_is_none_when_it_cannot_be_computed() -> None:
    assert ratio(3.0, 2.0) == 1.5
    assert ratio(None, 2.0) is None
    assert ratio(3.0, None) is None
    assert ratio(3.0, 0.0) is None


def test_select_filters_and_orders_by_round() -> None:
    picked = select(_samples(), approach="reconciler", metric="create", n=200)
    assert [s.round for s in picked] == [1, 2, 3]
    assert len(select(_samples(), approach="reconciler", metric="create")) == 4
    assert select(_samples(), approach="cni", metric="create", n=200) == []


def test_medians_are_over_rounds_of_one_size() -> None:
    samples = _samples()
    assert median_seconds(samples, approach="floor", metric="create", n=200) == 0.70
    assert median_ms_per_env(
        samples, approach="reconciler", metric="create", n=200
    ) == pytest.approx(7.0)
    assert median_seconds(samples, approach="floor", metric="create", n=50) is None


def test_round_ratios_pair_samples_of_the_same_round_only() -> None:
    samples = [*_samples(), Sample("floor", "create", 200, 4, 1.0)]
    found = round_ratios(
        samples, numerator=("reconciler", "create"), denominator=("floor", "create"), n=200
    )
    assert found == pytest.approx([0.90 / 0.60, 1.60 / 0.80, 1.40 / 0.70])


@pytest.mark.parametrize(
    ("measured", "op", "bound", "verdict"),
    [
        (1.4, "<=", 1.5, "PASS"),
        (1.5, "<=", 1.5, "PASS"),
        (1.6, "<=", 1.5, "MISS"),
        (4.0, ">=", 4.0, "PASS"),
        (3.9, ">=", 4.0, "MISS"),
        (None, "<=", 1.5, "n/a"),
    ],
)
def test_goal_verdicts(measured: float | None, op: str, bound: float, verdict: str) -> None:
    goal = Goal("g", measured, op, bound)  # type: ignore[arg-type]
    assert goal.verdict == verdict
    assert goal.to_json()["verdict"] == verdict


def test_sample_round_trips_to_json() -> None:
    sample = Sample("cni", "delete", 10, 2, 0.25)
    assert sample.to_json() == {
        "approach": "cni",
        "metric": "delete",
        "n": 10,
        "round": 2,
        "seconds": 0.25,
    }


def test_table_pads_columns_and_fmt_marks_missing_values() -> None:
    text = table(["name", "value"], [["a", fmt(1.234)], ["longer", fmt(None)]])
    lines = text.splitlines()
    assert lines[0] == "name    value"
    assert lines[2] == "a        1.23"
    assert lines[3] == "longer      -"
    assert {len(line) for line in lines} == {13}
