//! An OCI runtime bundle for one function, from the image's verified config, with hardened
//! defaults: no capabilities, no new privileges, its own pid, network, ipc, uts, mount and
//! cgroup namespaces, no devices beyond the runtime's minimal set, /proc and /sys masked and
//! read-only where the runtime-spec's defaults say so, the root file system nodev and nosuid,
//! and a seccomp filter ([`seccomp`]) that refuses the system calls a function has no use
//! for and that widen the kernel's attack surface.
//!
//! The document is written with serde_json rather than an OCI types crate: it is one fixed
//! shape, and the runtime (runc) validates it.

use std::path::Path;

use serde_json::{json, Value};

/// What in the image config cannot be run.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BundleError {
    /// Neither `Entrypoint` nor `Cmd` nor the caller names a command.
    #[error("the image names no command (Entrypoint/Cmd) and none was given")]
    NoCommand,
    /// `WorkingDir` is relative.
    #[error("WorkingDir {0:?} is not absolute")]
    RelativeWorkingDir(String),
    /// `User` names a user the image's /etc/passwd does not have.
    #[error("image user {0:?} is not in the image's /etc/passwd")]
    UnknownUser(String),
    /// `User` names a group the image's /etc/group does not have.
    #[error("image group {0:?} is not in the image's /etc/group")]
    UnknownGroup(String),
}

/// What to run, from the image config and the caller's overrides.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Process {
    pub args: Vec<String>,
    pub env: Vec<String>,
    pub cwd: String,
    pub uid: u32,
    pub gid: u32,
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .map(|a| {
            a.iter()
                .filter_map(|s| s.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// `uid`, `uid:gid`, `name` or `name:group`, names resolved in the image's own /etc files.
fn resolve_user(user: &str, rootfs: &Path) -> Result<(u32, u32), BundleError> {
    if user.is_empty() {
        return Ok((0, 0));
    }
    let (u, g) = user
        .split_once(':')
        .map_or((user, None), |(u, g)| (u, Some(g)));
    let lookup = |file: &str, name: &str| -> Option<(u32, Option<u32>)> {
        let text = std::fs::read_to_string(rootfs.join(file)).ok()?;
        text.lines().find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f.first() == Some(&name) && f.len() > 3).then(|| {
                (
                    f[2].parse().ok().unwrap_or(u32::MAX),
                    f.get(3).and_then(|g| g.parse().ok()),
                )
            })
        })
    };
    let (uid, passwd_gid) = match u.parse::<u32>() {
        Ok(n) => (n, None),
        Err(_) => lookup("etc/passwd", u)
            .filter(|(uid, _)| *uid != u32::MAX)
            .ok_or_else(|| BundleError::UnknownUser(u.to_string()))?,
    };
    let gid = match g {
        None => passwd_gid.unwrap_or(0),
        Some(g) => match g.parse::<u32>() {
            Ok(n) => n,
            Err(_) => lookup("etc/group", g)
                .map(|(gid, _)| gid)
                .filter(|gid| *gid != u32::MAX)
                .ok_or_else(|| BundleError::UnknownGroup(g.to_string()))?,
        },
    };
    Ok((uid, gid))
}

impl Process {
    /// From the image config's `config` object (`Entrypoint`, `Cmd`, `Env`, `WorkingDir`,
    /// `User`); `command`, when not empty, replaces `Cmd`.
    pub fn from_image(
        config: &Value,
        command: &[String],
        rootfs: &Path,
    ) -> Result<Self, BundleError> {
        let process = ImageProcess::from_config(config, command)?;
        let (uid, gid) = resolve_user(&process.user, rootfs)?;
        Ok(Self {
            args: process.args,
            env: process.env,
            cwd: process.cwd,
            uid,
            gid,
        })
    }
}

/// The process an image config describes, before its user is resolved (in the image's own
/// /etc files: on the host for runc, in the guest for a microVM).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageProcess {
    pub args: Vec<String>,
    pub env: Vec<String>,
    pub cwd: String,
    /// `User` as the config has it: empty, `uid`, `uid:gid`, `name` or `name:group`.
    pub user: String,
}

