//! The cluster's audit trail: each member records its decisions in its own database, as a
//! single gateway does, and publishes them to etcd (`P/audit/SITE/ID`) in background batches,
//! so that `GET /v1/audit` on any member merges every member's events by time, and a follow
//! from a cluster's cursor ([`FollowCursor`]) hands over every member's events as they are
//! published.
//!
//! Why through etcd rather than asking each member: members reach each other only through
//! etcd (their admin sockets are local), and a member that died still has its published events
//! read. The publication follows the local record as it is stored (a batch of up to [`BATCH`]
//! events per transaction) and never holds up a grant: it reads what the local database
//! already holds. A page
//! names every member whose events it may lack: a member that is not live (what it recorded
//! after its last publication is missing), or all the others when etcd cannot be read.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Weak};
use std::time::Duration;

use etcd_client::{DeleteOptions, GetOptions, SortOrder, SortTarget, Txn, TxnOp};
use tracing::warn;

use super::{Cluster, ClusterError};
use crate::api::{AuditEventView, AuditPageAnswer, UnreachableMember};
use crate::service::Service;
use crate::store::{AuditQuery, Order};

/// How many of its newest events each member keeps in etcd.
pub const RETAINED_EVENTS: u64 = 10_000;

/// The most events one publishing transaction carries (etcd takes 128 operations).
pub const BATCH: usize = 100;

/// How long the publisher waits between batches when it has nothing to publish or etcd
/// refused.
pub const PUBLISH_PAUSE: Duration = Duration::from_millis(500);

/// The most events read from one other member for a page.
const READ_PER_MEMBER: i64 = 2_000;

/// Where a follow of the cluster's trail stands: for each member (by site), the id of the last
/// of its events already handed over. In the admin API, `SITE:ID,SITE:ID`.
///
/// ```
/// use fwnp_gateway::cluster::FollowCursor;
/// let cursor: FollowCursor = "gw-a:120,gw-b:37".parse().unwrap();
/// assert_eq!(cursor.after("gw-b"), 37);
/// assert_eq!(cursor.after("gw-c"), 0);
/// assert_eq!(cursor.to_string(), "gw-a:120,gw-b:37");
/// assert!("gw-a:x".parse::<FollowCursor>().is_err());
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FollowCursor(BTreeMap<String, u64>);

impl FollowCursor {
    /// The id of the last event of `site` handed over; 0 for a member the cursor does not name
    /// (one that joined since it was made), which is followed from its oldest retained event.
    pub fn after(&self, site: &str) -> u64 {
        self.0.get(site).copied().unwrap_or(0)
    }

    /// Moves the cursor of `site` up to `id` (never back).
    pub fn advance(&mut self, site: &str, id: u64) {
        let at = self.0.entry(site.to_owned()).or_default();
        *at = (*at).max(id);
    }
}

impl std::str::FromStr for FollowCursor {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let mut cursor = BTreeMap::new();
        for entry in text.split(',') {
            let (site, id) = entry
                .split_once(':')
                .ok_or_else(|| format!("{entry:?} is not SITE:ID"))?;
            if !crate::config::valid_site(site) {
                return Err(format!("{site:?} is not a site name"));
            }
            let id = id
                .parse()
                .map_err(|_| format!("{id:?} (of {site}) is not an event id"))?;
            if cursor.insert(site.to_owned(), id).is_some() {
                return Err(format!("{site} is named twice"));
            }
        }
        Ok(FollowCursor(cursor))
    }
}

impl fmt::Display for FollowCursor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (n, (site, id)) in self.0.iter().enumerate() {
            if n > 0 {
                f.write_str(",")?;
            }
            write!(f, "{site}:{id}")?;
        }
        Ok(())
    }
}

