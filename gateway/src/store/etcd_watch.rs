//! Following the cluster: every gateway watches the lease keys from the revision of its
//! restore and hands each change to its service, which applies it to its own lease book and
//! kernel, so that every gateway enforces every lease of the cluster (the standby of a pair
//! already holds every opening, as pfsync and conntrackd hold states).
//!
//! # What a gateway is told
//! - [`ClusterChange::Stored`]: a lease key put, by any gateway (this one's own writes come
//!   back too: the service applies them idempotently, comparing expiries).
//! - [`ClusterChange::Ended`]: a lease key deleted, with how it ended when its tombstone came in
//!   the same transaction. A delete carries no value, so every end also puts a small key
//!   `P/ended/ID` (how, why, by whom, through which site) attached to an etcd lease of
//!   [`TOMBSTONE_TTL`]: the gateway to which the host is connected sends it the Revoked notice,
//!   and the tombstones vanish by themselves.
//! - [`ClusterChange::Listed`]: the watch was lost (an error, a member cut off from its quorum
//!   and cancelling the watch, a silent connection, a compacted revision): every live lease
//!   and every tombstone is listed again at one revision, for the service to reconcile its book
//!   and kernel with (add what is missing, drop what is absent, fix expiries), and the watch
//!   resumes after that revision. A full list rather than a replay from the last revision: an
//!   end this gateway could not store while the quorum was lost leaves its lease in etcd with
//!   no event to tell, and the list shows it.
//! - [`ClusterChange::Replaced`]: the cluster's lease state was lost or replaced (see "A state
//!   lost or replaced" in the store's documentation): the cluster's epoch now, and every lease
//!   the state holds now, for the service to take the epoch, replace its book and reconcile
//!   its kernel with, and tell its hosts.
//!
//! The last revision handed over is [`EtcdStore::applied_revision`]. An end the gateway could
//! not store (the quorum lost) asks for a list too ([`EtcdStore::resync`]), once the cluster
//! answers again: the lease is still in etcd, and no event would tell.
//!
//! A silent connection (a partition: no error comes, nothing comes) is found by asking the
//! member for the watch's progress every request timeout: a watch that has heard nothing for
//! [`SILENCE_TIMEOUTS`] timeouts is treated as lost.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::Duration;

use etcd_client::{
    Client, GetOptions, KvClient, ResponseHeader, Txn, TxnOp, TxnOpResponse, WatchOptions,
};
use fwnp_proto::{Epoch, LeaseId, RevokeReason};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::time::Instant;

use super::{Keys, Refusal, Request, StateMark, StoredLease, call_kv, lease_id_of, take_epoch};
use crate::store::{LeaseEnd, LeaseEnding, LeaseRecord};

/// How long a tombstone stays: long enough for every gateway to see it with the delete it
/// explains (they come in one watch response) or in a list after a short partition.
pub const TOMBSTONE_TTL: Duration = Duration::from_secs(60);

/// A watch that has heard nothing (no event, no progress answer) for this many request
/// timeouts is lost.
pub const SILENCE_TIMEOUTS: u32 = 3;

/// How long a lost watch waits before it lists and watches again.
const RETRY_PAUSE: Duration = Duration::from_millis(250);

/// A change of the cluster's leases, as the watch sees it. See the module documentation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClusterChange {
    /// A lease was stored (inserted, renewed or extended) at `revision`.
    Stored {
        /// The lease as stored (boxed: ends and lists are far smaller).
        lease: Box<LeaseRecord>,
        /// The revision of the put.
        revision: i64,
    },
    /// A lease ended at `revision`.
    Ended {
        /// The lease.
        id: LeaseId,
        /// The revision of the delete.
        revision: i64,
        /// How, when its tombstone came with the delete.
        end: Option<ClusterEnd>,
    },
    /// Every live lease at `revision`, after a lost watch.
    Listed {
        /// The live leases.
        live: Vec<LeaseRecord>,
        /// The tombstones of recent ends, by lease.
        ended: HashMap<LeaseId, ClusterEnd>,
        /// The revision of the list.
        revision: i64,
    },
    /// The cluster's lease state was lost or replaced: `epoch` names the state now, and
    /// `live` holds its leases at `revision`.
    Replaced {
        /// The epoch this gateway held before.
        previous: Epoch,
        /// The cluster's epoch now.
        epoch: Epoch,
        /// How the gateway found out.
        why: String,
        /// The live leases of the state now.
        live: Vec<LeaseRecord>,
        /// The revision of the list.
        revision: i64,
    },
}

