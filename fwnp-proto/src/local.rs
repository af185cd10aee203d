//! The host's local API: the frames applications and the host agent (`fwnp-agent`) exchange over
//! the agent's Unix socket, as `spec/local-api.md` defines them.
//!
//! # Framing
//!
//! Every message is one frame: a [`FRAME_HEADER_LEN`]-byte big-endian length `N`, with
//! `1 <= N <=` [`MAX_FRAME_BODY_LEN`], followed by exactly `N` bytes holding one CBOR item, a
//! map with unsigned integer keys as on the wire. [`encode_frame`] writes a whole frame;
//! [`frame_body_len`] checks a received header and [`decode_frame_body`] decodes the `N` bytes
//! after it.
//!
//! # Messages
//!
//! The local API reuses the FWNP/1 messages where they fit, so one codec serves both:
//! an application sends `Open`, `Release` and `List`; the agent answers `Granted`, `Denied`,
//! `Leases` and `Released`. These travel as [`LocalMessage::Wire`], with one exception: a
//! `Denied` is always [`LocalMessage::Denied`], because its code may be one of the local
//! codes ([`LocalCode`]) the wire registry does not hold. The local-only messages use types 64
//! and up: [`Watch`] and its answer [`Watching`], [`Event`], [`Status`] and [`StatusAnswer`].
//!
//! Key 1, the request id, is mandatory on every local message except [`Event`]: several
//! requests may be in flight on one connection and their answers come back in any order.
//!
//! # Decoding
//!
//! Decoding is as strict and bounded as [`crate::codec::decode`], which does the first pass for
//! every frame: size limit, nesting limit, no tags, no trailing bytes, unique unsigned keys,
//! the must-understand rule. Unknown keys are ignored. A wire message the local API does not
//! use (Hello, Renew, the notices...) is refused with [`LocalError::NotLocal`].
//!
//! ```
//! use fwnp_proto::local::{decode_frame_body, encode_frame, frame_body_len, LocalMessage, Status};
//! use fwnp_proto::Common;
//!
//! let status = LocalMessage::Status(Status { common: Common { request_id: Some(1), critical: vec![] } });
//! let frame = encode_frame(&status);
//! let len = frame_body_len([frame[0], frame[1], frame[2], frame[3]]).unwrap();
//! assert_eq!(decode_frame_body(&frame[4..4 + len]).unwrap(), status);
//! ```

use ciborium::Value;

use crate::codec::{self, DecodeError, Place};
use crate::message::{
    Common, Denied, Epoch, LeaseId, MAX_MESSAGE_SIZE, MAX_NESTING_DEPTH, Message, MessageType,
    ResultCode,
};
use crate::validate::MAX_REASON_LEN;

/// Length of a frame's header: the body's length as a 32-bit big-endian integer.
pub const FRAME_HEADER_LEN: usize = 4;

/// Largest frame body accepted, in bytes (the wire protocol's [`MAX_MESSAGE_SIZE`]).
pub const MAX_FRAME_BODY_LEN: usize = MAX_MESSAGE_SIZE;

/// The agent's default socket path.
pub const DEFAULT_SOCKET_PATH: &str = "/run/fwnp/agent.sock";

/// The environment variable that overrides the socket path for applications.
pub const SOCKET_ENV_VAR: &str = "FWNP_AGENT_SOCKET";

/// The version of the local API this crate implements (`spec/local-api.md` Section 12), which
/// an agent states in [`StatusAnswer::api_version`]. An agent that leaves the key out implements
/// version 1.
///
/// ```
/// assert_eq!(fwnp_proto::local::API_VERSION, 1);
/// ```
pub const API_VERSION: u64 = 1;

/// Type number of [`Watch`].
pub const TYPE_WATCH: u64 = 64;
/// Type number of [`Watching`].
pub const TYPE_WATCHING: u64 = 65;
/// Type number of [`Event`].
pub const TYPE_EVENT: u64 = 66;
/// Type number of [`Status`].
pub const TYPE_STATUS: u64 = 67;
/// Type number of [`StatusAnswer`].
pub const TYPE_STATUS_ANSWER: u64 = 68;

/// Local denial code 1024: the caller's uid and gids may not use the agent.
pub const CODE_AGENT_NOT_AUTHORIZED: u64 = 1024;
/// Local denial code 1025: the port is bound by another process, or by nobody.
pub const CODE_PORT_NOT_OWNED: u64 = 1025;
/// Local denial code 1026: the agent has no connection to the gateway and could not ask.
pub const CODE_GATEWAY_UNREACHABLE: u64 = 1026;
/// Local denial code 1027: a Release names a lease this connection does not hold.
pub const CODE_UNKNOWN_LOCAL_LEASE: u64 = 1027;

/// A denial code of the local API's private range (1024 and up).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum LocalCode {
    /// 1024: the caller may not use the agent (its uid and gids are not allowed).
    AgentNotAuthorized,
    /// 1025: the port is not bound by the caller or its descendants; the reason names who
    /// binds it, or says that nobody does.
    PortNotOwned,
    /// 1026: the agent is not connected to the gateway and the request could not be made.
    GatewayUnreachable,
    /// 1027: Release of a lease this local connection does not hold.
    UnknownLocalLease,
}

impl LocalCode {
    /// Every local code, in number order.
    pub const ALL: [LocalCode; 4] = [
        LocalCode::AgentNotAuthorized,
        LocalCode::PortNotOwned,
        LocalCode::GatewayUnreachable,
        LocalCode::UnknownLocalLease,
    ];

    /// The number carried in Denied key 3.
    pub fn number(self) -> u64 {
        match self {
            LocalCode::AgentNotAuthorized => CODE_AGENT_NOT_AUTHORIZED,
            LocalCode::PortNotOwned => CODE_PORT_NOT_OWNED,
            LocalCode::GatewayUnreachable => CODE_GATEWAY_UNREACHABLE,
            LocalCode::UnknownLocalLease => CODE_UNKNOWN_LOCAL_LEASE,
        }
    }

    /// The local code with this number, if the local API defines it.
    pub fn from_number(n: u64) -> Option<Self> {
        LocalCode::ALL.into_iter().find(|c| c.number() == n)
    }

