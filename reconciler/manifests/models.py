"""The manifest kinds, `Network` and `Environment`, as strict pydantic models.

Strict means: unknown fields are errors (a typo must never pass silently), names are
DNS-1123 labels, quantities are parsed exactly and stored normalised (bytes, millicores),
and every rule that concerns one document is checked here. Rules that span documents
(an environment's network exists, addresses are unique, subnets don't overlap) live in
`reconciler.manifests.crosscheck`.

Field names are snake_case in Python and camelCase in YAML (the alias), as in Kubernetes.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from reconciler.manifests.quantities import parse_bytes, parse_cpu_millis

API_VERSION = "reconciler/v1"
ALL_NAMESPACES: tuple[str, ...] = ("net", "uts", "ipc", "mnt", "pid")
# Used with fullmatch(): `$` alone also matches before a trailing newline ("web\n").
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
HOSTNAME = re.compile(
    r"^[A-Za-z0-9]([-A-Za-z0-9]*[A-Za-z0-9])?(\.[A-Za-z0-9]([-A-Za-z0-9]*[A-Za-z0-9])?)*$"
)
IFNAME = re.compile(r"^[A-Za-z0-9_.-]{1,15}$")
ENV_VAR = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
MIN_PREFIX, MAX_PREFIX = 16, 30


def _dns_label(value: str) -> str:
    if len(value) > 63:
        raise ValueError(f"{value!r} is longer than 63 characters")
    if not DNS_LABEL.fullmatch(value):
        raise ValueError(
            f"{value!r} is not a DNS-1123 label "
            "(lowercase letters, digits and '-', starting and ending with a letter or digit)"
        )
    return value


def _quantity_schema(description: str) -> WithJsonSchema:
    return WithJsonSchema(
        {
            "anyOf": [
                {
                    "type": "string",
                    "pattern": r"^[+]?(\d+(\.\d*)?|\.\d+)([KMGTPE]i|[kMGTPEm]|[eE][+-]?\d+)?$",
                },
                {"type": "number", "minimum": 0},
            ],
            "description": description,
        }
    )


def _ipv4_address(value: object) -> ipaddress.IPv4Address:
    try:
        return ipaddress.IPv4Address(str(value))
    except ValueError:
        raise ValueError(f"{value!r} is not an IPv4 address") from None


def _ipv4_network(value: object) -> ipaddress.IPv4Network:
    try:
        return ipaddress.IPv4Network(str(value), strict=True)
    except ValueError as exc:
        if "has host bits set" in str(exc):
            fixed = ipaddress.IPv4Network(str(value), strict=False)
            raise ValueError(f"{value!r} has host bits set; did you mean {fixed}?") from None
        raise ValueError(f"{value!r} is not an IPv4 subnet like 10.213.0.0/24") from None


DnsLabel = Annotated[
    str,
    AfterValidator(_dns_label),
    WithJsonSchema({"type": "string", "pattern": DNS_LABEL.pattern, "maxLength": 63}),
]
Bytes = Annotated[
    int,
    BeforeValidator(lambda v: parse_bytes(v)),
    _quantity_schema("bytes: a Kubernetes quantity such as 256Mi, 1Gi or 500M"),
]
CpuMillis = Annotated[
    int,
    BeforeValidator(parse_cpu_millis),
    _quantity_schema("CPUs: 500m, 0.5 or 2"),
]
IPv4Addr = Annotated[
    ipaddress.IPv4Address,
    BeforeValidator(_ipv4_address),
    PlainSerializer(str, return_type=str),
    WithJsonSchema({"type": "string", "format": "ipv4"}),
]
IPv4Net = Annotated[
    ipaddress.IPv4Network,
    BeforeValidator(_ipv4_network),
    PlainSerializer(str, return_type=str),
    WithJsonSchema({"type": "string", "description": "IPv4 CIDR, e.g. 10.213.0.0/24"}),
]
# strict: YAML's `yes`/`true` must not turn into 1, and a quoted "80" is a typo worth a line.
Port = Annotated[int, Field(strict=True, ge=1, le=65535)]
Count = Annotated[int, Field(strict=True, ge=1)]
AbsPath = Annotated[str, Field(pattern=r"^/", description="absolute path")]


class _Strict(BaseModel):
    """Base of every manifest model: unknown fields rejected, immutable, camelCase aliases."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class Metadata(_Strict):
    """`metadata`: the object's name and labels."""

    name: DnsLabel
    labels: dict[str, str] = Field(default_factory=dict)


