//! Image references with a transport, as containers-policy.json scopes see
//! them: `docker://host[:port]/repo[:tag][@digest]`, `oci:DIR[:REF]` and
//! `dir:PATH`.
//!
//! The docker grammar follows distribution/reference: the first path
//! component is a registry domain only if it contains `.` or `:` or is
//! `localhost`; otherwise the domain is `docker.io` and single-component
//! names get the `library/` prefix.

use std::fmt;
use std::path::{Component, Path, PathBuf};

/// Why a reference string could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid image reference {input:?}: {reason}")]
pub struct ReferenceError {
    pub input: String,
    pub reason: String,
}

fn err(input: &str, reason: impl Into<String>) -> ReferenceError {
    ReferenceError {
        input: input.to_string(),
        reason: reason.into(),
    }
}

/// A content digest, `sha256:<64 lowercase hex>` (the only algorithm OCI
/// images use in practice; others are refused rather than half-supported).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest {
    hex: String,
}

impl Digest {
    /// Parses `sha256:<64 lowercase hex>`.
    pub fn parse(s: &str) -> Result<Self, ReferenceError> {
        let (alg, hex) = s
            .split_once(':')
            .ok_or_else(|| err(s, "digest must be <algorithm>:<hex>"))?;
        if alg != "sha256" {
            return Err(err(s, format!("unsupported digest algorithm {alg:?}")));
        }
        if hex.len() != 64 || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(err(s, "sha256 digest must be 64 lowercase hex characters"));
        }
        Ok(Self {
            hex: hex.to_string(),
        })
    }

    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        use sha2::Digest as _;
        Self::from_sha256(sha2::Sha256::digest(bytes).into())
    }

    pub fn from_sha256(raw: [u8; 32]) -> Self {
        Self {
            hex: hex::encode(raw),
        }
    }

    /// The hex part, without the algorithm.
    pub fn hex(&self) -> &str {
        &self.hex
    }

    pub fn algorithm(&self) -> &'static str {
        "sha256"
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.hex)
    }
}

impl serde::Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({self})")
    }
}

/// A docker-style reference: domain, repository path, optional tag, optional digest.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct DockerReference {
    domain: String,
    path: String,
    tag: Option<String>,
    digest: Option<Digest>,
}

const DEFAULT_DOMAIN: &str = "docker.io";

impl DockerReference {
    /// Parses a reference without transport prefix, e.g.
    /// `127.0.0.1:5000/fixtures/hello:tag` or `busybox@sha256:...`.
    /// A reference with neither tag nor digest gets the tag `latest`, as
    /// containers/image does for the docker transport.
    pub fn parse(input: &str) -> Result<Self, ReferenceError> {
        Self::parse_inner(input, true)
    }

    /// Parses a reference as it appears in a signature's identity: a name without tag or
    /// digest stays name-only (no implied `latest`), as containers/image compares them.
    pub fn parse_name_only_allowed(input: &str) -> Result<Self, ReferenceError> {
        Self::parse_inner(input, false)
    }

    fn parse_inner(input: &str, default_tag: bool) -> Result<Self, ReferenceError> {
        if input.is_empty() {
            return Err(err(input, "empty reference"));
        }
        if input.len() > 4096 {
            return Err(err(input, "reference longer than 4096 bytes"));
        }
        let (rest, digest) = match input.split_once('@') {
            Some((r, d)) => (r, Some(Digest::parse(d).map_err(|e| err(input, e.reason))?)),
            None => (input, None),
        };
        // A tag is after the last ':' that follows the last '/'.
        let last_slash = rest.rfind('/').map(|i| i + 1).unwrap_or(0);
        let (name, tag) = match rest[last_slash..].rfind(':') {
            Some(i) => {
                let tag = &rest[last_slash + i + 1..];
                validate_tag(input, tag)?;
                (&rest[..last_slash + i], Some(tag.to_string()))
            }
            None => (rest, None),
        };
        let (domain, path) = split_domain(name);
        if domain.is_empty() {
            return Err(err(input, "empty registry domain"));
        }
        validate_domain(input, &domain)?;
        if path.is_empty() {
            return Err(err(input, "empty repository path"));
        }
        for component in path.split('/') {
            validate_path_component(input, component)?;
        }
        if domain.len() + 1 + path.len() > 255 {
            return Err(err(input, "repository name longer than 255 characters"));
        }
        let tag = match (&tag, &digest) {
            (None, None) if default_tag => Some("latest".to_string()),
            _ => tag,
        };
        Ok(Self {
            domain,
            path,
            tag,
            digest,
        })
    }

