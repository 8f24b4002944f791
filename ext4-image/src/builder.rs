//! The builder's public operations and the file writer that streams content to its blocks.

use std::collections::BTreeMap;
use std::io;

use crate::error::show;
use crate::extent;
use crate::layout::Geometry;
use crate::sink::{BlockSink, MAX_WRITE};
use crate::tree::{Body, Meta, NodeId, NodeKind, Summary, Tree, ROOT};
use crate::{Error, Image, Options, BLOCK_SIZE};

/// Builds an ext4 image: the tree is kept in memory, file content goes to its final blocks
/// as it is written, and [`Builder::finish`] writes all the metadata.
///
/// The content of consecutive small files is gathered into one write of up to 1 MiB, so a
/// sink error may be reported by a later call than the one whose data failed (another
/// file's writer, or `finish`); the build is lost either way.
pub struct Builder<S: BlockSink> {
    pub(crate) sink: S,
    pub(crate) opts: Options,
    pub(crate) geo: Geometry,
    pub(crate) tree: Tree,
    /// The next block file data may go to.
    pub(crate) cursor: u64,
    /// A reusable buffer for file writers' partial blocks.
    scratch: Vec<u8>,
    /// Content blocks allocated but not yet written, from `pending_start`: consecutive
    /// small files share one write call.
    pending: Vec<u8>,
    pending_start: u64,
}

impl<S: BlockSink> Builder<S> {
    /// A builder with an empty root directory (mode 0755, owned by 0:0, time
    /// `opts.timestamp`; change it with [`Builder::set_meta`]).
    pub fn new(sink: S, opts: Options) -> Result<Self, Error> {
        if opts.label.len() > 16 {
            return Err(Error::BadOption(format!(
                "label `{}` is {} bytes, more than 16",
                opts.label,
                opts.label.len()
            )));
        }
        let geo = Geometry::new(opts.blocks_per_group, opts.max_bytes)?;
        let root_meta = Meta {
            mode: 0o755,
            mtime: opts.timestamp,
            ..Meta::default()
        };
        Ok(Builder {
            sink,
            cursor: geo.reserved,
            geo,
            opts,
            tree: Tree::new(root_meta),
            scratch: Vec::new(),
            pending: Vec::new(),
            pending_start: 0,
        })
    }

    /// The root directory.
    pub fn root(&self) -> NodeId {
        ROOT
    }

    /// The node named `name` in `dir`; None when absent or when `dir` is not a directory.
    pub fn lookup(&self, dir: NodeId, name: &[u8]) -> Option<NodeId> {
        self.tree.children(dir)?.get(name).copied()
    }

    /// What `node` is.
    pub fn kind(&self, node: NodeId) -> NodeKind {
        self.tree.node(node).kind
    }

