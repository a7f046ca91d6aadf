"""The cgroup filesystem: where it is mounted, which version it is, how its files are spelled.

Linux offers two cgroup interfaces:

- **v1**: one hierarchy per controller (or a few co-mounted ones), each a filesystem of
  type `cgroup` mounted at e.g. `/sys/fs/cgroup/memory`. The controllers a hierarchy
  carries are listed in its mount's *super options* (`rw,memory`, `rw,cpu,cpuacct`). A
  process belongs to one directory in *each* hierarchy, so an environment's cgroup is a
  set of directories.
- **v2**: one unified hierarchy (fstype `cgroup2`), one directory per cgroup; controllers
  are switched on for children through `cgroup.subtree_control`.
- **hybrid** (this project's CI host): v1 controllers under a tmpfs at `/sys/fs/cgroup`
  plus an empty cgroup2 at `/sys/fs/cgroup/unified`. The unified tree carries no resource
  controllers but does offer `cgroup.kill` (kill a whole subtree atomically) and
  `cgroup.events` (`populated 0|1`), which make teardown exact.

`statfs(2)` tells what `/sys/fs/cgroup` itself is (its `f_type` magic number): cgroup2
there means a pure v2 host; tmpfs means v1 or hybrid. `/proc/self/mountinfo` tells where
every hierarchy is. The parsing functions take text so they can be tested anywhere;
`discover_layout()` does the I/O.

This module also holds the file formats (value spelling) of the limit files and the small
I/O helpers every read and write goes through (plain syscalls: they run thousands of times
per observation pass), so errors carry the errno the kernel chose.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from reconciler.errors import KernelError

CGROUP_ROOT = "/sys/fs/cgroup"

# f_type values from <linux/magic.h>.
CGROUP2_SUPER_MAGIC = 0x63677270
CGROUP_SUPER_MAGIC = 0x27E0EB
TMPFS_MAGIC = 0x01021994

# Super options of a v1 `cgroup` mount that are flags, not controller names. Options with
# `=` (name=systemd, release_agent=...) are skipped too. Anything else is a controller,
# so controllers added by future kernels (misc, rdma, ...) are recognised without a list.
_V1_FLAGS = frozenset(
    {"rw", "ro", "noprefix", "clone_children", "xattr", "cpuset_v2_mode", "favordynmods"}
)
_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")

# The kernel reports "no memory limit" as PAGE_COUNTER_MAX * PAGE_SIZE (v1: a number near
# 2**63) and v2 as "max"; anything this large is unlimited in practice.
_UNLIMITED_BYTES = 2**62
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")

# CFS bandwidth: we always use a 100 ms period, so a quota of `millis * 100` µs per period
# is `millis` thousandths of a CPU. The kernel refuses quotas below 1 ms (EINVAL).
CPU_PERIOD_US = 100_000
MIN_CPU_QUOTA_US = 1_000


# --------------------------------------------------------------------------- mounts


@dataclass(frozen=True)
class CgroupMount:
    """One `cgroup` or `cgroup2` mount from /proc/self/mountinfo."""

    mount_point: str
    fstype: Literal["cgroup", "cgroup2"]
    root: str  # path inside the hierarchy that is mounted here ("/" for a full mount)
    controllers: frozenset[str] = frozenset()  # v1 only


@dataclass(frozen=True)
class CgroupLayout:
    """Where the cgroup hierarchies of this host are.

    `driver` is "v2" only on a pure v2 host; a hybrid host is "v1" with `unified` set to
    its (controller-less) cgroup2 mount. `v1_mounts` maps each v1 controller to the mount
    point of its hierarchy (co-mounted controllers share one).
    """

    driver: Literal["v1", "v2"]
    v1_mounts: Mapping[str, str] = field(default_factory=dict)
    unified: str | None = None


def _unescape(text: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo octal.
    return _OCTAL_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), text)


def parse_mountinfo(text: str) -> list[CgroupMount]:
    """Every cgroup/cgroup2 mount in mountinfo `text`, in file order.

    A line is `id parent maj:min root mountpoint opts [optional...] - fstype source super`;
    the optional fields vary in number, so everything after them is found from the `-`.
    """
    mounts: list[CgroupMount] = []
    for line in text.splitlines():
        fields = line.split()
        try:
            sep = fields.index("-", 6)
        except ValueError:
            continue
        if len(fields) < sep + 3:
            continue
        fstype = fields[sep + 1]
        root, mount_point = _unescape(fields[3]), _unescape(fields[4])
        if fstype == "cgroup2":
            mounts.append(CgroupMount(mount_point=mount_point, fstype="cgroup2", root=root))
        elif fstype == "cgroup":
            options = fields[sep + 3].split(",")
            controllers = frozenset(o for o in options if o not in _V1_FLAGS and "=" not in o)
            mounts.append(
                CgroupMount(
                    mount_point=mount_point, fstype="cgroup", root=root, controllers=controllers
                )
            )
    return mounts


def _preference(mount: CgroupMount, cgroup_root: str) -> tuple[bool, bool]:
    # Prefer full mounts of a hierarchy (root "/") under /sys/fs/cgroup over bind mounts
    # of a subtree elsewhere; False sorts first.
    under_root = mount.mount_point == cgroup_root or mount.mount_point.startswith(
        cgroup_root.rstrip("/") + "/"
    )
    return (mount.root != "/", not under_root)


def layout_from_mounts(
    mounts: Iterable[CgroupMount], *, root_magic: int | None, cgroup_root: str = CGROUP_ROOT
) -> CgroupLayout:
    """Decide the layout from the mounts and the statfs magic of `cgroup_root` (None: no
    such directory). Raises KernelError when no cgroup filesystem is mounted at all."""
    ordered = sorted(mounts, key=lambda m: _preference(m, cgroup_root))  # stable
    unified_mounts = [m.mount_point for m in ordered if m.fstype == "cgroup2"]
    if root_magic == CGROUP2_SUPER_MAGIC:
        return CgroupLayout(driver="v2", unified=cgroup_root)
    v1: dict[str, str] = {}
    for mount in ordered:
        if mount.fstype == "cgroup":
            for controller in sorted(mount.controllers):
                v1.setdefault(controller, mount.mount_point)
    unified = unified_mounts[0] if unified_mounts else None
    if v1:
        return CgroupLayout(driver="v1", v1_mounts=v1, unified=unified)
    if unified is not None:
        # cgroup2 mounted somewhere other than /sys/fs/cgroup and no v1 at all: a v2 host.
        return CgroupLayout(driver="v2", unified=unified)
    raise KernelError(
        "no cgroup filesystem is mounted (nothing of type cgroup or cgroup2 in "
        "/proc/self/mountinfo); mount cgroup2 at /sys/fs/cgroup"
    )


class _Statfs(ctypes.Structure):
    # struct statfs starts with `__fsword_t f_type` (a long on every Linux ABI we run on);
    # the rest is padding generous enough for every architecture's layout (<= 120 bytes).
    _fields_ = [("f_type", ctypes.c_long), ("_rest", ctypes.c_byte * 248)]


_libc: ctypes.CDLL | None = None


def statfs_magic(path: str) -> int | None:
    """The filesystem magic (statfs f_type) of `path`, or None if it does not exist."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    buf = _Statfs()
    if _libc.statfs(os.fsencode(path), ctypes.byref(buf)) != 0:
        err = ctypes.get_errno()
        if err in (errno.ENOENT, errno.ENOTDIR):
            return None
        raise KernelError(f"statfs({path}) failed: {os.strerror(err)}")
    # f_type is signed in the struct; magic numbers are unsigned 32-bit values.
    return int(buf.f_type) & 0xFFFFFFFF


