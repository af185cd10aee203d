//! The single writer: one thread owns the read-write connection and commits everything queued
//! since its last transaction as one transaction (group commit), after waiting a little for
//! more while the gateway is busy (see [`Coalescing`]).
//!
//! Each job (the operations of one `commit` or `record` call) is applied atomically, and a job
//! that fails (a duplicate lease id, a renewal of a lease that is no longer live) is undone
//! alone while the other jobs of the transaction still commit. Failures are rare, so the writer
//! runs a batch without savepoints first; only when a job of several operations fails part-way
//! does it roll the transaction back and run the batch again with a savepoint around each such
//! job (savepoints cost about a third of the write rate). Without savepoints, the lease rows and
//! audit rows of consecutive jobs are inserted by multi-row statements; a failure in one of
//! them undoes rows of other jobs too, so it also asks for the careful run, which inserts row
//! by row. A caller of [`StoreWriter::commit`] is answered only after the transaction holding
//! its job has committed.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use std::net::SocketAddr;

use fwnp_netfilter::Coalescing;
use fwnp_proto::{Grant, LeaseId};
use rusqlite::{Connection, Statement, params};
use tokio::sync::{mpsc, oneshot, watch};

use super::codec::{
    app_columns, certificate_columns, encode_grants_into, encode_hosts, encode_prefixes,
    push_socket_addr, to_i64,
};
use super::error::StoreError;
use super::types::{AuditEvent, LeaseEnd, NewLease};
use fwnp_trust::identity::CertificateName;

/// One change to the store.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum WriteOp {
    /// Store a new live lease.
    InsertLease(NewLease),
    /// Extend a live lease (a Renew, or a repeated Open of the same opening).
    RenewLease {
        /// The lease.
        id: LeaseId,
        /// When it was renewed.
        renewed_ms: u64,
        /// Its new expiry.
        expires_ms: u64,
        /// The lifetime granted this time, in seconds.
        granted_lifetime: u32,
        /// The client certificate the host renewed with, as a CRL names it.
        certificate: Option<Arc<CertificateName>>,
    },
    /// End a live lease.
    EndLease {
        /// The lease.
        id: LeaseId,
        /// Released, expired or revoked (with the protocol's reason).
        end: LeaseEnd,
        /// When.
        ended_ms: u64,
        /// Who ended it: the host's identity, `gateway`, the operator.
        by: Option<String>,
        /// Why, in words.
        why: Option<String>,
    },
    /// Append an audit event.
    Audit(Box<AuditEvent>),
    /// Delete up to `max_rows` of the oldest audit events older than `before_ms`.
    DeleteAuditBefore {
        /// The cut-off time.
        before_ms: u64,
        /// How many rows at most, so one deletion never holds the writer for long.
        max_rows: u32,
    },
    /// Delete up to `max_rows` leases that ended before `before_ms`.
    DeleteEndedLeasesBefore {
        /// The cut-off time.
        before_ms: u64,
        /// How many rows at most.
        max_rows: u32,
    },
    /// Number the audit events from now on past `id`, if they are not already: ids that an
    /// earlier database of this gateway used, which are known elsewhere (its cluster holds the
    /// events it published). Kept in `meta` like the highest id used, so that a reopened store
    /// numbers on from it too.
    ContinueAuditIdsAfter {
        /// The highest id used elsewhere.
        id: u64,
    },
}

impl WriteOp {
    /// An audit event as an operation.
    pub fn audit(event: AuditEvent) -> Self {
        WriteOp::Audit(Box::new(event))
    }
}

/// Counters of the writer, for metrics and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WriterStats {
    /// Transactions committed (or attempted).
    pub transactions: u64,
    /// Jobs (calls of `commit` or `record`) processed.
    pub jobs: u64,
    /// Operations processed.
    pub ops: u64,
    /// Jobs that failed.
    pub failed_jobs: u64,
    /// The most jobs one transaction held.
    pub largest_batch: u64,
    /// Operations queued and not yet processed.
    pub pending_ops: usize,
    /// Time the writer spent applying and committing transactions, in microseconds.
    pub busy_us: u64,
    /// Transactions run a second time because a job of several operations failed.
    pub careful_redos: u64,
    /// Time jobs waited in the queue before the transaction holding them began, summed, in
    /// microseconds: over `jobs`, how long a commit stands in line behind the others.
    pub queue_wait_us: u64,
    /// Passive checkpoints the writer ran itself, between two transactions, so that the WAL
    /// starts over when the checkpoint thread's own could not catch up: every commit waits for
    /// each of them.
    pub wal_restarts: u64,
    /// Their time, summed, in microseconds.
    pub wal_restart_us: u64,
    /// The longest of them since the store was opened, in microseconds.
    pub longest_wal_restart_us: u64,
}

pub(crate) enum Reply {
    Async(oneshot::Sender<Result<u64, StoreError>>),
    Blocking(std::sync::mpsc::SyncSender<Result<u64, StoreError>>),
    None,
}

pub(crate) struct Job {
    ops: Vec<WriteOp>,
    reply: Reply,
    queued: std::time::Instant,
}

pub(crate) enum Msg {
    Write(Job),
    Coalesce(Coalescing),
    Close,
}

#[derive(Debug, Default)]
struct Counters {
    transactions: AtomicU64,
    jobs: AtomicU64,
    ops: AtomicU64,
    failed_jobs: AtomicU64,
    largest_batch: AtomicU64,
    pending_ops: AtomicUsize,
    busy_us: AtomicU64,
    careful_redos: AtomicU64,
    queue_wait_us: AtomicU64,
    wal_restarts: AtomicU64,
    wal_restart_us: AtomicU64,
    longest_wal_restart_us: AtomicU64,
}

#[derive(Debug)]
pub(crate) struct WriterShared {
    sender: mpsc::UnboundedSender<Msg>,
    counters: Counters,
    max_pending_ops: usize,
    audit_watch: watch::Sender<u64>,
}

impl std::fmt::Debug for Msg {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Msg::Write(job) => write!(f, "Write({} ops)", job.ops.len()),
            Msg::Coalesce(c) => write!(f, "Coalesce({c:?})"),
            Msg::Close => f.write_str("Close"),
        }
    }
}

/// A handle to the store's writer thread; cheap to clone and share between tasks.
#[derive(Debug, Clone)]
pub struct StoreWriter {
    shared: Arc<WriterShared>,
}

impl StoreWriter {
    /// Apply `ops` atomically, together with whatever else is queued, and return once they are
    /// committed (durable as [`super::Synchronous`] says). Ops of one call either all apply
    /// or none does.
    pub async fn commit(&self, ops: Vec<WriteOp>) -> Result<(), StoreError> {
        self.commit_counted(ops).await.map(|_| ())
    }

    /// As [`StoreWriter::commit`], returning how many rows the operations changed.
    pub(crate) async fn commit_counted(&self, ops: Vec<WriteOp>) -> Result<u64, StoreError> {
        if ops.is_empty() {
            return Ok(0);
        }
        let (tx, rx) = oneshot::channel();
        self.enqueue(ops, Reply::Async(tx))?;
        rx.await.map_err(|_| StoreError::WriterStopped)?
    }

    /// As [`StoreWriter::commit`], blocking the calling thread: for threads outside the async
    /// runtime (start-up code, tools, tests). Do not call it from an async task.
    pub fn commit_blocking(&self, ops: Vec<WriteOp>) -> Result<(), StoreError> {
        if ops.is_empty() {
            return Ok(());
        }
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.enqueue(ops, Reply::Blocking(tx))?;
        rx.recv()
            .map_err(|_| StoreError::WriterStopped)?
            .map(|_| ())
    }

    /// Queue `ops` without waiting for them (audit rows that need not hold up an answer).
    /// Refused with [`StoreError::Overloaded`] when more operations than the configured limit
    /// are already queued, so a flood cannot grow memory without bound; a failure of the write
    /// itself is logged.
    pub fn record(&self, ops: Vec<WriteOp>) -> Result<(), StoreError> {
        if ops.is_empty() {
            return Ok(());
        }
        let pending = self.shared.counters.pending_ops.load(Ordering::Relaxed);
        if pending.saturating_add(ops.len()) > self.shared.max_pending_ops {
            return Err(StoreError::Overloaded { pending });
        }
        self.enqueue(ops, Reply::None)
    }

