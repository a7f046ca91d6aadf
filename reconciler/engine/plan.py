"""Plan: desired + recorded + observed -> an ordered, explained list of changes. Pure, no I/O.

Like Terraform's plan, every change says what will happen and why:

- `create`: declared, not recorded;
- `update`: recorded and declared, converged in place (a field that can change live, or
  drift the kernel shows: a deleted veth, a limit changed by hand, a dead holder);
- `recreate`: a field that cannot change live (hostname, namespaces, network, mounts,
  a network's subnet/gateway/bridge) — the reason names it with "forces replacement";
- `delete`: recorded, no longer declared, and not protected by a file that failed to load;
- `noop`: nothing to do.

Order: networks are created before the environments that use them, and deleted after.
"""

from __future__ import annotations

import ipaddress
import json
import resource
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from reconciler.engine.desired import Desired, DesiredEnvironment, DesiredNetwork
from reconciler.engine.observe import Observation
from reconciler.engine.workloads import plan_reasons
from reconciler.kernel.types import CgroupLimits, CgroupState, LinkState, owner_tag
from reconciler.manifests.quantities import format_bytes, format_cpu
from reconciler.state.model import EnvironmentRecord, NetworkRecord, StateDocument

PLAN_FORMAT_VERSION = 1
PAGE_SIZE = resource.getpagesize()
ENV_REPLACEMENT_FIELDS = ("hostname", "namespaces", "network.name", "mounts")
NETWORK_REPLACEMENT_FIELDS = ("subnet", "gateway", "bridge")


class Action(StrEnum):
    """What apply will do to one object."""

    CREATE = "create"
    UPDATE = "update"
    RECREATE = "recreate"
    DELETE = "delete"
    NOOP = "noop"


@dataclass(frozen=True)
class Change:
    """One object's planned action and the reasons for it."""

    kind: str
    name: str
    action: Action
    reasons: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        """The contract's `plan -o json` change object."""
        return {
            "kind": self.kind,
            "name": self.name,
            "action": str(self.action),
            "reasons": list(self.reasons),
        }


@dataclass(frozen=True)
class Plan:
    """An ordered list of changes (noops included, so a plan lists every object)."""

    changes: tuple[Change, ...] = ()
    addresses: Mapping[str, str] = field(default_factory=dict)  # env -> "a.b.c.d/len"
    address_failures: Mapping[str, str] = field(default_factory=dict)

    @property
    def has_changes(self) -> bool:
        """True if apply would change anything."""
        return any(change.action is not Action.NOOP for change in self.changes)

    def summary(self) -> dict[str, int]:
        """Counts per action, as in the contract."""
        counts = {"create": 0, "update": 0, "recreate": 0, "delete": 0}
        for change in self.changes:
            if change.action is not Action.NOOP:
                counts[str(change.action)] += 1
        return counts

    def get(self, kind: str, name: str) -> Change | None:
        """The change for one object, if planned."""
        return next((c for c in self.changes if c.kind == kind and c.name == name), None)

    def to_json(self) -> dict[str, Any]:
        """The contract's `plan -o json` document."""
        return {
            "formatVersion": PLAN_FORMAT_VERSION,
            "changes": [change.to_json() for change in self.changes],
            "summary": self.summary(),
        }


# --------------------------------------------------------------------------- entry point


