//! Reading ahead on another thread, so the stages of a layer's stream run on separate cores:
//! reading and hashing the blob with decrypting it (AES-CTR, HMAC) on one, decompressing on
//! another, and the tar, its diff_id and the file system on the caller's.
//!
//! [`spawn`] moves a reader to a scoped thread that fills chunks and hands them over a
//! bounded channel (so at most [`DEPTH`] chunks are in flight), and gives back the reader
//! when joined: a stage that must see its input to the end (a digest, an HMAC) finishes it
//! there. A read error reaches the consumer, and the producer's own copy comes back with it.

use std::io::{self, Read};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::thread::{Scope, ScopedJoinHandle};

/// Bytes handed over at once.
pub const CHUNK: usize = 256 << 10;
/// Chunks in flight between a producer and its consumer.
pub const DEPTH: usize = 2;

/// The consuming end: reads what the producer thread read.
pub struct ChannelReader {
    chunks: Receiver<io::Result<Vec<u8>>>,
    /// Emptied chunks go back to the producer to be filled again.
    recycle: SyncSender<Vec<u8>>,
    current: Vec<u8>,
    pos: usize,
    done: bool,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.current.len() {
            if self.done {
                return Ok(0);
            }
            match self.chunks.recv() {
                Ok(Ok(chunk)) if chunk.is_empty() => self.done = true,
                Ok(Ok(chunk)) => {
                    let used = std::mem::replace(&mut self.current, chunk);
                    let _ = self.recycle.try_send(used);
                    self.pos = 0;
                }
                Ok(Err(e)) => {
                    self.done = true;
                    return Err(e);
                }
                Err(_) => {
                    self.done = true;
                    return Err(io::Error::other("the read-ahead thread stopped"));
                }
            }
        }
        let n = buf.len().min(self.current.len() - self.pos);
        buf[..n].copy_from_slice(&self.current[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// What a producer thread ends with: its reader, and the error that stopped it, if any.
pub struct Produced<R> {
    pub reader: R,
    pub error: Option<io::Error>,
}

/// Reads `source` on a new thread of `scope` named `name` (the current thread's if none can
/// be had: then `source` is read in line).
pub fn spawn<'scope, R>(
    scope: &'scope Scope<'scope, '_>,
    name: &str,
    mut source: R,
) -> (ChannelReader, ScopedJoinHandle<'scope, Produced<R>>)
where
    R: Read + Send + 'scope,
{
    let (chunks_tx, chunks) = sync_channel::<io::Result<Vec<u8>>>(DEPTH);
    let (recycle, recycled) = sync_channel::<Vec<u8>>(DEPTH + 2);
    let producer = move || {
        loop {
            let mut chunk = recycled.try_recv().unwrap_or_default();
            chunk.resize(CHUNK, 0);
            let mut filled = 0;
            let mut error = None;
            while filled < CHUNK {
                match source.read(&mut chunk[filled..]) {
                    Ok(0) => break,
                    Ok(n) => filled += n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        error = Some(e);
                        break;
                    }
                }
            }
            chunk.truncate(filled);
            let end = filled < CHUNK;
            if filled > 0 && chunks_tx.send(Ok(chunk)).is_err() {
                // The consumer is gone: whoever joins finishes the reader.
                return Produced {
                    reader: source,
                    error,
                };
            }
            if let Some(e) = error {
                let _ = chunks_tx.send(Err(duplicate(&e)));
                return Produced {
                    reader: source,
                    error: Some(e),
                };
            }
            if end {
                let _ = chunks_tx.send(Ok(Vec::new()));
                return Produced {
                    reader: source,
                    error: None,
                };
            }
        }
    };
    let handle = std::thread::Builder::new()
        .name(name.to_string())
        .spawn_scoped(scope, producer)
        .expect("a read-ahead thread");
    let reader = ChannelReader {
        chunks,
        recycle,
        current: Vec::new(),
        pos: 0,
        done: false,
    };
    (reader, handle)
}

/// A copy of `e` for the consumer: the project's typed errors inside it survive (they carry
/// the failure's class), anything else keeps its kind and message.
fn duplicate(e: &io::Error) -> io::Error {
    if let Some(inner) = e.get_ref() {
        if let Some(f) = inner.downcast_ref::<crate::fetch::FetchError>() {
            return io::Error::new(e.kind(), f.clone());
        }
        if let Some(u) = inner.downcast_ref::<crate::unpack::UnpackError>() {
            return io::Error::new(e.kind(), u.clone());
        }
    }
    io::Error::new(e.kind(), e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A reader that yields `len` bytes of a pattern in reads of odd sizes, then fails if
    /// `fail` is set.
    struct Pattern {
        len: usize,
        at: usize,
        fail: bool,
    }

    impl Read for Pattern {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.at == self.len {
                return if self.fail {
                    Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "broken at the end",
                    ))
                } else {
                    Ok(0)
                };
            }
            let n = buf.len().min(self.len - self.at).min(77_777);
            for (i, b) in buf[..n].iter_mut().enumerate() {
                *b = ((self.at + i) % 251) as u8;
            }
            self.at += n;
            Ok(n)
        }
    }

    #[test]
    fn everything_read_ahead_arrives_in_order() {
        for len in [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 5 * CHUNK + 12_345] {
            std::thread::scope(|s| {
                let source = Pattern {
                    len,
                    at: 0,
                    fail: false,
                };
                let (mut reader, handle) = spawn(s, "test", source);
                let mut got = Vec::new();
                reader.read_to_end(&mut got).unwrap();
                assert_eq!(got.len(), len);
                assert!(got.iter().enumerate().all(|(i, &b)| b == (i % 251) as u8));
                let produced = handle.join().unwrap();
                assert!(produced.error.is_none());
                assert_eq!(produced.reader.at, len);
            });
        }
    }

    #[test]
    fn an_error_reaches_the_consumer_after_the_data_before_it() {
        std::thread::scope(|s| {
            let source = Pattern {
                len: CHUNK + 5,
                at: 0,
                fail: true,
            };
            let (mut reader, handle) = spawn(s, "test", source);
            let mut got = Vec::new();
            let e = reader.read_to_end(&mut got).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidData);
            assert_eq!(got.len(), CHUNK + 5);
            assert!(handle.join().unwrap().error.is_some());
        });
    }

    #[test]
    fn a_consumer_that_stops_early_gets_the_reader_back_unfinished() {
        std::thread::scope(|s| {
            let source = Pattern {
                len: 20 * CHUNK,
                at: 0,
                fail: false,
            };
            let (mut reader, handle) = spawn(s, "test", source);
            let mut first = vec![0u8; 10];
            reader.read_exact(&mut first).unwrap();
            drop(reader);
            let mut produced = handle.join().unwrap();
            assert!(produced.reader.at < 20 * CHUNK);
            // The joiner finishes it.
            io::copy(&mut produced.reader, &mut io::sink()).unwrap();
            assert_eq!(produced.reader.at, 20 * CHUNK);
        });
    }
}
