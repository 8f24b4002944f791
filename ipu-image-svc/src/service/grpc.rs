//! The service's gRPC API on a Unix socket. Callers are identified by their kernel-reported
//! uid: the host agent's uid and root may call it, nobody else.

use std::sync::Arc;

use api::imagesvc::image_service_server::{ImageService, ImageServiceServer};
use api::imagesvc::{
    CloneEvent, CloneInfo, ListRequest, ListResponse, PrepareRequest, PrepareResponse,
    TeardownRequest, TeardownResponse, WatchRequest,
};
use tonic::{Request, Response, Status};

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