def make_plan(
    *,
    instance: str,
    desired: Desired,
    recorded: StateDocument,
    observed: Observation,
    addresses: Mapping[str, str],
    address_failures: Mapping[str, str] | None = None,
    now: float | None = None,
) -> Plan:
    """Compare the three views and classify every object (`now`: epoch seconds, for back-off)."""
    now = time.time() if now is None else now
    network_changes: dict[str, Change] = {}
    for name in sorted(set(desired.networks) | set(recorded.networks)):
        change = _plan_network(
            instance=instance,
            name=name,
            want=desired.networks.get(name),
            have=recorded.networks.get(name),
            desired=desired,
            recorded=recorded,
            observed=observed,
        )
        if change is not None:
            network_changes[name] = change
    env_changes: dict[str, Change] = {}
    for name in sorted(set(desired.environments) | set(recorded.environments)):
        change = _plan_environment(
            instance=instance,
            name=name,
            want=desired.environments.get(name),
            have=recorded.environments.get(name),
            desired=desired,
            observed=observed,
            address=addresses.get(name),
            bridge=_bridge_for(desired, desired.environments.get(name)),
            replaced_networks={
                n for n, c in network_changes.items() if c.action is Action.RECREATE
            },
            now=now,
        )
        if change is not None:
            env_changes[name] = change
    ordered = _order(network_changes, env_changes)
    return Plan(
        changes=tuple(ordered),
        addresses=dict(addresses),
        address_failures=dict(address_failures or {}),
    )


def _bridge_for(desired: Desired, env: DesiredEnvironment | None) -> str | None:
    if env is None or env.network is None:
        return None
    network = desired.networks.get(env.network)
    return network.bridge if network else None


def _order(networks: Mapping[str, Change], environments: Mapping[str, Change]) -> Iterator[Change]:
    """Networks first (create/update/recreate/noop), environments, then network deletes."""
    for change in networks.values():
        if change.action is not Action.DELETE:
            yield change
    yield from environments.values()
    for change in networks.values():
        if change.action is Action.DELETE:
            yield change


# --------------------------------------------------------------------------- networks


def _plan_network(
    *,
    instance: str,
    name: str,
    want: DesiredNetwork | None,
    have: NetworkRecord | None,
    desired: Desired,
    recorded: StateDocument,
    observed: Observation,
) -> Change | None:
    kind = "Network"
    if want is None:
        assert have is not None
        if desired.protects(kind=kind, name=name, file=have.file):
            return Change(
                kind, name, Action.NOOP, ("manifest failed to load; kept as last applied",)
            )
        users = {e for e, r in desired.environments.items() if r.network == name}
        # An environment kept as last applied (its manifest failed) still needs its bridge.
        users |= {
            e
            for e, r in recorded.environments.items()
            if r.network == name and desired.protects(kind="Environment", name=e, file=r.file)
        }
        if users:
            used = ", ".join(f"Environment/{u}" for u in sorted(users))
            return Change(kind, name, Action.NOOP, (f"kept: still used by {used}",))
        return Change(kind, name, Action.DELETE, ("no longer declared",))
    if have is None:
        return Change(kind, name, Action.CREATE, (f"declared at {want.source}",))
    diffs = list(diff_specs(have.spec, want.spec))
    forced = [d for d in diffs if d.path.split("[")[0] in NETWORK_REPLACEMENT_FIELDS]
    if have.bridge != want.bridge and not forced:
        forced.append(FieldChange("bridge", have.bridge, want.bridge))
    if forced:
        return Change(
            kind, name, Action.RECREATE, tuple(f"{d} (forces replacement)" for d in forced)
        )
    reasons = [str(d) for d in diffs]
    reasons += _bridge_drift(instance=instance, want=want, observed=observed)
    reasons += [f"drift: isolation rules: {d}" for d in observed.firewall_drift[:3]]
    return Change(kind, name, Action.UPDATE if reasons else Action.NOOP, tuple(reasons))


def _bridge_drift(*, instance: str, want: DesiredNetwork, observed: Observation) -> list[str]:
    link = observed.network.host_links.get(want.bridge)
    if link is None:
        return [f"drift: bridge {want.bridge} is missing"]
    reasons = []
    if link.alias != owner_tag(instance=instance, kind="network", name=want.name):
        reasons.append(f"drift: bridge {want.bridge} has ownership tag {link.alias!r}")
    if not link.up:
        reasons.append(f"drift: bridge {want.bridge} is down")
    if set(link.addresses) != {want.gateway_cidr}:
        reasons.append(
            f"drift: bridge {want.bridge} addresses {_addrs(link)} (want {want.gateway_cidr})"
        )
    return reasons


