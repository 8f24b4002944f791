//! Hostile clients of the NBD exports, over both transports (a Unix socket, TCP with TLS):
//! floods of idle connections, a second host's valid certificate, empty and wrong export
//! names, option floods, handshakes that never end, and requests out of range. Each negative
//! case has its positive control in the same test: the legitimate client still gets in.
//!
//! The export runs in this process, so its threads and memory are this process's
//! (/proc/self/status); the tests here run one at a time (`SERIAL`) so that one's threads do
//! not count as another's.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ipu_image_svc::blockstore::base::BaseImage;
use ipu_image_svc::blockstore::clone::CloneDevice;
use ipu_image_svc::blockstore::xts::XtsKey;
use ipu_image_svc::blockstore::BlockDevice;
use ipu_image_svc::export::nbd::{Export, Refused, MAX_OPTIONS, MAX_REQUEST};
use ipu_image_svc::export::{Endpoint, HostExport, TcpAccess, HANDSHAKE_DEADLINE};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, SanType};

const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const OPT_EXPORT_NAME: u32 = 1;
const OPT_ABORT: u32 = 2;
const OPT_STARTTLS: u32 = 5;
const OPT_INFO: u32 = 6;
const OPT_GO: u32 = 7;
const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_TRIM: u16 = 4;
const EINVAL: u32 = 22;
const ENOSPC: u32 = 28;

/// Held by each test for its whole run.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

const HOST_A: &str = "host-a.ipu.test";
const HOST_B: &str = "host-b.ipu.test";

/// A writable clone of a small base (1 MiB of a pattern), exported as `name`.
fn clone(dir: &Path, name: &str) -> Arc<CloneDevice> {
    let plain = dir.join(format!("{name}.plain"));
    let bytes: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8).collect();
    std::fs::write(&plain, bytes).unwrap();
    let base = BaseImage::build(
        &plain,
        &dir.join(format!("{name}.base")),
        XtsKey::generate().unwrap(),
    )
    .unwrap();
    Arc::new(CloneDevice::create(Arc::new(base), dir, name, 0).unwrap())
}

/// A platform CA, the IPU's export certificate, and two hosts' client certificates (each
/// carrying its host identity as a DNS subjectAltName), as libnbd directories.
struct Pki {
    server: Arc<rustls::ServerConfig>,
    /// libnbd's `tls-certificates` directory of each host.
    host_a: PathBuf,
    host_b: PathBuf,
    /// rustls client configurations of the same hosts.
    client_a: Arc<rustls::ClientConfig>,
}

fn pki(dir: &Path) -> Pki {
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.distinguished_name.push(DnType::CommonName, "platform CA");
    let ca_key = KeyPair::generate().unwrap();
    let ca = p.self_signed(&ca_key).unwrap();
    let issue = |names: Vec<String>, ip: bool, cn: &str| {
        let mut p = CertificateParams::new(names).unwrap();
        if ip {
            p.subject_alt_names
                .push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
        }
        p.distinguished_name.push(DnType::CommonName, cn);
        let key = KeyPair::generate().unwrap();
        let cert = p.signed_by(&key, &ca, &ca_key).unwrap();
        (cert.pem(), key.serialize_pem())
    };
    let ipu = dir.join("ipu");
    std::fs::create_dir_all(&ipu).unwrap();
    let (c, k) = issue(vec!["localhost".into()], true, "ipu export");
    std::fs::write(ipu.join("cert.pem"), c).unwrap();
    std::fs::write(ipu.join("key.pem"), k).unwrap();
    std::fs::write(ipu.join("ca.pem"), ca.pem()).unwrap();
    let server = ipu_image_svc::export::tls::server_config(
        &ipu.join("cert.pem"),
        &ipu.join("key.pem"),
        &ipu.join("ca.pem"),
    )
    .unwrap();
    let host = |name: &str| {
        let d = dir.join(name);
        std::fs::create_dir_all(&d).unwrap();
        let (c, k) = issue(vec![name.to_string()], false, name);
        std::fs::write(d.join("client-cert.pem"), c).unwrap();
        std::fs::write(d.join("client-key.pem"), k).unwrap();
        std::fs::write(d.join("ca-cert.pem"), ca.pem()).unwrap();
        d
    };
    let (host_a, host_b) = (host(HOST_A), host(HOST_B));
    let client_a = client_config(&host_a);
    Pki {
        server,
        host_a,
        host_b,
        client_a,
    }
}

