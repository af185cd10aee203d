//! The values the store keeps and answers with.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use fwnp_proto::{
    AppInfo, Grant, LeaseId, Opening, PortRange, Prefix, Protocol, ResultCode, RevokeReason, Target,
};
use serde_json::Value;

use fwnp_trust::identity::{CertificateName, Serial};

pub use fwnp_proto::gateway::request::{LeaseEnd, LeaseState};

/// A lease to insert: everything known when it was granted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewLease {
    /// Its id.
    pub id: LeaseId,
    /// The identity of the host that holds it.
    pub identity: String,
    /// The host's address and port when it asked.
    pub peer: Option<SocketAddr>,
    /// What was granted.
    pub grants: Vec<Grant>,
    /// What the host told about the application.
    pub app: Option<AppInfo>,
    /// The lifetime asked, in seconds (`None`: the policy's default).
    pub requested_lifetime: Option<u32>,
    /// The lifetime granted, in seconds.
    pub granted_lifetime: u32,
    /// When it was granted, milliseconds since the Unix epoch.
    pub created_ms: u64,
    /// When it expires, milliseconds since the Unix epoch.
    pub expires_ms: u64,
    /// The client certificate the host asked with, as a CRL names it.
    pub certificate: Option<Arc<CertificateName>>,
    /// The most live leases the host may hold, this one included (`None`: no limit). A store
    /// shared by several gateways refuses the insert beyond it; a gateway's own store leaves the
    /// check to its lease book.
    pub max_leases: Option<u32>,
}

/// How and when a stored lease ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseEnding {
    /// How.
    pub end: LeaseEnd,
    /// When, milliseconds since the Unix epoch.
    pub ended_ms: u64,
    /// Who ended it: the host's identity, `gateway`, or the operator.
    pub by: Option<String>,
    /// Why, in words.
    pub why: Option<String>,
}

/// A lease as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseRecord {
    /// Its id.
    pub id: LeaseId,
    /// The identity of the host that holds it.
    pub identity: String,
    /// The host's address and port when it asked.
    pub peer: Option<SocketAddr>,
    /// What was granted.
    pub grants: Vec<Grant>,
    /// What the host told about the application.
    pub app: Option<AppInfo>,
    /// The lifetime asked, in seconds.
    pub requested_lifetime: Option<u32>,
    /// The lifetime granted (at the last renewal), in seconds.
    pub granted_lifetime: u32,
    /// When it was granted.
    pub created_ms: u64,
    /// When it was last renewed or extended.
    pub renewed_ms: Option<u64>,
    /// When it expires (or expired).
    pub expires_ms: u64,
    /// Where it is in its life.
    pub state: LeaseState,
    /// How it ended, once it has.
    pub ending: Option<LeaseEnding>,
    /// The client certificate that last opened or renewed it, as a CRL names it (`None` for
    /// leases stored before the gateway remembered it).
    pub certificate: Option<CertificateName>,
}

impl LeaseRecord {
    /// Milliseconds left before expiry at `now_ms`; 0 once past it or ended.
    pub fn remaining_ms(&self, now_ms: u64) -> u64 {
        if self.state == LeaseState::Live {
            self.expires_ms.saturating_sub(now_ms)
        } else {
            0
        }
    }

    /// How long the lease has been (or was) held at `now_ms`, in milliseconds.
    pub fn held_ms(&self, now_ms: u64) -> u64 {
        let end = match &self.ending {
            Some(ending) => ending.ended_ms,
            None => now_ms.min(self.expires_ms),
        };
        end.saturating_sub(self.created_ms)
    }

    /// The application's label: its name, else its executable.
    pub fn app_label(&self) -> Option<&str> {
        app_label(self.app.as_ref())
    }

    /// A JSON form for the admin API and `fwnpctl --json`.
    pub fn to_json(&self, now_ms: u64) -> Value {
        serde_json::to_value(self.view(now_ms)).unwrap_or(Value::Null)
    }

