"""Workloads: keep each environment's `spec.processes` running per its restart policy.

Decisions are pure and take `now` (epoch seconds), so they are unit-testable:

- a process whose spec (command, env, workingDir, user) changed is restarted; changing
  only `restartPolicy` restarts nothing;
- a process that exited is restarted when its policy says so (`Always`; `OnFailure` with a
  non-zero code); otherwise it stays `Exited` with its code;
- crash-loop backoff: an exit within `STABLE_SECONDS` of the start counts as a quick
  failure; the n-th consecutive quick failure waits `BASE * 2**(n-1)` seconds, at most
  `MAX_BACKOFF`; a stable run resets the count. While waiting the state is `Backoff` and
  the reconcile result asks to be requeued when it is due;
- a process removed from the spec is stopped (SIGTERM, grace, SIGKILL of its tree).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from reconciler.kernel.processes import ProcessDriver
from reconciler.kernel.types import ProcessRef
from reconciler.manifests.models import Process
from reconciler.state.model import EnvironmentRecord, WorkloadRecord

STABLE_SECONDS = 10.0
BASE_BACKOFF = 1.0
MAX_BACKOFF = 60.0
EXIT_RECORD_WAIT = 1.0  # the shim writes the exit code just after reaping


def process_hash(process: Process) -> str:
    """What forces a restart when it changes (not the restart policy)."""
    data = {
        "command": process.command,
        "env": process.env,
        "workingDir": process.working_dir,
        "user": process.user,
    }
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def wants_restart(policy: str, exit_code: int | None) -> bool:
    """Whether a process that exited with `exit_code` is started again."""
    if policy == "Always":
        return True
    if policy == "OnFailure":
        return exit_code != 0  # an unknown code (shim killed too) counts as a failure
    return False


def backoff_delay(crash_loop: int) -> float:
    """Seconds to wait before the restart after `crash_loop` consecutive quick failures."""
    if crash_loop <= 0:
        return 0.0
    # Cap the exponent first: the count keeps growing in a long crash loop (2**1024 overflows).
    exponent = min(crash_loop - 1, 32)
    return float(min(BASE_BACKOFF * 2**exponent, MAX_BACKOFF))


def _ref(record: WorkloadRecord) -> ProcessRef | None:
    if record.pid is None or record.start_time is None:
        return None
    return ProcessRef(pid=record.pid, start_time=record.start_time)


def plan_reasons(
    *,
    processes: list[Process],
    record: EnvironmentRecord,
    alive: Mapping[str, bool],
    now: float,
) -> list[str]:
    """Why the env's workloads need a converge now (empty: nothing to do yet)."""
    reasons = []
    wanted = {p.name: p for p in processes}
    for name in sorted(set(record.processes) - set(wanted)):
        if record.processes[name].state in ("Running", "Backoff", "Pending"):
            reasons.append(f"process {name} is no longer declared")
    for name, process in sorted(wanted.items()):
        current = record.processes.get(name)
        if current is None:
            reasons.append(f"process {name} is not started")
        elif current.state == "Running" and not alive.get(name, False):
            reasons.append(f"drift: process {name} exited")
        elif current.state == "Backoff" and (current.backoff_until or 0) <= now:
            reasons.append(f"process {name} back-off expired")
        elif current.state == "Backoff" and current.spec_hash != process_hash(process):
            reasons.append(f"process {name} changed")
        elif current.state == "Pending":
            reasons.append(f"process {name} is not started")
        elif current.state == "Exited" and current.spec_hash != process_hash(process):
            reasons.append(f"process {name} changed")
    return reasons


def next_wakeup(records: Mapping[str, EnvironmentRecord], *, now: float) -> float | None:
    """Seconds until the earliest back-off expires, if any process is backing off."""
    due = [
        w.backoff_until
        for r in records.values()
        for w in r.processes.values()
        if w.state == "Backoff" and w.backoff_until is not None
    ]
    return max(0.0, min(due) - now) if due else None


