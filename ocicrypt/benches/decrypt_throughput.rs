//! Decrypt throughput of a 256 MiB encrypted layer: this crate vs Go ocicrypt through
//! `skopeo copy --decryption-key`, on the same layer in the same run.
//!
//! `cargo bench -p ocicrypt --bench decrypt_throughput` (set `LAYER_MIB` to change the size).
//! Prints MB/s (10^6 bytes/s) for:
//! - one SHA-256 pass over the layer in memory: the reference ceiling (the HMAC is one);
//! - ours, decryption: the HMAC over the ciphertext on a helper thread (the default with two
//!   or more CPUs) + AES-256-CTR, to a sink, `finish()` checks the HMAC; the plaintext is left
//!   to the caller (`PlaintextCheck::CallerVerifies`), as the unpack path does, which checks
//!   the decompressed stream against the signed diff_id;
//! - ours, + plaintext digest: the same and SHA-256 of the plaintext, checked against the
//!   private options (`DecryptMode::auto`, a second SHA-256 pass);
//! - ours, one thread: HMAC + AES-256-CTR + plaintext digest, all on the reading thread;
//! - ours, to a file: with the plaintext digest, writing the plaintext blob to disk;
//! - skopeo: `skopeo copy --decryption-key` from one OCI layout to another (the layer's
//!   decryption, digesting and writing; config and manifest are a few hundred bytes);
//!
//! and the ratios of ours to skopeo. Every way runs once per round (`ROUNDS`, default 5); the
//! medians and the per-round ratios are reported (`BENCH_JSON`: see tests/src/bench_report.rs).

use std::fs::{self, File};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use ocicrypt::keys::{PrivateKey, PublicKey};
use ocicrypt::{Annotations, DecryptConfig, DecryptMode, EncryptConfig, HmacMode, LayerEncryptor};
use sha2::{Digest, Sha256};

#[path = "../../tests/src/bench_report.rs"]
mod bench_report;

/// Rounds unless `ROUNDS` says otherwise.
const RUNS: usize = 5;

fn fixture_key(file: &str) -> Vec<u8> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures/keys/rsa-2048")
        .join(file);
    fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// Pseudo-random, incompressible bytes (xorshift64*), written as a gzip "stored" stream so
/// the blob is a valid `tar+gzip` layer whatever the tool checks.
fn make_plain_layer(path: &Path, size: usize) -> io::Result<()> {
    let mut tar_data = Vec::with_capacity(size + 2048);
    let mut header = tar::Header::new_gnu();
    header.set_path("data").unwrap();
    header.set_size((size - 1536) as u64);
    header.set_mode(0o644);
    header.set_cksum();
    tar_data.extend_from_slice(header.as_bytes());
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    while tar_data.len() < size - 1024 {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        tar_data.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    tar_data.truncate(size - 1024);
    tar_data.resize(size, 0);
    let mut gz = flate2::write::GzEncoder::new(
        BufWriter::new(File::create(path)?),
        flate2::Compression::none(),
    );
    gz.write_all(&tar_data)?;
    gz.finish()?.flush()
}

struct Layer {
    digest: String,
    size: u64,
    annotations: Annotations,
}

fn encrypt(plain: &Path, out: &Path, recipient: &PublicKey) -> Layer {
    let mut enc = LayerEncryptor::new(
        BufWriter::with_capacity(1 << 20, File::create(out).unwrap()),
        &EncryptConfig::new(vec![recipient.clone()]),
    )
    .unwrap();
    io::copy(&mut BufReader::new(File::open(plain).unwrap()), &mut enc).unwrap();
    let (mut w, annotations) = enc.finish().unwrap();
    w.flush().unwrap();
    let bytes = fs::read(out).unwrap();
    Layer {
        digest: format!("sha256:{}", sha256_hex(&bytes)),
        size: bytes.len() as u64,
        annotations,
    }
}

/// An OCI layout holding one image whose only layer is `blob`.
fn write_layout(dir: &Path, blob: &Path, layer: &Layer, diff_id: &str) {
    let blobs = dir.join("blobs/sha256");
    fs::create_dir_all(&blobs).unwrap();
    fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    fs::rename(blob, blobs.join(layer.digest.trim_start_matches("sha256:"))).unwrap();
    let put = |bytes: Vec<u8>| {
        let hex = sha256_hex(&bytes);
        let size = bytes.len();
        fs::write(blobs.join(&hex), bytes).unwrap();
        (format!("sha256:{hex}"), size)
    };
    let (config_digest, config_size) = put(serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
    }))
    .unwrap());
    let (manifest_digest, manifest_size) = put(serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": config_digest, "size": config_size},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip+encrypted",
                    "digest": layer.digest, "size": layer.size,
                    "annotations": layer.annotations}],
    }))
    .unwrap());
    fs::write(
        dir.join("index.json"),
        serde_json::to_vec(&serde_json::json!({
            "schemaVersion": 2,
            "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json",
                           "digest": manifest_digest, "size": manifest_size,
                           "annotations": {"org.opencontainers.image.ref.name": "enc"}}],
        }))
        .unwrap(),
    )
    .unwrap();
}

