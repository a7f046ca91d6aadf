"""`reconciler run` as a user runs it: a subprocess, a manifests directory, a resync of 1s.

Every check goes through the kernel's own view (`ip -j`, /run/netns, /proc, cgroup
files), the `reconciler events -o json` / `status -o json` commands or the metrics
endpoint, never through the controller's internals. Events are folded (a repeat is the
same event with a higher `count`), so "new since" means a new (id, count) pair.

Each test has its own instance, state dir and subnet; the `controller` fixture SIGTERMs
every `run` it started and `destroy`s the instance, whatever happened.
Waits poll with deadlines (`wait_until`); nothing sleeps to synchronise.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests import kernel_view
from tests.kernel_view import wait_until
from tests.leaks import leaked_objects

Seen = frozenset[tuple[str, int]]
RESYNC = 1.0
# "Within 2 resync intervals" (+10% jitter each), plus the reconcile itself.
REPAIR_DEADLINE = 2 * RESYNC * 1.1 + 1.5
READY_DEADLINE = 10.0  # a fresh subprocess: interpreter start, imports, first reconcile
ENV = "web"
MEMORY = 64 * 1024 * 1024


# --------------------------------------------------------------------------- the harness


@dataclass
class Controller:
    """One instance's files, and the `reconciler run` processes started for it."""

    instance: str
    root: Path
    procs: list[subprocess.Popen[str]] = field(default_factory=list)

    @property
    def manifests(self) -> Path:
        return self.root / "manifests"

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    @property
    def state_file(self) -> Path:
        return self.state_dir / self.instance / "state.json"

    @property
    def network(self) -> str:
        return f"n{self.instance[-8:]}"  # unique per test, and so is its bridge

    @property
    def subnet_prefix(self) -> str:
        tag = int(self.instance[-4:], 16)
        return f"10.{200 + tag % 50}.{tag // 256 % 256}"

    @property
    def netns(self) -> str:
        return f"{self.instance}-{ENV}"

    def argv(self, *args: str) -> list[str]:
        return [
            sys.executable,
            "-m",
            "reconciler",
            "--manifests",
            str(self.manifests),
            "--state-dir",
            str(self.state_dir),
            "--instance",
            self.instance,
            "--log-format",
            "json",
            *args,
        ]

    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.argv(*args), capture_output=True, text=True, timeout=timeout, check=False
        )

    def start(self, *args: str, wait_ready: bool = True) -> subprocess.Popen[str]:
        """Start `run --resync 1 ARGS`; by default wait until it serves.

        Serving: it holds the lock, the state file exists (written at a first start before
        anything else, else by the first reconcile) and it logged `controller.started`
        (its signal handlers are installed: a SIGTERM now is a clean stop).
        """
        log = open(self.root / f"run-{len(self.procs)}.log", "w")  # noqa: SIM115
        proc = subprocess.Popen(
            self.argv("run", "--resync", str(RESYNC), *args),
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
        )
        log.close()  # the child has its own copy
        self.procs.append(proc)
        if wait_ready:
            wait_until(
                lambda: self._ready(proc),
                READY_DEADLINE,
                message=lambda: f"run did not become ready; log:\n{self.log(proc)}",
            )
        return proc

    def _ready(self, proc: subprocess.Popen[str]) -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"run exited {proc.returncode}; log:\n{self.log(proc)}")
        lock = self.state_dir / self.instance / "lock"
        holder = json.loads(lock.read_text() or "{}") if lock.exists() else {}
        return (
            holder.get("pid") == proc.pid
            and self.state_file.exists()
            and bool(self.log_events(proc, "controller.started"))
        )

    def log(self, proc: subprocess.Popen[str]) -> str:
        return (self.root / f"run-{self.procs.index(proc)}.log").read_text()

    def log_events(self, proc: subprocess.Popen[str], name: str) -> list[dict[str, Any]]:
        """The controller's structlog lines called `name`."""
        found = []
        for line in self.log(proc).splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if entry.get("event") == name:
                found.append(entry)
        return found

    def stop(self, proc: subprocess.Popen[str], *, timeout: float = 30) -> int:
        """SIGTERM and wait; returns the exit code."""
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
            raise AssertionError(
                f"run ignored SIGTERM for {timeout}s; log:\n{self.log(proc)}"
            ) from None

    def events(self) -> list[dict[str, Any]]:
        """`reconciler events -o json`, parsed."""
        result = self.cli("events", "-o", "json")
        assert result.returncode == 0, result.stderr
        return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]

    def seen(self) -> Seen:
        """A mark of the events so far; `new_events(controller, mark)` is what came after."""
        return frozenset(_event_key(e) for e in self.events())

    def status(self) -> dict[str, Any]:
        """`reconciler status -o json`, parsed."""
        result = self.cli("status", "-o", "json")
        assert result.returncode == 0, result.stderr
        document: dict[str, Any] = json.loads(result.stdout)
        return document

    def conditions(self, env: str = ENV) -> dict[str, dict[str, Any]]:
        """The env's conditions from `status -o json`, by type."""
        [record] = [e for e in self.status()["environments"] if e["name"] == env]
        return {c["type"]: c for c in record["conditions"]}

    def state(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.state_file.read_text())
        return data

    def record(self, env: str = ENV) -> dict[str, Any]:
        record: dict[str, Any] = self.state()["environments"][env]
        return record

    # -- manifests

    def write_network(self) -> None:
        self.manifests.mkdir(parents=True, exist_ok=True)
        (self.manifests / "network.yaml").write_text(
            "apiVersion: reconciler/v1\nkind: Network\n"
            f"metadata: {{name: {self.network}}}\n"
            f"spec: {{subnet: {self.subnet_prefix}.0/24}}\n"
        )

    def env_yaml(self, *, memory: str = "64Mi", env: str = ENV) -> str:
        return (
            "apiVersion: reconciler/v1\nkind: Environment\n"
            f"metadata: {{name: {env}}}\n"
            "spec:\n"
            f"  network: {{name: {self.network}}}\n"
            f"  resources: {{memory: {memory}, pids: 64}}\n"
        )

    def write_env(self, *, memory: str = "64Mi", env: str = ENV) -> Path:
        path = self.manifests / f"{env}.yaml"
        path.write_text(self.env_yaml(memory=memory, env=env))
        return path


