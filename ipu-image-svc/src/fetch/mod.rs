//! Image sources: registries (OCI distribution v2) and OCI image-layout directories.
//!
//! A transport implements only [`ImageSource`]: fetch a manifest by tag or digest, open a blob.
//! Everything that decides what to trust is written once here, over any source: manifest and
//! index parsing with platform selection, digest checks on manifests, size and digest checks
//! while blobs stream ([`VerifyingReader`]), and signature discovery ([`signatures`]): cosign's
//! `.sig` tag and Sigstore bundles attached as OCI 1.1 referrers.

mod cache;
mod layout;
mod manifest;
pub mod pull;
mod registry;

use std::io::{self, Read};

use base64::Engine;
use policy::reference::{Digest, ImageReference};
use policy::sigstore::{
    is_bundle_media_type, Discovery, SignatureFormat, SignatureKind, SignatureSource,
    SigstoreBundleArtifact, SimpleSigningSignature, UntrustedBundle, MAX_BUNDLE_LEN,
};
use sha2::{Digest as _, Sha256};

pub use cache::BlobCache;
pub use layout::OciLayoutSource;
pub use manifest::{
    Descriptor, ImageConfig, ImageManifest, ManifestKind, Platform, PlatformError, RuntimeConfig,
};
pub use registry::RegistrySource;

/// Upper bound on manifests, indexes and configs held in memory.
pub const MAX_MANIFEST_BYTES: usize = 4 << 20;
/// Upper bound on one signature payload.
pub const MAX_SIGNATURE_PAYLOAD: u64 = 64 << 10;
const MAX_SIGNATURE_LAYERS: usize = 64;
/// Upper bound on the referrers that may be signatures (examined one by one), per image.
pub const MAX_SIGNATURE_REFERRERS: usize = 32;
/// Upper bound on a referrer manifest (cosign's is under 1 KiB).
pub const MAX_REFERRER_MANIFEST: u64 = 64 << 10;
/// Upper bound on the bytes of all signatures of one image held in memory.
pub const MAX_SIGNATURE_BYTES: usize = 8 << 20;
/// The artifact type OCI 1.1 tools write for an artifact with an empty config when they do
/// not know better (cosign 3 on the referrers tag schema, in the index entry).
const OCI_EMPTY: &str = "application/vnd.oci.empty.v1+json";

const COSIGN_SIMPLESIGNING: &str = "application/vnd.dev.cosign.simplesigning.v1+json";
const COSIGN_SIGNATURE_ANNOTATION: &str = "dev.cosignproject.cosign/signature";

/// What kind of failure a [`FetchError`] is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FetchErrorClass {
    /// Content does not match its digest or size: tampering or corruption.
    DigestMismatch,
    NotFound,
    /// Registry data that is not what the format says.
    Malformed,
    /// Well-formed data we deliberately do not handle (schema 1, foreign digests, ...).
    Unsupported,
    /// Plain HTTP to a host that is not loopback and not explicitly allowed.
    Insecure,
    TooLarge,
    Network,
    Io,
}

/// A fetch failure: what went wrong and where (registry URL, layout path, digest).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct FetchError {
    pub class: FetchErrorClass,
    pub message: String,
}

impl FetchError {
    pub fn new(class: FetchErrorClass, message: impl Into<String>) -> Self {
        Self {
            class,
            message: message.into(),
        }
    }

    pub fn class(&self) -> FetchErrorClass {
        self.class
    }

    /// Recovers a FetchError carried through `std::io::Error` by a reader.
    pub fn from_io(e: io::Error, context: &str) -> Self {
        if let Some(inner) = e.get_ref().and_then(|i| i.downcast_ref::<FetchError>()) {
            return inner.clone();
        }
        Self::new(FetchErrorClass::Io, format!("{context}: {e}"))
    }
}

/// How a manifest is addressed inside a source.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ManifestRef {
    Tag(String),
    Digest(Digest),
    /// An OCI layout reference without a name: the layout's only image.
    Default,
}

/// Manifest bytes and the media type the transport reported for them, if any.
pub type RawManifest = (Vec<u8>, Option<String>);

/// What a source's own referrers listing found for a manifest.
#[derive(Clone, Debug)]
pub enum ReferrersLookup {
    /// The source lists referrers (a registry's OCI 1.1 referrers API, an OCI layout's
    /// index): the descriptors of the manifests whose `subject` is the image.
    Listed {
        via: Discovery,
        descriptors: Vec<Descriptor>,
    },
    /// The source has no referrers listing (a registry without the API): only the
    /// referrers tag schema can find them.
    NotSupported,
}

