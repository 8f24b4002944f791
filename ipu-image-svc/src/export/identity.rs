//! Host identities: the name a host agent's export client certificate carries, which Prepare
//! names and a TCP export requires.
//!
//! An identity is a subjectAltName of the certificate: a DNS name (compared ASCII
//! case-insensitively, as DNS names are) or a URI (compared exactly), e.g. `host-7.example`
//! or `spiffe://example/host/7`. The subject's common name is not used: it is free text that
//! CAs do not constrain, and RFC 6125 retired it for identities. The certificate's chain to
//! the host agents' CA is checked by rustls before this is asked.

use x509_cert::der::Decode;
use x509_cert::ext::pkix::name::GeneralName;
use x509_cert::ext::pkix::SubjectAltName;

/// Longest identity accepted (a DNS name has at most 253 characters; URIs get the same).
pub const MAX_IDENTITY: usize = 253;

/// The DNS names and URIs among the subjectAltNames of the DER certificate `der`; none for a
/// certificate that cannot be read or has no such names.
pub fn identities(der: &[u8]) -> Vec<String> {
    let Ok(cert) = x509_cert::Certificate::from_der(der) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for ext in cert.tbs_certificate.filter::<SubjectAltName>() {
        let Ok((_, san)) = ext else { continue };
        for name in san.0 {
            match name {
                GeneralName::DnsName(n) => out.push(n.to_string()),
                GeneralName::UniformResourceIdentifier(u) => out.push(u.to_string()),
                _ => {}
            }
        }
    }
    out
}

/// Whether `presented` (from [`identities`]) carries `required`.
pub fn carries(presented: &[String], required: &str) -> bool {
    !required.is_empty()
        && presented.iter().any(|p| {
            if required.contains(':') {
                p == required
            } else {
                p.eq_ignore_ascii_case(required)
            }
        })
}

/// Whether `identity` can name a host: 1 to [`MAX_IDENTITY`] visible ASCII characters.
pub fn is_valid(identity: &str) -> bool {
    !identity.is_empty()
        && identity.len() <= MAX_IDENTITY
        && identity.bytes().all(|b| b.is_ascii_graphic())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dns_names_match_without_case_and_uris_exactly() {
        let presented = vec![
            "Host-1.Example".to_string(),
            "spiffe://ex/host/1".to_string(),
        ];
        assert!(carries(&presented, "host-1.example"));
        assert!(carries(&presented, "spiffe://ex/host/1"));
        assert!(!carries(&presented, "SPIFFE://ex/host/1"));
        assert!(!carries(&presented, "host-2.example"));
        assert!(!carries(&presented, ""));
        assert!(!carries(&[], "host-1.example"));
        assert!(is_valid("host-1.example"));
        assert!(!is_valid(""));
        assert!(!is_valid("a b"));
        assert!(!is_valid(&"a".repeat(254)));
        assert!(identities(b"not a certificate").is_empty());
    }
}
