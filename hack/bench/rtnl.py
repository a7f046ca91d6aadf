"""A lean rtnetlink client: the cheapest way to look at links and addresses, as a yardstick.

The no-op reconcile is compared against "what must at least be read": one link dump and
one IPv4 address dump on the host and inside every environment's network namespace. This
module does exactly that with a raw `socket(AF_NETLINK, SOCK_RAW, NETLINK_ROUTE)`, a
16-byte request per dump and a parser that walks only the attributes an observer needs
(name, master, address). Nothing is cached between passes except what the caller keeps.

A netlink socket belongs to the network namespace of the thread that created it, for its
whole life. So a socket "inside" namespace X is opened by a short-lived thread that
`setns(2)`s into X first (Python 3.11 has no `os.setns`: libc through ctypes); the main
thread never changes namespace. The same sockets, bound to multicast groups, count the
change notifications a supposedly read-only command causes (`Monitor`).
"""

from __future__ import annotations

import ctypes
import errno
import os
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

NETNS_DIR = "/run/netns"
_CLONE_NEWNET = 0x40000000
_NETLINK_ROUTE = 0
_RTM_NEWLINK, _RTM_GETLINK = 16, 18
_RTM_NEWADDR, _RTM_GETADDR = 20, 22
_NLMSG_ERROR, _NLMSG_DONE = 2, 3
_NLM_F_REQUEST, _NLM_F_DUMP = 0x1, 0x300
_NLM_F_DUMP_INTR = 0x10
_IFLA_IFNAME, _IFLA_MASTER = 3, 10
_IFA_ADDRESS, _IFA_LOCAL = 1, 2
_IFF_UP = 0x1
# Multicast groups whose messages mean "something changed": links, IPv4 addresses, routes.
_RTMGRP_LINK, _RTMGRP_IPV4_IFADDR, _RTMGRP_IPV4_ROUTE = 0x1, 0x10, 0x40
CHANGE_GROUPS = _RTMGRP_LINK | _RTMGRP_IPV4_IFADDR | _RTMGRP_IPV4_ROUTE
_HDR = struct.Struct("=IHHII")  # nlmsghdr: len, type, flags, seq, pid
_IFINFO = struct.Struct("=BxHiII")  # ifinfomsg: family, type, index, flags, change
_IFADDR = struct.Struct("=BBBBI")  # ifaddrmsg: family, prefixlen, flags, scope, index
_RTA = struct.Struct("=HH")
_DUMP_ATTEMPTS = 5

_libc = ctypes.CDLL(None, use_errno=True)


class NetlinkFailure(RuntimeError):
    """A dump failed or a socket could not be opened in a namespace."""


@dataclass(frozen=True)
class Link:
    """The little an observer needs of a link."""

    index: int
    name: str
    up: bool
    master: int | None
    addresses: tuple[str, ...]


def _setns(fd: int) -> None:
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def _new_socket(groups: int) -> socket.socket:
    sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, _NETLINK_ROUTE)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    sock.bind((0, groups))
    return sock


def open_sockets(names: Sequence[str], *, groups: int = 0) -> dict[str, socket.socket]:
    """One netlink socket inside each pinned namespace `names` (by /run/netns name).

    One helper thread visits the namespaces in turn; it dies afterwards, so no thread of
    ours is ever left in a namespace that is not the one it started in.
    """
    result: dict[str, socket.socket] = {}
    failure: list[BaseException] = []

    def visit() -> None:
        try:
            for name in names:
                fd = os.open(f"{NETNS_DIR}/{name}", os.O_RDONLY | os.O_CLOEXEC)
                try:
                    _setns(fd)
                finally:
                    os.close(fd)
                result[name] = _new_socket(groups)
        except BaseException as exc:  # handed to the caller's thread below
            failure.append(exc)

    thread = threading.Thread(target=visit, name="bench-setns")
    thread.start()
    thread.join()
    if failure:
        for sock in result.values():
            sock.close()
        raise NetlinkFailure(f"opening a netlink socket in a namespace: {failure[0]}")
    return result


def host_socket(*, groups: int = 0) -> socket.socket:
    """A netlink socket in the caller's own network namespace."""
    return _new_socket(groups)


def _messages(sock: socket.socket, seq: int) -> Iterator[tuple[int, int, memoryview]]:
    """(type, flags, payload) of each message of one dump answer, until NLMSG_DONE."""
    while True:
        data = memoryview(sock.recv(1 << 16))
        offset = 0
        while offset + _HDR.size <= len(data):
            length, kind, flags, got_seq, _ = _HDR.unpack_from(data, offset)
            if length < _HDR.size:
                raise NetlinkFailure("malformed netlink message")
            payload = data[offset + _HDR.size : offset + length]
            offset += (length + 3) & ~3
            if got_seq != seq:
                continue
            if kind == _NLMSG_DONE:
                return
            if kind == _NLMSG_ERROR:
                code = -struct.unpack_from("=i", payload)[0]
                raise NetlinkFailure(f"netlink dump failed: {os.strerror(code)}")
            yield kind, flags, payload


