//! The service's gRPC API on a Unix socket. Callers are identified by their kernel-reported
//! uid: the host agent's uid and root may call it, nobody else.

use std::sync::Arc;

use api::imagesvc::image_service_server::{ImageService, ImageServiceServer};
use api::imagesvc::{
    CloneEvent, CloneInfo, DecryptLayerRequest, DecryptLayerResponse, DecryptLayerTrailer,
    ListRequest, ListResponse, PrepareRequest, PrepareResponse, TeardownRequest, TeardownResponse,
    VerifyRequest, VerifyResponse, WatchRequest,
};
use tonic::{Request, Response, Status, Streaming};

use super::decrypt::{EarlyLayer, LayerStream};
use super::prefetch::{BlobComparison, HeldLayer, PREFETCH_WAIT};
use super::spool::{Chunk, SpoolWriter, StoredBlob};
use super::Service;
use super::ServiceError;
use crate::verify::BLOB_PREFIX_LEN;

pub struct Api {
    service: Arc<Service>,
    host_agent_uid: u32,
    /// One permit per DecryptLayer stream being received or sent.
    decrypt_streams: Arc<tokio::sync::Semaphore>,
}

/// DecryptLayer streams served at once: each holds a spool of up to `MAX_BLOB` bytes and
/// threads; past this the host is told to retry (containerd pulls 3 layers at a time).
pub const MAX_DECRYPT_STREAMS: usize = 8;

#[allow(clippy::result_large_err)]
fn authorize<T>(req: &Request<T>, host_agent_uid: u32) -> Result<(), Status> {
    let uid = req
        .extensions()
        .get::<tonic::transport::server::UdsConnectInfo>()
        .and_then(|i| i.peer_cred)
        .map(|c| c.uid())
        .ok_or_else(|| Status::unauthenticated("no peer credentials"))?;
    if uid == 0 || uid == host_agent_uid {
        Ok(())
    } else {
        Err(Status::permission_denied(format!(
            "uid {uid} is not the host agent"
        )))
    }
}

fn status(e: ServiceError) -> Status {
    e.to_status()
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ServiceError> + Send + 'static,
) -> Result<T, Status> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Status::internal(e.to_string()))?
        .map_err(status)
}

/// The largest layer blob DecryptLayer takes.
const MAX_BLOB: u64 = 16 << 30;
/// Plaintext chunk sent back.
const CHUNK: usize = 1 << 20;

/// The HMAC's verdict over a received blob.
type Authenticated = Result<ocicrypt::VerifiedCiphertext, ocicrypt::Error>;

