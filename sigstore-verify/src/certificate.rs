//! The signing certificate: parsing, the Fulcio identity it carries, and its chain to a
//! certificate authority of the trusted root at a given time.

use std::collections::BTreeMap;
use std::time::SystemTime;

use der::asn1::ObjectIdentifier as Oid;
use der::{Decode, Encode, Reader, SliceReader};
use x509_cert::ext::pkix::name::GeneralName;
use x509_cert::ext::pkix::{
    BasicConstraints, ExtendedKeyUsage, KeyUsage, KeyUsages, SubjectAltName,
};
use x509_cert::Certificate;

use crate::keys::{scheme_for_certificate, KeyError, PublicKey, SignatureError};
use crate::time::Rfc3339;
use crate::trust_root::{CertificateAuthority, TrustedRoot};

const OID_SAN: Oid = Oid::new_unwrap("2.5.29.17");
const OID_BASIC_CONSTRAINTS: Oid = Oid::new_unwrap("2.5.29.19");
const OID_KEY_USAGE: Oid = Oid::new_unwrap("2.5.29.15");
const OID_EKU: Oid = Oid::new_unwrap("2.5.29.37");
const OID_EKU_CODE_SIGNING: Oid = Oid::new_unwrap("1.3.6.1.5.5.7.3.3");
const OID_EKU_ANY: Oid = Oid::new_unwrap("2.5.29.37.0");
/// Fulcio's arc: 1.3.6.1.4.1.57264.1.N.
const FULCIO_ARC: &str = "1.3.6.1.4.1.57264.1.";
const OID_FULCIO_OTHERNAME_SAN: Oid = Oid::new_unwrap("1.3.6.1.4.1.57264.1.7");
pub(crate) const OID_SCT_LIST: Oid = Oid::new_unwrap("1.3.6.1.4.1.11129.2.4.2");

/// Extensions whose criticality this verifier honours.
const HANDLED_CRITICAL: [Oid; 4] = [OID_SAN, OID_BASIC_CONSTRAINTS, OID_KEY_USAGE, OID_EKU];

#[derive(Debug, thiserror::Error)]
pub enum CertificateError {
    #[error("{what} is not a DER X.509 certificate: {reason}")]
    Parse { what: String, reason: String },
    #[error("{what}: public key: {source}")]
    Key {
        what: String,
        #[source]
        source: KeyError,
    },
    #[error("signing certificate: {0}")]
    Leaf(String),
    #[error("bundle certificate chain contains a root (self-signed) certificate at position {0}: roots come only from the trusted root")]
    RootInBundle(usize),
    #[error(
        "signing certificate is not issued by any certificate authority of the trusted root ({0})"
    )]
    Untrusted(String),
    #[error("signing certificate chain is not valid at {at}: {reason}")]
    NotValidAt { at: Rfc3339, reason: String },
}

/// The subject alternative name Fulcio put in the certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum San {
    Email(String),
    Uri(String),
    /// Fulcio's otherName (1.3.6.1.4.1.57264.1.7, a username).
    Other(String),
}

impl San {
    pub fn as_str(&self) -> &str {
        match self {
            San::Email(s) | San::Uri(s) | San::Other(s) => s,
        }
    }
}

/// The identity in a Fulcio certificate.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CertificateIdentity {
    /// Every SAN of the supported kinds, in certificate order.
    pub sans: Vec<San>,
    /// The OIDC issuer (1.3.6.1.4.1.57264.1.8, else the legacy 1.3.6.1.4.1.57264.1.1).
    pub issuer: Option<String>,
    /// Fulcio extensions by name (e.g. `github_workflow_repository`, `source_repository_uri`):
    /// the legacy raw-string ones (.2 to .6) and the DER UTF8String ones (.8 to .22).
    pub extensions: BTreeMap<String, String>,
}

