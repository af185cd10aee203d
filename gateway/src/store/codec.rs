//! How values are laid out in columns, and the strict way back: every decode failure of a
//! stored value is a [`StoreError::Corrupt`], never a panic.
//!
//! Grants are a compact JSON array, one object per grant, with one-letter keys so that a lease
//! row stays small and SQLite's JSON functions can still filter on them:
//! `[{"p":6,"f":443,"l":443,"h":"192.0.2.7","r":["198.51.100.0/24"],"a":"https"}]`
//! (`p` protocol number, `f`/`l` first and last port, `h` host address, `r` remote prefixes,
//! omitted when empty, `a` the application id, omitted when none).

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};

use fwnp_proto::{AppInfo, Grant, LeaseId, PortRange, Prefix, Protocol, ResultCode, RevokeReason};
use rusqlite::Row;
use serde::{Deserialize, Serialize};

use super::error::StoreError;
use super::types::{
    AuditEvent, AuditKind, AuditRecord, LeaseEnd, LeaseEnding, LeaseRecord, LeaseState, Outcome,
    RequestSummary,
};
use fwnp_trust::identity::{CertificateName, Serial};

/// A grant as read back; [`GrantOut`] writes it.
#[derive(Deserialize)]
struct GrantForm<'a> {
    p: u8,
    f: u16,
    l: u16,
    h: IpAddr,
    #[serde(default)]
    r: Vec<String>,
    #[serde(default, borrow)]
    a: Option<std::borrow::Cow<'a, str>>,
}

pub(crate) fn encode_grants(grants: &[Grant]) -> String {
    let mut text = String::new();
    encode_grants_into(grants, &mut text);
    text
}

/// [`encode_grants`] into `text`, replacing what it held and keeping its allocation: the store
/// writer encodes every grant's text into one buffer.
pub(crate) fn encode_grants_into(grants: &[Grant], text: &mut String) {
    let mut bytes = std::mem::take(text).into_bytes();
    bytes.clear();
    // Serialising numbers and strings into memory cannot fail, and serde_json writes UTF-8.
    let written = serde_json::to_writer(&mut bytes, &GrantsOut(grants));
    *text = match (written, String::from_utf8(bytes)) {
        (Ok(()), Ok(done)) => done,
        _ => "[]".into(),
    };
}

/// The grants as [`GrantForm`]s, serialised one by one with no list of forms in between.
struct GrantsOut<'a>(&'a [Grant]);

impl Serialize for GrantsOut<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(self.0.iter().map(|g| GrantOut {
            p: g.protocol.number(),
            f: g.ports.first,
            l: g.ports.last,
            h: HostOut(g.host),
            r: RemotesOut(&g.remotes),
            a: g.app.as_deref(),
        }))
    }
}

/// A [`GrantForm`] as written: the same keys in the same order.
#[derive(Serialize)]
struct GrantOut<'a> {
    p: u8,
    f: u16,
    l: u16,
    h: HostOut,
    #[serde(skip_serializing_if = "RemotesOut::is_empty")]
    r: RemotesOut<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    a: Option<&'a str>,
}

/// An address as the string `Display` writes, an IPv4 one without `core::fmt`.
struct HostOut(IpAddr);

impl Serialize for HostOut {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self.0 {
            IpAddr::V4(v4) => serializer.serialize_str(V4Text::new(v4).as_str()),
            IpAddr::V6(_) => serializer.collect_str(&self.0),
        }
    }
}

/// Remote prefixes as strings in `Display`'s form.
struct RemotesOut<'a>(&'a [Prefix]);

impl RemotesOut<'_> {
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl Serialize for RemotesOut<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        struct Text<'p>(&'p Prefix);
        impl Serialize for Text<'_> {
            fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.collect_str(self.0)
            }
        }
        serializer.collect_seq(self.0.iter().map(Text))
    }
}

/// An IPv4 address in dotted decimal, as `Display` writes it, built digit by digit: the store
/// writer formats a grant's host and its peer's address for every grant, and `core::fmt`'s
/// machinery around four small numbers cost more than the digits (about 4 % of the writer's
/// time per grant, measured with the peer's formatting).
struct V4Text {
    bytes: [u8; 15],
    len: usize,
}

