"""From samples to what a reader needs: a table of medians, the ratios, and PASS/MISS.

Every number here is derived from `stats.Sample`s (and the run metrics dict), so the JSON
report's raw samples reproduce the printed table exactly. Goals are judged at N=200, or
at the largest N measured when 200 was left out (the goal's note then says so).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from hack.bench.stats import (
    Goal,
    Sample,
    fmt,
    median_ms_per_env,
    median_seconds,
    ratio,
    round_ratios,
    select,
    table,
)

APPROACHES = ("floor", "cni", "reconciler")
PHASES = ("create", "delete", "delete_gone")


def _spread(samples: Sequence[Sample], approach: str, metric: str, n: int) -> str:
    values = [s.seconds * 1000 / n for s in select(samples, approach=approach, metric=metric, n=n)]
    return f"{min(values):.2f}-{max(values):.2f}" if values else "-"


def medians_table(samples: Sequence[Sample], sizes: Sequence[int]) -> str:
    """ms per env, median over rounds (and min-max), per approach, N and phase."""
    header = ["approach", "N", "rounds"]
    for phase in PHASES:
        header += [f"{phase} ms/env", "min-max"]
    rows = []
    for approach in APPROACHES:
        for n in sizes:
            found = select(samples, approach=approach, metric="create", n=n)
            if not found:
                continue
            row = [approach, str(n), str(len(found))]
            for phase in PHASES:
                row.append(fmt(median_ms_per_env(samples, approach=approach, metric=phase, n=n)))
                row.append(_spread(samples, approach, phase, n))
            rows.append(row)
    return table(header, rows)


def noop_table(samples: Sequence[Sample], sizes: Sequence[int]) -> str:
    """The no-op reconcile against the observation floor, whole passes in ms."""
    header = [
        "N",
        "observe floor ms",
        "noop apply (cmd) ms",
        "noop in-process ms",
        "noop warm ms",
        "import ms",
        "warm/floor",
        "in-proc/floor",
        "cmd/floor",
    ]
    rows = []
    for n in sizes:
        floor = median_seconds(samples, approach="observe", metric="pass", n=n)
        if floor is None:
            continue
        cmd = median_seconds(samples, approach="reconciler", metric="noop", n=n)
        inproc = median_seconds(samples, approach="reconciler", metric="noop_inproc", n=n)
        warm = median_seconds(samples, approach="reconciler", metric="noop_warm", n=n)
        imports = median_seconds(samples, approach="reconciler", metric="import", n=n)
        rows.append(
            [
                str(n),
                fmt(_ms(floor), 1),
                fmt(_ms(cmd), 1),
                fmt(_ms(inproc), 1),
                fmt(_ms(warm), 1),
                fmt(_ms(imports), 1),
                fmt(ratio(warm, floor)),
                fmt(ratio(inproc, floor)),
                fmt(ratio(cmd, floor)),
            ]
        )
    return table(header, rows)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


def ratios_table(samples: Sequence[Sample], sizes: Sequence[int]) -> str:
    """Ratios of medians per N, with the per-round range."""
    pairs = [
        ("reconciler/floor create", ("reconciler", "create"), ("floor", "create")),
        ("cni/reconciler create", ("cni", "create"), ("reconciler", "create")),
        ("reconciler/floor delete", ("reconciler", "delete"), ("floor", "delete_gone")),
        ("cni/reconciler delete", ("cni", "delete"), ("reconciler", "delete")),
        ("noop warm/observe", ("reconciler", "noop_warm"), ("observe", "pass")),
        ("noop in-proc/observe", ("reconciler", "noop_inproc"), ("observe", "pass")),
        ("noop cmd/observe", ("reconciler", "noop"), ("observe", "pass")),
    ]
    header = ["ratio (medians)", *(f"N={n}" for n in sizes), *(f"rounds N={n}" for n in sizes)]
    rows = []
    for label, top, bottom in pairs:
        medians = [
            fmt(
                ratio(
                    median_seconds(samples, approach=top[0], metric=top[1], n=n),
                    median_seconds(samples, approach=bottom[0], metric=bottom[1], n=n),
                )
            )
            for n in sizes
        ]
        spreads = []
        for n in sizes:
            per_round = round_ratios(samples, numerator=top, denominator=bottom, n=n)
            spreads.append(f"{min(per_round):.2f}-{max(per_round):.2f}" if per_round else "-")
        rows.append([label, *medians, *spreads])
    return table(header, rows)


def goals(
    samples: Sequence[Sample],
    sizes: Sequence[int],
    *,
    noop_checks: Sequence[dict[str, Any]],
    run_metrics: dict[str, Any] | None,
) -> list[Goal]:
    """The issue's goals, measured in this run."""
    big = 200 if 200 in sizes else max(sizes)
    mid = 50 if 50 in sizes else None
    at_big = "" if big == 200 else f"measured at N={big} (200 not run)"

    def med(approach: str, metric: str, n: int | None) -> float | None:
        if n is None:
            return None
        return median_seconds(samples, approach=approach, metric=metric, n=n)

    def per_env(approach: str, metric: str, n: int) -> float | None:
        return median_ms_per_env(samples, approach=approach, metric=metric, n=n)

    dirty: float | None = None
    if noop_checks:
        dirty = float(
            sum(
                1
                for c in noop_checks
                if not (c.get("noop_state_unchanged") and c.get("noop_netlink_changes") == 0)
            )
        )
    found = [
        Goal(
            "apply N=200 / ip-batch floor (whole command)",
            ratio(med("reconciler", "create", big), med("floor", "create", big)),
            "<=",
            1.5,
            note=at_big,
        ),
        Goal(
            "apply N=50 / ip-batch floor (whole command)",
            ratio(med("reconciler", "create", mid), med("floor", "create", mid)),
            "<=",
            2.5,
        ),
        Goal(
            "CNI create / apply, per env",
            ratio(med("cni", "create", big), med("reconciler", "create", big)),
            ">=",
            4.0,
            note=at_big,
        ),
        Goal(
            "destroy N=200, ms per env",
            per_env("reconciler", "delete", big),
            "<=",
            2.0,
            unit="ms",
            note=at_big,
        ),
        Goal(
            "CNI DEL / destroy, per env",
            ratio(med("cni", "delete", big), med("reconciler", "delete", big)),
            ">=",
            15.0,
            note=at_big,
        ),
        Goal(
            "no-op reconcile / observation floor (warm, as a resync)",
            ratio(med("reconciler", "noop_warm", big), med("observe", "pass", big)),
            "<=",
            2.0,
            note=(at_big + " " if at_big else "")
            + "first run in a fresh process and whole command: see the no-op table",
        ),
        Goal(
            "no-op reconcile writes (state file, netlink notifications)",
            dirty,
            "<=",
            0.0,
            unit="trials",
            note=f"of {len(noop_checks)}: state serial/mtime/events log or rtnetlink changed",
        ),
    ]
    metrics = run_metrics or {}
    found += [
        Goal(
            "run: manifest -> Ready, median",
            _scaled(metrics.get("ready_median_s"), 1000),
            "<=",
            100.0,
            unit="ms",
            note="Ready in the state file; kernel-live median "
            f"{fmt(_scaled(metrics.get('live_median_s'), 1000), 1)} ms",
        ),
        Goal(
            "run: idle CPU with 100 envs",
            metrics.get("idle_cpu_pct"),
            "<=",
            1.0,
            unit="% of a CPU",
        ),
        Goal("run: RSS at 200 envs", metrics.get("rss_mib"), "<=", 100.0, unit="MiB"),
    ]
    return found


