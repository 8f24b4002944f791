//! IPU image service: the data path from an image reference to a function's exported clone.
//!
//! The stages, in the order a request goes through them, each handing the next a typed value:
//! - [`fetch`]: registries and OCI layouts, digest-checked streams, the verified blob cache
//!   ([`fetch::pull`] fetches a verified image's layers).
//! - [`verify`]: deployment policy admission, trust policy, manifest, signatures, config:
//!   a [`verify::VerifiedImage`].
//! - [`keys`]: the one layer-key release (key broker through [`keys::broker_client`], or
//!   local development keys): a [`keys::LayerKey`] per encrypted layer.
//! - [`decrypt`]: ocicrypt streaming and two-pass decryption with a released key.
//! - [`unpack`]: safe OCI layer application into the image's ext4 file system, built in
//!   memory with file content streamed to its blocks (the `ext4-image` crate).
//! - [`rootfs`]: where the ext4 image goes: a file, or (the service) the encrypted base.
//! - [`build`]: decrypt, unpack and rootfs for every layer of a pulled image, the stages of
//!   each layer's stream on separate threads ([`readahead`]).
//! - [`blockstore`]: the encrypted base, copy-on-write clones, cryptographic erase.
//! - [`export`]: clones exported to the host over NBD.
//! - [`service`]: Prepare (the cache decision), Teardown, Verify and the decrypt hook's
//!   DecryptLayer, transport-free, with [`service::grpc`] as its API.
//!
//! Around them: [`pipeline`] composes the stages for one request; [`command`] sets up, and
//! [`report`] runs and reports, the CLI's `image verify|pull|unpack`; [`policy_bundle`]
//! installs the signed running policy; [`error`] classifies failures (exit codes, gRPC status); [`record`] writes a
//! request's audit events; [`progress`] is what a front end hears; [`tpm`] is the TPM
//! prover for the key broker; [`secret`] is memory for key material.

pub mod blockstore;
pub mod build;
pub mod cmdline;
pub mod command;
pub mod config;
pub mod decrypt;
pub mod error;
pub mod export;
pub mod fetch;
pub mod grant;
pub mod keys;
pub mod metrics;
pub mod pipeline;
pub mod policy_bundle;
pub mod progress;
pub mod readahead;
pub mod record;
pub mod report;
pub mod rootfs;
pub mod secret;
pub mod service;
pub mod tpm;
pub mod unpack;
pub mod verify;
