"""A lean rtnetlink client: raw NETLINK_ROUTE sockets, batched requests, minimal parsing.

Why not a general library. The network driver needs a dozen message kinds, and it needs
them fast: a reconcile of 200 environments is ~1,000 link/address/route writes and a
no-op resync ~600 dumps. A general client builds an object per attribute and a round
trip per request; here a request is a few bytes packed with `struct`, a dump answer is
walked once for the handful of attributes we read, and many requests travel in *one*
`send()`: the kernel processes every message of a datagram in order and acknowledges
each (NLM_F_ACK), so a batch costs one syscall out and a few in, like `ip -batch`.

Semantics the driver relies on:

- `Socket.execute(requests)` returns one errno per request (0: done), in order. A failed
  request does not stop the ones after it (the kernel carries on with the next message),
  so a batch must never contain a request that is only safe if an earlier one succeeded.
- Dumps retry when the kernel flags them inconsistent (NLM_F_DUMP_INTR), and end at
  NLMSG_DONE: a dump is complete or an error, never silently short.
- Link dumps ask the kernel to leave statistics out (RTEXT_FILTER_SKIP_STATS): most of
  a link message's bytes, none of our business.
- A socket belongs to the network namespace it was created in, for life, whichever
  thread uses it; it keeps that namespace alive while open (see `netns`).

Only IPv4 addresses and routes are modelled: environments are IPv4 (IPv6 is filtered by
the firewall).
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")

# <linux/netlink.h>, <linux/rtnetlink.h>, <linux/if_link.h>: stable kernel ABI values.
RTM_NEWLINK, RTM_DELLINK, RTM_GETLINK = 16, 17, 18
RTM_NEWADDR, RTM_DELADDR, RTM_GETADDR = 20, 21, 22
RTM_NEWROUTE, RTM_DELROUTE, RTM_GETROUTE = 24, 25, 26
RTM_NEWNSID, RTM_GETNSID = 88, 90
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLM_F_REQUEST, NLM_F_MULTI, NLM_F_ACK = 0x1, 0x2, 0x4
NLM_F_DUMP_INTR = 0x10
NLM_F_DUMP = 0x300
NLM_F_EXCL, NLM_F_CREATE = 0x200, 0x400
IFF_UP = 0x1
IFLA_ADDRESS, IFLA_IFNAME, IFLA_LINK, IFLA_MASTER = 1, 3, 5, 10
IFLA_LINKINFO, IFLA_IFALIAS, IFLA_NET_NS_FD, IFLA_EXT_MASK = 18, 20, 28, 29
IFLA_LINK_NETNSID = 37
IFLA_INFO_KIND, IFLA_INFO_DATA, IFLA_INFO_SLAVE_KIND, IFLA_INFO_SLAVE_DATA = 1, 2, 4, 5
VETH_INFO_PEER = 1
IFLA_BRPORT_ISOLATED = 33
RTEXT_FILTER_SKIP_STATS = 1 << 3
IFA_ADDRESS, IFA_LOCAL = 1, 2
RTA_DST, RTA_OIF, RTA_GATEWAY, RTA_PRIORITY, RTA_TABLE = 1, 4, 5, 6, 15
NETNSA_NSID, NETNSA_FD = 1, 3
RT_TABLE_MAIN = 254
RTN_UNICAST = 1
RTPROT_BOOT = 3
RT_SCOPE_UNIVERSE = 0
LOOPBACK_INDEX = 1  # the kernel gives `lo` ifindex 1 in every network namespace
_SOL_NETLINK = 270
_NETLINK_CAP_ACK = 10  # error acks without a copy of our request: small, many fit a read
_NETLINK_EXT_ACK = 11
_NETLINK_GET_STRICT_CHK = 12

_HDR = struct.Struct("=IHHII")  # nlmsghdr: len, type, flags, seq, pid
_IFINFO = struct.Struct("=BxHiII")  # ifinfomsg: family, type, index, flags, change
_IFADDR = struct.Struct("=BBBBI")  # ifaddrmsg: family, prefixlen, flags, scope, index
_RTMSG = struct.Struct(
    "=BBBBBBBBI"
)  # rtmsg: family, dst/src len, tos, table, proto, scope, type, flags
_RTGEN = struct.Struct("=Bxxx")  # rtgenmsg, padded
_RTA = struct.Struct("=HH")
_U32 = struct.Struct("=I")
_I32 = struct.Struct("=i")
_NLA_F_NESTED = 0x8000
_NLA_TYPE_MASK = 0x3FFF
_DUMP_ATTEMPTS = 5
_RECV_SIZE = 1 << 17
_WINDOW = 128  # requests per datagram, acks read before the next one is sent
_TIMEOUT = 30.0  # seconds without an answer from the kernel: give up, never hang


class RtnlError(OSError):
    """The kernel refused a request or a dump (errno), or the socket failed."""


class SocketFailure(RtnlError):
    """The socket itself failed (send/receive error, timeout, lost answers): unusable."""


# --------------------------------------------------------------------------- values


@dataclass(frozen=True, slots=True)
class Link:
    """The part of a link message the driver reads."""

    index: int
    name: str
    flags: int
    kind: str | None  # IFLA_INFO_KIND: "bridge", "veth", None for plain devices
    master: int | None  # ifindex of the bridge it is enslaved to
    alias: str | None
    mac: str | None  # "aa:bb:cc:dd:ee:ff"
    peer_index: int | None  # IFLA_LINK: a veth's peer ifindex (in the peer's netns)
    peer_nsid: int | None  # IFLA_LINK_NETNSID: where the peer lives, as we number it
    isolated: bool | None  # bridge port flag; None when not a bridge port

    @property
    def up(self) -> bool:
        """IFF_UP: administratively up."""
        return bool(self.flags & IFF_UP)


@dataclass(frozen=True, slots=True)
class Address:
    """One IPv4 address on a link."""

    index: int
    address: str
    prefixlen: int

    @property
    def cidr(self) -> str:
        """ "a.b.c.d/len"."""
        return f"{self.address}/{self.prefixlen}"


@dataclass(frozen=True, slots=True)
class Route:
    """One IPv4 route."""

    dst_len: int
    table: int
    type: int
    gateway: str | None
    oif: int | None
    priority: int

    @property
    def is_main_default(self) -> bool:
        """A unicast default route of the main table."""
        return self.dst_len == 0 and self.type == RTN_UNICAST and self.table == RT_TABLE_MAIN


@dataclass(frozen=True, slots=True)
class Request:
    """One message of a batch: type, extra flags, body (everything after nlmsghdr)."""

    type: int
    flags: int
    body: bytes


# --------------------------------------------------------------------------- encoding


def attr(kind: int, payload: bytes) -> bytes:
    """One netlink attribute, padded to 4 bytes."""
    length = _RTA.size + len(payload)
    return _RTA.pack(length, kind) + payload + b"\0" * (-length % 4)


def nested(kind: int, *attrs: bytes) -> bytes:
    """A nested attribute holding `attrs`."""
    return attr(kind | _NLA_F_NESTED, b"".join(attrs))


def _str(value: str) -> bytes:
    return value.encode() + b"\0"


def _mac(value: str) -> bytes:
    return bytes(int(part, 16) for part in value.split(":"))


def _ipv4(value: str) -> bytes:
    return socket.inet_pton(socket.AF_INET, value)


def _ifinfo(*, index: int = 0, up: bool | None = None) -> bytes:
    flags = IFF_UP if up else 0
    change = IFF_UP if up is not None else 0
    return _IFINFO.pack(socket.AF_UNSPEC, 0, index, flags, change)


def new_bridge(*, name: str, mac: str) -> Request:
    """Create bridge `name` with MAC `mac` (fails with EEXIST if the name is taken)."""
    body = _ifinfo()
    body += attr(IFLA_IFNAME, _str(name)) + attr(IFLA_ADDRESS, _mac(mac))
    body += nested(IFLA_LINKINFO, attr(IFLA_INFO_KIND, _str("bridge")))
    return Request(RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL, body)


def new_veth(*, name: str, mac: str, master: int, peer_name: str, peer_netns_fd: int) -> Request:
    """Create veth `name` enslaved to `master` and up, its peer born as `peer_name`
    inside the network namespace open at `peer_netns_fd`: one message, no window in
    which either end exists in the wrong place. The peer starts down: the kernel
    configures it before the pair is linked, and opening an unlinked veth fails
    (ENOTCONN); set it up from inside its namespace."""
    peer = _ifinfo() + attr(IFLA_IFNAME, _str(peer_name))
    peer += attr(IFLA_NET_NS_FD, _U32.pack(peer_netns_fd))
    body = _ifinfo(up=True)
    body += attr(IFLA_IFNAME, _str(name)) + attr(IFLA_ADDRESS, _mac(mac))
    body += attr(IFLA_MASTER, _U32.pack(master))
    body += nested(
        IFLA_LINKINFO,
        attr(IFLA_INFO_KIND, _str("veth")),
        nested(IFLA_INFO_DATA, attr(VETH_INFO_PEER, peer)),
    )
    return Request(RTM_NEWLINK, NLM_F_CREATE | NLM_F_EXCL, body)


def set_link(
    *,
    index: int,
    up: bool | None = None,
    alias: str | None = None,
    master: int | None = None,
    isolated: bool | None = None,
) -> Request:
    """Change an existing link (by index): admin state, ifalias, master, port isolation."""
    body = _ifinfo(index=index, up=up)
    if alias is not None:
        body += attr(IFLA_IFALIAS, _str(alias))
    if master is not None:
        body += attr(IFLA_MASTER, _U32.pack(master))
    if isolated is not None:
        body += nested(
            IFLA_LINKINFO,
            attr(IFLA_INFO_SLAVE_KIND, _str("bridge")),
            nested(IFLA_INFO_SLAVE_DATA, attr(IFLA_BRPORT_ISOLATED, bytes([int(isolated)]))),
        )
    return Request(RTM_NEWLINK, 0, body)


def del_link(*, index: int) -> Request:
    """Delete link `index` (a veth takes its peer along)."""
    return Request(RTM_DELLINK, 0, _ifinfo(index=index))


def _ifaddr(index: int, cidr: tuple[str, int]) -> bytes:
    address, prefixlen = cidr
    body = _IFADDR.pack(socket.AF_INET, prefixlen, 0, RT_SCOPE_UNIVERSE, index)
    return body + attr(IFA_LOCAL, _ipv4(address)) + attr(IFA_ADDRESS, _ipv4(address))


def new_address(*, index: int, address: str, prefixlen: int) -> Request:
    """Add IPv4 `address/prefixlen` to link `index` (EEXIST if already there)."""
    return Request(RTM_NEWADDR, NLM_F_CREATE | NLM_F_EXCL, _ifaddr(index, (address, prefixlen)))


def del_address(*, index: int, address: str, prefixlen: int) -> Request:
    """Remove IPv4 `address/prefixlen` from link `index`."""
    return Request(RTM_DELADDR, 0, _ifaddr(index, (address, prefixlen)))


def _default_route(*, gateway: str | None, oif: int | None, priority: int) -> bytes:
    body = _RTMSG.pack(
        socket.AF_INET, 0, 0, 0, RT_TABLE_MAIN, RTPROT_BOOT, RT_SCOPE_UNIVERSE, RTN_UNICAST, 0
    )
    body += attr(RTA_TABLE, _U32.pack(RT_TABLE_MAIN))
    if gateway is not None:
        body += attr(RTA_GATEWAY, _ipv4(gateway))
    if oif is not None:
        body += attr(RTA_OIF, _U32.pack(oif))
    if priority:
        body += attr(RTA_PRIORITY, _U32.pack(priority))
    return body


def new_default_route(*, gateway: str, oif: int) -> Request:
    """Add the main table's default route via `gateway` on link `oif`."""
    body = _default_route(gateway=gateway, oif=oif, priority=0)
    return Request(RTM_NEWROUTE, NLM_F_CREATE | NLM_F_EXCL, body)


