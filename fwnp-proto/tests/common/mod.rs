//! Shared by the vector tests and the vector generator: the language-neutral JSON rendering of
//! a message (documented in `spec/vectors/README.md`), RFC 8949 diagnostic notation, and the
//! loading of `spec/vectors/`.
#![allow(dead_code)]

use std::net::IpAddr;
use std::path::PathBuf;

use fwnp_proto::*;
use serde_json::{Value as Json, json};

/// The folder of the committed vectors.
pub(crate) fn vectors_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../spec/vectors")
}

/// Every committed vector as (file name, parsed JSON), sorted by file name.
pub(crate) fn load_vectors() -> Vec<(String, Json)> {
    load_dir(&vectors_dir())
}

fn load_dir(dir: &std::path::Path) -> Vec<(String, Json)> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .expect("spec/vectors exists")
        .map(|e| e.expect("readable directory entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|p| {
            let text = std::fs::read_to_string(&p).expect("readable vector file");
            let json: Json = serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("{}: not JSON: {e}", p.display()));
            (p.file_name().unwrap().to_string_lossy().into_owned(), json)
        })
        .collect()
}

/// The folder of the scenarios: requests in order, each at a time, and the answers they get.
pub(crate) fn scenarios_dir() -> PathBuf {
    vectors_dir().join("scenarios")
}

/// Every committed scenario as (file name, parsed JSON), sorted by file name.
pub(crate) fn load_scenarios() -> Vec<(String, Json)> {
    load_dir(&scenarios_dir())
}

/// The folder of the local API's vectors (frames of `spec/local-api.md`).
pub(crate) fn local_vectors_dir() -> PathBuf {
    vectors_dir().join("local")
}

/// Every committed local API vector as (file name, parsed JSON), sorted by file name.
pub(crate) fn load_local_vectors() -> Vec<(String, Json)> {
    load_dir(&local_vectors_dir())
}

/// The input bytes of a vector.
pub(crate) fn vector_bytes(name: &str, vector: &Json) -> Vec<u8> {
    let hex = vector["hex"]
        .as_str()
        .unwrap_or_else(|| panic!("{name}: no hex"));
    hex::decode(hex).unwrap_or_else(|e| panic!("{name}: bad hex: {e}"))
}

fn opt<T: Into<Json>>(v: Option<T>) -> Json {
    v.map_or(Json::Null, Into::into)
}

fn addr(a: IpAddr) -> Json {
    Json::String(a.to_string())
}

fn prefixes(p: &[Prefix]) -> Json {
    Json::Array(p.iter().map(|p| Json::String(p.to_string())).collect())
}

fn ports(p: &PortRange) -> Json {
    json!({"first": p.first, "last": p.last})
}

fn app_info(a: &Option<AppInfo>) -> Json {
    match a {
        None => Json::Null,
        Some(a) => json!({
            "name": opt(a.name.clone()),
            "executable": opt(a.executable.clone()),
            "uid": opt(a.uid),
            "pid": opt(a.pid),
        }),
    }
}

fn grant(g: &Grant) -> Json {
    json!({
        "protocol": g.protocol.name(),
        "ports": ports(&g.ports),
        "host": addr(g.host),
        "remotes": prefixes(&g.remotes),
        "app": opt(g.app.clone()),
    })
}

fn family(f: Family) -> &'static str {
    match f {
        Family::Ipv4 => "ipv4",
        Family::Ipv6 => "ipv6",
    }
}

fn revoke_reason(r: RevokeReason) -> &'static str {
    match r {
        RevokeReason::Operator => "operator",
        RevokeReason::PolicyChanged => "policy-changed",
        RevokeReason::CredentialRevoked => "credential-revoked",
        RevokeReason::ResourcePressure => "resource-pressure",
        _ => "unknown",
    }
}

fn lease(l: &LeaseId) -> Json {
    Json::String(l.to_string())
}

