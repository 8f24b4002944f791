//! Placement grants on the IPU (the Prepare side): when the running policy names
//! grant keys, the tenant and function come from the control plane's signed grant, not from
//! the host. A host forging a tenant is refused before anything is fetched, audited with the
//! reason: no grant, a grant signed by a key trusted only for another tenant, an expired
//! grant, a grant for another IPU or host, for another image, a replayed serial (also after
//! a restart of the gate), a request naming another tenant than its grant. The positive
//! control: the granted start runs, as the grant's tenant and function.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use integration_tests::{fixtures, is_root};
use ipu_image_svc::grant::{GrantGate, SerialStore};
use ipu_image_svc::keys::KeySource;
use ipu_image_svc::service::Service;
use ocicrypt::keys::PrivateKey;
use ocicrypt::DecryptConfig;
use policy::grant::{Grant, ImageClaim};

const IPU: &str = "ipu-1";
const HOST: &str = "host-1.example";

/// An Ed25519 key: its PKCS#8 PEM and its public key as a PEM string.
struct Key {
    private: String,
    public: String,
}

fn key() -> Key {
    let (private, public) = integration_tests::ed25519_pem_pair();
    Key { private, public }
}

/// A deployment policy: tenants acme and globex may run anything from the fixtures' layout;
/// `scheduler` signs grants for acme only, `other` for globex only.
fn deployment(scheduler: &Key, other: &Key) -> policy::deploy::DeploymentPolicy {
    let text = format!(
        r#"schema = 1
image_trust_policy = "image-trust.json"

[[tenant]]
name = "acme"

[[tenant.function]]
name = "*"
images = ["oci:*"]

[[tenant]]
name = "globex"

[[tenant.function]]
name = "*"
images = ["oci:*"]

[[grant_key]]
id = "scheduler"
public_key = """
{}"""
tenants = ["acme"]

[[grant_key]]
id = "other"
public_key = """
{}"""
tenants = ["globex"]
"#,
        scheduler.public, other.public
    );
    policy::deploy::parse(&text, "test.toml").unwrap()
}

/// The service in process (policy-A, the rsa-2048 key) under `d`, its grants checked with
/// `policy` for IPU [`IPU`], serials kept in `d/grants`, its audit log (a new one per run:
/// the test harness makes each with a new signing key) at `d/<log>`.
fn service(
    d: &Path,
    log: &str,
    policy: Arc<policy::deploy::DeploymentPolicy>,
) -> (Service, Arc<audit::AuditLog>) {
    let keys = KeySource::local(DecryptConfig::new(vec![PrivateKey::from_pem(
        &std::fs::read(fixtures().join("keys/rsa-2048/priv.pem")).unwrap(),
    )
    .unwrap()]));
    let (service, audit) = integration_tests::local_service(
        d,
        log,
        &std::fs::read_to_string(fixtures().join("policies/policy-A.json")).unwrap(),
        keys,
        integration_tests::broker::service_options(d.join("state")),
        Box::new(|_, _| {}),
    );
    let gate = GrantGate::new(
        policy,
        IPU.into(),
        SerialStore::open(&d.join("grants")).unwrap(),
    );
    (service.with_grant_gate(gate), audit)
}

fn grant(tenant: &str, image: &str, now: SystemTime) -> Grant {
    Grant {
        version: 1,
        serial: policy::grant::new_serial().unwrap(),
        tenant: tenant.into(),
        function: "resize".into(),
        image: ImageClaim::Reference(image.into()),
        ipu: IPU.into(),
        host: HOST.into(),
        not_before: now - Duration::from_secs(30),
        not_after: now + Duration::from_secs(600),
    }
}

fn signed(grant: &Grant, key: &Key) -> String {
    policy::grant::sign(grant, key.private.as_bytes())
        .unwrap()
        .0
}

/// The `policy.decision` refusals recorded with `reason_code`.
fn refusals(audit: &audit::AuditLog, code: &str) -> usize {
    audit
        .store()
        .query(&audit::Query {
            kind: Some(audit::EventKind::PolicyDecision),
            limit: 1000,
            ..Default::default()
        })
        .unwrap()
        .events
        .into_iter()
        .filter(|e| {
            e.outcome == audit::Outcome::Denied
                && e.details.get("reason_code").map(String::as_str) == Some(code)
        })
        .count()
}

