//! Encrypted layers fetched by the IPU itself after a `Verify`, so that containerd's decrypt
//! hook gets plaintext in one pass.
//!
//! Without a copy of its own, the IPU must receive a layer's whole blob from the host and
//! check its HMAC before it may send a byte of plaintext back: the hook's unpack waits for
//! the whole receive first (about 0.17 s per 200 MB here). After a `Verify`, the IPU knows
//! which encrypted layers the host is about to pull, so it fetches them from the registry
//! while containerd fetches its own copies, and checks each one's HMAC as it arrives (the
//! HMAC is in the signed manifest; the key is released by the broker for this tenant and
//! function, and dropped once the HMAC is done). Such a copy is held, ciphertext only, in the
//! spool (memory within `--spool-memory`, else `<state-dir>/spool`).
//!
//! When the hook's blob starts like a held layer, the IPU decrypts its own authenticated copy
//! and streams the plaintext at once, while it compares the host's blob with that copy byte
//! for byte; the trailer (the hook's success) is sent only if the two were equal. No
//! plaintext leaves that was not authenticated first, and what leaves is the plaintext of a
//! layer verified for this tenant and function, which the host would get anyway by sending
//! its whole blob. A host whose blob is another one gets an error, not a trailer.
//!
//! Bounded: at most `limit` bytes of layers are held or being fetched at once (a layer that
//! would pass it is not fetched, and its hook run takes the two-pass way), a copy is used once,
//! and one not used within [`PREFETCH_HOLD`] is dropped.

use std::collections::HashMap;
use std::io::Read;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use audit::{AuditSink, Event, EventKind, Outcome};

use super::spool::{SpoolBudget, SpoolWriter, StoredBlob};
use crate::fetch::ImageSource;
use crate::keys::{KeyFor, KeySource};
use crate::record::AUDIT_SERVICE;
use crate::secret::SecretHome;
use crate::verify::VerifiedImage;

/// How long a fetched copy waits for its hook run.
pub const PREFETCH_HOLD: Duration = Duration::from_secs(300);
/// How long a hook run waits for a copy still being fetched before it takes the two-pass
/// way. The copy is usually ready first: the IPU starts fetching when `Verify` answers, before
/// containerd has fetched the blob it then hands to the hook.
pub const PREFETCH_WAIT: Duration = Duration::from_secs(30);
/// The default of `--hook-prefetch`: off. Where the IPU shares cores with containerd (this
/// project's test machine: 2 cores for containerd, the registry and the IPU), the second
/// download slows containerd's own fetch by about as much as the one-pass hook saves
/// (docs/containerd-hook.md has the figures); an IPU with cores and a network port of its own
/// does not pay that, and should turn it on (`--hook-prefetch 1G`).
pub const DEFAULT_PREFETCH_LIMIT: u64 = 0;
/// The chunk a copy is read and held in.
const CHUNK: usize = 1 << 20;

/// A layer's copy, fetched and authenticated: its ciphertext and the HMAC's verdict over
/// exactly its size.
pub struct HeldLayer {
    pub blob: StoredBlob,
    pub proof: ocicrypt::VerifiedCiphertext,
}

impl std::fmt::Debug for HeldLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HeldLayer")
            .field("size", &self.proof.size())
            .finish_non_exhaustive()
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct SlotKey {
    tenant: String,
    function: String,
    layer: String,
}

enum State<T> {
    Fetching,
    Ready(T),
    /// Fetching failed, or a hook run took the copy.
    Gone,
}

struct Slot<T> {
    state: Mutex<State<T>>,
    changed: Condvar,
    size: u64,
    started: Instant,
}

impl<T> Slot<T> {
    fn expired(&self, now: Instant) -> bool {
        now.duration_since(self.started) > PREFETCH_HOLD
    }
}