    /// The code's name in `spec/local-api.md`.
    pub fn name(self) -> &'static str {
        match self {
            LocalCode::AgentNotAuthorized => "agent-not-authorized",
            LocalCode::PortNotOwned => "port-not-owned",
            LocalCode::GatewayUnreachable => "gateway-unreachable",
            LocalCode::UnknownLocalLease => "unknown-local-lease",
        }
    }
}

/// The code of a local Denied or of an [`Event`]: a wire result code or a local one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DenialCode {
    /// A code of the FWNP/1 registry, as the gateway (or the agent, for a malformed frame)
    /// answered it.
    Wire(ResultCode),
    /// A code of the local API's private range.
    Local(LocalCode),
}

impl DenialCode {
    /// The number on the wire.
    pub fn number(self) -> u64 {
        match self {
            DenialCode::Wire(c) => c.number(),
            DenialCode::Local(c) => c.number(),
        }
    }

    /// The code with this number, in either registry.
    pub fn from_number(n: u64) -> Option<Self> {
        ResultCode::from_number(n)
            .map(DenialCode::Wire)
            .or_else(|| LocalCode::from_number(n).map(DenialCode::Local))
    }

    /// The code's registered name.
    pub fn name(self) -> &'static str {
        match self {
            DenialCode::Wire(c) => c.name(),
            DenialCode::Local(c) => c.name(),
        }
    }
}

impl std::fmt::Display for DenialCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Denied (type 17) on the local API: the wire Denied with a code from either registry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalDenied {
    /// Common keys; the request id is that of the request refused.
    pub common: Common,
    /// Why (key 3).
    pub code: DenialCode,
    /// A human-readable reason (key 4).
    pub reason: Option<String>,
    /// Retry after this many seconds (key 5).
    pub retry_after: Option<u32>,
    /// The lease the request named (key 6).
    pub lease: Option<LeaseId>,
    /// The critical keys that were not understood (key 7).
    pub unsupported: Vec<u64>,
}

impl From<Denied> for LocalDenied {
    fn from(d: Denied) -> Self {
        LocalDenied {
            common: d.common,
            code: DenialCode::Wire(d.code),
            reason: d.reason,
            retry_after: d.retry_after,
            lease: d.lease,
            unsupported: d.unsupported,
        }
    }
}

/// Watch, type 64: ask for [`Event`]s about the caller's leases.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Watch {
    /// Common keys (the request id is mandatory).
    pub common: Common,
    /// Only this lease (key 3); `None` watches every lease of the connection.
    pub lease: Option<LeaseId>,
}

/// Watching, type 65: the answer to [`Watch`]; Events follow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Watching {
    /// Common keys (the Watch's request id).
    pub common: Common,
}

/// What happened to a lease, in an [`Event`] (key 4).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum EventKind {
    /// 1: renewed; the event carries the new time left.
    Renewed,
    /// 2: revoked by the gateway (terminal).
    Revoked,
    /// 3: expired, renewals having failed (terminal).
    Expired,
    /// 4: the gateway forgot the lease and opening it again failed (terminal).
    Lost,
    /// 5: released (terminal).
    Released,
    /// 6: opened again after the gateway's epoch changed; the event carries the new lease id,
    /// which replaces the old one for every later request.
    Reopened,
    /// 7: renewals are failing for lack of the gateway; the lease is valid until its expiry.
    GatewayUnreachable,
    /// 8: the gateway refused to renew the lease, for good; it stays valid until its expiry
    /// (the event carries the time left), then ends with [`EventKind::Expired`].
    RenewalRefused,
}

impl EventKind {
    /// Every kind, in number order.
    pub const ALL: [EventKind; 8] = [
        EventKind::Renewed,
        EventKind::Revoked,
        EventKind::Expired,
        EventKind::Lost,
        EventKind::Released,
        EventKind::Reopened,
        EventKind::GatewayUnreachable,
        EventKind::RenewalRefused,
    ];

    /// The number on the wire.
    pub fn number(self) -> u64 {
        match self {
            EventKind::Renewed => 1,
            EventKind::Revoked => 2,
            EventKind::Expired => 3,
            EventKind::Lost => 4,
            EventKind::Released => 5,
            EventKind::Reopened => 6,
            EventKind::GatewayUnreachable => 7,
            EventKind::RenewalRefused => 8,
        }
    }

    /// The kind with this number, if defined.
    pub fn from_number(n: u64) -> Option<Self> {
        EventKind::ALL.into_iter().find(|k| k.number() == n)
    }

    /// Whether the lease is over after this event.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            EventKind::Revoked | EventKind::Expired | EventKind::Lost | EventKind::Released
        )
    }

    /// The kind's name in `spec/local-api.md`.
    pub fn name(self) -> &'static str {
        match self {
            EventKind::Renewed => "renewed",
            EventKind::Revoked => "revoked",
            EventKind::Expired => "expired",
            EventKind::Lost => "lost",
            EventKind::Released => "released",
            EventKind::Reopened => "reopened",
            EventKind::GatewayUnreachable => "gateway-unreachable",
            EventKind::RenewalRefused => "renewal-refused",
        }
    }
}

impl std::fmt::Display for EventKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// Event, type 66: something happened to one of the caller's leases.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// Common keys; the agent sends no request id in an Event.
    pub common: Common,
    /// The lease (key 3): the id the application knows it by.
    pub lease: LeaseId,
    /// What happened (key 4).
    pub kind: EventKind,
    /// Time left, in milliseconds, after a renewal or re-open (key 5).
    pub expires_in_ms: Option<u64>,
    /// A human-readable explanation (key 6).
    pub reason: Option<String>,
    /// The code behind a revocation, loss or failure (key 7).
    pub code: Option<DenialCode>,
    /// The new lease id after a re-open (key 8).
    pub new_lease: Option<LeaseId>,
}

/// Status, type 67: ask how the agent is doing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    /// Common keys (the request id is mandatory).
    pub common: Common,
}

