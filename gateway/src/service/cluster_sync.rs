//! Enforcing the cluster's leases: the changes the etcd store's watch hands over (leases
//! stored, ended or listed again by any gateway, this one included) applied to this gateway's
//! lease book and kernel, so that a lease granted through another gateway can be renewed or
//! released through this one and its opening already holds in this kernel.
//!
//! A change is applied idempotently: the gateway's own writes come back through the watch, and
//! a lease already in the book with the stored expiry is left as it is. An end or a renewal of
//! this gateway's is in the book before its commit; until the watch brings it back, what the
//! watch or a list shows of the lease from before it is passed over (see [`OnItsWay`]), and if
//! its commit then fails the cluster is listed again. A stored lease takes
//! its stored expiry (the kernel element's timeout is its remaining time); an end takes the
//! lease out of the book and its elements out of the kernel, and a revocation sends the host,
//! if it is connected here, the Revoked notice the revoking gateway sent its own connections.
//! The gateway that ended a lease audits it; the others only carry it out. An end whose
//! commit got no answer may have been taken all the same, now or once etcd's quorum is back:
//! the gateway keeps its record and lists the cluster again, and records it once the end's
//! tombstone (from the watch or a list) shows that attempt taken, by its site and end time. An
//! attempt made again after a list commits with its own record, and the earlier ones are
//! forgotten: a lease is recorded ended once.
//!
//! A cluster state found lost or replaced (`ClusterChange::Replaced`) replaces the book with
//! the leases the state holds now and reconciles the kernel with it: the openings of leases it
//! lacks close, without a Revoked notice (their hosts learn it from the epoch), and the
//! cluster's new epoch is in force from then on, in every Welcome, Granted and Leases. Every
//! connected host that asked for notices is sent EpochChanged, after the book and kernel took
//! the new state, so that the Opens it answers with are taken into the new state.

use super::request::audit_event;
use super::*;
use crate::store::{ClusterChange, ClusterEnd, LeaseEnding};
use fwnp_proto::EpochChanged;
use fwnp_proto::gateway::Applied;

impl Service {
    /// Applies the cluster's changes as they come, until the service is dropped or the store
    /// stops.
    pub(super) async fn follow_cluster(
        service: std::sync::Weak<Service>,
        mut changes: tokio::sync::mpsc::UnboundedReceiver<ClusterChange>,
    ) {
        while let Some(change) = changes.recv().await {
            let Some(service) = service.upgrade() else {
                return;
            };
            service.apply_change(change).await;
        }
    }

    async fn apply_change(&self, change: ClusterChange) {
        match change {
            ClusterChange::Stored { lease, .. } => {
                if !self.older_than_own_change(&lease) {
                    self.apply_stored(&lease, false).await;
                }
            }
            ClusterChange::Ended { id, end, .. } => {
                lock(&self.ends_on_their_way).remove(&id);
                self.settle_unanswered_end(&id, end.as_ref(), false);
                self.apply_ended(&id, end.as_ref()).await;
            }
            ClusterChange::Replaced {
                previous: _,
                epoch,
                why,
                live,
                revision,
            } => {
                self.replace_state(epoch, &why, &live, revision).await;
            }
            ClusterChange::Listed {
                live,
                ended,
                revision,
            } => {
                self.metrics.cluster_lists.inc();
                self.record_unanswered_ends(&live, &ended);
                let absent = self.absent_from(&live);
                for id in &absent {
                    self.apply_ended(id, ended.get(id)).await;
                }
                // An end of this gateway's that the list shows done is no longer on its way;
                // one the list shows undone was committed after the list was read, and the
                // watch brings it next.
                {
                    let listed: BTreeSet<LeaseId> = live.iter().map(|l| l.id).collect();
                    lock(&self.ends_on_their_way).retain(|id, _| listed.contains(id));
                }
                let mut changed = 0;
                for lease in live.iter().filter(|l| !self.older_than_own_change(l)) {
                    if self.apply_stored(lease, false).await {
                        changed += 1;
                    }
                }
                info!(
                    revision,
                    live = live.len(),
                    removed = absent.len(),
                    changed,
                    "the cluster's leases listed again and applied"
                );
                let mut event = AuditEvent::new(now_ms(), AuditKind::Reconcile);
                event.actor = Some("gateway".into());
                event.reason = Some(format!(
                    "cluster listed again at revision {revision}: {} live, {} ended meanwhile \
                     removed, {changed} added or changed",
                    live.len(),
                    absent.len()
                ));
                self.record(event);
            }
        }
    }

