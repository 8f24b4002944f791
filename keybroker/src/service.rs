//! The broker's gRPC services: `KeyBroker` (attest, release), `KeyAdmin` and the ocicrypt
//! `KeyProviderService`, over TLS (rustls with ring) with client certificates and over a
//! Unix socket for local use.
//!
//! Over TLS the caller's identity is its certificate subject and its role the subject's OU.
//! Over the Unix socket the identity is the peer's uid (from the kernel, SO_PEERCRED): root
//! and the broker's own uid are `admin`, other uids have the role the configuration gives
//! them, never `ipu`. Only role `ipu` may attest and obtain keys, and a session is usable
//! only by the identity that opened it.

use std::collections::BTreeMap;
use std::sync::Arc;

use api::keybroker::key_admin_server::{KeyAdmin, KeyAdminServer};
use api::keybroker::key_broker_server::{KeyBroker, KeyBrokerServer};
use api::keybroker::{
    AttestRequest, AttestResponse, ChallengeRequest, ChallengeResponse, CreateKeyRequest,
    EnrollIpuRequest, ImportKeyRequest, IpuIdRequest, IpuInfo, IpuList, KeyIdRequest, KeyInfo,
    KeyList, ListRequest, LoadPolicyRequest, PolicyInfo, ReleaseRequest, ReleaseResponse,
    RevokeKeyRequest,
};
use api::keyprovider::key_provider_service_server::{KeyProviderService, KeyProviderServiceServer};
use api::keyprovider::{KeyProviderKeyWrapProtocolInput, KeyProviderKeyWrapProtocolOutput};
use der::Decode;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};
use tonic::{Request, Response, Status};

use crate::broker::{self, Broker, BrokerError, Wrapped};
use crate::keystore::{self, KeyKind};
use crate::provider::{self, Door, ProviderError};
use crate::verifier::{EnrolledIpu, Evidence};

/// OID of the organizationalUnitName attribute.
const OID_OU: der::asn1::ObjectIdentifier = der::asn1::ObjectIdentifier::new_unwrap("2.5.4.11");

/// The authenticated caller: certificate subject and role.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Caller {
    pub subject: String,
    pub role: String,
}

fn attribute_text(value: &der::Any) -> Option<String> {
    value
        .decode_as::<der::asn1::Utf8StringRef<'_>>()
        .map(|s| s.as_str().to_string())
        .or_else(|_| {
            value
                .decode_as::<der::asn1::PrintableStringRef<'_>>()
                .map(|s| s.as_str().to_string())
        })
        .ok()
}

/// How callers are identified on a listener.
#[derive(Clone, Debug)]
pub enum Auth {
    /// Client certificates (mutual TLS).
    Tls,
    /// Peer credentials of a Unix socket: root and `own_uid` are admin, `roles` the rest.
    Unix {
        own_uid: u32,
        roles: std::collections::BTreeMap<u32, String>,
    },
}

impl Auth {
    /// The caller of a request on this listener.
    #[allow(clippy::result_large_err)]
    pub fn caller<T>(&self, req: &Request<T>) -> Result<Caller, Status> {
        match self {
            Auth::Tls => caller(req),
            Auth::Unix { own_uid, roles } => {
                let uid = req
                    .extensions()
                    .get::<tonic::transport::server::UdsConnectInfo>()
                    .and_then(|i| i.peer_cred)
                    .map(|c| c.uid())
                    .ok_or_else(|| Status::unauthenticated("no peer credentials"))?;
                let role = if uid == 0 || uid == *own_uid {
                    "admin".to_string()
                } else {
                    roles.get(&uid).cloned().ok_or_else(|| {
                        Status::permission_denied(format!("uid {uid} has no role on this socket"))
                    })?
                };
                Ok(Caller {
                    subject: format!("uid:{uid}"),
                    role,
                })
            }
        }
    }
}