def discover_layout(*, cgroup_root: str = CGROUP_ROOT) -> CgroupLayout:
    """Read /proc/self/mountinfo and statfs(`cgroup_root`) and return the host's layout."""
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        text = f.read()
    return layout_from_mounts(
        parse_mountinfo(text), root_magic=statfs_magic(cgroup_root), cgroup_root=cgroup_root
    )


# --------------------------------------------------------------------------- file I/O


_READ_SIZE = 65536


def _read(path: str, *, to_eof: bool) -> str | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            chunks = [os.read(fd, _READ_SIZE)]
            while chunks[-1] and (to_eof or len(chunks[-1]) == _READ_SIZE):
                chunks.append(os.read(fd, _READ_SIZE))
        finally:
            os.close(fd)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:
        # ENODEV: the cgroup was removed between open and read.
        if exc.errno == errno.ENODEV:
            return None
        raise KernelError(f"cannot read {path}: {exc.strerror}") from exc
    return b"".join(chunks).decode("ascii").strip()


def read_file(path: str) -> str | None:
    """The stripped content of a cgroup value file, or None if it (or its cgroup) is gone.

    Plain open/read/close syscalls: a buffered text file costs several times as much, and
    observation reads thousands of these per pass. A value file (a limit, a counter, a
    device table, cgroup.events) is one seq_file record, which the kernel hands out whole:
    a read shorter than the buffer has returned all of it, so no second read for EOF.
    (Regular files, in unit tests, behave the same.)
    """
    return _read(path, to_eof=False)


