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
use crate::sigstore::{
    InTotoStatement, SignatureFormat, SignatureKind, SignatureSource, SigstoreBundleArtifact,
    SimpleSigningPayload, SimpleSigningSignature, VerificationKey, COSIGN_SIGN_PREDICATE,
    IN_TOTO_PAYLOAD_TYPE,
};

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
    SigstoreSigned(Box<SigstoreSigned>),
}

/// A `sigstoreSigned` requirement: who must have signed (keys or a Fulcio certificate
/// identity), what transparency evidence is required, under which trust material, and how the
/// signed identity must relate to the image.
#[derive(Clone, Debug)]
pub struct SigstoreSigned {
    pub signer: Signer,
    pub identity: IdentityRule,
    /// Rekor public keys (`rekorPublicKeyPath(s)` / `rekorPublicKeyData(s)`).
    pub rekor_keys: Vec<VerificationKey>,
    /// A Sigstore `trusted_root.json` (extension `trustedRootPath` / `trustedRootData`):
    /// Fulcio CAs, Rekor logs, CT logs and timestamp authorities with their validity windows.
    pub trusted_root: Option<TrustedRoot>,
    /// Whether a signature needs a verified transparency-log entry (extension
    /// `requireTransparencyLog`; by default: when Rekor keys or a trusted root are given, and
    /// always for Fulcio signers).
    pub require_transparency_log: bool,
    /// Extension `acceptDigestOnlyStatements`: accept signatures whose signed statement names
    /// only the manifest digest and no repository (cosign 3's in-toto statements), under any
    /// `signedIdentity` rule. Off by default: such a signature then satisfies no rule.
    pub accept_digest_only_statements: bool,
}

impl SigstoreSigned {
    /// The public keys of a key-based requirement (empty for a Fulcio one).
    pub fn keys(&self) -> &[VerificationKey] {
        match &self.signer {
            Signer::Keys(k) => k,
            Signer::Fulcio(_) => &[],
        }
    }
}

/// Who must have signed.
#[derive(Clone, Debug)]
pub enum Signer {
    /// `keyPath`, `keyPaths`, `keyData`, `keyDatas`: any of these public keys.
    Keys(Vec<VerificationKey>),
    /// `fulcio`: a certificate issued by a Fulcio CA to this identity.
    Fulcio(FulcioIdentity),
}

/// The `fulcio` object of a requirement.
#[derive(Clone, Debug)]
pub struct FulcioIdentity {
    /// DER certificates of `caPath` / `caData`; empty when the CAs come from the trusted root.
    pub ca_certificates: Vec<Vec<u8>>,
    pub issuer: IssuerMatch,
    pub subject: SubjectMatch,
}

/// The OIDC issuer a Fulcio certificate must name.
#[derive(Clone, Debug)]
pub enum IssuerMatch {
    /// `oidcIssuer`.
    Exact(String),
    /// `oidcIssuerRegexp` (extension), matched against the whole issuer.
    Regexp(regex::Regex),
}

/// The subject (SAN) a Fulcio certificate must carry.
#[derive(Clone, Debug)]
pub enum SubjectMatch {
    /// `subjectEmail`: an rfc822Name SAN.
    Email(String),
    /// `subjectURI` (extension): a URI SAN, e.g. a CI workflow identity.
    Uri(String),
    /// `subjectRegexp` (extension): any email or URI SAN, matched whole.
    Regexp(regex::Regex),
}

impl IssuerMatch {
    pub fn matches(&self, issuer: &str) -> bool {
        match self {
            IssuerMatch::Exact(s) => s == issuer,
            IssuerMatch::Regexp(r) => r.is_match(issuer),
        }
    }
}

impl SubjectMatch {
    /// Whether a certificate's SANs (`emails`, `uris`) satisfy this subject.
    pub fn matches(&self, emails: &[&str], uris: &[&str]) -> bool {
        match self {
            SubjectMatch::Email(e) => emails.contains(&e.as_str()),
            SubjectMatch::Uri(u) => uris.contains(&u.as_str()),
            SubjectMatch::Regexp(r) => emails.iter().chain(uris).any(|s| r.is_match(s)),
        }
    }
}

impl fmt::Display for FulcioIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.subject {
            SubjectMatch::Email(e) => write!(f, "email {e}")?,
            SubjectMatch::Uri(u) => write!(f, "URI {u}")?,
            SubjectMatch::Regexp(r) => write!(f, "subject matching {}", unanchor(r.as_str()))?,
        }
        match &self.issuer {
            IssuerMatch::Exact(i) => write!(f, " from issuer {i}"),
            IssuerMatch::Regexp(r) => {
                write!(f, " from an issuer matching {}", unanchor(r.as_str()))
            }
        }
    }
}

fn unanchor(anchored: &str) -> &str {
    anchored
        .strip_prefix("^(?:")
        .and_then(|r| r.strip_suffix(")$"))
        .unwrap_or(anchored)
}

