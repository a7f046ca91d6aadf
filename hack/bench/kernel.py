"""Kernel chores shared by every approach: cgroup v1 trees, `ip`, and the leak check.

Everything here is the benchmark's own view of the kernel, independent of the product's
code, so it can both build the hand-rolled baselines and judge what the product leaves
behind. Names: every object of one benchmark run contains the run's tag (`bn` + 6 hex),
which is how cleanup and the leak check find them and nothing else. The sandbox gives
us a private network namespace (so every link in it but `lo` is ours), but cgroups are
the host's: only directories whose name contains the tag are ever created or removed.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from hack.bench import rtnl

# The limits every approach sets, equal to the manifests' `memory: 64Mi, cpu: 500m, pids: 128`.
MEMORY_BYTES = 64 * 1024 * 1024
CPU_QUOTA_US = 50_000  # of the default 100 000 us period: half a CPU
PIDS_MAX = 128
LIMIT_FILES = {
    "memory": (("memory.limit_in_bytes", str(MEMORY_BYTES)),),
    "cpu": (("cpu.cfs_quota_us", str(CPU_QUOTA_US)),),
    "pids": (("pids.max", str(PIDS_MAX)),),
}
# What an observer reads per env: the limits, and the period the quota is relative to.
OBSERVED_FILES = {
    "memory": ("memory.limit_in_bytes",),
    "cpu": ("cpu.cfs_quota_us", "cpu.cfs_period_us"),
    "pids": ("pids.max",),
}


class BenchError(RuntimeError):
    """A step of the benchmark failed; the message says which and why."""


def cgroup_mounts() -> dict[str, str]:
    """Mount point of every cgroup hierarchy: v1 controller name (or "unified") -> path."""
    mounts: dict[str, str] = {}
    with open("/proc/self/mountinfo") as handle:
        for line in handle:
            left, _, right = line.partition(" - ")
            fstype, _, options = [*right.split(), "", "", ""][:3]
            mount_point = left.split()[4].replace("\\040", " ")
            if fstype == "cgroup2":
                mounts.setdefault("unified", mount_point)
            elif fstype == "cgroup":
                for option in options.split(","):
                    mounts.setdefault(option, mount_point)
    return mounts


@dataclass(frozen=True)
class CgroupTree:
    """A parent cgroup `<mount>/<parent>/` per limited v1 controller, one child per env."""

    parent: str
    mounts: tuple[tuple[str, str], ...]  # (controller, mount point)

    @classmethod
    def v1(cls, parent: str) -> CgroupTree:
        """The tree for `parent` on this host's v1 (or hybrid) hierarchies."""
        found = cgroup_mounts()
        missing = [c for c in LIMIT_FILES if c not in found]
        if missing:
            raise BenchError(
                f"no cgroup v1 hierarchy for {', '.join(missing)}: the baselines write v1 "
                "limit files (memory.limit_in_bytes, cpu.cfs_quota_us, pids.max)"
            )
        return cls(parent=parent, mounts=tuple((c, found[c]) for c in LIMIT_FILES))

    def create_parent(self) -> None:
        """mkdir the parent in every hierarchy."""
        for _, mount in self.mounts:
            os.mkdir(f"{mount}/{self.parent}")

    def create_env(self, env: str) -> None:
        """mkdir the env's cgroups and write its three limits."""
        for controller, mount in self.mounts:
            directory = f"{mount}/{self.parent}/{env}"
            os.mkdir(directory)
            for name, value in LIMIT_FILES[controller]:
                with open(f"{directory}/{name}", "w") as handle:
                    handle.write(value)

    def remove_env(self, env: str) -> None:
        """rmdir the env's cgroups (they hold no process)."""
        for _, mount in self.mounts:
            os.rmdir(f"{mount}/{self.parent}/{env}")

    def remove_parent(self) -> None:
        """rmdir the parent in every hierarchy."""
        for _, mount in self.mounts:
            os.rmdir(f"{mount}/{self.parent}")


