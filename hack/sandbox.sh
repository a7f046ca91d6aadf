#!/usr/bin/env bash
# hack/sandbox.sh CMD [ARGS...]: run CMD as root inside a throwaway network + mount namespace.
#
# Why: integration tests create real kernel objects (bridges, veths, network namespaces,
# nftables tables). Inside a fresh network namespace none of that can reach or disturb the
# host's interfaces or firewall, and it all vanishes when CMD exits. A private mount
# namespace lets us put empty tmpfs mounts over the reconciler's well-known directories, so
# the host's /run/netns, runtime dir and state are neither visible nor touched.
#
# NOT isolated: cgroups (/sys/fs/cgroup is the host's; /sys is deliberately not remounted
# because the cgroup mounts live under it) and processes (no pid namespace). Tests must
# use unique instance names and clean up what they create (tests/leaks.py checks).
#
# CMD sees the caller's environment and cwd, plus RECONCILER_SANDBOX=1 and
# RECONCILER_SANDBOX_PARENT_NETNS=<inode>:<dev> of the network namespace it was started from.
set -euo pipefail

if [[ $# -eq 0 ]]; then
  echo "usage: hack/sandbox.sh CMD [ARGS...]  (e.g. hack/sandbox.sh .venv/bin/pytest tests/integration)" >&2
  exit 2
fi
if [[ $EUID -ne 0 ]]; then
  echo "hack/sandbox.sh: must run as root (it creates a network namespace and tmpfs mounts); try: sudo -E hack/sandbox.sh $(printf '%q ' "$@")" >&2
  exit 1
fi
if ! command -v unshare >/dev/null || ! command -v ip >/dev/null; then
  echo "hack/sandbox.sh: unshare (util-linux) and ip (iproute2) are required; run hack/setup.sh" >&2
  exit 1
fi

# The namespace we start from, recorded so the tests can verify they really run in another
# one (tests/conftest.py). /proc/1/ns/net would be the natural reference, but in some
# containers even root may not read pid 1's namespace links.
parent_netns="$(stat -L -c '%i:%d' /proc/self/ns/net)"

# The inner script is expanded by the inner shell, not here: CMD and its arguments travel
# as "$@" (never re-parsed), so quoting survives intact.
# shellcheck disable=SC2016
inner='
set -euo pipefail
for dir in /run/netns /run/reconciler /var/lib/reconciler; do
  mkdir -p "$dir"
  mount -t tmpfs -o mode=0755 reconciler-sandbox "$dir"
done
if [[ "$(stat -L -c "%i:%d" /proc/self/ns/net)" == "$RECONCILER_SANDBOX_PARENT_NETNS" ]]; then
  echo "hack/sandbox.sh: still in the parent network namespace after unshare; refusing" >&2
  exit 1
fi
ip link set lo up
export RECONCILER_SANDBOX=1
exec "$@"
'
# --propagation private: our tmpfs mounts (and the shared bind mounts `ip netns add` makes)
# must never propagate back to the host's mount namespace.
RECONCILER_SANDBOX_PARENT_NETNS="$parent_netns" exec unshare --net --mount --propagation private -- bash -c "$inner" sandbox "$@"
