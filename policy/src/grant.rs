//! Placement grants: the control plane's signed statement that one function of one tenant
//! may run one image on one IPU, exported to one host, for a short time. The
//! IPU service and the key broker check a grant instead of taking the host's word for
//! which tenant a request is for (threat model T30, T37).
//!
//! A grant is a DSSE envelope ([`crate::dsse`]) of type [`PAYLOAD_TYPE`] whose payload is
//! a [`Grant`] as JSON:
//!
//! ```json
//! {"version": 1, "serial": "9f2c...", "tenant": "acme", "function": "resize-hd",
//!  "image": {"reference": "docker://registry.example/acme/resize-hd@sha256:..."},
//!  "ipu": "ipu-0042", "host": "worker-7.example",
//!  "not_before": "2026-12-04T21:00:00Z", "not_after": "2026-12-04T21:10:00Z"}
//! ```
//!
//! `image` is one of `{"reference": REF}` (the request must name the same reference),
//! `{"digest": "sha256:..."}` (the request must be pinned by that digest) or
//! `{"scope": PATTERN}` (the request must match the pattern; only for tenants whose
//! `grant_image_scopes` is true).
//!
//! The deployment policy names the keys trusted to sign grants (`[[grant_key]]`, each for
//! some tenants or all); a newer policy bundle rotates them. [`verify`] is pure: the
//! caller passes the policy, what it expects and the time.
//!
//! **Replay is the caller's business.** A grant verifies as often as it is presented until
//! it expires; a service that must accept each grant once remembers the serials it has
//! accepted until their `not_after` (plus [`CLOCK_SKEW`]) and refuses a serial it has seen.

use std::fmt;
use std::time::{Duration, SystemTime};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use serde::{Deserialize, Serialize};

use crate::deploy::{DeploymentPolicy, Pattern};
use crate::dsse::{self, pae, Envelope, SignError};
use crate::reference::{Digest, ImageReference};

/// The DSSE payload type of a placement grant.
pub const PAYLOAD_TYPE: &str = "application/vnd.ipu-image.placement-grant.v1+json";
/// The payload version this code reads and writes.
pub const VERSION: u32 = 1;
/// The longest validity window a grant may have.
pub const MAX_VALIDITY: Duration = Duration::from_secs(24 * 60 * 60);
/// How far the verifier's clock may be off the issuer's.
pub const CLOCK_SKEW: Duration = Duration::from_secs(60);
/// Envelopes larger than this are refused before parsing.
pub const MAX_GRANT_BYTES: usize = 64 << 10;

/// The statement a grant makes. Fields are public so the control plane can build one;
/// [`Grant::validate`] checks it (as [`sign`] and [`verify`] do).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Grant {
    /// [`VERSION`].
    pub version: u32,
    /// Unique per grant: 16 to 128 of `A-Z a-z 0-9 - _` ([`new_serial`] makes 128 random
    /// bits in hex).
    pub serial: String,
    pub tenant: String,
    pub function: String,
    pub image: ImageClaim,
    /// The IPU's enrolled identity.
    pub ipu: String,
    /// The host's identity: a DNS name or URI of its export client certificate's SAN.
    pub host: String,
    #[serde(with = "rfc3339")]
    pub not_before: SystemTime,
    #[serde(with = "rfc3339")]
    pub not_after: SystemTime,
}

/// Which images a grant covers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", deny_unknown_fields)]
pub enum ImageClaim {
    /// Exactly this reference (compared in canonical form).
    Reference(String),
    /// Any reference pinned by this digest (`sha256:<hex>`).
    Digest(String),
    /// Any reference matching this image scope pattern (`*` wildcards); only for tenants
    /// whose `grant_image_scopes` is true.
    Scope(String),
}

impl fmt::Display for ImageClaim {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ImageClaim::Reference(r) => write!(f, "reference {r}"),
            ImageClaim::Digest(d) => write!(f, "digest {d}"),
            ImageClaim::Scope(s) => write!(f, "scope {s}"),
        }
    }
}

