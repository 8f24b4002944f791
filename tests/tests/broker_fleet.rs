//! A fleet: key broker replicas (`keybroker serve`, the binary) on one PostgreSQL database,
//! each with its own audit log, and IPUs (a swtpm each) that fail over between them.
//!
//! - 3 replicas, 8 IPUs, 200 attest + release rounds in parallel; one replica SIGKILLed and
//!   restarted in the middle: every round is granted (none denied, none failing, none even
//!   retried: two replicas were up), every IPU that had the killed replica first failed
//!   over, the restarted replica serves every IPU again, every release is in exactly one
//!   replica's audit log (the one the IPU says released it; another only where a replica
//!   was cut off after deciding), no attestation or release is denied, and the logs verify
//!   and merge (`audit query --log ... --key ...`). Then the database stops: every replica
//!   answers unavailable, the IPUs see an outage (not a denial), nothing is granted; the
//!   database back, every IPU is served again.
//! - `ipu-image-svc image unpack --broker A --broker B` with A killed is served by B, and its
//!   audit log says so; a replica that hangs mid-request (SIGSTOP) is skipped after the
//!   request deadline.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use integration_tests::fleet::{fresh_pcrs, merged_events, Fleet, FleetStore, Ipu};
use integration_tests::{fixtures, Swtpm};
use ipu_image_svc::keys::broker_client::{BrokerKeys, Skipped};
use ipu_image_svc::keys::KeyError;

fn root() -> bool {
    if !integration_tests::is_root() {
        eprintln!("skipped: PostgreSQL runs as the postgres user (run as root)");
        return false;
    }
    true
}

/// What one round came to.
#[derive(Debug)]
struct Round {
    function: String,
    /// The URL of the replica that released the key (`Err`: why the round failed).
    served_by: Result<String, String>,
    /// Replicas skipped on the way by the attestations.
    attest_skipped: Vec<Skipped>,
    /// Replicas skipped on the way by the releases.
    skipped: Vec<Skipped>,
    /// Attempts beyond the first (after an outage of every replica).
    retries: usize,
}

const IPUS: usize = 8;
const ROUNDS: usize = 200;
/// Attempts per round when every replica is unavailable at once.
const ATTEMPTS: usize = 3;

