//! The CBOR codec of FWNP/1: [`encode`] a [`Message`] as deterministic CBOR, [`decode`] bytes
//! from the network into a [`Message`], strictly and within fixed bounds.
//!
//! # What each layer refuses
//!
//! Decoding is about *form*: is this one well-formed CBOR item of at most
//! [`MAX_MESSAGE_SIZE`] bytes, nested at most [`MAX_NESTING_DEPTH`] deep, without tags, whose
//! maps have unique unsigned integer keys, and does every key this implementation knows carry a
//! value of the type and numeric range `spec/fwnp.cddl` gives it (a port is at most 65535, a
//! lease id is 16 bytes, a protocol is 6, 17, 132 or 136...)? Decoding also applies the
//! must-understand rule (`critical`, key 2) and the opening's shape rule (ports *or* an
//! application id). An array the schema writes `[+ ...]` must not be empty: an empty list of
//! remote prefixes would otherwise read as "from any". Unknown keys are ignored, in the message
//! map and in every nested map.
//!
//! Decoding does not judge *meaning*: port 0, a reversed port range, a prefix with host bits
//! set, an IPv4 prefix longer than 32, a host address of the wrong family, an app id with a
//! forbidden character and a lifetime above [`crate::MAX_LIFETIME_SECS`] all decode, and
//! [`crate::validate`] refuses them. What the schema says is the decoder's to refuse, text
//! lengths included; what it cannot say is validation's. A gateway therefore calls
//! [`decode`] and then [`crate::validate::validate_request`], and answers a failure of either
//! with a Denied carrying [`DecodeError::result_code`] or
//! [`crate::validate::ValidationError::result_code`].
//!
//! # Encoding
//!
//! [`encode`] builds a [`ciborium::Value`] map with integer keys in ascending order and lets
//! ciborium serialise it, which gives RFC 8949 section 4.2.1 core deterministic encoding: the
//! shortest form of every integer and length, definite lengths only. Absent optional keys are
//! left out, and so are `critical` when empty, `narrowed` when false, Hello's capabilities
//! when 0 (absent means none), a remote prefix list when empty (it means "any") and Denied's
//! list of unsupported keys when empty. Key 3 of an opening or grant (the last port) is
//! written only when it differs from the first port.
//!
//! # Decoding
//!
//! [`decode`] does not use a general-purpose deserialiser: a small parser written for this
//! protocol checks the size before reading anything, counts nesting before descending (so its
//! recursion is never deeper than [`MAX_NESTING_DEPTH`] calls, whatever the input), refuses a
//! tag as soon as it sees its header (a general decoder would turn tags 2 and 3 into integers
//! silently), never allocates more than the input could hold, and accepts every well-formed
//! item the rules allow, indefinite lengths and non-shortest integers included.

use std::borrow::Cow;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ciborium::Value;
use ciborium_ll::{Encoder, Header, simple};

use crate::message::*;
use crate::validate::{
    MAX_APP_NAME_LEN, MAX_EXECUTABLE_LEN, MAX_IDENTITY_LEN, MAX_REASON_LEN, MAX_SOFTWARE_LEN,
};

// ---------------------------------------------------------------------------------------------
// Errors

/// Where in a message a decoding error was found: the map whose key is at fault.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Place {
    /// The top-level map, before its type (key 0) is known.
    Envelope,
    /// The top-level map of a message of this type.
    Message(MessageType),
    /// An opening (Open key 3).
    Opening,
    /// A grant (in Granted key 4 or a lease-info's key 2).
    Grant,
    /// An app-info map (Open key 5, lease-info key 5).
    AppInfo,
    /// The limits map (Welcome key 5).
    Limits,
    /// A lease-info map (Leases key 3).
    LeaseInfo,
}

impl std::fmt::Display for Place {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Place::Envelope => f.write_str("message"),
            Place::Message(t) => write!(f, "{} message", t.name()),
            Place::Opening => f.write_str("opening"),
            Place::Grant => f.write_str("grant"),
            Place::AppInfo => f.write_str("app-info"),
            Place::Limits => f.write_str("limits"),
            Place::LeaseInfo => f.write_str("lease-info"),
        }
    }
}

/// Why bytes are not an acceptable FWNP/1 message.
///
/// Every variant maps to the result code a gateway answers with ([`DecodeError::result_code`])
/// and has a stable short name ([`DecodeError::kind`]) used by the test vectors.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// The input is longer than the limit; nothing was parsed.
    #[error("message of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge {
        /// Bytes received.
        size: usize,
        /// The limit, [`MAX_MESSAGE_SIZE`].
        limit: usize,
    },
    /// Arrays and maps are nested deeper than the limit (the message map is depth 1).
    #[error("arrays and maps nested deeper than {limit}")]
    NestingTooDeep {
        /// The limit, [`MAX_NESTING_DEPTH`].
        limit: usize,
    },
    /// The input is not well-formed CBOR (truncated, a reserved header, a stray break, text
    /// that is not UTF-8...).
    #[error("not well-formed CBOR at byte {offset}: {reason}")]
    InvalidCbor {
        /// Where the parser stopped.
        offset: usize,
        /// What was wrong.
        reason: &'static str,
    },
    /// Bytes follow the message's CBOR item.
    #[error("{extra} bytes after the message")]
    TrailingBytes {
        /// How many.
        extra: usize,
    },
    /// A CBOR tag appears somewhere in the item; FWNP/1 uses none.
    #[error("CBOR tag {tag} is not allowed")]
    TagNotAllowed {
        /// The tag number.
        tag: u64,
    },
    /// The top-level item is not a map.
    #[error("a message is a CBOR map")]
    NotAMap,
    /// A map defined by FWNP has a key that is not an unsigned integer.
    #[error("{at} has a key that is not an unsigned integer")]
    KeyNotUnsigned {
        /// The map.
        at: Place,
    },
    /// A map has the same key twice: a map of the protocol or one inside an ignored value.
    #[error("a map at depth {depth} holds {} twice", .key.map_or_else(|| "a key".to_owned(), |k| format!("key {k}")))]
    DuplicateKey {
        /// The map's depth (the message map is depth 1).
        depth: usize,
        /// The key, when it is an unsigned integer.
        key: Option<u64>,
    },
    /// Key 0 names a message type FWNP/1 does not define.
    #[error("unknown message type {0}")]
    UnknownMessageType(u64),
    /// Key 0 names a message that is not a request, on a request stream ([`decode_request`]).
    #[error("a {} message is not a request", .0.name())]
    NotARequest(MessageType),
    /// A mandatory key is absent.
    #[error("{at} lacks mandatory key {key}")]
    MissingKey {
        /// The map.
        at: Place,
        /// The key.
        key: u64,
    },
    /// A key's value has the wrong CBOR type.
    #[error("key {key} of {at} must be {expected}")]
    WrongType {
        /// The map.
        at: Place,
        /// The key.
        key: u64,
        /// What the schema allows there.
        expected: &'static str,
    },
    /// A number is outside the range or the registry the schema gives it.
    #[error("key {key} of {at} holds {value}, which is not {expected}")]
    OutOfRange {
        /// The map.
        at: Place,
        /// The key.
        key: u64,
        /// The value found.
        value: u64,
        /// What the schema allows there.
        expected: &'static str,
    },
    /// A byte string has the wrong length (a lease id, an address).
    #[error("key {key} of {at} is {len} bytes long, not {expected}")]
    WrongLength {
        /// The map.
        at: Place,
        /// The key.
        key: u64,
        /// The length found.
        len: usize,
        /// What the schema allows there.
        expected: &'static str,
    },
    /// An array the schema requires to hold at least one element (`[+ ...]`) is empty: the
    /// versions of a Hello, `critical`, remote prefixes, the grants of Granted or a lease-info,
    /// Denied's unsupported keys.
    #[error("key {key} of {at} is an empty array; it must hold at least one element")]
    EmptyList {
        /// The map.
        at: Place,
        /// The key.
        key: u64,
    },
    /// A text string outside the length the schema gives it (Hello's software, Welcome's
    /// identity, app-info's name and executable, a reason text). Application ids are checked
    /// by validation instead, with their characters.
    #[error("key {key} of {at} is {len} bytes long; the schema allows {min} to {max}")]
    TextLength {
        /// The map.
        at: Place,
        /// The key.
        key: u64,
        /// Its length in bytes.
        len: usize,
        /// The shortest allowed.
        min: usize,
        /// The longest allowed.
        max: usize,
    },
    /// An Open or Renew asks for a lifetime (key 4) too large even for 32 bits. Like any
    /// lifetime asked above [`crate::MAX_LIFETIME_SECS`] (which validation refuses), it is
    /// answered `lifetime-out-of-range`.
    #[error(
        "lifetime {asked} s is above the maximum of {} s",
        crate::MAX_LIFETIME_SECS
    )]
    LifetimeOutOfRange {
        /// The lifetime asked, in seconds.
        asked: u64,
    },
    /// An opening carries both ports (keys 1 to 3) and an application id (key 7).
    #[error("an opening names ports (keys 1-3) and an application (key 7); it may name only one")]
    ConflictingTarget,
    /// An opening carries neither ports (keys 1 and 2) nor an application id (key 7).
    #[error("an opening names neither ports (keys 1, 2) nor an application (key 7)")]
    MissingTarget,
    /// The message lists in `critical` (key 2) keys this implementation does not know; they
    /// are given once each, in ascending order.
    #[error("unsupported critical keys {0:?}")]
    UnsupportedCritical(Vec<u64>),
}

