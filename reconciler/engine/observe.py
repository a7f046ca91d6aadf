"""One observation pass over the kernel: links, namespaces, cgroups and holders.

The engine observes once per reconcile and plans against that snapshot; drivers do their
own read-before-write while applying, so a stale snapshot can cost a retry, never a wrong
delete.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from reconciler.kernel.processes import ProcessDriver
from reconciler.kernel.types import (
    CgroupDriver,
    CgroupState,
    HolderDriver,
    NetworkDriver,
    NetworkObservation,
    ProcessRef,
)
from reconciler.state.model import StateDocument


@dataclass(frozen=True)
class Observation:
    """What the kernel shows, for everything recorded or desired."""

    network: NetworkObservation
    cgroups: Mapping[str, CgroupState]
    holders_alive: Mapping[str, bool] = field(default_factory=dict)  # env -> recorded holder alive
    same_boot: bool = True
    firewall_drift: tuple[str, ...] = ()  # live tables vs. the inventory's isolation
    # env -> process name -> the recorded (pid, start time) still runs
    workloads_alive: Mapping[str, Mapping[str, bool]] = field(default_factory=dict)


def observe(
    *,
    network: NetworkDriver,
    cgroups: CgroupDriver,
    holders: HolderDriver,
    processes: ProcessDriver | None = None,
    recorded: StateDocument,
    netns_names: list[str],
    boot_id: str,
    usage: bool = True,
) -> Observation:
    """Observe every object that the plan needs, in one pass."""
    alive: dict[str, bool] = {}
    same_boot = not recorded.boot_id or recorded.boot_id == boot_id
    for name, record in recorded.environments.items():
        # After a reboot a recorded (pid, start time) can match an unrelated process.
        if record.holder is not None and same_boot:
            ref = record.holder.ref
            alive[name] = holders.alive(ref)
    workloads: dict[str, dict[str, bool]] = {}
    for name, record in recorded.environments.items():
        if processes is None or not same_boot:
            continue
        workloads[name] = {
            process: w.pid is not None
            and w.start_time is not None
            and processes.alive(ProcessRef(pid=w.pid, start_time=w.start_time))
            for process, w in record.processes.items()
        }
    return Observation(
        network=network.observe(netns_names=sorted(set(netns_names))),
        cgroups=cgroups.observe(usage=usage),
        holders_alive=alive,
        same_boot=same_boot,
        workloads_alive=workloads,
    )
