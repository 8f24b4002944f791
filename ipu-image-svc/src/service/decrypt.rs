//! Layer decryption for containerd's decrypt hook: the host hands the IPU an encrypted blob
//! and gets the plaintext back, never a key.
//!
//! The IPU decrypts only layers of images it has verified for the asking tenant and function
//! (`verify`, or a Prepare), because only those tell which image a blob belongs to, and so let
//! the deployment policy and the broker decide. A stream processor payload, when containerd
//! passes one, is checked against the blob; it cannot stand in for a verified image, since the
//! host could claim any image in it.
//!
//! Order of a request: [`Service::recognise`] (from the blob's first bytes or the payload's
//! digest: the key released early, the HMAC computed on arrival), the blob stored and hashed
//! (in `grpc`), [`Service::open_layer`] (matched by its digest, authenticated: nothing leaves
//! before the HMAC matched), then the [`LayerStream`] decrypting it as it is sent, whose
//! `finish` checks the length and plaintext digest before the trailer.

use std::io::Read;
use std::sync::Arc;
use std::time::Instant;

use audit::{AuditSink, Event, EventKind, Outcome};

use super::known::{KnownLayer, Lookup};
use super::prefetch::{HeldLayer, PrefetchJob};
use super::spool::StoredBlob;
use super::{check_name, Service, ServiceError};
use crate::error::{ocicrypt_class, Error, FailureClass};
use crate::grant::Placement;
use crate::keys::{KeyFor, LayerKey};
use crate::pipeline::TrustPipeline;
use crate::progress::Quiet;
use crate::record::AUDIT_SERVICE;
use crate::secret::SecretHome;
use crate::verify::VerifiedImage;

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
    /// Where it is held (in memory, or spilled to a file).
    pub blob: &'a StoredBlob,
    /// `sha256:<hex>`, computed while it was received.
    pub digest: &'a str,
    pub size: u64,
    /// STREAM_PROCESSOR_MEDIATYPE.
    pub media_type: &'a str,
    /// The stream processor payload's descriptor (JSON), if containerd passed one.
    pub payload_descriptor: Option<&'a str>,
}

fn refused(message: String) -> ServiceError {
    ServiceError::Refused(message)
}

impl Service {
    /// Records the layers of an image verified for `placement` (its tenant, function and
    /// grant), with the first bytes of their blobs where known (`prefixes`, by layer; may be
    /// empty).
    pub(crate) fn remember_layers(
        &self,
        placement: &Placement,
        image: &VerifiedImage,
        prefixes: &[Vec<u8>],
    ) {
        let mut known = self.known_layers.lock().expect("not poisoned");
        let now = Instant::now();
        for layer in &image.layers {
            let layer = KnownLayer {
                diff_id: Some(layer.diff_id.to_string()),
                tenant: placement.tenant.clone(),
                function: placement.function.clone(),
                grant: placement.grant.clone(),
                image: image.reference.to_string(),
                image_digest: image.manifest_digest.to_string(),
                descriptor: layer.descriptor.clone(),
                prefix: prefixes.get(layer.index).cloned().unwrap_or_default(),
            };
            known.remember(layer, now);
        }
    }

    /// Verifies `image` for `tenant` and `function` (policy, signature, every layer key
    /// released for this request) and remembers its layers, with the first bytes of each
    /// encrypted blob. Returns the manifest digest and the layers' blob digests.
    pub fn verify(
        &self,
        tenant: &str,
        function: &str,
        image: &str,
    ) -> Result<(String, Vec<String>), ServiceError> {
        self.verify_placed(&Placement::ungranted(tenant, function), image)
    }

    /// [`Service::verify`] for a [`Service::placement`]: the layers it makes known act
    /// under its grant.
    pub fn verify_placed(
        &self,
        placement: &Placement,
        image: &str,
    ) -> Result<(String, Vec<String>), ServiceError> {
        let (tenant, function) = (placement.tenant.as_str(), placement.function.as_str());
        let reference = super::request(tenant, function, image)?;
        let mut cfg = (self.factory)(tenant, function)?;
        cfg.grant = placement.envelope();
        let pipeline = TrustPipeline::new(cfg);
        let request = pipeline.request(&reference);
        let verified = request.finish((|| {
            let verified = request.verify(&reference, &Quiet)?;
            request.check_keys(&self.keys, &verified)?;
            Ok(verified)
        })())?;
        let prefixes = crate::verify::blob_prefixes(&verified);
        self.remember_layers(placement, &verified, &prefixes);
        let layers = verified
            .layers
            .iter()
            .map(|l| l.descriptor.digest.to_string())
            .collect();
        let manifest_digest = verified.manifest_digest.to_string();
        // The encrypted layers are fetched now, while containerd fetches its copies, so that
        // the hook's plaintext can start as its blob does.
        PrefetchJob {
            prefetches: self.prefetches.clone(),
            keys: self.keys.clone(),
            audit: self.audit.clone(),
            spool_budget: self.spool_budget.clone(),
            spool_dir: self.spool_dir(),
            tenant: tenant.to_string(),
            function: function.to_string(),
            grant: placement.envelope(),
        }
        .start(verified);
        Ok((manifest_digest, layers))
    }

