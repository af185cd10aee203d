//! The members' registrations: written by each member under an etcd lease it keeps alive, and
//! read by `GET /v1/status` on any of them.

use std::collections::BTreeMap;
use std::sync::Arc;

use etcd_client::{GetOptions, PutOptions, Txn, TxnOp};
use tracing::{info, warn};

use super::{Cluster, ClusterError, MEMBER_REFRESH, MEMBER_TTL};
use crate::api::{ClusterStatus, MemberStatus};

impl Cluster {
    /// This member's registration as it stands.
    fn registration(&self) -> MemberStatus {
        let policy = self.policy.status();
        MemberStatus {
            site: self.site.clone(),
            live: true,
            quic: self.quic.clone(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            started_ms: self.started_ms,
            updated_ms: crate::store::now_ms(),
            revision: self.applied_revision(),
            policy_version: policy.version,
            policy_hash: policy.hash,
        }
    }

    /// Grants a new etcd lease and writes the registration under it.
    pub(super) async fn register(&self) -> Result<i64, ClusterError> {
        let ttl = i64::try_from(MEMBER_TTL.as_secs()).unwrap_or(5);
        let lease = self
            .within(
                "grant the member's lease",
                self.client().lease_grant(ttl, None),
            )
            .await?
            .id();
        self.write_registration(lease).await?;
        info!(site = %self.site, "registered in the cluster");
        Ok(lease)
    }

    /// Writes `P/members/SITE` (under `lease`) and `P/sites/SITE` in one transaction.
    async fn write_registration(&self, lease: i64) -> Result<(), ClusterError> {
        let value = serde_json::to_vec(&self.registration()).unwrap_or_default();
        let txn = Txn::new().and_then([
            TxnOp::put(
                self.keys.member(&self.site),
                value.clone(),
                Some(PutOptions::new().with_lease(lease)),
            ),
            TxnOp::put(self.keys.site(&self.site), value, None),
        ]);
        self.within("write the registration", self.client().txn(txn))
            .await
            .map(|_| ())
    }

    /// The members as the cluster lists them, for the admin API's status.
    pub async fn status(&self) -> ClusterStatus {
        let policy = self.policy.status();
        let members = self.members().await;
        let (members, error) = match members {
            Ok(members) => (members, None),
            Err(e) => (Vec::new(), Some(e.to_string())),
        };
        ClusterStatus {
            site: self.site.clone(),
            revision: self.applied_revision(),
            policy,
            members,
            error,
        }
    }

    /// Every member that registered, by site, live or absent.
    pub async fn members(&self) -> Result<Vec<MemberStatus>, ClusterError> {
        let mut by_site: BTreeMap<String, MemberStatus> = BTreeMap::new();
        for (prefix, live) in [(self.keys.sites(), false), (self.keys.members(), true)] {
            let answer = self
                .within(
                    "list the members",
                    self.client()
                        .get(prefix.clone(), Some(GetOptions::new().with_prefix())),
                )
                .await?;
            for kv in answer.kvs() {
                let mut member: MemberStatus =
                    serde_json::from_slice(kv.value()).map_err(|e| ClusterError::Corrupt {
                        key: String::from_utf8_lossy(kv.key()).into_owned(),
                        why: format!("not a member's registration: {e}"),
                    })?;
                member.live = live;
                by_site.insert(member.site.clone(), member);
            }
        }
        Ok(by_site.into_values().collect())
    }

    /// Withdraws the registration at once (a stopping gateway), so that the others list it as
    /// absent without waiting for its lease to run out.
    pub async fn withdraw(&self) {
        self.stopping
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let key = self.keys.member(&self.site);
        if let Err(e) = self
            .within("withdraw the registration", self.client().delete(key, None))
            .await
        {
            warn!("cluster: {e}");
        }
    }
}

/// Keeps the registration alive and up to date for as long as the gateway runs; a lease lost
/// while etcd was out of reach is granted anew.
pub(super) async fn keep_registered(cluster: Arc<Cluster>) {
    let mut lease: Option<i64> = None;
    let mut tick = tokio::time::interval(MEMBER_REFRESH);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if cluster.stopping.load(std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        let result = match lease {
            None => cluster.register().await.map(|id| lease = Some(id)),
            Some(id) => {
                let kept = cluster
                    .within("keep the member's lease alive", async {
                        let (mut keeper, mut answers) =
                            cluster.client().lease_keep_alive(id).await?;
                        keeper.keep_alive().await?;
                        answers.message().await
                    })
                    .await;
                match kept {
                    // A TTL of 0: the lease ran out while etcd could not be reached.
                    Ok(Some(answer)) if answer.ttl() > 0 => cluster.write_registration(id).await,
                    Ok(_) => {
                        lease = None;
                        Err(ClusterError::Etcd("the member's lease ran out".into()))
                    }
                    Err(e) => Err(e),
                }
            }
        };
        if let Err(e) = result {
            warn!(site = %cluster.site, "cluster registration: {e}");
        }
    }
}