    /// The admin API's view of this lease at `now_ms`.
    pub fn view(&self, now_ms: u64) -> crate::api::LeaseView {
        let ending = self.ending.as_ref();
        crate::api::LeaseView {
            id: self.id.to_string(),
            identity: self.identity.clone(),
            peer: self.peer.map(|p| p.to_string()),
            grants: grant_views(&self.grants),
            app: self.app.as_ref().map(app_view),
            requested_lifetime: self.requested_lifetime,
            granted_lifetime: self.granted_lifetime,
            created_ms: self.created_ms,
            renewed_ms: self.renewed_ms,
            expires_ms: self.expires_ms,
            remaining_ms: self.remaining_ms(now_ms),
            state: self.state.name().to_owned(),
            // The serial an operator finds in the CA's records and revokes with `fwnpctl pki revoke`.
            certificate_serial: self
                .certificate
                .as_ref()
                .map(|c| c.serial.as_str().to_owned()),
            ended_ms: ending.map(|e| e.ended_ms),
            revoke_reason: ending.and_then(|e| match e.end {
                LeaseEnd::Revoked(reason) => Some(revoke_reason_name(reason).to_owned()),
                _ => None,
            }),
            ended_by: ending.and_then(|e| e.by.clone()),
            end_reason: ending.and_then(|e| e.why.clone()),
        }
    }
}

/// The kind of an audit event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum AuditKind {
    /// A request arrived (Open, Renew, Release, List).
    Request,
    /// An Open was refused (outcome denied), with the code, the rule and the reason.
    Decision,
    /// An Open was granted: a lease created, or a live one extended by a repeated Open. One
    /// event holds the request, the rule and reason that allowed it, and the lease's grants.
    Grant,
    /// A lease was renewed.
    Renewal,
    /// The host released a lease.
    Release,
    /// A lease expired.
    Expiry,
    /// A lease was revoked.
    Revocation,
    /// A peer failed to authenticate.
    AuthFailure,
    /// The policy was reloaded (or a reload was refused).
    PolicyReload,
    /// The kernel's filter was reconciled with the store.
    Reconcile,
}

impl AuditKind {
    /// Every kind.
    pub const ALL: [AuditKind; 10] = [
        AuditKind::Request,
        AuditKind::Decision,
        AuditKind::Grant,
        AuditKind::Renewal,
        AuditKind::Release,
        AuditKind::Expiry,
        AuditKind::Revocation,
        AuditKind::AuthFailure,
        AuditKind::PolicyReload,
        AuditKind::Reconcile,
    ];

    /// The name stored and shown.
    pub fn name(self) -> &'static str {
        match self {
            AuditKind::Request => "request",
            AuditKind::Decision => "decision",
            AuditKind::Grant => "grant",
            AuditKind::Renewal => "renewal",
            AuditKind::Release => "release",
            AuditKind::Expiry => "expiry",
            AuditKind::Revocation => "revocation",
            AuditKind::AuthFailure => "auth-failure",
            AuditKind::PolicyReload => "policy-reload",
            AuditKind::Reconcile => "reconcile",
        }
    }

    /// The kind with this name.
    pub fn from_name(name: &str) -> Option<Self> {
        AuditKind::ALL.into_iter().find(|k| k.name() == name)
    }
}

impl std::fmt::Display for AuditKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The outcome of an audit event. Expired, released and revoked are distinct.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Outcome {
    /// Granted (an Open, or a repeated Open extending a lease).
    Granted,
    /// Denied, with a result code.
    Denied,
    /// Renewed.
    Renewed,
    /// Released by the host.
    Released,
    /// Expired.
    Expired,
    /// Revoked.
    Revoked,
    /// Failed inside the gateway (the kernel or the store refused).
    Error,
}

impl Outcome {
    /// Every outcome.
    pub const ALL: [Outcome; 7] = [
        Outcome::Granted,
        Outcome::Denied,
        Outcome::Renewed,
        Outcome::Released,
        Outcome::Expired,
        Outcome::Revoked,
        Outcome::Error,
    ];