impl Cluster {
    /// Makes this member's audit ids go on past the newest event its site has published, in
    /// the store `writer` writes: called at start, before the member records anything. A database that is not the one that published them (the state
    /// directory was replaced, or restored from a copy older than the publication) would
    /// number its events again from where it stands, under ids that followers' cursors have
    /// passed and that the site's published events already hold; its events now come after
    /// them, and the published ones stay, as they were recorded.
    pub async fn continue_audit_ids(
        &self,
        writer: &crate::store::StoreWriter,
    ) -> Result<(), crate::service::StartError> {
        // Read apart: a borrow of the watch held across the commit below would keep the writer
        // from announcing it.
        let last_used = *writer.audit_watch().borrow();
        let published = self.newest_published(&self.site).await?;
        if published <= last_used {
            return Ok(());
        }
        warn!(
            site = %self.site,
            published,
            last_used,
            "cluster audit: this site published events this database does not hold; its \
             events are numbered from {} on",
            published + 1
        );
        writer
            .commit(vec![crate::store::WriteOp::ContinueAuditIdsAfter {
                id: published,
            }])
            .await?;
        Ok(())
    }

    /// The id of the newest event `site` has published (0: none).
    async fn newest_published(&self, site: &str) -> Result<u64, ClusterError> {
        let prefix = self.keys.audit_of(site);
        let answer = self
            .within(
                "read the published audit events",
                self.client().get(
                    prefix.clone(),
                    Some(
                        GetOptions::new()
                            .with_prefix()
                            .with_sort(SortTarget::Key, SortOrder::Descend)
                            .with_limit(1)
                            .with_keys_only(),
                    ),
                ),
            )
            .await?;
        Ok(answer
            .kvs()
            .first()
            .and_then(|kv| event_id(&prefix, kv.key()))
            .unwrap_or(0))
    }

    /// Where to follow the cluster's trail from now: this member at `own_newest` (its
    /// database's newest event, which its publication may not have reached), every other
    /// member at its newest published event.
    pub async fn follow_cursor(&self, own_newest: u64) -> Result<FollowCursor, ClusterError> {
        let mut cursor = FollowCursor::default();
        cursor.advance(&self.site, own_newest);
        for member in self.members().await? {
            if member.site != self.site {
                let newest = self.newest_published(&member.site).await?;
                cursor.advance(&member.site, newest);
            }
        }
        Ok(cursor)
    }

    /// The other members' published events after `cursor` that match `query`, at most
    /// `per_member` read of each, each named with its site; the cursor moves past every event
    /// read, matching or not. Also the members whose events could not be read (all of them,
    /// `*`, when etcd cannot be read).
    pub async fn others_events_after(
        &self,
        cursor: &mut FollowCursor,
        query: &AuditQuery,
        per_member: i64,
    ) -> (Vec<AuditEventView>, Vec<UnreachableMember>) {
        let members = match self.members().await {
            Ok(members) => members,
            Err(e) => {
                let why = format!("the other members' events could not be read: {e}");
                return (
                    Vec::new(),
                    vec![UnreachableMember {
                        site: "*".into(),
                        why,
                    }],
                );
            }
        };
        let mut events = Vec::new();
        let mut unreachable = Vec::new();
        for member in members.iter().filter(|m| m.site != self.site) {
            let after = cursor.after(&member.site);
            match self.events_after(&member.site, after, per_member).await {
                Ok(read) => {
                    for event in read {
                        cursor.advance(&member.site, event.id);
                        if matches(&event, query) {
                            events.push(event);
                        }
                    }
                }
                Err(e) => unreachable.push(UnreachableMember {
                    site: member.site.clone(),
                    why: format!("its events could not be read: {e}"),
                }),
            }
        }
        (events, unreachable)
    }

    /// The published events of `site` after id `after`, oldest first, at most `limit`.
    async fn events_after(
        &self,
        site: &str,
        after: u64,
        limit: i64,
    ) -> Result<Vec<AuditEventView>, ClusterError> {
        let prefix = self.keys.audit_of(site);
        // The end of the member's range: its prefix with the final '/' raised to '0'.
        let end = format!("{}0", &prefix[..prefix.len() - 1]);
        let answer = self
            .within(
                "read a member's audit events",
                self.client().get(
                    self.keys.audit_event(site, after.saturating_add(1)),
                    Some(
                        GetOptions::new()
                            .with_range(end)
                            .with_sort(SortTarget::Key, SortOrder::Ascend)
                            .with_limit(limit),
                    ),
                ),
            )
            .await?;
        answer
            .kvs()
            .iter()
            .map(|kv| decode_event(site, kv.key(), kv.value()))
            .collect()
    }

