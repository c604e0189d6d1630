#!/usr/bin/env bash
# Starts and stops a local Kubernetes control plane: etcd and kube-apiserver on loopback, RBAC
# authorization on, static tokens for an admin and for the operator's service-account identity.
#
#   hack/cluster.sh up     start (idempotent) and write .local/kubeconfig
#   hack/cluster.sh down   stop and forget all state
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
state="$root/.local/cluster"
bin="$root/.local/bin"
kubeconfig="$root/.local/kubeconfig"
apiserver_port=${SAFE_DETACH_APISERVER_PORT:-16443}
etcd_port=${SAFE_DETACH_ETCD_PORT:-12379}
server="https://127.0.0.1:$apiserver_port"

# The operator's identity: the name a ServiceAccount token for deploy/'s ServiceAccount carries,
# so that deploy/'s ClusterRoleBinding applies to it unchanged.
operator_user="system:serviceaccount:safe-detach:safe-detach"

ready() {
  [[ -f "$state/admin.token" ]] &&
    curl -sf --max-time 2 --cacert "$state/ca.crt" \
      -H "Authorization: Bearer $(cat "$state/admin.token")" "$server/readyz" >/dev/null
}

# What the apiserver says is not ready (or why it does not answer).
not_ready() {
  curl -s --max-time 5 --cacert "$state/ca.crt" \
    -H "Authorization: Bearer $(cat "$state/admin.token" 2>/dev/null)" \
    "$server/readyz?verbose" | grep -v '^\[+\]' || echo "  (no answer within 5s)"
}

stop_pid() {
  local file=$1
  [[ -f "$file" ]] || return 0
  local pid
  pid=$(cat "$file")
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid"
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$file"
}

make_credentials() {
  mkdir -p "$state"
  [[ -f "$state/ca.crt" ]] && return 0
  local ec=(-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes)
  openssl req -x509 "${ec[@]}" -days 3650 -subj "/CN=safe-detach-local-ca" \
    -keyout "$state/ca.key" -out "$state/ca.crt" 2>/dev/null
  openssl req "${ec[@]}" -subj "/CN=kube-apiserver" \
    -keyout "$state/serving.key" -out "$state/serving.csr" 2>/dev/null
  openssl x509 -req -in "$state/serving.csr" -CA "$state/ca.crt" -CAkey "$state/ca.key" \
    -CAcreateserial -days 3650 -out "$state/serving.crt" -extfile <(printf '%s\n' \
      "subjectAltName=IP:127.0.0.1,DNS:localhost" "basicConstraints=CA:FALSE" \
      "keyUsage=digitalSignature,keyEncipherment" "extendedKeyUsage=serverAuth") 2>/dev/null
  openssl genrsa -out "$state/sa.key" 2048 2>/dev/null
  openssl rsa -in "$state/sa.key" -pubout -out "$state/sa.pub" 2>/dev/null
  openssl rand -hex 24 > "$state/admin.token"
  openssl rand -hex 24 > "$state/operator.token"
  {
    echo "$(cat "$state/admin.token"),admin,admin-uid,\"system:masters\""
    echo "$(cat "$state/operator.token"),$operator_user,operator-uid,\"system:serviceaccounts,system:serviceaccounts:safe-detach\""
  } > "$state/tokens.csv"
}

write_kubeconfig() {
  local file=$1 user=$2 token=$3
  cat > "$file" <<KUBECONFIG
apiVersion: v1
kind: Config
clusters:
- name: local
  cluster:
    server: $server
    certificate-authority-data: $(base64 -w0 < "$state/ca.crt")
users:
- name: $user
  user:
    token: $token
contexts:
- name: local
  context: {cluster: local, user: $user}
current-context: local
KUBECONFIG
}

