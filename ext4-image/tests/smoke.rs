//! The smallest useful tree; `KEEP_IMAGE=/path` keeps its image for a look with dumpe2fs
//! or debugfs.

mod common;

use common::*;
use ext4_image::Options;

#[test]
fn small_tree_is_clean() {
    let tmp = tempfile::tempdir().unwrap();
    let entries = vec![
        entry("a", meta(0o755, 0, 0, 100), Content::Dir),
        entry(
            "a/f",
            meta(0o644, 1, 2, 200),
            Content::File(b"hello\n".to_vec()),
        ),
        entry("a/empty", meta(0o644, 1, 2, 200), Content::File(Vec::new())),
        entry(
            "l",
            meta(0o777, 0, 0, 300),
            Content::Symlink(b"a/f".to_vec()),
        ),
    ];
    let (path, img) = build(
        tmp.path(),
        Options {
            free_inodes: 10,
            ..Options::default()
        },
        &entries,
    );
    eprintln!("{} blocks, {} inodes", img.blocks_count, img.inodes_count);
    fsck(&path);
    if let Ok(keep) = std::env::var("KEEP_IMAGE") {
        std::fs::copy(&path, keep).unwrap();
    }
    let m = Mount::new(&path, false);
    compare(m.path(), &entries);
}
