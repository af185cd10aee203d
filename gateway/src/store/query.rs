//! Read queries: leases, the audit trail, the usage report.

use std::collections::{BTreeMap, HashSet};

use fwnp_proto::{LeaseId, PortRange, Protocol};
use rusqlite::types::Value;
use rusqlite::{Connection, params_from_iter};

use super::MAX_PAGE;
use super::codec::{AUDIT_COLUMNS, LEASE_COLUMNS, audit_from_row, lease_from_row, lease_id};
use super::error::StoreError;
use super::types::{
    AuditPage, AuditQuery, AuditRecord, LeaseFilter, LeaseRecord, Order, ReportQuery, ReportRow,
    app_label,
};

/// SQL conditions joined by AND, with their numbered parameters.
struct Conditions {
    sql: Vec<String>,
    params: Vec<Value>,
}

impl Conditions {
    fn new() -> Self {
        Conditions {
            sql: Vec::new(),
            params: Vec::new(),
        }
    }

    /// Add a parameter and return its placeholder.
    fn param(&mut self, value: Value) -> String {
        self.params.push(value);
        format!("?{}", self.params.len())
    }

    fn push(&mut self, condition: String) {
        self.sql.push(condition);
    }

    fn where_clause(&self) -> String {
        if self.sql.is_empty() {
            String::new()
        } else {
            format!(" WHERE {}", self.sql.join(" AND "))
        }
    }

    /// Identity exact, or as a GLOB pattern when it holds a glob character.
    fn host(&mut self, column: &str, pattern: &str) {
        let p = self.param(Value::Text(pattern.into()));
        if pattern.contains(['*', '?', '[']) {
            self.push(format!("{column} GLOB {p}"));
        } else {
            self.push(format!("{column} = {p}"));
        }
    }
}

fn int(value: u64) -> Result<Value, StoreError> {
    i64::try_from(value)
        .map(Value::Integer)
        .map_err(|_| StoreError::InvalidInput {
            what: format!("{value} in a query (above 2^63)"),
        })
}

