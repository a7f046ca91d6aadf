"""Capture files: layout, copy-truncate rotation while a writer appends, reading back.

The "writer" is an fd opened the way a workload's stdout is (O_APPEND, by
`open_for_append`), kept open across rotations exactly as a running process keeps it.
"""

from __future__ import annotations

import fcntl
import os
import stat
from pathlib import Path

import pytest

from reconciler.kernel.logfiles import (
    env_log_dir,
    log_path,
    logged_processes,
    open_for_append,
    read_logs,
    read_many,
    rotate_if_needed,
    rotated_path,
)


def _write(fd: int, text: str) -> None:
    os.write(fd, text.encode())


def test_layout_under_the_instance_dir(tmp_path: Path) -> None:
    directory = env_log_dir(tmp_path / "state" / "inst", "web")
    assert directory == tmp_path / "state" / "inst" / "logs" / "web"
    assert log_path(directory, "api") == directory / "api.log"
    assert rotated_path(directory / "api.log") == directory / "api.log.1"


def test_open_for_append_creates_private_dirs_and_file(tmp_path: Path) -> None:
    path = tmp_path / "logs" / "web" / "api.log"
    fd = open_for_append(path)
    try:
        _write(fd, "one\n")
        assert os.get_inheritable(fd) is False
        assert fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_APPEND
    finally:
        os.close(fd)
    assert path.read_text() == "one\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert logged_processes(path.parent) == ["api"]
    assert logged_processes(tmp_path / "missing") == []


def test_append_mode_survives_another_writer(tmp_path: Path) -> None:
    path = tmp_path / "api.log"
    first, second = open_for_append(path), open_for_append(path)
    try:
        _write(first, "a\n")
        _write(second, "b\n")
        _write(first, "c\n")
    finally:
        os.close(first)
        os.close(second)
    assert path.read_text() == "a\nb\nc\n"


def test_no_rotation_below_the_bound(tmp_path: Path) -> None:
    path = tmp_path / "api.log"
    path.write_text("x" * 99)
    assert rotate_if_needed(path, max_bytes=100) is False
    assert rotate_if_needed(tmp_path / "absent.log", max_bytes=1) is False
    assert not rotated_path(path).exists()


def test_copy_truncate_keeps_the_writer_appending_at_the_new_end(tmp_path: Path) -> None:
    path = tmp_path / "api.log"
    fd = open_for_append(path)
    try:
        _write(fd, "old line 1\nold line 2\n")
        assert rotate_if_needed(path, max_bytes=10) is True
        assert rotated_path(path).read_text() == "old line 1\nold line 2\n"
        assert path.stat().st_size == 0
        # The writer's offset was past the truncation point: O_APPEND puts the next
        # write at the new end, so no hole of NUL bytes appears.
        _write(fd, "new\n")
        assert path.read_bytes() == b"new\n"
        # A second rotation replaces .1: the bound is two files.
        _write(fd, "more than ten bytes\n")
        assert rotate_if_needed(path, max_bytes=10) is True
        assert rotated_path(path).read_text() == "new\nmore than ten bytes\n"
        assert stat.S_IMODE(rotated_path(path).stat().st_mode) == 0o600
    finally:
        os.close(fd)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["api.log", "api.log.1"]


def test_open_for_append_rotates_a_full_file_first(tmp_path: Path) -> None:
    path = tmp_path / "api.log"
    path.write_text("previous run\n")
    os.close(open_for_append(path, max_bytes=5))
    assert rotated_path(path).read_text() == "previous run\n"
    assert path.read_text() == ""


def test_read_logs_gives_rotated_part_first_then_current(tmp_path: Path) -> None:
    path = tmp_path / "api.log"
    rotated_path(path).write_text("1\n2\n")
    path.write_text("3\n4 no newline")
    assert list(read_logs(path)) == ["1\n", "2\n", "3\n", "4 no newline"]


def test_read_logs_of_a_missing_file_is_empty(tmp_path: Path) -> None:
    assert list(read_logs(tmp_path / "none.log")) == []


def test_read_logs_replaces_undecodable_bytes(tmp_path: Path) -> None:
    path = tmp_path / "api.log"
    path.write_bytes(b"ok \xff\n")
    assert list(read_logs(path)) == ["ok \ufffd\n"]


@pytest.mark.timeout(10)
def test_follow_continues_across_a_rotation_without_losing_lines(tmp_path: Path) -> None:
    path = tmp_path / "api.log"
    fd = open_for_append(path)
    try:
        _write(fd, "a\nb\n")
        follow = read_logs(path, follow=True)
        assert [next(follow), next(follow)] == ["a\n", "b\n"]
        # Written after we read, then rotated away before we looked again: the
        # follower finds it in .1, then continues with the new file from its start.
        _write(fd, "c\n")
        rotate_if_needed(path, max_bytes=1)
        _write(fd, "d\npartial")
        assert [next(follow), next(follow)] == ["c\n", "d\n"]
        _write(fd, " line\n")
        assert next(follow) == "partial line\n"
    finally:
        os.close(fd)


@pytest.mark.timeout(10)
def test_follow_notices_a_replaced_file(tmp_path: Path) -> None:
    path = tmp_path / "api.log"
    path.write_text("first file, long enough\n")
    follow = read_logs(path, follow=True)
    assert next(follow) == "first file, long enough\n"
    replacement = tmp_path / "new.log"
    replacement.write_text("second\n")
    replacement.replace(path)
    assert next(follow) == "second\n"


def test_read_many_prefixes_by_name_in_order(tmp_path: Path) -> None:
    api, worker = tmp_path / "api.log", tmp_path / "worker.log"
    api.write_text("a1\na2\n")
    worker.write_text("w1\n")
    assert list(read_many({"api": api, "worker": worker})) == [
        ("api", "a1\n"),
        ("api", "a2\n"),
        ("worker", "w1\n"),
    ]
