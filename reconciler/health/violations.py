"""Violations: what an environment did that its boundaries should not have allowed.

Five detectors, each reading what the kernel already counts, once per policy pass:

| type                | evidence                                                                 |
|---------------------|--------------------------------------------------------------------------|
| `oom`               | the env cgroup's OOM-kill counter grew: `oom_kill` in v2 `memory.events`  |
|                     | or in v1 `memory.oom_control`                                            |
| `pids-limit`        | fork attempts refused at `pids.max`: `max` in `pids.events` grew         |
| `escape`            | a process inside the env's network namespace that is not a member of     |
|                     | the env's cgroup (in every hierarchy), e.g. `ip netns exec` by hand      |
| `denied-connection` | the isolation rules dropped packets with the env's address as source     |
|                     | (`FirewallDriver.denied_counts()`, per (source, destination))             |
| `cpu-throttled`     | `nr_throttled / nr_periods` of `cpu.stat` over the pass above a ratio     |
|                     | (informational; reported when it starts, again only after it calmed down) |

Counters are compared with the previous pass (`CounterTracker`): the increment is the
violation. The first pass only takes a baseline, so a restarted controller does not
report again what happened before it started; a counter first seen later (a new env, a
new (source, destination) pair) counts from zero; a counter that went *down* was reset
(the cgroup or table was recreated) and counts from zero again.

Escapes are found by scanning /proc once per pass: one `stat` of `/proc/PID/ns/net` per
process is the whole cost for every process that is not in one of our namespaces (the
prefilter: (st_dev, st_ino) looked up in the set of our pins; nsfs gives each namespace
one inode, and comparing the device too makes an inode number from another filesystem
never match). Only the few processes inside an env's namespace cost more: their start
time (identity: pids are reused) and the env's `cgroup.procs` listings. A process younger
than `min_age` is left for the next pass: the holder's first fork joins the netns a few
microseconds before the cgroup, and must never look like an escape.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Generic, Literal, TypeVar

from reconciler.kernel.types import ProcessRef
from reconciler.state.procinfo import process_start_time

ViolationType = Literal["oom", "pids-limit", "escape", "denied-connection", "cpu-throttled"]
VIOLATION_TYPES: tuple[ViolationType, ...] = (
    "oom",
    "pids-limit",
    "escape",
    "denied-connection",
    "cpu-throttled",
)
NsId = tuple[int, int]  # (st_dev, st_ino) of a namespace: its identity
K = TypeVar("K", bound=Hashable)
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Violation:
    """One detected violation of one environment."""

    env: str
    type: ViolationType
    detail: str
    offender: ProcessRef | None = None  # escape: the process found outside the cgroup


# --------------------------------------------------------------------------- counters (pure)


def counter_delta(previous: int | None, current: int) -> int:
    """How much a kernel counter grew since `previous` (None: first seen, counts from 0).

    A counter that went down was reset (its cgroup or set element was recreated): what
    it shows now is all new.
    """
    if previous is None or current < previous:
        return current
    return current - previous


class CounterTracker(Generic[K]):
    """Remembers counters between passes and hands out their increments."""

    def __init__(self) -> None:
        self._last: dict[K, int] = {}
        self._primed = False

    @property
    def primed(self) -> bool:
        """True once a baseline was taken."""
        return self._primed

    def update(self, values: Mapping[K, int], *, forget_missing: bool = False) -> dict[K, int]:
        """Positive increments since the last update; the first update is the baseline.

        Keys absent from `values` keep their last value (a counter that could not be read
        this once is not "new" next time), unless `forget_missing`, for sources that list
        every live counter at once (the firewall's set).
        """
        deltas: dict[K, int] = {}
        if self._primed:
            for key, value in values.items():
                delta = counter_delta(self._last.get(key), value)
                if delta > 0:
                    deltas[key] = delta
        if forget_missing:
            self._last = dict(values)
        else:
            self._last.update(values)
        self._primed = True
        return deltas

    def retain(self, keep: Callable[[K], bool]) -> None:
        """Forget the counters `keep` rejects (environments that are gone)."""
        self._last = {k: v for k, v in self._last.items() if keep(k)}


def throttle_ratio(
    previous: tuple[int, int] | None, current: tuple[int, int], *, min_periods: int
) -> float | None:
    """Share of CFS periods throttled between two `(nr_periods, nr_throttled)` readings.

    None when there is no previous reading, the counters were reset, or too few periods
    passed to say anything (an idle env with a quota runs few periods).
    """
    if previous is None:
        return None
    periods = current[0] - previous[0]
    throttled = current[1] - previous[1]
    if periods < max(min_periods, 1) or throttled < 0:
        return None
    return throttled / periods


@dataclass
class ThrottleState:
    """Edge detection for cpu-throttled: report when it starts, re-arm once it calmed down."""

    last: tuple[int, int] | None = None
    throttled: bool = False


def throttle_step(
    state: ThrottleState, current: tuple[int, int], *, ratio: float, min_periods: int
) -> float | None:
    """Feed one reading; the ratio when throttling *starts* (else None). Mutates `state`."""
    measured = throttle_ratio(state.last, current, min_periods=min_periods)
    state.last = current
    if measured is None:
        return None
    if not state.throttled and measured > ratio:
        state.throttled = True
        return measured
    if state.throttled and measured < ratio / 2:  # hysteresis: no flapping at the edge
        state.throttled = False
    return None


# --------------------------------------------------------------------------- cgroup files


def parse_keyed(text: str | None) -> dict[str, int]:
    """A flat keyed cgroup file (`key value` lines) → {key: int}; junk lines skipped."""
    values: dict[str, int] = {}
    for line in (text or "").splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("-").isdigit():
            values[parts[0]] = int(parts[1])
    return values


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="ascii") as handle:
            return handle.read()
    except OSError:
        return None  # gone (ENOENT, ENODEV: removed while open): nothing to count


@dataclass(frozen=True)
class CounterFiles:
    """Where one env's counters are: (file, key) per counter, None where there is none."""

    oom: tuple[str, str] | None = None
    pids: tuple[str, str] | None = None
    cpu: str | None = None  # a cpu.stat with nr_periods / nr_throttled


def find_counter_files(dirs: Sequence[str]) -> CounterFiles:
    """Look through the env's cgroup directories for the files that count violations.

    v2 keeps all in one directory; v1 one per controller; on a hybrid host the unified
    directory has a `cpu.stat` without throttling counters, which is why cpu.stat is
    chosen by content.
    """
    oom: tuple[str, str] | None = None
    pids: tuple[str, str] | None = None
    cpu: str | None = None
    for directory in dirs:
        events = os.path.join(directory, "memory.events")
        control = os.path.join(directory, "memory.oom_control")
        if oom is None and os.path.exists(events):
            oom = (events, "oom_kill")
        elif oom is None and os.path.exists(control):
            oom = (control, "oom_kill")
        pids_events = os.path.join(directory, "pids.events")
        if pids is None and os.path.exists(pids_events):
            pids = (pids_events, "max")
        stat = os.path.join(directory, "cpu.stat")
        if cpu is None and "nr_throttled" in parse_keyed(_read(stat)):
            cpu = stat
    return CounterFiles(oom=oom, pids=pids, cpu=cpu)


@dataclass(frozen=True)
class CgroupCounters:
    """One reading of an env's counters (None: not available)."""

    oom_kills: int | None = None
    pids_refused: int | None = None
    cpu: tuple[int, int] | None = None  # (nr_periods, nr_throttled)


def read_counters(files: CounterFiles) -> CgroupCounters:
    """Read the counters `files` names; a file that vanished reads as None."""

    def keyed(spec: tuple[str, str] | None) -> int | None:
        if spec is None:
            return None
        text = _read(spec[0])
        return None if text is None else parse_keyed(text).get(spec[1])

    cpu: tuple[int, int] | None = None
    if files.cpu is not None:
        stat = parse_keyed(_read(files.cpu))
        if "nr_periods" in stat and "nr_throttled" in stat:
            cpu = (stat["nr_periods"], stat["nr_throttled"])
    return CgroupCounters(oom_kills=keyed(files.oom), pids_refused=keyed(files.pids), cpu=cpu)


# --------------------------------------------------------------------------- escapes


@dataclass(frozen=True)
class NetnsMember:
    """A process found inside one of our environments' network namespaces."""

    env: str
    pid: int
    start_time: int  # clock ticks since boot: with the pid, its identity
    comm: str

    @property
    def ref(self) -> ProcessRef:
        """Its identity as a ProcessRef."""
        return ProcessRef(pid=self.pid, start_time=self.start_time)


def match_netns(namespaces: Iterable[tuple[int, NsId]], pins: Mapping[NsId, str]) -> dict[int, str]:
    """pid → env for the processes whose network namespace is one of `pins` (dev AND inode)."""
    return {pid: pins[ns] for pid, ns in namespaces if ns in pins}


def old_enough(start_time: int, *, uptime: float, min_age: float, hz: int = _CLOCK_TICKS) -> bool:
    """True if a process that started at `start_time` (ticks) has run `min_age` seconds."""
    return uptime - start_time / hz >= min_age


def outside_cgroup(
    pids: Mapping[int, str], cgroups: Mapping[str, Sequence[frozenset[int]]]
) -> dict[int, str]:
    """pid → env for the processes missing from any of their env's cgroup hierarchies.

    `cgroups`: env → one pid set per hierarchy directory (with its sub-cgroups). An env
    without any directory (cgroup gone) has nothing to compare with: no verdict.
    """
    found: dict[int, str] = {}
    for pid, env in pids.items():
        hierarchies = cgroups.get(env)
        if hierarchies and any(pid not in members for members in hierarchies):
            found[pid] = env
    return found


def uptime() -> float:
    """Seconds since boot (/proc/uptime), the clock process start times count in."""
    with open("/proc/uptime", encoding="ascii") as handle:
        return float(handle.read().split()[0])


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm", encoding="utf-8", errors="replace") as handle:
            return handle.read().strip()
    except OSError:
        return "?"


def _namespaces(skip: frozenset[int]) -> Iterator[tuple[int, NsId]]:
    with os.scandir("/proc") as entries:
        for entry in entries:
            if not entry.name.isdigit():
                continue
            pid = int(entry.name)
            if pid in skip:
                continue
            try:
                st = os.stat(f"/proc/{pid}/ns/net")
            except OSError:
                continue  # exited, or a kernel thread we may not look at
            yield pid, (st.st_dev, st.st_ino)


def scan_netns(pins: Mapping[NsId, str], *, skip: frozenset[int] = frozenset()) -> dict[int, str]:
    """pid → env for every process (thread-group leader) inside one of `pins`.

    One `stat` per process, and nothing more for those in no namespace of ours.
    """
    return match_netns(_namespaces(skip), pins) if pins else {}


def identify(pid: int, env: str, *, ns: NsId, min_age: float, now: float) -> NetnsMember | None:
    """The identity of `pid` if it still runs inside `ns` and is old enough to judge.

    `now`: `uptime()`. None for a process that is gone, moved, or younger than `min_age`.
    """
    start_time = process_start_time(pid)
    if start_time is None or not old_enough(start_time, uptime=now, min_age=min_age):
        return None
    member = NetnsMember(env=env, pid=pid, start_time=start_time, comm=_comm(pid))
    return member if still_in_netns(member.ref, ns) else None


def cgroup_pids(directory: str) -> frozenset[int]:
    """Every pid in a cgroup directory and its sub-cgroups (empty if it is gone)."""
    pids: set[int] = set()
    for path, _dirs, _files in os.walk(directory):
        text = _read(os.path.join(path, "cgroup.procs"))
        if text:
            pids.update(int(line) for line in text.split() if line.isdigit())
    return frozenset(pids)


def still_in_netns(ref: ProcessRef, ns: NsId) -> bool:
    """Re-check before acting: `ref` still runs (pid + start time) inside namespace `ns`."""
    try:
        st = os.stat(f"/proc/{ref.pid}/ns/net")
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == ns and process_start_time(ref.pid) == ref.start_time


def describe_escape(member: NetnsMember) -> str:
    """The detail line of an escape violation."""
    return (
        f"pid {member.pid} ({member.comm}) runs inside the environment's network namespace "
        "but outside its cgroup (started behind the reconciler's back, e.g. `ip netns exec`)"
    )


# --------------------------------------------------------------------------- denied connections


def denied_by_env(
    deltas: Mapping[tuple[str, str], int], env_of: Mapping[str, str]
) -> dict[str, dict[str, int]]:
    """New drops per source env: env → {destination address: packets}."""
    found: dict[str, dict[str, int]] = {}
    for (source, destination), packets in deltas.items():
        env = env_of.get(source)
        if env is not None and packets > 0:
            per = found.setdefault(env, {})
            per[destination] = per.get(destination, 0) + packets
    return found


def describe_denied(per_destination: Mapping[str, int], env_of: Mapping[str, str]) -> str:
    """`3 packets to 10.0.0.12 (env b), 1 packet to 10.0.0.13` (largest first)."""
    parts = []
    for destination, packets in sorted(per_destination.items(), key=lambda item: -item[1]):
        who = f" (env {env_of[destination]})" if destination in env_of else ""
        noun = "packet" if packets == 1 else "packets"
        parts.append(f"{packets} {noun} to {destination}{who}")
    return "dropped by the isolation rules: " + ", ".join(parts)