    /// Recognises a blob from its start, before it has arrived whole: by the digest a
    /// stream processor payload names, or by its first bytes among the encrypted layers
    /// verified for `tenant` and `function` with `media_type`. The layer's key is then
    /// released at once, so that its HMAC can be computed while the blob arrives.
    ///
    /// Only a hint: [`open_layer`](Self::open_layer) still matches the whole blob's digest,
    /// and a blob that turns out to be another one is handled as if nothing was recognised.
    /// `None` when nothing (or more than one layer) matches.
    pub fn recognise(
        &self,
        tenant: &str,
        function: &str,
        media_type: &str,
        payload_digest: Option<&str>,
        start: &[u8],
    ) -> Option<EarlyLayer> {
        check_name("tenant", tenant).ok()?;
        check_name("function", function).ok()?;
        let known = self.known_layers.lock().expect("not poisoned").recognise(
            tenant,
            function,
            media_type,
            payload_digest,
            start,
            Instant::now(),
        )?;
        // Past its grant's window: not recognised (and refused when the blob is opened).
        if known
            .grant
            .as_ref()
            .is_some_and(|g| g.expired(std::time::SystemTime::now()))
        {
            return None;
        }
        let keys = self.layer_keys(tenant, function, &known);
        let verifier = match &keys {
            Ok(k) => {
                ocicrypt::CiphertextVerifier::new_in(&k.pubopts, &k.privopts, &SecretHome).ok()
            }
            Err(_) => None,
        };
        Some(EarlyLayer {
            record: keys
                .is_ok()
                .then(|| LayerRecord::new(self, tenant, function, &known)),
            known,
            keys: Some(keys),
            verifier,
            proof: None,
        })
    }

    /// Releases `known`'s key for `tenant` and `function` (the broker decides now, and
    /// audits it).
    fn layer_keys(
        &self,
        tenant: &str,
        function: &str,
        known: &KnownLayer,
    ) -> Result<LayerKey, ServiceError> {
        self.keys
            .release(&KeyFor {
                image: &known.image,
                image_digest: &known.image_digest,
                layer: &known.descriptor,
                tenant,
                function,
                grant: known.grant.as_ref().map(|g| &*g.envelope),
            })
            .map_err(|e| {
                Error::from(e)
                    .context(format!("layer {}", known.descriptor.digest))
                    .into()
            })
    }

