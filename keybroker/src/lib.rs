//! Key broker: layer keys released only to attested IPUs.
//!
//! What the IPU shares with the broker (evidence, the session binding, sealed keys) is the
//! `broker_protocol` crate.
//!
//! - [`verifier`]: the quote verifier (TPMS_ATTEST parsing, ECDSA P-256 signature, nonce and
//!   ephemeral-key binding, PCR selection and values against the IPU class's reference
//!   values), single-use nonces, AK template checks and persisted enrollments.
//! - [`tpm2`]: reading TPM-marshalled structures (cursor, tags, object attributes).
//! - [`credential`]: TPM2_MakeCredential in software, pinning an AK to its TPM's EK.
//! - [`store`]: the broker's state behind one trait, in sled (embedded) or PostgreSQL
//!   (shared by replicas).
//! - [`keystore`]: key-encryption keys (versioned, revocable) sealed at rest in the store under
//!   a master key: a 0600 file, or sealed by the broker host's TPM ([`sealing`]).
//! - [`broker`]: the transport-free flow (attest -> session -> policy-checked, audited
//!   release sealed to the session key), key provider wrapping, and audited administration.
//! - [`wrapping`]: the broker's key provider annotation (key, version, JWE).
//! - [`provider`]: the ocicrypt key provider protocol door (WrapKey / UnWrapKey).
//! - [`service`]: gRPC over mutual TLS (roles from the certificate OU) and over a Unix
//!   socket (roles from the peer's uid); [`config`]: `keybroker serve`'s configuration;
//!   [`daemon`]: the serving process (audit sink, listeners, signals, drain).
//! - [`admin`]: the administrative commands on a running broker or its state directory;
//!   [`output`]: what they print; [`provider_command`]: the key provider's command form.

pub mod admin;
pub mod broker;
pub mod cmdline;
pub mod config;
pub mod credential;
pub mod daemon;
pub mod keystore;
pub mod metrics;
pub mod output;
pub mod provider;
pub mod provider_command;
pub mod sealing;
pub mod service;
pub mod store;
pub mod tpm2;
pub mod verifier;
pub mod wrapping;