impl ImageProcess {
    /// Entrypoint + Cmd (or + `command` when given), Env with a default PATH, WorkingDir
    /// (absolute, default /) and User.
    pub fn from_config(config: &Value, command: &[String]) -> Result<Self, BundleError> {
        let mut args = strings(&config["Entrypoint"]);
        if command.is_empty() {
            args.extend(strings(&config["Cmd"]));
        } else {
            args.extend(command.iter().cloned());
        }
        if args.is_empty() {
            return Err(BundleError::NoCommand);
        }
        let mut env = strings(&config["Env"]);
        if !env.iter().any(|e| e.starts_with("PATH=")) {
            env.push("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into());
        }
        let cwd = config["WorkingDir"]
            .as_str()
            .filter(|s| !s.is_empty())
            .unwrap_or("/")
            .to_string();
        if !cwd.starts_with('/') {
            return Err(BundleError::RelativeWorkingDir(cwd));
        }
        Ok(Self {
            args,
            env,
            cwd,
            user: config["User"].as_str().unwrap_or("").to_string(),
        })
    }
}

/// The bundle's config.json.
pub fn config(process: &Process, rootfs: &Path, hostname: &str) -> Value {
    json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": {"uid": process.uid, "gid": process.gid},
            "args": process.args,
            "env": process.env,
            "cwd": process.cwd,
            "capabilities": {"bounding": [], "effective": [], "inheritable": [], "permitted": [], "ambient": []},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": true
        },
        "root": {"path": rootfs, "readonly": false},
        "hostname": hostname,
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]}
        ],
        "linux": {
            "namespaces": [
                {"type": "pid"}, {"type": "network"}, {"type": "ipc"},
                {"type": "uts"}, {"type": "mount"}, {"type": "cgroup"}
            ],
            "resources": {"devices": [{"allow": false, "access": "rwm"}]},
            "maskedPaths": [
                "/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
                "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/sys/firmware",
                "/proc/scsi"
            ],
            "readonlyPaths": [
                "/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"
            ],
            "seccomp": seccomp()
        }
    })
}

/// System calls refused with EPERM: new namespaces and mounts, kernel keyrings, BPF and perf,
/// module and kexec loading, tracing other processes, io_uring, clock and swap changes,
/// reboot, and handle-based file opens. They need capabilities the function does not have,
/// or open kernel surface it does not need (unprivileged user namespaces among them).
const DENIED: &[&str] = &[
    "unshare",
    "setns",
    "mount",
    "umount2",
    "pivot_root",
    "chroot",
    "open_tree",
    "move_mount",
    "fsopen",
    "fsconfig",
    "fsmount",
    "fspick",
    "mount_setattr",
    "add_key",
    "request_key",
    "keyctl",
    "bpf",
    "perf_event_open",
    "userfaultfd",
    "init_module",
    "finit_module",
    "delete_module",
    "kexec_load",
    "kexec_file_load",
    "ptrace",
    "process_vm_readv",
    "process_vm_writev",
    "kcmp",
    "io_uring_setup",
    "io_uring_enter",
    "io_uring_register",
    "reboot",
    "swapon",
    "swapoff",
    "acct",
    "quotactl",
    "quotactl_fd",
    "syslog",
    "lookup_dcookie",
    "settimeofday",
    "clock_settime",
    "clock_adjtime",
    "adjtimex",
    "iopl",
    "ioperm",
    "open_by_handle_at",
    "name_to_handle_at",
    "vhangup",
    "uselib",
    "ustat",
    "sysfs",
    "_sysctl",
    "fanotify_init",
    "nfsservctl",
];

/// `clone` flags that make new namespaces (CLONE_NEWNS, NEWCGROUP, NEWUTS, NEWIPC, NEWUSER,
/// NEWPID, NEWNET): a clone with any of them is refused.
const CLONE_NAMESPACE_FLAGS: [u64; 7] = [
    0x0002_0000,
    0x0200_0000,
    0x0400_0000,
    0x0800_0000,
    0x1000_0000,
    0x2000_0000,
    0x4000_0000,
];