    /// Opens a received blob for decryption for `tenant` and `function`: the blob must be a
    /// layer of an image verified for them and match its descriptor (and the payload's, if
    /// any); its key is released by the key source for this request, and its HMAC over the
    /// whole blob is checked before this returns. The returned stream yields plaintext that
    /// was authenticated, as it is decrypted.
    ///
    /// The release is recorded (`layer.decrypt`) before any plaintext can leave; a refusal is
    /// recorded and returned; a stream that later fails records that too (see [`LayerStream`]).
    ///
    /// `early` is what [`recognise`](Self::recognise) made of the blob's start, if anything:
    /// when it is this blob, its key and the HMAC computed on arrival are used.
    pub fn open_layer(
        &self,
        tenant: &str,
        function: &str,
        blob: &ReceivedBlob<'_>,
        early: Option<EarlyLayer>,
    ) -> Result<LayerStream, ServiceError> {
        check_name("tenant", tenant)?;
        check_name("function", function)?;
        let lookup = self.known_layers.lock().expect("not poisoned").get(
            blob.digest,
            tenant,
            function,
            Instant::now(),
        );
        let (known, expired) = match lookup {
            Lookup::Known(k) => (Some(*k), None),
            Lookup::Expired { age } => (None, Some(age)),
            Lookup::Unknown => (None, None),
        };
        let record = LayerRecord {
            audit: self.audit.clone(),
            tenant: tenant.to_string(),
            function: function.to_string(),
            layer_digest: blob.digest.to_string(),
            image: known
                .as_ref()
                .map(|k| (k.image.clone(), k.image_digest.clone())),
        };
        // What was recognised early is used only if it is this blob.
        let early = early.and_then(|e| {
            if known.is_some() && e.known.descriptor.digest.to_string() == blob.digest {
                Some(e)
            } else {
                e.discard(&format!(
                    "the blob received is {}, not the layer its start suggested",
                    blob.digest
                ));
                None
            }
        });
        let opened = match (known, expired) {
            (None, Some(age)) => Err(refused(format!(
                "layer {} was verified for tenant {tenant:?}, function {function:?} {} s ago, longer than a verification is good for ({} s): verify the image again (ImageService.Verify, `host-attach verify`), then pull",
                blob.digest,
                age.as_secs(),
                self.opts.verified_layer_ttl.as_secs()
            ))),
            (None, None) => Err(refused(match blob.payload_descriptor {
                None => format!(
                    "layer {} is in no image this IPU verified for tenant {tenant:?}, function {function:?}, and containerd passed no stream processor payload: verify the image first (ImageService.Verify, `host-attach verify`), then pull",
                    blob.digest
                ),
                Some(_) => format!(
                    "layer {} is in no image this IPU verified for tenant {tenant:?}, function {function:?}; a payload does not say which image a layer belongs to, so the policy cannot decide: verify the image first (ImageService.Verify, `host-attach verify`)",
                    blob.digest
                ),
            })),
            (Some(k), _) => self.authenticate(tenant, function, k, blob, early),
        };
        release(record, opened)
    }

    /// Opens the IPU's own copy of the layer `early` recognised (`held`, fetched and
    /// authenticated after `Verify`) for `tenant` and `function`, before the host's blob has
    /// arrived: the layer must still be verified for them, under a grant still in its window,
    /// with the request's media type (and the payload's digest and size, if any). The
    /// caller compares the host's blob with the returned copy as it arrives, and sends the
    /// trailer only if they are equal ([`super::prefetch::BlobComparison`]).
    ///
    /// Recorded like [`open_layer`](Self::open_layer), with `hmac_checked` saying the copy
    /// was the IPU's.
    pub fn open_held(
        &self,
        tenant: &str,
        function: &str,
        media_type: &str,
        payload_descriptor: Option<&str>,
        early: EarlyLayer,
        held: HeldLayer,
    ) -> Result<(LayerStream, StoredBlob), ServiceError> {
        check_name("tenant", tenant)?;
        check_name("function", function)?;
        let digest = early.known.descriptor.digest.to_string();
        let lookup = self.known_layers.lock().expect("not poisoned").get(
            &digest,
            tenant,
            function,
            Instant::now(),
        );
        let record = LayerRecord::new(self, tenant, function, &early.known);
        let opened = match lookup {
            Lookup::Known(known) => (|| {
                check_request(&known, &digest, None, media_type, payload_descriptor)?;
                let keys = early.take_keys()?;
                let d = &known.descriptor;
                let integrity = |e: ocicrypt::Error| {
                    Error::new(ocicrypt_class(&e), format!("layer {}: {e}", d.digest))
                };
                let decryptor = ocicrypt::VerifiedDecryptor::new_in(
                    open_blob(&held.blob)?,
                    &keys.privopts,
                    held.proof,
                    &SecretHome,
                )
                .map_err(integrity)?;
                Ok(Opened {
                    decryptor,
                    blob: held.blob.clone(),
                    keys,
                    media_type: plain_media_type(d)?,
                    known: *known,
                    hmac: HmacChecked::Prefetched,
                })
            })(),
            Lookup::Expired { .. } | Lookup::Unknown => Err(refused(format!(
                "layer {digest} is no longer verified for tenant {tenant:?}, function {function:?}: verify the image again (ImageService.Verify, `host-attach verify`), then pull"
            ))),
        };
        release(record, opened).map(|stream| (stream, held.blob))
    }
}

