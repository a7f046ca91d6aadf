"""The isolation renderer is pure: same spec, same text; every rule says what it is for.

Kernel behaviour is proven with traffic in tests/integration/test_isolation.py. Here:
rendering (deterministic, strict vs open, ingress resolution, quarantine), the live-table
fingerprint (`parse_live` on nft-shaped JSON, `differences`), the transaction text, and
(root, in the sandbox) that `nft -c` accepts what we render.
"""

from __future__ import annotations

import random
import re
from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reconciler.kernel.nftrules import (
    DENIED_SET,
    Allow,
    IsolationSpec,
    LiveTable,
    Member,
    NetworkRules,
    Ruleset,
    Table,
    differences,
    network_chain,
    parse_live,
    remove_script,
    render,
    script,
    structural_drift,
    table_name,
    table_script,
)

A = Member("a", "rcva", "10.9.0.2")
B = Member("b", "rcvb", "10.9.0.3")
C = Member("c", "rcvc", "10.9.0.4")
X = Member("x", "rcvx", "10.8.0.2")


def strict_net(*ingress: Allow, members: tuple[Member, ...] = (A, B, C)) -> NetworkRules:
    return NetworkRules(
        name="dev",
        bridge="rcbr-dev",
        subnet="10.9.0.0/24",
        gateway="10.9.0.1",
        members=members,
        ingress=ingress,
    )


def open_net() -> NetworkRules:
    return NetworkRules(
        name="lab",
        bridge="rcbr-lab",
        subnet="10.8.0.0/24",
        gateway="10.8.0.1",
        isolation="open",
        members=(X,),
    )


def spec(*ingress: Allow, quarantined: frozenset[str] = frozenset()) -> IsolationSpec:
    return IsolationSpec(
        instance="demo", networks=(strict_net(*ingress), open_net()), quarantined=quarantined
    )


def table(ruleset: Ruleset, family: str) -> Table:
    return next(t for t in ruleset.tables if t.family == family)


def rules(ruleset: Ruleset, family: str, chain: str) -> list[str]:
    found = next(c for c in table(ruleset, family).chains if c.name == chain)
    return [r.body for r in found.rules]


def as_nft_json(t: Table, *, counters: dict[tuple[str, ...], int] | None = None) -> dict[str, Any]:
    """What `nft -j list table` prints for `t` as applied (the fields we read)."""
    entries: list[dict[str, Any]] = [{"metainfo": {"version": "1.0.6"}}]
    entries.append({"table": {"family": t.family, "name": t.name, "handle": 1}})
    for s in t.sets:
        body: dict[str, Any] = {
            "family": t.family,
            "name": s.name,
            "table": t.name,
            "type": list(s.key) if len(s.key) > 1 else s.key[0],
            "size": s.size,
        }
        if counters:
            body["elem"] = [
                {
                    "elem": {
                        "val": {"concat": list(k)} if len(k) > 1 else k[0],
                        "counter": {"packets": n, "bytes": 60 * n},
                    }
                }
                for k, n in counters.items()
            ]
        entries.append({"set": body})
    for c in t.chains:
        chain: dict[str, Any] = {"family": t.family, "table": t.name, "name": c.name}
        if c.base is not None:
            chain |= {
                "type": c.base.type,
                "hook": c.base.hook,
                "prio": c.base.priority,
                "policy": c.base.policy,
            }
        entries.append({"chain": chain})
    for c in t.chains:
        for r in c.rules:
            entries.append(
                {
                    "rule": {
                        "family": t.family,
                        "table": t.name,
                        "chain": c.name,
                        "comment": r.comment,
                        "expr": [],
                    }
                }
            )
    return {"nftables": entries}


def live_of(t: Table, **kwargs: Any) -> LiveTable:
    return parse_live(as_nft_json(t, **kwargs), family=t.family, name=t.name)


# --------------------------------------------------------------------------- names