/// How a lease ended, as its tombstone tells the other gateways.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterEnd {
    /// How, when, by whom and why.
    pub ending: LeaseEnding,
    /// The site of the gateway that ended it.
    pub site: String,
}

/// A tombstone's value (short names, as the lease values).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Tombstone {
    /// 0 released, 1 expired, 2 revoked.
    #[serde(rename = "k")]
    kind: u8,
    /// The revocation's reason number (protocol's RevokeReason).
    #[serde(rename = "r", default, skip_serializing_if = "Option::is_none")]
    reason: Option<u64>,
    #[serde(rename = "t")]
    ended_ms: u64,
    #[serde(rename = "b", default, skip_serializing_if = "Option::is_none")]
    by: Option<String>,
    #[serde(rename = "w", default, skip_serializing_if = "Option::is_none")]
    why: Option<String>,
    #[serde(rename = "s")]
    site: String,
}

impl Tombstone {
    pub(super) fn new(
        end: LeaseEnd,
        ended_ms: u64,
        by: Option<String>,
        why: Option<String>,
        site: &str,
    ) -> Self {
        let (kind, reason) = match end {
            LeaseEnd::Released => (0, None),
            LeaseEnd::Expired => (1, None),
            LeaseEnd::Revoked(reason) => (2, Some(reason.number())),
        };
        Tombstone {
            kind,
            reason,
            ended_ms,
            by,
            why,
            site: site.to_owned(),
        }
    }

    pub(super) fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64);
        // Writing to a Vec fails only for out-of-memory, which aborts anyway.
        let _ = ciborium::into_writer(self, &mut out);
        out
    }

    /// The end a tombstone's bytes tell; `None` for bytes that are not one.
    pub(super) fn decode(value: &[u8]) -> Option<ClusterEnd> {
        let tombstone: Tombstone = ciborium::from_reader(value).ok()?;
        let end = match (tombstone.kind, tombstone.reason) {
            (0, None) => LeaseEnd::Released,
            (1, None) => LeaseEnd::Expired,
            (2, Some(n)) => LeaseEnd::Revoked(RevokeReason::from_number(n)?),
            _ => return None,
        };
        Some(ClusterEnd {
            ending: LeaseEnding {
                end,
                ended_ms: tombstone.ended_ms,
                by: tombstone.by,
                why: tombstone.why,
            },
            site: tombstone.site,
        })
    }
}

/// Why a watch stopped.
enum Lost {
    /// The service no longer listens: stop following.
    Closed,
    /// The revision to resume from was compacted away.
    Compacted,
    /// An end could not be stored: list again (see [`EtcdStore::resync`]).
    Resync,
    /// The cluster's lease state was lost or replaced, for this reason: take its epoch and
    /// list again.
    Replaced(String),
    /// Anything else.
    Failed(String),
}

/// The task that follows the cluster for one gateway.
pub(super) struct Follower {
    pub(super) client: Client,
    pub(super) kv: KvClient,
    pub(super) keys: Keys,
    pub(super) timeout: Duration,
    pub(super) applied: Arc<AtomicI64>,
    pub(super) resync: Arc<AtomicBool>,
    pub(super) state: Arc<StateMark>,
    pub(super) changes: mpsc::UnboundedSender<ClusterChange>,
}

/// What one watch response brought.
enum Delivered {
    /// Its changes were handed over.
    Handed,
    /// The service no longer listens.
    Closed,
    /// It says the cluster's state was replaced (nothing of it was handed over).
    Replaced(String),
}

