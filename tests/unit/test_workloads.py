"""Workload decisions (reconciler.engine.workloads), without a kernel.

The pure functions (`wants_restart`, `backoff_delay`, `plan_reasons`, `next_wakeup`) are
checked case by case. `WorkloadConverger` runs against `FakeDriver`, an in-memory
`ProcessDriver` whose processes live and die when the test says so and which records
every spawn and stop: a test moves a fake clock (`now` is an argument of every decision),
makes a process exit with a code, converges, and reads what was started or stopped and
what the record says.

A Hypothesis property drives random (exit code, run duration) sequences through the
converger and checks the crash-loop arithmetic: delays are never negative nor above
`MAX_BACKOFF`, and `restarts` is always the number of starts minus one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reconciler.engine.workloads import (
    BASE_BACKOFF,
    MAX_BACKOFF,
    STABLE_SECONDS,
    WorkloadConverger,
    backoff_delay,
    next_wakeup,
    plan_reasons,
    process_hash,
    wants_restart,
)
from reconciler.kernel.processes import ProcessDriver
from reconciler.kernel.types import ProcessRef
from reconciler.manifests.models import Process
from reconciler.state.model import EnvironmentRecord, WorkloadRecord

T0 = 1_000_000.0
HOLDER = ProcessRef(pid=10, start_time=1)
LOG_DIR = Path("/nonexistent/logs/web")


# --------------------------------------------------------------------------- builders


def proc(
    name: str = "api",
    *,
    command: Sequence[str] = ("python3", "-m", "http.server"),
    policy: str = "Always",
    env: Mapping[str, str] | None = None,
) -> Process:
    """A `spec.processes[]` entry, validated by the real model."""
    return Process.model_validate(
        {
            "name": name,
            "command": list(command),
            "env": dict(env or {}),
            "restartPolicy": policy,
        }
    )


def env_record(**processes: WorkloadRecord) -> EnvironmentRecord:
    """An environment record holding `processes` (everything else is irrelevant here)."""
    return EnvironmentRecord(spec={}, spec_hash="h", netns="rtunit-web", processes=dict(processes))


def running(process: Process, ref: ProcessRef, *, started_at: float = T0) -> WorkloadRecord:
    """The record of `process` running as `ref` since `started_at`."""
    return WorkloadRecord(
        pid=ref.pid,
        start_time=ref.start_time,
        spec_hash=process_hash(process),
        state="Running",
        started_at=started_at,
    )


# --------------------------------------------------------------------------- the fake driver


@dataclass(frozen=True)
class Spawn:
    """One `spawn` call, as the fake saw it."""

    name: str
    command: tuple[str, ...]
    environ: dict[str, str]
    ref: ProcessRef


@dataclass
class FakeDriver:
    """An in-memory `ProcessDriver`: processes run until `exit` or `stop` ends them."""

    next_pid: int = 100
    live: set[ProcessRef] = field(default_factory=set)
    exit_codes: dict[ProcessRef, int | None] = field(default_factory=dict)
    found: dict[str, ProcessRef] = field(default_factory=dict)
    spawns: list[Spawn] = field(default_factory=list)
    stops: list[ProcessRef] = field(default_factory=list)

    def spawn(
        self,
        *,
        env: str,
        holder: ProcessRef,
        cgroup_procs: tuple[str, ...],
        name: str,
        command: Sequence[str],
        environ: Mapping[str, str],
        working_dir: str,
        user: str | int,
        log_dir: Path,
    ) -> ProcessRef:
        """Start a fake process: a fresh pid, alive until told otherwise."""
        ref = ProcessRef(pid=self.next_pid, start_time=self.next_pid * 7)
        self.next_pid += 1
        self.live.add(ref)
        self.spawns.append(Spawn(name, tuple(command), dict(environ), ref))
        return ref

    def find(self, *, env: str, cgroup_procs: tuple[str, ...], name: str) -> ProcessRef | None:
        """What the test planted as running without a record."""
        ref = self.found.get(name)
        return ref if ref is not None and ref in self.live else None

    def alive(self, ref: ProcessRef) -> bool:
        """True until the process exited or was stopped."""
        return ref in self.live

    def stop(self, ref: ProcessRef, *, grace: float = 5.0) -> None:
        """Record the call; the process is gone afterwards."""
        self.stops.append(ref)
        self.live.discard(ref)
        self.exit_codes.setdefault(ref, 143)

    def exit_status(
        self, ref: ProcessRef, *, log_dir: Path, name: str, timeout: float = 0.0
    ) -> int | None:
        """The code the test made the process exit with (None: unknown)."""
        return None if ref in self.live else self.exit_codes.get(ref)

    # -- test controls

    def exit(self, ref: ProcessRef, code: int | None) -> None:
        """Make `ref` exit with `code` (None: no exit record, as when the shim died too)."""
        assert ref in self.live, f"{ref} is not running"
        self.live.discard(ref)
        self.exit_codes[ref] = code

    def plant(self, name: str) -> ProcessRef:
        """A workload that runs without any record of it (left by a previous controller)."""
        ref = ProcessRef(pid=self.next_pid, start_time=self.next_pid * 7)
        self.next_pid += 1
        self.live.add(ref)
        self.found[name] = ref
        return ref

    def reset_calls(self) -> None:
        self.spawns.clear()
        self.stops.clear()


def _typed(driver: FakeDriver) -> ProcessDriver:
    return driver  # mypy checks here that the fake satisfies the Protocol


def converge(
    driver: FakeDriver,
    record: EnvironmentRecord,
    processes: list[Process],
    *,
    now: float,
    fresh_holder: bool = False,
) -> list[str]:
    """One converge of `record` at time `now`."""
    converger = WorkloadConverger(
        env="web",
        driver=_typed(driver),
        holder=HOLDER,
        cgroup_procs=("/sys/fs/cgroup/memory/rtunit/web/cgroup.procs",),
        log_dir=LOG_DIR,
        now=now,
        hostname="webhost",
    )
    return converger.converge(record, processes, fresh_holder=fresh_holder)


def state_of(workload: WorkloadRecord) -> str:
    """The workload's state, read afresh (a plain `str`: no narrowing between converges)."""
    return workload.state