def test_table_name_includes_the_instance() -> None:
    assert table_name("ci_42") == "reconciler_ci_42"
    ruleset = render(spec())
    assert {(t.family, t.name) for t in ruleset.tables} == {
        ("inet", "reconciler_demo"),
        ("bridge", "reconciler_demo"),
    }


@pytest.mark.parametrize("bad", ["", "Demo", "a-b", 'x"y', "a" * 33])
def test_instance_names_unsafe_for_nft_are_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        table_name(bad)


# --------------------------------------------------------------------------- rendering


def test_rendering_is_deterministic_whatever_the_input_order() -> None:
    allows = (
        Allow(dst_env="b", src_env="a", ports=(8080, 80)),
        Allow(dst_env="c", src_cidr="10.9.0.0/28", protocol="udp"),
        Allow(dst_env="a", src_env="c", ports=(22,)),
    )
    base = spec(*allows, quarantined=frozenset({"c"}))
    text = script(render(base), {})
    assert script(render(base), {}) == text
    shuffled = IsolationSpec(
        instance="demo",
        networks=(
            open_net(),
            strict_net(*reversed(allows), members=(C, A, B)),
        ),
        quarantined=frozenset({"c"}),
    )
    assert script(render(shuffled), {}) == text


def test_strict_network_admits_only_its_ingress_rules_then_denies() -> None:
    body = rules(render(spec(Allow(dst_env="b", src_env="a", ports=(8080,)))), "inet", "fwd_dev")
    assert body == [
        'oifname != "rcbr-dev" jump deny',
        "ct state established,related accept",
        "ct state invalid drop",
        "ip daddr 10.9.0.3 ip saddr 10.9.0.2 tcp dport { 8080 } accept",
        "jump deny",
    ]


def test_open_network_accepts_everything_that_stays_on_its_bridge() -> None:
    body = rules(render(spec()), "inet", network_chain("lab"))
    assert body[0] == 'oifname != "rcbr-lab" jump deny'
    assert body[-1] == "accept"
    assert "jump deny" not in body[1:]


def test_ingress_by_env_resolves_to_addresses_and_ports_are_sorted_unique() -> None:
    allow = Allow(dst_env="c", src_env="b", ports=(9090, 80, 9090), protocol="udp")
    assert "ip daddr 10.9.0.4 ip saddr 10.9.0.3 udp dport { 80, 9090 } accept" in rules(
        render(spec(allow)), "inet", "fwd_dev"
    )


def test_cidr_source_is_normalised() -> None:
    allow = Allow(dst_env="b", src_cidr="10.9.0.5/28", ports=(443,))
    assert "ip daddr 10.9.0.3 ip saddr 10.9.0.0/28 tcp dport { 443 } accept" in rules(
        render(spec(allow)), "inet", "fwd_dev"
    )


def test_empty_ports_mean_every_port_of_the_protocol() -> None:
    allow = Allow(dst_env="b", src_env="a", protocol="udp")
    assert "ip daddr 10.9.0.3 ip saddr 10.9.0.2 meta l4proto udp accept" in rules(
        render(spec(allow)), "inet", "fwd_dev"
    )


def test_sources_not_on_the_network_render_no_rule() -> None:
    elsewhere = Allow(dst_env="b", src_env="x", ports=(80,))  # x is on another network
    unknown = Allow(dst_env="b", src_env="ghost", ports=(80,))
    no_dst = Allow(dst_env="ghost", src_env="a", ports=(80,))
    base = rules(render(spec()), "inet", "fwd_dev")
    assert rules(render(spec(elsewhere, unknown, no_dst)), "inet", "fwd_dev") == base


def test_duplicate_ingress_rules_render_once() -> None:
    allow = Allow(dst_env="b", src_env="a", ports=(80,))
    assert rules(render(spec(allow, allow)), "inet", "fwd_dev") == rules(
        render(spec(allow)), "inet", "fwd_dev"
    )


