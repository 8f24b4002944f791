//! The vhost-user-blk request validation and execution (`export::vhost::request::process`) on
//! arbitrary descriptor chains and guest memory, over an in-memory device: never panics,
//! never asks the device for bytes outside its range, never writes on a read-only device,
//! completes a dropped chain with nothing written, and completes every other one with a
//! status byte in its last descriptor.
//!
//! Input: a flags byte (bit 0 read-only, bit 1 chain complete), the number of descriptors
//! (mod 8), then per descriptor 7 bytes (address u32 LE, length u16 LE, writable bit), then
//! guest memory (at guest address 0x1000, at most 64 KiB). The device has 64 sectors.
#![no_main]

use std::io;
use std::sync::Mutex;

use ipu_image_svc::blockstore::BlockDevice;
use ipu_image_svc::export::vhost::request::{self, Chain, Desc, Geometry, VecRam};
use libfuzzer_sys::fuzz_target;

const GUEST_BASE: u64 = 0x1000;

struct Memory {
    bytes: Mutex<Vec<u8>>,
    read_only: bool,
}

impl Memory {
    fn range(&self, offset: u64, len: usize) -> std::ops::Range<usize> {
        let size = self.bytes.lock().unwrap().len() as u64;
        match offset.checked_add(len as u64) {
            Some(end) if end <= size => offset as usize..end as usize,
            _ => panic!("the request asked for {len} bytes at {offset} of a {size}-byte device"),
        }
    }
}

impl BlockDevice for Memory {
    fn size(&self) -> u64 {
        self.bytes.lock().unwrap().len() as u64
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let r = self.range(offset, buf.len());
        buf.copy_from_slice(&self.bytes.lock().unwrap()[r]);
        Ok(())
    }
    fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        assert!(!self.read_only, "a write reached a read-only device");
        let r = self.range(offset, data.len());
        self.bytes.lock().unwrap()[r].copy_from_slice(data);
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
    fn trim(&self, offset: u64, len: u64) -> io::Result<()> {
        assert!(!self.read_only, "a discard reached a read-only device");
        self.range(offset, len as usize);
        Ok(())
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&flags, rest)) = data.split_first() else {
        return;
    };
    let Some((&n, mut rest)) = rest.split_first() else {
        return;
    };
    let mut descs = Vec::new();
    for _ in 0..n % 8 {
        if rest.len() < 7 {
            return;
        }
        descs.push(Desc {
            addr: u64::from(u32::from_le_bytes(rest[0..4].try_into().unwrap())),
            len: u32::from(u16::from_le_bytes(rest[4..6].try_into().unwrap())),
            writable: rest[6] & 1 != 0,
        });
        rest = &rest[7..];
    }
    let read_only = flags & 1 != 0;
    let chain = Chain {
        descs,
        complete: flags & 2 != 0,
    };
    let ram = VecRam::new(GUEST_BASE, rest[..rest.len().min(64 << 10)].to_vec());
    let before = ram.bytes.lock().unwrap().clone();
    let dev = Memory {
        bytes: Mutex::new(vec![0x5a; 64 * 512]),
        read_only,
    };
    let geo = Geometry::new(dev.size(), read_only, "fuzz");
    let done = request::process(&chain, &ram, &dev, &geo);
    match done.status {
        None => {
            assert_eq!(done.used_len, 0);
            assert_eq!(*ram.bytes.lock().unwrap(), before, "a dropped chain wrote guest memory");
        }
        Some(status) => {
            assert!(done.used_len >= 1);
            assert!(matches!(status, request::S_OK | request::S_IOERR | request::S_UNSUPP));
            assert_eq!(status == request::S_OK, done.error.is_none());
            let last = chain.descs.last().expect("a status descriptor");
            assert!(chain.complete && last.writable && last.len == 1);
            let at = (last.addr - GUEST_BASE) as usize;
            assert_eq!(ram.bytes.lock().unwrap()[at], status);
        }
    }
});
