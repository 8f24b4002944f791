//! Layer keys: the one place an encrypted layer's key is released for a request.
//!
//! A key comes from the key broker ([`broker_client::BrokerKeys`], the production path: it
//! decides per tenant, function, image and layer, and seals the key to this IPU's attested
//! session) or, as a development option, is unwrapped with private keys read from this
//! host's disk. Either way the caller gets a [`LayerKey`], whose key bytes are zeroized when
//! it drops and never printed.

pub mod broker_client;

use std::sync::Arc;

use ocicrypt::{DecryptConfig, PrivateLayerOptions, PublicLayerOptions};

use crate::fetch::Descriptor;
use crate::secret::SecretBuf;

/// Why a layer key could not be had.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The key broker could not be reached or did not answer in time: an operational
    /// failure, worth retrying.
    #[error("key broker: {0}")]
    Unavailable(String),
    /// The key broker refused this release (policy, revoked key or IPU, failed
    /// attestation): a decision.
    #[error("key broker: {0}")]
    Denied(String),
    /// The layer carries no wrapped key the configured source can use.
    #[error("{0}")]
    NoWrappedKey(String),
    /// No key source is configured at all.
    #[error("it is encrypted and no decryption key was given")]
    NotConfigured,
    /// The wrapped or released key does not open, or is malformed.
    #[error(transparent)]
    Unwrap(#[from] ocicrypt::Error),
    /// This IPU could not take part (TPM, secret memory, a released key it cannot open).
    #[error("key broker: {0}")]
    Failed(String),
}

/// What a key source is asked for one encrypted layer.
#[derive(Clone, Copy, Debug)]
pub struct LayerKeyRequest<'a> {
    /// The image reference as deployed.
    pub image: &'a str,
    pub image_digest: &'a str,
    pub layer_digest: &'a str,
    pub annotations: &'a ocicrypt::Annotations,
    pub tenant: &'a str,
    pub function: &'a str,
    /// The placement grant the request was admitted with (its envelope), for the broker to
    /// check again.
    pub grant: Option<&'a str>,
}

/// One layer's private options (ocicrypt JSON) in secret memory, and who released them.
pub struct ReleasedOptions {
    pub secret: SecretBuf,
    /// The broker replica that released them (its URL), for the record.
    pub served_by: Option<String>,
}

/// A source of layer keys other than local key files (the key broker).
pub trait LayerKeySource: Send + Sync {
    /// One layer's private options (ocicrypt JSON), in secret memory.
    fn private_options(&self, req: &LayerKeyRequest<'_>) -> Result<ReleasedOptions, KeyError>;

    /// Whether keys can be had now (for readiness): what is wrong otherwise.
    fn ready(&self) -> Result<(), String> {
        Ok(())
    }
}

/// One encrypted layer's key, released for one request: its public options and its private
/// options (the key, zeroized on drop).
pub struct LayerKey {
    pub pubopts: PublicLayerOptions,
    pub privopts: PrivateLayerOptions,
    /// The key broker replica that released it (`None` for local keys).
    pub broker: Option<String>,
}

impl LayerKey {
    /// The audit detail naming the broker replica that released the key, if one did.
    pub fn broker_detail(&self) -> Option<(&'static str, String)> {
        self.broker.clone().map(|url| ("key_broker", url))
    }
}

impl std::fmt::Debug for LayerKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LayerKey(..)")
    }
}

/// Where layer keys come from: the broker when there is one, else local keys. One per
/// service or command (a broker session serves every request), passed to the stages that
/// release keys.
#[derive(Clone)]
pub enum KeySource {
    Broker(Arc<dyn LayerKeySource>),
    /// Private keys from this host's disk (a development option); may be empty.
    Local(Arc<DecryptConfig>),
}

