//! IPU image service: pull, verify, decrypt, unpack and build the rootfs.
//!
//! - [`fetch`]: registries and OCI layouts, digest-checked streams, the verified blob cache.
//! - [`unpack`]: safe OCI layer application into a private staging tree.
//! - [`rootfs`]: the ext4 image (`mkfs.ext4 -d`).
//! - [`tpm`]: the TPM attestation key and quotes for the key broker.
//! - [`keys`]: layer keys, from the key broker ([`keys::broker_client`]) or local files.
//! - [`secret`]: memory for key material (memfd_secret, else locked and not dumped).
//! - [`pipeline`]: verify -> pull -> decrypt/unpack -> publish, with typed outcomes.

pub mod blockstore;
pub mod export;
pub mod fetch;
pub mod keys;
pub mod pipeline;
pub mod rootfs;
pub mod secret;
pub mod service;
pub mod tpm;
pub mod unpack;
