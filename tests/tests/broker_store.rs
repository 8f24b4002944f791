//! The broker's state behind its store: the same store and broker suites on sled
//! and on a real PostgreSQL (Debian's, started here in a temporary directory), then several
//! broker replicas on one database: a nonce consumed once across replicas under concurrency,
//! a session honoured by another replica, a revocation seen by all within a second, policy
//! rollback and same-version races refused across replicas, a stopped database failing
//! operationally (nothing granted) and recovering, and a dump that opens nothing.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant, SystemTime};

use broker_protocol::{binding, release_context, SessionKey};
use integration_tests::broker::{enc_signed_layer, PCRS, POLICY};
use integration_tests::postgres::Postgres;
use integration_tests::{audit_log, contains, ed25519_pem_pair, fixtures, Swtpm};
use ipu_image_svc::tpm::Tpm;
use keybroker::broker::{Broker, BrokerError, BrokerOptions, ReleaseRequest, Session, Wrapped};
use keybroker::store::postgres::PgStore;
use keybroker::store::sled::SledStore;
use keybroker::store::{SessionRecord, Store, StoreLocation};
use keybroker::verifier::{AttestError, Enrollment};
use policy::deploy::bundle::{sign, BundleContent};

const CLIENT: &str = "CN=ipu-1.example,O=platform";

// ---------------------------------------------------------------------------------------
// The store suite, on both stores.

fn signed_bundle(private: &str, version: u64, note: &str) -> Vec<u8> {
    let content = BundleContent {
        version,
        deployment: format!("{POLICY}\n# {note}\n"),
        image_trust: std::fs::read_to_string(
            fixtures().join("policies/policy-accept-anything.json"),
        )
        .unwrap(),
    };
    sign(&content, private.as_bytes()).unwrap().into_bytes()
}

