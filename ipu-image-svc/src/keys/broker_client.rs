//! The IPU's client of the key broker: attest with the TPM (a quote over the PCRs the
//! broker names for this IPU's class, bound to the broker's nonce and a fresh session key),
//! then obtain each encrypted layer's private options sealed to that session key and open
//! them straight into secret memory.
//!
//! Over mutual TLS with the IPU's client certificate (role `ipu`). The session key lives in
//! this process only; what crosses the wire is a quote, public keys, and sealed keys.
//!
//! # Several replicas
//!
//! [`BrokerSettings::urls`] lists the broker's replicas in the order they are tried. A
//! request goes to the replica that last answered; a replica that does not decide (down,
//! refusing the connection, silent past the connect or request deadline, the connection lost
//! mid-request, or answering `UNAVAILABLE` because its store is down) is skipped to the next,
//! each replica asked at most once per request. A decision is final: a denial
//! (`PERMISSION_DENIED`, a policy refusal, a refused attestation, a malformed request) or a
//! failure the replica reports of its own (`INTERNAL`, e.g. its audit log failed, which may
//! follow a decision) is returned as it is and never asked of another replica, so a lagging
//! or misconfigured replica cannot be shopped for a more lenient answer. Sessions live in
//! the brokers' shared store (PostgreSQL), so the next replica honours the current one; a
//! replica that does not know it (`UNAUTHENTICATED`) gets a new attestation, once.

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use api::keybroker::key_broker_client::KeyBrokerClient;
use api::keybroker::{AttestRequest, ChallengeRequest, ReleaseRequest};
use broker_protocol::{binding, release_context, SealedKey, SessionKey};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

use super::{KeyError, LayerKeyRequest, LayerKeySource, ReleasedOptions};
use crate::secret::SecretBuf;
use crate::tpm::Tpm;

/// How long connecting to one replica (TLS included) may take by default.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long one request to one replica may take by default.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// How to reach the broker and attest to it.
#[derive(Clone, Debug)]
pub struct BrokerSettings {
    /// The broker's replicas, `https://HOST:PORT` each, in the order they are tried (at
    /// least one).
    pub urls: Vec<String>,
    /// The name in the brokers' certificates (default: each URL's host).
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
    /// Connecting to one replica, TLS included.
    pub connect_timeout: Duration,
    /// One request to one replica.
    pub request_timeout: Duration,
}

impl BrokerSettings {
    /// The replicas, for messages.
    pub fn replicas(&self) -> String {
        self.urls.join(", ")
    }
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

/// One replica, and its connection once made.
struct Replica {
    url: String,
    client: Option<KeyBrokerClient<Channel>>,
}

struct Connection {
    /// Always `Some` until dropped (see `Drop`).
    rt: Option<tokio::runtime::Runtime>,
    tls: ClientTlsConfig,
    replicas: Vec<Replica>,
    /// The replica that answered last: asked first.
    current: usize,
    session: Option<Session>,
}

/// The IPU's standing relation with the broker: one attested session at a time, used for
/// every layer key until it is close to expiring (or a replica says it is gone: expired,
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

/// What a replica's answer other than OK means for the request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Disposition {
    /// It decided nothing that counts: down, unreachable, timed out, the connection lost, or
    /// its store unavailable. The next replica is asked. `possibly_decided`: the request
    /// reached it and may have been decided (and audited there) before the answer was lost.
    Failover { possibly_decided: bool },
    /// It does not know the session (expired, another broker's, or the IPU revoked): attest
    /// again on it.
    AttestAgain,
    /// Its decision, or a failure of its own that may follow one: final, never asked
    /// elsewhere.
    Final,
}

fn disposition(s: &tonic::Status) -> Disposition {
    use tonic::Code;
    // A status the client made from a transport error carries that error as its source; a
    // status the replica sent (in its trailers) has none.
    let from_transport = std::error::Error::source(s).is_some();
    match s.code() {
        // Not connected (ConnectError, keep-alive timeout): the request was not sent.
        Code::Unavailable if from_transport => Disposition::Failover {
            possibly_decided: false,
        },
        _ if from_transport => Disposition::Failover {
            possibly_decided: true,
        },
        // The replica says it cannot decide now (its store is down): nothing was decided.
        Code::Unavailable => Disposition::Failover {
            possibly_decided: false,
        },
        Code::DeadlineExceeded | Code::Cancelled | Code::Unknown => Disposition::Failover {
            possibly_decided: true,
        },
        Code::Unauthenticated => Disposition::AttestAgain,
        _ => Disposition::Final,
    }
}

