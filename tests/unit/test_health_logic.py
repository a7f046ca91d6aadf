"""The health layer's decisions, without a kernel: counting, counters, matching, scheduling,
actions, and what ends up in the state and in `status`.

The monitor itself is exercised with fake drivers and an in-memory state: its policy pass
then sees no /proc matches (no pins exist) and no cgroup files (paths under tmp_path),
while the firewall fake feeds it denied-packet counters.
"""

from __future__ import annotations

import http.server
import itertools
import os
import random
import socket
import subprocess
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from reconciler.health import violations
from reconciler.health.actions import (
    RestartRequest,
    decide,
    release_pending,
    request_release,
    restart_targets,
    take_release_requests,
)
from reconciler.health.monitor import (
    HealthMonitor,
    HealthSettings,
    Scheduler,
    health_conditions,
    health_status,
    quarantined_in,
)
from reconciler.health.probes import (
    Budget,
    ProbeError,
    ProbeOutcome,
    ProbeState,
    ProbeTarget,
    Transition,
    after_restart,
    from_record,
    http_healthy,
    parse_http_status,
    record_outcome,
    run_probe,
    target_for,
    to_record,
)
from reconciler.health.violations import (
    CounterTracker,
    NetnsMember,
    NetnsScanner,
    ThrottleState,
    counter_delta,
    denied_by_env,
    describe_denied,
    describe_escape,
    find_counter_files,
    match_netns,
    old_enough,
    outside_cgroup,
    parse_keyed,
    read_counters,
    read_pids,
    throttle_ratio,
    throttle_step,
)
from reconciler.manifests.models import Probe
from reconciler.state.model import (
    EnvironmentRecord,
    ProbeRecord,
    ProcessRecord,
    QuarantineRecord,
    StateDocument,
    ViolationRecord,
)
from tests.unit.fakes import FakeClock

FAIL = ProbeOutcome(ok=False, message="connection refused")

PASS = ProbeOutcome(ok=True, message="connected")


# --------------------------------------------------------------------------- probe counting


def _run(outcomes: list[ProbeOutcome], threshold: int = 3) -> list[tuple[ProbeState, Transition]]:
    state = ProbeState()
    seen = []
    for index, outcome in enumerate(outcomes):
        state, transition = record_outcome(state, outcome, threshold=threshold, now=float(index))
        seen.append((state, transition))
    return seen


def test_failures_below_the_threshold_keep_the_probe_healthy() -> None:
    seen = _run([FAIL, FAIL])
    assert [s.consecutive_failures for s, _ in seen] == [1, 2]
    assert all(s.healthy for s, _ in seen)
    assert [t for _, t in seen] == [Transition.NONE, Transition.NONE]


def test_healthy_unhealthy_healthy() -> None:
    seen = _run([FAIL, FAIL, FAIL, FAIL, PASS, PASS])
    transitions = [t for _, t in seen]
    assert transitions == [
        Transition.NONE,
        Transition.NONE,
        Transition.UNHEALTHY,
        Transition.NONE,  # reported once, not on every further failure
        Transition.RECOVERED,
        Transition.NONE,
    ]
    assert [s.healthy for s, _ in seen] == [True, True, False, False, True, True]
    assert seen[4][0].consecutive_failures == 0 and seen[4][0].last_ok is True
    assert seen[3][0].last_message == "connection refused" and seen[3][0].last_time == 3.0


def test_a_success_resets_the_count() -> None:
    seen = _run([FAIL, FAIL, PASS, FAIL, FAIL])
    assert all(s.healthy for s, _ in seen)
    assert seen[-1][0].consecutive_failures == 2


def test_after_a_restart_the_threshold_must_be_reached_again() -> None:
    state, transition = ProbeState(), Transition.NONE
    for _ in range(2):
        state, transition = record_outcome(state, FAIL, threshold=2, now=0.0)
    assert transition is Transition.UNHEALTHY
    state = after_restart(state)
    assert not state.healthy and state.consecutive_failures == 0
    state, transition = record_outcome(state, FAIL, threshold=2, now=1.0)
    assert transition is Transition.NONE
    state, transition = record_outcome(state, FAIL, threshold=2, now=2.0)
    assert transition is Transition.UNHEALTHY, "the next restart after another threshold"


