//! `host-attach run`: one function started from an image through the IPU, and cleaned up.
//!
//! Prepare on the IPU, attach and mount the exported clone ([`crate::attach`]), write the OCI
//! bundle from the image config ([`crate::bundle`]), `runc run` with this terminal's output
//! ([`crate::runc`]), then (also after Ctrl-C, SIGTERM or a crashed function) unmount, detach
//! and Teardown. The outcome is the function's exit code; [`crate::exit`] maps it and the
//! failures to the process's.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use api::imagesvc::{CloneEvent, PrepareRequest, PrepareResponse, TeardownRequest, WatchRequest};

use crate::attach::{AttachError, Attachment, Export};
use crate::bundle::{BundleError, ImageProcess, Process};
use crate::ipu::{Client, IpuApi, IpuError};
use crate::microvm::{Accel, GuestEnd, MicroVm, Removal, VmError, VmOptions};
use crate::runc::RuncError;

/// The function to run, besides where the IPU is and whom it is for.
#[derive(Clone, Debug, Default)]
pub struct Function {
    /// The image reference (docker://... or oci:DIR:TAG).
    pub image: String,
    /// The command to run instead of the image's Cmd (none: the image's).
    pub command: Vec<String>,
    /// Where mounts and the bundle are made (none: a new directory under /run).
    pub workdir: Option<PathBuf>,
    /// For exports over TCP: this host agent's TLS files.
    pub tls_certificates: Option<PathBuf>,
    /// The identity sent with Prepare, which a TCP export requires of the client
    /// certificate (none: the one DNS name or URI of `client-cert.pem` in
    /// `tls_certificates`, if given).
    pub host_identity: Option<String>,
    /// Run it in a microVM with the clone as a vhost-user-blk device (none: runc).
    pub microvm: Option<VmOptions>,
}

