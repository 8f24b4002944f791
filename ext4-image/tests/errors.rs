//! Every refusal, with a message that names the entry; and the builder stays usable (and
//! its image clean) after them.

mod common;

use std::io::Write;

use common::*;
use ext4_image::{Builder, Error, Meta, NodeKind, Options};

fn builder(dir: &std::path::Path, opts: Options) -> (std::path::PathBuf, Builder<std::fs::File>) {
    let path = dir.join("image.ext4");
    let f = std::fs::File::create(&path).unwrap();
    (path, Builder::new(f, opts).unwrap())
}

fn m() -> Meta {
    meta(0o644, 0, 0, 0)
}

#[test]
fn refusals_name_the_entry() {
    let tmp = tempfile::tempdir().unwrap();
    let (path, mut b) = builder(tmp.path(), Options::default());
    let root = b.root();
    let dir = b.mkdir(root, b"the-dir", m()).unwrap();
    b.create_file(root, b"the-file", m())
        .unwrap()
        .finish()
        .unwrap();
    let file = b.lookup(root, b"the-file").unwrap();

    let e = b.mkdir(root, b"the-dir", m()).unwrap_err();
    assert!(
        matches!(e, Error::Exists(_)) && e.to_string().contains("the-dir"),
        "{e}"
    );
    let e = b.symlink(root, b"the-file", b"x", m()).unwrap_err();
    assert!(
        matches!(e, Error::Exists(_)) && e.to_string().contains("the-file"),
        "{e}"
    );

    for bad in [&b"a/b"[..], b"", b".", b"..", b"nul\0byte"] {
        let e = b.fifo(root, bad, m()).unwrap_err();
        assert!(matches!(e, Error::BadName(_)), "{e}");
        let shown = String::from_utf8_lossy(bad).into_owned();
        assert!(e.to_string().contains(&format!("`{shown}`")), "{e}");
    }
    let long = vec![b'n'; 256];
    let e = b.mkdir(root, &long, m()).unwrap_err();
    assert!(matches!(e, Error::NameTooLong { len: 256, .. }), "{e}");
    assert!(e.to_string().contains(&"n".repeat(256)), "{e}");
    b.mkdir(root, &long[..255], m()).unwrap();

    let e = b
        .symlink(root, b"the-link", &[b't'; 4096], m())
        .unwrap_err();
    assert!(matches!(e, Error::SymlinkTooLong { len: 4096, .. }), "{e}");
    assert!(e.to_string().contains("the-link"), "{e}");
    b.symlink(root, b"max-link", &[b't'; 4095], m()).unwrap();
    let e = b.symlink(root, b"empty-link", b"", m()).unwrap_err();
    assert!(matches!(e, Error::BadSymlink { .. }) && e.to_string().contains("empty-link"));

    let e = b.hardlink(root, b"dir-link", dir).unwrap_err();
    assert!(matches!(e, Error::HardlinkToDirectory(_)), "{e}");
    assert!(e.to_string().contains("dir-link"), "{e}");

    let gone = b.fifo(root, b"gone-fifo", m()).unwrap();
    assert!(b.remove(root, b"gone-fifo").unwrap());
    let e = b.hardlink(root, b"to-gone", gone).unwrap_err();
    assert!(matches!(e, Error::TargetRemoved(_)) && e.to_string().contains("to-gone"));

    let e = b.mkdir(file, b"under-file", m()).unwrap_err();
    assert!(matches!(e, Error::NotADirectory(_)) && e.to_string().contains("under-file"));

    let mut x = m();
    x.xattrs = vec![("system.foo".into(), b"v".to_vec())];
    let e = b.mkdir(root, b"xattr-dir", x).unwrap_err();
    assert!(matches!(e, Error::BadXattr { .. }), "{e}");
    assert!(
        e.to_string().contains("system.foo") && e.to_string().contains("xattr-dir"),
        "{e}"
    );
    let mut x = m();
    // version 2, USER_OBJ, then an unknown tag
    let mut acl = 2u32.to_le_bytes().to_vec();
    acl.extend_from_slice(&[
        1, 0, 7, 0, 0xff, 0xff, 0xff, 0xff, 0x99, 0, 7, 0, 0, 0, 0, 0,
    ]);
    x.xattrs = vec![("system.posix_acl_access".into(), acl)];
    let e = b.mkdir(root, b"acl-dir", x.clone()).unwrap_err();
    assert!(matches!(e, Error::BadXattr { .. }), "{e}");
    assert!(
        e.to_string().contains("acl-dir") && e.to_string().contains("malformed ACL"),
        "{e}"
    );
    // too large for one block
    let mut big = m();
    big.xattrs = vec![("user.huge".into(), vec![1; 4080])];
    let e = b.create_file(root, b"huge-xattr", big).err().unwrap();
    assert!(matches!(e, Error::BadXattr { .. }) && e.to_string().contains("huge-xattr"));
    // try_set_meta refuses at once, set_meta at finish
    let e = b.try_set_meta(dir, x.clone()).unwrap_err();
    assert!(e.to_string().contains("the-dir"), "{e}");

    let e = Builder::new(
        std::fs::File::create(tmp.path().join("x")).unwrap(),
        Options {
            label: "seventeen-bytes-x".into(),
            ..Options::default()
        },
    )
    .err()
    .unwrap();
    assert!(matches!(e, Error::BadOption(_)) && e.to_string().contains("seventeen-bytes-x"));

    // nothing of the above left a trace
    finish_and_fsck(b, &path);

    let (_, mut b) = builder(tmp.path(), Options::default());
    let d = b.mkdir(b.root(), b"d", m()).unwrap();
    b.set_meta(d, x);
    let e = b.finish().err().unwrap();
    assert!(
        matches!(e, Error::BadXattr { .. }) && e.to_string().contains("`d`"),
        "{e}"
    );
}