mod rfc3339 {
    use std::time::SystemTime;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&super::format_time(*t))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<SystemTime, D::Error> {
        let s = String::deserialize(d)?;
        super::parse_time(&s).map_err(serde::de::Error::custom)
    }
}

/// An RFC 3339 UTC time (`2026-12-04T21:00:00Z`) as grants carry it.
pub fn parse_time(s: &str) -> Result<SystemTime, String> {
    humantime::parse_rfc3339(s)
        .map_err(|e| format!("{s:?} is not an RFC 3339 UTC time (like 2026-12-04T21:00:00Z): {e}"))
}

/// The first second grants cannot carry (year 10000).
const END_OF_TIME: u64 = 253_402_300_800;

fn representable(t: SystemTime) -> bool {
    t.duration_since(std::time::UNIX_EPOCH)
        .is_ok_and(|d| d.as_secs() < END_OF_TIME)
}

/// A time as grants carry it: RFC 3339 UTC, whole seconds (a time before 1970 or after
/// 9999, which no grant carries, is shown as `out-of-range`).
pub fn format_time(t: SystemTime) -> String {
    if representable(t) {
        humantime::format_rfc3339_seconds(t).to_string()
    } else {
        "out-of-range".into()
    }
}

/// Tenant, function, IPU and key names: 1 to 128 of `A-Z a-z 0-9 - _ .`.
pub fn valid_name(s: &str) -> bool {
    (1..=128).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

fn valid_serial(s: &str) -> bool {
    (16..=128).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_'))
}

/// A host identity: a DNS name (compared case-insensitively) or a URI (compared exactly;
/// anything with `:`).
fn valid_host(s: &str) -> bool {
    (1..=1024).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_graphic())
}

fn host_matches(granted: &str, presented: &str) -> bool {
    if granted.contains(':') {
        granted == presented
    } else {
        granted.eq_ignore_ascii_case(presented)
    }
}

/// 128 random bits in hex, for [`Grant::serial`].
pub fn new_serial() -> Result<String, SignError> {
    let mut bytes = [0u8; 16];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .map_err(|_| SignError("no randomness for the serial".into()))?;
    Ok(hex::encode(bytes))
}

impl Grant {
    /// Checks the grant on its own: version, names, serial, host, window (`not_before` <
    /// `not_after`, at most [`MAX_VALIDITY`]) and the image claim's syntax. The error says
    /// which field is wrong.
    pub fn validate(&self) -> Result<(), String> {
        if self.version != VERSION {
            return Err(format!(
                "version {} (this build reads {VERSION})",
                self.version
            ));
        }
        if !valid_serial(&self.serial) {
            return Err(format!(
                "serial {:?} must be 16 to 128 of A-Z a-z 0-9 - _",
                self.serial
            ));
        }
        for (field, v) in [
            ("tenant", &self.tenant),
            ("function", &self.function),
            ("ipu", &self.ipu),
        ] {
            if !valid_name(v) {
                return Err(format!(
                    "{field} {v:?} must be 1 to 128 of A-Z a-z 0-9 - _ ."
                ));
            }
        }
        if !valid_host(&self.host) {
            return Err(format!(
                "host {:?} must be a DNS name or URI (1 to 1024 printable characters)",
                self.host
            ));
        }
        self.window()?;
        match &self.image {
            ImageClaim::Reference(r) => {
                ImageReference::parse(r).map_err(|e| format!("image reference: {e}"))?;
            }
            ImageClaim::Digest(d) => {
                Digest::parse(d).map_err(|e| format!("image digest: {e}"))?;
            }
            ImageClaim::Scope(s) => {
                let p = Pattern::new(s.clone()).map_err(|e| format!("image scope: {e}"))?;
                p.check_image_scope()
                    .map_err(|e| format!("image scope: {e}"))?;
            }
        }
        Ok(())
    }

