//! The IPU service's function lifecycle, transport-free: `prepare` a function's clone of a
//! verified image and export it to the host, `teardown` (hot-remove and cryptographic erase),
//! `list`, events for the host agent, expiry, and recovery of orphans at start-up.
//!
//! Bases are cached by platform manifest digest, a bounded number of them, for at most the
//! life of the process (their keys live only in its memory), and every Prepare runs the image
//! through the current policy again, cached or not. Clones and their keys never outlive the process: a crash is an erase, and
//! the next start deletes what was left and audits it.

mod cache;
pub mod daemon;
pub mod decrypt;
pub mod error;
pub mod grpc;
pub mod known;
pub mod operations;
pub mod prefetch;
pub mod spool;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use audit::{AuditSink, Event, EventKind, KeyId, Outcome};
use policy::reference::ImageReference;

use crate::blockstore::base::{BaseImage, BaseWriter};
use crate::blockstore::clone::CloneDevice;
use crate::blockstore::xts::XtsKey;
use crate::blockstore::BlockDevice;
use crate::error::Error;
use crate::export::nbd::Export;
use crate::export::vhost::{VhostEvent, VhostOptions, VhostUserBlkExport};
use crate::export::{Endpoint, ExportKind, HostExport};
use crate::keys::KeySource;
use crate::metrics::{ServiceMetrics, Stage};
use crate::pipeline::{PipelineConfig, TrustPipeline};
use crate::progress::Quiet;
use crate::record::AUDIT_SERVICE;
use crate::rootfs::ImageTarget;
use crate::unpack::Budget;
use crate::verify::VerifiedImage;
pub use error::ServiceError;

/// Builds the pipeline configuration for one request (policy, limits, audit sink).
pub type PipelineFactory = Box<dyn Fn(&str, &str) -> Result<PipelineConfig, Error> + Send + Sync>;

#[derive(Clone, Debug)]
pub struct ServiceOptions {
    /// `bases/`, `clones/`, `exports/` and `spool/` live here (nothing decrypted: a base's
    /// blocks are encrypted as they are written, clones under their own keys, and the spool
    /// holds ciphertext).
    pub state_dir: PathBuf,
    /// The only uid (besides root) that may open exports and call the API.
    pub host_agent_uid: u32,
    /// How long a clone lives unless torn down first, when the deployment policy does not
    /// say.
    pub clone_ttl: Duration,
    /// Export over TCP with TLS (on a new port of this address per function) instead of
    /// Unix sockets.
    pub tcp_exports: Option<TcpExports>,
    /// Bases kept for later starts; the least recently used one nobody uses goes first.
    pub max_cached_bases: usize,
    /// How long a verification (`verify`, or a Prepare) lets containerd's decrypt hook have
    /// the image's layers decrypted.
    pub verified_layer_ttl: Duration,
    /// How clones are exported when a Prepare does not say.
    pub exports: ExportOptions,
    /// Bytes of received blobs the decrypt hook's streams may hold in memory at once; a blob
    /// past it is spilled to `<state-dir>/spool` ([`spool`]).
    pub spool_memory: u64,
    /// Bytes of encrypted layers the IPU fetches itself after a `Verify` and holds for the
    /// decrypt hook at once ([`prefetch`]); 0 fetches none (every hook run then takes the
    /// two-pass way: the whole blob received, then decrypted).
    pub hook_prefetch: u64,
}

/// How clones are exported.
#[derive(Clone, Debug)]
pub struct ExportOptions {
    /// The kind a Prepare gets unless it asks for another.
    pub default_kind: ExportKind,
    /// Virtqueues of a vhost-user-blk export.
    pub vhost_queues: usize,
    /// Exports are read-only (vhost-user-blk: VIRTIO_BLK_F_RO, writes fail).
    pub read_only: bool,
}

impl Default for ExportOptions {
    fn default() -> Self {
        Self {
            default_kind: ExportKind::Nbd,
            vhost_queues: VhostOptions::default().num_queues,
            read_only: false,
        }
    }
}

/// A clone's export, of either kind.
enum Exported {
    Nbd(HostExport),
    VhostUserBlk(VhostUserBlkExport, Endpoint),
}

impl Exported {
    fn endpoint(&self) -> &Endpoint {
        match self {
            Exported::Nbd(e) => e.endpoint(),
            Exported::VhostUserBlk(_, endpoint) => endpoint,
        }
    }

    fn revoke(&mut self) {
        match self {
            Exported::Nbd(e) => e.revoke(),
            Exported::VhostUserBlk(e, _) => e.revoke(),
        }
    }
}

/// Where and how exports over TCP listen.
#[derive(Clone, Debug)]
pub struct TcpExports {
    pub ip: std::net::IpAddr,
    pub tls: Arc<rustls::ServerConfig>,
}

/// What Prepare hands the host agent.
#[derive(Clone, Debug)]
pub struct Prepared {
    pub clone_id: String,
    pub endpoint: Endpoint,
    pub export_name: String,
    pub size: u64,
    pub manifest_digest: String,
    pub runtime_config: Option<serde_json::Value>,
    pub ttl: Duration,
}

/// An attach or hot-remove, for the host agent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CloneEvent {
    pub kind: &'static str,
    pub clone_id: String,
    pub endpoint: Endpoint,
    pub reason: String,
}

