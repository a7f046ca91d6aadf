"""The network driver against the real kernel, checked through `ip`, never through the driver.

Each test builds its own bridge and namespaces under a unique instance name, inside
hack/sandbox.sh's throwaway network namespace. The `topology` fixture makes a bridge and
three envs through the driver; teardown removes whatever the test left, with `ip`.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from reconciler.errors import KernelError, OwnershipError
from reconciler.kernel.naming import default_bridge_name, host_veth_name, link_mac, netns_name
from reconciler.kernel.netlink import NetlinkDriver
from reconciler.kernel.types import owner_tag
from tests import kernel_view as kv

SUBNET_PREFIX = "10.77.0"
GATEWAY = f"{SUBNET_PREFIX}.1"
GATEWAY_CIDR = f"{GATEWAY}/24"
ENVS = ("e1", "e2", "e3")

# A one-shot ICMP echo with a raw socket (the machine has no `ping`): exit 0 on a reply.
PING = r"""
import os, socket, struct, sys, time
dst = sys.argv[1]
def csum(b):
    b += b"\0" * (len(b) % 2)
    s = sum(struct.unpack("!%dH" % (len(b) // 2), b))
    s = (s >> 16) + (s & 0xFFFF); s += s >> 16
    return ~s & 0xFFFF
ident = os.getpid() & 0xFFFF
body = b"reconciler-test"
head = struct.pack("!BBHHH", 8, 0, 0, ident, 1)
packet = struct.pack("!BBHHH", 8, 0, csum(head + body), ident, 1) + body
sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
sock.settimeout(1.0)
sock.sendto(packet, (dst, 0))
deadline = time.monotonic() + 1.0
while time.monotonic() < deadline:
    try:
        data, addr = sock.recvfrom(2048)
    except socket.timeout:
        break
    ihl = (data[0] & 0x0F) * 4
    kind, _, _, rid, _ = struct.unpack("!BBHHH", data[ihl:ihl + 8])
    if addr[0] == dst and kind == 0 and rid == ident:
        sys.exit(0)
sys.exit(1)
"""


@dataclass(frozen=True)
class Env:
    name: str
    netns: str
    host: str
    alias: str
    cidr: str

    @property
    def address(self) -> str:
        return self.cidr.split("/")[0]


@dataclass(frozen=True)
class Topology:
    instance: str
    bridge: str
    bridge_alias: str
    envs: tuple[Env, ...]


def make_env(instance: str, name: str, host_octet: int) -> Env:
    return Env(
        name=name,
        netns=netns_name(instance, name),
        host=host_veth_name(instance, name),
        alias=owner_tag(instance=instance, kind="env", name=name),
        cidr=f"{SUBNET_PREFIX}.{host_octet}/24",
    )


def ensure_env(driver: NetlinkDriver, topo: Topology, env: Env) -> list[str]:
    return driver.ensure_env_link(
        netns=env.netns,
        host_name=env.host,
        alias=env.alias,
        bridge=topo.bridge,
        address_cidr=env.cidr,
        gateway=GATEWAY,
    )


def ensure_bridge(driver: NetlinkDriver, topo: Topology) -> list[str]:
    return driver.ensure_bridge(
        name=topo.bridge, gateway_cidr=GATEWAY_CIDR, alias=topo.bridge_alias
    )


def ip(*args: str) -> None:
    result = kv.run(["ip", *args])
    assert result.returncode == 0, f"ip {' '.join(args)}: {result.stderr.strip()}"


def ip_json(*args: str) -> list[dict[str, Any]]:
    result = kv.run(["ip", "-j", *args])
    assert result.returncode == 0, f"ip -j {' '.join(args)}: {result.stderr.strip()}"
    data: list[dict[str, Any]] = json.loads(result.stdout) if result.stdout.strip() else []
    return data


def routes(netns: str) -> list[dict[str, Any]]:
    return ip_json("-n", netns, "-4", "route", "show", "table", "main")


def default_gateways(netns: str) -> list[str]:
    return [r.get("gateway", "") for r in routes(netns) if r.get("dst") == "default"]


def host_link(name: str) -> dict[str, Any]:
    link = kv.ip_link(name)
    assert link is not None, f"link {name} does not exist"
    return link


def ping(src_netns: str, address: str) -> bool:
    """One ICMP echo from inside `src_netns` to `address`."""
    cmd = ["ip", "netns", "exec", src_netns, sys.executable, "-c", PING, address]
    return kv.run(cmd, timeout=10).returncode == 0


def cleanup_with_ip(instance: str, *, names: set[str]) -> None:
    """Remove every link tagged with `instance` or called one of `names`, and every pin
    named after `instance`, via `ip`."""
    for link in kv.ip_links():
        if instance in (link.get("ifalias") or "") or link["ifname"] in names:
            kv.run(["ip", "link", "del", link["ifname"]])
    for name in kv.netns_names():
        if instance in name:
            kv.run(["ip", "netns", "del", name])


@pytest.fixture
def driver() -> Iterator[NetlinkDriver]:
    drv = NetlinkDriver()
    try:
        yield drv
    finally:
        drv.close()


@pytest.fixture
def topo(instance: str) -> Iterator[Topology]:
    """Names for a bridge and three envs of this test's instance (nothing created)."""
    topology = Topology(
        instance=instance,
        bridge=default_bridge_name(instance),
        bridge_alias=owner_tag(instance=instance, kind="network", name="net"),
        envs=tuple(make_env(instance, name, 10 + i) for i, name in enumerate(ENVS)),
    )
    names = {topology.bridge, host_veth_name(instance, "stranger")}
    names |= {env.host for env in topology.envs}
    try:
        yield topology
    finally:
        cleanup_with_ip(instance, names=names)


@pytest.fixture
def built(driver: NetlinkDriver, topo: Topology) -> Topology:
    """The bridge and the three envs, created through the driver."""
    assert ensure_bridge(driver, topo)
    for env in topo.envs:
        driver.ensure_netns(name=env.netns)
        assert ensure_env(driver, topo, env)
    return topo


def wait_settled(topo: Topology) -> None:
    """Wait until the kernel stops changing our links on its own (carrier, IPv6 DAD).

    Both emit netlink notifications a moment after a link goes up; a test that listens
    for writes must not mistake them for the driver's.
    """

    def settled() -> bool:
        views: list[tuple[str | None, list[str]]] = [(None, [topo.bridge])]
        views += [(None, [e.host]) for e in topo.envs]
        views += [(e.netns, ["eth0"]) for e in topo.envs]
        for netns, names in views:
            for link in kv.ip_links(netns):
                if link["ifname"] not in names:
                    continue
                if "LOWER_UP" not in link.get("flags", []):
                    return False
                if any(a.get("tentative") for a in link.get("addr_info", [])):
                    return False
        return True

    kv.wait_until(settled, timeout=15, message="links did not settle (carrier/DAD)")


class NetlinkMonitor:
    """`ip monitor` over every namespace with an nsid, bracketed by a sentinel veth.

    Events between the sentinel's creation and its deletion were caused by whatever ran
    in between; netlink notifications are queued synchronously with each change, so the
    bracket is exact without sleeping.
    """

    def __init__(self) -> None:
        self.sentinel = f"rts{secrets.token_hex(4)}"
        self.lines: list[str] = []
        self._proc = subprocess.Popen(
            ["ip", "monitor", "all-nsid", "link", "address", "route"],
            stdout=subprocess.PIPE,
            text=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def _seen(self, needle: str) -> int:
        return next((i for i, line in enumerate(self.lines) if needle in line), -1)

    def __enter__(self) -> NetlinkMonitor:
        # Re-create the sentinel until the monitor shows it: then it is listening.
        def listening() -> bool:
            kv.run(["ip", "link", "del", self.sentinel])
            ip("link", "add", self.sentinel, "type", "veth", "peer", "name", self.sentinel + "p")
            return self._seen(self.sentinel) >= 0

        kv.wait_until(listening, timeout=10, message="ip monitor did not start")
        self._start = len(self.lines)
        return self

    def __exit__(self, *exc: object) -> None:
        ip("link", "del", self.sentinel)
        kv.wait_until(
            lambda: any(
                "Deleted" in line and self.sentinel in line for line in self.lines[self._start :]
            ),
            timeout=10,
            message="ip monitor did not report the sentinel's deletion",
        )
        self._proc.terminate()
        self._proc.wait(timeout=10)
        end = next(
            i
            for i in range(self._start, len(self.lines))
            if "Deleted" in self.lines[i] and self.sentinel in self.lines[i]
        )
        self.between = [
            line
            for line in self.lines[self._start : end]
            if self.sentinel not in line and line.startswith("[nsid")
        ]


# --------------------------------------------------------------------------- creation


def test_creates_bridge_and_envs_as_the_kernel_shows_them(built: Topology) -> None:
    topo = built
    bridge = host_link(topo.bridge)
    assert kv.link_kind(bridge) == "bridge"
    assert kv.is_up(bridge)
    assert bridge.get("ifalias") == topo.bridge_alias
    assert kv.ipv4_addresses(bridge) == [GATEWAY_CIDR]
    assert bridge["address"] == link_mac(topo.bridge_alias)

    for env in topo.envs:
        veth = host_link(env.host)
        assert kv.link_kind(veth) == "veth"
        assert veth.get("master") == topo.bridge
        assert kv.is_up(veth)
        assert veth.get("ifalias") == env.alias
        assert kv.ipv4_addresses(veth) == []

        eth0 = kv.ip_link("eth0", netns=env.netns)
        assert eth0 is not None, f"no eth0 in {env.netns}"
        assert kv.link_kind(eth0) == "veth"
        assert kv.is_up(eth0)
        assert kv.ipv4_addresses(eth0) == [env.cidr]
        lo = kv.ip_link("lo", netns=env.netns)
        assert lo is not None and kv.is_up(lo)
        assert default_gateways(env.netns) == [GATEWAY]
        assert kv.run(["ip", "netns", "exec", env.netns, "true"]).returncode == 0

    assert {e.netns for e in topo.envs} <= set(kv.netns_names())


def test_envs_reach_each_other_over_the_bridge(built: Topology) -> None:
    e1, e2, _ = built.envs
    # The first echo may wait for ARP; poll instead of assuming.
    kv.wait_until(lambda: ping(e1.netns, e2.address), timeout=10, message="e1 -> e2 ping")
    kv.wait_until(lambda: ping(e2.netns, GATEWAY), timeout=10, message="e2 -> gateway ping")


def test_second_ensure_reports_and_writes_nothing(driver: NetlinkDriver, built: Topology) -> None:
    wait_settled(built)
    with NetlinkMonitor() as monitor:
        assert ensure_bridge(driver, built) == []
        for env in built.envs:
            assert driver.ensure_netns(name=env.netns).name == env.netns
            assert ensure_env(driver, built, env) == []
    assert monitor.between == []


def test_observe_matches_the_kernel(driver: NetlinkDriver, built: Topology) -> None:
    names = [e.netns for e in built.envs]
    obs = driver.observe(netns_names=[*names, f"{built.instance}-absent"])

    assert set(obs.netns) == set(names)  # not pinned: simply absent
    bridge = obs.host_links[built.bridge]
    assert (bridge.kind, bridge.up, bridge.alias) == ("bridge", True, built.bridge_alias)
    assert bridge.addresses == (GATEWAY_CIDR,)
    assert bridge.index == host_link(built.bridge)["ifindex"]
    for env in built.envs:
        veth = obs.host_links[env.host]
        assert (veth.kind, veth.up, veth.master, veth.alias) == (
            "veth",
            True,
            built.bridge,
            env.alias,
        )
        state = obs.netns[env.netns]
        assert (state.inode, state.dev) == (
            kv.netns_inode(env.netns),
            os.stat(Path("/run/netns") / env.netns).st_dev,
        )
        assert set(state.links) == {link["ifname"] for link in kv.ip_links(env.netns)}
        assert state.links["eth0"].addresses == (env.cidr,)
        assert state.links["eth0"].up and state.links["lo"].up
        assert state.default_gateway == GATEWAY


def test_observe_keeps_one_socket_per_netns(driver: NetlinkDriver, built: Topology) -> None:
    names = [e.netns for e in built.envs]
    for _ in range(5):
        driver.observe(netns_names=names)
    assert set(driver.cached_netns) == set(names)
    assert all(driver.socket_opens[name] == 1 for name in names), driver.socket_opens


def test_observe_drops_the_socket_of_a_recreated_netns(
    driver: NetlinkDriver, built: Topology
) -> None:
    env = built.envs[0]
    driver.observe(netns_names=[env.netns])
    ip("netns", "del", env.netns)
    obs = driver.observe(netns_names=[env.netns])
    assert env.netns not in obs.netns
    assert env.netns not in driver.cached_netns  # the old socket would keep it alive
    # Without our socket the dead namespace takes its veth pair with it.
    kv.wait_until(lambda: kv.ip_link(env.host) is None, timeout=10, message="veth lingers")

    ip("netns", "add", env.netns)
    obs = driver.observe(netns_names=[env.netns])
    assert obs.netns[env.netns].inode == kv.netns_inode(env.netns)
    assert set(obs.netns[env.netns].links) == {"lo"}
    assert driver.socket_opens[env.netns] == 2


def test_driver_is_usable_from_any_thread(driver: NetlinkDriver, built: Topology) -> None:
    """A call from a new thread must still see the netns the socket was opened in."""
    env = built.envs[0]
    seen: list[set[str]] = []

    def look() -> None:
        seen.append(set(driver.observe(netns_names=[env.netns]).netns[env.netns].links))

    threads = [threading.Thread(target=look) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == [{"lo", "eth0"}] * 4


# --------------------------------------------------------------------------- drift


def test_repairs_a_deleted_host_veth(driver: NetlinkDriver, built: Topology) -> None:
    env = built.envs[0]
    ip("link", "del", env.host)
    kv.wait_until(lambda: kv.ip_link("eth0", netns=env.netns) is None, timeout=10)
    changes = ensure_env(driver, built, env)
    assert any("created" in c for c in changes), changes
    assert host_link(env.host).get("master") == built.bridge
    eth0 = kv.ip_link("eth0", netns=env.netns)
    assert eth0 is not None and kv.ipv4_addresses(eth0) == [env.cidr]
    assert default_gateways(env.netns) == [GATEWAY]


def test_repairs_a_flushed_address_and_a_link_set_down(
    driver: NetlinkDriver, built: Topology
) -> None:
    env = built.envs[1]
    ip("-n", env.netns, "addr", "flush", "dev", "eth0")
    ip("-n", env.netns, "addr", "add", "10.99.0.5/24", "dev", "eth0")
    ip("link", "set", env.host, "down")
    changes = ensure_env(driver, built, env)
    assert f"eth0 in network namespace {env.netns}: added address {env.cidr}" in changes
    assert f"eth0 in network namespace {env.netns}: removed address 10.99.0.5/24" in changes
    assert f"veth {env.host}: set up" in changes
    eth0 = kv.ip_link("eth0", netns=env.netns)
    assert eth0 is not None and kv.ipv4_addresses(eth0) == [env.cidr]
    assert kv.is_up(host_link(env.host))
    assert default_gateways(env.netns) == [GATEWAY]


def test_repairs_eth0_down_and_a_wrong_default_route(
    driver: NetlinkDriver, built: Topology
) -> None:
    env = built.envs[2]
    ip("-n", env.netns, "link", "set", "lo", "down")
    ip("-n", env.netns, "route", "replace", "default", "via", f"{SUBNET_PREFIX}.2")
    changes = ensure_env(driver, built, env)
    assert f"network namespace {env.netns}: default route via {GATEWAY}" in changes
    assert f"lo in network namespace {env.netns}: set up" in changes
    assert default_gateways(env.netns) == [GATEWAY]

    ip("-n", env.netns, "link", "set", "eth0", "down")  # the kernel drops its routes too
    changes = ensure_env(driver, built, env)
    assert f"eth0 in network namespace {env.netns}: set up" in changes
    assert default_gateways(env.netns) == [GATEWAY]
    assert ensure_env(driver, built, env) == []


def test_repairs_a_deleted_bridge(driver: NetlinkDriver, built: Topology) -> None:
    ip("link", "del", built.bridge)
    changes = ensure_bridge(driver, built)
    assert f"bridge {built.bridge}: created" in changes
    bridge = host_link(built.bridge)
    assert kv.is_up(bridge) and kv.ipv4_addresses(bridge) == [GATEWAY_CIDR]
    assert bridge.get("ifalias") == built.bridge_alias
    for env in built.envs:
        assert f"veth {env.host}: enslaved to bridge {built.bridge}" in ensure_env(
            driver, built, env
        )
        assert host_link(env.host).get("master") == built.bridge


def test_repairs_a_foreign_bridge_address(driver: NetlinkDriver, built: Topology) -> None:
    ip("addr", "add", "10.88.0.1/24", "dev", built.bridge)
    assert ensure_bridge(driver, built) == [f"bridge {built.bridge}: removed address 10.88.0.1/24"]
    assert kv.ipv4_addresses(host_link(built.bridge)) == [GATEWAY_CIDR]


def test_recreates_the_veth_when_the_netns_was_recreated(
    driver: NetlinkDriver, built: Topology
) -> None:
    env = built.envs[0]
    driver.observe(netns_names=[env.netns])  # cache a socket in the old namespace
    ip("netns", "del", env.netns)
    ip("netns", "add", env.netns)
    ensure_env(driver, built, env)
    eth0 = kv.ip_link("eth0", netns=env.netns)
    assert eth0 is not None and kv.ipv4_addresses(eth0) == [env.cidr]
    veth = host_link(env.host)
    assert veth.get("master") == built.bridge and veth.get("ifalias") == env.alias
    assert default_gateways(env.netns) == [GATEWAY]
    kv.wait_until(lambda: ping(env.netns, GATEWAY), timeout=10, message="ping after recreate")


def test_address_change_replaces_the_old_address(driver: NetlinkDriver, built: Topology) -> None:
    env = built.envs[0]
    moved = Env(env.name, env.netns, env.host, env.alias, f"{SUBNET_PREFIX}.50/24")
    changes = ensure_env(driver, built, moved)
    assert changes == [
        f"eth0 in network namespace {env.netns}: removed address {env.cidr}",
        f"eth0 in network namespace {env.netns}: added address {moved.cidr}",
        f"network namespace {env.netns}: default route via {GATEWAY}",
    ]
    eth0 = kv.ip_link("eth0", netns=env.netns)
    assert eth0 is not None and kv.ipv4_addresses(eth0) == [moved.cidr]


# --------------------------------------------------------------------------- ownership


def test_refuses_a_bridge_with_a_foreign_alias(driver: NetlinkDriver, topo: Topology) -> None:
    ip("link", "add", topo.bridge, "type", "bridge")
    ip("link", "set", topo.bridge, "alias", "someone-else")
    with pytest.raises(OwnershipError, match=r"pick another spec\.bridge") as err:
        ensure_bridge(driver, topo)
    assert f"not owned by instance {topo.instance}" in str(err.value)
    with pytest.raises(OwnershipError):
        driver.remove_bridge(name=topo.bridge, alias=topo.bridge_alias)
    bridge = host_link(topo.bridge)
    assert bridge.get("ifalias") == "someone-else" and not kv.ipv4_addresses(bridge)
    ip("link", "del", topo.bridge)


def test_refuses_an_untagged_bridge_it_did_not_create(
    driver: NetlinkDriver, topo: Topology
) -> None:
    ip("link", "add", topo.bridge, "type", "bridge")
    with pytest.raises(OwnershipError):
        ensure_bridge(driver, topo)
    with pytest.raises(OwnershipError):
        driver.remove_bridge(name=topo.bridge, alias=topo.bridge_alias)
    assert kv.ip_link(topo.bridge) is not None
    ip("link", "del", topo.bridge)


def test_adopts_its_own_bridge_left_untagged_by_a_crash(
    driver: NetlinkDriver, topo: Topology
) -> None:
    # What a crash between "create" and "set ifalias" leaves: our name and MAC, no tag.
    mac = link_mac(topo.bridge_alias)
    ip("link", "add", topo.bridge, "address", mac, "type", "bridge")
    changes = ensure_bridge(driver, topo)
    assert f"bridge {topo.bridge}: tagged {topo.bridge_alias}" in changes
    assert f"bridge {topo.bridge}: created" not in changes
    assert host_link(topo.bridge).get("ifalias") == topo.bridge_alias


def test_refuses_a_veth_with_a_foreign_alias(driver: NetlinkDriver, built: Topology) -> None:
    stranger = make_env(built.instance, "stranger", 99)
    driver.ensure_netns(name=stranger.netns)
    ip("link", "add", stranger.host, "type", "veth", "peer", "name", stranger.host[:-1] + "p")
    ip("link", "set", stranger.host, "alias", "not-ours")
    with pytest.raises(OwnershipError, match=stranger.host):
        ensure_env(driver, built, stranger)
    with pytest.raises(OwnershipError, match="refusing to delete"):
        driver.remove_env_link(host_name=stranger.host, alias=stranger.alias)
    assert host_link(stranger.host).get("ifalias") == "not-ours"
    assert kv.ip_link("eth0", netns=stranger.netns) is None
    ip("link", "del", stranger.host)


# --------------------------------------------------------------------------- netns


def test_ensure_netns_is_usable_by_ip_and_adopts_existing_pins(
    driver: NetlinkDriver, topo: Topology
) -> None:
    made, adopted, leftover = (netns_name(topo.instance, n) for n in ("made", "adopt", "left"))
    state = driver.ensure_netns(name=made)
    assert state.inode == kv.netns_inode(made)
    assert set(state.links) == {"lo"} and state.links["lo"].up
    assert kv.run(["ip", "netns", "exec", made, "true"]).returncode == 0
    lo = kv.ip_link("lo", netns=made)
    assert lo is not None and kv.is_up(lo)

    ip("netns", "add", adopted)  # someone (a previous run) pinned it already
    inode = kv.netns_inode(adopted)
    assert driver.ensure_netns(name=adopted).inode == inode
    assert kv.netns_inode(adopted) == inode

    (Path("/run/netns") / leftover).touch()  # a crash between open(O_CREAT) and mount
    state = driver.ensure_netns(name=leftover)
    assert state.inode == kv.netns_inode(leftover)
    assert kv.run(["ip", "-n", leftover, "link", "show", "lo"]).returncode == 0

    for name in (made, adopted, leftover):
        assert driver.remove_netns(name=name) is True
        assert driver.remove_netns(name=name) is False
        assert name not in kv.netns_names()


def test_removes_everything(driver: NetlinkDriver, topo: Topology) -> None:
    links_before = {link["ifname"] for link in kv.ip_links()}
    pins_before = set(kv.netns_names())
    assert ensure_bridge(driver, topo)
    for env in topo.envs:
        driver.ensure_netns(name=env.netns)
        ensure_env(driver, topo, env)

    for env in topo.envs:
        assert driver.remove_env_link(host_name=env.host, alias=env.alias) is True
        assert driver.remove_env_link(host_name=env.host, alias=env.alias) is False
        assert driver.remove_netns(name=env.netns) is True
    assert driver.remove_bridge(name=topo.bridge, alias=topo.bridge_alias) is True
    assert driver.remove_bridge(name=topo.bridge, alias=topo.bridge_alias) is False
    assert driver.cached_netns == ()

    assert {link["ifname"] for link in kv.ip_links()} == links_before  # normally just lo
    assert set(kv.netns_names()) == pins_before  # normally empty


def test_remove_netns_frees_the_namespace(driver: NetlinkDriver, built: Topology) -> None:
    """Unpinning closes our socket first, so the namespace dies and takes eth0's pair."""
    env = built.envs[0]
    driver.observe(netns_names=[env.netns])
    assert driver.remove_netns(name=env.netns) is True
    kv.wait_until(lambda: kv.ip_link(env.host) is None, timeout=10, message="veth lingers")


def test_replaces_a_stray_eth0_that_lives_only_in_the_netns(
    driver: NetlinkDriver, topo: Topology
) -> None:
    ensure_bridge(driver, topo)
    env = topo.envs[0]
    driver.ensure_netns(name=env.netns)
    ip("-n", env.netns, "link", "add", "eth0", "type", "veth", "peer", "name", "other0")
    changes = ensure_env(driver, topo, env)
    assert f"network namespace {env.netns}: deleted a stray eth0" in changes
    eth0 = kv.ip_link("eth0", netns=env.netns)
    assert eth0 is not None and kv.ipv4_addresses(eth0) == [env.cidr]
    assert kv.ip_link("other0", netns=env.netns) is None
    assert host_link(env.host).get("master") == topo.bridge


def test_refuses_a_stray_eth0_whose_host_end_is_foreign(
    driver: NetlinkDriver, topo: Topology
) -> None:
    ensure_bridge(driver, topo)
    env = topo.envs[0]
    driver.ensure_netns(name=env.netns)
    foreign = host_veth_name(topo.instance, "stranger")  # cleaned up by the fixture
    ip("link", "add", foreign, "type", "veth", "peer", "name", "eth0", "netns", env.netns)
    ip("link", "set", foreign, "alias", f"someone-else-{topo.instance}")
    with pytest.raises(OwnershipError, match=f"peer of host link {foreign}"):
        ensure_env(driver, topo, env)
    assert kv.ip_link(foreign) is not None
    assert kv.ip_link("eth0", netns=env.netns) is not None
    assert kv.ip_link(env.host) is None


def test_recovers_from_a_broken_socket(driver: NetlinkDriver, built: Topology) -> None:
    """White-box: break a cached socket; one call fails, the next reopens."""
    env = built.envs[0]
    driver.observe(netns_names=[env.netns])
    fd = driver._netns[env.netns].sock.fileno()
    null = os.open("/dev/null", os.O_RDONLY)
    os.dup2(null, fd)  # the socket's fd now names something that is not a socket
    os.close(null)
    with pytest.raises(KernelError):
        driver.observe(netns_names=[env.netns])
    obs = driver.observe(netns_names=[env.netns])
    assert set(obs.netns[env.netns].links) == {"lo", "eth0"}
    assert driver.socket_opens[env.netns] == 2


def test_keeps_the_wanted_address_when_it_was_a_secondary(
    driver: NetlinkDriver, built: Topology
) -> None:
    """Deleting a primary address drops its secondaries: the wanted one must come back."""
    env = built.envs[1]
    ip("-n", env.netns, "addr", "flush", "dev", "eth0")
    ip("-n", env.netns, "addr", "add", f"{SUBNET_PREFIX}.200/24", "dev", "eth0")
    ip("-n", env.netns, "addr", "add", env.cidr, "dev", "eth0")  # a secondary now
    ensure_env(driver, built, env)
    eth0 = kv.ip_link("eth0", netns=env.netns)
    assert eth0 is not None and kv.ipv4_addresses(eth0) == [env.cidr]
    assert default_gateways(env.netns) == [GATEWAY]
    assert ensure_env(driver, built, env) == []