def current_ref(record: EnvironmentRecord, name: str = "api") -> ProcessRef:
    workload = record.processes[name]
    assert workload.pid is not None and workload.start_time is not None, workload
    return ProcessRef(pid=workload.pid, start_time=workload.start_time)


# --------------------------------------------------------------------------- wants_restart


@pytest.mark.parametrize(
    ("policy", "code", "expected"),
    [
        ("Always", 0, True),
        ("Always", 3, True),
        ("Always", None, True),
        ("OnFailure", 0, False),
        ("OnFailure", 3, True),
        ("OnFailure", None, True),  # unknown code: counted as a failure
        ("Never", 0, False),
        ("Never", 3, False),
        ("Never", None, False),
    ],
)
def test_wants_restart(policy: str, code: int | None, expected: bool) -> None:
    assert wants_restart(policy, code) is expected


# --------------------------------------------------------------------------- backoff_delay


def test_backoff_delay_doubles_from_one_second_and_is_capped() -> None:
    delays = [backoff_delay(n) for n in range(10)]
    assert delays == [0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0, 60.0]
    assert BASE_BACKOFF == 1.0
    assert MAX_BACKOFF == 60.0


def test_backoff_delay_of_a_negative_count_is_zero() -> None:
    assert backoff_delay(-3) == 0.0


def test_backoff_delay_of_a_huge_count_is_the_cap() -> None:
    assert backoff_delay(1024) == MAX_BACKOFF
    assert backoff_delay(10_000) == MAX_BACKOFF


def test_a_very_long_crash_loop_still_backs_off_at_the_cap() -> None:
    driver = FakeDriver()
    api = proc()
    record = env_record()
    converge(driver, record, [api], now=T0)
    record.processes["api"].crash_loop = 1024  # as recorded after 1024 quick failures
    driver.exit(current_ref(record), 1)
    converge(driver, record, [api], now=T0 + 1)
    workload = record.processes["api"]
    assert state_of(workload) == "Backoff"
    assert workload.backoff_until == pytest.approx(T0 + 1 + MAX_BACKOFF)


# --------------------------------------------------------------------------- plan_reasons


def test_plan_reasons_new_process() -> None:
    api = proc()
    reasons = plan_reasons(processes=[api], record=env_record(), alive={}, now=T0)
    assert reasons == ["process api is not started"]


def test_plan_reasons_running_and_alive_is_nothing() -> None:
    api = proc()
    record = env_record(api=running(api, ProcessRef(pid=5, start_time=5)))
    assert plan_reasons(processes=[api], record=record, alive={"api": True}, now=T0) == []


