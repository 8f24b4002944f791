//! Rekor entry bodies (what the log recorded) and the signed entry timestamp payload.
//!
//! Rekor v1 kinds: `hashedrekord` 0.0.1, `intoto` 0.0.2, `dsse` 0.0.1. Rekor v2 kinds:
//! `hashedrekord` 0.0.2 and `dsse` 0.0.2. Each body is reduced to a [`LoggedClaim`]: what was
//! signed (an artifact digest or a DSSE payload hash) and by which signature and verifier.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::keys::HashAlgorithm;

/// Which Rekor generation an entry comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RekorVersion {
    /// Rekor v1: SET and/or inclusion proof with a checkpoint; integrated time.
    V1,
    /// Rekor v2 (tiles): inclusion proof and checkpoint required; no integrated time.
    V2,
}

/// The Rekor generation of a kind/version, or None if unsupported.
pub fn rekor_version(kind: &str, version: &str) -> Option<RekorVersion> {
    match (kind, version) {
        ("hashedrekord", "0.0.1") | ("intoto", "0.0.2") | ("dsse", "0.0.1") => {
            Some(RekorVersion::V1)
        }
        ("hashedrekord", "0.0.2") | ("dsse", "0.0.2") => Some(RekorVersion::V2),
        _ => None,
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("canonicalized body is not JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error(
        "canonicalized body says {body_kind} {body_version} but the entry says {kind} {version}"
    )]
    KindMismatch {
        kind: String,
        version: String,
        body_kind: String,
        body_version: String,
    },
    #[error("canonicalized body {field}: {reason}")]
    Field { field: &'static str, reason: String },
    #[error("entry kind {0} {1} is not supported")]
    Unsupported(String, String),
}

fn ferr(field: &'static str, reason: impl Into<String>) -> BodyError {
    BodyError::Field {
        field,
        reason: reason.into(),
    }
}

/// What the log entry says was signed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LoggedSubject {
    /// The digest the signature is over (hashedrekord: the artifact's, or for DSSE in
    /// Rekor v2 the digest of the PAE).
    Digest {
        algorithm: HashAlgorithm,
        digest: Vec<u8>,
    },
    /// SHA-256 of a DSSE payload (intoto, dsse kinds).
    DssePayloadSha256(Vec<u8>),
}

/// Who signed, as the log recorded it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoggedSignature {
    pub signature: Vec<u8>,
    /// DER of the verifier: a certificate, or a SubjectPublicKeyInfo.
    pub verifier: Verifier,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verifier {
    Certificate(Vec<u8>),
    PublicKey(Vec<u8>),
}

/// A log entry body reduced to what it binds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoggedClaim {
    pub subject: LoggedSubject,
    pub signatures: Vec<LoggedSignature>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Envelope {
    api_version: String,
    kind: String,
    spec: Value,
}

fn str_at<'a>(v: &'a Value, path: &[&str], field: &'static str) -> Result<&'a str, BodyError> {
    let mut cur = v;
    for p in path {
        cur = cur.get(p).ok_or_else(|| ferr(field, "missing"))?;
    }
    cur.as_str().ok_or_else(|| ferr(field, "not a string"))
}

fn b64(s: &str, field: &'static str) -> Result<Vec<u8>, BodyError> {
    B64.decode(s).map_err(|_| ferr(field, "invalid base64"))
}

/// A PEM block (base64 in the body) as a verifier.
fn pem_verifier(b64_pem: &str, field: &'static str) -> Result<Verifier, BodyError> {
    let pem_bytes = b64(b64_pem, field)?;
    let block = pem::parse(&pem_bytes).map_err(|e| ferr(field, format!("not PEM: {e}")))?;
    match block.tag() {
        "CERTIFICATE" => Ok(Verifier::Certificate(block.into_contents())),
        "PUBLIC KEY" => Ok(Verifier::PublicKey(block.into_contents())),
        t => Err(ferr(
            field,
            format!("PEM block {t:?} is neither a certificate nor a public key"),
        )),
    }
}

fn v1_hash(v: &Value, field: &'static str) -> Result<(HashAlgorithm, Vec<u8>), BodyError> {
    let alg = match str_at(v, &["algorithm"], field)? {
        "sha256" => HashAlgorithm::Sha256,
        "sha384" => HashAlgorithm::Sha384,
        "sha512" => HashAlgorithm::Sha512,
        a => return Err(ferr(field, format!("unsupported algorithm {a:?}"))),
    };
    let digest = hex::decode(str_at(v, &["value"], field)?).map_err(|_| ferr(field, "not hex"))?;
    if digest.len() != alg.output_len() {
        return Err(ferr(field, "digest length does not match its algorithm"));
    }
    Ok((alg, digest))
}

