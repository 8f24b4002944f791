//! An NBD server for one block device: the fixed newstyle handshake with OPT_INFO, OPT_GO,
//! OPT_EXPORT_NAME, OPT_LIST, OPT_ABORT and OPT_STARTTLS, then READ, WRITE (with FUA), FLUSH,
//! TRIM and DISC with simple replies
//! (https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md). Structured replies
//! and metadata contexts are declined, which every client handles.
//!
//! Given a TLS configuration the server is in the protocol's "forced TLS" mode: before
//! STARTTLS every option but ABORT is answered `ERR_TLS_REQD`, and the export is served only
//! over the TLS session.
//!
//! Everything the client sends is bounded: option data, the number of options in one
//! handshake ([`MAX_OPTIONS`]), request lengths, and ranges against the device's size. An
//! export is opened only by its exact name (never an empty one, never a default). With a
//! required client identity ([`TlsAccess::client_identity`]) a TLS client whose verified
//! certificate does not carry it is refused right after the TLS handshake ([`Refused`]).
//! A revoked export answers every later request with ESHUTDOWN.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::blockstore::BlockDevice;

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
const FLAG_NO_ZEROES: u16 = 1 << 1;
const CLIENT_FIXED_NEWSTYLE: u32 = 1 << 0;
const CLIENT_NO_ZEROES: u32 = 1 << 1;

const OPT_EXPORT_NAME: u32 = 1;
const OPT_ABORT: u32 = 2;
const OPT_LIST: u32 = 3;
const OPT_STARTTLS: u32 = 5;
const OPT_INFO: u32 = 6;
const OPT_GO: u32 = 7;

const REP_ACK: u32 = 1;
const REP_SERVER: u32 = 2;
const REP_INFO: u32 = 3;
const REP_ERR_UNSUP: u32 = 0x8000_0001;
const REP_ERR_INVALID: u32 = 0x8000_0003;
const REP_ERR_TLS_REQD: u32 = 0x8000_0005;
const REP_ERR_UNKNOWN: u32 = 0x8000_0006;

const INFO_EXPORT: u16 = 0;
const INFO_BLOCK_SIZE: u16 = 3;

const TF_HAS_FLAGS: u16 = 1 << 0;
const TF_READ_ONLY: u16 = 1 << 1;
const TF_SEND_FLUSH: u16 = 1 << 2;
const TF_SEND_FUA: u16 = 1 << 3;
const TF_SEND_TRIM: u16 = 1 << 5;

const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;
const CMD_TRIM: u16 = 4;
const CMD_FLAG_FUA: u16 = 1 << 0;

const EPERM: u32 = 1;
const EIO: u32 = 5;
const EINVAL: u32 = 22;
const ENOSPC: u32 = 28;
const ENOTSUP: u32 = 95;
const ESHUTDOWN: u32 = 108;

/// Largest option payload read from a client.
const MAX_OPTION: u32 = 64 * 1024;
/// Options one connection may send, before and inside TLS together: a flood of options (each
/// answered) ends the connection. Real clients send fewer than ten (libnbd, qemu: STARTTLS,
/// STRUCTURED_REPLY, EXTENDED_HEADERS, SET_META_CONTEXT, LIST, INFO, GO).
pub const MAX_OPTIONS: usize = 32;
/// Largest READ or WRITE served (what the block size info advertises).
pub const MAX_REQUEST: u32 = 32 * 1024 * 1024;

/// One exported device.
pub struct Export {
    pub name: String,
    pub device: Arc<dyn BlockDevice>,
    revoked: AtomicBool,
}

impl Export {
    pub fn new(name: impl Into<String>, device: Arc<dyn BlockDevice>) -> Self {
        Self {
            name: name.into(),
            device,
            revoked: AtomicBool::new(false),
        }
    }

    /// Every later request fails (ESHUTDOWN) and new connections are refused.
    pub fn revoke(&self) {
        self.revoked.store(true, Ordering::SeqCst);
    }

    pub fn is_revoked(&self) -> bool {
        self.revoked.load(Ordering::SeqCst)
    }

    fn transmission_flags(&self) -> u16 {
        let mut f = TF_HAS_FLAGS | TF_SEND_FLUSH | TF_SEND_FUA;
        if self.device.read_only() {
            f |= TF_READ_ONLY;
        } else {
            f |= TF_SEND_TRIM;
        }
        f
    }
}

/// A connection the server reads from and writes to.
pub trait Connection: Read + Write {
    /// The handshake is over (the client is in transmission): from now on it may idle
    /// between requests, and any handshake deadline is lifted.
    fn handshake_over(&mut self) {}
}

