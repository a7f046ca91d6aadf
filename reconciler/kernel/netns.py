"""Pinned network namespaces, created and entered without forking.

A network namespace lives as long as something references it: a process, an open fd,
a socket created inside it, or a bind mount of its nsfs file. We *pin* each env's
namespace the way `ip netns add` does, by bind-mounting it onto `/run/netns/<name>`, so
`ip netns exec <name>` and `ip -n <name>` work on it, and it survives the reconciler.

The pin's (st_dev, st_ino) is the namespace's identity: nsfs gives every namespace one
inode, and a bind mount shows that inode. An empty file at the pin path (left by a crash
between `open(O_CREAT)` and `mount`) is not a namespace; `pin_identity` says None.

Entering happens in a short-lived thread (`nsutil.run_in_thread`), because setns(2) and
unshare(2) act on the calling thread only. A netlink socket created in there stays bound
to that namespace for its whole life, wherever it is used from later; that is how the
driver keeps one long-lived socket per namespace. Such a socket also keeps the namespace
alive: close it before (or right after) unpinning, or the namespace, its `eth0` and the
host end of its veth linger invisibly.

`/run/netns` itself is made a mount point with shared propagation, exactly as
`ip netns add` does, so an unmount done in one mount namespace reaches the others.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from reconciler.kernel import nsutil, rtnl
from reconciler.kernel.types import PinIdentity

NETNS_RUN_DIR = "/run/netns"
_THREAD_NETNS = "/proc/thread-self/ns/net"


@dataclass(frozen=True)
class NetnsSocket:
    """A NETLINK_ROUTE socket fd opened inside a pinned namespace, and which one it was."""

    fd: int  # caller owns it (close it, or hand it to `rtnl.Socket`)
    identity: PinIdentity


def pinned_names() -> set[str]:
    """Every name pinned under /run/netns (empty when the directory does not exist)."""
    try:
        return set(os.listdir(NETNS_RUN_DIR))
    except FileNotFoundError:
        return set()


def pin_path(name: str) -> str:
    """`/run/netns/<name>`; rejects names that would escape the directory."""
    if not name or "/" in name or name in (".", "..") or "\0" in name:
        raise ValueError(f"not a network namespace name: {name!r}")
    return os.path.join(NETNS_RUN_DIR, name)


def _is_netns_fd(fd: int) -> bool:
    try:
        return bool(fcntl.ioctl(fd, nsutil.NS_GET_NSTYPE) == nsutil.CLONE_NEWNET)
    except OSError:
        return False  # not an nsfs file (ENOTTY): an empty pin file, or something else


def pin_identity(name: str) -> PinIdentity | None:
    """The identity of the namespace pinned at /run/netns/<name>; None if not pinned."""
    try:
        fd = os.open(pin_path(name), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        if not _is_netns_fd(fd):
            return None
        st = os.fstat(fd)
        return PinIdentity(inode=st.st_ino, dev=st.st_dev)
    finally:
        os.close(fd)


def _netlink_socket_fd() -> int:
    return rtnl.open_route_socket()


def _return_home(home_fd: int) -> None:
    # Best effort: the thread exits right after, so a failure here cannot leak.
    with contextlib.suppress(OSError):
        nsutil.setns(home_fd, nsutil.CLONE_NEWNET)
    os.close(home_fd)


def socket_in(ns_fd: int) -> int:
    """A NETLINK_ROUTE socket fd inside the network namespace open at `ns_fd`."""

    def inside() -> int:
        home_fd = os.open(_THREAD_NETNS, os.O_RDONLY | os.O_CLOEXEC)
        try:
            nsutil.setns(ns_fd, nsutil.CLONE_NEWNET)
            return _netlink_socket_fd()
        finally:
            _return_home(home_fd)

    return nsutil.run_in_thread(inside, name="reconciler-netns-open")


def current_netns_fd() -> int:
    """An fd on the calling thread's network namespace (close it when done)."""
    return os.open(_THREAD_NETNS, os.O_RDONLY | os.O_CLOEXEC)


