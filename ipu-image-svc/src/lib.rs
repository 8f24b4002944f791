//! IPU image service: pull, verify, decrypt, unpack and build the rootfs.
//!
//! - [`fetch`]: registries and OCI layouts, digest-checked streams, the verified blob cache.
//! - [`unpack`]: safe OCI layer application into a private staging tree.
//! - [`rootfs`]: the ext4 image (`mkfs.ext4 -d`).
//! - [`attest`]: the TPM attestation key and quotes for the key broker.
//! - [`secret`]: memory for key material (memfd_secret, else locked and not dumped).
//! - [`pipeline`]: verify -> pull -> decrypt/unpack -> publish, with typed outcomes.

pub mod attest;
pub mod blockstore;
pub mod broker;
pub mod export;
pub mod fetch;
pub mod pipeline;
pub mod rootfs;
pub mod secret;
pub mod service;
pub mod unpack;