impl Connection for UnixStream {}
impl Connection for std::net::TcpStream {}
impl<C: Connection + ?Sized> Connection for &mut C {
    fn handshake_over(&mut self) {
        (**self).handshake_over()
    }
}

/// TLS for an export: the server configuration (which requires a client certificate of the
/// host agents' CA), and the identity the client's certificate must carry (a subjectAltName
/// DNS name or URI, see [`super::identity`]) when the export was prepared for one host.
#[derive(Clone)]
pub struct TlsAccess {
    pub config: Arc<rustls::ServerConfig>,
    pub client_identity: Option<String>,
}

/// A TLS client whose verified certificate does not carry the export's host identity: the
/// error (kind `PermissionDenied`) a refused connection ends with, naming what it presented.
#[derive(Debug, thiserror::Error)]
#[error(
    "the client certificate carries {presented:?}, not the export's host identity {required:?}"
)]
pub struct Refused {
    pub required: String,
    /// The DNS names and URIs of the client's certificate.
    pub presented: Vec<String>,
}

/// Why a connection ended.
#[derive(Debug, PartialEq, Eq)]
pub enum End {
    /// The client aborted the handshake or disconnected cleanly.
    Client,
    /// The export was revoked while connected.
    Revoked,
}

fn protocol(m: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, m.into())
}

fn read_u16(r: &mut impl Read) -> io::Result<u16> {
    let mut b = [0u8; 2];
    r.read_exact(&mut b)?;
    Ok(u16::from_be_bytes(b))
}

fn read_u32(r: &mut impl Read) -> io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

fn read_u64(r: &mut impl Read) -> io::Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

