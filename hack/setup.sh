#!/usr/bin/env bash
# Installs what a fresh machine lacks for the tests and the demo: QEMU's storage daemon and tools.
set -euo pipefail
if ! command -v qemu-storage-daemon >/dev/null || ! command -v qemu-io >/dev/null; then
  echo "installing qemu-utils (qemu-storage-daemon, qemu-img, qemu-io)"
  export DEBIAN_FRONTEND=noninteractive
  sudo=""; [[ $(id -u) -eq 0 ]] || sudo="sudo"
  $sudo apt-get update -qq
  $sudo apt-get install -y -qq qemu-utils >/dev/null
fi
