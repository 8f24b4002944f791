//! `host-attach`: run a function from an IPU-prepared image; verify an image for the decrypt hook.
//! The command line and its dispatch are [`host_attach::cmdline`] (in the library, so that `xtask`
//! renders man pages and shell completions from the same definition).

fn main() -> std::process::ExitCode {
    host_attach::cmdline::main()
}
