"""Actions: what the health layer does about a failing probe or a violation.

Every violation is *recorded* (status history, a `Violation` event, a warning log line);
`policy.onViolation` then says what else happens (`decide`, pure):

| violation           | alert  | kill                                    | quarantine |
|---------------------|--------|-----------------------------------------|------------|
| `oom`               | record | record (the kernel killed the offender) | cut off    |
| `pids-limit`        | record | kill the env's processes (not its holder)| cut off    |
| `escape`            | record | kill the escaped process                | cut off    |
| `denied-connection` | record | kill the env's processes (not its holder)| cut off    |
| `cpu-throttled`     | record | record (informational)                  | record     |

Killing the env's processes leaves the holder (the env itself) alone; the workloads are
restarted by the reconcile according to their `restartPolicy`, with its back-off.

Killing an *escaped* process needs an ownership proof, because by definition it is not
in our cgroup: it is inside the environment's network namespace, which we created and
pinned (its (device, inode) is the pin's). A process there is running inside an object we
own, and `onViolation: kill` is the owner's instruction. Identity is pid + start time,
re-checked together with the namespace through a pidfd right before the signal, so a
recycled pid is never hit.

Quarantine cuts the env's network (the engine renders a drop-all for its bridge port from
the monitor's `quarantined()` set) and sets a `Quarantined` condition. It is lifted by a
manifest change of the environment (its spec hash changes) or by `reconciler release
NAME`; while a controller holds the instance lock, that command leaves a request file in
`<state-dir>/<instance>/release-requests/` which the monitor takes on its next pass.

Probe failures with `onFailure: restart` become a `RestartRequest` for the named processes
(default: all of the env's); the monitor hands it to the controller, or stops them itself
so that the reconcile starts them again with the workloads' back-off.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from reconciler.errors import KernelError, ReconcilerError
from reconciler.health.violations import NsId, ViolationType, cgroup_pids
from reconciler.kernel.processes import ProcessDriver
from reconciler.kernel.types import ProcessRef
from reconciler.manifests.models import Probe
from reconciler.state.model import EnvironmentRecord
from reconciler.state.procinfo import process_alive

ActionName = Literal["alert", "kill", "quarantine"]
KillScope = Literal["none", "offender", "environment"]
RELEASE_DIR = "release-requests"
_KILL_ROUNDS = 5  # a fork bomb refills the cgroup while we signal it: sweep again
_ENV_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


# --------------------------------------------------------------------------- decisions (pure)


@dataclass(frozen=True)
class Decision:
    """What to do about one violation; `action` is what its record says was done."""

    action: ActionName
    kill: KillScope = "none"
    quarantine: bool = False
    note: str = ""


def decide(violation: ViolationType, on_violation: ActionName) -> Decision:
    """The action table of the module docstring."""
    if violation == "cpu-throttled" or on_violation == "alert":
        return Decision(action="alert")
    if on_violation == "quarantine":
        return Decision(action="quarantine", quarantine=True)
    if violation == "oom":
        return Decision(action="kill", note="the kernel's OOM killer already killed it")
    if violation == "escape":
        return Decision(action="kill", kill="offender")
    return Decision(action="kill", kill="environment")


@dataclass(frozen=True)
class RestartRequest:
    """Restart these processes of `env` (a probe failed `failureThreshold` times)."""

    env: str
    processes: tuple[str, ...]
    reason: str


def restart_targets(probe: Probe, declared: Sequence[str]) -> tuple[str, ...]:
    """The processes a failing probe restarts: those it names, else all declared."""
    return tuple(probe.restart) if probe.restart else tuple(declared)


# --------------------------------------------------------------------------- kills


def kill_offender(ref: ProcessRef, *, ns: NsId) -> bool:
    """SIGKILL `ref` if it still runs inside namespace `ns`; True if signalled.

    The pidfd pins one process; checking identity and namespace *after* opening it means
    the signal can only reach the process we checked, even if the pid is reused meanwhile.
    """
    try:
        pidfd = os.pidfd_open(ref.pid)
    except ProcessLookupError:
        return False
    try:
        try:
            st = os.stat(f"/proc/{ref.pid}/ns/net")
        except OSError:
            return False
        if (st.st_dev, st.st_ino) != ns or not process_alive(ref.pid, ref.start_time):
            return False
        try:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        except ProcessLookupError:
            return False
        return True
    finally:
        os.close(pidfd)


def kill_environment(dirs: Sequence[str], *, keep: Iterable[int] = ()) -> int:
    """SIGKILL every process in the env's cgroup directories except `keep` (the holder).

    Each pid is pinned with a pidfd, then the listing is read again: a pid still listed
    while its pidfd's process lives is that process. Repeated a few rounds, because a
    fork bomb refills what we empty. Returns how many processes were signalled.
    """
    spared = frozenset(keep)
    signalled = 0
    for _ in range(_KILL_ROUNDS):
        listed = _listed(dirs) - spared
        if not listed:
            break
        pidfds: dict[int, int] = {}
        try:
            for pid in listed:
                with contextlib.suppress(ProcessLookupError):
                    pidfds[pid] = os.pidfd_open(pid)
            still = _listed(dirs)
            for pid, fd in pidfds.items():
                if pid in still:
                    with contextlib.suppress(ProcessLookupError):
                        signal.pidfd_send_signal(fd, signal.SIGKILL)
                        signalled += 1
        finally:
            for fd in pidfds.values():
                os.close(fd)
        time.sleep(0.01)  # let the kernel finish the kills before listing again
    return signalled


def _listed(dirs: Sequence[str]) -> frozenset[int]:
    pids: set[int] = set()
    for directory in dirs:
        pids |= cgroup_pids(directory)
    return frozenset(pids)


def stop_for_restart(
    request: RestartRequest, record: EnvironmentRecord, driver: ProcessDriver
) -> list[str]:
    """Stop the requested running processes (tree, grace, SIGKILL) so the next reconcile
    starts them again with the workloads' back-off. Returns what was done, one line each."""
    done: list[str] = []
    for name in request.processes:
        workload = record.processes.get(name)
        if workload is None or workload.pid is None or workload.start_time is None:
            continue
        ref = ProcessRef(pid=workload.pid, start_time=workload.start_time)
        if not driver.alive(ref):
            continue
        try:
            driver.stop(ref)
        except KernelError as exc:
            done.append(f"process {name} could not be stopped: {exc.message}")
            continue
        done.append(f"process {name} (pid {ref.pid}) stopped for restart")
    return done


