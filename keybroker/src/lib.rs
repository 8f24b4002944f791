//! Key broker: TPM2 attestation verifier and key release service.
//!
//! Built so far: [`attest`], the quote verifier (TPMS_ATTEST parsing, ECDSA P-256 signature,
//! nonce and ephemeral-key binding, PCR selection and values) and single-use nonces;
//! [`release`], sealing released keys to the attested session key; [`keystore`], the
//! key-encryption keys sealed at rest under a master key; [`broker`], the transport-free
//! attest -> session -> policy-checked, audited release flow. The gRPC
//! service, key storage, sessions and key release follow in issue 5; until then
//! ipu-image-svc takes layer keys from a local key file, an explicit development option.

pub mod attest;
pub mod broker;
pub mod keystore;
pub mod release;
pub mod service;
