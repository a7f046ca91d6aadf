"""The cgroup driver against this host's real cgroups, checked through the cgroup files.

Every value is read back with plain file reads at paths derived from /proc/self/mountinfo
(tests/kernel_view.py), not through the driver. cgroups are not isolated by the sandbox:
each test has its own instance name, kills the processes it started (its own children,
by Popen handle) and removes its directories; the `driver` fixture then asserts that no
directory carrying the instance name is left under any cgroup mount.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from reconciler.errors import KernelError
from reconciler.kernel import cgroupfs
from reconciler.kernel.cgroupfs import CgroupLayout, discover_layout
from reconciler.kernel.cgroups import CgroupV1Driver, CgroupV2Driver, open_cgroup_driver
from reconciler.kernel.devices import resolve_block_device
from reconciler.kernel.types import CgroupDriver, CgroupLimits, IoLimit
from tests import kernel_view
from tests.gates import unavailable
from tests.kernel_view import wait_until
from tests.leaks import leaked_cgroups

MI = 2**20
UNLIMITED_V1_MEMORY = 2**62  # the kernel shows "no limit" as a number above this
V1_CONTROLLERS = ("memory", "cpu", "cpuacct", "pids", "blkio")
LIMIT_FILES = (
    "memory.limit_in_bytes",
    "cpu.cfs_quota_us",
    "cpu.cfs_period_us",
    "pids.max",
    "blkio.throttle.read_bps_device",
    "blkio.throttle.write_bps_device",
    "blkio.throttle.read_iops_device",
    "blkio.throttle.write_iops_device",
)

Spawn = Callable[..., subprocess.Popen[str]]
Driver = CgroupV1Driver | CgroupV2Driver  # remove_many, env_names: not in the Protocol yet


# --------------------------------------------------------------------------- the kernel's view


def _mounts() -> tuple[dict[str, Path], Path | None]:
    """v1 controller -> mount point, and the cgroup2 mount, straight from mountinfo."""
    v1: dict[str, Path] = {}
    unified = None
    for mount in kernel_view.cgroup_mounts():
        if mount.version == 2:
            unified = unified or mount.path
        for controller in mount.controllers:
            v1.setdefault(controller, mount.path)
    return v1, unified


def _dirs(instance: str, env: str) -> dict[str, Path]:
    """The env's directory per v1 controller we use, plus "unified" on a hybrid host."""
    v1, unified = _mounts()
    dirs = {c: v1[c] / instance / env for c in V1_CONTROLLERS if c in v1}
    if unified is not None:
        dirs["unified"] = unified / instance / env
    return dirs


def _read(path: Path) -> str:
    return kernel_view.read_cgroup_file(path)


def _root_disk() -> tuple[str, str]:
    """(device path, "MAJ:MIN" of the whole disk) backing /, per /proc and sysfs."""
    dev = os.stat("/").st_dev
    number = f"{os.major(dev)}:{os.minor(dev)}"
    sysfs = Path("/sys/dev/block") / number
    if not sysfs.exists():
        unavailable(f"/ is not on a block device ({number}): no disk to throttle")
    uevent = dict(line.split("=", 1) for line in (sysfs / "uevent").read_text().splitlines())
    if (sysfs / "partition").exists():
        number = (sysfs.resolve().parent / "dev").read_text().strip()
    return f"/dev/{uevent['DEVNAME']}", number


def _require_hybrid_v1() -> None:
    if discover_layout().driver != "v1":
        unavailable("this test exercises the v1 files; this host runs cgroup v2")


# --------------------------------------------------------------------------- fixtures


def _cleanup(instance: str) -> None:
    """Remove every directory named after the instance, bottom-up (nothing of ours runs)."""
    for mount in kernel_view.cgroup_mounts():
        top = mount.path / instance
        if top.is_dir():
            for directory, _subdirs, _files in os.walk(top, topdown=False):
                os.rmdir(directory)


@pytest.fixture
def driver(sandbox: None, instance: str) -> Iterator[Driver]:
    """The driver for this host's layout; afterwards nothing of the instance may remain."""
    drv = open_cgroup_driver(instance=instance)
    assert isinstance(drv, CgroupV1Driver | CgroupV2Driver)
    yield drv
    failed = [r for r in drv.remove_many(drv.env_names()).values() if isinstance(r, Exception)]
    drv.remove_parent()
    left = leaked_cgroups(instance)
    _cleanup(instance)  # so one failing test does not leak into the host
    assert not failed, failed
    assert not left, f"cgroup directories left behind: {left}"


