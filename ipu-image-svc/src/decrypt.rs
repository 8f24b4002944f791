//! The decrypt stage: an encrypted layer's ciphertext, with its released key, as plaintext.
//!
//! Two ways, both ocicrypt's:
//! - streaming ([`decryptor`]), for the unpack path: plaintext is unauthenticated until
//!   [`finish`] checks the HMAC over the whole ciphertext and the unpacker's diff_id matches
//!   the signed config; the unpack tree it went into is private and dropped on failure;
//! - two-pass (`ocicrypt::CiphertextVerifier` then `VerifiedDecryptor`), for plaintext that
//!   leaves the IPU (the decrypt hook, `service::decrypt`): nothing is decrypted before the
//!   HMAC over the stored ciphertext matched.

use std::io::{BufReader, Read};

use crate::error::{ocicrypt_class, Error, FailureClass};
use crate::keys::LayerKey;
use crate::unpack::Compression;

/// A streaming decryptor of `ciphertext` under `key`. Its AES-CTR and HMAC states (as good
/// as the layer key) live in secret memory while the layer decrypts, and are wiped and
/// unmapped when it drops.
///
/// It does not hash the plaintext against the digest in the private options: every caller
/// checks the decompressed plaintext against the signed config's diff_id, which vouches for
/// more (a publisher that recompressed a layer leaves a stale digest there, as skopeo does
/// with zstd), and the hash would cost a third of the decryption's work.
pub fn decryptor<R: Read>(
    ciphertext: R,
    key: &LayerKey,
) -> Result<ocicrypt::LayerDecryptor<R>, ocicrypt::Error> {
    ocicrypt::LayerDecryptor::with_options_in(
        ciphertext,
        &key.pubopts,
        &key.privopts,
        ocicrypt::DecryptMode::caller_verifies(),
        &crate::secret::SecretHome,
    )
}

/// Ends a streaming decryption whose plaintext was consumed with `consumed`'s result: the
/// HMAC over all ciphertext must match first. A layer that failed to unpack is checked too:
/// modified ciphertext decrypts to garbage, and that is an integrity failure, not a malformed
/// tar. Returns what consumed the plaintext produced, which the caller must still check
/// against the signed diff_id.
pub fn finish<R: Read, T, E>(
    decryptor: ocicrypt::LayerDecryptor<R>,
    consumed: Result<T, E>,
) -> Result<T, Finished<E>> {
    match (consumed, decryptor.finish()) {
        (_, Err(e)) if e.class() == ocicrypt::ErrorClass::Integrity => Err(Finished::Decrypt(e)),
        (Err(e), _) => Err(Finished::Consumer(e)),
        (Ok(_), Err(e)) => Err(Finished::Decrypt(e)),
        (Ok(t), Ok(_)) => Ok(t),
    }
}

/// Which side of a decryption failed.
#[derive(Debug)]
pub enum Finished<E> {
    Decrypt(ocicrypt::Error),
    Consumer(E),
}

/// `sha256:<hex>` of the decompressed plaintext `plain` yields; `plain`'s HMAC must match.
pub fn diff_id<R: Read + Send>(
    mut plain: ocicrypt::LayerDecryptor<R>,
    media_type: &str,
) -> Result<String, Error> {
    let io =
        |e: std::io::Error| Error::new(FailureClass::Io, format!("hashing the plaintext: {e}"));
    let compression = Compression::from_media_type(media_type)
        .map_err(|e| Error::new(FailureClass::RejectedByPolicy, e.to_string()))?;
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    {
        let mut decoder = compression
            .decoder(BufReader::new(&mut plain))
            .map_err(io)?;
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            let n = decoder.read(&mut buf).map_err(io)?;
            if n == 0 {
                break;
            }
            ctx.update(&buf[..n]);
        }
    }
    plain
        .finish()
        .map_err(|e| Error::new(ocicrypt_class(&e), e.to_string()))?;
    Ok(format!("sha256:{}", hex::encode(ctx.finish())))
}
