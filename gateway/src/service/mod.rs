//! The gateway's driver: it carries out what the request core (`fwnp_proto::gateway::request`)
//! decides, with the operator's [`Policy`] (through `Decide`), the kernel filter
//! (`fwnp_netfilter`) and the [`Store`].
//!
//! The order of an Open is fixed by the core, because it decides what a host can rely on:
//! decode and validate, resolve the address, ask policy, take the lease in the book; then this
//! driver programs the kernel and commits the lease to the store (for a new lease both at the
//! same time, unless many requests are in flight), waits for the kernel's acknowledgement and
//! the store's commit, and only then does the core give the Granted. A failure after the book
//! took the lease gives the lease back and answers no-resources, so a host never holds a lease
//! the kernel or the store lacks (a lease the store committed while the kernel refused it is
//! ended in the store again, and audited so). A renewal (or an Open that extends a live lease) goes one step after the other: one
//! that makes a lease longer writes the store before the kernel, one that makes it shorter the
//! kernel first, so that a gateway killed between the two never leaves a kernel element that
//! outlives its stored lease; the start's reconcile brings any such element down to the stored
//! expiry all the same.
//!
//! What needs a clock or the connection stays here: the rate limiter, the certificate checks,
//! the counting of Lists and failed handshakes.
//!
//! By job: `request` drives the core for each request, `kernel` keeps the elements each lease
//! holds, `admission` limits handshakes and requests and counts failures, `revocation` ends
//! leases from outside the request path (expiry, operator, policy and CRL reloads) and says
//! going away, `admin_api` answers the admin API; this module starts the service and restores
//! the leases of the previous run.
//!
//! Kernel elements are shared: two leases (of hosts behind one address, or of a host with
//! third-party rights) may hold the same element, which then stays while one of them does,
//! with the latest of their expiries as its timeout.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use fwnp_netfilter::{Batcher, Change, Element};
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
use tracing::{debug, info, warn};

use crate::api::AdminError;
use crate::config::GatewayConfig;
use crate::metrics::{Metrics, Stage};
use crate::policy::{Policy, Verdict};
use crate::sessions::{Session, Sessions};
use crate::store::{
    AuditEvent, AuditKind, AuditQuery, LeaseEnd, LeaseFilter, LeaseRecord, LeaseStore, NewLease,
    Order, Outcome, ReportQuery, RequestSummary, Store, StoreQueries, WriteError, WriteOp, now_ms,
};
use crate::tally::{Counted, Tally, Verdict as TallyVerdict};
use fwnp_trust::identity::{Serial, allowed_addresses};

mod admin_api;
mod admission;
mod cluster_sync;
mod credentials;
mod kernel;
#[cfg(test)]
mod memory_tests;
mod request;
#[cfg(test)]
mod request_tests;
mod revocation;
mod seams;
mod unloaded;

use cluster_sync::{OnItsWay, no_longer_on_their_way};
use credentials::LeaseCredentials;
use kernel::{HeldElements, Holders, RefreshError, elements_of_all, held_openings};