/// The checks of a request against the verified layer `known` before any release: the grant
/// still in its window, the blob's size (when known: a blob compared with the IPU's own copy
/// is checked as it arrives) and media type the descriptor's, and the stream processor
/// payload, if any, naming this blob.
fn check_request(
    known: &KnownLayer,
    digest: &str,
    size: Option<u64>,
    media_type: &str,
    payload_descriptor: Option<&str>,
) -> Result<(), ServiceError> {
    if let Some(g) = known
        .grant
        .as_ref()
        .filter(|g| g.expired(std::time::SystemTime::now()))
    {
        return Err(refused(format!(
            "placement grant refused (expired): layer {digest} was verified under grant {}, whose window ended at {}: verify the image again with a new grant",
            g.serial,
            policy::grant::format_time(g.not_after)
        )));
    }
    let d = &known.descriptor;
    let size = size.unwrap_or(d.size);
    if d.size != size || d.media_type != media_type {
        return Err(refused(format!(
            "the blob ({size} bytes, {media_type}) does not match layer {} of {} ({} bytes, {})",
            d.digest, known.image, d.size, d.media_type
        )));
    }
    if let Some(json) = payload_descriptor {
        let payload: serde_json::Value = serde_json::from_str(json)
            .map_err(|e| refused(format!("the stream processor payload's descriptor: {e}")))?;
        if payload["digest"].as_str() != Some(digest) || payload["size"].as_u64() != Some(size) {
            return Err(refused(format!(
                "the stream processor payload names {} ({} bytes), not the blob received ({digest}, {size} bytes)",
                payload["digest"], payload["size"]
            )));
        }
    }
    Ok(())
}

/// The plain media type of an encrypted layer's descriptor.
fn plain_media_type(d: &crate::fetch::Descriptor) -> Result<String, ServiceError> {
    Ok(ocicrypt::decrypted_media_type(&d.media_type)
        .ok_or_else(|| refused(format!("{} is not an encrypted layer type", d.media_type)))?
        .to_string())
}

/// Records a release (or its refusal) and hands out the stream.
fn release(
    record: LayerRecord,
    opened: Result<Opened, ServiceError>,
) -> Result<LayerStream, ServiceError> {
    match opened {
        Ok(opened) => {
            let mut details = vec![("hmac_checked", opened.hmac.describe().to_string())];
            details.extend(opened.keys.broker_detail());
            let reason = "layer HMAC verified on the IPU; plaintext released to containerd's decrypt hook as it is decrypted";
            record.record(Outcome::Success, reason.into(), &details)?;
            Ok(LayerStream {
                opened: Some(opened),
                record: Some(record),
                sent: 0,
            })
        }
        Err(e) => {
            record.record(
                if e.class().is_rejection() {
                    Outcome::Denied
                } else {
                    Outcome::Failure
                },
                e.to_string(),
                &[],
            )?;
            Err(e)
        }
    }
}

impl Service {
    /// Everything up to the release: descriptor and payload checks, the key, the HMAC over
    /// the whole blob (computed on arrival when `early` recognised it, else in a first pass
    /// over the stored blob).
    fn authenticate(
        &self,
        tenant: &str,
        function: &str,
        known: KnownLayer,
        blob: &ReceivedBlob<'_>,
        early: Option<EarlyLayer>,
    ) -> Result<Opened, ServiceError> {
        check_request(
            &known,
            blob.digest,
            Some(blob.size),
            blob.media_type,
            blob.payload_descriptor,
        )?;
        let d = &known.descriptor;
        let media_type = plain_media_type(d)?;
        let integrity =
            |e: ocicrypt::Error| Error::new(ocicrypt_class(&e), format!("layer {}: {e}", d.digest));
        let early = early.map(EarlyLayer::used).transpose()?.flatten();
        let on_arrival = early.is_some();
        let (keys, proof) = match early {
            Some((keys, proof)) => (keys, proof.map_err(integrity)?),
            None => {
                let keys = self.layer_keys(tenant, function, &known)?;
                // First pass: the HMAC over the stored blob. Only this process writes the
                // spool.
                let mut verifier = ocicrypt::CiphertextVerifier::new_in(
                    &keys.pubopts,
                    &keys.privopts,
                    &SecretHome,
                )
                .map_err(integrity)?;
                verifier
                    .update_from(open_blob(blob.blob)?)
                    .map_err(|e| io("reading the received blob", e))?;
                let proof = verifier.verify().map_err(integrity)?;
                (keys, proof)
            }
        };
        let decryptor = ocicrypt::VerifiedDecryptor::new_in(
            open_blob(blob.blob)?,
            &keys.privopts,
            proof,
            &SecretHome,
        )
        .map_err(integrity)?;
        Ok(Opened {
            decryptor,
            blob: blob.blob.clone(),
            keys,
            media_type,
            known,
            hmac: if on_arrival {
                HmacChecked::OnArrival
            } else {
                HmacChecked::OverStored
            },
        })
    }
}

