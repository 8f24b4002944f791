//! gRPC definitions shared by the services and their clients (generated from `proto/`).

/// The audit log's writer and query services.
pub mod audit {
    tonic::include_proto!("ipu.audit.v1");
}

/// The key broker: attestation and key release.
pub mod keybroker {
    tonic::include_proto!("ipu.keybroker.v1");
}

/// The ocicrypt key provider protocol (JSON in a bytes field), as Go ocicrypt speaks it.
pub mod keyprovider {
    tonic::include_proto!("keyprovider");
}
