"""Rules that span documents: references, uniqueness, overlaps, devices.

Each rule blames one document (the later one, for duplicates) at the line of the field
that breaks it. A blamed manifest is removed from the valid set and its key protected
from pruning, like a manifest that failed to parse: the environment keeps running as last
applied until its file is fixed. Checks that need the host (does /dev/vda exist?) take an
injected resolver, so this module stays pure.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Mapping

from reconciler.manifests.loader import LoadResult, Located
from reconciler.manifests.models import Environment, Network, host_address_problem

DeviceResolver = Callable[[str], str]


def crosscheck(result: LoadResult, *, resolve_device: DeviceResolver | None = None) -> LoadResult:
    """Apply the cross-document rules; returns `result` with blamed manifests moved to errors."""
    blamed: dict[int, Located] = {}

    def blame(item: Located, path: tuple[str | int, ...], message: str) -> None:
        kind, name = item.key
        result.error(item.file, item.line_of(path), f"{kind}/{name}: {message}", key=item.key)
        blamed[id(item)] = item

    _unique_names(result, blame)
    # Only the blamed duplicate is skipped, by identity: the first declaration of a name
    # stays valid, so it must be checked like any other (a skip by key would skip it too).
    networks = _check_networks(result, blame, blamed)
    _check_environments(result, networks, blame, resolve_device, blamed)
    result.manifests = [m for m in result.manifests if id(m) not in blamed]
    return result


Blame = Callable[[Located, tuple[str | int, ...], str], None]


def _unique_names(result: LoadResult, blame: Blame) -> None:
    seen: dict[tuple[str, str], Located] = {}
    for item in result.manifests:
        first = seen.setdefault(item.key, item)
        if first is not item:
            blame(
                item,
                ("metadata", "name"),
                f"already declared at {first.where(('metadata', 'name'))}",
            )


def _check_networks(
    result: LoadResult, blame: Blame, blamed: Mapping[int, Located]
) -> dict[str, Located]:
    networks: dict[str, Located] = {}
    bridges: dict[str, Located] = {}
    for item in result.manifests:
        manifest = item.manifest
        if not isinstance(manifest, Network) or id(item) in blamed:
            continue
        spec = manifest.spec
        bridge = manifest.bridge_name
        clash = bridges.get(bridge)
        if clash is not None:
            blame(
                item,
                ("spec", "bridge"),
                f"bridge {bridge} is also used by Network/{clash.key[1]} ({clash.where()})",
            )
            continue
        overlap = _overlapping(spec.subnet, networks)
        if overlap is not None:
            other = overlap.manifest
            assert isinstance(other, Network)
            blame(
                item,
                ("spec", "subnet"),
                f"subnet {spec.subnet} overlaps Network/{other.metadata.name} "
                f"({other.spec.subnet}, {overlap.where(('spec', 'subnet'))})",
            )
            continue
        networks[manifest.metadata.name] = item
        bridges[bridge] = item
    return networks


def _overlapping(subnet: ipaddress.IPv4Network, networks: dict[str, Located]) -> Located | None:
    for item in networks.values():
        other = item.manifest
        assert isinstance(other, Network)
        if subnet.overlaps(other.spec.subnet):
            return item
    return None


def _check_environments(
    result: LoadResult,
    networks: dict[str, Located],
    blame: Blame,
    resolve_device: DeviceResolver | None,
    blamed: Mapping[int, Located],
) -> None:
    addresses: dict[tuple[str, ipaddress.IPv4Address], Located] = {}
    env_names = {m.key[1] for m in result.manifests if m.key[0] == "Environment"}
    env_names |= {name for kind, name in result.failed_keys if kind == "Environment"}
    for item in result.manifests:
        env = item.manifest
        if not isinstance(env, Environment) or id(item) in blamed:
            continue
        problem = _environment_problem(env, item, networks, addresses, env_names, resolve_device)
        if problem is not None:
            blame(item, problem[0], problem[1])


def _environment_problem(
    env: Environment,
    item: Located,
    networks: dict[str, Located],
    addresses: dict[tuple[str, ipaddress.IPv4Address], Located],
    env_names: set[str],
    resolve_device: DeviceResolver | None,
) -> tuple[tuple[str | int, ...], str] | None:
    attachment = env.spec.network
    if attachment is not None:
        located = networks.get(attachment.name)
        if located is None:
            return (
                "spec",
                "network",
                "name",
            ), f"network {attachment.name!r} is not declared (or is invalid)"
        network = located.manifest
        assert isinstance(network, Network)
        address = attachment.address
        if address is not None:
            problem = host_address_problem(address, network.spec.subnet)
            if problem is None and address == network.spec.effective_gateway():
                problem = "is the gateway of the network"
            if problem is not None:
                return ("spec", "network", "address"), f"address {address} {problem}"
            holder = addresses.setdefault((attachment.name, address), item)
            if holder is not item:
                return (
                    ("spec", "network", "address"),
                    f"address {address} is already taken by Environment/{holder.key[1]} "
                    f"({holder.where(('spec', 'network', 'address'))})",
                )
    for index, rule in enumerate(env.spec.policy.ingress):
        source = rule.from_.environment
        if source is not None and source not in env_names:
            return (
                "spec",
                "policy",
                "ingress",
                index,
                "from",
            ), f"ingress from unknown environment {source!r}"
    if resolve_device is not None:
        for index, entry in enumerate(env.spec.resources.io):
            try:
                resolve_device(entry.device)
            except ValueError as exc:
                return (
                    "spec",
                    "resources",
                    "io",
                    index,
                    "device",
                ), f"{exc} (fix spec.resources.io)"
    return None
