//! The IPU's client of the key broker: attest once with the TPM (a quote over the PCRs the
//! broker names for this IPU's class, bound to the broker's nonce and a fresh session key),
//! then obtain each encrypted layer's private options sealed to that session key and open
//! them straight into secret memory.
//!
//! Over mutual TLS with the IPU's client certificate (role `ipu`). The session key lives in
//! this process only; what crosses the wire is a quote, public keys, and sealed keys.

use std::path::PathBuf;
use std::sync::Mutex;

use api::keybroker::key_broker_client::KeyBrokerClient;
use api::keybroker::{AttestRequest, ChallengeRequest, ReleaseRequest};
use keybroker::attest::binding;
use keybroker::broker::release_context;
use keybroker::release::{SealedKey, SessionKey};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

use crate::attest::Tpm;
use crate::pipeline::{LayerKeyRequest, LayerKeySource};
use crate::secret::SecretBuf;

/// How to reach the broker and attest to it.
#[derive(Clone, Debug)]
pub struct BrokerSettings {
    /// `https://HOST:PORT`.
    pub url: String,
    /// The name in the broker's certificate (default: the URL's host).
    pub server_name: Option<String>,
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The TPM (tss TCTI string, e.g. `device:/dev/tpmrm0` or `swtpm:port=2321`).
    pub tpm: String,
    /// Where the attestation key is persisted.
    pub ak_handle: u32,
    /// The broker's key provider name (layers wrapped with `provider:<name>:<key id>`).
    pub provider_name: String,
}

struct Session {
    rt: tokio::runtime::Runtime,
    client: KeyBrokerClient<Channel>,
    id: String,
    key: SessionKey,
    salt: [u8; 32],
}

/// An attested session with the broker; layer keys are requested through it.
pub struct BrokerKeys {
    session: Mutex<Session>,
    provider_name: String,
    pub ipu_class: String,
}

fn read(p: &PathBuf) -> Result<Vec<u8>, String> {
    std::fs::read(p).map_err(|e| format!("cannot read {}: {e}", p.display()))
}

fn status(what: &str, s: tonic::Status) -> String {
    format!("{what}: {} ({:?})", s.message(), s.code())
}

impl BrokerKeys {
    /// Connects, attests with the TPM and opens a session.
    pub fn attest(settings: &BrokerSettings) -> Result<Self, String> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("runtime: {e}"))?;
        let mut tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(read(&settings.ca)?))
            .identity(Identity::from_pem(
                read(&settings.cert)?,
                read(&settings.key)?,
            ));
        if let Some(name) = &settings.server_name {
            tls = tls.domain_name(name.clone());
        }
        let endpoint = Channel::from_shared(settings.url.clone())
            .map_err(|e| format!("broker URL {:?}: {e}", settings.url))?
            .tls_config(tls)
            .map_err(|e| format!("broker TLS: {e}"))?;
        let channel = rt
            .block_on(endpoint.connect())
            .map_err(|e| format!("cannot reach the key broker at {}: {e}", settings.url))?;
        let mut client = KeyBrokerClient::new(channel);
        let mut tpm =
            Tpm::open_persistent(&settings.tpm, settings.ak_handle).map_err(|e| e.to_string())?;
        let key = SessionKey::generate();
        let challenge = rt
            .block_on(client.challenge(ChallengeRequest {
                ak_public: tpm.ak_public().to_vec(),
            }))
            .map_err(|s| status("challenge", s))?
            .into_inner();
        let pcrs: Vec<u8> = challenge
            .pcrs
            .iter()
            .map(|&p| u8::try_from(p).map_err(|_| format!("the broker asks for PCR {p}")))
            .collect::<Result<_, _>>()?;
        // Until this AK has proven it lives in the TPM of the EK it was enrolled with, the
        // broker sends a credential only that TPM can activate.
        let activation = if challenge.credential_id_object.is_empty() {
            zeroize::Zeroizing::new(Vec::new())
        } else {
            tpm.activate_credential(
                &challenge.credential_id_object,
                &challenge.credential_secret,
            )
            .map_err(|e| format!("credential activation: {e}"))?
        };
        let evidence = tpm
            .quote(&challenge.nonce, &key.public(), &pcrs)
            .map_err(|e| e.to_string())?;
        let attested = rt
            .block_on(client.attest(attest_request(
                evidence,
                tpm.ak_public(),
                &challenge.nonce,
                key.public(),
                &activation,
            )))
            .map_err(|s| status("attestation", s))?
            .into_inner();
        tracing::info!(class = %attested.ipu_class, expires_in_secs = attested.expires_in_secs, "attested to the key broker");
        let salt = binding(&challenge.nonce, &key.public());
        Ok(Self {
            session: Mutex::new(Session {
                rt,
                client,
                id: attested.session_id,
                key,
                salt,
            }),
            provider_name: settings.provider_name.clone(),
            ipu_class: attested.ipu_class,
        })
    }
}