/// A clone as listed.
#[derive(Clone, Debug)]
pub struct CloneSummary {
    pub clone_id: String,
    pub tenant: String,
    pub function: String,
    pub image: String,
    pub endpoint: Endpoint,
    pub age: Duration,
}

struct Running {
    clone: Arc<CloneDevice>,
    export: Exported,
    tenant: String,
    function: String,
    image: String,
    digest: String,
    created: Instant,
    ttl: Duration,
    /// The audit sequence number of the clone's creation, which its erase commits to.
    creation_seq: u64,
}

pub struct Service {
    opts: ServiceOptions,
    factory: PipelineFactory,
    /// Where every request's layer keys come from (one attested broker session).
    keys: KeySource,
    audit: Arc<dyn AuditSink>,
    /// Each with what its unpack found, which every later request's limits are checked
    /// against.
    bases: Mutex<cache::BaseCache<BaseImage, Budget>>,
    /// The platform manifest digest each image reference last resolved to.
    resolved: Mutex<HashMap<String, String>>,
    /// One lock per image reference not known to be cached, held while it is verified and
    /// its base built, so that a burst of starts of a new image builds it once.
    building: Mutex<HashMap<String, Arc<Mutex<()>>>>,
    clones: Mutex<HashMap<String, Running>>,
    /// Layers of images verified per tenant and function, by blob digest (for the decrypt
    /// hook); bounded.
    known_layers: Mutex<known::KnownLayers>,
    events: tokio::sync::broadcast::Sender<CloneEvent>,
    /// Set when the service stops: event streams end, so the API can close.
    stopping: tokio::sync::watch::Sender<bool>,
    /// Frees erased clones' blocks off the teardown path (a large clone's blocks take a
    /// while); taken and joined at shutdown.
    reclaimer: Mutex<Option<Reclaimer>>,
    /// Placement grants (when the running policy names grant keys): the tenant and function
    /// a request acts for come from the control plane's signed grant, not the host.
    grants: Option<crate::grant::GrantGate>,
    /// Stage durations, cache, clones, refusals and grant decisions, for operators.
    metrics: Arc<ServiceMetrics>,
    /// What the decrypt hook's received blobs hold in memory.
    spool_budget: Arc<spool::SpoolBudget>,
    /// Verified layers the IPU fetched itself for the decrypt hook.
    prefetches: Arc<prefetch::Prefetches>,
}

/// The reclaimer thread and the channel that feeds it erased clones' leftover files.
type Reclaimer = (
    std::sync::mpsc::Sender<PathBuf>,
    std::thread::JoinHandle<()>,
);

fn io_error(what: &'static str, path: &Path, e: std::io::Error) -> ServiceError {
    ServiceError::storage(what, path, e)
}

fn check_name(what: &str, v: &str) -> Result<(), ServiceError> {
    if v.is_empty()
        || v.len() > 128
        || !v
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
    {
        return Err(ServiceError::BadRequest(format!(
            "{what} {v:?}: 1 to 128 of A-Z a-z 0-9 - _ ."
        )));
    }
    Ok(())
}

/// A request's tenant and function checked, and its image reference parsed.
fn request(tenant: &str, function: &str, image: &str) -> Result<ImageReference, ServiceError> {
    check_name("tenant", tenant)?;
    check_name("function", function)?;
    ImageReference::parse(image)
        .map_err(|e| ServiceError::BadRequest(format!("image reference {image:?}: {e}")))
}

/// A start's share of its image's build lock. The map of locks holds an entry only while a
/// start of that image runs: the last one out removes it, so image strings a host sends do
/// not pile up.
struct Flight<'a> {
    building: &'a Mutex<HashMap<String, Arc<Mutex<()>>>>,
    image: &'a str,
    lock: Arc<Mutex<()>>,
}

impl Drop for Flight<'_> {
    fn drop(&mut self) {
        let mut building = self.building.lock().expect("not poisoned");
        // Others take their share under this same mutex, so the count cannot rise meanwhile:
        // two means the map's and this one's.
        if Arc::strong_count(&self.lock) == 2 {
            building.remove(self.image);
        }
    }
}

/// The commitment an erase event carries: it names the clone, its key and the creation
/// event, so an auditor can pair every creation with exactly one erase.
pub fn erase_commitment(clone_id: &str, key_id: &str, creation_seq: u64) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    ctx.update(b"ipu-clone-erase-v1\0");
    ctx.update(clone_id.as_bytes());
    ctx.update(b"\0");
    ctx.update(key_id.as_bytes());
    ctx.update(b"\0");
    ctx.update(&creation_seq.to_be_bytes());
    hex::encode(ctx.finish().as_ref())
}