    /// The name stored and shown.
    pub fn name(self) -> &'static str {
        match self {
            Outcome::Granted => "granted",
            Outcome::Denied => "denied",
            Outcome::Renewed => "renewed",
            Outcome::Released => "released",
            Outcome::Expired => "expired",
            Outcome::Revoked => "revoked",
            Outcome::Error => "error",
        }
    }

    /// The outcome with this name.
    pub fn from_name(name: &str) -> Option<Self> {
        Outcome::ALL.into_iter().find(|o| o.name() == name)
    }
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What a request asked for, as recorded in the audit trail.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RequestSummary {
    /// The protocol, for a port opening.
    pub protocol: Option<Protocol>,
    /// The ports, for a port opening.
    pub ports: Option<PortRange>,
    /// The application id, for an application opening.
    pub app_id: Option<String>,
    /// The host addresses named; empty when the gateway chose them.
    pub hosts: Vec<IpAddr>,
    /// The remote prefixes asked for; empty means any.
    pub remotes: Vec<Prefix>,
    /// The lifetime asked, in seconds.
    pub lifetime: Option<u32>,
}

impl RequestSummary {
    /// The summary of an Open of `opening` for `lifetime` seconds.
    pub fn from_opening(opening: &Opening, lifetime: Option<u32>) -> Self {
        let (protocol, ports, app_id) = match &opening.target {
            Target::Ports { protocol, ports } => (Some(*protocol), Some(*ports), None),
            Target::App(id) => (None, None, Some(id.clone())),
        };
        RequestSummary {
            protocol,
            ports,
            app_id,
            hosts: opening.host.addresses().to_vec(),
            remotes: opening.remotes.clone(),
            lifetime,
        }
    }

    /// The opening in the command line's words: `tcp/8080`, `udp/5000-5010`, `app:https`.
    pub fn opening_label(&self) -> Option<String> {
        opening_label(self.protocol, self.ports, self.app_id.as_deref())
    }
}

/// One audit event, as the daemon records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditEvent {
    /// When, milliseconds since the Unix epoch.
    pub time_ms: u64,
    /// What happened.
    pub kind: AuditKind,
    /// How it ended, where that applies (a bare request has none).
    pub outcome: Option<Outcome>,
    /// The host's identity, once authenticated.
    pub identity: Option<String>,
    /// The peer's address and port.
    pub peer: Option<SocketAddr>,
    /// The lease concerned.
    pub lease: Option<LeaseId>,
    /// What was asked.
    pub request: Option<RequestSummary>,
    /// What the host told about the application.
    pub app: Option<AppInfo>,
    /// What was granted (grant and renewal events).
    pub grants: Vec<Grant>,
    /// The lifetime granted, in seconds.
    pub granted_lifetime: Option<u32>,
    /// The policy rule that decided.
    pub rule: Option<String>,
    /// Why, in words: policy's reason, the revocation's text, the failure.
    pub reason: Option<String>,
    /// The result code of a denial.
    pub code: Option<ResultCode>,
    /// Who acted, when not the host: `gateway`, `operator`, `policy-reload`.
    pub actor: Option<String>,
}

impl AuditEvent {
    /// An event of `kind` at `time_ms` with nothing else filled in.
    pub fn new(time_ms: u64, kind: AuditKind) -> Self {
        AuditEvent {
            time_ms,
            kind,
            outcome: None,
            identity: None,
            peer: None,
            lease: None,
            request: None,
            app: None,
            grants: Vec::new(),
            granted_lifetime: None,
            rule: None,
            reason: None,
            code: None,
            actor: None,
        }
    }

    /// The application's label: its name, else its executable.
    pub fn app_label(&self) -> Option<&str> {
        app_label(self.app.as_ref())
    }
}

