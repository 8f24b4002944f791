//! The function's container: its OCI bundle written from [`crate::bundle`], `runc run` with
//! this terminal's output, and a stop forwarded once the run is interrupted (SIGTERM through
//! runc, then SIGKILL to every process of the container after a grace period).

use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::bundle::{config, Process};

/// Writing the bundle, or running runc.
#[derive(Debug, thiserror::Error)]
pub enum RuncError {
    /// The bundle directory or its config.json could not be written.
    #[error("{source}")]
    Bundle { path: PathBuf, source: io::Error },
    /// runc could not be started or waited for.
    #[error("runc: {0}")]
    Runc(#[source] io::Error),
}

/// How long a function has to exit after SIGTERM before it is killed.
pub const STOP_GRACE: Duration = Duration::from_secs(10);

/// Writes the bundle for `process` (root file system `rootfs`) to `bundle`: its config.json.
pub fn write_bundle(bundle: &Path, process: &Process, rootfs: &Path) -> Result<(), RuncError> {
    let error = |path: &Path| {
        let path = path.to_path_buf();
        move |source| RuncError::Bundle { path, source }
    };
    std::fs::create_dir_all(bundle).map_err(error(bundle))?;
    let file = bundle.join("config.json");
    std::fs::write(
        &file,
        serde_json::to_vec_pretty(&config(process, rootfs, "function")).expect("json"),
    )
    .map_err(error(&file))
}

/// `runc run` of `bundle` as container `id` (state under `runc_root`), forwarding a stop once
/// `interrupted`; runc's exit status.
pub fn run(
    bundle: &Path,
    runc_root: &Path,
    id: &str,
    interrupted: &AtomicBool,
) -> Result<ExitStatus, RuncError> {
    let mut runc = Command::new("runc")
        .arg("--root")
        .arg(runc_root)
        .args(["run", "--bundle"])
        .arg(bundle)
        .arg(id)
        .spawn()
        .map_err(RuncError::Runc)?;
    wait_forwarding_stop(&mut runc, runc_root, id, interrupted)
}

/// Waits for `runc run`; once the run is interrupted, sends it SIGTERM (runc passes it to the
/// function), and SIGKILLs every process of the container when the grace period is over.
pub fn wait_forwarding_stop(
    runc: &mut Child,
    runc_root: &Path,
    id: &str,
    interrupted: &AtomicBool,
) -> Result<ExitStatus, RuncError> {
    let mut stopping_since: Option<Instant> = None;
    let mut killed = false;
    // Readable once runc has exited: the wait ends then, not at the next check of the stop
    // flag (`None` on kernels before 5.3, where the wait sleeps between checks).
    let exited = rustix::process::pidfd_open(
        rustix::process::Pid::from_child(runc),
        rustix::process::PidfdFlags::empty(),
    )
    .ok();
    loop {
        if let Some(status) = runc.try_wait().map_err(RuncError::Runc)? {
            return Ok(status);
        }
        match stopping_since {
            None if interrupted.load(Ordering::SeqCst) => {
                // SAFETY: kill(2) on our own child, which has not been reaped (try_wait
                // above returned None), so its pid is still its own.
                unsafe { libc::kill(runc.id() as i32, libc::SIGTERM) };
                stopping_since = Some(Instant::now());
            }
            Some(since) if !killed && since.elapsed() >= STOP_GRACE => {
                let _ = Command::new("runc")
                    .arg("--root")
                    .arg(runc_root)
                    .args(["kill", "--all", id, "KILL"])
                    .status();
                killed = true;
            }
            _ => {}
        }
        wait_for_exit(exited.as_ref(), STOP_CHECK);
    }
}

/// How often a running function's wait checks whether it was interrupted.
const STOP_CHECK: Duration = Duration::from_millis(20);

/// Waits at most `at_most` for the process whose pidfd is `exited` to exit (a signal may end
/// the wait early too); without a pidfd, sleeps `at_most`.
fn wait_for_exit(exited: Option<&std::os::fd::OwnedFd>, at_most: Duration) {
    use rustix::event::{poll, PollFd, PollFlags, Timespec};
    match (exited, Timespec::try_from(at_most)) {
        (Some(pidfd), Ok(timeout)) => {
            // An error (EINTR) only ends this wait: the caller checks again.
            let _ = poll(&mut [PollFd::new(pidfd, PollFlags::IN)], Some(&timeout));
        }
        _ => std::thread::sleep(at_most),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bundle_is_the_config_of_the_process() {
        let d = tempfile::tempdir().unwrap();
        let process = Process {
            args: vec!["/bin/true".into()],
            env: vec!["PATH=/bin".into()],
            cwd: "/".into(),
            uid: 1000,
            gid: 50,
        };
        let rootfs = d.path().join("rootfs");
        let bundle = d.path().join("bundle");
        write_bundle(&bundle, &process, &rootfs).unwrap();
        let written: serde_json::Value =
            serde_json::from_slice(&std::fs::read(bundle.join("config.json")).unwrap()).unwrap();
        assert_eq!(written, config(&process, &rootfs, "function"));
        // Where it could not be written is kept with the error.
        let blocked = d.path().join("file");
        std::fs::write(&blocked, b"").unwrap();
        match write_bundle(&blocked.join("bundle"), &process, &rootfs).unwrap_err() {
            RuncError::Bundle { path, .. } => assert_eq!(path, blocked.join("bundle")),
            e => panic!("{e}"),
        }
    }

    #[test]
    fn the_status_of_a_function_that_exits_by_itself() {
        let mut child = Command::new("sh").args(["-c", "exit 7"]).spawn().unwrap();
        let status =
            wait_forwarding_stop(&mut child, Path::new("/nonexistent"), "id", &false.into())
                .unwrap();
        assert_eq!(status.code(), Some(7));
    }

    fn pidfd_of(child: &Child) -> std::os::fd::OwnedFd {
        rustix::process::pidfd_open(
            rustix::process::Pid::from_child(child),
            rustix::process::PidfdFlags::empty(),
        )
        .unwrap()
    }

    #[test]
    fn the_wait_ends_when_the_process_exits_not_when_its_time_is_up() {
        let mut child = Command::new("sleep").arg("0.1").spawn().unwrap();
        let pidfd = pidfd_of(&child);
        let start = Instant::now();
        wait_for_exit(Some(&pidfd), Duration::from_secs(60));
        assert!(start.elapsed() < Duration::from_secs(30));
        assert!(child.try_wait().unwrap().is_some(), "the wait ended early");
        // Control: a process that does not exit keeps the wait for its whole time.
        let mut running = Command::new("sleep").arg("30").spawn().unwrap();
        let pidfd = pidfd_of(&running);
        let start = Instant::now();
        wait_for_exit(Some(&pidfd), Duration::from_millis(200));
        assert!(start.elapsed() >= Duration::from_millis(200));
        running.kill().unwrap();
        running.wait().unwrap();
    }

    #[test]
    fn an_interrupted_run_is_sent_sigterm() {
        let mut child = Command::new("sleep").arg("30").spawn().unwrap();
        let start = Instant::now();
        let status =
            wait_forwarding_stop(&mut child, Path::new("/nonexistent"), "id", &true.into())
                .unwrap();
        assert!(start.elapsed() < STOP_GRACE);
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&status),
            Some(libc::SIGTERM)
        );
    }
}
