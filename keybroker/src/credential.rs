//! TPM2_MakeCredential in software: pins an attestation key to an endorsement key.
//!
//! The broker protects a random secret to the IPU's endorsement key (EK) and binds it to the
//! name of the attestation key (AK) being enrolled. Only a TPM holding both that EK and an
//! object with that AK name recovers the secret (TPM2_ActivateCredential), so an AK that
//! answers with it is proven to live in the TPM whose EK was enrolled. TPM 2.0 Library Part 1,
//! 24 (credential protection) and Annex C/D (ECC secret sharing, KDFa, KDFe); ECC P-256 EKs
//! with SHA-256 and AES-128-CFB, the default ECC EK template.

use aes::cipher::{AsyncStreamCipher, KeyIvInit};
use p256::elliptic_curve::sec1::{FromEncodedPoint, ToEncodedPoint};
use ring::digest::{digest, SHA256};
use ring::hmac;
use zeroize::Zeroizing;

use crate::tpm2::{Malformed, Reader, ALG_ECC, ALG_SHA256, ECC_NIST_P256};

const ALG_AES: u16 = 0x0006;
const ALG_CFB: u16 = 0x0043;

/// What an EK's TPMT_PUBLIC says that MakeCredential needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndorsementKey {
    point: p256::PublicKey,
    x: Vec<u8>,
}

impl EndorsementKey {
    /// Parses an ECC P-256 EK's marshalled TPMT_PUBLIC (SHA-256 name, AES-128-CFB, a
    /// restricted decryption key). The error says what is wrong with it, not that it is the
    /// endorsement key: the caller says that.
    pub fn parse(template: &[u8]) -> Result<Self, Malformed> {
        use crate::tpm2::object_attributes::*;
        let bad = |m: &str| Malformed(m.to_string());
        let mut r = Reader::new(template);
        if r.u16("type")? != ALG_ECC {
            return Err(bad("not an ECC key (only ECC P-256 EKs are supported)"));
        }
        if r.u16("nameAlg")? != ALG_SHA256 {
            return Err(bad("name algorithm is not SHA-256"));
        }
        let attrs = r.u32("objectAttributes")?;
        if attrs & (RESTRICTED | DECRYPT) != RESTRICTED | DECRYPT || attrs & SIGN != 0 {
            return Err(bad("not a restricted decryption key"));
        }
        let _policy = r.tpm2b("authPolicy")?;
        let (alg, bits, mode) = (r.u16("symmetric")?, r.u16("keyBits")?, r.u16("mode")?);
        if (alg, bits, mode) != (ALG_AES, 128, ALG_CFB) {
            return Err(bad("symmetric algorithm is not AES-128-CFB"));
        }
        let _scheme = r.u16("scheme")?;
        if r.u16("curveID")? != ECC_NIST_P256 {
            return Err(bad("not on P-256"));
        }
        let _kdf = r.u16("kdf")?;
        let (x, y) = (r.tpm2b("x")?, r.tpm2b("y")?);
        if x.len() > 32 || y.len() > 32 || !r.done() {
            return Err(bad("malformed point"));
        }
        let pad = |v: &[u8]| {
            let mut out = vec![0u8; 32 - v.len()];
            out.extend_from_slice(v);
            out
        };
        let encoded = p256::EncodedPoint::from_affine_coordinates(
            pad(&x).as_slice().into(),
            pad(&y).as_slice().into(),
            false,
        );
        let point = Option::from(p256::PublicKey::from_encoded_point(&encoded))
            .ok_or_else(|| bad("point is not on the curve"))?;
        Ok(Self { point, x })
    }
}

/// The TPM's name of an object: nameAlg || SHA-256(TPMT_PUBLIC).
pub fn object_name(template: &[u8]) -> Vec<u8> {
    let mut name = ALG_SHA256.to_be_bytes().to_vec();
    name.extend_from_slice(digest(&SHA256, template).as_ref());
    name
}

/// KDFa (SP 800-108 counter mode with HMAC-SHA256), Part 1 11.4.10.2.
fn kdfa(
    key: &[u8],
    label: &str,
    context_u: &[u8],
    context_v: &[u8],
    bits: u32,
) -> Zeroizing<Vec<u8>> {
    let key = hmac::Key::new(hmac::HMAC_SHA256, key);
    let mut out = Zeroizing::new(Vec::new());
    let mut counter = 1u32;
    while out.len() * 8 < bits as usize {
        let mut ctx = hmac::Context::with_key(&key);
        ctx.update(&counter.to_be_bytes());
        ctx.update(label.as_bytes());
        ctx.update(&[0]);
        ctx.update(context_u);
        ctx.update(context_v);
        ctx.update(&bits.to_be_bytes());
        out.extend_from_slice(ctx.sign().as_ref());
        counter += 1;
    }
    out.truncate(bits as usize / 8);
    out
}

