"""The messages of FWNP/1, encoded and decoded as spec/fwnp.md and spec/fwnp.cddl say.

Written from the specification alone, as an implementer in another language would, so that
the gateway and the specification are both judged from the outside. A decoded message is the
JSON rendering of spec/vectors/README.md (a dict with every field present, `None` for an
absent value, lease ids as hexadecimal, addresses as text), so the conformance vectors are
compared as they are written; `encode` takes the same rendering back to the deterministic
encoding of Section 6.2.

cbor2 reads and writes the CBOR items. It accepts more than Section 6.3 allows (tags it knows,
duplicate keys, bytes after the item), so `check_item` first walks the item's headers for the
rules that concern the form of the whole item (Section 6.3 rules 1 to 6 and 9).
"""

import ipaddress

import cbor2

MAX_MESSAGE_SIZE = 16384
MAX_NESTING_DEPTH = 8
MAX_LIFETIME = 604800
MAX_HOST_ADDRESSES = 16
U16, U32, U64 = 1 << 16, 1 << 32, 1 << 64

MESSAGE_TYPES = {
    1: "hello", 2: "welcome", 3: "open", 4: "renew", 5: "release", 6: "list",
    16: "granted", 17: "denied", 18: "leases", 19: "released",
    32: "revoked", 33: "epoch-changed", 34: "going-away",
}
TYPE_NUMBERS = {name: number for number, name in MESSAGE_TYPES.items()}
REQUESTS = {"hello", "open", "renew", "release", "list"}
NOTICES = {"revoked", "epoch-changed", "going-away"}
RESULT_CODES = {
    1: "unsupported-version", 2: "malformed-request", 3: "unsupported-option",
    4: "malformed-option", 5: "not-authorized", 6: "address-mismatch", 7: "denied-by-policy",
    8: "no-resources", 9: "quota-exceeded", 10: "rate-limited", 11: "unknown-lease",
    12: "lifetime-out-of-range", 13: "unknown-application", 14: "hello-required",
}
CODE_NUMBERS = {name: number for number, name in RESULT_CODES.items()}
REVOKE_REASONS = {1: "operator", 2: "policy-changed", 3: "credential-revoked", 4: "resource-pressure"}
REASON_NUMBERS = {name: number for number, name in REVOKE_REASONS.items()}
PROTOCOLS = {6: "tcp", 17: "udp", 132: "sctp", 136: "udplite"}
PROTOCOL_NUMBERS = {name: number for number, name in PROTOCOLS.items()}
FAMILIES = {4: "ipv4", 6: "ipv6"}
FAMILY_NUMBERS = {name: number for number, name in FAMILIES.items()}
# The keys of each message map (Sections 8.1 to 8.14): a key listed in `critical` is understood
# when the message type assigns it (Section 6.5).
ASSIGNED_KEYS = {
    "hello": {3, 4, 5}, "welcome": set(range(3, 10)), "open": {3, 4, 5}, "renew": {3, 4},
    "release": {3}, "list": set(), "granted": set(range(3, 10)), "denied": set(range(3, 8)),
    "leases": {3, 4}, "released": {3}, "revoked": {3, 4, 5}, "epoch-changed": {3},
    "going-away": {3, 4},
}
APP_ID_CHARACTERS = set("abcdefghijklmnopqrstuvwxyz0123456789._-")
IPV4_MAPPED = ipaddress.ip_network("::ffff:0:0/96")


class DecodeError(Exception):
    """An item refused: `layer` and `error` as in spec/vectors/README.md, `code` the result
    code a gateway answers with (Section 6.6), `unsupported` the critical keys not understood."""

    def __init__(self, layer, error, code, detail="", unsupported=()):
        super().__init__(f"{layer}/{error} ({code}): {detail}")
        self.layer, self.error, self.code = layer, error, code
        self.detail, self.unsupported = detail, list(unsupported)


def _form(error, detail):
    return DecodeError("decode", error, "malformed-request", detail)


