//! The admin API's requests, answers and errors as typed values, shared by the server
//! ([`crate::admin`]), its client ([`crate::admin_client`]) and `fwnpctl`. They serialize to the
//! JSON the API has always spoken, so that `curl` users and scripts reading `fwnpctl --json`
//! see no change. This module depends on nothing else of the crate (only on the protocol's types): the server maps
//! [`AdminError`] to HTTP statuses, the store and the service build the views.

use serde::{Deserialize, Serialize};

/// What kind of failure an admin request met; the server maps it to an HTTP status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdminErrorKind {
    /// A request the operator can correct (HTTP 400).
    BadRequest,
    /// Something that does not exist (HTTP 404).
    NotFound,
    /// A failure of the gateway itself (HTTP 500).
    Internal,
    /// A service the request needs does not answer now, the cluster's store without its
    /// quorum above all; nothing was changed, and the same request may succeed later (HTTP 503).
    Unavailable,
    /// The request collides with another one that changes the same thing, a policy reload
    /// published through another gateway at the same moment; nothing was changed, and the
    /// same request may succeed once the other is done (HTTP 409).
    Conflict,
}

/// An admin request that failed.
///
/// ```
/// use fwnp_gateway::api::{AdminError, AdminErrorKind};
/// let e = AdminError::not_found("no live lease 00ff");
/// assert_eq!(e.kind, AdminErrorKind::NotFound);
/// assert_eq!(e.to_string(), "no live lease 00ff");
/// ```
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct AdminError {
    /// What kind.
    pub kind: AdminErrorKind,
    /// What went wrong, for the operator.
    pub message: String,
}

impl AdminError {
    /// A request the operator can correct.
    pub fn bad_request(message: impl Into<String>) -> Self {
        AdminError {
            kind: AdminErrorKind::BadRequest,
            message: message.into(),
        }
    }

    /// Something that does not exist.
    pub fn not_found(message: impl Into<String>) -> Self {
        AdminError {
            kind: AdminErrorKind::NotFound,
            message: message.into(),
        }
    }

    /// A failure of the gateway itself.
    pub fn internal(message: impl Into<String>) -> Self {
        AdminError {
            kind: AdminErrorKind::Internal,
            message: message.into(),
        }
    }

    /// A service the request needs does not answer now; nothing was changed.
    ///
    /// ```
    /// use fwnp_gateway::api::{AdminError, AdminErrorKind};
    /// let e = AdminError::unavailable("lease 00ff not revoked: etcd has no quorum");
    /// assert_eq!(e.kind, AdminErrorKind::Unavailable);
    /// ```
    pub fn unavailable(message: impl Into<String>) -> Self {
        AdminError {
            kind: AdminErrorKind::Unavailable,
            message: message.into(),
        }
    }

    /// Another request changing the same thing is in progress; nothing was changed. (Not a
    /// reload of the same gateway: that one waits for the reload that runs.)
    ///
    /// ```
    /// use fwnp_gateway::api::{AdminError, AdminErrorKind};
    /// let e = AdminError::conflict("policy not reloaded: other gateways' reloads are in progress");
    /// assert_eq!(e.kind, AdminErrorKind::Conflict);
    /// ```
    pub fn conflict(message: impl Into<String>) -> Self {
        AdminError {
            kind: AdminErrorKind::Conflict,
            message: message.into(),
        }
    }
}

/// The body of every failed request.
///
/// ```
/// let body: fwnp_gateway::api::ErrorAnswer = serde_json::from_str(r#"{"error":"no such lease"}"#).unwrap();
/// assert_eq!(body.error, "no such lease");
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorAnswer {
    /// What went wrong.
    pub error: String,
}

