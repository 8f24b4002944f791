//! An IPU given several key broker replicas: one that is down, refuses the connection or
//! stays silent is skipped to the next, and the IPU's audit log names the replica that
//! released each key; a denial is final and never asked of another replica (so a lagging or
//! misconfigured replica cannot be shopped for a more lenient answer); a replica that does
//! not know the IPU's session gets a new attestation. Brokers in process (each its own
//! store and audit log, one PKI); the replicas of a real fleet on PostgreSQL are in
//! `broker_fleet.rs`.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use integration_tests::broker::{self, ipu_settings, Pki, Running, POLICY};
use integration_tests::Swtpm;
use ipu_image_svc::keys::broker_client::BrokerKeys;
use ipu_image_svc::keys::{KeyError, LayerKeyRequest};

/// POLICY, but globex may have the fixture's key too: a replica that disagrees with the
/// others (a stale or misconfigured one).
fn lenient() -> String {
    let p = POLICY.replacen(
        "tenants = [\"acme\"]",
        "tenants = [\"acme\", \"globex\"]",
        1,
    );
    assert_ne!(p, POLICY);
    p
}

/// A port nobody listens on.
fn closed_port() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    format!("https://127.0.0.1:{}", l.local_addr().unwrap().port())
}

/// A listener that accepts connections and never says anything; kept while the guard lives.
struct Silent {
    url: String,
    _thread: std::thread::JoinHandle<()>,
}

fn silent() -> Silent {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("https://127.0.0.1:{}", l.local_addr().unwrap().port());
    let thread = std::thread::spawn(move || {
        let mut kept = Vec::new();
        while let Ok((s, _)) = l.accept() {
            kept.push(s);
            if kept.len() >= 8 {
                break;
            }
        }
        std::thread::sleep(Duration::from_secs(60));
    });
    Silent {
        url,
        _thread: thread,
    }
}

/// The fixture layer's release request for `tenant`.
fn request<'a>(layer: &'a broker::EncSignedLayer, tenant: &'a str) -> LayerKeyRequest<'a> {
    LayerKeyRequest {
        image: &layer.image,
        image_digest: &layer.image_digest,
        layer_digest: &layer.layer_digest,
        annotations: &layer.annotations,
        tenant,
        function: "resize",
        grant: None,
    }
}

/// Events of `kind` in a broker's audit log.
fn count(running: &Running, kind: audit::EventKind) -> usize {
    running
        .audit
        .store()
        .query(&audit::Query {
            kind: Some(kind),
            limit: 1000,
            ..audit::Query::default()
        })
        .unwrap()
        .events
        .len()
}

/// `ipu-image-svc image unpack` for `tenant` with these `--broker` URLs (in order), each
/// given a second to connect.
fn unpack(d: &Path, urls: &[&str], tcti: &str, tenant: &str) -> (i32, serde_json::Value) {
    broker::cli_unpack(
        d,
        &d.join("tls"),
        urls,
        &[
            "--broker-name",
            "localhost",
            "--broker-connect-timeout",
            "1s",
        ],
        tcti,
        (tenant, "f"),
    )
}

#[test]
fn image_unpack_skips_a_closed_port_and_a_silent_broker_and_records_who_released() {
    std::env::set_var("TSS2_LOG", "all+NONE");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (swtpm, running) = broker::start_with_tpm();
    // Writes the IPU's certificate, key and the CA to d/tls (and attests once).
    drop(running.ipu_keys(&swtpm.tcti(), &d.join("tls")));
    let (closed, silent) = (closed_port(), silent());
    let url = running.url();

    let t = Instant::now();
    let (code, report) = unpack(d, &[&closed, &silent.url, &url], &swtpm.tcti(), "acme");
    assert_eq!(code, 0, "{report}");
    assert_eq!(report["outcome"], "accepted");
    // The silent one costs the connect deadline (1 s here), not the request's 30 s.
    assert!(t.elapsed() < Duration::from_secs(15), "{:?}", t.elapsed());
    // The IPU's audit log names the replica that released the layer's key.
    let log = audit::cli::open_read(&d.join("audit")).unwrap();
    let decrypts: Vec<_> = log
        .query(&audit::Query {
            kind: Some(audit::EventKind::LayerDecrypt),
            outcome: Some(audit::Outcome::Success),
            limit: 100,
            ..audit::Query::default()
        })
        .unwrap()
        .events;
    assert!(!decrypts.is_empty());
    for e in &decrypts {
        assert_eq!(e.details.get("key_broker"), Some(&url), "{e:?}");
    }
    drop(log);

    // Control: none of them answering is unavailable (exit 1), not a rejection.
    let (code, report) = unpack(d, &[&closed, &silent.url], &swtpm.tcti(), "acme");
    assert_eq!(code, 1, "{report}");
    assert_eq!(report["class"], "key-broker-unavailable");
    let error = report["error"].as_str().unwrap();
    assert!(
        error.contains("none of the 2 key broker replicas answered")
            && error.contains(&closed)
            && error.contains(&silent.url),
        "{error}"
    );
}

