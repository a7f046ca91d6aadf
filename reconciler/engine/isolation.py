"""The isolation picture of an instance, derived from its inventory.

The firewall is a function of what exists, not of what is declared: it is built from the
state's records (spec last applied, address, host veth), so an environment kept as last
applied because its manifest broke keeps its rules, and an environment that failed to
come up gets none. Rendering and applying are `reconciler.kernel.nftrules` / `firewall`.
"""

from __future__ import annotations

import copy
import ipaddress
from collections.abc import Iterable
from typing import Any

from reconciler.kernel.nftrules import Allow, IsolationSpec, Member, NetworkRules
from reconciler.state.model import EnvironmentRecord, StateDocument


def isolation_spec(
    *, instance: str, state: StateDocument, quarantined: Iterable[str] = ()
) -> IsolationSpec:
    """The complete isolation of every recorded network and its member environments."""
    networks = []
    for name, network in sorted(state.networks.items()):
        members: list[Member] = []
        ingress: list[Allow] = []
        for env, record in sorted(state.environments.items()):
            member = _member(env, record, network_name=name)
            if member is None:
                continue
            members.append(member)
            ingress += _ingress(env, record)
        networks.append(
            NetworkRules(
                name=name,
                bridge=network.bridge,
                subnet=network.subnet,
                gateway=network.gateway,
                isolation="open" if network.spec.get("isolation") == "open" else "strict",
                members=tuple(members),
                ingress=tuple(ingress),
            )
        )
    # A quarantine is recorded on the environment (by the policy loop) and lasts until
    # `reconciler release` or a change of the env's spec.
    recorded = {name for name, r in state.environments.items() if r.quarantine is not None}
    return IsolationSpec(
        instance=instance,
        networks=tuple(networks),
        quarantined=frozenset(quarantined) | frozenset(recorded),
    )


def _member(env: str, record: EnvironmentRecord, *, network_name: str) -> Member | None:
    if record.network != network_name or not record.host_veth or not record.address:
        return None
    address = str(ipaddress.IPv4Interface(record.address).ip)
    return Member(env=env, host_port=record.host_veth, address=address)


def _ingress(env: str, record: EnvironmentRecord) -> list[Allow]:
    cached = _INGRESS.get((env, record.spec_hash))
    if cached is not None and cached[0] == record.spec:
        return list(cached[1])
    rules = _parse_ingress(env, record)
    if len(_INGRESS) >= _INGRESS_MAX:
        _INGRESS.clear()
    _INGRESS[(env, record.spec_hash)] = (copy.deepcopy(record.spec), rules)
    return list(rules)


# (env, spec hash) -> (the spec, its ingress rules): every reconcile renders the isolation
# from the whole inventory, and validating each record's spec again is most of that
# cost. A hit needs the very same spec (compared whole: the hash only narrows the search).
_INGRESS: dict[tuple[str, str], tuple[dict[str, Any], tuple[Allow, ...]]] = {}
_INGRESS_MAX = 4096


def _parse_ingress(env: str, record: EnvironmentRecord) -> tuple[Allow, ...]:
    # Imported here: building the manifest models costs ~0.1 s, which a `destroy` of
    # everything (no environment left to render rules for) never needs.
    from pydantic import ValidationError

    from reconciler.manifests.models import EnvironmentSpec

    try:
        spec = EnvironmentSpec.model_validate(record.spec)
    except ValidationError:
        return ()  # a record written by an older schema: no rules rather than no firewall
    return tuple(
        Allow(
            dst_env=env,
            src_env=rule.from_.environment,
            src_cidr=str(rule.from_.cidr) if rule.from_.cidr is not None else None,
            ports=tuple(rule.ports),
            protocol=rule.protocol,
        )
        for rule in spec.policy.ingress
    )
