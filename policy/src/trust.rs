//! The image trust policy: containers-policy.json(5).
//!
//! Parsing is strict: unknown requirement types, identity rules, transports and fields are
//! errors that name their JSON path, so a typo cannot silently weaken a policy. Evaluation is
//! pure: (policy, reference, manifest digest, untrusted signatures) -> [`Decision`].

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_json::{Map, Value};

use crate::reference::{Digest, DockerReference, ImageReference, ReferenceError, Transport};
use crate::sigstore::{SignatureFormat, SimpleSigningPayload, VerificationKey};

/// A parse or load error, with the file and JSON path it is about.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{origin}: {path}: {message}")]
pub struct PolicyError {
    pub origin: String,
    /// JSON path (`transports.docker."".[0].type`) or `line L column C`.
    pub path: String,
    pub message: String,
}

/// A parsed policy.
#[derive(Clone, Debug)]
pub struct Policy {
    origin: String,
    default: Vec<Requirement>,
    transports: BTreeMap<&'static str, BTreeMap<String, Vec<Requirement>>>,
}

#[derive(Clone, Debug)]
pub enum Requirement {
    Reject,
    InsecureAcceptAnything,
    SigstoreSigned(SigstoreSigned),
}

#[derive(Clone, Debug)]
pub struct SigstoreSigned {
    pub keys: Vec<VerificationKey>,
    pub identity: IdentityRule,
}

/// `signedIdentity`: how the signature's claimed identity must relate to the image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IdentityRule {
    MatchRepoDigestOrExact,
    MatchRepository,
    MatchExact,
    ExactReference(DockerReference),
    ExactRepository(String),
    RemapIdentity {
        prefix: String,
        signed_prefix: String,
    },
}

impl fmt::Display for IdentityRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IdentityRule::MatchRepoDigestOrExact => write!(f, "matchRepoDigestOrExact"),
            IdentityRule::MatchRepository => write!(f, "matchRepository"),
            IdentityRule::MatchExact => write!(f, "matchExact"),
            IdentityRule::ExactReference(r) => write!(f, "exactReference {r}"),
            IdentityRule::ExactRepository(r) => write!(f, "exactRepository {r}"),
            IdentityRule::RemapIdentity {
                prefix,
                signed_prefix,
            } => write!(f, "remapIdentity {prefix} -> {signed_prefix}"),
        }
    }
}

impl fmt::Display for Requirement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Requirement::Reject => write!(f, "reject every image"),
            Requirement::InsecureAcceptAnything => write!(f, "accept any image, signed or not"),
            Requirement::SigstoreSigned(s) => write!(
                f,
                "needs a sigstore signature by one of {} key(s) ({}) with identity rule {}",
                s.keys.len(),
                s.keys
                    .iter()
                    .map(|k| k.fingerprint())
                    .collect::<Vec<_>>()
                    .join(", "),
                s.identity
            ),
        }
    }
}

struct Ctx<'a> {
    origin: &'a str,
    base_dir: Option<&'a Path>,
}

impl Ctx<'_> {
    fn err(&self, path: &str, message: impl Into<String>) -> PolicyError {
        PolicyError {
            origin: self.origin.to_string(),
            path: path.to_string(),
            message: message.into(),
        }
    }

    fn object<'v>(&self, v: &'v Value, path: &str) -> Result<&'v Map<String, Value>, PolicyError> {
        v.as_object()
            .ok_or_else(|| self.err(path, format!("expected an object, found {}", kind(v))))
    }

    fn string<'v>(
        &self,
        obj: &'v Map<String, Value>,
        key: &str,
        path: &str,
    ) -> Result<&'v str, PolicyError> {
        match obj.get(key) {
            Some(Value::String(s)) => Ok(s),
            Some(v) => Err(self.err(
                &format!("{path}.{key}"),
                format!("expected a string, found {}", kind(v)),
            )),
            None => Err(self.err(path, format!("missing field {key:?}"))),
        }
    }

    fn only_fields(
        &self,
        obj: &Map<String, Value>,
        allowed: &[&str],
        path: &str,
    ) -> Result<(), PolicyError> {
        for k in obj.keys() {
            if !allowed.contains(&k.as_str()) {
                return Err(self.err(
                    &format!("{path}.{k}"),
                    format!("unknown field {k:?} (allowed here: {})", allowed.join(", ")),
                ));
            }
        }
        Ok(())
    }
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

