//! `ipu-decrypt-hook`: containerd's stream processor for encrypted layers, decrypted on the IPU.
//! The command line and its dispatch are [`host_attach::hook_cmdline`] (in the library, so that `xtask`
//! renders man pages and shell completions from the same definition).

fn main() -> std::process::ExitCode {
    host_attach::hook_cmdline::main()
}
