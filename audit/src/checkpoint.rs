//! Signed checkpoints: the C2SP `tlog-checkpoint` body inside a C2SP `signed-note`, signed
//! with Ed25519. The formats are the ones Go's `golang.org/x/mod/sumdb/note` and the
//! transparency-dev tooling read and write, so witnesses and tools built for them work.
//!
//! ```text
//! <origin>
//! <tree size>
//! <base64 root hash>
//!
//! — <key name> <base64(key hash[4] || signature[64])>
//! ```

use std::fmt;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use ring::signature::{Ed25519KeyPair, KeyPair, UnparsedPublicKey, ED25519};
use zeroize::Zeroizing;

use crate::merkle::Hash;

/// Signature algorithm identifier of Ed25519 in signed notes.
const ALG_ED25519: u8 = 0x01;
const SIG_PREFIX: &str = "\u{2014} ";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NoteError {
    #[error("malformed key: {0}")]
    Key(String),
    #[error("malformed note: {0}")]
    Malformed(String),
    #[error("no signature by key {0} on the note")]
    NotSigned(String),
    #[error("signature by key {0} does not verify")]
    BadSignature(String),
}

/// The checkpoint body: which log, how big, and its root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    pub origin: String,
    pub size: u64,
    pub root: Hash,
    /// Optional extension lines (none written by this log today).
    pub extensions: Vec<String>,
}

impl Checkpoint {
    pub fn body(&self) -> String {
        let mut s = format!(
            "{}\n{}\n{}\n",
            self.origin,
            self.size,
            B64.encode(self.root)
        );
        for e in &self.extensions {
            s.push_str(e);
            s.push('\n');
        }
        s
    }

    pub fn parse_body(body: &str) -> Result<Self, NoteError> {
        let bad = |m: &str| NoteError::Malformed(format!("checkpoint {m}"));
        let body = body
            .strip_suffix('\n')
            .ok_or_else(|| bad("does not end with a newline"))?;
        let mut lines = body.split('\n');
        let origin = lines
            .next()
            .filter(|o| !o.is_empty())
            .ok_or_else(|| bad("has no origin"))?;
        let size = lines.next().ok_or_else(|| bad("has no size line"))?;
        if size.is_empty() || (size.len() > 1 && size.starts_with('0')) {
            return Err(bad("size is not a canonical decimal"));
        }
        let size: u64 = size.parse().map_err(|_| bad("size is not a number"))?;
        let root = lines.next().ok_or_else(|| bad("has no root line"))?;
        let root: Hash = B64
            .decode(root)
            .ok()
            .and_then(|r| r.try_into().ok())
            .ok_or_else(|| bad("root is not 32 bytes of base64"))?;
        let extensions: Vec<String> = lines.map(str::to_string).collect();
        if extensions.iter().any(|e| e.is_empty()) {
            return Err(bad("has an empty extension line"));
        }
        Ok(Self {
            origin: origin.to_string(),
            size,
            root,
            extensions,
        })
    }
}

fn key_hash(name: &str, public: &[u8; 32]) -> [u8; 4] {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(name.as_bytes());
    ctx.update(b"\n");
    ctx.update(&[ALG_ED25519]);
    ctx.update(public);
    ctx.finish().as_ref()[..4].try_into().expect("4 bytes")
}

fn check_name(name: &str) -> Result<(), NoteError> {
    if name.is_empty()
        || name.contains(['+', ' ', '\n', '\t'])
        || name.chars().any(char::is_control)
    {
        return Err(NoteError::Key(format!(
            "key name {name:?} must be non-empty without spaces, '+' or control characters"
        )));
    }
    Ok(())
}

/// The public half: verifies notes. Written as `<name>+<hex key hash>+<base64(0x01||key)>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NoteVerifier {
    name: String,
    hash: [u8; 4],
    public: [u8; 32],
}

