#!/usr/bin/env bash
# Builds the fuzz targets (fuzz/, a cargo-fuzz layout) with libFuzzer coverage
# instrumentation and runs each for a bounded time.
#
# Usage: scripts/fuzz.sh [SECONDS-PER-TARGET] [TARGET...]
#   SECONDS-PER-TARGET: default $FUZZ_SECONDS, else 30.
#   TARGET: default every target in fuzz/Cargo.toml.
#
# cargo-fuzz itself needs a nightly toolchain (for -Zsanitizer); this machine has stable only,
# so the script builds the same targets as cargo-fuzz would, on stable, without a sanitizer:
# libFuzzer's runtime (built by libfuzzer-sys, which needs a C++ compiler) with SanitizerCoverage
# instrumentation, debug assertions and overflow checks. `cargo fuzz run TARGET` works too where
# a nightly toolchain and cargo-fuzz are installed (FUZZ_WITH_CARGO_FUZZ=1 uses it).
# Seeds: docs/examples/policy for deploy_policy, small ones written here for the others.
# Findings go to target/fuzz/<target>/artifacts; the script fails if any target found one.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${1:-${FUZZ_SECONDS:-30}}
shift || true
targets=("$@")
if ((${#targets[@]} == 0)); then
    mapfile -t targets < <(sed -n 's/^name = "\(.*\)"$/\1/p' fuzz/Cargo.toml | grep -v '^ipu-fuzz$')
fi

seed() {
    local work=$1 t=$2
    case $t in
    deploy_policy) cp docs/examples/policy/*.toml "$work/corpus/" ;;
    nbd_server)
        # Mode byte, client flags, then: GO for the export and a read, write, trim, disconnect;
        # the same after STARTTLS; a flood of unknown options.
        printf '\x00\x00\x00\x00\x03IHAVEOPT\x00\x00\x00\x07\x00\x00\x00\x0d\x00\x00\x00\x07fn-fuzz\x00\x00%b' \
            '\x25\x60\x95\x13\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\x25\x60\x95\x13\x00\x00\x00\x01\x00\x00\x00\x00\x00\x00\x00\x02\x00\x00\x00\x00\x00\x00\x0f\xf0\x00\x00\x00\x04ABCD\x25\x60\x95\x13\x00\x00\x00\x04\x00\x00\x00\x00\x00\x00\x00\x03\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x10\x00\x25\x60\x95\x13\x00\x00\x00\x02\x00\x00\x00\x00\x00\x00\x00\x04\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00' \
            >"$work/corpus/go-and-io"
        printf '\x01\x00\x00\x00\x03IHAVEOPT\x00\x00\x00\x05\x00\x00\x00\x00\x16\x03\x01\x00\x05\x01\x00\x00\x01\x00' >"$work/corpus/starttls"
        { printf '\x00\x00\x00\x00\x03'; for _ in $(seq 40); do printf 'IHAVEOPT\x00\x00\x00\x63\x00\x00\x00\x00'; done; } >"$work/corpus/option-flood"
        ;;
    unpack_whiteouts)
        # KIND NAME [\x01 TARGET] entries, NUL-separated; kind 4 starts the second layer.
        printf '\x01a\x00\x00a/f\x00\x02l\x01..\x00\x04\x00\x00a/.wh.f\x00\x00.wh..\x00\x00l/.wh.x\x00\x00a/.wh..wh..opq\x00' >"$work/corpus/whiteouts"
        printf '\x02d\x01/\x00\x04\x00\x00d/.wh.etc\x00\x03h\x01d/x\x00\x00.wh...\x00' >"$work/corpus/symlinked"
        ;;
    vhost_blk_request)
        # Flags (complete), 3 descriptors: header at 0x1000 (16 bytes), data at 0x1010 (512,
        # writable), status at 0x1210 (1, writable); guest memory: an IN header for sector 1.
        { printf '\x02\x03\x00\x10\x00\x00\x10\x00\x00\x10\x10\x00\x00\x00\x02\x01\x10\x12\x00\x00\x01\x00\x01'
          printf '\x00\x00\x00\x00\x00\x00\x00\x00\x01\x00\x00\x00\x00\x00\x00\x00'
          head -c 600 /dev/zero; } >"$work/corpus/read"
        ;;
    esac
}

if [ "${FUZZ_WITH_CARGO_FUZZ:-0}" = 1 ]; then
    command -v cargo-fuzz >/dev/null || cargo install --locked cargo-fuzz
    for t in "${targets[@]}"; do
        work=target/fuzz/$t
        mkdir -p "$work/corpus" "$work/artifacts"
        seed "$work" "$t"
        (cd fuzz && cargo +nightly fuzz run "$t" "../$work/corpus" -- -max_total_time="$secs" -artifact_prefix="../$work/artifacts/")
    done
    exit 0
fi

export RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 -Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table -Cllvm-args=-sanitizer-coverage-trace-compares --cfg fuzzing -Cdebug-assertions -Coverflow-checks"
export CARGO_TARGET_DIR=target/fuzz-build
# An explicit --target keeps RUSTFLAGS off build scripts and proc-macros (as cargo-fuzz does).
host=$(rustc -vV | sed -n 's/^host: //p')
bins=()
for t in "${targets[@]}"; do bins+=(--bin "$t"); done
cargo build --release --locked --target "$host" --manifest-path fuzz/Cargo.toml "${bins[@]}"
found=0
for t in "${targets[@]}"; do
    work=target/fuzz/$t
    mkdir -p "$work/corpus" "$work/artifacts"
    seed "$work" "$t"
    echo "==> fuzzing $t for ${secs}s"
    if ! "$CARGO_TARGET_DIR/$host/release/$t" -max_total_time="$secs" -rss_limit_mb=2048 \
        -artifact_prefix="$work/artifacts/" "$work/corpus"; then
        echo "==> $t: a finding in $work/artifacts" >&2
        found=1
    fi
done
exit $found
