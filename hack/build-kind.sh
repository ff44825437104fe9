#!/usr/bin/env bash
# Build kind from the release pinned in hack/kind/go.mod into the binary cache; prints its
# path. Only the end-to-end tests need it, and only where a Docker engine runs.
set -euo pipefail
hack="$(cd "$(dirname "$0")" && pwd)"
version="$(awk '$1=="sigs.k8s.io/kind" {print $2; exit}' "$hack/kind/go.mod")"
dest="${XDG_CACHE_HOME:-$HOME/.cache}/accord/kind/${version}"
if [[ ! -x "$dest/kind" ]]; then
  mkdir -p "$dest"
  (cd "$hack/kind" && CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o "$dest/kind" sigs.k8s.io/kind)
fi
echo "$dest/kind"
