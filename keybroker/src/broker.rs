//! The broker's decisions, transport-free: attest an IPU into a short session bound to its
//! ephemeral key and its client identity, then release layer keys within that session when
//! the deployment policy allows, sealed to the session key. Every grant and denial is
//! audited with its reason.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use audit::{AuditSink, Event, EventKind, KeyId, Outcome};
use policy::deploy::{evaluate_key_release, DeployRequest, DeploymentPolicy};
use zeroize::Zeroizing;

use crate::attest::{binding, AttestError, Evidence, Verifier};
use crate::keystore::{KeyStore, KeyStoreError};
use crate::release::{seal, SealedKey};

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
    #[error("malformed request: {0}")]
    Request(String),
    #[error("audit log: {0}")]
    Audit(String),
    #[error("key store: {0}")]
    KeyStore(#[from] KeyStoreError),
}

/// An attested session.
#[derive(Clone, Debug)]
pub struct Session {
    pub id: String,
    pub ipu_id: String,
    pub ipu_class: String,
    /// The client certificate identity that attested; only it may use the session.
    pub client: String,
    session_public: Vec<u8>,
    salt: [u8; 32],
    expires: Instant,
}

impl Session {
    pub fn expires_in(&self) -> Duration {
        self.expires.saturating_duration_since(Instant::now())
    }
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
    /// The layer's `org.opencontainers.image.enc.keys.jwe` annotation.
    pub wrapped_jwe: String,
}

pub struct Broker {
    pub verifier: Verifier,
    keys: KeyStore,
    policy: RwLock<Arc<DeploymentPolicy>>,
    sessions: Mutex<HashMap<String, Session>>,
    session_ttl: Duration,
    audit: Arc<dyn AuditSink>,
    /// Unsealed, parsed keys (parsing an RSA key costs milliseconds); dropped, and zeroized,
    /// with the broker. Revocation is checked on every release, not through this cache.
    unsealed: Mutex<HashMap<String, Arc<ocicrypt::keys::PrivateKey>>>,
}

fn random_id() -> String {
    let mut b = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b)
        .expect("system randomness");
    hex::encode(b)
}

/// The context a released key is sealed to: it opens for this image and layer only.
pub fn release_context(image_digest: &str, layer_digest: &str) -> Vec<u8> {
    format!("image {image_digest} layer {layer_digest}").into_bytes()
}

impl Broker {
    pub fn new(
        verifier: Verifier,
        keys: KeyStore,
        policy: DeploymentPolicy,
        session_ttl: Duration,
        audit: Arc<dyn AuditSink>,
    ) -> Self {
        Self {
            verifier,
            keys,
            policy: RwLock::new(Arc::new(policy)),
            sessions: Mutex::new(HashMap::new()),
            session_ttl,
            audit,
            unsealed: Mutex::new(HashMap::new()),
        }
    }

    /// The key store, for administration (create, import, revoke).
    pub fn keys(&self) -> &KeyStore {
        &self.keys
    }

    /// Replaces the deployment policy (after its bundle was verified and audited).
    pub fn set_policy(&self, policy: DeploymentPolicy) {
        *self.policy.write().expect("not poisoned") = Arc::new(policy);
    }

    fn record(&self, e: Event) -> Result<(), BrokerError> {
        self.audit
            .append(e)
            .map(|_| ())
            .map_err(|e| BrokerError::Audit(e.to_string()))
    }

    /// Step 1: a nonce for the IPU to quote with.
    pub fn challenge(&self) -> Zeroizing<Vec<u8>> {
        self.verifier.nonces.issue()
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
        let mut actor = audit::event::Actor {
            subject: Some(client.to_string()),
            ..Default::default()
        };
        match self
            .verifier
            .verify(evidence, ak_public, nonce, session_public)
        {
            Ok((enrollment, _quote)) => {
                let session = Session {
                    id: random_id(),
                    ipu_id: enrollment.ipu_id.clone(),
                    ipu_class: enrollment.ipu_class.clone(),
                    client: client.to_string(),
                    session_public: session_public.to_vec(),
                    salt: binding(nonce, session_public),
                    expires: Instant::now() + self.session_ttl,
                };
                actor.ipu_id = Some(enrollment.ipu_id);
                self.record(
                    Event::new(
                        AUDIT_SERVICE,
                        EventKind::AttestationVerify,
                        Outcome::Allowed,
                        format!("quote verified for IPU class {}", enrollment.ipu_class),
                    )
                    .actor(actor)
                    .detail("session", session.id.clone()),
                )?;
                let mut sessions = self.sessions.lock().expect("not poisoned");
                sessions.retain(|_, s| s.expires > Instant::now());
                sessions.insert(session.id.clone(), session.clone());
                Ok(session)
            }
            Err(e) => {
                self.record(
                    Event::new(
                        AUDIT_SERVICE,
                        EventKind::AttestationVerify,
                        Outcome::Denied,
                        e.to_string(),
                    )
                    .actor(actor),
                )?;
                Err(e.into())
            }
        }
    }

