//! The vhost-user-blk device model for the `vhost-user-backend` daemon: features, the
//! virtio-blk configuration space, and the virtqueues' requests onto the clone (through
//! [`super::request`]).

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VringRwLock, VringT};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ,
    VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC;
use virtio_queue::QueueOwnedT;
use vm_memory::{
    Bytes, GuestAddress, GuestAddressSpace, GuestMemoryAtomic, GuestMemoryBackend, GuestMemoryMmap,
};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use super::request::{self, Chain, Desc, Geometry, GuestRam};
use crate::blockstore::BlockDevice;

/// Largest virtqueue the front-end may set up.
pub const MAX_QUEUE_SIZE: usize = 256;
/// The virtio-blk configuration space this device fills in (`struct virtio_blk_config` up to
/// `write_zeroes_may_unmap` and its padding); reads past it see zeros.
const CONFIG_LEN: usize = 64;
/// Rejected requests of one export logged one by one; then one in [`LOG_EVERY`].
const LOGGED_REJECTIONS: u64 = 32;
const LOG_EVERY: u64 = 1000;

/// Counters one export's backends share (across front-end connections).
#[derive(Default)]
pub struct Stats {
    /// Requests completed with `VIRTIO_BLK_S_OK`.
    pub completed: AtomicU64,
    /// Chains refused (`IOERR`/`UNSUPP`, or dropped).
    pub rejected: AtomicU64,
}

pub(crate) struct BlkBackend {
    name: String,
    dev: Arc<dyn BlockDevice>,
    geo: Geometry,
    num_queues: usize,
    mem: RwLock<Option<GuestMemoryAtomic<GuestMemoryMmap>>>,
    /// Set at revocation: chains still kicked complete with `IOERR`.
    revoked: Arc<AtomicBool>,
    stats: Arc<Stats>,
    /// The queue threads' exit eventfds as handed to the daemon, which registers them with
    /// `into_raw_fd` and never closes them (vhost-user-backend 0.24); closed by
    /// [`BlkBackend::close_exit_events`] once the daemon and its threads are gone.
    exit_fds: std::sync::Mutex<Vec<std::os::fd::RawFd>>,
}

impl BlkBackend {
    pub(crate) fn new(
        name: String,
        dev: Arc<dyn BlockDevice>,
        geo: Geometry,
        num_queues: usize,
        revoked: Arc<AtomicBool>,
        stats: Arc<Stats>,
    ) -> Self {
        Self {
            name,
            dev,
            geo,
            num_queues,
            mem: RwLock::new(None),
            revoked,
            stats,
            exit_fds: std::sync::Mutex::default(),
        }
    }

    /// Closes the exit eventfds the daemon leaked. Call only after the daemon was dropped
    /// (its handler joins the queue threads, the only users of these descriptors).
    pub(crate) fn close_exit_events(&self) {
        for fd in self.exit_fds.lock().expect("not poisoned").drain(..) {
            // SAFETY: `fd` is the consumer end made in `exit_event` and given to the daemon,
            // which turned it into a raw descriptor for its epoll set and never closes it;
            // its queue thread (that epoll's only user) was joined when the daemon's handler
            // was dropped, so nothing else owns or uses this descriptor, and it is closed once
            // (drained from the list).
            drop(unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) });
        }
    }

    /// `struct virtio_blk_config`, little-endian.
    fn config(&self) -> [u8; CONFIG_LEN] {
        let mut c = [0u8; CONFIG_LEN];
        let mut put = |at: usize, b: &[u8]| c[at..at + b.len()].copy_from_slice(b);
        put(0, &self.geo.capacity.to_le_bytes());
        put(8, &request::SIZE_MAX.to_le_bytes());
        put(12, &request::SEG_MAX.to_le_bytes());
        put(20, &(request::SECTOR as u32).to_le_bytes()); // blk_size
        put(34, &(self.num_queues as u16).to_le_bytes());
        put(36, &request::MAX_DISCARD_SECTORS.to_le_bytes());
        put(40, &request::MAX_DISCARD_SEG.to_le_bytes());
        // discard_sector_alignment: a clone frees whole clusters.
        put(
            44,
            &((crate::blockstore::CLUSTER / request::SECTOR) as u32).to_le_bytes(),
        );
        put(48, &request::MAX_WRITE_ZEROES_SECTORS.to_le_bytes());
        put(52, &request::MAX_WRITE_ZEROES_SEG.to_le_bytes());
        // write_zeroes_may_unmap (56): 0, zeros are written.
        c
    }

    /// Serves the chains available on one queue; an error when the queue itself cannot be
    /// read or completed (the front-end's rings are not in guest memory, a head index past
    /// the queue): that queue is left as it is.
    fn process_queue(&self, vring: &VringRwLock) -> io::Result<()> {
        let Some(atomic) = self.mem.read().expect("not poisoned").clone() else {
            return Err(io::Error::other("a kick before the memory table"));
        };
        let mem = atomic.memory();
        let chains: Vec<(u16, Chain)> = {
            let mut state = vring.get_mut();
            let iter = state
                .get_queue_mut()
                .iter(&*mem)
                .map_err(|e| io::Error::other(format!("virtqueue of {}: {e}", self.name)))?;
            iter.map(|chain| {
                let head = chain.head_index();
                let mut out = Chain::default();
                let mut last_has_next = true;
                for d in chain {
                    if out.descs.len() == request::MAX_CHAIN {
                        last_has_next = true;
                        break;
                    }
                    last_has_next = d.has_next();
                    out.descs.push(Desc {
                        addr: d.addr().0,
                        len: d.len(),
                        writable: d.is_write_only(),
                    });
                }
                out.complete = !out.descs.is_empty() && !last_has_next;
                (head, out)
            })
            .collect()
        };
        let ram = Ram(&mem);
        for (head, chain) in chains {
            let done = if self.revoked.load(Ordering::SeqCst) {
                // No device I/O any more: the status says so where the chain allows.
                let parsed = request::parse(&chain, &ram, &self.geo);
                let error = Some("the export was revoked".to_string());
                match parsed.status {
                    Some(at) if ram.write(at, &[request::S_IOERR]).is_ok() => request::Completion {
                        used_len: 1,
                        status: Some(request::S_IOERR),
                        error,
                    },
                    _ => request::Completion {
                        used_len: 0,
                        status: None,
                        error,
                    },
                }
            } else {
                request::process(&chain, &ram, self.dev.as_ref(), &self.geo)
            };
            match &done.error {
                None => {
                    self.stats.completed.fetch_add(1, Ordering::Relaxed);
                }
                Some(reason) => {
                    let n = self.stats.rejected.fetch_add(1, Ordering::Relaxed) + 1;
                    if n <= LOGGED_REJECTIONS || n % LOG_EVERY == 0 {
                        tracing::warn!(export = %self.name, head, status = ?done.status, rejected = n, "virtio-blk request refused: {reason}");
                    }
                }
            }
            if let Err(e) = vring.add_used(head, done.used_len) {
                // A head index the queue does not have, or a used ring outside memory.
                return Err(io::Error::other(format!("used ring of {}: {e}", self.name)));
            }
        }
        vring.signal_used_queue()
    }
}

