"""Builders shared by the unit tests: manifests, desired state, records and observations.

Manifests are built as plain data and loaded through the real loader (`load_text`), so a
test exercises the same path as a user's file. `converged()` builds the recorded state
and the kernel observation of a world in which `apply` has just succeeded: a plan against
it must be all no-ops, and each plan test breaks exactly one thing on top of it.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Iterable, Mapping
from typing import Any

import yaml

from reconciler.engine.desired import Desired, DesiredEnvironment, DesiredNetwork, build_desired
from reconciler.engine.ipam import Claim, allocate
from reconciler.engine.observe import Observation
from reconciler.engine.plan import Plan, make_plan
from reconciler.engine.workloads import process_hash
from reconciler.kernel.naming import host_veth_name, netns_name
from reconciler.kernel.types import (
    CgroupLimits,
    CgroupState,
    CgroupUsage,
    LinkState,
    NetnsState,
    NetworkObservation,
    owner_tag,
)
from reconciler.manifests.crosscheck import crosscheck
from reconciler.manifests.loader import LoadResult, load_text
from reconciler.state.model import (
    EnvironmentRecord,
    NetworkRecord,
    ProcessRecord,
    StateDocument,
    WorkloadRecord,
)

API = "reconciler/v1"
INSTANCE = "rtunit"
DEVICE = "254:0"
NETNS_DEV = 4


def resolve_device(path: str) -> str:
    """The resolver the tests inject: every block device is 254:0."""
    return DEVICE


# --------------------------------------------------------------------------- manifests

# The contract's example (section 2), plus the `frontend` its ingress rule names.
CONTRACT_EXAMPLE = """\
apiVersion: reconciler/v1
kind: Network
metadata: {name: devnet}
spec:
  subnet: 10.213.0.0/24
  gateway: 10.213.0.1
  bridge: rcbr-devnet
  isolation: strict
---
apiVersion: reconciler/v1
kind: Environment
metadata: {name: payments, labels: {team: pay}}
spec:
  hostname: payments
  namespaces: [net, uts, ipc, mnt, pid]
  network: {name: devnet, address: 10.213.0.10}
  resources:
    memory: 256Mi
    cpu: 500m
    pids: 128
    io:
      - {device: /dev/vda, readBps: 50Mi, writeBps: 20Mi, readIops: 2000, writeIops: 1000}
  mounts:
    - {type: tmpfs, target: /tmp, size: 64Mi}
    - {type: bind, source: /srv/payments, target: /srv/payments, readOnly: true}
  processes:
    - name: api
      command: [python3, -m, http.server, "8080"]
      env: {PORT: "8080"}
      workingDir: /
      user: nobody
      restartPolicy: Always
  probes:
    - name: api-up
      tcp: {port: 8080}
      periodSeconds: 5
      timeoutSeconds: 1
      failureThreshold: 3
      onFailure: restart
  policy:
    ingress:
      - from: {environment: frontend}
        ports: [8080]
        protocol: tcp
    onViolation: alert
---
apiVersion: reconciler/v1
kind: Environment
metadata: {name: frontend}
spec:
  network: {name: devnet}
"""


def network_doc(name: str = "devnet", subnet: str = "10.213.0.0/24", **spec: Any) -> dict[str, Any]:
    """A Network document; extra keyword arguments are spec fields (camelCase)."""
    return {
        "apiVersion": API,
        "kind": "Network",
        "metadata": {"name": name},
        "spec": {"subnet": subnet, **spec},
    }


def env_doc(
    name: str = "web",
    *,
    network: str | None = None,
    address: str | None = None,
    labels: Mapping[str, str] | None = None,
    **spec: Any,
) -> dict[str, Any]:
    """An Environment document; extra keyword arguments are spec fields (camelCase)."""
    body: dict[str, Any] = dict(spec)
    if network is not None:
        body["network"] = {"name": network, **({"address": address} if address else {})}
    metadata: dict[str, Any] = {"name": name}
    if labels:
        metadata["labels"] = dict(labels)
    return {"apiVersion": API, "kind": "Environment", "metadata": metadata, "spec": body}


def dump(*docs: Mapping[str, Any]) -> str:
    """Documents as one multi-document YAML text, in the order given."""
    return yaml.safe_dump_all([dict(d) for d in docs], sort_keys=False)


def load(
    files: Mapping[str, str | Iterable[Mapping[str, Any]]], *, check: bool = True
) -> LoadResult:
    """Load {file name: YAML text or documents} like a manifests directory, then crosscheck."""
    result = LoadResult()
    for file, content in files.items():
        text = content if isinstance(content, str) else dump(*content)
        result.files.append(file)
        load_text(text, display=file, into=result)
    return crosscheck(result, resolve_device=resolve_device) if check else result


def load_one(text: str, *, file: str = "m.yaml") -> LoadResult:
    """Load one file's text, without cross-checks."""
    return load({file: text}, check=False)


