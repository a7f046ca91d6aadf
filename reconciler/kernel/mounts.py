"""`spec.mounts`: private mounts inside an environment's mount namespace.

The env's holder owns a mount namespace that started as a copy of the host's, with every
mount made private (mount events travel neither in nor out). `apply_mounts` adds the
declared mounts there, so every process of the env (they all join that namespace) sees
them and the host does not:

- **tmpfs** with an optional `size` (`size=` option; resized in place with a remount).
  Pages are charged to the memory cgroup of whoever writes them: the env's processes.
- **bind** of a host path, optionally read-only. The source is resolved *on the host*
  (like `docker run -v`), even if an env mount hides that path inside: the controller
  clones it as a detached mount (`open_tree(OPEN_TREE_CLONE)`), makes the clone private
  (a clone of a shared mount would otherwise stay in the host's peer group, so mounts
  would propagate between host and env) and read-only *before* it is attached
  (`mount_setattr`), so it is never writable for an instant; the child attaches it
  (`move_mount`). Not recursive: mounts below the source are not carried along.

Changing mounts needs the env's mount namespace, and `setns(CLONE_NEWNS)` is refused to
a multi-threaded process, so the work happens in a forked child (os/ctypes calls only,
like every fork of the controller): setns, mkdir, mount, `_exit`.

A missing target is created inside the env's view. Unless an env mount covers that path,
that view *is* the host's filesystem (the mount namespace shares it): the directory (or,
for a bind of a file, the empty file) then appears on the host as well, as with
`docker run -v`. It stays after teardown.

Idempotent: `/proc/<holder>/mountinfo` says what is mounted at each target. A mount
there counts as *ours* only if the host has no identical mount (same device, root and
mount point): a copy inherited from the host, e.g. the host's own tmpfs on /tmp, is
never remounted, resized or unmounted (its superblock is the host's); ours goes on top.
Targets must be canonical paths (no symlinks): mountinfo lists resolved paths.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import select
import signal
import stat
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, NoReturn

from reconciler.errors import KernelError
from reconciler.kernel import nsutil
from reconciler.kernel.types import ProcessRef
from reconciler.state.procinfo import process_alive

# <linux/mount.h>
OPEN_TREE_CLONE = 0x1
AT_EMPTY_PATH = 0x1000
MOVE_MOUNT_F_EMPTY_PATH = 0x4
MOUNT_ATTR_RDONLY = 0x1
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_REMOUNT = 0x20
MS_PRIVATE = 1 << 18
AT_FDCWD = -100
# Syscall numbers >= 424 are the same on every architecture.
_SYS_OPEN_TREE = 428
_SYS_MOVE_MOUNT = 429
_SYS_MOUNT_SETATTR = 442
_PAGE = os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class MountSpec:
    """One declared mount (the kernel-side twin of manifests.models.Mount)."""

    type: Literal["tmpfs", "bind"]
    target: str
    source: str | None = None
    size: int | None = None  # bytes, tmpfs only; None: the kernel default (half of RAM)
    read_only: bool = False


@dataclass(frozen=True)
class MountEntry:
    """One line of /proc/PID/mountinfo."""

    device: str  # "major:minor"
    root: str  # path inside the filesystem that is mounted
    mount_point: str
    options: tuple[str, ...]  # per-mount: rw/ro, nosuid, ...
    fstype: str
    super_options: tuple[str, ...]  # per-superblock: size=65536k, ...


def _unescape(text: str) -> str:
    # mountinfo writes space, tab, newline and backslash as \ooo.
    out, i = [], 0
    while i < len(text):
        if text[i] == "\\" and text[i + 1 : i + 4].isdigit():
            out.append(chr(int(text[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def parse_mountinfo(text: str) -> list[MountEntry]:
    """Every mount listed in a mountinfo text, in order (later entries are on top)."""
    entries = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if not sep or len(fields) < 6 or len(tail) < 3:
            continue
        entries.append(
            MountEntry(
                device=fields[2],
                root=_unescape(fields[3]),
                mount_point=_unescape(fields[4]),
                options=tuple(fields[5].split(",")),
                fstype=tail[0],
                super_options=tuple(tail[2].split(",")),
            )
        )
    return entries


def top_mount(entries: Sequence[MountEntry], target: str) -> MountEntry | None:
    """The mount visible at `target` (the last one listed there), if any."""
    found = [e for e in entries if e.mount_point == target]
    return found[-1] if found else None


def tmpfs_size_option(size: int) -> str:
    """How mountinfo shows a tmpfs of `size` bytes: whole pages, in KiB ("size=65536k")."""
    pages = -(-size // _PAGE)
    return f"size={pages * _PAGE // 1024}k"


# --------------------------------------------------------------------------- syscalls


class _MountAttr(ctypes.Structure):
    _fields_ = (
        ("attr_set", ctypes.c_uint64),
        ("attr_clr", ctypes.c_uint64),
        ("propagation", ctypes.c_uint64),
        ("userns_fd", ctypes.c_uint64),
    )


_libc = nsutil.libc


def _syscall_check(result: int, what: str) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


def _open_tree_clone(path: str) -> int:
    """A detached, non-recursive copy of the mount at `path` (fd, close-on-exec)."""
    return _syscall_check(
        _libc.syscall(
            ctypes.c_long(_SYS_OPEN_TREE),
            ctypes.c_int(AT_FDCWD),
            ctypes.c_char_p(path.encode()),
            ctypes.c_uint(OPEN_TREE_CLONE | os.O_CLOEXEC),
        ),
        f"open_tree {path}",
    )


def _mount_setattr(
    fd: int, path: bytes, *, flags: int, set_: int = 0, clear: int = 0, propagation: int = 0
) -> int:
    attr = _MountAttr(attr_set=set_, attr_clr=clear, propagation=propagation, userns_fd=0)
    return int(
        _libc.syscall(
            ctypes.c_long(_SYS_MOUNT_SETATTR),
            ctypes.c_int(fd),
            ctypes.c_char_p(path),
            ctypes.c_uint(flags),
            ctypes.byref(attr),
            ctypes.c_size_t(ctypes.sizeof(attr)),
        )
    )


def _move_mount(fd: int, target: bytes) -> int:
    return int(
        _libc.syscall(
            ctypes.c_long(_SYS_MOVE_MOUNT),
            ctypes.c_int(fd),
            ctypes.c_char_p(b""),
            ctypes.c_int(AT_FDCWD),
            ctypes.c_char_p(target),
            ctypes.c_uint(MOVE_MOUNT_F_EMPTY_PATH),
        )
    )


# --------------------------------------------------------------------------- operations


@dataclass(frozen=True)
class _Op:
    """One step for the child, with the line it adds to the change list."""

    kind: Literal["tmpfs", "resize", "bind", "set-ro", "umount"]
    target: bytes
    change: str
    data: bytes | None = None  # tmpfs options
    tree_fd: int = -1  # bind: the detached clone
    directory: bool = True  # bind: create the target as a directory (else a file)
    read_only: bool = False


def _run_child(mnt_fd: int, ops: Sequence[_Op], report_fd: int) -> NoReturn:
    """Enter the env's mount namespace and perform `ops` (os/ctypes only)."""
    what = "setns mnt"
    try:
        nsutil.setns(mnt_fd, nsutil.CLONE_NEWNS)
        for op in ops:
            what = f"{op.kind} {op.target.decode(errors='replace')}"
            result = 0
            if op.kind in ("tmpfs", "bind"):
                _make_target(op)
            if op.kind == "tmpfs":
                result = _libc.mount(b"tmpfs", op.target, b"tmpfs", MS_NOSUID | MS_NODEV, op.data)
            elif op.kind == "resize":
                flags = MS_REMOUNT | MS_NOSUID | MS_NODEV
                result = _libc.mount(None, op.target, None, flags, op.data)
            elif op.kind == "bind":
                result = _move_mount(op.tree_fd, op.target)
            elif op.kind == "set-ro":
                ro = MOUNT_ATTR_RDONLY
                set_, clear = (ro, 0) if op.read_only else (0, ro)
                result = _mount_setattr(AT_FDCWD, op.target, flags=0, set_=set_, clear=clear)
            elif op.kind == "umount":
                result = _libc.umount2(op.target, nsutil.MNT_DETACH)
            if result != 0:
                raise OSError(ctypes.get_errno(), what)
        os._exit(0)
    except OSError as e:
        code = e.errno or errno.EIO
        name = errno.errorcode.get(code, str(code))
        with contextlib.suppress(OSError):
            os.write(report_fd, f"{what}: {name} ({os.strerror(code)})\n".encode())
    finally:
        os._exit(1)