# --------------------------------------------------------------------------- Network


class NetworkSpec(_Strict):
    """A Linux bridge with an IPv4 subnet; environments attach to it with a veth."""

    subnet: IPv4Net
    gateway: IPv4Addr | None = None
    bridge: str | None = None
    isolation: Literal["strict", "open"] = "strict"

    @field_validator("subnet")
    @classmethod
    def _prefix_in_range(cls, subnet: ipaddress.IPv4Network) -> ipaddress.IPv4Network:
        if not MIN_PREFIX <= subnet.prefixlen <= MAX_PREFIX:
            raise ValueError(
                f"prefix length /{subnet.prefixlen} is outside /{MIN_PREFIX}../{MAX_PREFIX}"
            )
        return subnet

    @field_validator("bridge")
    @classmethod
    def _bridge_name(cls, bridge: str | None) -> str | None:
        if bridge is not None and not IFNAME.fullmatch(bridge):
            raise ValueError(
                f"{bridge!r} is not a valid interface name (1..15 of letters, digits, '_.-')"
            )
        return bridge

    @field_validator("gateway")
    @classmethod
    def _gateway_in_subnet(
        cls, gateway: ipaddress.IPv4Address | None, info: ValidationInfo
    ) -> ipaddress.IPv4Address | None:
        # A field validator (not a model one), so the error carries the gateway's line.
        subnet = info.data.get("subnet")  # absent when the subnet itself is invalid
        if gateway is not None and subnet is not None:
            problem = host_address_problem(gateway, subnet)
            if problem:
                raise ValueError(f"gateway {gateway} {problem}")
        return gateway

    def effective_gateway(self) -> ipaddress.IPv4Address:
        """The gateway address: declared, or the first host of the subnet."""
        return self.gateway or next(self.subnet.hosts())


def host_address_problem(
    address: ipaddress.IPv4Address, subnet: ipaddress.IPv4Network
) -> str | None:
    """Why `address` cannot be a host in `subnet`, or None when it can."""
    if address not in subnet:
        return f"is outside the subnet {subnet}"
    if address == subnet.network_address:
        return f"is the network address of {subnet}"
    if address == subnet.broadcast_address:
        return f"is the broadcast address of {subnet}"
    return None


class Network(_Strict):
    """`kind: Network`."""

    api_version: Literal["reconciler/v1"] = Field(alias="apiVersion")
    kind: Literal["Network"]
    metadata: Metadata
    spec: NetworkSpec

    @property
    def bridge_name(self) -> str:
        """The bridge: declared, or derived from the name (see `default_bridge_name`)."""
        return self.spec.bridge or default_bridge_name(self.metadata.name)


def default_bridge_name(network: str) -> str:
    """`rcbr-<name>` when it fits the 15-character interface limit, else a stable hash."""
    name = f"rcbr-{network}"
    if len(name) <= 15:
        return name
    return "rcbr-" + hashlib.sha256(network.encode()).hexdigest()[:10]


# --------------------------------------------------------------------------- Environment


class NetworkAttachment(_Strict):
    """`spec.network`: which Network the environment joins, and optionally its address."""

    name: DnsLabel
    address: IPv4Addr | None = None


class IoDevice(_Strict):
    """Block I/O throttling for one device (path such as /dev/vda)."""

    device: AbsPath
    read_bps: Bytes | None = Field(default=None, alias="readBps")
    write_bps: Bytes | None = Field(default=None, alias="writeBps")
    read_iops: Count | None = Field(default=None, alias="readIops")
    write_iops: Count | None = Field(default=None, alias="writeIops")

    @model_validator(mode="after")
    def _some_limit(self) -> IoDevice:
        if None is self.read_bps is self.write_bps is self.read_iops is self.write_iops:
            raise ValueError("set at least one of readBps, writeBps, readIops, writeIops")
        return self


class Resources(_Strict):
    """`spec.resources`: cgroup limits; each optional (absent means unlimited)."""

    memory: Bytes | None = None
    cpu: CpuMillis | None = None
    pids: Count | None = None
    io: list[IoDevice] = Field(default_factory=list)

    @field_validator("io")
    @classmethod
    def _unique_devices(cls, io: list[IoDevice]) -> list[IoDevice]:
        seen: set[str] = set()
        for entry in io:
            if entry.device in seen:
                raise ValueError(f"device {entry.device} is listed twice")
            seen.add(entry.device)
        return io


