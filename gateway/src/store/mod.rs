//! The gateway's embedded store: leases, the epoch and the audit trail, in one SQLite database
//! (`fwnp.sqlite3` in the state directory). With `[store] backend = "etcd"` the leases and the
//! epoch live in an etcd cluster shared by several gateways instead ([`EtcdStore`]), and the
//! audit trail stays here.
//!
//! # Writing
//! Every write goes through one writer thread ([`StoreWriter`]) that owns the read-write
//! connection. It takes everything queued since its last transaction and commits it as one
//! transaction (group commit), so that thousands of grants per second cost a handful of
//! commits, not one `fsync` each. Under load ([`StoreWriter::coalesce`]) it waits a little for
//! more before committing a small group, since each commit rewrites the tail pages of the
//! tables and indexes whatever it adds to them. A caller of [`StoreWriter::commit`] is answered
//! once the transaction holding its operations has committed; [`StoreWriter::record`] queues
//! audit rows that need not hold up an answer.
//!
//! # What is durable when
//! The database runs in WAL mode. With `synchronous = normal` (the default), a transaction is
//! written to the WAL file (not yet synced) when `commit` returns: it survives the gateway's
//! process being killed (SIGKILL, a panic, an abort), because the data is in the kernel's page
//! cache, but the last transactions before a power failure or a kernel crash may be lost, since
//! the WAL is synced to disk only at checkpoints. Neither event corrupts the database. With
//! `synchronous = full` ([`Synchronous::Full`]) the WAL is also synced at every commit, so a
//! committed transaction survives power loss too, at the price of one `fsync` per group commit
//! (shared by every job of the group).
//!
//! The gateway answers Granted only after `commit` returns, so with `normal` a Granted lease
//! survives a crash of the gateway. After a power failure a lease granted just before it may be
//! missing from the store: the reconcile at start-up then removes its kernel element (the
//! element's own timeout would close it anyway), and the host, renewing it, is told
//! `unknown-lease` and opens it again, as the protocol prescribes.
//!
//! # Reading
//! Queries use separate read-only connections from a small pool; in WAL mode they never block
//! the writer nor wait for it. They are blocking calls: from async code, call them inside
//! `tokio::task::spawn_blocking`.
//!
//! # Epoch
//! A random non-zero 64-bit number created with the database and kept in its `meta` table.
//! A gateway that starts without its previous database gets a new one ([`Store::is_new_state`]).
//!
//! # Schema versions
//! The `meta` table records the schema version ([`SCHEMA_VERSION`]). A store of an older version
//! is migrated when it is opened, in the transaction that checks it, so a failed migration leaves
//! it as it was; a store of a newer version is refused ([`StoreError::SchemaTooNew`]) rather than
//! misread. Version 2 added each lease's certificate (issuer and serial); version 3 numbers audit
//! events without `AUTOINCREMENT` (still never reusing an id).

mod backend;
mod codec;
mod error;
mod etcd;
mod query;
mod schema;
mod types;
mod writer;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fwnp_proto::{Epoch, LeaseId};
use rusqlite::{Connection, OpenFlags};
use tokio::sync::watch;

pub use backend::{LeaseStore, MemoryStore, StoreQueries, WriteError, WriteFuture};
pub use error::StoreError;
pub use etcd::{
    ClusterChange, ClusterEnd, EtcdCounts, EtcdError, EtcdStore, MAX_BATCH_JOBS, MAX_JOB_LEASE_OPS,
    SETTLE_PAUSE, SILENCE_TIMEOUTS, TOMBSTONE_TTL,
};
pub(crate) use etcd::{connect_client, connect_options, decode_lease};
pub(crate) use query::{page_size, report_from_events};
pub use schema::SCHEMA_VERSION;
pub use types::{
    AuditEvent, AuditKind, AuditPage, AuditQuery, AuditRecord, LeaseEnd, LeaseEnding, LeaseFilter,
    LeaseRecord, LeaseState, NewLease, Order, Outcome, ReportQuery, ReportRow, RequestSummary,
};
pub use writer::{StoreWriter, WriteOp, WriterStats};

/// The database's file name inside the state directory.
pub const DATABASE_FILE: &str = "fwnp.sqlite3";

/// The most audit events one query returns.
pub const MAX_PAGE: usize = 10_000;

/// When SQLite syncs the WAL to disk (see the module documentation for what each means).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Synchronous {
    /// Sync at checkpoints only: commits survive a process crash, not always a power failure.
    #[default]
    Normal,
    /// Sync the WAL at every commit: commits survive a power failure too.
    Full,
}