def _make_target(op: _Op) -> None:
    if op.directory:
        os.makedirs(op.target, mode=0o755, exist_ok=True)
        return
    os.makedirs(os.path.dirname(op.target) or b"/", mode=0o755, exist_ok=True)
    os.close(os.open(op.target, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644))


class _Planner:
    """Compare the declared mounts with what the env and the host have mounted."""

    def __init__(self, *, holder: ProcessRef, env_mounts: str, host_mounts: str) -> None:
        self.holder = holder
        self.env = parse_mountinfo(env_mounts)
        self.host = {(e.device, e.root, e.mount_point) for e in parse_mountinfo(host_mounts)}

    def ours(self, target: str) -> MountEntry | None:
        """The top mount at `target` if the env made it (it is not a copy of the host's)."""
        top = top_mount(self.env, target)
        if top is None or (top.device, top.root, top.mount_point) in self.host:
            return None
        return top

    def tmpfs(self, spec: MountSpec, target: str) -> list[_Op]:
        size = tmpfs_size_option(spec.size) if spec.size is not None else None
        data = size.encode() if size else None
        label = f" ({size})" if size else ""
        top = self.ours(target)
        if top is not None and top.fstype == "tmpfs":
            if size is None or size in top.super_options:
                return []
            return [_Op("resize", target.encode(), f"resized tmpfs on {target}{label}", data)]
        ops = [] if top is None else [_umount(target, f"unmounted {top.fstype} from {target}")]
        return [*ops, _Op("tmpfs", target.encode(), f"mounted tmpfs on {target}{label}", data)]

    def bind(self, spec: MountSpec, target: str, source: os.stat_result) -> tuple[list[_Op], bool]:
        """Ops to converge a bind mount, and whether a new clone must be attached."""
        top = self.ours(target)
        if top is None:
            return [], True
        try:
            seen = os.stat(f"/proc/{self.holder.pid}/root{target}")
        except OSError:
            seen = None
        if seen is None or (seen.st_dev, seen.st_ino) != (source.st_dev, source.st_ino):
            return [_umount(target, f"unmounted {top.fstype} from {target}")], True
        if ("ro" in top.options) == spec.read_only:
            return [], False
        mode = "read-only" if spec.read_only else "read-write"
        return [
            _Op("set-ro", target.encode(), f"made {target} {mode}", read_only=spec.read_only)
        ], False


