//! Layer decryption for containerd's decrypt hook: the host hands the IPU an encrypted blob
//! and gets the plaintext back, never a key.
//!
//! The IPU decrypts only layers of images it has verified for the asking tenant and function
//! (`verify`, or a Prepare), because only those tell which image a blob belongs to, and so let
//! the deployment policy and the broker decide. A stream processor payload, when containerd
//! passes one, is checked against the blob; it cannot stand in for a verified image, since the
//! host could claim any image in it.

use std::fs::File;
use std::io::{BufReader, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use audit::{Event, EventKind, Outcome};
use policy::reference::ImageReference;

use super::{check_name, Service};
use crate::fetch::Descriptor;
use crate::pipeline::{
    FailureClass, Goal, LayerKeyRequest, PipelineError, Quiet, Report, TrustPipeline, AUDIT_SERVICE,
};

/// A layer of an image verified for a tenant and function.
#[derive(Clone, Debug)]
pub(crate) struct KnownLayer {
    pub tenant: String,
    pub function: String,
    pub image: String,
    pub image_digest: String,
    pub descriptor: Descriptor,
    /// The verified config's diff_id for this layer.
    pub diff_id: Option<String>,
}

/// What a decryption produced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DecryptedLayer {
    pub size: u64,
    /// `sha256:<hex>` of the plaintext, verified against the layer's private options.
    pub digest: String,
    /// The plain media type (the encrypted one without `+encrypted`).
    pub media_type: String,
}

/// The blob as received from the host.
pub struct ReceivedBlob<'a> {
    pub path: &'a Path,
    /// `sha256:<hex>`, computed while it was received.
    pub digest: &'a str,
    pub size: u64,
    /// STREAM_PROCESSOR_MEDIATYPE.
    pub media_type: &'a str,
    /// The stream processor payload's descriptor (JSON), if containerd passed one.
    pub payload_descriptor: Option<&'a str>,
}

fn refused(message: String) -> PipelineError {
    PipelineError::new(FailureClass::RejectedByPolicy, message)
}

impl Service {
    /// Records the layers of an image the pipeline accepted for `tenant` and `function`.
    pub(crate) fn remember_layers(&self, tenant: &str, function: &str, report: &Report) {
        let Some(digest) = report.manifest_digest.as_ref() else {
            return;
        };
        let mut known = self.known_layers.lock().expect("not poisoned");
        for (i, d) in report.layer_descriptors.iter().enumerate() {
            let layer = KnownLayer {
                diff_id: report.layer_diff_ids.get(i).map(|d| d.to_string()),
                tenant: tenant.into(),
                function: function.into(),
                image: report.image.clone(),
                image_digest: digest.to_string(),
                descriptor: d.clone(),
            };
            let entries = known.entry(d.digest.to_string()).or_default();
            entries.retain(|k| !(k.tenant == tenant && k.function == function));
            entries.push(layer);
        }
    }

    /// Verifies `image` for `tenant` and `function` (policy, signature, every layer key
    /// released for this request) and remembers its layers. Returns the manifest digest and
    /// the layers' blob digests.
    pub fn verify(
        &self,
        tenant: &str,
        function: &str,
        image: &str,
    ) -> Result<(String, Vec<String>), PipelineError> {
        check_name("tenant", tenant)?;
        check_name("function", function)?;
        let reference = ImageReference::parse(image).map_err(|e| {
            PipelineError::new(
                FailureClass::InvalidConfiguration,
                format!("image reference {image:?}: {e}"),
            )
        })?;
        let pipeline = TrustPipeline::new((self.factory)(tenant, function)?);
        let mut report = Report::default();
        pipeline.run(&reference, &Goal::VerifyKeys, &Quiet, &mut report)?;
        self.remember_layers(tenant, function, &report);
        let digest = report
            .manifest_digest
            .as_ref()
            .map(|d| d.to_string())
            .unwrap_or_default();
        let layers = report
            .layer_descriptors
            .iter()
            .map(|d| d.digest.to_string())
            .collect();
        Ok((digest, layers))
    }