/// `GET /v1/status`.
///
/// ```
/// let text = r#"{"epoch":"00000000000000ff","uptime_secs":3,"live_leases":1,"hosts_with_leases":1,
///   "connections":2,"policy":"/etc/fwnp/policy.toml","filter":null,"store":"/var/lib/fwnp/fwnp.sqlite3",
///   "store_writer":{"transactions":1,"jobs":1,"ops":2,"failed_jobs":0,"largest_batch":2,"pending_ops":0,"busy_us":10}}"#;
/// let status: fwnp_gateway::api::StatusAnswer = serde_json::from_str(text).unwrap();
/// assert_eq!(status.connections, 2);
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusAnswer {
    /// The epoch, 16 hex digits.
    pub epoch: String,
    /// Seconds since the service started.
    pub uptime_secs: u64,
    /// Live leases.
    pub live_leases: u64,
    /// Hosts holding at least one.
    pub hosts_with_leases: u64,
    /// Open connections.
    pub connections: u64,
    /// The policy file.
    pub policy: String,
    /// The kernel filter's counters; `null` when the filter is off.
    pub filter: Option<FilterStatus>,
    /// Where the leases are kept: the database file, or the etcd cluster (endpoints, key
    /// prefix, site) and the database file of this gateway's own audit trail.
    pub store: String,
    /// The store as what it is: its backend and what it holds and counts; absent from a
    /// gateway that does not report it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store_backend: Option<StoreStatus>,
    /// The store writer's counters: operations per transaction show group commit at work
    /// (with etcd, the writer of this gateway's own audit trail).
    pub store_writer: WriterStatus,
    /// Where requests wait; absent from a gateway that does not report it.
    #[serde(default)]
    pub request_path: RequestPathStatus,
    /// The cluster's members and policy, with `[store] backend = "etcd"`; absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<ClusterStatus>,
}

/// Where requests wait, in [`StatusAnswer`]: how many went through each stage and their summed
/// time there (the difference of two readings over their counts gives the mean wait of each
/// stage in between).
///
/// ```
/// let p: fwnp_gateway::api::RequestPathStatus = serde_json::from_str(
///     r#"{"in_flight":3,"lock_waits":10,"lock_wait_us":40,"kernel_waits":8,"kernel_wait_us":900,
///         "store_waits":8,"store_wait_us":1200}"#).unwrap();
/// assert_eq!(p.store_wait_us / p.store_waits, 150);
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestPathStatus {
    /// Requests received and not yet answered.
    pub in_flight: u64,
    /// Requests that took the request core's lock for the lease book.
    pub lock_waits: u64,
    /// Their time waiting for it, microseconds.
    pub lock_wait_us: u64,
    /// Kernel programmings a request waited for.
    pub kernel_waits: u64,
    /// Their time, microseconds.
    pub kernel_wait_us: u64,
    /// Store commits a request waited for.
    pub store_waits: u64,
    /// Their time, microseconds.
    pub store_wait_us: u64,
    /// How the lock waits spread (absent from a gateway that does not report it, as are the
    /// three below).
    #[serde(default)]
    pub lock_wait_buckets: TimeBuckets,
    /// How the kernel waits spread.
    #[serde(default)]
    pub kernel_wait_buckets: TimeBuckets,
    /// How the store waits spread.
    #[serde(default)]
    pub store_wait_buckets: TimeBuckets,
    /// How the grants' latency spread, from a request's arrival to its Granted answer.
    #[serde(default)]
    pub grant_latency_buckets: TimeBuckets,
}

/// How many requests took at most each of a series of times, in [`RequestPathStatus`]: the
/// cumulative buckets of a histogram, as Prometheus's `le` buckets. The difference of two
/// readings, bucket by bucket, is the spread in between, from which its quantiles follow to
/// within a bucket (the bounds double from one bucket to the next).
///
/// ```
/// let b: fwnp_gateway::api::TimeBuckets = serde_json::from_str(
///     r#"{"le_us":[100,200,400,18446744073709551615],"counts":[5,9,10,10]}"#).unwrap();
/// // 9 of the 10 took at most 200 µs; the last bound is none at all.
/// assert_eq!((b.le_us[1], b.counts[1]), (200, 9));
/// assert_eq!(b.le_us.last(), Some(&u64::MAX));
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimeBuckets {
    /// The upper bounds, microseconds, increasing; the last is `u64::MAX`, no bound.
    pub le_us: Vec<u64>,
    /// How many requests took at most each bound.
    pub counts: Vec<u64>,
}

