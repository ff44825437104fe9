#!/usr/bin/env bash
# Build etcd, kube-apiserver, kube-controller-manager, kubectl and helm from the releases
# pinned in hack/k8s/go.mod, hack/etcd/go.mod and hack/helm/go.mod into
# ${XDG_CACHE_HOME:-~/.cache}/accord/k8s/<kubernetes version>/ (outside the repo).
# What is already there at the pinned version is reused; prints the directory last.
set -euo pipefail
hack="$(cd "$(dirname "$0")" && pwd)"
k8s_version="$(awk '$1=="require" && $2=="k8s.io/kubernetes" {print $3}' "$hack/k8s/go.mod")"
etcd_version="$(awk '$1=="go.etcd.io/etcd/server/v3" {print $2; exit}' "$hack/etcd/go.mod")"
helm_version="$(awk '$1=="helm.sh/helm/v3" {print $2; exit}' "$hack/helm/go.mod")"
dest="${XDG_CACHE_HOME:-$HOME/.cache}/accord/k8s/${k8s_version}"
mkdir -p "$dest"
export CGO_ENABLED=0

have() {  # have <binary> <name version>: built before at this version
  [[ -x "$dest/$1" ]] && grep -qx "$2" "$dest/VERSIONS" 2>/dev/null
}
stamp() {
  { grep -v "^${1%% *} " "$dest/VERSIONS" 2>/dev/null || true; echo "$1"; } > "$dest/VERSIONS.new"
  mv "$dest/VERSIONS.new" "$dest/VERSIONS"
}

start=$(date +%s)
if ! { have kube-apiserver "kubernetes $k8s_version" && [[ -x "$dest/kubectl" && -x "$dest/kube-controller-manager" ]]; }; then
  minor="${k8s_version#v1.}"; minor="${minor%%.*}"
  # Stamp the release into the binaries, as the upstream build does, so that /version tells
  # the truth (the injector decides native sidecars from the server version).
  ldflags="-s -w"
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ldflags+=" -X ${pkg}.gitVersion=${k8s_version} -X ${pkg}.gitMajor=1 -X ${pkg}.gitMinor=${minor}"
    ldflags+=" -X ${pkg}.gitTreeState=clean"
  done
  echo "building kube-apiserver, kube-controller-manager and kubectl ${k8s_version} (a cold build takes several minutes)" >&2
  (cd "$hack/k8s" && go build -trimpath -ldflags "$ldflags" -o "$dest/" \
      k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kube-controller-manager \
      k8s.io/kubernetes/cmd/kubectl)
  stamp "kubernetes $k8s_version"
fi
if ! have etcd "etcd $etcd_version"; then
  echo "building etcd ${etcd_version}" >&2
  (cd "$hack/etcd" && go build -trimpath -ldflags "-s -w" -o "$dest/etcd" go.etcd.io/etcd/server/v3)
  stamp "etcd $etcd_version"
fi
if ! have helm "helm $helm_version"; then
  echo "building helm ${helm_version}" >&2
  (cd "$hack/helm" && go build -trimpath \
      -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=${helm_version}" \
      -o "$dest/helm" helm.sh/helm/v3/cmd/helm)
  stamp "helm $helm_version"
fi
echo "ready in $(( $(date +%s) - start ))s" >&2
echo "$dest"
