"""Workloads inside an environment, and the env's private mounts, checked through /proc.

Each test builds an environment without the engine: a pinned netns (`ip netns add`), the
env's cgroup (the real cgroup driver: v1 controllers plus the unified tree on this host)
and a holder (catatonit, pid 1 of the env's pid namespace). Workloads are `python3 -c`
or `sh -c` one-liners; what they are is read from /proc/PID/{ns,cgroup,status,environ,
cwd}, /proc/PID/mountinfo and the log file, never from the driver's claims.

Teardown removes the holder (its death empties the pid namespace), the cgroup and the
netns, then asserts that nothing carrying the test's instance name is left.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import pytest

from reconciler.errors import KernelError
from reconciler.kernel.cgroups import open_cgroup_driver
from reconciler.kernel.holder import ForkingHolderDriver
from reconciler.kernel.mounts import MountSpec, apply_mounts
from reconciler.kernel.processes import PROCESS_ENV_VAR, ForkingProcessDriver
from reconciler.kernel.types import CgroupDriver, CgroupLimits, HolderSpec, ProcessRef
from tests import kernel_view
from tests.gates import unavailable
from tests.kernel_view import wait_until
from tests.leaks import leaked_objects

NAMESPACES = ("net", "uts", "ipc", "mnt", "pid")
HOSTNAME = "e1host"
NOBODY = 65534
SLEEP = "import time; time.sleep(600)"


# --------------------------------------------------------------------------- /proc, read directly


def _status(pid: int, key: str) -> list[str]:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name == key:
            return value.split()
    raise AssertionError(f"/proc/{pid}/status has no {key} line")


def _ns(pid: int | str, name: str) -> tuple[int, int]:
    st = os.stat(f"/proc/{pid}/ns/{name}")
    return st.st_dev, st.st_ino


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().partition("=")[::2] for item in raw if item)


def _start_time(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[19])


def _gone(pid: int, start_time: int) -> bool:
    """No process with this identity runs (absent, recycled, or a zombie)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except (FileNotFoundError, ProcessLookupError):
        return True
    return fields[0] in ("Z", "X") or int(fields[19]) != start_time


