//! Why a service call (Prepare, Teardown, Verify, DecryptLayer) failed, and its class, exit
//! code and gRPC status through the data path's one mapping ([`crate::error`]).

use std::path::PathBuf;

use crate::error::{Error, FailureClass};

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// The image or the request was refused, or the data path failed (classified there).
    #[error(transparent)]
    Image(#[from] Error),
    /// The request named a bad tenant, function or image reference.
    #[error("{0}")]
    BadRequest(String),
    /// A decision of the decrypt hook's path: a layer the IPU did not verify (or no longer
    /// vouches for) for this tenant and function, or a blob that is not the layer named.
    #[error("{0}")]
    Refused(String),
    /// The service's state directory.
    #[error("{what} {}: {source}", path.display())]
    Storage {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A clone, base or export, or a received blob, could not be made, read or undone.
    #[error("{what}: {source}")]
    Device {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// An event could not be recorded: nothing is done unrecorded.
    #[error("cannot write the audit event: {0}")]
    Audit(#[source] audit::AuditError),
}

impl ServiceError {
    pub fn class(&self) -> FailureClass {
        match self {
            ServiceError::Image(e) => e.class,
            ServiceError::BadRequest(_) => FailureClass::InvalidConfiguration,
            ServiceError::Refused(_) => FailureClass::RejectedByPolicy,
            ServiceError::Storage { .. } | ServiceError::Device { .. } | ServiceError::Audit(_) => {
                FailureClass::Io
            }
        }
    }

    pub fn exit_code(&self) -> i32 {
        self.class().exit_code()
    }

    /// The API's answer to this failure.
    pub fn to_status(&self) -> tonic::Status {
        Error::new(self.class(), self.to_string()).to_status()
    }

    pub(crate) fn storage(
        what: &'static str,
        path: &std::path::Path,
        source: std::io::Error,
    ) -> Self {
        ServiceError::Storage {
            what,
            path: path.to_path_buf(),
            source,
        }
    }

    pub(crate) fn device(what: impl Into<String>, source: std::io::Error) -> Self {
        ServiceError::Device {
            what: what.into(),
            source,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_failures_map_through_the_one_table() {
        let refused = ServiceError::Refused("layer sha256:00 is in no verified image".into());
        assert_eq!(refused.exit_code(), crate::error::EXIT_REJECTED);
        assert_eq!(refused.to_status().code(), tonic::Code::PermissionDenied);
        let bad = ServiceError::BadRequest("tenant \"\"".into());
        assert_eq!(bad.to_status().code(), tonic::Code::InvalidArgument);
        let disk = ServiceError::storage(
            "cannot read",
            std::path::Path::new("/x"),
            std::io::Error::other("EIO"),
        );
        assert_eq!(disk.to_status().code(), tonic::Code::FailedPrecondition);
        assert!(disk.to_string().contains("/x"));
        let down: ServiceError = Error::new(FailureClass::KeyBrokerUnavailable, "down").into();
        assert_eq!(down.to_status().code(), tonic::Code::Unavailable);
    }
}