/// StatusAnswer, type 68: the answer to [`Status`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusAnswer {
    /// Common keys (the Status's request id).
    pub common: Common,
    /// The agent's version (key 3).
    pub agent_version: String,
    /// The gateway's address as configured (key 4).
    pub gateway: String,
    /// Whether a connection to the gateway is up (key 5).
    pub connected: bool,
    /// The gateway's epoch, once known (key 6).
    pub epoch: Option<Epoch>,
    /// The mirror mode: `enforce`, `monitor` or `off` (key 7).
    pub mirror_mode: String,
    /// The host's identity as the gateway authenticated it, once known (key 8).
    pub identity: Option<String>,
    /// How many leases the agent holds for applications (key 9).
    pub leases: u64,
    /// While not connected, why the last connection ended or the last attempt failed (key 10):
    /// a refused certificate, a name the gateway's certificate does not carry, no answer.
    pub last_error: Option<String>,
    /// The version of the local API the agent implements (key 11); absent from an agent of
    /// version 1 that predates the key. [`StatusAnswer::implemented_api_version`] reads it.
    pub api_version: Option<u64>,
}

impl StatusAnswer {
    /// The local API version the agent implements: key 11, or 1 when the agent left it out
    /// (`spec/local-api.md` Section 12).
    ///
    /// ```
    /// use fwnp_proto::local::StatusAnswer;
    /// use fwnp_proto::Common;
    /// let mut answer = StatusAnswer {
    ///     common: Common { request_id: Some(1), critical: vec![] },
    ///     agent_version: "0.1.0".into(),
    ///     gateway: "gw.example:4433".into(),
    ///     connected: true,
    ///     epoch: None,
    ///     mirror_mode: "enforce".into(),
    ///     identity: None,
    ///     leases: 0,
    ///     last_error: None,
    ///     api_version: None,
    /// };
    /// assert_eq!(answer.implemented_api_version(), 1);
    /// answer.api_version = Some(3);
    /// assert_eq!(answer.implemented_api_version(), 3);
    /// ```
    pub fn implemented_api_version(&self) -> u64 {
        self.api_version.unwrap_or(1)
    }
}

/// Every message of the local API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LocalMessage {
    /// A wire message: Open, Release, List, Granted, Leases or Released. (Denied decodes as
    /// [`LocalMessage::Denied`]; a wire Denied given here encodes the same way.)
    Wire(Message),
    /// Denied, with a wire or a local code.
    Denied(LocalDenied),
    /// Watch, type 64.
    Watch(Watch),
    /// Watching, type 65.
    Watching(Watching),
    /// Event, type 66.
    Event(Event),
    /// Status, type 67.
    Status(Status),
    /// StatusAnswer, type 68.
    StatusAnswer(StatusAnswer),
}

impl LocalMessage {
    /// The message's request id (key 1), if it carries one.
    pub fn request_id(&self) -> Option<u64> {
        self.common().request_id
    }

    /// The message's common keys.
    pub fn common(&self) -> &Common {
        match self {
            LocalMessage::Wire(m) => m.common(),
            LocalMessage::Denied(m) => &m.common,
            LocalMessage::Watch(m) => &m.common,
            LocalMessage::Watching(m) => &m.common,
            LocalMessage::Event(m) => &m.common,
            LocalMessage::Status(m) => &m.common,
            LocalMessage::StatusAnswer(m) => &m.common,
        }
    }

    /// The message's type number (key 0).
    pub fn type_number(&self) -> u64 {
        match self {
            LocalMessage::Wire(m) => m.message_type().number(),
            LocalMessage::Denied(_) => MessageType::Denied.number(),
            LocalMessage::Watch(_) => TYPE_WATCH,
            LocalMessage::Watching(_) => TYPE_WATCHING,
            LocalMessage::Event(_) => TYPE_EVENT,
            LocalMessage::Status(_) => TYPE_STATUS,
            LocalMessage::StatusAnswer(_) => TYPE_STATUS_ANSWER,
        }
    }
}