/// Where the leases are kept, in [`StatusAnswer`], by backend.
///
/// ```
/// use fwnp_gateway::api::StoreStatus;
/// let text = r#"{"backend":"etcd","endpoints":["http://10.0.0.1:2379"],"prefix":"/fwnp",
///   "site":"gw-a","audit_database":"/var/lib/fwnp/gateway.db","applied_revision":42,
///   "transactions":10,"conflicts":1,"unanswered":0}"#;
/// let StoreStatus::Etcd(etcd) = serde_json::from_str(text).unwrap() else { panic!() };
/// assert_eq!(etcd.applied_revision, Some(42));
/// let sqlite: StoreStatus = serde_json::from_str(
///     r#"{"backend":"sqlite","database":"/var/lib/fwnp/gateway.db"}"#).unwrap();
/// assert!(matches!(sqlite, StoreStatus::Sqlite { .. }));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "backend", rename_all = "lowercase")]
#[non_exhaustive]
pub enum StoreStatus {
    /// Leases and audit trail in one SQLite database of this gateway.
    Sqlite {
        /// The database file.
        database: String,
    },
    /// Leases in an etcd cluster shared with other gateways, the audit trail in a database of
    /// this gateway.
    Etcd(EtcdStoreStatus),
}

/// The etcd store of a gateway, in [`StoreStatus`].
///
/// ```
/// let e = fwnp_gateway::api::EtcdStoreStatus { endpoints: vec!["http://10.0.0.1:2379".into()],
///     prefix: "/fwnp".into(), site: "gw-a".into(), audit_database: "/var/lib/fwnp/gateway.db".into(),
///     applied_revision: None, transactions: 0, conflicts: 0, unanswered: 0 };
/// assert_eq!(serde_json::to_value(&e).unwrap()["applied_revision"], serde_json::Value::Null);
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EtcdStoreStatus {
    /// The cluster's endpoints, as configured.
    pub endpoints: Vec<String>,
    /// The key prefix of this deployment.
    pub prefix: String,
    /// This gateway's site.
    pub site: String,
    /// The database file of this gateway's own audit trail.
    pub audit_database: String,
    /// The etcd revision of the cluster's leases this gateway last took in (its restore, then
    /// its watch); `null` before the restore.
    pub applied_revision: Option<i64>,
    /// Write transactions etcd answered, since the start.
    pub transactions: u64,
    /// Of those, the ones not applied because a key they compared had changed; retried.
    pub conflicts: u64,
    /// Write transactions sent without an answer (they may have applied).
    pub unanswered: u64,
}

