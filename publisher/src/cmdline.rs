//! `ocipub`: build, encrypt and sign OCI images into an OCI layout.

use std::path::PathBuf;
use std::process::ExitCode;

use crate::build::LayerCompression;
use crate::cli::{self, CliError};
use crate::keygen::KeyKind;
use clap::{Parser, Subcommand};

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

pub fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ocipub: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<(), CliError> {
    match cli.command {
        Command::Keygen { kind, out } => cli::keygen(kind, &out),
        Command::Build {
            rootfs,
            layout,
            tag,
            cmd,
            env,
            compression,
        } => cli::build(&rootfs, &layout, &tag, cmd, env, compression),
        Command::Encrypt {
            layout,
            tag,
            out_tag,
            recipient,
            keyprovider_config,
            layer,
        } => cli::encrypt(
            &layout,
            &tag,
            &out_tag,
            &recipient,
            keyprovider_config.as_deref(),
            &layer,
        ),
        Command::Sign {
            layout,
            tag,
            key,
            identity,
        } => cli::sign(&layout, &tag, &key, &identity),
    }
}

/// The `ocipub` command line as clap sees it: what `xtask docs` renders as man pages and
/// shell completions.
pub fn command() -> clap::Command {
    <Cli as clap::CommandFactory>::command()
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_cli_definition_is_consistent() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }
}
