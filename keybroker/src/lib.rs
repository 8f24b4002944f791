//! Key broker: TPM2 attestation verifier and key release service.
//!
//! Not built yet: issue 5 fills this crate. Until then ipu-image-svc takes
//! layer keys from a local key file, an explicit development option.