/// Receives a DecryptLayer request's blob into `spool` (in memory while the spool budget has
/// room, else spilled to its file). A blob recognised from its start is fed to `verifier`
/// (that layer's HMAC) on the way; any other is hashed on the way (its digest says which
/// layer it is). The hash or the HMAC and the spool run on a thread each: one SHA-256 pass
/// alone is about as slow as the stream. The digest is `None` when the HMAC ran instead.
async fn receive_blob(
    first: Chunk,
    inbound: &mut Streaming<DecryptLayerRequest>,
    mut spool: SpoolWriter,
    verifier: Option<ocicrypt::CiphertextVerifier>,
) -> Result<(StoredBlob, Option<String>, u64, Option<Authenticated>), Status> {
    let (to_writer, mut writes) = tokio::sync::mpsc::channel::<Chunk>(8);
    let (to_hasher, hasher) = if verifier.is_none() {
        let (tx, mut hashes) = tokio::sync::mpsc::channel::<Chunk>(8);
        let hasher = tokio::task::spawn_blocking(move || {
            let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
            while let Some(chunk) = hashes.blocking_recv() {
                ctx.update(&chunk);
            }
            format!("sha256:{}", hex::encode(ctx.finish()))
        });
        (Some(tx), Some(hasher))
    } else {
        (None, None)
    };
    let (to_mac, mac) = match verifier {
        Some(mut verifier) => {
            let (tx, mut rx) = tokio::sync::mpsc::channel::<Chunk>(8);
            let mac = tokio::task::spawn_blocking(move || {
                while let Some(chunk) = rx.blocking_recv() {
                    verifier.update(&chunk);
                }
                verifier.verify()
            });
            (Some(tx), Some(mac))
        }
        None => (None, None),
    };
    let writer = tokio::task::spawn_blocking(move || -> std::io::Result<StoredBlob> {
        while let Some(chunk) = writes.blocking_recv() {
            // Copied into the spool's blocks: the decoded buffer goes back to the allocator
            // as soon as the hash thread is done with it too.
            spool.push(&chunk)?;
        }
        spool.finish()
    });
    let mut received = 0u64;
    let mut next = Some(first);
    let failed = loop {
        let data = match next.take() {
            Some(data) => data,
            None => match inbound.message().await {
                Ok(Some(m)) => m.data,
                Ok(None) => break None,
                Err(e) => break Some(e),
            },
        };
        received += data.len() as u64;
        if received > MAX_BLOB {
            break Some(Status::resource_exhausted(format!(
                "a layer blob over {MAX_BLOB} bytes"
            )));
        }
        // `Bytes`: the clones share the one decoded buffer.
        if let Some(to_mac) = &to_mac {
            // The HMAC thread only stops at the end.
            let _ = to_mac.send(data.clone()).await;
        }
        if let Some(to_hasher) = &to_hasher {
            // The hasher only stops at the end.
            let _ = to_hasher.send(data.clone()).await;
        }
        if to_writer.send(data).await.is_err() {
            // The writer failed; its error is reported below.
            break None;
        }
    };
    drop((to_writer, to_hasher, to_mac));
    // All are done with the blob before anything returns (the blob is then dropped,
    // whatever happened: its memory returns to the budget, a spilled file is deleted).
    let written = writer.await;
    let digest = match hasher {
        Some(hasher) => Some(hasher.await.map_err(|e| Status::internal(e.to_string()))?),
        None => None,
    };
    let authenticated = match mac {
        Some(mac) => Some(mac.await.map_err(|e| Status::internal(e.to_string()))?),
        None => None,
    };
    if let Some(e) = failed {
        return Err(e);
    }
    let stored = written
        .map_err(|e| Status::internal(e.to_string()))?
        .map_err(|e| Status::internal(format!("spooling the blob: {e}")))?;
    Ok((stored, digest, received, authenticated))
}

/// `sha256:<hex>` of a received blob, read back from where it is held.
fn hash_stored(blob: &StoredBlob) -> Result<String, ServiceError> {
    let reader = crate::service::decrypt::open_blob(blob)?;
    crate::fetch::digest_of(reader)
        .map(|d| d.to_string())
        .map_err(|e| ServiceError::device("reading the received blob back", e))
}

/// A DecryptLayer request's spool: where its blob would be spilled, under a random name.
fn spool_for(service: &Service) -> SpoolWriter {
    let mut id = [0u8; 8];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut id)
        .expect("system randomness");
    let path = service
        .spool_dir()
        .join(format!("decrypt-{}.blob", hex::encode(id)));
    SpoolWriter::new(service.spool_budget().clone(), &path)
}

/// The endpoint's Unix socket path, or "".
fn unix_socket(e: &crate::export::Endpoint) -> String {
    match e {
        crate::export::Endpoint::Unix(p) | crate::export::Endpoint::VhostUser(p) => {
            p.display().to_string()
        }
        crate::export::Endpoint::Tcp(_) => String::new(),
    }
}

/// The endpoint's TCP address, or "".
fn tcp_address(e: &crate::export::Endpoint) -> String {
    match e {
        crate::export::Endpoint::Unix(_) | crate::export::Endpoint::VhostUser(_) => String::new(),
        crate::export::Endpoint::Tcp(a) => a.to_string(),
    }
}