def del_default_route(route: Route) -> Request:
    """Delete exactly `route` (a default route of the main table)."""
    body = _default_route(gateway=route.gateway, oif=route.oif, priority=route.priority)
    return Request(RTM_DELROUTE, 0, body)


# --------------------------------------------------------------------------- parsing


def _attrs(payload: memoryview, offset: int) -> Iterator[tuple[int, memoryview]]:
    end = len(payload)
    while offset + 4 <= end:
        length, kind = _RTA.unpack_from(payload, offset)
        if length < 4 or offset + length > end:
            return  # malformed or cut short: what follows cannot be trusted
        yield kind & _NLA_TYPE_MASK, payload[offset + 4 : offset + length]
        offset += (length + 3) & ~3


def _u32(value: memoryview) -> int | None:
    return _U32.unpack_from(value)[0] if len(value) >= 4 else None


def _i32(value: memoryview) -> int | None:
    return _I32.unpack_from(value)[0] if len(value) >= 4 else None


def _ip(value: memoryview) -> str | None:
    return socket.inet_ntop(socket.AF_INET, bytes(value)) if len(value) == 4 else None


def _text(value: memoryview) -> str:
    return bytes(value).split(b"\0", 1)[0].decode(errors="replace")


def parse_link(payload: memoryview) -> Link:
    """A link from an RTM_NEWLINK payload.

    The hottest loop of an observation (a host with 400 links sends ~40,000 attributes
    per dump): attributes are walked inline and only the few we read are decoded.
    """
    _, _, index, flags, _ = _IFINFO.unpack_from(payload)
    name = ""
    kind = alias = mac = None
    master = peer_index = peer_nsid = None
    isolated: bool | None = None
    unpack = _RTA.unpack_from
    end = len(payload)
    offset = _IFINFO.size
    while offset + 4 <= end:
        length, key = unpack(payload, offset)
        if length < 4 or offset + length > end:
            break  # malformed or cut short: what follows cannot be trusted
        key &= _NLA_TYPE_MASK
        if key in _LINK_KEYS:
            value = payload[offset + 4 : offset + length]
            if key == IFLA_IFNAME:
                name = _text(value)
            elif key == IFLA_MASTER:
                master = _u32(value) or None
            elif key == IFLA_IFALIAS:
                alias = _text(value) or None
            elif key == IFLA_ADDRESS:
                mac = bytes(value).hex(":") if len(value) == 6 else None
            elif key == IFLA_LINK:
                peer_index = _u32(value)
            elif key == IFLA_LINK_NETNSID:
                peer_nsid = _i32(value)
            else:  # IFLA_LINKINFO
                kind, isolated = _link_info(value)
        offset += (length + 3) & ~3
    return Link(
        index=index,
        name=name,
        flags=flags,
        kind=kind,
        master=master,
        alias=alias,
        mac=mac,
        peer_index=peer_index,
        peer_nsid=peer_nsid,
        isolated=isolated,
    )


