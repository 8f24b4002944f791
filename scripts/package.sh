#!/usr/bin/env bash
# Builds the Debian packages, one per daemon or tool, with cargo-deb:
#
#   keybroker      keybroker            + keybroker.service
#   ipu-image-svc  ipu-image-svc        + ipu-image-svc.service   (depends on e2fsprogs)
#   ipu-audit      audit                + ipu-audit.service
#   host-attach    host-attach, ipu-decrypt-hook (runc, libnbd-bin, fuse3, e2fsprogs, mount)
#   ipu-policy     policy
#   ocipub         ocipub
#
# Each has its man pages and bash, zsh and fish completions (generated first by `xtask docs`
# into dist/generated from the binaries' clap definitions), its documentation and example
# configuration (/usr/share/doc/<package>/examples/). What goes in each is the
# [package.metadata.deb] of its crate; the units are dist/systemd/.
#
# Usage: scripts/package.sh [--profile release|dev] [--no-build] [--fast] [--output DIR]
#   --profile   the Cargo profile whose binaries are packaged (default: release; `dev`
#               packages debug builds, which the test suite does to avoid a release build,
#               and cargo-deb warns about it)
#   --no-build  package the binaries already built for that profile
#   --fast      lighter compression (larger .deb files)
#   --output    where the .deb files go (default: target/debian)
# DEB_MAINTAINER overrides the Maintainer field.
#
# cargo-deb is installed once, pinned, into target/tools (unless that version is already on
# PATH), without its default features (LZMA and debug-id: no C library to build; xz-utils'
# xz compresses).
set -euo pipefail
cd "$(dirname "$0")/.."

CARGO_DEB_VERSION=3.8.0
profile=release
build=1
deb_args=()
output=target/debian
while (($#)); do
    case $1 in
        --profile) profile=$2; shift 2 ;;
        --no-build) build=0; shift ;;
        --fast) deb_args+=(--fast); shift ;;
        --output) output=$2; shift 2 ;;
        *) echo "package.sh: unknown argument $1" >&2; exit 2 ;;
    esac
done
if [ -n "${DEB_MAINTAINER:-}" ]; then deb_args+=(--maintainer "$DEB_MAINTAINER"); fi

target_dir=${CARGO_TARGET_DIR:-target}
case $profile in
    dev) profile_dir=debug ;;
    *) profile_dir=$profile ;;
esac

cargo_deb=""
for candidate in "$(command -v cargo-deb || true)" "$target_dir/tools/bin/cargo-deb"; do
    if [ -n "$candidate" ] && [ "$("$candidate" --version 2>/dev/null)" = "cargo-deb $CARGO_DEB_VERSION" ]; then
        cargo_deb=$candidate
        break
    fi
done
if [ -z "$cargo_deb" ]; then
    echo "package: installing cargo-deb $CARGO_DEB_VERSION into $target_dir/tools" >&2
    cargo install --quiet --locked --no-default-features --version "$CARGO_DEB_VERSION" \
        --root "$target_dir/tools" cargo-deb
    cargo_deb=$target_dir/tools/bin/cargo-deb
fi

if ((build)); then
    cargo build --locked --profile "$profile" --workspace --bins
fi

# Man pages and completions, from the same clap definitions the binaries parse with.
rm -rf dist/generated
"$target_dir/$profile_dir/xtask" docs --out dist/generated

mkdir -p "$output"
for crate in keybroker ipu-image-svc audit host-attach policy publisher; do
    # --no-build: everything was built above (or by the caller), in one cargo invocation.
    "$cargo_deb" --locked --no-build --profile "$profile" --strip -p "$crate" \
        --output "$output" "${deb_args[@]}"
done
