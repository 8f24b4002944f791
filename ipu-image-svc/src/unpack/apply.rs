//! Applying one layer's tar stream to the staging tree.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::{AtomicBool, Ordering};

use rustix::fs::{AtFlags, FileType, Mode, OFlags, Timespec, Timestamps, XattrFlags};
use tar::EntryType;

use super::path::EntryPath;
use super::staging::{self, Staging, WalkError};
use super::{Budget, DiffIdReader, LayerStats, Limits, UnpackError, UnpackErrorKind};

const WHITEOUT_PREFIX: &[u8] = b".wh.";
const OPAQUE_WHITEOUT: &[u8] = b".wh..wh..opq";
const PAX_XATTR_PREFIX: &str = "SCHILY.xattr.";

/// Applies one uncompressed layer tar stream to `staging`, enforcing `limits` with the
/// image-wide `budget`. Reads the stream to its end and returns its diff_id; the caller
/// compares that with the image config before trusting the tree.
pub fn apply_layer<R: Read>(
    staging: &Staging,
    tar_stream: R,
    limits: &Limits,
    budget: &mut Budget,
) -> Result<LayerStats, UnpackError> {
    let mut stream = DiffIdReader::new(tar_stream, limits.max_stream_bytes());
    let mut layer = LayerApplier {
        staging,
        limits,
        budget,
        created: HashSet::new(),
        dir_times: Vec::new(),
        stats: Counts::default(),
    };
    {
        let mut archive = tar::Archive::new(&mut stream);
        let entries = archive
            .entries()
            .map_err(|e| UnpackError::from_stream(e, "reading layer tar"))?;
        for entry in entries {
            let entry = entry.map_err(|e| UnpackError::from_stream(e, "reading layer tar"))?;
            layer.apply(entry)?;
        }
    }
    layer.restore_dir_times()?;
    let (diff_id, tar_bytes) = stream
        .finish()
        .map_err(|e| UnpackError::from_stream(e, "reading the end of the layer tar"))?;
    Ok(LayerStats {
        diff_id,
        tar_bytes,
        entries: layer.stats.entries,
        file_bytes: layer.stats.file_bytes,
        whiteouts: layer.stats.whiteouts,
    })
}

#[derive(Default)]
struct Counts {
    entries: u64,
    file_bytes: u64,
    whiteouts: u64,
}

struct LayerApplier<'a> {
    staging: &'a Staging,
    limits: &'a Limits,
    budget: &'a mut Budget,
    /// Paths this layer created: whiteouts and opaque markers only hide lower layers.
    created: HashSet<EntryPath>,
    /// Directory mtimes, set after the layer so adding children does not change them.
    dir_times: Vec<(EntryPath, u64)>,
    stats: Counts,
}

/// Ownership, mode, time and xattrs from a tar header.
struct Meta {
    uid: u32,
    gid: u32,
    mode: u32,
    mtime: u64,
    xattrs: Vec<(String, Vec<u8>)>,
}

fn io_error(path: &EntryPath, what: &str, e: impl Into<io::Error>) -> UnpackError {
    let e = e.into();
    let kind = if is_no_space(&e) {
        UnpackErrorKind::NoSpace
    } else {
        UnpackErrorKind::Io
    };
    UnpackError::new(kind, format!("entry {}: {what}: {e}", path.display()))
}

/// ENOSPC, or EDQUOT: the tree's file system cannot take more.
fn is_no_space(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
        || e.kind() == io::ErrorKind::StorageFull
}