impl Service {
    /// Starts the service: makes its directories and erases whatever a previous run left.
    pub fn start(
        opts: ServiceOptions,
        factory: PipelineFactory,
        keys: KeySource,
        audit: Arc<dyn AuditSink>,
    ) -> Result<Self, ServiceError> {
        for d in ["bases", "clones", "exports", "spool"] {
            let dir = opts.state_dir.join(d);
            std::fs::create_dir_all(&dir).map_err(|e| io_error("cannot create", &dir, e))?;
            std::fs::set_permissions(
                &dir,
                std::os::unix::fs::PermissionsExt::from_mode(if d == "exports" {
                    0o711
                } else {
                    0o700
                }),
            )
            .map_err(|e| io_error("cannot protect", &dir, e))?;
        }
        let max_cached_bases = opts.max_cached_bases;
        let (events, _) = tokio::sync::broadcast::channel(256);
        let (stopping, _) = tokio::sync::watch::channel(false);
        let (tx, rx) = std::sync::mpsc::channel::<PathBuf>();
        let reclaim_thread = std::thread::Builder::new()
            .name("clone-reclaim".into())
            .spawn(move || {
                for path in rx {
                    if let Err(e) = crate::blockstore::clone::reclaim(&path) {
                        tracing::error!(path = %path.display(), error = %e, "cannot reclaim an erased clone's blocks");
                    }
                }
            })
            .map_err(|e| ServiceError::device("cannot start the reclaimer thread", e))?;
        let known_layers = known::KnownLayers::new(opts.verified_layer_ttl);
        if swap_is_on() {
            // A base being built is plaintext in this process's memory (its tree and the
            // buffers its blocks pass through before they are encrypted).
            tracing::warn!(
                "swap is on: decrypted image content in this service's memory could be written to it; run IPUs without swap, or with encrypted swap"
            );
        }
        let spool_budget = spool::SpoolBudget::new(opts.spool_memory);
        let prefetches = Arc::new(prefetch::Prefetches::new(opts.hook_prefetch));
        let service = Self {
            opts,
            factory,
            keys,
            audit,
            bases: Mutex::new(cache::BaseCache::new(max_cached_bases)),
            resolved: Mutex::new(HashMap::new()),
            building: Mutex::new(HashMap::new()),
            clones: Mutex::new(HashMap::new()),
            known_layers: Mutex::new(known_layers),
            events,
            stopping,
            reclaimer: Mutex::new(Some((tx, reclaim_thread))),
            grants: None,
            metrics: Arc::new(ServiceMetrics::new()),
            spool_budget,
            prefetches,
        };
        service.recover()?;
        Ok(service)
    }

    fn record(&self, e: Event) -> Result<audit::Receipt, ServiceError> {
        self.audit.append(e).map_err(ServiceError::Audit)
    }

    /// Deletes what a crashed run left: clone files (their keys died with it, so they were
    /// already unreadable: each is audited as an orphan erased), bases (keys gone too) and
    /// sockets.
    fn recover(&self) -> Result<(), ServiceError> {
        let clones = self.opts.state_dir.join("clones");
        let entries =
            std::fs::read_dir(&clones).map_err(|e| io_error("cannot read", &clones, e))?;
        for entry in entries.flatten() {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            if path
                .extension()
                .is_some_and(|e| e == crate::blockstore::clone::LEFTOVER_EXTENSION)
            {
                // Erased before the stop, with only its blocks still to free. Recorded too:
                // the stop may have come between the erase and its `clone.erase` event, and
                // every creation must be matched by an erase on the record.
                crate::blockstore::clone::reclaim(&path)
                    .map_err(|e| io_error("cannot delete", &path, e))?;
                let clone_id = name.trim_end_matches(".erased").to_string();
                self.record(
                    Event::new(
                        AUDIT_SERVICE,
                        EventKind::RecoveryOrphanErased,
                        Outcome::Success,
                        "the blocks of a clone erased before the stop were freed",
                    )
                    .detail("clone_id", clone_id),
                )?;
                continue;
            }
            std::fs::remove_file(&path).map_err(|e| io_error("cannot delete", &path, e))?;
            let clone_id = name.trim_end_matches(".clone").to_string();
            self.record(
                Event::new(
                    AUDIT_SERVICE,
                    EventKind::RecoveryOrphanErased,
                    Outcome::Success,
                    "a clone left by a previous run was deleted; its key died with that run",
                )
                .detail("clone_id", clone_id),
            )?;
        }
        // Bases (their keys died too), sockets, and the decrypt hook's spooled ciphertext.
        // Earlier versions kept unpack trees in `staging/` and a tmpfs at `plain/`.
        for legacy in ["staging", "plain"] {
            let legacy = self.opts.state_dir.join(legacy);
            if legacy.exists() {
                std::fs::remove_dir_all(&legacy)
                    .map_err(|e| io_error("cannot delete", &legacy, e))?;
            }
        }
        for d in ["bases", "exports", "spool"] {
            let dir = self.opts.state_dir.join(d);
            let entries = std::fs::read_dir(&dir).map_err(|e| io_error("cannot read", &dir, e))?;
            for entry in entries.flatten() {
                let path = entry.path();
                let removed = if entry.file_type().is_ok_and(|t| t.is_dir()) {
                    std::fs::remove_dir_all(&path)
                } else {
                    std::fs::remove_file(&path)
                };
                removed.map_err(|e| io_error("cannot delete", &path, e))?;
            }
        }
        Ok(())
    }

    /// Where the decrypt hook's received blobs (ciphertext only) that outgrow the spool
    /// budget go; emptied at start-up.
    pub(crate) fn spool_dir(&self) -> PathBuf {
        self.opts.state_dir.join("spool")
    }

    /// The memory the decrypt hook's received blobs share.
    pub fn spool_budget(&self) -> &Arc<spool::SpoolBudget> {
        &self.spool_budget
    }

    /// The layers fetched for the decrypt hook after a `Verify`.
    pub fn prefetches(&self) -> &Arc<prefetch::Prefetches> {
        &self.prefetches
    }

    /// The service's metrics (for the metrics endpoint).
    pub fn metrics(&self) -> &Arc<ServiceMetrics> {
        &self.metrics
    }

