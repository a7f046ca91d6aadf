"""The lean rtnetlink client's bytes, without root: what the encoders send, what the parsers read.

A netlink attribute is `struct nlattr { u16 nla_len; u16 nla_type; }` followed by its
payload, padded to 4 bytes; `nla_len` counts header and payload but not the padding, and
a *nested* attribute (a payload made of attributes) carries NLA_F_NESTED in its type.

Both directions are checked against an independent reading of the ABI: this module
builds messages with `struct` from the kernel headers' numbers (not rtnl's constants),
the way the kernel lays them out (ifinfomsg/ifaddrmsg/rtmsg, then attributes in the
kernel's fill order, with the ones rtnl does not read in between), and walks what the
encoders produce with its own strict walker. That the kernel accepts the encodings and
that dumps of real objects parse right is proven in tests/integration/test_rtnl.py.

Malformed input (a zero `nla_len`, an attribute running past the end of the message, an
attribute too short for its type) must not crash a parser: it stops at the bad attribute
and reports what came before it.
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from hypothesis import given
from hypothesis import strategies as st

from reconciler.kernel import rtnl
from reconciler.kernel.rtnl import Address, Link, Request, Route

# The kernel headers' numbers, written out again so a wrong constant in rtnl shows up.
# <linux/rtnetlink.h>
RTM_NEWLINK, RTM_DELLINK = 16, 17
RTM_NEWADDR, RTM_DELADDR = 20, 21
RTM_NEWROUTE, RTM_DELROUTE = 24, 25
RTN_UNICAST, RTN_LOCAL = 1, 2
RTPROT_BOOT, RTPROT_KERNEL = 3, 2
RT_SCOPE_UNIVERSE, RT_SCOPE_LINK, RT_SCOPE_HOST = 0, 253, 254
RT_TABLE_COMPAT, RT_TABLE_MAIN, RT_TABLE_LOCAL = 252, 254, 255
RTA_DST, RTA_OIF, RTA_GATEWAY, RTA_PRIORITY, RTA_PREFSRC, RTA_TABLE = 1, 4, 5, 6, 7, 15
# <linux/netlink.h>
NLM_F_EXCL, NLM_F_CREATE = 0x200, 0x400
NLA_F_NESTED = 0x8000
# <linux/if_link.h>
IFLA_ADDRESS, IFLA_BROADCAST, IFLA_IFNAME, IFLA_MTU, IFLA_LINK = 1, 2, 3, 4, 5
IFLA_MASTER, IFLA_TXQLEN, IFLA_OPERSTATE, IFLA_LINKINFO, IFLA_IFALIAS = 10, 13, 16, 18, 20
IFLA_AF_SPEC, IFLA_NET_NS_FD, IFLA_LINK_NETNSID = 26, 28, 37
IFLA_INFO_KIND, IFLA_INFO_DATA, IFLA_INFO_SLAVE_KIND, IFLA_INFO_SLAVE_DATA = 1, 2, 4, 5
IFLA_BRPORT_STATE, IFLA_BRPORT_PRIORITY, IFLA_BRPORT_COST = 1, 2, 3
IFLA_BRPORT_ISOLATED, IFLA_BRPORT_LOCKED = 33, 38
IFLA_BR_FORWARD_DELAY = 1
VETH_INFO_PEER = 1
# <linux/if_addr.h>
IFA_ADDRESS, IFA_LOCAL, IFA_LABEL, IFA_BROADCAST, IFA_CACHEINFO, IFA_FLAGS = 1, 2, 3, 4, 6, 8
IFA_F_PERMANENT = 0x80
# <linux/if.h>, <linux/if_arp.h>
IFF_UP, IFF_BROADCAST, IFF_MULTICAST, IFF_LOWER_UP = 0x1, 0x2, 0x1000, 0x10000
ARPHRD_ETHER = 1

IFINFOMSG = struct.Struct("=BBHiII")  # family, pad, type, index, flags, change
IFADDRMSG = struct.Struct("=BBBBI")  # family, prefixlen, flags, scope, index
# rtmsg: family, dst_len, src_len, tos, table, protocol, scope, type, flags
RTMSG = struct.Struct("=BBBBBBBBI")
NLATTR = struct.Struct("=HH")  # nla_len, nla_type

# --------------------------------------------------------------------------- the test's own ABI


def nla(kind: int, payload: bytes, *, nested: bool = False) -> bytes:
    """One attribute as the kernel lays it out (nla_put / nla_nest_start)."""
    length = NLATTR.size + len(payload)
    return (
        NLATTR.pack(length, kind | (NLA_F_NESTED if nested else 0)) + payload + bytes(-length % 4)
    )


def u8(value: int) -> bytes:
    return struct.pack("=B", value)


def u16(value: int) -> bytes:
    return struct.pack("=H", value)


def u32(value: int) -> bytes:
    return struct.pack("=I", value)


def s32(value: int) -> bytes:
    return struct.pack("=i", value)


def cstr(value: str) -> bytes:
    return value.encode() + b"\0"


def ip4(value: str) -> bytes:
    return ipaddress.IPv4Address(value).packed


def mac_bytes(mac: str) -> bytes:
    return bytes.fromhex(mac.replace(":", ""))


def walk(data: bytes) -> list[tuple[int, bytes]]:
    """(nla_type with flags, payload) of each attribute; fails unless `data` is well formed."""
    found: list[tuple[int, bytes]] = []
    offset = 0
    while offset < len(data):
        assert len(data) - offset >= NLATTR.size, f"a partial attribute header at {offset}"
        length, kind = NLATTR.unpack_from(data, offset)
        assert NLATTR.size <= length <= len(data) - offset, f"nla_len {length} at {offset}"
        padded = (length + 3) & ~3
        assert offset + padded <= len(data), f"attribute at {offset} is not padded to 4 bytes"
        assert data[offset + length : offset + padded] == bytes(padded - length), "dirty padding"
        found.append((kind, data[offset + NLATTR.size : offset + length]))
        offset += padded
    return found


@dataclass(frozen=True)
class Message:
    """A kernel-like payload: its fixed header and its top-level attributes (each padded)."""

    header: bytes
    attrs: tuple[bytes, ...]

    @property
    def data(self) -> bytes:
        return self.header + b"".join(self.attrs)

    def complete_before(self, cut: int) -> bytes:
        """The message up to the first attribute that `data[:cut]` does not hold whole."""
        offset = len(self.header)
        for attribute in self.attrs:
            (length,) = struct.unpack_from("=H", attribute)
            if offset + length > cut:
                break
            offset += len(attribute)
        return self.data[:offset]


def link_message(
    *,
    index: int,
    name: str,
    flags: int = IFF_BROADCAST | IFF_MULTICAST,
    mac: str | None = None,
    master: int | None = None,
    alias: str | None = None,
    kind: str | None = None,
    isolated: bool | None = None,
    port_without_isolated: bool = False,
    peer_index: int | None = None,
    peer_nsid: int | None = None,
    nested_flag: bool = False,
) -> Message:
    """An RTM_NEWLINK payload in rtnl_fill_ifinfo's order, with attributes rtnl ignores."""
    header = IFINFOMSG.pack(socket.AF_UNSPEC, 0, ARPHRD_ETHER, index, flags, 0)
    attrs = [nla(IFLA_IFNAME, cstr(name)), nla(IFLA_TXQLEN, u32(1000))]
    attrs += [nla(IFLA_OPERSTATE, u8(6)), nla(IFLA_MTU, u32(1500))]
    if master is not None:
        attrs.append(nla(IFLA_MASTER, u32(master)))
    if alias is not None:
        attrs.append(nla(IFLA_IFALIAS, cstr(alias)))
    if mac is not None:
        attrs += [nla(IFLA_ADDRESS, mac_bytes(mac)), nla(IFLA_BROADCAST, b"\xff" * 6)]
    if peer_index is not None:
        attrs.append(nla(IFLA_LINK, u32(peer_index)))
    info: list[bytes] = []
    if kind is not None:
        # The bridge's own data uses IFLA_BR_* numbers, which overlap IFLA_BRPORT_*: an
        # attribute numbered like IFLA_BRPORT_ISOLATED here must not be read as the flag.
        data = nla(IFLA_BR_FORWARD_DELAY, u32(1500)) + nla(IFLA_BRPORT_ISOLATED, u8(1))
        info += [nla(IFLA_INFO_KIND, cstr(kind)), nla(IFLA_INFO_DATA, data, nested=nested_flag)]
    if isolated is not None or port_without_isolated:
        port = nla(IFLA_BRPORT_STATE, u8(3)) + nla(IFLA_BRPORT_PRIORITY, u16(32))
        port += nla(IFLA_BRPORT_COST, u32(2))
        if isolated is not None:
            port += nla(IFLA_BRPORT_ISOLATED, u8(int(isolated)))
        port += nla(IFLA_BRPORT_LOCKED, u8(0))
        info += [nla(IFLA_INFO_SLAVE_KIND, cstr("bridge"))]
        info += [nla(IFLA_INFO_SLAVE_DATA, port, nested=nested_flag)]
    if info:
        attrs.append(nla(IFLA_LINKINFO, b"".join(info), nested=nested_flag))
    if peer_nsid is not None:
        attrs.append(nla(IFLA_LINK_NETNSID, s32(peer_nsid)))
    attrs.append(nla(IFLA_AF_SPEC, nla(socket.AF_INET, nla(1, u32(0))), nested=nested_flag))
    return Message(header, tuple(attrs))


