"""The holder zygote: one small long-lived process that forks every environment's holder.

Why a zygote: a holder (reconciler.kernel.holder) is built by a double fork. Forking the
controller costs ~3 ms per fork here (the kernel copies the page tables of its ~56 MB),
twice per env. This file, run as `python -I -S` (stdlib only, no project, no venv), holds
a few MB, so its forks cost a tenth of that; and it is single-threaded, so its children
may run any Python between fork and exec (no lock that another thread held is copied).

Lifetime: the driver starts it with posix_spawn (vfork: cheap even from the big
controller), hands it one end of a SOCK_SEQPACKET socketpair as fd 3 and names its own
pid. The zygote serves until that socket reaches end-of-file (the driver closed it, or
every holder of the driver's end died) or the parent exits (a pidfd: a copy of the
driver's end inherited by some forked child must not keep an idle zygote alive). It
never keeps a holder as its child: the chain forks the holder from an intermediate
child that exits at once, so the holder is re-parented, as before.

Protocol: one datagram per message (SEQPACKET keeps the boundaries), fields separated by
NUL (paths and hostnames cannot contain one):

    request  R1 ␀ id ␀ unshare flags ␀ private mounts ␀ mount proc ␀ timeout ␀ catatonit
                ␀ hostname ␀ netns path ␀ cgroup.procs path ...
             with SCM_RIGHTS: the netns pin (when a netns path is given), then one open
             cgroup.procs fd per path; an empty hostname / netns path means "none"
    answer   A1 ␀ id ␀ holder pid ␀ error (empty on success)

Many requests may be outstanding; answers come in completion order, matched by id. The
zygote enforces each request's timeout itself: it kills that request's intermediate
child (its own, not yet reaped: the pid cannot have been reused) and, when the chain has
already reported the holder, the holder through a pidfd. That pid is certainly still
the holder's: it holds the report pipe's write end (no end-of-file yet), so it has not
exited. Nothing else. The driver takes the holder's identity (pid + start time).

The chain, per request:

    zygote ─fork─▶ child: die with the zygote, setsid, setns(net), join cgroups,
                          unshare(uts|ipc|mnt|pid), sethostname
                          ─fork─▶ holder (pid 1 of the new pid ns): make / rprivate,
                                  mount /proc, close fds, exec catatonit -P
                          child: report `P<pid>`, exit

One O_CLOEXEC pipe per chain carries `P<pid>` or the first failure `E<what>` back; it
reaches end-of-file once catatonit's exec succeeded or the chain died.

Cost: each page a forked child (or the zygote, after a fork) writes is copied
(copy-on-write), and Python writes wherever it goes (reference counts). So the children
do as little as possible: no /proc parsing (the driver reads the start time), signal
dispositions are set once in the zygote, and the zygote decodes a burst of requests
before it forks them one after another.

This file must stay self-contained and quick to start: stdlib only, and no typing or
dataclasses at run time (their imports would add ~20 ms to the start).
"""

from __future__ import annotations

import _socket
import collections
import contextlib
import ctypes
import errno
import gc
import os
import select
import signal
import sys
import time

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable, Sequence
    from typing import NamedTuple, NoReturn
else:

    class _NamedTupleMeta(type):
        """`class X(NamedTuple)` without importing typing (~5 ms of the zygote's start).

        It is what typing.NamedTuple's class syntax makes: a collections.namedtuple of the
        annotated fields, plus the methods and properties of the class body.
        """

        def __new__(mcs, name, bases, namespace):
            if not bases:
                return super().__new__(mcs, name, bases, namespace)
            fields = list(namespace.get("__annotations__", {}))
            cls = collections.namedtuple(name, fields, module=namespace.get("__module__"))
            for key, value in namespace.items():
                if key in fields:
                    raise TypeError(f"{name}.{key}: field defaults are not supported")
                if key != "__annotations__":
                    setattr(cls, key, value)
            return cls

    class NamedTuple(metaclass=_NamedTupleMeta):
        """Base class: each subclass becomes a collections.namedtuple."""


# <linux/sched.h>, <sys/mount.h>, <linux/prctl.h>: stable kernel ABI values.
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
_PR_SET_PDEATHSIG = 1

# Namespaces the holder creates (unshare); "net" is joined (setns), never created.
UNSHARE_FLAGS = {
    "uts": CLONE_NEWUTS,
    "ipc": CLONE_NEWIPC,
    "mnt": CLONE_NEWNS,
    "pid": CLONE_NEWPID,
}
KNOWN_NAMESPACES = frozenset({"net", *UNSHARE_FLAGS})

