"""The isolation picture follows the inventory: rules come from each record's spec."""

from __future__ import annotations

from typing import Any

from reconciler.engine.isolation import isolation_spec
from tests.unit.factories import INSTANCE, converged, env_doc, network_doc


def _ingress(port: int) -> dict[str, Any]:
    return {"ingress": [{"from": {"environment": "api"}, "ports": [port], "protocol": "tcp"}]}


def _allowed(state: Any) -> set[tuple[str, str | None, tuple[int, ...]]]:
    spec = isolation_spec(instance=INSTANCE, state=state)
    return {
        (rule.dst_env, rule.src_env, tuple(rule.ports))
        for network in spec.networks
        for rule in network.ingress
    }


def test_rules_follow_an_edited_spec_of_the_same_environment() -> None:
    world = converged(
        {
            "m.yaml": [
                network_doc("devnet"),
                env_doc("api", network="devnet"),
                env_doc("db", network="devnet", policy=_ingress(5432)),
            ]
        }
    )
    assert _allowed(world.state) == {("db", "api", (5432,))}
    # Rendered again (the second time from the cache), then from an edited record.
    assert _allowed(world.state) == {("db", "api", (5432,))}
    edited = world.state.clone()
    edited.environments["db"].spec["policy"] = _ingress(6432)
    assert _allowed(edited) == {("db", "api", (6432,))}
    edited.environments["db"].spec.pop("policy")
    assert _allowed(edited) == set()
