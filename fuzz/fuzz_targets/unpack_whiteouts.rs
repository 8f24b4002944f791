//! Layer paths and whiteouts: arbitrary tar member names (`..`, absolute paths, `.wh.` and
//! `.wh..wh..opq` markers, whiteouts of `.` and `..`) and symlink and hardlink targets, in
//! two layers applied one over the other to the image's file system as the service builds
//! it. Never panics; whatever the layers did (a refused layer included), the file system
//! finishes, inside its own size, with no block written twice.
//!
//! Input: entries separated by NUL bytes, each `KIND NAME [\x01 TARGET]`; KIND picks a
//! regular file, a directory, a symlink, a hardlink, or ends the first layer.
#![no_main]

use std::collections::HashSet;
use std::io::Write;

use ext4_image::{BlockSink, BLOCK_SIZE};
use ipu_image_svc::unpack::path::EntryPath;
use ipu_image_svc::unpack::{apply_layer, Budget, ImageTree, Limits};
use libfuzzer_sys::fuzz_target;

fn header(kind: tar::EntryType, name: &[u8], target: &[u8], size: u64) -> Option<tar::Header> {
    if name.is_empty() || name.len() > 99 || target.len() > 99 {
        return None;
    }
    let mut h = tar::Header::new_old();
    h.as_old_mut().name[..name.len()].copy_from_slice(name);
    h.as_old_mut().linkname[..target.len()].copy_from_slice(target);
    h.set_entry_type(kind);
    h.set_mode(if kind == tar::EntryType::Directory {
        0o755
    } else {
        0o644
    });
    h.set_size(size);
    h.set_mtime(1);
    h.set_cksum();
    Some(h)
}

/// The two layers' tar streams.
fn layers(data: &[u8]) -> [Vec<u8>; 2] {
    let mut out = [Vec::new(), Vec::new()];
    let mut layer = 0;
    for entry in data.split(|&b| b == 0) {
        let Some((&kind, rest)) = entry.split_first() else {
            continue;
        };
        let (name, target) = match rest.iter().position(|&b| b == 1) {
            Some(i) => (&rest[..i], &rest[i + 1..]),
            None => (rest, &b""[..]),
        };
        let (kind, body): (_, &[u8]) = match kind % 5 {
            0 => (tar::EntryType::Regular, b"fuzz"),
            1 => (tar::EntryType::Directory, b""),
            2 => (tar::EntryType::Symlink, b""),
            3 => (tar::EntryType::Link, b""),
            _ => {
                layer = 1;
                continue;
            }
        };
        if let Some(h) = header(kind, name, target, body.len() as u64) {
            let l = &mut out[layer];
            l.extend_from_slice(h.as_bytes());
            l.extend_from_slice(body);
            l.resize(l.len().div_ceil(512) * 512, 0);
        }
    }
    for l in &mut out {
        l.write_all(&[0u8; 1024]).unwrap();
    }
    out
}

/// Remembers which blocks were written.
#[derive(Default)]
struct Blocks(HashSet<u64>);

impl BlockSink for Blocks {
    fn write_blocks(&mut self, first: u64, data: &[u8]) -> std::io::Result<()> {
        assert_eq!(data.len() % BLOCK_SIZE, 0);
        for b in first..first + (data.len() / BLOCK_SIZE) as u64 {
            assert!(self.0.insert(b), "block {b} written twice");
        }
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    // Paths alone: plain components only.
    if let Ok(p) = EntryPath::parse(data) {
        for c in p.all_components() {
            assert!(!c.is_empty() && c != b"." && c != b"..");
            assert!(!c.contains(&b'/') && !c.contains(&0));
        }
        let joined = p.all_components().join(&b'/');
        assert_eq!(EntryPath::parse(&joined), Ok(p));
    }
    let mut blocks = Blocks::default();
    let options = ext4_image::Options {
        max_bytes: 1 << 30,
        ..ext4_image::Options::default()
    };
    let mut tree = ImageTree::new(&mut blocks, options).unwrap();
    let limits = Limits {
        max_unpacked_bytes: 1 << 20,
        max_file_size: 1 << 16,
        max_inodes: 4096,
        allow_device_nodes: false,
    };
    let mut budget = Budget::default();
    for layer in layers(data) {
        if apply_layer(&mut tree, layer.as_slice(), &limits, &mut budget).is_err() {
            // A refused layer leaves the tree consistent: it still finishes.
            break;
        }
    }
    let image = tree.finish().expect("the file system finishes");
    let blocks_count = image.blocks_count;
    drop(image);
    assert!(blocks.0.iter().all(|&b| b < blocks_count));
});