    /// Queue one audit event without waiting (see [`StoreWriter::record`]).
    pub fn record_audit(&self, event: AuditEvent) -> Result<(), StoreError> {
        self.record(vec![WriteOp::audit(event)])
    }

    /// Delete audit events and ended leases older than `before_ms`, in slices of
    /// `slice` rows so that grants keep flowing meanwhile. Returns (audit rows, leases) deleted.
    pub async fn prune(&self, before_ms: u64, slice: u32) -> Result<(u64, u64), StoreError> {
        let slice = slice.max(1);
        let mut audit_rows = 0;
        loop {
            let n = self
                .commit_counted(vec![WriteOp::DeleteAuditBefore {
                    before_ms,
                    max_rows: slice,
                }])
                .await?;
            audit_rows += n;
            if n < u64::from(slice) {
                break;
            }
        }
        let mut leases = 0;
        loop {
            let n = self
                .commit_counted(vec![WriteOp::DeleteEndedLeasesBefore {
                    before_ms,
                    max_rows: slice,
                }])
                .await?;
            leases += n;
            if n < u64::from(slice) {
                break;
            }
        }
        Ok((audit_rows, leases))
    }

    /// The writer's counters.
    pub fn stats(&self) -> WriterStats {
        let c = &self.shared.counters;
        WriterStats {
            transactions: c.transactions.load(Ordering::Relaxed),
            jobs: c.jobs.load(Ordering::Relaxed),
            ops: c.ops.load(Ordering::Relaxed),
            failed_jobs: c.failed_jobs.load(Ordering::Relaxed),
            largest_batch: c.largest_batch.load(Ordering::Relaxed),
            pending_ops: c.pending_ops.load(Ordering::Relaxed),
            busy_us: c.busy_us.load(Ordering::Relaxed),
            careful_redos: c.careful_redos.load(Ordering::Relaxed),
            queue_wait_us: c.queue_wait_us.load(Ordering::Relaxed),
            wal_restarts: c.wal_restarts.load(Ordering::Relaxed),
            wal_restart_us: c.wal_restart_us.load(Ordering::Relaxed),
            longest_wal_restart_us: c.longest_wal_restart_us.load(Ordering::Relaxed),
        }
    }

    /// The id of the newest committed audit event; changes as events commit (for following).
    pub fn audit_watch(&self) -> watch::Receiver<u64> {
        self.shared.audit_watch.subscribe()
    }

    fn enqueue(&self, ops: Vec<WriteOp>, reply: Reply) -> Result<(), StoreError> {
        let n = ops.len();
        self.shared
            .counters
            .pending_ops
            .fetch_add(n, Ordering::Relaxed);
        if self
            .shared
            .sender
            .send(Msg::Write(Job {
                ops,
                reply,
                queued: std::time::Instant::now(),
            }))
            .is_err()
        {
            self.shared
                .counters
                .pending_ops
                .fetch_sub(n, Ordering::Relaxed);
            return Err(StoreError::WriterStopped);
        }
        Ok(())
    }

    /// From now on, a group commit waits for more operations while `coalescing` says many are
    /// on their way (see [`Coalescing`]); otherwise it takes only what is queued when the
    /// writer is free.
    pub fn coalesce(&self, coalescing: Coalescing) {
        // An error means the thread is gone, and there is nothing left to group.
        let _ = self.shared.sender.send(Msg::Coalesce(coalescing));
    }

    pub(crate) fn close(&self) {
        // An error means the thread is already gone, which is what closing wants.
        let _ = self.shared.sender.send(Msg::Close);
    }
}

/// Start the writer thread on `conn`.
pub(crate) fn spawn(
    conn: Connection,
    max_batch_ops: usize,
    max_pending_ops: usize,
    last_audit_id: u64,
    wal_restart: Option<WalRestartDue>,
) -> Result<(StoreWriter, std::thread::JoinHandle<()>), StoreError> {
    let (sender, receiver) = mpsc::unbounded_channel();
    let (audit_watch, _) = watch::channel(last_audit_id);
    let shared = Arc::new(WriterShared {
        sender,
        counters: Counters::default(),
        max_pending_ops,
        audit_watch,
    });
    let thread_shared = Arc::clone(&shared);
    let handle = std::thread::Builder::new()
        .name("fwnp-store-writer".into())
        .spawn(move || {
            run(
                conn,
                &thread_shared,
                receiver,
                max_batch_ops.max(1),
                last_audit_id,
                wal_restart,
            )
        })
        .map_err(|source| StoreError::Io {
            op: "start writer thread",
            path: "fwnp-store-writer".into(),
            source,
        })?;
    Ok((StoreWriter { shared }, handle))
}

fn run(
    conn: Connection,
    shared: &WriterShared,
    mut receiver: mpsc::UnboundedReceiver<Msg>,
    max_batch_ops: usize,
    last_audit_id: u64,
    wal_restart: Option<WalRestartDue>,
) {
    let mut writer = Writer::new(&conn, last_audit_id);
    if let Err(e) = &writer {
        tracing::error!(error = %e, "store: the writer cannot prepare its statements");
    }
    let mut coalescing: Option<Coalescing> = None;
    while let Some(first) = receiver.blocking_recv() {
        let mut group = Group::default();
        group.take(first, &mut coalescing);
        group.take_queued(&mut receiver, max_batch_ops, &mut coalescing);
        if let Some(c) = coalescing.clone().filter(|_| !group.jobs.is_empty()) {
            c.gather(group.ops, || {
                group.take_queued(&mut receiver, max_batch_ops, &mut coalescing);
                (!group.closing && group.ops < max_batch_ops).then_some(group.ops)
            });
        }
        let Group {
            jobs: batch,
            closing,
            ..
        } = group;
        execute(writer.as_mut(), shared, batch);
        if let Some(due) = &wal_restart {
            restart_wal_if_due(due, &conn, &shared.counters);
        }
        if closing {
            // Refuse new work, then finish what was queued before the close.
            receiver.close();
            let mut rest = Vec::new();
            while let Ok(msg) = receiver.try_recv() {
                if let Msg::Write(job) = msg {
                    rest.push(job);
                }
            }
            execute(writer.as_mut(), shared, rest);
            break;
        }
    }
}

/// Set by the checkpoint thread when the WAL it has just checkpointed holds more frames than
/// the limit: the writer then runs a passive checkpoint itself, between two transactions.
///
/// SQLite reuses the WAL from its start only when a write transaction begins with every frame
/// copied into the database and no reader in the WAL. The checkpoint thread's passive
/// checkpoints copy the frames committed when each began, and under sustained writes more are
/// committed meanwhile: the WAL never started over and grew by every page written (about
/// 450 MB in 8 s of the closed loop), and with it the replay at the next start. The writer's
/// own checkpoint has no commit beside it, so its next transaction starts the WAL over, its
/// file cut back to the limit (`journal_size_limit`). Run right after the checkpoint thread's,
/// it copies only what was committed meanwhile and syncs little; run on its own, whenever
/// the WAL's file was past the limit, it copied and synced up to a quarter of a second's
/// writes while every grant waited (the p90 at 20,000 grants a second went from 2-3 ms to
/// 14 ms).
pub(crate) type WalRestartDue = Arc<std::sync::atomic::AtomicBool>;

/// Between two transactions: the passive checkpoint the checkpoint thread asked for, if it
/// did. One that finds a reader in the way is asked for again after the thread's next round.
/// Timed and counted, and a long one is logged: commits wait for it, and one slow sync of the
/// database file there shows as a stall of every request in flight.
fn restart_wal_if_due(due: &WalRestartDue, conn: &Connection, counters: &Counters) {
    if due.swap(false, Ordering::AcqRel) {
        let began = std::time::Instant::now();
        let _ = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()));
        let took = began.elapsed();
        let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        counters.wal_restarts.fetch_add(1, Ordering::Relaxed);
        counters.wal_restart_us.fetch_add(us, Ordering::Relaxed);
        counters
            .longest_wal_restart_us
            .fetch_max(us, Ordering::Relaxed);
        if took >= LONG_WAL_RESTART {
            tracing::warn!(
                ms = took.as_millis() as u64,
                "store: the checkpoint that starts the WAL over held every commit this long \
                 (copying the WAL's pages into the database file and syncing it)"
            );
        }
    }
}