impl DecodeError {
    /// The result code a gateway answers this error with in a Denied.
    ///
    /// Schema faults inside an opening or a grant (a missing key, a wrong type, a value out of
    /// range, a wrong length, an empty list) and an opening's shape are `malformed-option`;
    /// unknown critical keys are `unsupported-option`; everything else is `malformed-request`,
    /// including the structural faults of a map (a key that is not an unsigned integer, a
    /// duplicate key) wherever the map is, as spec Section 6.6 says.
    /// (An oversized request on a stream is not answered at all: the gateway resets the stream
    /// with `MessageTooLarge`; the mapping is given for callers that decode from elsewhere.)
    pub fn result_code(&self) -> ResultCode {
        match self {
            DecodeError::UnsupportedCritical(_) => ResultCode::UnsupportedOption,
            DecodeError::LifetimeOutOfRange { .. } => ResultCode::LifetimeOutOfRange,
            DecodeError::ConflictingTarget | DecodeError::MissingTarget => {
                ResultCode::MalformedOption
            }
            DecodeError::MissingKey { at, .. }
            | DecodeError::WrongType { at, .. }
            | DecodeError::OutOfRange { at, .. }
            | DecodeError::WrongLength { at, .. }
            | DecodeError::EmptyList { at, .. }
            | DecodeError::TextLength { at, .. }
                if matches!(at, Place::Opening | Place::Grant) =>
            {
                ResultCode::MalformedOption
            }
            _ => ResultCode::MalformedRequest,
        }
    }

    /// A stable short name of the variant, as used in `spec/vectors/`.
    pub fn kind(&self) -> &'static str {
        match self {
            DecodeError::TooLarge { .. } => "too-large",
            DecodeError::NestingTooDeep { .. } => "nesting-too-deep",
            DecodeError::InvalidCbor { .. } => "invalid-cbor",
            DecodeError::TrailingBytes { .. } => "trailing-bytes",
            DecodeError::TagNotAllowed { .. } => "tag-not-allowed",
            DecodeError::NotAMap => "not-a-map",
            DecodeError::KeyNotUnsigned { .. } => "key-not-unsigned",
            DecodeError::DuplicateKey { .. } => "duplicate-key",
            DecodeError::UnknownMessageType(_) => "unknown-message-type",
            DecodeError::NotARequest(_) => "not-a-request",
            DecodeError::MissingKey { .. } => "missing-key",
            DecodeError::WrongType { .. } => "wrong-type",
            DecodeError::OutOfRange { .. } => "out-of-range",
            DecodeError::WrongLength { .. } => "wrong-length",
            DecodeError::EmptyList { .. } => "empty-list",
            DecodeError::TextLength { .. } => "text-length",
            DecodeError::LifetimeOutOfRange { .. } => "lifetime-out-of-range",
            DecodeError::ConflictingTarget => "conflicting-target",
            DecodeError::MissingTarget => "missing-target",
            DecodeError::UnsupportedCritical(_) => "unsupported-critical",
        }
    }

    /// The critical keys not understood, for Denied key 7 (empty for other errors).
    pub fn unsupported_keys(&self) -> &[u64] {
        match self {
            DecodeError::UnsupportedCritical(keys) => keys,
            _ => &[],
        }
    }

    /// The Denied that answers a request failing with this error: its result code, the error
    /// as the reason, the unsupported critical keys, and the request id (use
    /// [`peek_request_id`] on the request's bytes to find it).
    pub fn to_denied(&self, request_id: Option<u64>) -> Denied {
        Denied {
            common: Common {
                request_id,
                critical: Vec::new(),
            },
            code: self.result_code(),
            reason: Some(reason_text(&self.to_string())),
            retry_after: None,
            lease: None,
            unsupported: self.unsupported_keys().to_vec(),
        }
    }
}

/// Shortens a Denied's list of unsupported critical keys (key 7) and its reason (key 4) so that
/// the answer, whose encoded size `encoded_len` gives for a list and a reason, fits in
/// [`MAX_MESSAGE_SIZE`] (spec Section 5.4): a request of that size may list some 5,000
/// critical keys that are not understood, and the answer lists them again beside its reason.
/// When they do not fit, the reason only counts them and the list keeps the smallest (it is in
/// ascending order), as many as fit: at least one, since a key takes at most 9 bytes.
///
/// ```
/// use fwnp_proto::codec::fit_unsupported;
///
/// let mut keys: Vec<u64> = (1000..7000).collect();
/// let mut reason = Some("unsupported critical keys [...]".to_owned());
/// // An answer of 20 bytes, a byte per reason byte and three per key.
/// let size = |keys: &[u64], reason: Option<&str>| 20 + reason.map_or(0, str::len) + 3 * keys.len();
/// fit_unsupported(&mut keys, &mut reason, size);
/// assert!(size(&keys, reason.as_deref()) <= fwnp_proto::MAX_MESSAGE_SIZE);
/// assert_eq!(keys[..2], [1000, 1001]);
/// assert_eq!(reason.as_deref(), Some("6000 unsupported critical keys; the smallest that fit in an answer are listed"));
/// ```
pub fn fit_unsupported(
    unsupported: &mut Vec<u64>,
    reason: &mut Option<String>,
    mut encoded_len: impl FnMut(&[u64], Option<&str>) -> usize,
) {
    if encoded_len(unsupported, reason.as_deref()) <= MAX_MESSAGE_SIZE {
        return;
    }
    *reason = Some(format!(
        "{} unsupported critical keys; the smallest that fit in an answer are listed",
        unsupported.len()
    ));
    // Each round drops, from the largest keys, at least as many bytes as the answer is over
    // (a key's encoding and, once, the array header's shrinking aside): one round or two.
    for _ in 0..4 {
        let len = encoded_len(unsupported, reason.as_deref());
        if len <= MAX_MESSAGE_SIZE {
            return;
        }
        let mut over = len - MAX_MESSAGE_SIZE;
        while over > 0 && unsupported.len() > 1 {
            let key = unsupported.pop().unwrap_or_default();
            over = over.saturating_sub(encoded_uint_len(key));
        }
    }
}

/// The bytes CBOR takes for the unsigned integer `value` (RFC 8949 section 3).
fn encoded_uint_len(value: u64) -> usize {
    match value {
        0..=23 => 1,
        24..=0xff => 2,
        0x100..=0xffff => 3,
        0x1_0000..=0xffff_ffff => 5,
        _ => 9,
    }
}

/// A reason text cut to the 512 bytes the schema allows, on a character boundary.
pub fn reason_text(text: &str) -> String {
    const MAX: usize = MAX_REASON_LEN;
    if text.len() <= MAX {
        return text.to_owned();
    }
    let mut end = MAX;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}

// ---------------------------------------------------------------------------------------------
// Encoding

/// Encodes a message as deterministic CBOR.
///
/// The encoder writes what it is given: it does not validate (a reversed range is written as
/// it is), so that tests can produce invalid requests. Use [`crate::validate`] first where it
/// matters.
pub fn encode(msg: &Message) -> Vec<u8> {
    // Most messages fit (a Granted of one grant is about 75 bytes), so that the buffer is not
    // grown while writing.
    let mut out = Vec::with_capacity(128);
    encode_into(msg, &mut out);
    out
}

/// Appends the deterministic CBOR encoding of a message to `out`. Written straight into `out`:
/// an answer is encoded for every request, and a tree of values built first cost an allocation
/// per map, array and string.
pub fn encode_into(msg: &Message, out: &mut Vec<u8>) {
    let t = msg.message_type();
    let mut m = MapWriter::new(out);
    m.uint(0, t.number());
    let common = msg.common();
    m.opt_uint(1, common.request_id);
    if !common.critical.is_empty() {
        m.array(2, &common.critical, |out, k| put_uint(out, *k));
    }
    match msg {
        Message::Hello(h) => {
            m.array(3, &h.versions, |out, v| put_uint(out, u64::from(*v)));
            // Absent and 0 mean the same (no capability); the deterministic form omits it.
            if h.capabilities.0 != 0 {
                m.uint(4, h.capabilities.0);
            }
            m.opt_text(5, h.software.as_deref());
        }
        Message::Welcome(w) => {
            m.uint(3, u64::from(w.version));
            m.uint(4, w.capabilities.0);
            m.map(5, |m| limits_into(m, &w.limits));
            m.uint(6, w.epoch);
            m.uint(7, w.time_ms);
            m.text(8, &w.identity);
            m.array(9, &w.addresses, |out, a| put_addr(out, *a));
        }
        Message::Open(o) => {
            m.map(3, |m| opening_into(m, &o.opening));
            m.opt_uint(4, o.lifetime.map(u64::from));
            if let Some(app) = &o.app {
                m.map(5, |m| app_info_into(m, app));
            }
        }
        Message::Renew(r) => {
            m.bytes(3, &r.lease.0);
            m.opt_uint(4, r.lifetime.map(u64::from));
        }
        Message::Release(r) => m.bytes(3, &r.lease.0),
        Message::List(_) => {}
        Message::Granted(g) => {
            m.bytes(3, &g.lease.0);
            m.array(4, &g.grants, |out, g| put_map(out, |m| grant_into(m, g)));
            m.uint(5, u64::from(g.lifetime));
            m.uint(6, g.expires_ms);
            m.uint(7, u64::from(g.renew_after));
            m.uint(8, g.epoch);
            if g.narrowed {
                m.bool(9, true);
            }
        }
        Message::Denied(d) => {
            m.uint(3, d.code.number());
            m.opt_text(4, d.reason.as_deref());
            m.opt_uint(5, d.retry_after.map(u64::from));
            if let Some(lease) = &d.lease {
                m.bytes(6, &lease.0);
            }
            if !d.unsupported.is_empty() {
                m.array(7, &d.unsupported, |out, k| put_uint(out, *k));
            }
        }
        Message::Leases(l) => {
            m.array(3, &l.leases, |out, l| {
                put_map(out, |m| lease_info_into(m, l));
            });
            m.uint(4, l.epoch);
        }
        Message::Released(r) => m.bytes(3, &r.lease.0),
        Message::Revoked(r) => {
            m.bytes(3, &r.lease.0);
            m.uint(4, r.reason.number());
            m.opt_text(5, r.text.as_deref());
        }
        Message::EpochChanged(e) => m.uint(3, e.epoch),
        Message::GoingAway(g) => {
            m.opt_uint(3, g.reconnect_after.map(u64::from));
            m.opt_text(4, g.reason.as_deref());
        }
    }
    m.finish();
}

