//! `host-attach run --vm`: the function in a QEMU microVM, its root file system the IPU's
//! clone as a hot-plugged `vhost-user-blk-pci` device.
//!
//! The VM is QEMU's q35 machine with one PCIe root port, no default devices, guest memory
//! in a shared memfd (vhost-user needs it), QEMU's seccomp sandbox on, Debian's kernel and
//! the initramfs of [`initramfs`] (busybox init, virtio modules, the function's spec). Four
//! Unix sockets of the run's private directory, each listened on here before QEMU starts,
//! carry the monitor (QMP, [`qmp`]) and three serial ports: the function's stdout (ttyS0),
//! its stderr (ttyS1), and the control line (ttyS2: the kernel's console and the init's
//! `IPU-VM ...` lines: booted, device, started, exit N, error MESSAGE).
//!
//! The device's life: `chardev-add` (a socket client of the IPU's vhost-user socket) and
//! `device_add vhost-user-blk-pci` on the root port once QEMU runs (the guest finds it at
//! boot or as a hot-plug); at `exit N`, `device_del`, then `DEVICE_DELETED` (the guest
//! ejected the device through ACPI hot-plug), then `chardev-remove`: the IPU sees the
//! front-end release the device. A guest that does not release it within the deadline is
//! stopped and killed, and the removal is forced ([`Removal::Forced`]).
//!
//! Acceleration: KVM when the host has hardware virtualization (kvm_intel or kvm_amd), TCG
//! otherwise. A host whose KVM is PVM (kvm_pvm: nested virtualization without hardware
//! support, as in some cloud sandboxes) runs only guests built as PVM guests, and Debian's
//! kernels are not: such a host runs the microVM under TCG, and says so.

pub mod initramfs;
pub mod qmp;

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::fs::DirBuilderExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::bundle::ImageProcess;
use initramfs::InitramfsError;
use qmp::{Qmp, QmpError};

/// The default asset tree `scripts/setup.sh` installs.
pub const DEFAULT_ASSETS: &str = "/opt/ipu-image-tools/microvm";

/// How the microVM is run (`host-attach run --vm ...`).
#[derive(clap::Args, Clone, Debug)]
pub struct VmOptions {
    /// Run the function in a QEMU microVM with the clone as a hot-plugged
    /// vhost-user-blk-pci device (the IPU exports it as vhost-user-blk), instead of runc on
    /// this host's kernel.
    #[arg(long)]
    pub vm: bool,
    /// The kernel (`vmlinuz`) and the initramfs tree (`initramfs/`) of the microVM, as
    /// `scripts/setup.sh` installs them.
    #[arg(long, value_name = "DIR", default_value = DEFAULT_ASSETS)]
    pub vm_assets: PathBuf,
    /// kvm, tcg, or auto: KVM when this host has hardware virtualization, else TCG.
    #[arg(long, value_enum, value_name = "ACCEL", default_value_t = AccelChoice::Auto)]
    pub vm_accel: AccelChoice,
    /// The microVM's memory.
    #[arg(long, value_name = "MIB", default_value_t = 256)]
    pub vm_memory_mib: u32,
    /// How long the guest has to release the device after `device_del` before the VM is
    /// stopped and the removal forced.
    #[arg(long, value_name = "SECONDS", default_value_t = 10)]
    pub vm_release_deadline: u64,
    /// How long the guest has to boot and start the function.
    #[arg(long, value_name = "SECONDS", default_value_t = 120)]
    pub vm_boot_timeout: u64,
    /// Extra words for the guest kernel's command line (diagnosis).
    #[arg(long, value_name = "ARGS", default_value = "")]
    pub vm_append: String,
    /// Also write the guest's console (kernel messages, the init's control lines) to FILE.
    #[arg(long, value_name = "FILE")]
    pub vm_console: Option<PathBuf>,
    /// The QEMU binary.
    #[arg(long, value_name = "PATH", default_value = "qemu-system-x86_64")]
    pub qemu: PathBuf,
}