/// How many unanswered attempts to end one lease are kept (see `Service::unanswered_ends`):
/// each comes after a list of the cluster, so only a cluster in trouble for long makes more.
const MAX_UNANSWERED_ATTEMPTS: usize = 8;

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
    /// What the core was made with, for the part of a request done outside its lock; its
    /// epoch is the one at the start: [`Service::core_config`] gives the one in force.
    core_config: CoreConfig,
    expiry_changed: tokio::sync::Notify,
    /// What the admin API reads and the daemon prunes.
    queries: Arc<dyn StoreQueries>,
    /// Where the request path writes leases and their audit records.
    leases: Arc<dyn LeaseStore>,
    /// The cluster store, with the etcd backend: its watch is applied to the book and kernel.
    cluster_store: Option<crate::store::EtcdStore>,
    filter: Option<Batcher>,
    /// The epoch in force: the store's at the start; in a cluster, the cluster's new one once
    /// its state was found lost or replaced (see `cluster_sync`).
    epoch: std::sync::atomic::AtomicU64,
    rng: Mutex<StdRng>,
    rate_limit_audited: moka::sync::Cache<String, ()>,
    started: Instant,
    endpoints: Mutex<Vec<quinn::Endpoint>>,
    /// The certificates the CRL lists (as read at start or at the last reload), for
    /// connections whose handshake finished under the CRL before it (see
    /// [`Service::check_credential`]).
    revoked_certificates: Mutex<Arc<fwnp_trust::identity::RevokedCertificates>>,
    /// The certificate that last opened or renewed each live lease, so that a CRL reload can
    /// revoke the leases of a revoked certificate whose host is not connected. The store keeps
    /// it too (restored at start); leases stored by a gateway of schema 1 have no entry until
    /// they are renewed.
    lease_credentials: Mutex<LeaseCredentials>,
    /// The live leases that hold each kernel element, with their expiries (Unix ms). Two
    /// leases may hold the same element (hosts behind one address, a host with third-party
    /// rights): it stays while one of them does, with the latest of their expiries.
    holders: Arc<Mutex<Holders>>,
    /// The new leases in the book whose insert is on its way to the store, each with the
    /// writes of a revocation that ended it meanwhile. Those writes wait for the insert: sent
    /// before it, the end would find no stored lease to end and the insert would then store
    /// the revoked lease as live (a restart would bring it back).
    being_stored: Mutex<HashMap<LeaseId, Vec<Write>>>,
    /// In a cluster: the leases this gateway is ending, or ended, whose end the watch has not
    /// brought back yet. A list of the cluster read before such an end was committed still
    /// shows the lease: putting it back into the book and the kernel would open again, until
    /// the end comes through the watch, what its host released or the operator revoked.
    ends_on_their_way: Mutex<HashMap<LeaseId, OnItsWay>>,
    /// In a cluster: the leases this gateway is renewing, or renewed, whose renewal the watch
    /// has not brought back yet, with the expiry it stores. The book holds that expiry from
    /// before the commit; a list, or a change of the watch, read before the commit still shows
    /// the expiry before it, and taking that in would close the opening in the kernel early
    /// until the renewal came through the watch.
    renewals_on_their_way: Mutex<HashMap<LeaseId, OnItsWay>>,
    /// In a cluster: the audit records of lease ends whose commit got no answer, by lease,
    /// oldest attempt first (at most [`MAX_UNANSWERED_ATTEMPTS`]). Etcd may have taken such
    /// an end all the same, now or once its quorum is back, and then no one records it. The
    /// end's tombstone tells which attempt was taken: the one of this gateway's site whose
    /// end time it carries is recorded, when the watch or a list shows it. They are forgotten
    /// once an attempt of this gateway commits with its own record, or the lease is found
    /// ended otherwise.
    unanswered_ends: Mutex<HashMap<LeaseId, Vec<AuditRecord>>>,
    /// This gateway as a member of its etcd cluster (`[store] backend = "etcd"`), set once at
    /// the start.
    cluster: std::sync::OnceLock<Arc<crate::cluster::Cluster>>,
    /// Held by a policy reload from its read of the file to the policy in force: a second
    /// reload waits for the first, then runs (in a cluster it publishes the next version).
    reload_lock: tokio::sync::Mutex<()>,
    /// Makes the audit export's JSON file open its path again (SIGHUP), set once at the start.
    audit_reopen: std::sync::OnceLock<crate::audit_export::ReopenHandle>,
    /// Where a caller of [`Service::start_with_seams`] holds the work; none otherwise.
    seams: Seams,
}