/// The copies held or being fetched, by tenant, function and layer digest (what is held is
/// generic for the tests of the bookkeeping alone).
pub struct Prefetches<T = HeldLayer> {
    slots: Mutex<HashMap<SlotKey, Arc<Slot<T>>>>,
    limit: u64,
}

impl<T> Prefetches<T> {
    /// At most `limit` bytes held or being fetched at once; 0 fetches nothing.
    pub fn new(limit: u64) -> Self {
        Self {
            slots: Mutex::new(HashMap::new()),
            limit,
        }
    }

    /// Whether any copy may be fetched at all (`--hook-prefetch` is not 0).
    pub fn enabled(&self) -> bool {
        self.limit > 0
    }

    /// Bytes of layers held or being fetched now.
    #[cfg(test)]
    fn held_bytes(&self) -> u64 {
        let mut slots = self.slots.lock().expect("not poisoned");
        Self::purge(&mut slots, Instant::now());
        slots.values().map(|s| s.size).sum()
    }

    fn purge(slots: &mut HashMap<SlotKey, Arc<Slot<T>>>, now: Instant) {
        slots.retain(|_, s| {
            !s.expired(now) && !matches!(*s.state.lock().expect("not poisoned"), State::Gone)
        });
    }

    /// A slot for a layer of `size` bytes, unless one is there already (held, or being
    /// fetched) or the limit would be passed.
    fn reserve(&self, key: &SlotKey, size: u64) -> Option<Arc<Slot<T>>> {
        let mut slots = self.slots.lock().expect("not poisoned");
        Self::purge(&mut slots, Instant::now());
        let held: u64 = slots.values().map(|s| s.size).sum();
        if !self.enabled() || slots.contains_key(key) || held.saturating_add(size) > self.limit {
            return None;
        }
        let slot = Arc::new(Slot {
            state: Mutex::new(State::Fetching),
            changed: Condvar::new(),
            size,
            started: Instant::now(),
        });
        slots.insert(key.clone(), slot.clone());
        Some(slot)
    }

    /// Takes the copy of `layer` fetched for `tenant` and `function`, waiting up to `wait`
    /// for one still being fetched. `None` when there is none (never fetched, failed,
    /// expired, taken by another hook run, or not ready in time).
    pub fn take(&self, tenant: &str, function: &str, layer: &str, wait: Duration) -> Option<T> {
        let key = SlotKey {
            tenant: tenant.to_string(),
            function: function.to_string(),
            layer: layer.to_string(),
        };
        let slot = {
            let mut slots = self.slots.lock().expect("not poisoned");
            Self::purge(&mut slots, Instant::now());
            slots.get(&key)?.clone()
        };
        let state = slot.state.lock().expect("not poisoned");
        let (mut state, _) = slot
            .changed
            .wait_timeout_while(state, wait, |s| matches!(s, State::Fetching))
            .expect("not poisoned");
        match std::mem::replace(&mut *state, State::Gone) {
            State::Ready(held) => {
                drop(state);
                self.forget(&key, &slot);
                Some(held)
            }
            // Still fetching: it stays for a later run.
            State::Fetching => {
                *state = State::Fetching;
                None
            }
            State::Gone => None,
        }
    }

    /// Removes `key`'s entry if it is still `slot`.
    fn forget(&self, key: &SlotKey, slot: &Arc<Slot<T>>) {
        let mut slots = self.slots.lock().expect("not poisoned");
        if slots.get(key).is_some_and(|s| Arc::ptr_eq(s, slot)) {
            slots.remove(key);
        }
    }

    fn complete(&self, key: &SlotKey, slot: &Arc<Slot<T>>, held: Option<T>) {
        let gone = held.is_none();
        *slot.state.lock().expect("not poisoned") = match held {
            Some(held) => State::Ready(held),
            None => State::Gone,
        };
        slot.changed.notify_all();
        if gone {
            self.forget(key, slot);
        }
    }
}