/// The caller of a request, from its verified client certificate.
// tonic's handlers return `Status` by value.
#[allow(clippy::result_large_err)]
pub fn caller<T>(req: &Request<T>) -> Result<Caller, Status> {
    let certs = req
        .peer_certs()
        .ok_or_else(|| Status::unauthenticated("a client certificate is required"))?;
    let leaf = certs
        .first()
        .ok_or_else(|| Status::unauthenticated("a client certificate is required"))?;
    let cert = x509_cert::Certificate::from_der(leaf.as_ref())
        .map_err(|e| Status::unauthenticated(format!("unreadable client certificate: {e}")))?;
    let subject = cert.tbs_certificate.subject;
    let role = subject
        .0
        .iter()
        .flat_map(|rdn| rdn.0.iter())
        .find(|ava| ava.oid == OID_OU)
        .and_then(|ava| attribute_text(&ava.value))
        .ok_or_else(|| Status::permission_denied("the client certificate names no role (OU)"))?;
    Ok(Caller {
        subject: subject.to_string(),
        role,
    })
}

#[allow(clippy::result_large_err)]
fn require(caller: &Caller, role: &str) -> Result<(), Status> {
    require_any(caller, &[role])
}

#[allow(clippy::result_large_err)]
fn require_any(caller: &Caller, roles: &[&str]) -> Result<(), Status> {
    if roles.contains(&caller.role.as_str()) {
        Ok(())
    } else {
        Err(Status::permission_denied(format!(
            "role {:?} may not do this (needs {})",
            caller.role,
            roles.join(" or ")
        )))
    }
}

fn status(e: BrokerError) -> Status {
    // The store failed: the service is unavailable, nothing was decided.
    if e.is_operational() {
        return Status::unavailable(e.to_string());
    }
    match e {
        BrokerError::Attestation(_)
        | BrokerError::Denied(_)
        | BrokerError::NoUsableKey(_)
        | BrokerError::Grant { .. }
        | BrokerError::WrongClient => Status::permission_denied(e.to_string()),
        // Its own code, so a client knows to attest again (and nothing else means that).
        BrokerError::NoSession => Status::unauthenticated(e.to_string()),
        BrokerError::Annotation(_)
        | BrokerError::Wrap(_)
        | BrokerError::WrappingDoesNotOpen(_)
        | BrokerError::NoWrapping
        | BrokerError::Wrapping(_)
        | BrokerError::Seal(_) => Status::invalid_argument(e.to_string()),
        BrokerError::KeyStore(keystore::KeyStoreError::NotFound(_)) => {
            Status::not_found(e.to_string())
        }
        BrokerError::KeyStore(keystore::KeyStoreError::Exists(_)) => {
            Status::already_exists(e.to_string())
        }
        BrokerError::KeyStore(
            keystore::KeyStoreError::Invalid(_) | keystore::KeyStoreError::Revoked(_),
        ) => Status::failed_precondition(e.to_string()),
        // The broker's state and administration (before, one catch-all variant with this code).
        BrokerError::StateDir { .. }
        | BrokerError::MasterKeyIsFile(_)
        | BrokerError::MasterKeyIsSealed(_)
        | BrokerError::BundleKey(_)
        | BrokerError::RunningPolicy { .. }
        | BrokerError::Class(_)
        | BrokerError::Enrollment(_)
        | BrokerError::EndorsementKeyRequired
        | BrokerError::PublicKey(_)
        | BrokerError::FixedPolicy
        | BrokerError::NoBundleKeys
        | BrokerError::PolicyContention => Status::failed_precondition(e.to_string()),
        BrokerError::Store(_) => Status::unavailable(e.to_string()),
        BrokerError::Audit(_) | BrokerError::KeyStore(_) => Status::internal(e.to_string()),
    }
}

/// The gRPC status of a refusal.
trait ToStatus {
    fn to_status(self) -> Status;
}

impl ToStatus for BrokerError {
    fn to_status(self) -> Status {
        status(self)
    }
}