    /// Publishes `events` in one transaction and drops this member's events beyond the
    /// retention.
    async fn publish_batch(&self, events: &[AuditEventView]) -> Result<(), ClusterError> {
        let Some(last) = events.last().map(|e| e.id) else {
            return Ok(());
        };
        let puts: Vec<TxnOp> = events
            .iter()
            .map(|e| {
                TxnOp::put(
                    self.keys.audit_event(&self.site, e.id),
                    serde_json::to_vec(e).unwrap_or_default(),
                    None,
                )
            })
            .collect();
        self.within(
            "publish audit events",
            self.client().txn(Txn::new().and_then(puts)),
        )
        .await?;
        if last > RETAINED_EVENTS {
            let from = self.keys.audit_event(&self.site, 0);
            let to = self.keys.audit_event(&self.site, last - RETAINED_EVENTS);
            self.within(
                "drop old audit events",
                self.client()
                    .delete(from, Some(DeleteOptions::new().with_range(to))),
            )
            .await?;
        }
        Ok(())
    }

    /// Merges the other members' published events matching `query` into `page` (this member's
    /// own page), by time, and names the members whose events may be missing.
    pub async fn merge_audit(&self, query: &AuditQuery, page: &mut AuditPageAnswer) {
        for event in &mut page.events {
            event.site = Some(self.site.clone());
        }
        let (others, unreachable) = self.others_events(query, READ_PER_MEMBER).await;
        page.unreachable.extend(unreachable);
        let mut merged = std::mem::take(&mut page.events);
        merged.extend(others);
        let key = |e: &AuditEventView| (e.time_ms, e.site.clone(), e.id);
        match query.order {
            Order::OldestFirst => merged.sort_by_key(key),
            _ => merged.sort_by_key(|e| std::cmp::Reverse(key(e))),
        }
        let limit = crate::store::page_size(query);
        merged.truncate(limit);
        page.events = merged;
    }

    /// The other members' published events that match `query`, at most `per_member` of the
    /// newest of each, each named with its site; and the members whose events may be missing:
    /// those that could not be read, those not live (what they recorded after their last
    /// publication), or all of them (`*`) when etcd cannot be read.
    pub async fn others_events(
        &self,
        query: &AuditQuery,
        per_member: i64,
    ) -> (Vec<AuditEventView>, Vec<UnreachableMember>) {
        let mut unreachable = Vec::new();
        let members = match self.members().await {
            Ok(members) => members,
            Err(e) => {
                unreachable.push(UnreachableMember {
                    site: "*".into(),
                    why: format!("the other members' events could not be read: {e}"),
                });
                return (Vec::new(), unreachable);
            }
        };
        let mut events = Vec::new();
        for member in members.iter().filter(|m| m.site != self.site) {
            match self.events_of(&member.site, query, per_member).await {
                Ok(found) => events.extend(found),
                Err(e) => {
                    unreachable.push(UnreachableMember {
                        site: member.site.clone(),
                        why: format!("its events could not be read: {e}"),
                    });
                    continue;
                }
            }
            if !member.live {
                unreachable.push(UnreachableMember {
                    site: member.site.clone(),
                    why: format!(
                        "absent since about {} (its registration ran out): what it recorded \
                         after its last publication is missing",
                        member.updated_ms
                    ),
                });
            }
        }
        (events, unreachable)
    }

