//! The xattr hashes and the ACL conversion checked against what e2fsprogs (`mkfs.ext4 -d`)
//! and the kernel write.

mod common;

use std::path::Path;
use std::process::Command;

use common::Mount;
use ext4_image::xattr::{acl_to_disk, block_hash, entry_hash};

fn run(cmd: &mut Command) -> Vec<u8> {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn setfattr(path: &Path, name: &[u8], value: &[u8]) {
    use std::os::unix::ffi::OsStrExt;
    let mut hex = String::from("0x");
    for b in value {
        hex.push_str(&format!("{b:02x}"));
    }
    run(Command::new("setfattr")
        .arg("-n")
        .arg(std::ffi::OsStr::from_bytes(name))
        .arg("-v")
        .arg(hex)
        .arg(path));
}

/// (name index, name, value, e_hash) of one stored entry.
type Raw = (u8, Vec<u8>, Vec<u8>, u32);

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

/// (name index, name, value, e_hash) of the entries from `first`; value offsets relative
/// to `base`.
fn entries(region: &[u8], first: usize, base: usize) -> Vec<Raw> {
    let mut out = Vec::new();
    let mut at = first;
    while at + 4 <= region.len() && le32(region, at) != 0 {
        let name_len = region[at] as usize;
        let index = region[at + 1];
        let offs = u16::from_le_bytes([region[at + 2], region[at + 3]]) as usize;
        let size = le32(region, at + 8) as usize;
        let hash = le32(region, at + 12);
        let name = region[at + 16..at + 16 + name_len].to_vec();
        let value = region[base + offs..base + offs + size].to_vec();
        out.push((index, name, value, hash));
        at += (16 + name_len + 3) & !3;
    }
    out
}

/// The in-inode and block entries of `path` in `image` (4096-byte blocks, 256-byte inodes).
fn xattrs_of(image: &Path, path: &str) -> (Vec<Raw>, Option<Vec<u8>>) {
    let text = String::from_utf8(run(Command::new("debugfs")
        .arg("-R")
        .arg(format!("imap {path}"))
        .arg(image)))
    .unwrap();
    // "located at block 36, offset 0x0100"
    let rest = text.split("located at block ").nth(1).unwrap();
    let (blk, off) = rest.split_once(", offset 0x").unwrap();
    let blk: u64 = blk.trim().parse().unwrap();
    let off = usize::from_str_radix(off.trim(), 16).unwrap();
    let img = std::fs::read(image).unwrap();
    let at = blk as usize * 4096 + off;
    let inode = &img[at..at + 256];
    let extra = u16::from_le_bytes([inode[128], inode[129]]) as usize;
    let mut all = Vec::new();
    let ibody = 128 + extra;
    if le32(inode, ibody) == 0xEA02_0000 {
        all.extend(entries(inode, ibody + 4, ibody + 4));
    }
    let acl_block = le32(inode, 104) as usize;
    let block = (acl_block != 0).then(|| img[acl_block * 4096..acl_block * 4096 + 4096].to_vec());
    if let Some(b) = &block {
        all.extend(entries(b, 32, 0));
    }
    (all, block)
}

const ETE: &[u8] = "user.été".as_bytes();

#[test]
fn entry_hashes_and_acls_match_mkfs() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    std::fs::create_dir(&src).unwrap();
    let f = src.join("f");
    std::fs::write(&f, b"x").unwrap();
    setfattr(&f, b"user.big", &[b'z'; 2000]);
    // too large for the inode: in the block, hashed
    setfattr(&f, ETE, &[0xf1; 150]);
    setfattr(&f, b"user.odd", b"12345");
    let d = src.join("d");
    std::fs::create_dir(&d).unwrap();
    run(Command::new("setfacl")
        .args(["-m", "u:1000:rx,g:70000:r,d:u:2000:rwx"])
        .arg(&d));
    let acl_access = run(Command::new("getfattr")
        .args(["--only-values", "-n", "system.posix_acl_access"])
        .arg(&d));
    let acl_default = run(Command::new("getfattr")
        .args(["--only-values", "-n", "system.posix_acl_default"])
        .arg(&d));

    let image = tmp.path().join("img");
    run(Command::new("mkfs.ext4")
        .args([
            "-q",
            "-F",
            "-b",
            "4096",
            "-I",
            "256",
            "-O",
            "^metadata_csum",
            "-d",
        ])
        .arg(&src)
        .arg(&image)
        .arg("8M"));

    let (f_attrs, block) = xattrs_of(&image, "/f");
    assert!(block.is_some());
    let mut checked = 0;
    for (index, name, value, hash) in &f_attrs {
        if *hash != 0 {
            assert_eq!(
                entry_hash(name, value),
                *hash,
                "index {index} name {name:?}"
            );
            checked += 1;
        }
    }
    // e2fsprogs hashes the block's entries, among them the non-ASCII name (hashed as
    // unsigned bytes)
    assert!(checked >= 2, "{f_attrs:?}");
    assert!(f_attrs.iter().any(|a| a.1 == "été".as_bytes() && a.3 != 0));

    let (d_attrs, _) = xattrs_of(&image, "/d");
    let access = d_attrs.iter().find(|a| a.0 == 2).expect("posix_acl_access");
    let default = d_attrs
        .iter()
        .find(|a| a.0 == 3)
        .expect("posix_acl_default");
    assert_eq!(acl_to_disk(&acl_access).unwrap(), access.2);
    assert_eq!(acl_to_disk(&acl_default).unwrap(), default.2);
}

#[test]
fn block_hash_matches_the_kernel() {
    let tmp = tempfile::tempdir().unwrap();
    let image = tmp.path().join("img");
    run(Command::new("mkfs.ext4")
        .args([
            "-q",
            "-F",
            "-b",
            "4096",
            "-I",
            "256",
            "-O",
            "^metadata_csum,^has_journal",
        ])
        .arg(&image)
        .arg("8M"));
    {
        let m = Mount::new(&image, true);
        let f = m.path().join("f");
        std::fs::write(&f, b"x").unwrap();
        setfattr(&f, b"user.big", &[b'z'; 2000]);
        setfattr(&f, ETE, &[0xf1; 61]);
        setfattr(&f, b"user.other", b"value");
        run(&mut Command::new("sync"));
    }
    let (attrs, block) = xattrs_of(&image, "/f");
    let block = block.expect("an xattr block");
    let in_block = entries(&block, 32, 0);
    assert!(in_block.len() >= 2, "{attrs:?}");
    for (_, name, value, hash) in &attrs {
        if *hash != 0 {
            assert_eq!(entry_hash(name, value), *hash, "{name:?}");
        }
    }
    let hashes: Vec<u32> = in_block.iter().map(|a| a.3).collect();
    assert_eq!(block_hash(&hashes), le32(&block, 12));
}