/// From how long a checkpoint of the writer's own is worth a warning: some forty times what one
/// took on this project's test machine (2-3 ms, about every 3 s at 1,000 grants a second).
const LONG_WAL_RESTART: std::time::Duration = std::time::Duration::from_millis(100);

/// The jobs of one group commit, gathered from the writer's queue.
#[derive(Default)]
struct Group {
    jobs: Vec<Job>,
    ops: usize,
    /// A close came: the group is committed, then what is still queued, and the writer stops.
    closing: bool,
}

impl Group {
    /// Takes one message: a write joins the group, new settings for coalescing are kept.
    fn take(&mut self, msg: Msg, coalescing: &mut Option<Coalescing>) {
        match msg {
            Msg::Write(job) => {
                self.ops += job.ops.len();
                self.jobs.push(job);
            }
            Msg::Coalesce(c) => *coalescing = Some(c),
            Msg::Close => self.closing = true,
        }
    }

    /// Takes what is queued, until a close or `max_ops` operations.
    fn take_queued(
        &mut self,
        receiver: &mut mpsc::UnboundedReceiver<Msg>,
        max_ops: usize,
        coalescing: &mut Option<Coalescing>,
    ) {
        while !self.closing && self.ops < max_ops {
            match receiver.try_recv() {
                Ok(msg) => self.take(msg, coalescing),
                Err(_) => break,
            }
        }
    }
}

/// The writer thread's connection, with the statements of every grant prepared once, and the id
/// the next audit event gets (it moves on only by the events committed).
struct Writer<'c> {
    conn: &'c Connection,
    next_audit: i64,
    hot: Statements<'c>,
}

/// The statements every grant, renewal or release runs, prepared when the writer starts and
/// kept: taken from rusqlite's statement cache, each operation hashed the SQL text, moved the
/// statement out of and back into the cache and cleared its bindings.
struct Statements<'c> {
    begin: Statement<'c>,
    commit: Statement<'c>,
    /// `INSERT INTO leases` of [`ROWS`]`[i]` rows at index `i`.
    insert_leases: Vec<Insert<'c>>,
    renew_lease: Statement<'c>,
    end_lease: Statement<'c>,
    /// `INSERT INTO audit` of [`ROWS`]`[i]` rows at index `i`.
    insert_audits: Vec<Insert<'c>>,
}

/// A multi-row INSERT, with which of its parameters hold NULL.
///
/// A statement keeps its parameters' values from one execution to the next (nothing here
/// clears them), and a parameter never bound is NULL. Most NULL columns of a row (an event's
/// application, code or actor; a lease's application) were NULL in the row bound at the same
/// place before, so binding NULL again is skipped: each bind is a call into SQLite that
/// releases the old value, about as dear per column as binding a number.
struct Insert<'c> {
    stmt: Statement<'c>,
    /// By parameter index from 0: true when the parameter is known to hold NULL.
    null: Vec<bool>,
    /// Parameters bound (NULL or not), for tests.
    binds: u64,
}

impl<'c> Insert<'c> {
    fn new(stmt: Statement<'c>) -> Self {
        let null = vec![true; stmt.parameter_count()];
        Insert {
            stmt,
            null,
            binds: 0,
        }
    }

