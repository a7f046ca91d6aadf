"""The instance lock and process identity, checked against the kernel's own view.

Real processes and real flocks; other processes are synchronised through pipes (a child
prints a line when it holds the lock and releases when its stdin closes), never sleeps.
"""

from __future__ import annotations

import json
import os
import re
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from reconciler.errors import LockedError, StateError
from reconciler.state.lock import InstanceLock, read_holder
from reconciler.state.procinfo import boot_id, process_alive, process_start_time

O_CLOEXEC_FDINFO = 0o2000000  # the `flags:` field of /proc/PID/fdinfo is octal

HOLD_WITH_INSTANCE_LOCK = """
import sys
from pathlib import Path
from reconciler.state.lock import InstanceLock
lock = InstanceLock(Path(sys.argv[1]), command="reconciler run")
lock.acquire()
print("ready", flush=True)
sys.stdin.read()
lock.release()
print("released", flush=True)
"""

# Takes the flock with no holder record: what a forked child holding an inherited
# descriptor looks like from the outside.
HOLD_RAW_FLOCK = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
fcntl.flock(fd, fcntl.LOCK_EX)
print("ready", flush=True)
sys.stdin.read()
"""

REPORT_START_THEN_RENAME = """
import sys
with open("/proc/self/stat") as f:
    start = f.read().split()[21]  # comm is plain "python..." here, so a split is exact
with open("/proc/self/comm", "w") as f:
    f.write(sys.argv[1])
print(start, flush=True)
sys.stdin.read()
"""


@pytest.fixture
def children() -> Iterator[list[subprocess.Popen[str]]]:
    """Processes a test starts; each is ended by its own pid afterwards."""
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=30)
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                stream.close()


def spawn(children: list[subprocess.Popen[str]], code: str, *args: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", code, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    children.append(proc)
    return proc


def read_line(proc: subprocess.Popen[str], *, timeout: float = 30.0) -> str:
    """The child's next line, failing (not hanging) if it does not come within `timeout`."""
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, f"child {proc.pid} said nothing within {timeout}s"
    return proc.stdout.readline().strip()


def finish(proc: subprocess.Popen[str]) -> None:
    """Close the child's stdin (its signal to release) and wait for it to exit."""
    assert proc.stdin is not None
    proc.stdin.close()
    assert proc.wait(timeout=30) == 0


def dead_process() -> tuple[int, int]:
    """(pid, start time) of a process that has exited and been reaped."""
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE
    )
    start = process_start_time(proc.pid)
    assert start is not None
    assert proc.stdin is not None
    proc.stdin.close()
    proc.wait(timeout=30)
    return proc.pid, start


def stat_field_22(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[19])


def kernel_flock_holders(path: Path) -> list[int]:
    """Pids /proc/locks lists as holding a (granted, not waiting) FLOCK on `path`."""
    st = os.stat(path)
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    pids = []
    with open("/proc/locks") as f:
        for line in f:
            fields = line.split()
            if fields[1] == "FLOCK" and fields[5] == dev:
                pids.append(int(fields[4]))
    return pids


