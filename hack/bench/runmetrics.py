"""`reconciler run` under load: Ready latency, idle CPU, resident memory.

1. Start `run` for a fresh instance with one Network and wait for its first reconcile.
2. Ready latency: write one Environment manifest at a time (atomically: a hidden temp
   file renamed into place, so the watcher never sees half a file) and poll, 2 ms apart,
   until (a) the kernel shows it live: netns pinned, eth0 up with an address (a lean
   netlink dump inside the netns), and (b) the state file records it `Ready`. Both
   latencies are kept; the goal is judged on (b), the later one.
3. Idle CPU: grow to `idle_envs` environments, wait for all Ready, let the burst's
   follow-up work settle, then read utime + stime of the controller from /proc/PID/stat
   before and after `idle_seconds`: the share of one CPU an idle controller costs
   (resyncs included; there are no probes in these manifests).
4. RSS: grow to `rss_envs`, wait for all Ready, settle, read VmRSS and VmHWM from
   /proc/PID/status.
5. SIGTERM the controller, `destroy` the instance (always, also after a failure).

The settle waits are measurement windows, not synchronisation: everything they follow
was already confirmed Ready by polling.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from hack.bench import rtnl
from hack.bench.kernel import BenchError, host_links_gone, wait_until
from hack.bench.product import Reconciler, env_manifest
from hack.bench.trial import Trial

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
SETTLE_SECONDS = 3.0
POLL_SECONDS = 0.002


def cpu_seconds(pid: int) -> float:
    """utime + stime of `pid`, all threads, in seconds (fields 14 and 15 of proc(5))."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of `pid`, in KiB."""
    found: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            found[key] = int(value.split()[0])
    return found


def _p90(samples: list[float]) -> float:
    """The 90th percentile (the sample itself when there is only one)."""
    if len(samples) < 2:
        return samples[0]
    return statistics.quantiles(samples, n=10, method="inclusive")[8]


def _ready(rec: Reconciler) -> set[str]:
    try:
        doc = json.loads(rec.state_file.read_text())
    except (OSError, ValueError):  # not written yet
        return set()
    envs = doc.get("environments", {})
    return {name for name, record in envs.items() if record.get("phase") == "Ready"}


def _live(netns: str) -> bool:
    if not os.path.exists(f"{rtnl.NETNS_DIR}/{netns}"):
        return False
    try:
        sockets = rtnl.open_sockets([netns])
    except rtnl.NetlinkFailure:  # unpinned or not yet a namespace
        return False
    try:
        eth0 = rtnl.links(sockets[netns]).get("eth0")
    finally:
        sockets[netns].close()
    return eth0 is not None and eth0.up and bool(eth0.addresses)


def _write(directory: Path, env: str, text: str) -> None:
    temp = directory / f".{env}.yaml.tmp"  # hidden: the loader ignores it
    temp.write_text(text)
    temp.rename(directory / f"{env}.yaml")


def _grow(rec: Reconciler, *, network: str, names: list[str], namespaces: list[str]) -> float:
    """Declare `names` at once; seconds until all are Ready (deadline 10 min)."""
    started = time.perf_counter()
    for name in names:
        _write(rec.manifests, name, env_manifest(name, network, namespaces))
    want = set(names)
    done = wait_until(lambda: want <= _ready(rec), timeout=600, what=f"{len(names)} envs Ready")
    return done - started


def run(
    trial: Trial,
    *,
    python: str,
    namespaces: list[str],
    ready_samples: int,
    idle_envs: int,
    rss_envs: int,
    idle_seconds: float,
    resync: float,
) -> dict[str, Any]:
    """All run-time metrics for one controller; raw samples included."""
    instance = trial.prefix("u")
    network = f"n{trial.index}"
    work = Path(tempfile.mkdtemp(prefix=f"{instance}-"))
    rec = Reconciler(python, work / "manifests", work / "state", instance)
    rec.manifests.mkdir()
    (rec.manifests / "network.yaml").write_text(
        "apiVersion: reconciler/v1\nkind: Network\n"
        f"metadata: {{name: {network}}}\nspec: {{subnet: {trial.subnet}}}\n"
    )
    log = (work / "run.log").open("w")
    proc = subprocess.Popen(
        rec.argv("run", "--resync", f"{resync:g}"), stdout=log, stderr=subprocess.STDOUT
    )
    result: dict[str, Any] = {"instance": instance, "resync_s": resync}
    try:
        wait_until(rec.state_file.exists, timeout=60, what="the first reconcile of `run`")
        live_s, ready_s = [], []
        for i in range(ready_samples):
            env = f"e{i}"
            started = time.perf_counter()
            _write(rec.manifests, env, env_manifest(env, network, namespaces))
            live_at = ready_at = None
            deadline = started + 60
            while live_at is None or ready_at is None:
                now = time.perf_counter()
                if now > deadline:
                    raise BenchError(f"run: env {env} not live and Ready within 60 s")
                if live_at is None and _live(f"{instance}-{env}"):
                    live_at = time.perf_counter()
                if ready_at is None and env in _ready(rec):
                    ready_at = time.perf_counter()
                time.sleep(POLL_SECONDS)
            live_s.append(live_at - started)
            ready_s.append(ready_at - started)
        result["live_s"] = live_s
        result["ready_s"] = ready_s
        result["ready_median_s"] = statistics.median(ready_s)
        result["live_median_s"] = statistics.median(live_s)
        result["ready_p90_s"] = _p90(ready_s)
        result["live_p90_s"] = _p90(live_s)

        names = [f"e{i}" for i in range(ready_samples, idle_envs)]
        result["grow_to_idle_s"] = _grow(rec, network=network, names=names, namespaces=namespaces)
        time.sleep(SETTLE_SECONDS)
        before, started = cpu_seconds(proc.pid), time.perf_counter()
        time.sleep(idle_seconds)  # the measurement window
        used, elapsed = cpu_seconds(proc.pid) - before, time.perf_counter() - started
        result["idle"] = {"envs": idle_envs, "cpu_s": used, "window_s": elapsed}
        result["idle_cpu_pct"] = 100.0 * used / elapsed
        result[f"memory_kib_at_{idle_envs}"] = memory_kib(proc.pid)

        names = [f"e{i}" for i in range(idle_envs, rss_envs)]
        result["grow_to_rss_s"] = _grow(rec, network=network, names=names, namespaces=namespaces)
        time.sleep(SETTLE_SECONDS)
        memory = memory_kib(proc.pid)
        result["rss"] = {"envs": rss_envs, **memory}
        result["rss_mib"] = memory["VmRSS"] / 1024
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            result["run_exit"] = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            result["run_exit"] = "did not stop within 60 s of SIGTERM: killed"
            proc.kill()  # our own child, by its Popen handle
            proc.wait(timeout=60)
        log.close()
        subprocess.run(rec.argv("destroy"), capture_output=True, check=False, timeout=600)
        try:
            wait_until(host_links_gone, timeout=60, what="the run instance's links to go")
        finally:
            result["log_tail"] = (work / "run.log").read_text()[-2000:]
            shutil.rmtree(work, ignore_errors=True)
    return result
