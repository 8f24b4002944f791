//! A tree with every kind of node, ownership, mode bit, time range and xattr kind: e2fsck,
//! a read-only mount compared with the tree, the summary, and reproducibility.

mod common;

use common::*;
use ext4_image::{Meta, NodeKind, Options, Summary};

fn with_xattrs(mut m: Meta, x: &[(&str, Vec<u8>)]) -> Meta {
    m.xattrs = x.iter().map(|(n, v)| (n.to_string(), v.clone())).collect();
    m
}

/// A VFS-format ACL (version 2, 8-byte entries); ids of the *_OBJ, MASK and OTHER entries
/// are ACL_UNDEFINED_ID, as the kernel reports them.
fn acl(entries: &[(u16, u16, u32)]) -> Vec<u8> {
    let mut v = 2u32.to_le_bytes().to_vec();
    for &(tag, perm, id) in entries {
        v.extend_from_slice(&tag.to_le_bytes());
        v.extend_from_slice(&perm.to_le_bytes());
        v.extend_from_slice(&id.to_le_bytes());
    }
    v
}

const U: u32 = u32::MAX;

/// security.capability, v2 (20 bytes): cap_net_bind_service (bit 10), effective.
fn capability() -> Vec<u8> {
    let mut v = Vec::new();
    for w in [0x0200_0001u32, 1 << 10, 0, 0, 0] {
        v.extend_from_slice(&w.to_le_bytes());
    }
    v
}

pub fn full_tree() -> Vec<Entry> {
    let access = acl(&[
        (0x01, 7, U),
        (0x02, 5, 1000),
        (0x04, 5, U),
        (0x08, 4, 70000),
        (0x10, 5, U),
        (0x20, 0, U),
    ]);
    let default = acl(&[
        (0x01, 7, U),
        (0x02, 7, 2000),
        (0x04, 5, U),
        (0x10, 7, U),
        (0x20, 5, U),
    ]);
    let long_target: Vec<u8> = (0..200).map(|i| b"abcdefgh/"[i % 9]).collect();
    vec![
        entry("d1", meta(0o755, 0, 0, 1_700_000_000), Content::Dir),
        entry("d1/d2", meta(0o700, 70000, 70000, -1000), Content::Dir),
        entry("d1/d2/d3", meta(0o1777, 0, 0, 5_000_000_000), Content::Dir),
        entry(
            "d1/d2/d3/deep",
            meta(0o644, 1, 1, 0),
            Content::File(b"deep\n".to_vec()),
        ),
        entry("d1/empty", meta(0o644, 0, 0, 0), Content::File(Vec::new())),
        entry(
            "d1/one",
            meta(0o640, 70000, 70001, -1000),
            Content::File(b"x".to_vec()),
        ),
        entry(
            "d1/d2/f4095",
            meta(0o600, 0, 0, 5_000_000_000),
            Content::File(pattern(4095, 1)),
        ),
        entry(
            "d1/d2/f4096",
            meta(0o600, 0, 0, 1_700_000_000),
            Content::File(pattern(4096, 2)),
        ),
        entry(
            "d1/d2/f4097",
            meta(0o600, 0, 0, 0),
            Content::File(pattern(4097, 3)),
        ),
        entry(
            "big",
            meta(0o644, 0, 0, 1_700_000_000),
            Content::File(pattern(3 * 1024 * 1024 + 123, 4)),
        ),
        entry(
            "d1/d2/one-link",
            meta(0, 0, 0, 0),
            Content::Hardlink("d1/one".into()),
        ),
        entry(
            "one-link2",
            meta(0, 0, 0, 0),
            Content::Hardlink("d1/one".into()),
        ),
        entry("empty-dir", meta(0o555, 0, 0, 0), Content::Dir),
        entry("bin", meta(0o755, 0, 0, 0), Content::Dir),
        entry(
            "bin/ping",
            with_xattrs(
                meta(0o4755, 0, 0, 1_700_000_000),
                &[
                    ("security.capability", capability()),
                    ("user.small", b"tiny".to_vec()),
                ],
            ),
            Content::File(pattern(10_000, 5)),
        ),
        entry(
            "bin/sg",
            meta(0o2755, 0, 70000, 0),
            Content::File(b"#!/bin/sh\n".to_vec()),
        ),
        entry(
            "big-xattr",
            with_xattrs(
                meta(0o644, 0, 0, 0),
                &[
                    ("user.big", pattern(3000, 6)),
                    ("user.small", b"s".to_vec()),
                    ("trusted.x", b"trusted value".to_vec()),
                ],
            ),
            Content::File(b"has a big xattr\n".to_vec()),
        ),
        entry(
            "trusted-only",
            with_xattrs(meta(0o644, 0, 0, 0), &[("trusted.x", vec![0, 1, 2, 3, 0])]),
            Content::File(Vec::new()),
        ),
        entry(
            "shared",
            with_xattrs(
                meta(0o2750, 0, 70000, 1_700_000_000),
                &[
                    ("system.posix_acl_access", access),
                    ("system.posix_acl_default", default),
                    ("trusted.x", b"on a dir".to_vec()),
                ],
            ),
            Content::Dir,
        ),
        entry(
            "shared/file",
            meta(0o640, 0, 0, 0),
            Content::File(b"acl'd\n".to_vec()),
        ),
        entry(
            "short",
            meta(0o777, 0, 0, 0),
            Content::Symlink(b"d1/one".to_vec()),
        ),
        entry(
            "long",
            meta(0o777, 70000, 70000, -1000),
            Content::Symlink(long_target),
        ),
        entry("dev", meta(0o755, 0, 0, 0), Content::Dir),
        entry(
            "dev/null",
            meta(0o666, 0, 0, 0),
            Content::Device(NodeKind::CharDevice, 1, 3),
        ),
        entry(
            "dev/sda",
            meta(0o660, 0, 6, 0),
            Content::Device(NodeKind::BlockDevice, 8, 0),
        ),
        entry(
            "dev/nvme",
            meta(0o600, 0, 0, 5_000_000_000),
            Content::Device(NodeKind::BlockDevice, 259, 300_000),
        ),
        entry(
            "dev/tty-big",
            meta(0o620, 0, 5, 0),
            Content::Device(NodeKind::CharDevice, 4095, 255),
        ),
        entry("dev/fifo", meta(0o644, 0, 0, -1000), Content::Fifo),
    ]
}