/// A Sigstore trusted root as the policy gives it, unparsed (the verifier parses it).
#[derive(Clone, Debug)]
pub struct TrustedRoot {
    /// The file it was read from, or `trustedRootData`.
    pub origin: String,
    pub json: Vec<u8>,
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
            Requirement::SigstoreSigned(s) => {
                match &s.signer {
                    Signer::Keys(keys) => write!(
                        f,
                        "needs a sigstore signature by one of {} key(s) ({})",
                        keys.len(),
                        keys.iter()
                            .map(|k| k.fingerprint())
                            .collect::<Vec<_>>()
                            .join(", ")
                    )?,
                    Signer::Fulcio(id) => write!(
                        f,
                        "needs a sigstore signature by a Fulcio certificate for {id}"
                    )?,
                }
                if s.require_transparency_log {
                    write!(f, " in a transparency log")?;
                }
                write!(f, " with identity rule {}", s.identity)?;
                if s.accept_digest_only_statements {
                    write!(f, " (or a digest-only statement)")?;
                }
                Ok(())
            }
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
        "sigstoreSigned" => parse_sigstore_signed(ctx, obj, path).map(|s| Requirement::SigstoreSigned(Box::new(s))),
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

/// The fields of `sigstoreSigned`: containers-policy.json(5)'s, then this project's
/// extensions (documented in docs/policy-guide.md).
const SIGSTORE_FIELDS: &[&str] = &[
    "type",
    "keyPath",
    "keyPaths",
    "keyData",
    "keyDatas",
    "fulcio",
    "rekorPublicKeyPath",
    "rekorPublicKeyPaths",
    "rekorPublicKeyData",
    "rekorPublicKeyDatas",
    "signedIdentity",
    // Extensions.
    "trustedRootPath",
    "trustedRootData",
    "requireTransparencyLog",
    "acceptDigestOnlyStatements",
];

fn parse_sigstore_signed(
    ctx: &Ctx,
    obj: &Map<String, Value>,
    path: &str,
) -> Result<SigstoreSigned, PolicyError> {
    if obj.contains_key("pki") {
        return Err(ctx.err(
            &format!("{path}.pki"),
            "pki (X.509 roots of a private PKI) is not supported yet; use fulcio with trustedRootPath",
        ));
    }
    ctx.only_fields(obj, SIGSTORE_FIELDS, path)?;
    let key_fields = ["keyPath", "keyPaths", "keyData", "keyDatas"];
    let present: Vec<&str> = key_fields
        .iter()
        .chain(&["fulcio"])
        .filter(|k| obj.contains_key(**k))
        .copied()
        .collect();
    if present.len() != 1 {
        return Err(ctx.err(
            path,
            format!(
                "sigstoreSigned needs exactly one of keyPath, keyPaths, keyData, keyDatas, fulcio (found: {})",
                if present.is_empty() { "none".to_string() } else { present.join(", ") }
            ),
        ));
    }
    let rekor_fields = [
        "rekorPublicKeyPath",
        "rekorPublicKeyPaths",
        "rekorPublicKeyData",
        "rekorPublicKeyDatas",
    ];
    let rekor_present: Vec<&str> = rekor_fields
        .iter()
        .filter(|k| obj.contains_key(**k))
        .copied()
        .collect();
    if rekor_present.len() > 1 {
        return Err(ctx.err(
            path,
            format!(
                "at most one of {} (found: {})",
                rekor_fields.join(", "),
                rekor_present.join(", ")
            ),
        ));
    }
    if obj.contains_key("trustedRootPath") && obj.contains_key("trustedRootData") {
        return Err(ctx.err(path, "at most one of trustedRootPath, trustedRootData"));
    }
    let trusted_root = if obj.contains_key("trustedRootPath") {
        let p = ctx.string(obj, "trustedRootPath", path)?;
        let tp = format!("{path}.trustedRootPath");
        let file = resolve(ctx, p, &tp)?;
        let json = std::fs::read(&file).map_err(|e| {
            ctx.err(
                &tp,
                format!("cannot read trusted root {}: {e}", file.display()),
            )
        })?;
        check_trusted_root(ctx, &json, &tp, &file.display().to_string())?;
        Some(TrustedRoot {
            origin: file.display().to_string(),
            json,
        })
    } else if obj.contains_key("trustedRootData") {
        let tp = format!("{path}.trustedRootData");
        let json = base64_field(ctx, obj, "trustedRootData", path)?;
        check_trusted_root(ctx, &json, &tp, "trustedRootData")?;
        Some(TrustedRoot {
            origin: "trustedRootData".into(),
            json,
        })
    } else {
        None
    };
    let signer = if let Some(f) = obj.get("fulcio") {
        Signer::Fulcio(parse_fulcio(
            ctx,
            f,
            &format!("{path}.fulcio"),
            trusted_root.is_some(),
        )?)
    } else {
        Signer::Keys(load_keys(
            ctx, obj, path, "keyPath", "keyPaths", "keyData", "keyDatas",
        )?)
    };
    let rekor_keys = if rekor_present.is_empty() {
        Vec::new()
    } else {
        load_keys(
            ctx,
            obj,
            path,
            "rekorPublicKeyPath",
            "rekorPublicKeyPaths",
            "rekorPublicKeyData",
            "rekorPublicKeyDatas",
        )?
    };
    let has_log_material = !rekor_keys.is_empty() || trusted_root.is_some();
    let fulcio = matches!(signer, Signer::Fulcio(_));
    let require_transparency_log = match obj.get("requireTransparencyLog") {
        None => has_log_material || fulcio,
        Some(Value::Bool(b)) => *b,
        Some(v) => {
            return Err(ctx.err(
                &format!("{path}.requireTransparencyLog"),
                format!("expected a boolean, found {}", kind(v)),
            ))
        }
    };
    if require_transparency_log && !has_log_material {
        return Err(ctx.err(
            path,
            if fulcio {
                "fulcio needs transparency-log keys: one of rekorPublicKeyPath, rekorPublicKeyPaths, rekorPublicKeyData, rekorPublicKeyDatas, or trustedRootPath / trustedRootData"
            } else {
                "requireTransparencyLog needs transparency-log keys: one of rekorPublicKeyPath, rekorPublicKeyPaths, rekorPublicKeyData, rekorPublicKeyDatas, or trustedRootPath / trustedRootData"
            },
        ));
    }
    if fulcio && !require_transparency_log && trusted_root.is_none() {
        return Err(ctx.err(
            &format!("{path}.requireTransparencyLog"),
            "a Fulcio signer without a transparency log needs the timestamp authorities of a trusted root (trustedRootPath / trustedRootData) to prove when it signed",
        ));
    }
    let identity = match obj.get("signedIdentity") {
        None => IdentityRule::MatchRepoDigestOrExact,
        Some(v) => parse_identity(ctx, v, &format!("{path}.signedIdentity"))?,
    };
    let accept_digest_only_statements = match obj.get("acceptDigestOnlyStatements") {
        None => false,
        Some(Value::Bool(b)) => *b,
        Some(v) => {
            return Err(ctx.err(
                &format!("{path}.acceptDigestOnlyStatements"),
                format!("expected a boolean, found {}", kind(v)),
            ))
        }
    };
    Ok(SigstoreSigned {
        signer,
        identity,
        rekor_keys,
        trusted_root,
        require_transparency_log,
        accept_digest_only_statements,
    })
}

/// Keys from one of four fields (`<x>Path`, `<x>Paths`, `<x>Data`, `<x>Datas`); the caller
/// has checked that exactly one is present.
fn load_keys(
    ctx: &Ctx,
    obj: &Map<String, Value>,
    path: &str,
    one_path: &str,
    many_paths: &str,
    one_data: &str,
    many_data: &str,
) -> Result<Vec<VerificationKey>, PolicyError> {
    let mut keys = Vec::new();
    if obj.contains_key(one_path) {
        let p = ctx.string(obj, one_path, path)?;
        keys.extend(load_key_file(ctx, p, &format!("{path}.{one_path}"))?);
    } else if obj.contains_key(one_data) {
        let pem = base64_field(ctx, obj, one_data, path)?;
        keys = VerificationKey::from_pem(&pem)
            .map_err(|e| ctx.err(&format!("{path}.{one_data}"), e.to_string()))?;
    } else {
        let (field, is_path) = if obj.contains_key(many_paths) {
            (many_paths, true)
        } else {
            (many_data, false)
        };
        let lp = format!("{path}.{field}");
        let arr = obj
            .get(field)
            .and_then(|v| v.as_array())
            .ok_or_else(|| ctx.err(&lp, "expected an array of strings"))?;
        if arr.is_empty() {
            return Err(ctx.err(&lp, format!("empty {field}")));
        }
        for (i, v) in arr.iter().enumerate() {
            let ip = format!("{lp}.[{i}]");
            let v = v
                .as_str()
                .ok_or_else(|| ctx.err(&ip, "expected a string"))?;
            if is_path {
                keys.extend(load_key_file(ctx, v, &ip)?);
            } else {
                let pem = decode_base64(ctx, v, &ip, field)?;
                keys.extend(
                    VerificationKey::from_pem(&pem).map_err(|e| ctx.err(&ip, e.to_string()))?,
                );
            }
        }
    }
    Ok(keys)
}

fn decode_base64(ctx: &Ctx, data: &str, path: &str, field: &str) -> Result<Vec<u8>, PolicyError> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD
        .decode(data)
        .map_err(|e| ctx.err(path, format!("{field} is not base64: {e}")))
}

fn base64_field(
    ctx: &Ctx,
    obj: &Map<String, Value>,
    field: &str,
    path: &str,
) -> Result<Vec<u8>, PolicyError> {
    let data = ctx.string(obj, field, path)?;
    decode_base64(ctx, data, &format!("{path}.{field}"), field)
}

fn resolve(ctx: &Ctx, p: &str, path: &str) -> Result<PathBuf, PolicyError> {
    let file = PathBuf::from(p);
    if file.is_relative() {
        match ctx.base_dir {
            Some(base) => Ok(base.join(file)),
            None => Err(ctx.err(path, format!("path {p:?} must be absolute"))),
        }
    } else {
        Ok(file)
    }
}

/// A light check of a trusted root (the verifier parses it fully): a JSON object whose
/// `mediaType` names a Sigstore trusted root.
fn check_trusted_root(ctx: &Ctx, json: &[u8], path: &str, what: &str) -> Result<(), PolicyError> {
    const MAX_TRUSTED_ROOT: usize = 4 << 20;
    if json.len() > MAX_TRUSTED_ROOT {
        return Err(ctx.err(
            path,
            format!("{what} is larger than {MAX_TRUSTED_ROOT} bytes"),
        ));
    }
    let v: Value = serde_json::from_slice(json)
        .map_err(|e| ctx.err(path, format!("{what} is not JSON: {e}")))?;
    let mt = v.get("mediaType").and_then(|m| m.as_str()).unwrap_or("");
    if !mt.starts_with("application/vnd.dev.sigstore.trustedroot") {
        return Err(ctx.err(
            path,
            format!("{what} is not a Sigstore trusted root (mediaType {mt:?}, expected application/vnd.dev.sigstore.trustedroot+json;version=0.1 or ...v0.2+json)"),
        ));
    }
    Ok(())
}

