#!/usr/bin/env bash
# Install what Accord's demo and tests need on this machine; safe to run again.
#  - a virtualenv in .venv with accord and its dev extra (editable)
#  - etcd, kube-apiserver, kube-controller-manager and kubectl built from the pinned
#    releases into ${XDG_CACHE_HOME:-~/.cache}/accord/k8s/<version>/ (reused when present)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

python="${PYTHON:-python3}"
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
  echo "Accord needs Python >= 3.11 (set PYTHON=/path/to/python3.11)" >&2
  exit 1
fi
if ! command -v go >/dev/null; then
  echo "Go is needed to build the control-plane binaries (or set KUBEBUILDER_ASSETS)" >&2
  [[ -n "${KUBEBUILDER_ASSETS:-}" ]] || exit 1
fi

if [[ ! -x .venv/bin/python ]]; then
  say "creating .venv"
  "$python" -m venv .venv
fi
stamp=".venv/.accord-installed"
if [[ ! -f "$stamp" || pyproject.toml -nt "$stamp" ]]; then
  say "installing accord[dev] into .venv"
  .venv/bin/pip install --quiet --upgrade pip
  .venv/bin/pip install --quiet -e '.[dev]'
  touch "$stamp"
fi

if [[ -z "${KUBEBUILDER_ASSETS:-}" ]]; then
  say "control-plane binaries (cached after the first build)"
  hack/build-binaries.sh >/dev/null
fi
