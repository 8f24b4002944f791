//! The service's Prometheus metrics (served by `ops::metrics` when `metrics_listen` is
//! set). Every label has a bounded set of values: stage names, failure class names
//! ([`FailureClass::as_str`]), grant reason codes and cache events. No image reference,
//! tenant, digest or key material is ever a label.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ops::prometheus_client::encoding::EncodeLabelSet;
use ops::prometheus_client::metrics::counter::Counter;
use ops::prometheus_client::metrics::family::Family;
use ops::prometheus_client::metrics::gauge::Gauge;
use ops::prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use ops::prometheus_client::registry::{Registry, Unit};

use crate::error::FailureClass;

/// A timed step of Prepare (`verify` .. `export`) or Teardown (`teardown`, `erase`).
///
/// The steps of a start also run inside tracing spans ([`Stage::span`], collected by
/// `ops::timings` for `--timings` and the benchmarks): every stage but `build`, which is
/// broken down there into `decrypt`, `unpack` and `file_system`, and `teardown`/`erase`,
/// which are not part of a start. [`Stage::ALL`] are the stages with a histogram.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stage {
    /// Policy, manifest, signatures, configuration.
    Verify,
    /// Every encrypted layer's key released by the broker (overlaps `fetch` on a build).
    KeyRelease,
    /// Layers pulled into the verified blob cache (`image pull`), or, for a build, found (an
    /// OCI layout's own blob, the cache's copy) and the first one to fetch asked for: a build
    /// reads a registry's blob as it decrypts it, so that transfer is in `decrypt` (or
    /// `unpack` for a layer that is not encrypted).
    Fetch,
    /// Layers decrypted and unpacked into the ext4 image, written where it goes (on the
    /// service, encrypted into the base as it is written).
    Build,
    /// Part of `build`: the layers' decryption (reading the cached blob, HMAC, AES-CTR,
    /// digest), busy time measured inside the stream the unpacker reads.
    Decrypt,
    /// Part of `build`: decompression of a layer's stream, on a thread of its own.
    Decompress,
    /// Part of `build`: the tar applied to the image's file system, file content written to
    /// its blocks (waiting for the decompressed stream included), less `base_encrypt`.
    Unpack,
    /// Part of `build`: the file system's metadata, written once the layers are applied.
    FileSystem,
    /// Part of `build` on the service: the image's blocks encrypted at rest into the new
    /// base as they are written.
    BaseEncrypt,
    /// The function's copy-on-write clone created.
    Clone,
    /// The clone exported (NBD or vhost-user-blk) and the export recorded.
    Export,
    /// A whole Teardown: revoke, erase, record.
    Teardown,
    /// The clone's key destroyed and its blocks deleted.
    Erase,
}

