//! `ocipub`: build, encrypt and sign OCI images into an OCI layout.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use ocicrypt::keyprovider::{ProviderConfig, ProviderRecipient};
use ocicrypt::keys::PublicKey;
use ocicrypt::EncryptConfig;
use publisher::build::{self, BuildOptions, LayerCompression};
use publisher::keygen::{self, KeyKind};
use publisher::layout::Layout;
use publisher::{encrypt, sign};

#[derive(Parser)]
#[command(
    name = "ocipub",
    version,
    about = "Build, encrypt and sign OCI images (publisher side)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate a key pair: DIR/priv.pem (PKCS#8, mode 0600) and DIR/pub.pem.
    Keygen {
        #[arg(long, value_enum)]
        kind: KeyKind,
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
    /// Build a one-layer image from a root file system directory and tag it in an OCI layout.
    Build {
        #[arg(long, value_name = "DIR")]
        rootfs: PathBuf,
        #[arg(long, value_name = "DIR")]
        layout: PathBuf,
        #[arg(long)]
        tag: String,
        /// The image's command (repeat for arguments).
        #[arg(long, value_name = "ARG")]
        cmd: Vec<String>,
        #[arg(long, value_name = "NAME=VALUE")]
        env: Vec<String>,
        #[arg(long, value_enum, default_value = "gzip")]
        compression: LayerCompression,
    },
    /// Encrypt an image's layers to JWE recipients (`jwe:PUBLIC.pem`) or key providers
    /// (`provider:NAME:KEY-ID`) under a new tag.
    Encrypt {
        #[arg(long, value_name = "DIR")]
        layout: PathBuf,
        #[arg(long)]
        tag: String,
        #[arg(long)]
        out_tag: String,
        /// `jwe:FILE` with an RSA or EC (P-256/384/521) public key, or `provider:NAME:KEY-ID`
        /// for an ocicrypt key provider (e.g. the key broker); repeat for more recipients.
        #[arg(long, required = true, value_name = "jwe:FILE|provider:NAME:ID")]
        recipient: Vec<String>,
        /// The ocicrypt key provider configuration (default: $OCICRYPT_KEYPROVIDER_CONFIG).
        #[arg(long, value_name = "FILE")]
        keyprovider_config: Option<PathBuf>,
        /// Encrypt only this layer (0-based; repeatable). Default: every layer.
        #[arg(long, value_name = "N")]
        layer: Vec<usize>,
    },
    /// Sign the manifest of a tag (cosign simple signing) for a repository identity.
    Sign {
        #[arg(long, value_name = "DIR")]
        layout: PathBuf,
        #[arg(long)]
        tag: String,
        /// ECDSA P-256 private key, unencrypted PKCS#8 PEM.
        #[arg(long, value_name = "FILE")]
        key: PathBuf,
        /// The repository the signature claims, e.g. registry.example/team/app.
        #[arg(long)]
        identity: String,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ocipub: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Keygen { kind, out } => {
            keygen::write_pair(kind, &out)?;
            println!("wrote {0}/priv.pem and {0}/pub.pem", out.display());
        }
        Command::Build {
            rootfs,
            layout,
            tag,
            cmd,
            env,
            compression,
        } => {
            let layout = Layout::open_or_create(&layout)?;
            let env = if env.is_empty() {
                vec!["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into()]
            } else {
                env
            };
            let built = build::build(
                &layout,
                &BuildOptions {
                    rootfs: &rootfs,
                    tag: &tag,
                    cmd,
                    env,
                    compression,
                },
            )?;
            println!(
                "{tag}: manifest {} layer {} ({} bytes, {} entries, diff_id {})",
                built.manifest.digest,
                built.layer.digest,
                built.layer.size,
                built.entries,
                built.diff_id
            );
        }
        Command::Encrypt {
            layout,
            tag,
            out_tag,
            recipient,
            keyprovider_config,
            layer,
        } => {
            let layout = Layout::open(&layout)?;
            let mut keys = Vec::new();
            let mut providers = Vec::new();
            for r in &recipient {
                if r.starts_with("provider:") {
                    let config = match &keyprovider_config {
                        Some(path) => ProviderConfig::load(path)?,
                        None => ProviderConfig::from_env()?.with_context(|| {
                            format!("recipient {r:?}: no --keyprovider-config and OCICRYPT_KEYPROVIDER_CONFIG is not set")
                        })?,
                    };
                    providers.push(ProviderRecipient::parse(r, &config)?);
                    continue;
                }
                let Some(path) = r.strip_prefix("jwe:") else {
                    bail!("recipient {r:?}: use jwe:FILE or provider:NAME:KEY-ID");
                };
                let pem = std::fs::read(path).with_context(|| format!("reading {path}"))?;
                keys.push(PublicKey::from_pem(&pem).with_context(|| format!("recipient {path}"))?);
            }
            let config = EncryptConfig::new(keys).with_providers(providers);
            let desc = encrypt::encrypt(&layout, &tag, &out_tag, &config, &layer)?;
            println!(
                "{out_tag}: manifest {} ({} recipients)",
                desc.digest,
                recipient.len()
            );
        }
        Command::Sign {
            layout,
            tag,
            key,
            identity,
        } => {
            let layout = Layout::open(&layout)?;
            let pem = zeroize::Zeroizing::new(
                std::fs::read(&key).with_context(|| format!("reading {}", key.display()))?,
            );
            let desc = sign::sign(&layout, &tag, &pem, &identity)?;
            println!(
                "{tag}: signed for {identity}; signatures at {}",
                desc.annotations[publisher::layout::REF_NAME]
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_cli_definition_is_consistent() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }
}
