//! RFC 3161 time-stamp tokens, as Sigstore bundles carry them
//! (`timestampVerificationData.rfc3161Timestamps[].signedTimestamp`: a DER `TimeStampResp`).
//!
//! The checks follow sigstore-go with sigstore/timestamp-authority's verifier: the message
//! imprint is the hash of the timestamped bytes; the CMS signer info's signed attributes name
//! the TSTInfo content type and carry its digest, and are signed by the TSA certificate; that
//! certificate (embedded in the token, or the trusted root's leaf, and then it must be that
//! leaf) chains to the authority's chain, is an end-entity certificate for time stamping
//! only, and every certificate of the chain was valid at the token's genTime, which must also
//! fall inside the authority's validity in the trusted root. Chain validity is judged at
//! genTime, not now: a token stays good after its TSA certificate expires.

mod asn1;
mod pkix;

use std::time::SystemTime;

use cms::cert::CertificateChoices;
use cms::content_info::ContentInfo;
use cms::signed_data::{SignedData, SignerIdentifier, SignerInfo};
use der::asn1::{ObjectIdentifier, OctetStringRef};
use der::{Decode, Encode, Tag, Tagged};

use self::asn1::{TimeStampResp, TstInfo};
use self::pkix::{Cert, Hash, SignatureError};
use crate::ValidFor;

/// A time-stamping authority the trusted root names.
#[derive(Clone, Copy, Debug)]
pub struct TimestampAuthority<'a> {
    /// Its certificate chain, DER, leaf (the TSA's signing certificate) first.
    pub cert_chain: &'a [Vec<u8>],
    pub valid_for: ValidFor,
}

#[derive(Debug, thiserror::Error)]
pub enum TimestampError {
    #[error("malformed time-stamp token: {part}: {reason}")]
    Malformed { part: &'static str, reason: String },
    #[error("time-stamp response status is {status} (not granted)")]
    NotGranted { status: u32 },
    #[error("unsupported {what} in the time-stamp token")]
    Unsupported { what: String },
    #[error("message imprint ({hash:?}) is not the hash of the timestamped data")]
    ImprintMismatch { hash: String },
    #[error("signed message-digest attribute is not the hash of the TSTInfo")]
    ContentDigestMismatch,
    #[error("no timestamp authorities to verify the token with")]
    NoAuthorities,
    #[error("trusted root timestamp authority {index}: certificate {cert}: {reason}")]
    BadAuthority {
        index: usize,
        cert: usize,
        reason: String,
    },
    #[error("time-stamp token is not from a trusted timestamp authority: {reason}")]
    UntrustedTsa { reason: String },
    #[error("TSA certificate {subject} cannot sign time stamps: {reason}")]
    NotTimestampingCertificate { subject: String, reason: String },
    #[error("signer info signature does not verify with the TSA certificate {subject}")]
    BadSignature { subject: String },
    #[error(
        "genTime {gen_time} is outside the validity of certificate {subject} ({not_before} to {not_after})"
    )]
    OutsideCertificateValidity {
        gen_time: String,
        subject: String,
        not_before: String,
        not_after: String,
    },
    #[error(
        "genTime {gen_time} is outside the trusted root's validity of the timestamp authority"
    )]
    OutsideAuthorityValidity { gen_time: String },
}