fn collect<T>(
    conn: &Connection,
    sql: &str,
    params: &[Value],
    op: &'static str,
    decode: fn(&rusqlite::Row<'_>) -> Result<T, StoreError>,
) -> Result<Vec<T>, StoreError> {
    let mut stmt = conn.prepare_cached(sql).map_err(StoreError::sqlite(op))?;
    let mut rows = stmt
        .query(params_from_iter(params.iter()))
        .map_err(StoreError::sqlite(op))?;
    let mut out = Vec::new();
    while let Some(row) = rows.next().map_err(StoreError::sqlite(op))? {
        out.push(decode(row)?);
    }
    Ok(out)
}

pub(crate) fn live_leases(conn: &Connection) -> Result<Vec<LeaseRecord>, StoreError> {
    let mut out = Vec::new();
    each_live_lease(conn, &mut |lease| out.push(lease))?;
    Ok(out)
}

/// Hands each live lease to `each` as its row is read, soonest expiry first, then by lease id
/// (the order of the index of live leases, leases of one expiry sorted by SQLite among
/// themselves only): a restore of a million leases never holds them all at once.
pub(crate) fn each_live_lease(
    conn: &Connection,
    each: &mut dyn FnMut(LeaseRecord),
) -> Result<(), StoreError> {
    const OP: &str = "query live leases";
    let sql =
        format!("SELECT {LEASE_COLUMNS} FROM leases WHERE state = 'live' ORDER BY expires_ms, id");
    let mut stmt = conn.prepare_cached(&sql).map_err(StoreError::sqlite(OP))?;
    let mut rows = stmt.query([]).map_err(StoreError::sqlite(OP))?;
    while let Some(row) = rows.next().map_err(StoreError::sqlite(OP))? {
        each(lease_from_row(row)?);
    }
    Ok(())
}

pub(crate) fn live_lease_count(conn: &Connection) -> Result<u64, StoreError> {
    let n: i64 = conn
        .query_row(
            "SELECT count(*) FROM leases WHERE state = 'live'",
            [],
            |r| r.get(0),
        )
        .map_err(StoreError::sqlite("count live leases"))?;
    Ok(u64::try_from(n).unwrap_or(0))
}

pub(crate) fn lease(conn: &Connection, id: LeaseId) -> Result<Option<LeaseRecord>, StoreError> {
    let sql = format!("SELECT {LEASE_COLUMNS} FROM leases WHERE id = ?1");
    let mut stmt = conn
        .prepare_cached(&sql)
        .map_err(StoreError::sqlite("query lease"))?;
    let mut rows = stmt
        .query([&id.0[..]])
        .map_err(StoreError::sqlite("query lease"))?;
    match rows.next().map_err(StoreError::sqlite("query lease"))? {
        Some(row) => lease_from_row(row).map(Some),
        None => Ok(None),
    }
}

/// A condition on a JSON grants column: some grant covers `port` (and is of `protocol`).
fn grant_condition(
    c: &mut Conditions,
    column: &str,
    port: Option<u16>,
    protocol: Option<Protocol>,
) -> Option<String> {
    let mut parts = Vec::new();
    if let Some(port) = port {
        let p = c.param(Value::Integer(i64::from(port)));
        parts.push(format!(
            "json_extract(g.value, '$.f') <= {p} AND json_extract(g.value, '$.l') >= {p}"
        ));
    }
    if let Some(protocol) = protocol {
        let p = c.param(Value::Integer(i64::from(protocol.number())));
        parts.push(format!("json_extract(g.value, '$.p') = {p}"));
    }
    if parts.is_empty() {
        return None;
    }
    Some(format!(
        "EXISTS (SELECT 1 FROM json_each({column}) AS g WHERE {})",
        parts.join(" AND ")
    ))
}

pub(crate) fn leases(
    conn: &Connection,
    filter: &LeaseFilter,
) -> Result<Vec<LeaseRecord>, StoreError> {
    let mut c = Conditions::new();
    if !filter.include_ended {
        c.push("state = 'live'".into());
    }
    if let Some(host) = &filter.host {
        c.host("identity", host);
    }
    if let Some(app) = &filter.app {
        let p = c.param(Value::Text(app.clone()));
        c.push(format!(
            "(app_name = {p} OR app_exe = {p} OR EXISTS (SELECT 1 FROM json_each(grants) AS g \
             WHERE json_extract(g.value, '$.a') = {p}))"
        ));
    }
    if let Some(cond) = grant_condition(&mut c, "grants", filter.port, filter.protocol) {
        c.push(cond);
    }
    if let Some(serial) = &filter.certificate_serial {
        let p = c.param(Value::Text(serial.as_str().to_owned()));
        c.push(format!("cert_serial = {p}"));
    }
    let mut sql = format!(
        "SELECT {LEASE_COLUMNS} FROM leases{} ORDER BY expires_ms, id",
        c.where_clause()
    );
    if let Some(limit) = filter.limit {
        let p = c.param(int(limit as u64)?);
        sql.push_str(&format!(" LIMIT {p}"));
    }
    collect(conn, &sql, &c.params, "query leases", lease_from_row)
}

pub(crate) fn audit(conn: &Connection, q: &AuditQuery) -> Result<AuditPage, StoreError> {
    let mut c = Conditions::new();
    if let Some(host) = &q.host {
        c.host("identity", host);
    }
    if let Some(app) = &q.app {
        let p = c.param(Value::Text(app.clone()));
        c.push(format!("(app_name = {p} OR app_exe = {p} OR app_id = {p})"));
    }
    if let Some(port) = q.port {
        let p = c.param(Value::Integer(i64::from(port)));
        c.push(format!(
            "((port_first <= {p} AND port_last >= {p}) OR (grants IS NOT NULL AND EXISTS \
             (SELECT 1 FROM json_each(grants) AS g WHERE json_extract(g.value, '$.f') <= {p} \
             AND json_extract(g.value, '$.l') >= {p})))"
        ));
    }
    if !q.outcomes.is_empty() {
        let ps: Vec<String> = q
            .outcomes
            .iter()
            .map(|o| c.param(Value::Text(o.name().into())))
            .collect();
        c.push(format!("outcome IN ({})", ps.join(", ")));
    }
    if !q.kinds.is_empty() {
        let ps: Vec<String> = q
            .kinds
            .iter()
            .map(|k| c.param(Value::Text(k.name().into())))
            .collect();
        c.push(format!("kind IN ({})", ps.join(", ")));
    }
    if let Some(lease) = q.lease {
        let p = c.param(Value::Blob(lease.0.to_vec()));
        c.push(format!("lease = {p}"));
    }
    if let Some(since) = q.since_ms {
        let p = c.param(int(since)?);
        c.push(format!("time_ms >= {p}"));
    }
    if let Some(until) = q.until_ms {
        let p = c.param(int(until)?);
        c.push(format!("time_ms < {p}"));
    }
    let direction = match q.order {
        Order::NewestFirst => "DESC",
        Order::OldestFirst => "ASC",
    };
    if let Some(cursor) = q.cursor {
        let p = c.param(int(cursor)?);
        match q.order {
            Order::NewestFirst => c.push(format!("id < {p}")),
            Order::OldestFirst => c.push(format!("id > {p}")),
        }
    }
    let limit = page_size(q);
    let p = c.param(int(limit as u64)?);
    let sql = format!(
        "SELECT {AUDIT_COLUMNS} FROM audit{} ORDER BY id {direction} LIMIT {p}",
        c.where_clause()
    );
    let events: Vec<AuditRecord> = collect(conn, &sql, &c.params, "query audit", audit_from_row)?;
    Ok(audit_page(events, limit))
}

/// How many events one page of `q` holds at most.
pub(crate) fn page_size(q: &AuditQuery) -> usize {
    if q.limit == 0 {
        MAX_PAGE
    } else {
        q.limit.min(MAX_PAGE)
    }
}

/// A page of `events` (at most `limit`, as many as were found): a full page has a cursor for
/// the next.
pub(crate) fn audit_page(events: Vec<AuditRecord>, limit: usize) -> AuditPage {
    let next_cursor = if events.len() == limit {
        events.last().map(|e| e.id)
    } else {
        None
    };
    AuditPage {
        events,
        next_cursor,
    }
}

/// One decided Open as the usage report counts it: an audit event of kind decision or grant,
/// with outcome granted or denied, a request and an identity, and the lease it created or
/// extended, if any (whatever the store).
#[derive(Debug, Clone)]
pub(crate) struct ReportInput {
    pub identity: String,
    pub app: Option<String>,
    pub protocol: Option<Protocol>,
    pub ports: Option<PortRange>,
    pub app_id: Option<String>,
    pub granted: bool,
    pub lease: Option<LeaseId>,
    pub lifetime_asked: Option<u32>,
    pub time_ms: u64,
    /// How long that lease was held (live leases up to the report's time).
    pub held_ms: Option<u64>,
}

type ReportKey = (
    String,
    Option<String>,
    Option<u8>,
    Option<(u16, u16)>,
    Option<String>,
);

#[derive(Default)]
struct ReportAcc {
    granted: u64,
    denied: u64,
    leases: HashSet<LeaseId>,
    held: Vec<u64>,
    max_lifetime_asked: Option<u32>,
    first_ms: u64,
    last_ms: u64,
}

pub(crate) fn report(
    conn: &Connection,
    q: &ReportQuery,
    now_ms: u64,
) -> Result<Vec<ReportRow>, StoreError> {
    const OP: &str = "query report";
    let mut c = Conditions::new();
    // An Open's answer is one event: a grant, or a decision that refused it.
    c.push("a.kind IN ('decision', 'grant')".into());
    c.push("a.outcome IN ('granted', 'denied')".into());
    c.push("a.has_request = 1".into());
    c.push("a.identity IS NOT NULL".into());
    if let Some(since) = q.since_ms {
        let p = c.param(int(since)?);
        c.push(format!("a.time_ms >= {p}"));
    }
    if let Some(until) = q.until_ms {
        let p = c.param(int(until)?);
        c.push(format!("a.time_ms < {p}"));
    }
    if let Some(host) = &q.host {
        c.host("a.identity", host);
    }
    let sql = format!(
        "SELECT a.identity, a.app_name, a.app_exe, a.protocol, a.port_first, a.port_last, a.app_id, \
         a.outcome, a.lease, a.lifetime_asked, a.time_ms, l.created_ms, l.expires_ms, l.ended_ms \
         FROM audit AS a LEFT JOIN leases AS l ON l.id = a.lease{}",
        c.where_clause()
    );
    let mut stmt = conn.prepare(&sql).map_err(StoreError::sqlite(OP))?;
    let mut rows = stmt
        .query(params_from_iter(c.params.iter()))
        .map_err(StoreError::sqlite(OP))?;
    let get = |row: &rusqlite::Row<'_>, i: usize| -> Result<Option<i64>, StoreError> {
        row.get::<_, Option<i64>>(i).map_err(StoreError::sqlite(OP))
    };
    let mut inputs = Vec::new();
    while let Some(row) = rows.next().map_err(StoreError::sqlite(OP))? {
        let identity: String = row.get(0).map_err(StoreError::sqlite(OP))?;
        let name: Option<String> = row.get(1).map_err(StoreError::sqlite(OP))?;
        let exe: Option<String> = row.get(2).map_err(StoreError::sqlite(OP))?;
        let app = app_label(Some(&fwnp_proto::AppInfo {
            name,
            executable: exe,
            uid: None,
            pid: None,
        }))
        .map(String::from);
        let protocol = get(row, 3)?
            .map(|n| {
                u8::try_from(n)
                    .ok()
                    .and_then(|n| Protocol::from_number(u64::from(n)))
                    .ok_or_else(|| StoreError::corrupt(format!("protocol number {n}")))
            })
            .transpose()?;
        let ports = match (get(row, 4)?, get(row, 5)?) {
            (Some(f), Some(l)) => Some(PortRange {
                first: u16::try_from(f).map_err(|_| StoreError::corrupt(format!("port {f}")))?,
                last: u16::try_from(l).map_err(|_| StoreError::corrupt(format!("port {l}")))?,
            }),
            _ => None,
        };
        let app_id: Option<String> = row.get(6).map_err(StoreError::sqlite(OP))?;
        let outcome: String = row.get(7).map_err(StoreError::sqlite(OP))?;
        let lease: Option<Vec<u8>> = row.get(8).map_err(StoreError::sqlite(OP))?;
        let lifetime_asked = get(row, 9)?.and_then(|v| u32::try_from(v).ok());
        let time_ms = get(row, 10)?
            .and_then(|v| u64::try_from(v).ok())
            .unwrap_or(0);
        let held_ms = match (get(row, 11)?, get(row, 12)?, get(row, 13)?) {
            (Some(created), Some(expires), ended) => {
                let end =
                    ended.unwrap_or_else(|| expires.min(i64::try_from(now_ms).unwrap_or(i64::MAX)));
                Some(u64::try_from(end.saturating_sub(created)).unwrap_or(0))
            }
            _ => None,
        };
        inputs.push(ReportInput {
            identity,
            app,
            protocol,
            ports,
            app_id,
            granted: outcome == "granted",
            lease: lease.as_deref().map(lease_id).transpose()?,
            lifetime_asked,
            time_ms,
            held_ms,
        });
    }
    Ok(aggregate_report(inputs))
}

