//! A base device: a verified ext4 image encrypted at rest with AES-256-XTS under a per-base
//! key. Read-only; clones are made over it.

use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use super::xts::{XtsCipher, XtsKey, BLOCK};
use super::{check_range, BlockDevice};

/// Encryption chunk when building (256 blocks).
const CHUNK: usize = 256 * BLOCK;

pub struct BaseImage {
    file: File,
    path: PathBuf,
    size: u64,
    cipher: XtsCipher,
    /// The blocks that hold data, as sorted, disjoint `[start, end)` block ranges. Blocks
    /// outside them were holes in the plaintext image: they read as zeros, are neither
    /// encrypted nor stored, and so cost nothing (an ext4 image is mostly free space). The map
    /// lives in memory with the key, never on the storage it describes, so nobody with access
    /// to that storage can punch a hole to make a block read as zeros.
    extents: Vec<(u64, u64)>,
}

/// The data ranges of `file` (from `SEEK_DATA`/`SEEK_HOLE`) as block ranges, widened to whole
/// blocks and merged.
fn data_extents(file: &File, size: u64) -> io::Result<Vec<(u64, u64)>> {
    use rustix::fs::{seek, SeekFrom};
    let block = BLOCK as u64;
    let mut extents: Vec<(u64, u64)> = Vec::new();
    let mut offset = 0u64;
    while offset < size {
        let data = match seek(file, SeekFrom::Data(offset)) {
            Ok(d) => d,
            Err(rustix::io::Errno::NXIO) => break,
            Err(e) => return Err(e.into()),
        };
        let hole = seek(file, SeekFrom::Hole(data))?.min(size);
        let (start, end) = (data / block, hole.div_ceil(block));
        match extents.last_mut() {
            Some(last) if last.1 >= start => last.1 = last.1.max(end),
            _ => extents.push((start, end)),
        }
        offset = hole;
    }
    Ok(extents)
}

/// A base being written: each block is encrypted under the base's key on its way to the
/// file, so the plaintext image never exists anywhere but in the writer's buffer. Blocks that
/// are never written are holes, which read as zeros and cost nothing. The file appears under
/// its name only when [`finish`](Self::finish)ed; dropped unfinished, it is deleted.
pub struct BaseWriter {
    file: File,
    partial: PathBuf,
    dest: PathBuf,
    /// Taken by the finished base.
    cipher: Option<XtsCipher>,
    /// The block ranges written so far, in write order.
    written: Vec<(u64, u64)>,
    /// Where a chunk is encrypted before it is written; wiped after each use.
    scratch: Vec<u8>,
    finished: bool,
    /// Entered for each write: the `base_encrypt` stage of the build.
    span: tracing::Span,
    /// Time spent encrypting and writing.
    busy: std::time::Duration,
}