/// The length in bytes of the message's encoding.
pub fn encoded_len(msg: &Message) -> usize {
    encode(msg).len()
}

/// The message as a [`ciborium::Value`] map with integer keys in ascending order: its encoding
/// read back.
pub fn to_value(msg: &Message) -> Value {
    // Deterministic CBOR of integers, strings, arrays, maps and booleans, made just above: every
    // such item has a `Value`.
    ciborium::from_reader(encode(msg).as_slice())
        .expect("the codec's own encoding reads back as a CBOR value")
}

/// Writes a CBOR item's header. Writing into memory has no failure path.
fn put_header(out: &mut Vec<u8>, header: Header) {
    let _ = Encoder::from(out).push(header);
}

fn put_uint(out: &mut Vec<u8>, n: u64) {
    put_header(out, Header::Positive(n));
}

fn put_bytes(out: &mut Vec<u8>, bytes: &[u8]) {
    put_header(out, Header::Bytes(Some(bytes.len())));
    out.extend_from_slice(bytes);
}

fn put_text(out: &mut Vec<u8>, text: &str) {
    put_header(out, Header::Text(Some(text.len())));
    out.extend_from_slice(text.as_bytes());
}

fn put_addr(out: &mut Vec<u8>, addr: IpAddr) {
    match addr {
        IpAddr::V4(a) => put_bytes(out, &a.octets()),
        IpAddr::V6(a) => put_bytes(out, &a.octets()),
    }
}

fn put_array<T>(out: &mut Vec<u8>, items: &[T], mut each: impl FnMut(&mut Vec<u8>, &T)) {
    put_header(out, Header::Array(Some(items.len())));
    for item in items {
        each(out, item);
    }
}

fn put_map(out: &mut Vec<u8>, entries: impl FnOnce(&mut MapWriter<'_>)) {
    let mut m = MapWriter::new(out);
    entries(&mut m);
    m.finish();
}

fn put_prefixes(out: &mut Vec<u8>, prefixes: &[Prefix]) {
    put_array(out, prefixes, |out, p| {
        put_header(out, Header::Array(Some(2)));
        put_addr(out, p.addr);
        put_uint(out, u64::from(p.len));
    });
}

/// Writes a map's entries; callers add keys in ascending order, which the deterministic
/// encoding requires (for unsigned integers numeric order is also the order of their
/// encodings). The map's header, which holds the number of entries, is written in front of
/// them once they are all there.
struct MapWriter<'a> {
    out: &'a mut Vec<u8>,
    /// Where the header goes: one byte is kept for it, enough for the 23 entries a map of
    /// FWNP/1 stays under.
    at: usize,
    entries: usize,
    last_key: Option<u64>,
}

impl<'a> MapWriter<'a> {
    fn new(out: &'a mut Vec<u8>) -> Self {
        let at = out.len();
        out.push(0);
        MapWriter {
            out,
            at,
            entries: 0,
            last_key: None,
        }
    }

    /// Writes `key` and gives the buffer for its value.
    fn key(&mut self, key: u64) -> &mut Vec<u8> {
        debug_assert!(
            self.last_key.is_none_or(|last| last < key),
            "map keys must be added in ascending order"
        );
        self.last_key = Some(key);
        self.entries += 1;
        put_uint(self.out, key);
        self.out
    }

    fn uint(&mut self, key: u64, value: u64) {
        put_uint(self.key(key), value);
    }

    fn opt_uint(&mut self, key: u64, value: Option<u64>) {
        if let Some(v) = value {
            self.uint(key, v);
        }
    }

    fn text(&mut self, key: u64, value: &str) {
        put_text(self.key(key), value);
    }

    fn opt_text(&mut self, key: u64, value: Option<&str>) {
        if let Some(v) = value {
            self.text(key, v);
        }
    }

    fn bytes(&mut self, key: u64, value: &[u8]) {
        put_bytes(self.key(key), value);
    }

    fn bool(&mut self, key: u64, value: bool) {
        let simple = if value { simple::TRUE } else { simple::FALSE };
        put_header(self.key(key), Header::Simple(simple));
    }

    fn addr(&mut self, key: u64, value: IpAddr) {
        put_addr(self.key(key), value);
    }

    fn array<T>(&mut self, key: u64, items: &[T], each: impl FnMut(&mut Vec<u8>, &T)) {
        put_array(self.key(key), items, each);
    }

    fn map(&mut self, key: u64, entries: impl FnOnce(&mut MapWriter<'_>)) {
        put_map(self.key(key), entries);
    }

    fn finish(self) {
        let mut header = [0u8; 9];
        let mut free = &mut header[..];
        let _ = Encoder::from(&mut free).push(Header::Map(Some(self.entries)));
        let len = 9 - free.len();
        self.out
            .splice(self.at..self.at + 1, header[..len].iter().copied());
    }
}

fn ports_into(m: &mut MapWriter<'_>, protocol: Protocol, ports: PortRange) {
    m.uint(1, u64::from(protocol.number()));
    m.uint(2, u64::from(ports.first));
    if ports.last != ports.first {
        m.uint(3, u64::from(ports.last));
    }
}

fn opening_into(m: &mut MapWriter<'_>, o: &Opening) {
    if let Target::Ports { protocol, ports } = &o.target {
        ports_into(m, *protocol, *ports);
    }
    match &o.host {
        HostAddresses::Default => {}
        HostAddresses::One(host) => m.addr(4, *host),
        HostAddresses::List(hosts) => m.array(4, hosts, |out, h| put_addr(out, *h)),
    }
    if let Some(family) = o.family {
        m.uint(5, family.number());
    }
    if !o.remotes.is_empty() {
        put_prefixes(m.key(6), &o.remotes);
    }
    if let Target::App(app) = &o.target {
        m.text(7, app);
    }
}

fn grant_into(m: &mut MapWriter<'_>, g: &Grant) {
    ports_into(m, g.protocol, g.ports);
    m.addr(4, g.host);
    if !g.remotes.is_empty() {
        put_prefixes(m.key(6), &g.remotes);
    }
    m.opt_text(7, g.app.as_deref());
}

fn app_info_into(m: &mut MapWriter<'_>, a: &AppInfo) {
    m.opt_text(1, a.name.as_deref());
    m.opt_text(2, a.executable.as_deref());
    m.opt_uint(3, a.uid.map(u64::from));
    m.opt_uint(4, a.pid.map(u64::from));
}

fn limits_into(m: &mut MapWriter<'_>, l: &Limits) {
    m.uint(1, u64::from(l.max_message_size));
    m.uint(2, u64::from(l.max_streams));
    m.uint(3, u64::from(l.min_lifetime));
    m.uint(4, u64::from(l.max_lifetime));
    m.opt_uint(5, l.max_leases.map(u64::from));
}

fn lease_info_into(m: &mut MapWriter<'_>, l: &LeaseInfo) {
    m.bytes(1, &l.lease.0);
    m.array(2, &l.grants, |out, g| put_map(out, |m| grant_into(m, g)));
    m.uint(3, u64::from(l.remaining));
    m.uint(4, l.expires_ms);
    if let Some(app) = &l.app {
        m.map(5, |m| app_info_into(m, app));
    }
}

// ---------------------------------------------------------------------------------------------
// Parsing CBOR into a small tree

/// One parsed CBOR data item. Tags never get here (the parser refuses them). FWNP/1 uses no
/// negative integers, floats or unassigned simple values, so they are only ever acceptable
/// inside an ignored value; they keep their values so that two keys of an ignored map compare
/// as RFC 8949's data model does (Section 6.3 rule 9 holds there too).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Item<'a> {
    Uint(u64),
    /// -1 - the argument.
    Negative(u64),
    /// Borrowed from the input, unless it came in chunks.
    Bytes(Cow<'a, [u8]>),
    /// Borrowed from the input, unless it came in chunks.
    Text(Cow<'a, str>),
    Array(Vec<Item<'a>>),
    Map(Vec<(Item<'a>, Item<'a>)>),
    Bool(bool),
    Null,
    Undefined,
    Simple(u8),
    /// The value's bits as an `f64`, whatever the width it was written in: a half, a single
    /// and a double of one value are one value of the data model. Every NaN is one value,
    /// whatever its payload (spec Section 6.3 rule 9).
    Float(u64),
}

impl Item<'_> {
    fn float(value: f64) -> Self {
        Item::Float(if value.is_nan() { f64::NAN } else { value }.to_bits())
    }
}

struct Parser<'a> {
    input: &'a [u8],
    pos: usize,
}

/// What a header says: the major type and its argument, or an indefinite length.
#[derive(Clone, Copy)]
enum Arg {
    Value(u64),
    Indefinite,
}

const BREAK: u8 = 0xff;

impl<'a> Parser<'a> {
    fn invalid(&self, reason: &'static str) -> DecodeError {
        DecodeError::InvalidCbor {
            offset: self.pos,
            reason,
        }
    }

