//! The block store and its NBD export, with real tools: an ext4 image from mkfs.ext4, a base
//! encrypted at rest, copy-on-write clones under their own keys, and libnbd's nbdinfo and
//! nbdcopy and qemu-img as third-party clients of the export.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;

use ipu_image_svc::blockstore::base::BaseImage;
use ipu_image_svc::blockstore::clone::CloneDevice;
use ipu_image_svc::blockstore::xts::XtsKey;
use ipu_image_svc::blockstore::{BlockDevice, CLUSTER};
use ipu_image_svc::export::nbd::Export;
use ipu_image_svc::export::HostExport;

const MARK: &[u8] = b"plaintext-marker-of-the-base-image-0123456789";

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// An ext4 image (8 MiB) holding a file full of MARK, built by mkfs.ext4 -d.
fn ext4_image(dir: &Path) -> Vec<u8> {
    let root = dir.join("root");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::write(root.join("marker"), MARK.repeat(200)).unwrap();
    let image = dir.join("plain.ext4");
    let out = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(&root)
        .arg(&image)
        .arg("8M")
        .output()
        .expect("mkfs.ext4 (apt install e2fsprogs)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::read(image).unwrap()
}

fn base(dir: &Path) -> (Arc<BaseImage>, Vec<u8>) {
    let plain = ext4_image(dir);
    let base = BaseImage::build(
        &dir.join("plain.ext4"),
        &dir.join("base.img"),
        XtsKey::generate().unwrap(),
    )
    .unwrap();
    (Arc::new(base), plain)
}

#[test]
fn the_base_is_encrypted_at_rest_and_reads_back_as_the_image() {
    let dir = tempfile::tempdir().unwrap();
    let (base, plain) = base(dir.path());
    assert_eq!(base.size(), plain.len() as u64);
    let stored = std::fs::read(base.path()).unwrap();
    assert!(contains(&plain, MARK));
    assert!(!contains(&stored, MARK), "the base file holds plaintext");
    let mut back = vec![0u8; plain.len()];
    base.read_at(&mut back, 0).unwrap();
    assert_eq!(back, plain);
    // Unaligned reads, and reads past the end refused.
    let mut some = vec![0u8; 5000];
    base.read_at(&mut some, 12345).unwrap();
    assert_eq!(some, plain[12345..17345]);
    assert!(base.read_at(&mut [0u8; 2], base.size() - 1).is_err());
    assert!(base.write_at(b"x", 0).is_err(), "bases are read-only");
}

#[test]
fn clones_copy_on_write_never_see_each_other_and_erase_completely() {
    let dir = tempfile::tempdir().unwrap();
    let (base, plain) = base(dir.path());
    let a = CloneDevice::create(base.clone(), dir.path(), "fn-a", 0).unwrap();
    let b = CloneDevice::create(base.clone(), dir.path(), "fn-b", 0).unwrap();
    let secret = b"function A's private output, never on disk in clear".repeat(100);
    // Unaligned, spanning a cluster boundary.
    let at = CLUSTER * 3 - 1000;
    a.write_at(&secret, at).unwrap();
    a.flush().unwrap();
    let mut got = vec![0u8; secret.len()];
    a.read_at(&mut got, at).unwrap();
    assert_eq!(got, secret);
    // The bytes around the write are the base's (copy on write of whole clusters).
    let mut around = vec![0u8; 2 * CLUSTER as usize];
    a.read_at(&mut around, CLUSTER * 2).unwrap();
    let start = (at - CLUSTER * 2) as usize;
    assert_eq!(around[..start], plain[(CLUSTER * 2) as usize..at as usize]);
    // B and the base still read the base.
    b.read_at(&mut got, at).unwrap();
    assert_eq!(got, plain[at as usize..at as usize + secret.len()]);
    // Nothing on storage holds the function's bytes in clear.
    for e in std::fs::read_dir(dir.path()).unwrap() {
        let p = e.unwrap().path();
        if p.is_file() {
            assert!(
                !contains(&std::fs::read(&p).unwrap(), &secret[..48]),
                "{} holds the clone's plaintext",
                p.display()
            );
        }
    }
    // Trim of whole clusters falls back to the base.
    a.trim(CLUSTER * 2, CLUSTER * 2).unwrap();
    let mut after = vec![0u8; CLUSTER as usize];
    a.read_at(&mut after, CLUSTER * 2).unwrap();
    assert_eq!(after, plain[(CLUSTER * 2) as usize..(CLUSTER * 3) as usize]);

    // Erase: the file is gone, I/O fails, a second erase finds nothing.
    a.write_at(&secret, 0).unwrap();
    let clone_file = a.path().to_path_buf();
    let mut erased = a.erase().unwrap().expect("first erase");
    assert_eq!(erased.clone_id, "fn-a");
    assert_eq!(erased.key_id, a.key_id());
    assert!(erased.clusters_written >= 1);
    assert!(!clone_file.exists());
    // The leftover is noise until reclaimed, and gone after.
    let leftover = erased.leftover.clone().unwrap();
    assert!(!contains(&std::fs::read(&leftover).unwrap(), &secret[..48]));
    erased.reclaim().unwrap();
    assert!(!leftover.exists());
    let err = a.read_at(&mut got, 0).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::NotConnected);
    assert!(a.write_at(b"x", 0).is_err());
    assert!(a.erase().unwrap().is_none());
    // Dropping a clone erases it too.
    let b_file = b.path().to_path_buf();
    drop(b);
    assert!(!b_file.exists());
}

