//! The audit event model (schema version 1).
//!
//! Events carry identifiers only: who acted, for which tenant and function, which image,
//! what kind of decision, its outcome and reason, and the *ids* of keys involved. Key
//! material has no way in: [`KeyId`] is built from an id string, key types in this project
//! implement neither `Serialize` nor `Into<KeyId>`, and `details` values are bounded text.
//!
//! The leaf of the Merkle tree is the hash of the event's canonical bytes: its JSON
//! serialization with fields in declaration order and maps sorted (what `to_canonical`
//! writes). The log stores exactly those bytes, so verification never re-serializes.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

pub const SCHEMA_VERSION: u32 = 1;

/// Bounds on untrusted text in events (from requests, registries, policies).
pub const MAX_FIELD_LEN: usize = 1024;
pub const MAX_REASON_LEN: usize = 4096;
pub const MAX_DETAILS: usize = 32;
pub const MAX_KEY_IDS: usize = 64;

/// What happened.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EventKind {
    PolicyDecision,
    SignatureVerify,
    AttestationVerify,
    KeyRelease,
    KeyDeny,
    LayerDecrypt,
    LayerUnpack,
    BaseBuild,
    CloneCreate,
    ExportAttach,
    ExportHotRemove,
    CloneErase,
    RecoveryOrphanErased,
    /// `admin.<action>`: key management, enrollment, policy loads.
    Admin(String),
    Error,
}

impl EventKind {
    pub fn as_str(&self) -> std::borrow::Cow<'static, str> {
        use std::borrow::Cow::Borrowed;
        match self {
            EventKind::PolicyDecision => Borrowed("policy.decision"),
            EventKind::SignatureVerify => Borrowed("signature.verify"),
            EventKind::AttestationVerify => Borrowed("attestation.verify"),
            EventKind::KeyRelease => Borrowed("key.release"),
            EventKind::KeyDeny => Borrowed("key.deny"),
            EventKind::LayerDecrypt => Borrowed("layer.decrypt"),
            EventKind::LayerUnpack => Borrowed("layer.unpack"),
            EventKind::BaseBuild => Borrowed("base.build"),
            EventKind::CloneCreate => Borrowed("clone.create"),
            EventKind::ExportAttach => Borrowed("export.attach"),
            EventKind::ExportHotRemove => Borrowed("export.hot_remove"),
            EventKind::CloneErase => Borrowed("clone.erase"),
            EventKind::RecoveryOrphanErased => Borrowed("recovery.orphan_erased"),
            EventKind::Admin(a) => std::borrow::Cow::Owned(format!("admin.{a}")),
            EventKind::Error => Borrowed("error"),
        }
    }
}

impl FromStr for EventKind {
    type Err = EventError;
    fn from_str(s: &str) -> Result<Self, EventError> {
        Ok(match s {
            "policy.decision" => EventKind::PolicyDecision,
            "signature.verify" => EventKind::SignatureVerify,
            "attestation.verify" => EventKind::AttestationVerify,
            "key.release" => EventKind::KeyRelease,
            "key.deny" => EventKind::KeyDeny,
            "layer.decrypt" => EventKind::LayerDecrypt,
            "layer.unpack" => EventKind::LayerUnpack,
            "base.build" => EventKind::BaseBuild,
            "clone.create" => EventKind::CloneCreate,
            "export.attach" => EventKind::ExportAttach,
            "export.hot_remove" => EventKind::ExportHotRemove,
            "clone.erase" => EventKind::CloneErase,
            "recovery.orphan_erased" => EventKind::RecoveryOrphanErased,
            "error" => EventKind::Error,
            other => match other.strip_prefix("admin.") {
                Some(a)
                    if !a.is_empty()
                        && a.len() <= 64
                        && a.bytes()
                            .all(|b| b.is_ascii_lowercase() || b == b'_' || b == b'.') =>
                {
                    EventKind::Admin(a.to_string())
                }
                _ => return Err(EventError::UnknownKind(other.to_string())),
            },
        })
    }
}

impl fmt::Display for EventKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.as_str())
    }
}

impl Serialize for EventKind {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.as_str())
    }
}

impl<'de> Deserialize<'de> for EventKind {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// How it ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// A decision that let something proceed (policy accept, key release).
    Allowed,
    /// A decision that refused (policy reject, key deny, unsafe layer).
    Denied,
    /// An operation that completed (decrypt, build, erase).
    Success,
    /// An operation that failed for an operational reason.
    Failure,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Allowed => "allowed",
            Outcome::Denied => "denied",
            Outcome::Success => "success",
            Outcome::Failure => "failure",
        }
    }
}

impl FromStr for Outcome {
    type Err = EventError;
    fn from_str(s: &str) -> Result<Self, EventError> {
        Ok(match s {
            "allowed" => Outcome::Allowed,
            "denied" => Outcome::Denied,
            "success" => Outcome::Success,
            "failure" => Outcome::Failure,
            other => return Err(EventError::UnknownOutcome(other.to_string())),
        })
    }
}

