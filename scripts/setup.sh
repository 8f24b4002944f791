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
    ca-certificates
)

missing=()
for p in "${packages[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$p")
    fi
done

if ((${#missing[@]})); then
    echo "setup: installing ${missing[*]}" >&2
    SUDO=""
    if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# The packaged docker-registry service listens on all addresses; tests start
# their own instance bound to 127.0.0.1, so keep the packaged one stopped.
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet docker-registry 2>/dev/null; then
    systemctl stop docker-registry || true
fi

command -v cargo >/dev/null || { echo "setup: cargo not found; install a Rust toolchain" >&2; exit 1; }
