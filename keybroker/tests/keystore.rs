//! Key-encryption keys sealed at rest: usable after a restart with the master key, useless
//! without it, bound to their id, revocable, and absent in clear from the stored bytes.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use keybroker::keystore::{KeyKind, KeyStore, KeyStoreError, MasterKey};
use ocicrypt::keys::PublicKey;
use ocicrypt::{DecryptConfig, EncryptConfig, LayerEncryptor};

fn store(dir: &Path) -> KeyStore {
    let master = MasterKey::load_or_create(&dir.join("master.key")).unwrap();
    KeyStore::open(dir, master).unwrap()
}

/// The stored key really unwraps what is encrypted to its public half.
fn round_trip(store: &KeyStore, id: &str) {
    let info = store.info(id).unwrap();
    let public = PublicKey::from_pem(info.public_pem.as_bytes()).unwrap();
    let mut enc = LayerEncryptor::new(Vec::new(), &EncryptConfig::new(vec![public])).unwrap();
    enc.write_all(b"layer bytes").unwrap();
    let (ciphertext, annotations) = enc.finish().unwrap();
    let dc = DecryptConfig::new(vec![store.private_key(id, 1).unwrap()]);
    let mut dec = ocicrypt::decrypt_layer(&ciphertext[..], &annotations, &dc).unwrap();
    let mut plain = Vec::new();
    std::io::Read::read_to_end(&mut dec, &mut plain).unwrap();
    dec.finish().unwrap();
    assert_eq!(plain, b"layer bytes");
}

fn all_bytes(dir: &Path, out: &mut Vec<u8>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_dir() {
            all_bytes(&e.path(), out);
        } else if e.file_name() != "master.key" {
            out.extend(std::fs::read(e.path()).unwrap());
        }
    }
}

#[test]
fn keys_survive_a_restart_and_unwrap_layer_keys() {
    let dir = tempfile::tempdir().unwrap();
    {
        let s = store(dir.path());
        s.create("tenant-a/ec", KeyKind::EcP256).unwrap();
        s.create("tenant-a/rsa", KeyKind::Rsa2048).unwrap();
        let imported = std::fs::read(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/keys/rsa-2048/priv.pem"),
        )
        .unwrap();
        s.import("fixtures/rsa-2048", &imported).unwrap();
        assert!(matches!(
            s.create("tenant-a/ec", KeyKind::EcP384),
            Err(KeyStoreError::Exists(_))
        ));
        assert!(matches!(
            s.create("bad id with spaces", KeyKind::EcP256),
            Err(KeyStoreError::Invalid(_))
        ));
    }
    let s = store(dir.path());
    let ids: Vec<String> = s.list().unwrap().into_iter().map(|k| k.id).collect();
    assert_eq!(ids, ["fixtures/rsa-2048", "tenant-a/ec", "tenant-a/rsa"]);
    for id in &ids {
        round_trip(&s, id);
    }
}

#[test]
fn nothing_private_is_stored_in_clear() {
    let dir = tempfile::tempdir().unwrap();
    let pem = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/keys/ec-p256/priv.pem"),
    )
    .unwrap();
    {
        let s = store(dir.path());
        s.import("k", pem.as_bytes()).unwrap();
    }
    let mut stored = Vec::new();
    all_bytes(dir.path(), &mut stored);
    assert!(
        stored.windows(10).any(|w| w == b"PUBLIC KEY"),
        "the scan sees the records"
    );
    for line in pem.lines().filter(|l| !l.starts_with("-----")) {
        assert!(
            !stored.windows(line.len()).any(|w| w == line.as_bytes()),
            "private key text on disk"
        );
    }
    let der = pem::parse(pem.as_bytes()).unwrap().into_contents();
    assert!(!stored.windows(32).any(|w| der.windows(32).any(|d| d == w)));
}