fn client_config(dir: &Path) -> Arc<rustls::ClientConfig> {
    let pem = |f: &str| std::fs::read(dir.join(f)).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls_pemfile::certs(&mut pem("ca-cert.pem").as_slice()) {
        roots.add(c.unwrap()).unwrap();
    }
    let chain = rustls_pemfile::certs(&mut pem("client-cert.pem").as_slice())
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = rustls_pemfile::private_key(&mut pem("client-key.pem").as_slice())
        .unwrap()
        .unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Arc::new(
        rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .unwrap(),
    )
}

/// Refusals the export reported, by the identities presented.
type Refusals = Arc<Mutex<Vec<Vec<String>>>>;

fn tcp_export(dir: &Path, pki: &Pki, name: &str) -> (HostExport, Refusals) {
    let refusals: Refusals = Arc::default();
    let seen = refusals.clone();
    let access = TcpAccess {
        tls: pki.server.clone(),
        client_identity: Some(HOST_A.into()),
        on_refused: Some(Box::new(move |r: &Refused, _| {
            seen.lock().unwrap().push(r.presented.clone())
        })),
    };
    let export = HostExport::tcp(
        Export::new(name, clone(dir, name)),
        "127.0.0.1".parse().unwrap(),
        access,
    )
    .unwrap();
    (export, refusals)
}

fn tcp_addr(export: &HostExport) -> SocketAddr {
    match export.endpoint() {
        Endpoint::Tcp(a) => *a,
        other => panic!("{other:?}"),
    }
}

fn nbdinfo_size(uri: &str) -> std::process::Output {
    Command::new("nbdinfo")
        .args(["--size", uri])
        .output()
        .expect("nbdinfo (apt install libnbd-bin)")
}

fn nbds(export: &HostExport, name: &str, certs: &Path) -> String {
    format!(
        "nbds://{}/{name}?tls-certificates={}",
        tcp_addr(export),
        certs.display()
    )
}

fn status_field(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .unwrap_or_else(|| panic!("{field} in /proc/self/status"))
        .trim()
        .trim_end_matches(" kB")
        .parse()
        .unwrap()
}

fn threads() -> u64 {
    status_field("Threads:")
}

fn fds() -> u64 {
    std::fs::read_dir("/proc/self/fd").unwrap().count() as u64
}

fn rss_kib() -> u64 {
    status_field("VmRSS:")
}

/// Room for the test's thousands of sockets: at least 8,192 descriptors (root may raise the
/// hard limit), else as many as the hard limit allows.
fn raise_fd_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let l = getrlimit(Resource::Nofile);
    let want = l.maximum.map(|m| m.max(8192));
    let raised = setrlimit(
        Resource::Nofile,
        Rlimit {
            current: want,
            maximum: want,
        },
    );
    if raised.is_err() {
        setrlimit(
            Resource::Nofile,
            Rlimit {
                current: l.maximum,
                maximum: l.maximum,
            },
        )
        .unwrap();
    }
}

