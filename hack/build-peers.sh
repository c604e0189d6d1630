#!/usr/bin/env bash
# Builds the programs the benchmarks compare safe-detach with, from the pinned Go module in peers/
# into .local/bin: the Kubernetes CSI external-attacher (`csi-attacher`). Skips the build when a
# stamp over peers/go.mod, peers/go.sum and this script matches and the binary exists.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bin="$root/.local/bin"
mkdir -p "$bin"
cd "$root/peers"

attacher=github.com/kubernetes-csi/external-attacher/v4
version=$(go list -m -f '{{.Version}}' "$attacher")
want=$(cat go.mod go.sum "$root/hack/build-peers.sh" | sha256sum | cut -d' ' -f1)
stamp="$bin/.peers.stamp"

step() { printf '==> %s\n' "$*"; }

if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" && -x "$bin/csi-attacher" ]]; then
  echo "peer binaries are up to date (csi-attacher $version)"
else
  step "building csi-attacher $version (cold: a few minutes on 2 cores; later: seconds)"
  go build -o "$bin/csi-attacher" -ldflags "-X main.version=$version" "$attacher/cmd/csi-attacher"
  echo "$want" > "$stamp"
  echo "built $bin/csi-attacher"
fi
