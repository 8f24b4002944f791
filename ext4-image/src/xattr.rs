//! Extended attributes: name indexes, the in-inode and block encodings with e2fsprogs' hashes,
//! and the conversion of POSIX ACLs from the VFS xattr format to ext4's on-disk format.

use crate::BLOCK_SIZE;

const MAGIC: u32 = 0xEA02_0000;
/// Size of an entry header before its name.
const ENTRY_HEADER: usize = 16;
/// Size of an xattr block's header.
const BLOCK_HEADER: usize = 32;
/// The in-inode area after i_extra_isize: 256 - 128 - 32 bytes, of which 4 are the magic.
pub(crate) const IBODY_SIZE: usize = 96;

/// One attribute, ready to store: name index, name without its prefix, on-disk value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Attr {
    pub index: u8,
    pub name: Vec<u8>,
    pub value: Vec<u8>,
}

/// Where a node's attributes go.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Placement {
    /// No attributes.
    None,
    /// The 96 bytes after i_extra_isize (magic included).
    Inode(Vec<u8>),
    /// One block (its contents).
    Block(Vec<u8>),
}

/// Why an attribute is refused: (full name, reason).
pub(crate) type Refusal = (String, String);

fn pad4(n: usize) -> usize {
    (n + 3) & !3
}

fn entry_len(name_len: usize) -> usize {
    pad4(ENTRY_HEADER + name_len)
}

/// Splits and checks the caller's attributes, converts ACLs, and sorts them in ext4's order
/// (name index, name length, name).
pub(crate) fn parse(xattrs: &[(String, Vec<u8>)]) -> Result<Vec<Attr>, Refusal> {
    let mut out = Vec::with_capacity(xattrs.len());
    let mut seen = std::collections::BTreeSet::new();
    for (full, value) in xattrs {
        if !seen.insert(full.as_str()) {
            return Err((full.clone(), "given twice".to_string()));
        }
        let refuse = |why: &str| (full.clone(), why.to_string());
        let (index, name, value) = if full == "system.posix_acl_access" {
            (2, "", acl_to_disk(value).map_err(|w| refuse(&w))?)
        } else if full == "system.posix_acl_default" {
            (3, "", acl_to_disk(value).map_err(|w| refuse(&w))?)
        } else if let Some(n) = full.strip_prefix("user.") {
            (1, n, value.clone())
        } else if let Some(n) = full.strip_prefix("trusted.") {
            (4, n, value.clone())
        } else if let Some(n) = full.strip_prefix("security.") {
            (6, n, value.clone())
        } else {
            return Err(refuse(
                "namespace not allowed (user., trusted., security., system.posix_acl_access, \
                 system.posix_acl_default)",
            ));
        };
        if !(2..=3).contains(&index) {
            if name.is_empty() {
                return Err(refuse("empty name after the namespace prefix"));
            }
            if name.len() > 255 {
                return Err(refuse("name longer than 255 bytes"));
            }
        }
        let single = BLOCK_SIZE - BLOCK_HEADER - entry_len(name.len()) - 4;
        if pad4(value.len()) > single {
            return Err(refuse(&format!(
                "value of {} bytes is too large for one block",
                value.len()
            )));
        }
        out.push(Attr {
            index,
            name: name.as_bytes().to_vec(),
            value,
        });
    }
    out.sort_by(|a, b| (a.index, a.name.len(), &a.name).cmp(&(b.index, b.name.len(), &b.name)));
    Ok(out)
}

/// e2fsprogs' `ext2fs_ext_attr_hash_entry` (the kernel's `ext4_xattr_hash_entry`): the name
/// bytes (unsigned), then the value as little-endian 32-bit words, zero-padded.
pub fn entry_hash(name: &[u8], value: &[u8]) -> u32 {
    let mut hash: u32 = 0;
    for &c in name {
        hash = (hash << 5) ^ (hash >> 27) ^ u32::from(c);
    }
    for chunk in value.chunks(4) {
        let mut w = [0u8; 4];
        w[..chunk.len()].copy_from_slice(chunk);
        hash = (hash << 16) ^ (hash >> 16) ^ u32::from_le_bytes(w);
    }
    hash
}