/// 2,000 idle TCP connections to one export, and 50 more that answer the greeting and then
/// stall: the export's threads stay under a fixed bound and its memory bounded, and the
/// legitimate host still attaches within a second. A second host's valid certificate (same
/// CA) is refused and reported; an empty or wrong export name is refused.
#[test]
fn idle_connections_cannot_exhaust_an_export_or_keep_its_host_out() {
    let _serial = serial();
    raise_fd_limit();
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    let (export, refusals) = tcp_export(dir.path(), &pki, "fn-flood");
    let addr = tcp_addr(&export);
    // Positive control before the flood, and the baseline (the pool's worker made).
    let ok = nbdinfo_size(&nbds(&export, "fn-flood", &pki.host_a));
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let (threads_before, rss_before, fds_before) = (threads(), rss_kib(), fds());

    let mut idle = Vec::new();
    for _ in 0..2000 {
        idle.push(TcpStream::connect(addr).unwrap());
    }
    for _ in 0..50 {
        let mut s = TcpStream::connect(addr).unwrap();
        let mut greeting = [0u8; 18];
        s.read_exact(&mut greeting).unwrap();
        s.write_all(&3u32.to_be_bytes()).unwrap();
        idle.push(s);
    }
    std::thread::sleep(Duration::from_millis(500));
    let (threads_during, rss_during) = (threads(), rss_kib());
    let bound = ipu_image_svc::export::pool::WORKERS as u64 + 4;
    assert!(
        threads_during <= threads_before + bound,
        "{threads_during} threads with the flood, {threads_before} before (bound +{bound})"
    );
    assert!(
        rss_during <= rss_before + 64 * 1024,
        "RSS {rss_during} KiB with the flood, {rss_before} KiB before"
    );
    assert!(export.connections() <= ipu_image_svc::export::MAX_CONNECTIONS_PER_EXPORT);
    // The export's own descriptors (all but the test's 2,050 client sockets) stay bounded
    // too: connections that never answer are closed, oldest first.
    let server_fds = fds() - fds_before - idle.len() as u64;
    let fd_bound = (ipu_image_svc::export::pool::MAX_WAITING_PER_EXPORT
        + 2 * ipu_image_svc::export::MAX_CONNECTIONS_PER_EXPORT
        + 8) as u64;
    assert!(
        server_fds <= fd_bound,
        "the export holds {server_fds} more descriptors (bound {fd_bound})"
    );

    // The legitimate host, while all of them are held open.
    let start = Instant::now();
    let ok = nbdinfo_size(&nbds(&export, "fn-flood", &pki.host_a));
    let took = start.elapsed();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&ok.stdout).trim(), "1048576");
    assert!(
        took < Duration::from_secs(1),
        "the host attached in {took:?}"
    );

    // Another host of the same CA: refused after the TLS handshake, and reported with what it
    // presented.
    assert!(refusals.lock().unwrap().is_empty());
    let other = nbdinfo_size(&nbds(&export, "fn-flood", &pki.host_b));
    assert!(
        !other.status.success(),
        "a second host's certificate is refused"
    );
    // Reported by the worker as it closes the connection: wait for it a little.
    for _ in 0..100 {
        if export.refused() > 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(export.refused(), 1);
    assert_eq!(*refusals.lock().unwrap(), vec![vec![HOST_B.to_string()]]);

    // No export name (libnbd's default export) and another name: refused.
    for name in ["", "fn-other"] {
        let out = nbdinfo_size(&nbds(&export, name, &pki.host_a));
        assert!(!out.status.success(), "export name {name:?} is refused");
    }
    // And the host still gets in.
    let ok = nbdinfo_size(&nbds(&export, "fn-flood", &pki.host_a));
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    drop(idle);
}

