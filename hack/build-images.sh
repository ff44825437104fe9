#!/usr/bin/env bash
# Build Accord's images from their own Dockerfiles with buildah (Debian's), into OCI archives
# in ${XDG_CACHE_HOME:-~/.cache}/accord/images/, ready for `ctr images import`.
#
# No registry can be reached here, so the Dockerfiles take their base image as a build
# argument (BASE; users keep the public slim Python base). This script makes that base on
# this machine: debootstrap (minbase) of the host's Debian release with Debian's Python,
# from the host's own apt mirror. Set ACCORD_IMAGE_BASE to build on another base instead.
#
# Content-hash cached: an image is rebuilt only when its Dockerfile, the files it COPYs or
# its base change. Prints one line per image: "<name> <reference> <archive>".
# The nats image (a development broker for the chart's nats.deploy) carries this machine's
# nats-server binary (Debian's), staged in the cache as its build context.
# Usage: hack/build-images.sh [operator] [sidecar] [samples] [nats]   (default: all four)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cache="${XDG_CACHE_HOME:-$HOME/.cache}/accord/images"
mkdir -p "$cache"
say() { echo "$*" >&2; }

# name -> Dockerfile and build context (relative to the repository root).
declare -A dockerfile=(
  [operator]=operator/Dockerfile
  [sidecar]=sidecar_images/sidecar/Dockerfile
  [samples]=examples/services/Dockerfile
  [nats]=hack/images/nats.Dockerfile
)
declare -A context=([operator]=. [sidecar]=sidecar_images/sidecar [samples]=. [nats]=.)
names=("$@")
[[ ${#names[@]} -gt 0 ]] || names=(operator sidecar samples nats)

for tool in buildah sha256sum; do
  command -v "$tool" >/dev/null || { say "hack/build-images.sh needs $tool (apt-get install buildah)"; exit 1; }
done
[[ $(id -u) -eq 0 ]] || { say "hack/build-images.sh needs root (buildah storage, debootstrap)"; exit 1; }

# One build at a time per cache: buildah's storage and the archives are shared.
exec 9>"$cache/.lock"
flock 9

buildah=(buildah --root "$cache/storage" --runroot "$cache/run" --storage-driver vfs)

# Files that a RUN step may read from the host without them entering the image: pip's
# site configuration and the CA bundle it names (a package index behind a private CA).
run_mounts=()
for f in /etc/pip.conf /etc/ssl/certs/ca-certificates.crt; do
  [[ -f $f ]] && run_mounts+=(-v "$f:$f:ro")
done

make_base() {  # prints the reference of the base image made here (debootstrap)
  local suite mirror key ref work
  suite="$(. /etc/os-release && echo "${VERSION_CODENAME:?}")"
  # The host's own Debian mirror, as apt is configured (deb822 or one-line sources).
  mirror="$(grep -hE '^(URIs:|deb )' /etc/apt/sources.list.d/*.sources /etc/apt/sources.list 2>/dev/null \
    | grep -v security | head -n1 | awk '{print ($1=="deb") ? $2 : $2}')"
  [[ -n $mirror ]] || { say "no Debian mirror found in /etc/apt/sources.list*"; exit 1; }
  local packages="python3,python3-venv,python-is-python3,ca-certificates"
  key="$(printf '%s\n' "$suite" "$packages" "$(cat "$root/hack/images/base.Dockerfile")" | sha256sum | cut -c1-16)"
  ref="localhost/accord/base:$key"
  if ! "${buildah[@]}" inspect --type image "$ref" >/dev/null 2>&1; then
    command -v debootstrap >/dev/null || { say "debootstrap is needed (apt-get install debootstrap)"; exit 1; }
    say "making the base image ($suite minbase + $packages; about a minute)"
    work="$(mktemp -d "$cache/base.XXXXXX")"
    trap 'rm -rf "$work"' EXIT
    debootstrap --variant=minbase --include="$packages" "$suite" "$work/rootfs" "$mirror" >"$work/debootstrap.log" 2>&1 \
      || { tail -n 20 "$work/debootstrap.log" >&2; exit 1; }
    rm -rf "$work/rootfs"/var/cache/apt/archives/*.deb "$work/rootfs"/var/lib/apt/lists/* "$work/rootfs"/var/log/*
    tar -C "$work/rootfs" -cf "$work/rootfs.tar" .
    cp "$root/hack/images/base.Dockerfile" "$work/Dockerfile"
    "${buildah[@]}" build --quiet --isolation chroot --network host -t "$ref" -f "$work/Dockerfile" "$work" >/dev/null
    rm -rf "$work"
    trap - EXIT
  fi
  echo "$ref"
}

copied_sources() {  # the sources of a Dockerfile's COPY lines (not --from=), one per line
  awk 'toupper($1)=="COPY" { n=0; for (i=2; i<=NF; i++) if ($i !~ /^--/) a[++n]=$i;
       if ($0 !~ /--from=/) for (i=1; i<n; i++) print a[i]; delete a }' "$1"
}

content_key() {  # content_key <name> <base ref>: hash of Dockerfile, copied files and base
  local df ctx
  df="$(in_repo "${dockerfile[$1]}")" ctx="$(in_repo "${context[$1]}")"
  {
    echo "$2"
    cat "$df"
    copied_sources "$df" | while read -r src; do
      (cd "$ctx" && find $src -type f ! -name '*.pyc' ! -path '*/__pycache__/*' -print0 | sort -z | xargs -0 sha256sum)
    done
  } | sha256sum | cut -c1-16
}

stage_nats() {  # the nats image's build context: this machine's nats-server
  local bin dir="$cache/nats-context"
  bin="$(command -v nats-server)" || { say "nats-server is needed for the nats image (apt-get install nats-server)"; exit 1; }
  mkdir -p "$dir"
  cmp -s "$bin" "$dir/nats-server" || install -m 0755 "$bin" "$dir/nats-server"
  context[nats]="$dir"
}

in_repo() {  # a path as given: absolute, or relative to the repository root
  if [[ $1 == /* ]]; then echo "$1"; else echo "$root/$1"; fi
}

base="${ACCORD_IMAGE_BASE:-}"
[[ -n $base ]] || base="$(make_base)"
for name in "${names[@]}"; do
  [[ -n ${dockerfile[$name]:-} ]] || { say "unknown image $name (operator, sidecar, samples, nats)"; exit 1; }
  [[ $name != nats ]] || stage_nats
  key="$(content_key "$name" "$base")"
  ref="localhost/accord/$name:$key"
  archive="$cache/$name-$key.tar"
  if [[ ! -s $archive ]]; then
    say "building $ref from ${dockerfile[$name]}"
    # Host network for RUN steps: buildah would otherwise set up CNI (and leave /etc/cni).
    "${buildah[@]}" build --quiet --isolation chroot --network host --pull-never --build-arg "BASE=$base" \
      "${run_mounts[@]}" -t "$ref" -f "$(in_repo "${dockerfile[$name]}")" "$(in_repo "${context[$name]}")" >/dev/null
    rm -f "$cache/$name"-*.tar
    "${buildah[@]}" push --quiet "$ref" "oci-archive:$archive.part:$ref"
    mv "$archive.part" "$archive"
    # Keep the storage small: the archive is the cache; layers of old builds can go.
    "${buildah[@]}" rmi --prune >/dev/null 2>&1 || true
  fi
  echo "$name $ref $archive"
done