def write_file(path: str, value: str) -> None:
    """Write `value` with one write(2), so the kernel's errno reaches the caller as OSError.

    (Buffered text files report a refused write only at close, and lose which write failed.)
    O_TRUNC is ignored by cgroup files but makes plain files (unit tests) behave alike.
    """
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC)
    try:
        os.write(fd, value.encode("ascii"))
    finally:
        os.close(fd)


def read_pids(procs_file: str) -> list[int]:
    """Pids listed in a `cgroup.procs` file (empty if the cgroup is gone).

    cgroup.procs is one record per process, handed out a page per read: read to EOF.
    """
    text = _read(procs_file, to_eof=True)
    if not text:
        return []
    # A pid of 0 means "not visible from our pid namespace": nothing we could signal.
    return [pid for pid in (int(line) for line in text.split()) if pid > 0]


def cgroup_tree(path: str) -> list[str]:
    """`path` and every cgroup below it, deepest first (rmdir order); [] if it is gone.

    A directory's link count is 2 plus its number of subdirectories (kernfs and tmpfs
    alike), so a leaf, which nearly every env cgroup is, costs one stat instead of a
    listing of its dozens of control files. Any other count means: walk.
    """
    try:
        links = os.stat(path).st_nlink
    except (FileNotFoundError, NotADirectoryError):
        return []
    except OSError as exc:
        raise KernelError(f"cannot stat cgroup {path}: {exc.strerror}") from exc
    if links == 2:
        return [path]
    return [directory for directory, _dirs, _files in os.walk(path, topdown=False)]


# --------------------------------------------------------------------------- value spelling


_BINARY_UNITS = (
    ("Ei", 2**60),
    ("Pi", 2**50),
    ("Ti", 2**40),
    ("Gi", 2**30),
    ("Mi", 2**20),
    ("Ki", 2**10),
)


def format_bytes(value: int) -> str:
    """Bytes as a short binary quantity: 64Mi, 1Gi, 120.3Mi, 512."""
    for suffix, unit in _BINARY_UNITS:
        if value >= unit:
            if value % unit == 0:
                return f"{value // unit}{suffix}"
            return f"{value / unit:.1f}".rstrip("0").rstrip(".") + suffix
    return str(value)


def round_to_page(value: int) -> int:
    """Memory limits are kept in pages: the kernel rounds a written byte count down."""
    return value - value % PAGE_SIZE


