//! TLS for exports over TCP: the IPU's server certificate, and client certificates required
//! and checked against the host agents' CA (rustls with the ring provider, TLS 1.2 and 1.3).

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};

/// A TLS file that cannot be used: which one (`what`, `path`) and why.
#[derive(Debug, thiserror::Error)]
#[error("{what} {}: {reason}", path.display())]
pub struct TlsFileError {
    pub what: &'static str,
    pub path: std::path::PathBuf,
    pub reason: String,
}

fn bad(what: &'static str, path: &Path, reason: impl std::fmt::Display) -> TlsFileError {
    TlsFileError {
        what,
        path: path.to_path_buf(),
        reason: reason.to_string(),
    }
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsFileError> {
    std::fs::read(path).map_err(|e| bad(what, path, e))
}

fn certificates(
    what: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TlsFileError> {
    let pem = read(what, path)?;
    let certs = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(what, path, e))?;
    if certs.is_empty() {
        return Err(bad(what, path, "no PEM certificate"));
    }
    Ok(certs)
}

/// A server configuration for `cert` (PEM chain) and `key` (PEM private key) that requires a
/// client certificate issued by a CA in `client_ca` (PEM).
pub fn server_config(
    cert: &Path,
    key: &Path,
    client_ca: &Path,
) -> Result<Arc<ServerConfig>, TlsFileError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let chain = certificates("export certificate", cert)?;
    let key_pem = zeroize::Zeroizing::new(read("export key", key)?);
    let key: PrivateKeyDer<'static> = rustls_pemfile::private_key(&mut key_pem.as_slice())
        .map_err(|e| bad("export key", key, e))?
        .ok_or_else(|| bad("export key", key, "no PEM private key"))?;
    let mut roots = RootCertStore::empty();
    for ca in certificates("client CA", client_ca)? {
        roots.add(ca).map_err(|e| bad("client CA", client_ca, e))?;
    }
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| bad("client CA", client_ca, e))?;
    let config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| bad("export certificate", cert, e))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| bad("export certificate", cert, e))?;
    Ok(Arc::new(config))
}
