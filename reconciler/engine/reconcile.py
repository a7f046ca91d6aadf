"""One reconcile: desired + recorded + observed -> plan -> apply -> state written once.

This is the function every trigger ends in (`apply`, and later each key of `run`): it
re-reads everything, so it never depends on what triggered it (level-triggered).
"""

from __future__ import annotations

import functools
import ipaddress
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace

from reconciler.engine.apply import Drivers, Outcome, apply_plan
from reconciler.engine.desired import Desired
from reconciler.engine.ipam import Claim, allocate
from reconciler.engine.isolation import isolation_spec
from reconciler.engine.observe import Observation, observe
from reconciler.engine.plan import Plan, make_plan
from reconciler.engine.workloads import next_wakeup
from reconciler.kernel.naming import netns_name
from reconciler.state.events import EventLog
from reconciler.state.model import SourceRecord, StateDocument
from reconciler.state.procinfo import boot_id


@dataclass(frozen=True)
class ReconcileResult:
    """What one reconcile planned, did, and recorded."""

    plan: Plan
    outcomes: list[Outcome]
    state: StateDocument

    @property
    def ok(self) -> bool:
        """True when every changed object converged."""
        return all(outcome.ok for outcome in self.outcomes) and not self.plan.address_failures

    @property
    def requeue_after(self) -> float | None:
        """Seconds until something (a process back-off) needs another reconcile, if any."""
        return next_wakeup(self.state.environments, now=time.time())


def observe_for(
    *, instance: str, drivers: Drivers, desired: Desired, state: StateDocument
) -> Observation:
    """Observe every object recorded or desired, in one pass."""
    names = [record.netns for record in state.environments.values()]
    names += [netns_name(instance, name) for name in desired.environments]
    observed = observe(
        network=drivers.network,
        cgroups=drivers.cgroups,
        holders=drivers.holders,
        processes=drivers.processes,
        recorded=state,
        netns_names=names,
        boot_id=boot_id(),
        usage=False,  # planning compares limits; usage is for `status`
    )
    drift = drivers.firewall.differences(isolation_spec(instance=instance, state=state))
    return replace(observed, firewall_drift=tuple(drift))


def assign_addresses(
    *, desired: Desired, state: StateDocument, observed: Observation, instance: str
) -> tuple[dict[str, str], dict[str, str]]:
    """Addresses ("a.b.c.d/len") for every desired env with a network, and failures."""
    addresses: dict[str, str] = {}
    failures: dict[str, str] = {}
    for network in desired.networks.values():
        members = {n: e for n, e in desired.environments.items() if e.network == network.name}
        if not members:
            continue
        recorded = state.allocations.get(network.name, {})
        claims = {
            name: Claim(
                static=env.static_address,
                recorded=_host(recorded.get(name)),
                live=_live_address(observed, state, instance, name, network.subnet),
            )
            for name, env in members.items()
        }
        got, failed = allocate(subnet=network.subnet, gateway=network.gateway, claims=claims)
        addresses.update({n: f"{a}/{network.subnet.prefixlen}" for n, a in got.items()})
        failures.update(failed)
    return addresses, failures


@functools.lru_cache(maxsize=8192)  # the same few hundred strings, every reconcile
def _host(cidr: str | None) -> ipaddress.IPv4Address | None:
    if not cidr:
        return None
    try:
        return ipaddress.IPv4Interface(cidr).ip
    except ValueError:
        return None


def _live_address(
    observed: Observation,
    state: StateDocument,
    instance: str,
    env: str,
    subnet: ipaddress.IPv4Network,
) -> ipaddress.IPv4Address | None:
    record = state.environments.get(env)
    netns = observed.network.netns.get(record.netns if record else netns_name(instance, env))
    eth0 = netns.links.get("eth0") if netns else None
    for cidr in eth0.addresses if eth0 else ():
        address = _host(cidr)
        if address is not None and address in subnet:
            return address
    return None


def plan_for(
    *, instance: str, drivers: Drivers, desired: Desired, state: StateDocument
) -> tuple[Plan, Observation]:
    """Observe and plan; touches nothing."""
    observed = observe_for(instance=instance, drivers=drivers, desired=desired, state=state)
    addresses, failures = assign_addresses(
        desired=desired, state=state, observed=observed, instance=instance
    )
    plan = make_plan(
        instance=instance,
        desired=desired,
        recorded=state,
        observed=observed,
        addresses=addresses,
        address_failures=failures,
    )
    return plan, observed


def reconcile(
    *,
    instance: str,
    drivers: Drivers,
    events: EventLog,
    desired: Desired,
    state: StateDocument,
    source: SourceRecord,
) -> ReconcileResult:
    """Plan and apply; returns the new state (the caller saves it if it changed)."""
    plan, observed = plan_for(instance=instance, drivers=drivers, desired=desired, state=state)
    if not observed.same_boot:
        state = forget_runtime_objects(state)
    if not plan.has_changes and state.source == source:
        return ReconcileResult(plan=plan, outcomes=[], state=state)
    new_state, outcomes = apply_plan(
        instance=instance, drivers=drivers, events=events, state=state, desired=desired, plan=plan
    )
    new_state.source = source
    return ReconcileResult(plan=plan, outcomes=outcomes, state=new_state)


def forget_runtime_objects(state: StateDocument) -> StateDocument:
    """After a reboot: processes and namespace identities are gone; allocations stay."""
    copy = state.clone()
    for record in copy.environments.values():
        record.holder = None
        record.netns_inode = None
    return copy


Addresses = Mapping[str, str]
