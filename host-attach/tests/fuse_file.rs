//! The in-process FUSE file over an NBD export, against another implementation's server:
//! qemu-nbd serving a plain file on a Unix socket. What the loop device does through it
//! (reads of every size, writes, fsync, reads past the end) reaches the export's bytes, and
//! nobody but root may open the file: it is the function's disk. Root only (FUSE mounts).

use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use host_attach::fuse_file::FuseFile;
use host_attach::nbd_client::NbdClient;

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// qemu-nbd serving `image` as export `name` on `socket`, until killed.
struct QemuNbd(Child);

impl QemuNbd {
    fn start(image: &Path, socket: &Path, name: &str) -> Self {
        let child = Command::new("qemu-nbd")
            .args(["--format=raw", "--persistent", "--shared=8", "--cache=none"])
            .arg(format!("--socket={}", socket.display()))
            .arg(format!("--export-name={name}"))
            .arg(image)
            .stdout(Stdio::null())
            .spawn()
            .expect("qemu-nbd (apt install qemu-utils)");
        let start = Instant::now();
        while !socket.exists() {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "qemu-nbd did not start"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        Self(child)
    }
}

impl Drop for QemuNbd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A 9 MiB + 512 B image of a known pattern, served; the FUSE file over it, mounted.
fn served(d: &Path) -> (QemuNbd, FuseFile, PathBuf, Vec<u8>) {
    let image = d.join("disk.img");
    let pattern: Vec<u8> = (0..(9 << 20) + 512)
        .map(|i: usize| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(&image, &pattern).unwrap();
    let socket = d.join("nbd.sock");
    let server = QemuNbd::start(&image, &socket, "disk");
    // Three connections, so that the requests are spread over three serving threads and
    // FSYNC must flush each (the attach opens `fuse_file::CONNECTIONS`).
    let connections: Vec<NbdClient> = (0..3)
        .map(|_| NbdClient::connect(&socket, "disk").unwrap())
        .collect();
    assert_eq!(connections[0].size(), pattern.len() as u64);
    let mountpoint = d.join("mnt");
    std::fs::create_dir(&mountpoint).unwrap();
    let fuse = FuseFile::mount(&mountpoint, connections).unwrap();
    (server, fuse, image, pattern)
}

#[test]
fn reads_and_writes_through_the_file_reach_the_export() {
    if !is_root() {
        eprintln!("skipped: FUSE mounts need root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (_server, mut fuse, image, mut pattern) = served(dir.path());
    let path = fuse.file();
    assert_eq!(
        std::fs::metadata(&path).unwrap().len(),
        pattern.len() as u64
    );
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    // The whole file in one read (1 MiB requests), then pieces of odd sizes and offsets.
    let mut all = Vec::new();
    f.read_to_end(&mut all).unwrap();
    assert!(all == pattern, "the whole file differs from the export");
    for (offset, len) in [
        (0u64, 1usize),
        (4095, 2),
        (1 << 20, 3 << 20),
        (123_457, 70_001),
    ] {
        let mut buf = vec![0u8; len];
        f.read_exact_at(&mut buf, offset).unwrap();
        assert!(
            buf[..] == pattern[offset as usize..offset as usize + len],
            "read of {len} at {offset}"
        );
    }
    // Past the end: a short read, then nothing.
    let mut buf = vec![0u8; 4096];
    let end = pattern.len() as u64;
    assert_eq!(f.read_at(&mut buf, end - 100).unwrap(), 100);
    assert_eq!(f.read_at(&mut buf, end).unwrap(), 0);
    // Writes, made durable, are the export's bytes; past the end they are refused.
    let writes: [(u64, Vec<u8>); 3] = [
        (0, vec![0xaa; 512]),
        (777_777, vec![0x55; 70_000]),
        (2 << 20, (0..(2 << 20) + 5).map(|i| i as u8).collect()),
    ];
    for (offset, data) in &writes {
        f.write_all_at(data, *offset).unwrap();
        pattern[*offset as usize..*offset as usize + data.len()].copy_from_slice(data);
    }
    f.sync_all().unwrap();
    assert!(
        std::fs::read(&image).unwrap() == pattern,
        "the export's file does not hold what was written"
    );
    f.seek(SeekFrom::Start(end - 10)).unwrap();
    assert!(f.write_all(&[1u8; 20]).is_err(), "a write past the end");
    drop(f);
    fuse.unmount().unwrap();
    assert!(!path.exists(), "the file outlived the unmount");
}

/// The FUSE file is the function's disk: only root may open it. The control (root opens it)
/// must succeed for the refusal to mean anything.
#[test]
fn nobody_but_root_may_open_the_file() {
    if !is_root() {
        eprintln!("skipped: FUSE mounts need root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // The mount's parent must be reachable by the other user for the refusal to be the
    // FUSE file's own.
    std::fs::set_permissions(
        dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let (_server, mut fuse, _image, pattern) = served(dir.path());
    let path = fuse.file();
    // By uid and gid: 0 is root, 65534 nobody (and nogroup).
    let read_as = |id: &str| {
        Command::new("setpriv")
            .args(["--reuid", id, "--regid", id, "--clear-groups", "--"])
            .args(["head", "-c", "16"])
            .arg(&path)
            .output()
            .expect("setpriv (util-linux)")
    };
    let root = read_as("0");
    assert!(root.status.success(), "control: root reads the file");
    assert_eq!(root.stdout, pattern[..16]);
    let nobody = read_as("65534");
    assert!(!nobody.status.success(), "nobody read the function's disk");
    assert!(nobody.stdout.is_empty());
    let stderr = String::from_utf8_lossy(&nobody.stderr);
    assert!(stderr.contains("Permission denied"), "{stderr}");
    fuse.unmount().unwrap();
}