impl Follower {
    /// Watches from the revision after the applied one; lists again after each loss. Returns
    /// when the service stops listening.
    pub(super) async fn run(self) {
        let mut must_list = false;
        // Why the cluster's state was found replaced, until a list has handed the new one over.
        let mut replaced: Option<String> = None;
        loop {
            if self.changes.is_closed() {
                return;
            }
            // Taken whether or not a list is due anyway: a list answers it, and a flag left set
            // would end every watch at its first tick.
            let resync = self.resync.swap(false, Ordering::AcqRel);
            if must_list || replaced.is_some() || resync {
                match self.list(&mut replaced).await {
                    Ok(true) => {}
                    Ok(false) => return,
                    Err(refusal) => {
                        self.resync.store(true, Ordering::Release);
                        tracing::debug!(error = %refusal.error(), "etcd: the leases could not be listed again yet");
                        tokio::time::sleep(RETRY_PAUSE).await;
                        continue;
                    }
                }
            }
            let from = self.applied.load(Ordering::Acquire) + 1;
            match self.watch_from(from).await {
                Lost::Closed => return,
                Lost::Compacted => {
                    tracing::warn!(
                        from,
                        "etcd: the watch's revision was compacted; listing the leases again"
                    );
                }
                Lost::Resync => {
                    tracing::info!("etcd: listing the leases again for the ends not stored");
                }
                Lost::Replaced(why) => {
                    tracing::warn!("etcd: the cluster's lease state was lost or replaced ({why})");
                    replaced = Some(why);
                }
                Lost::Failed(why) => {
                    tracing::warn!(
                        from,
                        "etcd: the lease watch was lost ({why}); listing the leases again"
                    );
                }
            }
            must_list = true;
            tokio::time::sleep(RETRY_PAUSE).await;
        }
    }

    async fn watch_from(&self, from: i64) -> Lost {
        let mut watch_client = self.client.watch_client();
        let options = WatchOptions::new().with_prefix().with_start_revision(from);
        let mut stream = match tokio::time::timeout(
            self.timeout,
            watch_client.watch(self.keys.root(), Some(options)),
        )
        .await
        {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => return Lost::Failed(e.to_string()),
            Err(_) => return Lost::Failed(format!("no answer within {:?}", self.timeout)),
        };
        let mut heard = Instant::now();
        let mut tick = tokio::time::interval(self.timeout);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let silence = self.timeout * SILENCE_TIMEOUTS;
        loop {
            tokio::select! {
                message = stream.message() => match message {
                    Ok(Some(response)) => {
                        heard = Instant::now();
                        if response.compact_revision() > 0 {
                            return Lost::Compacted;
                        }
                        if response.canceled() {
                            return Lost::Failed(format!(
                                "cancelled by the member: {}",
                                response.cancel_reason()
                            ));
                        }
                        if response.events().is_empty() {
                            // A progress answer: every change up to its revision was sent.
                            if !response.created()
                                && let Some(header) = response.header()
                            {
                                self.applied.fetch_max(header.revision(), Ordering::AcqRel);
                            }
                            continue;
                        }
                        match self.deliver(response.events()) {
                            Delivered::Handed => {}
                            Delivered::Closed => return Lost::Closed,
                            Delivered::Replaced(why) => return Lost::Replaced(why),
                        }
                    }
                    Ok(None) => return Lost::Failed("the member ended the watch".into()),
                    Err(e) => return Lost::Failed(e.to_string()),
                },
                _ = tick.tick() => {
                    if self.changes.is_closed() {
                        return Lost::Closed;
                    }
                    if self.resync.load(Ordering::Acquire) {
                        return Lost::Resync;
                    }
                    if heard.elapsed() > silence {
                        return Lost::Failed(format!("nothing heard for {silence:?}"));
                    }
                    // A fresh or restored etcd sends nothing to a watch from a revision it has
                    // not reached: only a read finds it.
                    if let Some(why) = self.check_state().await {
                        return Lost::Replaced(why);
                    }
                    if let Err(e) = stream.request_progress().await {
                        return Lost::Failed(e.to_string());
                    }
                }
            }
        }
    }