impl V4Text {
    fn new(addr: std::net::Ipv4Addr) -> Self {
        let mut text = V4Text {
            bytes: [0; 15],
            len: 0,
        };
        for (i, octet) in addr.octets().into_iter().enumerate() {
            if i > 0 {
                text.push(b'.');
            }
            if octet >= 100 {
                text.push(b'0' + octet / 100);
            }
            if octet >= 10 {
                text.push(b'0' + octet / 10 % 10);
            }
            text.push(b'0' + octet % 10);
        }
        text
    }

    fn push(&mut self, byte: u8) {
        // Four octets of at most three digits and three dots are fifteen bytes.
        if let Some(slot) = self.bytes.get_mut(self.len) {
            *slot = byte;
            self.len += 1;
        }
    }

    fn as_str(&self) -> &str {
        // Only ASCII digits and dots were written.
        std::str::from_utf8(self.bytes.get(..self.len).unwrap_or_default()).unwrap_or_default()
    }
}

/// Appends `addr` as `Display` writes it.
pub(crate) fn push_ip(text: &mut String, addr: IpAddr) {
    match addr {
        IpAddr::V4(v4) => text.push_str(V4Text::new(v4).as_str()),
        // Writing into a String cannot fail.
        IpAddr::V6(_) => {
            let _ = write!(text, "{addr}");
        }
    }
}

/// Appends `addr` as `Display` writes it (`192.0.2.1:4433`, `[2001:db8::1]:4433`).
pub(crate) fn push_socket_addr(text: &mut String, addr: SocketAddr) {
    match addr {
        SocketAddr::V4(v4) => {
            text.push_str(V4Text::new(*v4.ip()).as_str());
            text.push(':');
            text.push_str(itoa::Buffer::new().format(v4.port()));
        }
        // Writing into a String cannot fail.
        SocketAddr::V6(_) => {
            let _ = write!(text, "{addr}");
        }
    }
}

pub(crate) fn decode_grants(text: &str) -> Result<Vec<Grant>, StoreError> {
    let forms: Vec<GrantForm<'_>> = serde_json::from_str(text)
        .map_err(|e| StoreError::corrupt(format!("grants are not the store's JSON form: {e}")))?;
    forms
        .into_iter()
        .map(|form| {
            let protocol = Protocol::from_number(u64::from(form.p)).ok_or_else(|| {
                StoreError::corrupt(format!("grant with unknown protocol number {}", form.p))
            })?;
            if form.f == 0 || form.l < form.f {
                return Err(StoreError::corrupt(format!(
                    "grant with invalid ports {}-{}",
                    form.f, form.l
                )));
            }
            let remotes = form
                .r
                .iter()
                .map(|p| parse_prefix(p))
                .collect::<Result<Vec<_>, _>>()?;
            Ok(Grant {
                protocol,
                ports: PortRange {
                    first: form.f,
                    last: form.l,
                },
                host: form.h,
                remotes,
                app: form.a.map(std::borrow::Cow::into_owned),
            })
        })
        .collect()
}

pub(crate) fn encode_prefixes(prefixes: &[Prefix]) -> Option<String> {
    if prefixes.is_empty() {
        return None;
    }
    let texts: Vec<String> = prefixes.iter().map(Prefix::to_string).collect();
    serde_json::to_string(&texts).ok()
}

/// The host addresses an opening named, as the audit trail's `host` column holds them: one
/// address as its text (as before openings could name several), several separated by commas.
pub(crate) fn encode_hosts(hosts: &[IpAddr]) -> Option<String> {
    if hosts.is_empty() {
        return None;
    }
    let mut text = String::with_capacity(hosts.len() * 16);
    for (i, host) in hosts.iter().enumerate() {
        if i > 0 {
            text.push(',');
        }
        push_ip(&mut text, *host);
    }
    Some(text)
}

pub(crate) fn decode_hosts(text: &str) -> Result<Vec<IpAddr>, StoreError> {
    text.split(',')
        .map(|h| {
            h.parse()
                .map_err(|_| StoreError::corrupt(format!("invalid host address {h:?}")))
        })
        .collect()
}

pub(crate) fn decode_prefixes(text: &str) -> Result<Vec<Prefix>, StoreError> {
    let texts: Vec<String> = serde_json::from_str(text).map_err(|e| {
        StoreError::corrupt(format!(
            "remote prefixes are not a JSON array of strings: {e}"
        ))
    })?;
    texts.iter().map(|t| parse_prefix(t)).collect()
}

