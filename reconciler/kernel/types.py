"""Value objects and driver Protocols shared by the kernel drivers and the engine.

The engine never talks to the kernel directly: it reads an `Observation` (one pass over
the host) and calls drivers through these Protocols. Tests of the engine substitute
in-memory fakes; the real drivers live in sibling modules (`netlink`, `netns`,
`cgroups`, `holder`).

Ownership: every host-side object we create carries a tag that proves it is ours
(`ifalias` on links, a name prefix on namespaces, the instance's parent on cgroups).
`owner_tag()` renders the link tag; drivers refuse to delete a link whose tag differs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

OWNER_PREFIX = "reconciler"


def owner_tag(*, instance: str, kind: Literal["network", "env"], name: str) -> str:
    """The ifalias value that proves a link belongs to (instance, kind, name)."""
    return f"{OWNER_PREFIX}:{instance}:{kind}:{name}"


def parse_owner_tag(alias: str | None) -> tuple[str, str, str] | None:
    """(instance, kind, name) for a tag made by `owner_tag`, else None."""
    if not alias:
        return None
    parts = alias.split(":")
    if len(parts) != 4 or parts[0] != OWNER_PREFIX or parts[2] not in ("network", "env"):
        return None
    return parts[1], parts[2], parts[3]


# --------------------------------------------------------------------------- links


@dataclass(frozen=True)
class LinkState:
    """One network interface as the kernel shows it."""

    name: str
    index: int
    kind: str | None  # "bridge", "veth", None for plain devices
    up: bool  # IFF_UP administratively set
    master: str | None  # name of the bridge it is enslaved to
    alias: str | None  # ifalias: our ownership tag
    addresses: tuple[str, ...] = ()  # IPv4 "a.b.c.d/len"


@dataclass(frozen=True)
class PinIdentity:
    """Which namespace a pin refers to: the nsfs inode and device."""

    inode: int
    dev: int


@dataclass(frozen=True)
class EnvLinkSpec:
    """What one environment's link must look like (see `NetworkDriver.ensure_env_link`)."""

    netns: str  # pinned namespace name, where the peer lives as eth0
    host_name: str  # host end of the veth
    alias: str  # ownership tag of the host end
    bridge: str  # the network's bridge, master of the host end
    address_cidr: str  # eth0's only IPv4 address
    gateway: str  # default route via


@dataclass(frozen=True)
class NetnsState:
    """A pinned network namespace and what lives inside it."""

    name: str  # name under /run/netns
    inode: int  # st_ino of the pin: the namespace identity (with dev)
    dev: int
    links: Mapping[str, LinkState] = field(default_factory=dict)  # by name: "lo", "eth0"
    default_gateway: str | None = None  # IPv4 of the default route, if any


@dataclass(frozen=True)
class NetworkObservation:
    """One observation pass over links and namespaces."""

    host_links: Mapping[str, LinkState]  # by name, host netns
    netns: Mapping[str, NetnsState]  # by name, only namespaces we were asked to look into