fn store_suite(store: &dyn Store) {
    let kind = store.kind();
    // KEK records: insert once, replace, read back in version order.
    assert!(store.insert_key_record("k", 1, b"r1").unwrap(), "{kind}");
    assert!(
        !store.insert_key_record("k", 1, b"again").unwrap(),
        "{kind}"
    );
    assert!(store.insert_key_record("k", 2, b"r2").unwrap());
    assert!(store.insert_key_record("a", 1, b"a1").unwrap());
    store.replace_key_record("k", 1, b"r1-revoked").unwrap();
    assert_eq!(
        store.key_record("k", 1).unwrap().as_deref(),
        Some(&b"r1-revoked"[..])
    );
    assert_eq!(store.key_record("k", 3).unwrap(), None);
    assert_eq!(
        store.key_records("k").unwrap(),
        vec![b"r1-revoked".to_vec(), b"r2".to_vec()]
    );
    assert!(store.key_records("none").unwrap().is_empty());
    assert_eq!(
        store.all_key_records().unwrap(),
        vec![b"a1".to_vec(), b"r1-revoked".to_vec(), b"r2".to_vec()],
        "{kind}: by id, then version"
    );
    // Enrollments, rewritten on revocation.
    store.put_enrollment("ipu-1", b"e1").unwrap();
    store.put_enrollment("ipu-2", b"e2").unwrap();
    store.put_enrollment("ipu-1", b"e1-revoked").unwrap();
    assert_eq!(
        store.enrollment("ipu-1").unwrap().as_deref(),
        Some(&b"e1-revoked"[..])
    );
    assert_eq!(
        store.enrollments().unwrap(),
        vec![
            ("ipu-1".to_string(), b"e1-revoked".to_vec()),
            ("ipu-2".to_string(), b"e2".to_vec())
        ]
    );
    // The running bundle: compare-and-set on the version.
    let (private, _) = ed25519_pem_pair();
    let (v1, v2, v2b) = (
        signed_bundle(&private, 1, "one"),
        signed_bundle(&private, 2, "two"),
        signed_bundle(&private, 2, "other two"),
    );
    assert_eq!(store.running_bundle().unwrap(), None);
    assert!(store.install_bundle(None, 1, &v1).unwrap(), "{kind}");
    assert!(
        !store.install_bundle(None, 1, &v1).unwrap(),
        "{kind}: a second first install"
    );
    assert_eq!(store.running_bundle_version().unwrap(), Some(1));
    assert!(store.install_bundle(Some(1), 2, &v2).unwrap());
    assert!(
        !store.install_bundle(Some(1), 2, &v2b).unwrap(),
        "{kind}: an install based on a stale version loses"
    );
    assert_eq!(store.running_bundle().unwrap(), Some(v2));
    // Nonces: once each, never after expiry, never unissued.
    let (n1, n2, n3) = ([1u8; 32], [2u8; 32], [3u8; 32]);
    store.issue_nonce(&n1, Duration::from_secs(60)).unwrap();
    store.issue_nonce(&n2, Duration::from_millis(1)).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    assert!(store.consume_nonce(&n1).unwrap(), "{kind}");
    assert!(!store.consume_nonce(&n1).unwrap(), "{kind}: replay");
    assert!(!store.consume_nonce(&n2).unwrap(), "{kind}: expired");
    assert!(!store.consume_nonce(&n3).unwrap(), "{kind}: never issued");
    // Sessions: public material, until expiry or the IPU's revocation.
    let session = |id: &str, ipu: &str, ttl: Duration| SessionRecord {
        id: id.into(),
        ipu_id: ipu.into(),
        ipu_class: "ipu-gen2".into(),
        client: CLIENT.into(),
        session_public: vec![4; 65],
        salt: [9; 32],
        expires: SystemTime::now() + ttl,
    };
    store
        .put_session(&session("s1", "ipu-1", Duration::from_secs(60)))
        .unwrap();
    store
        .put_session(&session("s2", "ipu-2", Duration::from_secs(60)))
        .unwrap();
    store
        .put_session(&session("s3", "ipu-2", Duration::from_millis(1)))
        .unwrap();
    std::thread::sleep(Duration::from_millis(20));
    let s1 = store.session("s1").unwrap().expect("s1");
    assert_eq!(
        (s1.ipu_id.as_str(), s1.client.as_str(), s1.salt),
        ("ipu-1", CLIENT, [9; 32])
    );
    assert_eq!(s1.session_public, vec![4; 65]);
    let left = s1.expires.duration_since(SystemTime::now()).unwrap();
    assert!(left > Duration::from_secs(55) && left <= Duration::from_secs(60));
    assert_eq!(store.session("s3").unwrap(), None, "{kind}: expired");
    store.end_sessions_of("ipu-1").unwrap();
    assert_eq!(store.session("s1").unwrap(), None);
    assert!(store.session("s2").unwrap().is_some());
}

fn root() -> bool {
    if !integration_tests::is_root() {
        eprintln!("skipped: PostgreSQL runs as the postgres user (run as root)");
        return false;
    }
    true
}

#[test]
fn the_store_suite_passes_on_sled() {
    let dir = tempfile::tempdir().unwrap();
    store_suite(&SledStore::open(dir.path()).unwrap());
}

