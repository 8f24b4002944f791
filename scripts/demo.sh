#!/usr/bin/env bash
# The main job end to end on embedded defaults: an operator sets up the key
# broker (TLS PKI, signed deployment policy, the IPU's TPM attestation key
# enrolled); a publisher builds an image from a busybox-static rootfs, encrypts
# it through the broker's key provider and signs it; the IPU service verifies
# it, attests with its TPM (swtpm here), gets the layer key from the broker,
# decrypts, unpacks, builds the encrypted base and a clone per function and
# exports it; the host agent runs the function in a microVM (or with runc without /dev/kvm), then
# tears it down (the clone is erased).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh

echo "==> building the tools (release)"
cargo build --release --locked -q -p ipu-image-svc -p publisher -p policy -p audit -p keybroker -p host-attach
bin=$PWD/target/release
demo=${DEMO_DIR:-$PWD/target/demo}
rm -rf "$demo"
mkdir -p "$demo"
cd "$demo"

pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
export TSS2_LOG=all+NONE

# A loopback port nothing listens on (and the next one, for swtpm's control channel).
free_port() {
    local p
    for p in $(shuf -i 20000-60000 -n 100); do
        if ! (exec 3<>/dev/tcp/127.0.0.1/$p) 2>/dev/null && ! (exec 3<>/dev/tcp/127.0.0.1/$((p + 1))) 2>/dev/null; then
            echo "$p"; return
        fi
    done
    echo "no free port" >&2; return 1
}

echo "==> IPU: a software TPM stands in for the IPU's TPM; its attestation key for enrollment"
tpm_port=$(free_port)
mkdir -p tpm
swtpm socket --tpm2 --tpmstate dir=tpm --flags not-need-init,startup-clear \
    --server type=tcp,port=$tpm_port,bindaddr=127.0.0.1 \
    --ctrl type=tcp,port=$((tpm_port + 1)),bindaddr=127.0.0.1 &
pids+=($!)
tcti="swtpm:host=127.0.0.1,port=$tpm_port"
for _ in $(seq 50); do "$bin/ipu-image-svc" tpm ak --tpm "$tcti" --output ak.tpmt 2>/dev/null && break; sleep 0.1; done
"$bin/ipu-image-svc" tpm ak --tpm "$tcti" --output ak.tpmt --ek-output ek.tpmt
pcrs=$("$bin/ipu-image-svc" tpm pcrs --tpm "$tcti" --pcrs 0,7)

echo "==> operator: a TLS PKI for the broker and the IPU (role = certificate OU)"
mkdir -p pki
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
    -subj "/CN=demo platform CA" -keyout pki/ca.key -out pki/ca.pem 2>/dev/null
issue() { # name subject [server]
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "$2" \
        -keyout "pki/$1.key" -out "pki/$1.csr" 2>/dev/null
    if [ "${3:-}" = server ]; then ext="subjectAltName=DNS:localhost,IP:127.0.0.1"; else ext="extendedKeyUsage=clientAuth"; fi
    openssl x509 -req -in "pki/$1.csr" -CA pki/ca.pem -CAkey pki/ca.key -CAcreateserial -days 2 \
        -extfile <(echo "$ext") -out "pki/$1.pem" 2>/dev/null
}
issue broker "/CN=keybroker.demo/OU=broker" server
issue ipu "/CN=ipu-1.demo/OU=ipu"

echo "==> operator: the deployment policy (IPU class PCRs, tenants, key rules), signed"
"$bin/ocipub" keygen --kind ec-p256 --out keys/signing
"$bin/policy" keygen --out keys/policy
# The control plane (scheduler) signs placement grants; the IPU acts only on them.
"$bin/policy" keygen --kind ed25519 --out keys/scheduler
cat > deployment.toml <<TOML
schema = 1
image_trust_policy = "image-trust.json"

[[ipu_class]]
name = "demo-ipu"
pcr_bank = "sha256"
$pcrs

# The demo tenant runs the hello function and may have its layer key...
[[tenant]]
name = "demo"
require_encryption = true
[[tenant.function]]
name = "hello"
images = ["oci:*"]

