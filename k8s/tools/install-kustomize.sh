#!/usr/bin/env bash
# Installs a pinned kustomize into a per-user cache and prints the binary's path on stdout (nothing else).
#
#   k8s/tools/install-kustomize.sh            # -> ~/.cache/rlhf-online/bin/kustomize-v5.8.1
#   "$(k8s/tools/install-kustomize.sh)" build k8s/overlays/dev
#
# Idempotent: a second run finds the cached binary and returns at once. It is built from source with
# `go install` through the Go module proxy (no Debian, PyPI or npm package ships kustomize), so it needs a Go
# toolchain (>= 1.24) on PATH. Set RLHF_CACHE_DIR to cache elsewhere, KUSTOMIZE_VERSION to pin another release.
set -euo pipefail

version="${KUSTOMIZE_VERSION:-v5.8.1}"
cache="${RLHF_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/rlhf-online}"
bin="$cache/bin/kustomize-$version"

if [[ -x "$bin" ]] && "$bin" version >/dev/null 2>&1; then
  echo "$bin"
  exit 0
fi

if ! command -v go >/dev/null 2>&1; then
  echo "install-kustomize: no Go toolchain on PATH; install Go >= 1.24 (https://go.dev/dl/) or put a" \
       "kustomize $version binary at $bin" >&2
  exit 1
fi

mkdir -p "$cache/bin"
tmp=$(mktemp -d "$cache/bin/.kustomize-XXXXXX")
trap 'rm -rf "$tmp"' EXIT
echo "install-kustomize: building sigs.k8s.io/kustomize/kustomize/v5@$version with $(go version)" >&2
# Run outside any Go module so the repository's files cannot influence the build; CGO off for a static binary.
(cd "$tmp" && CGO_ENABLED=0 GOBIN="$tmp" GOFLAGS=-trimpath go install "sigs.k8s.io/kustomize/kustomize/v5@$version") >&2
mv -f "$tmp/kustomize" "$bin"  # atomic within one directory: concurrent runs never see a partial binary
echo "install-kustomize: installed $("$bin" version) at $bin" >&2
echo "$bin"
