//! containerd's decrypt hook end to end, with Debian's containerd started by each test with
//! its own root, state, socket and namespace, the fixture registry, and the IPU service in
//! process behind its Unix API socket, taking layer keys from the key broker through an
//! attested session (swtpm): `host-attach verify`, then `ctr pull` runs `ipu-decrypt-hook` for
//! each encrypted layer and `ctr run` prints the fixture's output. Then what must fail, and
//! how it shows.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use integration_tests::containerd::{verify, Containerd, Flavour, Ipu};
use integration_tests::{bin, fixtures, is_root, run_ok, Registry};

/// containerd (1.6, 1.7 and 2.1 alike) shows a processor's stderr when the processor's exit
/// wins the race against the end of its (empty) output; otherwise the diff service returns the
/// empty layer and the unpack fails on its diff id. How that shows depends on who unpacks:
/// `ctr pull` of 1.6 and 1.7 unpacks in the client (containerd's rootfs.ApplyLayers), which
/// names the diff id it computed, the empty layer's; `ctr pull` of 2.1 goes through the
/// transfer service, whose unpacker names the diff id it expected (the image config's).
/// Either way the pull fails; the hook's own line is checked directly in
/// `the_hooks_failure_is_one_line_and_exit_1`, and the IPU's record by each test.
const EMPTY_LAYER_DIFF_ID: &str =
    "wrong diff id calculated on extraction \"sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855\"";
/// The diff_id of an empty layer (SHA-256 of nothing).
const EMPTY_DIFF_ID: &str =
    "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
/// The diff_id of the `enc-signed` (and `zstd`) fixture's first layer, as 2.1's transfer
/// service names it when the hook's failure loses the race.
const ENC_SIGNED_DIFF_ID: &str =
    "sha256:b02c544e11e6b0f6bad701562e72f583b0d65e567f1fca858b0db65a7875532a";

/// Where a released layer's HMAC was checked (`hmac_checked`): on the IPU's own copy, fetched
/// after `Verify`, with the host's blob compared with it; as the host's blob arrived; or in a
/// pass over the host's blob once held.
const PREFETCHED: &str =
    "on the IPU's own copy, fetched after Verify (the host's blob compared with it)";
const ON_ARRIVAL: &str = "on arrival (recognised from its start)";
const OVER_STORED: &str = "over the stored blob";

fn shows_hook_failure(message: &str, hook_text: &[&str]) -> bool {
    message.contains(EMPTY_LAYER_DIFF_ID)
        || message.contains(&format!(
            "wrong diff id calculated on extraction \"{ENC_SIGNED_DIFF_ID}\""
        ))
        || (message.contains("ipu-decrypt-hook:") && hook_text.iter().all(|t| message.contains(t)))
}

/// The IPU under `d` with the `enc-signed` fixture's layout image verified for tenant acme,
/// function pull; and that image's first layer.
fn ipu_with_verified_layer(d: &Path) -> (Ipu, integration_tests::broker::EncSignedLayer) {
    let ipu = Ipu::start(d, "policy-A.json");
    let layer = integration_tests::broker::enc_signed_layer();
    let verified = verify(&ipu, "acme", "pull", &layer.image);
    assert!(verified.status.success(), "{}", text(&verified));
    (ipu, layer)
}

/// The IPU under `d` with the trust policy `policy`, and `tag` of the OCI layout `layout`
/// verified for tenant acme, function pull; and what `host-attach verify` printed.
fn ipu_with_layout_verified(d: &Path, policy: &Path, layout: &Path, tag: &str) -> (Ipu, Output) {
    let ipu = Ipu::start(d, policy.to_str().unwrap());
    let verified = verify(
        &ipu,
        "acme",
        "pull",
        &format!("oci:{}:{tag}", layout.display()),
    );
    assert!(verified.status.success(), "{}", text(&verified));
    (ipu, verified)
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// The main scenario on each containerd: Debian 12's 1.6, Debian 13's 1.7, and Debian
/// unstable's 2.1 (config version 3; `ctr pull` goes through its transfer service). 1.6 and
/// 2.1 with the IPU prefetching verified layers (the one-pass hook), 1.7 with the service's
/// default (the two-pass hook).
#[test]
fn encrypted_layers_are_decrypted_on_the_ipu_and_the_function_runs_containerd_1_6() {
    pull_and_run(Flavour::V1_6, Hook::OnePass);
}

#[test]
fn encrypted_layers_are_decrypted_on_the_ipu_and_the_function_runs_containerd_1_7() {
    pull_and_run(Flavour::V1_7, Hook::TwoPass);
}

#[test]
fn encrypted_layers_are_decrypted_on_the_ipu_and_the_function_runs_containerd_2_1() {
    pull_and_run(Flavour::V2_1, Hook::OnePass);
}

/// Which way the IPU serves the hook.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Hook {
    /// From its own copy of each verified layer, fetched after Verify (`--hook-prefetch`).
    OnePass,
    /// The service's default: the host's blob received whole, then decrypted.
    TwoPass,
}

