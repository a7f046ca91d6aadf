#!/usr/bin/env bash
# hack/bench.sh [OPTIONS]: the performance benchmark of issue 8, in one throwaway sandbox.
#
#   hack/bench.sh --sizes 10,50,200 --rounds 3 --json bench-results.json
#   hack/bench.sh --sizes 200 --rounds 1 --profile /tmp/apply.txt
#   hack/bench.sh --run-metrics            # also `reconciler run`: Ready latency, idle CPU, RSS
#
# Runs `python -m hack.bench OPTIONS` (see `hack/bench.sh --help`) with the project's venv
# inside hack/sandbox.sh: a private network + mount namespace, so every link, bridge and
# netns it makes vanishes with it. cgroups are the host's: the benchmark only creates and
# removes directories named after its own random tag, and checks after every trial that
# none is left. Needs root; runs hack/setup.sh first (iproute2, CNI plugins, the venv).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# The caller's cwd is kept (relative --json/--profile paths mean what they say); the
# package is found through PYTHONPATH.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
PYTHON="$ROOT/.venv/bin/python"
# From a clean checkout too: setup installs what is missing (apt packages, the venv) and
# takes a fraction of a second when everything is there.
"$ROOT/hack/setup.sh" >&2
for arg in "$@"; do
  if [[ "$arg" == "-h" || "$arg" == "--help" ]]; then exec "$PYTHON" -m hack.bench --help; fi
done
# The product is measured as users run it: with its modules compiled (pip installs .pyc
# files; a shell with PYTHONDONTWRITEBYTECODE set would otherwise recompile every module
# at every start, ~0.1 s per command).
unset PYTHONDONTWRITEBYTECODE
"$PYTHON" -m compileall -q "$ROOT/reconciler" >/dev/null
exec "$ROOT/hack/sandbox.sh" "$PYTHON" -m hack.bench "$@"
