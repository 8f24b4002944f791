//! Key residue (threat model T16): once a clone is erased, or a layer has
//! decrypted and its key dropped, this process's memory holds neither the key nor its first
//! two AES round keys (AES-256's round keys 0 and 1 are the key's two halves, and the
//! decryption schedule ends with round key 0), anywhere the kernel lets us read: every
//! writable private mapping (heap, anonymous mappings, every thread's stack, the binaries'
//! data), read through /proc/self/mem. Secret memory (memfd_secret) cannot be read that way
//! and is skipped, which is the point of it.
//!
//! The test's own knowledge of the key must not be what the scan finds: the needles are kept
//! XOR-masked (the masked bytes and the mask apart, both random-looking) and are compared
//! against memory byte by byte with the mask applied, so the plain key never exists in this
//! process except where the code under test put it. A control copy left on purpose (a plain
//! `Vec` holding the key) must be found by the same scan, so a scan that reads nothing
//! cannot pass.
//!
//! Checked to fail without the mitigations: on the code before them (both cases: the key and
//! its halves on this thread's stack); with `aes`/`ctr` built without `zeroize` and the
//! schedules on the ordinary heap (both cases: in a malloc arena); with secret memory and
//! `zeroize` but no stack scrubs (both cases: this thread's stack). Either `zeroize` or
//! secret memory alone passes this test (secret memory is wiped whole when unmapped; freed
//! heap is wiped by the schedule's own drop); both are kept, for the kernel-side benefits of
//! secret memory and for the callers that use ocicrypt's heap home.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ipu_image_svc::blockstore::base::BaseImage;
use ipu_image_svc::blockstore::clone::CloneDevice;
use ipu_image_svc::blockstore::xts::{XtsKey, BLOCK};
use ipu_image_svc::blockstore::BlockDevice;
use ipu_image_svc::fetch::Descriptor;
use ipu_image_svc::keys::{KeyFor, KeySource};
use zeroize::Zeroize;

/// A secret to look for, never held in clear: `masked[i] ^ mask[i]` is its byte `i`.
struct Needle {
    name: String,
    masked: Vec<u8>,
    mask: Vec<u8>,
}

impl Needle {
    /// Masks `secret` in place (it holds the masked bytes afterwards) and keeps the mask.
    fn take(name: &str, secret: &mut [u8]) -> Self {
        let mut mask = vec![0u8; secret.len()];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut mask).unwrap();
        for (s, m) in secret.iter_mut().zip(&mask) {
            *s ^= m;
        }
        Self {
            name: name.to_string(),
            masked: secret.to_vec(),
            mask,
        }
    }

    fn part(&self, name: &str, range: std::ops::Range<usize>) -> Self {
        Self {
            name: format!("{} {name}", self.name),
            masked: self.masked[range.clone()].to_vec(),
            mask: self.mask[range].to_vec(),
        }
    }

    /// The key with its two 16-byte halves (AES round keys 0 and 1).
    fn with_halves(self) -> Vec<Self> {
        let parts = (0..self.masked.len() / 16)
            .map(|i| {
                self.part(
                    &format!("round key {i} (bytes {}..{})", i * 16, i * 16 + 16),
                    i * 16..i * 16 + 16,
                )
            })
            .collect::<Vec<_>>();
        std::iter::once(self).chain(parts).collect()
    }

    /// Whether `hay` holds the secret at `at` (the comparison unmasks one byte at a time).
    fn at(&self, hay: &[u8], at: usize) -> bool {
        hay.len() - at >= self.masked.len()
            && self
                .masked
                .iter()
                .zip(&self.mask)
                .zip(&hay[at..])
                .all(|((m, k), h)| h ^ k == *m)
    }

    fn first_byte(&self) -> u8 {
        self.masked[0] ^ self.mask[0]
    }

    /// A plain copy, for the control only.
    fn unmasked(&self) -> Vec<u8> {
        self.masked
            .iter()
            .zip(&self.mask)
            .map(|(m, k)| m ^ k)
            .collect()
    }
}

