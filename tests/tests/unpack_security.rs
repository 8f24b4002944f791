//! Negative-path tests of the layer unpacker with hand-made tar streams: path traversal,
//! writes through symlinks, hardlink escapes, device nodes, decompression bombs and limits,
//! whiteout semantics, and the metadata that must survive.
//!
//! Layers are applied to the image's ext4 file system as the service builds it; what they
//! made is then read back through the kernel (the image mounted read-only, so these tests
//! run as root), and `e2fsck` checks every image they finish.
//!
//! The tar headers are written byte by byte because the `tar` crate's builder (rightly)
//! refuses to write most of these.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use integration_tests::is_root;
use ipu_image_svc::unpack::{
    apply_layer, Budget, Compression, ImageTree, LayerStats, Limits, UnpackError, UnpackErrorKind,
};

// ---------------------------------------------------------------------------------------
// A raw tar writer.

#[derive(Default)]
struct RawTar {
    bytes: Vec<u8>,
}

struct Entry<'a> {
    name: &'a [u8],
    kind: u8,
    data: &'a [u8],
    /// Size written in the header; defaults to `data.len()`.
    declared_size: Option<u64>,
    link: &'a [u8],
    mode: u32,
    uid: u64,
    gid: u64,
    mtime: u64,
    dev: (u32, u32),
}

impl Default for Entry<'_> {
    fn default() -> Self {
        Entry {
            name: b"",
            kind: b'0',
            data: b"",
            declared_size: None,
            link: b"",
            mode: 0o644,
            uid: 0,
            gid: 0,
            mtime: 1_700_000_000,
            dev: (0, 0),
        }
    }
}

impl RawTar {
    fn entry(&mut self, e: Entry<'_>) -> &mut Self {
        let mut h = tar::Header::new_ustar();
        {
            let old = h.as_old_mut();
            assert!(e.name.len() <= 100 && e.link.len() <= 100);
            old.name[..e.name.len()].copy_from_slice(e.name);
            old.linkname[..e.link.len()].copy_from_slice(e.link);
        }
        h.set_entry_type(tar::EntryType::new(e.kind));
        h.set_size(e.declared_size.unwrap_or(e.data.len() as u64));
        h.set_mode(e.mode);
        h.set_uid(e.uid);
        h.set_gid(e.gid);
        h.set_mtime(e.mtime);
        h.set_device_major(e.dev.0).unwrap();
        h.set_device_minor(e.dev.1).unwrap();
        h.set_cksum();
        self.bytes.extend_from_slice(h.as_bytes());
        self.bytes.extend_from_slice(e.data);
        self.pad();
        self
    }

    fn pad(&mut self) {
        let rem = self.bytes.len() % 512;
        if rem != 0 {
            self.bytes.resize(self.bytes.len() + 512 - rem, 0);
        }
    }

    fn file(&mut self, name: &str, data: &[u8]) -> &mut Self {
        self.entry(Entry {
            name: name.as_bytes(),
            data,
            ..Default::default()
        })
    }

    fn dir(&mut self, name: &str) -> &mut Self {
        self.entry(Entry {
            name: name.as_bytes(),
            kind: b'5',
            mode: 0o755,
            ..Default::default()
        })
    }

    fn symlink(&mut self, name: &str, target: &str) -> &mut Self {
        self.entry(Entry {
            name: name.as_bytes(),
            kind: b'2',
            link: target.as_bytes(),
            mode: 0o777,
            ..Default::default()
        })
    }

    fn hardlink(&mut self, name: &str, target: &str) -> &mut Self {
        self.entry(Entry {
            name: name.as_bytes(),
            kind: b'1',
            link: target.as_bytes(),
            ..Default::default()
        })
    }

    /// A PAX extended header that applies to the next entry.
    fn pax(&mut self, records: &[(&str, &[u8])]) -> &mut Self {
        let mut body = Vec::new();
        for (key, value) in records {
            // "LEN key=value\n", where LEN counts itself.
            let rest = key.len() + value.len() + 3;
            let mut len = rest + 1;
            while len != rest + len.to_string().len() {
                len = rest + len.to_string().len();
            }
            body.extend_from_slice(format!("{len} {key}=").as_bytes());
            body.extend_from_slice(value);
            body.push(b'\n');
        }
        self.entry(Entry {
            name: b"PaxHeaders/entry",
            kind: b'x',
            data: &body,
            ..Default::default()
        })
    }

