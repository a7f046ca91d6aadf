"""Plan: what `apply` would do and why, from desired + recorded + observed (pure).

Each test starts from a converged world (`factories.converged`: the manifests applied,
recorded and live, all agreeing) and changes one thing: a manifest edit, a lost file, or
one piece of kernel drift.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping
from typing import Any

import pytest

from reconciler.engine.observe import Observation
from reconciler.engine.plan import Action, Change, Plan
from reconciler.kernel.naming import host_veth_name, netns_name
from reconciler.kernel.types import CgroupLimits, NetworkObservation
from reconciler.state.model import StateDocument
from tests.unit.factories import (
    INSTANCE,
    World,
    converged,
    desired,
    env_doc,
    network_doc,
    with_cgroup,
    with_host_link,
    with_netns,
    with_netns_link,
)

Files = Mapping[str, str | Iterable[Mapping[str, Any]]]

WEB_SPEC: dict[str, Any] = {
    "resources": {
        "memory": "256Mi",
        "cpu": "500m",
        "pids": 64,
        "io": [{"device": "/dev/vda", "readBps": "1Mi"}],
    },
    "processes": [{"name": "api", "command": ["sleep", "1"]}],
}


def files(**web: Any) -> dict[str, Any]:
    """The base set of manifests; keyword arguments replace fields of web's spec."""
    spec = {**WEB_SPEC, **web}
    return {
        "net.yaml": [network_doc("devnet", "10.213.0.0/24")],
        "web.yaml": [env_doc("web", network="devnet", **spec)],
        "solo.yaml": [env_doc("solo")],
    }


WEB_VETH = host_veth_name(INSTANCE, "web")
WEB_NETNS = netns_name(INSTANCE, "web")


@pytest.fixture
def world() -> World:
    return converged(files())


def change(plan: Plan, kind: str, name: str) -> Change:
    found = plan.get(kind, name)
    assert found is not None, f"{kind}/{name} is not in the plan"
    return found


def actions(plan: Plan) -> dict[str, Action]:
    return {f"{c.kind}/{c.name}": c.action for c in plan.changes}


def only_change(plan: Plan) -> Change:
    changed = [c for c in plan.changes if c.action is not Action.NOOP]
    assert len(changed) == 1, changed
    return changed[0]


EMPTY = Observation(network=NetworkObservation(host_links={}, netns={}), cgroups={})


# --------------------------------------------------------------------------- basics


def test_everything_is_created_on_an_empty_host(world: World) -> None:
    plan = world.plan(state=StateDocument(), observation=EMPTY)
    assert actions(plan) == {
        "Network/devnet": Action.CREATE,
        "Environment/solo": Action.CREATE,
        "Environment/web": Action.CREATE,
    }
    assert change(plan, "Environment", "web").reasons == ("declared at web.yaml:1",)
    assert plan.summary() == {"create": 3, "update": 0, "recreate": 0, "delete": 0}
    assert plan.addresses == {"web": "10.213.0.2/24"}


def test_converged_world_is_all_noops(world: World) -> None:
    plan = world.plan()
    assert plan.has_changes is False
    assert {c.action for c in plan.changes} == {Action.NOOP}
    assert [c.reasons for c in plan.changes] == [(), (), ()]
    assert plan.summary() == {"create": 0, "update": 0, "recreate": 0, "delete": 0}


def test_new_environment_is_created_alone(world: World) -> None:
    more = files()
    more["db.yaml"] = [env_doc("db", network="devnet")]
    plan = world.plan(desired=desired(more))
    created = only_change(plan)
    assert (created.kind, created.name, created.action) == ("Environment", "db", Action.CREATE)
    assert plan.addresses["db"] == "10.213.0.3/24"  # web keeps .2
    assert plan.addresses["web"] == "10.213.0.2/24"


# --------------------------------------------------------------------------- edits


