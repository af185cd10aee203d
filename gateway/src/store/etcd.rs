//! The cluster store: the leases and the epoch of several gateways in one etcd cluster (v3 API),
//! so that what one gateway grants every other one sees, and the cluster's rules hold across
//! them. No consensus is written here: etcd's transactions and revisions do that.
//!
//! # Keys (under the configured prefix `P`)
//! - `P/epoch`: the cluster's epoch, decimal; created once by the first gateway (a transaction
//!   that puts it only while the key has no create revision) and read by every other one.
//!   It names the lease state these keys hold: it changes only when that state is lost or
//!   replaced (see "A state lost or replaced").
//! - `P/leases/ID` (ID in hex): one live lease, as a compact CBOR map. An ended lease's key is
//!   deleted; its history is in the audit trail.
//! - `P/hosts/IDENTITY`: how many live leases the host holds across the cluster, decimal;
//!   deleted at zero.
//! - `P/ended/ID`: a tombstone, put in the transaction that deletes `P/leases/ID`: how the
//!   lease ended (released, expired, revoked with its reason), when, by whom, why, through
//!   which site. A delete carries no value; the tombstone tells the other gateways, which
//!   follow the keys (see below). It is attached to an etcd lease of [`TOMBSTONE_TTL`], granted
//!   again every half of it, so tombstones vanish by themselves.
//! - `P/fences/NAME` (NAME random, in hex): the fence of a transaction that inserted leases and
//!   got no answer. Every such transaction compares its own fence absent; putting it keeps the
//!   transaction from applying any later (see "Group commits"). Put with the tombstones' etcd
//!   lease, so fences vanish too.
//!
//! # One transaction per commit
//! Every commit is one etcd transaction whose comparisons carry what must hold across the
//! cluster, on the revisions this gateway last saw of its keys (see "Group commits"):
//! - an insert only while the lease's key does not exist (create revision 0);
//! - a renewal or an end only while the key is the one read (same mod revision), and, when this
//!   gateway has seen the lease before, the same incarnation of it (same create revision: a
//!   lease's owner is written once, by its insert, so the same incarnation is the same owner);
//!   a release only by the host that holds the lease (the one it names as ending it);
//!   an expiry only of a lease whose stored expiry has passed, so that a lease renewed through
//!   another gateway is not expired by this one;
//! - the host's lease count, with its counter key compared on its mod revision and rewritten in
//!   the same transaction, within the `max_leases` the insert carries. A counter key rather
//!   than counting a per-host key range: etcd compares keys one by one and cannot compare a
//!   count, and one small key per host keeps the check at one comparison.
//!
//! A check that fails on what was just read is refused (a duplicate lease, a lease not live:
//! the same errors as the SQLite store; a quota or an expiry that no longer holds:
//! [`WriteError::Conflict`]); a transaction whose comparison fails because another gateway wrote
//! in between is read and tried again, a bounded number of times, then refused as a conflict.
//! A request etcd does not answer within the configured timeout (a member cut off from its
//! quorum) is [`WriteError::Unavailable`].
//!
//! # Group commits
//! Commits queue to one task that groups them into batches (up to [`MAX_BATCH_JOBS`] jobs, as
//! etcd takes at most 128 operations per transaction by default), one transaction each, as the
//! SQLite writer groups its commits: one etcd write per grant would cap the gateway at etcd's
//! own rate of single writes.
//!
//! A batch is one round trip in the common case. The gateway keeps the value and revisions of
//! each lease key and host counter as its own last transaction left them (the revision of a
//! transaction is the mod revision of every key it wrote) or as it last read them, and compares
//! on those instead of reading them again; an insert is compared on its key not existing
//! without reading it. Only keys not known are read. A comparison that fails (another gateway
//! wrote the key, or the lease existed) costs a read of every key of the batch and a second
//! transaction, as does a job refused on known values alone: its refusal is checked again on
//! what is read, so that a value grown stale (a lease ended through another gateway, say) does
//! not refuse what the cluster allows. A job that fails its check on what was read is left out
//! of the batch alone.
//!
//! Up to four batches (`BATCHES_IN_FLIGHT`) are in flight at once, so that the gateway does not
//! wait for each answer of etcd before sending the next transaction. Two batches in flight never
//! share a key: a job whose lease key or host counter a batch in flight holds waits for that batch
//! to end, and so does every later job that shares a key with it, so the jobs on one key keep their
//! order, and the second batch counts on the counter's revision the first one wrote (were two
//! batches to count on one revision, etcd would take one and refuse the other, which would be read
//! and sent again). An end of a lease whose host this gateway does not know yet goes with the jobs
//! after it when no batch is in flight: its host counter is known only once the lease is read. Each
//! job is still answered only once the transaction holding it committed (or with why it did not).
//!
//! Without a read before it, a transaction is the first to meet a cluster in trouble, and one
//! that gets no answer (sent to a member whose leader just died, or to one without quorum) may
//! have applied, or apply once the quorum is back. Its batch is then read: an insert found as
//! it was written was taken, and its job is answered as committed; the others are tried again on
//! what was read. Until a transaction commits again, batches read first, as a read is sent again
//! while the timeout lasts and never applies late. A lease that a transaction reported failed may
//! have inserted is kept aside, and, should the cluster have taken it after all (its host was
//! refused it), ended as soon as the cluster answers again, with no audit record of a grant.
//! A read alone cannot settle it: the transaction may still be on its way to the leader and
//! apply after the read found nothing. So every transaction that inserts leases also compares
//! a fence key of its own absent (`P/fences/NAME`), and the gateway settles what is kept aside
//! with one transaction that puts the fences of the transactions reported failed and reads
//! their leases: one that applied before it is found and ended, one that comes after it fails
//! its comparison. A fence lives at least half of [`TOMBSTONE_TTL`], far longer than a proposal
//! stays in flight. Until the cluster answers, the settling is tried again every [`SETTLE_PAUSE`], with
//! or without commits to send.
//!
//! # Following the cluster
//! Every gateway watches the keys from the revision of its restore ([`EtcdStore::watch`]) and
//! applies each change to its own lease book and kernel filter, so that every gateway enforces
//! every lease, and a lease granted through one gateway is renewed or released through any.
//! A lost watch lists the leases again and the gateway reconciles. See [`ClusterChange`].
//!
//! # A state lost or replaced
//! The keys can be lost or replaced under running gateways: the prefix deleted, etcd restored
//! from an old snapshot, or a fresh etcd started on an empty data directory at the same
//! address. Every gateway finds out for itself, from what etcd answers:
//! - the watch sees `P/epoch` deleted, or put with another epoch (another gateway found out
//!   first and gave the cluster a new one);
//! - each list (after a lost watch) reads `P/epoch` in its transaction, and once per request
//!   timeout the watch reads it alone: absent, or another epoch, or an answer from another
//!   etcd cluster (its header's cluster id), or at a revision below one the gateway already
//!   took in (revisions never go back in one etcd's history; a read is linearizable, so it
//!   answers at least every revision committed before it). The read matters for a fresh or
//!   restored etcd: a watch from a revision it has not reached yet waits silently, and no
//!   event ever comes.
//!
//! The gateway then takes the cluster's epoch: the one `P/epoch` holds when another gateway
//! already gave it a new one; else a new one, created or swapped in by a transaction that
//! compares the key (absent, or holding the old epoch), so that of the gateways racing to
//! replace it one succeeds and the others read its epoch. It lists the leases the state holds
//! now and hands them over as [`ClusterChange::Replaced`], forgets what it knew of the keys'
//! revisions (and the etcd lease of its tombstones, which a fresh etcd does not have), and
//! watches from the list's revision.
//!
//! What etcd does not show cannot be found: a snapshot put back whose revision has already
//! caught up with the ones a gateway took in before it looked, or one restored with its
//! revisions bumped past them (`etcdutl snapshot restore --bump-revision`), keeps its epoch key
//! and its cluster id. Its watches are cancelled as compacted (with `--mark-compacted`), so the
//! gateways list again and their books and kernels follow the state, but under the old epoch:
//! hosts learn of a lost lease when its Renew is answered unknown-lease. An operator who puts
//! a snapshot back deletes `P/epoch` with it to have the hosts told at once.
//!
//! # Expiry
//! Leases carry no etcd lease (TTL): each gateway expires the leases in its book when they run
//! out, with an end that etcd takes only from the first gateway and only while the stored expiry
//! has passed, so an expiry happens (and is audited) once, and a renewal made elsewhere wins:
//! the gateway whose end etcd refused for that keeps the lease with the stored expiry. The
//! other gateways see the expiry as a delete. An end that could not be stored (no quorum) is
//! made again once the cluster answers: the watch lists the leases again, and the lease comes
//! back past its expiry. An etcd TTL would delete the key without the host's counter and
//! without an audit record.
//!
//! # Audit
//! Audit records stay in the gateway's own SQLite database, written after the etcd commit they
//! describe: each gateway records what it decided, its admin API reads them as before, and the
//! etcd transactions stay small (a record per grant would halve the grants per transaction).
//! The cluster module publishes them to etcd afterwards, in batches of their own.
//!
//! # Threads
//! The etcd client runs on a thread of its own with its own runtime, as the SQLite writer does,
//! so that the store can be used from any runtime (or from several, one after the other).

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, GetOptions, Identity, KeyValue,
    KvClient, LeaseClient, PutOptions, TlsOptions, Txn, TxnOp, TxnOpResponse,
};
use fwnp_proto::{AppInfo, Epoch, LeaseId};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc::error::TryRecvError;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;

use super::backend::{LeaseStore, WriteError, WriteFuture};
use super::codec::{decode_grants, encode_grants};
use super::{
    AuditEvent, AuditKind, LeaseEnd, LeaseFilter, LeaseRecord, LeaseState, NewLease, Outcome,
    Restored, StoreError, StoreWriter, WriteOp,
};
use crate::config::EtcdConfig;
use fwnp_trust::identity::{CertificateName, Serial};

#[path = "etcd_watch.rs"]
mod watch;

pub use watch::{ClusterChange, ClusterEnd, SILENCE_TIMEOUTS, TOMBSTONE_TTL};
use watch::{Follower, Tombstone};

/// The most jobs one transaction takes: each adds at most two comparisons and two operations,
/// within etcd's default of 128 operations per transaction.
pub const MAX_BATCH_JOBS: usize = 48;

/// The most lease operations one commit may hold (it must fit one transaction).
pub const MAX_JOB_LEASE_OPS: usize = 48;

/// How long a gateway with leases to settle (see "Group commits") waits before it tries again
/// while the cluster does not answer.
pub const SETTLE_PAUSE: Duration = Duration::from_millis(250);

/// How many batches may be in flight to etcd at once (see the module documentation): etcd
/// takes the transactions of several batches in one round of its log.
const BATCHES_IN_FLIGHT: usize = 4;

/// The most lease keys (and host counters) a gateway keeps the last seen value of; past it,
/// what it knows is forgotten and read again as needed (leases ended through other gateways
/// are not removed one by one).
const KNOWN_MAX: usize = 1 << 20;

/// How many times a batch whose comparisons failed (another gateway wrote in between) is read
/// and tried again before its jobs are refused as conflicts.
const RETRIES: usize = 3;