    /// Decrypts a received blob into `plaintext` (created, mode 0600) for `tenant` and
    /// `function`: the blob must be a layer of an image verified for them, match its
    /// descriptor (and the payload's, if any), and its key is released by the key source for
    /// this request. The HMAC and the plaintext digest are verified before this returns;
    /// on any failure `plaintext` is removed. Audited either way.
    pub fn decrypt_layer(
        &self,
        tenant: &str,
        function: &str,
        blob: &ReceivedBlob<'_>,
        plaintext: &Path,
    ) -> Result<DecryptedLayer, PipelineError> {
        check_name("tenant", tenant)?;
        check_name("function", function)?;
        let known = self
            .known_layers
            .lock()
            .expect("not poisoned")
            .get(blob.digest)
            .and_then(|all| {
                all.iter()
                    .find(|k| k.tenant == tenant && k.function == function)
                    .cloned()
            });
        let result = match &known {
            None => Err(refused(match blob.payload_descriptor {
                None => format!(
                    "layer {} is in no image this IPU verified for tenant {tenant:?}, function {function:?}, and containerd passed no stream processor payload: verify the image first (ImageService.Verify, `host-attach verify`), then pull",
                    blob.digest
                ),
                Some(_) => format!(
                    "layer {} is in no image this IPU verified for tenant {tenant:?}, function {function:?}; a payload does not say which image a layer belongs to, so the policy cannot decide: verify the image first (ImageService.Verify, `host-attach verify`)",
                    blob.digest
                ),
            })),
            Some(k) => self.decrypt_known(tenant, function, k, blob, plaintext),
        };
        let mut event = Event::new(
            AUDIT_SERVICE,
            EventKind::LayerDecrypt,
            match &result {
                Ok(_) => Outcome::Success,
                Err(e) if e.class.is_rejection() => Outcome::Denied,
                Err(_) => Outcome::Failure,
            },
            match &result {
                Ok(_) => "layer decrypted for containerd's decrypt hook; HMAC and plaintext digest verified; plaintext sent to the host".to_string(),
                Err(e) => e.message.clone(),
            },
        )
        .tenant(tenant.to_string())
        .function(function.to_string())
        .detail("layer_digest", blob.digest.to_string())
        .detail("via", "decrypt-hook".to_string());
        if let Some(k) = &known {
            event = event.image(k.image.clone(), Some(k.image_digest.clone()));
        }
        if result.is_err() {
            let _ = std::fs::remove_file(plaintext);
        }
        self.record(event)?;
        result
    }