/// The language-neutral JSON rendering of a decoded message (see `spec/vectors/README.md`).
pub(crate) fn message_json(msg: &Message) -> Json {
    let common = msg.common();
    let mut out = json!({
        "type": msg.message_type().name(),
        "request_id": opt(common.request_id),
        "critical": common.critical,
    });
    let fields = match msg {
        Message::Hello(h) => json!({
            "versions": h.versions,
            "capabilities": h.capabilities.0,
            "software": opt(h.software.clone()),
        }),
        Message::Welcome(w) => json!({
            "version": w.version,
            "capabilities": w.capabilities.0,
            "limits": {
                "max_message_size": w.limits.max_message_size,
                "max_streams": w.limits.max_streams,
                "min_lifetime": w.limits.min_lifetime,
                "max_lifetime": w.limits.max_lifetime,
                "max_leases": opt(w.limits.max_leases),
            },
            "epoch": w.epoch,
            "time_ms": w.time_ms,
            "identity": w.identity,
            "addresses": w.addresses.iter().map(|a| addr(*a)).collect::<Vec<_>>(),
        }),
        Message::Open(o) => {
            let (protocol, port_range, app) = match &o.opening.target {
                Target::Ports { protocol, ports: p } => {
                    (Json::from(protocol.name()), ports(p), Json::Null)
                }
                Target::App(app) => (Json::Null, Json::Null, Json::from(app.clone())),
            };
            json!({
                "opening": {
                    "protocol": protocol,
                    "ports": port_range,
                    "app": app,
                    "host": match &o.opening.host {
                        HostAddresses::Default => Json::Null,
                        HostAddresses::One(a) => addr(*a),
                        HostAddresses::List(list) => Json::Array(list.iter().map(|a| addr(*a)).collect()),
                    },
                    "family": o.opening.family.map_or(Json::Null, |f| family(f).into()),
                    "remotes": prefixes(&o.opening.remotes),
                },
                "lifetime": opt(o.lifetime),
                "app_info": app_info(&o.app),
            })
        }
        Message::Renew(r) => json!({"lease": lease(&r.lease), "lifetime": opt(r.lifetime)}),
        Message::Release(r) => json!({"lease": lease(&r.lease)}),
        Message::List(_) => json!({}),
        Message::Granted(g) => json!({
            "lease": lease(&g.lease),
            "grants": g.grants.iter().map(grant).collect::<Vec<_>>(),
            "lifetime": g.lifetime,
            "expires_ms": g.expires_ms,
            "renew_after": g.renew_after,
            "epoch": g.epoch,
            "narrowed": g.narrowed,
        }),
        Message::Denied(d) => json!({
            "code": d.code.name(),
            "reason": opt(d.reason.clone()),
            "retry_after": opt(d.retry_after),
            "lease": d.lease.as_ref().map_or(Json::Null, lease),
            "unsupported": d.unsupported,
        }),
        Message::Leases(l) => json!({
            "leases": l.leases.iter().map(|i| json!({
                "lease": lease(&i.lease),
                "grants": i.grants.iter().map(grant).collect::<Vec<_>>(),
                "remaining": i.remaining,
                "expires_ms": i.expires_ms,
                "app_info": app_info(&i.app),
            })).collect::<Vec<_>>(),
            "epoch": l.epoch,
        }),
        Message::Released(r) => json!({"lease": lease(&r.lease)}),
        Message::Revoked(r) => json!({
            "lease": lease(&r.lease),
            "reason": revoke_reason(r.reason),
            "text": opt(r.text.clone()),
        }),
        Message::EpochChanged(e) => json!({"epoch": e.epoch}),
        Message::GoingAway(g) => json!({
            "reconnect_after": opt(g.reconnect_after),
            "reason": opt(g.reason.clone()),
        }),
    };
    if let (Json::Object(out), Json::Object(fields)) = (&mut out, fields) {
        out.extend(fields);
    }
    out
}

/// The JSON rendering of a decoded local API message (see `spec/vectors/README.md`): the wire
/// messages as [`message_json`], Denied with a code of either registry, and the local types.
pub(crate) fn local_message_json(msg: &local::LocalMessage) -> Json {
    use local::LocalMessage as L;
    let common = msg.common();
    let (name, fields) = match msg {
        L::Wire(m) => return message_json(m),
        L::Denied(d) => (
            "denied",
            json!({
                "code": d.code.name(),
                "reason": opt(d.reason.clone()),
                "retry_after": opt(d.retry_after),
                "lease": d.lease.as_ref().map_or(Json::Null, lease),
                "unsupported": d.unsupported,
            }),
        ),
        L::Watch(w) => (
            "watch",
            json!({"lease": w.lease.as_ref().map_or(Json::Null, lease)}),
        ),
        L::Watching(_) => ("watching", json!({})),
        L::Event(e) => (
            "event",
            json!({
                "lease": lease(&e.lease),
                "kind": e.kind.name(),
                "expires_in_ms": opt(e.expires_in_ms),
                "reason": opt(e.reason.clone()),
                "code": e.code.map_or(Json::Null, |c| c.name().into()),
                "new_lease": e.new_lease.as_ref().map_or(Json::Null, lease),
            }),
        ),
        L::Status(_) => ("status", json!({})),
        L::StatusAnswer(s) => (
            "status-answer",
            json!({
                "agent_version": s.agent_version,
                "gateway": s.gateway,
                "connected": s.connected,
                "epoch": opt(s.epoch),
                "mirror_mode": s.mirror_mode,
                "identity": opt(s.identity.clone()),
                "leases": s.leases,
                "last_error": opt(s.last_error.clone()),
                "api_version": opt(s.api_version),
            }),
        ),
    };
    let mut out = json!({
        "type": name,
        "request_id": opt(common.request_id),
        "critical": common.critical,
    });
    if let (Json::Object(out), Json::Object(fields)) = (&mut out, fields) {
        out.extend(fields);
    }
    out
}

