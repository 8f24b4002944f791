//! The Sigstore `TrustedRoot` (protobuf JSON mapping, media type
//! `application/vnd.dev.sigstore.trustedroot+json;version=0.1`): Rekor logs, Fulcio CAs, CT
//! logs and timestamp authorities, each with its validity window (both ends inclusive).
//!
//! The public-good root is shipped in `data/` and embedded: [`TrustedRoot::public_good`].

use std::path::Path;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use serde::Deserialize;

use crate::keys::{KeyError, PublicKey, SignatureScheme};
use crate::time::{parse_rfc3339, TimeError};
use crate::ValidFor;

/// The Sigstore public-good trusted root, as shipped with this crate.
pub const PUBLIC_GOOD_JSON: &str = include_str!("../data/trusted_root.public-good.json");

const MEDIA_TYPE_PREFIX: &str = "application/vnd.dev.sigstore.trustedroot";

#[derive(Debug, thiserror::Error)]
pub enum TrustRootError {
    #[error("cannot read trusted root {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("trusted root is not valid JSON of the TrustedRoot shape: {0}")]
    Json(#[from] serde_json::Error),
    #[error("trusted root media type {0:?} is not supported")]
    MediaType(String),
    #[error("trusted root {field}: invalid base64")]
    Base64 { field: String },
    #[error("trusted root {field}: {source}")]
    Key {
        field: String,
        #[source]
        source: KeyError,
    },
    #[error("trusted root {field}: {source}")]
    Time {
        field: String,
        #[source]
        source: TimeError,
    },
    #[error("trusted root {field}: {reason}")]
    Invalid { field: String, reason: String },
}

/// A transparency log (Rekor) or certificate transparency log the root trusts.
#[derive(Clone, Debug)]
pub struct TransparencyLog {
    pub base_url: String,
    pub key: PublicKey,
    /// Signature scheme of the key (from `keyDetails`, else the key's default).
    pub scheme: SignatureScheme,
    /// `logId.keyId` (SHA-256 of the key's SPKI for Rekor v1 and CT logs).
    pub log_id: Vec<u8>,
    pub valid_for: ValidFor,
}

/// A Fulcio certificate authority: its chain, issuing certificate first, root last.
#[derive(Clone, Debug)]
pub struct CertificateAuthority {
    pub uri: String,
    pub cert_chain: Vec<Vec<u8>>,
    pub valid_for: ValidFor,
}

/// A time-stamping authority: its chain, signing certificate first.
#[derive(Clone, Debug)]
pub struct TimestampAuthority {
    pub uri: String,
    pub cert_chain: Vec<Vec<u8>>,
    pub valid_for: ValidFor,
}

/// A parsed trusted root.
#[derive(Clone, Debug)]
pub struct TrustedRoot {
    pub tlogs: Vec<TransparencyLog>,
    pub certificate_authorities: Vec<CertificateAuthority>,
    pub ctlogs: Vec<TransparencyLog>,
    pub timestamp_authorities: Vec<TimestampAuthority>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RootJson {
    media_type: String,
    #[serde(default)]
    tlogs: Vec<LogJson>,
    #[serde(default)]
    certificate_authorities: Vec<CaJson>,
    #[serde(default)]
    ctlogs: Vec<LogJson>,
    #[serde(default)]
    timestamp_authorities: Vec<CaJson>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct LogJson {
    #[serde(default)]
    base_url: String,
    #[serde(default)]
    hash_algorithm: Option<String>,
    public_key: PublicKeyJson,
    log_id: LogIdJson,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct PublicKeyJson {
    raw_bytes: String,
    #[serde(default)]
    key_details: Option<String>,
    #[serde(default)]
    valid_for: Option<ValidForJson>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct LogIdJson {
    key_id: String,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct CaJson {
    #[serde(default)]
    uri: String,
    cert_chain: CertChainJson,
    #[serde(default)]
    valid_for: Option<ValidForJson>,
}

#[derive(Deserialize)]
struct CertChainJson {
    #[serde(default)]
    certificates: Vec<RawBytesJson>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct RawBytesJson {
    pub(crate) raw_bytes: String,
}

#[derive(Deserialize, Default)]
struct ValidForJson {
    start: Option<String>,
    end: Option<String>,
}

fn b64(field: &str, s: &str) -> Result<Vec<u8>, TrustRootError> {
    B64.decode(s).map_err(|_| TrustRootError::Base64 {
        field: field.to_string(),
    })
}

fn valid_for(field: &str, v: Option<&ValidForJson>) -> Result<ValidFor, TrustRootError> {
    let Some(v) = v else {
        return Ok(ValidFor::default());
    };
    let t = |s: &Option<String>, which: &str| {
        s.as_deref()
            .map(parse_rfc3339)
            .transpose()
            .map_err(|source| TrustRootError::Time {
                field: format!("{field}.validFor.{which}"),
                source,
            })
    };
    Ok(ValidFor {
        start: t(&v.start, "start")?,
        end: t(&v.end, "end")?,
    })
}

/// The signature scheme a `keyDetails` value names, if it is one this crate knows.
fn scheme_for_key_details(details: &str) -> Option<SignatureScheme> {
    use crate::keys::HashAlgorithm::*;
    Some(match details {
        "PKIX_ECDSA_P256_SHA_256" | "ECDSA_P256_SHA_256" | "PKIX_ECDSA_P384_SHA_256" => {
            SignatureScheme::Ecdsa(Sha256)
        }
        "PKIX_ECDSA_P384_SHA_384" | "ECDSA_P384_SHA_384" => SignatureScheme::Ecdsa(Sha384),
        "PKIX_ED25519" | "ED25519" => SignatureScheme::Ed25519,
        "PKIX_RSA_PKCS1V15_2048_SHA256"
        | "PKIX_RSA_PKCS1V15_3072_SHA256"
        | "PKIX_RSA_PKCS1V15_4096_SHA256"
        | "PKCS1_RSA_PKCS1V5"
        | "PKIX_RSA_PKCS1V5" => SignatureScheme::RsaPkcs1(Sha256),
        "PKIX_RSA_PSS_2048_SHA256"
        | "PKIX_RSA_PSS_3072_SHA256"
        | "PKIX_RSA_PSS_4096_SHA256"
        | "PKCS1_RSA_PSS"
        | "PKIX_RSA_PSS" => SignatureScheme::RsaPss(Sha256),
        _ => return None,
    })
}

fn parse_log(
    field: &str,
    log: &LogJson,
    require_start: bool,
) -> Result<TransparencyLog, TrustRootError> {
    if let Some(h) = &log.hash_algorithm {
        if h != "SHA2_256" {
            return Err(TrustRootError::Invalid {
                field: format!("{field}.hashAlgorithm"),
                reason: format!("{h} is not supported (only SHA2_256)"),
            });
        }
    }
    let der = b64(
        &format!("{field}.publicKey.rawBytes"),
        &log.public_key.raw_bytes,
    )?;
    let pkcs1 = matches!(
        log.public_key.key_details.as_deref(),
        Some("PKCS1_RSA_PKCS1V5" | "PKCS1_RSA_PSS")
    );
    let key = if pkcs1 {
        PublicKey::from_pkcs1_rsa_der(&der)
    } else {
        PublicKey::from_spki_der(&der)
    };
    let key = key.map_err(|source| TrustRootError::Key {
        field: format!("{field}.publicKey"),
        source,
    })?;
    let scheme = log
        .public_key
        .key_details
        .as_deref()
        .and_then(scheme_for_key_details)
        .unwrap_or_else(|| key.default_scheme());
    let valid_for = valid_for(
        &format!("{field}.publicKey"),
        log.public_key.valid_for.as_ref(),
    )?;
    if require_start && valid_for.start.is_none() {
        return Err(TrustRootError::Invalid {
            field: format!("{field}.publicKey.validFor.start"),
            reason: "missing (a transparency log key must say since when it is valid)".into(),
        });
    }
    let log_id = b64(&format!("{field}.logId.keyId"), &log.log_id.key_id)?;
    Ok(TransparencyLog {
        base_url: log.base_url.clone(),
        key,
        scheme,
        log_id,
        valid_for,
    })
}

fn parse_chain(field: &str, ca: &CaJson) -> Result<(Vec<Vec<u8>>, ValidFor), TrustRootError> {
    if ca.cert_chain.certificates.is_empty() {
        return Err(TrustRootError::Invalid {
            field: format!("{field}.certChain"),
            reason: "no certificates".into(),
        });
    }
    let chain = ca
        .cert_chain
        .certificates
        .iter()
        .enumerate()
        .map(|(j, c)| {
            b64(
                &format!("{field}.certChain.certificates[{j}].rawBytes"),
                &c.raw_bytes,
            )
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok((chain, valid_for(field, ca.valid_for.as_ref())?))
}

impl TrustedRoot {
    /// The Sigstore public-good root shipped with this crate.
    pub fn public_good() -> Self {
        Self::from_json(PUBLIC_GOOD_JSON).expect("the shipped public-good trusted root parses")
    }

    /// Reads and parses a trusted root file.
    pub fn from_file(path: &Path) -> Result<Self, TrustRootError> {
        let text = std::fs::read_to_string(path).map_err(|source| TrustRootError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_json(&text)
    }

    /// Parses a trusted root. Refused: an unknown media type, undecodable keys or
    /// certificates, and a transparency log key without a validity start.
    pub fn from_json(text: &str) -> Result<Self, TrustRootError> {
        let root: RootJson = serde_json::from_str(text)?;
        if !root.media_type.starts_with(MEDIA_TYPE_PREFIX) {
            return Err(TrustRootError::MediaType(root.media_type));
        }
        let tlogs = root
            .tlogs
            .iter()
            .enumerate()
            .map(|(i, l)| parse_log(&format!("tlogs[{i}]"), l, true))
            .collect::<Result<Vec<_>, _>>()?;
        let ctlogs = root
            .ctlogs
            .iter()
            .enumerate()
            .map(|(i, l)| parse_log(&format!("ctlogs[{i}]"), l, false))
            .collect::<Result<Vec<_>, _>>()?;
        let certificate_authorities = root
            .certificate_authorities
            .iter()
            .enumerate()
            .map(|(i, ca)| {
                let (cert_chain, valid_for) =
                    parse_chain(&format!("certificateAuthorities[{i}]"), ca)?;
                Ok(CertificateAuthority {
                    uri: ca.uri.clone(),
                    cert_chain,
                    valid_for,
                })
            })
            .collect::<Result<Vec<_>, TrustRootError>>()?;
        let timestamp_authorities = root
            .timestamp_authorities
            .iter()
            .enumerate()
            .map(|(i, ca)| {
                let (cert_chain, valid_for) =
                    parse_chain(&format!("timestampAuthorities[{i}]"), ca)?;
                Ok(TimestampAuthority {
                    uri: ca.uri.clone(),
                    cert_chain,
                    valid_for,
                })
            })
            .collect::<Result<Vec<_>, TrustRootError>>()?;
        Ok(TrustedRoot {
            tlogs,
            certificate_authorities,
            ctlogs,
            timestamp_authorities,
        })
    }

    /// The Rekor log with this log id.
    pub fn tlog(&self, log_id: &[u8]) -> Option<&TransparencyLog> {
        self.tlogs.iter().find(|l| l.log_id == log_id)
    }

    /// The CT log with this log id.
    pub fn ctlog(&self, log_id: &[u8]) -> Option<&TransparencyLog> {
        self.ctlogs.iter().find(|l| l.log_id == log_id)
    }

    /// The TSAs in the form [`crate::rfc3161::verify_timestamp`] takes.
    pub fn rfc3161_authorities(&self) -> Vec<crate::rfc3161::TimestampAuthority<'_>> {
        self.timestamp_authorities
            .iter()
            .map(|t| crate::rfc3161::TimestampAuthority {
                cert_chain: &t.cert_chain,
                valid_for: t.valid_for,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn public_good_parses() {
        let root = TrustedRoot::public_good();
        assert_eq!(root.tlogs.len(), 2);
        assert!(root.certificate_authorities.len() >= 2);
        let id = B64
            .decode("wNI9atQGlz+VWfO6LRygH4QUfY/8W4RFwiT5i5WRgB0=")
            .unwrap();
        let log = root.tlog(&id).unwrap();
        assert_eq!(log.key.key_id().to_vec(), id);
        assert_eq!(log.base_url, "https://rekor.sigstore.dev");
    }

    #[test]
    fn tlog_without_start_is_refused() {
        let text = PUBLIC_GOOD_JSON.replacen("\"start\": \"2021-01-12T11:53:27Z\"", "\"x\": 1", 1);
        let err = TrustedRoot::from_json(&text).unwrap_err().to_string();
        assert!(err.contains("tlogs[0].publicKey.validFor.start"), "{err}");
    }
}
