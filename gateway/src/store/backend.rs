//! The seam between the service and lease storage: [`LeaseStore`] (writes, and the leases of
//! the previous run at start) and [`StoreQueries`] (what the admin API reads, and the daemon's
//! pruning), with the SQLite [`Store`] as one implementation of both and [`MemoryStore`] as
//! another (for tests of the service's logic; it keeps nothing across a restart).
//!
//! The request path only writes through [`LeaseStore`] (leases and their audit records,
//! batched into group commits by the implementation) and, at start, asks it for the epoch and
//! the live leases. A cluster backend plugs in here: its writes may be refused
//! ([`WriteError::Conflict`], [`WriteError::Unavailable`]), which the request path turns into a
//! no-resources answer without having granted anything. The reads are a trait of their own so
//! that a backend may take writes before it answers queries.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;

use fwnp_proto::{Epoch, LeaseId};
use tokio::sync::watch;

use super::query::{ReportInput, aggregate_report, audit_page, page_size};
use super::{
    AuditEvent, AuditPage, AuditQuery, AuditRecord, LeaseEnding, LeaseFilter, LeaseRecord,
    LeaseState, Order, Outcome, ReportQuery, ReportRow, Restored, Store, StoreError, WriteOp,
    WriterStats,
};

/// Why a write was not made.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WriteError {
    /// Another writer changed what the write depends on (a cluster store's transaction whose
    /// comparison failed); nothing of it was applied.
    #[error("write conflict: {0}")]
    Conflict(String),
    /// A new lease would take its host over its quota counted across the cluster (spec 12.1):
    /// another member granted the places this one had not heard of yet; nothing was applied.
    #[error("{identity} holds {held} live leases across the cluster, at most {max}")]
    QuotaExceeded {
        /// The host.
        identity: String,
        /// Its live leases in the shared state.
        held: u32,
        /// Its quota.
        max: u32,
    },
    /// The store takes no writes now (a cluster store cut off from its quorum); nothing of it
    /// was applied.
    #[error("the store takes no writes: {0}")]
    Unavailable(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A write in progress; resolves once it is durable (or refused).
pub type WriteFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, WriteError>> + Send + 'a>>;

/// Lease and audit storage as the service reaches it.
///
/// ```
/// use fwnp_gateway::store::{LeaseStore, MemoryStore};
/// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
/// let store = MemoryStore::new(0x42);
/// let restored = store.restore(1_700_000_000_000).await.unwrap();
/// assert!(restored.live.is_empty());
/// assert_eq!(store.epoch(), 0x42);
/// # });
/// ```
pub trait LeaseStore: Send + Sync + std::fmt::Debug {
    /// The gateway's epoch: the same across restarts as long as the stored state lasts.
    fn epoch(&self) -> Epoch;

    /// At start: the live leases, soonest expiry first, then by lease id, after recording those
    /// already past their expiry at `now_ms` as expired.
    fn restore(&self, now_ms: u64) -> WriteFuture<'_, Restored>;

    /// At start: hands each live lease to `live` (what [`LeaseStore::restore`] returns as
    /// live), after or while recording those already past their expiry at `now_ms` as
    /// expired, and resolves to those. A store that can read its leases one at a time hands
    /// them over as it reads them, so that a restore never holds all the leases twice, once
    /// as read and once as loaded; the others read them all first.
    ///
    /// ```
    /// use fwnp_gateway::store::{LeaseStore, MemoryStore};
    /// # tokio::runtime::Builder::new_current_thread().build().unwrap().block_on(async {
    /// let store = MemoryStore::new(0x42);
    /// let mut live = 0;
    /// let expired = store.restore_each(1_700_000_000_000, &mut |_| live += 1).await.unwrap();
    /// assert_eq!((live, expired.len()), (0, 0));
    /// # });
    /// ```
    fn restore_each<'a>(
        &'a self,
        now_ms: u64,
        live: &'a mut (dyn FnMut(LeaseRecord) + Send),
    ) -> WriteFuture<'a, Vec<LeaseRecord>> {
        Box::pin(async move {
            let restored = self.restore(now_ms).await?;
            restored.live.into_iter().for_each(live);
            Ok(restored.expired)
        })
    }

    /// Applies `ops` atomically (all or none), batched with the writes of other callers into one
    /// commit where the implementation can, and resolves once they are durable.
    fn commit(&self, ops: Vec<WriteOp>) -> WriteFuture<'static, ()>;

    /// Queues `ops` (audit records that need not hold up an answer) without waiting.
    fn record(&self, ops: Vec<WriteOp>) -> Result<(), WriteError>;
}

