//! OCI distribution v2 registries.
//!
//! HTTP client: `ureq` 3 with rustls on the ring provider (webpki roots). It is blocking,
//! which fits the pipeline's `Read` composition, and lean to build. Plain HTTP is used only
//! for loopback hosts or hosts explicitly allowed. Auth: anonymous, Basic, and Bearer tokens
//! obtained from the realm a 401 names (docker token protocol). Authorization headers are
//! never forwarded across redirects (ureq's default), so blob redirects to storage are safe.

use std::io::Read;
use std::net::IpAddr;
use std::sync::Mutex;

use base64::Engine;
use policy::reference::{Digest, DockerReference};

use super::manifest::{self, ManifestKind, ACCEPTED, OCI_INDEX};
use super::{
    FetchError, FetchErrorClass, ImageSource, ManifestRef, ReferrersLookup, SourceOptions,
    MAX_MANIFEST_BYTES, MAX_SIGNATURE_REFERRERS,
};
use policy::sigstore::Discovery;

/// Pages of a referrers listing followed (`Link: <...>; rel="next"`).
const MAX_REFERRER_PAGES: usize = 8;

pub struct RegistrySource {
    agent: ureq::Agent,
    base: String,
    repository: String,
    host: String,
    root: ManifestRef,
    credentials: Option<(String, String)>,
    token: Mutex<Option<String>>,
}

