//! The production store: PostgreSQL, shared by every broker replica.
//!
//! - Schema changes are numbered migrations ([`MIGRATIONS`]), recorded in
//!   `schema_migrations`; `keybroker db migrate` applies the missing ones (under an advisory
//!   lock, each in its transaction), and a broker refuses to start on a schema older or
//!   newer than the one it was built for.
//! - A nonce is consumed by `DELETE ... RETURNING`: one replica's delete wins, every other
//!   (concurrent or later) finds nothing.
//! - The running policy bundle is one row, replaced only by compare-and-set on its version.
//! - Times are the database's (`now()`), so replicas' clocks do not matter.
//!
//! - Expired nonces and sessions are swept at most once per [`SWEEP_EVERY`] per replica
//!   (reads ignore expired rows), not by every insert.
//! - Writes that lose nothing but an attestation when lost in a crash of the database
//!   (issuing a nonce, opening a session: the IPU attests again) commit without waiting for
//!   the WAL flush (connections of their own, `synchronous_commit = off`); consuming a
//!   nonce, revocations and every administrative write wait for it.
//!
//! Connections: two bounded pools of synchronous clients (the broker's calls run on blocking
//! threads; [`POOL`] connections for reads and durable writes, [`POOL_UNFLUSHED`] for the
//! rest), each connection with its prepared statements (one round trip per statement after
//! the first use); a connection that failed is dropped and the next call opens a new one,
//! so the broker recovers by itself when the database is back. No TLS: the database is reached
//! over a Unix socket or loopback (see docs/operations.md).

use std::collections::HashMap;
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant, SystemTime};

use postgres::types::ToSql;
use postgres::{Client, Config, NoTls, Row, Statement};

use super::{SessionRecord, Store, StoreError};

/// The schema, one migration per version, applied in order and never edited once released.
pub const MIGRATIONS: &[(i32, &str, &str)] = &[(
    1,
    "broker state: KEK records, enrollments, policy bundle, nonces, sessions",
    "CREATE TABLE kek_records (
         key_id text NOT NULL,
         version integer NOT NULL,
         record bytea NOT NULL,
         PRIMARY KEY (key_id, version)
     );
     CREATE TABLE ipu_enrollments (
         ipu_id text PRIMARY KEY,
         record bytea NOT NULL
     );
     CREATE TABLE policy_bundle (
         singleton boolean PRIMARY KEY DEFAULT true CHECK (singleton),
         version bigint NOT NULL,
         bundle bytea NOT NULL,
         installed timestamptz NOT NULL DEFAULT now()
     );
     CREATE TABLE attestation_nonces (
         nonce_sha256 bytea PRIMARY KEY,
         expires timestamptz NOT NULL
     );
     CREATE INDEX attestation_nonces_expires ON attestation_nonces (expires);
     CREATE TABLE sessions (
         id text PRIMARY KEY,
         ipu_id text NOT NULL,
         ipu_class text NOT NULL,
         client text NOT NULL,
         session_public bytea NOT NULL,
         binding_salt bytea NOT NULL,
         expires timestamptz NOT NULL
     );
     CREATE INDEX sessions_ipu_id ON sessions (ipu_id);
     CREATE INDEX sessions_expires ON sessions (expires);",
)];

/// The schema version this broker was built for.
pub fn schema_version() -> i32 {
    MIGRATIONS.last().map(|m| m.0).unwrap_or(0)
}

/// An arbitrary constant: the advisory lock `keybroker db migrate` holds.
const MIGRATION_LOCK: i64 = 0x6b65_7962_726f_6b72;

/// The most connections one replica opens for reads and durable writes; a call finding
/// them all busy waits for one (at most [`POOL_WAIT`]).
pub const POOL: usize = 32;

/// The most connections one replica opens for writes that need not wait for the disk.
pub const POOL_UNFLUSHED: usize = 16;

/// How long a call waits for a connection when all are busy: then it fails (unavailable).
const POOL_WAIT: Duration = Duration::from_secs(5);

/// How often one replica sweeps expired nonces and sessions.
pub const SWEEP_EVERY: Duration = Duration::from_secs(5);

/// A pooled connection and the statements prepared on it.
struct Conn {
    client: Client,
    statements: HashMap<&'static str, Statement>,
}

impl Conn {
    fn prepared(&mut self, sql: &'static str) -> Result<Statement, postgres::Error> {
        if let Some(s) = self.statements.get(sql) {
            return Ok(s.clone());
        }
        let s = self.client.prepare(sql)?;
        self.statements.insert(sql, s.clone());
        Ok(s)
    }

