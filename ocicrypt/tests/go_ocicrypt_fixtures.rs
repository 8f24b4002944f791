//! Layers encrypted by Go ocicrypt (skopeo 1.9) in the shared fixture set: decrypt each with
//! the RSA and EC keys, check the plaintext digest and the diff_id after decompression.

use std::io::Read;
use std::path::{Path, PathBuf};

use ocicrypt::{decrypt_layer, keys::PrivateKey, Annotations, DecryptConfig, ErrorClass};
use serde_json::Value;
use sha2::{Digest, Sha256};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

fn layout_json(digest: &str) -> Value {
    let hex = digest.strip_prefix("sha256:").unwrap();
    let p = fixtures().join("oci-layout/blobs/sha256").join(hex);
    serde_json::from_slice(&std::fs::read(p).unwrap()).unwrap()
}

fn blob(digest: &str) -> Vec<u8> {
    let hex = digest.strip_prefix("sha256:").unwrap();
    std::fs::read(fixtures().join("oci-layout/blobs/sha256").join(hex)).unwrap()
}

fn manifest_for(tag: &str) -> Value {
    let index: Value =
        serde_json::from_slice(&std::fs::read(fixtures().join("oci-layout/index.json")).unwrap())
            .unwrap();
    let entry = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == tag)
        .unwrap_or_else(|| panic!("tag {tag} not in fixture layout"));
    layout_json(entry["digest"].as_str().unwrap())
}

fn key(name: &str) -> PrivateKey {
    PrivateKey::from_pem(
        &std::fs::read(fixtures().join("keys").join(name).join("priv.pem")).unwrap(),
    )
    .unwrap()
}

fn annotations(layer: &Value) -> Annotations {
    layer["annotations"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
                .collect()
        })
        .unwrap_or_default()
}

fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(bytes)))
}

fn decompress(media_type: &str, data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    if media_type.contains("zstd") {
        zstd::stream::read::Decoder::new(data)
            .unwrap()
            .read_to_end(&mut out)
            .unwrap();
    } else if media_type.contains("gzip") {
        flate2::read::GzDecoder::new(data)
            .read_to_end(&mut out)
            .unwrap();
    } else {
        out = data.to_vec();
    }
    out
}

fn check_tag(tag: &str, key_name: &str) -> usize {
    let manifest = manifest_for(tag);
    let config = layout_json(manifest["config"]["digest"].as_str().unwrap());
    let diff_ids = config["rootfs"]["diff_ids"].as_array().unwrap();
    let dc = DecryptConfig::new(vec![key(key_name)]);
    let mut decrypted = 0;
    for (i, layer) in manifest["layers"].as_array().unwrap().iter().enumerate() {
        let mt = layer["mediaType"].as_str().unwrap();
        if !ocicrypt::is_encrypted_media_type(mt) {
            continue;
        }
        let ciphertext = blob(layer["digest"].as_str().unwrap());
        let mut dec = decrypt_layer(ciphertext.as_slice(), &annotations(layer), &dc).unwrap();
        let mut plain = Vec::new();
        dec.read_to_end(&mut plain).unwrap();
        let (proof, stale) = dec
            .finish_allowing_stale_digest()
            .unwrap_or_else(|e| panic!("{tag} layer {i}: {e}"));
        assert_eq!(
            proof.plaintext_digest(),
            Some(sha256(&plain).as_str()),
            "{tag} layer {i}"
        );
        // skopeo 1.18 recompressed the zstd tag while encrypting and recorded the gzip
        // layer's digest; every other Go-made layer declares the right one.
        assert_eq!(stale.is_some(), tag == "zstd", "{tag} layer {i}: {stale:?}");
        assert_eq!(proof.plaintext_size(), plain.len() as u64);
        let tar = decompress(ocicrypt::decrypted_media_type(mt).unwrap(), &plain);
        assert_eq!(
            sha256(&tar),
            diff_ids[i].as_str().unwrap(),
            "{tag} layer {i} diff_id"
        );
        decrypted += 1;
    }
    decrypted
}

#[test]
fn decrypts_go_ocicrypt_rsa_layers() {
    assert_eq!(check_tag("enc-rsa", "rsa-2048"), 2);
    assert_eq!(check_tag("enc-signed", "rsa-2048"), 2);
    assert_eq!(check_tag("multilayer", "rsa-2048"), 1);
    assert_eq!(check_tag("zstd", "rsa-2048"), 2);
}

#[test]
fn decrypts_go_ocicrypt_two_recipient_layers_with_either_key() {
    assert_eq!(check_tag("enc-ec-rsa", "rsa-2048"), 2);
    assert_eq!(check_tag("enc-ec-rsa", "ec-p256"), 2);
}

#[test]
fn wrong_key_is_no_key() {
    let manifest = manifest_for("enc-rsa");
    let layer = &manifest["layers"][0];
    let dc = DecryptConfig::new(vec![key("ec-p256")]);
    let err = decrypt_layer(&[][..], &annotations(layer), &dc)
        .err()
        .unwrap();
    assert_eq!(err.class(), ErrorClass::NoKey, "{err}");
    assert!(err.to_string().contains("RSA-OAEP"), "{err}");
}

#[test]
fn tampered_fixture_layer_fails_hmac() {
    let manifest = manifest_for("enc-signed");
    let layer = &manifest["layers"][1];
    let mut ciphertext = blob(layer["digest"].as_str().unwrap());
    let mid = ciphertext.len() / 2;
    ciphertext[mid] ^= 1;
    let dc = DecryptConfig::new(vec![key("rsa-2048")]);
    let mut dec = decrypt_layer(ciphertext.as_slice(), &annotations(layer), &dc).unwrap();
    let mut sink = Vec::new();
    dec.read_to_end(&mut sink).unwrap();
    let err = dec.finish().unwrap_err();
    assert_eq!(err.class(), ErrorClass::Integrity, "{err}");
}