/// Whether plain HTTP may be used for `host` (`host[:port]`).
pub fn plain_http_allowed(host: &str, allowed: &[String]) -> bool {
    if allowed.iter().any(|a| a == host) {
        return true;
    }
    let name = match host.rsplit_once(':') {
        Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    };
    let name = name.trim_start_matches('[').trim_end_matches(']');
    name == "localhost" || name.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

impl RegistrySource {
    pub fn new(reference: &DockerReference, opts: &SourceOptions) -> Result<Self, FetchError> {
        let host = reference.domain().to_string();
        // docker.io's API lives at registry-1.docker.io.
        let api_host = if host == "docker.io" {
            "registry-1.docker.io".to_string()
        } else {
            host.clone()
        };
        let scheme = if plain_http_allowed(&host, &opts.insecure_http_hosts) {
            "http"
        } else {
            "https"
        };
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(opts.timeout))
            .max_redirects(5)
            .http_status_as_error(false)
            .https_only(scheme == "https")
            .user_agent("ipu-image-svc")
            .build()
            .into();
        let root = match (reference.digest(), reference.tag()) {
            (Some(d), _) => ManifestRef::Digest(d.clone()),
            (None, Some(t)) => ManifestRef::Tag(t.to_string()),
            (None, None) => ManifestRef::Tag("latest".into()),
        };
        Ok(Self {
            agent,
            base: format!("{scheme}://{api_host}/v2/{}", reference.path()),
            repository: reference.path().to_string(),
            host,
            root,
            credentials: opts.credentials.clone(),
            token: Mutex::new(None),
        })
    }

    fn auth_header(&self) -> Option<String> {
        if let Some(t) = self.token.lock().expect("token lock").as_ref() {
            return Some(format!("Bearer {t}"));
        }
        self.credentials.as_ref().map(|(u, p)| {
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"))
            )
        })
    }

    /// GET with auth; on 401 obtains a bearer token once and retries.
    fn get(
        &self,
        url: &str,
        headers: &[(&str, &str)],
    ) -> Result<ureq::http::Response<ureq::Body>, FetchError> {
        for attempt in 0..2 {
            let mut req = self.agent.get(url);
            for (name, value) in headers {
                req = req.header(*name, *value);
            }
            if let Some(h) = self.auth_header() {
                req = req.header("Authorization", &h);
            }
            let resp = req.call().map_err(|e| {
                FetchError::new(FetchErrorClass::Network, format!("GET {url}: {e}"))
            })?;
            if resp.status() == 401 && attempt == 0 {
                let challenge = resp
                    .headers()
                    .get("www-authenticate")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_string();
                self.authenticate(&challenge, url)?;
                continue;
            }
            return Ok(resp);
        }
        Err(FetchError::new(
            FetchErrorClass::Network,
            format!("GET {url}: unauthorized after authenticating"),
        ))
    }

    fn authenticate(&self, challenge: &str, url: &str) -> Result<(), FetchError> {
        // Auth schemes are case-insensitive (RFC 9110 11.1).
        let bearer = challenge
            .get(..7)
            .is_some_and(|p| p.eq_ignore_ascii_case("Bearer "));
        let Some(params) = bearer.then(|| &challenge[7..]) else {
            if challenge
                .get(..5)
                .is_some_and(|p| p.eq_ignore_ascii_case("Basic"))
                && self.credentials.is_some()
            {
                return Err(FetchError::new(
                    FetchErrorClass::Network,
                    format!("GET {url}: registry refused the Basic credentials"),
                ));
            }
            return Err(FetchError::new(
                FetchErrorClass::Network,
                format!("GET {url}: registry requires authentication ({challenge:?})"),
            ));
        };
        let mut realm = None;
        let mut query = Vec::new();
        for (k, v) in parse_challenge(params) {
            match k.as_str() {
                "realm" => realm = Some(v),
                "service" | "scope" => query.push((k, v)),
                _ => {}
            }
        }
        if !query.iter().any(|(k, _)| k == "scope") {
            query.push((
                "scope".into(),
                format!("repository:{}:pull", self.repository),
            ));
        }
        let realm = realm.ok_or_else(|| {
            FetchError::new(
                FetchErrorClass::Malformed,
                format!("{}: bearer challenge without realm", self.host),
            )
        })?;
        check_realm(&realm, &self.host)?;
        let mut req = self.agent.get(&realm);
        for (k, v) in &query {
            req = req.query(k, v);
        }
        if let Some((u, p)) = &self.credentials {
            req = req.header(
                "Authorization",
                &format!(
                    "Basic {}",
                    base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"))
                ),
            );
        }
        let resp = req.call().map_err(|e| {
            FetchError::new(
                FetchErrorClass::Network,
                format!("token request to {realm}: {e}"),
            )
        })?;
        if resp.status() != 200 {
            return Err(FetchError::new(
                FetchErrorClass::Network,
                format!("token request to {realm}: HTTP {}", resp.status()),
            ));
        }
        let body = resp
            .into_body()
            .with_config()
            .limit(1 << 20)
            .read_to_vec()
            .map_err(|e| {
                FetchError::new(
                    FetchErrorClass::Network,
                    format!("token response from {realm}: {e}"),
                )
            })?;
        #[derive(serde::Deserialize)]
        struct Token {
            token: Option<String>,
            access_token: Option<String>,
        }
        let t: Token = serde_json::from_slice(&body).map_err(|e| {
            FetchError::new(
                FetchErrorClass::Malformed,
                format!("token response from {realm}: {e}"),
            )
        })?;
        let token = t.token.or(t.access_token).ok_or_else(|| {
            FetchError::new(
                FetchErrorClass::Malformed,
                format!("token response from {realm} has no token"),
            )
        })?;
        *self.token.lock().expect("token lock") = Some(token);
        Ok(())
    }
}

/// Splits `realm="x",service="y"` (values may be quoted).
fn parse_challenge(s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = s.trim();
    while !rest.is_empty() {
        let Some(eq) = rest.find('=') else { break };
        let key = rest[..eq]
            .trim()
            .trim_start_matches(',')
            .trim()
            .to_ascii_lowercase();
        rest = &rest[eq + 1..];
        let value;
        if let Some(r) = rest.strip_prefix('"') {
            let end = r.find('"').unwrap_or(r.len());
            value = r[..end].to_string();
            rest = r.get(end + 1..).unwrap_or("");
        } else {
            let end = rest.find(',').unwrap_or(rest.len());
            value = rest[..end].trim().to_string();
            rest = &rest[end..];
        }
        rest = rest.trim_start_matches(',').trim_start();
        out.push((key, value));
    }
    out
}