/// What fetching the encrypted layers of a verified image needs.
pub(crate) struct PrefetchJob {
    pub prefetches: Arc<Prefetches>,
    pub keys: KeySource,
    pub audit: Arc<dyn AuditSink>,
    pub spool_budget: Arc<SpoolBudget>,
    pub spool_dir: std::path::PathBuf,
    pub tenant: String,
    pub function: String,
    pub grant: Option<Arc<str>>,
}

impl PrefetchJob {
    /// Fetches the encrypted layers of `image` on a thread of its own, one after the other,
    /// each into a slot reserved now (so that a hook run that comes before its copy is
    /// complete waits for it rather than taking the two-pass way).
    pub fn start(self, image: VerifiedImage) {
        let slots: Vec<(usize, SlotKey, Arc<Slot<HeldLayer>>)> = image
            .encrypted_layers()
            .filter_map(|layer| {
                let key = SlotKey {
                    tenant: self.tenant.clone(),
                    function: self.function.clone(),
                    layer: layer.descriptor.digest.to_string(),
                };
                let slot = self.prefetches.reserve(&key, layer.descriptor.size)?;
                Some((layer.index, key, slot))
            })
            .collect();
        if slots.is_empty() {
            return;
        }
        let reserved: Vec<(SlotKey, Arc<Slot<HeldLayer>>)> = slots
            .iter()
            .map(|(_, key, slot)| (key.clone(), slot.clone()))
            .collect();
        let prefetches = self.prefetches.clone();
        let spawned = std::thread::Builder::new()
            .name("layer-prefetch".into())
            .spawn(move || {
                for (index, key, slot) in slots {
                    let _span = ops::timings::concurrent_span("prefetch").entered();
                    let held = match self.fetch(&image, index) {
                        Ok(held) => Some(held),
                        Err(why) => {
                            self.record_failure(&image, &key.layer, &why);
                            None
                        }
                    };
                    self.prefetches.complete(&key, &slot, held);
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "no thread to prefetch verified layers; the hook takes the two-pass way");
            // Nobody will fill the slots: a hook run must not wait for them.
            for (key, slot) in reserved {
                prefetches.complete(&key, &slot, None);
            }
        }
    }

    /// One layer's copy: its key released for this tenant and function, its blob read from
    /// the registry in whole chunks through the HMAC (which, in the signed manifest,
    /// authenticates it as the digest would, with one hash pass instead of two) into the
    /// spool, for exactly the descriptor's size.
    fn fetch(&self, image: &VerifiedImage, index: usize) -> Result<HeldLayer, String> {
        let layer = &image.layers[index];
        let d = &layer.descriptor;
        let (image_ref, image_digest) = (
            image.reference.to_string(),
            image.manifest_digest.to_string(),
        );
        let key = self
            .keys
            .release(&KeyFor {
                image: &image_ref,
                image_digest: &image_digest,
                layer: d,
                tenant: &self.tenant,
                function: &self.function,
                grant: self.grant.as_deref(),
            })
            .map_err(|e| format!("the layer key: {e}"))?;
        let mut verifier =
            ocicrypt::CiphertextVerifier::new_in(&key.pubopts, &key.privopts, &SecretHome)
                .map_err(|e| e.to_string())?;
        drop(key);
        let source: &dyn ImageSource = image.source.as_ref();
        let raw = source.open_blob_raw(&d.digest).map_err(|e| e.to_string())?;
        // One byte past the size: a longer blob is noticed, not cut to fit.
        let mut blob = raw.take(d.size.saturating_add(1));
        let mut id = [0u8; 8];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut id)
            .map_err(|_| "no system randomness".to_string())?;
        let mut spool = SpoolWriter::new(
            self.spool_budget.clone(),
            &self
                .spool_dir
                .join(format!("prefetch-{}.blob", hex::encode(id))),
        );
        let mut read = 0u64;
        loop {
            // Whole chunks (a network read hands out less).
            let mut chunk = Vec::with_capacity(CHUNK);
            let n = (&mut blob)
                .take(CHUNK as u64)
                .read_to_end(&mut chunk)
                .map_err(|e| {
                    format!("reading blob {} from {}: {e}", d.digest, source.describe())
                })?;
            if n == 0 {
                break;
            }
            read += n as u64;
            if read > d.size {
                return Err(format!(
                    "{}: blob {} is longer than its declared {} bytes",
                    source.describe(),
                    d.digest,
                    d.size
                ));
            }
            verifier.update(&chunk);
            spool
                .push(&chunk)
                .map_err(|e| format!("holding the copy: {e}"))?;
        }
        let proof = verifier
            .verify()
            .map_err(|e| format!("layer {}: {e}", d.digest))?;
        if proof.size() != d.size {
            return Err(format!(
                "{}: blob {} ended after {} of {} bytes",
                source.describe(),
                d.digest,
                proof.size(),
                d.size
            ));
        }
        let blob = spool
            .finish()
            .map_err(|e| format!("holding the copy: {e}"))?;
        tracing::debug!(layer = %d.digest, bytes = d.size, on_disk = blob.on_disk(), "verified layer prefetched for the decrypt hook");
        Ok(HeldLayer { blob, proof })
    }

