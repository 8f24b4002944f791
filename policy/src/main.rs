//! `policy`: image trust policy, deployment policy, bundles and placement grants.
//! The command line and its dispatch are [`policy::cmdline`] (in the library, so that `xtask`
//! renders man pages and shell completions from the same definition).

fn main() -> std::process::ExitCode {
    policy::cmdline::main()
}
