//! Attaching an NBD export as a mounted file system, and undoing it in reverse order.
//!
//! This machine's kernel has no nbd driver, so the export becomes a FUSE file backed by the
//! NBD connection, and a loop device over that file: served by this process
//! ([`crate::fuse_file`], over [`crate::nbd_client`]) for a Unix socket export, and by
//! `qemu-storage-daemon` (an NBD client with x509 TLS, exported as FUSE) for an export over
//! TCP with TLS. The loop device and the mount are system calls ([`crate::loop_device`],
//! mount(2)), not processes: each `losetup` or `mount` cost a cold start about 2 ms. Each step
//! records how to undo itself; [`Attachment::detach`] (also run on drop) undoes them last
//! first.

use std::ffi::OsStr;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
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

/// The tools an attachment runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Tool {
    /// qemu's NBD client with TLS, exported as a FUSE file (TCP exports).
    QemuStorageDaemon,
    Resize2fs,
    Fusermount3,
}

impl Tool {
    /// The program run.
    pub fn program(self) -> &'static str {
        match self {
            Self::QemuStorageDaemon => "qemu-storage-daemon",
            Self::Resize2fs => "resize2fs",
            Self::Fusermount3 => "fusermount3",
        }
    }
}

impl std::fmt::Display for Tool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.program())
    }
}

/// Why attaching or detaching failed: which step, on what.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    /// A tool could not be run.
    #[error("\"{tool}\": {source}")]
    Run { tool: Tool, source: io::Error },
    /// A tool failed; its stderr.
    #[error("\"{tool}\" failed: {stderr}")]
    Failed { tool: Tool, stderr: String },
    /// The FUSE client could not be started.
    #[error("{tool} (apt install qemu-utils fuse3): {source}")]
    FuseStart { tool: Tool, source: io::Error },
    /// The export could not be opened, or its FUSE file not mounted.
    #[error("{what}: {source}")]
    Export { what: String, source: io::Error },
    /// The FUSE client exited before it served the export.
    #[error("{tool} exited ({status}) before attaching {export}")]
    FuseExited {
        tool: Tool,
        status: ExitStatus,
        export: String,
    },
    /// The FUSE client did not serve the export in time.
    #[error("{tool} did not attach {export} within 10 s")]
    FuseTimeout { tool: Tool, export: String },
    /// A directory or file of the attachment.
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    /// A system call of the attachment (`what` names it and its arguments).
    #[error("{what}: {source}")]
    Kernel { what: String, source: io::Error },
    /// The device's superblock could not be read.
    #[error("cannot read the superblock of {}: {source}", device.display())]
    Superblock { device: PathBuf, source: io::Error },
    /// The device holds no ext4 file system.
    #[error("{} holds no ext4 file system", device.display())]
    NotExt4 { device: PathBuf },
    /// The ext4 superblock's block size is out of range.
    #[error("{}: block size 2^{log_block} KiB", device.display())]
    BlockSize { device: PathBuf, log_block: u32 },
}

fn io_error(path: &Path) -> impl FnOnce(io::Error) -> AttachError + '_ {
    move |source| AttachError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What serves the export as a file, and how to stop it.
enum Fuse {
    /// This process ([`crate::fuse_file`]).
    InProcess(crate::fuse_file::FuseFile),
    /// A FUSE process, and the mountpoint to unmount to stop it.
    Process {
        child: Child,
        mountpoint: PathBuf,
        tool: Tool,
    },
}

/// A mounted export.
pub struct Attachment {
    fuse: Option<Fuse>,
    loop_device: Option<PathBuf>,
    mountpoint: Option<PathBuf>,
}

