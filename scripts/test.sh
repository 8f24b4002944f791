#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit, property, integration and
# negative-path security tests. This is what CI runs (.ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# Disk: CI's machine has a few GB free. A one-shot build gains nothing from incremental
# caches, and debug info is a third of every test binary (a panic still names its file and
# line without it). Each is kept when set by the caller.
export CARGO_INCREMENTAL=${CARGO_INCREMENTAL:-0}
export CARGO_PROFILE_DEV_DEBUG=${CARGO_PROFILE_DEV_DEBUG:-false}

cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# The end-to-end tests drive the binaries (ocipub, keybroker, ipu-image-svc, host-attach, ...),
# which `cargo test` builds only for packages that have integration tests of their own.
cargo build --workspace --locked --bins
# The sigstore-conformance bundle-verify suite (all 70 cases) through its own client protocol.
bash tests/fixtures/sigstore-conformance/run.sh target/debug/policy sigstore
cargo test --workspace --locked
# The broker end-to-end suite again with the broker's state in PostgreSQL instead of sled
# (a throwaway cluster per test; root only, as every PostgreSQL test: it runs as `postgres`).
if [ "$(id -u)" = 0 ]; then
    KEYBROKER_TEST_STORE=postgres cargo test --locked -p integration-tests --test broker_e2e
else
    echo "skipped: the broker suite on PostgreSQL (needs root)"
fi
# The fuzz targets compile (scripts/fuzz.sh builds and runs them for a bounded time): checked,
# not built, which writes metadata only.
cargo check --manifest-path fuzz/Cargo.toml --locked --target-dir target/fuzz-check --bins