/// A host with a valid certificate of the CA, trying another host's export again and again:
/// every attempt is refused and counted, the first `REPORTED_REFUSALS` are reported one by one
/// (each an audit event in the service) and later ones only every `REPORTED_REFUSALS_EVERY`th,
/// so the refusals cannot flood the audit log. Host A still gets in.
#[test]
fn a_second_hosts_refusals_are_counted_and_reported_within_a_bound() {
    use ipu_image_svc::export::REPORTED_REFUSALS;
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    let (export, refusals) = tcp_export(dir.path(), &pki, "fn-refuse");
    let other = Transport::Tcp(tcp_addr(&export), client_config(&pki.host_b));
    let attempts = REPORTED_REFUSALS + 8;
    for _ in 0..attempts {
        let mut s = other.ready();
        let mut m = Vec::new();
        option(&mut m, OPT_GO, &go_request(b"fn-refuse"));
        // The handshake completes, then the server closes: no reply to GO.
        let _ = s.write_all(&m);
        assert!(read_reply(&mut s).is_err(), "host B was answered");
    }
    for _ in 0..100 {
        if export.refused() == attempts {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(export.refused(), attempts);
    let reported = refusals.lock().unwrap().clone();
    assert_eq!(reported.len() as u64, REPORTED_REFUSALS);
    assert!(reported.iter().all(|p| p == &vec![HOST_B.to_string()]));
    let host_a = Transport::Tcp(tcp_addr(&export), pki.client_a.clone());
    let mut s = host_a.transmitting("fn-refuse");
    assert_eq!(request(&mut s, CMD_READ, 0, 1, &[], 1).unwrap().0, 0);
}

/// Appends a client option (IHAVEOPT, option, length, data) to `m`.
fn option(m: &mut Vec<u8>, option: u32, data: &[u8]) {
    m.extend(IHAVEOPT.to_be_bytes());
    m.extend(option.to_be_bytes());
    m.extend((data.len() as u32).to_be_bytes());
    m.extend(data);
}

/// An INFO/GO request's data for export `name`, asking for no particular information.
fn go_request(name: &[u8]) -> Vec<u8> {
    let mut go = (name.len() as u32).to_be_bytes().to_vec();
    go.extend(name);
    go.extend(0u16.to_be_bytes());
    go
}

/// Reads one option reply: (option, type, data).
fn read_reply(s: &mut impl Read) -> std::io::Result<(u32, u32, Vec<u8>)> {
    let mut head = [0u8; 20];
    s.read_exact(&mut head)?;
    assert_eq!(head[..8], REPLY_MAGIC.to_be_bytes());
    let option = u32::from_be_bytes(head[8..12].try_into().unwrap());
    let kind = u32::from_be_bytes(head[12..16].try_into().unwrap());
    let len = u32::from_be_bytes(head[16..20].try_into().unwrap());
    let mut data = vec![0u8; len as usize];
    s.read_exact(&mut data)?;
    Ok((option, kind, data))
}

/// A client stream of either transport, TLS included for TCP.
trait Client: Read + Write {}
impl<T: Read + Write> Client for T {}

/// The transports a test runs over: a connection made and brought to the point where
/// options go (greeting read, flags sent, and for TCP STARTTLS done with host A's
/// certificate).
enum Transport {
    Unix(PathBuf),
    Tcp(SocketAddr, Arc<rustls::ClientConfig>),
}

impl Transport {
    /// Connected; reads wait at most `wait`.
    fn raw(&self, wait: Duration) -> Box<dyn Client + Send> {
        match self {
            Transport::Unix(p) => {
                let s = UnixStream::connect(p).unwrap();
                s.set_read_timeout(Some(wait)).unwrap();
                Box::new(s)
            }
            Transport::Tcp(a, _) => {
                let s = TcpStream::connect(a).unwrap();
                s.set_read_timeout(Some(wait)).unwrap();
                Box::new(s)
            }
        }
    }

    /// Greeting read and flags sent.
    fn greeted(&self) -> Box<dyn Client + Send> {
        self.greeted_waiting(Duration::from_secs(20))
    }

    fn greeted_waiting(&self, wait: Duration) -> Box<dyn Client + Send> {
        let mut s = self.raw(wait);
        let mut greeting = [0u8; 18];
        s.read_exact(&mut greeting).unwrap();
        s.write_all(&3u32.to_be_bytes()).unwrap();
        s
    }

    /// Ready for options: over TCP inside TLS.
    fn ready(&self) -> Box<dyn Client + Send> {
        let mut s = self.greeted();
        match self {
            Transport::Unix(_) => s,
            Transport::Tcp(_, config) => {
                let mut m = Vec::new();
                option(&mut m, OPT_STARTTLS, &[]);
                s.write_all(&m).unwrap();
                let (o, kind, _) = read_reply(&mut s).unwrap();
                assert_eq!((o, kind), (OPT_STARTTLS, 1));
                let conn = rustls::ClientConnection::new(
                    config.clone(),
                    rustls::pki_types::ServerName::IpAddress(
                        std::net::IpAddr::from([127, 0, 0, 1]).into(),
                    ),
                )
                .unwrap();
                Box::new(rustls::StreamOwned::new(conn, s))
            }
        }
    }

    /// In transmission on export `name`.
    fn transmitting(&self, name: &str) -> Box<dyn Client + Send> {
        let mut s = self.ready();
        let mut m = Vec::new();
        option(&mut m, OPT_GO, &go_request(name.as_bytes()));
        s.write_all(&m).unwrap();
        loop {
            let (o, kind, _) = read_reply(&mut s).unwrap();
            assert_eq!(o, OPT_GO);
            match kind {
                3 => continue,
                1 => return s,
                other => panic!("GO answered {other:#x}"),
            }
        }
    }

    fn name(&self) -> &'static str {
        match self {
            Transport::Unix(_) => "unix",
            Transport::Tcp(..) => "tcp+tls",
        }
    }
}

/// Sends one request; its simple reply's error and data (`reply_len` bytes when it
/// succeeded).
fn request(
    s: &mut (impl Read + Write + ?Sized),
    kind: u16,
    offset: u64,
    len: u32,
    payload: &[u8],
    reply_len: usize,
) -> std::io::Result<(u32, Vec<u8>)> {
    let mut m = 0x2560_9513u32.to_be_bytes().to_vec();
    m.extend(0u16.to_be_bytes());
    m.extend(kind.to_be_bytes());
    m.extend(7u64.to_be_bytes());
    m.extend(offset.to_be_bytes());
    m.extend(len.to_be_bytes());
    m.extend(payload);
    s.write_all(&m)?;
    s.flush()?;
    let mut head = [0u8; 16];
    s.read_exact(&mut head)?;
    assert_eq!(head[..4], 0x6744_6698u32.to_be_bytes());
    let error = u32::from_be_bytes(head[4..8].try_into().unwrap());
    let mut data = vec![0u8; if error == 0 { reply_len } else { 0 }];
    s.read_exact(&mut data)?;
    Ok((error, data))
}

/// Both transports of one clone each: a Unix socket export (this uid) and a TCP export for
/// host A.
fn both(dir: &Path, pki: &Pki) -> (Vec<HostExport>, Vec<(Transport, u64)>) {
    let uid = rustix::process::getuid().as_raw();
    let unix_clone = clone(dir, "fn-unix");
    let size = unix_clone.size();
    let socket = dir.join("fn-unix.sock");
    let unix = HostExport::unix(Export::new("fn-unix", unix_clone), &socket, uid).unwrap();
    let (tcp, _) = tcp_export(dir, pki, "fn-tcp");
    let transports = vec![
        (Transport::Unix(socket), size),
        (Transport::Tcp(tcp_addr(&tcp), pki.client_a.clone()), size),
    ];
    (vec![unix, tcp], transports)
}

fn export_name(t: &Transport) -> &'static str {
    match t {
        Transport::Unix(_) => "fn-unix",
        Transport::Tcp(..) => "fn-tcp",
    }
}

