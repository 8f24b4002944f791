//! The classified failure of the data path, and the one mapping from a failure to the CLI's
//! exit code and the API's gRPC status.
//!
//! A rejection is a decision about the image or the request (exit code 3, gRPC
//! `PermissionDenied`); anything else is an operational failure: the image could not be
//! reached, stored or processed, or a service it needs (the key broker) did not answer
//! (exit code 1, gRPC `Unavailable` for a service that did not answer, else
//! `FailedPrecondition`, `InvalidArgument` for a bad request).

use policy::reference::Digest;
use policy::trust::RejectClass;
use serde::Serialize;

use crate::fetch::{FetchError, FetchErrorClass};
use crate::keys::KeyError;
use crate::unpack::UnpackError;

/// Why an image was refused or a stage failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FailureClass {
    // Rejections.
    NoSignature,
    WrongKey,
    IdentityMismatch,
    MalformedSignature,
    UnsupportedSignatureFormat,
    RejectedByPolicy,
    DigestMismatch,
    UnsafeLayer,
    NoDecryptionKey,
    MalformedImage,
    UnsupportedImage,
    TooLarge,
    // Operational.
    InvalidConfiguration,
    NotFound,
    InsecureTransport,
    Network,
    /// The key broker could not be reached or did not answer in time.
    KeyBrokerUnavailable,
    Io,
    /// The storage the image is written to is full (the service's state directory, where
    /// the base goes, or the CLI's output).
    WorkspaceFull,
}

impl FailureClass {
    pub fn as_str(self) -> &'static str {
        match self {
            FailureClass::NoSignature => "no-signature",
            FailureClass::WrongKey => "wrong-key",
            FailureClass::IdentityMismatch => "identity-mismatch",
            FailureClass::MalformedSignature => "malformed-signature",
            FailureClass::UnsupportedSignatureFormat => "unsupported-signature-format",
            FailureClass::RejectedByPolicy => "rejected-by-policy",
            FailureClass::DigestMismatch => "digest-mismatch",
            FailureClass::UnsafeLayer => "unsafe-layer",
            FailureClass::NoDecryptionKey => "no-decryption-key",
            FailureClass::MalformedImage => "malformed-image",
            FailureClass::UnsupportedImage => "unsupported-image",
            FailureClass::TooLarge => "too-large",
            FailureClass::InvalidConfiguration => "invalid-configuration",
            FailureClass::NotFound => "not-found",
            FailureClass::InsecureTransport => "insecure-transport",
            FailureClass::Network => "network",
            FailureClass::KeyBrokerUnavailable => "key-broker-unavailable",
            FailureClass::Io => "io",
            FailureClass::WorkspaceFull => "workspace-full",
        }
    }

    /// A decision about the image rather than a failure to reach or store it.
    pub fn is_rejection(self) -> bool {
        !matches!(
            self,
            FailureClass::InvalidConfiguration
                | FailureClass::NotFound
                | FailureClass::InsecureTransport
                | FailureClass::Network
                | FailureClass::KeyBrokerUnavailable
                | FailureClass::Io
                | FailureClass::WorkspaceFull
        )
    }

    /// The CLI's exit code for a failure of this class.
    pub fn exit_code(self) -> i32 {
        if self.is_rejection() {
            EXIT_REJECTED
        } else {
            EXIT_OPERATIONAL
        }
    }

    /// The gRPC status code the API answers a failure of this class with.
    pub fn grpc_code(self) -> tonic::Code {
        match self {
            c if c.is_rejection() => tonic::Code::PermissionDenied,
            FailureClass::KeyBrokerUnavailable | FailureClass::Network => tonic::Code::Unavailable,
            FailureClass::InvalidConfiguration => tonic::Code::InvalidArgument,
            FailureClass::WorkspaceFull => tonic::Code::ResourceExhausted,
            _ => tonic::Code::FailedPrecondition,
        }
    }

    pub(crate) fn from_reject(c: RejectClass) -> Self {
        match c {
            RejectClass::NoSignature => FailureClass::NoSignature,
            RejectClass::UnsupportedSignatureFormat => FailureClass::UnsupportedSignatureFormat,
            RejectClass::WrongKey => FailureClass::WrongKey,
            RejectClass::MalformedSignature => FailureClass::MalformedSignature,
            RejectClass::DigestMismatch => FailureClass::DigestMismatch,
            RejectClass::IdentityMismatch => FailureClass::IdentityMismatch,
            RejectClass::RejectedByPolicy => FailureClass::RejectedByPolicy,
        }
    }
}

impl std::fmt::Display for FailureClass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Exit codes of the CLI.
pub const EXIT_OK: i32 = 0;
pub const EXIT_OPERATIONAL: i32 = 1;
pub const EXIT_USAGE: i32 = 2;
pub const EXIT_REJECTED: i32 = 3;

/// A failure of the data path: its class and what was wrong, where.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct Error {
    pub class: FailureClass,
    pub message: String,
}

impl Error {
    pub fn new(class: FailureClass, message: impl Into<String>) -> Self {
        Self {
            class,
            message: message.into(),
        }
    }

    /// An I/O failure on `path`.
    pub fn io(what: &str, path: &std::path::Path, e: std::io::Error) -> Self {
        Self::new(FailureClass::Io, format!("{what} {}: {e}", path.display()))
    }

