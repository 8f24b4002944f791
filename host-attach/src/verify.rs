//! `host-attach verify`: the IPU verifies an image for a tenant and function (policy,
//! signature, layer keys released), so that containerd's decrypt hook ([`crate::hook`]) may
//! then have its layers decrypted.

use api::imagesvc::VerifyRequest;

use crate::ipu::{IpuApi, IpuError};

/// A verified image: its manifest digest and layers, as `verify` prints them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Verified {
    pub image: String,
    pub manifest_digest: String,
    pub layers: Vec<String>,
}

impl std::fmt::Display for Verified {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "verified {} {}", self.image, self.manifest_digest)?;
        for layer in &self.layers {
            writeln!(f, "  layer {layer}")?;
        }
        Ok(())
    }
}

/// Has the IPU at `ipu` verify `image`.
pub fn verify(ipu: &IpuApi, image: &str) -> Result<Verified, IpuError> {
    let grant = ipu.grant_text()?;
    let (rt, mut client) = ipu.connect_blocking()?;
    let verified = rt
        .block_on(client.verify(VerifyRequest {
            tenant: ipu.tenant.clone(),
            function: ipu.function.clone(),
            image: image.to_string(),
            grant,
        }))
        .map_err(|status| IpuError::Verify(status.into()))?
        .into_inner();
    Ok(Verified {
        image: image.to_string(),
        manifest_digest: verified.manifest_digest,
        layers: verified.layers,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_report_names_the_image_its_digest_and_each_layer() {
        let v = Verified {
            image: "oci:/l:enc".into(),
            manifest_digest: "sha256:aa".into(),
            layers: vec!["sha256:bb".into(), "sha256:cc".into()],
        };
        assert_eq!(
            v.to_string(),
            "verified oci:/l:enc sha256:aa\n  layer sha256:bb\n  layer sha256:cc\n"
        );
    }
}