/// Why the cluster store could not be set up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EtcdError {
    /// A TLS file could not be read.
    #[error("etcd TLS: cannot read {path}: {source}")]
    ReadTls {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The cluster did not answer (or refused) within the timeout.
    #[error("etcd at {endpoints}: {reason}")]
    Unreachable {
        /// The endpoints tried.
        endpoints: String,
        /// What failed.
        reason: String,
    },
    /// A key holds what this gateway cannot read.
    #[error("etcd: {0}")]
    Corrupt(String),
    /// The store's thread could not be started.
    #[error("etcd: cannot start the client thread: {0}")]
    Thread(#[source] std::io::Error),
}

/// Leases and the epoch in etcd, shared by the gateways of a cluster; audit records in this
/// gateway's own SQLite database. See the module documentation.
///
/// ```no_run
/// use fwnp_gateway::config::EtcdConfig;
/// use fwnp_gateway::store::{EtcdStore, LeaseStore, Store};
/// # async fn example(config: &EtcdConfig) -> Result<(), Box<dyn std::error::Error>> {
/// let local = Store::open("/var/lib/fwnp")?;
/// let store = EtcdStore::connect(config, local.writer().clone()).await?;
/// let restored = store.restore(fwnp_gateway::store::now_ms()).await?;
/// println!("epoch {:x}, {} live leases", store.epoch(), restored.live.len());
/// # Ok(()) }
/// ```
#[derive(Debug, Clone)]
pub struct EtcdStore {
    state: Arc<StateMark>,
    site: Arc<str>,
    jobs: mpsc::UnboundedSender<Msg>,
    counters: Arc<Counters>,
    applied: Arc<AtomicI64>,
    resync: Arc<AtomicBool>,
}

/// The cluster's lease state as this gateway last found it: its epoch, and the etcd cluster
/// that answered for it. Shared by the store's handle, its worker and its watch; changed only
/// by the watch, when it finds the state lost or replaced.
#[derive(Debug, Default)]
struct StateMark {
    epoch: AtomicU64,
    /// The etcd cluster id of the answers (0 before the first).
    cluster_id: AtomicU64,
}

impl StateMark {
    fn epoch(&self) -> Epoch {
        self.epoch.load(Ordering::Acquire)
    }
}

/// The write transactions' counters, shared by the store's handle and its worker.
#[derive(Debug, Default)]
struct Counters {
    transactions: AtomicU64,
    conflicts: AtomicU64,
    unanswered: AtomicU64,
}

/// What a gateway's write transactions to etcd met ([`EtcdStore::counts`]).
///
/// ```
/// let counts = fwnp_gateway::store::EtcdCounts { transactions: 10, conflicts: 1, unanswered: 0 };
/// assert_eq!(counts.transactions - counts.conflicts, 9);
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EtcdCounts {
    /// Write transactions etcd answered, applied or not.
    pub transactions: u64,
    /// Of those, the ones not applied because a key they compared had changed (another
    /// gateway wrote it, or what this one knew of it was stale); their jobs are read again
    /// and retried.
    pub conflicts: u64,
    /// Write transactions sent without an answer (timeout, no leader, connection lost):
    /// they may have applied.
    pub unanswered: u64,
}

enum Msg {
    Watch {
        changes: mpsc::UnboundedSender<ClusterChange>,
    },
    Lease {
        id: LeaseId,
        reply: oneshot::Sender<Result<Option<LeaseRecord>, WriteError>>,
    },
    Leases {
        filter: LeaseFilter,
        reply: oneshot::Sender<Result<Vec<LeaseRecord>, WriteError>>,
    },
    Commit {
        ops: Vec<WriteOp>,
        reply: Option<oneshot::Sender<Result<(), WriteError>>>,
    },
    Restore {
        now_ms: u64,
        reply: oneshot::Sender<Result<Restored, WriteError>>,
    },
}

impl EtcdStore {
    /// Connects to the cluster, creating the cluster's epoch if no gateway has yet; audit
    /// records go to `audit` (the gateway's SQLite writer). Fails when the cluster does not
    /// answer within the configured timeout.
    pub async fn connect(config: &EtcdConfig, audit: StoreWriter) -> Result<EtcdStore, EtcdError> {
        // TLS files are read here, so that a missing one fails before the thread starts.
        let options = connect_options(config)?;
        let site = Arc::from(config.site.as_str());
        let config = config.clone();
        let (sender, receiver) = mpsc::unbounded_channel();
        let (ready, started) = oneshot::channel();
        let counters = Arc::new(Counters::default());
        let counter = counters.clone();
        let applied = Arc::new(AtomicI64::new(0));
        let applied_by_worker = applied.clone();
        let resync = Arc::new(AtomicBool::new(false));
        let resync_by_worker = resync.clone();
        let state = Arc::new(StateMark::default());
        let state_of_worker = state.clone();
        std::thread::Builder::new()
            .name("fwnp-etcd".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(e) => {
                        let _ = ready.send(Err(EtcdError::Thread(e)));
                        return;
                    }
                };
                runtime.block_on(async move {
                    let worker = match Worker::connect(
                        &config,
                        options,
                        audit,
                        counter,
                        applied_by_worker,
                        resync_by_worker,
                        state_of_worker,
                    )
                    .await
                    {
                        Ok(worker) => worker,
                        Err(e) => {
                            let _ = ready.send(Err(e));
                            return;
                        }
                    };
                    if ready.send(Ok(())).is_ok() {
                        worker.run(receiver).await;
                    }
                });
            })
            .map_err(EtcdError::Thread)?;
        started.await.map_err(|_| {
            EtcdError::Thread(std::io::Error::other("the client thread ended at start"))
        })??;
        Ok(EtcdStore {
            state,
            site,
            jobs: sender,
            counters,
            applied,
            resync,
        })
    }

    /// Asks the watch to list the leases again as soon as the cluster answers: an end this
    /// gateway could not store (the quorum lost) leaves its lease in etcd, and no event will
    /// tell; listed again, it comes back past its expiry and is ended then.
    ///
    /// ```no_run
    /// # fn example(store: fwnp_gateway::store::EtcdStore) {
    /// store.resync();
    /// # }
    /// ```
    pub fn resync(&self) {
        self.resync.store(true, Ordering::Release);
    }

    /// The last revision of the cluster's leases this gateway has taken in: that of its
    /// restore, then of each change its watch handed over. 0 before the restore.
    pub fn applied_revision(&self) -> i64 {
        self.applied.load(Ordering::Acquire)
    }

    /// Starts following the cluster's leases from the revision of the restore (call it after
    /// [`LeaseStore::restore`]): each change comes out of the receiver, in revision order. See
    /// [`ClusterChange`]. Following stops when the receiver is dropped.
    ///
    /// ```no_run
    /// # use fwnp_gateway::store::{ClusterChange, EtcdStore, LeaseStore};
    /// # async fn example(store: EtcdStore) -> Result<(), Box<dyn std::error::Error>> {
    /// store.restore(fwnp_gateway::store::now_ms()).await?;
    /// let mut changes = store.watch()?;
    /// while let Some(change) = changes.recv().await {
    ///     if let ClusterChange::Stored { lease, .. } = change {
    ///         println!("{} expires at {}", lease.id, lease.expires_ms);
    ///     }
    /// }
    /// # Ok(()) }
    /// ```
    pub fn watch(&self) -> Result<mpsc::UnboundedReceiver<ClusterChange>, WriteError> {
        let (changes, receiver) = mpsc::unbounded_channel();
        self.send(Msg::Watch { changes })?;
        Ok(receiver)
    }

    /// The cluster's live leases that `filter` asks for (ended ones are in the audit trails
    /// only: `include_ended` finds none more), soonest expiry first, then by lease id, read
    /// from etcd.
    ///
    /// ```no_run
    /// # use fwnp_gateway::store::{EtcdStore, LeaseFilter};
    /// # async fn example(store: EtcdStore) -> Result<(), Box<dyn std::error::Error>> {
    /// let filter = LeaseFilter { host: Some("fwnp://host/web-*".into()), ..LeaseFilter::default() };
    /// for lease in store.leases(&filter).await? {
    ///     println!("{} {}", lease.id, lease.identity);
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn leases(&self, filter: &LeaseFilter) -> Result<Vec<LeaseRecord>, WriteError> {
        let (reply, answer) = oneshot::channel();
        self.send(Msg::Leases {
            filter: filter.clone(),
            reply,
        })?;
        answer
            .await
            .map_err(|_| WriteError::Store(StoreError::WriterStopped))?
    }

    /// The lease as the cluster holds it now (`None` once it ended), read from etcd.
    ///
    /// ```no_run
    /// # use fwnp_gateway::store::EtcdStore;
    /// # async fn example(store: EtcdStore, id: fwnp_proto::LeaseId) -> Result<(), Box<dyn std::error::Error>> {
    /// match store.lease(id).await? {
    ///     Some(lease) => println!("live until {}", lease.expires_ms),
    ///     None => println!("ended"),
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn lease(&self, id: LeaseId) -> Result<Option<LeaseRecord>, WriteError> {
        let (reply, answer) = oneshot::channel();
        self.send(Msg::Lease { id, reply })?;
        answer
            .await
            .map_err(|_| WriteError::Store(StoreError::WriterStopped))?
    }

    /// This gateway's site name in the cluster.
    pub fn site(&self) -> &str {
        &self.site
    }

    /// How many write transactions etcd answered for this gateway: fewer than its commits
    /// when they were grouped.
    pub fn transactions(&self) -> u64 {
        self.counters.transactions.load(Ordering::Relaxed)
    }

    /// What this gateway's write transactions met, counted since it started.
    ///
    /// ```no_run
    /// # fn example(store: fwnp_gateway::store::EtcdStore) {
    /// let counts = store.counts();
    /// println!("{} of {} transactions found a key changed", counts.conflicts, counts.transactions);
    /// # }
    /// ```
    pub fn counts(&self) -> EtcdCounts {
        EtcdCounts {
            transactions: self.transactions(),
            conflicts: self.counters.conflicts.load(Ordering::Relaxed),
            unanswered: self.counters.unanswered.load(Ordering::Relaxed),
        }
    }

    fn send(&self, msg: Msg) -> Result<(), WriteError> {
        self.jobs
            .send(msg)
            .map_err(|_| WriteError::Store(StoreError::WriterStopped))
    }
}

impl LeaseStore for EtcdStore {
    /// The cluster's epoch as this gateway last found it: it changes while the gateway runs
    /// when the watch finds the cluster's state lost or replaced ([`ClusterChange::Replaced`]).
    fn epoch(&self) -> Epoch {
        self.state.epoch()
    }

    fn restore(&self, now_ms: u64) -> WriteFuture<'_, Restored> {
        let (reply, answer) = oneshot::channel();
        let sent = self.send(Msg::Restore { now_ms, reply });
        Box::pin(async move {
            sent?;
            answer
                .await
                .map_err(|_| WriteError::Store(StoreError::WriterStopped))?
        })
    }

    fn commit(&self, ops: Vec<WriteOp>) -> WriteFuture<'static, ()> {
        let (reply, answer) = oneshot::channel();
        let sent = self.send(Msg::Commit {
            ops,
            reply: Some(reply),
        });
        Box::pin(async move {
            sent?;
            answer
                .await
                .map_err(|_| WriteError::Store(StoreError::WriterStopped))?
        })
    }

    fn record(&self, ops: Vec<WriteOp>) -> Result<(), WriteError> {
        self.send(Msg::Commit { ops, reply: None })
    }
}

/// A lease's record from its etcd key and value, for the cluster's operator paths.
pub(crate) fn decode_lease(
    key: &[u8],
    value: &[u8],
    id: LeaseId,
) -> Result<LeaseRecord, StoreError> {
    StoredLease::decode(key, value).and_then(|lease| lease.record(id))
}