_LINK_KEYS = frozenset(
    {IFLA_IFNAME, IFLA_MASTER, IFLA_IFALIAS, IFLA_ADDRESS, IFLA_LINK, IFLA_LINK_NETNSID}
    | {IFLA_LINKINFO}
)


def _link_info(value: memoryview) -> tuple[str | None, bool | None]:
    """(kind, bridge port isolated) from IFLA_LINKINFO.

    A bridge port's IFLA_INFO_SLAVE_DATA holds ~40 attributes: walked inline, and left
    as soon as IFLA_BRPORT_ISOLATED is found."""
    kind = None
    isolated: bool | None = None
    for info_key, info in _attrs(value, 0):
        if info_key == IFLA_INFO_KIND:
            kind = _text(info)
        elif info_key == IFLA_INFO_SLAVE_DATA:
            isolated = False
            unpack = _RTA.unpack_from
            end = len(info)
            offset = 0
            while offset + 4 <= end:
                length, key = unpack(info, offset)
                if length < 4 or offset + length > end:
                    break
                if key & _NLA_TYPE_MASK == IFLA_BRPORT_ISOLATED:
                    isolated = length > 4 and bool(info[offset + 4])
                    break
                offset += (length + 3) & ~3
    return kind, isolated


def parse_address(payload: memoryview) -> Address | None:
    """An IPv4 address from an RTM_NEWADDR payload (None for other families)."""
    family, prefixlen, _, _, index = _IFADDR.unpack_from(payload)
    if family != socket.AF_INET:
        return None
    local = peer = None
    for key, value in _attrs(payload, _IFADDR.size):
        if key == IFA_LOCAL:
            local = _ip(value)
        elif key == IFA_ADDRESS:
            peer = _ip(value)
    # IFA_LOCAL is the interface's own address; IFA_ADDRESS is the peer on p2p links.
    found = local or peer
    return Address(index=index, address=found, prefixlen=prefixlen) if found else None


