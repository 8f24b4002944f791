//! Signed checkpoints of transparency logs (C2SP signed-note and tlog-checkpoint), as Rekor v1
//! and v2 inclusion proofs carry them.
//!
//! A checkpoint is a note: the body (origin, tree size, base64 root hash, optional extension
//! lines), a blank line, then signature lines `— <name> <base64(key hint || signature)>`.
//! The two Rekor generations sign it differently, and this module follows what sigstore-go
//! (with rekor and rekor-tiles) accepts:
//!
//! - **Rekor v1** (origin `<host> - <tree id>`, e.g. `rekor.sigstore.dev - 2605736670972794746`):
//!   the signature line is named `<host>` (the origin without the tree id), the key hint is
//!   the first 4 bytes of SHA-256 over the key's SubjectPublicKeyInfo DER (whatever the key
//!   type), ECDSA signs the SHA-256 of the body (also for P-384) and Ed25519 the body itself.
//!   The origin is not compared with the log's base URL (sigstore-go does not either).
//! - **Rekor v2** (any other origin): the origin must be the host name of the log's base URL
//!   (`https://log2025-1.rekor.sigstore.dev` → `log2025-1.rekor.sigstore.dev`) and the
//!   signature line is named by the origin. The key hint follows C2SP signed-note: for Ed25519
//!   `SHA-256(origin || 0x0A || 0x01 || 32-byte key)[:4]` (which is also the log id the trusted
//!   root gives), for ECDSA `SHA-256(SPKI DER)[:4]`; ECDSA signs with the curve's hash (P-256:
//!   SHA-256, P-384: SHA-384, as the trusted root's key details name them).
//!
//! Signature lines by other keys (witness cosignatures, rotated log keys) are ignored, as
//! C2SP requires; every line by the log's key (same name and key hint) must verify.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use der::asn1::ObjectIdentifier;
use der::Decode as _;
use ring::signature::{self as sig, UnparsedPublicKey};
use spki::SubjectPublicKeyInfoRef;

use crate::ValidFor;

/// A log key the trusted root names.
#[derive(Clone, Copy, Debug)]
pub struct CheckpointKey<'a> {
    /// SubjectPublicKeyInfo DER (ECDSA P-256/P-384 or Ed25519).
    pub spki_der: &'a [u8],
    /// The log's base URL as the trusted root gives it (e.g. `https://log2025-1.rekor.sigstage.dev`).
    pub base_url: &'a str,
    pub valid_for: ValidFor,
}

/// What a verified checkpoint says.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Checkpoint {
    pub origin: String,
    pub size: u64,
    pub root_hash: Vec<u8>,
    /// Extension lines after the root hash, if any.
    pub extensions: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("malformed signed note: {0}")]
    MalformedNote(String),
    #[error("signed note has no signature lines")]
    Unsigned,
    #[error("malformed signature line {line}: {reason}")]
    MalformedSignatureLine { line: usize, reason: String },
    #[error("checkpoint body has no origin line")]
    MissingOrigin,
    #[error("checkpoint body has no tree size line")]
    MissingSize,
    #[error("checkpoint body has no root hash line")]
    MissingRootHash,
    #[error("checkpoint tree size {0:?} is not a decimal number without leading zeros")]
    MalformedSize(String),
    #[error("checkpoint root hash {0:?} is not base64")]
    MalformedRootHash(String),
    #[error("checkpoint body line {0} is empty")]
    EmptyBodyLine(usize),
    #[error("log key is not usable: {0}")]
    UnsupportedKey(String),
    #[error("log base URL {0:?} has no host name")]
    BadBaseUrl(String),
    #[error(
        "checkpoint origin {origin:?} is not the log's host name {expected:?} (from its base URL)"
    )]
    OriginMismatch { origin: String, expected: String },
    #[error("no signature line is named {name:?} (the log's name)")]
    NoSignatureByLog { name: String },
    #[error(
        "signature lines named {name:?} carry key hints {found:?}, not the log key's {expected}"
    )]
    KeyHintMismatch {
        name: String,
        expected: String,
        found: Vec<String>,
    },
    #[error(
        "signature line {line} (by {name:?}, key hint {hint}) does not verify with the log key"
    )]
    BadSignature {
        line: usize,
        name: String,
        hint: String,
    },
}

