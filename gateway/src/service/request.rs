//! The request path's driver: asks the request core for each request's step and carries out
//! its effects (kernel elements, store writes, audit records, notices, the connection's
//! state), answering only after the effects a grant depends on have succeeded.

use smallvec::SmallVec;

use super::*;

/// Requests in flight (this one included) up to which a new lease's kernel hold and store
/// commit are handed off at the same time. Beyond, the answer waits for queues rather than for
/// the two hand-offs, and leases that reach the store behind the kernel's batches make larger
/// group commits: measured in the closed loop (100 hosts, 8 requests each), about 38 store
/// operations a transaction in order against 24 at once, and about 1 µs more of the writer's
/// time per grant. At 1,000 requests a second there is rarely more than one in flight.
pub const AT_ONCE_IN_FLIGHT: i64 = 8;

/// The store's operation for a write of the request core; `certificate` is the one the host
/// asked with, kept with the leases it opens or renews. Public so that a harness driving the
/// request core writes the store as the service does.
///
/// ```
/// use fwnp_gateway::service::write_op;
/// use fwnp_gateway::store::WriteOp;
/// use fwnp_proto::gateway::request::{LeaseEnd, Write};
/// use fwnp_proto::LeaseId;
///
/// let end = Write::End {
///     id: LeaseId([1; 16]),
///     end: LeaseEnd::Released,
///     ended_ms: 1_700_000_000_000,
///     by: None,
///     why: None,
/// };
/// assert!(matches!(write_op(&end, None), WriteOp::EndLease { .. }));
/// ```
pub fn write_op(
    write: &Write,
    certificate: Option<Arc<fwnp_trust::identity::CertificateName>>,
) -> WriteOp {
    into_write_op(write.clone(), certificate)
}

/// As [`write_op`], taking the write: what it holds (grants, reasons, the audit record) moves
/// into the store's operation instead of being copied, once per grant on the request path.
pub(super) fn into_write_op(
    write: Write,
    certificate: Option<Arc<fwnp_trust::identity::CertificateName>>,
) -> WriteOp {
    match write {
        Write::Insert {
            lease,
            requested_lifetime,
            peer,
            max_leases,
        } => WriteOp::InsertLease(NewLease {
            id: lease.id,
            identity: lease.host.to_string(),
            peer: Some(peer),
            grants: lease.grants,
            app: lease.app.map(|app| *app),
            requested_lifetime,
            granted_lifetime: lease.lifetime,
            created_ms: lease.created_ms,
            expires_ms: lease.expires_ms,
            certificate,
            max_leases,
        }),
        Write::Renew {
            id,
            renewed_ms,
            expires_ms,
            granted_lifetime,
        } => WriteOp::RenewLease {
            id,
            renewed_ms,
            expires_ms,
            granted_lifetime,
            certificate,
        },
        Write::End {
            id,
            end,
            ended_ms,
            by,
            why,
        } => WriteOp::EndLease {
            id,
            end,
            ended_ms,
            by,
            why,
        },
        Write::Audit(record) => WriteOp::audit(audit_event(record)),
    }
}

