//! The ocicrypt key provider door: publishers encrypt with `provider:<name>:<key id>`
//! through ocicrypt tooling, and the broker wraps the layer's private options to the newest
//! usable version of that key. Unwrapping through this door is the same policy-checked,
//! audited release as the broker's own `Release`, and needs an attested session.
//!
//! The wrapping itself (the provider annotation's bytes) is [`crate::wrapping`].

use ocicrypt::keyprovider::{self, Reply, Request};
use zeroize::Zeroizing;

use crate::broker::{Broker, BrokerError, ReleaseRequest, Wrapped};

/// The provider name publishers configure unless the broker is told otherwise.
pub use broker_protocol::DEFAULT_PROVIDER_NAME as DEFAULT_NAME;

/// A key provider message the broker cannot act on.
#[derive(Debug, thiserror::Error)]
pub enum ProviderRequestError {
    #[error("key provider request over 1 MiB")]
    TooLarge,
    #[error("key provider request: {0}")]
    Json(#[source] serde_json::Error),
    #[error("key provider operation {0:?} (keywrap or keyunwrap)")]
    UnknownOperation(String),
    #[error("{door:?} requested through the {method:?} method")]
    WrongMethod { door: Door, method: Door },
    #[error("keywrap names no key for provider {name:?} (use provider:{name}:<key id>)")]
    NoKeyId { name: String },
    #[error("the key id is not UTF-8")]
    KeyIdNotUtf8,
    #[error("keywrap without optsdata")]
    NoOptsdata,
    #[error("keyunwrap needs decryption parameters for provider {name:?} (session=, tenant=, function=, image=, image-digest=, layer-digest=)")]
    NoParameters { name: String },
    #[error("a decryption parameter is not UTF-8")]
    ParameterNotUtf8,
    #[error("decryption parameter {0:?} is not key=value")]
    NotKeyValue(String),
    #[error("keyunwrap: missing decryption parameter {0}=")]
    MissingParameter(&'static str),
    #[error("keyunwrap without an annotation")]
    NoAnnotation,
    #[error("decryption parameter grant= is not base64 of a placement grant")]
    GrantNotBase64,
}

/// Why the door refused a message: it is malformed, or the broker refused it.
#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    #[error("malformed request: {0}")]
    Request(#[from] ProviderRequestError),
    #[error(transparent)]
    Broker(#[from] BrokerError),
}

/// The release a keyunwrap asks for, from its decryption parameters for this provider:
/// `session=`, `tenant=`, `function=`, `image=`, `image-digest=`, `layer-digest=`, and
/// `grant=` (standard base64 of the placement grant's envelope) when the policy asks for
/// grants.
fn unwrap_request(
    name: &str,
    request: &Request,
) -> Result<(ReleaseRequest, Zeroizing<Vec<u8>>), ProviderRequestError> {
    let params = request
        .keyunwrapparams
        .dc
        .as_ref()
        .and_then(|dc| dc.parameters.get(name))
        .ok_or_else(|| ProviderRequestError::NoParameters {
            name: name.to_string(),
        })?;
    let mut fields = std::collections::BTreeMap::new();
    for p in params {
        let text = std::str::from_utf8(p.as_slice())
            .map_err(|_| ProviderRequestError::ParameterNotUtf8)?;
        let (k, v) = text
            .split_once('=')
            .ok_or_else(|| ProviderRequestError::NotKeyValue(text.to_string()))?;
        fields.insert(k.to_string(), v.to_string());
    }
    let mut take = |k: &'static str| {
        fields
            .remove(k)
            .ok_or(ProviderRequestError::MissingParameter(k))
    };
    let req = ReleaseRequest {
        session_id: take("session")?,
        tenant: take("tenant")?,
        function: take("function")?,
        image: take("image")?,
        image_digest: take("image-digest")?,
        layer_digest: take("layer-digest")?,
        wrapped: Wrapped::Provider(String::new()),
        grant: match fields.remove("grant") {
            None => None,
            Some(b64) => Some(
                base64::Engine::decode(&base64::engine::general_purpose::STANDARD, b64)
                    .ok()
                    .and_then(|b| String::from_utf8(b).ok())
                    .ok_or(ProviderRequestError::GrantNotBase64)?,
            ),
        },
    };
    let annotation = request
        .keyunwrapparams
        .annotation
        .as_ref()
        .ok_or(ProviderRequestError::NoAnnotation)?;
    Ok((req, annotation.0.clone()))
}

/// Who may use the door: publishers and administrators wrap; attested IPUs unwrap.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Door {
    Wrap,
    Unwrap,
}

/// Handles one protocol message (the JSON of the command form or of gRPC field 1).
/// `may` says whether the caller's role allows the operation asked for.
pub fn handle(
    broker: &Broker,
    client: &str,
    input: &[u8],
    may: impl Fn(Door) -> Result<(), ProviderError>,
) -> Result<Vec<u8>, ProviderError> {
    if input.len() > 1 << 20 {
        return Err(ProviderRequestError::TooLarge.into());
    }
    let request: Request = serde_json::from_slice(input).map_err(ProviderRequestError::Json)?;
    let name = broker.provider_name();
    let reply = match request.op.as_str() {
        keyprovider::OP_WRAP => {
            may(Door::Wrap)?;
            let params = &request.keywrapparams;
            let key_id = params
                .ec
                .as_ref()
                .and_then(|ec| ec.parameters.get(name))
                .and_then(|v| v.first())
                .ok_or_else(|| ProviderRequestError::NoKeyId {
                    name: name.to_string(),
                })?;
            let key_id = std::str::from_utf8(key_id.as_slice())
                .map_err(|_| ProviderRequestError::KeyIdNotUtf8)?;
            let optsdata = params
                .optsdata
                .as_ref()
                .ok_or(ProviderRequestError::NoOptsdata)?;
            Reply::wrapped(broker.wrap(client, key_id, optsdata.as_slice())?)
        }
        keyprovider::OP_UNWRAP => {
            may(Door::Unwrap)?;
            let (mut req, annotation) = unwrap_request(name, &request)?;
            req.wrapped = Wrapped::Provider(keyprovider::join_annotation(&[annotation.to_vec()]));
            Reply::unwrapped(broker.release_unsealed(client, &req)?)
        }
        other => return Err(ProviderRequestError::UnknownOperation(other.to_string()).into()),
    };
    Ok(serde_json::to_vec(&reply).expect("replies serialize"))
}
