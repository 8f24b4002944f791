//! `audit`: query, follow, verify and prove the tamper-evident audit log.
//! The command line and its dispatch are [`audit::cmdline`] (in the library, so that `xtask`
//! renders man pages and shell completions from the same definition).

fn main() -> std::process::ExitCode {
    audit::cmdline::main()
}
