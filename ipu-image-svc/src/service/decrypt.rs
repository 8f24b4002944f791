//! Layer decryption for containerd's decrypt hook: the host hands the IPU an encrypted blob
//! and gets the plaintext back, never a key.
//!
//! The IPU decrypts only layers of images it has verified for the asking tenant and function
//! (`verify`, or a Prepare), because only those tell which image a blob belongs to, and so let
//! the deployment policy and the broker decide. A stream processor payload, when containerd
//! passes one, is checked against the blob; it cannot stand in for a verified image, since the
//! host could claim any image in it.

use std::fs::File;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use audit::{AuditSink, Event, EventKind, Outcome};
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

    /// Opens a received blob for decryption for `tenant` and `function`: the blob must be a
    /// layer of an image verified for them and match its descriptor (and the payload's, if
    /// any); its key is released by the key source for this request, and its HMAC is checked
    /// over the whole stored blob before this returns. The returned stream yields plaintext
    /// that was authenticated, as it is decrypted.
    ///
    /// The release is recorded (`layer.decrypt`) before any plaintext can leave; a refusal is
    /// recorded and returned; a stream that later fails records that too (see [`LayerStream`]).
    pub fn open_layer(
        &self,
        tenant: &str,
        function: &str,
        blob: &ReceivedBlob<'_>,
    ) -> Result<LayerStream, PipelineError> {
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
        let record = LayerRecord {
            audit: self.audit.clone(),
            tenant: tenant.to_string(),
            function: function.to_string(),
            layer_digest: blob.digest.to_string(),
            image: known
                .as_ref()
                .map(|k| (k.image.clone(), k.image_digest.clone())),
        };
        let opened = match known {
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
            Some(k) => self.authenticate(tenant, function, k, blob),
        };
        match opened {
            Ok(opened) => {
                record.record(
                    Outcome::Success,
                    "layer HMAC verified on the IPU; plaintext released to containerd's decrypt hook as it is decrypted".into(),
                    None,
                )?;
                Ok(LayerStream {
                    opened: Some(opened),
                    record: Some(record),
                    sent: 0,
                })
            }
            Err(e) => {
                record.record(
                    if e.class.is_rejection() {
                        Outcome::Denied
                    } else {
                        Outcome::Failure
                    },
                    e.message.clone(),
                    None,
                )?;
                Err(e)
            }
        }
    }

    /// Everything up to the release: descriptor and payload checks, the key, the first pass.
    fn authenticate(
        &self,
        tenant: &str,
        function: &str,
        known: KnownLayer,
        blob: &ReceivedBlob<'_>,
    ) -> Result<Opened, PipelineError> {
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
        let layer_digest = d.digest.to_string();
        let integrity = |e: ocicrypt::Error| {
            PipelineError::new(
                crate::pipeline::ocicrypt_class(&e),
                format!("layer {layer_digest}: {e}"),
            )
        };
        let privopts = match &cfg.layer_keys {
            Some(source) => source
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
                        format!("layer {layer_digest}: key broker: {e}"),
                    )
                })
                .and_then(|secret| {
                    ocicrypt::PrivateLayerOptions::from_json(secret.as_slice()).map_err(integrity)
                })?,
            None => ocicrypt::unwrap_private_options(&d.annotations, &cfg.decryption)
                .map_err(integrity)?,
        };
        let pubopts =
            ocicrypt::PublicLayerOptions::from_annotations(&d.annotations).map_err(integrity)?;
        // First pass: the HMAC over the stored blob. Only this process writes the spool.
        let mut verifier =
            ocicrypt::CiphertextVerifier::new(&pubopts, &privopts).map_err(integrity)?;
        verifier
            .update_from(open_blob(blob.path)?)
            .map_err(|e| io("reading the received blob", e))?;
        let proof = verifier.verify().map_err(integrity)?;
        let decryptor = ocicrypt::VerifiedDecryptor::new(open_blob(blob.path)?, &privopts, proof);
        Ok(Opened {
            decryptor,
            blob: blob.path.to_path_buf(),
            pubopts,
            privopts,
            media_type,
            known,
        })
    }
}

fn io(what: &str, e: std::io::Error) -> PipelineError {
    PipelineError::new(FailureClass::Io, format!("{what}: {e}"))
}

fn open_blob(path: &Path) -> Result<BufReader<File>, PipelineError> {
    Ok(BufReader::with_capacity(
        256 * 1024,
        File::open(path).map_err(|e| io("the received blob", e))?,
    ))
}

/// The `layer.decrypt` events of one request.
struct LayerRecord {
    audit: Arc<dyn AuditSink>,
    tenant: String,
    function: String,
    layer_digest: String,
    /// Image name and manifest digest, when the layer is known.
    image: Option<(String, String)>,
}

impl LayerRecord {
    fn record(
        &self,
        outcome: Outcome,
        reason: String,
        sent: Option<u64>,
    ) -> Result<(), PipelineError> {
        let mut event = Event::new(AUDIT_SERVICE, EventKind::LayerDecrypt, outcome, reason)
            .tenant(self.tenant.clone())
            .function(self.function.clone())
            .detail("layer_digest", self.layer_digest.clone())
            .detail("via", "decrypt-hook".to_string());
        if let Some((image, digest)) = &self.image {
            event = event.image(image.clone(), Some(digest.clone()));
        }
        if let Some(sent) = sent {
            event = event.detail("plaintext_bytes_sent", sent.to_string());
        }
        self.audit.append(event).map(drop).map_err(|e| {
            PipelineError::new(
                FailureClass::Io,
                format!("cannot write the audit event: {e}"),
            )
        })
    }
}