def _children(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _descendants(pid: int) -> list[int]:
    found, queue = [], [pid]
    while queue:
        for child in _children(queue.pop()):
            found.append(child)
            queue.append(child)
    return found


def _zombies_of(pid: int) -> list[int]:
    zombies = []
    for child in kernel_view.all_pids():
        try:
            fields = Path(f"/proc/{child}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if fields[0] == "Z" and int(fields[1]) == pid:
            zombies.append(child)
    return zombies


# --------------------------------------------------------------------------- fixtures


@dataclass
class Env:
    """One environment built by hand, and helpers to run workloads in it."""

    instance: str
    netns_path: str
    cgroups: CgroupDriver
    holder: ProcessRef
    log_dir: Path
    driver: ForkingProcessDriver

    @property
    def procs(self) -> tuple[str, ...]:
        return self.cgroups.procs_files(env="e1")

    def spawn(
        self,
        command: list[str],
        *,
        name: str = "api",
        environ: dict[str, str] | None = None,
        working_dir: str = "/",
        user: str | int = "root",
    ) -> ProcessRef:
        return self.driver.spawn(
            env="e1",
            holder=self.holder,
            cgroup_procs=self.procs,
            name=name,
            command=command,
            environ=environ or {},
            working_dir=working_dir,
            user=user,
            log_dir=self.log_dir,
        )

    def python(
        self,
        code: str,
        *,
        name: str = "api",
        environ: dict[str, str] | None = None,
        working_dir: str = "/",
        user: str | int = "root",
    ) -> ProcessRef:
        return self.spawn(
            ["python3", "-c", code],
            name=name,
            environ=environ,
            working_dir=working_dir,
            user=user,
        )

    def log(self, name: str = "api") -> str:
        return (self.log_dir / f"{name}.log").read_text()

    def wait_log(self, text: str, name: str = "api") -> str:
        def logged() -> str:
            content = self.log(name)
            return content if text in content else ""

        return wait_until(
            logged,
            10.0,
            message=lambda: f"{text!r} never appeared in {name}.log: {self.log(name)!r}",
        )

    def members(self) -> set[int]:
        return kernel_view.pids_in_cgroup_dirs(self.cgroups.paths(env="e1"))


@pytest.fixture
def env(sandbox: None, instance: str, tmp_path: Path) -> Iterator[Env]:
    """A full environment (netns, cgroup, holder with all namespaces); removed afterwards."""
    if shutil.which("catatonit") is None:
        unavailable("catatonit is not installed (run hack/setup.sh)")
    netns = f"{instance}-e1"
    subprocess.run(["ip", "netns", "add", netns], check=True)
    cgroups = open_cgroup_driver(instance=instance)
    holders = ForkingHolderDriver()
    holder: ProcessRef | None = None
    try:
        cgroups.ensure(env="e1", limits=CgroupLimits(pids=256))
        holder = holders.spawn(
            HolderSpec(
                env="e1",
                netns_path=f"/run/netns/{netns}",
                hostname=HOSTNAME,
                namespaces=frozenset(NAMESPACES),
                cgroup_procs=cgroups.procs_files(env="e1"),
            )
        )
        yield Env(
            instance=instance,
            netns_path=f"/run/netns/{netns}",
            cgroups=cgroups,
            holder=holder,
            log_dir=tmp_path / "logs" / "e1",
            driver=ForkingProcessDriver(),
        )
    finally:
        if holder is not None:
            holders.stop(holder)
        cgroups.remove(env="e1")
        cgroups.remove_parent()
        subprocess.run(["ip", "netns", "del", netns], check=True)
    assert leaked_objects(instance) == []


# --------------------------------------------------------------------------- isolation


def test_workload_joins_every_namespace_of_the_env(env: Env) -> None:
    ref = env.python(SLEEP)
    for name in NAMESPACES:
        assert _ns(ref.pid, name) == _ns(env.holder.pid, name), f"{name}: not the env's"
        assert _ns(ref.pid, name) != _ns("self", name), f"{name}: the test's own"
    pin = os.stat(env.netns_path)
    assert _ns(ref.pid, "net") == (pin.st_dev, pin.st_ino)
    assert _start_time(ref.pid) == ref.start_time


def test_workload_is_in_the_env_cgroup_in_every_hierarchy(env: Env) -> None:
    # The program prints its own /proc/self/cgroup as its first act: it was in the env's
    # cgroup from exec on (the join happens before exec, in the fork chain).
    ref = env.python("print(open('/proc/self/cgroup').read(), flush=True); " + SLEEP)
    expected = f"/{env.instance}/e1"
    joined = {"memory", "cpu", "cpuacct", "pids", "blkio", ""}  # "": the unified tree
    lines = kernel_view.proc_cgroups(ref.pid)
    seen = {
        controller: line.split(":", 2)[2]
        for line in lines
        for controller in line.split(":")[1].split(",")
        if controller in joined
    }
    assert seen == dict.fromkeys(joined, expected), lines
    assert ref.pid in env.members()
    printed = env.wait_log("0::")
    assert f":pids:{expected}\n" in printed and f"0::{expected}\n" in printed, printed


def test_workload_sees_itself_in_the_env_pid_namespace_under_the_holder(env: Env) -> None:
    ref = env.python("import os; print('pid', os.getpid(), flush=True); " + SLEEP)
    nspid = _status(ref.pid, "NSpid")
    assert len(nspid) == len(_status(os.getpid(), "NSpid")) + 1
    assert nspid[-1] != "1"
    assert f"pid {nspid[-1]}\n" in env.wait_log("pid ")
    # The tree inside the env: holder (pid 1) -> shim -> workload. The holder is the
    # child of the holders' forker process (reparented to init when that exits), never
    # of the controller: nothing of the env is our child.
    shim = int(_status(ref.pid, "PPid")[0])
    assert int(_status(shim, "PPid")[0]) == env.holder.pid
    assert Path(f"/proc/{shim}/cmdline").read_bytes().split(b"\0")[0] == b"reconciler-shim"
    assert int(_status(env.holder.pid, "PPid")[0]) != os.getpid()


def test_orphans_of_a_workload_are_adopted_and_reaped_by_the_holder(env: Env) -> None:
    # The subshell forks a sleeper and exits: the sleeper's new parent must be the env's
    # pid 1, which reaps it when it ends (no zombie left on the host).
    ref = env.spawn(["sh", "-c", "(sleep 0.3 &); sleep 600"])
    orphan = wait_until(
        lambda: [
            p
            for p in env.members()
            if _status(p, "PPid")[0] == str(env.holder.pid)
            and Path(f"/proc/{p}/comm").read_text().strip() == "sleep"
        ],
        10.0,
        message="the orphaned sleeper was not adopted by the holder",
    )[0]
    start = _start_time(orphan)
    wait_until(partial(_gone, orphan, start), 10.0, message="the orphan did not end")
    wait_until(lambda: not _zombies_of(env.holder.pid), 5.0, message="the holder left a zombie")
    env.driver.stop(ref)


def test_user_environment_and_working_directory(env: Env) -> None:
    ref = env.python(
        "import os; print(sorted(os.environ), os.getcwd(), flush=True); " + SLEEP,
        environ={"GREETING": "hello world", "PORT": "8080"},
        working_dir="/usr/share",
        user="nobody",
    )
    assert _status(ref.pid, "Uid") == [str(NOBODY)] * 4
    assert _status(ref.pid, "Gid") == [str(NOBODY)] * 4
    environ = _environ(ref.pid)
    assert environ == {
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": "/nonexistent",
        "HOSTNAME": HOSTNAME,
        "GREETING": "hello world",
        "PORT": "8080",
        PROCESS_ENV_VAR: "api",
    }
    assert os.readlink(f"/proc/{ref.pid}/cwd") == "/usr/share"
    assert "/usr/share" in env.wait_log("/usr/share")


def test_numeric_user_without_a_passwd_entry(env: Env) -> None:
    ref = env.python(SLEEP, user=43210)
    assert _status(ref.pid, "Uid") == ["43210"] * 4
    assert _status(ref.pid, "Gid") == ["43210"] * 4
    assert _status(ref.pid, "Groups") == ["43210"]
    assert _environ(ref.pid)["HOME"] == "/"


def test_stdout_and_stderr_land_in_the_log_file(env: Env) -> None:
    ref = env.python(
        "import sys; print('to stdout', flush=True); print('to stderr', file=sys.stderr)"
    )
    assert env.driver.exit_status(ref, log_dir=env.log_dir, name="api", timeout=10) == 0
    assert env.log() == "to stdout\nto stderr\n"
    fds = {fd.name: os.readlink(fd) for fd in Path(f"/proc/{env.holder.pid}/fd").iterdir()}
    assert all("api.log" not in target for target in fds.values())


# --------------------------------------------------------------------------- failures


def test_a_missing_command_is_a_clear_error_and_leaves_nothing(env: Env) -> None:
    with pytest.raises(
        KernelError, match=r"^process api in env e1 failed to start: execve python4: ENOENT"
    ):
        env.spawn(["python4", "-c", "pass"])
    wait_until(lambda: env.members() == {env.holder.pid}, 5.0, message="something leaked")
    # The shim recorded the failure and exited; the holder reaps it.
    wait_until(lambda: _descendants(env.holder.pid) == [], 5.0, message="a shim is left")


def test_a_missing_working_dir_is_reported(env: Env) -> None:
    with pytest.raises(KernelError, match=r"failed to start: chdir /nonexistent: ENOENT"):
        env.spawn(["true"], working_dir="/nonexistent")
    wait_until(lambda: env.members() == {env.holder.pid}, 5.0, message="something leaked")


def test_an_unknown_user_is_refused_before_forking(env: Env) -> None:
    with pytest.raises(KernelError, match=r"user 'no-such-user' does not exist"):
        env.spawn(["true"], user="no-such-user")
    assert env.members() == {env.holder.pid}


def test_the_pids_limit_is_reported_as_such(env: Env) -> None:
    # The holder is one task; the first process of the fork chain joins as the second,
    # and its fork is refused.
    env.cgroups.ensure(env="e1", limits=CgroupLimits(pids=2))
    with pytest.raises(KernelError, match=r"failed to start: fork: EAGAIN .*at its pids limit"):
        env.spawn(["true"])
    wait_until(lambda: env.members() == {env.holder.pid}, 5.0, message="something leaked")


def test_a_name_that_is_not_a_plain_label_is_refused(env: Env) -> None:
    with pytest.raises(KernelError, match=r"'\.\./x' is not a valid name"):
        env.spawn(["true"], name="../x")
    assert not (env.log_dir.parent / "x.log").exists()


def test_a_dead_holder_is_refused(env: Env) -> None:
    ForkingHolderDriver().stop(env.holder)
    with pytest.raises(KernelError, match=r"holder \(pid \d+\) is not running"):
        env.spawn(["true"])


# --------------------------------------------------------------------------- exit and stop


def test_exit_code_is_recorded_by_the_shim(env: Env) -> None:
    ref = env.spawn(["sh", "-c", "exit 3"])
    assert env.driver.exit_status(ref, log_dir=env.log_dir, name="api", timeout=10) == 3
    record = (env.log_dir / "api.exit").read_text()
    assert f'"pid": {ref.pid}' in record and f'"startTime": {ref.start_time}' in record
    # A new run of the same name: the old record is not its exit code.
    second = env.python(SLEEP)
    assert env.driver.exit_status(second, log_dir=env.log_dir, name="api") is None
    env.driver.stop(second)
    assert env.driver.exit_status(second, log_dir=env.log_dir, name="api", timeout=5) == 143


def test_stop_kills_the_whole_tree(env: Env) -> None:
    # A shell with two children, one of which starts its own session (setsid).
    ref = env.spawn(["sh", "-c", "sleep 600 & setsid sleep 601 & sleep 602"])
    tree = wait_until(
        lambda: _descendants(ref.pid) if len(_descendants(ref.pid)) >= 3 else [],
        10.0,
        message="the workload did not start its children",
    )
    identities = [(pid, _start_time(pid)) for pid in [ref.pid, *tree]]
    started = time.monotonic()
    env.driver.stop(ref, grace=5.0)
    assert time.monotonic() - started < 4.0, "SIGTERM should have been enough"
    for pid, start in identities:
        assert _gone(pid, start), f"pid {pid} survived stop()"
    assert env.members() == {env.holder.pid}
    assert not env.driver.alive(ref)


def test_stop_escalates_to_sigkill_after_the_grace_period(env: Env) -> None:
    ref = env.python(
        "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "print('ignoring', flush=True); time.sleep(600)"
    )
    env.wait_log("ignoring")
    started = time.monotonic()
    env.driver.stop(ref, grace=0.5)
    assert 0.5 <= time.monotonic() - started < 5.0
    assert _gone(ref.pid, ref.start_time)
    assert env.driver.exit_status(ref, log_dir=env.log_dir, name="api", timeout=5) == 137


def test_stop_of_an_exited_or_foreign_ref_is_a_noop(env: Env) -> None:
    ref = env.spawn(["true"])
    wait_until(partial(_gone, ref.pid, ref.start_time), 5.0, message="true did not end")
    env.driver.stop(ref)
    sleeper = subprocess.Popen(["sleep", "600"])
    try:
        impostor = ProcessRef(pid=sleeper.pid, start_time=_start_time(sleeper.pid) + 1)
        env.driver.stop(impostor, grace=0.1)
        assert sleeper.poll() is None
    finally:
        sleeper.kill()
        sleeper.wait()


# --------------------------------------------------------------------------- adoption


def test_find_adopts_the_running_workload_not_its_children(env: Env) -> None:
    # The shell starts a tagged child in its own session, then execs: both carry the
    # tag and lead a session, but only the workload's parent is the shim.
    ref = env.spawn(["sh", "-c", "setsid sleep 600 & exec sleep 601"], name="api")
    child = wait_until(
        lambda: [
            p
            for p in _children(ref.pid)
            if _status(p, "NSsid")[0] == _status(p, "NSpid")[0]
            and Path(f"/proc/{p}/cmdline").read_bytes() == b"sleep\x00600\x00"
        ],
        10.0,
        message="the setsid child did not start",
    )[0]
    assert _environ(child)[PROCESS_ENV_VAR] == "api"
    driver = ForkingProcessDriver()  # a "restarted controller": no memory of the spawn
    assert driver.find(env="e1", cgroup_procs=env.procs, name="api") == ref
    assert driver.find(env="e1", cgroup_procs=env.procs, name="other") is None
    assert driver.find(env="e1", cgroup_procs=(), name="api") is None  # not in the cgroup
    env.driver.stop(ref)
    assert driver.find(env="e1", cgroup_procs=env.procs, name="api") is None


def test_concurrent_spawns_from_threads(env: Env) -> None:
    with ThreadPoolExecutor(max_workers=6) as pool:
        refs = list(pool.map(lambda i: env.python(SLEEP, name=f"w{i}"), range(6)))
    try:
        assert len({ref.pid for ref in refs}) == 6
        for i, ref in enumerate(refs):
            # spawn() returns once the workload reported its identity, a moment before its
            # execve: /proc/PID/environ shows the new environment only after that.
            wait_until(lambda pid=ref.pid: PROCESS_ENV_VAR in _environ(pid), 5.0, message="no exec")
            assert _environ(ref.pid)[PROCESS_ENV_VAR] == f"w{i}"
            assert _ns(ref.pid, "pid") == _ns(env.holder.pid, "pid")
    finally:
        for ref in refs:
            env.driver.stop(ref)


# --------------------------------------------------------------------------- mounts


def _mount_points(mountinfo: str) -> dict[str, str]:
    """mount point -> fstype (the last mount listed at a point is the visible one)."""
    points = {}
    for line in mountinfo.splitlines():
        left, _, right = line.partition(" - ")
        points[left.split()[4]] = right.split()[0]
    return points


def _mount_line(pid: int | str, target: str) -> str:
    lines = [
        line
        for line in Path(f"/proc/{pid}/mountinfo").read_text().splitlines()
        if line.split()[4] == target
    ]
    return lines[-1] if lines else ""


def test_tmpfs_is_visible_inside_and_not_on_the_host(env: Env, tmp_path: Path) -> None:
    target = str(tmp_path / "scratch")
    mounts = [MountSpec(type="tmpfs", target=target, size=8 * 1024 * 1024)]
    changes = apply_mounts(env="e1", holder=env.holder, mounts=mounts)
    assert changes == [f"mounted tmpfs on {target} (size=8192k)"]
    inside = _mount_line(env.holder.pid, target)
    assert " - tmpfs " in inside and "size=8192k" in inside
    assert _mount_line("self", target) == ""
    # A workload sees it, and what it writes there stays inside.
    ref = env.spawn(["sh", "-c", f"echo secret > {target}/f && sleep 600"])
    wait_until(lambda: Path(f"/proc/{ref.pid}/root{target}/f").exists(), 10.0, message="no file")
    assert _mount_line(ref.pid, target) == inside
    assert not Path(f"{target}/f").exists()
    # Idempotent; a new size is a resize in place.
    assert apply_mounts(env="e1", holder=env.holder, mounts=mounts) == []
    bigger = [MountSpec(type="tmpfs", target=target, size=16 * 1024 * 1024)]
    assert apply_mounts(env="e1", holder=env.holder, mounts=bigger) == [
        f"resized tmpfs on {target} (size=16384k)"
    ]
    assert Path(f"/proc/{ref.pid}/root{target}/f").read_text() == "secret\n"
    env.driver.stop(ref)
    assert apply_mounts(env="e1", holder=env.holder, mounts=[], stale=[target]) == [
        f"unmounted tmpfs from {target}"
    ]
    assert _mount_line(env.holder.pid, target) == ""


def test_tmpfs_over_a_host_tmpfs_never_touches_the_hosts(env: Env, tmp_path: Path) -> None:
    # A tmpfs the host has mounted is copied into the env's namespace; resizing that copy
    # would resize the host's filesystem. Ours must go on top instead.
    host = tmp_path / "hostfs"
    host.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "hostfs", str(host)], check=True)
    try:
        holder = ForkingHolderDriver().spawn(
            HolderSpec(
                env="e1",
                netns_path=env.netns_path,
                hostname=HOSTNAME,
                namespaces=frozenset(NAMESPACES),
                cgroup_procs=env.procs,
            )
        )
        try:
            mounts = [MountSpec(type="tmpfs", target=str(host), size=8 * 1024 * 1024)]
            assert apply_mounts(env="e1", holder=holder, mounts=mounts) == [
                f"mounted tmpfs on {host} (size=8192k)"
            ]
            assert "size=4096k" in _mount_line("self", str(host))
            assert "size=8192k" in _mount_line(holder.pid, str(host))
        finally:
            ForkingHolderDriver().stop(holder)
    finally:
        subprocess.run(["umount", str(host)], check=True)


