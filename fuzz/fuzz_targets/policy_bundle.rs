//! Bundle verification on arbitrary bytes: never panics, never accepts without a trusted
//! signature (the trusted key here signs nothing the fuzzer can produce).
#![no_main]

use libfuzzer_sys::fuzz_target;
use policy::deploy::bundle;
use policy::sigstore::VerificationKey;

const KEY: &str = "-----BEGIN PUBLIC KEY-----\nMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAEMGMMkiyqp4tP6ClVDnij/nti5W4p\nO6EGgCy2zD1on1kVF6VGzbHBIVKgJZtYGfjy8spuM+DPsj1hGzTYpqdDgA==\n-----END PUBLIC KEY-----\n";

fuzz_target!(|data: &[u8]| {
    let keys = VerificationKey::from_pem(KEY.as_bytes()).unwrap();
    assert!(bundle::verify(data, &keys, None).is_err());
});