    /// Whether `record`, as the watch or a list shows it, is older than a change of this
    /// gateway's to the lease that is on its way to the store (see [`OnItsWay`]): an end, or
    /// a renewal to a later expiry. The book holds that change already, and the watch brings
    /// it back; taking `record` in would open again a lease being ended, or close early in
    /// the kernel one being renewed. It is then passed over, and marked so.
    fn older_than_own_change(&self, record: &LeaseRecord) -> bool {
        if let Some(end) = lock(&self.ends_on_their_way).get_mut(&record.id) {
            end.passed_over = true;
            return true;
        }
        let mut renewals = lock(&self.renewals_on_their_way);
        match renewals.get_mut(&record.id) {
            Some(renewal) if record.expires_ms < renewal.expires_ms => {
                renewal.passed_over = true;
                true
            }
            // The renewal itself, come back, or a later one.
            Some(_) => {
                renewals.remove(&record.id);
                false
            }
            None => false,
        }
    }

    /// Settles, on a list of the cluster, the ends whose commit got no answer (see
    /// [`Service::settle_unanswered_end`]): those of leases `live` still holds may apply yet,
    /// and are kept.
    fn record_unanswered_ends(&self, live: &[LeaseRecord], ended: &HashMap<LeaseId, ClusterEnd>) {
        let ids: Vec<LeaseId> = lock(&self.unanswered_ends).keys().copied().collect();
        if ids.is_empty() {
            return;
        }
        let listed: BTreeSet<LeaseId> = live.iter().map(|l| l.id).collect();
        for id in ids {
            self.settle_unanswered_end(&id, ended.get(&id), listed.contains(&id));
        }
    }

    /// Settles the ends of lease `id` whose commit got no answer, now that its end is known
    /// (`end`, from its tombstone) or that it is still `live`: the attempt of this gateway's
    /// site that the tombstone names by its end time was taken, and is recorded now; the others
    /// were not, and are forgotten. A lease still live keeps them, as one ended without a
    /// tombstone to tell (gone after [`crate::store::TOMBSTONE_TTL`]) forgets them.
    fn settle_unanswered_end(&self, id: &LeaseId, end: Option<&ClusterEnd>, live: bool) {
        if live {
            return;
        }
        let Some(attempts) = lock(&self.unanswered_ends).remove(id) else {
            return;
        };
        let Some(site) = self.cluster().map(|c| c.site()) else {
            return;
        };
        if let Some(record) = taken_attempt(attempts, end, site) {
            info!(lease = %id, "an end whose commit got no answer was taken: recorded now");
            self.record(audit_event(record));
        }
    }

    /// The leases of the book that `live` lacks, but for those whose insert is on its way to
    /// the store: a list read before their commit lacks them, and taking them out of the book
    /// would have the grant refused while the store keeps it (the watch brings the commit
    /// next, or the grant's failure takes them out).
    fn absent_from(&self, live: &[LeaseRecord]) -> Vec<LeaseId> {
        let listed: BTreeSet<LeaseId> = live.iter().map(|l| l.id).collect();
        // In the request path's order: the core, then the inserts on their way.
        let core = lock(&self.core);
        let being_stored = lock(&self.being_stored);
        core.book()
            .iter()
            .filter(|l| !listed.contains(&l.id) && !being_stored.contains_key(&l.id))
            .map(|l| l.id)
            .collect()
    }