/// The error kind of a refused local frame body, as the local vectors name it: the wire
/// codec's kinds for what its first pass refuses, and the local API's own.
pub(crate) fn local_error_kind(e: &local::LocalError) -> &'static str {
    use local::LocalError as E;
    match e {
        E::EmptyFrame => "empty-frame",
        E::FrameTooLarge { .. } => "frame-too-large",
        E::Decode(d) => d.kind(),
        E::NotLocal(_) => "not-local",
        E::MissingRequestId(_) => "missing-request-id",
        E::MissingKey { .. } => "missing-key",
        E::WrongType { .. } => "wrong-type",
        E::OutOfRange { .. } => "out-of-range",
        E::UnsupportedCritical(_) => "unsupported-critical",
        _ => "unknown",
    }
}

// ---------------------------------------------------------------------------------------------
// RFC 8949 diagnostic notation (section 8, with the encoding indicators of RFC 8610 appendix G)

/// The diagnostic notation of one CBOR item followed by nothing, or why there is none.
/// Recursive: run it on a thread with a large stack for deeply nested inputs.
pub(crate) fn diagnostic(bytes: &[u8]) -> Result<String, String> {
    let mut d = Diag {
        bytes,
        pos: 0,
        out: String::new(),
    };
    d.item()?;
    if d.pos != bytes.len() {
        return Err(format!("{} bytes after the item", bytes.len() - d.pos));
    }
    Ok(d.out)
}

struct Diag<'a> {
    bytes: &'a [u8],
    pos: usize,
    out: String,
}

impl Diag<'_> {
    fn byte(&mut self) -> Result<u8, String> {
        let b = *self.bytes.get(self.pos).ok_or("truncated")?;
        self.pos += 1;
        Ok(b)
    }

    fn take(&mut self, n: u64) -> Result<&[u8], String> {
        let n = usize::try_from(n).map_err(|_| "too long")?;
        let end = self.pos.checked_add(n).ok_or("too long")?;
        let s = self.bytes.get(self.pos..end).ok_or("truncated")?;
        self.pos = end;
        Ok(s)
    }

    /// (major, info, argument, encoding indicator if the argument is not in preferred form)
    fn header(&mut self) -> Result<(u8, u8, u64, &'static str), String> {
        let ib = self.byte()?;
        let (major, info) = (ib >> 5, ib & 0x1f);
        let (arg, min, ind) = match info {
            0..=23 => (u64::from(info), 0, ""),
            24 => (u64::from(self.byte()?), 24, "_0"),
            25 => (be(self.take(2)?), 256, "_1"),
            26 => (be(self.take(4)?), 65536, "_2"),
            27 => (be(self.take(8)?), 1 << 32, "_3"),
            31 => (0, 0, ""),
            _ => return Err("reserved additional information".into()),
        };
        let ind = if (24..=27).contains(&info) && arg < min && major != 7 {
            ind
        } else {
            ""
        };
        Ok((major, info, arg, ind))
    }

    fn item(&mut self) -> Result<(), String> {
        let (major, info, arg, ind) = self.header()?;
        let indefinite = info == 31;
        match major {
            0 if !indefinite => self.out += &format!("{arg}{ind}"),
            1 if !indefinite => self.out += &format!("{}{ind}", -1 - i128::from(arg)),
            2 | 3 if !indefinite => {
                let s = self.take(arg)?.to_vec();
                self.string(major, &s)?;
                self.out += ind;
            }
            2 | 3 => {
                self.out += "(_ ";
                let mut first = true;
                while self.bytes.get(self.pos) != Some(&0xff) {
                    if !first {
                        self.out += ", ";
                    }
                    first = false;
                    let (m, i, len, ind) = self.header()?;
                    if m != major || i == 31 {
                        return Err("bad chunk".into());
                    }
                    let s = self.take(len)?.to_vec();
                    self.string(major, &s)?;
                    self.out += ind;
                }
                self.pos += 1;
                self.out += ")";
            }
            4 | 5 => {
                let (open, close) = if major == 4 { ("[", "]") } else { ("{", "}") };
                self.out += open;
                if indefinite {
                    self.out += "_ ";
                } else if !ind.is_empty() {
                    self.out += ind;
                    self.out += " ";
                }
                let mut n = 0u64;
                loop {
                    if indefinite {
                        if self.bytes.get(self.pos) == Some(&0xff) {
                            self.pos += 1;
                            break;
                        }
                    } else if n == arg {
                        break;
                    }
                    if n > 0 {
                        self.out += ", ";
                    }
                    self.item()?;
                    if major == 5 {
                        self.out += ": ";
                        self.item()?;
                    }
                    n += 1;
                }
                self.out += close;
            }
            6 if !indefinite => {
                self.out += &format!("{arg}{ind}(");
                self.item()?;
                self.out += ")";
            }
            7 => match info {
                20 => self.out += "false",
                21 => self.out += "true",
                22 => self.out += "null",
                23 => self.out += "undefined",
                24 if arg < 32 => return Err("two-byte simple value below 32".into()),
                0..=19 | 24 => self.out += &format!("simple({arg})"),
                // With the width's encoding indicator (RFC 8610 appendix G): keys of one
                // value written in two widths are what some vectors are about.
                25 => self.out += &(float(half_to_f64(arg as u16)) + "_1"),
                26 => self.out += &(float(f64::from(f32::from_bits(arg as u32))) + "_2"),
                27 => self.out += &(float(f64::from_bits(arg)) + "_3"),
                _ => return Err("break outside an indefinite-length item".into()),
            },
            _ => return Err("indefinite length on an integer or a tag".into()),
        }
        Ok(())
    }

    fn string(&mut self, major: u8, s: &[u8]) -> Result<(), String> {
        if major == 2 {
            self.out += &format!("h'{}'", hex::encode(s));
        } else {
            let text = std::str::from_utf8(s).map_err(|_| "text is not UTF-8")?;
            self.out += &serde_json::to_string(text).map_err(|e| e.to_string())?;
        }
        Ok(())
    }
}

