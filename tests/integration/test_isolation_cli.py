"""Isolation through the product: manifests with policies -> `reconciler apply` -> real traffic.

The driver-level matrix lives in test_isolation.py; this file checks the wiring a user
relies on: ingress rules from manifests become nftables rules, a policy edit is planned as
an in-place update and applied without recreating anything, hand-made drift in the table
is repaired by the next apply, denied attempts are counted in `status`, and `destroy`
leaves no table of the instance.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.helpers import Reconciler, describe, managed_reconciler, write_manifest
from tests.integration.netprobe import DENY_TIMEOUT, Listener, reach
from tests.kernel_view import netns_inode, run

SUBNET = "10.219.7"


def _network(isolation: str) -> str:
    return f"""apiVersion: reconciler/v1
kind: Network
metadata: {{name: pol}}
spec: {{subnet: {SUBNET}.0/24, isolation: {isolation}}}
"""


def _env(name: str, host: int, ingress: str = "[]") -> str:
    return f"""apiVersion: reconciler/v1
kind: Environment
metadata: {{name: {name}}}
spec:
  network: {{name: pol, address: {SUBNET}.{host}}}
  policy: {{ingress: {ingress}}}
"""


ALLOW_A_8080 = "[{from: {environment: a}, ports: [8080]}]"


@pytest.fixture
def rc(tmp_path: Path, state_dir: Path, instance: str) -> Iterator[Reconciler]:
    manifests = tmp_path / "manifests"
    manifests.mkdir()
    write_manifest(manifests, "net.yaml", _network("strict"))
    write_manifest(manifests, "a.yaml", _env("a", 11))
    write_manifest(manifests, "b.yaml", _env("b", 12, ALLOW_A_8080))
    write_manifest(manifests, "c.yaml", _env("c", 13))
    reconciler = Reconciler(manifests=manifests, state_dir=state_dir, instance=instance)
    with managed_reconciler(reconciler):
        reconciler.ok("apply")
        yield reconciler


def _ns(rc: Reconciler, env: str) -> str:
    return f"{rc.instance}-{env}"


def _tables(instance: str) -> list[str]:
    listing = json.loads(run(["nft", "-j", "list", "tables"]).stdout)
    return [
        f"{t['table']['family']} {t['table']['name']}"
        for t in listing["nftables"]
        if "table" in t and instance in t["table"]["name"]
    ]


def test_ingress_from_manifests_is_enforced(rc: Reconciler) -> None:
    b = f"{SUBNET}.12"
    with Listener(_ns(rc, "b"), ["tcp:8080", "tcp:9090"]):
        assert reach(_ns(rc, "a"), b, 8080), "a -> b:8080 is allowed by b's ingress"
        assert not reach(_ns(rc, "a"), b, 9090, timeout=DENY_TIMEOUT), "a -> b:9090 not allowed"
        assert not reach(_ns(rc, "c"), b, 8080, timeout=DENY_TIMEOUT), "c is not allowed into b"
        assert reach(None, b, 9090), "the host reaches every environment"
    with Listener(_ns(rc, "a"), ["tcp:8080"]):
        assert not reach(_ns(rc, "b"), f"{SUBNET}.11", 8080, timeout=DENY_TIMEOUT)
    status = rc.json("status", "-o", "json")
    denied = {e["name"]: e["deniedConnections"] for e in status["environments"]}
    assert denied["c"] >= 1 and denied["a"] >= 1, denied


def test_policy_edit_is_an_in_place_update(rc: Reconciler) -> None:
    inodes = {env: netns_inode(_ns(rc, env)) for env in "abc"}
    write_manifest(
        rc.manifests, "b.yaml", _env("b", 12, "[{from: {environment: c}, ports: [8080]}]")
    )
    plan = rc.json("plan", "-o", "json")
    change = next(c for c in plan["changes"] if c["name"] == "b")
    assert change["action"] == "update", plan
    assert any(r.startswith("spec.policy.ingress") for r in change["reasons"]), change
    rc.ok("apply")
    assert {env: netns_inode(_ns(rc, env)) for env in "abc"} == inodes, "nothing recreated"
    with Listener(_ns(rc, "b"), ["tcp:8080"]):
        assert reach(_ns(rc, "c"), f"{SUBNET}.12", 8080), "c is now allowed"
        assert not reach(_ns(rc, "a"), f"{SUBNET}.12", 8080, timeout=DENY_TIMEOUT)


def test_open_network_lets_everyone_talk(rc: Reconciler) -> None:
    write_manifest(rc.manifests, "net.yaml", _network("open"))
    rc.ok("apply")
    with Listener(_ns(rc, "a"), ["tcp:7000"]):
        assert reach(_ns(rc, "c"), f"{SUBNET}.11", 7000)


def test_hand_flushed_rules_are_drift_and_repaired(rc: Reconciler) -> None:
    table = f"reconciler_{rc.instance}"
    assert run(["nft", "flush", "table", "inet", table]).returncode == 0
    with Listener(_ns(rc, "b"), ["tcp:8080"]):
        plan = rc("plan", "--detailed-exitcode")
        assert plan.returncode == 2, describe(plan)
        assert "isolation rules" in plan.stdout, plan.stdout
        rc.ok("apply")
        assert not reach(_ns(rc, "c"), f"{SUBNET}.12", 8080, timeout=DENY_TIMEOUT)
        assert reach(_ns(rc, "a"), f"{SUBNET}.12", 8080)
    assert rc("plan", "--detailed-exitcode").returncode == 0


def test_destroy_removes_the_tables_and_forwarding(rc: Reconciler) -> None:
    assert sorted(_tables(rc.instance)) == [
        f"bridge reconciler_{rc.instance}",
        f"inet reconciler_{rc.instance}",
    ]
    rc.ok("destroy")
    assert _tables(rc.instance) == []
    assert not os.path.exists("/proc/sys/net/ipv4/conf/rcbr-pol"), "bridge gone with its knobs"
    assert Path("/proc/sys/net/ipv4/ip_forward").read_text().strip() == "0"
