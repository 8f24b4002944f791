//! Key-encryption keys at rest: records sealed with AES-256-GCM under a master key, kept in
//! the broker's [`Store`] (sled or PostgreSQL) only once sealed.
//!
//! The master key is a 32-byte file the broker creates with mode 0600 and refuses to use
//! when anyone else may read it (the embedded default), or sealed by the broker host's TPM
//! when configured ([`crate::sealing`]). Each record is sealed with the key id as associated data,
//! so records cannot be swapped between ids; a fresh random nonce per write.

use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::store::{Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum KeyStoreError {
    #[error("master key {path}: {message}")]
    MasterKey { path: String, message: String },
    #[error("key store: {0}")]
    Storage(String),
    /// The store failed (an operational failure).
    #[error(transparent)]
    Store(#[from] StoreError),
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

    pub(crate) fn from_bytes(key: Zeroizing<[u8; 32]>) -> Self {
        Self(key)
    }

    fn aead(&self) -> LessSafeKey {
        LessSafeKey::new(UnboundKey::new(&AES_256_GCM, self.0.as_ref()).expect("32-byte key"))
    }
}

/// What the store says about one version of a key (no secret).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct KeyInfo {
    pub id: String,
    /// 1 for a created or imported key; each rotation adds the next version.
    pub version: u32,
    pub algorithm: String,
    /// The public key (SPKI PEM): what publishers encrypt layer keys to.
    pub public_pem: String,
    pub created: u64,
    pub revoked: bool,
}

#[derive(Serialize, Deserialize)]
struct Record {
    info: KeyInfo,
    /// nonce || AES-256-GCM(private PKCS#8 PEM) with the id and version as AAD.
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

impl std::str::FromStr for KeyKind {
    type Err = KeyStoreError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "rsa-2048" => KeyKind::Rsa2048,
            "rsa-4096" => KeyKind::Rsa4096,
            "ec-p256" => KeyKind::EcP256,
            "ec-p384" => KeyKind::EcP384,
            other => {
                return Err(KeyStoreError::Invalid(format!(
                    "key kind {other:?}: one of rsa-2048, rsa-4096, ec-p256, ec-p384"
                )))
            }
        })
    }
}

impl KeyKind {
    /// The kind's name, as [`FromStr`](std::str::FromStr) parses it and the admin API takes it.
    pub fn name(self) -> &'static str {
        match self {
            KeyKind::Rsa2048 => "rsa-2048",
            KeyKind::Rsa4096 => "rsa-4096",
            KeyKind::EcP256 => "ec-p256",
            KeyKind::EcP384 => "ec-p384",
        }
    }

    /// A fresh private key of this kind (PKCS#8 PEM).
    fn generate(self) -> Result<Zeroizing<String>, KeyStoreError> {
        use p256::pkcs8::{EncodePrivateKey, LineEnding};
        let mut rng = rand_core::OsRng;
        let invalid = |e: &dyn std::fmt::Display| KeyStoreError::Invalid(e.to_string());
        match self {
            // aws-lc makes RSA keys (as it does every RSA private-key operation here).
            KeyKind::Rsa2048 | KeyKind::Rsa4096 => {
                let bits = if self == KeyKind::Rsa2048 { 2048 } else { 4096 };
                ocicrypt::keys::generate_rsa_pkcs8_pem(bits).map_err(|e| invalid(&e))
            }
            KeyKind::EcP256 => p256::SecretKey::random(&mut rng)
                .to_pkcs8_pem(LineEnding::LF)
                .map_err(|e| invalid(&e)),
            KeyKind::EcP384 => p384::SecretKey::random(&mut rng)
                .to_pkcs8_pem(LineEnding::LF)
                .map_err(|e| invalid(&e)),
        }
    }

    /// The kind of an existing key, for rotation.
    fn of(info: &KeyInfo) -> Result<Self, KeyStoreError> {
        match info.algorithm.as_str() {
            "EC P-256" => Ok(KeyKind::EcP256),
            "EC P-384" => Ok(KeyKind::EcP384),
            "RSA" => {
                let k = ocicrypt::keys::PublicKey::from_pem(info.public_pem.as_bytes())
                    .map_err(|e| KeyStoreError::Invalid(e.to_string()))?;
                Ok(if k.bits() > 2048 {
                    KeyKind::Rsa4096
                } else {
                    KeyKind::Rsa2048
                })
            }
            other => Err(KeyStoreError::Invalid(format!(
                "the broker cannot generate {other} keys; import the next version instead"
            ))),
        }
    }
}

pub struct KeyStore {
    store: Arc<dyn Store>,
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

/// The associated data a key version is sealed with: `id NUL version(BE)` (ids cannot
/// contain NUL), so a record cannot be moved to another id or version.
fn record_name(id: &str, version: u32) -> Vec<u8> {
    let mut k = id.as_bytes().to_vec();
    k.push(0);
    k.extend_from_slice(&version.to_be_bytes());
    k
}

impl KeyStore {
    /// The key store of a state directory's sled store.
    pub fn open(dir: &Path, master: MasterKey) -> Result<Self, KeyStoreError> {
        Ok(Self::new(
            Arc::new(crate::store::sled::SledStore::open(dir)?),
            master,
        ))
    }

    /// The key store over a store (sled or PostgreSQL).
    pub fn new(store: Arc<dyn Store>, master: MasterKey) -> Self {
        Self { store, master }
    }