@pytest.fixture
def controller(sandbox: None, instance: str, tmp_path: Path) -> Iterator[Controller]:
    harness = Controller(instance=instance, root=tmp_path)
    harness.manifests.mkdir()
    yield harness
    for proc in harness.procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
    result = harness.cli("destroy")
    if result.returncode != 0 or leaked_objects(instance):
        # A test that failed half-way may leave the state file missing or corrupt (the
        # recover tests damage it on purpose): set it aside, so that `destroy` collects
        # every object carrying this instance's tag as an orphan, instead of leaking it.
        if harness.state_file.exists():
            harness.state_file.rename(harness.state_file.with_name("state.json.failed"))
        harness.state_file.with_name("state.json.bak").unlink(missing_ok=True)
        retry = harness.cli("destroy")
        assert retry.returncode == 0, f"destroy failed: {retry.stdout}{retry.stderr}"
    assert result.returncode == 0, f"destroy failed: {result.stdout}{result.stderr}"


# --------------------------------------------------------------------------- kernel checks


def host_veth(controller: Controller) -> str:
    name: str = controller.record()["hostVeth"]
    return name


def bridge(controller: Controller) -> str:
    name: str = controller.state()["networks"][controller.network]["bridge"]
    return name


def memory_file(controller: Controller, env: str = ENV) -> Path:
    for path in controller.record(env)["cgroupPaths"]:
        for name in ("memory.limit_in_bytes", "memory.max"):
            candidate = Path(path) / name
            if candidate.exists():
                return candidate
    raise AssertionError(f"no memory limit file under {controller.record(env)['cgroupPaths']}")


