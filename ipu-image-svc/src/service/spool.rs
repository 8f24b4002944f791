//! Where DecryptLayer keeps a received blob (ciphertext only) from its arrival until it has
//! been decrypted and sent back: no plaintext leaves before the HMAC over the whole blob
//! matched, so the blob must be held somewhere meanwhile.
//!
//! It is held in memory while the service's spool budget ([`SpoolBudget`], shared by all
//! streams: `--spool-memory`) has room, so a layer is received, checked and decrypted
//! without being written anywhere; a blob that does not fit is spilled to a file in
//! `<state-dir>/spool` (mode 0600), the bytes held so far first, and read back from there.
//! Either way the blob is gone when the last [`StoredBlob`] handle drops: its memory returns
//! to the budget, its file is deleted.
//!
//! In memory, a blob is copied into 1 MiB blocks that the budget keeps for the next blobs
//! (up to [`RETAINED`] bytes of them), rather than held in the buffers its messages were
//! decoded into. Those buffers then go back to the allocator at once and serve the next
//! messages, and the next blob fills blocks that are already mapped. Holding the decoded
//! buffers themselves had a 200 MB layer take up to a fresh 200 MB from the kernel (3,000 to
//! 59,000 page faults per containerd pull in `containerd_pull`: about 1.5 µs each here on a
//! page freed recently, up to 10 µs on one the hypervisor had taken back meanwhile), for one
//! copy that costs about 30 ms.

use std::fs::File;
use std::io::{self, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// The default spool budget: room for a few large layers being pulled at once (containerd
/// pulls three at a time).
pub const DEFAULT_SPOOL_MEMORY: u64 = 1 << 30;

/// The size of the blocks a blob in memory is held in.
const BLOCK: usize = 1 << 20;

/// At most this many bytes of free blocks are kept for the next blobs (a 200 MB layer's, with
/// room): beyond it, the blocks of a blob that goes are freed.
const RETAINED: u64 = 256 << 20;

/// One received chunk (as decoded, no copy), shared with the threads hashing and
/// authenticating it.
pub type Chunk = bytes::Bytes;

/// The bytes of received blobs all streams may hold in memory at once, and the free blocks
/// kept for them.
#[derive(Debug)]
pub struct SpoolBudget {
    limit: u64,
    used: AtomicU64,
    /// Blocks of blobs that have gone. They held ciphertext only, and a blob reads back only
    /// the bytes written into it, so they are reused as they are.
    free: Mutex<Vec<Box<[u8]>>>,
    /// Blocks ever allocated.
    allocated: AtomicU64,
}

impl SpoolBudget {
    pub fn new(limit: u64) -> Arc<Self> {
        Arc::new(Self {
            limit,
            used: AtomicU64::new(0),
            free: Mutex::new(Vec::new()),
            allocated: AtomicU64::new(0),
        })
    }

    /// Bytes held in memory now.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    /// Blocks allocated since the start (each [`BLOCK`] bytes).
    #[cfg(test)]
    fn blocks_allocated(&self) -> u64 {
        self.allocated.load(Ordering::Relaxed)
    }

    /// Bytes of free blocks kept for the next blobs.
    #[cfg(test)]
    fn retained(&self) -> u64 {
        (self.free.lock().expect("not poisoned").len() * BLOCK) as u64
    }

    /// Takes `n` bytes of the budget, if it has them.
    fn take(&self, n: u64) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(n).filter(|&total| total <= self.limit)
            })
            .is_ok()
    }

    /// A block to fill: a kept one, else a new one.
    fn block(&self) -> Box<[u8]> {
        if let Some(block) = self.free.lock().expect("not poisoned").pop() {
            return block;
        }
        self.allocated.fetch_add(1, Ordering::Relaxed);
        vec![0u8; BLOCK].into_boxed_slice()
    }

    /// Takes back a blob that goes: its bytes return to the budget, and its blocks are kept
    /// for the next blobs as far as [`RETAINED`] (or the budget, if smaller) allows; the rest
    /// are freed.
    fn release(&self, blob: Blocks) {
        self.used.fetch_sub(blob.len, Ordering::AcqRel);
        let keep = (RETAINED.min(self.limit) as usize).div_ceil(BLOCK);
        let mut free = self.free.lock().expect("not poisoned");
        let room = keep.saturating_sub(free.len());
        free.extend(blob.blocks.into_iter().take(room));
    }
}

