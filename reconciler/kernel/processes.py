"""Workload processes: started inside an environment, adopted after a restart, stopped as a tree.

An environment *is* its holder (reconciler.kernel.holder): catatonit, pid 1 of the env's
pid namespace, owner of its uts/ipc/mnt namespaces, member of its netns and cgroup. A
workload joins all of that *before* exec, so there is no instant at which it runs
outside: the controller opens `/proc/<holder>/ns/{ipc,uts,net,pid,mnt}` and the env's
`cgroup.procs` files, checks that the holder is still the recorded (pid, start time) —
so the namespace fds are certainly the env's, not a recycled pid's — and forks:

    controller ─fork─▶ A: setsid, join cgroups, setns (5 namespaces)
                        ─fork─▶ B (first process in the env's pid ns): fork, _exit
                                 ─fork─▶ S, the shim ─fork─▶ W, the workload:
                                                              setsid, report identity,
                                                              stdio → log, setgroups,
                                                              setgid, setuid, chdir,
                                                              execvpe(command)
                                         S: exec a tiny Python waiter (python3 -I -S):
                                            waitpid(W), write <log_dir>/<name>.exit
    A waits for B, then exits; the controller reaps A.

Why this shape:
- `setns(CLONE_NEWPID)` moves only the *children* of the caller, hence a fork after it.
- An orphan is re-parented to the reaper of its dead parent's *active* pid namespace.
  A sits outside the env's pid ns, so its orphans would go to the host's init (measured:
  PPid 1 on the host); B sits inside, so S and W end up under the env's pid 1, the
  holder: the env's tree is `catatonit ─ shim ─ workload`, nothing of it is a child of
  the controller, and it all survives controller restarts.
- Exit codes: only a parent can `waitpid`, and the controller is not one. The shim is,
  and writes `{pid, startTime, exitCode, signal}` atomically next to the log, so exits
  that happen while no controller runs are still known (restart policy OnFailure needs
  the code). The shim is a fresh `python3 -I -S` (no site, no venv), not a forked copy
  of the controller. Measured here: the exec'd shim holds 3.6 MiB private memory (USS;
  PSS 4.6 MiB, RSS 9.6 MiB; the rest is shared libpython). A forked copy starts at 1 MiB
  private but shares the controller's ~40 MiB dirty heap copy-on-write, and that turns
  private page by page as the controller keeps running (each page the controller
  writes is copied for it; the shim keeps the old one): 22 MiB after one burst of
  allocation in the parent, all of it once the controller exits.
- Between fork and exec the children run only `os.*`, `signal` and ctypes calls on
  data prepared beforehand: the controller is multi-threaded, and a forked child owns a
  copy of every lock another thread held (logging, imports), which could deadlock it.
- Failures before exec travel back through one O_CLOEXEC pipe as `E<what>: <ERRNO>`; the
  workload reports `P<host pid> <start time>` (read from the host's /proc through an fd
  opened beforehand: inside the env, /proc shows the env's pids). End of file means
  every writer has exec'd or died.

Ownership and adoption: W's environment carries `RECONCILER_PROCESS=<name>`, W is a
session leader, and its parent is the shim whose command line names (env, name). With
membership of the env's cgroup, that identifies the workload after a controller restart
(`find`). `stop` signals W's session plus every descendant (a child that called setsid
is still a descendant while its parent lives), each through a pidfd opened and then
re-checked against its start time, so a recycled pid is never hit.

`run_in_env` (used by `reconciler exec`) takes the same way in, but keeps stdio and the
caller's process group (so a terminal on stdin stays the command's controlling terminal
and Ctrl-C reaches it; no new pty is made) and waits: A stays as the waiter and exits
with the command's code.
"""

from __future__ import annotations

import contextlib
import errno
import grp
import json
import os
import pwd
import re
import select
import signal
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn, Protocol

from reconciler.errors import KernelError
from reconciler.kernel import logfiles, nsutil
from reconciler.kernel.fdset import FdSet, report
from reconciler.kernel.types import ProcessRef
from reconciler.state.procinfo import process_alive

PROCESS_ENV_VAR = "RECONCILER_PROCESS"
SHIM_MARKER = "reconciler-shim"
EXIT_SUFFIX = ".exit"
_LABEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,252}$")
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# nsenter's order: mnt last, because joining it also changes root and cwd.
_NAMESPACES = (
    ("ipc", nsutil.CLONE_NEWIPC),
    ("uts", nsutil.CLONE_NEWUTS),
    ("net", nsutil.CLONE_NEWNET),
    ("pid", nsutil.CLONE_NEWPID),
    ("mnt", nsutil.CLONE_NEWNS),
)
# Shell convention: 127 "command not found", 126 "found but cannot run".
EXIT_NOT_FOUND = 127
EXIT_CANNOT_RUN = 126
_EXIT_FAILED = 127
# Python starts with these ignored, and SIG_IGN survives exec: a workload must get the
# defaults (`yes | head` relies on SIGPIPE). The rest are reset for `exec`'s command.
_RESET_SIGNALS = (
    signal.SIGPIPE,
    signal.SIGXFSZ,
    signal.SIGINT,
    signal.SIGQUIT,
    signal.SIGTERM,
    signal.SIGHUP,
)
_SHIM_IGNORES = (signal.SIGHUP, signal.SIGINT, signal.SIGQUIT, signal.SIGTERM)

