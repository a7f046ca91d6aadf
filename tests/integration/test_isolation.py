"""Network isolation against the real kernel, proven with real TCP/UDP traffic.

Each test builds its own bridges and env namespaces (through the network driver, not the
engine), applies isolation through `FirewallDriver`, then sends traffic between the
namespaces it made and the sandbox's root namespace ("the host"). The kernel's view is
read independently: `nft -j`, `ip -j -d link`, /proc/sys. Expected failures wait 0.5 s.

The strict matrix runs twice, with br_netfilter's `bridge-nf-call-iptables` at 0 and 1
(per network namespace on this kernel, so the sandbox's value is ours to set).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest

from reconciler.kernel.firewall import FirewallDriver
from reconciler.kernel.libnft import Backend
from reconciler.kernel.naming import host_veth_name, netns_name
from reconciler.kernel.netlink import NetlinkDriver
from reconciler.kernel.nftrules import Allow, IsolationSpec, Member, NetworkRules, table_name
from reconciler.kernel.types import owner_tag
from tests import kernel_view as kv
from tests.gates import unavailable
from tests.integration.netprobe import DENY_TIMEOUT, Listener, reach, send_udp

BRIDGE_NF = Path("/proc/sys/net/bridge/bridge-nf-call-iptables")
ENV_PORTS = ("tcp:8080", "tcp:9090", "udp:5353", "udp:5354")
HOST_PORT = 7070


# --------------------------------------------------------------------------- lab


@dataclass(frozen=True)
class Env:
    name: str
    network: str
    netns: str
    port: str  # host veth = bridge port
    address: str


@dataclass
class Net:
    name: str
    bridge: str
    subnet: str
    gateway: str
    isolation: str
    envs: dict[str, Env] = field(default_factory=dict)


class Lab:
    """Bridges and envs of one test instance, plus the isolation driver under test."""

    def __init__(self, instance: str, netlink: NetlinkDriver) -> None:
        self.instance = instance
        self.netlink = netlink
        self.fw = FirewallDriver(instance=instance)
        self.nets: dict[str, Net] = {}
        self.ingress: list[Allow] = []
        self.quarantined: set[str] = set()

    def network(self, name: str, third_octet: int, *, isolation: str = "strict") -> Net:
        net = Net(
            name=name,
            # Short, unique per test: "rb" + 8 hex of the instance + a network letter.
            bridge=f"rb{self.instance[2:]}{name[0]}",
            subnet=f"10.231.{third_octet}.0/24",
            gateway=f"10.231.{third_octet}.1",
            isolation=isolation,
        )
        self.netlink.ensure_bridge(
            name=net.bridge,
            gateway_cidr=f"{net.gateway}/24",
            alias=owner_tag(instance=self.instance, kind="network", name=name),
        )
        self.nets[name] = net
        return net

    def env(self, net: Net, name: str, host_octet: int) -> Env:
        env = Env(
            name=name,
            network=net.name,
            netns=netns_name(self.instance, name),
            port=host_veth_name(self.instance, name),
            address=f"{net.gateway.rsplit('.', 1)[0]}.{host_octet}",
        )
        self.netlink.ensure_netns(name=env.netns)
        self.netlink.ensure_env_link(
            netns=env.netns,
            host_name=env.port,
            alias=owner_tag(instance=self.instance, kind="env", name=name),
            bridge=net.bridge,
            address_cidr=f"{env.address}/24",
            gateway=net.gateway,
        )
        net.envs[name] = env
        return env

    def spec(self) -> IsolationSpec:
        networks = []
        for net in self.nets.values():
            members = tuple(Member(e.name, e.port, e.address) for e in net.envs.values())
            ingress = tuple(a for a in self.ingress if a.dst_env in net.envs)
            networks.append(
                NetworkRules(
                    name=net.name,
                    bridge=net.bridge,
                    subnet=net.subnet,
                    gateway=net.gateway,
                    isolation="open" if net.isolation == "open" else "strict",
                    members=members,
                    ingress=ingress,
                )
            )
        return IsolationSpec(
            instance=self.instance,
            networks=tuple(networks),
            quarantined=frozenset(self.quarantined),
        )

    def apply(self) -> list[str]:
        """Knobs for every bridge and port, then the tables: what the engine will do."""
        changes: list[str] = []
        for net in self.nets.values():
            changes += self.fw.ensure_bridge_flags(bridge=net.bridge)
            ports = [e.port for e in net.envs.values()]
            changes += self.fw.ensure_port_flags(bridge=net.bridge, ports=ports)
        return changes + self.fw.ensure(self.spec())

    def cleanup(self) -> None:
        self.fw.remove()
        self.fw.close()
        for link in kv.ip_links():
            if self.instance in (link.get("ifalias") or "") or self.instance[2:] in link["ifname"]:
                kv.run(["ip", "link", "del", link["ifname"]])
        for name in kv.netns_names():
            if self.instance in name:
                kv.run(["ip", "netns", "del", name])


@pytest.fixture
def lab(instance: str) -> Iterator[Lab]:
    netlink = NetlinkDriver()
    built = Lab(instance, netlink)
    try:
        yield built
    finally:
        netlink.close()
        built.cleanup()


@pytest.fixture(params=[0, 1], ids=["brnf0", "brnf1"])
def bridge_nf(request: pytest.FixtureRequest) -> Iterator[int]:
    """br_netfilter's bridge-nf-call-iptables set to 0 or 1 in the sandbox, then restored.

    Safe to write: the knob is per network namespace on kernels that show it outside the
    initial one (older kernels register it in init_net only, and then it is absent here).
    """
    if not BRIDGE_NF.exists():
        unavailable(f"br_netfilter is not available (no {BRIDGE_NF})")
    before = BRIDGE_NF.read_text().strip()
    BRIDGE_NF.write_text(f"{request.param}\n")
    try:
        yield int(request.param)
    finally:
        BRIDGE_NF.write_text(before + "\n")


# --------------------------------------------------------------------------- kernel views


def nft_json(*args: str) -> Any:
    result = kv.run(["nft", "-j", *args])
    assert result.returncode == 0, f"nft -j {' '.join(args)}: {result.stderr.strip()}"
    return json.loads(result.stdout)


def nft_text(family: str, table: str) -> str:
    result = kv.run(["nft", "list", "table", family, table])
    assert result.returncode == 0, result.stderr
    return result.stdout


def without_counters(listing: str) -> str:
    """A table listing without counter values: traffic moves them, not we."""
    return re.sub(r"counter packets \d+ bytes \d+", "counter", listing)


def table_handles(instance: str) -> dict[tuple[str, str], int]:
    entries = nft_json("list", "tables")["nftables"]
    return {
        (e["table"]["family"], e["table"]["name"]): e["table"]["handle"]
        for e in entries
        if "table" in e and instance in e["table"]["name"]
    }


def sysctl(path: str) -> str:
    return Path("/proc/sys/net", path).read_text().strip()


def port_isolated(port: str) -> bool:
    link = kv.ip_link(port)
    assert link is not None, f"port {port} is missing"
    return bool(link.get("linkinfo", {}).get("info_slave_data", {}).get("isolated"))


def nft(*args: str) -> None:
    result = kv.run(["nft", *args])
    assert result.returncode == 0, f"nft {' '.join(args)}: {result.stderr.strip()}"


# --------------------------------------------------------------------------- helpers


def strict_lab(lab: Lab) -> tuple[Env, Env, Env]:
    """Strict network: a, b, c; b admits a on tcp/8080 and udp/5353."""
    net = lab.network("strict", 1)
    a, b, c = (lab.env(net, name, octet) for name, octet in (("a", 10), ("b", 11), ("c", 12)))
    lab.ingress += [
        Allow(dst_env="b", src_env="a", ports=(8080,), protocol="tcp"),
        Allow(dst_env="b", src_env="a", ports=(5353,), protocol="udp"),
    ]
    return a, b, c


def probe(src: Env | None, dst: str, port: int, proto: str = "tcp", *, expect: bool) -> bool:
    """One probe; an expected failure waits only DENY_TIMEOUT."""
    ns = src.netns if src is not None else None
    timeout = 3.0 if expect else DENY_TIMEOUT
    return reach(ns, dst, port, proto="udp" if proto == "udp" else "tcp", timeout=timeout)


def run_matrix(cases: dict[str, tuple[Env | None, str, int, str, bool]]) -> dict[str, bool]:
    """Every probe of the matrix, concurrently (each is its own process and socket)."""
    with ThreadPoolExecutor(max_workers=8) as pool:
        futures = {
            label: pool.submit(probe, src, dst, port, proto, expect=expect)
            for label, (src, dst, port, proto, expect) in cases.items()
        }
        return {label: future.result() for label, future in futures.items()}


# --------------------------------------------------------------------------- tests


def test_strict_and_open_matrix(lab: Lab, bridge_nf: int) -> None:
    a, b, c = strict_lab(lab)
    open_net = lab.network("open", 2, isolation="open")
    x, y = lab.env(open_net, "x", 10), lab.env(open_net, "y", 11)
    strict_gw = lab.nets["strict"].gateway
    changes = lab.apply()
    assert any("created" in change for change in changes), changes

    cases: dict[str, tuple[Env | None, str, int, str, bool]] = {
        "a->b tcp/8080 (allowed)": (a, b.address, 8080, "tcp", True),
        "a->b tcp/9090": (a, b.address, 9090, "tcp", False),
        "b->a tcp/8080": (b, a.address, 8080, "tcp", False),
        "c->b tcp/8080": (c, b.address, 8080, "tcp", False),
        "a->c tcp/8080": (a, c.address, 8080, "tcp", False),
        "a->b udp/5353 (allowed)": (a, b.address, 5353, "udp", True),
        "a->b udp/5354": (a, b.address, 5354, "udp", False),
        "c->b udp/5353": (c, b.address, 5353, "udp", False),
        "x->y tcp/9090 (open)": (x, y.address, 9090, "tcp", True),
        "y->x udp/5354 (open)": (y, x.address, 5354, "udp", True),
        "a->x (other network)": (a, x.address, 8080, "tcp", False),
        "x->a (other network)": (x, a.address, 8080, "tcp", False),
        "a->host gateway listener": (a, strict_gw, HOST_PORT, "tcp", False),
        "x->host gateway listener": (x, strict_gw, HOST_PORT, "tcp", False),
    }
    for env in (a, b, c, x, y):
        cases[f"host->{env.name} tcp/8080"] = (None, env.address, 8080, "tcp", True)
    expected = {label: case[4] for label, case in cases.items()}

    with Listener(None, [f"tcp:{HOST_PORT}"]):
        listeners = [Listener(env.netns, ENV_PORTS) for env in (a, b, c, x, y)]
        for listener in listeners:
            listener.__enter__()
        try:
            assert run_matrix(cases) == expected
            # Spoofing. c sends as a: a one-way datagram from a second address (b's answer
            # would go to a anyway, so only arrival at b tells), then a TCP connection
            # with c's own address replaced by a's (its ARP then claims a's address too).
            # b admits a, so only anti-spoof stops these.
            b_listener = listeners[1]
            seen = len(b_listener.arrivals())
            kv.run(["ip", "-n", c.netns, "addr", "add", f"{a.address}/32", "dev", "eth0"])
            send_udp(c.netns, b.address, 5353, source=a.address)
            spoofed_arrivals = b_listener.arrivals(wait=DENY_TIMEOUT)[seen:]
            kv.run(["ip", "-n", c.netns, "addr", "flush", "dev", "eth0"])
            kv.run(["ip", "-n", c.netns, "addr", "add", f"{a.address}/24", "dev", "eth0"])
            spoofed_tcp = reach(c.netns, b.address, 8080, timeout=DENY_TIMEOUT)
            assert (spoofed_arrivals, spoofed_tcp) == ([], False)
            # Control: the same datagram from a itself arrives.
            send_udp(a.netns, b.address, 5353)
            arrived = b_listener.arrivals(wait=3.0, at_least=seen + 1)[seen:]
            assert arrived, "a's own datagram did not arrive"
            assert reach(a.netns, b.address, 8080), "a lost its access while c spoofed it"
        finally:
            for listener in listeners:
                listener.__exit__(None, None, None)

    denied = lab.fw.denied_counts()
    for pair in [
        (a.address, b.address),
        (b.address, a.address),
        (c.address, b.address),
        (a.address, c.address),
        (a.address, x.address),
        (x.address, a.address),
        (a.address, strict_gw),
    ]:
        assert denied.get(pair, 0) >= 1, f"{pair} not counted in {denied}"
    assert (a.address, b.address) in denied  # a->b:9090, while a->b:8080 passed
    assert lab.fw.spoofed_counts().get(c.port, 0) >= 1
    assert lab.fw.spoofed_counts().get(a.port, 0) == 0


def test_kernel_knobs_are_per_bridge_and_ports_are_isolated(lab: Lab) -> None:
    a, b, c = strict_lab(lab)
    bridge = lab.nets["strict"].bridge
    global_knobs = ["ipv4/ip_forward", "ipv6/conf/all/forwarding"]
    global_knobs += [f"ipv4/conf/{i}/forwarding" for i in ("all", "default", "lo")]
    before = {p: sysctl(p) for p in global_knobs}

    changes = lab.apply()

    assert sysctl(f"ipv4/conf/{bridge}/forwarding") == "1"
    assert sysctl(f"ipv4/conf/{bridge}/proxy_arp_pvlan") == "1"
    assert sysctl(f"ipv4/neigh/{bridge}/proxy_delay") == "0"
    assert sysctl(f"ipv6/conf/{bridge}/forwarding") == "0"
    assert {p: sysctl(p) for p in before} == before, "a global or foreign knob changed"
    for env in (a, b, c):
        assert port_isolated(env.port), env
        assert sysctl(f"ipv4/conf/{env.port}/forwarding") == "0"
    assert any("isolated on" in change for change in changes)
    # Read before write: a second pass changes nothing.
    assert lab.fw.ensure_bridge_flags(bridge=bridge) == []
    assert lab.fw.ensure_port_flags(bridge=bridge, ports=[a.port, b.port, c.port]) == []
    # No NAT, ever: no nat chain in our tables.
    for family in ("inet", "bridge"):
        listing = nft_json("list", "table", family, lab.fw.table)["nftables"]
        assert not [e for e in listing if e.get("chain", {}).get("type") == "nat"]


def test_port_flag_repaired_after_a_veth_is_recreated(lab: Lab) -> None:
    a, _, _ = strict_lab(lab)
    lab.apply()
    kv.run(["ip", "link", "set", "dev", a.port, "type", "bridge_slave", "isolated", "off"])
    assert not port_isolated(a.port)
    bridge = lab.nets["strict"].bridge
    assert lab.fw.ensure_port_flags(bridge=bridge, ports=[a.port]) == [
        f"bridge port {a.port}: isolated on"
    ]
    assert port_isolated(a.port)


def test_nothing_leaves_for_or_enters_from_another_interface(lab: Lab) -> None:
    """A host uplink (a veth into a namespace of ours, "outside") gets nothing either way.

    Both a strict and an open network: the open one accepts everything that stays on its
    bridge, so only the "never leave the bridge" rule stands between it and the uplink.
    """
    a, _, _ = strict_lab(lab)
    x = lab.env(lab.network("open", 2, isolation="open"), "x", 10)
    uplink, outside = f"{lab.instance}up", f"{lab.instance}-outside"
    kv.run(["ip", "netns", "add", outside])
    for cmd in (
        ["ip", "link", "add", uplink, "type", "veth", "peer", "name", "eth0", "netns", outside],
        ["ip", "addr", "add", "10.250.0.1/24", "dev", uplink],
        ["ip", "link", "set", uplink, "up"],
        ["ip", "-n", outside, "addr", "add", "10.250.0.2/24", "dev", "eth0"],
        ["ip", "-n", outside, "link", "set", "eth0", "up"],
        ["ip", "-n", outside, "route", "add", "10.231.0.0/16", "via", "10.250.0.1"],
    ):
        assert kv.run(cmd).returncode == 0, cmd
    # Let the uplink route inward too, as on a host that forwards for someone else.
    Path(f"/proc/sys/net/ipv4/conf/{uplink}/forwarding").write_text("1\n")
    for net in lab.nets.values():
        lab.fw.ensure_bridge_flags(bridge=net.bridge)
        lab.fw.ensure_port_flags(bridge=net.bridge, ports=[e.port for e in net.envs.values()])

    with (
        Listener(outside, ["udp:5353"]) as out,
        Listener(a.netns, ["udp:5353"]) as in_a,
        Listener(x.netns, ["udp:5353"]) as in_x,
    ):
        # Control: with forwarding on the bridges and no table, every path is open.
        for env, inside in ((a, in_a), (x, in_x)):
            seen = len(out.arrivals())
            send_udp(env.netns, "10.250.0.2", 5353)
            arrived = out.arrivals(wait=3.0, at_least=seen + 1)[seen:]
            assert arrived, f"control: {env.name} -> uplink not routed"
            send_udp(outside, env.address, 5353)
            assert inside.arrivals(wait=3.0, at_least=1), f"control: uplink -> {env.name}"

        lab.fw.ensure(lab.spec())
        for env, inside in ((a, in_a), (x, in_x)):
            seen_out, seen_in = len(out.arrivals()), len(inside.arrivals())
            send_udp(env.netns, "10.250.0.2", 5353)
            send_udp(outside, env.address, 5353)
            assert len(out.arrivals(wait=DENY_TIMEOUT)) == seen_out, f"{env.name} left"
            assert len(inside.arrivals(wait=DENY_TIMEOUT)) == seen_in, f"{env.name} entered"
    denied = lab.fw.denied_counts()
    for env in (a, x):
        assert denied.get((env.address, "10.250.0.2"), 0) >= 1, denied
        assert denied.get(("10.250.0.2", env.address), 0) >= 1, denied


def test_quarantine_cuts_an_env_off_and_lifting_it_restores(lab: Lab) -> None:
    a, b, _ = strict_lab(lab)
    lab.apply()
    with Listener(b.netns, ENV_PORTS), Listener(a.netns, ENV_PORTS):
        assert reach(a.netns, b.address, 8080)
        assert reach(None, b.address, 8080)

        lab.quarantined.add("b")
        assert lab.apply()
        assert not reach(a.netns, b.address, 8080, timeout=DENY_TIMEOUT)
        assert not reach(None, b.address, 8080, timeout=DENY_TIMEOUT)
        assert not reach(b.netns, lab.nets["strict"].gateway, HOST_PORT, timeout=DENY_TIMEOUT)
        assert reach(None, a.address, 8080), "quarantine of b cut a off too"

        lab.quarantined.clear()
        assert lab.apply()
        assert reach(a.netns, b.address, 8080)
        assert reach(None, b.address, 8080)


@pytest.mark.parametrize("backend", ["library", "binary"])
def test_second_ensure_is_a_no_op(lab: Lab, backend: Backend) -> None:
    lab.fw = FirewallDriver(instance=lab.instance, backend=backend)
    strict_lab(lab)
    assert lab.apply()
    table = lab.fw.table
    texts = {f: nft_text(f, table) for f in ("inet", "bridge")}
    handles = table_handles(lab.instance)

    assert lab.apply() == []
    assert lab.fw.in_sync(lab.spec())
    assert {f: nft_text(f, table) for f in ("inet", "bridge")} == texts
    assert table_handles(lab.instance) == handles


def test_policy_edit_updates_in_place_and_keeps_counters(lab: Lab) -> None:
    _, b, c = strict_lab(lab)
    lab.apply()
    handles = table_handles(lab.instance)
    with Listener(b.netns, ENV_PORTS):
        assert not reach(c.netns, b.address, 9090, timeout=DENY_TIMEOUT)
        counted = lab.fw.denied_counts()[(c.address, b.address)]

        lab.ingress.append(Allow(dst_env="b", src_cidr=f"{c.address}/32", ports=(9090,)))
        changes = lab.apply()
        assert changes and all("rules replaced" in change for change in changes), changes
        assert reach(c.netns, b.address, 9090)
        assert not reach(c.netns, b.address, 8080, timeout=DENY_TIMEOUT)

    assert table_handles(lab.instance) == handles, "the tables were recreated"
    assert lab.fw.denied_counts()[(c.address, b.address)] > counted


@pytest.mark.parametrize(
    "tamper",
    [
        ["flush", "chain", "inet", "{table}", "fwd_strict"],
        ["delete", "table", "inet", "{table}"],
        ["delete", "table", "bridge", "{table}"],
        ["insert", "rule", "inet", "{table}", "fwd_strict", "ip", "saddr", "{c}", "accept"],
        ["add", "rule", "bridge", "{table}", "antispoof", "accept"],
        [
            "add",
            "chain",
            "inet",
            "{table}",
            "forward",
            "{{ type filter hook forward priority 0 ; policy drop ; }}",
        ],
        ["add", "counter", "inet", "{table}", "intruder"],
    ],
    ids=[
        "flushed-chain",
        "deleted-inet-table",
        "deleted-bridge-table",
        "hand-added-accept",
        "hand-added-bridge-rule",
        "policy-changed",
        "foreign-object",
    ],
)
def test_drift_is_detected_and_repaired(lab: Lab, tamper: list[str]) -> None:
    a, b, c = strict_lab(lab)
    lab.apply()
    with Listener(b.netns, ENV_PORTS):
        assert not reach(c.netns, b.address, 8080, timeout=DENY_TIMEOUT)
        before = lab.fw.denied_counts().get((c.address, b.address), 0)
        nft(*[part.format(table=lab.fw.table, c=c.address) for part in tamper])
        assert not lab.fw.in_sync(lab.spec())

        assert lab.fw.ensure(lab.spec())
        assert lab.fw.in_sync(lab.spec())
        assert lab.fw.ensure(lab.spec()) == []
        assert reach(a.netns, b.address, 8080)
        assert not reach(c.netns, b.address, 8080, timeout=DENY_TIMEOUT)
    after = lab.fw.denied_counts().get((c.address, b.address), 0)
    if tamper[:3] != ["delete", "table", "inet"]:  # only deleting the table loses them
        assert after > before, "counters were lost by the repair"


def test_env_teardown_prunes_its_rules_and_counters_without_its_netns(lab: Lab) -> None:
    a, b, c = strict_lab(lab)
    lab.ingress.append(Allow(dst_env="c", src_env="a", ports=(8080,)))
    lab.apply()
    with Listener(b.netns, ENV_PORTS):
        assert not reach(c.netns, b.address, 8080, timeout=DENY_TIMEOUT)
        assert not reach(a.netns, b.address, 9090, timeout=DENY_TIMEOUT)
    assert (c.address, b.address) in lab.fw.denied_counts()

    # c goes: its namespace first (its veth dies with it), then the rules.
    assert kv.run(["ip", "netns", "del", c.netns]).returncode == 0
    del lab.nets["strict"].envs["c"]
    assert lab.apply()

    listing = nft_text("inet", lab.fw.table) + nft_text("bridge", lab.fw.table)
    assert c.address not in listing and c.port not in listing
    denied = lab.fw.denied_counts()
    assert not [pair for pair in denied if c.address in pair], denied
    assert (a.address, b.address) in denied, "a's counters went with c's"
    assert lab.fw.in_sync(lab.spec())


def test_remove_deletes_only_our_tables(lab: Lab) -> None:
    strict_lab(lab)
    foreign = "foreign_test"
    for family in ("inet", "bridge"):
        nft("add", "table", family, foreign)
        nft("add", "chain", family, foreign, "c", "{ type filter hook forward priority 0 ; }")
        nft("add", "rule", family, foreign, "c", "counter", "accept", "comment", '"not ours"')
    foreign_text = {f: without_counters(nft_text(f, foreign)) for f in ("inet", "bridge")}
    try:
        lab.apply()
        assert set(table_handles(lab.instance)) == {
            ("inet", table_name(lab.instance)),
            ("bridge", table_name(lab.instance)),
        }
        assert lab.fw.remove() is True
        assert lab.fw.remove() is False
        tables = [e["table"] for e in nft_json("list", "ruleset")["nftables"] if "table" in e]
        assert not [t for t in tables if lab.instance in t["name"]]
        assert {
            f: without_counters(nft_text(f, foreign)) for f in ("inet", "bridge")
        } == foreign_text
        # A spec without networks means "no tables" too.
        lab.apply()
        assert lab.fw.ensure(replace(lab.spec(), networks=()))
        assert table_handles(lab.instance) == {}
        assert lab.fw.denied_counts() == {}
    finally:
        for family in ("inet", "bridge"):
            kv.run(["nft", "delete", "table", family, foreign])


def test_ensure_timing_with_50_envs(lab: Lab) -> None:
    """One transaction whatever the size; printed for the record, bounded loosely."""
    net = lab.network("big", 3)
    envs = [lab.env(net, f"e{i}", 10 + i) for i in range(50)]
    lab.ingress += [
        Allow(dst_env=envs[i].name, src_env=envs[i - 1].name, ports=(8080, 8443))
        for i in range(1, 50)
    ]
    for bridge_net in lab.nets.values():
        lab.fw.ensure_bridge_flags(bridge=bridge_net.bridge)
        lab.fw.ensure_port_flags(bridge=bridge_net.bridge, ports=[e.port for e in envs])
    spec = lab.spec()
    started = time.perf_counter()
    assert lab.fw.ensure(spec)
    create = time.perf_counter() - started
    started = time.perf_counter()
    assert lab.fw.ensure(spec) == []
    noop = time.perf_counter() - started
    lab.ingress.append(Allow(dst_env="e0", src_env="e49", ports=(22,)))
    started = time.perf_counter()
    assert lab.fw.ensure(lab.spec())
    update = time.perf_counter() - started
    print(
        f"\n50 envs ({lab.fw.backend}): create {create * 1e3:.1f} ms, no-op {noop * 1e3:.1f} ms, "
        f"update {update * 1e3:.1f} ms"
    )
    assert create < 2.0 and noop < 1.0 and update < 2.0
    with Listener(envs[1].netns, ["tcp:8443"]):
        assert reach(envs[0].netns, envs[1].address, 8443)
        assert not reach(envs[2].netns, envs[1].address, 8443, timeout=DENY_TIMEOUT)