impl Synchronous {
    fn pragma(self) -> &'static str {
        match self {
            Synchronous::Normal => "NORMAL",
            Synchronous::Full => "FULL",
        }
    }
}

/// How to open the store.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct StoreOptions {
    /// Durability of commits.
    pub synchronous: Synchronous,
    /// How long a connection waits for a lock held by another (an operator's `sqlite3`).
    pub busy_timeout: Duration,
    /// Operations a group commit takes at most (the rest wait for the next one).
    pub max_batch_ops: usize,
    /// Operations that may be queued before [`StoreWriter::record`] refuses more.
    pub max_pending_ops: usize,
    /// Read-only connections kept open for reuse.
    pub read_pool: usize,
    /// The WAL's size in frames (pages) past which it is made to start over, and to which its
    /// file is cut back then (see `WalRestartDue` in the writer's source for why a checkpoint
    /// beside the writer does not).
    pub wal_restart_frames: u32,
    /// How often the checkpoint thread copies the WAL into the database. Each checkpoint
    /// syncs what it copied, and the kernel's writeback of a large one holds up the gateway's
    /// other work, its packets' too: small ones often spread that out (see the default).
    pub checkpoint_interval: Duration,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            synchronous: Synchronous::Normal,
            busy_timeout: Duration::from_secs(5),
            max_batch_ops: 20_000,
            max_pending_ops: 1_000_000,
            read_pool: 4,
            // 64 MiB of 4 KiB pages.
            wal_restart_frames: 16_384,
            // At 1,000 grants a second (`fwnp-load --rate 1000 --netns --baseline`, seven runs
            // of each, in alternating batches): p99 0.82-1.17 ms (median 0.95) every 50 ms,
            // against 1.08-1.47 ms (median 1.16) every 250 ms, and worse still every 1 or 4 s
            // (1.38-1.54 ms; p999 up to 12 ms). Without any checkpoint, 0.69-0.81 ms. The closed
            // loop lost nothing (0.420-0.444 of the baseline against 0.380-0.401, two pairs).
            // An idle gateway's checkpoint finds nothing to copy (SQLite syncs only what it
            // copies).
            checkpoint_interval: Duration::from_millis(50),
        }
    }
}

/// What [`Store::restore`] found at start-up.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Restored {
    /// Leases still live: to be put back in the lease book and the kernel.
    pub live: Vec<LeaseRecord>,
    /// Leases that expired while the gateway was stopped: now recorded as expired.
    pub expired: Vec<LeaseRecord>,
}

/// The store: a handle shared by the daemon's tasks (clones share one database and writer).
/// Dropping the last clone finishes the queued writes and stops the writer thread (it blocks
/// until then, so drop it outside the async runtime's worker threads, or at shutdown).
#[derive(Debug, Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    path: PathBuf,
    epoch: Epoch,
    created_ms: u64,
    new_state: bool,
    options: StoreOptions,
    readers: Mutex<Vec<Connection>>,
    writer: StoreWriter,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// The checkpoint thread: dropping the sender stops it.
    checkpointer: Mutex<Option<(std::sync::mpsc::Sender<()>, std::thread::JoinHandle<()>)>>,
}

/// Runs WAL checkpoints on a connection of its own, so that the writer rarely does: a
/// checkpoint syncs the WAL and the database file (several milliseconds each on a disk), and
/// every grant waiting for the writer's commit would wait for it too. A passive checkpoint
/// runs beside the writer's transactions without blocking them; under sustained writes it
/// never lets the WAL start over: past the limit, this thread asks the writer for one more
/// checkpoint through `restart_due` (see `WalRestartDue`).
fn spawn_checkpointer(
    path: &Path,
    options: &StoreOptions,
    restart_due: writer::WalRestartDue,
) -> Result<(std::sync::mpsc::Sender<()>, std::thread::JoinHandle<()>), StoreError> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(StoreError::sqlite("open checkpoint connection"))?;
    conn.busy_timeout(options.busy_timeout)
        .map_err(StoreError::sqlite("set busy timeout"))?;
    let (restart_frames, interval) = (
        i64::from(options.wal_restart_frames),
        options.checkpoint_interval,
    );
    let (stop, stopped) = std::sync::mpsc::channel::<()>();
    let handle = std::thread::Builder::new()
        .name("fwnp-store-checkpoint".into())
        .spawn(move || {
            while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                stopped.recv_timeout(interval)
            {
                // A busy or failed checkpoint is tried again at the next interval.
                let frames = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |row| {
                    row.get::<_, i64>(1)
                });
                if frames.is_ok_and(|frames| frames > restart_frames) {
                    restart_due.store(true, std::sync::atomic::Ordering::Release);
                }
            }
        })
        .map_err(|source| StoreError::Io {
            op: "start checkpoint thread",
            path: "fwnp-store-checkpoint".into(),
            source,
        })?;
    Ok((stop, handle))
}

