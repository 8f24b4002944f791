//! The vhost-user-blk export driven by a real vhost-user front-end (the `vhost` crate's
//! frontend, as QEMU would: guest memory in a memfd shared over the socket, split virtqueues
//! laid out and kicked by hand), so that tests can send exactly the chains a hostile guest
//! would. The device behind it is a real clone of a real encrypted base.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ipu_image_svc::blockstore::base::BaseImage;
use ipu_image_svc::blockstore::clone::CloneDevice;
use ipu_image_svc::blockstore::xts::XtsKey;
use ipu_image_svc::blockstore::{BlockDevice, CLUSTER};
use ipu_image_svc::export::vhost::{VhostEvent, VhostOptions, VhostUserBlkExport};
use vhost::vhost_user::message::{VhostUserConfigFlags, VhostUserProtocolFeatures};
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

const GUEST_MEM: usize = 8 << 20;
const QSIZE: u16 = 64;
const HDR: u64 = 0x10_0000;
const STATUS: u64 = 0x18_0000;
const DATA: u64 = 0x20_0000;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;
const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const T_DISCARD: u32 = 11;
const T_WRITE_ZEROES: u32 = 13;
const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;
/// The status byte's value before the device writes it.
const UNTOUCHED: u8 = 0xee;

fn dir() -> tempfile::TempDir {
    // Unix socket paths are short: not under the (long) target directory.
    tempfile::Builder::new()
        .prefix("vub")
        .tempdir_in("/tmp")
        .unwrap()
}

/// A base (4 MiB of pseudo-random plaintext, encrypted at rest) and that plaintext.
fn base(dir: &Path) -> (Arc<BaseImage>, Vec<u8>) {
    let mut plain = vec![0u8; 4 << 20];
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for chunk in plain.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    std::fs::write(dir.join("plain.img"), &plain).unwrap();
    let base = BaseImage::build(
        &dir.join("plain.img"),
        &dir.join("base.img"),
        XtsKey::generate().unwrap(),
    )
    .unwrap();
    (Arc::new(base), plain)
}

struct Fixture {
    dir: tempfile::TempDir,
    clone: Arc<CloneDevice>,
    plain: Vec<u8>,
    export: VhostUserBlkExport,
    events: Arc<Mutex<Vec<VhostEvent>>>,
}

fn export(name: &str, opts: VhostOptions) -> Fixture {
    let _ = tracing_subscriber::fmt().with_test_writer().try_init();
    let dir = dir();
    let (base, plain) = base(dir.path());
    let clone = Arc::new(CloneDevice::create(base, dir.path(), name, 0).unwrap());
    let events = Arc::new(Mutex::new(Vec::new()));
    let seen = events.clone();
    let export = VhostUserBlkExport::unix(
        name,
        clone.clone(),
        &dir.path().join("vhost.sock"),
        0,
        opts,
        Some(Box::new(move |e: &VhostEvent| {
            seen.lock().unwrap().push(e.clone())
        })),
    )
    .unwrap();
    Fixture {
        dir,
        clone,
        plain,
        export,
        events,
    }
}

impl Fixture {
    fn socket(&self) -> PathBuf {
        self.dir.path().join("vhost.sock")
    }
}

struct Queue {
    kick: EventFd,
    _call: EventFd,
    desc: u64,
    avail: u64,
    used: u64,
    avail_idx: u16,
    used_idx: u16,
}

/// A vhost-user front-end with its guest memory.
struct Front {
    fe: Frontend,
    mem: GuestMemoryMmap,
    features: u64,
    queues: Vec<Queue>,
}