    /// Takes the cluster's state as it is now that it was found lost or replaced (see the
    /// module documentation): the book and kernel hold `live`, `epoch` is in force, one audit
    /// record says so, and the hosts connected with NOTICES are sent EpochChanged.
    async fn replace_state(&self, epoch: Epoch, why: &str, live: &[LeaseRecord], revision: i64) {
        let held = self.epoch();
        // The epoch first, as spec 12.1 orders it: a Granted, Leases or Welcome sent while the
        // leases are replaced already tells the state's new epoch, not the one it lost.
        lock(&self.core).set_epoch(epoch);
        self.epoch
            .store(epoch, std::sync::atomic::Ordering::Release);
        // Ends this gateway could not store: those of leases the state lacks tell no more.
        self.record_unanswered_ends(live, &HashMap::new());
        // The state's leases are taken as it holds them, changes made under the old one or not.
        lock(&self.ends_on_their_way).clear();
        lock(&self.renewals_on_their_way).clear();
        let absent = self.absent_from(live);
        // Lost with the state, not ended: no notice, no record of an end.
        for id in &absent {
            self.carry_out_end(id, None, None).await;
        }
        let mut changed = 0;
        for lease in live {
            if self.apply_stored(lease, false).await {
                changed += 1;
            }
        }
        self.metrics.epoch_changes.inc();
        warn!(
            previous = format_args!("{held:016x}"),
            epoch = format_args!("{epoch:016x}"),
            revision,
            live = live.len(),
            removed = absent.len(),
            changed,
            "the cluster's lease state was lost or replaced ({why}): its epoch and leases taken"
        );
        let mut event = AuditEvent::new(now_ms(), AuditKind::Reconcile);
        event.actor = Some("gateway".into());
        event.reason = Some(format!(
            "epoch changed from {held:016x} to {epoch:016x}: the cluster's lease state was \
             lost or replaced ({why}); at revision {revision}: {} live, {} no longer held \
             removed, {changed} added or changed",
            live.len(),
            absent.len()
        ));
        self.record(event);
        // The policy in force goes back into etcd if the state lost it.
        if let Some(cluster) = self.cluster() {
            let cluster = cluster.clone();
            tokio::spawn(async move { cluster.policy_state_replaced().await });
        }
        let notice = Message::EpochChanged(EpochChanged {
            common: Common::default(),
            epoch,
        });
        // Each on its own: a host slow to take its stream holds up neither the others nor the
        // changes of the cluster that follow.
        for session in self.sessions.all() {
            let notice = notice.clone();
            tokio::spawn(async move { session.notify(&notice).await });
        }
    }

    /// Takes in a lease as the cluster stores it: into the book (inserted, or its expiry
    /// changed) and into the kernel until its expiry. `rehold` programs the kernel even when the
    /// book already held the lease so (a lease this gateway's timer had given up). Returns
    /// whether anything changed.
    pub(super) async fn apply_stored(&self, record: &LeaseRecord, rehold: bool) -> bool {
        let lease = fwnp_proto::gateway::Lease {
            id: record.id,
            host: Arc::from(record.identity.as_str()),
            grants: record.grants.clone(),
            lifetime: record.granted_lifetime,
            created_ms: record.created_ms,
            expires_ms: record.expires_ms,
            app: record.app.clone().map(Box::new),
        };
        let applied = lock(&self.core).book_mut().apply(lease);
        match applied {
            Applied::Unchanged if !rehold => return false,
            Applied::OverCapacity => {
                warn!(lease = %record.id, "the lease book is full: a lease of the cluster is not enforced here");
                return false;
            }
            Applied::Inserted => self.metrics.live_leases.inc(),
            _ => {}
        }
        match &record.certificate {
            Some(certificate) => lock(&self.lease_credentials).set(
                &record.identity,
                record.id,
                &Arc::new(certificate.clone()),
            ),
            None => lock(&self.lease_credentials).set_unknown(record.id),
        }
        // A new expiry, earlier perhaps than the one the timer waits for.
        self.expiry_changed.notify_one();
        // One already past is ended by the timer (and never programmed).
        if record.expires_ms > now_ms()
            && let Err(e) = self
                .refresh(
                    &record.id,
                    &elements_of_all(&record.grants),
                    record.expires_ms,
                )
                .await
        {
            warn!(lease = %record.id, "a lease of the cluster was not programmed: {e}");
        }
        true
    }

