//! Our encryption decrypted by our decryption for every recipient type, and the negative
//! paths: wrong key, truncation, flipped bits, wrong plaintext digest, malformed JWE.

use std::io::{Read, Write};

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use ocicrypt::keys::{PrivateKey, PublicKey};
use ocicrypt::{
    decrypt_layer_with, jwe, Annotations, DecryptConfig, DecryptMode, EncryptConfig, ErrorClass,
    HmacMode, LayerDecryptor, LayerEncryptor, PlaintextCheck, PrivateLayerOptions,
    PublicLayerOptions, ANNOTATION_KEYS_JWE,
};

const RSA_PRIV: &str = include_str!("../../tests/fixtures/keys/rsa-2048/priv.pem");
const RSA_PUB: &str = include_str!("../../tests/fixtures/keys/rsa-2048/pub.pem");
const EC_PRIV: &str = include_str!("../../tests/fixtures/keys/ec-p256/priv.pem");
const EC_PUB: &str = include_str!("../../tests/fixtures/keys/ec-p256/pub.pem");

fn ec_key_pem(curve: &str) -> (String, String) {
    use p384::pkcs8::{EncodePrivateKey, EncodePublicKey, LineEnding};
    let mut rng = rand_core::OsRng;
    match curve {
        "P-384" => {
            let k = p384::SecretKey::random(&mut rng);
            (
                k.to_pkcs8_pem(LineEnding::LF).unwrap().to_string(),
                k.public_key().to_public_key_pem(LineEnding::LF).unwrap(),
            )
        }
        "P-521" => {
            let k = p521::SecretKey::random(&mut rng);
            (
                k.to_pkcs8_pem(LineEnding::LF).unwrap().to_string(),
                k.public_key().to_public_key_pem(LineEnding::LF).unwrap(),
            )
        }
        _ => unreachable!(),
    }
}

fn encrypt(plain: &[u8], recipients: &[&str]) -> (Vec<u8>, Annotations) {
    let keys = recipients
        .iter()
        .map(|p| PublicKey::from_pem(p.as_bytes()).unwrap())
        .collect();
    let mut enc = LayerEncryptor::new(Vec::new(), &EncryptConfig::new(keys)).unwrap();
    enc.write_all(plain).unwrap();
    enc.finish().unwrap()
}

fn decrypt_in(
    mode: HmacMode,
    cipher: &[u8],
    ann: &Annotations,
    key: &str,
) -> Result<Vec<u8>, ocicrypt::Error> {
    let dc = DecryptConfig::new(vec![PrivateKey::from_pem(key.as_bytes()).unwrap()]);
    let mut dec = decrypt_layer_with(cipher, ann, &dc, mode)?;
    let mut out = Vec::new();
    dec.read_to_end(&mut out).map_err(ocicrypt::Error::Io)?;
    dec.finish()?;
    Ok(out)
}

/// Decrypts with the HMAC inline and on a helper thread; both must agree exactly.
fn decrypt(cipher: &[u8], ann: &Annotations, key: &str) -> Result<Vec<u8>, ocicrypt::Error> {
    let inline = decrypt_in(HmacMode::Inline, cipher, ann, key);
    let threaded = decrypt_in(HmacMode::Thread, cipher, ann, key);
    match (&inline, &threaded) {
        (Ok(a), Ok(b)) => assert!(a == b, "modes decrypted differently"),
        (Err(a), Err(b)) => {
            assert_eq!(a.class(), b.class());
            assert_eq!(a.to_string(), b.to_string());
        }
        _ => panic!("HMAC modes disagree: inline {inline:?}, thread {threaded:?}"),
    }
    inline
}

fn sample(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
}

#[test]
fn roundtrip_every_recipient_type() {
    let plain = sample(300_000);
    let (p384_priv, p384_pub) = ec_key_pem("P-384");
    let (p521_priv, p521_pub) = ec_key_pem("P-521");
    for (private, public) in [
        (RSA_PRIV, RSA_PUB),
        (EC_PRIV, EC_PUB),
        (p384_priv.as_str(), p384_pub.as_str()),
        (p521_priv.as_str(), p521_pub.as_str()),
    ] {
        let (cipher, ann) = encrypt(&plain, &[public]);
        assert_eq!(cipher.len(), plain.len());
        assert_ne!(cipher, plain);
        assert_eq!(decrypt(&cipher, &ann, private).unwrap(), plain);
    }
}

#[test]
fn several_recipients_each_decrypt() {
    let plain = sample(1000);
    let (cipher, ann) = encrypt(&plain, &[RSA_PUB, EC_PUB]);
    assert_eq!(ann[ANNOTATION_KEYS_JWE].split(',').count(), 2);
    assert_eq!(decrypt(&cipher, &ann, RSA_PRIV).unwrap(), plain);
    assert_eq!(decrypt(&cipher, &ann, EC_PRIV).unwrap(), plain);
}