/// A transport: raw manifests and raw blobs. Checks happen in this module, not in transports.
pub trait ImageSource: Send + Sync {
    /// Where this source reads from, for messages.
    fn describe(&self) -> String;
    /// The manifest the user's reference names.
    fn root_ref(&self) -> ManifestRef;
    /// Raw manifest bytes and the media type the transport reported, `None` if absent.
    fn fetch_manifest(&self, r: &ManifestRef) -> Result<Option<RawManifest>, FetchError>;
    /// The raw blob stream (unchecked).
    fn open_blob_raw(&self, digest: &Digest) -> Result<Box<dyn Read + Send>, FetchError>;
    /// The blob's file when the source is a local directory (unchecked: whoever reads it
    /// checks its digest as it reads), so that it need not be copied to be built from.
    fn local_blob(&self, digest: &Digest) -> Option<std::path::PathBuf> {
        let _ = digest;
        None
    }
    /// The first `len` bytes of a blob (fewer if it is shorter), unchecked: a hint only,
    /// never content anything is built from.
    fn blob_prefix(&self, digest: &Digest, len: usize) -> Result<Vec<u8>, FetchError> {
        let mut prefix = Vec::with_capacity(len);
        self.open_blob_raw(digest)?
            .take(len as u64)
            .read_to_end(&mut prefix)
            .map_err(|e| FetchError::from_io(e, &format!("blob {digest}")))?;
        Ok(prefix)
    }
    /// The manifests that name `digest` as their `subject`, as the source lists them
    /// (unchecked: every one is fetched and checked by digest).
    fn referrers(&self, digest: &Digest) -> Result<ReferrersLookup, FetchError> {
        let _ = digest;
        Ok(ReferrersLookup::NotSupported)
    }
    /// The repository or layout, for signature sources (`host/path`, `oci:/dir`).
    fn origin(&self) -> String {
        self.describe()
    }
}

/// Options for opening sources.
#[derive(Clone, Debug)]
pub struct SourceOptions {
    pub platform: Platform,
    /// Registry hosts (host or host:port) reachable by plain HTTP besides loopback.
    pub insecure_http_hosts: Vec<String>,
    /// Basic credentials for the registry (also used to get bearer tokens).
    pub credentials: Option<(String, String)>,
    pub timeout: std::time::Duration,
}

impl Default for SourceOptions {
    fn default() -> Self {
        Self {
            platform: Platform::default(),
            insecure_http_hosts: Vec::new(),
            credentials: None,
            timeout: std::time::Duration::from_secs(60),
        }
    }
}

/// Opens the source a reference names.
/// The digest of everything `reader` yields.
pub fn digest_of(mut reader: impl Read) -> io::Result<Digest> {
    let mut hash = Sha256::new();
    io::copy(&mut reader, &mut hash)?;
    Ok(Digest::from_sha256(hash.finalize().into()))
}

pub fn open_source(
    reference: &ImageReference,
    opts: &SourceOptions,
) -> Result<Box<dyn ImageSource>, FetchError> {
    match reference {
        ImageReference::Docker(r) => Ok(Box::new(RegistrySource::new(r, opts)?)),
        ImageReference::Oci(r) => Ok(Box::new(OciLayoutSource::open(r)?)),
        ImageReference::Dir(r) => Err(FetchError::new(
            FetchErrorClass::Unsupported,
            format!(
                "dir:{} images cannot be pulled yet (docker:// and oci: can)",
                r.dir().display()
            ),
        )),
    }
}

/// An image resolved to one platform manifest, its config, and the digest signatures name.
#[derive(Clone, Debug)]
pub struct ResolvedImage {
    /// Digest of the manifest the reference points at (an index for multi-platform images):
    /// what signatures are checked against.
    pub manifest_digest: Digest,
    /// Digest of the platform manifest that was selected (equal for single manifests).
    pub platform_manifest_digest: Digest,
    pub manifest: ImageManifest,
    pub config: ImageConfig,
    pub config_bytes: Vec<u8>,
}

/// The manifest a reference resolves to, before anything it points at is fetched.
#[derive(Clone, Debug)]
pub struct ResolvedManifest {
    /// Digest of the manifest the reference points at: what signatures are checked against.
    pub manifest_digest: Digest,
    /// Digest of the platform manifest that was selected (equal for single manifests).
    pub platform_manifest_digest: Digest,
    pub manifest: ImageManifest,
}

/// Resolves the source's reference: manifest (through an index if needed) and config, every
/// piece checked against its digest.
pub fn resolve(source: &dyn ImageSource, platform: &Platform) -> Result<ResolvedImage, FetchError> {
    load_config(source, resolve_manifest(source, platform)?)
}

/// Resolves the reference to one platform's image manifest (through an index if needed),
/// checking every manifest fetched by digest. Nothing else is fetched, so signatures can be
/// verified before any config or layer is read.
pub fn resolve_manifest(
    source: &dyn ImageSource,
    platform: &Platform,
) -> Result<ResolvedManifest, FetchError> {
    let root = source.root_ref();
    let (bytes, media_type) = fetch_checked_manifest(source, &root)?;
    let manifest_digest = Digest::of(&bytes);
    let mut kind = manifest::parse(&bytes, media_type.as_deref(), &source.describe())?;
    let mut platform_manifest_digest = manifest_digest.clone();
    let mut depth = 0;
    let manifest = loop {
        match kind {
            ManifestKind::Image(m) => break m,
            ManifestKind::Index(index) => {
                depth += 1;
                if depth > 2 {
                    return Err(FetchError::new(
                        FetchErrorClass::Malformed,
                        format!("{}: image indexes nested deeper than 2", source.describe()),
                    ));
                }
                let chosen = manifest::select_platform(&index, platform).ok_or_else(|| {
                    FetchError::new(
                        FetchErrorClass::NotFound,
                        format!(
                            "{}: the image index has no manifest for platform {platform} (it has: {})",
                            source.describe(),
                            manifest::platforms(&index).join(", ")
                        ),
                    )
                })?;
                let (b, mt) =
                    fetch_checked_manifest(source, &ManifestRef::Digest(chosen.digest.clone()))?;
                platform_manifest_digest = chosen.digest.clone();
                kind = manifest::parse(
                    &b,
                    mt.as_deref().or(Some(&chosen.media_type)),
                    &source.describe(),
                )?;
            }
        }
    };
    Ok(ResolvedManifest {
        manifest_digest,
        platform_manifest_digest,
        manifest,
    })
}

