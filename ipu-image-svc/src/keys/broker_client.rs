//! The IPU's client of the key broker: attest once with the TPM (a quote over the PCRs the
//! broker names for this IPU's class, bound to the broker's nonce and a fresh session key),
//! then obtain each encrypted layer's private options sealed to that session key and open
//! them straight into secret memory.
//!
//! Over mutual TLS with the IPU's client certificate (role `ipu`). The session key lives in
//! this process only; what crosses the wire is a quote, public keys, and sealed keys.

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use api::keybroker::key_broker_client::KeyBrokerClient;
use api::keybroker::{AttestRequest, ChallengeRequest, ReleaseRequest};
use broker_protocol::{binding, release_context, SealedKey, SessionKey};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

use super::{KeyError, LayerKeyRequest, LayerKeySource};
use crate::secret::SecretBuf;
use crate::tpm::Tpm;

/// How to reach the broker and attest to it.
#[derive(Clone, Debug)]
pub struct BrokerSettings {
    /// `https://HOST:PORT`.
    pub url: String,
    /// The name in the broker's certificate (default: the URL's host).
    pub server_name: Option<String>,
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The TPM (tss TCTI string, e.g. `device:/dev/tpmrm0` or `swtpm:port=2321`).
    pub tpm: String,
    /// Where the attestation key is persisted.
    pub ak_handle: u32,
    /// The broker's key provider name (layers wrapped with `provider:<name>:<key id>`).
    pub provider_name: String,
}

/// An attested session: its key opens what the broker seals to it.
struct Session {
    id: String,
    key: SessionKey,
    salt: [u8; 32],
    ipu_class: String,
    /// The identity the broker enrolled this IPU under.
    ipu_id: String,
    /// When to attest again: a little before the broker lets the session expire.
    renew_at: Instant,
}

struct Connection {
    /// Always `Some` until dropped (see `Drop`).
    rt: Option<tokio::runtime::Runtime>,
    client: KeyBrokerClient<Channel>,
    session: Option<Session>,
}

/// The IPU's standing relation with the broker: one attested session at a time, used for
/// every layer key until it is close to expiring (or the broker says it is gone: expired,
/// the broker restarted, or this IPU was revoked), then a new attestation. Each release is
/// still decided by the broker for the tenant, function, image and layer it names.
pub struct BrokerKeys {
    settings: BrokerSettings,
    connection: Mutex<Connection>,
    /// When readiness last tried to attest again after the session was lost.
    reattested: Mutex<Option<Instant>>,
}

/// How often readiness tries to attest again while there is no session (a failed renewal
/// leaves none): the broker and the TPM are not asked more often than this.
pub const REATTEST_EVERY: Duration = Duration::from_secs(30);

fn read(p: &PathBuf) -> Result<Vec<u8>, KeyError> {
    std::fs::read(p).map_err(|e| KeyError::Failed(format!("cannot read {}: {e}", p.display())))
}

/// A broker's answer other than OK: unavailable when it did not answer (down, restarting,
/// timed out), else its decision.
fn status(what: &str, s: tonic::Status) -> KeyError {
    use tonic::Code;
    let text = format!("{what}: {} ({:?})", s.message(), s.code());
    match s.code() {
        Code::Unavailable | Code::DeadlineExceeded | Code::Cancelled | Code::Unknown => {
            KeyError::Unavailable(text)
        }
        Code::Internal | Code::ResourceExhausted | Code::Aborted | Code::DataLoss => {
            KeyError::Failed(text)
        }
        _ => KeyError::Denied(text),
    }
}

/// Why a release failed: no session could be had, the broker said no, or what it sent
/// could not be used here.
enum ReleaseError {
    Session(KeyError),
    Refused(Box<tonic::Status>),
    Local(KeyError),
}

/// How long connecting to the broker, and one request to it, may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// A session is renewed when this much (or a tenth of its life, if less) remains.
const RENEW_MARGIN: Duration = Duration::from_secs(10);

