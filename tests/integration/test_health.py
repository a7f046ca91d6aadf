"""Issue 6 end to end: probes and policy against real environments, each provoking the real thing.

Environments are built the way a user builds them (`reconciler apply` through
tests/integration/helpers.py); the `HealthMonitor` then runs in this test process, fed with
the state file as the controller would feed it its document, and the tests drive it
directly: `check_policy()` for one policy pass (the first pass is the baseline, as after a
controller start), `start()` for the probe loop, `run_probe` for single probes. Effects are
checked through the kernel's own view (cgroup files, /proc, real traffic), never through
the monitor alone.

Provoked for real: an allocation beyond a 64Mi limit (the kernel's OOM killer), a bounded
fork bomb against `pids: 32`, a process started with `ip netns exec` outside the cgroup, a
connection the isolation rules drop, a quarantine that cuts traffic from the host and a
`reconciler release` that restores it, a tcp probe on a port nothing listens on, http and
exec probes that pass and fail (and one that overruns its timeout and is killed).

Every test ends with `destroy` and the leak check (`managed_reconciler`).
"""

from __future__ import annotations

import itertools
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from reconciler.engine.isolation import isolation_spec
from reconciler.health.actions import RestartRequest
from reconciler.health.monitor import HealthMonitor, HealthSettings, health_status
from reconciler.health.probes import ProbeTarget, run_probe, target_for
from reconciler.kernel.cgroups import open_cgroup_driver
from reconciler.kernel.firewall import FirewallDriver
from reconciler.kernel.processes import ForkingProcessDriver
from reconciler.kernel.types import CgroupDriver
from reconciler.manifests.models import Probe
from reconciler.state.events import EventLog
from reconciler.state.model import StateDocument, ViolationRecord
from reconciler.state.store import StateStore
from tests import kernel_view
from tests.integration.helpers import Reconciler, describe, managed_reconciler, write_manifest
from tests.kernel_view import pid_alive, wait_until

DEADLINE = 20.0  # generous: only a failing test waits this long
_SUBNETS = itertools.count(40)
HTTP_SERVER = ["python3", "-m", "http.server", "8080", "--bind", "0.0.0.0"]


# --------------------------------------------------------------------------- setup helpers


@dataclass
class Drivers:
    """The three drivers the monitor needs (the engine's `Drivers` has more)."""

    cgroups: CgroupDriver
    firewall: FirewallDriver
    processes: ForkingProcessDriver


@dataclass
class Harness:
    """One instance built with the CLI, and a monitor of it living in this process."""

    rc: Reconciler
    subnet: str
    drivers: Drivers
    monitor: HealthMonitor
    reconcile_requests: list[int] = field(default_factory=list)
    restarts: list[RestartRequest] = field(default_factory=list)

    @property
    def store(self) -> StateStore:
        return StateStore(self.rc.state_dir, self.rc.instance)

    def state(self) -> StateDocument:
        state = self.store.load()
        assert state is not None, "no state file: apply first"
        return state

    def netns(self, env: str) -> str:
        return f"{self.rc.instance}-{env}"

    def address(self, env: str) -> str:
        record = self.state().environments[env]
        assert record.address is not None
        return record.address.split("/")[0]

    def cgroup_dirs(self, env: str) -> tuple[str, ...]:
        return self.drivers.cgroups.paths(env=env)

    def target(self, env: str) -> ProbeTarget:
        record = self.state().environments[env]
        return target_for(env, record, cgroup_procs=self.drivers.cgroups.procs_files(env=env))

    def violations(self, env: str, kind: str) -> Callable[[], list[ViolationRecord]]:
        """A poll: run one policy pass; the violations of `kind` recorded for `env` so far."""

        def poll() -> list[ViolationRecord]:
            self.monitor.check_policy()
            found = self.monitor.results().environments.get(env)
            return [v for v in (found.violations if found else ()) if v.type == kind]

        return poll

    def events(self, reason: str) -> list[dict[str, Any]]:
        log = EventLog(self.rc.state_dir / self.rc.instance / "events.jsonl")
        return [e for e in log.read() if e.get("reason") == reason]


def _serves(address: str, port: int, *, timeout: float = 0.5) -> bool:
    """True if a TCP connection from this (the sandbox's root) namespace completes."""
    try:
        with socket.create_connection((address, port), timeout=timeout):
            return True
    except OSError:
        return False