# ---------------------------------------------------------------------------------------------
# Section 6.3 rules 1 to 6 and 9: the form of the whole item, ignored values included.

def check_item(data):
    """Refuses `data` unless it is exactly one well-formed item within the size and nesting
    limits, without tags, with valid UTF-8 texts and no map holding a key twice."""
    if len(data) > MAX_MESSAGE_SIZE:
        raise _form("too-large", f"{len(data)} bytes")
    end = _walk(data, 0, 0)
    if end != len(data):
        raise _form("trailing-bytes", f"{len(data) - end} bytes after the item")


def _head(data, pos):
    """(major type, additional information, argument or None if indefinite, next position)."""
    if pos >= len(data):
        raise _form("invalid-cbor", "truncated")
    initial = data[pos]
    major, info = initial >> 5, initial & 0x1F
    pos += 1
    if info < 24:
        return major, info, info, pos
    if info <= 27:
        size = 1 << (info - 24)
        if pos + size > len(data):
            raise _form("invalid-cbor", "truncated")
        return major, info, int.from_bytes(data[pos:pos + size], "big"), pos + size
    if info == 31:
        return major, info, None, pos
    raise _form("invalid-cbor", "reserved additional information")


def _string(data, pos, major, length):
    if pos + length > len(data):
        raise _form("invalid-cbor", "truncated")
    chunk = bytes(data[pos:pos + length])
    if major == 3:
        try:
            chunk.decode("utf-8")
        except UnicodeDecodeError:
            raise _form("invalid-cbor", "text is not UTF-8") from None
    return pos + length


def _walk(data, pos, depth, duplicates_checked=True):
    major, info, arg, pos = _head(data, pos)
    if major in (0, 1):
        if arg is None:
            raise _form("invalid-cbor", "indefinite length on an integer")
        return pos
    if major in (2, 3):
        if arg is not None:
            return _string(data, pos, major, arg)
        while True:
            if pos < len(data) and data[pos] == 0xFF:
                return pos + 1
            chunk_major, _, length, pos = _head(data, pos)
            if chunk_major != major or length is None:
                raise _form("invalid-cbor", "a chunk of an indefinite-length string of another kind")
            pos = _string(data, pos, major, length)
    if major in (4, 5):
        depth += 1
        if depth > MAX_NESTING_DEPTH:
            raise _form("nesting-too-deep", f"an array or map at depth {depth}")
        keys = set()
        count = 0
        while arg is None or count < arg:
            if arg is None and pos < len(data) and data[pos] == 0xFF:
                return pos + 1
            if major == 5 and duplicates_checked:
                start = pos
                pos = _walk(data, pos, depth)
                # Keys compare by value: equal values have one deterministic encoding.
                key = cbor2.dumps(cbor2.loads(bytes(data[start:pos])), canonical=True)
                if key in keys:
                    raise _form("duplicate-key", f"a map holds the key {data[start:pos].hex()} twice")
                keys.add(key)
            elif major == 5:
                pos = _walk(data, pos, depth, False)
            pos = _walk(data, pos, depth, duplicates_checked)
            count += 1
        return pos
    if major == 6:
        raise _form("tag-not-allowed", f"tag {arg}")
    # Major type 7: simple values and floats.
    if arg is None:
        raise _form("invalid-cbor", "break outside an indefinite-length item")
    if info == 24 and arg < 32:
        raise _form("invalid-cbor", "a simple value in two bytes below 32")
    return pos


# ---------------------------------------------------------------------------------------------
# Section 6.3 rules 7, 8 and 10 to 13, then the validation of Section 9.4.