impl NoteVerifier {
    pub fn parse(s: &str) -> Result<Self, NoteError> {
        let s = s.trim();
        // The base64 key may itself contain '+'.
        let mut parts = s.splitn(3, '+');
        let (Some(name), Some(hash), Some(key), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(NoteError::Key(
                "verifier key is not NAME+HASH+KEY".to_string(),
            ));
        };
        check_name(name)?;
        let key = B64
            .decode(key)
            .map_err(|_| NoteError::Key("verifier key is not base64".into()))?;
        let Some((&ALG_ED25519, public)) = key.split_first() else {
            return Err(NoteError::Key(
                "verifier key is not an Ed25519 (0x01) key".into(),
            ));
        };
        let public: [u8; 32] = public
            .try_into()
            .map_err(|_| NoteError::Key("Ed25519 key is not 32 bytes".into()))?;
        let want = key_hash(name, &public);
        if hash != hex::encode(want) {
            return Err(NoteError::Key(format!(
                "verifier key hash {hash} does not match its name and key"
            )));
        }
        Ok(Self {
            name: name.to_string(),
            hash: want,
            public,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Verifies a signed note and returns its text (without signatures).
    pub fn open<'a>(&self, note: &'a str) -> Result<&'a str, NoteError> {
        let split = note
            .rfind("\n\n")
            .ok_or_else(|| NoteError::Malformed("no blank line before the signatures".into()))?;
        let (text, sigs) = (&note[..split + 1], &note[split + 2..]);
        if text.chars().any(|c| c.is_control() && c != '\n') {
            return Err(NoteError::Malformed(
                "control characters in the text".into(),
            ));
        }
        if !sigs.ends_with('\n') {
            return Err(NoteError::Malformed(
                "signature lines do not end with a newline".into(),
            ));
        }
        let mut found = false;
        for line in sigs.lines() {
            let rest = line
                .strip_prefix(SIG_PREFIX)
                .ok_or_else(|| NoteError::Malformed(format!("bad signature line {line:?}")))?;
            let (name, sig) = rest
                .split_once(' ')
                .ok_or_else(|| NoteError::Malformed(format!("bad signature line {line:?}")))?;
            let sig = B64
                .decode(sig)
                .map_err(|_| NoteError::Malformed("signature is not base64".into()))?;
            if name != self.name || sig.len() < 4 || sig[..4] != self.hash {
                continue; // another key's signature (a witness, say)
            }
            found = true;
            UnparsedPublicKey::new(&ED25519, &self.public)
                .verify(text.as_bytes(), &sig[4..])
                .map_err(|_| NoteError::BadSignature(self.to_string()))?;
        }
        if !found {
            return Err(NoteError::NotSigned(self.to_string()));
        }
        Ok(text)
    }

    /// Verifies a signed checkpoint note and parses its body.
    pub fn open_checkpoint(&self, note: &str) -> Result<Checkpoint, NoteError> {
        Checkpoint::parse_body(self.open(note)?)
    }
}

impl fmt::Display for NoteVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut key = vec![ALG_ED25519];
        key.extend_from_slice(&self.public);
        write!(
            f,
            "{}+{}+{}",
            self.name,
            hex::encode(self.hash),
            B64.encode(key)
        )
    }
}

/// The private half. Stored as Go's note signer key,
/// `PRIVATE+KEY+<name>+<hex key hash>+<base64(0x01||seed)>`; never printed.
pub struct CheckpointSigner {
    verifier: NoteVerifier,
    keypair: Ed25519KeyPair,
}

impl fmt::Debug for CheckpointSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CheckpointSigner")
            .field("verifier", &self.verifier.to_string())
            .finish_non_exhaustive()
    }
}