fn v2_verifier(v: &Value, field: &'static str) -> Result<Verifier, BodyError> {
    if let Some(c) = v.get("x509Certificate") {
        return Ok(Verifier::Certificate(b64(
            str_at(c, &["rawBytes"], field)?,
            field,
        )?));
    }
    if let Some(k) = v.get("publicKey") {
        return Ok(Verifier::PublicKey(b64(
            str_at(k, &["rawBytes"], field)?,
            field,
        )?));
    }
    Err(ferr(field, "neither x509Certificate nor publicKey"))
}

fn v2_digest(v: &Value, field: &'static str) -> Result<(HashAlgorithm, Vec<u8>), BodyError> {
    let alg = match str_at(v, &["algorithm"], field)? {
        "SHA2_256" => HashAlgorithm::Sha256,
        "SHA2_384" => HashAlgorithm::Sha384,
        "SHA2_512" => HashAlgorithm::Sha512,
        a => return Err(ferr(field, format!("unsupported algorithm {a:?}"))),
    };
    let digest = b64(str_at(v, &["digest"], field)?, field)?;
    if digest.len() != alg.output_len() {
        return Err(ferr(field, "digest length does not match its algorithm"));
    }
    Ok((alg, digest))
}

fn signatures<'a>(v: &'a Value, field: &'static str) -> Result<&'a Vec<Value>, BodyError> {
    let sigs = v
        .get("signatures")
        .and_then(Value::as_array)
        .ok_or_else(|| ferr(field, "missing"))?;
    if sigs.is_empty() {
        return Err(ferr(field, "empty"));
    }
    Ok(sigs)
}

/// Parses a canonicalized body of the entry's kind and version.
pub fn parse_body(body: &[u8], kind: &str, version: &str) -> Result<LoggedClaim, BodyError> {
    let env: Envelope = serde_json::from_slice(body)?;
    if env.kind != kind || env.api_version != version {
        return Err(BodyError::KindMismatch {
            kind: kind.into(),
            version: version.into(),
            body_kind: env.kind,
            body_version: env.api_version,
        });
    }
    let spec = &env.spec;
    match (kind, version) {
        ("hashedrekord", "0.0.1") => {
            let (algorithm, digest) = v1_hash(
                spec.pointer("/data/hash")
                    .ok_or_else(|| ferr("spec.data.hash", "missing"))?,
                "spec.data.hash",
            )?;
            let signature = b64(
                str_at(spec, &["signature", "content"], "spec.signature.content")?,
                "spec.signature.content",
            )?;
            let verifier = pem_verifier(
                str_at(
                    spec,
                    &["signature", "publicKey", "content"],
                    "spec.signature.publicKey.content",
                )?,
                "spec.signature.publicKey.content",
            )?;
            Ok(LoggedClaim {
                subject: LoggedSubject::Digest { algorithm, digest },
                signatures: vec![LoggedSignature {
                    signature,
                    verifier,
                }],
            })
        }
        ("intoto", "0.0.2") => {
            let content = spec
                .get("content")
                .ok_or_else(|| ferr("spec.content", "missing"))?;
            let (alg, payload_hash) = v1_hash(
                content
                    .get("payloadHash")
                    .ok_or_else(|| ferr("spec.content.payloadHash", "missing"))?,
                "spec.content.payloadHash",
            )?;
            if alg != HashAlgorithm::Sha256 {
                return Err(ferr("spec.content.payloadHash", "only sha256 is supported"));
            }
            let env = content
                .get("envelope")
                .ok_or_else(|| ferr("spec.content.envelope", "missing"))?;
            let sigs = signatures(env, "spec.content.envelope.signatures")?
                .iter()
                .map(|s| {
                    // Both are base64 of what the envelope had: the signature's base64 text,
                    // and the PEM.
                    let sig_b64 = b64(
                        str_at(s, &["sig"], "spec.content.envelope.signatures[].sig")?,
                        "spec.content.envelope.signatures[].sig",
                    )?;
                    let sig_text = String::from_utf8(sig_b64).map_err(|_| {
                        ferr("spec.content.envelope.signatures[].sig", "not base64 text")
                    })?;
                    Ok(LoggedSignature {
                        signature: b64(&sig_text, "spec.content.envelope.signatures[].sig")?,
                        verifier: pem_verifier(
                            str_at(
                                s,
                                &["publicKey"],
                                "spec.content.envelope.signatures[].publicKey",
                            )?,
                            "spec.content.envelope.signatures[].publicKey",
                        )?,
                    })
                })
                .collect::<Result<Vec<_>, BodyError>>()?;
            Ok(LoggedClaim {
                subject: LoggedSubject::DssePayloadSha256(payload_hash),
                signatures: sigs,
            })
        }
        ("dsse", "0.0.1") => {
            let (alg, payload_hash) = v1_hash(
                spec.get("payloadHash")
                    .ok_or_else(|| ferr("spec.payloadHash", "missing"))?,
                "spec.payloadHash",
            )?;
            if alg != HashAlgorithm::Sha256 {
                return Err(ferr("spec.payloadHash", "only sha256 is supported"));
            }
            let sigs = signatures(spec, "spec.signatures")?
                .iter()
                .map(|s| {
                    Ok(LoggedSignature {
                        signature: b64(
                            str_at(s, &["signature"], "spec.signatures[].signature")?,
                            "spec.signatures[].signature",
                        )?,
                        verifier: pem_verifier(
                            str_at(s, &["verifier"], "spec.signatures[].verifier")?,
                            "spec.signatures[].verifier",
                        )?,
                    })
                })
                .collect::<Result<Vec<_>, BodyError>>()?;
            Ok(LoggedClaim {
                subject: LoggedSubject::DssePayloadSha256(payload_hash),
                signatures: sigs,
            })
        }
        ("hashedrekord", "0.0.2") => {
            let hr = spec
                .get("hashedRekordV002")
                .ok_or_else(|| ferr("spec.hashedRekordV002", "missing"))?;
            let (algorithm, digest) = v2_digest(
                hr.get("data")
                    .ok_or_else(|| ferr("spec.hashedRekordV002.data", "missing"))?,
                "spec.hashedRekordV002.data",
            )?;
            let sig = hr
                .get("signature")
                .ok_or_else(|| ferr("spec.hashedRekordV002.signature", "missing"))?;
            let signature = b64(
                str_at(sig, &["content"], "spec.hashedRekordV002.signature.content")?,
                "spec.hashedRekordV002.signature.content",
            )?;
            let verifier = v2_verifier(
                sig.get("verifier")
                    .ok_or_else(|| ferr("spec.hashedRekordV002.signature.verifier", "missing"))?,
                "spec.hashedRekordV002.signature.verifier",
            )?;
            Ok(LoggedClaim {
                subject: LoggedSubject::Digest { algorithm, digest },
                signatures: vec![LoggedSignature {
                    signature,
                    verifier,
                }],
            })
        }
        ("dsse", "0.0.2") => {
            let d = spec
                .get("dsseV002")
                .ok_or_else(|| ferr("spec.dsseV002", "missing"))?;
            let (alg, payload_hash) = v2_digest(
                d.get("payloadHash")
                    .ok_or_else(|| ferr("spec.dsseV002.payloadHash", "missing"))?,
                "spec.dsseV002.payloadHash",
            )?;
            if alg != HashAlgorithm::Sha256 {
                return Err(ferr(
                    "spec.dsseV002.payloadHash",
                    "only SHA2_256 is supported",
                ));
            }
            let sigs = signatures(d, "spec.dsseV002.signatures")?
                .iter()
                .map(|s| {
                    Ok(LoggedSignature {
                        signature: b64(
                            str_at(s, &["content"], "spec.dsseV002.signatures[].content")?,
                            "spec.dsseV002.signatures[].content",
                        )?,
                        verifier: v2_verifier(
                            s.get("verifier").ok_or_else(|| {
                                ferr("spec.dsseV002.signatures[].verifier", "missing")
                            })?,
                            "spec.dsseV002.signatures[].verifier",
                        )?,
                    })
                })
                .collect::<Result<Vec<_>, BodyError>>()?;
            Ok(LoggedClaim {
                subject: LoggedSubject::DssePayloadSha256(payload_hash),
                signatures: sigs,
            })
        }
        (k, v) => Err(BodyError::Unsupported(k.into(), v.into())),
    }
}

