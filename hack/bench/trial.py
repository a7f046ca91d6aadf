"""One trial: one approach building and tearing down N environments, with unique names.

Every trial gets its own index, hence its own names (`<tag><letter><index>...`), bridge
and /24 subnet, so a trial never meets the remains of another, even while the kernel is
still tearing the previous one down asynchronously. `check_envs` proves, untimed, that
an approach really built what the others build: every env's `eth0` up with its address,
`lo` up, in a pinned namespace.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

from hack.bench import rtnl
from hack.bench.kernel import BenchError


@dataclass(frozen=True)
class Trial:
    """Identity of one (approach, N, round) run."""

    tag: str  # the run's tag, in every name
    index: int  # unique within the run
    n: int
    round: int

    @property
    def subnet(self) -> ipaddress.IPv4Network:
        """A /24 of its own (10.100.0.0/24, 10.100.1.0/24, ...)."""
        return ipaddress.IPv4Network(f"10.{100 + self.index // 250}.{self.index % 250}.0/24")

    @property
    def gateway(self) -> ipaddress.IPv4Address:
        """The bridge's address: the first host."""
        return self.subnet.network_address + 1

    def address(self, i: int) -> ipaddress.IPv4Address:
        """Env i's address (the floor assigns them; CNI and the reconciler allocate)."""
        return self.subnet.network_address + 2 + i

    def prefix(self, letter: str) -> str:
        """Name prefix for this trial's objects: tag + approach letter + index."""
        return f"{self.tag}{letter}{self.index}"


def check_envs(netns_names: Sequence[str], *, subnet: ipaddress.IPv4Network) -> None:
    """Every namespace has eth0 up with an address in `subnet`; else BenchError."""
    sockets = rtnl.open_sockets(netns_names)
    try:
        for name, sock in sockets.items():
            links = rtnl.links(sock)
            eth0 = links.get("eth0")
            if eth0 is None or not eth0.up:
                raise BenchError(f"netns {name}: eth0 missing or down")
            if not any(ipaddress.IPv4Interface(a).ip in subnet for a in eth0.addresses):
                raise BenchError(f"netns {name}: eth0 has no address in {subnet}")
    finally:
        for sock in sockets.values():
            sock.close()
