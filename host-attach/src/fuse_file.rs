//! An NBD export as one file in a FUSE mount, served by a thread of this process: what a loop
//! device needs on a kernel without the nbd driver.
//!
//! It replaces libnbd's `nbdfuse` for Unix socket exports. Starting nbdfuse cost a cold start
//! about 3 ms (a process, and the dynamic linking of libnbd, gnutls and libxml2), and nbdfuse
//! caps the kernel's FUSE requests at 128 KiB: a 1 MiB read by the loop device became eight
//! round trips. Here the mount asks for 1 MiB requests (`max_pages` 256) and opens the file
//! with `FOPEN_DIRECT_IO`, so the loop device's reads and writes reach the export whole and
//! are not cached twice.
//!
//! The protocol is the kernel's (`include/uapi/linux/fuse.h`, protocol 7.31 answered): INIT,
//! LOOKUP, GETATTR, SETATTR (answered with the unchanged attributes), OPEN, READ, WRITE,
//! FLUSH, FSYNC, RELEASE, STATFS and the root directory's OPENDIR/READDIR/RELEASEDIR; anything
//! else is ENOSYS. A thread per connection to the export serves one request at a time; FSYNC
//! flushes every connection. The attach opens one ([`CONNECTIONS`]): a sequential read gains
//! nothing from more, since the loop device sends its direct reads one at a time (1 GiB read by
//! a function on the host, four A/B pairs against nbdfuse: 164-171 MB/s either way). Written
//! here because the FUSE crates either link libfuse or do not let the server raise
//! `max_pages`.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crate::nbd_client::NbdClient;

/// The file's name in the mount.
pub const FILE_NAME: &str = "nbd";
/// The largest READ or WRITE the kernel sends.
const MAX_IO: u32 = 1 << 20;
/// The request buffer: the largest WRITE and its headers.
const BUFFER: usize = MAX_IO as usize + 4096;

const ROOT: u64 = 1;
const FILE: u64 = 2;

const FUSE_LOOKUP: u32 = 1;
const FUSE_FORGET: u32 = 2;
const FUSE_GETATTR: u32 = 3;
const FUSE_SETATTR: u32 = 4;
const FUSE_OPEN: u32 = 14;
const FUSE_READ: u32 = 15;
const FUSE_WRITE: u32 = 16;
const FUSE_STATFS: u32 = 17;
const FUSE_RELEASE: u32 = 18;
const FUSE_FSYNC: u32 = 20;
const FUSE_FLUSH: u32 = 25;
const FUSE_INIT: u32 = 26;
const FUSE_OPENDIR: u32 = 27;
const FUSE_READDIR: u32 = 28;
const FUSE_RELEASEDIR: u32 = 29;
const FUSE_ACCESS: u32 = 34;
const FUSE_INTERRUPT: u32 = 36;
const FUSE_DESTROY: u32 = 38;
const FUSE_BATCH_FORGET: u32 = 42;

const FUSE_ASYNC_READ: u32 = 1 << 0;
const FUSE_BIG_WRITES: u32 = 1 << 5;
const FUSE_MAX_PAGES: u32 = 1 << 22;
const FOPEN_DIRECT_IO: u32 = 1 << 0;

/// The answered protocol version.
const MAJOR: u32 = 7;
const MINOR: u32 = 31;

const IN_HEADER: usize = 40;

/// The connections (and serving threads) [`FuseFile::mount`] is given by the attach: one, as
/// nbdfuse had. The IPU serves all exports' connections from one pool of 32 worker threads,
/// and an idle connection holds its worker: four per attachment left the ninth of 32
/// concurrent starts waiting for a worker (the `warm_start` bench hung), for no measured gain.
pub const CONNECTIONS: usize = 1;

/// A served FUSE file: unmount with [`FuseFile::unmount`] (the serving threads then end).
pub struct FuseFile {
    mountpoint: PathBuf,
    threads: Vec<JoinHandle<io::Result<()>>>,
}