    /// The names in `dir` (without `.` and `..`), in byte order; empty for a non-directory.
    pub fn children(&self, dir: NodeId) -> Vec<Vec<u8>> {
        self.tree
            .children(dir)
            .map(|c| c.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// Makes a directory. An existing name, directory or not, is [`Error::Exists`] (use
    /// [`Builder::lookup`] and [`Builder::set_meta`] to update a directory).
    pub fn mkdir(&mut self, dir: NodeId, name: &[u8], meta: Meta) -> Result<NodeId, Error> {
        let body = Body::Dir {
            parent: dir,
            children: BTreeMap::new(),
        };
        self.tree.add(dir, name, NodeKind::Directory, meta, body)
    }

    /// Makes a regular file, linked at once; its content is what is written to the writer
    /// before [`FileWriter::finish`]. A writer dropped without `finish` (or whose writing
    /// failed) removes the file again: the name is gone and its blocks are free in the image.
    pub fn create_file(
        &mut self,
        dir: NodeId,
        name: &[u8],
        meta: Meta,
    ) -> Result<FileWriter<'_, S>, Error> {
        let body = Body::File {
            size: 0,
            extents: Vec::new(),
        };
        let node = self.tree.add(dir, name, NodeKind::Regular, meta, body)?;
        let mut buf = std::mem::take(&mut self.scratch);
        buf.clear();
        Ok(FileWriter {
            builder: self,
            node,
            dir,
            name: name.to_vec(),
            buf,
            failed: None,
            done: false,
        })
    }

    /// Makes a symbolic link (fast, inside the inode, below 60 bytes; else in one block).
    pub fn symlink(
        &mut self,
        dir: NodeId,
        name: &[u8],
        target: &[u8],
        meta: Meta,
    ) -> Result<NodeId, Error> {
        if target.len() > BLOCK_SIZE - 1 {
            return Err(Error::SymlinkTooLong {
                name: show(name),
                len: target.len(),
            });
        }
        if target.is_empty() {
            return Err(Error::BadSymlink {
                name: show(name),
                why: "empty target",
            });
        }
        if target.contains(&0) {
            return Err(Error::BadSymlink {
                name: show(name),
                why: "target contains NUL",
            });
        }
        let body = Body::Symlink(target.to_vec());
        self.tree.add(dir, name, NodeKind::Symlink, meta, body)
    }

    /// Makes a character or block device node (`kind` is CharDevice or BlockDevice; major
    /// below 4096, minor below 2^20).
    pub fn device(
        &mut self,
        dir: NodeId,
        name: &[u8],
        kind: NodeKind,
        major: u32,
        minor: u32,
        meta: Meta,
    ) -> Result<NodeId, Error> {
        if !matches!(kind, NodeKind::CharDevice | NodeKind::BlockDevice) {
            return Err(Error::BadDevice {
                name: show(name),
                why: format!("{kind:?} is not a device kind"),
            });
        }
        if major >= 1 << 12 || minor >= 1 << 20 {
            return Err(Error::BadDevice {
                name: show(name),
                why: format!("device number {major}:{minor} beyond 4095:1048575"),
            });
        }
        let body = Body::Device { major, minor };
        self.tree.add(dir, name, kind, meta, body)
    }

    /// Makes a named pipe.
    pub fn fifo(&mut self, dir: NodeId, name: &[u8], meta: Meta) -> Result<NodeId, Error> {
        self.tree.add(dir, name, NodeKind::Fifo, meta, Body::Fifo)
    }

    /// Adds the name `name` in `dir` for `target`, which must not be a directory.
    pub fn hardlink(&mut self, dir: NodeId, name: &[u8], target: NodeId) -> Result<(), Error> {
        self.tree.hardlink(dir, name, target)
    }

    /// Unlinks `name` (recursively for a directory). A node no name refers to any more is
    /// gone, and its blocks are free in the image (they are not reused: each block is written
    /// once). Ok(false) when absent.
    pub fn remove(&mut self, dir: NodeId, name: &[u8]) -> Result<bool, Error> {
        self.tree.remove(dir, name)
    }

    /// Replaces the node's metadata. Attributes that cannot be stored are reported by
    /// [`Builder::finish`] ([`Builder::try_set_meta`] reports them at once).
    pub fn set_meta(&mut self, node: NodeId, meta: Meta) {
        self.tree.set_meta(node, meta);
    }

    /// Like [`Builder::set_meta`], but refuses (and leaves the node unchanged) when the
    /// extended attributes cannot be stored.
    pub fn try_set_meta(&mut self, node: NodeId, meta: Meta) -> Result<(), Error> {
        let attrs = crate::xattr::parse(&meta.xattrs)
            .map_err(|r| crate::tree::bad_xattr(&self.tree.node(node).name, r))?;
        crate::xattr::place(&attrs).map_err(|why| {
            crate::tree::bad_xattr(
                &self.tree.node(node).name,
                ("(all attributes together)".to_string(), why),
            )
        })?;
        self.tree.set_meta(node, meta);
        Ok(())
    }

    /// Sets the node's modification time (and its atime, ctime and crtime).
    pub fn set_mtime(&mut self, node: NodeId, mtime: i64) {
        self.tree.node_mut(node).meta.mtime = mtime;
    }

    /// Counts of the tree as it stands.
    pub fn summary(&self) -> Summary {
        self.tree.summary()
    }

    /// Writes all metadata and returns the sink; the caller sizes the output to
    /// `size_bytes`.
    pub fn finish(self) -> Result<Image<S>, Error> {
        crate::finish::finish(self)
    }

    /// Writes whole blocks of `node`'s content at the cursor.
    fn write_data(&mut self, node: NodeId, name: &[u8], data: &[u8]) -> Result<(), Error> {
        debug_assert!(data.len() % BLOCK_SIZE == 0);
        let blocks = (data.len() / BLOCK_SIZE) as u64;
        let mut done = 0;
        while done < blocks {
            let before = self.cursor;
            let (start, len) = self.geo.take(&mut self.cursor, blocks - done);
            if start + len > self.geo.max_blocks {
                self.cursor = before;
                return Err(Error::TooLarge(format!(
                    "writing `{}` goes past max_bytes ({} bytes)",
                    show(name),
                    self.opts.max_bytes
                )));
            }
            let from = done as usize * BLOCK_SIZE;
            let to = (done + len) as usize * BLOCK_SIZE;
            self.emit(start, &data[from..to])?;
            if let Body::File { extents, .. } = &mut self.tree.node_mut(node).body {
                extent::append(extents, start, len);
            }
            done += len;
        }
        Ok(())
    }

    /// Writes content blocks at `start`, joining them to the pending run when they follow
    /// it: small files then share write calls of up to 1 MiB.
    fn emit(&mut self, start: u64, data: &[u8]) -> io::Result<()> {
        let end = self.pending_start + (self.pending.len() / BLOCK_SIZE) as u64;
        if !self.pending.is_empty() && start == end && self.pending.len() + data.len() <= MAX_WRITE
        {
            self.pending.extend_from_slice(data);
            if self.pending.len() == MAX_WRITE {
                self.flush_pending()?;
            }
            return Ok(());
        }
        self.flush_pending()?;
        if data.len() >= MAX_WRITE / 2 {
            return self.sink.write_blocks(start, data);
        }
        self.pending_start = start;
        self.pending.extend_from_slice(data);
        Ok(())
    }

    /// Writes the pending run.
    pub(crate) fn flush_pending(&mut self) -> io::Result<()> {
        if !self.pending.is_empty() {
            self.sink.write_blocks(self.pending_start, &self.pending)?;
            self.pending.clear();
        }
        Ok(())
    }

    /// Takes back a file whose writer did not finish.
    fn discard(&mut self, dir: NodeId, name: &[u8], node: NodeId) {
        if self.lookup(dir, name) == Some(node) {
            let _ = self.tree.remove(dir, name);
        }
    }
}

/// Streams a regular file's content to its blocks, which the builder joins into writes of up
/// to `MAX_WRITE` (1 MiB). Dropping it without [`FileWriter::finish`] removes the file (see
/// [`Builder::create_file`]).
pub struct FileWriter<'b, S: BlockSink> {
    builder: &'b mut Builder<S>,
    node: NodeId,
    dir: NodeId,
    name: Vec<u8>,
    buf: Vec<u8>,
    /// The first failure; later writes fail too and `finish` returns it.
    failed: Option<Error>,
    done: bool,
}

