"""End to end: the `reconciler` command against the real kernel (the "Foundation" acceptance).

Each test writes its own manifests (a network on a subnet of its own, 10.213.<n>.0/24,
and a few environments), runs the command as a user would (tests/integration/helpers.py)
and checks the result through the kernel's own view: `ip -j`, /proc, cgroup files read
with open(). `status` is only believed in the tests of `status` itself.

What an environment is, seen from the kernel (contract sections 2-4):

- a netns pinned at /run/netns/<instance>-<env>, holding `eth0` with the env's address and
  a default route via the network's gateway;
- a host veth `rcv...` enslaved to the network's bridge, tagged with the ifalias
  `reconciler:<instance>:env:<env>`;
- v1 cgroups /sys/fs/cgroup/{memory,cpu,pids}/<instance>/<env> holding the limits;
- one holder process in that cgroup: it lives in the pinned netns and owns the env's uts
  namespace (so the env's hostname).

Every test ends with `destroy` and a leak check (`managed_reconciler`).
"""

from __future__ import annotations

import ipaddress
import itertools
import json
import os
import select
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests import kernel_view
from tests.integration.helpers import (
    Reconciler,
    describe,
    managed_reconciler,
    write_manifest,
)
from tests.kernel_view import ip_link, ip_links, ipv4_addresses, is_up, read_cgroup_file
from tests.leaks import leaked_objects

CGROUP_ROOT = Path("/sys/fs/cgroup")
MiB = 1024 * 1024

# One /24 per network a test declares, so no two tests (or instances) share a subnet.
_SUBNET_INDEX = itertools.count(100)


# --------------------------------------------------------------------------- manifests


@dataclass(frozen=True)
class Net:
    """A network a test declares: its name, subnet and (explicit) bridge."""

    name: str
    subnet: ipaddress.IPv4Network

    @property
    def bridge(self) -> str:
        return f"rcbr-{self.name}"

    @property
    def gateway(self) -> str:
        return str(self.subnet[1])

    def host(self, index: int) -> str:
        """The `index`-th address of the subnet, e.g. host(10) -> 10.213.n.10."""
        return str(self.subnet[index])


def new_net() -> Net:
    """A network with a name and subnet no other test uses."""
    index = next(_SUBNET_INDEX)
    return Net(name=f"tn{index}", subnet=ipaddress.IPv4Network(f"10.213.{index}.0/24"))


def write_network(directory: Path, net: Net, *, isolation: str = "strict") -> Path:
    """Write `<net>.yaml` declaring the network."""
    return write_manifest(
        directory,
        f"{net.name}.yaml",
        f"""
        apiVersion: reconciler/v1
        kind: Network
        metadata: {{name: {net.name}}}
        spec:
          subnet: {net.subnet}
          bridge: {net.bridge}
          isolation: {isolation}
        """,
    )


def env_text(
    name: str,
    net: Net,
    *,
    memory: str = "256Mi",
    cpu: str = "500m",
    pids: int = 64,
    address: str | None = None,
    hostname: str | None = None,
) -> str:
    """An Environment manifest on `net`, one field per line (so errors have distinct lines)."""
    lines = [
        "apiVersion: reconciler/v1",
        "kind: Environment",
        "metadata:",
        f"  name: {name}",
        "spec:",
    ]
    if hostname is not None:
        lines.append(f"  hostname: {hostname}")
    lines += ["  network:", f"    name: {net.name}"]
    if address is not None:
        lines.append(f"    address: {address}")
    lines += ["  resources:", f"    memory: {memory}", f"    cpu: {cpu}", f"    pids: {pids}"]
    return "\n".join(lines) + "\n"


def write_env(directory: Path, name: str, net: Net, **fields: Any) -> Path:
    """Write `<name>.yaml` declaring the environment."""
    return write_manifest(directory, f"{name}.yaml", env_text(name, net, **fields))


def line_of(path: Path, needle: str) -> int:
    """The 1-based number of the first line of `path` containing `needle`."""
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if needle in line:
            return number
    raise AssertionError(f"{needle!r} not in {path}")


