//! `keybroker`: the key broker service and its administration.
//! The command line and its dispatch are [`keybroker::cmdline`] (in the library, so that `xtask`
//! renders man pages and shell completions from the same definition).

fn main() -> std::process::ExitCode {
    keybroker::cmdline::main()
}
