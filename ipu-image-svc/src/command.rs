//! The `image verify|pull|unpack` commands' set-up from plain options (the binary parses
//! them): the policy (a trust policy file, or a signed bundle installed with anti-rollback),
//! the audit sink, and the key source (the attested broker, or development keys, audited).

use std::path::PathBuf;
use std::sync::Arc;

use audit::local::AuditTarget;
use ocicrypt::keys::PrivateKey;
use ocicrypt::DecryptConfig;
use policy::Policy;
use zeroize::Zeroizing;

use crate::error::{Error, FailureClass};
use crate::fetch::Platform;
use crate::keys::broker_client::{BrokerKeys, BrokerSettings};
use crate::keys::KeySource;
use crate::pipeline::{PipelineConfig, TrustPipeline};
use crate::record::AUDIT_SERVICE;
use crate::verify::Deployment;

/// Which policy decides.
#[derive(Clone, Debug)]
pub enum PolicySource {
    /// A containers-policy.json file (image trust only).
    TrustPolicy(PathBuf),
    /// A signed bundle, trusted signers' public keys, and where the running bundle is kept.
    Bundle {
        path: PathBuf,
        keys: Vec<PathBuf>,
        state: PathBuf,
    },
}

/// Everything `image verify|pull|unpack` take.
#[derive(Clone, Debug)]
pub struct ImageOptions {
    /// The image reference as given (recorded with a development key's use).
    pub image: String,
    pub policy: PolicySource,
    /// The IPU class for the deployment policy when not attested (must match the attested
    /// one with a broker).
    pub ipu_class: Option<String>,
    pub cache: PathBuf,
    pub platform: Platform,
    pub insecure_http: Vec<String>,
    pub audit: AuditTarget,
    pub tenant: Option<String>,
    pub function: Option<String>,
    /// For `unpack`.
    pub unpack: Option<UnpackOptions>,
}

/// What only `unpack` takes.
#[derive(Clone, Debug, Default)]
pub struct UnpackOptions {
    /// Development keys (audited when used).
    pub decryption_keys: Vec<PathBuf>,
    /// The attested key broker (production).
    pub broker: Option<BrokerSettings>,
    /// A placement grant (its envelope) every key release carries to the broker, which
    /// requires one when its policy names grant keys. The CLI does not admit it itself (no
    /// serial store): the broker's check is the one that counts here.
    pub grant: Option<String>,
    pub allow_device_nodes: bool,
    pub max_unpacked_bytes: Option<u64>,
    pub max_file_size: Option<u64>,
    pub max_inodes: Option<u64>,
    pub free_space: Option<u64>,
}

/// The pipeline and key source for a command.
pub fn set_up(opts: &ImageOptions) -> Result<(TrustPipeline, KeySource), Error> {
    let sink = opts.audit.open(AUDIT_SERVICE).map_err(|e| {
        let class = match e {
            audit::AuditError::Request(_) => FailureClass::InvalidConfiguration,
            _ => FailureClass::Io,
        };
        Error::new(class, format!("{}: {e}", opts.audit))
    })?;
    let (policy, deployment) = match &opts.policy {
        PolicySource::TrustPolicy(p) => (
            Policy::from_file(p).map_err(|e| Error::invalid(e.to_string()))?,
            None,
        ),
        PolicySource::Bundle { path, keys, state } => {
            let loaded = crate::policy_bundle::install(path, keys, state, sink.as_ref())?;
            (loaded.image_trust, Some(loaded.deployment))
        }
    };
    let mut cfg = PipelineConfig::new(policy, opts.cache.clone());
    cfg.audit = Some(sink);
    cfg.deployment = deployment.map(|d| Deployment {
        policy: Arc::new(d),
        ipu_class: opts.ipu_class.clone(),
    });
    cfg.tenant = opts.tenant.clone();
    cfg.function = opts.function.clone();
    cfg.grant = opts
        .unpack
        .as_ref()
        .and_then(|u| u.grant.as_deref())
        .map(std::sync::Arc::from);
    cfg.source.platform = opts.platform.clone();
    cfg.source.insecure_http_hosts = opts.insecure_http.clone();
    let mut keys = KeySource::none();
    if let Some(u) = &opts.unpack {
        if let Some(settings) = &u.broker {
            keys = broker_keys(&mut cfg, settings)?;
        } else if !u.decryption_keys.is_empty() {
            keys = development_keys(&cfg, &opts.image, &u.decryption_keys)?;
        }
        cfg.limits.allow_device_nodes = u.allow_device_nodes;
        if let Some(v) = u.max_unpacked_bytes {
            cfg.limits.max_unpacked_bytes = v;
        }
        if let Some(v) = u.max_file_size {
            cfg.limits.max_file_size = v;
        }
        if let Some(v) = u.max_inodes {
            cfg.limits.max_inodes = v;
        }
        if let Some(v) = u.free_space {
            cfg.rootfs.free_bytes = v;
        }
    }
    Ok((TrustPipeline::new(cfg), keys))
}

/// Attests to the broker; the class it attested is the class the deployment policy sees.
fn broker_keys(cfg: &mut PipelineConfig, settings: &BrokerSettings) -> Result<KeySource, Error> {
    let who = format!(
        "{} (tenant {}, function {})",
        settings.replicas(),
        cfg.tenant.as_deref().unwrap_or(""),
        cfg.function.as_deref().unwrap_or("")
    );
    let keys = BrokerKeys::attest(settings).map_err(|e| Error::from(e).context(&who))?;
    if let Some(d) = cfg.deployment.as_mut() {
        let attested = keys.ipu_class().map_err(|e| Error::from(e).context(&who))?;
        if d.ipu_class.as_ref().is_some_and(|c| *c != attested) {
            return Err(Error::invalid(format!(
                "--ipu-class {} but the broker attested this IPU as {attested}",
                d.ipu_class.as_deref().unwrap_or(""),
            )));
        }
        d.ipu_class = Some(attested);
    }
    Ok(KeySource::Broker(Arc::new(keys)))
}

/// Private keys from this host's disk: a development option, but a security decision all
/// the same, so it is on the record.
fn development_keys(
    cfg: &PipelineConfig,
    image: &str,
    paths: &[PathBuf],
) -> Result<KeySource, Error> {
    tracing::warn!("--decryption-key is a development option: private keys on this host; the key broker replaces it");
    let mut keys = Vec::new();
    for path in paths {
        let pem = Zeroizing::new(std::fs::read(path).map_err(|e| {
            Error::invalid(format!(
                "cannot read decryption key {}: {e}",
                path.display()
            ))
        })?);
        keys.push(
            PrivateKey::from_pem(&pem)
                .map_err(|e| Error::invalid(format!("decryption key {}: {e}", path.display())))?,
        );
    }
    let algorithms: Vec<&str> = keys.iter().map(|k| k.algorithm()).collect();
    let sink = cfg.audit.as_ref().expect("set before the keys");
    let mut event = audit::Event::new(
            AUDIT_SERVICE,
            audit::EventKind::Admin("dev_decryption_key".into()),
            audit::Outcome::Success,
            "--decryption-key: layer keys unwrapped with private keys read from this host's disk (development option; the key broker replaces it)",
        )
        .image(image.to_string(), None)
        .detail("algorithms", algorithms.join(","));
    event.tenant = cfg.tenant.clone();
    event.function = cfg.function.clone();
    sink.append(event).map_err(|e| {
        Error::new(
            FailureClass::Io,
            format!("cannot write the audit event: {e}"),
        )
    })?;
    Ok(KeySource::local(DecryptConfig::new(keys)))
}