# --------------------------------------------------------------------------- kernel view


def owner_tag(instance: str, env: str) -> str:
    return f"reconciler:{instance}:env:{env}"


def netns_of(instance: str, env: str) -> str:
    return f"{instance}-{env}"


def cgroup_dir(controller: str, instance: str, env: str) -> Path:
    return CGROUP_ROOT / controller / instance / env


def tagged_link(instance: str, env: str) -> dict[str, Any] | None:
    """The host link carrying the env's ownership tag, or None."""
    tagged = [link for link in ip_links() if link.get("ifalias") == owner_tag(instance, env)]
    assert len(tagged) <= 1, f"several links tagged {owner_tag(instance, env)}: {tagged}"
    return tagged[0] if tagged else None


def holder_pid(instance: str, env: str) -> int:
    """The env's one process: the only pid in its memory cgroup (raises unless exactly one)."""
    pids = kernel_view.pids_in_cgroup_dirs([cgroup_dir("memory", instance, env)])
    assert len(pids) == 1, f"env {env}: expected exactly one process (the holder), got {pids}"
    return pids.pop()


def uts_hostname(pid: int) -> str:
    """The hostname of `pid`'s uts namespace, read from inside it."""
    result = kernel_view.run(["nsenter", "-t", str(pid), "-u", "uname", "-n"])
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


@dataclass(frozen=True)
class Limits:
    """An env's v1 limits as the cgroup files hold them."""

    memory: int  # memory.limit_in_bytes
    cpu_quota: int  # cpu.cfs_quota_us
    cpu_period: int  # cpu.cfs_period_us
    pids: str  # pids.max ("max" when unlimited)

    @property
    def cpu_millis(self) -> int:
        return self.cpu_quota * 1000 // self.cpu_period


def limits(instance: str, env: str) -> Limits:
    """Read the env's v1 limits from the cgroup files."""
    cpu = cgroup_dir("cpu", instance, env)
    memory = cgroup_dir("memory", instance, env) / "memory.limit_in_bytes"
    return Limits(
        memory=int(read_cgroup_file(memory)),
        cpu_quota=int(read_cgroup_file(cpu / "cpu.cfs_quota_us")),
        cpu_period=int(read_cgroup_file(cpu / "cpu.cfs_period_us")),
        pids=read_cgroup_file(cgroup_dir("pids", instance, env) / "pids.max"),
    )


@dataclass(frozen=True)
class EnvView:
    """An environment's identity as the kernel shows it: what must survive an in-place edit."""

    netns_inode: int
    holder: int
    address: str  # eth0's "a.b.c.d/len"
    host_veth: str


def env_view(instance: str, env: str) -> EnvView:
    """Read the env from the kernel; fails with a message if a piece is missing."""
    netns = netns_of(instance, env)
    assert netns in kernel_view.netns_names(), f"netns {netns} is not pinned"
    eth0 = ip_link("eth0", netns=netns)
    assert eth0 is not None, f"no eth0 in netns {netns}"
    addresses = ipv4_addresses(eth0)
    assert len(addresses) == 1, f"eth0 in {netns} has addresses {addresses}"
    host = tagged_link(instance, env)
    assert host is not None, f"no host link tagged {owner_tag(instance, env)}"
    return EnvView(
        netns_inode=kernel_view.netns_inode(netns),
        holder=holder_pid(instance, env),
        address=addresses[0],
        host_veth=host["ifname"],
    )


def assert_env_gone(instance: str, env: str) -> None:
    """No netns pin, host link, cgroup dir or process of the env is left."""
    assert netns_of(instance, env) not in kernel_view.netns_names()
    assert tagged_link(instance, env) is None
    for mount in kernel_view.cgroup_mounts():
        assert not (mount.path / instance / env).exists(), f"{mount.path / instance / env} left"