/// The plaintext stream DecryptLayer answers with.
type PlaintextStream = std::pin::Pin<
    Box<dyn tokio_stream::Stream<Item = Result<DecryptLayerResponse, Status>> + Send>,
>;

impl Api {
    /// The one-pass DecryptLayer: the plaintext of the IPU's own authenticated copy of the
    /// layer goes out at once, while the host's blob (`first`, then the rest of `inbound`)
    /// is compared with that copy as it arrives; the trailer is sent only if the two are the
    /// same bytes, so a host whose blob is another one gets an error, not a success.
    async fn decrypt_held(
        &self,
        header: api::imagesvc::DecryptLayerHeader,
        first: Chunk,
        mut inbound: Streaming<DecryptLayerRequest>,
        early: EarlyLayer,
        held: HeldLayer,
        permit: tokio::sync::OwnedSemaphorePermit,
    ) -> Result<Response<PlaintextStream>, Status> {
        let service = self.service.clone();
        let (layer, copy) = blocking(move || {
            let payload = (!header.payload_descriptor_json.is_empty())
                .then_some(header.payload_descriptor_json.as_str());
            service.open_held(
                &header.tenant,
                &header.function,
                &header.media_type,
                payload,
                early,
                held,
            )
        })
        .await?;
        let mut comparison = BlobComparison::new(&copy, layer.layer_size())
            .map_err(|e| Status::internal(format!("reading the IPU's copy: {e}")))?;
        let digest = layer.layer_digest();
        let (pieces, mut to_compare) = tokio::sync::mpsc::channel::<Chunk>(8);
        let (verdict, verdict_rx) = tokio::sync::oneshot::channel();
        // The comparison reads the copy (memory, or its spool file): a thread of its own.
        tokio::task::spawn_blocking(move || {
            let result = loop {
                let Some(piece) = to_compare.blocking_recv() else {
                    break comparison.finish().map_err(Differs::At);
                };
                if let Err(e) = comparison.update(&piece) {
                    break Err(Differs::Unreadable(e.to_string()));
                }
                if let Some(at) = comparison.differs_at() {
                    break Err(Differs::At(at));
                }
            };
            let _ = verdict.send(result.map_err(|d| d.describe(&digest)));
        });
        tokio::spawn(async move {
            let mut next = Some(first);
            loop {
                let data = match next.take() {
                    Some(data) => data,
                    None => match inbound.message().await {
                        Ok(Some(m)) => m.data,
                        // The end of the host's blob, or its stream failed (then the
                        // comparison ends short, and says where).
                        Ok(None) | Err(_) => break,
                    },
                };
                if pieces.send(data).await.is_err() {
                    // The comparison has its verdict already.
                    break;
                }
            }
        });
        Ok(send_plaintext(layer, (copy, permit), Some(verdict_rx)))
    }
}

/// Why a host's blob is not the IPU's copy.
enum Differs {
    At(u64),
    Unreadable(String),
}

impl Differs {
    fn describe(&self, layer: &str) -> String {
        match self {
            Differs::At(at) => format!(
                "the blob received is not layer {layer}, whose start it has: it differs from the IPU's verified copy from byte {at} on"
            ),
            Differs::Unreadable(e) => format!("reading the IPU's copy of layer {layer}: {e}"),
        }
    }
}

