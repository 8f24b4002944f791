//! The in-memory tree: nodes, names, links, and the summary.

use std::collections::BTreeMap;

use crate::error::show;
use crate::extent::Extent;
use crate::xattr::{self, Attr, Refusal};
use crate::Error;

/// A node of the tree (an inode to be). Stays valid after the node is removed, but then
/// refers to nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct NodeId(pub(crate) u32);

/// What a node is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodeKind {
    /// A directory.
    Directory,
    /// A regular file.
    Regular,
    /// A symbolic link.
    Symlink,
    /// A character device.
    CharDevice,
    /// A block device.
    BlockDevice,
    /// A named pipe.
    Fifo,
}

/// Ownership, permissions, time and extended attributes of a node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Meta {
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Permission bits with setuid, setgid and sticky (0o7777); the type comes from the call.
    pub mode: u16,
    /// Modification time in seconds; atime, ctime and crtime are set to it too.
    pub mtime: i64,
    /// Extended attributes by full name: `user.*`, `trusted.*`, `security.*`, and
    /// `system.posix_acl_access` / `system.posix_acl_default` in the Linux VFS xattr format
    /// (converted to ext4's on-disk ACL format).
    pub xattrs: Vec<(String, Vec<u8>)>,
}

/// Counts of the tree.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "serde", derive(serde::Serialize))]
pub struct Summary {
    /// Regular file inodes.
    pub regular_files: u64,
    /// Directories; the root and a lost+found made by the builder are not counted.
    pub directories: u64,
    /// Symbolic links.
    pub symlinks: u64,
    /// Extra names of an inode (a file with 3 names counts 2).
    pub hardlinks: u64,
    /// Character and block devices.
    pub device_nodes: u64,
    /// Named pipes.
    pub fifos: u64,
    /// Regular files with the setuid bit.
    pub setuid_files: u64,
    /// Bytes of regular files, each inode once.
    pub content_bytes: u64,
    /// Inodes of the tree, root excluded.
    pub inodes: u64,
}

pub(crate) enum Body {
    Dir {
        parent: NodeId,
        children: BTreeMap<Vec<u8>, NodeId>,
    },
    File {
        size: u64,
        extents: Vec<Extent>,
    },
    Symlink(Vec<u8>),
    Device {
        major: u32,
        minor: u32,
    },
    Fifo,
}

pub(crate) struct Node {
    pub kind: NodeKind,
    /// The name it was created with (for messages).
    pub name: Vec<u8>,
    /// The metadata, less `xattrs`, which are kept in `attrs`.
    pub meta: Meta,
    /// The extended attributes, parsed and sorted.
    pub attrs: Vec<Attr>,
    /// Why `meta.xattrs` (set by `set_meta`) cannot be stored.
    pub attr_error: Option<Refusal>,
    /// Names referring to the node.
    pub links: u32,
    pub alive: bool,
    /// Made by the builder (lost+found): not in the summary.
    pub synthetic: bool,
    pub body: Body,
}

/// The most names a non-directory inode may have.
pub(crate) const LINK_MAX: u32 = 65000;

pub(crate) struct Tree {
    pub nodes: Vec<Node>,
}

pub(crate) const ROOT: NodeId = NodeId(0);

/// Checks a directory entry name.
pub(crate) fn check_name(name: &[u8]) -> Result<(), Error> {
    if name.is_empty() || name == b"." || name == b".." || name.contains(&b'/') || name.contains(&0)
    {
        return Err(Error::BadName(show(name)));
    }
    if name.len() > 255 {
        return Err(Error::NameTooLong {
            name: show(name),
            len: name.len(),
        });
    }
    Ok(())
}

/// The attribute name given when the attributes together do not fit.
const ALL: &str = "(all attributes together)";

pub(crate) fn bad_xattr(entry: &[u8], (name, why): Refusal) -> Error {
    Error::BadXattr {
        entry: show(entry),
        name,
        why,
    }
}

impl Tree {
    pub(crate) fn new(root_meta: Meta) -> Tree {
        let root = Node {
            kind: NodeKind::Directory,
            name: b"/".to_vec(),
            attrs: Vec::new(),
            meta: root_meta,
            attr_error: None,
            links: 1,
            alive: true,
            synthetic: false,
            body: Body::Dir {
                parent: ROOT,
                children: BTreeMap::new(),
            },
        };
        Tree { nodes: vec![root] }
    }

    pub(crate) fn node(&self, id: NodeId) -> &Node {
        &self.nodes[id.0 as usize]
    }

    pub(crate) fn node_mut(&mut self, id: NodeId) -> &mut Node {
        &mut self.nodes[id.0 as usize]
    }

    /// The children of a live directory.
    pub(crate) fn children(&self, dir: NodeId) -> Option<&BTreeMap<Vec<u8>, NodeId>> {
        let n = self.nodes.get(dir.0 as usize)?;
        match &n.body {
            Body::Dir { children, .. } if n.alive => Some(children),
            _ => None,
        }
    }

