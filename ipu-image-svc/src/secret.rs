//! Memory for key material that ordinary memory must not hold.
//!
//! `memfd_secret(2)` pages are removed from the kernel's direct map, never swapped and not
//! in core dumps. Where the kernel lacks it (`ENOSYS`), the fallback is an anonymous
//! mapping that is locked (`mlock`, no swap) and excluded from core dumps
//! (`MADV_DONTDUMP`). Either way the bytes are zeroed before the pages are unmapped.
//!
//! [`SecretBox`] keeps a value (a key schedule, a MAC state) in such memory, and
//! [`SecretHome`] lets ocicrypt put a layer decryptor's state there.

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

/// A `T` kept in its own [`SecretBuf`] mapping: key schedules and MAC states, which are as
/// good as the key they came from (AES-256's first two round keys *are* the key).
///
/// The value is built by `make` and written straight into the mapping; the stack below the
/// constructor, where the building left temporaries, is then overwritten
/// ([`ocicrypt::scrub_stack`]). The value never moves again (the box is a pointer). On drop
/// it is dropped in place (the `aes`/`ctr` `zeroize` features wipe the round keys), then the
/// whole mapping is zeroized and unmapped by the `SecretBuf`, so a type that does not wipe
/// itself (HMAC states) is wiped anyway. Access is a pointer dereference: no cost per use.
pub struct SecretBox<T> {
    buf: SecretBuf,
    _owns: std::marker::PhantomData<T>,
}

// SAFETY: the box owns its T exclusively (like Box<T>): sending it sends the T.
unsafe impl<T: Send> Send for SecretBox<T> {}
// SAFETY: shared access hands out &T only (like Box<T>).
unsafe impl<T: Sync> Sync for SecretBox<T> {}

/// Mappings are page aligned; a T needing more alignment than a page is refused.
const PAGE: usize = 4096;

impl<T> SecretBox<T> {
    /// Maps secret memory for a `T` and writes `make()` into it.
    #[inline(always)]
    pub fn new_with(make: impl FnOnce() -> T) -> io::Result<Self> {
        if std::mem::align_of::<T>() > PAGE {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a secret box's value needs more than page alignment",
            ));
        }
        let mut buf = SecretBuf::new(std::mem::size_of::<T>().max(1))?;
        let p = buf.as_mut_slice().as_mut_ptr().cast::<T>();
        assert!(p.is_aligned(), "mappings are page aligned");
        // SAFETY: p is the start of a fresh, exclusively owned, writable mapping of at least
        // size_of::<T>() bytes, aligned for T (checked above); nothing was there to drop.
        unsafe { p.write(make()) };
        ocicrypt::scrub_stack();
        Ok(Self {
            buf,
            _owns: std::marker::PhantomData,
        })
    }

    /// Which protection the value got.
    pub fn protection(&self) -> Protection {
        self.buf.protection()
    }

    fn ptr(&self) -> *mut T {
        self.buf.ptr.as_ptr().cast()
    }
}

impl<T> std::ops::Deref for SecretBox<T> {
    type Target = T;
    fn deref(&self) -> &T {
        // SAFETY: the mapping holds the T written by new_with until drop; &self is shared.
        unsafe { &*self.ptr() }
    }
}

impl<T> std::ops::DerefMut for SecretBox<T> {
    fn deref_mut(&mut self) -> &mut T {
        // SAFETY: as above, and &mut self gives exclusive access.
        unsafe { &mut *self.ptr() }
    }
}

impl<T> Drop for SecretBox<T> {
    fn drop(&mut self) {
        // SAFETY: the T written by new_with is still there and dropped exactly once, here;
        // the SecretBuf then zeroizes and unmaps its bytes.
        unsafe { std::ptr::drop_in_place(self.ptr()) };
    }
}

/// Puts an ocicrypt decryptor's key-dependent state (the layer's AES-CTR round keys, its
/// HMAC state) in secret memory, one [`SecretBox`] each, for as long as the layer decrypts:
/// a few system calls per layer, none per byte.
#[derive(Clone, Copy, Debug, Default)]
pub struct SecretHome;

impl ocicrypt::StateHome for SecretHome {
    fn place<T: Send + 'static>(
        &self,
        make: impl FnOnce() -> T,
    ) -> io::Result<ocicrypt::Placed<T>> {
        Ok(Box::new(SecretBox::new_with(make)?))
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