def test_threshold_one_fails_at_once() -> None:
    _, transition = record_outcome(ProbeState(), FAIL, threshold=1, now=0.0)
    assert transition is Transition.UNHEALTHY


@pytest.mark.parametrize(
    ("head", "status"),
    [
        (b"HTTP/1.0 200 OK\r\nServer: x\r\n", 200),
        (b"HTTP/1.1 302 Found\r\n", 302),
        (b"HTTP/1.1 404 Not Found\n", 404),
        (b"HTTP/2 503\r\n", 503),
        (b"SSH-2.0-OpenSSH\r\n", None),
        (b"", None),
        (b"HTTP/1.1 abc\r\n", None),
    ],
)
def test_parse_http_status(head: bytes, status: int | None) -> None:
    assert parse_http_status(head) == status


def test_http_healthy_is_200_to_399() -> None:
    assert [http_healthy(c) for c in (199, 200, 301, 399, 400, 500)] == [
        False,
        True,
        True,
        True,
        False,
        False,
    ]


def test_probe_state_round_trips_through_the_state_file() -> None:
    state = ProbeState(
        healthy=False,
        consecutive_failures=4,
        last_ok=False,
        last_time=1_700_000_000.0,
        last_message="refused",
    )
    record = to_record(state)
    assert record.last_result == "failure" and record.last_time == "2023-11-14T22:13:20Z"
    assert from_record(record) == state
    assert from_record(ProbeRecord()) == ProbeState()


# --------------------------------------------------------------------------- counters


def test_counter_delta() -> None:
    assert counter_delta(None, 3) == 3, "first seen counts from zero"
    assert counter_delta(3, 5) == 2
    assert counter_delta(5, 5) == 0
    assert counter_delta(5, 2) == 2, "a reset counter counts from zero again"


def test_tracker_first_update_is_the_baseline() -> None:
    tracker: CounterTracker[str] = CounterTracker()
    assert tracker.update({"a": 7}) == {}
    assert tracker.primed
    assert tracker.update({"a": 7}) == {}
    assert tracker.update({"a": 9, "b": 1}) == {"a": 2, "b": 1}, "b is new: all of it counts"


def test_tracker_handles_a_reset_counter() -> None:
    tracker: CounterTracker[str] = CounterTracker()
    tracker.update({"a": 10})
    assert tracker.update({"a": 3}) == {"a": 3}
    assert tracker.update({"a": 4}) == {"a": 1}


def test_tracker_keeps_unreadable_counters_unless_told() -> None:
    tracker: CounterTracker[str] = CounterTracker()
    tracker.update({"a": 5})
    tracker.update({})  # a read failed this once
    assert tracker.update({"a": 6}) == {"a": 1}, "not 'new' again: no double report"
    tracker.update({}, forget_missing=True)
    assert tracker.update({"a": 6}) == {"a": 6}, "a listing without it: it was gone"


def test_tracker_retain_forgets_gone_keys() -> None:
    tracker: CounterTracker[tuple[str, str]] = CounterTracker()
    tracker.update({("x", "oom"): 2, ("y", "oom"): 1})
    tracker.retain(lambda key: key[0] == "x")
    assert tracker.update({("x", "oom"): 2, ("y", "oom"): 1}) == {("y", "oom"): 1}


def test_throttle_ratio() -> None:
    assert throttle_ratio(None, (100, 50), min_periods=10) is None
    assert throttle_ratio((100, 50), (200, 130), min_periods=10) == pytest.approx(0.8)
    assert throttle_ratio((100, 50), (105, 55), min_periods=10) is None, "too few periods"
    assert throttle_ratio((100, 50), (50, 10), min_periods=10) is None, "reset"


def test_throttle_is_reported_on_the_rising_edge_only() -> None:
    state = ThrottleState()

    def step(reading: tuple[int, int]) -> float | None:
        return throttle_step(state, reading, ratio=0.5, min_periods=10)

    assert step((0, 0)) is None
    assert step((100, 90)) == pytest.approx(0.9)
    assert step((200, 180)) is None, "still throttled: already reported"
    assert step((300, 190)) is None and not state.throttled, "calmed below half the ratio"
    assert step((400, 290)) == pytest.approx(1.0), "throttled again: reported again"