def address_message(
    *,
    index: int,
    prefixlen: int,
    local: str | None,
    peer: str | None = None,
    family: int = socket.AF_INET,
) -> Message:
    """An RTM_NEWADDR payload in inet_fill_ifaddr's order (IFA_ADDRESS is the peer if any)."""
    header = IFADDRMSG.pack(family, prefixlen, IFA_F_PERMANENT, RT_SCOPE_UNIVERSE, index)
    attrs: list[bytes] = []
    shown = peer or local  # the kernel puts the peer here on point-to-point links
    if shown is not None:
        attrs.append(nla(IFA_ADDRESS, ip4(shown)))
    if local is not None:
        attrs.append(nla(IFA_LOCAL, ip4(local)))
    attrs += [nla(IFA_BROADCAST, ip4("10.255.255.255")), nla(IFA_LABEL, cstr("eth0"))]
    attrs += [nla(IFA_FLAGS, u32(IFA_F_PERMANENT)), nla(IFA_CACHEINFO, bytes(16))]
    return Message(header, tuple(attrs))


def route_message(
    *,
    dst_len: int,
    table: int,
    type_: int = RTN_UNICAST,
    gateway: str | None = None,
    oif: int | None = None,
    priority: int = 0,
) -> Message:
    """An RTM_NEWROUTE payload in fib_dump_info's order (rtm_table saturates at 252)."""
    header_table = table if table < 256 else RT_TABLE_COMPAT
    scope = RT_SCOPE_UNIVERSE if gateway else RT_SCOPE_LINK
    header = RTMSG.pack(socket.AF_INET, dst_len, 0, 0, header_table, RTPROT_BOOT, scope, type_, 0)
    attrs = [nla(RTA_TABLE, u32(table))]
    if dst_len:
        attrs.append(nla(RTA_DST, ip4("10.0.0.0")))
    if priority:
        attrs.append(nla(RTA_PRIORITY, u32(priority)))
    attrs.append(nla(RTA_PREFSRC, ip4("10.0.0.2")))
    if gateway is not None:
        attrs.append(nla(RTA_GATEWAY, ip4(gateway)))
    if oif is not None:
        attrs.append(nla(RTA_OIF, u32(oif)))
    return Message(header, tuple(attrs))