/// The audit trail's event for a record of the request core; what the record holds moves
/// into the event.
pub(super) fn audit_event(record: AuditRecord) -> AuditEvent {
    let kind = match &record.what {
        Audit::Refused { .. } => AuditKind::Decision,
        Audit::Granted { .. } => AuditKind::Grant,
        Audit::Renewed { .. } => AuditKind::Renewal,
        Audit::Ended { end, .. } => match end {
            LeaseEnd::Released => AuditKind::Release,
            LeaseEnd::Expired => AuditKind::Expiry,
            LeaseEnd::Revoked(_) => AuditKind::Revocation,
        },
    };
    let mut event = AuditEvent::new(record.time_ms, kind);
    event.peer = record.peer;
    match record.what {
        Audit::Refused {
            identity,
            code,
            reason,
            rule,
            request,
        } => {
            event.outcome = Some(Outcome::Denied);
            event.identity = identity;
            event.code = Some(code);
            event.reason = Some(reason);
            event.rule = rule;
            match request {
                Asked::Open(open) => {
                    event.request =
                        Some(RequestSummary::from_opening(&open.opening, open.lifetime));
                    event.app = open.app;
                }
                Asked::Lease(id) => event.lease = Some(id),
                Asked::Other => {}
            }
        }
        Audit::Granted {
            lease,
            open,
            rule,
            reason,
        } => {
            event.outcome = Some(Outcome::Granted);
            event.identity = Some(lease.host.to_string());
            event.lease = Some(lease.id);
            event.request = Some(RequestSummary::from_opening(&open.opening, open.lifetime));
            event.app = open.app.clone();
            event.grants = lease.grants;
            event.granted_lifetime = Some(lease.lifetime);
            event.rule = rule;
            event.reason = Some(reason);
        }
        Audit::Renewed { lease } => {
            event.outcome = Some(Outcome::Renewed);
            event.identity = Some(lease.host.to_string());
            event.lease = Some(lease.id);
            event.grants = lease.grants;
            event.granted_lifetime = Some(lease.lifetime);
        }
        Audit::Ended {
            lease,
            end,
            by,
            why,
        } => {
            event.outcome = Some(match end {
                LeaseEnd::Released => Outcome::Released,
                LeaseEnd::Expired => Outcome::Expired,
                LeaseEnd::Revoked(_) => Outcome::Revoked,
            });
            event.identity = Some(lease.host.to_string());
            event.lease = Some(lease.id);
            event.grants = lease.grants;
            event.app = lease.app.map(|app| *app);
            event.actor = by;
            event.reason = why;
        }
    }
    event
}

/// The policy as the request core asks it.
impl Decide for Policy {
    fn host_limits(&self, identity: &str, addresses: &[IpAddr]) -> HostLimits {
        let limits = self.limits_for(identity, addresses);
        HostLimits {
            lifetime: lifetime_policy(limits.lifetime),
            max_leases: limits.max_leases,
            third_party: limits.third_party,
        }
    }

    fn evaluate(
        &self,
        identity: &str,
        addresses: &[IpAddr],
        hosts: &[IpAddr],
        open: &Open,
    ) -> Decision {
        let decision = self.evaluate_addresses(identity, addresses, hosts, open);
        let verdict = match decision.verdict {
            Verdict::Allowed(allowance) => Ok(PolicyFacts {
                grants: allowance.grants,
                grants_narrowed: allowance.remotes_narrowed,
                lifetime: lifetime_policy(allowance.lifetime),
                max_leases: Some(allowance.max_leases),
            }),
            Verdict::Denied(code) => Err(code),
        };
        Decision {
            verdict,
            rule: decision.rule.map(|r| r.name.to_string()),
            reason: decision.reason,
        }
    }

    fn still_allows(
        &self,
        identity: &str,
        addresses: &[IpAddr],
        grants: &[Grant],
    ) -> Result<LifetimePolicy, Objection> {
        Policy::still_allows(self, identity, addresses, grants)
            .map(lifetime_policy)
            .map_err(|e| Objection {
                reason: e.to_string(),
                rule: e.rule.map(|r| r.name.to_string()),
            })
    }
}

pub(super) fn lifetime_policy(bounds: crate::policy::LifetimeBounds) -> LifetimePolicy {
    LifetimePolicy {
        min: bounds.min_secs,
        max: bounds.max_secs,
        default: bounds.default_secs,
    }
}