/// The error of a final answer: a failure of the replica's own, or its decision.
fn final_error(what: &str, url: &str, s: &tonic::Status) -> KeyError {
    use tonic::Code;
    let text = format!("{what} at {url}: {} ({:?})", s.message(), s.code());
    match s.code() {
        Code::Internal | Code::ResourceExhausted | Code::Aborted | Code::DataLoss => {
            KeyError::Failed(text)
        }
        _ => KeyError::Denied(text),
    }
}

/// A replica skipped for a request, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Skipped {
    pub url: String,
    pub reason: String,
    /// The request reached it and may have been decided there (and recorded in its audit
    /// log) before the answer was lost: a connection cut mid-request, a request deadline.
    pub possibly_decided: bool,
}

/// Why one replica's attempt failed.
enum Failure {
    /// It decided nothing that counts: ask the next replica.
    Skip(Skipped),
    /// A decision, or a failure of this IPU's (the TPM, a released key that does not open):
    /// final.
    Final(KeyError),
}

/// The replica that decided, after those skipped on the way.
struct Served<T> {
    value: T,
    replica: usize,
    skipped: Vec<Skipped>,
}

/// Asks replicas in turn, from `start` (wrapping), each at most once, until one decides:
/// its answer is the request's. When none did, the request is unavailable, with each
/// replica's reason.
fn over_replicas<T>(
    urls: &[String],
    start: usize,
    mut attempt: impl FnMut(usize) -> Result<T, Failure>,
) -> Result<Served<T>, KeyError> {
    let n = urls.len();
    let mut skipped: Vec<Skipped> = Vec::new();
    for k in 0..n {
        let i = (start + k) % n;
        match attempt(i) {
            Ok(value) => {
                if !skipped.is_empty() {
                    tracing::info!(replica = %urls[i], skipped = skipped.len(), "key broker request served after failing over");
                }
                return Ok(Served {
                    value,
                    replica: i,
                    skipped,
                });
            }
            Err(Failure::Final(e)) => return Err(e),
            Err(Failure::Skip(s)) => {
                tracing::warn!(replica = %s.url, reason = %s.reason, possibly_decided = s.possibly_decided, "key broker replica skipped");
                skipped.push(s);
            }
        }
    }
    let reasons: Vec<String> = skipped
        .iter()
        .map(|s| format!("{}: {}", s.url, s.reason))
        .collect();
    Err(KeyError::Unavailable(if n == 1 {
        reasons.concat()
    } else {
        format!(
            "none of the {n} key broker replicas answered: {}",
            reasons.join("; ")
        )
    }))
}

/// A session is renewed when this much (or a tenth of its life, if less) remains.
const RENEW_MARGIN: Duration = Duration::from_secs(10);

/// A released layer's private options, and which replica released them.
pub struct Release {
    pub secret: SecretBuf,
    /// The URL of the replica that released the key.
    pub served_by: String,
    /// The replicas skipped before it, in order.
    pub skipped: Vec<Skipped>,
}

/// A new session, and which replica attested it.
#[derive(Clone, Debug)]
pub struct Attested {
    /// The URL of the replica that attested.
    pub served_by: String,
    /// The replicas skipped before it, in order.
    pub skipped: Vec<Skipped>,
}

