//! Attaching an NBD export as a mounted file system, and undoing it in reverse order.
//!
//! This machine's kernel has no nbd driver, so the export becomes a FUSE file backed by the
//! NBD connection, and a loop device over that file: `nbdfuse` for a Unix socket export, and
//! `qemu-storage-daemon` (an NBD client with x509 TLS, exported as FUSE) for an export over
//! TCP with TLS, since nbdfuse cannot be given TLS certificates. Each step records how to
//! undo itself; [`Attachment::detach`] (also run on drop) undoes them last first.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Where the export is.
#[derive(Clone, Debug)]
pub enum Export {
    /// A Unix socket export.
    Unix { socket: PathBuf, name: String },
    /// An export over TCP with TLS; `certificates` holds `ca-cert.pem` (the IPU's CA),
    /// `client-cert.pem` and `client-key.pem` (this host agent's).
    Tls {
        host: String,
        port: u16,
        name: String,
        certificates: PathBuf,
    },
}

/// The FUSE process serving the export as a file, and what to unmount to stop it.
struct Fuse {
    child: Child,
    mountpoint: PathBuf,
    tool: &'static str,
}

/// A mounted export.
pub struct Attachment {
    fuse: Option<Fuse>,
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

/// A device at least this much larger than its file system gets the file system grown.
const GROW_THRESHOLD: u64 = 1 << 20;

/// The size of the ext4 file system on `dev`, from its superblock.
pub fn ext4_bytes(dev: &Path) -> Result<u64, String> {
    use std::os::unix::fs::FileExt;
    let mut sb = [0u8; 1024];
    std::fs::File::open(dev)
        .and_then(|f| f.read_exact_at(&mut sb, 1024))
        .map_err(|e| format!("cannot read the superblock of {}: {e}", dev.display()))?;
    let u32_at = |o: usize| u32::from_le_bytes(sb[o..o + 4].try_into().expect("4 bytes"));
    if u16::from_le_bytes([sb[0x38], sb[0x39]]) != 0xef53 {
        return Err(format!("{} holds no ext4 file system", dev.display()));
    }
    let log_block = u32_at(24);
    if log_block > 6 {
        return Err(format!("{}: block size 2^{} KiB", dev.display(), log_block));
    }
    let mut blocks = u64::from(u32_at(4));
    // INCOMPAT_64BIT: the high half of the block count is used.
    if u32_at(0x60) & 0x80 != 0 {
        blocks |= u64::from(u32_at(0x150)) << 32;
    }
    Ok(blocks << (10 + log_block))
}

impl Attachment {
    /// Attaches `export` under `workdir` and mounts its ext4 file system at `mountpoint`
    /// (nodev, nosuid).
    pub fn attach(export: &Export, workdir: &Path, mountpoint: &Path) -> Result<Self, String> {
        let mut a = Self {
            fuse: None,
            loop_device: None,
            mountpoint: None,
        };
        let file = a.start_fuse(export, workdir)?;
        let dev = run(Command::new("losetup")
            .args(["--find", "--show"])
            .arg(&file))?;
        a.loop_device = Some(dev.clone());
        // The deployment policy may give the function a device larger than the image's file
        // system: grow it into the device before mounting.
        let device_bytes = std::fs::metadata(&file)
            .map_err(|e| format!("{}: {e}", file.display()))?
            .len();
        let fs_bytes = ext4_bytes(Path::new(&dev))?;
        if device_bytes >= fs_bytes + GROW_THRESHOLD {
            run(Command::new("resize2fs").arg(&dev))?;
        }
        std::fs::create_dir_all(mountpoint)
            .map_err(|e| format!("{}: {e}", mountpoint.display()))?;
        // noatime: reading a file must not write its inode back through the export.
        run(Command::new("mount")
            .args(["-t", "ext4", "-o", "nodev,nosuid,noatime", &dev])
            .arg(mountpoint))?;
        a.mountpoint = Some(mountpoint.to_path_buf());
        Ok(a)
    }