    /// A copy that could not be fetched or failed its HMAC: on the record (a blob in the
    /// registry that is not what the signed manifest says is a security event), and the
    /// hook takes the two-pass way.
    fn record_failure(&self, image: &VerifiedImage, layer: &str, why: &str) {
        tracing::warn!(layer, error = why, "prefetching a verified layer failed");
        let event = Event::new(
            AUDIT_SERVICE,
            EventKind::LayerDecrypt,
            Outcome::Failure,
            format!("the IPU's own copy of the layer, fetched after Verify, is not held: {why}"),
        )
        .tenant(self.tenant.clone())
        .function(self.function.clone())
        .image(
            image.reference.to_string(),
            Some(image.manifest_digest.to_string()),
        )
        .detail("layer_digest", layer.to_string())
        .detail("via", "hook-prefetch".to_string());
        if let Err(e) = self.audit.append(event) {
            tracing::error!(error = %e, "the audit log refused a prefetch failure");
        }
    }
}

/// Compares a blob arriving in pieces with a held copy.
pub struct BlobComparison {
    held: Box<dyn Read + Send>,
    size: u64,
    seen: u64,
    buf: Vec<u8>,
    /// The first byte where they differ, once found.
    differs_at: Option<u64>,
}

impl BlobComparison {
    /// Against `held`, the copy of a layer of `size` bytes.
    pub fn new(held: &StoredBlob, size: u64) -> std::io::Result<Self> {
        Ok(Self {
            held: held.reader()?,
            size,
            seen: 0,
            buf: Vec::new(),
            differs_at: None,
        })
    }

    /// The next piece of the arriving blob.
    pub fn update(&mut self, piece: &[u8]) -> std::io::Result<()> {
        if self.differs_at.is_some() {
            return Ok(());
        }
        let within = piece
            .len()
            .min(usize::try_from(self.size - self.seen).unwrap_or(usize::MAX));
        self.buf.resize(within, 0);
        self.held.read_exact(&mut self.buf)?;
        // One memcmp per piece; the byte is looked for only in a piece that differs.
        if self.buf[..] != piece[..within] {
            let i = self.buf.iter().zip(piece).position(|(a, b)| a != b);
            self.differs_at = Some(self.seen + i.expect("they differ") as u64);
        } else if within < piece.len() {
            // Longer than the layer.
            self.differs_at = Some(self.size);
        }
        self.seen += piece.len() as u64;
        Ok(())
    }

    /// The first byte found to differ so far.
    pub fn differs_at(&self) -> Option<u64> {
        self.differs_at
    }

