//! One policy for the cluster, kept in etcd with a version (`P/policy`).
//!
//! Why etcd rather than the same file everywhere with its hash checked: a reload through one
//! gateway must reach all of them, and a checked hash can only refuse a file that differs, not
//! bring the others the new one. So the policy a reload loads is published as the next
//! version (a transaction that takes it only if no other version came in between), and every
//! gateway watches the key and puts each newer version in force. The gateway whose reload
//! published it is the one whose file the cluster now enforces; a gateway whose own file
//! differs from the version in force says so in its log and in `status` (`file_differs`), and
//! enforces the cluster's. A gateway that finds no policy in etcd publishes its file as
//! version 1.
//!
//! Whether the watch brings a version or this gateway's reload published it, its check
//! against the version in force, its recording and its enforcement are one step, so that the
//! version in force never goes back: an older version the watch checked before a reload put
//! a newer one in force stays out, and so does a reload's own version once the watch has put
//! a newer one in force. And a version is put in force once on each gateway: the watch leaves
//! a version this gateway is publishing to its reload's step (marked before the publish's
//! transaction, whose event may come back first), unless that reload is dropped before its
//! step, when the watch reads the key again and puts the version in force itself.
//!
//! The revocations a new version causes are made by every gateway as it puts the version in
//! force, the publishing one's reload included: every gateway's book holds every lease of the
//! cluster, and each lease's end is a compare-and-swap in etcd, which the first gateway to
//! reach it commits, with its audit record, and refuses to the others (their own book,
//! kernel and hosts' notices have it already, and the winner's end reaches the rest through
//! the watch of the leases). Left to the publishing gateway alone, a version could be in
//! force everywhere while the leases it disallows stayed live, had that gateway died or its
//! reload been dropped between the publish and its revocations. A gateway revokes under a
//! version only while it is the one in force there: the watch's revocations run apart from
//! the watch, which puts a newer version in force meanwhile, and that one judges the leases
//! left. A version published in etcd but not yet brought by this gateway's watch is not
//! known here: until it is, this gateway decides, and revokes, by the version before, as its
//! Opens and Renews do.
//!
//! When the cluster's state in etcd is lost or replaced (the cluster takes a new epoch), the
//! gateways still enforce the version they had. Each puts that version back into etcd unless
//! etcd holds it or a later one (a snapshot may bring back an earlier one), and watches the key
//! again from etcd's revision now; versions then count on from the one in force.

use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use etcd_client::{Compare, CompareOp, EventType, Txn, TxnOp, WatchOptions};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::{Cluster, ClusterError, sha256_hex};
use crate::api::ClusterPolicyStatus;
use crate::policy::Policy;
use crate::service::Service;

/// `P/policy`'s value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredPolicy {
    /// 1 for the first published, one more at each reload.
    pub version: u64,
    /// The SHA-256 of `text`, hex.
    pub hash: String,
    /// The policy file's text.
    pub text: String,
    /// The site whose reload published it.
    pub site: String,
    /// The file it was read from there.
    pub file: String,
}

impl StoredPolicy {
    /// The name the policy goes by in errors, status and audit records.
    pub fn origin(&self) -> String {
        format!(
            "{} (cluster policy version {} from {})",
            self.file, self.version, self.site
        )
    }
}

/// The version in force on this gateway, and how its own file compares.
#[derive(Debug, Default)]
pub(super) struct PolicyState(Mutex<InForce>);

#[derive(Debug, Default)]
struct InForce {
    status: ClusterPolicyStatus,
    /// The version in force as it was published, to be put back into etcd if the cluster's
    /// state is lost ([`Cluster::policy_state_replaced`]).
    stored: Option<StoredPolicy>,
    /// The version this gateway is publishing, from just before its transaction until the
    /// step that puts it in force here (or until the publish is given up): the watch leaves
    /// it to that step.
    publishing: Option<u64>,
}

/// Who offers a version to [`PolicyState::put_in_force`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Offer {
    /// This gateway's publish, at its step.
    Publish,
    /// The watch, with whether the version was published through this gateway's site.
    Watch {
        /// Whether it names this gateway's site.
        own_site: bool,
    },
}

/// What became of a version offered to [`PolicyState::put_in_force`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Offered {
    /// Recorded and put in force.
    InForce,
    /// Not newer than the version in force: left out.
    NotNewer,
    /// This gateway's own version while its publish is under way: left to the publish's step.
    Publishing,
}

