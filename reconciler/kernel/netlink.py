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

Two ways to converge an environment's link (`ensure_env_links`):

- the *fresh* path, for a namespace this driver created in this run (nothing inside but
  `lo`) whose host veth does not exist: every veth of the batch is created in one
  datagram on the host socket (peer born as `eth0` inside its namespace, host end
  enslaved and up), one link dump finds the new indexes, one datagram tags and isolates
  every host end, and one datagram per namespace sets `eth0` up, adds its address and
  the default route. A creation that fails for any reason (EEXIST: something appeared
  meanwhile) drops that env to the careful path;
- the *careful* path, for everything else: inspect, repair what differs, re-check
  ownership at every step (a crash may have left anything behind).

Sockets (`rtnl`): one long-lived socket on the host and one per pinned namespace,
created inside it by a short-lived thread (`netns.open_sockets`, `netns.create_pins`).
A cached socket keeps its namespace alive, so it is dropped when the pin disappears or
names another namespace, and before `remove_netns` unpins. Raw sockets are not tied to
a thread; a lock serialises the driver. After a failure of a socket itself (not a kernel
refusal), every socket is dropped and reopened on demand.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import os
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal, ParamSpec, TypeVar

from reconciler.errors import KernelError, OwnershipError, ReconcilerError
from reconciler.kernel import naming, netns, rtnl
from reconciler.kernel.types import (
    EnvLinkSpec,
    LinkState,
    NetnsState,
    NetworkObservation,
    PinIdentity,
    parse_owner_tag,
)

P = ParamSpec("P")
T = TypeVar("T")

_CREATE_ATTEMPTS = 3  # inspect/create rounds before giving up on a link that keeps changing
_GONE = (errno.ENODEV, errno.ENOENT)
PEER_NAME = "eth0"  # the env end of the veth, inside the env's netns
_POLL_INTERVAL = 0.005


@dataclass(frozen=True)
class _Handle:
    """A cached rtnetlink socket bound to one pinned namespace."""

    identity: PinIdentity
    sock: rtnl.Socket


@contextmanager
def _kernel_errors(what: str) -> Iterator[None]:
    """Turn netlink/OS errors into one-line KernelErrors that say what was attempted."""
    try:
        yield
    except OSError as exc:
        code = exc.errno
        reason = os.strerror(code) if isinstance(code, int) and code > 0 else str(exc)
        raise KernelError(f"{what} failed: {reason}") from exc


def _check(code: int, what: str) -> None:
    """A kernel refusal as a KernelError (the socket is fine: `_call` keeps it)."""
    if code:
        raise KernelError(f"{what} failed: {os.strerror(code)}")


def _instance_of(alias: str) -> str:
    parsed = parse_owner_tag(alias)
    return parsed[0] if parsed else "?"


def _ownership(link: rtnl.Link, *, alias: str) -> Literal["ours", "untagged", "foreign"]:
    """Ours (tag matches), untagged (our MAC, tag lost to a crash) or foreign."""
    if link.alias == alias:
        return "ours"
    if link.alias is None and link.mac == naming.link_mac(alias):
        return "untagged"
    return "foreign"


def _link_states(links: Sequence[rtnl.Link], addrs: Sequence[rtnl.Address]) -> dict[str, LinkState]:
    names = {link.index: link.name for link in links}
    by_index: dict[int, list[str]] = {}
    for addr in addrs:
        by_index.setdefault(addr.index, []).append(addr.cidr)
    return {
        link.name: LinkState(
            name=link.name,
            index=link.index,
            kind=link.kind,
            up=link.up,
            master=names.get(link.master) if link.master else None,
            alias=link.alias,
            addresses=tuple(sorted(by_index.get(link.index, ()))),
        )
        for link in links
    }


def _main_defaults(routes: Sequence[rtnl.Route]) -> list[rtnl.Route]:
    """Unicast default routes of the main table, lowest metric first."""
    return sorted((r for r in routes if r.is_main_default), key=lambda r: r.priority)


def _split(cidr: str) -> tuple[str, int]:
    iface = ipaddress.IPv4Interface(cidr)
    return str(iface.ip), iface.network.prefixlen


# --------------------------------------------------------------------------- driver


