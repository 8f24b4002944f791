//! Two-pass decryption: authenticate the whole ciphertext first, then decrypt it as a stream.
//!
//! [`LayerDecryptor`](crate::LayerDecryptor) authenticates at the end, so a caller that must
//! not release unauthenticated plaintext has to hold all of it back (spool it) until
//! [`finish`](crate::LayerDecryptor::finish). When the ciphertext is already stored where only
//! the caller can change it (the IPU's spool of a received blob), checking its HMAC in a first
//! pass lets the second pass release each piece of plaintext as it is decrypted: every byte
//! released was authenticated, and nothing is written twice.
//!
//! [`CiphertextVerifier`] is the first pass; only its [`verify`](CiphertextVerifier::verify)
//! makes a [`VerifiedCiphertext`], and only that opens a [`VerifiedDecryptor`], which refuses
//! to yield more bytes than were authenticated and checks the plaintext digest and length at
//! [`finish`](VerifiedDecryptor::finish).

use std::io::{self, Read};

use aes::cipher::{KeyIvInit, StreamCipher};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::cipher::{hex, Aes256Ctr, StaleDigest};
use crate::options::{PrivateLayerOptions, PublicLayerOptions, CIPHER_NAME};
use crate::wipe::{scrub_stack, scrub_stack_at_end, HeapHome, Placed, StateHome, WipedHmac};
use crate::{AuthenticatedLayer, Error};

/// First pass: the HMAC over a layer's ciphertext, fed in pieces. Its state lives where the
/// [`StateHome`] put it and is wiped on drop.
pub struct CiphertextVerifier {
    mac: Placed<WipedHmac>,
    expected: Vec<u8>,
    size: u64,
}

impl std::fmt::Debug for CiphertextVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The HMAC state is keyed with the layer key: never shown.
        f.debug_struct("CiphertextVerifier")
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

impl CiphertextVerifier {
    /// Starts the HMAC with the layer key; the public options must name our cipher.
    pub fn new(
        pubopts: &PublicLayerOptions,
        privopts: &PrivateLayerOptions,
    ) -> Result<Self, Error> {
        Self::new_in(pubopts, privopts, &HeapHome)
    }

    /// [`new`](Self::new) with the HMAC state placed by `home`.
    pub fn new_in(
        pubopts: &PublicLayerOptions,
        privopts: &PrivateLayerOptions,
        home: &impl StateHome,
    ) -> Result<Self, Error> {
        if pubopts.cipher != CIPHER_NAME {
            return Err(Error::Unsupported(format!(
                "layer cipher {:?} (only {CIPHER_NAME})",
                pubopts.cipher
            )));
        }
        let mac = home
            .place(|| WipedHmac::new(privopts.symkey()))
            .map_err(Error::Io)?;
        scrub_stack();
        Ok(Self {
            mac,
            expected: pubopts.hmac.clone(),
            size: 0,
        })
    }

    pub fn update(&mut self, ciphertext: &[u8]) {
        self.mac.update(ciphertext);
        self.size += ciphertext.len() as u64;
    }