impl ToStatus for ProviderError {
    fn to_status(self) -> Status {
        match self {
            ProviderError::Request(_) => Status::invalid_argument(self.to_string()),
            ProviderError::Broker(e) => status(e),
        }
    }
}

async fn blocking<T: Send + 'static, E: ToStatus + Send + 'static>(
    f: impl FnOnce() -> Result<T, E> + Send + 'static,
) -> Result<T, Status> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Status::internal(e.to_string()))?
        .map_err(ToStatus::to_status)
}

pub struct KeyBrokerService {
    broker: Arc<Broker>,
    auth: Auth,
}

impl KeyBrokerService {
    pub fn new(broker: Arc<Broker>, auth: Auth) -> KeyBrokerServer<Self> {
        KeyBrokerServer::new(Self { broker, auth })
    }
}

#[tonic::async_trait]
impl KeyBroker for KeyBrokerService {
    async fn challenge(
        &self,
        request: Request<ChallengeRequest>,
    ) -> Result<Response<ChallengeResponse>, Status> {
        let who = self.auth.caller(&request)?;
        require(&who, "ipu")?;
        let ak_public = request.into_inner().ak_public;
        let broker = self.broker.clone();
        let (nonce, (pcrs, credential)) = blocking(move || {
            let found = if ak_public.is_empty() {
                (Vec::new(), None)
            } else {
                broker.challenge_for(&who.subject, &ak_public)?
            };
            Ok::<_, BrokerError>((broker.challenge()?, found))
        })
        .await?;
        let (credential_id_object, credential_secret) = credential
            .map(|c| (c.id_object, c.encrypted_secret))
            .unwrap_or_default();
        Ok(Response::new(ChallengeResponse {
            nonce: nonce.to_vec(),
            pcrs: pcrs.into_iter().map(u32::from).collect(),
            credential_id_object,
            credential_secret,
        }))
    }

    async fn attest(
        &self,
        request: Request<AttestRequest>,
    ) -> Result<Response<AttestResponse>, Status> {
        let who = self.auth.caller(&request)?;
        require(&who, "ipu")?;
        let r = request.into_inner();
        let mut pcrs = BTreeMap::new();
        for (i, v) in r.pcrs {
            let i =
                u8::try_from(i).map_err(|_| Status::invalid_argument(format!("PCR index {i}")))?;
            pcrs.insert(i, v);
        }
        let evidence = Evidence {
            attest: r.attest,
            signature: r.signature,
            pcrs,
        };
        let broker = self.broker.clone();
        let activation = zeroize::Zeroizing::new(r.activation);
        let session = blocking(move || {
            broker.attest_activated(
                &who.subject,
                &evidence,
                &r.ak_public,
                &r.nonce,
                &r.session_public,
                (!activation.is_empty()).then_some(activation.as_slice()),
            )
        })
        .await?;
        Ok(Response::new(AttestResponse {
            session_id: session.id.clone(),
            expires_in_secs: session.expires_in().as_secs(),
            ipu_class: session.ipu_class,
            ipu_id: session.ipu_id,
        }))
    }

    async fn release(
        &self,
        request: Request<ReleaseRequest>,
    ) -> Result<Response<ReleaseResponse>, Status> {
        let who = self.auth.caller(&request)?;
        require(&who, "ipu")?;
        let r = request.into_inner();
        let wrapped =
            match (r.wrapped_jwe.is_empty(), r.wrapped_provider.is_empty()) {
                (false, true) => Wrapped::Jwe(r.wrapped_jwe),
                (true, false) => Wrapped::Provider(r.wrapped_provider),
                _ => return Err(Status::invalid_argument(
                    "give the layer's wrapped key: wrapped_jwe or wrapped_provider, exactly one",
                )),
            };
        let req = broker::ReleaseRequest {
            session_id: r.session_id,
            tenant: r.tenant,
            function: r.function,
            image: r.image,
            image_digest: r.image_digest,
            layer_digest: r.layer_digest,
            wrapped,
            grant: Some(r.grant).filter(|g| !g.is_empty()),
        };
        let broker = self.broker.clone();
        let sealed = blocking(move || broker.release(&who.subject, &req)).await?;
        Ok(Response::new(ReleaseResponse {
            broker_public: sealed.broker_public,
            ciphertext: sealed.ciphertext,
        }))
    }
}