/// READ, WRITE and TRIM with an offset and length that overflow u64 or run past the end of
/// a writable clone, and a read over the maximum: each answered with its error (EINVAL, or
/// ENOSPC for a write past the end), and the connection goes on serving valid requests. A
/// write over the maximum gets EINVAL and ends the connection (its payload is not read).
#[test]
fn requests_out_of_range_or_over_the_maximum_get_errors_over_both_transports() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    let (_exports, transports) = both(dir.path(), &pki);
    for (t, size) in &transports {
        let what = t.name();
        let mut s = t.transmitting(export_name(t));
        // Positive control: a write and a read in range.
        let (e, _) = request(&mut s, CMD_WRITE, 4096, 5, b"hello", 0).unwrap();
        assert_eq!(e, 0, "{what}");
        let (e, data) = request(&mut s, CMD_READ, 4096, 5, &[], 5).unwrap();
        assert_eq!((e, data.as_slice()), (0, &b"hello"[..]), "{what}");
        let overflow = u64::MAX - 100;
        let page = [0u8; 4096];
        for (kind, offset, len, payload, expect) in [
            (CMD_READ, overflow, 4096, &[][..], EINVAL),
            (CMD_WRITE, overflow, 4096, &page[..], EINVAL),
            (CMD_TRIM, overflow, 4096, &[][..], EINVAL),
            (CMD_READ, size - 100, 4096, &[][..], EINVAL),
            (CMD_WRITE, size - 100, 4096, &page[..], ENOSPC),
            (CMD_TRIM, size - 100, 4096, &[][..], EINVAL),
            (CMD_READ, *size, 1, &[][..], EINVAL),
            (CMD_READ, 0, MAX_REQUEST + 1, &[][..], EINVAL),
        ] {
            let (e, _) = request(&mut s, kind, offset, len, payload, len as usize).unwrap();
            assert_eq!(e, expect, "{what}: command {kind} at {offset} for {len}");
        }
        // Still served, and nothing was written past the end or over the first page.
        let (e, data) = request(&mut s, CMD_READ, size - 4096, 4096, &[], 4096).unwrap();
        assert_eq!(e, 0, "{what}");
        let mut expect = vec![0u8; 4096];
        let dev_size = *size;
        // The base's pattern (the clone is the base's size).
        for (i, b) in expect.iter_mut().enumerate() {
            *b = ((dev_size - 4096 + i as u64) % 251) as u8;
        }
        assert_eq!(data, expect, "{what}");
        // A write over the maximum: EINVAL, and the connection ends.
        let (e, _) = request(&mut s, CMD_WRITE, 0, MAX_REQUEST + 1, &[], 0).unwrap();
        assert_eq!(e, EINVAL, "{what}");
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
        assert!(rest.is_empty(), "{what}: the connection went on");
        // A new connection is served.
        let mut s = t.transmitting(export_name(t));
        let (e, data) = request(&mut s, CMD_READ, 4096, 5, &[], 5).unwrap();
        assert_eq!((e, data.as_slice()), (0, &b"hello"[..]), "{what}");
    }
}