impl Policy {
    /// Reads and parses a policy file. Relative `keyPath`s resolve against the file's directory.
    pub fn from_file(path: &Path) -> Result<Self, PolicyError> {
        let origin = path.display().to_string();
        let bytes = std::fs::read(path).map_err(|e| PolicyError {
            origin: origin.clone(),
            path: "file".into(),
            message: format!("cannot read: {e}"),
        })?;
        Self::parse(&bytes, &origin, path.parent())
    }

    /// Parses policy JSON; `origin` names it in errors; relative key paths resolve against
    /// `base_dir`, and are refused when it is `None`.
    pub fn parse(bytes: &[u8], origin: &str, base_dir: Option<&Path>) -> Result<Self, PolicyError> {
        let ctx = Ctx { origin, base_dir };
        let value: Value = serde_json::from_slice(bytes).map_err(|e| {
            ctx.err(
                &format!("line {} column {}", e.line(), e.column()),
                format!("invalid JSON: {e}"),
            )
        })?;
        let root = ctx.object(&value, "$")?;
        ctx.only_fields(root, &["default", "transports"], "$")?;
        let default = match root.get("default") {
            Some(v) => parse_requirements(&ctx, v, "default")?,
            None => {
                return Err(ctx.err(
                    "$",
                    "missing field \"default\" (it decides for every unmatched image)",
                ))
            }
        };
        let mut transports = BTreeMap::new();
        if let Some(t) = root.get("transports") {
            for (name, scopes) in ctx.object(t, "transports")? {
                let transport = match name.as_str() {
                    "docker" => Transport::Docker,
                    "oci" => Transport::Oci,
                    "dir" => Transport::Dir,
                    other => {
                        return Err(ctx.err(
                            &format!("transports.{other}"),
                            format!(
                                "unsupported transport {other:?} (supported: docker, oci, dir)"
                            ),
                        ))
                    }
                };
                let path = format!("transports.{name}");
                let mut by_scope = BTreeMap::new();
                for (scope, reqs) in ctx.object(scopes, &path)? {
                    let spath = format!("{path}.{scope:?}");
                    validate_scope(&ctx, transport, scope, &spath)?;
                    by_scope.insert(scope.clone(), parse_requirements(&ctx, reqs, &spath)?);
                }
                transports.insert(transport.name(), by_scope);
            }
        }
        Ok(Self {
            origin: origin.to_string(),
            default,
            transports,
        })
    }

    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// The requirements for `reference`: the most specific matching scope of its transport,
    /// else the transport's `""` scope, else the global `default`.
    pub fn requirements_for(&self, reference: &ImageReference) -> Evaluation<'_> {
        let transport = reference.transport();
        if let Some(scopes) = self.transports.get(transport.name()) {
            for scope in reference.policy_scopes() {
                if let Some(reqs) = scopes.get(&scope) {
                    return Evaluation {
                        scope: format!("transports.{}.{scope:?}", transport.name()),
                        requirements: reqs,
                    };
                }
            }
            if let Some(reqs) = scopes.get("") {
                return Evaluation {
                    scope: format!("transports.{}.\"\"", transport.name()),
                    requirements: reqs,
                };
            }
        }
        Evaluation {
            scope: "default".to_string(),
            requirements: &self.default,
        }
    }

    /// Decides on an image: all requirements of its scope must be met.
    pub fn evaluate(
        &self,
        reference: &ImageReference,
        manifest_digest: &Digest,
        signatures: &[SignatureFormat],
    ) -> Decision {
        self.requirements_for(reference)
            .evaluate(reference, manifest_digest, signatures)
    }
}

fn validate_scope(
    ctx: &Ctx,
    transport: Transport,
    scope: &str,
    path: &str,
) -> Result<(), PolicyError> {
    if scope.is_empty() {
        return Ok(());
    }
    match transport {
        Transport::Docker => {
            if let Some(domain) = scope.strip_prefix("*.") {
                let ok = !domain.is_empty()
                    && domain.split('.').all(|l| {
                        !l.is_empty() && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                    });
                if !ok {
                    return Err(ctx.err(path, format!("invalid wildcard scope {scope:?}")));
                }
                return Ok(());
            }
            // A scope is a full reference, a repository, a namespace or a host.
            let as_ref = DockerReference::parse_name_only_allowed(scope).is_ok();
            let as_host = !scope.contains('/') && !scope.contains('@');
            if !as_ref && !as_host {
                return Err(ctx.err(path, format!("invalid docker scope {scope:?}")));
            }
            if as_ref
                && !scope.contains('/')
                && !scope.contains('.')
                && !scope.contains(':')
                && scope != "localhost"
            {
                return Err(ctx.err(
                    path,
                    format!("docker scope {scope:?} must name its registry (e.g. docker.io/library/{scope})"),
                ));
            }
            Ok(())
        }
        Transport::Oci | Transport::Dir => {
            if !scope.starts_with('/') {
                return Err(ctx.err(
                    path,
                    format!(
                        "{} scope {scope:?} must be an absolute path",
                        transport.name()
                    ),
                ));
            }
            Ok(())
        }
    }
}