/// Verifies a checkpoint envelope (the signed note text) with `key`: the note must carry a
/// signature by that key (other signatures, e.g. witness cosignatures, are tolerated), and
/// its body must be a well-formed checkpoint. Returns its contents.
///
/// `key.valid_for` is not checked here: a checkpoint has no signed time of its own, so the
/// caller checks the key's validity against the entry's time.
pub fn verify_checkpoint(
    envelope: &str,
    key: &CheckpointKey<'_>,
) -> Result<Checkpoint, CheckpointError> {
    let note = SignedNote::parse(envelope)?;
    let checkpoint = parse_body(note.text)?;
    let log_key = LogKey::from_spki(key.spki_der)?;
    let (name, hint, flavour) = match rekor_v1_host(&checkpoint.origin) {
        Some(host) => (host, spki_hint(key.spki_der), Flavour::RekorV1),
        None => {
            let expected = host_name(key.base_url)?;
            if checkpoint.origin != expected {
                return Err(CheckpointError::OriginMismatch {
                    origin: checkpoint.origin,
                    expected: expected.to_owned(),
                });
            }
            let hint = log_key.c2sp_hint(&checkpoint.origin, key.spki_der);
            (checkpoint.origin.as_str(), hint, Flavour::C2sp)
        }
    };

    let by_name: Vec<&NoteSignature> = note.signatures.iter().filter(|s| s.name == name).collect();
    if by_name.is_empty() {
        return Err(CheckpointError::NoSignatureByLog {
            name: name.to_owned(),
        });
    }
    let by_key: Vec<&&NoteSignature> = by_name.iter().filter(|s| s.hint == hint).collect();
    if by_key.is_empty() {
        return Err(CheckpointError::KeyHintMismatch {
            name: name.to_owned(),
            expected: hex::encode(hint),
            found: by_name.iter().map(|s| hex::encode(s.hint)).collect(),
        });
    }
    for s in by_key {
        if !log_key.verify(flavour, note.text.as_bytes(), &s.signature) {
            return Err(CheckpointError::BadSignature {
                line: s.line,
                name: s.name.to_owned(),
                hint: hex::encode(s.hint),
            });
        }
    }
    Ok(checkpoint)
}

/// At most this many signature lines (C2SP asks verifiers to accept at least 16; Go's
/// `note` package stops at 100).
const MAX_SIGNATURES: usize = 100;

/// A signed note split into its text (including the final newline) and signature lines.
struct SignedNote<'a> {
    text: &'a str,
    signatures: Vec<NoteSignature<'a>>,
}

struct NoteSignature<'a> {
    /// 1-based line number in the envelope, for error messages.
    line: usize,
    name: &'a str,
    hint: [u8; 4],
    signature: Vec<u8>,
}

impl<'a> SignedNote<'a> {
    fn parse(envelope: &'a str) -> Result<Self, CheckpointError> {
        let malformed = |m: &str| CheckpointError::MalformedNote(m.to_owned());
        if envelope.chars().any(|c| c != '\n' && c.is_ascii_control()) {
            return Err(malformed("contains control characters"));
        }
        if !envelope.ends_with('\n') {
            return Err(malformed("does not end with a newline"));
        }
        // The text is separated from the signatures by the last blank line.
        let split = envelope
            .rfind("\n\n")
            .ok_or_else(|| malformed("no blank line before the signatures"))?;
        let (text, signature_block) = (&envelope[..=split], &envelope[split + 2..]);
        let first_line = text.lines().count() + 2;
        let signatures = signature_block
            .lines()
            .enumerate()
            .map(|(i, l)| NoteSignature::parse(first_line + i, l))
            .collect::<Result<Vec<_>, _>>()?;
        if signatures.is_empty() {
            return Err(CheckpointError::Unsigned);
        }
        if signatures.len() > MAX_SIGNATURES {
            return Err(malformed("too many signature lines"));
        }
        Ok(Self { text, signatures })
    }
}