/// The cluster in [`StatusAnswer`]: this gateway's site, the cluster's policy and every member
/// that ever registered, live or absent.
///
/// ```
/// let text = r#"{"site":"gw-a","revision":42,"policy":{"version":3,"hash":"ab","file_hash":"ab",
///   "file_differs":false},"members":[{"site":"gw-b","live":false,"revision":40}]}"#;
/// let c: fwnp_gateway::api::ClusterStatus = serde_json::from_str(text).unwrap();
/// assert!(!c.members[0].live);
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterStatus {
    /// This gateway's site.
    pub site: String,
    /// The etcd revision this gateway's store last saw.
    pub revision: i64,
    /// The cluster's policy and whether this gateway's own file differs from it.
    pub policy: ClusterPolicyStatus,
    /// Every member that registered, by site.
    pub members: Vec<MemberStatus>,
    /// Why the members could not be listed, when etcd did not answer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The cluster's policy as one gateway holds it.
///
/// ```
/// let p: fwnp_gateway::api::ClusterPolicyStatus = serde_json::from_str(
///     r#"{"version":2,"hash":"00","file_hash":"11","file_differs":true}"#).unwrap();
/// assert!(p.file_differs);
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterPolicyStatus {
    /// The version in force (0: none published yet).
    pub version: u64,
    /// The SHA-256 of its text, hex.
    pub hash: String,
    /// The SHA-256 of this gateway's own policy file, hex.
    pub file_hash: String,
    /// Whether this gateway's own file differs from the policy in force.
    pub file_differs: bool,
}

/// One member of the cluster.
///
/// ```
/// let m: fwnp_gateway::api::MemberStatus =
///     serde_json::from_str(r#"{"site":"gw-a","live":true,"revision":7,"policy_version":1}"#).unwrap();
/// assert_eq!((m.revision, m.policy_version), (7, 1));
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberStatus {
    /// Its site.
    pub site: String,
    /// Whether its registration is live (it kept its etcd lease alive).
    pub live: bool,
    /// Its QUIC addresses.
    #[serde(default)]
    pub quic: Vec<String>,
    /// Its software version.
    #[serde(default)]
    pub version: String,
    /// When it started, Unix ms.
    #[serde(default)]
    pub started_ms: u64,
    /// When it last wrote its registration, Unix ms.
    #[serde(default)]
    pub updated_ms: u64,
    /// The etcd revision it last applied.
    #[serde(default)]
    pub revision: i64,
    /// The version of the cluster's policy it holds.
    #[serde(default)]
    pub policy_version: u64,
    /// The hash of that policy.
    #[serde(default)]
    pub policy_hash: String,
}

/// The kernel filter's counters in [`StatusAnswer`].
///
/// ```
/// let f = fwnp_gateway::api::FilterStatus { table: "fwnp".into(), batches: 1, changes: 2,
///     failed_changes: 0, repairs: 0, batch_time_us: 50 };
/// assert_eq!(serde_json::to_value(&f).unwrap()["table"], "fwnp");
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FilterStatus {
    /// The table.
    pub table: String,
    /// Netlink batches sent.
    pub batches: u64,
    /// Element changes sent.
    pub changes: u64,
    /// Element changes the kernel refused.
    pub failed_changes: u64,
    /// Repairs after a refused batch.
    pub repairs: u64,
    /// Time spent in batches, microseconds.
    pub batch_time_us: u64,
}

/// The store writer's counters in [`StatusAnswer`].
///
/// ```
/// let w = fwnp_gateway::api::WriterStatus { transactions: 1, jobs: 2, ops: 4, failed_jobs: 0,
///     largest_batch: 4, pending_ops: 0, busy_us: 9, queue_wait_us: 30, wal_restarts: 1,
///     wal_restart_us: 2_500, longest_wal_restart_us: 2_500 };
/// assert_eq!(serde_json::to_value(&w).unwrap()["ops"], 4);
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriterStatus {
    /// Transactions committed.
    pub transactions: u64,
    /// Jobs processed.
    pub jobs: u64,
    /// Operations applied.
    pub ops: u64,
    /// Jobs that failed.
    pub failed_jobs: u64,
    /// The largest group commit, in operations.
    pub largest_batch: u64,
    /// Operations queued.
    pub pending_ops: u64,
    /// Time spent writing, microseconds.
    pub busy_us: u64,
    /// Time jobs waited in the writer's queue before their transaction began, summed,
    /// microseconds (over `jobs`: the mean wait); absent from a gateway that does not report it.
    #[serde(default)]
    pub queue_wait_us: u64,
    /// Checkpoints the writer ran between two transactions so that the SQLite WAL starts over;
    /// every commit waits for each. Absent (0) from a gateway that does not report them.
    #[serde(default)]
    pub wal_restarts: u64,
    /// Their time, summed, microseconds.
    #[serde(default)]
    pub wal_restart_us: u64,
    /// The longest of them since the gateway started, microseconds.
    #[serde(default)]
    pub longest_wal_restart_us: u64,
}

/// One grant of a lease or an audit event.
///
/// ```
/// let g: fwnp_gateway::api::GrantView =
///     serde_json::from_str(r#"{"protocol":"tcp","ports":"443","host":"192.0.2.10"}"#).unwrap();
/// assert_eq!(g.to_string(), "tcp/443 on 192.0.2.10");
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrantView {
    /// `tcp`, `udp`, ...
    pub protocol: String,
    /// `443` or `5000-5010`.
    pub ports: String,
    /// The host address.
    pub host: String,
    /// The remote prefixes; none means any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remotes: Vec<String>,
    /// The application id it came from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app: Option<String>,
}

impl From<&fwnp_proto::Grant> for GrantView {
    fn from(g: &fwnp_proto::Grant) -> Self {
        GrantView {
            protocol: g.protocol.name().to_owned(),
            ports: g.ports.to_string(),
            host: g.host.to_string(),
            remotes: g.remotes.iter().map(ToString::to_string).collect(),
            app: g.app.clone(),
        }
    }
}

impl std::fmt::Display for GrantView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{} on {}", self.protocol, self.ports, self.host)?;
        if !self.remotes.is_empty() {
            write!(f, " from {}", self.remotes.join(", "))?;
        }
        Ok(())
    }
}

/// What a host told about an application.
///
/// ```
/// let a: fwnp_gateway::api::AppView = serde_json::from_str(r#"{"executable":"/usr/sbin/nginx"}"#).unwrap();
/// assert_eq!(a.label(), Some("/usr/sbin/nginx"));
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppView {
    /// Its name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Its executable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub executable: Option<String>,
    /// Its user id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    /// Its process id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
}

impl AppView {
    /// Its name, else its executable.
    pub fn label(&self) -> Option<&str> {
        self.name.as_deref().or(self.executable.as_deref())
    }
}