impl PolicyState {
    pub(super) fn status(&self) -> ClusterPolicyStatus {
        self.lock().status.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, InForce> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The version in force.
    fn version(&self) -> u64 {
        self.lock().status.version
    }

    fn set(&self, stored: &StoredPolicy, file_hash: &str) {
        Self::record(&mut self.lock(), stored, file_hash);
    }

    fn record(state: &mut InForce, stored: &StoredPolicy, file_hash: &str) {
        state.status = ClusterPolicyStatus {
            version: stored.version,
            hash: stored.hash.clone(),
            file_hash: file_hash.to_owned(),
            file_differs: stored.hash != file_hash,
        };
        state.stored = Some(stored.clone());
    }

    /// Records `version` and puts it in force with `enforce`, as one step, if it is newer than
    /// the version in force. The watch and this gateway's own publish both go through here, so
    /// that a version is put in force once on this gateway, and never after a newer one: a
    /// check made apart from the recording and the enforcement let an older version that
    /// passed it be put in force after a newer one, and the status then named the older one
    /// too. `offer` says who offers it: this gateway's publish of `version` at its step, or
    /// the watch, which leaves a version of this gateway's site to that step while the
    /// publish is under way (another site's version of the same number is the one that beat
    /// the publish). `enforce` runs under the lock, so it must not wait on anything that
    /// takes it.
    fn put_in_force(
        &self,
        stored: &StoredPolicy,
        file_hash: &str,
        offer: Offer,
        enforce: impl FnOnce(),
    ) -> Offered {
        let version = stored.version;
        let mut state = self.lock();
        let publishing = state.publishing == Some(version);
        match offer {
            Offer::Publish if publishing => state.publishing = None,
            Offer::Watch { own_site: true } if publishing => return Offered::Publishing,
            _ => {}
        }
        if version <= state.status.version {
            return Offered::NotNewer;
        }
        Self::record(&mut state, stored, file_hash);
        enforce();
        Offered::InForce
    }
}

/// A version this gateway published, for its reload to put in force
/// ([`Cluster::put_published_in_force`]). Until then the watch leaves that version to it.
/// Dropped without that step (the reload cancelled, its request dropped between the publish
/// and the step), it has the watch read the policy again and put the version in force itself,
/// with the revocations it causes.
#[derive(Debug)]
pub struct Published<'a> {
    /// The version.
    pub version: u64,
    /// The SHA-256 of its text, hex.
    pub hash: String,
    /// What was published.
    stored: StoredPolicy,
    /// Held for its drop.
    _pending: Pending<'a>,
}

/// The mark of a publish under way ([`InForce::publishing`]), taken off when dropped.
#[derive(Debug)]
struct Pending<'a> {
    cluster: &'a Cluster,
    version: u64,
    /// Whether the version may have been published, so that the watch must look again.
    may_be_published: bool,
}

impl<'a> Pending<'a> {
    fn mark(cluster: &'a Cluster, version: u64) -> Pending<'a> {
        cluster.policy.lock().publishing = Some(version);
        Pending {
            cluster,
            version,
            may_be_published: true,
        }
    }
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        let mut state = self.cluster.policy.lock();
        if state.publishing != Some(self.version) {
            // Offered by the publish's own step already.
            return;
        }
        state.publishing = None;
        drop(state);
        if self.may_be_published {
            self.cluster.read_policy_again.notify_one();
        }
    }
}

/// The hash of this gateway's own policy file ("" when it cannot be read).
fn own_file_hash(service: &Service) -> String {
    std::fs::read(&service.config.policy)
        .map(|bytes| sha256_hex(&bytes))
        .unwrap_or_default()
}

impl Cluster {
    /// Reads `P/policy` with its mod revision (0 when there is none) and the response's
    /// revision.
    async fn read_policy(&self) -> Result<(Option<StoredPolicy>, i64, i64), ClusterError> {
        let key = self.keys.policy();
        let answer = self
            .within("read the policy", self.client().get(key.clone(), None))
            .await?;
        let revision = answer.header().map_or(0, |h| h.revision());
        let Some(kv) = answer.kvs().first() else {
            return Ok((None, 0, revision));
        };
        let stored = serde_json::from_slice(kv.value()).map_err(|e| ClusterError::Corrupt {
            key,
            why: format!("not a published policy: {e}"),
        })?;
        Ok((Some(stored), kv.mod_revision(), revision))
    }