    fn remaining(&self) -> usize {
        self.input.len().saturating_sub(self.pos)
    }

    fn byte(&mut self) -> Result<u8, DecodeError> {
        let b = *self
            .input
            .get(self.pos)
            .ok_or_else(|| self.invalid("unexpected end of input"))?;
        self.pos += 1;
        Ok(b)
    }

    fn peek(&self) -> Option<u8> {
        self.input.get(self.pos).copied()
    }

    fn take(&mut self, len: u64) -> Result<&'a [u8], DecodeError> {
        let len = usize::try_from(len)
            .ok()
            .filter(|len| *len <= self.remaining())
            .ok_or_else(|| self.invalid("length beyond the end of input"))?;
        let start = self.pos;
        self.pos += len;
        self.input
            .get(start..start + len)
            .ok_or_else(|| self.invalid("length beyond the end of input"))
    }

    /// Reads a header: the major type (0 to 7), the additional information and its argument.
    fn header(&mut self) -> Result<(u8, u8, Arg), DecodeError> {
        let initial = self.byte()?;
        let major = initial >> 5;
        let info = initial & 0x1f;
        let arg = match info {
            0..=23 => Arg::Value(u64::from(info)),
            24 => Arg::Value(u64::from(self.byte()?)),
            25 => Arg::Value(be_uint(self.take(2)?)),
            26 => Arg::Value(be_uint(self.take(4)?)),
            27 => Arg::Value(be_uint(self.take(8)?)),
            28..=30 => {
                self.pos -= 1;
                return Err(self.invalid("reserved additional information 28-30"));
            }
            _ => Arg::Indefinite,
        };
        Ok((major, info, arg))
    }

    /// Parses one item whose container is at depth `parent_depth` (0 for the top level).
    fn item(&mut self, parent_depth: usize) -> Result<Item<'a>, DecodeError> {
        let start = self.pos;
        let (major, info, arg) = self.header()?;
        match (major, arg) {
            (0, Arg::Value(n)) => Ok(Item::Uint(n)),
            (1, Arg::Value(n)) => Ok(Item::Negative(n)),
            (2, Arg::Value(len)) => Ok(Item::Bytes(Cow::Borrowed(self.take(len)?))),
            (3, Arg::Value(len)) => {
                let bytes = self.take(len)?;
                let text = std::str::from_utf8(bytes).map_err(|_| DecodeError::InvalidCbor {
                    offset: start,
                    reason: "text string is not UTF-8",
                })?;
                Ok(Item::Text(Cow::Borrowed(text)))
            }
            (2 | 3, Arg::Indefinite) => self.chunked_string(major, start),
            (4 | 5, _) => {
                let depth = parent_depth + 1;
                if depth > MAX_NESTING_DEPTH {
                    return Err(DecodeError::NestingTooDeep {
                        limit: MAX_NESTING_DEPTH,
                    });
                }
                if major == 4 {
                    self.array(arg, depth)
                } else {
                    self.map(arg, depth)
                }
            }
            (6, Arg::Value(tag)) => Err(DecodeError::TagNotAllowed { tag }),
            (7, Arg::Value(n)) => match info {
                20 => Ok(Item::Bool(false)),
                21 => Ok(Item::Bool(true)),
                22 => Ok(Item::Null),
                23 => Ok(Item::Undefined),
                0..=19 => Ok(Item::Simple(info)),
                // A one-byte simple value below 32 is ill-formed (RFC 8949 section 3.3).
                24 if n < 32 => {
                    self.pos = start;
                    Err(self.invalid("two-byte simple value below 32"))
                }
                24 => Ok(Item::Simple(n as u8)),
                25 => Ok(Item::float(half::f16::from_bits(n as u16).to_f64())),
                26 => Ok(Item::float(f64::from(f32::from_bits(n as u32)))),
                _ => Ok(Item::float(f64::from_bits(n))),
            },
            (7, Arg::Indefinite) => {
                self.pos = start;
                Err(self.invalid("break outside an indefinite-length item"))
            }
            _ => {
                self.pos = start;
                Err(self.invalid("indefinite length on an integer or a tag"))
            }
        }
    }

    /// An indefinite-length byte or text string: definite chunks of the same type, then break.
    fn chunked_string(&mut self, major: u8, start: usize) -> Result<Item<'a>, DecodeError> {
        let mut bytes = Vec::new();
        loop {
            if self.peek() == Some(BREAK) {
                self.pos += 1;
                break;
            }
            let chunk_start = self.pos;
            let (chunk_major, _, arg) = self.header()?;
            let len = match arg {
                Arg::Value(len) if chunk_major == major => len,
                _ => {
                    self.pos = chunk_start;
                    return Err(self.invalid(
                        "chunk of an indefinite-length string is not a definite string of its type",
                    ));
                }
            };
            let chunk = self.take(len)?;
            if major == 3 && std::str::from_utf8(chunk).is_err() {
                return Err(DecodeError::InvalidCbor {
                    offset: chunk_start,
                    reason: "text string is not UTF-8",
                });
            }
            bytes.extend_from_slice(chunk);
        }
        if major == 2 {
            Ok(Item::Bytes(Cow::Owned(bytes)))
        } else {
            String::from_utf8(bytes)
                .map(|text| Item::Text(Cow::Owned(text)))
                .map_err(|_| DecodeError::InvalidCbor {
                    offset: start,
                    reason: "text string is not UTF-8",
                })
        }
    }

    fn array(&mut self, arg: Arg, depth: usize) -> Result<Item<'a>, DecodeError> {
        let mut items = Vec::with_capacity(presized(&arg));
        match arg {
            Arg::Value(count) => {
                // Every item takes at least one byte: a count beyond the input is truncation,
                // found here before anything is allocated for it.
                if count > self.remaining() as u64 {
                    return Err(self.invalid("array longer than the input"));
                }
                for _ in 0..count {
                    items.push(self.item(depth)?);
                }
            }
            Arg::Indefinite => loop {
                if self.peek() == Some(BREAK) {
                    self.pos += 1;
                    break;
                }
                items.push(self.item(depth)?);
            },
        }
        Ok(Item::Array(items))
    }

    fn map(&mut self, arg: Arg, depth: usize) -> Result<Item<'a>, DecodeError> {
        let mut entries = Vec::with_capacity(presized(&arg));
        match arg {
            Arg::Value(count) => {
                if count > (self.remaining() / 2) as u64 {
                    return Err(self.invalid("map longer than the input"));
                }
                for _ in 0..count {
                    let key = self.item(depth)?;
                    let value = self.item(depth)?;
                    entries.push((key, value));
                }
            }
            Arg::Indefinite => loop {
                if self.peek() == Some(BREAK) {
                    self.pos += 1;
                    break;
                }
                let key = self.item(depth)?;
                if self.peek() == Some(BREAK) {
                    return Err(self.invalid("map ends after a key without its value"));
                }
                let value = self.item(depth)?;
                entries.push((key, value));
            },
        }
        Ok(Item::Map(entries))
    }
}

/// Room made at once for the items of an array or map of a definite length: all of them up to
/// 16 (every map of FWNP/1 and nearly every array), so that a request's maps are not grown item
/// by item; beyond, it grows as the items are actually there, and a length the input cannot
/// hold costs no more than 16.
fn presized(arg: &Arg) -> usize {
    match arg {
        Arg::Value(count) => usize::try_from(*count).unwrap_or(usize::MAX).min(16),
        Arg::Indefinite => 0,
    }
}

fn be_uint(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b))
}

/// Parses exactly one CBOR item from `bytes`, with the rules that concern the whole item
/// applied: size, well-formedness, trailing bytes, nesting, tags, and unique keys in every map
/// (spec Section 6.3 rules 1 to 6 and 9), so that they come before any rule about a map of the
/// protocol, as the order of Section 6.6 has it.
fn parse(bytes: &[u8]) -> Result<Item<'_>, DecodeError> {
    let (item, extra) = parse_first(bytes)?;
    if extra > 0 {
        return Err(DecodeError::TrailingBytes { extra });
    }
    unique_keys(&item, 0)?;
    Ok(item)
}

/// `item` as a value of the data model that compares as one: the entries of every map inside
/// it sorted, since a map's order is not part of its value (spec Section 6.3 rule 9).
fn as_value<'a>(item: &Item<'a>) -> Item<'a> {
    match item {
        Item::Array(items) => Item::Array(items.iter().map(as_value).collect()),
        Item::Map(entries) => {
            let mut entries: Vec<(Item<'a>, Item<'a>)> = entries
                .iter()
                .map(|(k, v)| (as_value(k), as_value(v)))
                .collect();
            entries.sort_unstable();
            Item::Map(entries)
        }
        other => other.clone(),
    }
}