/// The bytes of a blob in memory: `len` bytes in whole blocks, the last one filled as far as
/// `len` says.
#[derive(Default)]
struct Blocks {
    blocks: Vec<Box<[u8]>>,
    len: u64,
}

impl Blocks {
    fn append(&mut self, mut data: &[u8], budget: &SpoolBudget) {
        while !data.is_empty() {
            if self.len == (self.blocks.len() * BLOCK) as u64 {
                // Every block is full (or there is none yet).
                self.blocks.push(budget.block());
            }
            let at = (self.len % BLOCK as u64) as usize;
            let block = self.blocks.last_mut().expect("a block to fill");
            let n = data.len().min(BLOCK - at);
            block[at..at + n].copy_from_slice(&data[..n]);
            self.len += n as u64;
            data = &data[n..];
        }
    }

    /// The written bytes of each block, in order.
    fn slices(&self) -> impl Iterator<Item = &[u8]> {
        let len = self.len;
        self.blocks.iter().enumerate().map(move |(i, block)| {
            let start = (i * BLOCK) as u64;
            &block[..(len - start).min(BLOCK as u64) as usize]
        })
    }

    /// From byte `at` on, as much as `buf` takes from one block.
    fn read_at(&self, at: u64, buf: &mut [u8]) -> usize {
        if at >= self.len {
            return 0;
        }
        let (block, offset) = ((at / BLOCK as u64) as usize, (at % BLOCK as u64) as usize);
        let available = (self.len - at).min((BLOCK - offset) as u64) as usize;
        let n = buf.len().min(available);
        buf[..n].copy_from_slice(&self.blocks[block][offset..offset + n]);
        n
    }
}

/// A blob being received.
pub struct SpoolWriter {
    budget: Arc<SpoolBudget>,
    /// Where it goes if it outgrows the budget.
    path: PathBuf,
    held: Blocks,
    file: Option<File>,
}

impl SpoolWriter {
    pub fn new(budget: Arc<SpoolBudget>, spill_to: &Path) -> Self {
        Self {
            budget,
            path: spill_to.to_path_buf(),
            held: Blocks::default(),
            file: None,
        }
    }

    /// Appends `data`: copied into the blob's blocks while the budget has room, else written
    /// to the file (with everything held before it).
    pub fn push(&mut self, data: &[u8]) -> io::Result<()> {
        if self.file.is_none() {
            if self.budget.take(data.len() as u64) {
                self.held.append(data, &self.budget);
                return Ok(());
            }
            self.spill()?;
        }
        self.file.as_mut().expect("spilled").write_all(data)
    }

    fn spill(&mut self) -> io::Result<()> {
        use std::os::unix::fs::OpenOptionsExt;
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&self.path)?;
        for slice in self.held.slices() {
            if let Err(e) = file.write_all(slice) {
                // Set, so that the file is deleted on drop.
                self.file = Some(file);
                return Err(e);
            }
        }
        self.budget.release(std::mem::take(&mut self.held));
        self.file = Some(file);
        Ok(())
    }

    /// The whole blob, held.
    pub fn finish(mut self) -> io::Result<StoredBlob> {
        match self.file.take() {
            Some(file) => {
                drop(file);
                Ok(StoredBlob(Arc::new(Stored::File(std::mem::take(
                    &mut self.path,
                )))))
            }
            None => Ok(StoredBlob(Arc::new(Stored::Memory {
                blob: std::mem::take(&mut self.held),
                budget: self.budget.clone(),
            }))),
        }
    }
}

