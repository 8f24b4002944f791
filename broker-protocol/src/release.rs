//! Sealing a released key to the IPU's attested session key.
//!
//! The IPU makes an ephemeral P-256 key per session and binds its public half into the
//! quote. For each release the broker makes a one-time P-256 key, derives an AES-256-GCM key
//! with HKDF-SHA256 from the ECDH secret (salt: the session's nonce binding; info: a label and
//! the release context), and seals the key material. Only the holder of the session key
//! opens it; the context (image digest, layer digest) is authenticated, so a sealed key
//! cannot be replayed for another layer.
//!
//! The AES-256-GCM cipher is RustCrypto's `aes-gcm`, built with the `zeroize` features of
//! `aes` and `ghash`: its round keys and GHASH key are wiped when it drops, right after the
//! one seal or open it is made for (ring's `LessSafeKey` never wipes its key schedule). It is
//! kept behind a pointer while it lives and the stack its setup used is overwritten.

use aes_gcm::aead::AeadInPlace;
use aes_gcm::{Aes256Gcm, KeyInit, Nonce};
use p256::elliptic_curve::sec1::ToEncodedPoint;
use ring::hkdf::{self, Salt, HKDF_SHA256};
use zeroize::Zeroizing;

const LABEL: &[u8] = b"ipu-key-release-v1";

/// The context a released key is sealed to: it opens for this image and layer only.
pub fn release_context(image_digest: &str, layer_digest: &str) -> Vec<u8> {
    format!("image {image_digest} layer {layer_digest}").into_bytes()
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ReleaseError {
    #[error("the session public key is not an uncompressed P-256 point")]
    BadPublicKey,
    #[error("the sealed key does not open: wrong session, context or data")]
    Open,
}

/// A released key on its way to the IPU: no secret in clear.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SealedKey {
    /// The broker's one-time public key (SEC1 uncompressed).
    pub broker_public: Vec<u8>,
    /// AES-256-GCM ciphertext and tag (the nonce is all zeros: the key is used once).
    pub ciphertext: Vec<u8>,
}

/// The AES-GCM tag's length.
const TAG_LEN: usize = 16;

/// Overwrites the stack below the caller, where the key derivation and the AES key
/// expansion left copies of the key and its round keys (a memset the compiler must keep).
#[inline(never)]
fn scrub_stack() {
    let mut area = [0u8; 16 * 1024];
    std::hint::black_box(&mut area);
}

fn derive(shared: &[u8], salt: &[u8], context: &[u8]) -> Box<Aes256Gcm> {
    struct Len;
    impl hkdf::KeyType for Len {
        fn len(&self) -> usize {
            32
        }
    }
    let prk = Salt::new(HKDF_SHA256, salt).extract(shared);
    let info = [LABEL, context];
    let okm = prk.expand(&info, Len).expect("32 bytes from HKDF-SHA256");
    let mut key = Zeroizing::new([0u8; 32]);
    okm.fill(key.as_mut()).expect("32 bytes");
    let cipher = Box::new(Aes256Gcm::new(key.as_ref().into()));
    scrub_stack();
    cipher
}

fn parse_public(bytes: &[u8]) -> Result<p256::PublicKey, ReleaseError> {
    if bytes.len() != 65 || bytes[0] != 4 {
        return Err(ReleaseError::BadPublicKey);
    }
    p256::PublicKey::from_sec1_bytes(bytes).map_err(|_| ReleaseError::BadPublicKey)
}