def test_parse_keyed() -> None:
    text = "oom_kill_disable 0\nunder_oom 0\noom_kill 3\nweird line here\n"
    assert parse_keyed(text) == {"oom_kill_disable": 0, "under_oom": 0, "oom_kill": 3}
    assert parse_keyed(None) == {}


def _write(directory: Path, files: Mapping[str, str]) -> str:
    directory.mkdir(parents=True)
    for name, text in files.items():
        (directory / name).write_text(text)
    return str(directory)


def test_counter_files_on_a_hybrid_v1_host(tmp_path: Path) -> None:
    dirs = [
        _write(tmp_path / "memory", {"memory.oom_control": "under_oom 0\noom_kill 2\n"}),
        _write(tmp_path / "cpu", {"cpu.stat": "nr_periods 40\nnr_throttled 30\n"}),
        _write(tmp_path / "pids", {"pids.events": "max 7\n"}),
        # the unified tree: a cpu.stat without throttling counters must not be chosen
        _write(tmp_path / "unified", {"cpu.stat": "usage_usec 5\n"}),
    ]
    files = find_counter_files(dirs)
    assert files.oom == (f"{dirs[0]}/memory.oom_control", "oom_kill")
    assert files.cpu == f"{dirs[1]}/cpu.stat"
    counters = read_counters(files)
    assert (counters.oom_kills, counters.pids_refused, counters.cpu) == (2, 7, (40, 30))


def test_counter_files_on_v2(tmp_path: Path) -> None:
    directory = _write(
        tmp_path / "env",
        {
            "memory.events": "low 0\nhigh 0\nmax 4\noom 1\noom_kill 1\n",
            "pids.events": "max 0\n",
            "cpu.stat": "usage_usec 1\nnr_periods 0\nnr_throttled 0\n",
        },
    )
    counters = read_counters(find_counter_files([directory]))
    assert (counters.oom_kills, counters.pids_refused, counters.cpu) == (1, 0, (0, 0))


def test_vanished_counter_files_read_as_none(tmp_path: Path) -> None:
    directory = _write(tmp_path / "env", {"pids.events": "max 1\n"})
    files = find_counter_files([directory])
    (tmp_path / "env" / "pids.events").unlink()
    assert read_counters(files).pids_refused is None


# --------------------------------------------------------------------------- escapes


def test_netns_match_needs_device_and_inode() -> None:
    pins = {(4, 4026532001): "web"}
    namespaces = [
        (10, (4, 4026532001)),  # in web's namespace
        (11, (5, 4026532001)),  # the same inode number on another device: not it
        (12, (4, 4026531840)),  # the host's namespace
    ]
    assert match_netns(namespaces, pins) == {10: "web"}


