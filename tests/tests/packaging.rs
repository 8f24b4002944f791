//! Packaging: the systemd units of the three daemons (dist/systemd/), the capabilities the IPU
//! service's unit keeps, and the Debian packages (scripts/package.sh).
//!
//! - Each unit as shipped passes `systemd-analyze verify` with no output at all, run on a
//!   root that holds the host's units and this build's binaries at the units' `ExecStart`
//!   paths (`/usr/bin/...`), so the files verified are the files shipped.
//! - systemd's own sandboxing analysis (`systemd-analyze security --offline`) passes every
//!   check it makes, except those each unit gives up on purpose (listed below with the
//!   reason and the exposure accepted), and the directives the issue asks for are there with
//!   their values (`ProtectSystem=strict`, `CapabilityBoundingSet=` exactly as documented,
//!   ...). Removing any sandboxing line from any unit is caught by one or the other.
//! - `ipu-image-svc image unpack` of an image whose files belong to other users, with setgid,
//!   file capability and trusted.* attributes, run as root under exactly the bounding set of
//!   its unit (`setpriv`, no new privileges), builds the image with all of that kept; without
//!   any one of the unit's capabilities it fails or loses what that capability keeps.
//! - scripts/package.sh refuses to package an ipu-image-svc built with the test-only
//!   `failpoints` feature unless told it is a test package (`--allow-failpoints`).
//! - The packages, built from this build's binaries, install with `dpkg -i` into a fresh
//!   Debian minbase root (debootstrap, cached under the target directory per dependency set)
//!   holding only their declared dependencies; every binary answers `--version` there, the
//!   units, man pages, completions and examples are where they belong, and the packages purge.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Instant;

use integration_tests::{bin, ext4_stat, fixtures, is_root, run_ok, sha256_hex, with_capabilities};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The target directory this test runs from (`target`), and the profile directory of its
/// binaries (`target/debug`).
fn target_dirs() -> (PathBuf, PathBuf) {
    let exe = std::env::current_exe().unwrap();
    let profile = exe.parent().unwrap().parent().unwrap().to_path_buf();
    (profile.parent().unwrap().to_path_buf(), profile)
}

fn output(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("{cmd:?} does not start: {e}"))
}

fn both(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

// ------------------------------------------------------------------------------------------
// The units.

struct UnitSpec {
    file: &'static str,
    exec_start: &'static str,
    /// `CapabilityBoundingSet=`, exactly.
    capabilities: &'static [&'static str],
    state_directory: &'static str,
    runtime_directory: &'static str,
    /// Further `key=value` lines the unit must have (beyond [`REQUIRED`]).
    required: &'static [&'static str],
    /// systemd-analyze security checks this unit does not pass, on purpose: (check, the
    /// exposure accepted, why).
    accepted: &'static [(&'static str, f64, &'static str)],
}

/// Every unit: what the operable-as-a-service issue asks for.
const REQUIRED: &[&str] = &[
    "Type=exec",
    "Restart=on-failure",
    "ProtectSystem=strict",
    "PrivateTmp=yes",
    "NoNewPrivileges=yes",
];

/// What every daemon gives up, and why.
const ROOT: (&str, f64, &str) = (
    "User=/DynamicUser=",
    0.4,
    "runs as root (with the bounding set below): its state is created by the administration commands run as root",
);
const HOST_ROOT: (&str, f64, &str) = (
    "RootDirectory=/RootImage=",
    0.1,
    "runs from the host's /usr, as installed by the package",
);
const UNIX: (&str, f64, &str) = (
    "RestrictAddressFamilies=~AF_UNIX",
    0.1,
    "serves Unix sockets",
);
const INET: (&str, f64, &str) = (
    "RestrictAddressFamilies=~AF_(INET|INET6)",
    0.3,
    "TCP listeners or clients",
);
const NETWORK: (&str, f64, &str) = ("PrivateNetwork=", 0.5, "reached over the host's network");
const USERS: (&str, f64, &str) = (
    "PrivateUsers=",
    0.2,
    "callers are told apart by their uid (SO_PEERCRED): in a user namespace every other uid would be nobody",
);
const PROC: (&str, f64, &str) = (
    "ProcSubset=",
    0.1,
    "not verified with /proc reduced to processes (the IPU service reads /proc/swaps)",
);