impl ResolvedImage {
    /// The config's `config` object (Cmd, Entrypoint, Env, WorkingDir, User) as it is in the
    /// verified blob: what a runtime needs to start the image.
    pub fn runtime_config(&self) -> Option<serde_json::Value> {
        serde_json::from_slice::<serde_json::Value>(&self.config_bytes)
            .ok()
            .and_then(|c| c.get("config").cloned())
    }
}

/// Fetches and parses the config of a resolved manifest (digest- and size-checked).
pub fn load_config(
    source: &dyn ImageSource,
    resolved: ResolvedManifest,
) -> Result<ResolvedImage, FetchError> {
    let ResolvedManifest {
        manifest_digest,
        platform_manifest_digest,
        manifest,
    } = resolved;
    let mut config_bytes = Vec::new();
    if manifest.config.size > MAX_MANIFEST_BYTES as u64 {
        return Err(FetchError::new(
            FetchErrorClass::TooLarge,
            format!(
                "config {} is {} bytes (limit {MAX_MANIFEST_BYTES})",
                manifest.config.digest, manifest.config.size
            ),
        ));
    }
    open_blob(source, &manifest.config)?
        .read_to_end(&mut config_bytes)
        .map_err(|e| {
            FetchError::from_io(e, &format!("reading config {}", manifest.config.digest))
        })?;
    let config = manifest::parse_config(&config_bytes, &manifest.config.digest)?;
    if config.diff_ids.len() != manifest.layers.len() {
        return Err(FetchError::new(
            FetchErrorClass::Malformed,
            format!(
                "config {} lists {} diff_ids for {} layers",
                manifest.config.digest,
                config.diff_ids.len(),
                manifest.layers.len()
            ),
        ));
    }
    Ok(ResolvedImage {
        manifest_digest,
        platform_manifest_digest,
        manifest,
        config,
        config_bytes,
    })
}

fn fetch_checked_manifest(
    source: &dyn ImageSource,
    r: &ManifestRef,
) -> Result<(Vec<u8>, Option<String>), FetchError> {
    let (bytes, media_type) = source.fetch_manifest(r)?.ok_or_else(|| {
        FetchError::new(
            FetchErrorClass::NotFound,
            format!(
                "{}: manifest {} not found",
                source.describe(),
                describe_ref(r)
            ),
        )
    })?;
    if bytes.len() > MAX_MANIFEST_BYTES {
        return Err(FetchError::new(
            FetchErrorClass::TooLarge,
            format!(
                "{}: manifest {} is larger than {MAX_MANIFEST_BYTES} bytes",
                source.describe(),
                describe_ref(r)
            ),
        ));
    }
    if let ManifestRef::Digest(want) = r {
        let got = Digest::of(&bytes);
        if &got != want {
            return Err(FetchError::new(
                FetchErrorClass::DigestMismatch,
                format!(
                    "{}: manifest requested as {want} has digest {got}",
                    source.describe()
                ),
            ));
        }
    }
    Ok((bytes, media_type))
}

fn describe_ref(r: &ManifestRef) -> String {
    match r {
        ManifestRef::Tag(t) => format!("tag {t:?}"),
        ManifestRef::Digest(d) => d.to_string(),
        ManifestRef::Default => "(the layout's only image)".into(),
    }
}

/// Opens a blob as a stream checked against the descriptor's size and digest.
pub fn open_blob(
    source: &dyn ImageSource,
    desc: &Descriptor,
) -> Result<VerifyingReader<Box<dyn Read + Send>>, FetchError> {
    let raw = source.open_blob_raw(&desc.digest)?;
    Ok(VerifyingReader::new(
        raw,
        desc.digest.clone(),
        desc.size,
        source.describe(),
    ))
}

/// Checks size and SHA-256 while streaming. Reading past the declared size fails at once;
/// a short or wrong stream fails at EOF, so a consumer never sees a clean end of an
/// unverified blob.
pub struct VerifyingReader<R> {
    inner: R,
    digest: Digest,
    size: u64,
    read: u64,
    hash: Sha256,
    origin: String,
    done: bool,
}

impl<R: Read> VerifyingReader<R> {
    pub fn new(inner: R, digest: Digest, size: u64, origin: String) -> Self {
        Self {
            inner,
            digest,
            size,
            read: 0,
            hash: Sha256::new(),
            origin,
            done: false,
        }
    }

    fn fail(&self, message: String) -> io::Error {
        io::Error::other(FetchError::new(FetchErrorClass::DigestMismatch, message))
    }
}

