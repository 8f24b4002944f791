//! A minimal NBD client over a Unix socket: the fixed newstyle handshake with `OPT_GO` for one
//! named export, then READ, WRITE, FLUSH and DISC with simple replies, one request at a time
//! (https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md).
//!
//! Written here rather than taken from a crate: the Rust NBD crates are servers, or clients
//! that need libnbd's C library; this is the subset [`crate::fuse_file`] needs, and the
//! IPU's server (`ipu_image_svc::export::nbd`) is the one peer it talks to.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
const FLAG_NO_ZEROES: u16 = 1 << 1;

const OPT_GO: u32 = 7;
const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const REP_FLAG_ERROR: u32 = 1 << 31;
const INFO_EXPORT: u16 = 0;

const TF_SEND_FLUSH: u16 = 1 << 2;

const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;

/// Largest option reply read from the server.
const MAX_OPTION_REPLY: u32 = 64 * 1024;

fn protocol(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

/// A connection in transmission to one export.
#[derive(Debug)]
pub struct NbdClient {
    stream: UnixStream,
    size: u64,
    flags: u16,
    handle: u64,
}

impl NbdClient {
    /// Connects to `socket` and opens the export `name` (`OPT_GO`).
    pub fn connect(socket: &Path, name: &str) -> io::Result<Self> {
        let stream = UnixStream::connect(socket)?;
        Self::handshake(stream, name)
    }

    fn handshake(mut stream: UnixStream, name: &str) -> io::Result<Self> {
        let mut greeting = [0u8; 18];
        stream.read_exact(&mut greeting)?;
        let magic = u64::from_be_bytes(greeting[0..8].try_into().expect("8 bytes"));
        let opt = u64::from_be_bytes(greeting[8..16].try_into().expect("8 bytes"));
        let server_flags = u16::from_be_bytes([greeting[16], greeting[17]]);
        if magic != NBDMAGIC || opt != IHAVEOPT {
            return Err(protocol(
                "the export did not greet as a newstyle NBD server".into(),
            ));
        }
        if server_flags & FLAG_FIXED_NEWSTYLE == 0 {
            return Err(protocol(
                "the NBD server does not speak fixed newstyle".into(),
            ));
        }
        let client_flags = u32::from(FLAG_FIXED_NEWSTYLE | (server_flags & FLAG_NO_ZEROES));
        let mut go = Vec::with_capacity(32 + name.len());
        go.extend_from_slice(&client_flags.to_be_bytes());
        go.extend_from_slice(&IHAVEOPT.to_be_bytes());
        go.extend_from_slice(&OPT_GO.to_be_bytes());
        let name_len =
            u32::try_from(name.len()).map_err(|_| protocol("export name too long".into()))?;
        go.extend_from_slice(&(4 + name_len + 2).to_be_bytes());
        go.extend_from_slice(&name_len.to_be_bytes());
        go.extend_from_slice(name.as_bytes());
        go.extend_from_slice(&0u16.to_be_bytes()); // no information requests
        stream.write_all(&go)?;
        let mut export = None;
        loop {
            let mut header = [0u8; 20];
            stream.read_exact(&mut header)?;
            let magic = u64::from_be_bytes(header[0..8].try_into().expect("8 bytes"));
            let option = u32::from_be_bytes(header[8..12].try_into().expect("4 bytes"));
            let reply = u32::from_be_bytes(header[12..16].try_into().expect("4 bytes"));
            let len = u32::from_be_bytes(header[16..20].try_into().expect("4 bytes"));
            if magic != REPLY_MAGIC || option != OPT_GO || len > MAX_OPTION_REPLY {
                return Err(protocol(format!(
                    "a malformed reply to OPT_GO (option {option}, {len} bytes)"
                )));
            }
            let mut data = vec![0u8; len as usize];
            stream.read_exact(&mut data)?;
            if reply & REP_FLAG_ERROR != 0 {
                let message = String::from_utf8_lossy(&data).into_owned();
                return Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("the NBD server refused export {name:?} (error {reply:#x}): {message}"),
                ));
            }
            match reply {
                REP_INFO
                    if data.len() >= 12
                        && u16::from_be_bytes([data[0], data[1]]) == INFO_EXPORT =>
                {
                    let size = u64::from_be_bytes(data[2..10].try_into().expect("8 bytes"));
                    let flags = u16::from_be_bytes([data[10], data[11]]);
                    export = Some((size, flags));
                }
                REP_INFO => {}
                REP_ACK => break,
                other => return Err(protocol(format!("an unexpected reply {other} to OPT_GO"))),
            }
        }
        let (size, flags) = export.ok_or_else(|| {
            protocol("the NBD server ended OPT_GO without the export's size".into())
        })?;
        Ok(Self {
            stream,
            size,
            flags,
            handle: 0,
        })
    }

    /// The export's size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    fn request(&mut self, kind: u16, offset: u64, len: u32, data: &[u8]) -> io::Result<()> {
        self.handle = self.handle.wrapping_add(1);
        let mut r = [0u8; 28];
        r[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        r[6..8].copy_from_slice(&kind.to_be_bytes());
        r[8..16].copy_from_slice(&self.handle.to_be_bytes());
        r[16..24].copy_from_slice(&offset.to_be_bytes());
        r[24..28].copy_from_slice(&len.to_be_bytes());
        self.stream.write_all(&r)?;
        if !data.is_empty() {
            self.stream.write_all(data)?;
        }
        Ok(())
    }

    /// The simple reply to the last request: `Err` with the server's errno.
    fn reply(&mut self) -> io::Result<()> {
        let mut r = [0u8; 16];
        self.stream.read_exact(&mut r)?;
        let magic = u32::from_be_bytes(r[0..4].try_into().expect("4 bytes"));
        let error = u32::from_be_bytes(r[4..8].try_into().expect("4 bytes"));
        let handle = u64::from_be_bytes(r[8..16].try_into().expect("8 bytes"));
        if magic != SIMPLE_REPLY_MAGIC || handle != self.handle {
            return Err(protocol(format!(
                "a malformed NBD reply (magic {magic:#x}, handle {handle})"
            )));
        }
        if error != 0 {
            return Err(io::Error::from_raw_os_error(error as i32));
        }
        Ok(())
    }

    /// Reads `buf.len()` bytes at `offset`.
    pub fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let len = u32::try_from(buf.len()).map_err(|_| protocol("read too large".into()))?;
        self.request(CMD_READ, offset, len, &[])?;
        self.reply()?;
        self.stream.read_exact(buf)
    }

    /// Writes `data` at `offset`.
    pub fn write_at(&mut self, data: &[u8], offset: u64) -> io::Result<()> {
        let len = u32::try_from(data.len()).map_err(|_| protocol("write too large".into()))?;
        self.request(CMD_WRITE, offset, len, data)?;
        self.reply()
    }

    /// Makes the writes so far durable on the server, if it keeps a cache.
    pub fn flush(&mut self) -> io::Result<()> {
        if self.flags & TF_SEND_FLUSH == 0 {
            return Ok(());
        }
        self.request(CMD_FLUSH, 0, 0, &[])?;
        self.reply()
    }

    /// Tells the server the connection ends (it sends no reply); nothing more is sent on it.
    pub fn disconnect(&mut self) {
        let _ = self.request(CMD_DISC, 0, 0, &[]);
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::thread;

    /// A scripted server end: the greeting, then `script` run on the socket.
    fn serve(script: impl FnOnce(&mut UnixStream) + Send + 'static) -> UnixStream {
        let (client, mut server) = UnixStream::pair().unwrap();
        thread::spawn(move || {
            let mut g = Vec::new();
            g.extend_from_slice(&NBDMAGIC.to_be_bytes());
            g.extend_from_slice(&IHAVEOPT.to_be_bytes());
            g.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
            server.write_all(&g).unwrap();
            script(&mut server);
        });
        client
    }

    fn read_go(s: &mut UnixStream) -> String {
        let mut head = [0u8; 20];
        s.read_exact(&mut head).unwrap();
        assert_eq!(u32::from_be_bytes(head[0..4].try_into().unwrap()), 3);
        assert_eq!(u32::from_be_bytes(head[12..16].try_into().unwrap()), OPT_GO);
        let len = u32::from_be_bytes(head[16..20].try_into().unwrap());
        let mut data = vec![0u8; len as usize];
        s.read_exact(&mut data).unwrap();
        let n = u32::from_be_bytes(data[0..4].try_into().unwrap()) as usize;
        String::from_utf8(data[4..4 + n].to_vec()).unwrap()
    }

    fn option_reply(s: &mut UnixStream, reply: u32, data: &[u8]) {
        let mut r = Vec::new();
        r.extend_from_slice(&REPLY_MAGIC.to_be_bytes());
        r.extend_from_slice(&OPT_GO.to_be_bytes());
        r.extend_from_slice(&reply.to_be_bytes());
        r.extend_from_slice(&(data.len() as u32).to_be_bytes());
        r.extend_from_slice(data);
        s.write_all(&r).unwrap();
    }

    #[test]
    fn the_export_is_opened_by_name_and_read_and_written() {
        let client = serve(|s| {
            assert_eq!(read_go(s), "clone-1");
            let mut info = INFO_EXPORT.to_be_bytes().to_vec();
            info.extend_from_slice(&(1u64 << 20).to_be_bytes());
            info.extend_from_slice(&(TF_SEND_FLUSH | 1).to_be_bytes());
            option_reply(s, REP_INFO, &info);
            option_reply(s, REP_ACK, &[]);
            // READ 4 bytes at 512, answered with "abcd"; WRITE 2 bytes; FLUSH; a READ
            // answered with EIO.
            for (kind, data) in [(CMD_READ, &b"abcd"[..]), (CMD_WRITE, b""), (CMD_FLUSH, b"")] {
                let mut r = [0u8; 28];
                s.read_exact(&mut r).unwrap();
                assert_eq!(u16::from_be_bytes([r[6], r[7]]), kind);
                let len = u32::from_be_bytes(r[24..28].try_into().unwrap());
                if kind == CMD_READ {
                    assert_eq!(u64::from_be_bytes(r[16..24].try_into().unwrap()), 512);
                }
                if kind == CMD_WRITE {
                    let mut w = vec![0u8; len as usize];
                    s.read_exact(&mut w).unwrap();
                    assert_eq!(w, b"xy");
                }
                let mut reply = SIMPLE_REPLY_MAGIC.to_be_bytes().to_vec();
                reply.extend_from_slice(&0u32.to_be_bytes());
                reply.extend_from_slice(&r[8..16]);
                reply.extend_from_slice(data);
                s.write_all(&reply).unwrap();
            }
            let mut r = [0u8; 28];
            s.read_exact(&mut r).unwrap();
            let mut reply = SIMPLE_REPLY_MAGIC.to_be_bytes().to_vec();
            reply.extend_from_slice(&5u32.to_be_bytes());
            reply.extend_from_slice(&r[8..16]);
            s.write_all(&reply).unwrap();
        });
        let mut c = NbdClient::handshake(client, "clone-1").unwrap();
        assert_eq!(c.size(), 1 << 20);
        let mut buf = [0u8; 4];
        c.read_at(&mut buf, 512).unwrap();
        assert_eq!(&buf, b"abcd");
        c.write_at(b"xy", 0).unwrap();
        c.flush().unwrap();
        let e = c.read_at(&mut buf, 0).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(5));
    }

    #[test]
    fn a_refused_or_malformed_handshake_is_an_error_naming_it() {
        let client = serve(|s| {
            read_go(s);
            option_reply(s, REP_FLAG_ERROR | 6, b"no such export");
        });
        let e = NbdClient::handshake(client, "gone").unwrap_err();
        assert!(e.to_string().contains("refused export \"gone\""), "{e}");
        assert!(e.to_string().contains("no such export"), "{e}");
        // An ACK without the export's size.
        let client = serve(|s| {
            read_go(s);
            option_reply(s, REP_ACK, &[]);
        });
        let e = NbdClient::handshake(client, "x").unwrap_err();
        assert!(e.to_string().contains("without the export's size"), "{e}");
        // Not an NBD server at all.
        let (client, mut server) = UnixStream::pair().unwrap();
        server.write_all(&[0u8; 18]).unwrap();
        let e = NbdClient::handshake(client, "x").unwrap_err();
        assert!(e.to_string().contains("newstyle"), "{e}");
    }
}