/// A client of the cluster with the gateway's options, connected within the configured timeout:
/// the store's own and the cluster membership's.
pub(crate) async fn connect_client(
    config: &EtcdConfig,
    options: ConnectOptions,
) -> Result<Client, EtcdError> {
    let unreachable = |reason: String| EtcdError::Unreachable {
        endpoints: config.endpoints.join(","),
        reason,
    };
    tokio::time::timeout(
        config.timeout,
        Client::connect(&config.endpoints, Some(options)),
    )
    .await
    .map_err(|_| unreachable(format!("no answer within {:?}", config.timeout)))?
    .map_err(|e| unreachable(e.to_string()))
}

pub(crate) fn connect_options(config: &EtcdConfig) -> Result<ConnectOptions, EtcdError> {
    let mut options = ConnectOptions::new()
        .with_timeout(config.timeout)
        .with_connect_timeout(config.timeout)
        .with_keep_alive(config.timeout, config.timeout)
        // A member without a leader answers at once instead of holding the request.
        .with_require_leader(true);
    if let Some(tls) = &config.tls {
        let read = |path: &PathBuf| {
            std::fs::read(path).map_err(|source| EtcdError::ReadTls {
                path: path.clone(),
                source,
            })
        };
        let mut tls_options =
            TlsOptions::new().ca_certificate(Certificate::from_pem(read(&tls.ca)?));
        if let Some((certificate, key)) = &tls.client {
            tls_options = tls_options.identity(Identity::from_pem(read(certificate)?, read(key)?));
        }
        options = options.with_tls(tls_options);
    }
    Ok(options)
}

/// The keys of one deployment.
#[derive(Debug, Clone)]
struct Keys {
    prefix: String,
}

impl Keys {
    fn epoch(&self) -> String {
        format!("{}/epoch", self.prefix)
    }
    /// Every key of the deployment (the watch's range).
    fn root(&self) -> String {
        format!("{}/", self.prefix)
    }
    fn ended_prefix(&self) -> String {
        format!("{}/ended/", self.prefix)
    }
    fn ended(&self, id: LeaseId) -> String {
        format!("{}/ended/{id}", self.prefix)
    }
    fn leases(&self) -> String {
        format!("{}/leases/", self.prefix)
    }
    fn lease(&self, id: LeaseId) -> String {
        format!("{}/leases/{id}", self.prefix)
    }
    fn host(&self, identity: &str) -> String {
        format!("{}/hosts/{identity}", self.prefix)
    }
    /// A new fence, named at random (see "Group commits").
    fn new_fence(&self) -> String {
        format!("{}/fences/{:032x}", self.prefix, rand::random::<u128>())
    }
}

/// A lease as its etcd value holds it (short names: the value is written at every grant).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct StoredLease {
    #[serde(rename = "h")]
    identity: String,
    #[serde(rename = "p", default, skip_serializing_if = "Option::is_none")]
    peer: Option<SocketAddr>,
    #[serde(rename = "g")]
    grants: String,
    #[serde(rename = "an", default, skip_serializing_if = "Option::is_none")]
    app_name: Option<String>,
    #[serde(rename = "ae", default, skip_serializing_if = "Option::is_none")]
    app_exe: Option<String>,
    #[serde(rename = "au", default, skip_serializing_if = "Option::is_none")]
    app_uid: Option<u32>,
    #[serde(rename = "ap", default, skip_serializing_if = "Option::is_none")]
    app_pid: Option<u32>,
    #[serde(rename = "rl", default, skip_serializing_if = "Option::is_none")]
    requested_lifetime: Option<u32>,
    #[serde(rename = "gl")]
    granted_lifetime: u32,
    #[serde(rename = "c")]
    created_ms: u64,
    #[serde(rename = "r", default, skip_serializing_if = "Option::is_none")]
    renewed_ms: Option<u64>,
    #[serde(rename = "e")]
    expires_ms: u64,
    #[serde(rename = "ci", default, skip_serializing_if = "Option::is_none")]
    certificate_issuer: Option<serde_bytes_like::Bytes>,
    #[serde(rename = "cs", default, skip_serializing_if = "Option::is_none")]
    certificate_serial: Option<String>,
}

/// CBOR byte strings for the issuer's DER bytes (serde writes a `Vec<u8>` as an array).
mod serde_bytes_like {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    #[derive(Debug, Clone, PartialEq, Eq)]
    pub(super) struct Bytes(pub(super) Vec<u8>);

    impl Serialize for Bytes {
        fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
            s.serialize_bytes(&self.0)
        }
    }

    impl<'de> Deserialize<'de> for Bytes {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            ciborium::value::Value::deserialize(d).and_then(|v| match v {
                ciborium::value::Value::Bytes(b) => Ok(Bytes(b)),
                _ => Err(serde::de::Error::custom("expected a byte string")),
            })
        }
    }
}

impl StoredLease {
    fn new(lease: &NewLease) -> Self {
        let app = lease.app.as_ref();
        StoredLease {
            identity: lease.identity.clone(),
            peer: lease.peer,
            grants: encode_grants(&lease.grants),
            app_name: app.and_then(|a| a.name.clone()),
            app_exe: app.and_then(|a| a.executable.clone()),
            app_uid: app.and_then(|a| a.uid),
            app_pid: app.and_then(|a| a.pid),
            requested_lifetime: lease.requested_lifetime,
            granted_lifetime: lease.granted_lifetime,
            created_ms: lease.created_ms,
            renewed_ms: None,
            expires_ms: lease.expires_ms,
            certificate_issuer: None,
            certificate_serial: None,
        }
        .with_certificate(lease.certificate.as_deref())
    }

    fn with_certificate(mut self, certificate: Option<&CertificateName>) -> Self {
        if let Some(certificate) = certificate {
            self.certificate_issuer = Some(serde_bytes_like::Bytes(certificate.issuer.clone()));
            self.certificate_serial = Some(certificate.serial.as_str().to_owned());
        }
        self
    }

    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(160);
        // Writing to a Vec fails only for out-of-memory, which aborts anyway.
        let _ = ciborium::into_writer(self, &mut out);
        out
    }

    fn decode(key: &[u8], value: &[u8]) -> Result<Self, StoreError> {
        ciborium::from_reader(value).map_err(|e| {
            StoreError::corrupt(format!(
                "etcd key {} is not a lease: {e}",
                String::from_utf8_lossy(key)
            ))
        })
    }

    fn record(&self, id: LeaseId) -> Result<LeaseRecord, StoreError> {
        let in_lease = |what: String| StoreError::corrupt(format!("lease {id} in etcd: {what}"));
        let grants = decode_grants(&self.grants).map_err(|e| in_lease(e.to_string()))?;
        let app = if self.app_name.is_none()
            && self.app_exe.is_none()
            && self.app_uid.is_none()
            && self.app_pid.is_none()
        {
            None
        } else {
            Some(AppInfo {
                name: self.app_name.clone(),
                executable: self.app_exe.clone(),
                uid: self.app_uid,
                pid: self.app_pid,
            })
        };
        let certificate = match (&self.certificate_issuer, &self.certificate_serial) {
            (None, None) => None,
            (Some(issuer), Some(serial)) => Some(CertificateName {
                issuer: issuer.0.clone(),
                serial: Serial::parse(serial)
                    .filter(|s| s.as_str() == serial)
                    .ok_or_else(|| in_lease(format!("certificate serial {serial:?}")))?,
            }),
            _ => return Err(in_lease("a certificate issuer without its serial".into())),
        };
        Ok(LeaseRecord {
            id,
            identity: self.identity.clone(),
            peer: self.peer,
            grants,
            app,
            requested_lifetime: self.requested_lifetime,
            granted_lifetime: self.granted_lifetime,
            created_ms: self.created_ms,
            renewed_ms: self.renewed_ms,
            expires_ms: self.expires_ms,
            state: LeaseState::Live,
            ending: None,
            certificate,
        })
    }
}

/// Why a job was refused, kept cloneable so that one failure can answer every job of a batch.
#[derive(Debug, Clone)]
enum Refusal {
    Duplicate(LeaseId),
    NotLive(LeaseId),
    Conflict(String),
    Quota {
        identity: String,
        held: u32,
        max: u32,
    },
    Unavailable(String),
    Corrupt(String),
    Invalid(String),
}

impl Refusal {
    fn error(self) -> WriteError {
        match self {
            Refusal::Duplicate(id) => StoreError::DuplicateLease { id }.into(),
            Refusal::NotLive(id) => StoreError::LeaseNotLive { id }.into(),
            Refusal::Conflict(why) => WriteError::Conflict(why),
            Refusal::Quota {
                identity,
                held,
                max,
            } => WriteError::QuotaExceeded {
                identity,
                held,
                max,
            },
            Refusal::Unavailable(why) => WriteError::Unavailable(why),
            Refusal::Corrupt(what) => StoreError::Corrupt { what }.into(),
            Refusal::Invalid(what) => StoreError::InvalidInput { what }.into(),
        }
    }

    fn from_store(e: StoreError) -> Self {
        match e {
            StoreError::Corrupt { what } => Refusal::Corrupt(what),
            other => Refusal::Corrupt(other.to_string()),
        }
    }
}

/// One commit in a batch.
struct Job {
    ops: Vec<WriteOp>,
    reply: Option<oneshot::Sender<Result<(), WriteError>>>,
}

impl Job {
    fn answer(self, result: Result<(), Refusal>) {
        match (self.reply, result) {
            (Some(reply), result) => {
                let _ = reply.send(result.map_err(Refusal::error));
            }
            (None, Err(refusal)) => {
                tracing::warn!(error = %refusal.error(), "etcd store: a queued write failed");
            }
            (None, Ok(())) => {}
        }
    }

    /// Answers the job as committed: the leases it inserted are no longer in doubt.
    fn committed(self, doubtful: &mut HashMap<LeaseId, StoredLease>) {
        for op in &self.ops {
            if let WriteOp::InsertLease(new) = op {
                doubtful.remove(&new.id);
            }
        }
        self.answer(Ok(()));
    }

    fn lease_ops(&self) -> usize {
        self.ops
            .iter()
            .filter(|op| {
                matches!(
                    op,
                    WriteOp::InsertLease(_) | WriteOp::RenewLease { .. } | WriteOp::EndLease { .. }
                )
            })
            .count()
    }
}

/// A key as read before a transaction: its value (decoded) and revisions, or its absence.
#[derive(Debug, Clone)]
struct Read<T> {
    value: Option<T>,
    create_revision: i64,
    mod_revision: i64,
}

impl<T> Read<T> {
    fn absent() -> Self {
        Read {
            value: None,
            create_revision: 0,
            mod_revision: 0,
        }
    }

    /// The key as a transaction at `revision` left it, holding `value` (now or, for `None`,
    /// deleted) after it held what `self` says.
    fn written(&self, value: Option<T>, revision: i64) -> Self {
        match value {
            None => Read::absent(),
            Some(value) => Read {
                value: Some(value),
                create_revision: if self.value.is_none() {
                    revision
                } else {
                    self.create_revision
                },
                mod_revision: revision,
            },
        }
    }
}

/// The state a batch is applied to: what was read (or known), and what the jobs so far made
/// of it.
#[derive(Debug, Default)]
struct Overlay {
    leases: HashMap<LeaseId, (Read<StoredLease>, Option<StoredLease>)>,
    hosts: HashMap<String, (Read<u32>, u32)>,
}