pub fn opts() -> Options {
    Options {
        uuid: *b"0123456789abcdef",
        label: "ipu-test".into(),
        hash_seed: *b"fedcba9876543210",
        free_bytes: 4 << 20,
        free_inodes: 64,
        timestamp: 1_700_000_000,
        ..Options::default()
    }
}

#[test]
fn full_tree_mounts_and_matches() {
    let tmp = tempfile::tempdir().unwrap();
    let entries = full_tree();
    let (path, img) = build(tmp.path(), opts(), &entries);
    assert_eq!(
        img.summary,
        Summary {
            regular_files: 12,
            directories: 7,
            symlinks: 2,
            hardlinks: 2,
            device_nodes: 4,
            fifos: 1,
            setuid_files: 1,
            content_bytes: [
                0,
                1,
                4095,
                4096,
                4097,
                3 * 1024 * 1024 + 123,
                10_000,
                10,
                16,
                0,
                5,
                6
            ]
            .iter()
            .sum::<usize>() as u64,
            inodes: 12 + 7 + 2 + 4 + 1,
        }
    );
    assert_eq!(img.size_bytes, img.blocks_count * 4096);
    assert_eq!(std::fs::metadata(&path).unwrap().len(), img.size_bytes);
    fsck(&path);
    let m = Mount::new(&path, false);
    compare(m.path(), &entries);
    let facl = getfacl(&m.path().join("shared"));
    let want = "user::rwx\nuser:1000:r-x\ngroup::r-x\ngroup:70000:r--\nmask::r-x\nother::---\n\
                default:user::rwx\ndefault:user:2000:rwx\ndefault:group::r-x\ndefault:mask::rwx\n\
                default:other::r-x\n";
    assert_eq!(facl.trim_end(), want.trim_end());
    // lost+found exists, 0700, and is a directory
    let lf = std::fs::symlink_metadata(m.path().join("lost+found")).unwrap();
    assert!(lf.is_dir());
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&lf.permissions()) & 0o7777,
        0o700
    );
}

#[test]
fn same_input_same_bytes() {
    let a = tempfile::tempdir().unwrap();
    let b = tempfile::tempdir().unwrap();
    let (pa, _) = build(a.path(), opts(), &full_tree());
    let (pb, _) = build(b.path(), opts(), &full_tree());
    let (da, db) = (std::fs::read(pa).unwrap(), std::fs::read(pb).unwrap());
    assert_eq!(da.len(), db.len());
    assert!(da == db, "two builds of the same tree differ");
}