class NetlinkDriver:
    """`types.NetworkDriver` on rtnetlink, with one long-lived socket per namespace."""

    def __init__(self) -> None:
        # "The host" for this driver is the constructing thread's network namespace,
        # whatever thread calls it later: keep a handle on it to (re)open host sockets.
        self._home_fd: int | None = netns.current_netns_fd()
        self._host: rtnl.Socket | None = None
        self._netns: dict[str, _Handle] = {}
        self._fresh: set[str] = set()  # created by us; nothing inside configured yet
        self._opens: Counter[str] = Counter()
        self._lock = threading.RLock()

    # ---- locking and recovery

    def _call(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run `fn` under the driver's lock; after a socket failure, reopen everything.

        A kernel answer (an errno for a request) or a refusal of ours leaves the sockets
        healthy. Anything else may have broken a socket for good, and a long-running
        controller must not keep failing on it: drop them all, the next call reopens.
        """
        with self._lock:
            if self._home_fd is None:
                raise KernelError("the network driver is closed; create a new one")
            try:
                return fn(*args, **kwargs)
            except ReconcilerError as exc:
                if isinstance(exc.__cause__, rtnl.SocketFailure):
                    self._reset()
                raise
            except Exception:
                self._reset()
                raise

    def _reset(self) -> None:
        for name in list(self._netns):
            self._drop(name)
        if self._host is not None:
            self._host.close()
            self._host = None

    # ---- sockets

    def _host_sock(self) -> rtnl.Socket:
        if self._host is None:
            assert self._home_fd is not None
            with _kernel_errors("opening a netlink socket in the host network namespace"):
                self._host = rtnl.Socket(netns.socket_in(self._home_fd))
        return self._host

    def _drop(self, name: str) -> None:
        self._fresh.discard(name)
        handle = self._netns.pop(name, None)
        if handle is not None:
            handle.sock.close()

    def _remember(self, name: str, opened: netns.NetnsSocket) -> _Handle:
        handle = _Handle(identity=opened.identity, sock=rtnl.Socket(opened.fd))
        self._netns[name] = handle
        self._opens[name] += 1
        return handle

    def _handles(self, names: Sequence[str]) -> dict[str, _Handle]:
        """Cached handles for the pinned namespaces among `names`; missing ones opened
        together (one thread visits them all)."""
        found: dict[str, _Handle] = {}
        missing: list[str] = []
        for name in dict.fromkeys(names):
            cached = self._netns.get(name)
            if cached is not None:
                if netns.pin_identity(name) == cached.identity:
                    found[name] = cached
                    continue
                self._drop(name)  # unpinned or recreated: the old socket would keep it alive
            missing.append(name)  # opening checks the pin (an unpinned name is skipped)
        if missing:
            opened = netns.open_sockets(missing)
            failed: tuple[str, OSError] | None = None
            for name in missing:
                result = opened.get(name)
                if isinstance(result, OSError):
                    failed = failed or (name, result)
                elif result is not None:
                    found[name] = self._remember(name, result)
            if failed is not None:
                name, error = failed
                raise KernelError(
                    f"opening a netlink socket in network namespace {name} failed: "
                    f"{error.strerror or error}"
                ) from error
        return found

    def _handle(self, name: str) -> _Handle | None:
        return self._handles([name]).get(name)

    def _require(self, name: str) -> _Handle:
        handle = self._handle(name)
        if handle is None:
            raise KernelError(
                f"network namespace {name} is not pinned at {netns.pin_path(name)}; "
                "create it first (ensure_netns)"
            )
        return handle

    def _sweep(self, *, checked: set[str]) -> None:
        """Drop cached sockets whose pin vanished or now names another namespace
        (`checked`: names about to be verified anyway)."""
        for name, handle in list(self._netns.items()):
            if name not in checked and netns.pin_identity(name) != handle.identity:
                self._drop(name)

    @contextmanager
    def _pin_fd(self, name: str, handle: _Handle) -> Iterator[int]:
        """An fd on the pin, verified to still be the namespace `handle` talks to."""
        with _kernel_errors(f"opening {netns.pin_path(name)}"):
            fd = os.open(netns.pin_path(name), os.O_RDONLY | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
            if PinIdentity(inode=st.st_ino, dev=st.st_dev) != handle.identity:
                self._drop(name)
                raise KernelError(
                    f"network namespace {name} was recreated while being reconciled; retry"
                )
            yield fd
        finally:
            os.close(fd)

    # ---- reads

    @staticmethod
    def _links(sock: rtnl.Socket, where: str) -> dict[str, LinkState]:
        with _kernel_errors(f"dumping links in {where}"):
            links = sock.links()
        with _kernel_errors(f"dumping addresses in {where}"):
            addrs = sock.addresses()
        return _link_states(links, addrs)

    @staticmethod
    def _get(sock: rtnl.Socket, name: str) -> rtnl.Link | None:
        with _kernel_errors(f"reading link {name}"):
            return sock.link(name)

    def _state(self, name: str, handle: _Handle) -> NetnsState:
        with _kernel_errors(f"dumping links, addresses and routes in network namespace {name}"):
            links, addrs, routes = handle.sock.snapshot()
        defaults = _main_defaults(routes)
        return NetnsState(
            name=name,
            inode=handle.identity.inode,
            dev=handle.identity.dev,
            links=_link_states(links, addrs),
            default_gateway=defaults[0].gateway if defaults else None,
        )

    # ---- small writes, each returning the change it made

    @staticmethod
    def _set_up(sock: rtnl.Socket, link: rtnl.Link, label: str) -> list[str]:
        if link.up:
            return []
        _check(sock.call(rtnl.set_link(index=link.index, up=True)), f"setting {label} up")
        return [f"{label}: set up"]

    @staticmethod
    def _set_alias(sock: rtnl.Socket, link: rtnl.Link, alias: str, label: str) -> list[str]:
        if link.alias == alias:
            return []
        _check(sock.call(rtnl.set_link(index=link.index, alias=alias)), f"tagging {label}")
        return [f"{label}: tagged {alias}"]

    @staticmethod
    def _exact_address(sock: rtnl.Socket, *, index: int, cidr: str, label: str) -> list[str]:
        """Make `cidr` the only IPv4 address on link `index`."""
        want = str(ipaddress.ip_interface(cidr))
        changes: list[str] = []

        def current() -> list[str]:
            with _kernel_errors(f"dumping addresses of {label}"):
                return [a.cidr for a in sock.addresses() if a.index == index]

        # Remove first: deleting a primary address also deletes its secondaries, so the
        # wanted one must be (re-)added after, not before, the others go.
        present = current()
        extras = [a for a in present if a != want]
        for extra in extras:
            address, prefixlen = _split(extra)
            code = sock.call(rtnl.del_address(index=index, address=address, prefixlen=prefixlen))
            if code not in (0, errno.EADDRNOTAVAIL):  # EADDRNOTAVAIL: gone with its primary
                _check(code, f"removing {extra} from {label}")
            changes.append(f"{label}: removed address {extra}")
        if extras:
            present = current()
        if want not in present:
            address, prefixlen = _split(want)
            _check(
                sock.call(rtnl.new_address(index=index, address=address, prefixlen=prefixlen)),
                f"adding {want} to {label}",
            )
            changes.append(f"{label}: added address {want}")
        return changes

    @staticmethod
    def _default_route(sock: rtnl.Socket, *, oif: int, gateway: str, label: str) -> list[str]:
        """Make the main table's default route go via `gateway` on link `oif`, only."""
        gateway = str(ipaddress.IPv4Address(gateway))
        changes: list[str] = []
        with _kernel_errors(f"dumping routes in {label}"):
            defaults = _main_defaults(sock.routes(table=rtnl.RT_TABLE_MAIN))
        keep = [r for r in defaults if r.gateway == gateway and r.oif == oif]
        for route in defaults:
            if route in keep:
                continue
            code = sock.call(rtnl.del_default_route(route))
            if code not in (0, errno.ESRCH):
                _check(code, f"removing a default route in {label}")
            changes.append(f"{label}: removed default route via {route.gateway}")
        if not keep:
            _check(
                sock.call(rtnl.new_default_route(gateway=gateway, oif=oif)),
                f"adding the default route via {gateway} in {label}",
            )
            changes.append(f"{label}: default route via {gateway}")
        return changes

    @staticmethod
    def _delete(sock: rtnl.Socket, index: int, label: str) -> bool:
        code = sock.call(rtnl.del_link(index=index))
        if code in _GONE:
            return False
        _check(code, f"deleting {label}")
        return True

    # ---- operations

    def _observe(self, names: Sequence[str]) -> NetworkObservation:
        host_links = self._links(self._host_sock(), "the host network namespace")
        self._sweep(checked=set(names))
        handles = self._handles(names)
        found = {name: self._state(name, handle) for name, handle in handles.items()}
        return NetworkObservation(host_links=host_links, netns=found)

    def _ensure_bridge(self, *, name: str, gateway_cidr: str, alias: str) -> list[str]:
        host = self._host_sock()
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
                        f"{_instance_of(alias)} (ifalias {link.alias!r}, "
                        f"expected {alias!r}); pick another spec.bridge"
                    )
                if link.kind == "bridge":
                    break
                # Ours by tag or MAC but not a bridge: only we could have made it; replace.
                self._delete(host, link.index, f"link {name}")
                changes.append(f"{label}: deleted our {link.kind or 'plain'} link of that name")
            code = host.call(rtnl.new_bridge(name=name, mac=naming.link_mac(alias)))
            if code == 0:
                changes.append(f"{label}: created")
            elif code != errno.EEXIST:
                _check(code, f"creating {label}")
        else:
            raise KernelError(f"creating {label} failed: it keeps changing under us; retry")
        changes += self._set_alias(host, link, alias, label)
        changes += self._set_up(host, link, label)
        changes += self._exact_address(host, index=link.index, cidr=gateway_cidr, label=label)
        return changes

    def _remove_link(self, *, name: str, alias: str, what: str) -> bool:
        host = self._host_sock()
        link = self._get(host, name)
        if link is None:
            return False
        if _ownership(link, alias=alias) == "foreign":
            raise OwnershipError(
                f"refusing to delete {what} {name}: it is not owned by instance "
                f"{_instance_of(alias)} (ifalias {link.alias!r}, expected {alias!r})"
            )
        return self._delete(host, link.index, f"{what} {name}")

    def _ensure_netns_many(
        self, items: Sequence[tuple[str, str | None]]
    ) -> dict[str, PinIdentity | KernelError]:
        """Create or adopt each namespace; `lo` up and tagged. One thread creates the
        missing ones; fresh namespaces are set up with one datagram each."""
        results: dict[str, PinIdentity | KernelError] = {}
        aliases = dict(items)
        handles = self._handles(list(aliases))
        missing = [name for name in aliases if name not in handles]
        if missing:
            with _kernel_errors("preparing /run/netns"):
                made = netns.create_pins(missing)
            for name, result in made.items():
                if isinstance(result, FileExistsError):
                    continue  # pinned concurrently: adopted below
                if isinstance(result, OSError):
                    results[name] = KernelError(
                        f"creating network namespace {name} failed: {result.strerror}"
                    )
                    continue
                handles[name] = self._remember(name, result)
                self._fresh.add(name)
            late = [n for n in missing if n not in handles and n not in results]
            handles.update(self._handles(late))
        for name, alias in aliases.items():
            if name in results:
                continue
            handle = handles.get(name)
            if handle is None:
                results[name] = KernelError(f"network namespace {name} vanished while created")
                continue
            try:
                self._setup_lo(name, handle, alias)
            except KernelError as exc:
                results[name] = exc
                continue
            results[name] = handle.identity
        return results

    def _setup_lo(self, name: str, handle: _Handle, alias: str | None) -> None:
        label = f"lo in network namespace {name}"
        if name in self._fresh:
            # Nothing else has been here: lo is ifindex 1, down, untagged.
            code = handle.sock.call(rtnl.set_link(index=rtnl.LOOPBACK_INDEX, up=True, alias=alias))
            _check(code, f"setting up {label}")
            return
        lo = self._get(handle.sock, "lo")
        if lo is not None:
            self._set_up(handle.sock, lo, label)
            if alias is not None:
                # The namespace carries its own ownership tag (on its lo): it dies with it,
                # and proves a pin re-created by a crashed run of ours is ours.
                self._set_alias(handle.sock, lo, alias, label)

    def _ensure_netns(self, name: str, alias: str | None) -> NetnsState:
        result = self._ensure_netns_many([(name, alias)])[name]
        if isinstance(result, KernelError):
            raise result
        return self._state(name, self._require(name))

    def _tagged(self, name: str, alias: str) -> bool:
        handle = self._handle(name)
        lo = self._get(handle.sock, "lo") if handle is not None else None
        return lo is not None and lo.alias == alias

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

    def _peer_in(self, link: rtnl.Link, name: str, handle: _Handle) -> bool:
        """True if `link`'s veth peer is `eth0` inside the namespace of `handle`."""
        if link.peer_nsid is None or link.peer_index is None:
            return False
        nsid = self._nsid(name, handle)
        if nsid is None or nsid != link.peer_nsid:
            return False
        peer = self._get(handle.sock, PEER_NAME)
        return peer is not None and peer.index == link.peer_index

    def _nsid(self, name: str, handle: _Handle) -> int | None:
        """The id the host gave namespace `name` (None: none assigned, so no peer there)."""
        with self._pin_fd(name, handle) as pin_fd, _kernel_errors(f"reading nsid of {name}"):
            return self._host_sock().nsid(pin_fd)

    # ---- env links: the fresh (batched) path

    def _ensure_env_links(self, specs: Sequence[EnvLinkSpec]) -> dict[str, list[str] | KernelError]:
        host = self._host_sock()
        with _kernel_errors("dumping host links"):
            present = {link.name: link for link in host.links()}
        fresh = [
            s
            for s in specs
            if s.netns in self._fresh and s.host_name not in present and s.bridge in present
        ]
        results: dict[str, list[str] | KernelError] = {}
        if fresh:
            results.update(self._create_fresh(fresh, bridges=present))
        for spec in specs:
            if spec.host_name in results:
                continue
            try:
                results[spec.host_name] = self._ensure_env_link(spec)
            except KernelError as exc:
                results[spec.host_name] = exc
        return results

    def _create_fresh(
        self, specs: Sequence[EnvLinkSpec], *, bridges: Mapping[str, rtnl.Link]
    ) -> dict[str, list[str]]:
        """Build every pair of `specs` in three host datagrams and one per namespace.

        Returns the envs done; the others (any step refused) are left to the careful
        path, which inspects what exists and reports what is wrong.
        """
        host = self._host_sock()
        created: list[EnvLinkSpec] = []
        with contextlib.ExitStack() as stack:
            requests = []
            for spec in specs:
                handle = self._netns.get(spec.netns)
                if handle is None:
                    continue
                try:
                    pin_fd = stack.enter_context(self._pin_fd(spec.netns, handle))
                except KernelError:
                    continue
                created.append(spec)
                requests.append(
                    rtnl.new_veth(
                        name=spec.host_name,
                        mac=naming.link_mac(spec.alias),
                        master=bridges[spec.bridge].index,
                        peer_name=PEER_NAME,
                        peer_netns_fd=pin_fd,
                    )
                )
            with _kernel_errors("creating veth pairs"):
                codes = host.execute(requests)
        created = [spec for spec, code in zip(created, codes, strict=True) if code == 0]
        with _kernel_errors("dumping host links"):
            links = {link.name: link for link in host.links()}
        created = [s for s in created if links.get(s.host_name) is not None]
        with _kernel_errors("tagging veths"):
            codes = host.execute(
                [
                    rtnl.set_link(index=links[s.host_name].index, alias=s.alias, isolated=True)
                    for s in created
                ]
            )
        done: dict[str, list[str]] = {}
        for spec, code in zip(created, codes, strict=True):
            peer = links[spec.host_name].peer_index
            if code or peer is None:
                continue
            address, prefixlen = _split(spec.address_cidr)
            sock = self._netns[spec.netns].sock
            with _kernel_errors(f"configuring network namespace {spec.netns}"):
                inside = sock.execute(
                    [
                        rtnl.set_link(index=peer, up=True),
                        rtnl.new_address(index=peer, address=address, prefixlen=prefixlen),
                        rtnl.new_default_route(gateway=spec.gateway, oif=peer),
                    ]
                )
            self._fresh.discard(spec.netns)
            if any(inside):
                continue
            label = f"veth {spec.host_name}"
            eth0 = f"{PEER_NAME} in network namespace {spec.netns}"
            done[spec.host_name] = [
                f"{label}: created (peer {eth0})",
                f"{label}: tagged {spec.alias}",
                f"bridge port {spec.host_name}: isolated on",
                f"{eth0}: set up",
                f"{eth0}: added address {ipaddress.ip_interface(spec.address_cidr)}",
                f"network namespace {spec.netns}: default route via {spec.gateway}",
            ]
        return done

    # ---- env links: the careful path

    def _ensure_env_link(self, spec: EnvLinkSpec) -> list[str]:
        host = self._host_sock()
        handle = self._require(spec.netns)
        self._fresh.discard(spec.netns)
        label = f"veth {spec.host_name}"
        inside = f"{PEER_NAME} in network namespace {spec.netns}"
        bridge_link = self._get(host, spec.bridge)
        if bridge_link is None:
            raise KernelError(
                f"bridge {spec.bridge} does not exist; cannot attach {label} "
                "(ensure the network first)"
            )
        changes: list[str] = []
        # Inspect, (re)create, inspect again, as for bridges: ownership is re-checked on
        # every pass, and a fresh pair must pass the same peer check as an old one.
        for _ in range(_CREATE_ATTEMPTS):
            link = self._get(host, spec.host_name)
            if link is not None:
                if _ownership(link, alias=spec.alias) == "foreign":
                    raise OwnershipError(
                        f"link {spec.host_name} exists and is not owned by instance "
                        f"{_instance_of(spec.alias)} (ifalias {link.alias!r}, "
                        f"expected {spec.alias!r}); delete it by hand if it is stale"
                    )
                if link.kind == "veth" and self._peer_in(link, spec.netns, handle):
                    break
                # Ours, but its peer is not our eth0: typically the namespace was
                # recreated. Replace the pair.
                self._delete(host, link.index, label)
                changes.append(f"{label}: deleted (its peer was not {inside})")
            changes += self._create_veth(handle, spec, bridge_index=bridge_link.index)
        else:
            raise KernelError(f"creating {label} failed: it keeps changing under us; retry")
        changes += self._set_alias(host, link, spec.alias, label)
        if link.master != bridge_link.index:
            _check(
                host.call(rtnl.set_link(index=link.index, master=bridge_link.index)),
                f"enslaving {label} to bridge {spec.bridge}",
            )
            changes.append(f"{label}: enslaved to bridge {spec.bridge}")
        changes += self._set_up(host, link, label)

        sock = handle.sock
        peer = self._get(sock, PEER_NAME)
        if peer is None:
            raise KernelError(f"{inside} vanished while being configured; retry")
        changes += self._set_up(sock, peer, inside)
        changes += self._exact_address(sock, index=peer.index, cidr=spec.address_cidr, label=inside)
        lo = self._get(sock, "lo")
        if lo is not None:
            changes += self._set_up(sock, lo, f"lo in network namespace {spec.netns}")
        changes += self._default_route(
            sock, oif=peer.index, gateway=spec.gateway, label=f"network namespace {spec.netns}"
        )
        return changes

    def _create_veth(self, handle: _Handle, spec: EnvLinkSpec, *, bridge_index: int) -> list[str]:
        """One RTM_NEWLINK: host end enslaved to the bridge, peer born as eth0 in the netns."""
        label = f"veth {spec.host_name}"
        inside = f"{PEER_NAME} in network namespace {spec.netns}"
        changes = self._clear_stray_peer(handle, netns_name=spec.netns, alias=spec.alias)
        with self._pin_fd(spec.netns, handle) as pin_fd:
            code = self._host_sock().call(
                rtnl.new_veth(
                    name=spec.host_name,
                    mac=naming.link_mac(spec.alias),
                    master=bridge_index,
                    peer_name=PEER_NAME,
                    peer_netns_fd=pin_fd,
                )
            )
        if code == 0:
            changes.append(f"{label}: created (peer {inside})")
        elif code != errno.EEXIST:  # EEXIST: created concurrently; inspected next
            _check(code, f"creating {label}")
        return changes

    def _clear_stray_peer(self, handle: _Handle, *, netns_name: str, alias: str) -> list[str]:
        """Remove an `eth0` that is in our namespace while our host end is absent.

        It would make the veth creation fail with EEXIST. Whatever lives only inside our
        namespace is ours to delete; a veth whose other end is outside is deleted only if
        that end carries our tag (our host end, renamed), else it is someone else's.
        """
        stray = self._get(handle.sock, PEER_NAME)
        if stray is None:
            return []
        where = f"network namespace {netns_name}"
        outside = stray.kind == "veth" and stray.peer_nsid is not None
        if not outside:
            self._delete(handle.sock, stray.index, f"stray {PEER_NAME} in {where}")
            return [f"{where}: deleted a stray {PEER_NAME}"]
        nsid = self._nsid(netns_name, handle)
        host_end = None
        if nsid is not None:
            with _kernel_errors("dumping host links"):
                links = self._host_sock().links()
            host_end = next(
                (
                    link
                    for link in links
                    if link.peer_nsid == nsid and link.peer_index == stray.index
                ),
                None,
            )
        if host_end is None or _ownership(host_end, alias=alias) == "foreign":
            other = (
                f"host link {host_end.name} (ifalias {host_end.alias!r})"
                if host_end is not None
                else "a link in another namespace"
            )
            raise OwnershipError(
                f"{PEER_NAME} in {where} is the peer of {other}, which is not owned by "
                f"instance {_instance_of(alias)}; delete it by hand"
            )
        self._delete(self._host_sock(), host_end.index, f"veth {host_end.name}")
        return [f"{where}: deleted our renamed veth {host_end.name}"]

    def _links_present(self, names: Sequence[str]) -> set[str]:
        with _kernel_errors("dumping host links"):
            present = {link.name for link in self._host_sock().links()}
        return present.intersection(names)

    def _close(self) -> None:
        self._reset()
        if self._home_fd is not None:
            os.close(self._home_fd)
            self._home_fd = None

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

    def ensure_netns_many(
        self, items: Sequence[tuple[str, str | None]]
    ) -> dict[str, PinIdentity | KernelError]:
        """`ensure_netns` for many (name, alias) pairs: each name's pin identity, or the
        KernelError that stopped it (the others carry on)."""
        return self._call(self._ensure_netns_many, list(items))

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
        spec = EnvLinkSpec(
            netns=netns,
            host_name=host_name,
            alias=alias,
            bridge=bridge,
            address_cidr=address_cidr,
            gateway=gateway,
        )
        return self._call(self._ensure_env_link, spec)

    def ensure_env_links(self, specs: Sequence[EnvLinkSpec]) -> dict[str, list[str] | KernelError]:
        """`ensure_env_link` for many envs, batched where the namespaces are fresh; by
        host veth name: the changes made, or the KernelError that stopped that env."""
        return self._call(self._ensure_env_links, list(specs))

    def remove_env_link(self, *, host_name: str, alias: str) -> bool:
        """Delete the host veth (its peer goes with it) if it is ours."""
        return self._call(self._remove_link, name=host_name, alias=alias, what="veth")

    def wait_links_gone(self, names: Sequence[str], *, timeout: float) -> set[str]:
        """Poll the host's links until none of `names` is left or `timeout` passes;
        returns the names still present. (A namespace is torn down asynchronously after
        its last reference goes: its veths disappear a little later.)"""
        deadline = time.monotonic() + timeout
        while True:
            left = self._call(self._links_present, list(names))
            if not left or time.monotonic() >= deadline:
                return left
            time.sleep(_POLL_INTERVAL)

    @property
    def socket_opens(self) -> Mapping[str, int]:
        """How many times a socket was opened per namespace name, over the driver's life."""
        with self._lock:
            return dict(self._opens)

    @property
    def cached_netns(self) -> tuple[str, ...]:
        """Names of the namespaces with a cached socket right now."""
        with self._lock:
            return tuple(sorted(self._netns))

    def close(self) -> None:
        """Close every socket; idempotent."""
        with self._lock:
            self._close()

    def __enter__(self) -> NetlinkDriver:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
