"""Health under `reconciler run`: probes restart what fails, violations quarantine, release.

The monitor's own behaviour is tested in test_health.py; this checks the wiring a user
relies on: status shows the probe and `Degraded`, the process is restarted, a quarantine
decided by the policy loop cuts the environment's network until `reconciler release`.
"""

from __future__ import annotations

import socket
from typing import Any

from tests.integration.netprobe import DENY_TIMEOUT
from tests.integration.test_run import Controller, controller  # noqa: F401  (fixture)
from tests.kernel_view import wait_until

DEADLINE = 30.0


def _connects(host: str, port: int, timeout: float) -> bool:
    """A TCP connection from the sandbox's host namespace completes (any server)."""
    with socket.socket() as sock:
        sock.settimeout(timeout)
        return sock.connect_ex((host, port)) == 0


def _env(c: Controller, name: str) -> dict[str, Any]:
    return next(e for e in c.status()["environments"] if e["name"] == name)


def test_failing_tcp_probe_degrades_and_restarts(controller: Controller) -> None:  # noqa: F811
    c = controller
    # `sh` stays up when the server inside it dies: only the probe can tell.
    (c.manifests / "svc.yaml").write_text(
        f"""apiVersion: reconciler/v1
kind: Network
metadata: {{name: {c.network}}}
spec: {{subnet: {c.subnet_prefix}.0/24, isolation: open}}
---
apiVersion: reconciler/v1
kind: Environment
metadata: {{name: svc}}
spec:
  network: {{name: {c.network}}}
  processes:
    - name: api
      command: [sh, -c, "python3 -m http.server 8080 --bind 0.0.0.0 & echo $! > /tmp/server.pid; wait; sleep 1000"]
  probes:
    - {{name: api-up, tcp: {{port: 8080}}, periodSeconds: 1, timeoutSeconds: 1, failureThreshold: 2}}
"""  # noqa: E501
    )
    c.start()
    wait_until(
        lambda: [p["healthy"] for p in _env(c, "svc")["probes"]] == [True],
        DEADLINE,
        message="probe never became healthy",
    )
    assert c.cli("exec", "svc", "--", "sh", "-c", "kill $(cat /tmp/server.pid)").returncode == 0
    wait_until(lambda: _env(c, "svc")["phase"] == "Degraded", DEADLINE, message="never Degraded")
    wait_until(
        lambda: _env(c, "svc")["processes"][0]["restarts"] >= 1,
        DEADLINE,
        message="the failing probe did not restart the process",
    )
    wait_until(lambda: _env(c, "svc")["phase"] == "Ready", DEADLINE, message="never healthy again")
    reasons = {e["reason"] for e in c.events()}
    assert "ProbeFailed" in reasons, reasons


def test_denied_connection_quarantines_until_release(controller: Controller) -> None:  # noqa: F811
    c = controller
    (c.manifests / "pair.yaml").write_text(
        f"""apiVersion: reconciler/v1
kind: Network
metadata: {{name: {c.network}}}
spec: {{subnet: {c.subnet_prefix}.0/24, isolation: strict}}
---
apiVersion: reconciler/v1
kind: Environment
metadata: {{name: rogue}}
spec:
  network: {{name: {c.network}, address: {c.subnet_prefix}.20}}
  processes:
    - {{name: web, command: [python3, -m, http.server, "7000", --bind, 0.0.0.0]}}
  policy: {{onViolation: quarantine}}
---
apiVersion: reconciler/v1
kind: Environment
metadata: {{name: target}}
spec:
  network: {{name: {c.network}, address: {c.subnet_prefix}.21}}
"""
    )
    c.start()
    wait_until(lambda: len(c.status()["environments"]) == 2, DEADLINE, message="not created")
    # Everything inside the envs runs through the reconciler: a listener started with
    # `ip netns exec` would itself be an `escape` (and quarantine for the wrong reason).
    rogue_ip = f"{c.subnet_prefix}.20"
    wait_until(
        lambda: _connects(rogue_ip, 7000, timeout=1.0),
        DEADLINE,
        message=lambda: f"no web: {_env(c, 'rogue')}",
    )
    attempt = c.cli(
        "exec", "rogue", "--", "python3", "-c",
        "import socket, sys; s = socket.socket(); s.settimeout(0.5); "
        "s.connect_ex((sys.argv[1], 7000))",
        f"{c.subnet_prefix}.21",
    )  # fmt: skip
    assert attempt.returncode == 0, attempt.stderr
    wait_until(
        lambda: _env(c, "rogue")["quarantined"],
        DEADLINE,
        message=lambda: f"never quarantined: {_env(c, 'rogue')}",
    )
    violations = _env(c, "rogue")["violations"]
    assert [v["type"] for v in violations] == ["denied-connection"], violations
    wait_until(
        lambda: not _connects(rogue_ip, 7000, timeout=DENY_TIMEOUT),
        DEADLINE,
        message="a quarantined env is still reachable",
    )
    assert c.cli("release", "rogue").returncode == 0
    wait_until(
        lambda: _connects(rogue_ip, 7000, timeout=1.0),
        DEADLINE,
        message="release did not restore connectivity",
    )
    assert not _env(c, "rogue")["quarantined"]