/// The keys as this gateway last wrote or read them, compared on without reading them again
/// (see "Group commits" in the module documentation). A lease key absent here is not known.
#[derive(Debug, Default)]
struct Known {
    leases: HashMap<LeaseId, Read<StoredLease>>,
    hosts: HashMap<String, Read<u32>>,
    /// The cluster failed to answer and no transaction has committed since: batches read
    /// their keys first, which, unlike a transaction, is sent again while the timeout lasts
    /// and never applies late.
    careful: bool,
    /// Leases inserted by transactions that got no answer, as they wrote them, to be ended
    /// should the cluster have taken them, and those transactions' fences, to be put before
    /// the leases are read (see `Worker::settle`).
    doubt: Doubt,
    /// The epoch of the state these keys were known in (see `Worker::forget_replaced_state`).
    epoch: Epoch,
}

impl Known {
    /// Keeps the keys the transaction at `revision` that applied `overlay` wrote as it left
    /// them (a key it did not write is known as before); past `max` keys of a kind, forgets
    /// what was known of the others.
    fn learn(&mut self, overlay: &Overlay, revision: i64, max: usize) {
        if revision <= 0 {
            // No revision to compare on next time: read them then.
            self.forget(overlay);
            return;
        }
        if self.leases.len() + overlay.leases.len() > max
            || self.hosts.len() + overlay.hosts.len() > max
        {
            self.leases.clear();
            self.hosts.clear();
        }
        for (id, (read, now)) in &overlay.leases {
            match now {
                None => {
                    self.leases.remove(id);
                }
                Some(lease) if read.value.as_ref() == Some(lease) => {}
                Some(lease) => {
                    self.leases
                        .insert(*id, read.written(Some(lease.clone()), revision));
                }
            }
        }
        for (identity, (read, count)) in &overlay.hosts {
            if read.value.unwrap_or(0) != *count {
                let now = read.written((*count > 0).then_some(*count), revision);
                self.hosts.insert(identity.clone(), now);
            }
        }
    }

    /// Forgets the keys `overlay` holds: a transaction on them failed, or may have applied.
    fn forget(&mut self, overlay: &Overlay) {
        for id in overlay.leases.keys() {
            self.leases.remove(id);
        }
        for identity in overlay.hosts.keys() {
            self.hosts.remove(identity);
        }
    }
}

/// A key a batch in flight holds: no other batch may count on it meanwhile.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum Claim {
    Lease(LeaseId),
    Host(String),
}

/// The keys `job` writes, or `None` when one of them is not known before a read (the host
/// counter of a lease it ends that this gateway does not know).
fn claims(known: &Known, job: &Job) -> Option<Vec<Claim>> {
    let mut claims = Vec::new();
    for op in &job.ops {
        match op {
            WriteOp::InsertLease(new) => {
                claims.push(Claim::Lease(new.id));
                claims.push(Claim::Host(new.identity.clone()));
            }
            WriteOp::RenewLease { id, .. } => claims.push(Claim::Lease(*id)),
            WriteOp::EndLease { id, .. } => {
                let lease = known.leases.get(id)?.value.as_ref()?;
                claims.push(Claim::Lease(*id));
                claims.push(Claim::Host(lease.identity.clone()));
            }
            _ => {}
        }
    }
    Some(claims)
}

/// A batch taken from the queue: its jobs, the keys it holds, and whether it must go alone
/// (it holds a job whose keys are not known before a read).
struct Batch {
    jobs: Vec<Job>,
    claims: Vec<Claim>,
    alone: bool,
}

/// Takes the next batch from `queue`: the jobs, in order, that share no key with a batch in
/// flight (`busy`) nor with a job left waiting before them; when nothing is in flight
/// (`idle`) and the first job's keys are not known, the first jobs whatever their keys, to go
/// alone. `None` when no job may go now.
fn next_batch(
    known: &Known,
    queue: &mut VecDeque<Job>,
    busy: &HashSet<Claim>,
    idle: bool,
) -> Option<Batch> {
    let mut batch = Batch {
        jobs: Vec::new(),
        claims: Vec::new(),
        alone: false,
    };
    let mut waiting = VecDeque::with_capacity(queue.len());
    let mut blocked: HashSet<Claim> = HashSet::new();
    // A job whose keys are unknown holds up every job after it.
    let mut held = false;
    while let Some(job) = queue.pop_front() {
        if held || batch.jobs.len() >= MAX_BATCH_JOBS {
            waiting.push_back(job);
            continue;
        }
        if batch.alone {
            // Nothing else is in flight: the jobs after it go with it, in order.
            batch.jobs.push(job);
            continue;
        }
        match claims(known, &job) {
            None if idle && batch.jobs.is_empty() => {
                batch.alone = true;
                batch.jobs.push(job);
            }
            None => {
                held = true;
                waiting.push_back(job);
            }
            Some(keys) if keys.iter().any(|k| busy.contains(k) || blocked.contains(k)) => {
                blocked.extend(keys);
                waiting.push_back(job);
            }
            Some(keys) => {
                batch.claims.extend(keys);
                batch.jobs.push(job);
            }
        }
    }
    *queue = waiting;
    (!batch.jobs.is_empty()).then_some(batch)
}

struct Worker {
    client: Client,
    kv: KvClient,
    leases: LeaseClient,
    site: String,
    keys: Keys,
    timeout: Duration,
    /// See [`StateMark`].
    state: Arc<StateMark>,
    audit: StoreWriter,
    counters: Arc<Counters>,
    /// The create revision of each lease this gateway has seen (its incarnation).
    seen: Mutex<HashMap<LeaseId, i64>>,
    /// See [`Known`].
    known: Mutex<Known>,
    /// See [`EtcdStore::applied_revision`].
    applied: Arc<AtomicI64>,
    /// See [`EtcdStore::resync`].
    resync: Arc<AtomicBool>,
    /// The etcd lease the tombstones are put with, and when it was granted.
    tombstones: Mutex<Option<(i64, tokio::time::Instant)>>,
}

/// How long a request that could not connect waits before it is sent again.
const RESEND_PAUSE: Duration = Duration::from_millis(5);

/// What a request does, for whether it may be sent again after a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Request {
    /// Changes nothing (or nothing a second time): sent again after any unavailability.
    Read,
    /// Sent again only when it surely was not applied.
    Write,
}

/// The gRPC code of a member's "unavailable" answers (no leader, leader changed, timed out).
const GRPC_UNAVAILABLE: i32 = 14;

/// Runs one request within `timeout`. The client spreads requests over the members, and
/// keeps sending some to a member that is down: a request that could not even connect was not
/// sent, so it goes to another member while the timeout lasts; so does one that a member
/// refused for want of a leader (not proposed), and a read whatever the member's refusal (a
/// leader changing, say). Any other failure of a write is returned as it is, since a write
/// that reached the leader may have been applied.
async fn call_kv<T, F, Fut>(
    kv: &KvClient,
    timeout: Duration,
    op: &str,
    kind: Request,
    mut request: F,
) -> Result<T, Refusal>
where
    F: FnMut(KvClient) -> Fut,
    Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match tokio::time::timeout_at(deadline, request(kv.clone())).await {
            Ok(Ok(response)) => return Ok(response),
            Ok(Err(e)) if resendable(&e, kind) && tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(RESEND_PAUSE).await;
            }
            Ok(Err(e)) => return Err(unavailable(op, e)),
            Err(_) => {
                return Err(unavailable(op, format!("no answer within {timeout:?}")));
            }
        }
    }
}

/// Whether a request that failed with `e` may be sent again (see [`call_kv`]).
fn resendable(e: &etcd_client::Error, kind: Request) -> bool {
    if not_sent(e) {
        return true;
    }
    let etcd_client::Error::GRpcStatus(status) = e else {
        return false;
    };
    if i32::from(status.code()) != GRPC_UNAVAILABLE {
        return false;
    }
    // A member without a leader refuses before proposing anything.
    kind == Request::Read || status.message().contains("no leader")
}

/// Whether a request failed before it left this gateway: a connection refused or unreachable
/// on the way to a member.
fn not_sent(e: &etcd_client::Error) -> bool {
    // The client's error gives no source; the transport's and the status's do.
    let mut source: Option<&(dyn std::error::Error + 'static)> = match e {
        etcd_client::Error::GRpcStatus(status) => Some(status),
        etcd_client::Error::TransportError(transport) => Some(transport),
        etcd_client::Error::IoError(io) => Some(io),
        _ => None,
    };
    while let Some(error) = source {
        if let Some(io) = error.downcast_ref::<std::io::Error>()
            && matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionRefused
                    | std::io::ErrorKind::HostUnreachable
                    | std::io::ErrorKind::NetworkUnreachable
                    | std::io::ErrorKind::AddrNotAvailable
            )
        {
            return true;
        }
        source = error.source();
    }
    false
}

fn unavailable(op: &str, e: impl std::fmt::Display) -> Refusal {
    Refusal::Unavailable(format!("etcd {op}: {e}"))
}

/// The epoch `P/epoch` holds, as its bytes; an error for bytes that are not one.
fn parse_epoch(key: &str, value: &[u8]) -> Result<Epoch, Refusal> {
    std::str::from_utf8(value)
        .ok()
        .and_then(|text| text.parse::<u64>().ok())
        .filter(|&epoch| epoch != 0)
        .ok_or_else(|| {
            Refusal::Corrupt(format!(
                "{key} holds {:?}, not a non-zero decimal epoch",
                String::from_utf8_lossy(value)
            ))
        })
}

/// How many transactions [`take_epoch`] sends at most: the key may be deleted again between
/// two of them.
const EPOCH_ATTEMPTS: usize = 4;

/// The cluster's epoch, with the cluster id of the answer: the one `P/epoch` holds, or, when
/// it holds none, a new one, put by a transaction that puts it only while the key has no
/// create revision, so that the first gateway creates it and the others read it. With
/// `replacing`, the cluster's state was found replaced while the key may still hold that
/// epoch (etcd restored from a snapshot taken under it): a key that holds it is given a new
/// one by a transaction that compares it with the old, so that again one gateway replaces it
/// and the others read what it put.
async fn take_epoch(
    kv: &KvClient,
    keys: &Keys,
    timeout: Duration,
    replacing: Option<Epoch>,
) -> Result<(Epoch, u64), Refusal> {
    let key = keys.epoch();
    let candidate = loop {
        let value: u64 = rand::random();
        if value != 0 {
            break value;
        }
    };
    let create = Txn::new()
        .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
        .and_then([TxnOp::put(key.clone(), candidate.to_string(), None)])
        .or_else([TxnOp::get(key.clone(), None)]);
    let swap = replacing.map(|old| {
        Txn::new()
            .when([Compare::value(
                key.clone(),
                CompareOp::Equal,
                old.to_string(),
            )])
            .and_then([TxnOp::put(key.clone(), candidate.to_string(), None)])
            .or_else([TxnOp::get(key.clone(), None)])
    });
    let mut txn = create.clone();
    for _ in 0..EPOCH_ATTEMPTS {
        // Sent again after an unclear failure, either finds the epoch it put and reads it.
        let response = call_kv(kv, timeout, "take the epoch", Request::Read, |mut kv| {
            let txn = txn.clone();
            async move { kv.txn(txn).await }
        })
        .await?;
        let cluster_id = response.header().map_or(0, |h| h.cluster_id());
        if response.succeeded() {
            return Ok((candidate, cluster_id));
        }
        let value = response.op_responses().into_iter().find_map(|r| match r {
            TxnOpResponse::Get(get) => get.kvs().first().map(|kv| kv.value().to_vec()),
            _ => None,
        });
        let Some(value) = value else {
            // Absent: the swap compares a value, which an absent key never matches.
            txn = create.clone();
            continue;
        };
        let epoch = parse_epoch(&key, &value)?;
        match &swap {
            Some(swap) if replacing == Some(epoch) => txn = swap.clone(),
            _ => return Ok((epoch, cluster_id)),
        }
    }
    Err(Refusal::Conflict(format!(
        "{key} kept changing while the epoch was taken"
    )))
}