@pytest.mark.parametrize(
    ("edit", "reason"),
    [
        (
            {"resources": {**WEB_SPEC["resources"], "memory": "128Mi"}},
            "spec.resources.memory: 256Mi -> 128Mi",
        ),
        ({"resources": {**WEB_SPEC["resources"], "cpu": 1}}, "spec.resources.cpu: 500m -> 1"),
        ({"resources": {**WEB_SPEC["resources"], "pids": 65}}, "spec.resources.pids: 64 -> 65"),
        (
            {"resources": {k: v for k, v in WEB_SPEC["resources"].items() if k != "memory"}},
            "spec.resources.memory: 256Mi -> (unset)",
        ),
        (
            {"processes": [{"name": "api", "command": ["sleep", "2"]}]},
            'spec.processes[api].command: ["sleep","1"] -> ["sleep","2"]',
        ),
        ({"policy": {"onViolation": "kill"}}, "spec.policy.onViolation: alert -> kill"),
    ],
)
def test_in_place_edits_are_updates_that_name_the_field(
    world: World, edit: dict[str, Any], reason: str
) -> None:
    updated = only_change(world.plan(desired=desired(files(**edit))))
    assert (updated.name, updated.action) == ("web", Action.UPDATE)
    assert updated.reasons[0] == reason


def test_an_edited_limit_is_not_also_reported_as_drift(world: World) -> None:
    edited = files(resources={**WEB_SPEC["resources"], "memory": "128Mi"})
    updated = only_change(world.plan(desired=desired(edited)))
    assert updated.reasons == ("spec.resources.memory: 256Mi -> 128Mi",)


def test_label_change_is_an_update(world: World) -> None:
    edited = files()
    edited["web.yaml"] = [env_doc("web", network="devnet", labels={"team": "pay"}, **WEB_SPEC)]
    updated = only_change(world.plan(desired=desired(edited)))
    assert updated.action is Action.UPDATE
    assert updated.reasons == ("metadata.labels: {} -> {'team': 'pay'}",)


def test_static_address_change_is_an_update_with_the_new_address(world: World) -> None:
    edited = files()
    edited["web.yaml"] = [env_doc("web", network="devnet", address="10.213.0.77", **WEB_SPEC)]
    updated = only_change(world.plan(desired=desired(edited)))
    assert updated.action is Action.UPDATE
    assert "address: 10.213.0.2/24 -> 10.213.0.77/24" in updated.reasons


@pytest.mark.parametrize(
    ("edit", "reason"),
    [
        ({"hostname": "other"}, "spec.hostname: web -> other (forces replacement)"),
        (
            {"namespaces": ["net", "mnt"]},
            'spec.namespaces: ["net","uts","ipc","mnt","pid"] -> ["net","mnt"]',
        ),
        ({"mounts": [{"type": "tmpfs", "target": "/tmp"}]}, "spec.mounts"),
    ],
)
def test_fields_that_cannot_change_live_force_a_recreate(
    world: World, edit: dict[str, Any], reason: str
) -> None:
    recreated = only_change(world.plan(desired=desired(files(**edit))))
    assert (recreated.name, recreated.action) == ("web", Action.RECREATE)
    assert len(recreated.reasons) == 1
    assert recreated.reasons[0].startswith(reason)
    assert recreated.reasons[0].endswith("(forces replacement)")


def test_moving_to_another_network_forces_a_recreate() -> None:
    base = files()
    base["net.yaml"] = [
        network_doc("devnet", "10.213.0.0/24"),
        network_doc("other", "10.214.0.0/24"),
    ]
    world = converged(base)
    moved = dict(base)
    moved["web.yaml"] = [env_doc("web", network="other", **WEB_SPEC)]
    plan = world.plan(desired=desired(moved))
    recreated = only_change(plan)
    assert (recreated.name, recreated.action) == ("web", Action.RECREATE)
    assert recreated.reasons == ("spec.network.name: devnet -> other (forces replacement)",)
    assert plan.addresses["web"] == "10.214.0.2/24"


@pytest.mark.parametrize("direction", ["join", "leave"])
def test_joining_or_leaving_a_network_forces_a_recreate(direction: str) -> None:
    with_net = files()
    without = files()
    without["web.yaml"] = [env_doc("web", **WEB_SPEC)]
    before, after = (without, with_net) if direction == "join" else (with_net, without)
    world = converged(before)
    recreated = only_change(world.plan(desired=desired(after)))
    assert recreated.action is Action.RECREATE
    assert "(forces replacement)" in recreated.reasons[0]


def test_writing_defaults_out_explicitly_is_not_a_change(world: World) -> None:
    explicit = files(hostname="web", namespaces=["pid", "mnt", "ipc", "uts", "net"])
    explicit["net.yaml"] = [
        network_doc("devnet", "10.213.0.0/24", gateway="10.213.0.1", bridge="rcbr-devnet")
    ]
    plan = world.plan(desired=desired(explicit))
    assert plan.has_changes is False, plan.to_json()


