#!/usr/bin/env bash
# Installs what the demo and the test suite need. Idempotent: installs only
# packages that are missing, and touches apt only when something is missing.
set -euo pipefail

packages=(
    e2fsprogs        # mkfs.ext4 -d, e2fsck, debugfs
    skopeo           # third-party ocicrypt peer for interop tests
    docker-registry  # a real OCI distribution registry on 127.0.0.1 for tests
    busybox-static   # the demo image's rootfs
    umoci            # third-party check that our images unpack
    pkg-config
    protobuf-compiler # protoc, for the gRPC definitions (api/)
    g++              # libFuzzer's runtime, built by the fuzz targets (fuzz/)
    swtpm            # a software TPM 2.0 per attestation test
    swtpm-tools      # swtpm_setup: EK certificates for test TPM states
    tpm2-tools       # cross-checks of quotes
    libtss2-dev      # tpm2-tss, linked by tss-esapi
    openssl          # the demo's TLS PKI for the key broker
    libnbd-bin       # nbdinfo, nbdcopy, nbdfuse: third-party NBD clients of the clone export
    fuse3            # nbdfuse's FUSE mounts (the host agent's attach without kernel nbd)
    qemu-utils       # qemu-img (a third-party NBD client), qemu-storage-daemon (TLS attach)
    runc             # the host agent runs functions with it
    containerd       # the decrypt hook's tests run a real containerd (ctr)
    postgresql       # the key broker's production store; tests run their own cluster
    ca-certificates
)

missing=()
for p in "${packages[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$p")
    fi
done

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

if ((${#missing[@]})); then
    echo "setup: installing ${missing[*]}" >&2
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# The packaged docker-registry service listens on all addresses; tests start
# their own instance bound to 127.0.0.1, so keep the packaged one stopped.
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet docker-registry 2>/dev/null; then
    systemctl stop docker-registry || true
fi


# cosign 3.1.1 for the tests of cosign 3 signatures (sigstore bundles on OCI referrers).
# Debian 12 has no cosign; Debian unstable has 3.1.1. It is fetched from Debian's archive
# with a private sources.list, package lists and cache (the system's apt configuration is
# not touched), and unpacked with dpkg-deb into COSIGN_DIR (default
# /opt/ipu-image-tools/cosign-3.1.1); the binary is COSIGN_DIR/usr/bin/cosign, which the
# tests look for (or $COSIGN). If it cannot be fetched, COSIGN_DIR.unavailable says why,
# and only then do the tests that need it skip.
COSIGN_VERSION=3.1.1
COSIGN_DIR=${COSIGN_DIR:-/opt/ipu-image-tools/cosign-$COSIGN_VERSION}
COSIGN_MIRROR=${COSIGN_DEBIAN_MIRROR:-http://deb.debian.org/debian}

# Prints why on failure. Downloads as the calling user; only the final move uses $SUDO.
fetch_cosign() {
    local work
    work=$(mktemp -d) || return 1
    # shellcheck disable=SC2064
    trap "rm -rf '$work'" RETURN
    mkdir -p "$work/lists/partial" "$work/cache/archives/partial" "$work/root" || return 1
    echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $COSIGN_MIRROR sid main" >"$work/sources.list"
    local apt_opts=(
        -o "Dir::Etc::sourcelist=$work/sources.list"
        -o Dir::Etc::sourceparts=/nonexistent
        -o "Dir::State::Lists=$work/lists"
        -o "Dir::Cache=$work/cache"
        -o APT::Sandbox::User="$(id -un)"
    )
    apt-get "${apt_opts[@]}" -qq --error-on=any update || { echo "apt-get update from $COSIGN_MIRROR sid failed"; return 1; }
    local version
    version=$(apt-cache "${apt_opts[@]}" madison cosign | awk -v v="$COSIGN_VERSION" '$3 ~ "^"v"-" {print $3; exit}')
    if [ -z "$version" ]; then
        echo "Debian sid has no cosign $COSIGN_VERSION (it has: $(apt-cache "${apt_opts[@]}" madison cosign | awk '{print $3}' | tr '\n' ' '))"
        return 1
    fi
    (cd "$work" && apt-get "${apt_opts[@]}" -qq download "cosign=$version") || { echo "apt-get download cosign=$version failed"; return 1; }
    dpkg-deb -x "$work"/cosign_*.deb "$work/root" || { echo "dpkg-deb -x failed"; return 1; }
    "$work/root/usr/bin/cosign" version >/dev/null 2>&1 || { echo "the unpacked cosign does not run"; return 1; }
    echo "$version" >"$work/root/DEBIAN-VERSION"
    $SUDO mkdir -p "$(dirname "$COSIGN_DIR")" &&
        $SUDO rm -rf "$COSIGN_DIR" "$COSIGN_DIR.tmp" &&
        $SUDO cp -a "$work/root" "$COSIGN_DIR.tmp" &&
        $SUDO mv "$COSIGN_DIR.tmp" "$COSIGN_DIR" || { echo "cannot install into $COSIGN_DIR"; return 1; }
}

if [ ! -x "$COSIGN_DIR/usr/bin/cosign" ] || [ ! -f "$COSIGN_DIR/DEBIAN-VERSION" ]; then
    echo "setup: fetching cosign $COSIGN_VERSION from Debian sid into $COSIGN_DIR" >&2
    if reason=$(fetch_cosign 2>&1); then
        $SUDO rm -f "$COSIGN_DIR.unavailable"
    else
        echo "setup: cosign $COSIGN_VERSION unavailable: $reason" >&2
        $SUDO mkdir -p "$(dirname "$COSIGN_DIR")"
        echo "$reason" | $SUDO tee "$COSIGN_DIR.unavailable" >/dev/null
    fi
fi

command -v cargo >/dev/null || { echo "setup: cargo not found; install a Rust toolchain" >&2; exit 1; }