impl Service {
    /// Answers one request: the bytes of one stream. The connection's own checks (a revoked
    /// certificate, the rate limit) come first; then the request core decides, and this carries
    /// out its effects, answering only after those a grant depends on have succeeded.
    pub async fn handle(&self, session: &Session, bytes: &[u8]) -> Message {
        let started = Instant::now();
        let _in_flight = InFlight::count(&self.metrics.requests_in_flight);
        // The connection is closed as soon as its host has the Revoked notices: until then it
        // may take nothing new, since nothing would revoke it again.
        if session
            .credential_revoked
            .load(std::sync::atomic::Ordering::Acquire)
        {
            self.metrics.request(ResultCode::NotAuthorized.name());
            return Message::Denied(denied(
                codec::peek_request_id(bytes),
                ResultCode::NotAuthorized,
                "the certificate of this connection has been revoked",
            ));
        }
        // Every request counts against its host's rate, whatever it holds: undecodable bytes
        // and repeated Hellos too, so that no request is free to flood with. A certificate
        // that names no identity is counted by its address, as its connections are.
        let rate_key = Sessions::key_ref(session);
        if let Some(retry_after) = self.rate_limited(rate_key) {
            return self.refuse_rate_limited(session, rate_key, bytes, retry_after);
        }
        // The addresses `allowed_addresses` gives, borrowed rather than copied per request: the
        // certificate's, or else the connection's source.
        let source = [session.remote.ip().to_canonical()];
        let addresses: &[IpAddr] = match &session.peer {
            Some(peer) if !peer.ip_sans.is_empty() => &peer.ip_sans,
            Some(_) => &source,
            None => &[],
        };
        debug_assert!(
            session
                .peer
                .as_ref()
                .is_none_or(|p| allowed_addresses(p, session.remote.ip()) == addresses)
        );
        let peer = Peer {
            identity: session.peer.as_ref().map(|p| p.identity.as_str()),
            no_identity: session.identity_error.as_deref().unwrap_or("no identity"),
            remote: session.remote,
            addresses,
        };
        if !session.welcomed.load(std::sync::atomic::Ordering::Acquire) {
            // Bounded all the same: a Welcome's stream that neither writes nor fails holds up
            // no request for longer than a request may take.
            let limit = self.config.limits.request_timeout;
            let _ = tokio::time::timeout(limit, session.welcome_settled()).await;
        }
        let connection = ConnectionState {
            welcomed: session.welcomed.load(std::sync::atomic::Ordering::Acquire),
        };
        let core_config = self.core_config();
        let prepare = |policy: &Policy| {
            RequestCore::prepare(&core_config, now_ms(), connection, &peer, bytes, policy)
        };
        let mut policy = self.policy();
        // Everything that needs no lease book (decoding, the Hello rules, validation, the
        // policy's decision on an Open) is done before the core's lock is taken, which is then
        // held only for the book's part, so that requests of other connections are not held up
        // behind it.
        let step = match prepare(&policy).into_answer() {
            Ok(answer) => Step::Answer(answer),
            Err(prepared) => {
                // The gap in which a reload may put another policy in force (a test holds the
                // request here to run one there).
                pause_at(&self.seams.decided).await;
                let waited = Instant::now();
                let mut core = lock(&self.core);
                self.metrics.stage(Stage::Lock, waited.elapsed());
                // A reload puts its policy in force before it lists the book's leases under
                // this lock. A request decided by the policy it replaced is decided again here
                // by the one in force: its lease could otherwise enter the book after the
                // reload's listing, and live on allowed by a policy no longer in force.
                // Compared under the read lock, copied only when it changed: the `Arc`'s count
                // is one cache line that every worker would write for every request.
                let current = {
                    let in_force = self.policy.read().unwrap_or_else(|e| e.into_inner());
                    (!Arc::ptr_eq(&in_force, &policy)).then(|| Arc::clone(&in_force))
                };
                let prepared = match current {
                    None => Err(prepared),
                    Some(current) => {
                        policy = current;
                        prepare(&policy).into_answer()
                    }
                };
                let mut rng = lock(&self.rng);
                let step = match prepared {
                    Ok(answer) => Step::Answer(answer),
                    Err(prepared) => {
                        core.handle_prepared(now_ms(), &peer, prepared, &*policy, &mut *rng)
                    }
                };
                // Registered before the core's lock is let go: a revocation takes it, so it
                // finds the new lease here.
                if let Step::Pending(pending) = &step
                    && let Some(id) = inserted_lease(pending.effects())
                {
                    lock(&self.being_stored).insert(id, Vec::new());
                }
                step
            }
        };
        let answer = match step {
            Step::Answer(answer) => answer,
            Step::Pending(mut pending) => {
                let effects = pending.take_effects();
                let inserted = inserted_lease(&effects);
                if inserted.is_some() {
                    pause_at(&self.seams.storing).await;
                }
                let renewed = renewed_lease(&effects);
                let (outcome, stored) = if pending.at_once()
                    && self.metrics.requests_in_flight.get() <= AT_ONCE_IN_FLIGHT
                {
                    self.carry_out_at_once(session, effects).await
                } else {
                    let outcome = self.carry_out_in_order(session, effects).await;
                    let stored = outcome.is_ok();
                    (outcome, stored)
                };
                if let Some(id) = inserted {
                    self.stored_or_not(id, stored).await;
                }
                let lease = pending.lease();
                let (failure, answer) = {
                    let mut core = lock(&self.core);
                    let outcome = match renewed {
                        // Revoked after the renewal passed the book: whether its end reached
                        // the store before the renewal (which the store then refused) or after
                        // it, the lease is not live, and its host is sent the Revoked notice.
                        // Granted would tell the host it is; a store's refusal, that the
                        // gateway lacked resources.
                        Some(id) if core.book().get(&id).is_none() => {
                            Err(EffectFailure::LeaseEnded)
                        }
                        _ => outcome,
                    };
                    let failure = outcome.as_ref().err().cloned();
                    (failure, core.finish(now_ms(), pending, outcome))
                };
                if let Some(e) = failure {
                    warn!(identity = session.identity(), lease = %lease, "request not carried out: {e}");
                }
                answer
            }
        };
        self.carry_out(Some(session), &answer.effects).await;
        if matches!(answer.label, Some("granted" | "renewed"))
            && let Message::Granted(granted) = &answer.message
            && session
                .credential_revoked
                .load(std::sync::atomic::Ordering::Acquire)
        {
            // A CRL reload revoked this connection's certificate while the lease was being
            // made or renewed, after it had revoked the leases the certificate last opened or
            // renewed: this one, opened or now renewed with it, must not outlive it.
            let text = if answer.label == Some("granted") {
                "the certificate of this connection was revoked while the lease was being granted"
            } else {
                "the certificate of this connection was revoked while the lease was being renewed"
            };
            // The notice goes to every connection of the host: an Open repeated or a Renew
            // names a lease its host's other connections (under another certificate) may hold.
            self.revoke(
                &granted.lease,
                RevokeReason::CredentialRevoked,
                "gateway",
                Some(text.to_owned()),
            )
            .await;
            self.metrics.request(ResultCode::NotAuthorized.name());
            return Message::Denied(denied(
                granted.common.request_id,
                ResultCode::NotAuthorized,
                text,
            ));
        }
        if let Some(label) = answer.label {
            self.metrics.request(label);
            if label == "granted" {
                self.metrics
                    .grant_latency
                    .observe(started.elapsed().as_secs_f64());
            }
        }
        answer.message
    }