/// Guest memory of a front-end connection.
struct Ram<'a>(&'a GuestMemoryMmap);

impl GuestRam for Ram<'_> {
    fn contains(&self, addr: u64, len: u64) -> bool {
        match usize::try_from(len) {
            Ok(0) => GuestMemoryBackend::address_in_range(self.0, GuestAddress(addr)),
            Ok(len) => GuestMemoryBackend::check_range(self.0, GuestAddress(addr), len),
            Err(_) => false,
        }
    }
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), String> {
        self.0
            .read_slice(buf, GuestAddress(addr))
            .map_err(|e| format!("{} bytes at {addr:#x}: {e}", buf.len()))
    }
    fn write(&self, addr: u64, data: &[u8]) -> Result<(), String> {
        self.0
            .write_slice(data, GuestAddress(addr))
            .map_err(|e| format!("{} bytes at {addr:#x}: {e}", data.len()))
    }
}

impl VhostUserBackend for BlkBackend {
    type Bitmap = ();
    type Vring = VringRwLock;

    fn num_queues(&self) -> usize {
        self.num_queues
    }

    fn max_queue_size(&self) -> usize {
        MAX_QUEUE_SIZE
    }

    fn features(&self) -> u64 {
        let mut f = (1u64 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
            | (1 << VIRTIO_BLK_F_SIZE_MAX)
            | (1 << VIRTIO_BLK_F_SEG_MAX)
            | (1 << VIRTIO_BLK_F_BLK_SIZE)
            | (1 << VIRTIO_BLK_F_FLUSH)
            | (1 << VIRTIO_BLK_F_MQ)
            | (1 << VIRTIO_BLK_F_DISCARD)
            | (1 << VIRTIO_BLK_F_WRITE_ZEROES)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if self.geo.read_only {
            f |= 1 << VIRTIO_BLK_F_RO;
        }
        f
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG
            | VhostUserProtocolFeatures::MQ
            | VhostUserProtocolFeatures::REPLY_ACK
    }

    fn set_event_idx(&self, _enabled: bool) {
        // VIRTIO_RING_F_EVENT_IDX is not offered: every batch signals.
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        // Reads past the filled-in part see zeros; the size is the front-end's, bounded by
        // the protocol's message size.
        let size = size.min(vhost::vhost_user::message::VHOST_USER_CONFIG_SIZE) as usize;
        let mut out = vec![0u8; size];
        let config = self.config();
        let start = (offset as usize).min(CONFIG_LEN);
        let n = (CONFIG_LEN - start).min(size);
        out[..n].copy_from_slice(&config[start..start + n]);
        out
    }

    fn set_config(&self, _offset: u32, _buf: &[u8]) -> io::Result<()> {
        Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "the virtio-blk configuration is read-only here (no writeback toggle)",
        ))
    }

    fn update_memory(&self, mem: GuestMemoryAtomic<GuestMemoryMmap>) -> io::Result<()> {
        *self.mem.write().expect("not poisoned") = Some(mem);
        Ok(())
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        let (consumer, notifier) =
            new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC).ok()?;
        self.exit_fds
            .lock()
            .expect("not poisoned")
            .push(std::os::fd::AsRawFd::as_raw_fd(&consumer));
        Some((consumer, notifier))
    }

    /// One thread per queue.
    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.num_queues).map(|q| 1u64 << q).collect()
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[VringRwLock],
        _thread_id: usize,
    ) -> io::Result<()> {
        if evset != EventSet::IN {
            return Err(io::Error::other(format!("unexpected event set {evset:?}")));
        }
        let Some(vring) = vrings.get(device_event as usize) else {
            return Err(io::Error::other(format!("no queue {device_event}")));
        };
        if let Err(e) = self.process_queue(vring) {
            // The queue is the front-end's own problem; this device and the others go on.
            let n = self.stats.rejected.fetch_add(1, Ordering::Relaxed) + 1;
            if n <= LOGGED_REJECTIONS || n % LOG_EVERY == 0 {
                tracing::warn!(export = %self.name, queue = device_event, "virtqueue not served: {e}");
            }
        }
        Ok(())
    }
}