# The shim, after exec: wait for the workload, record how it ended, atomically. No json
# import (it costs the shim a tenth of its memory): env and name are plain labels
# (checked by `spawn`), everything else is a number.
# argv: -c MARKER ENV NAME CHILD(pid in the env's pid ns) PID START DIRFD
_SHIM_SOURCE = """\
import os, signal, sys, time
for s in (signal.SIGHUP, signal.SIGINT, signal.SIGQUIT, signal.SIGTERM):
    signal.signal(s, signal.SIG_IGN)
_, _, env, name, child, pid, start, dirfd = sys.argv
code = sig = "null"
try:
    status = os.waitpid(int(child), 0)[1]
    if os.WIFSIGNALED(status):
        sig = str(os.WTERMSIG(status))
    else:
        code = str(os.WEXITSTATUS(status))
except ChildProcessError:
    pass
now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
record = ('{"env": "%s", "process": "%s", "pid": %d, "startTime": %d, "exitCode": %s, '
          '"signal": %s, "time": "%s"}\\n' % (env, name, int(pid), int(start), code, sig, now))
dirfd = int(dirfd)
temp = "." + name + ".exit." + str(os.getpid())
fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600, dir_fd=dirfd)
os.write(fd, record.encode())
os.fsync(fd)
os.close(fd)
os.rename(temp, name + ".exit", src_dir_fd=dirfd, dst_dir_fd=dirfd)
"""


class ProcessDriver(Protocol):
    """Workloads inside an environment (to move to kernel.types)."""

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
        """Start `command` inside the holder's namespaces and the env's cgroup (detached)."""
        ...

    def find(self, *, env: str, cgroup_procs: tuple[str, ...], name: str) -> ProcessRef | None:
        """The running workload `name` of the env, when no record names it."""
        ...

    def alive(self, ref: ProcessRef) -> bool:
        """True if `ref.pid` is running and still has `ref.start_time`."""
        ...

    def stop(self, ref: ProcessRef, *, grace: float = 5.0) -> None:
        """SIGTERM the process tree, SIGKILL what is left after `grace` seconds."""
        ...

    def exit_status(
        self, ref: ProcessRef, *, log_dir: Path, name: str, timeout: float = 0.0
    ) -> int | None:
        """The exit code of `ref` (128+N if killed by signal N), None while unknown."""
        ...


# --------------------------------------------------------------------------- users


@dataclass(frozen=True)
class UserIds:
    """Who a workload runs as, resolved from the host's passwd/group databases."""

    uid: int
    gid: int
    groups: tuple[int, ...]
    home: str


def resolve_user(user: str | int) -> UserIds:
    """Resolve a user name or uid; an unknown uid runs with gid = uid and HOME=/.

    The env shares the host's filesystem (its mount namespace only adds private mounts),
    so the host's /etc/passwd is the env's.
    """
    if isinstance(user, int) or user.isdigit():
        uid = int(user)
        try:
            entry = pwd.getpwuid(uid)
        except KeyError:
            return UserIds(uid=uid, gid=uid, groups=(uid,), home="/")
    else:
        try:
            entry = pwd.getpwnam(user)
        except KeyError:
            raise KernelError(
                f"user {user!r} does not exist in /etc/passwd; create it or use a uid"
            ) from None
    groups = tuple(os.getgrouplist(entry.pw_name, entry.pw_gid))
    return UserIds(uid=entry.pw_uid, gid=entry.pw_gid, groups=groups, home=entry.pw_dir or "/")


def group_name(gid: int) -> str:
    """A group's name, or its number when it has none (for messages)."""
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


# --------------------------------------------------------------------------- fork chain


@dataclass(frozen=True)
class _Entry:
    """Open fds of an env's way in: namespaces (fd, CLONE flag, name) and cgroup files."""

    namespaces: tuple[tuple[int, int, str], ...]
    cgroups: tuple[tuple[int, str], ...]


@dataclass(frozen=True)
class _Program:
    """What to exec, as whom, where, with which environment and stdio."""

    file: str
    argv: tuple[str, ...]
    environ: dict[str, str]  # HOSTNAME is added inside the env (its uts namespace)
    working_dir: str
    ids: UserIds
    stdio: tuple[int, int, int] | None  # None: keep the caller's fds 0, 1, 2
    new_session: bool
    # exec: die with the caller (PR_SET_PDEATHSIG); 0 for workloads, which must outlive it
    parent_death_signal: int = 0


