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

Escapes are found from a listing of /proc once per pass (`NetnsScanner`). A process's
network namespace is `stat("/proc/PID/ns/net")`: (st_dev, st_ino), looked up in the set
of our pins (nsfs gives each namespace one inode, and comparing the device too makes an
inode number from another filesystem never match). That stat is only made for processes
the scanner has not known for long: each listing entry carries the inode of its
/proc/PID directory (`d_ino`, free with the listing), which procfs makes anew for every
process, so a recycled pid is a new entry; a new entry is stat'ed on every pass until it
was stat'ed at an age of at least `young` seconds (2 s; so at least on two passes), and
keeps that namespace afterwards. Processes inside an env's namespace are then judged
against the env's cgroup listings, and one found inside the cgroup is not judged again
(the monitor's member cache). What the caches could hide - a process that enters an
env's namespace by setns(2) later than that in its life, or a judged member moved out
of the env's cgroup by hand - is found by the full rescan every `escape_rescan` seconds
(default 60): the detection bound for those two cases. A new process (`ip netns exec`,
`nsenter`, a fork inside) is judged within one pass or two, as before (a process
younger than `min_age` always waited for the next pass).

A process younger than `min_age` is left for the next pass: the holder's first fork
joins the netns a few microseconds before the cgroup, and must never look like an escape.

Counter files are read with one open/read/close each (no buffered text layer: a pass
reads three files per environment).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
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
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None  # gone: nothing to count
    try:
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        return b"".join(chunks).decode("ascii", errors="replace")
    except OSError:
        return None  # ENODEV: removed while open
    finally:
        os.close(fd)


def read_pids(path: str) -> frozenset[int] | None:
    """The pids a `cgroup.procs` file lists (None: there is no such file)."""
    text = _read(path)
    if text is None:
        return None
    return frozenset(int(p) for p in text.split() if p.isdigit())


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


def _netns_of(pid: int) -> NsId | None:
    try:
        st = os.stat(f"/proc/{pid}/ns/net")
    except OSError:
        return None  # exited, or a kernel thread we may not look at
    return (st.st_dev, st.st_ino)


@dataclass(frozen=True)
class _Known:
    entry: int  # d_ino of /proc/PID: a new one for every process that gets the pid
    netns: NsId | None
    since: float  # when this entry was first listed (the scanner's clock)
    settled: bool = False  # stat'ed when it was at least `young` seconds old


@dataclass(frozen=True)
class Seen:
    """One process as the scanner saw it: its /proc entry and network namespace."""

    entry: int
    netns: NsId


class NetnsScanner:
    """Which process is in which network namespace, re-stating only what may have changed.

    See the module docstring. An entry keeps its namespace from an earlier stat once it
    was stat'ed at an age of at least `young` seconds: processes enter a namespace right
    after they are forked (`ip netns exec`, `nsenter`, `unshare`), so a new entry is
    looked at again on every scan until then - at least twice, however far apart the
    scans are. `full=True` stats everything.
    """

    def __init__(self, *, young: float = 2.0) -> None:
        self.young = young
        self._known: dict[int, _Known] = {}

    def scan(
        self, *, now: float, full: bool, skip: frozenset[int] = frozenset()
    ) -> dict[int, Seen]:
        """pid → (entry, netns) of every process (thread-group leader) listed now."""
        known: dict[int, _Known] = {}
        seen: dict[int, Seen] = {}
        with os.scandir("/proc") as entries:
            for entry in entries:
                if not entry.name.isdigit():
                    continue
                pid = int(entry.name)
                if pid in skip:
                    continue
                inode = entry.inode()
                before = self._known.get(pid)
                if before is None or before.entry != inode:
                    before = _Known(entry=inode, netns=None, since=now)
                if full or not before.settled:
                    settled = now - before.since >= self.young
                    current = replace(before, netns=_netns_of(pid), settled=settled)
                else:
                    current = before
                known[pid] = current
                if current.netns is not None:
                    seen[pid] = Seen(entry=inode, netns=current.netns)
        self._known = known
        return seen


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
        pids |= read_pids(os.path.join(path, "cgroup.procs")) or frozenset()
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
