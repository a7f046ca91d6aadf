"""Drive the real `reconciler` command from tests, and make sure nothing outlives a test.

End-to-end tests run the console entry point exactly as a user does (`python -m
reconciler` in a subprocess, with the global options of contract section 3), so argument
parsing, exit codes, stderr and the lock are all exercised. What the command did is then
checked through the kernel's own view (tests/kernel_view.py), never through `status`.

`managed_reconciler` is the teardown every such test needs: whatever happened in the
test, run `destroy`, then demand that nothing of the instance is left in the kernel
(tests/leaks.py). If `destroy` itself leaves something behind, the test fails with the
list, and a best-effort `force_cleanup` removes the leftovers so later tests (and the
host: cgroups and processes are not isolated by hack/sandbox.sh) are not affected.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

from tests import kernel_view
from tests.leaks import leaked_objects

# An apply of a few environments takes about a second; a generous ceiling still ends a
# hung command long before pytest's own timeout.
COMMAND_TIMEOUT = 60.0


@dataclass(frozen=True)
class Reconciler:
    """One instance of the `reconciler` command, bound to its manifests and state dirs."""

    manifests: Path
    state_dir: Path
    instance: str
    timeout: float = COMMAND_TIMEOUT

    def __call__(
        self, *args: str, manifests: Path | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run `reconciler <global options> ARGS...`; never raises on a non-zero exit.

        `manifests` overrides the manifests directory for this one call.
        """
        cmd = [
            sys.executable,
            "-m",
            "reconciler",
            "--manifests",
            str(manifests if manifests is not None else self.manifests),
            "--state-dir",
            str(self.state_dir),
            "--instance",
            self.instance,
            *args,
        ]
        # Only the options given here count: a RECONCILER_* variable of the caller's
        # environment must not quietly change what the command does.
        env = {k: v for k, v in os.environ.items() if not k.startswith("RECONCILER_")}
        return subprocess.run(
            cmd, check=False, capture_output=True, text=True, timeout=self.timeout, env=env
        )

    def ok(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run and assert exit code 0, showing stdout and stderr if not."""
        result = self(*args)
        assert result.returncode == 0, describe(result)
        return result

    def json(self, *args: str) -> Any:
        """Run a command that must succeed and print JSON; return the parsed document."""
        return json.loads(self.ok(*args).stdout)

    def with_manifests(self, manifests: Path) -> Reconciler:
        """The same instance reading another manifests directory."""
        return replace(self, manifests=manifests)

    @property
    def state_file(self) -> Path:
        """The instance's state file (contract: `<state-dir>/<instance>/state.json`)."""
        return self.state_dir / self.instance / "state.json"


def describe(result: subprocess.CompletedProcess[str]) -> str:
    """A failed command, its exit code and output, for assertion messages."""
    return (
        f"`{' '.join(result.args[2:])}` exited {result.returncode}\n"
        f"--- stdout\n{result.stdout}--- stderr\n{result.stderr}"
    )


def write_manifest(directory: Path, name: str, text: str) -> Path:
    """Write `text` (dedented) to `directory/name`, creating the directory; return the path."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / name
    path.write_text(textwrap.dedent(text).lstrip("\n"))
    return path


@contextlib.contextmanager
def managed_reconciler(reconciler: Reconciler) -> Iterator[Reconciler]:
    """Yield `reconciler`; afterwards always `destroy`, then assert nothing leaked."""
    with managed_reconcilers(reconciler):
        yield reconciler


@contextlib.contextmanager
def managed_reconcilers(*reconcilers: Reconciler) -> Iterator[tuple[Reconciler, ...]]:
    """Yield `reconcilers`; afterwards `destroy` each, in order, then check every one for leaks.

    All are destroyed before any is checked: when one instance's name contains another's,
    a leak check of the shorter name also sees the longer one's objects.
    """
    try:
        yield reconcilers
    finally:
        results = [reconciler("destroy") for reconciler in reconcilers]
        leaks = {r.instance: leaked_objects(r.instance) for r in reconcilers}
        for instance, found in leaks.items():
            if found:
                force_cleanup(instance)
        for result in results:
            assert result.returncode == 0, "teardown destroy failed: " + describe(result)
        leaked = {instance: found for instance, found in leaks.items() if found}
        assert leaked == {}, f"after destroy, leaked: {leaked}"


# --------------------------------------------------------------------------- force cleanup


def force_cleanup(instance: str) -> None:
    """Best effort: remove what `destroy` left of `instance` (never anything else).

    Everything touched carries the test's unique instance name: processes in its cgroups
    (killed through a pidfd, so a reused pid is never signalled), its cgroup dirs, its
    netns pins and the links tagged with it.
    """
    if not instance.startswith("rt"):
        raise ValueError(f"refusing to clean up non-test instance {instance!r}")
    _kill_instance_processes(instance)
    for mount in kernel_view.cgroup_mounts():
        top = mount.path / instance
        if top.is_dir():
            # Best effort: a cgroup that will not empty is reported by the leak check anyway.
            with contextlib.suppress(AssertionError):
                kernel_view.wait_until(partial(_cgroup_empty, top), timeout=5.0)
            for directory, _, _ in sorted(os.walk(top), key=lambda e: -len(e[0])):
                with contextlib.suppress(OSError):
                    os.rmdir(directory)
    for link in kernel_view.ip_links():
        if instance in (link.get("ifalias") or ""):
            kernel_view.run(["ip", "link", "del", link["ifname"]])
    for name in kernel_view.netns_names():
        if name.startswith(f"{instance}-"):
            kernel_view.run(["ip", "netns", "del", name])


def _cgroup_empty(top: Path) -> bool:
    return not kernel_view.pids_in_cgroup_dirs([top])


def _kill_instance_processes(instance: str) -> None:
    for pid in kernel_view.all_pids():
        try:
            fd = os.pidfd_open(pid)
        except OSError:
            continue
        try:
            # Checked after the pidfd pins the process: the pid cannot be reused under us.
            if any(instance in line for line in kernel_view.proc_cgroups(pid)):
                with contextlib.suppress(ProcessLookupError):
                    signal.pidfd_send_signal(fd, signal.SIGKILL)
        finally:
            os.close(fd)
