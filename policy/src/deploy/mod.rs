//! The deployment policy: which tenants and functions may run which images, under which
//! requirements and limits, with which keys, on which attested IPU classes.
//!
//! Written in TOML: comments for reviewers, no implicit typing (YAML's `no` -> false), and
//! error positions through the parser's spans; containerd's configuration is TOML too. The
//! published JSON Schema is `docs/deployment-policy.schema.json`.
//!
//! - [`parse`] reads a document strictly (unknown fields are errors) and checks it
//!   semantically, every error with its `line:column`.
//! - [`lint`] finds rules that can never decide (shadowed function patterns).
//! - [`eval`] is the pure decision function that ipu-image-svc and the key broker both call.
//! - [`bundle`] signs and verifies versioned policy bundles (anti-rollback).
//! - [`suite`] runs decision tables (`policy test`) and compares policies (`policy diff`).

pub mod bundle;
pub mod eval;
mod pattern;
pub mod suite;

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::ops::Range;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use toml::Spanned;

use crate::sigstore::VerificationKey;

pub use eval::{evaluate, evaluate_key_release, DeployDecision, DeployRequest, Requirements};
pub use pattern::Pattern;

/// Schema version this code reads.
pub const SCHEMA_VERSION: u32 = 1;

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeploymentPolicy {
    pub schema: Spanned<u32>,
    /// The containers-policy.json image trust policy this document goes with (a file name
    /// next to it, or inside the bundle).
    pub image_trust_policy: String,
    #[serde(default)]
    pub defaults: Settings,
    #[serde(default, rename = "ipu_class")]
    pub ipu_classes: Vec<IpuClass>,
    #[serde(default, rename = "tenant")]
    pub tenants: Vec<Tenant>,
    #[serde(default, rename = "key")]
    pub keys: Vec<KeyRule>,
    /// Keys trusted to sign placement grants ([`crate::grant`]); none: grants are not
    /// required.
    #[serde(default, rename = "grant_key")]
    pub grant_keys: Vec<GrantKey>,
}

impl DeploymentPolicy {
    /// Are placement grants enforced? True when the policy names any grant key: then every
    /// deployment needs a grant that [`crate::grant::verify`] accepts.
    pub fn grants_required(&self) -> bool {
        !self.grant_keys.is_empty()
    }

    /// The tenant named `name`, if the policy has it.
    pub fn tenant(&self, name: &str) -> Option<&Tenant> {
        self.tenants.iter().find(|t| t.name.get_ref() == name)
    }
}

/// A key trusted to sign placement grants for some tenants (`["*"]`: all).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrantKey {
    pub id: Spanned<String>,
    /// One PEM `PUBLIC KEY` block (SubjectPublicKeyInfo): Ed25519 or ECDSA P-256.
    pub public_key: Spanned<String>,
    pub tenants: Vec<Spanned<String>>,
}

impl GrantKey {
    /// The verification key (checked when the policy was parsed).
    pub fn key(&self) -> Result<VerificationKey, String> {
        let keys = VerificationKey::from_pem(self.public_key.get_ref().as_bytes())
            .map_err(|e| e.to_string())?;
        match keys.as_slice() {
            [k] if matches!(k.algorithm_name(), "ed25519" | "ecdsa-p256") => Ok(k.clone()),
            [k] => Err(format!(
                "a {} key (grant keys are Ed25519 or ECDSA P-256)",
                k.algorithm_name()
            )),
            _ => Err(format!("{} PEM blocks (give exactly one)", keys.len())),
        }
    }

    /// Does this key sign grants for `tenant`?
    pub fn trusted_for(&self, tenant: &str) -> bool {
        self.tenants
            .iter()
            .any(|t| t.get_ref() == "*" || t.get_ref() == tenant)
    }
}