impl ImageSource for RegistrySource {
    fn describe(&self) -> String {
        self.base.replace("/v2/", "/")
    }

    fn root_ref(&self) -> ManifestRef {
        self.root.clone()
    }

    fn fetch_manifest(&self, r: &ManifestRef) -> Result<Option<super::RawManifest>, FetchError> {
        let reference = match r {
            ManifestRef::Tag(t) => t.clone(),
            ManifestRef::Digest(d) => d.to_string(),
            ManifestRef::Default => "latest".into(),
        };
        let url = format!("{}/manifests/{reference}", self.base);
        let resp = self.get(&url, &[("Accept", ACCEPTED)])?;
        match resp.status().as_u16() {
            200 => {}
            404 => return Ok(None),
            s => {
                return Err(FetchError::new(
                    FetchErrorClass::Network,
                    format!("GET {url}: HTTP {s}"),
                ))
            }
        }
        let media_type = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let bytes = resp
            .into_body()
            .with_config()
            .limit(MAX_MANIFEST_BYTES as u64)
            .read_to_vec()
            .map_err(|e| {
                let class = if matches!(e, ureq::Error::BodyExceedsLimit(_)) {
                    FetchErrorClass::TooLarge
                } else {
                    FetchErrorClass::Network
                };
                FetchError::new(class, format!("GET {url}: {e}"))
            })?;
        Ok(Some((bytes, media_type)))
    }

    fn open_blob_raw(&self, digest: &Digest) -> Result<Box<dyn Read + Send>, FetchError> {
        self.open_blob_range(digest, &[])
    }

    fn origin(&self) -> String {
        format!("{}/{}", self.host, self.repository)
    }

    /// The OCI 1.1 referrers API. A registry without it answers 404 (distribution 2.x),
    /// 400, 405 or 501, or something that is not an index: then the caller falls back to
    /// the referrers tag schema.
    fn referrers(&self, digest: &Digest) -> Result<ReferrersLookup, FetchError> {
        let mut url = format!("{}/referrers/{digest}", self.base);
        let mut descriptors = Vec::new();
        for page in 0..MAX_REFERRER_PAGES {
            let resp = self.get(&url, &[("Accept", OCI_INDEX)])?;
            match resp.status().as_u16() {
                200 => {}
                404 | 400 | 405 | 406 | 501 if page == 0 => {
                    return Ok(ReferrersLookup::NotSupported)
                }
                s => {
                    return Err(FetchError::new(
                        FetchErrorClass::Network,
                        format!("GET {url}: HTTP {s}"),
                    ))
                }
            }
            let media_type = resp
                .headers()
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            let next = resp
                .headers()
                .get("link")
                .and_then(|v| v.to_str().ok())
                .and_then(next_link);
            let bytes = resp
                .into_body()
                .with_config()
                .limit(MAX_MANIFEST_BYTES as u64)
                .read_to_vec()
                .map_err(|e| {
                    let class = if matches!(e, ureq::Error::BodyExceedsLimit(_)) {
                        FetchErrorClass::TooLarge
                    } else {
                        FetchErrorClass::Network
                    };
                    FetchError::new(class, format!("GET {url}: {e}"))
                })?;
            match manifest::parse(&bytes, media_type.as_deref(), &self.describe()) {
                Ok(ManifestKind::Index(index)) => descriptors.extend(index.manifests),
                _ if page == 0 => {
                    tracing::debug!(url = %url, "the referrers answer is not an index: no referrers API");
                    return Ok(ReferrersLookup::NotSupported);
                }
                Ok(ManifestKind::Image(_)) | Err(_) => {
                    return Err(FetchError::new(
                        FetchErrorClass::Malformed,
                        format!("GET {url}: a page of referrers that is not an index"),
                    ))
                }
            }
            if descriptors.len() > 16 * MAX_SIGNATURE_REFERRERS {
                return Err(FetchError::new(
                    FetchErrorClass::TooLarge,
                    format!(
                        "{}: more than {} referrers of {digest}",
                        self.describe(),
                        16 * MAX_SIGNATURE_REFERRERS
                    ),
                ));
            }
            match next {
                Some(next) => url = self.resolve_link(&next)?,
                None => {
                    return Ok(ReferrersLookup::Listed {
                        via: Discovery::ReferrersApi,
                        descriptors,
                    })
                }
            }
        }
        Err(FetchError::new(
            FetchErrorClass::TooLarge,
            format!(
                "{}: the referrers of {digest} span more than {MAX_REFERRER_PAGES} pages",
                self.describe()
            ),
        ))
    }

