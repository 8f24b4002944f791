//! A master key sealed by the broker host's TPM: the file on disk (`master.sealed`) is a
//! TPM object that only the TPM that made it can unseal, so a copy of the state directory
//! (keys, enrollments, the sealed master key) is useless on any other machine.
//!
//! The key is a keyed-hash object holding 32 random bytes, created under an ECC P-256
//! storage primary key of the owner hierarchy (re-derived from the TPM's seed on every
//! start, so nothing else is persisted in the TPM), with fixedTPM and fixedParent set.
//! It is not bound to PCR values: the broker host's boot state is not what the broker
//! attests (IPUs are).

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::str::FromStr;

use ring::rand::{SecureRandom, SystemRandom};
use tss_esapi::attributes::ObjectAttributesBuilder;
use tss_esapi::handles::KeyHandle;
use tss_esapi::interface_types::algorithm::{HashingAlgorithm, PublicAlgorithm};
use tss_esapi::interface_types::ecc::EccCurve;
use tss_esapi::interface_types::resource_handles::Hierarchy;
use tss_esapi::structures::{
    Digest, EccPoint, KeyedHashScheme, Private, Public, PublicBuilder, PublicEccParametersBuilder,
    PublicKeyedHashParameters, SensitiveData, SymmetricDefinitionObject,
};
use tss_esapi::tcti_ldr::TctiNameConf;
use tss_esapi::traits::{Marshall, UnMarshall};
use tss_esapi::Context;
use zeroize::Zeroizing;

use crate::keystore::{KeyStoreError, MasterKey};

/// File magic and version of `master.sealed`.
const MAGIC: &[u8; 8] = b"KBSEAL01";

fn err(path: &Path, message: impl std::fmt::Display) -> KeyStoreError {
    KeyStoreError::MasterKey {
        path: path.display().to_string(),
        message: message.to_string(),
    }
}

fn storage_primary(ctx: &mut Context) -> tss_esapi::Result<KeyHandle> {
    let attributes = ObjectAttributesBuilder::new()
        .with_fixed_tpm(true)
        .with_fixed_parent(true)
        .with_sensitive_data_origin(true)
        .with_user_with_auth(true)
        .with_restricted(true)
        .with_decrypt(true)
        .build()?;
    let public = PublicBuilder::new()
        .with_public_algorithm(PublicAlgorithm::Ecc)
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(attributes)
        .with_ecc_parameters(
            PublicEccParametersBuilder::new_restricted_decryption_key(
                SymmetricDefinitionObject::AES_128_CFB,
                EccCurve::NistP256,
            )
            .build()?,
        )
        .with_ecc_unique_identifier(EccPoint::default())
        .build()?;
    ctx.execute_with_nullauth_session(|ctx| {
        ctx.create_primary(Hierarchy::Owner, public, None, None, None, None)
    })
    .map(|r| r.key_handle)
}

fn sealed_object_template() -> tss_esapi::Result<Public> {
    // No sensitiveDataOrigin: the data is ours. No sign/decrypt: only unsealable.
    let attributes = ObjectAttributesBuilder::new()
        .with_fixed_tpm(true)
        .with_fixed_parent(true)
        .with_user_with_auth(true)
        .build()?;
    PublicBuilder::new()
        .with_public_algorithm(PublicAlgorithm::KeyedHash)
        .with_name_hashing_algorithm(HashingAlgorithm::Sha256)
        .with_object_attributes(attributes)
        .with_keyed_hash_parameters(PublicKeyedHashParameters::new(KeyedHashScheme::Null))
        .with_keyed_hash_unique_identifier(Digest::default())
        .build()
}

/// Unseals the master key in `path` with the TPM at `tcti`, sealing a new random one there
/// first if the file does not exist.
pub fn load_or_create_sealed(path: &Path, tcti: &str) -> Result<MasterKey, KeyStoreError> {
    let conf = TctiNameConf::from_str(tcti).map_err(|e| err(path, format!("TPM {tcti}: {e}")))?;
    let mut ctx = Context::new(conf).map_err(|e| err(path, format!("TPM {tcti}: {e}")))?;
    let primary =
        storage_primary(&mut ctx).map_err(|e| err(path, format!("TPM storage key: {e}")))?;
    let result = if path.exists() {
        unseal(&mut ctx, primary, path)
    } else {
        seal_new(&mut ctx, primary, path)
    };
    let _ = ctx.flush_context(primary.into());
    result
}

fn seal_new(
    ctx: &mut Context,
    primary: KeyHandle,
    path: &Path,
) -> Result<MasterKey, KeyStoreError> {
    let mut key = Zeroizing::new([0u8; 32]);
    SystemRandom::new()
        .fill(key.as_mut())
        .map_err(|_| err(path, "no randomness"))?;
    let sensitive = SensitiveData::try_from(key.to_vec()).map_err(|e| err(path, e))?;
    let template = sealed_object_template().map_err(|e| err(path, e))?;
    let created = ctx
        .execute_with_nullauth_session(|ctx| {
            ctx.create(primary, template, None, Some(sensitive), None, None)
        })
        .map_err(|e| err(path, format!("TPM seal: {e}")))?;
    let public = created.out_public.marshall().map_err(|e| err(path, e))?;
    let private = created.out_private.value().to_vec();
    let mut file = MAGIC.to_vec();
    for part in [&public, &private] {
        file.extend_from_slice(&(part.len() as u32).to_be_bytes());
        file.extend_from_slice(part);
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| err(path, e))?;
    f.write_all(&file).map_err(|e| err(path, e))?;
    f.sync_all().map_err(|e| err(path, e))?;
    Ok(MasterKey::from_bytes(key))
}

fn unseal(ctx: &mut Context, primary: KeyHandle, path: &Path) -> Result<MasterKey, KeyStoreError> {
    let bytes = std::fs::read(path).map_err(|e| err(path, e))?;
    let malformed = || err(path, "not a sealed master key (KBSEAL01)");
    let rest = bytes.strip_prefix(MAGIC.as_slice()).ok_or_else(malformed)?;
    let mut parts = Vec::new();
    let mut at = 0;
    for _ in 0..2 {
        let len = rest
            .get(at..at + 4)
            .map(|b| u32::from_be_bytes(b.try_into().expect("4")) as usize)
            .ok_or_else(malformed)?;
        let part = rest.get(at + 4..at + 4 + len).ok_or_else(malformed)?;
        parts.push(part);
        at += 4 + len;
    }
    if at != rest.len() {
        return Err(malformed());
    }
    let public = Public::unmarshall(parts[0]).map_err(|_| malformed())?;
    let private = Private::try_from(parts[1].to_vec()).map_err(|_| malformed())?;
    let object = ctx
        .execute_with_nullauth_session(|ctx| ctx.load(primary, private, public))
        .map_err(|e| {
            err(
                path,
                format!("this TPM cannot load the sealed master key (sealed by another TPM, or changed): {e}"),
            )
        })?;
    let unsealed = ctx.execute_with_nullauth_session(|ctx| ctx.unseal(object.into()));
    let _ = ctx.flush_context(object.into());
    let data = Zeroizing::new(
        unsealed
            .map_err(|e| err(path, format!("TPM unseal: {e}")))?
            .value()
            .to_vec(),
    );
    let key: [u8; 32] = data
        .as_slice()
        .try_into()
        .map_err(|_| err(path, format!("unsealed {} bytes, not 32", data.len())))?;
    Ok(MasterKey::from_bytes(Zeroizing::new(key)))
}
