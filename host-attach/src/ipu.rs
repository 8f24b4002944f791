//! Where ipu-image-svc's API is, and whom requests are for: what `host-attach run`,
//! `host-attach verify` and `ipu-decrypt-hook` all take on their command lines.

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
}

impl IpuApi {
    /// A client of the API.
    pub async fn connect(&self) -> Result<ImageServiceClient<Channel>, String> {
        let channel = api::unix::connect(self.api.clone())
            .await
            .map_err(|e| format!("cannot reach ipu-image-svc at {}: {e}", self.api.display()))?;
        Ok(ImageServiceClient::new(channel))
    }
}
