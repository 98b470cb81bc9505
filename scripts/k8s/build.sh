#!/usr/bin/env bash
# Builds kube-apiserver and etcd from Go modules (through the machine's Go
# module proxy; nothing else is downloaded) and caches the binaries by
# version outside the checkout, so only the first run pays.
#
#   scripts/k8s/build.sh          # prints the directory holding the binaries
#
# NATGW_CACHE (default /var/cache/natgw), K8S_VERSION, ETCD_VERSION override.
set -euo pipefail
K8S_VERSION=${K8S_VERSION:-1.34.10}
ETCD_VERSION=${ETCD_VERSION:-3.5.21}
CACHE=${NATGW_CACHE:-/var/cache/natgw}
BIN="$CACHE/bin"
mkdir -p "$BIN"
export GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS=-mod=mod

log() { echo "[k8s-build] $*" >&2; }

build_apiserver() {
  local out="$BIN/kube-apiserver-$K8S_VERSION"
  [ -x "$out" ] && return
  local work minor=${K8S_VERSION#1.}
  minor=${minor%%.*}
  work=$(mktemp -d)
  log "building kube-apiserver $K8S_VERSION in $work (cold: several minutes)"
  (
    cd "$work"
    go mod init natgw.invalid/kube-apiserver-build >/dev/null 2>&1
    # k8s.io/kubernetes requires its staging modules at v0.0.0 and replaces
    # them with local paths that are not in its module zip: point every one
    # at the published module of the same release.
    local gomod
    gomod=$(go mod download -json "k8s.io/kubernetes@v$K8S_VERSION" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')
    for m in $(sed -n 's|^[[:space:]]*\(k8s.io/[^ ]*\) => \./staging/src/.*|\1|p' "$gomod"); do
      go mod edit -replace="$m=$m@v0.${K8S_VERSION#1.}"
    done
    go mod edit -require="k8s.io/kubernetes@v$K8S_VERSION"
    printf '//go:build tools\n\npackage tools\n\nimport _ "k8s.io/kubernetes/cmd/kube-apiserver"\n' > tools.go
    go mod tidy >/dev/null 2>&1 || go mod tidy
    local v="-X k8s.io/component-base/version.gitVersion=v$K8S_VERSION -X k8s.io/component-base/version.gitMajor=1"
    v="$v -X k8s.io/component-base/version.gitMinor=$minor -X k8s.io/client-go/pkg/version.gitVersion=v$K8S_VERSION"
    go build -trimpath -tags grpcnotrace -pgo=off -ldflags "-s -w $v" -o "$out.tmp" k8s.io/kubernetes/cmd/kube-apiserver
  )
  mv "$out.tmp" "$out"
  rm -rf "$work"
}

build_etcd() {
  local out="$BIN/etcd-$ETCD_VERSION"
  [ -x "$out" ] && return
  local work
  work=$(mktemp -d)
  log "building etcd $ETCD_VERSION in $work"
  (
    cd "$work"
    # A separate module: etcd's server must not share a version of
    # go.etcd.io/etcd/api with kube-apiserver's etcd client.
    go mod init natgw.invalid/etcd-build >/dev/null 2>&1
    go mod edit -require="go.etcd.io/etcd/server/v3@v$ETCD_VERSION"
    printf '//go:build tools\n\npackage tools\n\nimport _ "go.etcd.io/etcd/server/v3"\n' > tools.go
    go mod tidy >/dev/null 2>&1 || go mod tidy
    go build -trimpath -ldflags "-s -w" -o "$out.tmp" go.etcd.io/etcd/server/v3
  )
  mv "$out.tmp" "$out"
  rm -rf "$work"
}

command -v go >/dev/null || { echo "go is missing: the Go toolchain builds kube-apiserver and etcd" >&2; exit 1; }
command -v openssl >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssl >/dev/null; }
build_etcd
build_apiserver
ln -sf "kube-apiserver-$K8S_VERSION" "$BIN/kube-apiserver"
ln -sf "etcd-$ETCD_VERSION" "$BIN/etcd"
echo "$BIN"