    /// Hands the events of one watch response to the service, a lease's delete with the
    /// tombstone put in the same transaction; none when the response deletes the epoch or puts
    /// another one (the state they belong to is replaced: the list that follows tells it).
    fn deliver(&self, events: &[etcd_client::Event]) -> Delivered {
        let epoch_key = self.keys.epoch();
        for kv in events.iter().filter_map(|e| e.kv()) {
            if kv.key() != epoch_key.as_bytes() {
                continue;
            }
            if kv.version() == 0 {
                return Delivered::Replaced(format!("{epoch_key} was deleted"));
            }
            if let Some(why) = self.other_epoch(Some(kv.value())) {
                return Delivered::Replaced(why);
            }
        }
        let leases = self.keys.leases();
        let ended = self.keys.ended_prefix();
        let mut tombstones: HashMap<LeaseId, ClusterEnd> = HashMap::new();
        for kv in events.iter().filter_map(|e| e.kv()) {
            // A delete has version 0 (and no value): read so, not through the event's type,
            // which the client turns into a panic for a type it does not know.
            if kv.version() > 0
                && let Some(hex) = kv.key().strip_prefix(ended.as_bytes())
                && let Some(id) = lease_id_of(hex)
                && let Some(end) = Tombstone::decode(kv.value())
            {
                tombstones.insert(id, end);
            }
        }
        let mut revision = 0;
        for kv in events.iter().filter_map(|e| e.kv()) {
            revision = revision.max(kv.mod_revision());
            let Some(hex) = kv.key().strip_prefix(leases.as_bytes()) else {
                continue;
            };
            let Some(id) = lease_id_of(hex) else {
                tracing::warn!(
                    key = %String::from_utf8_lossy(kv.key()),
                    "etcd: a key under the leases names no lease; ignored"
                );
                continue;
            };
            let change = if kv.version() == 0 {
                ClusterChange::Ended {
                    id,
                    revision: kv.mod_revision(),
                    end: tombstones.remove(&id),
                }
            } else {
                match StoredLease::decode(kv.key(), kv.value()).and_then(|l| l.record(id)) {
                    Ok(lease) => ClusterChange::Stored {
                        lease: Box::new(lease),
                        revision: kv.mod_revision(),
                    },
                    Err(e) => {
                        tracing::warn!(lease = %id, "etcd: {e}; ignored");
                        continue;
                    }
                }
            };
            if self.changes.send(change).is_err() {
                return Delivered::Closed;
            }
        }
        self.applied.fetch_max(revision, Ordering::AcqRel);
        Delivered::Handed
    }

    /// Why the epoch key's value (`None`: absent) says the cluster's state is not the one this
    /// gateway holds; `None` while it holds this gateway's epoch.
    fn other_epoch(&self, value: Option<&[u8]>) -> Option<String> {
        let key = self.keys.epoch();
        let Some(value) = value else {
            return Some(format!("{key} is absent"));
        };
        let ours = self.state.epoch();
        match super::parse_epoch(&key, value) {
            Ok(epoch) if epoch == ours => None,
            Ok(epoch) => Some(format!("{key} holds {epoch:016x}, not {ours:016x}")),
            Err(refusal) => Some(refusal.error().to_string()),
        }
    }

    /// Why a read of the epoch key (`value`) answered with `header` says the cluster's state
    /// was lost or replaced, `seen` being the highest revision this gateway had taken in
    /// before the read was sent; `None` while nothing says so.
    fn replaced_because(
        &self,
        value: Option<&[u8]>,
        header: Option<&ResponseHeader>,
        seen: i64,
    ) -> Option<String> {
        if let Some(why) = self.other_epoch(value) {
            return Some(why);
        }
        let header = header?;
        let known = self.state.cluster_id.load(Ordering::Acquire);
        if known != 0 && header.cluster_id() != 0 && header.cluster_id() != known {
            return Some(format!(
                "etcd answers as cluster {:016x}, not {known:016x}",
                header.cluster_id()
            ));
        }
        // A linearizable read answers at least every revision committed before it was sent.
        if header.revision() < seen {
            return Some(format!(
                "etcd answers at revision {}, below revision {seen} already taken in",
                header.revision()
            ));
        }
        None
    }

    /// Reads the epoch key: why the cluster's state was lost or replaced, if the answer says
    /// so. Nothing when etcd does not answer (the watch's silence tells that).
    async fn check_state(&self) -> Option<String> {
        let seen = self.applied.load(Ordering::Acquire);
        let key = self.keys.epoch();
        let response = call_kv(
            &self.kv,
            self.timeout,
            "read the epoch",
            Request::Read,
            |mut kv| {
                let key = key.clone();
                async move { kv.get(key, None).await }
            },
        )
        .await
        .ok()?;
        let value = response.kvs().first().map(|kv| kv.value());
        self.replaced_because(value, response.header(), seen)
    }