fn ours(
    blob: &Path,
    layer: &Layer,
    dc: &DecryptConfig,
    out: Option<&Path>,
    mode: impl Into<DecryptMode>,
) -> Duration {
    let start = Instant::now();
    let file = File::open(blob).unwrap();
    let mut dec = ocicrypt::decrypt_layer_with(file, &layer.annotations, dc, mode).unwrap();
    match out {
        None => {
            let mut buf = vec![0u8; 256 << 10];
            while dec.read(&mut buf).unwrap() != 0 {}
        }
        Some(path) => {
            let mut w = BufWriter::with_capacity(1 << 20, File::create(path).unwrap());
            io::copy(&mut dec, &mut w).unwrap();
            w.flush().unwrap();
        }
    }
    let done = dec.finish().expect("HMAC (and digest) verify");
    assert_eq!(done.plaintext_size(), layer.size);
    start.elapsed()
}

fn skopeo(layout: &Path, out: &Path, key: &Path) -> Option<Duration> {
    let _ = fs::remove_dir_all(out);
    let start = Instant::now();
    let status = Command::new("skopeo")
        .args(["--insecure-policy", "copy", "-q", "--decryption-key"])
        .arg(key)
        .arg(format!("oci:{}:enc", layout.display()))
        .arg(format!("oci:{}:plain", out.display()))
        .status()
        .ok()?;
    let elapsed = start.elapsed();
    status.success().then_some(elapsed)
}

fn mbps(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / 1e6
}