def read_limits(parent: str, envs: Sequence[str], mounts: dict[str, str]) -> int:
    """Read every env's limit files under `<mount>/<parent>/<env>`; returns files read."""
    count = 0
    for env in envs:
        for controller, names in OBSERVED_FILES.items():
            for name in names:
                with open(f"{mounts[controller]}/{parent}/{env}/{name}") as handle:
                    handle.read()
                count += 1
    return count


def ip_batch(commands: Sequence[str], *, netns: str | None = None) -> None:
    """Run `ip [-n NETNS] -batch -` with one command per line; raise on failure."""
    argv = ["ip", *(["-n", netns] if netns else []), "-batch", "-"]
    done = subprocess.run(
        argv, input="\n".join(commands) + "\n", capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise BenchError(f"{' '.join(argv)} failed: {done.stderr.strip()[:300]}")


def run_checked(argv: Sequence[str], *, stdin: str | None = None, what: str) -> str:
    """Run a command; its stdout, or BenchError with its stderr."""
    done = subprocess.run(argv, input=stdin, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        detail = (done.stderr or done.stdout).strip()[:400]
        raise BenchError(f"{what} failed (exit {done.returncode}): {detail}")
    return done.stdout


# --------------------------------------------------------------------------- leaks


def _pins(tag: str) -> list[str]:
    try:
        return sorted(n for n in os.listdir(rtnl.NETNS_DIR) if tag in n)
    except FileNotFoundError:
        return []


def _cgroup_dirs(tag: str) -> list[str]:
    found = []
    for mount in sorted(set(cgroup_mounts().values())):
        try:
            found += [f"{mount}/{d}" for d in os.listdir(mount) if tag in d]
        except OSError:
            continue
    return found


def _processes(tag: str) -> list[str]:
    found = []
    for pid in (p for p in os.listdir("/proc") if p.isdigit()):
        try:
            with open(f"/proc/{pid}/cgroup") as handle:
                if tag in handle.read():
                    found.append(f"process {pid}")
        except OSError:  # gone meanwhile
            continue
    return found


def _nft_tables(tag: str) -> list[str]:
    done = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True, check=False)
    return [f"nft {line.strip()}" for line in done.stdout.splitlines() if tag in line]


def leftovers(tag: str) -> list[str]:
    """Everything of this run still in the kernel: pins, links, cgroups, processes, nft.

    Links: the sandbox's namespace is private, so any link but `lo` is ours (and a leak).
    """
    with rtnl.host_socket() as sock:
        links = [f"link {name}" for name in rtnl.links(sock) if name != "lo"]
    return (
        [f"netns pin {p}" for p in _pins(tag)]
        + links
        + _cgroup_dirs(tag)
        + _processes(tag)
        + _nft_tables(tag)
    )


def host_links_gone() -> bool:
    """True when the sandbox has no link but `lo` (async veth teardown finished)."""
    with rtnl.host_socket() as sock:
        return set(rtnl.links(sock)) <= {"lo"}


def wait_until(predicate: Callable[[], bool], *, timeout: float, what: str) -> float:
    """Poll `predicate` (1 ms apart) until true; returns when (perf_counter), or BenchError."""
    deadline = time.perf_counter() + timeout
    while True:
        if predicate():
            return time.perf_counter()
        if time.perf_counter() > deadline:
            raise BenchError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.001)


def force_cleanup(tag: str) -> list[str]:
    """Best effort after a failed trial: unpin, delete links, rmdir empty cgroups of `tag`.

    Returns what could not be removed. Never kills anything: a process left in one of our
    cgroups is reported, not touched (the product's own `destroy` is tried first).
    """
    for pin in _pins(tag):
        subprocess.run(["ip", "netns", "delete", pin], capture_output=True, check=False)
    with rtnl.host_socket() as sock:
        names = [n for n in rtnl.links(sock) if n != "lo"]
    for name in names:
        subprocess.run(["ip", "link", "delete", name], capture_output=True, check=False)
    for top in _cgroup_dirs(tag):
        for directory, _, _ in sorted(os.walk(top), key=lambda w: -w[0].count("/")):
            try:
                os.rmdir(directory)
            except OSError:
                continue
    with contextlib.suppress(BenchError):  # what is still there is reported below
        wait_until(host_links_gone, timeout=10, what="links to go")
    return leftovers(tag)
