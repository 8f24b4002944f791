//! Applying one layer's tar stream to the image tree.

use std::collections::HashSet;
use std::io::{self, Read, Write};

use ext4_image::{BlockSink, Meta, NodeId, NodeKind};
use tar::EntryType;

use super::path::EntryPath;
use super::tree::{ImageTree, WalkError};
use super::{Budget, DiffIdReader, LayerStats, Limits, UnpackError, UnpackErrorKind};

const WHITEOUT_PREFIX: &[u8] = b".wh.";
const OPAQUE_WHITEOUT: &[u8] = b".wh..wh..opq";
const PAX_XATTR_PREFIX: &str = "SCHILY.xattr.";

/// Applies one uncompressed layer tar stream to `tree`, enforcing `limits` with the
/// image-wide `budget`. Reads the stream to its end and returns its diff_id; the caller
/// compares that with the image config before trusting the tree.
pub fn apply_layer<S: BlockSink, R: Read>(
    tree: &mut ImageTree<S>,
    tar_stream: R,
    limits: &Limits,
    budget: &mut Budget,
) -> Result<LayerStats, UnpackError> {
    let mut stream = DiffIdReader::new(tar_stream, limits.max_stream_bytes());
    let mut layer = LayerApplier {
        tree,
        limits,
        budget,
        created: HashSet::new(),
        stats: Counts::default(),
        buf: vec![0u8; 256 * 1024],
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

struct LayerApplier<'a, S: BlockSink> {
    tree: &'a mut ImageTree<S>,
    limits: &'a Limits,
    budget: &'a mut Budget,
    /// Paths this layer created: whiteouts and opaque markers only hide lower layers.
    created: HashSet<EntryPath>,
    stats: Counts,
    /// Content is copied through it.
    buf: Vec<u8>,
}

/// What the image could not take, as an unpack error naming the entry.
fn fs_error(path: &EntryPath, what: &str, e: ext4_image::Error) -> UnpackError {
    use ext4_image::Error as E;
    let kind = match &e {
        E::Io(io) if is_no_space(io) => UnpackErrorKind::NoSpace,
        E::Io(_) => UnpackErrorKind::Io,
        E::TooLarge(_) => UnpackErrorKind::LimitExceeded,
        E::BadName(_) | E::BadSymlink { .. } => UnpackErrorKind::Malformed,
        _ => UnpackErrorKind::Unsupported,
    };
    UnpackError::new(kind, format!("entry {}: {what}: {e}", path.display()))
}

/// ENOSPC, or EDQUOT: the image's storage cannot take more.
fn is_no_space(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
        || e.kind() == io::ErrorKind::StorageFull
}

impl<S: BlockSink> LayerApplier<'_, S> {
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
            let name = name.as_encoded_bytes();
            if name == OPAQUE_WHITEOUT {
                self.stats.whiteouts += 1;
                return self.opaque(&path.parent());
            }
            if let Some(hidden) = name.strip_prefix(WHITEOUT_PREFIX) {
                // `.wh.`, `.wh..` and `.wh...` name no entry: `.` and `..` would have the
                // whiteout clear this directory or the one above it. Refused before anything
                // is touched.
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
                let root = self.tree.fs().root();
                self.tree.fs().set_meta(root, meta);
            }
            return Ok(());
        }
        let parent = self
            .tree
            .walk(path.parent_components(), true)
            .map_err(|e| match e {
                WalkError::ThroughSymlink(link) => UnpackError::new(
                    UnpackErrorKind::UnsafePath,
                    format!(
                        "entry {}: parent {link} is a symlink; writing through it could land anywhere",
                        path.display()
                    ),
                ),
                other => walk_error(other),
            })?;
        let name = path.file_name().expect("not the root").as_encoded_bytes();

        match entry_type {
            EntryType::Directory => {
                let fs = self.tree.fs();
                match fs.lookup(parent, name) {
                    Some(dir) if fs.kind(dir) == NodeKind::Directory => fs.set_meta(dir, meta),
                    _ => {
                        self.replace(parent, name, &path)?;
                        self.tree
                            .fs()
                            .mkdir(parent, name, meta)
                            .map_err(|e| fs_error(&path, "mkdir", e))?;
                    }
                }
            }
            EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => {
                let size = entry.size();
                self.check_file_size(&path, size)?;
                self.replace(parent, name, &path)?;
                let setuid = meta.mode & 0o6000 != 0;
                let written = self.copy_content(&mut entry, parent, name, meta, &path)?;
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
                if setuid {
                    self.budget.setuid_files += 1;
                }
            }
            EntryType::Symlink => {
                let target = entry.link_name_bytes().ok_or_else(|| {
                    UnpackError::new(
                        UnpackErrorKind::Malformed,
                        format!("entry {}: symlink without a target", path.display()),
                    )
                })?;
                // The target is stored, never followed by this service.
                self.replace(parent, name, &path)?;
                self.tree
                    .fs()
                    .symlink(parent, name, &target, meta)
                    .map_err(|e| fs_error(&path, "symlink", e))?;
            }
            EntryType::Link => {
                let target = entry.link_name_bytes().ok_or_else(|| {
                    UnpackError::new(
                        UnpackErrorKind::Malformed,
                        format!("entry {}: hardlink without a target", path.display()),
                    )
                })?;
                return self.hardlink(parent, name, &path, &target);
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
                    NodeKind::CharDevice
                } else {
                    NodeKind::BlockDevice
                };
                self.replace(parent, name, &path)?;
                self.tree
                    .fs()
                    .device(parent, name, kind, major, minor, meta)
                    .map_err(|e| fs_error(&path, "mknod", e))?;
            }
            EntryType::Fifo => {
                self.replace(parent, name, &path)?;
                self.tree
                    .fs()
                    .fifo(parent, name, meta)
                    .map_err(|e| fs_error(&path, "mkfifo", e))?;
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

    /// Creates the file and streams its content to the image, re-checking the limits on the
    /// bytes actually produced (sparse files can expand beyond their header size).
    fn copy_content<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        parent: NodeId,
        name: &[u8],
        meta: Meta,
        path: &EntryPath,
    ) -> Result<u64, UnpackError> {
        let (limits, budget, buf) = (self.limits, &mut *self.budget, &mut self.buf);
        let mut file = self
            .tree
            .fs()
            .create_file(parent, name, meta)
            .map_err(|e| fs_error(path, "create", e))?;
        let mut written = 0u64;
        loop {
            let n = entry
                .read(buf)
                .map_err(|e| UnpackError::from_stream(e, &format!("entry {}", path.display())))?;
            if n == 0 {
                break;
            }
            written += n as u64;
            budget.unpacked_bytes += n as u64;
            if written > limits.max_file_size || budget.unpacked_bytes > limits.max_unpacked_bytes {
                return Err(UnpackError::new(
                    UnpackErrorKind::LimitExceeded,
                    format!(
                        "entry {}: content exceeds the size limits while unpacking",
                        path.display()
                    ),
                ));
            }
            file.write_all(&buf[..n])
                .map_err(|e| fs_error(path, "write", ext4_image::Error::Io(e)))?;
        }
        file.finish().map_err(|e| fs_error(path, "write", e))?;
        Ok(written)
    }

    /// Removes whatever a lower layer (or an earlier entry) left at `name`.
    fn replace(
        &mut self,
        parent: NodeId,
        name: &[u8],
        path: &EntryPath,
    ) -> Result<(), UnpackError> {
        self.tree
            .fs()
            .remove(parent, name)
            .map(drop)
            .map_err(|e| fs_error(path, "replace existing entry", e))
    }

    fn hardlink(
        &mut self,
        parent: NodeId,
        name: &[u8],
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
        let target_dir =
            self.tree
                .walk(target.parent_components(), false)
                .map_err(|e| match e {
                    WalkError::ThroughSymlink(l) => {
                        unsafe_link(format!("goes through symlink {l}"))
                    }
                    WalkError::NotADirectory(d) => UnpackError::new(
                        UnpackErrorKind::Malformed,
                        format!(
                            "entry {}: hardlink target parent {d} is not a directory",
                            path.display()
                        ),
                    ),
                    WalkError::Missing(p) => UnpackError::new(
                        UnpackErrorKind::Malformed,
                        format!(
                            "entry {}: hardlink target directory {p} does not exist",
                            path.display()
                        ),
                    ),
                    other => walk_error(other),
                })?;
        let fs = self.tree.fs();
        let node = match fs.lookup(target_dir, target_name.as_encoded_bytes()) {
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
            Some(node) if fs.kind(node) == NodeKind::Directory => {
                return Err(unsafe_link("targets a directory".into()));
            }
            Some(node) => node,
        };
        if target == *path {
            return Ok(());
        }
        self.replace(parent, name, path)?;
        self.tree
            .fs()
            .hardlink(parent, name, node)
            .map_err(|e| fs_error(path, "link", e))?;
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
        let parent = match self.tree.walk(hidden.parent_components(), false) {
            Ok(node) => node,
            // Nothing below to hide.
            Err(WalkError::Missing(_)) => return Ok(()),
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
        self.replace(parent, name.as_encoded_bytes(), hidden)
    }

    /// `.wh..wh..opq`: the directory keeps only what this layer puts in it.
    fn opaque(&mut self, dir: &EntryPath) -> Result<(), UnpackError> {
        let node = self
            .tree
            .walk(dir.all_components(), true)
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
        for name in self.tree.fs().children(node) {
            if !self.created.contains(&dir.join(&name)) {
                self.replace(node, &name, dir)?;
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
        WalkError::Missing(p) => {
            UnpackError::new(UnpackErrorKind::Malformed, format!("{p} does not exist"))
        }
        WalkError::Create(p, e) => UnpackError::new(
            UnpackErrorKind::Unsupported,
            format!("cannot create directory {p}: {e}"),
        ),
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
    let mode = (header.mode().map_err(|e| malformed("mode", e))? & 0o7777) as u16;
    let mtime = header
        .mtime()
        .ok()
        .and_then(|t| i64::try_from(t).ok())
        .unwrap_or(0);
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
