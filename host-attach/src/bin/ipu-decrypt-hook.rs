//! `ipu-decrypt-hook`: containerd's stream processor for encrypted layers. The encrypted blob
//! comes on stdin (and, when the client passed one, a payload on fd 3); it goes to
//! ipu-image-svc, which decrypts it on the IPU with a key only the IPU gets, and the plaintext
//! comes back to stdout. No key ever reaches this process.
//!
//! Any failure is one line on stderr (containerd shows it in its error) and exit code 1. The
//! IPU sends plaintext only after it has matched the blob's digest to a verified image and
//! checked the HMAC over the whole blob; it then streams the plaintext as it decrypts it and
//! ends with a trailer only once the length and the plaintext digest are checked. This hook
//! exits 0 only after that trailer, with exactly the length it announces written, so a
//! cut-off or failed stream is never a success. (It does not hash the plaintext again: the
//! IPU checked the digest, and containerd checks the layer's diff_id against the signed
//! config as it applies it.)
//!
//! containerd configuration: see docs/containerd-hook.md.

use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::process::ExitCode;

use api::imagesvc::{DecryptLayerHeader, DecryptLayerRequest};
use clap::Parser;
use host_attach::ipu::IpuApi;
use host_attach::payload;

/// Blob chunk sent to the IPU.
const CHUNK: usize = 1 << 20;

#[derive(Parser)]
#[command(
    name = "ipu-decrypt-hook",
    version,
    about = "containerd stream processor: encrypted layers decrypted on the IPU"
)]
struct Args {
    #[command(flatten)]
    ipu: IpuApi,
}

/// The layer descriptor (JSON) from the payload on fd 3, if containerd passed one.
fn payload_descriptor() -> Result<Option<String>, String> {
    use std::os::fd::{FromRawFd, OwnedFd};
    // containerd passes the payload as a pipe on fd 3, and only when there is one. Anything
    // else there (containerd 1.6 leaks a socket into its children as fd 3) is not a payload,
    // and reading it would never end.
    // SAFETY: fstat on a descriptor number only queries it; a closed one fails with EBADF,
    // and `st` is a plain C struct the call fills.
    let is_pipe = unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        libc::fstat(3, &mut st) == 0 && st.st_mode & libc::S_IFMT == libc::S_IFIFO
    };
    if !is_pipe {
        return Ok(None);
    }
    // SAFETY: fd 3 is an open pipe (checked above) and nothing else in this process uses it:
    // containerd passed it for this purpose; it is owned (and closed) here.
    let fd = unsafe { OwnedFd::from_raw_fd(3) };
    let mut bytes = Vec::new();
    std::fs::File::from(fd)
        .take(payload::MAX_PAYLOAD as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("reading the payload on fd 3: {e}"))?;
    payload::descriptor(&bytes)
}

/// Reads until `buf` is full or the end.
fn read_full(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match r.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
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

fn run(args: Args) -> Result<(), String> {
    let media_type = std::env::var("STREAM_PROCESSOR_MEDIATYPE").map_err(|_| {
        "STREAM_PROCESSOR_MEDIATYPE is not set: run me as a containerd stream processor".to_string()
    })?;
    let payload = payload_descriptor()?;
    grow_pipe(std::io::stdin().as_fd());
    grow_pipe(std::io::stdout().as_fd());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async move {
        let mut client = args.ipu.connect().await?;
        // stdin is read on a thread of its own and streamed as it comes.
        let (tx, rx) = tokio::sync::mpsc::channel::<DecryptLayerRequest>(4);
        let header = DecryptLayerHeader {
            tenant: args.ipu.tenant.clone(),
            function: args.ipu.function.clone(),
            media_type,
            payload_descriptor_json: payload.unwrap_or_default(),
        };
        let reader = std::thread::spawn(move || -> Result<(), String> {
            let mut stdin = std::io::stdin().lock();
            let mut header = Some(header);
            let mut buf = vec![0u8; CHUNK];
            loop {
                // Whole chunks: a pipe hands out at most its size per read.
                let n = read_full(&mut stdin, &mut buf)
                    .map_err(|e| format!("reading the blob on stdin: {e}"))?;
                if n == 0 && header.is_none() {
                    return Ok(());
                }
                let m = DecryptLayerRequest {
                    header: header.take(),
                    data: buf[..n].to_vec(),
                };
                if tx.blocking_send(m).is_err() || n == 0 {
                    return Ok(());
                }
            }
        });
        let response = client
            .decrypt_layer(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .map_err(|s| s.message().to_string())?;
        let mut inbound = response.into_inner();
        // Straight to fd 1: Rust's stdout is line-buffered, which splits binary data at
        // every newline into extra copies and writes.
        let mut stdout = std::fs::File::from(
            std::io::stdout()
                .as_fd()
                .try_clone_to_owned()
                .map_err(|e| format!("stdout: {e}"))?,
        );
        let mut written = 0u64;
        let trailer = loop {
            let Some(m) = inbound
                .message()
                .await
                .map_err(|s| s.message().to_string())?
            else {
                return Err("the IPU ended the stream without its trailer".to_string());
            };
            if !m.data.is_empty() {
                stdout
                    .write_all(&m.data)
                    .map_err(|e| format!("writing the plaintext to stdout: {e}"))?;
                written += m.data.len() as u64;
            }
            if let Some(t) = m.trailer {
                break t;
            }
        };
        stdout
            .flush()
            .map_err(|e| format!("writing the plaintext to stdout: {e}"))?;
        reader
            .join()
            .map_err(|_| "the stdin reader panicked".to_string())??;
        if written != trailer.size {
            return Err(format!(
                "the plaintext received ({written} bytes) is not what the IPU verified ({} bytes, {})",
                trailer.size, trailer.digest
            ));
        }
        Ok(())
    })
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // containerd (1.6) reports a processor that quits while it is still writing the
            // blob as a wrong diff id of an empty layer, and this message is lost: take the
            // rest of the blob first, so that the failure shown is this one.
            let _ = std::io::copy(&mut std::io::stdin().lock(), &mut std::io::sink());
            eprintln!("ipu-decrypt-hook: {e}");
            ExitCode::from(1)
        }
    }
}
