//! `host-attach run`: start one function from an image through the IPU, and clean up
//! (`host_attach::run`); `host-attach verify`: have the IPU verify an image for the decrypt
//! hook (`host_attach::verify`).
//!
//! Exit codes (`host_attach::exit`): for `run`, the function's own; 125 when the function
//! could not be started; for `verify`, 3 when refused or failed; 2 usage.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use host_attach::ipu::IpuApi;
use host_attach::run::{Function, Interrupt};
use host_attach::{exit, run, verify};

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
    vm: host_attach::microvm::VmOptions,
    /// The image reference (docker://... or oci:DIR:TAG).
    image: String,
    /// The command to run instead of the image's Cmd.
    #[arg(last = true)]
    command: Vec<String>,
}

fn main() -> ExitCode {
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
            exit::run(
                Interrupt::on_signals()
                    .and_then(|interrupt| run::run(&args.ipu, &function, &interrupt)),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_cli_definition_is_consistent() {
        use clap::CommandFactory;
        super::Cli::command().debug_assert();
    }
}