const UNITS: &[UnitSpec] = &[
    UnitSpec {
        file: "keybroker.service",
        exec_start: "/usr/bin/keybroker serve --config /etc/keybroker/keybroker.toml",
        capabilities: &[],
        state_directory: "keybroker",
        runtime_directory: "keybroker",
        required: &[
            "DevicePolicy=closed",
            "DeviceAllow=/dev/tpmrm0 rw",
            "StateDirectoryMode=0700",
        ],
        accepted: &[
            ROOT,
            HOST_ROOT,
            UNIX,
            INET,
            NETWORK,
            USERS,
            PROC,
            (
                "PrivateDevices=",
                0.2,
                "the TPM that may seal the master key (DevicePolicy=closed, /dev/tpmrm0 only)",
            ),
            (
                "DeviceAllow=",
                0.1,
                "/dev/tpmrm0, and char-rtc read-only (ProtectClock=)",
            ),
            (
                "IPAddressDeny=",
                0.2,
                "IPUs, publishers and administrators connect from the deployment's addresses",
            ),
        ],
    },
    UnitSpec {
        file: "ipu-audit.service",
        exec_start: "/usr/bin/audit serve --config /etc/ipu-audit/serve.toml",
        capabilities: &[],
        state_directory: "ipu-audit",
        runtime_directory: "ipu-audit",
        required: &[
            "PrivateDevices=yes",
            "IPAddressDeny=any",
            "IPAddressAllow=localhost",
            "StateDirectoryMode=0700",
        ],
        accepted: &[
            ROOT,
            HOST_ROOT,
            UNIX,
            INET,
            (
                "PrivateNetwork=",
                0.5,
                "metrics_listen on the host's loopback, for the host's Prometheus",
            ),
            USERS,
            PROC,
            ("DeviceAllow=", 0.1, "char-rtc read-only (ProtectClock=)"),
            ("IPAddressDeny=", 0.1, "localhost only (metrics)"),
        ],
    },
    UnitSpec {
        file: "ipu-image-svc.service",
        exec_start: "/usr/bin/ipu-image-svc serve --config /etc/ipu-image-svc/serve.toml",
        capabilities: &["CAP_CHOWN"],
        state_directory: "ipu-image-svc ipu-image-svc/state",
        runtime_directory: "ipu-image-svc",
        required: &[
            "DevicePolicy=closed",
            "DeviceAllow=/dev/tpmrm0 rw",
            "RestrictNamespaces=yes",
            "RestrictSUIDSGID=yes",
            // A host agent of another uid reaches its export sockets in state/exports.
            "StateDirectoryMode=0711",
        ],
        accepted: &[
            ROOT,
            HOST_ROOT,
            UNIX,
            INET,
            NETWORK,
            ("PrivateUsers=", 0.2, "the host agent is told apart by uid"),
            PROC,
            (
                "PrivateDevices=",
                0.2,
                "the TPM it attests with (DevicePolicy=closed, /dev/tpmrm0 only)",
            ),
            (
                "DeviceAllow=",
                0.1,
                "/dev/tpmrm0, and char-rtc read-only (ProtectClock=)",
            ),
            (
                "IPAddressDeny=",
                0.2,
                "the key broker, registries and TCP exports are the deployment's",
            ),
            (
                "CapabilityBoundingSet=~CAP_(CHOWN|FSETID|SETFCAP)",
                0.2,
                "the API and export sockets given to the host agent's uid",
            ),
            (
                "SystemCallFilter=~@privileged",
                0.2,
                "chown of the API and export sockets",
            ),
            (
                "SystemCallFilter=~@resources",
                0.2,
                "not restricted further (not verified)",
            ),
        ],
    },
];

/// Lines whose removal does not weaken the sandbox (so no check needs to notice), and why.
const NOT_SANDBOXING: &[(&str, &str)] = &[
    ("Description", "text"),
    ("Documentation", "text"),
    ("Wants", "ordering and pulling in other units"),
    ("After", "ordering"),
    ("RestartSec", "timing"),
    (
        "RuntimeDirectoryMode",
        "the socket directory's mode: reachable by clients",
    ),
    (
        "SystemCallErrorNumber",
        "how a refused call fails (the default kills: stricter)",
    ),
    (
        "DevicePolicy",
        "closed adds /dev/null and the like to DeviceAllow=: without it, fewer devices",
    ),
    ("DeviceAllow", "without it, fewer devices"),
    ("IPAddressAllow", "without it, fewer addresses"),
    ("WantedBy", "installation"),
];

/// A root for systemd-analyze: the host's units, ours, and our binaries at `/usr/bin` (hard
/// links into the target directory, which holds the root).
struct VerifyRoot {
    dir: tempfile::TempDir,
}