    fn finish(&mut self) -> Vec<u8> {
        let mut out = std::mem::take(&mut self.bytes);
        out.extend_from_slice(&[0u8; 1024]);
        out
    }
}

// ---------------------------------------------------------------------------------------
// Running layers.

struct Tree {
    scratch: tempfile::TempDir,
    image: PathBuf,
    /// Until the image is finished (at the first look at its content).
    tree: Option<ImageTree<File>>,
    /// Where the finished image is mounted read-only.
    mounted: Option<PathBuf>,
    budget: Budget,
    limits: Limits,
    /// A directory outside the image that attacks aim at.
    outside: PathBuf,
}

impl Tree {
    fn new() -> Tree {
        Self::with_limits(Limits::default())
    }

    fn with_limits(limits: Limits) -> Tree {
        let scratch = tempfile::tempdir().unwrap();
        let outside = scratch.path().join("outside");
        fs::create_dir(&outside).unwrap();
        fs::write(outside.join("victim"), b"original").unwrap();
        let image = scratch.path().join("image.ext4");
        let file = File::create(&image).unwrap();
        let options = ext4_image::Options {
            free_bytes: 1 << 20,
            max_bytes: 1 << 30,
            ..ext4_image::Options::default()
        };
        Tree {
            scratch,
            image,
            tree: Some(ImageTree::new(file, options).unwrap()),
            mounted: None,
            budget: Budget::default(),
            limits,
            outside,
        }
    }

    fn tree(&mut self) -> &mut ImageTree<File> {
        self.tree
            .as_mut()
            .expect("layers are applied before the image is looked at")
    }

    /// The image's root: the image finished, checked by e2fsck and mounted read-only.
    fn root(&mut self) -> PathBuf {
        if let Some(m) = &self.mounted {
            return m.clone();
        }
        assert!(is_root(), "mounting the image needs root");
        let built = self.tree.take().unwrap().finish().unwrap();
        built.sink.set_len(built.size_bytes).unwrap();
        drop(built);
        let fsck = Command::new("e2fsck")
            .args(["-fn"])
            .arg(&self.image)
            .output()
            .unwrap();
        assert!(
            fsck.status.success(),
            "e2fsck: {}{}",
            String::from_utf8_lossy(&fsck.stdout),
            String::from_utf8_lossy(&fsck.stderr)
        );
        let at = self.scratch.path().join("mnt");
        fs::create_dir(&at).unwrap();
        let mount = Command::new("mount")
            .args(["-t", "ext4", "-o", "loop,ro"])
            .arg(&self.image)
            .arg(&at)
            .output()
            .unwrap();
        assert!(
            mount.status.success(),
            "mount: {}",
            String::from_utf8_lossy(&mount.stderr)
        );
        self.mounted = Some(at.clone());
        at
    }

    fn apply(&mut self, tar: &[u8]) -> Result<LayerStats, UnpackError> {
        let (limits, budget) = (self.limits.clone(), &mut self.budget);
        let tree = self
            .tree
            .as_mut()
            .expect("layers are applied before the image is looked at");
        apply_layer(tree, tar, &limits, budget)
    }

    /// Applies a layer that must be refused with `kind`; checks the message names `needle`
    /// and that nothing outside changed.
    fn refuse(&mut self, tar: &[u8], kind: UnpackErrorKind, needle: &str) -> UnpackError {
        let err = self.apply(tar).expect_err("layer must be refused");
        assert_eq!(err.kind, kind, "{err}");
        assert!(err.message.contains(needle), "{needle:?} not in {err}");
        self.assert_outside_untouched();
        err
    }