def _open_inside(name: str) -> NetnsSocket | None:
    """On a thread of our own: setns into the pin of `name`, open a socket there.

    The thread is left in that namespace: callers return it home (or let it die).
    """
    try:
        pin_fd = os.open(pin_path(name), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        if not _is_netns_fd(pin_fd):
            return None
        st = os.fstat(pin_fd)
        # setns through the same fd we fstat'ed: the identity cannot race.
        nsutil.setns(pin_fd, nsutil.CLONE_NEWNET)
        fd = _netlink_socket_fd()
        return NetnsSocket(fd=fd, identity=PinIdentity(inode=st.st_ino, dev=st.st_dev))
    finally:
        os.close(pin_fd)


def _each_in_one_thread(
    names: Sequence[str],
    step: Callable[[str], NetnsSocket | None],
    *,
    thread: str,
) -> dict[str, NetnsSocket | OSError]:
    """Run `step(name)` for every name on one short-lived thread (each step may leave
    the thread in another namespace; it is sent home at the end). None results are
    left out; an OSError is that name's result, the others carry on."""

    def visit() -> dict[str, NetnsSocket | OSError]:
        found: dict[str, NetnsSocket | OSError] = {}
        home_fd = os.open(_THREAD_NETNS, os.O_RDONLY | os.O_CLOEXEC)
        try:
            for name in names:
                try:
                    result = step(name)
                except OSError as exc:
                    found[name] = exc
                    continue
                if result is not None:
                    found[name] = result
        finally:
            _return_home(home_fd)
        return found

    return nsutil.run_in_thread(visit, name=thread)


def open_sockets(names: Sequence[str]) -> dict[str, NetnsSocket | OSError]:
    """A NETLINK_ROUTE socket inside each namespace pinned as one of `names`.

    One short-lived thread visits them all in turn (a thread per namespace would cost
    more than the visit). Unpinned names are absent from the result; a name that could
    not be entered maps to its OSError.
    """

    return _each_in_one_thread(names, _open_inside, thread="reconciler-netns-open")


def open_socket(name: str) -> NetnsSocket | None:
    """Open a NETLINK_ROUTE socket inside the namespace pinned as `name`; None if unpinned."""
    opened = open_sockets([name]).get(name)
    if isinstance(opened, OSError):
        raise opened
    return opened


def ensure_run_dir() -> None:
    """Make /run/netns exist and be a shared mount point, the way `ip netns add` does."""
    os.makedirs(NETNS_RUN_DIR, mode=0o755, exist_ok=True)
    try:
        nsutil.mount(source="", target=NETNS_RUN_DIR, fstype="none", flags=nsutil.MS_SHARED)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
        # EINVAL: not a mount point yet. Bind it onto itself, then make it shared.
        nsutil.mount(
            source=NETNS_RUN_DIR,
            target=NETNS_RUN_DIR,
            fstype="none",
            flags=nsutil.MS_BIND | nsutil.MS_REC,
        )
        nsutil.mount(source="", target=NETNS_RUN_DIR, fstype="none", flags=nsutil.MS_SHARED)


def _create_inside(name: str) -> NetnsSocket:
    """On a thread of our own: unshare a new netns, pin it, open a socket inside.

    The thread is left in the new namespace: callers return it home (or let it die).
    """
    path = pin_path(name)
    if pin_identity(name) is not None:
        raise FileExistsError(errno.EEXIST, f"{path} is already a pinned namespace")
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0))
        created_file = True
    except FileExistsError:
        created_file = False  # an empty leftover of a crash: mount over it
    try:
        nsutil.unshare(nsutil.CLONE_NEWNET)
        nsutil.mount(source=_THREAD_NETNS, target=path, fstype="none", flags=nsutil.MS_BIND)
        fd = _netlink_socket_fd()
    except BaseException:
        if created_file:
            with contextlib.suppress(OSError):
                os.unlink(path)
        raise
    st = os.stat(path)
    return NetnsSocket(fd=fd, identity=PinIdentity(inode=st.st_ino, dev=st.st_dev))


def create_pins(names: Sequence[str]) -> dict[str, NetnsSocket | OSError]:
    """Create a namespace per name, pin it at /run/netns/<name>, open a socket inside.

    One short-lived thread makes them all. An empty leftover file at a path is reused;
    a name already pinned maps to FileExistsError (adopt it with `open_sockets`).
    """
    ensure_run_dir()

    return _each_in_one_thread(names, _create_inside, thread="reconciler-netns-create")


def create_pin(name: str) -> NetnsSocket:
    """`create_pins` for one name; raises its OSError (FileExistsError if pinned)."""
    made = create_pins([name])[name]
    if isinstance(made, OSError):
        raise made
    return made


def remove_pin(name: str) -> bool:
    """Unmount and delete /run/netns/<name>; True if there was a file to remove.

    The namespace itself dies once nothing else references it (close your sockets).
    """
    path = pin_path(name)
    if not os.path.lexists(path):
        return False
    # Pins can be stacked (two racing `ip netns add`): unmount until none is left.
    for _ in range(16):
        try:
            nsutil.umount2(path, nsutil.MNT_DETACH)
        except OSError as exc:
            if exc.errno in (errno.EINVAL, errno.ENOENT):
                break  # EINVAL: not (or no longer) a mount point
            raise
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True
