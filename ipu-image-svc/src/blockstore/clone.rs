//! A per-function thin clone of a base device.
//!
//! The clone's data file is sparse and as large as the base. A cluster ([`CLUSTER`]) is
//! either unwritten, read from the base, or written, in which case the whole cluster lives in
//! the clone's file encrypted under the clone's own random XTS key. That key exists only in
//! this process's secret memory: [`CloneDevice::erase`] revokes the device (every later I/O
//! fails), drops the key (zeroized) and renames the file to a leftover; a crash of the process
//! loses the key the same way, so whatever is left on disk is unreadable. The erased file's
//! blocks are then freed by whoever holds the [`Erasure`] (the service, off the teardown path).

use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use super::base::BaseImage;
use super::xts::{XtsCipher, XtsKey, BLOCK};
use super::{check_range, BlockDevice, CLUSTER};

const BLOCKS_PER_CLUSTER: u64 = CLUSTER / BLOCK as u64;

/// What an erase did, for its audit event.
#[derive(Debug, PartialEq, Eq)]
pub struct Erasure {
    pub clone_id: String,
    /// The clone key's identifier (random, not derived from the key).
    pub key_id: String,
    /// Clusters that had been written (and were destroyed with the key).
    pub clusters_written: u64,
    /// The clone's former data file, renamed: unreadable noise now, still taking space until
    /// [`Erasure::reclaim`] (freeing a large file's blocks takes time in proportion to them,
    /// so a service does it off the teardown path).
    pub leftover: Option<PathBuf>,
}

impl Erasure {
    /// Frees the leftover's blocks and deletes it.
    pub fn reclaim(&mut self) -> io::Result<()> {
        if let Some(path) = self.leftover.take() {
            reclaim(&path)?;
        }
        Ok(())
    }
}

/// Deletes a leftover file of an erased clone (truncated first: its blocks go even if a
/// handle is still open somewhere).
pub fn reclaim(path: &Path) -> io::Result<()> {
    match std::fs::OpenOptions::new().write(true).open(path) {
        Ok(f) => f.set_len(0)?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    }
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// The suffix of an erased clone's leftover file.
pub const LEFTOVER_EXTENSION: &str = "erased";

struct State {
    /// `None` once erased: every I/O fails from then on.
    cipher: Option<XtsCipher>,
    written: Vec<bool>,
}

pub struct CloneDevice {
    id: String,
    key_id: String,
    base: Arc<BaseImage>,
    /// At least the base's size; past the base, unwritten clusters read as zeros.
    size: u64,
    file: File,
    path: PathBuf,
    state: RwLock<State>,
}

fn random_hex(n: usize) -> String {
    let mut b = vec![0u8; n];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b)
        .expect("system randomness");
    hex::encode(b)
}

fn erased() -> io::Error {
    io::Error::new(
        io::ErrorKind::NotConnected,
        "the clone was torn down and erased",
    )
}