/// What [`Service::authenticate`] hands to the stream.
struct Opened {
    decryptor: ocicrypt::VerifiedDecryptor<BufReader<File>>,
    blob: PathBuf,
    pubopts: ocicrypt::PublicLayerOptions,
    /// Zeroized on drop; kept for the rare second look at a stale digest.
    privopts: ocicrypt::PrivateLayerOptions,
    media_type: String,
    known: KnownLayer,
}

/// An authenticated layer, decrypting as it is read ([`std::io::Read`]).
///
/// [`finish`](Self::finish) checks the length and the plaintext digest (the trailer the hook
/// waits for is sent only after it). A stream that fails, or is dropped before `finish`,
/// records a `layer.decrypt` failure: every release has its end on the record.
pub struct LayerStream {
    /// Taken by `finish`.
    opened: Option<Opened>,
    record: Option<LayerRecord>,
    sent: u64,
}

impl std::fmt::Debug for LayerStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LayerStream")
            .field(
                "layer",
                &self
                    .opened
                    .as_ref()
                    .map(|o| o.known.descriptor.digest.to_string()),
            )
            .field("sent", &self.sent)
            .finish_non_exhaustive()
    }
}

impl std::io::Read for LayerStream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let opened = self
            .opened
            .as_mut()
            .ok_or_else(|| std::io::Error::other("the layer stream was finished"))?;
        let n = opened.decryptor.read(buf)?;
        self.sent += n as u64;
        Ok(n)
    }
}

impl LayerStream {
    /// Ends a stream that reached the end of its plaintext: the length and the plaintext
    /// digest must match (a stale digest only when the decompressed plaintext matches the
    /// verified diff_id). A failure is recorded.
    pub fn finish(mut self) -> Result<DecryptedLayer, PipelineError> {
        let opened = self.opened.take().expect("finished once");
        let result = opened.check();
        match &result {
            Ok(_) => self.record = None,
            Err(e) => self.abandon_with(&format!("{}; no trailer was sent", e.message)),
        }
        result
    }

    /// Ends a stream that cannot go on (`why`), recording it.
    pub fn abandon(mut self, why: &str) {
        self.abandon_with(why);
    }

    fn abandon_with(&mut self, why: &str) {
        if let Some(record) = self.record.take() {
            let _ = record.record(
                Outcome::Failure,
                format!(
                    "the plaintext stream to the host stopped after {} bytes: {why}",
                    self.sent
                ),
                Some(self.sent),
            );
        }
    }
}

impl Drop for LayerStream {
    fn drop(&mut self) {
        self.abandon_with("the stream ended before the layer was complete");
    }
}

impl Opened {
    fn check(self) -> Result<DecryptedLayer, PipelineError> {
        let d = &self.known.descriptor;
        let integrity = |e: ocicrypt::Error| {
            PipelineError::new(
                crate::pipeline::ocicrypt_class(&e),
                format!("layer {}: {e}", d.digest),
            )
        };
        let (authenticated, stale) = self.decryptor.finish().map_err(integrity)?;
        if let Some(stale) = stale {
            // A publisher that recompressed the layer left the old digest in the private
            // options (as skopeo does with zstd). The signed config's diff_id can still vouch
            // for the content: the decompressed plaintext must hash to it. A second look at
            // the stored blob, only in this case.
            let plain = ocicrypt::LayerDecryptor::with_options(
                open_blob(&self.blob)?,
                &self.pubopts,
                &self.privopts,
            )
            .map_err(integrity)?;
            let diff_id = diff_id(plain, &self.media_type)?;
            if self.known.diff_id.as_deref() != Some(diff_id.as_str()) {
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
            size: authenticated.plaintext_size(),
            digest: authenticated.plaintext_digest().to_string(),
            media_type: self.media_type,
        })
    }
}

/// `sha256:<hex>` of the decompressed plaintext `plain` yields; `plain`'s HMAC must match.
fn diff_id<R: std::io::Read>(
    mut plain: ocicrypt::LayerDecryptor<R>,
    media_type: &str,
) -> Result<String, PipelineError> {
    let io = |e: std::io::Error| io("hashing the plaintext", e);
    let compression = crate::unpack::Compression::from_media_type(media_type)
        .map_err(|e| refused(e.to_string()))?;
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    {
        let mut decoder = compression
            .decoder(BufReader::new(&mut plain))
            .map_err(io)?;
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let n = std::io::Read::read(&mut decoder, &mut buf).map_err(io)?;
            if n == 0 {
                break;
            }
            ctx.update(&buf[..n]);
        }
    }
    plain
        .finish_allowing_stale_digest()
        .map_err(|e| PipelineError::new(crate::pipeline::ocicrypt_class(&e), e.to_string()))?;
    Ok(format!("sha256:{}", hex::encode(ctx.finish())))
}