def test_plan_reasons_running_but_dead_is_drift() -> None:
    api = proc()
    record = env_record(api=running(api, ProcessRef(pid=5, start_time=5)))
    reasons = plan_reasons(processes=[api], record=record, alive={"api": False}, now=T0)
    assert reasons == ["drift: process api exited"]
    # A process the observation does not mention at all is not alive either.
    assert plan_reasons(processes=[api], record=record, alive={}, now=T0) == reasons


def test_plan_reasons_backoff_not_due_then_due() -> None:
    api = proc()
    workload = WorkloadRecord(
        spec_hash=process_hash(api), state="Backoff", backoff_until=T0 + 4, crash_loop=3
    )
    record = env_record(api=workload)
    assert plan_reasons(processes=[api], record=record, alive={}, now=T0 + 3.9) == []
    assert plan_reasons(processes=[api], record=record, alive={}, now=T0 + 4) == [
        "process api back-off expired"
    ]


def test_plan_reasons_exited_under_never_is_nothing() -> None:
    api = proc(policy="Never")
    workload = WorkloadRecord(spec_hash=process_hash(api), state="Exited", exit_code=0)
    record = env_record(api=workload)
    assert plan_reasons(processes=[api], record=record, alive={}, now=T0) == []


def test_plan_reasons_exited_then_spec_changed() -> None:
    old = proc(policy="Never")
    record = env_record(api=WorkloadRecord(spec_hash=process_hash(old), state="Exited"))
    new = proc(policy="Never", command=("python3", "-m", "http.server", "9090"))
    reasons = plan_reasons(processes=[new], record=record, alive={}, now=T0)
    assert reasons == ["process api changed"]


def test_plan_reasons_only_restart_policy_changed_is_nothing() -> None:
    old = proc(policy="Never")
    record = env_record(api=WorkloadRecord(spec_hash=process_hash(old), state="Exited"))
    reasons = plan_reasons(processes=[proc(policy="Always")], record=record, alive={}, now=T0)
    assert reasons == []


def test_plan_reasons_removed_from_spec() -> None:
    old = proc("old")
    record = env_record(old=running(old, ProcessRef(pid=5, start_time=5)))
    reasons = plan_reasons(processes=[], record=record, alive={"old": True}, now=T0)
    assert reasons == ["process old is no longer declared"]


def test_plan_reasons_removed_after_it_exited_is_nothing() -> None:
    record = env_record(old=WorkloadRecord(spec_hash="x", state="Exited", exit_code=0))
    assert plan_reasons(processes=[], record=record, alive={}, now=T0) == []


# --------------------------------------------------------------------------- next_wakeup


def test_next_wakeup_without_backoff_is_none() -> None:
    api = proc()
    records = {"web": env_record(api=running(api, ProcessRef(pid=5, start_time=5)))}
    assert next_wakeup(records, now=T0) is None
    assert next_wakeup({}, now=T0) is None


def test_next_wakeup_is_the_earliest_backoff_over_every_environment() -> None:
    records = {
        "web": env_record(api=WorkloadRecord(state="Backoff", backoff_until=T0 + 8)),
        "db": env_record(
            a=WorkloadRecord(state="Backoff", backoff_until=T0 + 2.5),
            b=WorkloadRecord(state="Exited", backoff_until=T0 + 1),  # stale: not backing off
        ),
    }
    assert next_wakeup(records, now=T0) == pytest.approx(2.5)


def test_next_wakeup_of_an_overdue_backoff_is_zero() -> None:
    records = {"web": env_record(api=WorkloadRecord(state="Backoff", backoff_until=T0 - 5))}
    assert next_wakeup(records, now=T0) == 0.0


# --------------------------------------------------------------------------- WorkloadConverger


def test_first_converge_starts_every_process() -> None:
    driver = FakeDriver()
    api, worker = proc("api", env={"PORT": "8080"}), proc("worker", command=("sleep", "9"))
    record = env_record()
    made = converge(driver, record, [api, worker], now=T0)
    assert sorted(s.name for s in driver.spawns) == ["api", "worker"]
    assert driver.stops == []
    assert len(made) == 2
    for spawn in driver.spawns:
        workload = record.processes[spawn.name]
        assert (workload.pid, workload.start_time) == (spawn.ref.pid, spawn.ref.start_time)
        assert state_of(workload) == "Running"
        assert workload.restarts == 0
        assert workload.started_at == T0
    [api_spawn] = [s for s in driver.spawns if s.name == "api"]
    assert api_spawn.environ == {"HOSTNAME": "webhost", "PORT": "8080"}
    assert record.processes["api"].spec_hash == process_hash(api)


