//! Key-encryption keys at rest: sled records sealed with AES-256-GCM under a master key.
//!
//! The master key is a 32-byte file the broker creates with mode 0600 and refuses to use
//! when anyone else may read it (the embedded default; a TPM-sealed master key comes with
//! the broker's own attestation). Each record is sealed with the key id as associated data,
//! so records cannot be swapped between ids; a fresh random nonce per write.

use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

#[derive(Debug, thiserror::Error)]
pub enum KeyStoreError {
    #[error("master key {path}: {message}")]
    MasterKey { path: String, message: String },
    #[error("key store: {0}")]
    Storage(String),
    #[error("no key {0:?}")]
    NotFound(String),
    #[error("key {0:?} already exists")]
    Exists(String),
    #[error("key {0:?} is revoked")]
    Revoked(String),
    #[error("key {0:?} does not open with this master key (wrong master key, or the record was tampered with)")]
    Unseal(String),
    #[error("invalid key: {0}")]
    Invalid(String),
}

impl From<sled::Error> for KeyStoreError {
    fn from(e: sled::Error) -> Self {
        KeyStoreError::Storage(e.to_string())
    }
}

/// The master key; zeroized on drop, never printed.
pub struct MasterKey(Zeroizing<[u8; 32]>);

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MasterKey(..)")
    }
}

impl MasterKey {
    /// Loads the master key, creating it (mode 0600) if missing. Refused if the file is
    /// readable or writable by group or others, or not 32 bytes.
    pub fn load_or_create(path: &Path) -> Result<Self, KeyStoreError> {
        let err = |message: String| KeyStoreError::MasterKey {
            path: path.display().to_string(),
            message,
        };
        if !path.exists() {
            let mut key = Zeroizing::new([0u8; 32]);
            SystemRandom::new()
                .fill(key.as_mut())
                .map_err(|_| err("no randomness".into()))?;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .map_err(|e| err(e.to_string()))?;
            f.write_all(key.as_ref()).map_err(|e| err(e.to_string()))?;
            f.sync_all().map_err(|e| err(e.to_string()))?;
        }
        let meta = std::fs::metadata(path).map_err(|e| err(e.to_string()))?;
        if meta.mode() & 0o077 != 0 {
            return Err(err(format!(
                "mode {:o} lets others read or write it; chmod 600",
                meta.mode() & 0o777
            )));
        }
        let bytes = Zeroizing::new(std::fs::read(path).map_err(|e| err(e.to_string()))?);
        let key: [u8; 32] = bytes
            .as_slice()
            .try_into()
            .map_err(|_| err(format!("{} bytes, not 32", bytes.len())))?;
        Ok(Self(Zeroizing::new(key)))
    }

    fn aead(&self) -> LessSafeKey {
        LessSafeKey::new(UnboundKey::new(&AES_256_GCM, self.0.as_ref()).expect("32-byte key"))
    }
}

/// What the store says about a key (no secret).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct KeyInfo {
    pub id: String,
    pub algorithm: String,
    /// The public key (SPKI PEM): what publishers encrypt layer keys to.
    pub public_pem: String,
    pub created: u64,
    pub revoked: bool,
}

#[derive(Serialize, Deserialize)]
struct Record {
    info: KeyInfo,
    /// nonce || AES-256-GCM(private PKCS#8 PEM) with the id as AAD.
    sealed: Vec<u8>,
}

/// Key kinds the broker makes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyKind {
    Rsa2048,
    Rsa4096,
    EcP256,
    EcP384,
}

pub struct KeyStore {
    db: sled::Db,
    keys: sled::Tree,
    master: MasterKey,
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn check_id(id: &str) -> Result<(), KeyStoreError> {
    if id.is_empty()
        || id.len() > 128
        || !id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./:".contains(&b))
    {
        return Err(KeyStoreError::Invalid(format!(
            "key id {id:?}: 1 to 128 of A-Z a-z 0-9 - _ . / :"
        )));
    }
    Ok(())
}

impl KeyStore {
    pub fn open(dir: &Path, master: MasterKey) -> Result<Self, KeyStoreError> {
        // A previous holder's background flusher may still hold sled's lock for a moment.
        let start = std::time::Instant::now();
        let db = loop {
            match sled::open(dir.join("keys.db")) {
                Ok(db) => break db,
                Err(sled::Error::Io(e))
                    if e.to_string().contains("lock")
                        && start.elapsed() < std::time::Duration::from_secs(10) =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                Err(e) => return Err(e.into()),
            }
        };
        let keys = db.open_tree("keys")?;
        Ok(Self { db, keys, master })
    }