impl<R: Read> Read for VerifyingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.done {
            return Ok(0);
        }
        // Ask for one byte more than remains so an overlong blob is noticed.
        let remaining = (self.size - self.read).saturating_add(1);
        let want = buf
            .len()
            .min(usize::try_from(remaining).unwrap_or(usize::MAX));
        let n = self.inner.read(&mut buf[..want])?;
        self.read += n as u64;
        if self.read > self.size {
            return Err(self.fail(format!(
                "{}: blob {} is longer than its declared {} bytes",
                self.origin, self.digest, self.size
            )));
        }
        self.hash.update(&buf[..n]);
        if n == 0 {
            if self.read != self.size {
                return Err(self.fail(format!(
                    "{}: blob {} ended after {} of {} bytes",
                    self.origin, self.digest, self.read, self.size
                )));
            }
            let got = Digest::from_sha256(self.hash.clone().finalize().into());
            if got != self.digest {
                return Err(self.fail(format!(
                    "{}: blob {} has digest {got}: content does not match",
                    self.origin, self.digest
                )));
            }
            self.done = true;
        }
        Ok(n)
    }
}

/// Every signature of a manifest, whatever its format: cosign simple-signing layers at the
/// `sha256-<hex>.sig` tag, and Sigstore bundles (any version) attached as OCI 1.1 referrers,
/// found through the source's referrers listing (a registry's referrers API, an OCI layout's
/// index) and through the referrers tag schema (`sha256-<hex>`, an index; what a registry
/// without the API holds). All are returned, each with its source; a referrer is opened by
/// digest, must name the image as its `subject` and carry a bundle artifact type. An artifact
/// that is a signature by its tag or type but cannot be read becomes
/// [`SignatureFormat::Unreadable`] (so the policy reports it by name and format, never as
/// "no signature"). A missing tag means no signatures of that kind. Sizes and counts are
/// bounded; network and I/O failures are errors.
pub fn signatures(
    source: &dyn ImageSource,
    manifest_digest: &Digest,
) -> Result<Vec<SignatureFormat>, FetchError> {
    // The two kinds are discovered at once (each is a few round trips to the source), each
    // within the whole budget; together they must fit it too.
    let ((simple, simple_left), (bundles, bundles_left)) = std::thread::scope(|scope| {
        let simple = scope.spawn(|| {
            let (mut out, mut budget) = (Vec::new(), MAX_SIGNATURE_BYTES);
            simple_signing_signatures(source, manifest_digest, &mut out, &mut budget)
                .map(|()| (out, budget))
        });
        let (mut out, mut budget) = (Vec::new(), MAX_SIGNATURE_BYTES);
        let bundles = bundle_signatures(source, manifest_digest, &mut out, &mut budget)
            .map(|()| (out, budget));
        let simple = simple
            .join()
            .expect("the signature discovery thread panicked");
        Ok::<_, FetchError>((simple?, bundles?))
    })?;
    let used = (MAX_SIGNATURE_BYTES - simple_left) + (MAX_SIGNATURE_BYTES - bundles_left);
    let mut budget = MAX_SIGNATURE_BYTES;
    take_budget(&mut budget, used, source)?;
    let mut out = simple;
    out.extend(bundles);
    Ok(out)
}

/// Whether a failure reading an artifact is the artifact's fault (it then becomes
/// `Unreadable`) rather than the network's or the disk's (an error).
fn artifact_fault(e: &FetchError) -> bool {
    !matches!(e.class, FetchErrorClass::Network | FetchErrorClass::Io)
}

/// Reads a whole blob of at most `limit` bytes (digest and size checked).
fn read_small_blob(
    source: &dyn ImageSource,
    desc: &Descriptor,
    limit: usize,
    what: &str,
) -> Result<Vec<u8>, FetchError> {
    if desc.size > limit as u64 {
        return Err(FetchError::new(
            FetchErrorClass::TooLarge,
            format!("the {what} is {} bytes (limit {limit})", desc.size),
        ));
    }
    let mut bytes = Vec::with_capacity(desc.size as usize);
    open_blob(source, desc)?
        .read_to_end(&mut bytes)
        .map_err(|e| FetchError::from_io(e, &format!("reading {what} {}", desc.digest)))?;
    Ok(bytes)
}

fn take_budget(budget: &mut usize, n: usize, source: &dyn ImageSource) -> Result<(), FetchError> {
    *budget = budget.checked_sub(n).ok_or_else(|| {
        FetchError::new(
            FetchErrorClass::TooLarge,
            format!(
                "{}: the signatures of this image exceed {MAX_SIGNATURE_BYTES} bytes",
                source.describe()
            ),
        )
    })?;
    Ok(())
}

