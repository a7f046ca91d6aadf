"""The holder zygote: one small long-lived process that starts every environment's holder.

How a holder starts: the zygote itself steps into the environment, spawns catatonit
there with posix_spawn, and steps back. posix_spawn is vfork (glibc: clone(CLONE_VM |
CLONE_VFORK)): the child borrows the zygote's memory until it execs, so no page table is
copied and no page is copied on write. Forking Python twice per env cost ~2 ms of CPU,
mostly that copying; this costs a fraction of it. A child is born into the zygote's
namespaces and cgroups, so the zygote enters them first, per request:

    write own pid to each cgroup.procs     the holder is born in the env's cgroups
    setns(env netns)                       and netns: no instant outside them
    unshare(uts|ipc|mnt|pid)               new namespaces; a new pid ns applies to the
                                           zygote's children only: the holder is its pid 1
    sethostname                            (uts is new: never the host's name)
    make / rprivate                        (mnt is new) mount events neither leak out nor in
    posix_spawn catatonit -P               setsid, every signal default, none blocked,
                                           empty environment, cwd /
    mount /proc with pidns=<holder's>      (mnt and pid are new) the env's own /proc
    setns back into its own net/uts/ipc/mnt/pid namespaces (fds opened at startup;
    setns to its own pid ns also resets the ns of its next children: no nesting),
    write own pid back to each cgroup.procs it left (read from /proc/self/cgroup)

Why the zygote mounts /proc: procfs shows the pid namespace of the process that mounts
it, and the holder execs catatonit directly (posix_spawn returns once that exec
succeeded: a clean "it runs" signal, which a wrapper such as unshare(1) would not give).
Linux 6.17+ takes the pid namespace as a mount option (`pidns=`); where the kernel
refuses it (EINVAL), the zygote falls back for good to spawning mount(8), which is born
as pid 2 of the env's pid namespace, and waits for it.

posix_spawn is called through libc, not os.posix_spawn, so that no signal at all starts
ignored (see `_Libc._spawn_attributes`).

The holder is the zygote's child. The zygote reaps exited holders at once (SIGCHLD wakes
its poll through a wakeup fd; waitpid(-1, WNOHANG)) and never signals a running one:
after a failed /proc mount it kills only the holder it just spawned and has not yet
answered for (its own unreaped child: the pid cannot have been reused). When the zygote
exits, its holders are re-parented to init. No parent-death signal anywhere.

The window: between joining and leaving, the zygote is in the env's cgroups: ~0.1 ms of
its CPU, plus the vfork's wait for the child's exec (longer on a loaded host). `find()`
ignores it (it runs python, not catatonit). A teardown of that very env in that window
(cgroup.kill) would kill the zygote: its requests fail and the next spawn starts a new
one, so an env must not be torn down while its holder is being spawned. What it
allocates in the window is charged to the env's memory cgroup, so it decodes requests
before it goes in. If it cannot step back (a setns or cgroup write failed), it answers
and exits (EXIT_STRANDED): it must not serve from inside an env. Holders already
started carry on.

Cgroups it can leave: only hierarchies it was in at startup (matched by the st_dev of
the cgroup.procs file: one superblock per hierarchy). A cgroup.procs file elsewhere is
refused before anything changes.

Fds: every fd the zygote holds is close-on-exec (Python's default, MSG_CMSG_CLOEXEC for
received ones), and its stdio is /dev/null: the holder inherits /dev/null on 0-2 and
nothing else, without file actions.

Lifetime: the driver starts it with posix_spawn, hands it one end of a SOCK_SEQPACKET
socketpair as fd 3 and names its own pid. The zygote serves until that socket reaches
end-of-file or the parent exits (a pidfd: a copy of the driver's end inherited by some
forked child must not keep an idle zygote alive).

Protocol: one datagram per message (SEQPACKET keeps the boundaries), fields separated by
NUL (paths and hostnames cannot contain one):

    request  R2 ␀ id ␀ unshare flags ␀ catatonit ␀ hostname ␀ netns path ␀ cgroup.procs ...
             with SCM_RIGHTS: the netns pin (when a netns path is given), then one open
             cgroup.procs fd per path; an empty hostname / netns path means "none"
    answer   A1 ␀ id ␀ holder pid ␀ error (empty on success)

Requests are served one at a time, in order; the driver pipelines them. The driver takes
the holder's identity (pid + start time).

This file must stay self-contained and quick to start: stdlib only, and no typing or
dataclasses at run time (their imports would add ~20 ms to the start).
"""