def test_network_field_change_is_an_update(world: World) -> None:
    edited = files()
    edited["net.yaml"] = [network_doc("devnet", "10.213.0.0/24", isolation="open")]
    updated = only_change(world.plan(desired=desired(edited)))
    assert (updated.kind, updated.action) == ("Network", Action.UPDATE)
    assert updated.reasons == ("spec.isolation: strict -> open",)


@pytest.mark.parametrize(
    ("spec", "reason"),
    [
        (
            {"subnet": "10.99.0.0/24"},
            # The default gateway moves with the subnet: both are named, gateway first.
            "spec.gateway: 10.213.0.1 -> 10.99.0.1 (forces replacement)",
        ),
        (
            {"subnet": "10.213.0.0/24", "gateway": "10.213.0.254"},
            "spec.gateway: 10.213.0.1 -> 10.213.0.254 (forces replacement)",
        ),
        (
            {"subnet": "10.213.0.0/24", "bridge": "br-dev"},
            "spec.bridge: rcbr-devnet -> br-dev (forces replacement)",
        ),
    ],
)
def test_network_replacement_recreates_its_environments(
    world: World, spec: dict[str, str], reason: str
) -> None:
    edited = files()
    edited["net.yaml"] = [network_doc("devnet", **spec)]
    plan = world.plan(desired=desired(edited))
    assert actions(plan) == {
        "Network/devnet": Action.RECREATE,
        "Environment/solo": Action.NOOP,
        "Environment/web": Action.RECREATE,
    }
    assert change(plan, "Network", "devnet").reasons[0] == reason
    assert change(plan, "Environment", "web").reasons == ("network devnet is replaced",)
    assert [c.kind for c in plan.changes] == ["Network", "Environment", "Environment"]


# --------------------------------------------------------------------------- pruning


def test_removed_manifest_is_deleted(world: World) -> None:
    remaining = files()
    del remaining["solo.yaml"]
    deleted = only_change(world.plan(desired=desired(remaining)))
    assert (deleted.name, deleted.action, deleted.reasons) == (
        "solo",
        Action.DELETE,
        ("no longer declared",),
    )


@pytest.mark.parametrize(
    "broken",
    [
        "kind: [\n",  # not even YAML: nothing is known but the file
        "apiVersion: reconciler/v1\nkind: Environment\nmetadata: {name: solo}\n"
        "spec: {hostnme: x}\n",
    ],
    ids=["syntax", "validation"],
)
def test_manifest_in_a_broken_file_is_kept_not_deleted(world: World, broken: str) -> None:
    damaged: dict[str, Any] = files()
    damaged["solo.yaml"] = broken
    want = desired(damaged)
    assert not want.complete
    plan = world.plan(desired=want)
    kept = change(plan, "Environment", "solo")
    assert kept.action is Action.NOOP
    assert kept.reasons == ("manifest failed to load; kept as last applied",)
    assert plan.has_changes is False


def test_broken_network_file_keeps_the_network_and_its_environments(world: World) -> None:
    damaged: dict[str, Any] = files()
    damaged["net.yaml"] = (
        "apiVersion: reconciler/v1\nkind: Network\nmetadata: {name: devnet}\n"
        "spec: {subnet: 10.213.0.0/8}\n"
    )
    plan = world.plan(desired=desired(damaged))
    assert actions(plan) == {
        "Network/devnet": Action.NOOP,
        "Environment/solo": Action.NOOP,
        "Environment/web": Action.NOOP,
    }


def test_removed_network_is_kept_while_a_kept_environment_uses_it(world: World) -> None:
    remaining = files()
    del remaining["net.yaml"]
    want = desired(remaining)
    assert ("Environment", "web") in want.protected_keys  # web now fails crosscheck
    plan = world.plan(desired=want)
    assert change(plan, "Environment", "web").action is Action.NOOP
    assert change(plan, "Network", "devnet").action is not Action.DELETE