# ...a guest tenant may run images, but gets no key.
[[tenant]]
name = "guest"
[[tenant.function]]
name = "*"
images = ["oci:*"]

[[key]]
id = "demo-kek"
images = ["oci:*"]
tenants = ["demo"]
ipu_classes = ["demo-ipu"]

# Placement grants from the scheduler decide which tenant's function runs where.
[[grant_key]]
id = "scheduler"
public_key = """
$(cat keys/scheduler/pub.pem)
"""
tenants = ["*"]
TOML
cat > image-trust.json <<JSON
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
"$bin/policy" lint deployment.toml
"$bin/policy" sign --deployment deployment.toml --version 1 --key keys/policy/priv.pem --output policy.bundle

echo "==> operator: the key broker (mutual TLS for IPUs, a Unix socket for administration)"
broker_port=$(free_port)
cat > keybroker.toml <<TOML
state_dir = "broker"
bundle_keys = ["keys/policy/pub.pem"]
session_ttl = "5m"
[tls]
listen = "127.0.0.1:$broker_port"
cert = "pki/broker.pem"
key = "pki/broker.key"
client_ca = "pki/ca.pem"
[unix]
socket = "run/keybroker.sock"
TOML
"$bin/keybroker" serve --config keybroker.toml &
broker_pid=$!
pids+=($broker_pid)
for _ in $(seq 100); do [ -S run/keybroker.sock ] && break; sleep 0.1; done
kb() { "$bin/keybroker" --socket run/keybroker.sock "$@"; }
kb policy load policy.bundle
kb keys create --id demo-kek --kind ec-p256 >/dev/null
kb ipus enroll --id ipu-1 --class demo-ipu --ak-template ak.tpmt --ek-template ek.tpmt
kb keys list

echo "==> publisher: a busybox-static rootfs, built, encrypted through the broker's key provider, signed"
mkdir -p rootfs/bin rootfs/etc
cp /bin/busybox rootfs/bin/busybox
for applet in sh echo cat ls; do ln -s busybox "rootfs/bin/$applet"; done
printf '#!/bin/sh\necho "hello from the confidential demo image"\n' > rootfs/hello
chmod 0755 rootfs/hello
echo demo > rootfs/etc/image-id
"$bin/ocipub" build --rootfs rootfs --layout layout --tag plain --cmd /hello
cat > ocicrypt-keyprovider.json <<JSON
{"key-providers": {"ipubroker": {"cmd": {"path": "$bin/keybroker", "args": ["--socket", "$demo/run/keybroker.sock", "keyprovider"]}}}}
JSON
OCICRYPT_KEYPROVIDER_CONFIG=$demo/ocicrypt-keyprovider.json \
    "$bin/ocipub" encrypt --layout layout --tag plain --out-tag demo --recipient provider:ipubroker:demo-kek
"$bin/ocipub" sign --layout layout --tag demo --key keys/signing/priv.pem \
    --identity demo.example/confidential/hello

echo "==> policy check"
"$bin/policy" check --policy image-trust.json "oci:$demo/layout:demo"

echo "==> IPU: verify the signature (the CLI; the service does it again on every start)"
"$bin/ipu-image-svc" image verify --audit-log verify-audit --policy image-trust.json "oci:$demo/layout:demo"

echo "==> IPU: ipu-image-svc serve (its API and the per-function exports on local sockets)"
"$bin/ipu-image-svc" serve --state-dir ipu-state --socket run/ipu-api.sock --host-agent-uid "$(id -u)" \
    --clone-ttl 10m --policy-bundle policy.bundle --bundle-key keys/policy/pub.pem --bundle-state ipu-policy \
    --cache cache --audit-log audit \
    --broker "https://127.0.0.1:$broker_port" --broker-name localhost --broker-ca pki/ca.pem \
    --broker-cert pki/ipu.pem --broker-key pki/ipu.key --tpm "$tcti" &
svc_pid=$!
pids+=($svc_pid)
for _ in $(seq 100); do [ -S run/ipu-api.sock ] && break; sleep 0.1; done

