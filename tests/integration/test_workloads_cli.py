"""Issue 4 end to end: `spec.processes` run by `reconciler apply` / `run`, seen by the kernel.

Each test declares one network (`isolation: open`) and one environment `app` (hostname
`svc`, a 16Mi tmpfs at /srv/data) whose processes it chooses, and drives the command as a
user does (tests/integration/helpers.py). What runs is found *without* the product's
code: the env's cgroup directories are listed from the cgroup mounts, their
`cgroup.procs` scanned, and a workload is the process there whose /proc/PID/environ
carries `RECONCILER_PROCESS=<name>` (the tag every workload gets). Its identity is
(pid, start time from /proc/PID/stat), so a recycled pid never passes for the old one.
The state file is read only for the holder's pid (the env's namespaces and cgroup are
defined by it) and to compare the recorded pid with the one found.

Restart policy is exercised through repeated `apply`: a process that dies within
`STABLE_SECONDS` of its start is a quick failure, so the first `apply` after it shows
`Backoff` (1 s, then 2 s, 4 s, ...) in `status -o json`, and an `apply` after that time
starts it again. The controller (`run --resync 1`) is exercised for the same restart,
and for adoption across its own restart.

Every test ends with `destroy` and the leak check (`managed_reconciler`); the `destroy`
test additionally scans /proc itself. Note: the tmpfs target /srv/data is created on the
host's filesystem as an empty directory if missing (documented in
reconciler.kernel.mounts), the tmpfs itself never is.
"""

from __future__ import annotations

import itertools
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests import kernel_view
from tests.integration.helpers import Reconciler, describe, managed_reconciler
from tests.kernel_view import pid_alive, wait_until
from tests.leaks import leaked_objects, leaked_processes

ENV = "app"
HOSTNAME = "svc"
PORT = 8080
NOBODY = 65534
TAG = "RECONCILER_PROCESS"
NAMESPACES = ("net", "uts", "ipc", "mnt", "pid")
STABLE_SECONDS = 10.0  # reconciler.engine.workloads: a shorter run is a quick failure
START_DEADLINE = 10.0
HTTP_DEADLINE = 10.0
# `run --resync 1`: a 1 s back-off, a resync or wake-up, and the reconcile itself.
CONTROLLER_RESTART_DEADLINE = 8.0
READY_DEADLINE = 15.0
# Applier.now lies between the test's clock readings around `apply`; allow float noise.
EPSILON = 0.01

# One /24 per test, apart from the other modules' subnets (10.213.x, 10.200-249.x.y are
# in use there, but only concurrently within one sandbox, which these tests never share).
_SUBNET_INDEX = itertools.count(10)

API: dict[str, Any] = {
    "name": "api",
    "command": ["python3", "-m", "http.server", str(PORT), "--bind", "0.0.0.0"],
    "user": "nobody",
    "env": {"GREETING": "hi"},
    "workingDir": "/tmp",
}
SLEEPER: dict[str, Any] = {"name": "sleeper", "command": ["sleep", "3600"]}


# --------------------------------------------------------------------------- kernel view


@dataclass(frozen=True)
class Proc:
    """A process identity: pid plus start time (clock ticks since boot, stat field 22)."""

    pid: int
    start_time: int


def start_time(pid: int) -> int | None:
    """Field 22 of /proc/PID/stat, or None if the process is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # Fields after the command name (which may contain spaces) start at field 3.
    return int(stat.rpartition(")")[2].split()[19])


def running(proc: Proc) -> bool:
    """True if `proc` (that very process, not a reuse of its pid) runs and is no zombie."""
    return start_time(proc.pid) == proc.start_time and pid_alive(proc.pid)


def ns_id(pid: int | str, name: str) -> tuple[int, int]:
    st = os.stat(f"/proc/{pid}/ns/{name}")
    return st.st_dev, st.st_ino


def status_field(pid: int, key: str) -> list[str]:
    """The values of `key:` in /proc/PID/status, split on whitespace."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name == key:
            return value.split()
    raise AssertionError(f"no {key} in /proc/{pid}/status")