impl VerifyRoot {
    fn new() -> Self {
        let (target, profile) = target_dirs();
        let dir = tempfile::Builder::new()
            .prefix("units-")
            .tempdir_in(&target)
            .unwrap();
        let units = dir.path().join("usr/lib/systemd");
        std::fs::create_dir_all(&units).unwrap();
        run_ok(
            Command::new("cp")
                .args(["-a", "/usr/lib/systemd/system"])
                .arg(&units),
        );
        let usr_bin = dir.path().join("usr/bin");
        std::fs::create_dir_all(&usr_bin).unwrap();
        for b in ["keybroker", "ipu-image-svc", "audit"] {
            let from = bin(b);
            if std::fs::hard_link(&from, usr_bin.join(b)).is_err() {
                std::fs::copy(&from, usr_bin.join(b)).unwrap();
            }
        }
        assert!(profile.join("keybroker").exists());
        let me = Self { dir };
        for u in UNITS {
            me.install(u.file, &std::fs::read_to_string(shipped(u.file)).unwrap());
        }
        me
    }

    fn install(&self, file: &str, text: &str) {
        std::fs::write(
            self.dir.path().join("usr/lib/systemd/system").join(file),
            text,
        )
        .unwrap();
    }

    fn analyze(&self, args: &[&str], unit: &str) -> Output {
        output(
            Command::new("systemd-analyze")
                .args(args)
                .arg(format!("--root={}", self.dir.path().display()))
                .arg(unit),
        )
    }
}

fn shipped(file: &str) -> PathBuf {
    repo().join("dist/systemd").join(file)
}

/// `key=value` lines of a unit file (comments and section headers left out).
fn directives(text: &str) -> Vec<(String, String)> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with('['))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

/// One result of systemd-analyze security: passed (`set`), and the exposure when not.
#[derive(Debug)]
struct Check {
    set: Option<bool>,
    exposure: Option<f64>,
    description: String,
}

/// Everything wrong with `text` as the unit `spec`, installed in `root`: empty when the unit
/// verifies silently, has the required directives and fails no security check it does not
/// accept (nor any accepted one with a higher exposure).
fn problems(root: &VerifyRoot, spec: &UnitSpec, text: &str) -> Vec<String> {
    root.install(spec.file, text);
    let mut problems = Vec::new();

    let verify = root.analyze(&["verify", "--man=no"], spec.file);
    if !verify.status.success() || !text_of_output_is_empty(&verify) {
        problems.push(format!(
            "systemd-analyze verify ({}): {}",
            verify.status,
            both(&verify).trim()
        ));
    }

    let lines = directives(text);
    let values = |key: &str| -> Vec<&str> {
        lines
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .collect()
    };
    let exec_start = format!("ExecStart={}", spec.exec_start);
    let state = format!("StateDirectory={}", spec.state_directory);
    let runtime = format!("RuntimeDirectory={}", spec.runtime_directory);
    for want in REQUIRED
        .iter()
        .copied()
        .chain(spec.required.iter().copied())
        .chain([exec_start.as_str(), state.as_str(), runtime.as_str()])
    {
        let (key, value) = want.split_once('=').unwrap();
        if values(key) != [value] {
            problems.push(format!("{want} missing (has {:?})", values(key)));
        }
    }
    // One line, exactly the documented set: a misspelt name would be dropped by systemd
    // without a word (it keeps the rest).
    let caps = values("CapabilityBoundingSet");
    let have: BTreeSet<&str> = caps
        .first()
        .map(|v| v.split_whitespace().collect())
        .unwrap_or_default();
    let want: BTreeSet<&str> = spec.capabilities.iter().copied().collect();
    if caps.len() != 1 || have != want {
        problems.push(format!(
            "CapabilityBoundingSet= must be one line with exactly {want:?}, is {caps:?}"
        ));
    }

    let security = root.analyze(&["security", "--offline=yes", "--json=short"], spec.file);
    match serde_json::from_slice::<Vec<serde_json::Value>>(&security.stdout) {
        Err(e) => problems.push(format!(
            "systemd-analyze security gave no analysis ({e}): {}",
            both(&security).trim()
        )),
        Ok(checks) => {
            for c in checks {
                let name = c["name"].as_str().unwrap_or_default().to_string();
                let check = Check {
                    set: c["set"].as_bool(),
                    exposure: c["exposure"].as_str().and_then(|e| e.parse().ok()),
                    description: c["description"].as_str().unwrap_or_default().into(),
                };
                if check.set != Some(false) {
                    continue;
                }
                let exposure = check.exposure.unwrap_or(0.0);
                match spec.accepted.iter().find(|(n, _, _)| *n == name) {
                    Some((_, max, _)) if exposure <= *max + 1e-9 => {}
                    Some((_, max, _)) => problems.push(format!(
                        "security: {name}: exposure {exposure} above the accepted {max} ({})",
                        check.description
                    )),
                    None => problems.push(format!(
                        "security: {name} fails: {} (exposure {exposure})",
                        check.description
                    )),
                }
            }
        }
    }
    problems
}