fn parse_fulcio(
    ctx: &Ctx,
    v: &Value,
    path: &str,
    have_trusted_root: bool,
) -> Result<FulcioIdentity, PolicyError> {
    let obj = ctx.object(v, path)?;
    ctx.only_fields(
        obj,
        &[
            "caPath",
            "caData",
            "oidcIssuer",
            "subjectEmail",
            // Extensions.
            "oidcIssuerRegexp",
            "subjectURI",
            "subjectRegexp",
        ],
        path,
    )?;
    let ca_pem = match (obj.contains_key("caPath"), obj.contains_key("caData")) {
        (true, true) => return Err(ctx.err(path, "at most one of caPath, caData")),
        (true, false) => {
            let p = ctx.string(obj, "caPath", path)?;
            let cp = format!("{path}.caPath");
            let file = resolve(ctx, p, &cp)?;
            Some((
                std::fs::read(&file)
                    .map_err(|e| ctx.err(&cp, format!("cannot read CA {}: {e}", file.display())))?,
                cp,
            ))
        }
        (false, true) => Some((base64_field(ctx, obj, "caData", path)?, format!("{path}.caData"))),
        (false, false) if have_trusted_root => None,
        (false, false) => {
            return Err(ctx.err(
                path,
                "fulcio needs its CA: caPath or caData (or a trustedRootPath / trustedRootData on the requirement)",
            ))
        }
    };
    let mut ca_certificates = Vec::new();
    if let Some((pem_text, cp)) = ca_pem {
        let blocks =
            pem::parse_many(&pem_text).map_err(|e| ctx.err(&cp, format!("not PEM: {e}")))?;
        if blocks.is_empty() {
            return Err(ctx.err(&cp, "no PEM block found"));
        }
        for b in blocks {
            if b.tag() != "CERTIFICATE" {
                return Err(ctx.err(&cp, format!("PEM block {:?} is not a CERTIFICATE", b.tag())));
            }
            ca_certificates.push(b.contents().to_vec());
        }
    }
    let one_of = |names: &[&'static str]| -> Result<&'static str, PolicyError> {
        let present: Vec<&'static str> = names
            .iter()
            .filter(|n| obj.contains_key(**n))
            .copied()
            .collect();
        match present.as_slice() {
            [one] => Ok(one),
            _ => Err(ctx.err(
                path,
                format!(
                    "fulcio needs exactly one of {} (found: {})",
                    names.join(", "),
                    if present.is_empty() {
                        "none".to_string()
                    } else {
                        present.join(", ")
                    }
                ),
            )),
        }
    };
    let issuer = match one_of(&["oidcIssuer", "oidcIssuerRegexp"])? {
        "oidcIssuer" => IssuerMatch::Exact(non_empty(ctx, obj, "oidcIssuer", path)?),
        _ => IssuerMatch::Regexp(regexp(ctx, obj, "oidcIssuerRegexp", path)?),
    };
    let subject = match one_of(&["subjectEmail", "subjectURI", "subjectRegexp"])? {
        "subjectEmail" => SubjectMatch::Email(non_empty(ctx, obj, "subjectEmail", path)?),
        "subjectURI" => SubjectMatch::Uri(non_empty(ctx, obj, "subjectURI", path)?),
        _ => SubjectMatch::Regexp(regexp(ctx, obj, "subjectRegexp", path)?),
    };
    Ok(FulcioIdentity {
        ca_certificates,
        issuer,
        subject,
    })
}

fn non_empty(
    ctx: &Ctx,
    obj: &Map<String, Value>,
    field: &str,
    path: &str,
) -> Result<String, PolicyError> {
    let s = ctx.string(obj, field, path)?;
    if s.is_empty() {
        return Err(ctx.err(&format!("{path}.{field}"), format!("empty {field}")));
    }
    Ok(s.to_string())
}

/// A regular expression (Rust `regex` syntax), matched against the whole value.
fn regexp(
    ctx: &Ctx,
    obj: &Map<String, Value>,
    field: &str,
    path: &str,
) -> Result<regex::Regex, PolicyError> {
    let s = non_empty(ctx, obj, field, path)?;
    regex::RegexBuilder::new(&format!("^(?:{s})$"))
        .size_limit(1 << 20)
        .build()
        .map_err(|e| {
            ctx.err(
                &format!("{path}.{field}"),
                format!("invalid regular expression: {e}"),
            )
        })
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
    /// The signatures that satisfied the `sigstoreSigned` requirements (one per requirement),
    /// for the audit log: format, source, signer.
    pub signatures: Vec<AcceptedSignature>,
}

/// A signature that satisfied a requirement.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct AcceptedSignature {
    /// Its position in the list evaluated.
    pub index: usize,
    pub format: SignatureKind,
    /// The bundle's media type (`None` for simple signing).
    pub media_type: Option<String>,
    pub source: SignatureSource,
    /// The key fingerprint or certificate identity that verified.
    pub signer: String,
    /// The transparency-log entries that verified with it (`<log> #<index>`; none for
    /// simple signing, whose Rekor annotations are not checked).
    pub log_entries: Vec<String>,
}

impl Evaluation<'_> {
    pub fn evaluate(
        &self,
        reference: &ImageReference,
        manifest_digest: &Digest,
        signatures: &[SignatureFormat],
    ) -> Decision {
        self.evaluate_with(reference, manifest_digest, signatures, &verify_bundle)
    }

    /// [`Self::evaluate`] with the bundle verifier given (tests give a stand-in).
    pub(crate) fn evaluate_with(
        &self,
        reference: &ImageReference,
        manifest_digest: &Digest,
        signatures: &[SignatureFormat],
        verifier: &BundleVerifier<'_>,
    ) -> Decision {
        let mut reasons = Vec::new();
        let mut accepted = Vec::new();
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
                    match check_sigstore(s, reference, manifest_digest, signatures, verifier) {
                        Ok((reason, signature)) => {
                            reasons.push(reason);
                            accepted.push(signature);
                        }
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
            signatures: accepted,
        }
    }

    fn deny(&self, class: RejectClass, reason: String) -> Decision {
        Decision {
            allowed: false,
            scope: self.scope.clone(),
            reason,
            class: Some(class),
            signatures: Vec::new(),
        }
    }
}

type Rejection = (RejectClass, String);

fn check_sigstore(
    req: &SigstoreSigned,
    reference: &ImageReference,
    manifest_digest: &Digest,
    signatures: &[SignatureFormat],
    verifier: &BundleVerifier<'_>,
) -> Result<(String, AcceptedSignature), Rejection> {
    if signatures.is_empty() {
        return Err((
            RejectClass::NoSignature,
            format!("a signature is required but none exists for {manifest_digest}"),
        ));
    }
    // The failure that got furthest decides the class.
    let mut worst: Option<Rejection> = None;
    for (i, sig) in signatures.iter().enumerate() {
        let outcome = match sig {
            SignatureFormat::SimpleSigning(s) => {
                check_simple_signing(req, reference, manifest_digest, i, s)
            }
            SignatureFormat::SigstoreBundle(b) => {
                check_bundle(req, manifest_digest, i, b, verifier)
            }
            SignatureFormat::Unreadable {
                kind,
                source,
                reason,
            } => Err((
                RejectClass::MalformedSignature,
                format!("signature #{i}: {kind} in {source}: {reason}"),
            )),
        };
        match outcome {
            Ok(ok) => return Ok(ok),
            Err((class, msg)) => {
                if worst.as_ref().is_none_or(|(c, _)| class > *c) {
                    worst = Some((class, msg));
                }
            }
        }
    }
    Err(worst.expect("at least one signature was examined"))
}

