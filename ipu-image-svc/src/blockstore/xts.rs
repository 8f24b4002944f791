//! AES-256-XTS over 4 KiB data units, the tweak being the unit's block number: what a
//! self-encrypting drive or SPDK's crypto bdev does. The two AES-256 keys (64 bytes) live in
//! secret memory for as long as the key exists and are zeroized when it is dropped.

use aes::cipher::KeyInit;
use aes::Aes256;
use xts_mode::{get_tweak_default, Xts128};

use crate::secret::SecretBuf;

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

    fn cipher(&self) -> Xts128<Aes256> {
        let k = self.bytes.as_slice();
        Xts128::new(
            Aes256::new_from_slice(&k[..32]).expect("32 bytes"),
            Aes256::new_from_slice(&k[32..]).expect("32 bytes"),
        )
    }
}

/// An XTS key ready to use (its AES key schedules built once).
pub struct XtsCipher {
    cipher: Xts128<Aes256>,
    _key: XtsKey,
}

impl XtsCipher {
    pub fn new(key: XtsKey) -> Self {
        Self {
            cipher: key.cipher(),
            _key: key,
        }
    }

    /// Encrypts whole blocks in place; `first_block` is the number of `data`'s first block.
    pub fn encrypt(&self, data: &mut [u8], first_block: u64) {
        debug_assert_eq!(data.len() % BLOCK, 0);
        self.cipher
            .encrypt_area(data, BLOCK, u128::from(first_block), get_tweak_default);
    }

    /// Decrypts whole blocks in place.
    pub fn decrypt(&self, data: &mut [u8], first_block: u64) {
        debug_assert_eq!(data.len() % BLOCK, 0);
        self.cipher
            .decrypt_area(data, BLOCK, u128::from(first_block), get_tweak_default);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_the_tweak_is_the_block_number() {
        let c = XtsCipher::new(XtsKey::generate().unwrap());
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
        let d = XtsCipher::new(XtsKey::generate().unwrap());
        let mut again = plain.clone();
        d.encrypt(&mut again, 7);
        c.encrypt(&mut data, 7);
        assert_ne!(again, data);
    }
}
