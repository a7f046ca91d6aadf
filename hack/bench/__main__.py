"""Entry point: `hack/bench.sh [OPTIONS]` (runs `python -m hack.bench` in the sandbox).

Rounds are interleaved: round 1 runs every size with every approach, then round 2 again,
and so on, each approach on fresh names; the order of approaches rotates per round so
that none always runs right after another's teardown. After every trial the kernel is
checked for leftovers of the run (pins, links, cgroup dirs, processes, nft tables);
a trial that fails is cleaned up, reported, and the run goes on.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hack.bench import cni, floor, product, profiling, report, runmetrics
from hack.bench.kernel import BenchError, force_cleanup, leftovers, wait_until
from hack.bench.stats import Sample
from hack.bench.trial import Trial

LEAK_TIMEOUT = 30.0
PER_ENV = ("create", "delete", "delete_gone")  # the others are whole passes


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="hack/bench.sh",
        description="Floor, CNI and reconciler side by side; medians, ratios, goals.",
    )
    parser.add_argument("--sizes", default="10,50,200", help="N values (default 10,50,200)")
    parser.add_argument(
        "--rounds", type=int, default=3, help="interleaved rounds (default 3; 0: none)"
    )
    parser.add_argument("--json", type=Path, help="write every raw sample and result here")
    parser.add_argument(
        "--approaches",
        default="floor,cni,reconciler",
        help="subset of floor,cni,reconciler (default all)",
    )
    parser.add_argument(
        "--namespaces",
        default="net",
        help="spec.namespaces of the Environments (default net: what the baselines build)",
    )
    parser.add_argument("--observe-reps", type=int, default=3, help="observation passes per trial")
    parser.add_argument("--profile", type=Path, help="profile one apply of max N to this file")
    parser.add_argument("--run-metrics", action="store_true", help="also measure `run` (minutes)")
    parser.add_argument("--ready-samples", type=int, default=20)
    parser.add_argument("--idle-envs", type=int, default=100)
    parser.add_argument("--rss-envs", type=int, default=200)
    parser.add_argument("--idle-seconds", type=float, default=60.0)
    parser.add_argument("--resync", type=float, default=30.0, help="`run --resync` (default 30)")
    args = parser.parse_args(argv)
    args.size_list = sorted({int(s) for s in args.sizes.split(",") if s.strip()})
    args.approach_list = [a.strip() for a in args.approaches.split(",") if a.strip()]
    unknown = set(args.approach_list) - {"floor", "cni", "reconciler"}
    if unknown or not args.size_list or min(args.size_list) < 1 or max(args.size_list) > 250:
        parser.error("--approaches: floor,cni,reconciler; --sizes: 1..250 (one /24 per trial)")
    return args


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class Bench:
    """One benchmark run: its tag, trial counter, samples and findings."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.tag = f"bn{secrets.token_hex(3)}"
        self.python = sys.executable
        self.namespaces = [n.strip() for n in args.namespaces.split(",") if n.strip()]
        self.samples: list[Sample] = []
        self.noop_checks: list[dict[str, Any]] = []
        self.failures: list[dict[str, Any]] = []
        self.leaks: list[dict[str, Any]] = []
        self._index = 0

    def trial(self, n: int, round_: int) -> Trial:
        """A fresh trial identity (unique names and subnet)."""
        self._index += 1
        return Trial(tag=self.tag, index=self._index, n=n, round=round_)

    def _runner(self, approach: str) -> Callable[[Trial], list[Sample]]:
        if approach == "floor":
            return floor.run
        if approach == "cni":
            return cni.run

        def reconciler(trial: Trial) -> list[Sample]:
            samples, checks = product.run(
                trial,
                python=self.python,
                namespaces=self.namespaces,
                observe_reps=self.args.observe_reps,
            )
            self.noop_checks.append(checks)
            return samples

        return reconciler

    def run_trial(self, approach: str, n: int, round_: int) -> None:
        """One trial, then the leak check; failures are recorded, never fatal."""
        trial = self.trial(n, round_)
        started = time.perf_counter()
        try:
            got = self._runner(approach)(trial)
            self.samples += got
            summary = ", ".join(
                f"{s.approach}.{s.metric} {s.seconds * 1000 / n:.2f}/env"
                if s.metric in PER_ENV
                else f"{s.approach}.{s.metric} {s.seconds * 1000:.0f} ms"
                for s in got
            )
            _log(f"  r{round_} {approach:<10} N={n:<4} {summary}")
        except (BenchError, OSError, subprocess.SubprocessError) as exc:
            _log(f"  r{round_} {approach:<10} N={n:<4} FAILED: {exc}")
            self.failures.append(
                {"approach": approach, "n": n, "round": round_, "error": str(exc),
                 "traceback": traceback.format_exc()}
            )  # fmt: skip
        self._check_leaks(approach, n, round_)
        _log(f"    ({time.perf_counter() - started:.1f} s)")

    def _check_leaks(self, approach: str, n: int, round_: int) -> None:
        try:
            wait_until(lambda: not leftovers(self.tag), timeout=LEAK_TIMEOUT, what="cleanup")
            return
        except BenchError:
            found = leftovers(self.tag)
        remaining = force_cleanup(self.tag)
        self.leaks.append(
            {"approach": approach, "n": n, "round": round_, "left": found, "after": remaining}
        )
        _log(f"    LEAK after {approach} N={n}: {found[:5]}... forced cleanup left {remaining}")
        if remaining:
            raise SystemExit(f"bench: could not clean up {remaining}; stopping")

    def rounds(self) -> None:
        """All trials, interleaved."""
        approaches = list(self.args.approach_list)
        if "cni" in approaches and (why := cni.available()):
            _log(f"bench: skipping cni: {why}")
            approaches.remove("cni")
        for round_ in range(1, self.args.rounds + 1):
            shift = (round_ - 1) % len(approaches)
            order = approaches[shift:] + approaches[:shift]
            _log(f"round {round_}/{self.args.rounds}: order {' '.join(order)}")
            for n in self.args.size_list:
                for approach in order:
                    self.run_trial(approach, n, round_)


