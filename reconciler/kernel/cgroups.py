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
resync of an unchanged environment writes nothing. Values are compared the way the
kernel stores them (memory in whole pages, CPU as quota/period), or a limit the kernel
rounds would be rewritten on every pass.

Teardown: kill (cgroup.kill where available; else SIGKILL to every pid listed in
`cgroup.procs`, through a pidfd re-verified against the listing so a recycled pid is
never hit), wait with a deadline until the cgroup is empty, then rmdir bottom-up.
Zombies do not keep a cgroup populated, so we need not be their parent to finish.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import signal
import time
from collections.abc import Callable, Iterable, Mapping
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
_POLL_MAX = 0.05  # seconds; polls start at 1 ms and double up to this


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


def _mkdir(path: str, changes: list[str]) -> None:
    """Create a cgroup directory (and its parents) unless it exists; note it in `changes`."""
    if os.path.isdir(path):
        return
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        raise KernelError(f"cannot create cgroup {path}: {exc.strerror}") from exc
    changes.append(f"created {path}")


def _sleep(delay: float) -> float:
    time.sleep(delay)
    return min(delay * 2, _POLL_MAX)


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

    def _create(self, env: str) -> list[str]:
        raise NotImplementedError

    def _diff(self, env: str, limits: CgroupLimits) -> list[_Write]:
        raise NotImplementedError

    def _read_limits(self, env: str) -> CgroupLimits:
        raise NotImplementedError

    def _read_usage(self, env: str) -> CgroupUsage:
        raise NotImplementedError

    # -- the Protocol

    def paths(self, *, env: str) -> tuple[str, ...]:
        """Directories that make up the env's cgroup (whether or not they exist)."""
        _check_name(env, what="environment")
        return tuple(os.path.join(parent, env) for parent in self.parents())

    def procs_files(self, *, env: str) -> tuple[str, ...]:
        """The `cgroup.procs` files a process must be written to, to join the env's cgroup."""
        return tuple(os.path.join(path, "cgroup.procs") for path in self.paths(env=env))

    def observe(self) -> Mapping[str, CgroupState]:
        """Every env cgroup under this instance's parents, by env name."""
        names: set[str] = set()
        for parent in self.parents():
            try:
                with os.scandir(parent) as entries:
                    names.update(e.name for e in entries if e.is_dir(follow_symlinks=False))
            except FileNotFoundError:
                continue
        return {name: self._state(name) for name in sorted(names) if _NAME.match(name)}

    def ensure(self, *, env: str, limits: CgroupLimits) -> list[str]:
        """Create the cgroup if missing and write only the limits that differ.

        Every differing limit is attempted; if the kernel refused some, the first refusal
        is raised (as KernelError) after the others were written.
        """
        _check_name(env, what="environment")
        changes = self._create(env)
        failure: KernelError | None = None
        for write in self._diff(env, limits):
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
        unified = self._unified_dir(env)
        if unified is not None:
            kill_file = os.path.join(unified, "cgroup.kill")
            try:
                fs.write_file(kill_file, "1")
            except FileNotFoundError:
                pass  # no such cgroup, or a kernel older than 5.14: signals below
            except OSError as exc:
                if exc.errno != errno.ENODEV:  # removed under our feet
                    raise KernelError(
                        f"cannot kill env {env}: {kill_file}: {exc.strerror}"
                    ) from exc
        # v1 hierarchies have no cgroup.kill, and a process may sit in a v1 directory
        # without being in the unified one (joined by hand): signal whatever is listed.
        _signal_members(self._procs_in_trees(env), signal.SIGKILL)

    def remove(self, *, env: str, timeout: float = 5.0) -> bool:
        """Kill what is left, wait (with a deadline) until empty, remove every directory.

        False if there was nothing to remove. Raises KernelError naming the leftover pids
        if the cgroup does not empty (or cannot be removed) before `timeout` seconds.
        """
        if not any(os.path.isdir(path) for path in self.paths(env=env)):
            return False
        deadline = time.monotonic() + timeout
        delay = 0.001
        while True:
            self.kill(env=env)
            pids = self._members(env)
            if not pids and not self._populated(env):
                break
            if time.monotonic() >= deadline:
                raise self._busy(env, pids, timeout, what="still has processes")
            delay = _sleep(delay)
        for path in self.paths(env=env):
            self._rmdir_tree(path, env=env, deadline=deadline, timeout=timeout)
        return True

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

    def _state(self, env: str) -> CgroupState:
        paths = self.paths(env=env)
        existing = tuple(p for p in paths if os.path.isdir(p))
        return CgroupState(
            env=env,
            paths=existing,
            limits=self._read_limits(env),
            usage=self._read_usage(env),
            complete=len(existing) == len(paths),
        )

    def _procs_in_trees(self, env: str) -> list[str]:
        """Every cgroup.procs file in the env's directories and their sub-cgroups."""
        files: list[str] = []
        for path in self.paths(env=env):
            for dirpath, _dirs, _files in os.walk(path):
                files.append(os.path.join(dirpath, "cgroup.procs"))
        return files

    def _members(self, env: str) -> set[int]:
        return {pid for f in self._procs_in_trees(env) for pid in fs.read_pids(f)}

    def _populated(self, env: str) -> bool:
        # cgroup.events covers the whole subtree, including processes whose pids we cannot
        # see from our pid namespace.
        unified = self._unified_dir(env)
        if unified is None:
            return False
        events = fs.read_file(os.path.join(unified, "cgroup.events")) or ""
        return "populated 1" in events.splitlines()

    def _busy(self, env: str, pids: Iterable[int], timeout: float, *, what: str) -> KernelError:
        listed = ", ".join(str(p) for p in sorted(pids)) or "none visible from here"
        return KernelError(
            f"cgroup of env {env} (instance {self.instance}) {what} after {timeout:g}s "
            f"(pids: {listed}); they may be stuck in uninterruptible I/O: retry the teardown"
        )

    def _rmdir_tree(self, path: str, *, env: str, deadline: float, timeout: float) -> None:
        # Bottom-up, because a workload may have made sub-cgroups of its own; retried,
        # because the kernel can answer EBUSY for a moment after the last process left.
        delay = 0.001
        while True:
            try:
                for dirpath, _dirs, _files in os.walk(path, topdown=False):
                    os.rmdir(dirpath)
                return
            except FileNotFoundError:
                continue  # a level vanished under us: walk again
            except OSError as exc:
                if exc.errno not in (errno.EBUSY, errno.ENOTEMPTY):
                    raise KernelError(
                        f"cannot remove cgroup {path} of env {env}: {exc.strerror}"
                    ) from exc
                if time.monotonic() >= deadline:
                    raise self._busy(
                        env, self._members(env), timeout, what=f"could not be removed ({path})"
                    ) from exc
                self.kill(env=env)
                delay = _sleep(delay)


