//! The audit events of one image request, with its context (image, manifest digest, tenant,
//! function) filled in. Every stage records its decisions through it; a run that cannot
//! write its events fails (nothing is accepted unrecorded).

use std::cell::{Cell, RefCell};
use std::sync::Arc;

use audit::{AuditSink, Event, EventKind, Outcome};

use crate::error::{Error, FailureClass};

/// The name this service records its events under.
pub const AUDIT_SERVICE: &str = "ipu-image-svc";

/// Writes one request's audit events.
pub struct Recorder {
    sink: Option<Arc<dyn AuditSink>>,
    tenant: Option<String>,
    function: Option<String>,
    image: String,
    /// The manifest digest, once resolved.
    digest: RefCell<Option<String>>,
    /// Whether the failure that ended the request already has its own event.
    failure_recorded: Cell<bool>,
}

impl Recorder {
    pub fn new(
        sink: Option<Arc<dyn AuditSink>>,
        tenant: Option<String>,
        function: Option<String>,
        image: String,
    ) -> Self {
        Self {
            sink,
            tenant,
            function,
            image,
            digest: RefCell::new(None),
            failure_recorded: Cell::new(false),
        }
    }

    /// From now on events carry the manifest digest.
    pub fn set_digest(&self, digest: String) {
        *self.digest.borrow_mut() = Some(digest);
    }

    pub fn tenant(&self) -> &str {
        self.tenant.as_deref().unwrap_or("")
    }

    pub fn function(&self) -> &str {
        self.function.as_deref().unwrap_or("")
    }

    pub fn record(
        &self,
        kind: EventKind,
        outcome: Outcome,
        reason: &str,
        details: &[(&str, String)],
    ) -> Result<(), Error> {
        let Some(log) = &self.sink else {
            return Ok(());
        };
        let mut e = Event::new(AUDIT_SERVICE, kind, outcome, reason)
            .image(self.image.clone(), self.digest.borrow().clone());
        e.tenant = self.tenant.clone();
        e.function = self.function.clone();
        for (k, v) in details {
            e = e.detail(*k, v.clone());
        }
        log.append(e).map(|_| ()).map_err(|e| {
            Error::new(
                FailureClass::Io,
                format!("cannot write the audit event (nothing is accepted unrecorded): {e}"),
            )
        })
    }

    /// Records the event for a failure and marks it recorded.
    pub fn failure(
        &self,
        kind: EventKind,
        e: &Error,
        details: &[(&str, String)],
    ) -> Result<(), Error> {
        let outcome = if e.class.is_rejection() {
            Outcome::Denied
        } else {
            Outcome::Failure
        };
        let mut d = vec![("class", e.class.as_str().to_string())];
        d.extend(details.iter().cloned());
        self.record(kind, outcome, &e.message, &d)?;
        self.failure_recorded.set(true);
        Ok(())
    }

    /// Records `e` as a failure of `kind` and returns it (or the audit failure).
    pub fn refuse(&self, kind: EventKind, e: Error, details: &[(&str, String)]) -> Error {
        match self.failure(kind, &e, details) {
            Ok(()) => e,
            Err(audit) => audit,
        }
    }

    /// Ends a request: a failure no stage recorded gets a generic `error` event, and a
    /// rejection is logged.
    pub fn finish<T>(&self, result: Result<T, Error>) -> Result<T, Error> {
        if let Err(e) = &result {
            if !self.failure_recorded.get() {
                if let Err(audit_err) = self.failure(EventKind::Error, e, &[]) {
                    tracing::error!(error = %audit_err.message, "audit log unavailable");
                }
            }
            if e.class.is_rejection() {
                tracing::warn!(target: "audit", image = %self.image, class = e.class.as_str(), reason = %e.message, "image rejected");
            }
        }
        result
    }
}