def _addrs(link: LinkState) -> str:
    return ", ".join(link.addresses) or "none"


# --------------------------------------------------------------------------- environments


def _plan_environment(
    *,
    instance: str,
    name: str,
    want: DesiredEnvironment | None,
    have: EnvironmentRecord | None,
    desired: Desired,
    observed: Observation,
    address: str | None,
    bridge: str | None,
    replaced_networks: set[str],
    now: float,
) -> Change | None:
    kind = "Environment"
    if want is None:
        assert have is not None
        if desired.protects(kind=kind, name=name, file=have.file):
            return Change(
                kind, name, Action.NOOP, ("manifest failed to load; kept as last applied",)
            )
        return Change(kind, name, Action.DELETE, ("no longer declared",))
    if have is None:
        return Change(kind, name, Action.CREATE, (f"declared at {want.source}",))
    diffs = list(diff_specs(have.spec, want.spec))
    forced = [d for d in diffs if _forces_env_replacement(d.path)]
    if forced:
        return Change(
            kind, name, Action.RECREATE, tuple(f"{d} (forces replacement)" for d in forced)
        )
    if want.network in replaced_networks:
        return Change(kind, name, Action.RECREATE, (f"network {want.network} is replaced",))
    netns = observed.network.netns.get(have.netns)
    if netns is None:
        return Change(kind, name, Action.RECREATE, (f"drift: netns {have.netns} is missing",))
    if have.netns_inode is not None and netns.inode != have.netns_inode:
        return Change(kind, name, Action.RECREATE, (f"drift: netns {have.netns} was replaced",))
    reasons = [str(d) for d in diffs]
    if have.labels != dict(want.labels):
        reasons.append(f"metadata.labels: {have.labels} -> {dict(want.labels)}")
    if address is not None and have.address != address:
        reasons.append(f"address: {have.address} -> {address}")
    reasons += _link_drift(
        instance=instance,
        bridge=bridge,
        want=want,
        have=have,
        observed=observed,
        address=address,
    )
    # A resources edit already explains why live limits differ: don't call it drift too.
    spec_changed_limits = any(d.path.startswith("resources") for d in diffs)
    reasons += _cgroup_drift(
        want=want, state=observed.cgroups.get(name), check_limits=not spec_changed_limits
    )
    if have.holder is None or not observed.holders_alive.get(name, False):
        reasons.append("drift: holder process is not running")
    reasons += plan_reasons(
        processes=list(want.manifest.spec.processes),
        record=have,
        alive=observed.workloads_alive.get(name, {}),
        now=now,
    )
    return Change(kind, name, Action.UPDATE if reasons else Action.NOOP, tuple(reasons))


def _forces_env_replacement(path: str) -> bool:
    if path == "network":  # joining or leaving a network
        return True
    base = path.split("[")[0]
    return any(base == f or base.startswith(f + ".") for f in ENV_REPLACEMENT_FIELDS)


def _link_drift(
    *,
    instance: str,
    bridge: str | None,
    want: DesiredEnvironment,
    have: EnvironmentRecord,
    observed: Observation,
    address: str | None,
) -> list[str]:
    if want.network is None or have.host_veth is None:
        return []
    reasons = []
    host = observed.network.host_links.get(have.host_veth)
    if host is None:
        reasons.append(f"drift: host veth {have.host_veth} is missing")
    else:
        if host.alias != owner_tag(instance=instance, kind="env", name=want.name):
            reasons.append(f"drift: host veth {have.host_veth} has ownership tag {host.alias!r}")
        if not host.up:
            reasons.append(f"drift: host veth {have.host_veth} is down")
        if bridge is not None and host.master != bridge:
            reasons.append(f"drift: host veth {have.host_veth} is not on bridge {bridge}")
    netns = observed.network.netns.get(have.netns)
    if netns is None:
        return reasons
    eth0 = netns.links.get("eth0")
    if eth0 is None:
        reasons.append("drift: eth0 is missing inside the netns")
        return reasons
    if not eth0.up:
        reasons.append("drift: eth0 is down")
    if address is not None and set(eth0.addresses) != {address}:
        reasons.append(f"drift: eth0 addresses {_addrs(eth0)} (want {address})")
    lo = netns.links.get("lo")
    if lo is not None and not lo.up:
        reasons.append("drift: lo is down")
    return reasons