/// An empty or unknown export name in INFO or GO is ERR_UNKNOWN (the default export does not
/// exist), and in EXPORT_NAME closes the connection, over both transports; the right name is
/// served.
#[test]
fn only_the_exports_own_name_opens_it_over_both_transports() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    let (_exports, transports) = both(dir.path(), &pki);
    for (t, size) in &transports {
        let mut s = t.ready();
        for option_kind in [OPT_INFO, OPT_GO] {
            for name in [&b""[..], b"fn-nope", b"FN-UNIX"] {
                let mut m = Vec::new();
                option(&mut m, option_kind, &go_request(name));
                s.write_all(&m).unwrap();
                let (o, kind, _) = read_reply(&mut s).unwrap();
                assert_eq!(
                    (o, kind),
                    (option_kind, 0x8000_0006),
                    "{}: {name:?}",
                    t.name()
                );
            }
        }
        drop(s);
        // EXPORT_NAME has no error reply: a wrong or empty name closes the connection.
        for name in [&b""[..], b"fn-nope"] {
            let mut s = t.ready();
            let mut m = Vec::new();
            option(&mut m, OPT_EXPORT_NAME, name);
            s.write_all(&m).unwrap();
            let mut rest = Vec::new();
            let _ = s.read_to_end(&mut rest);
            assert!(
                rest.is_empty(),
                "{}: EXPORT_NAME {name:?} answered",
                t.name()
            );
        }
        let mut s = t.ready();
        let mut m = Vec::new();
        option(&mut m, OPT_EXPORT_NAME, export_name(t).as_bytes());
        s.write_all(&m).unwrap();
        let mut export_size = [0u8; 8];
        s.read_exact(&mut export_size).unwrap();
        assert_eq!(u64::from_be_bytes(export_size), *size);
        drop(s);
        let mut s = t.transmitting(export_name(t));
        assert_eq!(request(&mut s, CMD_READ, 0, 1, &[], 1).unwrap().0, 0);
    }
}

