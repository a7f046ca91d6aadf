"""IP address management: give every environment on a network a stable address.

Precedence for each environment, highest first:

1. the static address its manifest declares;
2. the address recorded in the state file (kept across restarts and edits);
3. the address live on its `eth0` (adopted when the state file was lost);
4. the lowest free host address of the subnet.

The gateway, the network and broadcast addresses, and every address taken by a higher
precedence claim are never handed out. The function is pure: the engine records what it
returns in the state file.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

Address = ipaddress.IPv4Address


class AddressPoolExhausted(Exception):
    """No free address is left for an environment."""


@dataclass(frozen=True)
class Claim:
    """What is known about one environment's address."""

    static: Address | None = None
    recorded: Address | None = None
    live: Address | None = None


def allocate(
    *,
    subnet: ipaddress.IPv4Network,
    gateway: Address,
    claims: Mapping[str, Claim],
) -> tuple[dict[str, Address], dict[str, str]]:
    """Addresses for every environment in `claims`, and a reason per env that got none.

    Deterministic: environments are processed in name order at each precedence level.
    """
    reserved = {subnet.network_address, subnet.broadcast_address, gateway}
    taken: dict[Address, str] = {}
    result: dict[str, Address] = {}

    def usable(address: Address | None) -> bool:
        return (
            address is not None
            and address in subnet
            and address not in reserved
            and address not in taken
        )

    for level in ("static", "recorded", "live"):
        for env in sorted(claims):
            if env in result:
                continue
            address = getattr(claims[env], level)
            if usable(address):
                assert address is not None
                result[env] = address
                taken[address] = env
    failures: dict[str, str] = {}
    free = _free_addresses(subnet, reserved, taken)
    for env in sorted(claims):
        if env in result:
            continue
        address = next(free, None)
        if address is None:
            failures[env] = f"no free address left in {subnet} ({len(taken)} in use)"
            continue
        result[env] = address
        taken[address] = env
    return result, failures


def _free_addresses(
    subnet: ipaddress.IPv4Network, reserved: set[Address], taken: Mapping[Address, str]
) -> Iterator[Address]:
    for address in subnet.hosts():
        if address not in reserved and address not in taken:
            yield address
