//! Where the layer cipher's key-dependent state lives, and how it is wiped.
//!
//! A layer key expands into state that is as good as the key: AES-256's encryption schedule
//! starts with the raw key (round keys 0 and 1 are its two halves) and the HMAC's inner and
//! outer SHA-256 states forge tags. This crate keeps that state
//!
//! - behind a pointer for its whole life (a [`StateHome`] places it: on the heap by default,
//!   in the caller's secret memory when the caller has some; this crate has no unsafe code,
//!   so it cannot map such memory itself), so moving a decryptor never leaves a copy behind;
//! - wiped when dropped: `aes` and `ctr` are built with their `zeroize` features (the round
//!   keys and the buffered keystream), and [`WipedHmac`] overwrites the HMAC state, which
//!   hmac 0.12 and sha2 0.10 do not wipe themselves;
//! - and off the stack: building a key schedule leaves copies in the dead stack frames of the
//!   functions that computed it (many, in unoptimized builds), so [`scrub_stack`] overwrites
//!   the stack below the caller once the state is in its home.

use std::io;
use std::ops::DerefMut;

use hmac::digest::{FixedOutput, Output};
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Key-dependent state in its home: dereferences to the state, wipes and frees it on drop.
pub type Placed<T> = Box<dyn DerefMut<Target = T> + Send>;

/// Where a decryptor's key-dependent state (the AES-CTR round keys, the HMAC state) is put.
pub trait StateHome {
    /// Puts the value `make` returns in its home. `make` is called once; its result should be
    /// written straight into the home (no other copy is kept).
    fn place<T: Send + 'static>(&self, make: impl FnOnce() -> T) -> io::Result<Placed<T>>;
}

/// The ordinary heap: the state is wiped by its own `Drop` before the memory is freed.
#[derive(Clone, Copy, Debug, Default)]
pub struct HeapHome;

impl StateHome for HeapHome {
    fn place<T: Send + 'static>(&self, make: impl FnOnce() -> T) -> io::Result<Placed<T>> {
        Ok(Box::new(Box::new(make())))
    }
}

/// Bytes of stack [`scrub_stack`] overwrites below its caller's frame: more than the deepest
/// key setup here (AES key expansion, HMAC keying, base64 decoding) uses even unoptimized.
const SCRUB_BYTES: usize = 32 * 1024;

/// Overwrites the stack below the caller's frame with zeros, where the functions it called
/// last left their locals: copies of key bytes and round keys among them after a key setup.
/// A plain memset the compiler must keep (the array escapes through `black_box`): about a
/// microsecond, done once per key setup, never per block.
#[inline(never)]
pub fn scrub_stack() {
    let mut area = [0u8; SCRUB_BYTES];
    std::hint::black_box(&mut area);
}

/// Bytes a decryptor overwrites when it is dropped: the CTR keystream was generated in the
/// frames of the `read` calls below its caller (an unoptimized `aes` backend spills round
/// keys there; reading through a decompressor and a tar reader puts those frames deeper).
/// Once per layer, a few microseconds.
const SCRUB_AT_END_BYTES: usize = 128 * 1024;

/// [`scrub_stack`], deeper: once when a decryptor is done.
#[inline(never)]
pub(crate) fn scrub_stack_at_end() {
    let mut area = [0u8; SCRUB_AT_END_BYTES];
    std::hint::black_box(&mut area);
}

type HmacSha256 = Hmac<Sha256>;

/// HMAC-SHA256 whose state is overwritten when it is dropped or finalized.
pub(crate) struct WipedHmac(HmacSha256);

impl WipedHmac {
    pub(crate) fn new(key: &[u8]) -> Self {
        Self(<HmacSha256 as Mac>::new_from_slice(key).expect("any key size"))
    }

    pub(crate) fn update(&mut self, data: &[u8]) {
        self.0.update(data);
    }

    /// The tag; the state is wiped, so the value must not be used again (it is a MAC of
    /// nothing under a zero key from then on).
    pub(crate) fn finalize_and_wipe(&mut self) -> [u8; 32] {
        let mut out = Output::<HmacSha256>::default();
        // `finalize_into` takes the state by value: the stack it passes through is
        // overwritten when the decryptor ends (`scrub_stack_at_end`).
        FixedOutput::finalize_into(std::mem::replace(&mut self.0, blank()), &mut out);
        self.wipe();
        out.into()
    }

    /// Replaces the state in place by the state of a zero key (no secret), and keeps the
    /// compiler from dropping that store as dead: hmac 0.12 has no `zeroize`.
    fn wipe(&mut self) {
        self.0 = blank();
        std::hint::black_box(&mut self.0);
    }
}

fn blank() -> HmacSha256 {
    <HmacSha256 as Mac>::new_from_slice(&[0u8; 32]).expect("any key size")
}

impl Drop for WipedHmac {
    fn drop(&mut self) {
        self.wipe();
    }
}
