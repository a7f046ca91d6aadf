"""The health monitor: probes on a schedule, a policy pass, actions, and what status shows.

Threads (daemons; `stop()` ends them):

- **dispatcher** (`reconciler-health`): keeps the `Scheduler` in line with the probes the
  environments declare, and hands due probes to the pool. It sleeps until the next probe
  is due or it is `poke()`d (the controller pokes it after every reconcile: a new state
  document); with `tick` set it also re-reads the state at least that often (for owners
  that do not poke). Nothing else, so it never blocks.
- **pool** (`workers` threads): runs probes, each bounded by its own timeout (exec probes
  are killed at it), and the default restarts. A probe still running when its next period
  comes is not started again (the slot is skipped and counted as an overrun).
- **policy** (`reconciler-policy`): every `policy_period` seconds (default 5, the default
  probe period, so a violation is noticed within two periods) one pass: release
  requests, quarantine lifting, cgroup counters, escapes, denied connections, actions.
  A pass costs little when nothing happens: three small file reads per environment, a
  listing of /proc, and the firewall's counters; /proc entries and cgroup memberships
  already judged are not re-read until the full rescan (`escape_rescan`; the detection
  bound is in `violations`).

The monitor never writes the state file: the controller's worker is its only writer. The
monitor keeps probe states, violation history and quarantines in memory (seeded from the
state at start), and the controller folds them into each document it saves
(`annotate`). Whenever something worth saving happened, or the engine must act (a
quarantine to render, released or lifted), the monitor calls `request_reconcile()`.

The seam, for the controller (a few lines):

    monitor = HealthMonitor(
        instance=..., drivers=drivers, state=lambda: self._state,
        events=runtime.events, request_reconcile=lambda: self._queue.add(ALL),
        instance_dir=runtime.store.dir,
    )
    monitor.start() ... monitor.stop()
    state = monitor.annotate(outcome.state)          # before saving
    isolation_spec(..., quarantined=monitor.quarantined())

and for `status`: `health_status(record)` (phase, conditions, probes, violations), and for
a one-shot `apply` with no monitor: `quarantined_in(state)`.

Decisions (`Scheduler`, `record_outcome`, `decide`, the counter trackers,
`health_conditions`, `health_status`) are pure; the monitor only wires them to I/O.
"""

from __future__ import annotations

import contextlib
import os
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import structlog
from pydantic import ValidationError

from reconciler.errors import ReconcilerError
from reconciler.health.actions import (
    RestartRequest,
    decide,
    kill_environment,
    kill_offender,
    restart_targets,
    stop_for_restart,
    take_release_requests,
)
from reconciler.health.probes import (
    ProbeOutcome,
    ProbeState,
    ProbeTarget,
    Transition,
    after_restart,
    from_record,
    record_outcome,
    rfc3339,
    run_probe,
    target_for,
    to_record,
)
from reconciler.health.violations import (
    CounterFiles,
    CounterTracker,
    NetnsMember,
    NetnsScanner,
    NsId,
    ThrottleState,
    Violation,
    cgroup_pids,
    denied_by_env,
    describe_denied,
    describe_escape,
    find_counter_files,
    identify,
    outside_cgroup,
    read_counters,
    read_pids,
    still_in_netns,
    throttle_step,
    uptime,
)
from reconciler.kernel.cgroupfs import format_bytes
from reconciler.kernel.processes import ProcessDriver
from reconciler.kernel.types import CgroupDriver, FirewallDriver
from reconciler.manifests.models import EnvironmentSpec, Probe
from reconciler.state.conditions import set_condition
from reconciler.state.events import EventType
from reconciler.state.model import (
    VIOLATION_HISTORY,
    Condition,
    EnvironmentRecord,
    Phase,
    ProbeRecord,
    QuarantineRecord,
    StateDocument,
    ViolationRecord,
)

log = structlog.get_logger("reconciler.health")

ProbeKey = tuple[str, str]  # (environment, probe)
_ACTIVE_PHASES = ("Ready", "Degraded")
_REASON_MAX = 300


# --------------------------------------------------------------------------- scheduler (pure)


@dataclass
class _Slot:
    period: float
    due: float
    running: bool = False
    overruns: int = 0


