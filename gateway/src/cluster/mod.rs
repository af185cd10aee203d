//! Operating a cluster of gateways on one etcd (`[store] backend = "etcd"`): who the members
//! are, the one policy they enforce, and the cluster's audit trail. The leases themselves are
//! the store's (`store::EtcdStore`); this module keeps what the operator sees of the cluster.
//!
//! # Keys (under the store's prefix `P`)
//! - `P/members/SITE`: a live member's registration (JSON: its site, QUIC addresses, version,
//!   start time, policy version and hash, the etcd revision its store last saw), attached to an
//!   etcd lease of [`MEMBER_TTL`] that the member keeps alive and rewrites every
//!   [`MEMBER_REFRESH`]: a member that dies loses the key when the lease runs out, one that
//!   stops revokes it at once.
//! - `P/sites/SITE`: the same registration without a lease, so that a member that went away
//!   is still listed, as absent, with what it last published.
//! - `P/policy`: the cluster's policy (JSON: version, SHA-256 of the text, the text, and the
//!   site and file that published it). See [`policy`].
//! - `P/audit/SITE/ID`: the audit events each member recorded (ID its local event id, 20
//!   digits), published in background batches, the newest [`audit::RETAINED_EVENTS`] kept.
//!   See [`audit`].

use std::sync::Arc;
use std::time::Duration;

use etcd_client::Client;

use crate::config::EtcdConfig;
use crate::service::Service;
use crate::store::{EtcdError, EtcdStore};

pub mod audit;
pub use audit::FollowCursor;
pub mod members;
pub mod policy;

/// How long a member's registration outlives its last keep-alive.
pub const MEMBER_TTL: Duration = Duration::from_secs(5);

/// How often a member rewrites its registration (its revision) and keeps its lease alive.
pub const MEMBER_REFRESH: Duration = Duration::from_secs(1);

/// The keys of one deployment's cluster state.
#[derive(Debug, Clone)]
pub struct ClusterKeys {
    prefix: String,
}

impl ClusterKeys {
    /// The keys under `prefix` (the store's, without a trailing `/`).
    pub fn new(prefix: &str) -> Self {
        ClusterKeys {
            prefix: prefix.to_owned(),
        }
    }
    /// `P/members/` (live registrations).
    pub fn members(&self) -> String {
        format!("{}/members/", self.prefix)
    }
    /// `P/members/SITE`.
    pub fn member(&self, site: &str) -> String {
        format!("{}/members/{site}", self.prefix)
    }
    /// `P/sites/` (every member that registered).
    pub fn sites(&self) -> String {
        format!("{}/sites/", self.prefix)
    }
    /// `P/sites/SITE`.
    pub fn site(&self, site: &str) -> String {
        format!("{}/sites/{site}", self.prefix)
    }
    /// `P/policy`.
    pub fn policy(&self) -> String {
        format!("{}/policy", self.prefix)
    }
    /// `P/audit/SITE/`.
    pub fn audit_of(&self, site: &str) -> String {
        format!("{}/audit/{site}/", self.prefix)
    }
    /// `P/audit/SITE/ID`.
    pub fn audit_event(&self, site: &str, id: u64) -> String {
        format!("{}/audit/{site}/{id:020}", self.prefix)
    }
    /// `P/leases/ID`.
    pub fn lease(&self, id: fwnp_proto::LeaseId) -> String {
        format!("{}/leases/{id}", self.prefix)
    }
}

/// This gateway as a member of its cluster: see the module documentation.
pub struct Cluster {
    client: Client,
    keys: ClusterKeys,
    site: String,
    timeout: Duration,
    store: EtcdStore,
    started_ms: u64,
    quic: Vec<String>,
    policy: policy::PolicyState,
    /// Set once the gateway stops: the registration is withdrawn and not written again.
    stopping: std::sync::atomic::AtomicBool,
    /// The revision from which the policy's watch starts (after the read at the start).
    watch_from: std::sync::atomic::AtomicI64,
    /// Told when a reload that published a version was dropped before it put the version in
    /// force: the watch, which left that version to it, reads the policy again.
    read_policy_again: tokio::sync::Notify,
    /// Told when the cluster's state was found lost or replaced: the policy's watch starts
    /// again from etcd's revision now.
    watch_policy_again: tokio::sync::Notify,
    /// Called between a publish's read of the policy and its transaction ([`Seams`]).
    ///
    /// [`Seams`]: crate::service::Seams
    publishing: Option<crate::service::Pause>,
    /// Called when the policy's watch has a version newer than the one in force, compiled,
    /// before it puts it in force ([`Seams`]).
    ///
    /// [`Seams`]: crate::service::Seams
    adopting: Option<crate::service::Pause>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("site", &self.site)
            .field("prefix", &self.keys.prefix)
            .finish_non_exhaustive()
    }
}

impl Cluster {
    /// Connects a second client to the store's cluster (the store's own runs on its thread).
    pub async fn connect(
        config: &EtcdConfig,
        store: EtcdStore,
        quic: Vec<String>,
    ) -> Result<Cluster, EtcdError> {
        let options = crate::store::connect_options(config)?;
        let client = crate::store::connect_client(config, options).await?;
        Ok(Cluster {
            client,
            keys: ClusterKeys::new(&config.prefix),
            site: config.site.clone(),
            timeout: config.timeout,
            store,
            started_ms: crate::store::now_ms(),
            quic,
            policy: policy::PolicyState::default(),
            stopping: std::sync::atomic::AtomicBool::new(false),
            watch_from: std::sync::atomic::AtomicI64::new(0),
            read_policy_again: tokio::sync::Notify::new(),
            watch_policy_again: tokio::sync::Notify::new(),
            publishing: None,
            adopting: None,
        })
    }

