//! Placement grants on the IPU: the control plane's signed word on which tenant's
//! function runs here, for which host and image. [`policy::grant::verify`] checks a grant
//! against the running deployment policy without state; [`GrantGate`] adds what needs state:
//! a grant's serial is accepted once within its validity window, across restarts
//! ([`SerialStore`]).
//!
//! [`crate::service::Service::placement`] runs the gate before Prepare and Verify fetch
//! anything and returns a [`Placement`]: the grant's tenant and function, and the grant
//! itself, which every key release of the request carries to the broker (which checks it
//! again for the attested IPU) and which the layers a Verify made known keep, so the decrypt
//! hook's DecryptLayer acts under that grant and not after its window.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use policy::deploy::DeploymentPolicy;
use policy::grant::{Expectation, GrantError, VerifiedGrant, CLOCK_SKEW};

/// A grant the gate admitted, as a request carries it on.
#[derive(Debug)]
pub struct AdmittedGrant {
    /// The envelope as the control plane signed it (a public statement, not a secret).
    pub envelope: Arc<str>,
    pub serial: String,
    pub not_after: SystemTime,
}

impl AdmittedGrant {
    /// Whether its window (with the clock skew allowed) has ended at `now`.
    pub fn expired(&self, now: SystemTime) -> bool {
        now >= self.not_after + CLOCK_SKEW
    }
}

/// Whom a request acts for: the tenant and function, and the grant that named them (none
/// when the running policy asks for no grants).
#[derive(Clone, Debug)]
pub struct Placement {
    pub tenant: String,
    pub function: String,
    pub grant: Option<Arc<AdmittedGrant>>,
}

impl Placement {
    /// A placement on the host's word alone (no grant keys in the policy).
    pub fn ungranted(tenant: &str, function: &str) -> Self {
        Self {
            tenant: tenant.to_string(),
            function: function.to_string(),
            grant: None,
        }
    }

    /// The grant's envelope, for a key release.
    pub fn envelope(&self) -> Option<Arc<str>> {
        self.grant.as_ref().map(|g| g.envelope.clone())
    }
}