/// Accepted connections with Nagle's algorithm off: small request/response exchanges
/// otherwise wait for delayed ACKs (40 ms on Linux).
struct NoDelay(tokio_stream::wrappers::TcpListenerStream);

impl tokio_stream::Stream for NoDelay {
    type Item = std::io::Result<tokio::net::TcpStream>;
    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        std::pin::Pin::new(&mut self.0).poll_next(cx).map(|item| {
            item.map(|conn| {
                conn.and_then(|c| {
                    c.set_nodelay(true)?;
                    Ok(c)
                })
            })
        })
    }
}

/// TLS settings: the server's certificate and key, and the CA client certificates must
/// chain to (client certificates are required).
pub struct TlsFiles {
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
    pub client_ca_pem: Vec<u8>,
}

/// A key version as the admin API shows it.
pub fn key_info(k: keystore::KeyInfo) -> KeyInfo {
    KeyInfo {
        id: k.id,
        version: k.version,
        algorithm: k.algorithm,
        public_pem: k.public_pem,
        created: k.created,
        revoked: k.revoked,
    }
}

/// An enrollment as the admin API shows it.
pub fn ipu_info(e: EnrolledIpu) -> IpuInfo {
    IpuInfo {
        ipu_id: e.enrollment.ipu_id,
        ipu_class: e.enrollment.ipu_class,
        ak_public: e.ak_public,
        enrolled: e.enrolled,
        revoked: e.enrollment.revoked,
        pinned: e.enrollment.ek_template.is_some(),
        activated: e.enrollment.activated,
    }
}

/// Administration: keys, enrollments, policy bundles (role admin; listing also auditor).
pub struct AdminService {
    broker: Arc<Broker>,
    auth: Auth,
}

impl AdminService {
    pub fn new(broker: Arc<Broker>, auth: Auth) -> KeyAdminServer<Self> {
        KeyAdminServer::new(Self { broker, auth })
    }

    #[allow(clippy::result_large_err)]
    fn admin<T>(&self, req: &Request<T>) -> Result<String, Status> {
        let who = self.auth.caller(req)?;
        require(&who, "admin")?;
        Ok(who.subject)
    }
}

#[tonic::async_trait]
impl KeyAdmin for AdminService {
    async fn create_key(
        &self,
        req: Request<CreateKeyRequest>,
    ) -> Result<Response<KeyInfo>, Status> {
        let who = self.admin(&req)?;
        let r = req.into_inner();
        let kind: KeyKind = r
            .kind
            .parse()
            .map_err(|e: keystore::KeyStoreError| Status::invalid_argument(e.to_string()))?;
        let b = self.broker.clone();
        let info = blocking(move || b.create_key(&who, &r.id, kind)).await?;
        Ok(Response::new(key_info(info)))
    }

    async fn import_key(
        &self,
        req: Request<ImportKeyRequest>,
    ) -> Result<Response<KeyInfo>, Status> {
        let who = self.admin(&req)?;
        let r = req.into_inner();
        let pem = zeroize::Zeroizing::new(r.private_pem);
        let b = self.broker.clone();
        let info = blocking(move || b.import_key(&who, &r.id, &pem)).await?;
        Ok(Response::new(key_info(info)))
    }

    async fn rotate_key(&self, req: Request<KeyIdRequest>) -> Result<Response<KeyInfo>, Status> {
        let who = self.admin(&req)?;
        let id = req.into_inner().id;
        let b = self.broker.clone();
        let info = blocking(move || b.rotate_key(&who, &id)).await?;
        Ok(Response::new(key_info(info)))
    }

