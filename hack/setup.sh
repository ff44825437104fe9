#!/usr/bin/env bash
# Install what Accord's demo and tests need on this machine; safe to run again.
#  - nats-server from Debian's packages (when missing; needs root)
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

# nats-server (JetStream) for the sidecar's data-plane tests and the demo, from Debian.
if ! command -v nats-server >/dev/null && [[ ! -x /usr/sbin/nats-server ]]; then
  if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
    say "installing nats-server"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nats-server >/dev/null
    # The package enables a system service; tests start their own servers on free ports.
    systemctl disable --now nats-server >/dev/null 2>&1 || true
  else
    echo "nats-server is needed: sudo apt-get install nats-server (or put it on PATH)" >&2
    exit 1
  fi
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