/// The readable name of Fulcio extension `1.3.6.1.4.1.57264.1.<n>`, and whether its value
/// is DER (UTF8String) rather than raw bytes.
fn fulcio_extension(n: u32) -> Option<(&'static str, bool)> {
    Some(match n {
        1 => ("issuer_v1", false),
        2 => ("github_workflow_trigger", false),
        3 => ("github_workflow_sha", false),
        4 => ("github_workflow_name", false),
        5 => ("github_workflow_repository", false),
        6 => ("github_workflow_ref", false),
        8 => ("issuer", true),
        9 => ("build_signer_uri", true),
        10 => ("build_signer_digest", true),
        11 => ("runner_environment", true),
        12 => ("source_repository_uri", true),
        13 => ("source_repository_digest", true),
        14 => ("source_repository_ref", true),
        15 => ("source_repository_identifier", true),
        16 => ("source_repository_owner_uri", true),
        17 => ("source_repository_owner_identifier", true),
        18 => ("build_config_uri", true),
        19 => ("build_config_digest", true),
        20 => ("build_trigger", true),
        21 => ("run_invocation_uri", true),
        22 => ("source_repository_visibility_at_signing", true),
        _ => return None,
    })
}

/// A parsed certificate with its TBS bytes as encoded (what its issuer signed).
#[derive(Clone, Debug)]
pub struct ParsedCertificate {
    pub der: Vec<u8>,
    pub cert: Certificate,
    pub key: PublicKey,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

/// The TBSCertificate TLV inside a certificate's DER.
pub(crate) fn tbs_bytes(cert_der: &[u8]) -> der::Result<&[u8]> {
    let mut outer = SliceReader::new(cert_der)?;
    let header = der::Header::decode(&mut outer)?;
    let body = outer.read_slice(header.length)?;
    let mut inner = SliceReader::new(body)?;
    inner.tlv_bytes()
}

impl ParsedCertificate {
    pub fn parse(what: &str, der: &[u8]) -> Result<Self, CertificateError> {
        let perr = |reason: String| CertificateError::Parse {
            what: what.to_string(),
            reason,
        };
        let cert = Certificate::from_der(der).map_err(|e| perr(e.to_string()))?;
        let spki = cert
            .tbs_certificate
            .subject_public_key_info
            .to_der()
            .map_err(|e| perr(e.to_string()))?;
        let key = PublicKey::from_spki_der(&spki).map_err(|source| CertificateError::Key {
            what: what.to_string(),
            source,
        })?;
        let v = &cert.tbs_certificate.validity;
        Ok(ParsedCertificate {
            der: der.to_vec(),
            not_before: v.not_before.to_system_time(),
            not_after: v.not_after.to_system_time(),
            cert,
            key,
        })
    }

    pub fn valid_at(&self, t: SystemTime) -> bool {
        self.not_before <= t && t <= self.not_after
    }

    pub fn is_self_issued(&self) -> bool {
        self.cert.tbs_certificate.issuer == self.cert.tbs_certificate.subject
    }

    pub fn subject_spki_der(&self) -> Vec<u8> {
        self.key.spki_der().to_vec()
    }

    /// Whether `issuer` signed this certificate (names chain and the signature verifies).
    pub fn verify_issued_by(&self, issuer: &ParsedCertificate) -> Result<(), SignatureError> {
        if self.cert.tbs_certificate.issuer != issuer.cert.tbs_certificate.subject {
            return Err(SignatureError::Invalid);
        }
        let scheme = scheme_for_certificate(&self.cert.signature_algorithm)?;
        let tbs = tbs_bytes(&self.der).map_err(|_| SignatureError::Invalid)?;
        let sig = self
            .cert
            .signature
            .as_bytes()
            .ok_or(SignatureError::Invalid)?;
        issuer.key.verify(scheme, tbs, sig)
    }

