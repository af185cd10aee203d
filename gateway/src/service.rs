//! The gateway's driver: it carries out what the request core (`fwnp_proto::gateway::request`)
//! decides, with the operator's [`Policy`] (through `Decide`), the kernel filter
//! (`fwnp_netfilter`) and the [`Store`].
//!
//! The order of an Open is fixed by the core, because it decides what a host can rely on:
//! decode and validate, resolve the address, ask policy, take the lease in the book; then this
//! driver programs the kernel and waits for its acknowledgement, commits the lease to the store
//! and waits for that, and only then does the core give the Granted. A failure after the book
//! took the lease gives the lease back and answers no-resources, so a host never holds a lease
//! the kernel or the store lacks. A renewal (or an Open that extends a live lease) that makes a
//! lease longer writes the store before the kernel instead, so that a gateway killed between the
//! two never leaves a kernel element that outlives its stored lease; the start's reconcile
//! brings any such element down to the stored expiry all the same.
//!
//! What needs a clock or the connection stays here: the rate limiter, the certificate checks,
//! the counting of Lists and failed handshakes.
//!
//! Kernel elements are shared: two leases (of hosts behind one address, or of a host with
//! third-party rights) may hold the same element, which then stays while one of them does,
//! with the latest of their expiries as its timeout.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use fwnp_netfilter::{Batcher, Change, Opening as Element};
use fwnp_proto::codec;
use fwnp_proto::gateway::request::{
    Asked, Audit, AuditRecord, ConnectionState, CoreConfig, Decide, Decision, Effect,
    EffectFailure, HostLimits, Objection, Peer, RequestCore, Step, Write,
};
use fwnp_proto::gateway::{LifetimePolicy, PolicyFacts};
use fwnp_proto::{
    Common, Epoch, Grant, LeaseId, Message, Open, QuicErrorCode, ResultCode, RevokeReason,
};
use governor::{DefaultKeyedRateLimiter, Quota};
use rand::SeedableRng;
use rand::rngs::StdRng;
use serde_json::{Value, json};
use tracing::{info, warn};

use crate::admin::AdminError;
use crate::config::GatewayConfig;
use crate::identity::{Serial, allowed_addresses};
use crate::metrics::Metrics;
use crate::policy::{Policy, Verdict};
use crate::server::{Session, Sessions};
use crate::store::{
    AuditEvent, AuditKind, AuditQuery, LeaseEnd, LeaseFilter, LeaseRecord, LeaseStore, NewLease,
    Order, Outcome, ReportQuery, RequestSummary, Store, WriteError, WriteOp, now_ms,
};
use crate::tally::{Counted, Tally, Verdict as TallyVerdict};

/// How long the Revoked notices of a host whose certificate was revoked may take to reach it
/// before its connection is closed: closing drops what is not yet delivered, and a host that
/// does not acknowledge must not keep the connection open.
const CREDENTIAL_NOTICE_WAIT: Duration = Duration::from_secs(1);

/// The gateway's state and its answers to every request.
#[derive(Debug)]
pub struct Service {
    /// The configuration it was started with.
    pub config: GatewayConfig,
    /// Live connections.
    pub sessions: Sessions,
    /// Prometheus metrics.
    pub metrics: Metrics,
    policy: RwLock<Arc<Policy>>,
    limiter: RwLock<Arc<DefaultKeyedRateLimiter<String>>>,
    /// Handshakes started per source address ([`Service::admit_handshake`]).
    handshake_limiter: DefaultKeyedRateLimiter<IpAddr>,
    /// Failed handshakes (and certificates naming no identity) per source address and reason.
    auth_failures: Tally<(IpAddr, String), SocketAddr>,
    /// Handshakes refused over the per-source limit, per source address.
    refused_handshakes: Tally<IpAddr, SocketAddr>,
    /// Lists per host identity.
    lists: Tally<String, SocketAddr>,
    /// The request path's decisions and the live leases.
    core: Mutex<RequestCore>,
    expiry_changed: tokio::sync::Notify,
    /// The database, for the admin API's queries and the daemon's housekeeping.
    store: Store,
    /// Where the request path writes leases and their audit records.
    leases: Arc<dyn LeaseStore>,
    filter: Option<Batcher>,
    epoch: Epoch,
    rng: Mutex<StdRng>,
    rate_limit_audited: moka::sync::Cache<String, ()>,
    started: Instant,
    endpoints: Mutex<Vec<quinn::Endpoint>>,
    /// The certificates the CRL lists (as read at start or at the last reload), for
    /// connections whose handshake finished under the CRL before it (see
    /// [`Service::check_credential`]).
    revoked_certificates: Mutex<Arc<crate::identity::RevokedCertificates>>,
    /// The certificate that last opened or renewed each live lease, so that a CRL reload can
    /// revoke the leases of a revoked certificate whose host is not connected. The store keeps
    /// it too (restored at start); leases stored by a gateway of schema 1 have no entry until
    /// they are renewed.
    lease_credentials: Mutex<HashMap<LeaseId, Arc<crate::identity::CertificateName>>>,
    /// The live leases that hold each kernel element, with their expiries (Unix ms). Two
    /// leases may hold the same element (hosts behind one address, a host with third-party
    /// rights): it stays while one of them does, with the latest of their expiries.
    holders: Mutex<Holders>,
}

/// Kernel elements and the leases that hold them, with each lease's expiry. Nearly every
/// element has one holder: a short list costs far less memory than a map, per element.
type Holders = HashMap<Element, Vec<(LeaseId, u64)>>;

/// Sets (`Some` expiry) or drops (`None`) a lease's hold on an element, and says what the
/// kernel must do for it: set its timeout to the latest expiry of its holders when that
/// changed, remove it when nobody holds it any more.
fn hold_change(
    holders: &mut Holders,
    element: &Element,
    lease: LeaseId,
    expires_ms: Option<u64>,
    now: u64,
) -> Option<Change> {
    let held = holders.entry(element.clone()).or_default();
    let before = held.iter().map(|(_, expires)| *expires).max();
    held.retain(|(holder, _)| *holder != lease);
    if let Some(expires) = expires_ms {
        held.push((lease, expires));
    }
    let after = held.iter().map(|(_, expires)| *expires).max();
    if held.is_empty() {
        holders.remove(element);
    }
    match (before, after) {
        (Some(_), None) => Some(Change::Remove(element.clone())),
        // The kernel never takes a zero timeout (it would mean "forever").
        (_, Some(latest)) if before != after => Some(Change::Renew(
            element.clone(),
            remaining(latest, now).max(Duration::from_millis(1)),
        )),
        _ => None,
    }
}