#[test]
fn the_store_suite_passes_on_postgres_and_the_schema_is_versioned() {
    if !root() {
        return;
    }
    let pg = Postgres::start();
    let url = pg.create_db("suite");
    // An unmigrated database is refused with what to do.
    let store = PgStore::connect(&url).unwrap();
    let refused = store.check_schema().unwrap_err().to_string();
    assert!(refused.contains("keybroker db migrate"), "{refused}");
    let refused = keybroker::store::open(
        &StoreLocation::Postgres(url.clone()),
        Path::new("/nonexistent"),
    )
    .err()
    .unwrap()
    .to_string();
    assert!(refused.contains("no broker schema"), "{refused}");
    // `keybroker db migrate` applies it once; a second run has nothing to do.
    let migrate = |url: &str| {
        std::process::Command::new(integration_tests::bin("keybroker"))
            .args(["db", "migrate", "--store", url])
            .output()
            .unwrap()
    };
    let first = migrate(&url);
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    assert!(String::from_utf8_lossy(&first.stdout).contains("applied migration(s) 1"));
    let again = migrate(&pg.tcp_url("suite"));
    assert!(String::from_utf8_lossy(&again.stdout).contains("nothing to migrate"));
    store.check_schema().unwrap();
    store_suite(&store);
    // A schema newer than this broker's is refused too.
    let psql = std::process::Command::new("psql")
        .arg("-h")
        .arg(pg.socket_dir())
        .args([
            "-p",
            &pg.port.to_string(),
            "-U",
            "postgres",
            "-d",
            "suite",
            "-c",
        ])
        .arg("INSERT INTO schema_migrations (version, description) VALUES (999, 'future')")
        .output()
        .unwrap();
    assert!(
        psql.status.success(),
        "{}",
        String::from_utf8_lossy(&psql.stderr)
    );
    let newer = store.check_schema().unwrap_err().to_string();
    assert!(newer.contains("newer than this broker knows"), "{newer}");
}

// ---------------------------------------------------------------------------------------
// Brokers on a store.

/// What the replicas share: the master key file (provisioned to each), the bundle signer.
struct Fleet {
    dir: tempfile::TempDir,
    master: PathBuf,
    bundle_private: String,
    bundle_public: PathBuf,
    store: StoreLocation,
    /// Each replica's audit log (opened once: its signing key is per process).
    logs: std::sync::Mutex<std::collections::HashMap<String, Arc<audit::AuditLog>>>,
}

impl Fleet {
    fn new(store: StoreLocation) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let (bundle_private, public) = ed25519_pem_pair();
        let bundle_public = dir.path().join("bundle.pub");
        std::fs::write(&bundle_public, public).unwrap();
        // The master key, made once and copied to every replica's state directory.
        let master = dir.path().join("master.key");
        keybroker::keystore::MasterKey::load_or_create(&master).unwrap();
        Self {
            dir,
            master,
            bundle_private,
            bundle_public,
            store,
            logs: Default::default(),
        }
    }

    fn replica(&self, name: &str) -> Broker {
        let state = self.dir.path().join(name);
        std::fs::create_dir_all(&state).unwrap();
        if !state.join("master.key").exists() {
            std::fs::copy(&self.master, state.join("master.key")).unwrap();
        }
        let mut opts = BrokerOptions::new(&state);
        opts.bundle_keys = vec![self.bundle_public.clone()];
        opts.require_ek = false;
        opts.store = self.store.clone();
        Broker::open(&opts, self.log(name)).unwrap()
    }

    fn log(&self, name: &str) -> Arc<audit::AuditLog> {
        let dir = self.dir.path().join(name).join("audit");
        self.logs
            .lock()
            .unwrap()
            .entry(name.to_string())
            .or_insert_with(|| audit_log(&dir))
            .clone()
    }

    fn bundle(&self, version: u64, note: &str) -> Vec<u8> {
        signed_bundle(&self.bundle_private, version, note)
    }

    /// The first replica, with policy version 1, the fixture key and the TPM's AK enrolled.
    fn first(&self, tpm: &Tpm) -> Broker {
        let a = self.replica("a");
        a.load_policy("test", &self.bundle(1, "first")).unwrap();
        a.import_key(
            "test",
            "fixtures-rsa",
            &std::fs::read(fixtures().join("keys/rsa-2048/priv.pem")).unwrap(),
        )
        .unwrap();
        a.verifier
            .enroll(
                tpm.ak_public(),
                Enrollment {
                    ipu_id: "ipu-1".into(),
                    ipu_class: "ipu-gen2".into(),
                    ..Enrollment::default()
                },
            )
            .unwrap();
        a
    }
}

