#!/usr/bin/env bash
# Builds Kubernetes programs from Go modules (through the machine's Go
# module proxy; nothing else is downloaded) and caches the binaries by
# version outside the checkout, so only the first run pays.
#
#   scripts/k8s/build.sh          # kube-apiserver and etcd (the API tests)
#   scripts/k8s/build.sh cluster  # also kubelet, kube-controller-manager,
#                                 # kube-scheduler, kube-proxy, kubectl, Multus
#   scripts/k8s/build.sh helm     # helm
#   (each prints the directory holding the binaries)
#
# NATGW_CACHE (default /var/cache/natgw), K8S_VERSION, ETCD_VERSION,
# MULTUS_VERSION, HELM_VERSION override.
set -euo pipefail
K8S_VERSION=${K8S_VERSION:-1.34.10}
ETCD_VERSION=${ETCD_VERSION:-3.5.21}
MULTUS_VERSION=${MULTUS_VERSION:-4.2.2}
HELM_VERSION=${HELM_VERSION:-3.19.0}
CACHE=${NATGW_CACHE:-/var/cache/natgw}
BIN="$CACHE/bin"
mkdir -p "$BIN"
export GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS=-mod=mod

log() { echo "[k8s-build] $*" >&2; }

# One wrapper module requiring k8s.io/kubernetes builds any of its
# commands: build_k8s kube-apiserver, build_k8s kubelet kube-proxy ...
build_k8s() {
  local wanted=() c
  for c in "$@"; do [ -x "$BIN/$c-$K8S_VERSION" ] || wanted+=("$c"); done
  [ ${#wanted[@]} = 0 ] && return
  local work minor=${K8S_VERSION#1.}
  minor=${minor%%.*}
  work=$(mktemp -d)
  log "building ${wanted[*]} $K8S_VERSION in $work (cold: several minutes)"
  (
    cd "$work"
    go mod init natgw.invalid/kubernetes-build >/dev/null 2>&1
    # k8s.io/kubernetes requires its staging modules at v0.0.0 and replaces
    # them with local paths that are not in its module zip: point every one
    # at the published module of the same release.
    local gomod
    gomod=$(go mod download -json "k8s.io/kubernetes@v$K8S_VERSION" | sed -n 's/.*"GoMod": "\(.*\)".*/\1/p')
    for m in $(sed -n 's|^[[:space:]]*\(k8s.io/[^ ]*\) => \./staging/src/.*|\1|p' "$gomod"); do
      go mod edit -replace="$m=$m@v0.${K8S_VERSION#1.}"
    done
    go mod edit -require="k8s.io/kubernetes@v$K8S_VERSION"
    {
      printf '//go:build tools\n\npackage tools\n\nimport (\n'
      for c in "${wanted[@]}"; do printf '\t_ "k8s.io/kubernetes/cmd/%s"\n' "$c"; done
      printf ')\n'
    } > tools.go
    go mod tidy >/dev/null 2>&1 || go mod tidy
    local v="-X k8s.io/component-base/version.gitVersion=v$K8S_VERSION -X k8s.io/component-base/version.gitMajor=1"
    v="$v -X k8s.io/component-base/version.gitMinor=$minor -X k8s.io/client-go/pkg/version.gitVersion=v$K8S_VERSION"
    mkdir out
    local pkgs=()
    for c in "${wanted[@]}"; do pkgs+=("k8s.io/kubernetes/cmd/$c"); done
    go build -trimpath -tags grpcnotrace -pgo=off -ldflags "-s -w $v" -o out/ "${pkgs[@]}"
  )
  for c in "${wanted[@]}"; do mv "$work/out/$c" "$BIN/$c-$K8S_VERSION"; done
  rm -rf "$work"
}

# A standalone Go command from a module at an exact version (the proxy may
# refuse to list versions, but serves an exact one).
build_go_command() {
  local out=$1 module=$2 version=$3 pkg=$4
  [ -x "$out" ] && return
  local work
  work=$(mktemp -d)
  log "building $pkg $version in $work"
  (
    cd "$work"
    go mod init natgw.invalid/command-build >/dev/null 2>&1
    go mod edit -require="$module@$version"
    printf '//go:build tools\n\npackage tools\n\nimport _ "%s"\n' "$pkg" > tools.go
    go mod tidy >/dev/null 2>&1 || go mod tidy
    go build -trimpath -ldflags "-s -w ${5:-}" -o "$out.tmp" "$pkg"
  )
  mv "$out.tmp" "$out"
  rm -rf "$work"
}

# etcd's server in a module of its own: it must not share a version of
# go.etcd.io/etcd/api with kube-apiserver's etcd client.
build_etcd() {
  build_go_command "$BIN/etcd-$ETCD_VERSION" go.etcd.io/etcd/server/v3 "v$ETCD_VERSION" go.etcd.io/etcd/server/v3
}

command -v go >/dev/null || { echo "go is missing: the Go toolchain builds kube-apiserver and etcd" >&2; exit 1; }
command -v openssl >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssl >/dev/null; }
# Helm's default Kubernetes version (for `template` and `lint`) is set at
# link time, as its Makefile does: the release of its client-go.
helm_kube_version() {
  local minor=${K8S_VERSION#1.}
  minor=${minor%%.*}
  local p
  for p in pkg/lint/rules pkg/chartutil; do
    printf -- '-X helm.sh/helm/v3/%s.k8sVersionMajor=1 -X helm.sh/helm/v3/%s.k8sVersionMinor=%s ' "$p" "$p" "$minor"
  done
}

case "${1:-}" in
  "")
    build_etcd
    build_k8s kube-apiserver
    ;;
  cluster)
    build_etcd
    build_k8s kube-apiserver kubelet kube-controller-manager kube-scheduler kube-proxy kubectl
    for c in kubelet kube-controller-manager kube-scheduler kube-proxy kubectl; do
      ln -sf "$c-$K8S_VERSION" "$BIN/$c"
    done
    build_go_command "$BIN/multus-$MULTUS_VERSION" gopkg.in/k8snetworkplumbingwg/multus-cni.v4 "v$MULTUS_VERSION" \
      gopkg.in/k8snetworkplumbingwg/multus-cni.v4/cmd/multus
    ln -sf "multus-$MULTUS_VERSION" "$BIN/multus"
    ;;
  helm)
    build_go_command "$BIN/helm-$HELM_VERSION" helm.sh/helm/v3 "v$HELM_VERSION" helm.sh/helm/v3/cmd/helm \
      "-X helm.sh/helm/v3/internal/version.version=v$HELM_VERSION $(helm_kube_version)"
    ln -sf "helm-$HELM_VERSION" "$BIN/helm"
    ;;
  *) echo "usage: $0 [cluster|helm]" >&2; exit 2 ;;
esac
ln -sf "kube-apiserver-$K8S_VERSION" "$BIN/kube-apiserver"
ln -sf "etcd-$ETCD_VERSION" "$BIN/etcd"
echo "$BIN"