def environ_of(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    pairs = (entry.decode(errors="replace").partition("=") for entry in raw.split(b"\0") if entry)
    return {key: value for key, _, value in pairs}


def mounts_at(mountinfo: str, target: str) -> list[tuple[str, str]]:
    """(fstype, super options) of every mount at `target` in a mountinfo text."""
    found = []
    for line in mountinfo.splitlines():
        left, _, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if len(fields) > 4 and fields[4] == target and len(tail) >= 3:
            found.append((tail[0], tail[2]))
    return found


def cgroup_paths(lines: list[str]) -> dict[str, str]:
    """/proc/PID/cgroup lines ("4:memory:/a/b") as controller -> path ("" for v2)."""
    paths = {}
    for line in lines:
        _, controllers, path = line.split(":", 2)
        for controller in controllers.split(","):
            paths[controller] = path
    return paths


def kill(proc: Proc) -> None:
    """SIGKILL `proc` through a pidfd, after checking it is still that process."""
    fd = os.pidfd_open(proc.pid)
    try:
        assert start_time(proc.pid) == proc.start_time, f"{proc} is gone already"
        signal.pidfd_send_signal(fd, signal.SIGKILL)
    finally:
        os.close(fd)


def http_status(url: str) -> int:
    """GET `url` without any proxy from the environment; the status code."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=2) as response:
        status: int = response.status
        return status


# --------------------------------------------------------------------------- the harness


@dataclass
class Workloads:
    """One test's instance: its manifests, its env `app`, and the controllers it started."""

    rc: Reconciler
    root: Path
    network: str
    subnet: str
    address: str
    controllers: list[subprocess.Popen[str]] = field(default_factory=list)

    # -- manifests and commands

    def write(self, *processes: dict[str, Any]) -> None:
        """Declare the network and env `app` with `processes`."""
        network = {
            "apiVersion": "reconciler/v1",
            "kind": "Network",
            "metadata": {"name": self.network},
            "spec": {"subnet": self.subnet, "isolation": "open"},
        }
        env = {
            "apiVersion": "reconciler/v1",
            "kind": "Environment",
            "metadata": {"name": ENV},
            "spec": {
                "hostname": HOSTNAME,
                "network": {"name": self.network, "address": self.address},
                "resources": {"memory": "128Mi", "pids": 64},
                "mounts": [{"type": "tmpfs", "target": "/srv/data", "size": "16Mi"}],
                "processes": list(processes),
            },
        }
        self.rc.manifests.mkdir(parents=True, exist_ok=True)
        (self.rc.manifests / "app.yaml").write_text(yaml.safe_dump_all([network, env]))

    def apply(self) -> None:
        self.rc.ok("apply")

    def status(self, name: str) -> dict[str, Any]:
        """`status -o json`: the entry of process `name` of env `app`."""
        document = self.rc.json("status", "-o", "json")
        [env] = [e for e in document["environments"] if e["name"] == ENV]
        entries = {p["name"]: p for p in env["processes"]}
        assert name in entries, f"no process {name} in status: {env['processes']}"
        entry: dict[str, Any] = entries[name]
        return entry

    def record(self) -> dict[str, Any]:
        """The env's record in the state file."""
        record: dict[str, Any] = json.loads(self.rc.state_file.read_text())["environments"][ENV]
        return record

    def holder(self) -> int:
        pid: int = self.record()["holder"]["pid"]
        return pid

    def recorded(self, name: str) -> Proc | None:
        entry = self.record()["processes"].get(name, {})
        if entry.get("pid") is None:
            return None
        return Proc(pid=entry["pid"], start_time=entry["startTime"])

    def wait_recorded(self, name: str, proc: Proc) -> None:
        """Wait until the state file records `proc` as workload `name` (a controller saves
        after its reconcile; the process runs a moment earlier)."""

        def recorded() -> bool:
            return self.rc.state_file.exists() and self.recorded(name) == proc

        wait_until(
            recorded,
            5.0,
            interval=0.05,
            message=lambda: f"state records {name} as {self.recorded(name)}, not {proc}",
            ignore=(OSError, KeyError, ValueError),
        )

    # -- what the kernel shows

    def cgroup_dirs(self) -> list[Path]:
        """The env's cgroup directory in every mounted hierarchy that has one."""
        dirs = [m.path / self.rc.instance / ENV for m in kernel_view.cgroup_mounts()]
        return [d for d in dirs if d.is_dir()]

    def tagged(self, name: str) -> set[Proc]:
        """Live processes in the env's cgroups whose environment names workload `name`."""
        found = set()
        for pid in kernel_view.pids_in_cgroup_dirs(self.cgroup_dirs()):
            try:
                tagged = environ_of(pid).get(TAG) == name
            except (FileNotFoundError, ProcessLookupError):
                continue
            began = start_time(pid)
            if tagged and began is not None and pid_alive(pid):
                found.add(Proc(pid, began))
        return found

    def one(self, name: str, *, other_than: Proc | None = None) -> Proc:
        """Wait for exactly one workload `name` (not `other_than`); it must be the recorded one."""

        def single() -> Proc | None:
            procs = self.tagged(name)
            if len(procs) != 1:
                return None
            [proc] = procs
            return proc if proc != other_than else None

        proc = wait_until(
            single,
            START_DEADLINE,
            message=lambda: f"not exactly one new {name}: {self.tagged(name)}",
        )
        assert proc is not None
        return proc

    def url(self, port: int = PORT, path: str = "/") -> str:
        return f"http://{self.address}:{port}{path}"

    # -- the controller

    def start_controller(self) -> subprocess.Popen[str]:
        """`reconciler run --resync 1`, once it holds the lock and the state is saved."""
        log = self.root / f"run-{len(self.controllers)}.log"
        argv = [
            sys.executable,
            "-m",
            "reconciler",
            "--manifests",
            str(self.rc.manifests),
            "--state-dir",
            str(self.rc.state_dir),
            "--instance",
            self.rc.instance,
            "--log-format",
            "json",
            "run",
            "--resync",
            "1",
        ]
        env = {k: v for k, v in os.environ.items() if not k.startswith("RECONCILER_")}
        with log.open("w") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, text=True, env=env)
        self.controllers.append(proc)
        lock = self.rc.state_dir / self.rc.instance / "lock"

        def ready() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"run exited {proc.returncode}:\n{log.read_text()}")
            holder = json.loads(lock.read_text() or "{}") if lock.exists() else {}
            return holder.get("pid") == proc.pid and self.rc.state_file.exists()

        wait_until(ready, READY_DEADLINE, message=lambda: f"run not ready:\n{log.read_text()}")
        return proc

    def stop_controller(self, proc: subprocess.Popen[str]) -> int:
        """SIGTERM and wait; the exit code."""
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
            raise AssertionError("run ignored SIGTERM for 30s") from None


