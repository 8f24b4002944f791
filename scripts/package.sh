#!/usr/bin/env bash
# Builds the Debian packages, one per daemon or tool, with cargo-deb:
#
#   keybroker      keybroker            + keybroker.service
#   ipu-image-svc  ipu-image-svc        + ipu-image-svc.service
#   ipu-audit      audit                + ipu-audit.service
#   host-attach    host-attach, ipu-decrypt-hook (runc, fuse3, e2fsprogs, mount)
#   ipu-policy     policy
#   ocipub         ocipub
#
# Each has its man pages and bash, zsh and fish completions (generated first by `xtask docs`
# into dist/generated from the binaries' clap definitions), its documentation and example
# configuration (/usr/share/doc/<package>/examples/). What goes in each is the
# [package.metadata.deb] of its crate; the units are dist/systemd/.
#
# Usage: scripts/package.sh [--profile release|dev] [--no-build] [--fast] [--output DIR]
#                           [--allow-failpoints]
#        scripts/package.sh --install-cargo-deb
#   --profile   the Cargo profile whose binaries are packaged (default: release; `dev`
#               packages debug builds, which the test suite does to avoid a release build,
#               and cargo-deb warns about it)
#   --no-build  package the binaries already built for that profile
#   --fast      lighter compression (larger .deb files)
#   --output    where the .deb files go (default: target/debian)
#   --allow-failpoints
#               package an ipu-image-svc built with the test-only `failpoints` feature (what
#               `cargo build --workspace` gives, since the integration tests turn it on): the
#               test suite does, with --no-build. Without it such a binary is refused. Never
#               for packages that are shipped.
#   --install-cargo-deb
#               only install cargo-deb (scripts/setup.sh does, so that the tests need no
#               crates.io access of their own)
# DEB_MAINTAINER overrides the Maintainer field.
#
# The build selects the packaged crates only (-p ...), not the workspace: `--workspace`
# would unify the integration tests' `failpoints` feature into ipu-image-svc.
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
allow_failpoints=0
install_only=0
while (($#)); do
    case $1 in
        --profile) profile=$2; shift 2 ;;
        --no-build) build=0; shift ;;
        --fast) deb_args+=(--fast); shift ;;
        --output) output=$2; shift 2 ;;
        --allow-failpoints) allow_failpoints=1; shift ;;
        --install-cargo-deb) install_only=1; shift ;;
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
if ((install_only)); then exit 0; fi

# The crates packaged (their [package.metadata.deb]), and xtask for the man pages.
crates=(keybroker ipu-image-svc audit host-attach policy publisher)
if ((build)); then
    selection=()
    for crate in "${crates[@]}" xtask; do selection+=(-p "$crate"); done
    cargo build --locked --profile "$profile" --bins "${selection[@]}"
fi

# The fail points (the crash tests pause the service at them, FAILPOINTS=...) are
# compiled in only with the `failpoints` feature; their names are then in the binary.
if ((!allow_failpoints)) && grep -q -a -F prepare-before-export "$target_dir/$profile_dir/ipu-image-svc"; then
    echo "package: $target_dir/$profile_dir/ipu-image-svc is built with the test-only failpoints feature" >&2
    echo "package: (cargo build --workspace does that); build without --no-build, or pass --allow-failpoints for a test package" >&2
    exit 1
fi

# Man pages and completions, from the same clap definitions the binaries parse with.
rm -rf dist/generated
"$target_dir/$profile_dir/xtask" docs --out dist/generated

mkdir -p "$output"
for crate in "${crates[@]}"; do
    # --no-build: everything was built above (or by the caller), in one cargo invocation.
    "$cargo_deb" --locked --no-build --profile "$profile" --strip -p "$crate" \
        --output "$output" "${deb_args[@]}"
done