class _Map:
    """One map of the protocol, read key by key; `code` is the result code of a missing key or
    a wrong value in it (`malformed-option` inside an opening or grant, Section 6.6)."""

    def __init__(self, value, code, what):
        if not isinstance(value, dict):
            raise DecodeError("decode", "wrong-type", code, f"{what} is not a map")
        for key in value:
            if type(key) is not int or key < 0:
                raise DecodeError("decode", "key-not-unsigned", "malformed-request",
                                  f"{what} has the key {key!r}")
        self.value, self.code, self.what = value, code, what

    def fail(self, error, detail, code=None):
        raise DecodeError("decode", error, code or self.code, f"{self.what}: {detail}")

    def get(self, key, read, required=False):
        if key not in self.value:
            if required:
                self.fail("missing-key", f"key {key} is missing")
            return None
        return read(self, key, self.value[key])


def _uint(limit):
    def read(m, key, value):
        if type(value) is not int or value < 0:
            m.fail("wrong-type", f"key {key} is not an unsigned integer")
        if value >= limit:
            m.fail("out-of-range", f"key {key} is {value}")
        return value
    return read


def _registry(names):
    def read(m, key, value):
        number = _uint(U64)(m, key, value)
        if number not in names:
            m.fail("out-of-range", f"key {key} is {number}, not in its registry")
        return names[number]
    return read


def _text(low, high):
    def read(m, key, value):
        if type(value) is not str:
            m.fail("wrong-type", f"key {key} is not a text string")
        size = len(value.encode("utf-8"))
        if not low <= size <= high:
            m.fail("text-length", f"key {key} is {size} bytes", "malformed-request")
        return value
    return read


def _bool(m, key, value):
    if type(value) is not bool:
        m.fail("wrong-type", f"key {key} is not a boolean")
    return value


def _lease_id(m, key, value):
    if type(value) is not bytes:
        m.fail("wrong-type", f"key {key} is not a byte string")
    if len(value) != 16:
        m.fail("wrong-length", f"key {key} is {len(value)} bytes")
    return value.hex()


def _address_value(m, what, value):
    if type(value) is not bytes:
        m.fail("wrong-type", f"{what} is not a byte string")
    if len(value) not in (4, 16):
        m.fail("wrong-length", f"{what} is {len(value)} bytes")
    return ipaddress.ip_address(value)


def _address(m, key, value):
    return _address_value(m, f"key {key}", value)


def _array(read_element, non_empty):
    def read(m, key, value):
        if type(value) is not list:
            m.fail("wrong-type", f"key {key} is not an array")
        if non_empty and not value:
            m.fail("empty-list", f"key {key} is empty")
        return [read_element(m, f"key {key}[{i}]", element) for i, element in enumerate(value)]
    return read


def _prefix(m, what, value):
    if type(value) is not list or len(value) != 2:
        m.fail("wrong-type", f"{what} is not a prefix")
    address = _address_value(m, f"{what}'s address", value[0])
    length = value[1]
    if type(length) is not int or length < 0:
        m.fail("wrong-type", f"{what}'s length is not an unsigned integer")
    if length > 128:
        m.fail("out-of-range", f"{what}'s length is {length}")
    return address, length


def _element_uint(limit):
    def read(m, what, value):
        if type(value) is not int or value < 0:
            m.fail("wrong-type", f"{what} is not an unsigned integer")
        if value >= limit:
            m.fail("out-of-range", f"{what} is {value}")
        return value
    return read


def _host(m, key, value):
    if type(value) is list:
        return [_address_value(m, f"key {key}[{i}]", a) for i, a in enumerate(value)]
    return _address(m, key, value)


def _app_id(m, key, value):
    if type(value) is not str:
        m.fail("wrong-type", f"key {key} is not a text string")
    return value


def _lifetime_asked(m, key, value):
    if type(value) is not int or value < 0:
        m.fail("wrong-type", f"key {key} is not an unsigned integer", "malformed-request")
    if value >= U32:
        raise DecodeError("decode", "lifetime-out-of-range", "lifetime-out-of-range",
                          f"lifetime {value}")
    return value


def _app_info(m, key, value):
    info = _Map(value, "malformed-request", "app-info")
    return {
        "name": info.get(1, _text(0, 256)),
        "executable": info.get(2, _text(0, 1024)),
        "uid": info.get(3, _uint(U32)),
        "pid": info.get(4, _uint(U32)),
    }


