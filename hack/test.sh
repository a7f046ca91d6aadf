#!/usr/bin/env bash
# hack/test.sh [PYTEST-OPTION...]: the whole gate, as CI runs it (.ci/run).
#
#   1. hack/setup.sh                       (packages, .venv; idempotent)
#   2. hack/lint.sh                        (ruff check, ruff format --check, mypy)
#   3. pytest tests/unit                   (no root, no kernel objects; outside the sandbox)
#   4. hack/sandbox.sh pytest tests/integration   (root, in a throwaway netns + mount ns)
#
# Extra arguments are pytest options passed to both suites (e.g. -x, -v, -k NAME).
# Steps 2-4 all run even when one fails; the exit status is non-zero if any failed.
# A suite that collected nothing (pytest exit 5) is a failure: a suite that ran nothing has
# not passed. Two exceptions, both only when CI is not "true": an integration directory
# with no test files yet (loud warning), and a suite your own -k/-m options emptied.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTEST=.venv/bin/pytest
in_ci() { [[ "${CI:-}" == "true" ]]; }

# Did the caller's options narrow the selection (-k, -m, --lf, --deselect, a path, ...)?
narrowed=""
for arg in "$@"; do
  case "$arg" in
    -k* | -m* | --deselect* | --lf | --last-failed | --sw | --stepwise | --ignore* | [!-]*) narrowed=yes ;;
  esac
done

passed=()
failed=()
warnings=()

banner() { printf '\n==> %s\n' "$*"; }
loud_warning() {
  printf '\n!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n'
  printf '!!! WARNING: %s\n' "$*"
  printf '!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!!\n\n'
  warnings+=("$*")
}

# Record the outcome of a pytest run: $1 = suite name, $2 = pytest's exit code.
record_pytest() {
  local name=$1 rc=$2
  if [[ $rc -eq 0 ]]; then
    passed+=("$name")
  elif [[ $rc -eq 5 && -n "$narrowed" ]] && ! in_ci; then
    # The caller narrowed the selection, so "nothing selected" is their choice.
    loud_warning "$name: your pytest options selected no tests"
  elif [[ $rc -eq 5 ]]; then
    echo "test: $name: pytest collected no tests (exit 5): a suite that ran nothing has not passed" >&2
    failed+=("$name")
  else
    failed+=("$name")
  fi
}

banner "setup: hack/setup.sh"
if ! hack/setup.sh; then
  echo "test: FAILED: setup (nothing else was run)"
  exit 1
fi

banner "lint: hack/lint.sh"
if hack/lint.sh; then passed+=(lint); else failed+=(lint); fi

banner "unit: $PYTEST tests/unit -q $*"
"$PYTEST" tests/unit -q "$@"
record_pytest unit $?

banner "integration: hack/sandbox.sh $PYTEST tests/integration -q $*"
if [[ -z "$(find tests/integration -name 'test_*.py' -o -name '*_test.py' | head -n1)" ]]; then
  if in_ci; then
    echo "test: integration: tests/integration holds no test files (CI=true: that is a failure)" >&2
    failed+=(integration)
  else
    loud_warning "integration: tests/integration holds no test files yet: NOTHING WAS RUN (fails when CI=true)"
  fi
else
  hack/sandbox.sh "$PYTEST" tests/integration -q "$@"
  record_pytest integration $?
fi

join() { local IFS=,; echo "${*:-none}"; }
echo
summary="passed: $(join "${passed[@]}")"
[[ ${#warnings[@]} -gt 0 ]] && summary+="; ${#warnings[@]} warning(s), see above"
if [[ ${#failed[@]} -gt 0 ]]; then
  echo "test: FAILED: $(join "${failed[@]}") ($summary)"
  exit 1
fi
echo "test: OK ($summary)"