    /// Carries out the effects a pending answer waits for, in order; the first failure stops
    /// them and is the outcome.
    pub(super) async fn carry_out_in_order(
        &self,
        session: &Session,
        effects: Vec<Effect>,
    ) -> Result<(), EffectFailure> {
        for effect in effects {
            match effect {
                Effect::Hold {
                    lease,
                    grants,
                    expires_ms,
                } => self.held(&lease, &grants, expires_ms).await?,
                Effect::Commit(writes) => self.committed(session, writes).await?,
                other => {
                    self.carry_out(Some(session), std::slice::from_ref(&other))
                        .await
                }
            }
        }
        Ok(())
    }

    /// Carries out a new lease's kernel hold and store commit at the same time (the core's
    /// [`Pending::at_once`](fwnp_proto::gateway::request::Pending::at_once)), so that its
    /// answer waits for the slower of the two hand-offs rather than for both in turn; each is
    /// carried out whatever becomes of the other. The joined outcome, and whether the store
    /// committed (a revocation held back meanwhile then has a stored lease to end).
    async fn carry_out_at_once(
        &self,
        session: &Session,
        effects: Vec<Effect>,
    ) -> (Result<(), EffectFailure>, bool) {
        let mut hold = None;
        let mut writes = None;
        for effect in effects {
            match effect {
                Effect::Hold {
                    lease,
                    grants,
                    expires_ms,
                } => hold = Some((lease, grants, expires_ms)),
                Effect::Commit(commit) => writes = Some(commit),
                other => {
                    self.carry_out(Some(session), std::slice::from_ref(&other))
                        .await
                }
            }
        }
        let held = async {
            match &hold {
                Some((lease, grants, expires_ms)) => self.held(lease, grants, *expires_ms).await,
                None => Ok(()),
            }
        };
        let committed = async {
            match writes {
                Some(writes) => self.committed(session, writes).await,
                None => Ok(()),
            }
        };
        // The store's hand-off is begun first (and always first: `biased`), its commit being the
        // slower of the two as a rule.
        let (committed, held) = tokio::join!(biased; committed, held);
        let stored = committed.is_ok();
        (EffectFailure::joined(held, committed), stored)
    }

