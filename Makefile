# The two commands a newcomer needs: `make run` (the main job) and `make test` (everything).
.PHONY: run stop test lint fmt unit e2e crds cluster cluster-down backend setup test-programs

run:
	hack/run.sh

stop:
	-[ -f .local/operator.pid ] && kill $$(cat .local/operator.pid) 2>/dev/null; rm -f .local/operator.pid
	hack/backend.sh down
	hack/cluster.sh down

test: lint setup cluster test-programs
	cargo test --lib --bins --tests

lint:
	cargo fmt --all -- --check
	cargo clippy --all-targets -- -D warnings

fmt:
	cargo fmt --all

unit:
	cargo test --lib

e2e: setup cluster test-programs
	cargo test --tests

crds:
	cargo run --quiet -- crds > crds/safedetach.io.yaml

setup:
	hack/setup.sh

cluster:
	hack/cluster.sh up

# The programs only the tests use: the mock CSI plugin and csi-sanity.
test-programs:
	hack/build-controlplane.sh --with-test-programs

cluster-down:
	hack/cluster.sh down
