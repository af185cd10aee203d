"""The local API's frames (spec/local-api.md Sections 3 and 4): a 4-byte big-endian length,
then one CBOR map with unsigned integer keys. Encoding is deterministic; decoding is as strict
as the spec asks (size, nesting, no tags, no trailing bytes, unique unsigned keys, the
must-understand rule, every known key's type and range) and never lets a malformed frame
through as a message."""

from __future__ import annotations

import io
import ipaddress
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Callable, NoReturn, Union

import cbor2

from .errors import ProtocolError

HEADER_LEN = 4
#: The largest frame body, in bytes, in either direction.
MAX_FRAME_BODY = 16384
MAX_NESTING = 8
MAX_REASON = 512
DEFAULT_SOCKET_PATH = "/run/fwnp/agent.sock"
SOCKET_ENV_VAR = "FWNP_AGENT_SOCKET"

OPEN, RELEASE, LIST = 3, 5, 6
GRANTED, DENIED, LEASES, RELEASED = 16, 17, 18, 19
WATCH, WATCHING, EVENT, STATUS, STATUS_ANSWER = 64, 65, 66, 67, 68
# FWNP/1 messages that the local API does not carry (Section 4).
WIRE_ONLY = {
    1: "hello",
    2: "welcome",
    4: "renew",
    32: "revoked",
    33: "epoch-changed",
    34: "going-away",
}
NAMES = {
    OPEN: "open",
    RELEASE: "release",
    LIST: "list",
    GRANTED: "granted",
    DENIED: "denied",
    LEASES: "leases",
    RELEASED: "released",
    WATCH: "watch",
    WATCHING: "watching",
    EVENT: "event",
    STATUS: "status",
    STATUS_ANSWER: "status-answer",
}
# The highest key each type defines: a critical key above it is not understood.
HIGHEST_KEY = {
    OPEN: 5,
    RELEASE: 3,
    LIST: 2,
    GRANTED: 9,
    DENIED: 7,
    LEASES: 4,
    RELEASED: 3,
    WATCH: 3,
    WATCHING: 2,
    EVENT: 8,
    STATUS: 2,
    STATUS_ANSWER: 11,
}
PROTOCOLS = {6: "tcp", 17: "udp", 132: "sctp", 136: "udplite"}
FAMILIES = {4: "ipv4", 6: "ipv6"}
LOCAL_CODES = (1024, 1025, 1026, 1027)
WIRE_CODES = tuple(range(1, 15))
U32 = 2**32 - 1
U64 = 2**64 - 1

Address = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]


def fail(kind: str, detail: str) -> NoReturn:
    raise ProtocolError(kind, detail)


# --- Messages ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """Ports of a protocol, or an application id of the gateway's catalogue."""

    protocol: int | None = None
    first: int | None = None
    last: int | None = None
    app: str | None = None


@dataclass(frozen=True)
class WireOpening:
    target: Target
    host: Address | tuple[Address, ...] | None = None
    family: int | None = None
    remotes: tuple[Network, ...] = ()


@dataclass(frozen=True)
class AppInfo:
    name: str | None = None
    executable: str | None = None
    uid: int | None = None
    pid: int | None = None


@dataclass(frozen=True)
class Grant:
    """One concrete opening the gateway granted: a protocol, a port or range, one host
    address, and the remote prefixes when restricted (``app`` names the catalogue application
    it was expanded from).

    >>> import ipaddress
    >>> str(Grant(6, 8080, 8080, ipaddress.ip_address("198.51.100.11")))
    'tcp/8080 on 198.51.100.11'
    """

    protocol: int
    first: int
    last: int
    host: Address
    remotes: tuple[Network, ...] = ()
    app: str | None = None

    @property
    def protocol_name(self) -> str:
        """``tcp``, ``udp``, ``sctp`` or ``udplite``.

        >>> import ipaddress
        >>> Grant(17, 5000, 5100, ipaddress.ip_address("192.0.2.10")).protocol_name
        'udp'
        """
        return PROTOCOLS.get(self.protocol, str(self.protocol))

    def __str__(self) -> str:
        ports = str(self.first) if self.first == self.last else f"{self.first}-{self.last}"
        text = f"{self.protocol_name}/{ports} on {self.host}"
        if self.remotes:
            text += " from " + ", ".join(str(r) for r in self.remotes)
        return text


