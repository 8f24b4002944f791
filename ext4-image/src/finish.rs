//! `finish`: inode numbers, the placement of all metadata after the data, the group count,
//! bitmaps, inode tables, group descriptors and superblocks.

use std::collections::BTreeMap;

use crate::builder::Builder;
use crate::dir::{self, Entry};
use crate::extent::{self, Extent};
use crate::inode::{self, Inode, INODE_SIZE};
use crate::layout::{has_super, Geometry, DESCS_PER_BLOCK};
use crate::sink::{BlockSink, RunWriter};
use crate::superblock::{encode_gdt, GroupDesc, Super};
use crate::tree::{bad_xattr, Body, Meta, Node, NodeId, NodeKind, Tree, ROOT};
use crate::xattr::{self, Placement};
use crate::{Error, Image, BLOCK_SIZE};

const INODES_PER_BLOCK: u64 = (BLOCK_SIZE / INODE_SIZE) as u64;
const FIRST_INO: u32 = 11;
/// i_links_count of a directory whose count would pass this (dir_nlink).
const DIR_LINK_MAX: u64 = 65000;

/// What an inode needs beyond its node, decided while placing metadata.
struct Planned {
    i_block: [u8; 60],
    /// 4096-byte blocks owned: data, extent tree, xattr block.
    blocks: u64,
    file_acl: u64,
    /// Directory size.
    dir_size: u64,
    ibody: Option<Vec<u8>>,
}

impl Default for Planned {
    fn default() -> Self {
        Planned {
            i_block: [0; 60],
            blocks: 0,
            file_acl: 0,
            dir_size: 0,
            ibody: None,
        }
    }
}

fn too_large(what: &str, blocks: u64, geo: &Geometry) -> Error {
    Error::TooLarge(format!(
        "{what} needs {blocks} blocks ({} bytes), more than max_bytes allows ({} blocks)",
        blocks * BLOCK_SIZE as u64,
        geo.max_blocks
    ))
}

fn file_type(kind: NodeKind) -> u8 {
    match kind {
        NodeKind::Directory => dir::FT_DIR,
        NodeKind::Regular => dir::FT_REG,
        NodeKind::Symlink => dir::FT_SYMLINK,
        NodeKind::CharDevice => dir::FT_CHR,
        NodeKind::BlockDevice => dir::FT_BLK,
        NodeKind::Fifo => dir::FT_FIFO,
    }
}

/// Inode numbers in tree order (depth first, names in byte order): root 2, a lost+found the
/// builder made 11, the rest from there. Returns the number of each node (0: none) and the
/// nodes in inode order (root first).
fn number(tree: &Tree, made_lost_found: Option<NodeId>) -> (Vec<u32>, Vec<NodeId>) {
    let mut ino = vec![0u32; tree.nodes.len()];
    let mut order = vec![ROOT];
    ino[ROOT.0 as usize] = 2;
    let mut next = FIRST_INO;
    if let Some(lf) = made_lost_found {
        ino[lf.0 as usize] = next;
        order.push(lf);
        next += 1;
    }
    let mut stack: Vec<NodeId> = Vec::new();
    let push_children = |stack: &mut Vec<NodeId>, id: NodeId| {
        if let Body::Dir { children, .. } = &tree.node(id).body {
            stack.extend(children.values().rev().copied());
        }
    };
    push_children(&mut stack, ROOT);
    while let Some(id) = stack.pop() {
        if ino[id.0 as usize] != 0 {
            continue;
        }
        ino[id.0 as usize] = next;
        next += 1;
        order.push(id);
        push_children(&mut stack, id);
    }
    (ino, order)
}

/// Where the bitmaps and inode tables of `groups` groups go from `start`, and the end.
struct GroupMeta {
    block_bitmaps: Vec<u64>,
    inode_bitmaps: Vec<u64>,
    inode_tables: Vec<u64>,
    end: u64,
}

fn place_group_meta(geo: &Geometry, start: u64, groups: u64, table_blocks: u64) -> GroupMeta {
    let mut c = start;
    let block_bitmaps = (0..groups).map(|_| geo.take(&mut c, 1).0).collect();
    let inode_bitmaps = (0..groups).map(|_| geo.take(&mut c, 1).0).collect();
    let inode_tables = (0..groups)
        .map(|_| geo.take_contiguous(&mut c, table_blocks))
        .collect();
    GroupMeta {
        block_bitmaps,
        inode_bitmaps,
        inode_tables,
        end: c,
    }
}

/// A bit per block of the image.
struct Bitmap(Vec<u8>);

