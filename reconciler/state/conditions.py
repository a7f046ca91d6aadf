"""Kubernetes-style conditions: `lastTransitionTime` moves only when `status` flips."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Literal

from reconciler.state.model import Condition

Status = Literal["True", "False", "Unknown"]


def now_rfc3339() -> str:
    """The current time, UTC, second precision: `2026-11-28T10:46:11Z`."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def set_condition(
    conditions: list[Condition],
    *,
    type: str,
    status: Status,
    reason: str,
    message: str = "",
    now: str | None = None,
) -> list[Condition]:
    """A new list with `type` set; its transition time is kept unless the status changed."""
    previous = next((c for c in conditions if c.type == type), None)
    when = now or now_rfc3339()
    if previous is not None and previous.status == status:
        when = previous.last_transition_time or when
    updated = Condition(
        type=type, status=status, reason=reason, message=message, last_transition_time=when
    )
    return (
        [updated if c.type == type else c for c in conditions]
        if previous
        else [*conditions, updated]
    )


def get_condition(conditions: list[Condition], type: str) -> Condition | None:
    """The condition of that type, if set."""
    return next((c for c in conditions if c.type == type), None)