impl Drop for Inner {
    fn drop(&mut self) {
        let checkpointer = match self.checkpointer.get_mut() {
            Ok(slot) => slot.take(),
            Err(poisoned) => poisoned.into_inner().take(),
        };
        if let Some((stop, handle)) = checkpointer {
            drop(stop);
            let _ = handle.join();
        }
        self.writer.close();
        let handle = match self.thread.get_mut() {
            Ok(slot) => slot.take(),
            Err(poisoned) => poisoned.into_inner().take(),
        };
        if let Some(handle) = handle {
            // A writer thread that panicked has already failed its callers; nothing to add.
            let _ = handle.join();
        }
    }
}

/// How many leases a start's restore hands over from the thread that reads them at a time, and
/// how many such chunks may wait: a few hundred kilobytes in flight.
const RESTORE_CHUNK: usize = 1024;
const RESTORE_CHUNKS_AHEAD: usize = 4;

impl Store {
    /// Open (or create) the store in `state_dir` with the default options.
    pub fn open(state_dir: impl AsRef<Path>) -> Result<Store, StoreError> {
        Store::open_with(state_dir, StoreOptions::default())
    }

    /// Open (or create) the store in `state_dir`. The directory is created with mode 0700 if
    /// missing, the database file with mode 0600. A database written by a newer schema is
    /// refused with [`StoreError::SchemaTooNew`].
    pub fn open_with(
        state_dir: impl AsRef<Path>,
        options: StoreOptions,
    ) -> Result<Store, StoreError> {
        let dir = state_dir.as_ref();
        create_private_dir(dir)?;
        let path = dir.join(DATABASE_FILE);
        create_private_file(&path)?;
        let mut conn = Connection::open_with_flags(
            &path,
            OpenFlags::SQLITE_OPEN_READ_WRITE
                | OpenFlags::SQLITE_OPEN_CREATE
                | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|e| not_a_database(&path, e, "open database"))?;
        configure_writer(&conn, &options)
            .map_err(|e| not_a_database(&path, e, "configure database"))?;
        let prepared = schema::prepare(&mut conn, now_ms()).map_err(|e| match e {
            StoreError::Sqlite { op, source } => not_a_database(&path, source, op),
            other => other,
        })?;
        let last_audit_id = schema::last_audit_id(&conn)?;
        // With a checkpoint thread, the writer's commits no longer checkpoint; without one
        // (it could not start), they still do, as SQLite does by default.
        let restart_due = writer::WalRestartDue::default();
        let checkpointer = spawn_checkpointer(&path, &options, restart_due.clone()).ok();
        if checkpointer.is_some() {
            conn.pragma_update(None, "wal_autocheckpoint", 0)
                .map_err(StoreError::sqlite("turn off automatic checkpoints"))?;
        }
        let (writer, thread) = writer::spawn(
            conn,
            options.max_batch_ops,
            options.max_pending_ops,
            last_audit_id,
            checkpointer.is_some().then_some(restart_due),
        )?;
        Ok(Store {
            inner: Arc::new(Inner {
                path,
                epoch: prepared.epoch,
                created_ms: prepared.created_ms,
                new_state: prepared.new_state,
                options,
                readers: Mutex::new(Vec::new()),
                writer,
                thread: Mutex::new(Some(thread)),
                checkpointer: Mutex::new(checkpointer),
            }),
        })
    }

    /// The gateway's epoch, kept with the state.
    pub fn epoch(&self) -> Epoch {
        self.inner.epoch
    }

    /// Whether this open created the state (and so the epoch is fresh).
    pub fn is_new_state(&self) -> bool {
        self.inner.new_state
    }

