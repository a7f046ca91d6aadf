"""Health: probes inside environments, policy violations, and what is done about them.

`HealthMonitor` (monitor) runs probes (probes) and policy passes (violations) and acts
(actions); `health_status` is what `reconciler status` shows of it. See each module's
docstring; the controller integration is described in `reconciler.health.monitor`.
"""

from reconciler.health.actions import RestartRequest, request_release
from reconciler.health.monitor import (
    HealthMonitor,
    HealthSettings,
    HealthSnapshot,
    HealthStatus,
    health_status,
    quarantined_in,
)

__all__ = [
    "HealthMonitor",
    "HealthSettings",
    "HealthSnapshot",
    "HealthStatus",
    "RestartRequest",
    "health_status",
    "quarantined_in",
    "request_release",
]