def parse_link(data: bytes) -> Link:
    return rtnl.parse_link(memoryview(data))


def parse_address(data: bytes) -> Address | None:
    return rtnl.parse_address(memoryview(data))


def parse_route(data: bytes) -> Route | None:
    return rtnl.parse_route(memoryview(data))


# --------------------------------------------------------------------------- strategies

# dev_valid_name: 1-15 bytes, no "/", ":" or whitespace.
link_names = st.text(
    st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters="/:"),
    min_size=1,
    max_size=15,
)
# An alias is any text (the kernel keeps up to 255 bytes); NUL ends it on the wire.
aliases = st.text(st.characters(codec="utf-8", exclude_characters="\0"), min_size=1, max_size=60)
macs = st.binary(min_size=6, max_size=6).map(lambda b: b.hex(":"))
ifindexes = st.integers(min_value=1, max_value=2**31 - 1)
ipv4s = st.ip_addresses(v=4).map(str)
prefixlens = st.integers(min_value=0, max_value=32)
u32s = st.integers(min_value=0, max_value=2**32 - 1)
link_kinds = st.sampled_from(["bridge", "veth", "dummy", "vxlan"])


@st.composite
def links(draw: st.DrawFn) -> tuple[Message, Link]:
    """A kernel-like link message and the Link it carries."""
    link = Link(
        index=draw(ifindexes),
        name=draw(link_names),
        flags=draw(u32s),
        kind=draw(st.none() | link_kinds),
        master=draw(st.none() | ifindexes),
        alias=draw(st.none() | aliases),
        mac=draw(st.none() | macs),
        peer_index=draw(st.none() | ifindexes),
        peer_nsid=draw(st.none() | st.integers(min_value=0, max_value=2**31 - 1)),
        isolated=draw(st.none() | st.booleans()),
    )
    message = link_message(
        index=link.index,
        name=link.name,
        flags=link.flags,
        mac=link.mac,
        master=link.master,
        alias=link.alias,
        kind=link.kind,
        isolated=link.isolated,
        peer_index=link.peer_index,
        peer_nsid=link.peer_nsid,
        nested_flag=draw(st.booleans()),
    )
    return message, link