@dataclass(frozen=True)
class LeaseInfo:
    lease: bytes
    grants: tuple[Grant, ...]
    remaining: int
    expires_ms: int
    app: AppInfo | None = None


@dataclass(frozen=True)
class Message:
    """Common to every message: the request id (key 1) and the critical keys (key 2)."""

    request_id: int | None
    critical: tuple[int, ...] = field(default=(), kw_only=True)


@dataclass(frozen=True)
class Open(Message):
    opening: WireOpening
    lifetime: int | None = None
    app: AppInfo | None = None


@dataclass(frozen=True)
class Release(Message):
    lease: bytes


@dataclass(frozen=True)
class List(Message):
    pass


@dataclass(frozen=True)
class Granted(Message):
    lease: bytes
    grants: tuple[Grant, ...]
    lifetime: int
    expires_ms: int
    renew_after: int
    epoch: int
    narrowed: bool = False


@dataclass(frozen=True)
class DeniedMsg(Message):
    code: int
    reason: str | None = None
    retry_after: int | None = None
    lease: bytes | None = None
    unsupported: tuple[int, ...] = ()


@dataclass(frozen=True)
class Leases(Message):
    leases: tuple[LeaseInfo, ...]
    epoch: int


@dataclass(frozen=True)
class Released(Message):
    lease: bytes


@dataclass(frozen=True)
class Watch(Message):
    lease: bytes | None = None


@dataclass(frozen=True)
class Watching(Message):
    pass


@dataclass(frozen=True)
class EventMsg(Message):
    lease: bytes
    kind: int
    expires_in_ms: int | None = None
    reason: str | None = None
    code: int | None = None
    new_lease: bytes | None = None


@dataclass(frozen=True)
class Status(Message):
    pass


@dataclass(frozen=True)
class StatusAnswer(Message):
    agent_version: str
    gateway: str
    connected: bool
    epoch: int | None
    mirror_mode: str
    identity: str | None
    leases: int
    last_error: str | None = None
    api_version: int | None = None


# --- Encoding ---------------------------------------------------------------------------------


def _addr(a: Address) -> bytes:
    return a.packed


def _prefix(p: Network) -> list[Any]:
    return [p.network_address.packed, p.prefixlen]


def _opening_map(o: WireOpening) -> dict[int, Any]:
    m: dict[int, Any] = {}
    t = o.target
    if t.app is not None:
        m[7] = t.app
    else:
        m[1] = t.protocol
        m[2] = t.first
        if t.last is not None and t.last != t.first:
            m[3] = t.last
    if isinstance(o.host, tuple):
        m[4] = [_addr(a) for a in o.host]
    elif o.host is not None:
        m[4] = _addr(o.host)
    if o.family is not None:
        m[5] = o.family
    if o.remotes:
        m[6] = [_prefix(p) for p in o.remotes]
    return m


def _grant_map(g: Grant) -> dict[int, Any]:
    m: dict[int, Any] = {1: g.protocol, 2: g.first}
    if g.last != g.first:
        m[3] = g.last
    m[4] = _addr(g.host)
    if g.remotes:
        m[6] = [_prefix(p) for p in g.remotes]
    if g.app is not None:
        m[7] = g.app
    return m


def _app_map(a: AppInfo) -> dict[int, Any]:
    m: dict[int, Any] = {}
    for key, value in ((1, a.name), (2, a.executable), (3, a.uid), (4, a.pid)):
        if value is not None:
            m[key] = value
    return m


def _put(m: dict[int, Any], key: int, value: Any) -> None:
    if value is not None:
        m[key] = value