def test_every_bridge_and_port_is_covered() -> None:
    ruleset = render(spec())
    forward = rules(ruleset, "inet", "forward")
    assert forward[0] == ('iifname vmap { "rcbr-dev" : jump fwd_dev, "rcbr-lab" : jump fwd_lab }')
    assert forward[1] == 'oifname { "rcbr-dev", "rcbr-lab" } jump deny'
    assert rules(ruleset, "inet", "input") == ['iifname { "rcbr-dev", "rcbr-lab" } jump from_envs']
    anti = rules(ruleset, "bridge", "antispoof")
    pairs = '"rcva" . 10.9.0.2, "rcvb" . 10.9.0.3, "rcvc" . 10.9.0.4, "rcvx" . 10.8.0.2'
    assert anti[0] == f"iifname . ip saddr {{ {pairs} }} accept"
    assert anti[1] == f"iifname . arp saddr ip {{ {pairs} }} accept"
    assert anti[-1] == "drop"


def test_quarantine_drops_the_env_port_both_ways() -> None:
    plain = render(spec())
    assert not [r for r in rules(plain, "bridge", "prerouting") if "drop" in r]
    assert rules(plain, "bridge", "output") == []
    cut = render(spec(quarantined=frozenset({"b"})))
    assert rules(cut, "bridge", "prerouting")[0] == 'iifname { "rcvb" } drop'
    assert rules(cut, "bridge", "output") == ['oifname { "rcvb" } drop']


def test_no_nat_and_no_drop_policy_ever() -> None:
    text = script(render(spec(Allow(dst_env="b", src_env="a"))), {})
    assert not re.search(r"\b(nat|masquerade|snat|dnat|redirect to)\b", text)
    assert "policy drop" not in text
    assert "policy accept" in text


def test_every_rule_carries_a_short_unique_fingerprint_comment() -> None:
    ruleset = render(spec(Allow(dst_env="b", src_env="a", ports=(8080,))))
    comments = [r.comment for t in ruleset.tables for c in t.chains for r in c.rules]
    assert all(re.fullmatch(r"[A-Za-z0-9 ._:/,>-]+ #[0-9a-f]{12}", c) for c in comments)
    assert all(len(c.encode()) <= 128 for c in comments)
    assert len(set(comments)) == len(comments)


def test_a_changed_rule_changes_its_fingerprint() -> None:
    one = render(spec(Allow(dst_env="b", src_env="a", ports=(8080,))))
    two = render(spec(Allow(dst_env="b", src_env="a", ports=(8081,))))
    assert table(one, "inet").shape() != table(two, "inet").shape()
    assert table(one, "bridge").shape() == table(two, "bridge").shape()


def test_no_networks_renders_no_tables_and_a_removal() -> None:
    ruleset = render(IsolationSpec(instance="demo"))
    assert ruleset.tables == ()
    assert script(ruleset, {}) == "\n".join(remove_script("demo")) + "\n"
    assert remove_script("demo") == [
        "add table inet reconciler_demo",
        "delete table inet reconciler_demo",
        "add table bridge reconciler_demo",
        "delete table bridge reconciler_demo",
    ]


