//! containerd's own file of the blob it is feeding the hook.
//!
//! containerd hands a stream processor the blob through a pipe, copying it from its content
//! store 32 KiB at a time (Go's `io.Copy` into the child's stdin): for a 200 MB layer that
//! feed, not the IPU, bounds how fast the hook can send. containerd keeps the blob's file open
//! while it applies the layer (`content.ReaderAt`), and the hook runs as its child and as its
//! user, so the hook can find that file among its parent's descriptors and read the rest of
//! the blob from it, a chunk per read.
//!
//! Which file: a descriptor of the parent whose path is a content store blob
//! (`…/blobs/<algorithm>/<hex>`), a regular file, whose first chunk is exactly the first chunk
//! that came on stdin; only when exactly one such file (device and inode) exists. Otherwise
//! the whole blob comes from stdin, as it does for a blob of one chunk or less.
//!
//! This is only a faster way to read the same bytes, not something the IPU trusts: it
//! identifies and authenticates the blob from what it receives (the HMAC or the digest,
//! against the verified manifest), so any other file would be refused there like any other
//! blob, and containerd checks the plaintext against the layer's diff_id.

use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

/// Where the open descriptors of one process are listed (`/proc/<pid>/fd`).
#[derive(Debug)]
pub struct Finder {
    fds: PathBuf,
}

impl Finder {
    /// The hook's parent (containerd); `None` when it has none in this PID namespace.
    pub fn of_parent() -> Option<Self> {
        // SAFETY: getppid has no preconditions and cannot fail.
        let parent = unsafe { libc::getppid() };
        // 0: the parent is outside this PID namespace. (containerd may be PID 1 in a
        // container of its own; an orphaned hook's init just holds no blob.)
        (parent > 0).then(|| Self::in_dir(format!("/proc/{parent}/fd")))
    }

    /// The descriptors listed in `fds` (symbolic links to what each is open on).
    pub fn in_dir(fds: impl Into<PathBuf>) -> Self {
        Self { fds: fds.into() }
    }

    /// The one content store blob that starts with `first`, positioned just after it.
    pub fn same_blob(&self, first: &[u8]) -> Option<File> {
        let mut found: Option<(u64, u64, File)> = None;
        for entry in std::fs::read_dir(&self.fds).ok()?.flatten() {
            let fd = entry.path();
            if !std::fs::read_link(&fd).is_ok_and(|target| is_blob_path(&target)) {
                continue;
            }
            // Opening the descriptor's entry opens its file anew, with an offset of its own;
            // without blocking, should the name be a FIFO's (not a file: skipped below).
            let Ok(file) = std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(&fd)
            else {
                continue;
            };
            let Ok(meta) = file.metadata() else { continue };
            let same_file =
                |(dev, ino, _): &(u64, u64, File)| (*dev, *ino) == (meta.dev(), meta.ino());
            if !meta.is_file()
                || meta.len() < first.len() as u64
                || found.as_ref().is_some_and(same_file)
            {
                continue;
            }
            if !starts_with(&file, first) {
                continue;
            }
            if found.is_some() {
                // Two blobs start alike: which one containerd feeds is not known.
                return None;
            }
            found = Some((meta.dev(), meta.ino(), file));
        }
        let (_, _, mut file) = found?;
        file.seek(SeekFrom::Start(first.len() as u64)).ok()?;
        Some(file)
    }
}

/// `file` starts with exactly `first`.
fn starts_with(file: &File, first: &[u8]) -> bool {
    let mut start = vec![0u8; first.len()];
    file.read_exact_at(&mut start, 0).is_ok() && start == first
}

