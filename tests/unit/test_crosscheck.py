"""Rules that span documents. Each blames one manifest at the line of the field that breaks
the rule; a blamed manifest leaves the valid set and its key is protected from pruning,
while everything it does not concern stays valid."""

from __future__ import annotations

import pytest

from reconciler.manifests.crosscheck import crosscheck
from reconciler.manifests.loader import LoadResult, load_text
from tests.unit.factories import dump, env_doc, line_of, load, network_doc

NET = dump(network_doc("devnet", "10.213.0.0/24"))


def keys(result: LoadResult) -> set[tuple[str, str]]:
    return {m.key for m in result.manifests}


def only_error(result: LoadResult) -> str:
    assert len(result.errors) == 1, result.errors
    return result.errors[0]


def test_valid_set_passes_untouched() -> None:
    result = load(
        {
            "net.yaml": NET,
            "envs.yaml": [
                env_doc("web", network="devnet", address="10.213.0.10"),
                env_doc(
                    "db", network="devnet", policy={"ingress": [{"from": {"environment": "web"}}]}
                ),
                env_doc("solo"),
            ],
        }
    )
    assert result.errors == []
    assert len(result.manifests) == 4
    assert result.failed_keys == set()


def test_environment_on_an_undeclared_network() -> None:
    text = dump(env_doc("web", network="nope"), env_doc("other"))
    result = load({"net.yaml": NET, "web.yaml": text})
    error = only_error(result)
    assert error.startswith(f"web.yaml:{line_of(text, 'name: nope')}: Environment/web: ")
    assert "network 'nope' is not declared" in error
    assert keys(result) == {("Network", "devnet"), ("Environment", "other")}
    assert result.failed_keys == {("Environment", "web")}


@pytest.mark.parametrize(
    ("address", "problem"),
    [
        ("10.213.1.5", "address 10.213.1.5 is outside the subnet 10.213.0.0/24"),
        ("10.213.0.1", "address 10.213.0.1 is the gateway of the network"),
        ("10.213.0.0", "address 10.213.0.0 is the network address of 10.213.0.0/24"),
        ("10.213.0.255", "address 10.213.0.255 is the broadcast address of 10.213.0.0/24"),
    ],
)
def test_static_address_must_be_a_free_host_of_the_subnet(address: str, problem: str) -> None:
    text = dump(env_doc("web", network="devnet", address=address))
    result = load({"net.yaml": NET, "web.yaml": text})
    error = only_error(result)
    assert error.startswith(f"web.yaml:{line_of(text, 'address:')}: Environment/web: ")
    assert problem in error
    assert keys(result) == {("Network", "devnet")}


def test_static_address_must_not_be_a_declared_gateway() -> None:
    net = dump(network_doc("devnet", "10.213.0.0/24", gateway="10.213.0.254"))
    text = dump(env_doc("web", network="devnet", address="10.213.0.254"))
    error = only_error(load({"net.yaml": net, "web.yaml": text}))
    assert "is the gateway of the network" in error


def test_duplicate_static_addresses_in_one_network_blame_the_second() -> None:
    first = dump(env_doc("a", network="devnet", address="10.213.0.9"))
    second = dump(env_doc("b", network="devnet", address="10.213.0.9"))
    result = load({"net.yaml": NET, "a.yaml": first, "b.yaml": second})
    error = only_error(result)
    assert error.startswith(f"b.yaml:{line_of(second, 'address:')}: Environment/b: ")
    assert "address 10.213.0.9 is already taken by Environment/a" in error
    assert f"a.yaml:{line_of(first, 'address:')}" in error
    assert keys(result) == {("Network", "devnet"), ("Environment", "a")}


def test_same_address_on_different_networks_is_fine() -> None:
    nets = dump(network_doc("one", "10.1.0.0/24"), network_doc("two", "10.2.0.0/24"))
    envs = [
        env_doc("a", network="one", address="10.1.0.9"),
        env_doc("b", network="two", address="10.2.0.9"),
    ]
    assert load({"nets.yaml": nets, "envs.yaml": envs}).errors == []


def test_overlapping_subnets_blame_the_second_and_name_the_first() -> None:
    first = dump(network_doc("one", "10.213.0.0/16"))
    second = dump(network_doc("two", "10.213.4.0/24"))
    result = load({"a.yaml": first, "b.yaml": second})
    error = only_error(result)
    assert error.startswith(f"b.yaml:{line_of(second, 'subnet:')}: Network/two: ")
    assert "subnet 10.213.4.0/24 overlaps Network/one (10.213.0.0/16" in error
    assert f"a.yaml:{line_of(first, 'subnet:')}" in error
    assert keys(result) == {("Network", "one")}
    assert result.failed_keys == {("Network", "two")}


def test_environments_of_a_blamed_network_are_blamed_too() -> None:
    nets = dump(network_doc("one", "10.213.0.0/16"), network_doc("two", "10.213.4.0/24"))
    result = load({"nets.yaml": nets, "web.yaml": [env_doc("web", network="two")]})
    assert len(result.errors) == 2
    assert "network 'two' is not declared (or is invalid)" in result.errors[1]
    assert keys(result) == {("Network", "one")}