@pytest.fixture
def wl(sandbox: None, instance: str, tmp_path: Path, state_dir: Path) -> Iterator[Workloads]:
    """A fresh instance; afterwards every controller is stopped, then destroy + leak check."""
    index = next(_SUBNET_INDEX)
    rc = Reconciler(manifests=tmp_path / "manifests", state_dir=state_dir, instance=instance)
    harness = Workloads(
        rc=rc,
        root=tmp_path,
        network=f"wn{index}",
        subnet=f"10.219.{index}.0/24",
        address=f"10.219.{index}.10",
    )
    with managed_reconciler(rc):
        try:
            yield harness
        finally:
            for proc in harness.controllers:
                harness.stop_controller(proc)


# --------------------------------------------------------------------------- inside the env


def test_process_runs_in_every_namespace_and_the_cgroup_of_the_env(wl: Workloads) -> None:
    wl.write(API)
    wl.apply()
    api = wl.one("api")
    assert wl.recorded("api") == api, "the state file records another process"
    holder = wl.holder()
    for name in NAMESPACES:
        assert ns_id(api.pid, name) == ns_id(holder, name), f"{name}: not the holder's"
        assert ns_id(api.pid, name) != ns_id("self", name), f"{name}: the test's own"
    netns = f"{wl.rc.instance}-{ENV}"
    assert os.stat(f"/proc/{api.pid}/ns/net").st_ino == kernel_view.netns_inode(netns)

    # cgroup: the env's in the memory and pids hierarchies, and never the test's.
    own = cgroup_paths(Path("/proc/self/cgroup").read_text().splitlines())
    lines = cgroup_paths(kernel_view.proc_cgroups(api.pid))
    for controller in ("memory", "pids"):
        assert lines[controller] == f"/{wl.rc.instance}/{ENV}", lines
        assert lines[controller] != own.get(controller)
    assert kernel_view.proc_cgroups(api.pid) == kernel_view.proc_cgroups(holder)

    # Its own pid namespace: two levels, and inside it is not the host's pid.
    nspid = [int(p) for p in status_field(api.pid, "NSpid")]
    assert len(nspid) == 2 and nspid[0] == api.pid and nspid[1] != api.pid, nspid
    assert [int(p) for p in status_field(holder, "NSpid")][-1] == 1, "holder is not pid 1"

    assert status_field(api.pid, "Uid") == [str(NOBODY)] * 4
    environ = environ_of(api.pid)
    assert environ.get("GREETING") == "hi"
    assert environ.get(TAG) == "api"
    assert os.readlink(f"/proc/{api.pid}/cwd") == "/tmp"

    inside = mounts_at(Path(f"/proc/{api.pid}/mountinfo").read_text(), "/srv/data")
    assert inside, "no mount at /srv/data inside the env"
    fstype, options = inside[-1]
    assert fstype == "tmpfs"
    assert "size=16384k" in options.split(","), options
    assert mounts_at(Path("/proc/self/mountinfo").read_text(), "/srv/data") == []