def _network(subnet: str) -> str:
    return f"""
    apiVersion: reconciler/v1
    kind: Network
    metadata: {{name: hnet}}
    spec: {{subnet: {subnet}.0/24}}
    """


def _env(name: str, host: int, subnet: str, body: str = "") -> str:
    extra = textwrap.indent(textwrap.dedent(body).strip("\n"), "  ")
    return (
        "apiVersion: reconciler/v1\nkind: Environment\n"
        f"metadata: {{name: {name}}}\nspec:\n"
        f"  network: {{name: hnet, address: {subnet}.{host}}}\n" + (extra + "\n" if extra else "")
    )


@pytest.fixture
def harness_factory(
    tmp_path: Path, state_dir: Path, instance: str
) -> Iterator[Callable[..., Harness]]:
    """`make(envs={name: body}, restart=False)`: apply the envs, build the monitor."""
    manifests = tmp_path / "manifests"
    rc = Reconciler(manifests=manifests, state_dir=state_dir, instance=instance)
    monitors: list[HealthMonitor] = []
    subnet = f"10.231.{next(_SUBNETS)}"

    def make(
        envs: dict[str, str],
        *,
        capture_restarts: bool = True,
        settings: HealthSettings | None = None,
    ) -> Harness:
        write_manifest(manifests, "net.yaml", _network(subnet))
        for index, (name, body) in enumerate(sorted(envs.items())):
            write_manifest(manifests, f"{name}.yaml", _env(name, 10 + index, subnet, body))
        rc.ok("apply")
        drivers = Drivers(
            cgroups=open_cgroup_driver(instance=instance),
            firewall=FirewallDriver(instance=instance),
            processes=ForkingProcessDriver(),
        )
        store = StateStore(state_dir, instance)
        requests: list[int] = []
        restarts: list[RestartRequest] = []

        def state() -> StateDocument:
            return store.load() or StateDocument(instance=instance)

        monitor = HealthMonitor(
            instance=instance,
            drivers=drivers,
            state=state,
            events=EventLog(store.dir / "events.jsonl"),
            request_reconcile=lambda: requests.append(1),
            restart=restarts.append if capture_restarts else None,
            instance_dir=store.dir,
            settings=settings or HealthSettings(policy_period=0.5, escape_min_age=0.2),
        )
        monitors.append(monitor)
        harness = Harness(
            rc=rc,
            subnet=subnet,
            drivers=drivers,
            monitor=monitor,
            reconcile_requests=requests,
            restarts=restarts,
        )
        monitor.check_policy()  # the baseline pass, as after a controller start
        return harness

    with managed_reconciler(rc):
        try:
            yield make
        finally:
            for monitor in monitors:
                monitor.stop()


def _exec(h: Harness, env: str, script: str) -> subprocess.CompletedProcess[str]:
    """`reconciler exec ENV -- python3 -c SCRIPT`: runs inside the env's cgroup."""
    return h.rc("exec", env, "--", "python3", "-c", textwrap.dedent(script))


def _cgroup_file(h: Harness, env: str, name: str) -> str:
    for directory in h.cgroup_dirs(env):
        path = Path(directory) / name
        if path.exists():
            return kernel_view.read_cgroup_file(path)
    raise AssertionError(f"no {name} in the cgroup of {env}")


# --------------------------------------------------------------------------- violations


def test_oom_kill_is_an_oom_violation(harness_factory: Callable[..., Harness]) -> None:
    h = harness_factory({"mem": "resources: {memory: 64Mi}"})
    result = _exec(h, "mem", "data = b'x' * (256 << 20)")
    assert result.returncode == 128 + signal.SIGKILL, describe(result)
    oom_control = _cgroup_file(h, "mem", "memory.oom_control")
    assert "oom_kill 1" in oom_control.splitlines(), oom_control  # the kernel's own count
    found = wait_until(h.violations("mem", "oom"), DEADLINE, message="no oom violation")
    assert "64Mi" in found[0].detail and found[0].action == "alert", found
    assert any("oom:" in e["message"] for e in h.events("Violation"))
    assert h.reconcile_requests, "a violation is worth saving: a reconcile was requested"
    h.monitor.check_policy()
    assert len(h.violations("mem", "oom")()) == 1, "one OOM kill, one violation"


