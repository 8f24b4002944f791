//! virtio-blk requests: what a guest's descriptor chain asks for, validated, and carried out
//! on a [`BlockDevice`], as a pure function over a description of the chain and an
//! abstraction of guest memory ([`GuestRam`]), so that it can be tested and fuzzed without a
//! VM or a socket.
//!
//! A chain is `header (readable, 16 bytes) | data... | status (writable, 1 byte, last)`.
//! Anything else is refused: with `VIRTIO_BLK_S_IOERR` (or `VIRTIO_BLK_S_UNSUPP` for a
//! request type or flag this device does not do) written to the status byte when the status
//! descriptor itself is sound, or, when it is not (no status descriptor, not writable, not one
//! byte, outside guest memory, or a chain that never ended), returned to the guest with
//! nothing written (used length 0). Nothing here panics on guest input.

use crate::blockstore::BlockDevice;

/// Bytes per virtio-blk sector (whatever the device's block size).
pub const SECTOR: u64 = 512;
/// The request header: type (u32), reserved/ioprio (u32), sector (u64), little-endian.
pub const HEADER_LEN: u32 = 16;
/// Data descriptors one request may have (advertised as `seg_max`).
pub const SEG_MAX: u32 = 254;
/// Bytes one data descriptor may cover (advertised as `size_max`).
pub const SIZE_MAX: u32 = 1 << 20;
/// Sectors one discard segment may cover (`max_discard_sectors`: 1 GiB).
pub const MAX_DISCARD_SECTORS: u32 = 1 << 21;
/// Sectors one write-zeroes segment may cover (`max_write_zeroes_sectors`: 32 MiB; they are
/// written, encrypted, as zeros).
pub const MAX_WRITE_ZEROES_SECTORS: u32 = 1 << 16;
/// Segments one discard or write-zeroes request may carry.
pub const MAX_DISCARD_SEG: u32 = 1;
pub const MAX_WRITE_ZEROES_SEG: u32 = 1;
/// One discard or write-zeroes segment: sector (u64), num_sectors (u32), flags (u32).
const SEGMENT_LEN: usize = 16;
/// `VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP`.
const FLAG_UNMAP: u32 = 1;
/// `VIRTIO_BLK_ID_BYTES`.
pub const ID_BYTES: usize = 20;
/// Descriptors looked at in one chain at most; a longer one is dropped.
pub const MAX_CHAIN: usize = SEG_MAX as usize + 2;

pub const T_IN: u32 = 0;
pub const T_OUT: u32 = 1;
pub const T_FLUSH: u32 = 4;
pub const T_GET_ID: u32 = 8;
pub const T_DISCARD: u32 = 11;
pub const T_WRITE_ZEROES: u32 = 13;

pub const S_OK: u8 = 0;
pub const S_IOERR: u8 = 1;
pub const S_UNSUPP: u8 = 2;

/// One descriptor of a chain as the queue gave it (indirect tables already followed).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Desc {
    pub addr: u64,
    pub len: u32,
    /// Device-writable (`VIRTQ_DESC_F_WRITE`).
    pub writable: bool,
}

/// A descriptor chain: its descriptors in order, and whether it ended properly (its last
/// descriptor had no `NEXT` flag). A chain that loops, is longer than its queue or
/// indirect table or than [`MAX_CHAIN`], points at a descriptor outside guest memory or at a
/// bad indirect table, is not complete.
#[derive(Clone, Debug, Default)]
pub struct Chain {
    pub descs: Vec<Desc>,
    pub complete: bool,
}

/// Guest memory as the device sees it. Every access is checked: an address range not wholly
/// inside guest memory fails.
pub trait GuestRam {
    fn contains(&self, addr: u64, len: u64) -> bool;
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), String>;
    fn write(&self, addr: u64, data: &[u8]) -> Result<(), String>;
}

/// What the device is.
#[derive(Clone, Debug)]
pub struct Geometry {
    /// In 512-byte sectors.
    pub capacity: u64,
    pub read_only: bool,
    /// The `GET_ID` answer (at most [`ID_BYTES`], NUL-padded).
    pub serial: [u8; ID_BYTES],
}

impl Geometry {
    pub fn new(size_bytes: u64, read_only: bool, serial: &str) -> Self {
        let mut id = [0u8; ID_BYTES];
        let n = serial.len().min(ID_BYTES);
        id[..n].copy_from_slice(&serial.as_bytes()[..n]);
        Self {
            capacity: size_bytes / SECTOR,
            read_only,
            serial: id,
        }
    }
}