impl CheckpointSigner {
    /// A new random key; returns the signer and its encoded private key (to store, 0600).
    pub fn generate(name: &str) -> Result<(Self, Zeroizing<String>), NoteError> {
        check_name(name)?;
        let mut seed = Zeroizing::new([0u8; 32]);
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), seed.as_mut())
            .map_err(|_| NoteError::Key("no randomness".into()))?;
        let signer = Self::from_seed(name, &seed)?;
        let mut key = Zeroizing::new(vec![ALG_ED25519]);
        key.extend_from_slice(seed.as_ref());
        let encoded = Zeroizing::new(format!(
            "PRIVATE+KEY+{name}+{}+{}",
            hex::encode(signer.verifier.hash),
            B64.encode(&*key)
        ));
        Ok((signer, encoded))
    }

    fn from_seed(name: &str, seed: &[u8; 32]) -> Result<Self, NoteError> {
        let keypair = Ed25519KeyPair::from_seed_unchecked(seed)
            .map_err(|_| NoteError::Key("bad Ed25519 seed".into()))?;
        let public: [u8; 32] = keypair.public_key().as_ref().try_into().expect("32 bytes");
        Ok(Self {
            verifier: NoteVerifier {
                name: name.to_string(),
                hash: key_hash(name, &public),
                public,
            },
            keypair,
        })
    }

    /// Parses an encoded private key (see [`generate`](Self::generate)).
    pub fn parse(encoded: &str) -> Result<Self, NoteError> {
        let rest = encoded
            .trim()
            .strip_prefix("PRIVATE+KEY+")
            .ok_or_else(|| NoteError::Key("signer key does not start with PRIVATE+KEY+".into()))?;
        let mut parts = rest.splitn(3, '+');
        let (Some(name), Some(hash), Some(key), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(NoteError::Key(
                "signer key is not PRIVATE+KEY+NAME+HASH+KEY".into(),
            ));
        };
        check_name(name)?;
        let key = Zeroizing::new(
            B64.decode(key)
                .map_err(|_| NoteError::Key("signer key is not base64".into()))?,
        );
        let Some((&ALG_ED25519, seed)) = key.split_first() else {
            return Err(NoteError::Key("signer key is not Ed25519".into()));
        };
        let seed: &[u8; 32] = seed
            .try_into()
            .map_err(|_| NoteError::Key("Ed25519 seed is not 32 bytes".into()))?;
        let signer = Self::from_seed(name, seed)?;
        if hash != hex::encode(signer.verifier.hash) {
            return Err(NoteError::Key("signer key hash does not match".into()));
        }
        Ok(signer)
    }

    pub fn verifier(&self) -> &NoteVerifier {
        &self.verifier
    }

    /// Signs a note text (which must end with a newline).
    pub fn sign(&self, text: &str) -> String {
        assert!(text.ends_with('\n'), "note text ends with a newline");
        let sig = self.keypair.sign(text.as_bytes());
        let mut blob = self.verifier.hash.to_vec();
        blob.extend_from_slice(sig.as_ref());
        format!(
            "{text}\n{SIG_PREFIX}{} {}\n",
            self.verifier.name,
            B64.encode(blob)
        )
    }

    pub fn sign_checkpoint(&self, cp: &Checkpoint) -> String {
        self.sign(&cp.body())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cp(size: u64) -> Checkpoint {
        Checkpoint {
            origin: "ipu.example/audit/test".into(),
            size,
            root: [7u8; 32],
            extensions: vec![],
        }
    }

    #[test]
    fn sign_open_round_trip_and_key_encodings() {
        let (signer, encoded) = CheckpointSigner::generate("ipu.example/audit").unwrap();
        let again = CheckpointSigner::parse(&encoded).unwrap();
        assert_eq!(again.verifier(), signer.verifier());
        let verifier = NoteVerifier::parse(&signer.verifier().to_string()).unwrap();
        let note = signer.sign_checkpoint(&cp(42));
        assert!(note.contains("\n\n\u{2014} ipu.example/audit "));
        assert_eq!(verifier.open_checkpoint(&note).unwrap(), cp(42));
        // Debug never shows the seed.
        let seed_b64 = encoded.splitn(5, '+').nth(4).unwrap();
        assert!(!format!("{signer:?}").contains(seed_b64));
    }

    /// The C2SP signed-note spec's example key: name `PeterNeumann`, key hash `c74f20a3`.
    #[test]
    fn parses_the_spec_example_verifier_key() {
        let v = NoteVerifier::parse(
            "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW",
        )
        .unwrap();
        assert_eq!(v.name(), "PeterNeumann");
        let note = "If you think cryptography is the answer to your problem,\nthen you don't know what your problem is.\n\n\u{2014} PeterNeumann x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqdngotpRZb6KE6RyyBwJnAM=\n";
        assert_eq!(
            v.open(note).unwrap(),
            "If you think cryptography is the answer to your problem,\nthen you don't know what your problem is.\n"
        );
        // The spec's signer key signs that text to exactly that note (Ed25519 is deterministic).
        let signer = CheckpointSigner::parse(
            "PRIVATE+KEY+PeterNeumann+c74f20a3+AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz",
        )
        .unwrap();
        assert_eq!(signer.verifier(), &v);
        assert_eq!(signer.sign(v.open(note).unwrap()), note);
    }

    #[test]
    fn tampered_and_foreign_notes_are_refused() {
        let (signer, _) = CheckpointSigner::generate("log").unwrap();
        let (other, _) = CheckpointSigner::generate("log").unwrap();
        let v = signer.verifier().clone();
        let note = signer.sign_checkpoint(&cp(10));
        let changed = note.replacen("\n10\n", "\n11\n", 1);
        assert!(matches!(v.open(&changed), Err(NoteError::BadSignature(_))));
        let foreign = other.sign_checkpoint(&cp(10));
        assert!(matches!(v.open(&foreign), Err(NoteError::NotSigned(_))));
        assert!(v.open("no signatures\n").is_err());
        assert!(Checkpoint::parse_body("o\n010\nAAAA\n").is_err());
        assert!(Checkpoint::parse_body("o\n10\nAAAA\n").is_err());
        assert!(NoteVerifier::parse("log+00000000+AQ==").is_err());
    }
}
