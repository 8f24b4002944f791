//! Where DecryptLayer keeps a received blob (ciphertext only) from its arrival until it has
//! been decrypted and sent back: no plaintext leaves before the HMAC over the whole blob
//! matched, so the blob must be held somewhere meanwhile.
//!
//! It is held in memory while the service's spool budget ([`SpoolBudget`], shared by all
//! streams: `--spool-memory`) has room, so a layer is received, checked and decrypted
//! without being written anywhere; a blob that does not fit is spilled to a file in
//! `<state-dir>/spool` (mode 0600), the chunks held so far first, and read back from there.
//! Either way the blob is gone when the last [`StoredBlob`] handle drops: its memory returns
//! to the budget, its file is deleted.

use std::fs::File;
use std::io::{self, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// The default spool budget: room for a few large layers being pulled at once (containerd
/// pulls three at a time).
pub const DEFAULT_SPOOL_MEMORY: u64 = 1 << 30;

/// One received chunk (as decoded, no copy), shared with the threads hashing and
/// authenticating it.
pub type Chunk = bytes::Bytes;

/// The bytes of received blobs all streams may hold in memory at once.
#[derive(Debug)]
pub struct SpoolBudget {
    limit: u64,
    used: AtomicU64,
}

impl SpoolBudget {
    pub fn new(limit: u64) -> Arc<Self> {
        Arc::new(Self {
            limit,
            used: AtomicU64::new(0),
        })
    }

    /// Bytes held in memory now.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    /// Takes `n` bytes of the budget, if it has them.
    fn take(&self, n: u64) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(n).filter(|&total| total <= self.limit)
            })
            .is_ok()
    }

    fn give_back(&self, n: u64) {
        self.used.fetch_sub(n, Ordering::AcqRel);
    }
}

/// A blob being received.
pub struct SpoolWriter {
    budget: Arc<SpoolBudget>,
    /// Where it goes if it outgrows the budget.
    path: PathBuf,
    chunks: Vec<Chunk>,
    held: u64,
    file: Option<File>,
}

impl SpoolWriter {
    pub fn new(budget: Arc<SpoolBudget>, spill_to: &Path) -> Self {
        Self {
            budget,
            path: spill_to.to_path_buf(),
            chunks: Vec::new(),
            held: 0,
            file: None,
        }
    }

    /// Appends `chunk`: kept in memory while the budget has room, else written to the file
    /// (with everything held before it).
    pub fn push(&mut self, chunk: Chunk) -> io::Result<()> {
        if self.file.is_none() {
            if self.budget.take(chunk.len() as u64) {
                self.held += chunk.len() as u64;
                self.chunks.push(chunk);
                return Ok(());
            }
            self.spill()?;
        }
        self.file.as_mut().expect("spilled").write_all(&chunk)
    }

    fn spill(&mut self) -> io::Result<()> {
        use std::os::unix::fs::OpenOptionsExt;
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&self.path)?;
        // Set here, so that a failed write below still has the file deleted on drop.
        for chunk in std::mem::take(&mut self.chunks) {
            let written = file.write_all(&chunk);
            if let Err(e) = written {
                self.file = Some(file);
                return Err(e);
            }
        }
        self.budget.give_back(std::mem::take(&mut self.held));
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
                chunks: std::mem::take(&mut self.chunks),
                bytes: std::mem::take(&mut self.held),
                budget: self.budget.clone(),
            }))),
        }
    }
}

impl Drop for SpoolWriter {
    /// An unfinished blob goes: its memory back to the budget, its file deleted.
    fn drop(&mut self) {
        self.budget.give_back(self.held);
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
        chunks: Vec<Chunk>,
        bytes: u64,
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
            Stored::Memory { bytes, budget, .. } => budget.give_back(*bytes),
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
                chunk: 0,
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
    chunk: usize,
    at: usize,
}

impl Read for MemoryReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let Stored::Memory { chunks, .. } = &*self.blob else {
            unreachable!("a memory reader reads a blob in memory")
        };
        while let Some(chunk) = chunks.get(self.chunk) {
            if self.at < chunk.len() {
                let n = buf.len().min(chunk.len() - self.at);
                buf[..n].copy_from_slice(&chunk[self.at..self.at + n]);
                self.at += n;
                return Ok(n);
            }
            self.chunk += 1;
            self.at = 0;
        }
        Ok(0)
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
            w.push(c).unwrap();
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
        other.push(vec![9; 500].into()).unwrap();
        let path = dir.path().join("b");
        let mut w = SpoolWriter::new(budget.clone(), &path);
        for c in chunks(5, 1000) {
            w.push(c).unwrap();
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

    #[test]
    fn an_unfinished_blob_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let budget = SpoolBudget::new(1500);
        let path = dir.path().join("b");
        let mut w = SpoolWriter::new(budget.clone(), &path);
        for c in chunks(2, 1000) {
            w.push(c).unwrap();
        }
        assert!(path.exists());
        drop(w);
        assert!(!path.exists());
        let mut w = SpoolWriter::new(budget.clone(), &path);
        w.push(vec![1; 1000].into()).unwrap();
        drop(w);
        assert_eq!(budget.used(), 0);
    }
}