    /// A pending answer's kernel hold, timed as the request path's kernel stage.
    async fn held(
        &self,
        lease: &LeaseId,
        grants: &[Grant],
        expires_ms: u64,
    ) -> Result<(), EffectFailure> {
        let began = Instant::now();
        let held = self
            .refresh(lease, &elements_of_all(grants), expires_ms)
            .await;
        self.metrics.stage(Stage::Kernel, began.elapsed());
        held.map_err(|e| match e {
            RefreshError::LeaseEnded => EffectFailure::LeaseEnded,
            RefreshError::Kernel(e) => EffectFailure::Kernel(e.to_string()),
        })
    }

    /// A pending answer's store commit, timed as the request path's store stage.
    async fn committed(&self, session: &Session, writes: Vec<Write>) -> Result<(), EffectFailure> {
        let renews = writes.iter().any(|w| matches!(w, Write::Renew { .. }));
        let began = Instant::now();
        let committed = self.commit(Some(session), writes).await;
        self.metrics.stage(Stage::Store, began.elapsed());
        committed.map_err(|e| match e {
            // A renewal of a lease the store holds as ended although the book held it live: a
            // cluster store committed another gateway's revocation (or an operator's, through
            // this one) before its news reached this book. The lease is gone, not the
            // resources: a Renew of it is unknown-lease, as when the book had heard.
            WriteError::Store(crate::store::StoreError::LeaseNotLive { .. }) if renews => {
                EffectFailure::LeaseEnded
            }
            e @ WriteError::QuotaExceeded { .. } => EffectFailure::QuotaExceeded(e.to_string()),
            e => EffectFailure::Store(e.to_string()),
        })
    }

    /// Carries out effects whose failures change no answer: a failure is logged, and the
    /// lease's own expiry (in the kernel and at the next start) settles what is left.
    pub(super) async fn carry_out(&self, session: Option<&Session>, effects: &[Effect]) {
        for effect in effects {
            match effect {
                Effect::Welcomed { notices } => {
                    // In force once the transport has written the Welcome.
                    if let Some(session) = session {
                        session.answered_welcome(*notices);
                    }
                }
                Effect::Hold {
                    lease,
                    grants,
                    expires_ms,
                } => {
                    if let Err(e) = self
                        .refresh(lease, &elements_of_all(grants), *expires_ms)
                        .await
                    {
                        warn!(lease = %lease, "elements not programmed: {e}");
                    }
                }
                Effect::Unhold {
                    lease,
                    grants,
                    kill_connections,
                } => self.remove_elements(lease, grants, *kill_connections).await,
                Effect::Commit(writes) if self.wait_for_insert(writes) => {}
                Effect::Commit(writes) => match self.commit(session, writes.clone()).await {
                    Ok(()) => {}
                    Err(e) if self.ended_elsewhere(&e, writes) => {
                        debug!("lease ended through another gateway first: {e}");
                    }
                    Err(e) => warn!("lease change not stored: {e}"),
                },
                Effect::Audit(record) => self.record(audit_event(record.clone())),
                Effect::Listed { identity } => {
                    if let Some(session) = session {
                        self.record_list(identity, session.remote);
                    }
                }
                Effect::Notify { host, notice } => {
                    for session in self.sessions.of(host) {
                        session.notify(notice).await;
                    }
                }
            }
        }
    }

    /// Holds back `writes` that end a lease whose insert is on its way to the store
    /// ([`Service::being_stored`](super::Service)), for [`Service::stored_or_not`] to commit
    /// after it; says whether it did. A lease's end and its audit record come in one commit.
    fn wait_for_insert(&self, writes: &[Write]) -> bool {
        let mut being_stored = lock(&self.being_stored);
        if being_stored.is_empty() {
            return false;
        }
        let waiting = writes.iter().find_map(|write| match write {
            Write::End { id, .. } if being_stored.contains_key(id) => Some(*id),
            _ => None,
        });
        match waiting.and_then(|id| being_stored.get_mut(&id)) {
            Some(held) => {
                held.extend(writes.iter().cloned());
                true
            }
            None => false,
        }
    }

    /// The insert of new lease `id` is done (`stored`) or failed: what a revocation held back
    /// meanwhile is committed now, the end only if there is a stored lease to end.
    async fn stored_or_not(&self, id: LeaseId, stored: bool) {
        let Some(mut held) = lock(&self.being_stored).remove(&id) else {
            return;
        };
        if !stored {
            held.retain(|write| matches!(write, Write::Audit(_)));
        }
        if !held.is_empty() {
            self.carry_out(None, &[Effect::Commit(held)]).await;
        }
    }