def holder_pid(controller: Controller, env: str = ENV) -> int:
    """The recorded holder, verified to be a catatonit inside the env's cgroup."""
    pid: int = controller.record(env)["holder"]["pid"]
    comm = Path(f"/proc/{pid}/comm").read_text().strip()
    assert comm == "catatonit", f"recorded holder pid {pid} is {comm!r}, not catatonit"
    lines = kernel_view.proc_cgroups(pid)
    assert any(f"/{controller.instance}/{env}" in line for line in lines), lines
    return pid


def env_is_live(controller: Controller, env: str = ENV) -> bool:
    """The env as the kernel shows it: pinned netns, eth0 up with an address in the subnet,
    host veth up on the bridge, memory limit, and a catatonit holder in the cgroup."""
    netns = f"{controller.instance}-{env}"
    if netns not in kernel_view.netns_names():
        return False
    eth0 = kernel_view.ip_link("eth0", netns=netns)
    if eth0 is None or not kernel_view.is_up(eth0):
        return False
    addresses = kernel_view.ipv4_addresses(eth0)
    if not any(a.startswith(controller.subnet_prefix + ".") for a in addresses):
        return False
    if not controller.state_file.exists() or env not in controller.state()["environments"]:
        return False
    record = controller.record(env)
    veth = kernel_view.ip_link(record["hostVeth"])
    if veth is None or not kernel_view.is_up(veth) or veth.get("master") != bridge(controller):
        return False
    if int(kernel_view.read_cgroup_file(memory_file(controller, env))) != MEMORY:
        return False
    if record.get("holder") is None:
        return False
    pid = holder_pid(controller, env)
    return kernel_view.pid_netns_inode(pid) == kernel_view.netns_inode(netns)


def wait_live(controller: Controller, timeout: float, env: str = ENV) -> None:
    wait_until(
        lambda: env_is_live(controller, env),
        timeout,
        message=f"environment {env} did not become live",
        ignore=(
            OSError,
            ValueError,
            KeyError,
            TypeError,
            AssertionError,
            kernel_view.KernelViewError,
        ),
    )


def _event_key(event: dict[str, Any]) -> tuple[str, int]:
    return str(event.get("id") or json.dumps(event, sort_keys=True)), int(event.get("count", 1))


def new_events(controller: Controller, since: Seen) -> list[dict[str, Any]]:
    return [e for e in controller.events() if _event_key(e) not in since]


def wait_event(
    controller: Controller, *, since: Seen, reason: str, kind: str, name: str, timeout: float
) -> dict[str, Any]:
    def find() -> dict[str, Any] | None:
        for event in new_events(controller, since):
            if (event["reason"], event["kind"], event["name"]) == (reason, kind, name):
                return event
        return None

    event: dict[str, Any] | None = wait_until(
        find,
        timeout,
        interval=0.1,
        message=lambda: f"no {reason} event for {kind}/{name}; got {new_events(controller, since)}",
    )
    assert event is not None
    return event


def eth0_addresses(controller: Controller) -> list[str]:
    eth0 = kernel_view.ip_link("eth0", netns=controller.netns)
    assert eth0 is not None, f"no eth0 in {controller.netns}"
    return kernel_view.ipv4_addresses(eth0)


def ip(*args: str) -> None:
    result = kernel_view.run(["ip", *args])
    assert result.returncode == 0, f"ip {' '.join(args)}: {result.stderr}"


def ready_env(controller: Controller) -> subprocess.Popen[str]:
    """Manifests for one network + one env, a running controller, the env live."""
    controller.write_network()
    controller.write_env()
    proc = controller.start()
    wait_live(controller, READY_DEADLINE)
    return proc


# --------------------------------------------------------------------------- the lifecycle


def test_dropped_manifest_becomes_an_environment(controller: Controller) -> None:
    proc = controller.start()  # an empty directory: nothing to do
    assert kernel_view.netns_names().count(controller.netns) == 0
    controller.write_network()
    controller.write_env()
    started = time.monotonic()
    wait_live(controller, 5.0)
    print(f"manifest -> live env: {time.monotonic() - started:.3f}s")
    reasons = {(e["reason"], e["kind"], e["name"]) for e in controller.events()}
    assert ("Created", "Environment", ENV) in reasons
    assert ("Created", "Network", controller.network) in reasons
    assert proc.poll() is None


