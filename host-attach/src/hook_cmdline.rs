//! `ipu-decrypt-hook`: containerd's stream processor for encrypted layers, decrypted on the
//! IPU (`crate::hook`). Any failure is one line on stderr and exit code 1
//! (`crate::exit::hook`).
//!
//! containerd configuration: see docs/containerd-hook.md.

use std::process::ExitCode;

use crate::ipu::IpuApi;
use crate::{exit, hook};
use clap::Parser;

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

pub fn main() -> ExitCode {
    ops::memory::reuse_freed_chunks();
    exit::hook(hook::run(&Args::parse().ipu))
}

/// The `ipu-decrypt-hook` command line as clap sees it: what `xtask docs` renders as man pages and
/// shell completions.
pub fn command() -> clap::Command {
    <Args as clap::CommandFactory>::command()
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_cli_definition_is_consistent() {
        use clap::CommandFactory;
        super::Args::command().debug_assert();
    }
}
