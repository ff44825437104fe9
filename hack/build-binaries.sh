#!/usr/bin/env bash
# Build etcd, kube-apiserver, kube-controller-manager and kubectl from the releases pinned in hack/k8s/go.mod and
# hack/etcd/go.mod into ${XDG_CACHE_HOME:-~/.cache}/accord/k8s/<version>/ (outside the repo).
# A complete cache is reused as it is; prints the directory on its last line.
set -euo pipefail
hack="$(cd "$(dirname "$0")" && pwd)"
k8s_version="$(awk '$1=="require" && $2=="k8s.io/kubernetes" {print $3}' "$hack/k8s/go.mod")"
etcd_version="$(awk '$1=="go.etcd.io/etcd/server/v3" {print $2; exit}' "$hack/etcd/go.mod")"
dest="${XDG_CACHE_HOME:-$HOME/.cache}/accord/k8s/${k8s_version}"
if [[ -x "$dest/kube-apiserver" && -x "$dest/kubectl" && -x "$dest/kube-controller-manager" && -x "$dest/etcd" ]] \
   && grep -qx "etcd ${etcd_version}" "$dest/VERSIONS" 2>/dev/null; then
  echo "$dest"
  exit 0
fi
mkdir -p "$dest"
start=$(date +%s)
export CGO_ENABLED=0
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
echo "building etcd ${etcd_version}" >&2
(cd "$hack/etcd" && go build -trimpath -ldflags "-s -w" -o "$dest/etcd" go.etcd.io/etcd/server/v3)
printf 'kubernetes %s\netcd %s\n' "$k8s_version" "$etcd_version" > "$dest/VERSIONS"
echo "built in $(( $(date +%s) - start ))s" >&2
echo "$dest"