def test_read_only_bind_mount(env: Env, tmp_path: Path) -> None:
    source = tmp_path / "src"
    source.mkdir()
    (source / "data").write_text("from the host\n")
    target = tmp_path / "not-yet" / "dst"
    mounts = [MountSpec(type="bind", source=str(source), target=str(target), read_only=True)]
    assert apply_mounts(env="e1", holder=env.holder, mounts=mounts) == [
        f"bound {source} on {target} read-only"
    ]
    assert target.is_dir()  # created in the env's view, which is the host's filesystem here
    line = _mount_line(env.holder.pid, str(target))
    assert line.split()[5].split(",")[0] == "ro"
    assert _mount_line("self", str(target)) == ""
    ref = env.spawn(["sh", "-c", f"cat {target}/data; echo x > {target}/new; exit $?"])
    code = env.driver.exit_status(ref, log_dir=env.log_dir, name="api", timeout=10)
    assert code not in (None, 0)
    log = env.log()
    assert "from the host" in log and "Read-only file system" in log
    assert not (source / "new").exists()
    assert apply_mounts(env="e1", holder=env.holder, mounts=mounts) == []
    writable = [MountSpec(type="bind", source=str(source), target=str(target))]
    assert apply_mounts(env="e1", holder=env.holder, mounts=writable) == [
        f"made {target} read-write"
    ]
    ref = env.spawn(["sh", "-c", f"echo x > {target}/new"], name="writer")
    assert env.driver.exit_status(ref, log_dir=env.log_dir, name="writer", timeout=10) == 0
    assert (source / "new").read_text() == "x\n"


