"""Per-environment cgroups: v1 (and hybrid) and v2 behind the `CgroupDriver` Protocol.

Every environment gets one cgroup under its instance's parent, named after the instance,
so the parent is the ownership proof: whatever lives under `<hierarchy>/<instance>/` is
ours to limit, kill and remove, and nothing outside it is ever touched.

- **v1** (and hybrid): one directory per hierarchy we use, `<mount>/<instance>/<env>` for
  the memory, cpu, cpuacct, pids and blkio controllers (co-mounted controllers share a
  directory). On a hybrid host the env also gets `<unified>/<instance>/<env>` in the
  controller-less cgroup2 tree: it carries no limits, but gives `cgroup.kill` and
  `cgroup.events`, so teardown kills the whole tree atomically and knows when it is empty.
- **v2**: one directory `<unified>/<instance>/<env>`; the controllers are switched on for
  it through `cgroup.subtree_control` of the root and of the instance's parent.

`ensure()` reads the current values first and writes only those that differ, so a
resync of an unchanged environment writes nothing and a value changed by hand (drift) is
put back. Values are compared the way the kernel stores them (memory in whole pages, CPU
as quota/period), or a limit the kernel rounds would be rewritten on every pass. A
directory that this very call created holds the kernel's defaults (no limits), so its
files are not read back: only the limits that are set get written.

`observe()` lists each of the instance's parents once and reads, per env, only the files
the engine compares (limits) plus the two usage counters, and nothing from directories
the listing showed missing.

Teardown is batched (`remove_many`): kill every env first (cgroup.kill where available;
else SIGKILL to every pid listed in `cgroup.procs`, through a pidfd re-verified against
the listing so a recycled pid is never hit), then one wait loop with one deadline polls
all of them and removes each env's directories bottom-up as soon as it is empty. So N
envs cost one wait for the slowest exit, not N waits. Zombies do not keep a cgroup
populated, so we need not be their parent to finish.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import signal
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from reconciler.errors import KernelError
from reconciler.kernel import cgroupfs as fs
from reconciler.kernel.cgroupfs import CgroupLayout, discover_layout
from reconciler.kernel.types import (
    CgroupDriver,
    CgroupLimits,
    CgroupState,
    CgroupUsage,
    IoLimit,
)

__all__ = [
    "CgroupLayout",
    "CgroupV1Driver",
    "CgroupV2Driver",
    "discover_layout",
    "open_cgroup_driver",
    "procs_files",
]

# v1 hierarchies an env joins. cpuacct is not limited, but joining it (when it is mounted
# apart from cpu) keeps CPU accounting per environment.
V1_CONTROLLERS = ("memory", "cpu", "cpuacct", "pids", "blkio")
# v2 controllers switched on for the instance parent and its envs.
V2_CONTROLLERS = ("memory", "cpu", "pids", "io")

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,254}$")
_POLL_MAX = 0.01  # seconds; teardown polls start at 1 ms and double up to this

_Read = Callable[[str], str | None]
"""Reads a cgroup file: its stripped content, None when absent (see `_reader`)."""


def _check_name(name: str, *, what: str) -> str:
    # Names become path components under /sys/fs/cgroup: no "/", no "..", no empties.
    if not _NAME.match(name):
        raise ValueError(f"invalid cgroup {what} name {name!r}: use letters, digits, '-', '_'")
    return name


@dataclass(frozen=True)
class _Write:
    """One value to write, why, and how to explain a refusal to the user."""

    path: str
    value: str
    change: str  # "memory.limit_in_bytes: 268435456 -> 134217728"
    explain: Callable[[OSError], KernelError | None] | None = None


def _refused(write: _Write, exc: OSError, env: str) -> KernelError:
    return KernelError(
        f"cgroup of env {env}: the kernel refused {write.value!r} for {write.path}: "
        f"{exc.strerror} ({errno.errorcode.get(exc.errno or 0, exc.errno)})"
    )


def _mkdir(path: str) -> bool:
    """Create a cgroup directory (and its parents if need be); True if this call made it."""
    try:
        try:
            os.mkdir(path)
        except FileNotFoundError:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            os.mkdir(path)
    except FileExistsError:
        return False
    except OSError as exc:
        raise KernelError(f"cannot create cgroup {path}: {exc.strerror}") from exc
    return True


def _reader(skip: frozenset[str]) -> _Read:
    """`fs.read_file`, except that files in the `skip` directories read as None, unread.

    None is what every parser takes for "the kernel's default" (no limit, 100 ms period,
    no device), which is exactly what a directory we just created holds; an absent
    directory has no files at all. Either way the syscall would tell us nothing.
    """
    if not skip:
        return fs.read_file

    def read(path: str) -> str | None:
        return None if path.rpartition("/")[0] in skip else fs.read_file(path)

    return read


@dataclass(frozen=True)
class _Created:
    """What `_create` did: the changes, the directories it made (their files hold the
    kernel's defaults), and (v2) the controllers enabled for the env's directory."""

    changes: tuple[str, ...]
    fresh: frozenset[str]
    controllers: frozenset[str] = frozenset()


def _made(paths: Iterable[str]) -> tuple[tuple[str, ...], frozenset[str]]:
    """mkdir each of `paths`; the changes and the set of directories actually made."""
    fresh = [path for path in paths if _mkdir(path)]
    return tuple(f"created {path}" for path in fresh), frozenset(fresh)


class _CgroupDriverBase:
    """Everything that does not depend on the cgroup version."""

    def __init__(self, *, instance: str, layout: CgroupLayout) -> None:
        self.instance = _check_name(instance, what="instance")
        self.layout = layout

    # -- the shape, given by subclasses

    @property
    def driver(self) -> Literal["v1", "v2"]:
        """The cgroup version: "v1" (also on a hybrid host) or "v2"."""
        return self.layout.driver

    def parents(self) -> tuple[str, ...]:
        """The instance's parent directories, one per hierarchy used."""
        raise NotImplementedError

    def _unified_dir(self, env: str) -> str | None:
        """The env's directory in a cgroup2 tree (cgroup.kill, cgroup.events), if any."""
        raise NotImplementedError

    def _create(self, env: str) -> _Created:
        raise NotImplementedError

    def _diff(self, env: str, limits: CgroupLimits, created: _Created) -> list[_Write]:
        raise NotImplementedError

    def _read_limits(self, env: str, read: _Read) -> CgroupLimits:
        raise NotImplementedError

    def _read_usage(self, env: str, read: _Read) -> CgroupUsage:
        raise NotImplementedError

    # -- the Protocol

    def paths(self, *, env: str) -> tuple[str, ...]:
        """Directories that make up the env's cgroup (whether or not they exist)."""
        _check_name(env, what="environment")
        return tuple(f"{parent}/{env}" for parent in self.parents())

    def procs_files(self, *, env: str) -> tuple[str, ...]:
        """The `cgroup.procs` files a process must be written to, to join the env's cgroup."""
        return tuple(f"{path}/cgroup.procs" for path in self.paths(env=env))

    def env_names(self) -> list[str]:
        """Names of the env cgroups under this instance's parents (one listing each), sorted."""
        return sorted(set().union(*self._listings()))

    def observe(self, *, usage: bool = True) -> Mapping[str, CgroupState]:
        """Every env cgroup under this instance's parents, by env name.

        One listing per parent, then per env its limit files and (unless `usage` is False:
        the engine compares limits only; usage is for `status`) its usage counters, read
        only from the directories the listing showed.
        """
        parents = self.parents()
        listings = self._listings()
        states: dict[str, CgroupState] = {}
        for env in sorted(set().union(*listings)):
            paths = tuple(f"{parent}/{env}" for parent in parents)
            absent = frozenset(
                p for p, names in zip(paths, listings, strict=True) if env not in names
            )
            read = _reader(absent)
            states[env] = CgroupState(
                env=env,
                paths=tuple(p for p in paths if p not in absent),
                limits=self._read_limits(env, read),
                usage=self._read_usage(env, read) if usage else CgroupUsage(),
                complete=not absent,
            )
        return states

    def ensure(self, *, env: str, limits: CgroupLimits) -> list[str]:
        """Create the cgroup if missing and write only the limits that differ.

        In a directory this call created nothing is read back (it holds the kernel's
        defaults): only the limits that are set are written. Every differing limit is
        attempted; if the kernel refused some, the first refusal is raised (as
        KernelError) after the others were written.
        """
        _check_name(env, what="environment")
        created = self._create(env)
        changes = list(created.changes)
        failure: KernelError | None = None
        for write in self._diff(env, limits, created):
            try:
                fs.write_file(write.path, write.value)
            except OSError as exc:
                error = write.explain(exc) if write.explain else None
                failure = failure or error or _refused(write, exc, env)
                continue
            changes.append(write.change)
        if failure is not None:
            raise failure
        return changes

    def kill(self, *, env: str) -> None:
        """Kill every process in the env's cgroup (cgroup.kill where available)."""
        _check_name(env, what="environment")
        self._cgroup_kill(env)
        # v1 hierarchies have no cgroup.kill, and a process may sit in a v1 directory
        # without being in the unified one (joined by hand): signal whatever is listed.
        _kill_listed(_procs_files(self.paths(env=env)))

    def remove(self, *, env: str, timeout: float = 5.0) -> bool:
        """Kill what is left, wait (with a deadline) until empty, remove every directory.

        False if there was nothing to remove. Raises KernelError naming the leftover pids
        if the cgroup does not empty (or cannot be removed) before `timeout` seconds.
        """
        result = self.remove_many([env], timeout=timeout)[env]
        if isinstance(result, KernelError):
            raise result
        return result

    def remove_many(
        self, envs: Sequence[str], *, timeout: float = 5.0
    ) -> dict[str, bool | KernelError]:
        """Tear down many envs at once: kill all, wait once, remove every directory.

        Per env: True if something was removed, False if it was already gone, or the
        KernelError (one line, naming leftover pids) that stopped it; one env failing does
        not stop the others. `timeout` is one deadline for the whole batch.
        """
        deadline = time.monotonic() + timeout
        results: dict[str, bool | KernelError] = {}
        pending: dict[str, tuple[str, ...]] = {}
        for env in envs:
            paths = self.paths(env=env)  # checks the name before anything is touched
            if any(os.path.isdir(path) for path in paths):
                pending[env] = paths
            else:
                results[env] = False
        # 1. Kill everything first, so all the processes die in parallel.
        for env, paths in list(pending.items()):
            try:
                if not self._cgroup_kill(env):
                    _kill_listed(_procs_files(paths))
            except KernelError as exc:
                results[env] = exc
                del pending[env]
        # 2. One wait loop, one deadline: each env's directories go as soon as it is empty.
        waiting: dict[str, str] = {}
        delay, again = 0.001, False
        while pending:
            for env, paths in list(pending.items()):
                try:
                    reason = self._settle(env, paths, again=again)
                except KernelError as exc:
                    results[env] = exc
                    del pending[env]
                    continue
                if reason is None:
                    results[env] = True
                    del pending[env]
                else:
                    waiting[env] = reason
            left = deadline - time.monotonic()
            if not pending or left <= 0:
                break
            time.sleep(min(delay, left))
            delay, again = min(delay * 2, _POLL_MAX), True
        for env, paths in pending.items():
            results[env] = self._busy(env, _listed_pids(paths), timeout, what=waiting[env])
        return {env: results[env] for env in envs}

    def remove_parent(self) -> None:
        """Remove the instance's parent directories when they are empty (else leave them)."""
        for parent in self.parents():
            try:
                os.rmdir(parent)
            except FileNotFoundError:
                continue
            except OSError as exc:
                if exc.errno in (errno.ENOTEMPTY, errno.EBUSY):
                    continue  # other environments (or their processes) still live there
                raise KernelError(f"cannot remove cgroup {parent}: {exc.strerror}") from exc

    # -- helpers

    def _listings(self) -> list[set[str]]:
        """Per parent (in `parents()` order), the names of its env directories."""
        listings: list[set[str]] = []
        for parent in self.parents():
            try:
                with os.scandir(parent) as entries:
                    names = {e.name for e in entries if e.is_dir(follow_symlinks=False)}
            except FileNotFoundError:
                names = set()
            listings.append({name for name in names if _NAME.match(name)})
        return listings

    def _cgroup_kill(self, env: str) -> bool:
        """Write the env's cgroup.kill; False when there is none to write (no unified
        directory, or a kernel older than 5.14): the caller must signal instead."""
        unified = self._unified_dir(env)
        if unified is None:
            return False
        kill_file = f"{unified}/cgroup.kill"
        try:
            fs.write_file(kill_file, "1")
        except FileNotFoundError:
            return False
        except OSError as exc:
            if exc.errno == errno.ENODEV:  # removed under our feet: nothing left to kill
                return True
            raise KernelError(f"cannot kill env {env}: {kill_file}: {exc.strerror}") from exc
        return True

    def _populated(self, env: str) -> bool:
        # cgroup.events covers the whole subtree, including processes whose pids we cannot
        # see from our pid namespace.
        unified = self._unified_dir(env)
        if unified is None:
            return False
        events = fs.read_file(f"{unified}/cgroup.events") or ""
        return "populated 1" in events.splitlines()

    def _settle(self, env: str, paths: tuple[str, ...], *, again: bool) -> str | None:
        """One teardown step for a killed env: None once its directories are all gone, else
        why not yet. `again`: kill what is still there (it may have joined after the kill).
        """
        if self._populated(env):
            # cgroup.kill skips tasks that are already dying, so repeating it is cheap; it
            # catches a process that joined after the first kill.
            if again and not self._cgroup_kill(env):
                _kill_listed(_procs_files(paths))
            return "still has processes"
        for path in paths:
            if not _remove_tree(path, env=env):
                # rmdir is the exact emptiness test, so the common case reads nothing. Busy:
                # a process outside the unified tree (joined by hand to a v1 directory), or
                # the kernel's moment of EBUSY after the last exit. Signal what is listed.
                _kill_listed(_procs_files(paths))
                return f"could not be removed ({path})"
        return None

    def _busy(self, env: str, pids: Iterable[int], timeout: float, *, what: str) -> KernelError:
        listed = ", ".join(str(p) for p in sorted(pids)) or "none visible from here"
        return KernelError(
            f"cgroup of env {env} (instance {self.instance}) {what} after {timeout:g}s "
            f"(pids: {listed}); they may be stuck in uninterruptible I/O: retry the teardown"
        )


def _remove_tree(path: str, *, env: str) -> bool:
    """rmdir the cgroup at `path` and every cgroup below it; False while one is busy.

    One rmdir in the common case (an empty leaf). EBUSY means processes, or sub-cgroups a
    workload made (cgroupfs answers EBUSY for those too): then walk, deepest first.
    """
    return _rmdir(path, env=env) or all(_rmdir(d, env=env) for d in fs.cgroup_tree(path))


def _rmdir(path: str, *, env: str) -> bool:
    """rmdir one cgroup directory: True once it is gone, False while it is busy."""
    try:
        os.rmdir(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        if exc.errno in (errno.EBUSY, errno.ENOTEMPTY):
            return False
        raise KernelError(f"cannot remove cgroup {path} of env {env}: {exc.strerror}") from exc
    return True


def _procs_files(paths: Iterable[str]) -> list[str]:
    """Every cgroup.procs file in the trees rooted at `paths` (sub-cgroups included)."""
    return [f"{d}/cgroup.procs" for path in paths for d in fs.cgroup_tree(path)]


def _listed_pids(paths: Iterable[str]) -> set[int]:
    """Pids listed anywhere in the trees rooted at `paths`, for a message (best effort)."""
    try:
        return {pid for f in _procs_files(paths) for pid in fs.read_pids(f)}
    except KernelError:
        return set()


def _kill_listed(procs_files: Iterable[str]) -> None:
    """SIGKILL every process listed in `procs_files`, safely against pid reuse.

    A pid read from cgroup.procs may exit and be recycled before we signal it. So: open a
    pidfd for each pid, then re-read the listing. A pid still listed while its pidfd's
    process is alive is that process (two live processes cannot share a pid); a pidfd of a
    process that died in between answers ESRCH instead of hitting a stranger.
    """
    files = list(procs_files)
    pidfds: dict[int, int] = {}
    try:
        for pid in {pid for f in files for pid in fs.read_pids(f)}:
            try:
                pidfds[pid] = os.pidfd_open(pid)
            except ProcessLookupError:
                continue
        if pidfds:
            still = {pid for f in files for pid in fs.read_pids(f)}
            for pid, fd in pidfds.items():
                if pid in still:
                    with contextlib.suppress(ProcessLookupError):
                        signal.pidfd_send_signal(fd, signal.SIGKILL)
    finally:
        for fd in pidfds.values():
            os.close(fd)


# --------------------------------------------------------------------------- v1


class CgroupV1Driver(_CgroupDriverBase):
    """cgroup v1, one directory per hierarchy; on a hybrid host also the unified tree."""

    def __init__(self, *, instance: str, layout: CgroupLayout) -> None:
        super().__init__(instance=instance, layout=layout)
        mounts: list[str] = []
        for controller in V1_CONTROLLERS:
            mount = layout.v1_mounts.get(controller)
            if mount is not None and mount not in mounts:
                mounts.append(mount)
        extra = (layout.unified,) if layout.unified else ()
        # Paths are built with f-strings from these: observation builds thousands per pass.
        self._parents = tuple(os.path.join(m, self.instance) for m in (*mounts, *extra))
        self._controller_parents = {
            c: os.path.join(m, self.instance)
            for c, m in layout.v1_mounts.items()
            if c in V1_CONTROLLERS
        }
        self._unified_parent = (
            os.path.join(layout.unified, self.instance) if layout.unified else None
        )

    def parents(self) -> tuple[str, ...]:
        """`<mount>/<instance>` for each hierarchy used, plus the unified tree's (hybrid)."""
        return self._parents

    def _dir(self, env: str, controller: str) -> str | None:
        parent = self._controller_parents.get(controller)
        return None if parent is None else f"{parent}/{env}"

    def _unified_dir(self, env: str) -> str | None:
        return None if self._unified_parent is None else f"{self._unified_parent}/{env}"

    def _create(self, env: str) -> _Created:
        changes, fresh = _made(self.paths(env=env))
        return _Created(changes=changes, fresh=fresh)

    def _file(self, env: str, controller: str, name: str) -> str | None:
        directory = self._dir(env, controller)
        return None if directory is None else f"{directory}/{name}"

    def _require(self, env: str, controller: str, what: str) -> str:
        directory = self._dir(env, controller)
        if directory is None:
            raise KernelError(
                f"env {env} sets a {what} limit but the cgroup v1 {controller} controller is "
                f"not mounted; mount it (mount -t cgroup -o {controller} cgroup "
                f"{fs.CGROUP_ROOT}/{controller}) or drop the limit"
            )
        return directory

    def _diff(self, env: str, limits: CgroupLimits, created: _Created) -> list[_Write]:
        read = _reader(created.fresh)
        return [
            *self._diff_memory(env, limits.memory_bytes, read),
            *self._diff_cpu(env, limits.cpu_millis, read),
            *self._diff_pids(env, limits.pids, read),
            *self._diff_blkio(env, limits.io, read),
        ]

    def _diff_pids(self, env: str, pids: int | None, read: _Read) -> list[_Write]:
        if pids is not None:
            self._require(env, "pids", "pids")
        path = self._file(env, "pids", "pids.max")
        return [] if path is None else _diff_max(path, pids, read)

    def _diff_memory(self, env: str, memory_bytes: int | None, read: _Read) -> list[_Write]:
        if memory_bytes is not None:
            self._require(env, "memory", "memory")
        path = self._file(env, "memory", "memory.limit_in_bytes")
        if path is None:
            return []
        current = fs.parse_memory_limit(read(path))
        desired = None if memory_bytes is None else fs.round_to_page(memory_bytes)
        if current == desired:
            return []
        usage_file = os.path.join(os.path.dirname(path), "memory.usage_in_bytes")

        def explain(exc: OSError) -> KernelError | None:
            # v1 reclaims down to a lower limit, and gives up with EBUSY when it cannot
            # (anonymous memory, no swap). Looping would not help: the user must act.
            if exc.errno != errno.EBUSY or memory_bytes is None:
                return None
            usage = int(fs.read_file(usage_file) or 0)
            return KernelError(
                f"memory limit {fs.format_bytes(memory_bytes)} for env {env} is below its "
                f"current usage {fs.format_bytes(usage)}; the kernel refused it (EBUSY): "
                "raise the limit or stop what uses the memory"
            )

        old, new = _v1_number(current), _v1_number(desired)
        return [_Write(path, new, f"memory.limit_in_bytes: {old} -> {new}", explain)]

    def _diff_cpu(self, env: str, millis: int | None, read: _Read) -> list[_Write]:
        if millis is not None:
            self._require(env, "cpu", "cpu")
        quota_file = self._file(env, "cpu", "cpu.cfs_quota_us")
        period_file = self._file(env, "cpu", "cpu.cfs_period_us")
        if quota_file is None or period_file is None:
            return []
        desired = _checked_quota(env, millis)
        quota = int(read(quota_file) or -1)
        current = None if quota < 0 else quota
        # The period only matters under a quota; with none, leave whatever is there.
        period = fs.CPU_PERIOD_US if desired is None else int(read(period_file) or fs.CPU_PERIOD_US)
        writes: list[_Write] = []
        if desired is not None and period != fs.CPU_PERIOD_US:
            change = f"cpu.cfs_period_us: {period} -> {fs.CPU_PERIOD_US}"
            writes.append(_Write(period_file, str(fs.CPU_PERIOD_US), change))
        if current != desired or writes:
            old, new = _v1_number(current), _v1_number(desired)
            writes.append(_Write(quota_file, new, f"cpu.cfs_quota_us: {old} -> {new}"))
        return writes

    def _diff_blkio(self, env: str, io: tuple[IoLimit, ...], read: _Read) -> list[_Write]:
        directory = self._require(env, "blkio", "block I/O") if io else self._dir(env, "blkio")
        if directory is None:
            return []
        desired = _io_by_device(io)
        writes: list[_Write] = []
        for index, (_field, _v2, name) in enumerate(fs.IO_KEYS):
            path = f"{directory}/{name}"
            current = fs.parse_blkio_device_file(read(path))
            wanted = {d: v[index] for d, v in desired.items() if v[index] is not None}
            for device in sorted(current.keys() | wanted.keys()):
                old, new = current.get(device, 0), wanted.get(device) or 0
                if old != new:
                    # Writing 0 is how v1 clears a device's limit.
                    change = f"{name} {device}: {old} -> {new}"
                    writes.append(_Write(path, f"{device} {new}", change))
        return writes

    def _read_limits(self, env: str, read: _Read) -> CgroupLimits:
        memory = self._file(env, "memory", "memory.limit_in_bytes")
        quota_file = self._file(env, "cpu", "cpu.cfs_quota_us")
        period_file = self._file(env, "cpu", "cpu.cfs_period_us")
        pids = self._file(env, "pids", "pids.max")
        cpu = None
        if quota_file and period_file:
            quota = int(read(quota_file) or -1)
            # The period only gives a quota its meaning: with none (-1), skip the read.
            if quota >= 0:
                period = int(read(period_file) or fs.CPU_PERIOD_US)
                cpu = fs.cpu_millis(quota_us=quota, period_us=period)
        io: tuple[IoLimit, ...] = ()
        blkio = self._dir(env, "blkio")
        if blkio is not None:
            per_key = [
                fs.parse_blkio_device_file(read(f"{blkio}/{name}")) for _f, _v2, name in fs.IO_KEYS
            ]
            devices = sorted(set().union(*per_key))
            io = tuple(
                IoLimit(
                    device=d,
                    read_bps=per_key[0].get(d),
                    write_bps=per_key[1].get(d),
                    read_iops=per_key[2].get(d),
                    write_iops=per_key[3].get(d),
                )
                for d in devices
            )
        return CgroupLimits(
            memory_bytes=fs.parse_memory_limit(read(memory)) if memory else None,
            cpu_millis=cpu,
            pids=fs.parse_max(read(pids)) if pids else None,
            io=io,
        )

    def _read_usage(self, env: str, read: _Read) -> CgroupUsage:
        memory = self._file(env, "memory", "memory.usage_in_bytes")
        pids = self._file(env, "pids", "pids.current")
        return CgroupUsage(
            memory_bytes=int((read(memory) if memory else None) or 0),
            pids=int((read(pids) if pids else None) or 0),
        )


def _v1_number(value: int | None) -> str:
    # v1 files spell "unlimited" as -1 when written.
    return "-1" if value is None else str(value)


# --------------------------------------------------------------------------- v2


class CgroupV2Driver(_CgroupDriverBase):
    """cgroup v2: one directory per env in the unified tree."""

    def __init__(self, *, instance: str, layout: CgroupLayout) -> None:
        super().__init__(instance=instance, layout=layout)
        if layout.unified is None:
            raise KernelError("cgroup v2 layout without a cgroup2 mount; this is a bug")
        self._root = layout.unified
        self._parent = os.path.join(layout.unified, self.instance)

    def parents(self) -> tuple[str, ...]:
        """`<unified>/<instance>`."""
        return (self._parent,)

    def _unified_dir(self, env: str) -> str | None:
        return f"{self._parent}/{env}"

    def _create(self, env: str) -> _Created:
        parent = self._parent
        changes, _root_controllers = _enable_controllers(self._root)
        made, fresh = _made([parent])
        more, controllers = _enable_controllers(parent)
        env_made, env_fresh = _made([f"{parent}/{env}"])
        return _Created(
            changes=(*changes, *made, *more, *env_made),
            fresh=fresh | env_fresh,
            controllers=controllers,
        )

    def _diff(self, env: str, limits: CgroupLimits, created: _Created) -> list[_Write]:
        directory = f"{self._parent}/{env}"
        enabled = created.controllers
        needed = {
            "memory": limits.memory_bytes is not None,
            "cpu": limits.cpu_millis is not None,
            "pids": limits.pids is not None,
            "io": bool(limits.io),
        }
        for controller, wanted in needed.items():
            if wanted and controller not in enabled:
                raise KernelError(
                    f"env {env} sets a {controller} limit but the cgroup v2 {controller} "
                    f"controller is not available under {self._root} (it may be bound to a "
                    "v1 hierarchy); enable it or drop the limit"
                )
        read = _reader(created.fresh)
        writes: list[_Write] = []
        if "memory" in enabled:
            path = f"{directory}/memory.max"
            current = fs.parse_memory_limit(read(path))
            desired = None if limits.memory_bytes is None else fs.round_to_page(limits.memory_bytes)
            if current != desired:
                old, new = fs.render_max(current), fs.render_max(desired)
                writes.append(_Write(path, new, f"memory.max: {old} -> {new}"))
        if "cpu" in enabled:
            path = f"{directory}/cpu.max"
            quota, period = fs.parse_cpu_max(read(path))
            desired_quota = _checked_quota(env, limits.cpu_millis)
            same = quota == desired_quota and (quota is None or period == fs.CPU_PERIOD_US)
            if not same:
                old = f"{fs.render_max(quota)} {period}"
                new = fs.render_cpu_max(desired_quota)
                writes.append(_Write(path, new, f"cpu.max: {old} -> {new}"))
        if "pids" in enabled:
            writes += _diff_max(f"{directory}/pids.max", limits.pids, read)
        if "io" in enabled:
            writes += _diff_io_max(f"{directory}/io.max", limits.io, read)
        return writes

    def _read_limits(self, env: str, read: _Read) -> CgroupLimits:
        directory = f"{self._parent}/{env}"
        quota, period = fs.parse_cpu_max(read(f"{directory}/cpu.max"))
        io = fs.parse_io_max(read(f"{directory}/io.max"))
        memory = read(f"{directory}/memory.max")
        return CgroupLimits(
            memory_bytes=fs.parse_memory_limit(memory),
            cpu_millis=fs.cpu_millis(quota_us=quota, period_us=period),
            pids=fs.parse_max(read(f"{directory}/pids.max")),
            io=tuple(IoLimit(device, *values) for device, values in sorted(io.items())),
        )

    def _read_usage(self, env: str, read: _Read) -> CgroupUsage:
        directory = f"{self._parent}/{env}"
        memory = read(f"{directory}/memory.current")
        pids = read(f"{directory}/pids.current")
        return CgroupUsage(memory_bytes=int(memory or 0), pids=int(pids or 0))


def _enable_controllers(directory: str) -> tuple[tuple[str, ...], frozenset[str]]:
    """Switch our controllers on for `directory`'s children, if available and not yet on.

    Returns the changes and the controllers now on for the children. Only what is missing
    is written, so the root's subtree_control (shared with the rest of the host) is left
    alone once it already has what we need.
    """
    available = set((fs.read_file(os.path.join(directory, "cgroup.controllers")) or "").split())
    control = os.path.join(directory, "cgroup.subtree_control")
    enabled = frozenset((fs.read_file(control) or "").split())
    missing = [c for c in V2_CONTROLLERS if c in available and c not in enabled]
    if not missing:
        return (), enabled
    value = " ".join(f"+{c}" for c in missing)
    try:
        fs.write_file(control, value)  # one write: all of them are switched on, or none
    except OSError as exc:
        raise KernelError(
            f"cannot enable cgroup controllers ({value}) in {control}: {exc.strerror}; "
            "a cgroup with processes of its own cannot delegate controllers (v2 'no internal "
            "processes' rule)"
        ) from exc
    return (f"{control}: {value}",), enabled | set(missing)


# --------------------------------------------------------------------------- shared bits


def _checked_quota(env: str, millis: int | None) -> int | None:
    quota = fs.cpu_quota_us(millis)
    if quota is not None and quota < fs.MIN_CPU_QUOTA_US:
        minimum = fs.MIN_CPU_QUOTA_US * 1000 // fs.CPU_PERIOD_US
        raise KernelError(
            f"cpu limit {millis}m for env {env} is below the kernel's minimum of {minimum}m; "
            "raise it"
        )
    return quota


def _diff_max(path: str, desired: int | None, read: _Read) -> list[_Write]:
    current = fs.parse_max(read(path))
    if current == desired:
        return []
    old, new = fs.render_max(current), fs.render_max(desired)
    return [_Write(path, new, f"{os.path.basename(path)}: {old} -> {new}")]


def _io_by_device(io: Iterable[IoLimit]) -> dict[str, fs.IoValues]:
    # A device listed twice: the later entry wins, as in a YAML map. Entries with no limit
    # at all are the same as absent ones.
    result: dict[str, fs.IoValues] = {}
    for limit in io:
        values = (limit.read_bps, limit.write_bps, limit.read_iops, limit.write_iops)
        if any(v is not None for v in values):
            result[limit.device] = values
        else:
            result.pop(limit.device, None)
    return result


def _diff_io_max(path: str, io: tuple[IoLimit, ...], read: _Read) -> list[_Write]:
    current = fs.parse_io_max(read(path))
    desired = _io_by_device(io)
    unlimited: fs.IoValues = (None, None, None, None)
    writes = []
    for device in sorted(current.keys() | desired.keys()):
        old, new = current.get(device, unlimited), desired.get(device, unlimited)
        if old != new:
            old_line, new_line = fs.render_io_max(device, old), fs.render_io_max(device, new)
            old_keys, new_keys = old_line.split(" ", 1)[1], new_line.split(" ", 1)[1]
            writes.append(_Write(path, new_line, f"io.max {device}: {old_keys} -> {new_keys}"))
    return writes


# --------------------------------------------------------------------------- entry points


def open_cgroup_driver(*, instance: str, layout: CgroupLayout | None = None) -> CgroupDriver:
    """The driver for this host's cgroups (discovered when `layout` is None)."""
    layout = layout or discover_layout()
    if layout.driver == "v2":
        return CgroupV2Driver(instance=instance, layout=layout)
    return CgroupV1Driver(instance=instance, layout=layout)


def procs_files(*, instance: str, env: str, layout: CgroupLayout | None = None) -> tuple[str, ...]:
    """The `cgroup.procs` files to write a pid to, to put it in `env`'s cgroup."""
    return open_cgroup_driver(instance=instance, layout=layout).procs_files(env=env)