impl LeaseStore for Store {
    fn epoch(&self) -> Epoch {
        Store::epoch(self)
    }

    fn restore(&self, now_ms: u64) -> WriteFuture<'_, Restored> {
        Box::pin(async move { Ok(Store::restore(self, now_ms).await?) })
    }

    fn restore_each<'a>(
        &'a self,
        now_ms: u64,
        live: &'a mut (dyn FnMut(LeaseRecord) + Send),
    ) -> WriteFuture<'a, Vec<LeaseRecord>> {
        Box::pin(async move { Ok(Store::restore_each(self, now_ms, live).await?) })
    }

    fn commit(&self, ops: Vec<WriteOp>) -> WriteFuture<'static, ()> {
        let writer = self.writer().clone();
        Box::pin(async move { Ok(writer.commit(ops).await?) })
    }

    fn record(&self, ops: Vec<WriteOp>) -> Result<(), WriteError> {
        Ok(self.writer().record(ops)?)
    }
}

/// What the admin API reads from the store, and the daemon's pruning of old records.
///
/// Reads answer at once (the SQLite store's block on its read connections, so call them from
/// blocking threads); [`StoreQueries::audit_watch`] tells a follower when to read again.
///
/// ```
/// use fwnp_gateway::store::{LeaseFilter, MemoryStore, StoreQueries};
/// let store = MemoryStore::new(7);
/// // Through the trait: MemoryStore has a `leases()` of its own, for tests.
/// assert!(StoreQueries::leases(&store, &LeaseFilter::default()).unwrap().is_empty());
/// assert_eq!(store.live_lease_count().unwrap(), 0);
/// ```
pub trait StoreQueries: Send + Sync + std::fmt::Debug {
    /// Where the store keeps its data, in words for the admin API's status (a file, a cluster).
    fn location(&self) -> String;

    /// Whether the store was created by this run (the epoch is new then).
    fn is_new_state(&self) -> bool;

    /// One lease, live or ended.
    fn lease(&self, id: LeaseId) -> Result<Option<LeaseRecord>, StoreError>;

    /// Leases matching `filter`, soonest expiry first, then by lease id.
    fn leases(&self, filter: &LeaseFilter) -> Result<Vec<LeaseRecord>, StoreError>;

    /// Every live lease, soonest expiry first, then by lease id.
    fn live_leases(&self) -> Result<Vec<LeaseRecord>, StoreError> {
        self.leases(&LeaseFilter::default())
    }

    /// How many leases are live.
    fn live_lease_count(&self) -> Result<u64, StoreError>;

    /// One page of audit events matching `query`.
    fn audit(&self, query: &AuditQuery) -> Result<AuditPage, StoreError>;

    /// Events after `after_id`, oldest first, matching the filters of `query` (its cursor and
    /// order are ignored): the "follow" primitive. Returns at most `limit` events.
    fn audit_follow(
        &self,
        after_id: u64,
        query: &AuditQuery,
        limit: usize,
    ) -> Result<Vec<AuditRecord>, StoreError> {
        let mut q = query.clone();
        q.cursor = Some(after_id);
        q.order = Order::OldestFirst;
        q.limit = limit;
        self.audit(&q).map(|page| page.events)
    }

    /// The id of the newest stored audit event, updated as events are stored: a follower waits
    /// on it and then calls [`StoreQueries::audit_follow`].
    fn audit_watch(&self) -> watch::Receiver<u64>;

    /// The usage report: what each host asked for each application and opening in the
    /// window (live leases count as held up to `now_ms`).
    fn report(&self, query: &ReportQuery, now_ms: u64) -> Result<Vec<ReportRow>, StoreError>;

