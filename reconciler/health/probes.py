"""Probes: is the service inside an environment answering? Asked from inside, never outside.

A probe (`spec.probes[]`) is one of three checks, run every `periodSeconds`, each bounded
by `timeoutSeconds`:

- **tcp** `{port}`: a TCP connection to the env's own address (its eth0 address, or
  127.0.0.1 for an env without a network) completes;
- **http** `{port, path}`: `GET path` over such a connection answers with a status line
  of 200..399;
- **exec** `{command}`: the command, run inside all of the env's namespaces and its
  cgroup, exits 0.

How a socket gets *inside* without a process per probe: setns(2) moves only the calling
thread, and a socket belongs for its whole life to the network namespace it was created
in. So a short-lived thread (`nsutil.run_in_thread`, the same helper `kernel.netns` uses
for its netlink sockets) enters the env's pinned namespace (`/run/netns/<name>`), creates
the socket, and returns to the host namespace before it exits; the probe thread then
connects that socket as if it were local to the env. Connecting to the env's own address
from inside uses its loopback path, so a quarantined env (whose bridge port drops
everything) still answers its probes: quarantine cuts the network, not the service.

Exec probes fork like `kernel.processes.run_in_env` (cgroup first, then the holder's five
namespaces, then a fork into the env's pid namespace), but capture output in a pipe
instead of sharing the controller's stdio (which carries its structured log), and run
against a hard deadline: on timeout the command's whole process tree (its session and
every descendant, through `ProcessDriver.stop`, which pins each member with a pidfd
before signalling) is killed. The children run only `os.*`, `signal` and ctypes calls, as
every fork of the multi-threaded controller must.

Counting is pure (`record_outcome`): `consecutiveFailures` grows with each failure and
resets on success; reaching `failureThreshold` makes the probe unhealthy (transition
`UNHEALTHY`); the first success after that makes it healthy (`RECOVERED`). A probe that
triggered a restart starts counting again from zero (`after_restart`), so the next
restart needs another full threshold of failures.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import signal
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from enum import StrEnum
from typing import NoReturn

from reconciler.errors import KernelError
from reconciler.kernel import netns, nsutil
from reconciler.kernel.fdset import FdSet, report
from reconciler.kernel.processes import DEFAULT_PATH, ProcessDriver
from reconciler.kernel.types import ProcessRef
from reconciler.manifests.models import Probe
from reconciler.state.model import EnvironmentRecord, ProbeRecord
from reconciler.state.procinfo import process_alive

LOOPBACK = "127.0.0.1"
_TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"
OUTPUT_KEEP = 512  # bytes of an exec probe's output kept for the message (the last ones)
_OUTPUT_READ_MAX = 1 << 20  # read and discard beyond this: a chatty probe must not block
_HTTP_HEAD_MAX = 4096
_EXIT_NOT_FOUND = 127
_EXIT_CANNOT_RUN = 126
_EXIT_FAILED = 125
# nsenter's order: mnt last, because joining it also changes root and cwd.
_NAMESPACES = (
    ("ipc", nsutil.CLONE_NEWIPC),
    ("uts", nsutil.CLONE_NEWUTS),
    ("net", nsutil.CLONE_NEWNET),
    ("pid", nsutil.CLONE_NEWPID),
    ("mnt", nsutil.CLONE_NEWNS),
)
# Ignored dispositions survive exec; the command gets the defaults, as from a shell.
_RESET_SIGNALS = (
    signal.SIGPIPE,
    signal.SIGXFSZ,
    signal.SIGINT,
    signal.SIGQUIT,
    signal.SIGTERM,
    signal.SIGHUP,
)


# --------------------------------------------------------------------------- counting (pure)


@dataclass(frozen=True)
class ProbeOutcome:
    """The result of one probe run."""

    ok: bool
    message: str
    seconds: float = 0.0


@dataclass(frozen=True)
class ProbeState:
    """A probe's health between runs."""

    healthy: bool = True  # innocent until failureThreshold failures in a row
    consecutive_failures: int = 0
    last_ok: bool | None = None  # None: never ran
    last_time: float | None = None  # epoch seconds of the last result
    last_message: str = ""