/// Refuses a map, anywhere in `item` (a map or array at depth `depth + 1`), that holds one key
/// twice. Not part of [`parse_first`]: a request id stays readable in a map with another key
/// twice (spec Section 6.6). The recursion is as deep as the nesting the parser allowed.
fn unique_keys(item: &Item<'_>, depth: usize) -> Result<(), DecodeError> {
    let depth = depth + 1;
    match item {
        Item::Array(items) => items.iter().try_for_each(|i| unique_keys(i, depth)),
        Item::Map(entries) => {
            // The maps of FWNP/1 hold a few keys: compared in pairs, they need no allocation;
            // a large (ignored) map is sorted instead, to stay linearithmic.
            const PAIRWISE: usize = 16;
            let compound =
                |(key, _): &(Item<'_>, Item<'_>)| matches!(key, Item::Array(_) | Item::Map(_));
            let twice = if entries.iter().any(compound) {
                // Keys that hold maps compare as values, whatever the order of their entries.
                let mut keys: Vec<(Item<'_>, &Item<'_>)> =
                    entries.iter().map(|(k, _)| (as_value(k), k)).collect();
                keys.sort_unstable();
                keys.windows(2).find(|w| w[0].0 == w[1].0).map(|w| w[0].1)
            } else if entries.len() <= PAIRWISE {
                entries
                    .iter()
                    .enumerate()
                    .find(|(i, (key, _))| entries[..*i].iter().any(|(k, _)| k == key))
                    .map(|(_, (key, _))| key)
            } else {
                let mut keys: Vec<&Item<'_>> = entries.iter().map(|(k, _)| k).collect();
                keys.sort_unstable();
                keys.windows(2).find(|w| w[0] == w[1]).map(|w| w[0])
            };
            if let Some(key) = twice {
                return Err(DecodeError::DuplicateKey {
                    depth,
                    key: match key {
                        Item::Uint(k) => Some(*k),
                        _ => None,
                    },
                });
            }
            entries.iter().try_for_each(|(k, v)| {
                unique_keys(k, depth)?;
                unique_keys(v, depth)
            })
        }
        _ => Ok(()),
    }
}

/// Parses the first CBOR item of `bytes`, which may be at most [`MAX_MESSAGE_SIZE`] long, and
/// says how many bytes follow it.
fn parse_first(bytes: &[u8]) -> Result<(Item<'_>, usize), DecodeError> {
    if bytes.len() > MAX_MESSAGE_SIZE {
        return Err(DecodeError::TooLarge {
            size: bytes.len(),
            limit: MAX_MESSAGE_SIZE,
        });
    }
    let mut parser = Parser {
        input: bytes,
        pos: 0,
    };
    let item = parser.item(0)?;
    Ok((item, parser.remaining()))
}

// ---------------------------------------------------------------------------------------------
// From the tree to messages

/// The entries of a map FWNP defines, with its keys checked (unsigned; [`parse`] found them
/// unique). Looked up in place: such a map holds a few keys, and every message's decoding reads
/// several of them, where an index would cost an allocation per map.
struct Fields<'a> {
    at: Place,
    entries: &'a [(Item<'a>, Item<'a>)],
}

impl<'a> Fields<'a> {
    fn new(at: Place, entries: &'a [(Item<'a>, Item<'a>)]) -> Result<Self, DecodeError> {
        if entries.iter().any(|(key, _)| !matches!(key, Item::Uint(_))) {
            return Err(DecodeError::KeyNotUnsigned { at });
        }
        Ok(Fields { at, entries })
    }

    /// The map in `item`, which is the value of `key` in `self`.
    fn nested(&self, key: u64, item: &'a Item<'a>, at: Place) -> Result<Fields<'a>, DecodeError> {
        match item {
            Item::Map(entries) => Fields::new(at, entries),
            _ => Err(self.wrong_type(key, "a map")),
        }
    }

    fn get(&self, key: u64) -> Option<&'a Item<'a>> {
        self.entries
            .iter()
            .find_map(|(k, value)| (*k == Item::Uint(key)).then_some(value))
    }

    fn require(&self, key: u64) -> Result<&'a Item<'a>, DecodeError> {
        self.get(key)
            .ok_or(DecodeError::MissingKey { at: self.at, key })
    }

    fn wrong_type(&self, key: u64, expected: &'static str) -> DecodeError {
        DecodeError::WrongType {
            at: self.at,
            key,
            expected,
        }
    }

    fn out_of_range(&self, key: u64, value: u64, expected: &'static str) -> DecodeError {
        DecodeError::OutOfRange {
            at: self.at,
            key,
            value,
            expected,
        }
    }

    fn wrong_length(&self, key: u64, len: usize, expected: &'static str) -> DecodeError {
        DecodeError::WrongLength {
            at: self.at,
            key,
            len,
            expected,
        }
    }

    // Conversions of one item, the value of `key` (or an element of its array).

    fn as_uint(&self, key: u64, item: &Item<'_>) -> Result<u64, DecodeError> {
        match item {
            Item::Uint(n) => Ok(*n),
            _ => Err(self.wrong_type(key, "an unsigned integer")),
        }
    }

    fn as_u32(&self, key: u64, item: &Item<'_>) -> Result<u32, DecodeError> {
        let n = self.as_uint(key, item)?;
        u32::try_from(n).map_err(|_| self.out_of_range(key, n, "at most 2^32-1"))
    }

    fn as_u16(
        &self,
        key: u64,
        item: &Item<'_>,
        expected: &'static str,
    ) -> Result<u16, DecodeError> {
        let n = self.as_uint(key, item)?;
        u16::try_from(n).map_err(|_| self.out_of_range(key, n, expected))
    }

    fn as_text(&self, key: u64, item: &'a Item<'a>) -> Result<&'a str, DecodeError> {
        match item {
            Item::Text(t) => Ok(t),
            _ => Err(self.wrong_type(key, "a text string")),
        }
    }

    fn as_array(
        &self,
        key: u64,
        item: &'a Item<'a>,
        expected: &'static str,
    ) -> Result<&'a [Item<'a>], DecodeError> {
        match item {
            Item::Array(items) => Ok(items),
            _ => Err(self.wrong_type(key, expected)),
        }
    }

    /// An array that must hold at least one element (`[+ ...]` in the schema).
    fn as_nonempty_array(
        &self,
        key: u64,
        item: &'a Item<'a>,
        expected: &'static str,
    ) -> Result<&'a [Item<'a>], DecodeError> {
        match self.as_array(key, item, expected)? {
            [] => Err(DecodeError::EmptyList { at: self.at, key }),
            items => Ok(items),
        }
    }

    fn as_lease_id(&self, key: u64, item: &Item<'_>) -> Result<LeaseId, DecodeError> {
        match item {
            Item::Bytes(b) => <[u8; 16]>::try_from(b.as_ref())
                .map(LeaseId)
                .map_err(|_| self.wrong_length(key, b.len(), "16")),
            _ => Err(self.wrong_type(key, "a byte string (lease id)")),
        }
    }

    fn as_addr(&self, key: u64, item: &Item<'_>) -> Result<IpAddr, DecodeError> {
        match item {
            Item::Bytes(b) => {
                if let Ok(v4) = <[u8; 4]>::try_from(b.as_ref()) {
                    Ok(IpAddr::V4(Ipv4Addr::from(v4)))
                } else if let Ok(v6) = <[u8; 16]>::try_from(b.as_ref()) {
                    Ok(IpAddr::V6(Ipv6Addr::from(v6)))
                } else {
                    Err(self.wrong_length(key, b.len(), "4 or 16"))
                }
            }
            _ => Err(self.wrong_type(key, "a byte string (address)")),
        }
    }

    fn as_prefixes(&self, key: u64, item: &Item<'_>) -> Result<Vec<Prefix>, DecodeError> {
        const EXPECTED: &str = "an array of [address, length] prefixes";
        let items = self.as_nonempty_array(key, item, EXPECTED)?;
        let mut prefixes = Vec::with_capacity(items.len());
        for prefix in items {
            let [addr, len] = self.as_array(key, prefix, EXPECTED)? else {
                return Err(self.wrong_type(key, EXPECTED));
            };
            let addr = self.as_addr(key, addr)?;
            let len = self.as_uint(key, len)?;
            let len = u8::try_from(len)
                .ok()
                .filter(|l| *l <= 128)
                .ok_or_else(|| self.out_of_range(key, len, "a prefix length, at most 128"))?;
            prefixes.push(Prefix { addr, len });
        }
        Ok(prefixes)
    }

    fn as_bool(&self, key: u64, item: &Item<'_>) -> Result<bool, DecodeError> {
        match item {
            Item::Bool(b) => Ok(*b),
            _ => Err(self.wrong_type(key, "a boolean")),
        }
    }

    /// A `[+ uint]`: `critical`, Denied's unsupported keys.
    fn as_uint_list(&self, key: u64, item: &Item<'_>) -> Result<Vec<u64>, DecodeError> {
        self.as_nonempty_array(key, item, "an array of unsigned integers")?
            .iter()
            .map(|k| match k {
                Item::Uint(n) => Ok(*n),
                _ => Err(self.wrong_type(key, "an array of unsigned integers")),
            })
            .collect()
    }

    // Typed getters by key.

    fn uint(&self, key: u64) -> Result<u64, DecodeError> {
        self.as_uint(key, self.require(key)?)
    }

    fn opt_uint(&self, key: u64) -> Result<Option<u64>, DecodeError> {
        self.get(key).map(|v| self.as_uint(key, v)).transpose()
    }

    fn u32(&self, key: u64) -> Result<u32, DecodeError> {
        self.as_u32(key, self.require(key)?)
    }

    fn opt_u32(&self, key: u64) -> Result<Option<u32>, DecodeError> {
        self.get(key).map(|v| self.as_u32(key, v)).transpose()
    }

    /// The lifetime asked by an Open or Renew: an unsigned integer that, above 32 bits, is
    /// refused as out of the lifetime's range rather than as malformed (spec Section 6.6).
    fn asked_lifetime(&self, key: u64) -> Result<Option<u32>, DecodeError> {
        self.get(key)
            .map(|v| {
                let asked = self.as_uint(key, v)?;
                u32::try_from(asked).map_err(|_| DecodeError::LifetimeOutOfRange { asked })
            })
            .transpose()
    }

    fn port(&self, key: u64) -> Result<u16, DecodeError> {
        self.as_u16(key, self.require(key)?, "a port, at most 65535")
    }

    fn opt_port(&self, key: u64) -> Result<Option<u16>, DecodeError> {
        self.get(key)
            .map(|v| self.as_u16(key, v, "a port, at most 65535"))
            .transpose()
    }

    fn text(&self, key: u64) -> Result<String, DecodeError> {
        self.as_text(key, self.require(key)?).map(str::to_owned)
    }

    fn opt_text(&self, key: u64) -> Result<Option<String>, DecodeError> {
        self.get(key)
            .map(|v| self.as_text(key, v).map(str::to_owned))
            .transpose()
    }

    /// A text of `min` to `max` bytes, as the schema's `tstr .size (min..max)`.
    fn bounded_text(&self, key: u64, min: usize, max: usize) -> Result<String, DecodeError> {
        let text = self.as_text(key, self.require(key)?)?;
        self.check_text_len(key, text, min, max)
    }

    /// An optional text of at most `max` bytes.
    fn opt_bounded_text(&self, key: u64, max: usize) -> Result<Option<String>, DecodeError> {
        self.get(key)
            .map(|v| self.check_text_len(key, self.as_text(key, v)?, 0, max))
            .transpose()
    }

    fn check_text_len(
        &self,
        key: u64,
        text: &str,
        min: usize,
        max: usize,
    ) -> Result<String, DecodeError> {
        if text.len() < min || text.len() > max {
            return Err(DecodeError::TextLength {
                at: self.at,
                key,
                len: text.len(),
                min,
                max,
            });
        }
        Ok(text.to_owned())
    }

    fn lease_id(&self, key: u64) -> Result<LeaseId, DecodeError> {
        self.as_lease_id(key, self.require(key)?)
    }

    fn protocol(&self, key: u64) -> Result<Protocol, DecodeError> {
        let n = self.uint(key)?;
        Protocol::from_number(n)
            .ok_or_else(|| self.out_of_range(key, n, "a protocol: 6, 17, 132 or 136"))
    }

    fn app_info(&self, key: u64) -> Result<Option<AppInfo>, DecodeError> {
        let Some(item) = self.get(key) else {
            return Ok(None);
        };
        let f = self.nested(key, item, Place::AppInfo)?;
        Ok(Some(AppInfo {
            name: f.opt_bounded_text(1, MAX_APP_NAME_LEN)?,
            executable: f.opt_bounded_text(2, MAX_EXECUTABLE_LEN)?,
            uid: f.opt_u32(3)?,
            pid: f.opt_u32(4)?,
        }))
    }

    fn grants(&self, key: u64) -> Result<Vec<Grant>, DecodeError> {
        let items = self.as_nonempty_array(key, self.require(key)?, "an array of grants")?;
        items
            .iter()
            .map(|item| {
                let g = self.nested(key, item, Place::Grant)?;
                decode_grant(&g)
            })
            .collect()
    }
}