/// One lease in `GET /v1/leases`.
///
/// ```
/// let text = r#"{"id":"00","identity":"fwnp://host/web-01","grants":[],"granted_lifetime":600,
///   "created_ms":1,"expires_ms":2,"remaining_ms":1,"state":"live"}"#;
/// let lease: fwnp_gateway::api::LeaseView = serde_json::from_str(text).unwrap();
/// assert_eq!(lease.state, "live");
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaseView {
    /// The lease id.
    pub id: String,
    /// The host's identity.
    pub identity: String,
    /// The host's address and port when it asked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer: Option<String>,
    /// What it grants.
    pub grants: Vec<GrantView>,
    /// The application.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app: Option<AppView>,
    /// The lifetime asked, seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requested_lifetime: Option<u32>,
    /// The lifetime granted, seconds.
    pub granted_lifetime: u32,
    /// When granted, Unix ms.
    pub created_ms: u64,
    /// When last renewed, Unix ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub renewed_ms: Option<u64>,
    /// When it expires, Unix ms.
    pub expires_ms: u64,
    /// Milliseconds left.
    pub remaining_ms: u64,
    /// `live`, `released`, `expired`, `revoked`.
    pub state: String,
    /// The serial of the certificate that last opened or renewed it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate_serial: Option<String>,
    /// When it ended, Unix ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_ms: Option<u64>,
    /// The protocol's reason of a revocation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoke_reason: Option<String>,
    /// Who ended it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ended_by: Option<String>,
    /// Why it ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_reason: Option<String>,
}

/// `GET /v1/leases`.
///
/// ```
/// let answer: fwnp_gateway::api::LeasesAnswer = serde_json::from_str(r#"{"leases":[]}"#).unwrap();
/// assert!(answer.leases.is_empty());
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeasesAnswer {
    /// The leases, soonest expiry first, then by lease id.
    pub leases: Vec<LeaseView>,
}

/// What an audited request asked.
///
/// ```
/// let r: fwnp_gateway::api::RequestView = serde_json::from_str(r#"{"opening":"tcp/8080"}"#).unwrap();
/// assert_eq!(r.opening.as_deref(), Some("tcp/8080"));
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestView {
    /// `tcp/8080`, `app:https`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub opening: Option<String>,
    /// The one host address named.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// The host addresses named, when several.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
    /// The remote prefixes asked.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub remotes: Vec<String>,
    /// The lifetime asked, seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lifetime: Option<u32>,
}

/// One event in `GET /v1/audit`.
///
/// ```
/// let e: fwnp_gateway::api::AuditEventView =
///     serde_json::from_str(r#"{"id":7,"time_ms":1,"kind":"grant","outcome":"granted"}"#).unwrap();
/// assert_eq!((e.id, e.kind.as_str()), (7, "grant"));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEventView {
    /// Its id: a cursor for paging and following.
    pub id: u64,
    /// When, Unix ms.
    pub time_ms: u64,
    /// What happened.
    pub kind: String,
    /// How it ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outcome: Option<String>,
    /// The host's identity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    /// The peer's address and port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer: Option<String>,
    /// The lease.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease: Option<String>,
    /// What was asked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request: Option<RequestView>,
    /// The application.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app: Option<AppView>,
    /// What was granted.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub grants: Vec<GrantView>,
    /// The lifetime granted, seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub granted_lifetime: Option<u32>,
    /// The policy rule that decided.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    /// Why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The result code of a denial.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    /// Who acted, when not the host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actor: Option<String>,
    /// The cluster member (site) that recorded it, in a cluster's trail.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub site: Option<String>,
}

/// `GET /v1/audit` without `after`: a page, newest first unless asked otherwise.
///
/// ```
/// let page: fwnp_gateway::api::AuditPageAnswer =
///     serde_json::from_str(r#"{"events":[],"next_cursor":null}"#).unwrap();
/// assert_eq!(page.next_cursor, None);
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditPageAnswer {
    /// The events.
    pub events: Vec<AuditEventView>,
    /// The cursor of the next page; `null` on the last.
    pub next_cursor: Option<u64>,
    /// In a cluster's trail: the members whose events could not be read, and why.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unreachable: Vec<UnreachableMember>,
    /// In a cluster's trail: where to follow the cluster's events from (`after`): for every
    /// member, the later of its newest event just before the page was read and its newest on
    /// the page (`SITE:ID,...`). An event recorded in between is on the page or in what
    /// follows, never in both.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub follow_from: Option<String>,
}