    /// Whether the service can take a Prepare now, for the health service: the key
    /// broker session is there (attested again when it is not, at most every
    /// [`crate::keys::broker_client::REATTEST_EVERY`]), the state directory takes a new
    /// file, and the audit sink takes appends. Says what is wrong otherwise.
    pub fn readiness(&self) -> Result<(), String> {
        ops::health::dir_writable(&self.opts.state_dir)
            .map_err(|e| format!("state directory: {e}"))?;
        self.audit.ready().map_err(|e| format!("audit sink: {e}"))?;
        self.keys.ready().map_err(|e| format!("key broker: {e}"))
    }

    /// Checks placement grants with `gate` from now on (set before the API serves).
    pub fn with_grant_gate(mut self, gate: crate::grant::GrantGate) -> Self {
        self.grants = Some(gate);
        self
    }

    /// The tenant and function a request (Prepare or Verify) acts for. When the running
    /// policy names grant keys, the control plane's grant decides: it must verify for this
    /// IPU, the host identity (when given) and the image, its serial must be new, and the
    /// request's own tenant and function, when given, must be the grant's. Every decision is
    /// audited (`policy.decision`: an accepted grant with its serial, a refusal with its
    /// reason code).
    pub fn placement(
        &self,
        tenant: &str,
        function: &str,
        image: &str,
        host_identity: Option<&str>,
        grant: &str,
    ) -> Result<crate::grant::Placement, ServiceError> {
        // What the request names is checked before it is recorded anywhere.
        for (what, v) in [("tenant", tenant), ("function", function)] {
            if !v.is_empty() {
                check_name(what, v)?;
            }
        }
        let gate = self.grants.as_ref().filter(|g| g.required());
        let Some(gate) = gate else {
            if !grant.is_empty() {
                return Err(ServiceError::BadRequest(
                    "a placement grant was given, but the running policy trusts no grant keys"
                        .into(),
                ));
            }
            return Ok(crate::grant::Placement::ungranted(tenant, function));
        };
        let refuse = |code: &'static str, why: String| {
            self.metrics.grant_decision(code);
            let mut e = Event::new(
                AUDIT_SERVICE,
                EventKind::PolicyDecision,
                Outcome::Denied,
                why.clone(),
            )
            .image(image.to_string(), None)
            .detail("reason_code", code.to_string())
            .detail("host_identity", host_identity.unwrap_or("").to_string());
            if !tenant.is_empty() {
                e = e.tenant(tenant.to_string());
            }
            if !function.is_empty() {
                e = e.function(function.to_string());
            }
            match self.record(e) {
                Ok(_) => ServiceError::Refused(why),
                Err(audit) => audit,
            }
        };
        if grant.is_empty() {
            return Err(refuse(
                "no-grant",
                "placement grant refused (no-grant): the running policy requires a placement grant from the control plane, and the request carries none".into(),
            ));
        }
        let verified = gate
            .admit(
                grant.as_bytes(),
                &crate::grant::GrantedRequest {
                    tenant,
                    function,
                    image,
                    host: host_identity,
                },
                std::time::SystemTime::now(),
            )
            .map_err(|e| refuse(e.reason_code(), e.to_string()))?;
        self.metrics.grant_decision("accepted");
        self.record(
            Event::new(
                AUDIT_SERVICE,
                EventKind::PolicyDecision,
                Outcome::Allowed,
                format!(
                    "placement grant {} by {} accepted",
                    verified.serial(),
                    verified.signer_id
                ),
            )
            .tenant(verified.tenant().to_string())
            .function(verified.function().to_string())
            .image(image.to_string(), None)
            .detail("grant_serial", verified.serial().to_string())
            .detail("host_identity", host_identity.unwrap_or("").to_string()),
        )?;
        Ok(crate::grant::Placement {
            tenant: verified.tenant().to_string(),
            function: verified.function().to_string(),
            grant: Some(Arc::new(crate::grant::AdmittedGrant {
                envelope: Arc::from(grant),
                serial: verified.serial().to_string(),
                not_after: verified.not_after(),
            })),
        })
    }

    /// Events from now on.
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<CloneEvent> {
        self.events.subscribe()
    }

    /// Becomes true when the service stops.
    pub fn stopping(&self) -> tokio::sync::watch::Receiver<bool> {
        self.stopping.subscribe()
    }

    /// [`Service::prepare_for`] without a host identity (Unix socket exports only).
    pub fn prepare(
        &self,
        tenant: &str,
        function: &str,
        image: &str,
    ) -> Result<Prepared, ServiceError> {
        self.prepare_for(tenant, function, image, None)
    }

    /// Verifies the image under the current policy, builds its base unless cached, makes the
    /// function's clone and exports it. `host_identity` is the identity the host agent's
    /// export client certificate carries (a subjectAltName DNS name or URI): required with
    /// exports over TCP, where only a certificate carrying it opens the export; optional (and
    /// only recorded) with Unix socket exports, where the peer uid decides.
    pub fn prepare_for(
        &self,
        tenant: &str,
        function: &str,
        image: &str,
        host_identity: Option<&str>,
    ) -> Result<Prepared, ServiceError> {
        let placement = crate::grant::Placement::ungranted(tenant, function);
        self.prepare_placed(&placement, image, host_identity)
    }

    /// [`Service::prepare_for`] for a [`Service::placement`]: its tenant and function, and
    /// its grant carried by every key release of the start.
    pub fn prepare_placed(
        &self,
        placement: &crate::grant::Placement,
        image: &str,
        host_identity: Option<&str>,
    ) -> Result<Prepared, ServiceError> {
        self.prepare_exported(placement, image, host_identity, None)
    }

    /// [`Service::prepare_placed`] with the export's kind chosen by the request (None: the
    /// service's default).
    pub fn prepare_exported(
        &self,
        placement: &crate::grant::Placement,
        image: &str,
        host_identity: Option<&str>,
        kind: Option<ExportKind>,
    ) -> Result<Prepared, ServiceError> {
        let prepared = self.prepare_counted(placement, image, host_identity, kind);
        self.metrics.prepared(prepared.is_ok());
        if let Err(e) = &prepared {
            self.metrics.refused(e.class());
        }
        self.count_clones();
        prepared
    }

    fn count_clones(&self) {
        let n = self.clones.lock().expect("not poisoned").len();
        self.metrics.set_live_clones(n);
    }

    fn prepare_counted(
        &self,
        placement: &crate::grant::Placement,
        image: &str,
        host_identity: Option<&str>,
        kind: Option<ExportKind>,
    ) -> Result<Prepared, ServiceError> {
        let kind = kind.unwrap_or(self.opts.exports.default_kind);
        if kind == ExportKind::VhostUserBlk && self.opts.tcp_exports.is_some() {
            return Err(ServiceError::BadRequest(
                "vhost-user-blk exports are local Unix sockets; this service exports over TCP"
                    .into(),
            ));
        }
        let (tenant, function) = (placement.tenant.as_str(), placement.function.as_str());
        let reference = request(tenant, function, image)?;
        let host_identity = host_identity.filter(|h| !h.is_empty());
        if let Some(h) = host_identity {
            if !crate::export::identity::is_valid(h) {
                return Err(ServiceError::BadRequest(format!(
                    "host identity {h:?}: 1 to {} visible ASCII characters (a DNS name or URI of the host agent's certificate)",
                    crate::export::identity::MAX_IDENTITY
                )));
            }
        }
        if self.opts.tcp_exports.is_some() && host_identity.is_none() {
            return Err(ServiceError::BadRequest(
                "exports are over TCP: the host identity (a DNS name or URI the host agent's client certificate carries) is required".into(),
            ));
        }
        let mut cfg = (self.factory)(tenant, function)?;
        cfg.grant = placement.envelope();
        cfg.metrics = Some(self.metrics.clone());
        let pipeline = TrustPipeline::new(cfg);
        let mut suffix = [0u8; 6];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut suffix)
            .expect("system randomness");
        let instance = hex::encode(suffix);
        // The current policy decides on every start, cached base or not, and so does the
        // broker: each encrypted layer's key must still be released to this request. One
        // verification serves both the check and, for a new image, the build.
        let (digest, base, verified) =
            self.verified_base(&pipeline, &reference, image, &instance)?;
        self.remember_layers(placement, &verified, &[]);

        let clone_id = format!("{tenant}.{function}.{instance}");
        // The deployment policy's clone size and lifetime, else the service's defaults.
        let requirements = verified.admission.requirements.clone().unwrap_or_default();
        let ttl = requirements
            .clone_ttl_secs
            .map_or(self.opts.clone_ttl, Duration::from_secs);
        let clone = Arc::new(
            self.metrics
                .time(Stage::Clone, || {
                    CloneDevice::create(
                        base,
                        &self.opts.state_dir.join("clones"),
                        &clone_id,
                        requirements.clone_size.unwrap_or(0),
                    )
                })
                .map_err(|e| ServiceError::device("clone", e))?,
        );
        let context = |e: Event| {
            e.tenant(tenant.to_string())
                .function(function.to_string())
                .image(image.to_string(), Some(digest.clone()))
                .detail("clone_id", clone_id.clone())
        };
        let mut created = context(Event::new(
            AUDIT_SERVICE,
            EventKind::CloneCreate,
            Outcome::Success,
            "copy-on-write clone of the verified base, under a new key held only in IPU memory",
        ))
        .detail("key_id", clone.key_id().to_string());
        if let Ok(k) = KeyId::new(format!("clone:{}", clone.key_id())) {
            created = created.key_id(k);
        }
        // Nothing is exported before its creation is on the record; a failure from here on
        // erases the clone (dropping it does).
        let receipt = self.record(created)?;
        fail::fail_point!("prepare-before-export");
        let exporting = Instant::now();
        let export_span = Stage::Export.span().entered();
        let export = match (&self.opts.tcp_exports, kind) {
            (_, ExportKind::VhostUserBlk) => {
                let socket = self
                    .opts
                    .state_dir
                    .join("exports")
                    .join(format!("{instance}.vhost.sock"));
                // Front-ends connecting, and connections refused for their uid, are on the
                // record (refusals rate-limited by the export).
                let audit = self.audit.clone();
                let connected = context(Event::new(
                    AUDIT_SERVICE,
                    EventKind::ExportAttach,
                    Outcome::Success,
                    "a vhost-user-blk front-end connected",
                ));
                let refused = context(Event::new(
                    AUDIT_SERVICE,
                    EventKind::ExportAttach,
                    Outcome::Denied,
                    "a vhost-user connection from a uid that may not use the export; closed",
                ));
                // The front-end releasing the device before Teardown is the VM manager's
                // hot-remove (QMP device_del, then the chardev closed): on the record and on
                // WatchEvents, so it is seen before the erase. A revocation's own disconnect
                // is Teardown's event.
                let released = context(Event::new(
                    AUDIT_SERVICE,
                    EventKind::ExportHotRemove,
                    Outcome::Success,
                    "the vhost-user-blk front-end released the device (hot-removed by the VM manager)",
                ));
                let (events, event_id, event_socket) =
                    (self.events.clone(), clone_id.clone(), socket.clone());
                let on_event = Box::new(move |e: &VhostEvent| {
                    let (event, watched) = match e {
                        VhostEvent::Connected { uid } => (
                            connected.clone().detail("peer_uid", uid.to_string()),
                            Some((
                                "attach",
                                format!("vhost-user front-end connected (uid {uid})"),
                            )),
                        ),
                        VhostEvent::Refused { uid, refusals } => (
                            refused
                                .clone()
                                .detail(
                                    "peer_uid",
                                    uid.map_or_else(|| "unknown".into(), |u| u.to_string()),
                                )
                                .detail("refusals", refusals.to_string()),
                            None,
                        ),
                        VhostEvent::Disconnected { reason } if reason == "revoked" => return,
                        VhostEvent::Disconnected { reason } => (
                            released.clone().detail("disconnect", reason.clone()),
                            Some((
                                "hot_remove",
                                format!("front-end released the device: {reason}"),
                            )),
                        ),
                    };
                    if let Err(e) = audit.append(event) {
                        tracing::error!(error = %e, "cannot record a vhost-user connection");
                    }
                    if let Some((kind, reason)) = watched {
                        let _ = events.send(CloneEvent {
                            kind,
                            clone_id: event_id.clone(),
                            endpoint: Endpoint::VhostUser(event_socket.clone()),
                            reason,
                        });
                    }
                });
                let opts = VhostOptions {
                    num_queues: self.opts.exports.vhost_queues,
                    read_only: self.opts.exports.read_only,
                    serial: instance.clone(),
                };
                let export = VhostUserBlkExport::unix(
                    &clone_id,
                    clone.clone(),
                    &socket,
                    self.opts.host_agent_uid,
                    opts,
                    Some(on_event),
                )
                .map_err(|e| io_error("cannot export on", &socket, e))?;
                Exported::VhostUserBlk(export, Endpoint::VhostUser(socket))
            }
            (Some(tcp), ExportKind::Nbd) => {
                // Every refused certificate is on the record, with the clone it tried.
                let audit = self.audit.clone();
                let refused_event = context(Event::new(
                    AUDIT_SERVICE,
                    EventKind::ExportAttach,
                    Outcome::Denied,
                    "an NBD client's certificate does not carry the host identity the export was prepared for; connection closed",
                ));
                let on_refused: crate::export::OnRefused =
                    Box::new(move |r: &crate::export::nbd::Refused, n: u64| {
                        let event = refused_event
                            .clone()
                            .detail("host_identity", r.required.clone())
                            .detail("presented", r.presented.join(" "))
                            .detail("refusals", n.to_string());
                        if let Err(e) = audit.append(event) {
                            tracing::error!(error = %e, "cannot record a refused NBD client");
                        }
                    });
                let access = crate::export::TcpAccess {
                    tls: tcp.tls.clone(),
                    client_identity: host_identity.map(str::to_string),
                    on_refused: Some(on_refused),
                };
                let export = Export::new(clone_id.clone(), clone.clone());
                Exported::Nbd(
                    HostExport::tcp(export, tcp.ip, access).map_err(|e| {
                        ServiceError::device(format!("cannot export on {}", tcp.ip), e)
                    })?,
                )
            }
            (None, ExportKind::Nbd) => {
                // Short: a Unix socket path has at most 107 bytes, tenant names up to 128.
                let socket = self
                    .opts
                    .state_dir
                    .join("exports")
                    .join(format!("{instance}.sock"));
                let export = Export::new(clone_id.clone(), clone.clone());
                Exported::Nbd(
                    HostExport::unix(export, &socket, self.opts.host_agent_uid)
                        .map_err(|e| io_error("cannot export on", &socket, e))?,
                )
            }
        };
        let endpoint = export.endpoint().clone();
        let mut attached = context(Event::new(
            AUDIT_SERVICE,
            EventKind::ExportAttach,
            Outcome::Success,
            match kind {
                ExportKind::Nbd => "exported to the host agent over NBD",
                ExportKind::VhostUserBlk => "exported to the host agent as a vhost-user-blk device",
            },
        ))
        .detail("export_kind", kind.to_string());
        if let Some(h) = host_identity {
            attached = attached.detail("host_identity", h.to_string());
        }
        self.record(attached)?;
        self.metrics.observe(Stage::Export, exporting.elapsed());
        drop(export_span);
        let prepared = Prepared {
            clone_id: clone_id.clone(),
            endpoint: endpoint.clone(),
            export_name: clone_id.clone(),
            size: clone.size(),
            manifest_digest: digest.clone(),
            runtime_config: verified.runtime_config.clone(),
            ttl,
        };
        self.clones.lock().expect("not poisoned").insert(
            clone_id.clone(),
            Running {
                clone,
                export,
                tenant: tenant.into(),
                function: function.into(),
                image: image.into(),
                digest,
                created: Instant::now(),
                ttl,
                creation_seq: receipt.seq,
            },
        );
        let _ = self.events.send(CloneEvent {
            kind: "attach",
            clone_id,
            endpoint,
            reason: "prepared".into(),
        });
        Ok(prepared)
    }

    /// Verifies the image for this request and returns its platform manifest digest, its
    /// base and the verified image (runtime configuration, what the deployment policy
    /// requires). The cache decision is made here, once the verified platform manifest is
    /// known: a cached base is used only after every layer key was released again for this
    /// request; otherwise the image is built into an ext4 image and encrypted at rest into a
    /// new base under a new key.
    fn verified_base(
        &self,
        pipeline: &TrustPipeline,
        reference: &ImageReference,
        image: &str,
        instance: &str,
    ) -> Result<(String, Arc<BaseImage>, VerifiedImage), ServiceError> {
        let is_cached = || {
            let digest = self
                .resolved
                .lock()
                .expect("not poisoned")
                .get(image)
                .cloned();
            digest.is_some_and(|d| self.bases.lock().expect("not poisoned").contains(&d))
        };
        let flight = (!is_cached()).then(|| Flight {
            building: &self.building,
            image,
            lock: self
                .building
                .lock()
                .expect("not poisoned")
                .entry(image.to_string())
                .or_default()
                .clone(),
        });
        // Dropped before `flight` (declared after it), which then forgets the lock if no
        // other start holds it.
        let _flight = match &flight {
            // Another start of this image may have built it while this one waited.
            Some(f) => Some(f.lock.lock().expect("not poisoned")).filter(|_| !is_cached()),
            None => None,
        };
        let dir = self.opts.state_dir.join("bases");
        // Held for the run, so none of them is evicted before this start has its clone.
        let mut cached = self.bases.lock().expect("not poisoned").snapshot();
        let request = pipeline.request(reference);
        let result = request.finish((|| {
            let verified = self
                .metrics
                .time(Stage::Verify, || request.verify(reference, &Quiet))?;
            let digest = verified.platform_manifest_digest.to_string();
            // Only this image's base stays held; the others may be evicted again.
            let held = cached.remove(&digest);
            cached.clear();
            let base = match held {
                Some((base, found)) => {
                    // Built under another request's limits: held to this one's, as its own
                    // unpack would have been, before any key is asked for.
                    request.admit_cached(&verified, &found)?;
                    self.metrics.time(Stage::KeyRelease, || {
                        request.check_keys(&self.keys, &verified)
                    })?;
                    self.metrics.cache_hit();
                    self.bases.lock().expect("not poisoned").touch(&digest);
                    base
                }
                None => {
                    self.metrics.cache_miss();
                    // The image is encrypted into the base as it is written: its plaintext
                    // exists only in the build's buffers.
                    let dest = dir.join(format!("{instance}.img"));
                    let target = XtsKey::generate()
                        .and_then(|key| BaseWriter::create(&dest, key))
                        .map(|writer| BaseTarget {
                            writer,
                            metrics: &self.metrics,
                        })
                        .map_err(|e| Error::io("cannot create the base image", &dest, e))?;
                    let built = request.build(&verified, &self.keys, target, &Quiet)?;
                    let base = built.output;
                    fail::fail_point!("prepare-base-built");
                    // Built meanwhile under another reference: that one stays, this one is
                    // dropped (and deleted).
                    let ((base, _), evicted) =
                        self.bases
                            .lock()
                            .expect("not poisoned")
                            .insert(&digest, base, built.found);
                    self.metrics.cache_evicted(evicted.len());
                    for e in evicted {
                        tracing::info!(digest = %e, "idle base evicted from the cache");
                    }
                    base
                }
            };
            Ok((digest, base, verified))
        })());
        let (digest, base, verified) = result?;
        self.resolved
            .lock()
            .expect("not poisoned")
            .insert(image.to_string(), digest.clone());
        Ok((digest, base, verified))
    }

    /// Hot-removes the export and erases the clone. Returns false when it was already gone.
    pub fn teardown(&self, clone_id: &str, reason: &str) -> Result<bool, ServiceError> {
        self.teardown_as(clone_id, reason, false)
    }

    /// Teardown after a forced removal: the host agent's VM manager stopped a VM that did
    /// not release the device. Recorded as such (`forced_removal` on the hot-remove event).
    pub fn teardown_forced(&self, clone_id: &str) -> Result<bool, ServiceError> {
        self.teardown_as(
            clone_id,
            "forced removal by the host agent: the guest did not release the device, the VM was stopped",
            true,
        )
    }

    fn teardown_as(
        &self,
        clone_id: &str,
        reason: &str,
        forced: bool,
    ) -> Result<bool, ServiceError> {
        let started = Instant::now();
        let done = self.teardown_timed(clone_id, reason, forced);
        if matches!(done, Ok(true)) {
            self.metrics.observe(Stage::Teardown, started.elapsed());
        }
        self.count_clones();
        done
    }

    fn teardown_timed(
        &self,
        clone_id: &str,
        reason: &str,
        forced: bool,
    ) -> Result<bool, ServiceError> {
        let Some(mut running) = self.clones.lock().expect("not poisoned").remove(clone_id) else {
            return Ok(false);
        };
        running.export.revoke();
        let context = |e: Event| {
            e.tenant(running.tenant.clone())
                .function(running.function.clone())
                .image(running.image.clone(), Some(running.digest.clone()))
                .detail("clone_id", clone_id.to_string())
        };
        let mut revoked = context(Event::new(
            AUDIT_SERVICE,
            EventKind::ExportHotRemove,
            Outcome::Success,
            format!("export revoked ({reason}); open connections shut down"),
        ));
        if forced {
            revoked = revoked.detail("forced_removal", "true".to_string());
        }
        self.record(revoked)?;
        // Revoked, the key not yet destroyed.
        fail::fail_point!("teardown-after-revoke");
        let mut erasure = self.metrics.time(Stage::Erase, || running.clone.erase());
        let (outcome, text) = match &erasure {
            Ok(Some(e)) => (
                Outcome::Success,
                format!(
                    "clone key destroyed: its {} written clusters are unreadable; their blocks are freed next",
                    e.clusters_written
                ),
            ),
            Ok(None) => (Outcome::Success, "the clone was already erased".into()),
            Err(e) => (
                Outcome::Failure,
                format!("key destroyed, but deleting the clone's blocks failed: {e}"),
            ),
        };
        let mut event = context(Event::new(
            AUDIT_SERVICE,
            EventKind::CloneErase,
            outcome,
            text,
        ))
        .detail("key_id", running.clone.key_id().to_string())
        .detail("creation_seq", running.creation_seq.to_string())
        .detail(
            "commitment",
            erase_commitment(clone_id, running.clone.key_id(), running.creation_seq),
        );
        if let Ok(k) = KeyId::new(format!("clone:{}", running.clone.key_id())) {
            event = event.key_id(k);
        }
        self.record(event)?;
        if let Ok(Some(e)) = erasure.as_mut() {
            if let Some(path) = e.leftover.take() {
                let sent = match self.reclaimer.lock().expect("not poisoned").as_ref() {
                    Some((tx, _)) => tx.send(path).map_err(|e| e.0),
                    None => Err(path),
                };
                if let Err(path) = sent {
                    // Stopping: free it here.
                    let _ = crate::blockstore::clone::reclaim(&path);
                }
            }
        }
        let _ = self.events.send(CloneEvent {
            kind: "hot_remove",
            clone_id: clone_id.to_string(),
            endpoint: running.export.endpoint().clone(),
            reason: reason.to_string(),
        });
        erasure.map_err(|e| ServiceError::device(format!("erasing clone {clone_id}"), e))?;
        Ok(true)
    }

    /// Tears down every clone past its TTL; returns their ids.
    pub fn reap_expired(&self) -> Vec<String> {
        let expired: Vec<String> = self
            .clones
            .lock()
            .expect("not poisoned")
            .iter()
            .filter(|(_, r)| r.created.elapsed() >= r.ttl)
            .map(|(id, _)| id.clone())
            .collect();
        for id in &expired {
            if let Err(e) = self.teardown(id, "TTL expired") {
                tracing::error!(clone = %id, error = %e, "teardown on expiry failed");
            }
        }
        expired
    }

    pub fn list(&self) -> Vec<CloneSummary> {
        let mut all: Vec<CloneSummary> = self
            .clones
            .lock()
            .expect("not poisoned")
            .iter()
            .map(|(id, r)| CloneSummary {
                clone_id: id.clone(),
                tenant: r.tenant.clone(),
                function: r.function.clone(),
                image: r.image.clone(),
                endpoint: r.export.endpoint().clone(),
                age: r.created.elapsed(),
            })
            .collect();
        all.sort_by(|a, b| a.clone_id.cmp(&b.clone_id));
        all
    }

    /// How many images have a start running that holds their build lock (for tests: the
    /// map is empty once no start runs).
    pub fn images_being_started(&self) -> usize {
        self.building.lock().expect("not poisoned").len()
    }

    /// Tears everything down (service shutdown), then ends the event streams.
    pub fn shutdown(&self) {
        let ids: Vec<String> = self
            .clones
            .lock()
            .expect("not poisoned")
            .keys()
            .cloned()
            .collect();
        for id in ids {
            if let Err(e) = self.teardown(&id, "service stopping") {
                tracing::error!(clone = %id, error = %e, "teardown at shutdown failed");
            }
        }
        let _ = self.stopping.send(true);
        // Every erased clone's blocks are freed before the service exits.
        if let Some((tx, thread)) = self.reclaimer.lock().expect("not poisoned").take() {
            drop(tx);
            let _ = thread.join();
        }
    }
}

/// Whether any swap area is active (unknown counts as on).
fn swap_is_on() -> bool {
    std::fs::read_to_string("/proc/swaps")
        .map(|s| s.lines().skip(1).any(|l| !l.trim().is_empty()))
        .unwrap_or(true)
}

/// A base as the build's target: the image's blocks are encrypted as they are written, and
/// the time that took is the start's `base_encrypt` stage.
struct BaseTarget<'m> {
    writer: BaseWriter,
    metrics: &'m ServiceMetrics,
}

impl ImageTarget for BaseTarget<'_> {
    type Sink = BaseWriter;
    type Output = BaseImage;

    fn sink(&mut self) -> &mut BaseWriter {
        &mut self.writer
    }

    fn path(&self) -> &Path {
        self.writer.dest()
    }

    fn publish(self, size: u64) -> std::io::Result<BaseImage> {
        self.metrics.observe(Stage::BaseEncrypt, self.writer.busy());
        self.writer.finish(size)
    }

    /// Dropping a base deletes its file.
    fn retract(_base: BaseImage) {}
}
