"""The network driver: bridges, veth pairs, IPv4 addresses and routes, via rtnetlink.

Every `ensure_*` reads the kernel first and writes only what differs, so a converged host
costs a few dumps and no writes, and the returned list of changes is exactly what was
repaired (the engine turns it into `DriftRepaired` events). Names are deterministic
(`naming`), so EEXIST after a crash means "inspect and adopt", and ENODEV/ENOENT on a
delete means "already gone".

Ownership. A link is ours when its ifalias is our tag (`types.owner_tag`). The kernel
ignores IFLA_IFALIAS in RTM_NEWLINK, so the tag takes a second call; the MAC we set at
creation (`naming.link_mac(tag)`, atomic with the link) covers a crash in between: a link
with our name, *no* alias and our MAC is adopted. Anything else carrying the name is
foreign: OwnershipError, and we neither change nor delete it.

Sockets and threads (measured with pyroute2 0.9.7, the trap this design avoids).
`IPRoute(netns=X)` forks a helper per handle (~7 ms) and creates X if missing. The plain
sync `IPRoute` runs an asyncio loop underneath and keeps its socket, loop and transport
in `threading.local`: a handle used from any thread but its creator silently opens a
*new* socket in that thread's current namespace, so a handle "for netns X" built in a
setns'ed thread lists the host's links when called from elsewhere. Therefore:

- each netlink socket is opened by a short-lived thread inside the target namespace
  (`netns.open_socket` / `netns.create_pin`; the socket stays bound to that namespace
  forever) and handed to pyroute2 as `IPRoute(fileno=...)`;
- every pyroute2 handle is created, used and closed on one private worker thread
  (a single-thread executor), whatever thread calls the driver; public methods hop onto
  it. The handles share that thread's asyncio loop, so each costs one fd.

One socket per pinned namespace is cached for the driver's lifetime. A cached socket
keeps its namespace alive, so it is dropped when the pin disappears or its inode changes
(the namespace was recreated), and before `remove_netns` unpins.

Dumps retry when the kernel flags them inconsistent (NLM_F_DUMP_INTR on a message;
pyroute2 0.9.7 does not raise `NetlinkDumpInterrupted` itself, and drops the DONE
message, so a change racing the very end of a dump can still slip through: the next
level-triggered pass sees it).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import ipaddress
import os
import socket
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal, ParamSpec, TypeVar

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkDumpInterrupted, NetlinkError

from reconciler.errors import KernelError, OwnershipError, ReconcilerError
from reconciler.kernel import naming, netns
from reconciler.kernel.types import LinkState, NetnsState, NetworkObservation, parse_owner_tag

P = ParamSpec("P")
T = TypeVar("T")

_Msg = Any  # pyroute2 messages are untyped nlmsg objects
_NLM_F_DUMP_INTR = 0x10
_IFF_UP = 0x1
_RT_TABLE_MAIN = 254
_RTN_UNICAST = 1
_DUMP_ATTEMPTS = 5
_CREATE_ATTEMPTS = 3  # inspect/create rounds before giving up on a link that keeps changing
_GONE = (errno.ENODEV, errno.ENOENT)
PEER_NAME = "eth0"  # the env end of the veth, inside the env's netns


@dataclass(frozen=True)
class _NetnsHandle:
    """A cached rtnetlink handle bound to one pinned namespace."""

    identity: netns.PinIdentity
    ipr: Any  # pyroute2 IPRoute, only ever touched on the worker thread


@contextmanager
def _kernel_errors(what: str) -> Iterator[None]:
    """Turn netlink/OS errors into one-line KernelErrors that say what was attempted."""
    try:
        yield
    except (NetlinkError, OSError) as exc:
        code = exc.code if isinstance(exc, NetlinkError) else exc.errno
        reason = os.strerror(code) if isinstance(code, int) and code > 0 else str(exc)
        raise KernelError(f"{what} failed: {reason}") from exc


def _errno_of(exc: BaseException) -> int | None:
    if isinstance(exc, NetlinkError):
        return int(exc.code)
    if isinstance(exc, OSError):
        return exc.errno
    return None


# --------------------------------------------------------------------------- parsing


def _ipv4_by_index(addr_msgs: Sequence[_Msg]) -> dict[int, list[str]]:
    by_index: dict[int, list[str]] = {}
    for msg in addr_msgs:
        if msg["family"] != socket.AF_INET:
            continue
        # IFA_LOCAL is the interface's own address; IFA_ADDRESS is the peer on p2p links.
        local = msg.get("IFA_LOCAL") or msg.get("IFA_ADDRESS")
        if local:
            by_index.setdefault(msg["index"], []).append(f"{local}/{msg['prefixlen']}")
    return by_index


def _link_states(link_msgs: Sequence[_Msg], addr_msgs: Sequence[_Msg]) -> dict[str, LinkState]:
    names = {msg["index"]: msg.get("IFLA_IFNAME") for msg in link_msgs}
    addresses = _ipv4_by_index(addr_msgs)
    states: dict[str, LinkState] = {}
    for msg in link_msgs:
        name = msg.get("IFLA_IFNAME")
        master = msg.get("IFLA_MASTER")
        states[name] = LinkState(
            name=name,
            index=msg["index"],
            kind=msg.get(("linkinfo", "kind")),
            up=bool(msg["flags"] & _IFF_UP),
            master=names.get(master) if master else None,
            alias=msg.get("IFLA_IFALIAS") or None,
            addresses=tuple(sorted(addresses.get(msg["index"], ()))),
        )
    return states


def _default_routes(route_msgs: Sequence[_Msg]) -> list[_Msg]:
    """Unicast default routes of the main table, lowest metric first."""
    defaults = [
        msg
        for msg in route_msgs
        if msg["family"] == socket.AF_INET
        and msg["dst_len"] == 0
        and msg["type"] == _RTN_UNICAST
        and (msg.get("RTA_TABLE") or msg["table"]) == _RT_TABLE_MAIN
    ]
    return sorted(defaults, key=lambda m: m.get("RTA_PRIORITY") or 0)


def _instance_of(alias: str) -> str:
    parsed = parse_owner_tag(alias)
    return parsed[0] if parsed else "?"


def _ownership(link: _Msg, *, alias: str) -> Literal["ours", "untagged", "foreign"]:
    """Ours (tag matches), untagged (our MAC, tag lost to a crash) or foreign."""
    current = link.get("IFLA_IFALIAS") or None
    if current == alias:
        return "ours"
    if current is None and link.get("IFLA_ADDRESS") == naming.link_mac(alias):
        return "untagged"
    return "foreign"


# --------------------------------------------------------------------------- driver


class NetlinkDriver:
    """`types.NetworkDriver` on rtnetlink, with one long-lived socket per namespace."""

    def __init__(self) -> None:
        # "The host" for this driver is the constructing thread's network namespace,
        # whatever thread runs the worker: keep a handle on it to (re)open host sockets.
        self._home_fd: int | None = netns.current_netns_fd()
        self._host: Any = None  # IPRoute in the home namespace, created on the worker
        self._loop: asyncio.AbstractEventLoop | None = None  # worker's, shared by handles
        self._netns: dict[str, _NetnsHandle] = {}
        self._opens: Counter[str] = Counter()
        self._worker_ident: int | None = None
        self._closed = False
        self._executor = ThreadPoolExecutor(
            max_workers=1,
            thread_name_prefix="reconciler-netlink",
            initializer=self._mark_worker,
        )

    # ---- threading

    def _mark_worker(self) -> None:
        self._worker_ident = threading.get_ident()

    def _call(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run `fn` on the worker thread (directly if already there) and return its result."""
        if threading.get_ident() == self._worker_ident:
            return fn(*args, **kwargs)
        if self._closed:
            raise KernelError("the network driver is closed; create a new one")
        return self._executor.submit(self._guarded, functools.partial(fn, *args, **kwargs)).result()

    def _guarded(self, fn: Callable[[], T]) -> T:
        """Run `fn`; after a failure below netlink (socket, asyncio), reopen every socket.

        A kernel answer (NetlinkError) or a refusal of ours leaves the sockets healthy.
        Anything else may have broken a handle for good, and a long-running controller
        must not keep failing on it: drop them all, the next call reopens what it needs.
        """
        try:
            return fn()
        except ReconcilerError as exc:
            cause = exc.__cause__
            if cause is not None and not isinstance(cause, NetlinkError):
                self._reset()
            raise
        except Exception:
            self._reset()
            raise

    # ---- handles (worker thread only)

    def _host_ipr(self) -> Any:
        if self._host is None:
            if self._home_fd is None:
                raise KernelError("the network driver is closed; create a new one")
            with _kernel_errors("opening a netlink socket in the host network namespace"):
                fd = netns.socket_in(self._home_fd)
            self._host = self._wrap(fd)
        return self._host

    def _reset(self) -> None:
        for name in list(self._netns):
            self._drop(name)
        if self._host is not None:
            host, self._host = self._host, None
            with contextlib.suppress(Exception):
                host.close()

    def _wrap(self, fd: int) -> Any:
        """An IPRoute on socket `fd` (consumed), running on the worker's shared event loop.

        Sharing the loop matters: a handle with its own loop costs 4 fds (socket, epoll,
        self-pipe pair) instead of 1, and we keep one handle per env namespace.
        groups=0: we never want broadcasts queued on these sockets.
        """
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
        try:
            return IPRoute(fileno=fd, groups=0, use_event_loop=self._loop)
        except BaseException:
            os.close(fd)
            raise

    def _drop(self, name: str) -> None:
        handle = self._netns.pop(name, None)
        if handle is not None:
            # pyroute2's close() may trip over a handle that is already broken; the fd is
            # closed either way.
            with contextlib.suppress(Exception):
                handle.ipr.close()

    def _handle(self, name: str) -> _NetnsHandle | None:
        """The cached handle for the namespace pinned as `name`; opened if needed."""
        identity = netns.pin_identity(name)
        cached = self._netns.get(name)
        if cached is not None:
            if cached.identity == identity:
                return cached
            self._drop(name)  # unpinned or recreated: the old socket would keep it alive
        if identity is None:
            return None
        with _kernel_errors(f"opening a netlink socket in network namespace {name}"):
            opened = netns.open_socket(name)
        if opened is None:
            return None
        return self._remember(name, opened)

    def _remember(self, name: str, opened: netns.NetnsSocket) -> _NetnsHandle:
        handle = _NetnsHandle(identity=opened.identity, ipr=self._wrap(opened.fd))
        self._netns[name] = handle
        self._opens[name] += 1
        return handle

    def _sweep(self) -> None:
        """Drop cached sockets whose pin vanished or now names another namespace."""
        for name, handle in list(self._netns.items()):
            if netns.pin_identity(name) != handle.identity:
                self._drop(name)

    def _require(self, name: str) -> _NetnsHandle:
        handle = self._handle(name)
        if handle is None:
            raise KernelError(
                f"network namespace {name} is not pinned at {netns.pin_path(name)}; "
                "create it first (ensure_netns)"
            )
        return handle

    @contextmanager
    def _pin_fd(self, name: str, handle: _NetnsHandle) -> Iterator[int]:
        """An fd on the pin, verified to still be the namespace `handle` talks to."""
        with _kernel_errors(f"opening {netns.pin_path(name)}"):
            fd = os.open(netns.pin_path(name), os.O_RDONLY | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
            if netns.PinIdentity(inode=st.st_ino, dev=st.st_dev) != handle.identity:
                self._drop(name)
                raise KernelError(
                    f"network namespace {name} was recreated while being reconciled; retry"
                )
            yield fd
        finally:
            os.close(fd)

    # ---- reads (worker thread only)

    @staticmethod
    def _dump(what: str, call: Callable[[], Any]) -> tuple[_Msg, ...]:
        for _ in range(_DUMP_ATTEMPTS):
            try:
                with _kernel_errors(what):
                    msgs = tuple(call())
            except KernelError as exc:
                if isinstance(exc.__cause__, NetlinkDumpInterrupted):
                    continue
                raise
            if not any(m["header"]["flags"] & _NLM_F_DUMP_INTR for m in msgs):
                return msgs
        raise KernelError(f"{what} failed: interrupted {_DUMP_ATTEMPTS} times in a row; retry")

    def _links(self, ipr: Any, where: str) -> dict[str, LinkState]:
        links = self._dump(f"dumping links in {where}", lambda: ipr.link("dump"))
        addrs = self._dump(
            f"dumping addresses in {where}", lambda: ipr.addr("dump", family=socket.AF_INET)
        )
        return _link_states(links, addrs)

    def _routes(self, ipr: Any, where: str) -> tuple[_Msg, ...]:
        return self._dump(
            f"dumping routes in {where}", lambda: ipr.route("dump", family=socket.AF_INET)
        )

    @staticmethod
    def _get(ipr: Any, name: str) -> _Msg | None:
        try:
            return ipr.link("get", ifname=name)[0]
        except NetlinkError as exc:
            if exc.code in _GONE:
                return None
            raise KernelError(f"reading link {name} failed: {os.strerror(exc.code)}") from exc

    def _state(self, name: str, handle: _NetnsHandle) -> NetnsState:
        where = f"network namespace {name}"
        defaults = _default_routes(self._routes(handle.ipr, where))
        return NetnsState(
            name=name,
            inode=handle.identity.inode,
            dev=handle.identity.dev,
            links=self._links(handle.ipr, where),
            default_gateway=defaults[0].get("RTA_GATEWAY") if defaults else None,
        )

    # ---- small writes (worker thread only), each returning the change it made

    @staticmethod
    def _set_up(ipr: Any, link: _Msg, label: str) -> list[str]:
        if link["flags"] & _IFF_UP:
            return []
        with _kernel_errors(f"setting {label} up"):
            ipr.link("set", index=link["index"], state="up")
        return [f"{label}: set up"]

    @staticmethod
    def _set_alias(ipr: Any, link: _Msg, alias: str, label: str) -> list[str]:
        if (link.get("IFLA_IFALIAS") or None) == alias:
            return []
        with _kernel_errors(f"tagging {label}"):
            ipr.link("set", index=link["index"], ifalias=alias)
        return [f"{label}: tagged {alias}"]

    def _exact_address(self, ipr: Any, *, index: int, cidr: str, label: str) -> list[str]:
        """Make `cidr` the only IPv4 address on link `index`."""
        want = str(ipaddress.ip_interface(cidr))
        changes: list[str] = []

        def current() -> list[str]:
            msgs = self._dump(
                f"dumping addresses of {label}",
                lambda: ipr.addr("dump", family=socket.AF_INET, index=index),
            )
            return _ipv4_by_index([m for m in msgs if m["index"] == index]).get(index, [])

        # Remove first: deleting a primary address also deletes its secondaries, so the
        # wanted one must be (re-)added after, not before, the others go.
        present = current()
        extras = [a for a in present if a != want]
        for extra in extras:
            address, prefixlen = extra.split("/")
            try:
                ipr.addr("del", index=index, address=address, prefixlen=int(prefixlen))
            except NetlinkError as exc:
                if exc.code != errno.EADDRNOTAVAIL:  # already gone with its primary
                    raise KernelError(
                        f"removing {extra} from {label} failed: {os.strerror(exc.code)}"
                    ) from exc
            changes.append(f"{label}: removed address {extra}")
        if extras:
            present = current()
        if want not in present:
            address, prefixlen = want.split("/")
            with _kernel_errors(f"adding {want} to {label}"):
                ipr.addr("add", index=index, address=address, prefixlen=int(prefixlen))
            changes.append(f"{label}: added address {want}")
        return changes

    def _default_route(self, ipr: Any, *, oif: int, gateway: str, label: str) -> list[str]:
        """Make the main table's default route go via `gateway` on link `oif`, only."""
        gateway = str(ipaddress.IPv4Address(gateway))
        changes: list[str] = []
        defaults = _default_routes(self._routes(ipr, label))
        keep = [r for r in defaults if r.get("RTA_GATEWAY") == gateway and r.get("RTA_OIF") == oif]
        for route in defaults:
            if any(route is good for good in keep):
                continue
            try:
                ipr.route(
                    "del",
                    dst="0.0.0.0/0",
                    table=_RT_TABLE_MAIN,
                    gateway=route.get("RTA_GATEWAY"),
                    oif=route.get("RTA_OIF"),
                    priority=route.get("RTA_PRIORITY") or 0,
                )
            except NetlinkError as exc:
                if exc.code != errno.ESRCH:
                    raise KernelError(
                        f"removing a default route in {label} failed: {os.strerror(exc.code)}"
                    ) from exc
            changes.append(f"{label}: removed default route via {route.get('RTA_GATEWAY')}")
        if not keep:
            with _kernel_errors(f"adding the default route via {gateway} in {label}"):
                ipr.route("add", dst="0.0.0.0/0", gateway=gateway, oif=oif)
            changes.append(f"{label}: default route via {gateway}")
        return changes

    def _delete(self, ipr: Any, index: int, label: str) -> bool:
        try:
            ipr.link("del", index=index)
        except NetlinkError as exc:
            if exc.code in _GONE:
                return False
            raise KernelError(f"deleting {label} failed: {os.strerror(exc.code)}") from exc
        return True

    # ---- operations (worker thread only)

    def _observe(self, names: Sequence[str]) -> NetworkObservation:
        host_links = self._links(self._host_ipr(), "the host network namespace")
        self._sweep()
        found: dict[str, NetnsState] = {}
        for name in dict.fromkeys(names):
            handle = self._handle(name)
            if handle is not None:
                found[name] = self._state(name, handle)
        return NetworkObservation(host_links=host_links, netns=found)

    def _ensure_bridge(self, *, name: str, gateway_cidr: str, alias: str) -> list[str]:
        host = self._host_ipr()
        label = f"bridge {name}"
        changes: list[str] = []
        # Inspect, (re)create, inspect again: every pass re-checks ownership, so a link
        # that appears under our feet (EEXIST) is judged like any other.
        for _ in range(_CREATE_ATTEMPTS):
            link = self._get(host, name)
            if link is not None:
                if _ownership(link, alias=alias) == "foreign":
                    raise OwnershipError(
                        f"bridge {name} exists and is not owned by instance "
                        f"{_instance_of(alias)} (ifalias {link.get('IFLA_IFALIAS')!r}, "
                        f"expected {alias!r}); pick another spec.bridge"
                    )
                kind = link.get(("linkinfo", "kind"))
                if kind == "bridge":
                    break
                # Ours by tag or MAC but not a bridge: only we could have made it; replace.
                self._delete(host, link["index"], f"link {name}")
                changes.append(f"{label}: deleted our {kind or 'plain'} link of that name")
            try:
                host.link("add", ifname=name, kind="bridge", address=naming.link_mac(alias))
                changes.append(f"{label}: created")
            except NetlinkError as exc:
                if exc.code != errno.EEXIST:
                    raise KernelError(f"creating {label} failed: {os.strerror(exc.code)}") from exc
        else:
            raise KernelError(f"creating {label} failed: it keeps changing under us; retry")
        changes += self._set_alias(host, link, alias, label)
        changes += self._set_up(host, link, label)
        changes += self._exact_address(host, index=link["index"], cidr=gateway_cidr, label=label)
        return changes

    def _remove_link(self, *, name: str, alias: str, what: str) -> bool:
        host = self._host_ipr()
        link = self._get(host, name)
        if link is None:
            return False
        if _ownership(link, alias=alias) == "foreign":
            raise OwnershipError(
                f"refusing to delete {what} {name}: it is not owned by instance "
                f"{_instance_of(alias)} (ifalias {link.get('IFLA_IFALIAS')!r}, "
                f"expected {alias!r})"
            )
        return self._delete(host, link["index"], f"{what} {name}")

    def _ensure_netns(self, name: str, alias: str | None = None) -> NetnsState:
        handle = self._handle(name)
        if handle is None:
            try:
                with _kernel_errors(f"creating network namespace {name}"):
                    handle = self._remember(name, netns.create_pin(name))
            except KernelError as exc:
                if _errno_of(exc.__cause__ or exc) != errno.EEXIST:
                    raise
                handle = self._require(name)  # pinned concurrently: adopt it
        lo = self._get(handle.ipr, "lo")
        if lo is not None:
            self._set_up(handle.ipr, lo, f"lo in network namespace {name}")
            if alias is not None:
                # The namespace carries its own ownership tag (on its lo): it dies with it,
                # and proves a pin re-created by a crashed run of ours is ours.
                self._set_alias(handle.ipr, lo, alias, f"lo in network namespace {name}")
        return self._state(name, handle)

    def _tagged(self, name: str, alias: str) -> bool:
        handle = self._handle(name)
        lo = self._get(handle.ipr, "lo") if handle is not None else None
        return lo is not None and (lo.get("IFLA_IFALIAS") or None) == alias

    def _remove_netns(self, name: str, inode: int | None, alias: str | None) -> bool:
        if inode is not None:
            pin = netns.pin_identity(name)
            if (
                pin is not None
                and pin.inode != inode
                and not (alias is not None and self._tagged(name, alias))
            ):
                raise OwnershipError(
                    f"netns {name} is not the namespace this instance recorded (inode "
                    f"{pin.inode}, recorded {inode}); left in place: remove it by hand if stale"
                )
        # Close our socket first: it alone would keep the namespace (and its veth) alive.
        self._drop(name)
        with _kernel_errors(f"removing network namespace {name}"):
            return netns.remove_pin(name)

    def _peer_in(self, link: _Msg, name: str, handle: _NetnsHandle) -> bool:
        """True if `link`'s veth peer is `eth0` inside the namespace of `handle`."""
        peer_nsid = link.get("IFLA_LINK_NETNSID")
        peer_index = link.get("IFLA_LINK")
        if peer_nsid is None or peer_index is None:
            return False
        nsid = self._nsid(name, handle)
        if nsid is None or nsid != peer_nsid:
            return False
        peer = self._get(handle.ipr, PEER_NAME)
        return peer is not None and peer["index"] == peer_index

    def _ensure_env_link(
        self,
        *,
        netns_name: str,
        host_name: str,
        alias: str,
        bridge: str,
        address_cidr: str,
        gateway: str,
    ) -> list[str]:
        host = self._host_ipr()
        handle = self._require(netns_name)
        label = f"veth {host_name}"
        inside = f"{PEER_NAME} in network namespace {netns_name}"
        bridge_link = self._get(host, bridge)
        if bridge_link is None:
            raise KernelError(
                f"bridge {bridge} does not exist; cannot attach {label} (ensure the network first)"
            )
        changes: list[str] = []
        # Inspect, (re)create, inspect again, as for bridges: ownership is re-checked on
        # every pass, and a fresh pair must pass the same peer check as an old one.
        for _ in range(_CREATE_ATTEMPTS):
            link = self._get(host, host_name)
            if link is not None:
                if _ownership(link, alias=alias) == "foreign":
                    raise OwnershipError(
                        f"link {host_name} exists and is not owned by instance "
                        f"{_instance_of(alias)} (ifalias {link.get('IFLA_IFALIAS')!r}, "
                        f"expected {alias!r}); delete it by hand if it is stale"
                    )
                if link.get(("linkinfo", "kind")) == "veth" and self._peer_in(
                    link, netns_name, handle
                ):
                    break
                # Ours, but its peer is not our eth0: typically the namespace was
                # recreated. Replace the pair.
                self._delete(host, link["index"], label)
                changes.append(f"{label}: deleted (its peer was not {inside})")
            changes += self._create_veth(
                handle,
                netns_name=netns_name,
                host_name=host_name,
                alias=alias,
                bridge_index=bridge_link["index"],
                label=label,
                inside=inside,
            )
        else:
            raise KernelError(f"creating {label} failed: it keeps changing under us; retry")
        changes += self._set_alias(host, link, alias, label)
        if link.get("IFLA_MASTER") != bridge_link["index"]:
            with _kernel_errors(f"enslaving {label} to bridge {bridge}"):
                host.link("set", index=link["index"], master=bridge_link["index"])
            changes.append(f"{label}: enslaved to bridge {bridge}")
        changes += self._set_up(host, link, label)

        ipr = handle.ipr
        peer = self._get(ipr, PEER_NAME)
        if peer is None:
            raise KernelError(f"{inside} vanished while being configured; retry")
        changes += self._set_up(ipr, peer, inside)
        changes += self._exact_address(ipr, index=peer["index"], cidr=address_cidr, label=inside)
        lo = self._get(ipr, "lo")
        if lo is not None:
            changes += self._set_up(ipr, lo, f"lo in network namespace {netns_name}")
        changes += self._default_route(
            ipr, oif=peer["index"], gateway=gateway, label=f"network namespace {netns_name}"
        )
        return changes

    def _create_veth(
        self,
        handle: _NetnsHandle,
        *,
        netns_name: str,
        host_name: str,
        alias: str,
        bridge_index: int,
        label: str,
        inside: str,
    ) -> list[str]:
        """One RTM_NEWLINK: host end enslaved to the bridge, peer born as eth0 in the netns."""
        changes = self._clear_stray_peer(handle, netns_name=netns_name, alias=alias)
        with self._pin_fd(netns_name, handle) as pin_fd:
            try:
                self._host_ipr().link(
                    "add",
                    ifname=host_name,
                    kind="veth",
                    address=naming.link_mac(alias),
                    master=bridge_index,
                    peer={"ifname": PEER_NAME, "net_ns_fd": pin_fd},
                )
                changes.append(f"{label}: created (peer {inside})")
            except NetlinkError as exc:
                if exc.code != errno.EEXIST:  # EEXIST: created concurrently; inspected next
                    raise KernelError(f"creating {label} failed: {os.strerror(exc.code)}") from exc
        return changes

    def _nsid(self, name: str, handle: _NetnsHandle) -> int | None:
        """The id the host gave namespace `name` (None: none assigned, so no peer there)."""
        with self._pin_fd(name, handle) as pin_fd, _kernel_errors(f"reading nsid of {name}"):
            nsid = (self._host_ipr().get_netnsid(fd=pin_fd) or {}).get("nsid")
        # NETNSA_NSID_NOT_ASSIGNED is -1, which may come back as a u32.
        return nsid if isinstance(nsid, int) and 0 <= nsid < 0x7FFFFFFF else None

    def _clear_stray_peer(self, handle: _NetnsHandle, *, netns_name: str, alias: str) -> list[str]:
        """Remove an `eth0` that is in our namespace while our host end is absent.

        It would make the veth creation fail with EEXIST. Whatever lives only inside our
        namespace is ours to delete; a veth whose other end is outside is deleted only if
        that end carries our tag (our host end, renamed), else it is someone else's.
        """
        stray = self._get(handle.ipr, PEER_NAME)
        if stray is None:
            return []
        where = f"network namespace {netns_name}"
        outside = stray.get(("linkinfo", "kind")) == "veth" and (
            stray.get("IFLA_LINK_NETNSID") is not None
        )
        if not outside:
            self._delete(handle.ipr, stray["index"], f"stray {PEER_NAME} in {where}")
            return [f"{where}: deleted a stray {PEER_NAME}"]
        nsid = self._nsid(netns_name, handle)
        host_end = None
        if nsid is not None:
            links = self._dump("dumping host links", lambda: self._host_ipr().link("dump"))
            host_end = next(
                (
                    link
                    for link in links
                    if link.get("IFLA_LINK_NETNSID") == nsid
                    and link.get("IFLA_LINK") == stray["index"]
                ),
                None,
            )
        if host_end is None or _ownership(host_end, alias=alias) == "foreign":
            other = (
                f"host link {host_end.get('IFLA_IFNAME')} "
                f"(ifalias {host_end.get('IFLA_IFALIAS')!r})"
                if host_end is not None
                else "a link in another namespace"
            )
            raise OwnershipError(
                f"{PEER_NAME} in {where} is the peer of {other}, which is not owned by "
                f"instance {_instance_of(alias)}; delete it by hand"
            )
        self._delete(self._host_ipr(), host_end["index"], f"veth {host_end.get('IFLA_IFNAME')}")
        return [f"{where}: deleted our renamed veth {host_end.get('IFLA_IFNAME')}"]

    def _close(self) -> None:
        self._reset()
        if self._home_fd is not None:
            os.close(self._home_fd)
            self._home_fd = None
        if self._loop is not None:
            self._loop.close()
            self._loop = None

    # ---- public API (any thread)

    def observe(self, *, netns_names: Sequence[str]) -> NetworkObservation:
        """Dump host links/addresses once, and links/addresses/routes in each named netns."""
        return self._call(self._observe, list(netns_names))

    def ensure_bridge(self, *, name: str, gateway_cidr: str, alias: str) -> list[str]:
        """Create or repair a bridge: up, tagged `alias`, with exactly `gateway_cidr`."""
        return self._call(self._ensure_bridge, name=name, gateway_cidr=gateway_cidr, alias=alias)

    def remove_bridge(self, *, name: str, alias: str) -> bool:
        """Delete the bridge if it exists and is ours; True if something was removed."""
        return self._call(self._remove_link, name=name, alias=alias, what="bridge")

    def ensure_netns(self, *, name: str, alias: str | None = None) -> NetnsState:
        """Create (or adopt) the namespace pinned at /run/netns/<name>, with `lo` up
        (and tagged with `alias`, the namespace's own ownership proof)."""
        return self._call(self._ensure_netns, name, alias)

    def remove_netns(
        self, *, name: str, inode: int | None = None, alias: str | None = None
    ) -> bool:
        """Close our socket in it, then unpin /run/netns/<name>; True if it existed.

        With `inode`, the pin is removed only if it still is that namespace (ownership
        proof from the inventory) or its `lo` carries `alias` (the namespace's own tag,
        set by `ensure_netns`); otherwise OwnershipError.
        """
        return self._call(self._remove_netns, name, inode, alias)

    def ensure_env_link(
        self,
        *,
        netns: str,
        host_name: str,
        alias: str,
        bridge: str,
        address_cidr: str,
        gateway: str,
    ) -> list[str]:
        """Create or repair the env's veth pair, its address and default route."""
        return self._call(
            self._ensure_env_link,
            netns_name=netns,
            host_name=host_name,
            alias=alias,
            bridge=bridge,
            address_cidr=address_cidr,
            gateway=gateway,
        )

    def remove_env_link(self, *, host_name: str, alias: str) -> bool:
        """Delete the host veth (its peer goes with it) if it is ours."""
        return self._call(self._remove_link, name=host_name, alias=alias, what="veth")

    @property
    def socket_opens(self) -> Mapping[str, int]:
        """How many times a socket was opened per namespace name, over the driver's life."""
        return self._call(lambda: dict(self._opens))

    @property
    def cached_netns(self) -> tuple[str, ...]:
        """Names of the namespaces with a cached socket right now."""
        return self._call(lambda: tuple(sorted(self._netns)))

    def close(self) -> None:
        """Close every socket and stop the worker thread; idempotent."""
        if self._closed:
            return
        try:
            self._call(self._close)
        finally:
            self._closed = True
            self._executor.shutdown(wait=True)

    def __enter__(self) -> NetlinkDriver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