from __future__ import annotations

import _socket
import collections
import contextlib
import ctypes
import errno
import os
import select
import signal
import sys

TYPE_CHECKING = False
if TYPE_CHECKING:
    from _ctypes import _CDataType
    from collections.abc import Iterable, Sequence
    from typing import NamedTuple
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


# <linux/sched.h>, <sys/mount.h>: stable kernel ABI values.
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
# <spawn.h> (glibc)
_POSIX_SPAWN_SETSIGDEF = 0x04
_POSIX_SPAWN_SETSIGMASK = 0x08
_POSIX_SPAWN_SETSID = 0x80

# Namespaces the holder creates (unshare); "net" is joined (setns), never created.
UNSHARE_FLAGS = {
    "uts": CLONE_NEWUTS,
    "ipc": CLONE_NEWIPC,
    "mnt": CLONE_NEWNS,
    "pid": CLONE_NEWPID,
}
KNOWN_NAMESPACES = frozenset({"net", *UNSHARE_FLAGS})
_ALL_UNSHARE = CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWNS | CLONE_NEWPID
# /proc/self/ns/<name> of every namespace the zygote may leave; pid first on the way
# back, so that nothing it starts later can land in the env's pid namespace.
_NS_FILES = {
    CLONE_NEWPID: "pid",
    CLONE_NEWNS: "mnt",
    CLONE_NEWIPC: "ipc",
    CLONE_NEWUTS: "uts",
    CLONE_NEWNET: "net",
}

# Limits of one message: the zygote's receive buffers are this big.
MAX_MESSAGE = 65536
MAX_FDS = 64

_REQUEST_TAG = b"R2"
_ANSWER_TAG = b"A1"
_REQUEST_FIXED_FIELDS = 6
_ANSWER_FIELDS = 4
# Exit status of a zygote that received a message it cannot read (a driver bug).
EXIT_PROTOCOL = 3
# Exit status of a zygote that could not return to its own namespaces or cgroups.
EXIT_STRANDED = 4
# Zygote option: mount each env's /proc with mount(8), as on kernels without `pidns=`.
OPTION_PROC_BY_HELPER = "--mount-proc-with-helper"

_HOLDER_ARGV = (b"catatonit", b"-P")
_PROC_FLAGS = MS_NOSUID | MS_NODEV | MS_NOEXEC
_MOUNT_PROGRAMS = ("/usr/bin/mount", "/bin/mount")
_MOUNT_PROC_ARGV = (b"mount", b"-n", b"-t", b"proc", b"-o", b"nosuid,nodev,noexec")


class ProtocolError(ValueError):
    """A message that is not a well-formed request or answer."""


# --------------------------------------------------------------------------- wire format


class Request(NamedTuple):
    """One holder to start; the fds named here travel with it (SCM_RIGHTS)."""

    request_id: int
    unshare_flags: int  # CLONE_NEW* of the namespaces to create
    catatonit: str  # absolute path
    hostname: str | None  # only when uts is new: never the host's
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
    _check_request(request)
    return _join(
        _REQUEST_TAG,
        b"%d" % request.request_id,
        b"%d" % request.unshare_flags,
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
            catatonit=os.fsdecode(fields[3]),
            hostname=os.fsdecode(fields[4]) or None,
            netns_path=os.fsdecode(fields[5]) or None,
            cgroup_procs=tuple(os.fsdecode(path) for path in fields[6:]),
        )
    except ValueError as e:
        raise ProtocolError(f"malformed request: {e}") from e
    _check_request(request)
    return request


def _check_request(request: Request) -> None:
    if request.unshare_flags & ~_ALL_UNSHARE or request.unshare_flags < 0:
        raise ProtocolError(f"unshare flags {request.unshare_flags:#x} name no known namespace")
    # The zygote sets the hostname in itself: outside a new uts, that is the host's.
    if request.hostname is not None and not request.unshare_flags & CLONE_NEWUTS:
        raise ProtocolError("a hostname needs a new uts namespace")
    if request.fd_count > MAX_FDS:
        raise ProtocolError(f"{request.fd_count} fds in one request; at most {MAX_FDS}")


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