fn be(b: &[u8]) -> u64 {
    b.iter().fold(0, |acc, x| (acc << 8) | u64::from(*x))
}

fn half_to_f64(h: u16) -> f64 {
    let exp = (h >> 10) & 0x1f;
    let mant = f64::from(h & 0x3ff);
    let v = match exp {
        0 => mant * 2f64.powi(-24),
        31 if mant == 0.0 => f64::INFINITY,
        31 => f64::NAN,
        _ => (1.0 + mant / 1024.0) * 2f64.powi(i32::from(exp) - 15),
    };
    if h & 0x8000 != 0 { -v } else { v }
}

fn float(f: f64) -> String {
    if f.is_nan() {
        "NaN".into()
    } else if f.is_infinite() {
        if f > 0.0 {
            "Infinity".into()
        } else {
            "-Infinity".into()
        }
    } else {
        format!("{f:?}")
    }
}

/// The policy of the request core's tests: every opening of ports is granted as asked, on the
/// host addresses the core resolved, within these lifetime bounds and this quota; no
/// application is known. The scenarios of `spec/vectors/scenarios/` state this policy.
pub(crate) struct PortsPolicy {
    pub(crate) lifetime: fwnp_proto::gateway::LifetimePolicy,
    pub(crate) max_leases: Option<u32>,
}

impl fwnp_proto::gateway::request::Decide for PortsPolicy {
    fn host_limits(
        &self,
        _identity: &str,
        _addresses: &[IpAddr],
    ) -> fwnp_proto::gateway::request::HostLimits {
        fwnp_proto::gateway::request::HostLimits {
            lifetime: self.lifetime,
            max_leases: self.max_leases.unwrap_or(u32::MAX),
            third_party: false,
        }
    }

    fn evaluate(
        &self,
        _identity: &str,
        _addresses: &[IpAddr],
        hosts: &[IpAddr],
        open: &Open,
    ) -> fwnp_proto::gateway::request::Decision {
        use fwnp_proto::gateway::request::Decision;
        let Target::Ports { protocol, ports } = open.opening.target.clone() else {
            return Decision::denied(ResultCode::UnknownApplication, "no catalogue");
        };
        Decision::allowed(fwnp_proto::gateway::PolicyFacts {
            grants: hosts
                .iter()
                .map(|&host| Grant {
                    protocol,
                    ports,
                    host,
                    remotes: open.opening.remotes.clone(),
                    app: None,
                })
                .collect(),
            grants_narrowed: false,
            lifetime: self.lifetime,
            max_leases: self.max_leases,
        })
    }

    fn still_allows(
        &self,
        _identity: &str,
        _addresses: &[IpAddr],
        _grants: &[Grant],
    ) -> Result<fwnp_proto::gateway::LifetimePolicy, fwnp_proto::gateway::request::Objection> {
        Ok(self.lifetime)
    }
}