fn option_reply(w: &mut impl Write, option: u32, kind: u32, data: &[u8]) -> io::Result<()> {
    let mut out = Vec::with_capacity(20 + data.len());
    out.extend_from_slice(&REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
    w.write_all(&out)
}

/// How option haggling ended.
enum Haggled {
    Transmit,
    StartTls,
    Done(End),
}

/// The server's greeting, the first bytes of every connection.
pub fn greeting() -> [u8; 18] {
    let mut hello = [0u8; 18];
    hello[..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    hello[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    hello[16..].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    hello
}

/// Serves one client connection until it disconnects, the export is revoked, or the client
/// breaks the protocol (an error naming what was wrong). With `tls`, the client must upgrade
/// with STARTTLS before anything else.
pub fn serve<S: Connection>(
    stream: &mut S,
    export: &Export,
    tls: Option<&TlsAccess>,
) -> io::Result<End> {
    if export.is_revoked() {
        return Ok(End::Revoked);
    }
    stream.write_all(&greeting())?;
    serve_greeted(stream, export, tls)
}

/// [`serve`] on a connection that was sent the [`greeting`] already.
pub fn serve_greeted<S: Connection>(
    stream: &mut S,
    export: &Export,
    tls: Option<&TlsAccess>,
) -> io::Result<End> {
    if export.is_revoked() {
        return Ok(End::Revoked);
    }
    let client_flags = read_u32(stream)?;
    if client_flags & CLIENT_FIXED_NEWSTYLE == 0 {
        return Err(protocol("the client does not speak fixed newstyle"));
    }
    if client_flags & !(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES) != 0 {
        return Err(protocol(format!("unknown client flags {client_flags:#x}")));
    }
    let no_zeroes = client_flags & CLIENT_NO_ZEROES != 0;
    let mut options = 0;
    match haggle(
        stream,
        export,
        no_zeroes,
        Tls::from(tls.is_some()),
        &mut options,
    )? {
        Haggled::Transmit => {
            stream.handshake_over();
            transmission(stream, export)
        }
        Haggled::Done(end) => Ok(end),
        Haggled::StartTls => {
            let access = tls.expect("STARTTLS is accepted only with a TLS configuration");
            let mut session = rustls::ServerConnection::new(access.config.clone())
                .map_err(|e| io::Error::other(format!("TLS: {e}")))?;
            while session.is_handshaking() {
                session.complete_io(stream)?;
            }
            if let Some(required) = &access.client_identity {
                let presented = session
                    .peer_certificates()
                    .and_then(|c| c.first())
                    .map(|leaf| super::identity::identities(leaf.as_ref()))
                    .unwrap_or_default();
                if !super::identity::carries(&presented, required) {
                    // The close_notify goes out; nothing more is read from this client.
                    session.send_close_notify();
                    while session.wants_write() {
                        if session.write_tls(stream).is_err() {
                            break;
                        }
                    }
                    return Err(io::Error::new(
                        io::ErrorKind::PermissionDenied,
                        Refused {
                            required: required.clone(),
                            presented,
                        },
                    ));
                }
            }
            let mut secure = rustls::Stream::new(&mut session, stream);
            let end = match haggle(&mut secure, export, no_zeroes, Tls::Active, &mut options)? {
                Haggled::Transmit => {
                    secure.sock.handshake_over();
                    transmission(&mut secure, export)?
                }
                Haggled::Done(end) => end,
                Haggled::StartTls => unreachable!("refused inside TLS"),
            };
            secure.conn.send_close_notify();
            let _ = secure.flush();
            Ok(end)
        }
    }
}

/// Where the connection stands with TLS.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Tls {
    /// This export has no TLS configuration: STARTTLS is unsupported.
    Unavailable,
    /// TLS is required and not started yet.
    Required,
    /// The session is inside TLS.
    Active,
}

impl From<bool> for Tls {
    fn from(configured: bool) -> Self {
        if configured {
            Tls::Required
        } else {
            Tls::Unavailable
        }
    }
}

fn haggle<S: Read + Write>(
    stream: &mut S,
    export: &Export,
    no_zeroes: bool,
    tls: Tls,
    options: &mut usize,
) -> io::Result<Haggled> {
    loop {
        *options += 1;
        if *options > MAX_OPTIONS {
            return Err(protocol(format!("more than {MAX_OPTIONS} options")));
        }
        if read_u64(stream)? != IHAVEOPT {
            return Err(protocol("option without IHAVEOPT magic"));
        }
        let option = read_u32(stream)?;
        let len = read_u32(stream)?;
        if len > MAX_OPTION {
            return Err(protocol(format!("option {option} of {len} bytes")));
        }
        let mut data = vec![0u8; len as usize];
        stream.read_exact(&mut data)?;
        if tls == Tls::Required && !matches!(option, OPT_STARTTLS | OPT_ABORT) {
            if option == OPT_EXPORT_NAME {
                // No error reply exists for this option: the connection just closes.
                return Err(protocol("EXPORT_NAME before STARTTLS on a TLS-only export"));
            }
            option_reply(
                stream,
                option,
                REP_ERR_TLS_REQD,
                b"this export requires TLS",
            )?;
            continue;
        }
        match option {
            OPT_STARTTLS => match tls {
                Tls::Required if data.is_empty() => {
                    option_reply(stream, option, REP_ACK, &[])?;
                    return Ok(Haggled::StartTls);
                }
                Tls::Required => {
                    option_reply(stream, option, REP_ERR_INVALID, b"STARTTLS takes no data")?
                }
                Tls::Active => option_reply(stream, option, REP_ERR_INVALID, b"TLS is already on")?,
                Tls::Unavailable => option_reply(stream, option, REP_ERR_UNSUP, &[])?,
            },
            OPT_EXPORT_NAME => {
                // No reply on error is possible here: the connection just closes. The name
                // must be the export's own (never empty: no default export).
                if data.is_empty() || data != export.name.as_bytes() {
                    return Err(protocol("unknown export name"));
                }
                let mut out = export.device.size().to_be_bytes().to_vec();
                out.extend_from_slice(&export.transmission_flags().to_be_bytes());
                if !no_zeroes {
                    out.extend_from_slice(&[0u8; 124]);
                }
                stream.write_all(&out)?;
                return Ok(Haggled::Transmit);
            }
            OPT_ABORT => {
                option_reply(stream, option, REP_ACK, &[])?;
                return Ok(Haggled::Done(End::Client));
            }
            OPT_LIST => {
                if !data.is_empty() {
                    option_reply(stream, option, REP_ERR_INVALID, b"LIST takes no data")?;
                    continue;
                }
                let mut item = (export.name.len() as u32).to_be_bytes().to_vec();
                item.extend_from_slice(export.name.as_bytes());
                option_reply(stream, option, REP_SERVER, &item)?;
                option_reply(stream, option, REP_ACK, &[])?;
            }
            OPT_INFO | OPT_GO => {
                let Some(name) = parse_info_request(&data) else {
                    option_reply(
                        stream,
                        option,
                        REP_ERR_INVALID,
                        b"malformed INFO/GO request",
                    )?;
                    continue;
                };
                // Only the export's own name: an empty one (the "default export") is
                // unknown too.
                if name.is_empty() || name != export.name.as_bytes() {
                    option_reply(stream, option, REP_ERR_UNKNOWN, b"no such export")?;
                    continue;
                }
                let mut info = INFO_EXPORT.to_be_bytes().to_vec();
                info.extend_from_slice(&export.device.size().to_be_bytes());
                info.extend_from_slice(&export.transmission_flags().to_be_bytes());
                option_reply(stream, option, REP_INFO, &info)?;
                let mut sizes = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
                sizes.extend_from_slice(&1u32.to_be_bytes());
                sizes.extend_from_slice(&4096u32.to_be_bytes());
                sizes.extend_from_slice(&MAX_REQUEST.to_be_bytes());
                option_reply(stream, option, REP_INFO, &sizes)?;
                option_reply(stream, option, REP_ACK, &[])?;
                if option == OPT_GO {
                    return Ok(Haggled::Transmit);
                }
            }
            _ => option_reply(stream, option, REP_ERR_UNSUP, &[])?,
        }
    }
}

/// `u32 name length, name, u16 count, count * u16 info types`.
fn parse_info_request(data: &[u8]) -> Option<&[u8]> {
    let len = u32::from_be_bytes(data.get(..4)?.try_into().ok()?) as usize;
    let name = data.get(4..4 + len)?;
    let count = u16::from_be_bytes(data.get(4 + len..6 + len)?.try_into().ok()?) as usize;
    (data.len() == 6 + len + 2 * count).then_some(name)
}

fn errno(e: &io::Error) -> u32 {
    match e.kind() {
        io::ErrorKind::InvalidInput => EINVAL,
        io::ErrorKind::PermissionDenied => EPERM,
        io::ErrorKind::NotConnected => ESHUTDOWN,
        io::ErrorKind::StorageFull => ENOSPC,
        _ => EIO,
    }
}

fn reply(w: &mut impl Write, error: u32, handle: u64, data: &[u8]) -> io::Result<()> {
    let mut out = Vec::with_capacity(16 + data.len());
    out.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&handle.to_be_bytes());
    out.extend_from_slice(data);
    w.write_all(&out)
}

fn transmission<S: Read + Write>(stream: &mut S, export: &Export) -> io::Result<End> {
    let device = &export.device;
    let mut buf = Vec::new();
    loop {
        let magic = match read_u32(stream) {
            Ok(m) => m,
            // A client that hangs up without DISC.
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(End::Client),
            Err(e) => return Err(e),
        };
        if magic != REQUEST_MAGIC {
            return Err(protocol(format!("request magic {magic:#x}")));
        }
        let flags = read_u16(stream)?;
        let kind = read_u16(stream)?;
        let handle = read_u64(stream)?;
        let offset = read_u64(stream)?;
        let len = read_u32(stream)?;
        if kind == CMD_WRITE {
            if len > MAX_REQUEST {
                // Its payload is not read (it could be 4 GiB): the stream cannot be followed
                // past it, so the error reply is the last thing sent.
                reply(stream, EINVAL, handle, &[])?;
                return Err(protocol(format!("a {len}-byte write")));
            }
            buf.resize(len as usize, 0);
            stream.read_exact(&mut buf)?;
        }
        if export.is_revoked() {
            reply(stream, ESHUTDOWN, handle, &[])?;
            return Ok(End::Revoked);
        }
        // Per the protocol: EINVAL for a range that overflows or a read or trim past the end,
        // ENOSPC for a write past the end.
        let end = offset.checked_add(u64::from(len));
        let in_range = end.is_some_and(|end| end <= device.size());
        let out_of_range = |kind| {
            if end.is_some() && kind == CMD_WRITE {
                io::Error::from(io::ErrorKind::StorageFull)
            } else {
                io::Error::from(io::ErrorKind::InvalidInput)
            }
        };
        match kind {
            CMD_READ => {
                if len > MAX_REQUEST || !in_range {
                    reply(stream, EINVAL, handle, &[])?;
                    continue;
                }
                buf.resize(len as usize, 0);
                match device.read_at(&mut buf, offset) {
                    Ok(()) => reply(stream, 0, handle, &buf)?,
                    Err(e) => reply(stream, errno(&e), handle, &[])?,
                }
                // Plaintext does not linger in the connection's buffer.
                buf.fill(0);
            }
            CMD_WRITE => {
                let result = if !in_range {
                    Err(out_of_range(CMD_WRITE))
                } else {
                    device.write_at(&buf, offset).and_then(|()| {
                        if flags & CMD_FLAG_FUA != 0 {
                            device.flush()
                        } else {
                            Ok(())
                        }
                    })
                };
                buf.fill(0);
                reply(stream, result.err().map_or(0, |e| errno(&e)), handle, &[])?;
            }
            CMD_FLUSH => {
                let r = device.flush();
                reply(stream, r.err().map_or(0, |e| errno(&e)), handle, &[])?;
            }
            CMD_TRIM => {
                let r = if in_range {
                    device.trim(offset, u64::from(len))
                } else {
                    Err(out_of_range(CMD_TRIM))
                };
                reply(stream, r.err().map_or(0, |e| errno(&e)), handle, &[])?;
            }
            CMD_DISC => return Ok(End::Client),
            _ => reply(stream, ENOTSUP, handle, &[])?,
        }
    }
}
