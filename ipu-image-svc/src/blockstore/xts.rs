//! AES-256-XTS over 4 KiB data units, the tweak being the unit's block number: what a
//! self-encrypting drive or SPDK's crypto bdev does. The two AES-256 keys (64 bytes) live in
//! secret memory for as long as the key exists and are zeroized when it is dropped.
//!
//! So do their key schedules: the `Xts128<Aes256>` (both AES-256 keys
//! expanded, encryption and decryption round keys; round keys 0 and 1 are the raw key) is
//! built straight into a [`SecretBox`] and wiped (the `aes` crate's `zeroize` feature, then
//! the whole mapping) when the cipher drops, which is what a clone's erase does. The stack,
//! where building the schedule and (in unoptimized builds) each block operation leave
//! round keys, is overwritten after each.

use aes::cipher::KeyInit;
use aes::Aes256;
use xts_mode::{get_tweak_default, Xts128};

use crate::secret::{SecretBox, SecretBuf};

/// The encryption data unit.
pub const BLOCK: usize = 4096;

/// An AES-256-XTS key (two AES-256 keys) in secret memory. No Debug, no Clone.
pub struct XtsKey {
    bytes: SecretBuf,
}

impl XtsKey {
    /// A fresh random key.
    pub fn generate() -> std::io::Result<Self> {
        let mut bytes = SecretBuf::new(64)?;
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), bytes.as_mut_slice())
            .map_err(|_| std::io::Error::other("no randomness"))?;
        if bytes.as_slice()[..32] == bytes.as_slice()[32..] {
            // XTS needs two different keys; 2^-256 odds, but checked.
            return Self::generate();
        }
        Ok(Self { bytes })
    }

    /// The two key schedules, built from the key bytes in secret memory straight into a
    /// secret box of their own.
    fn cipher(&self) -> std::io::Result<SecretBox<Xts128<Aes256>>> {
        let k = self.bytes.as_slice();
        SecretBox::new_with(
            #[inline(always)]
            || {
                Xts128::new(
                    Aes256::new_from_slice(&k[..32]).expect("32 bytes"),
                    Aes256::new_from_slice(&k[32..]).expect("32 bytes"),
                )
            },
        )
    }

    /// A copy of the key bytes, for tests that look for them in the process's memory after
    /// an erase. Not for anything else.
    #[doc(hidden)]
    pub fn copy_key_for_tests(&self, out: &mut [u8; 64]) {
        out.copy_from_slice(self.bytes.as_slice());
    }
}

/// An XTS key ready to use (its AES key schedules built once, in secret memory).
pub struct XtsCipher {
    cipher: SecretBox<Xts128<Aes256>>,
    key: XtsKey,
}

/// Bytes of stack overwritten after each block operation: an unoptimized `aes` backend
/// spills round keys into its frames (an optimized one keeps them in registers). A memset
/// of this size costs well under 1% of a 64 KiB cluster's encryption.
const IO_SCRUB_BYTES: usize = 8 * 1024;

#[inline(never)]
fn scrub_io_stack() {
    let mut area = [0u8; IO_SCRUB_BYTES];
    std::hint::black_box(&mut area);
}

impl XtsCipher {
    pub fn new(key: XtsKey) -> std::io::Result<Self> {
        Ok(Self {
            cipher: key.cipher()?,
            key,
        })
    }

    /// Encrypts whole blocks in place; `first_block` is the number of `data`'s first block.
    pub fn encrypt(&self, data: &mut [u8], first_block: u64) {
        debug_assert_eq!(data.len() % BLOCK, 0);
        self.cipher
            .encrypt_area(data, BLOCK, u128::from(first_block), get_tweak_default);
        scrub_io_stack();
    }

    /// Decrypts whole blocks in place.
    pub fn decrypt(&self, data: &mut [u8], first_block: u64) {
        debug_assert_eq!(data.len() % BLOCK, 0);
        self.cipher
            .decrypt_area(data, BLOCK, u128::from(first_block), get_tweak_default);
        scrub_io_stack();
    }

    /// See [`XtsKey::copy_key_for_tests`].
    #[doc(hidden)]
    pub fn copy_key_for_tests(&self, out: &mut [u8; 64]) {
        self.key.copy_key_for_tests(out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_the_tweak_is_the_block_number() {
        let c = XtsCipher::new(XtsKey::generate().unwrap()).unwrap();
        let plain = vec![0x5au8; 2 * BLOCK];
        let mut data = plain.clone();
        c.encrypt(&mut data, 7);
        assert_ne!(data, plain);
        // Equal plaintext blocks at different positions encrypt differently.
        assert_ne!(data[..BLOCK], data[BLOCK..]);
        let mut other = plain.clone();
        c.encrypt(&mut other, 8);
        assert_eq!(
            other[..BLOCK],
            data[BLOCK..],
            "block 8 is block 8 wherever it is written"
        );
        c.decrypt(&mut data, 7);
        assert_eq!(data, plain);
        // Another key: another ciphertext.
        let d = XtsCipher::new(XtsKey::generate().unwrap()).unwrap();
        let mut again = plain.clone();
        d.encrypt(&mut again, 7);
        c.encrypt(&mut data, 7);
        assert_ne!(again, data);
    }
}