/// The usage report's rows from a cluster's audit trail (the events of every member, as
/// published): the decided Opens in `q`'s window, counted as [`report`] counts them from a
/// database. A lease is held from its first grant until its end event (a release, expiry or
/// revocation, by whichever member), or while `live` holds it (its expiry by id) until
/// `now_ms`, at most its expiry.
pub(crate) fn report_from_events(
    events: &[crate::api::AuditEventView],
    live: &std::collections::HashMap<LeaseId, u64>,
    q: &ReportQuery,
    now_ms: u64,
) -> Vec<ReportRow> {
    let lease_of = |e: &crate::api::AuditEventView| e.lease.as_deref()?.parse::<LeaseId>().ok();
    let mut created: BTreeMap<LeaseId, u64> = BTreeMap::new();
    let mut ended: BTreeMap<LeaseId, u64> = BTreeMap::new();
    for event in events {
        let Some(lease) = lease_of(event) else {
            continue;
        };
        match (event.kind.as_str(), event.outcome.as_deref()) {
            ("grant", Some("granted")) => {
                let first = created.entry(lease).or_insert(event.time_ms);
                *first = (*first).min(event.time_ms);
            }
            ("release" | "expiry" | "revocation", _) => {
                ended.entry(lease).or_insert(event.time_ms);
            }
            _ => {}
        }
    }
    let inputs = events.iter().filter_map(|event| {
        if !matches!(event.kind.as_str(), "decision" | "grant") {
            return None;
        }
        let granted = match event.outcome.as_deref() {
            Some("granted") => true,
            Some("denied") => false,
            _ => return None,
        };
        let request = event.request.as_ref()?;
        let identity = event.identity.clone()?;
        if q.since_ms.is_some_and(|since| event.time_ms < since)
            || q.until_ms.is_some_and(|until| event.time_ms >= until)
        {
            return None;
        }
        let (protocol, ports, app_id) = match request
            .opening
            .as_deref()
            .map(str::parse::<crate::policy::Item>)
        {
            Some(Ok(crate::policy::Item::Ports { protocol, ports })) => {
                (Some(protocol), Some(ports), None)
            }
            Some(Ok(crate::policy::Item::App(id))) => (None, None, Some(id)),
            _ => (None, None, None),
        };
        let lease = lease_of(event);
        let held_ms = lease.and_then(|id| {
            let start = *created.get(&id)?;
            let end = match (ended.get(&id), live.get(&id)) {
                (Some(end), _) => *end,
                (None, Some(expires)) => (*expires).min(now_ms),
                (None, None) => return None,
            };
            Some(end.saturating_sub(start))
        });
        Some(ReportInput {
            identity,
            app: event.app.as_ref().and_then(|a| a.label()).map(String::from),
            protocol,
            ports,
            app_id,
            granted,
            lease,
            lifetime_asked: request.lifetime,
            time_ms: event.time_ms,
            held_ms,
        })
    });
    aggregate_report(inputs)
}

