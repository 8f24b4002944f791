//! The key broker protocol, as both its sides use it: the broker (`keybroker`) and the IPU
//! (`ipu-image-svc`). Small on purpose: no storage, no certificates, no server.
//!
//! - [`evidence`]: what the IPU sends to attest ([`Evidence`]) and the qualifying data its
//!   quote must carry ([`binding`]: the broker's nonce bound to the session key).
//! - [`release`]: a released key sealed to the attested session key ([`SealedKey`], opened
//!   with [`SessionKey`]) for one image and layer ([`release_context`]).

pub mod evidence;
pub mod release;

pub use evidence::{binding, Evidence};
pub use release::{release_context, seal, ReleaseError, SealedKey, SessionKey};

/// The key provider name publishers configure (`provider:<name>:<key id>`) unless the broker
/// is told otherwise.
pub const DEFAULT_PROVIDER_NAME: &str = "ipubroker";