/// The `Attest` request for a quote: the evidence, the AK it is checked with, the nonce and
/// session key it binds, and the activation secret when the challenge carried a credential.
pub fn attest_request(
    evidence: keybroker::attest::Evidence,
    ak_public: &[u8],
    nonce: &[u8],
    session_public: Vec<u8>,
    activation: &[u8],
) -> AttestRequest {
    AttestRequest {
        nonce: nonce.to_vec(),
        attest: evidence.attest,
        signature: evidence.signature,
        pcrs: evidence
            .pcrs
            .into_iter()
            .map(|(i, v)| (u32::from(i), v))
            .collect(),
        ak_public: ak_public.to_vec(),
        session_public,
        activation: activation.to_vec(),
    }
}

impl LayerKeySource for BrokerKeys {
    fn private_options(&self, req: &LayerKeyRequest<'_>) -> Result<SecretBuf, String> {
        let provider_annotation = req
            .annotations
            .iter()
            .find(|(k, _)| {
                k.strip_prefix(ocicrypt::ANNOTATION_KEYS_PROVIDER_PREFIX)
                    .is_some_and(|name| name == self.provider_name)
            })
            .map(|(_, v)| v.clone());
        let jwe = req.annotations.get(ocicrypt::ANNOTATION_KEYS_JWE).cloned();
        // The broker's own wrapping first: it names the key, so no key is tried in vain.
        let (wrapped_jwe, wrapped_provider) = match (provider_annotation, jwe) {
            (Some(p), _) => (String::new(), p),
            (None, Some(j)) => (j, String::new()),
            (None, None) => return Err("the layer has no wrapped key for the key broker".into()),
        };
        let mut s = self.session.lock().expect("not poisoned");
        let request = ReleaseRequest {
            session_id: s.id.clone(),
            tenant: req.tenant.to_string(),
            function: req.function.to_string(),
            image: req.image.to_string(),
            image_digest: req.image_digest.to_string(),
            layer_digest: req.layer_digest.to_string(),
            wrapped_jwe,
            wrapped_provider,
        };
        let Session {
            rt,
            client,
            key,
            salt,
            ..
        } = &mut *s;
        let released = rt
            .block_on(client.release(request))
            .map_err(|e| status("key release", e))?
            .into_inner();
        let sealed = SealedKey {
            broker_public: released.broker_public,
            ciphertext: released.ciphertext,
        };
        let opened = key
            .open(
                &sealed,
                salt,
                &release_context(req.image_digest, req.layer_digest),
            )
            .map_err(|e| format!("the released key does not open: {e}"))?;
        let mut secret = SecretBuf::new(opened.len()).map_err(|e| format!("secret memory: {e}"))?;
        secret.as_mut_slice().copy_from_slice(&opened);
        // `opened` is zeroized as it drops here.
        Ok(secret)
    }
}