fn text_of_output_is_empty(out: &Output) -> bool {
    out.stdout.is_empty() && out.stderr.is_empty()
}

#[test]
fn the_shipped_units_verify_silently_and_keep_their_sandboxing() {
    let root = VerifyRoot::new();
    let mut all = Vec::new();
    for spec in UNITS {
        let text = std::fs::read_to_string(shipped(spec.file)).unwrap();
        all.extend(
            problems(&root, spec, &text)
                .into_iter()
                .map(|p| format!("{}: {p}", spec.file)),
        );
    }
    assert!(all.is_empty(), "{}", all.join("\n"));
}

/// Each sandboxing line of each unit matters to the checks above: without it, the unit is
/// refused. So are a capability added to a bounding set and a misspelt one.
#[test]
fn removing_any_sandboxing_line_or_widening_the_bounding_set_is_caught() {
    let root = VerifyRoot::new();
    let mut uncaught = Vec::new();
    let mut tried = 0;
    for spec in UNITS {
        let text = std::fs::read_to_string(shipped(spec.file)).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            let Some((key, _)) = line.split_once('=') else {
                continue;
            };
            if line.starts_with('#') || NOT_SANDBOXING.iter().any(|(k, _)| *k == key) {
                continue;
            }
            let mut mutated: Vec<&str> = lines.clone();
            mutated.remove(i);
            tried += 1;
            if problems(&root, spec, &(mutated.join("\n") + "\n")).is_empty() {
                uncaught.push(format!("{}: without `{line}`", spec.file));
            }
        }
        let caps_line = lines
            .iter()
            .find(|l| l.starts_with("CapabilityBoundingSet="))
            .unwrap();
        for changed in [
            format!("{caps_line} CAP_SYS_PTRACE"),
            caps_line.replace("CAP_SYS_ADMIN", "CAP_SYS_ADMINN"),
            "CapabilityBoundingSet=CAP_NET_BIND_SERVICE".to_string(),
        ] {
            if changed == *caps_line {
                continue;
            }
            tried += 1;
            let mutated = text.replacen(caps_line, &changed, 1);
            if problems(&root, spec, &mutated).is_empty() {
                uncaught.push(format!("{}: with `{changed}`", spec.file));
            }
        }
    }
    assert!(tried > 60, "only {tried} mutations");
    assert!(uncaught.is_empty(), "not caught:\n{}", uncaught.join("\n"));
}

// ------------------------------------------------------------------------------------------
// The IPU service's capabilities, at work.

/// One tar member of a test layer.
struct Member<'a> {
    path: &'a str,
    kind: tar::EntryType,
    mode: u32,
    uid: u64,
    gid: u64,
    data: &'a [u8],
    xattrs: &'a [(&'a str, &'a [u8])],
}

fn member<'a>(path: &'a str, kind: tar::EntryType, mode: u32, uid: u64, gid: u64) -> Member<'a> {
    Member {
        path,
        kind,
        mode,
        uid,
        gid,
        data: b"",
        xattrs: &[],
    }
}

fn layer(members: &[Member<'_>]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for m in members {
        if !m.xattrs.is_empty() {
            let records: Vec<(String, &[u8])> = m
                .xattrs
                .iter()
                .map(|(k, v)| (format!("SCHILY.xattr.{k}"), *v))
                .collect();
            b.append_pax_extensions(records.iter().map(|(k, v)| (k.as_str(), *v)))
                .unwrap();
        }
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(m.kind);
        h.set_mode(m.mode);
        h.set_uid(m.uid);
        h.set_gid(m.gid);
        h.set_mtime(1_700_000_000);
        h.set_size(m.data.len() as u64);
        b.append_data(&mut h, m.path, m.data).unwrap();
    }
    b.into_inner().unwrap()
}

fn blob(layout: &Path, bytes: &[u8]) -> (String, usize) {
    let hex = sha256_hex(bytes);
    std::fs::write(layout.join("blobs/sha256").join(&hex), bytes).unwrap();
    (format!("sha256:{hex}"), bytes.len())
}