/// Verifies a DER time-stamp token (a CMS ContentInfo with SignedData over a TSTInfo) over
/// `timestamped` (the bytes whose digest the token's message imprint must be: the
/// signature bytes of the bundle), signed by one of `authorities`. Returns the token's
/// genTime.
///
/// `token_der` may be a whole `TimeStampResp` (what bundles carry; its status must be
/// granted) or the bare token. Every authority is tried; if none verifies the token, the
/// error is the first from an authority the signing certificate chains to, else
/// [`TimestampError::UntrustedTsa`].
pub fn verify_timestamp(
    token_der: &[u8],
    timestamped: &[u8],
    authorities: &[TimestampAuthority<'_>],
) -> Result<SystemTime, TimestampError> {
    let token = Token::parse(token_der)?;
    token.check_imprint(timestamped)?;
    token.check_signed_attributes()?;
    let mut errors = Vec::new();
    for (index, authority) in authorities.iter().enumerate() {
        match token.verify_with(index, authority) {
            Ok(()) => return Ok(token.gen_time),
            Err(e) => errors.push(e),
        }
    }
    let untrusted = |e: &TimestampError| matches!(e, TimestampError::UntrustedTsa { .. });
    let chained = errors.iter().position(|e| !untrusted(e));
    match chained.or((!errors.is_empty()).then_some(0)) {
        Some(i) => Err(errors.swap_remove(i)),
        None => Err(TimestampError::NoAuthorities),
    }
}

const ID_SIGNED_DATA: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.7.2");
const ID_CT_TST_INFO: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.9.16.1.4");
const ID_CONTENT_TYPE: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.9.3");
const ID_MESSAGE_DIGEST: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.113549.1.9.4");

fn malformed(part: &'static str) -> impl Fn(der::Error) -> TimestampError {
    move |e| TimestampError::Malformed {
        part,
        reason: e.to_string(),
    }
}

fn time(t: SystemTime) -> String {
    der::DateTime::from_system_time(t).map_or_else(|_| format!("{t:?}"), |d| d.to_string())
}

/// A parsed token: the parts the checks need.
struct Token {
    signed_data: SignedData,
    signer: SignerInfo,
    /// The signed attributes as signed (DER `SET OF`).
    signed_attrs_der: Vec<u8>,
    /// The TSTInfo DER (the eContent octets), which the message-digest attribute hashes.
    tst_info_der: Vec<u8>,
    imprint_hash: Hash,
    imprint: Vec<u8>,
    gen_time: SystemTime,
}

impl Token {
    fn parse(der: &[u8]) -> Result<Self, TimestampError> {
        let content_info = content_info(der)?;
        if content_info.content_type != ID_SIGNED_DATA {
            return Err(TimestampError::Malformed {
                part: "ContentInfo",
                reason: format!(
                    "content type {} is not signed data",
                    content_info.content_type
                ),
            });
        }
        let signed_data: SignedData = content_info
            .content
            .decode_as()
            .map_err(malformed("SignedData"))?;
        let encap = &signed_data.encap_content_info;
        if encap.econtent_type != ID_CT_TST_INFO {
            return Err(TimestampError::Malformed {
                part: "SignedData",
                reason: format!("content type {} is not id-ct-TSTInfo", encap.econtent_type),
            });
        }
        let tst_info_der = encap
            .econtent
            .as_ref()
            .filter(|c| c.tag() == Tag::OctetString)
            .map(|c| c.value().to_vec())
            .ok_or_else(|| TimestampError::Malformed {
                part: "SignedData",
                reason: "no TSTInfo OCTET STRING".into(),
            })?;
        let signer = match signed_data.signer_infos.0.as_slice() {
            [signer] => signer.clone(),
            others => {
                return Err(TimestampError::Malformed {
                    part: "SignedData",
                    reason: format!("{} signer infos, not one", others.len()),
                });
            }
        };
        let signed_attrs_der =
            asn1::raw_signed_attributes(content_info.content.value()).map_err(|reason| {
                TimestampError::Malformed {
                    part: "SignerInfo",
                    reason,
                }
            })?;
        let tst_info = TstInfo::from_der(&tst_info_der).map_err(malformed("TSTInfo"))?;
        let imprint_oid = tst_info.message_imprint.hash_algorithm.oid;
        let imprint_hash = Hash::from_oid(imprint_oid).ok_or(TimestampError::Unsupported {
            what: format!("message imprint hash algorithm {imprint_oid}"),
        })?;
        let gen_time = asn1::generalized_time(tst_info.gen_time).map_err(|reason| {
            TimestampError::Malformed {
                part: "TSTInfo genTime",
                reason,
            }
        })?;
        Ok(Self {
            imprint: tst_info.message_imprint.hashed_message.as_bytes().to_vec(),
            signed_data,
            signer,
            signed_attrs_der,
            tst_info_der,
            imprint_hash,
            gen_time,
        })
    }

    fn check_imprint(&self, timestamped: &[u8]) -> Result<(), TimestampError> {
        if self.imprint_hash.digest(timestamped) != self.imprint {
            return Err(TimestampError::ImprintMismatch {
                hash: format!("{:?}", self.imprint_hash),
            });
        }
        Ok(())
    }

    fn signer_digest(&self) -> Result<Hash, TimestampError> {
        let oid = self.signer.digest_alg.oid;
        Hash::from_oid(oid).ok_or(TimestampError::Unsupported {
            what: format!("signer digest algorithm {oid}"),
        })
    }

    /// RFC 5652 §5.3: the content-type attribute names the eContent type, and the
    /// message-digest attribute is the digest of the eContent octets.
    fn check_signed_attributes(&self) -> Result<(), TimestampError> {
        let attrs: Vec<_> = self
            .signer
            .signed_attrs
            .iter()
            .flat_map(|a| a.iter())
            .collect();
        let single_value = |oid: ObjectIdentifier, name: &'static str| {
            let mut values = attrs
                .iter()
                .filter(|a| a.oid == oid)
                .flat_map(|a| a.values.iter());
            match (values.next(), values.next()) {
                (Some(v), None) => Ok(v),
                _ => Err(TimestampError::Malformed {
                    part: "SignerInfo signed attributes",
                    reason: format!("not exactly one {name} value"),
                }),
            }
        };
        let content_type = single_value(ID_CONTENT_TYPE, "content-type")?
            .decode_as::<ObjectIdentifier>()
            .map_err(malformed("content-type attribute"))?;
        if content_type != ID_CT_TST_INFO {
            return Err(TimestampError::Malformed {
                part: "content-type attribute",
                reason: format!("{content_type} is not id-ct-TSTInfo"),
            });
        }
        let digest = single_value(ID_MESSAGE_DIGEST, "message-digest")?
            .decode_as::<OctetStringRef<'_>>()
            .map_err(malformed("message-digest attribute"))?;
        if digest.as_bytes() != self.signer_digest()?.digest(&self.tst_info_der) {
            return Err(TimestampError::ContentDigestMismatch);
        }
        Ok(())
    }

    /// The checks that depend on the authority (`index` is its place, for messages).
    fn verify_with(
        &self,
        index: usize,
        authority: &TimestampAuthority<'_>,
    ) -> Result<(), TimestampError> {
        let chain = authority
            .cert_chain
            .iter()
            .enumerate()
            .map(|(i, der)| {
                Cert::parse(der).map_err(|e| TimestampError::BadAuthority {
                    index,
                    cert: i,
                    reason: e.to_string(),
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        // As sigstore-go reads a trusted root: the first certificate is the TSA's own if it
        // is not a CA; the others are its issuers, root last.
        let (leaf, issuers) = match chain.split_first() {
            Some((first, rest)) if !rest.is_empty() && !first.is_ca().unwrap_or(true) => {
                (Some(first), rest)
            }
            _ => (None, chain.as_slice()),
        };
        if issuers.is_empty() {
            return Err(TimestampError::BadAuthority {
                index,
                cert: 0,
                reason: "the chain has no root certificate".into(),
            });
        }
        let embedded = self.signer_certificate(leaf)?;
        let signer = embedded
            .as_ref()
            .or(leaf)
            .expect("None means the leaf is the signer");
        self.check_chain(signer, issuers)?;
        self.check_signature(signer)?;
        signer
            .check_tsa_usage()
            .map_err(|reason| TimestampError::NotTimestampingCertificate {
                subject: signer.subject(),
                reason,
            })?;
        for cert in std::iter::once(signer).chain(issuers) {
            self.check_validity(cert)?;
        }
        if !authority.valid_for.contains(self.gen_time) {
            return Err(TimestampError::OutsideAuthorityValidity {
                gen_time: time(self.gen_time),
            });
        }
        Ok(())
    }

    /// The certificate the signer identifier names: one embedded in the token (returned), or
    /// the authority's leaf (`None`). With a leaf in the trusted root, an embedded signing
    /// certificate must be that very certificate.
    fn signer_certificate(&self, leaf: Option<&Cert>) -> Result<Option<Cert>, TimestampError> {
        let embedded = self
            .signed_data
            .certificates
            .iter()
            .flat_map(|set| set.0.iter())
            .filter_map(|choice| match choice {
                CertificateChoices::Certificate(c) => c.to_der().ok(),
                CertificateChoices::Other(_) => None,
            })
            .filter_map(|der| Cert::parse(&der).ok());
        for cert in embedded {
            if self.identifies(&cert) {
                if leaf.is_some_and(|l| l.der != cert.der) {
                    return Err(TimestampError::UntrustedTsa {
                        reason: format!(
                            "the token's signing certificate {} is not the authority's TSA certificate",
                            cert.subject()
                        ),
                    });
                }
                return Ok(Some(cert));
            }
        }
        match leaf {
            Some(leaf) if self.identifies(leaf) => Ok(None),
            _ => Err(TimestampError::UntrustedTsa {
                reason: format!(
                    "no certificate matching the signer identifier ({}) in the token or the authority's chain",
                    self.describe_sid()
                ),
            }),
        }
    }

    fn identifies(&self, cert: &Cert) -> bool {
        let tbs = &cert.cert.tbs_certificate;
        match &self.signer.sid {
            SignerIdentifier::IssuerAndSerialNumber(ias) => {
                ias.serial_number == tbs.serial_number
                    && ias.issuer.to_der().ok() == tbs.issuer.to_der().ok()
            }
            SignerIdentifier::SubjectKeyIdentifier(ski) => {
                cert.subject_key_identifier().ok().flatten().as_deref() == Some(ski.0.as_bytes())
            }
        }
    }

    fn describe_sid(&self) -> String {
        match &self.signer.sid {
            SignerIdentifier::IssuerAndSerialNumber(ias) => {
                format!("issuer {}, serial {}", ias.issuer, ias.serial_number)
            }
            SignerIdentifier::SubjectKeyIdentifier(ski) => {
                format!("subject key identifier {}", hex::encode(ski.0.as_bytes()))
            }
        }
    }

    /// `signer` must be issued by `issuers[0]`, that by `issuers[1]`, ... up to the root.
    fn check_chain(&self, signer: &Cert, issuers: &[Cert]) -> Result<(), TimestampError> {
        let mut child = signer;
        for issuer in issuers {
            let untrusted = |reason: String| TimestampError::UntrustedTsa {
                reason: format!(
                    "certificate {} is not issued by {}: {reason}",
                    child.subject(),
                    issuer.subject()
                ),
            };
            child.check_issued_by(issuer).map_err(untrusted)?;
            issuer.check_issuer_usage().map_err(untrusted)?;
            child = issuer;
        }
        Ok(())
    }

    fn check_signature(&self, signer: &Cert) -> Result<(), TimestampError> {
        pkix::verify_signature(
            &signer.cert.tbs_certificate.subject_public_key_info,
            &self.signer.signature_algorithm,
            Some(self.signer_digest()?),
            &self.signed_attrs_der,
            self.signer.signature.as_bytes(),
        )
        .map_err(|e| match e {
            SignatureError::Unsupported(what) => TimestampError::Unsupported { what },
            SignatureError::Invalid => TimestampError::BadSignature {
                subject: signer.subject(),
            },
        })
    }

    fn check_validity(&self, cert: &Cert) -> Result<(), TimestampError> {
        let validity = &cert.cert.tbs_certificate.validity;
        let (not_before, not_after) = (
            validity.not_before.to_system_time(),
            validity.not_after.to_system_time(),
        );
        if self.gen_time < not_before || not_after < self.gen_time {
            return Err(TimestampError::OutsideCertificateValidity {
                gen_time: time(self.gen_time),
                subject: cert.subject(),
                not_before: time(not_before),
                not_after: time(not_after),
            });
        }
        Ok(())
    }
}

/// The ContentInfo of a `TimeStampResp` (whose status must be granted) or a bare token.
fn content_info(der: &[u8]) -> Result<ContentInfo, TimestampError> {
    let outer = der::asn1::AnyRef::from_der(der).map_err(malformed("TimeStampResp"))?;
    if outer.value().first() == Some(&(Tag::ObjectIdentifier.octet())) {
        return ContentInfo::from_der(der).map_err(malformed("ContentInfo"));
    }
    let response = TimeStampResp::from_der(der).map_err(malformed("TimeStampResp"))?;
    let status = response.status.status;
    if status > 1 {
        return Err(TimestampError::NotGranted { status });
    }
    let token = response.time_stamp_token.ok_or(TimestampError::Malformed {
        part: "TimeStampResp",
        reason: "granted but no token".into(),
    })?;
    token.decode_as().map_err(malformed("ContentInfo"))
}
