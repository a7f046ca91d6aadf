"""The CNI baseline: Debian's `bridge` plugin with `host-local` IPAM, as a runtime calls it.

Per env, create: `ip netns add`, then the plugin with CNI_COMMAND=ADD (it makes the
bridge on first use, the veth, moves the peer in as eth0, asks host-local for an address
and sets the default route), then the same cgroup writes as the floor. Delete, per env:
CNI_COMMAND=DEL (deletes eth0 inside, releases the address), `ip netns delete`, rmdir;
finally the bridge (CNI never deletes it) and the cgroup parent.

This is what container runtimes do (podman with CNI, containerd's CRI), minus the
`loopback` plugin: `lo` stays down in these namespaces, which only flatters CNI. The
plugin's config comes on stdin; host-local keeps its leases in a temp dir of the trial.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time

from hack.bench.kernel import BenchError, CgroupTree, host_links_gone, run_checked, wait_until
from hack.bench.stats import Sample
from hack.bench.trial import Trial, check_envs

NAME = "cni"
CNI_PATH = "/usr/lib/cni"
PLUGIN = f"{CNI_PATH}/bridge"


def available() -> str | None:
    """None when the plugins are installed, else why not."""
    for plugin in ("bridge", "host-local"):
        if not os.access(f"{CNI_PATH}/{plugin}", os.X_OK):
            return f"{CNI_PATH}/{plugin} missing: apt-get install containernetworking-plugins"
    return None


def _config(trial: Trial, *, bridge: str, data_dir: str) -> str:
    return json.dumps(
        {
            "cniVersion": "1.0.0",
            "name": bridge,
            "type": "bridge",
            "bridge": bridge,
            "isGateway": True,
            "ipMasq": False,
            "ipam": {
                "type": "host-local",
                "subnet": str(trial.subnet),
                "routes": [{"dst": "0.0.0.0/0"}],
                "dataDir": data_dir,
            },
        }
    )


def _plugin(command: str, *, container: str, netns: str, config: str) -> None:
    env = {
        **os.environ,
        "CNI_COMMAND": command,
        "CNI_CONTAINERID": container,
        "CNI_NETNS": f"/run/netns/{netns}",
        "CNI_IFNAME": "eth0",
        "CNI_PATH": CNI_PATH,
    }
    # A subprocess per call, as every CNI runtime does it; the environment is the protocol.
    done = subprocess.run(
        [PLUGIN], input=config, env=env, capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        detail = (done.stderr or done.stdout).strip()[:300]
        raise BenchError(f"CNI {command} for {netns} failed (exit {done.returncode}): {detail}")


def run(trial: Trial) -> list[Sample]:
    """Create, check (untimed), delete; one sample per phase."""
    prefix = trial.prefix("c")
    bridge = f"bc{trial.index}"
    netns = [f"{prefix}n{i}" for i in range(trial.n)]
    cgroups = CgroupTree.v1(prefix)
    work = tempfile.mkdtemp(prefix=f"{prefix}-cni-")
    try:
        config = _config(trial, bridge=bridge, data_dir=f"{work}/ipam")

        started = time.perf_counter()
        cgroups.create_parent()
        for i, name in enumerate(netns):
            run_checked(["ip", "netns", "add", name], what=f"ip netns add {name}")
            _plugin("ADD", container=f"{prefix}x{i}", netns=name, config=config)
            cgroups.create_env(f"e{i}")
        created = time.perf_counter()

        check_envs(netns, subnet=trial.subnet)

        started_delete = time.perf_counter()
        for i, name in enumerate(netns):
            _plugin("DEL", container=f"{prefix}x{i}", netns=name, config=config)
            run_checked(["ip", "netns", "delete", name], what=f"ip netns delete {name}")
            cgroups.remove_env(f"e{i}")
        run_checked(["ip", "link", "delete", bridge], what=f"deleting bridge {bridge}")
        cgroups.remove_parent()
        deleted = time.perf_counter()
        gone = wait_until(host_links_gone, timeout=60, what="CNI's links to disappear")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return [
        Sample(NAME, "create", trial.n, trial.round, created - started),
        Sample(NAME, "delete", trial.n, trial.round, deleted - started_delete),
        Sample(NAME, "delete_gone", trial.n, trial.round, gone - started_delete),
    ]