/// Before `host-attach verify` the hook refuses the layer; after it, `enc-signed` (gzip) and
/// `zstd` pull through the hook, unpack and `ctr run` prints their `/hello`; the IPU's record
/// has one refusal and three layers released, each authenticated the way `hook` says.
fn pull_and_run(flavour: Flavour, hook: Hook) {
    if !is_root() {
        eprintln!("skipped: containerd needs root");
        return;
    }
    let Some(binaries) = flavour.binaries() else {
        return;
    };
    eprintln!("containerd: {}", binaries.version);
    let registry = Registry::start_fixtures();
    let dir = tempfile::tempdir().unwrap();
    let ipu = Ipu::start_with_options(dir.path(), "policy-A.json", |o| {
        if hook == Hook::TwoPass {
            o.hook_prefetch = ipu_image_svc::service::prefetch::DEFAULT_PREFETCH_LIMIT;
        }
    });
    let ctd = Containerd::start_with(&binaries, dir.path(), &ipu.api, "acme", "pull");
    let image = format!("{}/fixtures/hello:enc-signed", registry.host());

    // Not verified yet: the hook refuses, and says what to do.
    let refused = ctd.ctr("before", &["images", "pull", "--plain-http", &image]);
    assert!(!refused.status.success());
    let message = text(&refused);
    assert!(
        shows_hook_failure(
            &message,
            &["no stream processor payload", "verify the image first"]
        ),
        "{message}"
    );

    let verified = verify(&ipu, "acme", "pull", &format!("docker://{image}"));
    assert!(verified.status.success(), "{}", text(&verified));
    let pulled = ctd.ctr("ns1", &["images", "pull", "--plain-http", &image]);
    assert!(pulled.status.success(), "{}", text(&pulled));
    let ran = ctd.run_image("ns1", &image, "hello-1");
    assert!(ran.status.success(), "{}", text(&ran));
    assert_eq!(
        String::from_utf8_lossy(&ran.stdout),
        "hello from enc-signed\n"
    );
    // The zstd variant (skopeo-encrypted zstd layers) through the zstd processor.
    let zstd = format!("{}/fixtures/hello:zstd", registry.host());
    let verified = verify(&ipu, "acme", "pull", &format!("docker://{zstd}"));
    assert!(verified.status.success(), "{}", text(&verified));
    let pulled = ctd.ctr("ns1", &["images", "pull", "--plain-http", &zstd]);
    assert!(pulled.status.success(), "{}", text(&pulled));
    let ran = ctd.run_image("ns1", &zstd, "hello-2");
    assert!(ran.status.success(), "{}", text(&ran));
    assert_eq!(String::from_utf8_lossy(&ran.stdout), "hello from zstd\n");
    // One refused and three decrypted layers on the IPU's record: zstd's first layer has the
    // same diff_id as enc-signed's, so containerd reuses that snapshot instead of applying it.
    let outcomes = ipu.hook_decrypts();
    assert_eq!(
        outcomes.iter().filter(|o| *o == "success").count(),
        3,
        "{outcomes:?}"
    );
    assert_eq!(
        outcomes.iter().filter(|o| *o == "denied").count(),
        1,
        "{outcomes:?}"
    );
    // One pass: verified images' layers are fetched by the IPU after Verify and recognised
    // from the first bytes of containerd's blobs; each was decrypted from the IPU's own
    // authenticated copy as containerd streamed its blob, which was compared with that copy.
    // Two passes: each blob recognised from its first bytes was authenticated as
    // containerd streamed it.
    let first_pass = match hook {
        Hook::OnePass => PREFETCHED,
        Hook::TwoPass => ON_ARRIVAL,
    };
    assert_eq!(ipu.hook_hmac_checks(), [first_pass; 3]);
    if flavour == Flavour::V2_1 {
        // containerd 2's ctr pulls through the transfer service (the unpack runs in
        // containerd); `--local` unpacks in the client, as 1.x's ctr and Go clients do. In a
        // fresh namespace both of enc-signed's layers go through the hook again. The IPU's
        // copies were used once already: these are authenticated as they arrive.
        let pulled = ctd.ctr(
            "ns-local",
            &["images", "pull", "--local", "--plain-http", &image],
        );
        assert!(pulled.status.success(), "{}", text(&pulled));
        let ran = ctd.run_image("ns-local", &image, "hello-3");
        assert!(ran.status.success(), "{}", text(&ran));
        assert_eq!(
            String::from_utf8_lossy(&ran.stdout),
            "hello from enc-signed\n"
        );
        assert_eq!(
            ipu.hook_hmac_checks(),
            [first_pass, first_pass, first_pass, ON_ARRIVAL, ON_ARRIVAL]
        );
    }
    ipu.service.shutdown();
}

/// A key the policy denies: for a tenant not allowed the image's key, the verification fails
/// on the broker's denial and the hook refuses the unverified layer; a key revoked after the
/// verification fails the pull at the hook (denial audited with the broker's reason). And the
/// IPU unreachable fails it clearly.
#[test]
fn a_denied_key_and_an_unreachable_ipu_fail_the_pull_clearly() {
    if !is_root() {
        eprintln!("skipped: containerd needs root");
        return;
    }
    let registry = Registry::start_fixtures();
    let dir = tempfile::tempdir().unwrap();
    let ipu = Ipu::start(dir.path(), "policy-A.json");
    let image = format!("{}/fixtures/hello:enc-signed", registry.host());

    // A node pulling for tenant globex, whose policy allows it the image but not the key it
    // is encrypted to: the verification fails on the broker's denial, and so does the pull.
    let layout_image = format!("oci:{}:enc-signed", fixtures().join("oci-layout").display());
    let denied = verify(&ipu, "globex", "pull", &layout_image);
    assert!(!denied.status.success());
    assert!(text(&denied).contains("key broker"), "{}", text(&denied));
    let globex = dir.path().join("globex");
    let ctd = Containerd::start(&globex, &ipu.api, "globex", "pull");
    let refused = ctd.ctr("ns-globex", &["images", "pull", "--plain-http", &image]);
    assert!(!refused.status.success());
    let message = text(&refused);
    assert!(
        shows_hook_failure(&message, &["verify the image first"]),
        "{message}"
    );
    drop(ctd);
    assert_eq!(ipu.hook_decrypts(), ["denied"]);

    let verified = verify(&ipu, "acme", "pull", &format!("docker://{image}"));
    assert!(verified.status.success(), "{}", text(&verified));
    // The operator revokes the key after the image was verified: the broker denies the
    // release the hook's request needs.
    ipu.broker
        .broker
        .revoke_key("test-operator", "fixtures-rsa", None)
        .unwrap();
    let ctd = Containerd::start(dir.path(), &ipu.api, "acme", "pull");
    let denied = ctd.ctr("ns-denied", &["images", "pull", "--plain-http", &image]);
    assert!(!denied.status.success());
    let message = text(&denied);
    assert!(shows_hook_failure(&message, &["key broker"]), "{message}");
    // The IPU's record says why, whatever containerd showed.
    let outcomes = ipu.hook_decrypts();
    assert_eq!(
        outcomes.iter().filter(|o| *o == "denied").count(),
        2,
        "{outcomes:?}"
    );
    assert!(
        ipu.hook_decrypt_reasons()
            .iter()
            .any(|r| r.contains("key broker")),
        "{:?}",
        ipu.hook_decrypt_reasons()
    );
    drop(ctd);

    // The IPU unreachable.
    let nowhere = dir.path().join("nowhere");
    std::fs::create_dir_all(&nowhere).unwrap();
    let ctd = Containerd::start(&nowhere, &nowhere.join("api.sock"), "acme", "pull");
    let unreachable = ctd.ctr("ns-down", &["images", "pull", "--plain-http", &image]);
    assert!(!unreachable.status.success());
    let message = text(&unreachable);
    assert!(
        shows_hook_failure(&message, &["cannot reach ipu-image-svc"]),
        "{message}"
    );
}

