//! Shared helpers: a declarative tree, building it, e2fsck, loop mounts, and comparing a
//! mounted image with the tree.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use ext4_image::{Builder, Image, Meta, NodeId, NodeKind, Options};

/// What an entry of a test tree is.
#[derive(Clone, Debug)]
pub enum Content {
    Dir,
    File(Vec<u8>),
    Symlink(Vec<u8>),
    Device(NodeKind, u32, u32),
    Fifo,
    /// Another name for the file at this path (built earlier).
    Hardlink(String),
}

/// An entry: its path below the root ("a/b/c"), metadata and content.
#[derive(Clone, Debug)]
pub struct Entry {
    pub path: String,
    pub meta: Meta,
    pub content: Content,
}

pub fn meta(mode: u16, uid: u32, gid: u32, mtime: i64) -> Meta {
    Meta {
        uid,
        gid,
        mode,
        mtime,
        xattrs: Vec::new(),
    }
}

pub fn entry(path: &str, meta: Meta, content: Content) -> Entry {
    Entry {
        path: path.to_string(),
        meta,
        content,
    }
}

/// Non-zero, position-dependent bytes.
pub fn pattern(len: usize, seed: usize) -> Vec<u8> {
    (0..len)
        .map(|i| 1 + ((i * 7 + (i / 4096) * 13 + seed * 31) % 255) as u8)
        .collect()
}

fn split(path: &str) -> (&str, &str) {
    match path.rfind('/') {
        Some(i) => (&path[..i], &path[i + 1..]),
        None => ("", path),
    }
}

/// Finds the directory node of `dir` ("" is the root).
pub fn dir_node<S: ext4_image::BlockSink>(b: &Builder<S>, dir: &str) -> NodeId {
    let mut n = b.root();
    for part in dir.split('/').filter(|p| !p.is_empty()) {
        n = b
            .lookup(n, part.as_bytes())
            .unwrap_or_else(|| panic!("no {dir}"));
    }
    n
}

/// Adds the entries to the builder, in order.
pub fn build_into<S: ext4_image::BlockSink>(b: &mut Builder<S>, entries: &[Entry]) {
    for e in entries {
        let (dir, name) = split(&e.path);
        let d = dir_node(b, dir);
        let name = name.as_bytes();
        match &e.content {
            Content::Dir => {
                b.mkdir(d, name, e.meta.clone()).unwrap();
            }
            Content::File(data) => {
                let mut w = b.create_file(d, name, e.meta.clone()).unwrap();
                // uneven writes, to exercise the buffering
                for chunk in data.chunks(777_777) {
                    w.write_all(chunk).unwrap();
                }
                w.finish().unwrap();
            }
            Content::Symlink(t) => {
                b.symlink(d, name, t, e.meta.clone()).unwrap();
            }
            Content::Device(k, ma, mi) => {
                b.device(d, name, *k, *ma, *mi, e.meta.clone()).unwrap();
            }
            Content::Fifo => {
                b.fifo(d, name, e.meta.clone()).unwrap();
            }
            Content::Hardlink(target) => {
                let (tdir, tname) = split(target);
                let td = dir_node(b, tdir);
                let t = b.lookup(td, tname.as_bytes()).unwrap();
                b.hardlink(d, name, t).unwrap();
            }
        }
    }
}

/// Builds the entries into a new image file in `dir`; returns its path and the image.
pub fn build(dir: &Path, opts: Options, entries: &[Entry]) -> (PathBuf, Image<File>) {
    let path = dir.join("image.ext4");
    let f = File::create(&path).unwrap();
    let mut b = Builder::new(f, opts).unwrap();
    build_into(&mut b, entries);
    let img = finish(b);
    (path, img)
}

/// Finishes `b`'s image in its file, sized to the image.
pub fn finish(b: Builder<File>) -> Image<File> {
    let img = b.finish().unwrap();
    img.sink.set_len(img.size_bytes).unwrap();
    img
}

/// Finishes `b`'s image in its file at `path`, which `e2fsck` must find clean.
pub fn finish_and_fsck(b: Builder<File>, path: &Path) -> Image<File> {
    let img = finish(b);
    fsck(path);
    img
}

/// `e2fsck -fn`: exit 0 and nothing but the pass lines and the summary.
pub fn fsck(image: &Path) {
    let out = Command::new("e2fsck")
        .arg("-fn")
        .arg(image)
        .output()
        .expect("run e2fsck");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let clean = text.lines().all(|l| {
        l.starts_with("e2fsck ")
            || l.starts_with("Pass ")
            || l.contains(" files (")
            || l.trim().is_empty()
    });
    assert!(
        out.status.success() && clean,
        "e2fsck -fn {} exited {:?}:\n{text}",
        image.display(),
        out.status.code()
    );
}

/// A loop mount, unmounted when dropped.
pub struct Mount {
    pub dir: tempfile::TempDir,
}

