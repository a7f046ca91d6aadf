"""The manifest kinds: the contract's example validates, defaults are filled, and every
single-document mistake is reported as `file:line: Kind/name: field: message`."""

from __future__ import annotations

import ipaddress
import re
import textwrap
from pathlib import Path

import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from pydantic import ValidationError

from reconciler.manifests.models import (
    ALL_NAMESPACES,
    DNS_LABEL,
    Environment,
    Metadata,
    Network,
    default_bridge_name,
    spec_dict,
)
from tests.gates import unavailable
from tests.unit.factories import CONTRACT_EXAMPLE as EXAMPLE
from tests.unit.factories import line_of, load, load_one

CONTRACT = Path("/work/shared/spec/contract.md")


HEAD = "apiVersion: reconciler/v1\nkind: Environment\nmetadata: {name: web}\n"
NET_HEAD = "apiVersion: reconciler/v1\nkind: Network\nmetadata: {name: devnet}\n"


def env_text(spec: str) -> str:
    return HEAD + "spec:\n" + textwrap.indent(textwrap.dedent(spec), "  ")


def net_text(spec: str) -> str:
    return NET_HEAD + "spec:\n" + textwrap.indent(textwrap.dedent(spec), "  ")


def only_error(text: str) -> str:
    result = load_one(text)
    assert not result.manifests
    assert len(result.errors) == 1, result.errors
    return result.errors[0]


# --------------------------------------------------------------------------- valid


def test_contract_example_is_still_the_one_tested() -> None:
    """The example above is the contract's, verbatim (guards against silent drift)."""
    if not CONTRACT.exists():
        unavailable("shared/spec/contract.md is not beside the checkout")
    block = re.search(r"```yaml\n(.*?)```", CONTRACT.read_text(), re.S)
    assert block is not None
    strip = [re.sub(r"\s+#.*$", "", line).rstrip() for line in block[1].splitlines()]
    kept = [line for line in strip if line]
    assert kept == EXAMPLE.splitlines()[: len(kept)]


def test_contract_example_validates_with_every_value() -> None:
    result = load({"example.yaml": EXAMPLE})
    assert result.errors == []
    net, payments, _frontend = (m.manifest for m in result.manifests)
    assert isinstance(net, Network) and isinstance(payments, Environment)
    assert net.spec.subnet == ipaddress.IPv4Network("10.213.0.0/24")
    assert net.bridge_name == "rcbr-devnet"
    spec = payments.spec
    assert payments.metadata.labels == {"team": "pay"}
    assert spec.network is not None
    assert spec.network.address == ipaddress.IPv4Address("10.213.0.10")
    assert spec.resources.memory == 256 * 2**20
    assert spec.resources.cpu == 500
    assert spec.resources.pids == 128
    io = spec.resources.io[0]
    assert (io.read_bps, io.write_bps, io.read_iops, io.write_iops) == (
        50 * 2**20,
        20 * 2**20,
        2000,
        1000,
    )
    assert spec.mounts[0].size == 64 * 2**20
    assert spec.mounts[1].read_only is True
    assert spec.processes[0].command == ["python3", "-m", "http.server", "8080"]
    assert spec.processes[0].user == "nobody"
    assert spec.probes[0].tcp is not None and spec.probes[0].tcp.port == 8080
    assert spec.policy.ingress[0].from_.environment == "frontend"


def test_defaults() -> None:
    text = """\
apiVersion: reconciler/v1
kind: Network
metadata: {name: devnet}
spec: {subnet: 10.213.0.0/24}
---
apiVersion: reconciler/v1
kind: Environment
metadata: {name: web}
spec:
  network: {name: devnet}
  processes: [{name: api, command: [sleep, "1"]}]
  probes: [{name: up, exec: {command: ["true"]}}]
  policy: {ingress: [{from: {cidr: 10.213.0.0/28}}]}
"""
    result = load({"m.yaml": text})
    assert result.errors == []
    net, env = (m.manifest for m in result.manifests)
    assert isinstance(net, Network) and isinstance(env, Environment)
    assert net.spec.isolation == "strict"
    assert net.spec.effective_gateway() == ipaddress.IPv4Address("10.213.0.1")
    assert net.bridge_name == "rcbr-devnet"
    assert env.hostname == "web"
    assert env.spec.namespaces == list(ALL_NAMESPACES)
    assert env.spec.resources.memory is None and env.spec.resources.cpu is None
    process = env.spec.processes[0]
    assert (process.restart_policy, process.user, process.working_dir) == ("Always", "root", "/")
    probe = env.spec.probes[0]
    assert (probe.period_seconds, probe.timeout_seconds, probe.failure_threshold) == (5, 1, 3)
    assert (probe.on_failure, probe.restart) == ("restart", [])
    rule = env.spec.policy.ingress[0]
    assert (rule.protocol, rule.ports) == ("tcp", [])
    assert env.spec.policy.on_violation == "alert"


