//! `policy`: image trust and deployment policy tools.
//!
//! Exit codes: 0 ok / allowed, 3 rejected or denied (or lint warnings, or a bundle refused),
//! 1 operational error (unreadable or invalid input), 2 usage error.

use std::path::PathBuf;
use std::process::ExitCode;

use crate::cli::{self, CliError, IssueRequest, KeyKind, PolicySource};
use crate::deploy::DeployRequest;
use crate::grant::ImageClaim;
use crate::sigstore_bundle::{self, SignerArg, VerifyBundleArgs};
use clap::{Parser, Subcommand};

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
    /// Make a signing key for policy bundles or placement grants: DIR/priv.pem (PKCS#8,
    /// 0600), DIR/pub.pem.
    Keygen {
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
        #[arg(long, value_enum, default_value = "ed25519")]
        kind: KeyKind,
    },
    /// Placement grants: issue (control plane), verify, inspect.
    #[command(subcommand)]
    Grant(GrantCommand),
    /// Sigstore bundles: offline verification (the sigstore-conformance client protocol).
    #[command(subcommand)]
    Sigstore(SigstoreCommand),
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

#[derive(Subcommand)]
enum SigstoreCommand {
    /// Verify a Sigstore bundle (v0.1-v0.3) over a file or a `sha256:<hex>` digest: exit 0
    /// verified, 3 refused (one line on stderr).
    VerifyBundle {
        #[arg(long, value_name = "FILE")]
        bundle: PathBuf,
        /// The expected certificate SAN (exact), with --certificate-oidc-issuer.
        #[arg(
            long,
            value_name = "IDENTITY",
            requires = "certificate_oidc_issuer",
            required_unless_present = "key",
            conflicts_with = "key"
        )]
        certificate_identity: Option<String>,
        /// The expected OIDC issuer (exact).
        #[arg(long, value_name = "URL", requires = "certificate_identity")]
        certificate_oidc_issuer: Option<String>,
        /// A trusted public key (SPKI PEM) instead of a certificate identity.
        #[arg(long, value_name = "FILE")]
        key: Option<PathBuf>,
        /// A trusted_root.json (default: the Sigstore public-good root shipped with policy).
        #[arg(long, value_name = "FILE")]
        trusted_root: Option<PathBuf>,
        /// The artifact: a file path, or sha256:<hex>.
        #[arg(value_name = "FILE_OR_DIGEST")]
        artifact: String,
    },
}

#[derive(Subcommand)]
enum GrantCommand {
    /// Sign a placement grant: this function of this tenant may run this image on this
    /// IPU, exported to this host, for a short time.
    #[command(group(clap::ArgGroup::new("what").required(true)))]
    Issue {
        /// The control plane's signing key (PKCS#8 Ed25519 or P-256, or SEC1 P-256 PEM).
        #[arg(long, value_name = "FILE")]
        key: PathBuf,
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        function: String,
        /// Exactly this image reference.
        #[arg(long, value_name = "IMAGE-REF", group = "what")]
        image: Option<String>,
        /// Any reference pinned by this digest (sha256:...).
        #[arg(long, value_name = "DIGEST", group = "what")]
        image_digest: Option<String>,
        /// Any reference matching this scope (only for tenants with grant_image_scopes).
        #[arg(long, value_name = "PATTERN", group = "what")]
        image_scope: Option<String>,
        /// The IPU's enrolled identity.
        #[arg(long)]
        ipu: String,
        /// The host's identity (DNS name or URI of its export client certificate).
        #[arg(long)]
        host: String,
        /// Length of the validity window (at most 24h).
        #[arg(long, value_name = "DURATION", default_value = "10m")]
        valid_for: humantime::Duration,
        /// Start of the validity window, RFC 3339 UTC (default: now).
        #[arg(long, value_name = "RFC3339")]
        not_before: Option<String>,
        /// Serial (default: 128 random bits in hex).
        #[arg(long)]
        serial: Option<String>,
        /// Write the envelope here instead of printing it.
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
        /// Print {serial, not_before, not_after, key_id, envelope_path | envelope}.
        #[arg(long)]
        json: bool,
    },
    /// Verify a grant against the deployment policy's grant keys (exit 0 valid, 3 refused).
    Verify {
        #[arg(long, value_name = "FILE", required_unless_present = "bundle")]
        policy: Option<PathBuf>,
        #[arg(
            long,
            value_name = "FILE",
            requires = "bundle_key",
            conflicts_with = "policy"
        )]
        bundle: Option<PathBuf>,
        /// Trusted bundle signing key (SPKI PEM, repeatable), with `--bundle`.
        #[arg(long, value_name = "FILE")]
        bundle_key: Vec<PathBuf>,
        /// The verifying IPU's enrolled identity.
        #[arg(long)]
        ipu: String,
        /// The requesting host's identity (not checked if absent).
        #[arg(long)]
        host: Option<String>,
        /// The image reference the request names.
        #[arg(long, value_name = "IMAGE-REF")]
        image: String,
        /// Verify as of this time, RFC 3339 UTC (default: now).
        #[arg(long, value_name = "RFC3339")]
        at: Option<String>,
        #[arg(long)]
        json: bool,
        #[arg(value_name = "GRANT")]
        grant: PathBuf,
    },
    /// Show a grant's fields and signer key ids WITHOUT verifying anything.
    Inspect {
        #[arg(long)]
        json: bool,
        #[arg(value_name = "GRANT")]
        grant: PathBuf,
    },
}