/// A clone larger than its base (the deployment policy's clone size): the base's bytes, then
/// zeros; writes past the base (and across its end) stay the clone's.
#[test]
fn a_clone_larger_than_its_base_reads_zeros_past_it_and_keeps_writes_there() {
    let dir = tempfile::tempdir().unwrap();
    let (base, plain) = base(dir.path());
    let size = base.size() * 3 + 5000;
    let c = CloneDevice::create(base.clone(), dir.path(), "fn-big", size).unwrap();
    let size = size.div_ceil(4096) * 4096;
    assert_eq!(c.size(), size);
    let mut all = vec![0xffu8; size as usize];
    c.read_at(&mut all, 0).unwrap();
    assert_eq!(&all[..plain.len()], &plain[..]);
    assert!(all[plain.len()..].iter().all(|&b| b == 0));
    // A write across the base's end, and one at the very end of the device.
    let across = base.size() - 3000;
    c.write_at(&[0x77u8; 6000], across).unwrap();
    c.write_at(&[0x66u8; 100], size - 100).unwrap();
    let mut got = vec![0u8; 6000];
    c.read_at(&mut got, across).unwrap();
    assert!(got.iter().all(|&b| b == 0x77));
    c.read_at(&mut got[..100], size - 100).unwrap();
    assert!(got[..100].iter().all(|&b| b == 0x66));
    let mut before = vec![0u8; 1000];
    c.read_at(&mut before, across - 1000).unwrap();
    assert_eq!(before, plain[(across - 1000) as usize..across as usize]);
    assert!(c.read_at(&mut got[..1], size).is_err());
    // Smaller than the base: the base's size.
    let small = CloneDevice::create(base.clone(), dir.path(), "fn-small", 4096).unwrap();
    assert_eq!(small.size(), base.size());
}

fn uri(export: &HostExport) -> String {
    export.endpoint().nbd_uri(export.name())
}

fn uid() -> u32 {
    rustix::process::getuid().as_raw()
}

#[test]
fn third_party_nbd_clients_read_and_write_the_clone_until_it_is_revoked() {
    let dir = tempfile::tempdir().unwrap();
    let (base, plain) = base(dir.path());
    let clone = Arc::new(CloneDevice::create(base, dir.path(), "fn-c", 0).unwrap());
    let socket = dir.path().join("fn-c.sock");
    let mut export = HostExport::unix(Export::new("fn-c", clone.clone()), &socket, uid()).unwrap();

    // nbdinfo sees the export and its size.
    let out = Command::new("nbdinfo")
        .arg("--json")
        .arg(uri(&export))
        .output()
        .expect("nbdinfo (apt install libnbd-bin)");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(info["exports"][0]["export-size"], plain.len() as u64);

    // nbdcopy reads the whole device: the ext4 image, byte for byte.
    let copy = dir.path().join("copy.img");
    let out = Command::new("nbdcopy")
        .arg(uri(&export))
        .arg(&copy)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(std::fs::read(&copy).unwrap(), plain);

    // nbdcopy writes a whole new image through it; it reads back, and is nowhere in clear.
    let mut noise = vec![0u8; plain.len()];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut noise).unwrap();
    let noise_file = dir.path().join("noise.img");
    std::fs::write(&noise_file, &noise).unwrap();
    let out = Command::new("nbdcopy")
        .arg(&noise_file)
        .arg(uri(&export))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut back = vec![0u8; noise.len()];
    clone.read_at(&mut back, 0).unwrap();
    assert_eq!(back, noise);
    let stored = std::fs::read(clone.path()).unwrap();
    assert!(!contains(&stored, &noise[4096..4160]));

    // qemu-img, another client, compares the export with the written image.
    let out = Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(&noise_file)
        .arg(uri(&export))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // Hot-remove: the socket goes, clients fail.
    export.revoke();
    assert!(!socket.exists());
    let out = Command::new("nbdinfo").arg(uri(&export)).output().unwrap();
    assert!(!out.status.success());
}