impl FuseFile {
    /// Mounts a FUSE file system at `mountpoint` (an existing directory) whose one file,
    /// [`FILE_NAME`], is the export `connections` (at least one, all to the same export)
    /// are open to, and serves it on a thread per connection. Root only, and
    /// only root may open the file: it is the function's disk. The mount is not `allow_other`
    /// (FUSE then refuses every other user), and with `default_permissions` the kernel also
    /// holds the file's mode (0600, root's) to each open.
    pub fn mount(mountpoint: &Path, connections: Vec<NbdClient>) -> io::Result<Self> {
        let size = match connections.first() {
            Some(c) => c.size(),
            None => return Err(io::Error::other("no connection to the export")),
        };
        if connections.iter().any(|c| c.size() != size) {
            return Err(io::Error::other(
                "the connections disagree on the export's size",
            ));
        }
        let device = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/fuse")?;
        let data = std::ffi::CString::new(format!(
            "fd={},rootmode=40000,user_id=0,group_id=0,default_permissions,max_read={MAX_IO}",
            device.as_raw_fd()
        ))
        .expect("no NUL");
        use rustix::mount::MountFlags;
        rustix::mount::mount(
            "host-attach",
            mountpoint,
            "fuse.host-attach",
            MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC,
            data.as_c_str(),
        )?;
        let connections: Arc<Vec<Mutex<NbdClient>>> =
            Arc::new(connections.into_iter().map(Mutex::new).collect());
        let mut threads = Vec::new();
        for index in 0..connections.len() {
            let spawned = device.try_clone().and_then(|device| {
                let mut server = Server {
                    device,
                    connections: connections.clone(),
                    index,
                    size,
                };
                std::thread::Builder::new()
                    .name("fuse-nbd".into())
                    .spawn(move || server.serve())
            });
            match spawned {
                Ok(thread) => threads.push(thread),
                // The threads started serve on; the mount works with fewer.
                Err(_) if !threads.is_empty() => break,
                Err(e) => {
                    let _ = rustix::mount::unmount(mountpoint, rustix::mount::UnmountFlags::DETACH);
                    return Err(e);
                }
            }
        }
        Ok(Self {
            mountpoint: mountpoint.to_path_buf(),
            threads,
        })
    }

    /// The file, once served.
    pub fn file(&self) -> PathBuf {
        self.mountpoint.join(FILE_NAME)
    }

    /// Unmounts (`EBUSY` while the file is still open, e.g. by a loop device letting go);
    /// the serving threads then end and the export's connections are closed.
    pub fn unmount(&mut self) -> io::Result<()> {
        if self.threads.is_empty() {
            return Ok(());
        }
        rustix::mount::unmount(&self.mountpoint, rustix::mount::UnmountFlags::empty())?;
        let mut first = Ok(());
        for thread in self.threads.drain(..) {
            let r = match thread.join() {
                Ok(r) => r,
                Err(_) => Err(io::Error::other("a FUSE server thread panicked")),
            };
            if first.is_ok() {
                first = r;
            }
        }
        first
    }
}

impl Drop for FuseFile {
    fn drop(&mut self) {
        if !self.threads.is_empty() {
            // Lazily: whatever still holds the file lets go of it in its own time.
            let _ = rustix::mount::unmount(&self.mountpoint, rustix::mount::UnmountFlags::DETACH);
        }
    }
}

struct Server {
    device: File,
    /// Every thread's connection; this one's is `index`.
    connections: Arc<Vec<Mutex<NbdClient>>>,
    index: usize,
    size: u64,
}