impl<'a> NoteSignature<'a> {
    fn parse(line: usize, text: &'a str) -> Result<Self, CheckpointError> {
        let malformed = |reason: &str| CheckpointError::MalformedSignatureLine {
            line,
            reason: reason.to_owned(),
        };
        let rest = text
            .strip_prefix("\u{2014} ")
            .ok_or_else(|| malformed("does not start with an em dash and a space"))?;
        let (name, b64) = rest
            .split_once(' ')
            .ok_or_else(|| malformed("no space between key name and signature"))?;
        if name.is_empty() || name.contains(char::is_whitespace) || name.contains('+') {
            return Err(malformed("key name is empty or has spaces or '+'"));
        }
        let bytes = B64
            .decode(b64)
            .map_err(|e| malformed(&format!("signature is not base64: {e}")))?;
        if bytes.len() < 5 {
            return Err(malformed("signature shorter than a key hint and one byte"));
        }
        let (hint, signature) = bytes.split_at(4);
        Ok(Self {
            line,
            name,
            hint: hint.try_into().expect("split at 4"),
            signature: signature.to_vec(),
        })
    }
}

/// Parses a checkpoint body (tlog-checkpoint "note text"). When the body is shorter than the
/// three mandatory lines, the shape of what is there tells which line is missing.
fn parse_body(text: &str) -> Result<Checkpoint, CheckpointError> {
    let lines: Vec<&str> = text
        .strip_suffix('\n')
        .unwrap_or(text)
        .split('\n')
        .collect();
    if lines == [""] {
        return Err(CheckpointError::MissingOrigin);
    }
    if let Some(i) = lines.iter().position(|l| l.is_empty()) {
        return Err(CheckpointError::EmptyBodyLine(i + 1));
    }
    match lines.as_slice() {
        [origin, size, root_hash, extensions @ ..] => Ok(Checkpoint {
            origin: (*origin).to_owned(),
            size: parse_size(size)?,
            root_hash: parse_root_hash(root_hash)?,
            extensions: extensions.iter().map(|l| (*l).to_owned()).collect(),
        }),
        [first, second] if parse_size(first).is_ok() && parse_root_hash(second).is_ok() => {
            Err(CheckpointError::MissingOrigin)
        }
        [_, second] if parse_size(second).is_ok() => Err(CheckpointError::MissingRootHash),
        [first, ..] if parse_size(first).is_ok() => Err(CheckpointError::MissingOrigin),
        _ => Err(CheckpointError::MissingSize),
    }
}

fn parse_size(line: &str) -> Result<u64, CheckpointError> {
    let canonical = !line.is_empty()
        && line.bytes().all(|b| b.is_ascii_digit())
        && (line == "0" || !line.starts_with('0'));
    line.parse()
        .ok()
        .filter(|_| canonical)
        .ok_or_else(|| CheckpointError::MalformedSize(line.to_owned()))
}

fn parse_root_hash(line: &str) -> Result<Vec<u8>, CheckpointError> {
    B64.decode(line)
        .ok()
        .filter(|h| !h.is_empty())
        .ok_or_else(|| CheckpointError::MalformedRootHash(line.to_owned()))
}

/// The host of a Rekor v1 origin (`<host> - <decimal tree id>`), which names its signature
/// line; `None` for any other origin. Same test as sigstore-go's `.* - [0-9]+$`.
fn rekor_v1_host(origin: &str) -> Option<&str> {
    let (host, tree_id) = origin.rsplit_once(" - ")?;
    (!tree_id.is_empty() && tree_id.bytes().all(|b| b.is_ascii_digit())).then_some(host)
}

/// The host name of a URL (`scheme://[user@]host[:port][/path]`), as Go's `url.Hostname`.
fn host_name(url: &str) -> Result<&str, CheckpointError> {
    let bad = || CheckpointError::BadBaseUrl(url.to_owned());
    let (_, rest) = url.split_once("://").ok_or_else(bad)?;
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    let host = match host_port.strip_prefix('[') {
        Some(v6) => v6.split_once(']').ok_or_else(bad)?.0,
        None => host_port.split(':').next().unwrap_or_default(),
    };
    if host.is_empty() {
        return Err(bad());
    }
    Ok(host)
}