/// The hook as containerd runs it, without containerd in between: the encrypted blob on stdin,
/// the media type in the environment. A failure is exactly one line on stderr, exit code 1,
/// and nothing on stdout; a socket leaked on fd 3 is not taken for a payload.
#[test]
fn the_hooks_failure_is_one_line_and_exit_1() {
    let dir = tempfile::tempdir().unwrap();
    let blob = integration_tests::broker::enc_signed_layer();
    let run = |api: &Path| {
        let mut child = spawn_hook(api, GZIP_ENCRYPTED);
        let feeder = feed_stdin(&mut child, blob.blob.clone());
        let out = child.wait_with_output().unwrap();
        feeder.join().unwrap();
        out
    };
    // The IPU unreachable.
    let out = run(&dir.path().join("nowhere.sock"));
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with("ipu-decrypt-hook: cannot reach ipu-image-svc at "),
        "{stderr}"
    );
    // Reachable, but the layer is in no verified image: refused, one line, nothing out.
    let ipu = Ipu::start(dir.path(), "policy-A.json");
    let out = run(&ipu.api);
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("no stream processor payload") && stderr.contains("verify the image first"),
        "{stderr}"
    );
    // Without the environment containerd sets, it says so.
    let out = Command::new(bin("ipu-decrypt-hook"))
        .args(["--tenant", "acme", "--function", "pull"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("STREAM_PROCESSOR_MEDIATYPE"));
}