    fn assert_outside_untouched(&self) {
        let names: Vec<_> = fs::read_dir(&self.outside)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["victim"], "something was written outside the tree");
        assert_eq!(fs::read(self.outside.join("victim")).unwrap(), b"original");
        assert_eq!(
            fs::metadata(self.outside.join("victim")).unwrap().nlink(),
            1,
            "victim was hardlinked into the tree"
        );
        assert!(!self.scratch.path().join("escape").exists());
    }

    fn outside_str(&self) -> String {
        self.outside.to_str().unwrap().to_string()
    }
}

impl Drop for Tree {
    fn drop(&mut self) {
        if let Some(at) = self.mounted.take() {
            let _ = Command::new("umount").arg(&at).status();
        }
    }
}

fn lstat(p: &Path) -> Option<fs::Metadata> {
    fs::symlink_metadata(p).ok()
}

// ---------------------------------------------------------------------------------------
// Path traversal.

#[test]
fn dot_dot_paths_are_refused() {
    for name in ["../escape", "a/../../escape", "a/b/../../../escape", ".."] {
        let tar = RawTar::default().file(name, b"x").finish();
        Tree::new().refuse(&tar, UnpackErrorKind::UnsafePath, name);
    }
}

#[test]
fn absolute_paths_are_refused() {
    let tar = RawTar::default().file("/abs-escape", b"x").finish();
    Tree::new().refuse(&tar, UnpackErrorKind::UnsafePath, "/abs-escape");
}

#[test]
fn pax_path_records_are_checked_like_header_names() {
    let tar = RawTar::default()
        .pax(&[("path", b"ok/../../escape")])
        .file("innocent", b"x")
        .finish();
    Tree::new().refuse(&tar, UnpackErrorKind::UnsafePath, "ok/../../escape");
}

#[test]
fn gnu_long_names_are_checked_like_header_names() {
    let long = format!("{}/../../../escape", "d".repeat(120));
    let tar = RawTar::default()
        .entry(Entry {
            name: b"././@LongLink",
            kind: b'L',
            data: format!("{long}\0").as_bytes(),
            ..Default::default()
        })
        .file("innocent", b"x")
        .finish();
    Tree::new().refuse(&tar, UnpackErrorKind::UnsafePath, "escape");
}

#[test]
fn writing_through_a_symlink_in_the_same_layer_is_refused() {
    let mut tree = Tree::new();
    let tar = RawTar::default()
        .symlink("lnk", &tree.outside_str())
        .file("lnk/escape", b"pwned")
        .finish();
    tree.refuse(&tar, UnpackErrorKind::UnsafePath, "lnk");
}

#[test]
fn writing_through_a_relative_symlink_is_refused() {
    let mut tree = Tree::new();
    let tar = RawTar::default()
        .symlink("up", "../..")
        .file("up/escape", b"pwned")
        .finish();
    tree.refuse(&tar, UnpackErrorKind::UnsafePath, "up");
}

#[test]
fn a_directory_replaced_by_a_symlink_in_an_upper_layer_is_not_followed() {
    let mut tree = Tree::new();
    tree.apply(&RawTar::default().dir("d").file("d/f", b"lower").finish())
        .unwrap();
    let upper = RawTar::default()
        .symlink("d", &tree.outside_str())
        .file("d/escape", b"pwned")
        .finish();
    tree.refuse(&upper, UnpackErrorKind::UnsafePath, "d");
}

#[test]
fn a_lower_layer_symlink_is_replaced_not_written_through() {
    let mut tree = Tree::new();
    let victim = tree.outside.join("victim");
    tree.apply(
        &RawTar::default()
            .symlink("f", victim.to_str().unwrap())
            .symlink("d", &tree.outside_str())
            .finish(),
    )
    .unwrap();
    // A regular file and a directory at the symlinks' names replace them.
    tree.apply(
        &RawTar::default()
            .file("f", b"new content")
            .dir("d")
            .file("d/x", b"inside")
            .finish(),
    )
    .unwrap();
    tree.assert_outside_untouched();
    let root = tree.root();
    assert!(lstat(&root.join("f")).unwrap().is_file());
    assert_eq!(fs::read(root.join("f")).unwrap(), b"new content");
    assert!(lstat(&root.join("d")).unwrap().is_dir());
    assert_eq!(fs::read(root.join("d/x")).unwrap(), b"inside");
}