FORK_BOMB = """
import os, sys, time
children = 0
refused = 0
while children < 500 and refused < 50:
    try:
        pid = os.fork()
    except BlockingIOError:  # EAGAIN: the cgroup is at pids.max
        refused += 1
        time.sleep(0.01)
        continue
    if pid == 0:
        os.close(1)  # `reconciler exec` must not wait for the children's stdout
        os.close(2)
        time.sleep(120)
        os._exit(0)
    children += 1
print(children, refused, flush=True)
"""


def test_fork_bomb_stops_at_pids_max_and_is_killed(
    harness_factory: Callable[..., Harness],
) -> None:
    h = harness_factory({"bomb": "resources: {pids: 32}\npolicy: {onViolation: kill}"})
    holder = h.state().environments["bomb"].holder
    assert holder is not None
    result = _exec(h, "bomb", FORK_BOMB)
    assert result.returncode == 0, describe(result)
    children, refused = (int(x) for x in result.stdout.split())
    assert children < 32 and refused >= 1, result.stdout
    assert int(_cgroup_file(h, "bomb", "pids.current")) <= 32
    assert subprocess.run(["true"], check=False).returncode == 0, "the host can still fork"
    found = wait_until(h.violations("bomb", "pids-limit"), DEADLINE, message="no pids-limit")
    assert found[0].action == "kill" and "(32)" in found[0].detail, found

    def only_holder_left() -> bool:
        pids = kernel_view.pids_in_cgroup_dirs(h.cgroup_dirs("bomb"))
        return pids == {holder.pid}

    wait_until(only_holder_left, DEADLINE, message="the bomb's processes were not killed")
    assert pid_alive(holder.pid), "the holder (the environment itself) is spared"
    assert h.events("Killed"), "the kill is an event"


@pytest.mark.parametrize("policy", ["kill", "alert"])
def test_process_in_netns_outside_cgroup_is_an_escape(
    harness_factory: Callable[..., Harness], policy: str
) -> None:
    h = harness_factory({"esc": f"policy: {{onViolation: {policy}}}"})
    intruder = subprocess.Popen(["ip", "netns", "exec", h.netns("esc"), "sleep", "1000"])
    try:
        found = wait_until(h.violations("esc", "escape"), DEADLINE, message="no escape")
        assert f"pid {intruder.pid}" in found[0].detail, found
        assert found[0].action == policy
        if policy == "kill":
            assert intruder.wait(timeout=DEADLINE) == -signal.SIGKILL
            assert "killed pid" in found[0].detail
        else:
            h.monitor.check_policy()
            assert intruder.poll() is None, "alert only records"
            assert len(h.violations("esc", "escape")()) == 1, "reported once, not every pass"
    finally:
        if intruder.poll() is None:
            intruder.kill()  # our own child: its pid cannot have been reused
        intruder.wait()


def test_the_running_monitor_notices_an_escape_within_two_periods(
    harness_factory: Callable[..., Harness],
) -> None:
    """Issue 6: detection within 2 probe periods (5 s by default), by the monitor's own
    policy loop with default settings."""
    h = harness_factory({"lat": ""}, settings=HealthSettings())
    period = HealthSettings().policy_period
    h.monitor.start()
    intruder = subprocess.Popen(["ip", "netns", "exec", h.netns("lat"), "sleep", "1000"])
    started = time.monotonic()
    try:

        def noticed() -> bool:
            found = h.monitor.results().environments.get("lat")
            return bool(found and any(v.type == "escape" for v in found.violations))

        wait_until(noticed, 2 * period + 5, interval=0.05, message="escape not noticed")
        assert time.monotonic() - started <= 2 * period
    finally:
        intruder.kill()  # our own child: its pid cannot have been reused
        intruder.wait()


CONNECT = """
import socket, sys
s = socket.socket()
s.settimeout(0.5)
try:
    s.connect((sys.argv[1], 8080))
except OSError:
    sys.exit(1)
"""


def _connect_from(h: Harness, env: str, address: str) -> int:
    result = h.rc("exec", env, "--", "python3", "-c", CONNECT, address)
    return result.returncode