    /// The writer's counters, for the admin API's status.
    fn writer_stats(&self) -> WriterStats;

    /// Deletes audit events and ended leases older than `before_ms`, `slice` rows at a time
    /// where the store can, so that grants keep flowing meanwhile. Resolves to the audit
    /// events and the leases deleted.
    fn prune(&self, before_ms: u64, slice: u32) -> WriteFuture<'static, (u64, u64)>;
}

impl StoreQueries for Store {
    fn location(&self) -> String {
        self.path().display().to_string()
    }

    fn is_new_state(&self) -> bool {
        Store::is_new_state(self)
    }

    fn lease(&self, id: LeaseId) -> Result<Option<LeaseRecord>, StoreError> {
        Store::lease(self, id)
    }

    fn leases(&self, filter: &LeaseFilter) -> Result<Vec<LeaseRecord>, StoreError> {
        Store::leases(self, filter)
    }

    fn live_leases(&self) -> Result<Vec<LeaseRecord>, StoreError> {
        Store::live_leases(self)
    }

    fn live_lease_count(&self) -> Result<u64, StoreError> {
        Store::live_lease_count(self)
    }

    fn audit(&self, query: &AuditQuery) -> Result<AuditPage, StoreError> {
        Store::audit(self, query)
    }

    fn audit_watch(&self) -> watch::Receiver<u64> {
        Store::audit_watch(self)
    }

    fn report(&self, query: &ReportQuery, now_ms: u64) -> Result<Vec<ReportRow>, StoreError> {
        Store::report(self, query, now_ms)
    }

    fn writer_stats(&self) -> WriterStats {
        self.writer().stats()
    }

    fn prune(&self, before_ms: u64, slice: u32) -> WriteFuture<'static, (u64, u64)> {
        let writer = self.writer().clone();
        Box::pin(async move { Ok(writer.prune(before_ms, slice).await?) })
    }
}

/// Leases and audit events in memory, for tests: it applies writes as the SQLite store does
/// (a lease inserted twice, or ended or renewed when not live, fails the whole commit), and
/// can be told to refuse writes as a cluster store without quorum would.
#[derive(Debug)]
pub struct MemoryStore {
    epoch: Epoch,
    state: Mutex<MemoryState>,
    /// The id of the newest audit event.
    audit_watch: watch::Sender<u64>,
}

#[derive(Debug, Default)]
struct MemoryState {
    leases: HashMap<LeaseId, LeaseRecord>,
    /// In id order; ids are never reused, as the SQLite store's.
    audit: Vec<AuditRecord>,
    last_audit_id: u64,
    refusing: Option<String>,
    commits: u64,
    stats: WriterStats,
}

impl Default for MemoryStore {
    fn default() -> Self {
        MemoryStore::new(0)
    }
}

impl MemoryStore {
    /// An empty store with this epoch.
    pub fn new(epoch: Epoch) -> Self {
        MemoryStore {
            epoch,
            state: Mutex::default(),
            audit_watch: watch::Sender::new(0),
        }
    }

    /// From now on every write is refused with [`WriteError::Unavailable`] and this reason
    /// (`None`: writes are taken again).
    pub fn refuse_writes(&self, reason: Option<&str>) {
        self.lock().refusing = reason.map(str::to_owned);
    }

    /// The leases stored, live or ended.
    pub fn leases(&self) -> Vec<LeaseRecord> {
        let mut leases: Vec<_> = self.lock().leases.values().cloned().collect();
        leases.sort_by_key(|l| l.id);
        leases
    }

    /// The audit events stored, in commit order.
    pub fn audit(&self) -> Vec<AuditEvent> {
        self.lock().audit.iter().map(|r| r.event.clone()).collect()
    }