    /// Lists every live lease and tombstone at one revision, with the epoch key, and hands
    /// them over: as the state replaced when `replaced` says so or the list finds it so
    /// (after taking the cluster's epoch; `replaced` is then cleared), else as listed again.
    /// Returns false when the service stopped listening.
    async fn list(&self, replaced: &mut Option<String>) -> Result<bool, Refusal> {
        let (leases, ended) = (self.keys.leases(), self.keys.ended_prefix());
        let epoch_key = self.keys.epoch();
        let txn = Txn::new().and_then([
            TxnOp::get(leases.clone(), Some(GetOptions::new().with_prefix())),
            TxnOp::get(ended.clone(), Some(GetOptions::new().with_prefix())),
            TxnOp::get(epoch_key, None),
        ]);
        let seen = self.applied.load(Ordering::Acquire);
        let response = call_kv(&self.kv, self.timeout, "list", Request::Read, |mut kv| {
            let txn = txn.clone();
            async move { kv.txn(txn).await }
        })
        .await?;
        let revision = response.header().map_or(0, |h| h.revision());
        let mut gets = response.op_responses().into_iter().filter_map(|r| match r {
            TxnOpResponse::Get(get) => Some(get),
            _ => None,
        });
        let (Some(live_kvs), Some(ended_kvs), Some(epoch_kvs)) =
            (gets.next(), gets.next(), gets.next())
        else {
            return Err(Refusal::Corrupt(
                "etcd answered a list without its reads".into(),
            ));
        };
        let epoch_value = epoch_kvs.kvs().first().map(|kv| kv.value());
        if replaced.is_none() {
            *replaced = self.replaced_because(epoch_value, response.header(), seen);
        }
        let mut live = Vec::new();
        for kv in live_kvs.kvs() {
            let Some(id) = kv
                .key()
                .strip_prefix(leases.as_bytes())
                .and_then(lease_id_of)
            else {
                continue;
            };
            match StoredLease::decode(kv.key(), kv.value()).and_then(|l| l.record(id)) {
                Ok(lease) => live.push(lease),
                Err(e) => tracing::warn!(lease = %id, "etcd: {e}; ignored"),
            }
        }
        let ended = ended_kvs
            .kvs()
            .iter()
            .filter_map(|kv| {
                let id = kv
                    .key()
                    .strip_prefix(ended.as_bytes())
                    .and_then(lease_id_of)?;
                Some((id, Tombstone::decode(kv.value())?))
            })
            .collect();
        let change = match replaced.take() {
            Some(why) => {
                let previous = self.state.epoch();
                // A key still holding this gateway's epoch is given a new one; one holding
                // another epoch is the cluster's already.
                let still_ours = epoch_value
                    .and_then(|v| super::parse_epoch(&self.keys.epoch(), v).ok())
                    .filter(|&e| e == previous);
                let taken = take_epoch(&self.kv, &self.keys, self.timeout, still_ours).await;
                let (epoch, cluster_id) = match taken {
                    Ok(taken) => taken,
                    Err(refusal) => {
                        *replaced = Some(why);
                        return Err(refusal);
                    }
                };
                self.state.epoch.store(epoch, Ordering::Release);
                let cluster_id = response
                    .header()
                    .map(|h| h.cluster_id())
                    .filter(|&id| id != 0)
                    .unwrap_or(cluster_id);
                self.state.cluster_id.store(cluster_id, Ordering::Release);
                tracing::warn!(
                    previous = format_args!("{previous:016x}"),
                    epoch = format_args!("{epoch:016x}"),
                    revision,
                    live = live.len(),
                    "etcd: the cluster's lease state was lost or replaced ({why}); its epoch \
                     and leases taken"
                );
                ClusterChange::Replaced {
                    previous,
                    epoch,
                    why,
                    live,
                    revision,
                }
            }
            None => ClusterChange::Listed {
                live,
                ended,
                revision,
            },
        };
        let sent = self.changes.send(change).is_ok();
        self.applied.store(revision, Ordering::Release);
        Ok(sent)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tombstones_round_trip_and_bad_ones_are_none() {
        for end in [
            LeaseEnd::Released,
            LeaseEnd::Expired,
            LeaseEnd::Revoked(RevokeReason::PolicyChanged),
        ] {
            let tombstone = Tombstone::new(end, 42, Some("operator".into()), None, "gw-b");
            let back = Tombstone::decode(&tombstone.encode()).expect("decoded");
            assert_eq!(back.ending.end, end);
            assert_eq!(back.ending.ended_ms, 42);
            assert_eq!(back.ending.by.as_deref(), Some("operator"));
            assert_eq!(back.site, "gw-b");
        }
        let unknown_reason = Tombstone {
            kind: 2,
            reason: Some(99),
            ended_ms: 0,
            by: None,
            why: None,
            site: "x".into(),
        };
        assert_eq!(Tombstone::decode(&unknown_reason.encode()), None);
        for bad in [&b""[..], b"\xff", b"\xa1\x61k\x07"] {
            assert_eq!(Tombstone::decode(bad), None);
        }
    }
}