#[derive(Clone, Copy)]
struct Raw {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

fn raw(addr: u64, len: u32, flags: u16) -> Raw {
    Raw {
        addr,
        len,
        flags,
        next: 0,
    }
}

/// A chain in order: each but the last gets NEXT to the following one.
fn chain(parts: &[(u64, u32, bool)]) -> Vec<Raw> {
    let n = parts.len();
    parts
        .iter()
        .enumerate()
        .map(|(i, &(addr, len, writable))| Raw {
            addr,
            len,
            flags: if writable { F_WRITE } else { 0 } | if i + 1 < n { F_NEXT } else { 0 },
            next: (i + 1) as u16,
        })
        .collect()
}

impl Front {
    fn connect(path: &Path, num_queues: usize) -> Self {
        let memfd: File = rustix::fs::memfd_create("guest", rustix::fs::MemfdFlags::CLOEXEC)
            .unwrap()
            .into();
        memfd.set_len(GUEST_MEM as u64).unwrap();
        let mem = GuestMemoryMmap::<()>::from_ranges_with_files([(
            GuestAddress(0),
            GUEST_MEM,
            Some(FileOffset::new(memfd, 0)),
        )])
        .unwrap();
        let region = mem.iter().next().unwrap();
        let info = VhostUserMemoryRegionInfo::from_guest_region(region).unwrap();
        let uaddr = info.userspace_addr;
        let mut fe = Frontend::connect(path, num_queues as u64).unwrap();
        fe.set_owner().unwrap();
        let features = fe.get_features().unwrap();
        fe.set_features(features).unwrap();
        let pf = fe.get_protocol_features().unwrap();
        assert!(pf.contains(VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::MQ));
        fe.set_protocol_features(VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::MQ)
            .unwrap();
        assert_eq!(fe.get_queue_num().unwrap(), num_queues as u64);
        fe.set_mem_table(&[info]).unwrap();
        let mut queues = Vec::new();
        for q in 0..num_queues {
            let base = 0x1000 + q as u64 * 0x4000;
            let (desc, avail, used) = (base, base + 0x1000, base + 0x2000);
            let kick = EventFd::new(0).unwrap();
            let call = EventFd::new(0).unwrap();
            fe.set_vring_num(q, QSIZE).unwrap();
            fe.set_vring_addr(
                q,
                &VringConfigData {
                    queue_max_size: QSIZE,
                    queue_size: QSIZE,
                    flags: 0,
                    desc_table_addr: uaddr + desc,
                    used_ring_addr: uaddr + used,
                    avail_ring_addr: uaddr + avail,
                    log_addr: None,
                },
            )
            .unwrap();
            fe.set_vring_base(q, 0).unwrap();
            fe.set_vring_call(q, &call).unwrap();
            fe.set_vring_kick(q, &kick).unwrap();
            fe.set_vring_enable(q, true).unwrap();
            queues.push(Queue {
                kick,
                _call: call,
                desc,
                avail,
                used,
                avail_idx: 0,
                used_idx: 0,
            });
        }
        Self {
            fe,
            mem,
            features,
            queues,
        }
    }

    fn config(&mut self) -> Vec<u8> {
        let (_, payload) = self
            .fe
            .get_config(0, 60, VhostUserConfigFlags::WRITABLE, &[0u8; 60])
            .unwrap();
        payload.to_vec()
    }

