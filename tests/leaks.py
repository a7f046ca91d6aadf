"""Leak detection: what of an instance is still alive in the kernel?

Teardown is where reconcilers leak (a cgroup left behind, a netns pin, a stray process,
a veth whose namespace died first). Every test instance has a unique, random name
(`rt<8 hex>`), so anything in the kernel whose name, cgroup path or ownership tag contains
that name belongs to the test, and must be gone after `destroy`.

`leaked_objects(instance)` looks, independently of the product's code, at:

- cgroups: directories under any mounted cgroup hierarchy whose name contains the instance
  (cgroups are NOT isolated by hack/sandbox.sh: this is the check that protects the host);
- processes whose /proc/PID/cgroup path contains the instance as a path component or in one;
- network namespaces pinned under /run/netns whose name contains the instance;
- links in the current netns whose ifalias (the ownership tag) names the instance;
- nftables tables in the current netns whose name contains the instance.

It returns one human-readable line per leaked object ([] means clean), so a test can
`assert not leaked_objects(instance), ...` and print exactly what survived.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tests import kernel_view

# What a check can fail with: a command missing or failing, unreadable /proc, bad JSON.
_CHECK_FAILURES = (OSError, ValueError, subprocess.SubprocessError, kernel_view.KernelViewError)


def leaked_cgroups(instance: str) -> list[str]:
    """Top-most cgroup dirs, in any hierarchy, whose name contains `instance`."""
    found: list[str] = []
    for mount in kernel_view.cgroup_mounts():
        for directory, subdirs, _ in os.walk(mount.path):
            matching = [d for d in subdirs if instance in d]
            found += [f"cgroup dir {Path(directory) / d}" for d in matching]
            # Report the top-most leaked dir only; its children leak with it.
            subdirs[:] = [d for d in subdirs if d not in matching]
    return found


def leaked_processes(instance: str) -> list[str]:
    """Processes whose cgroup path, in any hierarchy, mentions `instance`."""
    found: list[str] = []
    for pid in kernel_view.all_pids():
        lines = [line for line in kernel_view.proc_cgroups(pid) if instance in line]
        if lines and kernel_view.pid_alive(pid):
            found.append(f"process pid {pid} ({_comm(pid)}) in cgroup {lines[0]}")
    return found


def leaked_netns(instance: str) -> list[str]:
    """Network namespaces pinned under /run/netns whose name contains `instance`."""
    return [
        f"netns {kernel_view.NETNS_DIR / name}"
        for name in kernel_view.netns_names()
        if instance in name
    ]


def leaked_links(instance: str) -> list[str]:
    """Links in the current netns whose ownership tag (ifalias) names `instance`."""
    return [
        f"link {link['ifname']} (ifalias {link['ifalias']!r})"
        for link in kernel_view.ip_links()
        if instance in (link.get("ifalias") or "")
    ]


def leaked_nft_tables(instance: str) -> list[str]:
    """nftables tables in the current netns whose name contains `instance`."""
    return [
        f"nftables table {family} {name}"
        for family, name in kernel_view.nft_tables()
        if instance in name
    ]


def leaked_objects(instance: str) -> list[str]:
    """Everything of `instance` still alive, one line each; [] when nothing leaked.

    A check that cannot run (a command failing) is reported as a line too: a leak check
    that could not look has not shown that nothing leaked.
    """
    if not instance or "/" in instance:
        raise ValueError(f"not an instance name: {instance!r}")
    found: list[str] = []
    for check in (
        leaked_cgroups,
        leaked_processes,
        leaked_netns,
        leaked_links,
        leaked_nft_tables,
    ):
        try:
            found += check(instance)
        except _CHECK_FAILURES as exc:
            found.append(f"could not run {check.__name__}: {exc}")
    return found


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return "?"