/// Streams `layer`'s plaintext as it is decrypted, then its trailer once the length and
/// plaintext digest are checked (and, when `verdict` is given, once the host's blob was found
/// to be the IPU's copy: the stream ends with an error as soon as it is not). `keep` (the
/// blob, the stream's permit) lives until the stream ends.
fn send_plaintext<K: Send + 'static>(
    mut layer: LayerStream,
    keep: K,
    mut verdict: Option<tokio::sync::oneshot::Receiver<Result<(), String>>>,
) -> Response<PlaintextStream> {
    let (out, rx) = tokio::sync::mpsc::channel(4);
    tokio::task::spawn_blocking(move || {
        let _keep = keep;
        // On the record before the host hears of it.
        let refuse = |layer: LayerStream, why: String| {
            layer.abandon(&why);
            let _ = out.blocking_send(Err(status(ServiceError::Refused(why))));
        };
        // A verdict that came early, and said the blobs differ, stops the stream there.
        let mut early_verdict = None;
        let mut buf = vec![0u8; CHUNK];
        loop {
            if let Some(v) = verdict.as_mut().and_then(|v| v.try_recv().ok()) {
                verdict = None;
                match v {
                    Err(why) => return refuse(layer, why),
                    Ok(()) => early_verdict = Some(Ok(())),
                }
            }
            // Reads of the blob fill `buf` (1 MiB) until its end.
            match std::io::Read::read(&mut layer, &mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    // The buffer itself goes out (no copy); the next read gets a new one.
                    let mut chunk = std::mem::replace(&mut buf, vec![0u8; CHUNK]);
                    chunk.truncate(n);
                    let m = DecryptLayerResponse {
                        data: chunk.into(),
                        trailer: None,
                    };
                    if out.blocking_send(Ok(m)).is_err() {
                        layer.abandon("the host stopped reading");
                        return;
                    }
                }
                Err(e) => {
                    let why = format!("reading the stored blob: {e}");
                    layer.abandon(&why);
                    let _ = out.blocking_send(Err(Status::internal(why)));
                    return;
                }
            }
        }
        let compared = match (early_verdict, verdict) {
            (Some(v), _) => Some(v),
            (None, Some(v)) => Some(
                v.blocking_recv()
                    .unwrap_or_else(|_| Err("the comparison with the IPU's copy stopped".into())),
            ),
            (None, None) => None,
        };
        if let Some(Err(why)) = compared {
            return refuse(layer, why);
        }
        let _ = out.blocking_send(match layer.finish() {
            Ok(decrypted) => Ok(DecryptLayerResponse {
                data: Default::default(),
                trailer: Some(DecryptLayerTrailer {
                    size: decrypted.size,
                    digest: decrypted.digest,
                    media_type: decrypted.media_type,
                }),
            }),
            Err(e) => Err(status(e)),
        });
    });
    Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)))
}

#[tonic::async_trait]
impl ImageService for Api {
    async fn prepare(
        &self,
        req: Request<PrepareRequest>,
    ) -> Result<Response<PrepareResponse>, Status> {
        authorize(&req, self.host_agent_uid)?;
        let r = req.into_inner();
        let service = self.service.clone();
        let p = blocking(move || {
            let host = Some(r.host_identity.as_str()).filter(|h| !h.is_empty());
            let kind = match r.export_kind.as_str() {
                "" => None,
                k => Some(k.parse().map_err(super::ServiceError::BadRequest)?),
            };
            let placement = service.placement(&r.tenant, &r.function, &r.image, host, &r.grant)?;
            service.prepare_exported(&placement, &r.image, host, kind)
        })
        .await?;
        Ok(Response::new(PrepareResponse {
            export_kind: p.endpoint.kind().to_string(),
            clone_id: p.clone_id,
            socket: unix_socket(&p.endpoint),
            address: tcp_address(&p.endpoint),
            export_name: p.export_name,
            size: p.size,
            manifest_digest: p.manifest_digest,
            runtime_config_json: p.runtime_config.map(|c| c.to_string()).unwrap_or_default(),
            ttl_secs: p.ttl.as_secs(),
        }))
    }

    async fn teardown(
        &self,
        req: Request<TeardownRequest>,
    ) -> Result<Response<TeardownResponse>, Status> {
        authorize(&req, self.host_agent_uid)?;
        let req = req.into_inner();
        let (id, forced) = (req.clone_id, req.forced_removal);
        let service = self.service.clone();
        let erased = blocking(move || {
            if forced {
                service.teardown_forced(&id)
            } else {
                service.teardown(&id, "requested by the host agent")
            }
        })
        .await?;
        Ok(Response::new(TeardownResponse { erased }))
    }