    /// Starts the FUSE file for `export` under `workdir`; returns the file once it serves the
    /// export.
    fn start_fuse(&mut self, export: &Export, workdir: &Path) -> Result<PathBuf, String> {
        let mkdir =
            |d: &Path| std::fs::create_dir_all(d).map_err(|e| format!("{}: {e}", d.display()));
        let (mut command, file, mountpoint, tool, what) = match export {
            Export::Unix { socket, name } => {
                let dir = workdir.join("nbd");
                mkdir(&dir)?;
                let uri = format!("nbd+unix:///{name}?socket={}", socket.display());
                let mut c = Command::new("nbdfuse");
                c.arg(&dir).arg(&uri);
                (c, dir.join("nbd"), dir, "nbdfuse", uri)
            }
            Export::Tls {
                host,
                port,
                name,
                certificates,
            } => {
                mkdir(workdir)?;
                let file = workdir.join("nbd.img");
                // qemu's FUSE export mounts over an existing regular file.
                std::fs::File::create(&file).map_err(|e| format!("{}: {e}", file.display()))?;
                let option = |s: &str| s.replace(',', ",,");
                let mut c = Command::new("qemu-storage-daemon");
                c.arg("--object")
                    .arg(format!(
                        "tls-creds-x509,id=tls0,endpoint=client,dir={}",
                        option(&certificates.display().to_string())
                    ))
                    .arg("--blockdev")
                    .arg(format!(
                        "driver=nbd,node-name=disk,server.type=inet,server.host={},server.port={port},export={},tls-creds=tls0",
                        option(host),
                        option(name)
                    ))
                    .arg("--export")
                    .arg(format!(
                        "type=fuse,id=export0,node-name=disk,writable=on,mountpoint={}",
                        option(&file.display().to_string())
                    ));
                let what = format!("nbds://{host}:{port}/{name}");
                (c, file.clone(), file, "qemu-storage-daemon", what)
            }
        };
        let child = command
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("{tool} (apt install libnbd-bin qemu-utils fuse3): {e}"))?;
        self.fuse = Some(Fuse {
            child,
            mountpoint,
            tool,
        });
        let fuse = self.fuse.as_mut().expect("set above");
        let start = Instant::now();
        // Served once the file exists (nbdfuse) or has the export's size (qemu).
        while !std::fs::metadata(&file).is_ok_and(|m| m.len() > 0) {
            if let Some(status) = fuse.child.try_wait().ok().flatten() {
                return Err(format!("{tool} exited ({status}) before attaching {what}"));
            }
            if start.elapsed() > Duration::from_secs(10) {
                return Err(format!("{tool} did not attach {what} within 10 s"));
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(file)
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
        if let Some(mut fuse) = self.fuse.take() {
            note(run(Command::new("fusermount3")
                .arg("-u")
                .arg(&fuse.mountpoint)));
            // nbdfuse exits once unmounted; qemu-storage-daemon is told to.
            if fuse.tool == "qemu-storage-daemon" {
                // SAFETY: kill(2) on our own child, not yet reaped.
                unsafe { libc::kill(fuse.child.id() as i32, libc::SIGTERM) };
            }
            let start = Instant::now();
            while fuse.child.try_wait().ok().flatten().is_none() {
                if start.elapsed() > Duration::from_secs(5) {
                    let _ = fuse.child.kill();
                    let _ = fuse.child.wait();
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_file_system_size_comes_from_the_superblock() {
        let d = tempfile::tempdir().unwrap();
        let img = d.path().join("fs.img");
        std::fs::File::create(&img)
            .unwrap()
            .set_len(64 << 20)
            .unwrap();
        let out = Command::new("mkfs.ext4")
            .args(["-q", "-F", "-b", "4096"])
            .arg(&img)
            .arg("12M")
            .output()
            .expect("mkfs.ext4 (apt install e2fsprogs)");
        assert!(out.status.success());
        assert_eq!(ext4_bytes(&img).unwrap(), 12 << 20);
        std::fs::write(&img, vec![0u8; 4096]).unwrap();
        assert!(ext4_bytes(&img).unwrap_err().contains("no ext4"));
    }
}
