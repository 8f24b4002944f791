//! Signed certificate timestamps embedded in the signing certificate (RFC 6962 §3.3,
//! extension 1.3.6.1.4.1.11129.2.4.2): each SCT is checked against the trusted root's CT
//! log with its log id, over the precertificate the log saw (the TBS without the SCT list
//! extension, with the issuer's key hash), within that log key's validity window.

use std::time::SystemTime;

use der::{Decode, Encode};
use sha2::{Digest, Sha256};

use crate::certificate::{ParsedCertificate, OID_SCT_LIST};
use crate::keys::{HashAlgorithm, SignatureScheme};
use crate::time::from_unix;
use crate::trust_root::TrustedRoot;

#[derive(Debug, thiserror::Error)]
pub enum SctError {
    #[error("the signing certificate has no embedded SCTs")]
    Missing,
    #[error("embedded SCT list is malformed: {0}")]
    Malformed(String),
    #[error("no embedded SCT verifies with a CT log of the trusted root ({0})")]
    NoneVerified(String),
}

/// One SCT as the TLS encoding gives it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Sct {
    pub log_id: [u8; 32],
    /// Milliseconds since the epoch.
    pub timestamp_ms: u64,
    pub extensions: Vec<u8>,
    pub hash: u8,
    pub sig_alg: u8,
    pub signature: Vec<u8>,
}

struct Tls<'a>(&'a [u8]);

impl<'a> Tls<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], SctError> {
        if self.0.len() < n {
            return Err(SctError::Malformed("truncated".into()));
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn uint(&mut self, n: usize) -> Result<u64, SctError> {
        Ok(self
            .take(n)?
            .iter()
            .fold(0u64, |acc, b| (acc << 8) | u64::from(*b)))
    }
    fn vec16(&mut self) -> Result<&'a [u8], SctError> {
        let n = self.uint(2)? as usize;
        self.take(n)
    }
}

/// Parses a TLS `SignedCertificateTimestampList`.
pub fn parse_sct_list(list: &[u8]) -> Result<Vec<Sct>, SctError> {
    let mut outer = Tls(list);
    let mut body = Tls(outer.vec16()?);
    if !outer.0.is_empty() {
        return Err(SctError::Malformed("trailing bytes after the list".into()));
    }
    let mut out = Vec::new();
    while !body.0.is_empty() {
        let mut s = Tls(body.vec16()?);
        let version = s.uint(1)?;
        if version != 0 {
            return Err(SctError::Malformed(format!("SCT version {version}")));
        }
        let log_id: [u8; 32] = s.take(32)?.try_into().expect("32 bytes");
        let timestamp_ms = s.uint(8)?;
        let extensions = s.vec16()?.to_vec();
        let hash = s.uint(1)? as u8;
        let sig_alg = s.uint(1)? as u8;
        let signature = s.vec16()?.to_vec();
        if !s.0.is_empty() {
            return Err(SctError::Malformed("trailing bytes in an SCT".into()));
        }
        out.push(Sct {
            log_id,
            timestamp_ms,
            extensions,
            hash,
            sig_alg,
            signature,
        });
    }
    Ok(out)
}

/// The TBSCertificate of the precertificate: the leaf's TBS without the SCT list extension.
pub fn precert_tbs(leaf: &ParsedCertificate) -> Result<Vec<u8>, SctError> {
    let mut tbs = leaf.cert.tbs_certificate.clone();
    if let Some(exts) = tbs.extensions.as_mut() {
        exts.retain(|e| e.extn_id != OID_SCT_LIST);
    }
    tbs.to_der()
        .map_err(|e| SctError::Malformed(format!("re-encoding the TBS: {e}")))
}