/// While the hook streams a decrypted layer out (held up by a reader that does not read, so
/// it is alive after the IPU used the key), its memory holds no byte of the layer key: raw,
/// base64 or hex. The scanner finding a key where one is held is shown in
/// `broker_e2e::no_layer_key_bytes_in_the_memory_of_host_side_processes`.
#[test]
fn the_hook_holds_no_key_bytes() {
    use base64::Engine;
    use std::io::Read;
    if !is_root() {
        eprintln!("skipped: reading another process's memory needs root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (ipu, layer) = ipu_with_verified_layer(dir.path());
    // The layer key, learnt from the fixture's JWE with the fixture's private key.
    let privopts = fixture_private_options(&layer);
    let key = privopts.symkey().to_vec();
    let needles = vec![
        key.clone(),
        base64::engine::general_purpose::STANDARD
            .encode(&key)
            .into_bytes(),
        hex::encode(&key).into_bytes(),
    ];
    let mut hook = spawn_hook(&ipu.api, GZIP_ENCRYPTED);
    let _feeder = feed_stdin(&mut hook, layer.blob.clone());
    // The IPU has decrypted (and recorded it); the hook is blocked writing its output.
    let start = Instant::now();
    while !ipu.hook_decrypts().iter().any(|o| o == "success") {
        assert!(start.elapsed() < Duration::from_secs(30), "no decryption");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(200));
    let scan = integration_tests::scan_process_memory(hook.id(), &needles);
    assert!(scan.bytes_scanned > 1_000_000, "{scan:?}");
    assert!(
        scan.found.is_empty(),
        "the hook holds layer key bytes: {:?}",
        scan.found
    );
    let mut plaintext = Vec::new();
    hook.stdout
        .take()
        .unwrap()
        .read_to_end(&mut plaintext)
        .unwrap();
    let out = hook.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        format!("sha256:{}", integration_tests::sha256_hex(&plaintext)),
        privopts.digest()
    );
}

/// A layer applied through containerd's diff service with a stream processor payload, as an
/// imgcrypt-aware client does: containerd passes the payload to the hook on fd 3, the IPU
/// checks its descriptor against the blob, and the layer is applied (the returned diff_id is
/// the verified config's). A payload naming another blob is refused, and audited.
#[test]
fn a_payload_carrying_apply_through_the_diff_service() {
    use api::containerd_diff::diff_client::DiffClient;
    use api::containerd_diff::{Any, ApplyRequest, Descriptor, Mount};
    if !is_root() {
        eprintln!("skipped: containerd needs root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (ipu, layer) = ipu_with_verified_layer(dir.path());
    let ctd = Containerd::start(dir.path(), &ipu.api, "acme", "pull");
    let ns = "apply";
    let media_type = GZIP_ENCRYPTED;
    // The image's content into containerd's store (fetched, not unpacked).
    let registry = Registry::start_fixtures();
    let fetched = ctd.ctr(
        ns,
        &[
            "content",
            "fetch",
            "--plain-http",
            &format!("{}/fixtures/hello:enc-signed", registry.host()),
        ],
    );
    assert!(fetched.status.success(), "{}", text(&fetched));
    // The config's diff_id of that layer: what a correct apply must produce.
    let (_, manifest) =
        integration_tests::layout_manifest(&fixtures().join("oci-layout"), "enc-signed");
    let config: serde_json::Value = serde_json::from_slice(&integration_tests::layout_blob(
        &fixtures().join("oci-layout"),
        manifest["config"]["digest"].as_str().unwrap(),
    ))
    .unwrap();
    let diff_id = config["rootfs"]["diff_ids"][0]
        .as_str()
        .unwrap()
        .to_string();

    let apply = |key: &str, payload_digest: &str| {
        // A fresh, empty snapshot to apply into, and its mounts.
        let prepare = ctd.ctr(
            ns,
            &["snapshots", "--snapshotter", "native", "prepare", key],
        );
        assert!(prepare.status.success(), "{}", text(&prepare));
        let mounts = ctd.ctr(
            ns,
            &[
                "snapshots",
                "--snapshotter",
                "native",
                "mounts",
                "/unused",
                key,
            ],
        );
        assert!(mounts.status.success(), "{}", text(&mounts));
        // `mount -t bind SOURCE /unused -o rbind,rw`
        let line = String::from_utf8_lossy(&mounts.stdout).trim().to_string();
        let words: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(words[..3], ["mount", "-t", "bind"], "{line}");
        let mount = Mount {
            r#type: words[2].to_string(),
            source: words[3].to_string(),
            options: words[6].split(',').map(String::from).collect(),
        };
        let payload = serde_json::json!({
            "DecryptConfig": {"Parameters": {}},
            "Descriptor": {"mediaType": media_type, "digest": payload_digest, "size": layer.blob.len()}
        });
        let mut request = tonic::Request::new(ApplyRequest {
            diff: Some(Descriptor {
                media_type: media_type.into(),
                digest: layer.layer_digest.clone(),
                size: layer.blob.len() as i64,
                annotations: Default::default(),
            }),
            mounts: vec![mount],
            payloads: [(
                "io.containerd.ocicrypt.decoder.v1.tar.gzip".to_string(),
                Any {
                    type_url: "io.containerd.ocicrypt.v1.Payload".into(),
                    value: payload.to_string().into_bytes(),
                },
            )]
            .into(),
        });
        request
            .metadata_mut()
            .insert("containerd-namespace", ns.parse().unwrap());
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(async {
            let channel = api::unix::connect(ctd.socket.clone()).await.unwrap();
            DiffClient::new(channel)
                .apply(request)
                .await
                .map_err(Box::new)
        })
    };
    let applied = apply("apply-ok", &layer.layer_digest)
        .unwrap()
        .into_inner()
        .applied
        .unwrap();
    assert_eq!(applied.digest, diff_id);
    assert_eq!(applied.media_type, "application/vnd.oci.image.layer.v1.tar");
    // Recognised by the digest the payload names, and decrypted from the IPU's own copy.
    assert_eq!(ipu.hook_hmac_checks(), [PREFETCHED]);

    // A payload that names another blob.
    let other = format!("sha256:{}", "0".repeat(64));
    // containerd 1.6's diff service checks the processor's exit status without waiting for
    // it: when the hook's exit loses that race, Apply reports success with the empty layer
    // (nothing applied) instead of the error. Either way no byte of the layer was applied;
    // a caller of Apply must compare the diff_id, as containerd's own unpacker does.
    match apply("apply-bad", &other) {
        Err(refused) => {
            let message = refused.message().to_string();
            assert!(
                message.contains(EMPTY_LAYER_DIFF_ID) || message.contains("payload names"),
                "{message}"
            );
        }
        Ok(applied) => {
            let applied = applied.into_inner().applied.unwrap();
            assert_eq!(applied.digest, EMPTY_DIFF_ID, "{applied:?}");
            assert_eq!(applied.size, 0);
        }
    }
    let denied: Vec<String> = ipu
        .hook_decrypts()
        .into_iter()
        .zip(ipu.hook_decrypt_reasons())
        .filter(|(outcome, _)| outcome == "denied")
        .map(|(_, reason)| reason)
        .collect();
    assert!(
        denied
            .iter()
            .any(|m| m.contains("the stream processor payload names")),
        "{denied:?}"
    );
}

/// The repository a [`signed_encrypted_image`] claims.
const IDENTITY: &str = "example.test/hook/image";

/// [`encrypted_image`](integration_tests::containerd::encrypted_image)'s `enc` tag signed
/// with a key made here. Returns the layout and a trust policy accepting that signature for
/// the layout.
fn signed_encrypted_image(
    d: &Path,
    compression: &str,
    data_mb: usize,
) -> (std::path::PathBuf, std::path::PathBuf) {
    let layout = integration_tests::containerd::encrypted_image(d, compression, data_mb);
    run_ok(
        Command::new(bin("ocipub"))
            .args(["keygen", "--kind", "ec-p256", "--out"])
            .arg(d.join("signing")),
    );
    sign(&layout, d, "enc");
    let policy = d.join("trust-policy.json");
    std::fs::write(
        &policy,
        serde_json::json!({
            "default": [{"type": "reject"}],
            "transports": {"oci": {layout.display().to_string(): [{
                "type": "sigstoreSigned",
                "keyPath": d.join("signing/pub.pem"),
                "signedIdentity": {"type": "exactRepository", "dockerRepository": IDENTITY}
            }]}}
        })
        .to_string(),
    )
    .unwrap();
    (layout, policy)
}

/// Signs `tag` of `layout` with the key [`signed_encrypted_image`] made in `d`.
fn sign(layout: &Path, d: &Path, tag: &str) {
    run_ok(
        Command::new(bin("ocipub"))
            .args(["sign", "--layout"])
            .arg(layout)
            .args(["--tag", tag, "--key"])
            .arg(d.join("signing/priv.pem"))
            .args(["--identity", IDENTITY]),
    );
}

/// The encrypted gzip layer type of the fixtures.
const GZIP_ENCRYPTED: &str = "application/vnd.oci.image.layer.v1.tar+gzip+encrypted";

/// The private options (layer key, plaintext digest) of a fixture layer, unwrapped with the
/// fixtures' RSA key: what the test knows and the host must not.
fn fixture_private_options(
    layer: &integration_tests::broker::EncSignedLayer,
) -> ocicrypt::PrivateLayerOptions {
    let rsa = ocicrypt::keys::PrivateKey::from_pem(
        &std::fs::read(fixtures().join("keys/rsa-2048/priv.pem")).unwrap(),
    )
    .unwrap();
    ocicrypt::PrivateLayerOptions::from_json(
        &ocicrypt::jwe::unwrap(&layer.annotations[ocicrypt::ANNOTATION_KEYS_JWE], &[rsa]).unwrap(),
    )
    .unwrap()
}

/// The hook run by hand for `tenant` acme, function pull, with `blob` on stdin; its stdout
/// is not read until `wait` (so a large layer holds it up).
fn spawn_hook(api: &Path, media_type: &str) -> std::process::Child {
    Command::new(bin("ipu-decrypt-hook"))
        .arg("--api")
        .arg(api)
        .args(["--tenant", "acme", "--function", "pull"])
        .env("STREAM_PROCESSOR_MEDIATYPE", media_type)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Writes `blob` to the hook's stdin on a thread of its own, as containerd does: the hook
/// takes stdin only up to the first chunk when it finds containerd's file of the blob (here,
/// one this process holds open, such as the IPU's copy of a layout blob), so a write of the
/// whole blob before reading its output could wait forever. What the hook leaves unread ends
/// on a closed pipe when it exits, an error containerd ignores, and so does this.
fn feed_stdin(hook: &mut std::process::Child, blob: Vec<u8>) -> std::thread::JoinHandle<()> {
    use std::io::Write;
    let mut input = hook.stdin.take().unwrap();
    std::thread::spawn(move || {
        let _ = input.write_all(&blob);
    })
}

/// The uncompressed variant (`tar+encrypted`, returned as `tar`) through containerd: the
/// IPU verifies the signed image from its layout, containerd pulls the same manifest from a
/// registry through the hook, and `ctr run` prints the image's output.
#[test]
fn an_uncompressed_encrypted_layer_through_containerd() {
    if !is_root() {
        eprintln!("skipped: containerd needs root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (layout, policy) = signed_encrypted_image(d, "none", 1);
    let (digest, manifest) = integration_tests::layout_manifest(&layout, "enc");
    assert_eq!(
        manifest["layers"][0]["mediaType"],
        "application/vnd.oci.image.layer.v1.tar+encrypted"
    );
    let registry = Registry::start(None);
    let image = format!("{}/hook/tar:enc", registry.host());
    run_ok(
        Command::new("skopeo")
            .args([
                "copy",
                "--quiet",
                "--preserve-digests",
                "--dest-tls-verify=false",
            ])
            .arg(format!("oci:{}:enc", layout.display()))
            .arg(format!("docker://{image}")),
    );
    let (ipu, verified) = ipu_with_layout_verified(d, &policy, &layout, "enc");
    assert!(text(&verified).contains(&digest), "{}", text(&verified));
    let ctd = Containerd::start(d, &ipu.api, "acme", "pull");
    let pulled = ctd.ctr("tar", &["images", "pull", "--plain-http", &image]);
    assert!(pulled.status.success(), "{}", text(&pulled));
    let ran = ctd.run_image("tar", &image, "hello-tar");
    assert!(ran.status.success(), "{}", text(&ran));
    assert_eq!(String::from_utf8_lossy(&ran.stdout), "hello from none\n");
    assert_eq!(ipu.hook_decrypts(), ["success"]);
    ipu.service.shutdown();
}

/// A signed image whose layer HMAC (in the signed manifest) does not match its ciphertext,
/// as a publisher bug or a key mix-up leaves it: the IPU checks the HMAC over the whole blob
/// before it releases a byte, so the hook writes nothing, fails with one line, and the IPU
/// records why.
#[test]
fn a_layer_failing_its_hmac_releases_no_plaintext() {
    use base64::engine::general_purpose::STANDARD;
    use base64::Engine;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (layout, policy) = signed_encrypted_image(d, "gzip", 2);
    // The manifest with another HMAC in the layer's public options, tagged and signed.
    let (_, mut manifest) = integration_tests::layout_manifest(&layout, "enc");
    let annotation = "org.opencontainers.image.enc.pubopts";
    let layer = &mut manifest["layers"][0];
    let mut pubopts: serde_json::Value = serde_json::from_slice(
        &STANDARD
            .decode(layer["annotations"][annotation].as_str().unwrap())
            .unwrap(),
    )
    .unwrap();
    let mut hmac = STANDARD.decode(pubopts["hmac"].as_str().unwrap()).unwrap();
    hmac[0] ^= 1;
    pubopts["hmac"] = STANDARD.encode(hmac).into();
    layer["annotations"][annotation] = STANDARD.encode(pubopts.to_string()).into();
    let blob_digest = layer["digest"].as_str().unwrap().to_string();
    let bytes = serde_json::to_vec(&manifest).unwrap();
    let hex = integration_tests::sha256_hex(&bytes);
    std::fs::write(layout.join("blobs/sha256").join(&hex), &bytes).unwrap();
    let index_path = layout.join("index.json");
    let mut index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&index_path).unwrap()).unwrap();
    index["manifests"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": format!("sha256:{hex}"),
            "size": bytes.len(),
            "annotations": {"org.opencontainers.image.ref.name": "bad-hmac"}
        }));
    std::fs::write(&index_path, index.to_string()).unwrap();
    sign(&layout, d, "bad-hmac");

    let (ipu, _) = ipu_with_layout_verified(d, &policy, &layout, "bad-hmac");
    let mut hook = spawn_hook(&ipu.api, GZIP_ENCRYPTED);
    let feeder = feed_stdin(
        &mut hook,
        integration_tests::layout_blob(&layout, &blob_digest),
    );
    let out = hook.wait_with_output().unwrap();
    feeder.join().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        out.stdout.is_empty(),
        "{} plaintext bytes left the IPU",
        out.stdout.len()
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("HMAC does not match"), "{stderr}");
    // The same blob with a start too short to be recognised: checked in a pass over the
    // stored blob instead of on arrival, with the same outcome.
    let blob = integration_tests::layout_blob(&layout, &blob_digest);
    let (sent, refused) = decrypt_over_api(
        &ipu.api,
        GZIP_ENCRYPTED,
        vec![blob[..16].to_vec(), blob[16..].to_vec()],
    );
    assert!(
        sent.is_empty(),
        "{} plaintext bytes left the IPU",
        sent.len()
    );
    let refused = refused.unwrap_err();
    assert!(
        refused.message().contains("HMAC does not match"),
        "{refused:?}"
    );
    // Refused as an integrity failure, before any release, both times.
    assert_eq!(ipu.hook_decrypts(), ["denied", "denied"]);
    // The IPU's own copy, fetched after Verify, failed the same HMAC: not held, and on the
    // record.
    let failures = ipu.prefetch_failures();
    assert_eq!(failures.len(), 1, "{failures:?}");
    assert!(failures[0].contains("HMAC does not match"), "{failures:?}");
    assert!(
        ipu.hook_decrypt_reasons()
            .iter()
            .all(|r| r.contains("HMAC does not match")),
        "{:?}",
        ipu.hook_decrypt_reasons()
    );
    ipu.service.shutdown();
}

/// containerd keeps a layer's blob open in its content store while the hook runs, and the
/// hook reads the blob after its first chunk from that file rather than from containerd's
/// slow stdin feed (`host_attach::hook::content_store`). That is only a faster way to the same
/// bytes: the IPU authenticates what it receives, whichever way the hook read it. Here the
/// hook's parent is this test, holding a content store file open as containerd would.
/// Control: the true blob in the file, and stdin carrying only its first chunk and then
/// garbage: the layer's plaintext comes out, so the rest was read from the file. Then a file
/// changed after its first chunk (as if tampered after containerd checked it), with the true
/// blob on stdin: its HMAC does not match, so it is refused as the unknown blob it is, with no
/// plaintext, and on the IPU's record.
#[test]
fn the_blob_read_from_the_content_store_is_authenticated_like_stdin() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (layout, policy) = signed_encrypted_image(d, "gzip", 3);
    let (_, manifest) = integration_tests::layout_manifest(&layout, "enc");
    let blob_digest = manifest["layers"][0]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let blob = integration_tests::layout_blob(&layout, &blob_digest);
    let chunk = host_attach::hook::CHUNK;
    assert!(blob.len() > 2 * chunk, "{} bytes", blob.len());
    let (ipu, _) = ipu_with_layout_verified(d, &policy, &layout, "enc");
    // The plaintext, straight over the API (this uses up the IPU's own copy).
    let pieces = blob.chunks(chunk).map(<[u8]>::to_vec).collect();
    let (plaintext, trailer) = decrypt_over_api(&ipu.api, GZIP_ENCRYPTED, pieces);
    trailer.unwrap();

    let store = d.join("content/blobs/sha256");
    std::fs::create_dir_all(&store).unwrap();
    let hook_with = |file: &[u8], stdin: Vec<u8>| {
        let path = store.join(blob_digest.trim_start_matches("sha256:"));
        std::fs::write(&path, file).unwrap();
        let _open = std::fs::File::open(&path).unwrap();
        let mut hook = spawn_hook(&ipu.api, GZIP_ENCRYPTED);
        let feeder = feed_stdin(&mut hook, stdin);
        let out = hook.wait_with_output().unwrap();
        feeder.join().unwrap();
        out
    };
    let mut garbage_after_first_chunk = blob[..chunk].to_vec();
    garbage_after_first_chunk.resize(blob.len(), 0x5a);
    let out = hook_with(&blob, garbage_after_first_chunk);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        out.stdout == plaintext,
        "the hook wrote {} bytes, not the layer",
        out.stdout.len()
    );

    let mut tampered = blob.clone();
    tampered[chunk + 100] ^= 1;
    let out = hook_with(&tampered, blob.clone());
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        out.stdout.is_empty(),
        "{} plaintext bytes left the IPU",
        out.stdout.len()
    );
    // Its start named the layer, its HMAC did not match: hashed, and refused under the digest
    // of what the hook read, the file's.
    let tampered_digest = format!("sha256:{}", integration_tests::sha256_hex(&tampered));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "layer {tampered_digest} is in no image this IPU verified"
        )),
        "{stderr}"
    );
    assert_eq!(
        ipu.hook_decrypts(),
        ["success", "success", "failure", "denied"]
    );
    ipu.service.shutdown();
}