def _umount(target: str, change: str) -> _Op:
    return _Op("umount", target.encode(), change)


def _read(path: str) -> str:
    with open(path, encoding="utf-8", errors="replace") as f:
        return f.read()


def apply_mounts(
    *,
    env: str,
    holder: ProcessRef,
    mounts: Sequence[MountSpec],
    stale: Sequence[str] = (),
    timeout: float = 10.0,
) -> list[str]:
    """Converge the mounts of the env's mount namespace to `mounts`; return the changes.

    `stale`: targets of mounts declared before but not any more; they are unmounted if
    the env made them. Raises KernelError (one line, naming the env and the target) when
    the holder is gone, has no mount namespace of its own, or the kernel refuses.
    """
    prefix = f"mounts of env {env}"
    opened: list[int] = []
    try:
        mnt_fd = os.open(f"/proc/{holder.pid}/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
        opened.append(mnt_fd)
        env_mounts = _read(f"/proc/{holder.pid}/mountinfo")
    except OSError:
        mnt_fd, env_mounts = -1, ""
    # After opening: if the holder is still `holder`, the fd is certainly its namespace.
    if mnt_fd < 0 or not process_alive(holder.pid, holder.start_time):
        _close(opened)
        raise KernelError(
            f"{prefix}: the env's holder (pid {holder.pid}) is not running; "
            "run `reconciler apply` to recreate the environment"
        )
    try:
        if os.fstat(mnt_fd).st_ino == os.stat("/proc/self/ns/mnt").st_ino:
            raise KernelError(
                f"{prefix}: the environment has no mount namespace of its own; "
                "add mnt to spec.namespaces"
            )
        planner = _Planner(
            holder=holder, env_mounts=env_mounts, host_mounts=_read("/proc/self/mountinfo")
        )
        ops = _plan(planner, mounts=mounts, stale=stale, opened=opened, prefix=prefix)
        if ops:
            _execute(mnt_fd, ops, timeout=timeout, prefix=prefix)
        return [op.change for op in ops]
    finally:
        _close(opened)


def _plan(
    planner: _Planner,
    *,
    mounts: Sequence[MountSpec],
    stale: Sequence[str],
    opened: list[int],
    prefix: str,
) -> list[_Op]:
    wanted = {os.path.normpath(m.target) for m in mounts}
    ops: list[_Op] = []
    for target in (os.path.normpath(t) for t in stale):
        top = planner.ours(target)
        if target not in wanted and top is not None:
            ops.append(_umount(target, f"unmounted {top.fstype} from {target}"))
    for spec in mounts:
        target = os.path.normpath(spec.target)
        if spec.type == "tmpfs":
            ops += planner.tmpfs(spec, target)
            continue
        if spec.source is None:
            raise KernelError(f"{prefix}: bind mount on {target} has no source")
        try:
            source = os.stat(spec.source)
        except OSError as e:
            raise KernelError(
                f"{prefix}: bind source {spec.source} does not exist on the host "
                f"({errno.errorcode.get(e.errno or 0, '?')}); create it or fix spec.mounts"
            ) from e
        steps, attach = planner.bind(spec, target, source)
        ops += steps
        if attach:
            ops.append(_clone(spec, target, source, opened=opened, prefix=prefix))
    return ops


def _clone(
    spec: MountSpec, target: str, source: os.stat_result, *, opened: list[int], prefix: str
) -> _Op:
    """Detached private clone of the source, read-only before anyone can see it."""
    assert spec.source is not None
    try:
        fd = _open_tree_clone(spec.source)
        opened.append(fd)
        ro = MOUNT_ATTR_RDONLY if spec.read_only else 0
        _syscall_check(
            _mount_setattr(fd, b"", flags=AT_EMPTY_PATH, set_=ro, propagation=MS_PRIVATE),
            f"mount_setattr {spec.source}",
        )
    except OSError as e:
        raise KernelError(
            f"{prefix}: cannot bind {spec.source}: "
            f"{errno.errorcode.get(e.errno or 0, '?')} ({os.strerror(e.errno or 0)})"
        ) from e
    mode = " read-only" if spec.read_only else ""
    return _Op(
        "bind",
        target.encode(),
        f"bound {spec.source} on {target}{mode}",
        tree_fd=fd,
        directory=stat.S_ISDIR(source.st_mode),
    )


def _execute(mnt_fd: int, ops: Sequence[_Op], *, timeout: float, prefix: str) -> None:
    read_fd, write_fd = os.pipe2(os.O_CLOEXEC)
    try:
        child = os.fork()
        if child == 0:
            _run_child(mnt_fd, ops, write_fd)
        os.close(write_fd)
        write_fd = -1
        message = _read_until_eof(read_fd, deadline=time.monotonic() + timeout)
    finally:
        _close([read_fd] if write_fd < 0 else [read_fd, write_fd])
    if message is None:
        # Our own unreaped child: its pid cannot have been reused.
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        os.waitpid(child, 0)
    if message is None:
        raise KernelError(f"{prefix}: mounting did not finish within {timeout:g}s; check dmesg")
    if message:
        raise KernelError(f"{prefix}: {message}")


def _read_until_eof(fd: int, *, deadline: float) -> str | None:
    """Everything written to the pipe until EOF; None if the deadline passed first."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    data = b""
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0 or not poller.poll(remaining * 1000):
            return None
        chunk = os.read(fd, 4096)
        if not chunk:
            return data.decode(errors="replace").strip()
        data += chunk


def _close(fds: Sequence[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
