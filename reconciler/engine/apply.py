"""Apply: drive the kernel drivers through a plan, one object at a time, never all-or-nothing.

Order (so nothing is ever attached to something that is gone):
1. tear down environments being deleted or recreated;
2. tear down networks being deleted or recreated;
3. converge networks (create, update, the build half of recreate);
4. converge environments.

Each object's failure is caught, recorded on its record (phase, condition, `lastError`) and
reported as an `Outcome`; the others carry on. Converging is idempotent ("ensure"): every
driver reads before it writes, so a retry after a crash adopts what the first attempt made.
Teardown keeps the record until every kernel object is confirmed gone.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import structlog

from reconciler.engine.desired import Desired, DesiredEnvironment, DesiredNetwork
from reconciler.engine.isolation import isolation_spec
from reconciler.engine.plan import Action, Change, Plan
from reconciler.engine.workloads import WorkloadConverger
from reconciler.errors import ReconcilerError
from reconciler.kernel.mounts import MountSpec, apply_mounts
from reconciler.kernel.naming import host_veth_name, netns_name
from reconciler.kernel.netns import pin_path
from reconciler.kernel.processes import ProcessDriver
from reconciler.kernel.types import (
    CgroupDriver,
    FirewallDriver,
    HolderDriver,
    HolderSpec,
    NetworkDriver,
    ProcessRef,
    owner_tag,
)
from reconciler.state.conditions import now_rfc3339, set_condition
from reconciler.state.events import EventLog
from reconciler.state.model import (
    EnvironmentRecord,
    NetworkRecord,
    Phase,
    ProcessRecord,
    StateDocument,
)

log = structlog.get_logger("reconciler.engine")


@dataclass
class Drivers:
    """The kernel drivers one engine works with."""

    network: NetworkDriver
    cgroups: CgroupDriver
    holders: HolderDriver
    firewall: FirewallDriver
    processes: ProcessDriver
    log_root: Path  # <state-dir>/<instance>/logs: one directory per environment


@dataclass(frozen=True)
class Outcome:
    """What happened to one object."""

    kind: str
    name: str
    action: Action
    ok: bool
    message: str = ""
    changes: tuple[str, ...] = ()


@dataclass
class Applier:
    """Applies one plan to the kernel and to a copy of the state document."""

    instance: str
    drivers: Drivers
    events: EventLog
    state: StateDocument
    desired: Desired
    plan: Plan
    outcomes: list[Outcome] = field(default_factory=list)
    failed_networks: dict[str, str] = field(default_factory=dict)
    now: float = field(default_factory=time.time)

    def run(self) -> list[Outcome]:
        """Apply every change of the plan, in the safe order."""
        changes = [c for c in self.plan.changes if c.action is not Action.NOOP]
        teardown = (Action.DELETE, Action.RECREATE)
        for change in changes:
            if change.kind == "Environment" and change.action in teardown:
                self._guard(
                    change, self._teardown_environment, final=change.action is Action.DELETE
                )
        for change in changes:
            if change.kind == "Network" and change.action in teardown:
                self._guard(change, self._teardown_network, final=change.action is Action.DELETE)
        for change in changes:
            if change.kind == "Network" and change.action is not Action.DELETE:
                self._guard(change, self._converge_network, final=True)
        for change in changes:
            if change.kind == "Environment" and change.action is not Action.DELETE:
                self._guard(change, self._converge_environment, final=True)
        if changes:
            self._converge_isolation()
        return self.outcomes

    # ----------------------------------------------------------------- isolation

    def _converge_isolation(self) -> None:
        """Bridge/port knobs and the nftables tables, from the inventory as it is now."""
        firewall = self.drivers.firewall
        try:
            made: list[str] = []
            for network in self.state.networks.values():
                made += firewall.ensure_bridge_flags(bridge=network.bridge)
                ports = [
                    r.host_veth
                    for r in self.state.environments.values()
                    if r.network is not None
                    and self.state.networks.get(r.network) is network
                    and r.host_veth
                    and r.phase == "Ready"  # a failed env may lack its veth
                ]
                made += firewall.ensure_port_flags(bridge=network.bridge, ports=ports)
            made += firewall.ensure(isolation_spec(instance=self.instance, state=self.state))
        except (ReconcilerError, OSError) as exc:
            message = f"isolation rules not applied: {exc}"
            log.warning("firewall.failed", error=message)
            self.outcomes.append(Outcome("Firewall", self.instance, Action.UPDATE, False, message))
            self.events.emit(
                type="Warning",
                reason="ReconcileFailed",
                kind="Firewall",
                name=self.instance,
                message=message,
            )
            return
        if made:
            log.info("firewall.updated", changes=made)

    # ----------------------------------------------------------------- bookkeeping

    def _guard(self, change: Change, step: Callable[[Change], list[str]], *, final: bool) -> None:
        """Run one step; record success (when `final`) or failure on the object's record.

        Success resets the record's failure count and sets `Reconciling` and `Stalled`
        False; a failure counts one more (read before the step, which may rebuild the
        record) and `_mark_failed` sets the conditions.
        """
        bound = log.bind(kind=change.kind, name=change.name, action=str(change.action))
        records = self.state.environments if change.kind == "Environment" else self.state.networks
        before = records.get(change.name)
        failures = before.consecutive_failures if before is not None else 0
        try:
            made = step(change)
        except (ReconcilerError, OSError) as exc:
            message = (
                str(exc) if isinstance(exc, ReconcilerError) else f"{type(exc).__name__}: {exc}"
            )
            bound.warning("object.failed", error=message)
            self._mark_failed(change, message, failures=failures + 1)
            self.outcomes.append(Outcome(change.kind, change.name, change.action, False, message))
            self.events.emit(
                type="Warning",
                reason="ReconcileFailed",
                kind=change.kind,
                name=change.name,
                message=message,
            )
            if change.kind == "Network":
                self.failed_networks[change.name] = message
            return
        if not final:
            return
        record = records.get(change.name)
        if record is not None:
            record.consecutive_failures = 0
            for condition, reason in (("Reconciling", "Idle"), ("Stalled", "Reconciled")):
                record.conditions = set_condition(
                    record.conditions, type=condition, status="False", reason=reason
                )
        self.outcomes.append(
            Outcome(change.kind, change.name, change.action, True, "", tuple(made))
        )
        reason, message = _event_for(change, made)
        bound.info(f"{change.kind.lower()}.{reason.lower()}", changes=made)
        self.events.emit(
            type="Normal", reason=reason, kind=change.kind, name=change.name, message=message
        )

    def _mark_failed(self, change: Change, message: str, *, failures: int = 1) -> None:
        """Failed `failures` times in a row: Ready=False; retrying, or Stalled from 5 on."""
        record = (
            self.state.environments if change.kind == "Environment" else self.state.networks
        ).get(change.name)
        if record is None:
            return
        phase: Phase = "Terminating" if change.action is Action.DELETE else "Failed"
        record.phase = phase
        record.consecutive_failures = failures
        # Still retried (with capped backoff) when stalled; Stalled says a human is needed.
        stalled = failures >= 5
        conditions = set_condition(
            record.conditions,
            type="Ready",
            status="False",
            reason="ReconcileFailed",
            message=message,
        )
        conditions = set_condition(
            conditions,
            type="Reconciling",
            status="False" if stalled else "True",
            reason="Stalled" if stalled else "RetryScheduled",
            message="" if stalled else f"failed {failures} time(s) in a row; retrying with backoff",
        )
        record.conditions = set_condition(
            conditions,
            type="Stalled",
            status="True" if stalled else "False",
            reason="RetriesExhausted" if stalled else "Retrying",
            message=message if stalled else "",
        )
        if isinstance(record, EnvironmentRecord):
            record.last_error = message

    # ----------------------------------------------------------------- networks

    def _converge_network(self, change: Change) -> list[str]:
        want = self.desired.networks[change.name]
        alias = owner_tag(instance=self.instance, kind="network", name=want.name)
        made = self.drivers.network.ensure_bridge(
            name=want.bridge, gateway_cidr=want.gateway_cidr, alias=alias
        )
        self.state.networks[want.name] = _network_record(want, self.state.networks.get(want.name))
        return made

    def _teardown_network(self, change: Change) -> list[str]:
        record = self.state.networks.get(change.name)
        if record is None:
            return []
        record.phase = "Terminating"
        alias = owner_tag(instance=self.instance, kind="network", name=change.name)
        removed = self.drivers.network.remove_bridge(name=record.bridge, alias=alias)
        del self.state.networks[change.name]
        if change.action is Action.DELETE:
            self.state.allocations.pop(change.name, None)
        return [f"bridge {record.bridge} removed"] if removed else []

    # ----------------------------------------------------------------- environments

    def _converge_environment(self, change: Change) -> list[str]:
        want = self.desired.environments[change.name]
        if want.network is not None and want.network in self.failed_networks:
            raise ReconcilerError(
                f"network {want.network} failed: {self.failed_networks[want.network]}"
            )
        failure = self.plan.address_failures.get(want.name)
        if failure:
            raise ReconcilerError(f"no address for environment {want.name}: {failure}")
        previous = self.state.environments.get(want.name)
        record = _environment_record(self.instance, want, previous)
        self.state.environments[want.name] = record
        made: list[str] = []
        made += self.drivers.cgroups.ensure(env=want.name, limits=want.limits)
        record.cgroup_paths = list(self.drivers.cgroups.paths(env=want.name))
        netns = self.drivers.network.ensure_netns(
            name=record.netns, alias=owner_tag(instance=self.instance, kind="env", name=want.name)
        )
        if previous is not None and previous.netns_inode not in (None, netns.inode):
            made.append(f"netns {record.netns} re-created")
        record.netns_inode = netns.inode
        if want.network is not None:
            made += self._converge_link(want, record)
        holder_made, fresh = self._converge_holder(want, record)
        made += holder_made
        made += self._converge_inside(want, record, fresh_holder=fresh)
        record.phase = "Ready"
        record.last_error = None
        record.last_reconciled = now_rfc3339()
        record.conditions = set_condition(
            record.conditions, type="Ready", status="True", reason="Reconciled", message=""
        )
        return made

    def _converge_link(self, want: DesiredEnvironment, record: EnvironmentRecord) -> list[str]:
        assert want.network is not None
        network = self.desired.networks[want.network]
        address = self.plan.addresses[want.name]
        record.host_veth = host_veth_name(self.instance, want.name)
        record.network = want.network
        record.address = address
        self.state.allocations.setdefault(want.network, {})[want.name] = address
        made = self.drivers.network.ensure_env_link(
            netns=record.netns,
            host_name=record.host_veth,
            alias=owner_tag(instance=self.instance, kind="env", name=want.name),
            bridge=network.bridge,
            address_cidr=address,
            gateway=str(network.gateway),
        )
        # Isolate the port at once: until then the bridge could switch frames to it.
        return made + self.drivers.firewall.ensure_port_flags(
            bridge=network.bridge, ports=[record.host_veth]
        )

    def _converge_inside(
        self, want: DesiredEnvironment, record: EnvironmentRecord, *, fresh_holder: bool
    ) -> list[str]:
        """Mounts (made once per holder: a changed mount list recreates the env) and processes."""
        assert record.holder is not None
        holder = ProcessRef(pid=record.holder.pid, start_time=record.holder.start_time)
        spec = want.manifest.spec
        made: list[str] = []
        if fresh_holder and "mnt" in want.namespaces:
            mounts = [
                MountSpec(
                    type=m.type,
                    target=m.target,
                    source=m.source,
                    size=m.size,
                    read_only=m.read_only,
                )
                for m in spec.mounts
            ]
            mounts += self._identity_files(want, record)
            made += apply_mounts(env=want.name, holder=holder, mounts=mounts)
        if not spec.processes and not record.processes:
            return made
        converger = WorkloadConverger(
            env=want.name,
            driver=self.drivers.processes,
            holder=holder,
            cgroup_procs=self.drivers.cgroups.procs_files(env=want.name),
            log_dir=self.drivers.log_root / want.name,
            now=self.now,
            hostname=want.hostname,
        )
        return made + converger.converge(record, list(spec.processes), fresh_holder=fresh_holder)

    def _identity_files(
        self, want: DesiredEnvironment, record: EnvironmentRecord
    ) -> list[MountSpec]:
        """/etc/hosts, /etc/hostname and /etc/resolv.conf of the env, like a container's.

        Environments are offline: the resolver points at the env's own loopback, where
        nothing listens, so a lookup fails at once instead of waiting for a DNS timeout
        (python's http.server, for one, resolves its bind address before listening).
        """
        directory = self.drivers.log_root.parent / "etc" / want.name
        directory.mkdir(parents=True, exist_ok=True, mode=0o755)
        address = record.address.split("/")[0] if record.address else None
        hosts = "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"
        hosts += f"{address or '127.0.1.1'}\t{want.hostname}\n"
        files = {
            "hosts": hosts,
            "hostname": f"{want.hostname}\n",
            "resolv.conf": "# reconciler: environments are offline\n"
            "nameserver 127.0.0.1\noptions timeout:1 attempts:1\n",
        }
        specs = []
        for name, content in files.items():
            path = directory / name
            if not path.exists() or path.read_text() != content:
                path.write_text(content)
            specs.append(
                MountSpec(type="bind", target=f"/etc/{name}", source=str(path), read_only=True)
            )
        return specs

    def _converge_holder(
        self, want: DesiredEnvironment, record: EnvironmentRecord
    ) -> tuple[list[str], bool]:
        """Keep, adopt or start the holder; the flag says its namespaces are new."""
        holders = self.drivers.holders
        if record.holder is not None:
            ref = ProcessRef(pid=record.holder.pid, start_time=record.holder.start_time)
            if holders.alive(ref):
                return [], False
        spec = HolderSpec(
            env=want.name,
            netns_path=pin_path(record.netns),
            hostname=want.hostname,
            namespaces=want.namespaces,
            cgroup_procs=self.drivers.cgroups.procs_files(env=want.name),
        )
        # A crashed run may have started one it never recorded: adopt it, never a second.
        found = holders.find(spec)
        if found is not None:
            record.holder = ProcessRecord(pid=found.pid, start_time=found.start_time)
            return [f"holder adopted (pid {found.pid})"], False
        ref = holders.spawn(spec)
        record.holder = ProcessRecord(pid=ref.pid, start_time=ref.start_time)
        return [f"holder started (pid {ref.pid})"], True

    def _teardown_environment(self, change: Change) -> list[str]:
        record = self.state.environments.get(change.name)
        if record is None:
            return []
        record.phase = "Terminating"
        made: list[str] = []
        if record.holder is not None:
            # pid 1 of the env's pid namespace: its death takes every workload with it.
            self.drivers.holders.stop(
                ProcessRef(pid=record.holder.pid, start_time=record.holder.start_time)
            )
            record.holder = None
            record.processes = {}
            made.append("holder stopped")
        if self.drivers.cgroups.remove(env=change.name):
            made.append("cgroup removed")
        if record.host_veth is not None:
            alias = owner_tag(instance=self.instance, kind="env", name=change.name)
            if self.drivers.network.remove_env_link(host_name=record.host_veth, alias=alias):
                made.append(f"veth {record.host_veth} removed")
        alias = owner_tag(instance=self.instance, kind="env", name=change.name)
        if self.drivers.network.remove_netns(
            name=record.netns, inode=record.netns_inode, alias=alias
        ):
            made.append(f"netns {record.netns} removed")
        # The address is released last, and only when the environment goes for good.
        if change.action is Action.DELETE:
            if record.network is not None:
                self.state.allocations.get(record.network, {}).pop(change.name, None)
            shutil.rmtree(self.drivers.log_root / change.name, ignore_errors=True)
            shutil.rmtree(self.drivers.log_root.parent / "etc" / change.name, ignore_errors=True)
        del self.state.environments[change.name]
        return made


def _event_for(change: Change, made: list[str]) -> tuple[str, str]:
    reasons = "; ".join(change.reasons)
    if change.action is Action.CREATE:
        return "Created", f"created ({reasons})"
    if change.action is Action.DELETE:
        return "Deleted", f"deleted ({reasons})"
    if change.action is Action.RECREATE:
        return "Recreated", f"recreated: {reasons}"
    drift = [r for r in change.reasons if r.startswith("drift:")]
    if drift and len(drift) == len(change.reasons):
        return "DriftRepaired", "; ".join(drift)
    return "Updated", f"updated: {reasons}" + (f" ({'; '.join(made)})" if made else "")


def _network_record(want: DesiredNetwork, previous: NetworkRecord | None) -> NetworkRecord:
    conditions = set_condition(
        previous.conditions if previous else [], type="Ready", status="True", reason="Reconciled"
    )
    return NetworkRecord(
        spec=dict(want.spec),
        spec_hash=want.spec_hash,
        file=want.source.rsplit(":", 1)[0],
        bridge=want.bridge,
        subnet=str(want.subnet),
        gateway=str(want.gateway),
        phase="Ready",
        conditions=conditions,
        last_reconciled=now_rfc3339(),
    )


def _environment_record(
    instance: str, want: DesiredEnvironment, previous: EnvironmentRecord | None
) -> EnvironmentRecord:
    record = EnvironmentRecord(
        spec=dict(want.spec),
        spec_hash=want.spec_hash,
        file=want.file,
        labels=dict(want.labels),
        netns=previous.netns if previous else netns_name(instance, want.name),
        host_veth=previous.host_veth if previous else None,
        network=want.network,
        address=previous.address if previous else None,
        cgroup_paths=list(previous.cgroup_paths) if previous else [],
        holder=previous.holder if previous else None,
        processes={n: w.model_copy() for n, w in previous.processes.items()} if previous else {},
        probes=dict(previous.probes) if previous else {},
        violations=list(previous.violations) if previous else [],
        # A change of the environment's spec lifts its quarantine (so does `release`).
        quarantine=previous.quarantine
        if previous is not None
        and previous.quarantine is not None
        and previous.quarantine.spec_hash == want.spec_hash
        else None,
        netns_inode=previous.netns_inode if previous else None,
        phase=previous.phase if previous else "Pending",
        conditions=list(previous.conditions) if previous else [],
        last_reconciled=previous.last_reconciled if previous else "",
    )
    return record


def apply_plan(
    *,
    instance: str,
    drivers: Drivers,
    events: EventLog,
    state: StateDocument,
    desired: Desired,
    plan: Plan,
) -> tuple[StateDocument, list[Outcome]]:
    """Apply `plan`; returns the updated state (a copy) and an outcome per changed object."""
    working = state.model_copy(deep=True)
    applier = Applier(
        instance=instance, drivers=drivers, events=events, state=working, desired=desired, plan=plan
    )
    outcomes = applier.run()
    return working, outcomes


AddressMap = Mapping[str, str]