/// A host that stops reading in the middle of a layer (the hook killed while the IPU streams
/// 32 MB, more than the transport buffers) leaves a record on the IPU of how far it got, after
/// the release.
#[test]
fn a_stream_the_host_stops_reading_is_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (layout, policy) = signed_encrypted_image(d, "gzip", 32);
    let (_, manifest) = integration_tests::layout_manifest(&layout, "enc");
    let blob =
        integration_tests::layout_blob(&layout, manifest["layers"][0]["digest"].as_str().unwrap());
    let (ipu, _) = ipu_with_layout_verified(d, &policy, &layout, "enc");
    let mut hook = spawn_hook(&ipu.api, GZIP_ENCRYPTED);
    let _feeder = feed_stdin(&mut hook, blob);
    let start = Instant::now();
    while ipu.hook_decrypts().is_empty() {
        assert!(start.elapsed() < Duration::from_secs(30), "no release");
        std::thread::sleep(Duration::from_millis(20));
    }
    hook.kill().unwrap();
    hook.wait().unwrap();
    let start = Instant::now();
    while ipu.hook_decrypts().len() < 2 {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "no record of the end"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(ipu.hook_decrypts(), ["success", "failure"]);
    let reasons = ipu.hook_decrypt_reasons();
    assert!(
        reasons[1].contains("the plaintext stream to the host stopped after"),
        "{reasons:?}"
    );
    ipu.service.shutdown();
}