    fn execute(
        &mut self,
        sql: &'static str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<u64, postgres::Error> {
        let s = self.prepared(sql)?;
        self.client.execute(&s, params)
    }

    fn query(
        &mut self,
        sql: &'static str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Vec<Row>, postgres::Error> {
        let s = self.prepared(sql)?;
        self.client.query(&s, params)
    }

    fn query_opt(
        &mut self,
        sql: &'static str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Option<Row>, postgres::Error> {
        let s = self.prepared(sql)?;
        self.client.query_opt(&s, params)
    }

    fn query_one(
        &mut self,
        sql: &'static str,
        params: &[&(dyn ToSql + Sync)],
    ) -> Result<Row, postgres::Error> {
        let s = self.prepared(sql)?;
        self.client.query_one(&s, params)
    }
}

/// Connections to one database with one configuration, at most `max` open at a time.
struct Pool {
    config: Config,
    max: usize,
    state: Mutex<PoolState>,
    freed: Condvar,
}

struct PoolState {
    idle: Vec<Conn>,
    /// Open connections: idle ones and those in use.
    open: usize,
}

impl Pool {
    fn new(config: Config, max: usize) -> Self {
        Self {
            config,
            max,
            state: Mutex::new(PoolState {
                idle: Vec::new(),
                open: 0,
            }),
            freed: Condvar::new(),
        }
    }

    /// An idle connection, or a new one while fewer than `max` are open, or the first one
    /// given back within [`POOL_WAIT`].
    fn take(&self, operation: &'static str) -> Result<Conn, StoreError> {
        let deadline = Instant::now() + POOL_WAIT;
        let mut state = self.state.lock().expect("not poisoned");
        loop {
            while let Some(c) = state.idle.pop() {
                if !c.client.is_closed() {
                    return Ok(c);
                }
                state.open -= 1;
            }
            if state.open < self.max {
                state.open += 1;
                drop(state);
                return match self.config.connect(NoTls) {
                    Ok(client) => Ok(Conn {
                        client,
                        statements: HashMap::new(),
                    }),
                    Err(e) => {
                        self.gone(1);
                        Err(err(operation)(e))
                    }
                };
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(StoreError::new(
                    "postgres",
                    operation,
                    format!(
                        "all {} connections of this replica stayed busy for {} s",
                        self.max,
                        POOL_WAIT.as_secs()
                    ),
                ));
            }
            state = self
                .freed
                .wait_timeout(state, deadline - now)
                .expect("not poisoned")
                .0;
        }
    }

    /// A connection back after use (a closed one is dropped).
    fn put(&self, conn: Conn) {
        let mut state = self.state.lock().expect("not poisoned");
        if conn.client.is_closed() {
            state.open -= 1;
        } else {
            state.idle.push(conn);
        }
        self.freed.notify_one();
    }

    /// `n` connections in use are gone (dropped after a failure).
    fn gone(&self, n: usize) {
        let mut state = self.state.lock().expect("not poisoned");
        state.open -= n;
        self.freed.notify_all();
    }

    /// Drops every idle connection (the server went away: they are dead too).
    fn clear(&self) {
        let mut state = self.state.lock().expect("not poisoned");
        let n = state.idle.len();
        state.idle.clear();
        state.open -= n;
        self.freed.notify_all();
    }
}

impl Drop for Pool {
    /// Closing a connection blocks on its own small runtime, which panics on a thread that
    /// drives asynchronous tasks (a broker is dropped on one when `keybroker serve` stops):
    /// the idle connections are closed on a thread of their own.
    fn drop(&mut self) {
        let idle = std::mem::take(&mut self.state.get_mut().expect("not poisoned").idle);
        if !idle.is_empty() {
            let _ = std::thread::spawn(move || drop(idle)).join();
        }
    }
}

pub struct PgStore {
    pool: Pool,
    /// Connections whose commits do not wait for the WAL to reach the disk
    /// (`synchronous_commit = off`): for writes whose loss in a crash of the database
    /// costs an attestation, nothing else.
    unflushed: Pool,
    /// When this replica last swept expired nonces, and sessions.
    swept: Mutex<[Option<Instant>; 2]>,
}

fn err(operation: &'static str) -> impl Fn(postgres::Error) -> StoreError {
    // The database's own message (e.g. "connection refused", "relation ... does not exist").
    move |e| {
        let message = match e.as_db_error() {
            Some(db) => db.to_string(),
            None => e.to_string(),
        };
        StoreError::new("postgres", operation, message)
    }
}