#[test]
fn wrong_key_is_refused() {
    let (cipher, ann) = encrypt(b"layer", &[RSA_PUB]);
    let err = decrypt(&cipher, &ann, EC_PRIV).unwrap_err();
    assert_eq!(err.class(), ErrorClass::NoKey);
    let (other_priv, _) = ec_key_pem("P-384");
    let (cipher, ann) = encrypt(b"layer", &[EC_PUB]);
    assert_eq!(
        decrypt(&cipher, &ann, &other_priv).unwrap_err().class(),
        ErrorClass::NoKey
    );
}

#[test]
fn truncated_ciphertext_fails_authentication() {
    let plain = sample(100_000);
    let (cipher, ann) = encrypt(&plain, &[RSA_PUB]);
    for cut in [0, 1, cipher.len() / 2, cipher.len() - 1] {
        let err = decrypt(&cipher[..cut], &ann, RSA_PRIV).unwrap_err();
        assert_eq!(err.class(), ErrorClass::Integrity, "cut at {cut}: {err}");
    }
    // Extra bytes appended are caught too.
    let mut longer = cipher.clone();
    longer.push(0);
    assert_eq!(
        decrypt(&longer, &ann, RSA_PRIV).unwrap_err().class(),
        ErrorClass::Integrity
    );
}

#[test]
fn every_flipped_bit_position_sampled_fails_hmac() {
    let plain = sample(70_000);
    let (cipher, ann) = encrypt(&plain, &[EC_PUB]);
    for pos in [0, 1, 65_535, 65_536, 69_999] {
        let mut bad = cipher.clone();
        bad[pos] ^= 0x80;
        let err = decrypt(&bad, &ann, EC_PRIV).unwrap_err();
        assert!(err.to_string().contains("HMAC"), "{err}");
    }
}

#[test]
fn wrong_plaintext_digest_is_caught_even_with_valid_hmac() {
    let plain = sample(5000);
    let (cipher, ann) = encrypt(&plain, &[RSA_PUB]);
    let rsa = PrivateKey::from_pem(RSA_PRIV.as_bytes()).unwrap();
    let opts_json = jwe::unwrap(&ann[ANNOTATION_KEYS_JWE], std::slice::from_ref(&rsa)).unwrap();
    let opts = PrivateLayerOptions::from_json(&opts_json).unwrap();
    let forged = PrivateLayerOptions::new(
        *opts.symkey(),
        *opts.nonce(),
        format!("sha256:{}", "0".repeat(64)),
    );
    let pubopts = PublicLayerOptions::from_annotations(&ann).unwrap();
    let mut dec = LayerDecryptor::with_options(cipher.as_slice(), &pubopts, &forged).unwrap();
    let mut out = Vec::new();
    dec.read_to_end(&mut out).unwrap();
    assert_eq!(
        out, plain,
        "the stream decrypts, but must not be authenticated"
    );
    let err = dec.finish().unwrap_err();
    assert!(err.to_string().contains("does not match"), "{err}");

    // A caller that verifies the plaintext itself takes that check on: the same forged digest
    // passes, and the proof says no digest was computed.
    for hmac in [HmacMode::Inline, HmacMode::Thread] {
        let mode = DecryptMode {
            hmac,
            plaintext: PlaintextCheck::CallerVerifies,
        };
        let mut dec =
            LayerDecryptor::with_options_and_mode(cipher.as_slice(), &pubopts, &forged, mode)
                .unwrap();
        let mut out = Vec::new();
        dec.read_to_end(&mut out).unwrap();
        assert_eq!(out, plain);
        let proof = dec.finish().expect("only the HMAC is checked");
        assert_eq!(proof.plaintext_digest(), None);
        assert_eq!(proof.plaintext_size(), plain.len() as u64);
    }
}

/// Leaving the plaintext digest to the caller leaves the HMAC in place: every modified,
/// truncated or extended ciphertext is refused at `finish`, in both HMAC modes. The control
/// (the unmodified ciphertext) must pass.
#[test]
fn caller_verified_plaintext_still_needs_the_hmac() {
    let plain = sample(300_000);
    let (cipher, ann) = encrypt(&plain, &[RSA_PUB]);
    let dc = DecryptConfig::new(vec![PrivateKey::from_pem(RSA_PRIV.as_bytes()).unwrap()]);
    let mut flipped = cipher.clone();
    flipped[200_000] ^= 0x01;
    let mut extended = cipher.clone();
    extended.push(0);
    let cases: [(&str, &[u8]); 4] = [
        ("unmodified", &cipher),
        ("one bit flipped", &flipped),
        ("truncated", &cipher[..cipher.len() - 1]),
        ("extended", &extended),
    ];
    for hmac in [HmacMode::Inline, HmacMode::Thread] {
        for (what, bytes) in cases {
            let mode = DecryptMode {
                hmac,
                plaintext: PlaintextCheck::CallerVerifies,
            };
            let mut dec = decrypt_layer_with(bytes, &ann, &dc, mode).unwrap();
            std::io::copy(&mut dec, &mut std::io::sink()).unwrap();
            let result = dec.finish();
            if what == "unmodified" {
                result.unwrap_or_else(|e| panic!("{hmac:?}: the control fails: {e}"));
            } else {
                let err = result.expect_err(what);
                assert_eq!(err.class(), ErrorClass::Integrity, "{hmac:?} {what}: {err}");
            }
        }
    }
}

