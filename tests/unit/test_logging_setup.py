"""Logging that costs nothing until a line is written (reconciler.logging_setup).

Each case runs in a fresh interpreter: whether structlog got imported is the point, and
structlog's configuration is process-wide.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap


def run(code: str) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done


def test_a_message_below_the_level_imports_nothing() -> None:
    done = run(
        """
        import sys
        from reconciler import logging_setup
        logging_setup.configure(log_format="json", verbose=False)
        log = logging_setup.get_logger("reconciler.engine").bind(env="web")
        log.info("env.created")
        log.debug("env.detail")
        print("structlog" in sys.modules)
        """
    )
    assert done.stdout.strip() == "False"
    assert done.stderr == ""


def test_the_first_message_that_passes_is_json_on_stderr_with_its_context() -> None:
    done = run(
        """
        from reconciler import logging_setup
        logging_setup.configure(log_format="json", verbose=False)
        log = logging_setup.get_logger("reconciler.engine").bind(env="web")
        log.info("env.created")
        log.warning("env.failed", reason="EBUSY")
        """
    )
    assert done.stdout == ""
    (line,) = done.stderr.splitlines()
    record = json.loads(line)
    assert record["event"] == "env.failed"
    assert record["level"] == "warning"
    assert (record["env"], record["reason"]) == ("web", "EBUSY")


def test_verbose_writes_info() -> None:
    done = run(
        """
        from reconciler import logging_setup
        logging_setup.configure(log_format="json", verbose=True)
        logging_setup.get_logger("reconciler.engine").info("env.created", env="web")
        """
    )
    assert json.loads(done.stderr)["event"] == "env.created"


def test_sync_configures_structlog_imported_directly() -> None:
    done = run(
        """
        from reconciler import logging_setup
        logging_setup.configure(log_format="json", verbose=False)
        import structlog  # a module that uses structlog itself, imported later
        logging_setup.sync()
        log = structlog.get_logger("reconciler.controller")
        log.info("dropped")
        log.warning("controller.started", instance="rt1")
        """
    )
    assert done.stdout == ""  # structlog's defaults would print to stdout
    assert json.loads(done.stderr)["event"] == "controller.started"