@dataclass(frozen=True)
class _Launch:
    """Everything the detached chain (A, B, S, W) needs, prepared by the controller."""

    entry: _Entry
    program: _Program
    report_fd: int
    proc_fd: int  # the controller's /proc: host pids for the identity report
    dir_fd: int  # the log directory, where the shim writes the exit record
    stderr_fd: int  # the shim's stderr: the log (a broken shim says why there)
    devnull_fd: int
    shim_exe: str
    shim_args: tuple[str, ...]  # marker, env, name
    max_fd: int


def _die(report_fd: int, what: str, err: int) -> NoReturn:
    name = errno.errorcode.get(err, str(err))
    # fork fails with EAGAIN when the env's cgroup is at its pids limit.
    hint = "; the environment may be at its pids limit" if err == errno.EAGAIN else ""
    report(report_fd, f"E{what}: {name} ({os.strerror(err)}){hint}\n")
    os._exit(EXIT_NOT_FOUND if err == errno.ENOENT else _EXIT_FAILED)


def _close_except(keep: Sequence[int], max_fd: int) -> None:
    low = 3
    for fd in sorted(set(keep)):
        if fd >= low:
            os.closerange(low, fd)
            low = fd + 1
    os.closerange(low, max_fd)


def _enter(entry: _Entry, report_fd: int) -> None:
    """Join the env's cgroup, then its namespaces (child side: os/ctypes only)."""
    pid = str(os.getpid()).encode()
    for fd, path in entry.cgroups:
        try:
            os.write(fd, pid)
        except OSError as e:
            _die(report_fd, f"join cgroup {path}", e.errno or errno.EIO)
    for fd, _flag, name in entry.namespaces:
        try:
            nsutil.setns(fd, _flag)
        except OSError as e:
            _die(report_fd, f"setns {name}", e.errno or errno.EIO)


def _run_entry(plan: _Launch) -> NoReturn:
    """A: leave the controller's session, enter the env, fork B, wait for it, exit."""
    step = "setsid"
    try:
        os.setsid()
        _enter(plan.entry, plan.report_fd)
        step = "fork"
        launcher = os.fork()
        if launcher == 0:
            _run_launcher(plan)
        step = "wait"
        _, status = os.waitpid(launcher, 0)
        os._exit(0 if status == 0 else _EXIT_FAILED)
    except OSError as e:
        _die(plan.report_fd, step, e.errno or errno.EIO)
    except BaseException as e:
        report(plan.report_fd, f"E{step}: {type(e).__name__}: {e}\n")
    finally:
        # Never return into the controller's stack in a forked copy.
        os._exit(_EXIT_FAILED)


def _run_launcher(plan: _Launch) -> NoReturn:
    """B, in the env's pid ns: fork the shim and exit, so the env's pid 1 adopts it."""
    try:
        if os.fork() == 0:
            _run_shim(plan)
        os._exit(0)
    except OSError as e:
        _die(plan.report_fd, "fork", e.errno or errno.EIO)
    finally:
        os._exit(_EXIT_FAILED)


def _run_shim(plan: _Launch) -> NoReturn:
    """S: fork the workload, learn its identity, become the waiter (exec python -I -S)."""
    step = "fork"
    try:
        ident_read, ident_write = os.pipe2(os.O_CLOEXEC)
        child = os.fork()
        if child == 0:
            os.close(ident_read)
            _exec_program(
                plan.program,
                report_fd=plan.report_fd,
                max_fd=plan.max_fd,
                identity=(plan.proc_fd, ident_write),
            )
        step = f"exec shim {plan.shim_exe}"
        os.close(ident_write)
        ident = b""
        while chunk := os.read(ident_read, 256):
            ident += chunk
        os.close(ident_read)
        pid, _, start = ident.decode().strip().partition(" ")
        for sig in _SHIM_IGNORES:
            # Ignored dispositions survive exec: no gap before the waiter ignores them.
            signal.signal(sig, signal.SIG_IGN)
        os.dup2(plan.devnull_fd, 0)
        os.dup2(plan.devnull_fd, 1)
        os.dup2(plan.stderr_fd, 2)
        os.set_inheritable(plan.dir_fd, True)
        _close_except((plan.dir_fd, plan.report_fd), plan.max_fd)
        argv = [
            SHIM_MARKER,
            "-I",
            "-S",
            "-c",
            _SHIM_SOURCE,
            *plan.shim_args,
            str(child),
            pid or "0",
            start or "-1",
            str(plan.dir_fd),
        ]
        os.execve(plan.shim_exe, argv, {})
    except OSError as e:
        _die(plan.report_fd, step, e.errno or errno.EIO)
    except BaseException as e:
        report(plan.report_fd, f"E{step}: {type(e).__name__}: {e}\n")
    finally:
        os._exit(_EXIT_FAILED)


