"""Desired state: validated manifests turned into what the engine converges to.

Everything the plan compares is derived here once: bridge names, gateways, cgroup limits
with block devices resolved to MAJ:MIN, the normalised spec and its hash. The set of
`protected` keys (declared by a file that failed to load) is carried along, because the
plan must never delete them.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from reconciler.kernel.types import CgroupLimits, IoLimit

if TYPE_CHECKING:  # building the manifest models costs ~50 ms: `destroy` never needs them
    from reconciler.manifests.loader import LoadResult, Located
    from reconciler.manifests.models import Environment, Network

Key = tuple[str, str]


def spec_hash(spec: Mapping[str, Any]) -> str:
    """A short stable hash of a normalised spec."""
    text = json.dumps(spec, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class DesiredNetwork:
    """A Network as it should exist."""

    name: str
    bridge: str
    subnet: ipaddress.IPv4Network
    gateway: ipaddress.IPv4Address
    isolation: str
    spec: Mapping[str, Any]
    spec_hash: str
    source: str  # file:line

    @property
    def gateway_cidr(self) -> str:
        """The gateway with the subnet's prefix length, as configured on the bridge."""
        return f"{self.gateway}/{self.subnet.prefixlen}"


@dataclass(frozen=True)
class DesiredEnvironment:
    """An Environment as it should exist."""

    name: str
    manifest: Environment
    spec: Mapping[str, Any]
    spec_hash: str
    labels: Mapping[str, str]
    hostname: str
    namespaces: frozenset[str]
    network: str | None
    static_address: ipaddress.IPv4Address | None
    limits: CgroupLimits
    source: str
    file: str


@dataclass(frozen=True)
class Desired:
    """Everything declared, plus what must not be pruned."""

    networks: Mapping[str, DesiredNetwork] = field(default_factory=dict)
    environments: Mapping[str, DesiredEnvironment] = field(default_factory=dict)
    protected_keys: frozenset[Key] = frozenset()
    protected_files: frozenset[str] = frozenset()
    complete: bool = True  # False: some file failed; pruning is limited to what is provable

    def protects(self, *, kind: str, name: str, file: str | None) -> bool:
        """True when pruning (kind, name) is forbidden because its manifest failed to load."""
        return (kind, name) in self.protected_keys or (
            file is not None and file in self.protected_files
        )


DeviceResolver = Callable[[str], str]


def build_desired(result: LoadResult, *, resolve_device: DeviceResolver) -> Desired:
    """Turn a (cross-checked) load result into the desired state."""
    from reconciler.manifests.models import Network

    networks: dict[str, DesiredNetwork] = {}
    environments: dict[str, DesiredEnvironment] = {}
    for located in result.manifests:
        manifest = located.manifest
        if isinstance(manifest, Network):
            networks[manifest.metadata.name] = _network(manifest, located)
        else:
            environments[manifest.metadata.name] = _cached_environment(
                manifest, located, resolve_device
            )
    return Desired(
        networks=networks,
        environments=environments,
        protected_keys=frozenset(result.failed_keys),
        protected_files=frozenset(result.failed_files),
        complete=result.ok,
    )


# id(located) -> (located, what it builds): the loader hands out the same `Located` for
# an unchanged file (see `manifests.loader`), so a resync rebuilds only what changed.
# The entry keeps `located` alive, so its id cannot be reused while cached. Envs with
# I/O limits are not cached: their device numbers are resolved anew each time.
_ENVIRONMENTS: dict[int, tuple[Located, DesiredEnvironment]] = {}
_ENVIRONMENTS_MAX = 4096


def _cached_environment(
    manifest: Environment, located: Located, resolve_device: DeviceResolver
) -> DesiredEnvironment:
    cached = _ENVIRONMENTS.get(id(located))
    if cached is not None and cached[0] is located:
        return cached[1]
    built = _environment(manifest, located, resolve_device)
    if not manifest.spec.resources.io:
        if len(_ENVIRONMENTS) >= _ENVIRONMENTS_MAX:
            _ENVIRONMENTS.clear()
        _ENVIRONMENTS[id(located)] = (located, built)
    return built


def _network(manifest: Network, located: Located) -> DesiredNetwork:
    from reconciler.manifests.models import spec_dict

    spec = spec_dict(manifest)
    return DesiredNetwork(
        name=manifest.metadata.name,
        bridge=manifest.bridge_name,
        subnet=manifest.spec.subnet,
        gateway=manifest.spec.effective_gateway(),
        isolation=manifest.spec.isolation,
        spec=spec,
        spec_hash=spec_hash(spec),
        source=located.where(),
    )


def _environment(
    manifest: Environment, located: Located, resolve_device: DeviceResolver
) -> DesiredEnvironment:
    from reconciler.manifests.models import spec_dict

    spec = spec_dict(manifest)
    attachment = manifest.spec.network
    resources = manifest.spec.resources
    limits = CgroupLimits(
        memory_bytes=resources.memory,
        cpu_millis=resources.cpu,
        pids=resources.pids,
        io=tuple(
            IoLimit(
                device=resolve_device(entry.device),
                read_bps=entry.read_bps,
                write_bps=entry.write_bps,
                read_iops=entry.read_iops,
                write_iops=entry.write_iops,
            )
            for entry in resources.io
        ),
    )
    return DesiredEnvironment(
        name=manifest.metadata.name,
        manifest=manifest,
        spec=spec,
        spec_hash=spec_hash({"spec": spec, "labels": manifest.metadata.labels}),
        labels=dict(manifest.metadata.labels),
        hostname=manifest.hostname,
        namespaces=frozenset(manifest.spec.namespaces),
        network=attachment.name if attachment else None,
        static_address=attachment.address if attachment else None,
        limits=limits,
        source=located.where(),
        file=located.file,
    )