@st.composite
def addresses(draw: st.DrawFn) -> tuple[Message, Address]:
    """A kernel-like IPv4 address message (maybe point-to-point) and the Address it carries."""
    address = Address(index=draw(ifindexes), address=draw(ipv4s), prefixlen=draw(prefixlens))
    message = address_message(
        index=address.index,
        prefixlen=address.prefixlen,
        local=address.address,
        peer=draw(st.none() | ipv4s),
    )
    return message, address


@st.composite
def routes(draw: st.DrawFn) -> tuple[Message, Route]:
    """A kernel-like IPv4 route message and the Route it carries."""
    route = Route(
        dst_len=draw(prefixlens),
        table=draw(u32s.filter(lambda t: t != 0)),
        type=draw(st.integers(min_value=1, max_value=11)),
        gateway=draw(st.none() | ipv4s),
        oif=draw(st.none() | ifindexes),
        priority=draw(u32s),
    )
    message = route_message(
        dst_len=route.dst_len,
        table=route.table,
        type_=route.type,
        gateway=route.gateway,
        oif=route.oif,
        priority=route.priority,
    )
    return message, route


# --------------------------------------------------------------------------- encoding


@given(kind=st.integers(min_value=0, max_value=0x3FFF), payload=st.binary(max_size=70))
def test_an_attribute_counts_header_and_payload_and_pads_to_4_bytes(
    kind: int, payload: bytes
) -> None:
    encoded = rtnl.attr(kind, payload)
    length, got_kind = NLATTR.unpack_from(encoded)
    assert length == 4 + len(payload)
    assert got_kind == kind
    assert len(encoded) % 4 == 0 and len(encoded) - length < 4
    assert walk(encoded) == [(kind, payload)]


def test_a_nested_attribute_is_flagged_and_holds_its_children_in_order() -> None:
    first, second = rtnl.attr(1, b"abc"), rtnl.attr(2, u32(7))
    encoded = rtnl.nested(IFLA_LINKINFO, first, second)
    assert walk(encoded) == [(IFLA_LINKINFO | NLA_F_NESTED, first + second)]
    assert walk(first + second) == [(1, b"abc"), (2, u32(7))]
    assert walk(rtnl.nested(IFLA_LINKINFO)) == [(IFLA_LINKINFO | NLA_F_NESTED, b"")]


def ifinfo_of(body: bytes) -> tuple[tuple[int, ...], list[tuple[int, bytes]]]:
    """(family, pad, type, index, flags, change) and the attributes of a link request."""
    return IFINFOMSG.unpack_from(body), walk(body[IFINFOMSG.size :])


def test_new_bridge_is_one_exclusive_create_of_kind_bridge() -> None:
    request = rtnl.new_bridge(name="rtbr0", mac="02:aa:bb:cc:dd:ee")
    assert (request.type, request.flags) == (RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL)
    header, attrs = ifinfo_of(request.body)
    assert header == (socket.AF_UNSPEC, 0, 0, 0, 0, 0)
    assert attrs == [
        (IFLA_IFNAME, b"rtbr0\0"),
        (IFLA_ADDRESS, b"\x02\xaa\xbb\xcc\xdd\xee"),
        (IFLA_LINKINFO | NLA_F_NESTED, nla(IFLA_INFO_KIND, b"bridge\0")),
    ]


def test_new_veth_carries_the_peer_with_its_name_and_namespace_fd() -> None:
    request = rtnl.new_veth(
        name="rth0", mac="02:00:00:00:00:01", master=7, peer_name="eth0", peer_netns_fd=42
    )
    assert (request.type, request.flags) == (RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL)
    header, attrs = ifinfo_of(request.body)
    assert header == (socket.AF_UNSPEC, 0, 0, 0, IFF_UP, IFF_UP)  # created up
    assert attrs[:3] == [
        (IFLA_IFNAME, b"rth0\0"),
        (IFLA_ADDRESS, b"\x02\x00\x00\x00\x00\x01"),
        (IFLA_MASTER, u32(7)),
    ]
    (linkinfo_type, linkinfo), *rest = attrs[3:]
    assert linkinfo_type == IFLA_LINKINFO | NLA_F_NESTED and rest == []
    (kind_type, kind), (data_type, data) = walk(linkinfo)
    assert (kind_type, kind) == (IFLA_INFO_KIND, b"veth\0")
    assert data_type == IFLA_INFO_DATA | NLA_F_NESTED
    # VETH_INFO_PEER is an ifinfomsg followed by attributes, not a pure nest: the kernel's
    # policy (veth_policy) gives it a minimum length, and would refuse NLA_F_NESTED on it.
    [(peer_type, peer)] = walk(data)
    assert peer_type == VETH_INFO_PEER
    peer_header, peer_attrs = ifinfo_of(peer)
    assert peer_header == (socket.AF_UNSPEC, 0, 0, 0, 0, 0)  # born down
    assert peer_attrs == [(IFLA_IFNAME, b"eth0\0"), (IFLA_NET_NS_FD, u32(42))]


