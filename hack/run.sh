#!/usr/bin/env bash
# The main job: a local control plane, the demo storage backend, the CRDs, RBAC and examples, and
# the operator running under its own RBAC-bound identity. Idempotent; `make stop` ends it all.
# The demo operator leaves alone the objects of the end-to-end tests (label
# safedetach.io/test-shard), which run their own operators: `make test` can run beside it.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
kubectl="$root/.local/bin/kubectl --kubeconfig $root/.local/kubeconfig"

step() { printf '\n==> %s\n' "$*"; }

step "checking the QEMU tools (installs qemu-utils with apt on first use)"
hack/setup.sh
step "starting the local control plane (the first run builds it from Go modules: 10-20 minutes on 2 cores)"
hack/cluster.sh up
step "starting the demo storage backend (qemu-storage-daemon, three demo images)"
hack/backend.sh up
step "building the operator and its kubectl plugin (first build: about 5-8 minutes on 2 cores; later: seconds)"
cargo build --bin safe-detach --bin kubectl-safe_detach
# On the PATH the walk-through sets, where kubectl finds plugins.
install -D -m 0755 "${CARGO_TARGET_DIR:-target}/debug/kubectl-safe_detach" "$root/.local/bin/kubectl-safe_detach"

step "installing the CRDs, RBAC and the operator's identity"
$kubectl apply --server-side -f crds/safedetach.io.yaml >/dev/null
$kubectl wait --for condition=Established --timeout 60s \
  crd/volumes.safedetach.io crd/volumeattachments.safedetach.io >/dev/null
$kubectl apply --server-side -f deploy/namespace.yaml -f deploy/rbac.yaml >/dev/null

step "starting the operator (log: .local/operator.log) and applying deploy/examples"
pidfile="$root/.local/operator.pid"
if [[ -f "$pidfile" ]] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
  kill "$(cat "$pidfile")"; sleep 1
fi
KUBECONFIG="$root/.local/cluster/operator.kubeconfig" RUST_LOG="${RUST_LOG:-info,kube=warn}" \
  nohup "${CARGO_TARGET_DIR:-target}/debug/safe-detach" run --config "$root/.local/operator.yaml" \
  --selector '!safedetach.io/test-shard' \
  >"$root/.local/operator.log" 2>&1 &
echo $! > "$pidfile"

$kubectl apply --server-side -k deploy/examples >/dev/null
sleep 3
$kubectl get sdvol,sdva
cat <<DONE

safe-detach is running (log: .local/operator.log). Try:
  export KUBECONFIG=$root/.local/kubeconfig PATH=$root/.local/bin:\$PATH
  kubectl get sdva -w
  kubectl safe-detach status          # the plugin, from .local/bin (built in target/debug)
See README.md for the walk-through; 'make stop' stops everything.
DONE
