//! Builds an ext4 image from a directory tree kept in memory, writing each image byte once.
//!
//! The IPU image service unpacks OCI layer tar streams into an ext4 image. Rather than
//! unpacking into a directory and running `mkfs.ext4 -d` (which writes every byte twice and
//! reads it once more), the service describes the tree to a [`Builder`] — directories,
//! files, links, devices, ownership, times, extended attributes — and streams each regular
//! file's content through a [`FileWriter`] straight to the blocks it keeps in the image.
//! Everything else — inode tables, bitmaps, directories, extent tree blocks, xattr blocks,
//! long symlinks, group descriptors and superblocks — is written by [`Builder::finish`].
//!
//! The image goes to a [`BlockSink`]: a plain file, or an encrypting block device (AES-XTS
//! per 4096-byte block with the block number as tweak). So the builder writes whole
//! 4096-byte blocks at block-aligned offsets, each block at most once, file content in runs
//! of up to 1 MiB per call, and never writes a block that must read as zeros (the sink
//! guarantees unwritten blocks read as zeros, e.g. as file holes).
//!
//! # What is built
//!
//! ext4 without a journal: 4096-byte blocks, 256-byte inodes (`i_extra_isize` 32), revision
//! 1, features `ext_attr`, `dir_index`, `sparse_super`, `filetype`, `extents`, `flex_bg`,
//! `large_file`, `dir_nlink` and `extra_isize`; 32-byte group descriptors (no `64bit`,
//! hence at most 16 TiB); half-MD4 directory hashing with the unsigned flag.
//!
//! # Layout
//!
//! * Block 0 holds the primary superblock (at byte 1024); the group descriptor table follows
//!   in block 1. The GDT area is sized for [`Options::max_bytes`], and the same area is kept
//!   at the start of every group that holds a backup superblock (groups 1 and the powers of
//!   3, 5 and 7): the image can therefore grow (`resize2fs`) up to `max_bytes` with its
//!   descriptors in place. Only the blocks the actual GDT takes are in use; the rest of the
//!   area is free space.
//! * File data is allocated contiguously from a cursor as it streams in, skipping those
//!   reserved areas (a file that crosses one gets two extents).
//! * At `finish`, inode numbers are assigned depth first (root 2, a lost+found made by the
//!   builder 11, then the tree in name order), then every piece of metadata is placed after
//!   the data: directory blocks, long symlinks, extent tree blocks and xattr blocks in inode
//!   order, then (thanks to `flex_bg`) all block bitmaps, all inode bitmaps and all inode
//!   tables. The free space asked for ([`Options::free_bytes`]) comes last. The number of
//!   groups and of inodes per group is decided then, from what the tree needs plus
//!   [`Options::free_inodes`].
//! * Blocks of files that were removed before `finish` are free in the image but are not
//!   reused: they have been written once already.
//!
//! # Left out, and why
//!
//! * No journal: the image is built once and then mounted read-only or used as a writable
//!   layer that the kernel journals no better without one; it saves the journal's blocks.
//!   `tune2fs -O has_journal` can add one later.
//! * No `metadata_csum` (nor `gdt_csum`/`uninit_bg`): the checksums would have to be
//!   computed over the final metadata, and the bitmaps and inode tables are written in full
//!   anyway. Unused inode table blocks are simply never written: they read as zeros.
//! * Directories are linear, not hashed (htree): the kernel indexes a directory when it
//!   grows past one block under `dir_index`, and lookups in a read-only image are served
//!   from the dentry cache after the first.
//! * No inline data (`inline_data`): small files take a block each, which keeps file
//!   content streaming straight to data blocks.
//! * No sparse files: every block of a file is written, zeros included.
//! * Sockets are not represented (OCI layers do not carry them).
//! * A root entry named `lost+found` that is not a directory is kept as it is (e2fsck will
//!   complain about it); the builder only makes lost+found when the name is free.
//!
//! Feature `serde`: [`Summary`] is `Serialize` (the image service reports it as JSON).
//!
//! # Example
//!
//! ```no_run
//! use std::io::Write;
//! use ext4_image::{Builder, Meta, Options};
//!
//! let file = std::fs::File::create("image.ext4")?;
//! let mut b = Builder::new(file, Options::default())?;
//! let root = b.root();
//! let etc = b.mkdir(root, b"etc", Meta { mode: 0o755, ..Meta::default() })?;
//! let mut w = b.create_file(etc, b"hostname", Meta { mode: 0o644, ..Meta::default() })?;
//! w.write_all(b"ipu\n")?;
//! w.finish()?;
//! let image = b.finish()?;
//! image.sink.set_len(image.size_bytes)?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod builder;
mod dir;
mod error;
mod extent;
mod finish;
mod inode;
mod layout;
mod sink;
mod superblock;
mod tree;
pub mod xattr;

pub use builder::{Builder, FileWriter};
pub use error::Error;
pub use sink::BlockSink;
pub use tree::{Meta, NodeId, NodeKind, Summary};

/// The image's block size.
pub const BLOCK_SIZE: usize = 4096;

/// How to build the image.
#[derive(Clone, Debug)]
pub struct Options {
    /// The filesystem UUID.
    pub uuid: [u8; 16],
    /// The volume label, at most 16 bytes (else [`Error::BadOption`]).
    pub label: String,
    /// The directory hash seed (`s_hash_seed`).
    pub hash_seed: [u8; 16],
    /// Free space the image keeps beyond what the tree uses.
    pub free_bytes: u64,
    /// Free inodes beyond what the tree uses.
    pub free_inodes: u64,
    /// The largest the image may be. Sizes the group descriptor area reserved in group 0
    /// and the backup groups; a tree that would exceed it fails with [`Error::TooLarge`].
    pub max_bytes: u64,
    /// Superblock times and lost+found's times (builds are reproducible: the same input
    /// gives the same bytes).
    pub timestamp: i64,
    /// Blocks per group: 32768 by default; smaller (a multiple of 8, at least 256) for
    /// tests.
    pub blocks_per_group: u32,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            uuid: [0; 16],
            label: String::new(),
            hash_seed: [0; 16],
            free_bytes: 0,
            free_inodes: 0,
            max_bytes: 64 << 30,
            timestamp: 0,
            blocks_per_group: 32768,
        }
    }
}

/// A finished image.
pub struct Image<S> {
    /// The sink, all blocks written.
    pub sink: S,
    /// The image's size: the caller sizes the output to it (the last blocks may be unwritten).
    pub size_bytes: u64,
    /// Blocks in the image.
    pub blocks_count: u64,
    /// Inodes in the image.
    pub inodes_count: u64,
    /// Counts of the tree.
    pub summary: Summary,
}