    /// Bind `values` as the parameters of row `row` (from 0) of rows of `values.len()`
    /// parameters each.
    fn bind_row(&mut self, row: usize, values: &[Param<'_>]) -> Result<(), StoreError> {
        let first = row * values.len();
        for (i, value) in values.iter().enumerate() {
            let index = first + i;
            let Some(null) = self.null.get_mut(index) else {
                return Err(StoreError::corrupt(format!(
                    "parameter {} of a statement of {}",
                    index + 1,
                    self.null.len()
                )));
            };
            if *null && matches!(value, Param::Null) {
                continue;
            }
            // Unknown until the bind succeeds: a failed one may have left either value.
            *null = false;
            let at = index + 1;
            let bound = match *value {
                Param::Null => self.stmt.raw_bind_parameter(at, rusqlite::types::Null),
                Param::Int(v) => self.stmt.raw_bind_parameter(at, v),
                Param::Text(v) => self.stmt.raw_bind_parameter(at, v),
                Param::Blob(v) => self.stmt.raw_bind_parameter(at, v),
            };
            bound.map_err(StoreError::sqlite("bind a row"))?;
            self.binds += 1;
            if let Some(null) = self.null.get_mut(index) {
                *null = matches!(value, Param::Null);
            }
        }
        Ok(())
    }
}

/// A value of a row's column, as bound.
#[derive(Debug, Clone, Copy)]
enum Param<'a> {
    Null,
    Int(i64),
    Text(&'a str),
    Blob(&'a [u8]),
}

impl<'a> Param<'a> {
    fn text(value: Option<&'a str>) -> Self {
        value.map_or(Param::Null, Param::Text)
    }

    fn int(value: Option<impl Into<i64>>) -> Self {
        value.map_or(Param::Null, |v| Param::Int(v.into()))
    }

    fn blob(value: Option<&'a [u8]>) -> Self {
        value.map_or(Param::Null, Param::Blob)
    }
}

/// The row counts of the multi-row INSERT statements, largest first; the last is one row.
///
/// Consecutive lease rows (and audit rows) of a transaction are inserted by as few statements
/// as these sizes allow, taken greedily: each statement costs its step, its cursors opened on
/// the table and its indexes (and a walk from each root), its halt and its reset, and one
/// statement per row spent about a sixth of the writer's time per grant on those. The sizes are
/// powers of two so that any run of rows takes at most one statement of each size.
const ROWS: [usize; 7] = [64, 32, 16, 8, 4, 2, 1];
const ONE_ROW: usize = ROWS.len() - 1;

impl<'c> Writer<'c> {
    fn new(conn: &'c Connection, last_audit_id: u64) -> Result<Self, StoreError> {
        let prepare =
            |sql: &str, what: &'static str| conn.prepare(sql).map_err(StoreError::sqlite(what));
        Ok(Writer {
            conn,
            next_audit: i64::try_from(last_audit_id)
                .unwrap_or(i64::MAX)
                .saturating_add(1),
            hot: Statements {
                begin: prepare("BEGIN IMMEDIATE", "prepare begin transaction")?,
                commit: prepare("COMMIT", "prepare commit")?,
                insert_leases: ROWS
                    .iter()
                    .map(|&n| {
                        prepare(
                            &insert_sql(INSERT_LEASE, LEASE_ROW, n),
                            "prepare insert lease",
                        )
                        .map(Insert::new)
                    })
                    .collect::<Result<_, _>>()?,
                renew_lease: prepare(RENEW_LEASE, "prepare renew lease")?,
                end_lease: prepare(END_LEASE, "prepare end lease")?,
                insert_audits: ROWS
                    .iter()
                    .map(|&n| {
                        prepare(
                            &insert_sql(INSERT_AUDIT, AUDIT_ROW, n),
                            "prepare insert audit",
                        )
                        .map(Insert::new)
                    })
                    .collect::<Result<_, _>>()?,
            },
        })
    }
}

const INSERT_LEASE: &str = "INSERT INTO leases (id, identity, peer, grants, app_name, app_exe, \
    app_uid, app_pid, requested_lifetime, granted_lifetime, created_ms, expires_ms, state, \
    cert_issuer, cert_serial) VALUES ";
/// One lease row's values: 14 parameters and its state.
const LEASE_ROW: &str = "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'live', ?, ?)";
const LEASE_PARAMS: usize = 14;

// A renewal without a certificate keeps the one stored.
const RENEW_LEASE: &str = "UPDATE leases SET renewed_ms = ?2, expires_ms = ?3, \
    granted_lifetime = ?4, cert_issuer = coalesce(?5, cert_issuer), \
    cert_serial = coalesce(?6, cert_serial) WHERE id = ?1 AND state = 'live'";

const END_LEASE: &str = "UPDATE leases SET state = ?2, ended_ms = ?3, end_by = ?4, \
    end_reason = ?5, revoke_reason = ?6 WHERE id = ?1 AND state = 'live'";

const INSERT_AUDIT: &str = "INSERT INTO audit (id, time_ms, kind, outcome, identity, peer, lease, \
    has_request, protocol, port_first, port_last, app_id, host, remotes, lifetime_asked, \
    app_name, app_exe, app_uid, app_pid, grants, lifetime_granted, rule, reason, code, actor) \
    VALUES ";
/// One audit row's values: 25 parameters.
const AUDIT_ROW: &str =
    "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)";
const AUDIT_PARAMS: usize = 25;

/// An INSERT of `rows` rows: `head` followed by `row` that many times.
fn insert_sql(head: &str, row: &str, rows: usize) -> String {
    let mut sql = String::with_capacity(head.len() + rows * (row.len() + 2));
    sql.push_str(head);
    for i in 0..rows {
        if i > 0 {
            sql.push_str(", ");
        }
        sql.push_str(row);
    }
    sql
}

/// Run `batch` as one transaction and answer its jobs; without a writer (its statements could
/// not be prepared) every job is answered with that error.
fn execute(
    writer: Result<&mut Writer<'_>, &mut StoreError>,
    shared: &WriterShared,
    batch: Vec<Job>,
) {
    if batch.is_empty() {
        return;
    }
    let started = std::time::Instant::now();
    let op_count: usize = batch.iter().map(|j| j.ops.len()).sum();
    let waited: u128 = batch
        .iter()
        .map(|j| started.saturating_duration_since(j.queued).as_micros())
        .sum();
    shared
        .counters
        .queue_wait_us
        .fetch_add(u64::try_from(waited).unwrap_or(u64::MAX), Ordering::Relaxed);
    let w = match writer {
        Ok(w) => w,
        Err(e) => {
            let results = batch.iter().map(|_| Err(e.duplicate())).collect();
            finish(shared, batch, started, op_count, results, Vec::new());
            return;
        }
    };
    // Fast path: no savepoints. Only when a job of several operations fails part-way is the
    // transaction rolled back and the batch run again with a savepoint around each such job.
    let (results, newest_audit) = match run_batch(w, &batch, false) {
        BatchRun::Done(results, newest, _) => (results, newest),
        BatchRun::RedoCarefully => {
            count_redo(shared);
            match run_batch(w, &batch, true) {
                BatchRun::Done(results, newest, _) => (results, newest),
                // Unreachable in careful mode; fail the batch rather than loop.
                BatchRun::RedoCarefully => (
                    batch
                        .iter()
                        .map(|_| {
                            Err(StoreError::corrupt(
                                "a job failed twice without a savepoint",
                            ))
                        })
                        .collect(),
                    Vec::new(),
                ),
            }
        }
    };
    finish(shared, batch, started, op_count, results, newest_audit);
}

/// Count a batch and answer its jobs.
fn finish(
    shared: &WriterShared,
    mut batch: Vec<Job>,
    started: std::time::Instant,
    op_count: usize,
    results: Vec<Result<u64, StoreError>>,
    newest_audit: Vec<Option<i64>>,
) {
    let c = &shared.counters;
    c.busy_us
        .fetch_add(started.elapsed().as_micros() as u64, Ordering::Relaxed);
    c.transactions.fetch_add(1, Ordering::Relaxed);
    c.jobs.fetch_add(batch.len() as u64, Ordering::Relaxed);
    c.ops.fetch_add(op_count as u64, Ordering::Relaxed);
    c.largest_batch
        .fetch_max(batch.len() as u64, Ordering::Relaxed);
    c.pending_ops.fetch_sub(op_count, Ordering::Relaxed);
    if let Some(newest) = newest_audit
        .into_iter()
        .flatten()
        .max()
        .and_then(|id| u64::try_from(id).ok())
    {
        shared.audit_watch.send_if_modified(|current| {
            let newer = newest > *current;
            if newer {
                *current = newest;
            }
            newer
        });
    }
    // Every reply is sent before any job's operations are freed: a reply wakes its task on the
    // async runtime, and a runtime whose workers are all parked is woken by a system call. Sent
    // back to back, the replies of a transaction find the first woken worker still awake (one
    // wake-up for the batch); with each job's operations freed between two replies, the worker
    // was parked again more often (measured on the writer alone: 0.132 wake-ups a grant, 0.117
    // with the replies sent together).
    for (job, result) in batch.iter_mut().zip(results) {
        if result.is_err() {
            c.failed_jobs.fetch_add(1, Ordering::Relaxed);
        }
        match std::mem::replace(&mut job.reply, Reply::None) {
            // A caller that stopped waiting no longer cares.
            Reply::Async(tx) => {
                let _ = tx.send(result);
            }
            Reply::Blocking(tx) => {
                let _ = tx.send(result);
            }
            Reply::None => {
                if let Err(e) = result {
                    tracing::warn!(error = %e, "store: an unawaited write failed");
                }
            }
        }
    }
}

enum BatchRun {
    /// Per job: rows changed or its error; the ids of the newest audit row of each job that
    /// committed; and whether the transaction committed.
    Done(Vec<Result<u64, StoreError>>, Vec<Option<i64>>, bool),
    /// A job of several operations failed part-way without a savepoint; the transaction was
    /// rolled back.
    RedoCarefully,
}

fn count_redo(shared: &WriterShared) {
    shared
        .counters
        .careful_redos
        .fetch_add(1, Ordering::Relaxed);
}

/// Run the jobs of `batch` in one transaction. In careful mode each job of several operations
/// gets its own savepoint; otherwise such a job's failure asks for a careful redo. Audit ids
/// given to events that were not committed are given again.
fn run_batch(w: &mut Writer<'_>, batch: &[Job], careful: bool) -> BatchRun {
    let first_audit = w.next_audit;
    let run = run_batch_once(w, batch, careful);
    if !matches!(run, BatchRun::Done(_, _, true)) {
        w.next_audit = first_audit;
    }
    run
}

fn run_batch_once(w: &mut Writer<'_>, batch: &[Job], careful: bool) -> BatchRun {
    let conn = w.conn;
    let mut results: Vec<Result<u64, StoreError>> = Vec::with_capacity(batch.len());
    let mut newest_audit: Vec<Option<i64>> = Vec::with_capacity(batch.len());
    let fail_all = |err: StoreError| {
        if !conn.is_autocommit() {
            let _ = conn.execute_batch("ROLLBACK");
        }
        BatchRun::Done(
            batch.iter().map(|_| Err(err.duplicate())).collect(),
            Vec::new(),
            false,
        )
    };
    if let Err(e) = w.hot.begin.execute([]) {
        return fail_all(StoreError::sqlite("begin transaction")(e));
    }
    let mut runs = Runs::default();
    let mut text = JobText::default();
    for (index, job) in batch.iter().enumerate() {
        let job_first_audit = w.next_audit;
        let result = if careful {
            apply_job(w, &job.ops).map_err(|e| (e, false))
        } else {
            apply_fast(w, batch, index, &mut runs, &mut text)
        };
        match result {
            Ok((changed, audit_id)) => {
                results.push(Ok(changed));
                newest_audit.push(audit_id);
            }
            Err((e, redo)) => {
                // Some errors (disk full, I/O) make SQLite roll back the whole transaction.
                if conn.is_autocommit() {
                    return fail_all(e);
                }
                if redo {
                    let _ = conn.execute_batch("ROLLBACK");
                    return BatchRun::RedoCarefully;
                }
                // A single failed statement changed nothing; a failed savepoint was undone.
                w.next_audit = job_first_audit;
                results.push(Err(e));
                newest_audit.push(None);
            }
        }
    }
    if !runs.idle() {
        // Rows bound but never inserted: never commit without them.
        let _ = conn.execute_batch("ROLLBACK");
        return BatchRun::RedoCarefully;
    }
    if let Err(e) = w.hot.commit.execute([]) {
        return fail_all(StoreError::sqlite("commit")(e));
    }
    BatchRun::Done(results, newest_audit, true)
}

/// Apply one job atomically; returns rows changed and the id of its newest audit row.
fn apply_job(w: &mut Writer<'_>, ops: &[WriteOp]) -> Result<(u64, Option<i64>), StoreError> {
    if let [op] = ops {
        // A single statement is atomic by itself: a failed one changes nothing.
        return apply(w, op, &mut JobText::default());
    }
    let conn = w.conn;
    let mut text = JobText::default();
    conn.prepare_cached("SAVEPOINT job")
        .and_then(|mut s| s.execute([]))
        .map_err(StoreError::sqlite("begin job savepoint"))?;
    let mut changed = 0;
    let mut newest = None;
    for op in ops {
        match apply(w, op, &mut text) {
            Ok((n, audit_id)) => {
                changed += n;
                newest = audit_id.or(newest);
            }
            Err(e) => {
                if !conn.is_autocommit() {
                    let _ = conn.execute_batch("ROLLBACK TO job; RELEASE job");
                }
                return Err(e);
            }
        }
    }
    conn.prepare_cached("RELEASE job")
        .and_then(|mut s| s.execute([]))
        .map_err(StoreError::sqlite("release job savepoint"))?;
    Ok((changed, newest))
}

/// The text of a job's grants and peer, encoded once: a grant's audit event repeats its
/// lease's grants and peer, and formatting them (JSON, addresses) for both rows was a tenth
/// of the writer's time per grant. One is kept for a whole transaction, whose jobs encode
/// their text into the same two buffers.
struct JobText<'a> {
    grants: Option<&'a [Grant]>,
    grants_text: String,
    peer: Option<SocketAddr>,
    peer_text: String,
}

impl Default for JobText<'_> {
    /// Buffers of the size a grant's text and an address usually take: grown from empty, each
    /// took several reallocations, which a transaction of one grant paid every time.
    fn default() -> Self {
        JobText {
            grants: None,
            grants_text: String::with_capacity(128),
            peer: None,
            peer_text: String::with_capacity(64),
        }
    }
}