def _attrs(payload: memoryview, offset: int) -> Iterator[tuple[int, memoryview]]:
    while offset + _RTA.size <= len(payload):
        length, kind = _RTA.unpack_from(payload, offset)
        if length < _RTA.size:
            return
        yield kind & 0x3FFF, payload[offset + _RTA.size : offset + length]
        offset += (length + 3) & ~3


def _dump(sock: socket.socket, request_type: int, body: bytes) -> list[tuple[int, memoryview]]:
    """All messages of one dump, retried while the kernel flags it inconsistent."""
    for attempt in range(_DUMP_ATTEMPTS):
        seq = attempt + 1
        header = _HDR.pack(
            _HDR.size + len(body), request_type, _NLM_F_REQUEST | _NLM_F_DUMP, seq, 0
        )
        sock.send(header + body)
        msgs = list(_messages(sock, seq))
        if not any(flags & _NLM_F_DUMP_INTR for _, flags, _ in msgs):
            return [(kind, payload) for kind, _, payload in msgs]
    raise NetlinkFailure(f"dump interrupted {_DUMP_ATTEMPTS} times in a row")


def links(sock: socket.socket) -> dict[str, Link]:
    """Links with their IPv4 addresses: one link dump and one address dump on `sock`."""
    addresses: dict[int, list[str]] = {}
    for kind, payload in _dump(sock, _RTM_GETADDR, _IFADDR.pack(socket.AF_INET, 0, 0, 0, 0)):
        if kind != _RTM_NEWADDR:
            continue
        _, prefixlen, _, _, index = _IFADDR.unpack_from(payload)
        local = None
        for attr, value in _attrs(payload, _IFADDR.size):
            if attr == _IFA_LOCAL or (attr == _IFA_ADDRESS and local is None):
                local = socket.inet_ntop(socket.AF_INET, bytes(value))
        if local is not None:
            addresses.setdefault(index, []).append(f"{local}/{prefixlen}")
    result: dict[str, Link] = {}
    for kind, payload in _dump(sock, _RTM_GETLINK, _IFINFO.pack(socket.AF_UNSPEC, 0, 0, 0, 0)):
        if kind != _RTM_NEWLINK:
            continue
        _, _, index, flags, _ = _IFINFO.unpack_from(payload)
        name, master = "", None
        for attr, value in _attrs(payload, _IFINFO.size):
            if attr == _IFLA_IFNAME:
                name = bytes(value).rstrip(b"\0").decode()
            elif attr == _IFLA_MASTER:
                master = struct.unpack_from("=I", value)[0]
        result[name] = Link(
            index=index,
            name=name,
            up=bool(flags & _IFF_UP),
            master=master,
            addresses=tuple(addresses.get(index, ())),
        )
    return result


def pending_notifications(sock: socket.socket) -> Counter[int]:
    """Change notifications queued on a socket bound to CHANGE_GROUPS, by message type.

    Type 0 counts an overrun (ENOBUFS): notifications were lost, so certainly not none.
    """
    found: Counter[int] = Counter()
    while True:
        try:
            data = sock.recv(1 << 16, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return found
        except OSError as exc:
            if exc.errno == errno.ENOBUFS:
                found[0] += 1
                continue
            raise
        offset = 0
        while offset + _HDR.size <= len(data):
            length, kind = _HDR.unpack_from(data, offset)[:2]
            if length < _HDR.size:
                break
            found[kind] += 1
            offset += (length + 3) & ~3


class Monitor:
    """Counts link/address/route change notifications on the host and in namespaces.

    Open it before a command that should change nothing, call `changes()` after: any
    notification means something was written to the kernel's network state.
    """

    def __init__(self, names: Sequence[str]) -> None:
        self._host = host_socket(groups=CHANGE_GROUPS)
        try:
            self._inside = open_sockets(names, groups=CHANGE_GROUPS)
        except BaseException:
            self._host.close()
            raise

    def changes(self) -> Counter[int]:
        """Notifications by message type (16 link, 20 address, 24 route, ...) since the
        monitor opened or the last call."""
        total = pending_notifications(self._host)
        for sock in self._inside.values():
            total += pending_notifications(sock)
        return total

    def wait_quiet(self, *, quiet: float, until: float, timeout: float) -> Counter[int]:
        """Drain until `until` (a perf_counter time) has passed and nothing arrived for
        `quiet` seconds; returns what was drained. Gives up after `timeout`.

        The kernel keeps talking after the writes that caused it: linkwatch delays
        operstate events by up to 1 s, and a bridge announces each port again (an
        AF_BRIDGE RTM_NEWLINK) one forward delay (15 s) after the port came up, STP off
        or not. Neither is a write of the command measured next."""
        drained: Counter[int] = Counter()
        deadline = time.perf_counter() + timeout
        last = time.perf_counter()
        while time.perf_counter() < deadline and (
            time.perf_counter() < until or time.perf_counter() - last < quiet
        ):
            got = self.changes()
            if got:
                drained += got
                last = time.perf_counter()
            time.sleep(0.01)
        return drained

    def close(self) -> None:
        """Close every socket."""
        self._host.close()
        for sock in self._inside.values():
            sock.close()

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
