//! DSSE envelopes (pre-authentication encoding) and the in-toto statements they carry.

use serde::Deserialize;

/// The in-toto payload type.
pub const IN_TOTO_PAYLOAD_TYPE: &str = "application/vnd.in-toto+json";

/// `PAE(type, body) = "DSSEv1" SP LEN(type) SP type SP LEN(body) SP body`.
pub fn pae(payload_type: &str, payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + payload_type.len() + 32);
    out.extend_from_slice(b"DSSEv1 ");
    out.extend_from_slice(payload_type.len().to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(payload_type.as_bytes());
    out.push(b' ');
    out.extend_from_slice(payload.len().to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(payload);
    out
}

#[derive(Debug, thiserror::Error)]
pub enum StatementError {
    #[error("DSSE payload is not an in-toto statement: {0}")]
    Json(#[from] serde_json::Error),
    #[error("in-toto statement type {0:?} is not supported")]
    Type(String),
    #[error("in-toto statement has no subject")]
    NoSubject,
}

/// An in-toto statement (v0.1 or v1): the parts the verifier needs.
#[derive(Clone, Debug, Deserialize)]
pub struct Statement {
    #[serde(rename = "_type")]
    pub type_: String,
    #[serde(default)]
    pub subject: Vec<Subject>,
    #[serde(rename = "predicateType", default)]
    pub predicate_type: String,
}

#[derive(Clone, Debug, Deserialize)]
pub struct Subject {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub digest: std::collections::BTreeMap<String, String>,
}

impl Statement {
    pub fn parse(payload: &[u8]) -> Result<Self, StatementError> {
        let s: Statement = serde_json::from_slice(payload)?;
        if s.type_ != "https://in-toto.io/Statement/v1"
            && s.type_ != "https://in-toto.io/Statement/v0.1"
        {
            return Err(StatementError::Type(s.type_));
        }
        if s.subject.is_empty() {
            return Err(StatementError::NoSubject);
        }
        Ok(s)
    }

    /// Whether a subject has digest `algorithm` (e.g. `sha256`) equal to `digest`.
    pub fn has_subject_digest(&self, algorithm: &str, digest: &[u8]) -> bool {
        self.subject.iter().any(|s| {
            s.digest
                .get(algorithm)
                .and_then(|h| hex::decode(h).ok())
                .is_some_and(|d| d == digest)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pae_matches_the_dsse_spec_example() {
        assert_eq!(
            pae("http://example.com/HelloWorld", b"hello world"),
            b"DSSEv1 29 http://example.com/HelloWorld 11 hello world".to_vec()
        );
    }
}