    /// The length of the validity window, checked.
    fn window(&self) -> Result<Duration, String> {
        if !representable(self.not_before) || !representable(self.not_after) {
            return Err("times must be between 1970 and 9999".into());
        }
        match self.not_after.duration_since(self.not_before) {
            Ok(d) if d.is_zero() => Err("not_before is not before not_after".into()),
            Err(_) => Err("not_before is not before not_after".into()),
            Ok(d) if d > MAX_VALIDITY => Err(format!(
                "the validity window is {}, longer than the {} allowed",
                humantime::format_duration(d),
                humantime::format_duration(MAX_VALIDITY)
            )),
            Ok(d) => Ok(d),
        }
    }
}

/// Signs `grant` (validated first) with a PEM private key: Ed25519 or ECDSA P-256 PKCS#8
/// (`PRIVATE KEY`), or P-256 SEC1 (`EC PRIVATE KEY`). Returns the envelope (JSON, final
/// newline) and the signer's key id (`sha256:` of its SubjectPublicKeyInfo DER).
pub fn sign(grant: &Grant, private_pem: &[u8]) -> Result<(String, String), SignError> {
    grant
        .validate()
        .map_err(|e| SignError(format!("invalid grant: {e}")))?;
    let payload = serde_json::to_vec(grant).expect("grant serializes");
    dsse::sign(PAYLOAD_TYPE, &payload, private_pem, true)
}

/// What the verifier knows independently of the grant.
#[derive(Clone, Copy, Debug)]
pub struct Expectation<'a> {
    /// This IPU's enrolled identity.
    pub ipu: &'a str,
    /// The identity (SAN DNS name or URI) of the host's export client certificate; `None`:
    /// not checked (an export with no host identity, e.g. over a Unix socket).
    pub host: Option<&'a str>,
    /// The image reference the request names, as given.
    pub image: &'a str,
    /// The current time.
    pub now: SystemTime,
}

/// A grant that verified: signed by a key the policy trusts for its tenant, in its window,
/// for this IPU, host and image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifiedGrant {
    pub grant: Grant,
    /// The id (`[[grant_key]] id`) of the key that signed it.
    pub signer_id: String,
    /// The signer's key id as in the envelope (`sha256:<hex>` of its SPKI DER).
    pub signer_keyid: String,
}

impl VerifiedGrant {
    pub fn tenant(&self) -> &str {
        &self.grant.tenant
    }
    pub fn function(&self) -> &str {
        &self.grant.function
    }
    /// Remember it until [`VerifiedGrant::not_after`] to refuse replays.
    pub fn serial(&self) -> &str {
        &self.grant.serial
    }
    pub fn not_after(&self) -> SystemTime {
        self.grant.not_after
    }
    pub fn image(&self) -> &ImageClaim {
        &self.grant.image
    }
}

/// Why a grant was refused; each is a security decision the caller audits, with a stable
/// [`GrantError::reason_code`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum GrantError {
    #[error("malformed grant: {0}")]
    Malformed(String),
    #[error("the grant is not signed")]
    Unsigned,
    #[error("no signature by a grant key of the deployment policy (signed by {0})")]
    UnknownSigner(String),
    #[error(
        "the signature by grant key {0:?} does not verify: the grant was changed after signing"
    )]
    BadSignature(String),
    #[error("grant key {key:?} is not trusted to sign grants for tenant {tenant:?}")]
    UntrustedSigner { key: String, tenant: String },
    #[error("tenant {0:?} is not in the deployment policy")]
    UnknownTenant(String),
    #[error("the validity window is invalid: {0}")]
    BadWindow(String),
    #[error("not valid before {not_before} (now {now})")]
    NotYetValid { not_before: String, now: String },
    #[error("expired at {not_after} (now {now})")]
    Expired { not_after: String, now: String },
    #[error("the grant is for IPU {granted:?}, not this IPU {expected:?}")]
    WrongIpu { granted: String, expected: String },
    #[error("the grant is for host {granted:?}, not the host {presented:?} that asks")]
    WrongHost { granted: String, presented: String },
    #[error("the grant's {claim} does not cover the requested image {requested:?}: {why}")]
    WrongImage {
        claim: String,
        requested: String,
        why: String,
    },
    #[error("the grant names image scope {scope:?}, but tenant {tenant:?} may not be granted scopes (grant_image_scopes)")]
    ScopeNotAllowed { scope: String, tenant: String },
}