/// The layer a key is asked for, and for whom.
#[derive(Clone, Copy, Debug)]
pub struct KeyFor<'a> {
    pub image: &'a str,
    pub image_digest: &'a str,
    pub layer: &'a Descriptor,
    pub tenant: &'a str,
    pub function: &'a str,
    /// The placement grant the request was admitted with, if any.
    pub grant: Option<&'a str>,
}

impl KeySource {
    /// Whether keys can be had now: the broker's session (local keys always can).
    pub fn ready(&self) -> Result<(), String> {
        match self {
            KeySource::Broker(b) => b.ready(),
            KeySource::Local(_) => Ok(()),
        }
    }

    /// Local private keys (a development option).
    pub fn local(keys: DecryptConfig) -> Self {
        KeySource::Local(Arc::new(keys))
    }

    /// No key at all: encrypted layers are refused.
    pub fn none() -> Self {
        Self::local(DecryptConfig::new(Vec::new()))
    }

    /// Whether any key could be had (the broker, or at least one local key): checked before
    /// gigabytes of encrypted layers are fetched.
    pub fn is_configured(&self) -> bool {
        match self {
            KeySource::Broker(_) => true,
            KeySource::Local(dc) => !dc.keys().is_empty(),
        }
    }

    /// Whether a release asks the broker (which decides and audits each one).
    pub fn is_broker(&self) -> bool {
        matches!(self, KeySource::Broker(_))
    }

    /// Releases `req.layer`'s key: the broker decides now; local keys unwrap it.
    pub fn release(&self, req: &KeyFor<'_>) -> Result<LayerKey, KeyError> {
        let annotations = &req.layer.annotations;
        match self {
            KeySource::Broker(source) => {
                let layer_digest = req.layer.digest.to_string();
                let released = source.private_options(&LayerKeyRequest {
                    image: req.image,
                    image_digest: req.image_digest,
                    layer_digest: &layer_digest,
                    annotations,
                    tenant: req.tenant,
                    function: req.function,
                    grant: req.grant,
                })?;
                // Parsed from secret memory, which is zeroized when `released` drops here; the
                // parsed options are zeroized when the key drops.
                let privopts = PrivateLayerOptions::from_json(released.secret.as_slice())?;
                let pubopts = PublicLayerOptions::from_annotations(annotations)?;
                Ok(LayerKey {
                    pubopts,
                    privopts,
                    broker: released.served_by,
                })
            }
            KeySource::Local(dc) => {
                if dc.keys().is_empty() {
                    return Err(KeyError::NotConfigured);
                }
                let pubopts = PublicLayerOptions::from_annotations(annotations)?;
                let privopts = ocicrypt::unwrap_private_options(annotations, dc)?;
                Ok(LayerKey {
                    pubopts,
                    privopts,
                    broker: None,
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Refusing;
    impl LayerKeySource for Refusing {
        fn private_options(&self, _: &LayerKeyRequest<'_>) -> Result<ReleasedOptions, KeyError> {
            Err(KeyError::Denied("no".into()))
        }
    }

    fn layer() -> Descriptor {
        Descriptor {
            media_type: "application/vnd.oci.image.layer.v1.tar+gzip+encrypted".into(),
            digest: policy::reference::Digest::of(b"layer"),
            size: 5,
            annotations: Default::default(),
            platform: None,
            artifact_type: None,
        }
    }

    #[test]
    fn no_local_key_is_not_configured_and_the_broker_decides() {
        let d = layer();
        let req = KeyFor {
            image: "oci:x",
            image_digest: "sha256:00",
            layer: &d,
            tenant: "t",
            function: "f",
            grant: None,
        };
        let local = KeySource::none();
        assert!(!local.is_configured());
        assert!(matches!(local.release(&req), Err(KeyError::NotConfigured)));
        let broker = KeySource::Broker(Arc::new(Refusing));
        assert!(broker.is_configured() && broker.is_broker());
        assert!(matches!(broker.release(&req), Err(KeyError::Denied(_))));
    }
}
