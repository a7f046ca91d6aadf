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
- NOT a child of the controller: its own session, stdio on /dev/null, no other fd,
  an empty environment, default signal dispositions. It outlives the controller; a
  restarted controller re-adopts it by `ProcessRef` (pid + start time: pids are reused,
  the pair is not).

Workloads are later started with `nsenter --target <holder pid>`, so they share all of
the holder's namespaces.

Who starts it: not the controller. The driver starts one small zygote process
(reconciler.kernel.zygote: `python -I -S`, a few MB, started by posix_spawn, i.e. vfork)
on first use and sends it requests over a socket: the env's netns pin and cgroup.procs
files, opened here, travel with each request (SCM_RIGHTS), so a missing netns fails here
and starts nothing. The zygote steps into the env's netns, cgroups and new namespaces
itself, posix_spawns catatonit there (no fork: no page-table copy, no copy-on-write), and
steps back; it answers with the holder's pid once catatonit runs, and the driver takes
its identity (pid + start time). Requests are pipelined: `spawn_many` sends them all,
then collects the answers; one env's failure is its own `KernelError`.

    controller ──request──▶ zygote: setns, join cgroups, unshare, posix_spawn, return
                ◀─answer──                                       └──▶ holder: catatonit -P

The holder is the zygote's child: the zygote reaps it when it exits and never signals
one it has reported; when the zygote exits, its holders are re-parented to init. The
zygote is our child and we reap it. It exits when its socket reaches end-of-file
(`close()`, the driver dropped, or the controller died); a zygote that died is replaced
on the next spawn, and the requests it had in flight fail with a `KernelError`; one
silent for `spawn_timeout` is killed and replaced.

Stopping is batched too: `stop_many` SIGKILLs every holder through a pidfd checked
against its start time, then waits for all of them with one deadline.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import select
import shutil
import signal
import socket
import sys
import threading
import time
import weakref
from array import array
from collections.abc import Iterable, Iterator, Sequence
from types import TracebackType

from reconciler.errors import KernelError
from reconciler.kernel import zygote
from reconciler.kernel.types import HolderSpec, ProcessRef
from reconciler.state.procinfo import process_alive, process_start_time

KNOWN_NAMESPACES = zygote.KNOWN_NAMESPACES

# How long `close()` waits for the zygote to leave after end-of-file, then after SIGKILL.
_CLOSE_TIMEOUT = 2.0
# pidfds one stop_many holds at once (the controller's fd limit may be 1024).
_STOP_CHUNK = 256
# The zygote's entry point: import it from its own directory, after the stdlib's, so its
# cached bytecode is used (a script given by path is compiled on every start).
_LAUNCH = (
    "import sys; sys.path.append(sys.argv.pop(1)); import zygote; sys.exit(zygote.main(sys.argv))"
)
# Extra zygote options (zygote.OPTION_*); tests set them to reach rare paths.
_ZYGOTE_OPTIONS: tuple[str, ...] = ()
# What a request carries besides its fds: (request id, datagram).
_Prepared = tuple[int, bytes, list[int]]


# --------------------------------------------------------------------------- the zygote