def describe_exit(status: int) -> str:
    """How the zygote ended, from its wait status, in words."""
    if os.WIFSIGNALED(status):
        return f"was killed by signal {os.WTERMSIG(status)}"
    code = os.waitstatus_to_exitcode(status)
    if code == EXIT_STRANDED:
        return "could not return to its own namespaces or cgroups after a spawn, and exited"
    return f"exited with status {code}"


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


# --------------------------------------------------------------------------- home


def parse_cgroup_homes(cgroup: str, mountinfo: str) -> list[str]:
    """The cgroup.procs file of every hierarchy that /proc/self/cgroup lists, where
    /proc/self/mountinfo shows one mounted (v1 by its controllers, v2 as cgroup2)."""
    mounts: list[tuple[str, str, str, set[str]]] = []  # fs type, root, mount point, options
    for line in mountinfo.splitlines():
        before, _, after = line.partition(" - ")
        fields, tail = before.split(), after.split()
        if len(fields) >= 5 and len(tail) >= 3 and tail[0] in ("cgroup", "cgroup2"):
            root, point = _unescape(fields[3]).rstrip("/"), _unescape(fields[4]).rstrip("/")
            mounts.append((tail[0], root, point, set(tail[2].split(","))))
    homes: list[str] = []
    for line in cgroup.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3 or not parts[2].startswith("/"):
            continue
        controllers, path = parts[1], parts[2].rstrip("/")
        fs_type = "cgroup" if controllers else "cgroup2"
        wanted = set(controllers.split(",")) if controllers else set()
        for kind, root, point, options in mounts:
            if kind == fs_type and wanted <= options and (path + "/").startswith(root + "/"):
                homes.append(f"{point}{path[len(root) :]}/cgroup.procs")
                break
    return homes


def _unescape(field: str) -> str:
    # mountinfo writes space, tab, newline and backslash as \ooo.
    head, *parts = field.split("\\")
    return head + "".join(chr(int(part[:3], 8)) + part[3:] for part in parts)


class _Home:
    """Where the zygote belongs: its own namespaces and cgroups, as open fds."""

    __slots__ = ("cgroups", "namespaces", "pid")

    def __init__(self) -> None:
        self.pid = b"%d" % os.getpid()
        self.namespaces = {
            flag: os.open(f"/proc/self/ns/{name}", os.O_RDONLY) for flag, name in _NS_FILES.items()
        }
        with open("/proc/self/cgroup", encoding="utf-8", errors="surrogateescape") as f:
            cgroup = f.read()
        with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
            mountinfo = f.read()
        self.cgroups: dict[int, int] = {}  # st_dev of a hierarchy -> own cgroup.procs there
        for path in parse_cgroup_homes(cgroup, mountinfo):
            try:
                fd = os.open(path, os.O_WRONLY)
            except OSError:
                continue  # a hierarchy we cannot return to: requests that need it are refused
            dev = os.fstat(fd).st_dev
            if dev in self.cgroups:
                os.close(fd)
            else:
                self.cgroups[dev] = fd


# --------------------------------------------------------------------------- spawning


def _bind(libc: ctypes.CDLL, name: str, *argtypes: type[_CDataType]) -> ctypes._NamedFuncPointer:
    """libc's `name`, taking `argtypes` and returning an int (0 or an error)."""
    function = libc[name]
    function.argtypes = argtypes
    function.restype = ctypes.c_int
    return function