pub(crate) fn parse_prefix(text: &str) -> Result<Prefix, StoreError> {
    // The store writes every prefix as ADDRESS/LENGTH: a bare address was not written by it.
    if !text.contains('/') {
        return Err(StoreError::corrupt(format!(
            "invalid prefix {text:?}: no length"
        )));
    }
    text.parse()
        .map_err(|e| StoreError::corrupt(format!("invalid prefix {text:?}: {e}")))
}

/// Milliseconds or other unsigned values go into SQLite's signed 64-bit integers.
pub(crate) fn to_i64(value: u64, what: &str) -> Result<i64, StoreError> {
    i64::try_from(value).map_err(|_| StoreError::InvalidInput {
        what: format!("{what} {value} (above 2^63)"),
    })
}

fn from_i64(value: i64, what: &str) -> Result<u64, StoreError> {
    u64::try_from(value).map_err(|_| StoreError::corrupt(format!("{what} is negative ({value})")))
}

fn from_i64_u32(value: i64, what: &str) -> Result<u32, StoreError> {
    u32::try_from(value)
        .map_err(|_| StoreError::corrupt(format!("{what} is out of range ({value})")))
}

pub(crate) fn lease_id(blob: &[u8]) -> Result<LeaseId, StoreError> {
    let bytes: [u8; 16] = blob
        .try_into()
        .map_err(|_| StoreError::corrupt(format!("a lease id is {} bytes, not 16", blob.len())))?;
    Ok(LeaseId(bytes))
}

fn peer(text: Option<String>) -> Result<Option<SocketAddr>, StoreError> {
    text.map(|t| {
        t.parse()
            .map_err(|_| StoreError::corrupt(format!("invalid peer address {t:?}")))
    })
    .transpose()
}

pub(crate) fn app_columns(
    app: Option<&AppInfo>,
) -> (Option<&str>, Option<&str>, Option<u32>, Option<u32>) {
    match app {
        Some(a) => (a.name.as_deref(), a.executable.as_deref(), a.uid, a.pid),
        None => (None, None, None, None),
    }
}

pub(crate) fn certificate_columns(
    certificate: Option<&CertificateName>,
) -> (Option<&[u8]>, Option<&str>) {
    match certificate {
        Some(c) => (Some(&c.issuer[..]), Some(c.serial.as_str())),
        None => (None, None),
    }
}

/// Both columns or neither; the serial must be the normalised hex form.
fn certificate_from(
    issuer: Option<Vec<u8>>,
    serial: Option<String>,
) -> Result<Option<CertificateName>, StoreError> {
    match (issuer, serial) {
        (None, None) => Ok(None),
        (Some(issuer), Some(text)) => {
            let serial = Serial::parse(&text)
                .filter(|s| s.as_str() == text)
                .ok_or_else(|| {
                    StoreError::corrupt(format!(
                        "certificate serial {text:?} is not normalised hex"
                    ))
                })?;
            Ok(Some(CertificateName { issuer, serial }))
        }
        _ => Err(StoreError::corrupt(
            "a certificate issuer without its serial, or the reverse",
        )),
    }
}

fn app_from(
    name: Option<String>,
    executable: Option<String>,
    uid: Option<i64>,
    pid: Option<i64>,
) -> Result<Option<AppInfo>, StoreError> {
    if name.is_none() && executable.is_none() && uid.is_none() && pid.is_none() {
        return Ok(None);
    }
    Ok(Some(AppInfo {
        name,
        executable,
        uid: uid.map(|v| from_i64_u32(v, "app uid")).transpose()?,
        pid: pid.map(|v| from_i64_u32(v, "app pid")).transpose()?,
    }))
}

/// Read a column, turning type mismatches into [`StoreError::Corrupt`].
fn col<T: rusqlite::types::FromSql>(
    row: &Row<'_>,
    index: usize,
    what: &'static str,
) -> Result<T, StoreError> {
    row.get(index).map_err(StoreError::sqlite(what))
}

/// The columns [`lease_from_row`] reads, in order.
pub(crate) const LEASE_COLUMNS: &str = "id, identity, peer, grants, app_name, app_exe, app_uid, app_pid, \
     requested_lifetime, granted_lifetime, created_ms, renewed_ms, expires_ms, state, ended_ms, end_by, \
     end_reason, revoke_reason, cert_issuer, cert_serial";