#[test]
fn a_denial_is_final_and_never_asked_of_another_replica() {
    std::env::set_var("TSS2_LOG", "all+NONE");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let swtpm = Swtpm::start();
    let mut tpm = ipu_image_svc::tpm::Tpm::open_persistent(
        &swtpm.tcti(),
        ipu_image_svc::tpm::DEFAULT_AK_HANDLE,
    )
    .unwrap();
    let pki = Arc::new(Pki::new());
    // The IPU's replicas: the first denies globex the key (the fleet's policy); the second
    // would release it (a replica on a stale or wrong policy).
    let strict = broker::start_with(&mut tpm, POLICY, pki.clone());
    let lenient = broker::start_with(&mut tpm, &lenient(), pki.clone());
    drop(tpm);
    let layer = broker::enc_signed_layer();
    drop(strict.ipu_keys(&swtpm.tcti(), &d.join("tls")));
    let settings = |urls: Vec<String>| ipu_settings(urls, &swtpm.tcti(), &d.join("tls"));

    let keys = BrokerKeys::attest(&settings(vec![strict.url(), lenient.url()])).unwrap();
    let releases_before = count(&lenient, audit::EventKind::KeyRelease);
    let denied = keys.release(&request(&layer, "globex")).err().unwrap();
    assert!(matches!(denied, KeyError::Denied(_)), "{denied}");
    assert!(denied.to_string().contains(&strict.url()), "{denied}");
    // The lenient replica was never asked: nothing attested, released or denied there.
    assert_eq!(
        count(&lenient, audit::EventKind::KeyRelease),
        releases_before
    );
    assert_eq!(count(&lenient, audit::EventKind::KeyDeny), 0);
    assert_eq!(count(&strict, audit::EventKind::KeyDeny), 1);
    // The same through the command line: exit 3, a rejection.
    let (code, report) = unpack(d, &[&strict.url(), &lenient.url()], &swtpm.tcti(), "globex");
    assert_eq!(code, 3, "{report}");
    assert_eq!(report["class"], "no-decryption-key");
    assert_eq!(
        count(&lenient, audit::EventKind::KeyRelease),
        releases_before
    );
    assert_eq!(count(&lenient, audit::EventKind::KeyDeny), 0);

    // Positive controls: the lenient replica does release globex the key when it is the
    // one asked, alone or after a replica that is down; and acme gets its key from the
    // strict one.
    let served = keys.release(&request(&layer, "acme")).unwrap();
    assert_eq!(served.served_by, strict.url());
    let alone = BrokerKeys::attest(&settings(vec![lenient.url()])).unwrap();
    assert_eq!(
        alone.release(&request(&layer, "globex")).unwrap().served_by,
        lenient.url()
    );
    let down = closed_port();
    let after = BrokerKeys::attest(&settings(vec![down.clone(), lenient.url()])).unwrap();
    let r = after.release(&request(&layer, "globex")).unwrap();
    assert_eq!(r.served_by, lenient.url());
    assert!(
        r.skipped.is_empty(),
        "attested there already: {:?}",
        r.skipped
    );
    assert_eq!(
        count(&lenient, audit::EventKind::KeyRelease),
        releases_before + 2
    );
}

#[test]
fn a_replica_that_does_not_know_the_session_gets_a_new_attestation() {
    std::env::set_var("TSS2_LOG", "all+NONE");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let swtpm = Swtpm::start();
    let mut tpm = ipu_image_svc::tpm::Tpm::open_persistent(
        &swtpm.tcti(),
        ipu_image_svc::tpm::DEFAULT_AK_HANDLE,
    )
    .unwrap();
    let pki = Arc::new(Pki::new());
    // Two replicas that share nothing (each its own store): a session of one is unknown to
    // the other.
    let a = broker::start_with(&mut tpm, POLICY, pki.clone());
    let b = broker::start_with(&mut tpm, POLICY, pki.clone());
    drop(tpm);
    let layer = broker::enc_signed_layer();
    drop(a.ipu_keys(&swtpm.tcti(), &d.join("tls")));
    let keys = BrokerKeys::attest(&ipu_settings(
        vec![a.url(), b.url()],
        &swtpm.tcti(),
        &d.join("tls"),
    ))
    .unwrap();
    assert_eq!(
        keys.release(&request(&layer, "acme")).unwrap().served_by,
        a.url()
    );
    let attested_on_b = count(&b, audit::EventKind::AttestationVerify);
    let b_url = b.url();
    let a_url = a.url();
    // A stops: the next release goes to B, which attests the IPU anew and releases.
    drop(a);
    let r = keys.release(&request(&layer, "acme")).unwrap();
    assert_eq!(r.served_by, b_url);
    assert_eq!(r.skipped.len(), 1);
    assert_eq!(r.skipped[0].url, a_url);
    assert!(!r.skipped[0].possibly_decided, "{:?}", r.skipped);
    assert!(layer_opens(&r.secret), "the key B released opens");
    assert_eq!(
        count(&b, audit::EventKind::AttestationVerify),
        attested_on_b + 1,
        "one new attestation on B"
    );
    assert_eq!(count(&b, audit::EventKind::KeyRelease), 1);
    // And B stays the one asked.
    assert_eq!(
        keys.release(&request(&layer, "acme")).unwrap().served_by,
        b_url
    );
    assert_eq!(
        count(&b, audit::EventKind::AttestationVerify),
        attested_on_b + 1
    );
}

fn layer_opens(secret: &ipu_image_svc::secret::SecretBuf) -> bool {
    let v: serde_json::Value = serde_json::from_slice(secret.as_slice()).unwrap();
    v["symkey"].is_string()
}
