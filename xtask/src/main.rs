//! `xtask`: build-time tasks of the workspace, run through `cargo run -p xtask -- ...`.
//!
//! `xtask docs --out DIR` writes, for every binary the packages ship, its man pages
//! (`DIR/man/<bin>.1`, and `<bin>-<subcommand>.1` for each subcommand, recursively) and its
//! shell completions (`DIR/completions/bash/<bin>`, `DIR/completions/zsh/_<bin>`,
//! `DIR/completions/fish/<bin>.fish`), all from the same clap definitions the binaries parse
//! with (`<crate>::cmdline::command()`). scripts/package.sh runs it before `cargo deb`, and
//! the packages install the files where man, bash-completion, zsh and fish look for them.
//!
//! The generators live here rather than behind a hidden subcommand so that no daemon links
//! clap_mangen or clap_complete.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use clap_complete::Shell;

#[derive(Parser)]
#[command(name = "xtask", about = "Build-time tasks of the workspace")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Write man pages and bash, zsh and fish completions for every shipped binary.
    Docs {
        /// Output directory (created; files in it are replaced).
        #[arg(long, value_name = "DIR")]
        out: PathBuf,
    },
}

/// Every binary the packages ship, with its command line.
pub fn binaries() -> Vec<clap::Command> {
    vec![
        keybroker::cmdline::command(),
        ipu_image_svc::cmdline::command(),
        audit::cmdline::command(),
        host_attach::cmdline::command(),
        host_attach::hook_cmdline::command(),
        policy::cmdline::command(),
        publisher::cmdline::command(),
    ]
}

/// Where the completion of `bin` for `shell` goes under `out`, named as each shell's
/// completion directory expects.
fn completion_path(out: &Path, shell: Shell, bin: &str) -> PathBuf {
    let dir = out.join("completions").join(shell.to_string());
    match shell {
        Shell::Zsh => dir.join(format!("_{bin}")),
        Shell::Fish => dir.join(format!("{bin}.fish")),
        _ => dir.join(bin),
    }
}

fn docs(out: &Path) -> std::io::Result<()> {
    let man = out.join("man");
    std::fs::create_dir_all(&man)?;
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        std::fs::create_dir_all(out.join("completions").join(shell.to_string()))?;
    }
    for cmd in binaries() {
        let bin = cmd.get_name().to_string();
        // One page for the binary and one per subcommand (`keybroker-keys-create.1`).
        clap_mangen::generate_to(cmd.clone(), &man)?;
        for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
            let mut file = std::fs::File::create(completion_path(out, shell, &bin))?;
            clap_complete::generate(shell, &mut cmd.clone(), &bin, &mut file);
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Task::Docs { out } => match docs(&out) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("xtask docs: {}: {e}", out.display());
                ExitCode::FAILURE
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_binary_gets_pages_and_completions_naming_its_subcommands() {
        let out = tempfile::tempdir().unwrap();
        docs(out.path()).unwrap();
        for cmd in binaries() {
            let bin = cmd.get_name();
            // roff escapes hyphens: `verify\-proof`.
            let page = std::fs::read_to_string(out.path().join(format!("man/{bin}.1")))
                .unwrap()
                .replace("\\-", "-");
            assert!(page.contains(".TH"), "{bin}.1 is not a man page");
            for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
                let name = sub.get_name();
                assert!(page.contains(name), "{bin}.1 does not name {name}");
                assert!(
                    out.path().join(format!("man/{bin}-{name}.1")).exists(),
                    "no page for {bin} {name}"
                );
                for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
                    let text =
                        std::fs::read_to_string(completion_path(out.path(), shell, bin)).unwrap();
                    assert!(
                        text.contains(name),
                        "{shell} completion of {bin} lacks {name}"
                    );
                }
            }
        }
    }
}