    /// One other member's published events that match `query`, newest first.
    async fn events_of(
        &self,
        site: &str,
        query: &AuditQuery,
        limit: i64,
    ) -> Result<Vec<AuditEventView>, ClusterError> {
        let answer = self
            .within(
                "read a member's audit events",
                self.client().get(
                    self.keys.audit_of(site),
                    Some(
                        GetOptions::new()
                            .with_prefix()
                            .with_sort(SortTarget::Key, SortOrder::Descend)
                            .with_limit(limit),
                    ),
                ),
            )
            .await?;
        let mut events = Vec::new();
        for kv in answer.kvs() {
            let event = decode_event(site, kv.key(), kv.value())?;
            if matches(&event, query) {
                events.push(event);
            }
        }
        Ok(events)
    }
}

/// The id a published event's key `key` ends in, under `prefix` (`P/audit/SITE/`).
fn event_id(prefix: &str, key: &[u8]) -> Option<u64> {
    std::str::from_utf8(key.strip_prefix(prefix.as_bytes())?)
        .ok()?
        .parse()
        .ok()
}

/// A published event of `site`, named with it.
fn decode_event(site: &str, key: &[u8], value: &[u8]) -> Result<AuditEventView, ClusterError> {
    let mut event: AuditEventView =
        serde_json::from_slice(value).map_err(|e| ClusterError::Corrupt {
            key: String::from_utf8_lossy(key).into_owned(),
            why: format!("not an audit event: {e}"),
        })?;
    event.site = Some(site.to_owned());
    Ok(event)
}

/// Whether a published event passes the filters of an audit query, as the store's own query
/// would judge the event it came from.
pub fn matches(event: &AuditEventView, query: &AuditQuery) -> bool {
    if query.since_ms.is_some_and(|since| event.time_ms < since)
        || query.until_ms.is_some_and(|until| event.time_ms >= until)
    {
        return false;
    }
    if !query.kinds.is_empty() && !query.kinds.iter().any(|k| k.name() == event.kind) {
        return false;
    }
    if !query.outcomes.is_empty()
        && !query
            .outcomes
            .iter()
            .any(|o| Some(o.name()) == event.outcome.as_deref())
    {
        return false;
    }
    if let Some(lease) = query.lease
        && event.lease.as_deref() != Some(lease.to_string().as_str())
    {
        return false;
    }
    if let Some(host) = &query.host {
        let Some(identity) = &event.identity else {
            return false;
        };
        let glob = glob::Pattern::new(host).map(|p| p.matches(identity));
        if identity != host && !glob.unwrap_or(false) {
            return false;
        }
    }
    if let Some(app) = &query.app {
        let named = event.app.as_ref().is_some_and(|a| {
            a.name.as_deref() == Some(app.as_str()) || a.executable.as_deref() == Some(app.as_str())
        });
        let asked = event
            .request
            .as_ref()
            .and_then(|r| r.opening.as_deref())
            .is_some_and(|o| o == format!("app:{app}"));
        if !named && !asked {
            return false;
        }
    }
    if let Some(port) = query.port {
        let in_range = |ports: &str| match ports.split_once('-') {
            Some((low, high)) => {
                low.parse::<u16>().is_ok_and(|l| l <= port)
                    && high.parse::<u16>().is_ok_and(|h| port <= h)
            }
            None => ports.parse::<u16>().is_ok_and(|p| p == port),
        };
        let granted = event.grants.iter().any(|g| in_range(&g.ports));
        let asked = event
            .request
            .as_ref()
            .and_then(|r| r.opening.as_deref())
            .and_then(|o| o.split_once('/'))
            .is_some_and(|(_, ports)| in_range(ports));
        if !granted && !asked {
            return false;
        }
    }
    true
}