    /// Step 3: releases one layer's private options, sealed to the session.
    pub fn release(&self, client: &str, req: &ReleaseRequest) -> Result<SealedKey, BrokerError> {
        let result = self.release_inner(client, req);
        let base = |kind, outcome, reason: String| {
            Event::new(AUDIT_SERVICE, kind, outcome, reason)
                .tenant(req.tenant.clone())
                .function(req.function.clone())
                .image(req.image.clone(), Some(req.image_digest.clone()))
                .actor(audit::event::Actor {
                    subject: Some(client.to_string()),
                    ..Default::default()
                })
                .detail("layer_digest", req.layer_digest.clone())
                .detail("session", req.session_id.clone())
        };
        match &result {
            Ok((key_id, ipu_id, _)) => {
                let mut e = base(
                    EventKind::KeyRelease,
                    Outcome::Allowed,
                    format!("layer key released to IPU {ipu_id}, sealed to its session key"),
                );
                if let Ok(k) = KeyId::new(key_id.clone()) {
                    e = e.key_id(k);
                }
                self.record(e)?;
            }
            Err(err) => self.record(base(EventKind::KeyDeny, Outcome::Denied, err.to_string()))?,
        }
        result.map(|(_, _, sealed)| sealed)
    }

    fn release_inner(
        &self,
        client: &str,
        req: &ReleaseRequest,
    ) -> Result<(String, String, SealedKey), BrokerError> {
        let session = {
            let sessions = self.sessions.lock().expect("not poisoned");
            sessions
                .get(&req.session_id)
                .filter(|s| s.expires > Instant::now())
                .cloned()
                .ok_or(BrokerError::NoSession)?
        };
        if session.client != client {
            return Err(BrokerError::WrongClient);
        }
        let policy = self.policy.read().expect("not poisoned").clone();
        let request = DeployRequest {
            tenant: req.tenant.clone(),
            function: req.function.clone(),
            image: req.image.clone(),
            ipu_class: Some(session.ipu_class.clone()),
        };
        // The keys this request may use, by policy; then the one the layer is wrapped to.
        let mut denials = Vec::new();
        let mut allowed = Vec::new();
        for info in self.keys.list()? {
            let d = evaluate_key_release(&policy, &request, &info.id);
            if d.allowed && !info.revoked {
                allowed.push(info.id);
            } else if d.allowed {
                denials.push(format!("{} is revoked", info.id));
            } else {
                denials.push(d.reason);
            }
        }
        if allowed.is_empty() {
            return Err(BrokerError::Denied(
                denials
                    .first()
                    .cloned()
                    .unwrap_or_else(|| "no keys in the broker".into()),
            ));
        }
        for id in &allowed {
            let cached = self.unsealed.lock().expect("not poisoned").get(id).cloned();
            let key = match cached {
                Some(k) => k,
                None => {
                    let k = Arc::new(self.keys.private_key(id)?);
                    self.unsealed
                        .lock()
                        .expect("not poisoned")
                        .insert(id.clone(), k.clone());
                    k
                }
            };
            if let Ok(privopts) =
                ocicrypt::jwe::unwrap(&req.wrapped_jwe, std::slice::from_ref(&*key))
            {
                let sealed = seal(
                    &session.session_public,
                    &session.salt,
                    &release_context(&req.image_digest, &req.layer_digest),
                    &privopts,
                )
                .map_err(|e| BrokerError::Request(e.to_string()))?;
                return Ok((id.clone(), session.ipu_id.clone(), sealed));
            }
        }
        Err(BrokerError::NoUsableKey(allowed.join(", ")))
    }
}
