//! Extent lists and extent trees (i_block root, leaf and index blocks).

use crate::BLOCK_SIZE;

/// The longest initialized extent.
pub(crate) const MAX_EXTENT_LEN: u64 = 32768;
/// Entries in the root node inside i_block.
const ROOT_ENTRIES: usize = 4;
/// Entries in a tree block: (4096 - 12-byte header) / 12.
pub(crate) const BLOCK_ENTRIES: usize = (BLOCK_SIZE - 12) / 12;
const MAGIC: u16 = 0xF30A;

/// A run of blocks of a file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Extent {
    /// First logical block.
    pub logical: u32,
    /// Length in blocks, 1..=32768.
    pub len: u32,
    /// First physical block.
    pub physical: u64,
}

/// Appends the run `physical..physical+len` at the end of `list`, merging with the last
/// extent when contiguous and splitting at [`MAX_EXTENT_LEN`].
pub(crate) fn append(list: &mut Vec<Extent>, mut physical: u64, mut len: u64) {
    while len > 0 {
        let logical = list.last().map_or(0, |e| e.logical + e.len);
        if let Some(last) = list.last_mut() {
            if last.physical + u64::from(last.len) == physical
                && u64::from(last.len) < MAX_EXTENT_LEN
            {
                let n = len.min(MAX_EXTENT_LEN - u64::from(last.len));
                last.len += n as u32;
                physical += n;
                len -= n;
                continue;
            }
        }
        let n = len.min(MAX_EXTENT_LEN);
        list.push(Extent {
            logical,
            len: n as u32,
            physical,
        });
        physical += n;
        len -= n;
    }
}

/// How many tree blocks (leaves and index blocks outside the inode) `n` extents need.
pub(crate) fn tree_blocks(n: usize) -> u64 {
    let mut total = 0;
    let mut nodes = n;
    while nodes > ROOT_ENTRIES {
        nodes = nodes.div_ceil(BLOCK_ENTRIES);
        total += nodes as u64;
    }
    total
}

fn header(out: &mut [u8], entries: usize, max: usize, depth: u16) {
    out[0..2].copy_from_slice(&MAGIC.to_le_bytes());
    out[2..4].copy_from_slice(&(entries as u16).to_le_bytes());
    out[4..6].copy_from_slice(&(max as u16).to_le_bytes());
    out[6..8].copy_from_slice(&depth.to_le_bytes());
    out[8..12].copy_from_slice(&0u32.to_le_bytes());
}

fn leaf_entry(out: &mut [u8], e: &Extent) {
    out[0..4].copy_from_slice(&e.logical.to_le_bytes());
    out[4..6].copy_from_slice(&(e.len as u16).to_le_bytes());
    out[6..8].copy_from_slice(&((e.physical >> 32) as u16).to_le_bytes());
    out[8..12].copy_from_slice(&(e.physical as u32).to_le_bytes());
}

fn index_entry(out: &mut [u8], logical: u32, block: u64) {
    out[0..4].copy_from_slice(&logical.to_le_bytes());
    out[4..8].copy_from_slice(&(block as u32).to_le_bytes());
    out[8..10].copy_from_slice(&((block >> 32) as u16).to_le_bytes());
    out[10..12].copy_from_slice(&0u16.to_le_bytes());
}

/// The tree for `extents`: the 60-byte i_block, and the tree blocks' contents in the order of
/// `blocks` (leaves first, then each index level), where `blocks` are the
/// [`tree_blocks`]`(extents.len())` block numbers allocated for them.
pub(crate) fn build(extents: &[Extent], blocks: &[u64]) -> ([u8; 60], Vec<Vec<u8>>) {
    debug_assert_eq!(blocks.len() as u64, tree_blocks(extents.len()));
    let mut root = [0u8; 60];
    let mut out = Vec::with_capacity(blocks.len());
    if extents.len() <= ROOT_ENTRIES {
        header(&mut root, extents.len(), ROOT_ENTRIES, 0);
        for (i, e) in extents.iter().enumerate() {
            leaf_entry(&mut root[12 + 12 * i..24 + 12 * i], e);
        }
        return (root, out);
    }
    // Leaves.
    let mut next_block = blocks.iter();
    // (first logical block, block number) of the nodes of the level just built.
    let mut level: Vec<(u32, u64)> = Vec::new();
    for chunk in extents.chunks(BLOCK_ENTRIES) {
        let mut b = vec![0u8; BLOCK_SIZE];
        header(&mut b, chunk.len(), BLOCK_ENTRIES, 0);
        for (i, e) in chunk.iter().enumerate() {
            leaf_entry(&mut b[12 + 12 * i..24 + 12 * i], e);
        }
        let nr = *next_block.next().expect("tree block count");
        level.push((chunk[0].logical, nr));
        out.push(b);
    }
    let mut depth = 1u16;
    while level.len() > ROOT_ENTRIES {
        let mut upper = Vec::new();
        for chunk in level.chunks(BLOCK_ENTRIES) {
            let mut b = vec![0u8; BLOCK_SIZE];
            header(&mut b, chunk.len(), BLOCK_ENTRIES, depth);
            for (i, &(logical, nr)) in chunk.iter().enumerate() {
                index_entry(&mut b[12 + 12 * i..24 + 12 * i], logical, nr);
            }
            let nr = *next_block.next().expect("tree block count");
            upper.push((chunk[0].0, nr));
            out.push(b);
        }
        level = upper;
        depth += 1;
    }
    header(&mut root, level.len(), ROOT_ENTRIES, depth);
    for (i, &(logical, nr)) in level.iter().enumerate() {
        index_entry(&mut root[12 + 12 * i..24 + 12 * i], logical, nr);
    }
    (root, out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn append_merges_and_splits() {
        let mut l = Vec::new();
        append(&mut l, 100, 10);
        append(&mut l, 110, 5);
        append(&mut l, 200, 70000);
        assert_eq!(
            l,
            [
                Extent {
                    logical: 0,
                    len: 15,
                    physical: 100
                },
                Extent {
                    logical: 15,
                    len: 32768,
                    physical: 200
                },
                Extent {
                    logical: 32783,
                    len: 32768,
                    physical: 32968
                },
                Extent {
                    logical: 65551,
                    len: 4464,
                    physical: 65736
                },
            ]
        );
    }

    #[test]
    fn tree_shapes() {
        assert_eq!(tree_blocks(0), 0);
        assert_eq!(tree_blocks(4), 0);
        assert_eq!(tree_blocks(5), 1);
        assert_eq!(tree_blocks(340 * 4), 4);
        assert_eq!(tree_blocks(340 * 4 + 1), 5 + 1);
        let extents: Vec<Extent> = (0..2000u32)
            .map(|i| Extent {
                logical: i,
                len: 1,
                physical: 2 * u64::from(i) + 10,
            })
            .collect();
        let blocks: Vec<u64> = (0..tree_blocks(2000)).map(|i| 90000 + i).collect();
        let (root, tree) = build(&extents, &blocks);
        assert_eq!(tree.len(), 7);
        // depth 2 root with one index entry pointing at the last block
        assert_eq!(u16::from_le_bytes([root[6], root[7]]), 2);
        assert_eq!(u16::from_le_bytes([root[2], root[3]]), 1);
        assert_eq!(u32::from_le_bytes(root[16..20].try_into().unwrap()), 90006);
        // the 7th leaf... the 6th leaf starts at logical 1700
        assert_eq!(
            u32::from_le_bytes(tree[5][12..16].try_into().unwrap()),
            1700
        );
    }
}