def test_denied_connection_is_a_violation(harness_factory: Callable[..., Harness]) -> None:
    h = harness_factory({"src": "", "dst": ""})
    destination = h.address("dst")
    assert _connect_from(h, "src", destination) == 1, "strict isolation drops it"
    found = wait_until(h.violations("src", "denied-connection"), DEADLINE, message="no denial")
    assert destination in found[0].detail and "env dst" in found[0].detail, found
    assert not h.violations("dst", "denied-connection")(), "the destination did nothing"


def test_quarantine_cuts_connectivity_and_release_restores_it(
    harness_factory: Callable[..., Harness],
) -> None:
    h = harness_factory(
        {
            "q": f"""
            processes: [{{name: web, command: {HTTP_SERVER}}}]
            policy: {{onViolation: quarantine}}
            """,
            "peer": "",
        }
    )
    address = h.address("q")
    wait_until(lambda: _serves(address, 8080), DEADLINE, message="web never listened")

    def render() -> list[str]:
        spec = isolation_spec(
            instance=h.rc.instance, state=h.state(), quarantined=h.monitor.quarantined()
        )
        return h.drivers.firewall.ensure(spec)

    assert _connect_from(h, "q", h.address("peer")) == 1
    wait_until(h.violations("q", "denied-connection"), DEADLINE, message="no violation")
    assert h.monitor.quarantined() == {"q"}
    render()
    assert not _serves(address, 8080), "quarantine cuts the host off"
    annotated = h.monitor.annotate(h.state())
    status = health_status(annotated.environments["q"])
    assert status.quarantined and status.phase == "Degraded", status
    assert any(c.type == "Quarantined" and c.status == "True" for c in status.conditions)
    assert h.events("Quarantined")

    # A controller holds the lock: `release` leaves a request the monitor takes.
    with h.store.lock(command="test controller"):
        released = h.rc("release", "q", "--wait", "0")
        assert released.returncode == 0, describe(released)
        assert "requested" in released.stdout, released.stdout
        h.monitor.check_policy()
    assert h.monitor.quarantined() == frozenset()
    render()
    assert wait_until(lambda: _serves(address, 8080), DEADLINE, message="not restored")
    assert h.events("Released")


def test_release_without_a_controller_clears_the_state(
    harness_factory: Callable[..., Harness],
) -> None:
    h = harness_factory({"q": "policy: {onViolation: quarantine}", "peer": ""})
    _connect_from(h, "q", h.address("peer"))
    wait_until(h.violations("q", "denied-connection"), DEADLINE, message="no violation")
    store = h.store
    with store.lock(command="test controller"):
        state = h.state()
        store.save(h.monitor.annotate(state), summary="health")
    assert h.state().environments["q"].quarantine is not None
    result = h.rc.ok("release", "q")
    assert "released" in result.stdout
    record = h.state().environments["q"]
    assert record.quarantine is None
    assert any(c.type == "Quarantined" and c.status == "False" for c in record.conditions)
    again = h.rc.ok("release", "q")
    assert "not quarantined" in again.stdout
    unknown = h.rc("release", "nope")
    assert unknown.returncode == 1 and "unknown environment" in unknown.stderr


# --------------------------------------------------------------------------- probes


def _probe(**fields: Any) -> Probe:
    return Probe.model_validate({"name": "p", "timeoutSeconds": 1, **fields})


def test_tcp_probe_on_a_stopped_service_degrades_and_asks_for_a_restart(
    harness_factory: Callable[..., Harness],
) -> None:
    h = harness_factory(
        {
            "svc": """
            processes: [{name: api, command: [sleep, "3600"]}]
            probes:
              - {name: api-up, tcp: {port: 8080}, periodSeconds: 1, failureThreshold: 2}
            """
        }
    )
    h.monitor.start()
    wait_until(lambda: h.restarts, DEADLINE, message="no restart request")
    assert h.restarts[0] == RestartRequest(
        env="svc", processes=("api",), reason=h.restarts[0].reason
    )
    assert "Connection refused" in h.restarts[0].reason, h.restarts[0]
    probe = h.monitor.results().environments["svc"].probes["api-up"]
    assert not probe.healthy
    status = health_status(h.monitor.annotate(h.state()).environments["svc"])
    assert status.phase == "Degraded", status
    ready = next(c for c in status.conditions if c.type == "Ready")
    assert ready.status == "False" and ready.reason == "ProbeFailed", ready
    assert status.probes[0]["name"] == "api-up" and status.probes[0]["healthy"] is False
    assert h.events("ProbeFailed") and h.events("RestartRequested")