    /// The store under the keys (enrollments, sessions and nonces live beside them).
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// Generates a key pair and stores it sealed as version 1; returns its public information.
    pub fn create(&self, id: &str, kind: KeyKind) -> Result<KeyInfo, KeyStoreError> {
        check_id(id)?;
        if !self.store.key_records(id)?.is_empty() {
            return Err(KeyStoreError::Exists(id.to_string()));
        }
        self.seal_and_store(id, 1, kind.generate()?.as_bytes())
    }

    /// Stores an existing private key (PEM: PKCS#8, PKCS#1 or SEC1) as version 1.
    pub fn import(&self, id: &str, private_pem: &[u8]) -> Result<KeyInfo, KeyStoreError> {
        check_id(id)?;
        if !self.store.key_records(id)?.is_empty() {
            return Err(KeyStoreError::Exists(id.to_string()));
        }
        self.seal_and_store(id, 1, private_pem)
    }

    /// Adds the next version of a key, of the same kind as the newest. Publishers wrap new
    /// images to it; earlier versions still unwrap existing images until revoked.
    pub fn rotate(&self, id: &str) -> Result<KeyInfo, KeyStoreError> {
        let newest = self.info(id)?;
        let kind = KeyKind::of(&newest)?;
        self.seal_and_store(id, newest.version + 1, kind.generate()?.as_bytes())
    }

    fn seal_and_store(
        &self,
        id: &str,
        version: u32,
        private_pem: &[u8],
    ) -> Result<KeyInfo, KeyStoreError> {
        let key = ocicrypt::keys::PrivateKey::from_pem(private_pem)
            .map_err(|e| KeyStoreError::Invalid(e.to_string()))?;
        let info = KeyInfo {
            id: id.to_string(),
            version,
            algorithm: key.algorithm().to_string(),
            public_pem: key.public_key().to_pem(),
            created: now(),
            revoked: false,
        };
        let name = record_name(id, version);
        let mut nonce = [0u8; NONCE_LEN];
        SystemRandom::new()
            .fill(&mut nonce)
            .map_err(|_| KeyStoreError::Storage("no randomness".into()))?;
        let mut sealed = Zeroizing::new(private_pem.to_vec());
        self.master
            .aead()
            .seal_in_place_append_tag(
                Nonce::assume_unique_for_key(nonce),
                Aad::from(name.as_slice()),
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
        if !self.store.insert_key_record(id, version, &record)? {
            return Err(KeyStoreError::Exists(format!("{id} version {version}")));
        }
        Ok(info)
    }

    fn decode(id: &str, bytes: &[u8]) -> Result<Record, KeyStoreError> {
        serde_json::from_slice(bytes).map_err(|_| KeyStoreError::Unseal(id.to_string()))
    }

    /// Every version of a key, oldest first.
    fn records(&self, id: &str) -> Result<Vec<Record>, KeyStoreError> {
        let records = self
            .store
            .key_records(id)?
            .iter()
            .map(|v| Self::decode(id, v))
            .collect::<Result<Vec<_>, _>>()?;
        if records.is_empty() {
            return Err(KeyStoreError::NotFound(id.to_string()));
        }
        Ok(records)
    }

    /// The newest version of a key.
    pub fn info(&self, id: &str) -> Result<KeyInfo, KeyStoreError> {
        Ok(self.records(id)?.pop().expect("not empty").info)
    }

    /// Every version of a key, oldest first.
    pub fn versions(&self, id: &str) -> Result<Vec<KeyInfo>, KeyStoreError> {
        Ok(self.records(id)?.into_iter().map(|r| r.info).collect())
    }

    /// Every version of every key.
    pub fn list(&self) -> Result<Vec<KeyInfo>, KeyStoreError> {
        self.store
            .all_key_records()?
            .iter()
            .map(|v| {
                serde_json::from_slice::<Record>(v)
                    .map(|r| r.info)
                    .map_err(|e| KeyStoreError::Storage(e.to_string()))
            })
            .collect()
    }

    /// One version's private key, unsealed (zeroized on drop); refused when revoked.
    pub fn private_key(
        &self,
        id: &str,
        version: u32,
    ) -> Result<ocicrypt::keys::PrivateKey, KeyStoreError> {
        let name = record_name(id, version);
        let bytes = self
            .store
            .key_record(id, version)?
            .ok_or_else(|| KeyStoreError::NotFound(format!("{id} version {version}")))?;
        let record = Self::decode(id, &bytes)?;
        if record.info.revoked {
            return Err(KeyStoreError::Revoked(format!("{id} version {version}")));
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
                Aad::from(name.as_slice()),
                &mut buf,
            )
            .map_err(|_| KeyStoreError::Unseal(id.to_string()))?;
        ocicrypt::keys::PrivateKey::from_pem(pem).map_err(|e| KeyStoreError::Invalid(e.to_string()))
    }

    /// Marks one version (`Some`) or every version (`None`) revoked: it stays listed (for
    /// audit) but is never used again. Returns the versions now revoked.
    pub fn revoke(&self, id: &str, version: Option<u32>) -> Result<Vec<KeyInfo>, KeyStoreError> {
        let mut changed = Vec::new();
        for mut record in self.records(id)? {
            if version.is_some_and(|v| v != record.info.version) {
                continue;
            }
            record.info.revoked = true;
            self.store.replace_key_record(
                id,
                record.info.version,
                &serde_json::to_vec(&record).expect("records serialize"),
            )?;
            changed.push(record.info);
        }
        if changed.is_empty() {
            return Err(KeyStoreError::NotFound(format!(
                "{id} version {}",
                version.unwrap_or(0)
            )));
        }
        Ok(changed)
    }
}
