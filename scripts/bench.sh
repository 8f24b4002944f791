#!/usr/bin/env bash
# Every side-by-side benchmark of the project, ROUNDS rounds each (default 5), then the results
# as JSON (target/bench/results.json) and a Markdown table (target/bench/results.md) with the
# machine they ran on; `--readme` also puts the table in README.md's "Performance" section.
#
#   sudo scripts/bench.sh [--readme] [BENCH...]
#
# BENCH: any of the names below (default: all), in that order. Each bench prints its own text
# (kept in target/bench/<bench>.txt) and appends its figures to target/bench/figures.jsonl
# (BENCH_JSON; the shape is in tests/src/bench_report.rs); target/bench/runs.jsonl says how
# long each ran and whether it passed. A bench that fails is reported as failed and the others
# still run. Needs root (mounts, loop devices, runc, containerd, QEMU); installs what it needs
# with scripts/setup.sh. The benches take a few more settings from the environment (see each
# file's header): LAYER_MB (containerd_pull), TREE_MB and FILE_MIB (unpack_vs_skopeo),
# STARTS, DATA_MB and READ_ROUNDS (microvm), IPUS and WINDOW_SECS (broker_fleet), WARM_ROUNDS (warm_start's starts, default 100),
# ATTEST_ROUNDS (attest_release's, default 200).
set -euo pipefail
cd "$(dirname "$0")/.."

all=(decrypt_throughput unpack_vs_skopeo cold_start containerd_pull warm_start attest_release
    microvm broker_fleet teardown_erase verify_bundle grant_verify rsa_oaep_timing append_query)
readme=""
selected=()
for a in "$@"; do
    case "$a" in
        --readme) readme=README.md ;;
        -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
        *)
            if [[ " ${all[*]} " != *" $a "* ]]; then
                echo "bench.sh: unknown bench $a (one of: ${all[*]})" >&2
                exit 2
            fi
            selected+=("$a")
            ;;
    esac
done
((${#selected[@]})) || selected=("${all[@]}")

if [ "$(id -u)" != 0 ]; then
    echo "bench.sh: needs root (mounts, loop devices, runc, containerd, QEMU)" >&2
    exit 2
fi
bash scripts/setup.sh

export ROUNDS=${ROUNDS:-5}
if ((ROUNDS < 5)); then
    echo "bench.sh: ROUNDS=$ROUNDS: figures from fewer than 5 rounds (a smoke run)" >&2
fi
out=target/bench
mkdir -p "$out"
figures=$out/figures.jsonl
runs=$out/runs.jsonl
: >"$figures"
: >"$runs"
export BENCH_JSON=$PWD/$figures
export TSS2_LOG=all+NONE

# The benches run the release binaries from target/release.
cargo build --release --workspace --bins --locked

# cargo bench ARGS for each bench; some take their sample counts from ROUNDS under other
# names (the starts of warm_start and attest_release, the append runs of append_query).
bench_args() {
    case "$1" in
        decrypt_throughput | rsa_oaep_timing) echo "-p ocicrypt --bench $1" ;;
        grant_verify) echo "-p policy --bench $1" ;;
        verify_bundle) echo "-p sigstore-verify --bench $1" ;;
        teardown_erase) echo "-p ipu-image-svc --bench $1" ;;
        append_query) echo "-p audit --bench $1" ;;
        *) echo "-p integration-tests --bench $1" ;;
    esac
}
bench_env() {
    case "$1" in
        warm_start) echo "ROUNDS=${WARM_ROUNDS:-100}" ;;
        attest_release) echo "ROUNDS=${ATTEST_ROUNDS:-200}" ;;
        append_query) echo "AUDIT_BENCH_SECS=${AUDIT_BENCH_SECS:-1}" ;;
        *) echo "" ;;
    esac
}

for b in "${selected[@]}"; do
    echo "== $b (ROUNDS=$ROUNDS $(bench_env "$b"))" >&2
    # Each bench starts from an empty page cache: with ten gigabytes cached from the previous
    # ones, this VM's memory reclaim made the containerd pulls up to 1.5x slower, whichever
    # side it hit.
    sync
    echo 3 >/proc/sys/vm/drop_caches || true
    started=$(date +%s)
    # shellcheck disable=SC2046 # word splitting wanted: the arguments and VAR=value pairs
    if env $(bench_env "$b") cargo bench --locked $(bench_args "$b") 2>"$out/$b.err" | tee "$out/$b.txt"; then
        status=ok
    else
        status=failed
        tail -n 20 "$out/$b.err" >&2
    fi
    took=$(($(date +%s) - started))
    echo "== $b: $status in ${took}s" >&2
    printf '{"bench":"%s","seconds":%d,"status":"%s"}\n' "$b" "$took" "$status" >>"$runs"
done

target/release/bench-report "$figures" "$runs" "$out" $readme
echo "bench.sh: $out/results.json, $out/results.md${readme:+, $readme}" >&2