@pytest.mark.parametrize(
    ("up", "flags", "change"), [(None, 0, 0), (True, IFF_UP, IFF_UP), (False, 0, IFF_UP)]
)
def test_set_link_changes_the_admin_state_only_when_asked(
    up: bool | None, flags: int, change: int
) -> None:
    request = rtnl.set_link(index=9, up=up)
    assert (request.type, request.flags) == (RTM_NEWLINK, 0)  # no CREATE: the link must exist
    assert ifinfo_of(request.body) == ((socket.AF_UNSPEC, 0, 0, 9, flags, change), [])


def test_set_link_carries_alias_master_and_the_bridge_port_flag() -> None:
    request = rtnl.set_link(index=9, alias="reconciler:rt1/env/a", master=3, isolated=True)
    _, attrs = ifinfo_of(request.body)
    assert attrs[:2] == [(IFLA_IFALIAS, b"reconciler:rt1/env/a\0"), (IFLA_MASTER, u32(3))]
    [(linkinfo_type, linkinfo)] = attrs[2:]
    assert linkinfo_type == IFLA_LINKINFO | NLA_F_NESTED
    (slave_kind_type, slave_kind), (slave_data_type, slave_data) = walk(linkinfo)
    assert (slave_kind_type, slave_kind) == (IFLA_INFO_SLAVE_KIND, b"bridge\0")
    assert slave_data_type == IFLA_INFO_SLAVE_DATA | NLA_F_NESTED
    assert walk(slave_data) == [(IFLA_BRPORT_ISOLATED, b"\x01")]

    _, attrs = ifinfo_of(rtnl.set_link(index=9, isolated=False).body)
    [(_, linkinfo)] = attrs
    assert walk(walk(linkinfo)[1][1]) == [(IFLA_BRPORT_ISOLATED, b"\x00")]


def test_del_link_names_the_link_by_index_only() -> None:
    request = rtnl.del_link(index=12)
    assert (request.type, request.flags) == (RTM_DELLINK, 0)
    assert ifinfo_of(request.body) == ((socket.AF_UNSPEC, 0, 0, 12, 0, 0), [])


@pytest.mark.parametrize(
    ("make", "type_", "flags"),
    [
        (rtnl.new_address, RTM_NEWADDR, NLM_F_CREATE | NLM_F_EXCL),
        (rtnl.del_address, RTM_DELADDR, 0),
    ],
)
def test_address_requests_carry_the_address_as_local_and_address(
    make: Callable[..., Request], type_: int, flags: int
) -> None:
    request = make(index=5, address="10.1.2.3", prefixlen=24)
    assert (request.type, request.flags) == (type_, flags)
    header = IFADDRMSG.unpack_from(request.body)
    assert header == (socket.AF_INET, 24, 0, RT_SCOPE_UNIVERSE, 5)
    packed = ip4("10.1.2.3")
    assert walk(request.body[IFADDRMSG.size :]) == [(IFA_LOCAL, packed), (IFA_ADDRESS, packed)]


def test_new_default_route_is_a_unicast_main_table_route_via_the_gateway() -> None:
    request = rtnl.new_default_route(gateway="10.0.0.1", oif=4)
    assert (request.type, request.flags) == (RTM_NEWROUTE, NLM_F_CREATE | NLM_F_EXCL)
    header = RTMSG.unpack_from(request.body)
    assert header == (
        socket.AF_INET,
        0,
        0,
        0,
        RT_TABLE_MAIN,
        RTPROT_BOOT,
        RT_SCOPE_UNIVERSE,
        RTN_UNICAST,
        0,
    )
    assert walk(request.body[RTMSG.size :]) == [
        (RTA_TABLE, u32(RT_TABLE_MAIN)),
        (RTA_GATEWAY, ip4("10.0.0.1")),
        (RTA_OIF, u32(4)),
    ]  # no RTA_PRIORITY: metric 0


