//! The layers of images verified per tenant and function, which the decrypt hook's blobs are
//! matched against.
//!
//! Bounded in number: the host names the function, so without a bound a host could grow it
//! without end by verifying under ever new names; past the bound the layers remembered
//! longest ago are forgotten. Bounded in time: a verification answers for the policy and
//! the signatures as they were then, so it is good for a while (a pull follows it), not
//! forever. Either way the image must then be verified again.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use crate::fetch::Descriptor;

/// How many (layer, tenant, function) entries are remembered at most.
pub(crate) const MAX_KNOWN_LAYERS: usize = 16_384;

/// How long a verification lets the hook's blobs be decrypted, by default.
pub const DEFAULT_VERIFIED_LAYER_TTL: Duration = Duration::from_secs(15 * 60);

/// A layer of an image verified for a tenant and function.
#[derive(Clone, Debug)]
pub(crate) struct KnownLayer {
    pub tenant: String,
    pub function: String,
    pub image: String,
    pub image_digest: String,
    pub descriptor: Descriptor,
    /// The verified config's diff_id for this layer.
    pub diff_id: Option<String>,
    /// The blob's first bytes, when the verification fetched them (see
    /// [`Goal::VerifyForDecryption`](crate::pipeline::Goal::VerifyForDecryption)): how the
    /// blob is recognised as it starts to arrive.
    pub prefix: Vec<u8>,
    /// The placement grant the verification was admitted with: decryptions act under it
    /// (their key releases carry it) and not after its window.
    pub grant: Option<std::sync::Arc<crate::grant::AdmittedGrant>>,
}

/// What [`KnownLayers::get`] found.
#[derive(Debug)]
pub(crate) enum Lookup {
    Known(Box<KnownLayer>),
    /// Verified, but longer ago than the verification is good for.
    Expired {
        age: Duration,
    },
    Unknown,
}

/// An entry: its place in the order, when it was verified, the layer.
struct Entry {
    seq: u64,
    verified_at: Instant,
    layer: KnownLayer,
}

pub(crate) struct KnownLayers {
    by_digest: HashMap<String, Vec<Entry>>,
    /// Entries by the order they were remembered in (oldest first, so also the first to
    /// expire): when they were verified, and their blob digest.
    order: BTreeMap<u64, (Instant, String)>,
    next: u64,
    limit: usize,
    ttl: Duration,
}

impl KnownLayers {
    pub fn new(ttl: Duration) -> Self {
        Self::with_limit(MAX_KNOWN_LAYERS, ttl)
    }

    pub fn with_limit(limit: usize, ttl: Duration) -> Self {
        Self {
            by_digest: HashMap::new(),
            order: BTreeMap::new(),
            next: 0,
            limit: limit.max(1),
            ttl,
        }
    }

    fn fresh(&self, verified_at: Instant, now: Instant) -> bool {
        now.saturating_duration_since(verified_at) < self.ttl
    }

    /// Remembers `layer`, verified at `now`, replacing what was remembered for the same
    /// blob, tenant and function. A blob's prefix does not depend on the image it is in: one
    /// learnt before is kept when `layer` has none. Entries past the bound, and entries
    /// expired so long ago that [`get`](Self::get) no longer names them, are forgotten.
    pub fn remember(&mut self, mut layer: KnownLayer, now: Instant) {
        let digest = layer.descriptor.digest.to_string();
        let entries = self.by_digest.entry(digest.clone()).or_default();
        if layer.prefix.is_empty() {
            if let Some(e) = entries.iter().find(|e| !e.layer.prefix.is_empty()) {
                layer.prefix = e.layer.prefix.clone();
            }
        }
        if let Some(i) = entries
            .iter()
            .position(|e| e.layer.tenant == layer.tenant && e.layer.function == layer.function)
        {
            let old = entries.remove(i);
            self.order.remove(&old.seq);
        }
        let seq = self.next;
        self.next += 1;
        self.order.insert(seq, (now, digest));
        entries.push(Entry {
            seq,
            verified_at: now,
            layer,
        });
        while self.order.len() > self.limit {
            self.forget_oldest();
        }
        // Oldest first, so also the first to expire.
        while let Some((_, (at, _))) = self.order.first_key_value() {
            if now.saturating_duration_since(*at) < self.ttl.saturating_mul(2) {
                break;
            }
            self.forget_oldest();
        }
    }