/// Why a grant was not accepted.
#[derive(Debug, thiserror::Error)]
pub enum GrantRefusal {
    #[error("placement grant refused ({code}): {0}", code = .0.reason_code())]
    Invalid(#[from] GrantError),
    #[error("placement grant refused (replayed): serial {serial} was already used; a grant starts one function")]
    Replayed { serial: String },
    #[error("placement grant refused (request-mismatch): the request names {what} {asked:?}, the grant {granted:?}")]
    RequestMismatch {
        what: &'static str,
        asked: String,
        granted: String,
    },
    #[error("placement grant serials at {path}: {source}")]
    Store {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

impl GrantRefusal {
    /// A short stable code for the audit log.
    pub fn reason_code(&self) -> &'static str {
        match self {
            GrantRefusal::Invalid(e) => e.reason_code(),
            GrantRefusal::Replayed { .. } => "replayed",
            GrantRefusal::RequestMismatch { .. } => "request-mismatch",
            GrantRefusal::Store { .. } => "serial-store",
        }
    }
}

/// Serials of accepted grants, one file each (named by the serial, holding its `not_after`
/// in seconds), kept until the window has passed. A claim creates the file with `O_EXCL`, so
/// two claims of one serial cannot both win, and the directory is synced before the claim
/// counts, so a restart still knows it.
#[derive(Debug)]
pub struct SerialStore {
    dir: PathBuf,
}

impl SerialStore {
    /// Opens (creates, mode 0700) the store at `dir`.
    pub fn open(dir: &Path) -> Result<Self, GrantRefusal> {
        let store_err = |source| GrantRefusal::Store {
            path: dir.to_path_buf(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(store_err)?;
        std::fs::set_permissions(dir, std::os::unix::fs::PermissionsExt::from_mode(0o700))
            .map_err(store_err)?;
        Ok(Self {
            dir: dir.to_path_buf(),
        })
    }

    /// Claims `serial` until `not_after`: false when it was claimed before (a replay).
    /// `serial` must be a grant's validated serial (letters, digits, `-`, `_`).
    pub fn claim(&self, serial: &str, not_after: SystemTime) -> Result<bool, GrantRefusal> {
        debug_assert!(policy::grant::valid_name(serial));
        let path = self.dir.join(serial);
        let store_err = |source| GrantRefusal::Store {
            path: path.clone(),
            source,
        };
        let mut file = match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
        {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Ok(false),
            Err(e) => return Err(store_err(e)),
        };
        let secs = not_after
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        io::Write::write_all(&mut file, secs.to_string().as_bytes()).map_err(store_err)?;
        file.sync_all().map_err(store_err)?;
        std::fs::File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .map_err(store_err)?;
        Ok(true)
    }

    /// Forgets serials whose window (with the clock skew allowed) ended before `now`: a
    /// grant that old is refused as expired anyway. Returns how many went.
    pub fn prune(&self, now: SystemTime) -> Result<usize, GrantRefusal> {
        let store_err = |source| GrantRefusal::Store {
            path: self.dir.clone(),
            source,
        };
        let mut pruned = 0;
        for entry in std::fs::read_dir(&self.dir).map_err(store_err)? {
            let entry = entry.map_err(store_err)?;
            let ended = std::fs::read_to_string(entry.path())
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
                .map(|secs| UNIX_EPOCH + Duration::from_secs(secs) + CLOCK_SKEW);
            // An unreadable entry (a claim cut short by a crash) is kept for a day, the
            // longest window, from its last change.
            let ended = ended.or_else(|| {
                entry
                    .metadata()
                    .and_then(|m| m.modified())
                    .ok()
                    .map(|t| t + policy::grant::MAX_VALIDITY + CLOCK_SKEW)
            });
            if ended.is_some_and(|t| t < now) {
                std::fs::remove_file(entry.path()).map_err(store_err)?;
                pruned += 1;
            }
        }
        Ok(pruned)
    }
}

/// What a request names, which its grant must cover.
#[derive(Clone, Copy, Debug)]
pub struct GrantedRequest<'a> {
    /// Empty: the grant's.
    pub tenant: &'a str,
    /// Empty: the grant's.
    pub function: &'a str,
    pub image: &'a str,
    /// The host's export identity, when it has one.
    pub host: Option<&'a str>,
}

/// What the IPU checks of a grant: the running policy's grant keys, this IPU's enrolled
/// identity, and the serials already used.
pub struct GrantGate {
    policy: Arc<DeploymentPolicy>,
    ipu: String,
    serials: SerialStore,
    /// When the store was last pruned: at most every [`PRUNE_EVERY`], so a long uptime does
    /// not keep every serial ever claimed and no claim pays for a directory scan.
    last_prune: std::sync::Mutex<Option<std::time::Instant>>,
}

/// How often the gate forgets serials whose window has passed.
const PRUNE_EVERY: Duration = Duration::from_secs(60);

impl GrantGate {
    pub fn new(policy: Arc<DeploymentPolicy>, ipu: String, serials: SerialStore) -> Self {
        Self {
            policy,
            ipu,
            serials,
            last_prune: std::sync::Mutex::new(None),
        }
    }

    /// Prunes the serial store when it is due (the first call always is).
    fn prune_if_due(&self, now: SystemTime) {
        let mut last = self.last_prune.lock().expect("not poisoned");
        if last.is_some_and(|t| t.elapsed() < PRUNE_EVERY) {
            return;
        }
        *last = Some(std::time::Instant::now());
        // A failed prune only keeps old serials longer; claims still decide correctly.
        if let Err(e) = self.serials.prune(now) {
            tracing::warn!(error = %e, "cannot prune placement grant serials");
        }
    }

    /// Whether the running policy asks for grants at all (it names grant keys).
    pub fn required(&self) -> bool {
        self.policy.grants_required()
    }

    /// Verifies `envelope` for a request naming `image`, `tenant` and `function` (either may
    /// be empty: the grant's then) from the host `host` (its export identity, when it has
    /// one), then claims its serial: a request the grant does not cover leaves the serial
    /// unused. The tenant and function to act for are the grant's.
    pub fn admit(
        &self,
        envelope: &[u8],
        request: &GrantedRequest<'_>,
        now: SystemTime,
    ) -> Result<VerifiedGrant, GrantRefusal> {
        let GrantedRequest {
            tenant,
            function,
            image,
            host,
        } = *request;
        let verified = policy::grant::verify(
            envelope,
            &self.policy,
            &Expectation {
                ipu: &self.ipu,
                host,
                image,
                now,
            },
        )?;
        for (what, asked, granted) in [
            ("tenant", tenant, verified.tenant()),
            ("function", function, verified.function()),
        ] {
            if !asked.is_empty() && asked != granted {
                return Err(GrantRefusal::RequestMismatch {
                    what,
                    asked: asked.to_string(),
                    granted: granted.to_string(),
                });
            }
        }
        self.prune_if_due(now);
        if !self
            .serials
            .claim(verified.serial(), verified.not_after())?
        {
            return Err(GrantRefusal::Replayed {
                serial: verified.serial().to_string(),
            });
        }
        Ok(verified)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_serial_is_claimed_once_across_reopening_until_its_window_ends() {
        let dir = tempfile::tempdir().unwrap();
        let at = dir.path().join("grants");
        let now = SystemTime::now();
        let not_after = now + Duration::from_secs(600);
        let store = SerialStore::open(&at).unwrap();
        assert!(store.claim("0123456789abcdef0123", not_after).unwrap());
        assert!(!store.claim("0123456789abcdef0123", not_after).unwrap());
        assert!(store.claim("another-serial-00001", not_after).unwrap());
        // A restart: the claims hold.
        drop(store);
        let store = SerialStore::open(&at).unwrap();
        assert!(!store.claim("0123456789abcdef0123", not_after).unwrap());
        // Within the window (and its skew) nothing is forgotten; past it, both go.
        assert_eq!(store.prune(not_after).unwrap(), 0);
        assert_eq!(
            store
                .prune(not_after + CLOCK_SKEW + Duration::from_secs(2))
                .unwrap(),
            2
        );
        assert!(store.claim("0123456789abcdef0123", not_after).unwrap());
    }

    fn pem(label: &str, der: &[u8]) -> String {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::STANDARD.encode(der);
        let lines: Vec<&str> = b64
            .as_bytes()
            .chunks(64)
            .map(|c| std::str::from_utf8(c).unwrap())
            .collect();
        format!(
            "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
            lines.join("\n")
        )
    }

    /// A policy trusting a new Ed25519 grant key for acme, and that key's PKCS#8 PEM.
    fn policy_and_key() -> (DeploymentPolicy, String) {
        use ring::signature::KeyPair as _;
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
        let kp = ring::signature::Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
        let public = pem(
            "PUBLIC KEY",
            &policy::dsse::ed25519_spki(kp.public_key().as_ref()),
        );
        let text = format!(
            r#"schema = 1
image_trust_policy = "image-trust.json"

[[tenant]]
name = "acme"

[[tenant.function]]
name = "*"
images = ["docker://registry.example/acme/*"]

[[grant_key]]
id = "control-plane"
public_key = """
{public}"""
tenants = ["acme"]
"#
        );
        (
            policy::deploy::parse(&text, "test.toml").unwrap(),
            pem("PRIVATE KEY", pkcs8.as_ref()),
        )
    }

    #[test]
    fn the_gate_admits_a_grant_once_even_after_a_restart() {
        let (policy, key) = policy_and_key();
        let policy = Arc::new(policy);
        let now = SystemTime::now();
        let image = "docker://registry.example/acme/app@sha256:35fb4eaa23f16ac6dc063cadc488c8fa324e0abc3c42391ec4998ca3eae32112";
        let grant = policy::grant::Grant {
            version: 1,
            serial: policy::grant::new_serial().unwrap(),
            tenant: "acme".into(),
            function: "resize".into(),
            image: policy::grant::ImageClaim::Reference(image.into()),
            ipu: "ipu-1".into(),
            host: "host-1.example".into(),
            not_before: now - Duration::from_secs(5),
            not_after: now + Duration::from_secs(600),
        };
        let (envelope, _) = policy::grant::sign(&grant, key.as_bytes()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let gate = |ipu: &str| {
            GrantGate::new(
                policy.clone(),
                ipu.into(),
                SerialStore::open(&dir.path().join("grants")).unwrap(),
            )
        };
        assert!(gate("ipu-1").required());
        let request = GrantedRequest {
            tenant: "acme",
            function: "",
            image,
            host: Some("host-1.example"),
        };
        // A request naming another function than the grant's: refused, the serial unused.
        let other_function = gate("ipu-1")
            .admit(
                envelope.as_bytes(),
                &GrantedRequest {
                    function: "other",
                    ..request
                },
                now,
            )
            .unwrap_err();
        assert_eq!(other_function.reason_code(), "request-mismatch");
        // Another IPU's gate refuses it, and does not use up its serial.
        let other = gate("ipu-2")
            .admit(envelope.as_bytes(), &request, now)
            .unwrap_err();
        assert_eq!(other.reason_code(), "wrong-ipu", "{other}");
        // Positive control: admitted once, with the grant's tenant and function.
        let admitted = gate("ipu-1")
            .admit(envelope.as_bytes(), &request, now)
            .unwrap();
        assert_eq!((admitted.tenant(), admitted.function()), ("acme", "resize"));
        // Replayed, to this gate and to a new one over the same store (a restart).
        for g in [gate("ipu-1"), gate("ipu-1")] {
            let replay = g.admit(envelope.as_bytes(), &request, now).unwrap_err();
            assert_eq!(replay.reason_code(), "replayed", "{replay}");
        }
    }

    #[test]
    fn concurrent_claims_of_one_serial_have_one_winner() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SerialStore::open(dir.path()).unwrap());
        let not_after = SystemTime::now() + Duration::from_secs(60);
        let wins: usize = (0..8)
            .map(|_| {
                let store = store.clone();
                std::thread::spawn(move || store.claim("raced-serial-000000", not_after).unwrap())
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|t| usize::from(t.join().unwrap()))
            .sum();
        assert_eq!(wins, 1);
    }
}