def test_del_default_route_names_exactly_the_route_it_was_given() -> None:
    route = Route(0, RT_TABLE_MAIN, RTN_UNICAST, gateway=None, oif=3, priority=100)
    request = rtnl.del_default_route(route)
    assert (request.type, request.flags) == (RTM_DELROUTE, 0)
    assert walk(request.body[RTMSG.size :]) == [
        (RTA_TABLE, u32(RT_TABLE_MAIN)),
        (RTA_OIF, u32(3)),
        (RTA_PRIORITY, u32(100)),
    ]


@given(name=link_names, mac=macs, alias=aliases, index=ifindexes, master=ifindexes)
def test_link_requests_are_well_formed_and_read_back(
    name: str, mac: str, alias: str, index: int, master: int
) -> None:
    bridge = parse_link(rtnl.new_bridge(name=name, mac=mac).body)
    assert (bridge.name, bridge.mac, bridge.kind) == (name, mac, "bridge")
    veth = rtnl.new_veth(name=name, mac=mac, master=master, peer_name=name, peer_netns_fd=3)
    walk(veth.body[IFINFOMSG.size :])
    assert parse_link(veth.body).master == master
    changed = parse_link(rtnl.set_link(index=index, alias=alias, master=master, isolated=True).body)
    assert (changed.index, changed.alias, changed.master, changed.isolated) == (
        index,
        alias,
        master,
        True,
    )


@given(index=ifindexes, address=ipv4s, prefixlen=prefixlens)
def test_address_requests_read_back(index: int, address: str, prefixlen: int) -> None:
    expected = Address(index=index, address=address, prefixlen=prefixlen)
    for make in (rtnl.new_address, rtnl.del_address):
        body = make(index=index, address=address, prefixlen=prefixlen).body
        walk(body[IFADDRMSG.size :])
        assert parse_address(body) == expected


@given(gateway=st.none() | ipv4s, oif=st.none() | ifindexes, priority=u32s)
def test_default_route_requests_read_back(
    gateway: str | None, oif: int | None, priority: int
) -> None:
    route = Route(0, RT_TABLE_MAIN, RTN_UNICAST, gateway=gateway, oif=oif, priority=priority)
    body = rtnl.del_default_route(route).body
    walk(body[RTMSG.size :])
    assert parse_route(body) == route
    assert route.is_main_default
    if gateway is not None and oif is not None:
        added = parse_route(rtnl.new_default_route(gateway=gateway, oif=oif).body)
        assert added == Route(0, RT_TABLE_MAIN, RTN_UNICAST, gateway, oif, 0)


# --------------------------------------------------------------------------- parsing


@pytest.mark.parametrize("nested_flag", [False, True], ids=["noflag", "NLA_F_NESTED"])
def test_parse_link_reads_a_bridge_port_veth_as_the_kernel_sends_it(nested_flag: bool) -> None:
    message = link_message(
        index=7,
        name="rth0",
        flags=IFF_UP | IFF_BROADCAST | IFF_MULTICAST | IFF_LOWER_UP,
        mac="02:11:22:33:44:55",
        master=3,
        alias="reconciler:rt1/env/a",
        kind="veth",
        isolated=True,
        peer_index=2,
        peer_nsid=5,
        nested_flag=nested_flag,
    )
    link = parse_link(message.data)
    assert link == Link(
        index=7,
        name="rth0",
        flags=IFF_UP | IFF_BROADCAST | IFF_MULTICAST | IFF_LOWER_UP,
        kind="veth",
        master=3,
        alias="reconciler:rt1/env/a",
        mac="02:11:22:33:44:55",
        peer_index=2,
        peer_nsid=5,
        isolated=True,
    )
    assert link.up


def test_parse_link_of_a_plain_link_leaves_the_optional_parts_out() -> None:
    link = parse_link(link_message(index=1, name="lo", flags=0).data)
    assert link == Link(1, "lo", 0, None, None, None, None, None, None, None)
    assert not link.up


def test_the_port_flag_is_read_from_bridge_port_data_only() -> None:
    # A bridge's own IFLA_INFO_DATA holds an attribute numbered like IFLA_BRPORT_ISOLATED.
    assert parse_link(link_message(index=3, name="br", kind="bridge").data).isolated is None
    port = link_message(index=4, name="p", kind="veth", port_without_isolated=True)
    assert parse_link(port.data).isolated is False  # a port of a kernel without the flag
    off = link_message(index=4, name="p", kind="veth", isolated=False)
    assert parse_link(off.data).isolated is False