/// Requirements and limits; every level (defaults, tenant, function) may set any of them and
/// the most specific setting wins.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub require_signature: Option<bool>,
    pub require_encryption: Option<bool>,
    pub require_hardware_crypto: Option<bool>,
    #[serde(default)]
    pub limits: LimitSettings,
    #[serde(default)]
    pub clone: CloneSettings,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct LimitSettings {
    pub max_image_bytes: Option<Size>,
    pub max_layers: Option<u32>,
    pub max_unpacked_bytes: Option<Size>,
    pub max_inodes: Option<u64>,
    pub max_file_bytes: Option<Size>,
    pub allow_device_nodes: Option<bool>,
}

#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CloneSettings {
    pub size: Option<Size>,
    pub ttl: Option<Ttl>,
}

#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tenant {
    pub name: Spanned<String>,
    /// May placement grants for this tenant name an image scope rather than an exact
    /// reference or digest? (Default: no.)
    #[serde(default)]
    pub grant_image_scopes: bool,
    #[serde(flatten)]
    pub settings: Settings,
    #[serde(default, rename = "function")]
    pub functions: Vec<FunctionRule>,
}

/// A rule for the functions whose name matches `name` (`*` matches any run of characters).
/// Within a tenant the first matching rule decides.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FunctionRule {
    pub name: Spanned<Pattern>,
    /// Image scopes this function may run: references with `*` wildcards, e.g.
    /// `docker://registry.example/acme/*`.
    pub images: Vec<Spanned<Pattern>>,
    /// IPU classes this function may run on (default: any enrolled class).
    #[serde(default)]
    pub ipu_classes: Vec<Spanned<String>>,
    #[serde(flatten)]
    pub settings: Settings,
}

/// Which layer key may be released for which images, tenants and IPU classes.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyRule {
    pub id: Spanned<String>,
    pub images: Vec<Spanned<Pattern>>,
    pub tenants: Vec<Spanned<String>>,
    pub ipu_classes: Vec<Spanned<String>>,
}

/// Attestation reference values of a class of IPUs.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IpuClass {
    pub name: Spanned<String>,
    /// `sha256` or `sha384`.
    pub pcr_bank: Spanned<String>,
    /// PCR index -> expected digest (hex).
    #[serde(default)]
    pub pcrs: BTreeMap<String, Spanned<String>>,
    /// Alternatively: measurements allowed in the event log (hex digests).
    #[serde(default)]
    pub allowed_measurements: Vec<Spanned<String>>,
}

/// A byte size: an integer, or a string with a K/M/G/T suffix (powers of 1024).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Size(pub u64);

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) => Ok(Size(n)),
            Raw::S(s) => parse_size(&s).map(Size).map_err(serde::de::Error::custom),
        }
    }
}

/// A size that does not parse (the text given).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a size (a number with an optional K, M, G or T suffix)")]
pub struct SizeError(pub String);

/// `1024`, `"512K"`, `"8G"`, `"2GiB"`.
pub fn parse_size(s: &str) -> Result<u64, SizeError> {
    let t = s.trim().trim_end_matches("iB").trim_end_matches('B');
    let (num, mult) = match t.as_bytes().last() {
        Some(b'K' | b'k') => (&t[..t.len() - 1], 1u64 << 10),
        Some(b'M' | b'm') => (&t[..t.len() - 1], 1 << 20),
        Some(b'G' | b'g') => (&t[..t.len() - 1], 1 << 30),
        Some(b'T' | b't') => (&t[..t.len() - 1], 1 << 40),
        _ => (t, 1),
    };
    num.trim()
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| SizeError(s.to_string()))
}

/// A time to live: `"15m"`, `"2h"`, `"90s"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Ttl(#[serde(with = "secs")] pub Duration);

mod secs {
    pub fn serialize<S: serde::Serializer>(
        d: &std::time::Duration,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_secs())
    }
}

impl<'de> Deserialize<'de> for Ttl {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let t = humantime::parse_duration(&s).map_err(|e| {
            serde::de::Error::custom(format!("{s:?} is not a duration (like 15m or 2h): {e}"))
        })?;
        if t.is_zero() {
            return Err(serde::de::Error::custom("a time to live of zero"));
        }
        Ok(Ttl(t))
    }
}