    fn children_mut(&mut self, dir: NodeId) -> Option<&mut BTreeMap<Vec<u8>, NodeId>> {
        let n = self.nodes.get_mut(dir.0 as usize)?;
        match &mut n.body {
            Body::Dir { children, .. } if n.alive => Some(children),
            _ => None,
        }
    }

    /// Checks that `name` can be made in `dir`.
    pub(crate) fn check_new(&self, dir: NodeId, name: &[u8]) -> Result<(), Error> {
        check_name(name)?;
        let children = self
            .children(dir)
            .ok_or_else(|| Error::NotADirectory(show(name)))?;
        if children.contains_key(name) {
            return Err(Error::Exists(show(name)));
        }
        Ok(())
    }

    /// Adds a node named `name` in `dir`.
    pub(crate) fn add(
        &mut self,
        dir: NodeId,
        name: &[u8],
        kind: NodeKind,
        mut meta: Meta,
        body: Body,
    ) -> Result<NodeId, Error> {
        self.check_new(dir, name)?;
        let attrs = xattr::parse(&meta.xattrs).map_err(|r| bad_xattr(name, r))?;
        // kept parsed only
        meta.xattrs = Vec::new();
        xattr::place(&attrs).map_err(|why| bad_xattr(name, (ALL.to_string(), why)))?;
        let id = NodeId(
            u32::try_from(self.nodes.len())
                .map_err(|_| Error::TooLarge("more than 2^32 nodes".to_string()))?,
        );
        self.nodes.push(Node {
            kind,
            name: name.to_vec(),
            meta,
            attrs,
            attr_error: None,
            links: 1,
            alive: true,
            synthetic: false,
            body,
        });
        self.children_mut(dir)
            .expect("checked above")
            .insert(name.to_vec(), id);
        Ok(id)
    }

    /// Adds a name for an existing non-directory node.
    pub(crate) fn hardlink(
        &mut self,
        dir: NodeId,
        name: &[u8],
        target: NodeId,
    ) -> Result<(), Error> {
        self.check_new(dir, name)?;
        let t = self
            .nodes
            .get(target.0 as usize)
            .filter(|n| n.alive)
            .ok_or_else(|| Error::TargetRemoved(show(name)))?;
        if t.kind == NodeKind::Directory {
            return Err(Error::HardlinkToDirectory(show(name)));
        }
        if t.links >= LINK_MAX {
            return Err(Error::TooManyLinks(show(name)));
        }
        self.node_mut(target).links += 1;
        self.children_mut(dir)
            .expect("checked above")
            .insert(name.to_vec(), target);
        Ok(())
    }

    /// Unlinks `name` from `dir`, recursively for a directory. Ok(false) when absent.
    pub(crate) fn remove(&mut self, dir: NodeId, name: &[u8]) -> Result<bool, Error> {
        check_name(name)?;
        let children = self
            .children_mut(dir)
            .ok_or_else(|| Error::NotADirectory(show(name)))?;
        let Some(id) = children.remove(name) else {
            return Ok(false);
        };
        let mut stack = vec![id];
        while let Some(id) = stack.pop() {
            let n = self.node_mut(id);
            n.links -= 1;
            if n.links > 0 {
                continue;
            }
            n.alive = false;
            n.meta = Meta::default();
            n.attrs = Vec::new();
            match std::mem::replace(&mut n.body, Body::Fifo) {
                Body::Dir { children, .. } => stack.extend(children.into_values()),
                Body::File { .. } | Body::Symlink(_) | Body::Device { .. } | Body::Fifo => {}
            }
        }
        Ok(true)
    }

    pub(crate) fn set_meta(&mut self, node: NodeId, mut meta: Meta) {
        let Some(n) = self.nodes.get_mut(node.0 as usize).filter(|n| n.alive) else {
            return;
        };
        match xattr::parse(&meta.xattrs).and_then(|a| {
            xattr::place(&a)
                .map(|_| a)
                .map_err(|why| (ALL.to_string(), why))
        }) {
            Ok(attrs) => {
                n.attrs = attrs;
                n.attr_error = None;
            }
            Err(r) => {
                n.attrs = Vec::new();
                n.attr_error = Some(r);
            }
        }
        meta.xattrs = Vec::new();
        n.meta = meta;
    }

    pub(crate) fn summary(&self) -> Summary {
        let mut s = Summary::default();
        for n in self
            .nodes
            .iter()
            .skip(1)
            .filter(|n| n.alive && !n.synthetic)
        {
            s.inodes += 1;
            match &n.body {
                Body::Dir { .. } => s.directories += 1,
                Body::File { size, .. } => {
                    s.regular_files += 1;
                    s.content_bytes += size;
                    if n.meta.mode & 0o4000 != 0 {
                        s.setuid_files += 1;
                    }
                }
                Body::Symlink(_) => s.symlinks += 1,
                Body::Device { .. } => s.device_nodes += 1,
                Body::Fifo => s.fifos += 1,
            }
            if n.kind != NodeKind::Directory {
                s.hardlinks += u64::from(n.links - 1);
            }
        }
        s
    }
}
