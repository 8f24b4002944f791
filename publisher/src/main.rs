//! `ocipub`: build, encrypt and sign OCI images (the publisher side).
//! The command line and its dispatch are [`publisher::cmdline`] (in the library, so that `xtask`
//! renders man pages and shell completions from the same definition).

fn main() -> std::process::ExitCode {
    publisher::cmdline::main()
}
