//! The allocator tuning of processes that stream layers in 1 MiB chunks.
//!
//! glibc's malloc hands blocks this large back to the kernel when they are freed (each from
//! `mmap`, or by trimming the heap) and gets fresh zeroed pages for the next, a page fault per
//! 4 KiB: a 200 MB layer through the decrypt hook is 200 chunks each way, about 10,000 faults
//! in the hook and more in the service, measured here at 1.5 µs each. Kept, the freed chunks
//! serve the next ones.

/// Largest block malloc serves from its heap rather than from its own `mmap`.
const MMAP_THRESHOLD: libc::c_int = 64 << 20;
/// Free memory at a heap's top that malloc keeps rather than returning it.
const TRIM_THRESHOLD: libc::c_int = 256 << 20;

/// Has malloc keep freed chunks for reuse (up to [`TRIM_THRESHOLD`] bytes free per heap).
/// For long-running streamers: the daemon (`ipu-image-svc serve`) and the decrypt hook; not
/// for the one-shot `image unpack`, whose peak memory is a figure of its own. Call it early,
/// before the streaming starts (the settings are process-wide).
pub fn reuse_freed_chunks() {
    // SAFETY: mallopt only sets malloc's tuning parameters; a value it does not take is
    // refused (returns 0) and the default stays.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
        libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD);
    }
}
