//! `audit serve`'s Prometheus metrics (served by `ops::metrics` when `metrics_listen` is
//! set). No label carries event content: the log's own numbers only.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use ops::prometheus_client::metrics::counter::Counter;
use ops::prometheus_client::metrics::gauge::Gauge;
use ops::prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use ops::prometheus_client::registry::{Registry, Unit};

use crate::AuditLog;

/// The daemon's metrics, registered under `audit_`.
pub struct LogMetrics {
    registry: Arc<Registry>,
    appends: Counter,
    append_failures: Counter,
    append_seconds: Histogram,
    checkpoint_age: Gauge<f64, AtomicU64>,
    unsigned_events: Gauge,
    events: Gauge,
    disk_bytes: Gauge,
    ready: Gauge,
}

impl Default for LogMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl LogMetrics {
    pub fn new() -> Self {
        let mut r = Registry::with_prefix("audit");
        let appends = Counter::default();
        r.register(
            "appends",
            "Events appended through the writer socket",
            appends.clone(),
        );
        let append_failures = Counter::default();
        r.register(
            "append_failures",
            "Appends refused or failed (bad event, uid not allowed, storage error)",
            append_failures.clone(),
        );
        // 0.5 ms to about 4 s: an append returns once it is durable (a group commit).
        let append_seconds = Histogram::new(exponential_buckets(0.0005, 2.0, 14));
        r.register_with_unit(
            "append_duration",
            "Time from an append's arrival until it is durable",
            Unit::Seconds,
            append_seconds.clone(),
        );
        let checkpoint_age = Gauge::<f64, AtomicU64>::default();
        r.register_with_unit(
            "checkpoint_age",
            "Time since the last signed checkpoint while events wait for one (0 when every event is covered)",
            Unit::Seconds,
            checkpoint_age.clone(),
        );
        let unsigned_events = Gauge::default();
        r.register(
            "unsigned_events",
            "Events not yet covered by a signed checkpoint",
            unsigned_events.clone(),
        );
        let events = Gauge::default();
        r.register("log_events", "Events in the log (its size)", events.clone());
        let disk_bytes = Gauge::default();
        r.register_with_unit(
            "log_disk",
            "The log database's size on disk",
            Unit::Bytes,
            disk_bytes.clone(),
        );
        let ready = Gauge::default();
        r.register(
            "ready",
            "1 when the log is open and writable (the health service says SERVING)",
            ready.clone(),
        );
        Self {
            registry: Arc::new(r),
            appends,
            append_failures,
            append_seconds,
            checkpoint_age,
            unsigned_events,
            events,
            disk_bytes,
            ready,
        }
    }

    pub fn registry(&self) -> Arc<Registry> {
        self.registry.clone()
    }

    /// One append, and how long it took (ok or not).
    pub fn appended(&self, ok: bool, took: Duration) {
        if ok {
            self.appends.inc();
        } else {
            self.append_failures.inc();
        }
        self.append_seconds.observe(took.as_secs_f64());
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.set(ready.into());
    }

    /// Reads the log's size and checkpoint coverage into the gauges.
    pub fn observe(&self, log: &AuditLog) {
        let size = log.store().size().unwrap_or(0);
        let cp = log.checkpoint_status();
        let unsigned = size.saturating_sub(cp.signed_size);
        self.events.set(size as i64);
        self.unsigned_events.set(unsigned as i64);
        let age = if unsigned == 0 {
            0.0
        } else {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0);
            now.saturating_sub(cp.signed_at_ns) as f64 / 1e9
        };
        self.checkpoint_age.set(age);
        if let Ok(b) = log.store().disk_bytes() {
            self.disk_bytes.set(b as i64);
        }
    }
}