    async fn revoke_key(
        &self,
        req: Request<RevokeKeyRequest>,
    ) -> Result<Response<KeyInfo>, Status> {
        let who = self.admin(&req)?;
        let r = req.into_inner();
        let version = (r.version != 0).then_some(r.version);
        let b = self.broker.clone();
        let mut revoked = blocking(move || b.revoke_key(&who, &r.id, version)).await?;
        Ok(Response::new(key_info(
            revoked.pop().expect("at least one"),
        )))
    }

    async fn list_keys(&self, req: Request<ListRequest>) -> Result<Response<KeyList>, Status> {
        require_any(&self.auth.caller(&req)?, &["admin", "auditor"])?;
        let b = self.broker.clone();
        let keys = blocking(move || b.keys().list().map_err(BrokerError::from))
            .await?
            .into_iter()
            .map(key_info)
            .collect();
        Ok(Response::new(KeyList { keys }))
    }

    async fn enroll_ipu(
        &self,
        req: Request<EnrollIpuRequest>,
    ) -> Result<Response<IpuInfo>, Status> {
        let who = self.admin(&req)?;
        let r = req.into_inner();
        let b = self.broker.clone();
        let e = blocking(move || {
            let ek = (!r.ek_template.is_empty()).then_some(r.ek_template.as_slice());
            b.enroll_ipu(&who, &r.ipu_id, &r.ipu_class, &r.ak_template, ek)
        })
        .await?;
        Ok(Response::new(ipu_info(e)))
    }

    async fn revoke_ipu(&self, req: Request<IpuIdRequest>) -> Result<Response<IpuInfo>, Status> {
        let who = self.admin(&req)?;
        let id = req.into_inner().ipu_id;
        let b = self.broker.clone();
        let e = blocking(move || b.revoke_ipu(&who, &id)).await?;
        Ok(Response::new(ipu_info(e)))
    }

    async fn list_ipus(&self, req: Request<ListRequest>) -> Result<Response<IpuList>, Status> {
        require_any(&self.auth.caller(&req)?, &["admin", "auditor"])?;
        let b = self.broker.clone();
        let ipus = blocking(move || b.verifier.list().map_err(BrokerError::from))
            .await?
            .into_iter()
            .map(ipu_info)
            .collect();
        Ok(Response::new(IpuList { ipus }))
    }

    async fn load_policy(
        &self,
        req: Request<LoadPolicyRequest>,
    ) -> Result<Response<PolicyInfo>, Status> {
        let who = self.admin(&req)?;
        let bundle = req.into_inner().bundle;
        let b = self.broker.clone();
        let v = blocking(move || b.load_policy(&who, &bundle)).await?;
        Ok(Response::new(PolicyInfo {
            version: v.content.version,
            signer: v.signer,
        }))
    }
}

/// The ocicrypt key provider protocol: WrapKey for publishers and admins, UnWrapKey for
/// attested IPUs (the request names their session).
pub struct ProviderService {
    broker: Arc<Broker>,
    auth: Auth,
}

impl ProviderService {
    pub fn new(broker: Arc<Broker>, auth: Auth) -> KeyProviderServiceServer<Self> {
        KeyProviderServiceServer::new(Self { broker, auth })
    }