def _identity(proc_fd: int) -> str:
    """'<pid> <start time>' of the calling process, in the controller's /proc."""
    pid = os.readlink("self", dir_fd=proc_fd)
    fd = os.open(f"{pid}/stat", os.O_RDONLY | os.O_CLOEXEC, dir_fd=proc_fd)
    try:
        stat = os.read(fd, 4096)
    finally:
        os.close(fd)
    # Field 22, counted after the command name (which may contain ')' and spaces).
    start = stat.rpartition(b")")[2].split()[19].decode()
    return f"{pid} {start}"


def _exec_program(
    program: _Program, *, report_fd: int, max_fd: int, identity: tuple[int, int] | None
) -> NoReturn:
    """W (or exec's command): identity, stdio, user, cwd, signals, execvpe. os.* only.

    `identity`: (the controller's /proc fd, the shim's pipe): report who we are first.
    """
    step = "prepare"
    try:
        if program.new_session:
            step = "setsid"
            os.setsid()
        if program.parent_death_signal:
            step = "prctl"
            nsutil.set_parent_death_signal(program.parent_death_signal)
        if identity is not None:
            proc_fd, ident_fd = identity
            step = "identify"
            ident = _identity(proc_fd)
            report(report_fd, f"P{ident}\n")
            os.write(ident_fd, ident.encode())
            os.close(ident_fd)
        if program.stdio is not None:
            step = "stdio"
            for target, fd in enumerate(program.stdio):
                os.dup2(fd, target)
        environ = dict(program.environ)
        environ.setdefault("HOSTNAME", os.uname().nodename)  # the env's uts namespace
        ids = program.ids
        step = "setgroups"
        os.setgroups(list(ids.groups))
        step = f"setgid {ids.gid}"
        os.setgid(ids.gid)
        step = f"setuid {ids.uid}"
        os.setuid(ids.uid)
        # After dropping privileges: the user's own permissions decide, as for a login.
        step = f"chdir {program.working_dir}"
        os.chdir(program.working_dir)
        step = "signals"
        os.umask(0o022)  # not the controller's (state files are private), a usual one
        for sig in _RESET_SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, ())
        _close_except((report_fd,), max_fd)
        step = f"execve {program.file}"
        os.execvpe(program.file, list(program.argv), environ)
    except OSError as e:
        _die(report_fd, step, e.errno or errno.EIO)
    except BaseException as e:
        report(report_fd, f"E{step}: {type(e).__name__}: {e}\n")
    finally:
        os._exit(_EXIT_FAILED)


# --------------------------------------------------------------------------- parent side


def _errno_text(exc: OSError) -> str:
    return f"{errno.errorcode.get(exc.errno or 0, '?')} ({exc.strerror})"


class _Fds(FdSet):
    """fds opened for one fork chain (see `fdset`); `open` names what failed."""

    def open(self, path: str | Path, flags: int, *, what: str, mode: int = 0o600) -> int:
        try:
            fd = os.open(path, flags | os.O_CLOEXEC, mode)
        except OSError as e:
            raise KernelError(f"open {what}{path}: {_errno_text(e)}") from e
        return self.add(fd)


def _open_entry(fds: _Fds, *, holder: ProcessRef, cgroup_procs: Sequence[str]) -> _Entry:
    """Open the holder's namespaces and the cgroup files; prove the holder is `holder`."""
    namespaces = []
    for name, flag in _NAMESPACES:
        try:
            fd = fds.open(f"/proc/{holder.pid}/ns/{name}", os.O_RDONLY, what="")
        except KernelError:
            fd = -1
        if fd < 0 or not process_alive(holder.pid, holder.start_time):
            break
        namespaces.append((fd, flag, name))
    # Checked after opening: if the holder is still (pid, start time) now, every fd above
    # is its namespace, even if the pid gets recycled a moment later.
    if len(namespaces) != len(_NAMESPACES) or not process_alive(holder.pid, holder.start_time):
        raise KernelError(
            f"the env's holder (pid {holder.pid}) is not running; "
            "run `reconciler apply` (or wait for the controller) to recreate it"
        )
    cgroups = tuple((fds.open(path, os.O_WRONLY, what="cgroup "), path) for path in cgroup_procs)
    return _Entry(namespaces=tuple(namespaces), cgroups=cgroups)


def _base_environ(ids: UserIds, declared: Mapping[str, str], name: str | None) -> dict[str, str]:
    environ = {"PATH": DEFAULT_PATH, "HOME": ids.home}
    environ.update(declared)
    if name is not None:
        environ[PROCESS_ENV_VAR] = name  # last: the ownership tag cannot be overridden
    return environ