impl Default for VmOptions {
    fn default() -> Self {
        Self {
            vm: false,
            vm_assets: PathBuf::from(DEFAULT_ASSETS),
            vm_accel: AccelChoice::Auto,
            vm_memory_mib: 256,
            vm_release_deadline: 10,
            vm_boot_timeout: 120,
            vm_append: String::new(),
            vm_console: None,
            qemu: PathBuf::from("qemu-system-x86_64"),
        }
    }
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum AccelChoice {
    Auto,
    Kvm,
    Tcg,
}

/// The accelerator a VM runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    /// The accelerator for `choice`, and why (said to the user).
    pub fn resolve(choice: AccelChoice) -> (Self, String) {
        Self::resolve_on(choice, Path::new("/sys/module"), Path::new("/dev/kvm"))
    }

    fn resolve_on(choice: AccelChoice, modules: &Path, dev_kvm: &Path) -> (Self, String) {
        match choice {
            AccelChoice::Kvm => (Self::Kvm, "KVM (asked for)".into()),
            AccelChoice::Tcg => (Self::Tcg, "TCG (asked for)".into()),
            AccelChoice::Auto => {
                let usable = std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(dev_kvm)
                    .is_ok();
                let hardware = ["kvm_intel", "kvm_amd"]
                    .into_iter()
                    .find(|m| modules.join(m).exists());
                match (usable, hardware) {
                    (true, Some(m)) => (Self::Kvm, format!("KVM ({m})")),
                    (true, None) if modules.join("kvm_pvm").exists() => (
                        Self::Tcg,
                        "TCG: this host's KVM is PVM (kvm_pvm), which runs only PVM guest \
                         kernels, and Debian's kernel is not one"
                            .into(),
                    ),
                    (true, None) => (
                        Self::Tcg,
                        "TCG: /dev/kvm has no hardware virtualization module behind it".into(),
                    ),
                    (false, _) => (
                        Self::Tcg,
                        format!("TCG: {} is not usable", dev_kvm.display()),
                    ),
                }
            }
        }
    }
}

/// What went wrong with the microVM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("microVM assets: {} is missing (scripts/setup.sh installs them)", path.display())]
    Assets { path: PathBuf },
    #[error(transparent)]
    Initramfs(#[from] InitramfsError),
    #[error("microVM: {what}: {source}")]
    Io {
        what: &'static str,
        source: io::Error,
    },
    #[error("cannot start {}: {source}", qemu.display())]
    Spawn { qemu: PathBuf, source: io::Error },
    #[error("QEMU exited before the function ended ({status}){}", qemu_log(.log))]
    QemuExited { status: String, log: String },
    #[error("QEMU did not connect {what} within {after:?}{}", qemu_log(.log))]
    NotConnected {
        what: &'static str,
        after: Duration,
        log: String,
    },
    #[error(transparent)]
    Qmp(#[from] QmpError),
    #[error("the guest: {message}{}", with_console(.console))]
    Guest { message: String, console: String },
    #[error("the guest did not start the function within {after:?}{}", with_console(.console))]
    BootTimeout { after: Duration, console: String },
}

fn qemu_log(log: &str) -> String {
    if log.trim().is_empty() {
        String::new()
    } else {
        format!("; QEMU said: {}", log.trim())
    }
}

fn with_console(tail: &str) -> String {
    if tail.trim().is_empty() {
        String::new()
    } else {
        format!(
            "\n--- the guest's console (last lines) ---\n{}",
            tail.trim_end()
        )
    }
}

/// A line of the control port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Control {
    Booted,
    Device,
    Started,
    Exit(u8),
    Error(String),
}

impl Control {
    /// `IPU-VM ...` lines; anything else is console output.
    pub fn parse(line: &str) -> Option<Self> {
        let rest = line
            .trim_end_matches(['\r', '\n'])
            .strip_prefix("IPU-VM ")?;
        Some(match rest {
            "booted" => Self::Booted,
            "device" => Self::Device,
            "started" => Self::Started,
            _ => {
                if let Some(code) = rest.strip_prefix("exit ") {
                    // The shell's status: 0-255 (128 + N for signal N).
                    Self::Exit(code.trim().parse().ok()?)
                } else if let Some(message) = rest.strip_prefix("error ") {
                    Self::Error(message.to_string())
                } else {
                    return None;
                }
            }
        })
    }
}

