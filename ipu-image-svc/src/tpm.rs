//! The IPU's side of attestation: an ECC P-256 attestation key (AK) under the TPM's
//! endorsement key, and quotes over the PCRs the broker asks for, bound to the broker's nonce
//! and this IPU's ephemeral session key.
//!
//! Through tss-esapi 7.x against tpm2-tss (swtpm in tests, `/dev/tpmrm0` on hardware).

use std::collections::BTreeMap;
use std::str::FromStr;

use broker_protocol::{binding, Evidence};
use tss_esapi::abstraction::{ak, ek, pcr, DefaultKey};
use tss_esapi::handles::KeyHandle;
use tss_esapi::interface_types::algorithm::{
    AsymmetricAlgorithm, HashingAlgorithm, SignatureSchemeAlgorithm,
};
use tss_esapi::structures::{
    Data, PcrSelectionList, PcrSelectionListBuilder, PcrSlot, Public, Signature, SignatureScheme,
};
use tss_esapi::tcti_ldr::TctiNameConf;
use tss_esapi::traits::Marshall;
use tss_esapi::Context;

#[derive(Debug, thiserror::Error)]
pub enum TpmError {
    #[error("TPM {what}: {source}")]
    Tpm {
        what: &'static str,
        #[source]
        source: tss_esapi::Error,
    },
    #[error("TPM returned {0}")]
    Unexpected(String),
    #[error("PCR {0} is not 0 to 23")]
    BadPcr(u8),
}

fn tpm(what: &'static str) -> impl FnOnce(tss_esapi::Error) -> TpmError {
    move |source| TpmError::Tpm { what, source }
}

/// Left-pads a big-endian integer to `n` bytes (TPMs drop leading zeros).
fn pad(v: &[u8], n: usize) -> Result<Vec<u8>, TpmError> {
    if v.len() > n {
        return Err(TpmError::Unexpected(format!(
            "a {}-byte P-256 value",
            v.len()
        )));
    }
    let mut out = vec![0u8; n - v.len()];
    out.extend_from_slice(v);
    Ok(out)
}

/// Where `ipu-image-svc` keeps its attestation key (owner persistent range).
pub const DEFAULT_AK_HANDLE: u32 = 0x8101_0010;

/// An open TPM with a loaded attestation key.
pub struct Tpm {
    ctx: Context,
    ak: KeyHandle,
    /// SEC1 uncompressed P-256 point of the AK: what the broker enrolls.
    ak_public: Vec<u8>,
    /// The AK's marshalled TPMT_PUBLIC (attributes included), for enrollment.
    ak_template: Vec<u8>,
}

impl Tpm {
    /// Opens the TPM at `tcti` (e.g. `swtpm:host=127.0.0.1,port=2321` or `device:/dev/tpmrm0`)
    /// and creates a fresh AK under the ECC endorsement key (gone when the context closes).
    pub fn open(tcti: &str) -> Result<Self, TpmError> {
        let mut ctx = Self::context(tcti)?;
        let (ak, _) = Self::create_ak(&mut ctx)?;
        Self::with_ak(ctx, ak)
    }

    /// Opens the TPM with the AK persisted at `handle` (e.g. [`DEFAULT_AK_HANDLE`]), creating
    /// and persisting it on first use: the key a broker enrolls must outlive the process.
    pub fn open_persistent(tcti: &str, handle: u32) -> Result<Self, TpmError> {
        use tss_esapi::handles::{PersistentTpmHandle, TpmHandle};
        use tss_esapi::interface_types::dynamic_handles::Persistent;
        use tss_esapi::interface_types::resource_handles::Provision;
        use tss_esapi::interface_types::session_handles::AuthSession;
        let mut ctx = Self::context(tcti)?;
        let persistent = PersistentTpmHandle::new(handle).map_err(tpm("persistent handle"))?;
        if let Ok(obj) = ctx.tr_from_tpm_public(TpmHandle::Persistent(persistent)) {
            return Self::with_ak(ctx, obj.into());
        }
        let (ak, _) = Self::create_ak(&mut ctx)?;
        ctx.execute_with_session(Some(AuthSession::Password), |ctx| {
            ctx.evict_control(
                Provision::Owner,
                ak.into(),
                Persistent::Persistent(persistent),
            )
        })
        .map_err(tpm("persist attestation key"))?;
        ctx.flush_context(ak.into()).map_err(tpm("flush AK"))?;
        let obj = ctx
            .tr_from_tpm_public(TpmHandle::Persistent(persistent))
            .map_err(tpm("persisted attestation key"))?;
        Self::with_ak(ctx, obj.into())
    }

    fn context(tcti: &str) -> Result<Context, TpmError> {
        let conf = TctiNameConf::from_str(tcti).map_err(tpm("TCTI"))?;
        Context::new(conf).map_err(tpm("context"))
    }