/// Why a frame is not an acceptable local API message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LocalError {
    /// A frame header announced an empty body.
    #[error("a frame body is at least one byte")]
    EmptyFrame,
    /// A frame header announced a body over the limit.
    #[error("frame body of {len} bytes exceeds the limit of {limit} bytes")]
    FrameTooLarge {
        /// The length announced (or given).
        len: usize,
        /// The limit, [`MAX_FRAME_BODY_LEN`].
        limit: usize,
    },
    /// The body failed the wire codec's checks (form, size, nesting, a wire message's keys).
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// A wire message the local API does not carry (Hello, Renew, a notice...).
    #[error("{0} messages are not part of the local API")]
    NotLocal(&'static str),
    /// A message other than Event lacks its request id (key 1).
    #[error("{0} message lacks its request id (key 1), mandatory on the local API")]
    MissingRequestId(&'static str),
    /// A mandatory key of a local message is absent.
    #[error("{message} message lacks mandatory key {key}")]
    MissingKey {
        /// The message's name.
        message: &'static str,
        /// The key.
        key: u64,
    },
    /// A key of a local message holds a value of the wrong type or length.
    #[error("key {key} of {message} message must be {expected}")]
    WrongType {
        /// The message's name.
        message: &'static str,
        /// The key.
        key: u64,
        /// What the schema allows there.
        expected: &'static str,
    },
    /// A number of a local message is outside its range or registry.
    #[error("key {key} of {message} message holds {value}, which is not {expected}")]
    OutOfRange {
        /// The message's name.
        message: &'static str,
        /// The key.
        key: u64,
        /// The value found.
        value: u64,
        /// What the schema allows there.
        expected: &'static str,
    },
    /// The message lists in `critical` (key 2) keys this implementation does not know.
    #[error("unsupported critical keys {0:?}")]
    UnsupportedCritical(Vec<u64>),
}

impl LocalError {
    /// The result code the agent answers this error with in a Denied, when it can tell the
    /// request id.
    pub fn result_code(&self) -> ResultCode {
        match self {
            LocalError::Decode(e) => e.result_code(),
            LocalError::UnsupportedCritical(_) => ResultCode::UnsupportedOption,
            _ => ResultCode::MalformedRequest,
        }
    }
}

/// Checks a received frame header and returns the length of the body that follows.
pub fn frame_body_len(header: [u8; FRAME_HEADER_LEN]) -> Result<usize, LocalError> {
    let len = u32::from_be_bytes(header);
    let len = usize::try_from(len).unwrap_or(usize::MAX);
    if len == 0 {
        Err(LocalError::EmptyFrame)
    } else if len > MAX_FRAME_BODY_LEN {
        Err(LocalError::FrameTooLarge {
            len,
            limit: MAX_FRAME_BODY_LEN,
        })
    } else {
        Ok(len)
    }
}

/// Encodes a message as one frame: the length header, then deterministic CBOR.
///
/// Like [`codec::encode`] it writes what it is given, without validating; a body over
/// [`MAX_FRAME_BODY_LEN`] (a Leases answer with very many leases) is written all the same and
/// the receiver refuses it.
pub fn encode_frame(msg: &LocalMessage) -> Vec<u8> {
    let body = encode_body(msg);
    let len = u32::try_from(body.len()).unwrap_or(u32::MAX);
    let mut frame = Vec::with_capacity(FRAME_HEADER_LEN + body.len());
    frame.extend_from_slice(&len.to_be_bytes());
    frame.extend_from_slice(&body);
    frame
}

/// Encodes a message's body (the CBOR item, without the frame header).
pub fn encode_body(msg: &LocalMessage) -> Vec<u8> {
    let value = match msg {
        LocalMessage::Wire(m) => return codec::encode(m),
        LocalMessage::Denied(d) => denied_value(d),
        LocalMessage::Watch(w) => {
            let mut m = Map::new(TYPE_WATCH, &w.common);
            if let Some(lease) = w.lease {
                m.push(3, Value::Bytes(lease.0.to_vec()));
            }
            m.finish()
        }
        LocalMessage::Watching(w) => Map::new(TYPE_WATCHING, &w.common).finish(),
        LocalMessage::Event(e) => {
            let mut m = Map::new(TYPE_EVENT, &e.common);
            m.push(3, Value::Bytes(e.lease.0.to_vec()));
            m.push(4, uint(e.kind.number()));
            if let Some(ms) = e.expires_in_ms {
                m.push(5, uint(ms));
            }
            if let Some(reason) = &e.reason {
                m.push(6, Value::Text(reason.clone()));
            }
            if let Some(code) = e.code {
                m.push(7, uint(code.number()));
            }
            if let Some(lease) = e.new_lease {
                m.push(8, Value::Bytes(lease.0.to_vec()));
            }
            m.finish()
        }
        LocalMessage::Status(s) => Map::new(TYPE_STATUS, &s.common).finish(),
        LocalMessage::StatusAnswer(s) => {
            let mut m = Map::new(TYPE_STATUS_ANSWER, &s.common);
            m.push(3, Value::Text(s.agent_version.clone()));
            m.push(4, Value::Text(s.gateway.clone()));
            m.push(5, Value::Bool(s.connected));
            if let Some(epoch) = s.epoch {
                m.push(6, uint(epoch));
            }
            m.push(7, Value::Text(s.mirror_mode.clone()));
            if let Some(identity) = &s.identity {
                m.push(8, Value::Text(identity.clone()));
            }
            m.push(9, uint(s.leases));
            if let Some(error) = &s.last_error {
                m.push(10, Value::Text(error.clone()));
            }
            if let Some(version) = s.api_version {
                m.push(11, uint(version));
            }
            m.finish()
        }
    };
    let mut out = Vec::with_capacity(64);
    // Serialising a `Value` into a `Vec` cannot fail: the writer cannot fail and a `Value`
    // holds nothing serde could refuse. Should it ever, the empty body is refused by the
    // receiver rather than panicking here.
    if ciborium::into_writer(&value, &mut out).is_err() {
        out.clear();
    }
    out
}

fn denied_value(d: &LocalDenied) -> Value {
    let mut m = Map::new(MessageType::Denied.number(), &d.common);
    m.push(3, uint(d.code.number()));
    if let Some(reason) = &d.reason {
        m.push(4, Value::Text(reason.clone()));
    }
    if let Some(retry) = d.retry_after {
        m.push(5, uint(u64::from(retry)));
    }
    if let Some(lease) = d.lease {
        m.push(6, Value::Bytes(lease.0.to_vec()));
    }
    if !d.unsupported.is_empty() {
        m.push(
            7,
            Value::Array(d.unsupported.iter().map(|k| uint(*k)).collect()),
        );
    }
    m.finish()
}

/// A message map under construction; keys are pushed in ascending order, which deterministic
/// encoding requires.
struct Map(Vec<(Value, Value)>);

impl Map {
    fn new(type_number: u64, common: &Common) -> Self {
        let mut m = Map(Vec::with_capacity(10));
        m.push(0, uint(type_number));
        if let Some(id) = common.request_id {
            m.push(1, uint(id));
        }
        if !common.critical.is_empty() {
            m.push(
                2,
                Value::Array(common.critical.iter().map(|k| uint(*k)).collect()),
            );
        }
        m
    }

    fn push(&mut self, key: u64, value: Value) {
        self.0.push((uint(key), value));
    }

    fn finish(self) -> Value {
        Value::Map(self.0)
    }
}

fn uint(n: u64) -> Value {
    Value::Integer(n.into())
}

/// Decodes the body of one frame (the bytes after its header).
///
/// Strict and bounded: the body must be at most [`MAX_FRAME_BODY_LEN`] bytes and pass every
/// check of [`codec::decode`]; unknown keys are ignored; never panics.
pub fn decode_frame_body(body: &[u8]) -> Result<LocalMessage, LocalError> {
    if body.is_empty() {
        return Err(LocalError::EmptyFrame);
    }
    if body.len() > MAX_FRAME_BODY_LEN {
        return Err(LocalError::FrameTooLarge {
            len: body.len(),
            limit: MAX_FRAME_BODY_LEN,
        });
    }
    let msg = match codec::decode(body) {
        Ok(Message::Denied(d)) => LocalMessage::Denied(d.into()),
        Ok(m) => match m.message_type() {
            MessageType::Open
            | MessageType::Release
            | MessageType::List
            | MessageType::Granted
            | MessageType::Leases
            | MessageType::Released => LocalMessage::Wire(m),
            other => return Err(LocalError::NotLocal(other.name())),
        },
        // The wire codec refuses a type it does not know, or a Denied code outside its
        // registry, only after it has parsed the whole item and checked its form (size,
        // nesting, tags, trailing bytes, the top-level keys, must-understand for Denied): what
        // is left is reading the fields of a flat map, which a general-purpose parser can do
        // safely.
        Err(DecodeError::UnknownMessageType(t))
            if (TYPE_WATCH..=TYPE_STATUS_ANSWER).contains(&t) =>
        {
            decode_local(t, body)?
        }
        Err(DecodeError::OutOfRange {
            at: Place::Message(MessageType::Denied),
            key: 3,
            value,
            ..
        }) if LocalCode::from_number(value).is_some() => {
            decode_local(MessageType::Denied.number(), body)?
        }
        Err(e) => return Err(e.into()),
    };
    if msg.request_id().is_none() && !matches!(msg, LocalMessage::Event(_)) {
        return Err(LocalError::MissingRequestId(type_name(msg.type_number())));
    }
    Ok(msg)
}

fn type_name(t: u64) -> &'static str {
    match t {
        TYPE_WATCH => "watch",
        TYPE_WATCHING => "watching",
        TYPE_EVENT => "event",
        TYPE_STATUS => "status",
        TYPE_STATUS_ANSWER => "status-answer",
        _ => MessageType::from_number(t).map_or("unknown", MessageType::name),
    }
}

