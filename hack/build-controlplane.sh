#!/usr/bin/env bash
# Builds the local control plane (kube-apiserver, etcd, and a matching kubectl) and the CSI test programs
# (the Kubernetes project's mock CSI plugin, csi-sanity) from the pinned Go module in controlplane/ into
# .local/bin. Skips the build when go.mod, go.sum, the module's own sources and this script are unchanged.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bin="$root/.local/bin"
mkdir -p "$bin"
cd "$root/controlplane"

k8s_version=$(go list -m -f '{{.Version}}' k8s.io/kubernetes)
stamp="$bin/.controlplane.stamp"
want=$(cat go.mod go.sum cmd/*/*.go "$root/hack/build-controlplane.sh" | sha256sum | cut -d' ' -f1)
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" && -x "$bin/kube-apiserver" && -x "$bin/etcd" && -x "$bin/kubectl" \
      && -x "$bin/csi-mock-plugin" && -x "$bin/csi-sanity" ]]; then
  echo "control plane binaries are up to date ($k8s_version)"
  exit 0
fi

minor=$(echo "$k8s_version" | cut -d. -f2)
ldflags="-X k8s.io/component-base/version.gitVersion=$k8s_version"
ldflags+=" -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=$minor"
echo "building kube-apiserver, kubectl $k8s_version and etcd (a cold build takes many minutes)"
go build -o "$bin/kube-apiserver" -ldflags "$ldflags" k8s.io/kubernetes/cmd/kube-apiserver
go build -o "$bin/etcd" go.etcd.io/etcd/server/v3
go build -o "$bin/kubectl" -ldflags "$ldflags" k8s.io/kubernetes/cmd/kubectl
go build -o "$bin/csi-mock-plugin" ./cmd/csi-mock-plugin
go build -o "$bin/csi-sanity" github.com/kubernetes-csi/csi-test/v5/cmd/csi-sanity
echo "$want" > "$stamp"
