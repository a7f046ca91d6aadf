"""Samples, medians, ratios and goals: the pure arithmetic of the benchmark.

A `Sample` is one timed run of one approach (floor, cni, reconciler, ...) doing one thing
(create, delete, noop, ...) for N environments in one round. Everything printed is
derived from the samples: the median over rounds per (approach, metric, N), expressed in
milliseconds per environment, and ratios of such medians. Ratios are taken between
approaches measured side by side in the same run, because absolute times on a shared
2-vCPU machine drift by tens of percent between minutes; ratios drift much less.

A `Goal` is one line of the issue ("apply of 200 at most 1.5x the floor"): a measured
value, a bound and a direction; its verdict is PASS, MISS, or n/a when the run did not
measure it (a size left out, `--run-metrics` not given).
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal


@dataclass(frozen=True)
class Sample:
    """One timed run: `seconds` for all `n` environments (or one pass, for observers)."""

    approach: str
    metric: str
    n: int
    round: int
    seconds: float

    def to_json(self) -> dict[str, Any]:
        """A plain dict for the JSON report."""
        return asdict(self)


def median(values: Iterable[float]) -> float | None:
    """The median, or None for no values."""
    data = list(values)
    return statistics.median(data) if data else None


def per_env_ms(seconds: float | None, n: int) -> float | None:
    """Total seconds for `n` environments -> milliseconds per environment."""
    if seconds is None or n <= 0:
        return None
    return seconds * 1000.0 / n


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """numerator / denominator, or None when either is missing or the denominator is 0."""
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


def select(
    samples: Iterable[Sample], *, approach: str, metric: str, n: int | None = None
) -> list[Sample]:
    """The samples of one (approach, metric[, n]), in round order."""
    return sorted(
        (
            s
            for s in samples
            if s.approach == approach and s.metric == metric and (n is None or s.n == n)
        ),
        key=lambda s: s.round,
    )


def median_seconds(
    samples: Iterable[Sample], *, approach: str, metric: str, n: int
) -> float | None:
    """Median over rounds of one (approach, metric, n), in seconds."""
    return median(s.seconds for s in select(samples, approach=approach, metric=metric, n=n))


def median_ms_per_env(
    samples: Iterable[Sample], *, approach: str, metric: str, n: int
) -> float | None:
    """Median over rounds of one (approach, metric, n), in ms per environment."""
    return per_env_ms(median_seconds(samples, approach=approach, metric=metric, n=n), n)


def round_ratios(
    samples: Sequence[Sample],
    *,
    numerator: tuple[str, str],
    denominator: tuple[str, str],
    n: int,
) -> list[float]:
    """The ratio within each round that measured both (approach, metric) pairs at `n`.

    Shows how stable a ratio of medians is: pairs from one round ran minutes apart at
    most, so they share the machine's mood of the moment.
    """
    top = {
        s.round: s.seconds for s in select(samples, approach=numerator[0], metric=numerator[1], n=n)
    }
    bottom = {
        s.round: s.seconds
        for s in select(samples, approach=denominator[0], metric=denominator[1], n=n)
    }
    found = (ratio(top[r], bottom[r]) for r in sorted(top.keys() & bottom.keys()))
    return [value for value in found if value is not None]


Verdict = Literal["PASS", "MISS", "n/a"]


@dataclass(frozen=True)
class Goal:
    """One goal of the issue: `measured` must be `op` `bound` (e.g. <= 1.5)."""

    name: str
    measured: float | None
    op: Literal["<=", ">="]
    bound: float
    unit: str = "x"
    note: str = ""

    @property
    def verdict(self) -> Verdict:
        """PASS or MISS; n/a when nothing was measured."""
        if self.measured is None:
            return "n/a"
        ok = self.measured <= self.bound if self.op == "<=" else self.measured >= self.bound
        return "PASS" if ok else "MISS"

    def to_json(self) -> dict[str, Any]:
        """A plain dict (with the verdict) for the JSON report."""
        return {**asdict(self), "verdict": self.verdict}


def fmt(value: float | None, digits: int = 2) -> str:
    """A number for a table cell; "-" when missing."""
    if value is None:
        return "-"
    return f"{value:.{digits}f}"


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A plain-text table, columns padded to their widest cell, first column left-aligned."""
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: Sequence[str]) -> str:
        out = [str(cells[0]).ljust(widths[0])]
        out += [str(cell).rjust(width) for cell, width in zip(cells[1:], widths[1:], strict=True)]
        return "  ".join(out).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(header), rule, *(line(row) for row in rows)])