    fn blob_prefix(&self, digest: &Digest, len: usize) -> Result<Vec<u8>, FetchError> {
        // A range request; a registry that ignores it sends the whole blob, cut here.
        let range = format!("bytes=0-{}", len.saturating_sub(1));
        let mut prefix = Vec::with_capacity(len);
        self.open_blob_range(digest, &[("Range", &range)])?
            .take(len as u64)
            .read_to_end(&mut prefix)
            .map_err(|e| FetchError::from_io(e, &format!("blob {digest}")))?;
        Ok(prefix)
    }
}

/// The target of a `Link` header's `rel="next"` (RFC 8288), e.g.
/// `</v2/a/referrers/sha256:..?n=10&last=x>; rel="next"`.
fn next_link(header: &str) -> Option<String> {
    header.split(',').find_map(|link| {
        let (target, params) = link.trim().split_once(';')?;
        let target = target.trim().strip_prefix('<')?.strip_suffix('>')?;
        params
            .split(';')
            .any(|p| {
                let p = p.trim().replace(' ', "");
                p.eq_ignore_ascii_case("rel=\"next\"") || p.eq_ignore_ascii_case("rel=next")
            })
            .then(|| target.to_string())
    })
}

impl RegistrySource {
    /// A next-page link, which must stay on this registry's repository API.
    fn resolve_link(&self, link: &str) -> Result<String, FetchError> {
        let origin = self
            .base
            .split("/v2/")
            .next()
            .unwrap_or(&self.base)
            .to_string();
        let url = if link.starts_with('/') {
            format!("{origin}{link}")
        } else {
            link.to_string()
        };
        if !url.starts_with(&format!("{}/referrers/", self.base)) {
            return Err(FetchError::new(
                FetchErrorClass::Malformed,
                format!(
                    "{}: a referrers page link {link:?} leaves the repository's API",
                    self.describe()
                ),
            ));
        }
        Ok(url)
    }

    fn open_blob_range(
        &self,
        digest: &Digest,
        headers: &[(&str, &str)],
    ) -> Result<Box<dyn Read + Send>, FetchError> {
        let url = format!("{}/blobs/{digest}", self.base);
        let resp = self.get(&url, headers)?;
        match resp.status().as_u16() {
            200 | 206 => Ok(Box::new(resp.into_body().into_reader())),
            404 => Err(FetchError::new(
                FetchErrorClass::NotFound,
                format!("GET {url}: blob not found"),
            )),
            s => Err(FetchError::new(
                FetchErrorClass::Network,
                format!("GET {url}: HTTP {s}"),
            )),
        }
    }
}