@pytest.fixture
def stats(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The pids whose /proc/PID/ns/net the scanner stats, in order."""
    calls: list[int] = []
    real = violations._netns_of

    def counting(pid: int) -> violations.NsId | None:
        calls.append(pid)
        return real(pid)

    monkeypatch.setattr(violations, "_netns_of", counting)
    return calls


def test_the_scanner_stats_only_processes_it_has_not_known_for_long(stats: list[int]) -> None:
    scanner = NetnsScanner(young=2.0)
    me = os.getpid()
    first = scanner.scan(now=100.0, full=False)
    assert me in first and me in stats, "a new entry is stat'ed"
    assert first[me].netns == violations._netns_of(me)
    stats.clear()
    scanner.scan(now=101.0, full=False)
    assert me in stats, "still young: stat'ed again (it may be about to enter a namespace)"
    stats.clear()
    scanner.scan(now=103.0, full=False)
    assert me in stats, "stat'ed once more, now that it is old enough to have settled"
    stats.clear()
    again = scanner.scan(now=104.0, full=False)
    assert me not in stats, "known for long: its namespace is remembered"
    assert again[me] == first[me]
    child = subprocess.Popen(["sleep", "30"])
    try:
        stats.clear()
        seen = scanner.scan(now=104.5, full=False)
        assert child.pid in seen and child.pid in stats, "a new process is stat'ed at once"
        assert me not in stats
    finally:
        child.kill()  # our own child, by its Popen handle
        child.wait(timeout=5)
    stats.clear()
    scanner.scan(now=105.0, full=True)
    assert me in stats, "a full scan stats everything"
    assert child.pid not in scanner.scan(now=105.5, full=False), "gone: forgotten"


def test_a_new_process_is_stated_on_two_scans_however_far_apart(stats: list[int]) -> None:
    """A process listed just before it entered a namespace (fork, then setns) is looked
    at again on the next pass, 5 s later: it is not trusted after one look."""
    scanner = NetnsScanner(young=2.0)
    me = os.getpid()
    scanner.scan(now=0.0, full=False)
    stats.clear()
    scanner.scan(now=5.0, full=False)
    assert me in stats
    stats.clear()
    scanner.scan(now=10.0, full=False)
    assert me not in stats


def test_the_scanner_skips_what_it_is_told_to(stats: list[int]) -> None:
    me = os.getpid()
    assert me not in NetnsScanner().scan(now=0.0, full=True, skip=frozenset({me}))
    assert me not in stats


def test_read_pids_lists_a_procs_file(tmp_path: Path) -> None:
    procs = tmp_path / "cgroup.procs"
    procs.write_text("12\n345\n")
    assert read_pids(str(procs)) == frozenset({12, 345})
    assert read_pids(str(tmp_path / "missing")) is None


def test_escape_is_a_netns_member_missing_from_a_cgroup_hierarchy() -> None:
    inside = {1: "web", 2: "web", 3: "web", 4: "gone"}
    cgroups = {
        "web": [frozenset({1, 2}), frozenset({1, 2, 3}), frozenset({1, 2})],
        "gone": [],  # no cgroup directory left: nothing to compare with
    }
    assert outside_cgroup(inside, cgroups) == {3: "web"}, "in one hierarchy, not the others"


def test_an_escape_is_described_by_pid_and_name() -> None:
    member = NetnsMember(env="web", pid=42, start_time=7, comm="sleep")
    assert member.ref.start_time == 7
    assert describe_escape(member).startswith("pid 42 (sleep) runs inside")


def test_young_processes_are_left_for_the_next_pass() -> None:
    assert not old_enough(1000, uptime=10.5, min_age=1.0, hz=100)
    assert old_enough(1000, uptime=11.0, min_age=1.0, hz=100)


# --------------------------------------------------------------------------- denied


def test_denied_counts_are_attributed_to_the_source_env() -> None:
    env_of = {"10.0.0.11": "a", "10.0.0.12": "b"}
    deltas = {
        ("10.0.0.11", "10.0.0.12"): 3,
        ("10.0.0.11", "10.0.0.99"): 1,
        ("10.0.0.50", "10.0.0.11"): 4,  # a source that is none of ours
    }
    per_env = denied_by_env(deltas, env_of)
    assert per_env == {"a": {"10.0.0.12": 3, "10.0.0.99": 1}}
    assert describe_denied(per_env["a"], env_of) == (
        "dropped by the isolation rules: 3 packets to 10.0.0.12 (env b), 1 packet to 10.0.0.99"
    )


# --------------------------------------------------------------------------- scheduler


def test_first_runs_are_spread_over_the_first_period() -> None:
    scheduler = Scheduler(rng=random.Random(1))
    keys = {(f"env{i}", "p"): 5.0 for i in range(50)}
    scheduler.sync(keys, now=100.0)
    first = scheduler.next_due()
    assert first is not None and 100.0 <= first <= 105.0
    assert len(scheduler.take_due(now=105.0)) == 50
    assert len(scheduler.take_due(now=102.5)) == 0


def test_an_overrunning_probe_is_never_started_twice() -> None:
    scheduler = Scheduler(rng=random.Random(0))
    key = ("web", "slow")
    scheduler.sync({key: 5.0}, now=0.0)
    assert scheduler.take_due(now=5.0) == [key]
    assert scheduler.running() == {key}
    assert scheduler.take_due(now=10.0) == [], "still running at its next period"
    assert scheduler.take_due(now=15.0) == []
    assert scheduler.overruns(key) == 2
    scheduler.finished(key)
    assert scheduler.take_due(now=15.5) == [], "the missed slots are skipped, not made up"
    assert scheduler.take_due(now=20.0) == [key]


def test_runs_keep_their_period() -> None:
    scheduler = Scheduler(rng=random.Random(0))
    key = ("web", "p")
    scheduler.sync({key: 2.0}, now=0.0)
    starts = []
    for tick in range(0, 100):
        now = tick / 10
        if scheduler.take_due(now=now):
            starts.append(now)
            scheduler.finished(key)
    gaps = {round(b - a, 1) for a, b in itertools.pairwise(starts)}
    assert gaps == {2.0}, starts


def test_sync_drops_and_reschedules() -> None:
    scheduler = Scheduler(rng=random.Random(0))
    scheduler.sync({("a", "p"): 10.0, ("b", "p"): 10.0}, now=0.0)
    scheduler.sync({("a", "p"): 1.0}, now=0.0)
    assert scheduler.take_due(now=1.0) == [("a", "p")], "b is gone; a's shorter period applies"
    scheduler.finished(("b", "p"))  # a finished run of a dropped probe is ignored


# --------------------------------------------------------------------------- actions


@pytest.mark.parametrize(
    ("violation", "policy", "action", "kill", "quarantine"),
    [
        ("oom", "alert", "alert", "none", False),
        ("oom", "kill", "kill", "none", False),  # the kernel already killed it
        ("oom", "quarantine", "quarantine", "none", True),
        ("pids-limit", "kill", "kill", "environment", False),
        ("escape", "kill", "kill", "offender", False),
        ("escape", "quarantine", "quarantine", "none", True),
        ("denied-connection", "kill", "kill", "environment", False),
        ("denied-connection", "quarantine", "quarantine", "none", True),
        ("cpu-throttled", "kill", "alert", "none", False),  # informational only
        ("cpu-throttled", "quarantine", "alert", "none", False),
    ],
)
def test_action_selection(
    violation: Any, policy: Any, action: str, kill: str, quarantine: bool
) -> None:
    decision = decide(violation, policy)
    assert (decision.action, decision.kill, decision.quarantine) == (action, kill, quarantine)


def _probe(**fields: Any) -> Probe:
    return Probe.model_validate({"name": "up", "tcp": {"port": 80}, **fields})


def test_restart_targets_default_to_every_process() -> None:
    assert restart_targets(_probe(), ["api", "worker"]) == ("api", "worker")
    assert restart_targets(_probe(restart=["api"]), ["api", "worker"]) == ("api",)


def test_release_requests_are_taken_once(tmp_path: Path) -> None:
    request_release(tmp_path, "web")
    assert release_pending(tmp_path, "web")
    assert take_release_requests(tmp_path) == ["web"]
    assert take_release_requests(tmp_path) == []
    assert not release_pending(tmp_path, "web")


# --------------------------------------------------------------------------- status


def _record(
    *,
    probes: Mapping[str, ProbeRecord] | None = None,
    quarantine: QuarantineRecord | None = None,
    spec: dict[str, Any] | None = None,
    spec_hash: str = "h1",
    phase: Any = "Ready",
    address: str | None = "10.9.0.11/24",
) -> EnvironmentRecord:
    return EnvironmentRecord(
        spec=spec or {"probes": [{"name": "up", "tcp": {"port": 80}}]},
        spec_hash=spec_hash,
        netns="rtunit-web",
        address=address,
        holder=ProcessRecord(pid=10, start_time=20),
        netns_inode=4026532001,
        phase=phase,
        probes=dict(probes or {}),
        quarantine=quarantine,
    )


def test_status_of_a_failing_probe_is_degraded() -> None:
    failing = ProbeRecord(healthy=False, consecutive_failures=3, last_message="refused")
    status = health_status(_record(probes={"up": failing}))
    assert status.phase == "Degraded"
    ready = next(c for c in status.conditions if c.type == "Ready")
    assert (ready.status, ready.reason) == ("False", "ProbeFailed")
    assert "probe up failing: refused" in ready.message
    assert status.probes == [
        {
            "name": "up",
            "healthy": False,
            "consecutiveFailures": 3,
            "lastResult": None,
            "lastTime": None,
            "lastMessage": "refused",
        }
    ]


def test_status_of_a_healthy_env_is_unchanged() -> None:
    status = health_status(_record())
    assert status.phase == "Ready" and status.conditions == []
    assert status.probes[0]["healthy"] is True, "a probe that never ran is not failing"


def test_status_of_a_quarantined_env() -> None:
    quarantine = QuarantineRecord(since="t", reason="escape: pid 1", spec_hash="h1")
    status = health_status(_record(quarantine=quarantine))
    assert status.phase == "Degraded" and status.quarantined
    ready = next(c for c in status.conditions if c.type == "Ready")
    assert ready.reason == "Quarantined"


def test_a_failed_env_stays_failed() -> None:
    failing = ProbeRecord(healthy=False)
    assert health_status(_record(probes={"up": failing}, phase="Failed")).phase == "Failed"


def test_health_conditions_flip_and_keep_transition_times() -> None:
    failing = {"up": ProbeRecord(healthy=False, last_message="refused")}
    quarantine = QuarantineRecord(since="t", reason="oom: x", spec_hash="h")
    first = health_conditions([], probes=failing, quarantine=quarantine)
    assert {(c.type, c.status) for c in first} == {("Healthy", "False"), ("Quarantined", "True")}
    again = health_conditions(first, probes=failing, quarantine=quarantine)
    assert again == first, "nothing changed: identical (no state write)"
    healed = health_conditions(first, probes={"up": ProbeRecord()}, quarantine=None)
    assert {(c.type, c.status, c.reason) for c in healed} == {
        ("Healthy", "True", "ProbesPassing"),
        ("Quarantined", "False", "Released"),
    }
    assert health_conditions(healed, probes={}, quarantine=None) == [healed[1]]


def test_quarantined_in_state() -> None:
    state = StateDocument(
        environments={
            "a": _record(quarantine=QuarantineRecord(since="t", reason="r", spec_hash="h")),
            "b": _record(),
        }
    )
    assert quarantined_in(state) == {"a"}


def test_target_for_an_env() -> None:
    target = target_for("web", _record(), cgroup_procs=("/cg/web/cgroup.procs",))
    assert target.netns_path == "/run/netns/rtunit-web"
    assert target.address == "10.9.0.11" and target.holder is not None
    no_net = target_for("web", _record(spec={"namespaces": ["pid"]}, address=None), cgroup_procs=())
    assert no_net.netns_path is None and no_net.address == "127.0.0.1"


# --------------------------------------------------------------------------- the monitor


@dataclass
class FakeCgroups:
    root: Path

    @property
    def driver(self) -> Any:
        return "v2"

    def paths(self, *, env: str) -> tuple[str, ...]:
        return (str(self.root / env),)

    def procs_files(self, *, env: str) -> tuple[str, ...]:
        return (str(self.root / env / "cgroup.procs"),)


@dataclass
class FakeFirewall:
    counts: dict[tuple[str, str], int] = field(default_factory=dict)

    def denied_counts(self) -> dict[tuple[str, str], int]:
        return dict(self.counts)


@dataclass
class FakeDrivers:
    cgroups: Any
    firewall: Any
    processes: Any = None


@dataclass
class Events:
    seen: list[tuple[str, str, str]] = field(default_factory=list)

    def emit(self, *, type: Any, reason: str, kind: str, name: str, message: str) -> None:
        self.seen.append((reason, name, message))

    def reasons(self) -> list[str]:
        return [reason for reason, _, _ in self.seen]


@dataclass
class World:
    monitor: HealthMonitor
    events: Events
    firewall: FakeFirewall
    state: dict[str, StateDocument]
    requests: list[int]
    restarts: list[RestartRequest]


def _spec(policy: str = "alert", failure_threshold: int = 2) -> dict[str, Any]:
    return {
        "processes": [{"name": "api", "command": ["sleep", "1"]}],
        "probes": [{"name": "up", "tcp": {"port": 80}, "failureThreshold": failure_threshold}],
        "policy": {"onViolation": policy},
    }


@pytest.fixture
def world(tmp_path: Path) -> World:
    firewall = FakeFirewall()
    events = Events()
    holder: dict[str, StateDocument] = {
        "state": StateDocument(
            environments={
                "a": _record(spec=_spec("quarantine"), address="10.9.0.11/24"),
                "b": _record(spec=_spec("alert"), spec_hash="hb", address="10.9.0.12/24"),
            }
        )
    }
    requests: list[int] = []
    restarts: list[RestartRequest] = []
    monitor = HealthMonitor(
        instance="rtunit",
        drivers=FakeDrivers(cgroups=FakeCgroups(tmp_path / "cg"), firewall=firewall),
        state=lambda: holder["state"],
        events=events,
        request_reconcile=lambda: requests.append(1),
        restart=restarts.append,
        instance_dir=tmp_path / "instance",
        settings=HealthSettings(),
        clock=FakeClock(),
        wall=lambda: 1_700_000_000.0,
    )
    return World(monitor, events, firewall, holder, requests, restarts)


def test_monitor_probe_failures_become_a_restart_request(world: World) -> None:
    probe = Probe.model_validate(_spec()["probes"][0])
    monitor = world.monitor
    monitor.check_policy()  # syncs with the state
    assert monitor.record_probe("a", probe, FAIL) is Transition.NONE
    assert world.restarts == [] and world.requests == []
    assert monitor.record_probe("a", probe, FAIL) is Transition.UNHEALTHY
    assert world.restarts == [
        RestartRequest(
            env="a",
            processes=("api",),
            reason="probe up failed 2 times in a row: connection refused",
        )
    ]
    assert world.events.reasons() == ["ProbeFailed", "RestartRequested"]
    assert world.requests, "a flip is worth saving"
    state = monitor.results().environments["a"].probes["up"]
    assert not state.healthy and state.consecutive_failures == 0, "counting afresh"
    assert monitor.record_probe("a", probe, PASS) is Transition.RECOVERED
    assert world.events.reasons()[-1] == "ProbeRecovered"


def test_annotate_writes_health_into_a_copy(world: World) -> None:
    monitor = world.monitor
    monitor.check_policy()
    state = world.state["state"]
    assert monitor.annotate(state).environments["a"].probes == {"up": ProbeRecord()}
    annotated = monitor.annotate(state)
    assert annotated is not state and state.environments["a"].probes == {}
    assert monitor.annotate(annotated) is annotated, "nothing new: the same document"
    probe = Probe.model_validate(_spec()["probes"][0])
    monitor.record_probe("b", probe, FAIL)
    monitor.record_probe("b", probe, FAIL)
    record = monitor.annotate(annotated).environments["b"]
    assert record.probes["up"].healthy is False
    assert any(c.type == "Healthy" and c.status == "False" for c in record.conditions)


def test_denied_connection_quarantines_and_a_manifest_change_lifts_it(world: World) -> None:
    monitor, firewall = world.monitor, world.firewall
    firewall.counts = {("10.9.0.11", "10.9.0.12"): 5}
    assert monitor.check_policy() == [], "the first pass is the baseline"
    firewall.counts = {("10.9.0.11", "10.9.0.12"): 7, ("10.9.0.12", "10.9.0.11"): 1}
    recorded = monitor.check_policy()
    assert [(v.type, v.action) for v in recorded] == [
        ("denied-connection", "quarantine"),
        ("denied-connection", "alert"),
    ]
    assert "2 packets to 10.9.0.12 (env b)" in recorded[0].detail
    assert monitor.quarantined() == {"a"}
    assert world.events.reasons().count("Violation") == 2
    assert "Quarantined" in world.events.reasons()
    annotated = monitor.annotate(world.state["state"])
    assert annotated.environments["a"].quarantine is not None
    assert quarantined_in(annotated) == {"a"}
    assert monitor.check_policy() == [], "no new drops, no new violation"
    # The manifest of a changes (new spec hash): the quarantine is lifted.
    changed = world.state["state"].model_copy(deep=True)
    changed.environments["a"].spec_hash = "h2"
    world.state["state"] = changed
    monitor.check_policy()
    assert monitor.quarantined() == frozenset()
    assert world.events.reasons()[-1] == "Released"


def test_release_request_lifts_a_quarantine(world: World, tmp_path: Path) -> None:
    monitor, firewall = world.monitor, world.firewall
    monitor.check_policy()
    firewall.counts = {("10.9.0.11", "10.9.0.12"): 1}
    monitor.check_policy()
    assert monitor.quarantined() == {"a"}
    request_release(tmp_path / "instance", "a")
    request_release(tmp_path / "instance", "b")  # not quarantined: consumed, ignored
    monitor.check_policy()
    assert monitor.quarantined() == frozenset()
    assert take_release_requests(tmp_path / "instance") == []
    assert world.events.reasons().count("Released") == 1


def test_violation_history_is_bounded(world: World) -> None:
    monitor, firewall = world.monitor, world.firewall
    monitor.check_policy()
    for count in range(1, 30):
        firewall.counts = {("10.9.0.12", "10.9.0.99"): count}
        monitor.check_policy()
    history = monitor.results().environments["b"].violations
    assert len(history) == HealthSettings().history
    assert all(isinstance(v, ViolationRecord) for v in history)


def test_the_state_seeds_a_restarted_monitor(world: World) -> None:
    state = world.state["state"].model_copy(deep=True)
    state.environments["a"].quarantine = QuarantineRecord(since="t", reason="r", spec_hash="h1")
    state.environments["a"].probes = {"up": ProbeRecord(healthy=False, consecutive_failures=1)}
    world.state["state"] = state
    world.monitor.check_policy()
    assert world.monitor.quarantined() == {"a"}
    assert not world.monitor.results().environments["a"].probes["up"].healthy


def test_gone_environments_are_forgotten(world: World) -> None:
    world.monitor.check_policy()
    state = world.state["state"].model_copy(deep=True)
    del state.environments["b"]
    world.state["state"] = state
    world.monitor.check_policy()
    assert set(world.monitor.results().environments) == {"a"}


# --------------------------------------------------------------------------- tcp / http (no netns)


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200 if self.path == "/ok" else 404)
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        del format, args


@pytest.fixture
def web() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def _host_target() -> ProbeTarget:
    """A target in this process's own network namespace (no pin to enter)."""
    return ProbeTarget(
        env="local",
        netns_path=None,
        netns_inode=None,
        address="127.0.0.1",
        holder=None,
        cgroup_procs=(),
    )


def _check(**fields: Any) -> ProbeOutcome:
    probe = Probe.model_validate({"name": "p", "timeoutSeconds": 2, **fields})
    return run_probe(probe, _host_target(), processes=None)  # type: ignore[arg-type]


def test_http_probe_status_decides(web: int) -> None:
    passed = _check(http={"port": web, "path": "/ok"})
    assert passed.ok and passed.message == f"GET http://127.0.0.1:{web}/ok: HTTP 200"
    failed = _check(http={"port": web, "path": "/missing"})
    assert not failed.ok and failed.message.endswith("HTTP 404")
    assert _check(tcp={"port": web}).ok


def test_tcp_probe_on_a_closed_port_fails(web: int) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, not listening: refused
        outcome = _check(tcp={"port": port})
    assert not outcome.ok and "Connection refused" in outcome.message


def test_exec_probe_without_a_holder_fails_cleanly() -> None:
    outcome = _check(exec={"command": ["true"]})
    assert not outcome.ok and "no holder process" in outcome.message


def test_a_silent_server_times_out_and_a_stop_cancels_sooner() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(4)  # accepts (kernel backlog), never answers
        port = server.getsockname()[1]
        timed_out = _check(http={"port": port}, timeoutSeconds=1, periodSeconds=1)
        assert not timed_out.ok and "no response within 1s" in timed_out.message
        assert 0.9 <= timed_out.seconds < 2.0
        cancel = threading.Event()
        threading.Timer(0.2, cancel.set).start()
        probe = Probe.model_validate(
            {"name": "p", "http": {"port": port}, "timeoutSeconds": 30, "periodSeconds": 60}
        )
        outcome = run_probe(probe, _host_target(), processes=None, cancel=cancel)  # type: ignore[arg-type]
        assert not outcome.ok and "cancelled" in outcome.message
        assert outcome.seconds < 2.0, "a stopping monitor does not wait out a 30 s timeout"


def test_budget_slices() -> None:
    cancel = threading.Event()
    budget = Budget(10.0, cancel)
    assert 0 < budget.slice() <= Budget.SLICE
    cancel.set()
    with pytest.raises(ProbeError, match="cancelled"):
        budget.slice()
    with pytest.raises(TimeoutError):
        Budget(0.0).slice()
