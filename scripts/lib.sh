# shellcheck shell=bash
# Shared by scripts/demo and scripts/test: install what is missing, using
# only the machine's own package clients.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

need_root() {
  if [ "$(id -u)" != 0 ]; then
    echo "natgw needs root: it creates network namespaces and programs nftables." >&2
    exit 1
  fi
}

# Debian packages natgw needs at run time and in tests.
ensure_packages() {
  local missing=()
  command -v nft >/dev/null || missing+=(nftables)
  command -v iptables >/dev/null || missing+=(iptables)
  command -v conntrack >/dev/null || missing+=(conntrack)
  command -v ip >/dev/null || missing+=(iproute2)
  # scripts/test checks the shell scripts.
  if [ "${1:-}" = --for-tests ]; then command -v shellcheck >/dev/null || missing+=(shellcheck); fi
  if [ ${#missing[@]} -gt 0 ]; then
    echo "installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
}

ensure_rust() {
  if ! command -v cargo >/dev/null; then
    echo "cargo is missing: install Rust (rustup) first" >&2
    exit 1
  fi
}

# rustfmt and clippy, which scripts/test runs before the tests.
ensure_rust_tools() {
  local missing=()
  cargo fmt --version >/dev/null 2>&1 || missing+=(rustfmt)
  cargo clippy --version >/dev/null 2>&1 || missing+=(clippy)
  if [ ${#missing[@]} -gt 0 ]; then
    if ! command -v rustup >/dev/null; then
      echo "cargo ${missing[*]} is missing and there is no rustup to add it" >&2
      exit 1
    fi
    rustup component add "${missing[@]}"
  fi
}

# The values deploy/ is rendered with (scripts/render and its staleness test).
# shellcheck disable=SC2034 # used by the scripts that source this file
DEPLOY_VALUES="--set createNamespace=true --set egress.enabled=true --set clusterNetworks={10.244.0.0/16,10.96.0.0/12}"

# helm, built from Go modules and cached by version (scripts/k8s/build.sh).
helm_bin() {
  echo "$(bash "$ROOT/scripts/k8s/build.sh" helm)/helm"
}