/// A stored audit event with its id (increasing in commit order; never reused).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditRecord {
    /// The event's id, usable as a pagination and follow cursor.
    pub id: u64,
    /// The event.
    pub event: AuditEvent,
}

impl AuditRecord {
    /// A JSON form for the admin API and `fwnpctl audit --json`.
    pub fn to_json(&self) -> Value {
        serde_json::to_value(self.view()).unwrap_or(Value::Null)
    }

    /// The admin API's view of this event.
    pub fn view(&self) -> crate::api::AuditEventView {
        let e = &self.event;
        crate::api::AuditEventView {
            id: self.id,
            time_ms: e.time_ms,
            kind: e.kind.name().to_owned(),
            outcome: e.outcome.map(|o| o.name().to_owned()),
            identity: e.identity.clone(),
            peer: e.peer.map(|p| p.to_string()),
            lease: e.lease.map(|l| l.to_string()),
            request: e.request.as_ref().map(|request| {
                let (host, hosts) = match request.hosts.as_slice() {
                    [] => (None, Vec::new()),
                    [one] => (Some(one.to_string()), Vec::new()),
                    several => (None, several.iter().map(IpAddr::to_string).collect()),
                };
                crate::api::RequestView {
                    opening: request.opening_label(),
                    host,
                    hosts,
                    remotes: request.remotes.iter().map(|p| p.to_string()).collect(),
                    lifetime: request.lifetime,
                }
            }),
            app: e.app.as_ref().map(app_view),
            grants: grant_views(&e.grants),
            granted_lifetime: e.granted_lifetime,
            rule: e.rule.clone(),
            reason: e.reason.clone(),
            code: e.code.map(|c| c.name().to_owned()),
            actor: e.actor.clone(),
            site: None,
        }
    }
}

/// Which leases to list. The default lists live leases of every host.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LeaseFilter {
    /// The host's identity: exact, or a glob (`*`, `?`, `[...]`, as SQLite's GLOB) such as
    /// `fwnp://host/web-*`.
    pub host: Option<String>,
    /// The application: its name or executable as the host told, or a catalogue app id.
    pub app: Option<String>,
    /// A port that one of the lease's grants covers.
    pub port: Option<u16>,
    /// A protocol of one of the lease's grants (together with `port`, of the same grant).
    pub protocol: Option<Protocol>,
    /// The serial of the certificate that last opened or renewed the lease (what a CRL would
    /// revoke), of any issuer.
    pub certificate_serial: Option<Serial>,
    /// Include released, expired and revoked leases too.
    pub include_ended: bool,
    /// At most this many (all when `None`).
    pub limit: Option<usize>,
}

/// The order of audit results.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Order {
    /// Most recent first (the default for `fwnpctl audit`).
    #[default]
    NewestFirst,
    /// Oldest first (following).
    OldestFirst,
}

/// An audit query. Every filter that is set must match.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditQuery {
    /// The host's identity: exact, or a glob as in [`LeaseFilter::host`].
    pub host: Option<String>,
    /// The application: name or executable the host told, or the app id asked.
    pub app: Option<String>,
    /// A port the request asked for or a grant covered.
    pub port: Option<u16>,
    /// Only these outcomes (any when empty).
    pub outcomes: Vec<Outcome>,
    /// Only these kinds (any when empty).
    pub kinds: Vec<AuditKind>,
    /// Only events of this lease.
    pub lease: Option<LeaseId>,
    /// Events at or after this time (milliseconds since the Unix epoch).
    pub since_ms: Option<u64>,
    /// Events before this time.
    pub until_ms: Option<u64>,
    /// Continue after this event id in the chosen order (the previous page's `next_cursor`).
    pub cursor: Option<u64>,
    /// At most this many events (the store caps it at [`super::MAX_PAGE`]; 0 means the cap).
    pub limit: usize,
    /// The order.
    pub order: Order,
}

/// One page of audit events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditPage {
    /// The events, in the order asked.
    pub events: Vec<AuditRecord>,
    /// The cursor for the next page, when this one was full.
    pub next_cursor: Option<u64>,
}

