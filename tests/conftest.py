"""Shared fixtures: the root-test gate, unique instance names, and the session leak guard.

Root tests create real kernel objects, so they run only inside hack/sandbox.sh, which
means all three of: running as root, RECONCILER_SANDBOX=1, and a network namespace other
than the one hack/sandbox.sh started from and other than pid 1's (the variable alone
could be inherited by accident; the namespace cannot lie). A test is a root test when it
is marked `@pytest.mark.root` (everything under tests/integration is, automatically) or
requests the `sandbox` fixture.

Outside the sandbox a root test is skipped with the reason. With CI=true it FAILS
instead: a CI run that skipped its kernel tests has not tested the kernel.

The gate runs in `pytest_runtest_setup` before any fixture of the test is set up, so a
fixture that creates kernel objects can never run outside the sandbox, whatever order the
test lists its fixtures in.

cgroups and processes are not isolated by the sandbox. Every test therefore takes a
unique `instance` name, and at the end of a sandboxed session the leak guard checks that
nothing carrying any of those names survived (tests/leaks.py), naming each leftover.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.gates import unavailable
from tests.leaks import leaked_objects

SANDBOX_HINT = "run root tests via: hack/sandbox.sh .venv/bin/pytest tests/integration"


def _netns_id(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_ino, st.st_dev


def sandbox_problem() -> str | None:
    """Why this process is not a safe place for root tests, or None when it is."""
    if os.geteuid() != 0:
        return f"needs root and the namespace sandbox; {SANDBOX_HINT}"
    if os.environ.get("RECONCILER_SANDBOX") != "1":
        return f"not inside the namespace sandbox (RECONCILER_SANDBOX is not 1); {SANDBOX_HINT}"
    # The namespaces we must NOT be in: the one hack/sandbox.sh was started from (it records
    # it) and pid 1's. Some containers deny even root a look at pid 1's namespace links, so
    # that one is checked when readable; the recorded one is required.
    recorded = os.environ.get("RECONCILER_SANDBOX_PARENT_NETNS", "")
    try:
        ino, dev = (int(part) for part in recorded.split(":"))
    except ValueError:
        return (
            "RECONCILER_SANDBOX=1 but RECONCILER_SANDBOX_PARENT_NETNS is missing or malformed "
            f"({recorded!r}): not started by hack/sandbox.sh; {SANDBOX_HINT}"
        )
    forbidden = {(ino, dev)}
    with contextlib.suppress(PermissionError):
        forbidden.add(_netns_id("/proc/1/ns/net"))
    try:
        own = _netns_id("/proc/self/ns/net")
    except OSError as exc:
        return f"cannot read this process's network namespace ({exc}); {SANDBOX_HINT}"
    if own in forbidden:
        return f"RECONCILER_SANDBOX=1 but this is the host's network namespace; {SANDBOX_HINT}"
    return None


def require_sandbox() -> None:
    """Skip the current test outside the sandbox; fail it instead when CI=true."""
    problem = sandbox_problem()
    if problem is None:
        return
    unavailable(problem)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Gate root tests before any of their fixtures runs (tryfirst: before fixture setup)."""
    if item.get_closest_marker("root") is not None or "sandbox" in getattr(
        item, "fixturenames", ()
    ):
        require_sandbox()


@pytest.fixture
def sandbox() -> None:
    """Request this in a test that touches the kernel: it runs only inside hack/sandbox.sh."""
    require_sandbox()


@pytest.fixture(scope="session", autouse=True)
def _leak_guard() -> Iterator[dict[str, str]]:
    """Collect every instance name handed out (name -> test id); check for leaks at the end.

    The check runs only in the sandbox: outside it no root test ran, so nothing can have
    been created.
    """
    issued: dict[str, str] = {}
    yield issued
    if not issued or sandbox_problem() is not None:
        return
    report: list[str] = []
    for name, nodeid in issued.items():
        leaks = leaked_objects(name)
        if leaks:
            report.append(f"instance {name} (from {nodeid}):")
            report += [f"    {leak}" for leak in leaks]
    if report:
        pytest.fail("kernel objects leaked by this session:\n" + "\n".join(report), pytrace=False)


@pytest.fixture
def instance(request: pytest.FixtureRequest, _leak_guard: dict[str, str]) -> str:
    """A unique reconciler instance name, `rt<8 hex>`: letters and digits, no "-" (CLI rule).

    Use it for `--instance`, so this test's cgroups, namespaces, links and tables can be
    told apart from the host's and from every other test's.
    """
    name = f"rt{secrets.token_hex(4)}"
    _leak_guard[name] = request.node.nodeid
    return name


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    """A private state directory, `tmp_path / "state"`.

    Not created: the reconciler creates its own state directory, and tests of a missing
    one need it absent.
    """
    return tmp_path / "state"