/// A client sending option after option (each answered, before TLS on TCP and inside it) is
/// disconnected after `MAX_OPTIONS`; a client that never finishes the handshake (silent
/// after the greeting, silent after its flags, or dribbling a byte a second) is disconnected
/// at the handshake deadline. The legitimate client still gets in afterwards.
#[test]
fn option_floods_and_endless_handshakes_are_cut_off_over_both_transports() {
    let _serial = serial();
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path());
    let (_exports, transports) = both(dir.path(), &pki);
    let transports = Arc::new(transports);
    // The slow clients first, in parallel: each must be closed by the deadline.
    let mut slow = Vec::new();
    for i in 0..transports.len() {
        for style in ["silent", "flags-then-silent", "dribbling"] {
            let transports = transports.clone();
            slow.push(std::thread::spawn(move || {
                let t = &transports[i].0;
                let start = Instant::now();
                let wait = Duration::from_millis(500);
                let mut s = match style {
                    "silent" => t.raw(wait),
                    _ => t.greeted_waiting(wait),
                };
                let mut buf = [0u8; 64];
                let mut dribble = Vec::new();
                option(&mut dribble, OPT_GO, &go_request(b"x"));
                let mut next = dribble.iter();
                loop {
                    if style == "dribbling" {
                        if let Some(b) = next.next() {
                            if s.write_all(&[*b]).is_err() {
                                break;
                            }
                        }
                    }
                    // Read with a short wait: the greeting, then EOF when cut off.
                    match s.read(&mut buf) {
                        Ok(0) => break,
                        Ok(_) => continue,
                        Err(e)
                            if matches!(
                                e.kind(),
                                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                            ) =>
                        {
                            assert!(
                                start.elapsed() < HANDSHAKE_DEADLINE + Duration::from_secs(5),
                                "{} {style}: still open after {:?}",
                                t.name(),
                                start.elapsed()
                            );
                        }
                        Err(_) => break,
                    }
                }
                (t.name(), style, start.elapsed())
            }));
        }
    }
    // Meanwhile, option floods.
    for (t, _) in transports.iter() {
        for inside_tls in [false, true] {
            if inside_tls && matches!(t, Transport::Unix(_)) {
                continue;
            }
            let mut s = if inside_tls { t.ready() } else { t.greeted() };
            let mut m = Vec::new();
            for _ in 0..1000 {
                option(&mut m, 99, &[]);
            }
            option(&mut m, OPT_ABORT, &[]);
            // Written from another thread for TCP without TLS (the server's replies must be
            // read meanwhile); small enough for the socket buffers otherwise.
            let _ = s.write_all(&m);
            let _ = s.flush();
            let (mut replies, mut aborted) = (0, false);
            loop {
                match read_reply(&mut s) {
                    Ok((o, _, _)) => {
                        replies += 1;
                        aborted |= o == OPT_ABORT;
                    }
                    Err(e) => {
                        assert!(
                            !matches!(
                                e.kind(),
                                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                            ),
                            "{}: the flood was not cut off ({replies} replies)",
                            t.name()
                        );
                        break;
                    }
                }
            }
            // Cut off well before the flood's end (the ABORT after it never answered).
            assert!(
                !aborted,
                "{} (TLS {inside_tls}): all {replies} options answered",
                t.name()
            );
            assert!(
                replies <= MAX_OPTIONS,
                "{} (TLS {inside_tls}): {replies} options answered",
                t.name()
            );
        }
    }
    for h in slow {
        let (name, style, took) = h.join().unwrap();
        assert!(
            took <= HANDSHAKE_DEADLINE + Duration::from_secs(3),
            "{name} {style}: cut off after {took:?}"
        );
    }
    // Positive control: the legitimate client.
    for (t, _) in transports.iter() {
        let mut s = t.transmitting(export_name(t));
        assert_eq!(request(&mut s, CMD_READ, 0, 1, &[], 1).unwrap().0, 0);
    }
}
