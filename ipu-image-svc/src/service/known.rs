//! The layers of images verified per tenant and function, which the decrypt hook's blobs are
//! matched against. Bounded: the host names the function, so without a bound a host could
//! grow it without end by verifying under ever new names; past the bound the layers
//! remembered longest ago are forgotten (their blobs then need a new verification).

use std::collections::{BTreeMap, HashMap};

use crate::fetch::Descriptor;

/// How many (layer, tenant, function) entries are remembered at most.
pub(crate) const MAX_KNOWN_LAYERS: usize = 16_384;

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
}

/// Where an entry is: blob digest, tenant, function.
type Key = (String, String, String);

pub(crate) struct KnownLayers {
    by_digest: HashMap<String, Vec<(u64, KnownLayer)>>,
    /// Entries by the order they were remembered in (oldest first).
    order: BTreeMap<u64, Key>,
    next: u64,
    limit: usize,
}

impl KnownLayers {
    pub fn new() -> Self {
        Self::with_limit(MAX_KNOWN_LAYERS)
    }

    pub fn with_limit(limit: usize) -> Self {
        Self {
            by_digest: HashMap::new(),
            order: BTreeMap::new(),
            next: 0,
            limit: limit.max(1),
        }
    }

    /// Remembers `layer`, replacing what was remembered for the same blob, tenant and
    /// function. A blob's prefix does not depend on the image it is in: one learnt before is
    /// kept when `layer` has none.
    pub fn remember(&mut self, mut layer: KnownLayer) {
        let digest = layer.descriptor.digest.to_string();
        let entries = self.by_digest.entry(digest.clone()).or_default();
        if layer.prefix.is_empty() {
            if let Some((_, k)) = entries.iter().find(|(_, k)| !k.prefix.is_empty()) {
                layer.prefix = k.prefix.clone();
            }
        }
        if let Some(i) = entries
            .iter()
            .position(|(_, k)| k.tenant == layer.tenant && k.function == layer.function)
        {
            let (seq, _) = entries.remove(i);
            self.order.remove(&seq);
        }
        let seq = self.next;
        self.next += 1;
        self.order
            .insert(seq, (digest, layer.tenant.clone(), layer.function.clone()));
        entries.push((seq, layer));
        while self.order.len() > self.limit {
            self.forget_oldest();
        }
    }

    fn forget_oldest(&mut self) {
        let Some((seq, (digest, _, _))) = self.order.pop_first() else {
            return;
        };
        if let Some(entries) = self.by_digest.get_mut(&digest) {
            entries.retain(|(s, _)| *s != seq);
            if entries.is_empty() {
                self.by_digest.remove(&digest);
            }
        }
    }

    /// The layer with blob `digest` verified for `tenant` and `function`.
    pub fn get(&self, digest: &str, tenant: &str, function: &str) -> Option<KnownLayer> {
        self.by_digest
            .get(digest)?
            .iter()
            .find(|(_, k)| k.tenant == tenant && k.function == function)
            .map(|(_, k)| k.clone())
    }