impl PgStore {
    /// A store on the database a connection string names (checked by connecting once).
    pub fn connect(url: &str) -> Result<Self, StoreError> {
        let mut config: Config = url
            .parse()
            .map_err(|e| StoreError::new("postgres", "parse the connection string", e))?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(5));
        }
        if config.get_application_name().is_none() {
            config.application_name("keybroker");
        }
        let mut unflushed = config.clone();
        let options = match config.get_options() {
            Some(o) => format!("{o} -c synchronous_commit=off"),
            None => "-c synchronous_commit=off".to_string(),
        };
        unflushed.options(&options);
        let store = Self {
            pool: Pool::new(config, POOL),
            unflushed: Pool::new(unflushed, POOL_UNFLUSHED),
            swept: Mutex::new([None, None]),
        };
        let conn = store.pool.take("connect")?;
        store.pool.put(conn);
        Ok(store)
    }

    /// Runs `f` on a pooled connection; a connection whose call failed is not reused.
    fn with<T>(
        &self,
        operation: &'static str,
        f: impl FnMut(&mut Conn) -> Result<T, postgres::Error>,
    ) -> Result<T, StoreError> {
        self.on(operation, false, f)
    }

    /// As [`PgStore::with`], on a connection whose commits do not wait for the disk.
    fn with_unflushed<T>(
        &self,
        operation: &'static str,
        f: impl FnMut(&mut Conn) -> Result<T, postgres::Error>,
    ) -> Result<T, StoreError> {
        self.on(operation, true, f)
    }

    fn on<T>(
        &self,
        operation: &'static str,
        unflushed: bool,
        f: impl FnMut(&mut Conn) -> Result<T, postgres::Error>,
    ) -> Result<T, StoreError> {
        let pool = if unflushed {
            &self.unflushed
        } else {
            &self.pool
        };
        let mut f = f;
        let mut retried = false;
        loop {
            let mut conn = pool.take(operation)?;
            let e = match f(&mut conn) {
                Ok(t) => {
                    pool.put(conn);
                    return Ok(t);
                }
                Err(e) => e,
            };
            // The server ended the connection (FATAL: it is shutting down or restarted, or
            // an administrator terminated the session), or it is gone: every idle connection
            // is likely as dead, so all are dropped and the next call connects afresh.
            let ended = e
                .as_db_error()
                .is_some_and(|d| matches!(d.severity(), "FATAL" | "PANIC"));
            if e.as_db_error().is_none() || ended || conn.client.is_closed() {
                drop(conn);
                pool.gone(1);
                self.pool.clear();
                self.unflushed.clear();
                // A connection the server ended rolled back what it was doing: the call
                // is tried once more, on a new connection (a database that restarted
                // while this connection sat idle costs nothing). A connection lost without
                // a word may have committed: never tried again.
                if ended && !retried {
                    retried = true;
                    continue;
                }
            } else {
                // A refusal of the database's: the connection is still usable (its
                // prepared statements are forgotten: a schema change may have made them
                // stale).
                conn.statements.clear();
                pool.put(conn);
            }
            return Err(err(operation)(e));
        }
    }

    /// The schema version applied (0: none).
    pub fn applied_version(&self) -> Result<i32, StoreError> {
        self.with("read the schema version", |c| {
            let exists: bool = c
                .query_one("SELECT to_regclass('schema_migrations') IS NOT NULL", &[])?
                .get(0);
            if !exists {
                return Ok(0);
            }
            c.query_one(
                "SELECT coalesce(max(version), 0) FROM schema_migrations",
                &[],
            )
            .map(|r| r.get(0))
        })
    }

    /// Applies the missing migrations; returns the versions applied now.
    pub fn migrate(&self) -> Result<Vec<i32>, StoreError> {
        self.with("migrate the schema", |c| {
            let mut tx = c.client.transaction()?;
            tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])?;
            tx.batch_execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations (
                     version integer PRIMARY KEY,
                     description text NOT NULL,
                     applied timestamptz NOT NULL DEFAULT now()
                 )",
            )?;
            let applied: i32 = tx
                .query_one(
                    "SELECT coalesce(max(version), 0) FROM schema_migrations",
                    &[],
                )?
                .get(0);
            let mut now = Vec::new();
            for (version, description, sql) in MIGRATIONS {
                if *version <= applied {
                    continue;
                }
                tx.batch_execute(sql)?;
                tx.execute(
                    "INSERT INTO schema_migrations (version, description) VALUES ($1, $2)",
                    &[version, description],
                )?;
                now.push(*version);
            }
            tx.commit()?;
            Ok(now)
        })
    }

    /// Refuses a schema this broker was not built for (not migrated yet, or newer).
    pub fn check_schema(&self) -> Result<(), StoreError> {
        let applied = self.applied_version()?;
        let want = schema_version();
        let problem = if applied == 0 {
            "the database has no broker schema: run `keybroker db migrate --store URL` first"
                .to_string()
        } else if applied < want {
            format!(
                "the schema is at version {applied}, this broker needs {want}: run `keybroker db migrate --store URL`"
            )
        } else if applied > want {
            format!(
                "the schema is at version {applied}, newer than this broker knows ({want}): run a newer broker"
            )
        } else {
            return Ok(());
        };
        Err(StoreError::new("postgres", "check the schema", problem))
    }
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