# Limits of one message: the zygote's receive buffers are this big.
MAX_MESSAGE = 65536
MAX_FDS = 64
# Chains in flight at once; further requests wait in the socket (bounded fds, and two
# CPUs gain nothing from hundreds of concurrent forks).
MAX_IN_FLIGHT = 64

_REQUEST_TAG = b"R1"
_ANSWER_TAG = b"A1"
_REQUEST_FIXED_FIELDS = 9
_ANSWER_FIELDS = 4
# Exit status of a chain process that failed before exec ("cannot execute").
_EXIT_FAILED = 127
# Exit status of a zygote that received a message it cannot read (a driver bug).
EXIT_PROTOCOL = 3


class ProtocolError(ValueError):
    """A message that is not a well-formed request or answer."""


# --------------------------------------------------------------------------- wire format


class Request(NamedTuple):
    """One holder to build; the fds named here travel with it (SCM_RIGHTS)."""

    request_id: int
    unshare_flags: int  # CLONE_NEW* of the namespaces to create
    private_mounts: bool  # mnt is new: make / recursively private
    mount_proc: bool  # mnt and pid are new: a /proc of the new pid namespace
    timeout: float  # seconds until the chain is killed
    catatonit: str  # absolute path
    hostname: str | None  # set only when uts is new: never the host's
    netns_path: str | None  # with it, the first fd is the pin to setns into
    cgroup_procs: tuple[str, ...]  # one open fd each, after the netns pin

    @property
    def fd_count(self) -> int:
        """How many fds must accompany the request."""
        return (self.netns_path is not None) + len(self.cgroup_procs)


class Answer(NamedTuple):
    """How one request ended: the holder's pid, or why there is none."""

    request_id: int
    pid: int  # 0 on failure
    error: str | None  # None on success


def unshare_flags(namespaces: Iterable[str]) -> int:
    """CLONE_NEW* flags of the namespaces the holder creates (all but net)."""
    flags = 0
    for name in namespaces:
        flags |= UNSHARE_FLAGS.get(name, 0)
    return flags


def encode_request(request: Request) -> bytes:
    """The request's datagram (its fds are sent alongside)."""
    if request.hostname == "" or request.netns_path == "":
        raise ProtocolError("an empty hostname or netns path is spelled None")
    if request.fd_count > MAX_FDS:
        raise ProtocolError(f"{request.fd_count} fds in one request; at most {MAX_FDS}")
    return _join(
        _REQUEST_TAG,
        b"%d" % request.request_id,
        b"%d" % request.unshare_flags,
        b"%d" % request.private_mounts,
        b"%d" % request.mount_proc,
        repr(float(request.timeout)).encode(),
        os.fsencode(request.catatonit),
        os.fsencode(request.hostname or ""),
        os.fsencode(request.netns_path or ""),
        *(os.fsencode(path) for path in request.cgroup_procs),
    )


def decode_request(data: bytes) -> Request:
    """The request in a datagram; ProtocolError if it is not one."""
    fields = _split(data, tag=_REQUEST_TAG, at_least=_REQUEST_FIXED_FIELDS)
    try:
        request = Request(
            request_id=int(fields[1]),
            unshare_flags=int(fields[2]),
            private_mounts=_flag(fields[3]),
            mount_proc=_flag(fields[4]),
            timeout=float(fields[5]),
            catatonit=os.fsdecode(fields[6]),
            hostname=os.fsdecode(fields[7]) or None,
            netns_path=os.fsdecode(fields[8]) or None,
            cgroup_procs=tuple(os.fsdecode(path) for path in fields[9:]),
        )
    except ValueError as e:
        raise ProtocolError(f"malformed request: {e}") from e
    if request.fd_count > MAX_FDS:
        raise ProtocolError(f"{request.fd_count} fds in one request; at most {MAX_FDS}")
    return request


def encode_answer(answer: Answer) -> bytes:
    """The answer's datagram."""
    if (answer.error is None) != (answer.pid > 0):
        raise ProtocolError("an answer has either a holder pid or an error")
    return _join(
        _ANSWER_TAG,
        b"%d" % answer.request_id,
        b"%d" % answer.pid,
        (answer.error or "").encode(errors="replace"),
    )