/// A validated request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    In { sector: u64, data: Vec<Desc> },
    Out { sector: u64, data: Vec<Desc> },
    Flush,
    GetId { data: Desc },
    Discard { sector: u64, sectors: u32 },
    WriteZeroes { sector: u64, sectors: u32 },
}

/// A refused request: the status it completes with and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rejected {
    pub status: u8,
    pub reason: String,
}

fn ioerr(reason: impl Into<String>) -> Rejected {
    Rejected {
        status: S_IOERR,
        reason: reason.into(),
    }
}

fn unsupp(reason: impl Into<String>) -> Rejected {
    Rejected {
        status: S_UNSUPP,
        reason: reason.into(),
    }
}

/// A chain checked: where its status byte goes (None: it cannot be completed with a status,
/// and is returned to the guest with nothing written), and the request or why not.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Parsed {
    pub status: Option<u64>,
    pub op: Result<Op, Rejected>,
}

/// How a chain was completed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Completion {
    /// Bytes written to the chain's writable descriptors (the used ring's length).
    pub used_len: u32,
    /// The status written, None when the chain was dropped (nothing written).
    pub status: Option<u8>,
    /// Why it did not succeed.
    pub error: Option<String>,
}

/// Checks a chain's shape and its request against the device (no device I/O; guest memory is
/// read for the header and discard segments only).
pub fn parse(chain: &Chain, ram: &impl GuestRam, geo: &Geometry) -> Parsed {
    let dropped = |reason: String| Parsed {
        status: None,
        op: Err(ioerr(reason)),
    };
    if !chain.complete {
        return dropped(format!(
            "the descriptor chain does not end within {} descriptors, its queue or its indirect table, or leaves guest memory (a loop, a bad next index, a bad indirect table)",
            MAX_CHAIN
        ));
    }
    let Some(status) = chain.descs.last() else {
        return dropped("an empty descriptor chain".into());
    };
    if !status.writable || status.len != 1 {
        return dropped(format!(
            "the status descriptor (the last) must be device-writable and 1 byte; it is {} and {} bytes",
            if status.writable { "writable" } else { "read-only" },
            status.len
        ));
    }
    if !ram.contains(status.addr, 1) {
        return dropped(format!(
            "the status byte at {:#x} is outside guest memory",
            status.addr
        ));
    }
    let parsed = |op| Parsed {
        status: Some(status.addr),
        op,
    };
    if chain.descs.len() < 2 {
        return parsed(Err(ioerr("a chain without a request header")));
    }
    let header = chain.descs[0];
    if header.writable || header.len != HEADER_LEN {
        return parsed(Err(ioerr(format!(
            "the request header must be a read-only descriptor of {HEADER_LEN} bytes; it is {} and {} bytes",
            if header.writable { "writable" } else { "read-only" },
            header.len
        ))));
    }
    let mut h = [0u8; HEADER_LEN as usize];
    if let Err(e) = ram.read(header.addr, &mut h) {
        return parsed(Err(ioerr(format!("request header: {e}"))));
    }
    let kind = u32::from_le_bytes(h[0..4].try_into().expect("4 bytes"));
    let sector = u64::from_le_bytes(h[8..16].try_into().expect("8 bytes"));
    let data = &chain.descs[1..chain.descs.len() - 1];
    parsed(check(kind, sector, data, ram, geo))
}