def _ports(m, required):
    first = m.get(2, _uint(U16), required)
    last = m.get(3, _uint(U16))
    if first is None:
        return None
    return {"first": first, "last": first if last is None else last}


def _opening(m, key, value):
    o = _Map(value, "malformed-option", "the opening")
    has_ports = any(k in o.value for k in (1, 2, 3))
    if has_ports and 7 in o.value:
        o.fail("conflicting-target", "ports and an application")
    if not has_ports and 7 not in o.value:
        o.fail("missing-target", "neither ports nor an application")
    # Its keys in ascending order (Section 6.6).
    protocol = o.get(1, _registry(PROTOCOLS), has_ports)
    ports = _ports(o, has_ports)
    host = o.get(4, _host)
    family = o.get(5, _registry(FAMILIES))
    remotes = o.get(6, _array(_prefix, True)) or []
    return {"protocol": protocol, "ports": ports, "app": o.get(7, _app_id), "host": host,
            "family": family, "remotes": remotes}


def _grant(m, what, value):
    g = _Map(value, "malformed-option", what)
    return {
        "protocol": g.get(1, _registry(PROTOCOLS), True),
        "ports": _ports(g, True),
        "host": g.get(4, _address, True),
        "remotes": g.get(6, _array(_prefix, True)) or [],
        "app": g.get(7, _app_id),
    }


def _limits(m, key, value):
    lm = _Map(value, "malformed-request", "limits")
    return {
        "max_message_size": lm.get(1, _uint(U32), True),
        "max_streams": lm.get(2, _uint(U32), True),
        "min_lifetime": lm.get(3, _uint(U32), True),
        "max_lifetime": lm.get(4, _uint(U32), True),
        "max_leases": lm.get(5, _uint(U32)),
    }


def _lease_info(m, what, value):
    li = _Map(value, "malformed-request", what)
    return {
        "lease": li.get(1, _lease_id, True),
        "grants": li.get(2, _array(_grant, True), True),
        "remaining": li.get(3, _uint(U32), True),
        "expires_ms": li.get(4, _uint(U64), True),
        "app_info": li.get(5, _app_info),
    }


def _version(m, key, value):
    version = _uint(U16)(m, key, value)
    if version != 1:
        m.fail("out-of-range", f"version {version}: this document defines 1")
    return version


FIELDS = {
    # type: [(key, field, reader, required)]
    "hello": [(3, "versions", _array(_element_uint(U16), True), True),
              (4, "capabilities", _uint(U64), False), (5, "software", _text(0, 128), False)],
    "welcome": [(3, "version", _version, True), (4, "capabilities", _uint(U64), True),
                (5, "limits", _limits, True), (6, "epoch", _uint(U64), True),
                (7, "time_ms", _uint(U64), True), (8, "identity", _text(1, 512), True),
                (9, "addresses", _array(_address_value, False), True)],
    "open": [(3, "opening", _opening, True), (4, "lifetime", _lifetime_asked, False),
             (5, "app_info", _app_info, False)],
    "renew": [(3, "lease", _lease_id, True), (4, "lifetime", _lifetime_asked, False)],
    "release": [(3, "lease", _lease_id, True)],
    "list": [],
    "granted": [(3, "lease", _lease_id, True), (4, "grants", _array(_grant, True), True),
                (5, "lifetime", _uint(U32), True), (6, "expires_ms", _uint(U64), True),
                (7, "renew_after", _uint(U32), True), (8, "epoch", _uint(U64), True),
                (9, "narrowed", _bool, False)],
    "denied": [(3, "code", _registry(RESULT_CODES), True), (4, "reason", _text(0, 512), False),
               (5, "retry_after", _uint(U32), False), (6, "lease", _lease_id, False),
               (7, "unsupported", _array(_element_uint(U64), True), False)],
    "leases": [(3, "leases", _array(_lease_info, False), True), (4, "epoch", _uint(U64), True)],
    "released": [(3, "lease", _lease_id, True)],
    "revoked": [(3, "lease", _lease_id, True), (4, "reason", _registry(REVOKE_REASONS), True),
                (5, "text", _text(0, 512), False)],
    "epoch-changed": [(3, "epoch", _uint(U64), True)],
    "going-away": [(3, "reconnect_after", _uint(U32), False), (4, "reason", _text(0, 512), False)],
}


