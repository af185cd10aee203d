//! The seam between the service and lease storage: [`LeaseStore`], with the SQLite [`Store`]
//! as one implementation and [`MemoryStore`] as another (for tests of the service's logic; it
//! keeps nothing across a restart).
//!
//! The service only writes through it (leases and their audit records, batched into group
//! commits by the implementation) and, at start, asks it for the epoch and the live leases. A
//! cluster backend plugs in here: its writes may be refused ([`WriteError::Conflict`],
//! [`WriteError::Unavailable`]), which the request path turns into a no-resources answer
//! without having granted anything.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;

use fwnp_proto::{Epoch, LeaseId};

use super::{
    AuditEvent, LeaseEnding, LeaseRecord, LeaseState, Restored, Store, StoreError, WriteOp,
};

/// Why a write was not made.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WriteError {
    /// Another writer changed what the write depends on (a cluster store's transaction whose
    /// comparison failed); nothing of it was applied.
    #[error("write conflict: {0}")]
    Conflict(String),
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

    /// At start: the live leases, after recording those already past their expiry at `now_ms`
    /// as expired.
    fn restore(&self, now_ms: u64) -> WriteFuture<'_, Restored>;

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

    fn commit(&self, ops: Vec<WriteOp>) -> WriteFuture<'static, ()> {
        let writer = self.writer().clone();
        Box::pin(async move { Ok(writer.commit(ops).await?) })
    }

    fn record(&self, ops: Vec<WriteOp>) -> Result<(), WriteError> {
        Ok(self.writer().record(ops)?)
    }
}

/// Leases and audit events in memory, for tests: it applies writes as the SQLite store does
/// (a lease inserted twice, or ended or renewed when not live, fails the whole commit), and
/// can be told to refuse writes as a cluster store without quorum would.
#[derive(Debug, Default)]
pub struct MemoryStore {
    epoch: Epoch,
    state: Mutex<MemoryState>,
}

#[derive(Debug, Default)]
struct MemoryState {
    leases: HashMap<LeaseId, LeaseRecord>,
    audit: Vec<AuditEvent>,
    refusing: Option<String>,
    commits: u64,
}

impl MemoryStore {
    /// An empty store with this epoch.
    pub fn new(epoch: Epoch) -> Self {
        MemoryStore {
            epoch,
            state: Mutex::default(),
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
        self.lock().audit.clone()
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
        if let Some(reason) = &state.refusing {
            return Err(WriteError::Unavailable(reason.clone()));
        }
        // All or none: applied to a copy of what the operations touch, then put in place.
        let mut leases = state.leases.clone();
        let mut audit = Vec::new();
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
                    state.audit.retain(|e| e.time_ms >= before_ms);
                }
                WriteOp::DeleteEndedLeasesBefore { before_ms, .. } => leases.retain(|_, l| {
                    l.ending
                        .as_ref()
                        .is_none_or(|ending| ending.ended_ms >= before_ms)
                }),
            }
        }
        state.leases = leases;
        state.audit.append(&mut audit);
        state.commits += 1;
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
            let (expired, live): (Vec<LeaseRecord>, Vec<LeaseRecord>) = self
                .leases()
                .into_iter()
                .filter(|l| l.state == LeaseState::Live)
                .partition(|l| l.expires_ms <= now_ms);
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
