//! Layer paths and whiteouts: arbitrary tar member names (`..`, absolute paths, `.wh.` and
//! `.wh..wh..opq` markers, whiteouts of `.` and `..`) and symlink and hardlink targets, in
//! two layers applied one over the other to a staging tree. Never panics, and never touches
//! anything outside the image root: sentinel files beside the root (in the request's work
//! directory), beside the work directory and beside its parent stay, and nothing appears or
//! disappears next to them (the root itself included).
//!
//! Input: entries separated by NUL bytes, each `KIND NAME [\x01 TARGET]`; KIND picks a
//! regular file, a directory, a symlink, a hardlink, or ends the first layer.
#![no_main]

use std::io::Write;
use std::path::Path;

use ipu_image_svc::unpack::path::EntryPath;
use ipu_image_svc::unpack::{apply_layer, Budget, Limits, Staging};
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

fn listing(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut all: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            let p = e.path();
            let body = if p.is_file() {
                std::fs::read(&p).unwrap()
            } else {
                Vec::new()
            };
            (e.file_name().to_string_lossy().into_owned(), body)
        })
        .collect();
    all.sort();
    all
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
    let base = if Path::new("/dev/shm").is_dir() {
        Path::new("/dev/shm")
    } else {
        Path::new("/tmp")
    };
    let sandbox = tempfile::tempdir_in(base).unwrap();
    let parent = sandbox.path().join("parent");
    std::fs::create_dir(&parent).unwrap();
    std::fs::write(sandbox.path().join("victim"), b"outside").unwrap();
    std::fs::write(parent.join("victim"), b"beside the staging tree").unwrap();
    let staging = Staging::create(&parent).unwrap();
    // Beside the image root, inside the request's private work directory.
    std::fs::write(staging.work_dir().join("victim"), b"beside the root").unwrap();
    let work = listing(staging.work_dir());
    let (outer, inner) = (listing(sandbox.path()), listing(&parent));
    let limits = Limits {
        max_unpacked_bytes: 1 << 20,
        max_file_size: 1 << 16,
        max_inodes: 4096,
        allow_device_nodes: false,
    };
    let mut budget = Budget::default();
    for layer in layers(data) {
        if apply_layer(&staging, layer.as_slice(), &limits, &mut budget).is_err() {
            break;
        }
    }
    assert_eq!(
        listing(sandbox.path()),
        outer,
        "outside the staging tree's parent"
    );
    assert_eq!(listing(&parent), inner, "beside the staging tree");
    assert_eq!(listing(staging.work_dir()), work, "beside the image root");
    drop(staging);
});