/// A member whose audit events a cluster's trail lacks.
///
/// ```
/// let u: fwnp_gateway::api::UnreachableMember =
///     serde_json::from_str(r#"{"site":"gw-b","why":"absent"}"#).unwrap();
/// assert_eq!(u.site, "gw-b");
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnreachableMember {
    /// Its site.
    pub site: String,
    /// Why its events are missing.
    pub why: String,
}

/// `GET /v1/audit`: a page, or (with `after`) what follows a cursor.
///
/// ```
/// use fwnp_gateway::api::AuditAnswer;
/// let a: AuditAnswer = serde_json::from_str(r#"{"events":[],"next_after":3}"#).unwrap();
/// assert!(matches!(a, AuditAnswer::Follow(_)));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum AuditAnswer {
    /// What follows a cursor.
    Follow(AuditFollowAnswer),
    /// A page.
    Page(AuditPageAnswer),
}

/// `GET /v1/audit?after=`: the events after a cursor, waiting up to `wait` for one. The
/// cursor is this gateway's own event id, or, to follow a cluster's trail, every member's
/// (`SITE:ID,...`, as a page's `follow_from` gives it); a member it does not name (one that
/// joined since) is followed from its oldest retained event.
///
/// ```
/// let follow: fwnp_gateway::api::AuditFollowAnswer =
///     serde_json::from_str(r#"{"events":[],"next_after":41}"#).unwrap();
/// assert_eq!(follow.next_after, 41);
/// assert_eq!(follow.next_cluster_after, None);
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditFollowAnswer {
    /// The events: this gateway's own, oldest first; in a cluster's follow, every member's
    /// (`site`), by time.
    pub events: Vec<AuditEventView>,
    /// The cursor to follow this gateway's own events from next.
    pub next_after: u64,
    /// In a cluster's follow: the cursor to follow from next (`SITE:ID,...`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_cluster_after: Option<String>,
    /// In a cluster's follow: the members whose events could not be read, and why.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unreachable: Vec<UnreachableMember>,
}

/// `POST /v1/leases/{id}/revoke`.
///
/// ```
/// let body = fwnp_gateway::api::RevokeRequest { reason: Some("maintenance".into()) };
/// assert_eq!(serde_json::to_string(&body).unwrap(), r#"{"reason":"maintenance"}"#);
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevokeRequest {
    /// Why, told to the host.
    #[serde(default)]
    pub reason: Option<String>,
}

/// The answer to a revocation.
///
/// ```
/// let a: fwnp_gateway::api::RevokeAnswer =
///     serde_json::from_str(r#"{"revoked":"00ff","host":"fwnp://host/web-01"}"#).unwrap();
/// assert_eq!(a.host, "fwnp://host/web-01");
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevokeAnswer {
    /// The lease revoked.
    pub revoked: String,
    /// Its host.
    pub host: String,
}

/// A lease a reload revoked.
///
/// ```
/// let r = fwnp_gateway::api::RevokedLease { lease: "00".into(), host: "h".into(), why: "gone".into() };
/// assert_eq!(serde_json::to_value(&r).unwrap()["why"], "gone");
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevokedLease {
    /// The lease.
    pub lease: String,
    /// Its host.
    pub host: String,
    /// Why the policy no longer allows it.
    pub why: String,
}

/// A connection a CRL reload closed.
///
/// ```
/// let c = fwnp_gateway::api::ClosedConnection { host: "h".into(), serial: "1A".into(),
///     peer: "192.0.2.10:4433".into(), leases_revoked: 2 };
/// assert_eq!(serde_json::to_value(&c).unwrap()["leases_revoked"], 2);
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClosedConnection {
    /// The host's identity.
    pub host: String,
    /// The revoked certificate's serial.
    pub serial: String,
    /// The connection's address.
    pub peer: String,
    /// Leases of the identity revoked with it.
    pub leases_revoked: u64,
}

/// What became of the TLS files in a reload: `"reloaded"`, or `{"error": ...}`.
///
/// ```
/// use fwnp_gateway::api::TlsReload;
/// assert_eq!(serde_json::to_string(&TlsReload::reloaded()).unwrap(), r#""reloaded""#);
/// let failed: TlsReload = serde_json::from_str(r#"{"error":"bad CRL"}"#).unwrap();
/// assert_eq!(failed, TlsReload::Failed { error: "bad CRL".into() });
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TlsReload {
    /// Reloaded (the text is `reloaded`).
    Done(String),
    /// Not reloaded: the old files stay in force.
    Failed {
        /// Why.
        error: String,
    },
}