/// Why the function could not be started, or its run not finished cleanly.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot handle signal {signal}: {source}")]
    Signal { signal: i32, source: io::Error },
    #[error(transparent)]
    Ipu(#[from] IpuError),
    #[error("interrupted before the function started")]
    Interrupted,
    /// The export's TCP address from Prepare.
    #[error("export address {address:?}: {source}")]
    ExportAddress {
        address: String,
        source: std::net::AddrParseError,
    },
    #[error("the export is on {address} (TLS): --tls-certificates DIR is needed")]
    NoTlsCertificates { address: String },
    /// The host identity could not be read from the client certificate.
    #[error("the host identity from {}: {reason} (give --host-identity)", path.display())]
    HostIdentity { path: PathBuf, reason: String },
    #[error("{}: {source}", path.display())]
    Workdir { path: PathBuf, source: io::Error },
    #[error(transparent)]
    Attach(#[from] AttachError),
    #[error("the image's runtime config: {0}")]
    RuntimeConfig(#[source] serde_json::Error),
    #[error(transparent)]
    Bundle(#[from] BundleError),
    #[error(transparent)]
    Runc(#[from] RuncError),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error("WatchEvents: {}", .0.message())]
    Watch(Box<tonic::Status>),
    #[error("the IPU exported {kind:?}, not the vhost-user-blk device a microVM needs")]
    ExportKind { kind: String },
}

/// Set once Ctrl-C or SIGTERM arrives: the run is ending. The function gets SIGTERM (through
/// runc, which forwards it), then SIGKILL after a grace period, and cleanup still happens.
#[derive(Clone, Debug, Default)]
pub struct Interrupt(Arc<AtomicBool>);

impl Interrupt {
    /// Set by SIGINT and SIGTERM from now on.
    pub fn on_signals() -> Result<Self, RunError> {
        let interrupt = Self::default();
        for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
            signal_hook::flag::register(signal, interrupt.0.clone())
                .map_err(|source| RunError::Signal { signal, source })?;
        }
        Ok(interrupt)
    }

    /// The flag itself, for [`crate::runc::run`] to watch.
    pub fn flag(&self) -> &AtomicBool {
        &self.0
    }

    /// Whether the run is ending.
    pub fn is_set(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// Runs `function` from an image prepared by the IPU at `ipu`, and tears everything down,
/// whatever happened; the function's exit code.
pub fn run(ipu: &IpuApi, function: &Function, interrupt: &Interrupt) -> Result<u8, RunError> {
    let host_identity = match (&function.host_identity, &function.tls_certificates) {
        (Some(h), _) => h.clone(),
        (None, Some(dir)) => host_identity(&dir.join("client-cert.pem"))?,
        (None, None) => String::new(),
    };
    let grant = ipu.grant_text()?;
    let (rt, mut client) = ipu.connect_blocking()?;
    let preparing = ops::timings::span("prepare").entered();
    let prepared = rt
        .block_on(client.prepare(PrepareRequest {
            tenant: ipu.tenant.clone(),
            function: ipu.function.clone(),
            image: function.image.clone(),
            host_identity,
            grant,
            // The host agent attaches an NBD export; a microVM takes a vhost-user-blk device.
            export_kind: if function.microvm.is_some() {
                "vhost-user-blk".into()
            } else {
                "nbd".into()
            },
        }))
        .map_err(|status| IpuError::Prepare(status.into()))?
        .into_inner();
    drop(preparing);
    let teardown = |client: &mut Client, forced_removal: bool| {
        rt.block_on(client.teardown(TeardownRequest {
            clone_id: prepared.clone_id.clone(),
            forced_removal,
        }))
        .map_err(|status| IpuError::Teardown {
            clone_id: prepared.clone_id.clone(),
            status: status.into(),
        })
    };
    let workdir = workdir(function, &prepared);
    let mut forced = false;
    let result = if interrupt.is_set() {
        Err(RunError::Interrupted)
    } else if let Some(options) = &function.microvm {
        run_in_vm(
            ipu,
            options,
            &prepared,
            &workdir,
            &function.command,
            interrupt,
        )
        .map(|(code, removal)| {
            forced = matches!(removal, Removal::Forced { .. });
            code
        })
    } else {
        export_of(&prepared, function.tls_certificates.as_deref()).and_then(|export| {
            start_and_wait(&prepared, &export, &workdir, &function.command, interrupt)
        })
    };
    // Whatever happened, the clone goes: the IPU erases it.
    let torn_down = ops::timings::time("teardown", || teardown(&mut client, forced));
    let _ = std::fs::remove_dir_all(&workdir);
    let code = result?;
    torn_down?;
    Ok(code)
}

/// The one subjectAltName DNS name or URI of the PEM certificate at `path`: the identity a
/// TCP export prepared for this host requires.
pub fn host_identity(path: &Path) -> Result<String, RunError> {
    use x509_cert::der::Decode;
    use x509_cert::ext::pkix::name::GeneralName;
    use x509_cert::ext::pkix::SubjectAltName;
    let fail = |reason: String| RunError::HostIdentity {
        path: path.to_path_buf(),
        reason,
    };
    let pem = std::fs::read(path).map_err(|e| fail(e.to_string()))?;
    let der = rustls_pemfile::certs(&mut pem.as_slice())
        .next()
        .ok_or_else(|| fail("no PEM certificate".into()))?
        .map_err(|e| fail(e.to_string()))?;
    let cert = x509_cert::Certificate::from_der(der.as_ref()).map_err(|e| fail(e.to_string()))?;
    let mut names = Vec::new();
    for ext in cert.tbs_certificate.filter::<SubjectAltName>() {
        let (_, san) = ext.map_err(|e| fail(e.to_string()))?;
        for name in san.0 {
            match name {
                GeneralName::DnsName(n) => names.push(n.to_string()),
                GeneralName::UniformResourceIdentifier(u) => names.push(u.to_string()),
                _ => {}
            }
        }
    }
    match names.len() {
        1 => Ok(names.remove(0)),
        0 => Err(fail("it has no subjectAltName DNS name or URI".into())),
        n => Err(fail(format!(
            "it has {n} DNS names and URIs: {}",
            names.join(", ")
        ))),
    }
}

/// Where the run's mounts and bundle are made: the one given, or one of the clone's own.
fn workdir(function: &Function, prepared: &PrepareResponse) -> PathBuf {
    function
        .workdir
        .clone()
        .unwrap_or_else(|| PathBuf::from("/run/host-attach").join(&prepared.clone_id))
}

/// Where the export is: its Unix socket, or its TCP address with this agent's TLS files.
pub fn export_of(
    prepared: &PrepareResponse,
    tls_certificates: Option<&Path>,
) -> Result<Export, RunError> {
    let name = prepared.export_name.clone();
    if prepared.address.is_empty() {
        return Ok(Export::Unix {
            socket: PathBuf::from(&prepared.socket),
            name,
        });
    }
    let address: std::net::SocketAddr =
        prepared
            .address
            .parse()
            .map_err(|source| RunError::ExportAddress {
                address: prepared.address.clone(),
                source,
            })?;
    let certificates = tls_certificates.ok_or_else(|| RunError::NoTlsCertificates {
        address: prepared.address.clone(),
    })?;
    Ok(Export::Tls {
        host: address.ip().to_string(),
        port: address.port(),
        name,
        certificates: certificates.to_path_buf(),
    })
}

/// The image's runtime config from Prepare (JSON; null when there is none).
fn image_config(prepared: &PrepareResponse) -> Result<serde_json::Value, RunError> {
    if prepared.runtime_config_json.is_empty() {
        Ok(serde_json::Value::Null)
    } else {
        serde_json::from_str(&prepared.runtime_config_json).map_err(RunError::RuntimeConfig)
    }
}

/// Attaches and mounts the export, runs the function in its bundle, and detaches.
fn start_and_wait(
    prepared: &PrepareResponse,
    export: &Export,
    workdir: &Path,
    command: &[String],
    interrupt: &Interrupt,
) -> Result<u8, RunError> {
    std::fs::create_dir_all(workdir).map_err(|source| RunError::Workdir {
        path: workdir.to_path_buf(),
        source,
    })?;
    let rootfs = workdir.join("rootfs");
    let mut attachment = Attachment::attach(export, workdir, &rootfs)?;
    let image_config = image_config(prepared)?;
    let outcome = (|| {
        let process = Process::from_image(&image_config, command, &rootfs)?;
        let _running = ops::timings::span("run").entered();
        let bundle = workdir.join("bundle");
        crate::runc::write_bundle(&bundle, &process, &rootfs)?;
        let status = crate::runc::run(
            &bundle,
            &workdir.join("runc"),
            &prepared.clone_id,
            interrupt.flag(),
        )?;
        Ok::<u8, RunError>(crate::exit::of_function(status))
    })();
    let detached = ops::timings::time("teardown", || attachment.detach());
    let code = outcome?;
    detached?;
    Ok(code)
}

/// The IPU's WatchEvents stream for one clone, read on a thread of its own.
struct Watch {
    events: std::sync::mpsc::Receiver<CloneEvent>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Watch {
    /// Subscribed when this returns: no later event of `clone_id` is missed.
    fn subscribe(ipu: &IpuApi, clone_id: &str) -> Result<Self, RunError> {
        let (tx, events) = std::sync::mpsc::channel();
        let (ready_tx, ready) = std::sync::mpsc::sync_channel(1);
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        let (ipu, clone_id) = (ipu.clone(), clone_id.to_string());
        let thread = std::thread::spawn(move || {
            let rt = match crate::ipu::runtime() {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = ready_tx.send(Err(RunError::Ipu(e)));
                    return;
                }
            };
            rt.block_on(async move {
                let mut client = match ipu.connect().await {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = ready_tx.send(Err(RunError::Ipu(e)));
                        return;
                    }
                };
                let mut stream = match client.watch_events(WatchRequest {}).await {
                    Ok(s) => s.into_inner(),
                    Err(status) => {
                        let _ = ready_tx.send(Err(RunError::Watch(status.into())));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(()));
                loop {
                    tokio::select! {
                        _ = &mut stopped => return,
                        message = stream.message() => match message {
                            Ok(Some(e)) if e.clone_id == clone_id => {
                                if tx.send(e).is_err() {
                                    return;
                                }
                            }
                            Ok(Some(_)) => {}
                            Ok(None) | Err(_) => return,
                        },
                    }
                }
            });
        });
        match ready.recv() {
            Ok(Ok(())) => Ok(Self {
                events,
                stop: Some(stop),
                thread: Some(thread),
            }),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(RunError::Watch(
                tonic::Status::internal("the watch ended before it began").into(),
            )),
        }
    }

    /// Waits until `timeout` for the clone's event of `kind`.
    fn wait_for(&self, kind: &str, timeout: std::time::Duration) -> Option<CloneEvent> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.events.recv_timeout(left) {
                Ok(e) if e.kind == kind => return Some(e),
                Ok(_) => {}
                Err(_) => return None,
            }
        }
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// How long the IPU's report of the front-end's release may take to arrive after QEMU
/// closed the device's socket.
const HOT_REMOVE_REPORT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// The function in a microVM: boot, hot-plug the clone, stream the output, and at exit
/// hot-remove the device (forced after the deadline) and wait for the IPU to see it go.
fn run_in_vm(
    ipu: &IpuApi,
    options: &VmOptions,
    prepared: &PrepareResponse,
    workdir: &Path,
    command: &[String],
    interrupt: &Interrupt,
) -> Result<(u8, Removal), RunError> {
    if prepared.export_kind != "vhost-user-blk" {
        return Err(RunError::ExportKind {
            kind: prepared.export_kind.clone(),
        });
    }
    let process = ImageProcess::from_config(&image_config(prepared)?, command)?;
    let (accel, why) = Accel::resolve(options.vm_accel);
    eprintln!("host-attach: running the function in a microVM on {why}");
    let watch = Watch::subscribe(ipu, &prepared.clone_id)?;
    let name = format!("fn-{}", prepared.clone_id);
    let mut vm = ops::timings::time("boot", || {
        MicroVm::start(options, accel, &workdir.join("vm"), &name, &process)
    })?;
    let attached = ops::timings::time("device_attach", || vm.attach(Path::new(&prepared.socket)));
    let ended = attached.and_then(|()| {
        vm.wait(
            std::time::Duration::from_secs(options.vm_boot_timeout),
            &|| interrupt.is_set(),
        )
    });
    let teardown = ops::timings::span("teardown").entered();
    let removal = vm.remove(std::time::Duration::from_secs(options.vm_release_deadline));
    match &removal {
        Removal::Released { .. } => {
            // The IPU saw the front-end let go before anything is erased.
            if watch
                .wait_for("hot_remove", HOT_REMOVE_REPORT_TIMEOUT)
                .is_none()
            {
                eprintln!(
                    "host-attach: the IPU did not report the hot-remove of {} within {:?}",
                    prepared.clone_id, HOT_REMOVE_REPORT_TIMEOUT
                );
            }
        }
        Removal::Forced { reason } => {
            eprintln!(
                "host-attach: forced removal of {}: {reason}",
                prepared.clone_id
            );
        }
    }
    vm.shutdown();
    drop(watch);
    drop(teardown);
    match ended? {
        GuestEnd::Exited(code) => Ok((code, removal)),
        // As runc reports a function its SIGTERM ended.
        GuestEnd::Interrupted => Ok((128 + libc::SIGTERM as u8, removal)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prepared(address: &str) -> PrepareResponse {
        PrepareResponse {
            clone_id: "c1".into(),
            export_name: "e1".into(),
            socket: "/run/ipu/nbd.sock".into(),
            address: address.into(),
            ..Default::default()
        }
    }

    #[test]
    fn the_export_is_the_unix_socket_or_the_tls_address() {
        match export_of(&prepared(""), None).unwrap() {
            Export::Unix { socket, name } => {
                assert_eq!(socket, Path::new("/run/ipu/nbd.sock"));
                assert_eq!(name, "e1");
            }
            e => panic!("{e:?}"),
        }
        match export_of(&prepared("192.0.2.1:10809"), Some(Path::new("/tls"))).unwrap() {
            Export::Tls {
                host,
                port,
                name,
                certificates,
            } => {
                assert_eq!(
                    (host.as_str(), port, name.as_str()),
                    ("192.0.2.1", 10809, "e1")
                );
                assert_eq!(certificates, Path::new("/tls"));
            }
            e => panic!("{e:?}"),
        }
        let e = export_of(&prepared("192.0.2.1:10809"), None).unwrap_err();
        assert_eq!(
            e.to_string(),
            "the export is on 192.0.2.1:10809 (TLS): --tls-certificates DIR is needed"
        );
        let e = export_of(&prepared("nowhere"), Some(Path::new("/tls"))).unwrap_err();
        assert!(
            e.to_string().starts_with("export address \"nowhere\": "),
            "{e}"
        );
    }

    #[test]
    fn the_workdir_is_the_one_given_or_the_clones() {
        let p = prepared("");
        assert_eq!(
            workdir(&Function::default(), &p),
            Path::new("/run/host-attach/c1")
        );
        let given = Function {
            workdir: Some("/tmp/w".into()),
            ..Default::default()
        };
        assert_eq!(workdir(&given, &p), Path::new("/tmp/w"));
    }

    #[test]
    fn the_image_config_is_json_or_null() {
        let mut p = prepared("");
        assert_eq!(image_config(&p).unwrap(), serde_json::Value::Null);
        p.runtime_config_json = r#"{"Cmd":["x"]}"#.into();
        assert_eq!(image_config(&p).unwrap()["Cmd"][0], "x");
        p.runtime_config_json = "{".into();
        let e = image_config(&p).unwrap_err().to_string();
        assert!(e.starts_with("the image's runtime config: "), "{e}");
    }

    #[test]
    fn an_interrupt_is_a_flag_the_signals_set() {
        let i = Interrupt::default();
        assert!(!i.is_set());
        i.flag().store(true, Ordering::SeqCst);
        assert!(i.clone().is_set());
    }
}