/// How the function's run in the guest ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestEnd {
    /// The function exited with this code.
    Exited(u8),
    /// The run was interrupted (Ctrl-C, SIGTERM) before the function exited.
    Interrupted,
}

/// How the device left the VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Removal {
    /// The guest acknowledged the hot-remove (`DEVICE_DELETED`) and the chardev was closed.
    Released { after: Duration },
    /// It did not within the deadline: the VM was stopped and killed.
    Forced { reason: String },
}

/// The id of the clone's device and its chardev in QEMU.
const DEVICE_ID: &str = "fn0";
const CHARDEV_ID: &str = "fn0-disk";
/// Lines of the guest's console kept to show with a failure.
const CONSOLE_LINES: usize = 40;
/// How long QEMU has to connect the monitor and the serial ports after it starts.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(20);

/// A running microVM.
pub struct MicroVm {
    qemu: Child,
    qmp: Qmp,
    control: Receiver<Control>,
    console_tail: Arc<Mutex<VecDeque<String>>>,
    streams: Vec<JoinHandle<()>>,
    log: PathBuf,
    attached: bool,
}

/// The QEMU command line of a VM whose files are in `dir`.
pub fn qemu_command(
    options: &VmOptions,
    accel: Accel,
    dir: &Path,
    name: &str,
) -> Result<Command, VmError> {
    let kernel = options.vm_assets.join("vmlinuz");
    if !kernel.is_file() {
        return Err(VmError::Assets { path: kernel });
    }
    let memory = format!("{}M", options.vm_memory_mib);
    let mut append = "console=ttyS2 quiet panic=-1".to_string();
    if !options.vm_append.trim().is_empty() {
        append.push(' ');
        append.push_str(options.vm_append.trim());
    }
    let socket = |file: &str| dir.join(file).display().to_string();
    let mut cmd = Command::new(&options.qemu);
    cmd.arg("-name")
        .arg(format!("{name},debug-threads=on"))
        .args([
            "-machine",
            match accel {
                Accel::Kvm => "q35,accel=kvm,memory-backend=mem",
                Accel::Tcg => "q35,accel=tcg,memory-backend=mem",
            },
        ])
        .args([
            "-cpu",
            match accel {
                Accel::Kvm => "host",
                Accel::Tcg => "max",
            },
        ])
        .args(["-smp", "1", "-m", &memory])
        // vhost-user maps the guest's memory into the IPU service: a shared memfd, nothing
        // on a file system.
        .arg("-object")
        .arg(format!(
            "memory-backend-memfd,id=mem,size={memory},share=on"
        ))
        .args([
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
        ])
        .args([
            "-sandbox",
            "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
        ])
        .arg("-kernel")
        .arg(&kernel)
        .arg("-initrd")
        .arg(dir.join("initramfs.cpio"))
        .args(["-append", &append])
        .args([
            "-chardev",
            &format!("socket,id=qmp,path={}", socket("qmp.sock")),
        ])
        .args(["-mon", "chardev=qmp,mode=control"]);
    for (id, file) in [
        ("out", "out.sock"),
        ("err", "err.sock"),
        ("ctl", "ctl.sock"),
    ] {
        cmd.args(["-chardev", &format!("socket,id={id},path={}", socket(file))])
            .args(["-serial", &format!("chardev:{id}")]);
    }
    cmd.args(["-device", "pcie-root-port,id=rp0,chassis=1,slot=1"]);
    Ok(cmd)
}

/// Accepts QEMU's connection on `listener`, unless QEMU exits or the time is up.
fn accept(
    listener: &UnixListener,
    qemu: &mut Child,
    what: &'static str,
    log: &Path,
) -> Result<UnixStream, VmError> {
    let io = |source| VmError::Io {
        what: "accepting QEMU's connection",
        source,
    };
    listener.set_nonblocking(true).map_err(io)?;
    let deadline = Instant::now() + CONNECT_TIMEOUT;
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                stream.set_nonblocking(false).map_err(io)?;
                return Ok(stream);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(io(e)),
        }
        if let Ok(Some(status)) = qemu.try_wait() {
            return Err(VmError::QemuExited {
                status: status.to_string(),
                log: read_log(log),
            });
        }
        if Instant::now() >= deadline {
            return Err(VmError::NotConnected {
                what,
                after: CONNECT_TIMEOUT,
                log: read_log(log),
            });
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn read_log(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(10)..].join("; ")
}