impl BrokerKeys {
    /// Connects and attests with the TPM, so that a broker or TPM problem shows at once.
    pub fn attest(settings: &BrokerSettings) -> Result<Self, KeyError> {
        // One worker of its own, so the connection keeps running between requests (it
        // answers the broker's pings and GOAWAY, and reconnects when the broker restarts).
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("broker-client")
            .enable_all()
            .build()
            .map_err(|e| KeyError::Failed(format!("runtime: {e}")))?;
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(read(&settings.ca)?))
            .identity(Identity::from_pem(
                read(&settings.cert)?,
                read(&settings.key)?,
            ));
        if let Some(name) = &settings.server_name {
            tls = tls.domain_name(name.clone());
        }
        let endpoint = Channel::from_shared(settings.url.clone())
            .map_err(|e| KeyError::Failed(format!("broker URL {:?}: {e}", settings.url)))?
            .connect_timeout(CONNECT_TIMEOUT)
            .timeout(REQUEST_TIMEOUT)
            .tls_config(tls)
            .map_err(|e| KeyError::Failed(format!("broker TLS: {e}")))?;
        // The whole connection, TLS handshake included, within the deadline: a broker that
        // accepts and says nothing is as unavailable as one that is down.
        let channel = rt
            .block_on(async { tokio::time::timeout(CONNECT_TIMEOUT, endpoint.connect()).await })
            .map_err(|_| {
                KeyError::Unavailable(format!(
                    "the key broker at {} did not answer within {} s",
                    settings.url,
                    CONNECT_TIMEOUT.as_secs()
                ))
            })?
            .map_err(|e| {
                KeyError::Unavailable(format!(
                    "cannot reach the key broker at {}: {e}",
                    settings.url
                ))
            })?;
        let mut connection = Connection {
            rt: Some(rt),
            client: KeyBrokerClient::new(channel),
            session: None,
        };
        connection.session = Some(connection.attest(settings)?);
        Ok(Self {
            settings: settings.clone(),
            connection: Mutex::new(connection),
            reattested: Mutex::new(None),
        })
    }

    /// Whether an attested session is held. A connection busy (attesting or releasing a
    /// key) counts as one. Without a session, attests again (at most every
    /// [`REATTEST_EVERY`]), so that a broker back from an outage makes the IPU ready again
    /// without waiting for a Prepare.
    pub fn session_ready(&self) -> Result<(), String> {
        let has_session = |c: &Connection| c.session.is_some();
        match self.connection.try_lock() {
            Ok(c) if has_session(&c) => return Ok(()),
            Ok(_) => {}
            Err(std::sync::TryLockError::WouldBlock) => return Ok(()),
            Err(std::sync::TryLockError::Poisoned(_)) => {
                return Err("the broker connection is broken (a thread panicked)".into())
            }
        }
        let due = {
            let mut last = self.reattested.lock().expect("not poisoned");
            let due = last.is_none_or(|t| t.elapsed() >= REATTEST_EVERY);
            if due {
                *last = Some(Instant::now());
            }
            due
        };
        if due {
            if let Err(e) = self.ipu_class() {
                return Err(format!(
                    "no attested session with {}: {e}",
                    self.settings.url
                ));
            }
            return Ok(());
        }
        Err(format!(
            "no attested session with {} (the last attestation failed)",
            self.settings.url
        ))
    }

    /// The identity the broker knows this IPU by (placement grants name it).
    pub fn ipu_id(&self) -> Result<String, KeyError> {
        let mut c = self.connection.lock().expect("not poisoned");
        Ok(c.session(&self.settings)?.ipu_id.clone())
    }

    /// The IPU class the broker attested, attesting again first when the session is due.
    pub fn ipu_class(&self) -> Result<String, KeyError> {
        let mut c = self.connection.lock().expect("not poisoned");
        Ok(c.session(&self.settings)?.ipu_class.clone())
    }
}

impl Drop for Connection {
    /// Shut down without blocking: the last owner may be dropping this inside another
    /// runtime's worker (a service shutting down), where a blocking shutdown would panic.
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

impl Connection {
    /// The current session, after a new attestation when there is none or it is due.
    fn session(&mut self, settings: &BrokerSettings) -> Result<&Session, KeyError> {
        if self
            .session
            .as_ref()
            .is_none_or(|s| Instant::now() >= s.renew_at)
        {
            self.session = None;
            self.session = Some(self.attest(settings)?);
        }
        Ok(self.session.as_ref().expect("set above"))
    }

    /// Challenge, (credential activation,) quote, attest: a new session.
    fn attest(&mut self, settings: &BrokerSettings) -> Result<Session, KeyError> {
        let tpm_failed = |e: &dyn std::fmt::Display| KeyError::Failed(format!("TPM: {e}"));
        let mut tpm =
            Tpm::open_persistent(&settings.tpm, settings.ak_handle).map_err(|e| tpm_failed(&e))?;
        let key = SessionKey::generate();
        let challenge = self
            .rt
            .as_ref()
            .expect("present until dropped")
            .block_on(self.client.challenge(ChallengeRequest {
                ak_public: tpm.ak_public().to_vec(),
            }))
            .map_err(|s| status("challenge", s))?
            .into_inner();
        let pcrs: Vec<u8> = challenge
            .pcrs
            .iter()
            .map(|&p| {
                u8::try_from(p)
                    .map_err(|_| KeyError::Failed(format!("the broker asks for PCR {p}")))
            })
            .collect::<Result<_, _>>()?;
        // Until this AK has proven it lives in the TPM of the EK it was enrolled with, the
        // broker sends a credential only that TPM can activate.
        let activation = if challenge.credential_id_object.is_empty() {
            zeroize::Zeroizing::new(Vec::new())
        } else {
            tpm.activate_credential(
                &challenge.credential_id_object,
                &challenge.credential_secret,
            )
            .map_err(|e| tpm_failed(&format!("credential activation: {e}")))?
        };
        let evidence = tpm
            .quote(&challenge.nonce, &key.public(), &pcrs)
            .map_err(|e| tpm_failed(&e))?;
        let attested = self
            .rt
            .as_ref()
            .expect("present until dropped")
            .block_on(self.client.attest(attest_request(
                evidence,
                tpm.ak_public(),
                &challenge.nonce,
                key.public(),
                &activation,
            )))
            .map_err(|s| status("attestation", s))?
            .into_inner();
        tracing::info!(class = %attested.ipu_class, expires_in_secs = attested.expires_in_secs, "attested to the key broker");
        let life = Duration::from_secs(attested.expires_in_secs);
        Ok(Session {
            id: attested.session_id,
            salt: binding(&challenge.nonce, &key.public()),
            key,
            ipu_class: attested.ipu_class,
            ipu_id: attested.ipu_id,
            renew_at: Instant::now() + life.saturating_sub(RENEW_MARGIN.min(life / 10)),
        })
    }

