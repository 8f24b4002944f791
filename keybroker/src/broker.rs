//! The broker's decisions, transport-free: attest an IPU into a short session bound to its
//! ephemeral key and its client identity, then release layer keys within that session when
//! the deployment policy allows, sealed to the session key; wrap layer keys for publishers
//! (the key provider door); and administration. Every grant, denial and change is audited
//! with its reason.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use audit::{AuditSink, Event, EventKind, KeyId, Outcome};
use policy::deploy::bundle::{BundleError, VerifiedBundle};
use policy::deploy::{evaluate_key_release, DeployRequest, DeploymentPolicy};
use policy::sigstore::{KeyFileError, VerificationKey};
use zeroize::Zeroizing;

use broker_protocol::DEFAULT_PROVIDER_NAME;
use broker_protocol::{binding, release_context, seal, Evidence, ReleaseError, SealedKey};

use crate::credential::Credential;
use crate::keystore::{KeyInfo, KeyKind, KeyStore, KeyStoreError, MasterKey};
use crate::store::{SessionRecord, Store, StoreError, StoreLocation};
use crate::verifier::{classes_from_policy, AttestError, ClassError, EnrolledIpu, Enrollment};
use crate::verifier::{EnrollmentError, Verifier};
use crate::wrapping::{ProviderWrapping, WrappingError};