/// Runs `tool` with `args`; its stdout.
fn run<S: AsRef<OsStr>>(
    tool: Tool,
    args: impl IntoIterator<Item = S>,
) -> Result<String, AttachError> {
    let out = Command::new(tool.program())
        .args(args)
        .output()
        .map_err(|source| AttachError::Run { tool, source })?;
    if !out.status.success() {
        return Err(AttachError::Failed {
            tool,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// A device at least this much larger than its file system gets the file system grown.
const GROW_THRESHOLD: u64 = 1 << 20;

/// The size of the ext4 file system on `dev`, from its superblock.
pub fn ext4_bytes(dev: &Path) -> Result<u64, AttachError> {
    use std::os::unix::fs::FileExt;
    let mut sb = [0u8; 1024];
    std::fs::File::open(dev)
        .and_then(|f| f.read_exact_at(&mut sb, 1024))
        .map_err(|source| AttachError::Superblock {
            device: dev.to_path_buf(),
            source,
        })?;
    let u32_at = |o: usize| u32::from_le_bytes(sb[o..o + 4].try_into().expect("4 bytes"));
    if u16::from_le_bytes([sb[0x38], sb[0x39]]) != 0xef53 {
        return Err(AttachError::NotExt4 {
            device: dev.to_path_buf(),
        });
    }
    let log_block = u32_at(24);
    if log_block > 6 {
        return Err(AttachError::BlockSize {
            device: dev.to_path_buf(),
            log_block,
        });
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
    pub fn attach(export: &Export, workdir: &Path, mountpoint: &Path) -> Result<Self, AttachError> {
        let mut a = Self {
            fuse: None,
            loop_device: None,
            mountpoint: None,
        };
        let attaching = ops::timings::span("attach").entered();
        let file = a.start_fuse(export, workdir)?;
        let dev = crate::loop_device::attach(&file).map_err(|source| AttachError::Kernel {
            what: format!("attaching {} to a loop device", file.display()),
            source,
        })?;
        a.loop_device = Some(dev.clone());
        if let Err(e) = crate::loop_device::set_read_ahead(&dev, READ_AHEAD_KIB) {
            eprintln!(
                "host-attach: reading files of {} ahead {READ_AHEAD_KIB} KiB at a time: {e} (the kernel's default stays)",
                dev.display()
            );
        }
        // The deployment policy may give the function a device larger than the image's file
        // system: grow it into the device before mounting.
        let device_bytes = std::fs::metadata(&file).map_err(io_error(&file))?.len();
        let fs_bytes = ext4_bytes(&dev)?;
        if device_bytes >= fs_bytes + GROW_THRESHOLD {
            run(Tool::Resize2fs, [&dev])?;
        }
        drop(attaching);
        let _mounting = ops::timings::span("mount").entered();
        std::fs::create_dir_all(mountpoint).map_err(io_error(mountpoint))?;
        // noatime: reading a file must not write its inode back through the export.
        use rustix::mount::MountFlags;
        rustix::mount::mount(
            &dev,
            mountpoint,
            "ext4",
            MountFlags::NODEV | MountFlags::NOSUID | MountFlags::NOATIME,
            None,
        )
        .map_err(|e| AttachError::Kernel {
            what: format!(
                "mounting ext4 {} on {} (nodev,nosuid,noatime)",
                dev.display(),
                mountpoint.display()
            ),
            source: e.into(),
        })?;
        a.mountpoint = Some(mountpoint.to_path_buf());
        Ok(a)
    }

    /// Starts the FUSE file for `export` under `workdir`; returns the file once it serves the
    /// export.
    fn start_fuse(&mut self, export: &Export, workdir: &Path) -> Result<PathBuf, AttachError> {
        let mkdir = |d: &Path| std::fs::create_dir_all(d).map_err(io_error(d));
        let (mut command, file, mountpoint, tool, what) = match export {
            Export::Unix { socket, name } => {
                let dir = workdir.join("nbd");
                mkdir(&dir)?;
                let what = |step: &str| format!("{step} export {name:?} at {}", socket.display());
                let connections = (0..crate::fuse_file::CONNECTIONS)
                    .map(|_| crate::nbd_client::NbdClient::connect(socket, name))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|source| AttachError::Export {
                        what: what("opening"),
                        source,
                    })?;
                let served =
                    crate::fuse_file::FuseFile::mount(&dir, connections).map_err(|source| {
                        AttachError::Export {
                            what: format!(
                                "{} as a FUSE file in {}",
                                what("serving"),
                                dir.display()
                            ),
                            source,
                        }
                    })?;
                let file = served.file();
                self.fuse = Some(Fuse::InProcess(served));
                return Ok(file);
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
                std::fs::File::create(&file).map_err(io_error(&file))?;
                let option = |s: &str| s.replace(',', ",,");
                let mut c = Command::new(Tool::QemuStorageDaemon.program());
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
                (c, file.clone(), file, Tool::QemuStorageDaemon, what)
            }
        };
        let child = command
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|source| AttachError::FuseStart { tool, source })?;
        self.fuse = Some(Fuse::Process {
            child,
            mountpoint,
            tool,
        });
        let Some(Fuse::Process { child, .. }) = self.fuse.as_mut() else {
            unreachable!("set above")
        };
        let start = Instant::now();
        // Served once the file has the export's size (qemu).
        let mut pause = Duration::from_micros(200);
        while !std::fs::metadata(&file).is_ok_and(|m| m.len() > 0) {
            if let Some(status) = child.try_wait().ok().flatten() {
                return Err(AttachError::FuseExited {
                    tool,
                    status,
                    export: what,
                });
            }
            if start.elapsed() > Duration::from_secs(10) {
                return Err(AttachError::FuseTimeout { tool, export: what });
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(1));
        }
        Ok(file)
    }

    /// Unmounts, detaches the loop device, unmounts the FUSE file and stops its server. Every
    /// step is attempted; the first failure is returned.
    pub fn detach(&mut self) -> Result<(), AttachError> {
        let mut first = None;
        let mut note = |r: Result<(), AttachError>| {
            if let Err(e) = r {
                first.get_or_insert(e);
            }
        };
        if let Some(m) = self.mountpoint.take() {
            note(
                rustix::mount::unmount(&m, rustix::mount::UnmountFlags::empty()).map_err(|e| {
                    AttachError::Kernel {
                        what: format!("unmounting {}", m.display()),
                        source: e.into(),
                    }
                }),
            );
        }
        if let Some(dev) = self.loop_device.take() {
            note(
                crate::loop_device::detach(&dev).map_err(|source| AttachError::Kernel {
                    what: format!("detaching loop device {}", dev.display()),
                    source,
                }),
            );
        }
        if let Some(fuse) = self.fuse.take() {
            note(stop_fuse(fuse));
        }
        first.map_or(Ok(()), Err)
    }
}

/// Unmounts a FUSE file and stops its server. The loop device lets go of the file
/// asynchronously after LOOP_CLR_FD (and udev, or another process probing loop devices, may
/// still hold it open a moment): busy for a while is expected. Seen past 5 s on a loaded
/// 2-core host.
fn stop_fuse(fuse: Fuse) -> Result<(), AttachError> {
    let start = Instant::now();
    match fuse {
        Fuse::InProcess(mut served) => loop {
            match served.unmount() {
                Err(e)
                    if e.raw_os_error() == Some(libc::EBUSY)
                        && start.elapsed() <= FUSE_BUSY_WAIT =>
                {
                    std::thread::sleep(Duration::from_millis(20));
                }
                r => {
                    break r.map_err(|source| AttachError::Kernel {
                        what: format!(
                            "unmounting the export's FUSE file {}",
                            served.file().display()
                        ),
                        source,
                    })
                }
            }
        },
        Fuse::Process {
            mut child,
            mountpoint,
            tool,
        } => {
            let unmounted = loop {
                let r = run(
                    Tool::Fusermount3,
                    [OsStr::new("-u"), mountpoint.as_os_str()],
                );
                let busy = matches!(&r, Err(AttachError::Failed { stderr, .. }) if stderr.contains("busy"));
                if !busy || start.elapsed() > FUSE_BUSY_WAIT {
                    break r;
                }
                std::thread::sleep(Duration::from_millis(20));
            };
            // qemu-storage-daemon is told to stop.
            if tool == Tool::QemuStorageDaemon {
                // SAFETY: kill(2) on our own child, not yet reaped.
                unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            }
            let start = Instant::now();
            while child.try_wait().ok().flatten().is_none() {
                if start.elapsed() > Duration::from_secs(5) {
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            unmounted.map(drop)
        }
    }
}

/// How far the kernel reads ahead in the function's files: one request of the export's FUSE
/// file (its largest, 1 MiB), instead of the block layer's default 128 KiB. Every read that
/// misses the page cache is a round trip to the IPU, so a function's first reads of its
/// binaries take fewer of them: the cold start's run (runc, then `/hello` and its busybox)
/// took 39 to 43 ms instead of 46 to 49 ms (`cold_start`, two alternated pairs of 7 rounds).
const READ_AHEAD_KIB: u32 = 1024;

/// How long a FUSE file still held after the loop device is detached is waited for before the unmount fails.
const FUSE_BUSY_WAIT: Duration = Duration::from_secs(20);

impl Drop for Attachment {
    fn drop(&mut self) {
        let _ = self.detach();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failed_tool_is_named_with_its_stderr() {
        let e = run(Tool::Fusermount3, ["-u", "/nonexistent/host-attach-test"]).unwrap_err();
        match &e {
            AttachError::Failed { tool, stderr } => {
                assert_eq!(*tool, Tool::Fusermount3);
                assert!(stderr.contains("/nonexistent/host-attach-test"), "{stderr}");
            }
            e => panic!("{e}"),
        }
        assert!(e.to_string().starts_with("\"fusermount3\" failed: "), "{e}");
    }

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
        assert!(ext4_bytes(&img)
            .unwrap_err()
            .to_string()
            .contains("no ext4"));
    }
}