@dataclass
class _Reports:
    """What the chain said through the report pipe."""

    ref: ProcessRef | None = None
    failure: str | None = None
    timed_out: bool = False


def _read_reports(read_fd: int, *, deadline: float | None) -> _Reports:
    """Read the pipe to EOF (or the deadline); parse `P<pid> <start>` and `E<what>`."""
    poller = select.poll()
    poller.register(read_fd, select.POLLIN)
    buffer = b""
    result = _Reports()
    while True:
        timeout = None if deadline is None else max(deadline - time.monotonic(), 0.0) * 1000
        if not poller.poll(timeout):
            result.timed_out = True
            break
        chunk = os.read(read_fd, 4096)
        if not chunk:
            break
        buffer += chunk
    for line in buffer.decode(errors="replace").splitlines():
        if line.startswith("P") and result.ref is None:
            pid, _, start = line[1:].partition(" ")
            result.ref = ProcessRef(pid=int(pid), start_time=int(start))
        elif line.startswith("E") and result.failure is None:
            result.failure = line[1:]
    return result


def _reap(child: int) -> int | None:
    """Wait for our child; its exit code (128+N for signal N), None if reaped elsewhere."""
    try:
        _, status = os.waitpid(child, 0)
    except ChildProcessError:
        return None
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.waitstatus_to_exitcode(status)


def _shim_executable() -> str:
    # The base interpreter, not the venv's launcher: the shim needs nothing but the stdlib.
    return os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)


# --------------------------------------------------------------------------- /proc reading


@dataclass(frozen=True)
class _Stat:
    pid: int
    state: str
    ppid: int
    session: int
    start_time: int


def _stat(pid: int) -> _Stat | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            text = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = text.rpartition(b")")[2].split()
    # After the name: state(3) ppid(4) pgrp(5) session(6) ... starttime(22).
    return _Stat(
        pid=pid,
        state=fields[0].decode(),
        ppid=int(fields[1]),
        session=int(fields[3]),
        start_time=int(fields[19]),
    )


def _all_stats() -> Iterator[_Stat]:
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = _stat(int(entry))
            if stat is not None and stat.state not in ("Z", "X"):
                yield stat


def _children(pid: int) -> list[int]:
    found: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children", encoding="ascii") as f:
                found += [int(p) for p in f.read().split()]
    except (FileNotFoundError, ProcessLookupError):
        pass
    return found


def _read_nul_list(path: str) -> list[bytes]:
    try:
        with open(path, "rb") as f:
            return f.read().split(b"\0")
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return []


def _is_shim_of(pid: int, *, env: str, name: str) -> bool:
    argv = _read_nul_list(f"/proc/{pid}/cmdline")
    # [MARKER, -I, -S, -c, SOURCE, MARKER, env, name, child, pid, start, dirfd]
    return (
        len(argv) >= 8
        and argv[0] == SHIM_MARKER.encode()
        and argv[5:8] == [SHIM_MARKER.encode(), env.encode(), name.encode()]
    )


def _cgroup_members(cgroup_procs: Sequence[str]) -> set[int]:
    pids: set[int] = set()
    for path in cgroup_procs:
        try:
            with open(path, encoding="ascii") as f:
                pids.update(int(line) for line in f if line.strip())
        except (FileNotFoundError, ValueError):
            continue
    return pids


class _Tree:
    """Pidfds of a workload's process tree: its session plus every descendant.

    Each member is pinned by a pidfd opened *after* listing it and then re-checked
    against the start time the listing showed: a signal through that fd can only reach
    the process we listed, even if its pid is recycled meanwhile.
    """

    def __init__(self, root: ProcessRef) -> None:
        self.root = root
        self.members: dict[int, int] = {}  # pid -> pidfd

    def scan(self) -> None:
        """Add every live member not yet pinned."""
        stats = {s.pid: s for s in _all_stats()}
        wanted: list[_Stat] = []
        occupant = _stat(self.root.pid)
        if occupant is None or occupant.start_time == self.root.start_time:
            # The session id is the root's pid, and a pid stays allocated while any
            # process uses it as its session: so when nothing else has that pid, the
            # session is the root's. (A recycled pid leading a session of its own is
            # another process's, and so is its session: skip.)
            wanted += [s for s in stats.values() if s.session == self.root.pid]
        root = stats.get(self.root.pid)
        if root is not None and root.start_time == self.root.start_time:
            wanted.append(root)
        queue = [s.pid for s in wanted]
        seen = set(queue)
        while queue:
            for child in _children(queue.pop()):
                if child not in seen and child in stats:
                    seen.add(child)
                    queue.append(child)
                    wanted.append(stats[child])
        for stat in wanted:
            if stat.pid not in self.members:
                self._pin(stat)

    def _pin(self, stat: _Stat) -> None:
        try:
            fd = os.pidfd_open(stat.pid)
        except ProcessLookupError:
            return
        if process_alive(stat.pid, stat.start_time):
            self.members[stat.pid] = fd
        else:
            os.close(fd)

    def signal(self, signum: int) -> None:
        """Send `signum` to every pinned member still running."""
        for fd in self.members.values():
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(fd, signum)

    def wait(self, deadline: float) -> bool:
        """Poll until every pinned member has exited or `deadline` passes; True if all did."""
        while True:
            poller = select.poll()
            for fd in self.members.values():
                poller.register(fd, select.POLLIN)  # readable once the process exited
            remaining = deadline - time.monotonic()
            ready = {fd for fd, _ in poller.poll(max(remaining, 0.0) * 1000)}
            for pid, fd in list(self.members.items()):
                if fd in ready:
                    os.close(fd)
                    del self.members[pid]
            if not self.members:
                return True
            if time.monotonic() >= deadline:
                return False

    def close(self) -> None:
        """Close every pidfd."""
        for fd in self.members.values():
            os.close(fd)
        self.members.clear()


