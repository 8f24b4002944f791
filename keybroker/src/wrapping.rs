//! What the broker puts in a key provider annotation: JSON naming the key and version, with
//! the private options as JWE to that version's public key. The broker alone can open it,
//! and rotation leaves older images readable until their version is revoked.

use serde::{Deserialize, Serialize};

/// Largest wrapping accepted.
const MAX_WRAPPING: usize = 64 * 1024;

/// A provider annotation that is not one of this broker's wrappings.
#[derive(Debug, thiserror::Error)]
pub enum WrappingError {
    #[error("a {0}-byte key wrapping")]
    TooLarge(usize),
    #[error("the key provider annotation is not this broker's: {0}")]
    NotOurs(#[source] serde_json::Error),
}

/// What the broker puts in a provider annotation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderWrapping {
    #[serde(rename = "kid")]
    pub key_id: String,
    pub version: u32,
    /// The private options as a `keys.jwe` annotation value to that version's public key.
    pub jwe: String,
}

impl ProviderWrapping {
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("wrappings serialize")
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, WrappingError> {
        if bytes.len() > MAX_WRAPPING {
            return Err(WrappingError::TooLarge(bytes.len()));
        }
        serde_json::from_slice(bytes).map_err(WrappingError::NotOurs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrappings_round_trip_and_others_are_refused() {
        let w = ProviderWrapping {
            key_id: "acme".into(),
            version: 2,
            jwe: "e30.x.y.z.t".into(),
        };
        assert_eq!(ProviderWrapping::decode(&w.encode()).unwrap(), w);
        let e = ProviderWrapping::decode(b"{\"kid\":\"a\",\"version\":1,\"jwe\":\"\",\"x\":1}")
            .unwrap_err();
        assert!(e.to_string().contains("not this broker's"), "{e}");
        let e = ProviderWrapping::decode(&vec![b' '; MAX_WRAPPING + 1]).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("a {}-byte key wrapping", MAX_WRAPPING + 1)
        );
    }
}
