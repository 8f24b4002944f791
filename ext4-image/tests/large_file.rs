//! A file past 4 GiB (i_size_high, an extent tree with a leaf block of 32768-block extents),
//! built through a sink that leaves all-zero blocks unwritten, as a sparse file or an
//! encrypting device that reads unwritten blocks as zeros may.

mod common;

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;

use common::*;
use ext4_image::{BlockSink, Builder, Options, BLOCK_SIZE};

struct SkipZeros(File);

impl BlockSink for SkipZeros {
    fn write_blocks(&mut self, first_block: u64, data: &[u8]) -> std::io::Result<()> {
        static ZEROS: [u8; 1 << 20] = [0; 1 << 20];
        for (i, chunk) in data.chunks(1 << 20).enumerate() {
            // slice equality is a memcmp, fast even in a debug build
            if chunk != &ZEROS[..chunk.len()] {
                let at = first_block + (i * (1 << 20) / BLOCK_SIZE) as u64;
                self.0.write_blocks(at, chunk)?;
            }
        }
        Ok(())
    }
}

#[test]
fn five_gib_file() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("image.ext4");
    let mut b = Builder::new(SkipZeros(File::create(&path).unwrap()), Options::default()).unwrap();
    let size: u64 = (5 << 30) + 12345;
    let tail = pattern(12345, 3);
    let mut w = b
        .create_file(b.root(), b"huge", meta(0o644, 0, 0, 0))
        .unwrap();
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..(5 << 10) {
        w.write_all(&zeros).unwrap();
    }
    w.write_all(&tail).unwrap();
    w.finish().unwrap();
    let img = b.finish().unwrap();
    assert_eq!(img.summary.content_bytes, size);
    img.sink.0.set_len(img.size_bytes).unwrap();
    fsck(&path);

    let m = Mount::new(&path, false);
    let p = m.path().join("huge");
    let st = std::fs::metadata(&p).unwrap();
    assert_eq!(st.size(), size);
    // 512-byte units: the data and one extent leaf block
    assert_eq!(st.blocks(), (size.div_ceil(4096) + 1) * 8);
    let mut f = File::open(&p).unwrap();
    let mut buf = vec![0u8; 12345 + 4096];
    f.seek(SeekFrom::Start(size - buf.len() as u64)).unwrap();
    f.read_exact(&mut buf).unwrap();
    assert!(buf[..4096].iter().all(|&x| x == 0));
    assert_eq!(&buf[4096..], &tail[..]);
}