# --------------------------------------------------------------------------- the driver


class ForkingProcessDriver:
    """`ProcessDriver` that forks each workload into its env (see the module docstring)."""

    def __init__(
        self,
        *,
        spawn_timeout: float = 10.0,
        kill_timeout: float = 5.0,
        max_log_bytes: int = logfiles.DEFAULT_MAX_BYTES,
    ) -> None:
        """`spawn_timeout`: until exec; `kill_timeout`: for SIGKILL to take effect."""
        self.spawn_timeout = spawn_timeout
        self.kill_timeout = kill_timeout
        self.max_log_bytes = max_log_bytes
        self.shim_exe = _shim_executable()

    # ---------------------------------------------------------------- spawn

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
        """Start `command` in the env; return the workload's identity once it has exec'd.

        Raises KernelError("process NAME in env ENV failed to start: <what>: <ERRNO>")
        when anything before exec fails (nothing is left running then).
        """
        prefix = f"process {name} in env {env} failed to start"
        if not command:
            raise KernelError(f"{prefix}: empty command")
        for label in (env, name):
            # Both become file names and shim arguments: no "/", no "..", no quotes.
            if not _LABEL.match(label):
                raise KernelError(f"{prefix}: {label!r} is not a valid name")
        fds = _Fds()
        try:
            read_fd, write_fd = fds.pipe()
            try:
                ids = resolve_user(user)
                plan = self._prepare(
                    fds,
                    env=env,
                    holder=holder,
                    cgroup_procs=cgroup_procs,
                    name=name,
                    command=command,
                    environ=_base_environ(ids, environ, name),
                    working_dir=working_dir,
                    ids=ids,
                    log_dir=Path(log_dir),
                    report_fd=write_fd,
                )
            except KernelError as exc:
                raise KernelError(f"{prefix}: {exc.message}") from exc
            child = os.fork()
            if child == 0:
                _run_entry(plan)
            # Only the children may keep the write end: EOF must mean "they are done".
            fds.close_one(write_fd)
            reports = _read_reports(read_fd, deadline=time.monotonic() + self.spawn_timeout)
        finally:
            fds.close()
        return self._finish(child, reports, prefix=prefix)

    def _prepare(
        self,
        fds: _Fds,
        *,
        env: str,
        holder: ProcessRef,
        cgroup_procs: Sequence[str],
        name: str,
        command: Sequence[str],
        environ: dict[str, str],
        working_dir: str,
        ids: UserIds,
        log_dir: Path,
        report_fd: int,
    ) -> _Launch:
        """Open everything the chain needs; failures here fork nothing."""
        entry = _open_entry(fds, holder=holder, cgroup_procs=cgroup_procs)
        path = logfiles.log_path(log_dir, name)
        try:
            log_fd = fds.add(logfiles.open_for_append(path, max_bytes=self.max_log_bytes))
        except OSError as e:
            raise KernelError(f"open log {path}: {_errno_text(e)}") from e
        devnull = fds.open(os.devnull, os.O_RDWR, what="")
        program = _Program(
            file=command[0],
            argv=tuple(command),
            environ=environ,
            working_dir=working_dir,
            ids=ids,
            stdio=(devnull, log_fd, log_fd),
            new_session=True,
        )
        return _Launch(
            entry=entry,
            program=program,
            report_fd=report_fd,
            proc_fd=fds.open("/proc", os.O_RDONLY | os.O_DIRECTORY, what=""),
            dir_fd=fds.open(log_dir, os.O_RDONLY | os.O_DIRECTORY, what="log dir "),
            stderr_fd=log_fd,
            devnull_fd=devnull,
            shim_exe=self.shim_exe,
            shim_args=(SHIM_MARKER, env, name),
            max_fd=os.sysconf("SC_OPEN_MAX"),
        )

    def _finish(self, child: int, reports: _Reports, *, prefix: str) -> ProcessRef:
        """Reap A; on any failure stop what did start and raise."""
        if reports.timed_out:
            # Our own unreaped child cannot have been replaced by another process: safe.
            with contextlib.suppress(ProcessLookupError):
                os.kill(child, signal.SIGKILL)
        status = _reap(child)
        failed = reports.timed_out or reports.failure is not None or reports.ref is None
        if failed and reports.ref is not None:
            with contextlib.suppress(KernelError):
                self.stop(reports.ref, grace=0.0)
        if reports.timed_out:
            raise KernelError(
                f"{prefix}: it did not exec within {self.spawn_timeout:g}s; "
                "check the host's load and dmesg"
            )
        if reports.failure is not None:
            raise KernelError(f"{prefix}: {reports.failure}")
        if reports.ref is None:
            raise KernelError(f"{prefix}: the fork chain ended (status {status}) without a report")
        return reports.ref

    # ---------------------------------------------------------------- inspect

    def alive(self, ref: ProcessRef) -> bool:
        """True if `ref.pid` is running and still has `ref.start_time` (zombies are dead)."""
        return process_alive(ref.pid, ref.start_time)

    def exit_status(
        self, ref: ProcessRef, *, log_dir: Path, name: str, timeout: float = 0.0
    ) -> int | None:
        """How `ref` ended, from its shim's record: the exit code, 128+N for signal N.

        None while it runs, or when no record of *this* run exists (the shim was killed
        too). The shim writes the record just after reaping, so a caller that has just
        seen the process die may give it a `timeout` (polled, with a deadline).
        """
        path = Path(log_dir) / f"{name}{EXIT_SUFFIX}"
        deadline = time.monotonic() + timeout
        while True:
            code = _read_exit_record(path, ref)
            if code is not None or time.monotonic() >= deadline:
                return code
            time.sleep(0.005)

    def find(self, *, env: str, cgroup_procs: tuple[str, ...], name: str) -> ProcessRef | None:
        """The running workload `name` of `env`, proven by cgroup membership, its
        `RECONCILER_PROCESS` tag, being a session leader, and (preferably) a shim parent.

        A descendant that called setsid carries the tag too; it loses against the
        process whose parent is the shim, then against the oldest.
        """
        tag = f"{PROCESS_ENV_VAR}={name}".encode()
        candidates: list[tuple[bool, int, int]] = []
        for pid in _cgroup_members(cgroup_procs):
            stat = _stat(pid)
            if stat is None or stat.state in ("Z", "X") or stat.session != pid:
                continue
            if tag not in _read_nul_list(f"/proc/{pid}/environ"):
                continue
            orphan = not _is_shim_of(stat.ppid, env=env, name=name)
            candidates.append((orphan, stat.start_time, pid))
        for _, start_time, pid in sorted(candidates):
            if process_alive(pid, start_time):
                return ProcessRef(pid=pid, start_time=start_time)
        return None

    # ---------------------------------------------------------------- stop

    def stop(self, ref: ProcessRef, *, grace: float = 5.0) -> None:
        """SIGTERM the workload's tree; after `grace` seconds SIGKILL what is left.

        Returns once every member has exited (and the shim has recorded the exit, if it
        manages within a moment). A `ref` that is no longer running is a no-op. Raises
        KernelError if something survives SIGKILL for `kill_timeout` seconds.
        """
        tree = _Tree(ref)
        try:
            tree.scan()
            if not tree.members:
                return
            shim = _shim_ref(ref)
            tree.signal(signal.SIGTERM)
            if tree.wait(time.monotonic() + grace):
                tree.scan()  # children forked while it shut down
            deadline = time.monotonic() + self.kill_timeout
            while tree.members:
                tree.signal(signal.SIGKILL)
                if not tree.wait(deadline):
                    raise KernelError(
                        f"process pid {ref.pid}: pids {sorted(tree.members)} still running "
                        f"{self.kill_timeout:g}s after SIGKILL; one may be stuck in the "
                        "kernel (state D): check dmesg"
                    )
                tree.scan()
            if shim is not None:
                _wait_gone(shim, time.monotonic() + 1.0)
        finally:
            tree.close()