impl Stage {
    /// The stages with a histogram.
    pub const ALL: [Stage; 9] = [
        Stage::Verify,
        Stage::KeyRelease,
        Stage::Fetch,
        Stage::Build,
        Stage::BaseEncrypt,
        Stage::Clone,
        Stage::Export,
        Stage::Teardown,
        Stage::Erase,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Verify => "verify",
            Stage::KeyRelease => "key_release",
            Stage::Fetch => "fetch",
            Stage::Build => "build",
            Stage::Decrypt => "decrypt",
            Stage::Decompress => "decompress",
            Stage::Unpack => "unpack",
            Stage::FileSystem => "file_system",
            Stage::BaseEncrypt => "base_encrypt",
            Stage::Clone => "clone",
            Stage::Export => "export",
            Stage::Teardown => "teardown",
            Stage::Erase => "erase",
        }
    }

    /// The tracing span of this stage of a start (disabled for `build`, whose parts have
    /// their own, and for teardown's stages).
    pub fn span(self) -> tracing::Span {
        match self {
            Stage::Build | Stage::Teardown | Stage::Erase => tracing::Span::none(),
            // A layer's decryption, decompression and unpack run at once on their own
            // threads, and the base is encrypted as the unpack writes it.
            Stage::Decrypt | Stage::Decompress | Stage::Unpack | Stage::BaseEncrypt => {
                ops::timings::concurrent_span(self.as_str())
            }
            _ => ops::timings::span(self.as_str()),
        }
    }

    /// Runs `f` inside this stage's span.
    pub fn traced<T>(self, f: impl FnOnce() -> T) -> T {
        self.span().in_scope(f)
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StageLabel {
    stage: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClassLabel {
    class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabel {
    outcome: &'static str,
}

fn seconds_histogram() -> Histogram {
    // 1 ms to about 16 min: a cached start's clone takes milliseconds, a large build minutes.
    Histogram::new(exponential_buckets(0.001, 2.0, 20))
}

/// The service's metrics, registered under `ipu_image_svc_`.
pub struct ServiceMetrics {
    registry: Arc<Registry>,
    stages: Family<StageLabel, Histogram, fn() -> Histogram>,
    prepares: Family<OutcomeLabel, Counter>,
    decrypted_bytes: Counter,
    cache_hits: Counter,
    cache_misses: Counter,
    cache_evictions: Counter,
    live_clones: Gauge,
    refusals: Family<ClassLabel, Counter>,
    grant_decisions: Family<ReasonLabel, Counter>,
    ready: Gauge,
}

impl Default for ServiceMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl ServiceMetrics {
    pub fn new() -> Self {
        let mut r = Registry::with_prefix("ipu_image_svc");
        let stages = Family::<StageLabel, Histogram, fn() -> Histogram>::new_with_constructor(
            seconds_histogram,
        );
        r.register_with_unit(
            "stage_duration",
            "Time spent in each stage of Prepare (verify, key_release, fetch, build, base_encrypt, clone, export) and Teardown (teardown, erase)",
            Unit::Seconds,
            stages.clone(),
        );
        let prepares = Family::<OutcomeLabel, Counter>::default();
        r.register(
            "prepares",
            "Prepare calls by outcome (ok, failed)",
            prepares.clone(),
        );
        let decrypted_bytes = Counter::default();
        r.register_with_unit(
            "decrypted",
            "Encrypted layer bytes decrypted (base builds and DecryptLayer streams)",
            Unit::Bytes,
            decrypted_bytes.clone(),
        );
        let cache_hits = Counter::default();
        r.register(
            "base_cache_hits",
            "Prepares served from a cached base",
            cache_hits.clone(),
        );
        let cache_misses = Counter::default();
        r.register(
            "base_cache_misses",
            "Prepares that built a new base",
            cache_misses.clone(),
        );
        let cache_evictions = Counter::default();
        r.register(
            "base_cache_evictions",
            "Idle bases evicted from the cache",
            cache_evictions.clone(),
        );
        let live_clones = Gauge::default();
        r.register("live_clones", "Clones exported now", live_clones.clone());
        let refusals = Family::<ClassLabel, Counter>::default();
        r.register(
            "refusals",
            "Failed Prepare and Verify calls by failure class",
            refusals.clone(),
        );
        let grant_decisions = Family::<ReasonLabel, Counter>::default();
        r.register(
            "grant_decisions",
            "Placement grant decisions by reason code (accepted, or the refusal's code)",
            grant_decisions.clone(),
        );
        let ready = Gauge::default();
        r.register(
            "ready",
            "1 when ready (broker session, state dir writable, audit sink up): the health service says SERVING",
            ready.clone(),
        );
        // Every stage shows from the start (with zero counts), so dashboards and alerts
        // need no absent() special cases.
        for s in Stage::ALL {
            let _ = stages.get_or_create(&StageLabel { stage: s.as_str() });
        }
        for outcome in ["ok", "failed"] {
            let _ = prepares.get_or_create(&OutcomeLabel { outcome });
        }
        Self {
            registry: Arc::new(r),
            stages,
            prepares,
            decrypted_bytes,
            cache_hits,
            cache_misses,
            cache_evictions,
            live_clones,
            refusals,
            grant_decisions,
            ready,
        }
    }

    pub fn registry(&self) -> Arc<Registry> {
        self.registry.clone()
    }

    pub fn observe(&self, stage: Stage, took: Duration) {
        self.stages
            .get_or_create(&StageLabel {
                stage: stage.as_str(),
            })
            .observe(took.as_secs_f64());
    }

    /// Runs `f`, timing it as `stage` (whatever its outcome), inside the stage's span.
    pub fn time<T>(&self, stage: Stage, f: impl FnOnce() -> T) -> T {
        let started = Instant::now();
        let out = stage.traced(f);
        self.observe(stage, started.elapsed());
        out
    }

    pub fn prepared(&self, ok: bool) {
        let outcome = if ok { "ok" } else { "failed" };
        self.prepares.get_or_create(&OutcomeLabel { outcome }).inc();
    }

    pub fn decrypted(&self, bytes: u64) {
        self.decrypted_bytes.inc_by(bytes);
    }

    pub fn cache_hit(&self) {
        self.cache_hits.inc();
    }

    pub fn cache_miss(&self) {
        self.cache_misses.inc();
    }

    pub fn cache_evicted(&self, n: usize) {
        self.cache_evictions.inc_by(n as u64);
    }

    pub fn set_live_clones(&self, n: usize) {
        self.live_clones.set(n as i64);
    }

    pub fn refused(&self, class: FailureClass) {
        self.refusals
            .get_or_create(&ClassLabel {
                class: class.as_str(),
            })
            .inc();
    }

    /// A grant decision: `accepted`, or the refusal's reason code (a fixed set, from
    /// [`crate::grant::GrantRefusal::reason_code`] and `no-grant`).
    pub fn grant_decision(&self, reason: &'static str) {
        self.grant_decisions
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.set(ready.into());
    }
}

impl std::fmt::Debug for ServiceMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ServiceMetrics")
    }
}
