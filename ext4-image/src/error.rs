//! The crate's error type.

/// What went wrong building an image. Every variant that concerns an entry names it
/// (lossily decoded as UTF-8).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The name is already in the directory; the caller removes it first.
    #[error("`{0}` already exists")]
    Exists(String),
    /// The parent given for `name` is not a (live) directory.
    #[error("the parent of `{0}` is not a directory")]
    NotADirectory(String),
    /// A hard link may not point at a directory.
    #[error("`{0}`: cannot hard-link to a directory")]
    HardlinkToDirectory(String),
    /// Empty, `.`, `..`, or contains `/` or NUL.
    #[error("bad name `{0}`: empty, `.`, `..`, or contains `/` or NUL")]
    BadName(String),
    /// A name longer than 255 bytes.
    #[error("name `{name}` is {len} bytes long, more than 255")]
    NameTooLong {
        /// The name (lossy).
        name: String,
        /// Its length in bytes.
        len: usize,
    },
    /// A symbolic link target longer than 4095 bytes.
    #[error("symlink `{name}`: target of {len} bytes is longer than 4095")]
    SymlinkTooLong {
        /// The link's name (lossy).
        name: String,
        /// The target's length in bytes.
        len: usize,
    },
    /// A symbolic link target that is empty or contains NUL.
    #[error("symlink `{name}`: {why}")]
    BadSymlink {
        /// The link's name (lossy).
        name: String,
        /// What is wrong with the target.
        why: &'static str,
    },
    /// More than 65000 names for one non-directory inode.
    #[error("`{0}`: more than 65000 links to one inode")]
    TooManyLinks(String),
    /// An extended attribute that cannot be stored.
    #[error("extended attribute `{name}` of `{entry}`: {why}")]
    BadXattr {
        /// The entry carrying it (lossy name or path).
        entry: String,
        /// The attribute's full name.
        name: String,
        /// Why it cannot be stored.
        why: String,
    },
    /// A device number that does not fit ext4's encoding (major < 4096, minor < 2^20),
    /// or a kind that is not a device.
    #[error("device `{name}`: {why}")]
    BadDevice {
        /// The node's name (lossy).
        name: String,
        /// What is wrong.
        why: String,
    },
    /// A hard link to a node that was removed.
    #[error("`{0}`: the link target was removed")]
    TargetRemoved(String),
    /// An option out of range.
    #[error("bad option: {0}")]
    BadOption(String),
    /// The image would be larger than `Options::max_bytes` (or than ext4 without 64bit allows).
    #[error("image too large: {0}")]
    TooLarge(String),
    /// The sink failed.
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
}

/// The lossy display form of a name.
pub(crate) fn show(name: &[u8]) -> String {
    String::from_utf8_lossy(name).into_owned()
}