/// A blob [`Service::recognise`]d from its start: the layer it should be, that layer's key
/// (or why there is none), and the HMAC computed while the blob arrives.
///
/// A key released for it and never used (the blob did not arrive whole, was another one, or
/// was refused) is recorded as a `layer.decrypt` failure.
pub struct EarlyLayer {
    known: KnownLayer,
    /// Taken by [`used`](Self::used).
    keys: Option<Result<LayerKey, ServiceError>>,
    /// Taken by the receiver, which feeds it the blob as it arrives.
    verifier: Option<ocicrypt::CiphertextVerifier>,
    proof: Option<Result<ocicrypt::VerifiedCiphertext, ocicrypt::Error>>,
    /// Set while a released key is unused.
    record: Option<LayerRecord>,
}

impl std::fmt::Debug for EarlyLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EarlyLayer")
            .field("layer", &self.known.descriptor.digest.to_string())
            .finish_non_exhaustive()
    }
}

impl EarlyLayer {
    /// The digest of the layer the blob's start named.
    pub fn layer_digest(&self) -> String {
        self.known.descriptor.digest.to_string()
    }

    /// The key released for the layer (or why the broker refused it), for a release from
    /// the IPU's own copy.
    fn take_keys(mut self) -> Result<LayerKey, ServiceError> {
        self.record = None;
        self.keys.take().expect("used once")
    }

    /// The HMAC to feed with the blob as it arrives (`None` without a key).
    pub fn take_verifier(&mut self) -> Option<ocicrypt::CiphertextVerifier> {
        self.verifier.take()
    }

    /// The HMAC's verdict over the whole blob, from the verifier taken above.
    pub fn authenticated(&mut self, proof: Result<ocicrypt::VerifiedCiphertext, ocicrypt::Error>) {
        self.proof = Some(proof);
    }

    /// The digest of the layer this blob's start named, if the HMAC over all of the blob
    /// (`proof`, from the verifier taken above) matched that layer's, for exactly its size.
    /// The HMAC is in the signed manifest like the digest, and no other byte string has it
    /// (that would take a SHA-256 second preimage, key or no key): the blob is that layer's,
    /// and it need not be hashed to say so.
    pub fn identified_by_hmac(
        &self,
        proof: &Result<ocicrypt::VerifiedCiphertext, ocicrypt::Error>,
    ) -> Option<String> {
        match proof {
            Ok(p) if p.size() == self.known.descriptor.size => {
                Some(self.known.descriptor.digest.to_string())
            }
            _ => None,
        }
    }

    /// The keys and the verdict for [`Service::authenticate`]; `None` when there is no
    /// verdict (no key, or the receiver never ran the HMAC), so that the stored blob gets
    /// its first pass. A key error is returned as is (the broker refused this request).
    #[allow(clippy::type_complexity)]
    fn used(
        mut self,
    ) -> Result<
        Option<(
            LayerKey,
            Result<ocicrypt::VerifiedCiphertext, ocicrypt::Error>,
        )>,
        ServiceError,
    > {
        self.record = None;
        match (self.keys.take().expect("used once"), self.proof.take()) {
            (Err(e), _) => Err(e),
            (Ok(keys), Some(proof)) => Ok(Some((keys, proof))),
            (Ok(_), None) => Ok(None),
        }
    }

    fn discard(mut self, why: &str) {
        if let Some(record) = self.record.take() {
            let _ = record.record(
                Outcome::Failure,
                format!(
                    "the layer key released for a blob as it started to arrive was not used: {why}"
                ),
                &[],
            );
        }
    }
}

impl Drop for EarlyLayer {
    fn drop(&mut self) {
        if let Some(record) = self.record.take() {
            let _ = record.record(
                Outcome::Failure,
                "the layer key released for a blob as it started to arrive was not used: the request failed before the blob was decrypted".into(),
                &[],
            );
        }
    }
}

fn io(what: &str, e: std::io::Error) -> ServiceError {
    ServiceError::device(what, e)
}