/// Publishes this member's audit events to etcd for as long as the service lives, in batches,
/// from where the last publication stopped (its database numbers its events past it: see
/// [`Cluster::continue_audit_ids`]).
pub(super) async fn publish(cluster: Arc<Cluster>, service: Weak<Service>) {
    let mut after = loop {
        match cluster.newest_published(&cluster.site).await {
            Ok(after) => break after,
            Err(e) => {
                warn!("cluster audit: {e}");
                tokio::time::sleep(PUBLISH_PAUSE).await;
            }
        }
    };
    loop {
        let Some(strong) = service.upgrade() else {
            return;
        };
        let mut watch = strong.store().audit_watch();
        let events = strong
            .read_audit_after(after, BATCH)
            .await
            .unwrap_or_else(|e| {
                warn!(
                    "cluster audit: the local trail could not be read: {}",
                    e.message
                );
                Vec::new()
            });
        drop(strong);
        if events.is_empty() {
            if let Ok(Err(_)) = tokio::time::timeout(Duration::from_secs(5), watch.changed()).await
            {
                // The store stopped announcing: look again now and then.
                tokio::time::sleep(PUBLISH_PAUSE).await;
            }
            continue;
        }
        match cluster.publish_batch(&events).await {
            Ok(()) => after = events.last().map_or(after, |e| e.id),
            Err(e) => {
                warn!("cluster audit: {e}");
                tokio::time::sleep(PUBLISH_PAUSE).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::matches;
    use crate::api::{AuditEventView, GrantView, RequestView};
    use crate::store::{AuditKind, AuditQuery, Outcome};

    fn grant() -> AuditEventView {
        serde_json::from_value(serde_json::json!({
            "id": 9, "time_ms": 1_000, "kind": "grant", "outcome": "granted",
            "identity": "fwnp://host/web-01", "lease": "00000000000000000000000000000007",
            "grants": [{"protocol": "tcp", "ports": "7000-7010", "host": "192.0.2.10"}],
            "request": {"opening": "tcp/7000-7010"}, "app": {"name": "nginx"}
        }))
        .expect("an event")
    }

    #[test]
    fn published_events_are_filtered_as_the_store_filters_its_own() {
        let event = grant();
        let q = |f: &dyn Fn(&mut AuditQuery)| {
            let mut query = AuditQuery::default();
            f(&mut query);
            matches(&event, &query)
        };
        assert!(q(&|_| {}));
        assert!(q(&|q| q.since_ms = Some(1_000)));
        assert!(!q(&|q| q.since_ms = Some(1_001)));
        assert!(!q(&|q| q.until_ms = Some(1_000)));
        assert!(q(&|q| q.until_ms = Some(1_001)));
        assert!(q(&|q| q.kinds = vec![AuditKind::Request, AuditKind::Grant]));
        assert!(!q(&|q| q.kinds = vec![AuditKind::Revocation]));
        assert!(q(&|q| q.outcomes = vec![Outcome::Granted]));
        assert!(!q(&|q| q.outcomes = vec![Outcome::Denied]));
        assert!(q(&|q| q.host = Some("fwnp://host/web-01".into())));
        assert!(q(&|q| q.host = Some("fwnp://host/web-*".into())));
        assert!(!q(&|q| q.host = Some("fwnp://host/db-*".into())));
        assert!(q(&|q| q.app = Some("nginx".into())));
        assert!(!q(&|q| q.app = Some("sshd".into())));
        assert!(q(&|q| q.port = Some(7005)));
        assert!(!q(&|q| q.port = Some(7011)));
        let lease = |n: u8| {
            let mut id = [0u8; 16];
            id[15] = n;
            fwnp_proto::LeaseId(id)
        };
        assert!(q(&|q| q.lease = Some(lease(7))));
        assert!(!q(&|q| q.lease = Some(lease(8))));
    }

    #[test]
    fn a_port_asked_but_not_granted_still_matches() {
        let mut event = grant();
        event.kind = "decision".into();
        event.outcome = Some("denied".into());
        event.grants = Vec::<GrantView>::new();
        event.request = Some(RequestView {
            opening: Some("tcp/23".into()),
            ..RequestView::default()
        });
        let query = AuditQuery {
            port: Some(23),
            ..AuditQuery::default()
        };
        assert!(matches(&event, &query));
        let query = AuditQuery {
            port: Some(22),
            ..AuditQuery::default()
        };
        assert!(!matches(&event, &query));
    }
}