class NetworkDriver(Protocol):
    """Bridges, veth pairs, addresses, routes and pinned network namespaces."""

    def observe(self, *, netns_names: Sequence[str]) -> NetworkObservation:
        """Dump host links/addresses once, and links/addresses/routes inside each named netns.

        Names that are not pinned under /run/netns are simply absent from the result.
        """
        ...

    def ensure_bridge(self, *, name: str, gateway_cidr: str, alias: str) -> list[str]:
        """Create or repair a bridge: up, tagged with `alias`, with exactly `gateway_cidr`.

        Returns a human-readable list of the changes made (empty: nothing was written).
        Raises OwnershipError if a link of that name exists with another alias.
        """
        ...

    def remove_bridge(self, *, name: str, alias: str) -> bool:
        """Delete the bridge if it exists and carries `alias`; True if something was removed."""
        ...

    def ensure_netns(self, *, name: str, alias: str | None = None) -> NetnsState:
        """Create (or adopt) the namespace pinned at /run/netns/<name>, with `lo` up and,
        given `alias`, tagged with it (on `lo`: the tag lives and dies with the namespace)."""
        ...

    def ensure_netns_many(
        self, items: Sequence[tuple[str, str | None]]
    ) -> Mapping[str, PinIdentity | Exception]:
        """`ensure_netns` for many (name, alias) pairs at once: each name's identity, or
        the error that stopped that one (the others carry on)."""
        ...

    def remove_netns(
        self, *, name: str, inode: int | None = None, alias: str | None = None
    ) -> bool:
        """Unpin and forget /run/netns/<name>; True if it existed.

        With `inode` (from the inventory), refuse (OwnershipError) when the pin is now
        another namespace, unless its `lo` carries `alias`: a name alone proves nothing.
        """
        ...

    def ensure_env_link(
        self,
        *,
        netns: str,
        host_name: str,
        alias: str,
        bridge: str,
        address_cidr: str,
        gateway: str,
    ) -> list[str]:
        """Create or repair the env's veth pair and addressing.

        Host end `host_name`: tagged with `alias`, enslaved to `bridge`, up. Peer: `eth0`
        inside `netns` with exactly `address_cidr`, up; `lo` up; default route via
        `gateway`. Returns the list of changes made.
        """
        ...

    def ensure_env_links(self, specs: Sequence[EnvLinkSpec]) -> Mapping[str, list[str] | Exception]:
        """`ensure_env_link` for many envs at once (batched when their namespaces are
        fresh); by host veth name: the changes made, or the error that stopped that env."""
        ...

    def remove_env_link(self, *, host_name: str, alias: str) -> bool:
        """Delete the host veth (its peer goes with it) if it carries `alias`."""
        ...

    def wait_links_gone(self, names: Sequence[str], *, timeout: float) -> set[str]:
        """Poll until no host link of `names` is left (or `timeout`); the names left."""
        ...

    def close(self) -> None:
        """Release long-lived sockets."""
        ...


# --------------------------------------------------------------------------- cgroups


@dataclass(frozen=True)
class IoLimit:
    """Block I/O throttling for one device; None means unlimited."""

    device: str  # "MAJ:MIN"
    read_bps: int | None = None
    write_bps: int | None = None
    read_iops: int | None = None
    write_iops: int | None = None


@dataclass(frozen=True)
class CgroupLimits:
    """Resource limits of one environment; None means unlimited."""

    memory_bytes: int | None = None
    cpu_millis: int | None = None  # 500 = half a CPU (quota/period)
    pids: int | None = None
    io: tuple[IoLimit, ...] = ()


@dataclass(frozen=True)
class CgroupUsage:
    """Live usage read from the cgroup files."""

    memory_bytes: int = 0
    pids: int = 0


@dataclass(frozen=True)
class CgroupState:
    """One environment's cgroup as the kernel shows it."""

    env: str
    paths: tuple[str, ...]  # every directory that makes up this cgroup (v1: one per controller)
    limits: CgroupLimits
    usage: CgroupUsage
    complete: bool  # all directories exist (v1: a controller dir may have been removed)


class CgroupDriver(Protocol):
    """Per-environment cgroups under the instance's parent; v1 and v2 behind one interface."""

    @property
    def driver(self) -> Literal["v1", "v2"]: ...

    def paths(self, *, env: str) -> tuple[str, ...]:
        """Directories that make up the env's cgroup (whether or not they exist)."""
        ...

    def procs_files(self, *, env: str) -> tuple[str, ...]:
        """The `cgroup.procs` files a process must be written to, to join the env's cgroup."""
        ...

    def observe(self, *, usage: bool = True) -> Mapping[str, CgroupState]:
        """Every env cgroup under this instance's parent, by env name (live usage read
        only when `usage`: planning needs the limits alone)."""
        ...

    def env_names(self) -> list[str]:
        """Names of the env cgroups under this instance's parent (one listing)."""
        ...

    def ensure(self, *, env: str, limits: CgroupLimits) -> list[str]:
        """Create the cgroup if missing and write only the limits that differ.

        Returns the changes made (empty: nothing written). Raises KernelError with a clear
        message when the kernel refuses a limit (v1 memory below usage: EBUSY).
        """
        ...

    def kill(self, *, env: str) -> None:
        """Kill every process in the env's cgroup (cgroup.kill where available)."""
        ...

    def remove(self, *, env: str, timeout: float = 5.0) -> bool:
        """Kill what is left, wait (with a deadline) until empty, remove every directory."""
        ...

    def remove_many(
        self, envs: Sequence[str], *, timeout: float = 5.0
    ) -> Mapping[str, bool | Exception]:
        """`remove` for many envs: kill all, one wait, remove all; per env True (removed),
        False (already gone) or the error that stopped it."""
        ...

    def remove_parent(self) -> None:
        """Remove the instance's parent directories when they are empty."""
        ...