impl<'a> JobText<'a> {
    /// Encodes `grants` and `peer` unless they are those of the last call.
    fn encode(&mut self, grants: &'a [Grant], peer: Option<SocketAddr>) {
        if !grants.is_empty() && !matches!(self.grants, Some(done) if done == grants) {
            encode_grants_into(grants, &mut self.grants_text);
            self.grants = Some(grants);
        }
        if let Some(peer) = peer
            && self.peer != Some(peer)
        {
            self.peer_text.clear();
            push_socket_addr(&mut self.peer_text, peer);
            self.peer = Some(peer);
        }
    }

    /// The text of `grants`, once encoded (`None` when there are none).
    fn grants(&self, grants: &[Grant]) -> Option<&str> {
        match self.grants {
            Some(done) if !grants.is_empty() && done == grants => Some(&self.grants_text),
            _ => None,
        }
    }

    /// The text of `peer`, once encoded.
    fn peer(&self, peer: Option<SocketAddr>) -> Option<&str> {
        match (self.peer, peer) {
            (Some(done), Some(peer)) if done == peer => Some(&self.peer_text),
            _ => None,
        }
    }
}

fn apply<'a>(
    w: &mut Writer<'_>,
    op: &'a WriteOp,
    text: &mut JobText<'a>,
) -> Result<(u64, Option<i64>), StoreError> {
    let conn = w.conn;
    match op {
        WriteOp::InsertLease(lease) => insert_lease(w, lease, text).map(|n| (n, None)),
        WriteOp::RenewLease {
            id,
            renewed_ms,
            expires_ms,
            granted_lifetime,
            certificate,
        } => {
            let (issuer, serial) = certificate_columns(certificate.as_deref());
            let n = w
                .hot
                .renew_lease
                .execute(params![
                    &id.0[..],
                    to_i64(*renewed_ms, "renewal time")?,
                    to_i64(*expires_ms, "expiry time")?,
                    granted_lifetime,
                    issuer,
                    serial
                ])
                .map_err(StoreError::sqlite("renew lease"))?;
            if n == 0 {
                return Err(StoreError::LeaseNotLive { id: *id });
            }
            Ok((n as u64, None))
        }
        WriteOp::EndLease {
            id,
            end,
            ended_ms,
            by,
            why,
        } => {
            let revoke_reason = match end {
                LeaseEnd::Revoked(reason) => Some(reason.number() as i64),
                _ => None,
            };
            let n = w
                .hot
                .end_lease
                .execute(params![
                    &id.0[..],
                    end.state().name(),
                    to_i64(*ended_ms, "end time")?,
                    by,
                    why,
                    revoke_reason
                ])
                .map_err(StoreError::sqlite("end lease"))?;
            if n == 0 {
                return Err(StoreError::LeaseNotLive { id: *id });
            }
            Ok((n as u64, None))
        }
        WriteOp::Audit(event) => insert_audit(w, event, text).map(|id| (1, Some(id))),
        WriteOp::DeleteAuditBefore {
            before_ms,
            max_rows,
        } => {
            // The newest ids may go with the rows: the highest one used stays in meta, so
            // that a reopened store numbers on from it (ids are never reused).
            keep_last_audit_id(conn, w.next_audit.saturating_sub(1))?;
            let mut stmt = conn
                .prepare_cached(
                    "DELETE FROM audit WHERE id IN \
                     (SELECT id FROM audit WHERE time_ms < ?1 ORDER BY time_ms LIMIT ?2)",
                )
                .map_err(StoreError::sqlite("prepare prune audit"))?;
            let n = stmt
                .execute(params![to_i64(*before_ms, "retention cut-off")?, max_rows])
                .map_err(StoreError::sqlite("prune audit"))?;
            Ok((n as u64, None))
        }
        WriteOp::ContinueAuditIdsAfter { id } => {
            let id = to_i64(*id, "audit id")?;
            if id < w.next_audit {
                return Ok((0, None));
            }
            keep_last_audit_id(conn, id)?;
            w.next_audit = id.saturating_add(1);
            // The newest id in use, as far as a follower of the trail is concerned.
            Ok((0, Some(id)))
        }
        WriteOp::DeleteEndedLeasesBefore {
            before_ms,
            max_rows,
        } => {
            let mut stmt = conn
                .prepare_cached(
                    "DELETE FROM leases WHERE rowid IN (SELECT rowid FROM leases \
                     WHERE state <> 'live' AND ended_ms < ?1 ORDER BY ended_ms LIMIT ?2)",
                )
                .map_err(StoreError::sqlite("prepare prune leases"))?;
            let n = stmt
                .execute(params![to_i64(*before_ms, "retention cut-off")?, max_rows])
                .map_err(StoreError::sqlite("prune leases"))?;
            Ok((n as u64, None))
        }
    }
}

fn insert_lease<'a>(
    w: &mut Writer<'_>,
    lease: &'a NewLease,
    text: &mut JobText<'a>,
) -> Result<u64, StoreError> {
    let insert = &mut w.hot.insert_leases[ONE_ROW];
    bind_lease(insert, 0, lease, text)?;
    match insert.stmt.raw_execute() {
        Ok(n) => Ok(n as u64),
        Err(rusqlite::Error::SqliteFailure(e, _))
            if e.code == rusqlite::ErrorCode::ConstraintViolation =>
        {
            Err(StoreError::DuplicateLease { id: lease.id })
        }
        Err(e) => Err(StoreError::sqlite("insert lease")(e)),
    }
}

fn insert_audit<'a>(
    w: &mut Writer<'_>,
    e: &'a AuditEvent,
    text: &mut JobText<'a>,
) -> Result<i64, StoreError> {
    let id = w.next_audit;
    let insert = &mut w.hot.insert_audits[ONE_ROW];
    bind_audit(insert, 0, id, e, text)?;
    insert
        .stmt
        .raw_execute()
        .map_err(StoreError::sqlite("insert audit"))?;
    w.next_audit = id.saturating_add(1);
    Ok(id)
}

/// Bind `lease` as row `row` of an `INSERT INTO leases`.
fn bind_lease<'a>(
    insert: &mut Insert<'_>,
    row: usize,
    lease: &'a NewLease,
    text: &mut JobText<'a>,
) -> Result<(), StoreError> {
    text.encode(&lease.grants, lease.peer);
    // The lease's grants are never empty; should they be, they are stored as `[]`.
    let grants = text.grants(&lease.grants).unwrap_or("[]");
    let peer = text.peer(lease.peer);
    let (app_name, app_exe, app_uid, app_pid) = app_columns(lease.app.as_ref());
    let (issuer, serial) = certificate_columns(lease.certificate.as_deref());
    let values: [Param<'_>; LEASE_PARAMS] = [
        Param::Blob(&lease.id.0[..]),
        Param::Text(&lease.identity),
        Param::text(peer),
        Param::Text(grants),
        Param::text(app_name),
        Param::text(app_exe),
        Param::int(app_uid),
        Param::int(app_pid),
        Param::int(lease.requested_lifetime),
        Param::Int(lease.granted_lifetime.into()),
        Param::Int(to_i64(lease.created_ms, "creation time")?),
        Param::Int(to_i64(lease.expires_ms, "expiry time")?),
        Param::blob(issuer),
        Param::text(serial),
    ];
    insert.bind_row(row, &values)
}