class _Libc:
    """The libc calls that Python 3.11's `os` lacks."""

    def __init__(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        c_int, c_char_p = ctypes.c_int, ctypes.c_char_p
        self.setns = _bind(libc, "setns", c_int, c_int)
        self.unshare = _bind(libc, "unshare", c_int)
        self.sethostname = _bind(libc, "sethostname", c_char_p, ctypes.c_size_t)
        self.mount = _bind(libc, "mount", c_char_p, c_char_p, c_char_p, ctypes.c_ulong, c_char_p)
        argv = ctypes.POINTER(c_char_p)
        self.posix_spawn = _bind(
            libc,
            "posix_spawn",
            ctypes.POINTER(c_int),
            c_char_p,
            ctypes.c_void_p,
            ctypes.c_void_p,
            argv,
            argv,
        )
        self.attr = self._spawn_attributes(libc)

    @staticmethod
    def _spawn_attributes(libc: ctypes.CDLL) -> ctypes.Array[ctypes.c_char]:
        """posix_spawn attributes: own session, no signal blocked, every signal default.

        Through libc rather than os.posix_spawn: glibc (2.36) sets its two internal
        signals (32, 33) to "ignore" in the child unless they are in the default set, and
        sigaddset, hence os.posix_spawn, refuses to name them; the raw set can.
        """
        # posix_spawnattr_t is 336 bytes on x86-64 glibc: room to spare, it is opaque.
        attr = ctypes.create_string_buffer(1024)
        every = (ctypes.c_ulong * 16)()  # sigset_t: bit n-1 is signal n
        every[0] = (1 << 64) - 1 & ~(1 << (signal.SIGKILL - 1) | 1 << (signal.SIGSTOP - 1))
        none = (ctypes.c_ulong * 16)()
        flags = _POSIX_SPAWN_SETSIGDEF | _POSIX_SPAWN_SETSIGMASK | _POSIX_SPAWN_SETSID
        for result in (
            libc.posix_spawnattr_init(attr),
            libc.posix_spawnattr_setsigdefault(attr, every),
            libc.posix_spawnattr_setsigmask(attr, none),
            libc.posix_spawnattr_setflags(attr, ctypes.c_short(flags)),
        ):
            if result != 0:
                raise OSError(result, f"posix_spawnattr: {os.strerror(result)}")
        return attr


class _Failed(Exception):
    """A request failed; the message is the answer's error."""


class _Stranded(Exception):
    """The zygote could not return home (`trouble`); `answer` is the request's, still due."""

    def __init__(self, trouble: str, answer: Answer) -> None:
        super().__init__(trouble)
        self.answer = answer


class _Away:
    """What the zygote changed in itself for one request, to be undone."""

    __slots__ = ("cgroups", "namespaces")

    def __init__(self) -> None:
        self.namespaces = 0  # CLONE_NEW* flags
        self.cgroups: list[int] = []  # home cgroup.procs fds of the hierarchies left


def _errno_text(err: int) -> str:
    return f"{errno.errorcode.get(err, str(err))} ({os.strerror(err)})"


def _check(result: int, what: str) -> None:
    if result != 0:
        raise _Failed(f"{what}: {_errno_text(ctypes.get_errno())}")


class Spawner:
    """Starts holders from inside the zygote (see the module docstring): one at a time."""

    def __init__(self, *, proc_by_helper: bool = False) -> None:
        self.libc = _Libc()
        self.home = _Home()
        self.proc_by_helper = proc_by_helper
        self._argvs: dict[tuple[bytes, ...], ctypes.Array[ctypes.c_char_p]] = {}
        self._envp = (ctypes.c_char_p * 1)(None)

    def spawn(self, request: Request, fds: Sequence[int]) -> Answer:
        """Start the request's holder; the answer. _Stranded if it could not return home."""
        away = _Away()
        try:
            answer = Answer(request.request_id, self._spawn(request, fds, away), None)
        except _Failed as e:
            answer = Answer(request.request_id, 0, str(e))
        finally:
            trouble = self._return_home(away)
        if trouble is not None:
            raise _Stranded(trouble, answer)
        return answer

    def _spawn(self, request: Request, fds: Sequence[int], away: _Away) -> int:
        libc = self.libc
        cgroup_fds = fds[1:] if request.netns_path is not None else fds
        # What can be refused is checked before the zygote changes anything.
        homes = [
            self._home_of(fd, path)
            for fd, path in zip(cgroup_fds, request.cgroup_procs, strict=True)
        ]
        # Cgroups first, then the netns (and back in the other order): at no instant is
        # the zygote inside an env's netns but outside its cgroup, which the policy loop
        # would rightly take for a process escaping the env.
        for fd, path, home in zip(cgroup_fds, request.cgroup_procs, homes, strict=True):
            away.cgroups.append(home)
            try:
                os.write(fd, self.home.pid)
            except OSError as e:
                raise _Failed(f"join cgroup {path}: {_errno_text(e.errno or 0)}") from e
        if request.netns_path is not None:
            away.namespaces |= CLONE_NEWNET
            _check(libc.setns(fds[0], CLONE_NEWNET), f"setns {request.netns_path}")
        flags = request.unshare_flags
        if flags:
            away.namespaces |= flags
            _check(libc.unshare(flags), "unshare")
        if request.hostname is not None:
            name = os.fsencode(request.hostname)
            _check(libc.sethostname(name, len(name)), "sethostname")
        if flags & CLONE_NEWNS:
            # Mount events must neither leak out to the host nor in from it.
            _check(libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None), "make / private")
        holder = self._exec(request.catatonit, _HOLDER_ARGV)
        if flags & CLONE_NEWNS and flags & CLONE_NEWPID:
            try:
                self._mount_proc(holder)
            except BaseException:
                # Our own child, not yet reaped and not yet reported: certainly the holder.
                os.kill(holder, signal.SIGKILL)
                os.waitpid(holder, 0)
                raise
        return holder

    def _home_of(self, fd: int, path: str) -> int:
        home = self.home.cgroups.get(os.fstat(fd).st_dev)
        if home is None or not path.endswith("/cgroup.procs"):
            raise _Failed(
                f"join cgroup {path}: not a cgroup.procs file of a hierarchy the holder zygote "
                "is in (it could not leave that cgroup again); pass cgroup.procs files of "
                "mounted cgroup hierarchies"
            )
        return home

    def _exec(self, program: str, argv: tuple[bytes, ...]) -> int:
        """posix_spawn `program`: its own session, default signals, empty environment.

        It returns once the child has exec'd (vfork); a failed exec is its errno.
        """
        array = self._argvs.get(argv)
        if array is None:
            array = self._argvs[argv] = (ctypes.c_char_p * (len(argv) + 1))(*argv, None)
        pid = ctypes.c_int()
        path = os.fsencode(program)
        err = self.libc.posix_spawn(
            ctypes.byref(pid), path, None, self.libc.attr, array, self._envp
        )
        if err != 0:
            raise _Failed(f"exec {program}: {_errno_text(err)}")
        return pid.value

    def _mount_proc(self, holder: int) -> None:
        """Mount the env's /proc over the host's, in the env's mount namespace (ours now)."""
        if not self.proc_by_helper:
            data = b"pidns=/proc/%d/ns/pid" % holder
            if self.libc.mount(b"proc", b"/proc", b"proc", _PROC_FLAGS, data) == 0:
                return
            err = ctypes.get_errno()
            if err != errno.EINVAL:
                raise _Failed(f"mount /proc: {_errno_text(err)}")
            # No `pidns=` (Linux < 6.17): from now on, a helper in the env mounts it.
            self.proc_by_helper = True
        program = next((p for p in _MOUNT_PROGRAMS if os.access(p, os.X_OK)), None)
        if program is None:
            raise _Failed("mount /proc: mount(8) not found; apt-get install mount")
        # Born as pid 2 of the env's pid namespace: the /proc it mounts is the env's.
        helper = self._exec(program, (*_MOUNT_PROC_ARGV, b"proc", b"/proc"))
        _, status = os.waitpid(helper, 0)
        if status != 0:
            raise _Failed(f"mount /proc with {program}: {_exit_text(status)}")

    def _return_home(self, away: _Away) -> str | None:
        """Step back into the zygote's own namespaces and cgroups; what failed, if anything."""
        trouble: list[str] = []
        for flag, name in _NS_FILES.items():
            if away.namespaces & flag and self.libc.setns(self.home.namespaces[flag], flag):
                trouble.append(f"setns back to own {name}: {_errno_text(ctypes.get_errno())}")
        for fd in away.cgroups:
            try:
                os.write(fd, self.home.pid)
            except OSError as e:
                trouble.append(f"return to own cgroup: {_errno_text(e.errno or 0)}")
        return "; ".join(trouble) or None