def _read_exit_record(path: Path, ref: ProcessRef) -> int | None:
    try:
        record = json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return None
    if record.get("pid") != ref.pid or record.get("startTime") != ref.start_time:
        return None  # a previous run's record
    if record.get("signal") is not None:
        return 128 + int(record["signal"])
    code = record.get("exitCode")
    return int(code) if code is not None else None


def _shim_ref(ref: ProcessRef) -> ProcessRef | None:
    """The shim waiting for `ref` (its parent, if that is a shim), to wait for its record."""
    stat = _stat(ref.pid)
    if stat is None or stat.start_time != ref.start_time:
        return None
    parent = _stat(stat.ppid)
    argv = _read_nul_list(f"/proc/{stat.ppid}/cmdline")
    if parent is None or argv[:1] != [SHIM_MARKER.encode()]:
        return None
    return ProcessRef(pid=parent.pid, start_time=parent.start_time)


def _wait_gone(ref: ProcessRef, deadline: float) -> None:
    try:
        fd = os.pidfd_open(ref.pid)
    except ProcessLookupError:
        return
    try:
        if process_alive(ref.pid, ref.start_time):
            poller = select.poll()
            poller.register(fd, select.POLLIN)
            poller.poll(max(deadline - time.monotonic(), 0.0) * 1000)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- exec