class Mount(_Strict):
    """`spec.mounts[]`: a private mount in the environment's mount namespace."""

    type: Literal["tmpfs", "bind"]
    target: AbsPath
    source: AbsPath | None = None
    size: Bytes | None = None
    read_only: bool = Field(default=False, alias="readOnly")

    @model_validator(mode="after")
    def _fields_for_type(self) -> Mount:
        if self.type == "bind" and self.source is None:
            raise ValueError("a bind mount needs a source")
        if self.type == "tmpfs" and self.source is not None:
            raise ValueError("a tmpfs mount takes no source")
        if self.type == "bind" and self.size is not None:
            raise ValueError("size applies to tmpfs mounts only")
        return self


def _user(value: object) -> object:
    # One clear error instead of one per union member. Booleans first: `user: yes` is a
    # YAML boolean, and as an int it would silently become uid 1.
    if isinstance(value, bool):
        raise ValueError(f"expected a user name or uid, got {str(value).lower()} (quote a name)")
    if (isinstance(value, int) and value >= 0) or (isinstance(value, str) and value):
        return value
    raise ValueError(f"expected a user name or a uid >= 0, got {value!r}")


class Process(_Strict):
    """`spec.processes[]`: a workload started inside the environment."""

    name: DnsLabel
    command: Annotated[list[str], Field(min_length=1)]
    env: dict[str, str] = Field(default_factory=dict)
    working_dir: AbsPath = Field(default="/", alias="workingDir")
    user: Annotated[
        Annotated[str, Field(min_length=1)] | Annotated[int, Field(strict=True, ge=0)],
        BeforeValidator(_user),
    ] = "root"
    restart_policy: Literal["Always", "OnFailure", "Never"] = Field(
        default="Always", alias="restartPolicy"
    )

    @field_validator("env")
    @classmethod
    def _env_names(cls, env: dict[str, str]) -> dict[str, str]:
        for key in env:
            if not ENV_VAR.fullmatch(key):
                raise ValueError(f"{key!r} is not a valid environment variable name")
        return env


class TcpCheck(_Strict):
    """Connect to a TCP port inside the environment."""

    port: Port


class HttpCheck(_Strict):
    """GET a path; 200..399 is healthy."""

    port: Port
    path: Annotated[str, Field(pattern=r"^/")] = "/"


class ExecCheck(_Strict):
    """Run a command inside the environment; exit 0 is healthy."""

    command: Annotated[list[str], Field(min_length=1)]


class Probe(_Strict):
    """`spec.probes[]`: a periodic health check and what to do when it fails."""

    name: DnsLabel
    tcp: TcpCheck | None = None
    http: HttpCheck | None = None
    exec: ExecCheck | None = None
    period_seconds: Annotated[int, Field(ge=1, le=3600)] = Field(default=5, alias="periodSeconds")
    timeout_seconds: Annotated[int, Field(ge=1, le=600)] = Field(default=1, alias="timeoutSeconds")
    failure_threshold: Annotated[int, Field(ge=1, le=100)] = Field(
        default=3, alias="failureThreshold"
    )
    on_failure: Literal["restart", "alert"] = Field(default="restart", alias="onFailure")
    restart: list[DnsLabel] = Field(default_factory=list)

    @model_validator(mode="after")
    def _exactly_one_check(self) -> Probe:
        count = sum(check is not None for check in (self.tcp, self.http, self.exec))
        if count != 1:
            raise ValueError("a probe needs exactly one of tcp, http, exec")
        if self.timeout_seconds > self.period_seconds:
            raise ValueError("timeoutSeconds must not exceed periodSeconds")
        return self


class IngressSource(_Strict):
    """Who may connect: another environment, or a CIDR."""

    environment: DnsLabel | None = None
    cidr: IPv4Net | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> IngressSource:
        if (self.environment is None) == (self.cidr is None):
            raise ValueError("from needs exactly one of environment, cidr")
        return self


class IngressRule(_Strict):
    """One allow rule for connections into the environment."""

    from_: IngressSource = Field(alias="from")
    ports: list[Port] = Field(default_factory=list)  # empty: every port
    protocol: Literal["tcp", "udp"] = "tcp"


class Policy(_Strict):
    """`spec.policy`: ingress allow-list and what to do on a violation."""

    ingress: list[IngressRule] = Field(default_factory=list)
    on_violation: Literal["alert", "kill", "quarantine"] = Field(
        default="alert", alias="onViolation"
    )