    /// When the state (and its epoch) was created, milliseconds since the Unix epoch.
    pub fn created_ms(&self) -> u64 {
        self.inner.created_ms
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// A handle to the writer (clone it freely).
    pub fn writer(&self) -> &StoreWriter {
        &self.inner.writer
    }

    /// The id of the newest committed audit event, updated as events commit: the admin API's
    /// long-poll waits on it (`rx.wait_for(|id| *id > cursor)`) and then calls
    /// [`Store::audit_follow`].
    pub fn audit_watch(&self) -> watch::Receiver<u64> {
        self.inner.writer.audit_watch()
    }

    /// At start-up: the live leases, after recording those already past their expiry at
    /// `now_ms` as expired (with an expiry audit event each).
    pub async fn restore(&self, now_ms: u64) -> Result<Restored, StoreError> {
        let mut live = Vec::new();
        let expired = self
            .restore_each(now_ms, &mut |lease| live.push(lease))
            .await?;
        Ok(Restored { live, expired })
    }

    /// At start-up: hands each live lease to `live` as it is read, soonest expiry first, then
    /// by lease id, so that the caller keeps what it needs of a lease and no list of them all
    /// is ever built; then records those already past their expiry at `now_ms` as expired (with
    /// an expiry audit event each) and returns them as they are now stored.
    pub async fn restore_each(
        &self,
        now_ms: u64,
        live: &mut (dyn FnMut(LeaseRecord) + Send),
    ) -> Result<Vec<LeaseRecord>, StoreError> {
        let mut expired = Vec::new();
        // Read and decoded on a thread of their own while `live` takes those read before: with
        // a million leases each half takes seconds of a start, on cores that are otherwise idle.
        std::thread::scope(|scope| {
            let (chunks, read) = std::sync::mpsc::sync_channel(RESTORE_CHUNKS_AHEAD);
            let reader = scope.spawn(move || {
                self.with_reader(|conn| {
                    let mut chunk = Vec::with_capacity(RESTORE_CHUNK);
                    let mut taken = true;
                    query::each_live_lease(conn, &mut |lease| {
                        chunk.push(lease);
                        // Once nobody takes them (the restore ended in a panic), the rest is
                        // read and dropped.
                        if chunk.len() == RESTORE_CHUNK && taken {
                            let full =
                                std::mem::replace(&mut chunk, Vec::with_capacity(RESTORE_CHUNK));
                            taken = chunks.send(full).is_ok();
                        } else if !taken {
                            chunk.clear();
                        }
                    })?;
                    if taken && !chunk.is_empty() {
                        let _ = chunks.send(chunk);
                    }
                    Ok(())
                })
            });
            for lease in read.into_iter().flatten() {
                if lease.expires_ms <= now_ms {
                    expired.push(lease);
                } else {
                    live(lease);
                }
            }
            reader
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })?;
        self.expire(expired, now_ms, "expired while the gateway was stopped")
            .await
    }

    /// Record `leases` as expired at `now_ms`, with an expiry audit event each, in one commit.
    /// Returns the leases as they are now stored.
    pub async fn expire(
        &self,
        leases: Vec<LeaseRecord>,
        now_ms: u64,
        why: &str,
    ) -> Result<Vec<LeaseRecord>, StoreError> {
        if leases.is_empty() {
            return Ok(leases);
        }
        let mut ops = Vec::with_capacity(leases.len() * 2);
        for lease in &leases {
            ops.push(WriteOp::EndLease {
                id: lease.id,
                end: LeaseEnd::Expired,
                ended_ms: now_ms,
                by: Some("gateway".into()),
                why: Some(why.into()),
            });
            let mut event = AuditEvent::new(now_ms, AuditKind::Expiry);
            event.outcome = Some(Outcome::Expired);
            event.identity = Some(lease.identity.clone());
            event.lease = Some(lease.id);
            event.app = lease.app.clone();
            event.grants = lease.grants.clone();
            event.actor = Some("gateway".into());
            event.reason = Some(why.into());
            ops.push(WriteOp::audit(event));
        }
        self.inner.writer.commit(ops).await?;
        Ok(leases
            .into_iter()
            .map(|mut lease| {
                lease.state = LeaseState::Expired;
                lease.ending = Some(LeaseEnding {
                    end: LeaseEnd::Expired,
                    ended_ms: now_ms,
                    by: Some("gateway".into()),
                    why: Some(why.into()),
                });
                lease
            })
            .collect())
    }

    /// Every live lease, soonest expiry first, then by lease id (for restoring the lease book
    /// and the kernel).
    pub fn live_leases(&self) -> Result<Vec<LeaseRecord>, StoreError> {
        self.with_reader(query::live_leases)
    }

    /// One lease, live or ended.
    pub fn lease(&self, id: LeaseId) -> Result<Option<LeaseRecord>, StoreError> {
        self.with_reader(|conn| query::lease(conn, id))
    }

    /// Leases matching `filter`, soonest expiry first, then by lease id.
    pub fn leases(&self, filter: &LeaseFilter) -> Result<Vec<LeaseRecord>, StoreError> {
        self.with_reader(|conn| query::leases(conn, filter))
    }

    /// How many leases are live.
    pub fn live_lease_count(&self) -> Result<u64, StoreError> {
        self.with_reader(query::live_lease_count)
    }

    /// One page of audit events matching `query`.
    pub fn audit(&self, query: &AuditQuery) -> Result<AuditPage, StoreError> {
        self.with_reader(|conn| query::audit(conn, query))
    }

    /// Events after `after_id`, oldest first, matching the filters of `query` (its cursor
    /// and order are ignored): the "follow" primitive. Returns at most `limit` events.
    pub fn audit_follow(
        &self,
        after_id: u64,
        query: &AuditQuery,
        limit: usize,
    ) -> Result<Vec<AuditRecord>, StoreError> {
        StoreQueries::audit_follow(self, after_id, query, limit)
    }

    /// What each host asked for each application and opening in the window, with counts and
    /// the time leases were held (live leases count up to `now_ms`), for `fwnpctl report`.
    pub fn report(&self, query: &ReportQuery, now_ms: u64) -> Result<Vec<ReportRow>, StoreError> {
        self.with_reader(|conn| query::report(conn, query, now_ms))
    }

    fn with_reader<T>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let pooled = self
            .inner
            .readers
            .lock()
            .ok()
            .and_then(|mut pool| pool.pop());
        let conn = match pooled {
            Some(conn) => conn,
            None => self.open_reader()?,
        };
        let result = f(&conn);
        if let Ok(mut pool) = self.inner.readers.lock()
            && pool.len() < self.inner.options.read_pool
        {
            pool.push(conn);
        }
        result
    }