def test_default_restart_stops_the_process_for_the_reconcile(
    harness_factory: Callable[..., Harness],
) -> None:
    h = harness_factory(
        {
            "svc": """
            processes: [{name: api, command: [sleep, "3600"]}]
            probes: [{name: up, tcp: {port: 8080}, periodSeconds: 1, failureThreshold: 1}]
            """
        },
        capture_restarts=False,
    )
    workload = h.state().environments["svc"].processes["api"]
    assert workload.pid is not None
    h.monitor.start()
    wait_until(lambda: not pid_alive(workload.pid or 0), DEADLINE, message="api not stopped")
    wait_until(lambda: h.events("Restarted"), DEADLINE, message="no Restarted event")
    h.monitor.stop()

    def restarted() -> bool:
        h.rc.ok("apply")  # the reconcile starts it again, after the workloads' back-off
        again = h.state().environments["svc"].processes["api"]
        return again.pid not in (None, workload.pid) and again.restarts >= 1

    wait_until(restarted, DEADLINE, interval=0.5, message="api was not started again")


def test_http_and_exec_probes_pass_and_fail(harness_factory: Callable[..., Harness]) -> None:
    h = harness_factory({"web": f"processes: [{{name: web, command: {HTTP_SERVER}}}]"})
    target = h.target("web")
    drivers = h.drivers.processes

    def run(**fields: Any) -> tuple[bool, str]:
        outcome = run_probe(_probe(**fields), target, processes=drivers)
        return outcome.ok, outcome.message

    wait_until(lambda: run(tcp={"port": 8080})[0], DEADLINE, message="web never listened")
    assert run(http={"port": 8080, "path": "/"})[0]
    ok, message = run(http={"port": 8080, "path": "/no-such-page"})
    assert not ok and "HTTP 404" in message, message
    assert not run(http={"port": 8081})[0], "nothing listens on 8081"
    assert run(exec={"command": ["true"]}) == (True, "exec true: exit code 0")
    ok, message = run(exec={"command": ["sh", "-c", "echo broken; exit 3"]})
    assert not ok and message == "exec sh -c echo broken; exit 3: exit code 3: broken"
    ok, message = run(exec={"command": ["no-such-command"]})
    assert not ok and "ENOENT" in message, message
    # Inside the env: its hostname, its pid namespace (the holder is pid 1 there).
    ok, message = run(exec={"command": ["sh", "-c", "cat /proc/1/comm"]})
    assert ok and message.endswith("catatonit"), message


def test_exec_probe_past_its_timeout_is_killed_with_its_children(
    harness_factory: Callable[..., Harness],
) -> None:
    h = harness_factory({"slow": ""})
    target = h.target("slow")
    script = "sleep 60 & sleep 61"
    outcome = run_probe(
        _probe(exec={"command": ["sh", "-c", script]}), target, processes=h.drivers.processes
    )
    assert not outcome.ok and "timed out after 1s" in outcome.message, outcome
    assert outcome.seconds < 5, "a hard timeout"
    holder = h.state().environments["slow"].holder
    assert holder is not None
    left = kernel_view.pids_in_cgroup_dirs(h.cgroup_dirs("slow")) - {holder.pid}
    assert left == set(), f"the probe's tree survived: {left}"


def test_probe_sockets_are_made_inside_the_env(harness_factory: Callable[..., Harness]) -> None:
    """Listening on the env's 127.0.0.1 is reachable only from inside its netns."""
    h = harness_factory(
        {
            "lo": "processes: [{name: w, command: [python3, -m, http.server, "
            "'8080', --bind, 127.0.0.1]}]"
        }
    )
    inside = ProbeTarget(**{**h.target("lo").__dict__, "address": "127.0.0.1"})
    wait_until(
        lambda: run_probe(_probe(tcp={"port": 8080}), inside, processes=h.drivers.processes).ok,
        DEADLINE,
        message="not reachable from inside",
    )
    assert sys.platform == "linux"