    /// How many commits were applied.
    pub fn commits(&self) -> u64 {
        self.lock().commits
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, MemoryState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn apply(&self, ops: Vec<WriteOp>) -> Result<(), WriteError> {
        let mut state = self.lock();
        state.stats.jobs += 1;
        state.stats.ops += ops.len() as u64;
        let result = Self::apply_locked(&mut state, ops);
        if result.is_err() {
            state.stats.failed_jobs += 1;
        }
        let last = state.last_audit_id;
        drop(state);
        self.audit_watch.send_if_modified(|newest| {
            let changed = *newest != last;
            *newest = last;
            changed
        });
        result
    }

    fn apply_locked(state: &mut MemoryState, ops: Vec<WriteOp>) -> Result<(), WriteError> {
        if let Some(reason) = &state.refusing {
            return Err(WriteError::Unavailable(reason.clone()));
        }
        // All or none: applied to a copy of what the operations touch, then put in place.
        let mut leases = state.leases.clone();
        let mut audit = Vec::new();
        let mut continue_after = 0;
        for op in ops {
            match op {
                WriteOp::InsertLease(new) => {
                    if leases.contains_key(&new.id) {
                        return Err(StoreError::DuplicateLease { id: new.id }.into());
                    }
                    leases.insert(
                        new.id,
                        LeaseRecord {
                            id: new.id,
                            identity: new.identity,
                            peer: new.peer,
                            grants: new.grants,
                            app: new.app,
                            requested_lifetime: new.requested_lifetime,
                            granted_lifetime: new.granted_lifetime,
                            created_ms: new.created_ms,
                            renewed_ms: None,
                            expires_ms: new.expires_ms,
                            state: LeaseState::Live,
                            ending: None,
                            certificate: new.certificate.as_deref().cloned(),
                        },
                    );
                }
                WriteOp::RenewLease {
                    id,
                    renewed_ms,
                    expires_ms,
                    granted_lifetime,
                    certificate,
                } => {
                    let lease = live(&mut leases, id)?;
                    lease.renewed_ms = Some(renewed_ms);
                    lease.expires_ms = expires_ms;
                    lease.granted_lifetime = granted_lifetime;
                    if let Some(certificate) = certificate {
                        lease.certificate = Some((*certificate).clone());
                    }
                }
                WriteOp::EndLease {
                    id,
                    end,
                    ended_ms,
                    by,
                    why,
                } => {
                    let lease = live(&mut leases, id)?;
                    lease.state = end.state();
                    lease.ending = Some(LeaseEnding {
                        end,
                        ended_ms,
                        by,
                        why,
                    });
                }
                WriteOp::Audit(event) => audit.push(*event),
                WriteOp::DeleteAuditBefore { before_ms, .. } => {
                    state.audit.retain(|r| r.event.time_ms >= before_ms);
                }
                WriteOp::DeleteEndedLeasesBefore { before_ms, .. } => leases.retain(|_, l| {
                    l.ending
                        .as_ref()
                        .is_none_or(|ending| ending.ended_ms >= before_ms)
                }),
                // Applied before the job's events are numbered (the job is applied whole).
                WriteOp::ContinueAuditIdsAfter { id } => continue_after = continue_after.max(id),
            }
        }
        state.leases = leases;
        state.last_audit_id = state.last_audit_id.max(continue_after);
        for event in audit {
            state.last_audit_id += 1;
            let id = state.last_audit_id;
            state.audit.push(AuditRecord { id, event });
        }
        state.commits += 1;
        state.stats.transactions += 1;
        state.stats.largest_batch = state.stats.largest_batch.max(1);
        Ok(())
    }
}

fn live(
    leases: &mut HashMap<LeaseId, LeaseRecord>,
    id: LeaseId,
) -> Result<&mut LeaseRecord, StoreError> {
    leases
        .get_mut(&id)
        .filter(|l| l.state == LeaseState::Live)
        .ok_or(StoreError::LeaseNotLive { id })
}

impl LeaseStore for MemoryStore {
    fn epoch(&self) -> Epoch {
        self.epoch
    }