/// e2fsprogs' `ext2fs_ext_attr_block_rehash`: the entries' hashes folded in order; zero when
/// one of them is zero.
pub fn block_hash(entry_hashes: &[u32]) -> u32 {
    let mut hash: u32 = 0;
    for &h in entry_hashes {
        if h == 0 {
            return 0;
        }
        hash = (hash << 16) ^ (hash >> 16) ^ h;
    }
    hash
}

/// Lays entries from `entries_at` and values down from `end` in `buf`; value offsets are
/// relative to `base`. Returns the entries' hashes.
fn lay_out(attrs: &[Attr], buf: &mut [u8], entries_at: usize, base: usize) -> Vec<u32> {
    let mut pos = entries_at;
    let mut end = buf.len();
    let mut hashes = Vec::with_capacity(attrs.len());
    for a in attrs {
        let offs = if a.value.is_empty() {
            0
        } else {
            end -= pad4(a.value.len());
            buf[end..end + a.value.len()].copy_from_slice(&a.value);
            end - base
        };
        let hash = entry_hash(&a.name, &a.value);
        let e = &mut buf[pos..pos + entry_len(a.name.len())];
        e[0] = a.name.len() as u8;
        e[1] = a.index;
        e[2..4].copy_from_slice(&(offs as u16).to_le_bytes());
        e[4..8].copy_from_slice(&0u32.to_le_bytes());
        e[8..12].copy_from_slice(&(a.value.len() as u32).to_le_bytes());
        e[12..16].copy_from_slice(&hash.to_le_bytes());
        e[16..16 + a.name.len()].copy_from_slice(&a.name);
        pos += entry_len(a.name.len());
        hashes.push(hash);
    }
    debug_assert!(pos + 4 <= end);
    hashes
}

fn space(attrs: &[Attr]) -> usize {
    attrs
        .iter()
        .map(|a| entry_len(a.name.len()) + pad4(a.value.len()))
        .sum::<usize>()
        + 4
}