/// Why the elements of a renewed or extended lease were not refreshed.
#[derive(Debug, thiserror::Error)]
enum RefreshError {
    /// The kernel refused.
    #[error(transparent)]
    Kernel(#[from] fwnp_netfilter::Error),
    /// The lease was revoked while its elements were being refreshed.
    #[error("the lease ended while it was being renewed")]
    LeaseEnded,
}

/// Why [`Service::reload_tls`] changed nothing.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsReloadError {
    /// A TLS file (certificate, key, CA or CRL) is unusable.
    #[error("TLS files not reloaded, the old ones stay in force: {0}")]
    Files(#[from] crate::tls::TlsError),
    /// The CRL's list of revoked certificates cannot be read.
    #[error("TLS files not reloaded, the old ones stay in force: {0}")]
    Crl(#[from] crate::identity::IdentityError),
}

/// Why the service could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// The policy file is unusable.
    #[error("policy: {0}")]
    Policy(#[from] crate::policy::PolicyError),
    /// The store could not be opened or read.
    #[error("store: {0}")]
    Store(#[from] crate::store::StoreError),
    /// The lease store could not restore the leases of the previous run.
    #[error("lease store: {0}")]
    LeaseStore(#[from] WriteError),
    /// The etcd cluster of `[store] backend = "etcd"` could not be reached or read.
    #[error("lease store: {0}")]
    Etcd(#[from] crate::store::EtcdError),
    /// The kernel filter could not be set up.
    #[error("filter: {0}")]
    Filter(#[from] fwnp_netfilter::Error),
    /// The CRL file is unusable.
    #[error("CRL: {0}")]
    CrlFile(#[from] crate::tls::TlsError),
    /// The CRL's list of revoked certificates cannot be read.
    #[error("CRL: {0}")]
    Crl(#[from] crate::identity::IdentityError),
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Every critical section leaves its data consistent before anything can panic.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

pub use fwnp_proto::gateway::request::{denied, fit_reason};

/// The kernel elements of a grant: one per remote prefix, or one for any remote.
pub fn elements_of(grant: &Grant) -> Vec<Element> {
    let element = |remote| Element {
        host: grant.host,
        protocol: grant.protocol,
        ports: grant.ports,
        remote,
    };
    if grant.remotes.is_empty() {
        vec![element(None)]
    } else {
        grant.remotes.iter().map(|p| element(Some(*p))).collect()
    }
}

fn elements_of_all(grants: &[Grant]) -> Vec<Element> {
    grants.iter().flat_map(elements_of).collect()
}

fn remaining(expires_ms: u64, now_ms: u64) -> Duration {
    Duration::from_millis(expires_ms.saturating_sub(now_ms))
}

/// The certificates the CRL file lists; none without a CRL.
fn read_revoked_certificates<E>(
    crl: Option<&std::path::Path>,
) -> Result<crate::identity::RevokedCertificates, E>
where
    E: From<crate::tls::TlsError> + From<crate::identity::IdentityError>,
{
    match crl {
        Some(path) => Ok(crate::identity::revoked_certificates(
            &crate::tls::load_crls(path)?,
        )?),
        None => Ok(crate::identity::RevokedCertificates::default()),
    }
}

fn limiter_for(policy: &Policy) -> Arc<DefaultKeyedRateLimiter<String>> {
    let limit = policy.effective_rate_limit();
    let quota = Quota::with_period(limit.replenish_interval())
        .unwrap_or_else(|| Quota::per_second(limit.requests_per_second))
        .allow_burst(limit.burst);
    Arc::new(DefaultKeyedRateLimiter::keyed(quota))
}

fn handshake_limiter(config: &GatewayConfig) -> DefaultKeyedRateLimiter<IpAddr> {
    let at_least_one = |n: u32| std::num::NonZeroU32::new(n).unwrap_or(std::num::NonZeroU32::MIN);
    let quota = Quota::per_second(at_least_one(config.limits.handshakes_per_source_per_second))
        .allow_burst(at_least_one(config.limits.handshake_burst_per_source));
    DefaultKeyedRateLimiter::keyed(quota)
}

/// What becomes of a new QUIC connection attempt, before any TLS work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Go on with the handshake.
    Accept,
    /// Ask the source to prove its address first (QUIC Retry).
    Retry,
    /// Refuse it: its source started too many handshakes.
    Refuse,
}

impl Service {
    /// Opens the store, loads the policy, sets up the filter (when one is given) and restores
    /// the leases of the previous run into the book and the kernel.
    pub async fn start(
        config: GatewayConfig,
        filter: Option<Batcher>,
    ) -> Result<Arc<Service>, StartError> {
        let mut options = crate::store::StoreOptions::default();
        if config.store.synchronous_full {
            options.synchronous = crate::store::Synchronous::Full;
        }
        let store = Store::open_with(&config.state_dir, options)?;
        let leases: Arc<dyn LeaseStore> = match &config.store.backend {
            crate::config::StoreBackend::Etcd(etcd) => {
                Arc::new(crate::store::EtcdStore::connect(etcd, store.writer().clone()).await?)
            }
            _ => Arc::new(store.clone()),
        };
        Self::start_with_store(config, filter, store, leases).await
    }

    /// As [`Service::start`], with the leases written to and restored from `leases` instead of
    /// the database `store` (which still answers the admin API's queries): the seam where
    /// another backend plugs in.
    pub async fn start_with_store(
        config: GatewayConfig,
        filter: Option<Batcher>,
        store: Store,
        leases: Arc<dyn LeaseStore>,
    ) -> Result<Arc<Service>, StartError> {
        let policy = Policy::load(&config.policy)?;
        for warning in policy.warnings() {
            warn!(
                "policy {}:{}: {}",
                policy.origin(),
                warning.line,
                warning.message
            );
        }
        let epoch = leases.epoch();
        let limiter = limiter_for(&policy);
        let window = config.limits.audit_count_interval;
        let service = Arc::new(Service {
            sessions: Sessions::default(),
            metrics: Metrics::new(),
            policy: RwLock::new(Arc::new(policy)),
            limiter: RwLock::new(limiter),
            handshake_limiter: handshake_limiter(&config),
            auth_failures: Tally::new(window),
            refused_handshakes: Tally::new(window),
            lists: Tally::new(window),
            core: Mutex::new(RequestCore::new(CoreConfig {
                epoch,
                max_streams: config.limits.max_streams,
                kill_connections: config.filter.kill_connections,
            })),
            expiry_changed: tokio::sync::Notify::new(),
            store,
            leases,
            filter,
            epoch,
            rng: Mutex::new(StdRng::from_os_rng()),
            rate_limit_audited: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(Duration::from_secs(1))
                .build(),
            started: Instant::now(),
            endpoints: Mutex::new(Vec::new()),
            revoked_certificates: Mutex::new(Arc::default()),
            lease_credentials: Mutex::new(HashMap::new()),
            holders: Mutex::new(HashMap::new()),
            config,
        });
        service.restore().await?;
        // The policy may have changed while the gateway was stopped: no restored lease it no
        // longer allows may stay open.
        let policy = service.policy();
        let revoked = service.revoke_disallowed(&policy, "gateway-start").await;
        if !revoked.is_empty() {
            info!(
                revoked = revoked.len(),
                "restored leases the policy no longer allows were revoked"
            );
        }
        // So may the CRL: no restored lease last opened or renewed with a certificate it lists
        // may stay open.
        let revoked = Arc::new(read_revoked_certificates::<StartError>(
            service.config.crl.as_deref(),
        )?);
        *lock(&service.revoked_certificates) = revoked.clone();
        if !revoked.is_empty() {
            // No host is connected yet to be told.
            service
                .end_leases_of_revoked_certificates(&revoked, &BTreeSet::new())
                .await;
        }
        tokio::spawn(Self::run_tallies(Arc::downgrade(&service)));
        Ok(service)
    }

    /// The gateway's epoch.
    pub fn epoch(&self) -> Epoch {
        self.epoch
    }

    /// The store, for the daemon's housekeeping.
    pub fn store(&self) -> &Store {
        &self.store
    }

    fn policy(&self) -> Arc<Policy> {
        self.policy
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    async fn restore(&self) -> Result<(), StartError> {
        let now = now_ms();
        let restored = self.leases.restore(now).await?;
        let leases = restored.live.iter().map(|r| fwnp_proto::gateway::Lease {
            id: r.id,
            host: Arc::from(r.identity.as_str()),
            grants: r.grants.clone(),
            lifetime: r.granted_lifetime,
            created_ms: r.created_ms,
            expires_ms: r.expires_ms,
            app: r.app.clone().map(Box::new),
        });
        let report = lock(&self.core).book_mut().restore(now, leases);
        {
            // Leases of one certificate share one copy of its name, as they do while it is
            // connected.
            let mut shared: HashMap<
                &crate::identity::CertificateName,
                Arc<crate::identity::CertificateName>,
            > = HashMap::new();
            let mut credentials = lock(&self.lease_credentials);
            for record in &restored.live {
                if let Some(certificate) = &record.certificate {
                    let name = shared
                        .entry(certificate)
                        .or_insert_with(|| Arc::new(certificate.clone()));
                    credentials.insert(record.id, name.clone());
                }
            }
        }
        let desired: Vec<(Element, Duration)> = {
            let core = lock(&self.core);
            let book = core.book();
            let mut holders = lock(&self.holders);
            for lease in book.iter() {
                for element in elements_of_all(&lease.grants) {
                    holders
                        .entry(element)
                        .or_default()
                        .push((lease.id, lease.expires_ms));
                }
            }
            holders
                .iter()
                .map(|(element, held)| {
                    let latest = held
                        .iter()
                        .map(|(_, expires)| *expires)
                        .max()
                        .unwrap_or(now);
                    (element.clone(), remaining(latest, now))
                })
                .collect()
        };
        self.metrics
            .live_leases
            .set(lock(&self.core).book().len() as i64);
        info!(
            restored = report.restored,
            expired = restored.expired.len(),
            epoch = format_args!("{:016x}", self.epoch()),
            new_state = self.store.is_new_state(),
            "leases restored"
        );
        if let Some(filter) = &self.filter {
            let changes = filter.reconcile(desired).await?;
            let mut event = AuditEvent::new(now, AuditKind::Reconcile);
            event.actor = Some("gateway".into());
            event.reason = Some(format!(
                "start: {} leases restored, {} expired while stopped; kernel: {} added, {} removed, {} refreshed{}",
                report.restored,
                restored.expired.len(),
                changes.added.len(),
                changes.removed.len(),
                changes.refreshed,
                if changes.table_recreated {
                    ", table created"
                } else {
                    ""
                },
            ));
            self.record(event);
        }
        Ok(())
    }

    /// Records an audit event without holding up an answer; a full queue loses the event
    /// with a warning rather than stalling the service.
    fn record(&self, event: AuditEvent) {
        if let Err(e) = self.leases.record(vec![WriteOp::audit(event)]) {
            warn!("audit event not recorded: {e}");
        }
    }

    /// Records a failed authentication (a refused handshake or a certificate with no identity).
    /// Anyone on the network can fail a handshake, as often as they like: the first failure
    /// from an address for a reason in an interval is logged and recorded, the others of the
    /// interval are counted into one record at its end ([`Tally`]).
    pub fn auth_failure(&self, peer: SocketAddr, reason: &str) {
        self.metrics.request("auth-failure");
        let earlier = match self
            .auth_failures
            .event(&(peer.ip(), reason.to_owned()), peer)
        {
            TallyVerdict::Counted => return,
            TallyVerdict::Record(earlier) => earlier,
        };
        if let Some(earlier) = earlier {
            self.record_auth_failures(&earlier);
        }
        warn!(%peer, "authentication failed: {reason}");
        let mut event = AuditEvent::new(now_ms(), AuditKind::AuthFailure);
        event.outcome = Some(Outcome::Error);
        event.peer = Some(peer);
        event.reason = Some(reason.to_owned());
        self.record(event);
    }

    fn record_auth_failures(&self, counted: &Counted<(IpAddr, String), SocketAddr>) {
        let (address, reason) = &counted.key;
        let window = humantime::format_duration(self.auth_failures.window());
        let text = format!(
            "{} more failed authentications from {address} within {window} of the one recorded: {reason}",
            counted.more
        );
        warn!(peer = %address, count = counted.more, "{text}");
        let mut event = AuditEvent::new(now_ms(), AuditKind::AuthFailure);
        event.outcome = Some(Outcome::Error);
        event.peer = Some(counted.first);
        event.reason = Some(text);
        self.record(event);
    }

    fn record_refused_handshakes(&self, peer: SocketAddr, more: Option<u64>) {
        let limits = &self.config.limits;
        let text = match more {
            None => format!(
                "handshake refused: more than {} per second (burst {}) from this address",
                limits.handshakes_per_source_per_second, limits.handshake_burst_per_source
            ),
            Some(more) => format!(
                "{more} more handshakes refused from {} within {} of the one recorded",
                peer.ip(),
                humantime::format_duration(self.refused_handshakes.window())
            ),
        };
        warn!(%peer, "{text}");
        let mut event = AuditEvent::new(now_ms(), AuditKind::AuthFailure);
        event.outcome = Some(Outcome::Denied);
        event.peer = Some(peer);
        event.reason = Some(text);
        self.record(event);
    }

    fn record_lists(&self, counted: &Counted<String, SocketAddr>) {
        let mut event = AuditEvent::new(now_ms(), AuditKind::Request);
        event.identity = Some(counted.key.clone());
        event.peer = Some(counted.first);
        event.reason = Some(format!(
            "list: {} more within {} of the one recorded",
            counted.more,
            humantime::format_duration(self.lists.window())
        ));
        self.record(event);
    }

    /// Decides, before any TLS work, what becomes of a connection attempt from `remote`: while
    /// more than `retry_above_handshakes` handshakes are in progress, a source that has not
    /// proved its address gets a Retry (spoofed sources never come back); then each source may
    /// start a bounded number of handshakes per second, and is refused beyond.
    pub fn admit_handshake(
        &self,
        remote: SocketAddr,
        validated: bool,
        in_progress: usize,
    ) -> Admission {
        if !validated && in_progress >= self.config.limits.retry_above_handshakes as usize {
            self.metrics.request("handshake-retry");
            return Admission::Retry;
        }
        if self.handshake_limiter.check_key(&remote.ip()).is_ok() {
            return Admission::Accept;
        }
        self.metrics.request("handshake-refused");
        match self.refused_handshakes.event(&remote.ip(), remote) {
            TallyVerdict::Counted => {}
            TallyVerdict::Record(earlier) => {
                if let Some(earlier) = earlier {
                    self.record_refused_handshakes(earlier.first, Some(earlier.more));
                }
                self.record_refused_handshakes(remote, None);
            }
        }
        Admission::Refuse
    }

    /// Writes the counts of the intervals that ended and forgets idle sources, every interval,
    /// as long as the service lives.
    async fn run_tallies(service: std::sync::Weak<Service>) {
        let Some(interval) = service
            .upgrade()
            .map(|s| s.config.limits.audit_count_interval)
        else {
            return;
        };
        loop {
            tokio::time::sleep(interval).await;
            let Some(service) = service.upgrade() else {
                return;
            };
            service.flush_tallies();
        }
    }

    fn flush_tallies(&self) {
        let (failures, failures_beyond) = self.auth_failures.ended();
        for counted in &failures {
            self.record_auth_failures(counted);
        }
        let (refused, refused_beyond) = self.refused_handshakes.ended();
        for counted in &refused {
            self.record_refused_handshakes(counted.first, Some(counted.more));
        }
        let (lists, _) = self.lists.ended();
        for counted in &lists {
            self.record_lists(counted);
        }
        let beyond = failures_beyond + refused_beyond;
        if beyond > 0 {
            // Too many sources at once to count each: one line and one record for all of them.
            let text = format!(
                "{beyond} failed or refused handshakes from sources beyond the {} counted one by one",
                crate::tally::MAX_KEYS
            );
            warn!("{text}");
            let mut event = AuditEvent::new(now_ms(), AuditKind::AuthFailure);
            event.outcome = Some(Outcome::Error);
            event.reason = Some(text);
            self.record(event);
        }
        self.handshake_limiter.retain_recent();
    }

    /// Answers one request: the bytes of one stream. The connection's own checks (a revoked
    /// certificate, the rate limit) come first; then the request core decides, and this carries
    /// out its effects, answering only after those a grant depends on have succeeded.
    pub async fn handle(&self, session: &Session, bytes: &[u8]) -> Message {
        let started = Instant::now();
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
        let rate_key = Sessions::key_of(session);
        if let Some(retry_after) = self.rate_limited(&rate_key) {
            return self.refuse_rate_limited(session, &rate_key, bytes, retry_after);
        }
        let addresses = session
            .peer
            .as_ref()
            .map(|p| allowed_addresses(p, session.remote.ip()))
            .unwrap_or_default();
        let peer = Peer {
            identity: session.peer.as_ref().map(|p| p.identity.as_str()),
            no_identity: session.identity_error.as_deref().unwrap_or("no identity"),
            remote: session.remote,
            addresses: &addresses,
        };
        let connection = ConnectionState {
            welcomed: session.welcomed.load(std::sync::atomic::Ordering::Acquire),
        };
        let policy = self.policy();
        let step = {
            let mut core = lock(&self.core);
            let mut rng = lock(&self.rng);
            core.handle(now_ms(), connection, &peer, bytes, &*policy, &mut *rng)
        };
        let answer = match step {
            Step::Answer(answer) => answer,
            Step::Pending(pending) => {
                let outcome = self.carry_out_in_order(session, pending.effects()).await;
                if let Err(e) = &outcome {
                    warn!(identity = session.identity(), lease = %pending.lease(), "request not carried out: {e}");
                }
                lock(&self.core).finish(now_ms(), pending, outcome)
            }
        };
        self.carry_out(Some(session), &answer.effects).await;
        if answer.label == Some("granted")
            && let Message::Granted(granted) = &answer.message
            && session
                .credential_revoked
                .load(std::sync::atomic::Ordering::Acquire)
        {
            // A CRL reload revoked this connection's certificate while the lease was being
            // made, after it had revoked the identity's leases: this one must not outlive it.
            let text =
                "the certificate of this connection was revoked while the lease was being granted";
            self.end_revoked(
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
    async fn carry_out_in_order(
        &self,
        session: &Session,
        effects: &[Effect],
    ) -> Result<(), EffectFailure> {
        for effect in effects {
            match effect {
                Effect::Hold {
                    lease,
                    grants,
                    expires_ms,
                } => self
                    .refresh(lease, &elements_of_all(grants), *expires_ms)
                    .await
                    .map_err(|e| match e {
                        RefreshError::LeaseEnded => EffectFailure::LeaseEnded,
                        RefreshError::Kernel(e) => EffectFailure::Kernel(e.to_string()),
                    })?,
                Effect::Commit(writes) => self
                    .commit(Some(session), writes)
                    .await
                    .map_err(|e| EffectFailure::Store(e.to_string()))?,
                other => {
                    self.carry_out(Some(session), std::slice::from_ref(other))
                        .await
                }
            }
        }
        Ok(())
    }

    /// Carries out effects whose failures change no answer: a failure is logged, and the
    /// lease's own expiry (in the kernel and at the next start) settles what is left.
    async fn carry_out(&self, session: Option<&Session>, effects: &[Effect]) {
        for effect in effects {
            match effect {
                Effect::Welcomed { notices } => {
                    if let Some(session) = session {
                        session
                            .notices
                            .store(*notices, std::sync::atomic::Ordering::Release);
                        session
                            .welcomed
                            .store(true, std::sync::atomic::Ordering::Release);
                        info!(session = session.id, identity = session.identity(), "hello");
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
                Effect::Commit(writes) => {
                    if let Err(e) = self.commit(session, writes).await {
                        warn!("lease change not stored: {e}");
                    }
                }
                Effect::Audit(record) => self.record(audit_event(record)),
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

    /// Commits store writes in one transaction, and keeps the service's own records of the
    /// leases (their certificates, the counters, the expiry timer) in step.
    async fn commit(&self, session: Option<&Session>, writes: &[Write]) -> Result<(), WriteError> {
        let certificate = session
            .and_then(|s| s.peer.as_ref())
            .map(|p| p.certificate.clone());
        let ops = writes
            .iter()
            .map(|write| write_op(write, certificate.clone()))
            .collect();
        // A lease out of the book is gone whatever the store says: the records follow the book.
        for write in writes {
            if let Write::End { id, end, by, .. } = write {
                lock(&self.lease_credentials).remove(id);
                self.metrics.live_leases.dec();
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
        self.leases.commit(ops).await?;
        for write in writes {
            match write {
                Write::Insert { lease, .. } => {
                    self.metrics.live_leases.inc();
                    self.expiry_changed.notify_one();
                    if let Some(certificate) = &certificate {
                        lock(&self.lease_credentials).insert(lease.id, certificate.clone());
                    }
                }
                // A Renew may shorten the lease: the timer must look at the new expiry.
                Write::Renew { id, .. } => {
                    self.expiry_changed.notify_one();
                    if let Some(certificate) = &certificate {
                        lock(&self.lease_credentials).insert(*id, certificate.clone());
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// A rate-limited request. The audit trail gets one record per identity per second of
    /// refusals, not one per refused request, so that a flood cannot flood the trail.
    fn refuse_rate_limited(
        &self,
        session: &Session,
        identity: &str,
        bytes: &[u8],
        retry_after: u32,
    ) -> Message {
        self.metrics.request(ResultCode::RateLimited.name());
        if !self.rate_limit_audited.contains_key(identity) {
            self.rate_limit_audited.insert(identity.to_owned(), ());
            let mut event = AuditEvent::new(now_ms(), AuditKind::Decision);
            event.outcome = Some(Outcome::Denied);
            event.identity = session.peer.as_ref().map(|p| p.identity.clone());
            event.peer = Some(session.remote);
            event.code = Some(ResultCode::RateLimited);
            event.reason =
                Some("rate limited (further refusals within a second are not recorded)".into());
            self.record(event);
        }
        let mut d = denied(
            codec::peek_request_id(bytes),
            ResultCode::RateLimited,
            "too many requests from this host",
        );
        d.retry_after = Some(retry_after);
        Message::Denied(d)
    }

    fn rate_limited(&self, identity: &str) -> Option<u32> {
        let limiter = self
            .limiter
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        match limiter.check_key(&identity.to_owned()) {
            Ok(()) => None,
            Err(not_until) => {
                let wait = not_until.wait_time_from(governor::clock::Clock::now(
                    &governor::clock::DefaultClock::default(),
                ));
                Some(u32::try_from(wait.as_secs()).unwrap_or(u32::MAX).max(1))
            }
        }
    }

    /// Sets (`Some` expiry) or drops (`None`) a lease's hold on its elements and brings the
    /// kernel to the result (see [`hold_change`]). The changes are queued under the lock, so
    /// that the kernel sees them in the order they were decided, whoever decided them. Returns
    /// the elements it removed from the kernel, and the first failure.
    async fn hold(
        &self,
        lease: &LeaseId,
        elements: &[Element],
        expires_ms: Option<u64>,
    ) -> (Vec<Element>, Option<fwnp_netfilter::Error>) {
        let Some(filter) = &self.filter else {
            return (Vec::new(), None);
        };
        let now = now_ms();
        let queued: Vec<_> = {
            let mut holders = lock(&self.holders);
            elements
                .iter()
                .filter_map(|element| hold_change(&mut holders, element, *lease, expires_ms, now))
                .map(|change| (change.clone(), filter.submit(change)))
                .collect()
        };
        let mut removed = Vec::new();
        let mut failure = None;
        for (change, outcome) in queued {
            match (change, outcome.await) {
                (
                    Change::Remove(element),
                    Ok(()) | Err(fwnp_netfilter::Error::ElementMissing(_)),
                ) => removed.push(element),
                // A kernel that renews by delete and add fails on an element that is gone.
                (
                    Change::Renew(element, timeout),
                    Err(fwnp_netfilter::Error::ElementMissing(_)),
                ) => match filter.add(element, timeout).await {
                    Ok(()) | Err(fwnp_netfilter::Error::ElementExists(_)) => {}
                    Err(e) => failure = failure.or(Some(e)),
                },
                (_, Ok(())) => {}
                (_, Err(e)) => failure = failure.or(Some(e)),
            }
        }
        (removed, failure)
    }

    /// Makes a live lease hold its elements until `expires_ms` (adding any that are missing).
    /// A revocation may have ended the lease meanwhile and given its elements up before they
    /// were taken again here: then they are given up again, and the answer is `LeaseEnded`.
    async fn refresh(
        &self,
        lease: &LeaseId,
        elements: &[Element],
        expires_ms: u64,
    ) -> Result<(), RefreshError> {
        let (_, failure) = self.hold(lease, elements, Some(expires_ms)).await;
        // A revocation takes the lease out of the book before it gives up the elements, so a
        // lease still in the book now cannot have lost them to one.
        if lock(&self.core).book().get(lease).is_none() {
            let _ = self.hold(lease, elements, None).await;
            return Err(RefreshError::LeaseEnded);
        }
        match failure {
            Some(e) => Err(e.into()),
            None => Ok(()),
        }
    }

    /// Gives up an ended lease's elements; those no other lease holds leave the kernel, and
    /// (`kill`) their live connections are ended.
    async fn remove_elements(&self, lease: &LeaseId, grants: &[Grant], kill: bool) {
        let Some(filter) = &self.filter else { return };
        let (removed, failure) = self.hold(lease, &elements_of_all(grants), None).await;
        if let Some(e) = failure {
            warn!(lease = %lease, "removing elements from the kernel failed: {e}");
        }
        if kill {
            for element in removed {
                if let Err(e) = filter.kill_connections(element.clone()).await {
                    warn!("ending the connections of {element:?} failed: {e}");
                }
            }
        }
    }

    /// A List changes nothing: the first of a host's in an interval is recorded, the rest
    /// counted into one record at its end, so that Lists cannot flood the trail.
    fn record_list(&self, identity: &str, remote: SocketAddr) {
        if let TallyVerdict::Record(earlier) = self.lists.event(&identity.to_owned(), remote) {
            if let Some(earlier) = earlier {
                self.record_lists(&earlier);
            }
            let mut event = AuditEvent::new(now_ms(), AuditKind::Request);
            event.identity = Some(identity.to_owned());
            event.peer = Some(remote);
            event.reason = Some("list".into());
            self.record(event);
        }
    }

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
            self.carry_out(None, &due).await;
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
    async fn end_revoked(
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
    pub async fn reload_tls(&self) -> Result<Vec<Value>, TlsReloadError> {
        let files = crate::daemon::tls_files(&self.config);
        let options = crate::daemon::server_options(&self.config);
        // Read before anything is replaced, so that an unreadable CRL changes nothing. The
        // configuration below reads the file again: should it change in between, the next
        // reload settles the difference.
        let revoked = read_revoked_certificates::<TlsReloadError>(files.crl.as_deref())?;
        for endpoint in lock(&self.endpoints).iter() {
            crate::tls::reload_server_config(endpoint, &files, &options)?;
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
    async fn end_revoked_credentials(
        &self,
        revoked: &crate::identity::RevokedCertificates,
    ) -> Vec<Value> {
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
                closed.push(json!({
                    "host": identity,
                    "serial": serial.as_str(),
                    "peer": session.remote.to_string(),
                    "leases_revoked": count,
                }));
            }
        }
        closed
    }

    /// Revokes every live lease last opened or renewed with a certificate `revoked` lists, and
    /// the leases of `unknown_certificate_identities` whose certificate is not known; returns
    /// each revoked lease's identity and Revoked notice, for the caller to deliver. Without
    /// this, whoever held a stolen key could open leases, disconnect (or stay connected beside
    /// the real host), and keep them open after the revocation until they expire.
    async fn end_leases_of_revoked_certificates(
        &self,
        revoked: &crate::identity::RevokedCertificates,
        unknown_certificate_identities: &BTreeSet<String>,
    ) -> Vec<(String, Message)> {
        let listed: Vec<(LeaseId, String, String)> = {
            let core = lock(&self.core);
            let book = core.book();
            let mut credentials = lock(&self.lease_credentials);
            // Entries of leases that ended by a path that raced with their renewal.
            credentials.retain(|id, _| book.get(id).is_some());
            book.iter()
                .filter_map(|lease| match credentials.get(&lease.id) {
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
    pub async fn reload_policy(&self) -> Result<Value, AdminError> {
        let policy = Policy::load(&self.config.policy).map_err(|e| {
            AdminError::bad_request(format!(
                "policy not reloaded, the old one stays in force: {e}"
            ))
        })?;
        let policy = Arc::new(policy);
        *self.limiter.write().unwrap_or_else(|e| e.into_inner()) = limiter_for(&policy);
        *self.policy.write().unwrap_or_else(|e| e.into_inner()) = policy.clone();
        let revoked = self.revoke_disallowed(&policy, "policy-reload").await;
        let mut event = AuditEvent::new(now_ms(), AuditKind::PolicyReload);
        event.actor = Some("operator".into());
        event.reason = Some(format!(
            "policy {} loaded; {} leases revoked",
            policy.origin(),
            revoked.len()
        ));
        self.record(event);
        info!(revoked = revoked.len(), "policy reloaded");
        Ok(json!({ "policy": policy.origin(), "revoked": revoked }))
    }

    /// Revokes every live lease `policy` no longer allows, naming `by` as the revoker; returns
    /// what it revoked, for the admin API.
    async fn revoke_disallowed(&self, policy: &Policy, by: &str) -> Vec<Value> {
        let leases: Vec<_> = lock(&self.core).book().iter().cloned().collect();
        let mut revoked = Vec::new();
        for lease in leases {
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
                revoked.push(json!({ "lease": lease.id.to_string(), "host": &*lease.host, "why": e.to_string() }));
            }
        }
        revoked
    }

    /// The admin API's revoke.
    pub async fn revoke_by_operator(
        &self,
        id: LeaseId,
        reason: Option<String>,
    ) -> Result<Value, AdminError> {
        let text = reason.unwrap_or_else(|| "revoked by the operator".to_owned());
        match self
            .revoke(&id, RevokeReason::Operator, "operator", Some(text))
            .await
        {
            Some(lease) => Ok(json!({ "revoked": lease.id.to_string(), "host": &*lease.host })),
            None => Err(AdminError::not_found(format!("no live lease {id}"))),
        }
    }

    /// Copies the kernel batcher's counters into the metrics (called before each scrape and
    /// periodically).
    pub fn sample_filter_metrics(&self) {
        if let Some(filter) = &self.filter {
            self.metrics.observe_batcher(&filter.stats());
        }
    }

    /// The metrics in Prometheus's text format, with the kernel counters brought up to date.
    pub fn render_metrics(&self) -> String {
        self.sample_filter_metrics();
        self.metrics.render()
    }

    /// The admin API's status.
    pub fn status_json(&self) -> Value {
        let core = lock(&self.core);
        let book = core.book();
        let filter = self.filter.as_ref().map(|f| {
            let stats = f.stats();
            json!({
                "table": self.config.filter.table,
                "batches": stats.batches,
                "changes": stats.changes,
                "failed_changes": stats.failed_changes,
                "repairs": stats.repairs,
                "batch_time_us": u64::try_from(stats.total_batch_time.as_micros()).unwrap_or(u64::MAX),
            })
        });
        let writer = self.store.writer().stats();
        json!({
            "epoch": format!("{:016x}", self.epoch()),
            "uptime_secs": self.started.elapsed().as_secs(),
            "live_leases": book.len(),
            "hosts_with_leases": book.host_count(),
            "connections": self.sessions.count(),
            "policy": self.policy().origin(),
            "filter": filter,
            "store": self.store.path().display().to_string(),
            // Group commit at work: operations per transaction is what keeps the store's cost
            // per grant down under load.
            "store_writer": {
                "transactions": writer.transactions,
                "jobs": writer.jobs,
                "ops": writer.ops,
                "failed_jobs": writer.failed_jobs,
                "largest_batch": writer.largest_batch,
                "pending_ops": writer.pending_ops,
                "busy_us": writer.busy_us,
            },
        })
    }

    /// Runs a read of the store on tokio's blocking threads: SQLite answers synchronously, and a
    /// long query (a wide audit search, a report over months) on a runtime worker would hold up
    /// the QUIC connections and timers that share it.
    async fn read_store<T: Send + 'static>(
        &self,
        read: impl FnOnce(&Store) -> Result<T, crate::store::StoreError> + Send + 'static,
    ) -> Result<T, AdminError> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || read(&store))
            .await
            .map_err(|e| AdminError::internal(format!("the store read did not finish: {e}")))?
            .map_err(|e| AdminError::internal(e.to_string()))
    }

    /// The admin API's lease listing.
    pub async fn leases_json(&self, query: &HashMap<String, String>) -> Result<Value, AdminError> {
        let mut filter = LeaseFilter {
            host: query.get("host").cloned(),
            app: query.get("app").cloned(),
            ..LeaseFilter::default()
        };
        if let Some(port) = query.get("port") {
            filter.port = Some(
                port.parse()
                    .map_err(|_| AdminError::bad_request(format!("port {port:?}")))?,
            );
        }
        if let Some(protocol) = query.get("protocol") {
            filter.protocol = Some(parse_protocol(protocol)?);
        }
        if let Some(serial) = query.get("serial") {
            filter.certificate_serial =
                Some(crate::identity::Serial::parse(serial).ok_or_else(|| {
                    AdminError::bad_request(format!(
                        "serial {serial:?} is not a certificate serial in hexadecimal"
                    ))
                })?);
        }
        let now = now_ms();
        let leases: Vec<LeaseRecord> = self.read_store(move |store| store.leases(&filter)).await?;
        Ok(json!({ "leases": leases.iter().map(|l| l.to_json(now)).collect::<Vec<_>>() }))
    }

    /// The admin API's audit query; `wait` long-polls for events after `after`.
    pub async fn audit_json(&self, query: &HashMap<String, String>) -> Result<Value, AdminError> {
        let mut q = AuditQuery::default();
        let now = now_ms();
        q.host = query.get("host").cloned();
        q.app = query.get("app").cloned();
        if let Some(port) = query.get("port") {
            q.port = Some(
                port.parse()
                    .map_err(|_| AdminError::bad_request(format!("port {port:?}")))?,
            );
        }
        if let Some(outcomes) = query.get("outcome") {
            for name in outcomes.split(',') {
                q.outcomes.push(
                    Outcome::from_name(name).ok_or_else(|| {
                        AdminError::bad_request(format!("unknown outcome {name:?}"))
                    })?,
                );
            }
        }
        if let Some(kinds) = query.get("kind") {
            for name in kinds.split(',') {
                q.kinds
                    .push(AuditKind::from_name(name).ok_or_else(|| {
                        AdminError::bad_request(format!("unknown kind {name:?}"))
                    })?);
            }
        }
        q.since_ms = query.get("since").map(|s| time_arg(s, now)).transpose()?;
        q.until_ms = query.get("until").map(|s| time_arg(s, now)).transpose()?;
        q.limit = match query.get("limit") {
            Some(l) => l
                .parse()
                .map_err(|_| AdminError::bad_request(format!("limit {l:?}")))?,
            None => 100,
        };
        if query.get("order").map(String::as_str) == Some("oldest") {
            q.order = Order::OldestFirst;
        }
        if let Some(after) = query.get("after") {
            let after: u64 = after
                .parse()
                .map_err(|_| AdminError::bad_request(format!("after {after:?}")))?;
            let wait = match query.get("wait") {
                Some(w) => crate::config::parse_duration(w)
                    .map_err(AdminError::bad_request)?
                    .min(Duration::from_secs(60)),
                None => Duration::ZERO,
            };
            let mut watch = self.store.audit_watch();
            let deadline = tokio::time::Instant::now() + wait;
            loop {
                let (query, limit) = (q.clone(), q.limit.max(1));
                let events = self
                    .read_store(move |store| store.audit_follow(after, &query, limit))
                    .await?;
                if !events.is_empty() || tokio::time::Instant::now() >= deadline {
                    let last = events.last().map_or(after, |e| e.id);
                    return Ok(
                        json!({ "events": events.iter().map(|e| e.to_json()).collect::<Vec<_>>(), "next_after": last }),
                    );
                }
                if tokio::time::timeout_at(deadline, watch.changed())
                    .await
                    .is_err()
                {
                    continue;
                }
            }
        }
        if let Some(cursor) = query.get("cursor") {
            q.cursor = Some(
                cursor
                    .parse()
                    .map_err(|_| AdminError::bad_request(format!("cursor {cursor:?}")))?,
            );
        }
        let page = self.read_store(move |store| store.audit(&q)).await?;
        Ok(json!({
            "events": page.events.iter().map(|e| e.to_json()).collect::<Vec<_>>(),
            "next_cursor": page.next_cursor,
        }))
    }

    /// The admin API's explain: the decision the current policy makes for a described request.
    pub fn explain_json(&self, body: &Value) -> Result<Value, AdminError> {
        let policy = self.policy();
        crate::explain::explain_json(&policy, body).map_err(AdminError::bad_request)
    }

    /// The admin API's usage report.
    pub async fn report_json(&self, query: &HashMap<String, String>) -> Result<Value, AdminError> {
        let now = now_ms();
        let q = ReportQuery {
            since_ms: query.get("since").map(|s| time_arg(s, now)).transpose()?,
            until_ms: query.get("until").map(|s| time_arg(s, now)).transpose()?,
            host: query.get("host").cloned(),
        };
        let rows = self.read_store(move |store| store.report(&q, now)).await?;
        let policy = self.policy();
        Ok(json!({
            "rows": rows.iter().map(|r| r.to_json()).collect::<Vec<_>>(),
            "suggested_policy": crate::report::suggest_policy(&rows, &policy),
        }))
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

/// The store's operation for a write of the request core; `certificate` is the one the host
/// asked with, kept with the leases it opens or renews.
fn write_op(write: &Write, certificate: Option<Arc<crate::identity::CertificateName>>) -> WriteOp {
    match write {
        Write::Insert {
            lease,
            requested_lifetime,
            peer,
            max_leases,
        } => WriteOp::InsertLease(NewLease {
            id: lease.id,
            identity: lease.host.to_string(),
            peer: Some(*peer),
            grants: lease.grants.clone(),
            app: lease.app.as_deref().cloned(),
            requested_lifetime: *requested_lifetime,
            granted_lifetime: lease.lifetime,
            created_ms: lease.created_ms,
            expires_ms: lease.expires_ms,
            certificate,
            max_leases: *max_leases,
        }),
        Write::Renew {
            id,
            renewed_ms,
            expires_ms,
            granted_lifetime,
        } => WriteOp::RenewLease {
            id: *id,
            renewed_ms: *renewed_ms,
            expires_ms: *expires_ms,
            granted_lifetime: *granted_lifetime,
            certificate,
        },
        Write::End {
            id,
            end,
            ended_ms,
            by,
            why,
        } => WriteOp::EndLease {
            id: *id,
            end: *end,
            ended_ms: *ended_ms,
            by: by.clone(),
            why: why.clone(),
        },
        Write::Audit(record) => WriteOp::audit(audit_event(record)),
    }
}

/// The audit trail's event for a record of the request core.
fn audit_event(record: &AuditRecord) -> AuditEvent {
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
    match &record.what {
        Audit::Refused {
            identity,
            code,
            reason,
            rule,
            request,
        } => {
            event.outcome = Some(Outcome::Denied);
            event.identity = identity.clone();
            event.code = Some(*code);
            event.reason = Some(reason.clone());
            event.rule = rule.clone();
            match request {
                Asked::Open(open) => {
                    event.request =
                        Some(RequestSummary::from_opening(&open.opening, open.lifetime));
                    event.app = open.app.clone();
                }
                Asked::Lease(id) => event.lease = Some(*id),
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
            event.grants = lease.grants.clone();
            event.granted_lifetime = Some(lease.lifetime);
            event.rule = rule.clone();
            event.reason = Some(reason.clone());
        }
        Audit::Renewed { lease } => {
            event.outcome = Some(Outcome::Renewed);
            event.identity = Some(lease.host.to_string());
            event.lease = Some(lease.id);
            event.grants = lease.grants.clone();
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
            event.grants = lease.grants.clone();
            event.app = lease.app.as_deref().cloned();
            event.actor = by.clone();
            event.reason = why.clone();
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
    ) -> Result<(), Objection> {
        Policy::still_allows(self, identity, addresses, grants).map_err(|e| Objection {
            reason: e.to_string(),
            rule: e.rule.map(|r| r.name.to_string()),
        })
    }
}

fn lifetime_policy(bounds: crate::policy::LifetimeBounds) -> LifetimePolicy {
    LifetimePolicy {
        min: bounds.min_secs,
        max: bounds.max_secs,
        default: bounds.default_secs,
    }
}

/// What a CRL reload finds of one identity's live connections.
#[derive(Debug, Default)]
struct IdentityConnections {
    /// Those whose certificate the CRL revokes, with its serial.
    revoked: Vec<(Arc<Session>, Serial)>,
    /// Whether one has a certificate the CRL does not list: the host rolled to a new one.
    rolled: bool,
}

fn parse_protocol(text: &str) -> Result<fwnp_proto::Protocol, AdminError> {
    use fwnp_proto::Protocol;
    [
        Protocol::Tcp,
        Protocol::Udp,
        Protocol::Sctp,
        Protocol::UdpLite,
    ]
    .into_iter()
    .find(|p| p.name() == text)
    .ok_or_else(|| AdminError::bad_request(format!("unknown protocol {text:?}")))
}

/// A time argument: milliseconds since the Unix epoch, or a duration ago such as `1h`.
fn time_arg(text: &str, now_ms: u64) -> Result<u64, AdminError> {
    if let Ok(ms) = text.parse::<u64>() {
        return Ok(ms);
    }
    let ago = crate::config::parse_duration(text).map_err(AdminError::bad_request)?;
    Ok(now_ms.saturating_sub(u64::try_from(ago.as_millis()).unwrap_or(u64::MAX)))
}

#[cfg(test)]
mod tests {
    use super::{Change, Element, Holders, Policy, fit_reason, hold_change, limiter_for};
    use fwnp_proto::{LeaseId, PortRange, Protocol};
    use std::time::Duration;

    #[test]
    fn without_a_rate_limit_table_the_default_limit_applies() {
        let policy = Policy::from_str("[defaults]\nlifetime = \"10m\"\n", "test").expect("policy");
        assert!(policy.rate_limit().is_none());
        let limiter = limiter_for(&policy);
        let key = "fwnp://host/web-01".to_owned();
        // The burst (2000) passes at once; the default rate adds about one per millisecond.
        let passed = (0..2100)
            .filter(|_| limiter.check_key(&key).is_ok())
            .count();
        assert!((2000..2100).contains(&passed), "{passed} of 2100 passed");
        // Another identity has a budget of its own.
        assert!(limiter.check_key(&"fwnp://host/web-02".to_owned()).is_ok());
    }

    #[test]
    fn an_element_follows_the_latest_expiry_of_its_holders_and_goes_with_the_last() {
        let element = Element {
            host: "10.0.0.1".parse().unwrap(),
            protocol: Protocol::Tcp,
            ports: PortRange::single(80),
            remote: None,
        };
        let (a, b) = (LeaseId([1; 16]), LeaseId([2; 16]));
        let mut holders = Holders::new();
        let renew = |ms: u64| Some(Change::Renew(element.clone(), Duration::from_millis(ms)));
        assert_eq!(
            hold_change(&mut holders, &element, a, Some(60_000), 0),
            renew(60_000)
        );
        // A later holder lengthens it; an earlier one changes nothing.
        assert_eq!(
            hold_change(&mut holders, &element, b, Some(600_000), 0),
            renew(600_000)
        );
        assert_eq!(
            hold_change(&mut holders, &element, a, Some(90_000), 0),
            None
        );
        // The latest holder goes: cut back to the other's expiry, not removed.
        assert_eq!(
            hold_change(&mut holders, &element, b, None, 1_000),
            renew(89_000)
        );
        // Giving up what one does not hold changes nothing; the last holder removes it.
        assert_eq!(hold_change(&mut holders, &element, b, None, 1_000), None);
        assert_eq!(
            hold_change(&mut holders, &element, a, None, 1_000),
            Some(Change::Remove(element.clone()))
        );
        assert!(holders.is_empty());
        // An expiry already past still gives the kernel a timeout it accepts.
        assert_eq!(
            hold_change(&mut holders, &element, a, Some(500), 1_000),
            renew(1)
        );
    }

    #[test]
    fn reasons_are_cut_to_the_protocol_limit_on_a_char_boundary() {
        let max = fwnp_proto::validate::MAX_REASON_LEN;
        assert_eq!(fit_reason("short"), "short");
        let long = "é".repeat(max);
        let cut = fit_reason(long);
        assert!(cut.len() <= max, "{} bytes", cut.len());
        assert!(cut.ends_with("..."));
        let exact = "a".repeat(max);
        assert_eq!(fit_reason(exact.clone()), exact);
    }
}
