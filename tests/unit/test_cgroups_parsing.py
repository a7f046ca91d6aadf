"""cgroup discovery and value spelling, without root: mountinfo text in, layout out;
limit values to and from the kernel's spelling; block device numbers.

The last tests run the v2 driver's diff logic against a directory that holds the files a
cgroup2 tree would show (this host's cgroup2 has no resource controllers, so the real v2
limit files cannot be exercised here); they check which values would be written, and
that values already in place cause no write.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from reconciler.errors import KernelError
from reconciler.kernel import cgroupfs as fs
from reconciler.kernel.cgroupfs import (
    CGROUP2_SUPER_MAGIC,
    TMPFS_MAGIC,
    CgroupLayout,
    CgroupMount,
    layout_from_mounts,
    parse_mountinfo,
)
from reconciler.kernel.cgroups import (
    CgroupV1Driver,
    CgroupV2Driver,
    open_cgroup_driver,
    procs_files,
)
from reconciler.kernel.devices import resolve_block_device, whole_disk
from reconciler.kernel.types import CgroupLimits, IoLimit

MI = 2**20

# This project's CI host: v1 controllers apart (cpu and cpuacct too), empty cgroup2.
HYBRID = """\
22 1 254:0 / / rw,relatime - ext4 /dev/vda rw,discard
23 22 0:21 / /sys rw,nosuid,nodev,noexec,relatime - sysfs sysfs rw
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
34 31 0:31 / /sys/fs/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
38 31 0:35 / /sys/fs/cgroup/blkio rw,relatime - cgroup cgroup rw,blkio
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""

# A modern systemd host: one cgroup2 at /sys/fs/cgroup, with optional fields.
PURE_V2 = """\
25 1 259:2 / / rw,relatime shared:1 - ext4 /dev/nvme0n1p2 rw
26 25 0:23 / /sys rw,relatime shared:2 - sysfs sysfs rw
30 26 0:26 / /sys/fs/cgroup rw,nosuid,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate
"""

# An old systemd host, pure v1: co-mounted cpu,cpuacct and net_cls,net_prio, a named
# hierarchy with xattr, and a bind mount of a memory subtree elsewhere listed first.
PURE_V1 = """\
20 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw
24 20 0:33 /docker/abc /var/lib/bind\\040me rw,relatime shared:99 - cgroup cgroup rw,memory
25 20 0:20 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:3 - tmpfs tmpfs ro,mode=755
26 25 0:21 / /sys/fs/cgroup/systemd rw shared:4 - cgroup cgroup rw,xattr,release_agent=/x,name=sd
27 25 0:24 / /sys/fs/cgroup/cpu,cpuacct rw,relatime shared:7 - cgroup cgroup rw,cpu,cpuacct
28 25 0:25 / /sys/fs/cgroup/net_cls,net_prio rw shared:8 master:1 - cgroup net rw,net_cls,net_prio
29 25 0:33 / /sys/fs/cgroup/memory rw,relatime shared:9 - cgroup cgroup rw,memory
30 25 0:26 / /sys/fs/cgroup/pids rw,relatime shared:10 - cgroup cgroup rw,pids
31 25 0:27 / /sys/fs/cgroup/blkio rw,relatime shared:11 - cgroup cgroup rw,blkio
"""


# --------------------------------------------------------------------------- mountinfo


def test_hybrid_host_is_v1_with_the_unified_tree() -> None:
    layout = layout_from_mounts(parse_mountinfo(HYBRID), root_magic=TMPFS_MAGIC)
    assert layout.driver == "v1"
    assert layout.unified == "/sys/fs/cgroup/unified"
    assert layout.v1_mounts["cpu"] == "/sys/fs/cgroup/cpu"
    assert layout.v1_mounts["cpuacct"] == "/sys/fs/cgroup/cpuacct"
    assert layout.v1_mounts["memory"] == "/sys/fs/cgroup/memory"
    assert "name=systemd" not in layout.v1_mounts
    assert "rw" not in layout.v1_mounts


def test_pure_v2_host() -> None:
    mounts = parse_mountinfo(PURE_V2)
    assert mounts == [CgroupMount(mount_point="/sys/fs/cgroup", fstype="cgroup2", root="/")]
    layout = layout_from_mounts(mounts, root_magic=CGROUP2_SUPER_MAGIC)
    assert layout == CgroupLayout(driver="v2", unified="/sys/fs/cgroup")