/// An OCI layout at `dir` with one image of uncompressed `layers` under `tag`; its reference.
fn layout_image(dir: &Path, tag: &str, layers: &[Vec<u8>]) -> String {
    std::fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
    std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    let descriptors: Vec<_> = layers
        .iter()
        .map(|l| {
            let (digest, size) = blob(dir, l);
            serde_json::json!({
                "mediaType": "application/vnd.oci.image.layer.v1.tar",
                "digest": digest, "size": size,
            })
        })
        .collect();
    let config = serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "config": {"Cmd": ["/usr/bin/sg"]},
        "rootfs": {"type": "layers", "diff_ids": descriptors.iter().map(|d| d["digest"].clone()).collect::<Vec<_>>()},
    });
    let (config_digest, config_size) = blob(dir, config.to_string().as_bytes());
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config_size},
        "layers": descriptors,
    });
    let (digest, size) = blob(dir, manifest.to_string().as_bytes());
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": digest, "size": size,
            "annotations": {"org.opencontainers.image.ref.name": tag},
        }],
    });
    std::fs::write(dir.join("index.json"), index.to_string()).unwrap();
    format!("oci:{}:{tag}", dir.display())
}

/// VFS capability data, revision 2: cap_net_raw permitted and effective (what `setcap
/// cap_net_raw+ep` writes).
fn net_raw_file_capability() -> Vec<u8> {
    let mut v = Vec::new();
    for word in [0x0200_0001u32, 1 << 13, 0, 0, 0] {
        v.extend_from_slice(&word.to_le_bytes());
    }
    v
}

/// The image: a home directory and a secret of uid 1000 (0700, 0600), a setgid program of
/// group 1000, a program with a file capability, a file with a trusted.* attribute; a second
/// layer adds a file inside uid 1000's private directory.
fn privileged_image(dir: &Path) -> String {
    use tar::EntryType::{Directory, Regular};
    let cap = net_raw_file_capability();
    let lower = layer(&[
        member("home/", Directory, 0o755, 0, 0),
        member("home/app/", Directory, 0o700, 1000, 1000),
        Member {
            data: b"uid 1000's secret\n",
            ..member("home/app/secret", Regular, 0o600, 1000, 1000)
        },
        member("usr/", Directory, 0o755, 0, 0),
        member("usr/bin/", Directory, 0o755, 0, 0),
        Member {
            data: b"#!/bin/sh\n",
            ..member("usr/bin/sg", Regular, 0o2755, 0, 1000)
        },
        Member {
            data: b"#!/bin/sh\n",
            xattrs: &[("security.capability", &cap)],
            ..member("usr/bin/ping", Regular, 0o755, 0, 0)
        },
        member("etc/", Directory, 0o755, 0, 0),
        Member {
            data: b"x\n",
            xattrs: &[("trusted.ipu", b"kept")],
            ..member("etc/trusted", Regular, 0o644, 0, 0)
        },
    ]);
    let upper = layer(&[Member {
        data: b"added by the second layer\n",
        ..member("home/app/added", Regular, 0o640, 1000, 1000)
    }]);
    layout_image(&dir.join("layout"), "privileged", &[lower, upper])
}

/// `ipu-image-svc image unpack` of `image` as root under a bounding set of only `caps` (and
/// no new privileges, as NoNewPrivileges=): the exit status, its stderr, and the image.
fn unpack_with(caps: &[String], image: &str, d: &Path, name: &str) -> (bool, String, PathBuf) {
    let out_image = d.join(format!("{name}.ext4"));
    let out = output(
        with_capabilities(caps, &bin("ipu-image-svc"))
            .args(["image", "unpack", "--quiet", "--policy"])
            .arg(fixtures().join("policies/policy-accept-anything.json"))
            .arg("--cache")
            .arg(d.join(format!("{name}-cache")))
            .arg("--audit-log")
            .arg(d.join(format!("{name}-audit")))
            .arg("--output")
            .arg(&out_image)
            .arg(image),
    );
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        out_image,
    )
}

