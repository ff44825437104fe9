#!/usr/bin/env bash
# Build etcd, kube-apiserver, kube-controller-manager, kubectl, kube-scheduler, kubelet,
# kube-proxy and helm from the releases
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
k8s_binaries=(kube-apiserver kube-controller-manager kubectl kube-scheduler kubelet kube-proxy)
all_k8s_built() {
  have kube-apiserver "kubernetes $k8s_version" || return 1
  local b; for b in "${k8s_binaries[@]}"; do [[ -x "$dest/$b" ]] || return 1; done
}
if ! all_k8s_built; then
  minor="${k8s_version#v1.}"; minor="${minor%%.*}"
  # Stamp the release into the binaries, as the upstream build does, so that /version tells
  # the truth (the injector decides native sidecars from the server version).
  ldflags="-s -w"
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ldflags+=" -X ${pkg}.gitVersion=${k8s_version} -X ${pkg}.gitMajor=1 -X ${pkg}.gitMinor=${minor}"
    ldflags+=" -X ${pkg}.gitTreeState=clean"
  done
  echo "building ${k8s_binaries[*]} ${k8s_version} (a cold build takes several minutes)" >&2
  (cd "$hack/k8s" && go build -trimpath -ldflags "$ldflags" -o "$dest/" \
      "${k8s_binaries[@]/#/k8s.io/kubernetes/cmd/}")
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

# The real node's own parts (ACCORD_NODE_BINARIES=0 skips them: control plane only).
if [[ "${ACCORD_NODE_BINARIES:-1}" != 0 ]]; then
  containerd_version="$(awk '$1=="github.com/containerd/containerd/v2" {print $2; exit}' "$hack/containerd/go.mod")"
  cni_version="$(awk '$1=="github.com/containernetworking/plugins" {print $2; exit}' "$hack/cni/go.mod")"
  coredns_version="$(awk '$1=="require" && $2=="github.com/coredns/coredns" {print $3}' "$hack/coredns/go.mod")"
  if ! have containerd "containerd $containerd_version"; then
    echo "building containerd ${containerd_version}" >&2
    (cd "$hack/containerd" && go build -trimpath -ldflags "-s -w" \
        -tags "no_btrfs no_devmapper no_zfs urfave_cli_no_docs" -o "$dest/" \
        github.com/containerd/containerd/v2/cmd/containerd \
        github.com/containerd/containerd/v2/cmd/ctr \
        github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2)
    stamp "containerd $containerd_version"
  fi
  if ! have cni/bridge "cni $cni_version"; then
    echo "building the CNI plugins ${cni_version}" >&2
    mkdir -p "$dest/cni"
    (cd "$hack/cni" && go build -trimpath -ldflags "-s -w" -o "$dest/cni/" \
        github.com/containernetworking/plugins/plugins/main/bridge \
        github.com/containernetworking/plugins/plugins/main/loopback \
        github.com/containernetworking/plugins/plugins/ipam/host-local \
        github.com/containernetworking/plugins/plugins/meta/portmap)
    stamp "cni $cni_version"
  fi
  if ! have coredns "coredns $coredns_version"; then
    echo "building coredns ${coredns_version}" >&2
    (cd "$hack/coredns" && go build -trimpath -ldflags "-s -w" -o "$dest/coredns" .)
    stamp "coredns $coredns_version"
  fi
  if ! have pause "pause $k8s_version"; then
    # The sandbox image's one binary, from the pinned release's own source (no registry).
    echo "building pause from kubernetes ${k8s_version}" >&2
    src="$(cd "$hack/k8s" && go list -m -f '{{.Dir}}' k8s.io/kubernetes)/build/pause/linux/pause.c"
    ${CC:-gcc} -Os -static -DVERSION="${k8s_version}" -o "$dest/pause" "$src"
    strip "$dest/pause" 2>/dev/null || true
    stamp "pause $k8s_version"
  fi
fi
echo "ready in $(( $(date +%s) - start ))s" >&2
echo "$dest"