    /// Holds each publish of a policy at `seams.publishing`, between its read of the
    /// published policy and its transaction, and each version the watch puts in force at
    /// `seams.adopting`, between its check and the step that puts it in force.
    pub(crate) fn with_seams(mut self, seams: &crate::service::Seams) -> Cluster {
        self.publishing = seams.publishing.clone();
        self.adopting = seams.adopting.clone();
        self
    }

    /// Joins `service` to the cluster (whose policy [`Cluster::policy_before_start`] put in
    /// force): publishes the policy if none is yet, registers
    /// the member, and starts the tasks that keep the registration, follow the policy and
    /// publish the audit events. Called once, at the service's start.
    pub async fn join(self: Arc<Self>, service: &Arc<Service>) -> Result<(), ClusterError> {
        let start = self.publish_first_policy(service).await?;
        self.register().await?;
        tokio::spawn(members::keep_registered(self.clone()));
        tokio::spawn(policy::follow(self.clone(), Arc::downgrade(service), start));
        tokio::spawn(audit::publish(self.clone(), Arc::downgrade(service)));
        Ok(())
    }

    /// This gateway's site.
    pub fn site(&self) -> &str {
        &self.site
    }

    /// The etcd revision of the cluster's leases this gateway last applied to its book and
    /// kernel (its restore's, then its watch's): what its registration and status show.
    pub fn applied_revision(&self) -> i64 {
        self.store.applied_revision()
    }

    fn client(&self) -> Client {
        self.client.clone()
    }

    /// Runs one etcd request within the store's timeout.
    async fn within<T>(
        &self,
        what: &str,
        request: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, ClusterError> {
        match tokio::time::timeout(self.timeout, request).await {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(e)) => Err(ClusterError::Etcd(format!("{what}: {e}"))),
            Err(_) => Err(ClusterError::Etcd(format!(
                "{what}: no answer within {:?}",
                self.timeout
            ))),
        }
    }
}

/// Why a cluster operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ClusterError {
    /// etcd did not answer, or refused.
    #[error("etcd: {0}")]
    Etcd(String),
    /// A cluster key holds what this gateway cannot read.
    #[error("etcd key {key}: {why}")]
    Corrupt {
        /// The key.
        key: String,
        /// What is wrong with it.
        why: String,
    },
    /// Another gateway published a policy at the same moment.
    #[error("another gateway published policy version {0} meanwhile; reload again")]
    PolicyRace(u64),
    /// The cluster's policy does not compile on this gateway (a gateway of another version).
    #[error("the cluster's policy version {version} does not compile here: {error}")]
    Policy {
        /// The version.
        version: u64,
        /// The compiler's error.
        error: String,
    },
    /// This gateway's policy file cannot be read to publish it.
    #[error("policy {}: cannot be read to publish it: {error}", path.display())]
    PolicyFile {
        /// The file.
        path: std::path::PathBuf,
        /// Why.
        error: String,
    },
}

/// The SHA-256 of `text`, hex.
pub fn sha256_hex(text: &[u8]) -> String {
    ring::digest::digest(&ring::digest::SHA256, text)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

impl Cluster {
    /// The admin API's revoke of a lease of the cluster: its end is committed to the cluster's
    /// store from here (and reaches every member's book, kernel and connected host through its
    /// watch of the leases). Without the quorum the answer is
    /// [`AdminError::unavailable`](crate::api::AdminError::unavailable) and nothing changed.
    pub async fn revoke_in_store(
        &self,
        service: &Service,
        id: fwnp_proto::LeaseId,
        text: String,
    ) -> Result<crate::api::RevokeAnswer, crate::api::AdminError> {
        use crate::api::AdminError;
        let key = self.keys.lease(id);
        let not_revoked = |e: String| format!("lease {id} not revoked, nothing changed: {e}");
        let answer = self
            .within("read the lease", self.client().get(key.clone(), None))
            .await
            .map_err(|e| AdminError::unavailable(not_revoked(e.to_string())))?;
        let Some(kv) = answer.kvs().first() else {
            return Err(AdminError::not_found(format!(
                "no live lease {id} in the cluster"
            )));
        };
        let lease = crate::store::decode_lease(kv.key(), kv.value(), id)
            .map_err(|e| AdminError::internal(e.to_string()))?;
        match service.end_in_store(&lease, text).await {
            Ok(()) => Ok(crate::api::RevokeAnswer {
                revoked: id.to_string(),
                host: lease.identity,
            }),
            Err(crate::store::WriteError::Store(crate::store::StoreError::LeaseNotLive {
                ..
            })) => Err(AdminError::not_found(format!(
                "no live lease {id} in the cluster"
            ))),
            // Without the quorum, or renewed at the same moment: the same revoke may succeed
            // a moment later.
            Err(
                e @ (crate::store::WriteError::Unavailable(_)
                | crate::store::WriteError::Conflict(_)),
            ) => Err(AdminError::unavailable(not_revoked(e.to_string()))),
            Err(e) => Err(AdminError::internal(not_revoked(e.to_string()))),
        }
    }
}
