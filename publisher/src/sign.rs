//! cosign "simple signing" signatures stored at the `sha256-<hex>.sig` tag, as
//! `cosign sign --key` writes them (and as `policy` verifies them).

use std::collections::BTreeMap;

use base64::Engine as _;
use policy::reference::{Digest, ReferenceError};
use policy::sigstore::{sign_simple_signing, SimpleSigningPayload};
use zeroize::Zeroizing;

use crate::layout::{Descriptor, Layout, LayoutError, Manifest, OCI_CONFIG, OCI_MANIFEST};

/// Why an image could not be signed.
#[derive(Debug, thiserror::Error)]
pub enum SignError {
    #[error("{0} is not a sha256 digest")]
    NotADigest(String),
    #[error(transparent)]
    Digest(#[from] ReferenceError),
    #[error("signing key is not PEM: {0}")]
    NotPem(#[source] pem::PemError),
    #[error("signing key is a {0:?} PEM block; expected an unencrypted PKCS#8 \"PRIVATE KEY\" (ocipub keygen --kind ec-p256)")]
    NotPkcs8(String),
    #[error(transparent)]
    Signing(#[from] policy::sigstore::SignError),
    #[error(transparent)]
    Layout(#[from] LayoutError),
}

pub const SIMPLESIGNING: &str = "application/vnd.dev.cosign.simplesigning.v1+json";
pub const SIGNATURE_ANNOTATION: &str = "dev.cosignproject.cosign/signature";

/// The tag cosign stores the signatures of `manifest_digest` under.
pub fn signature_tag(manifest_digest: &str) -> Result<String, SignError> {
    let hex = manifest_digest
        .strip_prefix("sha256:")
        .ok_or_else(|| SignError::NotADigest(manifest_digest.to_string()))?;
    Ok(format!("sha256-{hex}.sig"))
}

/// Signs the manifest tagged `tag` for `identity` (the repository the signature claims, e.g.
/// `registry.example/team/app`) with an ECDSA P-256 PKCS#8 PEM key. Signatures accumulate:
/// signing again adds a layer to the signature manifest.
pub fn sign(
    layout: &Layout,
    tag: &str,
    key_pem: &[u8],
    identity: &str,
) -> Result<Descriptor, SignError> {
    let (desc, _) = layout.manifest(tag)?;
    let digest = Digest::parse(&desc.digest)?;
    let payload = SimpleSigningPayload {
        docker_reference: identity.to_string(),
        docker_manifest_digest: digest,
        optional: None,
    }
    .to_cosign_json();

    let key = pem::parse(key_pem).map_err(SignError::NotPem)?;
    if key.tag() != "PRIVATE KEY" {
        return Err(SignError::NotPkcs8(key.tag().to_string()));
    }
    let der = Zeroizing::new(key.into_contents());
    let signature = sign_simple_signing(&payload, &der)?;

    let sig_tag = signature_tag(&desc.digest)?;
    let mut layers = match layout.tagged(&sig_tag)? {
        Some(_) => layout.manifest(&sig_tag)?.1.layers,
        None => Vec::new(),
    };
    let mut layer = layout.put_blob(SIMPLESIGNING, &payload)?;
    layer.annotations = BTreeMap::from([(
        SIGNATURE_ANNOTATION.to_string(),
        base64::engine::general_purpose::STANDARD.encode(&signature),
    )]);
    layers.push(layer);

    // cosign's signature image config: one diff_id per payload.
    let config = serde_json::json!({
        "architecture": "",
        "created": "0001-01-01T00:00:00Z",
        "history": [{"created": "0001-01-01T00:00:00Z"}],
        "os": "",
        "rootfs": {
            "type": "layers",
            "diff_ids": layers.iter().map(|l| l.digest.clone()).collect::<Vec<_>>(),
        },
        "config": {},
    });
    let config = layout.put_blob(
        OCI_CONFIG,
        &serde_json::to_vec(&config).expect("a config serializes"),
    )?;
    Ok(layout.put_manifest(
        &sig_tag,
        &Manifest {
            schema_version: 2,
            media_type: OCI_MANIFEST.into(),
            config,
            layers,
            annotations: Default::default(),
        },
    )?)
}
