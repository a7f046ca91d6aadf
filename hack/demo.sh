#!/usr/bin/env bash
# hack/demo.sh: bring the example environments in manifests/ up on THIS host and show them.
#
# This is the real thing, not the test sandbox: it creates namespaces, bridges, veths,
# cgroups, nftables rules and processes on the host, owned by the reconciler instance
# (RECONCILER_INSTANCE, default "reconciler") and removable with `reconciler destroy`.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
if [[ $EUID -ne 0 ]]; then
  echo "demo: must run as root (it creates namespaces, links, cgroups and firewall rules); try: sudo -E hack/demo.sh" >&2
  exit 1
fi

hack/setup.sh

RECONCILER=(.venv/bin/reconciler --manifests manifests)
printf '\n==> %s apply\n' "${RECONCILER[*]}"
apply_rc=0
"${RECONCILER[@]}" apply || apply_rc=$?
# Show status even when apply failed: it says which environment failed and why.
printf '\n==> %s status\n' "${RECONCILER[*]}"
status_rc=0
"${RECONCILER[@]}" status || status_rc=$?

# The payments service answers from the host at its own address (envs are offline, the
# host can always reach them).
printf '\n==> GET http://<payments address>:8080/ from the host\n'
.venv/bin/python - <<'PY' || echo "demo: payments did not answer (see: .venv/bin/reconciler logs payments api)" >&2
import json, subprocess, time, urllib.request
status = json.loads(subprocess.run(
    [".venv/bin/reconciler", "--manifests", "manifests", "status", "payments", "-o", "json"],
    capture_output=True, text=True, check=True).stdout)
address = status["environments"][0]["interfaces"][0]["address"].split("/")[0]
deadline = time.monotonic() + 15
while True:
    try:
        reply = urllib.request.urlopen(f"http://{address}:8080/", timeout=2)
        print(f"payments at {address}:8080 answered HTTP {reply.status}")
        break
    except OSError:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.2)
PY

cat <<'TXT'

Next:
  keep them converged (watch manifests/, probes, policy; Ctrl-C to stop, environments stay up):
    .venv/bin/reconciler --manifests manifests run
  look inside:   .venv/bin/reconciler status -o wide   |   .venv/bin/reconciler events
                 .venv/bin/reconciler exec payments -- hostname   |   .venv/bin/reconciler logs payments api
  clean up everything this instance owns:
    .venv/bin/reconciler destroy
TXT

if [[ $apply_rc -ne 0 || $status_rc -ne 0 ]]; then
  echo "demo: apply exited $apply_rc, status exited $status_rc" >&2
  exit 1
fi