/// A DecryptLayer call for tenant acme, function pull, straight to the IPU's API.
fn decrypt_over_api(
    api: &Path,
    media_type: &str,
    chunks: Vec<Vec<u8>>,
) -> (
    Vec<u8>,
    Result<api::imagesvc::DecryptLayerTrailer, tonic::Status>,
) {
    integration_tests::containerd::decrypt_over_api(api, "acme", "pull", media_type, chunks)
}

/// The three ways a layer is authenticated give the same plaintext and trailer: the IPU's own
/// copy, fetched after Verify, decrypted as the host's blob arrives (the first request); the
/// blob recognised by its first bytes and authenticated while it arrives (the copy was used
/// once already); and a blob whose start is too short to tell, authenticated in a pass over
/// the stored blob. A blob that starts like a verified layer but is another, sent when no copy
/// is held, is refused like any unknown blob, and the key released for it as it started is
/// recorded as unused.
#[test]
fn a_layer_recognised_from_its_start_or_only_whole_decrypts_the_same() {
    let dir = tempfile::tempdir().unwrap();
    let (ipu, layer) = ipu_with_verified_layer(dir.path());
    let media_type = GZIP_ENCRYPTED;
    let privopts = fixture_private_options(&layer);

    // Whole: the IPU's copy, fetched after Verify.
    let (held, trailer) = decrypt_over_api(&ipu.api, media_type, vec![layer.blob.clone()]);
    let trailer = trailer.unwrap();
    // Whole again: recognised from its start, authenticated as it arrives.
    let (early, early_trailer) = decrypt_over_api(&ipu.api, media_type, vec![layer.blob.clone()]);
    // 16 bytes first: too few to recognise; authenticated once stored.
    let (late, late_trailer) = decrypt_over_api(
        &ipu.api,
        media_type,
        vec![layer.blob[..16].to_vec(), layer.blob[16..].to_vec()],
    );
    assert_eq!(early_trailer.unwrap(), trailer);
    assert_eq!(late_trailer.unwrap(), trailer);
    assert_eq!(held, early);
    assert_eq!(early, late);
    assert_eq!(trailer.size, early.len() as u64);
    assert_eq!(trailer.digest, privopts.digest());
    assert_eq!(
        format!("sha256:{}", integration_tests::sha256_hex(&early)),
        privopts.digest()
    );
    assert_eq!(
        trailer.media_type,
        "application/vnd.oci.image.layer.v1.tar+gzip"
    );

    // The start of the layer, then something else. Its start named the layer, but only an
    // HMAC over all of it matching that layer's makes it that layer: it is hashed, and
    // refused under its own digest.
    let mut impostor = layer.blob[..4096].to_vec();
    impostor.extend_from_slice(&[0u8; 4096]);
    let impostor_digest = format!("sha256:{}", integration_tests::sha256_hex(&impostor));
    let (sent, refused) = decrypt_over_api(&ipu.api, media_type, vec![impostor]);
    assert!(sent.is_empty());
    let refused = refused.unwrap_err();
    assert!(
        refused.message().contains(&format!(
            "layer {impostor_digest} is in no image this IPU verified"
        )),
        "{refused:?}"
    );
    assert_eq!(
        ipu.hook_decrypts(),
        ["success", "success", "success", "failure", "denied"]
    );
    assert_eq!(
        ipu.hook_hmac_checks(),
        [PREFETCHED, ON_ARRIVAL, OVER_STORED]
    );
    let reasons = ipu.hook_decrypt_reasons();
    assert!(
        reasons[3].contains("released for a blob as it started to arrive was not used"),
        "{reasons:?}"
    );
    ipu.service.shutdown();
}

