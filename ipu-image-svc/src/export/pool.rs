//! The threads that serve every export's connections, bounded whatever clients do.
//!
//! An accepted connection is sent the NBD greeting and joins the *waiting* set, watched by
//! one poller thread with poll(2): a connection that says nothing costs a descriptor and a few
//! bytes, no thread. The waiting set is bounded per export ([`MAX_WAITING_PER_EXPORT`]) and in
//! all ([`MAX_WAITING`]); past a bound the oldest waiting connection is closed, so a flood of
//! idle connections cannot keep out a client that answers at once (the host agent answers
//! within microseconds of the greeting). A waiting connection is closed at the handshake
//! deadline too.
//!
//! A connection that answered is handed to one of at most [`WORKERS`] worker threads (made
//! when first needed), which serves it to its end under the export's own limits
//! ([`super::MAX_CONNECTIONS_PER_EXPORT`], the handshake deadline). With every worker busy a
//! further connection is closed at once.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use super::{Shared, Stream, HANDSHAKE_DEADLINE};

/// Worker threads serving connections, over all exports.
pub const WORKERS: usize = 32;
/// Connections of one export waiting for their client's first bytes.
pub const MAX_WAITING_PER_EXPORT: usize = 16;
/// Connections waiting for their client's first bytes, over all exports.
pub const MAX_WAITING: usize = 256;

/// An accepted, greeted connection whose client has not answered yet.
struct Waiting {
    shared: Arc<Shared>,
    stream: Stream,
    accepted: Instant,
}

/// A connection for a worker.
struct Job {
    shared: Arc<Shared>,
    stream: Stream,
    accepted: Instant,
}

#[derive(Default)]
struct Workers {
    /// Jobs handed out and not finished.
    busy: usize,
    /// Worker threads made so far (at most [`WORKERS`]).
    spawned: usize,
}

pub struct Pool {
    incoming: Mutex<Vec<Waiting>>,
    wake: UnixStream,
    workers: Mutex<Workers>,
    jobs: Mutex<mpsc::Sender<Job>>,
    queue: Arc<Mutex<mpsc::Receiver<Job>>>,
}

static POOL: OnceLock<Pool> = OnceLock::new();

impl Pool {
    /// The process's pool, its poller started on first use.
    pub(crate) fn global() -> &'static Pool {
        POOL.get_or_init(|| {
            let (wake, woken) = UnixStream::pair().expect("a socket pair for the NBD poller");
            wake.set_nonblocking(true).expect("non-blocking");
            woken.set_nonblocking(true).expect("non-blocking");
            let (jobs, queue) = mpsc::channel();
            std::thread::Builder::new()
                .name("nbd-poller".into())
                // Waits for this initialisation to finish, then polls.
                .spawn(move || Pool::global().poll_forever(woken))
                .expect("the NBD poller thread");
            Pool {
                incoming: Mutex::default(),
                wake,
                workers: Mutex::default(),
                jobs: Mutex::new(jobs),
                queue: Arc::new(Mutex::new(queue)),
            }
        })
    }

    /// Wakes the poller (new connections, or an export revoked).
    pub(crate) fn wake(&self) {
        let _ = (&self.wake).write(&[1]);
    }

    /// Sends the greeting on a new connection of `shared`'s export and has it wait for its
    /// client's answer.
    pub(crate) fn greet(&self, shared: Arc<Shared>, mut stream: Stream) {
        // 18 bytes into an empty socket buffer do not block; the timeout is a backstop.
        let sent = stream
            .set_timeouts(None, Some(Duration::from_millis(100)))
            .and_then(|()| stream.write_all(&super::nbd::greeting()));
        if sent.is_err() {
            return;
        }
        self.incoming.lock().expect("not poisoned").push(Waiting {
            shared,
            stream,
            accepted: Instant::now(),
        });
        self.wake();
    }

    fn poll_forever(&'static self, woken: UnixStream) -> ! {
        let mut waiting: VecDeque<Waiting> = VecDeque::new();
        let mut fds: Vec<libc::pollfd> = Vec::new();
        loop {
            for w in self.incoming.lock().expect("not poisoned").drain(..) {
                let same = |o: &Waiting| Arc::ptr_eq(&o.shared, &w.shared);
                if waiting.iter().filter(|o| same(o)).count() >= MAX_WAITING_PER_EXPORT {
                    let oldest = waiting.iter().position(same).expect("counted above");
                    drop(waiting.remove(oldest));
                }
                if waiting.len() >= MAX_WAITING {
                    drop(waiting.pop_front());
                }
                waiting.push_back(w);
            }
            let now = Instant::now();
            waiting.retain(|w| {
                !w.shared.is_revoked() && now.duration_since(w.accepted) < HANDSHAKE_DEADLINE
            });
            fds.clear();
            fds.push(libc::pollfd {
                fd: woken.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
            fds.extend(waiting.iter().map(|w| libc::pollfd {
                fd: w.stream.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            }));
            let timeout = waiting
                .front()
                .map(|w| (w.accepted + HANDSHAKE_DEADLINE).saturating_duration_since(now))
                .unwrap_or(Duration::from_secs(1))
                .min(Duration::from_secs(1));
            // SAFETY: `fds` is a valid, initialised array of `fds.len()` pollfd structures
            // that lives across the call; poll(2) writes only their `revents`.
            let n = unsafe {
                libc::poll(
                    fds.as_mut_ptr(),
                    fds.len() as libc::nfds_t,
                    timeout.as_millis().max(1) as libc::c_int,
                )
            };
            if n <= 0 {
                continue;
            }
            if fds[0].revents != 0 {
                let mut sink = [0u8; 64];
                while matches!((&woken).read(&mut sink), Ok(n) if n > 0) {}
            }
            // Ready ones (data, hang-up or error) go to the workers; last first, so the
            // indices of those before stay put.
            for i in (1..fds.len()).rev() {
                if fds[i].revents != 0 {
                    let w = waiting.remove(i - 1).expect("one entry per descriptor");
                    self.dispatch(w);
                }
            }
        }
    }

    /// Hands a connection whose client answered to a worker, or closes it when all are busy.
    fn dispatch(&'static self, w: Waiting) {
        let mut workers = self.workers.lock().expect("not poisoned");
        if workers.busy >= WORKERS {
            tracing::warn!(export = %w.shared.name(), "NBD connection refused: all {WORKERS} workers are busy");
            w.stream.shutdown();
            return;
        }
        workers.busy += 1;
        if workers.spawned < workers.busy {
            let queue = self.queue.clone();
            let spawned = std::thread::Builder::new()
                .name("nbd-worker".into())
                .spawn(move || loop {
                    let job = queue.lock().expect("not poisoned").recv();
                    let Ok(job) = job else { return };
                    // A panic while serving (a bug) costs that connection, not the worker.
                    let served = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        job.shared.serve(job.stream, job.accepted)
                    }));
                    if served.is_err() {
                        tracing::error!("an NBD connection's handler panicked");
                    }
                    let mut workers = self.workers.lock().unwrap_or_else(|e| e.into_inner());
                    workers.busy -= 1;
                });
            if spawned.is_err() {
                workers.busy -= 1;
                tracing::error!("cannot start an NBD worker thread");
                w.stream.shutdown();
                return;
            }
            workers.spawned += 1;
        }
        let _ = self.jobs.lock().expect("not poisoned").send(Job {
            shared: w.shared,
            stream: w.stream,
            accepted: w.accepted,
        });
    }
}