/// Bind `e`, numbered `id`, as row `row` of an `INSERT INTO audit`.
fn bind_audit<'a>(
    insert: &mut Insert<'_>,
    row: usize,
    id: i64,
    e: &'a AuditEvent,
    text: &mut JobText<'a>,
) -> Result<(), StoreError> {
    let (app_name, app_exe, app_uid, app_pid) = app_columns(e.app.as_ref());
    let request = e.request.as_ref();
    text.encode(&e.grants, e.peer);
    let grants = text.grants(&e.grants);
    let peer = text.peer(e.peer);
    let hosts = request.and_then(|r| encode_hosts(&r.hosts));
    let remotes = request.and_then(|r| encode_prefixes(&r.remotes));
    let values: [Param<'_>; AUDIT_PARAMS] = [
        Param::Int(id),
        Param::Int(to_i64(e.time_ms, "event time")?),
        Param::Text(e.kind.name()),
        Param::text(e.outcome.map(|o| o.name())),
        Param::text(e.identity.as_deref()),
        Param::text(peer),
        Param::blob(e.lease.as_ref().map(|l| &l.0[..])),
        Param::Int(request.is_some().into()),
        Param::int(request.and_then(|r| r.protocol).map(|p| p.number())),
        Param::int(request.and_then(|r| r.ports).map(|p| p.first)),
        Param::int(request.and_then(|r| r.ports).map(|p| p.last)),
        Param::text(request.and_then(|r| r.app_id.as_deref())),
        Param::text(hosts.as_deref()),
        Param::text(remotes.as_deref()),
        Param::int(request.and_then(|r| r.lifetime)),
        Param::text(app_name),
        Param::text(app_exe),
        Param::int(app_uid),
        Param::int(app_pid),
        Param::text(grants),
        Param::int(e.granted_lifetime),
        Param::text(e.rule.as_deref()),
        Param::text(e.reason.as_deref()),
        Param::int(e.code.map(|c| c.number() as i64)),
        Param::text(e.actor.as_deref()),
    ];
    insert.bind_row(row, &values)
}

/// How far the multi-row INSERT of one table has come in a run of rows.
#[derive(Debug, Default)]
struct Filling {
    /// Rows of the run not yet bound.
    left: usize,
    /// The statement being bound, as an index into [`ROWS`].
    size: usize,
    /// Rows bound into it so far.
    bound: usize,
}

impl Filling {
    /// The statement (index into [`ROWS`]) and its row that the next row is bound as: the
    /// largest statement the rows left fill, chosen when the previous one was executed.
    fn slot(&mut self) -> (usize, usize) {
        if self.bound == 0 {
            self.size = ROWS.iter().position(|&n| n <= self.left).unwrap_or(ONE_ROW);
        }
        (self.size, self.bound)
    }

    /// Count the row just bound; true when its statement is full and is to be executed.
    fn bound_one(&mut self) -> bool {
        self.bound += 1;
        self.left = self.left.saturating_sub(1);
        let full = self.bound >= ROWS[self.size];
        if full {
            self.bound = 0;
        }
        full
    }
}

/// The lease rows and audit rows of a run of consecutive inserts in a transaction (across its
/// jobs, until an operation of another kind), each table's rows bound into its multi-row
/// statements, which are executed as they fill. Their results are known only then, so a
/// failure in a run is undone with the whole transaction, which runs again row by row.
#[derive(Debug, Default)]
struct Runs {
    leases: Filling,
    audits: Filling,
}

impl Runs {
    /// Whether every row of the last run was bound and executed.
    fn idle(&self) -> bool {
        self.leases.left == 0 && self.audits.left == 0
    }

    /// Count the rows of the run that begins at operation `op` of job `job`.
    fn plan(&mut self, batch: &[Job], job: usize, op: usize) {
        let (mut leases, mut audits) = (0, 0);
        let first = batch
            .get(job)
            .map_or(&[][..], |j| j.ops.get(op..).unwrap_or(&[]));
        let rest = batch.get(job + 1..).unwrap_or(&[]);
        for op in first.iter().chain(rest.iter().flat_map(|j| j.ops.iter())) {
            match op {
                WriteOp::InsertLease(_) => leases += 1,
                WriteOp::Audit(_) => audits += 1,
                _ => break,
            }
        }
        self.leases = Filling {
            left: leases,
            ..Filling::default()
        };
        self.audits = Filling {
            left: audits,
            ..Filling::default()
        };
    }

    fn insert_lease<'a>(
        &mut self,
        w: &mut Writer<'_>,
        lease: &'a NewLease,
        text: &mut JobText<'a>,
    ) -> Result<(), StoreError> {
        let (size, row) = self.leases.slot();
        let insert = &mut w.hot.insert_leases[size];
        bind_lease(insert, row, lease, text)?;
        if self.leases.bound_one() {
            executed(&mut insert.stmt, size, "insert leases")?;
        }
        Ok(())
    }

    fn insert_audit<'a>(
        &mut self,
        w: &mut Writer<'_>,
        e: &'a AuditEvent,
        text: &mut JobText<'a>,
    ) -> Result<i64, StoreError> {
        let id = w.next_audit;
        let (size, row) = self.audits.slot();
        let insert = &mut w.hot.insert_audits[size];
        bind_audit(insert, row, id, e, text)?;
        w.next_audit = id.saturating_add(1);
        if self.audits.bound_one() {
            executed(&mut insert.stmt, size, "insert audit events")?;
        }
        Ok(id)
    }
}

/// Execute a full multi-row INSERT of [`ROWS`]`[size]` rows.
fn executed(stmt: &mut Statement<'_>, size: usize, what: &'static str) -> Result<(), StoreError> {
    let n = stmt.raw_execute().map_err(StoreError::sqlite(what))?;
    if n != ROWS[size] {
        return Err(StoreError::corrupt(format!(
            "{what}: {n} rows inserted of {}",
            ROWS[size]
        )));
    }
    Ok(())
}

/// Keeps `id` in `meta` as the highest audit id used, unless a higher one is kept: the store
/// numbers on from it when it opens, whether or not a row holds it.
fn keep_last_audit_id(conn: &Connection, id: i64) -> Result<(), StoreError> {
    conn.prepare_cached(
        "INSERT INTO meta (key, value) VALUES ('audit_last_id', ?1) \
         ON CONFLICT (key) DO UPDATE SET value = max(value, excluded.value)",
    )
    .and_then(|mut s| s.execute([id]))
    .map(|_| ())
    .map_err(StoreError::sqlite("keep the last audit id"))
}

