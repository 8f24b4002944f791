//! The only place plaintext image content may exist on the IPU outside process memory: a
//! tmpfs the service mounts at `<state-dir>/plain`, sized by the operator
//! (`--plaintext-memory`) and mounted `noswap`, so that neither the IPU's disk nor its swap
//! device ever holds a decrypted layer. Unpack trees and the plaintext ext4 image of a base
//! live here only until the base is encrypted; a request that does not fit fails with
//! `workspace-full`.
//!
//! The mount is private to the service (mode 0700, `nosuid,nodev,noexec`) and unmounted when
//! the service stops. `serve` runs in a mount namespace of its own
//! ([`private_mount_namespace`]), so a killed service's tmpfs dies with it, content and all;
//! a mount an in-process service left (or one in a shared namespace) is unmounted at the next
//! start, which discards its content too.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use super::error::ServiceError;

/// The Linux magic number of tmpfs (`statfs.f_type`).
const TMPFS_MAGIC: i64 = 0x0102_1994;

/// The default bound: plenty for function images, and only what is used is taken.
pub const DEFAULT_PLAINTEXT_MEMORY: u64 = 4 << 30;

/// The mounted tmpfs; unmounted on drop.
#[derive(Debug)]
pub struct PlaintextMemory {
    path: PathBuf,
    size: u64,
}

impl PlaintextMemory {
    /// Mounts a fresh tmpfs of `size` bytes at `path` (created, mode 0700), after unmounting
    /// whatever a previous run left there.
    pub fn mount(path: &Path, size: u64) -> Result<Self, ServiceError> {
        if size < 1 << 20 {
            return Err(ServiceError::BadRequest(format!(
                "plaintext memory of {size} bytes: at least 1 MiB is needed"
            )));
        }
        std::fs::create_dir_all(path)
            .map_err(|e| ServiceError::storage("cannot create", path, e))?;
        // A killed run's tmpfs (stacked mounts too): its content goes with it.
        while is_mount_point(path).map_err(|e| ServiceError::storage("cannot stat", path, e))? {
            unmount(path).map_err(|e| ServiceError::storage("cannot unmount", path, e))?;
            tracing::info!(path = %path.display(), "a previous run's plaintext memory was discarded");
        }
        // Not mounted: whatever is here is on the state dir's disk (written by an older
        // version, or by hand); it goes.
        clear_dir(path)?;
        let options = format!("size={size},mode=0700,noswap,huge=never");
        if let Err(e) = mount_tmpfs(path, &options) {
            if e.raw_os_error() != Some(libc::EINVAL) {
                return Err(ServiceError::storage("cannot mount tmpfs on", path, e));
            }
            // Kernels before 6.4 lack `noswap`: acceptable only when nothing can be swapped.
            if swap_is_on() {
                return Err(ServiceError::storage(
                    "cannot keep plaintext out of swap in",
                    path,
                    io::Error::other(
                        "this kernel's tmpfs has no `noswap` option and swap is on; turn swap off on the IPU (or use a kernel >= 6.4)",
                    ),
                ));
            }
            mount_tmpfs(path, &format!("size={size},mode=0700,huge=never"))
                .map_err(|e| ServiceError::storage("cannot mount tmpfs on", path, e))?;
        }
        let me = Self {
            path: path.to_path_buf(),
            size,
        };
        // Never write plaintext to a disk by mistake (a mount shadowed or undone under us).
        let fs = rustix::fs::statfs(path)
            .map_err(|e| ServiceError::storage("cannot statfs", path, e.into()))?;
        if fs.f_type as i64 != TMPFS_MAGIC {
            return Err(ServiceError::storage(
                "plaintext memory is not a tmpfs at",
                path,
                io::Error::other(format!("file system type {:#x}", fs.f_type)),
            ));
        }
        Ok(me)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The bound, in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }
}