impl Mount {
    pub fn new(image: &Path, rw: bool) -> Mount {
        let dir = tempfile::tempdir().unwrap();
        let opts = if rw { "loop" } else { "loop,ro" };
        let out = Command::new("mount")
            .args(["-t", "ext4", "-o", opts])
            .arg(image)
            .arg(dir.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "mount failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Mount { dir }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        for _ in 0..50 {
            let ok = Command::new("umount")
                .arg(self.dir.path())
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if ok {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        eprintln!("could not unmount {}", self.dir.path().display());
    }
}

fn makedev(major: u32, minor: u32) -> u64 {
    let (ma, mi) = (u64::from(major), u64::from(minor));
    ((ma & 0xffff_f000) << 32) | ((ma & 0xfff) << 8) | ((mi & 0xffff_ff00) << 12) | (mi & 0xff)
}

/// `getfattr -d -m - -e hex --absolute-names -h`: name -> hex value ("0x...").
pub fn getfattr(path: &Path) -> BTreeMap<String, String> {
    let out = Command::new("getfattr")
        .args(["-d", "-m", "-", "-e", "hex", "--absolute-names", "-h"])
        .arg(path)
        .output()
        .unwrap();
    assert!(out.status.success(), "getfattr {}", path.display());
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (n, v) = l.split_once('=').unwrap_or((l, ""));
            (n.to_string(), v.to_string())
        })
        .collect()
}

pub fn getfacl(path: &Path) -> String {
    let out = Command::new("getfacl")
        .args(["-n", "--absolute-names", "--omit-header"])
        .arg(path)
        .output()
        .unwrap();
    assert!(out.status.success(), "getfacl {}", path.display());
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn hex(v: &[u8]) -> String {
    let mut s = String::from("0x");
    for b in v {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// Compares the mounted tree at `root` with `entries` (after removals, the survivors):
/// every entry exists with its type, mode, uid, gid, nlink, size, rdev, mtime, content,
/// target and xattrs; and no directory has names beyond them (lost+found at the root
/// aside).
pub fn compare(root: &Path, entries: &[Entry]) {
    // names per inode for nlink; resolve hardlinks to their target entry
    let by_path: BTreeMap<&str, &Entry> = entries.iter().map(|e| (e.path.as_str(), e)).collect();
    let resolve = |e: &Entry| -> String {
        match &e.content {
            Content::Hardlink(t) => t.clone(),
            _ => e.path.clone(),
        }
    };
    let mut names: BTreeMap<String, u64> = BTreeMap::new();
    let mut subdirs: BTreeMap<String, u64> = BTreeMap::new();
    for e in entries {
        *names.entry(resolve(e)).or_default() += 1;
        if matches!(e.content, Content::Dir) {
            *subdirs.entry(split(&e.path).0.to_string()).or_default() += 1;
        }
    }
    for e in entries {
        let p = root.join(&e.path);
        let st = std::fs::symlink_metadata(&p).unwrap_or_else(|err| panic!("{}: {err}", e.path));
        let target = by_path[resolve(e).as_str()];
        let m = &target.meta;
        let ctx = &e.path;
        assert_eq!(st.mode() & 0o7777, u32::from(m.mode), "{ctx}: mode");
        assert_eq!(st.uid(), m.uid, "{ctx}: uid");
        assert_eq!(st.gid(), m.gid, "{ctx}: gid");
        assert_eq!(st.mtime(), m.mtime, "{ctx}: mtime");
        let ft = st.file_type();
        match &target.content {
            Content::Dir => {
                assert!(ft.is_dir(), "{ctx}: type");
                let n = 2 + subdirs.get(&e.path).copied().unwrap_or(0);
                assert_eq!(st.nlink(), n, "{ctx}: nlink");
            }
            Content::File(data) => {
                assert!(ft.is_file(), "{ctx}: type");
                assert_eq!(st.size(), data.len() as u64, "{ctx}: size");
                assert_eq!(st.nlink(), names[&target.path], "{ctx}: nlink");
                let got = std::fs::read(&p).unwrap();
                assert!(got == *data, "{ctx}: content differs");
            }
            Content::Symlink(t) => {
                assert!(ft.is_symlink(), "{ctx}: type");
                assert_eq!(st.size(), t.len() as u64, "{ctx}: size");
                let got = std::fs::read_link(&p).unwrap();
                assert_eq!(
                    std::os::unix::ffi::OsStrExt::as_bytes(got.as_os_str()),
                    &t[..],
                    "{ctx}: target"
                );
            }
            Content::Device(k, ma, mi) => {
                if *k == NodeKind::CharDevice {
                    assert!(ft.is_char_device(), "{ctx}: type");
                } else {
                    assert!(ft.is_block_device(), "{ctx}: type");
                }
                assert_eq!(st.rdev(), makedev(*ma, *mi), "{ctx}: rdev");
                assert_eq!(st.nlink(), names[&target.path], "{ctx}: nlink");
            }
            Content::Fifo => {
                assert!(ft.is_fifo(), "{ctx}: type");
                assert_eq!(st.nlink(), names[&target.path], "{ctx}: nlink");
            }
            Content::Hardlink(_) => unreachable!("resolved"),
        }
        let want: BTreeMap<String, String> =
            m.xattrs.iter().map(|(n, v)| (n.clone(), hex(v))).collect();
        assert_eq!(getfattr(&p), want, "{ctx}: xattrs");
    }
    // No extra names.
    let mut dirs: Vec<String> = vec![String::new()];
    dirs.extend(
        entries
            .iter()
            .filter(|e| matches!(e.content, Content::Dir))
            .map(|e| e.path.clone()),
    );
    for d in dirs {
        let mut got: Vec<String> = std::fs::read_dir(root.join(&d))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| !(d.is_empty() && n == "lost+found"))
            .collect();
        got.sort();
        let mut want: Vec<String> = entries
            .iter()
            .filter(|e| split(&e.path).0 == d)
            .map(|e| split(&e.path).1.to_string())
            .collect();
        want.sort();
        assert_eq!(got, want, "names in `{d}`");
    }
}