impl BaseWriter {
    /// Starts the base that will be at `dest` (written to a temporary name beside it).
    pub fn create(dest: &Path, key: XtsKey) -> io::Result<Self> {
        let cipher = XtsCipher::new(key)?;
        let partial = dest.with_extension("partial");
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&partial)?;
        Ok(Self {
            file,
            partial,
            dest: dest.to_path_buf(),
            cipher: Some(cipher),
            written: Vec::new(),
            scratch: vec![0u8; CHUNK],
            finished: false,
            span: crate::metrics::Stage::BaseEncrypt.span(),
            busy: std::time::Duration::ZERO,
        })
    }

    /// Where the base will be.
    pub fn dest(&self) -> &Path {
        &self.dest
    }

    /// Time spent encrypting and writing blocks so far.
    pub fn busy(&self) -> std::time::Duration {
        self.busy
    }

    /// Encrypts whole blocks starting at block `first` and writes them in place.
    pub fn write_blocks(&mut self, first: u64, data: &[u8]) -> io::Result<()> {
        if data.len() % BLOCK != 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{} bytes are not whole {BLOCK}-byte blocks", data.len()),
            ));
        }
        let started = std::time::Instant::now();
        let _encrypting = self.span.enter();
        let cipher = self.cipher.as_ref().expect("not finished");
        for (i, chunk) in data.chunks(CHUNK).enumerate() {
            let block = first + (i * CHUNK / BLOCK) as u64;
            let buf = &mut self.scratch[..chunk.len()];
            buf.copy_from_slice(chunk);
            cipher.encrypt(buf, block);
            let written = self.file.write_all_at(buf, block * BLOCK as u64);
            self.scratch.fill(0);
            written?;
        }
        self.busy += started.elapsed();
        let end = first + (data.len() / BLOCK) as u64;
        match self.written.last_mut() {
            Some(last) if last.1 == first => last.1 = end,
            _ => self.written.push((first, end)),
        }
        Ok(())
    }

    /// The base, `size` bytes (rounded up to whole blocks), under its name. Not synced: a
    /// base is a cache whose key dies with the process, so it never has to survive a crash.
    pub fn finish(mut self, size: u64) -> io::Result<BaseImage> {
        let size = size.div_ceil(BLOCK as u64) * BLOCK as u64;
        let blocks = size / BLOCK as u64;
        if let Some(&(_, end)) = self.written.iter().find(|&&(_, end)| end > blocks) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "block {} was written past the end of a {size}-byte base",
                    end - 1
                ),
            ));
        }
        self.file.set_len(size)?;
        std::fs::rename(&self.partial, &self.dest)?;
        self.finished = true;
        let mut extents = std::mem::take(&mut self.written);
        extents.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::with_capacity(extents.len());
        for (start, end) in extents {
            match merged.last_mut() {
                Some(last) if last.1 >= start => last.1 = last.1.max(end),
                _ => merged.push((start, end)),
            }
        }
        Ok(BaseImage {
            file: File::open(&self.dest)?,
            path: self.dest.clone(),
            size,
            cipher: self.cipher.take().expect("not finished"),
            extents: merged,
        })
    }
}

impl Drop for BaseWriter {
    fn drop(&mut self) {
        self.scratch.fill(0);
        if !self.finished {
            let _ = std::fs::remove_file(&self.partial);
        }
    }
}

impl ext4_image::BlockSink for BaseWriter {
    fn write_blocks(&mut self, first_block: u64, data: &[u8]) -> io::Result<()> {
        BaseWriter::write_blocks(self, first_block, data)
    }
}

impl BaseImage {
    /// Encrypts the plaintext image at `plain` into `dest` under `key` (the size rounded up
    /// to whole blocks with zeros), block for block at the same offsets, skipping holes: an
    /// existing image imported as a base.
    pub fn build(plain: &Path, dest: &Path, key: XtsKey) -> io::Result<Self> {
        let input = File::open(plain)?;
        let plain_size = input.metadata()?.len();
        let extents = data_extents(&input, plain_size)?;
        let mut writer = BaseWriter::create(dest, key)?;
        let mut buf = vec![0u8; CHUNK];
        let result = (|| {
            for &(start, end) in &extents {
                let mut block = start;
                while block < end {
                    let n = ((end - block) as usize).min(CHUNK / BLOCK);
                    let chunk = &mut buf[..n * BLOCK];
                    let offset = block * BLOCK as u64;
                    let avail = (plain_size - offset).min(chunk.len() as u64) as usize;
                    input.read_exact_at(&mut chunk[..avail], offset)?;
                    chunk[avail..].fill(0);
                    writer.write_blocks(block, chunk)?;
                    block += n as u64;
                }
            }
            Ok::<_, io::Error>(())
        })();
        buf.fill(0);
        result?;
        writer.finish(plain_size)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Bytes of the image that are stored (encrypted); the rest are holes.
    pub fn stored_bytes(&self) -> u64 {
        self.extents.iter().map(|(s, e)| e - s).sum::<u64>() * BLOCK as u64
    }

    /// Reads and decrypts whole blocks starting at block `first` into `buf`; blocks in holes
    /// read as zeros.
    pub(crate) fn read_blocks(&self, buf: &mut [u8], first: u64) -> io::Result<()> {
        let last = first + (buf.len() / BLOCK) as u64;
        // The first extent that ends after `first`.
        let mut i = self.extents.partition_point(|&(_, end)| end <= first);
        let mut block = first;
        while block < last {
            let (data_start, data_end) = self.extents.get(i).copied().unwrap_or((last, last));
            let hole_end = data_start.clamp(block, last);
            let at = |b: u64| ((b - first) as usize) * BLOCK;
            buf[at(block)..at(hole_end)].fill(0);
            block = hole_end;
            let data_end = data_end.min(last);
            if block < data_end {
                let range = &mut buf[at(block)..at(data_end)];
                self.file.read_exact_at(range, block * BLOCK as u64)?;
                self.cipher.decrypt(range, block);
                block = data_end;
            }
            i += 1;
        }
        Ok(())
    }
}

impl Drop for BaseImage {
    /// The file is useless without the key, which goes with `self`.
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

impl BlockDevice for BaseImage {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        check_range(self.size, offset, buf.len())?;
        if buf.is_empty() {
            return Ok(());
        }
        let first = offset / BLOCK as u64;
        let end = (offset + buf.len() as u64).div_ceil(BLOCK as u64);
        let mut blocks = vec![0u8; ((end - first) as usize) * BLOCK];
        self.read_blocks(&mut blocks, first)?;
        let skip = (offset - first * BLOCK as u64) as usize;
        buf.copy_from_slice(&blocks[skip..skip + buf.len()]);
        blocks.fill(0);
        Ok(())
    }

