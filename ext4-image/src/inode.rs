//! The 256-byte on-disk inode.

pub(crate) const INODE_SIZE: usize = 256;
/// i_extra_isize: everything up to and including i_projid.
pub(crate) const EXTRA_ISIZE: u16 = 32;

pub(crate) const S_IFIFO: u16 = 0o010000;
pub(crate) const S_IFCHR: u16 = 0o020000;
pub(crate) const S_IFDIR: u16 = 0o040000;
pub(crate) const S_IFBLK: u16 = 0o060000;
pub(crate) const S_IFREG: u16 = 0o100000;
pub(crate) const S_IFLNK: u16 = 0o120000;

pub(crate) const EXTENTS_FL: u32 = 0x0008_0000;

/// Everything an inode records.
pub(crate) struct Inode<'a> {
    /// Type and permission bits.
    pub mode: u16,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    /// Seconds; atime, ctime, mtime and crtime alike.
    pub time: i64,
    pub links: u16,
    /// Blocks of 4096 bytes the inode owns (data, extent tree, xattr block).
    pub blocks: u64,
    pub flags: u32,
    pub i_block: [u8; 60],
    pub file_acl: u64,
    /// The in-inode xattr area (magic first), if any.
    pub ibody_xattrs: Option<&'a [u8]>,
}

/// Seconds as ext4 stores them: the low 32 bits, and the epoch bits of the `_extra` field.
/// Times outside ext4's range (1901..2446) are clamped to it.
pub(crate) fn encode_time(secs: i64) -> (u32, u32) {
    let min = -(1i64 << 31);
    let max = (3i64 << 32) + (1i64 << 31) - 1;
    let s = secs.clamp(min, max);
    let lo = s as i32;
    let extra = ((s - i64::from(lo)) >> 32) as u32 & 3;
    (lo as u32, extra)
}

impl Inode<'_> {
    /// Writes the inode into `out` (256 bytes, zeroed).
    pub(crate) fn encode(&self, out: &mut [u8]) {
        let put16 =
            |o: &mut [u8], at: usize, v: u16| o[at..at + 2].copy_from_slice(&v.to_le_bytes());
        let put32 =
            |o: &mut [u8], at: usize, v: u32| o[at..at + 4].copy_from_slice(&v.to_le_bytes());
        let (t, extra) = encode_time(self.time);
        let sectors = self.blocks * 8;
        put16(out, 0, self.mode);
        put16(out, 2, self.uid as u16);
        put32(out, 4, self.size as u32);
        put32(out, 8, t); // atime
        put32(out, 12, t); // ctime
        put32(out, 16, t); // mtime
        put16(out, 24, self.gid as u16);
        put16(out, 26, self.links);
        put32(out, 28, sectors as u32);
        put32(out, 32, self.flags);
        out[40..100].copy_from_slice(&self.i_block);
        put32(out, 104, self.file_acl as u32);
        put32(out, 108, (self.size >> 32) as u32);
        put16(out, 116, (sectors >> 32) as u16);
        put16(out, 118, (self.file_acl >> 32) as u16);
        put16(out, 120, (self.uid >> 16) as u16);
        put16(out, 122, (self.gid >> 16) as u16);
        put16(out, 128, EXTRA_ISIZE);
        put32(out, 132, extra); // ctime_extra
        put32(out, 136, extra); // mtime_extra
        put32(out, 140, extra); // atime_extra
        put32(out, 144, t); // crtime
        put32(out, 148, extra); // crtime_extra
        if let Some(x) = self.ibody_xattrs {
            let at = 128 + EXTRA_ISIZE as usize;
            out[at..at + x.len()].copy_from_slice(x);
        }
    }
}

/// i_block of a device inode: the old encoding when major and minor are below 256, else the
/// new one in the second word.
pub(crate) fn device_block(major: u32, minor: u32) -> [u8; 60] {
    let mut b = [0u8; 60];
    if major < 256 && minor < 256 {
        b[0..4].copy_from_slice(&((major << 8) | minor).to_le_bytes());
    } else {
        let v = (minor & 0xff) | (major << 8) | ((minor & !0xff) << 12);
        b[4..8].copy_from_slice(&v.to_le_bytes());
    }
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times() {
        assert_eq!(encode_time(0), (0, 0));
        assert_eq!(encode_time(-1000), ((-1000i32) as u32, 0));
        assert_eq!(encode_time(1_700_000_000), (1_700_000_000, 0));
        // 5e9 - 2^32 = 705032704, epoch 1
        assert_eq!(encode_time(5_000_000_000), (705_032_704, 1));
        // 2^31 (2038-01-19) is past i32: low word 0x80000000, epoch 1
        assert_eq!(encode_time(1 << 31), (0x8000_0000, 1));
    }

    #[test]
    fn devices() {
        assert_eq!(&device_block(8, 1)[0..8], &[1, 8, 0, 0, 0, 0, 0, 0]);
        // major 259 minor 300000 (0x493e0): (0xe0) | (259 << 8) | (0x49300 << 12)
        let v = 0xe0 | (259 << 8) | (0x49300u32 << 12);
        assert_eq!(&device_block(259, 300_000)[4..8], &v.to_le_bytes());
        assert_eq!(&device_block(259, 300_000)[0..4], &[0; 4]);
    }
}