def decode(data):
    """Decodes and validates one message; returns its JSON rendering or raises DecodeError."""
    data = bytes(data)
    check_item(data)
    try:
        item = cbor2.loads(data)
    except cbor2.CBORDecodeError as err:  # the walk above admits nothing cbor2 refuses
        raise _form("invalid-cbor", str(err)) from None
    if not isinstance(item, dict):
        raise _form("not-a-map", "the item is not a map")
    top = _Map(item, "malformed-request", "the message")
    if 0 not in item:
        top.fail("missing-key", "key 0 (the type) is missing")
    number = item[0]
    if type(number) is not int or number < 0:
        top.fail("wrong-type", "key 0 is not an unsigned integer")
    kind = MESSAGE_TYPES.get(number)
    if kind is None:
        top.fail("unknown-message-type", f"type {number}")
    # Section 6.6: `critical` is judged before the values of the other keys.
    critical = top.get(2, _array(_element_uint(U64), True)) or []
    unknown = sorted({k for k in critical if k not in ASSIGNED_KEYS[kind] | {0, 1, 2}})
    if unknown:
        raise DecodeError("decode", "unsupported-critical", "unsupported-option",
                          f"critical keys {unknown}", unknown)
    message = {"type": kind, "request_id": top.get(1, _uint(U64)), "critical": critical}
    for key, field, read, required in FIELDS[kind]:
        message[field] = top.get(key, read, required)
    if kind == "hello" and message["capabilities"] is None:
        message["capabilities"] = 0
    if kind == "granted" and message["narrowed"] is None:
        message["narrowed"] = False
    if kind == "denied" and message["unsupported"] is None:
        message["unsupported"] = []
    _validate(message)
    return _render(message)


def _invalid(error, detail, code="malformed-option"):
    raise DecodeError("validate", error, code, detail)


def _family(address):
    return 4 if address.version == 4 else 6


def _check_ports(ports):
    if ports is None:
        return
    if ports["first"] == 0 or ports["last"] == 0:
        _invalid("port-zero", "port 0")
    if ports["last"] < ports["first"]:
        _invalid("reversed-range", f"{ports['first']}-{ports['last']}")


def _check_prefix(address, length):
    if address.version == 4 and length > 32:
        _invalid("prefix-too-long", f"{address}/{length}")
    if address in IPV4_MAPPED:
        _invalid("ipv4-mapped-address", f"remote prefix {address}")
    network = ipaddress.ip_network(f"{address}/{length}", strict=False)
    if network.network_address != address:
        _invalid("host-bits-set", f"{address}/{length}")


def _check_app_id(app):
    if app is None:
        return
    if not 1 <= len(app.encode("utf-8")) <= 64:
        _invalid("app-id-length", f"{len(app.encode('utf-8'))} bytes")
    if not set(app) <= APP_ID_CHARACTERS:
        _invalid("app-id-character", repr(app))


def _check_target(hosts, family, remotes):
    """Section 9.4 rules 5 to 9 for one opening (hosts: the addresses named, maybe none) or one
    grant (its one address)."""
    for address, length in remotes:
        _check_prefix(address, length)
    for address in hosts:
        if address.version == 6 and address in IPV4_MAPPED:
            _invalid("ipv4-mapped-address", f"host address {address}")
        if family is not None and _family(address) != family:
            _invalid("family-mismatch", f"host address {address} is not of family {family}")
    for address, _ in remotes:
        if hosts:
            if any(_family(address) != _family(host) for host in hosts):
                _invalid("remote-family-mismatch", f"remote {address} against the host addresses")
        elif family is not None:
            if _family(address) != family:
                _invalid("remote-family-mismatch", f"remote {address} against family {family}")
        elif _family(address) != _family(remotes[0][0]):
            _invalid("remote-family-mismatch", f"remote {address} against the first prefix")


