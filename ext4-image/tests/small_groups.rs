//! 1 MiB groups: a 20 MiB file crossing many backup superblock areas (more than 4 extents,
//! so an extent leaf block), 3000 small files in one directory (a multi-block directory),
//! then removals of half of them and of a subtree with large files.

mod common;

use common::*;
use ext4_image::{Builder, Options};

fn opts() -> Options {
    Options {
        blocks_per_group: 256,
        max_bytes: 256 << 20,
        free_bytes: 1 << 20,
        free_inodes: 16,
        timestamp: 1_600_000_000,
        ..Options::default()
    }
}

fn tree() -> Vec<Entry> {
    let mut e = vec![
        entry(
            "big",
            meta(0o644, 0, 0, 1),
            Content::File(pattern(20 << 20, 9)),
        ),
        entry("many", meta(0o755, 0, 0, 2), Content::Dir),
    ];
    for i in 0..3000 {
        e.push(entry(
            &format!("many/file-{i:04}"),
            meta(0o644, i, i, i64::from(i)),
            Content::File(format!("content of {i}\n").into_bytes()),
        ));
    }
    e.push(entry("gone", meta(0o755, 0, 0, 3), Content::Dir));
    e.push(entry("gone/sub", meta(0o755, 0, 0, 3), Content::Dir));
    for i in 0..3 {
        e.push(entry(
            &format!("gone/sub/large-{i}"),
            meta(0o644, 0, 0, 3),
            Content::File(pattern(3 << 20, i)),
        ));
    }
    // a name outside the subtree for a file inside it: survives the subtree's removal
    e.push(entry(
        "kept-link",
        meta(0, 0, 0, 0),
        Content::Hardlink("gone/sub/large-1".into()),
    ));
    e.push(entry(
        "after",
        meta(0o644, 0, 0, 4),
        Content::File(pattern(5 << 20, 7)),
    ));
    e
}

#[test]
fn crossing_backups_many_files_and_removals() {
    let tmp = tempfile::tempdir().unwrap();
    let entries = tree();
    let path = tmp.path().join("image.ext4");
    let f = std::fs::File::create(&path).unwrap();
    let mut b = Builder::new(f, opts()).unwrap();
    build_into(&mut b, &entries);

    // remove every other small file and the subtree
    let many = b.lookup(b.root(), b"many").unwrap();
    for i in (0..3000).step_by(2) {
        assert!(b.remove(many, format!("file-{i:04}").as_bytes()).unwrap());
    }
    assert!(!b.remove(many, b"file-0000").unwrap());
    assert!(b.remove(b.root(), b"gone").unwrap());
    assert_eq!(b.lookup(b.root(), b"gone"), None);
    assert_eq!(b.children(many).len(), 1500);
    let s = b.summary();
    assert_eq!(s.regular_files, 1 + 1500 + 1 + 1);
    assert_eq!(s.hardlinks, 0);
    assert_eq!(s.directories, 1);

    finish_and_fsck(b, &path);

    // the survivors; "kept-link" now stands alone for large-1
    let large1 = pattern(3 << 20, 1);
    let survivors: Vec<Entry> = entries
        .into_iter()
        .filter(|e| !e.path.starts_with("gone"))
        .filter(|e| match e.path.strip_prefix("many/file-") {
            Some(n) => n.parse::<u32>().unwrap() % 2 == 1,
            None => true,
        })
        .map(|e| {
            if e.path == "kept-link" {
                entry(
                    "kept-link",
                    meta(0o644, 0, 0, 3),
                    Content::File(large1.clone()),
                )
            } else {
                e
            }
        })
        .collect();
    let m = Mount::new(&path, false);
    compare(m.path(), &survivors);
}

#[test]
fn extent_tree_with_leaf_blocks() {
    // The 20 MiB file crosses the backup areas of groups 1, 3, 5, 7, 9: 6 extents.
    let tmp = tempfile::tempdir().unwrap();
    let entries = vec![entry(
        "big",
        meta(0o644, 0, 0, 1),
        Content::File(pattern(20 << 20, 9)),
    )];
    let (path, _) = build(tmp.path(), opts(), &entries);
    fsck(&path);
    let out = std::process::Command::new("debugfs")
        .args(["-R", "ex /big"])
        .arg(&path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    // level 0 index entry + 6 leaf extents
    let leaves = text
        .lines()
        .filter(|l| l.trim_start().starts_with("1/ 1"))
        .count();
    assert_eq!(leaves, 6, "{text}");
    assert!(
        text.lines().any(|l| l.trim_start().starts_with("0/ 1")),
        "{text}"
    );
    let m = Mount::new(&path, false);
    compare(m.path(), &entries);
}