    /// Registry host, with port if any (`127.0.0.1:5000`).
    pub fn domain(&self) -> &str {
        &self.domain
    }

    /// Repository path inside the registry (`fixtures/hello`).
    pub fn path(&self) -> &str {
        &self.path
    }

    pub fn tag(&self) -> Option<&str> {
        self.tag.as_deref()
    }

    pub fn digest(&self) -> Option<&Digest> {
        self.digest.as_ref()
    }

    /// `domain/path`, the repository name used in signatures and scopes.
    pub fn repository(&self) -> String {
        format!("{}/{}", self.domain, self.path)
    }

    /// The same repository pinned to `digest` (tag dropped).
    pub fn with_digest(&self, digest: Digest) -> Self {
        Self {
            domain: self.domain.clone(),
            path: self.path.clone(),
            tag: None,
            digest: Some(digest),
        }
    }

    /// The same repository with `tag` (digest dropped).
    pub fn with_tag(&self, tag: &str) -> Result<Self, ReferenceError> {
        validate_tag(tag, tag)?;
        Ok(Self {
            domain: self.domain.clone(),
            path: self.path.clone(),
            tag: Some(tag.to_string()),
            digest: None,
        })
    }

    /// The scopes of containers-policy.json(5) this reference falls under,
    /// most specific first: the full reference, the repository, each parent
    /// namespace, the host, then `*.domain` wildcards from the longest.
    pub fn policy_scopes(&self) -> Vec<String> {
        let mut scopes = vec![self.to_string()];
        let repo = self.repository();
        let mut current = repo.as_str();
        scopes.push(current.to_string());
        while let Some(i) = current.rfind('/') {
            current = &current[..i];
            scopes.push(current.to_string());
        }
        // Wildcards apply to the host name without port.
        let host = self.domain.split(':').next().unwrap_or(&self.domain);
        let mut labels: &str = host;
        while let Some(i) = labels.find('.') {
            labels = &labels[i + 1..];
            scopes.push(format!("*.{labels}"));
        }
        scopes
    }
}

fn split_domain(name: &str) -> (String, String) {
    match name.split_once('/') {
        Some((first, rest))
            if first.contains('.') || first.contains(':') || first == "localhost" =>
        {
            (first.to_string(), rest.to_string())
        }
        Some(_) => (DEFAULT_DOMAIN.to_string(), name.to_string()),
        None => (DEFAULT_DOMAIN.to_string(), format!("library/{name}")),
    }
}

fn validate_domain(input: &str, domain: &str) -> Result<(), ReferenceError> {
    let (host, port) = match domain.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => (h, Some(p)),
        _ => (domain, None),
    };
    if let Some(port) = port {
        if port.is_empty() || port.len() > 5 || !port.bytes().all(|b| b.is_ascii_digit()) {
            return Err(err(input, format!("invalid port in registry {domain:?}")));
        }
    }
    let ipv6 = host.starts_with('[') && host.ends_with(']');
    let ok = ipv6
        || host.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        });
    if !ok {
        return Err(err(input, format!("invalid registry host {host:?}")));
    }
    Ok(())
}

fn validate_path_component(input: &str, c: &str) -> Result<(), ReferenceError> {
    // [a-z0-9]+(?:(?:[._]|__|[-]*)[a-z0-9]+)*
    let bytes = c.as_bytes();
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let bad = || {
        err(
            input,
            format!(
                "invalid repository path component {c:?}: lowercase letters, digits and single \
                 separators (., _, __, -) only"
            ),
        )
    };
    if bytes.is_empty() || !alnum(bytes[0]) || !alnum(bytes[bytes.len() - 1]) {
        return Err(bad());
    }
    let mut i = 0;
    while i < bytes.len() {
        if alnum(bytes[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < bytes.len() && !alnum(bytes[i]) {
            i += 1;
        }
        let sep = &c[start..i];
        let ok = sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|b| b == b'-');
        if !ok {
            return Err(bad());
        }
    }
    Ok(())
}

fn validate_tag(input: &str, tag: &str) -> Result<(), ReferenceError> {
    // [\w][\w.-]{0,127}
    let bytes = tag.as_bytes();
    let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    if bytes.is_empty()
        || bytes.len() > 128
        || !word(bytes[0])
        || !bytes.iter().all(|&b| word(b) || b == b'.' || b == b'-')
    {
        return Err(err(
            input,
            format!("invalid tag {tag:?}: 1-128 of [A-Za-z0-9_.-], not starting with . or -"),
        ));
    }
    Ok(())
}

impl fmt::Display for DockerReference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.domain, self.path)?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for DockerReference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DockerReference({self})")
    }
}