/// The usage report's rows from the decided Opens: one row per host, application and opening,
/// in that order.
pub(crate) fn aggregate_report(inputs: impl IntoIterator<Item = ReportInput>) -> Vec<ReportRow> {
    let mut groups: BTreeMap<ReportKey, (Option<Protocol>, ReportAcc)> = BTreeMap::new();
    for input in inputs {
        let key = (
            input.identity,
            input.app,
            input.protocol.map(|p| p.number()),
            input.ports.map(|p| (p.first, p.last)),
            input.app_id,
        );
        let (_, acc) = groups.entry(key).or_insert_with(|| {
            (
                input.protocol,
                ReportAcc {
                    first_ms: input.time_ms,
                    last_ms: input.time_ms,
                    ..ReportAcc::default()
                },
            )
        });
        acc.first_ms = acc.first_ms.min(input.time_ms);
        acc.last_ms = acc.last_ms.max(input.time_ms);
        acc.max_lifetime_asked = acc.max_lifetime_asked.max(input.lifetime_asked);
        if input.granted {
            acc.granted += 1;
            if let Some(id) = input.lease
                && acc.leases.insert(id)
                && let Some(held) = input.held_ms
            {
                acc.held.push(held);
            }
        } else {
            acc.denied += 1;
        }
    }
    groups
        .into_iter()
        .map(|((identity, app, _, ports, app_id), (protocol, mut acc))| {
            acc.held.sort_unstable();
            ReportRow {
                identity,
                app,
                protocol,
                ports: ports.map(|(first, last)| PortRange { first, last }),
                app_id,
                requests: acc.granted + acc.denied,
                granted: acc.granted,
                denied: acc.denied,
                leases: acc.leases.len() as u64,
                total_held_ms: acc.held.iter().sum(),
                median_held_ms: percentile(&acc.held, 50),
                p90_held_ms: percentile(&acc.held, 90),
                max_lifetime_asked: acc.max_lifetime_asked,
                first_ms: acc.first_ms,
                last_ms: acc.last_ms,
            }
        })
        .collect()
}