/// Who acted.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Actor {
    /// Client certificate subject, when the request came over mTLS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subject: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipu_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_id: Option<String>,
}

/// The image an event is about.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageId {
    pub reference: String,
    /// `sha256:<hex>` of the manifest, once known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
}

/// The identifier of a key (a broker key name, a fingerprint): never key material.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct KeyId(String);

impl KeyId {
    /// An id of at most 256 printable ASCII characters.
    pub fn new(id: impl Into<String>) -> Result<Self, EventError> {
        let id = id.into();
        if id.is_empty() || id.len() > 256 || !id.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(EventError::KeyId { len: id.len() });
        }
        Ok(Self(id))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// One audit event as stored.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Event {
    /// Schema version.
    pub v: u32,
    /// Position in the log (the Merkle leaf index), assigned at append.
    pub seq: u64,
    /// Unix time in nanoseconds, assigned at append; never decreases along the log.
    pub time_ns: u64,
    pub service: String,
    #[serde(default)]
    pub actor: Actor,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub function: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<ImageId>,
    pub kind: EventKind,
    pub outcome: Outcome,
    pub reason: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub key_ids: Vec<KeyId>,
    /// Further non-secret context (layer digest, error class, policy scope).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub details: BTreeMap<String, String>,
}

impl Event {
    /// A new event; `seq` and `time_ns` are set by the log.
    pub fn new(
        service: impl Into<String>,
        kind: EventKind,
        outcome: Outcome,
        reason: impl Into<String>,
    ) -> Self {
        Self {
            v: SCHEMA_VERSION,
            seq: 0,
            time_ns: 0,
            service: service.into(),
            actor: Actor::default(),
            tenant: None,
            function: None,
            image: None,
            kind,
            outcome,
            reason: reason.into(),
            key_ids: Vec::new(),
            details: BTreeMap::new(),
        }
    }

    pub fn tenant(mut self, t: impl Into<String>) -> Self {
        self.tenant = Some(t.into());
        self
    }

    pub fn function(mut self, f: impl Into<String>) -> Self {
        self.function = Some(f.into());
        self
    }

    pub fn image(mut self, reference: impl Into<String>, digest: Option<String>) -> Self {
        self.image = Some(ImageId {
            reference: reference.into(),
            digest,
        });
        self
    }

    pub fn actor(mut self, actor: Actor) -> Self {
        self.actor = actor;
        self
    }

    pub fn key_id(mut self, id: KeyId) -> Self {
        self.key_ids.push(id);
        self
    }

    pub fn detail(mut self, k: impl Into<String>, v: impl Into<String>) -> Self {
        self.details.insert(k.into(), v.into());
        self
    }

    /// The canonical bytes (the Merkle leaf input).
    pub fn to_canonical(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("events serialize")
    }

    pub fn from_canonical(bytes: &[u8]) -> Result<Self, EventError> {
        serde_json::from_slice(bytes).map_err(|e| EventError::NotAnEvent(e.to_string()))
    }

    pub fn time(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_nanos(self.time_ns)
    }

    /// Checks the bounds on untrusted text; the log refuses events that break them.
    pub fn validate(&self) -> Result<(), EventError> {
        let check = |name: &str, s: &str, max: usize| {
            if s.len() > max {
                return Err(EventError::TooLong {
                    field: name.to_string(),
                    len: s.len(),
                    max,
                });
            }
            if s.contains('\0') {
                return Err(EventError::Nul {
                    field: name.to_string(),
                });
            }
            Ok(())
        };
        if self.v != SCHEMA_VERSION {
            return Err(EventError::SchemaVersion { found: self.v });
        }
        if self.service.is_empty() {
            return Err(EventError::EmptyService);
        }
        check("service", &self.service, MAX_FIELD_LEN)?;
        for (name, v) in [
            ("actor.subject", &self.actor.subject),
            ("actor.ipu_id", &self.actor.ipu_id),
            ("actor.host_id", &self.actor.host_id),
            ("tenant", &self.tenant),
            ("function", &self.function),
        ] {
            if let Some(v) = v {
                check(name, v, MAX_FIELD_LEN)?;
            }
        }
        if let Some(img) = &self.image {
            check("image.reference", &img.reference, MAX_FIELD_LEN)?;
            if let Some(d) = &img.digest {
                check("image.digest", d, MAX_FIELD_LEN)?;
            }
        }
        check("reason", &self.reason, MAX_REASON_LEN)?;
        if self.key_ids.len() > MAX_KEY_IDS {
            return Err(EventError::TooManyKeyIds {
                count: self.key_ids.len(),
            });
        }
        if self.details.len() > MAX_DETAILS {
            return Err(EventError::TooManyDetails {
                count: self.details.len(),
            });
        }
        for (k, v) in &self.details {
            check("detail key", k, 64)?;
            check(&format!("detail {k}"), v, MAX_FIELD_LEN)?;
        }
        Ok(())
    }
}

