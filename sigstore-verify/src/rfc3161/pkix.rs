//! Signature algorithms (for certificates and CMS signer infos) mapped onto `ring`, and the
//! certificate extensions a TSA chain is judged by.

use der::asn1::ObjectIdentifier;
use der::{Decode, Encode};
use ring::signature::{self as sig, UnparsedPublicKey, VerificationAlgorithm};
use spki::{AlgorithmIdentifierOwned, AlgorithmIdentifierRef, SubjectPublicKeyInfoOwned};
use x509_cert::ext::pkix::{BasicConstraints, ExtendedKeyUsage, SubjectKeyIdentifier};
use x509_cert::Certificate;

use super::asn1::RsaPssParams;

const SHA256: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.16.840.1.101.3.4.2.1");
const SHA384: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.16.840.1.101.3.4.2.2");
const SHA512: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.16.840.1.101.3.4.2.3");

const ID_EC_PUBLIC_KEY: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.2.1");
const SECP256R1: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.3.1.7");
const SECP384R1: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.132.0.34");
const ECDSA_WITH_SHA256: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.4.3.2");
const ECDSA_WITH_SHA384: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.4.3.3");
const ECDSA_WITH_SHA512: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.4.3.4");
const RSA_ENCRYPTION: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.1");
const ID_MGF1: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.8");
const RSASSA_PSS: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.10");
const SHA256_WITH_RSA: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.11");
const SHA384_WITH_RSA: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.12");
const SHA512_WITH_RSA: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.1.13");
const ID_ED25519: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.101.112");

const BASIC_CONSTRAINTS: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.29.19");
const EXTENDED_KEY_USAGE: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.29.37");
const SUBJECT_KEY_IDENTIFIER: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.29.14");
const ANY_EXTENDED_KEY_USAGE: ObjectIdentifier = ObjectIdentifier::new_unwrap("2.5.29.37.0");
const ID_KP_TIME_STAMPING: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.6.1.5.5.7.3.8");

/// The hash functions a time-stamp token may use (SHA-1 is refused as too weak).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Hash {
    Sha256,
    Sha384,
    Sha512,
}

impl Hash {
    pub fn from_oid(oid: ObjectIdentifier) -> Option<Self> {
        match oid {
            SHA256 => Some(Self::Sha256),
            SHA384 => Some(Self::Sha384),
            SHA512 => Some(Self::Sha512),
            _ => None,
        }
    }

    pub fn digest(self, data: &[u8]) -> Vec<u8> {
        let algorithm = match self {
            Self::Sha256 => &ring::digest::SHA256,
            Self::Sha384 => &ring::digest::SHA384,
            Self::Sha512 => &ring::digest::SHA512,
        };
        ring::digest::digest(algorithm, data).as_ref().to_vec()
    }

    fn len(self) -> u32 {
        match self {
            Self::Sha256 => 32,
            Self::Sha384 => 48,
            Self::Sha512 => 64,
        }
    }
}

#[derive(Debug)]
pub(super) enum SignatureError {
    /// The algorithm or key is not one this crate verifies; says which.
    Unsupported(String),
    /// The signature does not verify.
    Invalid,
}

/// Verifies `signature` over `message` by the key `spki` under `algorithm`. For the bare key
/// algorithms CMS allows as a signature algorithm (`rsaEncryption`, `id-ecPublicKey`), the
/// hash is `digest` (the signer info's digest algorithm).
pub(super) fn verify_signature(
    spki: &SubjectPublicKeyInfoOwned,
    algorithm: &AlgorithmIdentifierOwned,
    digest: Option<Hash>,
    message: &[u8],
    signature: &[u8],
) -> Result<(), SignatureError> {
    let ring_algorithm = ring_algorithm(spki, algorithm, digest)?;
    let key = spki.subject_public_key.as_bytes().ok_or_else(|| {
        SignatureError::Unsupported("public key bit string is not whole bytes".into())
    })?;
    UnparsedPublicKey::new(ring_algorithm, key)
        .verify(message, signature)
        .map_err(|_| SignatureError::Invalid)
}