    /// `sha256:<hex>` of the decompressed plaintext at `path`.
    fn plaintext_diff_id(&self, path: &Path, media_type: &str) -> Result<String, PipelineError> {
        let io = |e: std::io::Error| {
            PipelineError::new(FailureClass::Io, format!("hashing the plaintext: {e}"))
        };
        let compression = crate::unpack::Compression::from_media_type(media_type)
            .map_err(|e| refused(e.to_string()))?;
        let file = BufReader::new(File::open(path).map_err(io)?);
        let mut decoder = compression.decoder(file).map_err(io)?;
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let n = std::io::Read::read(&mut decoder, &mut buf).map_err(io)?;
            if n == 0 {
                break;
            }
            ctx.update(&buf[..n]);
        }
        Ok(format!("sha256:{}", hex::encode(ctx.finish())))
    }

    fn decrypt_known(
        &self,
        tenant: &str,
        function: &str,
        known: &KnownLayer,
        blob: &ReceivedBlob<'_>,
        plaintext: &Path,
    ) -> Result<DecryptedLayer, PipelineError> {
        let d = &known.descriptor;
        if d.size != blob.size || d.media_type != blob.media_type {
            return Err(refused(format!(
                "the blob ({} bytes, {}) does not match layer {} of {} ({} bytes, {})",
                blob.size, blob.media_type, d.digest, known.image, d.size, d.media_type
            )));
        }
        if let Some(json) = blob.payload_descriptor {
            let payload: serde_json::Value = serde_json::from_str(json)
                .map_err(|e| refused(format!("the stream processor payload's descriptor: {e}")))?;
            if payload["digest"].as_str() != Some(blob.digest)
                || payload["size"].as_u64() != Some(blob.size)
            {
                return Err(refused(format!(
                    "the stream processor payload names {} ({} bytes), not the blob received ({}, {} bytes)",
                    payload["digest"], payload["size"], blob.digest, blob.size
                )));
            }
        }
        let media_type = ocicrypt::decrypted_media_type(&d.media_type)
            .ok_or_else(|| refused(format!("{} is not an encrypted layer type", d.media_type)))?
            .to_string();
        let cfg = (self.factory)(tenant, function)?;
        let io = |what: &str, e: std::io::Error| {
            PipelineError::new(FailureClass::Io, format!("{what}: {e}"))
        };
        let integrity = |e: ocicrypt::Error| {
            PipelineError::new(
                crate::pipeline::ocicrypt_class(&e),
                format!("layer {}: {e}", d.digest),
            )
        };
        let reader = BufReader::with_capacity(
            256 * 1024,
            File::open(blob.path).map_err(|e| io("the received blob", e))?,
        );
        let mut decryptor = match &cfg.layer_keys {
            Some(source) => {
                let layer_digest = d.digest.to_string();
                let secret = source
                    .private_options(&LayerKeyRequest {
                        image: &known.image,
                        image_digest: &known.image_digest,
                        layer_digest: &layer_digest,
                        annotations: &d.annotations,
                        tenant,
                        function,
                    })
                    .map_err(|e| {
                        PipelineError::new(
                            FailureClass::NoDecryptionKey,
                            format!("layer {}: key broker: {e}", d.digest),
                        )
                    })?;
                let privopts = ocicrypt::PrivateLayerOptions::from_json(secret.as_slice())
                    .map_err(integrity)?;
                let pubopts = ocicrypt::PublicLayerOptions::from_annotations(&d.annotations)
                    .map_err(integrity)?;
                ocicrypt::LayerDecryptor::with_options(reader, &pubopts, &privopts)
                    .map_err(integrity)?
            }
            None => ocicrypt::decrypt_layer(reader, &d.annotations, &cfg.decryption)
                .map_err(integrity)?,
        };
        let mut out = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(plaintext)
            .map_err(|e| io("the plaintext spool", e))?;
        let size = std::io::copy(&mut decryptor, &mut out).map_err(|e| io("decrypting", e))?;
        out.flush().map_err(|e| io("the plaintext spool", e))?;
        // Every byte was read: the HMAC over the ciphertext and the plaintext digest from the
        // private options must both match, or nothing is sent.
        let (authenticated, stale) = decryptor
            .finish_allowing_stale_digest()
            .map_err(integrity)?;
        if let Some(stale) = stale {
            // A publisher that recompressed the layer left the old digest in the private
            // options (as skopeo does with zstd). The signed config's diff_id can still vouch
            // for the content: the decompressed plaintext must hash to it.
            let diff_id = self.plaintext_diff_id(plaintext, &media_type)?;
            if known.diff_id.as_deref() != Some(diff_id.as_str()) {
                return Err(PipelineError::new(
                    FailureClass::DigestMismatch,
                    format!(
                        "layer {}: decrypted digest {} does not match {} from the private options, and its diff_id {diff_id} is not the verified config's",
                        d.digest,
                        authenticated.plaintext_digest(),
                        stale.declared
                    ),
                ));
            }
            tracing::warn!(layer = %d.digest, declared = %stale.declared, "stale digest in the private options; the signed diff_id vouches for the content");
        }
        Ok(DecryptedLayer {
            size,
            digest: authenticated.plaintext_digest().to_string(),
            media_type,
        })
    }
}
