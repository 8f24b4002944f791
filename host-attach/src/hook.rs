//! `ipu-decrypt-hook`: containerd's stream processor for encrypted layers. The encrypted blob
//! comes on stdin (and, when the client passed one, a payload on fd 3, read by
//! [`crate::payload`]); after its first chunk it is read from containerd's own file of it when
//! there is one ([`content_store`]: containerd's stdin feed is slow). It goes to ipu-image-svc,
//! which decrypts it on the IPU with a key only the IPU gets, and the plaintext comes back to
//! stdout. No key ever reaches this process.
//!
//! Any failure is one line on stderr (containerd shows it in its error) and exit code 1
//! ([`crate::exit::hook`]). The IPU sends plaintext only after it has matched the blob's
//! digest to a verified image and checked the HMAC over the whole blob; it then streams the
//! plaintext as it decrypts it and ends with a trailer only once the length and the plaintext
//! digest are checked. This hook succeeds only after that trailer, with exactly the length it
//! announces written, so a cut-off or failed stream is never a success. (It does not hash the
//! plaintext again: the IPU checked the digest, and containerd checks the layer's diff_id
//! against the signed config as it applies it.)
//!
//! containerd configuration: see docs/containerd-hook.md.

use std::io::{self, Read, Write};
use std::os::fd::AsFd;

use api::imagesvc::{
    DecryptLayerHeader, DecryptLayerRequest, DecryptLayerResponse, DecryptLayerTrailer,
};
use tokio::sync::mpsc::Sender;
use tokio_stream::{Stream, StreamExt};

use crate::ipu::{IpuApi, IpuError};
use crate::payload::PayloadError;

pub mod content_store;

/// Blob chunk sent to the IPU.
pub const CHUNK: usize = 1 << 20;