impl Drop for SpoolWriter {
    /// An unfinished blob goes: its memory back to the budget, its file deleted.
    fn drop(&mut self) {
        self.budget.release(std::mem::take(&mut self.held));
        if self.file.is_some() {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// A received blob, in memory or in its spool file; read it as often as needed.
#[derive(Clone)]
pub struct StoredBlob(Arc<Stored>);

enum Stored {
    Memory {
        blob: Blocks,
        budget: Arc<SpoolBudget>,
    },
    /// Spilled: deleted with the last handle.
    File(PathBuf),
    /// Someone else's file: kept.
    Borrowed(PathBuf),
}

impl Drop for Stored {
    fn drop(&mut self) {
        match self {
            Stored::Memory { blob, budget } => budget.release(std::mem::take(blob)),
            Stored::File(path) => {
                let _ = std::fs::remove_file(path);
            }
            Stored::Borrowed(_) => {}
        }
    }
}

impl StoredBlob {
    /// A file's blob, stored by someone else: read, not deleted.
    pub fn borrowed_file(path: &Path) -> io::Result<Self> {
        // Checked now, so that a missing file is an error here rather than at the first read.
        File::open(path)?;
        Ok(Self(Arc::new(Stored::Borrowed(path.to_path_buf()))))
    }

    /// Whether it was spilled to a file.
    pub fn on_disk(&self) -> bool {
        !matches!(*self.0, Stored::Memory { .. })
    }

    /// A reader of the whole blob from its start.
    pub fn reader(&self) -> io::Result<Box<dyn Read + Send>> {
        Ok(match &*self.0 {
            Stored::Memory { .. } => Box::new(MemoryReader {
                blob: self.0.clone(),
                at: 0,
            }),
            Stored::File(path) | Stored::Borrowed(path) => {
                Box::new(BufReader::with_capacity(256 * 1024, File::open(path)?))
            }
        })
    }
}

struct MemoryReader {
    blob: Arc<Stored>,
    at: u64,
}

impl Read for MemoryReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let Stored::Memory { blob, .. } = &*self.blob else {
            unreachable!("a memory reader reads a blob in memory")
        };
        let n = blob.read_at(self.at, buf);
        self.at += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunks(n: usize, len: usize) -> Vec<Chunk> {
        (0..n).map(|i| vec![i as u8 + 1; len].into()).collect()
    }

    fn read_all(blob: &StoredBlob) -> Vec<u8> {
        let mut out = Vec::new();
        blob.reader().unwrap().read_to_end(&mut out).unwrap();
        out
    }

    #[test]
    fn a_blob_within_the_budget_stays_in_memory_and_gives_it_back() {
        let dir = tempfile::tempdir().unwrap();
        let budget = SpoolBudget::new(10_000);
        let path = dir.path().join("b");
        let mut w = SpoolWriter::new(budget.clone(), &path);
        for c in chunks(3, 1000) {
            w.push(&c).unwrap();
        }
        let blob = w.finish().unwrap();
        assert!(!blob.on_disk());
        assert!(!path.exists(), "written to disk");
        assert_eq!(budget.used(), 3000);
        let want: Vec<u8> = chunks(3, 1000).iter().flat_map(|c| c.to_vec()).collect();
        assert_eq!(read_all(&blob), want);
        // Read twice (the HMAC pass, then the decryption).
        assert_eq!(read_all(&blob.clone()), want);
        drop(blob);
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn a_blob_past_the_budget_spills_everything_to_its_file_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let budget = SpoolBudget::new(2500);
        // Another stream holds some of it.
        let mut other = SpoolWriter::new(budget.clone(), &dir.path().join("other"));
        other.push(&[9; 500]).unwrap();
        let path = dir.path().join("b");
        let mut w = SpoolWriter::new(budget.clone(), &path);
        for c in chunks(5, 1000) {
            w.push(&c).unwrap();
        }
        // What it held went back when it spilled.
        assert_eq!(budget.used(), 500);
        let blob = w.finish().unwrap();
        assert!(blob.on_disk());
        let want: Vec<u8> = chunks(5, 1000).iter().flat_map(|c| c.to_vec()).collect();
        assert_eq!(std::fs::read(&path).unwrap(), want);
        assert_eq!(read_all(&blob), want);
        drop(blob);
        assert!(!path.exists(), "spool file left");
        drop(other);
        assert_eq!(budget.used(), 0);
    }

    /// A blob of `len` bytes pushed in pieces of `piece` bytes; byte i is `(i * 7 + seed)`.
    fn blob_of(
        budget: &Arc<SpoolBudget>,
        dir: &Path,
        len: usize,
        piece: usize,
        seed: u8,
    ) -> (StoredBlob, Vec<u8>) {
        let data: Vec<u8> = (0..len).map(|i| (i * 7) as u8 ^ seed).collect();
        let mut w = SpoolWriter::new(budget.clone(), &dir.join(format!("b{seed}")));
        for c in data.chunks(piece) {
            w.push(c).unwrap();
        }
        (w.finish().unwrap(), data)
    }

    #[test]
    fn the_blocks_of_a_blob_that_went_hold_the_next_one_and_only_its_bytes_are_read() {
        let dir = tempfile::tempdir().unwrap();
        let budget = SpoolBudget::new(64 << 20);
        // 5.5 MiB in uneven pieces: six blocks, the last half full.
        let (first, want) = blob_of(&budget, dir.path(), BLOCK * 11 / 2, 300_001, 1);
        assert_eq!(budget.blocks_allocated(), 6);
        assert_eq!(read_all(&first), want);
        drop(first);
        assert_eq!((budget.used(), budget.retained()), (0, 6 * BLOCK as u64));
        // The next blobs take those blocks: nothing new is allocated, and each reads back
        // exactly its own bytes, none of the first blob's that its blocks still hold.
        for (len, piece, seed) in [(BLOCK * 5, BLOCK, 2), (10, 3, 3), (BLOCK + 1, 65_536, 4)] {
            let (blob, want) = blob_of(&budget, dir.path(), len, piece, seed);
            assert_eq!(read_all(&blob), want, "blob of {len} bytes");
            assert_eq!(budget.blocks_allocated(), 6);
        }
        // Reads of any size across the block boundaries.
        let (blob, want) = blob_of(&budget, dir.path(), BLOCK * 2 + 5, BLOCK * 2 + 5, 5);
        let mut reader = blob.reader().unwrap();
        let mut got = Vec::new();
        let mut buf = vec![0u8; 700_000];
        loop {
            let n = reader.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
        }
        assert_eq!(got, want);
    }

    #[test]
    fn at_most_the_retained_bytes_of_free_blocks_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let budget = SpoolBudget::new(1 << 30);
        let mut w = SpoolWriter::new(budget.clone(), &dir.path().join("b"));
        let piece = vec![7u8; BLOCK];
        for _ in 0..RETAINED as usize / BLOCK + 3 {
            w.push(&piece).unwrap();
        }
        drop(w.finish().unwrap());
        assert_eq!(budget.retained(), RETAINED);
        // A budget smaller than that keeps no more than the budget.
        let small = SpoolBudget::new(3 * BLOCK as u64 / 2);
        let (blob, _) = blob_of(&small, dir.path(), BLOCK + 1, BLOCK, 2);
        drop(blob);
        assert_eq!(small.retained(), 2 * BLOCK as u64);
    }

    #[test]
    fn an_unfinished_blob_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let budget = SpoolBudget::new(1500);
        let path = dir.path().join("b");
        let mut w = SpoolWriter::new(budget.clone(), &path);
        for c in chunks(2, 1000) {
            w.push(&c).unwrap();
        }
        assert!(path.exists());
        drop(w);
        assert!(!path.exists());
        let mut w = SpoolWriter::new(budget.clone(), &path);
        w.push(&[1; 1000]).unwrap();
        drop(w);
        assert_eq!(budget.used(), 0);
    }
}
