//! Linear directory blocks of `ext4_dir_entry_2` records.

use crate::BLOCK_SIZE;

/// File type codes of directory entries.
pub(crate) const FT_REG: u8 = 1;
pub(crate) const FT_DIR: u8 = 2;
pub(crate) const FT_CHR: u8 = 3;
pub(crate) const FT_BLK: u8 = 4;
pub(crate) const FT_FIFO: u8 = 5;
pub(crate) const FT_SYMLINK: u8 = 7;

fn rec_len(name_len: usize) -> usize {
    (8 + name_len + 3) & !3
}

/// Calls `place(block_index, offset, record_len_or_stretched, entry_index)` for ".", ".." and
/// each entry, in order; returns the number of blocks.
fn walk(
    names: impl Iterator<Item = usize>,
    mut place: impl FnMut(usize, usize, usize, usize),
) -> u64 {
    let mut block = 0;
    let mut off = 0;
    // The record placed last: (block, offset, length, index), emitted once the next one
    // shows whether it has to stretch to the block end.
    let mut pending: Option<(usize, usize, usize, usize)> = None;
    for (i, len) in [1usize, 2].into_iter().chain(names).enumerate() {
        let rl = rec_len(len);
        if off + rl > BLOCK_SIZE {
            if let Some((b, o, _, idx)) = pending.take() {
                place(b, o, BLOCK_SIZE - o, idx);
            }
            block += 1;
            off = 0;
        }
        if let Some((b, o, l, idx)) = pending.take() {
            place(b, o, l, idx);
        }
        pending = Some((block, off, rl, i));
        off += rl;
    }
    if let Some((b, o, _, idx)) = pending {
        place(b, o, BLOCK_SIZE - o, idx);
    }
    block as u64 + 1
}

/// Blocks a directory with entries of these name lengths takes ("." and ".." included).
pub(crate) fn block_count(name_lens: impl Iterator<Item = usize>) -> u64 {
    walk(name_lens, |_, _, _, _| {})
}

/// A directory entry to write.
pub(crate) struct Entry<'a> {
    pub name: &'a [u8],
    pub ino: u32,
    pub file_type: u8,
}

/// The directory's blocks: ".", "..", then `entries` in order.
pub(crate) fn encode(self_ino: u32, parent_ino: u32, entries: &[Entry<'_>]) -> Vec<u8> {
    let n = block_count(entries.iter().map(|e| e.name.len()));
    let mut buf = vec![0u8; n as usize * BLOCK_SIZE];
    walk(entries.iter().map(|e| e.name.len()), |b, o, len, i| {
        let (name, ino, ft): (&[u8], u32, u8) = match i {
            0 => (b".", self_ino, FT_DIR),
            1 => (b"..", parent_ino, FT_DIR),
            _ => {
                let e = &entries[i - 2];
                (e.name, e.ino, e.file_type)
            }
        };
        let r = &mut buf[b * BLOCK_SIZE + o..];
        r[0..4].copy_from_slice(&ino.to_le_bytes());
        r[4..6].copy_from_slice(&(len as u16).to_le_bytes());
        r[6] = name.len() as u8;
        r[7] = ft;
        r[8..8 + name.len()].copy_from_slice(name);
    });
    buf
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_directory() {
        let b = encode(2, 2, &[]);
        assert_eq!(b.len(), BLOCK_SIZE);
        assert_eq!(&b[0..12], &[2, 0, 0, 0, 12, 0, 1, 2, b'.', 0, 0, 0]);
        assert_eq!(&b[12..22], &[2, 0, 0, 0, 0xf4, 0x0f, 2, 2, b'.', b'.']);
    }

    #[test]
    fn records_never_cross_blocks() {
        let names: Vec<Vec<u8>> = (0..400)
            .map(|i| format!("file-{i:05}").into_bytes())
            .collect();
        let entries: Vec<Entry> = names
            .iter()
            .enumerate()
            .map(|(i, n)| Entry {
                name: n,
                ino: 12 + i as u32,
                file_type: FT_REG,
            })
            .collect();
        let buf = encode(11, 2, &entries);
        // 12 + 12 + 400 * 20 = 8024 bytes: two blocks
        assert_eq!(buf.len(), 2 * BLOCK_SIZE);
        let mut seen = 0;
        for blk in buf.chunks(BLOCK_SIZE) {
            let mut off = 0;
            while off < BLOCK_SIZE {
                let rl = u16::from_le_bytes([blk[off + 4], blk[off + 5]]) as usize;
                assert!(rl >= 12 && off + rl <= BLOCK_SIZE);
                off += rl;
                seen += 1;
            }
            assert_eq!(off, BLOCK_SIZE);
        }
        assert_eq!(seen, 402);
    }
}