@pytest.mark.parametrize(
    "bad",
    [
        IsolationSpec(instance="demo", networks=(strict_net(members=(A, replace(B, env="a"))),)),
        IsolationSpec(
            instance="demo", networks=(strict_net(members=(A, replace(B, address=A.address))),)
        ),
        IsolationSpec(
            instance="demo", networks=(strict_net(members=(replace(A, address="10.1.1.1"),)),)
        ),
        IsolationSpec(instance="demo", networks=(replace(strict_net(), bridge='br"0'),)),
        IsolationSpec(
            instance="demo", networks=(strict_net(members=(replace(A, host_port="x y"),)),)
        ),
        IsolationSpec(instance="demo", networks=(replace(strict_net(), name="Dev"),)),
        IsolationSpec(
            instance="demo", networks=(strict_net(), replace(open_net(), bridge="rcbr-dev"))
        ),
    ],
    ids=["env-twice", "address-twice", "outside-subnet", "quote", "space", "name", "bridge-twice"],
)
def test_inconsistent_or_unsafe_specs_are_refused(bad: IsolationSpec) -> None:
    with pytest.raises(ValueError):
        render(bad)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"src_env": "a", "src_cidr": "10.0.0.0/8"},
        {},
        {"src_env": "a", "ports": (0,)},
        {"src_env": "a", "ports": (65536,)},
        {"src_env": "a", "protocol": "icmp"},
    ],
)
def test_allow_validates_itself(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        Allow(dst_env="b", **kwargs)


# --------------------------------------------------------------------------- fingerprint


def test_a_table_as_applied_has_no_differences() -> None:
    for t in render(spec(Allow(dst_env="b", src_env="a"))).tables:
        assert live_of(t).shape == t.shape()
        assert differences(t, live_of(t)) == []


def test_differences_name_what_drifted() -> None:
    t = table(render(spec()), "inet")
    doc = as_nft_json(t)
    assert differences(t, None) == ["nftables table inet reconciler_demo: created"]

    flushed = {"nftables": [e for e in doc["nftables"] if e.get("rule", {}).get("chain") != "deny"]}
    assert differences(t, parse_live(flushed, family="inet", name=t.name)) == [
        "nftables table inet reconciler_demo: chain deny rules replaced (0 -> 2)"
    ]

    added = {
        "nftables": [
            *doc["nftables"],
            {"rule": {"family": "inet", "table": t.name, "chain": "input"}},
        ]
    }
    assert differences(t, parse_live(added, family="inet", name=t.name)) == [
        "nftables table inet reconciler_demo: chain input rules replaced (2 -> 1)"
    ]

    policy = {
        "nftables": [
            {"chain": {**e["chain"], "policy": "drop"}}
            if e.get("chain", {}).get("name") == "forward"
            else e
            for e in doc["nftables"]
        ]
    }
    assert differences(t, parse_live(policy, family="inet", name=t.name)) == [
        "nftables table inet reconciler_demo: chain forward policy reset to accept"
    ]


def test_foreign_objects_and_moved_hooks_force_a_rebuild() -> None:
    t = table(render(spec()), "inet")
    doc = as_nft_json(t)
    counter = {"counter": {"family": "inet", "table": t.name, "name": "evil"}}
    live = parse_live({"nftables": [*doc["nftables"], counter]}, family="inet", name=t.name)
    assert structural_drift(t, live) == ["unexpected counter evil"]
    assert differences(t, live)[0].endswith("rebuilt (unexpected counter evil)")

    moved = {
        "nftables": [
            {"chain": {**e["chain"], "prio": 10}}
            if e.get("chain", {}).get("name") == "input"
            else e
            for e in doc["nftables"]
        ]
    }
    assert structural_drift(t, parse_live(moved, family="inet", name=t.name))


def test_parse_live_ignores_other_tables_and_families() -> None:
    t = table(render(spec()), "inet")
    doc = as_nft_json(t)
    foreign = {"rule": {"family": "inet", "table": "foreign", "chain": "input", "comment": "x"}}
    other_family = {"chain": {"family": "ip", "table": t.name, "name": "zzz"}}
    live = parse_live(
        {"nftables": [*doc["nftables"], foreign, other_family]}, family="inet", name=t.name
    )
    assert differences(t, live) == []


# --------------------------------------------------------------------------- transactions


def test_create_script_adds_then_fills_and_never_deletes() -> None:
    t = table(render(spec()), "inet")
    lines = table_script(t, None, ruleset=render(spec()))
    assert lines[0] == "add table inet reconciler_demo"
    assert not [line for line in lines if line.startswith("delete")]
    assert lines.index("flush chain inet reconciler_demo deny") < next(
        i for i, line in enumerate(lines) if line.startswith("add rule")
    )


def test_refill_keeps_the_sets_and_prunes_stale_counter_pairs() -> None:
    ruleset = render(spec())
    t = table(ruleset, "inet")
    live = live_of(t, counters={("10.9.0.2", "10.9.0.3"): 4, ("10.7.7.7", "10.6.6.6"): 1})
    lines = table_script(t, live, ruleset=ruleset)
    assert not [line for line in lines if line.startswith(("delete table", "flush set"))]
    assert f"delete element inet reconciler_demo {DENIED_SET} {{ 10.7.7.7 . 10.6.6.6 }}" in lines


@pytest.mark.parametrize(
    ("key", "stale"),
    [
        (("10.9.0.2", "10.9.0.3"), False),  # a -> b
        (("10.9.0.2", "10.9.0.1"), False),  # a -> its gateway
        (("10.9.0.2", "10.250.0.2"), False),  # a -> outside our subnets
        (("10.250.0.2", "10.9.0.2"), False),  # outside -> a
        (("10.9.0.99", "10.9.0.3"), True),  # a departed env -> b
        (("10.9.0.2", "10.9.0.99"), True),  # a -> a departed env
        (("10.250.0.2", "10.250.0.3"), True),  # names no env at all
        (("rcva",), False),
        (("rcvgone",), True),
    ],
)
def test_counter_elements_of_departed_envs_are_stale(key: tuple[str, ...], stale: bool) -> None:
    assert render(spec()).stale(key) is stale


def test_refill_deletes_unwanted_chains_after_flushing_all() -> None:
    old = render(IsolationSpec(instance="demo", networks=(strict_net(), open_net())))
    new = render(IsolationSpec(instance="demo", networks=(strict_net(),)))
    lines = table_script(table(new, "inet"), live_of(table(old, "inet")), ruleset=new)
    flush_old = lines.index("flush chain inet reconciler_demo fwd_lab")
    delete_old = lines.index("delete chain inet reconciler_demo fwd_lab")
    last_flush = max(i for i, line in enumerate(lines) if line.startswith("flush chain"))
    assert flush_old <= last_flush < delete_old


def test_rebuild_recreates_the_table_and_carries_live_counters() -> None:
    ruleset = render(spec())
    t = table(ruleset, "bridge")
    doc = as_nft_json(t, counters={("rcvc",): 3, ("rcvgone",): 9})
    doc["nftables"].append({"quota": {"family": "bridge", "table": t.name, "name": "q"}})
    lines = table_script(t, parse_live(doc, family="bridge", name=t.name), ruleset=ruleset)
    assert lines[:3] == [
        "add table bridge reconciler_demo",
        "delete table bridge reconciler_demo",
        "add table bridge reconciler_demo",
    ]
    assert (
        'add element bridge reconciler_demo spoofed { "rcvc" counter packets 3 bytes 180 }' in lines
    )


@settings(max_examples=50)
@given(
    seed=st.integers(min_value=0, max_value=2**32),
    count=st.integers(min_value=1, max_value=30),
    isolation=st.sampled_from(["strict", "open"]),
)
def test_any_member_order_renders_the_same(seed: int, count: int, isolation: str) -> None:
    members = [
        Member(f"e{i}", f"rcv{i:012x}", f"10.20.{i // 200}.{i % 200 + 2}") for i in range(count)
    ]
    allows = [
        Allow(dst_env=f"e{i}", src_env=f"e{(i * 7) % count}", ports=(80 + i,)) for i in range(count)
    ]
    shuffled_members, shuffled_allows = members[:], allows[:]
    random.Random(seed).shuffle(shuffled_members)
    random.Random(seed + 1).shuffle(shuffled_allows)

    def build(ms: list[Member], als: list[Allow]) -> str:
        net = NetworkRules(
            name="n",
            bridge="rcbr-n",
            subnet="10.20.0.0/16",
            gateway="10.20.0.1",
            isolation="open" if isolation == "open" else "strict",
            members=tuple(ms),
            ingress=tuple(als),
        )
        return script(render(IsolationSpec(instance="p", networks=(net,))), {})

    assert build(shuffled_members, shuffled_allows) == build(members, allows)
