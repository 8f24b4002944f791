#!/usr/bin/env bash
# Installs what the demo and the test suite need. Idempotent: installs only
# packages that are missing, and touches apt only when something is missing.
set -euo pipefail

packages=(
    e2fsprogs        # e2fsck, debugfs, resize2fs: checks of the images we build; mkfs.ext4 -d
    attr             # getfattr: the ext4-image tests read xattrs back through the kernel
    acl              # getfacl: ... and POSIX ACLs
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
    libnbd-bin       # nbdinfo, nbdcopy: third-party NBD clients of the clone export (tests)
    fuse3            # FUSE mounts (the host agent's attach without kernel nbd)
    qemu-utils       # qemu-img (a third-party NBD client), qemu-storage-daemon (TLS attach)
    runc             # the host agent runs functions with it
    containerd       # the decrypt hook's tests run a real containerd (ctr)
    postgresql       # the key broker's production store; tests run their own cluster
    ca-certificates
    systemd          # systemd-analyze verify and security on the daemons' units (dist/systemd)
    dpkg-dev         # dpkg-shlibdeps: cargo-deb's $auto dependencies (scripts/package.sh)
    xz-utils         # xz: cargo-deb compresses with it (installed without its LZMA feature)
    debootstrap      # the package test installs the .debs into a fresh minbase root
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

# fetch_debian_package SUITE PACKAGE VERSION_PREFIX DEST BINARY [ARG...]: fetches the newest
# PACKAGE of SUITE whose Debian version starts with VERSION_PREFIX from $DEBIAN_MIRROR with a
# private sources.list, package lists and cache (the system's apt configuration and its
# installed packages are not touched), unpacks it with dpkg-deb, checks that `BINARY ARG...`
# (a path in the package) runs here, and moves the tree to DEST (with DEST/DEBIAN-VERSION).
# DEST may contain `@UPSTREAM@`, replaced by the upstream version fetched (2.1.9 for
# 2.1.9+ds1-5). Prints why on failure. Downloads as the calling user; only the final move
# uses $SUDO.
DEBIAN_MIRROR=${DEBIAN_MIRROR:-${COSIGN_DEBIAN_MIRROR:-http://deb.debian.org/debian}}
DEBIAN_SECURITY_MIRROR=${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}

# private_apt WORK MODE SOURCE...: a private apt configuration under WORK (its sources.list of
# the SOURCE lines "MIRROR SUITE", package lists and cache), in the array APT_OPTS. MODE
# `download` also ignores the installed packages and downloads as the calling user (nothing
# is installed); `install` installs into this system.
private_apt() {
    local work=$1 mode=$2 line
    shift 2
    mkdir -p "$work/lists/partial" "$work/cache/archives/partial" || return 1
    : >"$work/sources.list"
    for line in "$@"; do
        echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $line main" >>"$work/sources.list"
    done
    APT_OPTS=(
        -o "Dir::Etc::sourcelist=$work/sources.list"
        -o Dir::Etc::sourceparts=/nonexistent
        -o "Dir::State::Lists=$work/lists"
        -o "Dir::Cache=$work/cache"
    )
    if [ "$mode" = download ]; then
        APT_OPTS+=(-o "Dir::State::status=/dev/null" -o APT::Sandbox::User="$(id -un)")
    fi
}

fetch_debian_package() {
    local suite=$1 package=$2 prefix=$3 dest=$4 binary=$5
    shift 5
    local work
    work=$(mktemp -d) || return 1
    # shellcheck disable=SC2064
    trap "rm -rf '$work'" RETURN
    mkdir -p "$work/root" || return 1
    private_apt "$work" download "$DEBIAN_MIRROR $suite" || return 1
    local apt_opts=("${APT_OPTS[@]}")
    apt-get "${apt_opts[@]}" -qq --error-on=any update || { echo "apt-get update from $DEBIAN_MIRROR $suite failed"; return 1; }
    local version
    # madison lists the newest first.
    version=$(apt-cache "${apt_opts[@]}" madison "$package" | awk -v v="$prefix" 'index($3, v) == 1 {print $3; exit}')
    if [ -z "$version" ]; then
        echo "Debian $suite has no $package $prefix* (it has: $(apt-cache "${apt_opts[@]}" madison "$package" | awk '{print $3}' | tr '\n' ' '))"
        return 1
    fi
    (cd "$work" && apt-get "${apt_opts[@]}" -qq download "$package=$version") || { echo "apt-get download $package=$version failed"; return 1; }
    dpkg-deb -x "$work/${package}_"*.deb "$work/root" || { echo "dpkg-deb -x failed"; return 1; }
    "$work/root/$binary" "$@" >/dev/null 2>&1 || { echo "the unpacked $binary ($package $version) does not run here"; return 1; }
    echo "$version" >"$work/root/DEBIAN-VERSION"
    local upstream=${version#*:}
    upstream=${upstream%%[~+-]*}
    dest=${dest//@UPSTREAM@/$upstream}
    $SUDO mkdir -p "$(dirname "$dest")" &&
        $SUDO rm -rf "$dest" "$dest.tmp" &&
        $SUDO cp -a "$work/root" "$dest.tmp" &&
        $SUDO mv "$dest.tmp" "$dest" || { echo "cannot install into $dest"; return 1; }
}

fetch_cosign() {
    fetch_debian_package sid cosign "$COSIGN_VERSION-" "$COSIGN_DIR" usr/bin/cosign version
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

# containerd 1.7 and 2.1 for the decrypt hook's tests (Debian 12's containerd 1.6 is the
# package above). containerd 2.1.x is in Debian unstable, 1.7.x in Debian 13 (trixie); both
# are fetched as cosign is (private apt configuration, dpkg-deb -x, nothing installed) into
# $IPU_TOOLS/containerd-<upstream version>/ (containerd, ctr and containerd-shim-runc-v2 in
# usr/bin). Their binaries need only libc >= 2.34 (`ldd`: libc.so.6 alone; Debian 12 has
# 2.36), so they run here as they are: no chroot, no extra libraries. They run containers
# with Debian 12's runc 1.1.5 (above): the sid/trixie runc packages need glibc 2.38, and
# containerd 2.1 does not need them (`ctr run` works with 1.1.5). When a version cannot be
# fetched, $IPU_TOOLS/containerd-<series>.unavailable says why, and only then do its tests
# skip. Idempotent: a series already unpacked (with DEBIAN-VERSION) is left alone.
IPU_TOOLS=${IPU_TOOLS:-/opt/ipu-image-tools}
for spec in "2.1 sid" "1.7 trixie"; do
    read -r series suite <<<"$spec"
    have=""
    for d in "$IPU_TOOLS/containerd-$series".*/; do
        case $d in *.tmp/) continue ;; esac
        if [ -x "$d/usr/bin/containerd" ] && [ -x "$d/usr/bin/ctr" ] && [ -f "$d/DEBIAN-VERSION" ]; then have=$d; fi
    done
    [ -n "$have" ] && continue
    echo "setup: fetching containerd $series.x from Debian $suite into $IPU_TOOLS/containerd-$series.*" >&2
    if reason=$(fetch_debian_package "$suite" containerd "$series." "$IPU_TOOLS/containerd-@UPSTREAM@" usr/bin/containerd --version 2>&1); then
        $SUDO rm -f "$IPU_TOOLS/containerd-$series.unavailable"
    else
        echo "setup: containerd $series unavailable: $reason" >&2
        $SUDO mkdir -p "$IPU_TOOLS"
        echo "$reason" | $SUDO tee "$IPU_TOOLS/containerd-$series.unavailable" >/dev/null
    fi
done

# The function microVM (`host-attach run --vm`): QEMU and a Debian kernel.
# qemu-system-x86 comes from bookworm-backports (10.0): Debian 12's own 7.2 `Breaks:` the
# qemu-utils 10.0 this machine kind carries, so installing it would remove qemu-img. It is
# installed for real (it has library dependencies) through a private sources.list of
# bookworm, its updates, security and backports; the system's apt configuration is untouched.
install_backports_qemu() {
    local work
    work=$(mktemp -d) || return 1
    # shellcheck disable=SC2064
    trap "rm -rf '$work'" RETURN
    private_apt "$work" install "$DEBIAN_MIRROR bookworm" "$DEBIAN_MIRROR bookworm-updates" \
        "$DEBIAN_MIRROR bookworm-backports" "$DEBIAN_SECURITY_MIRROR bookworm-security" || return 1
    local apt_opts=("${APT_OPTS[@]}")
    $SUDO apt-get "${apt_opts[@]}" -qq update || return 1
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get "${apt_opts[@]}" install -y -qq --no-install-recommends \
        -t bookworm-backports qemu-system-x86 >/dev/null
}
if ! command -v qemu-system-x86_64 >/dev/null 2>&1; then
    echo "setup: installing qemu-system-x86 from bookworm-backports" >&2
    install_backports_qemu || { echo "setup: qemu-system-x86 could not be installed" >&2; exit 1; }
fi

# The microVM's kernel and initramfs tree, in $IPU_TOOLS/microvm (host-attach's default
# --vm-assets): Debian 12's cloud kernel (the version linux-image-cloud-amd64 depends on
# today; ext4, the 8250 serial ports and ACPI PCI hot-plug built in), the virtio modules it
# needs, busybox-static, and resize2fs with the libraries it links. host-attach adds /init
# and the function's spec to that tree at each start. Idempotent: a tree with KERNEL-VERSION
# is left alone.
MICROVM_DIR="$IPU_TOOLS/microvm"
MICROVM_MODULES="virtio_pci virtio_blk"
fetch_microvm_assets() {
    local work
    work=$(mktemp -d) || return 1
    # shellcheck disable=SC2064
    trap "rm -rf '$work'" RETURN
    mkdir -p "$work/x" "$work/out/initramfs/bin" "$work/out/initramfs/lib/modules" || return 1
    private_apt "$work" download "$DEBIAN_MIRROR bookworm" "$DEBIAN_SECURITY_MIRROR bookworm-security" || return 1
    local apt_opts=("${APT_OPTS[@]}")
    apt-get "${apt_opts[@]}" -qq --error-on=any update || { echo "apt-get update failed"; return 1; }
    local image
    image=$(apt-cache "${apt_opts[@]}" depends linux-image-cloud-amd64 | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
    [ -n "$image" ] || { echo "linux-image-cloud-amd64 names no kernel package"; return 1; }
    (cd "$work" && apt-get "${apt_opts[@]}" -qq download "$image") || { echo "apt-get download $image failed"; return 1; }
    dpkg-deb -x "$work/${image}_"*.deb "$work/x" || { echo "dpkg-deb -x $image failed"; return 1; }
    local release=${image#linux-image-}
    cp "$work/x/boot/vmlinuz-$release" "$work/out/vmlinuz" || { echo "$image has no /boot/vmlinuz-$release"; return 1; }
    # The modules, with what they depend on (their .modinfo `depends=`), and the order the
    # init loads them in (dependencies first): lib/modules/load-order.
    local order=() seen=" "
    add_module() {
        local m=$1 ko dep
        case $seen in *" $m "*) return 0 ;; esac
        seen="$seen$m "
        ko=$(find "$work/x/lib/modules/$release/kernel" -name "$m.ko" | head -n1)
        [ -n "$ko" ] || { echo "$image has no $m.ko"; return 1; }
        for dep in $(tr '\0' '\n' <"$ko" | sed -n 's/^depends=//p' | tr ',' ' '); do
            add_module "$dep" || return 1
        done
        cp "$ko" "$work/out/initramfs/lib/modules/"
        order+=("$m")
    }
    for m in $MICROVM_MODULES; do add_module "$m" || return 1; done
    printf '%s\n' "${order[@]}" >"$work/out/initramfs/lib/modules/load-order"
    cp /bin/busybox "$work/out/initramfs/bin/busybox"
    # resize2fs grows the image's file system to the clone; with the libraries it links.
    local resize
    resize=$(command -v resize2fs || echo /sbin/resize2fs)
    mkdir -p "$work/out/initramfs/sbin"
    cp "$resize" "$work/out/initramfs/sbin/resize2fs"
    for lib in $(ldd "$resize" | awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}'); do
        mkdir -p "$work/out/initramfs$(dirname "$lib")"
        cp -L "$lib" "$work/out/initramfs$lib"
    done
    echo "$image $(dpkg-deb -f "$work/${image}_"*.deb Version)" >"$work/out/KERNEL-VERSION"
    $SUDO mkdir -p "$IPU_TOOLS" &&
        $SUDO rm -rf "$MICROVM_DIR" "$MICROVM_DIR.tmp" &&
        $SUDO cp -a "$work/out" "$MICROVM_DIR.tmp" &&
        $SUDO mv "$MICROVM_DIR.tmp" "$MICROVM_DIR" || { echo "cannot install into $MICROVM_DIR"; return 1; }
}
if [ ! -f "$MICROVM_DIR/KERNEL-VERSION" ]; then
    echo "setup: fetching the microVM kernel into $MICROVM_DIR" >&2
    reason=$(fetch_microvm_assets 2>&1) || { echo "setup: the microVM kernel could not be fetched: $reason" >&2; exit 1; }
fi

command -v cargo >/dev/null || { echo "setup: cargo not found; install a Rust toolchain" >&2; exit 1; }

# cargo-deb (pinned; scripts/package.sh and the package test use it), built from crates.io
# into ${CARGO_TARGET_DIR:-target}/tools once; the tests then need no crates.io access. The
# test's Debian minbase root is made by debootstrap from $DEBIAN_MIRROR on its first run and
# cached under the target directory (target/pkgtest-cache).
bash "$(dirname "$0")/package.sh" --install-cargo-deb