/// The window and scope of a usage report.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReportQuery {
    /// Decisions at or after this time.
    pub since_ms: Option<u64>,
    /// Decisions before this time.
    pub until_ms: Option<u64>,
    /// Only this host (exact or glob).
    pub host: Option<String>,
}

/// What one host asked for one application and one opening, over the report's window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReportRow {
    /// The host's identity.
    pub identity: String,
    /// The application's name (else executable) as the host told; `None` if it told nothing.
    pub app: Option<String>,
    /// The protocol asked, for a port opening.
    pub protocol: Option<Protocol>,
    /// The ports asked, for a port opening.
    pub ports: Option<PortRange>,
    /// The application id asked, for an application opening.
    pub app_id: Option<String>,
    /// Opens decided (granted + denied).
    pub requests: u64,
    /// Opens granted.
    pub granted: u64,
    /// Opens denied.
    pub denied: u64,
    /// Distinct leases those grants created or extended.
    pub leases: u64,
    /// Time those leases were held, added up, in milliseconds.
    pub total_held_ms: u64,
    /// The median time a lease was held.
    pub median_held_ms: u64,
    /// The 90th percentile of the time a lease was held.
    pub p90_held_ms: u64,
    /// The longest lifetime asked, in seconds.
    pub max_lifetime_asked: Option<u32>,
    /// The first decision in the window.
    pub first_ms: u64,
    /// The last decision in the window.
    pub last_ms: u64,
}

impl ReportRow {
    /// The opening in the command line's words: `tcp/8080`, `app:https`.
    pub fn opening_label(&self) -> String {
        opening_label(self.protocol, self.ports, self.app_id.as_deref())
            .unwrap_or_else(|| "-".into())
    }

    /// A JSON form for the admin API and `fwnpctl report --json`.
    pub fn to_json(&self) -> Value {
        serde_json::to_value(self.view()).unwrap_or(Value::Null)
    }

    /// The admin API's view of this row.
    pub fn view(&self) -> crate::api::ReportRowView {
        crate::api::ReportRowView {
            identity: self.identity.clone(),
            app: self.app.clone(),
            opening: self.opening_label(),
            requests: self.requests,
            granted: self.granted,
            denied: self.denied,
            leases: self.leases,
            total_held_ms: self.total_held_ms,
            median_held_ms: self.median_held_ms,
            p90_held_ms: self.p90_held_ms,
            max_lifetime_asked: self.max_lifetime_asked,
            first_ms: self.first_ms,
            last_ms: self.last_ms,
        }
    }
}

pub(crate) fn opening_label(
    protocol: Option<Protocol>,
    ports: Option<PortRange>,
    app_id: Option<&str>,
) -> Option<String> {
    match (protocol, ports, app_id) {
        (Some(protocol), Some(ports), _) => Some(format!("{protocol}/{ports}")),
        (_, _, Some(app)) => Some(format!("app:{app}")),
        _ => None,
    }
}

pub(crate) fn app_label(app: Option<&AppInfo>) -> Option<&str> {
    let app = app?;
    app.name.as_deref().or(app.executable.as_deref())
}

pub(crate) fn revoke_reason_name(reason: RevokeReason) -> &'static str {
    match reason {
        RevokeReason::Operator => "operator",
        RevokeReason::PolicyChanged => "policy-changed",
        RevokeReason::CredentialRevoked => "credential-revoked",
        RevokeReason::ResourcePressure => "resource-pressure",
        _ => "other",
    }
}

fn app_view(app: &AppInfo) -> crate::api::AppView {
    crate::api::AppView {
        name: app.name.clone(),
        executable: app.executable.clone(),
        uid: app.uid,
        pid: app.pid,
    }
}

fn grant_views(grants: &[Grant]) -> Vec<crate::api::GrantView> {
    grants.iter().map(crate::api::GrantView::from).collect()
}