def decode_answer(data: bytes) -> Answer:
    """The answer in a datagram; ProtocolError if it is not one."""
    fields = _split(data, tag=_ANSWER_TAG, at_least=_ANSWER_FIELDS)
    if len(fields) != _ANSWER_FIELDS:
        raise ProtocolError(f"an answer has {_ANSWER_FIELDS} fields, not {len(fields)}")
    try:
        answer = Answer(
            request_id=int(fields[1]),
            pid=int(fields[2]),
            error=fields[3].decode(errors="replace") or None,
        )
    except ValueError as e:
        raise ProtocolError(f"malformed answer: {e}") from e
    if (answer.error is None) != (answer.pid > 0):
        raise ProtocolError("an answer has either a holder pid or an error")
    return answer


def _join(*fields: bytes) -> bytes:
    if any(b"\0" in field for field in fields):
        raise ProtocolError("a field contains NUL")
    data = b"\0".join(fields)
    if len(data) > MAX_MESSAGE:
        raise ProtocolError(f"a message of {len(data)} bytes; at most {MAX_MESSAGE}")
    return data


def _split(data: bytes, *, tag: bytes, at_least: int) -> list[bytes]:
    fields = data.split(b"\0")
    if fields[0] != tag or len(fields) < at_least:
        raise ProtocolError(f"not a {tag.decode(errors='replace')} message: {data[:40]!r}")
    return fields


def _flag(field: bytes) -> bool:
    if field not in (b"0", b"1"):
        raise ValueError(f"flag {field!r} is not 0 or 1")
    return field == b"1"


# --------------------------------------------------------------------------- the chain


class _Libc:
    """The libc calls that Python 3.11's `os` lacks."""

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
        self.prctl = libc.prctl
        self.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong]
        self.prctl.restype = ctypes.c_int


class _ChainContext(NamedTuple):
    """What every chain shares: the zygote's own fds and libc bindings."""

    libc: _Libc
    zygote_pid: int
    private_fds: tuple[int, ...]  # the zygote's socket and parent pidfd: not the chain's


def _report(fd: int, message: str) -> None:
    # One write below PIPE_BUF is atomic; a vanished reader (EPIPE) is not our problem.
    with contextlib.suppress(OSError):
        os.write(fd, message.encode(errors="replace"))


def _errno_text(err: int) -> str:
    return f"{errno.errorcode.get(err, str(err))} ({os.strerror(err)})"


def _die(report_fd: int, what: str, err: int) -> NoReturn:
    _report(report_fd, f"E{what}: {_errno_text(err)}\n")
    os._exit(_EXIT_FAILED)


def _check(report_fd: int, result: int, what: str) -> None:
    if result != 0:
        _die(report_fd, what, ctypes.get_errno())


def _run_child(
    request: Request, *, fds: Sequence[int], report_fd: int, context: _ChainContext
) -> NoReturn:
    """First fork: enter/create the namespaces, fork pid 1, report it, exit."""
    libc = context.libc
    try:
        # A chain cut off mid-way must not finish unseen: die with the zygote.
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != context.zygote_pid:
            os._exit(_EXIT_FAILED)
        # The driver must see end-of-file as soon as the zygote dies, not when we do.
        _close_all(context.private_fds)
        # A new session: no controlling terminal, no job-control signals from the caller's.
        os.setsid()
        cgroup_fds = fds
        if request.netns_path is not None:
            _check(report_fd, libc.setns(fds[0], CLONE_NEWNET), f"setns {request.netns_path}")
            cgroup_fds = fds[1:]
        pid = b"%d" % os.getpid()
        for fd, path in zip(cgroup_fds, request.cgroup_procs, strict=True):
            try:
                os.write(fd, pid)
            except OSError as e:
                _die(report_fd, f"join cgroup {path}", e.errno or errno.EIO)
        if request.unshare_flags:
            _check(report_fd, libc.unshare(request.unshare_flags), "unshare")
        if request.hostname is not None:
            name = os.fsencode(request.hostname)
            _check(report_fd, libc.sethostname(name, len(name)), "sethostname")
        # The new pid namespace applies to our children only: this fork is its pid 1.
        holder = os.fork()
        if holder == 0:
            _run_holder(request, report_fd=report_fd, libc=libc)
        _report(report_fd, f"P{holder}\n")
        os._exit(0)
    except OSError as e:
        _die(report_fd, "holder setup", e.errno or errno.EIO)
    except BaseException as e:
        _report(report_fd, f"Eholder setup: {type(e).__name__}: {e}\n")
    finally:
        # Whatever happened, never return into the zygote's loop in a forked copy.
        os._exit(_EXIT_FAILED)


