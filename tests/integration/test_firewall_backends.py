"""The firewall driver run by libnftables (in-process) and by the `nft` binary: one behaviour.

`FirewallDriver` talks to nftables through libnftables via ctypes, and falls back to the
`nft` command where the library cannot be loaded (`reconciler.kernel.libnft`). Both
backends act on the same tables here, and every check reads the kernel's own view with
`nft` run as a subprocess by the test:

- both see exactly what the kernel lists (same JSON, same live view, same counters, same
  differences after tampering);
- an apply that nft refuses (a syntax error, or a batch the kernel rejects half-way)
  changes nothing and is reported in one line that names the failing script line;
- the driver acts in the network namespace of the calling thread, as a forked `nft`
  does: the sandbox's, or another one a thread entered;
- the ruleset generation, which lets a no-op check skip the listing, moves with every
  change and names the namespace it was read in.

No traffic and no interfaces: the tables name bridge ports as strings, so nothing else
needs to exist (traffic is proven in test_isolation.py).
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any, TypeVar

import pytest

from reconciler.errors import KernelError
from reconciler.kernel import nftrules, nsutil
from reconciler.kernel.firewall import FirewallDriver
from reconciler.kernel.libnft import Backend, LibNftables, NftBinary, NftRunner, generation
from reconciler.kernel.naming import host_veth_name
from reconciler.kernel.nftrules import (
    FAMILIES,
    Allow,
    IsolationSpec,
    Member,
    NetworkRules,
    parse_live,
    table_name,
)
from tests import kernel_view as kv

T = TypeVar("T")
BACKENDS: tuple[Backend, ...] = ("library", "binary")


def make_spec(instance: str, *, extra_allow: bool = False) -> IsolationSpec:
    members = tuple(
        Member(env, host_veth_name(instance, env), f"10.232.1.{10 + i}")
        for i, env in enumerate(("a", "b", "c"))
    )
    ingress = [Allow(dst_env="b", src_env="a", ports=(8080,))]
    if extra_allow:
        ingress.append(Allow(dst_env="c", src_env="a", ports=(22,)))
    network = NetworkRules(
        name="fw",
        bridge=f"rb{instance[2:]}",
        subnet="10.232.1.0/24",
        gateway="10.232.1.1",
        members=members,
        ingress=tuple(ingress),
    )
    return IsolationSpec(instance=instance, networks=(network,), quarantined=frozenset({"c"}))


@pytest.fixture
def drivers(instance: str) -> Iterator[dict[Backend, FirewallDriver]]:
    """One driver per backend for the same instance; its tables removed afterwards."""
    made = {backend: FirewallDriver(instance=instance, backend=backend) for backend in BACKENDS}
    try:
        yield made
    finally:
        made["binary"].remove()
        for driver in made.values():
            driver.close()


# --------------------------------------------------------------------------- kernel views


def nft(*args: str, netns: str | None = None) -> str:
    prefix = ["ip", "netns", "exec", netns] if netns else []
    result = kv.run([*prefix, "nft", *args])
    assert result.returncode == 0, f"nft {' '.join(args)}: {result.stderr.strip()}"
    return result.stdout


def nft_json(*args: str, netns: str | None = None) -> Any:
    return json.loads(nft("-j", *args, netns=netns))


def our_tables(instance: str, *, netns: str | None = None) -> dict[tuple[str, str], int]:
    """(family, name) -> handle of the tables named after `instance`."""
    entries = nft_json("list", "tables", netns=netns)["nftables"]
    return {
        (e["table"]["family"], e["table"]["name"]): e["table"]["handle"]
        for e in entries
        if "table" in e and instance in e["table"]["name"]
    }


def listings(table: str) -> dict[str, str]:
    """Both tables as nft prints them, with handles: any change at all shows."""
    return {family: nft("-a", "list", "table", family, table) for family in FAMILIES}


def set_counters(family: str, table: str, name: str) -> dict[tuple[str, ...], int]:
    """Packets per element of a dynamic set, read straight from `nft -j list set`."""
    found: dict[tuple[str, ...], int] = {}
    for entry in nft_json("list", "set", family, table, name)["nftables"]:
        for item in entry.get("set", {}).get("elem", []):
            elem = item["elem"]
            val = elem["val"]
            key = tuple(val["concat"]) if isinstance(val, dict) else (val,)
            found[key] = elem["counter"]["packets"]
    return found


def in_netns(name: str, fn: Callable[[], T]) -> T:
    """Run `fn` on a fresh thread that entered the network namespace pinned as `name`."""

    def enter_and_run() -> T:
        fd = os.open(f"/run/netns/{name}", os.O_RDONLY | os.O_CLOEXEC)
        try:
            nsutil.setns(fd, nsutil.CLONE_NEWNET)
        finally:
            os.close(fd)
        return fn()

    return nsutil.run_in_thread(enter_and_run, name="test-fw-netns")


# --------------------------------------------------------------------------- tests


def test_both_backends_see_exactly_what_the_kernel_lists(
    drivers: dict[Backend, FirewallDriver], instance: str
) -> None:
    lib, binary = drivers["library"], drivers["binary"]
    assert (lib.backend, binary.backend) == ("libnftables", "nft binary")
    table = table_name(instance)
    spec = make_spec(instance)
    absent: dict[str, Any] = {"inet": None, "bridge": None}
    assert lib.observe() == absent == binary.observe()
    assert lib.denied_counts() == {} == binary.denied_counts()

    assert lib.ensure(spec)
    a, b, c = (m for m in spec.networks[0].members)
    # Counted "drops", written by hand: the kernel keeps what we give it.
    denied_elements = (
        f"{{ {a.address} . {b.address} counter packets 5 bytes 300, "
        f"{c.address} . {a.address} counter packets 2 bytes 120 }}"
    )
    nft("add", "element", "inet", table, nftrules.DENIED_SET, denied_elements)
    spoofed_elements = f'{{ "{c.host_port}" counter packets 3 bytes 126 }}'
    nft("add", "element", "bridge", table, nftrules.SPOOFED_SET, spoofed_elements)

    # The raw JSON: the library prints what the nft command prints.
    runners: dict[str, NftRunner] = {"library": LibNftables(), "binary": NftBinary()}
    try:
        for command in [f"list table {f} {table}" for f in FAMILIES] + [
            f"list set inet {table} {nftrules.DENIED_SET}"
        ]:
            kernel = nft_json(*command.split())
            for backend, runner in runners.items():
                result = runner.list_json(command)
                assert result.ok, (backend, result.error)
                assert json.loads(result.output) == kernel, backend
    finally:
        for runner in runners.values():
            runner.close()

    # The driver's view, through each backend, equals the kernel's listing.
    kernel_view = {
        f: parse_live(nft_json("list", "table", f, table), family=f, name=table) for f in FAMILIES
    }
    assert lib.observe() == kernel_view == binary.observe()
    denied = {(k[0], k[1]): v for k, v in set_counters("inet", table, "denied").items()}
    assert denied == {(a.address, b.address): 5, (c.address, a.address): 2}
    assert lib.denied_counts() == denied == binary.denied_counts()
    assert lib.spoofed_counts() == {c.host_port: 3} == binary.spoofed_counts()
    assert lib.differences(spec) == [] == binary.differences(spec)

    # Tampering: both tell the same story, and either repairs it.
    nft("flush", "chain", "inet", table, "fwd_fw")
    nft("add", "rule", "bridge", table, "antispoof", "accept")
    drift = lib.differences(spec)
    assert len(drift) == 2 and drift == binary.differences(spec)
    assert binary.ensure(spec) == drift
    assert lib.differences(spec) == [] == binary.differences(spec)
    assert lib.denied_counts() == denied, "the repair lost counters"


@pytest.mark.parametrize(
    "bad_line",
    [
        "add rule inet {table} forward bogus syntax",  # refused by the parser: nothing sent
        "add rule inet {table} forward jump nowhere",  # refused by the kernel, mid-batch
    ],
    ids=["syntax-error", "kernel-refusal"],
)
def test_a_refused_apply_changes_nothing_and_says_where_in_one_line(
    drivers: dict[Backend, FirewallDriver],
    instance: str,
    bad_line: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    table = table_name(instance)
    spec = make_spec(instance)
    assert drivers["library"].ensure(spec)
    before = listings(table)

    # The changed spec's real transaction (flushes, refills, prunes) with one bad line at
    # the end: the kernel must drop all of it.
    real_script = nftrules.script
    bad = bad_line.format(table=table)

    def broken_script(*args: Any, **kwargs: Any) -> str:
        return real_script(*args, **kwargs) + bad + "\n"

    monkeypatch.setattr(nftrules, "script", broken_script)
    changed = make_spec(instance, extra_allow=True)
    messages: dict[Backend, str] = {}
    for backend, driver in drivers.items():
        with pytest.raises(KernelError) as caught:
            driver.ensure(changed)
        messages[backend] = str(caught.value)
        assert listings(table) == before, f"{backend}: a refused apply changed the tables"

    message = messages["library"]
    assert messages["binary"] == message, messages
    assert "\n" not in message
    assert message.startswith(f"applying nftables tables {table} failed (nothing was changed")
    assert "Error:" in message and f": {bad})" in message, message
    assert "/proc/self/fd" not in message and "/dev/stdin" not in message
    monkeypatch.undo()
    assert drivers["library"].ensure(changed)


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_driver_acts_in_the_network_namespace_of_the_calling_thread(
    drivers: dict[Backend, FirewallDriver], instance: str, backend: Backend
) -> None:
    fw = drivers[backend]
    spec = make_spec(instance)
    other = f"{instance}-fw"
    assert kv.run(["ip", "netns", "add", other]).returncode == 0
    try:
        # The sandbox's namespace: where this test (the caller) runs.
        assert fw.ensure(spec)
        here = our_tables(instance)
        assert set(here) == {(f, table_name(instance)) for f in FAMILIES}
        assert our_tables(instance, netns=other) == {}

        # A thread in another namespace: the same driver acts there, and only there.
        made = in_netns(other, lambda: fw.ensure(spec))
        assert any("created" in change for change in made), made
        there = our_tables(instance, netns=other)
        assert set(there) == set(here)
        assert our_tables(instance) == here, "the other namespace's apply touched ours"
        assert in_netns(other, lambda: fw.differences(spec)) == []

        # Back on this thread: this namespace again.
        assert fw.differences(spec) == []
        changed = replace(spec, quarantined=frozenset())
        assert fw.ensure(changed)
        assert in_netns(other, lambda: fw.differences(changed)), "the edit leaked over"
        assert fw.remove() is True
        assert our_tables(instance) == {}
        assert our_tables(instance, netns=other) == there
        assert in_netns(other, fw.remove) is True
        assert our_tables(instance, netns=other) == {}
    finally:
        fw.close()  # the context made over there pins that namespace until freed
        kv.run(["ip", "netns", "del", other])


def netfilter_sockets() -> set[str]:
    """`socket:[inode]` of this process's NETLINK_NETFILTER sockets, from the kernel.

    /proc/net/netlink lists the namespace's netlink sockets (protocol 12: netfilter) by
    inode; /proc/self/fd says which of them are ours.
    """
    ours = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            ours.add(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:
            continue
    with open("/proc/net/netlink") as table:
        rows = [line.split() for line in list(table)[1:]]
    return {f"socket:[{row[-1]}]" for row in rows if row[1] == "12"} & ours


def test_one_context_not_inherited_and_freed_by_close(
    drivers: dict[Backend, FirewallDriver], instance: str
) -> None:
    fw = drivers["library"]
    spec = make_spec(instance)
    baseline = netfilter_sockets()
    assert fw.ensure(spec)
    opened = netfilter_sockets() - baseline
    assert len(opened) == 1, opened
    assert fw.differences(spec) == [] and fw.denied_counts() == {}
    assert netfilter_sockets() - baseline == opened, "a second context was opened"

    # A process we start (close_fds=False: inheritable fds would pass) gets none of it.
    child_fds = subprocess.run(
        ["find", "/proc/self/fd/", "-type", "l", "-printf", "%l\n"],
        capture_output=True,
        text=True,
        check=True,
        close_fds=False,
    ).stdout.split()
    assert not opened & set(child_fds), "the context's socket is inherited by children"

    fw.close()
    assert netfilter_sockets() == baseline
    assert fw.denied_counts() == {}  # always a listing: a new context
    assert len(netfilter_sockets() - baseline) == 1
    fw.close()
    assert netfilter_sockets() == baseline


def test_the_generation_moves_with_every_change_and_names_the_namespace(instance: str) -> None:
    table = table_name(instance)
    first = generation()
    assert first is not None, "the kernel does not report its nftables generation"
    assert generation() == first, "nothing changed, yet the generation moved"
    try:
        nft("add", "table", "inet", table)
        made = generation()
        assert made is not None and made[0] == first[0] and made[1] != first[1]
        nft("add", "table", "inet", table)  # already there: an empty transaction
        assert kv.run(["nft", "add", "rule", "inet", table, "nochain", "accept"]).returncode
        assert generation() == made, "an empty or refused transaction moved the generation"
        nft("add", "chain", "inet", table, "c")
        assert generation() not in (None, made)

        other = f"{instance}-gen"
        assert kv.run(["ip", "netns", "add", other]).returncode == 0
        try:
            there = in_netns(other, generation)
            assert there is not None and there[0] != first[0], "same namespace cookie"
        finally:
            kv.run(["ip", "netns", "del", other])
    finally:
        kv.run(["nft", "delete", "table", "inet", table])
