//! The private staging tree and the only ways layers may change it.
//!
//! Every operation is relative to a directory descriptor reached from the staging root one
//! component at a time with `O_NOFOLLOW`, so no path written by a layer can be resolved through
//! a symlink or leave the tree, whatever earlier entries created. The root directory is mode
//! 0700 and removed (with everything in it) when the [`Staging`] is dropped, so a failed unpack
//! leaves nothing behind.

use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use rustix::fs::{AtFlags, Dir, FileType, Mode, OFlags};

use super::path::EntryPath;

/// Why walking to a directory failed.
#[derive(Debug)]
pub enum WalkError {
    /// A component is a symlink: following it could leave the tree.
    ThroughSymlink(String),
    /// A component exists but is not a directory.
    NotADirectory(String),
    Io(String, io::Error),
}

/// A private work directory (mode 0700) holding the image root at `rootfs/`.
pub struct Staging {
    dir: tempfile::TempDir,
    root: OwnedFd,
}

impl Staging {
    /// Creates a fresh staging tree (mode 0700) inside `parent`.
    pub fn create(parent: &Path) -> io::Result<Self> {
        std::fs::create_dir_all(parent)?;
        let dir = tempfile::Builder::new()
            .prefix("unpack-")
            .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .tempdir_in(parent)?;
        let rootfs = dir.path().join("rootfs");
        std::fs::create_dir(&rootfs)?;
        let root = rustix::fs::open(
            &rootfs,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        Ok(Self { dir, root })
    }

    /// The image root.
    pub fn path(&self) -> PathBuf {
        self.dir.path().join("rootfs")
    }

    /// The private directory around the root, also removed on drop.
    pub fn work_dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn root(&self) -> &OwnedFd {
        &self.root
    }

    /// Opens the directory at `components`, creating missing ones (mode 0755, root-owned)
    /// when `create` is set. Never follows a symlink.
    pub fn open_dir(&self, components: &[Vec<u8>], create: bool) -> Result<OwnedFd, WalkError> {
        let mut cur = rustix::fs::openat(
            &self.root,
            ".",
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| WalkError::Io("/".into(), e.into()))?;
        let mut walked = EntryPath::parse(b"").expect("empty path");
        for c in components {
            walked = walked.join(c);
            let name = OsStr::from_bytes(c);
            cur = match open_dir_nofollow(&cur, name) {
                Ok(fd) => fd,
                Err(e) if e == rustix::io::Errno::NOENT && create => {
                    rustix::fs::mkdirat(&cur, name, Mode::from_raw_mode(0o755))
                        .map_err(|e| WalkError::Io(walked.display(), e.into()))?;
                    open_dir_nofollow(&cur, name)
                        .map_err(|e| WalkError::Io(walked.display(), e.into()))?
                }
                Err(e) if e == rustix::io::Errno::LOOP || e == rustix::io::Errno::NOTDIR => {
                    let st = rustix::fs::statat(&cur, name, AtFlags::SYMLINK_NOFOLLOW)
                        .map_err(|e| WalkError::Io(walked.display(), e.into()))?;
                    return Err(
                        if FileType::from_raw_mode(st.st_mode) == FileType::Symlink {
                            WalkError::ThroughSymlink(walked.display())
                        } else {
                            WalkError::NotADirectory(walked.display())
                        },
                    );
                }
                Err(e) => return Err(WalkError::Io(walked.display(), e.into())),
            };
        }
        Ok(cur)
    }
}

pub fn open_dir_nofollow<Fd: AsFd>(dir: Fd, name: &OsStr) -> rustix::io::Result<OwnedFd> {
    rustix::fs::openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
}

/// The type of `name` in `dir` without following it; `None` if absent.
pub fn entry_type<Fd: AsFd>(dir: Fd, name: &OsStr) -> rustix::io::Result<Option<FileType>> {
    match rustix::fs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) => Ok(Some(FileType::from_raw_mode(st.st_mode))),
        Err(rustix::io::Errno::NOENT) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Removes `name` from `dir`, recursively for directories, never following symlinks.
/// Absent is fine.
pub fn remove_at<Fd: AsFd>(dir: Fd, name: &OsStr) -> rustix::io::Result<()> {
    match entry_type(&dir, name)? {
        None => Ok(()),
        Some(FileType::Directory) => {
            let sub = open_dir_nofollow(&dir, name)?;
            clear_dir(&sub, &|_| true)?;
            rustix::fs::unlinkat(dir, name, AtFlags::REMOVEDIR)
        }
        Some(_) => rustix::fs::unlinkat(dir, name, AtFlags::empty()),
    }
}

/// Removes every child of `dir` for which `remove(name)` says so.
pub fn clear_dir(dir: &OwnedFd, remove: &dyn Fn(&[u8]) -> bool) -> rustix::io::Result<()> {
    let mut names = Vec::new();
    for entry in Dir::read_from(dir)? {
        let entry = entry?;
        let name = entry.file_name().to_bytes();
        if name != b"." && name != b".." && remove(name) {
            names.push(name.to_vec());
        }
    }
    for name in names {
        remove_at(dir, OsStr::from_bytes(&name))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn staging_is_private_and_removed_on_drop() {
        let parent = tempfile::tempdir().unwrap();
        let staging = Staging::create(parent.path()).unwrap();
        let path = staging.work_dir().to_path_buf();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        std::fs::write(path.join("x"), b"x").unwrap();
        drop(staging);
        assert!(!path.exists());
    }

    #[test]
    fn walking_never_follows_symlinks() {
        let parent = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let staging = Staging::create(parent.path()).unwrap();
        std::os::unix::fs::symlink(outside.path(), staging.path().join("lnk")).unwrap();
        std::fs::write(staging.path().join("file"), b"").unwrap();
        match staging.open_dir(&[b"lnk".to_vec(), b"x".to_vec()], true) {
            Err(WalkError::ThroughSymlink(p)) => assert_eq!(p, "/lnk"),
            other => panic!("expected ThroughSymlink, got {other:?}"),
        }
        match staging.open_dir(&[b"file".to_vec()], true) {
            Err(WalkError::NotADirectory(p)) => assert_eq!(p, "/file"),
            other => panic!("expected NotADirectory, got {other:?}"),
        }
        assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 0);
        staging
            .open_dir(&[b"a".to_vec(), b"b".to_vec()], true)
            .unwrap();
        assert!(staging.path().join("a/b").is_dir());
    }

    #[test]
    fn remove_does_not_follow_symlinks() {
        let parent = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("precious"), b"x").unwrap();
        let staging = Staging::create(parent.path()).unwrap();
        std::fs::create_dir(staging.path().join("d")).unwrap();
        std::os::unix::fs::symlink(outside.path(), staging.path().join("d/lnk")).unwrap();
        remove_at(staging.root(), OsStr::new("d")).unwrap();
        assert!(!staging.path().join("d").exists());
        assert!(outside.path().join("precious").exists());
    }
}