def parse_route(payload: memoryview) -> Route | None:
    """An IPv4 route from an RTM_NEWROUTE payload (None for other families)."""
    family, dst_len, _, _, table, _, _, kind, _ = _RTMSG.unpack_from(payload)
    if family != socket.AF_INET:
        return None
    gateway = None
    oif = None
    priority = 0
    for key, value in _attrs(payload, _RTMSG.size):
        if key == RTA_TABLE and len(value) >= 4:
            table = _U32.unpack_from(value)[0]
        elif key == RTA_GATEWAY:
            gateway = _ip(value)
        elif key == RTA_OIF:
            oif = _u32(value)
        elif key == RTA_PRIORITY and len(value) >= 4:
            priority = _U32.unpack_from(value)[0]
    return Route(
        dst_len=dst_len, table=table, type=kind, gateway=gateway, oif=oif, priority=priority
    )


# --------------------------------------------------------------------------- socket


_LINK_DUMP = _ifinfo() + attr(IFLA_EXT_MASK, _U32.pack(RTEXT_FILTER_SKIP_STATS))
_ADDR_DUMP = _IFADDR.pack(socket.AF_INET, 0, 0, 0, 0)


def _route_dump(table: int) -> bytes:
    """An IPv4 route dump request, of one table when `table` (strict checking filters)."""
    return _RTMSG.pack(socket.AF_INET, 0, 0, 0, table, 0, 0, 0, 0)