#[test]
fn a_host_cannot_act_for_a_tenant_without_the_control_planes_grant() {
    if !is_root() {
        eprintln!("skipped: the service's plaintext tmpfs needs root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (scheduler, other) = (key(), key());
    let policy = Arc::new(deployment(&scheduler, &other));
    let (service, audit) = service(dir.path(), "audit", policy.clone());
    let image = format!("oci:{}:enc-signed", fixtures().join("oci-layout").display());
    let now = SystemTime::now();
    let host = Some(HOST);

    // Each forgery, refused and audited with its reason; nothing is fetched or made.
    let no_grant = service
        .placement("acme", "resize", &image, host, "")
        .unwrap_err();
    assert!(no_grant.to_string().contains("no-grant"), "{no_grant}");
    assert_eq!(no_grant.to_status().code(), tonic::Code::PermissionDenied);
    let cases: Vec<(&str, String)> = vec![
        // globex's grant signed by acme's scheduler key: trusted for acme only.
        (
            "untrusted-signer",
            signed(&grant("globex", &image, now), &scheduler),
        ),
        ("expired", {
            let mut g = grant("acme", &image, now);
            g.not_before = now - Duration::from_secs(3600);
            g.not_after = now - Duration::from_secs(600);
            signed(&g, &scheduler)
        }),
        ("wrong-ipu", {
            let mut g = grant("acme", &image, now);
            g.ipu = "ipu-2".into();
            signed(&g, &scheduler)
        }),
        ("wrong-host", {
            let mut g = grant("acme", &image, now);
            g.host = "host-2.example".into();
            signed(&g, &scheduler)
        }),
        ("wrong-image", {
            let other_image = format!("oci:{}:zstd", fixtures().join("oci-layout").display());
            signed(&grant("acme", &other_image, now), &scheduler)
        }),
        ("bad-signature", {
            let envelope = signed(&grant("acme", &image, now), &scheduler);
            let mut v: serde_json::Value = serde_json::from_str(&envelope).unwrap();
            let sig = v["signatures"][0]["sig"].as_str().unwrap().to_string();
            let flipped = if sig.starts_with('A') { "B" } else { "A" };
            v["signatures"][0]["sig"] = format!("{flipped}{}", &sig[1..]).into();
            v.to_string()
        }),
    ];
    for (code, envelope) in &cases {
        let e = service
            .placement("acme", "resize", &image, host, envelope)
            .unwrap_err();
        assert!(e.to_string().contains(code), "{code}: {e}");
        assert_eq!(refusals(&audit, code), 1, "{code} not audited");
    }
    // The request names acme, its grant globex (signed by globex's key): refused.
    let globex = signed(&grant("globex", &image, now), &other);
    let e = service
        .placement("acme", "resize", &image, host, &globex)
        .unwrap_err();
    assert!(e.to_string().contains("request-mismatch"), "{e}");
    // The mismatch did not use the grant up: it still places globex's function.
    let placed = service
        .placement("globex", "resize", &image, host, &globex)
        .unwrap();
    assert_eq!(placed.tenant, "globex");
    assert_eq!(refusals(&audit, "no-grant"), 1);
    assert!(service.list().is_empty());

    // Positive control: acme's grant, the request naming no tenant: the start runs as the
    // grant's tenant and function.
    let envelope = signed(&grant("acme", &image, now), &scheduler);
    let placed = service.placement("", "", &image, host, &envelope).unwrap();
    assert_eq!(
        (placed.tenant.as_str(), placed.function.as_str()),
        ("acme", "resize")
    );
    let p = service.prepare_placed(&placed, &image, host).unwrap();
    assert!(p.clone_id.starts_with("acme.resize."), "{}", p.clone_id);

    // The same grant again: a replay, refused, also by a restarted service.
    let e = service
        .placement("acme", "resize", &image, host, &envelope)
        .unwrap_err();
    assert!(e.to_string().contains("replayed"), "{e}");
    assert!(service.teardown(&p.clone_id, "done").unwrap());
    service.shutdown();
    drop((service, audit));
    let (service, audit) = self::service(dir.path(), "audit-after-restart", policy);
    let e = service
        .placement("acme", "resize", &image, host, &envelope)
        .unwrap_err();
    assert!(e.to_string().contains("replayed"), "{e}");
    assert_eq!(refusals(&audit, "replayed"), 1);
    service.shutdown();
}

/// The broker's events of `kind` with their `grant_serial` and `reason_code`.
fn broker_events(log: &audit::AuditLog, kind: audit::EventKind) -> Vec<(String, String)> {
    log.store()
        .query(&audit::Query {
            kind: Some(kind),
            limit: 1000,
            ..Default::default()
        })
        .unwrap()
        .events
        .into_iter()
        .map(|e| {
            let get = |k: &str| e.details.get(k).cloned().unwrap_or_default();
            (get("grant_serial"), get("reason_code"))
        })
        .collect()
}

/// Items 4 and 5 with the real broker (in process, its IPU attested with a swtpm): every
/// key release of a granted Verify, and of the decrypt hook's layers after it, carries the
/// grant, and the broker checks it; a service that asked for more than its grant (here: a
/// placement naming another function than the grant it carries, as a bug would) is refused
/// by the broker; a layer verified under a grant is not decrypted after the grant's window.
#[test]
fn decryptions_act_under_the_grant_their_verify_carried_and_the_broker_checks_it() {
    use ipu_image_svc::grant::{AdmittedGrant, Placement};
    use ipu_image_svc::service::decrypt::ReceivedBlob;
    use ipu_image_svc::service::spool::StoredBlob;
    if !is_root() {
        eprintln!("skipped: the service's plaintext tmpfs needs root");
        return;
    }
    std::env::set_var("TSS2_LOG", "all+NONE");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (scheduler, other) = (key(), key());
    let (swtpm, broker) = integration_tests::broker::start_with_tpm();
    let mut text = integration_tests::broker::POLICY.to_string();
    text.push_str(&format!(
        "\n[[grant_key]]\nid = \"scheduler\"\npublic_key = \"\"\"\n{}\"\"\"\ntenants = [\"acme\"]\n\n[[grant_key]]\nid = \"other\"\npublic_key = \"\"\"\n{}\"\"\"\ntenants = [\"globex\"]\n",
        scheduler.public, other.public
    ));
    let policy = Arc::new(policy::deploy::parse(&text, "policy.toml").unwrap());
    broker.broker.set_policy((*policy).clone()).unwrap();
    let keys = Arc::new(broker.ipu_keys(&swtpm.tcti(), &d.join("ipu-tls")));
    let audit = integration_tests::audit_log(&d.join("ipu-audit"));
    let service = integration_tests::broker::ipu_service(
        integration_tests::broker::service_options(d.join("state")),
        fixtures().join("policies/policy-A.json"),
        d.join("cache"),
        keys,
        audit.clone(),
    )
    .with_grant_gate(GrantGate::new(
        policy,
        IPU.into(),
        SerialStore::open(&d.join("grants")).unwrap(),
    ));
    let layer = integration_tests::broker::enc_signed_layer();
    let image = layer.image.clone();
    let blob_path = d.join("blob");
    std::fs::write(&blob_path, &layer.blob).unwrap();
    let stored = StoredBlob::borrowed_file(&blob_path).unwrap();
    let blob = ReceivedBlob {
        blob: &stored,
        digest: &layer.layer_digest,
        size: layer.blob.len() as u64,
        media_type: "application/vnd.oci.image.layer.v1.tar+gzip+encrypted",
        payload_descriptor: None,
    };
    let now = SystemTime::now();

    // Positive control: the grant admitted, the image verified (its keys released under the
    // grant), the hook's blob decrypted as the grant's tenant and function.
    let g = grant("acme", &image, now);
    let envelope = signed(&g, &scheduler);
    let placed = service.placement("", "", &image, None, &envelope).unwrap();
    service.verify_placed(&placed, &image).unwrap();
    let verify_releases = broker_events(&broker.audit, audit::EventKind::KeyRelease).len();
    assert!(verify_releases >= 1);
    let mut stream = service.open_layer("acme", "resize", &blob, None).unwrap();
    std::io::copy(&mut stream, &mut std::io::sink()).unwrap();
    stream.finish().unwrap();
    let releases = broker_events(&broker.audit, audit::EventKind::KeyRelease);
    // One more for the hook's blob, and every one under the grant.
    assert_eq!(releases.len(), verify_releases + 1, "{releases:?}");
    assert!(releases.iter().all(|(serial, _)| *serial == g.serial));
    // The host naming another tenant for the same blob: nothing verified for it.
    assert!(service.open_layer("globex", "resize", &blob, None).is_err());

    // A service bug: the placement names a function its grant does not. The broker refuses.
    let widened = Placement {
        function: "thumbnail".into(),
        ..placed.clone()
    };
    let e = service.verify_placed(&widened, &image).unwrap_err();
    assert!(e.to_string().contains("request-mismatch"), "{e}");
    let denials = broker_events(&broker.audit, audit::EventKind::KeyDeny);
    assert_eq!(
        denials,
        [(g.serial.clone(), "request-mismatch".to_string())]
    );

    // A grant whose window ends after its Verify: the layer it made known is not decrypted
    // any more (as if time had passed: the window is set to have ended).
    let mut late = grant("acme", &image, now);
    late.function = "late".into();
    let late_envelope = signed(&late, &scheduler);
    let ended = Placement {
        tenant: "acme".into(),
        function: "late".into(),
        grant: Some(Arc::new(AdmittedGrant {
            envelope: Arc::from(late_envelope.as_str()),
            serial: late.serial.clone(),
            not_after: now - Duration::from_secs(120),
        })),
    };
    service.verify_placed(&ended, &image).unwrap();
    let e = service.open_layer("acme", "late", &blob, None).unwrap_err();
    assert!(e.to_string().contains("expired"), "{e}");
    let refused = audit
        .store()
        .query(&audit::Query {
            kind: Some(audit::EventKind::LayerDecrypt),
            limit: 100,
            ..Default::default()
        })
        .unwrap()
        .events
        .into_iter()
        .filter(|e| e.outcome == audit::Outcome::Denied && e.reason.contains("expired"))
        .count();
    assert_eq!(refused, 1);
    service.shutdown();
}
