"""Start-up cost: each command imports only what it uses.

Every `reconciler` invocation pays for what it imports before doing anything (pydantic
~100 ms, structlog ~100 ms, the controller with watchdog and prometheus_client ~60 ms on
the machines we measure on), and `apply` is timed as a whole command. So the command line
imports inside each command: these tests run a command in a fresh interpreter and check
which modules it loaded. Timings are not asserted (hack/bench measures them).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.unit.factories import dump, env_doc, network_doc

# Runs the command line in-process, then prints the names of every module loaded.
# `Runtime.drivers` is replaced by one that imports the real drivers' modules (so they
# count) and then refuses, as it would without root: nothing touches the kernel.
PROBE = textwrap.dedent(
    """
    import importlib, json, sys
    from reconciler.cli import runtime
    from reconciler.cli.main import cli
    from reconciler.errors import ReconcilerError

    def drivers(self):
        for name in ("cgroups", "firewall", "holder", "netlink", "processes"):
            importlib.import_module("reconciler.kernel." + name)
        importlib.import_module("reconciler.engine.apply")
        raise ReconcilerError("no kernel drivers in this test")

    runtime.Runtime.drivers = drivers
    try:
        cli(sys.argv[1:], prog_name="reconciler", standalone_mode=False)
    except SystemExit:
        pass
    print("MODULES " + json.dumps(sorted(sys.modules)))
    """
)

# Never at start-up, for any command but the ones that need them.
CONTROLLER_ONLY = (
    "watchdog",
    "prometheus_client",
    "reconciler.controller",
    "reconciler.health",
    "reconciler.sources.git",
)
ALWAYS_FORBIDDEN = ("jsonschema",)  # a dev dependency, for the tests of `schema`


def loaded(tmp_path: Path, *args: str) -> set[str]:
    """The modules a fresh interpreter has loaded after running `reconciler ARGS`."""
    command = [
        sys.executable,
        "-c",
        PROBE,
        "--manifests",
        str(tmp_path / "manifests"),
        "--state-dir",
        str(tmp_path / "state"),
        "--instance",
        "rtimports",
        *args,
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=False, timeout=60)
    lines = [line for line in done.stdout.splitlines() if line.startswith("MODULES ")]
    assert lines, done.stderr
    return set(json.loads(lines[-1][len("MODULES ") :]))


def offending(modules: set[str], prefixes: tuple[str, ...]) -> list[str]:
    return sorted(m for m in modules if any(m == p or m.startswith(p + ".") for p in prefixes))


@pytest.fixture
def manifests(tmp_path: Path) -> Path:
    directory = tmp_path / "manifests"
    directory.mkdir()
    (directory / "all.yaml").write_text(
        dump(network_doc("devnet"), env_doc("web", network="devnet"))
    )
    return directory


def test_help_imports_click_and_nothing_heavy(tmp_path: Path) -> None:
    modules = loaded(tmp_path, "--help")
    heavy = ("pydantic", "yaml", "structlog", "asyncio", *CONTROLLER_ONLY, *ALWAYS_FORBIDDEN)
    assert offending(modules, heavy) == []
    assert offending(modules, ("reconciler.engine", "reconciler.kernel")) == []
    assert offending(modules, ("reconciler.manifests", "reconciler.state")) == []


def test_validate_imports_the_manifest_models_but_no_engine_driver_or_logging(
    tmp_path: Path, manifests: Path
) -> None:
    modules = loaded(tmp_path, "validate")
    assert "reconciler.manifests.models" in modules
    assert offending(modules, (*CONTROLLER_ONLY, *ALWAYS_FORBIDDEN, "structlog")) == []
    assert offending(modules, ("reconciler.engine", "reconciler.state")) == []
    # Only the block-device lookup (for `resources.io`), no driver.
    assert set(offending(modules, ("reconciler.kernel",))) <= {
        "reconciler.kernel",
        "reconciler.kernel.devices",
    }


def test_apply_imports_the_engine_and_drivers_but_not_the_controller(
    tmp_path: Path, manifests: Path
) -> None:
    modules = loaded(tmp_path, "apply")
    assert {"reconciler.engine.reconcile", "reconciler.kernel.netlink"} <= modules
    assert offending(modules, (*CONTROLLER_ONLY, *ALWAYS_FORBIDDEN)) == []


@pytest.mark.parametrize("command", [("schema",), ("events",), ("plan",), ("destroy",)])
def test_no_command_imports_the_controller(
    tmp_path: Path, manifests: Path, command: tuple[str, ...]
) -> None:
    modules = loaded(tmp_path, *command)
    assert offending(modules, (*CONTROLLER_ONLY, *ALWAYS_FORBIDDEN)) == []
