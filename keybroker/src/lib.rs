//! Key broker: layer keys released only to attested IPUs.
//!
//! - [`attest`]: the quote verifier (TPMS_ATTEST parsing, ECDSA P-256 signature, nonce and
//!   ephemeral-key binding, PCR selection and values against the IPU class's reference
//!   values), single-use nonces, AK template checks and persisted enrollments.
//! - [`credential`]: TPM2_MakeCredential in software, pinning an AK to its TPM's EK.
//! - [`keystore`]: key-encryption keys (versioned, revocable) sealed at rest in sled under
//!   a master key: a 0600 file, or sealed by the broker host's TPM ([`sealing`]).
//! - [`release`]: sealing a released key to the attested session key (ECDH + HKDF + GCM).
//! - [`broker`]: the transport-free flow (attest -> session -> policy-checked, audited
//!   release), key provider wrapping, and audited administration.
//! - [`provider`]: the ocicrypt key provider protocol door (WrapKey / UnWrapKey).
//! - [`service`]: gRPC over mutual TLS (roles from the certificate OU) and over a Unix
//!   socket (roles from the peer's uid); [`config`]: `keybroker serve`'s configuration.

pub mod admin;
pub mod broker;
pub mod config;
pub mod credential;
pub mod daemon;
pub mod keystore;
pub mod output;
pub mod provider;
pub mod provider_command;
pub mod sealing;
pub mod service;
pub mod tpm2;
pub mod verifier;
pub mod wrapping;
