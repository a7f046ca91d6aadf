"""Owned objects outside the inventory: found by ownership proof, never by name alone.

Proof, per kind of object:
- a link (bridge, host veth) carries our `ifalias` tag naming this instance;
- a cgroup sits under this instance's parent directory;
- a netns pin is ours only when its name is `netns_name(instance, env)` for an env that
  one of the above already proves ours (a name prefix alone is not proof: instance `dev`
  must never collect instance `dev-x`'s namespaces).
Processes are never killed here directly: they die with their cgroup.
"""

from __future__ import annotations

import os

from reconciler.engine.apply import Drivers
from reconciler.kernel.naming import netns_name
from reconciler.kernel.types import owner_tag, parse_owner_tag
from reconciler.state.model import StateDocument

NETNS_DIR = "/run/netns"


def _owned_links(instance: str, drivers: Drivers) -> dict[str, tuple[str, str]]:
    """Host links carrying this instance's tag: link name -> (kind, object name)."""
    found: dict[str, tuple[str, str]] = {}
    for link in drivers.network.observe(netns_names=[]).host_links.values():
        tag = parse_owner_tag(link.alias)
        if tag is not None and tag[0] == instance:
            found[link.name] = (tag[1], tag[2])
    return found


def _pinned() -> set[str]:
    try:
        return set(os.listdir(NETNS_DIR))
    except FileNotFoundError:
        return set()


def owned_objects(*, instance: str, drivers: Drivers) -> list[str]:
    """Every live object provably owned by `instance`, described for a message."""
    links = _owned_links(instance, drivers)
    cgroups = set(drivers.cgroups.observe())
    envs = cgroups | {name for kind, name in links.values() if kind == "env"}
    pins = _pinned()
    found = [f"link {name}" for name in sorted(links)]
    found += [f"cgroup of {name}" for name in sorted(cgroups)]
    found += [
        f"netns {netns_name(instance, e)}" for e in sorted(envs) if netns_name(instance, e) in pins
    ]
    return found


def collect_orphans(*, instance: str, drivers: Drivers, state: StateDocument) -> list[str]:
    """Remove owned objects that the inventory does not list; returns what was removed."""
    removed: list[str] = []
    links = _owned_links(instance, drivers)
    recorded_envs = set(state.environments)
    recorded_bridges = {record.bridge for record in state.networks.values()}
    orphan_envs = {name for name in drivers.cgroups.observe() if name not in recorded_envs}
    orphan_envs |= {n for kind, n in links.values() if kind == "env" and n not in recorded_envs}
    for env in sorted(orphan_envs):
        if drivers.cgroups.remove(env=env):
            removed.append(f"orphan cgroup of {env} removed")
    for link, (kind, name) in sorted(links.items()):
        if kind != "env" or name in recorded_envs:
            continue
        alias = owner_tag(instance=instance, kind="env", name=name)
        if drivers.network.remove_env_link(host_name=link, alias=alias):
            removed.append(f"orphan veth {link} removed")
    pins = _pinned()
    for env in sorted(orphan_envs):
        pin = netns_name(instance, env)
        if pin in pins and drivers.network.remove_netns(name=pin):
            removed.append(f"orphan netns {pin} removed")
    for link, (kind, name) in sorted(links.items()):
        if kind != "network" or link in recorded_bridges:
            continue
        alias = owner_tag(instance=instance, kind="network", name=name)
        if drivers.network.remove_bridge(name=link, alias=alias):
            removed.append(f"orphan bridge {link} removed")
    return removed