#[test]
fn symlinks_are_stored_verbatim_and_never_followed() {
    let mut tree = Tree::new();
    let stats = tree
        .apply(
            &RawTar::default()
                .symlink("abs", "/etc/shadow")
                .symlink("rel", "../../../../etc")
                .finish(),
        )
        .unwrap();
    assert_eq!(stats.entries, 2);
    let root = tree.root();
    assert_eq!(
        fs::read_link(root.join("abs")).unwrap(),
        Path::new("/etc/shadow")
    );
    assert_eq!(
        fs::read_link(root.join("rel")).unwrap(),
        Path::new("../../../../etc")
    );
}

// ---------------------------------------------------------------------------------------
// Hardlinks.

#[test]
fn hardlinks_leaving_the_tree_are_refused() {
    for target in ["../../outside/victim", "/etc/passwd", "a/../../victim"] {
        let tar = RawTar::default().hardlink("h", target).finish();
        Tree::new().refuse(&tar, UnpackErrorKind::UnsafeLink, target);
    }
}

#[test]
fn hardlinks_through_a_symlink_are_refused() {
    let mut tree = Tree::new();
    let tar = RawTar::default()
        .symlink("lnk", &tree.outside_str())
        .hardlink("h", "lnk/victim")
        .finish();
    tree.refuse(&tar, UnpackErrorKind::UnsafeLink, "lnk");
}

#[test]
fn hardlinks_to_a_symlink_link_the_symlink_itself() {
    // linkat without AT_SYMLINK_FOLLOW: the new name is another symlink, not the victim.
    let mut tree = Tree::new();
    let victim = tree.outside.join("victim");
    tree.apply(
        &RawTar::default()
            .symlink("s", victim.to_str().unwrap())
            .hardlink("h", "s")
            .finish(),
    )
    .unwrap();
    tree.assert_outside_untouched();
    assert!(lstat(&tree.root().join("h")).unwrap().is_symlink());
}

#[test]
fn hardlinks_to_directories_are_refused() {
    let tar = RawTar::default().dir("d").hardlink("h", "d").finish();
    Tree::new().refuse(&tar, UnpackErrorKind::UnsafeLink, "directory");
}

#[test]
fn hardlinks_inside_the_tree_share_an_inode() {
    let mut tree = Tree::new();
    tree.apply(
        &RawTar::default()
            .dir("a")
            .file("a/f", b"data")
            .hardlink("b", "a/f")
            .finish(),
    )
    .unwrap();
    let root = tree.root();
    let f = fs::metadata(root.join("a/f")).unwrap();
    let b = fs::metadata(root.join("b")).unwrap();
    assert_eq!(f.ino(), b.ino());
    assert_eq!(f.nlink(), 2);
}

// ---------------------------------------------------------------------------------------
// Device nodes.

fn device_layer() -> Vec<u8> {
    RawTar::default()
        .entry(Entry {
            name: b"dev-mem",
            kind: b'3',
            dev: (1, 1),
            mode: 0o600,
            ..Default::default()
        })
        .finish()
}

#[test]
fn device_nodes_are_refused_by_default() {
    Tree::new().refuse(&device_layer(), UnpackErrorKind::DeviceNode, "dev-mem");
    let block = RawTar::default()
        .entry(Entry {
            name: b"sda",
            kind: b'4',
            dev: (8, 0),
            ..Default::default()
        })
        .finish();
    Tree::new().refuse(&block, UnpackErrorKind::DeviceNode, "block");
}

#[test]
fn device_nodes_are_created_when_allowed() {
    if !is_root() {
        eprintln!("skipped: mknod of a device needs root");
        return;
    }
    let mut tree = Tree::with_limits(Limits {
        allow_device_nodes: true,
        ..Limits::default()
    });
    tree.apply(&device_layer()).unwrap();
    let meta = lstat(&tree.root().join("dev-mem")).unwrap();
    assert!(meta.file_type().is_char_device());
    assert_eq!(meta.rdev(), libc::makedev(1, 1));
    assert_eq!(meta.mode() & 0o7777, 0o600);
}