NamespaceName = Literal["net", "uts", "ipc", "mnt", "pid"]


def _all_namespaces() -> list[NamespaceName]:
    return ["net", "uts", "ipc", "mnt", "pid"]


class EnvironmentSpec(_Strict):
    """An isolated environment: namespaces, a cgroup, an address, processes and policy."""

    hostname: str | None = None
    namespaces: list[NamespaceName] = Field(default_factory=_all_namespaces)
    network: NetworkAttachment | None = None
    resources: Resources = Field(default_factory=Resources)
    mounts: list[Mount] = Field(default_factory=list)
    processes: list[Process] = Field(default_factory=list)
    probes: list[Probe] = Field(default_factory=list)
    policy: Policy = Field(default_factory=Policy)

    @field_validator("hostname")
    @classmethod
    def _hostname(cls, hostname: str | None) -> str | None:
        if hostname is not None and (len(hostname) > 64 or not HOSTNAME.fullmatch(hostname)):
            raise ValueError(f"{hostname!r} is not a valid hostname (RFC 1123, at most 64 chars)")
        return hostname

    @field_validator("namespaces")
    @classmethod
    def _unique_namespaces(cls, namespaces: list[NamespaceName]) -> list[NamespaceName]:
        if len(set(namespaces)) != len(namespaces):
            raise ValueError("a namespace is listed twice")
        # Canonical order: the list is a set, and reordering it must not read as a change.
        return [n for n in _all_namespaces() if n in namespaces]

    # Rules between fields are field validators that look back at the fields validated
    # before them (info.data, in declaration order), so that each error carries the line
    # of the field that breaks it rather than the line of `spec:`.

    @field_validator("network")
    @classmethod
    def _network_needs_net(
        cls, network: NetworkAttachment | None, info: ValidationInfo
    ) -> NetworkAttachment | None:
        if network is not None and "net" not in info.data.get("namespaces", ["net"]):
            raise ValueError("namespaces must include net when network is set")
        return network

    @field_validator("mounts")
    @classmethod
    def _mounts_need_mnt(cls, mounts: list[Mount], info: ValidationInfo) -> list[Mount]:
        if mounts and "mnt" not in info.data.get("namespaces", ["mnt"]):
            raise ValueError("namespaces must include mnt when mounts are set")
        _unique("mount target", [m.target for m in mounts])
        return mounts

    @field_validator("processes")
    @classmethod
    def _unique_processes(cls, processes: list[Process]) -> list[Process]:
        _unique("process", [p.name for p in processes])
        return processes

    @field_validator("probes")
    @classmethod
    def _probe_targets(cls, probes: list[Probe], info: ValidationInfo) -> list[Probe]:
        _unique("probe", [p.name for p in probes])
        processes = info.data.get("processes")
        if processes is None:  # the processes failed validation; that error is enough
            return probes
        names = {p.name for p in processes}
        for probe in probes:
            for target in probe.restart:
                if target not in names:
                    raise ValueError(f"probe {probe.name!r} restarts unknown process {target!r}")
        return probes


def _unique(what: str, values: list[str]) -> None:
    seen: set[str] = set()
    for value in values:
        if value in seen:
            raise ValueError(f"{what} {value!r} is declared twice")
        seen.add(value)


class Environment(_Strict):
    """`kind: Environment`."""

    api_version: Literal["reconciler/v1"] = Field(alias="apiVersion")
    kind: Literal["Environment"]
    metadata: Metadata
    spec: EnvironmentSpec = Field(default_factory=EnvironmentSpec)

    @property
    def hostname(self) -> str:
        """The hostname inside the environment (defaults to the name)."""
        return self.spec.hostname or self.metadata.name


Manifest = Network | Environment
KINDS: dict[str, type[Network] | type[Environment]] = {
    "Network": Network,
    "Environment": Environment,
}


def spec_dict(manifest: Manifest) -> dict[str, Any]:
    """The normalised spec as plain JSON data (what the state file records and plan diffs).

    Defaults that derive from other fields are filled in, so that writing a default out
    explicitly (`hostname: <name>`, the first host as `gateway`) is not a change.
    """
    spec = manifest.spec.model_dump(mode="json", by_alias=True, exclude_none=True)
    if isinstance(manifest, Network):
        spec["gateway"] = str(manifest.spec.effective_gateway())
        spec["bridge"] = manifest.bridge_name
    else:
        spec["hostname"] = manifest.hostname
    return spec