pub fn main() -> ExitCode {
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
        Command::Keygen { out, kind } => cli::keygen(&out, kind),
        Command::Grant(g) => run_grant(g),
        Command::Sigstore(SigstoreCommand::VerifyBundle {
            bundle,
            certificate_identity,
            certificate_oidc_issuer,
            key,
            trusted_root,
            artifact,
        }) => {
            let signer = match (certificate_identity, certificate_oidc_issuer, key) {
                (Some(identity), Some(issuer), None) => SignerArg::Identity { identity, issuer },
                (None, None, Some(k)) => SignerArg::Key(k),
                _ => {
                    return Err(CliError::Usage(
                        "give --certificate-identity with --certificate-oidc-issuer, or --key"
                            .into(),
                    ))
                }
            };
            Ok(sigstore_bundle::run(&VerifyBundleArgs {
                bundle,
                signer,
                trusted_root,
                artifact,
            }))
        }
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

fn run_grant(command: GrantCommand) -> Result<u8, CliError> {
    match command {
        GrantCommand::Issue {
            key,
            tenant,
            function,
            image,
            image_digest,
            image_scope,
            ipu,
            host,
            valid_for,
            not_before,
            serial,
            out,
            json,
        } => {
            let image = match (image, image_digest, image_scope) {
                (Some(r), None, None) => ImageClaim::Reference(r),
                (None, Some(d), None) => ImageClaim::Digest(d),
                (None, None, Some(s)) => ImageClaim::Scope(s),
                _ => {
                    return Err(CliError::Usage(
                        "give one of --image, --image-digest, --image-scope".into(),
                    ))
                }
            };
            let request = IssueRequest {
                tenant,
                function,
                image,
                ipu,
                host,
                not_before,
                valid_for: valid_for.into(),
                serial,
            };
            cli::grant_issue(&key, request, out.as_deref(), json)
        }
        GrantCommand::Verify {
            policy,
            bundle,
            bundle_key,
            ipu,
            host,
            image,
            at,
            json,
            grant,
        } => {
            let source = match (policy, bundle) {
                (Some(p), _) => PolicySource::File(p),
                (None, Some(path)) => PolicySource::Bundle {
                    path,
                    keys: bundle_key,
                },
                (None, None) => unreachable!("clap requires one"),
            };
            cli::grant_verify(
                &source,
                &grant,
                &ipu,
                host.as_deref(),
                &image,
                at.as_deref(),
                json,
            )
        }
        GrantCommand::Inspect { json, grant } => cli::grant_inspect(&grant, json),
    }
}

/// The `policy` command line as clap sees it: what `xtask docs` renders as man pages and
/// shell completions.
pub fn command() -> clap::Command {
    <Cli as clap::CommandFactory>::command()
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_cli_definition_is_consistent() {
        super::command().debug_assert();
    }
}