    fn open_reader(&self) -> Result<Connection, StoreError> {
        let conn = Connection::open_with_flags(
            &self.inner.path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(StoreError::sqlite("open read connection"))?;
        conn.busy_timeout(self.inner.options.busy_timeout)
            .map_err(StoreError::sqlite("set busy timeout"))?;
        conn.set_prepared_statement_cache_capacity(32);
        Ok(conn)
    }
}

fn configure_writer(conn: &Connection, options: &StoreOptions) -> Result<(), rusqlite::Error> {
    conn.busy_timeout(options.busy_timeout)?;
    let mode: String = conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_ERROR),
            Some(format!("journal_mode is {mode}, WAL was asked")),
        ));
    }
    conn.pragma_update(None, "synchronous", options.synchronous.pragma())?;
    conn.pragma_update(None, "foreign_keys", "OFF")?;
    conn.pragma_update(None, "temp_store", "MEMORY")?;
    // 16 MiB of page cache for the writer: indexes stay hot under load.
    conn.pragma_update(None, "cache_size", -16_384)?;
    // When the WAL starts over, its file is cut back to about the size at which the checkpoint
    // thread makes it start over (pages of 4 KiB), so that it does not stay huge after a burst.
    conn.pragma_update(None, "journal_size_limit", wal_bytes(options))?;
    conn.set_prepared_statement_cache_capacity(32);
    Ok(())
}

/// The WAL's size in bytes past which the writer makes it start over (pages of 4 KiB).
fn wal_bytes(options: &StoreOptions) -> i64 {
    i64::from(options.wal_restart_frames) * 4096
}

fn not_a_database(path: &Path, e: rusqlite::Error, op: &'static str) -> StoreError {
    match &e {
        rusqlite::Error::SqliteFailure(code, _)
            if matches!(
                code.code,
                rusqlite::ErrorCode::NotADatabase | rusqlite::ErrorCode::DatabaseCorrupt
            ) =>
        {
            StoreError::corrupt(format!(
                "{} is not a readable SQLite database ({op}: {e})",
                path.display()
            ))
        }
        _ => StoreError::Sqlite { op, source: e },
    }
}

fn create_private_dir(dir: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::DirBuilderExt;
    if dir.is_dir() {
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| StoreError::Io {
            op: "create state directory",
            path: dir.into(),
            source,
        })
}

fn create_private_file(path: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::OpenOptionsExt;
    // Create the file ourselves so that it (and the -wal and -shm files SQLite derives from it)
    // is readable by the gateway's user only: the audit trail names hosts and applications.
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(_) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(source) => Err(StoreError::Io {
            op: "create database file",
            path: path.into(),
            source,
        }),
    }
}

/// Milliseconds since the Unix epoch, from the system clock.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