def test_parse_link_maps_what_means_nothing_to_none() -> None:
    message = link_message(index=4, name="x", master=0, alias="")
    link = parse_link(message.data)
    assert (link.master, link.alias) == (None, None)
    # A non-Ethernet hardware address (an ipip tunnel's 4 bytes) is no MAC.
    tunnel = Message(message.header, (*message.attrs, nla(IFLA_ADDRESS, ip4("192.0.2.1"))))
    assert parse_link(tunnel.data).mac is None


@given(links())
def test_parse_link_reads_what_the_message_carries(case: tuple[Message, Link]) -> None:
    message, link = case
    assert parse_link(message.data) == link


def test_parse_address_reads_the_local_address_not_the_peer() -> None:
    plain = address_message(index=3, prefixlen=24, local="10.0.0.2")
    assert parse_address(plain.data) == Address(index=3, address="10.0.0.2", prefixlen=24)
    assert Address(3, "10.0.0.2", 24).cidr == "10.0.0.2/24"
    p2p = address_message(index=3, prefixlen=32, local="10.0.0.2", peer="10.0.0.1")
    assert parse_address(p2p.data) == Address(index=3, address="10.0.0.2", prefixlen=32)
    peer_only = address_message(index=3, prefixlen=32, local=None, peer="10.0.0.1")
    assert parse_address(peer_only.data) == Address(index=3, address="10.0.0.1", prefixlen=32)
    assert parse_address(address_message(index=3, prefixlen=8, local=None).data) is None


@given(addresses())
def test_parse_address_reads_what_the_message_carries(case: tuple[Message, Address]) -> None:
    message, address = case
    assert parse_address(message.data) == address


def test_parse_route_reads_a_default_route_and_a_local_route() -> None:
    default = parse_route(
        route_message(dst_len=0, table=RT_TABLE_MAIN, gateway="10.0.0.1", oif=2).data
    )
    assert default == Route(0, RT_TABLE_MAIN, RTN_UNICAST, "10.0.0.1", 2, 0)
    assert default.is_main_default
    local = parse_route(
        route_message(dst_len=32, table=RT_TABLE_LOCAL, type_=RTN_LOCAL, oif=2).data
    )
    assert local == Route(32, RT_TABLE_LOCAL, RTN_LOCAL, None, 2, 0)
    assert not local.is_main_default


def test_parse_route_takes_the_table_from_rta_table_beyond_255() -> None:
    route = parse_route(route_message(dst_len=16, table=1000, oif=2, priority=7).data)
    assert route is not None and (route.table, route.priority) == (1000, 7)
    assert not Route(0, 1000, RTN_UNICAST, "10.0.0.1", 2, 0).is_main_default
    # Without RTA_TABLE (older kernels), the header's table stands.
    header_only = RTMSG.pack(
        socket.AF_INET, 0, 0, 0, RT_TABLE_MAIN, RTPROT_KERNEL, 0, RTN_UNICAST, 0
    )
    assert parse_route(header_only) == Route(0, RT_TABLE_MAIN, RTN_UNICAST, None, None, 0)


@given(routes())
def test_parse_route_reads_what_the_message_carries(case: tuple[Message, Route]) -> None:
    message, route = case
    assert parse_route(message.data) == route


def test_other_families_are_ignored() -> None:
    v6 = ipaddress.IPv6Address("fd00::1").packed
    address = IFADDRMSG.pack(socket.AF_INET6, 64, 0, 0, 3) + nla(IFA_ADDRESS, v6)
    assert parse_address(address) is None
    route = RTMSG.pack(socket.AF_INET6, 0, 0, 0, RT_TABLE_MAIN, RTPROT_BOOT, 0, RTN_UNICAST, 0)
    route += nla(RTA_TABLE, u32(RT_TABLE_MAIN)) + nla(RTA_GATEWAY, v6) + nla(RTA_OIF, u32(3))
    assert parse_route(route) is None


# --------------------------------------------------------------------------- malformed input

Parser = Callable[[bytes], object]
PARSERS: dict[str, Parser] = {
    "link": parse_link,
    "address": parse_address,
    "route": parse_route,
}
SAMPLES = {
    "link": link_message(
        index=7,
        name="rth0",
        mac="02:11:22:33:44:55",
        master=3,
        alias="a",
        kind="veth",
        isolated=True,
        peer_index=2,
        peer_nsid=5,
    ),
    "address": address_message(index=3, prefixlen=32, local="10.0.0.2", peer="10.0.0.1"),
    "route": route_message(dst_len=0, table=1000, gateway="10.0.0.1", oif=2, priority=9),
}