fn parse_requirements(ctx: &Ctx, v: &Value, path: &str) -> Result<Vec<Requirement>, PolicyError> {
    let list = v.as_array().ok_or_else(|| {
        ctx.err(
            path,
            format!("expected an array of requirements, found {}", kind(v)),
        )
    })?;
    if list.is_empty() {
        return Err(ctx.err(
            path,
            "empty requirement list (use [{\"type\":\"reject\"}] to reject)",
        ));
    }
    list.iter()
        .enumerate()
        .map(|(i, r)| parse_requirement(ctx, r, &format!("{path}.[{i}]")))
        .collect()
}

fn parse_requirement(ctx: &Ctx, v: &Value, path: &str) -> Result<Requirement, PolicyError> {
    let obj = ctx.object(v, path)?;
    let ty = ctx.string(obj, "type", path)?;
    match ty {
        "reject" => {
            ctx.only_fields(obj, &["type"], path)?;
            Ok(Requirement::Reject)
        }
        "insecureAcceptAnything" => {
            ctx.only_fields(obj, &["type"], path)?;
            Ok(Requirement::InsecureAcceptAnything)
        }
        "sigstoreSigned" => {
            for unsupported in ["fulcio", "rekorPublicKeyPath", "rekorPublicKeyData", "pki"] {
                if obj.contains_key(unsupported) {
                    return Err(ctx.err(
                        &format!("{path}.{unsupported}"),
                        format!("{unsupported} (keyless / transparency-log verification) is not supported yet"),
                    ));
                }
            }
            ctx.only_fields(obj, &["type", "keyPath", "keyPaths", "keyData", "signedIdentity"], path)?;
            let sources = ["keyPath", "keyPaths", "keyData"].iter().filter(|k| obj.contains_key(**k)).count();
            if sources != 1 {
                return Err(ctx.err(path, "sigstoreSigned needs exactly one of keyPath, keyPaths, keyData"));
            }
            let mut keys = Vec::new();
            if obj.contains_key("keyPath") {
                let p = ctx.string(obj, "keyPath", path)?;
                keys.extend(load_key_file(ctx, p, &format!("{path}.keyPath"))?);
            } else if let Some(list) = obj.get("keyPaths") {
                let kp = format!("{path}.keyPaths");
                let arr = list.as_array().ok_or_else(|| ctx.err(&kp, "expected an array of paths"))?;
                if arr.is_empty() {
                    return Err(ctx.err(&kp, "empty keyPaths"));
                }
                for (i, p) in arr.iter().enumerate() {
                    let p = p.as_str().ok_or_else(|| ctx.err(&format!("{kp}.[{i}]"), "expected a string"))?;
                    keys.extend(load_key_file(ctx, p, &format!("{kp}.[{i}]"))?);
                }
            } else {
                let kd = format!("{path}.keyData");
                let data = ctx.string(obj, "keyData", path)?;
                use base64::Engine;
                let pem = base64::engine::general_purpose::STANDARD
                    .decode(data)
                    .map_err(|e| ctx.err(&kd, format!("keyData is not base64: {e}")))?;
                keys = VerificationKey::from_pem(&pem).map_err(|e| ctx.err(&kd, e.to_string()))?;
            }
            let identity = match obj.get("signedIdentity") {
                None => IdentityRule::MatchRepoDigestOrExact,
                Some(v) => parse_identity(ctx, v, &format!("{path}.signedIdentity"))?,
            };
            Ok(Requirement::SigstoreSigned(SigstoreSigned { keys, identity }))
        }
        "signedBy" => Err(ctx.err(
            &format!("{path}.type"),
            "signedBy (GPG simple signing) is not supported; use sigstoreSigned",
        )),
        other => Err(ctx.err(
            &format!("{path}.type"),
            format!("unknown requirement type {other:?} (reject, insecureAcceptAnything, sigstoreSigned)"),
        )),
    }
}