    /// Creates and loads an AK under the ECC EK.
    fn create_ak(ctx: &mut Context) -> Result<(KeyHandle, Public), TpmError> {
        let ek = ek::create_ek_object(ctx, AsymmetricAlgorithm::Ecc, DefaultKey)
            .map_err(tpm("endorsement key"))?;
        let created = ak::create_ak(
            ctx,
            ek,
            HashingAlgorithm::Sha256,
            SignatureSchemeAlgorithm::EcDsa,
            None,
            DefaultKey,
        )
        .map_err(tpm("create attestation key"))?;
        let public = created.out_public.clone();
        let ak = ak::load_ak(ctx, ek, None, created.out_private, created.out_public)
            .map_err(tpm("load attestation key"))?;
        // The EK stays loaded only as long as needed: swtpm has three object slots.
        ctx.flush_context(ek.into()).map_err(tpm("flush EK"))?;
        Ok((ak, public))
    }

    fn with_ak(mut ctx: Context, ak: KeyHandle) -> Result<Self, TpmError> {
        let (public, _, _) = ctx.read_public(ak).map_err(tpm("read AK public"))?;
        let ak_template = public.marshall().map_err(tpm("marshall AK public"))?;
        let ak_public = match &public {
            Public::Ecc { unique, .. } => {
                let mut p = vec![0x04];
                p.extend(pad(unique.x().value(), 32)?);
                p.extend(pad(unique.y().value(), 32)?);
                p
            }
            other => return Err(TpmError::Unexpected(format!("an AK of type {other:?}"))),
        };
        Ok(Self {
            ctx,
            ak,
            ak_public,
            ak_template,
        })
    }

    pub fn ak_public(&self) -> &[u8] {
        &self.ak_public
    }

    pub fn ak_template(&self) -> &[u8] {
        &self.ak_template
    }

    fn selection(pcrs: &[u8]) -> Result<PcrSelectionList, TpmError> {
        let slots = pcrs
            .iter()
            .map(|&i| {
                if i > 23 {
                    return Err(TpmError::BadPcr(i));
                }
                PcrSlot::try_from(1u32 << i).map_err(tpm("PCR slot"))
            })
            .collect::<Result<Vec<_>, _>>()?;
        PcrSelectionListBuilder::new()
            .with_selection(HashingAlgorithm::Sha256, &slots)
            .build()
            .map_err(tpm("PCR selection"))
    }

    /// Reads the SHA-256 bank values of `pcrs`.
    pub fn read_pcrs(&mut self, pcrs: &[u8]) -> Result<BTreeMap<u8, Vec<u8>>, TpmError> {
        let data = pcr::read_all(&mut self.ctx, Self::selection(pcrs)?).map_err(tpm("PCR read"))?;
        let bank = data
            .pcr_bank(HashingAlgorithm::Sha256)
            .ok_or_else(|| TpmError::Unexpected("no SHA-256 PCR bank".into()))?;
        let mut out = BTreeMap::new();
        for &i in pcrs {
            let slot = PcrSlot::try_from(1u32 << i).map_err(tpm("PCR slot"))?;
            let d = bank
                .get_digest(slot)
                .ok_or_else(|| TpmError::Unexpected(format!("PCR {i} missing from the read")))?;
            out.insert(i, d.value().to_vec());
        }
        Ok(out)
    }

    /// Quotes `pcrs` (SHA-256 bank) bound to `nonce` and `ephemeral_public`.
    pub fn quote(
        &mut self,
        nonce: &[u8],
        ephemeral_public: &[u8],
        pcrs: &[u8],
    ) -> Result<Evidence, TpmError> {
        let selection = Self::selection(pcrs)?;
        let qualifying = Data::try_from(binding(nonce, ephemeral_public).to_vec())
            .map_err(tpm("qualifying data"))?;
        let ak = self.ak;
        // The AK has an empty auth value: a password session avoids starting (and
        // flushing) an HMAC session per quote, two TPM round trips.
        let (attest, signature) = self
            .ctx
            .execute_with_session(
                Some(tss_esapi::interface_types::session_handles::AuthSession::Password),
                |ctx| ctx.quote(ak, qualifying, SignatureScheme::Null, selection),
            )
            .map_err(tpm("quote"))?;
        let signature = match signature {
            Signature::EcDsa(s) => {
                let mut rs = pad(s.signature_r().value(), 32)?;
                rs.extend(pad(s.signature_s().value(), 32)?);
                rs
            }
            other => return Err(TpmError::Unexpected(format!("a {other:?} signature"))),
        };
        // The values after the quote: if a PCR changed in between, the digest will not
        // match and the broker refuses; the IPU retries with a new nonce.
        let values = self.read_pcrs(pcrs)?;
        Ok(Evidence {
            attest: attest.marshall().map_err(tpm("marshall quote"))?,
            signature,
            pcrs: values,
        })
    }