    /// The one layer verified for `tenant` and `function` with `media_type` that a blob
    /// starting with `start` can be: the one whose digest `payload_digest` names, if given,
    /// else the one whose remembered prefix `start` begins with. `None` if none or several.
    pub fn recognise(
        &self,
        tenant: &str,
        function: &str,
        media_type: &str,
        payload_digest: Option<&str>,
        start: &[u8],
    ) -> Option<KnownLayer> {
        let mut candidates = self.by_digest.iter().flat_map(|(digest, entries)| {
            entries.iter().map(|(_, k)| k).filter(move |k| {
                k.tenant == tenant
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
        Some(first.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GZIP_ENC: &str = "application/vnd.oci.image.layer.v1.tar+gzip+encrypted";

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
        }
    }

    fn digest(blob: u8) -> String {
        format!("sha256:{}", format!("{blob:02x}").repeat(32))
    }

    #[test]
    fn remembered_per_tenant_and_function_and_replaced_not_duplicated() {
        let mut known = KnownLayers::new();
        known.remember(layer(1, "acme", "f", b"one"));
        known.remember(layer(1, "acme", "g", b"one"));
        known.remember(layer(1, "acme", "f", b"one"));
        assert_eq!(known.order.len(), 2);
        assert!(known.get(&digest(1), "acme", "f").is_some());
        assert!(known.get(&digest(1), "acme", "g").is_some());
        assert!(known.get(&digest(1), "globex", "f").is_none());
        assert!(known.get(&digest(2), "acme", "f").is_none());
    }

    #[test]
    fn a_prefix_learnt_before_is_kept() {
        let mut known = KnownLayers::new();
        known.remember(layer(1, "acme", "f", b"start"));
        // The same blob remembered again without a prefix (a Prepare fetches none).
        known.remember(layer(1, "acme", "f", b""));
        known.remember(layer(1, "acme", "g", b""));
        assert_eq!(known.get(&digest(1), "acme", "f").unwrap().prefix, b"start");
        assert_eq!(known.get(&digest(1), "acme", "g").unwrap().prefix, b"start");
    }

    #[test]
    fn past_the_limit_the_oldest_are_forgotten() {
        let mut known = KnownLayers::with_limit(3);
        for f in ["a", "b", "c"] {
            known.remember(layer(1, "acme", f, b"p"));
        }
        // Remembering "a" again makes it the newest.
        known.remember(layer(1, "acme", "a", b"p"));
        known.remember(layer(2, "acme", "d", b"q"));
        assert_eq!(known.order.len(), 3);
        assert!(known.get(&digest(1), "acme", "b").is_none());
        for f in ["a", "c"] {
            assert!(known.get(&digest(1), "acme", f).is_some(), "{f}");
        }
        assert!(known.get(&digest(2), "acme", "d").is_some());
        // Many new function names cannot grow it.
        for i in 0..1000 {
            known.remember(layer(3, "acme", &format!("fn-{i}"), b"r"));
        }
        assert_eq!(known.order.len(), 3);
        assert_eq!(known.by_digest.len(), 1);
    }

    #[test]
    fn recognised_by_prefix_or_payload_only_when_unique() {
        let mut known = KnownLayers::new();
        known.remember(layer(1, "acme", "f", b"AAAA"));
        known.remember(layer(2, "acme", "f", b"BBBB"));
        known.remember(layer(3, "acme", "f", b""));
        let start = |known: &KnownLayers, s: &[u8]| {
            known
                .recognise("acme", "f", GZIP_ENC, None, s)
                .map(|k| k.descriptor.digest.to_string())
        };
        assert_eq!(start(&known, b"AAAA and more"), Some(digest(1)));
        assert_eq!(start(&known, b"BBBB"), Some(digest(2)));
        assert_eq!(start(&known, b"AAA"), None, "shorter than the prefix");
        assert_eq!(start(&known, b"CCCC"), None);
        // Another tenant, function or media type: nothing.
        assert!(known
            .recognise("globex", "f", GZIP_ENC, None, b"AAAA")
            .is_none());
        assert!(known
            .recognise("acme", "g", GZIP_ENC, None, b"AAAA")
            .is_none());
        assert!(known
            .recognise(
                "acme",
                "f",
                "application/vnd.oci.image.layer.v1.tar+encrypted",
                None,
                b"AAAA"
            )
            .is_none());
        // By the payload's digest, whatever the start; a digest not known: nothing.
        let by_payload =
            |known: &KnownLayers, d: &str| known.recognise("acme", "f", GZIP_ENC, Some(d), b"x");
        assert_eq!(
            by_payload(&known, &digest(3))
                .unwrap()
                .descriptor
                .digest
                .to_string(),
            digest(3)
        );
        assert!(by_payload(&known, &digest(9)).is_none());
        // Two layers with the same prefix: ambiguous, so neither.
        known.remember(layer(4, "acme", "f", b"AAAA"));
        assert_eq!(start(&known, b"AAAA and more"), None);
    }
}
