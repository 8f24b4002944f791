//! The tree layers are applied to: an ext4 file system built in memory
//! ([`ext4_image::Builder`]), whose regular file content goes straight to its final blocks as
//! the layer stream delivers it. Nothing of the image is written anywhere else first.
//!
//! Paths are resolved from the root one component at a time and never through a symlink:
//! a layer path whose parent is a symlink is refused, whatever earlier entries created, so a
//! layer cannot make a write land somewhere its path does not name.

use ext4_image::{BlockSink, Builder, Image, Meta, NodeId, NodeKind};

/// Why walking to a directory failed; each names the path walked so far.
#[derive(Debug)]
pub enum WalkError {
    /// A component is a symlink: following it would resolve the path elsewhere.
    ThroughSymlink(String),
    /// A component exists but is not a directory.
    NotADirectory(String),
    /// A component does not exist (and was not to be created).
    Missing(String),
    /// A missing component could not be created (a name ext4 cannot hold).
    Create(String, ext4_image::Error),
}

/// The image being built.
pub struct ImageTree<S: BlockSink> {
    fs: Builder<S>,
}

impl<S: BlockSink> ImageTree<S> {
    pub fn new(sink: S, options: ext4_image::Options) -> Result<Self, ext4_image::Error> {
        Ok(Self {
            fs: Builder::new(sink, options)?,
        })
    }

    /// The directory at `components`, creating missing ones (mode 0755, owned by root, time 0)
    /// when `create` is set. Never resolves through a symlink.
    pub fn walk(&mut self, components: &[Vec<u8>], create: bool) -> Result<NodeId, WalkError> {
        let mut cur = self.fs.root();
        let mut walked = String::new();
        for c in components {
            walked.push('/');
            walked.push_str(&String::from_utf8_lossy(c));
            cur = match self.fs.lookup(cur, c) {
                Some(node) => match self.fs.kind(node) {
                    NodeKind::Directory => node,
                    NodeKind::Symlink => return Err(WalkError::ThroughSymlink(walked)),
                    _ => return Err(WalkError::NotADirectory(walked)),
                },
                None if create => {
                    let meta = Meta {
                        mode: 0o755,
                        ..Meta::default()
                    };
                    self.fs
                        .mkdir(cur, c, meta)
                        .map_err(|e| WalkError::Create(walked.clone(), e))?
                }
                None => return Err(WalkError::Missing(walked)),
            };
        }
        Ok(cur)
    }

    /// The builder, for the operations that need no path resolution.
    pub fn fs(&mut self) -> &mut Builder<S> {
        &mut self.fs
    }

    /// Writes the file system's metadata; the sink then holds the whole image.
    pub fn finish(self) -> Result<Image<S>, ext4_image::Error> {
        self.fs.finish()
    }
}