    /// Publishes `text` (read from `file` here) as the cluster's next policy version, unless
    /// another version came in between; returns the version, which is not yet in force here
    /// (see [`Cluster::put_published_in_force`]).
    pub async fn publish_policy(
        &self,
        text: &str,
        file: &str,
    ) -> Result<Published<'_>, ClusterError> {
        let (current, mod_revision, _) = self.read_policy().await?;
        let version = current.as_ref().map_or(0, |p| p.version) + 1;
        let hash = sha256_hex(text.as_bytes());
        let stored = StoredPolicy {
            version,
            hash: hash.clone(),
            text: text.to_owned(),
            site: self.site.clone(),
            file: file.to_owned(),
        };
        // Marked before the transaction: its own event may reach the watch before its answer
        // reaches this task. Another gateway's version of the same number, which beats the
        // transaction, may reach the watch meanwhile too, and is not left to this publish.
        let mut pending = Pending::mark(self, version);
        crate::service::pause_at(&self.publishing).await;
        if !self
            .put_policy_unless_changed(&stored, mod_revision)
            .await?
        {
            pending.may_be_published = false;
            return Err(ClusterError::PolicyRace(version));
        }
        info!(version, %hash, "policy published to the cluster");
        Ok(Published {
            version,
            hash,
            stored,
            _pending: pending,
        })
    }

    /// Puts `stored` as `P/policy` if the key is as it was read: absent (`mod_revision` 0) or
    /// last changed at `mod_revision`. Returns whether it was put.
    async fn put_policy_unless_changed(
        &self,
        stored: &StoredPolicy,
        mod_revision: i64,
    ) -> Result<bool, ClusterError> {
        let key = self.keys.policy();
        let unchanged = if mod_revision == 0 {
            Compare::create_revision(key.clone(), CompareOp::Equal, 0)
        } else {
            Compare::mod_revision(key.clone(), CompareOp::Equal, mod_revision)
        };
        let txn = Txn::new().when([unchanged]).and_then([TxnOp::put(
            key,
            serde_json::to_vec(stored).unwrap_or_default(),
            None,
        )]);
        let answer = self
            .within("publish the policy", self.client().txn(txn))
            .await?;
        Ok(answer.succeeded())
    }

    /// After the cluster's state was found lost or replaced (a new epoch, see
    /// [`crate::store::ClusterChange::Replaced`]): puts the version in force here back into
    /// etcd when etcd holds none or an older one (a snapshot's), and has the policy's watch
    /// start again from etcd's revision now. Versions count on from the one in force, as the
    /// gateways still enforce it: left absent, the next reload would publish version 1, which
    /// every gateway that enforces a later one leaves out, and a gateway started meanwhile
    /// would publish its own file as version 1 and enforce it alone. Every gateway does this;
    /// the first one's put stands, and one that enforced an older version takes the newer
    /// from the watch.
    pub(crate) async fn policy_state_replaced(&self) {
        self.watch_policy_again.notify_one();
        for _ in 0..crate::service::PUBLISH_ATTEMPTS {
            let Some(in_force) = self.policy.lock().stored.clone() else {
                return;
            };
            let attempt = async {
                let (current, mod_revision, _) = self.read_policy().await?;
                if current
                    .as_ref()
                    .is_some_and(|current| current.version >= in_force.version)
                {
                    return Ok(true);
                }
                self.put_policy_unless_changed(&in_force, mod_revision)
                    .await
            };
            match attempt.await {
                Ok(true) => {
                    info!(
                        version = in_force.version,
                        "the cluster's policy in etcd is the version in force here, or a later one"
                    );
                    return;
                }
                // Another gateway put its version meanwhile: compared again.
                Ok(false) => {}
                Err(e) => {
                    warn!("cluster policy: putting the version in force back into etcd: {e}");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
        warn!(
            "cluster policy: the version in force here could not be put back into etcd; it stays \
             in force here, and a reload's version is left out until it is later"
        );
    }

    /// Records the version this gateway's reload published and puts it in force here with
    /// `enforce`, as one step with the watch's own; returns false, having done nothing, when
    /// a newer version is in force already (whose enforcement revokes what it no longer
    /// allows). The watch leaves this version to this step, so it is put in force on this
    /// gateway once.
    pub fn put_published_in_force(&self, published: Published<'_>, enforce: impl FnOnce()) -> bool {
        self.policy
            .put_in_force(&published.stored, &published.hash, Offer::Publish, enforce)
            == Offered::InForce
    }

    /// The version of the cluster's policy in force on this gateway (0 before the first).
    pub fn policy_version(&self) -> u64 {
        self.policy.version()
    }

    /// Before the service starts: the cluster's published policy, compiled, when it differs
    /// from this gateway's own file (`None` when it is the same text, or none is published
    /// yet). Says plainly when the file differs; remembers the revision to watch from.
    pub async fn policy_before_start(
        &self,
        file: &std::path::Path,
    ) -> Result<Option<Policy>, ClusterError> {
        let (current, _, revision) = self.read_policy().await?;
        self.watch_from
            .store(revision + 1, std::sync::atomic::Ordering::SeqCst);
        let Some(stored) = current else {
            return Ok(None);
        };
        let file_hash = std::fs::read(file)
            .map(|bytes| sha256_hex(&bytes))
            .unwrap_or_default();
        if sha256_hex(stored.text.as_bytes()) != stored.hash {
            return Err(ClusterError::Corrupt {
                key: self.keys.policy(),
                why: "the policy's text does not match its hash".into(),
            });
        }
        self.policy.set(&stored, &file_hash);
        if stored.hash == file_hash {
            return Ok(None);
        }
        let policy =
            Policy::from_str(&stored.text, &stored.origin()).map_err(|e| ClusterError::Policy {
                version: stored.version,
                error: e.to_string(),
            })?;
        warn!(
            file = %file.display(),
            file_hash,
            version = stored.version,
            hash = %stored.hash,
            from = %stored.site,
            "this gateway's policy file differs from the cluster's policy; the cluster's is in force"
        );
        Ok(Some(policy))
    }

    /// At the start, once the service runs: publishes this gateway's file as version 1 when
    /// the cluster has no policy yet (or adopts the one another gateway published meanwhile);
    /// returns the revision to watch the key from.
    pub(super) async fn publish_first_policy(
        &self,
        service: &Arc<Service>,
    ) -> Result<i64, ClusterError> {
        let watch_from = self.watch_from.load(std::sync::atomic::Ordering::SeqCst);
        if self.policy.status().version > 0 {
            return Ok(watch_from);
        }
        let text = std::fs::read_to_string(&service.config.policy).map_err(|e| {
            ClusterError::PolicyFile {
                path: service.config.policy.clone(),
                error: e.to_string(),
            }
        })?;
        let file = service.config.policy.display().to_string();
        match self.publish_policy(&text, &file).await {
            // The file is in force since the start; the watch, which puts in force what
            // another gateway publishes, starts after this.
            Ok(published) => {
                self.put_published_in_force(published, || {});
                Ok(watch_from)
            }
            // Published by another gateway meanwhile: the watch from before brings it.
            Err(ClusterError::PolicyRace(_)) => Ok(watch_from),
            Err(e) => Err(e),
        }
    }

    /// Puts a published version in force here (if it is newer than the one in force), and
    /// says plainly when this gateway's own file differs from it.
    async fn put_in_force(
        self: &Arc<Self>,
        service: &Arc<Service>,
        stored: &StoredPolicy,
        file_hash: &str,
    ) {
        if stored.version <= self.policy.status().version {
            return;
        }
        if sha256_hex(stored.text.as_bytes()) != stored.hash {
            warn!(
                version = stored.version,
                "the cluster's policy does not match its own hash; the one in force stays"
            );
            return;
        }
        let policy = match Policy::from_str(&stored.text, &stored.origin()) {
            Ok(policy) => policy,
            Err(e) => {
                warn!(
                    version = stored.version,
                    "the cluster's policy does not compile here, the one in force stays: {e}"
                );
                return;
            }
        };
        crate::service::pause_at(&self.adopting).await;
        let why = format!(
            "cluster policy version {} from {} put in force",
            stored.version, stored.site
        );
        // Checked again with the recording and the enforcement, as one step: this gateway's
        // reload may have put a newer version in force since the check above, or be putting
        // this one, its own, in force.
        let mut enforced = None;
        let offered = self.policy.put_in_force(
            stored,
            file_hash,
            Offer::Watch {
                own_site: stored.site == self.site,
            },
            || {
                enforced = Some(service.enforce_cluster_policy(policy));
            },
        );
        let policy = match (offered, enforced) {
            (Offered::InForce, Some(policy)) => policy,
            (Offered::Publishing, _) => {
                info!(
                    version = stored.version,
                    "this gateway's reload published the version and puts it in force"
                );
                return;
            }
            _ => {
                info!(
                    version = stored.version,
                    from = %stored.site,
                    "a newer cluster policy came in force meanwhile; this one stays out"
                );
                return;
            }
        };
        if stored.hash != file_hash {
            warn!(
                file = %service.config.policy.display(),
                file_hash,
                version = stored.version,
                hash = %stored.hash,
                from = %stored.site,
                "this gateway's policy file differs from the cluster's policy; the cluster's is in force"
            );
        }
        info!(version = stored.version, from = %stored.site, "cluster policy in force");
        // Every member revokes what the version no longer allows, not its publisher alone,
        // whose reload may never get that far: etcd takes each lease's end from the first
        // member, and refuses it (with no audit record) to the others. Apart from the watch,
        // which must be free to put a newer version in force meanwhile: that one judges the
        // leases left, and this one stops revoking.
        let version = stored.version;
        let (cluster, service) = (self.clone(), service.clone());
        tokio::spawn(async move {
            service
                .revoke_for_cluster_policy(&policy, why, &|| cluster.policy.version() == version)
                .await;
        });
    }
}

/// Watches `P/policy` from `revision` and puts each newer version in force, for as long as the
/// service lives; a lost watch reads the key again and watches anew.
pub(super) async fn follow(cluster: Arc<Cluster>, service: Weak<Service>, mut revision: i64) {
    loop {
        let mut stream = match cluster
            .within(
                "watch the policy",
                cluster.client().watch(
                    cluster.keys.policy(),
                    Some(WatchOptions::new().with_start_revision(revision)),
                ),
            )
            .await
        {
            Ok(stream) => stream,
            Err(e) => {
                warn!("cluster policy: {e}");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let mut replaced = false;
        loop {
            let next = tokio::select! {
                next = stream.message() => next,
                // The cluster's state was lost or replaced: a fresh or restored etcd's revisions
                // may lie below the one this watch waits for, which it would wait for silently.
                () = cluster.watch_policy_again.notified() => {
                    replaced = true;
                    break;
                }
                // A reload that published a version was dropped before its step, which the
                // watch had left that version to.
                () = cluster.read_policy_again.notified() => {
                    let Some(service) = service.upgrade() else {
                        return;
                    };
                    match cluster.read_policy().await {
                        Ok((Some(stored), _, _)) => {
                            let file_hash = own_file_hash(&service);
                            cluster.put_in_force(&service, &stored, &file_hash).await;
                        }
                        Ok((None, _, _)) => {}
                        Err(e) => {
                            warn!("cluster policy: {e}");
                            // Not lost: read again a moment later.
                            tokio::time::sleep(Duration::from_secs(1)).await;
                            cluster.read_policy_again.notify_one();
                        }
                    }
                    continue;
                }
            };
            let message = match next {
                Ok(Some(message)) => message,
                Ok(None) => break,
                Err(e) => {
                    warn!("cluster policy watch: {e}");
                    break;
                }
            };
            if message.canceled() {
                break;
            }
            for event in message.events() {
                let Some(kv) = event.kv() else { continue };
                revision = revision.max(kv.mod_revision() + 1);
                if event.event_type() != EventType::Put {
                    continue;
                }
                let Some(service) = service.upgrade() else {
                    return;
                };
                match serde_json::from_slice::<StoredPolicy>(kv.value()) {
                    Ok(stored) => {
                        let file_hash = own_file_hash(&service);
                        cluster.put_in_force(&service, &stored, &file_hash).await;
                    }
                    Err(e) => warn!("cluster policy: not a published policy: {e}"),
                }
            }
        }
        if service.strong_count() == 0 {
            return;
        }
        // Read once more: a version published while the watch was down is not missed.
        tokio::time::sleep(Duration::from_secs(1)).await;
        match cluster.read_policy().await {
            Ok((stored, _, now)) => {
                if let (Some(stored), Some(service)) = (stored, service.upgrade()) {
                    let file_hash = own_file_hash(&service);
                    cluster.put_in_force(&service, &stored, &file_hash).await;
                }
                revision = if replaced {
                    now + 1
                } else {
                    revision.max(now + 1)
                };
            }
            Err(e) => {
                warn!("cluster policy: {e}");
                if replaced {
                    // Not lost: read again at the next turn.
                    cluster.watch_policy_again.notify_one();
                }
            }
        }
    }
}

/// Reads a published policy's value (for tests and tools reading `P/policy`).
pub fn decode(value: &[u8]) -> Result<StoredPolicy, serde_json::Error> {
    serde_json::from_slice(value)
}
