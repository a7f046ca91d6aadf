"""The per-environment holder, checked through the kernel's own view (/proc, cgroup files,
`nsenter`, `ss`), never through the driver's claims.

Each test makes the envs it needs (`make_env`: a pinned netns `ip netns add
<instance>-<env>` and a throwaway v1 cgroup, pids + memory) and removes them. The holder
is not our child but the zygote's, so "gone" means: no /proc entry, or a zombie waiting
for the zygote (or init) to reap it. The driver's zygote *is* our child (by design): tests
find it by `driver.zygote_pid` and check that it is reaped and replaced as promised, that
it reaps its holders, and that it steps back out of every env it spawns a holder in.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import pytest

from reconciler.errors import KernelError
from reconciler.kernel import holder, zygote
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


def _stat(pid: int | str) -> list[str]:
    """/proc/PID/stat after the command name: [state, ppid, pgrp, session, ...]."""
    return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()


def _start_time(pid: int) -> int:
    return int(_stat(pid)[19])


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


def _zombie_children(parent: int) -> set[int]:
    """Exited, unreaped children of `parent`, from every /proc/PID/stat."""
    zombies: set[int] = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                state, ppid = _stat(entry.name)[:2]
                if state == "Z" and int(ppid) == parent:
                    zombies.add(int(entry.name))
    return zombies


NS_LINKS = ("net", "uts", "ipc", "mnt", "pid", "pid_for_children")


def _whereabouts(pid: int) -> tuple[dict[str, tuple[int, int]], str, str]:
    """Where a process is: its namespaces (incl. those of its next children), its cgroups
    (/proc/PID/cgroup), its hostname."""
    return (
        {name: _ns(pid, name) for name in NS_LINKS},
        Path(f"/proc/{pid}/cgroup").read_text(),
        _hostname_of(pid),
    )


def _queued_bytes(zygote: int) -> int:
    """Bytes waiting in the zygote's end of its socket (fd 3), as `ss` shows them."""
    inode = os.readlink(f"/proc/{zygote}/fd/3").removeprefix("socket:[").removesuffix("]")
    for line in kernel_view.run(["ss", "-xaHn"]).stdout.splitlines():
        fields = line.split()  # netid state recv-q send-q local inode peer inode
        if len(fields) >= 6 and fields[5] == inode:
            return int(fields[2])
    raise AssertionError(f"ss does not show the zygote's socket {inode}")


# --------------------------------------------------------------------------- fixtures


@dataclass(frozen=True)
class EnvKernel:
    """The kernel objects one holder is attached to."""

    name: str
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
            env=self.name,
            netns_path=self.netns_path,
            hostname=hostname,
            namespaces=namespaces,
            cgroup_procs=self.procs_files,
        )

    def cgroup_pids(self) -> set[int]:
        """Pids in the cgroup, as the cgroup files list them."""
        return kernel_view.pids_in_cgroup_dirs(self.cgroup_dirs)


MakeEnv = Callable[[str], EnvKernel]


@pytest.fixture
def make_env(sandbox: None, instance: str) -> Iterator[MakeEnv]:
    """Make envs (a pinned netns and a pids+memory cgroup each); all removed afterwards,
    with anything inside."""
    made: list[EnvKernel] = []
    tops = [CGROUP_ROOT / c / instance for c in CONTROLLERS]

    def make(name: str) -> EnvKernel:
        netns = f"{instance}-{name}"
        subprocess.run(["ip", "netns", "add", netns], check=True)
        env = EnvKernel(
            name=name,
            netns=netns,
            netns_path=f"/run/netns/{netns}",
            cgroup_dirs=tuple(top / name for top in tops),
        )
        made.append(env)
        for d in env.cgroup_dirs:
            d.mkdir(parents=True)
        return env

    try:
        yield make
    finally:
        # Everything in this test's own cgroups was started by this test: kill it.
        for env in made:
            for pid in env.cgroup_pids():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        for env in made:
            wait_until(partial(_is_empty, env), 5.0, message="cgroup did not empty")
            for d in env.cgroup_dirs:
                # rmdir can race the kernel's release of the last task: retry EBUSY.
                wait_until(partial(_rmdir, d), 5.0, message=f"cannot remove {d}")
            subprocess.run(["ip", "netns", "del", env.netns], check=True)
        for top in tops:
            wait_until(partial(_rmdir, top), 5.0, message=f"cannot remove {top}")


@pytest.fixture
def env_kernel(make_env: MakeEnv) -> EnvKernel:
    """One env, "h1"."""
    return make_env("h1")