@dataclass
class WorkloadConverger:
    """Converges one environment's processes; returns what it did, one line each."""

    env: str
    driver: ProcessDriver
    holder: ProcessRef
    cgroup_procs: tuple[str, ...]
    log_dir: Path
    now: float
    hostname: str

    def converge(
        self, record: EnvironmentRecord, processes: list[Process], *, fresh_holder: bool
    ) -> list[str]:
        """Start, restart, back off or stop each process; mutates `record.processes`."""
        made: list[str] = []
        wanted = {p.name: p for p in processes}
        for name in sorted(set(record.processes) - set(wanted)):
            ref = _ref(record.processes[name])
            if ref is not None:
                self.driver.stop(ref)
            del record.processes[name]
            made.append(f"process {name} stopped (no longer declared)")
        for name, process in sorted(wanted.items()):
            current = record.processes.get(name) or WorkloadRecord()
            record.processes[name] = current
            made += self._one(current, process, fresh_holder=fresh_holder)
        return made

    def _one(self, current: WorkloadRecord, process: Process, *, fresh_holder: bool) -> list[str]:
        wanted_hash = process_hash(process)
        ref = _ref(current)
        running = ref is not None and not fresh_holder and self.driver.alive(ref)
        if current.state == "Pending" and not running:
            found = self.driver.find(
                env=self.env, cgroup_procs=self.cgroup_procs, name=process.name
            )
            if found is not None and current.spec_hash in ("", wanted_hash):
                self._mark_running(current, found, wanted_hash)
                current.started_at = current.started_at or self.now
                return [f"process {process.name} adopted (pid {found.pid})"]
        if running:
            assert ref is not None
            if current.spec_hash == wanted_hash:
                return []
            self.driver.stop(ref)
            current.restarts += 1
            current.crash_loop = 0
            return self._start(current, process, wanted_hash, why="spec changed")
        if fresh_holder and current.state in ("Running", "Backoff"):
            current.restarts += 1
            return self._start(current, process, wanted_hash, why="holder recreated")
        if current.state == "Running":
            return self._exited(current, process, ref, wanted_hash)
        if current.state == "Backoff":
            if current.spec_hash != wanted_hash:
                # A fixed command should not wait out the broken one's back-off.
                current.crash_loop = 0
                current.restarts += 1
                return self._start(current, process, wanted_hash, why="spec changed")
            if (current.backoff_until or 0) > self.now:
                return []
            current.restarts += 1
            return self._start(current, process, wanted_hash, why="back-off expired")
        if current.state == "Exited" and current.spec_hash == wanted_hash:
            return []
        return self._start(current, process, wanted_hash, why="")

    def _exited(
        self,
        current: WorkloadRecord,
        process: Process,
        ref: ProcessRef | None,
        wanted_hash: str,
    ) -> list[str]:
        code = None
        if ref is not None:
            code = self.driver.exit_status(
                ref, log_dir=self.log_dir, name=process.name, timeout=EXIT_RECORD_WAIT
            )
        current.exit_code = code
        current.pid = None
        current.start_time = None
        shown = "unknown" if code is None else str(code)
        if not wants_restart(process.restart_policy, code):
            current.state = "Exited"
            return [f"process {process.name} exited with code {shown} ({process.restart_policy})"]
        ran = self.now - (current.started_at or self.now)
        current.crash_loop = current.crash_loop + 1 if ran < STABLE_SECONDS else 0
        delay = backoff_delay(current.crash_loop)
        if delay > 0:
            current.state = "Backoff"
            current.backoff_until = self.now + delay
            return [f"process {process.name} exited with code {shown}; restart in {delay:g}s"]
        current.restarts += 1
        return self._start(current, process, wanted_hash, why=f"exited with code {shown}")

    def _start(
        self, current: WorkloadRecord, process: Process, wanted_hash: str, *, why: str
    ) -> list[str]:
        environ = {"HOSTNAME": self.hostname, **process.env}
        ref = self.driver.spawn(
            env=self.env,
            holder=self.holder,
            cgroup_procs=self.cgroup_procs,
            name=process.name,
            command=process.command,
            environ=environ,
            working_dir=process.working_dir,
            user=process.user,
            log_dir=self.log_dir,
        )
        self._mark_running(current, ref, wanted_hash)
        current.started_at = self.now
        suffix = f" ({why})" if why else ""
        return [f"process {process.name} started (pid {ref.pid}){suffix}"]

    @staticmethod
    def _mark_running(current: WorkloadRecord, ref: ProcessRef, wanted_hash: str) -> None:
        current.pid = ref.pid
        current.start_time = ref.start_time
        current.spec_hash = wanted_hash
        current.state = "Running"
        current.exit_code = None
        current.backoff_until = None
