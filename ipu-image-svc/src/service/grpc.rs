//! The service's gRPC API on a Unix socket. Callers are identified by their kernel-reported
//! uid: the host agent's uid and root may call it, nobody else.

use std::sync::Arc;

use api::imagesvc::image_service_server::{ImageService, ImageServiceServer};
use api::imagesvc::{
    CloneEvent, CloneInfo, DecryptLayerRequest, DecryptLayerResponse, DecryptLayerTrailer,
    ListRequest, ListResponse, PrepareRequest, PrepareResponse, TeardownRequest, TeardownResponse,
    VerifyResponse, WatchRequest,
};
use tonic::{Request, Response, Status, Streaming};

use super::Service;
use crate::pipeline::PipelineError;

pub struct Api {
    service: Arc<Service>,
    host_agent_uid: u32,
}

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

fn status(e: PipelineError) -> Status {
    if e.class.is_rejection() {
        Status::permission_denied(format!("rejected ({}): {}", e.class.as_str(), e.message))
    } else {
        Status::failed_precondition(format!("{}: {}", e.class.as_str(), e.message))
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, PipelineError> + Send + 'static,
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

/// A DecryptLayer request's files on the IPU: deleted when dropped, whatever happened.
struct Spool {
    blob: std::path::PathBuf,
    plain: std::path::PathBuf,
}

impl Spool {
    fn new(dir: std::path::PathBuf) -> Self {
        let mut id = [0u8; 8];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut id)
            .expect("system randomness");
        let id = hex::encode(id);
        Self {
            blob: dir.join(format!("decrypt-{id}.blob")),
            plain: dir.join(format!("decrypt-{id}.plain")),
        }
    }
}

impl Drop for Spool {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.blob);
        let _ = std::fs::remove_file(&self.plain);
    }
}

/// The endpoint's Unix socket path, or "".
fn unix_socket(e: &crate::export::Endpoint) -> String {
    match e {
        crate::export::Endpoint::Unix(p) => p.display().to_string(),
        crate::export::Endpoint::Tcp(_) => String::new(),
    }
}

/// The endpoint's TCP address, or "".
fn tcp_address(e: &crate::export::Endpoint) -> String {
    match e {
        crate::export::Endpoint::Unix(_) => String::new(),
        crate::export::Endpoint::Tcp(a) => a.to_string(),
    }
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
        let p = blocking(move || service.prepare(&r.tenant, &r.function, &r.image)).await?;
        Ok(Response::new(PrepareResponse {
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
        let id = req.into_inner().clone_id;
        let service = self.service.clone();
        let erased = blocking(move || service.teardown(&id, "requested by the host agent")).await?;
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

    type DecryptLayerStream = std::pin::Pin<
        Box<dyn tokio_stream::Stream<Item = Result<DecryptLayerResponse, Status>> + Send>,
    >;

    async fn verify(
        &self,
        req: Request<PrepareRequest>,
    ) -> Result<Response<VerifyResponse>, Status> {
        authorize(&req, self.host_agent_uid)?;
        let r = req.into_inner();
        let service = self.service.clone();
        let (manifest_digest, layers) =
            blocking(move || service.verify(&r.tenant, &r.function, &r.image)).await?;
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
        let mut inbound = req.into_inner();
        let first = inbound
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("an empty DecryptLayer stream"))?;
        let header = first.header.ok_or_else(|| {
            Status::invalid_argument("the first DecryptLayer message must carry the header")
        })?;
        let spool = Spool::new(self.service.spool_dir());
        // The blob to the IPU's disk, hashed on the way.
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(8);
        let blob_path = spool.blob.clone();
        let writer = tokio::task::spawn_blocking(move || -> std::io::Result<(String, u64)> {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&blob_path)?;
            let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
            let mut size = 0u64;
            while let Some(chunk) = rx.blocking_recv() {
                ctx.update(&chunk);
                f.write_all(&chunk)?;
                size += chunk.len() as u64;
            }
            Ok((format!("sha256:{}", hex::encode(ctx.finish())), size))
        });
        let mut received = first.data.len() as u64;
        let _ = tx.send(first.data).await;
        let mut failed = None;
        loop {
            match inbound.message().await {
                Ok(Some(m)) => {
                    received += m.data.len() as u64;
                    if received > MAX_BLOB {
                        failed = Some(Status::resource_exhausted(format!(
                            "a layer blob over {MAX_BLOB} bytes"
                        )));
                        break;
                    }
                    if tx.send(m.data).await.is_err() {
                        break;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    failed = Some(e);
                    break;
                }
            }
        }
        drop(tx);
        // The writer is done with the file before anything returns (the spool then deletes
        // it, whatever happened).
        let written = writer.await;
        if let Some(e) = failed {
            return Err(e);
        }
        let (digest, size) = written
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(|e| Status::internal(format!("spooling the blob: {e}")))?;
        let service = self.service.clone();
        let (blob, plain) = (spool.blob.clone(), spool.plain.clone());
        let decrypted = blocking(move || {
            let media_type = header.media_type.clone();
            let payload = (!header.payload_descriptor_json.is_empty())
                .then_some(header.payload_descriptor_json.as_str());
            service.decrypt_layer(
                &header.tenant,
                &header.function,
                &crate::service::decrypt::ReceivedBlob {
                    path: &blob,
                    digest: &digest,
                    size,
                    media_type: &media_type,
                    payload_descriptor: payload,
                },
                &plain,
            )
        })
        .await?;
        // Verified: the plaintext goes out, then the trailer the hook checks.
        let (out, rx) = tokio::sync::mpsc::channel(4);
        tokio::task::spawn_blocking(move || {
            use std::io::Read;
            let file = std::fs::File::open(&spool.plain);
            // Unlinked at once: only this reader still sees it.
            drop(spool);
            let mut file = match file {
                Ok(f) => f,
                Err(e) => {
                    let _ = out.blocking_send(Err(Status::internal(e.to_string())));
                    return;
                }
            };
            let mut buf = vec![0u8; CHUNK];
            loop {
                match file.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        let m = DecryptLayerResponse {
                            data: buf[..n].to_vec(),
                            trailer: None,
                        };
                        if out.blocking_send(Ok(m)).is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        let _ = out.blocking_send(Err(Status::internal(e.to_string())));
                        return;
                    }
                }
            }
            let _ = out.blocking_send(Ok(DecryptLayerResponse {
                data: Vec::new(),
                trailer: Some(DecryptLayerTrailer {
                    size: decrypted.size,
                    digest: decrypted.digest,
                    media_type: decrypted.media_type,
                }),
            }));
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
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
pub async fn serve(
    service: Arc<Service>,
    listener: tokio::net::UnixListener,
    host_agent_uid: u32,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), tonic::transport::Error> {
    tonic::transport::Server::builder()
        .add_service(ImageServiceServer::new(Api {
            service,
            host_agent_uid,
        }))
        .serve_with_incoming_shutdown(
            tokio_stream::wrappers::UnixListenerStream::new(listener),
            shutdown,
        )
        .await
}
