"""The lean observation floor: the least a no-op reconcile must read, done by hand.

One pass = list the pins under /run/netns, one link + IPv4 address dump on the host,
open one netlink socket inside each of the instance's namespaces (a setns'ed thread,
`rtnl.open_sockets`) and dump its links and addresses, and read every env's limit files
(memory, cpu quota and period, pids). A fresh process must open those sockets too, so
their cost is in the pass; cgroup mount discovery is not (it is a fixed, tiny cost).
Nothing is parsed beyond names, flags, masters and addresses.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence

from hack.bench import rtnl
from hack.bench.kernel import cgroup_mounts, read_limits


def floor_pass(*, instance: str, envs: Sequence[str]) -> float:
    """Seconds for one observation pass over `instance`'s environments."""
    mounts = cgroup_mounts()
    started = time.perf_counter()
    pins = [name for name in os.listdir(rtnl.NETNS_DIR) if name.startswith(f"{instance}-")]
    with rtnl.host_socket() as sock:
        rtnl.links(sock)
    sockets = rtnl.open_sockets(pins)
    try:
        for sock in sockets.values():
            rtnl.links(sock)
    finally:
        for sock in sockets.values():
            sock.close()
    read_limits(instance, envs, mounts)
    return time.perf_counter() - started