/// Where needles were found: `(needle name, where)`, where = the address, the mapping, and
/// whether that mapping is this thread's stack.
fn scan_own_memory(needles: &[Needle]) -> Vec<(String, String)> {
    let here = std::hint::black_box(0u8);
    let here = &here as *const u8 as u64;
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    let mut mem = File::open("/proc/self/mem").unwrap();
    let mut found = Vec::new();
    let longest = needles.iter().map(|n| n.masked.len()).max().unwrap();
    let mut buf = vec![0u8; (1 << 20) + longest];
    let mut scanned = 0u64;
    for line in maps.lines() {
        let mut parts = line.split_whitespace();
        let (range, perms) = (parts.next().unwrap(), parts.next().unwrap());
        // Writable private mappings: heap, anonymous memory, stacks, .data/.bss. Read-only
        // ones hold code and constants; shared ones (secret memory) are not ours to show.
        if !(perms.starts_with("rw") && perms.ends_with('p'))
            || line.ends_with("[vvar]")
            || line.ends_with("[vsyscall]")
        {
            continue;
        }
        let (start, end) = range.split_once('-').unwrap();
        let (start, end) = (
            u64::from_str_radix(start, 16).unwrap(),
            u64::from_str_radix(end, 16).unwrap(),
        );
        let mut at = start;
        while at < end {
            // Overlapping reads: a needle across a boundary is seen whole in the next one.
            let n = ((end - at) as usize).min(buf.len());
            if mem.seek(SeekFrom::Start(at)).is_err() || mem.read_exact(&mut buf[..n]).is_err() {
                break;
            }
            scanned += n as u64;
            let hay = &buf[..n];
            for needle in needles {
                let first = needle.first_byte();
                let hit = hay
                    .iter()
                    .enumerate()
                    .filter(|(_, b)| **b == first)
                    .find(|(i, _)| needle.at(hay, *i));
                if let Some((i, _)) = hit {
                    if !found.iter().any(|(name, _)| name == &needle.name) {
                        let stack = if (start..end).contains(&here) {
                            ", this thread's stack"
                        } else {
                            ""
                        };
                        found.push((
                            needle.name.clone(),
                            format!("{:#x} in {}{stack}", at + i as u64, line.trim_end()),
                        ));
                    }
                }
            }
            if at + n as u64 >= end {
                break;
            }
            at += (n - longest) as u64;
        }
    }
    buf.zeroize();
    assert!(scanned > 1 << 20, "the scan read only {scanned} bytes");
    found
}

/// Scans, and checks the control: a plain copy of the first needle made now is found. The
/// stack is not scrubbed here: what the code under test left in dead frames must be found.
fn assert_absent_then_control_found(needles: &[Needle]) {
    let found = scan_own_memory(needles);
    assert!(
        found.is_empty(),
        "key material left in process memory: {found:#?}"
    );
    let control = std::hint::black_box(needles[0].unmasked());
    let found = scan_own_memory(needles);
    assert!(
        found.iter().any(|(name, _)| name == &needles[0].name),
        "the control copy was not found: the scan does not see the heap"
    );
    drop(control);
}

/// The clone's key, masked. In a frame of its own, which the scan's stack scrub then
/// overwrites: the plain key was in it for a moment.
#[inline(never)]
fn clone_key_needle(clone: &CloneDevice) -> Needle {
    let mut key = [0u8; 64];
    clone.copy_key_for_tests(&mut key).unwrap();
    Needle::take("clone XTS key", &mut key)
}

/// The layer key, unwrapped from the JWE and masked (as above).
#[inline(never)]
fn layer_key_needle(annotations: &ocicrypt::Annotations, dc: &ocicrypt::DecryptConfig) -> Needle {
    let privopts = ocicrypt::unwrap_private_options(annotations, dc).unwrap();
    let mut key = [0u8; 32];
    key.copy_from_slice(privopts.symkey());
    Needle::take("layer key", &mut key)
}

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