impl Worker {
    async fn connect(
        config: &EtcdConfig,
        options: ConnectOptions,
        audit: StoreWriter,
        counters: Arc<Counters>,
        applied: Arc<AtomicI64>,
        resync: Arc<AtomicBool>,
        state: Arc<StateMark>,
    ) -> Result<Worker, EtcdError> {
        let client = connect_client(config, options).await?;
        let worker = Worker {
            kv: client.kv_client(),
            leases: client.lease_client(),
            client,
            site: config.site.clone(),
            keys: Keys {
                prefix: config.prefix.clone(),
            },
            timeout: config.timeout,
            state,
            audit,
            counters,
            seen: Mutex::new(HashMap::new()),
            known: Mutex::new(Known::default()),
            applied,
            resync,
            tombstones: Mutex::new(None),
        };
        let (epoch, cluster_id) = take_epoch(&worker.kv, &worker.keys, worker.timeout, None)
            .await
            .map_err(|r| match r {
                Refusal::Corrupt(what) => EtcdError::Corrupt(what),
                other => EtcdError::Unreachable {
                    endpoints: config.endpoints.join(","),
                    reason: other.error().to_string(),
                },
            })?;
        worker.state.epoch.store(epoch, Ordering::Release);
        worker.state.cluster_id.store(cluster_id, Ordering::Release);
        worker.known().epoch = epoch;
        Ok(worker)
    }

