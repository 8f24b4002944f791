//! What the builder asks of its sink: whole blocks, each at most once, in large runs.

mod common;

use std::fs::File;

use common::*;
use ext4_image::{BlockSink, Builder, Options, BLOCK_SIZE};

/// Writes through to a file and records every call.
struct Recorder {
    file: File,
    calls: Vec<(u64, usize)>,
}

impl BlockSink for Recorder {
    fn write_blocks(&mut self, first_block: u64, data: &[u8]) -> std::io::Result<()> {
        self.calls.push((first_block, data.len()));
        self.file.write_blocks(first_block, data)
    }
}

fn check_calls(calls: &[(u64, usize)], blocks_count: u64) {
    let mut seen = std::collections::BTreeMap::new();
    for &(first, len) in calls {
        assert!(len > 0 && len % BLOCK_SIZE == 0, "length {len}");
        assert!(len <= 1 << 20, "a call of {len} bytes");
        let n = (len / BLOCK_SIZE) as u64;
        assert!(first + n <= blocks_count, "write past the end");
        // no overlap with any earlier range
        if let Some((&s, &l)) = seen.range(..first + n).next_back() {
            assert!(
                s + l <= first || s >= first + n,
                "blocks {first}+{n} written twice"
            );
        }
        seen.insert(first, n);
    }
}

#[test]
fn whole_blocks_each_once_in_large_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("image.ext4");
    let rec = Recorder {
        file: File::create(&path).unwrap(),
        calls: Vec::new(),
    };
    let opts = Options {
        blocks_per_group: 512,
        max_bytes: 1 << 30,
        free_bytes: 3 << 20,
        free_inodes: 100,
        ..Options::default()
    };
    let mut b = Builder::new(rec, opts).unwrap();
    let mut entries = vec![
        entry(
            "big",
            meta(0o644, 0, 0, 0),
            Content::File(pattern(10 << 20, 1)),
        ),
        entry("d", meta(0o755, 0, 0, 0), Content::Dir),
    ];
    for i in 0..500 {
        entries.push(entry(
            &format!("d/f{i}"),
            meta(0o644, 0, 0, 0),
            Content::File(pattern(i * 37, i)),
        ));
    }
    entries.push(entry(
        "removed",
        meta(0o644, 0, 0, 0),
        Content::File(pattern(2 << 20, 2)),
    ));
    build_into(&mut b, &entries);
    b.remove(b.root(), b"removed").unwrap();
    entries.pop();
    let img = b.finish().unwrap();
    img.sink.file.set_len(img.size_bytes).unwrap();
    let calls = &img.sink.calls;
    check_calls(calls, img.blocks_count);
    // The 10 MiB file goes in runs of 1 MiB, split where a backup superblock area lies;
    // the 500 small files share runs of up to 1 MiB; the metadata is written in a few runs
    // plus a superblock copy per backup group: a few dozen calls in all.
    assert!(calls.len() < 40, "{} calls: {calls:?}", calls.len());
    let in_large: usize = calls.iter().filter(|c| c.1 >= 1 << 18).map(|c| c.1).sum();
    let all: usize = calls.iter().map(|c| c.1).sum();
    assert!(in_large * 10 >= all * 9, "{calls:?}");
    fsck(&path);
    let m = Mount::new(&path, false);
    compare(m.path(), &entries);
}

/// A file written in pieces of every size around a block (as a tar stream hands them over)
/// still reaches the sink in runs of up to 1 MiB, a file written at once in runs of at most
/// 1 MiB, and both read back whole.
#[test]
fn small_uneven_writes_are_joined_into_large_runs() {
    use std::io::Write;
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("image.ext4");
    let rec = Recorder {
        file: File::create(&path).unwrap(),
        calls: Vec::new(),
    };
    let mut b = Builder::new(rec, Options::default()).unwrap();
    let data = pattern((3 << 20) + 333, 7);
    let mut w = b
        .create_file(b.root(), b"pieces", meta(0o644, 0, 0, 0))
        .unwrap();
    let (mut at, mut sizes) = (0, [1, 3, 4095, 4097, 10_000, 65_541, 4096].iter().cycle());
    while at < data.len() {
        let n = (*sizes.next().unwrap()).min(data.len() - at);
        w.write_all(&data[at..at + n]).unwrap();
        at += n;
    }
    w.finish().unwrap();
    // And one write of 5 MiB: still calls of at most 1 MiB (`check_calls`).
    let big = pattern((5 << 20) + 7, 8);
    let mut w = b
        .create_file(b.root(), b"big", meta(0o644, 0, 0, 0))
        .unwrap();
    w.write_all(&big).unwrap();
    w.finish().unwrap();
    let entries = vec![
        entry("pieces", meta(0o644, 0, 0, 0), Content::File(data)),
        entry("big", meta(0o644, 0, 0, 0), Content::File(big)),
    ];
    let img = b.finish().unwrap();
    img.sink.file.set_len(img.size_bytes).unwrap();
    check_calls(&img.sink.calls, img.blocks_count);
    // Runs of nearly 1 MiB carry the content (a run ends where the next piece would take it
    // past 1 MiB): three for the pieces, five for the big file; the rest are tails and the
    // metadata.
    let calls = &img.sink.calls;
    let large = calls.iter().filter(|c| c.1 >= 900 << 10).count();
    assert!(large == 8 && calls.len() <= 14, "{calls:?}");
    fsck(&path);
    let m = Mount::new(&path, false);
    compare(m.path(), &entries);
}