def fds_open_on(pid: int, path: Path) -> list[int]:
    """Descriptors of `pid` that refer to `path`, from /proc/PID/fd."""
    st = os.stat(path)
    found = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            fd_st = os.stat(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:
            continue
        if (fd_st.st_dev, fd_st.st_ino) == (st.st_dev, st.st_ino):
            found.append(int(fd))
    return found


# -- procinfo --------------------------------------------------------------------------


def test_start_time_of_self_matches_proc() -> None:
    assert process_start_time(os.getpid()) == stat_field_22(os.getpid())


def test_start_time_survives_a_command_name_with_spaces_and_parentheses(
    children: list[subprocess.Popen[str]],
) -> None:
    proc = spawn(children, REPORT_START_THEN_RENAME, "a) (b c) d")
    reported = int(read_line(proc))
    with open(f"/proc/{proc.pid}/comm") as f:
        assert f.read().strip() == "a) (b c) d"
    assert process_start_time(proc.pid) == reported
    assert process_alive(proc.pid, reported)


def test_process_alive_needs_the_same_start_time() -> None:
    start = stat_field_22(os.getpid())
    assert process_alive(os.getpid(), start)
    assert not process_alive(os.getpid(), start + 1)


def test_dead_and_impossible_pids() -> None:
    pid, start = dead_process()
    assert not process_alive(pid, start)
    assert process_start_time(0) is None
    assert process_start_time(-5) is None
    assert not process_alive(0, 0)


def test_zombie_is_not_alive_but_keeps_its_start_time() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        start = process_start_time(proc.pid)
        deadline = time.monotonic() + 30
        state = ""
        while time.monotonic() < deadline:
            with open(f"/proc/{proc.pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
            if state == "Z":
                break
            time.sleep(0.01)
        assert state == "Z"
        assert process_start_time(proc.pid) == start
        assert start is not None
        assert not process_alive(proc.pid, start)
    finally:
        proc.wait(timeout=30)


def test_boot_id_is_the_kernels() -> None:
    with open("/proc/sys/kernel/random/boot_id") as f:
        assert boot_id() == f.read().strip()
    assert re.fullmatch(r"[0-9a-f]{8}-([0-9a-f]{4}-){3}[0-9a-f]{12}", boot_id())


# -- lock ------------------------------------------------------------------------------


def test_acquire_records_holder_and_the_kernel_sees_the_flock(tmp_path: Path) -> None:
    path = tmp_path / "inst" / "lock"
    lock = InstanceLock(path, command="reconciler run")
    with lock:
        assert lock.held
        assert os.stat(path).st_mode & 0o777 == 0o600
        assert kernel_flock_holders(path) == [os.getpid()]
        record = json.loads(path.read_text())
        assert record["pid"] == os.getpid()
        assert record["startTime"] == stat_field_22(os.getpid())
        assert record["command"] == "reconciler run"
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", record["since"])
        assert lock.holder() == record
    assert not lock.held
    assert kernel_flock_holders(path) == []
    assert lock.holder() is None
    assert path.exists()  # the lock file is never deleted


def test_lock_descriptor_is_close_on_exec(
    tmp_path: Path, children: list[subprocess.Popen[str]]
) -> None:
    path = tmp_path / "lock"
    with InstanceLock(path):
        (fd,) = fds_open_on(os.getpid(), path)
        with open(f"/proc/self/fdinfo/{fd}") as f:
            flags = int(next(line for line in f if line.startswith("flags:")).split()[1], 8)
        assert flags & O_CLOEXEC_FDINFO
        # A child spawned without closing descriptors still must not get it.
        child = subprocess.Popen(
            [sys.executable, "-c", "import sys; print('up', flush=True); sys.stdin.read()"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            close_fds=False,
        )
        children.append(child)
        assert read_line(child) == "up"
        assert fds_open_on(child.pid, path) == []
        finish(child)


def test_second_process_is_refused_with_the_holders_pid_then_gets_it(
    tmp_path: Path, children: list[subprocess.Popen[str]]
) -> None:
    path = tmp_path / "payments" / "lock"
    holder = spawn(children, HOLD_WITH_INSTANCE_LOCK, str(path))
    assert read_line(holder) == "ready"
    lock = InstanceLock(path)
    with pytest.raises(LockedError) as raised:
        lock.acquire()
    message = str(raised.value)
    assert f"pid {holder.pid} (reconciler run)" in message
    assert 'instance "payments"' in message
    assert "stop it first, or wait" in message
    assert "\n" not in message
    assert isinstance(raised.value, StateError)
    assert not lock.held
    assert lock.holder() is not None
    assert lock.holder()["pid"] == holder.pid  # type: ignore[index]

    finish(holder)
    lock.acquire()
    assert kernel_flock_holders(path) == [os.getpid()]
    lock.release()


def test_acquire_waits_for_the_holder_to_let_go(
    tmp_path: Path, children: list[subprocess.Popen[str]]
) -> None:
    path = tmp_path / "lock"
    holder = spawn(children, HOLD_WITH_INSTANCE_LOCK, str(path))
    assert read_line(holder) == "ready"
    assert holder.stdin is not None
    holder.stdin.close()  # the holder releases soon; acquire must keep trying until then
    with InstanceLock(path, wait=30) as lock:
        assert lock.held
        assert read_line(holder) == "released"
    assert holder.wait(timeout=30) == 0


def test_acquire_gives_up_after_wait(tmp_path: Path, children: list[subprocess.Popen[str]]) -> None:
    path = tmp_path / "lock"
    holder = spawn(children, HOLD_WITH_INSTANCE_LOCK, str(path))
    assert read_line(holder) == "ready"
    started = time.monotonic()
    with pytest.raises(LockedError, match=f"pid {holder.pid}"):
        InstanceLock(path).acquire(wait=0.3)
    assert time.monotonic() - started >= 0.3
    finish(holder)


def test_stale_record_of_a_dead_process_is_taken_over(tmp_path: Path) -> None:
    path = tmp_path / "lock"
    pid, start = dead_process()
    stale = {"pid": pid, "startTime": start, "command": "reconciler run", "since": "x"}
    path.write_text(json.dumps(stale))
    lock = InstanceLock(path)
    assert lock.holder() is None  # the recorded process is gone
    with lock:
        assert read_holder(path)["pid"] == os.getpid()  # type: ignore[index]


def test_inherited_descriptor_is_named(
    tmp_path: Path, children: list[subprocess.Popen[str]]
) -> None:
    path = tmp_path / "inst" / "lock"
    path.parent.mkdir()
    pid, start = dead_process()
    path.write_text(json.dumps({"pid": pid, "startTime": start, "command": "reconciler run"}))
    inheritor = spawn(children, HOLD_RAW_FLOCK, str(path))
    assert read_line(inheritor) == "ready"
    with pytest.raises(LockedError) as raised:
        InstanceLock(path).acquire()
    message = str(raised.value)
    assert "held by an inherited descriptor" in message
    assert f"pid {pid} (reconciler run)" in message
    assert f"pid {inheritor.pid}" in message
    finish(inheritor)


def test_lock_released_when_the_block_raises(tmp_path: Path) -> None:
    path = tmp_path / "lock"
    lock = InstanceLock(path)
    with pytest.raises(ValueError), lock:
        raise ValueError("boom")
    assert not lock.held
    assert kernel_flock_holders(path) == []


def test_double_acquire_is_a_programming_error(tmp_path: Path) -> None:
    with InstanceLock(tmp_path / "lock") as lock, pytest.raises(RuntimeError):
        lock.acquire()


def test_two_locks_in_one_process_exclude_each_other(tmp_path: Path) -> None:
    path = tmp_path / "lock"
    with InstanceLock(path), pytest.raises(LockedError, match=f"pid {os.getpid()}"):
        InstanceLock(path).acquire()