@pytest.mark.parametrize("what", PARSERS)
@pytest.mark.parametrize("nla_len", [0, 1, 2, 3])
def test_an_attribute_shorter_than_its_header_stops_the_walk(what: str, nla_len: int) -> None:
    sample = SAMPLES[what]
    second = len(sample.header) + len(sample.attrs[0])
    bad = NLATTR.pack(nla_len, IFLA_IFNAME) + b"junk"
    data = sample.data[:second] + bad + sample.data[second:]
    assert PARSERS[what](data) == PARSERS[what](sample.data[:second])


@pytest.mark.parametrize("what", PARSERS)
@pytest.mark.parametrize("tail", [b"\x08", b"\x08\x00", b"\x08\x00\x03"])
def test_a_partial_attribute_header_at_the_end_is_ignored(what: str, tail: bytes) -> None:
    sample = SAMPLES[what]
    assert PARSERS[what](sample.data + tail) == PARSERS[what](sample.data)


# Every attribute a parser reads, alone after its message's header, cut one byte short
# of its nla_len: the message ends inside it.
TRUNCATED = [
    ("link", nla(IFLA_IFNAME, cstr("rth0"))),
    ("link", nla(IFLA_MASTER, u32(3))),
    ("link", nla(IFLA_IFALIAS, cstr("an alias"))),
    ("link", nla(IFLA_ADDRESS, mac_bytes("02:11:22:33:44:55"))),
    ("link", nla(IFLA_LINK, u32(2))),
    ("link", nla(IFLA_LINK_NETNSID, s32(5))),
    ("link", nla(IFLA_LINKINFO, nla(IFLA_INFO_KIND, cstr("veth")))),
    (
        "link",
        nla(IFLA_LINKINFO, nla(IFLA_INFO_SLAVE_DATA, nla(IFLA_BRPORT_ISOLATED, u8(1)))),
    ),
    ("address", nla(IFA_LOCAL, ip4("10.0.0.2"))),
    ("address", nla(IFA_ADDRESS, ip4("10.0.0.2"))),
    ("route", nla(RTA_TABLE, u32(1000))),
    ("route", nla(RTA_GATEWAY, ip4("10.0.0.1"))),
    ("route", nla(RTA_OIF, u32(2))),
    ("route", nla(RTA_PRIORITY, u32(9))),
]


@pytest.mark.parametrize(
    ("what", "attribute"),
    TRUNCATED,
    ids=[f"{what}-type{NLATTR.unpack_from(a)[1]}-{i}" for i, (what, a) in enumerate(TRUNCATED)],
)
def test_an_attribute_running_past_the_end_of_the_message_is_ignored(
    what: str, attribute: bytes
) -> None:
    (length,) = struct.unpack_from("=H", attribute)
    header = SAMPLES[what].header
    assert PARSERS[what](header + attribute[: length - 1]) == PARSERS[what](header)


# Attributes with an empty payload (nla_len 4) where the parser reads a fixed-size value.
EMPTY = [
    ("link", IFLA_MASTER),
    ("link", IFLA_LINK),
    ("link", IFLA_LINK_NETNSID),
    ("address", IFA_LOCAL),
    ("address", IFA_ADDRESS),
    ("route", RTA_TABLE),
    ("route", RTA_GATEWAY),
    ("route", RTA_OIF),
    ("route", RTA_PRIORITY),
]


@pytest.mark.parametrize(("what", "kind"), EMPTY, ids=[f"{w}-type{k}" for w, k in EMPTY])
def test_an_empty_attribute_where_a_value_is_expected_is_ignored(what: str, kind: int) -> None:
    header = SAMPLES[what].header
    assert PARSERS[what](header + nla(kind, b"")) == PARSERS[what](header)


def test_an_empty_bridge_port_flag_is_ignored() -> None:
    port = nla(IFLA_INFO_SLAVE_DATA, nla(IFLA_BRPORT_ISOLATED, b""))
    data = SAMPLES["link"].header + nla(IFLA_LINKINFO, port)
    assert parse_link(data).isolated in (None, False)


any_message = st.one_of(
    links().map(lambda case: (case[0], parse_link)),
    addresses().map(lambda case: (case[0], parse_address)),
    routes().map(lambda case: (case[0], parse_route)),
)


@given(case=any_message, data=st.data())
def test_a_message_cut_anywhere_reads_as_its_complete_attributes(
    case: tuple[Message, Parser], data: st.DataObject
) -> None:
    message, parse = case
    cut = data.draw(st.integers(min_value=len(message.header), max_value=len(message.data)))
    assert parse(message.data[:cut]) == parse(message.complete_before(cut))
