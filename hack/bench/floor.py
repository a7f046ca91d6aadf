"""The `ip -batch` floor: what N environments cost when built by hand, as fast as `ip` goes.

Create: one `ip -batch -` on the host (bridge with its gateway address, every netns
pinned, every veth born with its host end enslaved and up and its peer already in the
netns as eth0), then per env one `ip -n NS -batch -` (address, lo up, eth0 up, default
route) and the cgroup writes (memory/cpu/pids limits under a parent of our own).
Delete: one `ip -batch -` deleting every netns and the bridge, then rmdir of the cgroups.

Deleting a netns only unpins it: the kernel tears the namespace (and with it each veth)
down asynchronously, ~20 ms of RCU grace per veth. So delete has two times: when the
commands returned (`delete`), and when the kernel shows no link left (`delete_gone`).
"""

from __future__ import annotations

import time

from hack.bench.kernel import CgroupTree, host_links_gone, ip_batch, wait_until
from hack.bench.stats import Sample
from hack.bench.trial import Trial, check_envs

NAME = "floor"


def run(trial: Trial) -> list[Sample]:
    """Create, check (untimed), delete; one sample per phase."""
    prefix = trial.prefix("f")
    bridge = f"bf{trial.index}"
    netns = [f"{prefix}n{i}" for i in range(trial.n)]
    cgroups = CgroupTree.v1(prefix)
    plen = trial.subnet.prefixlen

    started = time.perf_counter()
    host = [
        f"link add {bridge} type bridge",
        f"addr add {trial.gateway}/{plen} dev {bridge}",
        f"link set {bridge} up",
    ]
    for i, name in enumerate(netns):
        host.append(f"netns add {name}")
        host.append(
            f"link add bf{trial.index}v{i} master {bridge} up type veth peer name eth0 netns {name}"
        )
    ip_batch(host)
    cgroups.create_parent()
    for i, name in enumerate(netns):
        ip_batch(
            [
                f"addr add {trial.address(i)}/{plen} dev eth0",
                "link set lo up",
                "link set eth0 up",
                f"route add default via {trial.gateway}",
            ],
            netns=name,
        )
        cgroups.create_env(f"e{i}")
    created = time.perf_counter()

    check_envs(netns, subnet=trial.subnet)

    started_delete = time.perf_counter()
    ip_batch([f"netns delete {name}" for name in netns] + [f"link delete {bridge}"])
    for i in range(trial.n):
        cgroups.remove_env(f"e{i}")
    cgroups.remove_parent()
    deleted = time.perf_counter()
    gone = wait_until(host_links_gone, timeout=60, what="the floor's veths to disappear")
    return _samples(trial, created - started, deleted - started_delete, gone - started_delete)


def _samples(trial: Trial, create: float, delete: float, gone: float) -> list[Sample]:
    return [
        Sample(NAME, "create", trial.n, trial.round, create),
        Sample(NAME, "delete", trial.n, trial.round, delete),
        Sample(NAME, "delete_gone", trial.n, trial.round, gone),
    ]