    fn forget_oldest(&mut self) {
        let Some((seq, (_, digest))) = self.order.pop_first() else {
            return;
        };
        if let Some(entries) = self.by_digest.get_mut(&digest) {
            entries.retain(|e| e.seq != seq);
            if entries.is_empty() {
                self.by_digest.remove(&digest);
            }
        }
    }

    /// The layer with blob `digest` verified for `tenant` and `function`, if that
    /// verification is still good at `now`.
    pub fn get(&self, digest: &str, tenant: &str, function: &str, now: Instant) -> Lookup {
        let found = self.by_digest.get(digest).and_then(|entries| {
            entries
                .iter()
                .find(|e| e.layer.tenant == tenant && e.layer.function == function)
        });
        match found {
            None => Lookup::Unknown,
            Some(e) if self.fresh(e.verified_at, now) => Lookup::Known(Box::new(e.layer.clone())),
            Some(e) => Lookup::Expired {
                age: now.saturating_duration_since(e.verified_at),
            },
        }
    }

    /// The one layer verified for `tenant` and `function` with `media_type` that a blob
    /// starting with `start` can be: the one whose digest `payload_digest` names, if given,
    /// else the one whose remembered prefix `start` begins with. `None` if none or several
    /// (expired verifications do not count).
    pub fn recognise(
        &self,
        tenant: &str,
        function: &str,
        media_type: &str,
        payload_digest: Option<&str>,
        start: &[u8],
        now: Instant,
    ) -> Option<KnownLayer> {
        let mut candidates = self.by_digest.iter().flat_map(|(digest, entries)| {
            entries.iter().filter(move |e| {
                let k = &e.layer;
                self.fresh(e.verified_at, now)
                    && k.tenant == tenant
                    && k.function == function
                    && k.descriptor.media_type == media_type
                    && match payload_digest {
                        Some(p) => p == digest,
                        None => !k.prefix.is_empty() && start.starts_with(&k.prefix),
                    }
            })
        });
        let first = candidates.next()?;
        if candidates.next().is_some() {
            return None;
        }
        Some(first.layer.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GZIP_ENC: &str = "application/vnd.oci.image.layer.v1.tar+gzip+encrypted";
    const TTL: Duration = Duration::from_secs(600);

    fn digest(blob: u8) -> String {
        format!("sha256:{}", format!("{blob:02x}").repeat(32))
    }

    fn layer(blob: u8, tenant: &str, function: &str, prefix: &[u8]) -> KnownLayer {
        let descriptor = Descriptor {
            media_type: GZIP_ENC.into(),
            digest: policy::reference::Digest::parse(&digest(blob)).unwrap(),
            size: 1000,
            annotations: Default::default(),
            platform: None,
            artifact_type: None,
        };
        KnownLayer {
            tenant: tenant.into(),
            function: function.into(),
            image: "oci:/layout:tag".into(),
            image_digest: format!("sha256:{}", "ab".repeat(32)),
            descriptor,
            diff_id: None,
            prefix: prefix.to_vec(),
            grant: None,
        }
    }

    fn known(k: &KnownLayers, blob: u8, tenant: &str, function: &str, now: Instant) -> bool {
        matches!(
            k.get(&digest(blob), tenant, function, now),
            Lookup::Known(_)
        )
    }

    #[test]
    fn remembered_per_tenant_and_function_and_replaced_not_duplicated() {
        let now = Instant::now();
        let mut k = KnownLayers::new(TTL);
        k.remember(layer(1, "acme", "f", b"one"), now);
        k.remember(layer(1, "acme", "g", b"one"), now);
        k.remember(layer(1, "acme", "f", b"one"), now);
        assert_eq!(k.order.len(), 2);
        assert!(known(&k, 1, "acme", "f", now));
        assert!(known(&k, 1, "acme", "g", now));
        assert!(matches!(
            k.get(&digest(1), "globex", "f", now),
            Lookup::Unknown
        ));
        assert!(matches!(
            k.get(&digest(2), "acme", "f", now),
            Lookup::Unknown
        ));
    }

    #[test]
    fn a_prefix_learnt_before_is_kept() {
        let now = Instant::now();
        let mut k = KnownLayers::new(TTL);
        k.remember(layer(1, "acme", "f", b"start"), now);
        // The same blob remembered again without a prefix (a Prepare fetches none).
        k.remember(layer(1, "acme", "f", b""), now);
        k.remember(layer(1, "acme", "g", b""), now);
        for f in ["f", "g"] {
            let Lookup::Known(l) = k.get(&digest(1), "acme", f, now) else {
                panic!("{f} not known");
            };
            assert_eq!(l.prefix, b"start");
        }
    }

    #[test]
    fn past_the_limit_the_oldest_are_forgotten() {
        let now = Instant::now();
        let mut k = KnownLayers::with_limit(3, TTL);
        for f in ["a", "b", "c"] {
            k.remember(layer(1, "acme", f, b"p"), now);
        }
        // Remembering "a" again makes it the newest.
        k.remember(layer(1, "acme", "a", b"p"), now);
        k.remember(layer(2, "acme", "d", b"q"), now);
        assert_eq!(k.order.len(), 3);
        assert!(!known(&k, 1, "acme", "b", now));
        assert!(known(&k, 1, "acme", "a", now));
        assert!(known(&k, 1, "acme", "c", now));
        assert!(known(&k, 2, "acme", "d", now));
        // Many new function names cannot grow it.
        for i in 0..1000 {
            k.remember(layer(3, "acme", &format!("fn-{i}"), b"r"), now);
        }
        assert_eq!(k.order.len(), 3);
        assert_eq!(k.by_digest.len(), 1);
    }

    #[test]
    fn a_verification_is_good_for_its_ttl_only() {
        let t0 = Instant::now();
        let mut k = KnownLayers::new(TTL);
        k.remember(layer(1, "acme", "f", b"AAAA"), t0);
        let just_before = t0 + TTL - Duration::from_secs(1);
        assert!(known(&k, 1, "acme", "f", just_before));
        assert!(k
            .recognise("acme", "f", GZIP_ENC, None, b"AAAA", just_before)
            .is_some());
        let after = t0 + TTL;
        match k.get(&digest(1), "acme", "f", after) {
            Lookup::Expired { age } => assert_eq!(age, TTL),
            other => panic!("{other:?}"),
        }
        assert!(k
            .recognise("acme", "f", GZIP_ENC, None, b"AAAA", after)
            .is_none());
        // Verified again: good again.
        k.remember(layer(1, "acme", "f", b"AAAA"), after);
        assert!(known(&k, 1, "acme", "f", after));
        // Entries expired twice over are dropped when something new is remembered.
        k.remember(layer(2, "acme", "g", b"BBBB"), after);
        let much_later = after + 2 * TTL;
        k.remember(layer(3, "acme", "h", b"CCCC"), much_later);
        assert_eq!(k.order.len(), 1);
        assert!(matches!(
            k.get(&digest(2), "acme", "g", much_later),
            Lookup::Unknown
        ));
    }

    #[test]
    fn recognised_by_prefix_or_payload_only_when_unique() {
        let now = Instant::now();
        let mut k = KnownLayers::new(TTL);
        k.remember(layer(1, "acme", "f", b"AAAA"), now);
        k.remember(layer(2, "acme", "f", b"BBBB"), now);
        k.remember(layer(3, "acme", "f", b""), now);
        let start = |k: &KnownLayers, s: &[u8]| {
            k.recognise("acme", "f", GZIP_ENC, None, s, now)
                .map(|l| l.descriptor.digest.to_string())
        };
        assert_eq!(start(&k, b"AAAA and more"), Some(digest(1)));
        assert_eq!(start(&k, b"BBBB"), Some(digest(2)));
        assert_eq!(start(&k, b"AAA"), None, "shorter than the prefix");
        assert_eq!(start(&k, b"CCCC"), None);
        // Another tenant, function or media type: nothing.
        assert!(k
            .recognise("globex", "f", GZIP_ENC, None, b"AAAA", now)
            .is_none());
        assert!(k
            .recognise("acme", "g", GZIP_ENC, None, b"AAAA", now)
            .is_none());
        let tar = "application/vnd.oci.image.layer.v1.tar+encrypted";
        assert!(k.recognise("acme", "f", tar, None, b"AAAA", now).is_none());
        // By the payload's digest, whatever the start; a digest not known: nothing.
        let by_payload =
            |k: &KnownLayers, d: &str| k.recognise("acme", "f", GZIP_ENC, Some(d), b"x", now);
        assert_eq!(
            by_payload(&k, &digest(3))
                .unwrap()
                .descriptor
                .digest
                .to_string(),
            digest(3)
        );
        assert!(by_payload(&k, &digest(9)).is_none());
        // Two layers with the same prefix: ambiguous, so neither.
        k.remember(layer(4, "acme", "f", b"AAAA"), now);
        assert_eq!(start(&k, b"AAAA and more"), None);
    }
}
