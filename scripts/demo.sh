#!/usr/bin/env bash
# The main job end to end on embedded defaults: a publisher builds, encrypts
# and signs an image from a busybox-static rootfs; the IPU service verifies it
# under a policy, decrypts and unpacks it, and builds the ext4 rootfs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh

echo "==> building the tools (release)"
cargo build --release --locked -q -p ipu-image-svc -p publisher -p policy -p audit
bin=$PWD/target/release
demo=${DEMO_DIR:-$PWD/target/demo}
rm -rf "$demo"
mkdir -p "$demo"
cd "$demo"

echo "==> publisher: keys, a busybox-static rootfs, build, encrypt, sign"
"$bin/ocipub" keygen --kind ec-p256 --out keys/signing
"$bin/ocipub" keygen --kind rsa-2048 --out keys/layer
mkdir -p rootfs/bin rootfs/etc
cp /bin/busybox rootfs/bin/busybox
for applet in sh echo cat ls; do ln -s busybox "rootfs/bin/$applet"; done
printf '#!/bin/sh\necho "hello from the confidential demo image"\n' > rootfs/hello
chmod 0755 rootfs/hello
echo demo > rootfs/etc/image-id
"$bin/ocipub" build --rootfs rootfs --layout layout --tag plain --cmd /hello
"$bin/ocipub" encrypt --layout layout --tag plain --out-tag demo --recipient jwe:keys/layer/pub.pem
"$bin/ocipub" sign --layout layout --tag demo --key keys/signing/priv.pem \
    --identity demo.example/confidential/hello

cat > policy.json <<JSON
{
  "default": [{"type": "reject"}],
  "transports": {
    "oci": {
      "$demo/layout": [{
        "type": "sigstoreSigned",
        "keyPath": "$demo/keys/signing/pub.pem",
        "signedIdentity": {"type": "exactRepository", "dockerRepository": "demo.example/confidential/hello"}
      }]
    }
  }
}
JSON

echo "==> policy check"
"$bin/policy" check --policy policy.json "oci:$demo/layout:demo"

echo "==> IPU: verify the signature"
"$bin/ipu-image-svc" image verify --audit-log audit --policy policy.json "oci:$demo/layout:demo"

echo "==> IPU: pull, decrypt, unpack, build the ext4 rootfs"
"$bin/ipu-image-svc" image unpack --audit-log audit --tenant demo --function hello \
    --policy policy.json --cache cache \
    --decryption-key keys/layer/priv.pem --output rootfs.ext4 "oci:$demo/layout:demo"

echo "==> the rootfs, read back from the ext4 image"
debugfs -R 'ls -l /' rootfs.ext4 2>/dev/null
mkdir -p check
debugfs -R 'rdump / check' rootfs.ext4 2>/dev/null >/dev/null
chroot check /hello

echo "==> an unsigned image is refused (exit code 3)"
set +e
"$bin/ipu-image-svc" image verify --audit-log audit --policy policy.json "oci:$demo/layout:plain"
rc=$?
set -e
[ "$rc" = 3 ] || { echo "expected exit code 3, got $rc" >&2; exit 1; }

echo "==> the audit trail of these runs, and the log verified against its key"
"$bin/audit" query --log audit
"$bin/audit" verify --log audit --key audit/verifier.pub
"$bin/audit" prove --log audit --index 0 --output proof.json
"$bin/audit" verify-proof --proof proof.json --key audit/verifier.pub
echo "==> demo finished: $demo/rootfs.ext4"