#[test]
fn too_many_links() {
    let tmp = tempfile::tempdir().unwrap();
    let (path, mut b) = builder(
        tmp.path(),
        Options {
            free_inodes: 0,
            ..Options::default()
        },
    );
    let root = b.root();
    let d = b.mkdir(root, b"links", m()).unwrap();
    let f = b.fifo(root, b"target", m()).unwrap();
    for i in 1..65000 {
        b.hardlink(d, format!("{i}").as_bytes(), f).unwrap();
    }
    let e = b.hardlink(d, b"one-too-many", f).unwrap_err();
    assert!(matches!(e, Error::TooManyLinks(_)) && e.to_string().contains("one-too-many"));
    assert_eq!(b.summary().hardlinks, 64999);
    finish_and_fsck(b, &path);
}

#[test]
fn too_large() {
    let tmp = tempfile::tempdir().unwrap();
    let opts = Options {
        max_bytes: 1 << 20,
        ..Options::default()
    };
    let (path, mut b) = builder(tmp.path(), opts.clone());
    let root = b.root();
    let mut w = b.create_file(root, b"fits", m()).unwrap();
    w.write_all(&pattern(100_000, 1)).unwrap();
    w.finish().unwrap();
    let mut w = b.create_file(root, b"too-big", m()).unwrap();
    let err = w.write_all(&pattern(2 << 20, 2)).unwrap_err();
    assert!(err.to_string().contains("too-big"), "{err}");
    let e = w.finish().unwrap_err();
    assert!(
        matches!(e, Error::TooLarge(_)) && e.to_string().contains("too-big"),
        "{e}"
    );
    // the failed file is gone, the rest still builds
    assert_eq!(b.lookup(root, b"too-big"), None);
    finish_and_fsck(b, &path);
    let m = Mount::new(&path, false);
    compare(
        m.path(),
        &[entry(
            "fits",
            meta(0o644, 0, 0, 0),
            Content::File(pattern(100_000, 1)),
        )],
    );
    drop(m);

    // free space past max_bytes fails at finish
    let (_, b) = builder(
        tmp.path(),
        Options {
            free_bytes: 2 << 20,
            ..opts
        },
    );
    let e = b.finish().err().unwrap();
    assert!(matches!(e, Error::TooLarge(_)), "{e}");
}

#[test]
fn dropped_writer_removes_its_file() {
    let tmp = tempfile::tempdir().unwrap();
    let (path, mut b) = builder(tmp.path(), Options::default());
    let root = b.root();
    {
        let mut w = b.create_file(root, b"abandoned", m()).unwrap();
        w.write_all(&pattern(3 << 20, 1)).unwrap();
    }
    assert_eq!(b.lookup(root, b"abandoned"), None);
    assert_eq!(b.summary().regular_files, 0);
    let mut w = b.create_file(root, b"abandoned", m()).unwrap();
    w.write_all(b"second try").unwrap();
    w.finish().unwrap();
    assert_eq!(
        b.kind(b.lookup(root, b"abandoned").unwrap()),
        NodeKind::Regular
    );
    finish_and_fsck(b, &path);
    let m = Mount::new(&path, false);
    compare(
        m.path(),
        &[entry(
            "abandoned",
            meta(0o644, 0, 0, 0),
            Content::File(b"second try".to_vec()),
        )],
    );
}

#[test]
fn directory_with_more_than_65000_subdirectories() {
    // past 65000 links a directory's i_links_count is 1 (dir_nlink)
    let tmp = tempfile::tempdir().unwrap();
    let (path, mut b) = builder(tmp.path(), Options::default());
    let d = b.mkdir(b.root(), b"wide", m()).unwrap();
    for i in 0..65001 {
        b.mkdir(d, format!("{i}").as_bytes(), meta(0o755, 0, 0, 0))
            .unwrap();
    }
    finish_and_fsck(b, &path);
    let out = std::process::Command::new("debugfs")
        .args(["-R", "stat /wide"])
        .arg(&path)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("Links: 1 "), "{text}");
}
