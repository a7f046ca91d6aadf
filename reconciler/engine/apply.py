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
from typing import TypeVar

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
    EnvLinkSpec,
    FirewallDriver,
    HolderDriver,
    HolderSpec,
    NetworkDriver,
    owner_tag,
)
from reconciler.logging_setup import get_logger
from reconciler.state.conditions import now_rfc3339, set_condition
from reconciler.state.events import EventLog
from reconciler.state.model import (
    EnvironmentRecord,
    NetworkRecord,
    Phase,
    ProcessRecord,
    StateDocument,
)

log = get_logger("reconciler.engine")

# How long a torn-down namespace may take to take its veth along before we delete the
# veth ourselves (measured: ~0.1 s for 200 namespaces dying together).
_LINKS_GONE_TIMEOUT = 2.0


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
        envs = [c for c in changes if c.kind == "Environment"]
        self._teardown_environments([c for c in envs if c.action in teardown])
        for change in changes:
            if change.kind == "Network" and change.action in teardown:
                self._guard(change, self._teardown_network, final=change.action is Action.DELETE)
        for change in changes:
            if change.kind == "Network" and change.action is not Action.DELETE:
                self._guard(change, self._converge_network, final=True)
        self._converge_environments([c for c in envs if c.action is not Action.DELETE])
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

    def _records(self, change: Change) -> dict[str, EnvironmentRecord] | dict[str, NetworkRecord]:
        return self.state.environments if change.kind == "Environment" else self.state.networks

    def _failures_before(self, change: Change) -> int:
        before = self._records(change).get(change.name)
        return before.consecutive_failures if before is not None else 0

    def _guard(self, change: Change, step: Callable[[Change], list[str]], *, final: bool) -> None:
        """Run one step; record success (when `final`) or failure on the object's record.

        The failure count is read before the step (which may rebuild the record).
        """
        failures = self._failures_before(change)
        try:
            made = step(change)
        except (ReconcilerError, OSError) as exc:
            self._fail(change, exc, failures=failures)
            return
        if final:
            self._succeed(change, made)

    def _succeed(self, change: Change, made: list[str]) -> None:
        """Reset the record's failure count, Reconciling/Stalled False, outcome + event."""
        record = self._records(change).get(change.name)
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
        log.info(
            f"{change.kind.lower()}.{reason.lower()}",
            kind=change.kind,
            name=change.name,
            action=str(change.action),
            changes=made,
        )
        self.events.emit(
            type="Normal", reason=reason, kind=change.kind, name=change.name, message=message
        )

    def _fail(self, change: Change, exc: BaseException, *, failures: int) -> None:
        """The object failed (`failures` earlier failures in a row): record, outcome, event."""
        message = str(exc) if isinstance(exc, ReconcilerError) else f"{type(exc).__name__}: {exc}"
        log.warning(
            "object.failed",
            kind=change.kind,
            name=change.name,
            action=str(change.action),
            error=message,
        )
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

    def _mark_failed(self, change: Change, message: str, *, failures: int = 1) -> None:
        """Failed `failures` times in a row: Ready=False; retrying, or Stalled from 5 on."""
        record = self._records(change).get(change.name)
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

    def _converge_environments(self, changes: list[Change]) -> None:
        """Converge every environment of the plan, one stage at a time across all of them.

        Stages: record + cgroup; network namespaces (created together); links (fresh
        ones batched); port isolation; holders (spawned together); mounts and processes.
        Batching is what makes 200 environments cost a few hundred syscalls instead of
        thousands of round trips; an env that fails a stage is reported and skipped by
        the later ones, the others carry on.
        """
        if not changes:
            return
        if any(c.action in (Action.CREATE, Action.RECREATE) for c in changes):
            # New holders will be needed: the forker boots while cgroups and links are
            # made (a holder found dead elsewhere starts it on demand).
            self.drivers.holders.start()
        work: dict[str, _EnvWork] = {}
        for change in changes:
            failures = self._failures_before(change)
            try:
                work[change.name] = self._start_environment(change, failures=failures)
            except (ReconcilerError, OSError) as exc:
                self._fail(change, exc, failures=failures)
        self._stage(work, self._converge_netns)
        self._stage(work, self._converge_links)
        self._stage(work, self._converge_holders)
        for name, item in list(work.items()):
            try:
                item.made += self._converge_inside(
                    item.want, item.record, fresh_holder=item.fresh_holder
                )
            except (ReconcilerError, OSError) as exc:
                self._fail(item.change, exc, failures=item.failures)
                continue
            record = item.record
            record.phase = "Ready"
            record.last_error = None
            record.last_reconciled = now_rfc3339()
            record.conditions = set_condition(
                record.conditions, type="Ready", status="True", reason="Reconciled", message=""
            )
            self._succeed(item.change, item.made)
            del work[name]

    def _stage(
        self, work: dict[str, W], stage: Callable[[list[W]], Mapping[str, BaseException]]
    ) -> None:
        """Run one stage over the envs still in `work`; drop (and report) those it failed."""
        if not work:
            return
        try:
            failed = stage(list(work.values()))
        except (ReconcilerError, OSError) as exc:
            failed = dict.fromkeys(work, exc)
        for name, error in failed.items():
            item = work.pop(name)
            self._fail(item.change, error, failures=item.failures)

    def _start_environment(self, change: Change, *, failures: int) -> _EnvWork:
        """Preconditions, the record (from the previous one) and the cgroup."""
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
        item = _EnvWork(change=change, want=want, record=record, failures=failures)
        item.previous_inode = previous.netns_inode if previous is not None else None
        item.made += self.drivers.cgroups.ensure(env=want.name, limits=want.limits)
        record.cgroup_paths = list(self.drivers.cgroups.paths(env=want.name))
        return item

    def _env_alias(self, name: str) -> str:
        return owner_tag(instance=self.instance, kind="env", name=name)

    def _converge_netns(self, items: list[_EnvWork]) -> dict[str, BaseException]:
        results = self.drivers.network.ensure_netns_many(
            [(item.record.netns, self._env_alias(item.want.name)) for item in items]
        )
        failed: dict[str, BaseException] = {}
        for item in items:
            result = results[item.record.netns]
            if isinstance(result, Exception):
                failed[item.want.name] = result
                continue
            if item.previous_inode not in (None, result.inode):
                item.made.append(f"netns {item.record.netns} re-created")
            item.record.netns_inode = result.inode
        return failed

    def _converge_links(self, items: list[_EnvWork]) -> dict[str, BaseException]:
        """Veth pairs and addressing, then the isolation of every new port.

        The fresh path isolates a port right after creating it; `ensure_port_flags`
        covers the careful path (until then the bridge could switch frames to it).
        """
        specs: dict[str, _EnvWork] = {}
        for item in items:
            want, record = item.want, item.record
            if want.network is None:
                continue
            address = self.plan.addresses[want.name]
            record.host_veth = host_veth_name(self.instance, want.name)
            record.network = want.network
            record.address = address
            self.state.allocations.setdefault(want.network, {})[want.name] = address
            network = self.desired.networks[want.network]
            item.link = EnvLinkSpec(
                netns=record.netns,
                host_name=record.host_veth,
                alias=self._env_alias(want.name),
                bridge=network.bridge,
                address_cidr=address,
                gateway=str(network.gateway),
            )
            specs[record.host_veth] = item
        if not specs:
            return {}
        results = self.drivers.network.ensure_env_links([i.link for i in specs.values() if i.link])
        failed: dict[str, BaseException] = {}
        by_bridge: dict[str, list[_EnvWork]] = {}
        for host_name, item in specs.items():
            result = results[host_name]
            if isinstance(result, Exception):
                failed[item.want.name] = result
                continue
            item.made += result
            assert item.link is not None
            by_bridge.setdefault(item.link.bridge, []).append(item)
        firewall = self.drivers.firewall
        for bridge, ported in by_bridge.items():
            ports = {item.record.host_veth: item for item in ported if item.record.host_veth}
            try:
                made = firewall.ensure_port_flags(bridge=bridge, ports=list(ports))
            except (ReconcilerError, OSError):
                # Attribute the failure to the port(s) it belongs to: one at a time.
                for port, item in ports.items():
                    try:
                        item.made += firewall.ensure_port_flags(bridge=bridge, ports=[port])
                    except (ReconcilerError, OSError) as exc:
                        failed[item.want.name] = exc
                continue
            for port, item in ports.items():
                item.made += [c for c in made if c.startswith(f"bridge port {port}:")]
        return failed

    def _converge_holders(self, items: list[_EnvWork]) -> dict[str, BaseException]:
        """Keep, adopt or start each env's holder; the new ones are spawned together."""
        holders = self.drivers.holders
        spawn: list[tuple[_EnvWork, HolderSpec]] = []
        failed: dict[str, BaseException] = {}
        for item in items:
            record, want = item.record, item.want
            if record.holder is not None:
                ref = record.holder.ref
                if holders.alive(ref):
                    continue
            spec = HolderSpec(
                env=want.name,
                netns_path=pin_path(record.netns),
                hostname=want.hostname,
                namespaces=want.namespaces,
                cgroup_procs=self.drivers.cgroups.procs_files(env=want.name),
            )
            # A crashed run may have started one it never recorded: adopt it, never a second.
            try:
                found = holders.find(spec)
            except (ReconcilerError, OSError) as exc:
                failed[want.name] = exc
                continue
            if found is not None:
                record.holder = ProcessRecord(pid=found.pid, start_time=found.start_time)
                item.made.append(f"holder adopted (pid {found.pid})")
                continue
            spawn.append((item, spec))
        if not spawn:
            return failed
        results = holders.spawn_many([spec for _, spec in spawn])
        for (item, _), result in zip(spawn, results, strict=True):
            if isinstance(result, Exception):
                failed[item.want.name] = result
                continue
            item.record.holder = ProcessRecord(pid=result.pid, start_time=result.start_time)
            item.made.append(f"holder started (pid {result.pid})")
            item.fresh_holder = True
        return failed

    def _converge_inside(
        self, want: DesiredEnvironment, record: EnvironmentRecord, *, fresh_holder: bool
    ) -> list[str]:
        """Mounts (made once per holder: a changed mount list recreates the env) and processes."""
        assert record.holder is not None
        holder = record.holder.ref
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

    def _teardown_environments(self, changes: list[Change]) -> None:
        """Tear environments down together: holders, cgroups, namespaces, then links.

        All holders are killed at once (each is pid 1 of its env: its death takes every
        workload along), all cgroups emptied and removed with one wait, all namespaces
        unpinned. A namespace then dies with its last reference and takes its veth pair
        along, and the kernel batches the teardown of namespaces that die together (one
        RCU grace period for all of them instead of one per deleted veth). The record
        is dropped only when the host shows the veth gone; a veth still there after the
        wait (its namespace is kept alive by something else) is deleted by its tag.
        """
        work: dict[str, _Teardown] = {}
        for change in changes:
            record = self.state.environments.get(change.name)
            if record is None:
                if change.action is Action.DELETE:
                    self._succeed(change, [])
                continue
            record.phase = "Terminating"
            work[change.name] = _Teardown(
                change=change, record=record, failures=self._failures_before(change)
            )
        if not work:
            return
        self._stage(work, self._stop_holders)
        self._stage(work, self._remove_cgroups)
        self._stage(work, self._unpin_netns)
        self._stage(work, self._await_links)
        for name, item in work.items():
            change, record = item.change, item.record
            # The address is released last, and only when the environment goes for good.
            if change.action is Action.DELETE:
                if record.network is not None:
                    self.state.allocations.get(record.network, {}).pop(name, None)
                shutil.rmtree(self.drivers.log_root / name, ignore_errors=True)
                shutil.rmtree(self.drivers.log_root.parent / "etc" / name, ignore_errors=True)
            del self.state.environments[name]
            if change.action is Action.DELETE:
                self._succeed(change, item.made)

    def _stop_holders(self, items: list[_Teardown]) -> dict[str, BaseException]:
        holders = [(i, i.record.holder.ref) for i in items if i.record.holder is not None]
        stopping = [item for item, _ in holders]
        refs = [ref for _, ref in holders]
        failed: dict[str, BaseException] = {}
        for item, error in zip(stopping, self.drivers.holders.stop_many(refs), strict=True):
            if error is not None:
                failed[item.change.name] = error
                continue
            item.record.holder = None
            item.record.processes = {}
            item.made.append("holder stopped")
        return failed

    def _remove_cgroups(self, items: list[_Teardown]) -> dict[str, BaseException]:
        results = self.drivers.cgroups.remove_many([i.change.name for i in items])
        failed: dict[str, BaseException] = {}
        for item in items:
            result = results[item.change.name]
            if isinstance(result, Exception):
                failed[item.change.name] = result
            elif result:
                item.made.append("cgroup removed")
        return failed

    def _unpin_netns(self, items: list[_Teardown]) -> dict[str, BaseException]:
        failed: dict[str, BaseException] = {}
        for item in items:
            record = item.record
            try:
                removed = self.drivers.network.remove_netns(
                    name=record.netns,
                    inode=record.netns_inode,
                    alias=self._env_alias(item.change.name),
                )
            except (ReconcilerError, OSError) as exc:
                failed[item.change.name] = exc
                continue
            if removed:
                item.made.append(f"netns {record.netns} removed")
        return failed

    def _await_links(self, items: list[_Teardown]) -> dict[str, BaseException]:
        veths = {i.record.host_veth: i for i in items if i.record.host_veth is not None}
        if not veths:
            return {}
        left = self.drivers.network.wait_links_gone(list(veths), timeout=_LINKS_GONE_TIMEOUT)
        failed: dict[str, BaseException] = {}
        for veth, item in veths.items():
            if veth not in left:
                item.made.append(f"veth {veth} removed")
                continue
            try:
                if self.drivers.network.remove_env_link(
                    host_name=veth, alias=self._env_alias(item.change.name)
                ):
                    item.made.append(f"veth {veth} removed")
            except (ReconcilerError, OSError) as exc:
                failed[item.change.name] = exc
        return failed


@dataclass(kw_only=True)
class _Work:
    """One environment going through the stages of a batch."""

    change: Change
    record: EnvironmentRecord
    failures: int  # consecutive failures before this attempt
    made: list[str] = field(default_factory=list)


W = TypeVar("W", bound=_Work)


@dataclass(kw_only=True)
class _EnvWork(_Work):
    """One environment being converged, carried from stage to stage."""

    want: DesiredEnvironment
    previous_inode: int | None = None
    link: EnvLinkSpec | None = None
    fresh_holder: bool = False


class _Teardown(_Work):
    """One environment being torn down, carried from stage to stage."""


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
    working = state.clone()
    applier = Applier(
        instance=instance, drivers=drivers, events=events, state=working, desired=desired, plan=plan
    )
    outcomes = applier.run()
    return working, outcomes


AddressMap = Mapping[str, str]