/// Copies a serial port to this process's stdout or stderr as it comes.
fn stream_to(mut from: UnixStream, mut to: impl Write + Send + 'static) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut buf = [0u8; 16 * 1024];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if to.write_all(&buf[..n]).and_then(|()| to.flush()).is_err() {
                        // The reader went away; keep draining so the guest is not blocked.
                    }
                }
            }
        }
    })
}

impl MicroVm {
    /// Starts QEMU for `process` with its files in `dir` (made here, private): the
    /// initramfs, the sockets, QEMU's own log.
    pub fn start(
        options: &VmOptions,
        accel: Accel,
        dir: &Path,
        name: &str,
        process: &ImageProcess,
    ) -> Result<Self, VmError> {
        let io = |what| move |source| VmError::Io { what, source };
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(io("making the VM's directory"))?;
        let tree = options.vm_assets.join("initramfs");
        if !tree.is_dir() {
            return Err(VmError::Assets { path: tree });
        }
        let spec = initramfs::spec(process)?;
        let image =
            File::create(dir.join("initramfs.cpio")).map_err(io("writing the initramfs"))?;
        let mut image = io::BufWriter::new(image);
        initramfs::write(&tree, &spec, &mut image)?;
        image.flush().map_err(io("writing the initramfs"))?;
        drop(image);

        let mut listeners = Vec::new();
        for file in ["qmp.sock", "out.sock", "err.sock", "ctl.sock"] {
            let path = dir.join(file);
            let _ = std::fs::remove_file(&path);
            listeners.push(UnixListener::bind(&path).map_err(io("listening for QEMU"))?);
        }
        let log = dir.join("qemu.log");
        let log_file = File::create(&log).map_err(io("QEMU's log"))?;
        let mut cmd = qemu_command(options, accel, dir, name)?;
        cmd.stdin(Stdio::null())
            .stdout(log_file.try_clone().map_err(io("QEMU's log"))?)
            .stderr(log_file);
        let mut qemu = cmd.spawn().map_err(|source| VmError::Spawn {
            qemu: options.qemu.clone(),
            source,
        })?;
        let connected = (|| {
            let monitor = accept(&listeners[0], &mut qemu, "its monitor", &log)?;
            let out = accept(&listeners[1], &mut qemu, "the stdout port", &log)?;
            let err = accept(&listeners[2], &mut qemu, "the stderr port", &log)?;
            let ctl = accept(&listeners[3], &mut qemu, "the control port", &log)?;
            let qmp = Qmp::handshake(monitor)?;
            Ok::<_, VmError>((qmp, out, err, ctl))
        })();
        let (qmp, out, err, ctl) = match connected {
            Ok(c) => c,
            Err(e) => {
                let _ = qemu.kill();
                let _ = qemu.wait();
                return Err(e);
            }
        };
        let console_file = match &options.vm_console {
            Some(path) => Some(File::create(path).map_err(io("the console file"))?),
            None => None,
        };
        let console_tail = Arc::new(Mutex::new(VecDeque::new()));
        let (control_tx, control) = mpsc::channel();
        let tail = console_tail.clone();
        let control_reader = std::thread::spawn(move || {
            let mut console_file = console_file;
            for line in BufReader::new(ctl).split(b'\n') {
                let Ok(line) = line else { return };
                let line = String::from_utf8_lossy(&line).into_owned();
                if let Some(f) = console_file.as_mut() {
                    let _ = writeln!(f, "{}", line.trim_end_matches('\r'));
                }
                if let Some(c) = Control::parse(&line) {
                    let _ = control_tx.send(c);
                }
                let mut tail = tail.lock().expect("not poisoned");
                if tail.len() == CONSOLE_LINES {
                    tail.pop_front();
                }
                tail.push_back(line.trim_end_matches('\r').to_string());
            }
        });
        Ok(Self {
            qemu,
            qmp,
            control,
            console_tail,
            streams: vec![
                stream_to(out, io::stdout()),
                stream_to(err, io::stderr()),
                control_reader,
            ],
            log,
            attached: false,
        })
    }