def test_deletes_run_environments_first_then_networks(world: World) -> None:
    plan = world.plan(desired=desired({}))
    assert [(c.kind, c.name, c.action) for c in plan.changes] == [
        ("Environment", "solo", Action.DELETE),
        ("Environment", "web", Action.DELETE),
        ("Network", "devnet", Action.DELETE),
    ]
    assert plan.summary()["delete"] == 3


def test_creates_run_networks_first() -> None:
    world = converged({})
    new = files()
    new["net.yaml"] = [network_doc("zzz", "10.50.0.0/24"), network_doc("devnet", "10.213.0.0/24")]
    plan = world.plan(desired=desired(new))
    kinds = [c.kind for c in plan.changes]
    assert kinds == ["Network", "Network", "Environment", "Environment"]
    assert {c.action for c in plan.changes} == {Action.CREATE}


def test_mixed_plan_orders_network_create_envs_then_network_delete() -> None:
    old = {"old.yaml": [network_doc("old", "10.1.0.0/24"), env_doc("a", network="old")]}
    world = converged(old)
    new = {"new.yaml": [network_doc("new", "10.2.0.0/24"), env_doc("b", network="new")]}
    plan = world.plan(desired=desired(new))
    assert [(c.kind, c.name, c.action) for c in plan.changes] == [
        ("Network", "new", Action.CREATE),
        ("Environment", "a", Action.DELETE),
        ("Environment", "b", Action.CREATE),
        ("Network", "old", Action.DELETE),
    ]


# --------------------------------------------------------------------------- drift


def link_update(world: World, **fields: Any) -> Observation:
    veth = world.observation.network.host_links[WEB_VETH]
    return with_host_link(world.observation, WEB_VETH, dataclasses.replace(veth, **fields))


def eth0_update(world: World, **fields: Any) -> Observation:
    eth0 = world.observation.network.netns[WEB_NETNS].links["eth0"]
    return with_netns_link(
        world.observation, WEB_NETNS, "eth0", dataclasses.replace(eth0, **fields)
    )


def cgroup_limits(world: World, **limits: Any) -> Observation:
    group = world.observation.cgroups["web"]
    changed = dataclasses.replace(group, limits=dataclasses.replace(group.limits, **limits))
    return with_cgroup(world.observation, "web", changed)


DRIFT = {
    "host veth missing": (
        lambda w: with_host_link(w.observation, WEB_VETH, None),
        f"drift: host veth {WEB_VETH} is missing",
    ),
    "host veth down": (lambda w: link_update(w, up=False), f"drift: host veth {WEB_VETH} is down"),
    "host veth on the wrong bridge": (
        lambda w: link_update(w, master="docker0"),
        f"drift: host veth {WEB_VETH} is not on bridge rcbr-devnet",
    ),
    "host veth not ours": (
        lambda w: link_update(w, alias="someone-else"),
        f"drift: host veth {WEB_VETH} has ownership tag 'someone-else'",
    ),
    "eth0 address missing": (
        lambda w: eth0_update(w, addresses=()),
        "drift: eth0 addresses none (want 10.213.0.2/24)",
    ),
    "eth0 wrong address": (
        lambda w: eth0_update(w, addresses=("10.213.0.9/24",)),
        "drift: eth0 addresses 10.213.0.9/24 (want 10.213.0.2/24)",
    ),
    "eth0 down": (lambda w: eth0_update(w, up=False), "drift: eth0 is down"),
    "eth0 missing": (
        lambda w: with_netns_link(w.observation, WEB_NETNS, "eth0", None),
        "drift: eth0 is missing inside the netns",
    ),
    "cgroup missing": (
        lambda w: with_cgroup(w.observation, "web", None),
        "drift: cgroup is missing",
    ),
    "cgroup memory limit changed": (
        lambda w: cgroup_limits(w, memory_bytes=512 * 2**20),
        "drift: cgroup memory 512Mi (want 256Mi)",
    ),
    "cgroup cpu limit removed": (
        lambda w: cgroup_limits(w, cpu_millis=None),
        "drift: cgroup cpu unlimited (want 500m)",
    ),
    "cgroup pids limit changed": (
        lambda w: cgroup_limits(w, pids=1),
        "drift: cgroup pids 1 (want 64)",
    ),
    "cgroup io limit removed": (
        lambda w: cgroup_limits(w, io=()),
        "drift: cgroup io limits differ",
    ),
    "cgroup partly removed": (
        lambda w: with_cgroup(
            w.observation, "web", dataclasses.replace(w.observation.cgroups["web"], complete=False)
        ),
        "drift: some cgroup directories are missing",
    ),
    "holder dead": (
        lambda w: dataclasses.replace(w.observation, holders_alive={"solo": True, "web": False}),
        "drift: holder process is not running",
    ),
}


