//! Policy: the image trust policy (containers-policy.json) and, later, the deployment policy.
//!
//! - [`reference`]: `docker://`, `oci:` and `dir:` references and their policy scopes.
//! - [`trust`]: strict containers-policy.json parsing and pure evaluation. Supported:
//!   `default`, transports `docker`, `oci`, `dir`; requirements `reject`,
//!   `insecureAcceptAnything`, `sigstoreSigned` (`keyPath`, `keyPaths`, `keyData`, `keyDatas`,
//!   `fulcio`, `rekorPublicKey*`, and the extensions `trustedRootPath`/`trustedRootData`,
//!   `fulcio.subjectURI`/`subjectRegexp`/`oidcIssuerRegexp`, `requireTransparencyLog`,
//!   `acceptDigestOnlyStatements`) with every `signedIdentity` rule. Refused with a clear error:
//!   `signedBy` (GPG), `pki`, other transports, unknown fields. [`trust::verify_bundle`] is where
//!   the Sigstore bundle verifier is wired in (it refuses until then).
//! - [`sigstore`]: cosign simple-signing verification (ECDSA P-256/P-384, Ed25519 keys);
//!   signature formats and sources; the shape of Sigstore bundles and in-toto statements.
//!
//! - [`deploy`]: the deployment policy (tenants, functions, image scopes, keys, IPU classes,
//!   limits) in TOML, with positioned errors, lint, and a pure decision function.
//!
//! - [`grant`]: signed placement grants (tenant, function, image, IPU, host, validity
//!   window, serial) and their verification against the deployment policy's grant keys.
//! - [`dsse`]: the DSSE envelopes that bundles and grants are signed in.
//!
//! - [`sigstore_bundle`]: `policy sigstore verify-bundle`, offline verification of a Sigstore
//!   bundle (v0.1-v0.3, keyless or with a key) through the `sigstore-verify` crate, speaking
//!   the sigstore-conformance client protocol.
//!
//! - [`cli`]: the operations of the `policy` command line (check, lint, explain, test, diff,
//!   keygen, sign, verify) and the rendering of their reports.
//!
//! Evaluation is a pure function so that every service calling it reaches the same decision.

pub mod cli;
pub mod cmdline;
pub mod deploy;
pub mod dsse;
pub mod grant;
pub mod reference;
pub mod sigstore;
pub mod sigstore_bundle;
pub mod trust;

pub use trust::{Decision, Policy, PolicyError, RejectClass};