/// Why a layer was not decrypted.
#[derive(Debug, thiserror::Error)]
pub enum HookError {
    #[error("STREAM_PROCESSOR_MEDIATYPE is not set: run me as a containerd stream processor")]
    NotAStreamProcessor,
    #[error(transparent)]
    Payload(#[from] PayloadError),
    #[error(transparent)]
    Ipu(#[from] IpuError),
    #[error("reading the blob on stdin: {0}")]
    ReadBlob(#[source] io::Error),
    #[error("reading the blob from containerd's content store file: {0}")]
    ReadStoredBlob(#[source] io::Error),
    #[error("stdout: {0}")]
    Stdout(#[source] io::Error),
    #[error("writing the plaintext to stdout: {0}")]
    WritePlaintext(#[source] io::Error),
    #[error("the IPU ended the stream without its trailer")]
    NoTrailer,
    #[error("the stdin reader panicked")]
    ReaderPanicked,
    /// The bytes written, and the trailer's length and digest.
    #[error(
        "the plaintext received ({written} bytes) is not what the IPU verified ({size} bytes, {digest})"
    )]
    LengthMismatch {
        written: u64,
        size: u64,
        digest: String,
    },
}

/// Reads until `buf` is full or the end.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match r.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// Grows the pipe on `fd` (containerd's stdin and stdout pipes) to `CHUNK` bytes, if it is
/// one: a 64 KiB pipe takes a context switch per 64 KiB of a layer on either side.
fn grow_pipe(fd: std::os::fd::BorrowedFd<'_>) {
    use std::os::fd::AsRawFd;
    // SAFETY: F_SETPIPE_SZ only resizes the kernel buffer of the open descriptor `fd`
    // borrows; it fails harmlessly (EBADF/EINVAL/EPERM) on anything else, and failure leaves
    // the default size.
    unsafe {
        libc::fcntl(fd.as_raw_fd(), libc::F_SETPIPE_SZ, CHUNK as libc::c_int);
    }
}

/// Sends the blob read from `blob` in whole chunks, `header` with the first (an empty blob is
/// one message with the header and no data); stops early, without error, once the receiver
/// is gone. After a whole first chunk, the rest is read from containerd's own file of the blob
/// when `store` finds one ([`content_store::Finder::same_blob`]).
fn send_blob_from(
    mut blob: impl Read,
    store: Option<&content_store::Finder>,
    header: DecryptLayerHeader,
    tx: &Sender<DecryptLayerRequest>,
) -> Result<(), HookError> {
    let mut header = Some(header);
    let mut buf = vec![0u8; CHUNK];
    let first = read_full(&mut blob, &mut buf).map_err(HookError::ReadBlob)?;
    let mut rest = match store.filter(|_| first == CHUNK) {
        Some(store) => store.same_blob(&buf[..first]),
        None => None,
    };
    let mut n = first;
    loop {
        if n == 0 && header.is_none() {
            return Ok(());
        }
        // The chunk itself goes out (no copy); the next is read into a new buffer.
        let mut chunk = std::mem::replace(&mut buf, vec![0u8; CHUNK]);
        chunk.truncate(n);
        let m = DecryptLayerRequest {
            header: header.take(),
            data: chunk.into(),
        };
        if tx.blocking_send(m).is_err() || n == 0 {
            return Ok(());
        }
        // Whole chunks: a pipe hands out at most its size per read.
        n = match rest.as_mut() {
            Some(file) => read_full(file, &mut buf).map_err(HookError::ReadStoredBlob)?,
            None => read_full(&mut blob, &mut buf).map_err(HookError::ReadBlob)?,
        };
    }
}

/// Writes the plaintext the IPU streams to `out` until its trailer; the bytes written and the
/// trailer. A stream that ends or fails before the trailer is an error.
async fn write_until_trailer(
    mut inbound: impl Stream<Item = Result<DecryptLayerResponse, tonic::Status>> + Unpin,
    out: &mut impl Write,
) -> Result<(u64, DecryptLayerTrailer), HookError> {
    let mut written = 0u64;
    let trailer = loop {
        let Some(m) = inbound
            .next()
            .await
            .transpose()
            .map_err(|status| IpuError::DecryptLayer(status.into()))?
        else {
            return Err(HookError::NoTrailer);
        };
        if !m.data.is_empty() {
            out.write_all(&m.data).map_err(HookError::WritePlaintext)?;
            written += m.data.len() as u64;
        }
        if let Some(t) = m.trailer {
            break t;
        }
    };
    out.flush().map_err(HookError::WritePlaintext)?;
    Ok((written, trailer))
}

/// Exactly the length the trailer announces was written.
fn check_length(written: u64, trailer: DecryptLayerTrailer) -> Result<(), HookError> {
    if written != trailer.size {
        return Err(HookError::LengthMismatch {
            written,
            size: trailer.size,
            digest: trailer.digest,
        });
    }
    Ok(())
}

/// Decrypts the layer on stdin to stdout through the IPU at `ipu`, as containerd's stream
/// processor (its environment and fd 3).
pub fn run(ipu: &IpuApi) -> Result<(), HookError> {
    let media_type =
        std::env::var("STREAM_PROCESSOR_MEDIATYPE").map_err(|_| HookError::NotAStreamProcessor)?;
    let payload = crate::payload::from_fd3()?;
    grow_pipe(io::stdin().as_fd());
    grow_pipe(io::stdout().as_fd());
    let rt = crate::ipu::runtime()?;
    rt.block_on(async move {
        let mut client = ipu.connect().await?;
        // stdin is read on a thread of its own and streamed as it comes.
        let (tx, rx) = tokio::sync::mpsc::channel::<DecryptLayerRequest>(4);
        let header = DecryptLayerHeader {
            tenant: ipu.tenant.clone(),
            function: ipu.function.clone(),
            media_type,
            payload_descriptor_json: payload.unwrap_or_default(),
        };
        let store = content_store::Finder::of_parent();
        let reader = std::thread::spawn(move || {
            send_blob_from(io::stdin().lock(), store.as_ref(), header, &tx)
        });
        let response = client
            .decrypt_layer(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .map_err(|status| IpuError::DecryptLayer(status.into()))?;
        // Straight to fd 1: Rust's stdout is line-buffered, which splits binary data at
        // every newline into extra copies and writes.
        let mut stdout = std::fs::File::from(
            io::stdout()
                .as_fd()
                .try_clone_to_owned()
                .map_err(HookError::Stdout)?,
        );
        let (written, trailer) = write_until_trailer(response.into_inner(), &mut stdout).await?;
        reader.join().map_err(|_| HookError::ReaderPanicked)??;
        check_length(written, trailer)
    })
}

/// Takes the rest of the blob from stdin. containerd (1.6) reports a processor that quits
/// while it is still writing the blob as a wrong diff id of an empty layer, and the hook's
/// message is lost: a failing hook takes the rest of the blob first, so that the failure shown
/// is its own.
pub fn drain_stdin() {
    let _ = io::copy(&mut io::stdin().lock(), &mut io::sink());
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> DecryptLayerHeader {
        DecryptLayerHeader {
            tenant: "acme".into(),
            function: "pull".into(),
            media_type: "application/vnd.oci.image.layer.v1.tar+gzip+encrypted".into(),
            payload_descriptor_json: String::new(),
        }
    }

    fn sent(blob: &[u8]) -> Vec<DecryptLayerRequest> {
        let (tx, mut rx) = tokio::sync::mpsc::channel(16);
        send_blob_from(blob, None, header(), &tx).unwrap();
        drop(tx);
        std::iter::from_fn(|| rx.blocking_recv()).collect()
    }

    #[test]
    fn the_blob_goes_in_whole_chunks_after_the_header() {
        let blob: Vec<u8> = (0..CHUNK * 2 + 5).map(|i| i as u8).collect();
        let m = sent(&blob);
        assert_eq!(m.len(), 3);
        assert_eq!(m[0].header, Some(header()));
        assert!(m[1..].iter().all(|m| m.header.is_none()));
        assert_eq!(
            m.iter().map(|m| m.data.len()).collect::<Vec<_>>(),
            [CHUNK, CHUNK, 5]
        );
        let all: Vec<u8> = m.iter().flat_map(|m| m.data.iter().copied()).collect();
        assert_eq!(all, blob);
        // An empty blob is the header alone.
        let m = sent(b"");
        assert_eq!(m.len(), 1);
        assert_eq!((m[0].header.is_some(), m[0].data.len()), (true, 0));
    }

    #[test]
    fn after_a_whole_first_chunk_the_rest_comes_from_containerds_file_of_the_blob() {
        let blob: Vec<u8> = (0..CHUNK * 2 + 5).map(|i| (i * 7) as u8).collect();
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("blobs/sha256");
        std::fs::create_dir_all(&store).unwrap();
        std::fs::create_dir(dir.path().join("fd")).unwrap();
        let path = store.join("c".repeat(64));
        std::fs::write(&path, &blob).unwrap();
        std::os::unix::fs::symlink(&path, dir.path().join("fd/7")).unwrap();
        let finder = content_store::Finder::in_dir(dir.path().join("fd"));
        let sent = |stdin: &[u8]| {
            let (tx, mut rx) = tokio::sync::mpsc::channel(16);
            send_blob_from(stdin, Some(&finder), header(), &tx).unwrap();
            drop(tx);
            std::iter::from_fn(|| rx.blocking_recv())
                .flat_map(|m| m.data)
                .collect::<Vec<u8>>()
        };
        // stdin carries the first chunk, then something else: what is sent is the file's.
        let mut stdin = blob[..CHUNK].to_vec();
        stdin.extend_from_slice(b"not the rest of the blob");
        assert_eq!(sent(&stdin), blob);
        // Control: a first chunk the file does not start with, and the rest is stdin's.
        stdin[0] ^= 1;
        assert_eq!(sent(&stdin), stdin);
        // A blob of one chunk or less is stdin's alone.
        assert_eq!(sent(&blob[..CHUNK - 1]), &blob[..CHUNK - 1]);
    }

    #[test]
    fn a_stopped_receiver_ends_the_sending_quietly() {
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        drop(rx);
        send_blob_from(&[1u8; 10][..], None, header(), &tx).unwrap();
    }

    fn data(d: &[u8]) -> DecryptLayerResponse {
        DecryptLayerResponse {
            data: d.to_vec().into(),
            trailer: None,
        }
    }

    fn trailer(d: &[u8], size: u64) -> DecryptLayerResponse {
        DecryptLayerResponse {
            data: d.to_vec().into(),
            trailer: Some(DecryptLayerTrailer {
                size,
                digest: "sha256:ab".into(),
                media_type: String::new(),
            }),
        }
    }

    fn written(
        stream: Vec<Result<DecryptLayerResponse, tonic::Status>>,
    ) -> (Vec<u8>, Result<(), HookError>) {
        let rt = crate::ipu::runtime().unwrap();
        let mut out = Vec::new();
        let result = rt
            .block_on(write_until_trailer(tokio_stream::iter(stream), &mut out))
            .and_then(|(written, t)| check_length(written, t));
        (out, result)
    }

    #[test]
    fn the_plaintext_up_to_the_trailer_of_its_length_is_a_success() {
        let (out, result) = written(vec![Ok(data(b"ab")), Ok(data(b"")), Ok(trailer(b"c", 3))]);
        result.unwrap();
        assert_eq!(out, b"abc");
        let (out, result) = written(vec![Ok(trailer(b"", 0))]);
        result.unwrap();
        assert!(out.is_empty());
    }

    #[test]
    fn a_stream_without_its_trailer_or_of_another_length_fails() {
        let (out, result) = written(vec![Ok(data(b"ab"))]);
        assert_eq!(out, b"ab");
        assert_eq!(
            result.unwrap_err().to_string(),
            "the IPU ended the stream without its trailer"
        );
        let (_, result) = written(vec![Ok(data(b"ab")), Ok(trailer(b"c", 4))]);
        assert_eq!(
            result.unwrap_err().to_string(),
            "the plaintext received (3 bytes) is not what the IPU verified (4 bytes, sha256:ab)"
        );
        // A failed stream is the IPU's own words.
        let (_, result) = written(vec![
            Ok(data(b"ab")),
            Err(tonic::Status::internal("the HMAC does not match")),
        ]);
        assert_eq!(result.unwrap_err().to_string(), "the HMAC does not match");
    }
}