impl TlsReload {
    /// The files were reloaded.
    pub fn reloaded() -> Self {
        TlsReload::Done("reloaded".into())
    }
}

/// What a policy reload did.
///
/// ```
/// let r: fwnp_gateway::api::PolicyReloaded =
///     serde_json::from_str(r#"{"policy":"p.toml","revoked":[]}"#).unwrap();
/// assert_eq!(r.policy, "p.toml");
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyReloaded {
    /// The policy file loaded.
    pub policy: String,
    /// The live leases it no longer allows, revoked.
    pub revoked: Vec<RevokedLease>,
    /// In a cluster, when another gateway's newer version was put in force here before this
    /// reload's own: the reloaded file was published but is not the policy in force, and
    /// revoked nothing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub superseded: Option<Superseded>,
}

/// A reload's published version that a newer one overtook (see [`PolicyReloaded`]).
///
/// ```
/// let r: fwnp_gateway::api::PolicyReloaded = serde_json::from_str(
///     r#"{"policy":"p.toml","revoked":[],"superseded":{"version":6,"in_force":"cluster policy version 7 from site-b"}}"#,
/// ).unwrap();
/// assert_eq!(r.superseded.unwrap().version, 6);
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Superseded {
    /// The cluster policy version the reload published.
    pub version: u64,
    /// The policy in force instead (its origin, as the status names it).
    pub in_force: String,
}

/// `POST /v1/policy/reload`.
///
/// ```
/// let a: fwnp_gateway::api::ReloadAnswer = serde_json::from_str(
///     r#"{"policy":"/etc/fwnp/policy.toml","revoked":[],"tls":"reloaded","closed_connections":[]}"#,
/// ).unwrap();
/// assert!(a.reloaded.revoked.is_empty());
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReloadAnswer {
    /// The policy loaded and what it revoked.
    #[serde(flatten)]
    pub reloaded: PolicyReloaded,
    /// What became of the TLS files and CRL.
    pub tls: TlsReload,
    /// The connections of certificates the CRL now lists, closed (when the TLS files reloaded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub closed_connections: Option<Vec<ClosedConnection>>,
}

/// One row of `GET /v1/report`.
///
/// ```
/// let text = r#"{"identity":"h","app":null,"opening":"tcp/443","requests":3,"granted":2,"denied":1,
///   "leases":2,"total_held_ms":10,"median_held_ms":5,"p90_held_ms":5,"max_lifetime_asked":null,
///   "first_ms":1,"last_ms":2}"#;
/// let row: fwnp_gateway::api::ReportRowView = serde_json::from_str(text).unwrap();
/// assert_eq!(row.denied, 1);
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReportRowView {
    /// The host's identity.
    pub identity: String,
    /// The application's label.
    pub app: Option<String>,
    /// `tcp/443`, `app:https`, or `-`.
    pub opening: String,
    /// Requests.
    pub requests: u64,
    /// Granted.
    pub granted: u64,
    /// Denied.
    pub denied: u64,
    /// Leases made.
    pub leases: u64,
    /// Time held in all, ms.
    pub total_held_ms: u64,
    /// Median time held, ms.
    pub median_held_ms: u64,
    /// 90th percentile of time held, ms.
    pub p90_held_ms: u64,
    /// The longest lifetime asked, seconds.
    pub max_lifetime_asked: Option<u32>,
    /// The first request, Unix ms.
    pub first_ms: u64,
    /// The last request, Unix ms.
    pub last_ms: u64,
}

/// `GET /v1/report`.
///
/// ```
/// let a: fwnp_gateway::api::ReportAnswer =
///     serde_json::from_str(r#"{"rows":[],"suggested_policy":""}"#).unwrap();
/// assert!(a.rows.is_empty());
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReportAnswer {
    /// The rows.
    pub rows: Vec<ReportRowView>,
    /// A policy that would allow what was asked, as TOML.
    pub suggested_policy: String,
    /// In a cluster's report: the members whose events it may lack, and why.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unreachable: Vec<UnreachableMember>,
}