def test_bind_of_a_missing_source_is_a_clear_error(env: Env, tmp_path: Path) -> None:
    mounts = [MountSpec(type="bind", source=str(tmp_path / "nope"), target="/mnt/x")]
    with pytest.raises(KernelError, match=r"bind source .*/nope does not exist on the host"):
        apply_mounts(env="e1", holder=env.holder, mounts=mounts)


def test_mounts_refuse_an_env_without_its_own_mount_namespace(env: Env) -> None:
    holders = ForkingHolderDriver()
    holder = holders.spawn(
        HolderSpec(
            env="e1",
            netns_path=env.netns_path,
            hostname=HOSTNAME,
            namespaces=frozenset({"net"}),
            cgroup_procs=env.procs,
        )
    )
    try:
        with pytest.raises(KernelError, match="no mount namespace of its own"):
            apply_mounts(env="e1", holder=holder, mounts=[MountSpec(type="tmpfs", target="/mnt")])
    finally:
        holders.stop(holder)


@pytest.mark.parametrize("count", [20])
def test_spawn_time(env: Env, count: int) -> None:
    """Not a benchmark gate: prints the time per spawn (shown with -s) and checks a bound."""
    started = time.monotonic()
    refs = [env.python(SLEEP, name=f"t{i}") for i in range(count)]
    per_spawn = (time.monotonic() - started) / count
    print(f"\nspawn: {per_spawn * 1000:.1f} ms per process ({sys.executable})")
    for ref in refs:
        env.driver.stop(ref)
    assert per_spawn < 1.0