def parse_memory_limit(text: str | None) -> int | None:
    """`memory.limit_in_bytes` (v1) or `memory.max` (v2) → bytes, None for unlimited."""
    if text is None or text == "max" or text == "-1":
        return None
    value = int(text)
    return None if value >= _UNLIMITED_BYTES else value


def parse_max(text: str | None) -> int | None:
    """A `max`-or-number file such as `pids.max` → int, None for max (or a missing file)."""
    if text is None or text == "max":
        return None
    return int(text)


def render_max(value: int | None) -> str:
    """None → "max", else the number."""
    return "max" if value is None else str(value)


def cpu_quota_us(millis: int | None) -> int | None:
    """Millicores → CFS quota in µs per CPU_PERIOD_US period (None: unlimited)."""
    if millis is None:
        return None
    return millis * CPU_PERIOD_US // 1000


def cpu_millis(*, quota_us: int | None, period_us: int) -> int | None:
    """CFS quota and period → millicores (None: unlimited), rounded to the nearest."""
    if quota_us is None or quota_us < 0:
        return None
    return (quota_us * 1000 + period_us // 2) // period_us


def parse_cpu_max(text: str | None) -> tuple[int | None, int]:
    """v2 `cpu.max` ("max 100000" or "50000 100000") → (quota or None, period)."""
    if not text:
        return None, CPU_PERIOD_US
    parts = text.split()
    quota = None if parts[0] == "max" else int(parts[0])
    period = int(parts[1]) if len(parts) > 1 else CPU_PERIOD_US
    return quota, period


def render_cpu_max(quota_us: int | None) -> str:
    """(quota or None) → v2 `cpu.max` line with our fixed period."""
    return f"{render_max(quota_us)} {CPU_PERIOD_US}"


# Field names of an IoLimit, in the order v2 io.max lists them, and their v1 file names.
IO_KEYS: tuple[tuple[str, str, str], ...] = (
    ("read_bps", "rbps", "blkio.throttle.read_bps_device"),
    ("write_bps", "wbps", "blkio.throttle.write_bps_device"),
    ("read_iops", "riops", "blkio.throttle.read_iops_device"),
    ("write_iops", "wiops", "blkio.throttle.write_iops_device"),
)


def parse_blkio_device_file(text: str | None) -> dict[str, int]:
    """A v1 `blkio.throttle.*_device` file ("MAJ:MIN value" lines) → {device: value}.

    The kernel lists only devices with a limit; a value of 0 means none and is skipped.
    """
    result: dict[str, int] = {}
    for line in (text or "").splitlines():
        parts = line.split()
        if len(parts) == 2 and int(parts[1]) > 0:
            result[parts[0]] = int(parts[1])
    return result


IoValues = tuple[int | None, int | None, int | None, int | None]
"""(read_bps, write_bps, read_iops, write_iops); None = unlimited."""


def parse_io_max(text: str | None) -> dict[str, IoValues]:
    """v2 `io.max` ("MAJ:MIN rbps=.. wbps=.. riops=.. wiops=.." lines) → {device: values}.

    Keys the kernel does not list (or lists as `max`) are unlimited; a device whose four
    values are all unlimited is left out, as the kernel itself does.
    """
    result: dict[str, IoValues] = {}
    for line in (text or "").splitlines():
        parts = line.split()
        if not parts:
            continue
        pairs = dict(p.split("=", 1) for p in parts[1:] if "=" in p)
        values: IoValues = (
            parse_max(pairs.get("rbps")),
            parse_max(pairs.get("wbps")),
            parse_max(pairs.get("riops")),
            parse_max(pairs.get("wiops")),
        )
        if any(v is not None for v in values):
            result[parts[0]] = values
    return result


def render_io_max(device: str, values: IoValues) -> str:
    """One v2 `io.max` line; every key is spelled out so a write also clears the others."""
    keys = [f"{v2}={render_max(v)}" for (_, v2, _), v in zip(IO_KEYS, values, strict=True)]
    return f"{device} " + " ".join(keys)
