//! The broker's Prometheus metrics (served by `ops::metrics` when `metrics_listen` is set),
//! counted from its audit events: every decision the broker makes is one, so the counts and
//! the log cannot disagree. Labels have bounded values only: the event kind, its outcome and,
//! for placement-grant refusals, the grant's reason code; never a tenant, image, key id or
//! IPU id.

use std::sync::Arc;

use audit::{AuditError, AuditSink, Event, Receipt};
use ops::prometheus_client::encoding::EncodeLabelSet;
use ops::prometheus_client::metrics::counter::Counter;
use ops::prometheus_client::metrics::family::Family;
use ops::prometheus_client::metrics::gauge::Gauge;
use ops::prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DecisionLabels {
    /// `key.release`, `key.deny`, `attestation.verify`, `admin.<action>`, ...
    kind: String,
    outcome: &'static str,
    /// A refused placement grant's reason code (a fixed set), else empty.
    reason: String,
}

/// The registry and the broker's metrics in it.
pub struct BrokerMetrics {
    registry: Arc<Registry>,
    decisions: Family<DecisionLabels, Counter>,
    audit_failures: Counter,
    ready: Gauge,
}

impl Default for BrokerMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl BrokerMetrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("keybroker");
        let decisions = Family::<DecisionLabels, Counter>::default();
        registry.register(
            "decisions",
            "Audited decisions by event kind and outcome: key releases and denials, attestations, administration",
            decisions.clone(),
        );
        let audit_failures = Counter::default();
        registry.register(
            "audit_failures",
            "Decisions whose audit event could not be written (the request failed with them)",
            audit_failures.clone(),
        );
        let ready = Gauge::default();
        registry.register(
            "ready",
            "1 while the store answers and the audit sink takes appends",
            ready.clone(),
        );
        Self {
            registry: Arc::new(registry),
            decisions,
            audit_failures,
            ready,
        }
    }

    pub fn registry(&self) -> Arc<Registry> {
        self.registry.clone()
    }

    pub fn set_ready(&self, ready: bool) {
        self.ready.set(i64::from(ready));
    }
}

/// An audit sink that counts what it records.
pub struct MeteredSink {
    inner: Arc<dyn AuditSink>,
    metrics: Arc<BrokerMetrics>,
}

impl MeteredSink {
    pub fn new(inner: Arc<dyn AuditSink>, metrics: Arc<BrokerMetrics>) -> Self {
        Self { inner, metrics }
    }
}

/// The reason codes a label may carry (policy::grant's and the gate's).
fn bounded_reason(code: Option<&String>) -> String {
    match code {
        Some(c) if c.len() <= 32 && c.bytes().all(|b| b.is_ascii_lowercase() || b == b'-') => {
            c.clone()
        }
        _ => String::new(),
    }
}

impl AuditSink for MeteredSink {
    fn append(&self, event: Event) -> Result<Receipt, AuditError> {
        let labels = DecisionLabels {
            kind: event.kind.as_str().into_owned(),
            outcome: event.outcome.as_str(),
            reason: bounded_reason(event.details.get("reason_code")),
        };
        let written = self.inner.append(event);
        match &written {
            Ok(_) => {
                self.metrics.decisions.get_or_create(&labels).inc();
            }
            Err(_) => {
                self.metrics.audit_failures.inc();
            }
        }
        written
    }

    fn ready(&self) -> Result<(), String> {
        self.inner.ready()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decisions_are_counted_by_kind_outcome_and_reason_code_only() {
        let dir = tempfile::tempdir().unwrap();
        let (signer, _) = audit::CheckpointSigner::generate("test").unwrap();
        let log: Arc<dyn AuditSink> = Arc::new(
            audit::AuditLog::open(dir.path(), "test", signer, audit::LogOptions::default())
                .unwrap(),
        );
        let metrics = Arc::new(BrokerMetrics::new());
        let sink = MeteredSink::new(log, metrics.clone());
        let deny = Event::new(
            "keybroker",
            audit::EventKind::KeyDeny,
            audit::Outcome::Denied,
            "placement grant refused",
        )
        .tenant("acme")
        .detail("reason_code", "wrong-ipu");
        sink.append(deny.clone()).unwrap();
        sink.append(deny.detail("reason_code", "Not A Code; with spaces"))
            .unwrap();
        let text = ops::metrics::encode(&metrics.registry());
        assert!(
            text.contains(
                r#"keybroker_decisions_total{kind="key.deny",outcome="denied",reason="wrong-ipu"} 1"#
            ),
            "{text}"
        );
        assert!(
            text.contains(
                r#"keybroker_decisions_total{kind="key.deny",outcome="denied",reason=""} 1"#
            ),
            "{text}"
        );
        assert!(!text.contains("acme"), "no tenant in labels: {text}");
    }
}