/// A problem in a document, with its position.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    pub line: usize,
    pub column: usize,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: {}", self.line, self.column, self.message)
    }
}

/// Errors that make a document unusable, all of them, each positioned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParseError {
    pub origin: String,
    pub problems: Vec<Problem>,
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{}:{p}", self.origin)?;
        }
        Ok(())
    }
}

impl std::error::Error for ParseError {}

/// 1-based line and column of a byte offset.
fn position(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before
        .rfind('\n')
        .map_or(before.len(), |nl| before.len() - nl - 1)
        + 1;
    (line, column)
}

/// Settings are flattened into tenant and function tables, and the parser then reports an
/// unknown field at its table; point at the field's own line instead.
fn unknown_field_offset(text: &str, span: Range<usize>, message: &str) -> usize {
    let Some(field) = message
        .strip_prefix("unknown field `")
        .and_then(|m| m.split('`').next())
    else {
        return span.start;
    };
    let end = span.end.min(text.len());
    let mut offset = span.start;
    for line in text[span.start..end].split_inclusive('\n') {
        let key = line.trim_start();
        if key
            .strip_prefix(field)
            .is_some_and(|rest| rest.trim_start().starts_with('='))
        {
            return offset + (line.len() - key.len());
        }
        offset += line.len();
    }
    span.start
}

struct Problems<'a> {
    text: &'a str,
    list: Vec<Problem>,
}

impl Problems<'_> {
    fn at(&mut self, span: Range<usize>, message: impl Into<String>) {
        let (line, column) = position(self.text, span.start);
        self.list.push(Problem {
            line,
            column,
            message: message.into(),
        });
    }
}

/// Parses and checks a deployment policy. `origin` names the document in errors.
pub fn parse(text: &str, origin: &str) -> Result<DeploymentPolicy, ParseError> {
    let doc: DeploymentPolicy = toml::from_str(text).map_err(|e| {
        let offset = e
            .span()
            .map_or(0, |s| unknown_field_offset(text, s, e.message()));
        let (line, column) = position(text, offset);
        ParseError {
            origin: origin.to_string(),
            problems: vec![Problem {
                line,
                column,
                message: e.message().trim().to_string(),
            }],
        }
    })?;
    let mut p = Problems {
        text,
        list: Vec::new(),
    };
    check(&doc, &mut p);
    if p.list.is_empty() {
        Ok(doc)
    } else {
        Err(ParseError {
            origin: origin.to_string(),
            problems: p.list,
        })
    }
}

fn check_hex(p: &mut Problems<'_>, v: &Spanned<String>, bytes: usize, what: &str) {
    let s = v.get_ref();
    if s.len() != bytes * 2 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        p.at(
            v.span(),
            format!("{what} {s:?} is not {} hex digits", bytes * 2),
        );
    }
}

