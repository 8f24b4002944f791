//! Exit codes, and the one line on stderr a failure gets: the mapping from outcome to exit
//! code of `host-attach run` and `verify` and of `ipu-decrypt-hook`, in one place.
//!
//! `run`: the function's own code (128 + the signal when a signal ended it); 125 when the
//! function could not be started (or its run could not be finished cleanly). `verify`: 0, or 3
//! when refused or failed. The hook: 0, or 1 with one line on stderr. (Usage errors are clap's
//! 2.)

use std::process::{ExitCode, ExitStatus};

use crate::hook::HookError;
use crate::ipu::IpuError;
use crate::run::RunError;

/// `host-attach run`: the function could not be started.
pub const NOT_STARTED: u8 = 125;
/// `host-attach verify` refused or failed.
pub const VERIFY_FAILED: u8 = 3;
/// `ipu-decrypt-hook` failed.
pub const HOOK_FAILED: u8 = 1;

/// The function's exit code from runc's status: its own, or 128 + the signal that ended it.
pub fn of_function(status: ExitStatus) -> u8 {
    match status.code() {
        Some(c) => c as u8,
        None => 128 + std::os::unix::process::ExitStatusExt::signal(&status).unwrap_or(0) as u8,
    }
}

/// The code of a run from [`crate::run::run`]'s outcome, with the failure on stderr.
pub fn of_run(outcome: Result<u8, RunError>) -> u8 {
    match outcome {
        Ok(code) => code,
        Err(e) => {
            eprintln!("host-attach: {e}");
            NOT_STARTED
        }
    }
}

/// The exit of `host-attach run`.
pub fn run(outcome: Result<u8, RunError>) -> ExitCode {
    ExitCode::from(of_run(outcome))
}

/// The exit of `host-attach verify`, with the failure on stderr.
pub fn verify(outcome: Result<(), IpuError>) -> ExitCode {
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("host-attach: {e}");
            ExitCode::from(VERIFY_FAILED)
        }
    }
}

/// The exit of `ipu-decrypt-hook`: a failure is one line on stderr, after the rest of the
/// blob was taken from stdin ([`crate::hook::drain_stdin`]).
pub fn hook(outcome: Result<(), HookError>) -> ExitCode {
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            crate::hook::drain_stdin();
            eprintln!("ipu-decrypt-hook: {e}");
            ExitCode::from(HOOK_FAILED)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;

    #[test]
    fn the_functions_code_is_its_own_or_128_and_the_signal() {
        assert_eq!(of_function(ExitStatus::from_raw(7 << 8)), 7);
        assert_eq!(of_function(ExitStatus::from_raw(0)), 0);
        assert_eq!(of_function(ExitStatus::from_raw(libc::SIGTERM)), 143);
        assert_eq!(of_function(ExitStatus::from_raw(libc::SIGKILL)), 137);
    }

    #[test]
    fn a_run_that_failed_to_start_is_125() {
        assert_eq!(of_run(Ok(7)), 7);
        assert_eq!(of_run(Ok(NOT_STARTED)), NOT_STARTED);
        assert_eq!(of_run(Err(RunError::Interrupted)), NOT_STARTED);
    }
}
