//! Offline verification of Sigstore bundles, as cosign 3 and the other Sigstore clients write
//! them: the signature (a message signature or a DSSE envelope) by a public key or a Fulcio
//! certificate chained to a trusted root (`trusted_root.json`), the certificate's signed
//! certificate timestamps, the transparency log entry (Rekor v1: signed entry timestamp and
//! inclusion proof; Rekor v2: inclusion proof to a signed checkpoint), RFC 3161 timestamps,
//! and the rule that the signing time falls inside every validity window involved.
//!
//! # Use
//!
//! ```no_run
//! use sigstore_verify::{verify_json, Artifact, ExpectedIdentity, Matcher, Policy, TrustedRoot};
//! let root = TrustedRoot::public_good(); // or TrustedRoot::from_file(path)
//! let policy = Policy::identity(ExpectedIdentity {
//!     san: Matcher::exact("https://github.com/org/repo/.github/workflows/release.yml@refs/heads/main"),
//!     issuer: Matcher::exact("https://token.actions.githubusercontent.com"),
//! });
//! let bundle_json = std::fs::read_to_string("bundle.sigstore.json").unwrap();
//! let digest = Artifact::parse_digest("sha256:a0cfc71271d6e278e57cd332ff957c3f7043fdda354c4cbb190a30d56efa01bf").unwrap();
//! let verified = verify_json(&bundle_json, digest, &policy, &root).unwrap();
//! println!("{:?} {:?}", verified.signer, verified.tlog_entries);
//! ```
//!
//! With a key: `Policy::key(PublicKey::from_pem(..)?)`; add `.without_tlog()` to accept
//! bundles with no transparency log entry (cosign `sign --key --tlog-upload=false`).
//!
//! # Design
//!
//! Verification ([`verify::verify_at`]) runs in this order, each step failing with an error
//! naming the field or entry at fault: bundle shape and version rules ([`bundle`]); the
//! signer (certificate chain to a CA of the trusted root, SCTs, identity — or the policy's
//! key) ([`certificate`], [`sct`], [`identity`]); the signature over the artifact or the DSSE
//! PAE and the in-toto subject ([`dsse`]); each log entry ([`tlog`]: body bound to this
//! bundle ([`rekor`]), SET, Merkle inclusion ([`merkle`]), checkpoint); RFC 3161 timestamps;
//! then the certificate's validity at every verified time. Checks that need only local data
//! come before the checkpoint and timestamp checks.
//!
//! Rules chosen (each matches sigstore-go unless said otherwise):
//! - Trust-root validity windows are inclusive at both ends; a Rekor log key without a
//!   validity start makes the trusted root invalid.
//! - Only the trusted root's CA chains are used to build the certificate path; certificates
//!   after the leaf in a v0.1/v0.2 bundle chain are ignored, except that a self-issued (root)
//!   certificate there is refused. CA chains are trust anchors: their validity periods are
//!   checked, their signatures are not re-verified.
//! - An inclusion proof must carry a checkpoint signed by the log, with the proof's size and
//!   root. Rekor v2 entries need an inclusion proof; their signing time comes only from RFC
//!   3161 timestamps, and a log key must be valid at one of them.
//! - Entries from logs not in the trusted root are ignored (and reported in
//!   [`VerifiedBundle::ignored`]); any other failing entry fails the verification (stricter
//!   than sigstore-go, which skips entries whose SET does not verify). RFC 3161 timestamps
//!   that do not verify are ignored and reported, as in sigstore-go; the count required by
//!   the policy decides.
//! - Identity regular expressions are anchored (the whole SAN must match), unlike cosign.
//! - Integrated times more than [`tlog::MAX_CLOCK_SKEW`] in the future are refused.
//!
//! # Written by hand, and why
//!
//! The bundle and trusted root types are hand-written serde structs rather than
//! `sigstore_protobuf_specs`: that crate brings prost/pbjson code generation and its own
//! well-known-type shims for what is a handful of JSON fields here, and it would still need
//! the version rules and base64 checks on top. Likewise the `sigstore` crate is not used: it
//! brings a second crypto stack (RustCrypto signature crates plus OpenSSL or aws-lc) and
//! refuses Rekor v2 entries. Written here instead, each small: RFC 3339 parsing ([`time`]),
//! the Rekor entry bodies and SET payload ([`rekor`]), the RFC 6962 Merkle proof
//! ([`merkle`]), SCT list parsing and precertificate reconstruction ([`sct`]), DSSE PAE
//! ([`dsse`]). X.509 and CMS parsing come from the RustCrypto `x509-cert`/`cms` crates;
//! signatures are verified with `ring` ([`keys`]), except ECDSA over a bare digest (when
//! only `sha256:<hex>` of the artifact is known), which ring cannot do and `p256`/`p384` do.
//!
//! Module map:
//! - [`trust_root`]: the Sigstore `TrustedRoot` (CAs, Rekor logs, CT logs, TSAs, validity).
//! - [`bundle`]: the bundle format (media types v0.1, v0.2, v0.3).
//! - [`certificate`], [`sct`], [`identity`]: the Fulcio certificate, its SCTs, identity policy.
//! - [`rekor`], [`merkle`], [`tlog`]: log entry bodies, inclusion proofs, entry verification.
//! - [`checkpoint`]: signed checkpoints (C2SP signed notes) of transparency logs.
//! - [`rfc3161`]: RFC 3161 time-stamp tokens (CMS SignedData over a TSTInfo).
//! - [`verify`]: the policy and the orchestration; [`VerifiedBundle`] is what callers audit.

pub mod bundle;
pub mod certificate;
pub mod checkpoint;
pub mod dsse;
pub mod identity;
pub mod keys;
pub mod merkle;
pub mod rekor;
pub mod rfc3161;
pub mod sct;
pub mod time;
pub mod tlog;
pub mod trust_root;
pub mod tsp;
pub mod verify;

use std::time::SystemTime;

pub use bundle::{Bundle, BundleError};
pub use certificate::{CertificateIdentity, San};
pub use identity::{ExpectedIdentity, Matcher};
pub use keys::PublicKey;
pub use trust_root::{TrustRootError, TrustedRoot};
pub use verify::{
    verify, verify_at, verify_json, Artifact, Policy, SignatureFormat, Signer, SignerPolicy,
    TimeSource, VerifiedBundle, VerifiedTime, VerifyError,
};

/// A validity window as the trusted root gives it; both ends inclusive, either may be open.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ValidFor {
    pub start: Option<SystemTime>,
    pub end: Option<SystemTime>,
}

impl ValidFor {
    /// Whether `t` is inside the window (both ends inclusive).
    pub fn contains(&self, t: SystemTime) -> bool {
        self.start.is_none_or(|s| s <= t) && self.end.is_none_or(|e| t <= e)
    }
}