impl CloneDevice {
    /// A new clone of `base` with a fresh key; its data file is created in `dir` (mode 0600).
    /// The device is `size` bytes (whole blocks), or the base's size if that is larger: room
    /// past the base is for the host to grow the file system into.
    pub fn create(base: Arc<BaseImage>, dir: &Path, id: &str, size: u64) -> io::Result<Self> {
        let size = size.div_ceil(BLOCK as u64) * BLOCK as u64;
        let size = size.max(base.size());
        let cipher = XtsCipher::new(XtsKey::generate()?)?;
        let path = dir.join(format!("{id}.clone"));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)?;
        file.set_len(size)?;
        let clusters = size.div_ceil(CLUSTER) as usize;
        Ok(Self {
            id: id.to_string(),
            key_id: random_hex(16),
            base,
            size,
            file,
            path,
            state: RwLock::new(State {
                cipher: Some(cipher),
                written: vec![false; clusters],
            }),
        })
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn key_id(&self) -> &str {
        &self.key_id
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The plaintext of cluster `c` (its in-device byte range is clipped to the size).
    fn read_cluster(&self, state: &State, c: u64, buf: &mut [u8]) -> io::Result<()> {
        let cipher = state.cipher.as_ref().ok_or_else(erased)?;
        let first = c * BLOCKS_PER_CLUSTER;
        if state.written[c as usize] {
            self.file.read_exact_at(buf, first * BLOCK as u64)?;
            cipher.decrypt(buf, first);
            Ok(())
        } else {
            // From the base as far as it goes, zeros past it.
            let base_blocks = self.base.size() / BLOCK as u64;
            let from_base = (base_blocks.saturating_sub(first) as usize * BLOCK).min(buf.len());
            buf[from_base..].fill(0);
            if from_base > 0 {
                self.base.read_blocks(&mut buf[..from_base], first)?;
            }
            Ok(())
        }
    }

    /// Bytes of cluster `c` inside the device.
    fn cluster_len(&self, c: u64) -> usize {
        (self.size - c * CLUSTER).min(CLUSTER) as usize
    }

    /// Revokes the device and destroys its key: from here on the clone's data is unreadable
    /// (cryptographic erase). Its file is renamed to a leftover the caller reclaims
    /// ([`Erasure::reclaim`]). Idempotent: a second call finds nothing and says `None`.
    pub fn erase(&self) -> io::Result<Option<Erasure>> {
        let mut state = self.state.write().expect("not poisoned");
        let Some(cipher) = state.cipher.take() else {
            return Ok(None);
        };
        // The key is zeroized here; the file's remaining bytes are noise from now on.
        drop(cipher);
        let clusters_written = state.written.iter().filter(|w| **w).count() as u64;
        state.written.iter_mut().for_each(|w| *w = false);
        let leftover = self.path.with_extension(LEFTOVER_EXTENSION);
        let leftover = match std::fs::rename(&self.path, &leftover) {
            Ok(()) => Some(leftover),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(e),
        };
        Ok(Some(Erasure {
            clone_id: self.id.clone(),
            key_id: self.key_id.clone(),
            clusters_written,
            leftover,
        }))
    }

    /// A copy of the clone's key (64 bytes), for tests that look for it in the process's
    /// memory after the erase; `None` once erased. Not for anything else.
    #[doc(hidden)]
    pub fn copy_key_for_tests(&self, out: &mut [u8; 64]) -> Option<()> {
        let state = self.state.read().expect("not poisoned");
        state.cipher.as_ref()?.copy_key_for_tests(out);
        Some(())
    }

    /// Whether the clone was erased.
    pub fn is_erased(&self) -> bool {
        self.state.read().expect("not poisoned").cipher.is_none()
    }
}

impl BlockDevice for CloneDevice {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        check_range(self.size(), offset, buf.len())?;
        let state = self.state.read().expect("not poisoned");
        if state.cipher.is_none() {
            return Err(erased());
        }
        let mut cluster = vec![0u8; CLUSTER as usize];
        let mut done = 0usize;
        while done < buf.len() {
            let at = offset + done as u64;
            let c = at / CLUSTER;
            let within = (at - c * CLUSTER) as usize;
            let len = self.cluster_len(c);
            let n = (len - within).min(buf.len() - done);
            self.read_cluster(&state, c, &mut cluster[..len])?;
            buf[done..done + n].copy_from_slice(&cluster[within..within + n]);
            done += n;
        }
        cluster.fill(0);
        Ok(())
    }

    fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        check_range(self.size(), offset, data.len())?;
        let mut state = self.state.write().expect("not poisoned");
        if state.cipher.is_none() {
            return Err(erased());
        }
        let mut cluster = vec![0u8; CLUSTER as usize];
        let mut done = 0usize;
        while done < data.len() {
            let at = offset + done as u64;
            let c = at / CLUSTER;
            let within = (at - c * CLUSTER) as usize;
            let len = self.cluster_len(c);
            let n = (len - within).min(data.len() - done);
            // Copy on write: the rest of the cluster comes from where it lives now.
            if n < len {
                self.read_cluster(&state, c, &mut cluster[..len])?;
            }
            cluster[within..within + n].copy_from_slice(&data[done..done + n]);
            let first = c * BLOCKS_PER_CLUSTER;
            let cipher = state.cipher.as_ref().expect("checked above");
            cipher.encrypt(&mut cluster[..len], first);
            self.file
                .write_all_at(&cluster[..len], first * BLOCK as u64)?;
            state.written[c as usize] = true;
            done += n;
        }
        cluster.fill(0);
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        if self.is_erased() {
            return Err(erased());
        }
        self.file.sync_data()
    }

    fn trim(&self, offset: u64, len: u64) -> io::Result<()> {
        check_range(self.size(), offset, len as usize)?;
        let mut state = self.state.write().expect("not poisoned");
        if state.cipher.is_none() {
            return Err(erased());
        }
        // Whole clusters only: they fall back to the base and their blocks are freed.
        let first = offset.div_ceil(CLUSTER);
        let end = (offset + len) / CLUSTER;
        for c in first..end {
            if state.written[c as usize] {
                rustix::fs::fallocate(
                    &self.file,
                    rustix::fs::FallocateFlags::PUNCH_HOLE | rustix::fs::FallocateFlags::KEEP_SIZE,
                    c * CLUSTER,
                    CLUSTER,
                )?;
                state.written[c as usize] = false;
            }
        }
        Ok(())
    }

    fn read_only(&self) -> bool {
        false
    }
}

impl Drop for CloneDevice {
    fn drop(&mut self) {
        // A clone never outlives its process's memory of the key: dropped means erased.
        if let Ok(Some(mut erasure)) = self.erase() {
            let _ = erasure.reclaim();
        }
    }
}