def _exit_text(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by signal {os.WTERMSIG(status)}"
    return f"exited with status {os.waitstatus_to_exitcode(status)}"


# --------------------------------------------------------------------------- the server


class _PeerGone(Exception):
    """The driver closed its end or its process exited: time to go."""


class Zygote:
    """The server loop: receive requests, spawn holders, answer, reap; single-threaded."""

    def __init__(
        self, *, sock: _socket.socket, parent_pidfd: int, wakeup_fd: int, spawner: Spawner
    ) -> None:
        self.sock = sock
        self.parent_pidfd = parent_pidfd
        self.wakeup_fd = wakeup_fd  # SIGCHLD arrived: a holder exited
        self.spawner = spawner

    def serve(self) -> int:
        """Run until the driver is gone; the exit status."""
        poller = select.poll()
        for fd in (self.sock.fileno(), self.parent_pidfd, self.wakeup_fd):
            poller.register(fd, select.POLLIN)
        try:
            while True:
                for fd, events in poller.poll():
                    self._dispatch(fd, events)
        except _PeerGone:
            return 0
        except ProtocolError:
            return EXIT_PROTOCOL
        except _Stranded:
            return EXIT_STRANDED

    def _dispatch(self, fd: int, events: int) -> None:
        if fd == self.parent_pidfd:
            raise _PeerGone
        if fd == self.wakeup_fd:
            self._reap()
        elif fd == self.sock.fileno():
            if events & (select.POLLHUP | select.POLLERR):
                raise _PeerGone
            self._receive()

    def _reap(self) -> None:
        """Reap every exited child: holders are ours, but their exits are init's business."""
        with contextlib.suppress(BlockingIOError):
            while os.read(self.wakeup_fd, 4096):
                pass
        while True:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return

    def _receive(self) -> None:
        """Serve every request waiting now, in order."""
        flags = _socket.MSG_DONTWAIT | _socket.MSG_CMSG_CLOEXEC
        anc_space = _socket.CMSG_SPACE(MAX_FDS * 4)
        while True:
            try:
                data, ancdata, msg_flags, _ = self.sock.recvmsg(MAX_MESSAGE, anc_space, flags)
            except BlockingIOError:
                return
            except OSError as e:
                raise _PeerGone from e
            fds = _received_fds(ancdata)
            try:
                if not data:
                    raise _PeerGone
                request = decode_request(data)
                if msg_flags & (_socket.MSG_CTRUNC | _socket.MSG_TRUNC) or (
                    len(fds) != request.fd_count
                ):
                    error = "the zygote received a truncated request"
                    self._send(Answer(request.request_id, 0, error))
                    continue
                try:
                    answer = self.spawner.spawn(request, fds)
                except _Stranded as e:
                    # The holder runs (or the request failed); say so, then go.
                    self._send(e.answer)
                    raise
                self._send(answer)
            finally:
                _close_all(fds)

    def _send(self, answer: Answer) -> None:
        try:
            self.sock.send(encode_answer(answer), _socket.MSG_NOSIGNAL)
        except OSError as e:
            raise _PeerGone from e


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


def _on_sigchld(signum: int, frame: object) -> None:
    """Nothing: the wakeup fd carries the news to the poll loop."""


def main(argv: Sequence[str]) -> int:
    """Serve one driver. argv: [program, socket fd, the driver's pid, options...]."""
    sock_fd, parent_pid = int(argv[1]), int(argv[2])
    options = set(argv[3:])
    if options - {OPTION_PROC_BY_HELPER}:
        return EXIT_PROTOCOL
    # Our own dispositions: a closed peer must not kill us (we use MSG_NOSIGNAL anyway),
    # and the holders get the defaults through posix_spawn (setsigdef) whatever we set.
    for number in (signal.SIGPIPE, signal.SIGXFSZ):
        signal.signal(number, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, ())
    # Whatever else the controller let us inherit (a pipe someone reads to its end) is
    # not ours to keep open for the controller's lifetime, nor the holders' to inherit.
    os.closerange(3, sock_fd)
    os.closerange(sock_fd + 1, os.sysconf("SC_OPEN_MAX"))
    _stdio_to_devnull()
    # Holders inherit the cwd: "/" pins no directory of the controller's.
    os.chdir("/")
    os.set_inheritable(sock_fd, False)
    parent_pidfd = os.pidfd_open(parent_pid)
    if os.getppid() != parent_pid:
        return 0  # the driver is already gone (we were re-parented before the pidfd)
    wakeup_read, wakeup_write = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
    signal.set_wakeup_fd(wakeup_write, warn_on_full_buffer=False)
    signal.signal(signal.SIGCHLD, _on_sigchld)
    spawner = Spawner(proc_by_helper=OPTION_PROC_BY_HELPER in options)
    sock = _socket.socket(fileno=sock_fd)
    return Zygote(
        sock=sock, parent_pidfd=parent_pidfd, wakeup_fd=wakeup_read, spawner=spawner
    ).serve()


if __name__ == "__main__":
    sys.exit(main(sys.argv))
