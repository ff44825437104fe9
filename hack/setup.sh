#!/usr/bin/env bash
# Install what Accord's demo and tests need on this machine; safe to run again.
#  - from Debian's packages (when missing; needs root): nats-server; for the real node and
#    its images runc, iptables, buildah and debootstrap
#  - a virtualenv in .venv with accord and its dev extra (editable)
#  - the control plane (etcd, kube-apiserver, kube-controller-manager, kubectl, helm) and the
#    real node (kubelet, kube-proxy, kube-scheduler, containerd, CNI plugins, CoreDNS, pause)
#    built from pinned releases into ${XDG_CACHE_HOME:-~/.cache}/accord/k8s/<version>/
#    (reused when present)
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

# From Debian: nats-server (JetStream) for the data-plane tests and the demo; runc and
# iptables for the real node; buildah and debootstrap to build the images it runs.
declare -A needs=([nats-server]=nats-server [runc]=runc [iptables]=iptables [buildah]=buildah
                  [debootstrap]=debootstrap)
missing=()
for cmd in "${!needs[@]}"; do
  command -v "$cmd" >/dev/null || [[ -x /usr/sbin/$cmd ]] || missing+=("${needs[$cmd]}")
done
if [[ ${#missing[@]} -gt 0 ]]; then
  if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
    say "installing ${missing[*]}"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    # The package enables a system service; tests start their own servers on free ports.
    systemctl disable --now nats-server >/dev/null 2>&1 || true
  elif [[ " ${missing[*]} " == *" nats-server "* ]]; then
    echo "needed from Debian's packages: sudo apt-get install ${missing[*]}" >&2
    exit 1
  else
    # Without root there is no real node anyway; the in-cluster tests say so when they skip.
    echo "note: the real node needs root and: apt-get install ${missing[*]}" >&2
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
