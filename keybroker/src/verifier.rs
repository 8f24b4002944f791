//! Verifying TPM 2.0 quotes: the broker's side of attestation (the IPU's side, the prover,
//! is `ipu_image_svc::tpm`).
//!
//! The IPU quotes the PCRs its class's policy names with an enrolled attestation key (AK),
//! with qualifying data `SHA-256(nonce || ephemeral public key)`, so a quote proves a fresh
//! measurement *and* binds the session key the broker will encrypt layer keys to.
//!
//! Pure Rust on the broker (no TPM library needed): `TPMS_ATTEST` is parsed here field by
//! field (TPM 2.0 Library Part 2, 10.12), the ECDSA P-256 signature checked with ring.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use ring::digest::{digest, SHA256};
use ring::signature::{UnparsedPublicKey, ECDSA_P256_SHA256_FIXED};
use zeroize::Zeroizing;

pub use broker_protocol::{binding, Evidence};

use crate::credential::{self, Credential, EndorsementKey};
use crate::store::{Ephemeral, Store, StoreError};
use crate::tpm2::{Malformed, Reader, ALG_ECC, ALG_ECDAA, ALG_NULL, ALG_SHA256, ECC_NIST_P256};
use crate::tpm2::{ST_ATTEST_QUOTE, TPM_GENERATED};

/// A parsed `TPMS_ATTEST` of a quote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Quote {
    pub qualified_signer: Vec<u8>,
    pub extra_data: Vec<u8>,
    pub clock: u64,
    pub reset_count: u32,
    pub restart_count: u32,
    pub firmware_version: u64,
    /// (hash algorithm, selected PCR indexes in ascending order) per bank.
    pub selection: Vec<(u16, Vec<u8>)>,
    pub pcr_digest: Vec<u8>,
}

/// Why evidence was refused; each is audited by the caller.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AttestError {
    #[error("malformed quote: {0}")]
    Malformed(String),
    #[error("not an attestation key: {0}")]
    NotAnAttestationKey(String),
    #[error("the attestation key is not enrolled")]
    UnknownKey,
    #[error("the attestation key was revoked")]
    RevokedKey,
    #[error("the IPU class {0:?} is not in the running deployment policy")]
    UnknownClass(String),
    #[error("the attestation key has not proven it lives in the enrolled TPM (no or wrong credential activation)")]
    NotActivated,
    #[error("the quote signature does not verify with the enrolled attestation key")]
    BadSignature,
    #[error("the nonce was not issued by this broker, expired, or was already used")]
    StaleNonce,
    #[error("the quote is bound to another nonce or another ephemeral key")]
    WrongBinding,
    #[error("the quote covers PCRs {got:?} but the IPU class requires {want:?}")]
    WrongSelection { got: Vec<u8>, want: Vec<u8> },
    #[error("the quoted PCR digest does not match the PCR values sent")]
    PcrDigestMismatch,
    #[error("the attestation key's activation could not be recorded: {0}")]
    ActivationNotRecorded(String),
    #[error("PCR {index} is {got} but the IPU class expects {want}")]
    PcrMismatch {
        index: u8,
        got: String,
        want: String,
    },
    /// The broker's store failed: an operational failure, not a verdict on the evidence.
    #[error("{0}")]
    Store(StoreError),
}

impl AttestError {
    /// True for a failure of the broker itself (its store), not of the evidence.
    pub fn is_operational(&self) -> bool {
        matches!(self, AttestError::Store(_))
    }
}

impl From<Malformed> for AttestError {
    fn from(e: Malformed) -> Self {
        AttestError::Malformed(e.0)
    }
}