fn check_simple_signing(
    req: &SigstoreSigned,
    reference: &ImageReference,
    manifest_digest: &Digest,
    i: usize,
    sig: &SimpleSigningSignature,
) -> Result<(String, AcceptedSignature), Rejection> {
    let keys = match &req.signer {
        Signer::Keys(keys) => keys,
        Signer::Fulcio(id) => {
            return Err((
                RejectClass::UnsupportedSignatureFormat,
                format!("signature #{i} (cosign simple signing in {}): the requirement needs a Fulcio certificate for {id}, and keyless simple-signing signatures (certificate annotations) are not verified; sign with cosign 3 (a sigstore bundle)", sig.source),
            ))
        }
    };
    if req.require_transparency_log {
        return Err((
            RejectClass::UnsupportedSignatureFormat,
            format!("signature #{i} (cosign simple signing in {}): the requirement needs a transparency-log entry, which is not checked for simple-signing signatures (their Rekor bundle annotation); sign with cosign 3 (a sigstore bundle)", sig.source),
        ));
    }
    let Some(key) = keys.iter().find(|k| k.verify(&sig.payload, &sig.signature)) else {
        return Err((
            RejectClass::WrongKey,
            format!(
                "no signature verifies with the accepted key(s) {}",
                fingerprints(keys)
            ),
        ));
    };
    let payload = SimpleSigningPayload::parse(&sig.payload).map_err(|e| {
        (
            RejectClass::MalformedSignature,
            format!("signature #{i}: {e}"),
        )
    })?;
    if &payload.docker_manifest_digest != manifest_digest {
        return Err((
            RejectClass::DigestMismatch,
            format!(
                "signature #{i} is for manifest {}, not the fetched manifest {manifest_digest}",
                payload.docker_manifest_digest
            ),
        ));
    }
    identity_matches(&req.identity, reference, &payload.docker_reference).map_err(|e| {
        (
            RejectClass::IdentityMismatch,
            format!("signature #{i}: {e}"),
        )
    })?;
    Ok((
        format!(
            "signature by key {} for {} matches identity rule {}",
            key.fingerprint(),
            payload.docker_reference,
            req.identity
        ),
        AcceptedSignature {
            index: i,
            format: SignatureKind::SimpleSigning,
            media_type: None,
            source: sig.source.clone(),
            signer: format!("key {}", key.fingerprint()),
            log_entries: Vec::new(),
        },
    ))
}

fn fingerprints(keys: &[VerificationKey]) -> String {
    keys.iter()
        .map(|k| k.fingerprint())
        .collect::<Vec<_>>()
        .join(", ")
}

/// What a bundle verifier is: [`verify_bundle`], or a stand-in in tests.
pub(crate) type BundleVerifier<'a> = dyn Fn(&SigstoreSigned, &SigstoreBundleArtifact, &Digest) -> Result<BundleVerified, BundleError>
    + 'a;

/// What [`verify_bundle`] established about a bundle.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BundleVerified {
    /// Who signed, as verified.
    pub signer: VerifiedSigner,
    /// The DSSE envelope's payload type and payload, whose signature verified (the
    /// statement is parsed and matched by the caller). A message-signature bundle signs a
    /// blob, not an image: the verifier refuses it for images.
    pub payload_type: String,
    pub payload: Vec<u8>,
    /// Transparency-log entries verified (inclusion proof or signed entry timestamp against
    /// the requirement's Rekor keys or trusted root).
    pub transparency_log_entries: usize,
    /// Verified RFC 3161 timestamps and SET-backed integrated times.
    pub timestamps: usize,
    /// The verified log entries (`<log> #<index>`), for the audit record.
    pub log_entries: Vec<String>,
}

/// The verified signer of a bundle.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VerifiedSigner {
    /// One of the requirement's keys (its `sha256:` SPKI fingerprint).
    Key { fingerprint: String },
    /// A certificate that chained to a Fulcio CA of the requirement (or its trusted root)
    /// and was valid when it signed; its SANs and OIDC issuer extension.
    Certificate {
        emails: Vec<String>,
        uris: Vec<String>,
        issuer: String,
    },
}

impl fmt::Display for VerifiedSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VerifiedSigner::Key { fingerprint } => write!(f, "key {fingerprint}"),
            VerifiedSigner::Certificate {
                emails,
                uris,
                issuer,
            } => write!(
                f,
                "certificate for {} from issuer {issuer}",
                emails
                    .iter()
                    .chain(uris)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }
}

/// Why a bundle did not verify.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BundleError {
    /// The bundle, its certificate or its log entry cannot be parsed.
    #[error("{0}")]
    Malformed(String),
    /// A well-formed bundle of a kind not verified (version, content, algorithm).
    #[error("{0}")]
    Unsupported(String),
    /// It does not verify under the requirement: signature, certificate chain, validity
    /// window, transparency log or timestamps.
    #[error("{0}")]
    Untrusted(String),
}

impl BundleError {
    pub fn class(&self) -> RejectClass {
        match self {
            BundleError::Unsupported(_) => RejectClass::UnsupportedSignatureFormat,
            BundleError::Malformed(_) => RejectClass::MalformedSignature,
            BundleError::Untrusted(_) => RejectClass::WrongKey,
        }
    }
}