impl LayerApplier<'_> {
    fn apply<R: Read>(&mut self, mut entry: tar::Entry<'_, R>) -> Result<(), UnpackError> {
        let raw_path = entry.path_bytes().into_owned();
        let shown = String::from_utf8_lossy(&raw_path).into_owned();
        let path = EntryPath::parse(&raw_path).map_err(|r| {
            UnpackError::new(
                UnpackErrorKind::UnsafePath,
                format!("entry {shown:?}: path {}; refusing the layer", r.describe()),
            )
        })?;

        let entry_type = entry.header().entry_type();
        if matches!(entry_type, EntryType::XGlobalHeader) {
            return Ok(());
        }

        self.budget.inodes += 1;
        self.stats.entries += 1;
        if self.budget.inodes > self.limits.max_inodes {
            return Err(UnpackError::new(
                UnpackErrorKind::LimitExceeded,
                format!(
                    "entry {}: image has more than {} entries (max inodes)",
                    path.display(),
                    self.limits.max_inodes
                ),
            ));
        }

        if let Some(name) = path.file_name() {
            let name = name.as_bytes();
            if name == OPAQUE_WHITEOUT {
                self.stats.whiteouts += 1;
                return self.opaque(&path.parent());
            }
            if let Some(hidden) = name.strip_prefix(WHITEOUT_PREFIX) {
                // `.wh.`, `.wh..` and `.wh...` name no entry: `.` and `..` would have the
                // whiteout clear this directory or the one above the staging tree (where
                // other requests' trees live). Refused before anything is touched.
                if matches!(hidden, b"" | b"." | b"..") {
                    return Err(UnpackError::new(
                        UnpackErrorKind::UnsafePath,
                        format!(
                            "entry {}: a whiteout of {:?} names no entry; refusing the layer",
                            path.display(),
                            String::from_utf8_lossy(hidden)
                        ),
                    ));
                }
                self.stats.whiteouts += 1;
                return self.whiteout(&path.parent().join(hidden));
            }
        }

        let meta = read_meta(&mut entry, &path)?;
        if path.is_root() {
            if entry_type.is_dir() {
                let root = self.staging.open_dir(&[], false).map_err(walk_error)?;
                set_fd_meta(&root, &meta, &path)?;
                self.dir_times.push((path, meta.mtime));
            }
            return Ok(());
        }
        let parent = self
            .staging
            .open_dir(path.parent_components(), true)
            .map_err(|e| match e {
                WalkError::ThroughSymlink(link) => UnpackError::new(
                    UnpackErrorKind::UnsafePath,
                    format!(
                        "entry {}: parent {link} is a symlink; writing through it could leave the tree",
                        path.display()
                    ),
                ),
                other => walk_error(other),
            })?;
        let name = path.file_name().expect("not the root");

        match entry_type {
            EntryType::Directory => {
                if staging::entry_type(&parent, name).map_err(|e| io_error(&path, "stat", e))?
                    != Some(FileType::Directory)
                {
                    self.replace(&parent, name, &path)?;
                    rustix::fs::mkdirat(&parent, name, Mode::from_raw_mode(0o700))
                        .map_err(|e| io_error(&path, "mkdir", e))?;
                }
                let dir = staging::open_dir_nofollow(&parent, name)
                    .map_err(|e| io_error(&path, "open directory", e))?;
                set_fd_meta(&dir, &meta, &path)?;
                self.dir_times.push((path.clone(), meta.mtime));
            }
            EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => {
                let size = entry.size();
                self.check_file_size(&path, size)?;
                self.replace(&parent, name, &path)?;
                let fd = rustix::fs::openat(
                    &parent,
                    name,
                    OFlags::WRONLY
                        | OFlags::CREATE
                        | OFlags::EXCL
                        | OFlags::NOFOLLOW
                        | OFlags::CLOEXEC,
                    Mode::from_raw_mode(0o600),
                )
                .map_err(|e| io_error(&path, "create", e))?;
                let mut file = File::from(fd);
                let written = self.copy_content(&mut entry, &mut file, &path)?;
                if entry_type != EntryType::GNUSparse && written != size {
                    return Err(UnpackError::new(
                        UnpackErrorKind::Malformed,
                        format!(
                            "entry {}: content ends after {written} of {size} bytes; the layer is truncated",
                            path.display()
                        ),
                    ));
                }
                self.stats.file_bytes += written;
                self.budget.largest_file = self.budget.largest_file.max(written);
                if meta.mode & 0o6000 != 0 {
                    self.budget.setuid_files += 1;
                }
                let fd = OwnedFd::from(file);
                set_fd_meta(&fd, &meta, &path)?;
                set_times_fd(&fd, meta.mtime).map_err(|e| io_error(&path, "set times", e))?;
            }
            EntryType::Symlink => {
                let target = entry.link_name_bytes().ok_or_else(|| {
                    UnpackError::new(
                        UnpackErrorKind::Malformed,
                        format!("entry {}: symlink without a target", path.display()),
                    )
                })?;
                // The target is stored, never followed by this service.
                self.replace(&parent, name, &path)?;
                rustix::fs::symlinkat(OsStr::from_bytes(&target), &parent, name)
                    .map_err(|e| io_error(&path, "symlink", e))?;
                self.set_at_meta(&parent, name, &meta, &path, false)?;
            }
            EntryType::Link => {
                let target = entry.link_name_bytes().ok_or_else(|| {
                    UnpackError::new(
                        UnpackErrorKind::Malformed,
                        format!("entry {}: hardlink without a target", path.display()),
                    )
                })?;
                self.hardlink(&parent, name, &path, &target)?;
            }
            EntryType::Char | EntryType::Block => {
                self.budget.device_nodes += 1;
                if !self.limits.allow_device_nodes {
                    return Err(UnpackError::new(
                        UnpackErrorKind::DeviceNode,
                        format!(
                            "entry {}: {} device node; device nodes are not allowed (policy option --allow-device-nodes)",
                            path.display(),
                            if entry_type == EntryType::Char { "character" } else { "block" }
                        ),
                    ));
                }
                let header = entry.header();
                let major = header.device_major().ok().flatten().unwrap_or(0);
                let minor = header.device_minor().ok().flatten().unwrap_or(0);
                let kind = if entry_type == EntryType::Char {
                    FileType::CharacterDevice
                } else {
                    FileType::BlockDevice
                };
                self.replace(&parent, name, &path)?;
                rustix::fs::mknodat(
                    &parent,
                    name,
                    kind,
                    Mode::from_raw_mode(0o600),
                    rustix::fs::makedev(major, minor),
                )
                .map_err(|e| io_error(&path, "mknod", e))?;
                self.set_at_meta(&parent, name, &meta, &path, true)?;
            }
            EntryType::Fifo => {
                self.replace(&parent, name, &path)?;
                rustix::fs::mknodat(&parent, name, FileType::Fifo, Mode::from_raw_mode(0o600), 0)
                    .map_err(|e| io_error(&path, "mkfifo", e))?;
                self.set_at_meta(&parent, name, &meta, &path, true)?;
            }
            other => {
                return Err(UnpackError::new(
                    UnpackErrorKind::Unsupported,
                    format!(
                        "entry {}: tar entry type {:?} is not supported",
                        path.display(),
                        other
                    ),
                ))
            }
        }
        self.created.insert(path);
        Ok(())
    }

    fn check_file_size(&self, path: &EntryPath, size: u64) -> Result<(), UnpackError> {
        if size > self.limits.max_file_size {
            return Err(UnpackError::new(
                UnpackErrorKind::LimitExceeded,
                format!(
                    "entry {}: file of {size} bytes exceeds the {} byte limit for one file; refused before reading it",
                    path.display(),
                    self.limits.max_file_size
                ),
            ));
        }
        if self.budget.unpacked_bytes.saturating_add(size) > self.limits.max_unpacked_bytes {
            return Err(UnpackError::new(
                UnpackErrorKind::LimitExceeded,
                format!(
                    "entry {}: {size} more bytes would exceed the {} byte limit on unpacked content",
                    path.display(),
                    self.limits.max_unpacked_bytes
                ),
            ));
        }
        Ok(())
    }

    /// Copies content, re-checking the limits on the bytes actually produced (sparse files
    /// can expand beyond their header size).
    fn copy_content<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        file: &mut File,
        path: &EntryPath,
    ) -> Result<u64, UnpackError> {
        let mut buf = vec![0u8; 128 * 1024];
        let mut written = 0u64;
        loop {
            let n = entry
                .read(&mut buf)
                .map_err(|e| UnpackError::from_stream(e, &format!("entry {}", path.display())))?;
            if n == 0 {
                return Ok(written);
            }
            written += n as u64;
            self.budget.unpacked_bytes += n as u64;
            if written > self.limits.max_file_size
                || self.budget.unpacked_bytes > self.limits.max_unpacked_bytes
            {
                return Err(UnpackError::new(
                    UnpackErrorKind::LimitExceeded,
                    format!(
                        "entry {}: content exceeds the size limits while unpacking",
                        path.display()
                    ),
                ));
            }
            file.write_all(&buf[..n])
                .map_err(|e| io_error(path, "write", e))?;
        }
    }

    /// Removes whatever a lower layer (or an earlier entry) left at `name`.
    fn replace(&self, parent: &OwnedFd, name: &OsStr, path: &EntryPath) -> Result<(), UnpackError> {
        staging::remove_at(parent, name).map_err(|e| io_error(path, "replace existing entry", e))
    }

    fn hardlink(
        &mut self,
        parent: &OwnedFd,
        name: &OsStr,
        path: &EntryPath,
        raw_target: &[u8],
    ) -> Result<(), UnpackError> {
        let unsafe_link = |why: String| {
            UnpackError::new(
                UnpackErrorKind::UnsafeLink,
                format!(
                    "entry {}: hardlink to {:?} {why}; refusing the layer",
                    path.display(),
                    String::from_utf8_lossy(raw_target)
                ),
            )
        };
        let target = EntryPath::parse(raw_target)
            .map_err(|r| unsafe_link(format!("leaves the image: target {}", r.describe())))?;
        let Some(target_name) = target.file_name() else {
            return Err(unsafe_link("targets the root directory".into()));
        };
        let target_dir = self
            .staging
            .open_dir(target.parent_components(), false)
            .map_err(|e| match e {
                WalkError::ThroughSymlink(l) => unsafe_link(format!("goes through symlink {l}")),
                WalkError::NotADirectory(d) => UnpackError::new(
                    UnpackErrorKind::Malformed,
                    format!(
                        "entry {}: hardlink target parent {d} is not a directory",
                        path.display()
                    ),
                ),
                WalkError::Io(p, e) if e.raw_os_error() == Some(libc::ENOENT) => UnpackError::new(
                    UnpackErrorKind::Malformed,
                    format!(
                        "entry {}: hardlink target directory {p} does not exist",
                        path.display()
                    ),
                ),
                other => walk_error(other),
            })?;
        match staging::entry_type(&target_dir, target_name)
            .map_err(|e| io_error(path, "stat hardlink target", e))?
        {
            None => {
                return Err(UnpackError::new(
                    UnpackErrorKind::Malformed,
                    format!(
                        "entry {}: hardlink target {} does not exist",
                        path.display(),
                        target.display()
                    ),
                ))
            }
            Some(FileType::Directory) => {
                return Err(unsafe_link("targets a directory".into()));
            }
            Some(_) => {}
        }
        if target == *path {
            return Ok(());
        }
        self.replace(parent, name, path)?;
        rustix::fs::linkat(&target_dir, target_name, parent, name, AtFlags::empty())
            .map_err(|e| io_error(path, "link", e))?;
        self.created.insert(path.clone());
        Ok(())
    }

    /// `.wh.<name>`: removes `<name>` from lower layers.
    fn whiteout(&mut self, hidden: &EntryPath) -> Result<(), UnpackError> {
        let Some(name) = hidden.file_name() else {
            return Err(UnpackError::new(
                UnpackErrorKind::Malformed,
                "whiteout of the root directory".to_string(),
            ));
        };
        if self.created.contains(hidden) {
            return Ok(());
        }
        let parent = match self.staging.open_dir(hidden.parent_components(), false) {
            Ok(fd) => fd,
            // Nothing below to hide.
            Err(WalkError::Io(_, e)) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(()),
            Err(WalkError::ThroughSymlink(l)) => {
                return Err(UnpackError::new(
                    UnpackErrorKind::UnsafePath,
                    format!(
                        "whiteout of {}: parent {l} is a symlink; refusing the layer",
                        hidden.display()
                    ),
                ))
            }
            Err(e) => return Err(walk_error(e)),
        };
        staging::remove_at(&parent, name).map_err(|e| io_error(hidden, "whiteout", e))
    }

    /// `.wh..wh..opq`: the directory keeps only what this layer puts in it.
    fn opaque(&mut self, dir: &EntryPath) -> Result<(), UnpackError> {
        let fd = self
            .staging
            .open_dir(dir.all_components(), true)
            .map_err(|e| match e {
                WalkError::ThroughSymlink(l) => UnpackError::new(
                    UnpackErrorKind::UnsafePath,
                    format!(
                        "opaque whiteout in {}: {l} is a symlink; refusing the layer",
                        dir.display()
                    ),
                ),
                other => walk_error(other),
            })?;
        let created = &self.created;
        staging::clear_dir(&fd, &|name| !created.contains(&dir.join(name)))
            .map_err(|e| io_error(dir, "opaque whiteout", e))
    }

    fn set_at_meta(
        &self,
        parent: &OwnedFd,
        name: &OsStr,
        meta: &Meta,
        path: &EntryPath,
        with_mode: bool,
    ) -> Result<(), UnpackError> {
        chown_ok(rustix::fs::chownat(
            parent,
            name,
            Some(rustix::fs::Uid::from_raw(meta.uid)),
            Some(rustix::fs::Gid::from_raw(meta.gid)),
            AtFlags::SYMLINK_NOFOLLOW,
        ))
        .map_err(|e| io_error(path, "chown", e))?;
        if with_mode {
            // Just created by mknodat in our private tree: not a symlink.
            rustix::fs::chmodat(
                parent,
                name,
                Mode::from_raw_mode(meta.mode),
                AtFlags::empty(),
            )
            .map_err(|e| io_error(path, "chmod", e))?;
        }
        if !meta.xattrs.is_empty() {
            // lsetxattr on the parent's /proc path: the final component is not followed.
            let proc_path = format!("/proc/self/fd/{}/", parent.as_raw_fd());
            let mut full = proc_path.into_bytes();
            full.extend_from_slice(name.as_bytes());
            for (k, v) in &meta.xattrs {
                rustix::fs::lsetxattr(OsStr::from_bytes(&full), k.as_str(), v, XattrFlags::empty())
                    .map_err(|e| io_error(path, &format!("set xattr {k}"), e))?;
            }
        }
        let ts = timestamps(meta.mtime);
        rustix::fs::utimensat(parent, name, &ts, AtFlags::SYMLINK_NOFOLLOW)
            .map_err(|e| io_error(path, "set times", e))
    }

    fn restore_dir_times(&mut self) -> Result<(), UnpackError> {
        for (path, mtime) in self.dir_times.drain(..).rev() {
            match self.staging.open_dir(path.all_components(), false) {
                Ok(fd) => set_times_fd(&fd, mtime).map_err(|e| io_error(&path, "set times", e))?,
                // Removed later in the same layer (opaque/whiteout): nothing to do.
                Err(WalkError::Io(_, e)) if e.raw_os_error() == Some(libc::ENOENT) => {}
                Err(_) => {}
            }
        }
        Ok(())
    }
}