fn check(doc: &DeploymentPolicy, p: &mut Problems<'_>) {
    if *doc.schema.get_ref() != SCHEMA_VERSION {
        p.at(
            doc.schema.span(),
            format!(
                "schema version {} is not supported (this build reads {SCHEMA_VERSION})",
                doc.schema.get_ref()
            ),
        );
    }
    let mut classes = HashSet::new();
    for class in &doc.ipu_classes {
        if !classes.insert(class.name.get_ref().clone()) {
            p.at(
                class.name.span(),
                format!("IPU class {:?} is defined twice", class.name.get_ref()),
            );
        }
        let bytes = match class.pcr_bank.get_ref().as_str() {
            "sha256" => 32,
            "sha384" => 48,
            other => {
                p.at(
                    class.pcr_bank.span(),
                    format!("PCR bank {other:?} (use sha256 or sha384)"),
                );
                32
            }
        };
        if class.pcrs.is_empty() && class.allowed_measurements.is_empty() {
            p.at(
                class.name.span(),
                format!(
                    "IPU class {:?} has no reference values (pcrs or allowed_measurements)",
                    class.name.get_ref()
                ),
            );
        }
        for (index, digest) in &class.pcrs {
            match index.parse::<u8>() {
                Ok(i) if i < 24 => {}
                _ => p.at(digest.span(), format!("PCR index {index:?} is not 0 to 23")),
            }
            check_hex(p, digest, bytes, "PCR digest");
        }
        for m in &class.allowed_measurements {
            check_hex(p, m, bytes, "measurement");
        }
    }
    let known_class = |p: &mut Problems<'_>, c: &Spanned<String>| {
        if !classes.contains(c.get_ref()) {
            p.at(c.span(), format!("unknown IPU class {:?}", c.get_ref()));
        }
    };
    let mut tenants = HashSet::new();
    for t in &doc.tenants {
        if t.name.get_ref().is_empty() || !tenants.insert(t.name.get_ref().clone()) {
            p.at(
                t.name.span(),
                format!("tenant {:?} is empty or defined twice", t.name.get_ref()),
            );
        }
        for f in &t.functions {
            if f.images.is_empty() {
                p.at(
                    f.name.span(),
                    "a function rule with no images allows nothing",
                );
            }
            for image in &f.images {
                if let Err(e) = image.get_ref().check_image_scope() {
                    p.at(image.span(), e.to_string());
                }
            }
            for c in &f.ipu_classes {
                known_class(p, c);
            }
        }
    }
    let mut keys = HashSet::new();
    for k in &doc.keys {
        if !keys.insert(k.id.get_ref().clone()) {
            p.at(
                k.id.span(),
                format!("key {:?} is listed twice", k.id.get_ref()),
            );
        }
        for image in &k.images {
            if let Err(e) = image.get_ref().check_image_scope() {
                p.at(image.span(), e.to_string());
            }
        }
        for t in &k.tenants {
            if !tenants.contains(t.get_ref()) {
                p.at(t.span(), format!("unknown tenant {:?}", t.get_ref()));
            }
        }
        for c in &k.ipu_classes {
            known_class(p, c);
        }
    }
    let mut grant_keys = HashSet::new();
    for k in &doc.grant_keys {
        let id = k.id.get_ref();
        if !crate::grant::valid_name(id) {
            p.at(
                k.id.span(),
                format!("grant key id {id:?} must be 1 to 128 of A-Z a-z 0-9 - _ ."),
            );
        }
        if !grant_keys.insert(id.clone()) {
            p.at(k.id.span(), format!("grant key {id:?} is listed twice"));
        }
        if let Err(e) = k.key() {
            p.at(
                k.public_key.span(),
                format!("grant key {id:?}: public_key is not usable: {e}"),
            );
        }
        if k.tenants.is_empty() {
            p.at(
                k.id.span(),
                format!("grant key {id:?} lists no tenants (use [\"*\"] for all)"),
            );
        }
        for t in &k.tenants {
            if t.get_ref() == "*" {
                if k.tenants.len() > 1 {
                    p.at(t.span(), "\"*\" (all tenants) must be the only entry");
                }
            } else if !tenants.contains(t.get_ref()) {
                p.at(t.span(), format!("unknown tenant {:?}", t.get_ref()));
            }
        }
    }
}

/// Warnings about a valid document: rules that can never decide.
pub fn lint(doc: &DeploymentPolicy, text: &str) -> Vec<Problem> {
    let mut p = Problems {
        text,
        list: Vec::new(),
    };
    for t in &doc.tenants {
        for (i, f) in t.functions.iter().enumerate() {
            if let Some(earlier) = t.functions[..i]
                .iter()
                .find(|e| e.name.get_ref().covers(f.name.get_ref()))
            {
                let (line, _) = position(text, earlier.name.span().start);
                p.at(
                    f.name.span(),
                    format!(
                        "function rule {:?} of tenant {:?} is unreachable: the rule {:?} at line {line} matches every name it does",
                        f.name.get_ref().as_str(),
                        t.name.get_ref(),
                        earlier.name.get_ref().as_str()
                    ),
                );
            }
        }
    }
    p.list
}