    /// Forgets what this gateway knew of the keys when the cluster's state was replaced since
    /// it last looked (see "A state lost or replaced"): their revisions and incarnations are
    /// those of a history that is gone (a revision of the new one may even equal an old
    /// one), and the etcd lease of the tombstones may not exist in it.
    fn forget_replaced_state(&self) {
        let epoch = self.state.epoch();
        {
            let mut known = self.known();
            if known.epoch == epoch {
                return;
            }
            known.epoch = epoch;
            known.leases.clear();
            known.hosts.clear();
        }
        self.seen.lock().unwrap_or_else(|e| e.into_inner()).clear();
        *self.tombstones.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    async fn txn(
        &self,
        op: &str,
        kind: Request,
        txn: Txn,
    ) -> Result<etcd_client::TxnResponse, Refusal> {
        let response = self
            .call(op, kind, |mut kv| {
                let txn = txn.clone();
                async move { kv.txn(txn).await }
            })
            .await?;
        Ok(response)
    }

    /// Runs one request within the timeout (see [`call_kv`]).
    async fn call<T, F, Fut>(&self, op: &str, kind: Request, request: F) -> Result<T, Refusal>
    where
        F: FnMut(KvClient) -> Fut,
        Fut: std::future::Future<Output = Result<T, etcd_client::Error>>,
    {
        call_kv(&self.kv, self.timeout, op, kind, request).await
    }

    /// The etcd lease to put tombstones with: granted again once half its time has gone, so
    /// that a tombstone put with it lives at least half of [`TOMBSTONE_TTL`].
    async fn tombstone_lease(&self) -> Result<i64, Refusal> {
        if let Some((id, granted)) = *self.tombstones.lock().unwrap_or_else(|e| e.into_inner())
            && granted.elapsed() < TOMBSTONE_TTL / 2
        {
            return Ok(id);
        }
        let mut leases = self.leases.clone();
        let ttl = i64::try_from(TOMBSTONE_TTL.as_secs()).unwrap_or(60);
        let granted = tokio::time::Instant::now();
        let response = tokio::time::timeout(self.timeout, leases.grant(ttl, None))
            .await
            .map_err(|_| {
                unavailable(
                    "grant a lease",
                    format!("no answer within {:?}", self.timeout),
                )
            })?
            .map_err(|e| unavailable("grant a lease", e))?;
        *self.tombstones.lock().unwrap_or_else(|e| e.into_inner()) = Some((response.id(), granted));
        Ok(response.id())
    }

    async fn run(self, mut receiver: mpsc::UnboundedReceiver<Msg>) {
        let worker = Arc::new(self);
        let mut queue: VecDeque<Job> = VecDeque::new();
        let mut in_flight: JoinSet<()> = JoinSet::new();
        let mut held: HashMap<tokio::task::Id, Vec<Claim>> = HashMap::new();
        let mut busy: HashSet<Claim> = HashSet::new();
        let mut alone = false;
        // A message other than a commit, answered once every commit before it is.
        let mut waiting: Option<Msg> = None;
        let mut open = true;
        loop {
            while open && waiting.is_none() {
                match receiver.try_recv() {
                    Ok(Msg::Commit { ops, reply }) => queue.push_back(Job { ops, reply }),
                    Ok(other) => waiting = Some(other),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => open = false,
                }
            }
            if in_flight.is_empty() && !worker.known().doubt.leases.is_empty() {
                worker.settle().await;
            }
            while in_flight.len() < BATCHES_IN_FLIGHT && !alone {
                let batch = {
                    let known = worker.known.lock().unwrap_or_else(|e| e.into_inner());
                    next_batch(&known, &mut queue, &busy, in_flight.is_empty())
                };
                let Some(batch) = batch else { break };
                alone = batch.alone;
                busy.extend(batch.claims.iter().cloned());
                let committer = worker.clone();
                let task = in_flight.spawn(async move { committer.commit(batch.jobs).await });
                held.insert(task.id(), batch.claims);
            }
            if in_flight.is_empty() && queue.is_empty() {
                if let Some(msg) = waiting.take() {
                    worker.answer(msg).await;
                    continue;
                }
                if !open {
                    return;
                }
                // Leases still to settle are tried again after a pause, commits or none.
                let unsettled = !worker.known().doubt.leases.is_empty();
                let msg = if unsettled {
                    match tokio::time::timeout(SETTLE_PAUSE, receiver.recv()).await {
                        Ok(msg) => msg,
                        Err(_) => continue,
                    }
                } else {
                    receiver.recv().await
                };
                match msg {
                    Some(Msg::Commit { ops, reply }) => queue.push_back(Job { ops, reply }),
                    Some(other) => waiting = Some(other),
                    None => return,
                }
                continue;
            }
            tokio::select! {
                done = in_flight.join_next_with_id() => {
                    let id = match done {
                        Some(Ok((id, ()))) => id,
                        Some(Err(e)) => {
                            tracing::error!(error = %e, "etcd store: a batch's task failed");
                            e.id()
                        }
                        None => continue,
                    };
                    for claim in held.remove(&id).unwrap_or_default() {
                        busy.remove(&claim);
                    }
                    alone = false;
                }
                msg = receiver.recv(), if open && waiting.is_none() => match msg {
                    Some(Msg::Commit { ops, reply }) => queue.push_back(Job { ops, reply }),
                    Some(other) => waiting = Some(other),
                    None => open = false,
                },
            }
        }
    }

    /// Answers a message other than a commit.
    async fn answer(&self, msg: Msg) {
        match msg {
            Msg::Restore { now_ms, reply } => {
                let _ = reply.send(self.restore(now_ms).await.map_err(Refusal::error));
            }
            Msg::Watch { changes } => {
                tokio::spawn(
                    Follower {
                        client: self.client.clone(),
                        kv: self.kv.clone(),
                        keys: self.keys.clone(),
                        timeout: self.timeout,
                        applied: self.applied.clone(),
                        resync: self.resync.clone(),
                        state: self.state.clone(),
                        changes,
                    }
                    .run(),
                );
            }
            Msg::Lease { id, reply } => {
                let _ = reply.send(self.read_lease(id).await.map_err(Refusal::error));
            }
            Msg::Leases { filter, reply } => {
                let _ = reply.send(self.list_leases(&filter).await.map_err(Refusal::error));
            }
            Msg::Commit { ops, reply } => self.commit(vec![Job { ops, reply }]).await,
        }
    }

    /// Commits `jobs` in as few transactions as their checks allow, answering each.
    async fn commit(&self, jobs: Vec<Job>) {
        self.forget_replaced_state();
        let mut pending = Vec::new();
        for job in jobs {
            if job.lease_ops() > MAX_JOB_LEASE_OPS {
                let n = job.lease_ops();
                job.answer(Err(Refusal::Invalid(format!(
                    "a commit of {n} lease operations (one etcd transaction takes at most \
                     {MAX_JOB_LEASE_OPS})"
                ))));
            } else if job.lease_ops() == 0 {
                // Audit records and retention only: the gateway's own database.
                let result = self.audit.record(job.ops.clone());
                job.answer(result.map_err(|e| Refusal::Corrupt(e.to_string())));
            } else {
                pending.push(job);
            }
        }
        // First on the keys as known, then, for what that left, on the keys as read; on the
        // keys as read only while the cluster has just failed to answer.
        let mut fresh = self.known().careful;
        let mut conflicts = 0;
        // What the transactions without an answer may have done. A lease leaves it once its
        // job is answered as committed: what is left was refused to its host.
        let mut doubt = Doubt::default();
        let mut doubted = false;
        while !pending.is_empty() {
            match self.try_commit(pending, fresh, &mut doubt.leases).await {
                Ok(recheck) => pending = recheck,
                // Read to see whether it applied (a leader lost, say); what was read prevails.
                Err(Retry::Doubtful(jobs, _, more)) if !doubted => {
                    doubted = true;
                    doubt.extend(more);
                    pending = jobs;
                }
                Err(Retry::Doubtful(jobs, refusal, more)) => {
                    doubt.extend(more);
                    self.doubt(doubt, true);
                    for job in jobs {
                        job.answer(Err(refusal.clone()));
                    }
                    return;
                }
                Err(Retry::Conflicted(jobs)) if conflicts < RETRIES => {
                    conflicts += 1;
                    pending = jobs;
                }
                Err(Retry::Conflicted(jobs)) => {
                    for job in jobs {
                        job.answer(Err(Refusal::Conflict(
                            "other gateways kept changing the same leases; not applied".into(),
                        )));
                    }
                    break;
                }
                Err(Retry::Failed(jobs, refusal)) => {
                    self.doubt(doubt, true);
                    for job in jobs {
                        job.answer(Err(refusal.clone()));
                    }
                    return;
                }
            }
            fresh = true;
        }
        // A job whose transaction got no answer, refused afterwards (on what was read, or after
        // too many conflicts): that transaction may still apply.
        self.doubt(doubt, false);
    }

    /// Keeps the leases that transactions reported failed may have inserted, with their
    /// fences, to be ended if they did (see [`Worker::settle`]); when `careful`, has the next
    /// batches read their keys first.
    fn doubt(&self, doubt: Doubt, careful: bool) {
        let mut known = self.known();
        known.careful |= careful;
        if !doubt.leases.is_empty() {
            known.doubt.extend(doubt);
        }
    }

    /// Ends each lease a transaction reported failed inserted after all (the cluster took it
    /// once its quorum was back): its host was refused it. The transactions' fences are put
    /// first, so that what the reads find absent never comes (see "Group commits" in the
    /// module documentation). What cannot be settled yet is kept for the next attempt.
    async fn settle(&self) {
        let doubt = std::mem::take(&mut self.known().doubt);
        if let Err(refusal) = self.put_fences(&doubt.fences).await {
            tracing::debug!(error = %refusal.error(), "etcd store: the fences of transactions reported failed not put yet");
            self.known().doubt.extend(doubt);
            return;
        }
        let doubtful: Vec<(LeaseId, StoredLease)> = doubt.leases.into_iter().collect();
        let keys: Vec<String> = doubtful
            .iter()
            .map(|(id, _)| self.keys.lease(*id))
            .collect();
        let mut read = Vec::with_capacity(keys.len());
        for chunk in keys.chunks(MAX_BATCH_JOBS) {
            match self.read_keys(chunk).await {
                Ok(more) => read.extend(more),
                Err(_) => {
                    // The fences are in place: reading is enough next time.
                    self.known().doubt.leases.extend(doubtful);
                    return;
                }
            }
        }
        let mut answers = Vec::new();
        let mut jobs = Vec::new();
        for ((id, written), kv) in doubtful.into_iter().zip(read) {
            let applied = kv.is_some_and(|kv| {
                StoredLease::decode(kv.key(), kv.value()).is_ok_and(|stored| stored == written)
            });
            if !applied {
                continue;
            }
            tracing::warn!(
                lease = %id,
                "etcd store: a grant reported failed was taken late; ending it"
            );
            let (reply, answer) = oneshot::channel();
            jobs.push(Job {
                ops: vec![WriteOp::EndLease {
                    id,
                    end: LeaseEnd::Released,
                    ended_ms: super::now_ms(),
                    by: None,
                    why: Some("granted by a transaction reported failed".into()),
                }],
                reply: Some(reply),
            });
            answers.push((id, written, answer));
        }
        while !jobs.is_empty() {
            let rest = jobs.split_off(jobs.len().min(MAX_BATCH_JOBS));
            self.commit(std::mem::replace(&mut jobs, rest)).await;
        }
        for (id, written, answer) in answers {
            if let Ok(Err(WriteError::Unavailable(_))) | Err(_) = answer.await {
                self.known().doubt.leases.insert(id, written);
            }
        }
    }

    /// Puts `fences` (see "Group commits" in the module documentation), with the tombstones'
    /// etcd lease so that they vanish by themselves.
    async fn put_fences(&self, fences: &[String]) -> Result<(), Refusal> {
        if fences.is_empty() {
            return Ok(());
        }
        let lease = self.tombstone_lease().await?;
        for chunk in fences.chunks(MAX_BATCH_JOBS) {
            let puts: Vec<TxnOp> = chunk
                .iter()
                .map(|fence| {
                    TxnOp::put(fence.clone(), "", Some(PutOptions::new().with_lease(lease)))
                })
                .collect();
            self.txn("put fences", Request::Write, Txn::new().and_then(puts))
                .await?;
        }
        Ok(())
    }

    /// One transaction for `jobs`, on the keys as known (reading only those not known) or,
    /// when `fresh`, as read now: jobs that fail their checks on what was read are answered and
    /// left out; those that fail them on known values alone are returned, to be checked again
    /// on what is read; the others are answered once the transaction commits.
    ///
    /// A job that only inserts leases, each found as `doubtful` holds it (written by a
    /// transaction that got no answer), is answered as committed. The leases of every job
    /// answered as committed leave `doubtful`.
    async fn try_commit(
        &self,
        jobs: Vec<Job>,
        fresh: bool,
        doubtful: &mut HashMap<LeaseId, StoredLease>,
    ) -> Result<Vec<Job>, Retry> {
        let mut overlay = match self.read_for(&jobs, fresh).await {
            Ok(overlay) => overlay,
            Err(refusal) => return Err(Retry::Failed(jobs, refusal)),
        };
        let mut included = Vec::new();
        let mut recheck = Vec::new();
        for job in jobs {
            if fresh && !doubtful.is_empty() && inserted_already(&overlay, &job, doubtful) {
                self.record_audit(&job);
                job.committed(doubtful);
                continue;
            }
            match self.apply(&mut overlay, &job.ops) {
                Ok(()) => included.push(job),
                Err(_) if !fresh => recheck.push(job),
                Err(refusal) => job.answer(Err(refusal)),
            }
        }
        if !recheck.is_empty() {
            self.known().forget(&overlay);
        }
        if included.is_empty() {
            return Ok(recheck);
        }
        // How each lease this batch ends ended, for the tombstones the other gateways read.
        let mut endings: HashMap<LeaseId, Tombstone> = HashMap::new();
        for op in included.iter().flat_map(|j| &j.ops) {
            if let WriteOp::EndLease {
                id,
                end,
                ended_ms,
                by,
                why,
            } = op
            {
                endings.insert(
                    *id,
                    Tombstone::new(*end, *ended_ms, by.clone(), why.clone(), &self.site),
                );
            }
        }
        let ends = overlay
            .leases
            .values()
            .any(|(read, now)| read.value.is_some() && now.is_none());
        let tombstone_lease = if ends {
            match self.tombstone_lease().await {
                Ok(lease) => Some(lease),
                Err(refusal) => {
                    included.extend(recheck);
                    return Err(Retry::Failed(included, refusal));
                }
            }
        } else {
            None
        };
        let mut compares = Vec::new();
        let mut writes = Vec::new();
        let mut inserted = Vec::new();
        for (id, (read, now)) in &overlay.leases {
            let key = self.keys.lease(*id);
            let unchanged = match (&read.value, now) {
                (Some(before), Some(after)) => before == after,
                (None, None) => true,
                _ => false,
            };
            if unchanged {
                continue;
            }
            compares.push(match read.value {
                None => Compare::create_revision(key.clone(), CompareOp::Equal, 0),
                Some(_) => Compare::mod_revision(key.clone(), CompareOp::Equal, read.mod_revision),
            });
            match now {
                Some(lease) => {
                    if read.value.is_none() {
                        inserted.push(*id);
                    }
                    writes.push(TxnOp::put(key, lease.encode(), None));
                }
                None => {
                    writes.push(TxnOp::delete(key, None));
                    if let (Some(lease), Some(tombstone)) = (tombstone_lease, endings.get(id)) {
                        writes.push(TxnOp::put(
                            self.keys.ended(*id),
                            tombstone.encode(),
                            Some(PutOptions::new().with_lease(lease)),
                        ));
                    }
                }
            }
        }
        for (identity, (read, count)) in &overlay.hosts {
            if read.value.unwrap_or(0) == *count {
                continue;
            }
            let key = self.keys.host(identity);
            compares.push(match read.value {
                None => Compare::create_revision(key.clone(), CompareOp::Equal, 0),
                Some(_) => Compare::mod_revision(key.clone(), CompareOp::Equal, read.mod_revision),
            });
            writes.push(if *count == 0 {
                TxnOp::delete(key, None)
            } else {
                TxnOp::put(key, count.to_string(), None)
            });
        }
        // Only a transaction that inserts can grant what its host is told it did not get.
        let fence = (!inserted.is_empty()).then(|| self.keys.new_fence());
        if let Some(fence) = &fence {
            compares.push(Compare::create_revision(fence.clone(), CompareOp::Equal, 0));
        }
        let response = match self
            .txn(
                "commit",
                Request::Write,
                Txn::new().when(compares).and_then(writes),
            )
            .await
        {
            Ok(response) => response,
            Err(refusal) => {
                self.counters.unanswered.fetch_add(1, Ordering::Relaxed);
                if tombstone_lease.is_some() {
                    // The tombstones' etcd lease may be what failed it (gone with a cluster
                    // restored from a snapshot, say): the next commit grants another.
                    *self.tombstones.lock().unwrap_or_else(|e| e.into_inner()) = None;
                }
                // It may have applied: what was known of its keys may be no more.
                self.known().forget(&overlay);
                let doubt = Doubt {
                    leases: overlay
                        .leases
                        .iter()
                        .filter(|(_, (read, _))| read.value.is_none())
                        .filter_map(|(id, (_, now))| Some((*id, now.clone()?)))
                        .collect(),
                    fences: fence.into_iter().collect(),
                };
                included.extend(recheck);
                return Err(Retry::Doubtful(included, refusal, doubt));
            }
        };
        self.counters.transactions.fetch_add(1, Ordering::Relaxed);
        if !response.succeeded() {
            self.counters.conflicts.fetch_add(1, Ordering::Relaxed);
            self.known().forget(&overlay);
            included.extend(recheck);
            return Err(Retry::Conflicted(included));
        }
        let revision = response.header().map_or(0, |h| h.revision());
        {
            let mut known = self.known();
            known.learn(&overlay, revision, KNOWN_MAX);
            known.careful = false;
        }
        {
            let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
            for (id, (read, now)) in &overlay.leases {
                match now {
                    None => {
                        seen.remove(id);
                    }
                    Some(_) if inserted.contains(id) => {
                        seen.insert(*id, revision);
                    }
                    Some(_) => {
                        seen.insert(*id, read.create_revision);
                    }
                }
            }
        }
        for job in included {
            self.record_audit(&job);
            job.committed(doubtful);
        }
        Ok(recheck)
    }

    /// Records the audit events of a committed job in the gateway's own database.
    fn record_audit(&self, job: &Job) {
        let audit: Vec<WriteOp> = job
            .ops
            .iter()
            .filter(|op| !is_lease_op(op))
            .cloned()
            .collect();
        if let Err(e) = self.audit.record(audit) {
            tracing::warn!(error = %e, "etcd store: audit records of a commit were not kept");
        }
    }

    fn known(&self) -> std::sync::MutexGuard<'_, Known> {
        self.known.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The lease keys and host counters `jobs` touch: as known (an inserted lease's key not
    /// known is taken as absent, which its transaction compares) and, for what is not known,
    /// as read, in at most two round trips (the counter of an ended lease is known once the
    /// lease is); with `fresh`, every one of them as read.
    async fn read_for(&self, jobs: &[Job], fresh: bool) -> Result<Overlay, Refusal> {
        let mut overlay = Overlay::default();
        let mut ids = Vec::new();
        let mut hosts = Vec::new();
        {
            let known = self.known();
            let mut take = |id: LeaseId, insert: bool| {
                if let Some(read) = known.leases.get(&id).filter(|_| !fresh) {
                    overlay
                        .leases
                        .insert(id, (read.clone(), read.value.clone()));
                } else if insert && !fresh {
                    overlay.leases.insert(id, (Read::absent(), None));
                } else {
                    ids.push(id);
                }
            };
            for op in jobs.iter().flat_map(|j| &j.ops) {
                match op {
                    WriteOp::InsertLease(new) => {
                        take(new.id, true);
                        hosts.push(new.identity.clone());
                    }
                    WriteOp::RenewLease { id, .. } => take(*id, false),
                    WriteOp::EndLease { id, .. } => take(*id, false),
                    _ => {}
                }
            }
        }
        ids.sort_unstable();
        ids.dedup();
        let keys: Vec<String> = ids.iter().map(|id| self.keys.lease(*id)).collect();
        for (id, kv) in ids.iter().zip(self.read_keys(&keys).await?) {
            let read = match kv {
                None => Read::absent(),
                Some(kv) => {
                    let lease =
                        StoredLease::decode(kv.key(), kv.value()).map_err(Refusal::from_store)?;
                    Read {
                        value: Some(lease),
                        create_revision: kv.create_revision(),
                        mod_revision: kv.mod_revision(),
                    }
                }
            };
            let now = read.value.clone();
            // What is read prevails over an insert's key taken as absent.
            overlay.leases.insert(*id, (read, now));
        }
        // The counters of the hosts whose leases are ended.
        for op in jobs.iter().flat_map(|j| &j.ops) {
            if let WriteOp::EndLease { id, .. } = op
                && let Some((
                    Read {
                        value: Some(lease), ..
                    },
                    _,
                )) = overlay.leases.get(id)
            {
                hosts.push(lease.identity.clone());
            }
        }
        hosts.sort_unstable();
        hosts.dedup();
        if !fresh {
            let known = self.known();
            hosts.retain(|identity| match known.hosts.get(identity) {
                Some(read) => {
                    overlay
                        .hosts
                        .insert(identity.clone(), (read.clone(), read.value.unwrap_or(0)));
                    false
                }
                None => true,
            });
        }
        let keys: Vec<String> = hosts.iter().map(|h| self.keys.host(h)).collect();
        for (identity, kv) in hosts.into_iter().zip(self.read_keys(&keys).await?) {
            let read = match kv {
                None => Read::absent(),
                Some(kv) => {
                    let count = std::str::from_utf8(kv.value())
                        .ok()
                        .and_then(|t| t.parse::<u32>().ok())
                        .ok_or_else(|| {
                            Refusal::Corrupt(format!(
                                "etcd key {} holds {:?}, not a lease count",
                                String::from_utf8_lossy(kv.key()),
                                String::from_utf8_lossy(kv.value())
                            ))
                        })?;
                    Read {
                        value: Some(count),
                        create_revision: kv.create_revision(),
                        mod_revision: kv.mod_revision(),
                    }
                }
            };
            let count = read.value.unwrap_or(0);
            overlay.hosts.insert(identity, (read, count));
        }
        Ok(overlay)
    }

    /// The keys' current values, in order, in one transaction of reads.
    async fn read_keys(&self, keys: &[String]) -> Result<Vec<Option<KeyValue>>, Refusal> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let reads: Vec<TxnOp> = keys.iter().map(|k| TxnOp::get(k.clone(), None)).collect();
        let response = self
            .txn("read", Request::Read, Txn::new().and_then(reads))
            .await?;
        Ok(response
            .op_responses()
            .into_iter()
            .map(|r| match r {
                TxnOpResponse::Get(get) => get.kvs().first().cloned(),
                _ => None,
            })
            .collect())
    }

    /// Applies one job's lease operations to the overlay, all or none.
    fn apply(&self, overlay: &mut Overlay, ops: &[WriteOp]) -> Result<(), Refusal> {
        let mut leases: HashMap<LeaseId, Option<StoredLease>> = HashMap::new();
        let mut hosts: HashMap<String, u32> = HashMap::new();
        let current = |leases: &HashMap<LeaseId, Option<StoredLease>>, id: &LeaseId| {
            leases
                .get(id)
                .cloned()
                .or_else(|| overlay.leases.get(id).map(|(_, now)| now.clone()))
                .flatten()
        };
        let count = |hosts: &HashMap<String, u32>, identity: &str| {
            hosts
                .get(identity)
                .copied()
                .or_else(|| overlay.hosts.get(identity).map(|(_, n)| *n))
                .unwrap_or(0)
        };
        for op in ops {
            match op {
                WriteOp::InsertLease(new) => {
                    if current(&leases, &new.id).is_some() {
                        return Err(Refusal::Duplicate(new.id));
                    }
                    let held = count(&hosts, &new.identity);
                    if let Some(max) = new.max_leases
                        && held >= max
                    {
                        return Err(Refusal::Quota {
                            identity: new.identity.clone(),
                            held,
                            max,
                        });
                    }
                    hosts.insert(new.identity.clone(), held + 1);
                    leases.insert(new.id, Some(StoredLease::new(new)));
                }
                WriteOp::RenewLease {
                    id,
                    renewed_ms,
                    expires_ms,
                    granted_lifetime,
                    certificate,
                } => {
                    let mut lease = current(&leases, id).ok_or(Refusal::NotLive(*id))?;
                    self.same_incarnation(overlay, *id)?;
                    lease.renewed_ms = Some(*renewed_ms);
                    lease.expires_ms = *expires_ms;
                    lease.granted_lifetime = *granted_lifetime;
                    lease = lease.with_certificate(certificate.as_deref());
                    leases.insert(*id, Some(lease));
                }
                WriteOp::EndLease {
                    id,
                    end,
                    ended_ms,
                    by,
                    ..
                } => {
                    let lease = current(&leases, id).ok_or(Refusal::NotLive(*id))?;
                    self.same_incarnation(overlay, *id)?;
                    // A release is the host's: it names the host as who ended the lease.
                    if *end == LeaseEnd::Released
                        && let Some(by) = by
                        && *by != lease.identity
                    {
                        return Err(Refusal::Conflict(format!(
                            "lease {id} is held by {}, not by {by}",
                            lease.identity
                        )));
                    }
                    if *end == LeaseEnd::Expired && lease.expires_ms > *ended_ms {
                        return Err(Refusal::Conflict(format!(
                            "lease {id} was renewed (it now expires at {} ms), not expired",
                            lease.expires_ms
                        )));
                    }
                    let held = count(&hosts, &lease.identity);
                    hosts.insert(lease.identity.clone(), held.saturating_sub(1));
                    leases.insert(*id, None);
                }
                _ => {}
            }
        }
        for (id, now) in leases {
            if let Some(entry) = overlay.leases.get_mut(&id) {
                entry.1 = now;
            }
        }
        for (identity, n) in hosts {
            if let Some(entry) = overlay.hosts.get_mut(&identity) {
                entry.1 = n;
            }
        }
        Ok(())
    }

    /// A lease this gateway saw must still be the same incarnation (its key not deleted and
    /// written again since), so that its owner is the one the gateway judged.
    fn same_incarnation(&self, overlay: &Overlay, id: LeaseId) -> Result<(), Refusal> {
        let Some((read, _)) = overlay.leases.get(&id) else {
            return Ok(());
        };
        if read.value.is_none() {
            // Inserted by this very batch.
            return Ok(());
        }
        let seen = self
            .seen
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&id)
            .copied();
        match seen {
            Some(revision) if revision != read.create_revision => Err(Refusal::Conflict(format!(
                "lease {id} was ended and stored again since this gateway saw it"
            ))),
            _ => Ok(()),
        }
    }