    fn console(&self) -> String {
        let tail = self.console_tail.lock().expect("not poisoned");
        tail.iter().cloned().collect::<Vec<_>>().join("\n")
    }

    /// Hot-plugs the vhost-user-blk device served on `socket` (the IPU's export).
    pub fn attach(&mut self, socket: &Path) -> Result<(), VmError> {
        self.qmp.execute(
            "chardev-add",
            json!({
                "id": CHARDEV_ID,
                "backend": {"type": "socket", "data": {
                    "addr": {"type": "unix", "data": {"path": socket}},
                    "server": false
                }}
            }),
        )?;
        self.qmp.execute(
            "device_add",
            json!({
                "driver": "vhost-user-blk-pci",
                "id": DEVICE_ID,
                "chardev": CHARDEV_ID,
                "bus": "rp0"
            }),
        )?;
        self.attached = true;
        Ok(())
    }

    /// Waits for the function's end in the guest (or an interrupt): its exit code.
    pub fn wait(
        &mut self,
        boot_timeout: Duration,
        interrupted: &dyn Fn() -> bool,
    ) -> Result<GuestEnd, VmError> {
        let started_at = Instant::now();
        let mut started = false;
        // Until the guest says the function started: the rest of its boot; then its run.
        let mut stage = ops::timings::span("boot").entered();
        loop {
            if interrupted() {
                return Ok(GuestEnd::Interrupted);
            }
            match self.control.recv_timeout(Duration::from_millis(20)) {
                Ok(Control::Started) => {
                    started = true;
                    drop(stage);
                    stage = ops::timings::span("run").entered();
                }
                Ok(Control::Exit(code)) => return Ok(GuestEnd::Exited(code)),
                Ok(Control::Error(message)) => {
                    return Err(VmError::Guest {
                        message,
                        console: self.console(),
                    })
                }
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    // The control port closed: QEMU is going or gone.
                    let status = self
                        .qemu
                        .wait()
                        .map_or_else(|e| e.to_string(), |s| s.to_string());
                    return Err(VmError::QemuExited {
                        status,
                        log: read_log(&self.log),
                    });
                }
            }
            if !started && started_at.elapsed() >= boot_timeout {
                return Err(VmError::BootTimeout {
                    after: boot_timeout,
                    console: self.console(),
                });
            }
        }
    }

    /// Hot-removes the device: `device_del`, the guest's acknowledgement
    /// (`DEVICE_DELETED`) within `deadline`, then the chardev closed. Without the
    /// acknowledgement, the VM is stopped and QEMU killed: the removal is forced.
    pub fn remove(&mut self, deadline: Duration) -> Removal {
        if !self.attached {
            return Removal::Released {
                after: Duration::ZERO,
            };
        }
        let asked = Instant::now();
        let released = self
            .qmp
            .execute("device_del", json!({"id": DEVICE_ID}))
            .and_then(|_| {
                self.qmp.wait_event("DEVICE_DELETED", deadline, |e| {
                    e.name == "DEVICE_DELETED" && e.data["device"] == DEVICE_ID
                })
            })
            .and_then(|_| {
                self.qmp
                    .execute("chardev-remove", json!({"id": CHARDEV_ID}))
            });
        self.attached = false;
        match released {
            Ok(_) => Removal::Released {
                after: asked.elapsed(),
            },
            Err(e) => {
                // Stopped first: not one more guest instruction touches the device.
                let _ = self.qmp.execute("stop", json!({}));
                let _ = self.qemu.kill();
                let _ = self.qemu.wait();
                Removal::Forced {
                    reason: format!("the guest did not release the device: {e}"),
                }
            }
        }
    }

    /// Stops QEMU (`quit`, then SIGKILL if it lingers) and waits for the function's output
    /// to be written out.
    pub fn shutdown(mut self) {
        if let Ok(None) = self.qemu.try_wait() {
            let _ = self.qmp.execute("quit", json!({}));
            let deadline = Instant::now() + Duration::from_secs(5);
            while let Ok(None) = self.qemu.try_wait() {
                if Instant::now() >= deadline {
                    let _ = self.qemu.kill();
                    let _ = self.qemu.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        for s in self.streams.drain(..) {
            let _ = s.join();
        }
    }
}

impl Drop for MicroVm {
    fn drop(&mut self) {
        // Whatever path got here, no VM outlives its run.
        if let Ok(None) = self.qemu.try_wait() {
            let _ = self.qemu.kill();
            let _ = self.qemu.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_lines_and_console_lines() {
        assert_eq!(Control::parse("IPU-VM booted\r\n"), Some(Control::Booted));
        assert_eq!(Control::parse("IPU-VM started"), Some(Control::Started));
        assert_eq!(Control::parse("IPU-VM exit 42\r"), Some(Control::Exit(42)));
        assert_eq!(Control::parse("IPU-VM exit 137"), Some(Control::Exit(137)));
        assert_eq!(
            Control::parse("IPU-VM error cannot mount /dev/vda (ext4)"),
            Some(Control::Error("cannot mount /dev/vda (ext4)".into()))
        );
        assert_eq!(Control::parse("IPU-VM exit 256"), None);
        assert_eq!(Control::parse("IPU-VM exit x"), None);
        assert_eq!(Control::parse("[    0.1] IPU-VM booted"), None);
        assert_eq!(Control::parse("IPU-VM hello"), None);
    }

    #[test]
    fn auto_is_kvm_only_with_hardware_virtualization() {
        let dir = tempfile::tempdir().unwrap();
        let modules = dir.path().join("module");
        std::fs::create_dir(&modules).unwrap();
        let kvm = dir.path().join("kvm");
        std::fs::write(&kvm, b"").unwrap();
        let (a, why) = Accel::resolve_on(AccelChoice::Auto, &modules, &kvm);
        assert_eq!(a, Accel::Tcg, "{why}");
        std::fs::create_dir(modules.join("kvm_pvm")).unwrap();
        let (a, why) = Accel::resolve_on(AccelChoice::Auto, &modules, &kvm);
        assert_eq!(a, Accel::Tcg);
        assert!(why.contains("PVM"), "{why}");
        std::fs::create_dir(modules.join("kvm_amd")).unwrap();
        assert_eq!(
            Accel::resolve_on(AccelChoice::Auto, &modules, &kvm),
            (Accel::Kvm, "KVM (kvm_amd)".into())
        );
        let (a, why) = Accel::resolve_on(AccelChoice::Auto, &modules, &dir.path().join("none"));
        assert_eq!(a, Accel::Tcg);
        assert!(why.contains("not usable"), "{why}");
        assert_eq!(
            Accel::resolve_on(AccelChoice::Tcg, &modules, &kvm).0,
            Accel::Tcg
        );
    }

    #[test]
    fn the_qemu_command_has_shared_memory_a_root_port_the_sandbox_and_our_sockets() {
        let assets = tempfile::tempdir().unwrap();
        let options = VmOptions {
            vm_assets: assets.path().to_path_buf(),
            vm_append: "acpiphp.disable=1".into(),
            ..Default::default()
        };
        let e = qemu_command(&options, Accel::Tcg, Path::new("/run/x"), "fn").unwrap_err();
        assert!(e.to_string().contains("vmlinuz is missing"), "{e}");
        std::fs::write(assets.path().join("vmlinuz"), b"").unwrap();
        let cmd = qemu_command(&options, Accel::Kvm, Path::new("/run/x"), "fn").unwrap();
        let args: Vec<String> = cmd
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let joined = args.join(" ");
        for expected in [
            "-machine q35,accel=kvm,memory-backend=mem",
            "memory-backend-memfd,id=mem,size=256M,share=on",
            "-nodefaults",
            "-sandbox on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
            "-append console=ttyS2 quiet panic=-1 acpiphp.disable=1",
            "-chardev socket,id=qmp,path=/run/x/qmp.sock -mon chardev=qmp,mode=control",
            "-chardev socket,id=out,path=/run/x/out.sock -serial chardev:out",
            "-chardev socket,id=ctl,path=/run/x/ctl.sock -serial chardev:ctl",
            "-device pcie-root-port,id=rp0,chassis=1,slot=1",
            "-initrd /run/x/initramfs.cpio",
        ] {
            assert!(joined.contains(expected), "{expected} not in {joined}");
        }
    }
}
