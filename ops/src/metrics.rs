//! Prometheus metrics on a separate local listener: `GET /metrics` answers the registry in
//! the OpenMetrics text format; anything else gets 404 (or 405 for another method).
//!
//! The responder is a few dozen lines of HTTP/1.1 on tokio, not hyper's server: tonic pulls
//! hyper in with the HTTP/2 server only, and a scrape endpoint needs one request line, one
//! response and `Connection: close`. Requests are read with a size and time bound, so a
//! stuck or hostile client holds one task for at most [`REQUEST_TIMEOUT`].

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::registry::Registry;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// The content type of the OpenMetrics text format `prometheus-client` writes.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// How long a client may take to send its request head.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// The largest request head read.
const MAX_HEAD: usize = 8 << 10;

/// Where metrics are served: a TCP address (`127.0.0.1:9464`) or a Unix socket (a path
/// with a `/`, or `unix:PATH`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MetricsListen {
    Tcp(std::net::SocketAddr),
    Unix(PathBuf),
}

impl std::str::FromStr for MetricsListen {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(p) = s.strip_prefix("unix:") {
            return Ok(MetricsListen::Unix(p.into()));
        }
        match s.parse() {
            Ok(a) => Ok(MetricsListen::Tcp(a)),
            Err(_) if s.contains('/') => Ok(MetricsListen::Unix(s.into())),
            Err(e) => Err(format!(
                "not an IP:PORT (e.g. 127.0.0.1:9464) nor a Unix socket (a path with a /, or unix:PATH): {e}"
            )),
        }
    }
}

impl std::fmt::Display for MetricsListen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MetricsListen::Tcp(a) => write!(f, "{a}"),
            MetricsListen::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

impl serde::Serialize for MetricsListen {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// The registry in the OpenMetrics text format.
pub fn encode(registry: &Registry) -> String {
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, registry)
        .expect("writing to a String does not fail");
    out
}

/// A bound metrics endpoint; dropping it does not stop it (abort `task` for that).
pub struct MetricsServer {
    /// Where it listens (the port chosen when the address asked for port 0).
    pub local: MetricsListen,
    pub task: tokio::task::JoinHandle<()>,
}

/// Binds `listen` now (so that a taken port or a bad path fails the start) and serves
/// `registry` on it from a task of the current runtime. A Unix socket is made mode 0660 and
/// replaces a stale socket file.
pub async fn serve(
    listen: &MetricsListen,
    registry: Arc<Registry>,
) -> std::io::Result<MetricsServer> {
    let with_path = |e: std::io::Error| std::io::Error::new(e.kind(), format!("{listen}: {e}"));
    match listen {
        MetricsListen::Tcp(addr) => {
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(with_path)?;
            let local = MetricsListen::Tcp(l.local_addr()?);
            let task = tokio::spawn(async move {
                loop {
                    match l.accept().await {
                        Ok((s, _)) => {
                            tokio::spawn(answer(s, registry.clone()));
                        }
                        Err(e) => accept_failed(e).await,
                    }
                }
            });
            Ok(MetricsServer { local, task })
        }
        MetricsListen::Unix(path) => {
            if std::fs::symlink_metadata(path)
                .is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()))
            {
                std::fs::remove_file(path).map_err(with_path)?;
            }
            let l = tokio::net::UnixListener::bind(path).map_err(with_path)?;
            std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o660))
                .map_err(with_path)?;
            let task = tokio::spawn(async move {
                loop {
                    match l.accept().await {
                        Ok((s, _)) => {
                            tokio::spawn(answer(s, registry.clone()));
                        }
                        Err(e) => accept_failed(e).await,
                    }
                }
            });
            Ok(MetricsServer {
                local: listen.clone(),
                task,
            })
        }
    }
}

async fn accept_failed(e: std::io::Error) {
    // Out of file descriptors, say: wait rather than spin.
    tracing::warn!(error = %e, "metrics endpoint: accept failed");
    tokio::time::sleep(Duration::from_millis(100)).await;
}