def test_edited_memory_limit_converges_in_place(controller: Controller) -> None:
    ready_env(controller)
    inode = kernel_view.netns_inode(controller.netns)
    holder = holder_pid(controller)
    since = controller.seen()
    controller.write_env(memory="96Mi")
    wait_until(
        lambda: int(kernel_view.read_cgroup_file(memory_file(controller))) == 96 * 1024 * 1024,
        5.0,
        message="memory limit not updated",
    )
    wait_event(controller, since=since, reason="Updated", kind="Environment", name=ENV, timeout=5.0)
    assert kernel_view.netns_inode(controller.netns) == inode, "the netns was recreated"
    assert holder_pid(controller) == holder, "the holder was restarted"


def test_removed_manifest_is_pruned(controller: Controller) -> None:
    ready_env(controller)
    veth, cgroups = host_veth(controller), controller.record()["cgroupPaths"]
    (controller.manifests / f"{ENV}.yaml").unlink()
    wait_until(
        lambda: (
            controller.netns not in kernel_view.netns_names()
            and kernel_view.ip_link(veth) is None
            and not any(Path(p).exists() for p in cgroups)
            # The record goes last: the state file is written after the kernel work.
            and ENV not in controller.state()["environments"]
        ),
        5.0,
        message="environment not pruned",
    )
    reasons = {(e["reason"], e["kind"], e["name"]) for e in controller.events()}
    assert ("Deleted", "Environment", ENV) in reasons
    assert kernel_view.ip_link(bridge(controller)) is not None, "the network is still declared"