def test_environment_spec_may_be_omitted() -> None:
    result = load_one(HEAD)
    assert result.errors == []
    env = result.manifests[0].manifest
    assert isinstance(env, Environment)
    assert env.spec.namespaces == list(ALL_NAMESPACES)


def test_long_network_names_get_a_short_stable_bridge() -> None:
    name = "a-very-long-network-name"
    bridge = default_bridge_name(name)
    assert len(bridge) <= 15 and bridge.startswith("rcbr-")
    assert bridge == default_bridge_name(name)
    assert bridge != default_bridge_name(name + "x")


def test_namespaces_are_a_set_in_canonical_order() -> None:
    result = load_one(env_text("namespaces: [pid, net]\n"))
    env = result.manifests[0].manifest
    assert isinstance(env, Environment)
    assert env.spec.namespaces == ["net", "pid"]


def test_spec_dict_writes_derived_defaults_out() -> None:
    """Writing a default explicitly must not read as a change (plan diffs spec_dict)."""
    implicit = load({"m.yaml": NET_HEAD + "spec: {subnet: 10.1.0.0/24}\n" + "---\n" + HEAD})
    explicit = load(
        {
            "m.yaml": NET_HEAD
            + "spec: {subnet: 10.1.0.0/24, gateway: 10.1.0.1, bridge: rcbr-devnet}\n---\n"
            + HEAD
            + "spec: {hostname: web}\n"
        }
    )
    assert [spec_dict(m.manifest) for m in implicit.manifests] == [
        spec_dict(m.manifest) for m in explicit.manifests
    ]


# --------------------------------------------------------------------------- invalid