    /// Puts `table` in queue `q`'s descriptor table, makes `head` available, kicks, and
    /// waits for the used ring: Some((id, len)), or None when nothing was completed in time.
    fn submit(&mut self, q: usize, table: &[Raw], head: u16, wait: Duration) -> Option<(u32, u32)> {
        let queue = &mut self.queues[q];
        for (i, d) in table.iter().enumerate() {
            let at = queue.desc + 16 * i as u64;
            self.mem.write_obj(d.addr, GuestAddress(at)).unwrap();
            self.mem.write_obj(d.len, GuestAddress(at + 8)).unwrap();
            self.mem.write_obj(d.flags, GuestAddress(at + 12)).unwrap();
            self.mem.write_obj(d.next, GuestAddress(at + 14)).unwrap();
        }
        let slot = queue.avail + 4 + 2 * u64::from(queue.avail_idx % QSIZE);
        self.mem.write_obj(head, GuestAddress(slot)).unwrap();
        queue.avail_idx = queue.avail_idx.wrapping_add(1);
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        self.mem
            .write_obj(queue.avail_idx, GuestAddress(queue.avail + 2))
            .unwrap();
        queue.kick.write(1).unwrap();
        let deadline = Instant::now() + wait;
        loop {
            let idx: u16 = self.mem.read_obj(GuestAddress(queue.used + 2)).unwrap();
            if idx != queue.used_idx {
                let elem = queue.used + 4 + 8 * u64::from(queue.used_idx % QSIZE);
                queue.used_idx = queue.used_idx.wrapping_add(1);
                let id: u32 = self.mem.read_obj(GuestAddress(elem)).unwrap();
                let len: u32 = self.mem.read_obj(GuestAddress(elem + 4)).unwrap();
                return Some((id, len));
            }
            if Instant::now() > deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    fn header(&self, kind: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        self.mem.write_slice(&h, GuestAddress(HDR)).unwrap();
        self.mem.write_obj(UNTOUCHED, GuestAddress(STATUS)).unwrap();
    }

    fn status(&self) -> u8 {
        self.mem.read_obj(GuestAddress(STATUS)).unwrap()
    }

    /// A chain of header, data (if any), status; returns (status byte, used length).
    fn request(
        &mut self,
        q: usize,
        kind: u32,
        sector: u64,
        data: Option<(u32, bool)>,
    ) -> (u8, u32) {
        self.header(kind, sector);
        let mut parts = vec![(HDR, 16, false)];
        if let Some((len, writable)) = data {
            parts.push((DATA, len, writable));
        }
        parts.push((STATUS, 1, true));
        let (id, len) = self
            .submit(q, &chain(&parts), 0, Duration::from_secs(10))
            .expect("completed");
        assert_eq!(id, 0);
        (self.status(), len)
    }

    fn read(&mut self, q: usize, sector: u64, len: usize) -> (u8, Vec<u8>) {
        self.mem
            .write_slice(&vec![0xaa; len], GuestAddress(DATA))
            .unwrap();
        let (status, used) = self.request(q, T_IN, sector, Some((len as u32, true)));
        if status == S_OK {
            assert_eq!(used as usize, len + 1);
        }
        let mut out = vec![0u8; len];
        self.mem.read_slice(&mut out, GuestAddress(DATA)).unwrap();
        (status, out)
    }

    fn write(&mut self, q: usize, sector: u64, data: &[u8]) -> u8 {
        self.mem.write_slice(data, GuestAddress(DATA)).unwrap();
        let (status, used) = self.request(q, T_OUT, sector, Some((data.len() as u32, false)));
        assert_eq!(used, 1);
        status
    }

    fn segment(&mut self, q: usize, kind: u32, sector: u64, sectors: u32, flags: u32) -> u8 {
        let mut seg = [0u8; 16];
        seg[0..8].copy_from_slice(&sector.to_le_bytes());
        seg[8..12].copy_from_slice(&sectors.to_le_bytes());
        seg[12..16].copy_from_slice(&flags.to_le_bytes());
        self.mem.write_slice(&seg, GuestAddress(DATA)).unwrap();
        self.request(q, kind, 0, Some((16, false))).0
    }
}

fn bit(features: u64, b: u32) -> bool {
    features & (1 << b) != 0
}

#[test]
fn reads_writes_flush_discard_and_write_zeroes_through_a_vhost_user_front_end() {
    let f = export(
        "fn-a",
        VhostOptions {
            serial: "clone-serial-0123456789".into(),
            ..VhostOptions::default()
        },
    );
    let mut fe = Front::connect(&f.socket(), 2);
    let size = f.clone.size();
    // Features and the configuration space.
    for b in [9, 12, 13, 14, 1, 2, 6] {
        assert!(bit(fe.features, b), "feature bit {b} offered");
    }
    assert!(!bit(fe.features, 5), "not read-only");
    let cfg = fe.config();
    assert_eq!(
        u64::from_le_bytes(cfg[0..8].try_into().unwrap()),
        size / 512
    );
    assert_eq!(u32::from_le_bytes(cfg[20..24].try_into().unwrap()), 512);
    assert_eq!(u16::from_le_bytes(cfg[34..36].try_into().unwrap()), 2);
    assert!(u32::from_le_bytes(cfg[12..16].try_into().unwrap()) >= 1);

    // The image's bytes, on both queues.
    let (s, got) = fe.read(0, 0, 4096);
    assert_eq!(s, S_OK);
    assert_eq!(got, f.plain[..4096]);
    let (s, got) = fe.read(1, 2048, 64 * 1024);
    assert_eq!(s, S_OK);
    assert_eq!(got, f.plain[1 << 20..(1 << 20) + 64 * 1024]);
    // The last sector.
    let last = size / 512 - 1;
    let (s, got) = fe.read(0, last, 512);
    assert_eq!(s, S_OK);
    assert_eq!(got, f.plain[(last * 512) as usize..]);

    // Write, read back on the other queue and from the clone itself.
    let data: Vec<u8> = (0..8192u32).map(|i| (i * 7) as u8).collect();
    assert_eq!(fe.write(0, 100, &data), S_OK);
    let (s, got) = fe.read(1, 100, 8192);
    assert_eq!((s, &got), (S_OK, &data));
    let mut direct = vec![0u8; 8192];
    f.clone.read_at(&mut direct, 100 * 512).unwrap();
    assert_eq!(direct, data);
    assert_eq!(fe.request(0, T_FLUSH, 0, None), (S_OK, 1));

    // Write zeroes: zeros, not the base's data.
    assert_eq!(fe.segment(0, T_WRITE_ZEROES, 100, 16, 0), S_OK);
    let (s, got) = fe.read(0, 100, 8192);
    assert_eq!(s, S_OK);
    assert!(got.iter().all(|b| *b == 0));
    // Discard of a written cluster: it falls back to the base.
    let c = CLUSTER / 512;
    assert_eq!(fe.write(1, 4 * c, &vec![0x55; CLUSTER as usize]), S_OK);
    assert_eq!(fe.segment(1, T_DISCARD, 4 * c, c as u32, 0), S_OK);
    let (s, got) = fe.read(1, 4 * c, CLUSTER as usize);
    assert_eq!(s, S_OK);
    assert_eq!(got, f.plain[(4 * CLUSTER) as usize..(5 * CLUSTER) as usize]);
    // Discard with a flag it does not know, write zeroes past the end.
    assert_eq!(fe.segment(1, T_DISCARD, 0, 8, 1), S_UNSUPP);
    assert_eq!(fe.segment(1, T_WRITE_ZEROES, last, 2, 0), S_IOERR);

    // GET_ID.
    let (s, used) = fe.request(0, T_GET_ID, 0, Some((20, true)));
    assert_eq!((s, used), (S_OK, 21));
    let mut id = [0u8; 20];
    fe.mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id, b"clone-serial-0123456");
    // A request type it does not do (SCSI).
    assert_eq!(fe.request(0, 2, 0, None).0, S_UNSUPP);
    // A write past the capacity, and one that overflows the sector arithmetic.
    assert_eq!(fe.write(0, last, &[1u8; 1024]), S_IOERR);
    assert_eq!(fe.write(0, u64::MAX - 1, &[1u8; 1024]), S_IOERR);
    assert_eq!(fe.read(0, last + 1, 512).0, S_IOERR);
    assert!(f.export.completed_requests() >= 12);
    assert_eq!(f.export.connections(), 1);
    assert!(matches!(
        f.events.lock().unwrap()[0],
        VhostEvent::Connected { uid: 0 }
    ));
}

#[test]
fn read_only_exports_refuse_writes_discards_and_zeroes() {
    let f = export(
        "fn-ro",
        VhostOptions {
            read_only: true,
            num_queues: 1,
            ..VhostOptions::default()
        },
    );
    let mut fe = Front::connect(&f.socket(), 1);
    assert!(bit(fe.features, 5), "VIRTIO_BLK_F_RO offered");
    assert_eq!(fe.write(0, 0, &[0u8; 512]), S_IOERR);
    assert_eq!(fe.segment(0, T_DISCARD, 0, 8, 0), S_IOERR);
    assert_eq!(fe.segment(0, T_WRITE_ZEROES, 0, 8, 0), S_IOERR);
    let (s, got) = fe.read(0, 0, 4096);
    assert_eq!(s, S_OK);
    assert_eq!(got, f.plain[..4096], "nothing was written");
}

#[test]
fn malformed_chains_are_refused_and_every_backend_keeps_serving() {
    let a = export("fn-hostile", VhostOptions::default());
    let b = export("fn-other", VhostOptions::default());
    let mut fa = Front::connect(&a.socket(), 2);
    let mut fb = Front::connect(&b.socket(), 2);
    let wait = Duration::from_secs(10);
    let io = |fa: &mut Front, table: &[Raw]| {
        fa.header(T_IN, 0);
        let done = fa.submit(0, table, 0, wait).expect("completed");
        (fa.status(), done.1)
    };

    // A data descriptor outside guest memory.
    let out_of_memory = chain(&[
        (HDR, 16, false),
        (0xffff_0000_0000, 4096, true),
        (STATUS, 1, true),
    ]);
    assert_eq!(io(&mut fa, &out_of_memory), (S_IOERR, 1));
    // A data descriptor that straddles the end of guest memory.
    let straddles = chain(&[
        (HDR, 16, false),
        (GUEST_MEM as u64 - 512, 1024, true),
        (STATUS, 1, true),
    ]);
    assert_eq!(io(&mut fa, &straddles), (S_IOERR, 1));
    // A header outside guest memory, and one too short.
    let far_header = chain(&[
        (0xdead_0000_0000, 16, false),
        (DATA, 512, true),
        (STATUS, 1, true),
    ]);
    assert_eq!(io(&mut fa, &far_header), (S_IOERR, 1));
    let short_header = chain(&[(HDR, 8, false), (DATA, 512, true), (STATUS, 1, true)]);
    assert_eq!(io(&mut fa, &short_header), (S_IOERR, 1));
    // A writable header, a read-only data descriptor for IN, a length not of whole sectors.
    let writable_header = chain(&[(HDR, 16, true), (DATA, 512, true), (STATUS, 1, true)]);
    assert_eq!(io(&mut fa, &writable_header), (S_IOERR, 1));
    let readonly_data = chain(&[(HDR, 16, false), (DATA, 512, false), (STATUS, 1, true)]);
    assert_eq!(io(&mut fa, &readonly_data), (S_IOERR, 1));
    let partial_sector = chain(&[(HDR, 16, false), (DATA, 500, true), (STATUS, 1, true)]);
    assert_eq!(io(&mut fa, &partial_sector), (S_IOERR, 1));
    // A status descriptor that is not writable, or not last (a chain ending in data): the
    // chain is returned with nothing written.
    let readonly_status = chain(&[(HDR, 16, false), (DATA, 512, true), (STATUS, 1, false)]);
    assert_eq!(io(&mut fa, &readonly_status), (UNTOUCHED, 0));
    let status_first = chain(&[(STATUS, 1, true), (HDR, 16, false), (DATA, 512, true)]);
    assert_eq!(io(&mut fa, &status_first), (UNTOUCHED, 0));
    // A status byte outside guest memory.
    let far_status = chain(&[
        (HDR, 16, false),
        (DATA, 512, true),
        (GUEST_MEM as u64, 1, true),
    ]);
    assert_eq!(io(&mut fa, &far_status), (UNTOUCHED, 0));
    // A loop (0 -> 1 -> 0).
    let mut looped = chain(&[(HDR, 16, false), (DATA, 512, true)]);
    looped[1].flags |= F_NEXT;
    looped[1].next = 0;
    assert_eq!(io(&mut fa, &looped), (UNTOUCHED, 0));
    // A chain longer than the queue: every descriptor has NEXT, the last points past it.
    let mut long: Vec<Raw> = (0..QSIZE)
        .map(|i| Raw {
            addr: DATA,
            len: 512,
            flags: F_WRITE | F_NEXT,
            next: i + 1,
        })
        .collect();
    long[0] = Raw {
        addr: HDR,
        len: 16,
        flags: F_NEXT,
        next: 1,
    };
    assert_eq!(io(&mut fa, &long), (UNTOUCHED, 0));
    // An indirect table outside guest memory, and one that loops.
    let far_indirect = [raw(0xbeef_0000_0000, 48, F_INDIRECT)];
    assert_eq!(io(&mut fa, &far_indirect), (UNTOUCHED, 0));
    let table = 0x30_0000u64;
    for (i, d) in [(HDR, 16u32, F_NEXT, 1u16), (DATA, 512, F_WRITE | F_NEXT, 0)]
        .iter()
        .enumerate()
    {
        let at = GuestAddress(table + 16 * i as u64);
        fa.mem.write_obj(d.0, at).unwrap();
        fa.mem.write_obj(d.1, GuestAddress(at.0 + 8)).unwrap();
        fa.mem.write_obj(d.2, GuestAddress(at.0 + 12)).unwrap();
        fa.mem.write_obj(d.3, GuestAddress(at.0 + 14)).unwrap();
    }
    assert_eq!(io(&mut fa, &[raw(table, 32, F_INDIRECT)]), (UNTOUCHED, 0));
    // A head index past the queue: the queue is not served, the device goes on.
    fa.header(T_IN, 0);
    assert_eq!(
        fa.submit(0, &[], QSIZE + 3, Duration::from_millis(500)),
        None
    );
    assert!(a.export.rejected_requests() >= 14);

    // Positive controls: the hostile guest's other queue, and another function's device.
    let (s, got) = fa.read(1, 0, 4096);
    assert_eq!((s, &got[..]), (S_OK, &a.plain[..4096]));
    let (s, got) = fb.read(0, 8, 4096);
    assert_eq!((s, &got[..]), (S_OK, &b.plain[4096..8192]));
    assert_eq!(b.export.rejected_requests(), 0);
    // An indirect chain done right is served.
    let good = 0x31_0000u64;
    for (i, d) in [
        (HDR, 16u32, F_NEXT, 1u16),
        (DATA, 512, F_WRITE | F_NEXT, 2),
        (STATUS, 1, F_WRITE, 0),
    ]
    .iter()
    .enumerate()
    {
        let at = GuestAddress(good + 16 * i as u64);
        fb.mem.write_obj(d.0, at).unwrap();
        fb.mem.write_obj(d.1, GuestAddress(at.0 + 8)).unwrap();
        fb.mem.write_obj(d.2, GuestAddress(at.0 + 12)).unwrap();
        fb.mem.write_obj(d.3, GuestAddress(at.0 + 14)).unwrap();
    }
    fb.header(T_IN, 0);
    let done = fb.submit(1, &[raw(good, 48, F_INDIRECT)], 0, wait);
    assert_eq!((fb.status(), done), (S_OK, Some((0, 513))));
}

/// Run as another uid by `a_socket_opened_by_another_uid_is_refused`: connects to the
/// socket in VHOST_PEER_SOCKET, sends GET_FEATURES, and prints what happened.
#[test]
fn peer_helper() {
    let Ok(path) = std::env::var("VHOST_PEER_SOCKET") else {
        return;
    };
    let result = match UnixStream::connect(&path) {
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => "connect: EACCES".to_string(),
        Err(e) => format!("connect: {e}"),
        Ok(mut s) => {
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            // GET_FEATURES, version 1.
            let _ = s.write_all(&[1, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0]);
            let mut buf = [0u8; 64];
            match s.read(&mut buf) {
                Ok(0) => "closed".to_string(),
                // Closed with the request unread.
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => "closed".to_string(),
                Ok(n) => format!("answered {n} bytes"),
                Err(e) => format!("read: {e}"),
            }
        }
    };
    println!("PEER-RESULT: {result}");
}

fn as_nobody(socket: &Path) -> String {
    use std::os::unix::process::CommandExt;
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "peer_helper", "--nocapture", "--test-threads=1"])
        .env("VHOST_PEER_SOCKET", socket)
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    stdout
        .lines()
        .find_map(|l| l.split_once("PEER-RESULT: ").map(|(_, r)| r))
        .unwrap_or_else(|| {
            panic!(
                "helper said: {stdout} {}",
                String::from_utf8_lossy(&out.stderr)
            )
        })
        .to_string()
}