def _validate(message):
    kind = message["type"]
    if kind == "hello" and 1 not in message["versions"]:
        _invalid("unsupported-version", f"versions {message['versions']}", "unsupported-version")
    if kind == "open":
        opening = message["opening"]
        _check_ports(opening["ports"])
        _check_app_id(opening["app"])
        hosts = opening["host"]
        if isinstance(hosts, list):
            if not 2 <= len(hosts) <= MAX_HOST_ADDRESSES:
                _invalid("host-address-count", f"{len(hosts)} host addresses")
            if len(set(hosts)) != len(hosts):
                _invalid("duplicate-host-address", "a host address named twice")
        elif hosts is not None:
            hosts = [hosts]
        family = FAMILY_NUMBERS[opening["family"]] if opening["family"] else None
        _check_target(hosts or [], family, opening["remotes"])
    # Section 6.6: the opening's rules before the lifetime's maximum.
    if kind in ("open", "renew") and (message["lifetime"] or 0) > MAX_LIFETIME:
        _invalid("lifetime-out-of-range", f"lifetime {message['lifetime']}",
                 "lifetime-out-of-range")
    grants = []
    if kind == "granted":
        grants = message["grants"]
    elif kind == "leases":
        grants = [g for info in message["leases"] for g in info["grants"]]
    for grant in grants:
        _check_ports(grant["ports"])
        _check_app_id(grant["app"])
        _check_target([grant["host"]], None, grant["remotes"])


# ---------------------------------------------------------------------------------------------
# The JSON rendering, and back.

