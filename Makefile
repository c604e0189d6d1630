# The two commands a newcomer needs: `make run` (the main job) and `make test` (everything).
.PHONY: run stop test lint fmt unit e2e crds cluster cluster-down backend setup

run:
	hack/run.sh

stop:
	-[ -f .local/operator.pid ] && kill $$(cat .local/operator.pid) 2>/dev/null; rm -f .local/operator.pid
	hack/backend.sh down
	hack/cluster.sh down

test: lint setup cluster
	cargo test --lib --bins --tests

lint:
	cargo fmt --all -- --check
	cargo clippy --all-targets -- -D warnings

fmt:
	cargo fmt --all

unit:
	cargo test --lib

e2e: setup cluster
	cargo test --tests

crds:
	cargo run --quiet -- crds > crds/safedetach.io.yaml

setup:
	hack/setup.sh

cluster:
	hack/cluster.sh up

cluster-down:
	hack/cluster.sh down