/// `POST /v1/policy/explain`: a request described for the policy to judge.
///
/// ```
/// let body = fwnp_gateway::api::ExplainRequest {
///     host: "fwnp://host/web-01".into(),
///     open: "tcp/8080".into(),
///     address: Some("192.0.2.10".into()),
///     ..Default::default()
/// };
/// let json = serde_json::to_value(&body).unwrap();
/// assert_eq!(json["open"], "tcp/8080");
/// assert!(json.get("addresses").is_none());
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExplainRequest {
    /// The host's identity; required (absent or empty, the request is refused as such rather
    /// than as JSON of the wrong shape).
    #[serde(default)]
    pub host: String,
    /// What it asks to open: `tcp/8080`, `udp/5000-5010`, `app:https`; required.
    #[serde(default)]
    pub open: String,
    /// The addresses the host holds; none: it holds `address`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<String>,
    /// The host address to open; none: its first address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// The remote prefixes asked for; none means any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from: Vec<String>,
    /// The lifetime asked: seconds, or a duration such as `"10m"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lifetime: Option<LifetimeAsked>,
}

/// The lifetime an explained request asks for, as JSON may give it.
///
/// ```
/// use fwnp_gateway::api::LifetimeAsked;
/// let secs: LifetimeAsked = serde_json::from_str("600").unwrap();
/// let text: LifetimeAsked = serde_json::from_str(r#""10m""#).unwrap();
/// assert_eq!((secs, text), (LifetimeAsked::Secs(600), LifetimeAsked::Text("10m".into())));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum LifetimeAsked {
    /// A number of seconds.
    Secs(u64),
    /// A duration in FWNP's one grammar: `90s`, `10m`, `1h30m`.
    Text(String),
}

/// A policy rule named in an explanation.
///
/// ```
/// let r: fwnp_gateway::api::RuleView = serde_json::from_str(r#"{"name":"web-https","line":7}"#).unwrap();
/// assert_eq!((r.name.as_str(), r.line), ("web-https", 7));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleView {
    /// The rule's name.
    pub name: String,
    /// Its line in the policy file (1-based).
    pub line: u32,
}

/// How one step of an explanation went.
///
/// ```
/// let o: fwnp_gateway::api::StepOutcomeView = serde_json::from_str(r#""no-match""#).unwrap();
/// assert_eq!(o, fwnp_gateway::api::StepOutcomeView::NoMatch);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum StepOutcomeView {
    /// Information about the request (an application's expansion, third-party status).
    Note,
    /// The rule was considered and does not match.
    NoMatch,
    /// The rule matched and decided.
    Matched,
}

/// One step of an explanation.
///
/// ```
/// let s: fwnp_gateway::api::ExplainStep =
///     serde_json::from_str(r#"{"rule":null,"outcome":"note","detail":"third party"}"#).unwrap();
/// assert!(s.rule.is_none());
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExplainStep {
    /// The rule considered, if the step is about one.
    pub rule: Option<RuleView>,
    /// How it went.
    pub outcome: StepOutcomeView,
    /// What was checked.
    pub detail: String,
}

/// The answer to `POST /v1/policy/explain` (and `fwnpctl policy explain --policy FILE`): the
/// decision, the rule that made it, why, and each step.
///
/// ```
/// let text = r#"{"request":"fwnp://host/db-01 asks tcp/443 on 10.1.0.6","allowed":false,
///   "code":"denied-by-policy","rule":null,"reason":"no rule allows it","grants":[],
///   "lifetime":null,"steps":[],"text":"decision: denied"}"#;
/// let a: fwnp_gateway::api::ExplainAnswer = serde_json::from_str(text).unwrap();
/// assert!(!a.allowed);
/// assert_eq!(a.code.as_deref(), Some("denied-by-policy"));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExplainAnswer {
    /// The request, in words.
    pub request: String,
    /// Whether the policy allows it.
    pub allowed: bool,
    /// The denial's code (`denied-by-policy`, ...); `null` when allowed.
    pub code: Option<String>,
    /// The rule that decided; `null` for the default deny.
    pub rule: Option<RuleView>,
    /// Why.
    pub reason: String,
    /// What would be granted; empty when denied.
    pub grants: Vec<GrantView>,
    /// The lifetime that would be granted, seconds; `null` when denied.
    pub lifetime: Option<u32>,
    /// The steps, in order.
    pub steps: Vec<ExplainStep>,
    /// The whole explanation as the operator reads it.
    pub text: String,
}
