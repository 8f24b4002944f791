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

/// The release a keyunwrap asks for, from its decryption parameters for this provider:
/// `session=`, `tenant=`, `function=`, `image=`, `image-digest=`, `layer-digest=`.
fn unwrap_request(
    name: &str,
    request: &Request,
) -> Result<(ReleaseRequest, Zeroizing<Vec<u8>>), BrokerError> {
    let bad = |m: String| BrokerError::Request(m);
    let params = request
        .keyunwrapparams
        .dc
        .as_ref()
        .and_then(|dc| dc.parameters.get(name))
        .ok_or_else(|| {
            bad(format!(
                "keyunwrap needs decryption parameters for provider {name:?} (session=, tenant=, function=, image=, image-digest=, layer-digest=)"
            ))
        })?;
    let mut fields = std::collections::BTreeMap::new();
    for p in params {
        let text = std::str::from_utf8(p.as_slice())
            .map_err(|_| bad("a decryption parameter is not UTF-8".into()))?;
        let (k, v) = text
            .split_once('=')
            .ok_or_else(|| bad(format!("decryption parameter {text:?} is not key=value")))?;
        fields.insert(k.to_string(), v.to_string());
    }
    let mut take = |k: &str| {
        fields
            .remove(k)
            .ok_or_else(|| bad(format!("keyunwrap: missing decryption parameter {k}=")))
    };
    let req = ReleaseRequest {
        session_id: take("session")?,
        tenant: take("tenant")?,
        function: take("function")?,
        image: take("image")?,
        image_digest: take("image-digest")?,
        layer_digest: take("layer-digest")?,
        wrapped: Wrapped::Provider(String::new()),
    };
    let annotation = request
        .keyunwrapparams
        .annotation
        .as_ref()
        .ok_or_else(|| bad("keyunwrap without an annotation".into()))?;
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
    may: impl Fn(Door) -> Result<(), BrokerError>,
) -> Result<Vec<u8>, BrokerError> {
    if input.len() > 1 << 20 {
        return Err(BrokerError::Request(
            "key provider request over 1 MiB".into(),
        ));
    }
    let request: Request = serde_json::from_slice(input)
        .map_err(|e| BrokerError::Request(format!("key provider request: {e}")))?;
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
                .ok_or_else(|| {
                    BrokerError::Request(format!(
                        "keywrap names no key for provider {name:?} (use provider:{name}:<key id>)"
                    ))
                })?;
            let key_id = std::str::from_utf8(key_id.as_slice())
                .map_err(|_| BrokerError::Request("the key id is not UTF-8".into()))?;
            let optsdata = params
                .optsdata
                .as_ref()
                .ok_or_else(|| BrokerError::Request("keywrap without optsdata".into()))?;
            Reply::wrapped(broker.wrap(client, key_id, optsdata.as_slice())?)
        }
        keyprovider::OP_UNWRAP => {
            may(Door::Unwrap)?;
            let (mut req, annotation) = unwrap_request(name, &request)?;
            req.wrapped = Wrapped::Provider(keyprovider::join_annotation(&[annotation.to_vec()]));
            Reply::unwrapped(broker.release_unsealed(client, &req)?)
        }
        other => {
            return Err(BrokerError::Request(format!(
                "key provider operation {other:?} (keywrap or keyunwrap)"
            )))
        }
    };
    Ok(serde_json::to_vec(&reply).expect("replies serialize"))
}