// ---------------------------------------------------------------------------------------
// Limits and decompression bombs.

/// Counts the bytes a consumer pulled through it.
struct Counting<R> {
    inner: R,
    count: Arc<AtomicU64>,
}

impl<R: Read> Read for Counting<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.count.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

#[test]
fn a_gzip_bomb_is_stopped_at_its_header_before_inflating() {
    // 32 MiB of zeros compress to ~32 KiB; the limit on one file is 1 MiB.
    let zeros = vec![0u8; 32 << 20];
    let tar = RawTar::default().file("bomb", &zeros).finish();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&tar).unwrap();
    let compressed = gz.finish().unwrap();
    assert!(compressed.len() < 1 << 20);

    let mut tree = Tree::with_limits(Limits {
        max_file_size: 1 << 20,
        ..Limits::default()
    });
    let compressed_read = Arc::new(AtomicU64::new(0));
    let tar_read = Arc::new(AtomicU64::new(0));
    let decoder = Compression::Gzip
        .decoder(Counting {
            inner: &compressed[..],
            count: compressed_read.clone(),
        })
        .unwrap();
    let limits = tree.limits.clone();
    let mut budget = Budget::default();
    let err = apply_layer(
        tree.tree(),
        Counting {
            inner: decoder,
            count: tar_read.clone(),
        },
        &limits,
        &mut budget,
    )
    .unwrap_err();
    assert_eq!(err.kind, UnpackErrorKind::LimitExceeded, "{err}");
    assert!(err.message.contains("before reading it"), "{err}");
    // Only the header was inflated: not the 32 MiB, not even the 1 MiB allowed.
    assert!(
        tar_read.load(Ordering::Relaxed) <= 64 << 10,
        "inflated {} bytes",
        tar_read.load(Ordering::Relaxed)
    );
    assert!(compressed_read.load(Ordering::Relaxed) < compressed.len() as u64);
    assert!(!tree.root().join("bomb").exists());
}

#[test]
fn a_header_declaring_a_huge_file_is_refused_without_reading() {
    let tar = RawTar::default()
        .entry(Entry {
            name: b"huge",
            declared_size: Some(1 << 40),
            ..Default::default()
        })
        .finish();
    Tree::new().refuse(&tar, UnpackErrorKind::LimitExceeded, "huge");
}

#[test]
fn total_unpacked_bytes_are_counted_across_layers() {
    let mut tree = Tree::with_limits(Limits {
        max_unpacked_bytes: 1 << 20,
        ..Limits::default()
    });
    let chunk = vec![7u8; 600 << 10];
    tree.apply(&RawTar::default().file("one", &chunk).finish())
        .unwrap();
    tree.refuse(
        &RawTar::default().file("two", &chunk).finish(),
        UnpackErrorKind::LimitExceeded,
        "unpacked content",
    );
}

#[test]
fn the_inode_limit_stops_an_entry_flood() {
    let mut tree = Tree::with_limits(Limits {
        max_inodes: 50,
        ..Limits::default()
    });
    let mut tar = RawTar::default();
    for i in 0..1000 {
        tar.dir(&format!("d{i}"));
    }
    let err = tree.refuse(&tar.finish(), UnpackErrorKind::LimitExceeded, "max inodes");
    assert!(err.message.contains("d50"), "{err}");
}

#[test]
fn trailing_data_after_the_archive_is_bounded() {
    // The diff_id covers the whole stream, so it is read to the end: that read is bounded
    // by a limit derived from the content limits.
    let mut tree = Tree::with_limits(Limits {
        max_unpacked_bytes: 64 << 10,
        max_inodes: 16,
        ..Limits::default()
    });
    let mut tar = RawTar::default().file("small", b"x").finish();
    tar.extend(std::iter::repeat_n(0u8, 4 << 20));
    tree.refuse(&tar, UnpackErrorKind::LimitExceeded, "tar stream exceeds");
}

