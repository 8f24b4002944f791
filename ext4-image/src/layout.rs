//! Block geometry: which groups carry a superblock copy, the areas reserved for them, and
//! the allocation cursor that skips those areas.

use crate::{Error, BLOCK_SIZE};

/// Group descriptors per block (32-byte descriptors, no 64bit feature).
pub(crate) const DESCS_PER_BLOCK: u64 = (BLOCK_SIZE / 32) as u64;

/// Whether group `g` holds a superblock and GDT copy under sparse_super: 0, 1 and the
/// powers of 3, 5 and 7.
pub(crate) fn has_super(g: u64) -> bool {
    if g <= 1 {
        return true;
    }
    if g % 2 == 0 {
        return false;
    }
    is_power_of(g, 3) || is_power_of(g, 5) || is_power_of(g, 7)
}

fn is_power_of(mut g: u64, base: u64) -> bool {
    while g % base == 0 {
        g /= base;
    }
    g == 1
}

/// The smallest group >= `g` that holds a superblock copy.
pub(crate) fn next_super_group(g: u64) -> u64 {
    if g <= 1 {
        return g;
    }
    let mut best = u64::MAX;
    for base in [3u64, 5, 7] {
        let mut p = base;
        while p < g {
            match p.checked_mul(base) {
                Some(q) => p = q,
                None => {
                    p = u64::MAX;
                    break;
                }
            }
        }
        best = best.min(p);
    }
    best
}

/// The fixed geometry of a build.
#[derive(Clone, Debug)]
pub(crate) struct Geometry {
    /// Blocks per group.
    pub bpg: u64,
    /// Blocks at the start of group 0 and of every backup group kept for the superblock
    /// and the GDT sized for `max_blocks`.
    pub reserved: u64,
    /// The largest image, in blocks.
    pub max_blocks: u64,
}

impl Geometry {
    pub(crate) fn new(blocks_per_group: u32, max_bytes: u64) -> Result<Geometry, Error> {
        let bpg = u64::from(blocks_per_group);
        if !(256..=(BLOCK_SIZE as u64 * 8)).contains(&bpg) || bpg % 8 != 0 {
            return Err(Error::BadOption(format!(
                "blocks_per_group {bpg} must be a multiple of 8 in 256..=32768"
            )));
        }
        let max_blocks = max_bytes / BLOCK_SIZE as u64;
        if max_blocks > u64::from(u32::MAX) {
            return Err(Error::BadOption(format!(
                "max_bytes {max_bytes} is beyond 16 TiB, the limit of ext4 without 64bit"
            )));
        }
        if max_blocks < 64 {
            return Err(Error::BadOption(format!(
                "max_bytes {max_bytes} is less than 64 blocks"
            )));
        }
        let max_groups = max_blocks.div_ceil(bpg);
        let gdt_blocks = max_groups.div_ceil(DESCS_PER_BLOCK);
        let reserved = 1 + gdt_blocks;
        if reserved + 16 > bpg {
            return Err(Error::BadOption(format!(
                "max_bytes {max_bytes} needs {gdt_blocks} group descriptor blocks, too many for \
                 {bpg} blocks per group"
            )));
        }
        Ok(Geometry {
            bpg,
            reserved,
            max_blocks,
        })
    }

    /// The first block at or after `b` that is outside a reserved area.
    pub(crate) fn skip_reserved(&self, b: u64) -> u64 {
        let g = b / self.bpg;
        let start = g * self.bpg;
        if has_super(g) && b < start + self.reserved {
            start + self.reserved
        } else {
            b
        }
    }

    /// The first reserved block after `b` (which is outside a reserved area).
    fn next_reserved(&self, b: u64) -> u64 {
        next_super_group(b / self.bpg + 1).saturating_mul(self.bpg)
    }

    /// Takes up to `want` blocks at `cursor` (skipping a reserved area first): returns the
    /// run's first block and length and moves the cursor past it.
    pub(crate) fn take(&self, cursor: &mut u64, want: u64) -> (u64, u64) {
        let s = self.skip_reserved(*cursor);
        let len = want.min(self.next_reserved(s) - s);
        *cursor = s + len;
        (s, len)
    }

    /// Takes exactly `n` contiguous blocks (n <= bpg - reserved), skipping to after the next
    /// reserved area when they do not fit before it.
    pub(crate) fn take_contiguous(&self, cursor: &mut u64, n: u64) -> u64 {
        debug_assert!(n <= self.bpg - self.reserved);
        let mut s = self.skip_reserved(*cursor);
        if self.next_reserved(s) - s < n {
            s = self.skip_reserved(self.next_reserved(s));
        }
        *cursor = s + n;
        s
    }

    /// Largest inodes per group: the bitmap's limit, e2fsck's, and an inode table that fits
    /// between two reserved areas.
    pub(crate) fn max_inodes_per_group(&self) -> u64 {
        let per_block = (BLOCK_SIZE / 256) as u64;
        (BLOCK_SIZE as u64 * 8)
            .min(per_block * (self.bpg - self.reserved))
            .min(per_block * (self.bpg - 4))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn super_groups() {
        let got: Vec<u64> = (0..60).filter(|&g| has_super(g)).collect();
        assert_eq!(got, [0, 1, 3, 5, 7, 9, 25, 27, 49]);
        for g in 0..3000 {
            let n = next_super_group(g);
            assert!(has_super(n) && n >= g);
            assert!((g..n).all(|x| !has_super(x)));
        }
    }

    #[test]
    fn take_skips_reserved_areas() {
        let geo = Geometry::new(256, 128 << 20).unwrap();
        assert_eq!(geo.reserved, 2);
        let mut c = 2;
        assert_eq!(geo.take(&mut c, 1000), (2, 254));
        assert_eq!(geo.take(&mut c, 1000), (258, 510));
        assert_eq!(geo.take(&mut c, 10), (770, 10));
        let mut c = 250;
        assert_eq!(geo.take_contiguous(&mut c, 10), 258);
        assert_eq!(c, 268);
    }
}