def _is_empty(env: EnvKernel) -> bool:
    return not env.cgroup_pids()


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
def driver() -> Iterator[ForkingHolderDriver]:
    """The driver under test (needs catatonit on PATH); its zygote is stopped afterwards."""
    if shutil.which("catatonit") is None:
        unavailable("catatonit is not installed (run hack/setup.sh)")
    with ForkingHolderDriver() as holders:
        yield holders


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


def test_holder_is_the_zygotes_child_in_a_session_of_its_own(
    driver: ForkingHolderDriver, spawned: ProcessRef
) -> None:
    zygote = driver.zygote_pid
    assert zygote is not None
    _, ppid, pgrp, session = _stat(spawned.pid)[:4]
    assert int(ppid) == zygote
    assert int(pgrp) == int(session) == spawned.pid
    assert int(_status(zygote, "PPid")[0]) == os.getpid()


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
    assert _env_proc_nspid(spawned.pid) > 1


def _env_proc_nspid(holder: int) -> int:
    """The pid a process inside the env sees for itself in the env's /proc.

    /proc inside the env is mounted for the env's pid namespace: it shows a process's pid
    there only (one level), and that pid is not 1 (the holder is)."""
    inner = subprocess.run(
        ["nsenter", "-t", str(holder), "-p", "-m", "cat", "/proc/self/status"],
        capture_output=True,
        text=True,
        check=True,
    )
    nspid = next(
        line.split()[1:] for line in inner.stdout.splitlines() if line.startswith("NSpid:")
    )
    assert len(nspid) == 1, nspid
    return int(nspid[0])


def test_holder_is_detached_from_our_stdio_and_fds(spawned: ProcessRef) -> None:
    fd_dir = Path(f"/proc/{spawned.pid}/fd")
    targets = {int(fd.name): os.readlink(fd) for fd in fd_dir.iterdir()}
    for fd in (0, 1, 2):
        assert targets.pop(fd) == "/dev/null"
    # catatonit opens its own signalfd; nothing of ours (pipes, pins, cgroup files) leaks.
    assert all(t.startswith("anon_inode:") for t in targets.values()), targets


def test_holder_starts_clean(spawned: ProcessRef) -> None:
    # An empty environment, no signal ignored (catatonit blocks what it reads through its
    # signalfd, so the mask is its own), and a cwd that pins none of our directories.
    assert Path(f"/proc/{spawned.pid}/environ").read_bytes() == b""
    assert int(_status(spawned.pid, "SigIgn")[0], 16) == 0
    assert os.readlink(f"/proc/{spawned.pid}/cwd") == "/"


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
    driver.start()  # the zygote is our child by design: count it before
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
    assert driver.zygote_pid is not None
    assert _zombie_children(driver.zygote_pid) == set()


def test_exec_failure_in_the_holder_is_reported_and_leaves_nothing(
    env_kernel: EnvKernel, tmp_path: Path
) -> None:
    broken = tmp_path / "catatonit"
    broken.write_bytes(b"\x7fELF not really\n")
    broken.chmod(0o755)
    with (
        ForkingHolderDriver(catatonit=str(broken)) as driver,
        pytest.raises(KernelError, match=r"failed: exec .*catatonit: ENOEXEC"),
    ):
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


# --------------------------------------------------------------------------- batches, zygote