fn decode_ports(f: &Fields<'_>) -> Result<(Protocol, PortRange), DecodeError> {
    let protocol = f.protocol(1)?;
    let first = f.port(2)?;
    let last = f.opt_port(3)?.unwrap_or(first);
    Ok((protocol, PortRange { first, last }))
}

fn decode_grant(f: &Fields<'_>) -> Result<Grant, DecodeError> {
    let (protocol, ports) = decode_ports(f)?;
    Ok(Grant {
        protocol,
        ports,
        host: f.as_addr(4, f.require(4)?)?,
        remotes: f
            .get(6)
            .map(|v| f.as_prefixes(6, v))
            .transpose()?
            .unwrap_or_default(),
        app: f.opt_text(7)?,
    })
}

fn decode_opening(f: &Fields<'_>) -> Result<Opening, DecodeError> {
    let has_ports = [1, 2, 3].iter().any(|k| f.get(*k).is_some());
    let has_app = f.get(7).is_some();
    let target = match (has_ports, has_app) {
        (true, true) => return Err(DecodeError::ConflictingTarget),
        (false, false) => return Err(DecodeError::MissingTarget),
        (true, false) => {
            let (protocol, ports) = decode_ports(f)?;
            Target::Ports { protocol, ports }
        }
        (false, true) => Target::App(f.text(7)?),
    };
    let family = match f.opt_uint(5)? {
        None => None,
        Some(n) => {
            Some(Family::from_number(n).ok_or_else(|| f.out_of_range(5, n, "a family: 4 or 6"))?)
        }
    };
    Ok(Opening {
        target,
        host: match f.get(4) {
            None => HostAddresses::Default,
            Some(item @ Item::Bytes(_)) => HostAddresses::One(f.as_addr(4, item)?),
            // An array of any length decodes: its length and duplicates are validation's to
            // refuse (malformed-option), as the schema's other ranges are.
            Some(item) => HostAddresses::List(
                f.as_array(4, item, "an address or an array of addresses")?
                    .iter()
                    .map(|a| f.as_addr(4, a))
                    .collect::<Result<_, _>>()?,
            ),
        },
        family,
        remotes: f
            .get(6)
            .map(|v| f.as_prefixes(6, v))
            .transpose()?
            .unwrap_or_default(),
    })
}

/// Decodes one FWNP/1 message, strictly and within the limits of the protocol.
///
/// See the [module documentation](self) for what decoding refuses and what it leaves to
/// [`crate::validate`].
pub fn decode(bytes: &[u8]) -> Result<Message, DecodeError> {
    decode_in(bytes, false)
}

/// Decodes one message read from a request stream: as [`decode`], and a known message type
/// that is not a request is refused where rule 10 of spec 6.3 stands in the order of spec
/// 6.6, after the item's structure and before `critical` and the message's keys.
///
/// ```
/// use fwnp_proto::codec::{DecodeError, decode, decode_request};
/// // A Welcome that lists an unknown critical key: on a request stream, first not a request.
/// let bytes = [0xa3, 0x00, 0x02, 0x01, 0x01, 0x02, 0x81, 0x18, 0x40];
/// assert!(matches!(decode(&bytes), Err(DecodeError::UnsupportedCritical(_))));
/// assert!(matches!(decode_request(&bytes), Err(DecodeError::NotARequest(_))));
/// ```
pub fn decode_request(bytes: &[u8]) -> Result<Message, DecodeError> {
    decode_in(bytes, true)
}

fn decode_in(bytes: &[u8], requests_only: bool) -> Result<Message, DecodeError> {
    let item = parse(bytes)?;
    let Item::Map(entries) = &item else {
        return Err(DecodeError::NotAMap);
    };
    let envelope = Fields::new(Place::Envelope, entries)?;
    let type_number = envelope.uint(0)?;
    let t = MessageType::from_number(type_number)
        .ok_or(DecodeError::UnknownMessageType(type_number))?;
    if requests_only && !t.is_request() {
        return Err(DecodeError::NotARequest(t));
    }
    let f = Fields {
        at: Place::Message(t),
        entries: envelope.entries,
    };

    // Must-understand first: a key we do not know may change the meaning of the others.
    let critical = f
        .get(2)
        .map(|v| f.as_uint_list(2, v))
        .transpose()?
        .unwrap_or_default();
    // Denied key 7 lists them once each, in ascending order (spec Section 6.5), whatever their
    // order in `critical`.
    let unsupported: Vec<u64> = critical
        .iter()
        .copied()
        .filter(|key| *key > t.highest_known_key())
        .collect::<std::collections::BTreeSet<u64>>()
        .into_iter()
        .collect();
    if !unsupported.is_empty() {
        return Err(DecodeError::UnsupportedCritical(unsupported));
    }
    let common = Common {
        request_id: f.opt_uint(1)?,
        critical,
    };

    Ok(match t {
        MessageType::Hello => {
            let versions = f
                .as_nonempty_array(3, f.require(3)?, "an array of versions")?
                .iter()
                .map(|v| f.as_u16(3, v, "a version, at most 65535"))
                .collect::<Result<_, _>>()?;
            Message::Hello(Hello {
                common,
                versions,
                capabilities: Capabilities(f.opt_uint(4)?.unwrap_or(0)),
                software: f.opt_bounded_text(5, MAX_SOFTWARE_LEN)?,
            })
        }
        MessageType::Welcome => {
            let limits = f.nested(5, f.require(5)?, Place::Limits)?;
            let addresses = f
                .as_array(9, f.require(9)?, "an array of addresses")?
                .iter()
                .map(|a| f.as_addr(9, a))
                .collect::<Result<_, _>>()?;
            Message::Welcome(Welcome {
                common,
                // The version chosen is one this document defines (spec Section 6.3 rule 13).
                version: match f.uint(3)? {
                    1 => 1,
                    other => return Err(f.out_of_range(3, other, "1, the only version")),
                },
                capabilities: Capabilities(f.uint(4)?),
                limits: Limits {
                    max_message_size: limits.u32(1)?,
                    max_streams: limits.u32(2)?,
                    min_lifetime: limits.u32(3)?,
                    max_lifetime: limits.u32(4)?,
                    max_leases: limits.opt_u32(5)?,
                },
                epoch: f.uint(6)?,
                time_ms: f.uint(7)?,
                identity: f.bounded_text(8, 1, MAX_IDENTITY_LEN)?,
                addresses,
            })
        }
        MessageType::Open => {
            let opening = f.nested(3, f.require(3)?, Place::Opening)?;
            Message::Open(Open {
                common,
                opening: decode_opening(&opening)?,
                lifetime: f.asked_lifetime(4)?,
                app: f.app_info(5)?,
            })
        }
        MessageType::Renew => Message::Renew(Renew {
            common,
            lease: f.lease_id(3)?,
            lifetime: f.asked_lifetime(4)?,
        }),
        MessageType::Release => Message::Release(Release {
            common,
            lease: f.lease_id(3)?,
        }),
        MessageType::List => Message::List(List { common }),
        MessageType::Granted => Message::Granted(Granted {
            common,
            lease: f.lease_id(3)?,
            grants: f.grants(4)?,
            lifetime: f.u32(5)?,
            expires_ms: f.uint(6)?,
            renew_after: f.u32(7)?,
            epoch: f.uint(8)?,
            narrowed: f
                .get(9)
                .map(|v| f.as_bool(9, v))
                .transpose()?
                .unwrap_or(false),
        }),
        MessageType::Denied => {
            let n = f.uint(3)?;
            let code = ResultCode::from_number(n)
                .ok_or_else(|| f.out_of_range(3, n, "a registered result code"))?;
            Message::Denied(Denied {
                common,
                code,
                reason: f.opt_bounded_text(4, MAX_REASON_LEN)?,
                retry_after: f.opt_u32(5)?,
                lease: f.get(6).map(|v| f.as_lease_id(6, v)).transpose()?,
                unsupported: f
                    .get(7)
                    .map(|v| f.as_uint_list(7, v))
                    .transpose()?
                    .unwrap_or_default(),
            })
        }
        MessageType::Leases => {
            let leases = f
                .as_array(3, f.require(3)?, "an array of lease-info maps")?
                .iter()
                .map(|item| {
                    let l = f.nested(3, item, Place::LeaseInfo)?;
                    Ok(LeaseInfo {
                        lease: l.lease_id(1)?,
                        grants: l.grants(2)?,
                        remaining: l.u32(3)?,
                        expires_ms: l.uint(4)?,
                        app: l.app_info(5)?,
                    })
                })
                .collect::<Result<_, DecodeError>>()?;
            Message::Leases(Leases {
                common,
                leases,
                epoch: f.uint(4)?,
            })
        }
        MessageType::Released => Message::Released(Released {
            common,
            lease: f.lease_id(3)?,
        }),
        MessageType::Revoked => {
            let n = f.uint(4)?;
            let reason = RevokeReason::from_number(n)
                .ok_or_else(|| f.out_of_range(4, n, "a registered revoke reason"))?;
            Message::Revoked(Revoked {
                common,
                lease: f.lease_id(3)?,
                reason,
                text: f.opt_bounded_text(5, MAX_REASON_LEN)?,
            })
        }
        MessageType::EpochChanged => Message::EpochChanged(EpochChanged {
            common,
            epoch: f.uint(3)?,
        }),
        MessageType::GoingAway => Message::GoingAway(GoingAway {
            common,
            reconnect_after: f.opt_u32(3)?,
            reason: f.opt_bounded_text(4, MAX_REASON_LEN)?,
        }),
    })
}