class Transition(StrEnum):
    """What one outcome changed about a probe's health."""

    NONE = "none"
    UNHEALTHY = "unhealthy"  # failureThreshold reached (again, after a restart)
    RECOVERED = "recovered"  # first success while unhealthy


def record_outcome(
    state: ProbeState, outcome: ProbeOutcome, *, threshold: int, now: float
) -> tuple[ProbeState, Transition]:
    """Fold one outcome into the probe's state; say whether its health flipped."""
    if outcome.ok:
        updated = ProbeState(
            healthy=True,
            consecutive_failures=0,
            last_ok=True,
            last_time=now,
            last_message=outcome.message,
        )
        return updated, Transition.NONE if state.healthy else Transition.RECOVERED
    failures = state.consecutive_failures + 1
    updated = ProbeState(
        healthy=state.healthy and failures < threshold,
        consecutive_failures=failures,
        last_ok=False,
        last_time=now,
        last_message=outcome.message,
    )
    # `==`, not `>=`: an alert-only probe that keeps failing is reported once, not on
    # every run; after a restart the count starts again and may reach it again.
    return updated, Transition.UNHEALTHY if failures == threshold else Transition.NONE


def after_restart(state: ProbeState) -> ProbeState:
    """Count afresh after a restart was requested (still unhealthy until a success)."""
    return replace(state, consecutive_failures=0)


def to_record(state: ProbeState) -> ProbeRecord:
    """The state-file form of a probe's state."""
    return ProbeRecord(
        healthy=state.healthy,
        consecutive_failures=state.consecutive_failures,
        last_result=None if state.last_ok is None else ("success" if state.last_ok else "failure"),
        last_time=None if state.last_time is None else rfc3339(state.last_time),
        last_message=state.last_message,
    )


def from_record(record: ProbeRecord) -> ProbeState:
    """A probe's state as a previous controller recorded it."""
    return ProbeState(
        healthy=record.healthy,
        consecutive_failures=record.consecutive_failures,
        last_ok=None if record.last_result is None else record.last_result == "success",
        last_time=parse_rfc3339(record.last_time),
        last_message=record.last_message,
    )


def parse_rfc3339(text: str | None) -> float | None:
    """`rfc3339` backwards; None for None or anything unreadable."""
    if not text:
        return None
    try:
        return datetime.strptime(text, _TIME_FORMAT).replace(tzinfo=UTC).timestamp()
    except ValueError:
        return None


def rfc3339(epoch: float) -> str:
    """Epoch seconds as the state file spells time: `2026-01-02T03:04:05Z`."""
    return datetime.fromtimestamp(epoch, UTC).strftime(_TIME_FORMAT)