/// Nearest-rank percentile of sorted values; 0 for none.
fn percentile(sorted: &[u64], pct: usize) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = (sorted.len() * pct).div_ceil(100).max(1);
    sorted.get(rank - 1).copied().unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::{ReportQuery, percentile, report_from_events};
    use crate::api::{AuditEventView, RequestView};
    use fwnp_proto::LeaseId;
    use std::collections::HashMap;

    fn event(time_ms: u64, kind: &str, outcome: &str, lease: Option<LeaseId>) -> AuditEventView {
        let decided = matches!(kind, "grant" | "decision");
        AuditEventView {
            id: time_ms,
            time_ms,
            kind: kind.into(),
            outcome: Some(outcome.into()),
            identity: Some("fwnp://host/web-01".into()),
            peer: None,
            lease: lease.map(|l| l.to_string()),
            request: decided.then(|| RequestView {
                opening: Some("tcp/7001".into()),
                host: None,
                hosts: Vec::new(),
                remotes: Vec::new(),
                lifetime: Some(60),
            }),
            app: None,
            grants: Vec::new(),
            granted_lifetime: None,
            rule: None,
            reason: None,
            code: None,
            actor: None,
            site: Some("gw-a".into()),
        }
    }

    #[test]
    fn a_clusters_report_counts_decisions_in_the_window_and_holds_leases_until_their_end() {
        let (ended, live) = (LeaseId([1; 16]), LeaseId([2; 16]));
        let events = vec![
            event(500, "grant", "granted", Some(LeaseId([3; 16]))),
            event(1_000, "grant", "granted", Some(ended)),
            event(1_500, "decision", "denied", None),
            // The same lease granted again (a re-open) counts once, from its first grant.
            event(2_000, "grant", "granted", Some(ended)),
            event(4_000, "release", "released", Some(ended)),
            event(5_000, "grant", "granted", Some(live)),
            // After the window.
            event(9_500, "decision", "denied", None),
        ];
        let live_leases = HashMap::from([(live, 20_000)]);
        let q = ReportQuery {
            since_ms: Some(1_000),
            until_ms: Some(9_000),
            host: None,
        };
        let rows = report_from_events(&events, &live_leases, &q, 8_000);
        assert_eq!(rows.len(), 1, "{rows:?}");
        let row = &rows[0];
        assert_eq!((row.requests, row.granted, row.denied), (4, 3, 1));
        assert_eq!(row.leases, 2);
        // 3 s until the release, and the live one 3 s until now (before its expiry).
        assert_eq!(row.total_held_ms, 3_000 + 3_000);
        assert_eq!(row.max_lifetime_asked, Some(60));
        assert_eq!((row.first_ms, row.last_ms), (1_000, 5_000));
    }

    #[test]
    fn nearest_rank_percentiles() {
        assert_eq!(percentile(&[], 50), 0);
        assert_eq!(percentile(&[7], 90), 7);
        let v: Vec<u64> = (1..=10).collect();
        assert_eq!(percentile(&v, 50), 5);
        assert_eq!(percentile(&v, 90), 9);
        assert_eq!(percentile(&v, 100), 10);
    }
}