pub(crate) fn open_blob(blob: &StoredBlob) -> Result<Box<dyn Read + Send>, ServiceError> {
    blob.reader().map_err(|e| io("the received blob", e))
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
    fn new(service: &Service, tenant: &str, function: &str, known: &KnownLayer) -> Self {
        Self {
            audit: service.audit.clone(),
            tenant: tenant.to_string(),
            function: function.to_string(),
            layer_digest: known.descriptor.digest.to_string(),
            image: Some((known.image.clone(), known.image_digest.clone())),
        }
    }

    fn record(
        &self,
        outcome: Outcome,
        reason: String,
        details: &[(&str, String)],
    ) -> Result<(), ServiceError> {
        let mut event = Event::new(AUDIT_SERVICE, EventKind::LayerDecrypt, outcome, reason)
            .tenant(self.tenant.clone())
            .function(self.function.clone())
            .detail("layer_digest", self.layer_digest.clone())
            .detail("via", "decrypt-hook".to_string());
        if let Some((image, digest)) = &self.image {
            event = event.image(image.clone(), Some(digest.clone()));
        }
        for (name, value) in details {
            event = event.detail(*name, value.clone());
        }
        self.audit
            .append(event)
            .map(drop)
            .map_err(ServiceError::Audit)
    }
}

/// What [`Service::authenticate`] hands to the stream.
struct Opened {
    decryptor: ocicrypt::VerifiedDecryptor<Box<dyn Read + Send>>,
    blob: StoredBlob,
    /// Kept for the rare second look at a stale digest.
    keys: LayerKey,
    media_type: String,
    known: KnownLayer,
    hmac: HmacChecked,
}

/// When the HMAC of a released layer was checked (the audit event's `hmac_checked`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum HmacChecked {
    /// As the host's blob arrived, recognised from its start.
    OnArrival,
    /// In a pass over the host's blob once it was held whole.
    OverStored,
    /// On the IPU's own copy, fetched after `Verify`, before the host's blob arrived (which
    /// is compared with that copy).
    Prefetched,
}

impl HmacChecked {
    fn describe(self) -> &'static str {
        match self {
            Self::OnArrival => "on arrival (recognised from its start)",
            Self::OverStored => "over the stored blob",
            Self::Prefetched => {
                "on the IPU's own copy, fetched after Verify (the host's blob compared with it)"
            }
        }
    }
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
    /// The digest of the layer (its blob's).
    pub fn layer_digest(&self) -> String {
        self.opened
            .as_ref()
            .map(|o| o.known.descriptor.digest.to_string())
            .unwrap_or_default()
    }

    /// The size of the layer's blob.
    pub fn layer_size(&self) -> u64 {
        self.opened.as_ref().map_or(0, |o| o.known.descriptor.size)
    }

    /// Ends a stream that reached the end of its plaintext: the length and the plaintext
    /// digest must match (a stale digest only when the decompressed plaintext matches the
    /// verified diff_id). A failure is recorded.
    pub fn finish(mut self) -> Result<DecryptedLayer, ServiceError> {
        let opened = self.opened.take().expect("finished once");
        let result = opened.check();
        match &result {
            Ok(_) => self.record = None,
            Err(e) => self.abandon_with(&format!("{e}; no trailer was sent")),
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
                &[("plaintext_bytes_sent", self.sent.to_string())],
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
    fn check(self) -> Result<DecryptedLayer, ServiceError> {
        let d = &self.known.descriptor;
        let integrity =
            |e: ocicrypt::Error| Error::new(ocicrypt_class(&e), format!("layer {}: {e}", d.digest));
        let (authenticated, stale) = self.decryptor.finish().map_err(integrity)?;
        let digest = authenticated
            .plaintext_digest()
            .expect("the two-pass decryptor always hashes the plaintext")
            .to_string();
        if let Some(stale) = stale {
            // A publisher that recompressed the layer left the old digest in the private
            // options (as skopeo does with zstd). The signed config's diff_id can still vouch
            // for the content: the decompressed plaintext must hash to it. A second look at
            // the stored blob, only in this case.
            let plain =
                crate::decrypt::decryptor(open_blob(&self.blob)?, &self.keys).map_err(integrity)?;
            let diff_id = crate::decrypt::diff_id(plain, &self.media_type)?;
            if self.known.diff_id.as_deref() != Some(diff_id.as_str()) {
                return Err(ServiceError::Image(Error::new(
                    FailureClass::DigestMismatch,
                    format!(
                        "layer {}: decrypted digest {} does not match {} from the private options, and its diff_id {diff_id} is not the verified config's",
                        d.digest, digest, stale.declared
                    ),
                )));
            }
            tracing::warn!(layer = %d.digest, declared = %stale.declared, "stale digest in the private options; the signed diff_id vouches for the content");
        }
        Ok(DecryptedLayer {
            size: authenticated.plaintext_size(),
            digest,
            media_type: self.media_type,
        })
    }
}