pub(crate) fn lease_from_row(row: &Row<'_>) -> Result<LeaseRecord, StoreError> {
    const W: &str = "read lease";
    let id_blob: Vec<u8> = col(row, 0, W)?;
    let id = lease_id(&id_blob)?;
    let grants_text: String = col(row, 3, W)?;
    let grants = decode_grants(&grants_text).map_err(|e| in_lease(id, e))?;
    let state_text: String = col(row, 13, W)?;
    let state = LeaseState::from_name(&state_text).ok_or_else(|| {
        StoreError::corrupt(format!("lease {id} has unknown state {state_text:?}"))
    })?;
    let ended_ms: Option<i64> = col(row, 14, W)?;
    let revoke_reason: Option<i64> = col(row, 17, W)?;
    let ending = match state {
        LeaseState::Live => None,
        ended => {
            let end = match ended {
                LeaseState::Released => LeaseEnd::Released,
                LeaseState::Expired => LeaseEnd::Expired,
                _ => {
                    let number = revoke_reason.unwrap_or(0);
                    let reason = u64::try_from(number)
                        .ok()
                        .and_then(RevokeReason::from_number)
                        .ok_or_else(|| {
                            StoreError::corrupt(format!(
                                "revoked lease {id} has unknown revoke reason {number}"
                            ))
                        })?;
                    LeaseEnd::Revoked(reason)
                }
            };
            let ended_ms = ended_ms
                .ok_or_else(|| StoreError::corrupt(format!("ended lease {id} has no end time")))?;
            Some(LeaseEnding {
                end,
                ended_ms: from_i64(ended_ms, "lease end time")?,
                by: col(row, 15, W)?,
                why: col(row, 16, W)?,
            })
        }
    };
    let renewed: Option<i64> = col(row, 11, W)?;
    let requested: Option<i64> = col(row, 8, W)?;
    Ok(LeaseRecord {
        id,
        identity: col(row, 1, W)?,
        peer: peer(col(row, 2, W)?).map_err(|e| in_lease(id, e))?,
        grants,
        app: app_from(
            col(row, 4, W)?,
            col(row, 5, W)?,
            col(row, 6, W)?,
            col(row, 7, W)?,
        )
        .map_err(|e| in_lease(id, e))?,
        requested_lifetime: requested
            .map(|v| from_i64_u32(v, "requested lifetime"))
            .transpose()?,
        granted_lifetime: from_i64_u32(col(row, 9, W)?, "granted lifetime")?,
        created_ms: from_i64(col(row, 10, W)?, "lease creation time")?,
        renewed_ms: renewed
            .map(|v| from_i64(v, "lease renewal time"))
            .transpose()?,
        expires_ms: from_i64(col(row, 12, W)?, "lease expiry time")?,
        state,
        ending,
        certificate: certificate_from(col(row, 18, W)?, col(row, 19, W)?)
            .map_err(|e| in_lease(id, e))?,
    })
}

fn in_lease(id: LeaseId, err: StoreError) -> StoreError {
    match err {
        StoreError::Corrupt { what } => StoreError::Corrupt {
            what: format!("lease {id}: {what}"),
        },
        other => other,
    }
}

/// The columns [`audit_from_row`] reads, in order.
pub(crate) const AUDIT_COLUMNS: &str = "id, time_ms, kind, outcome, identity, peer, lease, protocol, \
     port_first, port_last, app_id, host, remotes, lifetime_asked, app_name, app_exe, app_uid, app_pid, \
     grants, lifetime_granted, rule, reason, code, actor, has_request";