    fn restore(&self, now_ms: u64) -> WriteFuture<'_, Restored> {
        Box::pin(async move {
            let (expired, mut live): (Vec<LeaseRecord>, Vec<LeaseRecord>) = self
                .leases()
                .into_iter()
                .filter(|l| l.state == LeaseState::Live)
                .partition(|l| l.expires_ms <= now_ms);
            live.sort_by_key(|l| (l.expires_ms, l.id));
            let ends = expired
                .iter()
                .map(|lease| WriteOp::EndLease {
                    id: lease.id,
                    end: super::LeaseEnd::Expired,
                    ended_ms: now_ms,
                    by: Some("gateway".into()),
                    why: Some("expired while the gateway was stopped".into()),
                })
                .collect::<Vec<_>>();
            if !ends.is_empty() {
                self.apply(ends)?;
            }
            let expired = expired
                .iter()
                .filter_map(|l| self.lock().leases.get(&l.id).cloned())
                .collect();
            Ok(Restored { live, expired })
        })
    }

    fn commit(&self, ops: Vec<WriteOp>) -> WriteFuture<'static, ()> {
        let result = self.apply(ops);
        Box::pin(async move { result })
    }

    fn record(&self, ops: Vec<WriteOp>) -> Result<(), WriteError> {
        self.apply(ops)
    }
}

/// A host filter as the SQLite store applies it: the identity exactly, or a glob (`*`, `?`,
/// `[...]`) when the filter holds a glob character.
fn host_matches(filter: &str, identity: Option<&str>) -> bool {
    let Some(identity) = identity else {
        return false;
    };
    if !filter.contains(['*', '?', '[']) {
        return filter == identity;
    }
    // SQLite's GLOB negates a class with `^`; the glob crate with `!`.
    let pattern = filter.replace("[^", "[!");
    glob::Pattern::new(&pattern).is_ok_and(|p| p.matches(identity))
}

/// Whether `lease` is one `f` asks for, as the SQLite store's query decides it.
pub(super) fn lease_matches(lease: &LeaseRecord, f: &LeaseFilter) -> bool {
    let grant_covers = |g: &fwnp_proto::Grant| {
        f.port
            .is_none_or(|port| g.ports.first <= port && port <= g.ports.last)
            && f.protocol.is_none_or(|p| g.protocol == p)
    };
    (f.include_ended || lease.state == LeaseState::Live)
        && f.host
            .as_deref()
            .is_none_or(|h| host_matches(h, Some(&lease.identity)))
        && f.app.as_deref().is_none_or(|app| {
            lease.app.as_ref().is_some_and(|a| {
                a.name.as_deref() == Some(app) || a.executable.as_deref() == Some(app)
            }) || lease.grants.iter().any(|g| g.app.as_deref() == Some(app))
        })
        && (f.port.is_none() && f.protocol.is_none() || lease.grants.iter().any(grant_covers))
        && f.certificate_serial
            .as_ref()
            .is_none_or(|s| lease.certificate.as_ref().is_some_and(|c| &c.serial == s))
}

fn audit_matches(e: &AuditEvent, q: &AuditQuery) -> bool {
    let request = e.request.as_ref();
    q.host
        .as_deref()
        .is_none_or(|h| host_matches(h, e.identity.as_deref()))
        && q.app.as_deref().is_none_or(|app| {
            e.app.as_ref().is_some_and(|a| {
                a.name.as_deref() == Some(app) || a.executable.as_deref() == Some(app)
            }) || request.and_then(|r| r.app_id.as_deref()) == Some(app)
        })
        && q.port.is_none_or(|port| {
            request
                .and_then(|r| r.ports)
                .is_some_and(|p| p.first <= port && port <= p.last)
                || e.grants
                    .iter()
                    .any(|g| g.ports.first <= port && port <= g.ports.last)
        })
        && (q.outcomes.is_empty() || e.outcome.is_some_and(|o| q.outcomes.contains(&o)))
        && (q.kinds.is_empty() || q.kinds.contains(&e.kind))
        && q.lease.is_none_or(|l| e.lease == Some(l))
        && q.since_ms.is_none_or(|t| e.time_ms >= t)
        && q.until_ms.is_none_or(|t| e.time_ms < t)
}

impl StoreQueries for MemoryStore {
    fn location(&self) -> String {
        "memory".into()
    }

    fn is_new_state(&self) -> bool {
        true
    }