    fn write_at(&self, _data: &[u8], _offset: u64) -> io::Result<()> {
        Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "a base image is read-only",
        ))
    }

    fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    fn trim(&self, _offset: u64, _len: u64) -> io::Result<()> {
        Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "a base image is read-only",
        ))
    }

    fn read_only(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    /// A sparse plaintext image: data at the start, in the middle (not block aligned, ending
    /// mid-block) and in the last, partial block; holes between.
    fn sparse_plain(path: &Path) -> Vec<u8> {
        let size = 64 * BLOCK as u64 * 16 + 1000;
        let f = File::create(path).unwrap();
        f.set_len(size).unwrap();
        let mut expect = vec![0u8; size as usize];
        let mut put = |offset: u64, len: usize, byte: u8| {
            let data = vec![byte; len];
            f.write_all_at(&data, offset).unwrap();
            expect[offset as usize..offset as usize + len].copy_from_slice(&data);
        };
        put(0, 3 * BLOCK, 0x11);
        put(300 * BLOCK as u64 + 17, 2 * BLOCK + 5, 0x22);
        put(size - 700, 700, 0x33);
        expect
    }

    #[test]
    fn holes_read_as_zeros_and_are_not_stored() {
        let d = tempfile::tempdir().unwrap();
        let expect = sparse_plain(&d.path().join("plain"));
        let base = BaseImage::build(
            &d.path().join("plain"),
            &d.path().join("base"),
            XtsKey::generate().unwrap(),
        )
        .unwrap();
        assert_eq!(
            base.size(),
            expect.len().div_ceil(BLOCK) as u64 * BLOCK as u64
        );
        // Data blocks only: 3 + 3 (the middle run straddles three blocks) + 1.
        assert_eq!(base.stored_bytes(), 7 * BLOCK as u64);
        let on_disk = std::fs::metadata(base.path()).unwrap().blocks() * 512;
        assert!(on_disk <= 16 * BLOCK as u64, "{on_disk} bytes allocated");
        let mut all = vec![0xffu8; base.size() as usize];
        base.read_at(&mut all, 0).unwrap();
        assert_eq!(&all[..expect.len()], &expect[..]);
        assert!(all[expect.len()..].iter().all(|&b| b == 0));
        // Reads that start and end inside holes, inside data, and across both.
        for (offset, len) in [
            (BLOCK as u64 * 2 + 100, BLOCK * 5),
            (BLOCK as u64 * 299, BLOCK * 4 + 33),
            (BLOCK as u64 * 100, BLOCK),
            (expect.len() as u64 - 900, 900),
        ] {
            let mut buf = vec![0xffu8; len];
            base.read_at(&mut buf, offset).unwrap();
            assert_eq!(buf, expect[offset as usize..offset as usize + len]);
        }
        // No plaintext run is stored.
        let stored = std::fs::read(base.path()).unwrap();
        assert!(!stored.windows(64).any(|w| w.iter().all(|&b| b == 0x22)));
    }
}