def test_service_answers_at_the_env_address_and_logs_show_it(wl: Workloads) -> None:
    wl.write(API)
    wl.apply()
    wl.one("api")
    probe = secrets.token_hex(4)
    path = f"/?probe={probe}"
    wait_until(
        lambda: http_status(wl.url(path=path)) == 200,
        HTTP_DEADLINE,
        interval=0.1,
        message=f"no HTTP 200 from {wl.url(path=path)}",
    )

    def logged() -> str | None:
        result = wl.rc.ok("logs", ENV, "api")
        return result.stdout if f'"GET {path} HTTP/1.1" 200' in result.stdout else None

    wait_until(logged, 5.0, interval=0.1, message=lambda: wl.rc("logs", ENV, "api").stdout)


def test_exec_prints_the_env_hostname_and_returns_the_exit_code(wl: Workloads) -> None:
    wl.write(API)
    wl.apply()
    result = wl.rc("exec", ENV, "hostname")
    assert (result.returncode, result.stdout) == (0, f"{HOSTNAME}\n"), describe(result)
    failed = wl.rc("exec", ENV, "--", "sh", "-c", "exit 7")
    assert failed.returncode == 7, describe(failed)


# --------------------------------------------------------------------------- restart policies


def test_killed_process_backs_off_then_the_next_apply_restarts_it(wl: Workloads) -> None:
    wl.write(API)
    wl.apply()
    started = time.monotonic()
    api = wl.one("api")
    assert any(
        line.endswith(f":/{wl.rc.instance}/{ENV}") for line in kernel_view.proc_cgroups(api.pid)
    ), "refusing to kill a process outside the env's cgroup"
    kill(api)
    wait_until(lambda: not running(api), 5.0, message=f"{api} survived SIGKILL")

    wl.apply()
    assert time.monotonic() - started < STABLE_SECONDS, "too slow: not a quick failure"
    entry = wl.status("api")
    assert (entry["state"], entry["restarts"], entry["exitCode"]) == ("Backoff", 0, 128 + 9)
    until = entry["backoffUntil"]
    assert until is not None and until > time.time() - 1.0, entry
    assert wl.tagged("api") == set(), "restarted during its back-off"

    wait_until(lambda: time.time() > until, 5.0, message="back-off never ended")
    wl.apply()
    again = wl.one("api", other_than=api)
    assert wl.recorded("api") == again
    entry = wl.status("api")
    assert (entry["state"], entry["restarts"], entry["pid"]) == ("Running", 1, again.pid)
    wait_until(lambda: http_status(wl.url()) == 200, HTTP_DEADLINE, interval=0.1, message="no HTTP")


def _past(epoch: float) -> bool:
    return time.time() > epoch


