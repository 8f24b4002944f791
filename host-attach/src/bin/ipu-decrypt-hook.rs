//! `ipu-decrypt-hook`: containerd's stream processor for encrypted layers, decrypted on the
//! IPU (`host_attach::hook`). Any failure is one line on stderr and exit code 1
//! (`host_attach::exit::hook`).
//!
//! containerd configuration: see docs/containerd-hook.md.

use std::process::ExitCode;

use clap::Parser;
use host_attach::ipu::IpuApi;
use host_attach::{exit, hook};

#[derive(Parser)]
#[command(
    name = "ipu-decrypt-hook",
    version,
    about = "containerd stream processor: encrypted layers decrypted on the IPU"
)]
struct Args {
    #[command(flatten)]
    ipu: IpuApi,
}

fn main() -> ExitCode {
    exit::hook(hook::run(&Args::parse().ipu))
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_cli_definition_is_consistent() {
        use clap::CommandFactory;
        super::Args::command().debug_assert();
    }
}