#[test]
fn a_socket_opened_by_another_uid_is_refused() {
    let f = export("fn-uid", VhostOptions::default());
    // The helper binary must be reachable by nobody.
    let exe = std::env::current_exe().unwrap();
    let reachable = exe.ancestors().skip(1).all(|d| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(d).is_ok_and(|m| m.permissions().mode() & 0o001 != 0)
    });
    if !reachable {
        eprintln!("skipped: the test binary is not reachable by nobody");
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(f.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    // The kernel refuses: the socket is 0600 and the host agent's.
    assert_eq!(as_nobody(&f.socket()), "connect: EACCES");
    // With the socket's mode opened up (a mistake elsewhere), the service still refuses it.
    std::fs::set_permissions(f.socket(), std::fs::Permissions::from_mode(0o666)).unwrap();
    assert_eq!(as_nobody(&f.socket()), "closed");
    assert_eq!(f.export.refused(), 1);
    assert_eq!(f.export.connections(), 0);
    assert!(f.events.lock().unwrap().contains(&VhostEvent::Refused {
        uid: Some(65534),
        refusals: 1
    }));
    // Positive control: the host agent's uid (root here) is served.
    let mut fe = Front::connect(&f.socket(), 2);
    assert_eq!(fe.read(0, 0, 512), (S_OK, f.plain[..512].to_vec()));
}

#[test]
fn after_revoke_the_socket_is_gone_and_io_fails() {
    let mut f = export("fn-revoke", VhostOptions::default());
    let other = export("fn-stays", VhostOptions::default());
    let mut fe = Front::connect(&f.socket(), 2);
    let mut fo = Front::connect(&other.socket(), 2);
    assert_eq!(fe.read(0, 0, 512).0, S_OK);
    f.export.revoke();
    assert!(!f.socket().exists(), "the socket is removed");
    assert!(
        UnixStream::connect(f.socket()).is_err(),
        "no new connection"
    );
    // The open connection is shut ...
    assert!(
        fe.fe.get_features().is_err(),
        "the control connection is closed"
    );
    // ... and a request kicked now does not succeed.
    fe.header(T_IN, 0);
    let table = chain(&[(HDR, 16, false), (DATA, 512, true), (STATUS, 1, true)]);
    let done = fe.submit(1, &table, 0, Duration::from_secs(1));
    assert!(
        done.is_none() || fe.status() == S_IOERR,
        "a request after revocation failed: {done:?}, status {}",
        fe.status()
    );
    f.export.revoke();
    assert!(f
        .events
        .lock()
        .unwrap()
        .iter()
        .any(|e| matches!(e, VhostEvent::Disconnected { reason } if reason == "revoked")));
    // Another function's device is untouched.
    assert_eq!(fo.read(0, 0, 512), (S_OK, other.plain[..512].to_vec()));
}
