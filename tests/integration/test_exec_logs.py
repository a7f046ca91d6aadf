"""`reconciler exec` and `reconciler logs`, run as a user runs them, against a real env.

The environment comes from `apply` on a one-env manifest (no network: the env still gets
its own net/uts/ipc/mnt/pid namespaces and cgroup). What `exec` ran is checked by what
the command itself prints about /proc, compared with the holder as the kernel shows it.
`logs` reads capture files written by a workload started with the process driver into
the applied env (the engine wires processes in separately).

Every test ends with `destroy` and the leak check (`managed_reconciler`): no process,
cgroup or namespace of the instance may survive.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from reconciler.kernel.processes import ForkingProcessDriver
from reconciler.kernel.types import ProcessRef
from tests.integration.helpers import Reconciler, describe, managed_reconciler, write_manifest
from tests.kernel_view import wait_until

HOSTNAME = "e1host"


def _ns(pid: int | str, name: str) -> tuple[int, int]:
    st = os.stat(f"/proc/{pid}/ns/{name}")
    return st.st_dev, st.st_ino


@pytest.fixture
def rc(instance: str, tmp_path: Path, state_dir: Path) -> Iterator[Reconciler]:
    """An applied instance with one environment `e1`; destroyed and leak-checked after."""
    manifests = tmp_path / "manifests"
    write_manifest(
        manifests,
        "e1.yaml",
        f"""
        apiVersion: reconciler/v1
        kind: Environment
        metadata: {{name: e1}}
        spec:
          hostname: {HOSTNAME}
          resources: {{pids: 64}}
        """,
    )
    with managed_reconciler(
        Reconciler(manifests=manifests, state_dir=state_dir, instance=instance)
    ) as reconciler:
        reconciler.ok("apply")
        yield reconciler


def _record(rc: Reconciler) -> dict[str, object]:
    state = json.loads(rc.state_file.read_text())
    record: dict[str, object] = state["environments"]["e1"]
    return record


def _command(rc: Reconciler) -> list[str]:
    """`reconciler` with the instance's global options, for tests that need Popen."""
    return [
        sys.executable,
        "-m",
        "reconciler",
        "--state-dir",
        str(rc.state_dir),
        "--instance",
        rc.instance,
        "--manifests",
        str(rc.manifests),
    ]


def _holder(rc: Reconciler) -> ProcessRef:
    holder = _record(rc)["holder"]
    assert isinstance(holder, dict)
    return ProcessRef(pid=holder["pid"], start_time=holder["startTime"])


# --------------------------------------------------------------------------- exec


def test_exec_runs_in_the_env_and_prints_its_hostname(rc: Reconciler) -> None:
    result = rc.ok("exec", "e1", "hostname")
    assert result.stdout == f"{HOSTNAME}\n"
    assert result.stderr == ""


def test_exec_returns_the_commands_exit_code(rc: Reconciler) -> None:
    assert rc("exec", "e1", "--", "sh", "-c", "exit 7").returncode == 7
    assert rc("exec", "e1", "sh", "-c", "exit 0").returncode == 0
    killed = rc("exec", "e1", "sh", "-c", "kill -9 $$")
    assert killed.returncode == 128 + 9, describe(killed)


def test_exec_joins_every_namespace_and_the_cgroup(rc: Reconciler) -> None:
    holder = _holder(rc)
    script = (
        "import os, sys\n"
        "for n in ('net', 'uts', 'ipc', 'mnt', 'pid'):\n"
        "    st = os.stat(f'/proc/self/ns/{n}')\n"
        "    print(n, st.st_dev, st.st_ino)\n"
        "print('pid', os.getpid())\n"
        "sys.stdout.write(open('/proc/self/cgroup').read())\n"
    )
    result = rc.ok("exec", "e1", "python3", "-c", script)
    lines = result.stdout.splitlines()
    seen = {parts[0]: (int(parts[1]), int(parts[2])) for parts in map(str.split, lines[:5])}
    for name, ident in seen.items():
        assert ident == _ns(holder.pid, name), f"{name} is not the env's"
        assert ident != _ns("self", name), f"{name} is the test's"
    # The env's /proc shows the env's pid namespace: the command is neither pid 1 (that
    # is the holder) nor a host pid.
    pid = int(lines[5].split()[1])
    assert 1 < pid < 100
    cgroups = "\n".join(lines[6:])
    assert f":pids:/{rc.instance}/e1" in cgroups and f"0::/{rc.instance}/e1" in cgroups


def test_exec_attaches_stdin(rc: Reconciler) -> None:
    cmd = [*_command(rc), "exec", "e1", "--", "sh", "-c", "tr a-z A-Z; echo err >&2"]
    result = subprocess.run(
        cmd, input="hello\n", capture_output=True, text=True, timeout=30, check=False
    )
    assert (result.returncode, result.stdout, result.stderr) == (0, "HELLO\n", "err\n")


