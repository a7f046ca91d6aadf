"""Deterministic kernel names, derived only from (instance, env, network).

Names are how a retry after a crash finds what the first attempt half made, and how
teardown finds host-side objects without the netns: the same inputs always give the same
name, so nothing about them has to be remembered. Interface names are limited by the
kernel to 15 bytes (IFNAMSIZ - 1); hashes keep long names short and still unique.

The MAC address we give a link at creation is derived from its ownership tag. It is the
one property that is set atomically with the link (ifalias is not: the kernel ignores
IFLA_IFALIAS in RTM_NEWLINK), so a link left without its tag by a crash between the two
calls can still be proven ours: right name, no tag, our MAC.
"""

from __future__ import annotations

import hashlib

IFNAME_MAX = 15  # IFNAMSIZ (16) minus the terminating NUL
HOST_VETH_PREFIX = "rcv"
BRIDGE_PREFIX = "rcbr-"


def _hex(text: str, length: int) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def host_veth_name(instance: str, env: str) -> str:
    """Host end of the env's veth: "rcv" + 12 hex of sha256("instance/env") (15 chars)."""
    return HOST_VETH_PREFIX + _hex(f"{instance}/{env}", IFNAME_MAX - len(HOST_VETH_PREFIX))


def netns_name(instance: str, env: str) -> str:
    """Name of the env's pinned network namespace under /run/netns."""
    return f"{instance}-{env}"


def default_bridge_name(network: str) -> str:
    """ "rcbr-<network>" when it fits in 15 chars, else "rcbr-" + 10 hex of sha256(network)."""
    name = BRIDGE_PREFIX + network
    if len(name) <= IFNAME_MAX:
        return name
    return BRIDGE_PREFIX + _hex(network, IFNAME_MAX - len(BRIDGE_PREFIX))


def link_mac(alias: str) -> str:
    """The MAC a link tagged `alias` is born with: locally administered, unicast (02:...)."""
    digest = hashlib.sha256(alias.encode()).digest()
    return ":".join(f"{b:02x}" for b in (0x02, *digest[:5]))
