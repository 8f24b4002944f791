//! Where blocks go, and a writer that coalesces ascending blocks into large writes.

use std::io;
use std::os::unix::fs::FileExt;

use crate::BLOCK_SIZE;

/// The largest single `write_blocks` call the builder makes.
pub(crate) const MAX_WRITE: usize = 1 << 20;

/// Where the image's blocks go. `data.len()` is a non-zero multiple of [`BLOCK_SIZE`] and
/// `first_block` counts blocks of [`BLOCK_SIZE`] bytes. The builder writes each block at
/// most once; blocks never written must read as zeros.
pub trait BlockSink {
    /// Writes `data` at block `first_block`.
    fn write_blocks(&mut self, first_block: u64, data: &[u8]) -> io::Result<()>;
}

impl BlockSink for std::fs::File {
    fn write_blocks(&mut self, first_block: u64, data: &[u8]) -> io::Result<()> {
        self.write_all_at(data, first_block * BLOCK_SIZE as u64)
    }
}

impl<T: BlockSink + ?Sized> BlockSink for &mut T {
    fn write_blocks(&mut self, first_block: u64, data: &[u8]) -> io::Result<()> {
        (**self).write_blocks(first_block, data)
    }
}

/// Collects blocks pushed at ascending block numbers and writes each contiguous run in
/// calls of at most [`MAX_WRITE`] bytes.
pub(crate) struct RunWriter<'a, S: BlockSink + ?Sized> {
    sink: &'a mut S,
    start: u64,
    buf: Vec<u8>,
}

impl<'a, S: BlockSink + ?Sized> RunWriter<'a, S> {
    pub(crate) fn new(sink: &'a mut S) -> Self {
        RunWriter {
            sink,
            start: 0,
            buf: Vec::new(),
        }
    }

    /// Queues `data` (whole blocks) for block `block`.
    pub(crate) fn push(&mut self, block: u64, data: &[u8]) -> io::Result<()> {
        debug_assert!(!data.is_empty() && data.len() % BLOCK_SIZE == 0);
        let next = self.start + (self.buf.len() / BLOCK_SIZE) as u64;
        if !self.buf.is_empty() && block != next {
            debug_assert!(block > next, "metadata blocks pushed out of order");
            self.flush()?;
        }
        if self.buf.is_empty() {
            self.start = block;
        }
        let mut rest = data;
        while !rest.is_empty() {
            let room = MAX_WRITE - self.buf.len();
            let n = room.min(rest.len());
            self.buf.extend_from_slice(&rest[..n]);
            rest = &rest[n..];
            if self.buf.len() == MAX_WRITE {
                let blocks = (self.buf.len() / BLOCK_SIZE) as u64;
                self.flush()?;
                self.start += blocks;
            }
        }
        Ok(())
    }

    /// Writes what is queued.
    pub(crate) fn flush(&mut self) -> io::Result<()> {
        if !self.buf.is_empty() {
            self.sink.write_blocks(self.start, &self.buf)?;
            self.buf.clear();
        }
        Ok(())
    }
}