def _wait_exited(wl: Workloads, name: str, runs: Path, count: int) -> None:
    """Wait until `name` has run `count` times (lines in `runs`) and none of it is left."""
    wait_until(
        lambda: runs.exists() and len(runs.read_text().splitlines()) >= count,
        START_DEADLINE,
        message=f"{name} did not run {count} time(s)",
    )
    assert len(runs.read_text().splitlines()) == count
    recorded = wl.recorded(name)
    assert recorded is not None
    wait_until(lambda: not running(recorded) and not wl.tagged(name), 5.0, message="still up")


def test_crash_looping_process_backs_off_longer_each_time(wl: Workloads) -> None:
    runs = wl.root / "crash.runs"
    crash = {"name": "crash", "command": ["sh", "-c", f"echo run >> {runs}; exit 3"]}
    wl.write(crash)  # restartPolicy defaults to Always
    wl.apply()
    delays: list[tuple[float, float]] = []
    for attempt, delay in enumerate([1.0, 2.0, 4.0], start=1):
        _wait_exited(wl, "crash", runs, attempt)
        before = time.time()
        wl.apply()
        after = time.time()
        entry = wl.status("crash")
        assert (entry["state"], entry["exitCode"]) == ("Backoff", 3), entry
        assert entry["restarts"] == attempt - 1
        until = entry["backoffUntil"]
        # The delay was measured from a `now` between `before` and `after`.
        assert until - after <= delay + EPSILON and until - before >= delay - EPSILON, (
            f"attempt {attempt}: back-off until {until}, apply ran in [{before}, {after}], "
            f"expected a {delay}s delay"
        )
        delays.append((until - after, until - before))
        if attempt == 3:
            break
        assert len(runs.read_text().splitlines()) == attempt, "restarted during back-off"
        wait_until(partial(_past, until), delay + 2, message="back-off never ended")
        wl.apply()
        assert wl.status("crash")["restarts"] == attempt
    lows = [low for low, _ in delays]
    assert lows == sorted(lows) and len(set(lows)) == 3, f"back-off did not grow: {delays}"


def test_on_failure_exit_zero_and_never_stay_exited(wl: Workloads) -> None:
    ok_runs, never_runs = wl.root / "ok.runs", wl.root / "never.runs"
    wl.write(
        {
            "name": "job",
            "command": ["sh", "-c", f"echo run >> {ok_runs}; exit 0"],
            "restartPolicy": "OnFailure",
        },
        {
            "name": "once",
            "command": ["sh", "-c", f"echo run >> {never_runs}; exit 5"],
            "restartPolicy": "Never",
        },
    )
    wl.apply()
    _wait_exited(wl, "job", ok_runs, 1)
    _wait_exited(wl, "once", never_runs, 1)
    for _ in range(2):
        wl.apply()
        job, once = wl.status("job"), wl.status("once")
        assert (job["state"], job["exitCode"], job["restarts"]) == ("Exited", 0, 0), job
        assert (once["state"], once["exitCode"], once["restarts"]) == ("Exited", 5, 0), once
        assert wl.recorded("job") is None and wl.recorded("once") is None
    assert len(ok_runs.read_text().splitlines()) == 1
    assert len(never_runs.read_text().splitlines()) == 1
    assert wl.tagged("job") == set() and wl.tagged("once") == set()


# --------------------------------------------------------------------------- edits


def test_changing_one_command_restarts_only_that_process(wl: Workloads) -> None:
    wl.write(API, SLEEPER)
    wl.apply()
    api, sleeper = wl.one("api"), wl.one("sleeper")
    changed = {**API, "command": ["python3", "-m", "http.server", "8081", "--bind", "0.0.0.0"]}
    wl.write(changed, SLEEPER)
    wl.apply()
    new_api = wl.one("api", other_than=api)
    assert not running(api), "the old api still runs"
    assert running(sleeper) and wl.tagged("sleeper") == {sleeper}, "sleeper was restarted"
    assert wl.status("api")["restarts"] == 1
    assert wl.status("sleeper")["restarts"] == 0
    assert Path(f"/proc/{new_api.pid}/cmdline").read_bytes().split(b"\0")[3] == b"8081"
    wait_until(
        lambda: http_status(wl.url(port=8081)) == 200,
        HTTP_DEADLINE,
        interval=0.1,
        message="the changed api does not answer on 8081",
    )


