"""The cgroup file helpers on plain files and directories (no root): reads end at EOF
whatever the size, missing files read as None, and cgroup trees list deepest first.

Regular files and tmpfs directories follow the rules the helpers rely on for cgroupfs: a
read shorter than the buffer is the end, and a directory's link count is 2 plus its
number of subdirectories.
"""

from __future__ import annotations

from pathlib import Path

from reconciler.kernel import cgroupfs as fs


def test_read_file_strips_and_missing_reads_as_none(tmp_path: Path) -> None:
    (tmp_path / "pids.max").write_text("max\n")
    assert fs.read_file(str(tmp_path / "pids.max")) == "max"
    assert fs.read_file(str(tmp_path / "absent")) is None
    assert fs.read_file(str(tmp_path / "pids.max" / "below-a-file")) is None


def test_large_files_are_read_whole(tmp_path: Path) -> None:
    # Bigger than one read's buffer: both helpers must keep reading to the end.
    pids = [str(pid) for pid in range(1, 30_001)]
    procs = tmp_path / "cgroup.procs"
    procs.write_text("\n".join(pids) + "\n")
    assert procs.stat().st_size > 65536
    assert fs.read_pids(str(procs)) == list(range(1, 30_001))
    table = tmp_path / "blkio.throttle.read_bps_device"
    lines = [f"8:{minor} 1048576" for minor in range(5_000)]
    table.write_text("\n".join(lines) + "\n")
    assert table.stat().st_size > 65536
    assert fs.parse_blkio_device_file(fs.read_file(str(table))) == {
        f"8:{minor}": 1048576 for minor in range(5_000)
    }


def test_read_pids_skips_pids_invisible_from_here(tmp_path: Path) -> None:
    (tmp_path / "cgroup.procs").write_text("0\n12\n0\n34\n")
    assert fs.read_pids(str(tmp_path / "cgroup.procs")) == [12, 34]
    assert fs.read_pids(str(tmp_path / "gone" / "cgroup.procs")) == []


def test_cgroup_tree_lists_deepest_first(tmp_path: Path) -> None:
    leaf = tmp_path / "leaf"
    leaf.mkdir()
    (leaf / "cgroup.procs").write_text("")  # files do not count, only directories
    assert fs.cgroup_tree(str(leaf)) == [str(leaf)]
    top = tmp_path / "top"
    (top / "a" / "deep").mkdir(parents=True)
    (top / "b").mkdir()
    tree = fs.cgroup_tree(str(top))
    assert sorted(tree) == sorted(str(p) for p in (top, top / "a", top / "a" / "deep", top / "b"))
    assert tree[-1] == str(top)
    assert tree.index(str(top / "a" / "deep")) < tree.index(str(top / "a"))
    assert fs.cgroup_tree(str(tmp_path / "absent")) == []