    /// One release through the current session, opened into secret memory.
    fn release(
        &mut self,
        settings: &BrokerSettings,
        request: &ReleaseRequest,
        context: &[u8],
    ) -> Result<SecretBuf, ReleaseError> {
        let session = self.session(settings).map_err(ReleaseError::Session)?;
        let request = ReleaseRequest {
            session_id: session.id.clone(),
            ..request.clone()
        };
        let released = self
            .rt
            .as_ref()
            .expect("present until dropped")
            .block_on(self.client.release(request))
            .map_err(|s| ReleaseError::Refused(Box::new(s)))?
            .into_inner();
        let session = self.session.as_ref().expect("attested above");
        let sealed = SealedKey {
            broker_public: released.broker_public,
            ciphertext: released.ciphertext,
        };
        let opened = session
            .key
            .open(&sealed, &session.salt, context)
            .map_err(|e| {
                ReleaseError::Local(KeyError::Failed(format!(
                    "the released key does not open: {e}"
                )))
            })?;
        let mut secret = SecretBuf::new(opened.len())
            .map_err(|e| ReleaseError::Local(KeyError::Failed(format!("secret memory: {e}"))))?;
        secret.as_mut_slice().copy_from_slice(&opened);
        // `opened` is zeroized as it drops here.
        Ok(secret)
    }
}

/// The `Attest` request for a quote: the evidence, the AK it is checked with, the nonce and
/// session key it binds, and the activation secret when the challenge carried a credential.
pub fn attest_request(
    evidence: broker_protocol::Evidence,
    ak_public: &[u8],
    nonce: &[u8],
    session_public: Vec<u8>,
    activation: &[u8],
) -> AttestRequest {
    AttestRequest {
        nonce: nonce.to_vec(),
        attest: evidence.attest,
        signature: evidence.signature,
        pcrs: evidence
            .pcrs
            .into_iter()
            .map(|(i, v)| (u32::from(i), v))
            .collect(),
        ak_public: ak_public.to_vec(),
        session_public,
        activation: activation.to_vec(),
    }
}

impl LayerKeySource for BrokerKeys {
    fn ready(&self) -> Result<(), String> {
        self.session_ready()
    }

    fn private_options(&self, req: &LayerKeyRequest<'_>) -> Result<SecretBuf, KeyError> {
        let provider_annotation = req
            .annotations
            .iter()
            .find(|(k, _)| {
                k.strip_prefix(ocicrypt::ANNOTATION_KEYS_PROVIDER_PREFIX)
                    .is_some_and(|name| name == self.settings.provider_name)
            })
            .map(|(_, v)| v.clone());
        let jwe = req.annotations.get(ocicrypt::ANNOTATION_KEYS_JWE).cloned();
        // The broker's own wrapping first: it names the key, so no key is tried in vain.
        let (wrapped_jwe, wrapped_provider) = match (provider_annotation, jwe) {
            (Some(p), _) => (String::new(), p),
            (None, Some(j)) => (j, String::new()),
            (None, None) => {
                return Err(KeyError::NoWrappedKey(
                    "the layer has no wrapped key for the key broker".into(),
                ))
            }
        };
        let request = ReleaseRequest {
            session_id: String::new(),
            tenant: req.tenant.to_string(),
            function: req.function.to_string(),
            image: req.image.to_string(),
            image_digest: req.image_digest.to_string(),
            layer_digest: req.layer_digest.to_string(),
            wrapped_jwe,
            wrapped_provider,
            grant: req.grant.unwrap_or_default().to_string(),
        };
        let context = release_context(req.image_digest, req.layer_digest);
        let mut c = self.connection.lock().expect("not poisoned");
        match c.release(&self.settings, &request, &context) {
            // The broker no longer knows the session (expired early, restarted, or this
            // IPU's enrollment was revoked): attest again, once.
            Err(ReleaseError::Refused(e)) if e.code() == tonic::Code::Unauthenticated => {
                c.session = None;
                c.release(&self.settings, &request, &context)
            }
            other => other,
        }
        .map_err(|e| match e {
            ReleaseError::Session(e) | ReleaseError::Local(e) => e,
            ReleaseError::Refused(s) => status("key release", *s),
        })
    }
}