def _hostname_of(pid: int) -> str:
    return subprocess.run(
        ["nsenter", "--target", str(pid), "--uts", "hostname"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()


def test_spawn_many_gives_each_env_its_own_holder(
    driver: ForkingHolderDriver, make_env: MakeEnv
) -> None:
    envs = [make_env(f"m{i}") for i in range(20)]
    results = driver.spawn_many([env.spec(hostname=f"host-{env.name}") for env in envs])
    refs = [r for r in results if isinstance(r, ProcessRef)]
    assert len(refs) == len(envs), results
    own_levels = len(_status(os.getpid(), "NSpid"))
    try:
        assert len({_ns(ref.pid, "pid") for ref in refs}) == len(refs)
        for env, ref in zip(envs, refs, strict=True):
            assert _start_time(ref.pid) == ref.start_time
            nspid = _status(ref.pid, "NSpid")
            assert (len(nspid), nspid[-1]) == (own_levels + 1, "1")
            pin = os.stat(env.netns_path)
            assert _ns(ref.pid, "net") == (pin.st_dev, pin.st_ino)
            for procs in env.procs_files:
                assert ref.pid in {int(p) for p in Path(procs).read_text().split()}
            assert _hostname_of(ref.pid) == f"host-{env.name}"
            assert int(_status(ref.pid, "PPid")[0]) == driver.zygote_pid
            assert ref.pid not in _children()
    finally:
        assert driver.stop_many(refs) == [None] * len(refs)
    for ref in refs:
        assert _gone(ref.pid, ref.start_time)


def test_spawn_many_one_failing_env_fails_alone(
    driver: ForkingHolderDriver, make_env: MakeEnv, tmp_path: Path
) -> None:
    envs = [make_env(f"f{i}") for i in range(4)]
    not_a_netns = tmp_path / "plain-file"
    not_a_netns.write_text("")
    specs = [env.spec() for env in envs]
    # Fails in the driver (opening the pin) and in the chain (setns), respectively.
    specs.insert(1, replace(envs[1].spec(), env="nopin", netns_path="/run/netns/rt-absent"))
    specs.insert(3, replace(envs[2].spec(), env="notns", netns_path=str(not_a_netns)))
    results = driver.spawn_many(specs)
    try:
        assert isinstance(results[1], KernelError)
        assert re.fullmatch(
            r"holder for env nopin failed: open netns /run/netns/rt-absent: ENOENT \(.*\)",
            str(results[1]),
        )
        assert isinstance(results[3], KernelError)
        assert re.fullmatch(
            r"holder for env notns failed: setns .*plain-file: EINVAL \(.*\)", str(results[3])
        )
        ok = [results[i] for i in (0, 2, 4, 5)]
        assert all(isinstance(r, ProcessRef) and driver.alive(r) for r in ok), results
        # The failed setns came before any cgroup was joined: nothing else is in there.
        assert {r.pid for r in ok if isinstance(r, ProcessRef)} == set().union(
            *(env.cgroup_pids() for env in envs)
        )
    finally:
        driver.stop_many([r for r in results if isinstance(r, ProcessRef)])


def test_a_cgroup_file_outside_any_cgroup_hierarchy_is_refused(
    driver: ForkingHolderDriver, env_kernel: EnvKernel, tmp_path: Path
) -> None:
    # The zygote joins the env's cgroups itself; it only joins what it can leave again.
    driver.start()
    zygote = driver.zygote_pid
    assert zygote is not None
    home = _whereabouts(zygote)
    fake = tmp_path / "cgroup.procs"
    fake.write_text("")
    spec = replace(env_kernel.spec(), cgroup_procs=(*env_kernel.procs_files, str(fake)))
    with pytest.raises(
        KernelError,
        match=r"^holder for env h1 failed: join cgroup .*/cgroup.procs: not a cgroup.procs "
        "file of a hierarchy the holder zygote is in",
    ):
        driver.spawn(spec)
    assert fake.read_text() == ""
    assert env_kernel.cgroup_pids() == set()
    assert _whereabouts(zygote) == home


def test_a_hung_zygote_is_killed_and_replaced(env_kernel: EnvKernel) -> None:
    with ForkingHolderDriver(spawn_timeout=0.5) as driver:
        driver.start()
        zygote = driver.zygote_pid
        assert zygote is not None
        os.kill(zygote, signal.SIGSTOP)  # our own unreaped child: certainly the zygote
        with pytest.raises(
            KernelError,
            match=rf"^holder for env h1 failed: the holder zygote \(pid {zygote}\) did not "
            r"answer within 0.5s and was killed \(was killed by signal 9\); the next spawn "
            "starts a new one$",
        ):
            driver.spawn(env_kernel.spec())
        assert zygote not in _children()  # killed and reaped
        ref = driver.spawn(env_kernel.spec())
        assert driver.zygote_pid not in (None, zygote)
        driver.stop(ref)


def test_a_dead_zygote_fails_its_requests_and_is_restarted(
    driver: ForkingHolderDriver, env_kernel: EnvKernel
) -> None:
    driver.start()
    zygote = driver.zygote_pid
    assert zygote is not None
    # Stopped, it cannot take the request: it waits in its socket until the zygote dies.
    os.kill(zygote, signal.SIGSTOP)  # our own unreaped child: certainly the zygote
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(driver.spawn_many, [env_kernel.spec()])
        wait_until(lambda: _queued_bytes(zygote) > 0, 5.0, message="the request was not sent")
        os.kill(zygote, signal.SIGKILL)
        [result] = pending.result(timeout=10)
    assert isinstance(result, KernelError)
    assert re.fullmatch(
        rf"holder for env h1 failed: the holder zygote \(pid {zygote}\) was killed by "
        r"signal 9; the next spawn starts a new one",
        str(result),
    )
    assert zygote not in _children()
    assert env_kernel.cgroup_pids() == set()
    ref = driver.spawn(env_kernel.spec())
    assert driver.zygote_pid not in (None, zygote)
    driver.stop(ref)


def test_a_zygote_killed_between_spawns_is_replaced(
    driver: ForkingHolderDriver, env_kernel: EnvKernel
) -> None:
    driver.stop(driver.spawn(env_kernel.spec()))
    zygote = driver.zygote_pid
    assert zygote is not None
    os.kill(zygote, signal.SIGKILL)  # our own unreaped child: certainly the zygote
    wait_until(lambda: not kernel_view.pid_alive(zygote), 5.0, message="zygote still runs")
    ref = driver.spawn(env_kernel.spec())
    try:
        assert driver.zygote_pid not in (None, zygote)
        assert zygote not in _children()  # the dead one was reaped
        assert driver.alive(ref)
    finally:
        driver.stop(ref)


def test_close_stops_and_reaps_the_zygote(env_kernel: EnvKernel) -> None:
    with ForkingHolderDriver() as driver:
        assert driver.zygote_pid is None  # started lazily
        driver.stop(driver.spawn(env_kernel.spec()))
        zygote = driver.zygote_pid
        assert zygote is not None
        zygote_start = _start_time(zygote)
        assert zygote in _children()
        driver.close()
        assert driver.zygote_pid is None
        assert _gone(zygote, zygote_start)
        assert not Path(f"/proc/{zygote}").exists() or _start_time(zygote) != zygote_start
        driver.close()  # idempotent
    assert driver.zygote_pid is None


def test_the_zygote_does_not_outlive_its_controller(env_kernel: EnvKernel) -> None:
    # A controller that spawns a holder and dies without closing anything.
    script = (
        "import os, sys\n"
        "from reconciler.kernel.holder import ForkingHolderDriver\n"
        "from reconciler.kernel.types import HolderSpec\n"
        "driver = ForkingHolderDriver()\n"
        f"ref = driver.spawn(HolderSpec(env='h1', netns_path={env_kernel.netns_path!r},"
        f" hostname='x', namespaces=frozenset({sorted(ALL_NAMESPACES)!r}),"
        f" cgroup_procs={env_kernel.procs_files!r}))\n"
        "print(driver.zygote_pid, ref.pid, ref.start_time, flush=True)\n"
        "os._exit(0)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=30
    ).stdout.split()
    zygote, holder = int(out[0]), ProcessRef(pid=int(out[1]), start_time=int(out[2]))
    with ForkingHolderDriver() as driver:
        try:
            assert driver.alive(holder), "the holder outlives its controller"
            wait_until(
                lambda: not kernel_view.pid_alive(zygote), 5.0, message="the zygote lives on"
            )
        finally:
            driver.stop(holder)


def test_stop_many_kills_every_holder_and_spares_impostors(
    driver: ForkingHolderDriver, env_kernel: EnvKernel
) -> None:
    results = driver.spawn_many([env_kernel.spec() for _ in range(8)])
    refs = [r for r in results if isinstance(r, ProcessRef)]
    assert len(refs) == 8, results
    sleeper = subprocess.Popen(["sleep", "600"], stdin=subprocess.DEVNULL)
    try:
        impostor = ProcessRef(pid=sleeper.pid, start_time=_start_time(sleeper.pid) + 1)
        dead = refs[0]
        driver.stop(dead)
        assert driver.stop_many([*refs, impostor, dead]) == [None] * (len(refs) + 2)
        for ref in refs:
            assert _gone(ref.pid, ref.start_time)
        assert env_kernel.cgroup_pids() == set()
        assert sleeper.poll() is None
    finally:
        sleeper.kill()
        sleeper.wait()


def test_spawn_many_of_nothing_starts_nothing(driver: ForkingHolderDriver) -> None:
    assert driver.spawn_many([]) == []
    assert driver.stop_many([]) == []
    assert driver.zygote_pid is None


# --------------------------------------------------------------------------- the zygote steps back


def test_consecutive_pid_namespaces_are_never_nested(
    driver: ForkingHolderDriver, make_env: MakeEnv, tmp_path: Path
) -> None:
    # Each new pid ns is a child of ours, whatever came before it: a holder, a net-only
    # holder (no new pid ns), a request that failed after its unshare (exec), and again.
    envs = [make_env(f"n{i}") for i in range(4)]
    net_only = frozenset({"net"})
    specs = [envs[0].spec(), envs[1].spec(namespaces=net_only), envs[2].spec(), envs[3].spec()]
    first = driver.spawn_many(specs)
    broken = tmp_path / "catatonit"
    broken.write_bytes(b"#!/nonexistent/interpreter\n")
    broken.chmod(0o755)
    with ForkingHolderDriver(catatonit=str(broken)) as failing:
        [failed] = failing.spawn_many([envs[0].spec()])
    last = driver.spawn_many([envs[0].spec(), envs[1].spec()])
    refs = [r for r in (*first, *last) if isinstance(r, ProcessRef)]
    assert len(refs) == len(specs) + len(last), (first, last)
    assert isinstance(failed, KernelError)
    own = _status(os.getpid(), "NSpid")
    try:
        for ref, spec in zip(refs, (*specs, envs[0].spec(), envs[1].spec()), strict=True):
            nspid = _status(ref.pid, "NSpid")
            if "pid" in spec.namespaces:
                assert (len(nspid), nspid[-1]) == (len(own) + 1, "1"), nspid
            else:
                assert len(nspid) == len(own)
                assert _ns(ref.pid, "pid") == _ns("self", "pid")
    finally:
        driver.stop_many(refs)


def test_the_zygote_is_back_home_after_a_batch(
    driver: ForkingHolderDriver, make_env: MakeEnv, tmp_path: Path
) -> None:
    envs = [make_env(f"b{i}") for i in range(3)]
    driver.start()
    zygote = driver.zygote_pid
    assert zygote is not None
    home = _whereabouts(zygote)
    not_a_netns = tmp_path / "plain-file"
    not_a_netns.write_text("")
    specs = [
        envs[0].spec(hostname="b0"),
        envs[1].spec(namespaces=frozenset({"net"})),
        envs[2].spec(namespaces=frozenset({"net", "uts", "mnt"}), hostname="b2"),
        replace(envs[0].spec(), env="notns", netns_path=str(not_a_netns)),
        envs[0].spec(namespaces=frozenset({"net", "pid", "ipc"})),
    ]
    results = driver.spawn_many(specs)
    refs = [r for r in results if isinstance(r, ProcessRef)]
    try:
        assert len(refs) == 4 and isinstance(results[3], KernelError), results
        assert _whereabouts(zygote) == home
        assert zygote not in set().union(*(env.cgroup_pids() for env in envs))
        assert {r.pid for r in refs} == set().union(*(env.cgroup_pids() for env in envs))
    finally:
        driver.stop_many(refs)


def test_the_zygote_reaps_holders_that_exit(driver: ForkingHolderDriver, make_env: MakeEnv) -> None:
    envs = [make_env(f"r{i}") for i in range(6)]
    results = driver.spawn_many([env.spec() for env in envs])
    refs = [r for r in results if isinstance(r, ProcessRef)]
    assert len(refs) == len(envs), results
    zygote = driver.zygote_pid
    assert zygote is not None
    assert {int(_status(r.pid, "PPid")[0]) for r in refs} == {zygote}
    # Killed from outside (not by the driver), one by one, while the zygote idles.
    for ref in refs[:3]:
        os.kill(ref.pid, signal.SIGKILL)  # its parent has not reaped it: it is the holder
    wait_until(lambda: all(_gone(r.pid, r.start_time) for r in refs[:3]), 5.0, message="alive")
    wait_until(lambda: not _zombie_children(zygote), 5.0, message="zombie holders")
    assert driver.stop_many(refs[3:]) == [None] * 3
    wait_until(lambda: not _zombie_children(zygote), 5.0, message="zombie holders")
    assert zygote in _children()


def test_holders_outlive_the_zygote(env_kernel: EnvKernel) -> None:
    with ForkingHolderDriver() as driver:
        ref = driver.spawn(env_kernel.spec())
        zygote = driver.zygote_pid
        assert zygote is not None
        driver.close()
        try:
            assert driver.alive(ref)
            assert int(_status(ref.pid, "PPid")[0]) not in (zygote, os.getpid())
        finally:
            driver.stop(ref)


def test_proc_mounted_by_a_helper_where_the_kernel_lacks_pidns(
    monkeypatch: pytest.MonkeyPatch, env_kernel: EnvKernel
) -> None:
    # The fallback for kernels without proc's `pidns=` (before 6.17): mount(8), born in
    # the env's pid namespace, mounts it. Forced here: this kernel may well have pidns=.
    monkeypatch.setattr(holder, "_ZYGOTE_OPTIONS", (zygote.OPTION_PROC_BY_HELPER,))
    with ForkingHolderDriver() as driver:
        ref = driver.spawn(env_kernel.spec())
        try:
            assert _env_proc_nspid(ref.pid) > 1
            assert env_kernel.cgroup_pids() == {ref.pid}  # the helper is gone
            assert driver.zygote_pid is not None
            assert _zombie_children(driver.zygote_pid) == set()
        finally:
            driver.stop(ref)