fn walk_error(e: WalkError) -> UnpackError {
    match e {
        WalkError::ThroughSymlink(l) => UnpackError::new(
            UnpackErrorKind::UnsafePath,
            format!("{l} is a symlink; refusing to resolve a path through it"),
        ),
        WalkError::NotADirectory(d) => UnpackError::new(
            UnpackErrorKind::Malformed,
            format!("{d} is used as a directory but is not one"),
        ),
        WalkError::Io(p, e) => UnpackError::new(UnpackErrorKind::Io, format!("{p}: {e}")),
    }
}

fn read_meta<R: Read>(
    entry: &mut tar::Entry<'_, R>,
    path: &EntryPath,
) -> Result<Meta, UnpackError> {
    let header = entry.header();
    let malformed = |what: &str, e: io::Error| {
        UnpackError::new(
            UnpackErrorKind::Malformed,
            format!("entry {}: bad {what} in tar header: {e}", path.display()),
        )
    };
    let uid = u32::try_from(header.uid().map_err(|e| malformed("uid", e))?)
        .map_err(|_| malformed("uid", io::Error::other("above 2^32")))?;
    let gid = u32::try_from(header.gid().map_err(|e| malformed("gid", e))?)
        .map_err(|_| malformed("gid", io::Error::other("above 2^32")))?;
    // Permission bits plus setuid, setgid and sticky.
    let mode = header.mode().map_err(|e| malformed("mode", e))? & 0o7777;
    let mtime = header.mtime().unwrap_or(0);
    let mut xattrs = Vec::new();
    if let Some(exts) = entry
        .pax_extensions()
        .map_err(|e| malformed("pax extensions", e))?
    {
        for ext in exts {
            let ext = ext.map_err(|e| malformed("pax extension", e))?;
            let Ok(key) = ext.key() else { continue };
            if let Some(name) = key.strip_prefix(PAX_XATTR_PREFIX) {
                if !xattr_allowed(name) {
                    return Err(UnpackError::new(
                        UnpackErrorKind::Unsupported,
                        format!("entry {}: xattr {name:?} is outside the user, trusted, security and POSIX ACL namespaces", path.display()),
                    ));
                }
                xattrs.push((name.to_string(), ext.value_bytes().to_vec()));
            }
        }
    }
    Ok(Meta {
        uid,
        gid,
        mode,
        mtime,
        xattrs,
    })
}