@pytest.fixture
def spawn(driver: CgroupDriver) -> Iterator[Spawn]:
    """Start a child process; every one is killed and reaped at the end of the test."""
    children: list[subprocess.Popen[str]] = []

    def start(*argv: str, **kwargs: object) -> subprocess.Popen[str]:
        child = subprocess.Popen(list(argv), text=True, **kwargs)  # type: ignore[call-overload]
        children.append(child)
        return child  # type: ignore[no-any-return]

    yield start
    for child in children:
        if child.poll() is None:
            child.kill()
        child.wait(timeout=10)


def _join(procs_files: tuple[str, ...] | list[str], pid: int) -> None:
    for procs in procs_files:
        Path(procs).write_text(str(pid))


def _limits(device: str) -> CgroupLimits:
    return CgroupLimits(
        memory_bytes=256 * MI,
        cpu_millis=500,
        pids=128,
        io=(
            IoLimit(
                device=device, read_bps=50 * MI, write_bps=20 * MI, read_iops=2000, write_iops=1000
            ),
        ),
    )


# --------------------------------------------------------------------------- ensure


def test_ensure_creates_every_directory_with_the_declared_limits(
    driver: CgroupDriver, instance: str
) -> None:
    _require_hybrid_v1()
    device_path, number = _root_disk()
    device = resolve_block_device(device_path)
    assert device == number
    changes = driver.ensure(env="web", limits=_limits(device))

    dirs = _dirs(instance, "web")
    assert set(driver.paths(env="web")) == {str(d) for d in dirs.values()}
    assert all(d.is_dir() for d in dirs.values()), dirs
    assert _read(dirs["memory"] / "memory.limit_in_bytes") == str(256 * MI)
    assert _read(dirs["cpu"] / "cpu.cfs_period_us") == "100000"
    assert _read(dirs["cpu"] / "cpu.cfs_quota_us") == "50000"
    assert _read(dirs["pids"] / "pids.max") == "128"
    blkio = dirs["blkio"]
    assert _read(blkio / "blkio.throttle.read_bps_device") == f"{device} {50 * MI}"
    assert _read(blkio / "blkio.throttle.write_bps_device") == f"{device} {20 * MI}"
    assert _read(blkio / "blkio.throttle.read_iops_device") == f"{device} 2000"
    assert _read(blkio / "blkio.throttle.write_iops_device") == f"{device} 1000"
    assert f"memory.limit_in_bytes: -1 -> {256 * MI}" in changes
    assert "cpu.cfs_quota_us: -1 -> 50000" in changes
    assert f"created {dirs['memory']}" in changes


