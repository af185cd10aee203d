//! Ending leases from outside the request path, and lifecycle: expiry on the gateway's timer,
//! revocation by the operator, policy and CRL reloads with their notices, and going away.

use super::*;
use crate::api::{ClosedConnection, PolicyReloaded, RevokeAnswer, RevokedLease};
use crate::cluster::ClusterError;

/// How many times a cluster reload publishes its policy when other gateways' reloads publish
/// theirs at the same moment.
pub const PUBLISH_ATTEMPTS: u32 = 5;

/// How long the Revoked notices of a host whose certificate was revoked may take to reach it
/// before its connection is closed: closing drops what is not yet delivered, and a host that
/// does not acknowledge must not keep the connection open.
pub(super) const CREDENTIAL_NOTICE_WAIT: Duration = Duration::from_secs(1);

/// What a CRL reload finds of one identity's live connections.
#[derive(Debug, Default)]
pub(super) struct IdentityConnections {
    /// Those whose certificate the CRL revokes, with its serial.
    revoked: Vec<(Arc<Session>, Serial)>,
    /// Whether one has a certificate the CRL does not list: the host rolled to a new one.
    rolled: bool,
}

impl Service {
    /// Ends leases whose time is up, in the kernel (where the element's own timeout has
    /// usually done it already) and in the store; runs until the service is dropped.
    pub async fn run_expiry(self: Arc<Self>) {
        loop {
            let next = lock(&self.core).next_expiry();
            let wait = match next {
                Some(at) => Duration::from_millis(at.saturating_sub(now_ms())),
                None => Duration::from_secs(3600),
            };
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                _ = self.expiry_changed.notified() => continue,
            }
            let due = lock(&self.core).expire_due(now_ms());
            self.carry_out_expiries(&due).await;
        }
    }

    /// Revokes a lease: kernel, store, audit, and a Revoked notice to its host.
    pub async fn revoke(
        &self,
        id: &LeaseId,
        reason: RevokeReason,
        by: &str,
        text: Option<String>,
    ) -> Option<fwnp_proto::gateway::Lease> {
        let (lease, notice) = self.end_revoked(id, reason, by, text).await?;
        for session in self.sessions.of(&lease.host) {
            session.notify(&notice).await;
        }
        Some(lease)
    }

    /// [`Service::revoke`] without sending the notice: the lease leaves the book, the kernel and
    /// the store, and its Revoked notice is returned, for a caller that must know when the host
    /// has it.
    pub(super) async fn end_revoked(
        &self,
        id: &LeaseId,
        reason: RevokeReason,
        by: &str,
        text: Option<String>,
    ) -> Option<(fwnp_proto::gateway::Lease, Message)> {
        let revocation = lock(&self.core).revoke(now_ms(), id, reason, by, text)?;
        self.carry_out(None, &revocation.effects).await;
        Some((revocation.lease, revocation.notice))
    }

    /// Registers a QUIC endpoint that serves this service, so that [`Service::reload_tls`]
    /// (on SIGHUP and through the admin API) re-reads its TLS files and CRL.
    pub fn add_endpoint(&self, endpoint: quinn::Endpoint) {
        lock(&self.endpoints).push(endpoint);
    }

    /// Re-reads the TLS files (the CRL above all) for new connections on every registered
    /// endpoint, then ends what the certificates the CRL lists still hold: the live leases they
    /// last opened or renewed are revoked with `credential-revoked`, and the connections made
    /// with them before the reload are closed with `NoError` once the notices are delivered.
    /// Returns the connections it closed, for the admin API. A bad file leaves the old configuration in
    /// force and closes nothing.
    pub async fn reload_tls(&self) -> Result<Vec<ClosedConnection>, TlsReloadError> {
        let files = self.config.tls_files();
        let options = self.config.server_options();
        // Read before anything is replaced, so that an unreadable CRL changes nothing. The
        // configuration below reads the file again: should it change in between, the next
        // reload settles the difference.
        let revoked = read_revoked_certificates::<TlsReloadError>(files.crl.as_deref())?;
        for endpoint in lock(&self.endpoints).iter() {
            fwnp_trust::tls::reload_server_config(endpoint, &files, &options)?;
        }
        // Published before the live connections are looked at: a connection registered too late
        // to be seen below finds the new list in `check_credential`.
        let revoked = Arc::new(revoked);
        *lock(&self.revoked_certificates) = revoked.clone();
        Ok(self.end_revoked_credentials(&revoked).await)
    }

    /// Called once a new connection is registered: a handshake that began before a CRL reload
    /// was verified against the old CRL, and the reload may have looked at the live connections
    /// before this one was among them. If the reloaded CRL lists its certificate, it is ended
    /// as the reload would have ended it. Returns whether the connection may go on.
    pub async fn check_credential(&self, session: &Session) -> bool {
        let Some(peer) = &session.peer else {
            return true;
        };
        let revoked = lock(&self.revoked_certificates).clone();
        if !revoked.lists(&peer.certificate) {
            return true;
        }
        self.end_revoked_credentials(&revoked).await;
        false
    }

    /// Ends what revoked certificates still hold (spec 8.12 and 17.4). TLS checks revocation at
    /// the handshake only, so a connection made before the CRL listed its certificate would go
    /// on, and with it the renewals of its host's leases.
    ///
    /// Every live lease last opened or renewed with a certificate `revoked` lists (issuer and
    /// serial) is revoked with `credential-revoked`, whether or not its host is connected, and
    /// under whichever certificate: the holder of a stolen key could otherwise keep what it
    /// opened while the real host is connected under its new certificate. The Revoked notices
    /// go to every connection of the identity; once those under a listed certificate have them
    /// (at most [`CREDENTIAL_NOTICE_WAIT`]), these are closed with `NoError`, each recorded as an
    /// authentication failure. Leases last opened or renewed with another certificate stay.
    pub(super) async fn end_revoked_credentials(
        &self,
        revoked: &fwnp_trust::identity::RevokedCertificates,
    ) -> Vec<ClosedConnection> {
        if revoked.is_empty() {
            return Vec::new();
        }
        let mut by_identity: BTreeMap<String, IdentityConnections> = BTreeMap::new();
        for session in self.sessions.all() {
            // A certificate that names no identity holds no lease and is refused every request.
            let Some(peer) = &session.peer else { continue };
            let entry = by_identity.entry(peer.identity.clone()).or_default();
            if !revoked.lists(&peer.certificate) {
                entry.rolled = true;
            } else if !session
                .credential_revoked
                .swap(true, std::sync::atomic::Ordering::AcqRel)
            {
                // Not already being ended by a reload running at the same time.
                entry
                    .revoked
                    .push((session.clone(), peer.certificate.serial.clone()));
            }
        }
        // A lease whose certificate is not known (stored before leases remembered it) goes with
        // its identity's revoked connection, unless the identity is also connected under a
        // certificate the CRL does not list.
        let unrolled: BTreeSet<String> = by_identity
            .iter()
            .filter(|(_, c)| !c.rolled && !c.revoked.is_empty())
            .map(|(identity, _)| identity.clone())
            .collect();
        let ended = self
            .end_leases_of_revoked_certificates(revoked, &unrolled)
            .await;
        let mut leases_revoked: BTreeMap<&str, usize> = BTreeMap::new();
        let mut deliveries = tokio::task::JoinSet::new();
        for (identity, notice) in &ended {
            *leases_revoked.entry(identity.as_str()).or_default() += 1;
            let closing = by_identity
                .get(identity)
                .map(|c| c.revoked.as_slice())
                .unwrap_or_default();
            for session in self.sessions.of(identity) {
                let notice = notice.clone();
                if closing.iter().any(|(s, _)| s.id == session.id) {
                    // All at once: the wait is for the slowest host, not the sum of them.
                    deliveries.spawn(async move {
                        session
                            .notify_delivered(&notice, CREDENTIAL_NOTICE_WAIT)
                            .await
                    });
                } else {
                    deliveries.spawn(async move { session.notify(&notice).await });
                }
            }
        }
        while deliveries.join_next().await.is_some() {}
        let mut closed = Vec::new();
        for (
            identity,
            IdentityConnections {
                revoked: sessions,
                rolled,
            },
        ) in &by_identity
        {
            let count = leases_revoked.get(identity.as_str()).copied().unwrap_or(0);
            for (session, serial) in sessions {
                session.close(QuicErrorCode::NoError, "certificate revoked");
                let what = if *rolled {
                    format!(
                        "{count} live leases of the identity revoked; those of its connection under another certificate stay"
                    )
                } else {
                    format!("{count} live leases of the identity revoked")
                };
                warn!(session = session.id, identity = %identity, %serial, remote = %session.remote, "connection closed, its certificate was revoked: {what}");
                let mut event = AuditEvent::new(now_ms(), AuditKind::AuthFailure);
                event.outcome = Some(Outcome::Revoked);
                event.identity = Some(identity.clone());
                event.peer = Some(session.remote);
                event.actor = Some("gateway".into());
                event.reason = Some(format!(
                    "certificate serial {serial} revoked: connection closed; {what}"
                ));
                self.record(event);
                closed.push(ClosedConnection {
                    host: identity.clone(),
                    serial: serial.as_str().to_owned(),
                    peer: session.remote.to_string(),
                    leases_revoked: count as u64,
                });
            }
        }
        closed
    }

    /// Revokes every live lease last opened or renewed with a certificate `revoked` lists, and
    /// the leases of `unknown_certificate_identities` whose certificate is not known; returns
    /// each revoked lease's identity and Revoked notice, for the caller to deliver. Without
    /// this, whoever held a stolen key could open leases, disconnect (or stay connected beside
    /// the real host), and keep them open after the revocation until they expire.
    pub(super) async fn end_leases_of_revoked_certificates(
        &self,
        revoked: &fwnp_trust::identity::RevokedCertificates,
        unknown_certificate_identities: &BTreeSet<String>,
    ) -> Vec<(String, Message)> {
        let listed: Vec<(LeaseId, String, String)> = {
            let core = lock(&self.core);
            let book = core.book();
            let mut credentials = lock(&self.lease_credentials);
            // Entries of leases that ended by a path that raced with their renewal.
            credentials.retain_in(book);
            book.iter()
                .filter_map(|lease| match credentials.get(&lease.host, &lease.id) {
                    Some(certificate) if revoked.lists(certificate) => Some((
                        lease.id,
                        lease.host.to_string(),
                        format!(
                            "the certificate (serial {}) that last opened or renewed it was revoked",
                            certificate.serial.as_str()
                        ),
                    )),
                    None if unknown_certificate_identities.contains(&*lease.host) => Some((
                        lease.id,
                        lease.host.to_string(),
                        "the certificate of its host's connection was revoked".to_owned(),
                    )),
                    _ => None,
                })
                .collect()
        };
        let mut ended = Vec::new();
        for (id, identity, text) in listed {
            if let Some((_, notice)) = self
                .end_revoked(&id, RevokeReason::CredentialRevoked, "gateway", Some(text))
                .await
            {
                warn!(lease = %id, identity = %identity, "lease of a revoked certificate revoked");
                ended.push((identity, notice));
            }
        }
        ended
    }

    /// Loads the policy file again; if it is valid, it replaces the old one and every live
    /// lease it no longer allows is revoked. A bad file leaves the old policy in force.
    ///
    /// Reloads run one at a time: one asked for while another runs waits for it, then reads
    /// the file and runs. In a cluster, a version another gateway published between this
    /// one's read and its write makes it read again and publish the next version, up to
    /// [`PUBLISH_ATTEMPTS`] times; then it answers [`AdminErrorKind::Conflict`] and changes
    /// nothing. The version it publishes is put in force here by the reload (the watch, which
    /// brings it back too, leaves it to the reload), unless the watch has already put a newer
    /// one from another gateway in force: then that one stays, and the reload revokes nothing
    /// (the newer one revokes what it no longer allows). Should the reload be dropped between
    /// its publish and that step, the watch puts the version in force, with its revocations.
    ///
    /// [`AdminErrorKind::Conflict`]: crate::api::AdminErrorKind::Conflict
    pub async fn reload_policy(&self) -> Result<PolicyReloaded, AdminError> {
        let _one_at_a_time = self.reload_lock.lock().await;
        let not_reloaded =
            |e: String| format!("policy not reloaded, the old one stays in force: {e}");
        let (policy, text) = Policy::load_with_text(&self.config.policy)
            .map_err(|e| AdminError::bad_request(not_reloaded(e.to_string())))?;
        let reason = format!("policy {} loaded", policy.origin());
        let Some(cluster) = self.cluster() else {
            return Ok(self.put_policy_in_force(policy, "operator", reason).await);
        };
        // In a cluster the reload goes to every gateway: published first, so that a policy
        // the cluster did not take is not in force here alone.
        let file = self.config.policy.display().to_string();
        let mut attempt = 1;
        let published = loop {
            match cluster.publish_policy(&text, &file).await {
                Ok(published) => break published,
                Err(ClusterError::PolicyRace(version)) if attempt < PUBLISH_ATTEMPTS => {
                    info!(
                        version,
                        attempt,
                        "another gateway published a policy meanwhile; publishing the next version"
                    );
                    attempt += 1;
                }
                Err(e @ ClusterError::PolicyRace(_)) => {
                    return Err(AdminError::conflict(not_reloaded(format!(
                        "{e} (other gateways' reloads are in progress, {PUBLISH_ATTEMPTS} attempts)"
                    ))));
                }
                // etcd without its quorum or out of reach: nothing was published, and the
                // same reload may succeed once the cluster answers again.
                Err(e @ ClusterError::Etcd(_)) => {
                    return Err(AdminError::unavailable(not_reloaded(e.to_string())));
                }
                Err(e) => return Err(AdminError::internal(not_reloaded(e.to_string()))),
            }
        };
        pause_at(&self.seams.published).await;
        // Recorded and put in force as one step with the versions the watch brings: apart,
        // another gateway's older version that the watch had already checked could be put
        // in force after this one.
        let origin = policy.origin().to_owned();
        let version = published.version;
        let mut enforced = None;
        cluster.put_published_in_force(published, || enforced = Some(self.enforce(policy)));
        let Some(policy) = enforced else {
            let in_force = self.policy();
            info!(
                version,
                in_force = in_force.origin(),
                "a newer version of the cluster's policy is in force already; the reloaded one is not put in force here"
            );
            let mut event = AuditEvent::new(now_ms(), AuditKind::PolicyReload);
            event.actor = Some("operator".into());
            event.reason = Some(format!(
                "policy {origin} published as cluster policy version {version}, not put in force: {} was in force already; 0 leases revoked",
                in_force.origin()
            ));
            self.record(event);
            return Ok(PolicyReloaded {
                policy: origin,
                revoked: Vec::new(),
                superseded: Some(crate::api::Superseded {
                    version,
                    in_force: in_force.origin().to_owned(),
                }),
            });
        };
        // A newer version put in force meanwhile judges the leases left: none is revoked
        // under this one after that.
        let current = || cluster.policy_version() == version;
        let reason = format!("{reason}, published as cluster policy version {version}");
        Ok(self
            .revoke_after_reload(policy, "operator", reason, &current)
            .await)
    }

    /// Puts `policy` in force: the rate limits, then the revocation of every live lease it no
    /// longer allows, and an audit record naming `actor` and `why`.
    pub async fn put_policy_in_force(
        &self,
        policy: Policy,
        actor: &str,
        why: String,
    ) -> PolicyReloaded {
        let policy = self.enforce(policy);
        self.revoke_after_reload(policy, actor, why, &|| true).await
    }

    /// What follows a reload's policy into force: the revocation of every live lease it no
    /// longer allows, for as long as `current` says it is the policy in force, and an audit
    /// record naming `actor` and `why`.
    async fn revoke_after_reload(
        &self,
        policy: Arc<Policy>,
        actor: &str,
        why: String,
        current: &(dyn Fn() -> bool + Sync),
    ) -> PolicyReloaded {
        let revoked = self
            .revoke_disallowed_while(&policy, "policy-reload", current)
            .await;
        let mut event = AuditEvent::new(now_ms(), AuditKind::PolicyReload);
        event.actor = Some(actor.into());
        event.reason = Some(format!("{why}; {} leases revoked", revoked.len()));
        self.record(event);
        info!(revoked = revoked.len(), "policy reloaded");
        PolicyReloaded {
            policy: policy.origin().to_owned(),
            revoked,
            superseded: None,
        }
    }

    /// Makes a version of the cluster's policy that the watch brought the one decisions are
    /// made by; [`Service::revoke_for_cluster_policy`] follows.
    pub(crate) fn enforce_cluster_policy(&self, policy: Policy) -> Arc<Policy> {
        self.enforce(policy)
    }

    /// What follows a version of the cluster's policy that the watch put in force: every live
    /// lease of the book it no longer allows is revoked, for as long as `current` says it is
    /// the version in force, and an audit record says so. Every member does this, not only the
    /// one whose reload published the version, which may die or have its reload dropped before
    /// it revokes: each lease's end is a compare-and-swap in etcd that the first member to
    /// reach it commits, with its audit record, and that is refused to the others, whose own
    /// book, kernel and hosts' notices have it already. A member whose watch has not yet
    /// brought the version opens and renews by the older one until it does, then revokes what
    /// it granted meanwhile.
    pub(crate) async fn revoke_for_cluster_policy(
        &self,
        policy: &Policy,
        why: String,
        current: &(dyn Fn() -> bool + Sync),
    ) {
        let revoked = self
            .revoke_disallowed_while(policy, "policy-reload", current)
            .await;
        let mut event = AuditEvent::new(now_ms(), AuditKind::PolicyReload);
        event.actor = Some("cluster".into());
        event.reason = Some(format!(
            "{why}; {} leases it no longer allows revoked here",
            revoked.len()
        ));
        self.record(event);
        info!(
            policy = policy.origin(),
            revoked = revoked.len(),
            "cluster policy adopted"
        );
    }

    /// Makes `policy` the one decisions are made by, with its rate limits.
    fn enforce(&self, policy: Policy) -> Arc<Policy> {
        let policy = Arc::new(policy);
        *self.limiter.write().unwrap_or_else(|e| e.into_inner()) = limiter_for(&policy);
        *self.policy.write().unwrap_or_else(|e| e.into_inner()) = policy.clone();
        policy
    }

    /// Revokes every live lease `policy` no longer allows, naming `by` as the revoker; returns
    /// what it revoked, for the admin API.
    pub(super) async fn revoke_disallowed(&self, policy: &Policy, by: &str) -> Vec<RevokedLease> {
        self.revoke_disallowed_while(policy, by, &|| true).await
    }

    /// [`Service::revoke_disallowed`], stopping as soon as `current` says `policy` is no longer
    /// the one in force: the newer one judges the leases left, and a lease it allows must not
    /// be revoked by the older one.
    async fn revoke_disallowed_while(
        &self,
        policy: &Policy,
        by: &str,
        current: &(dyn Fn() -> bool + Sync),
    ) -> Vec<RevokedLease> {
        // The leases are judged a few thousand at a time, read again by their ids: a copy of
        // every lease of the book at once cost a gateway that starts with a million of them
        // about 130 MB beside the book, and the allocator keeps what a start used at its peak.
        const CHUNK: usize = 4096;
        let ids: Vec<LeaseId> = lock(&self.core).book().iter().map(|l| l.id).collect();
        let mut revoked = Vec::new();
        let leases = ids.chunks(CHUNK).flat_map(|chunk| {
            let core = lock(&self.core);
            // One ended meanwhile has nothing left to judge.
            chunk
                .iter()
                .filter_map(|id| core.book().get(id).cloned())
                .collect::<Vec<_>>()
        });
        for lease in leases {
            pause_at(&self.seams.revoking).await;
            if !current() {
                info!(
                    policy = policy.origin(),
                    revoked = revoked.len(),
                    "a newer policy came in force; it judges the leases left"
                );
                break;
            }
            // Judge the lease by the addresses its host holds (as Open and Renew do), known
            // from its live connections; a third-party grant's address is not one of them. With
            // the host offline, its grants' addresses stand in, and its next Renew judges it
            // by the real ones.
            let addresses: Vec<IpAddr> = self
                .sessions
                .of(&lease.host)
                .iter()
                .find_map(|s| s.peer.as_ref().map(|p| allowed_addresses(p, s.remote.ip())))
                .unwrap_or_else(|| lease.grants.iter().map(|g| g.host).collect());
            if let Err(e) = policy.still_allows(&lease.host, &addresses, &lease.grants)
                && self
                    .revoke(
                        &lease.id,
                        RevokeReason::PolicyChanged,
                        by,
                        Some(e.to_string()),
                    )
                    .await
                    .is_some()
            {
                revoked.push(RevokedLease {
                    lease: lease.id.to_string(),
                    host: lease.host.to_string(),
                    why: e.to_string(),
                });
            }
        }
        revoked
    }

    /// The admin API's revoke.
    ///
    /// In a cluster the end is committed to the cluster's store first and carried out here
    /// (book, kernel, the host's Revoked notice) only once etcd has taken it: a lease taken out
    /// of the book and kernel while the store refused its end would come back at the next
    /// listing, and the operator would have been told it was revoked. Without the quorum the
    /// answer says so and nothing changes.
    pub async fn revoke_by_operator(
        &self,
        id: LeaseId,
        reason: Option<String>,
    ) -> Result<RevokeAnswer, AdminError> {
        let text = reason.unwrap_or_else(|| "revoked by the operator".to_owned());
        if let Some(cluster) = self.cluster() {
            let answer = cluster.revoke_in_store(self, id, text.clone()).await?;
            let ending = crate::store::LeaseEnding {
                end: LeaseEnd::Revoked(RevokeReason::Operator),
                ended_ms: now_ms(),
                by: Some("operator".into()),
                why: Some(text),
            };
            self.carry_out_committed_end(&id, &ending, cluster.site())
                .await;
            return Ok(answer);
        }
        match self
            .revoke(&id, RevokeReason::Operator, "operator", Some(text))
            .await
        {
            Some(lease) => Ok(RevokeAnswer {
                revoked: lease.id.to_string(),
                host: lease.host.to_string(),
            }),
            None => Err(AdminError::not_found(format!("no live lease {id}"))),
        }
    }

    /// Tells every connected host the gateway is going away.
    pub async fn going_away(&self, reconnect_after: u32) {
        let notice = Message::GoingAway(fwnp_proto::GoingAway {
            common: Common::default(),
            reconnect_after: Some(reconnect_after),
            reason: Some("the gateway is stopping".into()),
        });
        // The connections are closed right after this: wait (briefly, all hosts at once) until
        // each host has the notice, since closing drops what is not yet delivered.
        let mut deliveries = tokio::task::JoinSet::new();
        for session in self.sessions.all() {
            let notice = notice.clone();
            deliveries.spawn(async move {
                session
                    .notify_delivered(&notice, Duration::from_secs(1))
                    .await
            });
        }
        while deliveries.join_next().await.is_some() {}
    }
}

impl Service {
    /// Commits an operator's end of a lease that is not in this gateway's book (another
    /// member's) to the lease store, with its audit record; the store refuses it unless the
    /// lease is live.
    pub(crate) async fn end_in_store(
        &self,
        lease: &LeaseRecord,
        text: String,
    ) -> Result<(), WriteError> {
        let now = now_ms();
        let mut event = AuditEvent::new(now, AuditKind::Revocation);
        event.outcome = Some(Outcome::Revoked);
        event.identity = Some(lease.identity.clone());
        event.lease = Some(lease.id);
        event.app = lease.app.clone();
        event.grants = lease.grants.clone();
        event.actor = Some("operator".into());
        event.reason = Some(text.clone());
        self.leases
            .commit(vec![
                WriteOp::EndLease {
                    id: lease.id,
                    end: LeaseEnd::Revoked(RevokeReason::Operator),
                    ended_ms: now,
                    by: Some("operator".into()),
                    why: Some(text),
                },
                WriteOp::audit(event),
            ])
            .await
    }
}
