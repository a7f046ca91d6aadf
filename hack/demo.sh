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

cat <<'TXT'

Next:
  keep them converged (watch manifests/, probes, policy; Ctrl-C to stop, environments stay up):
    .venv/bin/reconciler --manifests manifests run
  look inside:   .venv/bin/reconciler status -o wide   |   .venv/bin/reconciler events
  clean up everything this instance owns:
    .venv/bin/reconciler destroy
TXT

if [[ $apply_rc -ne 0 || $status_rc -ne 0 ]]; then
  echo "demo: apply exited $apply_rc, status exited $status_rc" >&2
  exit 1
fi
