#!/usr/bin/env bash
# Builds the fuzz targets with libFuzzer coverage instrumentation (stable toolchain: no
# sanitizer) and runs each for a bounded time. Usage: scripts/fuzz.sh [SECONDS-PER-TARGET]
# Seeds come from docs/examples/policy; findings go to target/fuzz/<target>/artifacts.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-60}
export RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 -Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table -Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing -Cdebug-assertions -Coverflow-checks"
export CARGO_TARGET_DIR=target/fuzz-build
# An explicit --target keeps RUSTFLAGS off build scripts and proc-macros (as cargo-fuzz does).
host=$(rustc -vV | sed -n 's/^host: //p')
cargo build --release --target "$host" --manifest-path fuzz/Cargo.toml
for t in deploy_policy policy_bundle; do
    work=target/fuzz/$t
    mkdir -p "$work/corpus" "$work/artifacts"
    if [ "$t" = deploy_policy ]; then cp docs/examples/policy/*.toml "$work/corpus/"; fi
    echo "==> fuzzing $t for ${secs}s"
    "$CARGO_TARGET_DIR/$host/release/$t" -max_total_time="$secs" -artifact_prefix="$work/artifacts/" "$work/corpus"
done
