//! A throwaway PostgreSQL cluster from Debian's packages, for the key broker's store tests:
//! `initdb` (as the `postgres` user) into a temporary directory it owns, `pg_ctl start`
//! listening on a Unix socket in that directory and on 127.0.0.1 only (a free port), trust
//! authentication (nothing else can reach it); stopped and removed on drop.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub struct Postgres {
    dir: tempfile::TempDir,
    bin: PathBuf,
    pub port: u16,
    /// Whether commits wait for the disk (off in the tests: `-F`).
    fsync: bool,
    /// More server settings (`-c name=value ...`).
    extra: String,
}

/// The newest `/usr/lib/postgresql/N/bin`.
fn bin_dir() -> PathBuf {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL is not installed: run scripts/setup.sh")
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse().ok()?;
            Some((v, e.path().join("bin")))
        })
        .filter(|(_, b)| b.join("initdb").exists())
        .collect();
    versions.sort();
    versions
        .pop()
        .expect("no PostgreSQL server binaries: run scripts/setup.sh")
        .1
}

fn checked(what: &str, out: std::io::Result<Output>) -> Output {
    let out = out.unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what}: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

impl Postgres {
    /// A running cluster (the caller must be root, to act as `postgres`), without fsync
    /// (`-F`): the tests need no durability across a power cut.
    pub fn start() -> Self {
        Self::start_with(false)
    }

    /// A running cluster, with fsync as in production (`true`: commits wait for the WAL
    /// to reach the disk) or off.
    pub fn start_with(fsync: bool) -> Self {
        Self::start_configured(fsync, "")
    }

    /// A running cluster with more server settings (`-c name=value ...`).
    pub fn start_configured(fsync: bool, extra: &str) -> Self {
        let bin = bin_dir();
        let dir = tempfile::Builder::new()
            .prefix("kbpg")
            .tempdir()
            .expect("tempdir");
        let chown = Command::new("chown")
            .arg("postgres:postgres")
            .arg(dir.path())
            .output();
        checked("chown the cluster directory to postgres", chown);
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).unwrap();
        let pg = Self {
            bin,
            port: crate::free_port(),
            dir,
            fsync,
            extra: extra.to_string(),
        };
        let initdb = pg
            .as_postgres("initdb")
            .args(["--auth=trust", "--username=postgres", "--no-sync", "-D"])
            .arg(pg.data())
            .output();
        checked("initdb", initdb);
        pg.start_again();
        pg
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The Unix socket's directory.
    pub fn socket_dir(&self) -> &Path {
        self.dir.path()
    }

    fn as_postgres(&self, tool: &str) -> Command {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(self.bin.join(tool));
        // The server outlives the command: it must hold none of the caller's descriptors.
        crate::inherit_no_fds(&mut c);
        c
    }

    /// Starts the (stopped) cluster and waits until it accepts connections.
    pub fn start_again(&self) {
        let options = format!(
            "-k {} -h 127.0.0.1 -p {}{} -c max_connections=200 {}",
            self.socket_dir().display(),
            self.port,
            if self.fsync { "" } else { " -F" },
            self.extra
        );
        let start = self
            .as_postgres("pg_ctl")
            .arg("-D")
            .arg(self.data())
            .arg("-l")
            .arg(self.dir.path().join("server.log"))
            .args(["-w", "-t", "30", "-o", &options, "start"])
            .output();
        checked("pg_ctl start", start);
    }

    /// The server's processes (the postmaster and its children: backends, WAL writer,
    /// checkpointer, ...), for CPU accounting.
    pub fn pids(&self) -> Vec<u32> {
        let Some(main) = std::fs::read_to_string(self.data().join("postmaster.pid"))
            .ok()
            .and_then(|s| s.lines().next().and_then(|l| l.trim().parse::<u32>().ok()))
        else {
            return Vec::new();
        };
        let mut pids = vec![main];
        for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
                continue;
            };
            let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
                continue;
            };
            // pid (comm) state ppid ...: the command may hold spaces and parentheses.
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|p| p.parse::<u32>().ok());
            if ppid == Some(main) {
                pids.push(pid);
            }
        }
        pids
    }

    /// Stops the cluster (fast shutdown: connections are cut).
    pub fn stop(&self) {
        let stop = self
            .as_postgres("pg_ctl")
            .arg("-D")
            .arg(self.data())
            .args(["-w", "-m", "fast", "stop"])
            .output();
        checked("pg_ctl stop", stop);
    }

    /// Stops the cluster as a crash would (immediate shutdown: no checkpoint, what was not
    /// written to the WAL is lost; the WAL is replayed at the next start).
    pub fn crash(&self) {
        let stop = self
            .as_postgres("pg_ctl")
            .arg("-D")
            .arg(self.data())
            .args(["-w", "-m", "immediate", "stop"])
            .output();
        checked("pg_ctl stop -m immediate", stop);
    }

    /// Creates a database; returns its URL over the Unix socket.
    pub fn create_db(&self, name: &str) -> String {
        let out = Command::new(self.bin.join("createdb"))
            .arg("-h")
            .arg(self.socket_dir())
            .args(["-p", &self.port.to_string(), "-U", "postgres", name])
            .output();
        checked("createdb", out);
        self.url(name)
    }

    /// A database's URL over the Unix socket.
    pub fn url(&self, db: &str) -> String {
        let host = self.socket_dir().display().to_string().replace('/', "%2F");
        format!("postgres://postgres@{host}:{}/{db}", self.port)
    }

    /// A database's URL over loopback TCP.
    pub fn tcp_url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// Runs SQL on a database with `psql`; returns its output.
    pub fn psql(&self, db: &str, sql: &str) -> Vec<u8> {
        let out = Command::new(self.bin.join("psql"))
            .arg("-h")
            .arg(self.socket_dir())
            .args([
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                "-d",
                db,
                "-c",
                sql,
            ])
            .output();
        checked("psql", out).stdout
    }

    /// `pg_dump` of a database (plain SQL, data included).
    pub fn dump(&self, db: &str) -> Vec<u8> {
        let out = Command::new(self.bin.join("pg_dump"))
            .arg("-h")
            .arg(self.socket_dir())
            .args(["-p", &self.port.to_string(), "-U", "postgres", db])
            .output();
        checked("pg_dump", out).stdout
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = self
            .as_postgres("pg_ctl")
            .arg("-D")
            .arg(self.data())
            .args(["-w", "-m", "immediate", "stop"])
            .output();
    }
}