/// Why an enrollment (or its revocation) was refused or could not be recorded.
#[derive(Debug, thiserror::Error)]
pub enum EnrollmentError {
    /// The AK's template is not an attestation key, or does not parse.
    #[error(transparent)]
    AkTemplate(AttestError),
    #[error("endorsement key: {0}")]
    EkTemplate(Malformed),
    #[error("unknown IPU class {0:?} (not in the running deployment policy, or without PCR reference values)")]
    UnknownClass(String),
    #[error("the attestation key is not an uncompressed P-256 point")]
    BadPoint,
    #[error("IPU id {0:?}: 1 to 128 printable characters")]
    BadIpuId(String),
    #[error("this attestation key is enrolled for another IPU")]
    AkOfAnotherIpu,
    #[error("no IPU {0:?} is enrolled")]
    NotEnrolled(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("enrollment {key:?} is corrupt: {source}")]
    Corrupt {
        key: String,
        #[source]
        source: serde_json::Error,
    },
}

/// A deployment policy's IPU class this verifier cannot check quotes against.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ClassError {
    #[error("IPU class {class}: PCR bank {bank} (the broker verifies sha256 quotes)")]
    Bank { class: String, bank: String },
    #[error("IPU class {class}: PCR {index:?}")]
    PcrIndex { class: String, index: String },
    #[error("IPU class {class}: PCR {index} is not a SHA-256 hex digest")]
    PcrValue { class: String, index: u8 },
}

impl Quote {
    /// Parses a marshalled `TPMS_ATTEST` that must be a TPM-generated quote.
    pub fn parse(attest: &[u8]) -> Result<Self, AttestError> {
        let mut r = Reader::new(attest);
        if r.u32("magic")? != TPM_GENERATED {
            return Err(AttestError::Malformed(
                "not generated by a TPM (magic)".into(),
            ));
        }
        let kind = r.u16("type")?;
        if kind != ST_ATTEST_QUOTE {
            return Err(AttestError::Malformed(format!(
                "attestation type {kind:#06x} is not a quote"
            )));
        }
        let qualified_signer = r.tpm2b("qualifiedSigner")?;
        let extra_data = r.tpm2b("extraData")?;
        let clock = r.u64("clock")?;
        let reset_count = r.u32("resetCount")?;
        let restart_count = r.u32("restartCount")?;
        let _safe = r.u8("safe")?;
        let firmware_version = r.u64("firmwareVersion")?;
        let banks = r.u32("pcrSelect count")?;
        if banks > 16 {
            return Err(AttestError::Malformed(format!("{banks} PCR banks")));
        }
        let mut selection = Vec::new();
        for _ in 0..banks {
            let hash = r.u16("pcrSelect hash")?;
            let size = r.u8("sizeofSelect")? as usize;
            let bits = r.take(size, "pcrSelect")?;
            let indexes = (0..size * 8)
                .filter(|i| bits[i / 8] & (1 << (i % 8)) != 0)
                .map(|i| i as u8)
                .collect();
            selection.push((hash, indexes));
        }
        let pcr_digest = r.tpm2b("pcrDigest")?;
        if !r.done() {
            return Err(AttestError::Malformed(format!(
                "{} bytes after the quote",
                r.remaining()
            )));
        }
        Ok(Self {
            qualified_signer,
            extra_data,
            clock,
            reset_count,
            restart_count,
            firmware_version,
            selection,
            pcr_digest,
        })
    }
}

/// Reference values: the SHA-256 bank PCRs an IPU class must show.
pub type ReferencePcrs = BTreeMap<u8, Vec<u8>>;

