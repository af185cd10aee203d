//! The service's answers to the admin API: status, metrics, lease and audit queries, explain
//! and the usage report.

use super::*;
use crate::api::{
    AuditAnswer, AuditFollowAnswer, AuditPageAnswer, EtcdStoreStatus, FilterStatus, LeasesAnswer,
    ReportAnswer, RequestPathStatus, StatusAnswer, StoreStatus, WriterStatus,
};

pub(super) fn parse_protocol(text: &str) -> Result<fwnp_proto::Protocol, AdminError> {
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
pub(super) fn time_arg(text: &str, now_ms: u64) -> Result<u64, AdminError> {
    if let Ok(ms) = text.parse::<u64>() {
        return Ok(ms);
    }
    let ago = crate::config::parse_duration(text).map_err(AdminError::bad_request)?;
    Ok(now_ms.saturating_sub(u64::try_from(ago.as_millis()).unwrap_or(u64::MAX)))
}

impl Service {
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
    pub fn status(&self) -> StatusAnswer {
        let core = lock(&self.core);
        let book = core.book();
        let filter = self.filter.as_ref().map(|f| {
            let stats = f.stats();
            FilterStatus {
                table: self.config.filter.table.clone(),
                batches: stats.batches,
                changes: stats.changes,
                failed_changes: stats.failed_changes,
                repairs: stats.repairs,
                batch_time_us: u64::try_from(stats.total_batch_time.as_micros())
                    .unwrap_or(u64::MAX),
            }
        });
        let writer = self.queries.writer_stats();
        StatusAnswer {
            epoch: format!("{:016x}", self.epoch()),
            uptime_secs: self.started.elapsed().as_secs(),
            live_leases: book.len() as u64,
            hosts_with_leases: book.host_count() as u64,
            connections: self.sessions.count() as u64,
            policy: self.policy().origin().to_owned(),
            filter,
            store: match &self.config.store.backend {
                crate::config::StoreBackend::Etcd(etcd) => format!(
                    "etcd {} under {} as site {} (audit trail in {})",
                    etcd.endpoints.join(","),
                    etcd.prefix,
                    etcd.site,
                    self.queries.location()
                ),
                _ => self.queries.location(),
            },
            store_backend: Some(match &self.config.store.backend {
                crate::config::StoreBackend::Etcd(etcd) => {
                    let store = self.cluster_store.as_ref();
                    let counts = store.map(|s| s.counts()).unwrap_or_default();
                    let applied = store.map_or(0, |s| s.applied_revision());
                    StoreStatus::Etcd(EtcdStoreStatus {
                        endpoints: etcd.endpoints.clone(),
                        prefix: etcd.prefix.clone(),
                        site: etcd.site.clone(),
                        audit_database: self.queries.location(),
                        applied_revision: (applied > 0).then_some(applied),
                        transactions: counts.transactions,
                        conflicts: counts.conflicts,
                        unanswered: counts.unanswered,
                    })
                }
                _ => StoreStatus::Sqlite {
                    database: self.queries.location(),
                },
            }),
            // Group commit at work: operations per transaction is what keeps the store's cost
            // per grant down under load.
            store_writer: WriterStatus {
                transactions: writer.transactions,
                jobs: writer.jobs,
                ops: writer.ops,
                failed_jobs: writer.failed_jobs,
                largest_batch: writer.largest_batch,
                pending_ops: writer.pending_ops as u64,
                busy_us: writer.busy_us,
                queue_wait_us: writer.queue_wait_us,
                wal_restarts: writer.wal_restarts,
                wal_restart_us: writer.wal_restart_us,
                longest_wal_restart_us: writer.longest_wal_restart_us,
            },
            request_path: {
                let (lock_waits, lock_wait_us) = self.metrics.stage_totals(Stage::Lock);
                let (kernel_waits, kernel_wait_us) = self.metrics.stage_totals(Stage::Kernel);
                let (store_waits, store_wait_us) = self.metrics.stage_totals(Stage::Store);
                RequestPathStatus {
                    in_flight: self.metrics.requests_in_flight.get().max(0) as u64,
                    lock_waits,
                    lock_wait_us,
                    kernel_waits,
                    kernel_wait_us,
                    store_waits,
                    store_wait_us,
                    lock_wait_buckets: self.metrics.stage_buckets(Stage::Lock),
                    kernel_wait_buckets: self.metrics.stage_buckets(Stage::Kernel),
                    store_wait_buckets: self.metrics.stage_buckets(Stage::Store),
                    grant_latency_buckets: self.metrics.grant_latency_buckets(),
                }
            },
            cluster: None,
        }
    }

    /// Runs a read of the store on tokio's blocking threads: SQLite answers synchronously, and a
    /// long query (a wide audit search, a report over months) on a runtime worker would hold up
    /// the QUIC connections and timers that share it.
    pub(super) async fn read_store<T: Send + 'static>(
        &self,
        read: impl FnOnce(&dyn StoreQueries) -> Result<T, crate::store::StoreError> + Send + 'static,
    ) -> Result<T, AdminError> {
        let store = self.queries.clone();
        tokio::task::spawn_blocking(move || read(&*store))
            .await
            .map_err(|e| AdminError::internal(format!("the store read did not finish: {e}")))?
            .map_err(|e| AdminError::internal(e.to_string()))
    }

    /// The admin API's lease listing.
    pub async fn leases(
        &self,
        query: &HashMap<String, String>,
    ) -> Result<LeasesAnswer, AdminError> {
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
                Some(fwnp_trust::identity::Serial::parse(serial).ok_or_else(|| {
                    AdminError::bad_request(format!(
                        "serial {serial:?} is not a certificate serial in hexadecimal"
                    ))
                })?);
        }
        let now = now_ms();
        // With etcd, the cluster's leases, whichever gateway granted them; this gateway's own
        // database holds none.
        let leases: Vec<LeaseRecord> = match &self.cluster_store {
            Some(cluster) => cluster
                .leases(&filter)
                .await
                .map_err(|e| AdminError::internal(e.to_string()))?,
            None => self.read_store(move |store| store.leases(&filter)).await?,
        };
        Ok(LeasesAnswer {
            leases: leases.iter().map(|l| l.view(now)).collect(),
        })
    }

    /// The admin API's audit query; `wait` long-polls for events after `after`.
    pub async fn audit(&self, query: &HashMap<String, String>) -> Result<AuditAnswer, AdminError> {
        let mut q = AuditQuery::default();
        let now = now_ms();
        // A page is the cluster's trail unless `scope=local` asks for this gateway's own.
        let local_only = match query.get("scope").map(String::as_str) {
            None | Some("cluster") => false,
            Some("local") => true,
            Some(other) => {
                return Err(AdminError::bad_request(format!(
                    "scope {other:?}: expected \"cluster\" or \"local\""
                )));
            }
        };
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
            let wait = match query.get("wait") {
                Some(w) => crate::config::parse_duration(w)
                    .map_err(AdminError::bad_request)?
                    .min(Duration::from_secs(60)),
                None => Duration::ZERO,
            };
            let Ok(after) = after.parse::<u64>() else {
                let cursor = after.parse().map_err(|why| {
                    AdminError::bad_request(format!(
                        "after {after:?}: neither an event id nor a cluster's cursor: {why}"
                    ))
                })?;
                return self.follow_cluster_trail(cursor, &q, wait).await;
            };
            let mut watch = self.queries.audit_watch();
            let deadline = tokio::time::Instant::now() + wait;
            loop {
                let (query, limit) = (q.clone(), q.limit.max(1));
                let events = self
                    .read_store(move |store| store.audit_follow(after, &query, limit))
                    .await?;
                if !events.is_empty() || tokio::time::Instant::now() >= deadline {
                    let last = events.last().map_or(after, |e| e.id);
                    return Ok(AuditAnswer::Follow(AuditFollowAnswer {
                        events: events.iter().map(|e| e.view()).collect(),
                        next_after: last,
                        next_cluster_after: None,
                        unreachable: Vec::new(),
                    }));
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
        let merged = q.clone();
        let cluster = self.cluster().filter(|_| !local_only);
        // Where a follow goes on from, read before the page so that nothing falls between.
        let mut follow_from = match cluster {
            Some(cluster) => {
                let own_newest = *self.queries.audit_watch().borrow();
                cluster.follow_cursor(own_newest).await.ok()
            }
            None => None,
        };
        if cluster.is_some() {
            pause_at(&self.seams.paging).await;
        }
        let page = self.read_store(move |store| store.audit(&q)).await?;
        let mut answer = AuditPageAnswer {
            events: page.events.iter().map(|e| e.view()).collect(),
            next_cursor: page.next_cursor,
            unreachable: Vec::new(),
            follow_from: None,
        };
        // In a cluster, the page is the cluster's trail: the other members' published events
        // merged in by time (the cursor pages through this gateway's own).
        if let Some(cluster) = cluster {
            cluster.merge_audit(&merged, &mut answer).await;
        }
        // An event recorded or published between the cursor's read and the page's is in the
        // page: the follow goes on after it, not from before it, or it would be given twice.
        // A member's events come in the order of their ids, so none of that member's after the
        // cursor is left out below the newest the page holds.
        if let Some(cursor) = &mut follow_from {
            for event in &answer.events {
                if let Some(site) = &event.site {
                    cursor.advance(site, event.id);
                }
            }
        }
        answer.follow_from = follow_from.map(|cursor| cursor.to_string());
        Ok(AuditAnswer::Page(answer))
    }

    /// Follows the cluster's trail from `cursor`: every member's events after its place in
    /// it, this gateway's own from its database and the others' as they publish them, by
    /// time; waits up to `wait` for one.
    async fn follow_cluster_trail(
        &self,
        mut cursor: crate::cluster::FollowCursor,
        query: &AuditQuery,
        wait: Duration,
    ) -> Result<AuditAnswer, AdminError> {
        let cluster = self.cluster().ok_or_else(|| {
            AdminError::bad_request(
                "after: a cursor of members (SITE:ID,...) follows a cluster's trail, and this \
                 gateway is not in a cluster",
            )
        })?;
        let site = cluster.site().to_owned();
        let limit = query.limit.max(1);
        let mut watch = self.queries.audit_watch();
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let (own_query, own_after) = (query.clone(), cursor.after(&site));
            let own = self
                .read_store(move |store| store.audit_follow(own_after, &own_query, limit))
                .await?;
            let mut events: Vec<crate::api::AuditEventView> = own
                .iter()
                .map(|e| {
                    let mut view = e.view();
                    view.site = Some(site.clone());
                    view
                })
                .collect();
            if let Some(last) = events.last() {
                cursor.advance(&site, last.id);
            }
            let per_member = i64::try_from(limit).unwrap_or(i64::MAX);
            let (others, unreachable) = cluster
                .others_events_after(&mut cursor, query, per_member)
                .await;
            events.extend(others);
            if !events.is_empty() || tokio::time::Instant::now() >= deadline {
                events.sort_by(|a, b| (a.time_ms, &a.site, a.id).cmp(&(b.time_ms, &b.site, b.id)));
                return Ok(AuditAnswer::Follow(AuditFollowAnswer {
                    events,
                    next_after: cursor.after(&site),
                    next_cluster_after: Some(cursor.to_string()),
                    unreachable,
                }));
            }
            // This gateway's events are announced; the others' are read again as often as
            // their members publish.
            let _ = tokio::time::timeout_at(deadline, async {
                tokio::select! {
                    _ = watch.changed() => {}
                    () = tokio::time::sleep(crate::cluster::audit::PUBLISH_PAUSE) => {}
                }
            })
            .await;
        }
    }

    /// The stored audit events after `after`, oldest first, at most `limit`: what the audit
    /// export and the cluster's publication follow.
    pub async fn read_audit_after(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<crate::api::AuditEventView>, AdminError> {
        let events = self
            .read_store(move |store| store.audit_follow(after, &AuditQuery::default(), limit))
            .await?;
        Ok(events.iter().map(|e| e.view()).collect())
    }

    /// The admin API's explain: the decision the current policy makes for a described request.
    pub fn explain(
        &self,
        body: &crate::api::ExplainRequest,
    ) -> Result<crate::api::ExplainAnswer, AdminError> {
        let policy = self.policy();
        Ok(crate::explain::explain(&policy, body)?)
    }

    /// The admin API's usage report. In a cluster it covers every member: it is built from
    /// the cluster's audit trail (this gateway's own events, the others' as they published
    /// them), naming the members whose events may be missing.
    pub async fn report(
        &self,
        query: &HashMap<String, String>,
    ) -> Result<ReportAnswer, AdminError> {
        let now = now_ms();
        let q = ReportQuery {
            since_ms: query.get("since").map(|s| time_arg(s, now)).transpose()?,
            until_ms: query.get("until").map(|s| time_arg(s, now)).transpose()?,
            host: query.get("host").cloned(),
        };
        let (rows, unreachable) = match self.cluster() {
            Some(cluster) => self.cluster_report(cluster, &q, now).await?,
            None => (
                self.read_store(move |store| store.report(&q, now)).await?,
                Vec::new(),
            ),
        };
        let policy = self.policy();
        Ok(ReportAnswer {
            rows: rows.iter().map(|r| r.view()).collect(),
            suggested_policy: crate::report::suggest_policy(&rows, &policy),
            unreachable,
        })
    }

    /// The report's rows from the cluster's audit trail, and the members it may lack.
    async fn cluster_report(
        &self,
        cluster: &crate::cluster::Cluster,
        q: &ReportQuery,
        now: u64,
    ) -> Result<
        (
            Vec<crate::store::ReportRow>,
            Vec<crate::api::UnreachableMember>,
        ),
        AdminError,
    > {
        use crate::cluster::audit::RETAINED_EVENTS;
        // The decided Opens and the ends that tell how long their leases were held; the ends
        // of the window's leases may come after it.
        let mut events_query = AuditQuery {
            kinds: vec![
                AuditKind::Decision,
                AuditKind::Grant,
                AuditKind::Release,
                AuditKind::Expiry,
                AuditKind::Revocation,
            ],
            host: q.host.clone(),
            since_ms: q.since_ms,
            order: Order::OldestFirst,
            limit: crate::store::MAX_PAGE,
            ..AuditQuery::default()
        };
        // This gateway's own events from its database (those not published yet included), as
        // many as a member keeps in etcd.
        let mut events = Vec::new();
        loop {
            let page_query = events_query.clone();
            let page = self
                .read_store(move |store| store.audit(&page_query))
                .await?;
            events.extend(page.events.iter().map(|e| {
                let mut view = e.view();
                view.site = Some(cluster.site().to_owned());
                view
            }));
            match page.next_cursor {
                Some(cursor) if (events.len() as u64) < RETAINED_EVENTS => {
                    events_query.cursor = Some(cursor);
                }
                _ => break,
            }
        }
        events_query.cursor = None;
        let (others, unreachable) = cluster
            .others_events(&events_query, RETAINED_EVENTS as i64)
            .await;
        events.extend(others);
        let live: HashMap<LeaseId, u64> = lock(&self.core)
            .book()
            .iter()
            .map(|l| (l.id, l.expires_ms))
            .collect();
        let rows = crate::store::report_from_events(&events, &live, q, now);
        Ok((rows, unreachable))
    }
}
