//! `policy sigstore verify-bundle`: verifies a Sigstore bundle offline, as the
//! sigstore-conformance client protocol calls it:
//!
//! ```text
//! policy sigstore verify-bundle --bundle F (--certificate-identity I --certificate-oidc-issuer U | --key K)
//!     [--trusted-root T] FILE_OR_DIGEST
//! ```
//!
//! `FILE_OR_DIGEST` is the artifact's path or `sha256:<hex>`. The default trusted root is the
//! Sigstore public-good one shipped with `sigstore-verify`. A transparency log entry is always
//! required here. Exit 0 when verified; otherwise one line on stderr saying what failed.

use std::path::{Path, PathBuf};

use sigstore_verify::{
    verify_json, Artifact, ExpectedIdentity, Matcher, Policy, PublicKey, Signer, TrustedRoot,
    VerifiedBundle,
};

use crate::cli::EXIT_DENIED;

/// Who must have signed, as given on the command line.
#[derive(Clone, Debug)]
pub enum SignerArg {
    Identity { identity: String, issuer: String },
    Key(PathBuf),
}

/// The inputs of `verify-bundle`.
#[derive(Clone, Debug)]
pub struct VerifyBundleArgs {
    pub bundle: PathBuf,
    pub signer: SignerArg,
    pub trusted_root: Option<PathBuf>,
    pub artifact: String,
}

/// Why the bundle was not verified (the message names the input and what failed).
#[derive(Debug, thiserror::Error)]
pub enum VerifyBundleError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("trusted root {}: {source}", path.display())]
    TrustedRoot {
        path: PathBuf,
        #[source]
        source: sigstore_verify::TrustRootError,
    },
    #[error("key {}: {source}", path.display())]
    Key {
        path: PathBuf,
        #[source]
        source: sigstore_verify::keys::KeyError,
    },
    #[error("artifact: {0}")]
    Digest(#[from] sigstore_verify::verify::DigestParseError),
    #[error("bundle {}: {source}", path.display())]
    Refused {
        path: PathBuf,
        #[source]
        source: sigstore_verify::VerifyError,
    },
}

fn read(path: &Path) -> Result<Vec<u8>, VerifyBundleError> {
    std::fs::read(path).map_err(|source| VerifyBundleError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// Verifies as `args` say; the verified result on success.
pub fn verify_bundle(args: &VerifyBundleArgs) -> Result<VerifiedBundle, VerifyBundleError> {
    let root = match &args.trusted_root {
        Some(path) => {
            TrustedRoot::from_file(path).map_err(|source| VerifyBundleError::TrustedRoot {
                path: path.clone(),
                source,
            })?
        }
        None => TrustedRoot::public_good(),
    };
    let policy = match &args.signer {
        SignerArg::Identity { identity, issuer } => Policy::identity(ExpectedIdentity {
            san: Matcher::exact(identity.clone()),
            issuer: Matcher::exact(issuer.clone()),
        }),
        SignerArg::Key(path) => {
            let pem = String::from_utf8_lossy(&read(path)?).into_owned();
            let key = PublicKey::from_pem(&pem).map_err(|source| VerifyBundleError::Key {
                path: path.clone(),
                source,
            })?;
            Policy::key(key)
        }
    };
    let bundle_bytes = read(&args.bundle)?;
    let bundle_json = String::from_utf8_lossy(&bundle_bytes);
    let artifact_bytes;
    let artifact = if args.artifact.starts_with("sha256:") {
        Artifact::parse_digest(&args.artifact)?
    } else {
        artifact_bytes = read(Path::new(&args.artifact))?;
        Artifact::Bytes(&artifact_bytes)
    };
    verify_json(&bundle_json, artifact, &policy, &root).map_err(|source| {
        VerifyBundleError::Refused {
            path: args.bundle.clone(),
            source,
        }
    })
}

/// A short report of a verified bundle.
pub fn render(v: &VerifiedBundle) -> String {
    let mut lines = vec![format!(
        "verified: {:?} bundle, {:?}",
        v.bundle_version, v.format
    )];
    match &v.signer {
        Signer::Certificate {
            identity, ca_uri, ..
        } => {
            let sans: Vec<&str> = identity.sans.iter().map(|s| s.as_str()).collect();
            lines.push(format!(
                "signer: {} (issuer {}, CA {ca_uri})",
                sans.join(", "),
                identity.issuer.as_deref().unwrap_or("?")
            ));
        }
        Signer::Key { key_id, .. } => lines.push(format!("signer: key sha256:{key_id}")),
    }
    for e in &v.tlog_entries {
        lines.push(format!(
            "tlog: {} index {} ({} {})",
            e.log_url, e.log_index, e.kind, e.kind_version
        ));
    }
    for t in &v.timestamps {
        lines.push(format!(
            "time: {} ({:?})",
            sigstore_verify::time::Rfc3339(t.time),
            t.source
        ));
    }
    lines.join("\n")
}

/// Runs the command: exit 0 verified, [`EXIT_DENIED`] refused (one line on stderr).
pub fn run(args: &VerifyBundleArgs) -> u8 {
    match verify_bundle(args) {
        Ok(v) => {
            println!("{}", render(&v));
            0
        }
        Err(e) => {
            let line = e.to_string().replace(['\n', '\r'], " ");
            eprintln!("policy: sigstore verify-bundle: {line}");
            EXIT_DENIED
        }
    }
}