/// Broker side: seals `secret` to the session public key.
pub fn seal(
    session_public: &[u8],
    salt: &[u8],
    context: &[u8],
    secret: &[u8],
) -> Result<SealedKey, ReleaseError> {
    let peer = parse_public(session_public)?;
    let mine = p256::ecdh::EphemeralSecret::random(&mut rand_core::OsRng);
    let broker_public = mine
        .public_key()
        .to_encoded_point(false)
        .as_bytes()
        .to_vec();
    let shared = mine.diffie_hellman(&peer);
    let key = derive(shared.raw_secret_bytes(), salt, context);
    // Room for the tag from the start: the buffer never grows (a grown Vec would leave the
    // secret behind in the freed block).
    let mut buf = Zeroizing::new(Vec::with_capacity(secret.len() + TAG_LEN));
    buf.extend_from_slice(secret);
    let tag = key
        .encrypt_in_place_detached(Nonce::from_slice(&[0u8; 12]), context, &mut buf)
        .map_err(|_| ReleaseError::Open)?;
    buf.extend_from_slice(&tag);
    drop(key);
    Ok(SealedKey {
        broker_public,
        ciphertext: buf.to_vec(),
    })
}

/// The IPU's session key pair; the private half never leaves this type (no Debug).
pub struct SessionKey {
    secret: p256::SecretKey,
}

impl SessionKey {
    pub fn generate() -> Self {
        Self {
            secret: p256::SecretKey::random(&mut rand_core::OsRng),
        }
    }

    /// SEC1 uncompressed public key: bound into the quote.
    pub fn public(&self) -> Vec<u8> {
        self.secret
            .public_key()
            .to_encoded_point(false)
            .as_bytes()
            .to_vec()
    }

    /// Opens a sealed key for this session and context.
    pub fn open(
        &self,
        sealed: &SealedKey,
        salt: &[u8],
        context: &[u8],
    ) -> Result<Zeroizing<Vec<u8>>, ReleaseError> {
        let peer = parse_public(&sealed.broker_public)?;
        let shared = p256::ecdh::diffie_hellman(self.secret.to_nonzero_scalar(), peer.as_affine());
        let key = derive(shared.raw_secret_bytes(), salt, context);
        let Some(len) = sealed.ciphertext.len().checked_sub(TAG_LEN) else {
            return Err(ReleaseError::Open);
        };
        let (body, tag) = sealed.ciphertext.split_at(len);
        let mut buf = Zeroizing::new(body.to_vec());
        key.decrypt_in_place_detached(
            Nonce::from_slice(&[0u8; 12]),
            context,
            &mut buf,
            aes_gcm::Tag::from_slice(tag),
        )
        .map_err(|_| ReleaseError::Open)?;
        drop(key);
        scrub_stack();
        Ok(buf)
    }
}

impl std::fmt::Debug for SessionKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionKey")
            .field("public", &hex::encode(self.public()))
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_session_with_the_right_context_opens() {
        let session = SessionKey::generate();
        let secret = b"{\"symkey\":\"...\",\"cipheroptions\":{}}";
        let sealed = seal(
            &session.public(),
            b"salt",
            b"image sha256:aa layer sha256:bb",
            secret,
        )
        .unwrap();
        assert!(!sealed.ciphertext.windows(8).any(|w| w == &secret[..8]));
        let opened = session
            .open(&sealed, b"salt", b"image sha256:aa layer sha256:bb")
            .unwrap();
        assert_eq!(&opened[..], secret);
        // Another layer's context, another salt, another session, changed bytes: refused.
        assert_eq!(
            session.open(&sealed, b"salt", b"image sha256:aa layer sha256:cc"),
            Err(ReleaseError::Open)
        );
        assert_eq!(
            session.open(&sealed, b"other", b"image sha256:aa layer sha256:bb"),
            Err(ReleaseError::Open)
        );
        assert_eq!(
            SessionKey::generate().open(&sealed, b"salt", b"image sha256:aa layer sha256:bb"),
            Err(ReleaseError::Open)
        );
        let mut changed = sealed.clone();
        changed.ciphertext[0] ^= 1;
        assert_eq!(
            session.open(&changed, b"salt", b"image sha256:aa layer sha256:bb"),
            Err(ReleaseError::Open)
        );
        assert_eq!(
            seal(b"not a key", b"", b"", b"x"),
            Err(ReleaseError::BadPublicKey)
        );
        // Debug shows the public half only.
        assert!(!format!("{session:?}").contains(&hex::encode(session.secret.to_bytes())));
    }
}
