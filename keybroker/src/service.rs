//! The broker's gRPC service over TLS (rustls with ring) with client certificates. The
//! client's identity is its certificate subject; its role is the subject's OU. Only role
//! `ipu` may attest and obtain keys, and a session is usable only with the certificate that
//! opened it.

use std::collections::BTreeMap;
use std::sync::Arc;

use api::keybroker::key_broker_server::{KeyBroker, KeyBrokerServer};
use api::keybroker::{
    AttestRequest, AttestResponse, ChallengeRequest, ChallengeResponse, ReleaseRequest,
    ReleaseResponse,
};
use der::Decode;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};
use tonic::{Request, Response, Status};

use crate::attest::Evidence;
use crate::broker::{self, Broker, BrokerError};

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
    if caller.role == role {
        Ok(())
    } else {
        Err(Status::permission_denied(format!(
            "role {:?} may not do this (needs {role:?})",
            caller.role
        )))
    }
}

fn status(e: BrokerError) -> Status {
    match e {
        BrokerError::Attestation(_)
        | BrokerError::Denied(_)
        | BrokerError::NoUsableKey(_)
        | BrokerError::WrongClient => Status::permission_denied(e.to_string()),
        BrokerError::NoSession => Status::failed_precondition(e.to_string()),
        BrokerError::Request(_) => Status::invalid_argument(e.to_string()),
        BrokerError::Audit(_) | BrokerError::KeyStore(_) => Status::internal(e.to_string()),
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, BrokerError> + Send + 'static,
) -> Result<T, Status> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Status::internal(e.to_string()))?
        .map_err(status)
}

pub struct KeyBrokerService {
    broker: Arc<Broker>,
}

impl KeyBrokerService {
    pub fn new(broker: Arc<Broker>) -> KeyBrokerServer<Self> {
        KeyBrokerServer::new(Self { broker })
    }
}

#[tonic::async_trait]
impl KeyBroker for KeyBrokerService {
    async fn challenge(
        &self,
        request: Request<ChallengeRequest>,
    ) -> Result<Response<ChallengeResponse>, Status> {
        require(&caller(&request)?, "ipu")?;
        Ok(Response::new(ChallengeResponse {
            nonce: self.broker.challenge().to_vec(),
        }))
    }

    async fn attest(
        &self,
        request: Request<AttestRequest>,
    ) -> Result<Response<AttestResponse>, Status> {
        let who = caller(&request)?;
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
        let session = blocking(move || {
            broker.attest(
                &who.subject,
                &evidence,
                &r.ak_public,
                &r.nonce,
                &r.session_public,
            )
        })
        .await?;
        Ok(Response::new(AttestResponse {
            session_id: session.id.clone(),
            expires_in_secs: session.expires_in().as_secs(),
            ipu_class: session.ipu_class,
        }))
    }

    async fn release(
        &self,
        request: Request<ReleaseRequest>,
    ) -> Result<Response<ReleaseResponse>, Status> {
        let who = caller(&request)?;
        require(&who, "ipu")?;
        let r = request.into_inner();
        let req = broker::ReleaseRequest {
            session_id: r.session_id,
            tenant: r.tenant,
            function: r.function,
            image: r.image,
            image_digest: r.image_digest,
            layer_digest: r.layer_digest,
            wrapped_jwe: r.wrapped_jwe,
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

/// Serves the broker on `listener` until `shutdown` resolves.
pub async fn serve(
    broker: Arc<Broker>,
    listener: tokio::net::TcpListener,
    tls: TlsFiles,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    let config = ServerTlsConfig::new()
        .identity(Identity::from_pem(tls.cert_pem, tls.key_pem))
        .client_ca_root(Certificate::from_pem(tls.client_ca_pem));
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    Server::builder()
        .tcp_nodelay(true)
        .tls_config(config)?
        .add_service(KeyBrokerService::new(broker))
        .serve_with_incoming_shutdown(NoDelay(incoming), shutdown)
        .await
}
