//! The broker's master key sealed by its host's TPM: the state directory opens again on
//! the same TPM, never on another, and a state set up one way is not opened the other way.

use std::sync::Arc;

use integration_tests::{audit_log, Swtpm};
use keybroker::broker::{Broker, BrokerOptions};
use keybroker::keystore::KeyKind;

fn open(
    dir: &std::path::Path,
    log: &Arc<audit::AuditLog>,
    tpm: Option<&Swtpm>,
) -> Result<Broker, String> {
    let mut opts = BrokerOptions::new(dir.join("state"));
    opts.master_key_tpm = tpm.map(|t| t.tcti());
    Broker::open(&opts, log.clone()).map_err(|e| e.to_string())
}

#[test]
fn a_tpm_sealed_master_key_opens_only_on_its_tpm() {
    std::env::set_var("TSS2_LOG", "all+NONE");
    let dir = tempfile::tempdir().unwrap();
    let log = audit_log(&dir.path().join("audit"));
    let tpm = Swtpm::start();
    let public = {
        let broker = open(dir.path(), &log, Some(&tpm)).unwrap();
        broker
            .create_key("admin", "acme-kek", KeyKind::EcP256)
            .unwrap()
            .public_pem
    };
    let state = dir.path().join("state");
    assert!(!state.join("master.key").exists());
    let sealed = std::fs::read(state.join("master.sealed")).unwrap();
    assert!(sealed.starts_with(b"KBSEAL01"));

    // The same TPM: the key store opens and the key unseals.
    let broker = open(dir.path(), &log, Some(&tpm)).unwrap();
    assert_eq!(broker.keys().info("acme-kek").unwrap().public_pem, public);
    broker.keys().private_key("acme-kek", 1).unwrap();
    drop(broker);

    // Another TPM (the state directory copied to another machine): refused.
    let other = Swtpm::start();
    let err = open(dir.path(), &log, Some(&other)).err().unwrap();
    assert!(
        err.contains("this TPM cannot load the sealed master key"),
        "{err}"
    );
    // Without the TPM: refused, not silently replaced by a new master key file.
    let err = open(dir.path(), &log, None).err().unwrap();
    assert!(err.contains("TPM-sealed"), "{err}");
    assert!(!state.join("master.key").exists());

    // A sealed file that was changed does not load either.
    let mut changed = sealed.clone();
    let last = changed.len() - 1;
    changed[last] ^= 1;
    std::fs::write(state.join("master.sealed"), &changed).unwrap();
    let err = open(dir.path(), &log, Some(&tpm)).err().unwrap();
    assert!(err.contains("master.sealed"), "{err}");
}

#[test]
fn a_file_master_key_state_is_not_opened_with_a_tpm() {
    let dir = tempfile::tempdir().unwrap();
    let log = audit_log(&dir.path().join("audit"));
    drop(open(dir.path(), &log, None).unwrap());
    let tpm = Swtpm::start();
    let err = open(dir.path(), &log, Some(&tpm)).err().unwrap();
    assert!(err.contains("made with a master key file"), "{err}");
}