/// What the unit's capabilities keep, read back from the built image; empty when all is kept.
fn lost(image: &Path) -> Vec<String> {
    let mut lost = Vec::new();
    let stat = |p: &str| ext4_stat(image, p).unwrap_or_default();
    let owner = |p: &str, uid: u32, gid: u32, mode: &str| {
        let s = stat(p);
        let want = [
            format!("User: {uid:>5}"),
            format!("Group: {gid:>5}"),
            format!("Mode:  {mode}"),
        ];
        want.iter()
            .filter(|w| !s.contains(w.as_str()))
            .map(|w| format!("{p}: not {w}"))
            .collect::<Vec<_>>()
    };
    lost.extend(owner("/home/app", 1000, 1000, "0700"));
    lost.extend(owner("/home/app/secret", 1000, 1000, "0600"));
    lost.extend(owner("/home/app/added", 1000, 1000, "0640"));
    lost.extend(owner("/usr/bin/sg", 0, 1000, "02755"));
    for (path, attr) in [
        ("/usr/bin/ping", "security.capability"),
        ("/etc/trusted", "trusted.ipu"),
    ] {
        let out = output(
            Command::new("debugfs")
                .arg("-R")
                .arg(format!("ea_list {path}"))
                .arg(image),
        );
        if !String::from_utf8_lossy(&out.stdout).contains(attr) {
            lost.push(format!("{path}: no {attr}"));
        }
    }
    lost
}

/// The same paths as [`privileged_image`], owned by root, plain modes, no attributes: what a
/// build that lost everything would give.
fn plain_image(dir: &Path) -> String {
    use tar::EntryType::{Directory, Regular};
    let files = layer(&[
        member("home/", Directory, 0o755, 0, 0),
        member("home/app/", Directory, 0o755, 0, 0),
        Member {
            data: b"x\n",
            ..member("home/app/secret", Regular, 0o644, 0, 0)
        },
        Member {
            data: b"x\n",
            ..member("home/app/added", Regular, 0o644, 0, 0)
        },
        member("usr/", Directory, 0o755, 0, 0),
        member("usr/bin/", Directory, 0o755, 0, 0),
        Member {
            data: b"x\n",
            ..member("usr/bin/sg", Regular, 0o755, 0, 0)
        },
        Member {
            data: b"x\n",
            ..member("usr/bin/ping", Regular, 0o755, 0, 0)
        },
        member("etc/", Directory, 0o755, 0, 0),
        Member {
            data: b"x\n",
            ..member("etc/trusted", Regular, 0o644, 0, 0)
        },
    ]);
    layout_image(&dir.join("plain-layout"), "plain", &[files])
}