def _rename_over(path: Path, text: str) -> None:
    """An editor's atomic save: a hidden temp file in the same directory, renamed over."""
    temp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(temp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.rename(temp, path)


def _truncate_and_write(path: Path, text: str) -> None:
    """An in-place save: truncate, then write in chunks (the file is empty in between)."""
    with open(path, "w") as f:
        f.flush()
        for start in range(0, len(text), 16):
            f.write(text[start : start + 16])
            f.flush()


@pytest.mark.parametrize("save", [_rename_over, _truncate_and_write], ids=["rename", "truncate"])
def test_editor_style_save_converges_once(
    controller: Controller, save: Callable[[Path, str], None]
) -> None:
    proc = ready_env(controller)
    inode = kernel_view.netns_inode(controller.netns)
    since = controller.seen()
    batches = len(controller.log_events(proc, "files.changed"))
    save(controller.manifests / f"{ENV}.yaml", controller.env_yaml(memory="80Mi"))
    wait_event(controller, since=since, reason="Updated", kind="Environment", name=ENV, timeout=5.0)
    assert int(kernel_view.read_cgroup_file(memory_file(controller))) == 80 * 1024 * 1024
    # Let a few resyncs pass: nothing else may happen (no delete, no recreate, no 2nd update).
    first_resync_after = time.monotonic() + 2.5 * RESYNC
    wait_until(lambda: time.monotonic() >= first_resync_after, 5.0, interval=0.1)
    events = new_events(controller, since)
    assert [(e["reason"], e["name"]) for e in events] == [("Updated", ENV)], events
    assert kernel_view.netns_inode(controller.netns) == inode
    flushed = controller.log_events(proc, "files.changed")[batches:]
    assert len(flushed) == 1, f"expected one debounced batch, got {flushed}"
    assert str(controller.manifests / f"{ENV}.yaml") in flushed[0]["paths"]


def test_invalid_manifest_is_reported_once_and_prunes_nothing(controller: Controller) -> None:
    ready_env(controller)
    since = controller.seen()
    path = controller.manifests / f"{ENV}.yaml"
    path.write_text(controller.env_yaml() + "  bogus: 1\n")
    event = wait_event(
        controller,
        since=since,
        reason="InvalidManifest",
        kind="Environment",
        name=ENV,
        timeout=5.0,
    )
    assert event["type"] == "Warning"
    assert event["message"].startswith(f"{ENV}.yaml:"), event["message"]
    # Several resyncs see the same broken file: still one event, nothing pruned.
    later = time.monotonic() + 2.5 * RESYNC
    wait_until(lambda: time.monotonic() >= later, 5.0, interval=0.1)
    events = new_events(controller, since)
    assert [e["reason"] for e in events] == ["InvalidManifest"], events
    assert env_is_live(controller)
    controller.write_env(memory="80Mi")
    wait_event(controller, since=since, reason="Updated", kind="Environment", name=ENV, timeout=5.0)


def test_deleted_manifests_directory_prunes_nothing(controller: Controller) -> None:
    proc = ready_env(controller)
    saved = {p.name: p.read_text() for p in controller.manifests.iterdir()}
    since = controller.seen()
    for path in controller.manifests.iterdir():
        path.unlink()
    controller.manifests.rmdir()
    wait_event(
        controller,
        since=since,
        reason="ReconcileFailed",
        kind="Manifests",
        name=str(controller.manifests),
        timeout=REPAIR_DEADLINE,
    )
    assert env_is_live(controller), "a missing directory must never prune"
    assert not [e for e in new_events(controller, since) if e["reason"] == "Deleted"]
    # The directory comes back (with an edit): the watch follows it.
    controller.manifests.mkdir()
    for name, text in saved.items():
        (controller.manifests / name).write_text(text)
    controller.write_env(memory="72Mi")
    wait_until(
        lambda: int(kernel_view.read_cgroup_file(memory_file(controller))) == 72 * 1024 * 1024,
        5.0,
        message="edit in the re-created directory not applied",
    )
    assert proc.poll() is None


# --------------------------------------------------------------------------- drift


def _break_host_veth(c: Controller) -> None:
    ip("link", "del", host_veth(c))


def _flush_eth0(c: Controller) -> None:
    ip("-n", c.netns, "addr", "flush", "dev", "eth0")


def _host_veth_down(c: Controller) -> None:
    ip("link", "set", host_veth(c), "down")


def _delete_bridge(c: Controller) -> None:
    ip("link", "del", bridge(c))


def _change_memory_limit(c: Controller) -> None:
    memory_file(c).write_text(str(128 * 1024 * 1024))
    assert int(kernel_view.read_cgroup_file(memory_file(c))) == 128 * 1024 * 1024


def _kill_holder(c: Controller) -> None:
    os.kill(holder_pid(c), signal.SIGKILL)


def _rmdir(path: Path) -> bool:
    os.rmdir(path)  # EBUSY (an OSError: "not yet") until the killed holder has exited
    return True


def _remove_cgroup(c: Controller) -> None:
    """Someone killed the env's processes and removed its cgroup, in every hierarchy.

    The controller is paused (SIGSTOP) meanwhile: a resync between the kill and the rmdir
    would respawn the holder into the cgroup, and the rmdir would then never succeed.
    """
    proc = c.procs[-1]
    dirs = [m.path / c.instance / ENV for m in kernel_view.cgroup_mounts()]
    dirs = [d for d in dirs if d.is_dir()]
    assert dirs, "the env has no cgroup directories to remove"
    holder = holder_pid(c)
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        os.kill(holder, signal.SIGKILL)
        for directory in dirs:
            wait_until(lambda d=directory: _rmdir(d), 5.0, message=f"cannot rmdir {directory}")
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    assert not any(d.exists() for d in dirs)


def _unpin_netns(c: Controller) -> None:
    pin = kernel_view.NETNS_DIR / c.netns
    result = kernel_view.run(["umount", str(pin)])
    assert result.returncode == 0, result.stderr
    pin.unlink()


DRIFTS: dict[str, tuple[Callable[[Controller], None], str, str]] = {
    # name: (break it, event reason, event kind)
    "host-veth-deleted": (_break_host_veth, "DriftRepaired", "Environment"),
    "eth0-address-flushed": (_flush_eth0, "DriftRepaired", "Environment"),
    "host-veth-down": (_host_veth_down, "DriftRepaired", "Environment"),
    "bridge-deleted": (_delete_bridge, "DriftRepaired", "Network"),
    "memory-limit-changed": (_change_memory_limit, "DriftRepaired", "Environment"),
    "holder-killed": (_kill_holder, "DriftRepaired", "Environment"),
    "cgroup-removed": (_remove_cgroup, "DriftRepaired", "Environment"),
    "netns-unpinned": (_unpin_netns, "Recreated", "Environment"),
}


@pytest.mark.parametrize("drift", list(DRIFTS))
def test_drift_is_repaired_within_two_resyncs(controller: Controller, drift: str) -> None:
    ready_env(controller)
    breaker, reason, kind = DRIFTS[drift]
    address = eth0_addresses(controller)
    holder = holder_pid(controller)
    inode = kernel_view.netns_inode(controller.netns)
    since = controller.seen()
    breaker(controller)
    started = time.monotonic()
    wait_live(controller, REPAIR_DEADLINE)
    print(f"{drift}: repaired after {time.monotonic() - started:.3f}s")
    name = controller.network if kind == "Network" else ENV
    event = wait_event(controller, since=since, reason=reason, kind=kind, name=name, timeout=5.0)
    assert "drift" in event["message"], event
    assert eth0_addresses(controller) == address, "the address must not change"
    if drift in ("holder-killed", "cgroup-removed"):
        assert holder_pid(controller) != holder
    if drift == "netns-unpinned":
        assert kernel_view.netns_inode(controller.netns) != inode
    else:
        assert kernel_view.netns_inode(controller.netns) == inode, f"{drift}: netns recreated"


# --------------------------------------------------------------------------- the process


def test_sigterm_exits_0_and_leaves_environments_running(controller: Controller) -> None:
    proc = ready_env(controller)
    holder = holder_pid(controller)
    assert controller.stop(proc) == 0
    assert env_is_live(controller)
    assert kernel_view.pid_alive(holder)
    lock = controller.state_dir / controller.instance / "lock"
    assert not lock.read_text().strip(), "the lock must be released on exit"
    # Released for real: a one-shot apply may now take it.
    result = controller.cli("apply")
    assert result.returncode == 0, result.stderr


def test_second_controller_and_apply_are_refused_naming_the_pid(controller: Controller) -> None:
    proc = controller.start()
    second = controller.cli("run", "--resync", "1", timeout=30)
    assert second.returncode == 1, second
    assert f"pid {proc.pid}" in second.stderr, second.stderr
    assert "Traceback" not in second.stderr
    apply = controller.cli("apply")
    assert apply.returncode == 1
    assert f"pid {proc.pid}" in apply.stderr, apply.stderr
    assert proc.poll() is None, "the first controller must be unaffected"


def test_repeated_drift_is_folded_into_one_event(controller: Controller) -> None:
    ready_env(controller)
    events: list[dict[str, Any]] = []
    for _ in range(2):
        since = controller.seen()
        holder = holder_pid(controller)
        _kill_holder(controller)
        events.append(
            wait_event(
                controller,
                since=since,
                reason="DriftRepaired",
                kind="Environment",
                name=ENV,
                timeout=REPAIR_DEADLINE,
            )
        )
        wait_until(
            lambda h=holder: env_is_live(controller) and holder_pid(controller) != h,
            REPAIR_DEADLINE,
            message="holder not replaced",
            ignore=(OSError, KeyError, TypeError, AssertionError),
        )
    first, second = events
    assert second["id"] == first["id"], events
    assert (first["count"], second["count"]) == (1, 2)
    assert second["firstTime"] == first["time"] <= second["time"]
    listed = [e for e in controller.events() if e["reason"] == "DriftRepaired"]
    assert len(listed) == 1, f"a folded event is listed once: {listed}"


def test_conditions_stall_after_repeated_failures_and_recover(controller: Controller) -> None:
    """A foreign link squats on the env's host veth name: every reconcile of it fails."""
    squatter = "rcv" + hashlib.sha256(f"{controller.instance}/{ENV}".encode()).hexdigest()[:12]
    ip("link", "add", squatter, "type", "bridge")  # no dummy module here
    try:
        controller.write_network()
        controller.write_env()
        controller.start()

        def stalled() -> dict[str, dict[str, Any]] | None:
            conditions = controller.conditions()
            return conditions if conditions["Stalled"]["status"] == "True" else None

        conditions = wait_until(
            stalled,
            15.0,
            interval=0.2,
            message=lambda: f"never Stalled: {controller.conditions()}",
            ignore=(OSError, KeyError, ValueError, AssertionError),
        )
        assert conditions["Stalled"]["reason"] == "RetriesExhausted"
        assert squatter in conditions["Stalled"]["message"]
        assert conditions["Ready"]["status"] == "False"
        assert conditions["Reconciling"]["status"] == "False"
        assert controller.record()["consecutiveFailures"] >= 5
        assert controller.record()["phase"] == "Failed"
        # Ready went False at the first failure and stayed False: its transition is that one.
        ready_since = conditions["Ready"]["lastTransitionTime"]
        assert ready_since <= conditions["Stalled"]["lastTransitionTime"]
    finally:
        ip("link", "del", squatter)
    wait_live(controller, REPAIR_DEADLINE)
    recovered = wait_until(
        lambda: (c := controller.conditions())["Ready"]["status"] == "True" and c,
        REPAIR_DEADLINE,
        message="conditions did not recover",
    )
    assert recovered["Stalled"]["status"] == "False"
    assert (recovered["Reconciling"]["status"], recovered["Reconciling"]["reason"]) == (
        "False",
        "Idle",
    )
    assert recovered["Ready"]["lastTransitionTime"] >= ready_since
    assert controller.record()["consecutiveFailures"] == 0


def test_conditions_of_a_healthy_environment_and_no_write_when_idle(
    controller: Controller,
) -> None:
    ready_env(controller)
    conditions = controller.conditions()
    assert {t: (c["status"], c["reason"]) for t, c in conditions.items()} == {
        "Ready": ("True", "Reconciled"),
        "Reconciling": ("False", "Idle"),
        "Stalled": ("False", "Reconciled"),
    }
    # Resyncs that find nothing to do write nothing: status never moves by itself.
    serial = controller.state()["serial"]
    later = time.monotonic() + 3 * RESYNC
    wait_until(lambda: time.monotonic() >= later, 5.0, interval=0.1)
    assert controller.state()["serial"] == serial
    assert controller.conditions() == conditions


def _voluntary_switches(pid: int) -> int:
    """Times the threads of `pid` blocked so far (each wake-up of an idle thread is one)."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(FileNotFoundError):  # a thread that just ended
            for line in Path(f"/proc/{pid}/task/{tid}/status").read_text().splitlines():
                if line.startswith("voluntary_ctxt_switches:"):
                    total += int(line.split()[1])
    return total


def test_an_idle_controller_sleeps(controller: Controller) -> None:
    """No thread polls: with no resync due and nothing happening, the only wake-ups are
    the policy passes (every 5 s). A loop with a one-second timeout in any of the
    controller's threads would show up here as several wake-ups per second."""
    controller.write_network()
    controller.write_env()
    proc = controller.start("--resync", "3600")
    wait_live(controller, READY_DEADLINE)
    before = _voluntary_switches(proc.pid)
    window = 6.0
    later = time.monotonic() + window
    wait_until(lambda: time.monotonic() >= later, window + 1, interval=0.1)
    woke = _voluntary_switches(proc.pid) - before
    assert woke <= 10, f"{woke} wake-ups in {window:g} s of idling: something polls"


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _scrape(port: int) -> dict[str, float]:
    """The endpoint's samples: 'name{labels}' -> value (loopback only)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, number = line.rpartition(" ")
            samples[name] = float(number)
    return samples


def test_metrics_endpoint_counts_reconciles_and_repairs(controller: Controller) -> None:
    port = _free_port()
    controller.write_network()
    controller.start("--metrics-addr", f"127.0.0.1:{port}")
    first = wait_until(
        lambda: (m := _scrape(port))["reconciler_reconciles_total"] >= 1 and m,
        5.0,
        message="no reconcile counted",
    )
    assert first['reconciler_environments{phase="Ready"}'] == 0
    assert "reconciler_queue_depth" in first
    assert "reconciler_reconcile_duration_seconds_count" in first
    assert first["reconciler_orphans_collected_total"] == 0
    controller.write_env()
    wait_live(controller, READY_DEADLINE)
    ready = wait_until(
        lambda: (m := _scrape(port))['reconciler_environments{phase="Ready"}'] == 1 and m,
        5.0,
        message="environments gauge not updated",
    )
    assert ready["reconciler_reconciles_total"] > first["reconciler_reconciles_total"]
    repairs = 'reconciler_drift_repairs_total{kind="Environment"}'
    before = ready[repairs]
    _kill_holder(controller)
    wait_until(
        lambda: _scrape(port)[repairs] == before + 1,
        REPAIR_DEADLINE,
        message="drift repair not counted",
    )


@pytest.mark.parametrize("address", ["0.0.0.0:9100", "192.0.2.1:9100"])
def test_metrics_on_a_non_loopback_address_needs_the_flag(
    controller: Controller, address: str
) -> None:
    result = controller.cli("run", "--metrics-addr", address, timeout=30)
    assert result.returncode == 2, result
    assert "--metrics-allow-remote" in result.stderr
    assert "Traceback" not in result.stderr


def test_git_options_without_a_url_are_a_usage_error(controller: Controller) -> None:
    result = controller.cli("run", "--git-ref", "main")
    assert result.returncode == 2
    assert "--git-ref needs --git-url" in result.stderr


def test_state_dir_inside_the_manifests_directory_is_refused(controller: Controller) -> None:
    result = controller.cli("--state-dir", str(controller.manifests / "state"), "run", timeout=30)
    assert result.returncode == 1, result
    assert "inside the manifests directory" in result.stderr, result.stderr


def test_missing_manifests_directory_refuses_to_start(controller: Controller) -> None:
    controller.manifests.rmdir()
    result = controller.cli("run", timeout=30)
    assert result.returncode == 1
    assert "does not exist" in result.stderr, result.stderr


# --------------------------------------------------------------------------- recovery


@pytest.mark.parametrize("damage", ["missing", "corrupt"])
def test_recover_adopts_live_environments(controller: Controller, damage: str) -> None:
    proc = ready_env(controller)
    address = controller.record()["address"]
    holder = holder_pid(controller)
    inode = kernel_view.netns_inode(controller.netns)
    veth = host_veth(controller)
    assert controller.stop(proc) == 0
    backup = controller.state_file.with_name("state.json.bak")
    backup.unlink(missing_ok=True)
    if damage == "missing":
        controller.state_file.unlink()
    else:
        controller.state_file.write_text('{"version": 1, "serial": ')

    refused = controller.cli("run", timeout=30)
    assert refused.returncode == 1, refused
    assert "--recover" in refused.stderr, refused.stderr
    # A refused start touched nothing (the state is unreadable, so ask the kernel only).
    assert kernel_view.netns_inode(controller.netns) == inode
    assert kernel_view.pid_alive(holder)
    assert kernel_view.ip_link(veth) is not None

    since = controller.seen()
    controller.start("--recover")
    wait_live(controller, READY_DEADLINE)
    record = controller.record()
    assert record["address"] == address
    assert record["netnsInode"] == inode == kernel_view.netns_inode(controller.netns)
    assert holder_pid(controller) == holder, "the holder must be adopted, not restarted"
    adopted = wait_event(
        controller, since=since, reason="Adopted", kind="Environment", name=ENV, timeout=5.0
    )
    assert address in adopted["message"]
    if damage == "corrupt":
        aside = list(controller.state_file.parent.glob("state.json.corrupt-*"))
        assert len(aside) == 1, "the corrupt file must be set aside, not lost"
