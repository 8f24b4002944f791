//! Events are stored in chunks, one per group commit, so a commit writes one value however
//! many events it holds. A chunk is
//!
//! ```text
//! u32 BE count | count x 32-byte leaf hash | count x (u32 BE length | canonical event bytes)
//! ```
//!
//! and is stored under the sequence number of its first event. The leaf hashes are kept
//! next to the events so `verify` can tell which event changed (its bytes no longer hash to
//! its leaf) from a rewrite of both (caught by the signed checkpoints).

use crate::merkle::Hash;

/// Largest event the log stores (validated events are far smaller).
pub const MAX_EVENT_BYTES: usize = 1 << 20;
/// Most events in one chunk: a commit with more writes several, which bounds the work of
/// reading one event.
pub const MAX_CHUNK_EVENTS: usize = 256;

pub fn encode(leaves: &[Hash], events: &[Vec<u8>]) -> Vec<u8> {
    assert_eq!(leaves.len(), events.len());
    let size = 4 + leaves.len() * 36 + events.iter().map(Vec::len).sum::<usize>();
    let mut out = Vec::with_capacity(size);
    out.extend_from_slice(&(leaves.len() as u32).to_be_bytes());
    for l in leaves {
        out.extend_from_slice(l);
    }
    for e in events {
        out.extend_from_slice(&(e.len() as u32).to_be_bytes());
        out.extend_from_slice(e);
    }
    out
}

/// A decoded chunk, borrowing the stored bytes.
pub struct Chunk<'a> {
    pub leaves: Vec<Hash>,
    pub events: Vec<&'a [u8]>,
}

/// Why stored bytes are not a chunk.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ChunkError {
    #[error("chunk ends after {len} bytes")]
    Truncated { len: usize },
    #[error("chunk claims {count} events in {len} bytes")]
    BadCount { count: usize, len: usize },
    #[error("an event of {len} bytes")]
    EventTooLarge { len: usize },
    #[error("{extra} bytes after the last event")]
    TrailingBytes { extra: usize },
}

fn take(bytes: &[u8], at: usize, n: usize) -> Result<&[u8], ChunkError> {
    bytes
        .get(at..at + n)
        .ok_or(ChunkError::Truncated { len: bytes.len() })
}

fn u32_at(bytes: &[u8], at: usize) -> Result<usize, ChunkError> {
    Ok(u32::from_be_bytes(take(bytes, at, 4)?.try_into().expect("4")) as usize)
}

/// The event count, checked against the chunk's size.
fn count(bytes: &[u8]) -> Result<usize, ChunkError> {
    let count = u32_at(bytes, 0)?;
    if count == 0 || count > bytes.len() / 36 {
        return Err(ChunkError::BadCount {
            count,
            len: bytes.len(),
        });
    }
    Ok(count)
}

/// The length of the event whose length prefix is at `at`.
fn event_len(bytes: &[u8], at: usize) -> Result<usize, ChunkError> {
    let len = u32_at(bytes, at)?;
    if len > MAX_EVENT_BYTES {
        return Err(ChunkError::EventTooLarge { len });
    }
    Ok(len)
}

pub fn decode(bytes: &[u8]) -> Result<Chunk<'_>, ChunkError> {
    let count = count(bytes)?;
    let leaves = (0..count)
        .map(|i| Ok(take(bytes, 4 + 32 * i, 32)?.try_into().expect("32")))
        .collect::<Result<Vec<Hash>, ChunkError>>()?;
    let mut at = 4 + 32 * count;
    let mut events = Vec::with_capacity(count);
    for _ in 0..count {
        let len = event_len(bytes, at)?;
        events.push(take(bytes, at + 4, len)?);
        at += 4 + len;
    }
    if at != bytes.len() {
        return Err(ChunkError::TrailingBytes {
            extra: bytes.len() - at,
        });
    }
    Ok(Chunk { leaves, events })
}

/// Event `i` of a chunk and its stored leaf, without decoding the others.
pub fn event_at(bytes: &[u8], i: usize) -> Result<Option<(&[u8], Hash)>, ChunkError> {
    let count = count(bytes)?;
    if i >= count {
        return Ok(None);
    }
    let leaf: Hash = take(bytes, 4 + 32 * i, 32)?.try_into().expect("32");
    let mut at = 4 + 32 * count;
    for _ in 0..i {
        at += 4 + event_len(bytes, at)?;
    }
    let len = event_len(bytes, at)?;
    Ok(Some((take(bytes, at + 4, len)?, leaf)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_strict_decoding() {
        let events = vec![b"{\"a\":1}".to_vec(), b"{}".to_vec()];
        let leaves = vec![[1u8; 32], [2u8; 32]];
        let bytes = encode(&leaves, &events);
        let c = decode(&bytes).unwrap();
        assert_eq!(c.leaves, leaves);
        assert_eq!(c.events, [&events[0][..], &events[1][..]]);
        assert!(decode(&bytes[..bytes.len() - 1]).is_err());
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(decode(&longer).is_err());
        assert!(decode(&[0, 0, 0, 0]).is_err());
        assert!(decode(&[0xff, 0xff, 0xff, 0xff]).is_err());
        assert_eq!(
            event_at(&bytes, 1).unwrap().unwrap(),
            (&events[1][..], leaves[1])
        );
        assert_eq!(event_at(&bytes, 2).unwrap(), None);
    }
}