def test_pure_v1_host_with_comounted_controllers() -> None:
    mounts = parse_mountinfo(PURE_V1)
    assert mounts[0].mount_point == "/var/lib/bind me"  # \040 unescaped
    assert mounts[0].root == "/docker/abc"
    assert mounts[2].controllers == frozenset({"cpu", "cpuacct"})
    layout = layout_from_mounts(mounts, root_magic=TMPFS_MAGIC)
    assert layout.driver == "v1"
    assert layout.unified is None
    assert layout.v1_mounts["cpu"] == layout.v1_mounts["cpuacct"] == "/sys/fs/cgroup/cpu,cpuacct"
    assert layout.v1_mounts["net_prio"] == "/sys/fs/cgroup/net_cls,net_prio"
    # The full mount wins over the bind mount of a subtree listed before it.
    assert layout.v1_mounts["memory"] == "/sys/fs/cgroup/memory"


def test_v1_driver_shares_the_directory_of_comounted_controllers() -> None:
    layout = layout_from_mounts(parse_mountinfo(PURE_V1), root_magic=TMPFS_MAGIC)
    driver = open_cgroup_driver(instance="inst", layout=layout)
    assert isinstance(driver, CgroupV1Driver)
    assert driver.paths(env="web") == (
        "/sys/fs/cgroup/memory/inst/web",
        "/sys/fs/cgroup/cpu,cpuacct/inst/web",
        "/sys/fs/cgroup/pids/inst/web",
        "/sys/fs/cgroup/blkio/inst/web",
    )


def test_hybrid_driver_joins_the_unified_tree_too() -> None:
    layout = layout_from_mounts(parse_mountinfo(HYBRID), root_magic=TMPFS_MAGIC)
    driver = open_cgroup_driver(instance="inst", layout=layout)
    assert driver.driver == "v1"
    assert driver.procs_files(env="web") == (
        "/sys/fs/cgroup/memory/inst/web/cgroup.procs",
        "/sys/fs/cgroup/cpu/inst/web/cgroup.procs",
        "/sys/fs/cgroup/cpuacct/inst/web/cgroup.procs",
        "/sys/fs/cgroup/pids/inst/web/cgroup.procs",
        "/sys/fs/cgroup/blkio/inst/web/cgroup.procs",
        "/sys/fs/cgroup/unified/inst/web/cgroup.procs",
    )


def test_v2_driver_paths() -> None:
    driver = open_cgroup_driver(instance="inst", layout=CgroupLayout(driver="v2", unified="/cg"))
    assert isinstance(driver, CgroupV2Driver)
    assert driver.driver == "v2"
    assert driver.paths(env="web") == ("/cg/inst/web",)


def test_cgroup2_mounted_elsewhere_without_v1_is_v2() -> None:
    text = "30 25 0:26 / /mnt/cg rw - cgroup2 cgroup2 rw\n"
    layout = layout_from_mounts(parse_mountinfo(text), root_magic=None)
    assert layout == CgroupLayout(driver="v2", unified="/mnt/cg")


def test_no_cgroup_mount_is_a_clear_error() -> None:
    with pytest.raises(KernelError, match="no cgroup filesystem is mounted"):
        layout_from_mounts(
            parse_mountinfo("22 1 254:0 / / rw - ext4 /dev/vda rw\n"), root_magic=None
        )


def test_malformed_lines_are_skipped() -> None:
    assert parse_mountinfo("garbage\n1 2 3\n\n") == []


@pytest.mark.parametrize("name", ["", "..", "a/b", "-x", "x y"])
def test_unsafe_names_are_refused(name: str) -> None:
    driver = open_cgroup_driver(instance="inst", layout=CgroupLayout(driver="v2", unified="/cg"))
    with pytest.raises(ValueError, match="invalid cgroup environment name"):
        driver.paths(env=name)


def test_this_hosts_layout_is_discovered() -> None:
    # Read-only: mountinfo and statfs need no root.
    layout = fs.discover_layout()
    assert layout.driver in ("v1", "v2")
    assert layout.v1_mounts or layout.unified


# --------------------------------------------------------------------------- values


@pytest.mark.parametrize(
    ("millis", "quota"), [(500, 50_000), (1000, 100_000), (10, 1_000), (2500, 250_000)]
)
def test_cpu_millis_and_quota_round_trip(millis: int, quota: int) -> None:
    assert fs.cpu_quota_us(millis) == quota
    assert fs.cpu_millis(quota_us=quota, period_us=fs.CPU_PERIOD_US) == millis


def test_cpu_millis_from_other_periods_and_unlimited() -> None:
    assert fs.cpu_millis(quota_us=25_000, period_us=50_000) == 500
    assert fs.cpu_millis(quota_us=-1, period_us=100_000) is None
    assert fs.cpu_millis(quota_us=None, period_us=100_000) is None
    assert fs.cpu_quota_us(None) is None


