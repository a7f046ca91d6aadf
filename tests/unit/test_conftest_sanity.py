"""The test infrastructure itself: fixtures, the root gate, and the kernel-view helpers.

The gate (tests/conftest.py) is what keeps kernel-touching tests off the host, so it is
tested end to end: a throwaway pytest run on a probe file, outside the sandbox, must skip
the root tests (or fail them with CI=true) before any of their fixtures runs.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests import kernel_view, leaks

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_instance_is_a_short_unique_dns_label(instance: str) -> None:
    assert re.fullmatch(r"rt[0-9a-f]{8}", instance)
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", instance)


def test_state_dir_is_private_and_not_created(state_dir: Path, tmp_path: Path) -> None:
    assert state_dir == tmp_path / "state"
    assert not state_dir.exists()


# --------------------------------------------------------------------------- the root gate

PROBE = """
import pytest

@pytest.fixture
def creates_objects(tmp_path_factory):
    # Stands for a fixture that makes kernel objects: it must never run outside the sandbox.
    open({marker!r}, "w").close()

@pytest.mark.root
def test_marked(creates_objects):
    pass

def test_requests_sandbox(creates_objects, sandbox):
    pass
"""


def _run_probe(tmp_path: Path, *, ci: bool) -> tuple[subprocess.CompletedProcess[str], Path]:
    marker = tmp_path / "fixture-ran"
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    root: needs root\n")
    # pytest_plugins in the (rootdir) conftest loads our real conftest as a plugin.
    (tmp_path / "conftest.py").write_text('pytest_plugins = ["tests.conftest"]\n')
    (tmp_path / "test_probe.py").write_text(PROBE.format(marker=str(marker)))
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "RECONCILER_SANDBOX")}
    env["PYTHONPATH"] = str(REPO_ROOT)
    if ci:
        env["CI"] = "true"
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rsE", "-p", "no:cacheprovider", "test_probe.py"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    return result, marker


def test_root_tests_skip_outside_the_sandbox_with_the_reason(tmp_path: Path) -> None:
    result, marker = _run_probe(tmp_path, ci=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 skipped" in result.stdout, result.stdout
    assert "hack/sandbox.sh" in result.stdout, result.stdout
    assert not marker.exists(), "a root test's fixture ran outside the sandbox"


def test_root_tests_fail_outside_the_sandbox_when_ci(tmp_path: Path) -> None:
    result, marker = _run_probe(tmp_path, ci=True)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "2 errors" in result.stdout, result.stdout
    assert "CI=true" in result.stdout, result.stdout
    assert not marker.exists(), "a root test's fixture ran outside the sandbox"


# --------------------------------------------------------------------------- kernel_view

MOUNTINFO = textwrap.dedent(
    r"""
    23 1 0:21 / /sys rw,nosuid - sysfs sysfs rw
    31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
    32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
    35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
    40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,xattr,name=systemd
    41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw,nsdelegate
    90 23 0:32 / /mnt/with\040space rw,relatime - cgroup cgroup rw,memory
    91 23 0:32 /sub /mnt/other rw,relatime - cgroup cgroup rw,memory
    """
)


def test_parse_cgroup_mounts_on_a_hybrid_host() -> None:
    mounts = kernel_view.parse_cgroup_mounts(MOUNTINFO)
    by_path = {str(m.path): m for m in mounts}
    assert list(by_path) == [
        "/sys/fs/cgroup/cpu",
        "/sys/fs/cgroup/memory",
        "/sys/fs/cgroup/systemd",
        "/sys/fs/cgroup/unified",
        "/mnt/other",  # same hierarchy as memory but another root: a different view
    ]
    assert by_path["/sys/fs/cgroup/memory"].controllers == ("memory",)
    assert by_path["/sys/fs/cgroup/systemd"].controllers == ("name=systemd",)
    assert by_path["/sys/fs/cgroup/unified"].version == 2


def test_mountinfo_octal_escapes_are_decoded() -> None:
    text = "90 23 0:99 / /mnt/with\\040space rw - cgroup2 cgroup2 rw\n"
    assert [str(m.path) for m in kernel_view.parse_cgroup_mounts(text)] == ["/mnt/with space"]


def test_cgroup_mounts_of_this_host_are_found() -> None:
    assert kernel_view.cgroup_mounts(), "no cgroup hierarchy mounted?"


def test_ipv4_addresses_and_link_fields() -> None:
    link = {
        "ifname": "rcbr-x",
        "flags": ["BROADCAST", "UP"],
        "linkinfo": {"info_kind": "bridge"},
        "addr_info": [
            {"family": "inet", "local": "10.0.0.1", "prefixlen": 24},
            {"family": "inet6", "local": "fe80::1", "prefixlen": 64},
        ],
    }
    assert kernel_view.ipv4_addresses(link) == ["10.0.0.1/24"]
    assert kernel_view.link_kind(link) == "bridge"
    assert kernel_view.is_up(link)
    assert kernel_view.link_kind({"ifname": "lo"}) is None


def test_pids_in_missing_cgroup_dirs_is_empty(tmp_path: Path) -> None:
    assert kernel_view.pids_in_cgroup_dirs([tmp_path / "nope"]) == set()


def test_pid_alive_for_self_and_for_a_reaped_child() -> None:
    assert kernel_view.pid_alive(os.getpid())
    child = subprocess.Popen(["true"])
    child.wait()
    assert not kernel_view.pid_alive(child.pid)


def test_wait_until_returns_the_truthy_value() -> None:
    values = iter([0, None, "", "done"])
    assert kernel_view.wait_until(lambda: next(values), 5) == "done"


def test_wait_until_times_out_with_the_message() -> None:
    with pytest.raises(AssertionError, match=r"bridge never came up \(waited 0\.05s; last"):
        kernel_view.wait_until(lambda: False, 0.05, message="bridge never came up")


def test_wait_until_ignores_oserror_and_chains_it(tmp_path: Path) -> None:
    missing = tmp_path / "never"
    with pytest.raises(AssertionError, match="state: nothing") as info:
        kernel_view.wait_until(missing.read_text, 0.05, message=lambda: "state: nothing")
    assert isinstance(info.value.__cause__, FileNotFoundError)


def test_wait_until_does_not_swallow_bugs() -> None:
    with pytest.raises(ZeroDivisionError):
        kernel_view.wait_until(lambda: 1 // 0, 5)


# --------------------------------------------------------------------------- leaks


def test_leak_checks_find_nothing_for_a_fresh_name(instance: str) -> None:
    # The read-only checks that work without root; links and nft need the sandbox.
    assert leaks.leaked_cgroups(instance) == []
    assert leaks.leaked_processes(instance) == []
    assert leaks.leaked_netns(instance) == []


@pytest.mark.parametrize("name", ["", "a/b"])
def test_leaked_objects_rejects_non_names(name: str) -> None:
    with pytest.raises(ValueError):
        leaks.leaked_objects(name)