impl GrantError {
    /// A short stable string for audit records.
    pub fn reason_code(&self) -> &'static str {
        match self {
            GrantError::Malformed(_) => "malformed",
            GrantError::Unsigned => "unsigned",
            GrantError::UnknownSigner(_) => "unknown-signer",
            GrantError::BadSignature(_) => "bad-signature",
            GrantError::UntrustedSigner { .. } => "untrusted-signer",
            GrantError::UnknownTenant(_) => "unknown-tenant",
            GrantError::BadWindow(_) => "bad-window",
            GrantError::NotYetValid { .. } => "not-yet-valid",
            GrantError::Expired { .. } => "expired",
            GrantError::WrongIpu { .. } => "wrong-ipu",
            GrantError::WrongHost { .. } => "wrong-host",
            GrantError::WrongImage { .. } => "wrong-image",
            GrantError::ScopeNotAllowed { .. } => "scope-not-allowed",
        }
    }
}

/// A grant envelope decoded without any trust: for `policy grant inspect`.
#[derive(Clone, Debug)]
pub struct Unverified {
    /// The payload, if it parses as a grant (it is not validated).
    pub grant: Result<Grant, String>,
    /// The key ids of the signatures.
    pub keyids: Vec<String>,
}

fn envelope(bytes: &[u8]) -> Result<(Envelope, Vec<u8>), GrantError> {
    if bytes.len() > MAX_GRANT_BYTES {
        return Err(GrantError::Malformed(format!(
            "{} bytes (limit {MAX_GRANT_BYTES})",
            bytes.len()
        )));
    }
    let env: Envelope = serde_json::from_slice(bytes)
        .map_err(|e| GrantError::Malformed(format!("not a DSSE envelope: {e}")))?;
    if env.payload_type != PAYLOAD_TYPE {
        return Err(GrantError::Malformed(format!(
            "payload type {:?} (expected {PAYLOAD_TYPE})",
            env.payload_type
        )));
    }
    let payload = B64
        .decode(&env.payload)
        .map_err(|_| GrantError::Malformed("payload is not base64".into()))?;
    Ok((env, payload))
}

/// Decodes a grant envelope **without verifying anything**.
pub fn inspect(bytes: &[u8]) -> Result<Unverified, GrantError> {
    let (env, payload) = envelope(bytes)?;
    Ok(Unverified {
        grant: serde_json::from_slice(&payload).map_err(|e| e.to_string()),
        keyids: env.signatures.into_iter().map(|s| s.keyid).collect(),
    })
}