pub const AUDIT_SERVICE: &str = "keybroker";

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("attestation refused: {0}")]
    Attestation(#[from] AttestError),
    #[error("no such session, or it expired: attest again")]
    NoSession,
    #[error("the session belongs to another client")]
    WrongClient,
    #[error("denied by policy: {0}")]
    Denied(String),
    #[error("the layer is not wrapped to any key the policy allows here ({0})")]
    NoUsableKey(String),
    /// The release's placement grant is missing, does not verify, or does not cover it.
    #[error("placement grant refused ({code}): {message}")]
    Grant {
        code: &'static str,
        message: String,
        /// The grant's serial, when it could be read.
        serial: Option<String>,
    },
    // Malformed requests; each an invalid argument for a caller.
    /// The provider annotation does not split into wrappings.
    #[error("malformed request: {0}")]
    Annotation(#[source] ocicrypt::Error),
    /// The private options cannot be wrapped (key provider WrapKey).
    #[error("malformed request: {0}")]
    Wrap(#[source] ocicrypt::Error),
    #[error("malformed request: the wrapping does not open: {0}")]
    WrappingDoesNotOpen(#[source] ocicrypt::Error),
    #[error("malformed request: no wrapping")]
    NoWrapping,
    /// A key provider annotation that is not this broker's wrapping.
    #[error("malformed request: {0}")]
    Wrapping(#[from] WrappingError),
    /// The session key given at attestation cannot be sealed to.
    #[error("malformed request: {0}")]
    Seal(#[from] ReleaseError),
    #[error("audit log: {0}")]
    Audit(#[from] audit::AuditError),
    #[error("key store: {0}")]
    KeyStore(#[from] KeyStoreError),
    /// The broker's store failed: an operational failure (nothing granted, nothing denied).
    #[error(transparent)]
    Store(#[from] StoreError),
    // The broker's state and administration; each a failed precondition for a caller.
    #[error("{}: {source}", path.display())]
    StateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} exists but the master key is to be TPM-sealed: this state was made with a master key file", .0.display())]
    MasterKeyIsFile(PathBuf),
    #[error("the master key is TPM-sealed ({}): configure the TPM (master_key_tpm)", .0.display())]
    MasterKeyIsSealed(PathBuf),
    #[error("policy bundle keys: {0}")]
    BundleKey(#[from] KeyFileError),
    /// The running policy bundle does not verify.
    #[error("the running policy bundle ({place}) does not verify: {source}")]
    RunningPolicy {
        place: String,
        #[source]
        source: BundleError,
    },
    #[error(transparent)]
    Class(#[from] ClassError),
    #[error(transparent)]
    Enrollment(#[from] EnrollmentError),
    #[error("enrollment needs the IPU's endorsement key (--ek-template), so its attestation key can prove it lives in that TPM")]
    EndorsementKeyRequired,
    #[error("{0}")]
    PublicKey(#[source] ocicrypt::Error),
    #[error("this broker was started with a fixed policy")]
    FixedPolicy,
    #[error("no bundle keys are configured: policy bundles cannot be trusted")]
    NoBundleKeys,
    /// Policy bundle installs kept losing to other replicas' installs.
    #[error(
        "the running policy bundle kept changing while this one was being installed: try again"
    )]
    PolicyContention,
}

impl BrokerError {
    /// A failure of the broker's store, not a decision: callers see an unavailable service,
    /// and the audit log records a failure (never a grant or a denial).
    pub fn is_operational(&self) -> bool {
        match self {
            BrokerError::Store(_) | BrokerError::KeyStore(KeyStoreError::Store(_)) => true,
            BrokerError::Attestation(e) => e.is_operational(),
            BrokerError::Enrollment(crate::verifier::EnrollmentError::Store(_)) => true,
            _ => false,
        }
    }
}

/// An attested session (public material only: it is kept in the broker's store, which
/// its replicas share).
#[derive(Clone, Debug)]
pub struct Session {
    pub id: String,
    pub ipu_id: String,
    pub ipu_class: String,
    /// The client certificate identity that attested; only it may use the session.
    pub client: String,
    session_public: Vec<u8>,
    salt: [u8; 32],
    expires: SystemTime,
}

impl Session {
    pub fn expires_in(&self) -> Duration {
        self.expires
            .duration_since(SystemTime::now())
            .unwrap_or_default()
    }

    fn record(&self) -> SessionRecord {
        SessionRecord {
            id: self.id.clone(),
            ipu_id: self.ipu_id.clone(),
            ipu_class: self.ipu_class.clone(),
            client: self.client.clone(),
            session_public: self.session_public.clone(),
            salt: self.salt,
            expires: self.expires,
        }
    }
}

impl From<SessionRecord> for Session {
    fn from(r: SessionRecord) -> Self {
        Self {
            id: r.id,
            ipu_id: r.ipu_id,
            ipu_class: r.ipu_class,
            client: r.client,
            session_public: r.session_public,
            salt: r.salt,
            expires: r.expires,
        }
    }
}

/// How a layer's key is wrapped: the annotation the IPU forwards.
#[derive(Clone, Debug)]
pub enum Wrapped {
    /// `org.opencontainers.image.enc.keys.jwe`.
    Jwe(String),
    /// `org.opencontainers.image.enc.keys.provider.<this broker's name>`.
    Provider(String),
}

/// What the IPU asks for one layer.
#[derive(Clone, Debug)]
pub struct ReleaseRequest {
    pub session_id: String,
    pub tenant: String,
    pub function: String,
    /// The image reference as deployed.
    pub image: String,
    pub image_digest: String,
    pub layer_digest: String,
    pub wrapped: Wrapped,
    /// The placement grant the IPU admitted the start with (a DSSE envelope), if any.
    pub grant: Option<String>,
}

/// Where the broker keeps its state and whom it trusts for policy bundles.
#[derive(Clone, Debug)]
pub struct BrokerOptions {
    /// Key store, enrollments, master key (embedded default), running policy bundle.
    pub state_dir: PathBuf,
    /// Keys that sign deployment policy bundles.
    pub bundle_keys: Vec<PathBuf>,
    pub session_ttl: Duration,
    pub nonce_lifetime: Duration,
    /// The key provider name publishers use (`provider:<name>:<key id>`).
    pub provider_name: String,
    /// Seal the master key with this TPM (a tpm2-tss TCTI) instead of keeping it in a 0600
    /// file.
    pub master_key_tpm: Option<String>,
    /// Enroll IPUs only with their endorsement key, so each AK proves (ActivateCredential)
    /// that it lives in that TPM before its first session.
    pub require_ek: bool,
    /// Where the state lives: sled in `state_dir` (the default) or PostgreSQL (the master
    /// key, the audit log and the sled lock stay in `state_dir` either way).
    pub store: StoreLocation,
}

impl BrokerOptions {
    pub fn new(state_dir: impl Into<PathBuf>) -> Self {
        Self {
            state_dir: state_dir.into(),
            bundle_keys: Vec::new(),
            session_ttl: Duration::from_secs(300),
            nonce_lifetime: Duration::from_secs(60),
            provider_name: DEFAULT_PROVIDER_NAME.into(),
            master_key_tpm: None,
            require_ek: true,
            store: StoreLocation::Sled,
        }
    }

    /// The master key: from the file, or unsealed by the TPM; a state directory set up one
    /// way is never opened the other way (its records would not open).
    fn master_key(&self) -> Result<MasterKey, BrokerError> {
        let file = self.state_dir.join("master.key");
        let sealed = self.state_dir.join("master.sealed");
        match &self.master_key_tpm {
            Some(tcti) => {
                if file.exists() {
                    return Err(BrokerError::MasterKeyIsFile(file));
                }
                Ok(crate::sealing::load_or_create_sealed(&sealed, tcti)?)
            }
            None => {
                if sealed.exists() {
                    return Err(BrokerError::MasterKeyIsSealed(sealed));
                }
                Ok(MasterKey::load_or_create(&file)?)
            }
        }
    }
}

/// The serial a grant envelope claims, read without verifying it (for the audit record of
/// a release whose grant is refused later, or not checked at all).
fn grant_serial(envelope: &str) -> Option<String> {
    policy::grant::inspect(envelope.as_bytes())
        .ok()
        .and_then(|u| u.grant.ok())
        .map(|g| g.serial)
}

/// When the running policy names grant keys, a release needs a placement grant that
/// verifies for the attested IPU (signature by a key trusted for its tenant, window, IPU,
/// image) and names the release's tenant and function; a reference pinned by a digest must
/// be released for that digest. The host is not checked here (the broker does not see the
/// export), nor the serial's single use (one start releases several layers, and again on a
/// warm start; the IPU claims the serial once). A policy without grant keys ignores grants.
fn check_grant(
    policy: &DeploymentPolicy,
    session: &Session,
    req: &ReleaseRequest,
    now: std::time::SystemTime,
) -> Result<(), BrokerError> {
    if !policy.grants_required() {
        return Ok(());
    }
    let refuse = |code, message: String, serial: Option<String>| BrokerError::Grant {
        code,
        message,
        serial,
    };
    let Some(envelope) = req.grant.as_deref().filter(|g| !g.is_empty()) else {
        return Err(refuse(
            "no-grant",
            "the running policy requires a placement grant, and the release carries none".into(),
            None,
        ));
    };
    let verified = policy::grant::verify(
        envelope.as_bytes(),
        policy,
        &policy::grant::Expectation {
            ipu: &session.ipu_id,
            host: None,
            image: &req.image,
            now,
        },
    )
    .map_err(|e| refuse(e.reason_code(), e.to_string(), grant_serial(envelope)))?;
    let serial = Some(verified.serial().to_string());
    for (what, asked, granted) in [
        ("tenant", &req.tenant, verified.tenant()),
        ("function", &req.function, verified.function()),
    ] {
        if asked != granted {
            return Err(refuse(
                "request-mismatch",
                format!("the release names {what} {asked:?}, the grant {granted:?}"),
                serial,
            ));
        }
    }
    let pinned = policy::reference::ImageReference::parse(&req.image)
        .ok()
        .and_then(|r| r.docker_reference().and_then(|d| d.digest()).cloned());
    if let Some(pinned) = pinned {
        if pinned.to_string() != req.image_digest {
            return Err(refuse(
                "request-mismatch",
                format!(
                    "the release is for manifest {}, the granted reference is pinned by {pinned}",
                    req.image_digest
                ),
                serial,
            ));
        }
    }
    Ok(())
}

/// Who asked for an administrative change, for its audit event.
pub fn actor(subject: &str) -> audit::event::Actor {
    audit::event::Actor {
        subject: Some(subject.to_string()),
        ..Default::default()
    }
}

/// How long the running policy read from the store is trusted before the store is asked
/// again: a bundle loaded through another replica is enforced here within this time.
pub const POLICY_REFRESH: Duration = Duration::from_millis(250);

/// The running policy as this broker enforces it.
struct Running {
    /// `None` until a deployment policy is loaded: every release is denied.
    policy: Option<Arc<DeploymentPolicy>>,
    /// The bundle's version (`None`: a fixed policy, or none loaded).
    version: Option<u64>,
    /// When the store was last asked for the running version.
    checked: Option<Instant>,
}

pub struct Broker {
    pub verifier: Verifier,
    keys: KeyStore,
    /// The broker's state (the key store's): sessions, nonces, enrollments, policy bundle.
    store: Arc<dyn Store>,
    running: RwLock<Running>,
    /// Keys trusted to sign policy bundles (`None`: a fixed policy).
    trusted: Option<Vec<VerificationKey>>,
    session_ttl: Duration,
    audit: Arc<dyn AuditSink>,
    provider_name: String,
    require_ek: bool,
    /// Unsealed, parsed keys by (id, version) (parsing an RSA key costs milliseconds);
    /// dropped, and zeroized, with the broker. Revocation is checked on every release.
    unsealed: Mutex<HashMap<(String, u32), Arc<ocicrypt::keys::PrivateKey>>>,
}

fn random_id() -> String {
    let mut b = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b)
        .expect("system randomness");
    hex::encode(b)
}

impl Broker {
    /// A broker with a fixed policy and in-memory enrollments (tests, embedded use).
    pub fn new(
        verifier: Verifier,
        keys: KeyStore,
        policy: DeploymentPolicy,
        session_ttl: Duration,
        audit: Arc<dyn AuditSink>,
    ) -> Self {
        Self {
            verifier,
            store: keys.store().clone(),
            keys,
            running: RwLock::new(Running {
                policy: Some(Arc::new(policy)),
                version: None,
                checked: None,
            }),
            trusted: None,
            session_ttl,
            audit,
            provider_name: DEFAULT_PROVIDER_NAME.into(),
            require_ek: false,
            unsealed: Mutex::new(HashMap::new()),
        }
    }

    /// The broker of a state directory and its store: the key store (master key created on
    /// first use), persisted enrollments, and the running policy bundle re-verified with the
    /// trusted bundle keys. With sled, sessions and nonces start empty; with PostgreSQL they
    /// are the replicas' shared ones.
    pub fn open(opts: &BrokerOptions, audit: Arc<dyn AuditSink>) -> Result<Self, BrokerError> {
        let dir = &opts.state_dir;
        std::fs::create_dir_all(dir).map_err(|source| BrokerError::StateDir {
            path: dir.clone(),
            source,
        })?;
        let master = opts.master_key()?;
        let store = crate::store::open(&opts.store, dir)?;
        let keys = KeyStore::new(store.clone(), master);
        let trusted = VerificationKey::from_pem_files(&opts.bundle_keys)?;
        let running = running_bundle(store.as_ref(), &trusted)?;
        let classes = match &running {
            Some(b) => classes_from_policy(&b.deployment)?,
            None => HashMap::new(),
        };
        let verifier = Verifier::with_store(classes, opts.nonce_lifetime, store.clone())?;
        Ok(Self {
            verifier,
            keys,
            store,
            running: RwLock::new(Running {
                version: running.as_ref().map(|b| b.content.version),
                policy: running.map(|b| Arc::new(b.deployment)),
                checked: Some(Instant::now()),
            }),
            trusted: Some(trusted),
            session_ttl: opts.session_ttl,
            audit,
            provider_name: opts.provider_name.clone(),
            require_ek: opts.require_ek,
            unsealed: Mutex::new(HashMap::new()),
        })
    }

    /// The key store, for reading (administration goes through the audited methods).
    pub fn keys(&self) -> &KeyStore {
        &self.keys
    }

    pub fn provider_name(&self) -> &str {
        &self.provider_name
    }

    /// Replaces the deployment policy (after its bundle was verified and audited).
    pub fn set_policy(&self, policy: DeploymentPolicy) -> Result<(), BrokerError> {
        self.set_running(policy, None)
    }

    fn set_running(
        &self,
        policy: DeploymentPolicy,
        version: Option<u64>,
    ) -> Result<(), BrokerError> {
        let classes = classes_from_policy(&policy)?;
        let mut running = self.running.write().expect("not poisoned");
        self.verifier.set_classes(classes);
        running.policy = Some(Arc::new(policy));
        running.version = version;
        running.checked = Some(Instant::now());
        Ok(())
    }

    /// The running policy, after asking the store (at most [`POLICY_REFRESH`] apart)
    /// whether another replica installed a newer bundle.
    fn current_policy(&self) -> Result<Option<Arc<DeploymentPolicy>>, BrokerError> {
        let Some(trusted) = &self.trusted else {
            return Ok(self.running.read().expect("not poisoned").policy.clone());
        };
        {
            let running = self.running.read().expect("not poisoned");
            if running
                .checked
                .is_some_and(|t| t.elapsed() < POLICY_REFRESH)
            {
                return Ok(running.policy.clone());
            }
        }
        let version = self.store.running_bundle_version()?;
        if version == self.running.read().expect("not poisoned").version {
            let mut running = self.running.write().expect("not poisoned");
            running.checked = Some(Instant::now());
            return Ok(running.policy.clone());
        }
        match running_bundle(self.store.as_ref(), trusted)? {
            Some(b) => self.set_running(b.deployment, Some(b.content.version))?,
            None => {
                let mut running = self.running.write().expect("not poisoned");
                running.checked = Some(Instant::now());
            }
        }
        Ok(self.running.read().expect("not poisoned").policy.clone())
    }

    fn record(&self, e: Event) -> Result<(), BrokerError> {
        self.audit.append(e).map(|_| ()).map_err(BrokerError::Audit)
    }

    /// An attestation the broker could not decide (its store failed): a failure, not a
    /// denial.
    fn attestation_failed(
        &self,
        who: audit::event::Actor,
        e: &StoreError,
    ) -> Result<(), BrokerError> {
        self.record(
            Event::new(
                AUDIT_SERVICE,
                EventKind::AttestationVerify,
                Outcome::Failure,
                e.to_string(),
            )
            .actor(who),
        )
    }

    fn attestation_denied(
        &self,
        who: audit::event::Actor,
        reason: String,
    ) -> Result<(), BrokerError> {
        self.record(
            Event::new(
                AUDIT_SERVICE,
                EventKind::AttestationVerify,
                Outcome::Denied,
                reason,
            )
            .actor(who),
        )
    }

    /// Step 1: a nonce for the IPU to quote with.
    pub fn challenge(&self) -> Result<Zeroizing<Vec<u8>>, BrokerError> {
        Ok(self.verifier.nonces.issue()?)
    }

    /// What an enrolled, unrevoked AK must do in its quote: the PCRs of its class, and, until
    /// it has proven it lives in the TPM of its enrolled EK, a credential to activate. A
    /// refusal is audited as an attestation denial: an unknown or revoked AK knocking is
    /// worth a record.
    pub fn challenge_for(
        &self,
        client: &str,
        ak_public: &[u8],
    ) -> Result<(Vec<u8>, Option<Credential>), BrokerError> {
        self.current_policy()?;
        let result = self.verifier.enrollment(ak_public).and_then(|e| {
            let pcrs = self
                .verifier
                .pcrs_of(&e.ipu_class)
                .ok_or(AttestError::UnknownClass(e.ipu_class))?;
            Ok((pcrs, self.verifier.credential_for(ak_public)?))
        });
        match result {
            Ok(r) => Ok(r),
            Err(AttestError::Store(e)) => {
                self.attestation_failed(actor(client), &e)?;
                Err(e.into())
            }
            Err(e) => {
                self.attestation_denied(actor(client), format!("challenge refused: {e}"))?;
                Err(e.into())
            }
        }
    }

    /// Step 2: verifies the quote and opens a session bound to the ephemeral key and the
    /// client identity (from its certificate).
    pub fn attest(
        &self,
        client: &str,
        evidence: &Evidence,
        ak_public: &[u8],
        nonce: &[u8],
        session_public: &[u8],
    ) -> Result<Session, BrokerError> {
        self.attest_activated(client, evidence, ak_public, nonce, session_public, None)
    }

    /// [`attest`](Self::attest) with the secret ActivateCredential recovered from the
    /// challenge's credential, for an AK that still owes that proof.
    pub fn attest_activated(
        &self,
        client: &str,
        evidence: &Evidence,
        ak_public: &[u8],
        nonce: &[u8],
        session_public: &[u8],
        activation: Option<&[u8]>,
    ) -> Result<Session, BrokerError> {
        let mut who = actor(client);
        if let Err(e) = self.current_policy() {
            if let BrokerError::Store(se) = &e {
                self.attestation_failed(who, se)?;
            }
            return Err(e);
        }
        let was_pending = self
            .verifier
            .enrollment(ak_public)
            .is_ok_and(|e| e.needs_activation());
        match self
            .verifier
            .verify_activated(evidence, ak_public, nonce, session_public, activation)
        {
            Ok((enrollment, _quote)) => {
                if was_pending {
                    self.record(
                        Event::new(
                            AUDIT_SERVICE,
                            EventKind::Admin("ipu_activate".into()),
                            Outcome::Success,
                            "the attestation key proved it lives in the TPM of the enrolled endorsement key (ActivateCredential)",
                        )
                        .actor(actor(client))
                        .detail("subject", enrollment.ipu_id.clone()),
                    )?;
                }
                let session = Session {
                    id: random_id(),
                    ipu_id: enrollment.ipu_id.clone(),
                    ipu_class: enrollment.ipu_class.clone(),
                    client: client.to_string(),
                    session_public: session_public.to_vec(),
                    salt: binding(nonce, session_public),
                    expires: SystemTime::now() + self.session_ttl,
                };
                who.ipu_id = Some(enrollment.ipu_id);
                if let Err(e) = self.store.put_session(&session.record()) {
                    self.attestation_failed(who, &e)?;
                    return Err(e.into());
                }
                self.record(
                    Event::new(
                        AUDIT_SERVICE,
                        EventKind::AttestationVerify,
                        Outcome::Allowed,
                        format!("quote verified for IPU class {}", enrollment.ipu_class),
                    )
                    .actor(who)
                    .detail("session", session.id.clone()),
                )?;
                Ok(session)
            }
            Err(AttestError::Store(e)) => {
                self.attestation_failed(who, &e)?;
                Err(e.into())
            }
            Err(e) => {
                self.attestation_denied(who, e.to_string())?;
                Err(e.into())
            }
        }
    }

    /// Step 3: releases one layer's private options, sealed to the session.
    pub fn release(&self, client: &str, req: &ReleaseRequest) -> Result<SealedKey, BrokerError> {
        self.audited_release(client, req, |session, privopts| {
            seal(
                &session.session_public,
                &session.salt,
                &release_context(&req.image_digest, &req.layer_digest),
                privopts,
            )
            .map_err(BrokerError::from)
        })
    }

    /// The key provider door's UnWrapKey: the same checks as [`release`](Self::release),
    /// but the private options return in clear inside the caller's TLS connection, as the
    /// ocicrypt protocol requires.
    pub fn release_unsealed(
        &self,
        client: &str,
        req: &ReleaseRequest,
    ) -> Result<Zeroizing<Vec<u8>>, BrokerError> {
        self.audited_release(client, req, |_, privopts| {
            Ok(Zeroizing::new(privopts.to_vec()))
        })
    }

    fn audited_release<T>(
        &self,
        client: &str,
        req: &ReleaseRequest,
        deliver: impl FnOnce(&Session, &[u8]) -> Result<T, BrokerError>,
    ) -> Result<T, BrokerError> {
        let result = self.release_inner(client, req, deliver);
        // The grant's serial, whether it verified or not (a refused grant is named by it).
        let serial = match &result {
            Err(BrokerError::Grant { serial, .. }) => serial.clone(),
            _ => req.grant.as_deref().and_then(grant_serial),
        };
        let base = |kind, outcome, reason: String| {
            let mut e = Event::new(AUDIT_SERVICE, kind, outcome, reason)
                .tenant(req.tenant.clone())
                .function(req.function.clone())
                .image(req.image.clone(), Some(req.image_digest.clone()))
                .actor(actor(client))
                .detail("layer_digest", req.layer_digest.clone())
                .detail("session", req.session_id.clone());
            if let Some(serial) = &serial {
                e = e.detail("grant_serial", serial.clone());
            }
            if let Err(BrokerError::Grant { code, .. }) = &result {
                e = e.detail("reason_code", code.to_string());
            }
            e
        };
        match &result {
            Ok((key_id, ipu_id, _)) => {
                let mut e = base(
                    EventKind::KeyRelease,
                    Outcome::Allowed,
                    format!("layer key released to IPU {ipu_id}"),
                );
                if let Ok(k) = KeyId::new(key_id.clone()) {
                    e = e.key_id(k);
                }
                self.record(e)?;
            }
            // The store failed: nothing was decided.
            Err(err) if err.is_operational() => {
                self.record(base(EventKind::KeyDeny, Outcome::Failure, err.to_string()))?
            }
            Err(err) => self.record(base(EventKind::KeyDeny, Outcome::Denied, err.to_string()))?,
        }
        result.map(|(_, _, delivered)| delivered)
    }

    /// An unexpired session of this client whose IPU is still enrolled and unrevoked (as
    /// the store says: a revocation through another replica ends it here too).
    fn session(&self, client: &str, id: &str) -> Result<Session, BrokerError> {
        let session: Session = self
            .store
            .session(id)?
            .ok_or(BrokerError::NoSession)?
            .into();
        if session.client != client {
            return Err(BrokerError::WrongClient);
        }
        if !self.verifier.ipu_usable(&session.ipu_id)? {
            return Err(BrokerError::NoSession);
        }
        Ok(session)
    }

    /// An unsealed key version, from the cache or the store (which refuses revoked ones).
    fn private_key(
        &self,
        id: &str,
        version: u32,
    ) -> Result<Arc<ocicrypt::keys::PrivateKey>, BrokerError> {
        // The store is asked every time: it refuses a version revoked since it was cached.
        let info = self
            .keys
            .versions(id)?
            .into_iter()
            .find(|v| v.version == version)
            .ok_or_else(|| KeyStoreError::NotFound(format!("{id} version {version}")))?;
        if info.revoked {
            return Err(KeyStoreError::Revoked(format!("{id} version {version}")).into());
        }
        let key = (id.to_string(), version);
        if let Some(k) = self.unsealed.lock().expect("not poisoned").get(&key) {
            return Ok(k.clone());
        }
        let k = Arc::new(self.keys.private_key(id, version)?);
        self.unsealed
            .lock()
            .expect("not poisoned")
            .insert(key, k.clone());
        Ok(k)
    }

    fn release_inner<T>(
        &self,
        client: &str,
        req: &ReleaseRequest,
        deliver: impl FnOnce(&Session, &[u8]) -> Result<T, BrokerError>,
    ) -> Result<(String, String, T), BrokerError> {
        let session = self.session(client, &req.session_id)?;
        let policy = self
            .current_policy()?
            .ok_or_else(|| BrokerError::Denied("no deployment policy is loaded".into()))?;
        check_grant(&policy, &session, req, std::time::SystemTime::now())?;
        let request = DeployRequest {
            tenant: req.tenant.clone(),
            function: req.function.clone(),
            image: req.image.clone(),
            ipu_class: Some(session.ipu_class.clone()),
        };
        // The keys this request may use, by policy; then the one the layer is wrapped to.
        let mut denials = Vec::new();
        let mut allowed: Vec<KeyInfo> = Vec::new();
        for info in self.keys.list()? {
            let d = evaluate_key_release(&policy, &request, &info.id);
            if d.allowed && !info.revoked {
                allowed.push(info);
            } else if d.allowed {
                denials.push(format!("{} version {} is revoked", info.id, info.version));
            } else {
                denials.push(d.reason);
            }
        }
        let no_key = |denials: &[String]| {
            BrokerError::Denied(
                denials
                    .first()
                    .cloned()
                    .unwrap_or_else(|| "no keys in the broker".into()),
            )
        };
        match &req.wrapped {
            Wrapped::Jwe(jwe) => {
                if allowed.is_empty() {
                    return Err(no_key(&denials));
                }
                for info in &allowed {
                    let key = self.private_key(&info.id, info.version)?;
                    if let Ok(privopts) = ocicrypt::jwe::unwrap(jwe, std::slice::from_ref(&*key)) {
                        let delivered = deliver(&session, &privopts)?;
                        return Ok((info.id.clone(), session.ipu_id.clone(), delivered));
                    }
                }
                let names: Vec<String> = allowed
                    .iter()
                    .map(|k| format!("{} v{}", k.id, k.version))
                    .collect();
                Err(BrokerError::NoUsableKey(names.join(", ")))
            }
            Wrapped::Provider(annotation) => {
                let wrappings = ocicrypt::keyprovider::split_annotation(annotation)
                    .map_err(BrokerError::Annotation)?;
                let mut last = None;
                for w in wrappings {
                    let w = ProviderWrapping::decode(&w)?;
                    let Some(info) = allowed
                        .iter()
                        .find(|k| k.id == w.key_id && k.version == w.version)
                    else {
                        let by_policy = evaluate_key_release(&policy, &request, &w.key_id);
                        last = Some(BrokerError::Denied(if by_policy.allowed {
                            format!(
                                "key {} version {} is revoked or unknown",
                                w.key_id, w.version
                            )
                        } else {
                            by_policy.reason
                        }));
                        continue;
                    };
                    let key = self.private_key(&info.id, info.version)?;
                    let privopts = ocicrypt::jwe::unwrap(&w.jwe, std::slice::from_ref(&*key))
                        .map_err(BrokerError::WrappingDoesNotOpen)?;
                    let delivered = deliver(&session, &privopts)?;
                    return Ok((info.id.clone(), session.ipu_id.clone(), delivered));
                }
                Err(last.unwrap_or(BrokerError::NoWrapping))
            }
        }
    }

    /// The key provider door's WrapKey: wraps a publisher's private options to the newest
    /// usable version of `key_id`. Audited (no secret in the event).
    pub fn wrap(
        &self,
        client: &str,
        key_id: &str,
        optsdata: &[u8],
    ) -> Result<Vec<u8>, BrokerError> {
        let result = (|| {
            let newest = self
                .keys
                .versions(key_id)?
                .into_iter()
                .rev()
                .find(|k| !k.revoked)
                .ok_or_else(|| KeyStoreError::Revoked(key_id.to_string()))?;
            let public = ocicrypt::keys::PublicKey::from_pem(newest.public_pem.as_bytes())
                .map_err(BrokerError::PublicKey)?;
            let jwe = ocicrypt::jwe::wrap(optsdata, &[public]).map_err(BrokerError::Wrap)?;
            Ok::<_, BrokerError>((
                newest.version,
                ProviderWrapping {
                    key_id: key_id.to_string(),
                    version: newest.version,
                    jwe,
                }
                .encode(),
            ))
        })();
        let (outcome, reason) = match &result {
            Ok((v, _)) => (
                Outcome::Success,
                format!("layer key wrapped to version {v}"),
            ),
            Err(e) => (Outcome::Failure, e.to_string()),
        };
        let mut e = Event::new(
            AUDIT_SERVICE,
            EventKind::Admin("key_wrap".into()),
            outcome,
            reason,
        )
        .actor(actor(client));
        if let Ok(k) = KeyId::new(key_id) {
            e = e.key_id(k);
        }
        self.record(e)?;
        result.map(|(_, w)| w)
    }

    /// Runs an administrative change and audits it as `admin.<action>` with its outcome.
    fn admin<T>(
        &self,
        who: &str,
        action: &str,
        subject: &str,
        change: impl FnOnce() -> Result<(T, String), BrokerError>,
    ) -> Result<T, BrokerError> {
        let result = change();
        let (outcome, reason) = match &result {
            Ok((_, summary)) => (Outcome::Success, summary.clone()),
            Err(e) => (Outcome::Failure, e.to_string()),
        };
        let mut e = Event::new(
            AUDIT_SERVICE,
            EventKind::Admin(action.into()),
            outcome,
            reason,
        )
        .actor(actor(who))
        .detail("subject", subject.to_string());
        if action.starts_with("key_") {
            if let Ok(k) = KeyId::new(subject) {
                e = e.key_id(k);
            }
        }
        self.record(e)?;
        result.map(|(t, _)| t)
    }

    pub fn create_key(&self, who: &str, id: &str, kind: KeyKind) -> Result<KeyInfo, BrokerError> {
        self.admin(who, "key_create", id, || {
            let info = self.keys.create(id, kind)?;
            let summary = format!("{} key created", info.algorithm);
            Ok((info, summary))
        })
    }

    pub fn import_key(&self, who: &str, id: &str, pem: &[u8]) -> Result<KeyInfo, BrokerError> {
        self.admin(who, "key_import", id, || {
            let info = self.keys.import(id, pem)?;
            let summary = format!("{} key imported", info.algorithm);
            Ok((info, summary))
        })
    }

    pub fn rotate_key(&self, who: &str, id: &str) -> Result<KeyInfo, BrokerError> {
        self.admin(who, "key_rotate", id, || {
            let info = self.keys.rotate(id)?;
            let summary = format!("version {} created ({})", info.version, info.algorithm);
            Ok((info, summary))
        })
    }

    /// Revokes one version, or every version (`None`).
    pub fn revoke_key(
        &self,
        who: &str,
        id: &str,
        version: Option<u32>,
    ) -> Result<Vec<KeyInfo>, BrokerError> {
        self.admin(who, "key_revoke", id, || {
            let revoked = self.keys.revoke(id, version)?;
            let versions: Vec<String> = revoked.iter().map(|k| k.version.to_string()).collect();
            // Drop unsealed copies now rather than when the broker exits.
            self.unsealed
                .lock()
                .expect("not poisoned")
                .retain(|(k, _), _| k != id);
            Ok((
                revoked,
                format!("version(s) {} revoked", versions.join(", ")),
            ))
        })
    }

    /// Enrolls an IPU's attestation key (its marshalled `TPMT_PUBLIC`, checked to be a
    /// restricted signing key that never left the TPM) for a class of the running policy.
    pub fn enroll_ipu(
        &self,
        who: &str,
        ipu_id: &str,
        ipu_class: &str,
        ak_template: &[u8],
        ek_template: Option<&[u8]>,
    ) -> Result<EnrolledIpu, BrokerError> {
        self.admin(who, "ipu_enroll", ipu_id, || {
            if ek_template.is_none() && self.require_ek {
                return Err(BrokerError::EndorsementKeyRequired);
            }
            let point = self.verifier.enroll_template(
                ak_template,
                Enrollment {
                    ipu_id: ipu_id.to_string(),
                    ipu_class: ipu_class.to_string(),
                    ek_template: ek_template.map(<[u8]>::to_vec),
                    ..Enrollment::default()
                },
            )?;
            let e = self
                .verifier
                .list()?
                .into_iter()
                .find(|e| e.ak_public == point)
                .expect("just enrolled");
            let how = if ek_template.is_some() {
                "pinned to its endorsement key, activation due at its first attestation"
            } else {
                "not pinned to an endorsement key (the template is trusted as provisioned)"
            };
            Ok((e, format!("enrolled in IPU class {ipu_class}, {how}")))
        })
    }

    pub fn revoke_ipu(&self, who: &str, ipu_id: &str) -> Result<EnrolledIpu, BrokerError> {
        self.admin(who, "ipu_revoke", ipu_id, || {
            let e = self.verifier.revoke_ipu(ipu_id)?;
            // Its open sessions end with it.
            self.store.end_sessions_of(ipu_id)?;
            Ok((e, "attestation key revoked".into()))
        })
    }

    /// Loads a signed deployment policy bundle: trusted signer, no rollback; audited as
    /// `admin.policy_load` (a refused bundle is a denial, a store failure a failure). The
    /// install is a compare-and-set on the running version: of two replicas loading
    /// different bundles of one version, one wins and the other is refused.
    pub fn load_policy(&self, who: &str, bundle: &[u8]) -> Result<VerifiedBundle, BrokerError> {
        let trusted = self.trusted.as_ref().ok_or(BrokerError::FixedPolicy)?;
        if trusted.is_empty() {
            return Err(BrokerError::NoBundleKeys);
        }
        let result = self.install_bundle(bundle, trusted);
        let verified = match result {
            Ok(v) => v,
            Err(err) => {
                let outcome = if matches!(err, BrokerError::Denied(_)) {
                    Outcome::Denied
                } else {
                    Outcome::Failure
                };
                self.record(
                    Event::new(
                        AUDIT_SERVICE,
                        EventKind::Admin("policy_load".into()),
                        outcome,
                        err.to_string(),
                    )
                    .actor(actor(who)),
                )?;
                return Err(err);
            }
        };
        self.set_running(verified.deployment.clone(), Some(verified.content.version))?;
        self.record(
            Event::new(
                AUDIT_SERVICE,
                EventKind::Admin("policy_load".into()),
                Outcome::Allowed,
                format!(
                    "policy bundle version {} signed by {}",
                    verified.content.version, verified.signer
                ),
            )
            .actor(actor(who)),
        )?;
        Ok(verified)
    }

    /// Verifies a bundle against the running one and installs it if newer (compare-and-set;
    /// checked again against whatever another replica installed in between).
    fn install_bundle(
        &self,
        bundle: &[u8],
        trusted: &[VerificationKey],
    ) -> Result<VerifiedBundle, BrokerError> {
        for _ in 0..8 {
            let running = running_bundle(self.store.as_ref(), trusted)?;
            let current = running.as_ref().map(|r| (r.content.version, &r.content));
            let verified = policy::deploy::bundle::verify(bundle, trusted, current)
                .map_err(|e| BrokerError::Denied(e.to_string()))?;
            // The IPU classes must be usable by this verifier before the bundle becomes the
            // running one: a bundle that installs but cannot be enforced would lock IPUs out.
            classes_from_policy(&verified.deployment).map_err(|e| {
                BrokerError::Denied(BundleError::Deployment(e.to_string()).to_string())
            })?;
            let expected = running.as_ref().map(|r| r.content.version);
            if expected == Some(verified.content.version) {
                // Re-delivery of the running bundle (identical content: checked above).
                return Ok(verified);
            }
            if self
                .store
                .install_bundle(expected, verified.content.version, bundle)?
            {
                return Ok(verified);
            }
        }
        Err(BrokerError::PolicyContention)
    }

    /// The version of the running policy bundle, if one is loaded from a bundle.
    pub fn policy_version(&self) -> Option<u64> {
        self.trusted.as_ref()?;
        let _ = self.current_policy();
        self.running.read().expect("not poisoned").version
    }
}

/// The running bundle of a store, verified with the trusted keys (`None`: none yet).
fn running_bundle(
    store: &dyn Store,
    trusted: &[VerificationKey],
) -> Result<Option<VerifiedBundle>, BrokerError> {
    let Some(bytes) = store.running_bundle()? else {
        return Ok(None);
    };
    policy::deploy::bundle::verify(&bytes, trusted, None)
        .map(Some)
        .map_err(|source| BrokerError::RunningPolicy {
            place: format!("the {} store's running bundle", store.kind()),
            source,
        })
}

/// The state directory's audit log default: `DIR/audit`.
pub fn default_audit_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("audit")
}