    fn extension(&self, oid: Oid) -> Option<&x509_cert::ext::Extension> {
        self.cert
            .tbs_certificate
            .extensions
            .as_ref()?
            .iter()
            .find(|e| e.extn_id == oid)
    }
}

/// The signing certificate of a bundle, checked for the shape of a code-signing leaf.
#[derive(Clone, Debug)]
pub struct SigningCertificate {
    pub parsed: ParsedCertificate,
    pub identity: CertificateIdentity,
}

impl SigningCertificate {
    pub fn parse(der: &[u8]) -> Result<Self, CertificateError> {
        let parsed = ParsedCertificate::parse("signing certificate", der)?;
        let leaf = |m: String| CertificateError::Leaf(m);
        let exts = parsed
            .cert
            .tbs_certificate
            .extensions
            .clone()
            .unwrap_or_default();
        for e in &exts {
            if e.critical && !HANDLED_CRITICAL.contains(&e.extn_id) {
                return Err(leaf(format!("unhandled critical extension {}", e.extn_id)));
            }
        }
        if let Some(e) = parsed.extension(OID_BASIC_CONSTRAINTS) {
            let bc = BasicConstraints::from_der(e.extn_value.as_bytes())
                .map_err(|e| leaf(format!("basicConstraints: {e}")))?;
            if bc.ca {
                return Err(leaf("is a CA certificate".into()));
            }
        }
        if let Some(e) = parsed.extension(OID_KEY_USAGE) {
            let ku = KeyUsage::from_der(e.extn_value.as_bytes())
                .map_err(|e| leaf(format!("keyUsage: {e}")))?;
            if !ku.0.contains(KeyUsages::DigitalSignature) {
                return Err(leaf("keyUsage lacks digitalSignature".into()));
            }
        }
        if let Some(e) = parsed.extension(OID_EKU) {
            let eku = ExtendedKeyUsage::from_der(e.extn_value.as_bytes())
                .map_err(|e| leaf(format!("extKeyUsage: {e}")))?;
            if !eku
                .0
                .iter()
                .any(|o| *o == OID_EKU_CODE_SIGNING || *o == OID_EKU_ANY)
            {
                return Err(leaf("extKeyUsage lacks codeSigning".into()));
            }
        }
        let identity = identity_of(&exts).map_err(leaf)?;
        Ok(SigningCertificate { parsed, identity })
    }
}

fn identity_of(exts: &[x509_cert::ext::Extension]) -> Result<CertificateIdentity, String> {
    let mut id = CertificateIdentity::default();
    let mut legacy_issuer = None;
    for e in exts {
        let value = e.extn_value.as_bytes();
        if e.extn_id == OID_SAN {
            let san =
                SubjectAltName::from_der(value).map_err(|e| format!("subjectAltName: {e}"))?;
            for name in san.0 {
                match name {
                    GeneralName::Rfc822Name(s) => id.sans.push(San::Email(s.to_string())),
                    GeneralName::UniformResourceIdentifier(s) => {
                        id.sans.push(San::Uri(s.to_string()))
                    }
                    GeneralName::OtherName(o) if o.type_id == OID_FULCIO_OTHERNAME_SAN => {
                        let s: der::asn1::Utf8StringRef<'_> = o
                            .value
                            .decode_as()
                            .map_err(|e| format!("otherName SAN: {e}"))?;
                        id.sans.push(San::Other(s.as_str().to_string()));
                    }
                    _ => {}
                }
            }
            continue;
        }
        let oid = e.extn_id.to_string();
        let Some(n) = oid
            .strip_prefix(FULCIO_ARC)
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Some((name, is_der)) = fulcio_extension(n) else {
            continue;
        };
        let text = if is_der {
            der::asn1::Utf8StringRef::from_der(value)
                .map_err(|e| format!("extension {oid} ({name}) is not a DER UTF8String: {e}"))?
                .as_str()
                .to_string()
        } else {
            String::from_utf8(value.to_vec())
                .map_err(|_| format!("extension {oid} ({name}) is not UTF-8"))?
        };
        if n == 1 {
            legacy_issuer = Some(text.clone());
        }
        if n == 8 {
            id.issuer = Some(text.clone());
        }
        id.extensions.insert(name.to_string(), text);
    }
    if id.issuer.is_none() {
        id.issuer = legacy_issuer;
    }
    Ok(id)
}

/// A CA of the trusted root whose chain issued the signing certificate.
#[derive(Clone, Debug)]
pub struct IssuingCa<'r> {
    pub ca: &'r CertificateAuthority,
    pub chain: Vec<ParsedCertificate>,
}