#[test]
fn a_truncated_layer_is_malformed() {
    let mut tar = RawTar::default().file("f", &[1u8; 4096]).finish();
    tar.truncate(512 + 1000);
    Tree::new().refuse(
        &tar,
        UnpackErrorKind::Malformed,
        "entry /f: content ends after 1000 of 4096 bytes",
    );
}

// ---------------------------------------------------------------------------------------
// Whiteouts.

#[test]
fn whiteouts_and_opaque_directories_hide_lower_layers_only() {
    let mut tree = Tree::new();
    tree.apply(
        &RawTar::default()
            .dir("a")
            .file("a/f1", b"1")
            .file("a/f2", b"2")
            .dir("b")
            .file("b/old", b"old")
            .dir("b/sub")
            .finish(),
    )
    .unwrap();
    let stats = tree
        .apply(
            &RawTar::default()
                .file("a/.wh.f1", b"")
                .file("b/new-before", b"kept")
                .file("b/.wh..wh..opq", b"")
                .file("b/new-after", b"kept")
                // Created and whited out in the same layer: the whiteout does not apply.
                .dir("c")
                .file("c/x", b"same layer")
                .file("c/.wh.x", b"")
                // Whiteout of something that never existed: nothing to do.
                .file(".wh.nothing", b"")
                .finish(),
        )
        .unwrap();
    assert_eq!(stats.whiteouts, 4);
    let root = tree.root();
    let names = |d: &str| {
        let mut v: Vec<String> = fs::read_dir(root.join(d))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    };
    assert_eq!(names("a"), ["f2"]);
    assert_eq!(names("b"), ["new-after", "new-before"]);
    assert_eq!(names("c"), ["x"]);
    assert!(names(".").iter().all(|n| !n.starts_with(".wh.")));
}

#[test]
fn a_whiteout_of_a_directory_removes_its_whole_subtree() {
    let mut tree = Tree::new();
    tree.apply(
        &RawTar::default()
            .dir("d")
            .dir("d/e")
            .file("d/e/f", b"x")
            .finish(),
    )
    .unwrap();
    tree.apply(&RawTar::default().file(".wh.d", b"").finish())
        .unwrap();
    assert!(lstat(&tree.root().join("d")).is_none());
}

#[test]
fn whiteouts_through_a_symlink_are_refused() {
    let mut tree = Tree::new();
    tree.apply(
        &RawTar::default()
            .symlink("lnk", &tree.outside_str())
            .finish(),
    )
    .unwrap();
    tree.refuse(
        &RawTar::default().file("lnk/.wh.victim", b"").finish(),
        UnpackErrorKind::UnsafePath,
        "lnk",
    );
}

/// `.wh..` and `.wh...` would have the unpacker empty the directory the whiteout is in, or the
/// one above it: refused as unsafe with the tree untouched. A real whiteout in the same
/// position (the control) does remove its entry.
#[test]
fn whiteouts_of_dot_and_dot_dot_are_refused_and_touch_nothing() {
    for (marker, needle) in [
        ("dir/.wh..", "\".\""),
        ("dir/.wh...", "\"..\""),
        (".wh...", "\"..\""),
        (".wh.", "\"\""),
    ] {
        let mut tree = Tree::new();
        tree.apply(
            &RawTar::default()
                .dir("dir")
                .file("dir/keep", b"kept")
                .file("top", b"top")
                .finish(),
        )
        .unwrap();
        let err = tree
            .apply(&RawTar::default().file(marker, b"").finish())
            .expect_err(marker);
        // What the attacker is after: the tree's entries.
        assert!(tree.root().join("dir/keep").exists(), "{marker}: {err}");
        assert!(tree.root().join("top").exists(), "{marker}: {err}");
        tree.assert_outside_untouched();
        assert_eq!(err.kind, UnpackErrorKind::UnsafePath, "{marker}: {err}");
        assert!(err.message.contains(needle), "{marker}: {err}");
    }
    // Control: a whiteout of a real entry removes it.
    let mut tree = Tree::new();
    tree.apply(&RawTar::default().dir("dir").file("dir/keep", b"x").finish())
        .unwrap();
    tree.apply(&RawTar::default().file("dir/.wh.keep", b"").finish())
        .unwrap();
    assert!(!tree.root().join("dir/keep").exists());
}