def test_cpu_max_parsing_and_rendering() -> None:
    assert fs.parse_cpu_max("max 100000") == (None, 100_000)
    assert fs.parse_cpu_max("50000 100000") == (50_000, 100_000)
    assert fs.parse_cpu_max(None) == (None, fs.CPU_PERIOD_US)
    assert fs.render_cpu_max(50_000) == "50000 100000"
    assert fs.render_cpu_max(None) == "max 100000"


def test_memory_limit_parsing() -> None:
    assert fs.parse_memory_limit("9223372036854771712") is None  # v1 "unlimited"
    assert fs.parse_memory_limit("max") is None
    assert fs.parse_memory_limit("-1") is None
    assert fs.parse_memory_limit(None) is None
    assert fs.parse_memory_limit("268435456") == 256 * MI


def test_memory_limits_compare_in_pages() -> None:
    assert fs.round_to_page(100_000_001) == 100_000_001 - 100_000_001 % os.sysconf("SC_PAGE_SIZE")
    assert fs.round_to_page(256 * MI) == 256 * MI


def test_io_max_parsing() -> None:
    text = (
        "8:16 rbps=2097152 wbps=max riops=max wiops=120\n"
        "254:0 rbps=max wbps=max riops=max wiops=max\n"
    )
    assert fs.parse_io_max(text) == {"8:16": (2097152, None, None, 120)}
    assert fs.parse_io_max("") == {}
    assert fs.parse_io_max(None) == {}


def test_io_max_rendering_spells_every_key() -> None:
    assert fs.render_io_max("254:0", (50 * MI, None, 2000, None)) == (
        "254:0 rbps=52428800 wbps=max riops=2000 wiops=max"
    )
    line = fs.render_io_max("8:0", (1, 2, 3, 4))
    assert fs.parse_io_max(line) == {"8:0": (1, 2, 3, 4)}


def test_blkio_device_file_parsing() -> None:
    assert fs.parse_blkio_device_file("254:0 52428800\n8:0 0\n8:16 1000\n") == {
        "254:0": 52428800,
        "8:16": 1000,
    }
    assert fs.parse_blkio_device_file("") == {}
    assert fs.parse_blkio_device_file(None) == {}


@pytest.mark.parametrize(
    ("value", "text"),
    [(64 * MI, "64Mi"), (2**30, "1Gi"), (512, "512"), (4096, "4Ki"), (int(120.3 * MI), "120.3Mi")],
)
def test_format_bytes(value: int, text: str) -> None:
    assert fs.format_bytes(value) == text


def test_max_values() -> None:
    assert fs.parse_max("max") is None
    assert fs.parse_max("128") == 128
    assert fs.render_max(None) == "max"
    assert fs.render_max(128) == "128"


# --------------------------------------------------------------------------- devices


def test_missing_device_path() -> None:
    with pytest.raises(ValueError, match=r"^/dev/vdz-missing: no such block device$"):
        resolve_block_device("/dev/vdz-missing")


def test_character_device_is_not_a_block_device() -> None:
    with pytest.raises(ValueError, match=r"^/dev/null: not a block device$"):
        resolve_block_device("/dev/null")


def test_partition_resolves_to_its_disk_through_sysfs(tmp_path: Path) -> None:
    # The shape of /sys: /sys/dev/block/MAJ:MIN links into /sys/devices/.../block/<disk>.
    disk = tmp_path / "devices" / "block" / "sdb"
    (disk / "sdb1").mkdir(parents=True)
    (disk / "dev").write_text("8:16\n")
    (disk / "sdb1" / "dev").write_text("8:17\n")
    (disk / "sdb1" / "partition").write_text("1\n")
    by_number = tmp_path / "dev" / "block"
    by_number.mkdir(parents=True)
    (by_number / "8:16").symlink_to(disk)
    (by_number / "8:17").symlink_to(disk / "sdb1")
    assert whole_disk("8:17", sys_dev_block=str(by_number)) == "8:16"
    assert whole_disk("8:16", sys_dev_block=str(by_number)) == "8:16"
    assert whole_disk("9:9", sys_dev_block=str(by_number)) == "9:9"


# --------------------------------------------------------------------------- v2 diff logic