/// The highest top-level key the local API defines for a local message type (or Denied).
fn highest_known_key(t: u64) -> u64 {
    match t {
        TYPE_WATCH => 3,
        TYPE_WATCHING | TYPE_STATUS => 2,
        TYPE_EVENT => 8,
        TYPE_STATUS_ANSWER => 11,
        _ => 7, // Denied
    }
}

/// The fields of a local message's map, read from a [`Value`].
struct Fields {
    message: &'static str,
    entries: Vec<(u64, Value)>,
}

impl Fields {
    fn get(&self, key: u64) -> Option<&Value> {
        self.entries.iter().find(|(k, _)| *k == key).map(|(_, v)| v)
    }

    fn require(&self, key: u64) -> Result<&Value, LocalError> {
        self.get(key).ok_or(LocalError::MissingKey {
            message: self.message,
            key,
        })
    }

    fn wrong_type(&self, key: u64, expected: &'static str) -> LocalError {
        LocalError::WrongType {
            message: self.message,
            key,
            expected,
        }
    }

    fn as_uint(&self, key: u64, v: &Value) -> Result<u64, LocalError> {
        match v {
            Value::Integer(i) => {
                u64::try_from(*i).map_err(|_| self.wrong_type(key, "an unsigned integer"))
            }
            _ => Err(self.wrong_type(key, "an unsigned integer")),
        }
    }

    fn opt_uint(&self, key: u64) -> Result<Option<u64>, LocalError> {
        self.get(key).map(|v| self.as_uint(key, v)).transpose()
    }

    fn uint(&self, key: u64) -> Result<u64, LocalError> {
        self.as_uint(key, self.require(key)?)
    }

    fn opt_u32(&self, key: u64) -> Result<Option<u32>, LocalError> {
        self.opt_uint(key)?
            .map(|n| {
                u32::try_from(n).map_err(|_| LocalError::OutOfRange {
                    message: self.message,
                    key,
                    value: n,
                    expected: "at most 2^32-1",
                })
            })
            .transpose()
    }

    fn as_text(&self, key: u64, v: &Value) -> Result<String, LocalError> {
        match v {
            Value::Text(t) => Ok(t.clone()),
            _ => Err(self.wrong_type(key, "a text string")),
        }
    }

    fn text(&self, key: u64) -> Result<String, LocalError> {
        self.as_text(key, self.require(key)?)
    }

    fn opt_text(&self, key: u64) -> Result<Option<String>, LocalError> {
        self.get(key).map(|v| self.as_text(key, v)).transpose()
    }

    /// A reason text: at most [`MAX_REASON_LEN`] bytes, as on the wire.
    fn opt_reason(&self, key: u64) -> Result<Option<String>, LocalError> {
        let text = self.opt_text(key)?;
        match &text {
            Some(t) if t.len() > MAX_REASON_LEN => {
                Err(LocalError::Decode(DecodeError::TextLength {
                    at: Place::Envelope,
                    key,
                    len: t.len(),
                    min: 0,
                    max: MAX_REASON_LEN,
                }))
            }
            _ => Ok(text),
        }
    }

    /// StatusAnswer key 7: one of the three modes.
    fn mirror_mode(&self) -> Result<String, LocalError> {
        let mode = self.text(7)?;
        if ["enforce", "monitor", "off"].contains(&mode.as_str()) {
            Ok(mode)
        } else {
            Err(self.wrong_type(7, "\"enforce\", \"monitor\" or \"off\""))
        }
    }

    fn bool(&self, key: u64) -> Result<bool, LocalError> {
        match self.require(key)? {
            Value::Bool(b) => Ok(*b),
            _ => Err(self.wrong_type(key, "a boolean")),
        }
    }

    fn as_lease(&self, key: u64, v: &Value) -> Result<LeaseId, LocalError> {
        match v {
            Value::Bytes(b) => <[u8; 16]>::try_from(b.as_slice())
                .map(LeaseId)
                .map_err(|_| self.wrong_type(key, "a 16-byte lease id")),
            _ => Err(self.wrong_type(key, "a 16-byte lease id")),
        }
    }

    fn lease(&self, key: u64) -> Result<LeaseId, LocalError> {
        self.as_lease(key, self.require(key)?)
    }

    fn opt_lease(&self, key: u64) -> Result<Option<LeaseId>, LocalError> {
        self.get(key).map(|v| self.as_lease(key, v)).transpose()
    }

    /// A list the schema writes `[+ uint]` (`critical`, Denied key 7): absent, or not empty.
    fn uint_list(&self, key: u64) -> Result<Vec<u64>, LocalError> {
        match self.get(key) {
            None => Ok(Vec::new()),
            Some(Value::Array(items)) if items.is_empty() => {
                Err(LocalError::Decode(DecodeError::EmptyList {
                    at: Place::Envelope,
                    key,
                }))
            }
            Some(Value::Array(items)) => items.iter().map(|v| self.as_uint(key, v)).collect(),
            Some(_) => Err(self.wrong_type(key, "an array of unsigned integers")),
        }
    }

