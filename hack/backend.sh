#!/usr/bin/env bash
# Starts and stops the demo storage backend: a qemu-storage-daemon with a QMP socket, an NBD
# socket and a few raw images, and writes the operator's driver configuration for it.
#
#   hack/backend.sh up     start (idempotent)
#   hack/backend.sh down   stop and delete the images
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
state="$root/.local/backend"
config="$root/.local/operator.yaml"

up() {
  mkdir -p "$state/images"
  if [[ -f "$state/qsd.pid" ]] && kill -0 "$(cat "$state/qsd.pid")" 2>/dev/null; then
    echo "storage daemon already running"
  else
    rm -f "$state/qmp.sock"
    qemu-storage-daemon --chardev "socket,id=m0,path=$state/qmp.sock,server=on,wait=off" \
      --monitor chardev=m0 >"$state/qsd.log" 2>&1 &
    echo $! > "$state/qsd.pid"
    for _ in $(seq 50); do [[ -S "$state/qmp.sock" ]] && break; sleep 0.1; done
    echo "storage daemon started; QMP at $state/qmp.sock"
  fi
  for image in demo-1 demo-2 demo-3; do
    [[ -f "$state/images/$image" ]] || qemu-img create -q -f raw "$state/images/$image" 64M
  done
  cat > "$config" <<CONFIG
defaultStuckAfter: 1m
resyncInterval: 30s
drivers:
  - name: nbd
    deadline: 10s
    nbd:
      qmpSocket: $state/qmp.sock
      nbdSocket: $state/nbd.sock
      imageDir: $state/images
CONFIG
}

down() {
  if [[ -f "$state/qsd.pid" ]]; then
    kill "$(cat "$state/qsd.pid")" 2>/dev/null || true
  fi
  rm -rf "$state" "$config"
  echo "storage daemon stopped"
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  *) echo "usage: $0 up|down" >&2; exit 2 ;;
esac