    /// Generates a key pair and stores it sealed; returns its public information.
    pub fn create(&self, id: &str, kind: KeyKind) -> Result<KeyInfo, KeyStoreError> {
        use p256::pkcs8::{EncodePrivateKey, LineEnding};
        let mut rng = rand_core::OsRng;
        let pem: Zeroizing<String> = match kind {
            KeyKind::Rsa2048 | KeyKind::Rsa4096 => {
                let bits = if kind == KeyKind::Rsa2048 { 2048 } else { 4096 };
                rsa::RsaPrivateKey::new(&mut rng, bits)
                    .map_err(|e| KeyStoreError::Invalid(e.to_string()))?
                    .to_pkcs8_pem(LineEnding::LF)
                    .map_err(|e| KeyStoreError::Invalid(e.to_string()))?
            }
            KeyKind::EcP256 => p256::SecretKey::random(&mut rng)
                .to_pkcs8_pem(LineEnding::LF)
                .map_err(|e| KeyStoreError::Invalid(e.to_string()))?,
            KeyKind::EcP384 => p384::SecretKey::random(&mut rng)
                .to_pkcs8_pem(LineEnding::LF)
                .map_err(|e| KeyStoreError::Invalid(e.to_string()))?,
        };
        self.import(id, pem.as_bytes())
    }

    /// Stores an existing private key (PEM: PKCS#8, PKCS#1 or SEC1).
    pub fn import(&self, id: &str, private_pem: &[u8]) -> Result<KeyInfo, KeyStoreError> {
        check_id(id)?;
        let key = ocicrypt::keys::PrivateKey::from_pem(private_pem)
            .map_err(|e| KeyStoreError::Invalid(e.to_string()))?;
        let info = KeyInfo {
            id: id.to_string(),
            algorithm: key.algorithm().to_string(),
            public_pem: key.public_key().to_pem(),
            created: now(),
            revoked: false,
        };
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new()
            .fill(&mut nonce)
            .map_err(|_| KeyStoreError::Storage("no randomness".into()))?;
        let mut sealed = Zeroizing::new(private_pem.to_vec());
        self.master
            .aead()
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(id.as_bytes()),
                &mut *sealed,
            )
            .map_err(|_| KeyStoreError::Storage("sealing failed".into()))?;
        let mut stored = nonce.to_vec();
        stored.extend_from_slice(&sealed);
        let record = serde_json::to_vec(&Record {
            info: info.clone(),
            sealed: stored,
        })
        .expect("records serialize");
        self.keys
            .compare_and_swap(id, None as Option<&[u8]>, Some(record))?
            .map_err(|_| KeyStoreError::Exists(id.to_string()))?;
        self.db.flush()?;
        Ok(info)
    }

    fn record(&self, id: &str) -> Result<Record, KeyStoreError> {
        let bytes = self
            .keys
            .get(id)?
            .ok_or_else(|| KeyStoreError::NotFound(id.to_string()))?;
        serde_json::from_slice(&bytes).map_err(|_| KeyStoreError::Unseal(id.to_string()))
    }

    pub fn info(&self, id: &str) -> Result<KeyInfo, KeyStoreError> {
        Ok(self.record(id)?.info)
    }

    pub fn list(&self) -> Result<Vec<KeyInfo>, KeyStoreError> {
        self.keys
            .iter()
            .map(|r| {
                let (_, v) = r?;
                serde_json::from_slice::<Record>(&v)
                    .map(|r| r.info)
                    .map_err(|e| KeyStoreError::Storage(e.to_string()))
            })
            .collect()
    }

    /// The private key of a usable key, unsealed (zeroized on drop).
    pub fn private_key(&self, id: &str) -> Result<ocicrypt::keys::PrivateKey, KeyStoreError> {
        let record = self.record(id)?;
        if record.info.revoked {
            return Err(KeyStoreError::Revoked(id.to_string()));
        }
        if record.sealed.len() < NONCE_LEN {
            return Err(KeyStoreError::Unseal(id.to_string()));
        }
        let (nonce, ciphertext) = record.sealed.split_at(NONCE_LEN);
        let mut buf = Zeroizing::new(ciphertext.to_vec());
        let pem = self
            .master
            .aead()
            .open_in_place(
                Nonce::try_assume_unique_for_key(nonce)
                    .map_err(|_| KeyStoreError::Unseal(id.to_string()))?,
                Aad::from(id.as_bytes()),
                &mut buf,
            )
            .map_err(|_| KeyStoreError::Unseal(id.to_string()))?;
        ocicrypt::keys::PrivateKey::from_pem(pem).map_err(|e| KeyStoreError::Invalid(e.to_string()))
    }

    /// Marks a key revoked: it stays listed (for audit) but is never used again.
    pub fn revoke(&self, id: &str) -> Result<(), KeyStoreError> {
        let mut record = self.record(id)?;
        record.info.revoked = true;
        self.keys
            .insert(id, serde_json::to_vec(&record).expect("records serialize"))?;
        self.db.flush()?;
        Ok(())
    }
}