fn check(
    kind: u32,
    sector: u64,
    data: &[Desc],
    ram: &impl GuestRam,
    geo: &Geometry,
) -> Result<Op, Rejected> {
    let writes = matches!(kind, T_OUT | T_DISCARD | T_WRITE_ZEROES);
    if writes && geo.read_only {
        return Err(ioerr(format!(
            "request type {kind} writes, and the device is read-only"
        )));
    }
    match kind {
        T_IN | T_OUT => {
            let dir = if kind == T_IN { "IN" } else { "OUT" };
            let total = check_data(data, kind == T_IN, ram, dir)?;
            if total == 0 || total % SECTOR != 0 {
                return Err(ioerr(format!(
                    "{dir}: {total} data bytes, not a positive multiple of {SECTOR}"
                )));
            }
            check_sectors(dir, sector, total / SECTOR, geo)?;
            Ok(if kind == T_IN {
                Op::In {
                    sector,
                    data: data.to_vec(),
                }
            } else {
                Op::Out {
                    sector,
                    data: data.to_vec(),
                }
            })
        }
        T_FLUSH => {
            if !data.is_empty() {
                return Err(ioerr(format!(
                    "FLUSH carries no data; this one has {} data descriptors",
                    data.len()
                )));
            }
            Ok(Op::Flush)
        }
        T_GET_ID => match data {
            [d] if d.writable && d.len > 0 && ram.contains(d.addr, u64::from(d.len)) => {
                Ok(Op::GetId { data: *d })
            }
            _ => Err(ioerr(
                "GET_ID needs one device-writable data descriptor inside guest memory",
            )),
        },
        T_DISCARD | T_WRITE_ZEROES => {
            let discard = kind == T_DISCARD;
            let (name, max_seg, max_sectors) = if discard {
                ("DISCARD", MAX_DISCARD_SEG, MAX_DISCARD_SECTORS)
            } else {
                (
                    "WRITE_ZEROES",
                    MAX_WRITE_ZEROES_SEG,
                    MAX_WRITE_ZEROES_SECTORS,
                )
            };
            let total = check_data(data, false, ram, name)?;
            if total == 0 || total % SEGMENT_LEN as u64 != 0 {
                return Err(ioerr(format!(
                    "{name}: {total} data bytes, not a positive multiple of {SEGMENT_LEN}"
                )));
            }
            if total / SEGMENT_LEN as u64 > u64::from(max_seg) {
                return Err(ioerr(format!(
                    "{name}: {} segments, at most {max_seg}",
                    total / SEGMENT_LEN as u64
                )));
            }
            // One segment (the limit), possibly split over descriptors.
            let mut seg = [0u8; SEGMENT_LEN];
            let mut at = 0;
            for d in data {
                let n = d.len as usize;
                ram.read(d.addr, &mut seg[at..at + n])
                    .map_err(|e| ioerr(format!("{name} segment: {e}")))?;
                at += n;
            }
            let start = u64::from_le_bytes(seg[0..8].try_into().expect("8 bytes"));
            let sectors = u32::from_le_bytes(seg[8..12].try_into().expect("4 bytes"));
            let flags = u32::from_le_bytes(seg[12..16].try_into().expect("4 bytes"));
            let allowed = if discard { 0 } else { FLAG_UNMAP };
            if flags & !allowed != 0 {
                return Err(unsupp(format!("{name}: flags {flags:#x} not supported")));
            }
            if sectors > max_sectors {
                return Err(ioerr(format!(
                    "{name}: {sectors} sectors in a segment, at most {max_sectors}"
                )));
            }
            check_sectors(name, start, u64::from(sectors), geo)?;
            Ok(if discard {
                Op::Discard {
                    sector: start,
                    sectors,
                }
            } else {
                Op::WriteZeroes {
                    sector: start,
                    sectors,
                }
            })
        }
        other => Err(unsupp(format!("request type {other} is not supported"))),
    }
}

/// The data descriptors of a request: all in the given direction, within the segment limits
/// and inside guest memory. Returns their total length.
fn check_data(
    data: &[Desc],
    writable: bool,
    ram: &impl GuestRam,
    what: &str,
) -> Result<u64, Rejected> {
    if data.len() > SEG_MAX as usize {
        return Err(ioerr(format!(
            "{what}: {} data descriptors, at most {SEG_MAX}",
            data.len()
        )));
    }
    let mut total = 0u64;
    for (i, d) in data.iter().enumerate() {
        if d.writable != writable {
            return Err(ioerr(format!(
                "{what}: data descriptor {i} must be device-{}",
                if writable { "writable" } else { "readable" }
            )));
        }
        if d.len > SIZE_MAX {
            return Err(ioerr(format!(
                "{what}: data descriptor {i} has {} bytes, at most {SIZE_MAX}",
                d.len
            )));
        }
        if !ram.contains(d.addr, u64::from(d.len)) {
            return Err(ioerr(format!(
                "{what}: data descriptor {i} ({} bytes at {:#x}) is outside guest memory",
                d.len, d.addr
            )));
        }
        total += u64::from(d.len);
    }
    Ok(total)
}

fn check_sectors(what: &str, sector: u64, count: u64, geo: &Geometry) -> Result<(), Rejected> {
    match sector.checked_add(count) {
        Some(end) if end <= geo.capacity => Ok(()),
        _ => Err(ioerr(format!(
            "{what}: {count} sectors at sector {sector} are past the end of the {}-sector device",
            geo.capacity
        ))),
    }
}