/// RFC 3339 UTC with nanoseconds.
pub fn format_time(time_ns: u64) -> String {
    humantime::format_rfc3339_nanos(UNIX_EPOCH + Duration::from_nanos(time_ns)).to_string()
}

/// Parses RFC 3339 (`2026-11-29T08:00:00Z`) into Unix nanoseconds.
pub fn parse_time(s: &str) -> Result<u64, TimeError> {
    let t = humantime::parse_rfc3339_weak(s).map_err(|e| TimeError::NotRfc3339 {
        input: s.to_string(),
        reason: e.to_string(),
    })?;
    let d = t
        .duration_since(UNIX_EPOCH)
        .map_err(|_| TimeError::Before1970(s.to_string()))?;
    u64::try_from(d.as_nanos()).map_err(|_| TimeError::TooFar(s.to_string()))
}

/// Why an event, or a part of one, was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EventError {
    #[error("unknown event kind {0:?}")]
    UnknownKind(String),
    #[error("unknown outcome {0:?}")]
    UnknownOutcome(String),
    #[error("key id must be 1 to 256 printable ASCII characters, got {len} bytes")]
    KeyId { len: usize },
    /// The bytes are not the JSON of an event (the parser's message).
    #[error("not an audit event: {0}")]
    NotAnEvent(String),
    #[error("schema version {found} (this log writes {SCHEMA_VERSION})")]
    SchemaVersion { found: u32 },
    #[error("service is empty")]
    EmptyService,
    #[error("{field} is {len} bytes (limit {max})")]
    TooLong {
        field: String,
        len: usize,
        max: usize,
    },
    #[error("{field} contains a NUL byte")]
    Nul { field: String },
    #[error("{count} key ids (limit {MAX_KEY_IDS})")]
    TooManyKeyIds { count: usize },
    #[error("{count} details (limit {MAX_DETAILS})")]
    TooManyDetails { count: usize },
}

/// Why a time argument was refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TimeError {
    #[error("{input:?} is not an RFC 3339 time: {reason}")]
    NotRfc3339 { input: String, reason: String },
    #[error("{0:?} is before 1970")]
    Before1970(String),
    #[error("{0:?} is too far in the future")]
    TooFar(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_round_trip_and_unknown_kinds_are_refused() {
        for k in [
            "policy.decision",
            "signature.verify",
            "attestation.verify",
            "key.release",
            "key.deny",
            "layer.decrypt",
            "layer.unpack",
            "base.build",
            "clone.create",
            "export.attach",
            "export.hot_remove",
            "clone.erase",
            "recovery.orphan_erased",
            "admin.key_rotate",
            "error",
        ] {
            assert_eq!(k.parse::<EventKind>().unwrap().as_str(), k);
        }
        for bad in ["", "admin.", "admin.Key", "policy", "key.leak"] {
            assert!(bad.parse::<EventKind>().is_err(), "{bad}");
        }
    }

    #[test]
    fn canonical_bytes_are_stable_and_strict() {
        let e = Event::new(
            "ipu-image-svc",
            EventKind::PolicyDecision,
            Outcome::Denied,
            "no signature",
        )
        .tenant("acme")
        .image("docker://r/x:1", Some("sha256:00".into()))
        .detail("scope", "docker")
        .detail("class", "no-signature");
        let bytes = e.to_canonical();
        assert_eq!(Event::from_canonical(&bytes).unwrap(), e);
        assert_eq!(Event::from_canonical(&bytes).unwrap().to_canonical(), bytes);
        // Details are sorted, so insertion order does not change the leaf.
        let text = String::from_utf8(bytes).unwrap();
        assert!(text.find("\"class\"").unwrap() < text.find("\"scope\"").unwrap());
        let extra = text.replacen("{\"v\":1", "{\"v\":1,\"secret\":\"x\"", 1);
        assert!(Event::from_canonical(extra.as_bytes()).is_err());
    }

    #[test]
    fn validation_bounds_untrusted_text() {
        let ok = Event::new("svc", EventKind::Error, Outcome::Failure, "r");
        ok.validate().unwrap();
        assert!(ok.clone().tenant("a\0b").validate().is_err());
        assert!(ok.clone().function("f".repeat(2000)).validate().is_err());
        assert!(KeyId::new("has space").is_err());
        assert!(KeyId::new("k".repeat(300)).is_err());
        let t = parse_time("2026-11-29T08:00:00Z").unwrap();
        assert_eq!(format_time(t), "2026-11-29T08:00:00.000000000Z");
    }
}
