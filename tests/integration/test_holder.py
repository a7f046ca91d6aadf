"""The per-environment holder, checked through the kernel's own view (/proc, cgroup files,
`nsenter`), never through the driver's claims.

Each test gets a pinned netns (`ip netns add <instance>-h1`) and a throwaway v1 cgroup
(pids + memory) of its own, and removes both. The holder is not our child, so "gone"
means: no /proc entry, or a zombie waiting for init to reap it.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import socket
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pytest

from reconciler.errors import KernelError
from reconciler.kernel.holder import ForkingHolderDriver
from reconciler.kernel.types import HolderSpec, ProcessRef
from tests import kernel_view
from tests.gates import unavailable
from tests.kernel_view import wait_until

ALL_NAMESPACES = frozenset({"net", "uts", "ipc", "mnt", "pid"})
CGROUP_ROOT = Path("/sys/fs/cgroup")
CONTROLLERS = ("pids", "memory")


# --------------------------------------------------------------------------- /proc, read directly


def _status(pid: int, key: str) -> list[str]:
    """The fields of one line of /proc/PID/status ("NSpid", "PPid", ...)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name == key:
            return value.split()
    raise AssertionError(f"/proc/{pid}/status has no {key} line")


def _start_time(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[19])


def _ns(pid: int | str, name: str) -> tuple[int, int]:
    st = os.stat(f"/proc/{pid}/ns/{name}")
    return st.st_dev, st.st_ino