def _render_value(value):
    if isinstance(value, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        return str(value)
    if isinstance(value, tuple):  # a prefix
        return f"{value[0]}/{value[1]}"
    if isinstance(value, list):
        return [_render_value(v) for v in value]
    if isinstance(value, dict):
        return {k: _render_value(v) for k, v in value.items()}
    return value


def _render(message):
    return _render_value(message)


def _address_bytes(text):
    return ipaddress.ip_address(text).packed


def _prefix_item(text):
    address, length = text.rsplit("/", 1)
    return [_address_bytes(address), int(length)]


def _ports_items(target, ports):
    target[2] = ports["first"]
    if ports["last"] != ports["first"]:
        target[3] = ports["last"]


def _opening_item(o):
    item = {}
    if o.get("protocol") is not None:
        item[1] = PROTOCOL_NUMBERS[o["protocol"]]
        _ports_items(item, o["ports"])
    host = o.get("host")
    if isinstance(host, list):
        item[4] = [_address_bytes(h) for h in host]
    elif host is not None:
        item[4] = _address_bytes(host)
    if o.get("family") is not None:
        item[5] = FAMILY_NUMBERS[o["family"]]
    if o.get("remotes"):
        item[6] = [_prefix_item(p) for p in o["remotes"]]
    if o.get("app") is not None:
        item[7] = o["app"]
    return item


def _grant_item(g):
    item = {1: PROTOCOL_NUMBERS[g["protocol"]], 4: _address_bytes(g["host"])}
    _ports_items(item, g["ports"])
    if g.get("remotes"):
        item[6] = [_prefix_item(p) for p in g["remotes"]]
    if g.get("app") is not None:
        item[7] = g["app"]
    return item


def _app_info_item(info):
    item = {}
    for key, field in ((1, "name"), (2, "executable"), (3, "uid"), (4, "pid")):
        if info.get(field) is not None:
            item[key] = info[field]
    return item


def _optional(item, key, value, convert=lambda v: v):
    if value is not None:
        item[key] = convert(value)


def encode(message):
    """The deterministic encoding (Section 6.2) of a message in the JSON rendering."""
    kind = message["type"]
    item = {0: TYPE_NUMBERS[kind]}
    _optional(item, 1, message.get("request_id"))
    if message.get("critical"):
        item[2] = list(message["critical"])
    get = message.get
    if kind == "hello":
        item[3] = list(message["versions"])
        if get("capabilities"):
            item[4] = message["capabilities"]
        _optional(item, 5, get("software"))
    elif kind == "welcome":
        limits = message["limits"]
        lm = {1: limits["max_message_size"], 2: limits["max_streams"],
              3: limits["min_lifetime"], 4: limits["max_lifetime"]}
        _optional(lm, 5, limits.get("max_leases"))
        item.update({3: message["version"], 4: message["capabilities"], 5: lm,
                     6: message["epoch"], 7: message["time_ms"], 8: message["identity"],
                     9: [_address_bytes(a) for a in message["addresses"]]})
    elif kind == "open":
        item[3] = _opening_item(message["opening"])
        _optional(item, 4, get("lifetime"))
        _optional(item, 5, get("app_info"), _app_info_item)
    elif kind in ("renew", "release", "released"):
        item[3] = bytes.fromhex(message["lease"])
        if kind == "renew":
            _optional(item, 4, get("lifetime"))
    elif kind == "granted":
        item.update({3: bytes.fromhex(message["lease"]),
                     4: [_grant_item(g) for g in message["grants"]],
                     5: message["lifetime"], 6: message["expires_ms"],
                     7: message["renew_after"], 8: message["epoch"]})
        if get("narrowed"):
            item[9] = True
    elif kind == "denied":
        item[3] = CODE_NUMBERS[message["code"]]
        _optional(item, 4, get("reason"))
        _optional(item, 5, get("retry_after"))
        _optional(item, 6, get("lease"), bytes.fromhex)
        if get("unsupported"):
            item[7] = list(message["unsupported"])
    elif kind == "leases":
        infos = []
        for info in message["leases"]:
            li = {1: bytes.fromhex(info["lease"]), 2: [_grant_item(g) for g in info["grants"]],
                  3: info["remaining"], 4: info["expires_ms"]}
            _optional(li, 5, info.get("app_info"), _app_info_item)
            infos.append(li)
        item.update({3: infos, 4: message["epoch"]})
    elif kind == "revoked":
        item.update({3: bytes.fromhex(message["lease"]), 4: REASON_NUMBERS[message["reason"]]})
        _optional(item, 5, get("text"))
    elif kind == "epoch-changed":
        item[3] = message["epoch"]
    elif kind == "going-away":
        _optional(item, 3, get("reconnect_after"))
        _optional(item, 4, get("reason"))
    return cbor2.dumps(item, canonical=True)


def request_id_of(data):
    """The request id a gateway can read from an item, refused or not (Section 6.6): the bytes
    begin with a map that breaks none of rules 1, 2, 4, 5 and 6 (what follows the map does not
    matter) and holds key 1 exactly once, with an unsigned integer below 2^64. Otherwise None."""
    data = bytes(data)
    try:
        if len(data) > MAX_MESSAGE_SIZE:
            return None
        _walk(data, 0, 0, duplicates_checked=False)
        major, _, count, pos = _head(data, 0)
        if major != 5:
            return None
        found, pairs = [], 0
        while count is None or pairs < count:
            if count is None and data[pos] == 0xFF:
                break
            start = pos
            pos = _walk(data, pos, 1, False)
            key = cbor2.loads(data[start:pos])
            value_start = pos
            pos = _walk(data, pos, 1, False)
            if type(key) is int and key == 1:
                found.append(cbor2.loads(data[value_start:pos]))
            pairs += 1
    except (DecodeError, cbor2.CBORDecodeError):
        return None
    if len(found) == 1 and type(found[0]) is int and 0 <= found[0] < U64:
        return found[0]
    return None