    fn code(&self, key: u64, n: u64) -> Result<DenialCode, LocalError> {
        DenialCode::from_number(n).ok_or(LocalError::OutOfRange {
            message: self.message,
            key,
            value: n,
            expected: "a registered result code or local code",
        })
    }
}

/// Decodes a local message (or a Denied with a local code) of type `t`, whose form the wire
/// codec has already checked.
fn decode_local(t: u64, body: &[u8]) -> Result<LocalMessage, LocalError> {
    let message = type_name(t);
    let malformed =
        |reason: &'static str| LocalError::Decode(DecodeError::InvalidCbor { offset: 0, reason });
    // The recursion limit is a second guard; the wire codec has bounded the nesting already.
    let value: Value = ciborium::de::from_reader_with_recursion_limit(body, MAX_NESTING_DEPTH + 2)
        .map_err(|_| malformed("not a CBOR item"))?;
    let Value::Map(pairs) = value else {
        return Err(LocalError::Decode(DecodeError::NotAMap));
    };
    let mut entries = Vec::with_capacity(pairs.len());
    for (k, v) in pairs {
        let key = match k {
            Value::Integer(i) => u64::try_from(i).ok(),
            _ => None,
        };
        let Some(key) = key else {
            return Err(LocalError::Decode(DecodeError::KeyNotUnsigned {
                at: Place::Envelope,
            }));
        };
        entries.push((key, v));
    }
    let f = Fields { message, entries };

    let critical = f.uint_list(2)?;
    let mut unsupported: Vec<u64> = Vec::new();
    for key in &critical {
        if *key > highest_known_key(t) && !unsupported.contains(key) {
            unsupported.push(*key);
        }
    }
    if !unsupported.is_empty() {
        return Err(LocalError::UnsupportedCritical(unsupported));
    }
    let common = Common {
        request_id: f.opt_uint(1)?,
        critical,
    };

    Ok(match t {
        TYPE_WATCH => LocalMessage::Watch(Watch {
            common,
            lease: f.opt_lease(3)?,
        }),
        TYPE_WATCHING => LocalMessage::Watching(Watching { common }),
        TYPE_EVENT => {
            let n = f.uint(4)?;
            let kind = EventKind::from_number(n).ok_or(LocalError::OutOfRange {
                message,
                key: 4,
                value: n,
                expected: "an event kind, 1 to 8",
            })?;
            LocalMessage::Event(Event {
                common,
                lease: f.lease(3)?,
                kind,
                expires_in_ms: f.opt_uint(5)?,
                reason: f.opt_reason(6)?,
                // A code of a later version (a local code above 1027) leaves the event standing
                // without it: a lost lease is lost whatever the reason (local API 12.3).
                code: f.opt_uint(7)?.and_then(DenialCode::from_number),
                new_lease: f.opt_lease(8)?,
            })
        }
        TYPE_STATUS => LocalMessage::Status(Status { common }),
        TYPE_STATUS_ANSWER => LocalMessage::StatusAnswer(StatusAnswer {
            common,
            agent_version: f.text(3)?,
            gateway: f.text(4)?,
            connected: f.bool(5)?,
            epoch: f.opt_uint(6)?,
            mirror_mode: f.mirror_mode()?,
            identity: f.opt_text(8)?,
            leases: f.uint(9)?,
            last_error: f.opt_reason(10)?,
            api_version: f.opt_uint(11)?,
        }),
        _ => {
            let n = f.uint(3)?;
            LocalMessage::Denied(LocalDenied {
                common,
                code: f.code(3, n)?,
                reason: f.opt_reason(4)?,
                retry_after: f.opt_u32(5)?,
                lease: f.opt_lease(6)?,
                unsupported: f.uint_list(7)?,
            })
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::message::{
        Grant, Granted, HostAddresses, List, Open, Opening, PortRange, Protocol, Target,
    };
    use proptest::prelude::*;

    fn common(id: u64) -> Common {
        Common {
            request_id: Some(id),
            critical: vec![],
        }
    }

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn status_frame_bytes_are_deterministic() {
        let frame = encode_frame(&LocalMessage::Status(Status { common: common(7) }));
        // 4-byte length 6, then {0: 67, 1: 7}.
        assert_eq!(frame, hex("00000006a20018430107"));
    }

    #[test]
    fn local_denied_code_round_trips_and_names_owner() {
        let denied = LocalMessage::Denied(LocalDenied {
            common: common(3),
            code: DenialCode::Local(LocalCode::PortNotOwned),
            reason: Some("tcp/8080 is bound by pid 1234 (nginx), not by the caller".into()),
            retry_after: None,
            lease: None,
            unsupported: vec![],
        });
        let frame = encode_frame(&denied);
        assert_eq!(decode_frame_body(&frame[4..]), Ok(denied));
    }

    #[test]
    fn wire_denied_decodes_as_local_denied() {
        let wire = Message::Denied(Denied {
            common: common(9),
            code: ResultCode::DeniedByPolicy,
            reason: Some("rule 3".into()),
            retry_after: Some(5),
            lease: None,
            unsupported: vec![],
        });
        let bytes = codec::encode(&wire);
        let Ok(LocalMessage::Denied(d)) = decode_frame_body(&bytes) else {
            panic!("not a local denied");
        };
        assert_eq!(d.code, DenialCode::Wire(ResultCode::DeniedByPolicy));
        // The local encoding of the same denial is byte for byte the wire's.
        assert_eq!(encode_body(&LocalMessage::Denied(d)), bytes);
    }

    #[test]
    fn unknown_denial_code_is_refused() {
        // {0: 17, 1: 1, 3: 2000}: 2000 is in neither registry.
        assert!(matches!(
            decode_frame_body(&hex("a300110101031907d0")),
            Err(LocalError::Decode(DecodeError::OutOfRange {
                value: 2000,
                ..
            }))
        ));
    }

    #[test]
    fn request_id_is_mandatory_except_on_events() {
        let list = Message::List(List::default());
        assert_eq!(
            decode_frame_body(&codec::encode(&list)),
            Err(LocalError::MissingRequestId("list"))
        );
        let watch = LocalMessage::Watch(Watch {
            common: Common::default(),
            lease: None,
        });
        assert_eq!(
            decode_frame_body(&encode_body(&watch)),
            Err(LocalError::MissingRequestId("watch"))
        );
        let event = LocalMessage::Event(Event {
            common: Common::default(),
            lease: LeaseId([1; 16]),
            kind: EventKind::Revoked,
            expires_in_ms: None,
            reason: Some("operator".into()),
            code: None,
            new_lease: None,
        });
        assert_eq!(decode_frame_body(&encode_body(&event)), Ok(event));
    }

    #[test]
    fn wire_only_messages_are_refused() {
        let hello = Message::Hello(crate::message::Hello {
            common: common(1),
            versions: vec![1],
            capabilities: crate::message::Capabilities(0),
            software: None,
        });
        assert_eq!(
            decode_frame_body(&codec::encode(&hello)),
            Err(LocalError::NotLocal("hello"))
        );
    }

    #[test]
    fn unknown_keys_are_ignored_and_unknown_critical_keys_refused() {
        // {0: 67, 1: 2, 20: "x"}: key 20 unknown, ignored.
        assert_eq!(
            decode_frame_body(&hex("a30018430102146178")).map(|m| m.request_id()),
            Ok(Some(2))
        );
        // {0: 67, 1: 2, 2: [20], 20: 0}
        assert_eq!(
            decode_frame_body(&hex("a400184301020281141400")),
            Err(LocalError::UnsupportedCritical(vec![20]))
        );
    }

    /// A StatusAnswer body built by hand, with `extra` entries after the mandatory keys.
    fn status_answer_body(extra: Vec<(u64, Value)>) -> Vec<u8> {
        let mut pairs = vec![
            (0u64, Value::from(TYPE_STATUS_ANSWER)),
            (1, Value::from(9u64)),
            (3, Value::Text("0.1.0".into())),
            (4, Value::Text("gw.example:4433".into())),
            (5, Value::Bool(true)),
            (7, Value::Text("enforce".into())),
            (9, Value::from(0u64)),
        ];
        pairs.extend(extra);
        pairs.sort_by_key(|(k, _)| *k);
        let map = Value::Map(
            pairs
                .into_iter()
                .map(|(k, v)| (Value::from(k), v))
                .collect(),
        );
        let mut out = Vec::new();
        ciborium::into_writer(&map, &mut out).unwrap();
        out
    }

    #[test]
    fn status_answer_states_its_api_version_in_key_11() {
        // An agent that leaves key 11 out implements version 1.
        let Ok(LocalMessage::StatusAnswer(old)) = decode_frame_body(&status_answer_body(vec![]))
        else {
            panic!("a StatusAnswer without key 11 decodes");
        };
        assert_eq!(old.api_version, None);
        assert_eq!(old.implemented_api_version(), 1);

        // Key 11 is read, and a critical list may name it.
        let body = status_answer_body(vec![
            (2, Value::Array(vec![Value::from(11u64)])),
            (11, Value::from(4u64)),
        ]);
        let Ok(LocalMessage::StatusAnswer(new)) = decode_frame_body(&body) else {
            panic!("a StatusAnswer with key 11 decodes");
        };
        assert_eq!(new.api_version, Some(4));
        assert_eq!(new.implemented_api_version(), 4);

        // Key 11 must be an unsigned integer; key 12 is not defined.
        assert!(
            decode_frame_body(&status_answer_body(vec![(11, Value::Text("1".into()))])).is_err()
        );
        assert_eq!(
            decode_frame_body(&status_answer_body(vec![
                (2, Value::Array(vec![Value::from(12u64)])),
                (12, Value::from(0u64)),
            ])),
            Err(LocalError::UnsupportedCritical(vec![12]))
        );

        // The encoder writes key 11 when the answer carries it.
        let mut again = new.clone();
        again.common.critical.clear();
        let frame = encode_frame(&LocalMessage::StatusAnswer(again.clone()));
        let value: Value = ciborium::from_reader(&frame[FRAME_HEADER_LEN..]).unwrap();
        let Value::Map(pairs) = value else {
            panic!("a map")
        };
        assert!(pairs.contains(&(Value::from(11u64), Value::from(4u64))));
        assert_eq!(
            decode_frame_body(&frame[FRAME_HEADER_LEN..]),
            Ok(LocalMessage::StatusAnswer(again))
        );
    }

    #[test]
    fn malformed_local_bodies_give_typed_errors() {
        // Event without its lease id: {0: 66, 4: 1}
        assert_eq!(
            decode_frame_body(&hex("a20018420401")),
            Err(LocalError::MissingKey {
                message: "event",
                key: 3
            })
        );
        // Event with kind 9.
        let mut bytes = hex("a300184203500000000000000000000000000000000004");
        bytes.push(0x09);
        assert!(matches!(
            decode_frame_body(&bytes),
            Err(LocalError::OutOfRange {
                key: 4,
                value: 9,
                ..
            })
        ));
        // A tag inside a local message is refused by the first pass.
        assert_eq!(
            decode_frame_body(&hex("a2001843 01c101".replace(' ', "").as_str())),
            Err(LocalError::Decode(DecodeError::TagNotAllowed { tag: 1 }))
        );
        // Trailing bytes.
        assert_eq!(
            decode_frame_body(&hex("a200184301020000")),
            Err(LocalError::Decode(DecodeError::TrailingBytes { extra: 2 }))
        );
        assert_eq!(decode_frame_body(&[]), Err(LocalError::EmptyFrame));
        let big = vec![0u8; MAX_FRAME_BODY_LEN + 1];
        assert!(matches!(
            decode_frame_body(&big),
            Err(LocalError::FrameTooLarge { .. })
        ));
    }

    #[test]
    fn frame_headers_are_bounded() {
        assert_eq!(frame_body_len([0, 0, 0, 0]), Err(LocalError::EmptyFrame));
        assert_eq!(frame_body_len([0, 0, 0x40, 0]), Ok(MAX_FRAME_BODY_LEN));
        assert!(matches!(
            frame_body_len([0, 0, 0x40, 1]),
            Err(LocalError::FrameTooLarge { len: 16385, .. })
        ));
        assert!(frame_body_len([0xff; 4]).is_err());
    }

    #[test]
    fn open_and_granted_travel_as_wire_messages() {
        let open = LocalMessage::Wire(Message::Open(Open {
            common: common(11),
            opening: Opening {
                target: Target::Ports {
                    protocol: Protocol::Tcp,
                    ports: PortRange::single(8080),
                },
                host: HostAddresses::Default,
                family: None,
                remotes: vec![],
            },
            lifetime: Some(600),
            app: None,
        }));
        let frame = encode_frame(&open);
        assert_eq!(decode_frame_body(&frame[4..]), Ok(open));
        let granted = LocalMessage::Wire(Message::Granted(Granted {
            common: common(11),
            lease: LeaseId([2; 16]),
            // At least one grant: the schema refuses a Granted with none.
            grants: vec![Grant {
                protocol: Protocol::Tcp,
                ports: PortRange::single(8080),
                host: "192.0.2.10".parse().unwrap(),
                remotes: vec![],
                app: None,
            }],
            lifetime: 600,
            expires_ms: 1,
            renew_after: 300,
            epoch: 4,
            narrowed: false,
        }));
        assert_eq!(decode_frame_body(&encode_body(&granted)), Ok(granted));
    }

    fn arb_common(mandatory: bool) -> impl Strategy<Value = Common> {
        let id = if mandatory {
            any::<u64>().prop_map(Some).boxed()
        } else {
            proptest::option::of(any::<u64>()).boxed()
        };
        (id, proptest::collection::vec(0u64..=2, 0..2)).prop_map(|(request_id, critical)| Common {
            request_id,
            critical,
        })
    }

    fn arb_lease() -> impl Strategy<Value = LeaseId> {
        any::<[u8; 16]>().prop_map(LeaseId)
    }

    fn arb_code() -> impl Strategy<Value = DenialCode> {
        prop_oneof![
            proptest::sample::select(ResultCode::ALL.to_vec()).prop_map(DenialCode::Wire),
            proptest::sample::select(LocalCode::ALL.to_vec()).prop_map(DenialCode::Local),
        ]
    }

    fn arb_message() -> impl Strategy<Value = LocalMessage> {
        prop_oneof![
            (arb_common(true), proptest::option::of(arb_lease()))
                .prop_map(|(common, lease)| LocalMessage::Watch(Watch { common, lease })),
            arb_common(true).prop_map(|common| LocalMessage::Watching(Watching { common })),
            arb_common(true).prop_map(|common| LocalMessage::Status(Status { common })),
            (
                arb_common(false),
                arb_lease(),
                proptest::sample::select(EventKind::ALL.to_vec()),
                proptest::option::of(any::<u64>()),
                proptest::option::of(".{0,20}"),
                proptest::option::of(arb_code()),
                proptest::option::of(arb_lease()),
            )
                .prop_map(
                    |(common, lease, kind, expires_in_ms, reason, code, new_lease)| {
                        LocalMessage::Event(Event {
                            common,
                            lease,
                            kind,
                            expires_in_ms,
                            reason,
                            code,
                            new_lease,
                        })
                    }
                ),
            (
                arb_common(true),
                ".{0,20}",
                ".{0,20}",
                any::<bool>(),
                proptest::option::of(any::<u64>()),
                prop_oneof![Just("enforce"), Just("monitor"), Just("off")],
                proptest::option::of(".{0,20}"),
                any::<u64>(),
                proptest::option::of(".{0,40}"),
                proptest::option::of(any::<u64>()),
            )
                .prop_map(
                    |(
                        common,
                        agent_version,
                        gateway,
                        connected,
                        epoch,
                        mode,
                        identity,
                        leases,
                        last_error,
                        api_version,
                    )| {
                        LocalMessage::StatusAnswer(StatusAnswer {
                            common,
                            agent_version,
                            gateway,
                            connected,
                            epoch,
                            mirror_mode: mode.to_owned(),
                            identity,
                            leases,
                            last_error,
                            api_version,
                        })
                    }
                ),
            (
                arb_common(true),
                arb_code(),
                proptest::option::of(".{0,20}"),
                proptest::option::of(any::<u32>()),
                proptest::option::of(arb_lease()),
                proptest::collection::vec(64u64..100, 0..3),
            )
                .prop_map(|(common, code, reason, retry_after, lease, unsupported)| {
                    LocalMessage::Denied(LocalDenied {
                        common,
                        code,
                        reason,
                        retry_after,
                        lease,
                        unsupported,
                    })
                }),
            (
                arb_common(true),
                any::<u16>().prop_filter("port", |p| *p > 0)
            )
                .prop_map(|(common, port)| LocalMessage::Wire(Message::Release(
                    crate::message::Release {
                        common,
                        lease: LeaseId([port as u8; 16]),
                    }
                ))),
        ]
    }

    proptest! {
        #[test]
        fn round_trip(msg in arb_message()) {
            let frame = encode_frame(&msg);
            let len = frame_body_len([frame[0], frame[1], frame[2], frame[3]]).unwrap();
            prop_assert_eq!(len, frame.len() - FRAME_HEADER_LEN);
            prop_assert_eq!(decode_frame_body(&frame[FRAME_HEADER_LEN..]), Ok(msg.clone()));
            // Deterministic: encoding the decoded message gives the same bytes.
            let again = encode_frame(&decode_frame_body(&frame[FRAME_HEADER_LEN..]).unwrap());
            prop_assert_eq!(again, frame);
        }

        #[test]
        fn decoding_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode_frame_body(&bytes);
        }

        #[test]
        fn decoding_mutated_frames_never_panics(msg in arb_message(), flip in any::<(usize, u8)>()) {
            let mut body = encode_body(&msg);
            let i = flip.0 % body.len();
            body[i] ^= flip.1;
            let _ = decode_frame_body(&body);
        }
    }
}