/// Places sorted attributes: in the inode when they all fit, else all in one block.
pub(crate) fn place(attrs: &[Attr]) -> Result<Placement, String> {
    if attrs.is_empty() {
        return Ok(Placement::None);
    }
    let need = space(attrs);
    if need <= IBODY_SIZE - 4 {
        let mut buf = vec![0u8; IBODY_SIZE];
        buf[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        lay_out(attrs, &mut buf, 4, 4);
        return Ok(Placement::Inode(buf));
    }
    if need > BLOCK_SIZE - BLOCK_HEADER {
        return Err(format!(
            "the attributes take {need} bytes, more than one {BLOCK_SIZE}-byte block holds"
        ));
    }
    let mut buf = vec![0u8; BLOCK_SIZE];
    let hashes = lay_out(attrs, &mut buf, BLOCK_HEADER, 0);
    buf[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    buf[4..8].copy_from_slice(&1u32.to_le_bytes()); // h_refcount
    buf[8..12].copy_from_slice(&1u32.to_le_bytes()); // h_blocks
    buf[12..16].copy_from_slice(&block_hash(&hashes).to_le_bytes());
    Ok(Placement::Block(buf))
}

const ACL_USER_OBJ: u16 = 0x01;
const ACL_USER: u16 = 0x02;
const ACL_GROUP_OBJ: u16 = 0x04;
const ACL_GROUP: u16 = 0x08;
const ACL_MASK: u16 = 0x10;
const ACL_OTHER: u16 = 0x20;

/// Converts a POSIX ACL from the Linux VFS xattr format (version 2 header, 8-byte entries)
/// to ext4's on-disk format (version 1 header, 4-byte entries for USER_OBJ, GROUP_OBJ,
/// MASK and OTHER, 8-byte ones for USER and GROUP), checking it as the kernel's
/// `posix_acl_valid` does: tags in order, each of USER_OBJ, GROUP_OBJ and OTHER once, a
/// MASK when named entries are present, permissions within rwx.
pub fn acl_to_disk(v: &[u8]) -> Result<Vec<u8>, String> {
    if v.len() < 4 || (v.len() - 4) % 8 != 0 {
        return Err(format!(
            "malformed ACL: {} bytes is not a 4-byte header and 8-byte entries",
            v.len()
        ));
    }
    let version = u32::from_le_bytes([v[0], v[1], v[2], v[3]]);
    if version != 2 {
        return Err(format!("malformed ACL: version {version}, not 2"));
    }
    let count = (v.len() - 4) / 8;
    if count == 0 {
        return Err("malformed ACL: no entries".to_string());
    }
    let mut out = Vec::with_capacity(4 + count * 8);
    out.extend_from_slice(&1u32.to_le_bytes());
    // 0: expect USER_OBJ, 1: USER*, then GROUP_OBJ, 2: GROUP*, then MASK/OTHER, 3: OTHER, 4: done
    let mut state = 0;
    let mut named = false;
    let mut mask = false;
    for e in v[4..].chunks(8) {
        let tag = u16::from_le_bytes([e[0], e[1]]);
        let perm = u16::from_le_bytes([e[2], e[3]]);
        if perm & !7 != 0 {
            return Err(format!("malformed ACL: permissions {perm:#o} beyond rwx"));
        }
        let ok = match tag {
            ACL_USER_OBJ => {
                state == 0 && {
                    state = 1;
                    true
                }
            }
            ACL_USER => {
                named = true;
                state == 1
            }
            ACL_GROUP_OBJ => {
                state == 1 && {
                    state = 2;
                    true
                }
            }
            ACL_GROUP => {
                named = true;
                state == 2
            }
            ACL_MASK => {
                state == 2 && {
                    state = 3;
                    mask = true;
                    true
                }
            }
            ACL_OTHER => {
                (state == 2 || state == 3) && {
                    state = 4;
                    true
                }
            }
            _ => return Err(format!("malformed ACL: unknown tag {tag:#x}")),
        };
        if !ok {
            return Err(format!("malformed ACL: tag {tag:#x} out of order"));
        }
        out.extend_from_slice(&e[0..4]);
        if tag == ACL_USER || tag == ACL_GROUP {
            out.extend_from_slice(&e[4..8]);
        }
    }
    if state != 4 {
        return Err("malformed ACL: USER_OBJ, GROUP_OBJ or OTHER missing".to_string());
    }
    if named && !mask {
        return Err("malformed ACL: named entries without a MASK".to_string());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vfs_acl(entries: &[(u16, u16, u32)]) -> Vec<u8> {
        let mut v = 2u32.to_le_bytes().to_vec();
        for &(t, p, id) in entries {
            v.extend_from_slice(&t.to_le_bytes());
            v.extend_from_slice(&p.to_le_bytes());
            v.extend_from_slice(&id.to_le_bytes());
        }
        v
    }

    #[test]
    fn acl_conversion() {
        let v = vfs_acl(&[
            (ACL_USER_OBJ, 7, u32::MAX),
            (ACL_USER, 5, 1000),
            (ACL_GROUP_OBJ, 5, u32::MAX),
            (ACL_GROUP, 4, 70000),
            (ACL_MASK, 5, u32::MAX),
            (ACL_OTHER, 0, u32::MAX),
        ]);
        let d = acl_to_disk(&v).unwrap();
        let want: &[u8] = &[
            1, 0, 0, 0, // version 1
            1, 0, 7, 0, // USER_OBJ rwx
            2, 0, 5, 0, 0xe8, 3, 0, 0, // USER 1000 r-x
            4, 0, 5, 0, // GROUP_OBJ r-x
            8, 0, 4, 0, 0x70, 0x11, 1, 0, // GROUP 70000 r--
            0x10, 0, 5, 0, // MASK r-x
            0x20, 0, 0, 0, // OTHER ---
        ];
        assert_eq!(d, want);
        let minimal = vfs_acl(&[(1, 6, 0), (4, 4, 0), (0x20, 4, 0)]);
        assert_eq!(
            acl_to_disk(&minimal).unwrap(),
            [1, 0, 0, 0, 1, 0, 6, 0, 4, 0, 4, 0, 0x20, 0, 4, 0]
        );
    }

    #[test]
    fn malformed_acls() {
        assert!(acl_to_disk(&[2, 0, 0]).is_err());
        assert!(acl_to_disk(&vfs_acl(&[])).is_err());
        let mut v1 = vfs_acl(&[(1, 6, 0), (4, 4, 0), (0x20, 4, 0)]);
        v1[0] = 1;
        assert!(acl_to_disk(&v1).is_err());
        // out of order, missing OTHER, named without mask, bad perms, unknown tag
        assert!(acl_to_disk(&vfs_acl(&[(4, 4, 0), (1, 6, 0), (0x20, 4, 0)])).is_err());
        assert!(acl_to_disk(&vfs_acl(&[(1, 6, 0), (4, 4, 0)])).is_err());
        assert!(acl_to_disk(&vfs_acl(&[(1, 6, 0), (2, 4, 5), (4, 4, 0), (0x20, 4, 0)])).is_err());
        assert!(acl_to_disk(&vfs_acl(&[(1, 8, 0), (4, 4, 0), (0x20, 4, 0)])).is_err());
        assert!(acl_to_disk(&vfs_acl(&[(1, 6, 0), (4, 4, 0), (0x40, 4, 0)])).is_err());
    }

    #[test]
    fn hashes_match_e2fsprogs() {
        // Values worked by hand from ext2fs_ext_attr_hash_entry:
        // name "a": hash = 0x61; value "b" = word 0x00000062:
        // (0x61 << 16) ^ (0x61 >> 16) ^ 0x62 = 0x00610062.
        assert_eq!(entry_hash(b"a", b""), 0x61);
        assert_eq!(entry_hash(b"a", b"b"), 0x0061_0062);
        // "ab": (0x61 << 5) ^ 0x62 = 0xc20 ^ 0x62 = 0xc42
        assert_eq!(entry_hash(b"ab", b""), 0xc42);
        // The name hash wraps (rotate by 5); bytes are unsigned.
        assert_eq!(entry_hash(&[0xff], b""), 0xff);
        // Read from an xattr block written by mkfs.ext4 -d (e2fsprogs 1.47.0): "big" with
        // 2000 'z', and the non-ASCII "été" (hashed as unsigned bytes; the signed variant
        // would give 0x2627f21b) with 60 bytes 0xf1. tests/xattr_crosscheck.rs checks more
        // against mkfs and the kernel.
        assert_eq!(entry_hash(b"big", &[b'z'; 2000]), 0x0001_8547);
        assert_eq!(entry_hash("été".as_bytes(), &[0xf1; 60]), 0xb938_fd94);
        assert_eq!(block_hash(&[1, 2]), (1 << 16) ^ 2);
        assert_eq!(block_hash(&[1, 0, 2]), 0);
    }

    #[test]
    fn placement() {
        let small = parse(&[("user.a".into(), b"x".to_vec())]).unwrap();
        assert!(matches!(place(&small).unwrap(), Placement::Inode(_)));
        let big = parse(&[("user.big".into(), vec![7; 3000])]).unwrap();
        let Placement::Block(b) = place(&big).unwrap() else {
            panic!("block expected")
        };
        // entry at 32: name_len 3, index 1, value at 4096 - 3000
        assert_eq!(&b[32..34], &[3, 1]);
        assert_eq!(u16::from_le_bytes([b[34], b[35]]), 4096 - 3000);
        assert!(parse(&[("user.big".into(), vec![7; 4090])]).is_err());
        assert!(parse(&[("system.foo".into(), vec![])]).is_err());
        assert!(parse(&[("user.".into(), vec![])]).is_err());
        assert!(parse(&[("user.a".into(), vec![]), ("user.a".into(), vec![1])]).is_err());
        let sorted = parse(&[
            ("security.capability".into(), vec![1]),
            ("user.bb".into(), vec![]),
            ("user.a".into(), vec![]),
            ("trusted.x".into(), vec![]),
        ])
        .unwrap();
        let order: Vec<(u8, &[u8])> = sorted.iter().map(|a| (a.index, &a.name[..])).collect();
        assert_eq!(
            order,
            [(1, &b"a"[..]), (1, b"bb"), (4, b"x"), (6, b"capability")]
        );
    }
}