/// THE place where the Sigstore bundle verifier (crate `sigstore-verify`) is wired in.
///
/// Receives the `sigstoreSigned` requirement being checked (`requirement.signer`: the keys,
/// or the Fulcio CAs and identity; `requirement.rekor_keys`, `requirement.trusted_root`,
/// `requirement.require_transparency_log`), the bundle as discovered (`media_type`, the
/// bundle JSON in `bytes`, at most 1 MiB, and `source`), and the digest of the manifest
/// actually fetched. It must verify the bundle's signature (DSSE: over PAE(payloadType,
/// payload)) by one of the requirement's keys, or by a certificate chaining to its Fulcio CAs
/// valid at the verified signing time, with the transparency-log entries and timestamps the
/// requirement asks for, and return what it verified. The caller (`check_bundle`) then
/// checks the signer against the requirement again, the in-toto statement (type, predicate
/// type, subject = `manifest_digest`) and the `signedIdentity` rule.
///
/// Material for the verifier: keys as SPKI DER through [`VerificationKey::spki_der`]
/// (`requirement.keys()`, `requirement.rekor_keys`), Fulcio CAs as DER in
/// `FulcioIdentity::ca_certificates`, the trusted root's JSON in `TrustedRoot::json`. Map its
/// failures onto [`BundleError`] (`Malformed`, `Unsupported`, `Untrusted`), which carry the
/// reject classes.
pub fn verify_bundle(
    requirement: &SigstoreSigned,
    bundle: &SigstoreBundleArtifact,
    manifest_digest: &Digest,
) -> Result<BundleVerified, BundleError> {
    use sigstore_verify::bundle::Content;
    let text = std::str::from_utf8(&bundle.bytes)
        .map_err(|_| BundleError::Malformed("the bundle is not UTF-8".into()))?;
    let parsed = sigstore_verify::bundle::Bundle::from_json(text)
        .map_err(|e| BundleError::Malformed(format!("bundle: {e}")))?;
    let Content::Dsse(envelope) = &parsed.content else {
        return Err(BundleError::Unsupported(
            "a message-signature bundle signs a blob, not an image manifest (cosign signs images with a DSSE in-toto statement)".into(),
        ));
    };
    let root = verifier_root(requirement)?;
    let artifact = sigstore_verify::Artifact::parse_digest(&manifest_digest.to_string())
        .map_err(|e| BundleError::Malformed(format!("manifest digest: {}", e.0)))?;
    let with_log = |p: sigstore_verify::Policy| {
        if requirement.require_transparency_log {
            p
        } else {
            p.without_tlog()
        }
    };
    let policies: Vec<sigstore_verify::Policy> = match &requirement.signer {
        Signer::Keys(keys) => keys
            .iter()
            .map(|k| {
                sigstore_verify::PublicKey::from_spki_der(k.spki_der())
                    .map(|key| with_log(sigstore_verify::Policy::key(key)))
                    .map_err(|e| BundleError::Unsupported(format!("key {}: {e}", k.fingerprint())))
            })
            .collect::<Result<_, _>>()?,
        Signer::Fulcio(id) => {
            let san = match &id.subject {
                SubjectMatch::Email(e) => sigstore_verify::Matcher::exact(e.clone()),
                SubjectMatch::Uri(u) => sigstore_verify::Matcher::exact(u.clone()),
                SubjectMatch::Regexp(r) => sigstore_verify::Matcher::regex(r.as_str())
                    .map_err(|e| BundleError::Unsupported(e.to_string()))?,
            };
            let issuer = match &id.issuer {
                IssuerMatch::Exact(i) => sigstore_verify::Matcher::exact(i.clone()),
                IssuerMatch::Regexp(r) => sigstore_verify::Matcher::regex(r.as_str())
                    .map_err(|e| BundleError::Unsupported(e.to_string()))?,
            };
            let mut policy = sigstore_verify::Policy::identity(sigstore_verify::ExpectedIdentity {
                san,
                issuer,
            });
            // SCTs are checked against the trusted root's CT logs; `fulcio.caPath` alone
            // names none (as containers/image, which does not check SCTs).
            policy.require_sct = requirement.trusted_root.is_some();
            vec![policy]
        }
    };
    let mut refusals = Vec::new();
    for policy in &policies {
        match sigstore_verify::verify(&parsed, artifact, policy, &root) {
            Ok(v) => {
                let signer = match &v.signer {
                    sigstore_verify::Signer::Key { key_id, .. } => VerifiedSigner::Key {
                        fingerprint: format!("sha256:{key_id}"),
                    },
                    sigstore_verify::Signer::Certificate { identity, .. } => {
                        let (mut emails, mut uris) = (Vec::new(), Vec::new());
                        for san in &identity.sans {
                            match san {
                                sigstore_verify::certificate::San::Email(e) => {
                                    emails.push(e.clone())
                                }
                                sigstore_verify::certificate::San::Uri(u) => uris.push(u.clone()),
                                sigstore_verify::certificate::San::Other(_) => {}
                            }
                        }
                        VerifiedSigner::Certificate {
                            emails,
                            uris,
                            issuer: identity.issuer.clone().unwrap_or_default(),
                        }
                    }
                };
                return Ok(BundleVerified {
                    signer,
                    payload_type: envelope.payload_type.clone(),
                    payload: envelope.payload.clone(),
                    transparency_log_entries: v.tlog_entries.len(),
                    timestamps: v.timestamps.len(),
                    log_entries: v
                        .tlog_entries
                        .iter()
                        .map(|e| format!("{} #{}", e.log_url, e.log_index))
                        .collect(),
                });
            }
            Err(e) => refusals.push(e.to_string()),
        }
    }
    Err(BundleError::Untrusted(refusals.join("; ")))
}

/// The trust material of a requirement as the verifier takes it: its trusted root, else one
/// made of its Rekor keys and Fulcio CAs (no CT logs, no timestamp authorities).
fn verifier_root(req: &SigstoreSigned) -> Result<sigstore_verify::TrustedRoot, BundleError> {
    if let Some(root) = &req.trusted_root {
        let text = std::str::from_utf8(&root.json).map_err(|_| {
            BundleError::Malformed(format!("trusted root {}: not UTF-8", root.origin))
        })?;
        let mut parsed = sigstore_verify::TrustedRoot::from_json(text)
            .map_err(|e| BundleError::Malformed(format!("trusted root {}: {e}", root.origin)))?;
        add_policy_material(req, &mut parsed)?;
        return Ok(parsed);
    }
    let mut root = sigstore_verify::TrustedRoot {
        tlogs: Vec::new(),
        certificate_authorities: Vec::new(),
        ctlogs: Vec::new(),
        timestamp_authorities: Vec::new(),
    };
    add_policy_material(req, &mut root)?;
    Ok(root)
}

/// Adds the requirement's own Rekor keys and Fulcio CAs to `root`.
fn add_policy_material(
    req: &SigstoreSigned,
    root: &mut sigstore_verify::TrustedRoot,
) -> Result<(), BundleError> {
    for k in &req.rekor_keys {
        let key = sigstore_verify::PublicKey::from_spki_der(k.spki_der())
            .map_err(|e| BundleError::Unsupported(format!("Rekor key {}: {e}", k.fingerprint())))?;
        root.tlogs
            .push(sigstore_verify::trust_root::TransparencyLog {
                base_url: format!("rekor key {}", k.fingerprint()),
                scheme: key.default_scheme(),
                log_id: key.key_id().to_vec(),
                key,
                valid_for: sigstore_verify::ValidFor::default(),
            });
    }
    if let Signer::Fulcio(id) = &req.signer {
        if !id.ca_certificates.is_empty() {
            root.certificate_authorities
                .push(sigstore_verify::trust_root::CertificateAuthority {
                    uri: "fulcio.caPath".into(),
                    cert_chain: id.ca_certificates.clone(),
                    valid_for: sigstore_verify::ValidFor::default(),
                });
        }
    }
    Ok(())
}