fn simple_signing_signatures(
    source: &dyn ImageSource,
    manifest_digest: &Digest,
    out: &mut Vec<SignatureFormat>,
    budget: &mut usize,
) -> Result<(), FetchError> {
    let sig_tag = ManifestRef::Tag(format!("sha256-{}.sig", manifest_digest.hex()));
    let Some((bytes, mt)) = source.fetch_manifest(&sig_tag)? else {
        return Ok(());
    };
    let mut src = SignatureSource {
        via: Discovery::SignatureTag,
        origin: source.origin(),
        artifact: Some(Digest::of(&bytes)),
        blob: None,
    };
    let unreadable = |source: &SignatureSource, reason: String| SignatureFormat::Unreadable {
        kind: SignatureKind::SimpleSigning,
        source: source.clone(),
        reason,
    };
    let m = match manifest::parse(&bytes, mt.as_deref(), &source.describe()) {
        Ok(ManifestKind::Image(m)) => m,
        Ok(ManifestKind::Index(_)) => {
            out.push(unreadable(
                &src,
                format!(
                    "signature tag {} is an index, not a cosign signature manifest",
                    describe_ref(&sig_tag)
                ),
            ));
            return Ok(());
        }
        Err(e) => {
            out.push(unreadable(&src, e.message));
            return Ok(());
        }
    };
    if m.layers.len() > MAX_SIGNATURE_LAYERS {
        return Err(FetchError::new(
            FetchErrorClass::TooLarge,
            format!(
                "{}: more than {MAX_SIGNATURE_LAYERS} signatures",
                source.describe()
            ),
        ));
    }
    for layer in m
        .layers
        .iter()
        .filter(|l| l.media_type == COSIGN_SIMPLESIGNING)
    {
        src.blob = Some(layer.digest.clone());
        let Some(sig_b64) = layer.annotations.get(COSIGN_SIGNATURE_ANNOTATION) else {
            continue;
        };
        let signature = match base64::engine::general_purpose::STANDARD.decode(sig_b64.trim()) {
            Ok(s) => s,
            Err(e) => {
                out.push(unreadable(
                    &src,
                    format!("the signature annotation is not base64: {e}"),
                ));
                continue;
            }
        };
        let payload = match read_small_blob(
            source,
            layer,
            MAX_SIGNATURE_PAYLOAD as usize,
            "signature payload",
        ) {
            Ok(p) => p,
            Err(e) if artifact_fault(&e) => {
                out.push(unreadable(&src, e.message));
                continue;
            }
            Err(e) => return Err(e),
        };
        take_budget(budget, payload.len(), source)?;
        out.push(SignatureFormat::SimpleSigning(SimpleSigningSignature {
            payload,
            signature,
            source: src.clone(),
        }));
    }
    Ok(())
}

fn bundle_signatures(
    source: &dyn ImageSource,
    manifest_digest: &Digest,
    out: &mut Vec<SignatureFormat>,
    budget: &mut usize,
) -> Result<(), FetchError> {
    // (descriptor, how it was found), without duplicates.
    let mut candidates: Vec<(Descriptor, Discovery)> = Vec::new();
    let mut add = |d: &Descriptor, via: Discovery| -> Result<(), FetchError> {
        // An entry that declares another artifact type (an SBOM, an attestation format)
        // is not opened. cosign 3's entries on the tag schema declare the empty type.
        let maybe_bundle = match d.artifact_type.as_deref() {
            None | Some("") | Some(OCI_EMPTY) => true,
            Some(t) => is_bundle_media_type(t),
        };
        let manifest_type = d.media_type == manifest::OCI_MANIFEST;
        if !maybe_bundle || !manifest_type || candidates.iter().any(|(c, _)| c.digest == d.digest) {
            return Ok(());
        }
        if candidates.len() == MAX_SIGNATURE_REFERRERS {
            return Err(FetchError::new(
                FetchErrorClass::TooLarge,
                format!(
                    "{}: more than {MAX_SIGNATURE_REFERRERS} referrers of {manifest_digest} may be signatures",
                    source.describe()
                ),
            ));
        }
        candidates.push((d.clone(), via));
        Ok(())
    };
    // The tag schema, also where the source lists referrers: an image copied from a registry
    // without the API keeps its signatures there. Both are asked at once (a round trip each).
    let tag = ManifestRef::Tag(format!("sha256-{}", manifest_digest.hex()));
    let (listed, tagged) = std::thread::scope(|scope| {
        let tagged = scope.spawn(|| source.fetch_manifest(&tag));
        let listed = source.referrers(manifest_digest);
        let tagged = tagged
            .join()
            .expect("the referrers tag lookup thread panicked");
        (listed, tagged)
    });
    if let ReferrersLookup::Listed { via, descriptors } = listed? {
        for d in &descriptors {
            add(d, via)?;
        }
    }
    if let Some((bytes, mt)) = tagged? {
        match manifest::parse(&bytes, mt.as_deref(), &source.describe()) {
            Ok(ManifestKind::Index(index)) => {
                for d in &index.manifests {
                    add(d, Discovery::ReferrersTag)?;
                }
            }
            Ok(ManifestKind::Image(_)) => tracing::warn!(
                source = %source.describe(),
                tag = %describe_ref(&tag),
                "the referrers tag holds an image manifest, not an index; ignored"
            ),
            Err(e) => tracing::warn!(
                source = %source.describe(),
                tag = %describe_ref(&tag),
                error = %e,
                "the referrers tag is not a readable index; ignored"
            ),
        }
    }
    for (desc, via) in candidates {
        let src = SignatureSource {
            via,
            origin: source.origin(),
            artifact: Some(desc.digest.clone()),
            blob: None,
        };
        bundles_of_referrer(source, manifest_digest, &desc, src, out, budget)?;
    }
    Ok(())
}