fn rewrite_jwe(ann: &Annotations, edit: impl Fn(&mut serde_json::Value)) -> Annotations {
    let json = STANDARD.decode(&ann[ANNOTATION_KEYS_JWE]).unwrap();
    let mut v: serde_json::Value = serde_json::from_slice(&json).unwrap();
    edit(&mut v);
    let mut out = ann.clone();
    out.insert(
        ANNOTATION_KEYS_JWE.into(),
        STANDARD.encode(serde_json::to_vec(&v).unwrap()),
    );
    out
}

#[test]
fn malformed_jwe_inputs_are_clear_errors() {
    let (cipher, ann) = encrypt(b"x", &[RSA_PUB]);
    let cases: Vec<(&str, Annotations, ErrorClass)> = vec![
        (
            "bad base64",
            {
                let mut a = ann.clone();
                a.insert(ANNOTATION_KEYS_JWE.into(), "!!!".into());
                a
            },
            ErrorClass::Malformed,
        ),
        (
            "not json",
            {
                let mut a = ann.clone();
                a.insert(ANNOTATION_KEYS_JWE.into(), STANDARD.encode("nope"));
                a
            },
            ErrorClass::Malformed,
        ),
        (
            "short tag",
            rewrite_jwe(&ann, |v| v["tag"] = URL_SAFE_NO_PAD.encode([0u8; 8]).into()),
            ErrorClass::Malformed,
        ),
        (
            "bad iv",
            rewrite_jwe(&ann, |v| v["iv"] = URL_SAFE_NO_PAD.encode([0u8; 4]).into()),
            ErrorClass::Malformed,
        ),
        (
            "wrong alg",
            rewrite_jwe(&ann, |v| {
                v["protected"] = URL_SAFE_NO_PAD
                    .encode(r#"{"alg":"dir","enc":"A256GCM"}"#)
                    .into()
            }),
            ErrorClass::Unsupported,
        ),
        (
            "wrong enc",
            rewrite_jwe(&ann, |v| {
                v["protected"] = URL_SAFE_NO_PAD
                    .encode(r#"{"alg":"RSA-OAEP","enc":"A128CBC-HS256"}"#)
                    .into()
            }),
            ErrorClass::Unsupported,
        ),
        (
            "unknown member",
            rewrite_jwe(&ann, |v| v["surprise"] = 1.into()),
            ErrorClass::Malformed,
        ),
        (
            "modified ciphertext",
            rewrite_jwe(&ann, |v| {
                let mut c = URL_SAFE_NO_PAD
                    .decode(v["ciphertext"].as_str().unwrap())
                    .unwrap();
                c[0] ^= 1;
                v["ciphertext"] = URL_SAFE_NO_PAD.encode(c).into();
            }),
            ErrorClass::Integrity,
        ),
        (
            "missing pubopts",
            {
                let mut a = ann.clone();
                a.remove(ocicrypt::ANNOTATION_PUBOPTS);
                a
            },
            ErrorClass::Malformed,
        ),
    ];
    for (name, a, class) in cases {
        let err = decrypt(&cipher, &a, RSA_PRIV).unwrap_err();
        assert_eq!(err.class(), class, "{name}: {err}");
    }
}

#[test]
fn wrong_cek_length_is_refused() {
    // A JWE whose RSA-wrapped content key is 16 bytes.
    let rsa_pub = rsa::RsaPublicKey::from_public_key_pem(RSA_PUB).unwrap();
    use rsa::pkcs8::DecodePublicKey;
    let wrapped = rsa_pub
        .encrypt(
            &mut rand_core::OsRng,
            rsa::Oaep::new::<sha1::Sha1>(),
            &[7u8; 16],
        )
        .unwrap();
    let protected = URL_SAFE_NO_PAD.encode(r#"{"alg":"RSA-OAEP","enc":"A256GCM"}"#);
    let jwe = serde_json::json!({
        "protected": protected,
        "encrypted_key": URL_SAFE_NO_PAD.encode(wrapped),
        "iv": URL_SAFE_NO_PAD.encode([0u8; 12]),
        "ciphertext": URL_SAFE_NO_PAD.encode([0u8; 4]),
        "tag": URL_SAFE_NO_PAD.encode([0u8; 16]),
    });
    let ann = STANDARD.encode(serde_json::to_vec(&jwe).unwrap());
    let key = PrivateKey::from_pem(RSA_PRIV.as_bytes()).unwrap();
    let err = jwe::unwrap(&ann, &[key]).unwrap_err();
    assert!(err.to_string().contains("32"), "{err}");
}

#[test]
fn key_holders_never_show_key_bytes() {
    let key = PrivateKey::from_pem(RSA_PRIV.as_bytes()).unwrap();
    let dc = DecryptConfig::new(vec![key]);
    let shown = format!("{dc:?}");
    assert!(shown.contains("redacted"), "{shown}");
    let opts =
        PrivateLayerOptions::new([0xab; 32], [0xcd; 16], format!("sha256:{}", "1".repeat(64)));
    let shown = format!("{opts:?}");
    assert!(!shown.contains("ab") && !shown.contains("171"), "{shown}");
    assert!(!String::from_utf8_lossy(&opts.to_json()).is_empty());
}

/// A reader that fails every third call before its end, then goes on.
struct Flaky<'a> {
    data: &'a [u8],
    calls: usize,
}

impl Read for Flaky<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.calls += 1;
        if self.calls % 3 == 0 && !self.data.is_empty() {
            return Err(std::io::Error::other("flaky"));
        }
        // Short reads of odd sizes, to cross block boundaries everywhere.
        let n = buf.len().min(self.data.len()).min(7919);
        buf[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Ok(n)
    }
}

#[test]
fn the_hmac_thread_survives_read_errors_and_short_reads() {
    let plain = sample(1 << 20);
    let (cipher, ann) = encrypt(&plain, &[RSA_PUB]);
    let dc = DecryptConfig::new(vec![PrivateKey::from_pem(RSA_PRIV.as_bytes()).unwrap()]);
    let reader = Flaky {
        data: &cipher,
        calls: 0,
    };
    let mut dec = decrypt_layer_with(reader, &ann, &dc, HmacMode::Thread).unwrap();
    let mut out = Vec::new();
    let mut buf = vec![0u8; 100_000];
    let mut errors = 0;
    loop {
        match dec.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(_) => errors += 1,
        }
    }
    assert!(errors > 10, "the reader failed {errors} times");
    assert_eq!(out, plain);
    dec.finish().unwrap();
}

