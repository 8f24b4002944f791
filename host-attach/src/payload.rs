//! The stream processor payload containerd hands the decrypt hook on fd 3: a marshalled
//! `google.protobuf.Any` of type `io.containerd.ocicrypt.v1.Payload`, whose value is JSON
//! carrying the layer's descriptor (imgcrypt's format). Only the descriptor is used; the IPU
//! checks it against the blob.

/// The payload type imgcrypt passes for ocicrypt layers.
pub const PAYLOAD_TYPE: &str = "io.containerd.ocicrypt.v1.Payload";
/// Largest payload accepted.
pub const MAX_PAYLOAD: usize = 1 << 20;

/// What in fd 3's payload was malformed, or why it could not be read.
#[derive(Debug, thiserror::Error)]
pub enum PayloadError {
    #[error("reading the payload on fd 3: {0}")]
    Read(#[source] std::io::Error),
    #[error("the payload on fd 3 is over {MAX_PAYLOAD} bytes")]
    TooLarge,
    #[error("the payload on fd 3 is not a protobuf Any: {0}")]
    NotAny(#[source] prost::DecodeError),
    /// The Any's type URL.
    #[error("the payload on fd 3 is a {0:?}, not a {PAYLOAD_TYPE}")]
    WrongType(String),
    #[error("the {PAYLOAD_TYPE} payload is not JSON: {0}")]
    NotJson(#[source] serde_json::Error),
    #[error("the {PAYLOAD_TYPE} payload has no Descriptor object")]
    NoDescriptor,
}

/// The layer descriptor (JSON) in a payload's bytes; `None` for an empty payload.
pub fn descriptor(bytes: &[u8]) -> Result<Option<String>, PayloadError> {
    if bytes.is_empty() {
        return Ok(None);
    }
    if bytes.len() > MAX_PAYLOAD {
        return Err(PayloadError::TooLarge);
    }
    let any = <api::containerd_diff::Any as prost::Message>::decode(bytes)
        .map_err(PayloadError::NotAny)?;
    if !any.type_url.ends_with(PAYLOAD_TYPE) {
        return Err(PayloadError::WrongType(any.type_url));
    }
    let payload: serde_json::Value =
        serde_json::from_slice(&any.value).map_err(PayloadError::NotJson)?;
    let descriptor = payload
        .get("Descriptor")
        .or_else(|| payload.get("descriptor"))
        .filter(|d| d.is_object())
        .ok_or(PayloadError::NoDescriptor)?;
    Ok(Some(descriptor.to_string()))
}

/// The layer descriptor (JSON) from the payload on fd 3, if containerd passed one.
pub fn from_fd3() -> Result<Option<String>, PayloadError> {
    use std::io::Read;
    use std::os::fd::{FromRawFd, OwnedFd};
    // containerd passes the payload as a pipe on fd 3, and only when there is one. Anything
    // else there (containerd 1.6 leaks a socket into its children as fd 3) is not a payload,
    // and reading it would never end.
    // SAFETY: fstat on a descriptor number only queries it; a closed one fails with EBADF,
    // and `st` is a plain C struct the call fills.
    let is_pipe = unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        libc::fstat(3, &mut st) == 0 && st.st_mode & libc::S_IFMT == libc::S_IFIFO
    };
    if !is_pipe {
        return Ok(None);
    }
    // SAFETY: fd 3 is an open pipe (checked above) and nothing else in this process uses it:
    // containerd passed it for this purpose; it is owned (and closed) here.
    let fd = unsafe { OwnedFd::from_raw_fd(3) };
    let mut bytes = Vec::new();
    std::fs::File::from(fd)
        .take(MAX_PAYLOAD as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(PayloadError::Read)?;
    descriptor(&bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    fn any(type_url: &str, value: &[u8]) -> Vec<u8> {
        api::containerd_diff::Any {
            type_url: type_url.into(),
            value: value.to_vec(),
        }
        .encode_to_vec()
    }

    #[test]
    fn the_descriptor_of_an_imgcrypt_payload() {
        let json = br#"{"DecryptConfig":{"Parameters":{}},"Descriptor":{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip+encrypted","digest":"sha256:ab","size":3}}"#;
        let d = descriptor(&any(PAYLOAD_TYPE, json)).unwrap().unwrap();
        let d: serde_json::Value = serde_json::from_str(&d).unwrap();
        assert_eq!(d["digest"], "sha256:ab");
        assert_eq!(d["size"], 3);
        // A type URL with a prefix, as Any allows.
        let prefixed = format!("type.googleapis.com/{PAYLOAD_TYPE}");
        assert!(descriptor(&any(&prefixed, json)).unwrap().is_some());
        assert_eq!(descriptor(b"").unwrap(), None);
    }

    #[test]
    fn each_malformed_payload_gets_its_own_error() {
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (vec![0xff; 8], "not a protobuf Any"),
            (
                any("example.com/Other", b"{}"),
                "not a io.containerd.ocicrypt.v1.Payload",
            ),
            (any(PAYLOAD_TYPE, b"not json"), "is not JSON"),
            (
                any(PAYLOAD_TYPE, br#"{"DecryptConfig":{}}"#),
                "has no Descriptor",
            ),
            (
                any(PAYLOAD_TYPE, br#"{"Descriptor":"sha256:ab"}"#),
                "has no Descriptor",
            ),
            (vec![0u8; MAX_PAYLOAD + 1], "over 1048576 bytes"),
        ];
        for (bytes, expected) in cases {
            let e = descriptor(&bytes).unwrap_err().to_string();
            assert!(e.contains(expected), "{expected:?} not in {e:?}");
        }
    }
}