    /// The live leases `filter` asks for.
    async fn list_leases(&self, filter: &LeaseFilter) -> Result<Vec<LeaseRecord>, Refusal> {
        let prefix = self.keys.leases();
        let response = self
            .call("list leases", Request::Read, |mut kv| {
                let prefix = prefix.clone();
                async move { kv.get(prefix, Some(GetOptions::new().with_prefix())).await }
            })
            .await?;
        let mut leases = Vec::new();
        for kv in response.kvs() {
            let Some(id) = kv
                .key()
                .strip_prefix(prefix.as_bytes())
                .and_then(lease_id_of)
            else {
                continue;
            };
            let lease = StoredLease::decode(kv.key(), kv.value())
                .and_then(|l| l.record(id))
                .map_err(Refusal::from_store)?;
            if super::backend::lease_matches(&lease, filter) {
                leases.push(lease);
            }
        }
        leases.sort_by_key(|l| (l.expires_ms, l.id));
        if let Some(limit) = filter.limit {
            leases.truncate(limit);
        }
        Ok(leases)
    }

    /// The lease `id` as stored now.
    async fn read_lease(&self, id: LeaseId) -> Result<Option<LeaseRecord>, Refusal> {
        let key = self.keys.lease(id);
        let Some(kv) = self.read_keys(&[key]).await?.into_iter().next().flatten() else {
            return Ok(None);
        };
        StoredLease::decode(kv.key(), kv.value())
            .and_then(|l| l.record(id))
            .map(Some)
            .map_err(Refusal::from_store)
    }

    /// The live leases, after ending those past their expiry at `now_ms` (each in a commit of
    /// its own, audited here only if this gateway's end is the one etcd took).
    async fn restore(&self, now_ms: u64) -> Result<Restored, Refusal> {
        let prefix = self.keys.leases();
        let response = self
            .call("list leases", Request::Read, |mut kv| {
                let prefix = prefix.clone();
                async move { kv.get(prefix, Some(GetOptions::new().with_prefix())).await }
            })
            .await?;
        if let Some(header) = response.header() {
            self.applied.store(header.revision(), Ordering::Release);
        }
        let mut live = Vec::new();
        let mut past = Vec::new();
        for kv in response.kvs() {
            let id =
                lease_id_of(&kv.key()[prefix.len().min(kv.key().len())..]).ok_or_else(|| {
                    Refusal::Corrupt(format!(
                        "etcd key {} does not name a lease",
                        String::from_utf8_lossy(kv.key())
                    ))
                })?;
            let lease = StoredLease::decode(kv.key(), kv.value())
                .and_then(|l| l.record(id))
                .map_err(Refusal::from_store)?;
            self.seen
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(id, kv.create_revision());
            if lease.expires_ms <= now_ms {
                past.push(lease);
            } else {
                live.push(lease);
            }
        }
        live.sort_by_key(|l| (l.expires_ms, l.id));
        let why = "expired while the gateway was stopped";
        let mut expired = Vec::new();
        for lease in past {
            let mut event = AuditEvent::new(now_ms, AuditKind::Expiry);
            event.outcome = Some(Outcome::Expired);
            event.identity = Some(lease.identity.clone());
            event.lease = Some(lease.id);
            event.app = lease.app.clone();
            event.grants = lease.grants.clone();
            event.actor = Some("gateway".into());
            event.reason = Some(why.into());
            let (reply, answer) = oneshot::channel();
            let job = Job {
                ops: vec![
                    WriteOp::EndLease {
                        id: lease.id,
                        end: LeaseEnd::Expired,
                        ended_ms: now_ms,
                        by: Some("gateway".into()),
                        why: Some(why.into()),
                    },
                    WriteOp::audit(event),
                ],
                reply: Some(reply),
            };
            self.commit(vec![job]).await;
            match answer.await {
                Ok(Ok(())) => {
                    let mut lease = lease;
                    lease.state = LeaseState::Expired;
                    lease.ending = Some(super::LeaseEnding {
                        end: LeaseEnd::Expired,
                        ended_ms: now_ms,
                        by: Some("gateway".into()),
                        why: Some(why.into()),
                    });
                    expired.push(lease);
                }
                // Another gateway ended or renewed it first: not this one's to record.
                Ok(Err(
                    WriteError::Conflict(_) | WriteError::Store(StoreError::LeaseNotLive { .. }),
                )) => {}
                Ok(Err(WriteError::Unavailable(why))) => return Err(Refusal::Unavailable(why)),
                Ok(Err(e)) => return Err(Refusal::Corrupt(e.to_string())),
                Err(_) => return Err(Refusal::Unavailable("the commit was dropped".into())),
            }
        }
        Ok(Restored { live, expired })
    }
}

enum Retry {
    /// Another writer changed a key the transaction compared: read again and retry.
    Conflicted(Vec<Job>),
    /// Every job fails with this.
    Failed(Vec<Job>, Refusal),
    /// The transaction was sent and no answer came: it may have applied, now or later. With
    /// the leases it inserted, as it wrote them, and its fence.
    Doubtful(Vec<Job>, Refusal, Doubt),
}

/// What a transaction that got no answer may have done: the leases it inserted, as it wrote
/// them, and the fence that keeps it from applying once put.
#[derive(Debug, Default)]
struct Doubt {
    leases: HashMap<LeaseId, StoredLease>,
    fences: Vec<String>,
}

