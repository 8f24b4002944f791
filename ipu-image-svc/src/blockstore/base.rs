//! A base device: a verified ext4 image encrypted at rest with AES-256-XTS under a per-base
//! key. Read-only; clones are made over it.

use std::fs::File;
use std::io::{self, Read, Write};
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
}

impl BaseImage {
    /// Encrypts the plaintext image at `plain` into `dest` under `key` (the size rounded up
    /// to whole blocks with zeros). `dest` appears only complete (written to a temporary name,
    /// synced, renamed).
    pub fn build(plain: &Path, dest: &Path, key: XtsKey) -> io::Result<Self> {
        let cipher = XtsCipher::new(key);
        let mut input = File::open(plain)?;
        let tmp = dest.with_extension("partial");
        let mut out = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        let result = (|| {
            let mut buf = vec![0u8; CHUNK];
            let mut block = 0u64;
            loop {
                let mut filled = 0;
                while filled < CHUNK {
                    let n = input.read(&mut buf[filled..])?;
                    if n == 0 {
                        break;
                    }
                    filled += n;
                }
                if filled == 0 {
                    break;
                }
                let whole = filled.div_ceil(BLOCK) * BLOCK;
                buf[filled..whole].fill(0);
                cipher.encrypt(&mut buf[..whole], block);
                out.write_all(&buf[..whole])?;
                block += (whole / BLOCK) as u64;
                if filled < CHUNK {
                    break;
                }
            }
            buf.fill(0);
            out.sync_all()?;
            Ok::<_, io::Error>(block * BLOCK as u64)
        })();
        let size = match result {
            Ok(size) => size,
            Err(e) => {
                let _ = std::fs::remove_file(&tmp);
                return Err(e);
            }
        };
        std::fs::rename(&tmp, dest)?;
        Ok(Self {
            file: File::open(dest)?,
            path: dest.to_path_buf(),
            size,
            cipher,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Reads and decrypts whole blocks starting at block `first` into `buf`.
    pub(crate) fn read_blocks(&self, buf: &mut [u8], first: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, first * BLOCK as u64)?;
        self.cipher.decrypt(buf, first);
        Ok(())
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
