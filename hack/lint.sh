#!/usr/bin/env bash
# hack/lint.sh: ruff check, ruff format --check and mypy (strict, per pyproject) on reconciler/.
#
# Runs all three even when one fails, so a single run shows every problem; exits non-zero
# if any failed. Fix formatting with `.venv/bin/ruff format`.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
BIN="$ROOT/.venv/bin"
[[ -x "$BIN/ruff" && -x "$BIN/mypy" ]] || { echo "lint: .venv has no ruff/mypy: run hack/setup.sh" >&2; exit 1; }

failed=()
check() {
  local name=$1
  shift
  echo "lint: $name: $*"
  "$@" || failed+=("$name")
}
check ruff-check "$BIN/ruff" check .
check ruff-format "$BIN/ruff" format --check .
check "mypy" "$BIN/mypy" reconciler/

if [[ ${#failed[@]} -gt 0 ]]; then
  echo "lint: FAILED: ${failed[*]}"
  exit 1
fi
echo "lint: ok"