impl Doubt {
    fn extend(&mut self, other: Doubt) {
        self.leases.extend(other.leases);
        self.fences.extend(other.fences);
    }
}

fn is_lease_op(op: &WriteOp) -> bool {
    matches!(
        op,
        WriteOp::InsertLease(_) | WriteOp::RenewLease { .. } | WriteOp::EndLease { .. }
    )
}

/// Whether `job` only inserts leases and finds each in `overlay` as `doubtful` holds it: a
/// transaction that got no answer inserted them.
fn inserted_already(
    overlay: &Overlay,
    job: &Job,
    doubtful: &HashMap<LeaseId, StoredLease>,
) -> bool {
    let mut inserts = 0;
    for op in &job.ops {
        match op {
            WriteOp::InsertLease(new) => {
                let found = overlay
                    .leases
                    .get(&new.id)
                    .and_then(|(read, _)| read.value.as_ref());
                if found.is_none() || found != doubtful.get(&new.id) {
                    return false;
                }
                inserts += 1;
            }
            WriteOp::RenewLease { .. } | WriteOp::EndLease { .. } => return false,
            _ => {}
        }
    }
    inserts > 0
}

/// The lease id a key names (32 hex digits).
fn lease_id_of(hex: &[u8]) -> Option<LeaseId> {
    if hex.len() != 32 {
        return None;
    }
    let text = std::str::from_utf8(hex).ok()?;
    let mut id = [0u8; 16];
    for (i, byte) in id.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(LeaseId(id))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_value_round_trips_and_stays_small() {
        let new = NewLease {
            id: LeaseId([7; 16]),
            identity: "fwnp://host/web-07".into(),
            peer: Some("192.0.2.7:40000".parse().unwrap()),
            grants: vec![fwnp_proto::Grant {
                protocol: fwnp_proto::Protocol::Tcp,
                ports: fwnp_proto::PortRange::single(443),
                host: "192.0.2.7".parse().unwrap(),
                remotes: Vec::new(),
                app: None,
            }],
            app: Some(AppInfo {
                name: Some("nginx".into()),
                executable: None,
                uid: Some(33),
                pid: None,
            }),
            requested_lifetime: None,
            granted_lifetime: 600,
            created_ms: 1_700_000_000_000,
            expires_ms: 1_700_000_600_000,
            certificate: Some(Arc::new(CertificateName {
                issuer: vec![0x30, 0x0d, 0x31],
                serial: Serial::parse("1a2b").unwrap(),
            })),
            max_leases: Some(4),
        };
        let stored = StoredLease::new(&new);
        let bytes = stored.encode();
        assert!(bytes.len() < 200, "{} bytes", bytes.len());
        let back = StoredLease::decode(b"k", &bytes).unwrap();
        assert_eq!(back, stored);
        let record = back.record(new.id).unwrap();
        assert_eq!(record.identity, new.identity);
        assert_eq!(record.grants, new.grants);
        assert_eq!(record.app, new.app);
        assert_eq!(record.certificate.as_ref(), new.certificate.as_deref());
        assert_eq!(record.expires_ms, new.expires_ms);
    }

    #[test]
    fn values_that_are_not_leases_are_corrupt_not_panics() {
        for bad in [&b""[..], b"\xff\xff", b"garbage", b"\xa1\x61h\x01"] {
            assert!(matches!(
                StoredLease::decode(b"k", bad),
                Err(StoreError::Corrupt { .. })
            ));
        }
        let mut stored = StoredLease::new(&NewLease {
            id: LeaseId([1; 16]),
            identity: "h".into(),
            peer: None,
            grants: Vec::new(),
            app: None,
            requested_lifetime: None,
            granted_lifetime: 1,
            created_ms: 0,
            expires_ms: 1,
            certificate: None,
            max_leases: None,
        });
        stored.grants = "not grants".into();
        assert!(matches!(
            stored.record(LeaseId([1; 16])),
            Err(StoreError::Corrupt { .. })
        ));
    }

    fn insert(n: u8, identity: &str) -> Job {
        Job {
            ops: vec![WriteOp::InsertLease(NewLease {
                id: LeaseId([n; 16]),
                identity: identity.into(),
                peer: None,
                grants: Vec::new(),
                app: None,
                requested_lifetime: None,
                granted_lifetime: 1,
                created_ms: 0,
                expires_ms: 1,
                certificate: None,
                max_leases: None,
            })],
            reply: None,
        }
    }

    fn end(n: u8) -> Job {
        Job {
            ops: vec![WriteOp::EndLease {
                id: LeaseId([n; 16]),
                end: LeaseEnd::Released,
                ended_ms: 0,
                by: None,
                why: None,
            }],
            reply: None,
        }
    }

    fn renew(n: u8) -> Job {
        Job {
            ops: vec![WriteOp::RenewLease {
                id: LeaseId([n; 16]),
                renewed_ms: 0,
                expires_ms: 2,
                granted_lifetime: 1,
                certificate: None,
            }],
            reply: None,
        }
    }

    /// The lease ids of the jobs, in order.
    fn ids(jobs: &[Job]) -> Vec<u8> {
        jobs.iter()
            .flat_map(|j| &j.ops)
            .filter_map(|op| match op {
                WriteOp::InsertLease(new) => Some(new.id.0[0]),
                WriteOp::RenewLease { id, .. } | WriteOp::EndLease { id, .. } => Some(id.0[0]),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn batches_in_flight_share_no_key_and_jobs_on_one_key_keep_their_order() {
        let mut known = Known::default();
        let stored = |identity: &str| {
            let Job { ops, .. } = insert(3, identity);
            let WriteOp::InsertLease(new) = &ops[0] else {
                unreachable!()
            };
            Read {
                value: Some(StoredLease::new(new)),
                create_revision: 5,
                mod_revision: 5,
            }
        };
        known.leases.insert(LeaseId([3; 16]), stored("h3"));
        known.leases.insert(LeaseId([6; 16]), stored("h1"));
        let busy: HashSet<Claim> = [Claim::Host("h1".into())].into();
        let mut queue: VecDeque<Job> = [
            insert(1, "h1"), // its host is in flight: waits
            insert(2, "h2"),
            renew(1), // shares lease 1 with a job left waiting: waits after it
            end(3),   // a known lease of h3: goes
            end(6),   // a known lease of h1, in flight: waits
            renew(4), // goes
            end(9),   // not known: holds up every job after it
            insert(5, "h5"),
        ]
        .into();
        let batch = next_batch(&known, &mut queue, &busy, false).expect("a batch");
        assert_eq!(ids(&batch.jobs), [2, 3, 4]);
        assert!(!batch.alone);
        let claims: HashSet<Claim> = batch.claims.into_iter().collect();
        let expected: HashSet<Claim> = [
            Claim::Lease(LeaseId([2; 16])),
            Claim::Host("h2".into()),
            Claim::Lease(LeaseId([3; 16])),
            Claim::Host("h3".into()),
            Claim::Lease(LeaseId([4; 16])),
        ]
        .into();
        assert_eq!(claims, expected);
        assert_eq!(ids(queue.make_contiguous()), [1, 1, 6, 9, 5]);

        // With the batch still in flight, nothing more may go: h1 is busy and lease 9's host
        // is not known.
        assert!(next_batch(&known, &mut queue, &busy, false).is_none());
        assert_eq!(queue.len(), 5);

        // Nothing in flight: the jobs go in order, the end of an unknown lease alone with the
        // jobs after it.
        let none = HashSet::new();
        let batch = next_batch(&known, &mut queue, &none, true).expect("a batch");
        assert_eq!(ids(&batch.jobs), [1, 1, 6]);
        assert!(!batch.alone);
        let batch = next_batch(&known, &mut queue, &none, true).expect("a batch");
        assert_eq!(ids(&batch.jobs), [9, 5]);
        assert!(batch.alone);
        assert!(queue.is_empty());
    }

    #[test]
    fn a_batch_takes_at_most_max_batch_jobs() {
        let known = Known::default();
        let mut queue: VecDeque<Job> = (0..=u8::try_from(MAX_BATCH_JOBS).unwrap())
            .map(|n| insert(n, &format!("h{n}")))
            .collect();
        let batch = next_batch(&known, &mut queue, &HashSet::new(), true).expect("a batch");
        assert_eq!(batch.jobs.len(), MAX_BATCH_JOBS);
        assert_eq!(queue.len(), 1);
    }

    #[test]
    fn a_committed_batch_is_known_as_it_left_its_keys_within_a_bound() {
        let Job { ops, .. } = insert(1, "h1");
        let WriteOp::InsertLease(new) = &ops[0] else {
            unreachable!()
        };
        let lease = StoredLease::new(new);
        let mut known = Known::default();
        known.doubt.leases.insert(LeaseId([9; 16]), lease.clone());
        known.careful = true;
        // An insert of lease 1 and the host's counter from 2 to 3, an end of lease 2.
        let mut overlay = Overlay::default();
        overlay
            .leases
            .insert(LeaseId([1; 16]), (Read::absent(), Some(lease.clone())));
        let before = Read {
            value: Some(lease.clone()),
            create_revision: 7,
            mod_revision: 8,
        };
        overlay
            .leases
            .insert(LeaseId([2; 16]), (before.clone(), None));
        known.leases.insert(LeaseId([2; 16]), before);
        let counter = Read {
            value: Some(2),
            create_revision: 3,
            mod_revision: 8,
        };
        overlay.hosts.insert("h1".into(), (counter, 3));
        known.learn(&overlay, 10, 100);
        let one = &known.leases[&LeaseId([1; 16])];
        assert_eq!((one.create_revision, one.mod_revision), (10, 10));
        assert_eq!(one.value.as_ref(), Some(&lease));
        assert!(!known.leases.contains_key(&LeaseId([2; 16])));
        let h1 = &known.hosts["h1"];
        assert_eq!(
            (h1.value, h1.create_revision, h1.mod_revision),
            (Some(3), 3, 10)
        );

        // Without a revision to compare on, the keys are forgotten.
        known.learn(&overlay, 0, 100);
        assert!(known.leases.is_empty() && known.hosts.is_empty());

        // Past the bound, what was known of other keys is forgotten, not what is doubtful.
        known.hosts.insert("h2".into(), Read::absent());
        known.learn(&overlay, 11, 1);
        assert!(!known.hosts.contains_key("h2"));
        assert!(known.hosts.contains_key("h1"));
        assert!(known.doubt.leases.contains_key(&LeaseId([9; 16])));
        assert!(known.careful);
    }

    #[test]
    fn a_key_written_is_known_at_the_transactions_revision() {
        let absent: Read<u32> = Read::absent();
        let created = absent.written(Some(1), 40);
        assert_eq!(
            (created.value, created.create_revision, created.mod_revision),
            (Some(1), 40, 40)
        );
        let updated = created.written(Some(2), 41);
        assert_eq!(
            (updated.value, updated.create_revision, updated.mod_revision),
            (Some(2), 40, 41)
        );
        let deleted = updated.written(None, 42);
        assert_eq!(
            (deleted.value, deleted.create_revision, deleted.mod_revision),
            (None, 0, 0)
        );
    }

    #[test]
    fn lease_keys_name_their_id() {
        let keys = Keys {
            prefix: "/fwnp".into(),
        };
        let id = LeaseId([0xab; 16]);
        let key = keys.lease(id);
        assert_eq!(
            lease_id_of(&key.as_bytes()[keys.leases().len()..]),
            Some(id)
        );
        assert_eq!(lease_id_of(b"abc"), None);
        assert_eq!(lease_id_of(&[b'z'; 32]), None);
    }
}
