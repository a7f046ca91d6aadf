"""The kernel's own view, for tests: read it without going through the product's code.

An integration test that checked the reconciler's work with the reconciler's own observers
would pass whenever both agree, right or wrong. These helpers ask the kernel through other
channels (the `ip` and `nft` commands, /proc, cgroup files), so a test compares the
product's claims with an independent witness.

Everything here only reads, except `run`, which runs whatever it is given. Waits poll with a
deadline (`wait_until`); nothing sleeps as a means of synchronisation.
"""

from __future__ import annotations

import ctypes
import json
import os
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

NETNS_DIR = Path("/run/netns")


class KernelViewError(RuntimeError):
    """A read of the kernel's view failed (command missing, non-zero exit, bad output)."""


# --------------------------------------------------------------------------- commands


def run(cmd: Sequence[str], *, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    """Run `cmd` (no shell) and return the result; never raises on a non-zero exit."""
    return subprocess.run(list(cmd), check=False, capture_output=True, text=True, timeout=timeout)


def _json_of(cmd: Sequence[str]) -> Any:
    result = run(cmd)
    if result.returncode != 0:
        raise KernelViewError(
            f"{' '.join(cmd)} exited {result.returncode}: {result.stderr.strip()}"
        )
    # `ip -j` prints nothing at all (not "[]") for some empty dumps.
    return json.loads(result.stdout) if result.stdout.strip() else []


# --------------------------------------------------------------------------- links


def ip_links(netns: str | None = None) -> list[dict[str, Any]]:
    """All links with details and addresses: `ip -j [-n NETNS] -d addr show`.

    Keys of interest: ifname, ifindex, flags (contains "UP"), operstate, master, ifalias,
    linkinfo.info_kind ("bridge", "veth"), addr_info (list of {family, local, prefixlen}).
    """
    cmd = ["ip", "-j"]
    if netns is not None:
        cmd += ["-n", netns]
    cmd += ["-d", "addr", "show"]
    links: list[dict[str, Any]] = _json_of(cmd)
    return links


def ip_link(name: str, *, netns: str | None = None) -> dict[str, Any] | None:
    """The link called `name` (in `netns`, or the current netns), or None if absent."""
    for link in ip_links(netns):
        if link.get("ifname") == name:
            return link
    return None


def ipv4_addresses(link: dict[str, Any]) -> list[str]:
    """The IPv4 addresses of a link from `ip_links`, as "a.b.c.d/len"."""
    return [
        f"{a['local']}/{a['prefixlen']}"
        for a in link.get("addr_info", [])
        if a.get("family") == "inet"
    ]


def link_kind(link: dict[str, Any]) -> str | None:
    """The link's kind from `ip -d` ("bridge", "veth", ...); None for plain devices like lo."""
    kind = link.get("linkinfo", {}).get("info_kind")
    return str(kind) if kind is not None else None


def is_up(link: dict[str, Any]) -> bool:
    """True if the link is administratively up (IFF_UP)."""
    return "UP" in link.get("flags", [])


# --------------------------------------------------------------------------- namespaces


def netns_names() -> list[str]:
    """Names pinned under /run/netns (sorted); [] when the directory does not exist."""
    try:
        return sorted(os.listdir(NETNS_DIR))
    except FileNotFoundError:
        return []


def netns_inode(name: str) -> int:
    """The inode of the namespace pinned at /run/netns/NAME: its identity (raises if absent)."""
    return os.stat(NETNS_DIR / name).st_ino


def pid_netns_inode(pid: int) -> int:
    """The inode of the network namespace process `pid` lives in."""
    return os.stat(f"/proc/{pid}/ns/net").st_ino


# --------------------------------------------------------------------------- nftables


def nft_tables() -> list[tuple[str, str]]:
    """(family, name) of every nftables table in the current netns: `nft -j list tables`."""
    data = _json_of(["nft", "-j", "list", "tables"])
    entries = data.get("nftables", []) if isinstance(data, dict) else []
    return [(e["table"]["family"], e["table"]["name"]) for e in entries if "table" in e]


# --------------------------------------------------------------------------- cgroups


@dataclass(frozen=True)
class CgroupMount:
    """One mounted cgroup hierarchy, from /proc/self/mountinfo."""

    path: Path  # mount point, e.g. /sys/fs/cgroup/memory
    version: int  # 1 or 2
    controllers: tuple[str, ...]  # v1: ("memory",), ("name=systemd",); v2: ()


def _unescape_mountinfo(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo octal.
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1 : i + 4].isdigit() and i + 4 <= len(field):
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


# v1 super options that are flags, not controllers.
_V1_FLAGS = frozenset({"rw", "ro", "xattr", "noprefix", "clone_children", "cpuset_v2_mode"})


def parse_cgroup_mounts(mountinfo: str) -> list[CgroupMount]:
    """The cgroup mounts listed in a mountinfo text, one per hierarchy (first mount wins)."""
    mounts: list[CgroupMount] = []
    seen: set[tuple[str, str]] = set()
    for line in mountinfo.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fields, tail = left.split(), right.split()
        if len(fields) < 5 or len(tail) < 3 or tail[0] not in ("cgroup", "cgroup2"):
            continue
        hierarchy = (fields[2], fields[3])  # (major:minor, root): bind mounts repeat it
        if hierarchy in seen:
            continue
        seen.add(hierarchy)
        version = 2 if tail[0] == "cgroup2" else 1
        controllers: tuple[str, ...] = ()
        if version == 1:
            controllers = tuple(
                o
                for o in tail[2].split(",")
                if o.startswith("name=") or ("=" not in o and o not in _V1_FLAGS)
            )
        mounts.append(
            CgroupMount(
                path=Path(_unescape_mountinfo(fields[4])),
                version=version,
                controllers=controllers,
            )
        )
    return mounts


def cgroup_mounts() -> list[CgroupMount]:
    """The cgroup hierarchies mounted in this mount namespace."""
    return parse_cgroup_mounts(Path("/proc/self/mountinfo").read_text())


def read_cgroup_file(path: str | os.PathLike[str]) -> str:
    """The content of a cgroup control file, stripped (e.g. memory.limit_in_bytes)."""
    return Path(path).read_text().strip()


def pids_in_cgroup_dirs(
    dirs: Iterable[str | os.PathLike[str]], *, recursive: bool = True
) -> set[int]:
    """Every pid in `cgroup.procs` of the given cgroup dirs (and their descendants).

    Directories that do not exist are skipped: "no such cgroup" holds no processes.
    """
    pids: set[int] = set()
    for top in dirs:
        tops = [Path(top)]
        if recursive and tops[0].is_dir():
            tops += [Path(d) for d, _, _ in os.walk(top) if Path(d) != tops[0]]
        for directory in tops:
            try:
                text = (directory / "cgroup.procs").read_text()
            except (FileNotFoundError, NotADirectoryError):
                continue
            pids.update(int(p) for p in text.split())
    return pids


def proc_cgroups(pid: int) -> list[str]:
    """Lines of /proc/PID/cgroup ("4:memory:/a/b"); [] if the process is gone."""
    try:
        return Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    except (FileNotFoundError, ProcessLookupError):
        return []


# --------------------------------------------------------------------------- processes


def pid_alive(pid: int) -> bool:
    """True if `pid` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    # The state letter follows the last ')' (the command name may contain parentheses).
    return stat.rpartition(")")[2].split()[0] != "Z"


def all_pids() -> list[int]:
    """Every pid visible in /proc."""
    return [int(n) for n in os.listdir("/proc") if n.isdigit()]


# --------------------------------------------------------------------------- waiting


def wait_until(
    predicate: Callable[[], T],
    timeout: float,
    interval: float = 0.02,
    message: str | Callable[[], str] = "condition not met",
    *,
    ignore: tuple[type[BaseException], ...] = (OSError,),
) -> T:
    """Poll `predicate` until it returns something truthy, and return that value.

    Raises AssertionError with `message` (a string, or a callable evaluated at timeout to
    describe the state then) when `timeout` seconds pass first. Exceptions listed in
    `ignore` count as "not yet" (a file not created yet, a process already gone); the last
    one is chained to the AssertionError.
    """
    deadline = time.monotonic() + timeout
    last: T | None = None
    last_error: BaseException | None = None
    while True:
        try:
            last = predicate()
            if last:
                return last
        except ignore as exc:
            last_error = exc
        if time.monotonic() >= deadline:
            text = message() if callable(message) else message
            detail = f"last value {last!r}" if last_error is None else f"last error {last_error!r}"
            raise AssertionError(f"{text} (waited {timeout:.2f}s; {detail})") from last_error
        time.sleep(interval)


# --------------------------------------------------------------------------- change monitor

_RTMGRP_LINK, _RTMGRP_IPV4_IFADDR, _RTMGRP_IPV4_ROUTE = 0x1, 0x10, 0x40
_CLONE_NEWNET = 0x40000000


class NetlinkChanges:
    """Counts rtnetlink change notifications (links, IPv4 addresses, routes) on the host
    and inside named namespaces: a raw socket bound to the multicast groups in each, so
    anything written to the kernel's network state while it is open shows up. Opened
    from a thread that setns()s (the sockets stay in their namespaces)."""

    def __init__(self, netns: Sequence[str] = ()) -> None:
        groups = _RTMGRP_LINK | _RTMGRP_IPV4_IFADDR | _RTMGRP_IPV4_ROUTE
        libc = ctypes.CDLL(None, use_errno=True)
        self._socks: list[Any] = []
        errors: list[BaseException] = []

        def new() -> Any:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, 0)
            sock.bind((0, groups))
            sock.setblocking(False)
            return sock

        def visit() -> None:
            try:
                for name in netns:
                    fd = os.open(f"/run/netns/{name}", os.O_RDONLY | os.O_CLOEXEC)
                    try:
                        if libc.setns(fd, _CLONE_NEWNET) != 0:
                            raise OSError(ctypes.get_errno(), f"setns {name}")
                    finally:
                        os.close(fd)
                    self._socks.append(new())
            except BaseException as exc:  # re-raised in the caller's thread
                errors.append(exc)

        self._socks.append(new())
        thread = threading.Thread(target=visit)
        thread.start()
        thread.join()
        if errors:
            self.close()
            raise errors[0]

    def drain(self) -> int:
        """Change messages received since the last drain (or since opening).

        A bridge re-announces each port (an AF_BRIDGE RTM_NEWLINK) when its STP state
        timer fires, whoever wrote what: those are not counted.
        """
        count = 0
        for sock in self._socks:
            while True:
                try:
                    data = sock.recv(1 << 16)
                except BlockingIOError:
                    break
                offset = 0
                while offset + 17 <= len(data):
                    length, kind = struct.unpack_from("=IH", data, offset)
                    if length < 16:
                        break
                    family = data[offset + 16]
                    if not (kind == 16 and family == 7):  # RTM_NEWLINK, AF_BRIDGE
                        count += 1
                    offset += (length + 3) & ~3
        return count

    def settle(self, *, quiet: float = 1.5, timeout: float = 30.0) -> None:
        """Drain until nothing arrived for `quiet` seconds: the kernel reports some
        changes late (linkwatch delays operstate events by up to a second)."""
        deadline = time.monotonic() + timeout
        last = time.monotonic()
        while time.monotonic() - last < quiet:
            if time.monotonic() > deadline:
                raise KernelViewError(f"rtnetlink did not go quiet within {timeout:g}s")
            if self.drain():
                last = time.monotonic()
            time.sleep(0.05)

    def close(self) -> None:
        for sock in self._socks:
            sock.close()
