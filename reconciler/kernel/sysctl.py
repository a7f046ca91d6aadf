"""Per-bridge and per-port kernel knobs that route env traffic through the host.

Isolation (see `nftrules`) needs env-to-env packets to cross the host's `inet` forward
hook instead of being switched by the bridge. Three knobs on the bridge and one on each
port make that happen, and each is scoped to our own devices:

- `net.ipv4.conf.<bridge>.forwarding = 1`: routing is decided by the *input* device's
  flag, so this lets packets arriving on our bridge be forwarded, and nothing else. The
  global `ip_forward` (which would make every interface of the host a router) is never
  touched; the forward chain refuses whatever would leave the bridge it came in on.
- `net.ipv4.conf.<bridge>.proxy_arp_pvlan = 1`: the host answers an env's ARP for a
  neighbour on the same bridge with its own MAC (private-VLAN proxy ARP), so the env
  sends the packet to the host.
- `net.ipv4.neigh.<bridge>.proxy_delay = 0`: proxy ARP replies are otherwise delayed by
  up to 0.8 s (random), which makes every env's first connection to a neighbour slow.
- bridge port flag `isolated` on each env's host veth: the bridge never forwards a frame
  between two isolated ports, so no env reaches another at layer 2 (including ARP and
  broadcasts), whether br_netfilter is loaded or not.

Every `ensure_*` reads first and writes only what differs, returning the changes made.

Where we read. /proc/sys/net shows the network namespace of the task that opens the file,
and rtnetlink sockets belong to the namespace they are created in: both follow the
calling thread, as the firewall does (`nft` runs in the caller's namespace). /sys is not
used: sysfs shows the namespace it was mounted in, which in a test sandbox that did not
remount it is the host's.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from reconciler.errors import KernelError
from reconciler.kernel import rtnl

PROC_NET = Path("/proc/sys/net")
_GONE = (errno.ENODEV, errno.ENOENT)


@dataclass(frozen=True)
class Knob:
    """One sysctl file and the value we want in it."""

    path: Path
    want: str

    @property
    def name(self) -> str:
        """The dotted sysctl name, e.g. net.ipv4.conf.rcbr-dev.forwarding."""
        return ".".join(self.path.relative_to(PROC_NET.parent).parts)


def bridge_knobs(bridge: str) -> tuple[Knob, ...]:
    """The sysctls that make `bridge` route env traffic through the host."""
    conf = PROC_NET / "ipv4" / "conf" / bridge
    return (
        Knob(conf / "forwarding", "1"),
        Knob(conf / "proxy_arp_pvlan", "1"),
        Knob(PROC_NET / "ipv4" / "neigh" / bridge / "proxy_delay", "0"),
    )


def _read(knob: Knob, *, bridge: str) -> str:
    try:
        return knob.path.read_text().strip()
    except FileNotFoundError as exc:
        raise KernelError(
            f"bridge {bridge} does not exist ({knob.name} is missing); ensure the network first"
        ) from exc
    except OSError as exc:
        raise KernelError(f"reading {knob.name} failed: {exc.strerror}") from exc


def bridge_flags(*, bridge: str) -> dict[str, str]:
    """Current value of each knob of `bridge`, by sysctl name."""
    return {knob.name: _read(knob, bridge=bridge) for knob in bridge_knobs(bridge)}


def ensure_bridge_flags(*, bridge: str) -> list[str]:
    """Set the bridge's routing knobs where they differ; return the changes made."""
    changes: list[str] = []
    for knob in bridge_knobs(bridge):
        current = _read(knob, bridge=bridge)
        if current == knob.want:
            continue
        try:
            knob.path.write_text(knob.want + "\n")
        except OSError as exc:
            raise KernelError(
                f"setting {knob.name} = {knob.want} failed: {exc.strerror}; are we root?"
            ) from exc
        changes.append(f"bridge {bridge}: {knob.name} {current} -> {knob.want}")
    return changes


# --------------------------------------------------------------------------- ports


@contextmanager
def _rtnl() -> Iterator[rtnl.Socket]:
    """A short-lived rtnetlink socket in the calling thread's network namespace."""
    try:
        sock = rtnl.Socket(rtnl.open_route_socket())
    except OSError as exc:
        raise KernelError(f"opening a netlink socket failed: {exc.strerror}") from exc
    try:
        yield sock
    finally:
        sock.close()


def _links(sock: rtnl.Socket) -> dict[str, rtnl.Link]:
    try:
        return {link.name: link for link in sock.links()}
    except OSError as exc:
        raise KernelError(f"dumping links failed: {exc.strerror}") from exc


def port_isolation(*, bridge: str, ports: Sequence[str]) -> dict[str, bool | None]:
    """Per port: True/False for its `isolated` flag, None when it is not a port of `bridge`."""
    with _rtnl() as sock:
        links = _links(sock)
    br = links.get(bridge)
    found: dict[str, bool | None] = {}
    for port in ports:
        link = links.get(port)
        on_bridge = br is not None and link is not None and link.master == br.index
        found[port] = bool(link.isolated) if on_bridge and link is not None else None
    return found


def ensure_port_flags(*, bridge: str, ports: Sequence[str]) -> list[str]:
    """Turn `isolated` on for each port of `bridge` that lacks it; return the changes.

    One link dump, then one batch for every port that needs the flag. Ports that are
    missing or enslaved elsewhere are reported in one KernelError after the others were
    handled (the env link is the network driver's job; ensure it first).
    """
    problems: list[str] = []
    todo: list[rtnl.Link] = []
    with _rtnl() as sock:
        links = _links(sock)
        br = links.get(bridge)
        if br is None:
            raise KernelError(f"bridge {bridge} does not exist; ensure the network first")
        for port in ports:
            link = links.get(port)
            if link is None:
                problems.append(f"{port} does not exist")
            elif link.master != br.index:
                problems.append(f"{port} is not a port of {bridge}")
            elif not link.isolated:
                todo.append(link)
        try:
            codes = sock.execute([rtnl.set_link(index=link.index, isolated=True) for link in todo])
        except OSError as exc:
            raise KernelError(f"setting bridge ports isolated failed: {exc.strerror}") from exc
    changes: list[str] = []
    for link, code in zip(todo, codes, strict=True):
        if code:
            raise KernelError(
                f"setting bridge port {link.name} isolated failed: {os.strerror(code)}"
            )
        changes.append(f"bridge port {link.name}: isolated on")
    if problems:
        raise KernelError(
            f"cannot isolate ports of bridge {bridge}: {'; '.join(problems)}; "
            "ensure the env links first"
        )
    return changes