/// The request id (key 1) of bytes that may not decode, so that a Denied answering them can
/// still echo it: bytes refused for what follows a well-formed map (trailing bytes) still
/// name their request. `None` when the bytes do not start with a parseable map holding key 1
/// exactly once with an unsigned integer, or are over [`MAX_MESSAGE_SIZE`]. A map with key 1
/// twice names no request (spec Section 6.6): echoing the first or the last would be a guess
/// that another reader could make the other way.
pub fn peek_request_id(bytes: &[u8]) -> Option<u64> {
    peek_uint(bytes, 1)
}

/// The message type (key 0) of bytes that may not decode, under the same conditions as
/// [`peek_request_id`]: a reader that cannot decode a message may still know what kind of
/// message it was (an Event of a later version, which a client ignores).
pub fn peek_message_type(bytes: &[u8]) -> Option<u64> {
    peek_uint(bytes, 0)
}

/// The unsigned integer under `key` of a map that holds `key` exactly once.
fn peek_uint(bytes: &[u8], key: u64) -> Option<u64> {
    let Ok((Item::Map(entries), _)) = parse_first(bytes) else {
        return None;
    };
    let mut values = entries
        .iter()
        .filter(|(k, _)| matches!(k, Item::Uint(n) if *n == key))
        .map(|(_, v)| v);
    match (values.next(), values.next()) {
        (Some(Item::Uint(value)), None) => Some(*value),
        _ => None,
    }
}

/// A Denied read only as far as a client needs to report a refusal whose code it does not
/// know: such a Denied does not decode (an unknown code breaks rule 13 of spec Section 6.3),
/// yet the client takes it as a refusal of the request it names and reports its number and
/// reason (spec Section 13; the local API's Section 12.3 for the agent's codes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeekedDenial {
    /// Key 1: the request it answers.
    pub request_id: u64,
    /// Key 3: the code, as a number.
    pub code: u64,
    /// Key 4, when it is a text of at most [`MAX_REASON_LEN`] bytes.
    pub reason: Option<String>,
    /// Key 5, seconds, when it is an unsigned integer of 32 bits.
    pub retry_after: Option<u32>,
}

/// Reads `bytes` as a Denied (type 17) for [`PeekedDenial`], whatever its code. `None` when
/// they do not start with a parseable map holding, each exactly once, key 0 with 17 and keys
/// 1 and 3 with unsigned integers. A reason or retry-after of the wrong type is left out rather
/// than refusing the whole: the refusal is what matters.
///
/// ```
/// use fwnp_proto::codec::peek_denial;
/// // {0: 17, 1: 7, 3: 1099, 4: "maintenance"}
/// let bytes = [0xa4, 0x00, 0x11, 0x01, 0x07, 0x03, 0x19, 0x04, 0x4b, 0x04, 0x6b,
///     b'm', b'a', b'i', b'n', b't', b'e', b'n', b'a', b'n', b'c', b'e'];
/// let denial = peek_denial(&bytes).unwrap();
/// assert_eq!((denial.request_id, denial.code), (7, 1099));
/// assert_eq!(denial.reason.as_deref(), Some("maintenance"));
/// ```
pub fn peek_denial(bytes: &[u8]) -> Option<PeekedDenial> {
    let Ok((Item::Map(entries), _)) = parse_first(bytes) else {
        return None;
    };
    let once = |key: u64| {
        let mut values = entries
            .iter()
            .filter(move |(k, _)| matches!(k, Item::Uint(n) if *n == key))
            .map(|(_, v)| v);
        match (values.next(), values.next()) {
            (Some(value), None) => Some(value),
            _ => None,
        }
    };
    let uint = |key: u64| match once(key) {
        Some(Item::Uint(n)) => Some(*n),
        _ => None,
    };
    if uint(0) != Some(17) {
        return None;
    }
    Some(PeekedDenial {
        request_id: uint(1)?,
        code: uint(3)?,
        reason: match once(4) {
            Some(Item::Text(t)) if t.len() <= MAX_REASON_LEN => Some(t.to_string()),
            _ => None,
        },
        retry_after: uint(5).and_then(|n| u32::try_from(n).ok()),
    })
}