impl Drop for PlaintextMemory {
    fn drop(&mut self) {
        if let Err(e) = unmount(&self.path) {
            tracing::error!(path = %self.path.display(), error = %e, "cannot unmount the plaintext memory");
        }
    }
}

/// Moves the calling process into a mount namespace of its own whose mounts do not propagate
/// back: the plaintext tmpfs is then visible to this process only, and the kernel unmounts it
/// (freeing its pages) when the process dies, SIGKILL included. Must be called before the
/// process starts threads: a mount namespace is per thread, and only the caller moves.
pub fn private_mount_namespace() -> io::Result<()> {
    // SAFETY: unshare(2) takes flags only; it changes this thread's namespaces.
    if unsafe { libc::unshare(libc::CLONE_NEWNS) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a NUL-terminated path; with MS_REC | MS_PRIVATE and no source or type, mount(2)
    // only changes propagation, so nothing mounted here reaches the parent namespace.
    let rc = unsafe {
        libc::mount(
            std::ptr::null(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REC | libc::MS_PRIVATE,
            std::ptr::null(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// True when `path` is the root of a mount (its device differs from its parent's).
fn is_mount_point(path: &Path) -> io::Result<bool> {
    let parent = path.parent().unwrap_or(Path::new("/"));
    Ok(std::fs::metadata(path)?.dev() != std::fs::metadata(parent)?.dev())
}

fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a path with a NUL byte"))
}

fn mount_tmpfs(path: &Path, options: &str) -> io::Result<()> {
    let target = c_path(path)?;
    let data = CString::new(options).expect("no NUL in options");
    // SAFETY: all pointers are NUL-terminated strings that outlive the call; mount(2) only
    // reads them.
    let rc = unsafe {
        libc::mount(
            c"ipu-plaintext".as_ptr(),
            target.as_ptr(),
            c"tmpfs".as_ptr(),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
            data.as_ptr().cast(),
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Detaches the mount: it is gone from the tree at once, and its pages are freed when the
/// last open file in it closes.
fn unmount(path: &Path) -> io::Result<()> {
    let target = c_path(path)?;
    // SAFETY: a NUL-terminated path that outlives the call.
    if unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn clear_dir(path: &Path) -> Result<(), ServiceError> {
    let entries =
        std::fs::read_dir(path).map_err(|e| ServiceError::storage("cannot read", path, e))?;
    for entry in entries.flatten() {
        let p = entry.path();
        let removed = if entry.file_type().is_ok_and(|t| t.is_dir()) {
            std::fs::remove_dir_all(&p)
        } else {
            std::fs::remove_file(&p)
        };
        removed.map_err(|e| ServiceError::storage("cannot delete", &p, e))?;
    }
    Ok(())
}

/// Whether any swap device or file is active.
fn swap_is_on() -> bool {
    std::fs::read_to_string("/proc/swaps")
        .map(|s| s.lines().skip(1).any(|l| !l.trim().is_empty()))
        .unwrap_or(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sized_tmpfs_that_a_restart_replaces() {
        let dir = tempfile::tempdir().unwrap();
        let at = dir.path().join("plain");
        let first = PlaintextMemory::mount(&at, 4 << 20).unwrap();
        assert!(is_mount_point(&at).unwrap());
        std::fs::write(at.join("left"), b"plaintext").unwrap();
        // A full tmpfs refuses more: the bound holds.
        let too_much = std::fs::write(at.join("big"), vec![1u8; 5 << 20]).unwrap_err();
        assert_eq!(too_much.raw_os_error(), Some(libc::ENOSPC));
        // A killed run does not unmount: the next start discards what it left.
        std::mem::forget(first);
        let second = PlaintextMemory::mount(&at, 8 << 20).unwrap();
        assert!(!at.join("left").exists());
        assert!(is_mount_point(&at).unwrap());
        drop(second);
        assert!(!is_mount_point(&at).unwrap());
        assert!(PlaintextMemory::mount(&at, 1000).is_err());
    }
}
