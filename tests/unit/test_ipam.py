"""IPAM: every environment gets a stable, unique host address of its network's subnet."""

from __future__ import annotations

import ipaddress

from hypothesis import given
from hypothesis import strategies as st

from reconciler.engine.ipam import Claim, allocate

A = ipaddress.IPv4Address
SUBNET = ipaddress.IPv4Network("10.213.0.0/24")
GATEWAY = A("10.213.0.1")


def run(
    claims: dict[str, Claim], subnet: ipaddress.IPv4Network = SUBNET, gateway: A = GATEWAY
) -> tuple[dict[str, A], dict[str, str]]:
    return allocate(subnet=subnet, gateway=gateway, claims=claims)


def test_lowest_free_host_in_name_order() -> None:
    got, failed = run({"b": Claim(), "a": Claim(), "c": Claim()})
    assert got == {"a": A("10.213.0.2"), "b": A("10.213.0.3"), "c": A("10.213.0.4")}
    assert failed == {}


def test_precedence_static_then_recorded_then_live_then_free() -> None:
    got, _ = run(
        {
            "static": Claim(
                static=A("10.213.0.50"), recorded=A("10.213.0.60"), live=A("10.213.0.70")
            ),
            "recorded": Claim(recorded=A("10.213.0.61"), live=A("10.213.0.71")),
            "live": Claim(live=A("10.213.0.72")),
            "new": Claim(),
        }
    )
    assert got == {
        "static": A("10.213.0.50"),
        "recorded": A("10.213.0.61"),
        "live": A("10.213.0.72"),
        "new": A("10.213.0.2"),
    }


def test_gateway_network_and_broadcast_are_never_handed_out() -> None:
    subnet = ipaddress.IPv4Network("10.0.0.0/29")  # hosts .1-.6
    gateway = A("10.0.0.3")
    claims = {
        "net": Claim(static=A("10.0.0.0")),
        "bcast": Claim(recorded=A("10.0.0.7")),
        "gw": Claim(live=gateway),
        "outside": Claim(static=A("10.0.1.5")),
    }
    got, failed = run(claims, subnet, gateway)
    assert failed == {}
    assert set(got.values()) <= {
        A("10.0.0.1"),
        A("10.0.0.2"),
        A("10.0.0.4"),
        A("10.0.0.5"),
        A("10.0.0.6"),
    }
    assert len(set(got.values())) == 4


def test_recorded_address_taken_by_another_static_is_reallocated() -> None:
    got, _ = run({"old": Claim(recorded=A("10.213.0.9")), "new": Claim(static=A("10.213.0.9"))})
    assert got["new"] == A("10.213.0.9")
    assert got["old"] == A("10.213.0.2")


def test_live_address_taken_by_a_recorded_one_is_reallocated() -> None:
    got, _ = run({"a": Claim(live=A("10.213.0.9")), "b": Claim(recorded=A("10.213.0.9"))})
    assert got == {"b": A("10.213.0.9"), "a": A("10.213.0.2")}


def test_exhaustion_is_a_failure_for_the_env_not_an_exception() -> None:
    subnet = ipaddress.IPv4Network("10.0.0.0/30")  # hosts .1 (gateway) and .2
    got, failed = run({"a": Claim(), "b": Claim(), "c": Claim()}, subnet, A("10.0.0.1"))
    assert got == {"a": A("10.0.0.2")}
    assert set(failed) == {"b", "c"}
    assert "no free address left in 10.0.0.0/30" in failed["b"]


def test_allocation_is_stable_when_fed_back_as_recorded() -> None:
    claims = {"a": Claim(), "b": Claim(static=A("10.213.0.2")), "c": Claim(live=A("10.213.0.200"))}
    first, _ = run(claims)
    again, _ = run({name: Claim(recorded=address) for name, address in first.items()})
    assert again == first


def test_new_environment_does_not_move_existing_ones() -> None:
    first, _ = run({"m": Claim(), "z": Claim()})
    recorded = {name: Claim(recorded=address) for name, address in first.items()}
    second, _ = run({**recorded, "a": Claim()})
    assert {k: second[k] for k in first} == first
    assert second["a"] not in first.values()


# --------------------------------------------------------------------------- properties


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[ipaddress.IPv4Network, A, dict[str, Claim]]:
    prefix = draw(st.integers(min_value=24, max_value=30))
    base = draw(st.integers(min_value=0, max_value=2**32 - 1))
    subnet = ipaddress.IPv4Network((base, prefix), strict=False)
    first, last = int(subnet.network_address), int(subnet.broadcast_address)
    gateway = A(draw(st.integers(min_value=first + 1, max_value=last - 1)))
    # Mostly inside the subnet (including its reserved addresses), sometimes just outside.
    address = st.integers(min_value=max(0, first - 2), max_value=min(2**32 - 1, last + 2)).map(A)
    optional = st.none() | address
    claim = st.builds(Claim, static=optional, recorded=optional, live=optional)
    names = st.text(alphabet="abcdefgh", min_size=1, max_size=3)
    claims = draw(st.dictionaries(names, claim, max_size=min(12, subnet.num_addresses)))
    return subnet, gateway, claims


@given(scenarios())
def test_allocation_properties(scenario: tuple[ipaddress.IPv4Network, A, dict[str, Claim]]) -> None:
    subnet, gateway, claims = scenario
    got, failed = allocate(subnet=subnet, gateway=gateway, claims=claims)
    reserved = {subnet.network_address, subnet.broadcast_address, gateway}

    assert set(got) | set(failed) == set(claims)
    assert not set(got) & set(failed)
    assert len(set(got.values())) == len(got), "addresses are distinct"
    for address in got.values():
        assert address in subnet and address not in reserved
    # Every usable host is handed out before anyone fails.
    if failed:
        assert len(got) == subnet.num_addresses - len(reserved)

    # A valid static address is always honoured (the first by name, if two claim one).
    statics: dict[A, str] = {}
    for name in sorted(claims):
        static = claims[name].static
        if static is not None and static in subnet and static not in reserved:
            statics.setdefault(static, name)
    for static, name in statics.items():
        assert got[name] == static

    # Idempotent: the result, recorded, gives the same result back.
    again, again_failed = allocate(
        subnet=subnet,
        gateway=gateway,
        claims={name: Claim(static=claims[name].static, recorded=got.get(name)) for name in claims},
    )
    assert again == got
    assert set(again_failed) == set(failed)