impl IssuingCa<'_> {
    /// The certificate that signed the leaf (its key hash goes into SCTs).
    pub fn issuer(&self) -> &ParsedCertificate {
        &self.chain[0]
    }
}

/// Certificates after the leaf in a v0.1/v0.2 bundle chain are not used for path building
/// (only the trusted root's chains are), but a root (self-issued certificate) there is
/// refused.
pub fn check_bundle_chain(extra: &[Vec<u8>]) -> Result<(), CertificateError> {
    for (i, der) in extra.iter().enumerate() {
        let c = ParsedCertificate::parse(&format!("bundle certificate chain [{}]", i + 1), der)?;
        if c.is_self_issued() {
            return Err(CertificateError::RootInBundle(i + 1));
        }
    }
    Ok(())
}

/// The CAs of `root` whose issuing certificate signed `leaf` (times are checked separately,
/// per signing time, with [`check_valid_at`]). The CA chains themselves are trust anchors:
/// their signatures are not re-verified, their validity periods are.
pub fn issuing_cas<'r>(
    leaf: &SigningCertificate,
    root: &'r TrustedRoot,
) -> Result<Vec<IssuingCa<'r>>, CertificateError> {
    let mut found = Vec::new();
    let mut last_reason = String::from("the trusted root has no certificate authorities");
    for (i, ca) in root.certificate_authorities.iter().enumerate() {
        let chain = ca
            .cert_chain
            .iter()
            .enumerate()
            .map(|(j, der)| {
                ParsedCertificate::parse(
                    &format!("trusted root certificateAuthorities[{i}].certChain[{j}]"),
                    der,
                )
            })
            .collect::<Result<Vec<_>, _>>()?;
        match leaf.parsed.verify_issued_by(&chain[0]) {
            Ok(()) => found.push(IssuingCa { ca, chain }),
            Err(e) => last_reason = format!("certificateAuthorities[{i}] ({}): {e}", ca.uri),
        }
    }
    if found.is_empty() {
        return Err(CertificateError::Untrusted(last_reason));
    }
    Ok(found)
}

/// Checks that at `t` the leaf, every certificate of one issuing CA's chain, and that CA's
/// validity window in the trusted root all hold. Returns the index of that CA in `cas`.
pub fn check_valid_at(
    leaf: &SigningCertificate,
    cas: &[IssuingCa<'_>],
    t: SystemTime,
) -> Result<usize, CertificateError> {
    let not_valid = |reason: String| CertificateError::NotValidAt {
        at: Rfc3339(t),
        reason,
    };
    if !leaf.parsed.valid_at(t) {
        return Err(not_valid(format!(
            "the signing certificate is valid from {} to {}",
            Rfc3339(leaf.parsed.not_before),
            Rfc3339(leaf.parsed.not_after)
        )));
    }
    let mut reason = String::new();
    for (i, ca) in cas.iter().enumerate() {
        if !ca.ca.valid_for.contains(t) {
            reason = format!("the trusted root's CA {} is not valid then", ca.ca.uri);
            continue;
        }
        if let Some(c) = ca.chain.iter().find(|c| !c.valid_at(t)) {
            reason = format!(
                "CA certificate {} is valid from {} to {}",
                c.cert.tbs_certificate.subject,
                Rfc3339(c.not_before),
                Rfc3339(c.not_after)
            );
            continue;
        }
        return Ok(i);
    }
    Err(not_valid(reason))
}