# --------------------------------------------------------------------------- firewall


class FirewallDriver(Protocol):
    """The instance's nftables isolation plus the bridge/port knobs it relies on.

    The spec type is `reconciler.kernel.nftrules.IsolationSpec` (kept out of this module's
    imports so the Protocols stay dependency-free).
    """

    def differences(self, spec: Any) -> list[str]:
        """What `ensure(spec)` would change (empty: in sync)."""
        ...

    def ensure(self, spec: Any) -> list[str]:
        """Make the tables match `spec` in one transaction; [] when nothing was written."""
        ...

    def remove(self) -> bool:
        """Delete the instance's tables."""
        ...

    def denied_counts(self) -> dict[tuple[str, str], int]:
        """Dropped packets per (source, destination) address."""
        ...

    def ensure_bridge_flags(self, *, bridge: str) -> list[str]:
        """Per-bridge forwarding and proxy ARP; returns the changes."""
        ...

    def ensure_port_flags(self, *, bridge: str, ports: Sequence[str]) -> list[str]:
        """Bridge ports isolated; returns the changes."""
        ...

    def close(self) -> None:
        """Release the nftables context; idempotent."""
        ...


# --------------------------------------------------------------------------- holder


@dataclass(frozen=True)
class ProcessRef:
    """A process we started: pid plus its start time (clock ticks since boot, /proc/PID/stat
    field 22), which together prove identity because pids are reused."""

    pid: int
    start_time: int


@dataclass(frozen=True)
class HolderSpec:
    """What the env's holder process must be set up with."""

    env: str
    netns_path: str  # /run/netns/<name>; joined first
    hostname: str
    namespaces: frozenset[str]  # subset of {"net","uts","ipc","mnt","pid"}
    cgroup_procs: tuple[str, ...]  # cgroup.procs files to join before exec


class HolderDriver(Protocol):
    """The per-environment holder: pid 1 of the env's pid namespace, owner of uts/ipc/mnt."""

    def spawn(self, spec: HolderSpec) -> ProcessRef:
        """Start the holder (detached: not our child) and return its identity."""
        ...

    def spawn_many(self, specs: Sequence[HolderSpec]) -> Sequence[ProcessRef | Exception]:
        """`spawn` for many envs, pipelined; per spec (in order) its ref or its error."""
        ...

    def stop_many(
        self, refs: Sequence[ProcessRef], *, timeout: float = 5.0
    ) -> Sequence[Exception | None]:
        """`stop` for many holders: signal all, one wait; per ref (in order) None or
        the error that stopped it."""
        ...

    def start(self) -> None:
        """Get ready to spawn (boot the forker now, so it overlaps other work)."""
        ...

    def close(self) -> None:
        """Release what spawning keeps (the forker process); idempotent."""
        ...

    def find(self, spec: HolderSpec) -> ProcessRef | None:
        """The live holder of the env (in its cgroup and netns) when no record names it."""
        ...

    def alive(self, ref: ProcessRef) -> bool:
        """True if `ref.pid` is running and still has `ref.start_time`."""
        ...

    def stop(self, ref: ProcessRef, *, timeout: float = 5.0) -> None:
        """Terminate the holder (and with it its pid namespace) if `ref` is still it."""
        ...