def _cgroup_drift(
    *, want: DesiredEnvironment, state: CgroupState | None, check_limits: bool
) -> list[str]:
    if state is None:
        return ["drift: cgroup is missing"]
    reasons = []
    if not state.complete:
        reasons.append("drift: some cgroup directories are missing")
    if check_limits:
        reasons += [f"drift: cgroup {d}" for d in diff_limits(state.limits, want.limits)]
    return reasons


def diff_limits(live: CgroupLimits, want: CgroupLimits) -> list[str]:
    """Human-readable differences between live and desired limits."""
    out = []
    if _page_floor(live.memory_bytes) != _page_floor(want.memory_bytes):
        have, need = _opt(live.memory_bytes, format_bytes), _opt(want.memory_bytes, format_bytes)
        out.append(f"memory {have} (want {need})")
    if live.cpu_millis != want.cpu_millis:
        out.append(
            f"cpu {_opt(live.cpu_millis, format_cpu)} (want {_opt(want.cpu_millis, format_cpu)})"
        )
    if live.pids != want.pids:
        out.append(f"pids {_opt(live.pids, str)} (want {_opt(want.pids, str)})")
    if sorted(live.io, key=lambda i: i.device) != sorted(want.io, key=lambda i: i.device):
        out.append("io limits differ")
    return out


def _page_floor(value: int | None) -> int | None:
    """The kernel stores memory limits rounded down to whole pages."""
    return None if value is None else value - value % PAGE_SIZE


def _opt(value: int | None, render: Any) -> str:
    return "unlimited" if value is None else str(render(value))


# --------------------------------------------------------------------------- field diffs


@dataclass(frozen=True)
class FieldChange:
    """One leaf that differs between the recorded and the desired spec."""

    path: str  # "resources.memory", "processes[api].command"
    old: Any
    new: Any

    def __str__(self) -> str:
        return f"spec.{self.path}: {_render(self.path, self.old)} -> {_render(self.path, self.new)}"


_BYTE_FIELDS = {"memory", "size", "readBps", "writeBps"}


def _render(path: str, value: Any) -> str:
    if value is None:
        return "(unset)"
    leaf = path.rsplit(".", 1)[-1]
    if isinstance(value, int) and not isinstance(value, bool):
        if leaf in _BYTE_FIELDS:
            return format_bytes(value)
        if leaf == "cpu":
            return format_cpu(value)
    if isinstance(value, str):
        return value
    return json.dumps(value, separators=(",", ":"))


def diff_specs(
    old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = ""
) -> Iterator[FieldChange]:
    """Leaf differences between two normalised specs; named list items are matched by name."""
    for key in sorted(set(old) | set(new)):
        if key.startswith("__"):
            continue
        path = f"{prefix}.{key}" if prefix else key
        yield from _diff_value(path, old.get(key), new.get(key))


def _diff_value(path: str, old: Any, new: Any) -> Iterator[FieldChange]:
    if old == new:
        return
    if isinstance(old, dict) and isinstance(new, dict):
        yield from diff_specs(old, new, path)
    elif _named_list(old) and _named_list(new):
        old_items = {item["name"]: item for item in old}
        new_items = {item["name"]: item for item in new}
        for name in sorted(set(old_items) | set(new_items)):
            yield from _diff_value(f"{path}[{name}]", old_items.get(name), new_items.get(name))
    else:
        yield FieldChange(path, old, new)


def _named_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(i, dict) and "name" in i for i in value)


def address_with_prefix(address: ipaddress.IPv4Address, subnet: ipaddress.IPv4Network) -> str:
    """'10.0.0.5/24'."""
    return f"{address}/{subnet.prefixlen}"