    /// Commits store writes in one transaction, and keeps the service's own records of the
    /// leases (their certificates, the counters, the expiry timer) in step.
    pub(super) async fn commit(
        &self,
        session: Option<&Session>,
        writes: Vec<Write>,
    ) -> Result<(), WriteError> {
        let certificate = session
            .and_then(|s| s.peer.as_ref())
            .map(|p| p.certificate.clone());
        // What the service's own records need once the store has answered is kept aside; the
        // rest of each write moves into its store operation.
        let kept: SmallVec<[Kept; 2]> = writes.iter().filter_map(Kept::of).collect();
        // In a cluster, the record of an end is kept until the store answers: see
        // `unanswered_ends`.
        let end_records: SmallVec<[(LeaseId, AuditRecord); 1]> = if self.cluster_store.is_some() {
            writes
                .iter()
                .filter_map(|write| match write {
                    Write::Audit(
                        record @ AuditRecord {
                            what: Audit::Ended { lease, .. },
                            ..
                        },
                    ) => Some((lease.id, record.clone())),
                    _ => None,
                })
                .collect()
        } else {
            SmallVec::new()
        };
        // In a cluster, a renewal is on its way from now until the watch brings it back: see
        // `renewals_on_their_way`.
        let renewing: SmallVec<[(LeaseId, u64); 1]> = if self.cluster_store.is_some() {
            writes
                .iter()
                .filter_map(|write| match write {
                    Write::Renew { id, expires_ms, .. } => Some((*id, *expires_ms)),
                    _ => None,
                })
                .collect()
        } else {
            SmallVec::new()
        };
        let ops = writes
            .into_iter()
            .map(|write| into_write_op(write, certificate.clone()))
            .collect();
        // In a cluster, an end is on its way from now until the watch brings it back: see
        // `ends_on_their_way`.
        let ending: SmallVec<[LeaseId; 1]> = if self.cluster_store.is_some() {
            kept.iter()
                .filter_map(|k| match k {
                    Kept::Ended { id, .. } => Some(*id),
                    _ => None,
                })
                .collect()
        } else {
            SmallVec::new()
        };
        if !ending.is_empty() {
            {
                let mut on_their_way = lock(&self.ends_on_their_way);
                for id in &ending {
                    on_their_way.insert(*id, OnItsWay::default());
                }
            }
            pause_at(&self.seams.ending).await;
        }
        if !renewing.is_empty() {
            {
                let mut on_their_way = lock(&self.renewals_on_their_way);
                for (id, expires_ms) in &renewing {
                    let renewal = on_their_way.entry(*id).or_default();
                    renewal.expires_ms = renewal.expires_ms.max(*expires_ms);
                }
            }
            pause_at(&self.seams.renewing).await;
        }
        let committed = self.leases.commit(ops).await;
        if committed.is_err() {
            // Not taken, or not known to be: a list shows the lease as the store holds it.
            let ending = ending.iter();
            let renewing = renewing.iter().map(|(id, _)| id);
            let ended = no_longer_on_their_way(&self.ends_on_their_way, ending);
            let renewed = no_longer_on_their_way(&self.renewals_on_their_way, renewing);
            // The book misses what was passed over for them: the cluster's state is read again.
            if (ended || renewed)
                && let Some(cluster) = &self.cluster_store
            {
                cluster.resync();
            }
        }
        if !end_records.is_empty() {
            match &committed {
                Err(WriteError::Unavailable(_)) => {
                    let mut unanswered = lock(&self.unanswered_ends);
                    for (id, record) in end_records {
                        let attempts = unanswered.entry(id).or_default();
                        if attempts.len() == MAX_UNANSWERED_ATTEMPTS {
                            attempts.remove(0);
                        }
                        attempts.push(record);
                    }
                    drop(unanswered);
                    // The list that tells whether etcd took them.
                    if let Some(cluster) = &self.cluster_store {
                        cluster.resync();
                    }
                }
                // This end deleted the lease's key: no earlier attempt can apply any more, and
                // this one's record is the end's.
                Ok(()) => {
                    let mut unanswered = lock(&self.unanswered_ends);
                    for (id, _) in &end_records {
                        unanswered.remove(id);
                    }
                }
                Err(_) => {}
            }
        }
        // A lease out of the book is gone whatever the store says: the records follow the book.
        // Except a Release the store refused: the request core puts that lease back.
        let released = |k: &Kept| {
            matches!(
                k,
                Kept::Ended {
                    end: LeaseEnd::Released,
                    ..
                }
            )
        };
        let back_in_book = committed.is_err() && kept.iter().any(released);
        // An end another member of the cluster committed first is counted there, not here:
        // the counters of all gateways add up to the cluster's ends.
        let counted_elsewhere = self.cluster_store.is_some()
            && matches!(
                committed,
                Err(WriteError::Store(
                    crate::store::StoreError::LeaseNotLive { .. }
                ))
            );
        for write in kept.iter().filter(|_| !back_in_book) {
            if let Kept::Ended { id, end, by } = write {
                lock(&self.lease_credentials).forget(id);
                self.metrics.live_leases.dec();
                if counted_elsewhere {
                    continue;
                }
                let label = match end {
                    LeaseEnd::Released => "released",
                    LeaseEnd::Expired => "expired",
                    LeaseEnd::Revoked(_) => "revoked",
                };
                self.metrics.lease_ends.with_label_values(&[label]).inc();
                if matches!(end, LeaseEnd::Revoked(_)) {
                    info!(lease = %id, by = by.as_deref().unwrap_or("-"), "revoked");
                }
            }
        }
        committed?;
        for write in kept {
            match write {
                Kept::Inserted { host, id } => {
                    self.metrics.live_leases.inc();
                    self.expiry_changed.notify_one();
                    let mut credentials = lock(&self.lease_credentials);
                    match &certificate {
                        Some(certificate) => credentials.set(&host, id, certificate),
                        None => credentials.set_unknown(id),
                    }
                }
                // A Renew may shorten the lease: the timer must look at the new expiry.
                Kept::Renewed { id } => {
                    self.expiry_changed.notify_one();
                    // Only a host renews its own leases: the session's identity is the lease's.
                    if let Some(peer) = session.and_then(|s| s.peer.as_ref()) {
                        lock(&self.lease_credentials).set(&peer.identity, id, &peer.certificate);
                    }
                }
                Kept::Ended { .. } => {}
            }
        }
        Ok(())
    }
}

