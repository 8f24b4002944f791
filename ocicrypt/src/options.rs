//! Layer cipher options: the public options (`pubopts` annotation) and the private options
//! (the JWE plaintext). Field names and encodings follow Go ocicrypt: Go `[]byte` is standard
//! base64 in JSON.

use std::collections::BTreeMap;
use std::fmt;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use serde::{Deserialize, Serialize};
use zeroize::{Zeroize, Zeroizing};

use crate::{Annotations, Error, ANNOTATION_PUBOPTS};

pub const CIPHER_NAME: &str = "AES_256_CTR_HMAC_SHA256";

/// Public options: the cipher and the HMAC of the ciphertext.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PublicLayerOptions {
    pub cipher: String,
    pub hmac: Vec<u8>,
}

#[derive(Serialize, Deserialize)]
struct PubOptsJson {
    cipher: String,
    hmac: String,
    #[serde(default)]
    cipheroptions: BTreeMap<String, String>,
}

impl PublicLayerOptions {
    pub fn from_annotations(annotations: &Annotations) -> Result<Self, Error> {
        let b64 = annotations.get(ANNOTATION_PUBOPTS).ok_or_else(|| {
            Error::MalformedAnnotations(format!("layer has no {ANNOTATION_PUBOPTS} annotation"))
        })?;
        let json = STANDARD.decode(b64.trim()).map_err(|e| {
            Error::MalformedAnnotations(format!("{ANNOTATION_PUBOPTS} is not base64: {e}"))
        })?;
        let parsed: PubOptsJson = serde_json::from_slice(&json).map_err(|e| {
            Error::MalformedAnnotations(format!(
                "{ANNOTATION_PUBOPTS} is not the expected JSON: {e}"
            ))
        })?;
        let hmac = STANDARD.decode(&parsed.hmac).map_err(|e| {
            Error::MalformedAnnotations(format!("{ANNOTATION_PUBOPTS} hmac is not base64: {e}"))
        })?;
        if parsed.cipher == CIPHER_NAME && hmac.len() != 32 {
            return Err(Error::MalformedAnnotations(format!(
                "{ANNOTATION_PUBOPTS} hmac is {} bytes, HMAC-SHA256 has 32",
                hmac.len()
            )));
        }
        Ok(Self {
            cipher: parsed.cipher,
            hmac,
        })
    }

    pub fn to_annotation(&self) -> String {
        let json = PubOptsJson {
            cipher: self.cipher.clone(),
            hmac: STANDARD.encode(&self.hmac),
            cipheroptions: BTreeMap::new(),
        };
        STANDARD.encode(serde_json::to_vec(&json).expect("json"))
    }
}

/// Private options: the layer's symmetric key, CTR nonce and plaintext digest.
/// Zeroized on drop; `Debug` shows only the digest.
///
/// The key is behind a pointer from the moment it is decoded: moving the options (into a
/// `LayerKey`, out of a function) copies the pointer, never the key, so no copy of it is
/// left in a dead stack frame or a freed heap block.
pub struct PrivateLayerOptions {
    symkey: Box<Zeroizing<[u8; 32]>>,
    nonce: [u8; 16],
    digest: String,
}

impl Drop for PrivateLayerOptions {
    fn drop(&mut self) {
        // The key is zeroized by its own `Zeroizing` as the box drops.
        self.nonce.zeroize();
    }
}

#[derive(Deserialize)]
struct PrivOptsJson {
    symkey: String,
    digest: String,
    cipheroptions: BTreeMap<String, String>,
}

impl Drop for PrivOptsJson {
    fn drop(&mut self) {
        self.symkey.zeroize();
        for v in self.cipheroptions.values_mut() {
            v.zeroize();
        }
    }
}

impl PrivateLayerOptions {
    pub fn new(symkey: [u8; 32], nonce: [u8; 16], digest: String) -> Self {
        Self {
            symkey: Box::new(Zeroizing::new(symkey)),
            nonce,
            digest,
        }
    }

    /// Parses the JWE plaintext.
    pub fn from_json(json: &[u8]) -> Result<Self, Error> {
        let parsed: PrivOptsJson = serde_json::from_slice(json).map_err(|e| {
            Error::MalformedAnnotations(format!(
                "private layer options are not the expected JSON: {e}"
            ))
        })?;
        // Decoded into a zeroizing buffer (a little longer than the key: base64's length
        // estimate), then into the key's own box; no Vec grows and leaves a copy behind.
        let mut decoded = Zeroizing::new([0u8; 48]);
        let symkey_len = STANDARD
            .decode_slice(parsed.symkey.as_bytes(), decoded.as_mut_slice())
            .map_err(|_| {
                Error::MalformedAnnotations(
                    "private options symkey is not base64 (or longer than 32 bytes)".into(),
                )
            })?;
        let nonce_b64 = parsed.cipheroptions.get("nonce").ok_or_else(|| {
            Error::MalformedAnnotations("private options have no cipheroptions.nonce".into())
        })?;
        let nonce = STANDARD.decode(nonce_b64).map_err(|_| {
            Error::MalformedAnnotations("private options nonce is not base64".into())
        })?;
        if symkey_len != 32 {
            return Err(Error::MalformedAnnotations(format!(
                "private options symkey is {symkey_len} bytes, AES-256 needs 32"
            )));
        }
        let nonce: [u8; 16] = nonce.as_slice().try_into().map_err(|_| {
            Error::MalformedAnnotations(format!(
                "private options nonce is {} bytes, AES-CTR needs 16",
                nonce.len()
            ))
        })?;
        let digest = parsed.digest.clone();
        let ok = digest
            .strip_prefix("sha256:")
            .is_some_and(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()));
        if !ok {
            return Err(Error::MalformedAnnotations(format!(
                "private options digest {digest:?} is not sha256:<64 hex>"
            )));
        }
        let mut symkey = Box::new(Zeroizing::new([0u8; 32]));
        symkey.copy_from_slice(&decoded[..32]);
        drop(decoded);
        drop(parsed);
        // The decoder's and the parser's temporaries are below us on the stack.
        crate::wipe::scrub_stack();
        Ok(Self {
            symkey,
            nonce,
            digest,
        })
    }

    /// The JWE plaintext, in a zeroizing buffer.
    pub fn to_json(&self) -> Zeroizing<Vec<u8>> {
        let symkey = Zeroizing::new(STANDARD.encode(self.symkey.as_slice()));
        let nonce = Zeroizing::new(STANDARD.encode(self.nonce));
        Zeroizing::new(
            format!(
                r#"{{"symkey":"{}","digest":"{}","cipheroptions":{{"nonce":"{}"}}}}"#,
                symkey.as_str(),
                self.digest,
                nonce.as_str()
            )
            .into_bytes(),
        )
    }

    pub fn symkey(&self) -> &[u8; 32] {
        &self.symkey
    }

    pub fn nonce(&self) -> &[u8; 16] {
        &self.nonce
    }

    pub fn digest(&self) -> &str {
        &self.digest
    }
}

impl fmt::Debug for PrivateLayerOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "PrivateLayerOptions {{ digest: {}, key: <redacted> }}",
            self.digest
        )
    }
}
