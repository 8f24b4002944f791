//! OCI image layer encryption, byte-compatible with Go ocicrypt (skopeo, containerd imgcrypt).
//!
//! An encrypted layer has the plain media type plus `+encrypted`, the same size as its
//! plaintext, and two annotations: `org.opencontainers.image.enc.keys.jwe` (the private options,
//! wrapped to each recipient as JWE) and `org.opencontainers.image.enc.pubopts` (cipher name and
//! the HMAC of the ciphertext). The cipher is AES-256-CTR with HMAC-SHA256 over the whole
//! ciphertext, both keyed by the layer key from the private options, which also carry the
//! plaintext digest.
//!
//! The rule this crate enforces in its types: [`LayerDecryptor`] hands out plaintext that is not
//! yet authenticated; only [`LayerDecryptor::finish`] returns an [`AuthenticatedLayer`], after
//! the HMAC over the whole ciphertext and the plaintext digest were checked (the digest is
//! left to callers that verify the plaintext themselves, [`PlaintextCheck::CallerVerifies`]).
//! Callers keep the plaintext private until they hold that proof.
//!
//! Where the ciphertext is stored where only the caller writes, [`CiphertextVerifier`] checks
//! the HMAC in a first pass and its [`VerifiedCiphertext`] opens a [`VerifiedDecryptor`]
//! whose plaintext may be released as it comes (every byte of it was authenticated).
//!
//! Speed: decryption is the HMAC over the ciphertext (one SHA-256 pass) and AES-CTR (a third
//! of one with AES-NI), plus a second SHA-256 pass for the plaintext digest unless the caller
//! verifies the plaintext itself ([`DecryptMode`]). With more than one CPU the HMAC runs on a
//! helper thread ([`HmacMode`]); `cargo bench -p ocicrypt --bench decrypt_throughput` measures
//! the modes against one SHA-256 pass and against skopeo.
//!
//! Modules:
//! - `cipher`: the AES-256-CTR + HMAC-SHA256 layer cipher as streams ([`LayerEncryptor`],
//!   [`LayerDecryptor`]) and the unwrapping of private options with [`DecryptConfig`].
//! - `two_pass`: [`CiphertextVerifier`], [`VerifiedCiphertext`], [`VerifiedDecryptor`].
//! - `options`: the public (`pubopts`) and private layer options.
//! - [`jwe`]: JWE key wrapping (RSA-OAEP, ECDH-ES+A256KW on P-256/384/521; A256GCM).
//! - [`keyprovider`]: the key provider protocol and `provider:<name>:<param>` recipients.
//! - [`keys`]: JWE recipient keys, public and private (RSA, EC P-256/P-384/P-521).
//! - `hw`: which AES and SHA instructions this CPU has.
//! - `wipe`: where key-dependent cipher state lives ([`StateHome`]) and how it is wiped.

mod cipher;
mod hw;
pub mod jwe;
pub mod keyprovider;
pub mod keys;
mod options;
mod two_pass;
mod wipe;

use std::collections::BTreeMap;

pub use cipher::{
    decrypt_layer, decrypt_layer_with, unwrap_private_options, AuthenticatedLayer, DecryptMode,
    HmacMode, LayerDecryptor, LayerEncryptor, PlaintextCheck, StaleDigest,
};
pub use hw::{hardware_acceleration, HwAccel};
pub use options::{PrivateLayerOptions, PublicLayerOptions, CIPHER_NAME};
pub use two_pass::{CiphertextVerifier, VerifiedCiphertext, VerifiedDecryptor};
pub use wipe::{scrub_stack, HeapHome, Placed, StateHome};

pub(crate) use hw::log_hardware_once;

pub const ANNOTATION_KEYS_JWE: &str = "org.opencontainers.image.enc.keys.jwe";
pub const ANNOTATION_PUBOPTS: &str = "org.opencontainers.image.enc.pubopts";
pub const ANNOTATION_KEYS_PROVIDER_PREFIX: &str = "org.opencontainers.image.enc.keys.provider.";

const ENCRYPTED_SUFFIX: &str = "+encrypted";

/// Layer annotations.
pub type Annotations = BTreeMap<String, String>;

pub fn is_encrypted_media_type(mt: &str) -> bool {
    mt.ends_with(ENCRYPTED_SUFFIX)
}

pub fn encrypted_media_type(mt: &str) -> String {
    format!("{mt}{ENCRYPTED_SUFFIX}")
}

pub fn decrypted_media_type(mt: &str) -> Option<&str> {
    mt.strip_suffix(ENCRYPTED_SUFFIX)
}

/// Recipients to encrypt layer keys to: JWE public keys and key providers.
#[derive(Clone, Debug)]
pub struct EncryptConfig {
    recipients: Vec<keys::PublicKey>,
    providers: Vec<keyprovider::ProviderRecipient>,
}

impl EncryptConfig {
    pub fn new(recipients: Vec<keys::PublicKey>) -> Self {
        Self {
            recipients,
            providers: Vec::new(),
        }
    }

    /// Adds key provider recipients (`provider:<name>:<param>`).
    pub fn with_providers(mut self, providers: Vec<keyprovider::ProviderRecipient>) -> Self {
        self.providers = providers;
        self
    }

    pub fn recipients(&self) -> &[keys::PublicKey] {
        &self.recipients
    }

    pub fn providers(&self) -> &[keyprovider::ProviderRecipient] {
        &self.providers
    }
}

/// Private keys that may unwrap layer keys.
#[derive(Debug)]
pub struct DecryptConfig {
    keys: Vec<keys::PrivateKey>,
}

impl DecryptConfig {
    pub fn new(keys: Vec<keys::PrivateKey>) -> Self {
        Self { keys }
    }

    pub fn keys(&self) -> &[keys::PrivateKey] {
        &self.keys
    }
}

/// What kind of failure an [`Error`] is, for callers that map errors to outcomes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorClass {
    /// No configured key opens the layer.
    NoKey,
    /// Authentication failed: HMAC, plaintext digest, JWE tag, truncation.
    Integrity,
    /// Annotations or JWE are not well formed.
    Malformed,
    /// A well-formed input that uses something we do not implement.
    Unsupported,
    /// Reading or writing the stream failed.
    Io,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no usable decryption key: {0}")]
    NoKey(String),
    #[error("integrity check failed: {0}")]
    Integrity(String),
    #[error("malformed JWE: {0}")]
    MalformedJwe(String),
    #[error("malformed encryption annotations: {0}")]
    MalformedAnnotations(String),
    #[error("unsupported: {0}")]
    Unsupported(String),
    #[error("bad key: {0}")]
    Key(String),
    #[error("layer stream: {0}")]
    Io(#[source] std::io::Error),
}

impl Error {
    pub fn class(&self) -> ErrorClass {
        match self {
            Error::NoKey(_) => ErrorClass::NoKey,
            Error::Integrity(_) => ErrorClass::Integrity,
            Error::MalformedJwe(_) | Error::MalformedAnnotations(_) | Error::Key(_) => {
                ErrorClass::Malformed
            }
            Error::Unsupported(_) => ErrorClass::Unsupported,
            Error::Io(_) => ErrorClass::Io,
        }
    }
}