/// With the IPU's own copy of a layer held, the plaintext starts before the host's blob has
/// arrived, so the host's blob must be that copy to the last byte for the hook to succeed. A
/// blob that starts like the layer and then differs (or is cut short, or runs on) gets an
/// error instead of the trailer, and the IPU records where it differed. What was sent before
/// is the verified layer's own plaintext (which the host may have), never a decryption of the
/// host's other bytes. The control, the layer itself, gets its trailer.
#[test]
fn a_blob_that_only_starts_like_the_ipus_copy_gets_no_trailer() {
    let dir = tempfile::tempdir().unwrap();
    let (ipu, layer) = ipu_with_verified_layer(dir.path());
    let media_type = GZIP_ENCRYPTED;
    let privopts = fixture_private_options(&layer);
    let reverify = || {
        let verified = verify(&ipu, "acme", "pull", &layer.image);
        assert!(verified.status.success(), "{}", text(&verified));
    };
    // Control: the layer itself, from the copy, with its trailer.
    let (plaintext, trailer) = decrypt_over_api(&ipu.api, media_type, vec![layer.blob.clone()]);
    assert_eq!(trailer.unwrap().digest, privopts.digest());
    let n = layer.blob.len();
    let mut changed = layer.blob.clone();
    changed[n / 2] ^= 1;
    let mut longer = layer.blob.clone();
    longer.push(0);
    let cases: [(&str, Vec<Vec<u8>>, usize); 3] = [
        // In pieces, so that the difference arrives after the first message.
        (
            "one byte changed",
            vec![changed[..4096].to_vec(), changed[4096..].to_vec()],
            n / 2,
        ),
        ("cut short", vec![layer.blob[..n - 1].to_vec()], n - 1),
        ("one byte more", vec![longer], n),
    ];
    for (what, chunks, at) in cases {
        reverify();
        let (sent, refused) = decrypt_over_api(&ipu.api, media_type, chunks);
        let refused = refused.expect_err(what);
        assert!(
            refused.message().contains(&format!(
                "is not layer {}, whose start it has: it differs from the IPU's verified copy from byte {at} on",
                layer.layer_digest
            )),
            "{what}: {refused:?}"
        );
        assert!(
            plaintext.starts_with(&sent),
            "{what}: what was sent is not the verified layer's plaintext"
        );
    }
    // Each a release from the copy, then its failure with the reason.
    assert_eq!(
        ipu.hook_decrypts(),
        ["success", "success", "failure", "success", "failure", "success", "failure"]
    );
    assert_eq!(ipu.hook_hmac_checks(), [PREFETCHED; 4]);
    let reasons = ipu.hook_decrypt_reasons();
    for r in [&reasons[2], &reasons[4], &reasons[6]] {
        assert!(
            r.contains("differs from the IPU's verified copy"),
            "{reasons:?}"
        );
    }
    ipu.service.shutdown();
}