/// A token realm may be `https://`, or plain `http://` only on a host that may be spoken to
/// in plain HTTP (loopback) or on the registry's own host. The scheme is read
/// case-insensitively: `HTTP://` is plain HTTP too, and credentials go to the realm.
fn check_realm(realm: &str, registry_host: &str) -> Result<(), FetchError> {
    let Some((scheme, rest)) = realm.split_once("://") else {
        return Err(FetchError::new(
            FetchErrorClass::Malformed,
            format!("{registry_host}: token realm {realm:?} is not an absolute URL"),
        ));
    };
    if scheme.eq_ignore_ascii_case("https") {
        return Ok(());
    }
    if !scheme.eq_ignore_ascii_case("http") {
        return Err(FetchError::new(
            FetchErrorClass::Insecure,
            format!("{registry_host}: token realm {realm:?} is neither https nor http"),
        ));
    }
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let host = authority.rsplit('@').next().unwrap_or("");
    if plain_http_allowed(host, &[]) || host.eq_ignore_ascii_case(registry_host) {
        return Ok(());
    }
    Err(FetchError::new(
        FetchErrorClass::Insecure,
        format!("token realm {realm} is plain HTTP"),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plain_http_realm_elsewhere_is_refused_whatever_its_case() {
        let host = "registry.example.com";
        for refused in [
            "http://auth.example/token",
            "HTTP://auth.example/token",
            "Http://auth.example/token",
            "http://127.0.0.1@auth.example/token",
            "ftp://auth.example/token",
            "auth.example/token",
        ] {
            assert!(check_realm(refused, host).is_err(), "{refused}");
        }
        // Controls: https anywhere, plain HTTP on loopback or the registry's own host.
        for allowed in [
            "https://auth.example/token",
            "HTTPS://auth.example/token",
            "http://127.0.0.1:5001/token",
            "HTTP://registry.example.com/token",
        ] {
            assert!(check_realm(allowed, host).is_ok(), "{allowed}");
        }
    }

    #[test]
    fn plain_http_only_for_loopback_or_configured() {
        assert!(plain_http_allowed("127.0.0.1:5000", &[]));
        assert!(plain_http_allowed("127.8.9.1", &[]));
        assert!(plain_http_allowed("localhost:5000", &[]));
        assert!(plain_http_allowed("[::1]:5000", &[]));
        assert!(!plain_http_allowed("registry.example.com", &[]));
        assert!(!plain_http_allowed("10.0.0.1:5000", &[]));
        assert!(plain_http_allowed(
            "10.0.0.1:5000",
            &["10.0.0.1:5000".into()]
        ));
    }

    #[test]
    fn non_loopback_registry_uses_https() {
        let r = DockerReference::parse("registry.example.com/a/b:t").unwrap();
        let s = RegistrySource::new(&r, &SourceOptions::default()).unwrap();
        assert!(s.base.starts_with("https://registry.example.com/v2/a/b"));
        let r = DockerReference::parse("127.0.0.1:5000/a/b:t").unwrap();
        let s = RegistrySource::new(&r, &SourceOptions::default()).unwrap();
        assert!(s.base.starts_with("http://127.0.0.1:5000/v2/a/b"));
    }

    #[test]
    fn referrer_page_links() {
        assert_eq!(
            next_link(r#"</v2/a/b/referrers/sha256:00?n=2&last=x>; rel="next""#).as_deref(),
            Some("/v2/a/b/referrers/sha256:00?n=2&last=x")
        );
        assert_eq!(next_link(r#"</x>; rel="prev""#), None);
        let r = DockerReference::parse("127.0.0.1:5000/a/b:t").unwrap();
        let s = RegistrySource::new(&r, &SourceOptions::default()).unwrap();
        assert_eq!(
            s.resolve_link("/v2/a/b/referrers/sha256:00?last=1")
                .unwrap(),
            "http://127.0.0.1:5000/v2/a/b/referrers/sha256:00?last=1"
        );
        for off in [
            "/v2/other/referrers/sha256:00",
            "http://evil.example/v2/a/b/referrers/sha256:00",
            "/v2/a/b/blobs/sha256:00",
        ] {
            assert!(s.resolve_link(off).is_err(), "{off}");
        }
    }

    #[test]
    fn challenge_parsing() {
        let p = parse_challenge(
            r#"realm="https://auth.io/token",service="registry.io",scope="repository:a/b:pull,push""#,
        );
        assert_eq!(p[0], ("realm".into(), "https://auth.io/token".into()));
        assert_eq!(p[1], ("service".into(), "registry.io".into()));
        assert_eq!(p[2], ("scope".into(), "repository:a/b:pull,push".into()));
    }
}