/// Why [`Service::reload_tls`] changed nothing.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TlsReloadError {
    /// A TLS file (certificate, key, CA or CRL) is unusable.
    #[error("TLS files not reloaded, the old ones stay in force: {0}")]
    Files(#[from] fwnp_trust::tls::TlsError),
    /// The CRL's list of revoked certificates cannot be read.
    #[error("TLS files not reloaded, the old ones stay in force: {0}")]
    Crl(#[from] fwnp_trust::identity::IdentityError),
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
    CrlFile(#[from] fwnp_trust::tls::TlsError),
    /// The CRL's list of revoked certificates cannot be read.
    #[error("CRL: {0}")]
    Crl(#[from] fwnp_trust::identity::IdentityError),
    /// The etcd cluster's membership or policy could not be set up.
    #[error("cluster: {0}")]
    Cluster(#[from] crate::cluster::ClusterError),
    /// A thread of the audit export (`[audit]`) could not be started.
    #[error("audit export: {0}")]
    AuditExport(#[source] std::io::Error),
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Every critical section leaves its data consistent before anything can panic.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

pub use fwnp_proto::gateway::request::{denied, fit_reason};
pub use request::{AT_ONCE_IN_FLIGHT, write_op};
pub use revocation::PUBLISH_ATTEMPTS;
pub(crate) use seams::pause as pause_at;
pub use seams::{Pause, Seams};

/// The certificates the CRL file lists; none without a CRL.
fn read_revoked_certificates<E>(
    crl: Option<&std::path::Path>,
) -> Result<fwnp_trust::identity::RevokedCertificates, E>
where
    E: From<fwnp_trust::tls::TlsError> + From<fwnp_trust::identity::IdentityError>,
{
    match crl {
        Some(path) => Ok(fwnp_trust::identity::revoked_certificates(
            &fwnp_trust::tls::load_crls(path)?,
        )?),
        None => Ok(fwnp_trust::identity::RevokedCertificates::default()),
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
        Self::start_with_seams(config, filter, Seams::default()).await
    }

    /// As [`Service::start`], with work held at `seams`: a request after its decision, a
    /// cluster's publish of a policy before its transaction, a reload's published version
    /// before it is put in force, a version of the cluster's policy before the watch puts it
    /// in force. For a test that must run two things in one order.
    pub async fn start_with_seams(
        config: GatewayConfig,
        filter: Option<Batcher>,
        seams: Seams,
    ) -> Result<Arc<Service>, StartError> {
        let mut options = crate::store::StoreOptions::default();
        if config.store.synchronous_full {
            options.synchronous = crate::store::Synchronous::Full;
        }
        let store = Arc::new(Store::open_with(&config.state_dir, options)?);
        let mut member = None;
        let (leases, cluster_store): (Arc<dyn LeaseStore>, _) = match &config.store.backend {
            crate::config::StoreBackend::Etcd(etcd) => {
                let cluster_store =
                    crate::store::EtcdStore::connect(etcd, store.writer().clone()).await?;
                let quic = config.listen.iter().map(ToString::to_string).collect();
                member = Some(Arc::new(
                    crate::cluster::Cluster::connect(etcd, cluster_store.clone(), quic)
                        .await?
                        .with_seams(&seams),
                ));
                (Arc::new(cluster_store.clone()), Some(cluster_store))
            }
            _ => (store.clone(), None),
        };
        if let Some(member) = &member {
            member.continue_audit_ids(store.writer()).await?;
        }
        // The cluster's policy, when one is published, is in force from the start.
        let policy = match &member {
            Some(member) => member.policy_before_start(&config.policy).await?,
            None => None,
        };
        let service = Self::start_inner(
            config,
            filter,
            store.clone(),
            leases,
            cluster_store,
            policy,
            seams,
        )
        .await?;
        store.writer().coalesce(service.coalescing(
            service.config.coalescing.store_operations,
            service.config.coalescing.store_wait,
        ));
        if let Some(member) = member {
            let _ = service.cluster.set(member.clone());
            member.join(&service).await?;
        }
        Ok(service)
    }

    /// Makes the audit export's JSON file (`[audit] json_file`) open its path again before its
    /// next event, for a rotation that renamed it (SIGHUP); without it the path is looked at
    /// once a second anyway.
    pub fn reopen_audit_export(&self) {
        if let Some(reopen) = self.audit_reopen.get() {
            reopen.reopen();
        }
    }

    /// This gateway as a member of its etcd cluster; `None` with the SQLite backend.
    pub fn cluster(&self) -> Option<&Arc<crate::cluster::Cluster>> {
        self.cluster.get()
    }

    /// The cluster's lease store, with the etcd backend.
    pub fn cluster_store(&self) -> Option<&crate::store::EtcdStore> {
        self.cluster_store.as_ref()
    }

    /// As [`Service::start`], with the leases written to and restored from `leases` and the
    /// admin API's reads and the pruning of old records done by `queries` instead of the
    /// database in the state directory: the seam where another backend plugs in.
    pub async fn start_with_store(
        config: GatewayConfig,
        filter: Option<Batcher>,
        queries: Arc<dyn StoreQueries>,
        leases: Arc<dyn LeaseStore>,
    ) -> Result<Arc<Service>, StartError> {
        Self::start_inner(
            config,
            filter,
            queries,
            leases,
            None,
            None,
            Seams::default(),
        )
        .await
    }

    /// As [`Service::start_with_store`], following the cluster through `cluster_store` (the
    /// etcd backend) and with `policy` in force instead of the policy file's (a cluster's
    /// published policy) from the first decision on, the revocation of restored leases included.
    async fn start_inner(
        config: GatewayConfig,
        filter: Option<Batcher>,
        queries: Arc<dyn StoreQueries>,
        leases: Arc<dyn LeaseStore>,
        cluster_store: Option<crate::store::EtcdStore>,
        policy: Option<Policy>,
        seams: Seams,
    ) -> Result<Arc<Service>, StartError> {
        let policy = match policy {
            Some(policy) => policy,
            None => Policy::load(&config.policy)?,
        };
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
        let core_config = CoreConfig {
            epoch,
            max_streams: config.limits.max_streams,
            kill_connections: config.filter.kill_connections,
        };
        let service = Arc::new(Service {
            sessions: Sessions::default(),
            metrics: Metrics::new(),
            policy: RwLock::new(Arc::new(policy)),
            limiter: RwLock::new(limiter),
            handshake_limiter: handshake_limiter(&config),
            auth_failures: Tally::new(window),
            refused_handshakes: Tally::new(window),
            lists: Tally::new(window),
            core: Mutex::new(RequestCore::new(core_config)),
            core_config,
            expiry_changed: tokio::sync::Notify::new(),
            queries,
            leases,
            cluster_store,
            filter,
            epoch: std::sync::atomic::AtomicU64::new(epoch),
            rng: Mutex::new(StdRng::from_os_rng()),
            rate_limit_audited: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(Duration::from_secs(1))
                .build(),
            started: Instant::now(),
            endpoints: Mutex::new(Vec::new()),
            revoked_certificates: Mutex::new(Arc::default()),
            lease_credentials: Mutex::new(LeaseCredentials::default()),
            holders: Arc::default(),
            being_stored: Mutex::new(HashMap::new()),
            ends_on_their_way: Mutex::new(HashMap::new()),
            renewals_on_their_way: Mutex::new(HashMap::new()),
            unanswered_ends: Mutex::new(HashMap::new()),
            cluster: std::sync::OnceLock::new(),
            reload_lock: tokio::sync::Mutex::new(()),
            audit_reopen: std::sync::OnceLock::new(),
            seams,
            config,
        });
        if let Some(filter) = &service.filter {
            filter.desired_by(Arc::new(HeldElements(service.holders.clone())));
            filter.coalesce(service.coalescing(
                service.config.coalescing.kernel_changes,
                service.config.coalescing.kernel_wait,
            ));
        }
        service.restore().await?;
        // From the revision of the restore on, every lease of the cluster comes through here.
        if let Some(cluster) = &service.cluster_store {
            let changes = cluster.watch()?;
            tokio::spawn(Self::follow_cluster(Arc::downgrade(&service), changes));
        }
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
        let site = match &service.config.store.backend {
            crate::config::StoreBackend::Etcd(etcd) => Some(etcd.site.clone()),
            _ => None,
        };
        let export = crate::audit_export::AuditExport::start(
            &service.config.audit,
            site,
            service.metrics.audit_export_dropped.clone(),
        )
        .map_err(StartError::AuditExport)?;
        if export.is_active() {
            let _ = service.audit_reopen.set(export.reopen_handle());
            tokio::spawn(crate::audit_export::follow(
                export,
                Arc::downgrade(&service),
            ));
        }
        Ok(service)
    }

    /// Coalescing (`enough` changes or operations, waiting at most `wait`) while at least
    /// `[coalescing] in_flight` requests are in flight; never with 0.
    fn coalescing(&self, enough: usize, wait: Duration) -> fwnp_netfilter::Coalescing {
        let in_flight = self.metrics.requests_in_flight.clone();
        let config = self.config.coalescing;
        fwnp_netfilter::Coalescing {
            busy: Arc::new(move || config.busy(in_flight.get())),
            enough,
            wait,
        }
    }

    /// The gateway's epoch.
    pub fn epoch(&self) -> Epoch {
        self.epoch.load(std::sync::atomic::Ordering::Acquire)
    }

    /// The request core's configuration, with the epoch in force.
    fn core_config(&self) -> CoreConfig {
        CoreConfig {
            epoch: self.epoch(),
            ..self.core_config
        }
    }

    /// The store's reads, for the daemon's housekeeping and tests.
    pub fn store(&self) -> &dyn StoreQueries {
        &*self.queries
    }

    fn policy(&self) -> Arc<Policy> {
        self.policy
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    async fn restore(&self) -> Result<(), StartError> {
        let now = now_ms();
        // Each lease goes into the book as the store reads it: the store's records of a
        // million leases, held beside the book until the kernel was reconciled, cost more than
        // the book itself, and the allocator keeps what a start used at its peak.
        let mut report = fwnp_proto::gateway::RestoreReport::default();
        // Leases of one certificate share one copy of its name, as they do while it is
        // connected.
        let mut certificates: std::collections::HashSet<
            Arc<fwnp_trust::identity::CertificateName>,
        > = std::collections::HashSet::new();
        // Room for the leases the store holds, made at once: grown lease by lease, the book
        // and the kernel elements' holders were left with room they did not use (27 bytes a
        // lease of 100,000) and freed what they outgrew behind them. A hint only: the cluster
        // store's leases are not counted here, and leases expired meanwhile are not restored.
        let expected = match self.cluster_store {
            None => usize::try_from(self.queries.live_lease_count().unwrap_or(0)).unwrap_or(0),
            Some(_) => 0,
        };
        lock(&self.core).book_mut().reserve(expected);
        lock(&self.holders).reserve(expected);
        let mut load = |record: LeaseRecord| {
            {
                let mut credentials = lock(&self.lease_credentials);
                match record.certificate {
                    Some(certificate) => {
                        let name = match certificates.get(&certificate) {
                            Some(name) => name.clone(),
                            None => {
                                let name = Arc::new(certificate);
                                certificates.insert(name.clone());
                                name
                            }
                        };
                        credentials.set(&record.identity, record.id, &name);
                    }
                    None => credentials.set_unknown(record.id),
                }
            }
            let lease = fwnp_proto::gateway::Lease {
                id: record.id,
                host: Arc::from(record.identity),
                grants: record.grants,
                lifetime: record.granted_lifetime,
                created_ms: record.created_ms,
                expires_ms: record.expires_ms,
                app: record.app.map(Box::new),
            };
            let one = lock(&self.core)
                .book_mut()
                .restore(now, std::iter::once(lease));
            report.restored += one.restored;
            report.expired.extend(one.expired);
            report.duplicates.extend(one.duplicates);
            report.over_capacity.extend(one.over_capacity);
        };
        let expired = self.leases.restore_each(now, &mut load).await?;
        drop(certificates);
        let unloaded = self.unloaded_at_restore(&report, now);
        // The kernel's timeouts count from now, not from the start of the restore: reading a
        // million leases takes seconds, by which every opening would outlive its lease.
        let now = now_ms();
        let desired: Vec<(Element, Duration)> = {
            let core = lock(&self.core);
            let book = core.book();
            let mut holders = lock(&self.holders);
            for lease in book.iter() {
                for element in elements_of_all(&lease.grants) {
                    holders
                        .get_or_default(&element)
                        .push((lease.id, lease.expires_ms));
                }
            }
            held_openings(&holders, now)
        };
        self.metrics
            .live_leases
            .set(lock(&self.core).book().len() as i64);
        info!(
            restored = report.restored,
            expired = expired.len(),
            unloaded,
            epoch = format_args!("{:016x}", self.epoch()),
            new_state = self.queries.is_new_state(),
            "leases restored"
        );
        if let Some(filter) = &self.filter {
            let changes = filter.reconcile(desired).await?;
            let mut event = AuditEvent::new(now, AuditKind::Reconcile);
            event.actor = Some("gateway".into());
            event.reason = Some(format!(
                "start: {} leases restored, {} expired while stopped, {unloaded} not restored; kernel: {} added, {} removed, {} refreshed{}",
                report.restored,
                expired.len(),
                changes.added_count,
                changes.removed.len(),
                changes.refreshed,
                if changes.table_recreated {
                    ", table created"
                } else if changes.replaced {
                    ", sets replaced whole"
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
}

#[cfg(test)]
mod tests {
    use super::{Policy, fit_reason, limiter_for};

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