image="oci:$demo/layout:demo"
echo "==> control plane: placement grants (tenant, function, image, IPU, host, 10 minutes, a serial)"
mkdir -p grants
grant() { # NAME TENANT IPU [extra policy grant issue options]
    local name=$1 tenant=$2 ipu=$3
    shift 3
    "$bin/policy" grant issue --key keys/scheduler/priv.pem --tenant "$tenant" --function hello \
        --image "$image" --ipu "$ipu" --host host-1.demo --out "grants/$name.grant" "$@"
}
grant demo demo ipu-1
grant guest guest ipu-1
grant other-ipu demo ipu-2
grant expired demo ipu-1 --not-before "$(date -u -d '-2 hours' +%Y-%m-%dT%H:%M:%SZ)" --valid-for 1h
"$bin/policy" grant inspect grants/demo.grant

# The function's sandbox: a microVM when this host has /dev/kvm (and setup.sh's QEMU and
# kernel), its disk the clone as a vhost-user-blk device; runc on this host's kernel otherwise.
# host-attach says whether the VM runs on KVM or, where KVM cannot run Debian's kernel, TCG.
if [ -c /dev/kvm ] && command -v qemu-system-x86_64 >/dev/null && [ -f /opt/ipu-image-tools/microvm/vmlinuz ]; then
    sandbox=(--vm)
    path="boots a microVM whose disk is the clone (a hot-plugged vhost-user-blk device), runs it
    there, hot-removes the device at exit"
else
    sandbox=()
    path="mounts it (NBD), runs it with runc (no /dev/kvm for a microVM here)"
fi
echo "==> host: run the function with its grant. The IPU checks the grant, verifies the signature,"
echo "    attests to the broker, decrypts the layer with the released key, builds the encrypted"
echo "    base and a clone, and exports it; the host agent $path,"
echo "    and tears it down (the clone is erased)"
"$bin/host-attach" run "${sandbox[@]}" --api run/ipu-api.sock --tenant demo --function hello --grant grants/demo.grant \
    --workdir "$demo/host" "$image"

refused() { # WHAT, then the host-attach run arguments: must not start (exit code 125)
    local what=$1
    shift
    echo "==> $what: refused, nothing starts"
    set +e
    "$bin/host-attach" run --api run/ipu-api.sock --function hello --workdir "$demo/host" "$@" "$image"
    rc=$?
    set -e
    [ "$rc" = 125 ] || { echo "expected exit code 125 (not started), got $rc" >&2; exit 1; }
}
refused "a host naming tenant demo without a grant" --tenant demo
refused "a host replaying demo's grant (its serial is used)" --tenant demo --grant grants/demo.grant
refused "a host naming tenant demo with guest's grant" --tenant demo --grant grants/guest.grant
refused "a grant for another IPU" --tenant demo --grant grants/other-ipu.grant
refused "an expired grant" --tenant demo --grant grants/expired.grant
refused "tenant guest, granted, but the broker refuses it the key" --tenant guest --grant grants/guest.grant

echo "==> an unsigned image is refused (exit code 3)"
set +e
"$bin/ipu-image-svc" image verify --audit-log verify-audit --policy image-trust.json "oci:$demo/layout:plain"
rc=$?
set -e
[ "$rc" = 3 ] || { echo "expected exit code 3, got $rc" >&2; exit 1; }

kb ipus list
echo "==> the broker's audit trail: enrollment, key wrap, activation, attestations, the grant and the denial"
kill "$broker_pid"; wait "$broker_pid" || true   # it owns its log while it runs
"$bin/audit" query --log broker/audit
"$bin/audit" verify --log broker/audit --key broker/audit/verifier.pub
echo "==> the IPU's audit trail of these runs, and the log verified against its key"
kill "$svc_pid"; wait "$svc_pid" || true
"$bin/audit" query --log audit
"$bin/audit" verify --log audit --key audit/verifier.pub
"$bin/audit" prove --log audit --index 0 --output proof.json
"$bin/audit" verify-proof --proof proof.json --key audit/verifier.pub
echo "==> demo finished (state under $demo)"
