"""What every command shares: user-facing errors, saving state, reporting an outcome.

Kept apart from `main.py` so command modules (`run`, `exec`, `sync`, ...) can import it
at module load without a cycle (main imports them to register them). It imports nothing
heavy: every command module loads it, `--help` included.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from functools import wraps
from typing import TYPE_CHECKING, NoReturn, ParamSpec, TypeVar

import click

from reconciler.errors import ManifestError, ReconcilerError

if TYPE_CHECKING:  # the engine is imported by the commands that run it, not by `--help`
    from reconciler.cli.runtime import Runtime
    from reconciler.engine.plan import Action, Plan
    from reconciler.engine.reconcile import ReconcileResult
    from reconciler.state.model import StateDocument

P = ParamSpec("P")
R = TypeVar("R")

PAST_TENSE = {
    "create": "created",
    "update": "updated",
    "recreate": "recreated",
    "delete": "deleted",
    "noop": "unchanged",
}


def fail(message: str, code: int = 1) -> NoReturn:
    """Print one `error:` line and exit."""
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def user_errors(func: Callable[P, R]) -> Callable[P, R]:
    """Turn ReconcilerError (and Ctrl-C) into one line and an exit code; never a traceback."""

    @wraps(func)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return func(*args, **kwargs)
        except ManifestError as exc:
            for line in exc.errors:
                click.echo(line, err=True)
            sys.exit(exc.exit_code)
        except ReconcilerError as exc:
            fail(exc.message, exc.exit_code)
        except KeyboardInterrupt:
            fail("interrupted", 130)

    return wrapper


def past_tense(action: Action) -> str:
    """`create` -> `created`."""
    return PAST_TENSE[str(action)]


def save_state(
    runtime: Runtime, state: StateDocument, *, previous: StateDocument, plan: Plan
) -> None:
    """Write the state file only when something changed (a no-op writes nothing)."""
    counts = plan.summary()
    summary = ", ".join(f"{n} {k}" for k, n in counts.items() if n) or "no changes"
    runtime.store.save_if_changed(
        state, previous=previous if runtime.store.exists() else None, summary=summary
    )


def report_outcome(
    outcome: ReconcileResult, *, nothing: str = "The host matches the manifests."
) -> bool:
    """One line per changed object; True when anything failed."""
    failed = False
    for item in outcome.outcomes:
        if item.ok:
            click.echo(f"{item.kind}/{item.name}: {past_tense(item.action)}")
        else:
            failed = True
            click.echo(f"{item.kind}/{item.name}: failed: {item.message}", err=True)
    for name, reason in sorted(outcome.plan.address_failures.items()):
        failed = True
        click.echo(f"Environment/{name}: failed: {reason}", err=True)
    if not outcome.outcomes:
        click.echo(f"No changes. {nothing}")
    return failed
