#!/usr/bin/env bash
# hack/setup.sh: idempotent setup of a Debian/Ubuntu machine for developing reconciler.
#
# 1. System packages, through apt, only for what dpkg says is missing (apt is skipped
#    entirely when everything is installed, so a warm machine needs neither root nor network).
# 2. A virtualenv at .venv in the repo root, created if missing.
# 3. `pip install -e '.[dev]'` into it, skipped when .venv already satisfies pyproject.toml
#    and pyproject.toml has not changed since the last install (a stamp file in .venv).
#
# Non-interactive by construction (CI=true, no stdin). One line of output per step.
set -euo pipefail

export DEBIAN_FRONTEND=noninteractive
export PIP_NO_INPUT=1 PIP_DISABLE_PIP_VERSION_CHECK=1

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

PACKAGES=(
  iproute2 nftables util-linux procps catatonit git
  python3 python3-venv python3-pip
  containernetworking-plugins gnupg ca-certificates
)
PYTHON="${PYTHON:-python3}"
VENV="$ROOT/.venv"
STAMP="$VENV/.reconciler-setup.sha256"

say() { printf 'setup: %s\n' "$*"; }
die() { printf 'setup: error: %s\n' "$*" >&2; exit 1; }

# --- 1. system packages -------------------------------------------------------------------
command -v dpkg-query >/dev/null \
  || die "dpkg not found: this script supports Debian/Ubuntu; install by hand: ${PACKAGES[*]}"
missing=()
for pkg in "${PACKAGES[@]}"; do
  # dpkg-query's Status, not `dpkg -s` alone: a removed package whose config files remain
  # ("deinstall ok config-files") still has a status entry and would look installed.
  if [[ "$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)" != "install ok installed" ]]; then
    missing+=("$pkg")
  fi
done
if [[ ${#missing[@]} -eq 0 ]]; then
  say "apt: all ${#PACKAGES[@]} packages installed, skipping apt-get"
else
  [[ $EUID -eq 0 ]] || die "missing packages (${missing[*]}): run hack/setup.sh as root to install them"
  say "apt: installing ${missing[*]}"
  apt_opts=(-y -q --no-install-recommends
    -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold)
  apt-get update -q </dev/null >/dev/null
  apt-get install "${apt_opts[@]}" "${missing[@]}" </dev/null >/dev/null
fi

# --- 2. virtualenv ------------------------------------------------------------------------
if [[ -x "$VENV/bin/python" ]]; then
  say "venv: $VENV exists ($("$VENV/bin/python" -V 2>&1))"
else
  [[ -e "$VENV" ]] && die "$VENV exists but has no bin/python: remove it and rerun hack/setup.sh"
  "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || die "$PYTHON is $("$PYTHON" -V 2>&1); reconciler needs Python >= 3.11 (set PYTHON=...)"
  say "venv: creating $VENV with $("$PYTHON" -V 2>&1)"
  "$PYTHON" -m venv "$VENV"
fi

# --- 3. the package and its dev tools -----------------------------------------------------
# Exit 0 when the venv already holds reconciler (editable, from this tree) and every
# requirement of pyproject.toml (dependencies + the dev extra) at an acceptable version.
# -I: ignore cwd and PYTHON* variables, so we see what the venv itself would import.
venv_satisfied() {
  "$VENV/bin/python" -I - "$ROOT" <<'PY'
import importlib.metadata as md
import importlib.util
import sys
import tomllib

try:
    from packaging.requirements import Requirement
except ImportError:
    from pip._vendor.packaging.requirements import Requirement

root = sys.argv[1]
with open(f"{root}/pyproject.toml", "rb") as f:
    project = tomllib.load(f)["project"]
spec = importlib.util.find_spec(project["name"])
if spec is None or not (spec.origin or "").startswith(root + "/"):
    sys.exit(1)
wanted = [*project.get("dependencies", []), *project.get("optional-dependencies", {}).get("dev", [])]
for req in map(Requirement, wanted):
    if req.marker is not None and not req.marker.evaluate():
        continue
    try:
        version = md.version(req.name)
    except md.PackageNotFoundError:
        sys.exit(1)
    if not req.specifier.contains(version, prereleases=True):
        sys.exit(1)
PY
}
pyproject_hash="$(sha256sum pyproject.toml | cut -d' ' -f1)"
stamp_hash="$(cat "$STAMP" 2>/dev/null || true)"
if [[ ( -z "$stamp_hash" || "$stamp_hash" == "$pyproject_hash" ) ]] && venv_satisfied; then
  say "pip: .venv satisfies pyproject.toml, skipping pip install"
else
  say "pip: installing -e '.[dev]' into .venv"
  "$VENV/bin/python" -m pip install -q -e '.[dev]' </dev/null
fi
printf '%s\n' "$pyproject_hash" >"$STAMP"
say "done"