# --------------------------------------------------------------------------- release requests


def release_dir(instance_dir: Path) -> Path:
    """`<state-dir>/<instance>/release-requests`: one empty file per requested release."""
    return Path(instance_dir) / RELEASE_DIR


def request_release(instance_dir: Path, env: str) -> Path:
    """Leave a release request for the running controller; returns the file."""
    if not _ENV_NAME.fullmatch(env):
        raise ReconcilerError(f"{env!r} is not an environment name")
    directory = release_dir(instance_dir)
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = directory / env
    temp = directory / f".{env}.{os.getpid()}"
    temp.write_text(f"{time.time():.0f}\n")
    os.replace(temp, path)  # atomic: the monitor never sees half a request
    return path


def take_release_requests(instance_dir: Path) -> list[str]:
    """The environments whose release was requested; the requests are consumed."""
    directory = release_dir(instance_dir)
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return []
    names: list[str] = []
    for entry in entries:
        if entry.name.startswith(".") or not _ENV_NAME.fullmatch(entry.name):
            continue
        with contextlib.suppress(FileNotFoundError):
            os.unlink(entry.path)
            names.append(entry.name)
    return sorted(names)


def release_pending(instance_dir: Path, env: str) -> bool:
    """True while a release request for `env` waits for the controller."""
    return (release_dir(instance_dir) / env).exists()