/// Verifies evidence from an AK (`ak_public`: SEC1 uncompressed P-256 point) against the
/// nonce and ephemeral key it must be bound to and the class's reference PCR values.
pub fn verify_quote(
    evidence: &Evidence,
    ak_public: &[u8],
    nonce: &[u8],
    ephemeral_public: &[u8],
    reference: &ReferencePcrs,
) -> Result<Quote, AttestError> {
    // The signature first: nothing unauthenticated is interpreted beyond parsing.
    if evidence.signature.len() != 64 {
        return Err(AttestError::Malformed(format!(
            "signature of {} bytes (r || s of 32 bytes each)",
            evidence.signature.len()
        )));
    }
    UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, ak_public)
        .verify(&evidence.attest, &evidence.signature)
        .map_err(|_| AttestError::BadSignature)?;
    let quote = Quote::parse(&evidence.attest)?;
    if quote.extra_data != binding(nonce, ephemeral_public) {
        return Err(AttestError::WrongBinding);
    }
    let want: Vec<u8> = reference.keys().copied().collect();
    let got: Vec<u8> = match quote.selection.as_slice() {
        [(ALG_SHA256, idx)] => idx.clone(),
        _ => {
            return Err(AttestError::WrongSelection {
                got: quote
                    .selection
                    .iter()
                    .flat_map(|(_, i)| i.clone())
                    .collect(),
                want,
            })
        }
    };
    if got != want {
        return Err(AttestError::WrongSelection { got, want });
    }
    // The quoted digest covers the values the IPU sent (in selection order)...
    let sent: Vec<u8> = evidence.pcrs.keys().copied().collect();
    if sent != got {
        return Err(AttestError::WrongSelection {
            got: sent,
            want: got,
        });
    }
    let mut concat = Vec::new();
    for v in evidence.pcrs.values() {
        concat.extend_from_slice(v);
    }
    if digest(&SHA256, &concat).as_ref() != quote.pcr_digest.as_slice() {
        return Err(AttestError::PcrDigestMismatch);
    }
    // ...and those values are the class's reference values.
    for (index, want) in reference {
        let got = &evidence.pcrs[index];
        if got != want {
            return Err(AttestError::PcrMismatch {
                index: *index,
                got: hex::encode(got),
                want: hex::encode(want),
            });
        }
    }
    Ok(quote)
}

/// Nonces the broker issued, each usable once within its lifetime: in this process, or in
/// the broker's store (shared by its replicas). Only a nonce's SHA-256 is kept.
pub struct Nonces {
    pub(crate) lifetime: Duration,
    issued: NonceBackend,
}

enum NonceBackend {
    Memory(Ephemeral),
    Store(Arc<dyn Store>),
}

fn nonce_hash(nonce: &[u8]) -> [u8; 32] {
    digest(&SHA256, nonce)
        .as_ref()
        .try_into()
        .expect("SHA-256 is 32 bytes")
}

impl Nonces {
    /// Nonces kept in this process.
    pub fn new(lifetime: Duration) -> Self {
        Self {
            lifetime,
            issued: NonceBackend::Memory(Ephemeral::default()),
        }
    }

    /// Nonces kept in a store.
    pub fn in_store(lifetime: Duration, store: Arc<dyn Store>) -> Self {
        Self {
            lifetime,
            issued: NonceBackend::Store(store),
        }
    }

    /// A fresh random 32-byte nonce, recorded as issued.
    pub fn issue(&self) -> Result<Zeroizing<Vec<u8>>, StoreError> {
        let mut n = Zeroizing::new(vec![0u8; 32]);
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut n)
            .expect("system randomness");
        let hash = nonce_hash(&n);
        match &self.issued {
            NonceBackend::Memory(m) => m.issue_nonce(&hash, self.lifetime),
            NonceBackend::Store(s) => s.issue_nonce(&hash, self.lifetime)?,
        }
        Ok(n)
    }

    /// Consumes a nonce: true once per issued, unexpired nonce.
    pub fn consume(&self, nonce: &[u8]) -> Result<bool, StoreError> {
        let hash = nonce_hash(nonce);
        match &self.issued {
            NonceBackend::Memory(m) => Ok(m.consume_nonce(&hash)),
            NonceBackend::Store(s) => s.consume_nonce(&hash),
        }
    }
}