fn release_request(session: &str) -> ReleaseRequest {
    let layer = enc_signed_layer();
    ReleaseRequest {
        session_id: session.into(),
        tenant: "acme".into(),
        function: "resize".into(),
        image: layer.image,
        image_digest: layer.image_digest,
        layer_digest: layer.layer_digest,
        wrapped: Wrapped::Jwe(layer.annotations[ocicrypt::ANNOTATION_KEYS_JWE].clone()),
        grant: None,
    }
}

/// Challenge on `challenger`, quote, attest on `attester`.
fn attest(
    challenger: &Broker,
    attester: &Broker,
    tpm: &mut Tpm,
    key: &SessionKey,
) -> Result<(Session, Vec<u8>), BrokerError> {
    let nonce = challenger.challenge()?;
    let evidence = tpm.quote(&nonce, &key.public(), &PCRS).unwrap();
    let s = attester.attest(CLIENT, &evidence, tpm.ak_public(), &nonce, &key.public())?;
    Ok((s, nonce.to_vec()))
}

/// Releases the fixture layer's key and opens it: the layer's private options (JSON).
fn release_and_open(
    b: &Broker,
    session: &Session,
    nonce: &[u8],
    key: &SessionKey,
) -> Result<Vec<u8>, BrokerError> {
    let req = release_request(&session.id);
    let sealed = b.release(CLIENT, &req)?;
    Ok(key
        .open(
            &sealed,
            &binding(nonce, &key.public()),
            &release_context(&req.image_digest, &req.layer_digest),
        )
        .unwrap()
        .to_vec())
}

/// The broker suite: attest, release, replay, rollback, key and IPU revocation.
fn broker_suite(store: StoreLocation) {
    let swtpm = Swtpm::start();
    let mut tpm = Tpm::open(&swtpm.tcti()).unwrap();
    let fleet = Fleet::new(store);
    let b = fleet.first(&tpm);
    let key = SessionKey::generate();
    let (session, nonce) = attest(&b, &b, &mut tpm, &key).unwrap();
    assert!(release_and_open(&b, &session, &nonce, &key).is_ok());
    // The nonce is spent.
    let evidence = tpm.quote(&nonce, &key.public(), &PCRS).unwrap();
    let replay = b
        .attest(CLIENT, &evidence, tpm.ak_public(), &nonce, &key.public())
        .unwrap_err();
    assert!(
        matches!(replay, BrokerError::Attestation(AttestError::StaleNonce)),
        "{replay}"
    );
    // Policy: newer accepted, older refused.
    b.load_policy("test", &fleet.bundle(2, "second")).unwrap();
    let rollback = b
        .load_policy("test", &fleet.bundle(1, "first"))
        .unwrap_err();
    assert!(rollback.to_string().contains("rollback"), "{rollback}");
    assert_eq!(b.policy_version(), Some(2));
    // A revoked key is never used again; a revoked IPU's sessions end.
    b.revoke_key("test", "fixtures-rsa", None).unwrap();
    let denied = release_and_open(&b, &session, &nonce, &key).unwrap_err();
    assert!(matches!(denied, BrokerError::Denied(_)), "{denied}");
    b.revoke_ipu("test", "ipu-1").unwrap();
    let ended = release_and_open(&b, &session, &nonce, &key).unwrap_err();
    assert!(matches!(ended, BrokerError::NoSession), "{ended}");
    let refused = attest(&b, &b, &mut tpm, &key).unwrap_err();
    assert!(
        matches!(refused, BrokerError::Attestation(AttestError::RevokedKey)),
        "{refused}"
    );
    drop(b);
    // The state survives a restart (sled: the same directory; PostgreSQL: the database).
    let again = fleet.replica("a");
    assert_eq!(again.policy_version(), Some(2));
    assert!(again.keys().info("fixtures-rsa").unwrap().revoked);
    assert!(again.verifier.list().unwrap()[0].enrollment.revoked);
}