    /// The endorsement key's marshalled `TPMT_PUBLIC` (for EK certificates, and to show the
    /// broker refuses an EK posing as an AK).
    pub fn ek_template(&mut self) -> Result<Vec<u8>, TpmError> {
        let ek = ek::create_ek_object(&mut self.ctx, AsymmetricAlgorithm::Ecc, DefaultKey)
            .map_err(tpm("endorsement key"))?;
        let public = self.ctx.read_public(ek).map_err(tpm("read EK public"));
        self.ctx.flush_context(ek.into()).map_err(tpm("flush EK"))?;
        public?.0.marshall().map_err(tpm("marshall EK public"))
    }

    /// TPM2_ActivateCredential: recovers the secret a broker protected to this TPM's EK for
    /// this AK's name (`keybroker::credential::make_credential`). Fails on any other TPM, or
    /// for any other AK.
    pub fn activate_credential(
        &mut self,
        id_object: &[u8],
        encrypted_secret: &[u8],
    ) -> Result<zeroize::Zeroizing<Vec<u8>>, TpmError> {
        use tss_esapi::attributes::SessionAttributesBuilder;
        use tss_esapi::constants::SessionType;
        use tss_esapi::handles::AuthHandle;
        use tss_esapi::interface_types::session_handles::{AuthSession, PolicySession};
        use tss_esapi::structures::{EncryptedSecret, IdObject, SymmetricDefinition};
        let id_object = IdObject::try_from(id_object.to_vec()).map_err(tpm("credential"))?;
        let secret =
            EncryptedSecret::try_from(encrypted_secret.to_vec()).map_err(tpm("credential"))?;
        let ek = ek::create_ek_object(&mut self.ctx, AsymmetricAlgorithm::Ecc, DefaultKey)
            .map_err(tpm("endorsement key"))?;
        // The EK is usable only in a policy session satisfying PolicySecret(endorsement).
        let session = self
            .ctx
            .start_auth_session(
                None,
                None,
                None,
                SessionType::Policy,
                SymmetricDefinition::AES_128_CFB,
                HashingAlgorithm::Sha256,
            )
            .map_err(tpm("policy session"))?
            .ok_or_else(|| TpmError::Unexpected("no policy session".into()))?;
        let ak = self.ak;
        let result = (|| {
            let (attributes, mask) = SessionAttributesBuilder::new()
                .with_decrypt(true)
                .with_encrypt(true)
                .build();
            self.ctx
                .tr_sess_set_attributes(session, attributes, mask)
                .map_err(tpm("policy session"))?;
            let policy = PolicySession::try_from(session).map_err(tpm("policy session"))?;
            self.ctx
                .execute_with_nullauth_session(|ctx| {
                    ctx.policy_secret(
                        policy,
                        AuthHandle::Endorsement,
                        Default::default(),
                        Default::default(),
                        Default::default(),
                        None,
                    )
                })
                .map_err(tpm("PolicySecret"))?;
            self.ctx
                .execute_with_sessions((Some(AuthSession::Password), Some(session), None), |ctx| {
                    ctx.activate_credential(ak, ek, id_object, secret)
                })
                .map(|d| zeroize::Zeroizing::new(d.value().to_vec()))
                .map_err(tpm("activate credential"))
        })();
        let _ = self
            .ctx
            .flush_context(tss_esapi::handles::SessionHandle::from(session).into());
        let _ = self.ctx.flush_context(ek.into());
        result
    }

    /// Extends a PCR (tests, and measured components on real IPUs).
    pub fn extend_pcr(&mut self, index: u8, measurement: &[u8; 32]) -> Result<(), TpmError> {
        use tss_esapi::handles::PcrHandle;
        use tss_esapi::structures::{Digest, DigestValues};
        if index > 23 {
            return Err(TpmError::BadPcr(index));
        }
        let handle = PcrHandle::try_from(u32::from(index)).map_err(tpm("PCR handle"))?;
        let mut values = DigestValues::new();
        values.set(
            HashingAlgorithm::Sha256,
            Digest::try_from(measurement.to_vec()).map_err(tpm("digest"))?,
        );
        self.ctx
            .execute_with_nullauth_session(|ctx| ctx.pcr_extend(handle, values))
            .map_err(tpm("PCR extend"))
    }
}

/// SHA-256 PCR values as a deployment policy `pcrs = { ... }` line (an IPU class's reference
/// values, read from a known-good IPU).
pub fn pcrs_line(values: &BTreeMap<u8, Vec<u8>>) -> String {
    let fields: Vec<String> = values
        .iter()
        .map(|(i, v)| format!("{i} = \"{}\"", hex::encode(v)))
        .collect();
    format!("pcrs = {{ {} }}", fields.join(", "))
}

#[cfg(test)]
mod pcrs_line_tests {
    #[test]
    fn a_policy_line_in_index_order() {
        let values = [(7u8, vec![0xab; 2]), (0u8, vec![0x01])]
            .into_iter()
            .collect();
        assert_eq!(
            super::pcrs_line(&values),
            r#"pcrs = { 0 = "01", 7 = "abab" }"#
        );
    }
}
