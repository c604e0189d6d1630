#!/usr/bin/env bash
# Installs what a fresh machine lacks for the tests and the demo: QEMU's storage daemon and tools.
set -euo pipefail
if ! command -v qemu-storage-daemon >/dev/null || ! command -v qemu-io >/dev/null; then
  echo "installing qemu-utils and qemu-system-common (qemu-img, qemu-io, qemu-storage-daemon)"
  export DEBIAN_FRONTEND=noninteractive
  sudo=""; [[ $(id -u) -eq 0 ]] || sudo="sudo"
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq qemu-utils qemu-system-common >/dev/null
fi