/// The seccomp section: allow by default, refuse the `DENIED` syscalls and namespace-making `clone`
/// calls with EPERM, and `clone3` (whose flags a filter cannot read) with ENOSYS, so the C
/// library falls back to `clone`.
pub fn seccomp() -> Value {
    const EPERM: u32 = 1;
    const ENOSYS: u32 = 38;
    let mut syscalls = vec![
        json!({"names": DENIED, "action": "SCMP_ACT_ERRNO", "errnoRet": EPERM}),
        json!({"names": ["clone3"], "action": "SCMP_ACT_ERRNO", "errnoRet": ENOSYS}),
    ];
    for flag in CLONE_NAMESPACE_FLAGS {
        syscalls.push(json!({
            "names": ["clone"],
            "action": "SCMP_ACT_ERRNO",
            "errnoRet": EPERM,
            "args": [{"index": 0, "value": flag, "valueTwo": flag, "op": "SCMP_CMP_MASKED_EQ"}]
        }));
    }
    json!({
        "defaultAction": "SCMP_ACT_ALLOW",
        "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"],
        "syscalls": syscalls
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn process_from_the_image_config_with_overrides() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("etc")).unwrap();
        std::fs::write(
            dir.path().join("etc/passwd"),
            "app:x:1000:1000::/home/app:/bin/sh\n",
        )
        .unwrap();
        std::fs::write(dir.path().join("etc/group"), "staff:x:50:\n").unwrap();
        let c = json!({"Entrypoint": ["/bin/sh", "-c"], "Cmd": ["echo hi"], "Env": ["A=1"], "WorkingDir": "/work", "User": "app:staff"});
        let p = Process::from_image(&c, &[], dir.path()).unwrap();
        assert_eq!(p.args, ["/bin/sh", "-c", "echo hi"]);
        assert_eq!((p.uid, p.gid, p.cwd.as_str()), (1000, 50, "/work"));
        assert!(p.env.iter().any(|e| e.starts_with("PATH=")));
        let p = Process::from_image(&c, &["echo bye".into()], dir.path()).unwrap();
        assert_eq!(p.args, ["/bin/sh", "-c", "echo bye"]);
        for (config, want) in [
            (json!({}), "no command"),
            (
                json!({"Cmd": ["x"], "User": "nobody"}),
                "not in the image's /etc/passwd",
            ),
            (json!({"Cmd": ["x"], "WorkingDir": "rel"}), "not absolute"),
        ] {
            let e = Process::from_image(&config, &[], dir.path())
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{e}");
        }
        let cfg = config(&p, dir.path(), "fn");
        assert_eq!(cfg["process"]["noNewPrivileges"], true);
        assert_eq!(cfg["process"]["capabilities"]["bounding"], json!([]));
        let denied = &cfg["linux"]["seccomp"]["syscalls"][0]["names"];
        for call in ["unshare", "keyctl", "bpf", "mount", "ptrace"] {
            assert!(denied.as_array().unwrap().contains(&json!(call)), "{call}");
        }
    }

    #[test]
    fn each_bad_config_field_is_its_own_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("etc")).unwrap();
        std::fs::write(
            dir.path().join("etc/passwd"),
            "app:x:1000:1000::/:/bin/sh\n",
        )
        .unwrap();
        std::fs::write(dir.path().join("etc/group"), "staff:x:50:\n").unwrap();
        for (config, want) in [
            (json!({"Cmd": []}), BundleError::NoCommand),
            (
                json!({"Cmd": ["x"], "WorkingDir": "w"}),
                BundleError::RelativeWorkingDir("w".into()),
            ),
            (
                json!({"Cmd": ["x"], "User": "nobody"}),
                BundleError::UnknownUser("nobody".into()),
            ),
            (
                json!({"Cmd": ["x"], "User": "app:wheel"}),
                BundleError::UnknownGroup("wheel".into()),
            ),
        ] {
            assert_eq!(
                Process::from_image(&config, &[], dir.path()).unwrap_err(),
                want
            );
        }
        assert_eq!(
            BundleError::UnknownGroup("wheel".into()).to_string(),
            "image group \"wheel\" is not in the image's /etc/group"
        );
    }
}