def test_unchanged_running_process_makes_no_call() -> None:
    driver = FakeDriver()
    api = proc()
    record = env_record()
    converge(driver, record, [api], now=T0)
    driver.reset_calls()
    before = record.processes["api"].model_copy()
    assert converge(driver, record, [api], now=T0 + 100) == []
    assert driver.spawns == [] and driver.stops == []
    assert record.processes["api"] == before


def test_spec_change_stops_and_starts_again() -> None:
    driver = FakeDriver()
    record = env_record()
    converge(driver, record, [proc()], now=T0)
    old = current_ref(record)
    driver.reset_calls()
    changed = proc(command=("python3", "-m", "http.server", "9090"))
    made = converge(driver, record, [changed], now=T0 + 1)
    assert driver.stops == [old]
    assert [s.command for s in driver.spawns] == [("python3", "-m", "http.server", "9090")]
    workload = record.processes["api"]
    assert workload.restarts == 1
    assert state_of(workload) == "Running"
    assert workload.spec_hash == process_hash(changed)
    assert current_ref(record) == driver.spawns[0].ref
    assert any("spec changed" in line for line in made), made


def test_restart_policy_change_alone_restarts_nothing() -> None:
    driver = FakeDriver()
    record = env_record()
    converge(driver, record, [proc(policy="Always")], now=T0)
    driver.reset_calls()
    assert converge(driver, record, [proc(policy="Never")], now=T0 + 1) == []
    assert driver.spawns == [] and driver.stops == []


def test_quick_exits_back_off_with_a_doubling_delay() -> None:
    driver = FakeDriver()
    api = proc(policy="Always")
    record = env_record()
    now = T0
    converge(driver, record, [api], now=now)
    for expected_restarts, delay in enumerate([1.0, 2.0, 4.0, 8.0], start=1):
        now += 0.5  # a quick failure: well within STABLE_SECONDS
        driver.exit(current_ref(record), 1)
        driver.reset_calls()
        converge(driver, record, [api], now=now)
        workload = record.processes["api"]
        assert state_of(workload) == "Backoff"
        assert workload.exit_code == 1
        assert workload.backoff_until == pytest.approx(now + delay)
        assert workload.pid is None
        assert driver.spawns == []
        # Not due yet: nothing happens.
        assert converge(driver, record, [api], now=now + delay - 0.01) == []
        assert driver.spawns == []
        now += delay
        converge(driver, record, [api], now=now)
        assert len(driver.spawns) == 1
        assert state_of(workload) == "Running"
        assert workload.restarts == expected_restarts
        assert workload.backoff_until is None
        assert workload.started_at == now


def test_first_quick_exit_backs_off_one_second() -> None:
    driver = FakeDriver()
    api = proc()
    record = env_record()
    converge(driver, record, [api], now=T0)
    driver.exit(current_ref(record), 3)
    converge(driver, record, [api], now=T0 + 2)
    workload = record.processes["api"]
    assert (state_of(workload), workload.backoff_until, workload.restarts) == ("Backoff", T0 + 3, 0)
    converge(driver, record, [api], now=T0 + 3)
    assert (state_of(workload), workload.restarts) == ("Running", 1)
    assert len(driver.spawns) == 2


def test_a_stable_run_restarts_at_once_and_resets_the_crash_loop() -> None:
    driver = FakeDriver()
    api = proc()
    record = env_record()
    now = T0
    converge(driver, record, [api], now=now)
    for _ in range(3):  # three quick failures: crash loop 3
        now += 0.1
        driver.exit(current_ref(record), 1)
        converge(driver, record, [api], now=now)
        now = record.processes["api"].backoff_until or now
        converge(driver, record, [api], now=now)
    workload = record.processes["api"]
    assert workload.crash_loop == 3
    spawns = len(driver.spawns)
    now += STABLE_SECONDS + 1
    driver.exit(current_ref(record), 1)
    converge(driver, record, [api], now=now)
    assert state_of(workload) == "Running", "a stable run is restarted without a back-off"
    assert workload.crash_loop == 0
    assert workload.restarts == 4
    assert len(driver.spawns) == spawns + 1
    # The next quick failure starts counting from one again.
    now += 0.1
    driver.exit(current_ref(record), 1)
    converge(driver, record, [api], now=now)
    assert state_of(workload) == "Backoff"
    assert workload.backoff_until == pytest.approx(now + BASE_BACKOFF)