impl Bitmap {
    fn set_range(&mut self, start: u64, len: u64) {
        let (mut i, end) = (start, start + len);
        while i < end && i % 8 != 0 {
            self.0[(i / 8) as usize] |= 1 << (i % 8);
            i += 1;
        }
        while i + 8 <= end {
            self.0[(i / 8) as usize] = 0xff;
            i += 8;
        }
        while i < end {
            self.0[(i / 8) as usize] |= 1 << (i % 8);
            i += 1;
        }
    }
}

pub(crate) fn finish<S: BlockSink>(mut b: Builder<S>) -> Result<Image<S>, Error> {
    b.flush_pending()?;
    let Builder {
        mut sink,
        opts,
        geo,
        mut tree,
        cursor,
        ..
    } = b;
    for n in tree.nodes.iter().filter(|n| n.alive) {
        if let Some(r) = &n.attr_error {
            return Err(bad_xattr(&n.name, r.clone()));
        }
    }
    let summary = tree.summary();

    // lost+found, which e2fsck wants, unless the tree has one.
    let made_lost_found = match tree.children(ROOT).and_then(|c| c.get(&b"lost+found"[..])) {
        Some(_) => None,
        None => {
            let meta = Meta {
                mode: 0o700,
                mtime: opts.timestamp,
                ..Meta::default()
            };
            let body = Body::Dir {
                parent: ROOT,
                children: BTreeMap::new(),
            };
            let id = tree.add(ROOT, b"lost+found", NodeKind::Directory, meta, body)?;
            tree.node_mut(id).synthetic = true;
            Some(id)
        }
    };

    let (ino_of, order) = number(&tree, made_lost_found);
    // Inodes 1-10 are reserved (the root is 2); the others follow from 11.
    let max_ino = u64::from(FIRST_INO) - 1 + (order.len() as u64 - 1);

    // Node metadata (directory blocks, long symlinks, extent trees, xattr blocks) right after
    // the data, in inode order, written as it is placed.
    let mut w = RunWriter::new(&mut sink);
    let mut used: Vec<(u64, u64)> = Vec::new();
    let mut planned: Vec<Planned> = Vec::with_capacity(order.len());
    let mut c = cursor;
    let mut subdirs: Vec<u64> = vec![0; order.len()];
    for (pos, &id) in order.iter().enumerate() {
        let n = tree.node(id);
        let mut p = Planned::default();
        let mut own: Vec<Extent> = Vec::new();
        let content: Option<Vec<u8>> = match &n.body {
            Body::Dir { parent, children } => {
                let entries: Vec<Entry> = children
                    .iter()
                    .map(|(name, &child)| Entry {
                        name,
                        ino: ino_of[child.0 as usize],
                        file_type: file_type(tree.node(child).kind),
                    })
                    .collect();
                subdirs[pos] = children
                    .values()
                    .filter(|&&c| tree.node(c).kind == NodeKind::Directory)
                    .count() as u64;
                let parent_ino = ino_of[parent.0 as usize];
                let data = dir::encode(ino_of[id.0 as usize], parent_ino, &entries);
                p.dir_size = data.len() as u64;
                Some(data)
            }
            Body::Symlink(target) if target.len() >= 60 => {
                let mut data = target.clone();
                data.resize(BLOCK_SIZE, 0);
                Some(data)
            }
            Body::Symlink(target) => {
                p.i_block[..target.len()].copy_from_slice(target);
                None
            }
            Body::Device { major, minor } => {
                p.i_block = inode::device_block(*major, *minor);
                None
            }
            Body::File { extents, .. } => {
                for e in extents {
                    used.push((e.physical, u64::from(e.len)));
                }
                p.blocks += extents.iter().map(|e| u64::from(e.len)).sum::<u64>();
                None
            }
            Body::Fifo => None,
        };
        if let Some(data) = &content {
            let nblocks = (data.len() / BLOCK_SIZE) as u64;
            let mut done = 0;
            while done < nblocks {
                let (start, len) = geo.take(&mut c, nblocks - done);
                let from = done as usize * BLOCK_SIZE;
                let to = (done + len) as usize * BLOCK_SIZE;
                if start + len > geo.max_blocks {
                    return Err(too_large("the metadata", start + len, &geo));
                }
                w.push(start, &data[from..to])?;
                extent::append(&mut own, start, len);
                used.push((start, len));
                done += len;
            }
            p.blocks += nblocks;
        }
        let extents: &[Extent] = match &n.body {
            Body::File { extents, .. } => extents,
            _ => &own,
        };
        if matches!(n.body, Body::Dir { .. } | Body::File { .. }) || content.is_some() {
            let k = extent::tree_blocks(extents.len());
            let blocks: Vec<u64> = (0..k).map(|_| geo.take(&mut c, 1).0).collect();
            if c > geo.max_blocks {
                return Err(too_large("the metadata", c, &geo));
            }
            let (root, tree_data) = extent::build(extents, &blocks);
            p.i_block = root;
            for (&nr, data) in blocks.iter().zip(&tree_data) {
                w.push(nr, data)?;
                used.push((nr, 1));
            }
            p.blocks += k;
        }
        match xattr::place(&n.attrs)
            .map_err(|why| bad_xattr(&n.name, ("(all attributes together)".to_string(), why)))?
        {
            Placement::None => {}
            Placement::Inode(buf) => p.ibody = Some(buf),
            Placement::Block(buf) => {
                let (nr, _) = geo.take(&mut c, 1);
                if nr >= geo.max_blocks {
                    return Err(too_large("the metadata", nr + 1, &geo));
                }
                w.push(nr, &buf)?;
                used.push((nr, 1));
                p.file_acl = nr;
                p.blocks += 1;
            }
        }
        planned.push(p);
    }
    let meta_end = c;

    // Groups and inodes per group: enough inodes, at most what a group can hold; the image
    // ends after the group metadata plus the free space asked for.
    let bpg = geo.bpg;
    let need_inodes = max_ino + opts.free_inodes;
    let ipg_cap = geo.max_inodes_per_group();
    let free_req = opts.free_bytes.div_ceil(BLOCK_SIZE as u64);
    let mut groups = meta_end
        .div_ceil(bpg)
        .max(need_inodes.div_ceil(ipg_cap))
        .max(1);
    let (ipg, gm, total) = loop {
        let ipg = need_inodes
            .div_ceil(groups)
            .next_multiple_of(INODES_PER_BLOCK)
            .max(INODES_PER_BLOCK);
        if ipg > ipg_cap {
            groups = need_inodes.div_ceil(ipg_cap);
            continue;
        }
        let gm = place_group_meta(&geo, meta_end, groups, ipg / INODES_PER_BLOCK);
        let mut total = gm.end;
        let mut rem = free_req;
        while rem > 0 {
            let (_, len) = geo.take(&mut total, rem);
            rem -= len;
        }
        if total > geo.max_blocks {
            return Err(too_large("the image", total, &geo));
        }
        let g2 = total.div_ceil(bpg);
        if g2 > groups {
            groups = g2;
            continue;
        }
        // The last group holds at least its superblock copy and GDT and one block more.
        let last = groups - 1;
        let min_total = last * bpg + if has_super(last) { geo.reserved + 1 } else { 1 };
        let total = total.max(min_total);
        if total > geo.max_blocks {
            return Err(too_large("the image", total, &geo));
        }
        break (ipg, gm, total);
    };
    let inodes_count = ipg * groups;
    if inodes_count > u64::from(u32::MAX) {
        return Err(Error::TooLarge(format!("{inodes_count} inodes")));
    }
    let desc_blocks = groups.div_ceil(DESCS_PER_BLOCK);
    let table_blocks = ipg / INODES_PER_BLOCK;

    // The block bitmap of the whole image.
    let mut bits = Bitmap(vec![0u8; (groups * bpg / 8) as usize]);
    for g in (0..groups).filter(|&g| has_super(g)) {
        bits.set_range(g * bpg, 1 + desc_blocks);
    }
    for &(s, l) in &used {
        bits.set_range(s, l);
    }
    for g in 0..groups as usize {
        bits.set_range(gm.block_bitmaps[g], 1);
        bits.set_range(gm.inode_bitmaps[g], 1);
        bits.set_range(gm.inode_tables[g], table_blocks);
    }
    bits.set_range(total, groups * bpg - total); // past the end: in use

    // Group descriptors.
    let mut descs = vec![GroupDesc::default(); groups as usize];
    let group_bytes = (bpg / 8) as usize;
    for (g, d) in descs.iter_mut().enumerate() {
        let set: u64 = bits.0[g * group_bytes..(g + 1) * group_bytes]
            .iter()
            .map(|b| u64::from(b.count_ones()))
            .sum();
        d.block_bitmap = gm.block_bitmaps[g] as u32;
        d.inode_bitmap = gm.inode_bitmaps[g] as u32;
        d.inode_table = gm.inode_tables[g] as u32;
        d.free_blocks = (bpg - set) as u16;
        let first = g as u64 * ipg + 1;
        let used_inodes = (max_ino + 1).saturating_sub(first).min(ipg);
        d.free_inodes = (ipg - used_inodes) as u16;
    }
    for &id in &order {
        if tree.node(id).kind == NodeKind::Directory {
            let g = (u64::from(ino_of[id.0 as usize]) - 1) / ipg;
            descs[g as usize].used_dirs += 1;
        }
    }

    // Block bitmaps, inode bitmaps.
    for g in 0..groups as usize {
        let mut blk = vec![0xffu8; BLOCK_SIZE];
        blk[..group_bytes].copy_from_slice(&bits.0[g * group_bytes..(g + 1) * group_bytes]);
        w.push(gm.block_bitmaps[g], &blk)?;
    }
    for g in 0..groups {
        let mut blk = vec![0xffu8; BLOCK_SIZE];
        blk[..(ipg / 8) as usize].fill(0);
        let first = g * ipg + 1;
        let used_inodes = (max_ino + 1).saturating_sub(first).min(ipg);
        let mut bm = Bitmap(blk);
        bm.set_range(0, used_inodes);
        w.push(gm.inode_bitmaps[g as usize], &bm.0)?;
    }

    // Inode tables: the root (2) and the tree's inodes (11..); blocks left zero are not
    // written.
    let mut ino_pos: Vec<usize> = vec![usize::MAX; max_ino as usize + 1];
    for (pos, &id) in order.iter().enumerate() {
        ino_pos[ino_of[id.0 as usize] as usize] = pos;
    }
    for g in 0..groups {
        let first = g * ipg + 1;
        if first > max_ino {
            break;
        }
        let mut table = vec![0u8; (ipg as usize) * INODE_SIZE];
        let last = (first + ipg - 1).min(max_ino);
        for ino in first..=last {
            let pos = ino_pos[ino as usize];
            if pos == usize::MAX {
                continue;
            }
            let at = (ino - first) as usize * INODE_SIZE;
            encode_inode(
                tree.node(order[pos]),
                &planned[pos],
                subdirs[pos],
                &mut table[at..at + INODE_SIZE],
            );
        }
        for (i, blk) in table.chunks(BLOCK_SIZE).enumerate() {
            if blk.iter().any(|&x| x != 0) {
                w.push(gm.inode_tables[g as usize] + i as u64, blk)?;
            }
        }
    }
    w.flush()?;
    drop(w);

    // Superblock and GDT: block 0 (superblock at 1024) and its copies at the start of the
    // backup groups.
    let free_blocks: u64 = descs.iter().map(|d| u64::from(d.free_blocks)).sum();
    let free_inodes: u64 = descs.iter().map(|d| u64::from(d.free_inodes)).sum();
    let sup = Super {
        inodes_count: inodes_count as u32,
        blocks_count: total as u32,
        free_blocks: free_blocks as u32,
        free_inodes: free_inodes as u32,
        blocks_per_group: bpg as u32,
        inodes_per_group: ipg as u32,
        timestamp: opts.timestamp,
        uuid: opts.uuid,
        label: opts.label.as_bytes(),
        hash_seed: opts.hash_seed,
    };
    let gdt = encode_gdt(&descs);
    for g in (0..groups).filter(|&g| has_super(g)) {
        let mut buf = vec![0u8; BLOCK_SIZE + gdt.len()];
        let at = if g == 0 { 1024 } else { 0 };
        buf[at..at + 1024].copy_from_slice(&sup.encode(g as u16));
        buf[BLOCK_SIZE..].copy_from_slice(&gdt);
        sink.write_blocks(g * bpg, &buf)?;
    }

    Ok(Image {
        sink,
        size_bytes: total * BLOCK_SIZE as u64,
        blocks_count: total,
        inodes_count,
        summary,
    })
}