def _scaled(value: float | None, factor: float) -> float | None:
    return None if value is None else value * factor


def goals_table(found: Sequence[Goal]) -> str:
    """Goal, measured, bound, verdict."""
    rows = [
        [g.name, f"{fmt(g.measured)} {g.unit}", f"{g.op} {g.bound:g} {g.unit}", g.verdict, g.note]
        for g in found
    ]
    return table(["goal", "measured", "bound", "verdict", "note"], rows)


def profile_text(profile: dict[str, Any], *, what: str) -> str:
    """The profile's top frames: main thread (pyinstrument) and netlink worker (cProfile)."""
    lines = [
        f"profile of {what} N={profile['n']}: wall {profile['wall_s']:.2f} s under the "
        f"profilers; netlink worker thread busy {profile['worker_total_s']:.2f} s"
    ]
    sections = (
        ("top_cumulative", "main thread (pyinstrument), by cumulative time"),
        ("top_own", "main thread (pyinstrument), by own time"),
        ("worker_top_cumulative", "netlink worker (cProfile), by cumulative time"),
        ("worker_top_own", "netlink worker (cProfile), by own time"),
    )
    for key, label in sections:
        rows = [
            [
                f["function"],
                f["where"],
                str(f["calls"]) if f["calls"] >= 0 else "-",  # pyinstrument counts no calls
                f"{f['cumulative_s']:.3f}",
                f"{f['own_s']:.3f}",
            ]
            for f in profile[key]
        ]
        lines += ["", f"top {len(rows)} frames, {label}:"]
        lines.append(table(["function", "where", "calls", "cum s", "own s"], rows))
    lines.append(f"\ncall tree: {profile['text']}; session: {profile['session']}")
    return "\n".join(lines)
