//! `host-attach run`: start one function from an image through the IPU, and clean up
//! (`crate::run`); `host-attach verify`: have the IPU verify an image for the decrypt
//! hook (`crate::verify`).
//!
//! Exit codes (`crate::exit`): for `run`, the function's own; 125 when the function
//! could not be started; for `verify`, 3 when refused or failed; 2 usage.

use std::path::PathBuf;
use std::process::ExitCode;

use crate::ipu::IpuApi;
use crate::run::{Function, Interrupt};
use crate::{exit, run, verify};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "host-attach",
    version,
    about = "Host agent: run functions from IPU-prepared images"
)]
struct Cli {
    #[command(subcommand)]
    command: Top,
}

#[derive(Subcommand)]
enum Top {
    /// Run a function from an image: Prepare, attach, mount, runc, and tear down at exit.
    Run(Box<RunArgs>),
    /// Have the IPU verify an image for a tenant and function (policy, signature, layer keys
    /// released), so that containerd's decrypt hook (`ipu-decrypt-hook`) may then have its
    /// layers decrypted: run before `ctr pull` of an encrypted image.
    Verify(VerifyArgs),
}

#[derive(clap::Args)]
struct VerifyArgs {
    #[command(flatten)]
    ipu: IpuApi,
    /// The image reference (docker://... or oci:DIR:TAG).
    image: String,
}

#[derive(clap::Args)]
struct RunArgs {
    #[command(flatten)]
    ipu: IpuApi,
    /// Where mounts and the bundle are made (default: a new directory under /run).
    #[arg(long, value_name = "DIR")]
    workdir: Option<PathBuf>,
    /// For exports over TCP: this host agent's TLS files (`ca-cert.pem`, the CA of the
    /// IPU's export certificate; `client-cert.pem` and `client-key.pem`, its own).
    #[arg(long, value_name = "DIR")]
    tls_certificates: Option<PathBuf>,
    /// The identity the IPU's TCP export is to require of this host agent's client
    /// certificate: one of its subjectAltName DNS names or URIs. Default: the one DNS name or
    /// URI of `client-cert.pem` in --tls-certificates.
    #[arg(long, value_name = "NAME")]
    host_identity: Option<String>,
    #[command(flatten)]
    vm: crate::microvm::VmOptions,
    /// At the end, a table of the start's stages (prepare on the IPU, attach, mount, run;
    /// with --vm: boot, device attach, run) with their milliseconds and share of the whole,
    /// on stderr.
    #[arg(long)]
    timings: bool,
    /// The image reference (docker://... or oci:DIR:TAG).
    image: String,
    /// The command to run instead of the image's Cmd.
    #[arg(last = true)]
    command: Vec<String>,
}

pub fn main() -> ExitCode {
    match Cli::parse().command {
        Top::Verify(args) => {
            exit::verify(verify::verify(&args.ipu, &args.image).map(|v| print!("{v}")))
        }
        Top::Run(args) => {
            let args = *args;
            let function = Function {
                image: args.image,
                command: args.command,
                workdir: args.workdir,
                tls_certificates: args.tls_certificates,
                host_identity: args.host_identity,
                microvm: args.vm.vm.then_some(args.vm),
            };
            let timings = args.timings.then(ops::timings::install).flatten();
            let started = std::time::Instant::now();
            let code = exit::run(
                Interrupt::on_signals()
                    .and_then(|interrupt| run::run(&args.ipu, &function, &interrupt)),
            );
            if let Some(t) = timings {
                eprint!(
                    "{}",
                    ops::timings::Timings::table(&t.take(), started.elapsed())
                );
            }
            code
        }
    }
}

/// The `host-attach` command line as clap sees it: what `xtask docs` renders as man pages and
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