@pytest.mark.parametrize(
    ("first", "second"),
    [
        (
            network_doc("one", "10.1.0.0/24", bridge="br-shared"),
            network_doc("two", "10.2.0.0/24", bridge="br-shared"),
        ),
        # Derived: Network "two" defaults to rcbr-two, which "one" declares explicitly.
        (network_doc("one", "10.1.0.0/24", bridge="rcbr-two"), network_doc("two", "10.2.0.0/24")),
    ],
    ids=["explicit", "derived"],
)
def test_duplicate_bridge_names(first: dict[str, object], second: dict[str, object]) -> None:
    a, b = dump(first), dump(second)
    result = load({"a.yaml": a, "b.yaml": b})
    error = only_error(result)
    bridge = "br-shared" if "br-shared" in a else "rcbr-two"
    # The derived name has no line of its own: blame the spec.
    needle = "bridge:" if "bridge:" in b else "spec:"
    assert error.startswith(f"b.yaml:{line_of(b, needle)}: Network/two: ")
    assert f"bridge {bridge} is also used by Network/one (a.yaml:1)" in error
    assert keys(result) == {("Network", "one")}


def test_duplicate_names_across_files_blame_the_second() -> None:
    first = dump(env_doc("web", resources={"memory": "64Mi"}))
    second = dump(env_doc("web", resources={"memory": "128Mi"}))
    result = load({"a.yaml": first, "b.yaml": second})
    error = only_error(result)
    assert error.startswith(f"b.yaml:{line_of(second, 'name: web')}: Environment/web: ")
    assert f"already declared at a.yaml:{line_of(first, 'name: web')}" in error
    assert [(m.file, m.key) for m in result.manifests] == [("a.yaml", ("Environment", "web"))]
    assert result.failed_keys == {("Environment", "web")}


def test_same_name_in_two_kinds_is_fine() -> None:
    assert load({"a.yaml": NET, "b.yaml": [env_doc("devnet", network="devnet")]}).errors == []


def test_first_of_duplicate_names_is_still_checked() -> None:
    """The first declaration stays valid, so it must pass the other rules like any other."""
    first = dump(env_doc("web", network="nope"))
    second = dump(env_doc("web"))
    result = load({"a.yaml": first, "b.yaml": second})
    assert len(result.errors) == 2
    assert any(
        e.startswith("a.yaml:") and "network 'nope' is not declared" in e for e in result.errors
    )
    assert result.manifests == []


def test_first_of_duplicate_networks_still_serves_its_environments() -> None:
    result = load(
        {
            "a.yaml": NET,
            "b.yaml": dump(network_doc("devnet", "10.9.0.0/24")),
            "web.yaml": [env_doc("web", network="devnet")],
        }
    )
    error = only_error(result)
    assert error.startswith("b.yaml:") and "already declared at a.yaml" in error
    assert keys(result) == {("Network", "devnet"), ("Environment", "web")}


def test_ingress_from_an_unknown_environment() -> None:
    text = dump(
        env_doc("web", policy={"ingress": [{"from": {"environment": "ghost"}, "ports": [80]}]})
    )
    result = load({"web.yaml": text})
    error = only_error(result)
    assert error.startswith(f"web.yaml:{line_of(text, 'from:')}: Environment/web: ")
    assert "ingress from unknown environment 'ghost'" in error
    assert result.manifests == []


def test_ingress_from_an_environment_whose_file_is_broken_is_not_blamed() -> None:
    """A typo elsewhere must not cascade: the source environment still exists (protected)."""
    result = load(
        {
            "api.yaml": [env_doc("api", resources={"memory": "lots"})],
            "web.yaml": [env_doc("web", policy={"ingress": [{"from": {"environment": "api"}}]})],
        }
    )
    assert len(result.errors) == 1 and result.errors[0].startswith("api.yaml:")
    assert keys(result) == {("Environment", "web")}


def test_device_resolver_errors_land_on_the_device_line() -> None:
    text = dump(
        env_doc(
            "web",
            resources={
                "io": [
                    {"device": "/dev/vda", "readBps": "1Mi"},
                    {"device": "/dev/nope", "readIops": 5},
                ]
            },
        )
    )
    result = LoadResult()
    load_text(text, display="web.yaml", into=result)

    def resolve(path: str) -> str:
        if path == "/dev/nope":
            raise ValueError(f"{path} is not a block device")
        return "254:0"

    crosscheck(result, resolve_device=resolve)
    error = only_error(result)
    assert error.startswith(f"web.yaml:{line_of(text, '/dev/nope')}: Environment/web: ")
    assert "/dev/nope is not a block device (fix spec.resources.io)" in error
    assert result.manifests == []
    assert result.failed_keys == {("Environment", "web")}


def test_crosscheck_keeps_earlier_load_errors() -> None:
    result = load({"bad.yaml": "kind: [\n", "net.yaml": NET})
    assert len(result.errors) == 1 and result.errors[0].startswith("bad.yaml:2: invalid YAML")
    assert result.failed_files == {"bad.yaml"}
    assert keys(result) == {("Network", "devnet")}