def test_exec_keeps_a_terminal_on_stdin(rc: Reconciler) -> None:
    # A pty stands in for the user's terminal: the command sees it as its stdin.
    controller, terminal = os.openpty()
    try:
        result = subprocess.run(
            [*_command(rc), "exec", "e1", "sh", "-c", "test -t 0 && tty"],
            stdin=terminal,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert result.returncode == 0, describe(result)
        assert result.stdout.strip() == os.ttyname(terminal)
    finally:
        os.close(controller)
        os.close(terminal)


def test_exec_of_an_unknown_env_or_command(rc: Reconciler) -> None:
    unknown = rc("exec", "nope", "true")
    assert unknown.returncode == 1
    assert unknown.stderr == (
        f"error: unknown environment 'nope' in instance '{rc.instance}'; see `reconciler status`\n"
    )
    missing = rc("exec", "e1", "no-such-command")
    assert missing.returncode == 127
    assert missing.stderr.startswith(
        "error: exec in env e1 failed: execve no-such-command: ENOENT"
    ), missing.stderr
    assert "Traceback" not in missing.stderr
    assert rc("exec", "e1").returncode == 2  # usage: no command
    assert rc("exec", "e1", "--").returncode == 2


def test_exec_leaves_nothing_behind(rc: Reconciler) -> None:
    holder = _holder(rc)
    rc.ok("exec", "e1", "sh", "-c", "sleep 0.1 & true")
    # The waiter and the command are gone; only the holder (and briefly an orphaned
    # sleep, which the holder reaps) remain in the env.
    paths = _record(rc)["cgroupPaths"]
    assert isinstance(paths, list)
    procs = Path(str(paths[0])) / "cgroup.procs"
    wait_until(
        lambda: procs.read_text().split() == [str(holder.pid)],
        5.0,
        message=lambda: f"left in the env: {procs.read_text().split()}",
    )


def test_a_killed_exec_takes_its_command_along(rc: Reconciler) -> None:
    holder = _holder(rc)
    paths = _record(rc)["cgroupPaths"]
    assert isinstance(paths, list)
    procs = Path(str(paths[0])) / "cgroup.procs"
    caller = subprocess.Popen(
        [*_command(rc), "exec", "e1", "sleep", "600"], stdin=subprocess.DEVNULL
    )
    try:
        wait_until(
            lambda: len(procs.read_text().split()) == 3,  # holder, waiter, sleep
            10.0,
            message=lambda: f"exec did not start: {procs.read_text().split()}",
        )
        caller.kill()  # like `timeout -s KILL`: no chance to clean up
        caller.wait()
        wait_until(
            lambda: procs.read_text().split() == [str(holder.pid)],
            5.0,
            message=lambda: f"left running in the env: {procs.read_text().split()}",
        )
    finally:
        if caller.poll() is None:
            caller.kill()
            caller.wait()


# --------------------------------------------------------------------------- logs


def _spawn(rc: Reconciler, name: str, code: str) -> ProcessRef:
    record = _record(rc)
    paths = record["cgroupPaths"]
    assert isinstance(paths, list)
    return ForkingProcessDriver().spawn(
        env="e1",
        holder=_holder(rc),
        cgroup_procs=tuple(f"{p}/cgroup.procs" for p in paths),
        name=name,
        command=["python3", "-c", code],
        environ={},
        working_dir="/",
        user="nobody",
        log_dir=rc.state_dir / rc.instance / "logs" / "e1",
    )


def test_logs_show_a_processs_output(rc: Reconciler) -> None:
    driver = ForkingProcessDriver()
    log_dir = rc.state_dir / rc.instance / "logs" / "e1"
    api = _spawn(
        rc, "api", "import sys; print('serving', flush=True); print('oops', file=sys.stderr)"
    )
    worker = _spawn(rc, "worker", "print('working')")
    for ref, name in ((api, "api"), (worker, "worker")):
        assert driver.exit_status(ref, log_dir=log_dir, name=name, timeout=10) == 0
    assert rc.ok("logs", "e1", "api").stdout == "serving\noops\n"
    assert rc.ok("logs", "e1").stdout == "api    | serving\napi    | oops\nworker | working\n"
    unknown = rc("logs", "e1", "nope")
    assert unknown.returncode == 1
    assert "environment 'e1' has no process 'nope' (processes: api, worker)" in unknown.stderr
    assert rc("logs", "nope").returncode == 1


@pytest.mark.timeout(60)
def test_logs_follow_prints_new_output(rc: Reconciler) -> None:
    ref = _spawn(
        rc, "ticker", "import time\nfor i in range(600):\n print(i, flush=True); time.sleep(0.05)"
    )
    cmd = [*_command(rc), "logs", "-f", "e1", "ticker"]
    follower = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        assert follower.stdout is not None
        seen = [follower.stdout.readline() for _ in range(30)]
        assert seen == [f"{i}\n" for i in range(30)]
    finally:
        follower.kill()
        follower.wait()
        ForkingProcessDriver().stop(ref, grace=1.0)