fn load_key_file(ctx: &Ctx, p: &str, path: &str) -> Result<Vec<VerificationKey>, PolicyError> {
    let mut file = PathBuf::from(p);
    if file.is_relative() {
        match ctx.base_dir {
            Some(base) => file = base.join(file),
            None => return Err(ctx.err(path, format!("key path {p:?} must be absolute"))),
        }
    }
    let pem = std::fs::read(&file)
        .map_err(|e| ctx.err(path, format!("cannot read key {}: {e}", file.display())))?;
    VerificationKey::from_pem(&pem).map_err(|e| ctx.err(path, format!("{}: {e}", file.display())))
}

fn parse_identity(ctx: &Ctx, v: &Value, path: &str) -> Result<IdentityRule, PolicyError> {
    let obj = ctx.object(v, path)?;
    let ty = ctx.string(obj, "type", path)?;
    let rule = match ty {
        "matchRepoDigestOrExact" => IdentityRule::MatchRepoDigestOrExact,
        "matchRepository" => IdentityRule::MatchRepository,
        "matchExact" => IdentityRule::MatchExact,
        "exactReference" => {
            ctx.only_fields(obj, &["type", "dockerReference"], path)?;
            let r = ctx.string(obj, "dockerReference", path)?;
            let parsed = DockerReference::parse_name_only_allowed(r)
                .map_err(|e| ctx.err(&format!("{path}.dockerReference"), e.to_string()))?;
            if parsed.tag().is_none() && parsed.digest().is_none() {
                return Err(ctx.err(
                    &format!("{path}.dockerReference"),
                    "exactReference needs a tag or digest",
                ));
            }
            return Ok(IdentityRule::ExactReference(parsed));
        }
        "exactRepository" => {
            ctx.only_fields(obj, &["type", "dockerRepository"], path)?;
            let r = ctx.string(obj, "dockerRepository", path)?;
            let parsed = DockerReference::parse_name_only_allowed(r)
                .map_err(|e| ctx.err(&format!("{path}.dockerRepository"), e.to_string()))?;
            if parsed.tag().is_some() || parsed.digest().is_some() {
                return Err(ctx.err(
                    &format!("{path}.dockerRepository"),
                    "exactRepository takes a repository without tag or digest",
                ));
            }
            return Ok(IdentityRule::ExactRepository(parsed.repository()));
        }
        "remapIdentity" => {
            ctx.only_fields(obj, &["type", "prefix", "signedPrefix"], path)?;
            let prefix = ctx.string(obj, "prefix", path)?.to_string();
            let signed_prefix = ctx.string(obj, "signedPrefix", path)?.to_string();
            for (k, p) in [("prefix", &prefix), ("signedPrefix", &signed_prefix)] {
                let ok =
                    !p.is_empty() && !p.ends_with('/') && !p.contains('@') && !p.starts_with("*.");
                if !ok {
                    return Err(ctx.err(&format!("{path}.{k}"), format!("invalid prefix {p:?}")));
                }
            }
            return Ok(IdentityRule::RemapIdentity {
                prefix,
                signed_prefix,
            });
        }
        other => {
            return Err(ctx.err(
                &format!("{path}.type"),
                format!("unknown signedIdentity type {other:?}"),
            ))
        }
    };
    ctx.only_fields(obj, &["type"], path)?;
    Ok(rule)
}

/// The requirements that apply to one image and the scope that selected them.
#[derive(Clone, Debug)]
pub struct Evaluation<'p> {
    pub scope: String,
    pub requirements: &'p [Requirement],
}

/// Why an image was rejected, as a stable machine-readable class.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RejectClass {
    NoSignature,
    UnsupportedSignatureFormat,
    WrongKey,
    MalformedSignature,
    DigestMismatch,
    IdentityMismatch,
    RejectedByPolicy,
}

impl RejectClass {
    pub fn as_str(self) -> &'static str {
        match self {
            RejectClass::NoSignature => "no-signature",
            RejectClass::UnsupportedSignatureFormat => "unsupported-signature-format",
            RejectClass::WrongKey => "wrong-key",
            RejectClass::MalformedSignature => "malformed-signature",
            RejectClass::DigestMismatch => "digest-mismatch",
            RejectClass::IdentityMismatch => "identity-mismatch",
            RejectClass::RejectedByPolicy => "rejected-by-policy",
        }
    }
}