#[test]
fn an_erased_clone_leaves_neither_its_key_nor_its_round_keys_in_memory() {
    let d = tempfile::tempdir().unwrap();
    let plain = d.path().join("plain");
    let image: Vec<u8> = (0..64 * BLOCK).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(&plain, &image).unwrap();
    let base = Arc::new(
        BaseImage::build(&plain, &d.path().join("base"), XtsKey::generate().unwrap()).unwrap(),
    );
    let clone = CloneDevice::create(base.clone(), d.path(), "f1", 0).unwrap();
    let needle = clone_key_needle(&clone);
    // The plain key was in the helper's (dead) frame for a moment; the code under test has
    // not run since, so this hides nothing of its doing.
    ocicrypt::scrub_stack();
    // Writes (copy on write: the rest of the cluster is read and decrypted first) and reads
    // through the clone's cipher.
    clone.write_at(b"tenant data, encrypted", 5000).unwrap();
    clone.write_at(&vec![0x42; 3 * BLOCK], 70_000).unwrap();
    let mut back = vec![0u8; 4 * BLOCK];
    clone.read_at(&mut back, 0).unwrap();
    assert_eq!(&back[5000..5022], b"tenant data, encrypted");
    assert_eq!(&back[..5000], &image[..5000]);

    // The two AES-256 keys (data and tweak), each with its halves.
    let needles: Vec<Needle> = [
        needle.part("data key", 0..32),
        needle.part("tweak key", 32..64),
    ]
    .into_iter()
    .flat_map(Needle::with_halves)
    .collect();
    let needles: Vec<Needle> = std::iter::once(needle).chain(needles).collect();

    let mut erasure = clone.erase().unwrap().expect("erased once");
    erasure.reclaim().unwrap();
    assert!(clone.read_at(&mut back, 0).is_err());
    assert_absent_then_control_found(&needles);
    // The base lives on, and so does its key: the scan is about the clone's alone.
    drop(clone);
    drop(base);
}

#[test]
fn a_decrypted_layers_key_and_round_keys_are_gone_after_it_drops() {
    let layout = fixtures().join("oci-layout");
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    let manifest_digest = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == "enc-rsa")
        .unwrap()["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let blob = |digest: &str| {
        layout
            .join("blobs/sha256")
            .join(digest.trim_start_matches("sha256:"))
    };
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(blob(&manifest_digest)).unwrap()).unwrap();
    let layer = &manifest["layers"][0];
    let annotations: ocicrypt::Annotations =
        serde_json::from_value(layer["annotations"].clone()).unwrap();
    let descriptor = Descriptor {
        media_type: layer["mediaType"].as_str().unwrap().to_string(),
        digest: policy::reference::Digest::parse(layer["digest"].as_str().unwrap()).unwrap(),
        size: layer["size"].as_u64().unwrap(),
        annotations: annotations.clone(),
        platform: None,
        artifact_type: None,
    };
    let pem = std::fs::read(fixtures().join("keys/rsa-2048/priv.pem")).unwrap();
    let dc =
        ocicrypt::DecryptConfig::new(vec![ocicrypt::keys::PrivateKey::from_pem(&pem).unwrap()]);

    // The test learns the layer key by unwrapping the JWE itself, and keeps it masked.
    let needles = layer_key_needle(&annotations, &dc).with_halves();
    ocicrypt::scrub_stack();

    // The service's path: the key source releases the key, the pipeline's decryptor (state
    // in secret memory) decrypts the whole layer and checks it.
    let source = KeySource::local(dc);
    let key = source
        .release(&KeyFor {
            image: "oci:fixtures:enc-rsa",
            image_digest: &manifest_digest,
            layer: &descriptor,
            tenant: "t",
            function: "f",
            grant: None,
        })
        .unwrap();
    let ciphertext = File::open(blob(layer["digest"].as_str().unwrap())).unwrap();
    let mut decryptor = ipu_image_svc::decrypt::decryptor(ciphertext, &key).unwrap();
    let mut plain = Vec::new();
    decryptor.read_to_end(&mut plain).unwrap();
    assert!(plain.len() as u64 == descriptor.size);
    decryptor.finish().unwrap();
    drop(key);
    plain.zeroize();

    assert_absent_then_control_found(&needles);
}
