//! The stream processor payload containerd hands the decrypt hook on fd 3: a marshalled
//! `google.protobuf.Any` of type `io.containerd.ocicrypt.v1.Payload`, whose value is JSON
//! carrying the layer's descriptor (imgcrypt's format). Only the descriptor is used; the IPU
//! checks it against the blob.

/// The payload type imgcrypt passes for ocicrypt layers.
pub const PAYLOAD_TYPE: &str = "io.containerd.ocicrypt.v1.Payload";
/// Largest payload accepted.
pub const MAX_PAYLOAD: usize = 1 << 20;

/// The layer descriptor (JSON) in a payload's bytes; `None` for an empty payload.
pub fn descriptor(bytes: &[u8]) -> Result<Option<String>, String> {
    if bytes.is_empty() {
        return Ok(None);
    }
    if bytes.len() > MAX_PAYLOAD {
        return Err(format!("the payload on fd 3 is over {MAX_PAYLOAD} bytes"));
    }
    let any = <api::containerd_diff::Any as prost::Message>::decode(bytes)
        .map_err(|e| format!("the payload on fd 3 is not a protobuf Any: {e}"))?;
    if !any.type_url.ends_with(PAYLOAD_TYPE) {
        return Err(format!(
            "the payload on fd 3 is a {:?}, not a {PAYLOAD_TYPE}",
            any.type_url
        ));
    }
    let payload: serde_json::Value = serde_json::from_slice(&any.value)
        .map_err(|e| format!("the {PAYLOAD_TYPE} payload is not JSON: {e}"))?;
    let descriptor = payload
        .get("Descriptor")
        .or_else(|| payload.get("descriptor"))
        .filter(|d| d.is_object())
        .ok_or_else(|| format!("the {PAYLOAD_TYPE} payload has no Descriptor object"))?;
    Ok(Some(descriptor.to_string()))
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
            let e = descriptor(&bytes).unwrap_err();
            assert!(e.contains(expected), "{expected:?} not in {e:?}");
        }
    }
}