impl BrokerKeys {
    /// Connects and attests with the TPM, so that a broker or TPM problem shows at once.
    pub fn attest(settings: &BrokerSettings) -> Result<Self, KeyError> {
        if settings.urls.is_empty() {
            return Err(KeyError::Failed("no key broker URL is configured".into()));
        }
        // One worker of its own, so the connections keep running between requests (they
        // answer the broker's pings and GOAWAY, and reconnect when a broker restarts).
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
        // Every URL is checked now: a typo is a configuration error, not an outage.
        for url in &settings.urls {
            Channel::from_shared(url.clone())
                .map_err(|e| KeyError::Failed(format!("broker URL {url:?}: {e}")))?;
        }
        let mut connection = Connection {
            rt: Some(rt),
            tls,
            replicas: settings
                .urls
                .iter()
                .map(|url| Replica {
                    url: url.clone(),
                    client: None,
                })
                .collect(),
            current: 0,
            session: None,
        };
        connection.attest_any(settings)?;
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
                    self.settings.replicas()
                ));
            }
            return Ok(());
        }
        Err(format!(
            "no attested session with {} (the last attestation failed)",
            self.settings.replicas()
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

    /// Attests again now (a new session replaces the current one), failing over like any
    /// request; returns which replica attested, after which skipped ones.
    pub fn attest_now(&self) -> Result<Attested, KeyError> {
        let mut c = self.connection.lock().expect("not poisoned");
        c.session = None;
        let (i, skipped) = c.attest_any(&self.settings)?;
        Ok(Attested {
            served_by: c.replicas[i].url.clone(),
            skipped,
        })
    }

    /// One layer's private options, released by the first replica that decides (see the
    /// module documentation), with which replica that was.
    pub fn release(&self, req: &LayerKeyRequest<'_>) -> Result<Release, KeyError> {
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
        let urls = self.settings.urls.clone();
        let start = c.current;
        let served = over_replicas(&urls, start, |i| {
            c.release_on(i, &self.settings, &request, &context)
        })?;
        c.current = served.replica;
        let served_by = urls[served.replica].clone();
        tracing::debug!(replica = %served_by, layer = %req.layer_digest, "layer key released");
        Ok(Release {
            secret: served.value,
            served_by,
            skipped: served.skipped,
        })
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
    fn rt(&self) -> &tokio::runtime::Runtime {
        self.rt.as_ref().expect("present until dropped")
    }

    /// Replica `i`'s client, connecting first (within the connect deadline) when there is
    /// none. Not reachable: skipped, nothing was sent.
    fn client(
        &mut self,
        i: usize,
        settings: &BrokerSettings,
    ) -> Result<KeyBrokerClient<Channel>, Failure> {
        if let Some(c) = &self.replicas[i].client {
            return Ok(c.clone());
        }
        let url = self.replicas[i].url.clone();
        let skip = |reason: String| {
            Failure::Skip(Skipped {
                url: url.clone(),
                reason,
                possibly_decided: false,
            })
        };
        let endpoint = Channel::from_shared(url.clone())
            .map_err(|e| Failure::Final(KeyError::Failed(format!("broker URL {url:?}: {e}"))))?
            .connect_timeout(settings.connect_timeout)
            .timeout(settings.request_timeout)
            .tls_config(self.tls.clone())
            .map_err(|e| Failure::Final(KeyError::Failed(format!("broker TLS: {e}"))))?;
        // The whole connection, TLS handshake included, within the deadline: a broker that
        // accepts and says nothing is as unavailable as one that is down.
        let deadline = settings.connect_timeout;
        let channel = self
            .rt()
            .block_on(async { tokio::time::timeout(deadline, endpoint.connect()).await })
            .map_err(|_| {
                skip(format!(
                    "the key broker did not answer within {} s",
                    deadline.as_secs_f64()
                ))
            })?
            .map_err(|e| skip(format!("cannot reach the key broker: {e}")))?;
        let client = KeyBrokerClient::new(channel);
        self.replicas[i].client = Some(client.clone());
        Ok(client)
    }

    /// What a failed call to replica `i` means: skip it (its connection is dropped, so the
    /// next try connects anew), attest again, or stop with its answer.
    fn failed(&mut self, i: usize, what: &str, s: &tonic::Status) -> (Disposition, Failure) {
        let url = self.replicas[i].url.clone();
        let d = disposition(s);
        let failure = match d {
            Disposition::Failover { possibly_decided } => {
                self.replicas[i].client = None;
                Failure::Skip(Skipped {
                    url,
                    reason: format!("{what}: {} ({:?})", s.message(), s.code()),
                    possibly_decided,
                })
            }
            Disposition::AttestAgain | Disposition::Final => {
                Failure::Final(final_error(what, &url, s))
            }
        };
        (d, failure)
    }

    /// The current session, after a new attestation when there is none or it is due.
    fn session(&mut self, settings: &BrokerSettings) -> Result<&Session, KeyError> {
        if self
            .session
            .as_ref()
            .is_none_or(|s| Instant::now() >= s.renew_at)
        {
            self.session = None;
            self.attest_any(settings)?;
        }
        Ok(self.session.as_ref().expect("set above"))
    }

    /// A new session from the first replica that decides; returns its index and the
    /// replicas skipped before it.
    fn attest_any(&mut self, settings: &BrokerSettings) -> Result<(usize, Vec<Skipped>), KeyError> {
        let urls = settings.urls.clone();
        let start = self.current;
        let served = over_replicas(&urls, start, |i| self.attest_on(i, settings))?;
        self.session = Some(served.value);
        self.current = served.replica;
        Ok((served.replica, served.skipped))
    }

    /// Challenge, (credential activation,) quote, attest, on replica `i`: a new session.
    fn attest_on(&mut self, i: usize, settings: &BrokerSettings) -> Result<Session, Failure> {
        let tpm_failed =
            |e: &dyn std::fmt::Display| Failure::Final(KeyError::Failed(format!("TPM: {e}")));
        let mut client = self.client(i, settings)?;
        let mut tpm =
            Tpm::open_persistent(&settings.tpm, settings.ak_handle).map_err(|e| tpm_failed(&e))?;
        let key = SessionKey::generate();
        let challenge = match self.rt().block_on(client.challenge(ChallengeRequest {
            ak_public: tpm.ak_public().to_vec(),
        })) {
            Ok(r) => r.into_inner(),
            Err(s) => return Err(self.failed(i, "challenge", &s).1),
        };
        let pcrs: Vec<u8> = challenge
            .pcrs
            .iter()
            .map(|&p| {
                u8::try_from(p).map_err(|_| {
                    Failure::Final(KeyError::Failed(format!("the broker asks for PCR {p}")))
                })
            })
            .collect::<Result<_, _>>()?;
        // Until this AK has proven it lives in the TPM of the EK it was enrolled with, the
        // broker sends a credential only that TPM can activate (kept by the replica that
        // challenged, which is the one asked to attest).
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
        let attested = match self.rt().block_on(client.attest(attest_request(
            evidence,
            tpm.ak_public(),
            &challenge.nonce,
            key.public(),
            &activation,
        ))) {
            Ok(r) => r.into_inner(),
            Err(s) => return Err(self.failed(i, "attestation", &s).1),
        };
        tracing::info!(replica = %self.replicas[i].url, class = %attested.ipu_class, expires_in_secs = attested.expires_in_secs, "attested to the key broker");
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

    /// One release on replica `i` through the current session (attested there first when
    /// there is none, it is due, or the replica does not know it), opened into secret
    /// memory.
    fn release_on(
        &mut self,
        i: usize,
        settings: &BrokerSettings,
        request: &ReleaseRequest,
        context: &[u8],
    ) -> Result<SecretBuf, Failure> {
        let mut client = self.client(i, settings)?;
        let mut attested_here = false;
        loop {
            if self
                .session
                .as_ref()
                .is_none_or(|s| Instant::now() >= s.renew_at)
            {
                self.session = None;
                self.session = Some(self.attest_on(i, settings)?);
                attested_here = true;
            }
            let session = self.session.as_ref().expect("attested above");
            let request = ReleaseRequest {
                session_id: session.id.clone(),
                ..request.clone()
            };
            let released = match self.rt().block_on(client.release(request)) {
                Ok(r) => r.into_inner(),
                Err(s) => match self.failed(i, "key release", &s) {
                    // This replica does not know the session (expired early, a broker that
                    // restarted on its own store, or this IPU's enrollment revoked):
                    // attest again on it, once.
                    (Disposition::AttestAgain, _) if !attested_here => {
                        self.session = None;
                        // The attestation may have replaced the connection.
                        client = self.client(i, settings)?;
                        continue;
                    }
                    (_, failure) => return Err(failure),
                },
            };
            let session = self.session.as_ref().expect("attested above");
            let local = |e: String| Failure::Final(KeyError::Failed(e));
            let sealed = SealedKey {
                broker_public: released.broker_public,
                ciphertext: released.ciphertext,
            };
            let opened = session
                .key
                .open(&sealed, &session.salt, context)
                .map_err(|e| local(format!("the released key does not open: {e}")))?;
            let mut secret =
                SecretBuf::new(opened.len()).map_err(|e| local(format!("secret memory: {e}")))?;
            secret.as_mut_slice().copy_from_slice(&opened);
            // `opened` is zeroized as it drops here.
            return Ok(secret);
        }
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

    fn private_options(&self, req: &LayerKeyRequest<'_>) -> Result<ReleasedOptions, KeyError> {
        let r = self.release(req)?;
        Ok(ReleasedOptions {
            secret: r.secret,
            served_by: Some(r.served_by),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::{Code, Status};

    fn urls(n: usize) -> Vec<String> {
        (0..n)
            .map(|i| format!("https://replica-{i}:8443"))
            .collect()
    }

    fn skip(i: usize, possibly_decided: bool) -> Failure {
        Failure::Skip(Skipped {
            url: format!("https://replica-{i}:8443"),
            reason: "down".into(),
            possibly_decided,
        })
    }

    #[test]
    fn replicas_that_do_not_decide_are_skipped_in_order_from_the_current_one() {
        let mut asked = Vec::new();
        let served = over_replicas(&urls(3), 1, |i| {
            asked.push(i);
            if i == 0 {
                Ok("granted")
            } else {
                Err(skip(i, i == 2))
            }
        })
        .unwrap();
        assert_eq!(asked, [1, 2, 0], "from the current replica, wrapping");
        assert_eq!((served.value, served.replica), ("granted", 0));
        assert_eq!(
            served
                .skipped
                .iter()
                .map(|s| (s.url.as_str(), s.possibly_decided))
                .collect::<Vec<_>>(),
            [
                ("https://replica-1:8443", false),
                ("https://replica-2:8443", true)
            ]
        );
    }

    #[test]
    fn a_denial_is_final_and_no_other_replica_is_asked() {
        let mut asked = Vec::new();
        let e = over_replicas(&urls(3), 0, |i| -> Result<(), _> {
            asked.push(i);
            if i == 0 {
                Err(skip(0, false))
            } else {
                Err(Failure::Final(KeyError::Denied("denied by policy".into())))
            }
        })
        .err()
        .unwrap();
        assert!(matches!(e, KeyError::Denied(_)), "{e}");
        assert_eq!(
            asked,
            [0, 1],
            "replica 2 is never asked after replica 1 denied"
        );
    }

    #[test]
    fn when_no_replica_decides_the_request_is_unavailable_with_every_reason() {
        let mut asked = 0;
        let e = over_replicas(&urls(3), 2, |i| -> Result<(), _> {
            asked += 1;
            Err(skip(i, false))
        })
        .err()
        .unwrap();
        assert_eq!(asked, 3, "each replica once");
        let KeyError::Unavailable(text) = e else {
            panic!("{e}")
        };
        assert!(text.starts_with("none of the 3 key broker replicas answered"));
        for i in 0..3 {
            assert!(
                text.contains(&format!("https://replica-{i}:8443: down")),
                "{text}"
            );
        }
        // One replica: its reason alone, as before there were several.
        let e = over_replicas(&urls(1), 0, |i| -> Result<(), _> { Err(skip(i, false)) })
            .err()
            .unwrap();
        assert_eq!(e.to_string(), "key broker: https://replica-0:8443: down");
    }

    #[test]
    fn outages_fail_over_and_decisions_do_not() {
        let failover = |possibly_decided| Disposition::Failover { possibly_decided };
        // Sent by a replica (no transport error behind them).
        for (code, want) in [
            (Code::Unavailable, failover(false)),
            (Code::DeadlineExceeded, failover(true)),
            (Code::Cancelled, failover(true)),
            (Code::Unknown, failover(true)),
            (Code::Unauthenticated, Disposition::AttestAgain),
            (Code::PermissionDenied, Disposition::Final),
            (Code::InvalidArgument, Disposition::Final),
            (Code::NotFound, Disposition::Final),
            (Code::FailedPrecondition, Disposition::Final),
            (Code::Internal, Disposition::Final),
            (Code::ResourceExhausted, Disposition::Final),
        ] {
            assert_eq!(disposition(&Status::new(code, "x")), want, "{code:?}");
        }
        // Made by the client from a transport error: the replica decided nothing it could
        // say, whatever the code (a cut connection reads as Unknown, or Internal from h2).
        for code in [Code::Internal, Code::Unknown, Code::PermissionDenied] {
            let s = from_transport(code);
            assert_eq!(s.code(), code);
            assert!(std::error::Error::source(&s).is_some());
            assert_eq!(
                disposition(&s),
                failover(true),
                "{code:?} from the transport"
            );
        }
        let io = Status::from_error(Box::new(std::io::Error::other("connection reset")));
        assert_eq!(disposition(&io), failover(true));
        // Not connected: the request was never sent.
        assert_eq!(
            disposition(&from_transport(Code::Unavailable)),
            failover(false)
        );
        // Final answers map to a denial, or to the replica's own failure.
        let denied = final_error("key release", "https://r", &Status::permission_denied("no"));
        assert!(matches!(denied, KeyError::Denied(_)));
        assert!(denied.to_string().contains("key release at https://r: no"));
        let failed = final_error("key release", "https://r", &Status::internal("audit"));
        assert!(matches!(failed, KeyError::Failed(_)));
    }

    /// A transport error whose source chain holds a status (as tonic's client makes them).
    #[derive(Debug)]
    struct Transport(Status);
    impl std::fmt::Display for Transport {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "transport error")
        }
    }
    impl std::error::Error for Transport {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }
    fn from_transport(code: Code) -> Status {
        Status::from_error(Box::new(Transport(Status::new(code, "x"))))
    }
}