    /// Feeds everything `reader` yields.
    pub fn update_from(&mut self, mut reader: impl Read) -> io::Result<()> {
        let mut buf = vec![0u8; 256 * 1024];
        loop {
            match reader.read(&mut buf) {
                Ok(0) => return Ok(()),
                Ok(n) => self.update(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Compares the HMAC (in constant time) with the one in the public options.
    pub fn verify(mut self) -> Result<VerifiedCiphertext, Error> {
        let tag = self.mac.finalize_and_wipe();
        if !bool::from(tag.as_slice().ct_eq(&self.expected)) {
            return Err(Error::Integrity(
                "layer HMAC does not match: ciphertext modified or truncated".into(),
            ));
        }
        Ok(VerifiedCiphertext { size: self.size })
    }
}

/// Proof that `size` bytes of ciphertext matched the layer's HMAC.
#[derive(Debug)]
pub struct VerifiedCiphertext {
    size: u64,
}

impl VerifiedCiphertext {
    pub fn size(&self) -> u64 {
        self.size
    }
}

/// Second pass: decrypts the ciphertext that was verified, read again from where the caller
/// keeps it. Yields at most the verified length; [`finish`](Self::finish) requires exactly
/// that length and checks the plaintext digest.
pub struct VerifiedDecryptor<R> {
    inner: R,
    /// Where the [`StateHome`] put it; wiped on drop.
    ctr: Placed<Aes256Ctr>,
    plain_hash: Sha256,
    expected_digest: String,
    remaining: u64,
    size: u64,
}

impl<R> std::fmt::Debug for VerifiedDecryptor<R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The keystream state is the layer key: never shown.
        f.debug_struct("VerifiedDecryptor")
            .field("size", &self.size)
            .field("remaining", &self.remaining)
            .finish_non_exhaustive()
    }
}

impl<R: Read> VerifiedDecryptor<R> {
    /// `inner` must yield the same bytes the verifier was fed: keep them where only this
    /// process writes. A change is still caught at [`finish`](Self::finish) (length and
    /// plaintext digest), but only after the changed plaintext was yielded.
    pub fn new(inner: R, privopts: &PrivateLayerOptions, proof: VerifiedCiphertext) -> Self {
        Self::new_in(inner, privopts, proof, &HeapHome).expect("the heap home does not fail")
    }

    /// [`new`](Self::new) with the AES-CTR state placed by `home`.
    pub fn new_in(
        inner: R,
        privopts: &PrivateLayerOptions,
        proof: VerifiedCiphertext,
        home: &impl StateHome,
    ) -> Result<Self, Error> {
        let ctr = home
            .place(|| Aes256Ctr::new(privopts.symkey().into(), privopts.nonce().into()))
            .map_err(Error::Io)?;
        scrub_stack();
        Ok(Self {
            inner,
            ctr,
            plain_hash: Sha256::new(),
            expected_digest: privopts.digest().to_string(),
            remaining: proof.size,
            size: proof.size,
        })
    }

    /// Checks that exactly the verified length was decrypted and that the plaintext digest
    /// matches the private options; a differing digest is returned as [`StaleDigest`] (see
    /// [`LayerDecryptor::finish_allowing_stale_digest`](crate::LayerDecryptor::finish_allowing_stale_digest))
    /// for the caller to vouch for the content another way, or refuse it.
    pub fn finish(mut self) -> Result<(AuthenticatedLayer, Option<StaleDigest>), Error> {
        let mut probe = [0u8; 1];
        let more = self.inner.read(&mut probe).map_err(Error::Io)?;
        if self.remaining != 0 || more != 0 {
            return Err(Error::Integrity(format!(
                "the stored ciphertext changed after its HMAC was verified ({} bytes verified, {} decrypted{})",
                self.size,
                self.size - self.remaining,
                if more != 0 { ", and more follow" } else { "" }
            )));
        }
        let digest = format!(
            "sha256:{}",
            hex(&std::mem::take(&mut self.plain_hash).finalize())
        );
        let stale = (digest != self.expected_digest).then(|| StaleDigest {
            declared: std::mem::take(&mut self.expected_digest),
        });
        Ok((AuthenticatedLayer::new(Some(digest), self.size), stale))
    }
}

impl<R> Drop for VerifiedDecryptor<R> {
    /// As [`LayerDecryptor`](crate::LayerDecryptor)'s: the stack the keystream was made on.
    fn drop(&mut self) {
        scrub_stack_at_end();
    }
}

impl<R: Read> Read for VerifiedDecryptor<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let len = buf
            .len()
            .min(usize::try_from(self.remaining).unwrap_or(usize::MAX));
        if len == 0 {
            return Ok(0);
        }
        let n = self.inner.read(&mut buf[..len])?;
        self.ctr.apply_keystream(&mut buf[..n]);
        self.plain_hash.update(&buf[..n]);
        self.remaining -= n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{EncryptConfig, LayerEncryptor};
    use std::io::Write;

    const EC_PRIV: &str = include_str!("../../tests/fixtures/keys/ec-p256/priv.pem");
    const EC_PUB: &str = include_str!("../../tests/fixtures/keys/ec-p256/pub.pem");

    fn encrypted(plain: &[u8]) -> (Vec<u8>, PublicLayerOptions, PrivateLayerOptions) {
        let public = crate::keys::PublicKey::from_pem(EC_PUB.as_bytes()).unwrap();
        let key = crate::keys::PrivateKey::from_pem(EC_PRIV.as_bytes()).unwrap();
        let mut enc = LayerEncryptor::new(Vec::new(), &EncryptConfig::new(vec![public])).unwrap();
        enc.write_all(plain).unwrap();
        let (cipher, annotations) = enc.finish().unwrap();
        let pubopts = PublicLayerOptions::from_annotations(&annotations).unwrap();
        let json = crate::jwe::unwrap(&annotations[crate::ANNOTATION_KEYS_JWE], &[key]).unwrap();
        (
            cipher,
            pubopts,
            PrivateLayerOptions::from_json(&json).unwrap(),
        )
    }

    fn verified(
        cipher: &[u8],
        pubopts: &PublicLayerOptions,
        privopts: &PrivateLayerOptions,
    ) -> Result<VerifiedCiphertext, Error> {
        let mut v = CiphertextVerifier::new(pubopts, privopts)?;
        for piece in cipher.chunks(1000) {
            v.update(piece);
        }
        v.verify()
    }

    #[test]
    fn round_trip_yields_the_plaintext_and_its_digest() {
        let plain: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let (cipher, pubopts, privopts) = encrypted(&plain);
        let proof = verified(&cipher, &pubopts, &privopts).unwrap();
        assert_eq!(proof.size(), plain.len() as u64);
        let mut d = VerifiedDecryptor::new(cipher.as_slice(), &privopts, proof);
        let mut out = Vec::new();
        d.read_to_end(&mut out).unwrap();
        assert_eq!(out, plain);
        let (layer, stale) = d.finish().unwrap();
        assert!(stale.is_none());
        assert_eq!(layer.plaintext_digest(), Some(privopts.digest()));
        assert_eq!(layer.plaintext_size(), plain.len() as u64);
    }

    #[test]
    fn a_flipped_bit_or_a_cut_fails_the_first_pass() {
        let (cipher, pubopts, privopts) = encrypted(&[5u8; 10_000]);
        let mut flipped = cipher.clone();
        flipped[4321] ^= 1;
        for bad in [&flipped[..], &cipher[..cipher.len() - 1], &[][..]] {
            let e = verified(bad, &pubopts, &privopts).unwrap_err();
            assert!(matches!(e, Error::Integrity(_)), "{e}");
        }
        let mut other = pubopts.clone();
        other.cipher = "AES_128_GCM".into();
        assert!(matches!(
            CiphertextVerifier::new(&other, &privopts),
            Err(Error::Unsupported(_))
        ));
    }

    #[test]
    fn a_store_changed_between_the_passes_is_caught_at_finish() {
        let (cipher, pubopts, privopts) = encrypted(&[9u8; 50_000]);
        // Longer: never more than the verified length comes out, and finish refuses.
        let proof = verified(&cipher, &pubopts, &privopts).unwrap();
        let mut longer = cipher.clone();
        longer.extend_from_slice(b"appended");
        let mut d = VerifiedDecryptor::new(longer.as_slice(), &privopts, proof);
        let mut out = Vec::new();
        d.read_to_end(&mut out).unwrap();
        assert_eq!(out.len(), cipher.len());
        assert!(matches!(d.finish(), Err(Error::Integrity(_))));
        // Shorter.
        let proof = verified(&cipher, &pubopts, &privopts).unwrap();
        let mut d = VerifiedDecryptor::new(&cipher[..100], &privopts, proof);
        d.read_to_end(&mut Vec::new()).unwrap();
        assert!(matches!(d.finish(), Err(Error::Integrity(_))));
        // Same length, other bytes: the plaintext digest differs from the private options.
        let proof = verified(&cipher, &pubopts, &privopts).unwrap();
        let mut changed = cipher.clone();
        changed[7] ^= 0x80;
        let mut d = VerifiedDecryptor::new(changed.as_slice(), &privopts, proof);
        d.read_to_end(&mut Vec::new()).unwrap();
        let (_, stale) = d.finish().unwrap();
        assert_eq!(stale.unwrap().declared, privopts.digest());
    }

    #[test]
    fn debug_output_holds_no_key_state() {
        let (cipher, pubopts, privopts) = encrypted(b"secret");
        let v = CiphertextVerifier::new(&pubopts, &privopts).unwrap();
        assert_eq!(format!("{v:?}"), "CiphertextVerifier { size: 0, .. }");
        let proof = verified(&cipher, &pubopts, &privopts).unwrap();
        let d = VerifiedDecryptor::new(cipher.as_slice(), &privopts, proof);
        assert_eq!(
            format!("{d:?}"),
            "VerifiedDecryptor { size: 6, remaining: 6, .. }"
        );
    }
}