/// A request's header.
struct Header {
    opcode: u32,
    unique: u64,
    nodeid: u64,
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_ne_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

impl Server {
    fn serve(&mut self) -> io::Result<()> {
        let mut buf = vec![0u8; BUFFER];
        loop {
            let n = match self.device.read(&mut buf) {
                Ok(n) => n,
                // The request was interrupted before it was read; the next one.
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => continue,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // Unmounted: ENODEV, or ECONNABORTED, which this VM's kernel (6.18) returned
                // now and then to the read after an unmount (also what a connection aborted
                // through /sys/fs/fuse/connections gives). The connection is gone either way.
                Err(e) if matches!(e.raw_os_error(), Some(libc::ENODEV | libc::ECONNABORTED)) => {
                    break
                }
                Err(e) => return Err(e),
            };
            if n < IN_HEADER {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("a FUSE request of {n} bytes"),
                ));
            }
            let header = Header {
                opcode: u32_at(&buf, 4),
                unique: u64_at(&buf, 8),
                nodeid: u64_at(&buf, 16),
            };
            let body = &buf[IN_HEADER..n];
            if header.opcode == FUSE_DESTROY {
                self.reply(&header, Ok(&[]))?;
                break;
            }
            self.dispatch(&header, body)?;
        }
        self.nbd().disconnect();
        Ok(())
    }

    /// This thread's connection (only this thread uses it, but FSYNC on another thread).
    fn nbd(&self) -> std::sync::MutexGuard<'_, NbdClient> {
        self.connections[self.index]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Every connection's writes made durable: each write was answered on its own
    /// connection, and a flush covers only that connection's.
    fn flush_all(&self) -> io::Result<()> {
        for c in self.connections.iter() {
            c.lock().unwrap_or_else(|p| p.into_inner()).flush()?;
        }
        Ok(())
    }

    fn dispatch(&mut self, h: &Header, body: &[u8]) -> io::Result<()> {
        match h.opcode {
            FUSE_INIT => {
                let kernel_minor = u32_at(body, 4);
                let max_readahead = u32_at(body, 8).min(MAX_IO);
                let mut out = [0u8; 64];
                out[0..4].copy_from_slice(&MAJOR.to_ne_bytes());
                out[4..8].copy_from_slice(&MINOR.min(kernel_minor).to_ne_bytes());
                out[8..12].copy_from_slice(&max_readahead.to_ne_bytes());
                let flags = FUSE_ASYNC_READ | FUSE_BIG_WRITES | FUSE_MAX_PAGES;
                out[12..16].copy_from_slice(&flags.to_ne_bytes());
                out[16..18].copy_from_slice(&16u16.to_ne_bytes()); // max_background
                out[18..20].copy_from_slice(&12u16.to_ne_bytes()); // congestion_threshold
                out[20..24].copy_from_slice(&MAX_IO.to_ne_bytes()); // max_write
                out[24..28].copy_from_slice(&1u32.to_ne_bytes()); // time_gran
                out[28..30].copy_from_slice(&((MAX_IO / 4096) as u16).to_ne_bytes()); // max_pages
                self.reply(h, Ok(&out))
            }
            FUSE_LOOKUP => {
                let name = body.split(|&b| b == 0).next().unwrap_or_default();
                if h.nodeid == ROOT && name == FILE_NAME.as_bytes() {
                    let mut out = [0u8; 128];
                    out[0..8].copy_from_slice(&FILE.to_ne_bytes());
                    // entry_valid, attr_valid: a day (the file never changes).
                    out[16..24].copy_from_slice(&86_400u64.to_ne_bytes());
                    out[24..32].copy_from_slice(&86_400u64.to_ne_bytes());
                    self.attr(FILE, &mut out[40..128]);
                    self.reply(h, Ok(&out))
                } else {
                    self.reply(h, Err(libc::ENOENT))
                }
            }
            FUSE_GETATTR | FUSE_SETATTR => {
                if h.nodeid != ROOT && h.nodeid != FILE {
                    return self.reply(h, Err(libc::ENOENT));
                }
                let mut out = [0u8; 104];
                out[0..8].copy_from_slice(&86_400u64.to_ne_bytes());
                self.attr(h.nodeid, &mut out[16..104]);
                self.reply(h, Ok(&out))
            }
            FUSE_OPEN => {
                let mut out = [0u8; 16];
                out[8..12].copy_from_slice(&FOPEN_DIRECT_IO.to_ne_bytes());
                self.reply(h, Ok(&out))
            }
            FUSE_OPENDIR => self.reply(h, Ok(&[0u8; 16])),
            FUSE_READ => {
                let offset = u64_at(body, 8);
                let size = u64::from(u32_at(body, 16).min(MAX_IO));
                let end = offset.saturating_add(size).min(self.size);
                let len = end.saturating_sub(offset) as usize;
                let mut data = vec![0u8; len];
                let read = if len == 0 {
                    Ok(())
                } else {
                    self.nbd().read_at(&mut data, offset)
                };
                match read {
                    Ok(()) => self.reply(h, Ok(&data)),
                    Err(e) => self.reply(h, Err(errno(&e))),
                }
            }
            FUSE_WRITE => {
                let offset = u64_at(body, 8);
                let size = u32_at(body, 16) as usize;
                let data = body.get(40..40 + size).ok_or_else(|| {
                    io::Error::new(io::ErrorKind::InvalidData, "a short FUSE WRITE")
                })?;
                let within = offset
                    .checked_add(size as u64)
                    .is_some_and(|end| end <= self.size);
                if !within {
                    return self.reply(h, Err(libc::ENOSPC));
                }
                let written = self.nbd().write_at(data, offset);
                match written {
                    Ok(()) => {
                        let mut out = [0u8; 8];
                        out[0..4].copy_from_slice(&(size as u32).to_ne_bytes());
                        self.reply(h, Ok(&out))
                    }
                    Err(e) => self.reply(h, Err(errno(&e))),
                }
            }
            FUSE_FSYNC => match self.flush_all() {
                Ok(()) => self.reply(h, Ok(&[])),
                Err(e) => self.reply(h, Err(errno(&e))),
            },
            FUSE_FLUSH | FUSE_RELEASE | FUSE_RELEASEDIR | FUSE_ACCESS => self.reply(h, Ok(&[])),
            // An empty directory listing: the file is found by LOOKUP.
            FUSE_READDIR => self.reply(h, Ok(&[])),
            FUSE_STATFS => self.reply(h, Ok(&[0u8; 80])),
            // No reply to these.
            FUSE_FORGET | FUSE_BATCH_FORGET | FUSE_INTERRUPT => Ok(()),
            _ => self.reply(h, Err(libc::ENOSYS)),
        }
    }

    /// `struct fuse_attr` of the root directory or the file.
    fn attr(&mut self, node: u64, out: &mut [u8]) {
        let size = if node == FILE { self.size } else { 0 };
        let mode: u32 = if node == FILE {
            libc::S_IFREG | 0o600
        } else {
            libc::S_IFDIR | 0o700
        };
        out[0..8].copy_from_slice(&node.to_ne_bytes());
        out[8..16].copy_from_slice(&size.to_ne_bytes());
        out[16..24].copy_from_slice(&size.div_ceil(512).to_ne_bytes());
        out[60..64].copy_from_slice(&mode.to_ne_bytes());
        out[64..68].copy_from_slice(&1u32.to_ne_bytes()); // nlink
        out[80..84].copy_from_slice(&4096u32.to_ne_bytes()); // blksize
    }

    fn reply(&mut self, h: &Header, result: Result<&[u8], i32>) -> io::Result<()> {
        let (error, data) = match result {
            Ok(data) => (0i32, data),
            Err(errno) => (-errno, &[][..]),
        };
        let len = 16 + data.len();
        let mut header = [0u8; 16];
        header[0..4].copy_from_slice(&(len as u32).to_ne_bytes());
        header[4..8].copy_from_slice(&error.to_ne_bytes());
        header[8..16].copy_from_slice(&h.unique.to_ne_bytes());
        // One write per reply: the kernel takes a reply whole or not at all.
        let written = self
            .device
            .write_vectored(&[io::IoSlice::new(&header), io::IoSlice::new(data)]);
        match written {
            Ok(n) if n == len => Ok(()),
            Ok(n) => Err(io::Error::other(format!(
                "a FUSE reply of {len} bytes was taken as {n}"
            ))),
            // The request was interrupted and its reply is no longer wanted.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

/// The errno for a failed export request (EIO unless the server said).
fn errno(e: &io::Error) -> i32 {
    e.raw_os_error().unwrap_or(libc::EIO)
}