    /// Whether the whole arriving blob was the held copy: `Err` names the first byte that
    /// differs (or where one of the two ended).
    pub fn finish(self) -> Result<(), u64> {
        match self.differs_at {
            Some(at) => Err(at),
            None if self.seen != self.size => Err(self.seen.min(self.size)),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(bytes: &[u8]) -> StoredBlob {
        let budget = SpoolBudget::new(1 << 20);
        let dir = tempfile::tempdir().unwrap();
        let mut w = SpoolWriter::new(budget, &dir.path().join("b"));
        for c in bytes.chunks(3) {
            w.push(c).unwrap();
        }
        w.finish().unwrap()
    }

    fn compare(held: &[u8], pieces: &[&[u8]]) -> Result<(), u64> {
        let mut c = BlobComparison::new(&stored(held), held.len() as u64).unwrap();
        for p in pieces {
            c.update(p).unwrap();
        }
        c.finish()
    }

    #[test]
    fn a_request_waits_for_a_copy_still_being_fetched() {
        let p = Arc::new(Prefetches::<&str>::new(10));
        let key = SlotKey {
            tenant: "t".into(),
            function: "f".into(),
            layer: "a".into(),
        };
        let slot = p.reserve(&key, 1).unwrap();
        let filler = {
            let p = p.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(50));
                p.complete(&key, &slot, Some("copy"));
            })
        };
        assert_eq!(p.take("t", "f", "a", Duration::from_secs(30)), Some("copy"));
        filler.join().unwrap();
    }

    #[test]
    fn only_the_same_bytes_of_the_same_length_compare_equal() {
        let held = b"0123456789";
        assert_eq!(compare(held, &[b"0123", b"", b"456789"]), Ok(()));
        assert_eq!(compare(held, &[b"0123456789"]), Ok(()));
        // A byte changed, in the first or a later piece.
        assert_eq!(compare(held, &[b"x123", b"456789"]), Err(0));
        assert_eq!(compare(held, &[b"0123", b"45678x"]), Err(9));
        // Shorter, longer (in the last piece or in a piece of its own).
        assert_eq!(compare(held, &[b"01234"]), Err(5));
        assert_eq!(compare(held, &[b"0123456789x"]), Err(10));
        assert_eq!(compare(held, &[b"0123456789", b"x"]), Err(10));
        assert_eq!(compare(b"", &[]), Ok(()));
    }

    #[test]
    fn a_slot_is_reserved_once_within_the_limit_and_taken_once() {
        let p = Prefetches::<&str>::new(10);
        let key = |l: &str| SlotKey {
            tenant: "t".into(),
            function: "f".into(),
            layer: l.into(),
        };
        let a = p.reserve(&key("a"), 6).unwrap();
        assert!(p.reserve(&key("a"), 1).is_none(), "one slot per layer");
        assert!(p.reserve(&key("b"), 5).is_none(), "past the limit");
        assert_eq!(p.held_bytes(), 6);
        // Still fetching: not taken (after the wait), and still there.
        assert!(p.take("t", "f", "a", Duration::from_millis(10)).is_none());
        assert_eq!(p.held_bytes(), 6);
        p.complete(&key("a"), &a, Some("copy"));
        // Another tenant's or function's request does not see it.
        assert!(p.take("t", "g", "a", Duration::ZERO).is_none());
        assert!(p.take("u", "f", "a", Duration::ZERO).is_none());
        assert_eq!(p.take("t", "f", "a", Duration::ZERO), Some("copy"));
        assert!(p.take("t", "f", "a", Duration::ZERO).is_none(), "used once");
        assert_eq!(p.held_bytes(), 0);
        // A failed fetch frees its room.
        let b = p.reserve(&key("b"), 10).unwrap();
        p.complete(&key("b"), &b, None);
        assert_eq!(p.held_bytes(), 0);
        assert!(p.take("t", "f", "b", Duration::ZERO).is_none());
    }
}