class _ZygoteProcess:
    """One running zygote: our child (pid and pidfd) and our end of its socket."""

    def __init__(self, *, pid: int, pidfd: int, sock: socket.socket) -> None:
        self.pid = pid
        self.pidfd = pidfd
        self.sock = sock

    @classmethod
    def start(cls) -> _ZygoteProcess:
        """posix_spawn a zygote (stdio on /dev/null, its own session, our socket as fd 3)."""
        if not sys.executable:
            raise KernelError("cannot start the holder zygote: sys.executable is unknown")
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            pid = os.posix_spawn(
                sys.executable,
                [
                    sys.executable,
                    "-I",
                    "-S",
                    "-c",
                    _LAUNCH,
                    os.path.dirname(os.path.abspath(zygote.__file__)),
                    "3",
                    str(os.getpid()),
                    *_ZYGOTE_OPTIONS,
                ],
                {},
                file_actions=_zygote_fd_actions(theirs.fileno()),
                setsid=True,
                setsigmask=(),
                # Dispositions the controller may have set: the zygote waits for its children.
                setsigdef=(signal.SIGCHLD, signal.SIGINT, signal.SIGTERM, signal.SIGHUP),
            )
        except OSError as e:
            ours.close()
            raise KernelError(
                f"cannot start the holder zygote with {sys.executable}: "
                f"{_errno_name(e)}; check that this interpreter runs"
            ) from e
        finally:
            theirs.close()
        # Our child, not yet reaped: the pid is certainly the zygote's.
        return cls(pid=pid, pidfd=os.pidfd_open(pid), sock=ours)

    def exited(self) -> bool:
        """True once the zygote has exited (a zombie until `close` reaps it)."""
        return _wait_readable(self.pidfd, 0.0)

    def send(self, data: bytes, fds: Sequence[int]) -> None:
        """One request; BlockingIOError when the socket is full."""
        ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array("i", fds))] if fds else []
        self.sock.sendmsg([data], ancillary, socket.MSG_DONTWAIT | socket.MSG_NOSIGNAL)

    def receive(self) -> tuple[list[zygote.Answer], bool]:
        """Every answer waiting now, and whether the zygote's end is closed."""
        answers: list[zygote.Answer] = []
        while True:
            try:
                data = self.sock.recv(zygote.MAX_MESSAGE, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return answers, False
            except ConnectionResetError:
                return answers, True
            if not data:
                return answers, True
            answers.append(zygote.decode_answer(data))

    def close(self, *, kill: bool = False) -> str:
        """End it (end-of-file, then SIGKILL past a deadline), reap it, say how it ended."""
        self.sock.close()
        try:
            if kill or not _wait_readable(self.pidfd, _CLOSE_TIMEOUT):
                with contextlib.suppress(ProcessLookupError):
                    signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
                if not _wait_readable(self.pidfd, _CLOSE_TIMEOUT):
                    return "did not exit after SIGKILL"
            try:
                _, status = os.waitpid(self.pid, 0)
            except ChildProcessError:
                return "ended"  # reaped elsewhere (waitpid(-1) somewhere in the process)
            return zygote.describe_exit(status)
        finally:
            os.close(self.pidfd)


def _zygote_fd_actions(sock_fd: int) -> list[tuple[int, ...] | tuple[int, int, str, int, int]]:
    """posix_spawn file actions: the zygote's socket end as fd 3, stdio on /dev/null."""
    actions: list[tuple[int, ...] | tuple[int, int, str, int, int]] = []
    if sock_fd == 3:
        # dup2(3, 3) would keep close-on-exec: go through another number first.
        actions.append((os.POSIX_SPAWN_DUP2, 3, 4))
        sock_fd = 4
    actions += [
        (os.POSIX_SPAWN_DUP2, sock_fd, 3),
        (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDWR, 0),
        (os.POSIX_SPAWN_DUP2, 0, 1),
        (os.POSIX_SPAWN_DUP2, 0, 2),
    ]
    return actions


class _ZygoteClient:
    """The driver's side of the zygote: (re)start it, and one exchange of requests at a time."""

    def __init__(self, *, silence: float) -> None:
        self._lock = threading.Lock()
        self._process: _ZygoteProcess | None = None
        self._silence = silence
        self._owner = os.getpid()

    @property
    def pid(self) -> int | None:
        """The running zygote's pid, if one was started and not closed."""
        process = self._process
        return process.pid if process is not None else None

    def start(self) -> None:
        """Start the zygote now, if none runs."""
        with self._lock:
            self._running()

    def close(self) -> None:
        """Stop and reap the zygote, if one runs; idempotent."""
        if os.getpid() != self._owner:
            return  # a forked copy of the controller: the zygote is not its child
        with self._lock:
            if self._process is not None:
                self._process.close()
                self._process = None

    def exchange(
        self, requests: Iterator[_Prepared]
    ) -> tuple[dict[int, zygote.Answer], str | None]:
        """Send every request (closing its fds once sent) while collecting the answers.

        Returns the answers by request id and, when some are missing, why (the zygote
        died, hung, or could not start). Requests are pulled from `requests` only when
        they can be sent, so their fds are open for a short while only.
        """
        with self._lock:
            first = next(requests, None)
            if first is None:
                return {}, None
            try:
                process = self._running()
            except KernelError as e:
                _close_all(first[2])
                return {}, e.message
            return self._exchange(process, first, requests)

    def _running(self) -> _ZygoteProcess:
        process = self._process
        if process is not None and not process.exited():
            return process
        if process is not None:
            process.close()
        self._process = _ZygoteProcess.start()
        return self._process

    def _exchange(
        self, process: _ZygoteProcess, first: _Prepared, rest: Iterator[_Prepared]
    ) -> tuple[dict[int, zygote.Answer], str | None]:
        answers: dict[int, zygote.Answer] = {}
        waiting: set[int] = set()
        pending: _Prepared | None = first
        deadline = time.monotonic() + self._silence
        poller = select.poll()
        try:
            while pending is not None or waiting:
                while pending is not None:
                    request_id, data, fds = pending
                    try:
                        process.send(data, fds)
                    except BlockingIOError:
                        break  # the socket is full: collect answers, then go on
                    except (BrokenPipeError, ConnectionResetError):
                        return answers, self._lost(process, kill=False)
                    except OSError as e:
                        error = f"send to the holder zygote: {_errno_name(e)}"
                        answers[request_id] = zygote.Answer(request_id, 0, error)
                    else:
                        waiting.add(request_id)
                        deadline = time.monotonic() + self._silence
                    _close_all(fds)
                    pending = next(rest, None)
                want = select.POLLIN | (select.POLLOUT if pending is not None else 0)
                poller.register(process.sock, want)
                if not poller.poll(max(0.0, deadline - time.monotonic()) * 1000):
                    if time.monotonic() >= deadline:
                        return answers, self._lost(process, kill=True)
                    continue
                received, closed = process.receive()
                for answer in received:
                    if answer.request_id in waiting:
                        waiting.discard(answer.request_id)
                        answers[answer.request_id] = answer
                        deadline = time.monotonic() + self._silence
                if closed:
                    return answers, self._lost(process, kill=False)
            return answers, None
        except zygote.ProtocolError:
            return answers, self._lost(process, kill=True)
        finally:
            if pending is not None:
                _close_all(pending[2])

    def _lost(self, process: _ZygoteProcess, *, kill: bool) -> str:
        """Reap a zygote that died (or kill a hung one); why its requests have no answer."""
        self._process = None
        how = process.close(kill=kill)
        if kill:
            how = f"did not answer within {self._silence:g}s and was killed ({how})"
        return f"the holder zygote (pid {process.pid}) {how}; the next spawn starts a new one"


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
    """`HolderDriver` whose holders a small zygote process spawns, many at a time.

    `spawn_timeout`: the zygote serves one request at a time; one that answers nothing for
    this long is hung, and is killed (its requests fail; the next spawn starts a new one).
    """

    def __init__(self, *, catatonit: str | None = None, spawn_timeout: float = 10.0) -> None:
        """Locate catatonit now, so a missing package fails at startup, not per env."""
        self.catatonit = _find_catatonit(catatonit)
        self.spawn_timeout = spawn_timeout
        self._zygote = _ZygoteClient(silence=spawn_timeout)
        self._ids = itertools.count(1)
        # Stop the zygote when the driver is dropped, or at interpreter exit.
        weakref.finalize(self, self._zygote.close)

    @property
    def zygote_pid(self) -> int | None:
        """Pid of the running zygote (our child), None before the first spawn or after close."""
        return self._zygote.pid

    def start(self) -> None:
        """Start the zygote now (it starts on first spawn anyway): ~20 ms, off this thread."""
        self._zygote.start()

    def close(self) -> None:
        """Stop the zygote and reap it; idempotent. A later spawn starts a new one."""
        self._zygote.close()

    def __enter__(self) -> ForkingHolderDriver:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    # ---------------------------------------------------------------- spawn

    def spawn(self, spec: HolderSpec) -> ProcessRef:
        """Start the holder (the zygote's child, not ours) and return its identity."""
        result = self.spawn_many([spec])[0]
        if isinstance(result, KernelError):
            raise result
        return result

    def spawn_many(self, specs: Sequence[HolderSpec]) -> list[ProcessRef | KernelError]:
        """Start every holder, pipelined; results in input order, a failure is its own."""
        refused: dict[int, KernelError] = {}
        sent: dict[int, int] = {}  # request id -> index in specs

        def requests() -> Iterator[_Prepared]:
            for index, spec in enumerate(specs):
                try:
                    prepared = self._prepare(spec)
                except KernelError as e:
                    refused[index] = e
                    continue
                sent[prepared[0]] = index
                yield prepared

        answers, failure = self._zygote.exchange(requests())
        by_index = {index: answers.get(request_id) for request_id, index in sent.items()}
        results: list[ProcessRef | KernelError] = []
        for index, spec in enumerate(specs):
            if index in refused:
                results.append(refused[index])
            else:
                results.append(self._outcome(spec, by_index.get(index), failure))
        return results

    def _prepare(self, spec: HolderSpec) -> _Prepared:
        """Open the fds the zygote needs and encode the request; failures start nothing."""
        unknown = spec.namespaces - KNOWN_NAMESPACES
        if unknown:
            raise KernelError(
                f"holder for env {spec.env}: unknown namespaces {sorted(unknown)}; "
                f"use a subset of {sorted(KNOWN_NAMESPACES)}"
            )
        namespaces = spec.namespaces
        fds: list[int] = []

        def open_fd(path: str, flags: int, what: str) -> None:
            try:
                fds.append(os.open(path, flags | os.O_CLOEXEC))
            except OSError as e:
                raise KernelError(
                    f"holder for env {spec.env} failed: open {what}{path}: {_errno_name(e)}"
                ) from e

        try:
            if "net" in namespaces:
                open_fd(spec.netns_path, os.O_RDONLY, "netns ")
            for path in spec.cgroup_procs:
                open_fd(path, os.O_WRONLY, "cgroup ")
            request = zygote.Request(
                request_id=next(self._ids),
                unshare_flags=zygote.unshare_flags(namespaces),
                catatonit=self.catatonit,
                hostname=spec.hostname if "uts" in namespaces else None,
                netns_path=spec.netns_path if "net" in namespaces else None,
                cgroup_procs=tuple(spec.cgroup_procs),
            )
            return request.request_id, zygote.encode_request(request), fds
        except zygote.ProtocolError as e:
            _close_all(fds)
            raise KernelError(f"holder for env {spec.env} failed: {e}") from e
        except BaseException:
            _close_all(fds)
            raise

    def _outcome(
        self, spec: HolderSpec, answer: zygote.Answer | None, failure: str | None
    ) -> ProcessRef | KernelError:
        prefix = f"holder for env {spec.env} failed"
        if answer is None:
            return KernelError(f"{prefix}: {failure or 'the holder zygote did not answer'}")
        if answer.error is not None:
            return KernelError(f"{prefix}: {answer.error}")
        ref = _identify(answer.pid)
        if not self.alive(ref):
            return KernelError(
                f"{prefix}: catatonit (pid {ref.pid}) exited as soon as it started; check dmesg"
            )
        return ref

    # ---------------------------------------------------------------- inspect / stop

    def alive(self, ref: ProcessRef) -> bool:
        """True if `ref.pid` is running and still has `ref.start_time` (zombies are dead)."""
        return process_alive(ref.pid, ref.start_time)

    def stop(self, ref: ProcessRef, *, timeout: float = 5.0) -> None:
        """SIGKILL the holder, if `ref` still is it, and wait until it has exited."""
        error = self.stop_many([ref], timeout=timeout)[0]
        if error is not None:
            raise error

    def stop_many(
        self, refs: Sequence[ProcessRef], *, timeout: float = 5.0
    ) -> list[KernelError | None]:
        """SIGKILL every holder that `refs` still names, then wait for all with one deadline.

        As pid 1 of its pid namespace, a holder's death makes the kernel kill every process
        in that namespace; it has exited only once they are all gone. It is not our child
        (the zygote, or init, reaps it): an exited zombie counts as gone, and so does a
        ref whose pid now has another start time (never signalled). Per ref: None when
        gone, else the KernelError.
        """
        deadline = time.monotonic() + max(timeout, 0.0)
        results: list[KernelError | None] = [None] * len(refs)
        for first in range(0, len(refs), _STOP_CHUNK):
            killed: dict[int, int] = {}  # pidfd -> index
            try:
                for index in range(first, min(first + _STOP_CHUNK, len(refs))):
                    try:
                        pidfd = _kill_verified(refs[index])
                    except KernelError as e:
                        results[index] = e
                        continue
                    if pidfd is not None:
                        killed[pidfd] = index
                _wait_all_readable(killed, deadline)
                for index in killed.values():
                    results[index] = KernelError(
                        f"holder pid {refs[index].pid} did not exit within {timeout:g}s of "
                        "SIGKILL; a process in its pid namespace may be stuck in the kernel "
                        "(state D)"
                    )
            finally:
                _close_all(killed)
        return results

    def find(self, spec: HolderSpec) -> ProcessRef | None:
        """The live holder of `spec`'s environment, when the inventory lost track of it.

        Proof of identity: it is a member of the env's cgroup (ours by construction), runs
        catatonit, and sits in the env's pinned netns (device and inode of the pin). The
        zygote passes through the env's cgroup while it spawns a holder; it runs python,
        so it never passes for one.
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


def _kill_verified(ref: ProcessRef) -> int | None:
    """SIGKILL `ref` if it is still that process; its pidfd, or None if it is gone."""
    try:
        # The pidfd pins one process: if it matches `ref` now, the signal below can only
        # reach that process even if the pid is reused meanwhile.
        pidfd = os.pidfd_open(ref.pid)
    except ProcessLookupError:
        return None
    except OSError as e:
        raise KernelError(
            f"cannot stop holder pid {ref.pid}: pidfd_open: {_errno_name(e)}; "
            "raise the open files limit (ulimit -n)"
        ) from e
    try:
        if process_alive(ref.pid, ref.start_time):
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            return pidfd
    except ProcessLookupError:
        pass
    os.close(pidfd)
    return None


def _wait_all_readable(fds: dict[int, int], deadline: float) -> None:
    """Remove from `fds` each fd that becomes readable (a pidfd: exited) before `deadline`."""
    poller = select.poll()
    for fd in fds:
        poller.register(fd, select.POLLIN)
    while fds:
        remaining = deadline - time.monotonic()
        events = poller.poll(max(remaining, 0.0) * 1000)
        for fd, _ in events:
            poller.unregister(fd)
            os.close(fd)
            del fds[fd]
        if not events and remaining <= 0:
            return


def _wait_readable(fd: int, timeout: float) -> bool:
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(timeout * 1000))


def _close_all(fds: Iterable[int]) -> None:
    for fd in list(fds):
        with contextlib.suppress(OSError):
            os.close(fd)


def _errno_name(e: OSError) -> str:
    return f"{errno.errorcode.get(e.errno or 0, '?')} ({e.strerror})"


def _identify(pid: int) -> ProcessRef:
    """The ProcessRef of a holder that just started (catatonit runs: /proc shows it)."""
    start_time = process_start_time(pid)
    # None: it is already gone; a ref that can never match says so (alive() is False).
    return ProcessRef(pid=pid, start_time=start_time if start_time is not None else -1)
