//! Where ipu-image-svc's API is, and whom requests are for: what `host-attach run`,
//! `host-attach verify` and `ipu-decrypt-hook` all take on their command lines; and how a
//! call to the API failed.

use std::path::PathBuf;

use api::imagesvc::image_service_client::ImageServiceClient;
use tonic::transport::Channel;

#[derive(clap::Args, Clone, Debug)]
pub struct IpuApi {
    /// ipu-image-svc's API socket.
    #[arg(
        long,
        value_name = "SOCKET",
        default_value = "/run/ipu-image-svc/api.sock"
    )]
    pub api: PathBuf,
    /// The tenant and function requests are made for (the deployment policy and the key
    /// broker decide for them).
    #[arg(long)]
    pub tenant: String,
    #[arg(long)]
    pub function: String,
    /// The control plane's placement grant for this request (`policy grant issue`), passed
    /// to the IPU as it is; `-` reads it from standard input. Required by IPUs whose policy
    /// names grant keys: the tenant and function are then the grant's.
    #[arg(long, value_name = "FILE")]
    pub grant: Option<PathBuf>,
}

/// A client of ipu-image-svc's API.
pub type Client = ImageServiceClient<Channel>;

/// Reaching ipu-image-svc, or a call it refused or failed (with the IPU's own words). The
/// statuses are boxed: a `tonic::Status` is large, and this error travels up every seam.
#[derive(Debug, thiserror::Error)]
pub enum IpuError {
    /// The runtime for this process's calls could not be made.
    #[error(transparent)]
    Runtime(std::io::Error),
    #[error("cannot reach ipu-image-svc at {}: {source}", api.display())]
    Connect {
        api: PathBuf,
        source: tonic::transport::Error,
    },
    #[error("Prepare: {}", .0.message())]
    Prepare(Box<tonic::Status>),
    #[error("Verify: {}", .0.message())]
    Verify(Box<tonic::Status>),
    #[error("Teardown of {clone_id}: {}", status.message())]
    Teardown {
        clone_id: String,
        status: Box<tonic::Status>,
    },
    /// DecryptLayer's status is shown as the IPU words it: containerd shows it as the
    /// hook's failure.
    #[error("{}", .0.message())]
    DecryptLayer(Box<tonic::Status>),
    #[error("placement grant {}: {source}", path.display())]
    Grant {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The most a grant file may hold (a grant is well under 4 KiB).
const MAX_GRANT_BYTES: u64 = 64 * 1024;

impl IpuApi {
    /// The grant to send (empty without `--grant`), read from its file or standard input.
    pub fn grant_text(&self) -> Result<String, IpuError> {
        let Some(path) = &self.grant else {
            return Ok(String::new());
        };
        let error = |source| IpuError::Grant {
            path: path.clone(),
            source,
        };
        let mut text = String::new();
        let read = if path.as_os_str() == "-" {
            std::io::Read::read_to_string(
                &mut std::io::Read::take(std::io::stdin().lock(), MAX_GRANT_BYTES + 1),
                &mut text,
            )
        } else {
            std::fs::File::open(path).and_then(|f| {
                std::io::Read::read_to_string(
                    &mut std::io::Read::take(f, MAX_GRANT_BYTES + 1),
                    &mut text,
                )
            })
        };
        read.map_err(error)?;
        if text.len() as u64 > MAX_GRANT_BYTES {
            return Err(error(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("larger than {MAX_GRANT_BYTES} bytes: not a placement grant"),
            )));
        }
        Ok(text.trim().to_string())
    }

    /// A client of the API.
    pub async fn connect(&self) -> Result<Client, IpuError> {
        let channel = api::unix::connect(self.api.clone())
            .await
            .map_err(|source| IpuError::Connect {
                api: self.api.clone(),
                source,
            })?;
        Ok(ImageServiceClient::new(channel))
    }

    /// A runtime for this process's few calls, and a client of the API.
    pub fn connect_blocking(&self) -> Result<(tokio::runtime::Runtime, Client), IpuError> {
        let rt = runtime()?;
        let client = rt.block_on(self.connect())?;
        Ok((rt, client))
    }
}

/// A runtime on this thread.
pub fn runtime() -> Result<tokio::runtime::Runtime, IpuError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(IpuError::Runtime)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rpc_failures_name_the_call_and_decrypt_layer_only_the_ipus_words() {
        let status = || tonic::Status::permission_denied("tenant \"x\" may not");
        assert_eq!(
            IpuError::Prepare(status().into()).to_string(),
            "Prepare: tenant \"x\" may not"
        );
        assert_eq!(
            IpuError::Verify(status().into()).to_string(),
            "Verify: tenant \"x\" may not"
        );
        assert_eq!(
            IpuError::Teardown {
                clone_id: "c1".into(),
                status: status().into()
            }
            .to_string(),
            "Teardown of c1: tenant \"x\" may not"
        );
        assert_eq!(
            IpuError::DecryptLayer(status().into()).to_string(),
            "tenant \"x\" may not"
        );
    }

    #[test]
    fn an_unreachable_api_says_where() {
        let ipu = IpuApi {
            api: PathBuf::from("/nonexistent/api.sock"),
            tenant: "t".into(),
            function: "f".into(),
            grant: None,
        };
        let e = ipu.connect_blocking().err().unwrap().to_string();
        assert!(
            e.starts_with("cannot reach ipu-image-svc at /nonexistent/api.sock: "),
            "{e}"
        );
    }
}