def test_removed_process_is_stopped(wl: Workloads) -> None:
    wl.write(API, SLEEPER)
    wl.apply()
    api, sleeper = wl.one("api"), wl.one("sleeper")
    wl.write(API)
    wl.apply()
    wait_until(lambda: not running(sleeper), 5.0, message=f"removed {sleeper} still runs")
    assert wl.tagged("sleeper") == set()
    assert running(api) and wl.tagged("api") == {api}
    [env] = wl.rc.json("status", "-o", "json")["environments"]
    assert [p["name"] for p in env["processes"]] == ["api"]


# --------------------------------------------------------------------------- adoption, teardown


def test_lost_state_file_adopts_the_running_process(wl: Workloads) -> None:
    wl.write(API)
    wl.apply()
    api, holder = wl.one("api"), wl.holder()
    for name in ("state.json", "state.json.bak"):
        (wl.rc.state_file.parent / name).unlink(missing_ok=True)
    wl.apply()
    assert wl.tagged("api") == {api}, "not exactly the same single api process"
    assert running(api)
    assert wl.recorded("api") == api
    assert wl.holder() == holder
    assert wl.status("api")["state"] == "Running"


def test_destroy_leaves_no_process_of_the_instance(wl: Workloads) -> None:
    wl.write(API, SLEEPER)
    wl.apply()
    wl.one("api")
    wl.one("sleeper")
    members = kernel_view.pids_in_cgroup_dirs(wl.cgroup_dirs())
    procs = {Proc(pid, began) for pid in members if (began := start_time(pid)) is not None}
    assert len(procs) >= 5, f"expected holder, 2 shims, 2 workloads: {procs}"
    wl.rc.ok("destroy")
    assert [p for p in procs if running(p)] == []
    scan = [
        pid
        for pid in kernel_view.all_pids()
        if any(
            f"/{wl.rc.instance}/" in line or line.endswith(f"/{wl.rc.instance}")
            for line in kernel_view.proc_cgroups(pid)
        )
        and pid_alive(pid)
    ]
    assert scan == []
    assert leaked_processes(wl.rc.instance) == []
    assert leaked_objects(wl.rc.instance) == []


# --------------------------------------------------------------------------- the controller


def test_controller_restarts_a_killed_process(wl: Workloads) -> None:
    wl.write(SLEEPER)
    wl.start_controller()
    sleeper = wl.one("sleeper")
    kill(sleeper)
    killed = time.monotonic()
    again = wl.one("sleeper", other_than=sleeper)
    took = time.monotonic() - killed
    assert took < CONTROLLER_RESTART_DEADLINE, f"restarted only after {took:.1f}s"
    print(f"killed -> restarted by the controller: {took:.2f}s")

    def counted() -> bool:
        entry = wl.status("sleeper")
        return bool(entry["restarts"] == 1 and entry["pid"] == again.pid)

    wait_until(counted, 5.0, interval=0.1, message=lambda: str(wl.status("sleeper")))


def test_controller_restart_keeps_pids_and_notices_exits_while_down(wl: Workloads) -> None:
    worker = {"name": "worker", "command": ["sleep", "3600"]}
    wl.write(API, worker)
    first = wl.start_controller()
    api, old_worker = wl.one("api"), wl.one("worker")
    wl.wait_recorded("api", api)  # the state is saved after the reconcile that started it
    holder = wl.holder()
    assert wl.stop_controller(first) == 0
    assert running(api) and running(old_worker), "workloads died with the controller"
    kill(old_worker)  # an exit while no controller runs
    wait_until(lambda: not running(old_worker), 5.0, message="worker survived SIGKILL")

    wl.start_controller()
    # The worker coming back proves the new controller has reconciled the env.
    new_worker = wl.one("worker", other_than=old_worker)
    assert wl.tagged("api") == {api}, "api was restarted or duplicated"
    assert running(api)
    assert wl.holder() == holder
    wl.wait_recorded("worker", new_worker)
    assert wl.recorded("api") == api