/// A verification is good for a while (`--verified-layer-ttl`), not forever: a blob sent
/// after that is refused with the advice to verify again, and audited; verified again, it
/// decrypts.
#[test]
fn an_expired_verification_is_refused_until_verified_again() {
    let dir = tempfile::tempdir().unwrap();
    // Long enough for the second verification and its decryption on a loaded machine.
    let ipu = Ipu::start_with_ttl(dir.path(), "policy-A.json", Duration::from_secs(3));
    let layer = integration_tests::broker::enc_signed_layer();
    let media_type = GZIP_ENCRYPTED;
    let verified = verify(&ipu, "acme", "pull", &layer.image);
    assert!(verified.status.success(), "{}", text(&verified));
    std::thread::sleep(Duration::from_millis(3200));
    let (sent, refused) = decrypt_over_api(&ipu.api, media_type, vec![layer.blob.clone()]);
    assert!(sent.is_empty());
    let refused = refused.unwrap_err();
    assert!(
        refused
            .message()
            .contains("longer than a verification is good for (3 s)")
            && refused.message().contains("verify the image again"),
        "{refused:?}"
    );
    let verified = verify(&ipu, "acme", "pull", &layer.image);
    assert!(verified.status.success(), "{}", text(&verified));
    let (sent, trailer) = decrypt_over_api(&ipu.api, media_type, vec![layer.blob.clone()]);
    let trailer = trailer.unwrap();
    assert_eq!(trailer.size, sent.len() as u64);
    assert_eq!(ipu.hook_decrypts(), ["denied", "success"]);
    ipu.service.shutdown();
}

/// The host cannot tie up the IPU with DecryptLayer streams that never end: past
/// `MAX_DECRYPT_STREAMS` open at once a new one is refused at once (`ResourceExhausted`, so
/// the hook fails and containerd retries), and once one ends a verified layer decrypts again
/// (the control).
#[test]
fn decrypt_streams_that_never_end_cannot_exhaust_the_ipu() {
    use api::imagesvc::image_service_client::ImageServiceClient;
    use api::imagesvc::{DecryptLayerHeader, DecryptLayerRequest};
    use ipu_image_svc::service::grpc::MAX_DECRYPT_STREAMS;
    let dir = tempfile::tempdir().unwrap();
    let (ipu, layer) = ipu_with_verified_layer(dir.path());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let message = |data: Vec<u8>| DecryptLayerRequest {
        header: Some(DecryptLayerHeader {
            tenant: "acme".into(),
            function: "pull".into(),
            media_type: GZIP_ENCRYPTED.into(),
            payload_descriptor_json: String::new(),
        }),
        data: data.into(),
    };
    let (held, refused) = rt.block_on(async {
        let client = ImageServiceClient::new(api::unix::connect(ipu.api.clone()).await.unwrap());
        // Streams that send a header and a few bytes, then nothing, and stay open.
        let mut held = Vec::new();
        for _ in 0..MAX_DECRYPT_STREAMS {
            let (tx, rx) = tokio::sync::mpsc::channel(1);
            tx.send(message(vec![0u8; 100])).await.unwrap();
            let mut c = client.clone();
            let call = tokio::spawn(async move {
                c.decrypt_layer(tokio_stream::wrappers::ReceiverStream::new(rx))
                    .await
                    .map(drop)
            });
            held.push((tx, call));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let refused = client
            .clone()
            .decrypt_layer(tokio_stream::iter(vec![message(layer.blob.clone())]))
            .await
            .map(drop);
        (held, refused)
    });
    let refused = refused.unwrap_err();
    assert_eq!(
        refused.code(),
        tonic::Code::ResourceExhausted,
        "{refused:?}"
    );
    // One stream ends (a blob no image has: refused), and its place is free again.
    rt.block_on(async {
        let mut held = held;
        let (tx, call) = held.pop().unwrap();
        drop(tx);
        assert!(call.await.unwrap().is_err(), "an unknown blob is refused");
        let (_, trailer) = decrypt_over_api_async(&ipu.api, layer.blob.clone()).await;
        assert!(trailer.is_ok(), "{trailer:?}");
        drop(held);
    });
}

/// [`decrypt_over_api`] inside a running runtime, for one whole blob.
async fn decrypt_over_api_async(
    api: &Path,
    blob: Vec<u8>,
) -> (
    Vec<u8>,
    Result<api::imagesvc::DecryptLayerTrailer, tonic::Status>,
) {
    let api = api.to_path_buf();
    tokio::task::spawn_blocking(move || decrypt_over_api(&api, GZIP_ENCRYPTED, vec![blob]))
        .await
        .unwrap()
}