/// The outcome of evaluating a policy for one image.
#[derive(Clone, Debug, Serialize)]
pub struct Decision {
    pub allowed: bool,
    /// The scope whose requirements decided (`default` if none matched).
    pub scope: String,
    /// What decided, in words a person can act on.
    pub reason: String,
    pub class: Option<RejectClass>,
}

impl Evaluation<'_> {
    pub fn evaluate(
        &self,
        reference: &ImageReference,
        manifest_digest: &Digest,
        signatures: &[SignatureFormat],
    ) -> Decision {
        let mut reasons = Vec::new();
        for req in self.requirements {
            match req {
                Requirement::Reject => {
                    return self.deny(
                        RejectClass::RejectedByPolicy,
                        format!("policy scope {} rejects every image", self.scope),
                    )
                }
                Requirement::InsecureAcceptAnything => reasons
                    .push("accepted without signature check (insecureAcceptAnything)".to_string()),
                Requirement::SigstoreSigned(s) => {
                    match check_sigstore(s, reference, manifest_digest, signatures) {
                        Ok(reason) => reasons.push(reason),
                        Err((class, reason)) => return self.deny(class, reason),
                    }
                }
            }
        }
        Decision {
            allowed: true,
            scope: self.scope.clone(),
            reason: reasons.join("; "),
            class: None,
        }
    }

    fn deny(&self, class: RejectClass, reason: String) -> Decision {
        Decision {
            allowed: false,
            scope: self.scope.clone(),
            reason,
            class: Some(class),
        }
    }
}

fn check_sigstore(
    req: &SigstoreSigned,
    reference: &ImageReference,
    manifest_digest: &Digest,
    signatures: &[SignatureFormat],
) -> Result<String, (RejectClass, String)> {
    if signatures.is_empty() {
        return Err((
            RejectClass::NoSignature,
            format!("a signature is required but none exists for {manifest_digest}"),
        ));
    }
    let keys = req
        .keys
        .iter()
        .map(|k| k.fingerprint())
        .collect::<Vec<_>>()
        .join(", ");
    // The failure that got furthest decides the class.
    let mut worst: Option<(RejectClass, String)> = None;
    let mut note = |class: RejectClass, msg: String| {
        if worst.as_ref().is_none_or(|(c, _)| class > *c) {
            worst = Some((class, msg));
        }
    };
    for (i, sig) in signatures.iter().enumerate() {
        let sig = match sig {
            SignatureFormat::SimpleSigning(s) => s,
            SignatureFormat::SigstoreBundleV03 { media_type, .. } => {
                note(
                    RejectClass::UnsupportedSignatureFormat,
                    format!("signature #{i} is a sigstore bundle v0.3 (DSSE/in-toto, {media_type}), which is not verified yet"),
                );
                continue;
            }
        };
        let Some(key) = req
            .keys
            .iter()
            .find(|k| k.verify(&sig.payload, &sig.signature))
        else {
            note(
                RejectClass::WrongKey,
                format!("no signature verifies with the accepted key(s) {keys}"),
            );
            continue;
        };
        let payload = match SimpleSigningPayload::parse(&sig.payload) {
            Ok(p) => p,
            Err(e) => {
                note(
                    RejectClass::MalformedSignature,
                    format!("signature #{i}: {e}"),
                );
                continue;
            }
        };
        if &payload.docker_manifest_digest != manifest_digest {
            note(
                RejectClass::DigestMismatch,
                format!(
                    "signature #{i} is for manifest {}, not the fetched manifest {manifest_digest}",
                    payload.docker_manifest_digest
                ),
            );
            continue;
        }
        match identity_matches(&req.identity, reference, &payload.docker_reference) {
            Ok(()) => {
                return Ok(format!(
                    "signature by key {} for {} matches identity rule {}",
                    key.fingerprint(),
                    payload.docker_reference,
                    req.identity
                ))
            }
            Err(e) => note(
                RejectClass::IdentityMismatch,
                format!("signature #{i}: {e}"),
            ),
        }
    }
    Err(worst.expect("at least one signature was examined"))
}