    async fn call(
        &self,
        req: Request<KeyProviderKeyWrapProtocolInput>,
        want: Door,
    ) -> Result<Response<KeyProviderKeyWrapProtocolOutput>, Status> {
        let who = self.auth.caller(&req)?;
        let input = zeroize::Zeroizing::new(req.into_inner().key_provider_key_wrap_protocol_input);
        let b = self.broker.clone();
        let output = blocking(move || {
            provider::handle(&b, &who.subject, &input, |door| {
                if door != want {
                    return Err(
                        provider::ProviderRequestError::WrongMethod { door, method: want }.into(),
                    );
                }
                let allowed: &[&str] = match door {
                    Door::Wrap => &["publisher", "admin"],
                    Door::Unwrap => &["ipu"],
                };
                if allowed.contains(&who.role.as_str()) {
                    Ok(())
                } else {
                    Err(ProviderError::Broker(BrokerError::Denied(format!(
                        "role {:?} may not {} (needs {})",
                        who.role,
                        if door == Door::Wrap {
                            "wrap keys"
                        } else {
                            "unwrap keys"
                        },
                        allowed.join(" or ")
                    ))))
                }
            })
        })
        .await?;
        Ok(Response::new(KeyProviderKeyWrapProtocolOutput {
            key_provider_key_wrap_protocol_output: output,
        }))
    }
}

#[tonic::async_trait]
impl KeyProviderService for ProviderService {
    async fn wrap_key(
        &self,
        req: Request<KeyProviderKeyWrapProtocolInput>,
    ) -> Result<Response<KeyProviderKeyWrapProtocolOutput>, Status> {
        self.call(req, Door::Wrap).await
    }

    async fn un_wrap_key(
        &self,
        req: Request<KeyProviderKeyWrapProtocolInput>,
    ) -> Result<Response<KeyProviderKeyWrapProtocolOutput>, Status> {
        self.call(req, Door::Unwrap).await
    }
}

fn router<H: ops::health::Health>(
    broker: Arc<Broker>,
    auth: Auth,
    server: &mut Server,
    health: Option<ops::health::HealthServer<H>>,
) -> tonic::transport::server::Router {
    server
        .add_optional_service(health)
        .add_service(KeyBrokerService::new(broker.clone(), auth.clone()))
        .add_service(AdminService::new(broker.clone(), auth.clone()))
        .add_service(ProviderService::new(broker, auth))
}

/// Serves the broker on `listener` (mutual TLS) until `shutdown` resolves.
pub async fn serve(
    broker: Arc<Broker>,
    listener: tokio::net::TcpListener,
    tls: TlsFiles,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    serve_with_health::<tonic_health::server::HealthService>(broker, listener, tls, None, shutdown)
        .await
}

/// Serves the broker on a Unix socket (callers identified by their uid) until `shutdown`.
pub async fn serve_unix(
    broker: Arc<Broker>,
    listener: tokio::net::UnixListener,
    roles: std::collections::BTreeMap<u32, String>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    serve_unix_with_health::<tonic_health::server::HealthService>(
        broker, listener, roles, None, shutdown,
    )
    .await
}

/// [`serve`] with the standard gRPC health service (`keybroker serve` reports readiness on it).
pub async fn serve_with_health<H: ops::health::Health>(
    broker: Arc<Broker>,
    listener: tokio::net::TcpListener,
    tls: TlsFiles,
    health: Option<ops::health::HealthServer<H>>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    let config = ServerTlsConfig::new()
        .identity(Identity::from_pem(tls.cert_pem, tls.key_pem))
        .client_ca_root(Certificate::from_pem(tls.client_ca_pem));
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    let mut server = Server::builder().tcp_nodelay(true).tls_config(config)?;
    router(broker, Auth::Tls, &mut server, health)
        .serve_with_incoming_shutdown(NoDelay(incoming), shutdown)
        .await
}

/// [`serve_unix`] with the standard gRPC health service.
pub async fn serve_unix_with_health<H: ops::health::Health>(
    broker: Arc<Broker>,
    listener: tokio::net::UnixListener,
    roles: std::collections::BTreeMap<u32, String>,
    health: Option<ops::health::HealthServer<H>>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let own_uid = unsafe { libc::geteuid() };
    let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener);
    router(
        broker,
        Auth::Unix { own_uid, roles },
        &mut Server::builder(),
        health,
    )
    .serve_with_incoming_shutdown(incoming, shutdown)
    .await
}
