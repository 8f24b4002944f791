//! The kernel writes to a built image (read-write mount) and resize2fs grows one 4x; e2fsck
//! stays clean and the content stays equal.

mod common;

use std::process::Command;

use common::*;
use ext4_image::Options;

fn opts() -> Options {
    Options {
        blocks_per_group: 1024,
        max_bytes: 1 << 30,
        free_bytes: 8 << 20,
        free_inodes: 200,
        timestamp: 1_650_000_000,
        ..Options::default()
    }
}

fn tree() -> Vec<Entry> {
    let mut e = vec![
        entry("etc", meta(0o755, 0, 0, 10), Content::Dir),
        entry(
            "etc/passwd",
            meta(0o644, 0, 0, 10),
            Content::File(b"root:x:0:0::/root:/bin/sh\n".to_vec()),
        ),
        entry("data", meta(0o755, 1000, 1000, 20), Content::Dir),
        entry(
            "data/blob",
            meta(0o600, 1000, 1000, 20),
            Content::File(pattern(6 << 20, 1)),
        ),
        entry(
            "data/link",
            meta(0o777, 0, 0, 20),
            Content::Symlink(b"blob".to_vec()),
        ),
    ];
    for i in 0..50 {
        e.push(entry(
            &format!("data/f{i}"),
            meta(0o644, 0, 0, 30),
            Content::File(pattern(i * 1000, i)),
        ));
    }
    e
}

#[test]
fn kernel_writes_then_fsck_clean() {
    let tmp = tempfile::tempdir().unwrap();
    let entries = tree();
    let (path, _) = build(tmp.path(), opts(), &entries);
    fsck(&path);
    {
        let m = Mount::new(&path, true);
        let root = m.path();
        std::fs::write(root.join("new-file"), pattern(3 << 20, 5)).unwrap();
        std::fs::create_dir(root.join("new-dir")).unwrap();
        for i in 0..100 {
            std::fs::write(root.join(format!("new-dir/n{i}")), pattern(i * 100, i)).unwrap();
        }
        std::fs::remove_file(root.join("data/blob")).unwrap();
        for i in 0..25 {
            std::fs::remove_file(root.join(format!("data/f{i}"))).unwrap();
        }
        std::fs::write(root.join("data/f30"), b"rewritten").unwrap();
        std::fs::rename(root.join("etc/passwd"), root.join("etc/passwd-")).unwrap();
        let ok = Command::new("sync").status().unwrap().success();
        assert!(ok);
    }
    fsck(&path);
    let m = Mount::new(&path, false);
    assert_eq!(
        std::fs::read(m.path().join("new-file")).unwrap(),
        pattern(3 << 20, 5)
    );
    assert_eq!(
        std::fs::read(m.path().join("new-dir/n99")).unwrap(),
        pattern(9900, 99)
    );
    assert_eq!(
        std::fs::read(m.path().join("data/f30")).unwrap(),
        b"rewritten"
    );
    assert_eq!(
        std::fs::read(m.path().join("data/f49")).unwrap(),
        pattern(49000, 49)
    );
    assert!(!m.path().join("data/blob").exists());
}

#[test]
fn resize2fs_grows_4x() {
    let tmp = tempfile::tempdir().unwrap();
    let entries = tree();
    let (path, img) = build(tmp.path(), opts(), &entries);
    grown_4x_still_holds(&path, &img, &entries);
}

#[test]
fn resize2fs_grows_into_the_reserved_gdt_area() {
    // 1 MiB groups, GDT area for 1 GiB (8 blocks); the image starts with > 128 groups (two
    // GDT blocks) and grows to > 512 (five): the new descriptor blocks go to the area kept
    // free for them in group 0 and the backup groups.
    let tmp = tempfile::tempdir().unwrap();
    let opts = Options {
        blocks_per_group: 256,
        max_bytes: 1 << 30,
        free_bytes: 130 << 20,
        free_inodes: 10,
        ..Options::default()
    };
    let entries = vec![entry(
        "blob",
        meta(0o644, 0, 0, 0),
        Content::File(pattern(4 << 20, 3)),
    )];
    let (path, img) = build(tmp.path(), opts, &entries);
    assert!(img.blocks_count > 128 * 256);
    grown_4x_still_holds(&path, &img, &entries);
}

/// The image checked, grown four times by `resize2fs` (the file extended first), checked
/// again, and its tree still `entries`.
fn grown_4x_still_holds(
    path: &std::path::Path,
    img: &ext4_image::Image<std::fs::File>,
    entries: &[Entry],
) {
    fsck(path);
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.set_len(img.size_bytes * 4).unwrap();
    drop(f);
    let out = Command::new("resize2fs").arg(path).output().unwrap();
    assert!(
        out.status.success(),
        "resize2fs: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    fsck(path);
    assert_eq!(block_count(path), img.blocks_count * 4);
    let m = Mount::new(path, false);
    compare(m.path(), entries);
}

fn block_count(path: &std::path::Path) -> u64 {
    let dumpe2fs = Command::new("dumpe2fs")
        .arg("-h")
        .arg(path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&dumpe2fs.stdout);
    text.lines()
        .find_map(|l| l.strip_prefix("Block count:"))
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}