/// Carries out a validated request. Returns the bytes written to the guest's data
/// descriptors.
pub fn execute(
    op: &Op,
    ram: &impl GuestRam,
    dev: &dyn BlockDevice,
    geo: &Geometry,
) -> Result<u32, Rejected> {
    let device = |what: &str, e: std::io::Error| ioerr(format!("{what}: {e}"));
    match op {
        Op::In { sector, data } => {
            let mut offset = sector * SECTOR;
            let mut buf = Vec::new();
            let mut written = 0u32;
            for d in data {
                buf.clear();
                buf.resize(d.len as usize, 0);
                dev.read_at(&mut buf, offset)
                    .map_err(|e| device("read", e))?;
                ram.write(d.addr, &buf).map_err(ioerr)?;
                offset += u64::from(d.len);
                written += d.len;
            }
            buf.fill(0);
            Ok(written)
        }
        Op::Out { sector, data } => {
            let mut offset = sector * SECTOR;
            let mut buf = Vec::new();
            for d in data {
                buf.clear();
                buf.resize(d.len as usize, 0);
                ram.read(d.addr, &mut buf).map_err(ioerr)?;
                dev.write_at(&buf, offset).map_err(|e| device("write", e))?;
                offset += u64::from(d.len);
            }
            buf.fill(0);
            Ok(0)
        }
        Op::Flush => dev.flush().map(|_| 0).map_err(|e| device("flush", e)),
        Op::GetId { data } => {
            let n = (data.len as usize).min(ID_BYTES);
            ram.write(data.addr, &geo.serial[..n]).map_err(ioerr)?;
            Ok(n as u32)
        }
        Op::Discard { sector, sectors } => dev
            .trim(sector * SECTOR, u64::from(*sectors) * SECTOR)
            .map(|_| 0)
            .map_err(|e| device("discard", e)),
        Op::WriteZeroes { sector, sectors } => {
            // Written as zeros (a trimmed clone cluster would read back as the base's data).
            let zeros = vec![0u8; SIZE_MAX as usize];
            let mut offset = sector * SECTOR;
            let end = offset + u64::from(*sectors) * SECTOR;
            while offset < end {
                let n = (end - offset).min(zeros.len() as u64) as usize;
                dev.write_at(&zeros[..n], offset)
                    .map_err(|e| device("write zeroes", e))?;
                offset += n as u64;
            }
            Ok(0)
        }
    }
}

/// Validates and carries out one chain, and writes its status: what the used ring gets.
pub fn process(
    chain: &Chain,
    ram: &impl GuestRam,
    dev: &dyn BlockDevice,
    geo: &Geometry,
) -> Completion {
    let parsed = parse(chain, ram, geo);
    let Some(status_addr) = parsed.status else {
        return Completion {
            used_len: 0,
            status: None,
            error: parsed.op.err().map(|r| r.reason),
        };
    };
    let (status, written, error) = match parsed.op.and_then(|op| execute(&op, ram, dev, geo)) {
        Ok(n) => (S_OK, n, None),
        Err(r) => (r.status, 0, Some(r.reason)),
    };
    match ram.write(status_addr, &[status]) {
        Ok(()) => Completion {
            used_len: written + 1,
            status: Some(status),
            error,
        },
        Err(e) => Completion {
            used_len: 0,
            status: None,
            error: Some(format!("status byte: {e}")),
        },
    }
}

/// Guest memory as a byte vector starting at guest address `base`: for tests and fuzzing.
pub struct VecRam {
    pub base: u64,
    pub bytes: std::sync::Mutex<Vec<u8>>,
}

impl VecRam {
    pub fn new(base: u64, bytes: Vec<u8>) -> Self {
        Self {
            base,
            bytes: std::sync::Mutex::new(bytes),
        }
    }

    fn range(&self, addr: u64, len: usize) -> Result<std::ops::Range<usize>, String> {
        let size = self.bytes.lock().expect("not poisoned").len() as u64;
        let start = addr.checked_sub(self.base);
        match start.and_then(|s| s.checked_add(len as u64).map(|e| (s, e))) {
            Some((s, e)) if e <= size => Ok(s as usize..e as usize),
            _ => Err(format!("{len} bytes at {addr:#x} are outside guest memory")),
        }
    }
}

impl GuestRam for VecRam {
    fn contains(&self, addr: u64, len: u64) -> bool {
        usize::try_from(len).is_ok_and(|len| self.range(addr, len).is_ok())
    }
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), String> {
        let r = self.range(addr, buf.len())?;
        buf.copy_from_slice(&self.bytes.lock().expect("not poisoned")[r]);
        Ok(())
    }
    fn write(&self, addr: u64, data: &[u8]) -> Result<(), String> {
        let r = self.range(addr, data.len())?;
        self.bytes.lock().expect("not poisoned")[r].copy_from_slice(data);
        Ok(())
    }
}