def to_map(msg: Message) -> dict[int, Any]:
    """The CBOR map of a message, before encoding."""
    types: dict[type, int] = {
        Open: OPEN,
        Release: RELEASE,
        List: LIST,
        Granted: GRANTED,
        DeniedMsg: DENIED,
        Leases: LEASES,
        Released: RELEASED,
        Watch: WATCH,
        Watching: WATCHING,
        EventMsg: EVENT,
        Status: STATUS,
        StatusAnswer: STATUS_ANSWER,
    }
    m: dict[int, Any] = {0: types[type(msg)]}
    _put(m, 1, msg.request_id)
    if msg.critical:
        m[2] = list(msg.critical)
    if isinstance(msg, Open):
        m[3] = _opening_map(msg.opening)
        if msg.lifetime is not None:
            m[4] = msg.lifetime
        if msg.app is not None:
            m[5] = _app_map(msg.app)
    elif isinstance(msg, (Release, Released)):
        m[3] = msg.lease
    elif isinstance(msg, Granted):
        m.update(
            {
                3: msg.lease,
                4: [_grant_map(g) for g in msg.grants],
                5: msg.lifetime,
                6: msg.expires_ms,
                7: msg.renew_after,
                8: msg.epoch,
            }
        )
        if msg.narrowed:
            m[9] = True
    elif isinstance(msg, DeniedMsg):
        m[3] = msg.code
        _put(m, 4, msg.reason)
        _put(m, 5, msg.retry_after)
        _put(m, 6, msg.lease)
        if msg.unsupported:
            m[7] = list(msg.unsupported)
    elif isinstance(msg, Leases):
        infos = []
        for i in msg.leases:
            info: dict[int, Any] = {
                1: i.lease,
                2: [_grant_map(g) for g in i.grants],
                3: i.remaining,
                4: i.expires_ms,
            }
            if i.app is not None:
                info[5] = _app_map(i.app)
            infos.append(info)
        m[3] = infos
        m[4] = msg.epoch
    elif isinstance(msg, Watch):
        _put(m, 3, msg.lease)
    elif isinstance(msg, EventMsg):
        m[3] = msg.lease
        m[4] = msg.kind
        _put(m, 5, msg.expires_in_ms)
        _put(m, 6, msg.reason)
        _put(m, 7, msg.code)
        _put(m, 8, msg.new_lease)
    elif isinstance(msg, StatusAnswer):
        m.update({3: msg.agent_version, 4: msg.gateway, 5: msg.connected})
        _put(m, 6, msg.epoch)
        m[7] = msg.mirror_mode
        _put(m, 8, msg.identity)
        m[9] = msg.leases
        _put(m, 10, msg.last_error)
        _put(m, 11, msg.api_version)
    return m


def encode_body(msg: Message) -> bytes:
    """The deterministic CBOR of a message (RFC 8949 4.2.1: unsigned keys in ascending
    order, shortest forms)."""
    return cbor2.dumps(to_map(msg), canonical=True)


def encode_frame(msg: Message) -> bytes:
    """A whole frame: the 4-byte length, then the body. Refuses a body over the limit, which
    the agent would not read."""
    body = encode_body(msg)
    if len(body) > MAX_FRAME_BODY:
        fail("frame-too-large", f"a frame body of {len(body)} bytes is over {MAX_FRAME_BODY}")
    return len(body).to_bytes(HEADER_LEN, "big") + body


# --- Decoding ---------------------------------------------------------------------------------


def body_length(header: bytes) -> int:
    """The body length a frame header announces, checked against the limits."""
    if len(header) < HEADER_LEN:
        fail("truncated-frame", "the stream ended inside a frame header")
    n = int.from_bytes(header[:HEADER_LEN], "big")
    if n == 0:
        fail("empty-frame", "a frame header announced an empty body")
    if n > MAX_FRAME_BODY:
        fail("frame-too-large", f"a frame header announced {n} bytes, over {MAX_FRAME_BODY}")
    return n


