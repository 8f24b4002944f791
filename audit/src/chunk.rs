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

pub fn decode(bytes: &[u8]) -> Result<Chunk<'_>, String> {
    let take = |at: usize, n: usize| {
        bytes
            .get(at..at + n)
            .ok_or_else(|| format!("chunk ends after {} bytes", bytes.len()))
    };
    let count = u32::from_be_bytes(take(0, 4)?.try_into().expect("4")) as usize;
    if count == 0 || count > bytes.len() / 36 {
        return Err(format!(
            "chunk claims {count} events in {} bytes",
            bytes.len()
        ));
    }
    let mut at = 4;
    let mut leaves = Vec::with_capacity(count);
    for _ in 0..count {
        leaves.push(take(at, 32)?.try_into().expect("32"));
        at += 32;
    }
    let mut events = Vec::with_capacity(count);
    for _ in 0..count {
        let len = u32::from_be_bytes(take(at, 4)?.try_into().expect("4")) as usize;
        if len > MAX_EVENT_BYTES {
            return Err(format!("an event of {len} bytes"));
        }
        at += 4;
        events.push(take(at, len)?);
        at += len;
    }
    if at != bytes.len() {
        return Err(format!("{} bytes after the last event", bytes.len() - at));
    }
    Ok(Chunk { leaves, events })
}

/// Event `i` of a chunk and its stored leaf, without decoding the others.
pub fn event_at(bytes: &[u8], i: usize) -> Result<Option<(&[u8], Hash)>, String> {
    let take = |at: usize, n: usize| {
        bytes
            .get(at..at + n)
            .ok_or_else(|| format!("chunk ends after {} bytes", bytes.len()))
    };
    let count = u32::from_be_bytes(take(0, 4)?.try_into().expect("4")) as usize;
    if count == 0 || count > bytes.len() / 36 {
        return Err(format!(
            "chunk claims {count} events in {} bytes",
            bytes.len()
        ));
    }
    if i >= count {
        return Ok(None);
    }
    let leaf: Hash = take(4 + 32 * i, 32)?.try_into().expect("32");
    let mut at = 4 + 32 * count;
    for _ in 0..i {
        let len = u32::from_be_bytes(take(at, 4)?.try_into().expect("4")) as usize;
        at += 4 + len;
    }
    let len = u32::from_be_bytes(take(at, 4)?.try_into().expect("4")) as usize;
    if len > MAX_EVENT_BYTES {
        return Err(format!("an event of {len} bytes"));
    }
    Ok(Some((take(at + 4, len)?, leaf)))
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