/// A migrated database on a fresh cluster.
fn migrated(name: &str) -> (Postgres, String) {
    let pg = Postgres::start();
    let url = pg.create_db(name);
    PgStore::connect(&url).unwrap().migrate().unwrap();
    (pg, url)
}

#[test]
fn the_broker_suite_passes_on_sled() {
    broker_suite(StoreLocation::Sled);
}

#[test]
fn the_broker_suite_passes_on_postgres() {
    if !root() {
        return;
    }
    let (_pg, url) = migrated("suite");
    broker_suite(StoreLocation::Postgres(url));
}

// ---------------------------------------------------------------------------------------
// Replicas on one database.

#[test]
fn a_nonce_from_one_replica_is_accepted_once_by_any_replica_under_concurrency() {
    if !root() {
        return;
    }
    let (_pg, url) = migrated("replicas");
    let swtpm = Swtpm::start();
    let mut tpm = Tpm::open(&swtpm.tcti()).unwrap();
    let fleet = Fleet::new(StoreLocation::Postgres(url));
    let a = fleet.first(&tpm);
    let b = Arc::new(fleet.replica("b"));
    let c = Arc::new(fleet.replica("c"));
    for round in 0..3 {
        // Issued by A; one quote replayed by 16 threads through B and C at once.
        let key = SessionKey::generate();
        let nonce = a.challenge().unwrap();
        let evidence = tpm.quote(&nonce, &key.public(), &PCRS).unwrap();
        let barrier = Arc::new(Barrier::new(16));
        let threads: Vec<_> = (0..16)
            .map(|i| {
                let replica = if i % 2 == 0 { b.clone() } else { c.clone() };
                let (barrier, evidence, nonce) = (barrier.clone(), evidence.clone(), nonce.clone());
                let (ak, public) = (tpm.ak_public().to_vec(), key.public());
                std::thread::spawn(move || {
                    barrier.wait();
                    replica.attest(CLIENT, &evidence, &ak, &nonce, &public)
                })
            })
            .collect();
        let results: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        let won = results.iter().filter(|r| r.is_ok()).count();
        assert_eq!(won, 1, "round {round}: exactly one replay wins");
        for r in results.iter().filter_map(|r| r.as_ref().err()) {
            assert!(
                matches!(r, BrokerError::Attestation(AttestError::StaleNonce)),
                "round {round}: {r}"
            );
        }
        // And never again, on any replica.
        let late = a
            .attest(CLIENT, &evidence, tpm.ak_public(), &nonce, &key.public())
            .unwrap_err();
        assert!(matches!(
            late,
            BrokerError::Attestation(AttestError::StaleNonce)
        ));
    }
}