/// An image in an OCI image-layout directory: `oci:DIR[:REF]`.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub struct OciLayoutReference {
    dir: PathBuf,
    image: Option<String>,
}

impl OciLayoutReference {
    /// `dir` is made absolute and lexically normalised (`.`/`..` removed);
    /// symlinks are not resolved here, so scopes match what the user wrote.
    pub fn new(dir: &Path, image: Option<&str>) -> Result<Self, ReferenceError> {
        let input = dir.display().to_string();
        if dir.as_os_str().is_empty() {
            return Err(err(&input, "empty OCI layout directory"));
        }
        if let Some(image) = image {
            if image.is_empty() {
                return Err(err(&input, "empty image name after ':'"));
            }
            if image.contains(':') && Digest::parse(image).is_err() {
                return Err(err(image, "OCI layout reference may not contain ':'"));
            }
        }
        Ok(Self {
            dir: absolute_normalized(dir)
                .map_err(|e| err(&input, format!("cannot read current directory: {e}")))?,
            image: image.map(str::to_string),
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The `org.opencontainers.image.ref.name` to select, if any.
    pub fn image(&self) -> Option<&str> {
        self.image.as_deref()
    }

    /// Scopes, most specific first: `DIR:REF`, `DIR`, then each parent
    /// directory (containers-policy.json(5), oci transport).
    pub fn policy_scopes(&self) -> Vec<String> {
        let dir = self.dir.display().to_string();
        let mut scopes = Vec::new();
        if let Some(image) = &self.image {
            scopes.push(format!("{dir}:{image}"));
        }
        scopes.extend(path_scopes(&self.dir));
        scopes
    }
}

/// A `dir:PATH` reference (an unpacked image directory, as skopeo writes).
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub struct DirReference {
    dir: PathBuf,
}

impl DirReference {
    pub fn new(dir: &Path) -> Result<Self, ReferenceError> {
        let input = dir.display().to_string();
        if dir.as_os_str().is_empty() {
            return Err(err(&input, "empty directory"));
        }
        Ok(Self {
            dir: absolute_normalized(dir)
                .map_err(|e| err(&input, format!("cannot read current directory: {e}")))?,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn policy_scopes(&self) -> Vec<String> {
        path_scopes(&self.dir)
    }
}

fn path_scopes(dir: &Path) -> Vec<String> {
    let mut scopes = Vec::new();
    let mut current = Some(dir);
    while let Some(p) = current {
        if p == Path::new("/") {
            break;
        }
        scopes.push(p.display().to_string());
        current = p.parent();
    }
    scopes
}

/// An absolute path without `.` and `..` (the error: the current directory is unreadable).
fn absolute_normalized(p: &Path) -> Result<PathBuf, std::io::Error> {
    let base = if p.is_absolute() {
        PathBuf::from("/")
    } else {
        std::env::current_dir()?
    };
    let mut out = base;
    for c in p.components() {
        match c {
            Component::RootDir | Component::Prefix(_) => out = PathBuf::from("/"),
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            Component::Normal(n) => out.push(n),
        }
    }
    Ok(out)
}

/// The transports of containers-transports(5) that this project handles.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub enum Transport {
    Docker,
    Oci,
    Dir,
}

impl Transport {
    /// The transport's name as used in policy `transports` keys.
    pub fn name(self) -> &'static str {
        match self {
            Transport::Docker => "docker",
            Transport::Oci => "oci",
            Transport::Dir => "dir",
        }
    }
}

/// A reference with its transport.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub enum ImageReference {
    Docker(DockerReference),
    Oci(OciLayoutReference),
    Dir(DirReference),
}

impl ImageReference {
    /// Parses `docker://REF`, `oci:DIR[:REF]` or `dir:PATH`.
    pub fn parse(input: &str) -> Result<Self, ReferenceError> {
        if let Some(rest) = input.strip_prefix("docker://") {
            return DockerReference::parse(rest)
                .map(ImageReference::Docker)
                .map_err(|e| err(input, e.reason));
        }
        if let Some(rest) = input.strip_prefix("oci:") {
            let (dir, image) = match rest.split_once(':') {
                Some((d, i)) => (d, Some(i)),
                None => (rest, None),
            };
            return OciLayoutReference::new(Path::new(dir), image).map(ImageReference::Oci);
        }
        if let Some(rest) = input.strip_prefix("dir:") {
            return DirReference::new(Path::new(rest)).map(ImageReference::Dir);
        }
        Err(err(
            input,
            "unknown transport: expected docker://HOST/REPO[:TAG|@DIGEST], oci:DIR[:TAG] or dir:PATH",
        ))
    }

    pub fn transport(&self) -> Transport {
        match self {
            ImageReference::Docker(_) => Transport::Docker,
            ImageReference::Oci(_) => Transport::Oci,
            ImageReference::Dir(_) => Transport::Dir,
        }
    }

    /// Scopes for policy lookup, most specific first.
    pub fn policy_scopes(&self) -> Vec<String> {
        match self {
            ImageReference::Docker(r) => r.policy_scopes(),
            ImageReference::Oci(r) => r.policy_scopes(),
            ImageReference::Dir(r) => r.policy_scopes(),
        }
    }

    /// The docker reference whose identity signatures are checked against,
    /// if the transport has one (docker only; for oci and dir the
    /// `signedIdentity` rules that need one fail, as in containers/image,
    /// unless the rule names the identity itself).
    pub fn docker_reference(&self) -> Option<&DockerReference> {
        match self {
            ImageReference::Docker(r) => Some(r),
            _ => None,
        }
    }
}

impl fmt::Display for ImageReference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ImageReference::Docker(r) => write!(f, "docker://{r}"),
            ImageReference::Oci(r) => {
                write!(f, "oci:{}", r.dir.display())?;
                if let Some(i) = &r.image {
                    write!(f, ":{i}")?;
                }
                Ok(())
            }
            ImageReference::Dir(r) => write!(f, "dir:{}", r.dir.display()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:35fb4eaa23f16ac6dc063cadc488c8fa324e0abc3c42391ec4998ca3eae32112";

    #[test]
    fn docker_domain_rules() {
        let r = DockerReference::parse("busybox").unwrap();
        assert_eq!(r.repository(), "docker.io/library/busybox");
        assert_eq!(r.tag(), Some("latest"));
        let r = DockerReference::parse("user/app:1.0").unwrap();
        assert_eq!(r.repository(), "docker.io/user/app");
        let r = DockerReference::parse("127.0.0.1:5000/fixtures/hello:enc-signed").unwrap();
        assert_eq!(r.domain(), "127.0.0.1:5000");
        assert_eq!(r.path(), "fixtures/hello");
        assert_eq!(r.tag(), Some("enc-signed"));
        let r = DockerReference::parse("localhost/a").unwrap();
        assert_eq!(r.domain(), "localhost");
        let r = DockerReference::parse(&format!("quay.io/a/b@{D}")).unwrap();
        assert_eq!(r.tag(), None);
        assert_eq!(r.digest().unwrap().to_string(), D);
        let r = DockerReference::parse(&format!("quay.io/a/b:t@{D}")).unwrap();
        assert_eq!(r.tag(), Some("t"));
        assert_eq!(r.to_string(), format!("quay.io/a/b:t@{D}"));
    }

    #[test]
    fn docker_rejects_bad_input() {
        for bad in [
            "",
            "UPPER/case",
            "a//b",
            "a/b:",
            "a/b:-tag",
            "a/b@sha256:abc",
            "a/b@md5:0123",
            "host:99999999/a",
            "a/b c",
            "a/../b",
            "-a/b",
        ] {
            assert!(DockerReference::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn docker_scopes_most_specific_first() {
        let r = DockerReference::parse("reg.example.com:5000/ns/app:v1").unwrap();
        assert_eq!(
            r.policy_scopes(),
            vec![
                "reg.example.com:5000/ns/app:v1",
                "reg.example.com:5000/ns/app",
                "reg.example.com:5000/ns",
                "reg.example.com:5000",
                "*.example.com",
                "*.com",
            ]
        );
    }

    #[test]
    fn transports() {
        let r = ImageReference::parse("oci:/tmp/x/../layout:enc-signed").unwrap();
        assert_eq!(r.transport(), Transport::Oci);
        assert_eq!(r.to_string(), "oci:/tmp/layout:enc-signed");
        assert_eq!(
            r.policy_scopes(),
            vec!["/tmp/layout:enc-signed", "/tmp/layout", "/tmp"]
        );
        let r = ImageReference::parse("docker://127.0.0.1:5000/fixtures/hello:plain").unwrap();
        assert_eq!(r.transport(), Transport::Docker);
        assert!(ImageReference::parse("http://x/y").is_err());
        assert!(ImageReference::parse("dir:/a/b").is_ok());
    }

    #[test]
    fn digest_parse() {
        assert!(Digest::parse(D).is_ok());
        assert!(Digest::parse("sha256:ABC").is_err());
        assert!(Digest::parse("sha512:00").is_err());
        assert_eq!(
            Digest::of(b"").to_string(),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }
}