class ExecError(KernelError):
    """The command of `run_in_env` could not be started; exit code 127 or 126 like a shell."""

    def __init__(self, message: str, *, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def run_in_env(
    *,
    env: str,
    holder: ProcessRef,
    cgroup_procs: Sequence[str],
    command: Sequence[str],
    environ: Mapping[str, str] | None = None,
    working_dir: str = "/",
    user: str | int = "root",
) -> int:
    """Run `command` inside the env with the caller's stdio; return its exit code.

    The command joins the env's namespaces and cgroup before exec, like a workload, but
    stays in the caller's process group: a terminal on stdin remains its controlling
    terminal and Ctrl-C reaches it (the caller ignores SIGINT/SIGQUIT meanwhile, as
    system(3) does). Killed by signal N: 128+N. Raises ExecError if it cannot start.
    """
    if not command:
        raise ExecError(f"exec in env {env}: no command given", exit_code=2)
    ids = resolve_user(user)
    declared = dict(environ or {})
    if "TERM" in os.environ:
        declared.setdefault("TERM", os.environ["TERM"])
    program = _Program(
        file=command[0],
        argv=tuple(command),
        environ=_base_environ(ids, declared, None),
        working_dir=working_dir,
        ids=ids,
        stdio=None,
        new_session=False,
        parent_death_signal=signal.SIGTERM,
    )
    caller = os.getpid()
    fds = _Fds()
    with _ignoring_terminal_signals():
        try:
            try:
                entry = _open_entry(fds, holder=holder, cgroup_procs=cgroup_procs)
            except KernelError as exc:
                raise ExecError(f"exec in env {env}: {exc.message}", exit_code=1) from exc
            read_fd, write_fd = fds.pipe()
            child = os.fork()
            if child == 0:
                _run_exec_waiter(
                    entry,
                    program,
                    report_fd=write_fd,
                    max_fd=os.sysconf("SC_OPEN_MAX"),
                    caller=caller,
                )
            fds.close_one(write_fd)
            # No deadline: this is the user's command, it runs as long as it runs.
            reports = _read_reports(read_fd, deadline=None)
        finally:
            fds.close()
        status = _reap(child)
    if reports.failure is not None:
        code = EXIT_NOT_FOUND if "ENOENT" in reports.failure else EXIT_CANNOT_RUN
        raise ExecError(f"exec in env {env} failed: {reports.failure}", exit_code=code)
    return EXIT_CANNOT_RUN if status is None else status


def _run_exec_waiter(
    entry: _Entry, program: _Program, *, report_fd: int, max_fd: int, caller: int
) -> NoReturn:
    """A for exec: enter, fork the command into the pid ns, wait, exit with its code.

    If the caller dies (killed by `timeout`, a closed ssh session), A is killed too and
    the command gets SIGTERM: an attached command must not run on unattended.
    """
    step = "prctl"
    try:
        nsutil.set_parent_death_signal(signal.SIGKILL)
        if os.getppid() != caller:
            os._exit(_EXIT_FAILED)  # the caller died before the line above took effect
        _enter(entry, report_fd)
        step = "fork"
        command = os.fork()
        if command == 0:
            _exec_program(program, report_fd=report_fd, max_fd=max_fd, identity=None)
        os.close(report_fd)  # EOF for the caller once the command has exec'd
        step = "wait"
        _, status = os.waitpid(command, 0)
        if os.WIFSIGNALED(status):
            os._exit(128 + os.WTERMSIG(status))
        os._exit(os.waitstatus_to_exitcode(status))
    except OSError as e:
        _die(report_fd, step, e.errno or errno.EIO)
    except BaseException as e:
        report(report_fd, f"E{step}: {type(e).__name__}: {e}\n")
    finally:
        os._exit(_EXIT_FAILED)


@contextlib.contextmanager
def _ignoring_terminal_signals() -> Iterator[None]:
    # Only the main thread may change dispositions; elsewhere (tests) keep them.
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGQUIT)}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