class _RefuseTags(Mapping[int, Callable[[Any], Any]]):
    """Makes cbor2 refuse every tag, including those it would otherwise decode itself."""

    def __getitem__(self, tag: int) -> Callable[[Any], Any]:
        def refuse(*_args: Any) -> Any:
            fail("tag-not-allowed", f"tag {tag}")

        return refuse

    def __contains__(self, tag: object) -> bool:
        return True

    def __iter__(self) -> Iterator[int]:
        return iter(())

    def __len__(self) -> int:
        return 0


def _refuse_unknown_tag(_decoder: Any, tag: Any) -> Any:
    fail("tag-not-allowed", f"tag {getattr(tag, 'tag', '?')}")


def _parse(body: bytes) -> Any:
    stream = io.BytesIO(body)
    decoder = cbor2.CBORDecoder(
        stream,
        tag_hook=_refuse_unknown_tag,
        semantic_decoders=_RefuseTags(),
        max_depth=MAX_NESTING,
        allow_duplicate_keys=False,
    )
    try:
        item = decoder.decode()
    except ProtocolError:
        raise
    except Exception as e:  # cbor2 raises several types for ill-formed input
        text = str(e)
        cause = e.__cause__ or e.__context__
        if isinstance(cause, ProtocolError):
            raise cause from None
        if "nesting depth" in text:
            fail("nesting-too-deep", text)
        if "Duplicate" in text or "duplicate" in text:
            fail("duplicate-key", text)
        fail("invalid-cbor", text or type(e).__name__)
    if stream.tell() != len(body):
        fail("trailing-bytes", f"{len(body) - stream.tell()} bytes after the message")
    return item