def default_route(netns: str) -> dict[str, Any]:
    routes = json.loads(
        kernel_view.run(["ip", "-j", "-n", netns, "route", "show", "default"]).stdout or "[]"
    )
    assert len(routes) == 1, f"default routes in {netns}: {routes}"
    route: dict[str, Any] = routes[0]
    return route


# --------------------------------------------------------------------------- traffic

_SERVER = """
import socket, sys
srv = socket.socket()
srv.bind((sys.argv[1], int(sys.argv[2])))
srv.listen(1)
srv.settimeout(10)
print("ready", flush=True)
conn, peer = srv.accept()
data = conn.recv(64)
conn.sendall(b"pong:" + data)
conn.close()
print(peer[0], flush=True)
"""

_CLIENT = """
import socket, sys
conn = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=5)
conn.sendall(b"ping")
print(conn.recv(64).decode())
"""


def tcp_exchange(*, server_ns: str, server_addr: str, client_ns: str, port: int) -> tuple[str, str]:
    """Connect from `client_ns` to a listener in `server_ns`: (client's reply, server's peer)."""
    server = subprocess.Popen(
        ["ip", "netns", "exec", server_ns, sys.executable, "-c", _SERVER, server_addr, str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        readable, _, _ = select.select([server.stdout], [], [], 10)
        assert readable and server.stdout.readline().strip() == "ready", server.stderr
        client = kernel_view.run(
            [
                "ip",
                "netns",
                "exec",
                client_ns,
                sys.executable,
                "-c",
                _CLIENT,
                server_addr,
                str(port),
            ],
            timeout=15,
        )
        assert client.returncode == 0, client.stderr
        peer, _ = server.communicate(timeout=10)
        return client.stdout.strip(), peer.strip()
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def manifests(tmp_path: Path) -> Path:
    path = tmp_path / "manifests"
    path.mkdir()
    return path


@pytest.fixture
def rc(instance: str, manifests: Path, state_dir: Path) -> Iterator[Reconciler]:
    """The instance's `reconciler` command; destroyed and leak-checked after the test."""
    with managed_reconciler(
        Reconciler(manifests=manifests, state_dir=state_dir, instance=instance)
    ) as reconciler:
        yield reconciler


@pytest.fixture
def net() -> Net:
    return new_net()


@pytest.fixture
def three_envs(rc: Reconciler, manifests: Path, net: Net) -> dict[str, EnvView]:
    """net + web (static .10) + api + db (allocated), applied; their kernel views."""
    write_network(manifests, net)
    write_env(manifests, "web", net, address=net.host(10))
    write_env(manifests, "api", net, memory="256Mi", cpu="250m", pids=32)
    write_env(manifests, "db", net, memory="64Mi", cpu="1", pids=16)
    rc.ok("apply")
    return {env: env_view(rc.instance, env) for env in ("web", "api", "db")}


def subset(mapping: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    """`mapping` restricted to `keys` (a missing key shows up as <missing>)."""
    return {key: mapping.get(key, "<missing>") for key in keys}


def _register(leak_guard: dict[str, str], name: str, nodeid: str) -> str:
    leak_guard[name] = nodeid
    return name


# --------------------------------------------------------------------------- 1. apply


def test_apply_creates_network_and_environments(rc: Reconciler, manifests: Path, net: Net) -> None:
    write_network(manifests, net, isolation="open")  # open: the envs may talk (checked below)
    write_env(manifests, "web", net, address=net.host(10), memory="256Mi", cpu="500m", pids=64)
    write_env(manifests, "api", net, memory="128Mi", cpu="250m", pids=32, hostname="api-host")
    write_env(manifests, "db", net, memory="64Mi", cpu="1", pids=16)
    result = rc("apply")
    assert result.returncode == 0, describe(result)

    bridge = ip_link(net.bridge)
    assert bridge is not None and kernel_view.link_kind(bridge) == "bridge"
    assert is_up(bridge)
    assert ipv4_addresses(bridge) == [f"{net.gateway}/24"]

    expected = {
        "web": (256 * MiB, 500, "64", "web"),
        "api": (128 * MiB, 250, "32", "api-host"),
        "db": (64 * MiB, 1000, "16", "db"),
    }
    addresses: dict[str, ipaddress.IPv4Address] = {}
    for env, (memory, cpu_millis, pids, hostname) in expected.items():
        host = tagged_link(rc.instance, env)
        assert host is not None, f"{env}: no host veth tagged {owner_tag(rc.instance, env)}"
        assert host["ifname"].startswith("rcv") and len(host["ifname"]) <= 15
        assert kernel_view.link_kind(host) == "veth"
        assert host.get("master") == net.bridge and is_up(host)

        netns = netns_of(rc.instance, env)
        eth0 = ip_link("eth0", netns=netns)
        assert eth0 is not None and is_up(eth0), f"{env}: eth0 missing or down in {netns}"
        (address,) = ipv4_addresses(eth0)
        assert address.endswith("/24")
        addresses[env] = ipaddress.IPv4Address(address.split("/")[0])
        route = default_route(netns)
        assert route.get("gateway") == net.gateway and route.get("dev") == "eth0"

        lim = limits(rc.instance, env)
        assert (lim.memory, lim.cpu_millis, lim.pids) == (memory, cpu_millis, pids), env

        pid = holder_pid(rc.instance, env)
        assert kernel_view.pid_netns_inode(pid) == kernel_view.netns_inode(netns)
        assert os.stat(f"/proc/{pid}/ns/uts").st_ino != os.stat("/proc/self/ns/uts").st_ino
        assert uts_hostname(pid) == hostname
        for controller in ("memory", "cpu", "pids"):
            procs = read_cgroup_file(cgroup_dir(controller, rc.instance, env) / "cgroup.procs")
            assert str(pid) in procs.split(), f"{env}: holder {pid} not in {controller} cgroup"

    assert addresses["web"] == ipaddress.IPv4Address(net.host(10))
    allocated = [addresses["api"], addresses["db"]]
    assert len(set(allocated)) == 2
    for allocated_address in allocated:
        assert allocated_address in net.subnet
        assert allocated_address not in (
            ipaddress.IPv4Address(net.gateway),
            net.subnet.network_address,
            net.subnet.broadcast_address,
            addresses["web"],
        )

    reply, peer = tcp_exchange(
        server_ns=netns_of(rc.instance, "api"),
        server_addr=str(addresses["api"]),
        client_ns=netns_of(rc.instance, "web"),
        port=8080,
    )
    assert reply == "pong:ping"
    assert peer == str(addresses["web"])


# --------------------------------------------------------------------------- 2. idempotence


def test_second_apply_changes_nothing(rc: Reconciler, three_envs: dict[str, EnvView]) -> None:
    before = os.stat(rc.state_file)
    serial = json.loads(rc.state_file.read_text())["serial"]
    changes = kernel_view.NetlinkChanges([netns_of(rc.instance, env) for env in three_envs])
    try:
        changes.settle()
        result = rc.ok("apply")
        # Not a single link, address or route written, on the host or in any env.
        assert changes.drain() == 0
    finally:
        changes.close()
    assert "No changes" in result.stdout

    after = os.stat(rc.state_file)
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert json.loads(rc.state_file.read_text())["serial"] == serial
    assert {env: env_view(rc.instance, env) for env in three_envs} == three_envs

    detailed = rc("plan", "--detailed-exitcode")
    assert detailed.returncode == 0, describe(detailed)
    plan = rc.json("plan", "-o", "json")
    assert plan["formatVersion"] == 1
    assert plan["summary"] == {"create": 0, "update": 0, "recreate": 0, "delete": 0}
    assert {c["action"] for c in plan["changes"]} <= {"noop"}


# --------------------------------------------------------------------------- 3. in-place edit


def test_memory_edit_is_applied_in_place(
    rc: Reconciler, manifests: Path, net: Net, three_envs: dict[str, EnvView]
) -> None:
    write_env(manifests, "api", net, memory="128Mi", cpu="250m", pids=32)

    plan = rc.json("plan", "-o", "json")
    (change,) = [c for c in plan["changes"] if c["name"] == "api"]
    assert change["kind"] == "Environment" and change["action"] == "update"
    assert "spec.resources.memory: 256Mi -> 128Mi" in change["reasons"]
    assert plan["summary"] == {"create": 0, "update": 1, "recreate": 0, "delete": 0}
    detailed = rc("plan", "--detailed-exitcode")
    assert detailed.returncode == 2, describe(detailed)

    rc.ok("apply")
    memory_file = cgroup_dir("memory", rc.instance, "api") / "memory.limit_in_bytes"
    assert read_cgroup_file(memory_file) == str(128 * MiB)
    assert env_view(rc.instance, "api") == three_envs["api"]  # same netns, holder, address
    assert limits(rc.instance, "api").pids == "32"


# --------------------------------------------------------------------------- 4. recreate


def test_hostname_change_recreates_and_keeps_address(
    rc: Reconciler, manifests: Path, net: Net, three_envs: dict[str, EnvView]
) -> None:
    write_env(manifests, "api", net, memory="256Mi", cpu="250m", pids=32, hostname="api2")

    plan = rc.json("plan", "-o", "json")
    (change,) = [c for c in plan["changes"] if c["name"] == "api"]
    assert change["action"] == "recreate"
    assert any("hostname" in r and "forces replacement" in r for r in change["reasons"]), change
    assert "forces replacement" in rc.ok("plan").stdout

    rc.ok("apply")
    after = env_view(rc.instance, "api")
    assert uts_hostname(after.holder) == "api2"
    assert after.address == three_envs["api"].address
    assert env_view(rc.instance, "web") == three_envs["web"]


# --------------------------------------------------------------------------- 5. prune


def test_removed_manifest_prunes_only_that_environment(
    rc: Reconciler, manifests: Path, three_envs: dict[str, EnvView]
) -> None:
    (manifests / "db.yaml").unlink()

    result = rc.ok("apply")
    assert "Environment/db: deleted" in result.stdout
    assert_env_gone(rc.instance, "db")
    assert not kernel_view.pid_alive(three_envs["db"].holder)
    for env in ("web", "api"):
        assert env_view(rc.instance, env) == three_envs[env]
        assert kernel_view.pid_alive(three_envs[env].holder)


# --------------------------------------------------------------------------- 6. invalid file


@pytest.mark.parametrize(
    ("broken", "marker"),
    [
        pytest.param("    memory: 12XB", "memory:", id="bad-quantity"),
        pytest.param("    cpu: 500m: x", "cpu:", id="yaml-syntax"),
    ],
)
def test_invalid_file_keeps_its_environment_and_others_converge(
    rc: Reconciler,
    manifests: Path,
    net: Net,
    three_envs: dict[str, EnvView],
    broken: str,
    marker: str,
) -> None:
    web_limits = limits(rc.instance, "web")
    path = manifests / "web.yaml"
    lines = path.read_text().splitlines()
    bad_line = line_of(path, marker)
    lines[bad_line - 1] = broken
    path.write_text("\n".join(lines) + "\n")
    write_env(manifests, "api", net, memory="128Mi", cpu="250m", pids=32)  # a valid edit
    write_env(manifests, "cache", net)  # a new env in another file

    result = rc("apply")
    assert result.returncode == 1, describe(result)
    assert f"web.yaml:{bad_line}:" in result.stderr, describe(result)
    assert "Traceback" not in result.stderr

    assert env_view(rc.instance, "web") == three_envs["web"]
    assert limits(rc.instance, "web") == web_limits
    assert limits(rc.instance, "api").memory == 128 * MiB
    assert env_view(rc.instance, "api") == three_envs["api"]
    cache = env_view(rc.instance, "cache")
    assert kernel_view.pid_alive(cache.holder)
    assert limits(rc.instance, "cache").memory == 256 * MiB


# --------------------------------------------------------------------------- 7. missing dir


def test_missing_manifests_directory_is_an_error_not_a_prune(
    rc: Reconciler, tmp_path: Path, three_envs: dict[str, EnvView]
) -> None:
    missing = tmp_path / "no-such-dir"
    result = rc("apply", manifests=missing)
    assert result.returncode == 1, describe(result)
    assert len(result.stderr.strip().splitlines()) == 1, describe(result)
    assert str(missing) in result.stderr
    assert {env: env_view(rc.instance, env) for env in three_envs} == three_envs


# --------------------------------------------------------------------------- 8. status


def _rfc3339(text: str) -> None:
    assert datetime.fromisoformat(text.replace("Z", "+00:00")).tzinfo is not None, text


def test_status_before_any_apply_is_an_empty_listing(rc: Reconciler) -> None:
    doc = rc.json("status", "-o", "json")
    assert doc["instance"] == rc.instance
    assert doc["networks"] == [] and doc["environments"] == []


def test_status_json_matches_the_kernel(rc: Reconciler, manifests: Path, net: Net) -> None:
    write_network(manifests, net)
    write_env(manifests, "web", net, address=net.host(10), memory="256Mi", cpu="500m", pids=64)
    write_env(manifests, "api", net, memory="128Mi", cpu="250m", pids=32)
    rc.ok("apply")

    doc = rc.json("status", "-o", "json")
    assert doc["instance"] == rc.instance
    assert doc["source"]["kind"] == "directory"
    assert Path(doc["source"]["path"]) == manifests.resolve()
    assert "revision" in doc["source"]

    (network,) = doc["networks"]
    assert subset(network, ("name", "bridge", "subnet", "gateway", "phase")) == {
        "name": net.name,
        "bridge": net.bridge,
        "subnet": str(net.subnet),
        "gateway": net.gateway,
        "phase": "Ready",
    }
    bridge = ip_link(net.bridge)
    assert bridge is not None and ipv4_addresses(bridge) == [f"{net.gateway}/24"]

    envs = {e["name"]: e for e in doc["environments"]}
    assert set(envs) == {"web", "api"}
    for name, memory, millis, pids in (("web", 256 * MiB, 500, 64), ("api", 128 * MiB, 250, 32)):
        env = envs[name]
        view = env_view(rc.instance, name)
        assert env["phase"] == "Ready"
        (ready,) = [c for c in env["conditions"] if c["type"] == "Ready"]
        assert ready["status"] == "True"
        assert {"reason", "message", "lastTransitionTime"} <= set(ready)
        _rfc3339(ready["lastTransitionTime"])
        assert env["netns"] == netns_of(rc.instance, name)
        assert env["netnsPath"] == f"/run/netns/{netns_of(rc.instance, name)}"
        assert os.stat(env["netnsPath"]).st_ino == view.netns_inode
        assert env["interfaces"] == [
            {"host": view.host_veth, "peer": "eth0", "address": view.address, "bridge": net.bridge}
        ]
        cgroup = env["cgroup"]
        assert cgroup["driver"] == "v1"
        for controller in ("memory", "cpu", "pids"):
            assert str(cgroup_dir(controller, rc.instance, name)) in cgroup["paths"]
        assert all(Path(p).is_dir() for p in cgroup["paths"])
        assert subset(cgroup["limits"], ("memoryBytes", "cpuMillis", "pids")) == {
            "memoryBytes": memory,
            "cpuMillis": millis,
            "pids": pids,
        }
        lim = limits(rc.instance, name)
        assert (lim.memory, lim.cpu_millis, lim.pids) == (memory, millis, str(pids))
        assert cgroup["limits"]["io"] == []
        assert cgroup["usage"]["pids"] == int(
            read_cgroup_file(cgroup_dir("pids", rc.instance, name) / "pids.current")
        )
        assert isinstance(cgroup["usage"]["memoryBytes"], int)
        for key in ("processes", "probes", "violations"):
            assert env[key] == []
        assert isinstance(env["specHash"], str) and env["specHash"]
        _rfc3339(env["lastReconciled"])
    assert envs["web"]["interfaces"][0]["address"] == f"{net.host(10)}/24"

    one = rc.json("status", "api", "-o", "json")
    assert [e["name"] for e in one["environments"]] == ["api"]
    unknown = rc("status", "nope")
    assert unknown.returncode == 1, describe(unknown)
    assert "nope" in unknown.stderr
    as_yaml = yaml.safe_load(rc.ok("status", "-o", "yaml").stdout)
    assert as_yaml["instance"] == rc.instance
    assert {e["name"] for e in as_yaml["environments"]} == {"web", "api"}


def test_deleted_veth_shows_degraded_and_apply_repairs_it(
    rc: Reconciler, net: Net, three_envs: dict[str, EnvView]
) -> None:
    veth = three_envs["api"].host_veth
    deleted = kernel_view.run(["ip", "link", "del", veth])
    assert deleted.returncode == 0, deleted.stderr

    phases = {e["name"]: e["phase"] for e in rc.json("status", "-o", "json")["environments"]}
    assert phases == {"web": "Ready", "api": "Degraded", "db": "Ready"}

    rc.ok("apply")
    events = [json.loads(line) for line in rc.ok("events", "-o", "json").stdout.splitlines()]
    assert any(e["reason"] == "DriftRepaired" and e["name"] == "api" for e in events), events
    phases = {e["name"]: e["phase"] for e in rc.json("status", "-o", "json")["environments"]}
    assert phases["api"] == "Ready"

    repaired = env_view(rc.instance, "api")
    assert repaired.address == three_envs["api"].address
    host = ip_link(repaired.host_veth)
    assert host is not None and is_up(host) and host.get("master") == net.bridge


# --------------------------------------------------------------------------- 9. lost state


def test_lost_state_file_is_refused_by_status_and_apply_keeps_addresses(
    rc: Reconciler, three_envs: dict[str, EnvView]
) -> None:
    rc.state_file.unlink()
    rc.state_file.with_name("state.json.bak").unlink(missing_ok=True)

    status = rc("status")
    assert status.returncode == 1, describe(status)
    assert "--recover" in status.stderr
    assert len(status.stderr.strip().splitlines()) == 1

    rc.ok("apply")
    for env, before in three_envs.items():
        after = env_view(rc.instance, env)  # exactly one holder, one tagged link
        assert after.address == before.address, env
    assert sorted(n for n in kernel_view.netns_names() if n.startswith(f"{rc.instance}-")) == [
        netns_of(rc.instance, env) for env in sorted(three_envs)
    ]


# --------------------------------------------------------------------------- 10. destroy


def test_destroy_one_then_all(rc: Reconciler, net: Net, three_envs: dict[str, EnvView]) -> None:
    rc.ok("destroy", "db")
    assert_env_gone(rc.instance, "db")
    assert not kernel_view.pid_alive(three_envs["db"].holder)
    for env in ("web", "api"):
        assert env_view(rc.instance, env) == three_envs[env]

    rc.ok("destroy")
    assert [n for n in kernel_view.netns_names() if rc.instance in n] == []
    ours = [
        link["ifname"]
        for link in ip_links()
        if link["ifname"] != "lo"
        and (
            rc.instance in (link.get("ifalias") or "")
            or link["ifname"] == net.bridge
            or not (link.get("ifalias") or "").startswith("reconciler:")  # untagged: ours too
        )
    ]
    assert ours == []
    assert leaked_objects(rc.instance) == []  # cgroup dirs, processes, netns, links, tables
    for pid in (view.holder for view in three_envs.values()):
        assert not kernel_view.pid_alive(pid)
    state = json.loads(rc.state_file.read_text())
    assert state["environments"] == {} and state["networks"] == {}

    again = rc("destroy")
    assert again.returncode == 0, describe(again)


# --------------------------------------------------------------------------- 11. lock

_LOCK_HOLDER = """
import sys
from pathlib import Path
from reconciler.state.store import StateStore
store = StateStore(Path(sys.argv[1]), sys.argv[2])
with store.lock(command="test lock holder"):
    print("locked", flush=True)
    sys.stdin.read()
"""


def test_apply_refuses_while_the_lock_is_held(
    rc: Reconciler, manifests: Path, net: Net, state_dir: Path
) -> None:
    write_network(manifests, net)
    write_env(manifests, "web", net)
    holder = subprocess.Popen(
        [sys.executable, "-c", _LOCK_HOLDER, str(state_dir), rc.instance],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdin is not None
        readable, _, _ = select.select([holder.stdout], [], [], 15)
        assert readable and holder.stdout.readline().strip() == "locked"

        result = rc("apply")
        assert result.returncode == 1, describe(result)
        assert str(holder.pid) in result.stderr, describe(result)
        assert len(result.stderr.strip().splitlines()) == 1, describe(result)
        assert [n for n in kernel_view.netns_names() if rc.instance in n] == []
        assert ip_link(net.bridge) is None
    finally:
        if holder.stdin is not None:
            holder.stdin.close()
        holder.wait(timeout=10)

    rc.ok("apply")  # released: the next apply goes through
    env_view(rc.instance, "web")


# --------------------------------------------------------------------------- 12. two instances


@pytest.fixture
def other(
    request: pytest.FixtureRequest, _leak_guard: dict[str, str], tmp_path: Path, state_dir: Path
) -> Iterator[Reconciler]:
    """A second instance (its own name and manifests, same state dir), destroyed after."""
    import secrets

    name = _register(_leak_guard, f"rt{secrets.token_hex(4)}", request.node.nodeid)
    directory = tmp_path / "other-manifests"
    directory.mkdir()
    with managed_reconciler(
        Reconciler(manifests=directory, state_dir=state_dir, instance=name)
    ) as reconciler:
        yield reconciler


def test_two_instances_never_touch_each_other(
    rc: Reconciler, other: Reconciler, manifests: Path
) -> None:
    net_a, net_b = new_net(), new_net()
    write_network(manifests, net_a)
    write_env(manifests, "web", net_a)
    write_env(manifests, "api", net_a)
    write_network(other.manifests, net_b)
    write_env(other.manifests, "web", net_b)
    write_env(other.manifests, "api", net_b)
    rc.ok("apply")
    other.ok("apply")
    a_views = {env: env_view(rc.instance, env) for env in ("web", "api")}
    b_views = {env: env_view(other.instance, env) for env in ("web", "api")}
    b_limits = {env: limits(other.instance, env) for env in ("web", "api")}

    # Each instance's plan sees only its own objects: nothing to change, nothing to delete.
    for reconciler in (rc, other):
        assert reconciler.json("plan", "-o", "json")["summary"]["delete"] == 0

    rc.ok("destroy")
    assert leaked_objects(rc.instance) == []
    assert {env: env_view(other.instance, env) for env in ("web", "api")} == b_views
    assert {env: limits(other.instance, env) for env in ("web", "api")} == b_limits
    bridge = ip_link(net_b.bridge)
    assert bridge is not None and ipv4_addresses(bridge) == [f"{net_b.gateway}/24"]
    assert ip_link(net_a.bridge) is None
    assert not any(kernel_view.pid_alive(v.holder) for v in a_views.values())


# --------------------------------------------------------------------------- 13. name prefixes


def test_instance_names_cannot_make_netns_names_ambiguous(tmp_path: Path, state_dir: Path) -> None:
    """netns names are `<instance>-<env>`: an instance name with "-" could collide
    (instance X-b env web vs instance X env b-web), so it is a usage error (exit 2)."""
    rc = Reconciler(manifests=tmp_path, state_dir=state_dir, instance="rtabc-b")
    result = rc("status")
    assert result.returncode == 2, describe(result)
    assert "--instance" in result.stderr and "no '-'" in result.stderr, describe(result)