# (id, text, the text on the blamed line, fragments the message must contain)
INVALID: list[tuple[str, str, str, list[str]]] = [
    (
        "unknown field at the top",
        HEAD + "spec: {}\nstatus: {}\n",
        "status:",
        ["Environment/web: status: unknown field"],
    ),
    (
        "unknown field in spec",
        env_text("hostnme: x\n"),
        "hostnme",
        ["spec.hostnme: unknown field", "check the spelling"],
    ),
    (
        "unknown field deep",
        env_text(
            """\
            processes:
              - name: api
                command: [x]
                restartPolcy: Never
            """
        ),
        "restartPolcy",
        ["spec.processes[0].restartPolcy: unknown field"],
    ),
    (
        "unknown field in metadata",
        "apiVersion: reconciler/v1\nkind: Environment\nmetadata:\n  name: web\n  label: {}\n",
        "label:",
        ["metadata.label: unknown field"],
    ),
    (
        "network without net",
        env_text("namespaces: [uts, mnt]\nnetwork: {name: devnet}\n"),
        "network:",
        ["spec.network", "namespaces must include net"],
    ),
    (
        "mounts without mnt",
        env_text("namespaces: [net]\nmounts: [{type: tmpfs, target: /tmp}]\n"),
        "mounts:",
        ["spec.mounts", "namespaces must include mnt"],
    ),
    (
        "probe without a check",
        env_text("probes:\n  - name: up\n"),
        "- name: up",
        ["spec.probes[0]", "exactly one of tcp, http, exec"],
    ),
    (
        "probe with two checks",
        env_text("probes:\n  - name: up\n    tcp: {port: 1}\n    http: {port: 2}\n"),
        "- name: up",
        ["spec.probes[0]", "exactly one of tcp, http, exec"],
    ),
    (
        "probe timeout longer than period",
        env_text(
            """\
            probes:
              - name: up
                tcp: {port: 1}
                periodSeconds: 1
                timeoutSeconds: 2
            """
        ),
        "- name: up",
        ["spec.probes[0]", "timeoutSeconds must not exceed periodSeconds"],
    ),
    (
        "probe restarts an unknown process",
        env_text(
            """\
            processes: [{name: api, command: [x]}]
            probes:
              - {name: up, tcp: {port: 1}, restart: [apj]}
            """
        ),
        "probes:",
        ["spec.probes", "probe 'up' restarts unknown process 'apj'"],
    ),
    (
        "duplicate process names",
        env_text("processes:\n  - {name: api, command: [a]}\n  - {name: api, command: [b]}\n"),
        "processes:",
        ["spec.processes", "process 'api' is declared twice"],
    ),
    (
        "duplicate mount targets",
        env_text("mounts:\n  - {type: tmpfs, target: /t}\n  - {type: tmpfs, target: /t}\n"),
        "mounts:",
        ["spec.mounts", "mount target '/t' is declared twice"],
    ),
    (
        "bind mount without source",
        env_text("mounts:\n  - {type: bind, target: /srv}\n"),
        "type: bind",
        ["spec.mounts[0]", "a bind mount needs a source"],
    ),
    (
        "tmpfs mount with a source",
        env_text("mounts:\n  - {type: tmpfs, target: /srv, source: /x}\n"),
        "type: tmpfs",
        ["spec.mounts[0]", "a tmpfs mount takes no source"],
    ),
    (
        "relative mount target",
        env_text("mounts:\n  - {type: tmpfs, target: tmp}\n"),
        "type: tmpfs",
        ["spec.mounts[0].target"],
    ),
    (
        "ingress from both environment and cidr",
        env_text("policy:\n  ingress:\n    - from: {environment: a, cidr: 10.0.0.0/24}\n"),
        "from:",
        ["spec.policy.ingress[0].from", "exactly one of environment, cidr"],
    ),
    (
        "ingress port out of range",
        env_text("policy:\n  ingress:\n    - from: {environment: a}\n      ports: [70000]\n"),
        "ports:",
        ["spec.policy.ingress[0].ports[0]", "65535"],
    ),
    (
        "ingress port quoted",
        env_text("policy:\n  ingress:\n    - from: {environment: a}\n      ports: ['80']\n"),
        "ports:",
        ["spec.policy.ingress[0].ports[0]", "valid integer"],
    ),
    (
        "bad hostname",
        env_text("hostname: under_score\n"),
        "hostname:",
        ["spec.hostname", "'under_score' is not a valid hostname"],
    ),
    (
        "hostname too long",
        env_text("hostname: " + "a" * 65 + "\n"),
        "hostname:",
        ["spec.hostname", "at most 64"],
    ),
    (
        "bad env var name",
        env_text("processes:\n  - name: api\n    command: [x]\n    env: {1PORT: '80'}\n"),
        "env:",
        ["spec.processes[0].env", "'1PORT' is not a valid environment variable name"],
    ),
    (
        "user: yes is a boolean, not uid 1",
        env_text("processes:\n  - name: api\n    command: [x]\n    user: yes\n"),
        "user:",
        ["spec.processes[0].user", "got true"],
    ),
    (
        "negative uid",
        env_text("processes:\n  - name: api\n    command: [x]\n    user: -1\n"),
        "user:",
        ["spec.processes[0].user", "uid >= 0"],
    ),
    (
        "empty command",
        env_text("processes:\n  - name: api\n    command: []\n"),
        "command:",
        ["spec.processes[0].command"],
    ),
    (
        "bad restart policy",
        env_text("processes:\n  - name: api\n    command: [x]\n    restartPolicy: always\n"),
        "restartPolicy",
        ["spec.processes[0].restartPolicy", "'Always'", "got 'always'"],
    ),
    (
        "io entry with no limit",
        env_text("resources:\n  io:\n    - {device: /dev/vda}\n"),
        "device:",
        ["spec.resources.io[0]", "at least one of readBps, writeBps, readIops, writeIops"],
    ),
    (
        "duplicate io device",
        env_text(
            """\
            resources:
              io:
                - {device: /dev/vda, readIops: 1}
                - {device: /dev/vda, writeIops: 1}
            """
        ),
        "io:",
        ["spec.resources.io", "device /dev/vda is listed twice"],
    ),
    (
        "pids: true",
        env_text("resources: {pids: true}\n"),
        "resources:",
        ["spec.resources.pids", "valid integer"],
    ),
    (
        "memory with a wrong suffix",
        env_text("resources:\n  memory: 256MB\n"),
        "memory:",
        ["spec.resources.memory", "'256MB' is not a quantity", "256Mi"],
    ),
    (
        "zero cpu",
        env_text("resources:\n  cpu: 0\n"),
        "cpu:",
        ["spec.resources.cpu", "at least 1m"],
    ),
    (
        "unknown namespace",
        env_text("namespaces: [net, user]\n"),
        "namespaces:",
        ["spec.namespaces[1]", "got 'user'"],
    ),
    (
        "namespace twice",
        env_text("namespaces: [net, net]\n"),
        "namespaces:",
        ["spec.namespaces", "listed twice"],
    ),
    (
        "bad static address",
        env_text("network: {name: devnet, address: 10.213.0.300}\n"),
        "network:",
        ["spec.network.address", "'10.213.0.300' is not an IPv4 address"],
    ),
    (
        "subnet with host bits",
        net_text("subnet: 10.213.0.5/24\n"),
        "subnet:",
        ["Network/devnet: spec.subnet", "has host bits set; did you mean 10.213.0.0/24?"],
    ),
    (
        "subnet /8",
        net_text("subnet: 10.0.0.0/8\n"),
        "subnet:",
        ["spec.subnet", "prefix length /8 is outside /16../30"],
    ),
    (
        "subnet /31",
        net_text("subnet: 10.0.0.0/31\n"),
        "subnet:",
        ["spec.subnet", "prefix length /31 is outside /16../30"],
    ),
    (
        "subnet not a subnet",
        net_text("subnet: devnet\n"),
        "subnet:",
        ["spec.subnet", "is not an IPv4 subnet"],
    ),
    (
        "gateway outside the subnet",
        net_text("subnet: 10.213.0.0/24\ngateway: 10.213.1.1\n"),
        "gateway:",
        ["spec.gateway", "10.213.1.1 is outside the subnet 10.213.0.0/24"],
    ),
    (
        "gateway is the network address",
        net_text("subnet: 10.213.0.0/24\ngateway: 10.213.0.0\n"),
        "gateway:",
        ["spec.gateway", "is the network address of 10.213.0.0/24"],
    ),
    (
        "gateway is the broadcast address",
        net_text("subnet: 10.213.0.0/24\ngateway: 10.213.0.255\n"),
        "gateway:",
        ["spec.gateway", "is the broadcast address"],
    ),
    (
        "bridge name of 16 characters",
        net_text("subnet: 10.213.0.0/24\nbridge: abcdefghijklmnop\n"),
        "bridge:",
        ["spec.bridge", "'abcdefghijklmnop' is not a valid interface name", "15"],
    ),
    (
        "bad isolation",
        net_text("subnet: 10.213.0.0/24\nisolation: none\n"),
        "isolation:",
        ["spec.isolation", "got 'none'"],
    ),
    (
        "network without subnet",
        net_text("isolation: open\n"),
        "spec:",
        ["spec.subnet: required field is missing"],
    ),
    (
        "name with a trailing newline",
        "apiVersion: reconciler/v1\nkind: Environment\nmetadata:\n  name: |\n    web\n",
        "name: |",
        ["metadata.name", "'web\\n' is not a DNS-1123 label"],
    ),
    (
        "env var name with a trailing newline",
        env_text('processes:\n  - name: api\n    command: [x]\n    env: {"PORT\\n": "80"}\n'),
        "env:",
        ["spec.processes[0].env", "is not a valid environment variable name"],
    ),
    (
        "uppercase name",
        "apiVersion: reconciler/v1\nkind: Environment\nmetadata:\n  name: Web\n",
        "name: Web",
        ["metadata.name", "'Web' is not a DNS-1123 label"],
    ),
]