/// Checks a signature's claimed identity against the image under a `signedIdentity` rule.
/// Why a signature's claimed identity does not match the image under a `signedIdentity`
/// rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    #[error("signed identity {signed:?} is not a docker reference: {source}")]
    NotADockerReference {
        signed: String,
        #[source]
        source: ReferenceError,
    },
    #[error("identity rule {rule} needs the image's own docker reference, which a {transport} reference has not; use exactReference or exactRepository")]
    NoDockerReference {
        rule: String,
        transport: &'static str,
    },
    #[error("image {0} has neither tag nor digest")]
    NoTagNorDigest(String),
    #[error("signed identity {signed} is not exactly {image}")]
    NotExactly { signed: String, image: String },
    #[error("signed repository {signed} is not {image}")]
    OtherRepository { signed: String, image: String },
    #[error("signed identity {signed} is not the required {required}")]
    NotTheRequiredReference { signed: String, required: String },
    #[error("signed repository {signed} is not the required {required}")]
    NotTheRequiredRepository { signed: String, required: String },
    #[error("remapped identity {remapped:?}: {source}")]
    Remapped {
        remapped: String,
        #[source]
        source: ReferenceError,
    },
}

pub fn identity_matches(
    rule: &IdentityRule,
    image: &ImageReference,
    signed: &str,
) -> Result<(), IdentityError> {
    let signed_ref = DockerReference::parse_name_only_allowed(signed).map_err(|source| {
        IdentityError::NotADockerReference {
            signed: signed.to_string(),
            source,
        }
    })?;
    let need_image = || {
        image
            .docker_reference()
            .ok_or_else(|| IdentityError::NoDockerReference {
                rule: rule.to_string(),
                transport: image.transport().name(),
            })
    };
    let other_repository = |img: &DockerReference| IdentityError::OtherRepository {
        signed: signed_ref.repository().to_string(),
        image: img.repository().to_string(),
    };
    let exact = |img: &DockerReference| -> Result<(), IdentityError> {
        if img.tag().is_none() && img.digest().is_none() {
            return Err(IdentityError::NoTagNorDigest(img.to_string()));
        }
        if img.to_string() == signed_ref.to_string() {
            Ok(())
        } else {
            Err(IdentityError::NotExactly {
                signed: signed_ref.to_string(),
                image: img.to_string(),
            })
        }
    };
    let repo_digest_or_exact = |img: &DockerReference| -> Result<(), IdentityError> {
        if img.digest().is_some() && img.tag().is_none() {
            if img.repository() == signed_ref.repository() {
                Ok(())
            } else {
                Err(other_repository(img))
            }
        } else {
            exact(img)
        }
    };
    match rule {
        IdentityRule::MatchExact => exact(need_image()?),
        IdentityRule::MatchRepoDigestOrExact => repo_digest_or_exact(need_image()?),
        IdentityRule::MatchRepository => {
            let img = need_image()?;
            if img.repository() == signed_ref.repository() {
                Ok(())
            } else {
                Err(other_repository(img))
            }
        }
        IdentityRule::ExactReference(want) => {
            if want.to_string() == signed_ref.to_string() {
                Ok(())
            } else {
                Err(IdentityError::NotTheRequiredReference {
                    signed: signed_ref.to_string(),
                    required: want.to_string(),
                })
            }
        }
        IdentityRule::ExactRepository(want) => {
            if *want == signed_ref.repository() {
                Ok(())
            } else {
                Err(IdentityError::NotTheRequiredRepository {
                    signed: signed_ref.repository().to_string(),
                    required: want.to_string(),
                })
            }
        }
        IdentityRule::RemapIdentity {
            prefix,
            signed_prefix,
        } => {
            let img = need_image()?;
            let full = img.to_string();
            let remapped = match full.strip_prefix(prefix.as_str()) {
                // The prefix must end at a component boundary.
                Some(rest) if rest.is_empty() || rest.starts_with(['/', ':', '@']) => {
                    let s = format!("{signed_prefix}{rest}");
                    DockerReference::parse(&s).map_err(|source| IdentityError::Remapped {
                        remapped: s,
                        source,
                    })?
                }
                _ => img.clone(),
            };
            repo_digest_or_exact(&remapped)
        }
    }
}

/// What can be said without fetching anything: for `policy check`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Precheck {
    Rejected,
    AcceptedWithoutSignature,
    SignatureRequired,
}

impl Evaluation<'_> {
    pub fn precheck(&self) -> Precheck {
        if self
            .requirements
            .iter()
            .any(|r| matches!(r, Requirement::Reject))
        {
            Precheck::Rejected
        } else if self
            .requirements
            .iter()
            .any(|r| matches!(r, Requirement::SigstoreSigned(_)))
        {
            Precheck::SignatureRequired
        } else {
            Precheck::AcceptedWithoutSignature
        }
    }
}
