//! Placement grants on the IPU (issue 15, the Prepare side): when the running policy names
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
