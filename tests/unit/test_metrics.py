"""Controller metrics: the listen-address rules and what each observation counts.

The HTTP endpoint itself is exercised by tests/integration/test_run.py (it listens on a
socket, so it runs in the sandbox); here the registry is read directly.
"""

from __future__ import annotations

import pytest
from prometheus_client import generate_latest

from reconciler.controller.metrics import (
    ListenAddress,
    Metrics,
    MetricsAddressError,
    parse_listen_address,
)
from reconciler.engine.apply import Outcome
from reconciler.engine.plan import Action, Change, Plan
from reconciler.engine.reconcile import ReconcileResult
from reconciler.state.model import EnvironmentRecord, StateDocument


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:9100", ListenAddress("127.0.0.1", 9100)),
        ("127.1.2.3:1", ListenAddress("127.1.2.3", 1)),
        ("[::1]:65535", ListenAddress("::1", 65535)),
        ("localhost:9100", ListenAddress("localhost", 9100)),
    ],
)
def test_loopback_addresses_are_accepted(text: str, expected: ListenAddress) -> None:
    assert parse_listen_address(text, allow_remote=False) == expected


@pytest.mark.parametrize("text", ["0.0.0.0:9100", "10.1.2.3:9100", "[::]:9100", "[fe80::1]:80"])
def test_remote_addresses_need_the_explicit_flag(text: str) -> None:
    with pytest.raises(MetricsAddressError) as caught:
        parse_listen_address(text, allow_remote=False)
    assert caught.value.exit_code == 2
    assert "--metrics-allow-remote" in caught.value.message
    assert "not a loopback address" in caught.value.message
    assert parse_listen_address(text, allow_remote=True).port in (9100, 80)


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("9100", "expected HOST:PORT"),
        (":9100", "expected HOST:PORT"),
        ("127.0.0.1:", "port must be a number"),
        ("127.0.0.1:0", "port must be a number"),
        ("127.0.0.1:70000", "port must be a number"),
        ("127.0.0.1:http", "port must be a number"),
    ],
)
def test_malformed_addresses_are_usage_errors(text: str, says: str) -> None:
    with pytest.raises(MetricsAddressError) as caught:
        parse_listen_address(text, allow_remote=True)
    assert says in caught.value.message
    assert text in caught.value.message


def test_address_renders_back_as_given() -> None:
    assert str(ListenAddress("::1", 9100)) == "[::1]:9100"
    assert str(ListenAddress("127.0.0.1", 9100)) == "127.0.0.1:9100"


def value(metrics: Metrics, name: str, **labels: str) -> float:
    sample = metrics.registry.get_sample_value(name, labels)
    assert sample is not None, f"no sample {name}{labels}"
    return sample


def test_every_documented_metric_is_exported_from_the_start() -> None:
    text = generate_latest(Metrics().registry).decode()
    for name in (
        "reconciler_reconciles_total",
        "reconciler_reconcile_errors_total",
        "reconciler_reconcile_duration_seconds_bucket",
        "reconciler_queue_depth",
        'reconciler_drift_repairs_total{kind="Environment"}',
        'reconciler_environments{phase="Ready"}',
        'reconciler_environments{phase="Failed"}',
        "reconciler_orphans_collected_total",
    ):
        assert name in text, name


def test_reconciles_errors_and_durations_are_counted() -> None:
    metrics = Metrics()
    metrics.observe_reconcile(seconds=0.002, ok=True)
    metrics.observe_reconcile(seconds=3.0, ok=False)
    assert value(metrics, "reconciler_reconciles_total") == 2
    assert value(metrics, "reconciler_reconcile_errors_total") == 1
    assert value(metrics, "reconciler_reconcile_duration_seconds_count") == 2
    assert value(metrics, "reconciler_reconcile_duration_seconds_bucket", le="0.005") == 1
    assert value(metrics, "reconciler_reconcile_duration_seconds_sum") == pytest.approx(3.002)


def test_two_controllers_never_share_a_counter() -> None:
    first, second = Metrics(), Metrics()
    first.observe_reconcile(seconds=0.1, ok=True)
    assert value(second, "reconciler_reconciles_total") == 0


def test_queue_depth_is_read_at_scrape_time() -> None:
    metrics = Metrics()
    depth = [0]
    metrics.track_queue(lambda: depth[0])
    depth[0] = 3
    assert value(metrics, "reconciler_queue_depth") == 3


def test_only_successful_drift_repairs_are_counted() -> None:
    plan = Plan(
        changes=(
            Change("Environment", "a", Action.UPDATE, ("drift: holder process is not running",)),
            Change("Environment", "b", Action.UPDATE, ("spec.resources.memory: 1Mi -> 2Mi",)),
            Change("Environment", "c", Action.RECREATE, ("drift: netns rt-c is missing",)),
            Change("Network", "n", Action.UPDATE, ("drift: bridge rcbr-n is missing",)),
            Change("Environment", "d", Action.UPDATE, ("drift: eth0 is down",)),
        )
    )
    outcomes = [
        Outcome("Environment", "a", Action.UPDATE, True),
        Outcome("Environment", "b", Action.UPDATE, True),
        Outcome("Environment", "c", Action.RECREATE, True),
        Outcome("Network", "n", Action.UPDATE, True),
        Outcome("Environment", "d", Action.UPDATE, False, "failed"),
    ]
    metrics = Metrics()
    metrics.observe_result(ReconcileResult(plan=plan, outcomes=outcomes, state=StateDocument()))
    assert value(metrics, "reconciler_drift_repairs_total", kind="Environment") == 2
    assert value(metrics, "reconciler_drift_repairs_total", kind="Network") == 1


def _record(phase: str) -> EnvironmentRecord:
    return EnvironmentRecord.model_validate(
        {"spec": {}, "specHash": "x", "netns": "n", "phase": phase}
    )


def test_environments_by_phase_follow_the_state() -> None:
    metrics = Metrics()
    state = StateDocument(
        environments={"a": _record("Ready"), "b": _record("Ready"), "c": _record("Failed")}
    )
    metrics.observe_state(state)
    assert value(metrics, "reconciler_environments", phase="Ready") == 2
    assert value(metrics, "reconciler_environments", phase="Failed") == 1
    assert value(metrics, "reconciler_environments", phase="Pending") == 0
    metrics.observe_state(StateDocument(environments={"c": _record("Ready")}))
    assert value(metrics, "reconciler_environments", phase="Ready") == 1
    assert value(metrics, "reconciler_environments", phase="Failed") == 0