@pytest.mark.parametrize(("breaks", "reason"), list(DRIFT.values()), ids=list(DRIFT))
def test_drift_is_repaired_in_place(world: World, breaks: Any, reason: str) -> None:
    updated = only_change(world.plan(observation=breaks(world)))
    assert (updated.kind, updated.name, updated.action) == ("Environment", "web", Action.UPDATE)
    assert updated.reasons == (reason,)


def test_cgroup_limits_match_the_manifest_in_the_converged_world(world: World) -> None:
    assert world.desired.environments["web"].limits == CgroupLimits(
        memory_bytes=256 * 2**20,
        cpu_millis=500,
        pids=64,
        io=world.desired.environments["web"].limits.io,
    )
    assert world.desired.environments["web"].limits.io[0].device == "254:0"


def test_missing_netns_forces_a_recreate(world: World) -> None:
    recreated = only_change(world.plan(observation=with_netns(world.observation, WEB_NETNS, None)))
    assert (recreated.name, recreated.action) == ("web", Action.RECREATE)
    assert recreated.reasons == (f"drift: netns {WEB_NETNS} is missing",)


def test_replaced_netns_forces_a_recreate(world: World) -> None:
    ns = world.observation.network.netns[WEB_NETNS]
    replaced = with_netns(world.observation, WEB_NETNS, dataclasses.replace(ns, inode=ns.inode + 1))
    recreated = only_change(world.plan(observation=replaced))
    assert (recreated.name, recreated.action) == ("web", Action.RECREATE)
    assert recreated.reasons == (f"drift: netns {WEB_NETNS} was replaced",)


@pytest.mark.parametrize(
    ("edit", "reason"),
    [
        ({"up": False}, "drift: bridge rcbr-devnet is down"),
        ({"addresses": ()}, "drift: bridge rcbr-devnet addresses none (want 10.213.0.1/24)"),
        ({"alias": None}, "drift: bridge rcbr-devnet has ownership tag None"),
    ],
)
def test_bridge_drift_is_a_network_update(world: World, edit: dict[str, Any], reason: str) -> None:
    bridge = world.observation.network.host_links["rcbr-devnet"]
    observation = with_host_link(
        world.observation, "rcbr-devnet", dataclasses.replace(bridge, **edit)
    )
    updated = only_change(world.plan(observation=observation))
    assert (updated.kind, updated.action, updated.reasons) == ("Network", Action.UPDATE, (reason,))


def test_missing_bridge_is_a_network_update(world: World) -> None:
    observation = with_host_link(world.observation, "rcbr-devnet", None)
    plan = world.plan(observation=observation)
    assert change(plan, "Network", "devnet").reasons == ("drift: bridge rcbr-devnet is missing",)
    assert change(plan, "Network", "devnet").action is Action.UPDATE


# --------------------------------------------------------------------------- output


def test_plan_json_matches_the_contract(world: World) -> None:
    edited = files(policy={"onViolation": "kill"})
    del edited["solo.yaml"]
    document = world.plan(desired=desired(edited)).to_json()
    assert set(document) == {"formatVersion", "changes", "summary"}
    assert document["formatVersion"] == 1
    assert document["summary"] == {"create": 0, "update": 1, "recreate": 0, "delete": 1}
    for item in document["changes"]:
        assert set(item) == {"kind", "name", "action", "reasons"}
        assert item["action"] in {"create", "update", "recreate", "delete", "noop"}
        assert isinstance(item["reasons"], list)
        assert all(isinstance(r, str) for r in item["reasons"])
    web = next(c for c in document["changes"] if c["name"] == "web")
    assert web == {
        "kind": "Environment",
        "name": "web",
        "action": "update",
        "reasons": ["spec.policy.onViolation: alert -> kill"],
    }
    solo = next(c for c in document["changes"] if c["name"] == "solo")
    assert solo == {
        "kind": "Environment",
        "name": "solo",
        "action": "delete",
        "reasons": ["no longer declared"],
    }
    assert json.loads(json.dumps(document)) == document