def desired(files: Mapping[str, str | Iterable[Mapping[str, Any]]]) -> Desired:
    """The Desired state of a set of files (loaded, cross-checked, built)."""
    return build_desired(load(files), resolve_device=resolve_device)


# --------------------------------------------------------------------------- addresses


def allocate_addresses(want: Desired, state: StateDocument | None = None) -> dict[str, str]:
    """Every env's address ("a.b.c.d/len") as the engine would allocate it."""
    out: dict[str, str] = {}
    for net in want.networks.values():
        recorded = (state.allocations if state else {}).get(net.name, {})
        claims = {
            name: Claim(
                static=env.static_address,
                recorded=ipaddress.IPv4Interface(recorded[name]).ip if name in recorded else None,
            )
            for name, env in want.environments.items()
            if env.network == net.name
        }
        got, _ = allocate(subnet=net.subnet, gateway=net.gateway, claims=claims)
        out.update({name: f"{addr}/{net.subnet.prefixlen}" for name, addr in got.items()})
    return out


# --------------------------------------------------------------------------- records


def network_record(net: DesiredNetwork) -> NetworkRecord:
    """The record `apply` writes after creating `net`."""
    return NetworkRecord(
        spec=dict(net.spec),
        spec_hash=net.spec_hash,
        file=net.source.rsplit(":", 1)[0],
        bridge=net.bridge,
        subnet=str(net.subnet),
        gateway=str(net.gateway),
        phase="Ready",
    )


def holder_pid(env: str) -> int:
    """A fake, stable holder pid per environment."""
    return 1000 + sum(env.encode())


def netns_inode(env: str) -> int:
    """A fake, stable netns inode per environment."""
    return 4026530000 + sum(env.encode())


def env_record(env: DesiredEnvironment, *, address: str | None) -> EnvironmentRecord:
    """The record `apply` writes after creating `env` with `address`."""
    return EnvironmentRecord(
        spec=dict(env.spec),
        spec_hash=env.spec_hash,
        file=env.file,
        labels=dict(env.labels),
        netns=netns_name(INSTANCE, env.name),
        host_veth=host_veth_name(INSTANCE, env.name) if env.network else None,
        network=env.network,
        address=address,
        cgroup_paths=[f"/sys/fs/cgroup/memory/{INSTANCE}/{env.name}"],
        holder=ProcessRecord(pid=holder_pid(env.name), start_time=42),
        processes={
            p.name: WorkloadRecord(
                pid=holder_pid(env.name) + 1 + i,
                start_time=43,
                spec_hash=process_hash(p),
                state="Running",
            )
            for i, p in enumerate(env.manifest.spec.processes)
        },
        netns_inode=netns_inode(env.name),
        phase="Ready",
    )


def recorded(want: Desired, addrs: Mapping[str, str]) -> StateDocument:
    """The state file after a successful apply of `want`."""
    allocations: dict[str, dict[str, str]] = {}
    for name, env in want.environments.items():
        if env.network is not None and name in addrs:
            allocations.setdefault(env.network, {})[name] = addrs[name]
    return StateDocument(
        instance=INSTANCE,
        networks={n: network_record(net) for n, net in want.networks.items()},
        environments={
            n: env_record(env, address=addrs.get(n)) for n, env in want.environments.items()
        },
        allocations=allocations,
    )


# --------------------------------------------------------------------------- observations


def bridge_link(net: DesiredNetwork, index: int) -> LinkState:
    """The bridge as the kernel shows it after apply."""
    return LinkState(
        name=net.bridge,
        index=index,
        kind="bridge",
        up=True,
        master=None,
        alias=owner_tag(instance=INSTANCE, kind="network", name=net.name),
        addresses=(net.gateway_cidr,),
    )


