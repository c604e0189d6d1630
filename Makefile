# The two commands a newcomer needs: `make run` (the main job) and `make test` (everything).
.PHONY: run stop test lint fmt unit e2e crds cluster cluster-down backend setup test-programs campaign bench bench-peer

run:
	hack/run.sh

stop:
	-[ -f .local/operator.pid ] && kill $$(cat .local/operator.pid) 2>/dev/null; rm -f .local/operator.pid
	hack/backend.sh down
	hack/cluster.sh down

test: setup lint cluster test-programs
	cargo test --lib --bins --tests

# Formatting, clippy, the docs' links (public and private items), and the dependencies' licenses and
# sources (deny.toml; `make setup` installs cargo-deny).
CARGO_DENY ?= $(firstword $(wildcard .local/tools/cargo-deny-*/bin/cargo-deny) cargo-deny)
lint:
	cargo fmt --all -- --check
	cargo clippy --all-targets -- -D warnings
	RUSTDOCFLAGS="-D warnings" cargo doc --no-deps --quiet
	RUSTDOCFLAGS="-D warnings" cargo doc --no-deps --quiet --document-private-items
	$(CARGO_DENY) --log-level error check licenses bans sources

fmt:
	cargo fmt --all

unit:
	cargo test --lib

e2e: setup cluster test-programs
	cargo test --tests

# The long fault-injecting campaign (docs/reliability.md): make campaign SCHEDULES=200 SEED=1000
SCHEDULES ?= 50
SEED ?= 1000
PARALLEL ?= 4
ACTIVE ?= 15
campaign: setup cluster
	CAMPAIGN_SCHEDULES=$(SCHEDULES) CAMPAIGN_SEED=$(SEED) CAMPAIGN_PARALLEL=$(PARALLEL) \
	CAMPAIGN_ACTIVE_SECS=$(ACTIVE) cargo test --test campaign long_campaign -- --ignored --nocapture

# Storms on the nbd driver against a release build (docs/benchmarks.md):
# make bench N=10000 SCENARIOS=attach,detach QUIET=300
N ?= 1000
SCENARIOS ?= attach,quiet,token,detach,stuck
QUIET ?= 300
TIMEOUT ?= 1800
bench: setup cluster
	BENCH_N=$(N) BENCH_SCENARIOS=$(SCENARIOS) BENCH_QUIET_SECS=$(QUIET) BENCH_TIMEOUT_SECS=$(TIMEOUT) \
	cargo bench --bench storm

# safe-detach's csi driver beside the CSI external-attacher on the same mock plugin:
# make bench-peer N=2000 (PEER_TIMEOUT: the most a phase of the attacher at its defaults may take)
PEER_TIMEOUT ?= 600
bench-peer: setup cluster test-programs
	hack/build-peers.sh
	BENCH_N=$(N) BENCH_PEER_TIMEOUT_SECS=$(PEER_TIMEOUT) cargo bench --bench peer

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
