//! Attaching an NBD export as a mounted file system, and undoing it in reverse order.
//!
//! This machine's kernel has no nbd driver, so the export is attached with `nbdfuse` (a FUSE
//! file backed by the NBD connection) and a loop device over that file. Each step records how
//! to undo itself; [`Attachment::detach`] (also run on drop) undoes them last first.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A mounted export.
pub struct Attachment {
    fuse_dir: PathBuf,
    nbdfuse: Option<Child>,
    loop_device: Option<String>,
    mountpoint: Option<PathBuf>,
}

fn run(cmd: &mut Command) -> Result<String, String> {
    let out = cmd
        .output()
        .map_err(|e| format!("{:?}: {e}", cmd.get_program()))?;
    if !out.status.success() {
        return Err(format!(
            "{:?} failed: {}",
            cmd.get_program(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

impl Attachment {
    /// Attaches `nbd+unix:///{export}?socket={socket}` under `workdir` and mounts the ext4 file
    /// system at `mountpoint` (nodev, nosuid).
    pub fn attach(
        socket: &Path,
        export: &str,
        workdir: &Path,
        mountpoint: &Path,
    ) -> Result<Self, String> {
        let fuse_dir = workdir.join("nbd");
        std::fs::create_dir_all(&fuse_dir).map_err(|e| format!("{}: {e}", fuse_dir.display()))?;
        let mut a = Self {
            fuse_dir: fuse_dir.clone(),
            nbdfuse: None,
            loop_device: None,
            mountpoint: None,
        };
        let uri = format!("nbd+unix:///{export}?socket={}", socket.display());
        let child = Command::new("nbdfuse")
            .arg(&fuse_dir)
            .arg(&uri)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("nbdfuse (apt install libnbd-bin fuse3): {e}"))?;
        a.nbdfuse = Some(child);
        let file = fuse_dir.join("nbd");
        let start = Instant::now();
        while !file.exists() {
            if let Some(status) = a.nbdfuse.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                return Err(format!("nbdfuse exited ({status}) before attaching {uri}"));
            }
            if start.elapsed() > Duration::from_secs(10) {
                return Err(format!("nbdfuse did not attach {uri} within 10 s"));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let dev = run(Command::new("losetup")
            .args(["--find", "--show"])
            .arg(&file))?;
        a.loop_device = Some(dev.clone());
        std::fs::create_dir_all(mountpoint)
            .map_err(|e| format!("{}: {e}", mountpoint.display()))?;
        run(Command::new("mount")
            .args(["-t", "ext4", "-o", "nodev,nosuid", &dev])
            .arg(mountpoint))?;
        a.mountpoint = Some(mountpoint.to_path_buf());
        Ok(a)
    }

    /// Unmounts, detaches the loop device, unmounts the FUSE file and stops nbdfuse. Every
    /// step is attempted; the first failure is returned.
    pub fn detach(&mut self) -> Result<(), String> {
        let mut first = None;
        let mut note = |r: Result<String, String>| {
            if let Err(e) = r {
                first.get_or_insert(e);
            }
        };
        if let Some(m) = self.mountpoint.take() {
            note(run(Command::new("umount").arg(&m)));
        }
        if let Some(dev) = self.loop_device.take() {
            note(run(Command::new("losetup").args(["-d", &dev])));
        }
        if let Some(mut child) = self.nbdfuse.take() {
            note(run(Command::new("fusermount3")
                .arg("-u")
                .arg(&self.fuse_dir)));
            let start = Instant::now();
            while child.try_wait().ok().flatten().is_none() {
                if start.elapsed() > Duration::from_secs(5) {
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        first.map_or(Ok(()), Err)
    }
}

impl Drop for Attachment {
    fn drop(&mut self) {
        let _ = self.detach();
    }
}