/// The image's file system is built in memory and written as blocks: root with an empty
/// bounding set (what the unit's one capability, for the sockets, does not change) builds an
/// image whose owners, setgid bit, file capability and trusted.* attribute are all there.
#[test]
fn image_builds_need_no_capability_and_keep_owners_modes_and_attributes() {
    if !is_root() {
        eprintln!("skipped: the capability runs need root (setpriv)");
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let image = privileged_image(d.path());
    let (ok, stderr, built) = unpack_with(&[], &image, d.path(), "none");
    assert!(ok, "with no capability: {stderr}");
    let kept = lost(&built);
    assert!(kept.is_empty(), "with no capability: {kept:?}");
    let fsck = output(Command::new("e2fsck").arg("-fn").arg(&built));
    assert!(fsck.status.success(), "{fsck:?}");

    // Control: the check sees each of them missing from an image that lacks them.
    let plain = plain_image(d.path());
    let (ok, stderr, built) = unpack_with(&[], &plain, d.path(), "plain");
    assert!(ok, "{stderr}");
    let missing = lost(&built);
    for path in [
        "/home/app:",
        "/home/app/secret:",
        "/home/app/added:",
        "/usr/bin/sg:",
        "/usr/bin/ping: no security.capability",
        "/etc/trusted: no trusted.ipu",
    ] {
        assert!(
            missing.iter().any(|m| m.starts_with(path)),
            "{path} not reported in {missing:?}"
        );
    }
}

// ------------------------------------------------------------------------------------------
// The packages.

/// Every binary the packages install, with its package.
const BINARIES: &[(&str, &str)] = &[
    ("keybroker", "keybroker"),
    ("ipu-image-svc", "ipu-image-svc"),
    ("audit", "ipu-audit"),
    ("host-attach", "host-attach"),
    ("ipu-decrypt-hook", "host-attach"),
    ("policy", "ipu-policy"),
    ("ocipub", "ocipub"),
];

/// The Debian release of this host (the binaries are built against its libraries).
fn host_codename() -> String {
    let os = std::fs::read_to_string("/etc/os-release").unwrap();
    os.lines()
        .find_map(|l| l.strip_prefix("VERSION_CODENAME="))
        .map(|s| s.trim_matches('"').to_string())
        .expect("VERSION_CODENAME in /etc/os-release")
}

/// A tarball of a Debian minbase root of this host's release with `packages` installed:
/// made once with debootstrap, then kept under the target directory by its package list.
fn minbase(target: &Path, packages: &BTreeSet<String>) -> PathBuf {
    let codename = host_codename();
    let list = packages.iter().cloned().collect::<Vec<_>>().join(",");
    let key = &sha256_hex(format!("{codename} minbase {list}").as_bytes())[..16];
    let cache = target.join("pkgtest-cache");
    std::fs::create_dir_all(&cache).unwrap();
    let tarball = cache.join(format!("{codename}-minbase-{key}.tar.gz"));
    if tarball.exists() {
        return tarball;
    }
    let mirror = std::env::var("DEBIAN_MIRROR")
        .unwrap_or_else(|_| "http://deb.debian.org/debian".to_string());
    let work = tempfile::Builder::new()
        .prefix("debootstrap-")
        .tempdir_in(&cache)
        .unwrap();
    let root = work.path().join("root");
    let started = Instant::now();
    let out = output(
        Command::new("debootstrap")
            .args(["--variant=minbase", &format!("--include={list}"), &codename])
            .arg(&root)
            .arg(&mirror),
    );
    assert!(
        out.status.success(),
        "debootstrap {codename} from {mirror} failed (network?):\n{}",
        both(&out)
    );
    // Package files and lists are not needed to install .deb files with dpkg.
    for dir in ["var/cache/apt/archives", "var/lib/apt/lists"] {
        for e in std::fs::read_dir(root.join(dir)).unwrap().flatten() {
            if e.file_type().unwrap().is_file() {
                std::fs::remove_file(e.path()).unwrap();
            }
        }
    }
    let partial = work.path().join("root.tar.gz");
    run_ok(
        Command::new("tar")
            .arg("--use-compress-program=gzip -1")
            .arg("-C")
            .arg(&root)
            .arg("-cf")
            .arg(&partial)
            .arg("."),
    );
    std::fs::rename(&partial, &tarball).unwrap();
    // One root is kept: the one for the packages' current dependencies.
    for e in std::fs::read_dir(&cache).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.ends_with(".tar.gz") && e.path() != tarball {
            let _ = std::fs::remove_file(e.path());
        }
    }
    eprintln!(
        "debootstrap {codename} minbase with {list}: {:?}",
        started.elapsed()
    );
    tarball
}

fn chroot(root: &Path, args: &[&str]) -> Output {
    output(
        Command::new("chroot")
            .arg(root)
            .args(args)
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("LC_ALL", "C"),
    )
}