    /// Carries out an end another gateway made: out of the book and the kernel, and the
    /// Revoked notice to the host's connections here.
    async fn apply_ended(&self, id: &LeaseId, end: Option<&ClusterEnd>) {
        lock(&self.renewals_on_their_way).remove(id);
        match end {
            Some(ClusterEnd { ending, site }) => {
                self.carry_out_committed_end(id, ending, site).await;
            }
            None => {
                self.carry_out_end(id, None, None).await;
            }
        }
    }

    /// Carries out an end the cluster's store has taken (made by the gateway of `site`, this
    /// one included): out of the book and the kernel, and a revocation's Revoked notice to the
    /// host's connections here. Nothing when the lease is no longer in the book (the end came
    /// back through the watch after it was carried out).
    pub(super) async fn carry_out_committed_end(
        &self,
        id: &LeaseId,
        ending: &LeaseEnding,
        site: &str,
    ) {
        self.carry_out_end(id, Some(ending), Some(site)).await;
    }

    async fn carry_out_end(&self, id: &LeaseId, ending: Option<&LeaseEnding>, site: Option<&str>) {
        let Some(lease) = lock(&self.core).book_mut().revoke(id) else {
            // Ended here (this gateway's own write coming back) or never known.
            return;
        };
        lock(&self.lease_credentials).forget(id);
        self.metrics.live_leases.dec();
        let kill = match ending.map(|e| e.end) {
            Some(LeaseEnd::Released | LeaseEnd::Revoked(_)) => self.config.filter.kill_connections,
            _ => false,
        };
        self.remove_elements(id, &lease.grants, kill).await;
        if let Some(LeaseEnding {
            end: LeaseEnd::Revoked(reason),
            why,
            by,
            ..
        }) = ending
        {
            let site = site.unwrap_or_default();
            if self.cluster().is_some_and(|c| c.site() == site) {
                self.metrics
                    .lease_ends
                    .with_label_values(&["revoked"])
                    .inc();
                info!(lease = %id, by = by.as_deref().unwrap_or("-"), "revoked");
            } else {
                info!(lease = %id, site = %site, "revoked through another gateway");
            }
            let notice = Message::Revoked(lease.to_revoked(*reason, why.clone().map(fit_reason)));
            for session in self.sessions.of(&lease.host) {
                session.notify(&notice).await;
            }
        }
    }

    /// Whether a store write's refusal only says that another member of the cluster ended the
    /// lease first (both revoked it, for one cause or two): its end, already audited there,
    /// reaches this gateway through the watch, and there is nothing to warn of.
    pub(super) fn ended_elsewhere(&self, error: &WriteError, writes: &[Write]) -> bool {
        self.cluster_store.is_some()
            && matches!(
                error,
                WriteError::Store(crate::store::StoreError::LeaseNotLive { .. })
            )
            && writes.iter().all(|w| {
                matches!(
                    w,
                    Write::End {
                        end: LeaseEnd::Revoked(_),
                        ..
                    } | Write::Audit(_)
                )
            })
    }

    /// Carries out the ends of the leases the timer found due. An expiry the cluster refuses
    /// because the lease was renewed through another gateway keeps the lease here too, with
    /// the stored expiry, in the book and the kernel. One the cluster could not take (no
    /// quorum) is tried again once it answers: the kernel's elements have ended on their own
    /// timeouts meanwhile, at the lease's end.
    pub(super) async fn carry_out_expiries(&self, effects: &[Effect]) {
        for effect in effects {
            let Effect::Commit(writes) = effect else {
                self.carry_out(None, std::slice::from_ref(effect)).await;
                continue;
            };
            match self.commit(None, writes.to_vec()).await {
                Ok(()) => {}
                Err(WriteError::Conflict(why)) if self.cluster_store.is_some() => {
                    for write in writes {
                        if let Write::End { id, .. } = write {
                            self.keep_renewed(id, &why).await;
                        }
                    }
                }
                // Another gateway's timer ended it first, and audited it.
                Err(WriteError::Store(crate::store::StoreError::LeaseNotLive { .. }))
                    if self.cluster_store.is_some() => {}
                Err(e) => {
                    warn!("lease change not stored: {e}");
                    // The lease stays in etcd with no event to tell: listed again once the
                    // cluster answers, it comes back past its expiry and is ended then.
                    if let Some(cluster) = &self.cluster_store {
                        cluster.resync();
                    }
                }
            }
        }
    }

