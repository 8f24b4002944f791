//! The superblock and the group descriptor table.

use crate::BLOCK_SIZE;

const COMPAT_EXT_ATTR: u32 = 0x0008;
const COMPAT_DIR_INDEX: u32 = 0x0020;
const INCOMPAT_FILETYPE: u32 = 0x0002;
const INCOMPAT_EXTENTS: u32 = 0x0040;
const INCOMPAT_FLEX_BG: u32 = 0x0200;
const RO_COMPAT_SPARSE_SUPER: u32 = 0x0001;
const RO_COMPAT_LARGE_FILE: u32 = 0x0002;
const RO_COMPAT_DIR_NLINK: u32 = 0x0020;
const RO_COMPAT_EXTRA_ISIZE: u32 = 0x0040;

/// What the superblock records.
pub(crate) struct Super<'a> {
    pub inodes_count: u32,
    pub blocks_count: u32,
    pub free_blocks: u32,
    pub free_inodes: u32,
    pub blocks_per_group: u32,
    pub inodes_per_group: u32,
    pub timestamp: i64,
    pub uuid: [u8; 16],
    pub label: &'a [u8],
    pub hash_seed: [u8; 16],
}

impl Super<'_> {
    /// The 1024-byte superblock, for the copy in group `group`.
    pub(crate) fn encode(&self, group: u16) -> [u8; 1024] {
        let mut s = [0u8; 1024];
        let put8 = |s: &mut [u8], at: usize, v: u8| s[at] = v;
        let put16 =
            |s: &mut [u8], at: usize, v: u16| s[at..at + 2].copy_from_slice(&v.to_le_bytes());
        let put32 =
            |s: &mut [u8], at: usize, v: u32| s[at..at + 4].copy_from_slice(&v.to_le_bytes());
        let t = self.timestamp.clamp(0, (1 << 40) - 1) as u64;
        put32(&mut s, 0x00, self.inodes_count);
        put32(&mut s, 0x04, self.blocks_count);
        put32(&mut s, 0x08, 0); // r_blocks_count
        put32(&mut s, 0x0C, self.free_blocks);
        put32(&mut s, 0x10, self.free_inodes);
        put32(&mut s, 0x14, 0); // first_data_block
        put32(&mut s, 0x18, 2); // log_block_size: 1024 << 2
        put32(&mut s, 0x1C, 2); // log_cluster_size
        put32(&mut s, 0x20, self.blocks_per_group);
        put32(&mut s, 0x24, self.blocks_per_group); // clusters_per_group
        put32(&mut s, 0x28, self.inodes_per_group);
        put32(&mut s, 0x2C, 0); // mtime: never mounted
        put32(&mut s, 0x30, t as u32); // wtime
        put16(&mut s, 0x34, 0); // mnt_count
        put16(&mut s, 0x36, 0xFFFF); // max_mnt_count -1
        put16(&mut s, 0x38, 0xEF53); // magic
        put16(&mut s, 0x3A, 1); // state: clean
        put16(&mut s, 0x3C, 1); // errors: continue
        put32(&mut s, 0x40, t as u32); // lastcheck
        put32(&mut s, 0x48, 0); // creator_os: Linux
        put32(&mut s, 0x4C, 1); // rev_level: dynamic
        put32(&mut s, 0x54, 11); // first_ino
        put16(&mut s, 0x58, 256); // inode_size
        put16(&mut s, 0x5A, group); // block_group_nr
        put32(&mut s, 0x5C, COMPAT_EXT_ATTR | COMPAT_DIR_INDEX);
        put32(
            &mut s,
            0x60,
            INCOMPAT_FILETYPE | INCOMPAT_EXTENTS | INCOMPAT_FLEX_BG,
        );
        put32(
            &mut s,
            0x64,
            RO_COMPAT_SPARSE_SUPER
                | RO_COMPAT_LARGE_FILE
                | RO_COMPAT_DIR_NLINK
                | RO_COMPAT_EXTRA_ISIZE,
        );
        s[0x68..0x78].copy_from_slice(&self.uuid);
        s[0x78..0x78 + self.label.len()].copy_from_slice(self.label);
        s[0xEC..0xFC].copy_from_slice(&self.hash_seed);
        put8(&mut s, 0xFC, 1); // def_hash_version: half_md4
        put32(&mut s, 0x100, 0x000C); // default mount options: user_xattr, acl
        put32(&mut s, 0x108, t as u32); // mkfs_time
        put16(&mut s, 0x15C, 32); // min_extra_isize
        put16(&mut s, 0x15E, 32); // want_extra_isize
        put32(&mut s, 0x160, 0x0002); // flags: unsigned directory hash
        put8(&mut s, 0x174, 4); // log_groups_per_flex
        let hi = (t >> 32) as u8;
        put8(&mut s, 0x274, hi); // wtime_hi
        put8(&mut s, 0x276, hi); // mkfs_time_hi
        put8(&mut s, 0x277, hi); // lastcheck_hi
        s
    }
}

/// One 32-byte group descriptor.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct GroupDesc {
    pub block_bitmap: u32,
    pub inode_bitmap: u32,
    pub inode_table: u32,
    pub free_blocks: u16,
    pub free_inodes: u16,
    pub used_dirs: u16,
}

/// The group descriptor table, zero-padded to whole blocks.
pub(crate) fn encode_gdt(descs: &[GroupDesc]) -> Vec<u8> {
    let len = (descs.len() * 32).div_ceil(BLOCK_SIZE) * BLOCK_SIZE;
    let mut out = vec![0u8; len];
    for (d, o) in descs.iter().zip(out.chunks_mut(32)) {
        o[0..4].copy_from_slice(&d.block_bitmap.to_le_bytes());
        o[4..8].copy_from_slice(&d.inode_bitmap.to_le_bytes());
        o[8..12].copy_from_slice(&d.inode_table.to_le_bytes());
        o[12..14].copy_from_slice(&d.free_blocks.to_le_bytes());
        o[14..16].copy_from_slice(&d.free_inodes.to_le_bytes());
        o[16..18].copy_from_slice(&d.used_dirs.to_le_bytes());
    }
    out
}
