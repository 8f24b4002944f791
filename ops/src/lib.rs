//! What the daemons (`ipu-image-svc serve`, `audit serve`, and later `keybroker serve`)
//! share for operators:
//!
//! - [`config`]: strict TOML configuration files with positioned errors, and redaction;
//! - [`metrics`]: a Prometheus endpoint (`GET /metrics`) on a local TCP or Unix listener;
//! - [`health`]: readiness on the standard gRPC health service, checked periodically;
//! - [`logging`]: text or JSON logs on stderr;
//! - [`timings`]: per-stage timings of a start from tracing spans (`--timings`);
//! - [`memory`]: malloc tuning for processes that stream layers in large chunks.

pub mod config;
pub mod health;
pub mod logging;
pub mod memory;
pub mod metrics;
pub mod timings;

pub use prometheus_client;