/// Makes a Leases answer fit in [`MAX_MESSAGE_SIZE`] as spec Section 5.4 prescribes: it leaves
/// out the application information (lease-info key 5) of as few leases as needed, from the end
/// of the list. Returns false, leaving `answer` as it was, when even without any application
/// information the list does not fit: the sender then answers Denied `no-resources`, because a
/// partial list would make the client drop what it does not show.
pub fn fit_leases(answer: &mut Leases) -> bool {
    fn size(answer: &Leases) -> usize {
        encode(&Message::Leases(answer.clone())).len()
    }
    // The answer with the application information of its last `k` leases left out.
    fn without_last(answer: &Leases, k: usize) -> Leases {
        let mut trimmed = answer.clone();
        let keep = trimmed.leases.len() - k;
        for lease in &mut trimmed.leases[keep..] {
            lease.app = None;
        }
        trimmed
    }
    if size(answer) <= MAX_MESSAGE_SIZE {
        return true;
    }
    let n = answer.leases.len();
    if size(&without_last(answer, n)) > MAX_MESSAGE_SIZE {
        return false;
    }
    // The size only falls as k grows: the smallest k that fits, by bisection.
    let (mut low, mut high) = (0, n);
    while low < high {
        let mid = (low + high) / 2;
        if size(&without_last(answer, mid)) <= MAX_MESSAGE_SIZE {
            high = mid;
        } else {
            low = mid + 1;
        }
    }
    *answer = without_last(answer, high);
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn list_round_trip() {
        let msg = Message::List(List {
            common: Common {
                request_id: Some(7),
                critical: vec![],
            },
        });
        let bytes = encode(&msg);
        assert_eq!(bytes, hex("a200060107"));
        assert_eq!(decode(&bytes), Ok(msg));
    }

    #[test]
    fn deep_nesting_is_refused_without_recursion() {
        // 16 KiB of nested arrays: refused at depth 9, long before the stack could suffer.
        let bytes = vec![0x81u8; MAX_MESSAGE_SIZE];
        assert_eq!(
            decode(&bytes),
            Err(DecodeError::NestingTooDeep {
                limit: MAX_NESTING_DEPTH
            })
        );
        let bytes = vec![0x9fu8; MAX_MESSAGE_SIZE];
        assert_eq!(
            decode(&bytes),
            Err(DecodeError::NestingTooDeep {
                limit: MAX_NESTING_DEPTH
            })
        );
        let bytes = vec![0x81u8; 100_000];
        assert!(matches!(
            decode(&bytes),
            Err(DecodeError::TooLarge { size: 100_000, .. })
        ));
    }

    #[test]
    fn huge_declared_lengths_are_truncation() {
        for input in [
            "9b7fffffffffffffff",
            "bb7fffffffffffffff",
            "5b7fffffffffffffff",
            "7bffffffffffffffff",
        ] {
            assert!(
                matches!(decode(&hex(input)), Err(DecodeError::InvalidCbor { .. })),
                "{input}"
            );
        }
    }

    #[test]
    fn a_denied_with_an_unknown_code_is_peeked_for_its_number_and_reason() {
        // {0: 17, 1: 5, 3: 99, 4: "later", 5: 30}: code 99 is not defined, so it does not decode.
        let bytes = hex("a50011010503186304656c6174657205181e");
        assert!(decode(&bytes).is_err());
        assert_eq!(
            peek_denial(&bytes),
            Some(PeekedDenial {
                request_id: 5,
                code: 99,
                reason: Some("later".into()),
                retry_after: Some(30),
            })
        );
        // A reason of the wrong type is left out, the refusal kept: {0: 17, 1: 5, 3: 99, 4: 1}.
        let odd = peek_denial(&hex("a4001101050318630401")).expect("a denial");
        assert_eq!((odd.code, odd.reason), (99, None));
        // Not a Denied (Granted, type 16), no code, key 3 twice: nothing.
        assert_eq!(peek_denial(&hex("a300100105031863")), None);
        assert_eq!(peek_denial(&hex("a200110105")), None);
        assert_eq!(peek_denial(&hex("a400110105031863031864")), None);
    }

    #[test]
    fn decode_errors_answer_with_their_unsupported_keys() {
        let err = DecodeError::UnsupportedCritical(vec![64, 70]);
        let denied = err.to_denied(Some(3));
        assert_eq!(denied.code, ResultCode::UnsupportedOption);
        assert_eq!(denied.unsupported, vec![64, 70]);
        assert_eq!(denied.common.request_id, Some(3));
        assert_eq!(peek_request_id(&hex("a2000601")), None, "truncated");
        assert_eq!(
            peek_request_id(&hex("a20007011b0000000100000000")),
            Some(1 << 32)
        );
        // Refused for its trailing bytes, the request still names its id.
        let trailing = hex("a2000601070000");
        assert!(matches!(
            decode(&trailing),
            Err(DecodeError::TrailingBytes { extra: 2 })
        ));
        assert_eq!(peek_request_id(&trailing), Some(7));
        // Key 1 twice names no request id, whichever a reader would keep, even twice the same.
        assert_eq!(peek_request_id(&hex("a3000601070108")), None);
        assert_eq!(peek_request_id(&hex("a3000601070107")), None);
        // Another key twice does not hide a single key 1.
        let other_twice = hex("a300060006010a");
        assert!(matches!(
            decode(&other_twice),
            Err(DecodeError::DuplicateKey {
                depth: 1,
                key: Some(0)
            })
        ));
        assert_eq!(peek_request_id(&other_twice), Some(10));
        // A map the parser refuses (here for a tag in key 64) names no request id either.
        assert_eq!(peek_request_id(&hex("a3000601071840c100")), None);
        assert_eq!(
            peek_request_id(&vec![0u8; MAX_MESSAGE_SIZE + 1]),
            None,
            "oversized"
        );
    }

    #[test]
    fn keys_of_ignored_maps_are_compared_by_value() {
        let dup = |depth, key| Err(DecodeError::DuplicateKey { depth, key });
        // {0: 6, 64: {K1: 0, K2: 0}}: a List whose ignored key 64 holds a map of two keys.
        let with_keys = |k1: &str, k2: &str| hex(&format!("a200061840a2{k1}00{k2}00"));
        // The half 1.0 and the double 1.0 are one value; the integer 1 is another.
        assert_eq!(
            decode(&with_keys("f93c00", "fb3ff0000000000000")).map(|_| ()),
            dup(2, None)
        );
        assert_eq!(
            decode(&with_keys("fa3f800000", "f93c00")).map(|_| ()),
            dup(2, None)
        );
        assert!(decode(&with_keys("01", "f93c00")).is_ok());
        // 0.0 and -0.0 are two values.
        assert!(decode(&with_keys("f90000", "f98000")).is_ok());
        // Every NaN is one value: a half NaN, a single NaN with a payload, a negative double NaN.
        assert_eq!(
            decode(&with_keys("f97e00", "fa7fc00001")).map(|_| ()),
            dup(2, None)
        );
        assert_eq!(
            decode(&with_keys("fbfff8000000000001", "f97c01")).map(|_| ()),
            dup(2, None)
        );
        // Infinity is a value, not a NaN.
        assert!(decode(&with_keys("f97c00", "f97e00")).is_ok());
        // A map is its entries, in any order: {1: 0, 2: 0} and {2: 0, 1: 0} are one key;
        // {1: 0} and {1: 1} are two, and so are [1, 2] and [2, 1].
        assert_eq!(
            decode(&with_keys("a201000200", "a202000100")).map(|_| ()),
            dup(2, None)
        );
        assert!(decode(&with_keys("a10100", "a10101")).is_ok());
        assert!(decode(&with_keys("820102", "820201")).is_ok());
        // -1 twice, however long its argument; -1 and -2 are two keys.
        assert_eq!(decode(&with_keys("20", "3800")).map(|_| ()), dup(2, None));
        assert!(decode(&with_keys("20", "21")).is_ok());
        // A text written in chunks is the text.
        assert_eq!(
            decode(&with_keys("6178", "7f6178ff")).map(|_| ()),
            dup(2, None)
        );
        // Unsigned keys are named, deeper down too: {0: 6, 64: [{5: 0, 5: 1}]}.
        assert_eq!(
            decode(&hex("a20006184081a205000501")).map(|_| ()),
            dup(3, Some(5))
        );
        // A large ignored map, sorted rather than compared in pairs: 40 distinct keys, then
        // the first of them again.
        let mut big = hex("a200061840b8");
        big.push(41);
        for key in 0..40u8 {
            big.extend([0x18, 100 + key, 0x00]);
        }
        assert!(decode(&big).is_err(), "41 entries announced, 40 there");
        big.extend([0x18, 100, 0x01]);
        assert_eq!(decode(&big).map(|_| ()), dup(2, Some(100)));
        let last = big.len() - 2;
        big[last] = 200;
        assert!(decode(&big).is_ok());
    }

    #[test]
    fn tags_are_refused_even_bignums() {
        assert_eq!(
            decode(&hex("c24101")),
            Err(DecodeError::TagNotAllowed { tag: 2 })
        );
        assert_eq!(
            decode(&hex("a2000601c24101")),
            Err(DecodeError::TagNotAllowed { tag: 2 })
        );
    }

    /// A Leases answer of `n` leases, each with application information of about
    /// `app_bytes` bytes.
    fn leases_answer(n: usize, app_bytes: usize) -> Leases {
        let leases = (0..n)
            .map(|i| LeaseInfo {
                lease: LeaseId([i as u8; 16]),
                grants: vec![Grant {
                    protocol: Protocol::Tcp,
                    ports: PortRange::single(8000 + i as u16),
                    host: IpAddr::V4(Ipv4Addr::new(192, 0, 2, 10)),
                    remotes: vec![],
                    app: None,
                }],
                remaining: 600,
                expires_ms: 1_800_000_000_000,
                app: Some(AppInfo {
                    name: Some("n".repeat(app_bytes / 2)),
                    executable: Some("/".repeat(app_bytes / 2)),
                    uid: Some(1000),
                    pid: Some(4242),
                }),
            })
            .collect();
        Leases {
            common: Common {
                request_id: Some(9),
                critical: vec![],
            },
            leases,
            epoch: 77,
        }
    }

    fn encoded_size(answer: &Leases) -> usize {
        encode(&Message::Leases(answer.clone())).len()
    }

    #[test]
    fn a_list_that_fits_is_left_alone() {
        let mut answer = leases_answer(10, 1000);
        let before = answer.clone();
        assert!(encoded_size(&answer) <= MAX_MESSAGE_SIZE);
        assert!(fit_leases(&mut answer));
        assert_eq!(answer, before);
    }

    #[test]
    fn a_long_list_loses_application_information_from_its_end_only_as_needed() {
        let mut answer = leases_answer(40, 1200);
        let before = answer.clone();
        assert!(encoded_size(&answer) > MAX_MESSAGE_SIZE);
        assert!(fit_leases(&mut answer));
        assert!(encoded_size(&answer) <= MAX_MESSAGE_SIZE);
        // Every lease is still listed, unchanged but for its application information.
        assert_eq!(answer.leases.len(), before.leases.len());
        for (fitted, original) in answer.leases.iter().zip(&before.leases) {
            assert_eq!(
                LeaseInfo {
                    app: None,
                    ..fitted.clone()
                },
                LeaseInfo {
                    app: None,
                    ..original.clone()
                }
            );
        }
        // Those that kept it come first, and giving it back to one more would not fit.
        let kept = answer.leases.iter().take_while(|l| l.app.is_some()).count();
        assert!(answer.leases[kept..].iter().all(|l| l.app.is_none()));
        assert!(kept > 0 && kept < before.leases.len());
        let mut one_more = answer.clone();
        one_more.leases[kept].app = before.leases[kept].app.clone();
        assert!(encoded_size(&one_more) > MAX_MESSAGE_SIZE);
    }

    #[test]
    fn a_list_too_long_even_without_application_information_is_refused_untouched() {
        let mut answer = leases_answer(400, 100);
        let before = answer.clone();
        assert!(!fit_leases(&mut answer));
        assert_eq!(answer, before);
    }
}