impl<S: BlockSink> FileWriter<'_, S> {
    /// The file's node.
    pub fn node(&self) -> NodeId {
        self.node
    }

    fn add_size(&mut self, n: usize) {
        if let Body::File { size, .. } = &mut self.builder.tree.node_mut(self.node).body {
            *size += n as u64;
        }
    }

    /// Writes the buffer (whole blocks; zero-padded when `pad`).
    fn flush_buf(&mut self, pad: bool) -> Result<(), Error> {
        if pad {
            let len = self.buf.len().next_multiple_of(BLOCK_SIZE);
            self.buf.resize(len, 0);
        }
        if self.buf.is_empty() {
            return Ok(());
        }
        let buf = std::mem::take(&mut self.buf);
        let r = self.builder.write_data(self.node, &self.name, &buf);
        self.buf = buf;
        self.buf.clear();
        r
    }

    fn fail(&mut self, e: Error) -> io::Error {
        let copy = match &e {
            Error::Io(io) => Error::Io(io::Error::new(io.kind(), io.to_string())),
            Error::TooLarge(m) => Error::TooLarge(m.clone()),
            other => Error::Io(io::Error::other(other.to_string())),
        };
        self.failed = Some(copy);
        match e {
            Error::Io(io) => io,
            other => io::Error::other(other),
        }
    }

    /// Writes the last partial block zero-padded and completes the file.
    pub fn finish(mut self) -> Result<NodeId, Error> {
        self.done = true;
        if let Some(e) = self.failed.take() {
            self.builder.discard(self.dir, &self.name, self.node);
            return Err(e);
        }
        if let Err(e) = self.flush_buf(true) {
            self.builder.discard(self.dir, &self.name, self.node);
            return Err(e);
        }
        Ok(self.node)
    }
}

impl<S: BlockSink> io::Write for FileWriter<'_, S> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if let Some(e) = &self.failed {
            return Err(io::Error::other(format!("an earlier write failed: {e}")));
        }
        let mut rest = data;
        // The block begun by an earlier write is completed first.
        if !self.buf.is_empty() {
            let n = rest.len().min(BLOCK_SIZE - self.buf.len());
            self.buf.extend_from_slice(&rest[..n]);
            rest = &rest[n..];
            if self.buf.len() == BLOCK_SIZE {
                if let Err(e) = self.flush_buf(false) {
                    return Err(self.fail(e));
                }
            }
        }
        // Whole blocks straight from the caller's buffer: the builder joins them with the
        // blocks before into writes of up to `MAX_WRITE` (`emit`), so this writer holds at
        // most one partial block (a second 1 MiB buffer cost `image unpack` 1 MiB of its peak
        // memory).
        let whole = rest.len() - rest.len() % BLOCK_SIZE;
        for blocks in rest[..whole].chunks(MAX_WRITE) {
            if let Err(e) = self.builder.write_data(self.node, &self.name, blocks) {
                return Err(self.fail(e));
            }
        }
        rest = &rest[whole..];
        self.buf.extend_from_slice(rest);
        self.add_size(data.len());
        Ok(data.len())
    }

    /// Nothing to do: only whole blocks are written, the tail at `finish`.
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl<S: BlockSink> Drop for FileWriter<'_, S> {
    fn drop(&mut self) {
        if !self.done {
            self.builder.discard(self.dir, &self.name, self.node);
        }
        self.builder.scratch = std::mem::take(&mut self.buf);
    }
}