fn ring_algorithm(
    spki: &SubjectPublicKeyInfoOwned,
    algorithm: &AlgorithmIdentifierOwned,
    digest: Option<Hash>,
) -> Result<&'static dyn VerificationAlgorithm, SignatureError> {
    use Hash::*;
    let unsupported = |what: String| Err(SignatureError::Unsupported(what));
    let key_oid = spki.algorithm.oid;
    let hash = match algorithm.oid {
        ECDSA_WITH_SHA256 | SHA256_WITH_RSA => Some(Sha256),
        ECDSA_WITH_SHA384 | SHA384_WITH_RSA => Some(Sha384),
        ECDSA_WITH_SHA512 | SHA512_WITH_RSA => Some(Sha512),
        ID_EC_PUBLIC_KEY | RSA_ENCRYPTION => digest,
        RSASSA_PSS => Some(pss_hash(algorithm)?),
        _ => None,
    };
    let family = match algorithm.oid {
        ECDSA_WITH_SHA256 | ECDSA_WITH_SHA384 | ECDSA_WITH_SHA512 | ID_EC_PUBLIC_KEY => "ecdsa",
        SHA256_WITH_RSA | SHA384_WITH_RSA | SHA512_WITH_RSA | RSA_ENCRYPTION => "rsa-pkcs1",
        RSASSA_PSS => "rsa-pss",
        ID_ED25519 => "ed25519",
        other => return unsupported(format!("signature algorithm {other}")),
    };
    let curve = spki
        .algorithm
        .parameters
        .as_ref()
        .and_then(|p| p.decode_as().ok());
    Ok(match (family, key_oid, curve, hash) {
        ("ecdsa", ID_EC_PUBLIC_KEY, Some(SECP256R1), Some(Sha256)) => &sig::ECDSA_P256_SHA256_ASN1,
        ("ecdsa", ID_EC_PUBLIC_KEY, Some(SECP256R1), Some(Sha384)) => &sig::ECDSA_P256_SHA384_ASN1,
        ("ecdsa", ID_EC_PUBLIC_KEY, Some(SECP384R1), Some(Sha256)) => &sig::ECDSA_P384_SHA256_ASN1,
        ("ecdsa", ID_EC_PUBLIC_KEY, Some(SECP384R1), Some(Sha384)) => &sig::ECDSA_P384_SHA384_ASN1,
        ("rsa-pkcs1", RSA_ENCRYPTION, _, Some(Sha256)) => &sig::RSA_PKCS1_2048_8192_SHA256,
        ("rsa-pkcs1", RSA_ENCRYPTION, _, Some(Sha384)) => &sig::RSA_PKCS1_2048_8192_SHA384,
        ("rsa-pkcs1", RSA_ENCRYPTION, _, Some(Sha512)) => &sig::RSA_PKCS1_2048_8192_SHA512,
        ("rsa-pss", RSA_ENCRYPTION | RSASSA_PSS, _, Some(Sha256)) => &sig::RSA_PSS_2048_8192_SHA256,
        ("rsa-pss", RSA_ENCRYPTION | RSASSA_PSS, _, Some(Sha384)) => &sig::RSA_PSS_2048_8192_SHA384,
        ("rsa-pss", RSA_ENCRYPTION | RSASSA_PSS, _, Some(Sha512)) => &sig::RSA_PSS_2048_8192_SHA512,
        ("ed25519", ID_ED25519, _, _) => &sig::ED25519,
        _ => {
            return unsupported(format!(
                "signature algorithm {} with hash {hash:?} for a {key_oid} key (curve {curve:?})",
                algorithm.oid
            ));
        }
    })
}