fn encode_inode(n: &Node, p: &Planned, subdirs: u64, out: &mut [u8]) {
    let perm = n.meta.mode & 0o7777;
    let (mode, size, links, flags) = match &n.body {
        Body::Dir { .. } => {
            let links = 2 + subdirs;
            let links = if links > DIR_LINK_MAX {
                1
            } else {
                links as u16
            };
            (inode::S_IFDIR, p.dir_size, links, inode::EXTENTS_FL)
        }
        Body::File { size, .. } => (inode::S_IFREG, *size, n.links as u16, inode::EXTENTS_FL),
        Body::Symlink(t) => {
            let flags = if t.len() >= 60 { inode::EXTENTS_FL } else { 0 };
            (inode::S_IFLNK, t.len() as u64, n.links as u16, flags)
        }
        Body::Device { .. } => {
            let t = if n.kind == NodeKind::BlockDevice {
                inode::S_IFBLK
            } else {
                inode::S_IFCHR
            };
            (t, 0, n.links as u16, 0)
        }
        Body::Fifo => (inode::S_IFIFO, 0, n.links as u16, 0),
    };
    Inode {
        mode: mode | perm,
        uid: n.meta.uid,
        gid: n.meta.gid,
        size,
        time: n.meta.mtime,
        links,
        blocks: p.blocks,
        flags,
        i_block: p.i_block,
        file_acl: p.file_acl,
        ibody_xattrs: p.ibody.as_deref(),
    }
    .encode(out);
}