/// KDFe (SP 800-56A concatenation KDF with SHA-256), Part 1 11.4.10.3.
fn kdfe(z: &[u8], label: &str, party_u: &[u8], party_v: &[u8], bits: u32) -> Zeroizing<Vec<u8>> {
    let mut out = Zeroizing::new(Vec::new());
    let mut counter = 1u32;
    while out.len() * 8 < bits as usize {
        let mut ctx = ring::digest::Context::new(&SHA256);
        ctx.update(&counter.to_be_bytes());
        ctx.update(z);
        ctx.update(label.as_bytes());
        ctx.update(&[0]);
        ctx.update(party_u);
        ctx.update(party_v);
        out.extend_from_slice(ctx.finish().as_ref());
        counter += 1;
    }
    out.truncate(bits as usize / 8);
    out
}

fn tpm2b(v: &[u8]) -> Vec<u8> {
    let mut out = (v.len() as u16).to_be_bytes().to_vec();
    out.extend_from_slice(v);
    out
}

/// A credential for TPM2_ActivateCredential: the buffers of TPM2B_ID_OBJECT and
/// TPM2B_ENCRYPTED_SECRET.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Credential {
    pub id_object: Vec<u8>,
    pub encrypted_secret: Vec<u8>,
}

/// Protects `secret` (at most 32 bytes) to `ek` for the object named `ak_name`.
pub fn make_credential(ek: &EndorsementKey, ak_name: &[u8], secret: &[u8]) -> Credential {
    assert!(
        secret.len() <= 32,
        "a credential is at most a SHA-256 digest"
    );
    // Secret sharing with a one-time key on the EK's curve (Part 1, C.6.4).
    let ephemeral = p256::SecretKey::random(&mut rand_core::OsRng);
    let shared = p256::ecdh::diffie_hellman(ephemeral.to_nonzero_scalar(), ek.point.as_affine());
    let ephemeral_point = ephemeral.public_key().to_encoded_point(false);
    let ephemeral_x = ephemeral_point.x().expect("uncompressed").to_vec();
    let ephemeral_y = ephemeral_point.y().expect("uncompressed").to_vec();
    let seed = kdfe(
        shared.raw_secret_bytes(),
        "IDENTITY",
        &ephemeral_x,
        &ek.x,
        256,
    );
    let mut encrypted_secret = tpm2b(&ephemeral_x);
    encrypted_secret.extend(tpm2b(&ephemeral_y));

    // The credential, encrypted and integrity-protected under keys from the seed (24.4).
    let sym_key = kdfa(&seed, "STORAGE", ak_name, &[], 128);
    let mut enc_identity = tpm2b(secret);
    cfb_mode::Encryptor::<aes::Aes128>::new(sym_key.as_slice().into(), &[0u8; 16].into())
        .encrypt(&mut enc_identity);
    let hmac_key = kdfa(&seed, "INTEGRITY", &[], &[], 256);
    let mut mac = hmac::Context::with_key(&hmac::Key::new(hmac::HMAC_SHA256, &hmac_key));
    mac.update(&enc_identity);
    mac.update(ak_name);
    let mut id_object = tpm2b(mac.sign().as_ref());
    id_object.extend_from_slice(&enc_identity);
    Credential {
        id_object,
        encrypted_secret,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SP 800-108 counter-mode output lengths and determinism; the TPM itself checks the
    /// real thing in tests/tests/attestation.rs.
    #[test]
    fn kdfs_give_the_asked_length_and_depend_on_every_input() {
        let a = kdfa(b"key", "STORAGE", b"name", b"", 128);
        assert_eq!(a.len(), 16);
        assert_ne!(a, kdfa(b"key", "INTEGRITY", b"name", b"", 128));
        assert_ne!(a, kdfa(b"key", "STORAGE", b"other", b"", 128));
        assert_eq!(kdfa(b"key", "INTEGRITY", b"", b"", 256).len(), 32);
        assert_eq!(kdfe(b"z", "IDENTITY", b"u", b"v", 256).len(), 32);
        assert_ne!(
            kdfe(b"z", "IDENTITY", b"u", b"v", 256),
            kdfe(b"z", "IDENTITY", b"v", b"u", 256)
        );
    }

    #[test]
    fn only_ecc_p256_decryption_eks_parse() {
        assert!(EndorsementKey::parse(&[0x00, 0x01]).is_err());
        assert!(EndorsementKey::parse(&[]).is_err());
    }
}