/// The payload a Rekor v1 signed entry timestamp signs: the canonical JSON (RFC 8785: keys
/// sorted, no whitespace) of `{"body", "integratedTime", "logID", "logIndex"}`, with the body
/// in standard base64 and the log id in lower-case hex.
pub fn set_payload(body: &[u8], integrated_time: u64, log_id: &[u8], log_index: u64) -> Vec<u8> {
    // Field order is the sorted order; serde_json writes no whitespace, and base64 and hex
    // text need no escaping, so this is the canonical form.
    #[derive(Serialize)]
    struct SetPayload {
        body: String,
        #[serde(rename = "integratedTime")]
        integrated_time: u64,
        #[serde(rename = "logID")]
        log_id: String,
        #[serde(rename = "logIndex")]
        log_index: u64,
    }
    serde_json::to_vec(&SetPayload {
        body: B64.encode(body),
        integrated_time,
        log_id: hex::encode(log_id),
        log_index,
    })
    .expect("serializing plain strings and integers")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_payload_is_canonical_json() {
        let p = set_payload(b"{\"a\":1}", 1689177396, &[0xc0, 0xd2], 27246492);
        assert_eq!(
            String::from_utf8(p).unwrap(),
            r#"{"body":"eyJhIjoxfQ==","integratedTime":1689177396,"logID":"c0d2","logIndex":27246492}"#
        );
    }

    #[test]
    fn kind_in_body_must_match_entry() {
        let body = br#"{"apiVersion":"0.0.1","kind":"dsse","spec":{}}"#;
        assert!(matches!(
            parse_body(body, "hashedrekord", "0.0.1"),
            Err(BodyError::KindMismatch { .. })
        ));
    }
}