def _run_holder(request: Request, *, report_fd: int, libc: _Libc) -> NoReturn:
    """Second fork (pid 1 of the env): private mounts, own /proc, clean fds, exec."""
    try:
        if request.private_mounts:
            # Mount events must neither leak out to the host nor in from it.
            _check(
                report_fd,
                libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None),
                "make / private",
            )
        if request.mount_proc:
            # So that processes in the env see their own pid namespace in /proc.
            _check(
                report_fd,
                libc.mount(b"proc", b"/proc", b"proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None),
                "mount /proc",
            )
        # Signal dispositions and mask are the zygote's, made clean once in `main`.
        # stdio is the zygote's too: /dev/null. Keep only it and the report pipe
        # (close-on-exec: it closes itself when the exec succeeds).
        os.closerange(3, report_fd)
        os.closerange(report_fd + 1, os.sysconf("SC_OPEN_MAX"))
    except OSError as e:
        _die(report_fd, "holder setup", e.errno or errno.EIO)
    except BaseException as e:
        _report(report_fd, f"Eholder setup: {type(e).__name__}: {e}\n")
        os._exit(_EXIT_FAILED)
    try:
        os.execve(request.catatonit, [b"catatonit", b"-P"], {})
    except OSError as e:
        _die(report_fd, f"exec {request.catatonit}", e.errno or errno.EIO)
    finally:
        os._exit(_EXIT_FAILED)


def describe_status(status: int) -> str:
    """How a waited-for intermediate process ended, in words."""
    if os.WIFSIGNALED(status):
        return f"intermediate process killed by signal {os.WTERMSIG(status)}"
    return f"intermediate process exited with status {os.waitstatus_to_exitcode(status)}"


def parse_reports(output: bytes) -> tuple[str | None, int | None]:
    """The first failure (`E<what>`) and the holder's pid (`P<pid>`) a chain reported."""
    failure: str | None = None
    holder: int | None = None
    for line in output.decode(errors="replace").splitlines():
        if line.startswith("E") and failure is None:
            failure = line[1:]
        elif line.startswith("P") and holder is None:
            holder = int(line[1:])
    return failure, holder


def chain_answer(request: Request, *, output: bytes, status: int | None) -> Answer:
    """How a chain ended, from its reports and its exit status (None: killed on timeout).

    A failure wins over a reported holder: the holder may have failed after the report.
    """
    failure, holder = parse_reports(output)
    if status is None:
        failure = (
            f"catatonit did not start within {request.timeout:g}s; check the host's load and dmesg"
        )
    elif failure is None and holder is None:
        failure = (
            f"the fork chain ended without a running holder ({describe_status(status)}); "
            "check dmesg"
        )
    if failure is not None or holder is None:
        return Answer(request.request_id, 0, failure)
    return Answer(request.request_id, holder, None)


# --------------------------------------------------------------------------- the server


class _Chain:
    """One request in flight: the intermediate child and its report pipe."""

    __slots__ = ("deadline", "output", "pid", "read_fd", "request")

    def __init__(self, *, request: Request, pid: int, read_fd: int, deadline: float) -> None:
        self.request = request
        self.pid = pid
        self.read_fd = read_fd
        self.deadline = deadline
        self.output = b""

    def answer(self, status: int | None) -> Answer:
        """The answer, from the reports and the exit status (None: killed on timeout)."""
        return chain_answer(self.request, output=self.output, status=status)


class _PeerGone(Exception):
    """The driver closed its end or its process exited: time to go."""


class Zygote:
    """The server loop: receive requests, run chains, answer; single-threaded."""

    def __init__(self, *, sock: _socket.socket, parent_pidfd: int, context: _ChainContext) -> None:
        self.sock = sock
        self.parent_pidfd = parent_pidfd
        self.context = context
        self.chains: dict[int, _Chain] = {}  # by report pipe fd
        self.killed: dict[int, int] = {}  # pidfd -> pid of a timed-out intermediate to reap
        self.poller = select.poll()
        self.accepting = True

    def serve(self) -> int:
        """Run until the driver is gone; the exit status."""
        self.poller.register(self.sock.fileno(), select.POLLIN)
        self.poller.register(self.parent_pidfd, select.POLLIN)
        try:
            while True:
                self._accept_if_room()
                for fd, events in self.poller.poll(self._poll_timeout()):
                    self._dispatch(fd, events)
                self._expire()
        except _PeerGone:
            return self._shutdown()
        except ProtocolError:
            self._shutdown()
            return EXIT_PROTOCOL

    def _dispatch(self, fd: int, events: int) -> None:
        if fd == self.parent_pidfd:
            raise _PeerGone
        if fd == self.sock.fileno():
            if events & (select.POLLHUP | select.POLLERR):
                raise _PeerGone
            self._receive()
        elif fd in self.killed:
            self._reap_killed(fd)
        elif fd in self.chains:
            self._read_report(self.chains[fd])

    def _accept_if_room(self) -> None:
        # At capacity, requests wait in the socket (the driver sees POLLOUT later).
        room = len(self.chains) < MAX_IN_FLIGHT
        if room != self.accepting:
            self.accepting = room
            self.poller.modify(self.sock.fileno(), select.POLLIN if room else 0)

    def _poll_timeout(self) -> int | None:
        if not self.chains:
            # Idle, no child shares our pages: collect what the burst left (gc is off).
            gc.collect()
            return None
        nearest = min(chain.deadline for chain in self.chains.values())
        return max(0, int((nearest - time.monotonic()) * 1000) + 1)

    def _receive(self) -> None:
        """Take the waiting requests (up to the room left), then start their chains.

        Decoding all of them before the first fork keeps the zygote's own writes between
        two forks few: each of its pages written after a fork is copied (copy-on-write).
        """
        flags = _socket.MSG_DONTWAIT | _socket.MSG_CMSG_CLOEXEC
        anc_space = _socket.CMSG_SPACE(MAX_FDS * 4)
        burst: list[tuple[Request, list[int]]] = []
        try:
            while len(self.chains) + len(burst) < MAX_IN_FLIGHT:
                try:
                    data, ancdata, msg_flags, _ = self.sock.recvmsg(MAX_MESSAGE, anc_space, flags)
                except BlockingIOError:
                    break
                except OSError as e:
                    raise _PeerGone from e
                fds = _received_fds(ancdata)
                if not data:
                    _close_all(fds)
                    raise _PeerGone
                try:
                    request = decode_request(data)
                except ProtocolError:
                    _close_all(fds)
                    raise
                if msg_flags & (_socket.MSG_CTRUNC | _socket.MSG_TRUNC) or (
                    len(fds) != request.fd_count
                ):
                    _close_all(fds)
                    error = "the zygote received a truncated request"
                    self._send(Answer(request.request_id, 0, error))
                    continue
                burst.append((request, fds))
        except BaseException:
            for _, fds in burst:
                _close_all(fds)  # nobody would hear of these holders: start none
            raise
        for request, fds in burst:
            self._start(request, fds)

    def _start(self, request: Request, fds: list[int]) -> None:
        try:
            try:
                read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
            except OSError as e:
                self._send(Answer(request.request_id, 0, f"pipe: {_errno_text(e.errno or 0)}"))
                return
            try:
                pid = os.fork()
            except OSError as e:
                _close_all([read_fd, write_fd])
                self._send(Answer(request.request_id, 0, f"fork: {_errno_text(e.errno or 0)}"))
                return
            if pid == 0:
                _run_child(request, fds=fds, report_fd=write_fd, context=self.context)
            # Only the chain may keep the write end: end-of-file must mean "it is done".
            os.close(write_fd)
        finally:
            _close_all(fds)
        deadline = time.monotonic() + request.timeout
        self.chains[read_fd] = _Chain(request=request, pid=pid, read_fd=read_fd, deadline=deadline)
        self.poller.register(read_fd, select.POLLIN)

    def _read_report(self, chain: _Chain) -> None:
        chunk = os.read(chain.read_fd, 4096)
        if chunk:
            chain.output += chunk
            return
        self._forget(chain)
        # End-of-file: the intermediate closed its end, i.e. it is exiting: this wait is short.
        _, status = os.waitpid(chain.pid, 0)
        self._send(chain.answer(status))

    def _expire(self) -> None:
        now = time.monotonic()
        for chain in [c for c in self.chains.values() if c.deadline <= now]:
            _, holder = parse_reports(chain.output)
            if holder is not None:
                self._kill_holder(holder, chain)
            self._forget(chain)
            # Our own child, not yet reaped: the pid cannot belong to anyone else.
            os.kill(chain.pid, signal.SIGKILL)
            self._reap_later(chain.pid)
            self._send(chain.answer(None))

    def _kill_holder(self, pid: int, chain: _Chain) -> None:
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            return
        try:
            # The pidfd pins one process. It is the holder's if, once it was opened, the
            # pipe was still open: the holder holds the write end until it exits, so it
            # had not exited, and its pid could not have been reused.
            if not _shows(chain.read_fd, select.POLLHUP):
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        except OSError:
            pass
        finally:
            os.close(pidfd)

    def _reap_later(self, pid: int) -> None:
        # SIGKILLed, but it may be inside an uninterruptible syscall: reap when it exits.
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            os.waitpid(pid, 0)
            return
        self.killed[pidfd] = pid
        self.poller.register(pidfd, select.POLLIN)

    def _reap_killed(self, pidfd: int) -> None:
        pid = self.killed.pop(pidfd)
        self.poller.unregister(pidfd)
        os.close(pidfd)
        os.waitpid(pid, 0)

    def _forget(self, chain: _Chain) -> None:
        del self.chains[chain.read_fd]
        self.poller.unregister(chain.read_fd)
        os.close(chain.read_fd)

    def _send(self, answer: Answer) -> None:
        try:
            self.sock.send(encode_answer(answer), _socket.MSG_NOSIGNAL)
        except OSError as e:
            raise _PeerGone from e

    def _shutdown(self) -> int:
        # Nobody will read the answers: stop the chains in flight (our own children; they
        # would also die with us, by their parent-death signal) and go. Holders that were
        # already forked carry on, in their env's cgroup and netns, where `find` sees them.
        for chain in self.chains.values():
            os.kill(chain.pid, signal.SIGKILL)
        return 0


def _shows(fd: int, events: int) -> bool:
    """True if `fd` shows one of `events` now (no waiting)."""
    poller = select.poll()
    poller.register(fd, events)
    return any(revents & events for _, revents in poller.poll(0))


def _received_fds(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, payload in ancdata:
        if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS:
            usable = len(payload) - len(payload) % 4
            fds += [
                int.from_bytes(payload[i : i + 4], sys.byteorder, signed=True)
                for i in range(0, usable, 4)
            ]
    return fds


def _close_all(fds: Iterable[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


def _stdio_to_devnull() -> None:
    """Make 0-2 /dev/null: the holders inherit them, and nothing of ours may be there."""
    fd = os.open(os.devnull, os.O_RDWR)
    for target in (0, 1, 2):
        if fd != target:
            os.dup2(fd, target)
    if fd > 2:
        os.close(fd)


def main(argv: Sequence[str]) -> int:
    """Serve one driver. argv: [program, socket fd, the driver's pid]."""
    sock_fd, parent_pid = int(argv[1]), int(argv[2])
    # Every chain inherits these, down to catatonit: an ignored signal stays ignored
    # across exec, and Python ignores SIGPIPE and SIGXFSZ. SIGCHLD: our waited-for
    # children must not be reaped automatically, whatever the parent ignored.
    for number in (signal.SIGCHLD, signal.SIGPIPE, signal.SIGXFSZ):
        signal.signal(number, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, ())
    # A collection in a forked child would write to every object it visits, i.e. copy
    # their pages (copy-on-write); the zygote allocates little and frees what it makes.
    gc.disable()
    gc.freeze()
    # Whatever else the controller let us inherit (a pipe someone reads to its end) is
    # not ours to keep open for the controller's lifetime.
    os.closerange(3, sock_fd)
    os.closerange(sock_fd + 1, os.sysconf("SC_OPEN_MAX"))
    _stdio_to_devnull()
    os.set_inheritable(sock_fd, False)
    parent_pidfd = os.pidfd_open(parent_pid)
    if os.getppid() != parent_pid:
        return 0  # the driver is already gone (we were re-parented before the pidfd)
    context = _ChainContext(
        libc=_Libc(),
        zygote_pid=os.getpid(),
        private_fds=(sock_fd, parent_pidfd),
    )
    sock = _socket.socket(fileno=sock_fd)
    return Zygote(sock=sock, parent_pidfd=parent_pidfd, context=context).serve()


if __name__ == "__main__":
    sys.exit(main(sys.argv))