def parse_http_status(head: bytes) -> int | None:
    """The status code of an HTTP response's first line (`HTTP/1.1 200 OK`), else None."""
    line = head.split(b"\r\n", 1)[0].split(b"\n", 1)[0]
    parts = line.split(None, 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
        return None
    code = int(parts[1])
    return code if 100 <= code <= 999 else None


def http_healthy(status: int) -> bool:
    """2xx and 3xx are healthy, as in Kubernetes."""
    return 200 <= status <= 399


# --------------------------------------------------------------------------- targets


@dataclass(frozen=True)
class ProbeTarget:
    """Where an environment's probes run."""

    env: str
    netns_path: str | None  # the pin; None: the env shares the host's network namespace
    netns_inode: int | None  # recorded identity of the pin (None: not recorded)
    address: str  # what tcp/http connect to: the eth0 address, else 127.0.0.1
    holder: ProcessRef | None  # exec: whose namespaces to join
    cgroup_procs: tuple[str, ...]  # exec: the env's cgroup.procs files


def target_for(
    name: str, record: EnvironmentRecord, *, cgroup_procs: tuple[str, ...]
) -> ProbeTarget:
    """Where the probes of environment `name` run, from its inventory record."""
    namespaces = record.spec.get("namespaces", ["net"])
    in_netns = "net" in namespaces
    holder = record.holder
    return ProbeTarget(
        env=name,
        netns_path=netns.pin_path(record.netns) if in_netns else None,
        netns_inode=record.netns_inode,
        address=record.address.split("/")[0] if record.address and in_netns else LOOPBACK,
        holder=holder.ref if holder else None,
        cgroup_procs=cgroup_procs,
    )


class ProbeError(Exception):
    """A probe could not even be attempted (no netns, no holder); the message says why."""


class Budget:
    """A probe's time: its deadline, and a way for a stopping monitor to cut it short.

    Waits are taken in slices of at most `SLICE` seconds so that a cancel is noticed soon,
    whatever the probe's timeout (up to 600 s).
    """

    SLICE = 0.5

    def __init__(self, timeout: float, cancel: threading.Event | None = None) -> None:
        self.timeout = timeout
        self.deadline = time.monotonic() + timeout
        self.cancel = cancel

    @property
    def cancelled(self) -> bool:
        """True once the monitor asked every probe to stop."""
        return self.cancel is not None and self.cancel.is_set()

    def slice(self) -> float:
        """Seconds to wait now; TimeoutError past the deadline, ProbeError when cancelled."""
        if self.cancelled:
            raise ProbeError("cancelled: the health monitor is stopping")
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        return min(left, self.SLICE)


def run_probe(
    probe: Probe,
    target: ProbeTarget,
    *,
    processes: ProcessDriver,
    cancel: threading.Event | None = None,
) -> ProbeOutcome:
    """Run one probe against `target`, never longer than its timeout (plus a kill).

    `cancel`: set by a stopping monitor; the probe ends within half a second (failed).
    """
    started = time.monotonic()
    budget = Budget(float(probe.timeout_seconds), cancel)
    try:
        if probe.tcp is not None:
            message = check_tcp(target, port=probe.tcp.port, budget=budget)
        elif probe.http is not None:
            message = check_http(target, port=probe.http.port, path=probe.http.path, budget=budget)
        elif probe.exec is not None:
            message = check_exec(
                target, command=probe.exec.command, budget=budget, processes=processes
            )
        else:  # the model guarantees exactly one check
            raise ProbeError("probe has no check")
    except ProbeError as exc:
        return ProbeOutcome(ok=False, message=str(exc), seconds=time.monotonic() - started)
    return ProbeOutcome(ok=True, message=message, seconds=time.monotonic() - started)


# --------------------------------------------------------------------------- tcp / http


def socket_in_netns(target: ProbeTarget) -> socket.socket:
    """A TCP socket that lives in the env's network namespace (see the module docstring)."""
    if target.netns_path is None:
        return socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        pin = os.open(target.netns_path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise ProbeError(f"network namespace {target.netns_path}: {exc.strerror}") from exc
    try:
        if target.netns_inode is not None and os.fstat(pin).st_ino != target.netns_inode:
            raise ProbeError(f"network namespace {target.netns_path} was replaced")

        def inside() -> int:
            home = netns.current_netns_fd()
            try:
                nsutil.setns(pin, nsutil.CLONE_NEWNET)
                return socket.socket(socket.AF_INET, socket.SOCK_STREAM).detach()
            finally:
                # Best effort: this thread exits right after, so a failure cannot leak.
                with contextlib.suppress(OSError):
                    nsutil.setns(home, nsutil.CLONE_NEWNET)
                os.close(home)

        try:
            fd = nsutil.run_in_thread(inside, name="reconciler-probe-netns")
        except OSError as exc:
            raise ProbeError(f"cannot enter {target.netns_path}: {exc.strerror}") from exc
    finally:
        os.close(pin)
    return socket.socket(fileno=fd)


def _wait(sock: socket.socket, *, write: bool, budget: Budget) -> None:
    """Until `sock` is writable (or readable); TimeoutError at the deadline."""
    while True:
        wait = budget.slice()
        readable, writable, _ = select.select(
            [] if write else [sock], [sock] if write else [], [], wait
        )
        if readable or writable:
            return


def _connect(target: ProbeTarget, port: int, budget: Budget) -> socket.socket:
    where = f"connect {target.address}:{port}"
    sock = socket_in_netns(target)
    try:
        sock.setblocking(False)
        err = sock.connect_ex((target.address, port))
        if err in (errno.EINPROGRESS, errno.EAGAIN):
            _wait(sock, write=True, budget=budget)
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            raise ProbeError(f"{where}: {os.strerror(err)}")
    except TimeoutError:
        sock.close()
        raise ProbeError(f"{where}: no answer within {budget.timeout:g}s") from None
    except BaseException:
        sock.close()
        raise
    return sock


def check_tcp(target: ProbeTarget, *, port: int, budget: Budget) -> str:
    """Connect to the env's address:port from inside; raise ProbeError on failure."""
    _connect(target, port, budget).close()
    return f"connected to {target.address}:{port}"


def check_http(target: ProbeTarget, *, port: int, path: str, budget: Budget) -> str:
    """GET `path` from inside; 200..399 passes; raise ProbeError otherwise."""
    sock = _connect(target, port, budget)
    what = f"GET http://{target.address}:{port}{path}"
    request = memoryview(
        (
            f"GET {path} HTTP/1.0\r\nHost: {target.address}:{port}\r\n"
            "User-Agent: reconciler-probe\r\nAccept: */*\r\nConnection: close\r\n\r\n"
        ).encode()
    )
    head = b""
    try:
        while request:
            _wait(sock, write=True, budget=budget)
            request = request[sock.send(request) :]
        while b"\n" not in head and len(head) < _HTTP_HEAD_MAX:
            _wait(sock, write=False, budget=budget)
            chunk = sock.recv(_HTTP_HEAD_MAX)
            if not chunk:
                break
            head += chunk
    except TimeoutError:
        raise ProbeError(f"{what}: no response within {budget.timeout:g}s") from None
    except (BlockingIOError, InterruptedError):
        raise ProbeError(f"{what}: the socket was not ready") from None
    except OSError as exc:
        raise ProbeError(f"{what}: {_reason(exc)}") from exc
    finally:
        sock.close()
    status = parse_http_status(head)
    if status is None:
        raise ProbeError(f"{what}: not an HTTP response ({head[:40]!r})")
    if not http_healthy(status):
        raise ProbeError(f"{what}: HTTP {status}")
    return f"{what}: HTTP {status}"


def _reason(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__


# --------------------------------------------------------------------------- exec


@dataclass(frozen=True)
class _ExecPlan:
    """Everything the exec chain needs, opened and computed before the fork."""

    namespaces: tuple[tuple[int, int, str], ...]  # (fd, CLONE flag, name)
    cgroups: tuple[int, ...]  # open cgroup.procs files
    proc_fd: int  # the controller's /proc: host pids survive setns(mnt)
    devnull: int
    output: int  # write end of the output pipe: the command's stdout and stderr
    report: int  # write end of the O_CLOEXEC report pipe
    argv: tuple[str, ...]
    environ: dict[str, str]
    caller: int
    max_fd: int


def _die(fd: int, what: str, err: int, code: int = _EXIT_FAILED) -> NoReturn:
    report(fd, f"E{what}: {errno.errorcode.get(err, str(err))} ({os.strerror(err)})\n")
    os._exit(code)


def _start_time_of(proc_fd: int, pid: int) -> int:
    fd = os.open(f"{pid}/stat", os.O_RDONLY | os.O_CLOEXEC, dir_fd=proc_fd)
    try:
        stat = os.read(fd, 4096)
    finally:
        os.close(fd)
    return int(stat.rpartition(b")")[2].split()[19])  # field 22


def _run_entry(plan: _ExecPlan) -> NoReturn:
    """A: die with the caller, join the cgroup then the namespaces, fork B, wait, exit."""
    step = "prctl"
    try:
        nsutil.set_parent_death_signal(signal.SIGKILL)
        if os.getppid() != plan.caller:
            os._exit(_EXIT_FAILED)  # the caller died before the line above took effect
        step = "setsid"
        os.setsid()
        pid = str(os.getpid()).encode()
        step = "join cgroup"
        for fd in plan.cgroups:
            os.write(fd, pid)
        for fd, flag, name in plan.namespaces:
            step = f"setns {name}"
            nsutil.setns(fd, flag)
        step = "fork"
        child = os.fork()
        if child == 0:
            _run_command(plan)
        # B is our unreaped child: its pid cannot be anyone else's while we read it.
        step = "identify"
        report(plan.report, f"P{child} {_start_time_of(plan.proc_fd, child)}\n")
        os.close(plan.report)
        step = "wait"
        _, status = os.waitpid(child, 0)
        if os.WIFSIGNALED(status):
            os._exit(128 + os.WTERMSIG(status))
        os._exit(os.waitstatus_to_exitcode(status))
    except OSError as e:
        _die(plan.report, step, e.errno or errno.EIO)
    except BaseException as e:
        report(plan.report, f"E{step}: {type(e).__name__}: {e}\n")
    finally:
        os._exit(_EXIT_FAILED)


def _run_command(plan: _ExecPlan) -> NoReturn:
    """B, inside the env's pid namespace: own session, stdio, default signals, exec."""
    step = "setsid"
    try:
        os.setsid()  # a session of its own: the timeout kills it and all it started
        step = "prctl"
        nsutil.set_parent_death_signal(signal.SIGKILL)
        step = "stdio"
        os.dup2(plan.devnull, 0)
        os.dup2(plan.output, 1)
        os.dup2(plan.output, 2)
        step = "signals"
        for sig in _RESET_SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, ())
        os.umask(0o022)
        step = "chdir /"
        os.chdir("/")
        environ = dict(plan.environ)
        environ["HOSTNAME"] = os.uname().nodename  # the env's uts namespace
        # Keep only stdio and the report pipe (close-on-exec: gone once exec succeeds).
        os.closerange(3, plan.report)
        os.closerange(plan.report + 1, plan.max_fd)
        step = f"execvpe {plan.argv[0]}"
        os.execvpe(plan.argv[0], list(plan.argv), environ)
    except OSError as e:
        err = e.errno or errno.EIO
        _die(plan.report, step, err, _EXIT_NOT_FOUND if err == errno.ENOENT else _EXIT_CANNOT_RUN)
    except BaseException as e:
        report(plan.report, f"E{step}: {type(e).__name__}: {e}\n")
    finally:
        os._exit(_EXIT_FAILED)


def _open_plan(
    fds: FdSet, target: ProbeTarget, command: Sequence[str]
) -> tuple[_ExecPlan, int, int]:
    """Open the holder's namespaces (proving it is still the holder), the cgroup files and
    the pipes; returns the plan and the read ends of the output and report pipes."""
    holder = target.holder
    if holder is None:
        raise ProbeError("the environment has no holder process; it is not running")
    namespaces: list[tuple[int, int, str]] = []
    try:
        for name, flag in _NAMESPACES:
            namespaces.append(
                (fds.open_fd(f"/proc/{holder.pid}/ns/{name}", os.O_RDONLY), flag, name)
            )
    except OSError:
        namespaces.clear()
    # Checked after opening: if the holder is still (pid, start time) now, every fd above
    # is its namespace, even if the pid gets recycled a moment later.
    if not namespaces or not process_alive(holder.pid, holder.start_time):
        raise ProbeError(f"the environment's holder (pid {holder.pid}) is not running")
    try:
        cgroups = tuple(fds.open_fd(path, os.O_WRONLY) for path in target.cgroup_procs)
        output_read, output_write = fds.pipe()
        report_read, report_write = fds.pipe()
        plan = _ExecPlan(
            namespaces=tuple(namespaces),
            cgroups=cgroups,
            proc_fd=fds.open_fd("/proc", os.O_RDONLY | os.O_DIRECTORY),
            devnull=fds.open_fd(os.devnull, os.O_RDWR),
            output=output_write,
            report=report_write,
            argv=tuple(command),
            environ={"PATH": DEFAULT_PATH, "HOME": "/root"},
            caller=os.getpid(),
            max_fd=os.sysconf("SC_OPEN_MAX"),
        )
    except OSError as exc:
        raise ProbeError(f"exec probe could not start: {_reason(exc)}") from exc
    return plan, output_read, report_read


@dataclass
class _Watch:
    """What the parent has seen of one exec run."""

    reports: bytes = b""
    output: bytes = b""
    output_total: int = 0
    reports_done: bool = False
    exited: bool = False
    timed_out: bool = False


def _drain(fd: int, watch: _Watch, *, report: bool) -> bool:
    """Read what is there; False at end of file."""
    try:
        chunk = os.read(fd, 65536)
    except BlockingIOError:
        return True
    if not chunk:
        return False
    if report:
        watch.reports += chunk
    elif watch.output_total < _OUTPUT_READ_MAX:
        watch.output = (watch.output + chunk)[-OUTPUT_KEEP:]
        watch.output_total += len(chunk)
    return True


def _supervise(*, child: int, report_fd: int, output_fd: int, budget: Budget) -> _Watch:
    """Follow the run until A exits, the deadline passes or the monitor stops."""
    watch = _Watch()
    os.set_blocking(output_fd, False)
    pidfd = os.pidfd_open(child)  # our own unreaped child: it cannot be recycled
    try:
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        poller.register(report_fd, select.POLLIN)
        poller.register(output_fd, select.POLLIN)
        open_fds = {report_fd, output_fd}
        while not watch.exited:
            try:
                wait = budget.slice()
            except (TimeoutError, ProbeError):
                watch.timed_out = True
                break
            for fd, _ in poller.poll(wait * 1000):
                if fd == pidfd:
                    watch.exited = True
                elif fd in open_fds and not _drain(fd, watch, report=fd == report_fd):
                    poller.unregister(fd)
                    open_fds.discard(fd)
                    watch.reports_done |= fd == report_fd
        # What the command printed before it exited is in the pipe; a background child
        # that still holds the pipe open must not keep us here, hence non-blocking.
        while _drain(output_fd, watch, report=False) and watch.output_total < _OUTPUT_READ_MAX:
            if not select.select([output_fd], [], [], 0)[0]:
                break
    finally:
        os.close(pidfd)
    return watch


def _parse_reports(data: bytes) -> tuple[ProcessRef | None, str | None]:
    ref: ProcessRef | None = None
    failure: str | None = None
    for line in data.decode(errors="replace").splitlines():
        if line.startswith("P") and ref is None:
            pid, _, start = line[1:].partition(" ")
            with contextlib.suppress(ValueError):
                ref = ProcessRef(pid=int(pid), start_time=int(start))
        elif line.startswith("E") and failure is None:
            failure = line[1:]
    return ref, failure


def _reap(child: int) -> int | None:
    try:
        _, status = os.waitpid(child, 0)
    except ChildProcessError:
        return None
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.waitstatus_to_exitcode(status)


def _last_line(output: bytes) -> str:
    lines = [line.strip() for line in output.decode(errors="replace").splitlines()]
    lines = [line for line in lines if line]
    return lines[-1][:200] if lines else ""


def check_exec(
    target: ProbeTarget, *, command: Sequence[str], budget: Budget, processes: ProcessDriver
) -> str:
    """Run `command` inside the env (namespaces + cgroup) with a hard deadline.

    Exit 0 passes. On timeout the command's tree is killed (its session and descendants,
    pid + start time verified) and the probe fails. Raises ProbeError on failure.
    """
    fds = FdSet()
    try:
        plan, output_read, report_read = _open_plan(fds, target, command)
        try:
            child = os.fork()
        except OSError as exc:
            raise ProbeError(f"exec probe could not start: fork: {_reason(exc)}") from exc
        if child == 0:
            _run_entry(plan)
        # Only the children may keep the write ends: EOF must mean "they are done".
        fds.close_one(plan.report)
        fds.close_one(plan.output)
        try:
            watch = _supervise(
                child=child, report_fd=report_read, output_fd=output_read, budget=budget
            )
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)  # our own unreaped child: never a stranger
            _reap(child)
            raise
    finally:
        fds.close()
    ref, failure = _parse_reports(watch.reports)
    if watch.timed_out:
        if ref is not None:
            with contextlib.suppress(KernelError):
                processes.stop(ref, grace=0.0)
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)  # our own unreaped child: never a stranger
    code = _reap(child)
    shown = " ".join(command)
    if watch.timed_out and budget.cancelled:
        raise ProbeError(f"exec {shown}: cancelled, the health monitor is stopping (killed)")
    if watch.timed_out:
        raise ProbeError(f"exec {shown}: timed out after {budget.timeout:g}s (killed)")
    if failure is not None:
        raise ProbeError(f"exec {shown}: cannot run: {failure}")
    last = _last_line(watch.output)
    suffix = f": {last}" if last else ""
    if code != 0:
        raise ProbeError(f"exec {shown}: exit code {code}{suffix}")
    return f"exec {shown}: exit code 0{suffix}"