    async fn list(&self, req: Request<ListRequest>) -> Result<Response<ListResponse>, Status> {
        authorize(&req, self.host_agent_uid)?;
        let clones = self
            .service
            .list()
            .into_iter()
            .map(|c| CloneInfo {
                clone_id: c.clone_id,
                tenant: c.tenant,
                function: c.function,
                image: c.image,
                socket: unix_socket(&c.endpoint),
                address: tcp_address(&c.endpoint),
                age_secs: c.age.as_secs(),
            })
            .collect();
        Ok(Response::new(ListResponse { clones }))
    }

    type DecryptLayerStream = PlaintextStream;

    async fn verify(
        &self,
        req: Request<VerifyRequest>,
    ) -> Result<Response<VerifyResponse>, Status> {
        authorize(&req, self.host_agent_uid)?;
        let r = req.into_inner();
        let service = self.service.clone();
        let (manifest_digest, layers) = blocking(move || {
            let placement = service.placement(&r.tenant, &r.function, &r.image, None, &r.grant)?;
            service.verify_placed(&placement, &r.image)
        })
        .await?;
        Ok(Response::new(VerifyResponse {
            manifest_digest,
            layers,
        }))
    }

    async fn decrypt_layer(
        &self,
        req: Request<Streaming<DecryptLayerRequest>>,
    ) -> Result<Response<Self::DecryptLayerStream>, Status> {
        authorize(&req, self.host_agent_uid)?;
        let permit = self
            .decrypt_streams
            .clone()
            .try_acquire_owned()
            .map_err(|_| {
                tracing::warn!("DecryptLayer refused: {MAX_DECRYPT_STREAMS} streams already open");
                Status::resource_exhausted(format!(
                    "{MAX_DECRYPT_STREAMS} layers are being decrypted already; retry when one ends"
                ))
            })?;
        let mut inbound = req.into_inner();
        let first = inbound
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("an empty DecryptLayer stream"))?;
        let header = first.header.ok_or_else(|| {
            Status::invalid_argument("the first DecryptLayer message must carry the header")
        })?;
        let spool = spool_for(&self.service);
        // A blob recognised from its start (the payload's digest, or its first bytes) has its
        // key released now and its HMAC computed while it arrives.
        let mut early = {
            let service = self.service.clone();
            let (tenant, function, media_type) = (
                header.tenant.clone(),
                header.function.clone(),
                header.media_type.clone(),
            );
            let payload_digest =
                serde_json::from_str::<serde_json::Value>(&header.payload_descriptor_json)
                    .ok()
                    .and_then(|d| d["digest"].as_str().map(str::to_string));
            let start = first.data[..first.data.len().min(BLOB_PREFIX_LEN)].to_vec();
            tokio::task::spawn_blocking(move || {
                service.recognise(
                    &tenant,
                    &function,
                    &media_type,
                    payload_digest.as_deref(),
                    &start,
                )
            })
            .await
            .map_err(|e| Status::internal(e.to_string()))?
        };
        // The IPU's own copy of the layer the blob's start named, fetched and authenticated
        // after Verify: the plaintext starts now, and the host's blob is compared with it.
        let prefetches = self.service.prefetches().clone();
        let named = early.as_ref().map(EarlyLayer::layer_digest);
        if let Some(layer) = named.filter(|_| prefetches.enabled()) {
            let (tenant, function) = (header.tenant.clone(), header.function.clone());
            let held = tokio::task::spawn_blocking(move || {
                prefetches.take(&tenant, &function, &layer, PREFETCH_WAIT)
            })
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
            if let Some(held) = held {
                let early = early.take().expect("it named the layer");
                return self
                    .decrypt_held(header, first.data, inbound, early, held, permit)
                    .await;
            }
        }
        // The blob held (in memory, or spilled), hashed (and authenticated, if recognised) on
        // the way.
        let verifier = early.as_mut().and_then(EarlyLayer::take_verifier);
        let (stored, digest, size, proof) =
            receive_blob(first.data, &mut inbound, spool, verifier).await?;
        // Which layer the blob is: its digest, or the layer its start named if the HMAC over
        // all of it matched that one's. Otherwise (the start misled) it is hashed now, from
        // where it is held.
        let digest = match digest {
            Some(digest) => digest,
            None => match early
                .as_ref()
                .zip(proof.as_ref())
                .and_then(|(e, p)| e.identified_by_hmac(p))
            {
                Some(digest) => digest,
                None => {
                    let blob = stored.clone();
                    blocking(move || hash_stored(&blob)).await?
                }
            },
        };
        if let (Some(early), Some(proof)) = (early.as_mut(), proof) {
            early.authenticated(proof);
        }
        let service = self.service.clone();
        let blob = stored.clone();
        let layer = blocking(move || {
            let payload = (!header.payload_descriptor_json.is_empty())
                .then_some(header.payload_descriptor_json.as_str());
            service.open_layer(
                &header.tenant,
                &header.function,
                &crate::service::decrypt::ReceivedBlob {
                    blob: &blob,
                    digest: &digest,
                    size,
                    media_type: &header.media_type,
                    payload_descriptor: payload,
                },
                early,
            )
        })
        .await?;
        // Authenticated: the plaintext goes out as it is decrypted, then the trailer the hook
        // waits for, sent only once the length and plaintext digest are checked.
        Ok(send_plaintext(layer, (stored, permit), None))
    }

    type WatchEventsStream =
        std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<CloneEvent, Status>> + Send>>;

    async fn watch_events(
        &self,
        req: Request<WatchRequest>,
    ) -> Result<Response<Self::WatchEventsStream>, Status> {
        authorize(&req, self.host_agent_uid)?;
        let mut rx = self.service.subscribe();
        let mut stopping = self.service.stopping();
        let (tx, out) = tokio::sync::mpsc::channel(64);
        tokio::spawn(async move {
            loop {
                let next = tokio::select! {
                    next = rx.recv() => next,
                    _ = stopping.wait_for(|s| *s) => break,
                };
                match next {
                    Ok(e) => {
                        let event = CloneEvent {
                            kind: e.kind.to_string(),
                            clone_id: e.clone_id,
                            socket: unix_socket(&e.endpoint),
                            address: tcp_address(&e.endpoint),
                            reason: e.reason,
                        };
                        if tx.send(Ok(event)).await.is_err() {
                            break;
                        }
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        let _ = tx
                            .send(Err(Status::data_loss(format!("{n} events were missed"))))
                            .await;
                        break;
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(out),
        )))
    }
}

/// Serves the API on `listener` until `shutdown` resolves.
fn api(service: Arc<Service>, host_agent_uid: u32) -> ImageServiceServer<Api> {
    ImageServiceServer::new(Api {
        service,
        host_agent_uid,
        decrypt_streams: Arc::new(tokio::sync::Semaphore::new(MAX_DECRYPT_STREAMS)),
    })
}

fn server() -> tonic::transport::Server {
    tonic::transport::Server::builder()
        .initial_stream_window_size(api::unix::STREAM_WINDOW)
        .initial_connection_window_size(api::unix::CONNECTION_WINDOW)
        .max_frame_size(api::unix::MAX_FRAME)
}

pub async fn serve(
    service: Arc<Service>,
    listener: tokio::net::UnixListener,
    host_agent_uid: u32,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    server()
        .add_service(api(service, host_agent_uid))
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::UnixListenerStream::new(listener),
            shutdown,
        )
        .await
}

/// [`serve`], with the gRPC health service ([`super::operations`]) on the same socket.
pub async fn serve_with_health<H: ops::health::Health>(
    service: Arc<Service>,
    listener: tokio::net::UnixListener,
    host_agent_uid: u32,
    health: ops::health::HealthServer<H>,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    server()
        .add_service(health)
        .add_service(api(service, host_agent_uid))
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::UnixListenerStream::new(listener),
            shutdown,
        )
        .await
}