/// `…/blobs/<algorithm>/<hex>`: where containerd's content store keeps a committed blob (a
/// blob being written is under `ingest/`, and a deleted one's link ends in ` (deleted)`).
fn is_blob_path(path: &Path) -> bool {
    let mut parts = path.iter().rev().map(|p| p.to_str().unwrap_or_default());
    let (Some(hex), Some(algorithm), Some("blobs")) = (parts.next(), parts.next(), parts.next())
    else {
        return false;
    };
    let hex_len = match algorithm {
        "sha256" => 64,
        "sha384" => 96,
        "sha512" => 128,
        _ => return false,
    };
    hex.len() == hex_len && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    const HEX: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn only_committed_blob_paths_count() {
        let blob = |p: &str| is_blob_path(Path::new(p));
        assert!(blob(&format!(
            "/var/lib/containerd/io.containerd.content.v1.content/blobs/sha256/{HEX}"
        )));
        assert!(blob(&format!("/x/blobs/sha512/{HEX}{HEX}")));
        assert!(!blob(&format!("/x/blobs/sha256/{HEX} (deleted)")));
        assert!(!blob(&format!("/x/blobs/sha256/{}", HEX.to_uppercase())));
        assert!(!blob(&format!("/x/blobs/sha256/{}", &HEX[1..])));
        assert!(!blob(&format!("/x/blobs/md5/{}", &HEX[..32])));
        assert!(!blob(&format!("/x/ingest/sha256/{HEX}")));
        assert!(!blob("/x/ingest/abc/data"));
        assert!(!blob(HEX));
        assert!(!blob("pipe:[1234]"));
    }

    /// A directory standing in for `/proc/<pid>/fd`: symbolic links named like descriptors.
    struct Fds {
        dir: tempfile::TempDir,
        store: PathBuf,
        next: u32,
    }

    impl Fds {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            let store = dir.path().join("content/blobs/sha256");
            std::fs::create_dir_all(&store).unwrap();
            std::fs::create_dir(dir.path().join("fd")).unwrap();
            Self {
                dir,
                store,
                next: 3,
            }
        }

        /// A descriptor open on `name` holding `data`; `name` is a blob's hex for a blob.
        fn open(&mut self, dir: &Path, name: &str, data: &[u8]) {
            let path = dir.join(name);
            std::fs::write(&path, data).unwrap();
            let fd = self.dir.path().join("fd").join(self.next.to_string());
            std::os::unix::fs::symlink(&path, fd).unwrap();
            self.next += 1;
        }

        fn blob(&mut self, hex_digit: char, data: &[u8]) {
            let store = self.store.clone();
            self.open(&store, &hex_digit.to_string().repeat(64), data);
        }

        fn finder(&self) -> Finder {
            Finder::in_dir(self.dir.path().join("fd"))
        }
    }

    fn rest(file: Option<File>) -> Option<Vec<u8>> {
        let mut rest = Vec::new();
        file?.read_to_end(&mut rest).unwrap();
        Some(rest)
    }

    #[test]
    fn the_one_blob_starting_alike_is_read_after_its_start() {
        let mut fds = Fds::new();
        fds.blob('a', b"first chunk, then the rest");
        fds.blob('b', b"another blob altogether..");
        // The same bytes outside a content store are not a blob.
        let other = fds.dir.path().to_path_buf();
        fds.open(&other, "plain-file", b"first chunk, then something else");
        assert_eq!(
            rest(fds.finder().same_blob(b"first chunk")).unwrap(),
            b", then the rest"
        );
        // Control: nothing starts like this.
        assert_eq!(rest(fds.finder().same_blob(b"no such start")), None);
    }

    #[test]
    fn two_blobs_starting_alike_or_one_too_short_are_not_used() {
        let mut fds = Fds::new();
        fds.blob('a', b"first chunk, then one rest");
        fds.blob('b', b"first chunk, then another");
        assert_eq!(rest(fds.finder().same_blob(b"first chunk")), None);
        // The same file twice (two descriptors) is one blob.
        let mut fds = Fds::new();
        fds.blob('a', b"first chunk!");
        let store = fds.store.clone();
        let fd = fds.dir.path().join("fd/9");
        std::os::unix::fs::symlink(store.join("a".repeat(64)), fd).unwrap();
        assert_eq!(rest(fds.finder().same_blob(b"first chunk")).unwrap(), b"!");
        // Shorter than the start: not that blob.
        assert_eq!(rest(fds.finder().same_blob(b"first chunk!!")), None);
    }

    #[test]
    fn a_fifo_named_like_a_blob_is_skipped_without_blocking() {
        let mut fds = Fds::new();
        let fifo = fds.store.join("f".repeat(64));
        let path = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: mkfifo reads the NUL-terminated path only.
        assert_eq!(unsafe { libc::mkfifo(path.as_ptr(), 0o600) }, 0);
        let fd = fds.dir.path().join("fd/3");
        std::os::unix::fs::symlink(&fifo, fd).unwrap();
        fds.next = 4;
        fds.blob('a', b"first chunk, and more");
        // Opening a FIFO for reading would wait for a writer: a blocked search fails here.
        let finder = fds.finder();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || tx.send(rest(finder.same_blob(b"first chunk"))));
        let found = rx
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("the search blocked on the FIFO");
        assert_eq!(found.unwrap(), b", and more");
    }

    #[test]
    fn a_missing_descriptor_list_finds_nothing() {
        assert!(Finder::in_dir("/nonexistent/fd").same_blob(b"x").is_none());
    }
}
