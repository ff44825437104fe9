#!/usr/bin/env bash
# Render manifests/install.yaml from the Helm chart: one file for `kubectl apply -f`.
# It takes its webhook certificates from cert-manager (so the file is reproducible);
# install cert-manager first, or use the chart, which can make its own certificates.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
helm="$("$root/hack/build-binaries.sh")/helm"
k8s_version="$(awk '$1=="require" && $2=="k8s.io/kubernetes" {print $3}' "$root/hack/k8s/go.mod")"
namespace=accord-system
{
  echo "# Rendered by hack/render-manifests.sh from manifests/chart; do not edit."
  echo "# kubectl apply --server-side -f manifests/install.yaml   (needs cert-manager)"
  echo "apiVersion: v1"
  echo "kind: Namespace"
  echo "metadata:"
  echo "  name: ${namespace}"
  echo "  labels: {pod-security.kubernetes.io/enforce: restricted}"
  "$helm" template accord "$root/manifests/chart" --namespace "$namespace" --include-crds \
    --kube-version "${k8s_version#v}" --set certManager.enabled=true --no-hooks 2>/dev/null
} > "$root/manifests/install.yaml"
echo "wrote manifests/install.yaml" >&2
