"""Owned objects outside the inventory: found by ownership proof, never by name alone.

An orphan is what a crash leaves behind: `kill -9` between creating a kernel object and
writing the state file that records it, followed by an edit that no longer declares it
(so the next reconcile, which would have adopted it, has no reason to look). The
controller collects orphans after its first reconcile, after any reconcile that failed or
crashed, on SIGHUP and with a resync at most every few minutes (see `controller.loop`),
against the inventory that reconcile returned; `destroy` collects them after tearing
down everything recorded.

Proof, per kind of object:
- a link (bridge, host veth) carries our `ifalias` tag naming this instance;
- a cgroup sits under this instance's parent directory;
- a netns pin is ours only when its name is `netns_name(instance, env)` for an env that
  one of the above already proves ours (a name prefix alone is not proof: instance `dev`
  must never collect instance `dev-x`'s namespaces).
Processes are never killed here directly: they die with their cgroup (a holder in an
orphan cgroup is in *our* cgroup, which is its proof).

Order, so that a crash in the middle leaves nothing a restart could trip over, and never
destroys the last proof of what is left. Per environment: first kill every process in the
cgroup (the directories stay: they are the proof); then unpin the netns, remove the veth,
and remove the cgroup directories last. Killing first matters: a holder that outlived its
unpinned netns sits in the env's cgroup but in a dead namespace, so if the env is declared
again, the next reconcile cannot adopt it (wrong netns) and spawns a second one next to
it. Bridges go after every veth that might hang on them.
"""

from __future__ import annotations

from collections.abc import Set
from dataclasses import dataclass
from typing import Literal

from reconciler.engine.apply import Drivers
from reconciler.errors import ReconcilerError
from reconciler.kernel.naming import netns_name
from reconciler.kernel.netns import pinned_names
from reconciler.kernel.types import owner_tag, parse_owner_tag
from reconciler.state.model import StateDocument


@dataclass(frozen=True)
class Collected:
    """One orphan removed: the object it belonged to, and what was removed."""

    kind: Literal["Environment", "Network"]
    name: str
    what: str  # "orphan netns rt1-web removed"

    def __str__(self) -> str:
        return self.what


def _owned_links(instance: str, drivers: Drivers) -> dict[str, tuple[str, str]]:
    """Host links carrying this instance's tag: link name -> (kind, object name)."""
    found: dict[str, tuple[str, str]] = {}
    for link in drivers.network.observe(netns_names=[]).host_links.values():
        tag = parse_owner_tag(link.alias)
        if tag is not None and tag[0] == instance:
            found[link.name] = (tag[1], tag[2])
    return found


def owned_objects(*, instance: str, drivers: Drivers) -> list[str]:
    """Every live object provably owned by `instance`, described for a message."""
    links = _owned_links(instance, drivers)
    cgroups = set(drivers.cgroups.env_names())
    envs = cgroups | {name for kind, name in links.values() if kind == "env"}
    pins = pinned_names()
    found = [f"link {name}" for name in sorted(links)]
    found += [f"cgroup of {name}" for name in sorted(cgroups)]
    found += [
        f"netns {netns_name(instance, e)}" for e in sorted(envs) if netns_name(instance, e) in pins
    ]
    return found


def collect_orphans(
    *,
    instance: str,
    drivers: Drivers,
    state: StateDocument,
    keep_environments: Set[str] = frozenset(),
    keep_networks: Set[str] = frozenset(),
    errors: list[Collected] | None = None,
) -> list[Collected]:
    """Remove owned objects that the inventory does not list; returns what was removed.

    `keep_*`: names never collected even when unrecorded (the controller passes the
    declared ones: a reconcile adopts what a crash left of them, and one that failed
    before recording them must not see them deleted and re-made on every resync).
    `errors`: when given, an object that cannot be removed is reported there (`what` is
    the error) and the others are still collected; when None, the first failure raises.
    """
    links = _owned_links(instance, drivers)
    spared = set(state.environments) | set(keep_environments)
    env_links = {
        name: link for link, (kind, name) in links.items() if kind == "env" and name not in spared
    }
    orphan_envs = {name for name in drivers.cgroups.env_names() if name not in spared}
    orphan_envs |= set(env_links)
    removed: list[Collected] = []
    pins = pinned_names()
    for env in sorted(orphan_envs):
        try:
            removed += _collect_environment(
                instance, drivers, env=env, link=env_links.get(env), pinned=pins
            )
        except (ReconcilerError, OSError) as exc:
            if errors is None:
                raise
            errors.append(Collected("Environment", env, f"cannot collect orphan: {exc}"))
    recorded_bridges = {record.bridge for record in state.networks.values()}
    for link, (kind, name) in sorted(links.items()):
        if kind != "network" or link in recorded_bridges or name in keep_networks:
            continue
        alias = owner_tag(instance=instance, kind="network", name=name)
        try:
            if drivers.network.remove_bridge(name=link, alias=alias):
                removed.append(Collected("Network", name, f"orphan bridge {link} removed"))
        except (ReconcilerError, OSError) as exc:
            if errors is None:
                raise
            errors.append(Collected("Network", name, f"cannot collect orphan bridge: {exc}"))
    return removed


def _collect_environment(
    instance: str, drivers: Drivers, *, env: str, link: str | None, pinned: set[str]
) -> list[Collected]:
    """Remove what is left of one unrecorded environment, proof last."""
    removed: list[Collected] = []
    drivers.cgroups.kill(env=env)
    pin = netns_name(instance, env)
    if pin in pinned and drivers.network.remove_netns(name=pin):
        removed.append(Collected("Environment", env, f"orphan netns {pin} removed"))
    alias = owner_tag(instance=instance, kind="env", name=env)
    if link is not None and drivers.network.remove_env_link(host_name=link, alias=alias):
        removed.append(Collected("Environment", env, f"orphan veth {link} removed"))
    # Last: the cgroup is the proof for everything above. Removing it waits (with a
    # deadline) until the processes killed above are gone.
    if drivers.cgroups.remove(env=env):
        removed.append(Collected("Environment", env, f"orphan cgroup of {env} removed"))
    return removed