def observed(want: Desired, state: StateDocument) -> Observation:
    """The kernel after a successful apply of `want`, recorded as `state`."""
    links: dict[str, LinkState] = {}
    netns: dict[str, NetnsState] = {}
    cgroups: dict[str, CgroupState] = {}
    alive: dict[str, bool] = {}
    workloads: dict[str, dict[str, bool]] = {}
    for index, net in enumerate(want.networks.values(), start=10):
        links[net.bridge] = bridge_link(net, index)
    for index, (name, rec) in enumerate(state.environments.items(), start=100):
        env = want.environments.get(name)
        inside = {"lo": LinkState("lo", 1, None, True, None, None, ("127.0.0.1/8",))}
        if rec.host_veth is not None and rec.network is not None:
            bridge = state.networks[rec.network].bridge
            links[rec.host_veth] = LinkState(
                name=rec.host_veth,
                index=index,
                kind="veth",
                up=True,
                master=bridge,
                alias=owner_tag(instance=INSTANCE, kind="env", name=name),
            )
            inside["eth0"] = LinkState(
                "eth0", 2, "veth", True, None, None, (rec.address,) if rec.address else ()
            )
        gateway = state.networks[rec.network].gateway if rec.network else None
        netns[rec.netns] = NetnsState(
            name=rec.netns,
            inode=rec.netns_inode or 1,
            dev=NETNS_DEV,
            links=inside,
            default_gateway=gateway,
        )
        limits = env.limits if env is not None else CgroupLimits()
        cgroups[name] = CgroupState(
            env=name,
            paths=tuple(rec.cgroup_paths),
            limits=limits,
            usage=CgroupUsage(),
            complete=True,
        )
        alive[name] = True
        workloads[name] = {process: True for process in rec.processes}
    return Observation(
        network=NetworkObservation(host_links=links, netns=netns),
        cgroups=cgroups,
        holders_alive=alive,
        workloads_alive=workloads,
    )


@dataclasses.dataclass(frozen=True)
class World:
    """A converged world: desired state, the state file and the kernel, all agreeing."""

    desired: Desired
    state: StateDocument
    observation: Observation
    addresses: Mapping[str, str]

    def plan(
        self,
        *,
        desired: Desired | None = None,
        state: StateDocument | None = None,
        observation: Observation | None = None,
        addresses: Mapping[str, str] | None = None,
    ) -> Plan:
        """Plan with any of the three views replaced (addresses follow a new desired)."""
        want = desired or self.desired
        have = state or self.state
        if addresses is None:
            addresses = self.addresses if desired is None else allocate_addresses(want, have)
        return make_plan(
            instance=INSTANCE,
            desired=want,
            recorded=have,
            observed=observation or self.observation,
            addresses=addresses,
        )


def converged(files: Mapping[str, str | Iterable[Mapping[str, Any]]]) -> World:
    """A world in which `files` have been applied successfully."""
    want = desired(files)
    addrs = allocate_addresses(want)
    state = recorded(want, addrs)
    return World(desired=want, state=state, observation=observed(want, state), addresses=addrs)


# --------------------------------------------------------------------------- edits


def with_host_link(obs: Observation, name: str, link: LinkState | None) -> Observation:
    """`obs` with one host link replaced (None: deleted)."""
    links = dict(obs.network.host_links)
    if link is None:
        links.pop(name)
    else:
        links[name] = link
    return dataclasses.replace(
        obs, network=NetworkObservation(host_links=links, netns=obs.network.netns)
    )


def with_netns(obs: Observation, name: str, ns: NetnsState | None) -> Observation:
    """`obs` with one netns replaced (None: gone)."""
    spaces = dict(obs.network.netns)
    if ns is None:
        spaces.pop(name)
    else:
        spaces[name] = ns
    return dataclasses.replace(
        obs, network=NetworkObservation(host_links=obs.network.host_links, netns=spaces)
    )


def with_netns_link(obs: Observation, netns: str, name: str, link: LinkState | None) -> Observation:
    """`obs` with one link inside a netns replaced (None: deleted)."""
    ns = obs.network.netns[netns]
    links = dict(ns.links)
    if link is None:
        links.pop(name)
    else:
        links[name] = link
    return with_netns(obs, netns, dataclasses.replace(ns, links=links))


def with_cgroup(obs: Observation, env: str, state: CgroupState | None) -> Observation:
    """`obs` with one env's cgroup replaced (None: gone)."""
    groups = dict(obs.cgroups)
    if state is None:
        groups.pop(env)
    else:
        groups[env] = state
    return dataclasses.replace(obs, cgroups=groups)


def line_of(text: str, needle: str) -> int:
    """The 1-based number of the only line of `text` containing `needle`."""
    found = [n for n, line in enumerate(text.splitlines(), start=1) if needle in line]
    assert len(found) == 1, f"{needle!r} found on lines {found}"
    return found[0]
