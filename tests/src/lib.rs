//! Shared helpers for the integration tests (registry harness, fixtures).