/// Verifies a grant envelope against the deployment policy's grant keys and what the
/// verifier expects. Checks, in order, each refusal its own [`GrantError`]:
///
/// 1. the envelope (size, JSON, payload type, base64) — `Malformed`;
/// 2. a signature by a `[[grant_key]]` of `policy` — `Unsigned`, `UnknownSigner`,
///    `BadSignature` (the payload is parsed only once a signature verifies);
/// 3. the payload is a valid grant — `Malformed`;
/// 4. the tenant is in the policy and a verified signer is trusted for it —
///    `UnknownTenant`, `UntrustedSigner`;
/// 5. the window: at most [`MAX_VALIDITY`] — `BadWindow`; `now` within it, give or take
///    [`CLOCK_SKEW`] — `NotYetValid`, `Expired`;
/// 6. the IPU — `WrongIpu`; the host, if `expect.host` is given (DNS names
///    case-insensitively, URIs exactly) — `WrongHost`;
/// 7. the image — `ScopeNotAllowed`, `WrongImage`.
///
/// Replays are not detected here: see the module documentation.
pub fn verify(
    bytes: &[u8],
    policy: &DeploymentPolicy,
    expect: &Expectation<'_>,
) -> Result<VerifiedGrant, GrantError> {
    let (env, payload) = envelope(bytes)?;
    if env.signatures.is_empty() {
        return Err(GrantError::Unsigned);
    }
    let message = pae(&env.payload_type, &payload);
    // (policy id, keyid) of every signature that verified.
    let mut signers: Vec<(&crate::deploy::GrantKey, String)> = Vec::new();
    for s in &env.signatures {
        for gk in &policy.grant_keys {
            // The policy was checked at parse time; a key that does not load is skipped.
            let Ok(key) = gk.key() else { continue };
            if key.fingerprint() != s.keyid {
                continue;
            }
            let sig = B64
                .decode(&s.sig)
                .map_err(|_| GrantError::Malformed("signature is not base64".into()))?;
            if !key.verify(&message, &sig) {
                return Err(GrantError::BadSignature(gk.id.get_ref().clone()));
            }
            signers.push((gk, s.keyid.clone()));
        }
    }
    if signers.is_empty() {
        let ids: Vec<&str> = env.signatures.iter().map(|s| s.keyid.as_str()).collect();
        return Err(GrantError::UnknownSigner(ids.join(", ")));
    }
    // Only now, authenticated, is the payload parsed.
    let grant: Grant = serde_json::from_slice(&payload)
        .map_err(|e| GrantError::Malformed(format!("payload: {e}")))?;
    if grant.version != VERSION {
        return Err(GrantError::Malformed(format!(
            "version {} (this build reads {VERSION})",
            grant.version
        )));
    }
    if let Err(e) = grant.window() {
        return Err(GrantError::BadWindow(e));
    }
    grant.validate().map_err(GrantError::Malformed)?;
    let Some(tenant) = policy.tenant(&grant.tenant) else {
        return Err(GrantError::UnknownTenant(grant.tenant.clone()));
    };
    let Some((signer, signer_keyid)) = signers.iter().find(|(gk, _)| gk.trusted_for(&grant.tenant))
    else {
        return Err(GrantError::UntrustedSigner {
            key: signers[0].0.id.get_ref().clone(),
            tenant: grant.tenant.clone(),
        });
    };
    if expect.now + CLOCK_SKEW < grant.not_before {
        return Err(GrantError::NotYetValid {
            not_before: format_time(grant.not_before),
            now: format_time(expect.now),
        });
    }
    if expect.now >= grant.not_after + CLOCK_SKEW {
        return Err(GrantError::Expired {
            not_after: format_time(grant.not_after),
            now: format_time(expect.now),
        });
    }
    if grant.ipu != expect.ipu {
        return Err(GrantError::WrongIpu {
            granted: grant.ipu.clone(),
            expected: expect.ipu.to_string(),
        });
    }
    if let Some(host) = expect.host {
        if !host_matches(&grant.host, host) {
            return Err(GrantError::WrongHost {
                granted: grant.host.clone(),
                presented: host.to_string(),
            });
        }
    }
    let wrong = |why: String| GrantError::WrongImage {
        claim: grant.image.to_string(),
        requested: expect.image.to_string(),
        why,
    };
    match &grant.image {
        ImageClaim::Reference(r) => {
            let requested = ImageReference::parse(expect.image)
                .map_err(|e| wrong(format!("the request's reference does not parse: {e}")))?;
            let granted = ImageReference::parse(r).map_err(|e| wrong(e.to_string()))?;
            if requested.to_string() != granted.to_string() {
                return Err(wrong("a different reference".into()));
            }
        }
        ImageClaim::Digest(d) => {
            let requested = ImageReference::parse(expect.image)
                .map_err(|e| wrong(format!("the request's reference does not parse: {e}")))?;
            let granted = Digest::parse(d).map_err(|e| wrong(e.to_string()))?;
            match requested.docker_reference().and_then(|r| r.digest()) {
                None => return Err(wrong("the request is not pinned by a digest".into())),
                Some(pinned) if *pinned != granted => {
                    return Err(wrong(format!("the request is pinned by {pinned}")))
                }
                Some(_) => {}
            }
        }
        ImageClaim::Scope(s) => {
            if !tenant.grant_image_scopes {
                return Err(GrantError::ScopeNotAllowed {
                    scope: s.clone(),
                    tenant: grant.tenant.clone(),
                });
            }
            let pattern = Pattern::new(s.clone()).map_err(|e| wrong(e.to_string()))?;
            if !pattern.matches(expect.image) {
                return Err(wrong("the reference is outside the scope".into()));
            }
        }
    }
    Ok(VerifiedGrant {
        signer_id: signer.id.get_ref().clone(),
        signer_keyid: signer_keyid.clone(),
        grant,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_payload_is_the_documented_json() {
        let g = Grant {
            version: 1,
            serial: "0123456789abcdef".into(),
            tenant: "acme".into(),
            function: "f".into(),
            image: ImageClaim::Digest(
                "sha256:35fb4eaa23f16ac6dc063cadc488c8fa324e0abc3c42391ec4998ca3eae32112".into(),
            ),
            ipu: "ipu-1".into(),
            host: "h.example".into(),
            not_before: parse_time("2026-12-04T21:00:00Z").unwrap(),
            not_after: parse_time("2026-12-04T21:10:00Z").unwrap(),
        };
        let v = serde_json::to_value(&g).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"version": 1, "serial": "0123456789abcdef", "tenant": "acme",
                "function": "f",
                "image": {"digest": "sha256:35fb4eaa23f16ac6dc063cadc488c8fa324e0abc3c42391ec4998ca3eae32112"},
                "ipu": "ipu-1", "host": "h.example",
                "not_before": "2026-12-04T21:00:00Z", "not_after": "2026-12-04T21:10:00Z"})
        );
        assert_eq!(serde_json::from_value::<Grant>(v).unwrap(), g);
        assert!(g.validate().is_ok());
    }

    #[test]
    fn an_image_claim_is_exactly_one_of_three() {
        for bad in [
            r#"{"reference": "docker://a/b:1", "digest": "sha256:00"}"#,
            r#"{"tag": "1"}"#,
            r#"{}"#,
            r#""docker://a/b:1""#,
        ] {
            assert!(serde_json::from_str::<ImageClaim>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn non_utc_or_sloppy_times_are_refused() {
        for bad in ["2026-12-04T21:00:00+01:00", "2026-12-04 21:00", "yesterday"] {
            assert!(parse_time(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn hosts_compare_by_kind() {
        assert!(host_matches("Worker.Example", "worker.example"));
        assert!(host_matches("spiffe://x/y", "spiffe://x/y"));
        assert!(!host_matches("spiffe://x/Y", "spiffe://x/y"));
        assert!(!host_matches("worker.example", "worker.example."));
    }

    #[test]
    fn reason_codes_are_distinct() {
        let all = [
            GrantError::Malformed(String::new()),
            GrantError::Unsigned,
            GrantError::UnknownSigner(String::new()),
            GrantError::BadSignature(String::new()),
            GrantError::UntrustedSigner {
                key: String::new(),
                tenant: String::new(),
            },
            GrantError::UnknownTenant(String::new()),
            GrantError::BadWindow(String::new()),
            GrantError::NotYetValid {
                not_before: String::new(),
                now: String::new(),
            },
            GrantError::Expired {
                not_after: String::new(),
                now: String::new(),
            },
            GrantError::WrongIpu {
                granted: String::new(),
                expected: String::new(),
            },
            GrantError::WrongHost {
                granted: String::new(),
                presented: String::new(),
            },
            GrantError::WrongImage {
                claim: String::new(),
                requested: String::new(),
                why: String::new(),
            },
            GrantError::ScopeNotAllowed {
                scope: String::new(),
                tenant: String::new(),
            },
        ];
        let codes: std::collections::HashSet<_> = all.iter().map(|e| e.reason_code()).collect();
        assert_eq!(codes.len(), all.len());
    }
}