/// What [`Service::commit`] needs of a write once the store has answered it (an audit record,
/// nothing).
enum Kept {
    Inserted {
        host: Arc<str>,
        id: LeaseId,
    },
    Renewed {
        id: LeaseId,
    },
    Ended {
        id: LeaseId,
        end: LeaseEnd,
        by: Option<String>,
    },
}

impl Kept {
    fn of(write: &Write) -> Option<Kept> {
        match write {
            Write::Insert { lease, .. } => Some(Kept::Inserted {
                host: lease.host.clone(),
                id: lease.id,
            }),
            Write::Renew { id, .. } => Some(Kept::Renewed { id: *id }),
            Write::End { id, end, by, .. } => Some(Kept::Ended {
                id: *id,
                end: *end,
                by: by.clone(),
            }),
            Write::Audit(_) => None,
        }
    }
}

/// A request counted in flight until it is answered, whichever way it leaves.
struct InFlight<'a>(&'a prometheus::IntGauge);

impl<'a> InFlight<'a> {
    fn count(gauge: &'a prometheus::IntGauge) -> Self {
        gauge.inc();
        InFlight(gauge)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// The live lease a request's effects renew in the store (a Renew, or an Open repeated).
fn renewed_lease(effects: &[Effect]) -> Option<LeaseId> {
    effects.iter().find_map(|effect| match effect {
        Effect::Commit(writes) => writes.iter().find_map(|write| match write {
            Write::Renew { id, .. } => Some(*id),
            _ => None,
        }),
        _ => None,
    })
}

/// The lease a request's effects insert into the store, if they make a new one.
fn inserted_lease(effects: &[Effect]) -> Option<LeaseId> {
    effects.iter().find_map(|effect| match effect {
        Effect::Commit(writes) => writes.iter().find_map(|write| match write {
            Write::Insert { lease, .. } => Some(lease.id),
            _ => None,
        }),
        _ => None,
    })
}
