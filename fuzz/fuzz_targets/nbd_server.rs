//! The NBD server (handshake, option haggling, transmission) on arbitrary client bytes, over
//! an in-memory device: never panics, always greets first, never touches the device outside
//! its range, and answers no more than `MAX_OPTIONS` options. The first byte picks the mode:
//! a Unix-socket-style export, or a TCP-style one with TLS forced (whose STARTTLS leads into a
//! real rustls handshake with whatever follows).
#![no_main]

use std::io::{self, Read, Write};
use std::sync::{Arc, Mutex, OnceLock};

use ipu_image_svc::blockstore::BlockDevice;
use ipu_image_svc::export::nbd::{self, Connection, Export, TlsAccess};
use libfuzzer_sys::fuzz_target;

/// A device in memory that checks every access against its size itself.
struct Memory {
    bytes: Mutex<Vec<u8>>,
    read_only: bool,
}

impl Memory {
    fn range(&self, offset: u64, len: usize) -> io::Result<std::ops::Range<usize>> {
        let size = self.bytes.lock().unwrap().len() as u64;
        match offset.checked_add(len as u64) {
            Some(end) if end <= size => Ok(offset as usize..end as usize),
            // The server must have refused these before asking the device.
            _ => panic!("the server asked for {len} bytes at {offset} of a {size}-byte device"),
        }
    }
}

impl BlockDevice for Memory {
    fn size(&self) -> u64 {
        self.bytes.lock().unwrap().len() as u64
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let r = self.range(offset, buf.len())?;
        buf.copy_from_slice(&self.bytes.lock().unwrap()[r]);
        Ok(())
    }
    fn write_at(&self, data: &[u8], offset: u64) -> io::Result<()> {
        if self.read_only {
            return Err(io::ErrorKind::PermissionDenied.into());
        }
        let r = self.range(offset, data.len())?;
        self.bytes.lock().unwrap()[r].copy_from_slice(data);
        Ok(())
    }
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
    fn trim(&self, offset: u64, len: u64) -> io::Result<()> {
        if self.read_only {
            return Err(io::ErrorKind::PermissionDenied.into());
        }
        self.range(offset, len as usize).map(|_| ())
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
}

/// The client's bytes in, the server's bytes out.
struct Wire<'a> {
    input: &'a [u8],
    output: Vec<u8>,
}

impl Read for Wire<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.input.read(buf)
    }
}

impl Write for Wire<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.output.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Connection for Wire<'_> {}

/// A TLS server configuration with a throwaway certificate and CA, made once.
fn tls() -> &'static TlsAccess {
    static TLS: OnceLock<TlsAccess> = OnceLock::new();
    TLS.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("nbd-fuzz-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        std::fs::write(dir.join("cert.pem"), cert.pem()).unwrap();
        std::fs::write(dir.join("key.pem"), key.serialize_pem()).unwrap();
        let config = ipu_image_svc::export::tls::server_config(
            &dir.join("cert.pem"),
            &dir.join("key.pem"),
            &dir.join("cert.pem"),
        )
        .unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        TlsAccess {
            config,
            client_identity: Some("host-a.test".into()),
        }
    })
}

const REPLY_MAGIC: [u8; 8] = 0x0003_e889_0455_65a9u64.to_be_bytes();

fuzz_target!(|data: &[u8]| {
    let Some((&mode, input)) = data.split_first() else {
        return;
    };
    let size = 4096 * (1 + usize::from(mode >> 2));
    let device = Arc::new(Memory {
        bytes: Mutex::new(vec![0x5a; size]),
        read_only: mode & 2 != 0,
    });
    let export = Export::new("fn-fuzz", device);
    let access = (mode & 1 != 0).then(tls);
    let mut wire = Wire {
        input,
        output: Vec::new(),
    };
    let _ = nbd::serve(&mut wire, &export, access);
    assert_eq!(wire.output[..18], nbd::greeting());
    // Option replies are all in the clear part (no TLS) or counted before it: at most one
    // per option, a few for GO/INFO/LIST, and never past the bound on options.
    if access.is_none() {
        let replies = wire.output.windows(8).filter(|w| *w == REPLY_MAGIC).count();
        assert!(
            replies <= 4 * nbd::MAX_OPTIONS + 16,
            "{replies} option replies"
        );
    }
});