/// The hash of RSASSA-PSS parameters, if they are the ones `ring` verifies: MGF1 with the
/// same hash, a salt as long as the hash, the usual trailer.
fn pss_hash(algorithm: &AlgorithmIdentifierOwned) -> Result<Hash, SignatureError> {
    let unsupported = || SignatureError::Unsupported("RSASSA-PSS parameters".into());
    let params = algorithm.parameters.as_ref().ok_or_else(unsupported)?;
    let params: RsaPssParams<'_> = params.decode_as().map_err(|_| unsupported())?;
    let hash = params
        .hash_algorithm
        .and_then(|h| Hash::from_oid(h.oid))
        .ok_or_else(unsupported)?;
    let mgf_hash = params
        .mask_gen_algorithm
        .filter(|m| m.oid == ID_MGF1)
        .and_then(|m| m.parameters?.decode_as::<AlgorithmIdentifierRef<'_>>().ok())
        .and_then(|h| Hash::from_oid(h.oid));
    let standard = mgf_hash == Some(hash)
        && params.salt_length == Some(hash.len())
        && params.trailer_field.unwrap_or(1) == 1;
    if standard {
        Ok(hash)
    } else {
        Err(unsupported())
    }
}

/// A parsed certificate with its DER, and the extensions a TSA chain is judged by.
pub(super) struct Cert {
    pub der: Vec<u8>,
    pub cert: Certificate,
}

impl Cert {
    pub fn parse(der: &[u8]) -> der::Result<Self> {
        Ok(Self {
            der: der.to_vec(),
            cert: Certificate::from_der(der)?,
        })
    }

    pub fn subject(&self) -> String {
        self.cert.tbs_certificate.subject.to_string()
    }

    fn extension<T: for<'a> Decode<'a>>(
        &self,
        oid: ObjectIdentifier,
    ) -> Result<Option<(bool, T)>, String> {
        let Some(ext) = self
            .cert
            .tbs_certificate
            .extensions
            .iter()
            .flatten()
            .find(|e| e.extn_id == oid)
        else {
            return Ok(None);
        };
        T::from_der(ext.extn_value.as_bytes())
            .map(|v| Some((ext.critical, v)))
            .map_err(|e| format!("extension {oid} of {}: {e}", self.subject()))
    }

    pub fn is_ca(&self) -> Result<bool, String> {
        Ok(self
            .extension::<BasicConstraints>(BASIC_CONSTRAINTS)?
            .is_some_and(|(_, bc)| bc.ca))
    }

    pub fn subject_key_identifier(&self) -> Result<Option<Vec<u8>>, String> {
        Ok(self
            .extension::<SubjectKeyIdentifier>(SUBJECT_KEY_IDENTIFIER)?
            .map(|(_, ski)| ski.0.as_bytes().to_vec()))
    }

    /// RFC 3161 §2.3: a TSA certificate is an end-entity certificate whose extended key
    /// usage is critical and is exactly id-kp-timeStamping.
    pub fn check_tsa_usage(&self) -> Result<(), String> {
        if self.is_ca()? {
            return Err("is a CA certificate, not an end-entity one".into());
        }
        match self.extension::<ExtendedKeyUsage>(EXTENDED_KEY_USAGE)? {
            None => Err("has no extended key usage".into()),
            Some((false, _)) => Err("extended key usage is not critical".into()),
            Some((true, ExtendedKeyUsage(usages))) if usages == [ID_KP_TIME_STAMPING] => Ok(()),
            Some((true, ExtendedKeyUsage(usages))) => Err(format!(
                "extended key usages are {usages:?}, not just timeStamping"
            )),
        }
    }

    /// An issuing certificate must be a CA, and if it restricts extended key usage, allow
    /// time stamping (as Go's chain verification and the timestamp-authority client ask).
    pub fn check_issuer_usage(&self) -> Result<(), String> {
        if !self.is_ca()? {
            return Err("is not a CA certificate".into());
        }
        match self.extension::<ExtendedKeyUsage>(EXTENDED_KEY_USAGE)? {
            Some((_, ExtendedKeyUsage(usages)))
                if !usages
                    .iter()
                    .any(|u| *u == ID_KP_TIME_STAMPING || *u == ANY_EXTENDED_KEY_USAGE) =>
            {
                Err("extended key usage does not allow time stamping".into())
            }
            _ => Ok(()),
        }
    }

    /// Whether this certificate's issuer is `issuer`'s subject and `issuer`'s key signed it.
    pub fn check_issued_by(&self, issuer: &Cert) -> Result<(), String> {
        let names_match = self.cert.tbs_certificate.issuer.to_der().ok()
            == issuer.cert.tbs_certificate.subject.to_der().ok();
        if !names_match {
            return Err(format!(
                "its issuer is {}",
                self.cert.tbs_certificate.issuer
            ));
        }
        let tbs = super::asn1::raw_tbs_certificate(&self.der).map_err(|e| e.to_string())?;
        let signature = self
            .cert
            .signature
            .as_bytes()
            .ok_or("signature bit string is not whole bytes")?;
        verify_signature(
            &issuer.cert.tbs_certificate.subject_public_key_info,
            &self.cert.signature_algorithm,
            None,
            &tbs,
            signature,
        )
        .map_err(|e| match e {
            SignatureError::Unsupported(what) => format!("unsupported {what}"),
            SignatureError::Invalid => "its signature does not verify".into(),
        })
    }
}