@pytest.mark.parametrize(
    ("text", "needle", "fragments"),
    [pytest.param(text, needle, fragments, id=name) for name, text, needle, fragments in INVALID],
)
def test_invalid_manifest_is_reported_at_its_line(
    text: str, needle: str, fragments: list[str]
) -> None:
    error = only_error(text)
    assert error.startswith(f"m.yaml:{line_of(text, needle)}: "), error
    for fragment in fragments:
        assert fragment in error, error
    assert "\n" not in error


# --------------------------------------------------------------------------- names


@given(st.from_regex(r"\A[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?\Z"))
def test_every_dns_label_is_a_valid_name(name: str) -> None:
    assert Metadata(name=name).name == name


@given(st.text(max_size=80))
@example("web\n")  # a YAML block scalar keeps the newline; `$` alone would accept it
@example("a" * 64)
def test_names_are_accepted_exactly_when_dns_labels(name: str) -> None:
    valid = len(name) <= 63 and DNS_LABEL.fullmatch(name) is not None
    try:
        Metadata(name=name)
    except ValidationError as exc:
        assert not valid
        message = exc.errors()[0]["msg"]
        assert "DNS-1123 label" in message or "longer than 63 characters" in message
    else:
        assert valid


def test_name_of_64_characters_is_rejected_with_the_limit() -> None:
    text = "apiVersion: reconciler/v1\nkind: Network\nmetadata:\n  name: " + "a" * 64 + "\n"
    error = load_one(text).errors[0]
    assert error.startswith("m.yaml:4: ")
    assert "metadata.name" in error and "longer than 63 characters" in error
