//! The cache of bases by platform manifest digest: bounded, least recently used first out,
//! and never evicting a base that is in use (by a clone, or by a Prepare holding it).
//!
//! Generic over the cached value (and what is known about it, `M`) so that the policy is
//! tested on its own.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

struct Entry<T, M> {
    value: Arc<T>,
    meta: M,
    last_used: Instant,
}

pub(crate) struct BaseCache<T, M = ()> {
    max: usize,
    entries: HashMap<String, Entry<T, M>>,
}

impl<T, M: Clone> BaseCache<T, M> {
    /// Holds at most `max` entries, except while more than that are in use.
    pub(crate) fn new(max: usize) -> Self {
        Self {
            max,
            entries: HashMap::new(),
        }
    }

    /// Every entry, held (so none is evicted while the caller keeps the map).
    pub(crate) fn snapshot(&self) -> HashMap<String, (Arc<T>, M)> {
        self.entries
            .iter()
            .map(|(k, e)| (k.clone(), (e.value.clone(), e.meta.clone())))
            .collect()
    }

    pub(crate) fn contains(&self, key: &str) -> bool {
        self.entries.contains_key(key)
    }

    /// The entry, marked as used now.
    pub(crate) fn touch(&mut self, key: &str) {
        if let Some(e) = self.entries.get_mut(key) {
            e.last_used = Instant::now();
        }
    }

    /// Inserts `value` unless `key` is there already (then the cached one is returned and
    /// `value` dropped), and evicts what is over the bound. Returns the cached value with
    /// what is known about it, and the evicted keys.
    pub(crate) fn insert(&mut self, key: &str, value: T, meta: M) -> ((Arc<T>, M), Vec<String>) {
        let cached = self
            .entries
            .entry(key.to_string())
            .or_insert_with(|| Entry {
                value: Arc::new(value),
                meta,
                last_used: Instant::now(),
            });
        cached.last_used = Instant::now();
        let cached = (cached.value.clone(), cached.meta.clone());
        (cached, self.evict())
    }

    /// Drops least recently used entries nobody else holds until at most `max` remain.
    fn evict(&mut self) -> Vec<String> {
        let mut evicted = Vec::new();
        while self.entries.len() > self.max {
            let idle = self
                .entries
                .iter()
                .filter(|(_, e)| Arc::strong_count(&e.value) == 1)
                .min_by_key(|(_, e)| e.last_used)
                .map(|(k, _)| k.clone());
            let Some(key) = idle else { break };
            self.entries.remove(&key);
            evicted.push(key);
        }
        evicted
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn least_recently_used_idle_entries_go_first() {
        let mut c = BaseCache::new(2);
        let ((a, _), _) = c.insert("a", "A", ());
        std::thread::sleep(std::time::Duration::from_millis(2));
        let (_, evicted) = c.insert("b", "B", ());
        assert!(evicted.is_empty());
        std::thread::sleep(std::time::Duration::from_millis(2));
        // "a" is held (a clone uses it): "b", idle, goes although it is newer.
        let (_, evicted) = c.insert("c", "C", ());
        assert_eq!(evicted, ["b"]);
        assert!(c.contains("a") && c.contains("c"));
        // Released, and "c" used since: "a" is the one to go next.
        drop(a);
        std::thread::sleep(std::time::Duration::from_millis(2));
        c.touch("c");
        let (_, evicted) = c.insert("d", "D", ());
        assert_eq!(evicted, ["a"]);
        // A snapshot holds everything: nothing can go while it lives, so the bound gives.
        let held = c.snapshot();
        let (_, evicted) = c.insert("e", "E", ());
        assert!(evicted.is_empty());
        assert_eq!(c.snapshot().len(), 3);
        drop(held);
        // Inserting an existing key keeps the cached value.
        let ((kept, _), _) = c.insert("e", "other", ());
        assert_eq!(*kept, "E");
    }
}