def _is_uint(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= U64


class _Fields:
    """The keys of one map of the protocol, read with their types checked."""

    def __init__(self, where: str, m: Any) -> None:
        if not isinstance(m, dict):
            fail("wrong-type", f"{where} must be a map")
        for k in m:
            if not _is_uint(k):
                fail("key-not-unsigned", f"{where} has the key {k!r}")
        self.where = where
        self.m: dict[int, Any] = m

    def has(self, key: int) -> bool:
        return key in self.m

    def _need(self, key: int) -> Any:
        if key not in self.m:
            fail("missing-key", f"{self.where} lacks key {key}")
        return self.m[key]

    def uint(self, key: int, limit: int = U64, optional: bool = False) -> Any:
        if optional and key not in self.m:
            return None
        v = self._need(key)
        if not _is_uint(v):
            fail("wrong-type", f"key {key} of {self.where} must be an unsigned integer")
        if v > limit:
            fail("out-of-range", f"key {key} of {self.where} holds {v}, over {limit}")
        return v

    def text(self, key: int, limit: int | None = None, optional: bool = False) -> Any:
        if optional and key not in self.m:
            return None
        v = self._need(key)
        if not isinstance(v, str):
            fail("wrong-type", f"key {key} of {self.where} must be a text string")
        if limit is not None and len(v.encode()) > limit:
            fail("text-length", f"key {key} of {self.where} is over {limit} bytes")
        return v

    def boolean(self, key: int, optional: bool = False) -> Any:
        if optional and key not in self.m:
            return None
        v = self._need(key)
        if not isinstance(v, bool):
            fail("wrong-type", f"key {key} of {self.where} must be a boolean")
        return v

    def lease(self, key: int, optional: bool = False) -> Any:
        if optional and key not in self.m:
            return None
        v = self._need(key)
        if not isinstance(v, bytes):
            fail("wrong-type", f"key {key} of {self.where} must be a byte string")
        if len(v) != 16:
            fail(
                "wrong-length" if self.where in _WIRE_TYPES else "wrong-type",
                f"key {key} of {self.where} must be a 16-byte lease id",
            )
        return v

    def array(self, key: int, optional: bool = False, nonempty: bool = False) -> Any:
        if optional and key not in self.m:
            return None
        v = self._need(key)
        if not isinstance(v, list):
            fail("wrong-type", f"key {key} of {self.where} must be an array")
        if nonempty and not v:
            fail("empty-list", f"key {key} of {self.where} must not be empty")
        return v


# Messages whose fields FWNP/1 defines (their errors use the wire codec's kinds).
_WIRE_TYPES = {
    "open",
    "release",
    "list",
    "granted",
    "denied",
    "leases",
    "released",
    "opening",
    "grant",
    "app-info",
    "lease-info",
}


def _address(v: Any, where: str) -> Address:
    if not isinstance(v, bytes):
        fail("wrong-type", f"an address of {where} must be a byte string")
    if len(v) == 4:
        return ipaddress.IPv4Address(v)
    if len(v) == 16:
        a = ipaddress.IPv6Address(v)
        if a.ipv4_mapped is not None:
            fail("ipv4-mapped-address", f"{a} in {where}")
        return a
    fail("wrong-length", f"an address of {where} must have 4 or 16 bytes")


def _prefixes(values: list[Any], where: str) -> tuple[Network, ...]:
    out = []
    for p in values:
        if not isinstance(p, list) or len(p) != 2:
            fail("wrong-type", f"a prefix of {where} must be [address, length]")
        addr = _address(p[0], where)
        if not _is_uint(p[1]):
            fail("wrong-type", f"a prefix length of {where} must be an unsigned integer")
        if p[1] > 128:
            fail("out-of-range", f"prefix length {p[1]} in {where}")
        if p[1] > addr.max_prefixlen:
            fail("prefix-too-long", f"{addr}/{p[1]} in {where}")
        try:
            out.append(ipaddress.ip_network((addr, p[1]), strict=True))
        except ValueError:
            fail("host-bits-set", f"{addr}/{p[1]} in {where}")
    return tuple(out)


def _ports(f: _Fields) -> tuple[int, int]:
    first = f.uint(2, 65535)
    last = f.uint(3, 65535, optional=True)
    last = first if last is None else last
    if first == 0 or last == 0:
        fail("port-zero", f"port 0 in {f.where}")
    if last < first:
        fail("reversed-range", f"{first}-{last} in {f.where}")
    return first, last


def _protocol(f: _Fields) -> int:
    p = f.uint(1)
    if p not in PROTOCOLS:
        fail("out-of-range", f"protocol {p} in {f.where}")
    return int(p)


def _app_id(v: Any, where: str) -> str:
    if not isinstance(v, str):
        fail("wrong-type", f"the application id of {where} must be a text string")
    if not 1 <= len(v.encode()) <= 64:
        fail("app-id-length", f"application id of {len(v.encode())} bytes in {where}")
    if any(c not in "abcdefghijklmnopqrstuvwxyz0123456789._-" for c in v):
        fail("app-id-character", f"application id {v!r} in {where}")
    return v


def _grant(v: Any) -> Grant:
    f = _Fields("grant", v)
    protocol = _protocol(f)
    first, last = _ports(f)
    host = _address(f._need(4), "grant")
    remotes = f.array(6, optional=True, nonempty=True)
    app = _app_id(f.m[7], "grant") if f.has(7) else None
    return Grant(protocol, first, last, host, _prefixes(remotes, "grant") if remotes else (), app)


def _app_info(v: Any) -> AppInfo:
    f = _Fields("app-info", v)
    return AppInfo(
        f.text(1, 256, optional=True),
        f.text(2, 1024, optional=True),
        f.uint(3, U32, optional=True),
        f.uint(4, U32, optional=True),
    )


def _opening(v: Any) -> WireOpening:
    f = _Fields("opening", v)
    ports = f.has(1) or f.has(2) or f.has(3)
    if ports and f.has(7):
        fail("conflicting-target", "an opening names both ports and an application")
    if not ports and not f.has(7):
        fail("missing-target", "an opening names neither ports nor an application")
    if f.has(7):
        target = Target(app=_app_id(f.m[7], "opening"))
    else:
        protocol = _protocol(f)
        first, last = _ports(f)
        target = Target(protocol, first, last)
    host: Address | tuple[Address, ...] | None = None
    if f.has(4):
        h = f.m[4]
        if isinstance(h, list):
            host = tuple(_address(a, "opening") for a in h)
            if not 2 <= len(host) <= 16:
                fail("host-address-count", f"{len(host)} host addresses")
            if len(set(host)) != len(host):
                fail("duplicate-host-address", "a host address named twice")
        else:
            host = _address(h, "opening")
    family = f.uint(5, optional=True)
    if family is not None and family not in FAMILIES:
        fail("out-of-range", f"family {family}")
    remotes_v = f.array(6, optional=True, nonempty=True)
    remotes = _prefixes(remotes_v, "opening") if remotes_v else ()
    return WireOpening(target, host, family, remotes)


def _code(n: int, where: str) -> int:
    if n not in WIRE_CODES and n not in LOCAL_CODES:
        fail("out-of-range", f"code {n} of {where} is in neither registry")
    return n


def decode_body(body: bytes) -> Message:
    """Decodes one frame body, refusing what spec/local-api.md Section 3 refuses."""
    if not body:
        fail("empty-frame", "an empty frame body")
    if len(body) > MAX_FRAME_BODY:
        fail("frame-too-large", f"a frame body of {len(body)} bytes")
    item = _parse(body)
    if not isinstance(item, dict):
        fail("not-a-map", "the message is not a map")
    top = _Fields("message", item)
    t = top.uint(0)
    if t in WIRE_ONLY:
        fail("not-local", f"{WIRE_ONLY[t]} messages are not part of the local API")
    if t not in NAMES:
        fail("unknown-message-type", f"message type {t}")
    name = NAMES[t]
    f = _Fields(name, item)
    critical_v = f.array(2, optional=True, nonempty=True)
    critical: tuple[int, ...] = ()
    if critical_v is not None:
        if not all(_is_uint(k) for k in critical_v):
            fail("wrong-type", "critical keys must be unsigned integers")
        critical = tuple(critical_v)
        unknown = sorted({k for k in critical if k > HIGHEST_KEY[t]})
        if unknown:
            fail("unsupported-critical", f"critical keys {unknown} are not understood")
    rid = f.uint(1, optional=True)
    if rid is None and t != EVENT:
        fail("missing-request-id", f"a {name} message lacks its request id (key 1)")
    if t == OPEN:
        app = f.m.get(5)
        return Open(
            rid,
            _opening(f._need(3)),
            f.uint(4, U32, optional=True),
            _app_info(app) if app is not None else None,
            critical=critical,
        )
    if t in (RELEASE, RELEASED):
        cls = Release if t == RELEASE else Released
        return cls(rid, f.lease(3), critical=critical)
    if t == LIST:
        return List(rid, critical=critical)
    if t == GRANTED:
        grants = tuple(_grant(g) for g in f.array(4, nonempty=True))
        narrowed = f.boolean(9, optional=True)
        return Granted(
            rid,
            f.lease(3),
            grants,
            f.uint(5, U32),
            f.uint(6),
            f.uint(7, U32),
            f.uint(8),
            bool(narrowed),
            critical=critical,
        )
    if t == DENIED:
        code = _code(f.uint(3), name)
        unsupported = f.array(7, optional=True, nonempty=True)
        if unsupported is not None and not all(_is_uint(k) for k in unsupported):
            fail("wrong-type", "Denied key 7 must list unsigned integers")
        return DeniedMsg(
            rid,
            code,
            f.text(4, MAX_REASON, optional=True),
            f.uint(5, U32, optional=True),
            f.lease(6, optional=True),
            tuple(unsupported or ()),
            critical=critical,
        )
    if t == LEASES:
        infos = []
        for v in f.array(3):
            i = _Fields("lease-info", v)
            app = i.m.get(5)
            infos.append(
                LeaseInfo(
                    i.lease(1),
                    tuple(_grant(g) for g in i.array(2, nonempty=True)),
                    i.uint(3, U32),
                    i.uint(4),
                    _app_info(app) if app is not None else None,
                )
            )
        return Leases(rid, tuple(infos), f.uint(4), critical=critical)
    if t == WATCH:
        return Watch(rid, f.lease(3, optional=True), critical=critical)
    if t == WATCHING:
        return Watching(rid, critical=critical)
    if t == EVENT:
        kind = f.uint(4)
        if not 1 <= kind <= 8:
            fail("out-of-range", f"event kind {kind}")
        code = f.uint(7, optional=True)
        return EventMsg(
            rid,
            f.lease(3),
            kind,
            f.uint(5, optional=True),
            f.text(6, MAX_REASON, optional=True),
            # A code of a later version leaves the event standing without it (Section 12.3).
            code if code in WIRE_CODES or code in LOCAL_CODES else None,
            f.lease(8, optional=True),
            critical=critical,
        )
    if t == STATUS:
        return Status(rid, critical=critical)
    mode = f.text(7)
    if mode not in ("enforce", "monitor", "off"):
        fail("wrong-type", f"mirror mode {mode!r} is not enforce, monitor or off")
    return StatusAnswer(
        rid,
        f.text(3),
        f.text(4),
        f.boolean(5),
        f.uint(6, optional=True),
        mode,
        f.text(8, optional=True),
        f.uint(9),
        f.text(10, MAX_REASON, optional=True),
        f.uint(11, optional=True),
        critical=critical,
    )


def decode_frame(frame: bytes) -> Message:
    """Decodes one whole frame (header and body), as it would be read from a stream that ends
    after it."""
    n = body_length(frame)
    body = frame[HEADER_LEN:]
    if len(body) < n:
        fail("truncated-frame", f"the stream ended {n - len(body)} bytes before the frame's end")
    if len(body) > n:
        fail("trailing-bytes", "bytes follow the frame")
    return decode_body(body)


def decode_answer(body: bytes) -> Message | None:
    """Decodes a frame body the agent sent; None for an Event of a kind this version does not
    know, which a client ignores (spec/local-api.md Section 6.3). A Denied whose code this
    version does not know (a local code a newer agent added, or a result code added to FWNP
    later) is a refusal all the same (spec/local-api.md Section 12.3): it comes back with its
    code's number, its reason and retry-after when they are well-formed, and nothing else.

    >>> d = decode_answer(bytes.fromhex("a4001101050319044b04626e6f"))
    >>> d.request_id, d.code, d.reason
    (5, 1099, 'no')
    """
    try:
        return decode_body(body)
    except ProtocolError as e:
        if e.kind == "out-of-range":
            try:
                item = _parse(body)
            except ProtocolError:
                raise e from None
            if not isinstance(item, dict):
                raise
            kind = item.get(4)
            if item.get(0) == EVENT and isinstance(kind, int) and _is_uint(kind) and kind > 8:
                return None
            denial = _unknown_denial(item)
            if denial is not None:
                return denial
        raise


def peek_request_id(body: bytes) -> int | None:
    """The request id (key 1) of a frame body that is a well-formed CBOR map holding it once
    as an unsigned integer, whatever else is wrong with the message; otherwise None. It tells
    which request a frame that did not decode answers (spec/local-api.md Section 12.3).

    >>> peek_request_id(bytes.fromhex("a2001845010c"))
    12
    >>> peek_request_id(bytes([0xFF])) is None
    True
    """
    try:
        item = _parse(body)
    except ProtocolError:
        return None
    if not isinstance(item, dict):
        return None
    rid = item.get(1)
    return rid if isinstance(rid, int) and _is_uint(rid) else None


def _unknown_denial(item: dict[Any, Any]) -> DeniedMsg | None:
    """The Denied in ``item`` when its code is in neither registry and its request id and code
    are unsigned integers; its reason and retry-after are kept when well-formed."""
    rid, code = item.get(1), item.get(3)
    if item.get(0) != DENIED or not (isinstance(rid, int) and _is_uint(rid)):
        return None
    if not (isinstance(code, int) and _is_uint(code)):
        return None
    if code in WIRE_CODES or code in LOCAL_CODES:
        return None
    text = item.get(4)
    reason = text if isinstance(text, str) and len(text.encode()) <= MAX_REASON else None
    seconds = item.get(5)
    retry_after = None
    if isinstance(seconds, int) and _is_uint(seconds) and seconds <= U32:
        retry_after = seconds
    return DeniedMsg(rid, code, reason, retry_after)