def open_route_socket() -> int:
    """A NETLINK_ROUTE socket fd in the calling thread's network namespace."""
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, 0)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        sock.setsockopt(_SOL_NETLINK, _NETLINK_CAP_ACK, 1)
        sock.setsockopt(_SOL_NETLINK, _NETLINK_EXT_ACK, 1)
        # Dump requests are checked strictly and their header fields act as filters
        # (a route dump of one table), instead of being ignored.
        sock.setsockopt(_SOL_NETLINK, _NETLINK_GET_STRICT_CHK, 1)
        sock.bind((0, 0))  # no multicast groups: nothing is queued that we did not ask for
    except BaseException:
        sock.close()
        raise
    return sock.detach()


class Socket:
    """One NETLINK_ROUTE socket (fd owned). Not thread-safe: callers serialise."""

    def __init__(self, fd: int) -> None:
        self._sock = socket.socket(fileno=fd)
        self._sock.settimeout(_TIMEOUT)
        self._seq = 0

    def fileno(self) -> int:
        """The socket's fd."""
        return self._sock.fileno()

    def close(self) -> None:
        """Close the socket (idempotent)."""
        self._sock.close()

    def _next_seq(self) -> int:
        self._seq = (self._seq + 1) & 0x7FFFFFFF or 1
        return self._seq

    def _messages(self) -> Iterator[tuple[int, int, int, memoryview]]:
        """(type, flags, seq, payload) of every message of one read."""
        try:
            data = memoryview(self._sock.recv(_RECV_SIZE))
        except OSError as exc:  # includes TimeoutError and ENOBUFS (answers were lost)
            raise SocketFailure(
                exc.errno or errno.ETIMEDOUT, f"netlink receive failed: {exc.strerror or exc}"
            ) from exc
        offset = 0
        while offset + _HDR.size <= len(data):
            length, kind, flags, seq, _ = _HDR.unpack_from(data, offset)
            if length < _HDR.size:
                raise SocketFailure(errno.EPROTO, "malformed netlink message")
            yield kind, flags, seq, data[offset + _HDR.size : offset + length]
            offset += (length + 3) & ~3

    # ---- requests

    def execute(self, requests: Sequence[Request]) -> list[int]:
        """Send every request (acked), many per datagram; one errno per request, in order.

        0 means done. The kernel handles the messages of a datagram in order and goes on
        after a failure, so the results are independent of each other. At most `_WINDOW`
        requests are outstanding, so their acks always fit the receive buffer (a dropped
        ack would leave us waiting for it).
        """
        results: list[int] = []
        for first in range(0, len(requests), _WINDOW):
            results += self._exchange(requests[first : first + _WINDOW])
        return results

    def _exchange(self, requests: Sequence[Request]) -> list[int]:
        seqs: dict[int, int] = {}
        chunk = bytearray()
        for position, request in enumerate(requests):
            seq = self._next_seq()
            seqs[seq] = position
            chunk += _HDR.pack(
                _HDR.size + len(request.body),
                request.type,
                NLM_F_REQUEST | NLM_F_ACK | request.flags,
                seq,
                0,
            )
            chunk += request.body
        self._send(bytes(chunk))
        results = [-1] * len(requests)
        pending = len(requests)
        while pending:
            for kind, _, got_seq, payload in self._messages():
                at = seqs.get(got_seq)
                if at is None or kind != NLMSG_ERROR or results[at] != -1:
                    continue  # a stale answer from an earlier, abandoned exchange
                results[at] = -_I32.unpack_from(payload)[0]
                pending -= 1
        return results

    def _send(self, data: bytes) -> None:
        try:
            self._sock.send(data)
        except OSError as exc:
            raise SocketFailure(
                exc.errno or errno.EIO, f"netlink send failed: {exc.strerror}"
            ) from exc

    def call(self, request: Request) -> int:
        """One request; its errno (0: done)."""
        return self.execute([request])[0]

    def check(self, request: Request, what: str) -> None:
        """One request; RtnlError naming `what` if the kernel refuses it."""
        code = self.call(request)
        if code:
            raise RtnlError(code, f"{what}: {os.strerror(code)}")

    # ---- dumps

    def _dump(self, request_type: int, body: bytes, answer_type: int) -> list[memoryview]:
        for _ in range(_DUMP_ATTEMPTS):
            seq = self._next_seq()
            self._send(
                _HDR.pack(_HDR.size + len(body), request_type, NLM_F_REQUEST | NLM_F_DUMP, seq, 0)
                + body
            )
            found: list[memoryview] = []
            interrupted = False
            done = False
            while not done:
                for kind, flags, got_seq, payload in self._messages():
                    if got_seq != seq:
                        continue
                    if flags & NLM_F_DUMP_INTR:
                        interrupted = True
                    if kind == NLMSG_DONE:
                        # A dump that failed inside the kernel ends with DONE carrying
                        # the (negative) errno, not with NLMSG_ERROR.
                        code = -(_i32(payload) or 0)
                        if code > 0:
                            raise RtnlError(code, f"netlink dump failed: {os.strerror(code)}")
                        done = True
                        break
                    if kind == NLMSG_ERROR:
                        code = -_I32.unpack_from(payload)[0]
                        raise RtnlError(code, f"netlink dump failed: {os.strerror(code)}")
                    if kind == answer_type:
                        found.append(payload)
            if not interrupted:
                return found
        raise RtnlError(errno.EAGAIN, f"dump interrupted {_DUMP_ATTEMPTS} times in a row")

    def snapshot(self) -> tuple[list[Link], list[Address], list[Route]]:
        """Links, IPv4 addresses and main-table IPv4 routes: what an observer reads.

        Three dumps in turn. (Sending them in one datagram does not save round trips:
        the kernel keeps a dump running until its end is read, and refuses the next one
        meanwhile with EBUSY.)
        """
        return self.links(), self.addresses(), self.routes(table=RT_TABLE_MAIN)

    def links(self) -> list[Link]:
        """Every link of the socket's namespace (no statistics)."""
        return [parse_link(p) for p in self._dump(RTM_GETLINK, _LINK_DUMP, RTM_NEWLINK)]

    def addresses(self) -> list[Address]:
        """Every IPv4 address of the socket's namespace."""
        found = (parse_address(p) for p in self._dump(RTM_GETADDR, _ADDR_DUMP, RTM_NEWADDR))
        return [a for a in found if a is not None]

    def routes(self, *, table: int = 0) -> list[Route]:
        """Every IPv4 route of the socket's namespace, of `table` only when given (the
        kernel filters: the socket asks for strict dump checking)."""
        try:
            payloads = self._dump(RTM_GETROUTE, _route_dump(table), RTM_NEWROUTE)
        except RtnlError as exc:
            if table and exc.errno == errno.ENOENT:
                return []  # the table does not exist (yet): a namespace with no routes
            raise
        found = (parse_route(p) for p in payloads)
        return [r for r in found if r is not None and (not table or r.table == table)]

    def link(self, name: str) -> Link | None:
        """The link called `name`, or None."""
        body = _ifinfo() + attr(IFLA_IFNAME, _str(name))
        body += attr(IFLA_EXT_MASK, _U32.pack(RTEXT_FILTER_SKIP_STATS))
        return self._get(RTM_GETLINK, body, RTM_NEWLINK, parse_link)

    def nsid(self, netns_fd: int) -> int | None:
        """The id this namespace gives the namespace open at `netns_fd` (None: none)."""
        body = _RTGEN.pack(socket.AF_UNSPEC) + attr(NETNSA_FD, _U32.pack(netns_fd))

        def parse(payload: memoryview) -> int | None:
            for key, value in _attrs(payload, _RTGEN.size):
                if key == NETNSA_NSID:
                    nsid = _i32(value)
                    return (
                        nsid if nsid is not None and nsid >= 0 else None
                    )  # -1: NETNSA_NSID_NOT_ASSIGNED
            return None

        return self._get(RTM_GETNSID, body, RTM_NEWNSID, parse)

    def _get(
        self, request_type: int, body: bytes, answer_type: int, parse: Callable[[memoryview], T]
    ) -> T | None:
        """One request answered by one message; None when the object does not exist."""
        seq = self._next_seq()
        self._send(_HDR.pack(_HDR.size + len(body), request_type, NLM_F_REQUEST, seq, 0) + body)
        while True:
            for kind, _, got_seq, payload in self._messages():
                if got_seq != seq:
                    continue
                if kind == answer_type:
                    return parse(payload)
                if kind == NLMSG_ERROR:
                    code = -_I32.unpack_from(payload)[0]
                    if code in (errno.ENODEV, errno.ENOENT):
                        return None
                    raise RtnlError(code, os.strerror(code))
