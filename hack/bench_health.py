"""Measure what the health loop costs when nothing is wrong (issue 6: < 2% of one core, 50 envs).

Run as root inside the sandbox:

    hack/sandbox.sh .venv/bin/python hack/bench_health.py [--envs 50] [--seconds 60]

It builds ENVS environments with `reconciler apply` (one network; each env has memory,
cpu and pids limits, a tiny TCP listener as its workload and a tcp probe on it with the
default 5 s period), starts a `HealthMonitor` in this process exactly as the controller
would (the state document held in memory, default settings: policy pass every 5 s), lets
it warm up, and then measures the CPU time of this whole process (every monitor thread)
plus its reaped children (the `nft` runs of the denied-connection check) over SECONDS of
wall time. It also times single policy passes and checks that nothing was reported:
every probe healthy, no violation. Everything is destroyed at the end.
"""

from __future__ import annotations

import argparse
import os
import resource
import secrets
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from reconciler.health.monitor import HealthMonitor, HealthSettings
from reconciler.kernel.cgroups import open_cgroup_driver
from reconciler.kernel.firewall import FirewallDriver
from reconciler.kernel.processes import ForkingProcessDriver
from reconciler.kernel.types import CgroupDriver
from reconciler.state.events import EventLog
from reconciler.state.model import StateDocument
from reconciler.state.store import StateStore

LISTENER = (
    "import socket\n"
    "s = socket.socket()\n"
    "s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
    "s.bind(('0.0.0.0', 8080))\n"
    "s.listen(64)\n"
    "while True:\n"
    "    s.accept()[0].close()\n"
)


class Drivers:
    """The three drivers the monitor uses."""

    def __init__(self, instance: str) -> None:
        self.cgroups: CgroupDriver = open_cgroup_driver(instance=instance)
        self.firewall = FirewallDriver(instance=instance)
        self.processes = ForkingProcessDriver()


def manifests(directory: Path, envs: int) -> None:
    """One network and `envs` environments with limits, a listener and a tcp probe."""
    directory.mkdir(parents=True)
    (directory / "net.yaml").write_text(
        "apiVersion: reconciler/v1\nkind: Network\nmetadata: {name: bench}\n"
        "spec: {subnet: 10.233.0.0/24}\n"
    )
    for index in range(envs):
        (directory / f"e{index}.yaml").write_text(
            "apiVersion: reconciler/v1\nkind: Environment\n"
            f"metadata: {{name: e{index}}}\n"
            "spec:\n"
            f"  network: {{name: bench, address: 10.233.0.{10 + index}}}\n"
            "  resources: {memory: 64Mi, cpu: 200m, pids: 64}\n"
            f'  processes: [{{name: listen, command: ["python3", "-c", {command_yaml()}]}}]\n'
            "  probes: [{name: up, tcp: {port: 8080}}]\n"
        )


def command_yaml() -> str:
    """The listener's source as a double-quoted YAML scalar."""
    return '"' + LISTENER.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def reconciler(args: list[str], *, root: Path, instance: str) -> None:
    """Run the CLI; fail loudly."""
    cmd = [
        sys.executable,
        "-m",
        "reconciler",
        "--manifests",
        str(root / "manifests"),
        "--state-dir",
        str(root / "state"),
        "--instance",
        instance,
        *args,
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")


def cpu_seconds() -> float:
    """CPU time of this process (all threads) plus its reaped children."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def main() -> None:
    """Build, measure, report, destroy."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--envs", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--warmup", type=float, default=12.0)
    options = parser.parse_args()
    if os.environ.get("RECONCILER_SANDBOX") != "1":
        raise SystemExit("run inside the sandbox: hack/sandbox.sh .venv/bin/python " + sys.argv[0])
    instance = f"rtbench{secrets.token_hex(3)}"
    with tempfile.TemporaryDirectory(prefix="bench-health-") as temp:
        root = Path(temp)
        manifests(root / "manifests", options.envs)
        started = time.monotonic()
        try:
            reconciler(["apply"], root=root, instance=instance)
            print(f"applied {options.envs} envs in {time.monotonic() - started:.1f}s")
            measure(root, instance, options)
        finally:
            reconciler(["destroy"], root=root, instance=instance)


def measure(root: Path, instance: str, options: argparse.Namespace) -> None:
    """Run the monitor and print what it cost."""
    store = StateStore(root / "state", instance)
    state = store.load() or StateDocument(instance=instance)  # held in memory, as `run` does
    drivers = Drivers(instance)
    reconciles: list[int] = []
    monitor = HealthMonitor(
        instance=instance,
        drivers=drivers,
        state=lambda: state,
        events=EventLog(store.dir / "events.jsonl"),
        request_reconcile=lambda: reconciles.append(1),
        instance_dir=store.dir,
        settings=HealthSettings(),
    )
    passes = []
    for _ in range(5):
        begin = time.perf_counter()
        monitor.check_policy()
        passes.append(time.perf_counter() - begin)
    monitor.start()
    time.sleep(options.warmup)  # every probe has run at least twice (5 s period)
    cpu_before, wall_before = cpu_seconds(), time.monotonic()
    time.sleep(options.seconds)
    cpu = cpu_seconds() - cpu_before
    wall = time.monotonic() - wall_before
    monitor.stop()
    snapshot = monitor.results()
    unhealthy = [
        f"{env}/{name}: {probe.last_message}"
        for env, health in snapshot.environments.items()
        for name, probe in health.probes.items()
        if not probe.healthy or probe.last_ok is not True
    ]
    violations = [v for health in snapshot.environments.values() for v in health.violations]
    print(
        f"policy pass (synchronous, {options.envs} envs): min {min(passes) * 1000:.1f} ms, "
        f"max {max(passes) * 1000:.1f} ms over {len(passes)} passes"
    )
    print(
        f"monitor over {wall:.1f}s: {cpu:.3f}s CPU = {100 * cpu / wall:.2f}% of one core "
        f"({options.envs} tcp probes every 5s + a policy pass every 5s)"
    )
    print(f"unhealthy or never-run probes: {len(unhealthy)} {unhealthy[:3]}")
    print(f"violations: {len(violations)} {violations[:3]}; reconcile requests: {len(reconciles)}")
    if unhealthy or violations:
        raise SystemExit("something was wrong: the measurement is not of an idle loop")


if __name__ == "__main__":
    main()