def test_on_failure_exit_zero_stays_exited() -> None:
    driver = FakeDriver()
    job = proc("job", policy="OnFailure")
    record = env_record()
    converge(driver, record, [job], now=T0)
    driver.exit(current_ref(record, "job"), 0)
    driver.reset_calls()
    converge(driver, record, [job], now=T0 + 30)
    workload = record.processes["job"]
    assert (state_of(workload), workload.exit_code, workload.restarts) == ("Exited", 0, 0)
    assert workload.pid is None
    assert converge(driver, record, [job], now=T0 + 60) == []
    assert driver.spawns == []


def test_on_failure_non_zero_exit_restarts() -> None:
    driver = FakeDriver()
    job = proc("job", policy="OnFailure")
    record = env_record()
    converge(driver, record, [job], now=T0)
    driver.exit(current_ref(record, "job"), 3)
    driver.reset_calls()
    converge(driver, record, [job], now=T0 + STABLE_SECONDS + 5)  # a stable run: no back-off
    workload = record.processes["job"]
    assert (state_of(workload), workload.restarts) == ("Running", 1)
    assert len(driver.spawns) == 1


@pytest.mark.parametrize("code", [0, 3])
def test_never_stays_exited_with_its_code(code: int) -> None:
    driver = FakeDriver()
    job = proc("job", policy="Never")
    record = env_record()
    converge(driver, record, [job], now=T0)
    driver.exit(current_ref(record, "job"), code)
    driver.reset_calls()
    made = converge(driver, record, [job], now=T0 + 1)
    workload = record.processes["job"]
    assert (state_of(workload), workload.exit_code, workload.restarts) == ("Exited", code, 0)
    assert driver.spawns == []
    assert made == [f"process job exited with code {code} (Never)"]


def test_exited_process_whose_spec_changed_is_started_again() -> None:
    driver = FakeDriver()
    job = proc("job", policy="Never")
    record = env_record()
    converge(driver, record, [job], now=T0)
    driver.exit(current_ref(record, "job"), 0)
    converge(driver, record, [job], now=T0 + 1)
    driver.reset_calls()
    changed = proc("job", policy="Never", command=("true",))
    converge(driver, record, [changed], now=T0 + 2)
    assert [s.command for s in driver.spawns] == [("true",)]
    assert record.processes["job"].state == "Running"


def test_fresh_holder_restarts_running_processes() -> None:
    driver = FakeDriver()
    api = proc()
    record = env_record()
    converge(driver, record, [api], now=T0)
    old = current_ref(record)
    driver.live.discard(old)  # the old holder's death took it along
    driver.reset_calls()
    made = converge(driver, record, [api], now=T0 + 50, fresh_holder=True)
    assert len(driver.spawns) == 1
    assert driver.stops == []
    workload = record.processes["api"]
    assert (state_of(workload), workload.restarts) == ("Running", 1)
    assert current_ref(record) != old
    assert any("holder recreated" in line for line in made), made


def test_fresh_holder_ends_a_backoff_at_once() -> None:
    driver = FakeDriver()
    api = proc()
    record = env_record()
    converge(driver, record, [api], now=T0)
    driver.exit(current_ref(record), 1)
    converge(driver, record, [api], now=T0 + 1)
    assert state_of(record.processes["api"]) == "Backoff"
    driver.reset_calls()
    made = converge(driver, record, [api], now=T0 + 1.1, fresh_holder=True)
    assert len(driver.spawns) == 1
    assert state_of(record.processes["api"]) == "Running"
    assert any("holder recreated" in line for line in made), made


def test_pending_record_adopts_the_running_process() -> None:
    driver = FakeDriver()
    api = proc()
    orphan = driver.plant("api")
    record = env_record()  # no record of it: a lost state file
    made = converge(driver, record, [api], now=T0)
    assert driver.spawns == [] and driver.stops == []
    assert current_ref(record) == orphan
    workload = record.processes["api"]
    assert state_of(workload) == "Running"
    assert workload.spec_hash == process_hash(api)
    assert made == [f"process api adopted (pid {orphan.pid})"]
    # Adopted is adopted: the next converge leaves it alone.
    assert converge(driver, record, [api], now=T0 + 1) == []
    assert driver.spawns == []


