//! gRPC definitions shared by the services and their clients (generated from `proto/`).

/// The audit log's writer and query services.
pub mod audit {
    tonic::include_proto!("ipu.audit.v1");
}

/// The key broker: attestation and key release.
pub mod keybroker {
    tonic::include_proto!("ipu.keybroker.v1");
}

/// ipu-image-svc's API for the host agent: prepare, tear down, list, watch clones.
pub mod imagesvc {
    tonic::include_proto!("ipu.imagesvc.v1");
}

/// The ocicrypt key provider protocol (JSON in a bytes field), as Go ocicrypt speaks it.
pub mod keyprovider {
    tonic::include_proto!("keyprovider");
}

/// containerd's diff service (Apply with stream processor payloads), for tests that drive
/// containerd the way imgcrypt-aware clients do.
pub mod containerd_diff {
    tonic::include_proto!("containerd.services.diff.v1");
}

/// Clients of the services that listen on Unix sockets.
pub mod unix {
    use std::path::PathBuf;

    use tonic::transport::{Channel, Endpoint, Uri};

    /// HTTP/2 flow-control windows for the local API. Layers stream through it in 1 MiB
    /// messages; with h2's default 64 KiB stream window every message would wait for several
    /// window updates. Over a local socket a window costs only memory.
    pub const STREAM_WINDOW: u32 = 8 << 20;
    pub const CONNECTION_WINDOW: u32 = 16 << 20;
    /// Largest HTTP/2 frame the server accepts (the client's default is h2's 16 KiB).
    pub const MAX_FRAME: u32 = 1 << 20;

    /// A gRPC channel to a Unix socket.
    pub async fn connect(socket: PathBuf) -> Result<Channel, tonic::transport::Error> {
        // The URI is a placeholder: the connector dials the socket.
        Endpoint::from_static("http://unix.local")
            .initial_stream_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .connect_with_connector(tower::service_fn(move |_: Uri| {
                let socket = socket.clone();
                async move {
                    Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                        tokio::net::UnixStream::connect(socket).await?,
                    ))
                }
            }))
            .await
    }
}