def test_second_ensure_writes_nothing(
    driver: CgroupDriver, instance: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    _require_hybrid_v1()
    _device_path, device = _root_disk()
    limits = _limits(device)
    driver.ensure(env="web", limits=limits)
    files = [d / name for d in _dirs(instance, "web").values() for name in LIMIT_FILES]
    files = [f for f in files if f.exists()]
    before = {f: (f.stat().st_mtime_ns, _read(f)) for f in files}

    writes: list[tuple[str, str]] = []
    real_write = cgroupfs.write_file

    def counting_write(path: str, value: str) -> None:
        writes.append((path, value))
        real_write(path, value)

    monkeypatch.setattr(cgroupfs, "write_file", counting_write)
    assert driver.ensure(env="web", limits=limits) == []
    assert writes == []
    # kernfs stamps a file's mtime on every write: unchanged stamps mean no write happened.
    assert {f: (f.stat().st_mtime_ns, _read(f)) for f in files} == before


def _count_calls(monkeypatch: pytest.MonkeyPatch, name: str) -> list[tuple[str, ...]]:
    """Record every call of cgroupfs.`name` (read_file or write_file), still doing it."""
    calls: list[tuple[str, ...]] = []
    real = getattr(cgroupfs, name)

    def counting(*args: str) -> object:
        calls.append(args)
        return real(*args)

    monkeypatch.setattr(cgroupfs, name, counting)
    return calls


def test_ensure_of_a_fresh_cgroup_writes_the_set_limits_without_reading_back(
    driver: CgroupDriver, instance: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    _require_hybrid_v1()
    reads = _count_calls(monkeypatch, "read_file")
    writes = _count_calls(monkeypatch, "write_file")
    limits = CgroupLimits(memory_bytes=64 * MI, cpu_millis=250, pids=50)

    changes = driver.ensure(env="fresh", limits=limits)

    dirs = _dirs(instance, "fresh")
    # A directory this call made holds the kernel's defaults: nothing is read back, and
    # only the three limits that are set are written.
    assert reads == []
    assert sorted(path for path, _value in writes) == sorted(
        [
            str(dirs["memory"] / "memory.limit_in_bytes"),
            str(dirs["cpu"] / "cpu.cfs_quota_us"),
            str(dirs["pids"] / "pids.max"),
        ]
    )
    assert changes == [f"created {d}" for d in driver.paths(env="fresh")] + [
        f"memory.limit_in_bytes: -1 -> {64 * MI}",
        "cpu.cfs_quota_us: -1 -> 25000",
        "pids.max: max -> 50",
    ]
    assert all(d.is_dir() for d in dirs.values()), dirs
    assert _read(dirs["memory"] / "memory.limit_in_bytes") == str(64 * MI)
    assert _read(dirs["cpu"] / "cpu.cfs_quota_us") == "25000"
    assert _read(dirs["cpu"] / "cpu.cfs_period_us") == "100000"
    assert _read(dirs["pids"] / "pids.max") == "50"
    for name in LIMIT_FILES[4:]:
        assert _read(dirs["blkio"] / name) == "", name


def test_ensure_repairs_limits_changed_by_hand(driver: CgroupDriver, instance: str) -> None:
    _require_hybrid_v1()
    limits = CgroupLimits(memory_bytes=128 * MI, cpu_millis=500, pids=64)
    driver.ensure(env="web", limits=limits)
    dirs = _dirs(instance, "web")
    (dirs["memory"] / "memory.limit_in_bytes").write_text(str(512 * MI))
    (dirs["cpu"] / "cpu.cfs_quota_us").write_text("-1")
    (dirs["pids"] / "pids.max").write_text("999")

    changes = driver.ensure(env="web", limits=limits)

    assert changes == [
        f"memory.limit_in_bytes: {512 * MI} -> {128 * MI}",
        "cpu.cfs_quota_us: -1 -> 50000",
        "pids.max: 999 -> 64",
    ]
    assert _read(dirs["memory"] / "memory.limit_in_bytes") == str(128 * MI)
    assert _read(dirs["cpu"] / "cpu.cfs_quota_us") == "50000"
    assert _read(dirs["pids"] / "pids.max") == "64"
    assert driver.ensure(env="web", limits=limits) == []


def test_lowering_memory_updates_in_place(
    driver: CgroupDriver, instance: str, spawn: Spawn
) -> None:
    _require_hybrid_v1()
    driver.ensure(env="web", limits=CgroupLimits(memory_bytes=256 * MI, pids=64))
    memory_dir = _dirs(instance, "web")["memory"]
    inode = memory_dir.stat().st_ino
    sleeper = spawn("sleep", "1000")
    _join(driver.procs_files(env="web"), sleeper.pid)

    changes = driver.ensure(env="web", limits=CgroupLimits(memory_bytes=128 * MI, pids=64))

    assert changes == [f"memory.limit_in_bytes: {256 * MI} -> {128 * MI}"]
    assert _read(memory_dir / "memory.limit_in_bytes") == str(128 * MI)
    assert memory_dir.stat().st_ino == inode  # the same cgroup, not a new one
    assert sleeper.pid in kernel_view.pids_in_cgroup_dirs([memory_dir])


def test_dropping_limits_makes_everything_unlimited(driver: CgroupDriver, instance: str) -> None:
    _require_hybrid_v1()
    _device_path, device = _root_disk()
    driver.ensure(env="web", limits=_limits(device))

    changes = driver.ensure(env="web", limits=CgroupLimits())

    dirs = _dirs(instance, "web")
    assert int(_read(dirs["memory"] / "memory.limit_in_bytes")) >= UNLIMITED_V1_MEMORY
    assert _read(dirs["cpu"] / "cpu.cfs_quota_us") == "-1"
    assert _read(dirs["pids"] / "pids.max") == "max"
    for name in LIMIT_FILES[4:]:
        assert _read(dirs["blkio"] / name) == "", name
    assert len(changes) == 7, changes
    assert f"blkio.throttle.read_bps_device {device}: {50 * MI} -> 0" in changes


def test_memory_below_usage_is_refused_with_a_clear_error(
    driver: CgroupDriver, instance: str, spawn: Spawn
) -> None:
    _require_hybrid_v1()
    driver.ensure(env="hog", limits=CgroupLimits())
    # The child allocates only after it has joined, so the memory is charged to the env.
    hog = spawn(
        sys.executable,
        "-c",
        "import sys; sys.stdin.readline(); b = bytearray(50 * 2**20)\n"
        "for i in range(0, len(b), 4096): b[i] = 1\n"
        "print('ready', flush=True); sys.stdin.readline()",
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert hog.stdin is not None and hog.stdout is not None
    _join(driver.procs_files(env="hog"), hog.pid)
    hog.stdin.write("go\n")
    hog.stdin.flush()
    assert hog.stdout.readline().strip() == "ready"

    with pytest.raises(KernelError) as caught:
        driver.ensure(env="hog", limits=CgroupLimits(memory_bytes=4 * MI, pids=64))

    message = str(caught.value)
    assert message.startswith("memory limit 4Mi for env hog is below its current usage "), message
    assert "the kernel refused it (EBUSY)" in message
    assert "\n" not in message
    dirs = _dirs(instance, "hog")
    assert int(_read(dirs["memory"] / "memory.limit_in_bytes")) >= UNLIMITED_V1_MEMORY
    assert _read(dirs["pids"] / "pids.max") == "64"  # the other limits were still applied


# --------------------------------------------------------------------------- observe


def test_observe_reports_limits_usage_and_missing_directories(
    driver: CgroupDriver, instance: str, spawn: Spawn
) -> None:
    _require_hybrid_v1()
    _device_path, device = _root_disk()
    limits = _limits(device)
    driver.ensure(env="api", limits=limits)
    driver.ensure(env="db", limits=CgroupLimits())
    sleeper = spawn("sleep", "1000")
    _join(driver.procs_files(env="api"), sleeper.pid)

    observed = driver.observe()

    assert set(observed) == {"api", "db"}
    api = observed["api"]
    assert api.limits == limits
    assert api.complete
    assert set(api.paths) == {str(d) for d in _dirs(instance, "api").values()}
    assert api.usage.pids == int(_read(_dirs(instance, "api")["pids"] / "pids.current")) == 1
    assert observed["db"].limits == CgroupLimits()

    _dirs(instance, "db")["pids"].rmdir()  # someone removed one hierarchy's directory
    db = driver.observe()["db"]
    assert not db.complete
    assert str(_dirs(instance, "db")["pids"]) not in db.paths


# --------------------------------------------------------------------------- teardown


def test_remove_kills_every_process_and_removes_every_directory(
    driver: CgroupDriver, instance: str, spawn: Spawn
) -> None:
    _require_hybrid_v1()
    driver.ensure(env="web", limits=CgroupLimits(pids=32))
    dirs = _dirs(instance, "web")
    first = spawn("sleep", "1000")
    _join(driver.procs_files(env="web"), first.pid)
    # A workload may make sub-cgroups of its own: they go too, bottom-up.
    sub = dirs["memory"] / "sub"
    sub.mkdir()
    second = spawn("sleep", "1000")
    _join([str(sub / "cgroup.procs")], second.pid)

    assert driver.remove(env="web", timeout=5.0) is True

    assert first.wait(timeout=5) == -signal.SIGKILL
    assert second.wait(timeout=5) == -signal.SIGKILL
    assert not any(d.exists() for d in dirs.values()), dirs


def test_remove_many_kills_every_process_and_removes_every_directory(
    driver: Driver, instance: str, spawn: Spawn
) -> None:
    envs = [f"e{i}" for i in range(20)]
    sleepers: dict[str, subprocess.Popen[str]] = {}
    for env in envs:
        driver.ensure(env=env, limits=CgroupLimits(pids=16))
        sleepers[env] = spawn("sleep", "1000")
        _join(driver.procs_files(env=env), sleepers[env].pid)
    all_dirs = {env: list(_dirs(instance, env).values()) for env in envs}
    for env in envs:
        assert sleepers[env].pid in kernel_view.pids_in_cgroup_dirs(all_dirs[env])
    driver.ensure(env="gone", limits=CgroupLimits())
    for directory in _dirs(instance, "gone").values():
        directory.rmdir()  # already removed by someone else

    results = driver.remove_many([*envs, "gone", "never-created"], timeout=10.0)

    assert results == {**dict.fromkeys(envs, True), "gone": False, "never-created": False}
    left = [d for dirs in all_dirs.values() for d in dirs if d.exists()]
    assert left == []
    for env, sleeper in sleepers.items():
        assert sleeper.wait(timeout=5) == -signal.SIGKILL, env
        assert not kernel_view.pid_alive(sleeper.pid)


def test_remove_many_kills_a_process_joined_to_one_v1_directory_only(
    driver: Driver, instance: str, spawn: Spawn
) -> None:
    # Outside the unified tree, cgroup.kill cannot reach it: rmdir says EBUSY, and the
    # pids listed in the v1 directory are signalled.
    _require_hybrid_v1()
    driver.ensure(env="web", limits=CgroupLimits())
    dirs = _dirs(instance, "web")
    stray = spawn("sleep", "1000")
    _join([str(dirs["memory"] / "cgroup.procs")], stray.pid)
    assert _read(dirs["unified"] / "cgroup.events").splitlines()[0] == "populated 0"

    assert driver.remove_many(["web"]) == {"web": True}

    assert stray.wait(timeout=5) == -signal.SIGKILL
    assert not any(d.exists() for d in dirs.values()), dirs


def test_remove_on_pure_v1_kills_by_signal(sandbox: None, instance: str, spawn: Spawn) -> None:
    layout = discover_layout()
    if layout.driver != "v1":
        unavailable("needs cgroup v1 controllers")
    pure_v1 = open_cgroup_driver(
        instance=instance, layout=CgroupLayout(driver="v1", v1_mounts=layout.v1_mounts)
    )
    assert isinstance(pure_v1, CgroupV1Driver)
    pure_v1.ensure(env="web", limits=CgroupLimits())
    dirs = _dirs(instance, "web")
    assert "unified" not in dirs or not dirs["unified"].exists()
    sleeper = spawn("sleep", "1000")
    _join(pure_v1.procs_files(env="web"), sleeper.pid)

    assert pure_v1.remove(env="web") is True

    assert sleeper.wait(timeout=5) == -signal.SIGKILL
    assert not any(d.exists() for d in dirs.values())
    pure_v1.remove_parent()


def test_remove_of_a_missing_env_is_fine(driver: CgroupDriver) -> None:
    assert driver.remove(env="never-created") is False
    driver.remove_parent()


def test_remove_parent_keeps_a_parent_that_is_in_use(driver: CgroupDriver, instance: str) -> None:
    driver.ensure(env="a", limits=CgroupLimits())
    driver.ensure(env="b", limits=CgroupLimits())
    parents = {d.parent for d in _dirs(instance, "a").values()}
    assert driver.remove(env="a") is True

    driver.remove_parent()
    assert all(p.is_dir() for p in parents)

    assert driver.remove(env="b") is True
    driver.remove_parent()
    assert not any(p.exists() for p in parents)


def test_v2_driver_on_the_unified_tree(sandbox: None, instance: str, spawn: Spawn) -> None:
    # This host's cgroup2 has no resource controllers, but the v2 driver's directories,
    # cgroup.kill and cgroup.events can still be exercised for real.
    unified = discover_layout().unified
    if unified is None:
        unavailable("no cgroup2 mount")
    root_control = Path(unified) / "cgroup.subtree_control"
    root_before = _read(root_control)
    v2 = open_cgroup_driver(instance=instance, layout=CgroupLayout(driver="v2", unified=unified))
    assert isinstance(v2, CgroupV2Driver)
    env_dir = Path(unified) / instance / "web"

    v2.ensure(env="web", limits=CgroupLimits())
    assert env_dir.is_dir()
    assert v2.procs_files(env="web") == (str(env_dir / "cgroup.procs"),)
    sleeper = spawn("sleep", "1000")
    _join(v2.procs_files(env="web"), sleeper.pid)
    assert _read(env_dir / "cgroup.events").splitlines()[0] == "populated 1"

    v2.kill(env="web")  # cgroup.kill
    assert sleeper.wait(timeout=5) == -signal.SIGKILL
    wait_until(
        lambda: "populated 0" in _read(env_dir / "cgroup.events"), 5, message="still populated"
    )
    available = set(_read(Path(unified) / "cgroup.controllers").split())
    if "memory" not in available:
        with pytest.raises(KernelError, match="memory controller is not available"):
            v2.ensure(env="web", limits=CgroupLimits(memory_bytes=64 * MI))
    assert v2.remove(env="web") is True
    assert not env_dir.exists()
    v2.remove_parent()
    assert not env_dir.parent.exists()
    # Nothing to enable here (no controllers), so the host's root was left alone.
    assert _read(root_control) == root_before


# --------------------------------------------------------------------------- devices


def test_root_disk_resolves_to_its_number() -> None:
    device_path, number = _root_disk()
    assert resolve_block_device(device_path) == number


def test_missing_device_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match=r"^/dev/vdz: no such block device$"):
        resolve_block_device("/dev/vdz")