class Scheduler:
    """When each probe runs next. Pure: the caller passes `now`.

    A probe is due every `period` seconds from its first run, which is spread over its
    first period (50 envs started together must not probe in one burst). A probe still
    running when it comes due again is not handed out twice: the slot is skipped and
    counted in `overruns`.
    """

    def __init__(self, *, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()
        self._slots: dict[ProbeKey, _Slot] = {}

    def sync(self, periods: Mapping[ProbeKey, float], *, now: float) -> None:
        """Track exactly the probes in `periods` (key → period in seconds)."""
        for key in list(self._slots):
            if key not in periods:
                del self._slots[key]
        for key, period in periods.items():
            slot = self._slots.get(key)
            if slot is None:
                self._slots[key] = _Slot(period=period, due=now + self._rng.uniform(0, period))
            elif slot.period != period:
                slot.period = period
                slot.due = min(slot.due, now + period)

    def take_due(self, *, now: float) -> list[ProbeKey]:
        """The probes to start now; they count as running until `finished`."""
        due: list[ProbeKey] = []
        for key, slot in self._slots.items():
            if slot.due > now:
                continue
            if slot.running:
                slot.overruns += 1
            else:
                slot.running = True
                due.append(key)
            while slot.due <= now:  # slots missed while busy are skipped, not made up
                slot.due += slot.period
        return due

    def finished(self, key: ProbeKey) -> None:
        """The probe's run is over (a key no longer tracked is ignored)."""
        slot = self._slots.get(key)
        if slot is not None:
            slot.running = False

    def next_due(self) -> float | None:
        """When the next probe comes due (None: no probes)."""
        return min((slot.due for slot in self._slots.values()), default=None)

    def overruns(self, key: ProbeKey) -> int:
        """How many periods `key` was still running when it came due."""
        slot = self._slots.get(key)
        return slot.overruns if slot else 0

    def running(self) -> frozenset[ProbeKey]:
        """The probes handed out and not finished."""
        return frozenset(k for k, s in self._slots.items() if s.running)


# --------------------------------------------------------------------------- status (pure)


def health_conditions(
    conditions: list[Condition],
    *,
    probes: Mapping[str, ProbeRecord],
    quarantine: QuarantineRecord | None,
) -> list[Condition]:
    """The record's conditions with `Healthy` and `Quarantined` brought up to date."""
    updated = list(conditions)
    failing = sorted(name for name, probe in probes.items() if not probe.healthy)
    if failing:
        first = probes[failing[0]]
        updated = set_condition(
            updated,
            type="Healthy",
            status="False",
            reason="ProbeFailed",
            message=f"probe {', '.join(failing)} failing: {first.last_message}",
        )
    elif probes:
        updated = set_condition(updated, type="Healthy", status="True", reason="ProbesPassing")
    else:
        updated = [c for c in updated if c.type != "Healthy"]
    if quarantine is not None:
        updated = set_condition(
            updated,
            type="Quarantined",
            status="True",
            reason="PolicyViolation",
            message=quarantine.reason,
        )
    elif any(c.type == "Quarantined" and c.status == "True" for c in updated):
        updated = set_condition(updated, type="Quarantined", status="False", reason="Released")
    return updated


@dataclass(frozen=True)
class HealthStatus:
    """What `status` shows about one environment's health (contract section 4)."""

    phase: Phase
    conditions: list[Condition]
    probes: list[dict[str, Any]]
    violations: list[dict[str, Any]]
    quarantined: bool


def health_status(record: EnvironmentRecord) -> HealthStatus:
    """Phase, conditions, probes and violations for `status`, from the recorded health.

    A `Ready` environment with a failing probe, or quarantined, is `Degraded`, with a
    `Ready=False` condition that says why (shown, not stored: the engine owns `Ready`).
    """
    declared = [str(p.get("name")) for p in record.spec.get("probes", []) if p.get("name")]
    probes = {name: record.probes.get(name, ProbeRecord()) for name in declared}
    failing = [name for name, probe in probes.items() if not probe.healthy]
    phase = record.phase
    conditions = list(record.conditions)
    if phase == "Ready" and (failing or record.quarantine is not None):
        phase = "Degraded"
        if record.quarantine is not None:
            reason, message = "Quarantined", record.quarantine.reason
        else:
            first = probes[failing[0]]
            reason = "ProbeFailed"
            message = f"probe {', '.join(failing)} failing: {first.last_message}"
        conditions = set_condition(
            conditions, type="Ready", status="False", reason=reason, message=message
        )
    return HealthStatus(
        phase=phase,
        conditions=conditions,
        probes=[
            {"name": name, **probe.model_dump(mode="json", by_alias=True)}
            for name, probe in probes.items()
        ],
        violations=[v.model_dump(mode="json", by_alias=True) for v in record.violations],
        quarantined=record.quarantine is not None,
    )


def quarantined_in(state: StateDocument) -> frozenset[str]:
    """The environments the state records as quarantined (for `apply` without a monitor)."""
    return frozenset(name for name, r in state.environments.items() if r.quarantine is not None)


# --------------------------------------------------------------------------- the monitor


class HealthDrivers(Protocol):
    """The drivers the monitor uses (the engine's `Drivers` has them all)."""

    @property
    def cgroups(self) -> CgroupDriver: ...

    @property
    def firewall(self) -> FirewallDriver: ...

    @property
    def processes(self) -> ProcessDriver: ...


class EventSink(Protocol):
    """Where events go (`reconciler.state.events.EventLog` is one)."""

    def emit(self, *, type: EventType, reason: str, kind: str, name: str, message: str) -> object:
        """Record one event."""
        ...


@dataclass(frozen=True)
class HealthSettings:
    """How the monitor paces itself."""

    workers: int = 8  # probes running at once
    policy_period: float = 5.0  # seconds between policy passes
    throttle_ratio: float = 0.5  # cpu-throttled above this share of throttled periods
    throttle_min_periods: int = 20  # ... measured over at least this many CFS periods
    escape_min_age: float = 1.0  # seconds a process must have run before it is judged
    escape_rescan: float = 60.0  # every process and membership re-read at least this often
    history: int = VIOLATION_HISTORY  # violations kept per environment
    tick: float | None = 1.0  # the dispatcher re-reads the state at least this often
    # (None: only when poked or a probe is due - for owners that poke after each change)


@dataclass(frozen=True)
class EnvHealth:
    """One environment's health, as the monitor knows it now."""

    probes: Mapping[str, ProbeState]
    violations: tuple[ViolationRecord, ...]
    quarantine: QuarantineRecord | None


@dataclass(frozen=True)
class HealthSnapshot:
    """Every environment's health at one instant."""

    environments: Mapping[str, EnvHealth]

    def quarantined(self) -> frozenset[str]:
        """The quarantined environments."""
        return frozenset(n for n, h in self.environments.items() if h.quarantine is not None)


@dataclass
class _Env:
    """The monitor's memory of one environment (guarded by the monitor's lock)."""

    spec_hash: str
    probe_defs: dict[str, Probe]
    processes: tuple[str, ...]
    probes: dict[str, ProbeState]
    violations: deque[ViolationRecord]
    quarantine: QuarantineRecord | None
    files: CounterFiles | None = None
    throttle: ThrottleState = field(default_factory=ThrottleState)


@dataclass(frozen=True)
class _View:
    """One environment as the current state snapshot shows it."""

    name: str
    record: EnvironmentRecord
    spec: EnvironmentSpec | None

    @property
    def active(self) -> bool:
        return self.record.phase in _ACTIVE_PHASES and self.record.holder is not None

    @property
    def address(self) -> str | None:
        return self.record.address.split("/")[0] if self.record.address else None


class HealthMonitor:
    """Probes and policy for every environment of one instance (see the module docstring)."""

    def __init__(
        self,
        *,
        instance: str,
        drivers: HealthDrivers,
        state: Callable[[], StateDocument],
        events: EventSink,
        request_reconcile: Callable[[], None],
        restart: Callable[[RestartRequest], None] | None = None,
        instance_dir: Path | None = None,
        settings: HealthSettings | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        """`state` returns the current document, which nobody mutates afterwards (the
        controller's qualifies: every reconcile works on a copy). `restart`: who executes
        restart requests; by default the monitor stops the processes itself and requests
        a reconcile. `instance_dir`: where `reconciler release` leaves its requests."""
        self.instance = instance
        self._drivers = drivers
        self._state = state
        self._events = events
        self._request_reconcile = request_reconcile
        self._restart = restart
        self._instance_dir = instance_dir
        self.settings = settings or HealthSettings()
        self._clock = clock
        self._wall = wall
        self._lock = threading.Lock()  # guards the memory below, never held during I/O
        self._policy_lock = threading.Lock()
        self._scheduler = Scheduler(rng=rng)
        self._envs: dict[str, _Env] = {}
        self._specs: dict[str, EnvironmentSpec | None] = {}  # by spec hash
        self._oom: CounterTracker[str] = CounterTracker()
        self._pids: CounterTracker[str] = CounterTracker()
        self._denied: CounterTracker[tuple[str, str]] = CounterTracker()
        self._escapes_seen: set[tuple[int, int]] = set()  # (pid, start time) reported
        self._escape_ns: dict[tuple[int, int], NsId] = {}  # escaped (pid, start) -> its netns
        self._scanner = NetnsScanner()
        self._members: dict[int, tuple[int, str]] = {}  # pid -> (/proc entry, env): judged in
        self._next_rescan: float | None = None  # None: the next escape pass is a full one
        self._pins: tuple[StateDocument, dict[NsId, str]] | None = None  # per state document
        self._paths: dict[str, tuple[str, ...]] = {}  # env -> cgroup directories
        self._planned: StateDocument | None = None  # the state the dispatch plan is for
        self._plan: dict[ProbeKey, tuple[Probe, ProbeTarget]] = {}
        self._stopping = threading.Event()
        self._wake = threading.Event()
        self._threads: list[threading.Thread] = []
        self._pool: ThreadPoolExecutor | None = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        """Start the dispatcher, the policy loop and the probe pool."""
        if self._threads:
            raise RuntimeError("health monitor already started")
        self._stopping.clear()
        self._sync(self._state())
        self._pool = ThreadPoolExecutor(
            max_workers=self.settings.workers, thread_name_prefix="reconciler-probe"
        )
        for name, target in (
            ("reconciler-health", self._dispatch_loop),
            ("reconciler-policy", self._policy_loop),
        ):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        log.info("health.started", instance=self.instance, workers=self.settings.workers)

    def stop(self, *, timeout: float = 10.0) -> None:
        """Stop the loops; probes in flight are cancelled (within half a second, their
        exec processes killed) and their outcome is not recorded."""
        self._stopping.set()
        self._wake.set()
        for thread in self._threads:
            thread.join(timeout=timeout)
        self._threads.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def poke(self) -> None:
        """Re-read the state now (after a reconcile), instead of within `tick`."""
        self._wake.set()

    # ------------------------------------------------------------------ read side

    def results(self) -> HealthSnapshot:
        """Every environment's probes, violations and quarantine, now."""
        with self._lock:
            return HealthSnapshot(
                environments={
                    name: EnvHealth(
                        probes={n: env.probes.get(n, ProbeState()) for n in sorted(env.probe_defs)},
                        violations=tuple(env.violations),
                        quarantine=env.quarantine,
                    )
                    for name, env in sorted(self._envs.items())
                }
            )

    def quarantined(self) -> frozenset[str]:
        """The environments whose network must be cut (feed to `isolation_spec`)."""
        with self._lock:
            return frozenset(n for n, env in self._envs.items() if env.quarantine is not None)

    def annotate(self, state: StateDocument) -> StateDocument:
        """`state` with every environment's health fields as the monitor knows them.

        Returns `state` itself when nothing differs, else a copy (the input is never
        mutated: the controller compares it with what it saves). `state` is taken as the
        document about to become current: the monitor syncs with it first (a changed spec
        lifts a quarantine and resets changed probes now, not a tick later).
        """
        self._sync(state)
        updates: dict[str, tuple[dict[str, ProbeRecord], list[ViolationRecord], Any, Any]] = {}
        with self._lock:
            for name, record in state.environments.items():
                env = self._envs.get(name)
                if env is None or env.spec_hash != record.spec_hash:
                    continue  # not synced with this spec yet: the next annotate will be
                probes = {n: to_record(env.probes.get(n, ProbeState())) for n in env.probe_defs}
                violations = list(env.violations)
                conditions = health_conditions(
                    record.conditions, probes=probes, quarantine=env.quarantine
                )
                current = (record.probes, record.violations, record.quarantine, record.conditions)
                wanted = (probes, violations, env.quarantine, conditions)
                if current != wanted:
                    updates[name] = wanted
        if not updates:
            return state
        copy = state.clone()
        for name, (probes, violations, quarantine, conditions) in updates.items():
            record = copy.environments[name]
            record.probes = probes
            record.violations = violations
            record.quarantine = quarantine
            record.conditions = conditions
        return copy

    # ------------------------------------------------------------------ state sync

    def _spec(self, record: EnvironmentRecord) -> EnvironmentSpec | None:
        spec = self._specs.get(record.spec_hash)
        if spec is None and record.spec_hash not in self._specs:
            try:
                spec = EnvironmentSpec.model_validate(record.spec)
            except ValidationError:
                spec = None  # written by an older schema: no probes rather than a crash
            if len(self._specs) > 4096:
                self._specs.clear()
            self._specs[record.spec_hash] = spec
        return spec

    def _sync(self, state: StateDocument) -> dict[str, _View]:
        """Bring the monitor's memory in line with `state`; the views of its envs."""
        views: dict[str, _View] = {}
        lifted: list[str] = []
        with self._lock:
            for name, record in state.environments.items():
                spec = self._spec(record)
                views[name] = _View(name=name, record=record, spec=spec)
                env = self._envs.get(name)
                if env is None:
                    env = self._envs[name] = self._seed(record, spec)
                elif env.spec_hash != record.spec_hash:
                    self._respec(env, record, spec)
                if env.quarantine is not None and env.quarantine.spec_hash != record.spec_hash:
                    env.quarantine = None
                    lifted.append(name)
            for gone in set(self._envs) - set(state.environments):
                del self._envs[gone]
                self._paths.pop(gone, None)
        for name in lifted:
            self._released(name, why="its manifest changed")
        return views

    def _seed(self, record: EnvironmentRecord, spec: EnvironmentSpec | None) -> _Env:
        """First sight of an env: continue from what the state recorded."""
        defs = {p.name: p for p in spec.probes} if spec else {}
        return _Env(
            spec_hash=record.spec_hash,
            probe_defs=defs,
            processes=tuple(p.name for p in spec.processes) if spec else (),
            probes={n: from_record(r) for n, r in record.probes.items() if n in defs},
            violations=deque(record.violations, maxlen=self.settings.history),
            quarantine=record.quarantine,
        )

    @staticmethod
    def _respec(env: _Env, record: EnvironmentRecord, spec: EnvironmentSpec | None) -> None:
        """A new spec: probes whose definition changed start afresh; files are re-found."""
        defs = {p.name: p for p in spec.probes} if spec else {}
        env.probes = {n: s for n, s in env.probes.items() if env.probe_defs.get(n) == defs.get(n)}
        env.probe_defs = defs
        env.processes = tuple(p.name for p in spec.processes) if spec else ()
        env.spec_hash = record.spec_hash
        env.files = None

    # ------------------------------------------------------------------ probes

    def _dispatch_loop(self) -> None:
        while not self._stopping.is_set():
            self._wake.clear()  # before looking: a poke from now on is not lost
            try:
                self._dispatch_due()
            except Exception as exc:  # a bug must not end health checking
                log.error("health.dispatch_failed", error=repr(exc))
            self._wake.wait(timeout=self._dispatch_wait())

    def _dispatch_wait(self) -> float | None:
        """Seconds until the next probe is due, at most `tick`; None: until poked."""
        with self._lock:
            due = self._scheduler.next_due()
        wait = None if due is None else max(due - self._clock(), 0.0)
        tick = self.settings.tick
        if tick is None:
            return wait
        return tick if wait is None else min(wait, tick)

    def _dispatch_due(self) -> None:
        state = self._state()
        if state is not self._planned:
            self._replan(state)
        now = self._clock()
        with self._lock:
            due = self._scheduler.take_due(now=now)
        pool = self._pool
        for key in due:
            planned = self._plan.get(key)
            if pool is None or planned is None:
                self._finish(key)
                continue
            pool.submit(self._probe_task, key, *planned)

    def _replan(self, state: StateDocument) -> None:
        """A new state document: which probes run, where, and how often."""
        views = self._sync(state)
        plan: dict[ProbeKey, tuple[Probe, ProbeTarget]] = {}
        for name, view in views.items():
            if not view.active or view.spec is None or not view.spec.probes:
                continue
            procs = tuple(os.path.join(p, "cgroup.procs") for p in self._cgroup_paths(name))
            target = target_for(name, view.record, cgroup_procs=procs)
            for probe in view.spec.probes:
                plan[(name, probe.name)] = (probe, target)
        periods = {key: float(probe.period_seconds) for key, (probe, _) in plan.items()}
        with self._lock:
            self._scheduler.sync(periods, now=self._clock())
        self._plan = plan
        self._planned = state

    def _finish(self, key: ProbeKey) -> None:
        with self._lock:
            self._scheduler.finished(key)

    def _probe_task(self, key: ProbeKey, probe: Probe, target: ProbeTarget) -> None:
        try:
            try:
                outcome = run_probe(
                    probe, target, processes=self._drivers.processes, cancel=self._stopping
                )
            except Exception as exc:  # a bug in a probe must count as a failure, not vanish
                log.error("probe.crashed", env=key[0], probe=key[1], error=repr(exc))
                outcome = ProbeOutcome(ok=False, message=f"probe crashed: {exc!r}")
            if not self._stopping.is_set():  # a cancelled probe says nothing about the env
                self.record_probe(key[0], probe, outcome)
        finally:
            self._finish(key)

    def record_probe(self, env: str, probe: Probe, outcome: ProbeOutcome) -> Transition:
        """Fold one probe outcome in, and act on a transition (events, restart)."""
        request: RestartRequest | None = None
        with self._lock:
            known = self._envs.get(env)
            if known is None or known.probe_defs.get(probe.name) != probe:
                return Transition.NONE  # the probe changed or went away while it ran
            previous = known.probes.get(probe.name, ProbeState())
            state, transition = record_outcome(
                previous, outcome, threshold=probe.failure_threshold, now=self._wall()
            )
            if transition is Transition.UNHEALTHY and probe.on_failure == "restart":
                targets = restart_targets(probe, known.processes)
                if targets:
                    request = RestartRequest(
                        env=env,
                        processes=targets,
                        reason=f"probe {probe.name} failed {probe.failure_threshold} times "
                        f"in a row: {outcome.message}",
                    )
                    state = after_restart(state)
            known.probes[probe.name] = state
        if transition is Transition.NONE and outcome.ok:
            return transition  # the common case: nothing to tell, nothing to save
        bound = log.bind(env=env, probe=probe.name)
        if transition is Transition.UNHEALTHY:
            then = f"; restarting {', '.join(request.processes)}" if request else ""
            message = (
                f"probe {probe.name} failed {probe.failure_threshold} times in a row: "
                f"{outcome.message}{then}"
            )
            bound.warning("probe.failed", message=outcome.message, action=probe.on_failure)
            self._emit("Warning", "ProbeFailed", env, message)
        elif transition is Transition.RECOVERED:
            bound.info("probe.recovered", message=outcome.message)
            self._emit("Normal", "ProbeRecovered", env, f"probe {probe.name}: {outcome.message}")
        elif not outcome.ok:
            bound.info(
                "probe.failure", failures=state.consecutive_failures, message=outcome.message
            )
        if request is not None:
            self._dispatch_restart(request)
        if transition is not Transition.NONE:
            self._request_reconcile()
        return transition

    def _dispatch_restart(self, request: RestartRequest) -> None:
        if self._restart is not None:
            self._restart(request)
            self._emit(
                "Normal",
                "RestartRequested",
                request.env,
                f"restart of {', '.join(request.processes)} requested: {request.reason}",
            )
            return
        pool = self._pool
        if pool is None:
            self.execute_restart(request)
        else:
            pool.submit(self.execute_restart, request)

    def execute_restart(self, request: RestartRequest) -> list[str]:
        """The default restart: stop the processes; the reconcile starts them with back-off."""
        record = self._state().environments.get(request.env)
        if record is None:
            return []
        done = stop_for_restart(request, record, self._drivers.processes)
        log.warning("probe.restart", env=request.env, processes=request.processes, done=done)
        what = "; ".join(done) or "nothing was running"
        self._emit("Normal", "Restarted", request.env, f"{what} ({request.reason})")
        self._request_reconcile()
        return done

    # ------------------------------------------------------------------ policy

    def _policy_loop(self) -> None:
        next_pass = self._clock()
        while not self._stopping.is_set():
            try:
                self.check_policy()
            except Exception as exc:  # a bug must not end policy enforcement
                log.error("policy.pass_failed", error=repr(exc))
            next_pass += self.settings.policy_period
            now = self._clock()
            if next_pass < now:  # a pass overran: start from now, don't burst to catch up
                next_pass = now
            self._stopping.wait(timeout=next_pass - now)

    def check_policy(self) -> list[ViolationRecord]:
        """One policy pass (the policy thread runs it every `policy_period`)."""
        with self._policy_lock:  # the trackers compare with *the* previous pass
            return self._policy_pass()

    def _policy_pass(self) -> list[ViolationRecord]:
        state = self._state()
        views = self._sync(state)
        released = self._take_release_requests()
        found = self._cgroup_violations(views)
        found += self._escape_violations(state, views)
        found += self._denied_violations(views)
        recorded = [self._handle(v, views[v.env]) for v in found if v.env in views]
        if recorded or released:
            self._request_reconcile()
        return recorded

    def _cgroup_violations(self, views: Mapping[str, _View]) -> list[Violation]:
        oom: dict[str, int] = {}
        pids: dict[str, int] = {}
        throttled: list[Violation] = []
        for name, view in views.items():
            with self._lock:
                env = self._envs.get(name)
                files = env.files if env else None
            if env is None:
                continue
            if files is None:
                files = find_counter_files(self._cgroup_paths(name))
            counters = read_counters(files)
            if counters.oom_kills is not None:
                oom[name] = counters.oom_kills
            if counters.pids_refused is not None:
                pids[name] = counters.pids_refused
            # Keep the files while they read; look again once they vanished (recreated).
            keep = counters.oom_kills is not None or counters.pids_refused is not None
            with self._lock:
                env.files = files if keep else None
                ratio = (
                    throttle_step(
                        env.throttle,
                        counters.cpu,
                        ratio=self.settings.throttle_ratio,
                        min_periods=self.settings.throttle_min_periods,
                    )
                    if counters.cpu is not None
                    else None
                )
            if ratio is not None:
                cpu = view.spec.resources.cpu if view.spec else None
                quota = f" (limit {cpu}m)" if cpu else ""
                detail = f"throttled in {ratio:.0%} of CPU periods{quota}"
                throttled.append(Violation(env=name, type="cpu-throttled", detail=detail))
        found: list[Violation] = []
        for name, count in self._oom.update(oom).items():
            limit = self._limit(views[name], "memory")
            noun = "process" if count == 1 else "processes"
            found.append(
                Violation(
                    env=name,
                    type="oom",
                    detail=f"the kernel OOM-killed {count} {noun} at the memory limit{limit}",
                )
            )
        for name, count in self._pids.update(pids).items():
            limit = self._limit(views[name], "pids")
            noun = "fork was" if count == 1 else "forks were"
            found.append(
                Violation(
                    env=name,
                    type="pids-limit",
                    detail=f"{count} {noun} refused at the pids limit{limit}",
                )
            )
        for tracker in (self._oom, self._pids):
            tracker.retain(lambda key: key in views)
        return found + throttled

    @staticmethod
    def _limit(view: _View, which: str) -> str:
        if view.spec is None:
            return ""
        if which == "memory" and view.spec.resources.memory is not None:
            return f" ({format_bytes(view.spec.resources.memory)})"
        if which == "pids" and view.spec.resources.pids is not None:
            return f" ({view.spec.resources.pids})"
        return ""

    def _escape_violations(
        self, state: StateDocument, views: Mapping[str, _View]
    ) -> list[Violation]:
        now = self._clock()
        full = self._next_rescan is None or now >= self._next_rescan
        pins = self._netns_pins(state, views, refresh=full)
        if not pins:
            self._next_rescan = None  # nothing to judge: the next pass with pins is full
            self._members.clear()
            return []
        if full:
            self._next_rescan = now + self.settings.escape_rescan
        seen = self._scanner.scan(now=now, full=full, skip=frozenset({os.getpid()}))
        inside = {pid: pins[s.netns] for pid, s in seen.items() if s.netns in pins}
        # Members judged inside their env's cgroup before (same /proc entry, same env) are
        # not judged again until the full rescan.
        judged = {} if full else self._members
        fresh = {
            pid: env for pid, env in inside.items() if judged.get(pid) != (seen[pid].entry, env)
        }
        by_env: dict[str, set[int]] = {}
        for pid, env in fresh.items():
            by_env.setdefault(env, set()).add(pid)
        hierarchies = {env: self._membership(env, pids) for env, pids in by_env.items()}
        outside = outside_cgroup(fresh, hierarchies)
        self._members = {
            pid: (seen[pid].entry, env)
            for pid, env in inside.items()
            # An env without cgroup directories gave no verdict: judge again next pass.
            if pid not in outside and (pid not in fresh or hierarchies.get(env))
        }
        ns_of = {name: ns for ns, name in pins.items()}
        escapes: list[NetnsMember] = []
        uptime_now = uptime() if outside else 0.0
        # Rare from here on: only processes that looked outside their env's cgroup.
        for pid, env in sorted(outside.items()):
            member = identify(
                pid, env, ns=ns_of[env], min_age=self.settings.escape_min_age, now=uptime_now
            )
            if member is None:
                continue
            # The listing judged whoever had this pid then; judge again, and make sure
            # the identity did not change across it (a recycled pid is not an escape).
            again = outside_cgroup({pid: env}, {env: self._membership(env, {pid})})
            if again and still_in_netns(member.ref, ns_of[env]):
                escapes.append(member)
        current = {(m.pid, m.start_time) for m in escapes}
        new = [m for m in escapes if (m.pid, m.start_time) not in self._escapes_seen]
        self._escapes_seen = current  # forget the gone; alert-only escapes stay reported once
        self._escape_ns = {(m.pid, m.start_time): ns_of[m.env] for m in escapes}
        return [
            Violation(env=m.env, type="escape", detail=describe_escape(m), offender=m.ref)
            for m in new
        ]

    def _netns_pins(
        self, state: StateDocument, views: Mapping[str, _View], *, refresh: bool
    ) -> dict[NsId, str]:
        """(dev, inode) of each env's pinned netns -> env; stat'ed once per state document
        (and at each full rescan): pins change with reconciles, which make new documents."""
        if not refresh and self._pins is not None and self._pins[0] is state:
            return self._pins[1]
        pins: dict[NsId, str] = {}
        for name, view in views.items():
            target = target_for(name, view.record, cgroup_procs=())
            if target.netns_path is None:
                continue
            try:
                st = os.stat(target.netns_path)
            except OSError:
                continue
            if view.record.netns_inode not in (None, st.st_ino):
                continue  # a pin we did not make: not ours to judge
            pins[(st.st_dev, st.st_ino)] = name
        self._pins = (state, pins)
        return pins

    def _membership(self, env: str, wanted: set[int]) -> list[frozenset[int]]:
        """One pid set per cgroup directory of `env`: its top-level listing when that has
        every pid we ask about, else the whole subtree (a workload's own sub-cgroups)."""
        sets: list[frozenset[int]] = []
        for directory in self._cgroup_paths(env):
            top = read_pids(os.path.join(directory, "cgroup.procs"))
            if top is None:
                continue  # this hierarchy has no directory for the env: nothing to judge by
            sets.append(top if wanted <= top else cgroup_pids(directory))
        return sets

    def _cgroup_paths(self, env: str) -> tuple[str, ...]:
        """The env's cgroup directories (derived from its name: cached)."""
        paths = self._paths.get(env)
        if paths is None:
            paths = self._paths[env] = self._drivers.cgroups.paths(env=env)
        return paths

    def _denied_violations(self, views: Mapping[str, _View]) -> list[Violation]:
        env_of = {view.address: name for name, view in views.items() if view.address}
        if not env_of:
            # Nothing to read yet, but this is the baseline: every drop from now on is new
            # (otherwise the first env's first drops would be swallowed as "old news").
            if not self._denied.primed:
                self._denied.update({})
            return []
        try:
            counts = self._drivers.firewall.denied_counts()
        except (ReconcilerError, OSError) as exc:
            log.warning("policy.denied_unreadable", error=str(exc))
            return []
        deltas = self._denied.update(counts, forget_missing=True)
        return [
            Violation(env=env, type="denied-connection", detail=describe_denied(per, env_of))
            for env, per in sorted(denied_by_env(deltas, env_of).items())
        ]

    # ------------------------------------------------------------------ actions

    def _handle(self, violation: Violation, view: _View) -> ViolationRecord:
        """Decide, act, record, tell: one violation."""
        policy = view.spec.policy.on_violation if view.spec else "alert"
        decision = decide(violation.type, policy)
        notes = [decision.note] if decision.note else []
        if decision.kill == "offender" and violation.offender is not None:
            ref = violation.offender
            ns = self._escape_ns.get((ref.pid, ref.start_time))
            killed = ns is not None and kill_offender(ref, ns=ns)
            notes.append(f"killed pid {ref.pid}" if killed else f"pid {ref.pid} already gone")
        elif decision.kill == "environment":
            holder = view.record.holder
            count = kill_environment(
                self._cgroup_paths(view.name),
                keep={holder.pid} if holder else (),
            )
            notes.append(f"killed {count} process(es) of the environment, not its holder")
        detail = violation.detail + (f" ({'; '.join(notes)})" if notes else "")
        record = ViolationRecord(
            time=rfc3339(self._wall()), type=violation.type, detail=detail, action=decision.action
        )
        newly_quarantined = False
        with self._lock:
            env = self._envs.get(view.name)
            if env is not None:
                env.violations.append(record)
                if decision.quarantine and env.quarantine is None:
                    env.quarantine = QuarantineRecord(
                        since=record.time,
                        reason=f"{violation.type}: {violation.detail}"[:_REASON_MAX],
                        spec_hash=env.spec_hash,
                    )
                    newly_quarantined = True
        log.warning(
            "violation.detected",
            env=view.name,
            type=violation.type,
            detail=detail,
            action=decision.action,
        )
        self._emit(
            "Warning",
            "Violation",
            view.name,
            f"{violation.type}: {detail} (action: {decision.action})",
        )
        if decision.kill != "none":
            self._emit("Warning", "Killed", view.name, f"{violation.type}: {'; '.join(notes)}")
        if newly_quarantined:
            log.warning("env.quarantined", env=view.name, reason=violation.type)
            self._emit(
                "Warning",
                "Quarantined",
                view.name,
                f"network cut off after a {violation.type} violation; lift it with "
                f"`reconciler release {view.name}` or a manifest change",
            )
        return record

    def release(self, env: str, *, why: str = "released by request") -> bool:
        """Lift `env`'s quarantine; False if it was not quarantined."""
        with self._lock:
            known = self._envs.get(env)
            if known is None or known.quarantine is None:
                return False
            known.quarantine = None
        self._released(env, why=why)
        self._request_reconcile()
        return True

    def _released(self, env: str, *, why: str) -> None:
        log.info("env.released", env=env, why=why)
        self._emit("Normal", "Released", env, f"quarantine lifted: {why}")

    def _take_release_requests(self) -> list[str]:
        if self._instance_dir is None:
            return []
        released: list[str] = []
        for env in take_release_requests(self._instance_dir):
            if self.release(env, why="`reconciler release`"):
                released.append(env)
            else:
                log.info("release.ignored", env=env, reason="not quarantined")
        return released

    def _emit(self, type: EventType, reason: str, env: str, message: str) -> None:
        # Events are the user's record; a full disk must not stop the monitor.
        with contextlib.suppress(OSError):
            self._events.emit(
                type=type, reason=reason, kind="Environment", name=env, message=message
            )


__all__ = [
    "EnvHealth",
    "EventSink",
    "HealthDrivers",
    "HealthMonitor",
    "HealthSettings",
    "HealthSnapshot",
    "HealthStatus",
    "Scheduler",
    "health_conditions",
    "health_status",
    "quarantined_in",
]
