//! The IPU's block store: base devices built from verified ext4 images, encrypted at rest, and
//! per-function copy-on-write clones, each under its own key held only in memory.
//!
//! - [`xts`]: AES-256-XTS with 4 KiB data units, tweak = block number.
//! - [`base`]: a base device, the ext4 image encrypted at rest under a per-base key.
//! - [`clone`]: a thin clone of a base at [`CLUSTER`] granularity: unwritten clusters read
//!   from the base, written clusters exist only under the clone's random key, which lives in
//!   secret memory, so destroying the key (or a crash) erases the clone.
//!
//! Everything an export serves goes through [`BlockDevice`], the seam where a hardware
//! backend (SPDK lvol esnap clones on crypto bdevs, exported as vhost-blk or NVMe VFs; see
//! docs/architecture.md) replaces this software one.

pub mod base;
pub mod clone;
pub mod xts;

use std::io;

/// Copy-on-write granularity of clones (16 XTS blocks).
pub const CLUSTER: u64 = 64 * 1024;

/// A block device as an export serves it: byte-addressed, any alignment.
pub trait BlockDevice: Send + Sync {
    /// Size in bytes.
    fn size(&self) -> u64;
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()>;
    /// Makes completed writes durable.
    fn flush(&self) -> io::Result<()>;
    /// The range's contents are no longer needed (they may read back as anything).
    fn trim(&self, offset: u64, len: u64) -> io::Result<()>;
    /// Whether writes are refused.
    fn read_only(&self) -> bool;
}

/// An I/O range outside the device.
pub(crate) fn check_range(size: u64, offset: u64, len: usize) -> io::Result<()> {
    match offset.checked_add(len as u64) {
        Some(end) if end <= size => Ok(()),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{len} bytes at {offset} are past the end of the {size}-byte device"),
        )),
    }
}