fn xattr_allowed(name: &str) -> bool {
    name.starts_with("user.")
        || name.starts_with("trusted.")
        || name.starts_with("security.")
        || name == "system.posix_acl_access"
        || name == "system.posix_acl_default"
}

/// Owner first, then mode: chown clears setuid/setgid, so the mode must come after it.
fn set_fd_meta(fd: &OwnedFd, meta: &Meta, path: &EntryPath) -> Result<(), UnpackError> {
    chown_ok(rustix::fs::fchown(
        fd,
        Some(rustix::fs::Uid::from_raw(meta.uid)),
        Some(rustix::fs::Gid::from_raw(meta.gid)),
    ))
    .map_err(|e| io_error(path, "chown", e))?;
    rustix::fs::fchmod(fd, Mode::from_raw_mode(meta.mode))
        .map_err(|e| io_error(path, "chmod", e))?;
    for (k, v) in &meta.xattrs {
        rustix::fs::fsetxattr(fd, k.as_str(), v, XattrFlags::empty())
            .map_err(|e| io_error(path, &format!("set xattr {k}"), e))?;
    }
    Ok(())
}

/// Unprivileged runs (development) cannot chown; root (the service) must.
fn chown_ok(r: rustix::io::Result<()>) -> rustix::io::Result<()> {
    static WARNED: AtomicBool = AtomicBool::new(false);
    match r {
        Err(rustix::io::Errno::PERM) if !rustix::process::geteuid().is_root() => {
            if !WARNED.swap(true, Ordering::Relaxed) {
                tracing::warn!("not running as root: file ownership from the image is not kept");
            }
            Ok(())
        }
        other => other,
    }
}

fn timestamps(mtime: u64) -> Timestamps {
    let t = Timespec {
        tv_sec: i64::try_from(mtime).unwrap_or(i64::MAX),
        tv_nsec: 0,
    };
    Timestamps {
        last_access: t,
        last_modification: t,
    }
}

fn set_times_fd(fd: impl AsFd, mtime: u64) -> rustix::io::Result<()> {
    rustix::fs::futimens(fd, &timestamps(mtime))
}
