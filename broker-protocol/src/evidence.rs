//! Attestation evidence: what the IPU's TPM quoted, and what the quote is bound to.

use std::collections::BTreeMap;

use ring::digest::{Context, SHA256};

/// What the IPU sends: the quote, its signature, and the PCR values it quoted.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Evidence {
    /// The marshalled `TPMS_ATTEST` the TPM signed.
    pub attest: Vec<u8>,
    /// ECDSA P-256 signature, `r || s`, each left-padded to 32 bytes.
    pub signature: Vec<u8>,
    /// SHA-256 bank PCR index -> value, for every quoted PCR.
    pub pcrs: BTreeMap<u8, Vec<u8>>,
}

/// The qualifying data an IPU must quote with: `SHA-256(nonce || ephemeral public key)`.
/// Also the salt of every key released in the session.
pub fn binding(nonce: &[u8], ephemeral_public: &[u8]) -> [u8; 32] {
    let mut ctx = Context::new(&SHA256);
    ctx.update(nonce);
    ctx.update(ephemeral_public);
    ctx.finish().as_ref().try_into().expect("32")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_binding_covers_nonce_and_key_in_order() {
        let b = binding(b"nonce", b"key");
        assert_eq!(b, binding(b"nonce", b"key"));
        assert_ne!(b, binding(b"nonce", b"other"));
        assert_ne!(b, binding(b"key", b"nonce"));
        let mut ctx = Context::new(&SHA256);
        ctx.update(b"noncekey");
        assert_eq!(b.as_slice(), ctx.finish().as_ref());
    }
}