#[test]
fn only_the_allowed_uid_may_use_an_export() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    if uid() != 0 {
        eprintln!("skipped: needs root to run a client as another uid");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (base, _) = base(dir.path());
    let clone = Arc::new(CloneDevice::create(base, dir.path(), "fn-d", 0).unwrap());
    let socket = dir.path().join("fn-d.sock");
    let export = HostExport::unix(Export::new("fn-d", clone), &socket, 0).unwrap();
    // Even with the socket opened up, another uid is disconnected by the peer check.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let out = Command::new("nbdinfo")
        .arg(uri(&export))
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let out = Command::new("nbdinfo").arg(uri(&export)).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A hostile client: bad magic, oversized options, reads out of range. Each gets its error
/// and the server stays sane.
/// Appends a client option (IHAVEOPT, option, length, data) to `m`.
fn option(m: &mut Vec<u8>, option: u32, data: &[u8]) {
    m.extend(0x4948_4156_454f_5054u64.to_be_bytes());
    m.extend(option.to_be_bytes());
    m.extend((data.len() as u32).to_be_bytes());
    m.extend(data);
}

/// An INFO/GO request's data for export `name`, asking for no particular information.
fn go_request(name: &[u8]) -> Vec<u8> {
    let mut go = (name.len() as u32).to_be_bytes().to_vec();
    go.extend(name);
    go.extend(0u16.to_be_bytes());
    go
}

#[test]
fn malformed_nbd_traffic_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (base, _) = base(dir.path());
    let size = base.size();
    let export = Export::new("base", base);
    let serve = |input: Vec<u8>| {
        let (mut client, mut server) = UnixStream::pair().unwrap();
        client.write_all(&input).unwrap();
        client.shutdown(std::net::Shutdown::Write).unwrap();
        let r = ipu_image_svc::export::nbd::serve(&mut server, &export, None);
        drop(server);
        let mut out = Vec::new();
        client.read_to_end(&mut out).unwrap();
        (r, out)
    };
    // Not fixed newstyle.
    let (r, _) = serve(0u32.to_be_bytes().to_vec());
    assert!(r.unwrap_err().to_string().contains("fixed newstyle"));
    // An option of 1 MiB.
    let mut m = 3u32.to_be_bytes().to_vec();
    m.extend(0x4948_4156_454f_5054u64.to_be_bytes());
    m.extend(7u32.to_be_bytes());
    m.extend((1u32 << 20).to_be_bytes());
    let (r, _) = serve(m);
    assert!(r.unwrap_err().to_string().contains("bytes"));
    // GO for a name that is not exported, then a clean abort.
    let mut m = 3u32.to_be_bytes().to_vec();
    option(&mut m, 7, &go_request(b"nope"));
    option(&mut m, 2, &[]);
    let (r, out) = serve(m);
    assert_eq!(r.unwrap(), ipu_image_svc::export::nbd::End::Client);
    // After the 18-byte greeting: the first reply (magic, option, type) is ERR_UNKNOWN.
    assert_eq!(&out[18 + 8..18 + 12], &7u32.to_be_bytes());
    assert_eq!(&out[18 + 12..18 + 16], &0x8000_0006u32.to_be_bytes());
    // GO for the export, then a read past the end: EINVAL, then DISC.
    let mut m = 3u32.to_be_bytes().to_vec();
    option(&mut m, 7, &go_request(b"base"));
    for (kind, offset, len) in [(0u16, size - 10, 4096u32), (1u16, 0, 0), (2u16, 0, 0)] {
        m.extend(0x2560_9513u32.to_be_bytes());
        m.extend(0u16.to_be_bytes());
        m.extend(kind.to_be_bytes());
        m.extend(42u64.to_be_bytes());
        m.extend(offset.to_be_bytes());
        m.extend(len.to_be_bytes());
    }
    let (r, out) = serve(m);
    assert_eq!(r.unwrap(), ipu_image_svc::export::nbd::End::Client);
    // The two simple replies at the end: EINVAL (22) for the read, EPERM (1) for a write
    // to the read-only base.
    let tail = &out[out.len() - 32..];
    assert_eq!(&tail[..4], &0x6744_6698u32.to_be_bytes());
    assert_eq!(&tail[4..8], &22u32.to_be_bytes());
    assert_eq!(&tail[20..24], &1u32.to_be_bytes());
}
