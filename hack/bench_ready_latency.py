#!/usr/bin/env python3
"""Measure `reconciler run`: manifest-to-kernel latency, and the CPU an idle controller uses.

Run it inside the sandbox (it creates real namespaces, links, cgroups and processes):

    hack/sandbox.sh .venv/bin/python hack/bench_ready_latency.py [--envs 20] [--idle 30]

1. Starts `reconciler run` (a fresh instance `bench<hex>`, temp manifests and state dirs)
   with one Network declared, and waits for its first reconcile.
2. Writes one Environment manifest at a time and measures the time until the kernel
   shows the environment: its netns pinned, its holder (the last object a converge makes)
   in its memory cgroup, eth0 in the netns up with an address. Prints the median of
   `--envs` samples (and min / p90 / max).
3. With all environments live, reads the controller's utime + stime from /proc/PID/stat,
   waits `--idle` seconds, reads them again: the CPU an idle controller costs, resyncs
   included (`--resync`, default 30 as in production).
4. SIGTERMs the controller and destroys the instance.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NETNS_DIR = Path("/run/netns")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def reconciler(base: list[str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*base, *args], capture_output=True, text=True, timeout=120)


def cpu_seconds(pid: int) -> float:
    """utime + stime of `pid` (all its threads), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # fields 14 and 15 of proc(5)


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"bench: timed out after {timeout}s waiting for {what}")
        time.sleep(0.001)


def memory_procs(instance: str, env: str) -> Path:
    for base in (Path("/sys/fs/cgroup/memory"), Path("/sys/fs/cgroup")):
        candidate = base / instance / env / "cgroup.procs"
        if candidate.parent.parent.exists():
            return candidate
    raise SystemExit("bench: no memory cgroup hierarchy found")


def env_live(instance: str, env: str, prefix: str) -> bool:
    netns = f"{instance}-{env}"
    if not (NETNS_DIR / netns).exists():
        return False
    try:
        if not memory_procs(instance, env).read_text().split():
            return False
    except OSError:
        return False
    out = subprocess.run(
        ["ip", "-j", "-n", netns, "addr", "show", "dev", "eth0"],
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode != 0 or not out.stdout.strip():
        return False
    link = json.loads(out.stdout)[0]
    addresses = [a["local"] for a in link.get("addr_info", []) if a.get("family") == "inet"]
    return "UP" in link.get("flags", []) and any(a.startswith(prefix) for a in addresses)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--envs", type=int, default=20)
    parser.add_argument("--idle", type=float, default=30.0, help="seconds of idle CPU sampling")
    parser.add_argument("--resync", type=float, default=30.0)
    args = parser.parse_args()
    if os.environ.get("RECONCILER_SANDBOX") != "1":
        raise SystemExit("bench: run me inside hack/sandbox.sh (I create kernel objects)")

    instance = f"bench{secrets.token_hex(3)}"
    work = Path(tempfile.mkdtemp(prefix="reconciler-bench-"))
    manifests, state = work / "manifests", work / "state"
    manifests.mkdir()
    prefix = "10.254.0."
    (manifests / "network.yaml").write_text(
        "apiVersion: reconciler/v1\nkind: Network\nmetadata: {name: bench}\n"
        "spec: {subnet: 10.254.0.0/24}\n"
    )
    base = [
        sys.executable, "-m", "reconciler", "--manifests", str(manifests),
        "--state-dir", str(state), "--instance", instance, "--log-format", "json",
    ]  # fmt: skip
    log = open(work / "run.log", "w")  # noqa: SIM115
    proc = subprocess.Popen(
        [*base, "run", "--resync", str(args.resync)], stdout=log, stderr=subprocess.STDOUT
    )
    try:
        state_file = state / instance / "state.json"
        wait_for(state_file.exists, 30, "the first reconcile")
        samples = []
        for i in range(args.envs):
            env = f"e{i}"
            text = (
                "apiVersion: reconciler/v1\nkind: Environment\n"
                f"metadata: {{name: {env}}}\n"
                "spec: {network: {name: bench}, resources: {memory: 64Mi}}\n"
            )
            started = time.monotonic()
            (manifests / f"{env}.yaml").write_text(text)
            wait_for(functools.partial(env_live, instance, env, prefix), 30, f"{env} live")
            samples.append(time.monotonic() - started)
        samples.sort()
        p90 = samples[max(0, int(len(samples) * 0.9) - 1)]
        print(
            f"manifest -> live in kernel, {len(samples)} envs: "
            f"median {statistics.median(samples) * 1000:.0f} ms, min {samples[0] * 1000:.0f} ms, "
            f"p90 {p90 * 1000:.0f} ms, max {samples[-1] * 1000:.0f} ms"
        )

        time.sleep(1.0)  # let the last burst's follow-up reconcile finish (measurement only)
        before, t0 = cpu_seconds(proc.pid), time.monotonic()
        time.sleep(args.idle)  # the measurement window itself
        used, elapsed = cpu_seconds(proc.pid) - before, time.monotonic() - t0
        print(
            f"idle run with {args.envs} envs, resync {args.resync:g}s: {used:.2f} s CPU over "
            f"{elapsed:.1f} s ({100 * used / elapsed:.2f}% of one CPU)"
        )
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
        log.close()
        result = reconciler(base, "destroy")
        print(f"run exited {code}; destroy exited {result.returncode}; log in {work / 'run.log'}")


if __name__ == "__main__":
    main()