/// The bytes an SCT signs for a precertificate entry.
pub fn signed_data(sct: &Sct, issuer_key_hash: &[u8; 32], tbs: &[u8]) -> Vec<u8> {
    let mut d = Vec::with_capacity(tbs.len() + 64);
    d.push(0); // sct_version v1
    d.push(0); // signature_type certificate_timestamp
    d.extend_from_slice(&sct.timestamp_ms.to_be_bytes());
    d.extend_from_slice(&1u16.to_be_bytes()); // precert_entry
    d.extend_from_slice(issuer_key_hash);
    let n = tbs.len() as u32;
    d.extend_from_slice(&n.to_be_bytes()[1..]);
    d.extend_from_slice(tbs);
    d.extend_from_slice(&(sct.extensions.len() as u16).to_be_bytes());
    d.extend_from_slice(&sct.extensions);
    d
}

/// The SCTs embedded in `leaf`.
pub fn embedded_scts(leaf: &ParsedCertificate) -> Result<Vec<Sct>, SctError> {
    let ext = leaf
        .cert
        .tbs_certificate
        .extensions
        .as_ref()
        .and_then(|e| e.iter().find(|e| e.extn_id == OID_SCT_LIST))
        .ok_or(SctError::Missing)?;
    let inner = der::asn1::OctetString::from_der(ext.extn_value.as_bytes())
        .map_err(|e| SctError::Malformed(e.to_string()))?;
    parse_sct_list(inner.as_bytes())
}

/// A verified SCT: which log, when.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifiedSct {
    pub log_id: Vec<u8>,
    pub log_url: String,
    pub time: SystemTime,
}

