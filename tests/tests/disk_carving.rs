//! Plaintext never reaches the IPU's disk, tried as the thief of that disk would: the IPU's
//! state (service state, blob cache, audit log) on an ext4 file system of its own, made and
//! mounted without discard so that freed blocks keep their bytes (and synchronously, so that
//! what is written reaches the blocks at once); an encrypted image carrying
//! a 1 MiB random marker file and a text marker goes through Prepare, the host reads it, and
//! Teardown; the same image's layer goes through the decrypt hook's DecryptLayer. Then the
//! file system is unmounted and its raw blocks are searched for the markers. The control: the
//! same markers written in the clear to that file system and deleted are found by the same
//! search, so the search would see plaintext that was written and only unlinked.

use std::path::{Path, PathBuf};
use std::process::Command;

use host_attach::attach::Attachment;
use integration_tests::containerd::{verify, Ipu};
use integration_tests::{bin, contains, is_root, run_ok};

/// Without discard, freed blocks keep their bytes; `sync` writes every write through at once,
/// so that plaintext written and deleted before writeback would have reached the disk too
/// (as it does on a busy IPU), not only what lives long enough.
const MOUNT_OPTIONS: &str = "loop,nodiscard,sync";

/// An ext4 file system on a file, loop-mounted as [`MOUNT_OPTIONS`] say; unmounted on drop.
struct Disk {
    image: PathBuf,
    mount: PathBuf,
    mounted: bool,
}

impl Disk {
    fn new(d: &Path, mib: u64) -> Self {
        let image = d.join("ipu-disk.img");
        let file = std::fs::File::create(&image).unwrap();
        file.set_len(mib << 20).unwrap();
        drop(file);
        run_ok(
            Command::new("mkfs.ext4")
                .args(["-q", "-F", "-E", "nodiscard"])
                .arg(&image),
        );
        let mount = d.join("ipu-disk");
        std::fs::create_dir_all(&mount).unwrap();
        run_ok(
            Command::new("mount")
                .args(["-o", MOUNT_OPTIONS])
                .arg(&image)
                .arg(&mount),
        );
        Self {
            image,
            mount,
            mounted: true,
        }
    }

    /// Unmounts (everything written reaches the image) and returns the raw blocks.
    fn raw_blocks(&mut self) -> Vec<u8> {
        if self.mounted {
            run_ok(Command::new("umount").arg(&self.mount));
            self.mounted = false;
        }
        std::fs::read(&self.image).unwrap()
    }
}

impl Drop for Disk {
    fn drop(&mut self) {
        if self.mounted {
            let _ = Command::new("umount").arg("-l").arg(&self.mount).status();
        }
    }
}

/// The markers: 1 MiB of random bytes (searched for by three 64-byte pieces of it, from
/// different 4 KiB blocks) and a line of text.
struct Markers {
    random: Vec<u8>,
    text: String,
}

impl Markers {
    fn new() -> Self {
        let mut random = vec![0u8; 1 << 20];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut random).unwrap();
        let mut tag = [0u8; 16];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut tag).unwrap();
        Self {
            random,
            text: format!("confidential text marker {}\n", hex::encode(tag)),
        }
    }

    fn pieces(&self) -> Vec<&[u8]> {
        [4096usize, 300_000, (1 << 20) - 8192]
            .iter()
            .map(|&o| &self.random[o..o + 64])
            .collect()
    }

    /// Which markers `hay` holds, by name.
    fn found_in(&self, hay: &[u8]) -> Vec<&'static str> {
        let mut found = Vec::new();
        if self.pieces().iter().any(|p| contains(hay, p)) {
            found.push("random");
        }
        if contains(hay, self.text.trim_end().as_bytes()) {
            found.push("text");
        }
        found
    }
}

/// An image whose only layer holds the markers, encrypted to the fixtures' RSA key (which
/// the key broker holds) and signed with a key made here; its layout and a trust policy for
/// it. Made outside the IPU's disk: the publisher's side has the plaintext.
fn marked_image(d: &Path, markers: &Markers) -> (String, PathBuf) {
    use std::os::unix::fs::PermissionsExt;
    let rootfs = d.join("rootfs");
    std::fs::create_dir_all(&rootfs).unwrap();
    std::fs::write(rootfs.join("marker.bin"), &markers.random).unwrap();
    std::fs::write(rootfs.join("marker.txt"), &markers.text).unwrap();
    let hello = rootfs.join("hello");
    std::fs::write(&hello, "#!/bin/sh\necho hello\n").unwrap();
    std::fs::set_permissions(&hello, std::fs::Permissions::from_mode(0o755)).unwrap();
    let layout = d.join("layout");
    let ocipub = |args: &[&str]| {
        let mut c = Command::new(bin("ocipub"));
        c.args(args);
        c
    };
    let layout_s = layout.to_str().unwrap();
    run_ok(&mut ocipub(&[
        "build",
        "--rootfs",
        rootfs.to_str().unwrap(),
        "--layout",
        layout_s,
        "--tag",
        "plain",
        "--cmd",
        "/hello",
    ]));
    let recipient = format!(
        "jwe:{}",
        integration_tests::fixtures()
            .join("keys/rsa-2048/pub.pem")
            .display()
    );
    run_ok(&mut ocipub(&[
        "encrypt",
        "--layout",
        layout_s,
        "--tag",
        "plain",
        "--out-tag",
        "enc",
        "--recipient",
        &recipient,
    ]));
    let signing = d.join("signing");
    run_ok(&mut ocipub(&[
        "keygen",
        "--kind",
        "ec-p256",
        "--out",
        signing.to_str().unwrap(),
    ]));
    let identity = "example.test/carving/image";
    run_ok(&mut ocipub(&[
        "sign",
        "--layout",
        layout_s,
        "--tag",
        "enc",
        "--key",
        signing.join("priv.pem").to_str().unwrap(),
        "--identity",
        identity,
    ]));
    let policy = d.join("trust-policy.json");
    std::fs::write(
        &policy,
        serde_json::json!({
            "default": [{"type": "reject"}],
            "transports": {"oci": {layout_s: [{
                "type": "sigstoreSigned",
                "keyPath": signing.join("pub.pem"),
                "signedIdentity": {"type": "exactRepository", "dockerRepository": identity}
            }]}}
        })
        .to_string(),
    )
    .unwrap();
    (format!("oci:{layout_s}:enc"), policy)
}