def _gone(pid: int, start_time: int) -> bool:
    """No process with this identity is running (absent, reused, or a zombie)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return True
    fields = stat.rpartition(")")[2].split()
    return fields[0] in ("Z", "X") or int(fields[19]) != start_time


def _children() -> set[int]:
    """Every live child of this process (all threads)."""
    pids: set[int] = set()
    for task in Path("/proc/self/task").iterdir():
        pids.update(int(p) for p in (task / "children").read_text().split())
    return {p for p in pids if kernel_view.pid_alive(p)}


# --------------------------------------------------------------------------- fixtures


@dataclass(frozen=True)
class EnvKernel:
    """The kernel objects one holder is attached to."""

    netns: str
    netns_path: str
    cgroup_dirs: tuple[Path, ...]

    @property
    def procs_files(self) -> tuple[str, ...]:
        """The cgroup.procs files the holder must join."""
        return tuple(str(d / "cgroup.procs") for d in self.cgroup_dirs)

    def spec(
        self, *, hostname: str = "envhost", namespaces: frozenset[str] = ALL_NAMESPACES
    ) -> HolderSpec:
        """The holder spec for this env, all namespaces by default."""
        return HolderSpec(
            env="h1",
            netns_path=self.netns_path,
            hostname=hostname,
            namespaces=namespaces,
            cgroup_procs=self.procs_files,
        )

    def cgroup_pids(self) -> set[int]:
        """Pids in the cgroup, as the cgroup files list them."""
        return kernel_view.pids_in_cgroup_dirs(self.cgroup_dirs)


@pytest.fixture
def env_kernel(sandbox: None, instance: str) -> Iterator[EnvKernel]:
    """A pinned netns and a pids+memory cgroup, removed (with anything inside) afterwards."""
    netns = f"{instance}-h1"
    subprocess.run(["ip", "netns", "add", netns], check=True)
    tops = [CGROUP_ROOT / c / instance for c in CONTROLLERS]
    dirs = tuple(top / "h1" for top in tops)
    try:
        for d in dirs:
            d.mkdir(parents=True)
        yield EnvKernel(netns=netns, netns_path=f"/run/netns/{netns}", cgroup_dirs=dirs)
    finally:
        env = EnvKernel(netns=netns, netns_path="", cgroup_dirs=dirs)
        # Everything in this test's own cgroup was started by this test: kill it.
        for pid in env.cgroup_pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        wait_until(lambda: not env.cgroup_pids(), 5.0, message="cgroup did not empty")
        for d in [*dirs, *tops]:
            # rmdir can race the kernel's release of the last task: retry EBUSY.
            wait_until(partial(_rmdir, d), 5.0, message=f"cannot remove {d}")
        subprocess.run(["ip", "netns", "del", netns], check=True)


def _rmdir(path: Path) -> bool:
    try:
        path.rmdir()
    except FileNotFoundError:
        pass
    except OSError as e:
        if e.errno == errno.EBUSY:
            return False
        raise
    return True


@pytest.fixture
def driver() -> ForkingHolderDriver:
    """The driver under test (needs catatonit on PATH)."""
    if shutil.which("catatonit") is None:
        unavailable("catatonit is not installed (run hack/setup.sh)")
    return ForkingHolderDriver()


@pytest.fixture
def spawned(driver: ForkingHolderDriver, env_kernel: EnvKernel) -> Iterator[ProcessRef]:
    """A holder with every namespace, stopped at the end (the cgroup cleanup backs it up)."""
    ref = driver.spawn(env_kernel.spec())
    yield ref
    driver.stop(ref)


# --------------------------------------------------------------------------- tests


def test_holder_joins_the_pinned_netns_and_owns_new_namespaces(
    spawned: ProcessRef, env_kernel: EnvKernel
) -> None:
    pid = spawned.pid
    assert _start_time(pid) == spawned.start_time
    pin = os.stat(env_kernel.netns_path)
    assert (pin.st_dev, pin.st_ino) == _ns(pid, "net")
    for name in ("uts", "ipc", "mnt", "pid"):
        assert _ns(pid, name) != _ns("self", name), f"{name} namespace is the test's own"
    assert os.readlink(f"/proc/{pid}/exe") == os.path.realpath(shutil.which("catatonit") or "")


def test_holder_is_pid_1_of_its_pid_namespace_and_not_our_child(spawned: ProcessRef) -> None:
    own_levels = len(_status(os.getpid(), "NSpid"))
    nspid = _status(spawned.pid, "NSpid")
    assert len(nspid) == own_levels + 1
    assert nspid[-1] == "1"
    assert int(_status(spawned.pid, "PPid")[0]) != os.getpid()
    assert spawned.pid not in _children()


def test_holder_is_in_the_cgroup_before_anything_else(
    spawned: ProcessRef, env_kernel: EnvKernel
) -> None:
    for d in env_kernel.cgroup_dirs:
        assert spawned.pid in {int(p) for p in (d / "cgroup.procs").read_text().split()}


def test_holder_has_env_hostname_and_own_proc(spawned: ProcessRef) -> None:
    host_before = socket.gethostname()
    pid = str(spawned.pid)
    uts = subprocess.run(
        ["nsenter", "--target", pid, "--uts", "hostname"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert uts.stdout.strip() == "envhost"
    assert socket.gethostname() == host_before
    # /proc inside the env is mounted for the env's pid namespace: it shows a process's
    # pid there only (one level), and that pid is not 1 (the holder is).
    inner = subprocess.run(
        ["nsenter", "-t", pid, "-p", "-m", "cat", "/proc/self/status"],
        capture_output=True,
        text=True,
        check=True,
    )
    nspid = next(
        line.split()[1:] for line in inner.stdout.splitlines() if line.startswith("NSpid:")
    )
    assert len(nspid) == 1
    assert int(nspid[-1]) > 1


def test_holder_is_detached_from_our_stdio_and_fds(spawned: ProcessRef) -> None:
    fd_dir = Path(f"/proc/{spawned.pid}/fd")
    targets = {int(fd.name): os.readlink(fd) for fd in fd_dir.iterdir()}
    for fd in (0, 1, 2):
        assert targets.pop(fd) == "/dev/null"
    # catatonit opens its own signalfd; nothing of ours (pipes, pins, cgroup files) leaks.
    assert all(t.startswith("anon_inode:") for t in targets.values()), targets


def test_alive_and_holder_namespaces(driver: ForkingHolderDriver, spawned: ProcessRef) -> None:
    assert driver.alive(spawned)
    seen = driver.holder_namespaces(spawned)
    assert seen == {name: _ns(spawned.pid, name) for name in ALL_NAMESPACES}


def test_stop_kills_the_holder_and_its_whole_pid_namespace(
    driver: ForkingHolderDriver, env_kernel: EnvKernel
) -> None:
    ref = driver.spawn(env_kernel.spec())
    # A workload in the env's pid namespace (nsenter forks it there; nsenter is our child).
    entry = subprocess.Popen(
        ["nsenter", "-t", str(ref.pid), "-p", "-m", "-u", "-i", "-n", "sleep", "600"],
        stdin=subprocess.DEVNULL,
    )
    try:
        workload = wait_until(
            lambda: [
                int(p)
                for p in Path(f"/proc/{entry.pid}/task/{entry.pid}/children").read_text().split()
            ],
            5.0,
            message="nsenter did not start its child",
        )[0]
        assert _status(workload, "NSpid")[-1] != "1"
        workload_start = _start_time(workload)

        driver.stop(ref)

        wait_until(lambda: _gone(ref.pid, ref.start_time), 5.0, message="holder still runs")
        assert _gone(workload, workload_start), "the env's workload survived its pid 1"
        assert not driver.alive(ref)
        assert driver.holder_namespaces(ref) == {}
        assert entry.wait(timeout=5) != 0
    finally:
        if entry.poll() is None:
            entry.kill()
            entry.wait()


def test_concurrent_spawns_from_threads_each_get_their_own_holder(
    driver: ForkingHolderDriver, env_kernel: EnvKernel
) -> None:
    # The controller forks from several threads at once: each fork inherits the others'
    # report pipes for a moment, which must neither hang nor mix up the reports.
    with ThreadPoolExecutor(max_workers=6) as pool:
        refs = list(pool.map(lambda _: driver.spawn(env_kernel.spec()), range(6)))
    try:
        assert len({ref.pid for ref in refs}) == len(refs)
        assert len({_ns(ref.pid, "pid") for ref in refs}) == len(refs)
        for ref in refs:
            assert _status(ref.pid, "NSpid")[-1] == "1"
            assert _start_time(ref.pid) == ref.start_time
        assert {ref.pid for ref in refs} <= env_kernel.cgroup_pids()
    finally:
        for ref in refs:
            driver.stop(ref)
    for ref in refs:
        wait_until(partial(_gone, ref.pid, ref.start_time), 5.0, message="holder still runs")


def test_stop_on_a_dead_ref_is_a_noop(driver: ForkingHolderDriver, env_kernel: EnvKernel) -> None:
    ref = driver.spawn(env_kernel.spec())
    driver.stop(ref)
    wait_until(lambda: _gone(ref.pid, ref.start_time), 5.0, message="holder still runs")
    driver.stop(ref)
    driver.stop(ref, timeout=0.0)
    assert not driver.alive(ref)


def test_stop_refuses_a_ref_whose_start_time_differs(driver: ForkingHolderDriver) -> None:
    sleeper = subprocess.Popen(["sleep", "600"], stdin=subprocess.DEVNULL)
    try:
        real = ProcessRef(pid=sleeper.pid, start_time=_start_time(sleeper.pid))
        impostor = ProcessRef(pid=sleeper.pid, start_time=real.start_time + 1)
        assert not driver.alive(impostor)
        driver.stop(impostor)
        assert sleeper.poll() is None
        assert not _gone(real.pid, real.start_time)
    finally:
        sleeper.kill()
        sleeper.wait()


def test_without_uts_the_hostname_is_never_touched(
    driver: ForkingHolderDriver, env_kernel: EnvKernel
) -> None:
    host_before = socket.gethostname()
    ref = driver.spawn(env_kernel.spec(hostname="not-the-host", namespaces=frozenset({"net"})))
    try:
        assert socket.gethostname() == host_before
        for name in ("uts", "ipc", "mnt", "pid"):
            assert _ns(ref.pid, name) == _ns("self", name)
        pin = os.stat(env_kernel.netns_path)
        assert _ns(ref.pid, "net") == (pin.st_dev, pin.st_ino)
    finally:
        driver.stop(ref)
        if socket.gethostname() != host_before:  # never leave the host renamed
            socket.sethostname(host_before)


def test_missing_netns_is_a_clear_error_and_forks_nothing(
    driver: ForkingHolderDriver, env_kernel: EnvKernel
) -> None:
    before = _children()
    spec = HolderSpec(
        env="h1",
        netns_path=f"/run/netns/{env_kernel.netns}-missing",
        hostname="envhost",
        namespaces=ALL_NAMESPACES,
        cgroup_procs=env_kernel.procs_files,
    )
    with pytest.raises(KernelError, match=r"holder for env h1 failed: open netns .*ENOENT"):
        driver.spawn(spec)
    assert _children() == before
    assert env_kernel.cgroup_pids() == set()


def test_a_pin_that_is_not_a_netns_fails_in_setns_and_leaks_nothing(
    driver: ForkingHolderDriver, env_kernel: EnvKernel, tmp_path: Path
) -> None:
    not_a_netns = tmp_path / "plain-file"
    not_a_netns.write_text("")
    before = _children()
    spec = HolderSpec(
        env="h1",
        netns_path=str(not_a_netns),
        hostname="envhost",
        namespaces=ALL_NAMESPACES,
        cgroup_procs=env_kernel.procs_files,
    )
    with pytest.raises(KernelError, match=r"holder for env h1 failed: setns .*: EINVAL"):
        driver.spawn(spec)
    assert _children() == before
    assert env_kernel.cgroup_pids() == set()


def test_exec_failure_in_the_holder_is_reported_and_leaves_nothing(
    env_kernel: EnvKernel, tmp_path: Path
) -> None:
    broken = tmp_path / "catatonit"
    broken.write_bytes(b"\x7fELF not really\n")
    broken.chmod(0o755)
    driver = ForkingHolderDriver(catatonit=str(broken))
    with pytest.raises(KernelError, match=r"failed: exec .*catatonit: ENOEXEC"):
        driver.spawn(env_kernel.spec())
    # The holder had joined the cgroup before failing: it must be gone from there too.
    wait_until(lambda: env_kernel.cgroup_pids() == set(), 5.0, message="a holder leaked")


def test_missing_catatonit_is_a_clear_error() -> None:
    with pytest.raises(KernelError, match="catatonit not found at /nonexistent/catatonit; run"):
        ForkingHolderDriver(catatonit="/nonexistent/catatonit")


def test_unknown_namespace_is_refused_before_forking(driver: ForkingHolderDriver) -> None:
    spec = HolderSpec(
        env="h1",
        netns_path="/run/netns/unused",
        hostname="x",
        namespaces=frozenset({"net", "user"}),
        cgroup_procs=(),
    )
    with pytest.raises(KernelError, match=r"unknown namespaces \['user'\]"):
        driver.spawn(spec)