/// Verifies the SCTs of `leaf` issued by `issuer`; returns those that verify (at most one
/// per log). Fails if none does.
pub fn verify_scts(
    leaf: &ParsedCertificate,
    issuer: &ParsedCertificate,
    root: &TrustedRoot,
) -> Result<Vec<VerifiedSct>, SctError> {
    let scts = embedded_scts(leaf)?;
    let tbs = precert_tbs(leaf)?;
    let issuer_key_hash: [u8; 32] = Sha256::digest(issuer.subject_spki_der()).into();
    let mut verified: Vec<VerifiedSct> = Vec::new();
    let mut reason = String::from("no SCT names a CT log of the trusted root");
    for sct in &scts {
        let Some(log) = root.ctlog(&sct.log_id) else {
            continue;
        };
        if verified.iter().any(|v| v.log_id == log.log_id) {
            continue;
        }
        let time = from_unix(0) + std::time::Duration::from_millis(sct.timestamp_ms);
        if !log.valid_for.contains(time) {
            reason = format!(
                "the SCT of {} is outside that log key's validity",
                log.base_url
            );
            continue;
        }
        let scheme = match (sct.hash, sct.sig_alg) {
            (4, 3) => SignatureScheme::Ecdsa(HashAlgorithm::Sha256),
            (5, 3) => SignatureScheme::Ecdsa(HashAlgorithm::Sha384),
            (4, 1) => SignatureScheme::RsaPkcs1(HashAlgorithm::Sha256),
            (h, s) => {
                reason = format!("unsupported SCT signature algorithm (hash {h}, signature {s})");
                continue;
            }
        };
        match log.key.verify(
            scheme,
            &signed_data(sct, &issuer_key_hash, &tbs),
            &sct.signature,
        ) {
            Ok(()) => verified.push(VerifiedSct {
                log_id: log.log_id.clone(),
                log_url: log.base_url.clone(),
                time,
            }),
            Err(e) => reason = format!("the SCT of {}: {e}", log.base_url),
        }
    }
    if verified.is_empty() {
        return Err(SctError::NoneVerified(reason));
    }
    Ok(verified)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bundle::{Bundle, VerificationMaterial};
    use crate::certificate::SigningCertificate;

    fn fixture_leaf(case: &str) -> ParsedCertificate {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/fixtures/sigstore-conformance/bundle-verify/"
        );
        let text = std::fs::read_to_string(format!("{path}{case}/bundle.sigstore.json")).unwrap();
        let b = Bundle::from_json(&text).unwrap();
        let VerificationMaterial::Certificate(der) = b.material else {
            panic!("certificate bundle")
        };
        SigningCertificate::parse(&der).unwrap().parsed
    }

    fn public_good_issuer(leaf: &ParsedCertificate, root: &TrustedRoot) -> ParsedCertificate {
        root.certificate_authorities
            .iter()
            .map(|ca| ParsedCertificate::parse("ca", &ca.cert_chain[0]).unwrap())
            .find(|ca| leaf.verify_issued_by(ca).is_ok())
            .expect("issued by a public-good CA")
    }

    #[test]
    fn precert_tbs_drops_only_the_sct_extension() {
        let leaf = fixture_leaf("happy-path-v0.3");
        let tbs = precert_tbs(&leaf).unwrap();
        let full = crate::certificate::tbs_bytes(&leaf.der).unwrap();
        assert!(tbs.len() < full.len());
        let reparsed = x509_cert::TbsCertificate::from_der(&tbs).unwrap();
        let n = |t: &x509_cert::TbsCertificate| t.extensions.as_ref().map_or(0, |e| e.len());
        assert_eq!(n(&reparsed) + 1, n(&leaf.cert.tbs_certificate));
        assert!(reparsed
            .extensions
            .unwrap()
            .iter()
            .all(|e| e.extn_id != OID_SCT_LIST));
    }

    #[test]
    fn embedded_sct_verifies_and_tampering_fails() {
        let root = TrustedRoot::public_good();
        let leaf = fixture_leaf("happy-path-v0.3");
        let issuer = public_good_issuer(&leaf, &root);
        let verified = verify_scts(&leaf, &issuer, &root).unwrap();
        assert_eq!(verified.len(), 1);
        assert_eq!(verified[0].log_url, "https://ctfe.sigstore.dev/2022");

        // The signed data changes with the timestamp, the extensions, or the issuer key.
        let sct = &embedded_scts(&leaf).unwrap()[0];
        let log = root.ctlog(&sct.log_id).unwrap();
        let tbs = precert_tbs(&leaf).unwrap();
        let ikh: [u8; 32] = Sha256::digest(issuer.subject_spki_der()).into();
        let scheme = SignatureScheme::Ecdsa(HashAlgorithm::Sha256);
        assert!(log
            .key
            .verify(scheme, &signed_data(sct, &ikh, &tbs), &sct.signature)
            .is_ok());
        let mut later = sct.clone();
        later.timestamp_ms += 1;
        assert!(log
            .key
            .verify(scheme, &signed_data(&later, &ikh, &tbs), &sct.signature)
            .is_err());
        let mut ext = sct.clone();
        ext.extensions = vec![0];
        assert!(log
            .key
            .verify(scheme, &signed_data(&ext, &ikh, &tbs), &sct.signature)
            .is_err());
        let wrong_issuer = [0u8; 32];
        assert!(log
            .key
            .verify(
                scheme,
                &signed_data(sct, &wrong_issuer, &tbs),
                &sct.signature
            )
            .is_err());
    }

    #[test]
    fn sct_list_parsing() {
        // One SCT with a 2-byte extension field (as Static CT logs write).
        let mut sct = vec![0u8];
        sct.extend_from_slice(&[7; 32]);
        sct.extend_from_slice(&1234u64.to_be_bytes());
        sct.extend_from_slice(&[0, 2, 0xab, 0xcd]);
        sct.extend_from_slice(&[4, 3, 0, 1, 0x55]);
        let mut list = Vec::new();
        list.extend_from_slice(&((sct.len() + 2) as u16).to_be_bytes());
        list.extend_from_slice(&(sct.len() as u16).to_be_bytes());
        list.extend_from_slice(&sct);
        let parsed = parse_sct_list(&list).unwrap();
        assert_eq!(parsed.len(), 1);
        assert_eq!(parsed[0].timestamp_ms, 1234);
        assert_eq!(parsed[0].extensions, vec![0xab, 0xcd]);
        assert_eq!(parsed[0].signature, vec![0x55]);
        assert!(parse_sct_list(&list[..list.len() - 1]).is_err());
    }
}