/// An enrolled attestation key.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Enrollment {
    pub ipu_id: String,
    pub ipu_class: String,
    pub revoked: bool,
    /// The endorsement key's TPMT_PUBLIC the AK must prove it shares a TPM with.
    #[serde(default, with = "opt_hex")]
    pub ek_template: Option<Vec<u8>>,
    /// The AK proved it (ActivateCredential) at an attestation.
    #[serde(default)]
    pub activated: bool,
    /// The AK's TPM name (nameAlg || H(TPMT_PUBLIC)), which a credential binds; set by
    /// [`Verifier::enroll_template`].
    #[serde(default, with = "opt_hex")]
    pub ak_name: Option<Vec<u8>>,
}

impl Enrollment {
    /// An AK is usable for attestation once it is pinned and activated, or was enrolled
    /// without an EK (trusting its template as provisioned).
    pub fn needs_activation(&self) -> bool {
        self.ek_template.is_some() && !self.activated
    }
}

mod opt_hex {
    use serde::{Deserialize, Deserializer, Serializer};
    pub fn serialize<S: Serializer>(v: &Option<Vec<u8>>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(b) => s.serialize_some(&hex::encode(b)),
            None => s.serialize_none(),
        }
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<u8>>, D::Error> {
        Option::<String>::deserialize(d)?
            .map(|h| hex::decode(h).map_err(serde::de::Error::custom))
            .transpose()
    }
}

/// An enrollment as stored and listed.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct EnrolledIpu {
    #[serde(with = "hex::serde")]
    pub ak_public: Vec<u8>,
    #[serde(flatten)]
    pub enrollment: Enrollment,
    /// Seconds since the epoch.
    pub enrolled: u64,
}

/// The reference values of every IPU class a deployment policy defines with SHA-256 PCRs.
/// A class measured only through an event log has no entry (this verifier checks PCRs).
pub fn classes_from_policy(
    policy: &policy::deploy::DeploymentPolicy,
) -> Result<HashMap<String, ReferencePcrs>, ClassError> {
    let mut classes = HashMap::new();
    for c in &policy.ipu_classes {
        if c.pcrs.is_empty() {
            continue;
        }
        if c.pcr_bank.get_ref() != "sha256" {
            return Err(ClassError::Bank {
                class: c.name.get_ref().to_string(),
                bank: c.pcr_bank.get_ref().to_string(),
            });
        }
        let mut pcrs = ReferencePcrs::new();
        for (index, value) in &c.pcrs {
            let i: u8 =
                index
                    .parse()
                    .ok()
                    .filter(|i| *i < 24)
                    .ok_or_else(|| ClassError::PcrIndex {
                        class: c.name.get_ref().to_string(),
                        index: index.to_string(),
                    })?;
            let v = hex::decode(value.get_ref())
                .ok()
                .filter(|v| v.len() == 32)
                .ok_or_else(|| ClassError::PcrValue {
                    class: c.name.get_ref().to_string(),
                    index: i,
                })?;
            pcrs.insert(i, v);
        }
        classes.insert(c.name.get_ref().to_string(), pcrs);
    }
    Ok(classes)
}

/// A credential's secret and when it was handed out.
type IssuedCredential = (Zeroizing<[u8; 32]>, Instant);

/// How long enrollments read from the store are trusted before they are read again: a
/// revocation made through another replica takes effect here within this time.
pub const ENROLLMENT_REFRESH: Duration = Duration::from_millis(250);

/// The broker's verifier: enrolled AKs, reference values per IPU class, issued nonces.
/// With a store, enrollments persist (and are shared by the replicas on that store), and
/// nonces live in the store (the sled store keeps them in memory).
pub struct Verifier {
    pub nonces: Nonces,
    enrolled: Mutex<HashMap<Vec<u8>, Enrollment>>,
    /// When each IPU was enrolled (seconds since the epoch), as stored.
    enrolled_times: Mutex<HashMap<String, u64>>,
    /// When the enrollments were last read from the store.
    read_at: Mutex<Option<Instant>>,
    classes: RwLock<HashMap<String, ReferencePcrs>>,
    store: Option<Arc<dyn Store>>,
    /// Credential secrets handed out for activation, by AK.
    credentials: Mutex<HashMap<Vec<u8>, IssuedCredential>>,
}

fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Verifier {
    pub fn new(classes: HashMap<String, ReferencePcrs>, nonce_lifetime: Duration) -> Self {
        Self {
            nonces: Nonces::new(nonce_lifetime),
            enrolled: Mutex::new(HashMap::new()),
            enrolled_times: Mutex::new(HashMap::new()),
            read_at: Mutex::new(None),
            classes: RwLock::new(classes),
            store: None,
            credentials: Mutex::new(HashMap::new()),
        }
    }

    /// A verifier whose enrollments and nonces live in `store` (enrollments loaded now,
    /// written through, and read again at most [`ENROLLMENT_REFRESH`] apart).
    pub fn with_store(
        classes: HashMap<String, ReferencePcrs>,
        nonce_lifetime: Duration,
        store: Arc<dyn Store>,
    ) -> Result<Self, EnrollmentError> {
        let v = Self {
            nonces: Nonces::in_store(nonce_lifetime, store.clone()),
            enrolled: Mutex::new(HashMap::new()),
            enrolled_times: Mutex::new(HashMap::new()),
            read_at: Mutex::new(None),
            classes: RwLock::new(classes),
            store: Some(store),
            credentials: Mutex::new(HashMap::new()),
        };
        v.refresh(true)?;
        Ok(v)
    }

    /// Reads the enrollments from the store again when they are older than
    /// [`ENROLLMENT_REFRESH`] (or always, `force`).
    fn refresh(&self, force: bool) -> Result<(), EnrollmentError> {
        let Some(store) = &self.store else {
            return Ok(());
        };
        let mut read_at = self.read_at.lock().expect("not poisoned");
        if !force && read_at.is_some_and(|t| t.elapsed() < ENROLLMENT_REFRESH) {
            return Ok(());
        }
        let mut enrolled = HashMap::new();
        let mut times = HashMap::new();
        for (key, v) in store.enrollments()? {
            let e: EnrolledIpu = serde_json::from_slice(&v)
                .map_err(|source| EnrollmentError::Corrupt { key, source })?;
            times.insert(e.enrollment.ipu_id.clone(), e.enrolled);
            enrolled.insert(e.ak_public, e.enrollment);
        }
        *self.enrolled.lock().expect("not poisoned") = enrolled;
        *self.enrolled_times.lock().expect("not poisoned") = times;
        *read_at = Some(Instant::now());
        Ok(())
    }

    fn refreshed(&self) -> Result<(), AttestError> {
        self.refresh(false).map_err(|e| match e {
            EnrollmentError::Store(e) => AttestError::Store(e),
            other => AttestError::Malformed(other.to_string()),
        })
    }

    /// Whether an IPU may still use its sessions: enrolled and not revoked (as the store
    /// says, at most [`ENROLLMENT_REFRESH`] ago).
    pub fn ipu_usable(&self, ipu_id: &str) -> Result<bool, AttestError> {
        self.refreshed()?;
        Ok(self
            .enrolled
            .lock()
            .expect("not poisoned")
            .values()
            .any(|e| e.ipu_id == ipu_id && !e.revoked))
    }

    /// Replaces the reference values (a new deployment policy was loaded).
    pub fn set_classes(&self, classes: HashMap<String, ReferencePcrs>) {
        *self.classes.write().expect("not poisoned") = classes;
    }

    /// Enrolls an AK from its marshalled `TPMT_PUBLIC` (see [`check_ak_template`]); returns
    /// its public point, the key quotes are then checked with.
    pub fn enroll_template(
        &self,
        template: &[u8],
        mut e: Enrollment,
    ) -> Result<Vec<u8>, EnrollmentError> {
        let point = check_ak_template(template).map_err(EnrollmentError::AkTemplate)?;
        if let Some(ek) = &e.ek_template {
            EndorsementKey::parse(ek).map_err(EnrollmentError::EkTemplate)?;
        }
        e.ak_name = Some(credential::object_name(template));
        e.activated = false;
        self.enroll(&point, e)?;
        Ok(point)
    }

    /// A credential for an AK that must still prove it shares a TPM with its enrolled EK
    /// (`None` when no proof is due). The secret is kept until the next attestation.
    pub fn credential_for(&self, ak_public: &[u8]) -> Result<Option<Credential>, AttestError> {
        let e = self.enrollment(ak_public)?;
        let Some(ek) = e.ek_template.as_ref().filter(|_| !e.activated) else {
            return Ok(None);
        };
        let ek = EndorsementKey::parse(ek)
            .map_err(|e| AttestError::Malformed(format!("endorsement key: {e}")))?;
        let name = e
            .ak_name
            .clone()
            .ok_or_else(|| AttestError::Malformed("no AK name recorded at enrollment".into()))?;
        let mut secret = Zeroizing::new([0u8; 32]);
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), secret.as_mut())
            .expect("system randomness");
        let credential = credential::make_credential(&ek, &name, secret.as_ref());
        self.credentials
            .lock()
            .expect("not poisoned")
            .insert(ak_public.to_vec(), (secret, Instant::now()));
        Ok(Some(credential))
    }

    /// Enrolls an AK (SEC1 point) for an IPU of a known class. An IPU enrolled again (a new
    /// AK after re-provisioning) replaces its earlier AK.
    pub fn enroll(&self, ak_public: &[u8], e: Enrollment) -> Result<(), EnrollmentError> {
        if !self
            .classes
            .read()
            .expect("not poisoned")
            .contains_key(&e.ipu_class)
        {
            return Err(EnrollmentError::UnknownClass(e.ipu_class));
        }
        if ak_public.len() != 65 || ak_public[0] != 4 {
            return Err(EnrollmentError::BadPoint);
        }
        if e.ipu_id.is_empty() || e.ipu_id.len() > 128 || e.ipu_id.contains(char::is_control) {
            return Err(EnrollmentError::BadIpuId(e.ipu_id));
        }
        self.refresh(true)?;
        let mut enrolled = self.enrolled.lock().expect("not poisoned");
        if enrolled
            .iter()
            .any(|(ak, x)| x.ipu_id != e.ipu_id && ak.as_slice() == ak_public)
        {
            return Err(EnrollmentError::AkOfAnotherIpu);
        }
        self.persist(&EnrolledIpu {
            ak_public: ak_public.to_vec(),
            enrollment: e.clone(),
            enrolled: now_secs(),
        })?;
        enrolled.retain(|_, x| x.ipu_id != e.ipu_id);
        enrolled.insert(ak_public.to_vec(), e);
        Ok(())
    }

    fn persist(&self, e: &EnrolledIpu) -> Result<(), EnrollmentError> {
        if let Some(store) = &self.store {
            store.put_enrollment(
                &e.enrollment.ipu_id,
                &serde_json::to_vec(e).expect("enrollments serialize"),
            )?;
            self.enrolled_times
                .lock()
                .expect("not poisoned")
                .insert(e.enrollment.ipu_id.clone(), e.enrolled);
        }
        Ok(())
    }

    /// Revokes an AK; false if it is not enrolled.
    pub fn revoke(&self, ak_public: &[u8]) -> bool {
        let ipu = self
            .enrolled
            .lock()
            .expect("not poisoned")
            .get(ak_public)
            .map(|e| e.ipu_id.clone());
        ipu.is_some_and(|id| self.revoke_ipu(&id).is_ok())
    }

    /// Revokes an IPU's AK: its quotes are refused from now on (it stays listed).
    pub fn revoke_ipu(&self, ipu_id: &str) -> Result<EnrolledIpu, EnrollmentError> {
        self.refresh(true)?;
        let mut enrolled = self.enrolled.lock().expect("not poisoned");
        let (ak, e) = enrolled
            .iter_mut()
            .find(|(_, e)| e.ipu_id == ipu_id)
            .ok_or_else(|| EnrollmentError::NotEnrolled(ipu_id.to_string()))?;
        let mut updated = e.clone();
        updated.revoked = true;
        let record = EnrolledIpu {
            ak_public: ak.clone(),
            enrollment: updated.clone(),
            enrolled: self.enrolled_at(ipu_id),
        };
        self.persist(&record)?;
        *e = updated;
        Ok(record)
    }

    fn enrolled_at(&self, ipu_id: &str) -> u64 {
        self.enrolled_times
            .lock()
            .expect("not poisoned")
            .get(ipu_id)
            .copied()
            .unwrap_or(0)
    }

    /// Every enrollment, by IPU id.
    pub fn list(&self) -> Result<Vec<EnrolledIpu>, EnrollmentError> {
        self.refresh(false)?;
        let enrolled = self.enrolled.lock().expect("not poisoned");
        let mut all: Vec<EnrolledIpu> = enrolled
            .iter()
            .map(|(ak, e)| EnrolledIpu {
                ak_public: ak.clone(),
                enrollment: e.clone(),
                enrolled: self.enrolled_at(&e.ipu_id),
            })
            .collect();
        all.sort_by(|a, b| a.enrollment.ipu_id.cmp(&b.enrollment.ipu_id));
        Ok(all)
    }

    /// The whole check: the nonce is ours and unused (consumed now, even if the rest fails),
    /// the AK is enrolled and not revoked, and the quote verifies against its class.
    pub fn verify(
        &self,
        evidence: &Evidence,
        ak_public: &[u8],
        nonce: &[u8],
        ephemeral_public: &[u8],
    ) -> Result<(Enrollment, Quote), AttestError> {
        self.verify_activated(evidence, ak_public, nonce, ephemeral_public, None)
    }

    /// [`verify`](Self::verify) for an AK that may still owe the proof that it shares a TPM
    /// with its enrolled EK: `activation` is the secret ActivateCredential recovered from the
    /// challenge's credential. The first attestation that carries it activates the AK.
    pub fn verify_activated(
        &self,
        evidence: &Evidence,
        ak_public: &[u8],
        nonce: &[u8],
        ephemeral_public: &[u8],
        activation: Option<&[u8]>,
    ) -> Result<(Enrollment, Quote), AttestError> {
        if !self.nonces.consume(nonce).map_err(AttestError::Store)? {
            return Err(AttestError::StaleNonce);
        }
        let mut enrollment = self.enrollment(ak_public)?;
        if enrollment.needs_activation() {
            let issued = self
                .credentials
                .lock()
                .expect("not poisoned")
                .remove(ak_public);
            let proven = match (issued, activation) {
                (Some((secret, at)), Some(answer)) => {
                    at.elapsed() < self.nonces.lifetime
                        && bool::from(subtle::ConstantTimeEq::ct_eq(secret.as_slice(), answer))
                }
                _ => false,
            };
            if !proven {
                return Err(AttestError::NotActivated);
            }
        }
        let reference = self.reference(&enrollment.ipu_class)?;
        let quote = verify_quote(evidence, ak_public, nonce, ephemeral_public, &reference)?;
        if enrollment.needs_activation() {
            enrollment.activated = true;
            self.update(ak_public, &enrollment)
                .map_err(|e| AttestError::ActivationNotRecorded(e.to_string()))?;
        }
        Ok((enrollment, quote))
    }

    fn update(&self, ak_public: &[u8], e: &Enrollment) -> Result<(), EnrollmentError> {
        self.persist(&EnrolledIpu {
            ak_public: ak_public.to_vec(),
            enrollment: e.clone(),
            enrolled: self.enrolled_at(&e.ipu_id),
        })?;
        if let Some(current) = self
            .enrolled
            .lock()
            .expect("not poisoned")
            .get_mut(ak_public)
        {
            *current = e.clone();
        }
        Ok(())
    }

    /// The enrollment of a usable (enrolled, unrevoked) AK.
    pub fn enrollment(&self, ak_public: &[u8]) -> Result<Enrollment, AttestError> {
        self.refreshed()?;
        let enrollment = self
            .enrolled
            .lock()
            .expect("not poisoned")
            .get(ak_public)
            .cloned()
            .ok_or(AttestError::UnknownKey)?;
        if enrollment.revoked {
            return Err(AttestError::RevokedKey);
        }
        Ok(enrollment)
    }

    fn reference(&self, class: &str) -> Result<ReferencePcrs, AttestError> {
        self.classes
            .read()
            .expect("not poisoned")
            .get(class)
            .cloned()
            .ok_or_else(|| AttestError::UnknownClass(class.to_string()))
    }

    /// The PCR indexes a class requires (what the IPU must quote).
    pub fn pcrs_of(&self, class: &str) -> Option<Vec<u8>> {
        self.classes
            .read()
            .expect("not poisoned")
            .get(class)
            .map(|r| r.keys().copied().collect())
    }
}

