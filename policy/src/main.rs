//! `policy`: image trust and deployment policy tools.
//!
//! Exit codes: 0 ok / allowed, 3 rejected or denied (or lint warnings, or a bundle refused),
//! 1 operational error (unreadable or invalid input), 2 usage error.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use policy::cli::{self, CliError, PolicySource};
use policy::deploy::DeployRequest;

#[derive(Parser)]
#[command(
    name = "policy",
    version,
    about = "Image trust and deployment policy tools"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Which scope and requirements of a containers-policy.json apply to an image.
    Check {
        #[arg(long, value_name = "FILE")]
        policy: PathBuf,
        /// docker://HOST/REPO[:TAG|@DIGEST], oci:DIR[:TAG] or dir:PATH
        #[arg(value_name = "IMAGE-REF")]
        image: String,
        /// One JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Check a deployment policy: errors (exit 1) and unreachable rules (exit 3), each with
    /// file:line:column.
    Lint {
        #[arg(value_name = "FILE")]
        deployment: PathBuf,
    },
    /// Why a request is allowed or denied: every rule consulted and the one that decided.
    Explain {
        /// A deployment policy file or a signed bundle (`--bundle`).
        #[arg(long, value_name = "FILE", required_unless_present = "bundle")]
        policy: Option<PathBuf>,
        #[arg(long, value_name = "FILE", requires = "key", conflicts_with = "policy")]
        bundle: Option<PathBuf>,
        /// Trusted bundle signing key (SPKI PEM), with `--bundle`.
        #[arg(long, value_name = "FILE")]
        key: Vec<PathBuf>,
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        function: String,
        #[arg(long, value_name = "IMAGE-REF")]
        image: String,
        #[arg(long)]
        ipu_class: Option<String>,
        /// Also decide whether this layer key may be released.
        #[arg(long)]
        key_id: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Run a table of expected decisions as a test suite (exit 3 if any case fails).
    Test {
        /// The deployment policy under test.
        #[arg(long, value_name = "FILE")]
        policy: PathBuf,
        /// TOML with [[case]] tables (tenant, function, image, ipu_class, key_id, expect,
        /// decided_by).
        #[arg(value_name = "CASES")]
        cases: PathBuf,
    },
    /// Which sample requests change outcome from OLD to NEW (exit 3 if any do).
    Diff {
        #[arg(value_name = "OLD")]
        old: PathBuf,
        #[arg(value_name = "NEW")]
        new: PathBuf,
        /// TOML with [[case]] tables (expect is ignored).
        #[arg(long, value_name = "FILE")]
        requests: PathBuf,
    },
    /// Make a signing key for policy bundles: DIR/priv.pem (PKCS#8, 0600), DIR/pub.pem.
    Keygen {
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
    /// Sign a bundle of a deployment policy and the image trust policy it names.
    Sign {
        #[arg(long, value_name = "FILE")]
        deployment: PathBuf,
        /// The containers-policy.json (default: the file the deployment policy names, next
        /// to it).
        #[arg(long, value_name = "FILE")]
        image_trust: Option<PathBuf>,
        /// Must be higher than the version running anywhere (anti-rollback).
        #[arg(long)]
        version: u64,
        #[arg(long, value_name = "FILE")]
        key: PathBuf,
        #[arg(short, long, value_name = "FILE")]
        output: PathBuf,
    },
    /// Verify a bundle: trusted signer, documents valid, not older than the running version.
    Verify {
        #[arg(value_name = "BUNDLE")]
        bundle: PathBuf,
        /// Trusted signing key (SPKI PEM, repeatable).
        #[arg(long, value_name = "FILE", required = true)]
        key: Vec<PathBuf>,
        /// The running bundle, for the anti-rollback check.
        #[arg(long, value_name = "BUNDLE")]
        running: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse().command) {
        Ok(code) => ExitCode::from(code),
        Err(message) => {
            eprintln!("policy: {message}");
            ExitCode::from(1)
        }
    }
}

fn run(command: Command) -> Result<u8, CliError> {
    match command {
        Command::Check {
            policy,
            image,
            json,
        } => cli::check(&policy, &image, json),
        Command::Lint { deployment } => cli::lint(&deployment),
        Command::Explain {
            policy,
            bundle,
            key,
            tenant,
            function,
            image,
            ipu_class,
            key_id,
            json,
        } => {
            let source = match (policy, bundle) {
                (Some(p), _) => PolicySource::File(p),
                (None, Some(path)) => PolicySource::Bundle { path, keys: key },
                (None, None) => unreachable!("clap requires one"),
            };
            let request = DeployRequest {
                tenant,
                function,
                image,
                ipu_class,
            };
            cli::explain(&source, &request, key_id.as_deref(), json)
        }
        Command::Test { policy, cases } => cli::test(&policy, &cases),
        Command::Diff { old, new, requests } => cli::diff(&old, &new, &requests),
        Command::Keygen { out } => cli::keygen(&out),
        Command::Sign {
            deployment,
            image_trust,
            version,
            key,
            output,
        } => cli::sign(&deployment, image_trust.as_deref(), version, &key, &output),
        Command::Verify {
            bundle,
            key,
            running,
        } => cli::verify(&bundle, &key, running.as_deref()),
    }
}