#[test]
fn opaque_markers_through_a_symlink_are_refused() {
    let mut tree = Tree::new();
    tree.apply(
        &RawTar::default()
            .symlink("lnk", &tree.outside_str())
            .finish(),
    )
    .unwrap();
    tree.refuse(
        &RawTar::default().file("lnk/.wh..wh..opq", b"").finish(),
        UnpackErrorKind::UnsafePath,
        "lnk",
    );
}

#[test]
fn a_whiteout_of_a_symlink_removes_the_link_not_its_target() {
    let mut tree = Tree::new();
    let victim = tree.outside.join("victim");
    tree.apply(
        &RawTar::default()
            .symlink("s", victim.to_str().unwrap())
            .symlink("sd", &tree.outside_str())
            .finish(),
    )
    .unwrap();
    tree.apply(
        &RawTar::default()
            .file(".wh.s", b"")
            .file(".wh.sd", b"")
            .finish(),
    )
    .unwrap();
    tree.assert_outside_untouched();
    assert!(lstat(&tree.root().join("s")).is_none());
    assert!(lstat(&tree.root().join("sd")).is_none());
}

// ---------------------------------------------------------------------------------------
// Metadata that must survive.

#[test]
fn modes_owners_xattrs_and_times_are_kept() {
    let mut tree = Tree::new();
    tree.apply(
        &RawTar::default()
            .entry(Entry {
                name: b"dir",
                kind: b'5',
                mode: 0o1777,
                mtime: 1_600_000_000,
                ..Default::default()
            })
            .pax(&[("SCHILY.xattr.user.origin", b"fixture")])
            .entry(Entry {
                name: b"dir/suid",
                data: b"#!/bin/sh\n",
                mode: 0o4755,
                uid: 1234,
                gid: 5678,
                mtime: 1_500_000_000,
                ..Default::default()
            })
            .entry(Entry {
                name: b"sgid",
                mode: 0o2711,
                gid: 50,
                ..Default::default()
            })
            .finish(),
    )
    .unwrap();
    let root = tree.root();
    let suid = fs::metadata(root.join("dir/suid")).unwrap();
    assert_eq!(suid.mode() & 0o7777, 0o4755);
    assert_eq!(suid.mtime(), 1_500_000_000);
    assert_eq!((suid.uid(), suid.gid()), (1234, 5678));
    assert_eq!(
        xattr::get(root.join("dir/suid"), "user.origin")
            .unwrap()
            .as_deref(),
        Some(&b"fixture"[..])
    );
    let sgid = fs::metadata(root.join("sgid")).unwrap();
    assert_eq!(sgid.mode() & 0o7777, 0o2711);
    let dir = fs::metadata(root.join("dir")).unwrap();
    assert_eq!(dir.mode() & 0o7777, 0o1777);
    // Its own time, not the time its children were added.
    assert_eq!(dir.mtime(), 1_600_000_000);
}

#[test]
fn xattrs_outside_the_allowed_namespaces_are_refused() {
    let tar = RawTar::default()
        .pax(&[("SCHILY.xattr.system.nfs4_acl", b"x")])
        .file("f", b"x")
        .finish();
    Tree::new().refuse(&tar, UnpackErrorKind::Unsupported, "system.nfs4_acl");
}

/// The image is built in memory with file content written only to its blocks: applying a
/// layer writes no file anywhere but the image.
#[test]
fn layers_write_nothing_but_the_image() {
    let mut tree = Tree::new();
    tree.apply(
        &RawTar::default()
            .dir("d")
            .file("d/secret", b"plaintext content of the layer")
            .symlink("l", "d/secret")
            .finish(),
    )
    .unwrap();
    let mut names: Vec<_> = fs::read_dir(tree.scratch.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["image.ext4", "outside"]);
    tree.assert_outside_untouched();
    // Positive control: the content is in the image.
    let root = tree.root();
    assert_eq!(
        fs::read(root.join("d/secret")).unwrap(),
        b"plaintext content of the layer"
    );
}