/// One attest + release round for `function`, retried (at most [`ATTEMPTS`] times) only
/// while no replica answered; a denial ends it at once.
fn round(keys: &BrokerKeys, layer: &integration_tests::fleet::Layer, function: &str) -> Round {
    let mut skipped = Vec::new();
    let mut attest_skipped = Vec::new();
    let mut retries = 0;
    loop {
        let result = keys.attest_now().and_then(|a| {
            attest_skipped.extend(a.skipped);
            let r = keys.release(&layer.request("acme", function))?;
            skipped.extend(r.skipped.iter().cloned());
            assert!(layer.opens(r.secret.as_slice()), "{function}: another key");
            Ok(r.served_by)
        });
        match result {
            Ok(url) => {
                return Round {
                    function: function.into(),
                    served_by: Ok(url),
                    attest_skipped,
                    skipped,
                    retries,
                }
            }
            Err(KeyError::Unavailable(e)) if retries + 1 < ATTEMPTS => {
                retries += 1;
                eprintln!("{function}: retrying after: {e}");
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => {
                return Round {
                    function: function.into(),
                    served_by: Err(e.to_string()),
                    attest_skipped,
                    skipped,
                    retries,
                }
            }
        }
    }
}

#[test]
fn eight_ipus_keep_their_keys_through_a_replica_killed_and_a_database_outage() {
    if !root() {
        return;
    }
    std::env::set_var("TSS2_LOG", "all+NONE");
    let started = Instant::now();
    let swtpms: Vec<Swtpm> = (0..IPUS).map(|_| Swtpm::start()).collect();
    let pcrs = fresh_pcrs(&swtpms[0]);
    let mut fleet = Fleet::start(FleetStore::Postgres, 3, &pcrs);
    let ipus: Vec<Ipu> = swtpms
        .into_iter()
        .enumerate()
        .map(|(i, t)| fleet.ipu(&format!("ipu-{i}"), t))
        .collect();
    let layer = Arc::new(fleet.layer());
    let urls = fleet.urls();
    // Each IPU lists every replica, the first one rotated, so each replica is someone's
    // first choice (as an operator spreads them); the first attestation activates the
    // IPU's credential on that replica.
    let keys: Vec<Arc<BrokerKeys>> = ipus
        .iter()
        .enumerate()
        .map(|(i, ipu)| {
            let mut order = urls.clone();
            order.rotate_left(i % urls.len());
            Arc::new(BrokerKeys::attest(&ipu.settings(order)).unwrap())
        })
        .collect();
    eprintln!("fleet up in {:?}", started.elapsed());

    // 200 rounds over 8 IPUs in parallel; kb-1 is killed after a third of them and
    // restarted once the IPUs that had it first have moved on (a tenth of the rounds
    // later), so that rounds run before, during and after its outage.
    let done = Arc::new(AtomicUsize::new(0));
    let rounds = Arc::new(Mutex::new(Vec::new()));
    let run_started = Instant::now();
    let workers: Vec<_> = keys
        .iter()
        .enumerate()
        .map(|(i, keys)| {
            let (keys, layer, done, rounds) =
                (keys.clone(), layer.clone(), done.clone(), rounds.clone());
            std::thread::spawn(move || {
                for k in 0..ROUNDS / IPUS {
                    let r = round(&keys, &layer, &format!("round-{i}-{k}"));
                    rounds.lock().unwrap().push(r);
                    done.fetch_add(1, Ordering::SeqCst);
                }
            })
        })
        .collect();
    while done.load(Ordering::SeqCst) < ROUNDS / 3 {
        std::thread::sleep(Duration::from_millis(5));
    }
    fleet.replicas[1].kill();
    let killed_at = done.load(Ordering::SeqCst);
    let down = Instant::now();
    while done.load(Ordering::SeqCst) < killed_at + ROUNDS / 10
        && down.elapsed() < Duration::from_secs(30)
    {
        std::thread::sleep(Duration::from_millis(5));
    }
    fleet.replicas[1].start();
    let restarted_at = done.load(Ordering::SeqCst);
    for w in workers {
        w.join().unwrap();
    }
    let elapsed = run_started.elapsed();
    let rounds = std::mem::take(&mut *rounds.lock().unwrap());
    eprintln!(
        "{ROUNDS} rounds in {elapsed:?}; kb-1 killed after {killed_at}, back after {restarted_at}"
    );
    assert!(
        killed_at < ROUNDS / 2 && restarted_at <= 2 * ROUNDS / 3,
        "the kill and the restart came too late: the rounds did not run through them"
    );
    assert_eq!(rounds.len(), ROUNDS);
    let failed: Vec<&Round> = rounds.iter().filter(|r| r.served_by.is_err()).collect();
    assert!(failed.is_empty(), "rounds failed: {failed:#?}");
    let retried = rounds.iter().filter(|r| r.retries > 0).count();
    let killed_url = fleet.replicas[1].url();
    let failovers = rounds
        .iter()
        .filter(|r| {
            r.skipped
                .iter()
                .chain(&r.attest_skipped)
                .any(|s| s.url == killed_url)
        })
        .count();
    eprintln!("{failovers} rounds failed over from kb-1; {retried} rounds retried");
    // Two replicas were up throughout: every round was served by failing over, none had
    // to wait for an outage to end.
    assert_eq!(retried, 0, "rounds retried although two replicas were up");
    let first_on_killed = (0..IPUS).filter(|i| i % urls.len() == 1).count();
    assert!(
        failovers >= first_on_killed,
        "{failovers} rounds failed over, but {first_on_killed} IPUs had the killed replica first"
    );

    // The restarted replica serves again: every IPU, asking it alone, attests and is
    // released its key there (on the database's state: its enrollment, the policy, the key).
    let mut after = Vec::new();
    for (i, ipu) in ipus.iter().enumerate() {
        let alone = BrokerKeys::attest(&ipu.settings(vec![killed_url.clone()])).unwrap();
        let r = round(&alone, &layer, &format!("restarted-{i}"));
        assert_eq!(r.served_by.as_deref(), Ok(killed_url.as_str()), "{r:?}");
        after.push(r);
    }

    // The database stops: every replica answers unavailable. The IPUs see an outage, not a
    // denial, and nothing is granted; the database back, every IPU is served.
    let pg = fleet.pg.as_ref().unwrap();
    pg.stop();
    for (i, k) in keys.iter().enumerate() {
        let function = format!("db-down-{i}");
        let e = k
            .release(&layer.request("acme", &function))
            .err()
            .expect("nothing granted without the database");
        assert!(
            matches!(&e, KeyError::Unavailable(m) if m.contains("none of the 3 key broker replicas answered")),
            "{e}"
        );
        let e = k.attest_now().unwrap_err();
        assert!(matches!(e, KeyError::Unavailable(_)), "{e}");
    }
    pg.start_again();
    for (i, k) in keys.iter().enumerate() {
        let r = round(k, &layer, &format!("db-back-{i}"));
        assert!(r.served_by.is_ok(), "{r:?}");
        after.push(r);
    }

    // Every replica stops (its audit log closed); the logs are verified and merged.
    for r in &mut fleet.replicas {
        r.stop();
    }
    let origin_of: HashMap<String, String> = fleet
        .replicas
        .iter()
        .map(|r| (r.url(), r.origin.clone()))
        .collect();
    let releases = merged_events(&fleet.replicas, "key.release");
    let mut by_function: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (origin, e) in &releases {
        let f = e["function"].as_str().unwrap_or_default().to_string();
        by_function.entry(f).or_default().push(origin.clone());
    }
    let mut possibly_twice = 0;
    for r in rounds.iter().chain(&after) {
        let served_by = origin_of[r.served_by.as_ref().unwrap()].clone();
        let logged = by_function.remove(&r.function).unwrap_or_default();
        assert_eq!(
            logged.iter().filter(|o| **o == served_by).count(),
            1,
            "{}: released by {served_by}, recorded by {logged:?}",
            r.function
        );
        // Another record only where a replica decided and was cut off before it answered.
        for o in logged.iter().filter(|o| **o != served_by) {
            assert!(
                r.skipped
                    .iter()
                    .any(|s| s.possibly_decided && origin_of[&s.url] == *o),
                "{}: recorded by {o} too, which was not cut off mid-request: {r:?}",
                r.function
            );
            possibly_twice += 1;
        }
    }
    let db_down: Vec<_> = by_function
        .keys()
        .filter(|f| f.starts_with("db-down"))
        .collect();
    assert!(
        db_down.is_empty(),
        "granted without the database: {db_down:?}"
    );
    by_function.remove(""); // set-up releases, if any
    assert!(
        by_function.is_empty(),
        "releases no round asked for: {by_function:?}"
    );
    // Denials: none of the rounds; the outage recorded as failures, not denials.
    let denies = merged_events(&fleet.replicas, "key.deny");
    let denied: Vec<_> = denies
        .iter()
        .filter(|(_, e)| e["outcome"] != "failure")
        .collect();
    assert!(denied.is_empty(), "denied: {denied:?}");
    assert!(
        denies.iter().any(|(_, e)| e["function"]
            .as_str()
            .is_some_and(|f| f.starts_with("db-down"))),
        "the outage's refusals are recorded as failures"
    );
    // Attestations: none denied; those the outage stopped are failures.
    let attestations = merged_events(&fleet.replicas, "attestation.verify");
    let refused: Vec<_> = attestations
        .iter()
        .filter(|(_, e)| e["outcome"] == "denied")
        .collect();
    assert!(refused.is_empty(), "attestations denied: {refused:?}");
    let per_replica: BTreeMap<&str, usize> =
        releases.iter().fold(BTreeMap::new(), |mut m, (o, _)| {
            *m.entry(o.as_str()).or_default() += 1;
            m
        });
    eprintln!(
        "releases per replica: {per_replica:?}; {possibly_twice} recorded twice (a replica cut off after deciding); total {:?}",
        started.elapsed()
    );
    assert_eq!(per_replica.len(), 3, "every replica served");
}

#[test]
fn image_unpack_fails_over_from_a_killed_replica_and_past_one_hung_mid_request() {
    if !root() {
        return;
    }
    std::env::set_var("TSS2_LOG", "all+NONE");
    let swtpm = Swtpm::start();
    let pcrs = fresh_pcrs(&swtpm);
    let mut fleet = Fleet::start(FleetStore::Postgres, 2, &pcrs);
    let ipu = fleet.ipu("ipu-1", swtpm);
    // The fixture image's layers are wrapped to the fixture RSA key: the fleet holds it.
    let out = fleet.replicas[0]
        .admin()
        .args(["keys", "import", "--id", "fixtures-rsa", "--key"])
        .arg(fixtures().join("keys/rsa-2048/priv.pem"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let urls = fleet.urls();
    let d = fleet.path("ipu-1");
    let url_strs: Vec<&str> = urls.iter().map(String::as_str).collect();
    let tcti = ipu.swtpm.tcti();
    let unpack = |function: &str| {
        integration_tests::broker::cli_unpack(
            &d,
            &ipu.tls,
            &url_strs,
            &["--broker-connect-timeout", "2s"],
            &tcti,
            ("acme", function),
        )
    };
    let key_brokers = |function: &str| -> Vec<String> {
        audit::cli::open_read(&d.join("audit"))
            .unwrap()
            .query(&audit::Query {
                kind: Some(audit::EventKind::LayerDecrypt),
                function: Some(function.into()),
                limit: 100,
                ..audit::Query::default()
            })
            .unwrap()
            .events
            .into_iter()
            .filter_map(|e| e.details.get("key_broker").cloned())
            .collect()
    };
    // Control: both up, the first serves.
    let (code, report) = unpack("both-up");
    assert_eq!(code, 0, "{report}");
    let first = key_brokers("both-up");
    assert!(
        !first.is_empty() && first.iter().all(|u| *u == urls[0]),
        "{first:?}"
    );
    // The first replica killed: the second serves, and the IPU's log says so.
    fleet.replicas[0].kill();
    let (code, report) = unpack("first-killed");
    assert_eq!(code, 0, "{report}");
    let second = key_brokers("first-killed");
    assert!(
        !second.is_empty() && second.iter().all(|u| *u == urls[1]),
        "{second:?}"
    );
    fleet.replicas[0].start();

    // A replica that hangs with the IPU's connection open: the request deadline, not the
    // connect one, moves the request on; the skip says the replica may have decided.
    let mut settings = ipu.settings(urls.clone());
    settings.request_timeout = Duration::from_secs(2);
    let keys = BrokerKeys::attest(&settings).unwrap();
    let layer = fleet.layer();
    assert_eq!(
        keys.release(&layer.request("acme", "before-hang"))
            .unwrap()
            .served_by,
        urls[0]
    );
    let pid = fleet.replicas[0].pid();
    // SAFETY: kill(2) on our own child's pid.
    unsafe { libc::kill(pid as i32, libc::SIGSTOP) };
    let t = Instant::now();
    let r = keys.release(&layer.request("acme", "hung"));
    let took = t.elapsed();
    // SAFETY: as above.
    unsafe { libc::kill(pid as i32, libc::SIGCONT) };
    let r = r.unwrap();
    assert_eq!(r.served_by, urls[1]);
    assert_eq!(r.skipped.len(), 1, "{:?}", r.skipped);
    assert!(r.skipped[0].possibly_decided, "{:?}", r.skipped);
    assert!(
        took >= Duration::from_secs(2) && took < Duration::from_secs(10),
        "{took:?}"
    );
}
