#!/usr/bin/env bash
# Builds the local control plane (kube-apiserver, etcd, and a matching kubectl) from the pinned Go
# module in controlplane/ into .local/bin; with `--with-test-programs`, also the programs only the
# tests use (the Kubernetes project's mock CSI plugin, csi-sanity). Skips what is up to date: each
# set has its own stamp over go.mod, go.sum, the module's own sources and this script.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bin="$root/.local/bin"
mkdir -p "$bin"
cd "$root/controlplane"

k8s_version=$(go list -m -f '{{.Version}}' k8s.io/kubernetes)
want=$(cat go.mod go.sum cmd/*/*.go "$root/hack/build-controlplane.sh" | sha256sum | cut -d' ' -f1)
minor=$(echo "$k8s_version" | cut -d. -f2)
ldflags="-X k8s.io/component-base/version.gitVersion=$k8s_version"
ldflags+=" -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$minor"

# up_to_date STAMP BINARY...: whether the stamp matches and every binary exists.
up_to_date() {
  local stamp=$1; shift
  [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]] || return 1
  for binary in "$@"; do [[ -x "$bin/$binary" ]] || return 1; done
}

step() { printf '==> %s\n' "$*"; }

if up_to_date "$bin/.controlplane.stamp" kube-apiserver etcd kubectl; then
  echo "control plane binaries are up to date ($k8s_version)"
else
  step "building kube-apiserver $k8s_version (cold: 10-20 minutes on 2 cores, about 1.5 GB of Go modules; later: seconds)"
  go build -o "$bin/kube-apiserver" -ldflags "$ldflags" k8s.io/kubernetes/cmd/kube-apiserver
  step "building etcd (cold: a few minutes)"
  go build -o "$bin/etcd" go.etcd.io/etcd/server/v3
  step "building kubectl $k8s_version (cold: a few minutes)"
  go build -o "$bin/kubectl" -ldflags "$ldflags" k8s.io/kubernetes/cmd/kubectl
  echo "$want" > "$bin/.controlplane.stamp"
fi

if [[ "${1:-}" == "--with-test-programs" ]]; then
  if up_to_date "$bin/.test-programs.stamp" csi-mock-plugin csi-sanity; then
    echo "test programs are up to date"
  else
    step "building the mock CSI plugin and csi-sanity (cold: a few minutes)"
    go build -o "$bin/csi-mock-plugin" ./cmd/csi-mock-plugin
    go build -o "$bin/csi-sanity" github.com/kubernetes-csi/csi-test/v5/cmd/csi-sanity
    echo "$want" > "$bin/.test-programs.stamp"
  fi
fi
