"""Kernel names are pure functions of (instance, env, network): deterministic, short, distinct."""

from __future__ import annotations

import hashlib
import re

from hypothesis import given
from hypothesis import strategies as st

from reconciler.kernel.naming import default_bridge_name, host_veth_name, link_mac, netns_name

labels = st.from_regex(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", fullmatch=True)


def test_host_veth_name_is_rcv_plus_12_hex_of_sha256() -> None:
    expected = "rcv" + hashlib.sha256(b"reconciler/payments").hexdigest()[:12]
    assert host_veth_name("reconciler", "payments") == expected
    assert len(expected) == 15


@given(instance=labels, env=labels)
def test_host_veth_name_fits_ifnamsiz_and_is_deterministic(instance: str, env: str) -> None:
    name = host_veth_name(instance, env)
    assert re.fullmatch(r"rcv[0-9a-f]{12}", name)
    assert name == host_veth_name(instance, env)


def test_host_veth_name_differs_per_instance_and_env() -> None:
    names = {host_veth_name(i, e) for i in ("a", "b", "a-b") for e in ("x", "y", "b-x")}
    assert len(names) == 9


def test_netns_name_joins_instance_and_env() -> None:
    assert netns_name("reconciler", "payments") == "reconciler-payments"


def test_default_bridge_name_short_network_is_readable() -> None:
    assert default_bridge_name("devnet") == "rcbr-devnet"
    assert default_bridge_name("abcdefghij") == "rcbr-abcdefghij"  # exactly 15


def test_default_bridge_name_long_network_is_hashed() -> None:
    expected = "rcbr-" + hashlib.sha256(b"abcdefghijk").hexdigest()[:10]
    assert default_bridge_name("abcdefghijk") == expected  # 16 chars unhashed


@given(network=labels)
def test_default_bridge_name_always_fits(network: str) -> None:
    name = default_bridge_name(network)
    assert name.startswith("rcbr-")
    assert len(name) <= 15
    assert name == default_bridge_name(network)


@given(alias=st.text(min_size=1))
def test_link_mac_is_unicast_locally_administered(alias: str) -> None:
    mac = link_mac(alias)
    assert re.fullmatch(r"02(:[0-9a-f]{2}){5}", mac)
    assert mac == link_mac(alias)


def test_link_mac_differs_per_tag() -> None:
    assert link_mac("reconciler:a:env:x") != link_mac("reconciler:b:env:x")