#[test]
fn a_session_from_one_replica_is_honoured_by_another_until_the_ipu_is_revoked() {
    if !root() {
        return;
    }
    let (_pg, url) = migrated("replicas");
    let swtpm = Swtpm::start();
    let mut tpm = Tpm::open(&swtpm.tcti()).unwrap();
    let fleet = Fleet::new(StoreLocation::Postgres(url));
    let a = fleet.first(&tpm);
    let b = fleet.replica("b");
    let c = fleet.replica("c");
    let key = SessionKey::generate();
    // Challenge on C, attest on A, release on B.
    let (session, nonce) = attest(&c, &a, &mut tpm, &key).unwrap();
    let privopts = release_and_open(&b, &session, &nonce, &key).unwrap();
    assert!(contains(&privopts, b"symkey"));
    // Only its client may use it, on any replica.
    let other = b
        .release("CN=host-7.example", &release_request(&session.id))
        .unwrap_err();
    assert!(matches!(other, BrokerError::WrongClient), "{other}");
    // Revoked on A: refused on B and C within a second (B and C have read it recently).
    release_and_open(&c, &session, &nonce, &key).unwrap();
    let revoked_at = Instant::now();
    a.revoke_ipu("test", "ipu-1").unwrap();
    for replica in [&b, &c] {
        loop {
            match release_and_open(replica, &session, &nonce, &key) {
                Err(BrokerError::NoSession) => break,
                Ok(_) => assert!(
                    revoked_at.elapsed() < Duration::from_secs(1),
                    "a release one second after the revocation"
                ),
                Err(e) => panic!("{e}"),
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    assert!(revoked_at.elapsed() < Duration::from_secs(1));
    // New attestations are refused by every replica.
    std::thread::sleep(Duration::from_millis(300));
    for replica in [&a, &b, &c] {
        let e = attest(replica, replica, &mut tpm, &key).unwrap_err();
        assert!(
            matches!(e, BrokerError::Attestation(AttestError::RevokedKey)),
            "{e}"
        );
    }
}

#[test]
fn policy_rollback_and_same_version_races_are_refused_across_replicas() {
    if !root() {
        return;
    }
    let (_pg, url) = migrated("replicas");
    let swtpm = Swtpm::start();
    let tpm = Tpm::open(&swtpm.tcti()).unwrap();
    let fleet = Fleet::new(StoreLocation::Postgres(url));
    let a = Arc::new(fleet.first(&tpm));
    let b = Arc::new(fleet.replica("b"));
    // Version 3 through A; B enforces it within a second and refuses version 2.
    a.load_policy("test", &fleet.bundle(3, "three")).unwrap();
    let start = Instant::now();
    while b.policy_version() != Some(3) {
        assert!(
            start.elapsed() < Duration::from_secs(1),
            "B never saw version 3"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let rollback = b.load_policy("test", &fleet.bundle(2, "two")).unwrap_err();
    assert!(
        rollback.to_string().contains("rollback refused"),
        "{rollback}"
    );
    // Re-delivery of the running bundle is fine anywhere.
    b.load_policy("test", &fleet.bundle(3, "three")).unwrap();
    // Two different bundles of one version at once: exactly one wins.
    for version in 4..10 {
        let barrier = Arc::new(Barrier::new(2));
        let threads: Vec<_> = [(a.clone(), "A"), (b.clone(), "B")]
            .into_iter()
            .map(|(replica, name)| {
                let bundle = fleet.bundle(version, name);
                let barrier = barrier.clone();
                std::thread::spawn(move || {
                    barrier.wait();
                    replica.load_policy("test", &bundle)
                })
            })
            .collect();
        let results: Vec<_> = threads.into_iter().map(|t| t.join().unwrap()).collect();
        assert_eq!(
            results.iter().filter(|r| r.is_ok()).count(),
            1,
            "version {version}: {:?}",
            results
                .iter()
                .map(|r| r.as_ref().err().map(|e| e.to_string()))
                .collect::<Vec<_>>()
        );
        let loser = results.into_iter().find_map(|r| r.err()).unwrap();
        assert!(
            loser
                .to_string()
                .contains("running version with different content"),
            "{loser}"
        );
    }
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(a.policy_version(), Some(9));
    assert_eq!(b.policy_version(), Some(9));
}

#[test]
fn a_stopped_database_fails_operationally_grants_nothing_and_recovers() {
    if !root() {
        return;
    }
    let (pg, url) = migrated("replicas");
    let swtpm = Swtpm::start();
    let mut tpm = Tpm::open(&swtpm.tcti()).unwrap();
    let fleet = Fleet::new(StoreLocation::Postgres(url));
    let a = fleet.first(&tpm);
    let b = fleet.replica("b");
    let key = SessionKey::generate();
    let (session, nonce) = attest(&a, &b, &mut tpm, &key).unwrap();
    let pending = a.challenge().unwrap();
    let evidence = tpm.quote(&pending, &key.public(), &PCRS).unwrap();
    let releases_before = grants(&fleet, "b");

    pg.stop();
    std::thread::sleep(Duration::from_millis(600)); // past every cache
    let challenge = a.challenge().unwrap_err();
    assert!(challenge.is_operational(), "{challenge}");
    let attested = b
        .attest(CLIENT, &evidence, tpm.ak_public(), &pending, &key.public())
        .unwrap_err();
    assert!(attested.is_operational(), "{attested}");
    let released = release_and_open(&b, &session, &nonce, &key).unwrap_err();
    assert!(released.is_operational(), "{released}");
    assert!(
        released.to_string().contains("postgres store"),
        "{released}"
    );
    assert_eq!(grants(&fleet, "b"), releases_before, "nothing granted");

    pg.start_again();
    // The session and the pending nonce survived; the brokers reconnect by themselves.
    release_and_open(&b, &session, &nonce, &key).unwrap();
    b.attest(CLIENT, &evidence, tpm.ak_public(), &pending, &key.public())
        .unwrap();
    let (s2, n2) = attest(&b, &a, &mut tpm, &key).unwrap();
    release_and_open(&a, &s2, &n2, &key).unwrap();
}

#[test]
fn a_consumed_nonce_stays_consumed_through_a_database_crash() {
    if !root() {
        return;
    }
    // Issuing a nonce and opening a session do not wait for the WAL flush (their loss costs
    // an attestation); consuming a nonce does: a crash right after must not bring it back.
    // The WAL writer waits 10 s between rounds here, so that a commit that did not wait for
    // the WAL is still unwritten when the server crashes.
    let pg = Postgres::start_configured(false, "-c wal_writer_delay=10000");
    let url = pg.create_db("crash");
    PgStore::connect(&url).unwrap().migrate().unwrap();
    let swtpm = Swtpm::start();
    let mut tpm = Tpm::open(&swtpm.tcti()).unwrap();
    let fleet = Fleet::new(StoreLocation::Postgres(url));
    let a = fleet.first(&tpm);
    let b = fleet.replica("b");
    let key = SessionKey::generate();
    let nonce = a.challenge().unwrap();
    // The issued nonce on disk for sure (its own commit did not wait): were the consumption
    // lost, the crash would bring the nonce back.
    pg.psql("crash", "CHECKPOINT");
    let evidence = tpm.quote(&nonce, &key.public(), &PCRS).unwrap();
    b.attest(CLIENT, &evidence, tpm.ak_public(), &nonce, &key.public())
        .unwrap();
    pg.crash();
    pg.start_again();
    // The replicas' connections died with the server: a call may fail once on one.
    let mut replay = None;
    for _ in 0..3 {
        let e = a
            .attest(CLIENT, &evidence, tpm.ak_public(), &nonce, &key.public())
            .unwrap_err();
        if !e.is_operational() {
            replay = Some(e);
            break;
        }
    }
    let replay = replay.expect("the database answers again");
    assert!(
        matches!(replay, BrokerError::Attestation(AttestError::StaleNonce)),
        "{replay}"
    );
    // Control: the database is back and serves a new attestation (each replica's first call
    // after the crash may fail once on a connection that died with the server).
    for attempt in 0..3 {
        match attest(&a, &b, &mut tpm, &key).and_then(|(s, n)| release_and_open(&b, &s, &n, &key)) {
            Ok(_) => break,
            Err(e) if e.is_operational() && attempt < 2 => continue,
            Err(e) => panic!("{e}"),
        }
    }
}

/// Key releases granted by a replica, from its audit log.
fn grants(fleet: &Fleet, replica: &str) -> usize {
    fleet
        .log(replica)
        .store()
        .query(&audit::Query {
            kind: Some(audit::EventKind::KeyRelease),
            limit: 1000,
            ..audit::Query::default()
        })
        .unwrap()
        .events
        .len()
}

#[test]
fn a_database_dump_opens_no_key() {
    if !root() {
        return;
    }
    let (pg, url) = migrated("dumped");
    let swtpm = Swtpm::start();
    let mut tpm = Tpm::open(&swtpm.tcti()).unwrap();
    let fleet = Fleet::new(StoreLocation::Postgres(url.clone()));
    let a = fleet.first(&tpm);
    a.create_key("test", "acme-ec", keybroker::keystore::KeyKind::EcP256)
        .unwrap();
    let key = SessionKey::generate();
    let (session, nonce) = attest(&a, &a, &mut tpm, &key).unwrap();
    let privopts = release_and_open(&a, &session, &nonce, &key).unwrap();
    let symkey_b64 = serde_json::from_slice::<serde_json::Value>(&privopts).unwrap()["symkey"]
        .as_str()
        .unwrap()
        .to_string();

    // What must not be in the dump, in every encoding a dump could carry it: raw, and hex
    // (a plain dump writes bytea as hex). The KEK's secret part: the end of its PKCS#8 DER
    // (private exponent and CRT values), and the PEM lines that carry it.
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    let pem = std::fs::read(fixtures().join("keys/rsa-2048/priv.pem")).unwrap();
    let lines: Vec<String> = String::from_utf8_lossy(&pem)
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .map(str::to_string)
        .collect();
    let der = b64.decode(lines.concat()).unwrap();
    let secret_der = der[der.len() - 64..].to_vec();
    let pem_tail = lines[lines.len() - 4..lines.len() - 1].join("\n");
    let symkey = b64.decode(&symkey_b64).unwrap();
    let raw: Vec<(&str, Vec<u8>)> = vec![
        ("the KEK's private DER", secret_der.clone()),
        ("the KEK's private PEM", pem_tail.clone().into_bytes()),
        ("the layer key", symkey.clone()),
        ("the layer key in base64", symkey_b64.clone().into_bytes()),
    ];
    let hexed: Vec<(String, Vec<u8>)> = raw
        .iter()
        .map(|(what, n)| (format!("{what} in hex"), hex::encode(n).into_bytes()))
        .collect();
    // Positive controls: the raw needles find the secrets in a buffer that holds them, and
    // the hex needles find them in the dump of a table that stores them in clear.
    let buffer = [der.as_slice(), &pem, &symkey, symkey_b64.as_bytes()].concat();
    for (what, needle) in &raw {
        assert!(contains(&buffer, needle), "control: {what}");
    }
    pg.create_db("control");
    let out = std::process::Command::new("psql")
        .arg("-h")
        .arg(pg.socket_dir())
        .args(["-p", &pg.port.to_string(), "-U", "postgres", "-d", "control", "-c"])
        .arg(format!(
            "CREATE TABLE clear (b bytea); INSERT INTO clear VALUES (decode('{}', 'hex')), (decode('{}', 'hex')), (decode('{}', 'hex')), (decode('{}', 'hex'))",
            hex::encode(&der),
            hex::encode(&symkey),
            hex::encode(&pem),
            hex::encode(symkey_b64.as_bytes()),
        ))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let control = pg.dump("control");
    for (what, needle) in &hexed {
        assert!(contains(&control, needle), "control: {what} not found");
    }

    let dump = pg.dump("dumped");
    assert!(
        contains(&dump, b"kek_records"),
        "the dump has the key table"
    );
    for (what, needle) in &raw {
        assert!(!contains(&dump, needle), "the dump holds {what}");
    }
    for (what, needle) in &hexed {
        assert!(!contains(&dump, needle), "the dump holds {what}");
    }
    // The database alone opens nothing: a broker with another master key cannot unseal.
    let other = tempfile::tempdir().unwrap();
    let mut opts = BrokerOptions::new(other.path());
    opts.store = StoreLocation::Postgres(url);
    opts.require_ek = false;
    opts.bundle_keys = vec![fleet.bundle_public.clone()];
    let thief = Broker::open(&opts, audit_log(&other.path().join("audit"))).unwrap();
    let key2 = SessionKey::generate();
    let (s, n) = attest(&thief, &thief, &mut tpm, &key2).unwrap();
    let e = release_and_open(&thief, &s, &n, &key2).unwrap_err();
    assert!(
        e.to_string().contains("does not open with this master key"),
        "{e}"
    );
}
