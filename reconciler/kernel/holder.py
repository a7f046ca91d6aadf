"""The per-environment holder: one tiny process that *is* the environment's namespaces.

Why a process at all: a network namespace can be pinned by a bind mount
(/run/netns/<name>), but a pid namespace cannot. It lives exactly as long as its pid 1,
and pid 1 must reap the zombies of everything that runs inside. So every environment
gets a holder, Debian's `catatonit -P` (pause mode: do nothing, reap children), which is

- pid 1 of the env's new pid namespace (its death kills every process inside),
- the owner of the env's new uts/ipc/mnt namespaces (hostname, SysV IPC, private mounts
  with a /proc that shows the env's own pids),
- a member of the env's pinned network namespace and of its cgroup, both joined *before*
  exec, so there is no instant at which it runs outside them,
- NOT a child of the controller: double fork + setsid, stdio on /dev/null, every other
  fd closed. It outlives the controller; a restarted controller re-adopts it by
  `ProcessRef` (pid + start time: pids are reused, the pair is not).

Workloads are later started with `nsenter --target <holder pid>`, so they share all of
the holder's namespaces.

The fork chain (no `unshare`/`nsenter` binaries: one fork chain per env, one exec):

    controller ──fork──▶ child: setsid, setns(net), join cgroups, unshare(uts|ipc|mnt|pid),
                                sethostname ──fork──▶ grandchild (pid 1 of the new pid ns):
                                report its pid,       make / rprivate, mount /proc,
                                _exit(0)              stdio → /dev/null, close fds,
                                                      exec catatonit -P

Every file the children need is opened by the controller *before* forking, and the
children run only `os.*` and ctypes calls: the controller is multi-threaded, and a
forked child owns a copy of every lock another thread happened to hold (logging,
allocators in third-party code), so anything higher-level could deadlock there.
`os.fork` itself is safe: CPython re-initialises its own locks in the child.

One pipe (O_CLOEXEC) carries everything back: the grandchild's pid (``P<pid>``) or the
first failure (``E<what failed>``). The pipe reaches end-of-file when the last writer is
gone, i.e. when catatonit's exec succeeded (close-on-exec) or the chain died.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import select
import shutil
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NoReturn

from reconciler.errors import KernelError
from reconciler.kernel.types import HolderSpec, ProcessRef
from reconciler.state.procinfo import process_alive, process_start_time

# <sched.h> / <sys/mount.h>: stable kernel ABI values.
CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_NOEXEC = 0x8
MS_REC = 0x4000
MS_PRIVATE = 0x40000

# Namespaces `unshare` creates for the holder; "net" is joined (setns), never created.
_UNSHARE_FLAGS = {
    "uts": CLONE_NEWUTS,
    "ipc": CLONE_NEWIPC,
    "mnt": CLONE_NEWNS,
    "pid": CLONE_NEWPID,
}
KNOWN_NAMESPACES = frozenset({"net", *_UNSHARE_FLAGS})

# Exit status of a child that failed before exec (what shells use for "cannot execute").
_EXIT_FAILED = 127


class _Libc:
    """The few libc calls Python's `os` lacks, resolved once (never inside a child)."""

    def __init__(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        self.setns = libc.setns
        self.setns.argtypes = [ctypes.c_int, ctypes.c_int]
        self.setns.restype = ctypes.c_int
        self.unshare = libc.unshare
        self.unshare.argtypes = [ctypes.c_int]
        self.unshare.restype = ctypes.c_int
        self.sethostname = libc.sethostname
        self.sethostname.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
        self.sethostname.restype = ctypes.c_int
        self.mount = libc.mount
        self.mount.argtypes = [
            ctypes.c_char_p,
            ctypes.c_char_p,
            ctypes.c_char_p,
            ctypes.c_ulong,
            ctypes.c_void_p,
        ]
        self.mount.restype = ctypes.c_int


_libc = _Libc()


# --------------------------------------------------------------------------- fork chain


@dataclass(frozen=True)
class _Plan:
    """Everything the fork chain needs, prepared by the parent (fds, bytes, ints)."""

    report_fd: int  # write end of the O_CLOEXEC pipe
    devnull_fd: int
    netns_fd: int | None  # open pin of the env's netns; None: stay in the current one
    netns_path: str
    cgroup_fds: tuple[tuple[int, str], ...]  # (open cgroup.procs fd, its path)
    unshare_flags: int
    hostname: bytes | None  # set only when uts is new: never the host's hostname
    private_mounts: bool  # mnt is new: make / recursively private
    mount_proc: bool  # mnt and pid are new: fresh /proc for the new pid namespace
    catatonit: bytes
    max_fd: int


def _report(fd: int, message: bytes) -> None:
    # One write below PIPE_BUF is atomic; a vanished reader (EPIPE) is not our problem.
    with contextlib.suppress(OSError):
        os.write(fd, message)


def _die(plan: _Plan, what: str, err: int) -> NoReturn:
    name = errno.errorcode.get(err, str(err))
    _report(plan.report_fd, f"E{what}: {name} ({os.strerror(err)})\n".encode())
    os._exit(_EXIT_FAILED)


def _check(plan: _Plan, result: int, what: str) -> None:
    if result != 0:
        _die(plan, what, ctypes.get_errno())


def _run_child(plan: _Plan) -> NoReturn:
    """First fork: enter/create the namespaces, fork pid 1, report it, exit."""
    try:
        # A new session: no controlling terminal, no job-control signals from ours.
        os.setsid()
        if plan.netns_fd is not None:
            _check(plan, _libc.setns(plan.netns_fd, CLONE_NEWNET), f"setns {plan.netns_path}")
        pid = str(os.getpid()).encode()
        for fd, path in plan.cgroup_fds:
            try:
                os.write(fd, pid)
            except OSError as e:
                _die(plan, f"join cgroup {path}", e.errno or errno.EIO)
        if plan.unshare_flags:
            _check(plan, _libc.unshare(plan.unshare_flags), "unshare")
        if plan.hostname is not None:
            _check(
                plan,
                _libc.sethostname(plan.hostname, len(plan.hostname)),
                "sethostname",
            )
        # The new pid namespace applies to our children only: this fork is its pid 1.
        holder = os.fork()
        if holder == 0:
            _run_holder(plan)
        _report(plan.report_fd, f"P{holder}\n".encode())
        os._exit(0)
    except OSError as e:
        _die(plan, "holder setup", e.errno or errno.EIO)
    except BaseException as e:
        _report(plan.report_fd, f"Eholder setup: {type(e).__name__}: {e}\n".encode())
    finally:
        # Whatever happened, never return into the controller's stack in a forked copy.
        os._exit(_EXIT_FAILED)


def _run_holder(plan: _Plan) -> NoReturn:
    """Second fork (pid 1 of the env): private mounts, own /proc, clean fds, exec."""
    try:
        if plan.private_mounts:
            # Mount events must neither leak out to the host nor in from it.
            _check(plan, _libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None), "make / private")
        if plan.mount_proc:
            # So that processes in the env see their own pid namespace in /proc.
            _check(
                plan,
                _libc.mount(b"proc", b"/proc", b"proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None),
                "mount /proc",
            )
        # The controller thread that forked may have blocked signals; exec keeps the mask.
        signal.pthread_sigmask(signal.SIG_SETMASK, ())
        for target in (0, 1, 2):
            os.dup2(plan.devnull_fd, target)
        # Keep only stdio and the report pipe (close-on-exec: closes itself on success).
        os.closerange(3, plan.report_fd)
        os.closerange(plan.report_fd + 1, plan.max_fd)
    except OSError as e:
        _die(plan, "holder setup", e.errno or errno.EIO)
    except BaseException as e:
        _report(plan.report_fd, f"Eholder setup: {type(e).__name__}: {e}\n".encode())
        os._exit(_EXIT_FAILED)
    try:
        os.execv(plan.catatonit, [b"catatonit", b"-P"])
    except OSError as e:
        _die(plan, f"exec {plan.catatonit.decode()}", e.errno or errno.EIO)
    finally:
        os._exit(_EXIT_FAILED)


# --------------------------------------------------------------------------- driver


def _find_catatonit(path: str | None) -> str:
    found = shutil.which(path or "catatonit")
    if found is None:
        where = f" at {path}" if path else ""
        raise KernelError(
            f"catatonit not found{where}; run hack/setup.sh or apt-get install catatonit"
        )
    return found


class ForkingHolderDriver:
    """`HolderDriver` that builds each holder with one double-fork chain and one exec."""

    def __init__(self, *, catatonit: str | None = None, spawn_timeout: float = 10.0) -> None:
        """Locate catatonit now, so a missing package fails at startup, not per env."""
        self.catatonit = _find_catatonit(catatonit)
        self.spawn_timeout = spawn_timeout

    # ---------------------------------------------------------------- spawn

    def spawn(self, spec: HolderSpec) -> ProcessRef:
        """Start the holder (detached: not our child) and return its identity."""
        unknown = spec.namespaces - KNOWN_NAMESPACES
        if unknown:
            raise KernelError(
                f"holder for env {spec.env}: unknown namespaces {sorted(unknown)}; "
                f"use a subset of {sorted(KNOWN_NAMESPACES)}"
            )
        read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
        opened = [write_fd]
        try:
            plan = self._prepare(spec, report_fd=write_fd, opened=opened)
            child = os.fork()
            if child == 0:
                _run_child(plan)
            # Only the children may keep the write end: EOF must mean "they are done".
            _close_all(opened)
            opened.clear()
            return self._collect(spec, read_fd=read_fd, child=child)
        finally:
            _close_all(opened)
            os.close(read_fd)

    def _prepare(self, spec: HolderSpec, *, report_fd: int, opened: list[int]) -> _Plan:
        """Open everything the children need; failures here never fork anything."""

        def open_fd(path: str, flags: int, what: str) -> int:
            try:
                fd = os.open(path, flags | os.O_CLOEXEC)
            except OSError as e:
                raise KernelError(
                    f"holder for env {spec.env} failed: open {what}{path}: "
                    f"{errno.errorcode.get(e.errno or 0, '?')} ({e.strerror})"
                ) from e
            opened.append(fd)
            return fd

        devnull = open_fd(os.devnull, os.O_RDWR, "")
        netns_fd = (
            open_fd(spec.netns_path, os.O_RDONLY, "netns ") if "net" in spec.namespaces else None
        )
        cgroup_fds = tuple(
            (open_fd(path, os.O_WRONLY, "cgroup "), path) for path in spec.cgroup_procs
        )
        flags = 0
        for name, flag in _UNSHARE_FLAGS.items():
            if name in spec.namespaces:
                flags |= flag
        return _Plan(
            report_fd=report_fd,
            devnull_fd=devnull,
            netns_fd=netns_fd,
            netns_path=spec.netns_path,
            cgroup_fds=cgroup_fds,
            unshare_flags=flags,
            hostname=spec.hostname.encode() if "uts" in spec.namespaces else None,
            private_mounts="mnt" in spec.namespaces,
            mount_proc="mnt" in spec.namespaces and "pid" in spec.namespaces,
            catatonit=self.catatonit.encode(),
            max_fd=os.sysconf("SC_OPEN_MAX"),
        )

    def _collect(self, spec: HolderSpec, *, read_fd: int, child: int) -> ProcessRef:
        """Read the report pipe to EOF (with a deadline), reap the child, return the ref."""
        deadline = time.monotonic() + self.spawn_timeout
        buffer = b""
        holder: ProcessRef | None = None
        timed_out = False
        poller = select.poll()
        poller.register(read_fd, select.POLLIN)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not poller.poll(remaining * 1000):
                timed_out = True
                break
            chunk = os.read(read_fd, 4096)
            if not chunk:
                break
            buffer += chunk
            if holder is None and buffer.startswith(b"P") and b"\n" in buffer:
                # Take the start time now, while the pid is certainly still the holder's.
                holder = _identify(int(buffer[1 : buffer.index(b"\n")]), deadline=deadline)
        if timed_out:
            # Our own unreaped child cannot have been replaced by another process: safe.
            _kill_quietly(child)
            if holder is not None:
                with contextlib.suppress(KernelError):
                    self.stop(holder, timeout=1.0)
        status = _reap(child)
        lines = buffer.decode(errors="replace").splitlines()
        failure = next((line[1:] for line in lines if line.startswith("E")), None)
        prefix = f"holder for env {spec.env} failed"
        if timed_out:
            raise KernelError(
                f"{prefix}: catatonit did not start within {self.spawn_timeout:g}s; "
                "check the host's load and dmesg"
            )
        if failure is not None:
            raise KernelError(f"{prefix}: {failure}")
        if holder is None or not self.alive(holder):
            raise KernelError(
                f"{prefix}: the fork chain ended without a running holder ({status}); check dmesg"
            )
        return holder

    # ---------------------------------------------------------------- inspect / stop

    def alive(self, ref: ProcessRef) -> bool:
        """True if `ref.pid` is running and still has `ref.start_time` (zombies are dead)."""
        return process_alive(ref.pid, ref.start_time)

    def stop(self, ref: ProcessRef, *, timeout: float = 5.0) -> None:
        """SIGKILL the holder, if `ref` still is it, and wait until it has exited.

        As pid 1 of its pid namespace, its death makes the kernel kill every process in
        that namespace; the holder has exited only once they are all gone. It is not our
        child, so init (or a subreaper) reaps it: an exited zombie counts as gone.
        """
        try:
            # The pidfd pins one process: if it matches `ref` now, the signal below can
            # only reach that process even if the pid is reused meanwhile.
            pidfd = os.pidfd_open(ref.pid)
        except ProcessLookupError:
            return
        try:
            if not self.alive(ref):
                return
            try:
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            except ProcessLookupError:
                return
            poller = select.poll()
            poller.register(pidfd, select.POLLIN)  # readable once the process has exited
            if not poller.poll(max(timeout, 0.0) * 1000):
                raise KernelError(
                    f"holder pid {ref.pid} did not exit within {timeout:g}s of SIGKILL; "
                    "a process in its pid namespace may be stuck in the kernel (state D)"
                )
        finally:
            os.close(pidfd)

    def find(self, spec: HolderSpec) -> ProcessRef | None:
        """The live holder of `spec`'s environment, when the inventory lost track of it.

        Proof of identity: it is a member of the env's cgroup (ours by construction), runs
        catatonit, and sits in the env's pinned netns (device and inode of the pin).
        """
        try:
            pin = os.stat(spec.netns_path)
        except FileNotFoundError:
            return None
        for procs in spec.cgroup_procs:
            try:
                with open(procs, encoding="ascii") as handle:
                    pids = [int(line) for line in handle if line.strip()]
            except (FileNotFoundError, ValueError):
                continue
            for pid in pids:
                ref = _holder_candidate(pid, catatonit=self.catatonit, pin=pin)
                if ref is not None:
                    return ref
        return None

    def holder_namespaces(self, ref: ProcessRef) -> dict[str, tuple[int, int]]:
        """Namespace name → (dev, inode) of the holder's /proc/PID/ns/* links.

        Empty when the holder is not running. Compare with the netns pin's `os.stat` to
        verify the holder sits in the env's network namespace.
        """
        if not self.alive(ref):
            return {}
        result: dict[str, tuple[int, int]] = {}
        for name in sorted(KNOWN_NAMESPACES):
            try:
                st = os.stat(f"/proc/{ref.pid}/ns/{name}")
            except (FileNotFoundError, ProcessLookupError):
                return {}
            result[name] = (st.st_dev, st.st_ino)
        # Re-check: the pid could have been reused while we read the links.
        return result if self.alive(ref) else {}


# --------------------------------------------------------------------------- helpers


def _holder_candidate(pid: int, *, catatonit: str, pin: os.stat_result) -> ProcessRef | None:
    start_time = process_start_time(pid)
    if start_time is None:
        return None
    try:
        exe = os.readlink(f"/proc/{pid}/exe")
        net = os.stat(f"/proc/{pid}/ns/net")
    except OSError:
        return None
    if os.path.realpath(exe) != os.path.realpath(catatonit):
        return None
    if (net.st_dev, net.st_ino) != (pin.st_dev, pin.st_ino):
        return None
    # Re-check: the pid must not have been reused while we looked.
    return ProcessRef(pid=pid, start_time=start_time) if process_alive(pid, start_time) else None


def _close_all(fds: Sequence[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def _kill_quietly(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def _reap(child: int) -> str:
    """Wait for our intermediate child; describe how it ended."""
    try:
        _, status = os.waitpid(child, 0)
    except ChildProcessError:
        # Someone else in the controller reaped it (waitpid(-1)); the pipe told us enough.
        return "intermediate process reaped elsewhere"
    if os.WIFSIGNALED(status):
        return f"intermediate process killed by signal {os.WTERMSIG(status)}"
    return f"intermediate process exited with status {os.waitstatus_to_exitcode(status)}"


def _identify(pid: int, *, deadline: float) -> ProcessRef:
    """ProcessRef of `pid`, retrying briefly until /proc shows it."""
    while True:
        start_time = process_start_time(pid)
        if start_time is not None:
            return ProcessRef(pid=pid, start_time=start_time)
        if time.monotonic() >= deadline:
            # Report a ref that can never match: alive() is False, stop() is a no-op.
            return ProcessRef(pid=pid, start_time=-1)
        time.sleep(0.001)
