//! The operations of the `ocipub` command line and their one-line reports; `cmdline` only
//! parses arguments and calls them.

use std::path::{Path, PathBuf};

use ocicrypt::keyprovider::{ProviderConfig, ProviderRecipient};
use ocicrypt::keys::PublicKey;
use ocicrypt::EncryptConfig;

use crate::build::{self, BuildError, BuildOptions, LayerCompression};
use crate::encrypt::{self, EncryptError};
use crate::keygen::{self, KeyGenError, KeyKind};
use crate::layout::{Layout, LayoutError, REF_NAME};
use crate::sign::{self, SignError};

/// The image's environment when `build` is given none.
pub const DEFAULT_ENV: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Why a command failed (exit code 1).
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("reading {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("recipient {recipient:?}: no --keyprovider-config and OCICRYPT_KEYPROVIDER_CONFIG is not set")]
    NoProviderConfig { recipient: String },
    #[error("recipient {0:?}: use jwe:FILE or provider:NAME:KEY-ID")]
    BadRecipient(String),
    #[error("recipient {path}: {source}")]
    RecipientKey {
        path: String,
        #[source]
        source: ocicrypt::Error,
    },
    #[error(transparent)]
    KeyProvider(#[from] ocicrypt::Error),
    #[error(transparent)]
    KeyGen(#[from] KeyGenError),
    #[error(transparent)]
    Layout(#[from] LayoutError),
    #[error(transparent)]
    Build(#[from] BuildError),
    #[error(transparent)]
    Encrypt(#[from] EncryptError),
    #[error(transparent)]
    Sign(#[from] SignError),
}

/// `ocipub keygen`.
pub fn keygen(kind: KeyKind, out: &Path) -> Result<(), CliError> {
    keygen::write_pair(kind, out)?;
    println!("wrote {0}/priv.pem and {0}/pub.pem", out.display());
    Ok(())
}

/// `ocipub build`: the image of `rootfs` tagged `tag` in the layout (created if missing);
/// an empty `env` is [`DEFAULT_ENV`].
pub fn build(
    rootfs: &Path,
    layout: &Path,
    tag: &str,
    cmd: Vec<String>,
    env: Vec<String>,
    compression: LayerCompression,
) -> Result<(), CliError> {
    let layout = Layout::open_or_create(layout)?;
    let env = if env.is_empty() {
        vec![DEFAULT_ENV.into()]
    } else {
        env
    };
    let built = build::build(
        &layout,
        &BuildOptions {
            rootfs,
            tag,
            cmd,
            env,
            compression,
        },
    )?;
    println!(
        "{tag}: manifest {} layer {} ({} bytes, {} entries, diff_id {})",
        built.manifest.digest, built.layer.digest, built.layer.size, built.entries, built.diff_id
    );
    Ok(())
}

/// The recipients of `encrypt`: `jwe:FILE` public keys and `provider:NAME:KEY-ID` key
/// providers (configured by `keyprovider_config`, else `$OCICRYPT_KEYPROVIDER_CONFIG`).
pub fn recipients(
    recipients: &[String],
    keyprovider_config: Option<&Path>,
) -> Result<EncryptConfig, CliError> {
    let mut keys = Vec::new();
    let mut providers = Vec::new();
    for r in recipients {
        if r.starts_with("provider:") {
            let config = match keyprovider_config {
                Some(path) => ProviderConfig::load(path)?,
                None => ProviderConfig::from_env()?.ok_or_else(|| CliError::NoProviderConfig {
                    recipient: r.clone(),
                })?,
            };
            providers.push(ProviderRecipient::parse(r, &config)?);
            continue;
        }
        let Some(path) = r.strip_prefix("jwe:") else {
            return Err(CliError::BadRecipient(r.clone()));
        };
        let pem = std::fs::read(path).map_err(|source| CliError::Read {
            path: path.into(),
            source,
        })?;
        keys.push(
            PublicKey::from_pem(&pem).map_err(|source| CliError::RecipientKey {
                path: path.to_string(),
                source,
            })?,
        );
    }
    Ok(EncryptConfig::new(keys).with_providers(providers))
}

/// `ocipub encrypt`.
pub fn encrypt(
    layout: &Path,
    tag: &str,
    out_tag: &str,
    recipient: &[String],
    keyprovider_config: Option<&Path>,
    layers: &[usize],
) -> Result<(), CliError> {
    let layout = Layout::open(layout)?;
    let config = recipients(recipient, keyprovider_config)?;
    let desc = encrypt::encrypt(&layout, tag, out_tag, &config, layers)?;
    println!(
        "{out_tag}: manifest {} ({} recipients)",
        desc.digest,
        recipient.len()
    );
    Ok(())
}

/// `ocipub sign`.
pub fn sign(layout: &Path, tag: &str, key: &Path, identity: &str) -> Result<(), CliError> {
    let layout = Layout::open(layout)?;
    let pem = zeroize::Zeroizing::new(std::fs::read(key).map_err(|source| CliError::Read {
        path: key.to_path_buf(),
        source,
    })?);
    let desc = sign::sign(&layout, tag, &pem, identity)?;
    println!(
        "{tag}: signed for {identity}; signatures at {}",
        desc.annotations[REF_NAME]
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recipients_are_jwe_files_or_providers() {
        let e = recipients(&["rsa.pem".into()], None).unwrap_err();
        assert_eq!(
            e.to_string(),
            "recipient \"rsa.pem\": use jwe:FILE or provider:NAME:KEY-ID"
        );
        let e = recipients(&["jwe:/nonexistent/k.pem".into()], None).unwrap_err();
        assert!(
            e.to_string().starts_with("reading /nonexistent/k.pem: "),
            "{e}"
        );
        let dir = tempfile::tempdir().unwrap();
        let bad = dir.path().join("bad.pem");
        std::fs::write(&bad, "not a key").unwrap();
        let e = recipients(&[format!("jwe:{}", bad.display())], None).unwrap_err();
        assert!(matches!(e, CliError::RecipientKey { .. }), "{e}");
        let (_, public) = keygen::generate(KeyKind::EcP256).unwrap();
        let good = dir.path().join("pub.pem");
        std::fs::write(&good, public).unwrap();
        recipients(&[format!("jwe:{}", good.display())], None).unwrap();
    }
}