/// Everything about a bundle under a requirement except the cryptography: the verifier's
/// result, then the signer against the requirement, the transparency evidence, the statement
/// and its subject, and the identity rule.
fn check_bundle(
    req: &SigstoreSigned,
    manifest_digest: &Digest,
    i: usize,
    bundle: &SigstoreBundleArtifact,
    verifier: &BundleVerifier<'_>,
) -> Result<(String, AcceptedSignature), Rejection> {
    let what = format!(
        "signature #{i} (sigstore bundle {} in {})",
        bundle.media_type, bundle.source
    );
    let verified =
        verifier(req, bundle, manifest_digest).map_err(|e| (e.class(), format!("{what}: {e}")))?;
    // The signer, again: a verifier bug must not widen the policy.
    match (&req.signer, &verified.signer) {
        (Signer::Keys(keys), VerifiedSigner::Key { fingerprint })
            if keys.iter().any(|k| k.fingerprint() == fingerprint) => {}
        (
            Signer::Fulcio(id),
            VerifiedSigner::Certificate {
                emails,
                uris,
                issuer,
            },
        ) if id.issuer.matches(issuer)
            && id.subject.matches(
                &emails.iter().map(String::as_str).collect::<Vec<_>>(),
                &uris.iter().map(String::as_str).collect::<Vec<_>>(),
            ) => {}
        (Signer::Keys(keys), signer) => {
            return Err((
                RejectClass::WrongKey,
                format!(
                    "{what}: signed by {signer}, not one of the accepted key(s) {}",
                    fingerprints(keys)
                ),
            ))
        }
        (Signer::Fulcio(id), signer) => {
            return Err((
                RejectClass::WrongKey,
                format!("{what}: signed by {signer}, not a certificate for {id}"),
            ))
        }
    }
    if req.require_transparency_log && verified.transparency_log_entries == 0 {
        return Err((
            RejectClass::WrongKey,
            format!("{what}: the requirement needs a transparency-log entry and the bundle has no verified one"),
        ));
    }
    if verified.payload_type != IN_TOTO_PAYLOAD_TYPE {
        return Err((
            RejectClass::MalformedSignature,
            format!(
                "{what}: DSSE payload type {:?} is not {IN_TOTO_PAYLOAD_TYPE}",
                verified.payload_type
            ),
        ));
    }
    let statement = InTotoStatement::parse(&verified.payload)
        .map_err(|e| (RejectClass::MalformedSignature, format!("{what}: {e}")))?;
    if statement.predicate_type != COSIGN_SIGN_PREDICATE {
        return Err((
            RejectClass::UnsupportedSignatureFormat,
            format!(
                "{what}: an attestation of predicate type {}, not an image signature ({COSIGN_SIGN_PREDICATE})",
                statement.predicate_type
            ),
        ));
    }
    if !statement.names_digest(manifest_digest) {
        return Err((
            RejectClass::DigestMismatch,
            format!(
                "{what} is for {}, not the fetched manifest {manifest_digest}",
                statement.subject_digests().join(", ")
            ),
        ));
    }
    // cosign 3's statement names the manifest digest and no repository: it satisfies no
    // signedIdentity rule, which all compare a signed repository, unless the policy says so.
    if !req.accept_digest_only_statements {
        return Err((
            RejectClass::IdentityMismatch,
            format!(
                "{what}: the signed statement names only the manifest digest, no repository, so it cannot satisfy identity rule {}; set \"acceptDigestOnlyStatements\": true on the requirement to accept digest-only signatures (docs/policy-guide.md)",
                req.identity
            ),
        ));
    }
    Ok((
        format!(
            "sigstore bundle signed by {} for manifest {manifest_digest} (digest-only statement, accepted by acceptDigestOnlyStatements){}",
            verified.signer,
            if verified.transparency_log_entries > 0 {
                format!(", {} transparency-log entr{}", verified.transparency_log_entries, if verified.transparency_log_entries == 1 { "y" } else { "ies" })
            } else {
                String::new()
            }
        ),
        AcceptedSignature {
            index: i,
            format: SignatureKind::SigstoreBundle,
            media_type: Some(bundle.media_type.clone()),
            source: bundle.source.clone(),
            signer: verified.signer.to_string(),
            log_entries: verified.log_entries.clone(),
        },
    ))
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

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use base64::Engine;

    use super::*;
    use crate::sigstore::{Discovery, SIGSTORE_BUNDLE_V03};

    fn fixtures() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
    }

    fn b64(bytes: &[u8]) -> String {
        base64::engine::general_purpose::STANDARD.encode(bytes)
    }

    fn key_data(name: &str) -> String {
        b64(&std::fs::read(fixtures().join("keys").join(name).join("cosign.pub")).unwrap())
    }

    fn key(name: &str) -> VerificationKey {
        VerificationKey::from_pem(
            &std::fs::read(fixtures().join("keys").join(name).join("cosign.pub")).unwrap(),
        )
        .unwrap()
        .remove(0)
    }

    fn parse(json: &str) -> Result<Policy, PolicyError> {
        Policy::parse(json.as_bytes(), "test.json", None)
    }

    fn requirement(json: &str) -> Result<SigstoreSigned, PolicyError> {
        let p = parse(&format!(r#"{{"default":[{json}]}}"#))?;
        match &p.default[0] {
            Requirement::SigstoreSigned(s) => Ok((**s).clone()),
            other => panic!("{other:?}"),
        }
    }

    /// A self-signed certificate stands in for a Fulcio CA: only its PEM shape is checked
    /// at parse time.
    fn ca_data() -> String {
        b64(pem::encode(&pem::Pem::new("CERTIFICATE", vec![0x30, 0x00])).as_bytes())
    }

    fn trusted_root_data() -> String {
        b64(
            &std::fs::read(fixtures().join("sigstore-conformance/trusted_root.public-good.json"))
                .unwrap(),
        )
    }

    #[test]
    fn parses_every_key_form() {
        let (a, b) = (key_data("A"), key_data("C"));
        let s = requirement(&format!(
            r#"{{"type":"sigstoreSigned","keyDatas":["{a}","{b}"]}}"#
        ))
        .unwrap();
        assert_eq!(s.keys(), &[key("A"), key("C")]);
        assert!(!s.require_transparency_log);
        assert!(!s.accept_digest_only_statements);
        let pa = fixtures().join("keys/A/cosign.pub");
        let pb = fixtures().join("keys/C/cosign.pub");
        let s = requirement(&format!(
            r#"{{"type":"sigstoreSigned","keyPaths":[{pa:?},{pb:?}],"rekorPublicKeyDatas":["{a}"],"acceptDigestOnlyStatements":true}}"#
        ))
        .unwrap();
        assert_eq!(s.keys().len(), 2);
        assert_eq!(s.rekor_keys, vec![key("A")]);
        assert!(s.require_transparency_log, "Rekor keys imply a log entry");
        assert!(s.accept_digest_only_statements);
        let s = requirement(&format!(
            r#"{{"type":"sigstoreSigned","keyData":"{a}","trustedRootData":"{}","requireTransparencyLog":false}}"#,
            trusted_root_data()
        ))
        .unwrap();
        assert!(!s.require_transparency_log);
        assert_eq!(s.trusted_root.unwrap().origin, "trustedRootData");
    }

    #[test]
    fn parses_fulcio_identities() {
        let rekor = key_data("A");
        let s = requirement(&format!(
            r#"{{"type":"sigstoreSigned","fulcio":{{"caData":"{}","oidcIssuer":"https://accounts.example.com","subjectEmail":"dev@example.com"}},"rekorPublicKeyData":"{rekor}"}}"#,
            ca_data()
        ))
        .unwrap();
        assert!(s.require_transparency_log);
        let Signer::Fulcio(id) = &s.signer else {
            panic!()
        };
        assert_eq!(id.ca_certificates, vec![vec![0x30, 0x00]]);
        assert!(id.issuer.matches("https://accounts.example.com"));
        assert!(id.subject.matches(&["dev@example.com"], &[]));
        assert!(!id.subject.matches(&["other@example.com"], &[]));
        assert_eq!(
            id.to_string(),
            "email dev@example.com from issuer https://accounts.example.com"
        );
        // Extensions: CAs from a trusted root, URI subjects, anchored regular expressions.
        let s = requirement(&format!(
            r#"{{"type":"sigstoreSigned","fulcio":{{"oidcIssuerRegexp":"https://token\\.actions\\.githubusercontent\\.com","subjectRegexp":"https://github\\.com/acme/.*@refs/tags/v.*"}},"trustedRootData":"{}"}}"#,
            trusted_root_data()
        ))
        .unwrap();
        let Signer::Fulcio(id) = &s.signer else {
            panic!()
        };
        assert!(id.ca_certificates.is_empty());
        assert!(id
            .issuer
            .matches("https://token.actions.githubusercontent.com"));
        assert!(!id
            .issuer
            .matches("https://token.actions.githubusercontent.com.evil"));
        assert!(id.subject.matches(
            &[],
            &["https://github.com/acme/app/.github/workflows/release.yml@refs/tags/v1.2"]
        ));
        assert!(!id.subject.matches(
            &[],
            &["https://evil.example/https://github.com/acme/x@refs/tags/v1"]
        ));
        let s = requirement(&format!(
            r#"{{"type":"sigstoreSigned","fulcio":{{"oidcIssuer":"https://i","subjectURI":"https://ci/x"}},"trustedRootData":"{}"}}"#,
            trusted_root_data()
        ))
        .unwrap();
        let Signer::Fulcio(id) = &s.signer else {
            panic!()
        };
        assert!(id.subject.matches(&["https://ci/x"], &["https://ci/x"]));
        assert!(
            !id.subject.matches(&["https://ci/x"], &[]),
            "a URI SAN only"
        );
    }

    #[test]
    fn sigstore_signed_errors_are_positioned() {
        let a = key_data("A");
        let ca = ca_data();
        let root = trusted_root_data();
        let cases = [
            (format!(r#"{{"type":"sigstoreSigned","keyData":"{a}","fulcio":{{}}}}"#), "default.[0]", "exactly one of keyPath, keyPaths, keyData, keyDatas, fulcio (found: keyData, fulcio)"),
            (r#"{"type":"sigstoreSigned","keyDatas":[]}"#.to_string(), "default.[0].keyDatas", "empty keyDatas"),
            (r#"{"type":"sigstoreSigned","keyDatas":["!"]}"#.to_string(), "default.[0].keyDatas.[0]", "not base64"),
            (format!(r#"{{"type":"sigstoreSigned","keyData":"{a}","rekorPublicKeyData":"{a}","rekorPublicKeyDatas":["{a}"]}}"#), "default.[0]", "at most one of rekorPublicKeyPath"),
            (format!(r#"{{"type":"sigstoreSigned","keyData":"{a}","requireTransparencyLog":true}}"#), "default.[0]", "requireTransparencyLog needs transparency-log keys"),
            (format!(r#"{{"type":"sigstoreSigned","keyData":"{a}","requireTransparencyLog":"yes"}}"#), "default.[0].requireTransparencyLog", "expected a boolean"),
            (format!(r#"{{"type":"sigstoreSigned","keyData":"{a}","acceptDigestOnlyStatements":1}}"#), "default.[0].acceptDigestOnlyStatements", "expected a boolean"),
            (format!(r#"{{"type":"sigstoreSigned","keyData":"{a}","trustedRootData":"{}"}}"#, b64(b"{}")), "default.[0].trustedRootData", "not a Sigstore trusted root"),
            (format!(r#"{{"type":"sigstoreSigned","keyData":"{a}","trustedRootPath":"r.json"}}"#), "default.[0].trustedRootPath", "must be absolute"),
            (format!(r#"{{"type":"sigstoreSigned","keyData":"{a}","transparencyLog":true}}"#), "default.[0].transparencyLog", "unknown field"),
            (format!(r#"{{"type":"sigstoreSigned","fulcio":{{"caData":"{ca}","oidcIssuer":"i","subjectEmail":"e"}}}}"#), "default.[0]", "fulcio needs transparency-log keys"),
            (format!(r#"{{"type":"sigstoreSigned","fulcio":{{"caData":"{ca}","oidcIssuer":"i","subjectEmail":"e"}},"rekorPublicKeyData":"{a}","requireTransparencyLog":false}}"#), "default.[0].requireTransparencyLog", "timestamp authorities"),
            (format!(r#"{{"type":"sigstoreSigned","fulcio":{{"caData":"{ca}","subjectEmail":"e"}},"rekorPublicKeyData":"{a}"}}"#), "default.[0].fulcio", "exactly one of oidcIssuer, oidcIssuerRegexp (found: none)"),
            (format!(r#"{{"type":"sigstoreSigned","fulcio":{{"caData":"{ca}","oidcIssuer":"i","subjectEmail":"e","subjectURI":"u"}},"rekorPublicKeyData":"{a}"}}"#), "default.[0].fulcio", "exactly one of subjectEmail, subjectURI, subjectRegexp (found: subjectEmail, subjectURI)"),
            (format!(r#"{{"type":"sigstoreSigned","fulcio":{{"caData":"{ca}","oidcIssuer":"i","subjectRegexp":"("}},"rekorPublicKeyData":"{a}"}}"#), "default.[0].fulcio.subjectRegexp", "invalid regular expression"),
            (format!(r#"{{"type":"sigstoreSigned","fulcio":{{"caData":"{ca}","oidcIssuer":"","subjectEmail":"e"}},"rekorPublicKeyData":"{a}"}}"#), "default.[0].fulcio.oidcIssuer", "empty oidcIssuer"),
            (format!(r#"{{"type":"sigstoreSigned","fulcio":{{"caData":"{a}","oidcIssuer":"i","subjectEmail":"e"}},"rekorPublicKeyData":"{a}"}}"#), "default.[0].fulcio.caData", "is not a CERTIFICATE"),
            (format!(r#"{{"type":"sigstoreSigned","fulcio":{{"caData":"{ca}","oidcIssuer":"i","subjectEmail":"e","subjectHostname":"h"}},"trustedRootData":"{root}"}}"#), "default.[0].fulcio.subjectHostname", "unknown field"),
            (format!(r#"{{"type":"sigstoreSigned","fulcio":{{"oidcIssuer":"i","subjectEmail":"e"}},"rekorPublicKeyData":"{a}"}}"#), "default.[0].fulcio", "fulcio needs its CA"),
        ];
        for (json, path, message) in cases {
            let e = requirement(&json).unwrap_err();
            assert_eq!(e.path, path, "{json}\n-> {e}");
            assert!(
                e.message.contains(message),
                "{json}\n-> {e}\n(expected {message:?})"
            );
        }
    }

    // --- bundles, with a stand-in for the verifier -------------------------------------

    fn manifest() -> Digest {
        Digest::of(b"the manifest")
    }

    fn bundle() -> SigstoreBundleArtifact {
        SigstoreBundleArtifact {
            media_type: SIGSTORE_BUNDLE_V03.into(),
            bytes: b"{}".to_vec(),
            source: SignatureSource {
                via: Discovery::ReferrersTag,
                origin: "reg.io/ns/app".into(),
                artifact: Some(Digest::of(b"referrer")),
                blob: Some(Digest::of(b"bundle")),
            },
        }
    }

    fn statement(digest: &Digest, predicate_type: &str) -> Vec<u8> {
        serde_json::json!({
            "_type": "https://in-toto.io/Statement/v1",
            "subject": [{"digest": {"sha256": digest.hex()}, "annotations": {}}],
            "predicateType": predicate_type,
            "predicate": {},
        })
        .to_string()
        .into_bytes()
    }

    fn verified_by_key(name: &str, payload: Vec<u8>) -> BundleVerified {
        BundleVerified {
            signer: VerifiedSigner::Key {
                fingerprint: key(name).fingerprint().to_string(),
            },
            payload_type: IN_TOTO_PAYLOAD_TYPE.into(),
            payload,
            transparency_log_entries: 0,
            timestamps: 0,
            log_entries: Vec::new(),
        }
    }

    fn decide_with(
        policy: &str,
        reference: &str,
        signatures: &[SignatureFormat],
        verifier: &BundleVerifier<'_>,
    ) -> Decision {
        let p = parse(policy).unwrap();
        let reference = ImageReference::parse(reference).unwrap();
        p.requirements_for(&reference)
            .evaluate_with(&reference, &manifest(), signatures, verifier)
    }

    fn key_policy(extra: &str) -> String {
        format!(
            r#"{{"default":[{{"type":"sigstoreSigned","keyData":"{}"{extra}}}]}}"#,
            key_data("A")
        )
    }

    #[test]
    fn a_digest_only_statement_needs_the_opt_in_under_every_identity_rule() {
        let good = |_: &SigstoreSigned, _: &SigstoreBundleArtifact, _: &Digest| {
            Ok(verified_by_key(
                "A",
                statement(&manifest(), COSIGN_SIGN_PREDICATE),
            ))
        };
        let sigs = [SignatureFormat::SigstoreBundle(bundle())];
        for identity in [
            r#"{"type":"matchRepoDigestOrExact"}"#,
            r#"{"type":"matchRepository"}"#,
            r#"{"type":"matchExact"}"#,
            r#"{"type":"exactReference","dockerReference":"reg.io/ns/app:v1"}"#,
            r#"{"type":"exactRepository","dockerRepository":"reg.io/ns/app"}"#,
            r#"{"type":"remapIdentity","prefix":"reg.io/ns","signedPrefix":"up.io/ns"}"#,
        ] {
            let without = key_policy(&format!(r#","signedIdentity":{identity}"#));
            let d = decide_with(&without, "docker://reg.io/ns/app:v1", &sigs, &good);
            assert_eq!(
                d.class,
                Some(RejectClass::IdentityMismatch),
                "{identity}: {d:?}"
            );
            assert!(
                d.reason.contains("acceptDigestOnlyStatements"),
                "{}",
                d.reason
            );
            assert!(
                d.reason.contains("names only the manifest digest"),
                "{}",
                d.reason
            );
            let with = key_policy(&format!(
                r#","signedIdentity":{identity},"acceptDigestOnlyStatements":true"#
            ));
            let d = decide_with(&with, "docker://reg.io/ns/app:v1", &sigs, &good);
            assert!(d.allowed, "{identity}: {d:?}");
            assert_eq!(
                d.signatures,
                vec![AcceptedSignature {
                    index: 0,
                    format: SignatureKind::SigstoreBundle,
                    media_type: Some(SIGSTORE_BUNDLE_V03.into()),
                    source: bundle().source,
                    signer: format!("key {}", key("A").fingerprint()),
                    log_entries: Vec::new(),
                }]
            );
            assert!(d.reason.contains("digest-only statement"), "{}", d.reason);
        }
    }

    #[test]
    fn bundle_statements_are_checked_after_the_verifier() {
        let opt_in = key_policy(r#","acceptDigestOnlyStatements":true"#);
        let sigs = [SignatureFormat::SigstoreBundle(bundle())];
        let case = |verified: BundleVerified| {
            let v = move |_: &SigstoreSigned, _: &SigstoreBundleArtifact, _: &Digest| {
                Ok(verified.clone())
            };
            decide_with(&opt_in, "docker://reg.io/ns/app:v1", &sigs, &v)
        };
        // Another manifest's statement (a valid signature replayed onto this image).
        let d = case(verified_by_key(
            "A",
            statement(&Digest::of(b"other"), COSIGN_SIGN_PREDICATE),
        ));
        assert_eq!(d.class, Some(RejectClass::DigestMismatch), "{d:?}");
        assert!(
            d.reason.contains(&Digest::of(b"other").to_string()),
            "{}",
            d.reason
        );
        // An attestation (SLSA provenance, say) is not a signature.
        let d = case(verified_by_key(
            "A",
            statement(&manifest(), "https://slsa.dev/provenance/v1"),
        ));
        assert_eq!(
            d.class,
            Some(RejectClass::UnsupportedSignatureFormat),
            "{d:?}"
        );
        assert!(
            d.reason
                .contains("an attestation of predicate type https://slsa.dev/provenance/v1"),
            "{}",
            d.reason
        );
        // Not an in-toto payload, not a statement.
        let mut v = verified_by_key("A", statement(&manifest(), COSIGN_SIGN_PREDICATE));
        v.payload_type = "application/vnd.dev.cosign.simplesigning.v1+json".into();
        assert_eq!(case(v).class, Some(RejectClass::MalformedSignature));
        let d = case(verified_by_key("A", b"{\"_type\":\"x\"}".to_vec()));
        assert_eq!(d.class, Some(RejectClass::MalformedSignature), "{d:?}");
        // A signer the requirement does not name: a verifier that got it wrong does not
        // widen the policy.
        let d = case(verified_by_key(
            "C",
            statement(&manifest(), COSIGN_SIGN_PREDICATE),
        ));
        assert_eq!(d.class, Some(RejectClass::WrongKey), "{d:?}");
        let mut v = verified_by_key("A", statement(&manifest(), COSIGN_SIGN_PREDICATE));
        v.signer = VerifiedSigner::Certificate {
            emails: vec!["dev@example.com".into()],
            uris: vec![],
            issuer: "https://i".into(),
        };
        assert_eq!(case(v).class, Some(RejectClass::WrongKey));
        // The verifier's own refusals keep their class.
        for (e, class) in [
            (
                BundleError::Malformed("bad".into()),
                RejectClass::MalformedSignature,
            ),
            (
                BundleError::Untrusted("bad signature".into()),
                RejectClass::WrongKey,
            ),
            (
                BundleError::Unsupported("v0.9".into()),
                RejectClass::UnsupportedSignatureFormat,
            ),
        ] {
            let v =
                move |_: &SigstoreSigned, _: &SigstoreBundleArtifact, _: &Digest| Err(e.clone());
            let d = decide_with(&opt_in, "docker://reg.io/ns/app:v1", &sigs, &v);
            assert_eq!(d.class, Some(class), "{d:?}");
        }
    }

    #[test]
    fn fulcio_requirements_check_the_certificate_identity_and_the_log() {
        let policy = format!(
            r#"{{"default":[{{"type":"sigstoreSigned","fulcio":{{"oidcIssuer":"https://token.actions.githubusercontent.com","subjectURI":"https://github.com/acme/app/.github/workflows/release.yml@refs/heads/main"}},"trustedRootData":"{}","acceptDigestOnlyStatements":true}}]}}"#,
            trusted_root_data()
        );
        let sigs = [SignatureFormat::SigstoreBundle(bundle())];
        let by = |uri: &str, issuer: &str, log: usize| {
            let mut v = verified_by_key("A", statement(&manifest(), COSIGN_SIGN_PREDICATE));
            v.signer = VerifiedSigner::Certificate {
                emails: vec![],
                uris: vec![uri.into()],
                issuer: issuer.into(),
            };
            v.transparency_log_entries = log;
            let f = move |_: &SigstoreSigned, _: &SigstoreBundleArtifact, _: &Digest| Ok(v.clone());
            decide_with(&policy, "docker://reg.io/ns/app:v1", &sigs, &f)
        };
        let wf = "https://github.com/acme/app/.github/workflows/release.yml@refs/heads/main";
        let gh = "https://token.actions.githubusercontent.com";
        let d = by(wf, gh, 1);
        assert!(d.allowed, "{d:?}");
        assert!(d.signatures[0].signer.contains(wf), "{:?}", d.signatures);
        assert_eq!(
            by(wf, "https://accounts.google.com", 1).class,
            Some(RejectClass::WrongKey)
        );
        assert_eq!(
            by("https://github.com/evil/app/x@refs/heads/main", gh, 1).class,
            Some(RejectClass::WrongKey)
        );
        let d = by(wf, gh, 0);
        assert_eq!(d.class, Some(RejectClass::WrongKey));
        assert!(d.reason.contains("transparency-log entry"), "{}", d.reason);
        // A simple-signing signature cannot satisfy a Fulcio requirement here.
        let simple = SignatureFormat::SimpleSigning(SimpleSigningSignature {
            payload: b"{}".to_vec(),
            signature: vec![],
            source: SignatureSource::default(),
        });
        let p = parse(&policy).unwrap();
        let d = p.evaluate(
            &ImageReference::parse("docker://reg.io/ns/app:v1").unwrap(),
            &manifest(),
            &[simple],
        );
        assert_eq!(
            d.class,
            Some(RejectClass::UnsupportedSignatureFormat),
            "{d:?}"
        );
        assert!(d.reason.contains("keyless simple-signing"), "{}", d.reason);
    }

    #[test]
    fn every_requirement_of_a_scope_names_its_signature() {
        // Two requirements: key A by bundle, key C by simple signing.
        let a = key_data("A");
        let b = key_data("C");
        let policy = format!(
            r#"{{"default":[{{"type":"sigstoreSigned","keyData":"{a}","acceptDigestOnlyStatements":true}},{{"type":"sigstoreSigned","keyData":"{b}","signedIdentity":{{"type":"matchRepository"}}}}]}}"#
        );
        let good = |_: &SigstoreSigned, _: &SigstoreBundleArtifact, _: &Digest| {
            Ok(verified_by_key(
                "A",
                statement(&manifest(), COSIGN_SIGN_PREDICATE),
            ))
        };
        // Only the bundle: the second requirement is not met.
        let d = decide_with(
            &policy,
            "docker://reg.io/ns/app:v1",
            &[SignatureFormat::SigstoreBundle(bundle())],
            &good,
        );
        assert!(!d.allowed, "{d:?}");
        // A transparency-log requirement is not met by a simple-signing signature.
        let with_log = format!(
            r#"{{"default":[{{"type":"sigstoreSigned","keyData":"{a}","rekorPublicKeyData":"{a}"}}]}}"#
        );
        let simple = SignatureFormat::SimpleSigning(SimpleSigningSignature {
            payload: b"{}".to_vec(),
            signature: vec![],
            source: SignatureSource::default(),
        });
        let d = decide_with(&with_log, "docker://reg.io/ns/app:v1", &[simple], &good);
        assert_eq!(
            d.class,
            Some(RejectClass::UnsupportedSignatureFormat),
            "{d:?}"
        );
        assert!(d.reason.contains("transparency-log entry"), "{}", d.reason);
    }
}
