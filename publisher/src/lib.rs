//! The publisher side: build, encrypt and sign OCI images into an OCI layout.
//!
//! - [`layout`]: OCI layout writing (blobs by digest, tags in `index.json`).
//! - [`build`]: a reproducible one-layer image from a root file system directory.
//! - [`encrypt`]: ocicrypt layer encryption to JWE recipients (as `skopeo copy --encryption-key`).
//! - [`sign`]: cosign simple-signing signatures at the `sha256-<hex>.sig` tag.
//! - [`keygen`]: signing and recipient key pairs.
//! - [`cli`]: the operations of the `ocipub` command line and their reports.
//!
//! The service never uses this crate; it exists so the demo and the tests make their images
//! with tools the project controls, and cross-check them against skopeo and umoci.

pub mod build;
pub mod cli;
pub mod cmdline;
pub mod encrypt;
pub mod keygen;
pub mod layout;
pub mod sign;