def _signal_members(procs_files: Iterable[str], signum: int) -> None:
    """Signal every process listed in `procs_files`, safely against pid reuse.

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
        if not pidfds:
            return
        still = {pid for f in files for pid in fs.read_pids(f)}
        for pid, fd in pidfds.items():
            if pid in still:
                with contextlib.suppress(ProcessLookupError):
                    signal.pidfd_send_signal(fd, signum)
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
        self._mounts = tuple(mounts)

    def parents(self) -> tuple[str, ...]:
        """`<mount>/<instance>` for each hierarchy used, plus the unified tree's (hybrid)."""
        extra = (self.layout.unified,) if self.layout.unified else ()
        return tuple(os.path.join(m, self.instance) for m in (*self._mounts, *extra))

    def _dir(self, env: str, controller: str) -> str | None:
        mount = self.layout.v1_mounts.get(controller)
        return None if mount is None else os.path.join(mount, self.instance, env)

    def _unified_dir(self, env: str) -> str | None:
        if self.layout.unified is None:
            return None
        return os.path.join(self.layout.unified, self.instance, env)

    def _create(self, env: str) -> list[str]:
        changes: list[str] = []
        for path in self.paths(env=env):
            _mkdir(path, changes)
        return changes

    def _file(self, env: str, controller: str, name: str) -> str | None:
        directory = self._dir(env, controller)
        return None if directory is None else os.path.join(directory, name)

    def _require(self, env: str, controller: str, what: str) -> str:
        directory = self._dir(env, controller)
        if directory is None:
            raise KernelError(
                f"env {env} sets a {what} limit but the cgroup v1 {controller} controller is "
                f"not mounted; mount it (mount -t cgroup -o {controller} cgroup "
                f"{fs.CGROUP_ROOT}/{controller}) or drop the limit"
            )
        return directory

    def _diff(self, env: str, limits: CgroupLimits) -> list[_Write]:
        return [
            *self._diff_memory(env, limits.memory_bytes),
            *self._diff_cpu(env, limits.cpu_millis),
            *self._diff_pids(env, limits.pids),
            *self._diff_blkio(env, limits.io),
        ]

    def _diff_pids(self, env: str, pids: int | None) -> list[_Write]:
        if pids is not None:
            self._require(env, "pids", "pids")
        path = self._file(env, "pids", "pids.max")
        return [] if path is None else _diff_max(path, pids)

    def _diff_memory(self, env: str, memory_bytes: int | None) -> list[_Write]:
        if memory_bytes is not None:
            self._require(env, "memory", "memory")
        path = self._file(env, "memory", "memory.limit_in_bytes")
        if path is None:
            return []
        current = fs.parse_memory_limit(fs.read_file(path))
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

    def _diff_cpu(self, env: str, millis: int | None) -> list[_Write]:
        if millis is not None:
            self._require(env, "cpu", "cpu")
        quota_file = self._file(env, "cpu", "cpu.cfs_quota_us")
        period_file = self._file(env, "cpu", "cpu.cfs_period_us")
        if quota_file is None or period_file is None:
            return []
        desired = _checked_quota(env, millis)
        quota = int(fs.read_file(quota_file) or -1)
        current = None if quota < 0 else quota
        period = int(fs.read_file(period_file) or fs.CPU_PERIOD_US)
        writes: list[_Write] = []
        # The period only matters under a quota; with none, leave whatever is there.
        if desired is not None and period != fs.CPU_PERIOD_US:
            change = f"cpu.cfs_period_us: {period} -> {fs.CPU_PERIOD_US}"
            writes.append(_Write(period_file, str(fs.CPU_PERIOD_US), change))
        if current != desired or writes:
            old, new = _v1_number(current), _v1_number(desired)
            writes.append(_Write(quota_file, new, f"cpu.cfs_quota_us: {old} -> {new}"))
        return writes

    def _diff_blkio(self, env: str, io: tuple[IoLimit, ...]) -> list[_Write]:
        directory = self._require(env, "blkio", "block I/O") if io else self._dir(env, "blkio")
        if directory is None:
            return []
        desired = _io_by_device(io)
        writes: list[_Write] = []
        for index, (_field, _v2, name) in enumerate(fs.IO_KEYS):
            path = os.path.join(directory, name)
            current = fs.parse_blkio_device_file(fs.read_file(path))
            wanted = {d: v[index] for d, v in desired.items() if v[index] is not None}
            for device in sorted(current.keys() | wanted.keys()):
                old, new = current.get(device, 0), wanted.get(device) or 0
                if old != new:
                    # Writing 0 is how v1 clears a device's limit.
                    change = f"{name} {device}: {old} -> {new}"
                    writes.append(_Write(path, f"{device} {new}", change))
        return writes

    def _read_limits(self, env: str) -> CgroupLimits:
        memory = self._file(env, "memory", "memory.limit_in_bytes")
        quota_file = self._file(env, "cpu", "cpu.cfs_quota_us")
        period_file = self._file(env, "cpu", "cpu.cfs_period_us")
        pids = self._file(env, "pids", "pids.max")
        cpu = None
        if quota_file and period_file:
            quota = fs.read_file(quota_file)
            period = int(fs.read_file(period_file) or fs.CPU_PERIOD_US)
            cpu = fs.cpu_millis(quota_us=None if quota is None else int(quota), period_us=period)
        io: tuple[IoLimit, ...] = ()
        blkio = self._dir(env, "blkio")
        if blkio is not None:
            per_key = [
                fs.parse_blkio_device_file(fs.read_file(os.path.join(blkio, name)))
                for _f, _v2, name in fs.IO_KEYS
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
            memory_bytes=fs.parse_memory_limit(fs.read_file(memory)) if memory else None,
            cpu_millis=cpu,
            pids=fs.parse_max(fs.read_file(pids)) if pids else None,
            io=io,
        )

    def _read_usage(self, env: str) -> CgroupUsage:
        memory = self._file(env, "memory", "memory.usage_in_bytes")
        pids = self._file(env, "pids", "pids.current")
        return CgroupUsage(
            memory_bytes=int((fs.read_file(memory) if memory else None) or 0),
            pids=int((fs.read_file(pids) if pids else None) or 0),
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

    def parents(self) -> tuple[str, ...]:
        """`<unified>/<instance>`."""
        return (os.path.join(self._root, self.instance),)

    def _unified_dir(self, env: str) -> str | None:
        return os.path.join(self._root, self.instance, env)

    def _create(self, env: str) -> list[str]:
        parent = self.parents()[0]
        changes = _enable_controllers(self._root)
        _mkdir(parent, changes)
        changes += _enable_controllers(parent)
        _mkdir(os.path.join(parent, env), changes)
        return changes

    def _diff(self, env: str, limits: CgroupLimits) -> list[_Write]:
        parent = self.parents()[0]
        directory = os.path.join(parent, env)
        control = fs.read_file(os.path.join(parent, "cgroup.subtree_control"))
        enabled = set((control or "").split())
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
        writes: list[_Write] = []
        if "memory" in enabled:
            path = os.path.join(directory, "memory.max")
            current = fs.parse_memory_limit(fs.read_file(path))
            desired = None if limits.memory_bytes is None else fs.round_to_page(limits.memory_bytes)
            if current != desired:
                old, new = fs.render_max(current), fs.render_max(desired)
                writes.append(_Write(path, new, f"memory.max: {old} -> {new}"))
        if "cpu" in enabled:
            path = os.path.join(directory, "cpu.max")
            quota, period = fs.parse_cpu_max(fs.read_file(path))
            desired_quota = _checked_quota(env, limits.cpu_millis)
            same = quota == desired_quota and (quota is None or period == fs.CPU_PERIOD_US)
            if not same:
                old = f"{fs.render_max(quota)} {period}"
                new = fs.render_cpu_max(desired_quota)
                writes.append(_Write(path, new, f"cpu.max: {old} -> {new}"))
        if "pids" in enabled:
            writes += _diff_max(os.path.join(directory, "pids.max"), limits.pids)
        if "io" in enabled:
            writes += _diff_io_max(os.path.join(directory, "io.max"), limits.io)
        return writes

    def _read_limits(self, env: str) -> CgroupLimits:
        directory = os.path.join(self.parents()[0], env)
        quota, period = fs.parse_cpu_max(fs.read_file(os.path.join(directory, "cpu.max")))
        io = fs.parse_io_max(fs.read_file(os.path.join(directory, "io.max")))
        memory = fs.read_file(os.path.join(directory, "memory.max"))
        return CgroupLimits(
            memory_bytes=fs.parse_memory_limit(memory),
            cpu_millis=fs.cpu_millis(quota_us=quota, period_us=period),
            pids=fs.parse_max(fs.read_file(os.path.join(directory, "pids.max"))),
            io=tuple(IoLimit(device, *values) for device, values in sorted(io.items())),
        )

    def _read_usage(self, env: str) -> CgroupUsage:
        directory = os.path.join(self.parents()[0], env)
        memory = fs.read_file(os.path.join(directory, "memory.current"))
        pids = fs.read_file(os.path.join(directory, "pids.current"))
        return CgroupUsage(memory_bytes=int(memory or 0), pids=int(pids or 0))


def _enable_controllers(directory: str) -> list[str]:
    """Switch our controllers on for `directory`'s children, if available and not yet on.

    Only what is missing is written, so the root's subtree_control (shared with the rest
    of the host) is left alone once it already has what we need.
    """
    available = set((fs.read_file(os.path.join(directory, "cgroup.controllers")) or "").split())
    control = os.path.join(directory, "cgroup.subtree_control")
    enabled = set((fs.read_file(control) or "").split())
    missing = [c for c in V2_CONTROLLERS if c in available and c not in enabled]
    if not missing:
        return []
    value = " ".join(f"+{c}" for c in missing)
    try:
        fs.write_file(control, value)
    except OSError as exc:
        raise KernelError(
            f"cannot enable cgroup controllers ({value}) in {control}: {exc.strerror}; "
            "a cgroup with processes of its own cannot delegate controllers (v2 'no internal "
            "processes' rule)"
        ) from exc
    return [f"{control}: {value}"]


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


def _diff_max(path: str, desired: int | None) -> list[_Write]:
    current = fs.parse_max(fs.read_file(path))
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


def _diff_io_max(path: str, io: tuple[IoLimit, ...]) -> list[_Write]:
    current = fs.parse_io_max(fs.read_file(path))
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