/// Checks an AK's marshalled `TPMT_PUBLIC` at enrollment: an ECC P-256 key that never left
/// the TPM (fixedTPM, fixedParent, sensitiveDataOrigin), restricted to signing TPM-made
/// structures (restricted, sign, not decrypt: an endorsement key is a decryption key and is
/// refused). Returns its public point (SEC1 uncompressed).
pub fn check_ak_template(template: &[u8]) -> Result<Vec<u8>, AttestError> {
    use crate::tpm2::object_attributes::*;
    let mut r = Reader::new(template);
    if r.u16("type")? != ALG_ECC {
        return Err(AttestError::Malformed(
            "the attestation key is not an ECC key".into(),
        ));
    }
    let _name_alg = r.u16("nameAlg")?;
    let attrs = r.u32("objectAttributes")?;
    let required = FIXED_TPM | FIXED_PARENT | SENSITIVE_DATA_ORIGIN | RESTRICTED | SIGN;
    if attrs & required != required || attrs & DECRYPT != 0 {
        return Err(AttestError::NotAnAttestationKey(format!(
            "object attributes {attrs:#010x}: an attestation key must be fixedTPM, fixedParent, sensitiveDataOrigin, restricted and sign, and must not decrypt"
        )));
    }
    let _auth_policy = r.tpm2b("authPolicy")?;
    if r.u16("symmetric")? != ALG_NULL {
        let _bits = r.u16("symmetric keyBits")?;
        let _mode = r.u16("symmetric mode")?;
    }
    let scheme = r.u16("scheme")?;
    if scheme != ALG_NULL {
        let _hash = r.u16("scheme hashAlg")?;
        if scheme == ALG_ECDAA {
            let _count = r.u16("ECDAA count")?;
        }
    }
    if r.u16("curveID")? != ECC_NIST_P256 {
        return Err(AttestError::Malformed(
            "the attestation key is not on P-256".into(),
        ));
    }
    if r.u16("kdf")? != ALG_NULL {
        let _hash = r.u16("kdf hashAlg")?;
    }
    let (x, y) = (r.tpm2b("x")?, r.tpm2b("y")?);
    if x.len() > 32 || y.len() > 32 || !r.done() {
        return Err(AttestError::Malformed(
            "the attestation key's point is malformed".into(),
        ));
    }
    let mut point = vec![0x04];
    point.extend(std::iter::repeat_n(0u8, 32 - x.len()));
    point.extend(&x);
    point.extend(std::iter::repeat_n(0u8, 32 - y.len()));
    point.extend(&y);
    Ok(point)
}
