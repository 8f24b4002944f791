//! RSA-OAEP unwrap timing, valid against invalid wrapped keys (a report, not a test): the
//! median time of aws-lc's constant-time OAEP decryption (`RsaOaepKey::unwrap_cek`) for a valid
//! wrapped key, one with a flipped bit (bad padding), zero, and the wrong length. The wrong
//! length and the values 0, 1 and n-1 or above are refused by aws-lc before the private-key
//! operation: that depends on the public ciphertext only. Runs are interleaved so drift hits
//! every case alike. One run here (Debian 12, 2 shared cores, 3000 rounds): valid 194.8 us,
//! bit flipped 194.8 us (medians; p90 210.6 and 202.7 us).
//!
//! `cargo bench -p ocicrypt --bench rsa_oaep_timing [-- ROUNDS]`

use std::time::Instant;

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use ocicrypt::keys::{PrivateKey, PublicKey};

#[path = "../../tests/src/bench_report.rs"]
mod bench_report;

const RSA_PRIV: &str = include_str!("../../tests/fixtures/keys/rsa-2048/priv.pem");
const RSA_PUB: &str = include_str!("../../tests/fixtures/keys/rsa-2048/pub.pem");

fn main() {
    let rounds: usize = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(2000);
    let key = PrivateKey::from_pem(RSA_PRIV.as_bytes()).unwrap();
    let rsa = key.as_rsa().unwrap();
    // A wrapped key made by the JWE code, taken out of its JWE.
    let jwe =
        ocicrypt::jwe::wrap(b"{}", &[PublicKey::from_pem(RSA_PUB.as_bytes()).unwrap()]).unwrap();
    let json: serde_json::Value = serde_json::from_slice(&STANDARD.decode(jwe).unwrap()).unwrap();
    let valid = URL_SAFE_NO_PAD
        .decode(json["encrypted_key"].as_str().unwrap())
        .unwrap();
    let mut flipped = valid.clone();
    flipped[200] ^= 1;
    let zero = vec![0u8; valid.len()];
    let short = valid[1..].to_vec();
    let cases: [(&str, &[u8], bool); 4] = [
        ("valid", &valid, true),
        ("bit flipped (bad padding)", &flipped, false),
        ("zero (bad padding)", &zero, false),
        ("one byte short (public check)", &short, false),
    ];
    let mut times: Vec<Vec<u64>> = vec![Vec::with_capacity(rounds); cases.len()];
    for _ in 0..rounds {
        for (i, (_, c, ok)) in cases.iter().enumerate() {
            let start = Instant::now();
            let r = std::hint::black_box(rsa.unwrap_cek(std::hint::black_box(c)));
            times[i].push(start.elapsed().as_nanos() as u64);
            assert_eq!(r.is_some(), *ok);
        }
    }
    // Five consecutive slices of the interleaved runs: each slice's medians are a round of
    // the side-by-side figure (a constant-time unwrap keeps the ratio near 1).
    let slice_medians = |t: &[u64]| -> Vec<f64> {
        t.chunks(t.len().div_ceil(5).max(1))
            .map(|c| {
                bench_report::median(&c.iter().map(|&n| n as f64 / 1000.0).collect::<Vec<_>>())
            })
            .collect()
    };
    bench_report::emit(&bench_report::ratio(
        "rsa_oaep_timing",
        "RSA-2048 OAEP unwrap: bit flipped (bad padding) / valid",
        ("bit flipped", &slice_medians(&times[1])),
        ("valid", &slice_medians(&times[0])),
        "µs",
        None,
    ));
    println!("RSA-2048 OAEP unwrap (aws-lc), {rounds} interleaved rounds:");
    for ((name, _, _), t) in cases.iter().zip(times.iter_mut()) {
        t.sort_unstable();
        let q = |f: f64| t[((t.len() - 1) as f64 * f) as usize] as f64 / 1000.0;
        println!(
            "  {name:32} median {:9.1} us   p10 {:9.1} us   p90 {:9.1} us",
            q(0.5),
            q(0.1),
            q(0.9)
        );
    }
}