fn deb_field(deb: &Path, field: &str) -> String {
    let out = output(Command::new("dpkg-deb").arg("-f").arg(deb).arg(field));
    assert!(out.status.success(), "{}", both(&out));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn the_packages_install_into_a_fresh_debian_root_and_every_binary_runs() {
    if !is_root() {
        eprintln!("skipped: installing into a chroot needs root");
        return;
    }
    let started = Instant::now();
    let (target, profile) = target_dirs();
    // The binaries this test packages are this build's (test.sh builds them all first).
    for (b, _) in BINARIES {
        bin(b);
    }
    bin("xtask");
    let cargo_profile = match profile.file_name().unwrap().to_str().unwrap() {
        "debug" => "dev".to_string(),
        other => other.to_string(),
    };
    let work = tempfile::Builder::new()
        .prefix("pkgtest-")
        .tempdir_in(&target)
        .unwrap();
    let debs = work.path().join("debs");
    let package = |extra: &[&str]| {
        output(
            Command::new("bash")
                .arg(repo().join("scripts/package.sh"))
                .args(["--profile", &cargo_profile, "--no-build", "--fast"])
                .args(extra)
                .arg("--output")
                .arg(&debs)
                .env("CARGO_TARGET_DIR", &target),
        )
    };
    // This build's ipu-image-svc has the integration tests' fail points compiled in (the
    // workspace build unifies the feature): the script refuses to package it unless told
    // it is a test package.
    let out = package(&[]);
    assert!(
        !out.status.success() && both(&out).contains("test-only failpoints feature"),
        "scripts/package.sh packaged a failpoints build:\n{}",
        both(&out)
    );
    assert!(!debs.exists(), "packages written before the refusal");
    let out = package(&["--allow-failpoints"]);
    assert!(out.status.success(), "scripts/package.sh:\n{}", both(&out));
    let packaged = started.elapsed();

    // What the packages say they need from Debian.
    let mut ours = BTreeMap::new();
    let mut needs = BTreeSet::new();
    for e in std::fs::read_dir(&debs).unwrap().flatten() {
        let deb = e.path();
        ours.insert(deb_field(&deb, "Package"), deb.clone());
        for dep in deb_field(&deb, "Depends").split(',') {
            // `libc6 (>= 2.34)`; no alternatives are used.
            let name = dep.split_whitespace().next().unwrap_or_default();
            assert!(!dep.contains('|'), "an alternative: {dep}");
            if !name.is_empty() {
                needs.insert(name.to_string());
            }
        }
    }
    let want: BTreeSet<&str> = BINARIES.iter().map(|(_, p)| *p).collect();
    assert_eq!(
        ours.keys().map(String::as_str).collect::<BTreeSet<_>>(),
        want,
        "one package per daemon or tool"
    );
    for p in ours.keys() {
        needs.remove(p);
    }

    let tarball = minbase(&target, &needs);
    let root = work.path().join("root");
    std::fs::create_dir_all(&root).unwrap();
    run_ok(
        Command::new("tar")
            .arg("-xzf")
            .arg(&tarball)
            .arg("-C")
            .arg(&root),
    );
    let rooted = started.elapsed();
    std::fs::create_dir_all(root.join("tmp/debs")).unwrap();
    let mut inside = Vec::new();
    for deb in ours.values() {
        let file = deb.file_name().unwrap().to_str().unwrap().to_string();
        std::fs::copy(deb, root.join("tmp/debs").join(&file)).unwrap();
        inside.push(format!("/tmp/debs/{file}"));
    }
    let mut install = vec!["dpkg", "-i"];
    install.extend(inside.iter().map(String::as_str));
    let out = chroot(&root, &install);
    assert!(
        out.status.success(),
        "dpkg -i in the chroot:\n{}",
        both(&out)
    );

    // Every binary runs there, with only the declared dependencies installed.
    let version = env!("CARGO_PKG_VERSION");
    for (b, _) in BINARIES {
        let out = chroot(&root, &[&format!("/usr/bin/{b}"), "--version"]);
        assert!(out.status.success(), "{b} --version:\n{}", both(&out));
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            format!("{b} {version}")
        );
        for file in [
            format!("usr/share/man/man1/{b}.1.gz"),
            format!("usr/share/bash-completion/completions/{b}"),
            format!("usr/share/zsh/vendor-completions/_{b}"),
            format!("usr/share/fish/vendor_completions.d/{b}.fish"),
        ] {
            assert!(root.join(&file).exists(), "{file} not installed");
        }
    }
    // Subcommands have pages of their own.
    for page in [
        "keybroker-serve",
        "ipu-image-svc-serve",
        "audit-serve",
        "host-attach-run",
        "policy-grant-issue",
        "ocipub-sign",
    ] {
        assert!(
            root.join(format!("usr/share/man/man1/{page}.1.gz"))
                .exists(),
            "{page}.1 not installed"
        );
    }
    for u in UNITS {
        let installed = root.join("usr/lib/systemd/system").join(u.file);
        assert_eq!(
            std::fs::read(&installed).unwrap_or_default(),
            std::fs::read(shipped(u.file)).unwrap(),
            "{} installed as shipped",
            u.file
        );
        // Installed, not enabled: each daemon needs its configuration first.
        let wants = root
            .join("etc/systemd/system/multi-user.target.wants")
            .join(u.file);
        assert!(!wants.exists(), "{} enabled at install", u.file);
    }
    for example in [
        "usr/share/doc/keybroker/examples/keybroker.toml",
        "usr/share/doc/ipu-image-svc/examples/serve.toml",
        "usr/share/doc/ipu-audit/examples/serve.toml",
        "usr/share/doc/ipu-policy/examples/deployment.toml",
    ] {
        assert!(root.join(example).exists(), "{example} not installed");
    }

    // And they go away again.
    let mut purge = vec!["dpkg", "--purge"];
    purge.extend(ours.keys().map(String::as_str));
    let out = chroot(&root, &purge);
    assert!(out.status.success(), "dpkg --purge:\n{}", both(&out));
    for (b, _) in BINARIES {
        assert!(!root.join("usr/bin").join(b).exists(), "{b} left behind");
    }
    eprintln!(
        "packages built in {packaged:?}, root ready at {rooted:?}, all done in {:?}",
        started.elapsed()
    );
}