def _host_info() -> dict[str, Any]:
    return {
        "kernel": platform.release(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "loadavg": os.getloadavg(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def main(argv: list[str] | None = None) -> int:
    """Run everything; print the tables; write the JSON; 0 unless a trial failed or leaked."""
    args = _parse(argv)
    if os.environ.get("RECONCILER_SANDBOX") != "1" or os.geteuid() != 0:
        _log("bench: run me as root inside the sandbox: hack/bench.sh [OPTIONS]")
        return 2
    bench = Bench(args)
    started = time.perf_counter()
    host = _host_info()
    _log(f"bench {bench.tag}: sizes {args.size_list}, {args.rounds} rounds, load {host['loadavg']}")
    bench.rounds()

    profile = run_metrics = None
    big = max(args.size_list)
    if args.profile is not None:
        if why := profiling.pyinstrument_missing(bench.python):
            _log(f"bench: no profile: {why}")
        else:
            _log(f"profiling one apply of N={big} ...")
            try:
                profile = profiling.profile_apply(
                    bench.trial(big, 0),
                    python=bench.python,
                    namespaces=bench.namespaces,
                    output=args.profile,
                )
            except (BenchError, OSError, subprocess.SubprocessError) as exc:
                bench.failures.append({"approach": "profile", "error": str(exc)})
            bench._check_leaks("profile", big, 0)
    if args.run_metrics:
        _log("measuring `run` (Ready latency, idle CPU, RSS) ...")
        try:
            run_metrics = runmetrics.run(
                bench.trial(args.rss_envs, 0),
                python=bench.python,
                namespaces=bench.namespaces,
                ready_samples=args.ready_samples,
                idle_envs=args.idle_envs,
                rss_envs=args.rss_envs,
                idle_seconds=args.idle_seconds,
                resync=args.resync,
            )
        except (BenchError, OSError, subprocess.SubprocessError) as exc:
            bench.failures.append({"approach": "run", "error": str(exc)})
            _log(f"  run metrics FAILED: {exc}")
        bench._check_leaks("run", args.rss_envs, 0)

    sizes = args.size_list
    goals = report.goals(
        bench.samples, sizes, noop_checks=bench.noop_checks, run_metrics=run_metrics
    )
    elapsed = time.perf_counter() - started
    print(f"\nbench {bench.tag}: {args.rounds} rounds, sizes {sizes}, {elapsed:.0f} s; {host}")
    print("environments: netns + veth (peer in netns) + bridge port + address + default route")
    print(
        f"  + memory/cpu/pids limits; reconciler spec.namespaces: [{', '.join(bench.namespaces)}]"
    )
    print("\nper env, median over rounds (ms; min-max over rounds):")
    print(report.medians_table(bench.samples, sizes))
    print("\nno-op reconcile vs lean observation floor (whole pass, ms):")
    print(report.noop_table(bench.samples, sizes))
    print("\nratios:")
    print(report.ratios_table(bench.samples, sizes))
    print("\ngoals (issue 8):")
    print(report.goals_table(goals))
    if run_metrics:
        ready = run_metrics.get("ready_s", [])
        print(
            f"\nrun: Ready median {run_metrics.get('ready_median_s', 0) * 1000:.0f} ms "
            f"(min {min(ready) * 1000:.0f}, max {max(ready) * 1000:.0f}; kernel-live median "
            f"{run_metrics.get('live_median_s', 0) * 1000:.0f} ms); idle CPU "
            f"{run_metrics.get('idle_cpu_pct', 0):.2f}% over {args.idle_seconds:g} s with "
            f"{args.idle_envs} envs; RSS {run_metrics.get('rss_mib', 0):.1f} MiB at "
            f"{args.rss_envs} envs"
        )
    if profile:
        print("\n" + report.profile_text(profile["create"], what="apply (create)"))
        print("\n" + report.profile_text(profile["noop"], what="no-op apply"))
    for failure in bench.failures:
        print(f"FAILED {failure.get('approach')} N={failure.get('n')}: {failure['error']}")
    for leak in bench.leaks:
        print(f"LEAKED after {leak['approach']} N={leak['n']}: {leak['left']}")

    if args.json is not None:
        document = {
            "tag": bench.tag,
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "host": host,
            "elapsed_s": elapsed,
            "samples": [s.to_json() for s in bench.samples],
            "noop_checks": bench.noop_checks,
            "goals": [g.to_json() for g in goals],
            "run_metrics": run_metrics,
            "profile": profile,
            "failures": bench.failures,
            "leaks": bench.leaks,
        }
        args.json.write_text(json.dumps(document, indent=2) + "\n")
        print(f"\nraw samples: {args.json}")
    return 1 if bench.failures or bench.leaks else 0


if __name__ == "__main__":
    sys.exit(main())
