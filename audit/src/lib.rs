//! Tamper-evident audit log (append-only, RFC 9162 Merkle tree, signed
//! checkpoints, indexed queries in sled).
//!
//! Not built yet: issue 3 fills this crate. Until then no service writes
//! audit events, and `threat-model.md` lists the log's mitigations as planned.