/// The encrypted layer of `enc` in `layout`: its media type and blob.
fn encrypted_layer(image: &str) -> (String, Vec<u8>) {
    let layout = PathBuf::from(
        image
            .strip_prefix("oci:")
            .unwrap()
            .rsplit_once(':')
            .unwrap()
            .0,
    );
    let (_, manifest) = integration_tests::layout_manifest(&layout, "enc");
    let layer = &manifest["layers"][0];
    (
        layer["mediaType"].as_str().unwrap().to_string(),
        integration_tests::layout_blob(&layout, layer["digest"].as_str().unwrap()),
    )
}

#[test]
fn a_stolen_ipu_disk_holds_no_plaintext_of_a_prepared_or_hook_decrypted_image() {
    if !is_root() {
        eprintln!("skipped: loop mounts need root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let markers = Markers::new();
    let (image, policy) = marked_image(dir.path(), &markers);
    let mut disk = Disk::new(dir.path(), 384);
    {
        // Everything of the IPU on its disk: state (bases, clones, spool), blob cache, audit
        // log, TLS keys.
        let ipu = Ipu::start(&disk.mount, policy.to_str().unwrap());

        // Prepare: the base is built, the host reads the markers from its clone.
        let p = ipu.service.prepare("acme", "carve", &image).unwrap();
        let host = dir.path().join("host");
        let (work, rootfs) = (host.join("work"), host.join("rootfs"));
        std::fs::create_dir_all(&work).unwrap();
        std::fs::create_dir_all(&rootfs).unwrap();
        let mut attachment =
            Attachment::attach(&integration_tests::host_export(&p), &work, &rootfs).unwrap();
        // Positive control: the plaintext went through the IPU.
        assert_eq!(
            std::fs::read(rootfs.join("marker.bin")).unwrap(),
            markers.random
        );
        assert_eq!(
            std::fs::read_to_string(rootfs.join("marker.txt")).unwrap(),
            markers.text
        );
        attachment.detach().unwrap();
        assert!(ipu
            .service
            .teardown(&p.clone_id, "function exited")
            .unwrap());

        // The decrypt hook's path: verified, then the layer sent and decrypted.
        let verified = verify(&ipu, "acme", "pull", &image);
        assert!(verified.status.success(), "{verified:?}");
        let (media_type, blob) = encrypted_layer(&image);
        let chunks = blob.chunks(64 << 10).map(<[u8]>::to_vec).collect();
        let (plaintext, trailer) = integration_tests::containerd::decrypt_over_api(
            &ipu.api,
            "acme",
            "pull",
            &media_type,
            chunks,
        );
        trailer.expect("the layer decrypts");
        // Positive control: the decrypted (gzip) stream carries the random marker as it is
        // (random bytes do not compress: gzip stores them).
        assert_eq!(markers.found_in(&plaintext), ["random"]);
        ipu.service.shutdown();
    }
    let raw = disk.raw_blocks();
    assert_eq!(
        markers.found_in(&raw),
        Vec::<&str>::new(),
        "plaintext on the IPU's disk"
    );

    // Control: the same markers written in the clear to this file system and deleted (what
    // an unpack tree on the state dir, unlinked afterwards, amounts to) are carved out.
    run_ok(
        Command::new("mount")
            .args(["-o", MOUNT_OPTIONS])
            .arg(&disk.image)
            .arg(&disk.mount),
    );
    disk.mounted = true;
    let clear = disk.mount.join("deleted");
    std::fs::create_dir_all(&clear).unwrap();
    std::fs::write(clear.join("marker.bin"), &markers.random).unwrap();
    std::fs::write(clear.join("marker.txt"), &markers.text).unwrap();
    std::fs::remove_dir_all(&clear).unwrap();
    let raw = disk.raw_blocks();
    assert_eq!(markers.found_in(&raw), ["random", "text"]);
}