pub(crate) fn audit_from_row(row: &Row<'_>) -> Result<AuditRecord, StoreError> {
    const W: &str = "read audit";
    let id = from_i64(col(row, 0, W)?, "audit id")?;
    let with_id = |e: StoreError| match e {
        StoreError::Corrupt { what } => StoreError::Corrupt {
            what: format!("audit event {id}: {what}"),
        },
        other => other,
    };
    let inner = || -> Result<AuditEvent, StoreError> {
        let kind_text: String = col(row, 2, W)?;
        let kind = AuditKind::from_name(&kind_text)
            .ok_or_else(|| StoreError::corrupt(format!("unknown kind {kind_text:?}")))?;
        let outcome_text: Option<String> = col(row, 3, W)?;
        let outcome = outcome_text
            .map(|t| {
                Outcome::from_name(&t)
                    .ok_or_else(|| StoreError::corrupt(format!("unknown outcome {t:?}")))
            })
            .transpose()?;
        let lease_blob: Option<Vec<u8>> = col(row, 6, W)?;
        let has_request: i64 = col(row, 24, W)?;
        let request = if has_request != 0 {
            let protocol: Option<i64> = col(row, 7, W)?;
            let protocol = protocol
                .map(|n| {
                    u64::try_from(n)
                        .ok()
                        .and_then(Protocol::from_number)
                        .ok_or_else(|| StoreError::corrupt(format!("unknown protocol number {n}")))
                })
                .transpose()?;
            let first: Option<i64> = col(row, 8, W)?;
            let last: Option<i64> = col(row, 9, W)?;
            let ports = match (first, last) {
                (Some(f), Some(l)) => {
                    let port = |v: i64| {
                        u16::try_from(v)
                            .map_err(|_| StoreError::corrupt(format!("port {v} out of range")))
                    };
                    Some(PortRange {
                        first: port(f)?,
                        last: port(l)?,
                    })
                }
                (None, None) => None,
                _ => return Err(StoreError::corrupt("a port range with only one end")),
            };
            let host: Option<String> = col(row, 11, W)?;
            let hosts = host
                .as_deref()
                .map(decode_hosts)
                .transpose()?
                .unwrap_or_default();
            let remotes: Option<String> = col(row, 12, W)?;
            let lifetime: Option<i64> = col(row, 13, W)?;
            Some(RequestSummary {
                protocol,
                ports,
                app_id: col(row, 10, W)?,
                hosts,
                remotes: remotes
                    .as_deref()
                    .map(decode_prefixes)
                    .transpose()?
                    .unwrap_or_default(),
                lifetime: lifetime
                    .map(|v| from_i64_u32(v, "lifetime asked"))
                    .transpose()?,
            })
        } else {
            None
        };
        let grants: Option<String> = col(row, 18, W)?;
        let granted_lifetime: Option<i64> = col(row, 19, W)?;
        let code: Option<i64> = col(row, 22, W)?;
        let code = code
            .map(|n| {
                u64::try_from(n)
                    .ok()
                    .and_then(ResultCode::from_number)
                    .ok_or_else(|| StoreError::corrupt(format!("unknown result code {n}")))
            })
            .transpose()?;
        Ok(AuditEvent {
            time_ms: from_i64(col(row, 1, W)?, "event time")?,
            kind,
            outcome,
            identity: col(row, 4, W)?,
            peer: peer(col(row, 5, W)?)?,
            lease: lease_blob.as_deref().map(lease_id).transpose()?,
            request,
            app: app_from(
                col(row, 14, W)?,
                col(row, 15, W)?,
                col(row, 16, W)?,
                col(row, 17, W)?,
            )?,
            grants: grants
                .as_deref()
                .map(decode_grants)
                .transpose()?
                .unwrap_or_default(),
            granted_lifetime: granted_lifetime
                .map(|v| from_i64_u32(v, "lifetime granted"))
                .transpose()?,
            rule: col(row, 20, W)?,
            reason: col(row, 21, W)?,
            code,
            actor: col(row, 23, W)?,
        })
    };
    Ok(AuditRecord {
        id,
        event: inner().map_err(with_id)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grants_round_trip_compactly() {
        let grants = vec![
            Grant {
                protocol: Protocol::Tcp,
                ports: PortRange::single(443),
                host: "192.0.2.7".parse().unwrap(),
                remotes: vec![Prefix {
                    addr: "198.51.100.0".parse().unwrap(),
                    len: 24,
                }],
                app: Some("https".into()),
            },
            Grant {
                protocol: Protocol::Udp,
                ports: PortRange {
                    first: 5000,
                    last: 5010,
                },
                host: "2001:db8::1".parse().unwrap(),
                remotes: vec![],
                app: None,
            },
        ];
        let text = encode_grants(&grants);
        assert_eq!(
            text,
            r#"[{"p":6,"f":443,"l":443,"h":"192.0.2.7","r":["198.51.100.0/24"],"a":"https"},{"p":17,"f":5000,"l":5010,"h":"2001:db8::1"}]"#
        );
        assert_eq!(decode_grants(&text).unwrap(), grants);
    }

    /// Addresses are written as `Display` writes them, IPv4 ones without `core::fmt`: every
    /// octet and port width, and IPv6 forms, with and without a scope.
    #[test]
    fn addresses_are_written_as_display_writes_them() {
        let mut hosts: Vec<IpAddr> = ["0.0.0.0", "255.255.255.255", "10.200.0.34", "1.22.103.9"]
            .iter()
            .map(|t| t.parse().unwrap())
            .collect();
        hosts.extend((0..=255u8).map(|o| IpAddr::from([o, 255 - o, o / 3, o % 100])));
        hosts.extend(
            ["::", "2001:db8::1", "::ffff:192.0.2.1", "fe80::1:2:3:4"]
                .iter()
                .map(|t| t.parse::<IpAddr>().unwrap()),
        );
        for host in hosts {
            let mut text = String::from("x");
            push_ip(&mut text, host);
            assert_eq!(text, format!("x{host}"));
            for port in [0, 7, 80, 443, 4433, 65_535] {
                let addr = SocketAddr::new(host, port);
                let mut text = String::new();
                push_socket_addr(&mut text, addr);
                assert_eq!(text, addr.to_string());
            }
            let grant = Grant {
                protocol: Protocol::Tcp,
                ports: PortRange::single(22),
                host,
                remotes: vec![],
                app: None,
            };
            assert_eq!(
                encode_grants(std::slice::from_ref(&grant)),
                format!(r#"[{{"p":6,"f":22,"l":22,"h":"{host}"}}]"#)
            );
        }
        let scoped: SocketAddr = "[fe80::1%7]:4433".parse().unwrap();
        let mut text = String::new();
        push_socket_addr(&mut text, scoped);
        assert_eq!(text, "[fe80::1%7]:4433");
        assert_eq!(encode_hosts(&[]), None);
    }

    /// Encoding into a buffer replaces its text and keeps its allocation when the text fits.
    #[test]
    fn grants_encoded_into_a_buffer_reuse_it() {
        let grant = |port: u16| Grant {
            protocol: Protocol::Udp,
            ports: PortRange::single(port),
            host: "192.0.2.1".parse().unwrap(),
            remotes: vec![],
            app: None,
        };
        let mut text = String::new();
        encode_grants_into(&[grant(1000)], &mut text);
        let buffer = text.as_ptr();
        encode_grants_into(&[grant(2)], &mut text);
        assert_eq!(text, r#"[{"p":17,"f":2,"l":2,"h":"192.0.2.1"}]"#);
        assert_eq!(text.as_ptr(), buffer, "the same allocation");
        encode_grants_into(&[], &mut text);
        assert_eq!(text, "[]");
    }

    #[test]
    fn hostile_grants_are_errors() {
        for bad in [
            "",
            "garbage",
            "{}",
            r#"[{"p":99,"f":1,"l":1,"h":"192.0.2.1"}]"#,
            r#"[{"p":6,"f":0,"l":1,"h":"192.0.2.1"}]"#,
            r#"[{"p":6,"f":9,"l":1,"h":"192.0.2.1"}]"#,
            r#"[{"p":6,"f":70000,"l":1,"h":"192.0.2.1"}]"#,
            r#"[{"p":6,"f":1,"l":1,"h":"not an address"}]"#,
            r#"[{"p":6,"f":1,"l":1,"h":"192.0.2.1","r":["10.0.0.0/33"]}]"#,
            r#"[{"p":6,"f":1,"l":1,"h":"192.0.2.1","r":["10.0.0.0"]}]"#,
        ] {
            assert!(
                matches!(decode_grants(bad), Err(StoreError::Corrupt { .. })),
                "{bad:?} decoded"
            );
        }
    }

    #[test]
    fn lease_ids_must_be_sixteen_bytes() {
        assert!(lease_id(&[7; 16]).is_ok());
        assert!(matches!(
            lease_id(&[7; 15]),
            Err(StoreError::Corrupt { .. })
        ));
        assert!(matches!(lease_id(&[]), Err(StoreError::Corrupt { .. })));
    }
}