fn main() {
    // `cargo bench` passes `--bench`; nothing else to parse.
    let mib: usize = std::env::var("LAYER_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256);
    let size = mib << 20;
    let work = tempfile::Builder::new()
        .prefix("ocicrypt-bench")
        .tempdir_in(bench_dir())
        .unwrap();
    let plain = work.path().join("plain.tar.gz");
    make_plain_layer(&plain, size).unwrap();
    let plain_bytes = fs::read(&plain).unwrap();
    let diff_id = {
        let mut tar = Vec::new();
        flate2::read::GzDecoder::new(&plain_bytes[..])
            .read_to_end(&mut tar)
            .unwrap();
        format!("sha256:{}", sha256_hex(&tar))
    };
    drop(plain_bytes);

    let public = PublicKey::from_pem(&fixture_key("pub.pem")).unwrap();
    let private = PrivateKey::from_pem(&fixture_key("priv.pem")).unwrap();
    let dc = DecryptConfig::new(vec![private]);
    let encrypted = work.path().join("layer.enc");
    let layer = encrypt(&plain, &encrypted, &public);
    let layout = work.path().join("layout");
    write_layout(&layout, &encrypted, &layer, &diff_id);
    let blob = layout
        .join("blobs/sha256")
        .join(layer.digest.trim_start_matches("sha256:"));
    let key_file = work.path().join("priv.pem");
    fs::write(&key_file, fixture_key("priv.pem")).unwrap();

    println!(
        "layer: {} bytes ({mib} MiB), {}, {} CPUs",
        layer.size,
        ocicrypt::hardware_acceleration(),
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    let rounds: usize = std::env::var("ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(RUNS);
    // Warm the page cache, then measure, every way once per round: the ratios are per round.
    ours(&blob, &layer, &dc, None, HmacMode::Inline);
    let ciphertext = fs::read(&blob).unwrap();
    let out = work.path().join("ours.out");
    let skopeo_out = work.path().join("skopeo-out");
    let (mut sha, mut inline, mut decrypt, mut with_digest, mut to_file, mut sk) =
        (vec![], vec![], vec![], vec![], vec![], vec![]);
    for _ in 0..rounds {
        // The ceiling for one SHA-256 pass on this machine, now: the HMAC over the ciphertext
        // is one.
        let start = Instant::now();
        std::hint::black_box(Sha256::digest(&ciphertext));
        sha.push(mbps(layer.size, start.elapsed()));
        inline.push(mbps(
            layer.size,
            ours(&blob, &layer, &dc, None, HmacMode::Inline),
        ));
        decrypt.push(mbps(
            layer.size,
            ours(&blob, &layer, &dc, None, DecryptMode::caller_verifies()),
        ));
        with_digest.push(mbps(
            layer.size,
            ours(&blob, &layer, &dc, None, DecryptMode::auto()),
        ));
        to_file.push(mbps(
            layer.size,
            ours(&blob, &layer, &dc, Some(&out), DecryptMode::auto()),
        ));
        let _ = fs::remove_file(&out);
        if let Some(t) = skopeo(&layout, &skopeo_out, &key_file) {
            sk.push(mbps(layer.size, t));
        }
    }
    drop(ciphertext);
    let m = bench_report::median;
    println!("medians of {rounds} rounds:");
    println!(
        "SHA-256, one pass (ceiling ref): {:8.1} MB/s  (in memory)",
        m(&sha)
    );
    println!("ours, decryption, to a sink:     {:8.1} MB/s", m(&decrypt));
    println!(
        "ours, + plaintext digest:        {:8.1} MB/s",
        m(&with_digest)
    );
    println!("ours, 1 thread, + digest:        {:8.1} MB/s", m(&inline));
    println!("ours, + digest, to a file:       {:8.1} MB/s", m(&to_file));
    let ratios: Vec<f64> = decrypt.iter().zip(&sha).map(|(a, s)| a / s).collect();
    println!(
        "ratio ours (decryption, to a sink) / SHA-256: {:.2} (target >= 0.9); per round: min {:.2}, max {:.2}",
        m(&ratios),
        ratios.iter().copied().fold(f64::INFINITY, f64::min),
        ratios.iter().copied().fold(0.0, f64::max)
    );
    use bench_report::{emit, ratio, value, Target};
    emit(&ratio(
        "decrypt_throughput",
        &format!("decrypt {mib} MiB to a sink / one SHA-256 pass"),
        ("ours, HMAC + AES-CTR", &decrypt),
        ("SHA-256, one pass", &sha),
        "MB/s",
        Some(Target::AtLeast(0.9)),
    ));
    emit(&ratio(
        "decrypt_throughput",
        &format!("decrypt {mib} MiB + plaintext digest, to a sink / one SHA-256 pass"),
        ("ours, HMAC + AES-CTR + SHA-256", &with_digest),
        ("SHA-256, one pass", &sha),
        "MB/s",
        None,
    ));
    emit(&value(
        "decrypt_throughput",
        "ours, 1 thread, + plaintext digest, to a sink",
        "MB/s",
        &inline,
        None,
    ));
    emit(&ratio(
        "decrypt_throughput",
        &format!("decrypt {mib} MiB + plaintext digest, to a file / one SHA-256 pass"),
        ("ours, + digest, to a file", &to_file),
        ("SHA-256, one pass", &sha),
        "MB/s",
        None,
    ));
    if sk.len() != rounds {
        println!("skopeo copy --decryption-key:    not run (skopeo missing or failed; scripts/setup.sh installs it)");
        return;
    }
    println!(
        "skopeo copy --decryption-key:    {:8.1} MB/s  (whole process, to a file)",
        m(&sk)
    );
    println!(
        "ratio ours/skopeo, 1 thread:     {:8.1}x",
        m(&inline) / m(&sk)
    );
    println!(
        "ratio ours/skopeo, + digest:     {:8.1}x",
        m(&with_digest) / m(&sk)
    );
    println!(
        "ratio ours/skopeo, both to file: {:8.1}x",
        m(&to_file) / m(&sk)
    );
    emit(&ratio(
        "decrypt_throughput",
        &format!("decrypt {mib} MiB to a file: ours / skopeo (throughput)"),
        ("ours, + digest, to a file", &to_file),
        ("skopeo copy --decryption-key", &sk),
        "MB/s",
        None,
    ));
}

/// Where the layers go: `BENCH_DIR` or `target/` (a disk, not a small tmpfs).
fn bench_dir() -> PathBuf {
    std::env::var_os("BENCH_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"))
}