/// Reads one request head and answers it; the connection is then closed.
async fn answer<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, registry: Arc<Registry>) {
    let head = match tokio::time::timeout(REQUEST_TIMEOUT, read_head(&mut s)).await {
        Ok(Some(h)) => h,
        _ => return,
    };
    let line = head.lines().next().unwrap_or("");
    let mut parts = line.split(' ');
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = target.split('?').next().unwrap_or("");
    let (status, content_type, body) = match (method, path) {
        ("GET", "/metrics") => ("200 OK", CONTENT_TYPE, encode(&registry)),
        ("GET", _) => ("404 Not Found", "text/plain", "GET /metrics\n".into()),
        _ => (
            "405 Method Not Allowed",
            "text/plain",
            "GET /metrics\n".into(),
        ),
    };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = s.write_all(response.as_bytes()).await;
    let _ = s.shutdown().await;
}

/// The request head (up to the blank line), or None when it is too long or the client left.
async fn read_head<S: AsyncRead + Unpin>(s: &mut S) -> Option<String> {
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 512];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") && !buf.windows(2).any(|w| w == b"\n\n") {
        if buf.len() > MAX_HEAD {
            return None;
        }
        let n = s.read(&mut chunk).await.ok()?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    String::from_utf8(buf).ok()
}

/// Fetches `GET /metrics` from `at` (blocking; for tests and `curl`-less hosts): the status
/// code and the body.
pub fn scrape(at: &MetricsListen) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    fn exchange(mut s: impl Read + Write) -> std::io::Result<String> {
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    }
    let text = match at {
        MetricsListen::Tcp(a) => {
            let s = std::net::TcpStream::connect_timeout(a, REQUEST_TIMEOUT)?;
            s.set_read_timeout(Some(REQUEST_TIMEOUT))?;
            exchange(s)?
        }
        MetricsListen::Unix(p) => {
            let s = std::os::unix::net::UnixStream::connect(p)?;
            s.set_read_timeout(Some(REQUEST_TIMEOUT))?;
            exchange(s)?
        }
    };
    let bad = || std::io::Error::new(std::io::ErrorKind::InvalidData, "not an HTTP response");
    let (head, body) = text.split_once("\r\n\r\n").ok_or_else(bad)?;
    let code = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(bad)?;
    Ok((code, body.to_string()))
}

/// The value of the sample `name` (with its labels exactly as written, e.g.
/// `ipu_x_total{class="io"}`) in an OpenMetrics text body.
pub fn sample(body: &str, name: &str) -> Option<f64> {
    body.lines().find_map(|l| {
        let rest = l.strip_prefix(name)?.strip_prefix(' ')?;
        rest.split(' ').next()?.parse().ok()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::metrics::counter::Counter;

    #[test]
    fn listen_addresses() {
        assert_eq!(
            "127.0.0.1:9464".parse::<MetricsListen>().unwrap(),
            MetricsListen::Tcp("127.0.0.1:9464".parse().unwrap())
        );
        assert_eq!(
            "unix:/run/m.sock".parse::<MetricsListen>().unwrap(),
            MetricsListen::Unix("/run/m.sock".into())
        );
        assert_eq!(
            "/run/m.sock".parse::<MetricsListen>().unwrap(),
            MetricsListen::Unix("/run/m.sock".into())
        );
        assert!("localhost".parse::<MetricsListen>().is_err());
    }

    #[test]
    fn serves_get_metrics_over_tcp_and_unix() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let mut registry = Registry::with_prefix("t");
        let c = Counter::<u64>::default();
        registry.register("things", "Things seen", c.clone());
        c.inc_by(3);
        let registry = Arc::new(registry);
        let dir = std::env::temp_dir().join(format!("ops-metrics-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let sock = MetricsListen::Unix(dir.join("m.sock"));
        let (tcp, unix) = rt.block_on(async {
            let tcp = serve(&"127.0.0.1:0".parse().unwrap(), registry.clone())
                .await
                .unwrap();
            let unix = serve(&sock, registry.clone()).await.unwrap();
            (tcp, unix)
        });
        // The runtime serves from its own thread while this one scrapes.
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = std::thread::spawn(move || {
            rt.block_on(async {
                let _ = stopped.await;
            })
        });
        for at in [&tcp.local, &unix.local] {
            let (code, body) = scrape(at).unwrap();
            assert_eq!(code, 200, "{body}");
            assert_eq!(sample(&body, "t_things_total"), Some(3.0), "{body}");
            assert!(body.ends_with("# EOF\n"), "{body}");
        }
        let MetricsListen::Tcp(addr) = tcp.local else {
            unreachable!()
        };
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.write_all(b"GET /other HTTP/1.1\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        assert!(out.starts_with("HTTP/1.1 404"), "{out}");
        let _ = stop.send(());
        server.join().unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
