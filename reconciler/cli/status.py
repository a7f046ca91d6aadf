"""`reconciler status`: the recorded inventory joined with what the kernel shows now.

The JSON document is the contract's section 4. A recorded `Ready` environment whose
kernel objects are not all there is reported `Degraded` with a `Drifted` condition naming
what is missing, so `status` never claims health the kernel does not show.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from reconciler.cli.runtime import Runtime
from reconciler.engine.observe import Observation, observe
from reconciler.engine.plan import diff_limits
from reconciler.health.monitor import health_status
from reconciler.kernel.types import CgroupLimits, CgroupState, IoLimit, owner_tag
from reconciler.state.conditions import set_condition
from reconciler.state.model import EnvironmentRecord, NetworkRecord, StateDocument
from reconciler.state.suspend import is_suspended


def build_status(runtime: Runtime, state: StateDocument, names: Sequence[str]) -> dict[str, Any]:
    """The status document for every (or the named) environment."""
    drivers = runtime.drivers()
    observed = observe(
        network=drivers.network,
        cgroups=drivers.cgroups,
        holders=drivers.holders,
        processes=drivers.processes,
        recorded=state,
        netns_names=[r.netns for r in state.environments.values()],
        boot_id=state.boot_id,
    )
    instance = runtime.options.instance
    denied = drivers.firewall.denied_counts()
    selected = [n for n in sorted(state.environments) if not names or n in names]
    return {
        "instance": instance,
        "source": state.source.model_dump(mode="json", by_alias=True)
        | {"suspended": is_suspended(runtime.store.dir)},
        "networks": [
            _network(instance, name, record, observed)
            for name, record in sorted(state.networks.items())
        ],
        "environments": [
            _environment(
                instance, name, state.environments[name], observed, drivers.cgroups.driver, state
            )
            | {"deniedConnections": _denied_from(state.environments[name], denied)}
            for name in selected
        ],
    }


def _network(
    instance: str, name: str, record: NetworkRecord, observed: Observation
) -> dict[str, Any]:
    link = observed.network.host_links.get(record.bridge)
    phase = record.phase
    if phase == "Ready" and (
        link is None
        or not link.up
        or link.alias != owner_tag(instance=instance, kind="network", name=name)
    ):
        phase = "Degraded"
    return {
        "name": name,
        "bridge": record.bridge,
        "subnet": record.subnet,
        "gateway": record.gateway,
        "phase": phase,
        "isolation": record.spec.get("isolation", "strict"),
    }


def _environment(
    instance: str,
    name: str,
    record: EnvironmentRecord,
    observed: Observation,
    cgroup_driver: str,
    state: StateDocument,
) -> dict[str, Any]:
    cgroup = observed.cgroups.get(name)
    drift = _drift(instance, name, record, observed, cgroup)
    health = health_status(record)  # failing probes and quarantine make Ready -> Degraded
    phase = health.phase
    conditions = list(health.conditions)
    if drift and phase in ("Ready", "Degraded"):
        phase = "Degraded"
        conditions = set_condition(
            conditions, type="Ready", status="False", reason="Drifted", message="; ".join(drift)
        )
    network = state.networks.get(record.network) if record.network else None
    interfaces = []
    if record.host_veth:
        interfaces.append(
            {
                "host": record.host_veth,
                "peer": "eth0",
                "address": record.address,
                "bridge": network.bridge if network else None,
            }
        )
    holder = record.holder
    return {
        "name": name,
        "phase": phase,
        "conditions": [c.model_dump(mode="json", by_alias=True) for c in conditions],
        "labels": record.labels,
        "hostname": record.spec.get("hostname", name),
        "netns": record.netns,
        "netnsPath": f"/run/netns/{record.netns}",
        "interfaces": interfaces,
        "cgroup": {
            "driver": cgroup_driver,
            "paths": list(cgroup.paths if cgroup else record.cgroup_paths),
            "limits": _limits(cgroup),
            "usage": {
                "memoryBytes": cgroup.usage.memory_bytes if cgroup else 0,
                "pids": cgroup.usage.pids if cgroup else 0,
            },
        },
        "holder": {"pid": holder.pid, "running": observed.holders_alive.get(name, False)}
        if holder
        else None,
        "processes": _processes(name, record, observed),
        "probes": health.probes,
        "violations": health.violations,
        "quarantined": health.quarantined,
        "specHash": record.spec_hash,
        "lastReconciled": record.last_reconciled or None,
        "lastError": record.last_error,
        "drift": drift,
    }


def _processes(name: str, record: EnvironmentRecord, observed: Observation) -> list[dict[str, Any]]:
    alive = observed.workloads_alive.get(name, {})
    out = []
    for process, workload in sorted(record.processes.items()):
        state = workload.state
        if state == "Running" and not alive.get(process, False):
            state = "Exited"  # noticed by the next reconcile, which applies the policy
        out.append(
            {
                "name": process,
                "pid": workload.pid if state == "Running" else None,
                "state": state,
                "restarts": workload.restarts,
                "exitCode": workload.exit_code,
                "backoffUntil": workload.backoff_until,
            }
        )
    return out


def _denied_from(record: EnvironmentRecord, denied: dict[tuple[str, str], int]) -> int:
    """Packets the isolation rules dropped with this environment as the source."""
    if not record.address:
        return 0
    own = record.address.split("/")[0]
    return sum(count for (source, _), count in denied.items() if source == own)


def _limits(cgroup: CgroupState | None) -> dict[str, Any]:
    if cgroup is None:
        return {"memoryBytes": None, "cpuMillis": None, "pids": None, "io": []}
    limits = cgroup.limits
    return {
        "memoryBytes": limits.memory_bytes,
        "cpuMillis": limits.cpu_millis,
        "pids": limits.pids,
        "io": [_io(entry) for entry in limits.io],
    }


def _io(entry: IoLimit) -> dict[str, Any]:
    values = {
        "readBps": entry.read_bps,
        "writeBps": entry.write_bps,
        "readIops": entry.read_iops,
        "writeIops": entry.write_iops,
    }
    return {"device": entry.device, **{k: v for k, v in values.items() if v is not None}}


def _drift(
    instance: str,
    name: str,
    record: EnvironmentRecord,
    observed: Observation,
    cgroup: CgroupState | None,
) -> list[str]:
    problems = []
    netns = observed.network.netns.get(record.netns)
    if netns is None:
        problems.append(f"netns {record.netns} is missing")
    elif record.netns_inode is not None and netns.inode != record.netns_inode:
        problems.append(f"netns {record.netns} was replaced")
    if record.host_veth:
        link = observed.network.host_links.get(record.host_veth)
        if link is None:
            problems.append(f"host veth {record.host_veth} is missing")
        elif not link.up:
            problems.append(f"host veth {record.host_veth} is down")
        elif link.alias != owner_tag(instance=instance, kind="env", name=name):
            problems.append(f"host veth {record.host_veth} lost its ownership tag")
    if cgroup is None:
        problems.append("cgroup is missing")
    else:
        resources = record.spec.get("resources", {})
        recorded = CgroupLimits(
            memory_bytes=resources.get("memory"),
            cpu_millis=resources.get("cpu"),
            pids=resources.get("pids"),
            io=cgroup.limits.io,  # devices are resolved at apply time; `plan` checks io
        )
        problems += [f"cgroup {d}" for d in diff_limits(cgroup.limits, recorded)]
    if record.holder is not None and not observed.holders_alive.get(name, False):
        problems.append("holder process is not running")
    return problems