    /// A request the caller got wrong (a name, a reference, a missing option).
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(FailureClass::InvalidConfiguration, message)
    }

    /// The same failure with `context` before its message.
    pub fn context(self, context: impl std::fmt::Display) -> Self {
        Self::new(self.class, format!("{context}: {}", self.message))
    }

    pub fn exit_code(&self) -> i32 {
        self.class.exit_code()
    }

    /// The API's answer to this failure.
    pub fn to_status(&self) -> tonic::Status {
        let code = self.class.grpc_code();
        let text = if self.class.is_rejection() {
            format!("rejected ({}): {}", self.class.as_str(), self.message)
        } else {
            format!("{}: {}", self.class.as_str(), self.message)
        };
        tonic::Status::new(code, text)
    }
}

impl From<FetchError> for Error {
    fn from(e: FetchError) -> Self {
        let class = match e.class {
            FetchErrorClass::DigestMismatch => FailureClass::DigestMismatch,
            FetchErrorClass::NotFound => FailureClass::NotFound,
            FetchErrorClass::Malformed => FailureClass::MalformedImage,
            FetchErrorClass::Unsupported => FailureClass::UnsupportedImage,
            FetchErrorClass::Insecure => FailureClass::InsecureTransport,
            FetchErrorClass::TooLarge => FailureClass::TooLarge,
            FetchErrorClass::Network => FailureClass::Network,
            FetchErrorClass::Io => FailureClass::Io,
        };
        Error::new(class, e.message)
    }
}

impl From<KeyError> for Error {
    fn from(e: KeyError) -> Self {
        let class = match &e {
            KeyError::Unavailable(_) => FailureClass::KeyBrokerUnavailable,
            KeyError::Denied(_) | KeyError::NoWrappedKey(_) | KeyError::NotConfigured => {
                FailureClass::NoDecryptionKey
            }
            KeyError::Unwrap(e) => ocicrypt_class(e),
            KeyError::Failed(_) => FailureClass::Io,
        };
        Error::new(class, e.to_string())
    }
}

/// The failure class of an ocicrypt error.
pub fn ocicrypt_class(e: &ocicrypt::Error) -> FailureClass {
    use ocicrypt::ErrorClass as C;
    match e.class() {
        C::NoKey => FailureClass::NoDecryptionKey,
        C::Integrity => FailureClass::DigestMismatch,
        C::Malformed => FailureClass::MalformedImage,
        C::Unsupported => FailureClass::UnsupportedImage,
        C::Io => FailureClass::Io,
    }
}

impl From<ocicrypt::Error> for Error {
    fn from(e: ocicrypt::Error) -> Self {
        Error::new(ocicrypt_class(&e), e.to_string())
    }
}

/// An unpack failure of layer `layer` (`digest`).
pub(crate) fn from_unpack(e: UnpackError, layer: usize, digest: &Digest) -> Error {
    Error::new(
        unpack_class(&e),
        format!("layer {layer} ({digest}): {}", e.message),
    )
}

/// A cached base refused under this request's limits.
pub(crate) fn from_cached(e: UnpackError, platform_digest: &Digest) -> Error {
    Error::new(
        unpack_class(&e),
        format!("the cached base of {platform_digest}: {}", e.message),
    )
}

fn unpack_class(e: &UnpackError) -> FailureClass {
    use crate::unpack::UnpackErrorKind as K;
    match e.kind {
        K::LimitExceeded => FailureClass::TooLarge,
        K::Malformed => FailureClass::MalformedImage,
        K::Unsupported => FailureClass::UnsupportedImage,
        K::NoSpace => FailureClass::WorkspaceFull,
        K::Io => FailureClass::Io,
        K::UnsafePath | K::UnsafeLink | K::DeviceNode => FailureClass::UnsafeLayer,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unreachable_broker_is_operational_and_a_denial_a_rejection() {
        let down: Error = KeyError::Unavailable("connection refused".into()).into();
        assert_eq!(down.class, FailureClass::KeyBrokerUnavailable);
        assert_eq!(down.exit_code(), EXIT_OPERATIONAL);
        assert_eq!(down.to_status().code(), tonic::Code::Unavailable);

        let denied: Error = KeyError::Denied("policy denies key k1".into()).into();
        assert_eq!(denied.class, FailureClass::NoDecryptionKey);
        assert_eq!(denied.exit_code(), EXIT_REJECTED);
        assert_eq!(denied.to_status().code(), tonic::Code::PermissionDenied);
        assert!(denied
            .to_status()
            .message()
            .contains("policy denies key k1"));
    }

    #[test]
    fn every_class_has_one_exit_code_and_status() {
        use FailureClass as C;
        let all = [
            C::NoSignature,
            C::WrongKey,
            C::IdentityMismatch,
            C::MalformedSignature,
            C::UnsupportedSignatureFormat,
            C::RejectedByPolicy,
            C::DigestMismatch,
            C::UnsafeLayer,
            C::NoDecryptionKey,
            C::MalformedImage,
            C::UnsupportedImage,
            C::TooLarge,
            C::InvalidConfiguration,
            C::NotFound,
            C::InsecureTransport,
            C::Network,
            C::KeyBrokerUnavailable,
            C::Io,
        ];
        for c in all {
            let (exit, code) = (c.exit_code(), c.grpc_code());
            if c.is_rejection() {
                assert_eq!(
                    (exit, code),
                    (EXIT_REJECTED, tonic::Code::PermissionDenied),
                    "{c}"
                );
            } else {
                assert_eq!(exit, EXIT_OPERATIONAL, "{c}");
                assert_ne!(code, tonic::Code::PermissionDenied, "{c}");
            }
        }
        assert_eq!(
            C::InvalidConfiguration.grpc_code(),
            tonic::Code::InvalidArgument
        );
        assert_eq!(C::Io.grpc_code(), tonic::Code::FailedPrecondition);
        assert_eq!(C::Network.grpc_code(), tonic::Code::Unavailable);
    }
}