impl PgStore {
    /// Whether this replica should sweep table `which` (0: nonces, 1: sessions) now.
    fn sweep_due(&self, which: usize) -> bool {
        let mut swept = self.swept.lock().expect("not poisoned");
        let due = swept[which].is_none_or(|t| t.elapsed() >= SWEEP_EVERY);
        if due {
            swept[which] = Some(Instant::now());
        }
        due
    }
}

impl Store for PgStore {
    fn kind(&self) -> &'static str {
        "postgres"
    }

    fn insert_key_record(&self, id: &str, version: u32, record: &[u8]) -> Result<bool, StoreError> {
        let version = version as i32;
        self.with("insert a key record", |c| {
            c.execute(
                "INSERT INTO kek_records (key_id, version, record) VALUES ($1, $2, $3)
                 ON CONFLICT DO NOTHING",
                &[&id, &version, &record],
            )
            .map(|n| n == 1)
        })
    }

    fn replace_key_record(&self, id: &str, version: u32, record: &[u8]) -> Result<(), StoreError> {
        let version = version as i32;
        let n = self.with("replace a key record", |c| {
            c.execute(
                "UPDATE kek_records SET record = $3 WHERE key_id = $1 AND version = $2",
                &[&id, &version, &record],
            )
        })?;
        if n != 1 {
            return Err(StoreError::new(
                "postgres",
                "replace a key record",
                format!("no record {id} version {version}"),
            ));
        }
        Ok(())
    }

    fn key_record(&self, id: &str, version: u32) -> Result<Option<Vec<u8>>, StoreError> {
        let version = version as i32;
        self.with("read a key record", |c| {
            c.query_opt(
                "SELECT record FROM kek_records WHERE key_id = $1 AND version = $2",
                &[&id, &version],
            )
            .map(|r| r.map(|r| r.get(0)))
        })
    }

    fn key_records(&self, id: &str) -> Result<Vec<Vec<u8>>, StoreError> {
        self.with("read key records", |c| {
            c.query(
                "SELECT record FROM kek_records WHERE key_id = $1 ORDER BY version",
                &[&id],
            )
            .map(|rows| rows.iter().map(|r| r.get(0)).collect())
        })
    }

    fn all_key_records(&self) -> Result<Vec<Vec<u8>>, StoreError> {
        self.with("list key records", |c| {
            c.query(
                "SELECT record FROM kek_records ORDER BY key_id COLLATE \"C\", version",
                &[],
            )
            .map(|rows| rows.iter().map(|r| r.get(0)).collect())
        })
    }

    fn put_enrollment(&self, ipu_id: &str, record: &[u8]) -> Result<(), StoreError> {
        self.with("write an enrollment", |c| {
            c.execute(
                "INSERT INTO ipu_enrollments (ipu_id, record) VALUES ($1, $2)
                 ON CONFLICT (ipu_id) DO UPDATE SET record = excluded.record",
                &[&ipu_id, &record],
            )
        })?;
        Ok(())
    }

    fn enrollment(&self, ipu_id: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.with("read an enrollment", |c| {
            c.query_opt(
                "SELECT record FROM ipu_enrollments WHERE ipu_id = $1",
                &[&ipu_id],
            )
            .map(|r| r.map(|r| r.get(0)))
        })
    }

    fn enrollments(&self) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        self.with("list enrollments", |c| {
            c.query(
                "SELECT ipu_id, record FROM ipu_enrollments ORDER BY ipu_id COLLATE \"C\"",
                &[],
            )
            .map(|rows| rows.iter().map(|r| (r.get(0), r.get(1))).collect())
        })
    }

    fn running_bundle(&self) -> Result<Option<Vec<u8>>, StoreError> {
        self.with("read the running policy bundle", |c| {
            c.query_opt("SELECT bundle FROM policy_bundle", &[])
                .map(|r| r.map(|r| r.get(0)))
        })
    }

    fn running_bundle_version(&self) -> Result<Option<u64>, StoreError> {
        self.with("read the running policy version", |c| {
            c.query_opt("SELECT version FROM policy_bundle", &[])
                .map(|r| r.map(|r| r.get::<_, i64>(0) as u64))
        })
    }

    fn install_bundle(
        &self,
        expected: Option<u64>,
        version: u64,
        bytes: &[u8],
    ) -> Result<bool, StoreError> {
        let new = i64::try_from(version).map_err(|_| {
            StoreError::new(
                "postgres",
                "install a policy bundle",
                format!("version {version} does not fit a bigint"),
            )
        })?;
        self.with("install a policy bundle", |c| {
            let n = match expected {
                // Only the first bundle ever: a concurrent first install conflicts.
                None => c.execute(
                    "INSERT INTO policy_bundle (version, bundle) VALUES ($1, $2)
                     ON CONFLICT DO NOTHING",
                    &[&new, &bytes],
                )?,
                Some(old) => c.execute(
                    "UPDATE policy_bundle SET version = $2, bundle = $3, installed = now()
                     WHERE version = $1",
                    &[&(old as i64), &new, &bytes],
                )?,
            };
            Ok(n == 1)
        })
    }

    fn issue_nonce(&self, nonce_hash: &[u8; 32], lifetime: Duration) -> Result<(), StoreError> {
        let hash = nonce_hash.as_slice();
        let sweep = self.sweep_due(0);
        self.with_unflushed("issue a nonce", |c| {
            // Expired nonces are swept now and then as new ones are issued.
            if sweep {
                c.execute("DELETE FROM attestation_nonces WHERE expires <= now()", &[])?;
            }
            // Lost in a crash of the database, the nonce is unknown: the attestation fails
            // and the IPU asks for another. Never a nonce accepted twice.
            c.execute(
                "INSERT INTO attestation_nonces (nonce_sha256, expires)
                 VALUES ($1, now() + $2 * interval '1 second')",
                &[&hash, &secs(lifetime)],
            )
        })?;
        Ok(())
    }

    fn consume_nonce(&self, nonce_hash: &[u8; 32]) -> Result<bool, StoreError> {
        let hash = nonce_hash.as_slice();
        self.with("consume a nonce", |c| {
            c.query_opt(
                "DELETE FROM attestation_nonces WHERE nonce_sha256 = $1
                 RETURNING expires > now()",
                &[&hash],
            )
            .map(|r| r.is_some_and(|r| r.get::<_, bool>(0)))
        })
    }

    fn put_session(&self, s: &SessionRecord) -> Result<(), StoreError> {
        let ttl = secs(
            s.expires
                .duration_since(SystemTime::now())
                .unwrap_or_default(),
        );
        let salt = s.salt.as_slice();
        let sweep = self.sweep_due(1);
        self.with_unflushed("open a session", |c| {
            if sweep {
                c.execute("DELETE FROM sessions WHERE expires <= now()", &[])?;
            }
            // Lost in a crash of the database, the session is unknown to every replica: the
            // IPU attests again.
            c.execute(
                "INSERT INTO sessions
                     (id, ipu_id, ipu_class, client, session_public, binding_salt, expires)
                 VALUES ($1, $2, $3, $4, $5, $6, now() + $7 * interval '1 second')",
                &[
                    &s.id,
                    &s.ipu_id,
                    &s.ipu_class,
                    &s.client,
                    &s.session_public,
                    &salt,
                    &ttl,
                ],
            )
        })?;
        Ok(())
    }

    fn session(&self, id: &str) -> Result<Option<SessionRecord>, StoreError> {
        let row = self.with("read a session", |c| {
            c.query_opt(
                "SELECT id, ipu_id, ipu_class, client, session_public, binding_salt,
                        extract(epoch FROM expires - now())::float8
                 FROM sessions WHERE id = $1 AND expires > now()",
                &[&id],
            )
        })?;
        let Some(r) = row else { return Ok(None) };
        let salt: Vec<u8> = r.get(5);
        let salt: [u8; 32] = salt.try_into().map_err(|_| {
            StoreError::new("postgres", "read a session", "binding salt is not 32 bytes")
        })?;
        let left: f64 = r.get(6);
        Ok(Some(SessionRecord {
            id: r.get(0),
            ipu_id: r.get(1),
            ipu_class: r.get(2),
            client: r.get(3),
            session_public: r.get(4),
            salt,
            expires: SystemTime::now() + Duration::from_secs_f64(left.max(0.0)),
        }))
    }

    fn end_sessions_of(&self, ipu_id: &str) -> Result<(), StoreError> {
        self.with("end an IPU's sessions", |c| {
            c.execute("DELETE FROM sessions WHERE ipu_id = $1", &[&ipu_id])
        })?;
        Ok(())
    }
}