#[test]
fn a_wrong_master_key_a_swapped_record_and_a_revoked_key_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    {
        let s = store(dir.path());
        s.create("a", KeyKind::EcP256).unwrap();
        s.create("b", KeyKind::EcP256).unwrap();
    }
    // Another master key: nothing opens.
    let other = tempfile::tempdir().unwrap();
    let wrong = MasterKey::load_or_create(&other.path().join("master.key")).unwrap();
    let s = KeyStore::open(dir.path(), wrong).unwrap();
    assert!(matches!(
        s.private_key("a", 1),
        Err(KeyStoreError::Unseal(_))
    ));
    drop(s);

    // Record "a" copied over "b": sealed to id "a", it does not open as "b".
    {
        let db = sled::open(dir.path().join("keys.db")).unwrap();
        let t = db.open_tree("keys").unwrap();
        let a = t.get(b"a\0\0\0\0\x01").unwrap().unwrap();
        t.insert(b"b\0\0\0\0\x01", a).unwrap();
        db.flush().unwrap();
    }
    let s = store(dir.path());
    assert!(matches!(
        s.private_key("b", 1),
        Err(KeyStoreError::Unseal(_))
    ));
    s.private_key("a", 1).unwrap();

    s.revoke("a", None).unwrap();
    assert!(matches!(
        s.private_key("a", 1),
        Err(KeyStoreError::Revoked(_))
    ));
    assert!(s.info("a").unwrap().revoked);
    assert!(matches!(
        s.private_key("zzz", 1),
        Err(KeyStoreError::NotFound(_))
    ));
    assert!(matches!(s.rotate("zzz"), Err(KeyStoreError::NotFound(_))));
}

#[test]
fn a_master_key_others_can_read_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("master.key");
    MasterKey::load_or_create(&path).unwrap();
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o600
    );
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let err = MasterKey::load_or_create(&path).unwrap_err();
    assert!(err.to_string().contains("chmod 600"), "{err}");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    std::fs::write(&path, b"short").unwrap();
    let err = MasterKey::load_or_create(&path).unwrap_err();
    assert!(err.to_string().contains("not 32"), "{err}");
}

/// Rotation: a new version with a new key pair; the old version still unwraps what was
/// wrapped to it until it alone is revoked.
#[test]
fn rotation_adds_a_version_and_old_versions_unwrap_until_revoked() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path());
    let v1 = s.create("tenant-a/rsa", KeyKind::Rsa2048).unwrap();
    let wrap_to = |pem: &str| {
        let public = PublicKey::from_pem(pem.as_bytes()).unwrap();
        ocicrypt::jwe::wrap(b"private options", &[public]).unwrap()
    };
    let old = wrap_to(&v1.public_pem);
    let v2 = s.rotate("tenant-a/rsa").unwrap();
    assert_eq!((v2.version, v2.algorithm.as_str()), (2, "RSA"));
    assert_ne!(v1.public_pem, v2.public_pem);
    assert_eq!(s.info("tenant-a/rsa").unwrap(), v2);
    assert_eq!(
        s.versions("tenant-a/rsa").unwrap(),
        vec![v1.clone(), v2.clone()]
    );
    let new = wrap_to(&v2.public_pem);
    let opens = |jwe: &str, v: u32| {
        ocicrypt::jwe::unwrap(jwe, &[s.private_key("tenant-a/rsa", v).unwrap()]).is_ok()
    };
    assert!(opens(&old, 1) && opens(&new, 2));
    assert!(!opens(&old, 2), "a new version is a new key pair");
    let revoked = s.revoke("tenant-a/rsa", Some(1)).unwrap();
    assert_eq!(revoked.len(), 1);
    assert!(matches!(
        s.private_key("tenant-a/rsa", 1),
        Err(KeyStoreError::Revoked(_))
    ));
    assert!(opens(&new, 2));
    assert!(matches!(
        s.revoke("tenant-a/rsa", Some(9)),
        Err(KeyStoreError::NotFound(_))
    ));
    // Creating or importing over an existing id is refused.
    assert!(matches!(
        s.create("tenant-a/rsa", KeyKind::EcP256),
        Err(KeyStoreError::Exists(_))
    ));
}