def test_nothing_to_adopt_starts_a_new_process() -> None:
    driver = FakeDriver()
    record = env_record(api=WorkloadRecord())  # Pending, as a crash mid-apply leaves it
    converge(driver, record, [proc()], now=T0)
    assert len(driver.spawns) == 1
    assert record.processes["api"].restarts == 0


def test_removed_process_is_stopped_and_forgotten() -> None:
    driver = FakeDriver()
    api, worker = proc("api"), proc("worker")
    record = env_record()
    converge(driver, record, [api, worker], now=T0)
    worker_ref = current_ref(record, "worker")
    api_ref = current_ref(record, "api")
    driver.reset_calls()
    made = converge(driver, record, [api], now=T0 + 1)
    assert driver.stops == [worker_ref]
    assert driver.spawns == []
    assert "worker" not in record.processes
    assert current_ref(record, "api") == api_ref
    assert made == ["process worker stopped (no longer declared)"]


def test_removed_process_that_had_exited_is_forgotten_without_a_stop() -> None:
    driver = FakeDriver()
    record = env_record(old=WorkloadRecord(spec_hash="x", state="Exited", exit_code=0))
    converge(driver, record, [], now=T0)
    assert driver.stops == []
    assert record.processes == {}


# --------------------------------------------------------------------------- property

# One event: the running process exits with this code after running this long.
_events = st.lists(
    st.tuples(
        st.one_of(st.none(), st.integers(min_value=0, max_value=255)),
        st.floats(min_value=0.0, max_value=3 * STABLE_SECONDS, allow_nan=False),
    ),
    min_size=1,
    max_size=40,
)


@settings(max_examples=200, deadline=None)
@given(policy=st.sampled_from(["Always", "OnFailure", "Never"]), events=_events)
def test_crash_loop_arithmetic_holds_for_any_exit_sequence(
    policy: str, events: list[tuple[int | None, float]]
) -> None:
    driver = FakeDriver()
    api = proc(policy=policy)
    record = env_record()
    now = T0
    converge(driver, record, [api], now=now)
    for code, duration in events:
        workload = record.processes["api"]
        if state_of(workload) == "Exited":
            break  # the policy said "no more"
        assert state_of(workload) == "Running"
        now += duration
        driver.exit(current_ref(record), code)
        converge(driver, record, [api], now=now)
        if state_of(workload) == "Backoff":
            assert workload.backoff_until is not None
            delay = workload.backoff_until - now
            assert 0 < delay <= MAX_BACKOFF
            assert delay == backoff_delay(workload.crash_loop)
            assert duration < STABLE_SECONDS, "a stable run must not back off"
            # Halfway there nothing happens; when due, it starts again.
            assert converge(driver, record, [api], now=now + delay / 2) == []
            now = workload.backoff_until
            converge(driver, record, [api], now=now)
        assert workload.restarts == len(driver.spawns) - 1
        assert workload.crash_loop >= 0
        assert backoff_delay(workload.crash_loop) <= MAX_BACKOFF
        if state_of(workload) == "Exited":
            assert not wants_restart(policy, code)
        else:
            assert state_of(workload) == "Running"
            assert wants_restart(policy, code)
    assert record.processes["api"].restarts == len(driver.spawns) - 1


def test_spec_change_during_backoff_starts_the_new_spec_at_once() -> None:
    driver = FakeDriver()
    broken = proc(command=("sh", "-c", "exit 3"))
    record = env_record()
    now = T0
    converge(driver, record, [broken], now=now)
    for _ in range(6):  # a long crash loop: the back-off is now 32 s
        now += 0.1
        driver.exit(current_ref(record), 3)
        converge(driver, record, [broken], now=now)
        now = record.processes["api"].backoff_until or now
        converge(driver, record, [broken], now=now)
    driver.exit(current_ref(record), 3)
    converge(driver, record, [broken], now=now + 0.1)
    assert state_of(record.processes["api"]) == "Backoff"
    driver.reset_calls()
    fixed = proc(command=("sleep", "3600"))
    converge(driver, record, [fixed], now=now + 0.2)
    assert [s.command for s in driver.spawns] == [("sleep", "3600")]
    workload = record.processes["api"]
    assert state_of(workload) == "Running"
    assert workload.crash_loop == 0
