//! Memory for key material that ordinary memory must not hold.
//!
//! `memfd_secret(2)` pages are removed from the kernel's direct map, never swapped and not
//! in core dumps. Where the kernel lacks it (`ENOSYS`), the fallback is an anonymous
//! mapping that is locked (`mlock`, no swap) and excluded from core dumps
//! (`MADV_DONTDUMP`). Either way the bytes are zeroed before the pages are unmapped.

use std::io;
use std::ptr::NonNull;

/// `memfd_secret` on x86_64 (no libc wrapper in Debian 12's glibc).
#[cfg(target_arch = "x86_64")]
const SYS_MEMFD_SECRET: libc::c_long = 447;

/// Which protection a [`SecretBuf`] got.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protection {
    /// `memfd_secret` pages.
    SecretMemory,
    /// Locked anonymous pages excluded from core dumps.
    LockedNoDump,
}

/// A fixed-size secret buffer. Neither `Clone` nor `Debug`: its bytes leave only through
/// [`SecretBuf::as_slice`].
pub struct SecretBuf {
    ptr: NonNull<u8>,
    len: usize,
    protection: Protection,
}

// SAFETY: the buffer is plain memory owned by this value; access goes through &self/&mut self.
unsafe impl Send for SecretBuf {}
// SAFETY: shared access only reads.
unsafe impl Sync for SecretBuf {}

impl SecretBuf {
    /// A zeroed buffer of `len` bytes (at least one page is mapped).
    pub fn new(len: usize) -> io::Result<Self> {
        if len == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "an empty secret buffer",
            ));
        }
        match Self::secret_memory(len) {
            Ok(b) => Ok(b),
            Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => Self::locked(len),
            Err(e) => Err(e),
        }
    }

    #[cfg(target_arch = "x86_64")]
    fn secret_memory(len: usize) -> io::Result<Self> {
        // SAFETY: memfd_secret takes one flags argument and returns a new fd or -1.
        let fd = unsafe { libc::syscall(SYS_MEMFD_SECRET, 0u32) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let fd = fd as libc::c_int;
        // SAFETY: fd is the descriptor we just got; ftruncate sets the secret area's size.
        let sized = unsafe { libc::ftruncate(fd, len as libc::off_t) };
        let result = if sized != 0 {
            Err(io::Error::last_os_error())
        } else {
            // SAFETY: a new shared mapping of our own fd; the kernel picks the address.
            let p = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    len,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_SHARED,
                    fd,
                    0,
                )
            };
            if p == libc::MAP_FAILED {
                Err(io::Error::last_os_error())
            } else {
                Ok(Self {
                    ptr: NonNull::new(p.cast()).expect("mmap does not return null"),
                    len,
                    protection: Protection::SecretMemory,
                })
            }
        };
        // SAFETY: the mapping keeps the memory; the fd is no longer needed.
        unsafe { libc::close(fd) };
        result
    }

    #[cfg(not(target_arch = "x86_64"))]
    fn secret_memory(_len: usize) -> io::Result<Self> {
        Err(io::Error::from_raw_os_error(libc::ENOSYS))
    }

    fn locked(len: usize) -> io::Result<Self> {
        // SAFETY: a new private anonymous mapping; the kernel picks the address.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let buf = Self {
            ptr: NonNull::new(p.cast()).expect("mmap does not return null"),
            len,
            protection: Protection::LockedNoDump,
        };
        // SAFETY: p..p+len is the mapping made above (owned by `buf`, unmapped on drop).
        let locked = unsafe { libc::mlock(p, len) } == 0;
        // SAFETY: the same mapping; advice changes no memory contents.
        if !locked || unsafe { libc::madvise(p, len, libc::MADV_DONTDUMP) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(buf)
    }

    pub fn protection(&self) -> Protection {
        self.protection
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        false
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: ptr..ptr+len is our live mapping, readable and writable.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as above, and &mut self gives exclusive access.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }

    /// The start address (tests look the mapping up in /proc/self/smaps).
    pub fn address(&self) -> usize {
        self.ptr.as_ptr() as usize
    }
}

impl Drop for SecretBuf {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(self.as_mut_slice());
        // SAFETY: unmapping exactly the mapping this value owns; nothing refers to it after.
        unsafe {
            if self.protection == Protection::LockedNoDump {
                libc::munlock(self.ptr.as_ptr().cast(), self.len);
            }
            libc::munmap(self.ptr.as_ptr().cast(), self.len);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The smaps entry of the mapping starting at `addr`.
    fn smaps_entry(addr: usize) -> String {
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let start = format!("{addr:x}-");
        let mut lines = smaps.lines().skip_while(|l| !l.starts_with(&start));
        let mut entry = String::new();
        if let Some(first) = lines.next() {
            entry.push_str(first);
            entry.push('\n');
            for l in lines.take_while(|l| !l.contains('-') || l.contains(':')) {
                entry.push_str(l);
                entry.push('\n');
                if l.starts_with("VmFlags") {
                    break;
                }
            }
        }
        entry
    }

    #[test]
    fn secret_memory_or_locked_pages_hold_the_bytes() {
        let mut b = SecretBuf::new(64).unwrap();
        b.as_mut_slice().copy_from_slice(&[0x5a; 64]);
        assert_eq!(b.as_slice(), &[0x5a; 64]);
        let entry = smaps_entry(b.address());
        match b.protection() {
            // The kernel names these mappings after secretmem.
            Protection::SecretMemory => assert!(entry.contains("secretmem"), "{entry}"),
            Protection::LockedNoDump => {
                let flags = entry
                    .lines()
                    .find(|l| l.starts_with("VmFlags"))
                    .unwrap_or("");
                assert!(flags.contains(" lo") && flags.contains(" dd"), "{entry}");
            }
        }
        assert!(SecretBuf::new(0).is_err());
    }

    #[test]
    fn the_fallback_locks_and_excludes_from_dumps() {
        let b = SecretBuf::locked(4096).unwrap();
        let entry = smaps_entry(b.address());
        let flags = entry.lines().find(|l| l.starts_with("VmFlags")).unwrap();
        assert!(flags.contains(" lo") && flags.contains(" dd"), "{entry}");
    }
}
