//! Content-addressed blob cache that only ever holds verified blobs.
//!
//! A blob is streamed into a temporary file in the cache directory and renamed to
//! `blobs/sha256/<hex>` only after its size and digest matched. A cached blob is hashed again
//! before use, so a file corrupted at rest is refetched rather than trusted.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use policy::reference::Digest;

use super::{open_blob, Descriptor, FetchError, FetchErrorClass, ImageSource};

#[derive(Clone, Debug)]
pub struct BlobCache {
    dir: PathBuf,
}

fn io_err(what: &str, path: &Path, e: io::Error) -> FetchError {
    FetchError::new(
        FetchErrorClass::Io,
        format!("blob cache: {what} {}: {e}", path.display()),
    )
}

impl BlobCache {
    /// Opens (creating it with mode 0700) a cache directory.
    pub fn new(dir: &Path) -> Result<Self, FetchError> {
        let blobs = dir.join("blobs/sha256");
        fs::create_dir_all(&blobs).map_err(|e| io_err("cannot create", &blobs, e))?;
        use std::os::unix::fs::PermissionsExt;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
            .map_err(|e| io_err("cannot set mode on", dir, e))?;
        Ok(Self {
            dir: dir.to_path_buf(),
        })
    }

    pub fn path_of(&self, digest: &Digest) -> PathBuf {
        self.dir
            .join("blobs")
            .join(digest.algorithm())
            .join(digest.hex())
    }

    /// The verified local path of `desc`, fetching it from `source` if needed.
    /// `progress(done, total)` is called as bytes arrive.
    pub fn fetch(
        &self,
        source: &dyn ImageSource,
        desc: &Descriptor,
        progress: &dyn Fn(u64, u64),
    ) -> Result<PathBuf, FetchError> {
        let path = self.path_of(&desc.digest);
        if path.exists() {
            if self.still_valid(&path, desc)? {
                progress(desc.size, desc.size);
                return Ok(path);
            }
            tracing::warn!(digest = %desc.digest, "cached blob is corrupt; fetching it again");
            fs::remove_file(&path).map_err(|e| io_err("cannot remove corrupt", &path, e))?;
        }
        let mut reader = open_blob(source, desc)?;
        let dir = path.parent().expect("blob path has a parent");
        let mut tmp = tempfile::Builder::new()
            .prefix(".partial-")
            .tempfile_in(dir)
            .map_err(|e| io_err("cannot create temp file in", dir, e))?;
        let mut buf = vec![0u8; 256 * 1024];
        let mut done = 0u64;
        loop {
            let n = reader
                .read(&mut buf)
                .map_err(|e| FetchError::from_io(e, &format!("reading blob {}", desc.digest)))?;
            if n == 0 {
                break;
            }
            tmp.write_all(&buf[..n])
                .map_err(|e| io_err("cannot write", tmp.path(), e))?;
            done += n as u64;
            progress(done, desc.size);
        }
        // Verified by the reader at EOF; only now does it get its content address. Not
        // synced: a cached blob is hashed again before each use (and by the build as it
        // reads it), so one a crash left short or corrupt is fetched again.
        tmp.persist(&path)
            .map_err(|e| io_err("cannot store", &path, e.error))?;
        Ok(path)
    }

    /// Where a blob not yet cached is kept once a build has read all of it: `reader` (the
    /// blob as its digest check passes it) copied into a partial file of the cache as it is
    /// read, and given its content address when `reader` ends, which it does only after the
    /// whole blob matched its digest. Dropped before that, the partial file goes.
    pub fn tee<R: Read>(&self, desc: &Descriptor, reader: R) -> Result<CacheTee<R>, FetchError> {
        let path = self.path_of(&desc.digest);
        let dir = path.parent().expect("blob path has a parent");
        let partial = tempfile::Builder::new()
            .prefix(".partial-")
            .tempfile_in(dir)
            .map_err(|e| io_err("cannot create temp file in", dir, e))?;
        Ok(CacheTee {
            inner: reader,
            partial: Some(partial),
            dest: path,
        })
    }

    fn still_valid(&self, path: &Path, desc: &Descriptor) -> Result<bool, FetchError> {
        let mut file = File::open(path).map_err(|e| io_err("cannot open", path, e))?;
        let len = file
            .metadata()
            .map_err(|e| io_err("cannot stat", path, e))?
            .len();
        if len != desc.size {
            return Ok(false);
        }
        let digest = super::digest_of(&mut file).map_err(|e| io_err("cannot read", path, e))?;
        Ok(digest == desc.digest)
    }
}

/// A verified blob's reader that keeps a copy in the cache ([`BlobCache::tee`]).
pub struct CacheTee<R> {
    inner: R,
    /// Until the blob ended.
    partial: Option<tempfile::NamedTempFile>,
    dest: PathBuf,
}

impl<R: Read> Read for CacheTee<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        let Some(partial) = self.partial.as_mut() else {
            return Ok(n);
        };
        if n > 0 {
            if let Err(e) = partial.write_all(&buf[..n]) {
                // The build goes on; only the copy is lost.
                tracing::warn!(path = %self.dest.display(), error = %e, "cannot keep a blob in the cache");
                self.partial = None;
            }
        } else if let Some(partial) = self.partial.take() {
            // The end, past the digest check: the copy is the verified blob. Not synced (a
            // cached blob is checked again whenever it is read).
            if let Err(e) = partial.persist(&self.dest) {
                tracing::warn!(path = %self.dest.display(), error = %e.error, "cannot keep a blob in the cache");
            }
        }
        Ok(n)
    }
}