/// The HMAC thread takes the ciphertext a whole chunk at a time, read ahead of the caller:
/// reads of any size, across chunk ends, yield the plaintext, and the tag still covers all.
#[test]
fn reads_of_any_size_decrypt_across_the_read_ahead() {
    let plain = sample((2 << 20) + 12_345);
    let (cipher, ann) = encrypt(&plain, &[RSA_PUB]);
    let dc = DecryptConfig::new(vec![PrivateKey::from_pem(RSA_PRIV.as_bytes()).unwrap()]);
    for sizes in [
        &[1usize, 4095, 65_536][..],
        &[3 << 20],
        &[(1 << 20) - 1, 17],
    ] {
        for hmac in [HmacMode::Inline, HmacMode::Thread] {
            let mut dec = decrypt_layer_with(&cipher[..], &ann, &dc, hmac).unwrap();
            let mut out = Vec::new();
            let mut buf = vec![0u8; 3 << 20];
            for size in sizes.iter().cycle() {
                let n = dec.read(&mut buf[..*size]).unwrap();
                if n == 0 {
                    break;
                }
                out.extend_from_slice(&buf[..n]);
            }
            assert!(out == plain, "{hmac:?}, reads of {sizes:?}");
            dec.finish().unwrap();
        }
    }
    // A flipped bit in the last chunk, read in small pieces, still fails the HMAC.
    let mut bad = cipher.clone();
    *bad.last_mut().unwrap() ^= 1;
    let mut dec = decrypt_layer_with(&bad[..], &ann, &dc, HmacMode::Thread).unwrap();
    let mut buf = [0u8; 1000];
    while dec.read(&mut buf).unwrap() != 0 {}
    assert!(matches!(dec.finish(), Err(ocicrypt::Error::Integrity(_))));
}

#[test]
fn dropping_a_threaded_decryptor_midway_does_not_hang() {
    let plain = sample(2 << 20);
    let (cipher, ann) = encrypt(&plain, &[RSA_PUB]);
    let dc = DecryptConfig::new(vec![PrivateKey::from_pem(RSA_PRIV.as_bytes()).unwrap()]);
    for _ in 0..20 {
        let mut dec = decrypt_layer_with(&cipher[..], &ann, &dc, HmacMode::Thread).unwrap();
        let mut buf = vec![0u8; 65536];
        for _ in 0..10 {
            dec.read_exact(&mut buf).unwrap();
        }
        drop(dec);
    }
}