# Whether the process of a pid file runs.
alive() {
  [[ -f "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null
}

up() {
  if ready; then
    echo "control plane already running at $server"
    return 0
  fi
  # Running but slow to answer (a busy machine): wait for it, and never restart it under the
  # processes that use it (a campaign or another test binary may be in the middle of a run).
  if alive "$state/kube-apiserver.pid" && alive "$state/etcd.pid"; then
    echo "control plane at $server runs but is not ready; waiting for it:" >&2
    not_ready >&2
    for _ in $(seq 300); do
      if ready; then
        echo "control plane running at $server"
        return 0
      fi
      sleep 1
    done
    echo "control plane at $server has not been ready for 300s:" >&2
    not_ready >&2
    echo "stop it with 'make cluster-down' and run again" >&2
    return 1
  fi
  "$root/hack/build-controlplane.sh"
  stop_pid "$state/kube-apiserver.pid"
  stop_pid "$state/etcd.pid"
  for port in "$apiserver_port" "$etcd_port" "$((etcd_port + 1))"; do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
      echo "port $port is taken by another process (another checkout's control plane?);" \
        "stop it, or set SAFE_DETACH_APISERVER_PORT / SAFE_DETACH_ETCD_PORT" >&2
      return 1
    fi
  done
  make_credentials
  mkdir -p "$state/logs"
  local started=$SECONDS

  "$bin/etcd" --name local --data-dir "$state/etcd" --unsafe-no-fsync \
    --listen-client-urls "http://127.0.0.1:$etcd_port" \
    --advertise-client-urls "http://127.0.0.1:$etcd_port" \
    --listen-peer-urls "http://127.0.0.1:$((etcd_port + 1))" \
    --initial-advertise-peer-urls "http://127.0.0.1:$((etcd_port + 1))" \
    --initial-cluster "local=http://127.0.0.1:$((etcd_port + 1))" \
    >"$state/logs/etcd.log" 2>&1 9>&- &
  echo $! > "$state/etcd.pid"

  "$bin/kube-apiserver" \
    --etcd-servers "http://127.0.0.1:$etcd_port" \
    --bind-address 127.0.0.1 --advertise-address 127.0.0.1 --secure-port "$apiserver_port" \
    --tls-cert-file "$state/serving.crt" --tls-private-key-file "$state/serving.key" \
    --client-ca-file "$state/ca.crt" \
    --service-cluster-ip-range 10.0.0.0/24 \
    --service-account-issuer https://kubernetes.default.svc \
    --service-account-key-file "$state/sa.pub" \
    --service-account-signing-key-file "$state/sa.key" \
    --token-auth-file "$state/tokens.csv" \
    --authorization-mode RBAC \
    --disable-admission-plugins ServiceAccount \
    --endpoint-reconciler-type none \
    >"$state/logs/kube-apiserver.log" 2>&1 9>&- &
  echo $! > "$state/kube-apiserver.pid"

  for _ in $(seq 600); do
    if ready; then
      write_kubeconfig "$kubeconfig" admin "$(cat "$state/admin.token")"
      write_kubeconfig "$state/operator.kubeconfig" safe-detach "$(cat "$state/operator.token")"
      echo "control plane ready at $server after $((SECONDS - started))s; kubeconfig: $kubeconfig"
      return 0
    fi
    for component in etcd kube-apiserver; do
      if ! kill -0 "$(cat "$state/$component.pid")" 2>/dev/null; then
        echo "$component exited; last lines of $state/logs/$component.log:" >&2
        tail -n 20 "$state/logs/$component.log" >&2
        return 1
      fi
    done
    sleep 0.2
  done
  echo "control plane not ready after 120s; see $state/logs" >&2
  return 1
}

down() {
  stop_pid "$state/kube-apiserver.pid"
  stop_pid "$state/etcd.pid"
  rm -rf "$state" "$kubeconfig"
  echo "control plane stopped"
}

# One caller at a time: test processes started side by side each bring the control plane up,
# and two starts racing would each kill what the other started. (The servers it starts do not
# inherit the lock: they close descriptor 9.)
mkdir -p "$root/.local"
exec 9>"$root/.local/cluster.lock"
flock 9

case "${1:-}" in
  up) up ;;
  down) down ;;
  *) echo "usage: $0 up|down" >&2; exit 2 ;;
esac