    fn lease(&self, id: LeaseId) -> Result<Option<LeaseRecord>, StoreError> {
        Ok(self.lock().leases.get(&id).cloned())
    }

    fn leases(&self, filter: &LeaseFilter) -> Result<Vec<LeaseRecord>, StoreError> {
        let mut leases: Vec<LeaseRecord> = self
            .lock()
            .leases
            .values()
            .filter(|l| lease_matches(l, filter))
            .cloned()
            .collect();
        leases.sort_by_key(|l| (l.expires_ms, l.id));
        if let Some(limit) = filter.limit {
            leases.truncate(limit);
        }
        Ok(leases)
    }

    fn live_lease_count(&self) -> Result<u64, StoreError> {
        let state = self.lock();
        Ok(state
            .leases
            .values()
            .filter(|l| l.state == LeaseState::Live)
            .count() as u64)
    }

    fn audit(&self, q: &AuditQuery) -> Result<AuditPage, StoreError> {
        let limit = page_size(q);
        let state = self.lock();
        let after_cursor = |id: u64| match (q.cursor, q.order) {
            (None, _) => true,
            (Some(c), Order::NewestFirst) => id < c,
            (Some(c), Order::OldestFirst) => id > c,
        };
        let matching = |r: &&AuditRecord| after_cursor(r.id) && audit_matches(&r.event, q);
        let events: Vec<AuditRecord> = match q.order {
            Order::OldestFirst => state
                .audit
                .iter()
                .filter(matching)
                .take(limit)
                .cloned()
                .collect(),
            Order::NewestFirst => state
                .audit
                .iter()
                .rev()
                .filter(matching)
                .take(limit)
                .cloned()
                .collect(),
        };
        Ok(audit_page(events, limit))
    }

    fn audit_watch(&self) -> watch::Receiver<u64> {
        self.audit_watch.subscribe()
    }

    fn report(&self, q: &ReportQuery, now_ms: u64) -> Result<Vec<ReportRow>, StoreError> {
        let state = self.lock();
        let inputs = state.audit.iter().filter_map(|r| {
            let e = &r.event;
            let request = e.request.as_ref()?;
            let identity = e.identity.clone()?;
            let granted = match (e.kind, e.outcome?) {
                (super::AuditKind::Decision | super::AuditKind::Grant, Outcome::Granted) => true,
                (super::AuditKind::Decision | super::AuditKind::Grant, Outcome::Denied) => false,
                _ => return None,
            };
            let in_window = q.since_ms.is_none_or(|t| e.time_ms >= t)
                && q.until_ms.is_none_or(|t| e.time_ms < t)
                && q.host
                    .as_deref()
                    .is_none_or(|h| host_matches(h, Some(&identity)));
            in_window.then(|| ReportInput {
                identity,
                app: e.app_label().map(String::from),
                protocol: request.protocol,
                ports: request.ports,
                app_id: request.app_id.clone(),
                granted,
                lease: e.lease,
                lifetime_asked: request.lifetime,
                time_ms: e.time_ms,
                held_ms: e
                    .lease
                    .and_then(|id| state.leases.get(&id))
                    .map(|l| l.held_ms(now_ms)),
            })
        });
        Ok(aggregate_report(inputs))
    }

    fn writer_stats(&self) -> WriterStats {
        self.lock().stats
    }

    fn prune(&self, before_ms: u64, _slice: u32) -> WriteFuture<'static, (u64, u64)> {
        let result = (|| {
            let mut state = self.lock();
            if let Some(reason) = &state.refusing {
                return Err(WriteError::Unavailable(reason.clone()));
            }
            let (audit, leases) = (state.audit.len(), state.leases.len());
            state.audit.retain(|r| r.event.time_ms >= before_ms);
            state.leases.retain(|_, l| {
                l.ending
                    .as_ref()
                    .is_none_or(|ending| ending.ended_ms >= before_ms)
            });
            Ok((
                (audit - state.audit.len()) as u64,
                (leases - state.leases.len()) as u64,
            ))
        })();
        Box::pin(async move { result })
    }
}