/// Apply job `job` of `batch` without a savepoint, its inserts through `runs`. On failure,
/// whether the transaction must run again carefully: when the job has several operations, or
/// when the failure was in a run of inserts (whose statements may hold other jobs' rows).
fn apply_fast<'a>(
    w: &mut Writer<'_>,
    batch: &'a [Job],
    job: usize,
    runs: &mut Runs,
    text: &mut JobText<'a>,
) -> Result<(u64, Option<i64>), (StoreError, bool)> {
    let ops = batch.get(job).map_or(&[][..], |j| &j.ops[..]);
    let several = ops.len() > 1;
    let mut changed = 0;
    let mut newest = None;
    for (i, op) in ops.iter().enumerate() {
        if runs.idle() && matches!(op, WriteOp::InsertLease(_) | WriteOp::Audit(_)) {
            runs.plan(batch, job, i);
        }
        match op {
            WriteOp::InsertLease(lease) => {
                runs.insert_lease(w, lease, text).map_err(|e| (e, true))?;
                changed += 1;
            }
            WriteOp::Audit(event) => {
                let id = runs.insert_audit(w, event, text).map_err(|e| (e, true))?;
                changed += 1;
                newest = Some(id);
            }
            other => {
                let (n, id) = apply(w, other, text).map_err(|e| (e, several))?;
                changed += n;
                newest = id.or(newest);
            }
        }
    }
    Ok((changed, newest))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::codec::encode_grants;
    use crate::store::types::AuditKind;
    use fwnp_proto::{Grant, PortRange, Protocol};
    use rusqlite::StatementStatus;

    fn grant_job(n: u8) -> Job {
        let lease = NewLease {
            id: LeaseId([n; 16]),
            identity: "fwnp://host/a".into(),
            peer: Some("192.0.2.1:4433".parse().unwrap()),
            grants: vec![Grant {
                protocol: Protocol::Tcp,
                ports: PortRange::single(1000 + u16::from(n)),
                host: "192.0.2.1".parse().unwrap(),
                remotes: vec![],
                app: None,
            }],
            app: None,
            requested_lifetime: None,
            granted_lifetime: 60,
            created_ms: 1_000,
            expires_ms: 61_000,
            certificate: None,
            max_leases: None,
        };
        let mut event = AuditEvent::new(1_000, AuditKind::Grant);
        event.lease = Some(lease.id);
        event.grants = lease.grants.clone();
        event.peer = lease.peer;
        Job {
            ops: vec![WriteOp::InsertLease(lease), WriteOp::audit(event)],
            reply: Reply::None,
            queued: std::time::Instant::now(),
        }
    }

    fn store_connection() -> (tempfile::TempDir, Connection) {
        let dir = tempfile::tempdir().unwrap();
        let mut conn = Connection::open(dir.path().join("fwnp.sqlite3")).unwrap();
        crate::store::schema::prepare(&mut conn, 1_000).unwrap();
        (dir, conn)
    }

    /// While busy, a group commit waits for jobs on their way, up to its operations' worth;
    /// idle, a job is committed alone and at once.
    #[test]
    fn a_busy_writer_waits_for_more_jobs_and_an_idle_one_does_not() {
        let (_dir, conn) = store_connection();
        let (writer, thread) = spawn(conn, 20_000, 1_000_000, 0, None).unwrap();
        let busy = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let seen = busy.clone();
        writer.coalesce(Coalescing {
            busy: Arc::new(move || seen.load(Ordering::Relaxed)),
            // Three grants' operations; far longer than the test takes.
            enough: 6,
            wait: std::time::Duration::from_secs(60),
        });
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .unwrap();
        runtime.block_on(async {
            let mut commits = tokio::task::JoinSet::new();
            for n in 1..=3 {
                let writer = writer.clone();
                commits.spawn(async move { writer.commit(grant_job(n).ops).await });
                // Apart: without the wait, each would be committed alone.
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            while let Some(done) = commits.join_next().await {
                done.unwrap().unwrap();
            }
            let stats = writer.stats();
            assert_eq!((stats.transactions, stats.jobs), (1, 3), "{stats:?}");

            busy.store(false, Ordering::Relaxed);
            let alone = writer.commit(grant_job(4).ops);
            // Were it waiting for more, it would be answered only after the 60 s wait.
            tokio::time::timeout(std::time::Duration::from_secs(20), alone)
                .await
                .expect("an idle writer commits at once")
                .unwrap();
            let stats = writer.stats();
            assert_eq!((stats.transactions, stats.jobs), (2, 4), "{stats:?}");
        });
        writer.close();
        thread.join().unwrap();
    }

    /// A grant's lease row and audit row share one encoding of the grants and the peer; other
    /// grants or peers are encoded anew.
    #[test]
    fn a_jobs_grants_and_peer_are_encoded_once() {
        let job = grant_job(1);
        let [WriteOp::InsertLease(lease), WriteOp::Audit(event)] = &job.ops[..] else {
            panic!("a grant's job is its lease and its event");
        };
        let mut text = JobText::default();
        text.encode(&lease.grants, lease.peer);
        let lease_grants = text.grants(&lease.grants).unwrap().as_ptr();
        let lease_peer = text.peer(lease.peer).unwrap().as_ptr();
        text.encode(&event.grants, event.peer);
        assert_eq!(text.grants(&event.grants).unwrap().as_ptr(), lease_grants);
        assert_eq!(text.peer(event.peer).unwrap().as_ptr(), lease_peer);
        assert_eq!(
            text.grants(&event.grants),
            Some(&*encode_grants(&lease.grants))
        );
        assert_eq!(text.peer(event.peer), Some("192.0.2.1:4433"));

        let other = grant_job(2);
        let WriteOp::InsertLease(other) = &other.ops[0] else {
            panic!("a grant's job begins with its lease");
        };
        let other_peer = "192.0.2.2:1".parse().unwrap();
        text.encode(&other.grants, Some(other_peer));
        assert_eq!(
            text.grants(&other.grants),
            Some(&*encode_grants(&other.grants))
        );
        assert_eq!(
            text.grants(&lease.grants),
            None,
            "no longer the encoded grants"
        );
        assert_eq!(text.peer(Some(other_peer)), Some("192.0.2.2:1"));
        assert_eq!(text.peer(None), None);
        text.encode(&[], None);
        assert_eq!(text.grants(&[]), None, "no grants, no text");
    }

    /// A waker that notes, each time it is woken, how many holders a certificate has: the
    /// jobs' operations hold it until they are freed.
    struct HoldersAtWake {
        certificate: Arc<CertificateName>,
        seen: std::sync::Mutex<Vec<usize>>,
    }

    impl std::task::Wake for HoldersAtWake {
        fn wake(self: Arc<Self>) {
            self.wake_by_ref();
        }

        fn wake_by_ref(self: &Arc<Self>) {
            let holders = Arc::strong_count(&self.certificate);
            self.seen.lock().unwrap().push(holders);
        }
    }

    /// The replies of a transaction are sent one after the other, before the operations of its
    /// jobs are freed: each waiting task is woken while every job's operations are still held.
    #[test]
    fn a_batchs_replies_are_all_sent_before_its_operations_are_freed() {
        use std::future::Future;
        use std::task::{Context, Poll, Waker};

        let certificate = Arc::new(CertificateName {
            issuer: vec![0x30, 0x00],
            serial: fwnp_trust::identity::Serial::from_der_bytes(&[1]),
        });
        let holders = Arc::new(HoldersAtWake {
            certificate: Arc::clone(&certificate),
            seen: std::sync::Mutex::new(Vec::new()),
        });
        let waker = Waker::from(Arc::clone(&holders));
        let mut receivers = Vec::new();
        let batch: Vec<Job> = (1..=5)
            .map(|n| {
                let mut job = grant_job(n);
                if let WriteOp::InsertLease(lease) = &mut job.ops[0] {
                    lease.certificate = Some(Arc::clone(&certificate));
                }
                let (tx, mut rx) = oneshot::channel();
                let pending = std::pin::Pin::new(&mut rx).poll(&mut Context::from_waker(&waker));
                assert!(pending.is_pending());
                receivers.push(rx);
                job.reply = Reply::Async(tx);
                job
            })
            .collect();
        let (sender, _receiver) = mpsc::unbounded_channel();
        let shared = WriterShared {
            sender,
            counters: Counters::default(),
            max_pending_ops: 100,
            audit_watch: watch::channel(0).0,
        };
        shared.counters.pending_ops.store(10, Ordering::Relaxed);
        let results = (1..=5).map(|n| Ok(n as u64)).collect();
        let held = Arc::strong_count(&certificate);
        assert_eq!(held, 2 + 5, "the test, the waker and each job's lease");

        finish(
            &shared,
            batch,
            std::time::Instant::now(),
            10,
            results,
            Vec::new(),
        );

        assert_eq!(*holders.seen.lock().unwrap(), vec![held; 5]);
        assert_eq!(Arc::strong_count(&certificate), 2, "freed once answered");
        for (n, mut rx) in (1..=5u64).zip(receivers) {
            let answer = std::pin::Pin::new(&mut rx).poll(&mut Context::from_waker(&waker));
            assert!(matches!(answer, Poll::Ready(Ok(Ok(got))) if got == n));
        }
        assert_eq!(shared.counters.pending_ops.load(Ordering::Relaxed), 0);
        assert_eq!(shared.counters.jobs.load(Ordering::Relaxed), 5);
    }

    /// (rows, runs) of every multi-row statement that ran.
    type Ran = Vec<(usize, i32)>;

    /// The statements run by one transaction's inserts, by size: (rows, runs) of every
    /// statement that ran, lease and audit statements apart.
    fn insert_runs(w: &Writer<'_>) -> (Ran, Ran) {
        let ran = |inserts: &[Insert<'_>]| {
            ROWS.iter()
                .zip(inserts)
                .map(|(&n, i)| (n, i.stmt.get_status(StatementStatus::Run)))
                .filter(|&(_, runs)| runs > 0)
                .collect()
        };
        (ran(&w.hot.insert_leases), ran(&w.hot.insert_audits))
    }

    fn job(ops: Vec<WriteOp>) -> Job {
        Job {
            ops,
            reply: Reply::None,
            queued: std::time::Instant::now(),
        }
    }

    /// Another kind of operation ends a run of inserts: the rows before it are inserted
    /// before it runs (a renewal finds the lease granted in the same transaction), and each
    /// run takes its own statements. Audit ids follow the order of the jobs.
    #[test]
    fn a_run_of_inserts_ends_at_another_operation() {
        let (_dir, conn) = store_connection();
        let mut w = Writer::new(&conn, 0).unwrap();
        let mut lone = AuditEvent::new(2_000, AuditKind::Grant);
        lone.identity = Some("fwnp://host/lone".into());
        let batch = vec![
            grant_job(1),
            grant_job(2),
            grant_job(3),
            job(vec![WriteOp::RenewLease {
                id: LeaseId([1; 16]),
                renewed_ms: 5_000,
                expires_ms: 65_000,
                granted_lifetime: 60,
                certificate: None,
            }]),
            grant_job(4),
            grant_job(5),
            job(vec![WriteOp::EndLease {
                id: LeaseId([2; 16]),
                end: LeaseEnd::Released,
                ended_ms: 6_000,
                by: None,
                why: None,
            }]),
            job(vec![WriteOp::audit(lone)]),
            grant_job(6),
        ];
        let BatchRun::Done(results, newest, true) = run_batch(&mut w, &batch, false) else {
            panic!("the batch did not commit");
        };
        let changed: Vec<u64> = results.into_iter().map(Result::unwrap).collect();
        assert_eq!(changed, vec![2, 2, 2, 1, 2, 2, 1, 1, 2]);
        let ids = |ids: &[i64]| ids.iter().map(|&i| Some(i)).collect::<Vec<_>>();
        let mut expected = ids(&[1, 2, 3]);
        expected.push(None);
        expected.extend(ids(&[4, 5]));
        expected.push(None);
        expected.extend(ids(&[6, 7]));
        assert_eq!(newest, expected);
        // Leases: runs of 3, 2 and 1 rows; audit rows: 3, 2 and 2.
        assert_eq!(
            insert_runs(&w),
            (vec![(2, 2), (1, 2)], vec![(2, 3), (1, 1)])
        );
        let (renewed, ended): (Option<i64>, String) = conn
            .query_row(
                "SELECT (SELECT renewed_ms FROM leases WHERE id = ?1), \
                 (SELECT state FROM leases WHERE id = ?2)",
                params![&[1u8; 16][..], &[2u8; 16][..]],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        assert_eq!((renewed, ended.as_str()), (Some(5_000), "released"));
        let trail: Vec<(i64, Option<Vec<u8>>, Option<String>)> = conn
            .prepare("SELECT id, lease, identity FROM audit ORDER BY id")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        let leases: Vec<Option<Vec<u8>>> = trail.iter().map(|t| t.1.clone()).collect();
        let of = |n: u8| Some(vec![n; 16]);
        assert_eq!(leases, vec![of(1), of(2), of(3), of(4), of(5), None, of(6)]);
        assert_eq!(trail[5].2.as_deref(), Some("fwnp://host/lone"));
    }

    /// A job whose row fails a multi-row statement (a lease id already used) undoes the
    /// statement's other rows with it: the transaction is rolled back and run again row by
    /// row, where that job alone fails and the others commit, numbered without a gap.
    #[test]
    fn a_failing_row_in_a_run_fails_its_job_alone() {
        let (_dir, conn) = store_connection();
        let mut w = Writer::new(&conn, 0).unwrap();
        let WriteOp::InsertLease(again) = grant_job(1).ops.swap_remove(0) else {
            panic!("a grant's job begins with its lease");
        };
        let batch = vec![
            grant_job(1),
            grant_job(2),
            job(vec![WriteOp::InsertLease(again)]),
            grant_job(3),
        ];
        assert!(matches!(
            run_batch(&mut w, &batch, false),
            BatchRun::RedoCarefully
        ));
        assert_eq!(
            w.next_audit, 1,
            "the ids of the undone rows are given again"
        );
        let BatchRun::Done(results, newest, true) = run_batch(&mut w, &batch, true) else {
            panic!("the careful batch did not commit");
        };
        assert!(
            matches!(
                &results[..],
                [Ok(2), Ok(2), Err(StoreError::DuplicateLease { id }), Ok(2)] if *id == LeaseId([1; 16])
            ),
            "{results:?}"
        );
        assert_eq!(newest, vec![Some(1), Some(2), None, Some(3)]);
        let counts: (i64, i64, i64) = conn
            .query_row(
                "SELECT (SELECT count(*) FROM leases), (SELECT count(*) FROM audit), \
                 (SELECT max(id) FROM audit)",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .unwrap();
        assert_eq!(counts, (3, 3, 3));
    }

    /// The grants of a transaction insert their lease rows and their audit rows with the
    /// multi-row statements prepared when the writer started, the fewest the sizes allow (24
    /// grants: one of 16 rows and one of 8 per table; 6: one of 4 and one of 2), and each
    /// transaction runs its BEGIN and COMMIT: nothing is prepared or looked up per operation.
    #[test]
    fn a_grant_runs_the_writers_own_statements_once_each() {
        let (_dir, conn) = store_connection();
        let mut w = Writer::new(&conn, 0).unwrap();
        let first: Vec<Job> = (1..=24).map(grant_job).collect();
        let second: Vec<Job> = (25..=30).map(grant_job).collect();
        for batch in [&first, &second] {
            let run = run_batch(&mut w, batch, false);
            let BatchRun::Done(results, newest, true) = run else {
                panic!("the batch did not commit");
            };
            assert!(results.iter().all(Result::is_ok), "{results:?}");
            assert_eq!(newest.len(), batch.len());
        }
        let runs = |s: &Statement<'_>| s.get_status(StatementStatus::Run);
        let by_size = vec![(16, 1), (8, 1), (4, 1), (2, 1)];
        assert_eq!(insert_runs(&w), (by_size.clone(), by_size));
        assert_eq!(runs(&w.hot.begin), 2);
        assert_eq!(runs(&w.hot.commit), 2);
        assert_eq!(w.next_audit, 31);
        let counts: (i64, i64) = conn
            .query_row(
                "SELECT (SELECT count(*) FROM leases), (SELECT count(*) FROM audit)",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        assert_eq!(counts, (30, 30));
    }

    /// A NULL column is bound once: a row bound where the statement's parameter already holds
    /// NULL skips it, and a row with a value there and the next one without it store what each
    /// row had.
    #[test]
    fn a_null_already_bound_is_not_bound_again_and_a_value_is_replaced_by_null() {
        let (_dir, conn) = store_connection();
        let mut w = Writer::new(&conn, 0).unwrap();
        let with_app = |n: u8| {
            let mut job = grant_job(n);
            if let WriteOp::InsertLease(lease) = &mut job.ops[0] {
                lease.app = Some(fwnp_proto::AppInfo {
                    name: Some("sshd".into()),
                    executable: Some("/usr/sbin/sshd".into()),
                    uid: Some(0),
                    pid: Some(77),
                });
            }
            job
        };
        let mut binds = Vec::new();
        for job in [grant_job(1), grant_job(2), with_app(3), grant_job(4)] {
            let before = w.hot.insert_leases[ONE_ROW].binds;
            let BatchRun::Done(results, _, true) = run_batch(&mut w, &[job], false) else {
                panic!("the batch did not commit");
            };
            assert!(results.iter().all(Result::is_ok), "{results:?}");
            binds.push(w.hot.insert_leases[ONE_ROW].binds - before);
        }
        // Of 14 columns, a grant without an application, a requested lifetime or a
        // certificate has 7 NULL: never bound since the statement was prepared. The
        // application's 4 columns are bound when it has one, and once more as NULL after.
        assert_eq!(binds, vec![7, 7, 11, 11]);
        type App = (Option<String>, Option<String>, Option<i64>, Option<i64>);
        let apps: Vec<App> = conn
            .prepare("SELECT app_name, app_exe, app_uid, app_pid FROM leases ORDER BY id")
            .unwrap()
            .query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        let none = (None, None, None, None);
        let sshd = (
            Some("sshd".to_string()),
            Some("/usr/sbin/sshd".to_string()),
            Some(0),
            Some(77),
        );
        assert_eq!(apps, vec![none.clone(), none.clone(), sshd, none]);
    }
}