/// Opens one referrer: by digest, bounded; it must be an image manifest whose `subject` is
/// the image and whose artifact type is a bundle; then each bundle layer is read and
/// shape-checked.
fn bundles_of_referrer(
    source: &dyn ImageSource,
    manifest_digest: &Digest,
    desc: &Descriptor,
    mut src: SignatureSource,
    out: &mut Vec<SignatureFormat>,
    budget: &mut usize,
) -> Result<(), FetchError> {
    let declared_bundle = desc
        .artifact_type
        .as_deref()
        .is_some_and(is_bundle_media_type);
    let unreadable = |src: &SignatureSource, reason: String| SignatureFormat::Unreadable {
        kind: SignatureKind::SigstoreBundle,
        source: src.clone(),
        reason,
    };
    if desc.size > MAX_REFERRER_MANIFEST {
        if declared_bundle {
            out.push(unreadable(
                &src,
                format!(
                    "the referrer manifest is {} bytes (limit {MAX_REFERRER_MANIFEST})",
                    desc.size
                ),
            ));
        }
        return Ok(());
    }
    let r = ManifestRef::Digest(desc.digest.clone());
    let parsed = fetch_checked_manifest(source, &r).and_then(|(bytes, mt)| {
        manifest::parse(
            &bytes,
            mt.as_deref().or(Some(&desc.media_type)),
            &source.describe(),
        )
    });
    let m = match parsed {
        Ok(ManifestKind::Image(m)) => m,
        Ok(ManifestKind::Index(_)) => return Ok(()),
        Err(e) if artifact_fault(&e) => {
            // Only a referrer that said it was a bundle is worth reporting; cosign's
            // tag-schema entries say nothing, so one of those that cannot be read is too.
            if declared_bundle || desc.artifact_type.as_deref().is_none_or(|t| t == OCI_EMPTY) {
                out.push(unreadable(
                    &src,
                    format!("the referrer manifest cannot be read: {}", e.message),
                ));
            }
            return Ok(());
        }
        Err(e) => return Err(e),
    };
    if !is_bundle_media_type(m.effective_artifact_type()) {
        return Ok(());
    }
    match &m.subject {
        Some(subject) if &subject.digest == manifest_digest => {}
        Some(subject) => {
            out.push(unreadable(
                &src,
                format!(
                    "its subject is {}, not the image {manifest_digest}",
                    subject.digest
                ),
            ));
            return Ok(());
        }
        None => {
            out.push(unreadable(&src, "the referrer has no subject".to_string()));
            return Ok(());
        }
    }
    let layers: Vec<&Descriptor> = m
        .layers
        .iter()
        .filter(|l| is_bundle_media_type(&l.media_type))
        .collect();
    if layers.is_empty() {
        out.push(unreadable(
            &src,
            format!(
                "the referrer of artifact type {} has no bundle layer",
                m.effective_artifact_type()
            ),
        ));
        return Ok(());
    }
    if layers.len() > MAX_SIGNATURE_LAYERS {
        out.push(unreadable(
            &src,
            format!("more than {MAX_SIGNATURE_LAYERS} bundle layers"),
        ));
        return Ok(());
    }
    for layer in layers {
        src.blob = Some(layer.digest.clone());
        let bytes = match read_small_blob(source, layer, MAX_BUNDLE_LEN, "bundle") {
            Ok(b) => b,
            Err(e) if artifact_fault(&e) => {
                out.push(unreadable(&src, e.message));
                continue;
            }
            Err(e) => return Err(e),
        };
        take_budget(budget, bytes.len(), source)?;
        match UntrustedBundle::parse(&bytes, &layer.media_type) {
            Ok(_) => out.push(SignatureFormat::SigstoreBundle(SigstoreBundleArtifact {
                media_type: layer.media_type.clone(),
                bytes,
                source: src.clone(),
            })),
            Err(e) => out.push(unreadable(&src, e.to_string())),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Mutex;

    use policy::sigstore::SIGSTORE_BUNDLE_V03;
    use serde_json::json;

    use super::*;

    /// A registry in memory: tags, manifests and blobs by digest, and optionally a
    /// referrers API.
    #[derive(Default)]
    struct MemSource {
        tags: BTreeMap<String, Digest>,
        manifests: BTreeMap<Digest, (Vec<u8>, String)>,
        blobs: BTreeMap<Digest, Vec<u8>>,
        referrers_api: Option<Vec<Descriptor>>,
        fetched: Mutex<Vec<String>>,
    }

    impl MemSource {
        fn blob(&mut self, bytes: &[u8]) -> serde_json::Value {
            let d = Digest::of(bytes);
            self.blobs.insert(d.clone(), bytes.to_vec());
            json!({"digest": d.to_string(), "size": bytes.len()})
        }

        fn manifest(&mut self, value: serde_json::Value, media_type: &str) -> (Digest, usize) {
            let bytes = serde_json::to_vec(&value).unwrap();
            let d = Digest::of(&bytes);
            let len = bytes.len();
            self.manifests
                .insert(d.clone(), (bytes, media_type.to_string()));
            (d, len)
        }

        /// A cosign 3 style referrer of `subject` whose bundle layer holds `bundle`.
        fn referrer(&mut self, subject: &Digest, bundle: &[u8]) -> Descriptor {
            let config = self.blob(b"{}");
            let mut layer = self.blob(bundle);
            layer["mediaType"] = json!(SIGSTORE_BUNDLE_V03);
            let mut config = config;
            config["mediaType"] = json!(OCI_EMPTY);
            let (d, size) = self.manifest(
                json!({
                    "schemaVersion": 2,
                    "mediaType": manifest::OCI_MANIFEST,
                    "artifactType": SIGSTORE_BUNDLE_V03,
                    "config": config,
                    "layers": [layer],
                    "subject": {"mediaType": manifest::OCI_MANIFEST, "digest": subject.to_string(), "size": 10},
                }),
                manifest::OCI_MANIFEST,
            );
            Descriptor {
                media_type: manifest::OCI_MANIFEST.into(),
                digest: d,
                size: size as u64,
                annotations: BTreeMap::new(),
                platform: None,
                // What cosign 3 writes in the tag-schema index.
                artifact_type: Some(OCI_EMPTY.into()),
            }
        }

        fn tag_index(&mut self, subject: &Digest, entries: &[Descriptor]) {
            let manifests: Vec<_> = entries
                .iter()
                .map(|d| {
                    json!({"mediaType": d.media_type, "digest": d.digest.to_string(), "size": d.size, "artifactType": d.artifact_type})
                })
                .collect();
            let (d, _) = self.manifest(
                json!({"schemaVersion": 2, "mediaType": manifest::OCI_INDEX, "manifests": manifests}),
                manifest::OCI_INDEX,
            );
            self.tags.insert(format!("sha256-{}", subject.hex()), d);
        }
    }

    impl ImageSource for MemSource {
        fn describe(&self) -> String {
            "mem://reg/app".into()
        }
        fn origin(&self) -> String {
            "reg/app".into()
        }
        fn root_ref(&self) -> ManifestRef {
            ManifestRef::Tag("v1".into())
        }
        fn fetch_manifest(&self, r: &ManifestRef) -> Result<Option<RawManifest>, FetchError> {
            self.fetched.lock().unwrap().push(describe_ref(r));
            let d = match r {
                ManifestRef::Tag(t) => match self.tags.get(t) {
                    Some(d) => d.clone(),
                    None => return Ok(None),
                },
                ManifestRef::Digest(d) => d.clone(),
                ManifestRef::Default => return Ok(None),
            };
            Ok(self
                .manifests
                .get(&d)
                .map(|(b, mt)| (b.clone(), Some(mt.clone()))))
        }
        fn open_blob_raw(&self, digest: &Digest) -> Result<Box<dyn Read + Send>, FetchError> {
            let b = self.blobs.get(digest).cloned().ok_or_else(|| {
                FetchError::new(FetchErrorClass::NotFound, format!("blob {digest}"))
            })?;
            Ok(Box::new(io::Cursor::new(b)))
        }
        fn referrers(&self, _: &Digest) -> Result<ReferrersLookup, FetchError> {
            Ok(match &self.referrers_api {
                Some(d) => ReferrersLookup::Listed {
                    via: Discovery::ReferrersApi,
                    descriptors: d.clone(),
                },
                None => ReferrersLookup::NotSupported,
            })
        }
    }

    fn image() -> Digest {
        Digest::of(b"image manifest")
    }

    fn bundle_json(subject: &Digest) -> Vec<u8> {
        use base64::Engine;
        let statement = json!({
            "_type": "https://in-toto.io/Statement/v1",
            "subject": [{"digest": {"sha256": subject.hex()}}],
            "predicateType": policy::sigstore::COSIGN_SIGN_PREDICATE,
            "predicate": {},
        });
        serde_json::to_vec(&json!({
            "mediaType": SIGSTORE_BUNDLE_V03,
            "verificationMaterial": {"publicKey": {"hint": "x"}},
            "dsseEnvelope": {
                "payload": base64::engine::general_purpose::STANDARD.encode(statement.to_string()),
                "payloadType": "application/vnd.in-toto+json",
                "signatures": [{"sig": "MEUCIQ=="}],
            },
        }))
        .unwrap()
    }

    fn bundles(sigs: &[SignatureFormat]) -> Vec<&SigstoreBundleArtifact> {
        sigs.iter()
            .filter_map(|s| match s {
                SignatureFormat::SigstoreBundle(b) => Some(b),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn the_tag_schema_finds_cosign3_bundles_when_there_is_no_referrers_api() {
        let mut src = MemSource::default();
        let bundle = bundle_json(&image());
        let r = src.referrer(&image(), &bundle);
        src.tag_index(&image(), std::slice::from_ref(&r));
        let sigs = signatures(&src, &image()).unwrap();
        let b = bundles(&sigs);
        assert_eq!(b.len(), 1, "{sigs:?}");
        assert_eq!(b[0].media_type, SIGSTORE_BUNDLE_V03);
        assert_eq!(b[0].bytes, bundle);
        assert_eq!(b[0].source.via, Discovery::ReferrersTag);
        assert_eq!(b[0].source.artifact.as_ref(), Some(&r.digest));
        assert_eq!(b[0].source.origin, "reg/app");
    }

    #[test]
    fn the_referrers_api_and_the_tag_schema_are_both_read_without_duplicates() {
        let mut src = MemSource::default();
        let first = src.referrer(&image(), &bundle_json(&image()));
        let mut listed = first.clone();
        listed.artifact_type = Some(SIGSTORE_BUNDLE_V03.into());
        // An SBOM referrer is not opened.
        let sbom = Descriptor {
            artifact_type: Some("application/spdx+json".into()),
            digest: Digest::of(b"sbom"),
            ..listed.clone()
        };
        src.referrers_api = Some(vec![listed, sbom.clone()]);
        let mut other_bundle = bundle_json(&image());
        other_bundle.push(b'\n');
        let second = src.referrer(&image(), &other_bundle);
        src.tag_index(&image(), &[first.clone(), second.clone()]);
        let sigs = signatures(&src, &image()).unwrap();
        let b = bundles(&sigs);
        assert_eq!(b.len(), 2, "{sigs:?}");
        assert_eq!(b[0].source.via, Discovery::ReferrersApi);
        assert_eq!(b[0].source.artifact.as_ref(), Some(&first.digest));
        assert_eq!(b[1].source.via, Discovery::ReferrersTag);
        assert_eq!(b[1].source.artifact.as_ref(), Some(&second.digest));
        assert!(!src
            .fetched
            .lock()
            .unwrap()
            .contains(&sbom.digest.to_string()));
    }

    #[test]
    fn unreadable_referrers_are_named_and_counted_as_signatures() {
        let mut src = MemSource::default();
        let not_json = src.referrer(&image(), b"\x1f\x8b not json");
        let wrong_subject = src.referrer(&image(), &bundle_json(&image()));
        // Rewrite the second's subject: another image's signature listed under this one.
        let (bytes, mt) = src.manifests[&wrong_subject.digest].clone();
        let mut v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        v["subject"]["digest"] = json!(Digest::of(b"other").to_string());
        let (d, size) = src.manifest(v, &mt);
        let wrong_subject = Descriptor {
            digest: d,
            size: size as u64,
            ..wrong_subject
        };
        let missing = Descriptor {
            digest: Digest::of(b"gone"),
            ..not_json.clone()
        };
        let too_big = src.referrer(&image(), &vec![b' '; MAX_BUNDLE_LEN + 1]);
        src.tag_index(
            &image(),
            &[not_json.clone(), wrong_subject, missing, too_big],
        );
        let sigs = signatures(&src, &image()).unwrap();
        let reasons: Vec<String> = sigs
            .iter()
            .map(|s| match s {
                SignatureFormat::Unreadable {
                    kind: SignatureKind::SigstoreBundle,
                    source,
                    reason,
                } => format!("{source}: {reason}"),
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(reasons.len(), 4, "{reasons:#?}");
        assert!(reasons[0].starts_with(&format!(
            "referrer {} (referrers tag schema) of reg/app, layer sha256:",
            not_json.digest
        )));
        assert!(
            reasons[0].contains(": the layer is not JSON"),
            "{}",
            reasons[0]
        );
        assert!(reasons[1].contains("its subject is"), "{}", reasons[1]);
        assert!(
            reasons[2].contains("the referrer manifest cannot be read"),
            "{}",
            reasons[2]
        );
        assert!(reasons[3].contains("limit 1048576"), "{}", reasons[3]);
        assert_eq!(sigs[0].describe().split(' ').next(), Some("unreadable"));
    }

    #[test]
    fn counts_are_bounded() {
        let mut src = MemSource::default();
        let entries: Vec<Descriptor> = (0..=MAX_SIGNATURE_REFERRERS)
            .map(|i| {
                let mut b = bundle_json(&image());
                b.extend(std::iter::repeat_n(b' ', i));
                src.referrer(&image(), &b)
            })
            .collect();
        src.tag_index(&image(), &entries);
        let e = signatures(&src, &image()).unwrap_err();
        assert_eq!(e.class, FetchErrorClass::TooLarge, "{e}");
        assert!(e.message.contains("more than 32 referrers"), "{e}");
    }

    #[test]
    fn an_oci_layout_lists_referrers_by_subject() {
        let dir = tempfile::tempdir().unwrap();
        let mut src = MemSource::default();
        let r = src.referrer(&image(), &bundle_json(&image()));
        let blobs = dir.path().join("blobs/sha256");
        std::fs::create_dir_all(&blobs).unwrap();
        for (d, b) in &src.blobs {
            std::fs::write(blobs.join(d.hex()), b).unwrap();
        }
        for (d, (b, _)) in &src.manifests {
            std::fs::write(blobs.join(d.hex()), b).unwrap();
        }
        std::fs::write(
            dir.path().join("oci-layout"),
            r#"{"imageLayoutVersion":"1.0.0"}"#,
        )
        .unwrap();
        std::fs::write(
            dir.path().join("index.json"),
            serde_json::to_vec(&json!({
                "schemaVersion": 2,
                "manifests": [{"mediaType": manifest::OCI_MANIFEST, "digest": r.digest.to_string(), "size": r.size}],
            }))
            .unwrap(),
        )
        .unwrap();
        let reference =
            policy::reference::ImageReference::parse(&format!("oci:{}:x", dir.path().display()))
                .unwrap();
        let policy::reference::ImageReference::Oci(oci) = &reference else {
            panic!()
        };
        let layout = OciLayoutSource::open(oci).unwrap();
        let sigs = signatures(&layout, &image()).unwrap();
        let b = bundles(&sigs);
        assert_eq!(b.len(), 1, "{sigs:?}");
        assert_eq!(b[0].source.via, Discovery::LayoutReferrer);
        assert_eq!(b[0].source.artifact.as_ref(), Some(&r.digest));
        // Another image has none.
        assert!(signatures(&layout, &Digest::of(b"other"))
            .unwrap()
            .is_empty());
    }
}
