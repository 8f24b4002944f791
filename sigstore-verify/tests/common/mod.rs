//! Reading the sigstore-conformance `bundle-verify` cases with `serde_json::Value` only (not
//! the crate's own bundle parser), for the checkpoint and timestamp tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use serde_json::Value;
use sigstore_verify::ValidFor;

pub fn cases_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/sigstore-conformance/bundle-verify")
}

/// Timestamp authorities as owned data: each chain (DER, leaf first) and validity.
pub type Authorities = Vec<(Vec<Vec<u8>>, ValidFor)>;

/// A conformance case: its bundle and the trusted root it is verified with.
pub struct Case {
    pub name: String,
    pub bundle: Value,
    pub trusted_root: Value,
}

impl Case {
    /// `None` when the bundle is not JSON (the malformed-JSON case).
    pub fn load(name: &str) -> Option<Case> {
        let dir = cases_dir().join(name);
        let bundle =
            serde_json::from_slice(&std::fs::read(dir.join("bundle.sigstore.json")).ok()?).ok()?;
        let root_path = match dir.join("trusted_root.json") {
            p if p.exists() => p,
            _ => cases_dir().join("../trusted_root.public-good.json"),
        };
        let trusted_root = serde_json::from_slice(&std::fs::read(root_path).unwrap()).unwrap();
        Some(Case {
            name: name.to_owned(),
            bundle,
            trusted_root,
        })
    }

    pub fn all() -> Vec<Case> {
        let mut names: Vec<String> = std::fs::read_dir(cases_dir())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names.iter().filter_map(|n| Case::load(n)).collect()
    }

    pub fn tlog_entries(&self) -> Vec<&Value> {
        self.bundle["verificationMaterial"]["tlogEntries"]
            .as_array()
            .map(|a| a.iter().collect())
            .unwrap_or_default()
    }

    /// The trusted root's transparency log whose log id is `key_id` (base64, as both the
    /// bundle and the trusted root write it).
    pub fn tlog(&self, key_id: &str) -> Option<&Value> {
        self.trusted_root["tlogs"]
            .as_array()?
            .iter()
            .find(|t| t["logId"]["keyId"] == key_id)
    }

    /// The bundle's signature bytes: the message signature or the first DSSE signature
    /// (`None` if not base64).
    pub fn signature_bytes(&self) -> Option<Vec<u8>> {
        let content = &self.bundle;
        let b64 = content["messageSignature"]["signature"]
            .as_str()
            .or_else(|| content["dsseEnvelope"]["signatures"][0]["sig"].as_str())
            .expect("bundle has a signature");
        B64.decode(b64).ok()
    }

    pub fn timestamps(&self) -> Vec<Vec<u8>> {
        self.bundle["verificationMaterial"]["timestampVerificationData"]["rfc3161Timestamps"]
            .as_array()
            .map(|a| a.iter().map(|t| b64(&t["signedTimestamp"])).collect())
            .unwrap_or_default()
    }

    /// Each timestamp authority of the trusted root: its chain (DER, leaf first) and validity.
    pub fn timestamp_authorities(&self) -> Authorities {
        self.trusted_root["timestampAuthorities"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|tsa| {
                        let chain = tsa["certChain"]["certificates"]
                            .as_array()
                            .unwrap()
                            .iter()
                            .map(|c| B64.decode(c["rawBytes"].as_str().unwrap()).unwrap())
                            .collect();
                        (chain, valid_for(&tsa["validFor"]))
                    })
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// Base64 as protobuf JSON carries it; like Go's decoder, skips line breaks (one case's
/// timestamp is wrapped at 76 columns).
pub fn b64(v: &Value) -> Vec<u8> {
    let text: String = v
        .as_str()
        .unwrap()
        .chars()
        .filter(|c| !matches!(c, '\r' | '\n'))
        .collect();
    B64.decode(text).unwrap()
}

pub fn valid_for(v: &Value) -> ValidFor {
    ValidFor {
        start: v["start"].as_str().map(rfc3339),
        end: v["end"].as_str().map(rfc3339),
    }
}

/// `YYYY-MM-DDThh:mm:ss[.fff]Z` as the trusted root writes it.
pub fn rfc3339(s: &str) -> SystemTime {
    let n = |r: std::ops::Range<usize>| s[r].parse::<u16>().unwrap();
    let whole = der::DateTime::new(
        n(0..4),
        n(5..7) as u8,
        n(8..10) as u8,
        n(11..13) as u8,
        n(14..16) as u8,
        n(17..19) as u8,
    )
    .unwrap()
    .to_system_time();
    let fraction = s[19..].trim_end_matches('Z').trim_start_matches('.');
    let nanos = if fraction.is_empty() {
        0
    } else {
        format!("{fraction:0<9}")[..9].parse().unwrap()
    };
    whole + Duration::from_nanos(nanos)
}