    async fn keep_renewed(&self, id: &LeaseId, why: &str) {
        let Some(cluster) = &self.cluster_store else {
            return;
        };
        match cluster.lease(*id).await {
            Ok(Some(record)) => {
                info!(lease = %id, expires_ms = record.expires_ms, "not expired: {why}");
                self.apply_stored(&record, true).await;
            }
            // Ended by another gateway meanwhile: its end comes through the watch.
            Ok(None) => {}
            Err(e) => warn!(lease = %id, "the stored lease could not be read: {e}"),
        }
    }
}

/// Takes the changes of `ids` out of `on_their_way` once their commit failed: the store
/// did not take them, or it is not known whether it did. Says whether a change of the
/// cluster was passed over for one of them (the book then misses it).
pub(super) fn no_longer_on_their_way<'a>(
    on_their_way: &Mutex<HashMap<LeaseId, OnItsWay>>,
    ids: impl Iterator<Item = &'a LeaseId>,
) -> bool {
    let mut on_their_way = lock(on_their_way);
    let mut passed_over = false;
    for id in ids {
        passed_over |= on_their_way.remove(id).is_some_and(|c| c.passed_over);
    }
    passed_over
}

/// A change of this gateway's to a lease (an end, or a renewal), from just before its commit
/// until the watch brings it back, a list shows it taken, or its commit fails.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct OnItsWay {
    /// For a renewal, the expiry it stores (Unix ms): what the watch or a list shows before it
    /// is older.
    pub(super) expires_ms: u64,
    /// Whether a change of the lease, from the watch or a list, was passed over for this one:
    /// if this one then fails, the book misses that change.
    pub(super) passed_over: bool,
}

/// Which of a lease's unanswered attempts to end it (`attempts`) the cluster took, by its
/// tombstone (`end`): the one of this gateway's `site` whose end time the tombstone carries.
fn taken_attempt(
    attempts: Vec<AuditRecord>,
    end: Option<&ClusterEnd>,
    site: &str,
) -> Option<AuditRecord> {
    let end = end.filter(|end| end.site == site)?;
    attempts
        .into_iter()
        .find(|record| record.time_ms == end.ending.ended_ms)
}

#[cfg(test)]
mod tests {
    use super::*;
    use fwnp_proto::gateway::Lease;

    fn attempt(id: LeaseId, time_ms: u64) -> AuditRecord {
        AuditRecord {
            time_ms,
            peer: None,
            what: Audit::Ended {
                lease: Lease {
                    id,
                    host: Arc::from("web-01"),
                    grants: Vec::new(),
                    lifetime: 8,
                    created_ms: 1_000,
                    expires_ms: 9_000,
                    app: None,
                },
                end: LeaseEnd::Expired,
                by: Some("gateway".into()),
                why: None,
            },
        }
    }

    fn tombstone(site: &str, ended_ms: u64) -> ClusterEnd {
        ClusterEnd {
            ending: LeaseEnding {
                end: LeaseEnd::Expired,
                ended_ms,
                by: Some("gateway".into()),
                why: None,
            },
            site: site.into(),
        }
    }

    #[test]
    fn the_attempt_a_tombstone_names_by_site_and_time_is_the_one_taken() {
        let id = LeaseId([7; 16]);
        let attempts = || vec![attempt(id, 9_000), attempt(id, 12_500)];
        // The first attempt, sent while the quorum was lost, applied once it was back.
        let taken = taken_attempt(attempts(), Some(&tombstone("gw-a", 9_000)), "gw-a");
        assert_eq!(taken.map(|r| r.time_ms), Some(9_000));
        // A later attempt, made after a list and committed with its own record: the
        // unanswered ones were not taken, and recording one would record the end twice.
        assert_eq!(
            taken_attempt(attempts(), Some(&tombstone("gw-a", 14_000)), "gw-a"),
            None
        );
        // Ended through another gateway, which recorded it.
        assert_eq!(
            taken_attempt(attempts(), Some(&tombstone("gw-b", 12_500)), "gw-a"),
            None
        );
        // No tombstone left to tell.
        assert_eq!(taken_attempt(attempts(), None, "gw-a"), None);
    }
}