/// First 4 bytes of SHA-256 over the SPKI DER: Rekor v1's key hint for every key type, and
/// C2SP's for ECDSA.
fn spki_hint(spki_der: &[u8]) -> [u8; 4] {
    let digest = ring::digest::digest(&ring::digest::SHA256, spki_der);
    digest.as_ref()[..4]
        .try_into()
        .expect("SHA-256 is 32 bytes")
}

#[derive(Clone, Copy)]
enum Flavour {
    RekorV1,
    C2sp,
}

enum LogKey<'a> {
    EcdsaP256(&'a [u8]),
    EcdsaP384(&'a [u8]),
    Ed25519(&'a [u8]),
}

const ID_EC_PUBLIC_KEY: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.2.1");
const SECP256R1: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.3.1.7");
const SECP384R1: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.132.0.34");
const ID_ED25519: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.3.101.112");

impl<'a> LogKey<'a> {
    fn from_spki(spki_der: &'a [u8]) -> Result<Self, CheckpointError> {
        let unsupported = |m: String| CheckpointError::UnsupportedKey(m);
        let spki = SubjectPublicKeyInfoRef::from_der(spki_der)
            .map_err(|e| unsupported(format!("not a SubjectPublicKeyInfo: {e}")))?;
        let key = spki
            .subject_public_key
            .as_bytes()
            .ok_or_else(|| unsupported("public key bit string is not whole bytes".into()))?;
        let oid = spki.algorithm.oid;
        if oid == ID_ED25519 {
            return Ok(Self::Ed25519(key));
        }
        if oid != ID_EC_PUBLIC_KEY {
            return Err(unsupported(format!(
                "algorithm {oid} (want ECDSA or Ed25519)"
            )));
        }
        let curve = spki
            .algorithm
            .parameters_oid()
            .map_err(|e| unsupported(format!("ECDSA key without a named curve: {e}")))?;
        match curve {
            SECP256R1 => Ok(Self::EcdsaP256(key)),
            SECP384R1 => Ok(Self::EcdsaP384(key)),
            other => Err(unsupported(format!(
                "ECDSA curve {other} (want P-256 or P-384)"
            ))),
        }
    }

    /// The C2SP signed-note key hint of this key for the key name `name`.
    fn c2sp_hint(&self, name: &str, spki_der: &[u8]) -> [u8; 4] {
        match self {
            Self::Ed25519(raw) => {
                let mut input = Vec::with_capacity(name.len() + 2 + raw.len());
                input.extend_from_slice(name.as_bytes());
                input.extend_from_slice(b"\n\x01");
                input.extend_from_slice(raw);
                spki_hint(&input)
            }
            Self::EcdsaP256(_) | Self::EcdsaP384(_) => spki_hint(spki_der),
        }
    }

    fn verify(&self, flavour: Flavour, message: &[u8], signature: &[u8]) -> bool {
        let (algorithm, key): (&'static dyn sig::VerificationAlgorithm, _) = match (self, flavour) {
            (Self::EcdsaP256(k), _) => (&sig::ECDSA_P256_SHA256_ASN1, k),
            (Self::EcdsaP384(k), Flavour::RekorV1) => (&sig::ECDSA_P384_SHA256_ASN1, k),
            (Self::EcdsaP384(k), Flavour::C2sp) => (&sig::ECDSA_P384_SHA384_ASN1, k),
            (Self::Ed25519(k), _) => (&sig::ED25519, k),
        };
        UnparsedPublicKey::new(algorithm, key)
            .verify(message, signature)
            .is_ok()
    }
}

#[cfg(test)]
mod tests {
    //! Synthetic notes for what the conformance data lacks: P-384 and Ed25519 keys in each
    //! Rekor flavour, base URL forms, malformed lines. (The conformance cases are driven in
    //! `tests/checkpoint_conformance.rs`.)
    use der::asn1::{AnyRef, BitStringRef};
    use der::Encode as _;
    use ring::rand::SystemRandom;
    use ring::signature::{EcdsaKeyPair, Ed25519KeyPair, KeyPair as _};
    use spki::AlgorithmIdentifierRef;

    use super::*;

    enum Signer {
        Ecdsa(EcdsaKeyPair, ObjectIdentifier),
        Ed25519(Ed25519KeyPair),
    }

    impl Signer {
        fn ecdsa(alg: &'static sig::EcdsaSigningAlgorithm, curve: ObjectIdentifier) -> Self {
            let rng = SystemRandom::new();
            let pkcs8 = EcdsaKeyPair::generate_pkcs8(alg, &rng).unwrap();
            Self::Ecdsa(
                EcdsaKeyPair::from_pkcs8(alg, pkcs8.as_ref(), &rng).unwrap(),
                curve,
            )
        }

        fn ed25519() -> Self {
            let pkcs8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).unwrap();
            Self::Ed25519(Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap())
        }

        fn spki(&self) -> Vec<u8> {
            let (oid, curve, key) = match self {
                Self::Ecdsa(k, curve) => (ID_EC_PUBLIC_KEY, Some(*curve), k.public_key().as_ref()),
                Self::Ed25519(k) => (ID_ED25519, None, k.public_key().as_ref()),
            };
            SubjectPublicKeyInfoRef {
                algorithm: AlgorithmIdentifierRef {
                    oid,
                    parameters: curve.as_ref().map(AnyRef::from),
                },
                subject_public_key: BitStringRef::from_bytes(key).unwrap(),
            }
            .to_der()
            .unwrap()
        }

        fn sign(&self, text: &str) -> Vec<u8> {
            match self {
                Self::Ecdsa(k, _) => k
                    .sign(&SystemRandom::new(), text.as_bytes())
                    .unwrap()
                    .as_ref()
                    .to_vec(),
                Self::Ed25519(k) => k.sign(text.as_bytes()).as_ref().to_vec(),
            }
        }

        fn note(&self, text: &str, name: &str, hint: [u8; 4]) -> String {
            let mut sig = hint.to_vec();
            sig.extend(self.sign(text));
            format!("{text}\n\u{2014} {name} {}\n", B64.encode(sig))
        }
    }

    fn key<'a>(spki_der: &'a [u8], base_url: &'a str) -> CheckpointKey<'a> {
        CheckpointKey {
            spki_der,
            base_url,
            valid_for: ValidFor::default(),
        }
    }

    const BODY_V2: &str = "log.example.dev\n42\nAAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=\n";

    const BODY_V1: &str =
        "rekor.example.dev - 123\n7\nAAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=\nTimestamp: 1\n";

    #[test]
    fn p384_hashes_with_sha384_for_v2_and_sha256_for_v1() {
        let signer = Signer::ecdsa(&sig::ECDSA_P384_SHA384_ASN1_SIGNING, SECP384R1);
        let spki = signer.spki();
        let note = signer.note(BODY_V2, "log.example.dev", spki_hint(&spki));
        let cp = verify_checkpoint(&note, &key(&spki, "https://log.example.dev:443/api")).unwrap();
        assert_eq!(
            (cp.origin.as_str(), cp.size, cp.root_hash.len()),
            ("log.example.dev", 42, 32)
        );

        // Rekor v1 signs SHA-256 digests with every ECDSA key: a SHA-384 signature fails.
        let note = signer.note(BODY_V1, "rekor.example.dev", spki_hint(&spki));
        let err = verify_checkpoint(&note, &key(&spki, "https://rekor.example.dev")).unwrap_err();
        assert!(
            matches!(err, CheckpointError::BadSignature { line: 6, .. }),
            "{err}"
        );
    }

    #[test]
    fn rekor_v1_hint_over_spki_for_p256_and_ed25519() {
        for signer in [
            Signer::ecdsa(&sig::ECDSA_P256_SHA256_ASN1_SIGNING, SECP256R1),
            Signer::ed25519(),
        ] {
            let spki = signer.spki();
            let note = signer.note(BODY_V1, "rekor.example.dev", spki_hint(&spki));
            // The v1 origin is not compared with the base URL.
            let cp = verify_checkpoint(&note, &key(&spki, "https://elsewhere.example")).unwrap();
            assert_eq!(cp.extensions, ["Timestamp: 1"]);
            // Named otherwise than the origin's host, the line is not the log's.
            let note = signer.note(BODY_V1, "rekor.example.dev/123", spki_hint(&spki));
            let err = verify_checkpoint(&note, &key(&spki, "https://x.example")).unwrap_err();
            assert!(
                matches!(err, CheckpointError::NoSignatureByLog { .. }),
                "{err}"
            );
        }
    }

    #[test]
    fn rekor_v2_ed25519_hint_is_c2sp() {
        let signer = Signer::ed25519();
        let spki = signer.spki();
        let Signer::Ed25519(k) = &signer else {
            unreachable!()
        };
        let mut input = b"log.example.dev\n\x01".to_vec();
        input.extend_from_slice(k.public_key().as_ref());
        let hint = spki_hint(&input);
        let note = signer.note(BODY_V2, "log.example.dev", hint);
        verify_checkpoint(&note, &key(&spki, "https://log.example.dev")).unwrap();

        let note = signer.note(BODY_V2, "log.example.dev", spki_hint(&spki));
        let err = verify_checkpoint(&note, &key(&spki, "https://log.example.dev")).unwrap_err();
        assert!(
            matches!(err, CheckpointError::KeyHintMismatch { .. }),
            "{err}"
        );

        let err = verify_checkpoint(
            &signer.note(BODY_V2, "log.example.dev", hint),
            &key(&spki, "https://other.example.dev"),
        )
        .unwrap_err();
        assert!(
            matches!(err, CheckpointError::OriginMismatch { .. }),
            "{err}"
        );
    }

    #[test]
    fn host_names() {
        assert_eq!(
            host_name("https://log2025-1.rekor.sigstore.dev").unwrap(),
            "log2025-1.rekor.sigstore.dev"
        );
        assert_eq!(
            host_name("http://user@h.example:8080/x?y#z").unwrap(),
            "h.example"
        );
        assert_eq!(host_name("https://[::1]:3000/").unwrap(), "::1");
        assert!(host_name("log.example.dev").is_err());
        assert!(host_name("https:///path").is_err());
    }

    #[test]
    fn malformed_notes() {
        use CheckpointError as E;
        type Expected = fn(&E) -> bool;
        // SIG stands for a well-formed signature line.
        let cases: &[(&str, Expected)] = &[
            ("log.example.dev\n42\nAA==\n\n", |e| {
                matches!(e, E::Unsigned)
            }),
            ("log.example.dev\n42\nAA==\nSIG", |e| {
                matches!(e, E::MalformedNote(_))
            }),
            (
                "log.example.dev\n42\nAA==\n\nSIG- log.example.dev AAAAAAE=\n",
                |e| matches!(e, E::MalformedSignatureLine { line: 6, .. }),
            ),
            (
                "log.example.dev\n42\nAA==\n\n\u{2014} log.example.dev AAAA\n",
                |e| matches!(e, E::MalformedSignatureLine { line: 5, .. }),
            ),
            ("log.example.dev\n042\nAA==\n\nSIG", |e| {
                matches!(e, E::MalformedSize(_))
            }),
            ("log.example.dev\n-1\nAA==\n\nSIG", |e| {
                matches!(e, E::MalformedSize(_))
            }),
            ("log.example.dev\n42\nnot base64!\n\nSIG", |e| {
                matches!(e, E::MalformedRootHash(_))
            }),
            ("log.example.dev\n42\nAA==\n\nx\n\nSIG", |e| {
                matches!(e, E::EmptyBodyLine(4))
            }),
            ("log.example.dev\n42\nAA==\r\n\nSIG", |e| {
                matches!(e, E::MalformedNote(_))
            }),
            ("\n\nSIG", |e| matches!(e, E::MissingOrigin)),
            ("42\n\nSIG", |e| matches!(e, E::MissingOrigin)),
            ("log.example.dev\n\nSIG", |e| matches!(e, E::MissingSize)),
            ("log.example.dev\n42\n\nSIG", |e| {
                matches!(e, E::MissingRootHash)
            }),
        ];
        let spki = Signer::ed25519().spki();
        for (note, want) in cases {
            let note = note.replace("SIG", "\u{2014} log.example.dev AAAAAAE=\n");
            let err = verify_checkpoint(&note, &key(&spki, "https://log.example.dev")).unwrap_err();
            assert!(want(&err), "{note:?}: {err}");
        }
    }
}