def _fake_v2_tree(root: Path, *, enabled: str = "cpu io memory pids") -> CgroupV2Driver:
    """The files a cgroup2 tree shows for root, parent `inst` and env `web`, unlimited."""
    (root / "inst" / "web").mkdir(parents=True)
    (root / "cgroup.controllers").write_text("cpuset cpu io memory hugetlb pids\n")
    (root / "cgroup.subtree_control").write_text(enabled + "\n")
    (root / "inst" / "cgroup.controllers").write_text(enabled + "\n")
    (root / "inst" / "cgroup.subtree_control").write_text(enabled + "\n")
    env = root / "inst" / "web"
    (env / "memory.max").write_text("max\n")
    (env / "cpu.max").write_text("max 100000\n")
    (env / "pids.max").write_text("max\n")
    (env / "io.max").write_text("")
    driver = open_cgroup_driver(
        instance="inst", layout=CgroupLayout(driver="v2", unified=str(root))
    )
    assert isinstance(driver, CgroupV2Driver)
    return driver


LIMITS = CgroupLimits(
    memory_bytes=256 * MI,
    cpu_millis=500,
    pids=128,
    io=(IoLimit(device="254:0", read_bps=50 * MI, write_iops=1000),),
)


def test_v2_ensure_writes_the_kernel_spelling_then_nothing(tmp_path: Path) -> None:
    driver = _fake_v2_tree(tmp_path)
    env = tmp_path / "inst" / "web"
    changes = driver.ensure(env="web", limits=LIMITS)
    assert changes == [
        "memory.max: max -> 268435456",
        "cpu.max: max 100000 -> 50000 100000",
        "pids.max: max -> 128",
        "io.max 254:0: rbps=max wbps=max riops=max wiops=max"
        " -> rbps=52428800 wbps=max riops=max wiops=1000",
    ]
    assert (env / "memory.max").read_text() == "268435456"
    assert (env / "cpu.max").read_text() == "50000 100000"
    assert (env / "pids.max").read_text() == "128"
    assert (env / "io.max").read_text() == "254:0 rbps=52428800 wbps=max riops=max wiops=1000"
    assert driver.ensure(env="web", limits=LIMITS) == []
    state = driver.observe()["web"]
    assert state.limits == LIMITS
    assert state.complete


def test_v2_clearing_an_io_limit_writes_max_for_every_key(tmp_path: Path) -> None:
    driver = _fake_v2_tree(tmp_path)
    (tmp_path / "inst" / "web" / "io.max").write_text("8:0 rbps=1 wbps=max riops=max wiops=max\n")
    assert driver.ensure(env="web", limits=CgroupLimits()) == [
        "io.max 8:0: rbps=1 wbps=max riops=max wiops=max -> rbps=max wbps=max riops=max wiops=max"
    ]


def test_v2_limit_without_its_controller_is_a_clear_error(tmp_path: Path) -> None:
    driver = _fake_v2_tree(tmp_path, enabled="cpu pids")
    with pytest.raises(KernelError, match="memory controller is not available"):
        driver.ensure(env="web", limits=CgroupLimits(memory_bytes=MI))


def test_v2_cpu_below_the_kernel_minimum_is_a_clear_error(tmp_path: Path) -> None:
    driver = _fake_v2_tree(tmp_path)
    with pytest.raises(KernelError, match=r"cpu limit 5m for env web is below .* minimum of 10m"):
        driver.ensure(env="web", limits=CgroupLimits(cpu_millis=5))


def test_v2_enables_missing_controllers_in_the_parent(tmp_path: Path) -> None:
    driver = _fake_v2_tree(tmp_path)
    (tmp_path / "inst" / "cgroup.subtree_control").write_text("cpu\n")
    changes = driver.ensure(env="web", limits=CgroupLimits())
    assert changes == [f"{tmp_path}/inst/cgroup.subtree_control: +memory +pids +io"]


def test_module_procs_files_matches_the_driver() -> None:
    layout = layout_from_mounts(parse_mountinfo(HYBRID), root_magic=TMPFS_MAGIC)
    driver = open_cgroup_driver(instance="inst", layout=layout)
    assert procs_files(instance="inst", env="web", layout=layout) == driver.procs_files(env="web")


def test_v2_observe_reads_usage_only_when_asked(tmp_path: Path) -> None:
    driver = _fake_v2_tree(tmp_path)
    env = tmp_path / "inst" / "web"
    (env / "memory.current").write_text("4096\n")
    (env / "pids.current").write_text("3\n")
    (tmp_path / "inst" / "not a cgroup name").mkdir()  # listed, but never an env
    assert driver.env_names() == ["web"]
    full, lean = driver.observe()["web"], driver.observe(usage=False)["web"]
    assert (full.usage.memory_bytes, full.usage.pids) == (4096, 3)
    assert (lean.usage.memory_bytes, lean.usage.pids) == (0, 0)
    assert full.limits == lean.limits == CgroupLimits()
    assert full.paths == lean.paths == (str(env),)
