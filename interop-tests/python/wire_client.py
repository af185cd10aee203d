"""A FWNP/1 client on the wire, written from spec/fwnp.md alone: QUIC with mutual TLS (aioquic),
one request per client-opened bidirectional stream, notices on gateway-opened unidirectional
streams, every answer decoded strictly (wire_codec).

Run as a program it is what interop-tests/tests/wire_python.rs drives in a host's network
namespace:

    wire_client.py vectors DIR
        decodes every conformance vector of DIR and prints one JSON line per disagreement,
        then {"vectors": N, "failed": M}.
    wire_client.py drive --gateway ADDR:PORT --cert PEM --key PEM --ca PEM --port N
            --second-cert PEM --second-key PEM [--foreign-address IP] [--remote-prefix P]
            [--vectors DIR]
        speaks to the gateway and prints one JSON line per step: what was sent and what came
        back (the answer decoded, its bytes, whether they were the deterministic encoding, a
        stream reset or connection close and its code). It says `held` when tcp/N is granted
        and waits for `probed`. It holds that opening, and one
        of tcp/N+1 for the remote prefix given, and says `waiting`; it then reads `revoked`
        on its standard input (the caller has revoked the second lease) and reports the
        notices, and reads `release`, after which it releases the first lease; it opens another
        port, connects with the second certificate too, says `ready-for-credential` and reads
        `credential-revoked` (the caller has revoked the first certificate), reports what
        each connection saw, opens tcp/N+9, says `ready-for-shutdown`, reports how the second
        connection ends when the caller stops the gateway, and reads `restarted` before it
        connects again. It then holds a connection, says `ready-for-crash` and reads `crashed`
        (the caller has killed the gateway and started it again), reports the stateless reset
        its next packet drew and its reconnection; and the same after `ready-for-state-loss`
        and `state-lost` (the gateway started again without its lease state), when it also
        opens its lease again under the new epoch. The caller probes the ports meanwhile.

The client side of the protocol follows the specification where the gateway's conformance is
not what is being probed: ALPN `fwnp/1`, the gateway's certificate checked against the
deployment CA and the configured address, initial_max_streams_bidi 0, keep-alives at a third
of the idle timeout, timers sized to the Welcome's shortest lifetime, no 0-RTT, at most 5 s
waited for an answer, stateless resets recognized by their token and followed by a
reconnection at once, leases of another epoch opened again. The probes break the client's own
rules on purpose (a request before Hello, malformed or oversized items, a unidirectional
stream, a migration) to see the gateway answer them as the specification says.

What the client knows of the QUIC connection it reads through aioquic's public interfaces: its
events, its qlog trace (the transport parameters of both sides, the gateway's connection ids
and their stateless reset tokens) and the asyncio datagram protocol (a stateless reset, which
aioquic does not detect, is found among the datagrams the socket receives). Two things it
cannot do that way and does on the connection object itself: set its own stream limits (aioquic
1.x has no setting for them) and open a stream beyond the gateway's limit (aioquic keeps such a
stream waiting, as it should).
"""

import argparse
import asyncio
import functools
import ipaddress
import json
import os
import socket
import ssl
import sys

import cbor2
from aioquic.asyncio import connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.logger import QuicLogger, QuicLoggerTrace

import wire_codec as codec

ALPN = "fwnp/1"
ANSWER_WAIT = 5.0  # Section 5.4: the client's wait for an answer
# Section 18.4.
NO_ERROR, PROTOCOL_VIOLATION, MESSAGE_TOO_LARGE = 0x0, 0x1, 0x2
REQUEST_TIMEOUT, VERSION_MISMATCH = 0x6, 0x5
# Section 14.
PORT_RANGES, REMOTE_PREFIXES, APPLICATIONS, NOTICES, THIRD_PARTY = 1, 2, 4, 8, 16
# Section 3.4: before a Welcome, and the bounds of M/8.
DEFAULT_IDLE, MIN_IDLE, MAX_IDLE = 30.0, 1.0, 30.0
# RFC 9000 Section 18.2: what an absent transport parameter means (no idle timeout, no stream).
TRANSPORT_DEFAULTS = {"max_idle_timeout": 0, "initial_max_streams_bidi": 0,
                      "initial_max_streams_uni": 0, "disable_active_migration": False}
# RFC 9000 Section 10.3: a stateless reset ends in a 16-byte token, and is at least 21 bytes.
RESET_TOKEN_SIZE, MIN_RESET_SIZE = 16, 21


def idle_timeout_for(min_lifetime):
    """Section 3.4: M/8, within [1 s, 30 s]."""
    return min(max(min_lifetime / 8.0, MIN_IDLE), MAX_IDLE)


class Exchange:
    """One request and what came back on its stream."""

    def __init__(self, sent):
        self.sent = sent
        self.raw = None          # the answer's bytes, when its stream ended with FIN
        self.message = None      # the answer decoded
        self.error = None        # or why it could not be
        self.reset = None        # RESET_STREAM's code, when the gateway reset the stream
        self.closed = None       # (code, reason) when the connection closed first
        self.timed_out = False   # no answer within ANSWER_WAIT
        self.too_large = False   # the answer exceeded 16,384 bytes

    def report(self):
        out = {"sent": self.sent.hex(), "request_id": codec.request_id_of(self.sent)}
        # What this client's own reading of the specification answers to what it sent: the
        # result code a gateway should refuse it with, or None for a request to accept.
        request, refusal = None, None
        try:
            request = codec.decode(self.sent)
            out["own_code"] = None
        except codec.DecodeError as err:
            refusal = err
            out["own_code"] = err.code
        if self.message is not None:
            out["violations"] = _violations(self.sent, request, refusal, self.message)
        if self.raw is not None:
            out["answer_hex"] = self.raw.hex()
            # Section 6.2: a version-1 gateway writes the deterministic encoding, which for a
            # message without extension keys is its re-encoding.
            out["canonical"] = (self.message is not None
                                and codec.encode(self.message) == self.raw)
        if self.message is not None:
            out["answer"] = self.message
        if self.error is not None:
            out["decode_error"] = {"layer": self.error.layer, "error": self.error.error,
                                   "detail": self.error.detail}
        if self.reset is not None:
            out["reset"] = self.reset
        if self.closed is not None:
            out["closed"] = _closed_report(self.closed)
        if self.timed_out:
            out["timed_out"] = True
        if self.too_large:
            out["too_large"] = True
        return out


ANSWERS = {"hello": "welcome", "open": "granted", "renew": "granted", "release": "released",
           "list": "leases"}


def _violations(sent, request, refusal, answer):
    """The rules of the specification an answer breaks, whatever the request was."""
    found = []
    expected_id = codec.request_id_of(sent)
    if answer["request_id"] != expected_id:  # Section 8.1, with Section 6.6's readable id
        found.append(f"request id {answer['request_id']} for {expected_id}")
    kind = answer["type"]
    if kind in codec.NOTICES:
        found.append(f"a notice ({kind}) on a request stream")
    wanted = ANSWERS.get(request["type"]) if request is not None else None
    if kind != "denied" and kind != wanted:
        found.append(f"{kind} answers {request['type'] if request else 'an invalid item'}")
    if request is not None and request["type"] in ("renew", "release") and kind != "denied" \
            and answer["lease"] != request["lease"]:
        found.append("the answer names another lease than the request")
    if kind == "granted":  # Section 8.8
        if answer["lifetime"] == 0:
            found.append("Granted with a lifetime of 0")
        if answer["renew_after"] > answer["lifetime"]:
            found.append("renew-after above the lifetime")
    if kind == "welcome":  # Section 7.3
        limits = answer["limits"]
        if limits["max_message_size"] < codec.MAX_MESSAGE_SIZE:
            found.append("max-message-size below 16,384")
        if limits["max_streams"] < 1:
            found.append("max-streams below 1")
        if not 1 <= limits["min_lifetime"] <= limits["max_lifetime"] <= codec.MAX_LIFETIME:
            found.append("lifetime limits out of order or range")
    if kind == "denied":  # Section 8.9
        if answer["code"] == "rate-limited" and answer["retry_after"] is None:
            found.append("rate-limited without retry-after")
        if refusal is not None and refusal.error == "unsupported-critical" \
                and answer["code"] == "unsupported-option" \
                and answer["unsupported"] != refusal.unsupported:
            found.append(f"key 7 {answer['unsupported']} for {refusal.unsupported}")
    return found


class _Stream:
    def __init__(self, exchange, future):
        self.exchange, self.future, self.buffer = exchange, future, bytearray()


class _Trace(QuicLoggerTrace):
    """What the client learns of its connection from aioquic's qlog events, its public window on
    the transport: the transport parameters each side sent, the connection ids the gateway
    issued with their stateless reset tokens, and the ids the client sent packets to. Only these
    are kept (a trace of every event would grow for as long as the connection lasts)."""

    def __init__(self, *, is_client, odcid):
        super().__init__(is_client=is_client, odcid=odcid)
        self.parameters = {}  # "local" or "remote": the transport parameters, as qlog renders them
        self._tokens = {}     # the gateway's connection id (hex): its stateless reset token (hex)
        self.used = set()     # the gateway's connection ids (hex) the client sent packets to
        self._frames = []     # frame lists of received packets, filled after their event

    def log_event(self, *, category, event, data):
        self._collect()
        if event == "parameters_set":
            self.parameters[data["owner"]] = data
            token = data.get("stateless_reset_token")
            if data["owner"] == "remote" and token:
                # RFC 9000 Section 18.2: the token of the id the gateway chose in its handshake.
                self._tokens[data["initial_source_connection_id"]] = token
        elif event == "packet_received" and data.get("frames") is not None:
            self._frames.append(data["frames"])
        elif event == "packet_sent":
            self.used.add(data["header"]["dcid"])

    def _collect(self):
        for frames in self._frames:
            for frame in frames:
                if frame.get("frame_type") == "new_connection_id":
                    self._tokens[frame["connection_id"]] = frame["reset_token"]
        self._frames.clear()

    @property
    def tokens(self):
        self._collect()
        return dict(self._tokens)

    def reset_token_of(self, datagram):
        """The connection id whose token `datagram` ends in, if it is a stateless reset of this
        connection: RFC 9000 Section 10.3.1 compares the last 16 bytes with the tokens of the
        connection ids the client used."""
        if len(datagram) < MIN_RESET_SIZE:
            return None
        tail = datagram[-RESET_TOKEN_SIZE:].hex()
        for cid, token in self.tokens.items():
            if token == tail and cid in self.used:
                return cid
        return None


class _Observer(QuicLogger):
    """A QuicLogger whose one trace is a _Trace."""

    def __init__(self):
        super().__init__()
        self.trace = None

    def start_trace(self, is_client, odcid):
        self.trace = _Trace(is_client=is_client, odcid=odcid)
        return self.trace

    def end_trace(self, trace):
        pass  # the trace stays readable after the connection ends


class _Muted:
    """A datagram transport that sends nothing: after a stateless reset the client must not send
    on the connection again (RFC 9000 Section 10.3.1), while aioquic still closes it."""

    def sendto(self, data, addr=None):
        pass

    def close(self):
        pass

    def get_extra_info(self, name, default=None):
        return default


class _Path(asyncio.DatagramProtocol):
    """A second UDP socket of a connection: what it receives goes to the connection, and what it
    received is counted."""

    def __init__(self, protocol):
        self.protocol, self.received, self.transport = protocol, 0, None

    def connection_made(self, transport):
        self.transport = transport
        # The connection sends through this socket from now on.
        self.protocol.connection_made(transport)

    def datagram_received(self, data, addr):
        self.received += 1
        self.protocol.datagram_received(data, addr)


class FwnpProtocol(QuicConnectionProtocol):
    """The QUIC connection's events: answers on request streams, notices on the gateway's
    unidirectional streams, and stateless resets, which aioquic does not detect."""

    def __init__(self, quic, stream_handler=None, observer=None):
        super().__init__(quic, stream_handler)
        # Section 3.4: the gateway never opens a bidirectional stream; a client with NOTICES
        # allows it at least 8 unidirectional ones. aioquic 1.x has no setting for these two
        # transport parameters (it always announces 128), so its connection's limits are set
        # here, before the handshake sends them; the client reads back what it sent from the
        # qlog trace.
        quic._local_max_streams_bidi.value = 0
        quic._local_max_streams_uni.value = 16
        self.observer = observer
        self.requests = {}
        self.notices = []
        self.notice_buffers = {}
        self.closed = None
        self.reset = None       # the stateless reset that ended the connection
        self.transports = []    # the UDP sockets the connection sent through, the first its own
        self.negotiated = None  # the ALPN protocol the handshake selected
        self.last_sent = asyncio.get_event_loop().time()

    @property
    def trace(self):
        return self.observer.trace if self.observer is not None else None

    def connection_made(self, transport):
        if not isinstance(transport, _Muted) and transport not in self.transports:
            self.transports.append(transport)
        super().connection_made(transport)

    def datagram_received(self, data, addr):
        # RFC 9000 Section 10.3.1: a datagram ending in the token of a connection id the
        # client used is a stateless reset. aioquic would drop it as a packet it cannot
        # decrypt, and learn that the connection is gone only at its idle timeout.
        trace = self.trace
        cid = trace.reset_token_of(bytes(data)) if trace is not None and self.reset is None \
            else None
        if cid is None:
            super().datagram_received(data, addr)
            return
        self.reset = {"connection_id": cid, "token": bytes(data[-RESET_TOKEN_SIZE:]).hex(),
                      "size": len(data), "first_byte": data[0],
                      "at": asyncio.get_event_loop().time()}
        # The connection ends here, in silence: aioquic closes it, sending to no one.
        self.connection_made(_Muted())
        self._quic.close(error_code=NO_ERROR, reason_phrase="stateless reset")
        self.transmit()
        self._terminated((None, "stateless reset", False))

    def _terminated(self, closed):
        if self.closed is None:
            self.closed = closed
        for stream in self.requests.values():
            if not stream.future.done():
                stream.exchange.closed = self.closed
                stream.future.set_result(stream.exchange)
        self.requests.clear()

    def quic_event_received(self, event):
        if isinstance(event, events.StreamDataReceived):
            self._data(event)
        elif isinstance(event, events.StreamReset):
            stream = self.requests.pop(event.stream_id, None)
            if stream is not None and not stream.future.done():
                stream.exchange.reset = event.error_code
                stream.future.set_result(stream.exchange)
            self.notice_buffers.pop(event.stream_id, None)
        elif isinstance(event, events.ProtocolNegotiated):
            self.negotiated = event.alpn_protocol
        elif isinstance(event, events.ConnectionTerminated):
            # A transport close names the frame that caused it; an application close none.
            self._terminated((event.error_code, event.reason_phrase, event.frame_type is None))

    def _data(self, event):
        sid = event.stream_id
        if sid % 4 == 1:
            # Section 5.1: a gateway-opened bidirectional stream.
            self._quic.close(error_code=PROTOCOL_VIOLATION, reason_phrase="bidirectional stream")
            self.transmit()
            return
        if sid % 4 == 3:
            buffer = self.notice_buffers.setdefault(sid, bytearray())
            if buffer is None:
                return
            buffer += event.data
            if len(buffer) > codec.MAX_MESSAGE_SIZE:
                # Section 5.3: discarded, STOP_SENDING MessageTooLarge.
                self._quic.stop_stream(sid, MESSAGE_TOO_LARGE)
                self.notice_buffers[sid] = None
                self.notices.append({"discarded": "too large"})
                self.transmit()
            elif event.end_stream:
                del self.notice_buffers[sid]
                self.notices.append(_notice(bytes(buffer)))
            return
        stream = self.requests.get(sid)
        if stream is None:
            return
        stream.buffer += event.data
        if len(stream.buffer) > codec.MAX_MESSAGE_SIZE:
            # Section 5.5: STOP_SENDING, the request unanswered.
            self._quic.stop_stream(sid, MESSAGE_TOO_LARGE)
            self.transmit()
            stream.exchange.too_large = True
            del self.requests[sid]
            stream.future.set_result(stream.exchange)
        elif event.end_stream:
            del self.requests[sid]
            stream.exchange.raw = bytes(stream.buffer)
            try:
                stream.exchange.message = codec.decode(stream.exchange.raw)
            except codec.DecodeError as err:
                stream.exchange.error = err
            stream.future.set_result(stream.exchange)

    def transmit(self):
        self.last_sent = asyncio.get_event_loop().time()
        super().transmit()

    async def exchange(self, data, wait=ANSWER_WAIT, fin=True):
        """Sends `data` on a new request stream, ends it (unless `fin` is false, to see what
        the gateway does with an incomplete request), and waits for what comes back."""
        exchange = Exchange(bytes(data))
        if self.closed is not None:
            exchange.closed = self.closed
            return exchange
        sid = self._quic.get_next_available_stream_id(is_unidirectional=False)
        future = asyncio.get_event_loop().create_future()
        self.requests[sid] = _Stream(exchange, future)
        self._quic.send_stream_data(sid, bytes(data), end_stream=fin)
        self.transmit()
        try:
            return await asyncio.wait_for(asyncio.shield(future), wait)
        except asyncio.TimeoutError:
            # Section 5.2: STOP_SENDING RequestTimeout, the request unanswered.
            self.requests.pop(sid, None)
            if self.closed is None:
                self._quic.stop_stream(sid, REQUEST_TIMEOUT)
                self.transmit()
            exchange.timed_out = True
            return exchange

    def open_unidirectional_beyond_limit(self, data):
        """Sends `data` on a unidirectional stream although the gateway's limit is 0: a breach
        of QUIC's stream limit on purpose. aioquic keeps such a stream blocked until the peer
        raises its limit, and has no way to send it regardless but to be told the limit is
        higher than the gateway said."""
        self._quic._remote_max_streams_uni = 1
        sid = self._quic.get_next_available_stream_id(is_unidirectional=True)
        self._quic.send_stream_data(sid, data, end_stream=True)
        self.transmit()

    async def keep_alive(self, idle):
        """Section 3.4: a PING whenever nothing was sent for a third of the idle timeout."""
        loop = asyncio.get_event_loop()
        while self.closed is None:
            quiet = loop.time() - self.last_sent
            if quiet >= idle / 3:
                self._quic.send_ping(0)
                self.transmit()
                quiet = 0
            await asyncio.sleep(idle / 3 - quiet)


def _notice(raw):
    try:
        return {"notice": codec.decode(raw)}
    except codec.DecodeError as err:
        if err.error == "unknown-message-type":
            return {"ignored": raw.hex()}  # Section 5.3: an unknown notice type is ignored
        return {"discarded": err.error}


class Session:
    """A connection to the gateway, its Hello answered or refused."""

    def __init__(self, gateway, cert, key, ca, server_name=None, alpn=ALPN):
        self.host, port = gateway.rsplit(":", 1)
        self.host = self.host.strip("[]")
        self.port = int(port)
        self.cert, self.key, self.ca = cert, key, ca
        # Section 3.2: the certificate must name the gateway as configured (an IP SAN here).
        self.server_name = server_name or self.host
        self.alpn = alpn
        self.tickets = []  # TLS session tickets the gateway issued (Section 3.3)
        self.protocol = None
        self.welcome = None
        self.idle = DEFAULT_IDLE
        self.observer = None
        self._context = None
        self._keep_alive = None
        self._next_id = int.from_bytes(os.urandom(4), "big")

    def request_id(self):
        """Section 15: a different id for each request, drawn at random to start with."""
        self._next_id = (self._next_id + 1) % codec.U64
        return self._next_id

    def configuration(self):
        self.observer = _Observer()
        config = QuicConfiguration(is_client=True, alpn_protocols=[self.alpn],
                                   idle_timeout=self.idle, server_name=self.server_name,
                                   verify_mode=ssl.CERT_REQUIRED, quic_logger=self.observer)
        config.load_verify_locations(cafile=self.ca)
        if self.cert is not None:
            config.load_cert_chain(self.cert, self.key)
        return config

    def _protocol_factory(self, configuration):
        return functools.partial(FwnpProtocol, observer=configuration.quic_logger)

    async def connect(self):
        config = self.configuration()
        self._context = connect(self.host, self.port, configuration=config,
                                create_protocol=self._protocol_factory(config),
                                session_ticket_handler=self.tickets.append)
        self.protocol = await self._context.__aenter__()
        self._keep_alive = asyncio.ensure_future(self.protocol.keep_alive(self.idle))
        return self.protocol

    async def handshake_fate(self, limit=5.0):
        """Connects without waiting for the handshake and reports how the connection ended
        within `limit`, or None if it is still open: for handshakes the gateway must abort."""
        config = self.configuration()
        self._context = connect(self.host, self.port, configuration=config,
                                create_protocol=self._protocol_factory(config),
                                wait_connected=False)
        self.protocol = await self._context.__aenter__()
        self.protocol.transmit()  # without waiting, aioquic sends the Initial at the first send
        await _wait_closed(self.protocol, limit)
        return _closed(self.protocol)

    async def close(self, code=NO_ERROR):
        if self._keep_alive is not None:
            self._keep_alive.cancel()
        if self.protocol is not None and self.protocol.closed is None:
            self.protocol.close(error_code=code)
        if self._context is not None:
            try:
                await asyncio.wait_for(self._context.__aexit__(None, None, None), 5)
            except asyncio.TimeoutError:
                pass
        self._context = self.protocol = None

    def transport_parameters(self, owner="remote"):
        """The transport parameters the gateway ("remote") or the client ("local") sent, those
        absent at their default of RFC 9000 Section 18.2."""
        trace = self.protocol.trace if self.protocol is not None else None
        sent = trace.parameters.get(owner, {}) if trace is not None else {}
        return {**TRANSPORT_DEFAULTS, **{k: v for k, v in sent.items() if v is not None}}

    async def move(self):
        """Sends from a new UDP socket, of another local port, from now on: the connection
        migrates although the gateway may have forbidden it (disable_active_migration). Returns
        the new path; move_back returns to the handshake's."""
        sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind(("::", 0, 0, 0))
        path = _Path(self.protocol)
        await asyncio.get_event_loop().create_datagram_endpoint(lambda: path, sock=sock)
        return path

    def move_back(self, path):
        self.protocol.connection_made(self.protocol.transports[0])
        path.transport.close()

    async def hello(self, capabilities=NOTICES, versions=(1,)):
        message = {"type": "hello", "versions": list(versions), "capabilities": capabilities,
                   "software": "fwnp-wire-python/1", "request_id": self.request_id()}
        exchange = await self.protocol.exchange(codec.encode(message))
        if exchange.message is not None and exchange.message["type"] == "welcome":
            self.welcome = exchange.message
        return exchange

    async def start(self, capabilities=NOTICES):
        """Connects and says Hello; connects again with shorter timers when the Welcome's
        shortest lifetime calls for them (Section 3.4). Returns the Hello's exchanges."""
        await self.connect()
        first = await self.hello(capabilities)
        if self.welcome is None:
            return [first]
        wanted = idle_timeout_for(self.welcome["limits"]["min_lifetime"])
        if wanted >= self.idle:
            return [first]
        await self.close()
        self.idle, self.welcome = wanted, None
        await self.connect()
        return [first, await self.hello(capabilities)]

    async def send(self, message, wait=ANSWER_WAIT):
        message = dict(message)
        message.setdefault("request_id", self.request_id())
        return await self.protocol.exchange(codec.encode(message), wait)

    def opening(self, port, **extra):
        opening = {"protocol": "tcp", "ports": {"first": port, "last": port}, "app": None,
                   "host": None, "family": None, "remotes": []}
        opening.update(extra)
        return opening


# ---------------------------------------------------------------------------------------------
# The vectors.

def check_vectors(directory):
    names = sorted(n for n in os.listdir(directory) if n.endswith(".json"))
    failed = 0
    for name in names:
        with open(os.path.join(directory, name)) as file:
            vector = json.load(file)
        problem = _vector_problem(vector)
        if problem is not None:
            failed += 1
            print(json.dumps({"vector": name, "problem": problem}), flush=True)
    print(json.dumps({"vectors": len(names), "failed": failed}), flush=True)
    return failed == 0


def _vector_problem(vector):
    data = bytes.fromhex(vector["hex"])
    try:
        decoded = codec.decode(data)
    except codec.DecodeError as err:
        if "valid" in vector:
            return f"refused: {err}"
        want = vector["invalid"]
        got = {"layer": err.layer, "error": err.error, "result_code": err.code}
        if any(got[k] != want[k] for k in got) or err.unsupported != want.get("unsupported", []):
            return f"refused as {got} {err.unsupported}, not as {want}"
        return None
    if "invalid" in vector:
        return f"accepted as {decoded}"
    if decoded != vector["valid"]["decoded"]:
        return f"decoded as {decoded}"
    if codec.encode(decoded).hex() != vector["valid"]["canonical_hex"]:
        return f"re-encoded as {codec.encode(decoded).hex()}"
    return None


# ---------------------------------------------------------------------------------------------
# The drive: every step a JSON line.

def say(step, **fields):
    print(json.dumps({"step": step, **fields}, default=str), flush=True)


async def read_line():
    line = await asyncio.get_event_loop().run_in_executor(None, sys.stdin.readline)
    return line.strip()


async def drive(args):
    files = dict(gateway=args.gateway, cert=args.cert, key=args.key, ca=args.ca)

    # A request before Hello: hello-required, the request id echoed.
    early = Session(**files)
    await early.connect()
    opening = early.opening(args.port)
    exchange = await early.send({"type": "open", "opening": opening, "request_id": 7001})
    say("open-before-hello", **exchange.report())
    await early.close()

    # Section 11.3: decoding comes before the connection's state, so an ill-formed item before
    # Hello is malformed-request, not hello-required.
    early = Session(**files)
    await early.connect()
    truncated = codec.encode({"type": "list", "request_id": 7002})[:-1]
    exchange = await early.protocol.exchange(truncated)
    say("truncated-before-hello", **exchange.report())
    await early.close()

    # Section 3.2: no client certificate, certificate_required (TLS alert 116, QUIC's crypto
    # error 0x100 + 116); Section 3.1: no ALPN fwnp/1, no_application_protocol (120).
    bare = Session(**dict(files, cert=None, key=None))
    say("no-client-certificate", closed=await bare.handshake_fate())
    await bare.close()
    stranger = Session(**files, alpn="h3")
    say("other-alpn", closed=await stranger.handshake_fate())
    await stranger.close()

    # A Hello without version 1: unsupported-version, then the connection closed with
    # VersionMismatch.
    other = Session(**files)
    await other.connect()
    exchange = await other.hello(versions=[2, 3])
    await _wait_closed(other.protocol, 3.0)
    say("unknown-version", **exchange.report(),
        then_closed=_closed(other.protocol))
    await other.close()

    # A unidirectional stream from the client: beyond the gateway's limit of 0, so QUIC itself
    # closes the connection, with STREAM_LIMIT_ERROR (Section 5.1).
    uni = Session(**files)
    await uni.connect()
    await uni.hello()
    uni.protocol.open_unidirectional_beyond_limit(
        codec.encode({"type": "list", "request_id": 1}))
    await _wait_closed(uni.protocol, 3.0)
    say("unidirectional-stream", closed=_closed(uni.protocol))
    await uni.close()

    # The session the rest runs in.
    session = Session(**files)
    hellos = await session.start(capabilities=NOTICES | PORT_RANGES | REMOTE_PREFIXES)
    remote, local = session.transport_parameters(), session.transport_parameters("local")
    names = ("initial_max_streams_bidi", "initial_max_streams_uni", "max_idle_timeout",
             "disable_active_migration")
    say("hello", **hellos[-1].report(), hellos=len(hellos), idle_timeout=session.idle,
        transport=dict({name: remote.get(name) for name in names},
                       alpn=session.protocol.negotiated,
                       stateless_reset_token=remote.get("stateless_reset_token") is not None),
        own_transport={name: local.get(name) for name in names},
        session_tickets=len(session.tickets),
        early_data_offered=any(t.max_early_data_size for t in session.tickets))
    exchange = await session.hello()
    say("second-hello", **exchange.report())

    exchange = await session.send({"type": "open", "opening": session.opening(args.port),
                                   "lifetime": 60})
    say("open", **exchange.report())
    if exchange.message is None or exchange.message["type"] != "granted":
        await session.close()
        return
    lease = exchange.message["lease"]
    # Section 11.3: Granted means in force; the caller probes the port at once.
    say("held", lease=lease)
    if await read_line() != "probed":
        await session.close()
        return

    exchange = await session.send({"type": "open", "opening": session.opening(args.port),
                                   "lifetime": 60})
    say("open-again", **exchange.report())
    exchange = await session.send({"type": "renew", "lease": lease, "lifetime": 30})
    say("renew", **exchange.report())
    exchange = await session.send({"type": "renew", "lease": lease})
    say("renew-default", **exchange.report())
    exchange = await session.send({"type": "list"})
    say("list", **exchange.report())
    # No request id: none in the answer.
    exchange = await session.protocol.exchange(codec.encode({"type": "list"}))
    say("list-without-request-id", **exchange.report())

    # A port range, released at once.
    exchange = await session.send({"type": "open", "lifetime": 60, "opening": session.opening(
        args.port + 100, ports={"first": args.port + 100, "last": args.port + 102})})
    say("open-range", **exchange.report())
    if exchange.message is not None and exchange.message["type"] == "granted":
        exchange = await session.send({"type": "release", "lease": exchange.message["lease"]})
        say("release-range", **exchange.report())
    # Remote prefixes of one family and no host address: the host's addresses of that family
    # (Section 9.2), only the prefix admitted.
    remote_port = args.port + 1
    exchange = await session.send({"type": "open", "lifetime": 60, "opening": session.opening(
        remote_port, remotes=[args.remote_prefix])})
    say("open-remotes", **exchange.report())
    # The keys every message has are understood when listed in `critical` (Section 6.5).
    item = _cbor_map(codec.encode({"type": "list", "request_id": 7004}))
    item[2] = [0, 1, 2]
    exchange = await session.protocol.exchange(_dumps(item))
    say("critical-common-keys", **exchange.report())
    # An application id the catalogue does not hold (the client's own APPLICATIONS bit is
    # informational, Section 14).
    exchange = await session.send({"type": "open", "request_id": 7005, "opening": {
        "protocol": None, "ports": None, "app": "nosuchapp", "host": None, "family": None,
        "remotes": []}})
    say("open-unknown-application", **exchange.report())

    # Host addresses named as an array, and a family without addresses (Section 9.2): one
    # lease each, released at once.
    addresses = session.welcome["addresses"]
    for name, port, extra in (("open-host-addresses", args.port + 5, {"host": addresses}),
                              ("open-family-ipv6", args.port + 6, {"family": "ipv6"})):
        exchange = await session.send({"type": "open", "lifetime": 60,
                                       "opening": session.opening(port, **extra)})
        say(name, **exchange.report())
        if exchange.message is not None and exchange.message["type"] == "granted":
            await session.send({"type": "release", "lease": exchange.message["lease"]})

    # Lifetimes: below the minimum raised to it (narrowed), 0 the policy's default (not
    # narrowed), a Renew above the maximum lowered to it (narrowed). Section 11.2.
    for name, port, lifetime in (("open-short-lifetime", args.port + 2, 10),
                                 ("open-zero-lifetime", args.port + 3, 0)):
        exchange = await session.send({"type": "open", "lifetime": lifetime,
                                       "opening": session.opening(port)})
        say(name, **exchange.report())
        if exchange.message is not None and exchange.message["type"] == "granted":
            await session.send({"type": "release", "lease": exchange.message["lease"]})
    exchange = await session.send({"type": "renew", "lease": lease, "lifetime": 1000})
    say("renew-long", **exchange.report())

    # Items that break several rules: the failure reported is the first in the order of
    # Section 6.6.
    def open_item(request_id, port=args.port):
        return _cbor_map(codec.encode({"type": "open", "request_id": request_id,
                                       "opening": session.opening(port)}))
    probes = []
    item = open_item(7501)
    item[2], item[3]["x"] = [64], 1
    probes.append(("first-critical-then-opening-keys", item))
    item = open_item(7502)
    item[2], item["x"] = [64], 1
    probes.append(("first-message-keys-then-critical", item))
    probes.append(("first-critical-then-request-id", {0: 6, 1: "x", 2: [64]}))
    item = open_item(7503)
    item[3][1], item[4] = 99, 1 << 32
    probes.append(("first-opening-then-lifetime", item))
    item = open_item(7504)
    item[3][1], item[5] = 99, {1: 5}
    probes.append(("first-opening-then-app-info", item))
    probes.append(("first-missing-opening-then-lifetime", {0: 3, 1: 7505, 4: 1 << 32}))
    item = open_item(7506, 0)
    item[4] = 1 << 32
    probes.append(("first-decoding-then-validation", item))
    item = open_item(7507, 0)
    item[4] = 700000
    probes.append(("first-opening-rules-then-lifetime-maximum", item))
    for name, item in probes:
        exchange = await session.protocol.exchange(_dumps(item))
        say(name, **exchange.report())
    # A Hello (on a connection of its own) without version 1 and with an overlong software
    # text: decoding before the versions.
    other = Session(**files)
    await other.connect()
    exchange = await other.protocol.exchange(_dumps({0: 1, 1: 7508, 3: [2], 5: "x" * 200}))
    say("first-decoding-then-versions", **exchange.report())
    await other.close()

    # Every conformance vector of a request, as the gateway answers it (Section 19): a valid
    # one is not refused for its form (it may be for what it asks: an address not the
    # host's, an unknown lease), an invalid one is refused with its result code. Hellos each
    # on a connection of their own, since a Hello comes first.
    if args.vectors:
        say("vectors", **await send_vectors(session, files, args.vectors))

    # The gateway's refusals.
    unknown = os.urandom(16).hex()
    exchange = await session.send({"type": "renew", "lease": unknown, "request_id": 7101})
    say("renew-unknown-lease", **exchange.report(), lease=unknown)
    foreign = args.foreign_address
    exchange = await session.send({"type": "open", "request_id": 7102,
                                   "opening": session.opening(args.port, host=foreign)})
    say("open-foreign-address", **exchange.report())
    exchange = await session.send({"type": "open", "request_id": 7103,
                                   "opening": session.opening(args.port), "lifetime": 604801})
    say("open-lifetime-above-maximum", **exchange.report())
    exchange = await session.send({"type": "open", "request_id": 7104,
                                   "opening": session.opening(0)})
    say("open-port-zero", **exchange.report())
    # Critical keys 70 and 64 not understood: Denied key 7 [64, 70].
    raw = codec.encode({"type": "list", "request_id": 7105})
    item = _cbor_map(raw)
    item[2] = [70, 64, 70]
    exchange = await session.protocol.exchange(_dumps(item))
    say("unknown-critical", **exchange.report())
    # Ill-formed CBOR: truncated (no request id readable), and with a byte after the map (the
    # request id readable).
    raw = codec.encode({"type": "list", "request_id": 7106})
    exchange = await session.protocol.exchange(raw[:-1])
    say("truncated", **exchange.report())
    exchange = await session.protocol.exchange(raw + b"\x00")
    say("trailing-byte", **exchange.report())
    # Key 1 twice, with equal values: no request id is readable.
    exchange = await session.protocol.exchange(_hex("a3 0006 01191bc3 01191bc3"))
    say("duplicate-request-id", **exchange.report())
    # An unknown message type, and an answer's type on a request stream.
    exchange = await session.protocol.exchange(_hex("a2 0007 01191bc4"))
    say("unknown-type", **exchange.report())
    exchange = await session.protocol.exchange(
        codec.encode({"type": "released", "request_id": 7109, "lease": lease}))
    say("answer-type-as-request", **exchange.report())
    # An extension key and an unknown key below 64: ignored, the List answered.
    item = _cbor_map(codec.encode({"type": "list", "request_id": 7110}))
    item[64] = {"x": [1, None]}
    item[20] = "later"
    exchange = await session.protocol.exchange(_dumps(item))
    say("unknown-keys", **exchange.report())
    # In an ignored value, the integer 1 and the float 1.0 are two keys, not one twice (they
    # are distinct in CBOR's data model, RFC 8949 Section 2).
    exchange = await session.protocol.exchange(_hex("a3 0006 01191bc9 1840 a2 f93c00 01 01 02"))
    say("float-and-integer-keys", **exchange.report())
    # An Open as large as a request may be, its remote prefixes the bulk of it: its Granted
    # would not fit in 16,384 bytes, so the gateway answers denied-by-policy (Section 5.4).
    def large_open(count):
        remotes = [f"10.0.{n >> 8 & 255}.{n & 255}/32" for n in range(count)]
        return codec.encode({"type": "open", "request_id": 7114, "lifetime": 60,
                             "opening": session.opening(args.port + 8, remotes=remotes)})
    count = 2000  # 8 bytes a prefix: about 16,000 bytes
    while len(large_open(count + 1)) <= codec.MAX_MESSAGE_SIZE:
        count += 1
    item = large_open(count)
    exchange = await session.protocol.exchange(item)
    say("open-largest-answer", **exchange.report(), size=len(item), remotes=count,
        answer_size=len(exchange.raw) if exchange.raw is not None else None)
    if exchange.message is not None and exchange.message["type"] == "granted":
        await session.send({"type": "release", "lease": exchange.message["lease"]})
    # An oversized item: the stream reset with MessageTooLarge, no answer.
    item = _padded(_cbor_map(codec.encode({"type": "list", "request_id": 7111})),
                   codec.MAX_MESSAGE_SIZE + 1)
    exchange = await session.protocol.exchange(_dumps(item))
    say("too-large", **exchange.report(), size=len(_dumps(item)))
    # 16,384 bytes exactly: accepted (Section 5.4).
    item = _padded(_cbor_map(codec.encode({"type": "list", "request_id": 7112})),
                   codec.MAX_MESSAGE_SIZE)
    exchange = await session.protocol.exchange(_dumps(item))
    say("largest", **exchange.report(), size=len(_dumps(item)))

    # An Open whose stream is never ended: the gateway must not act on it (Section 5.2), and
    # resets the stream with RequestTimeout after 10 s. Meanwhile a connection that never says
    # Hello is closed with RequestTimeout 10 s after its handshake.
    silent = Session(**files)
    await silent.connect()
    say("pending", port=args.port + 4)
    pending = asyncio.ensure_future(session.protocol.exchange(
        codec.encode({"type": "open", "request_id": 7601, "lifetime": 60,
                      "opening": session.opening(args.port + 4)}), wait=13.0, fin=False))
    # Meanwhile, a connection that migrates (Section 3.4).
    moved = asyncio.ensure_future(migrate(files))
    await _wait_closed(silent.protocol, 13.0)
    say("no-hello", closed=_closed(silent.protocol))
    await silent.close()
    say("open-without-fin", **(await pending).report())
    say("migration", **await moved)

    # A second connection, without NOTICES, to see that notices go only where asked for.
    quiet = Session(**files)
    await quiet.start(capabilities=0)

    # Section 3.5: more connections of one identity than the gateway allows (4 in the caller's
    # configuration, two of them held here): the one beyond is closed with ExcessiveLoad.
    extras, fates = [], []
    for _ in range(3):
        extra = Session(**files)
        await extra.connect()
        exchange = await extra.hello()
        fates.append({"answer": (exchange.message or {}).get("type"),
                      "closed": _closed(extra.protocol)})
        extras.append(extra)
    say("connections", fates=fates, main_closed=_closed(session.protocol),
        quiet_closed=_closed(quiet.protocol))
    for extra in extras:
        await extra.close()

    # A connection without Hello yet, which must get no notice (Section 5.3).
    unwelcomed = Session(**files)
    await unwelcomed.connect()

    # Wait for the caller's revocation of the lease of the remote prefixes, then for the
    # notice.
    say("waiting")
    if await read_line() != "revoked":
        await session.close()
        return
    loop = asyncio.get_event_loop()
    deadline = loop.time() + 3.0
    while not session.protocol.notices and loop.time() < deadline:
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.3)
    say("notices", notices=session.protocol.notices, quiet=quiet.protocol.notices,
        unwelcomed=unwelcomed.protocol.notices)
    await quiet.close()
    await unwelcomed.close()
    revoked = [n["notice"]["lease"] for n in session.protocol.notices if "notice" in n]
    for lease_id in revoked:
        exchange = await session.send({"type": "renew", "lease": lease_id, "request_id": 7301})
        say("renew-revoked", **exchange.report())
    say("revoke-checked")

    # Then release.
    if await read_line() != "release":
        await session.close()
        return
    exchange = await session.send({"type": "release", "lease": lease})
    say("release", **exchange.report())
    # The same request again, same id: the answer recorded for it if the gateway keeps a
    # window of request ids (Section 15), else unknown-lease.
    retried = await session.protocol.exchange(exchange.sent)
    say("release-retried", **retried.report(), first_answer=exchange.raw.hex()
        if exchange.raw is not None else None)
    exchange = await session.send({"type": "renew", "lease": lease, "request_id": 7201})
    say("renew-released", **exchange.report())
    exchange = await session.send({"type": "release", "lease": lease, "request_id": 7202})
    say("release-released", **exchange.report())
    exchange = await session.send({"type": "list"})
    say("list-after-release", **exchange.report())

    # The certificate revoked (Section 8.12): a lease it opened is revoked with
    # credential-revoked, the notice sent on every connection of the identity, the connections
    # made with that certificate closed with NoError, those made with another certificate of
    # the identity kept, and a new handshake with it refused (certificate_revoked).
    exchange = await session.send({"type": "open", "lifetime": 60,
                                   "opening": session.opening(args.port + 7)})
    say("open-before-credential", **exchange.report())
    second = Session(**dict(files, cert=args.second_cert, key=args.second_key))
    await second.start()
    seen = len(session.protocol.notices)
    say("ready-for-credential")
    if await read_line() != "credential-revoked":
        await session.close()
        return
    await _wait_closed(session.protocol, 5.0)
    deadline = asyncio.get_event_loop().time() + 2.0
    while not second.protocol.notices and asyncio.get_event_loop().time() < deadline:
        await asyncio.sleep(0.05)
    again = Session(**files)
    say("credential", notices=session.protocol.notices[seen:], closed=_closed(session.protocol),
        second_notices=second.protocol.notices, second_closed=_closed(second.protocol),
        new_handshake=await again.handshake_fate())
    await again.close()
    await session.close()

    # A lease to outlive the gateway's restart, kept in the client's book with the Open that
    # asked for it.
    book = LeaseBook()
    asked = {"type": "open", "lifetime": 120, "opening": second.opening(args.port + 9)}
    exchange = await second.send(asked)
    say("open-before-restart", **exchange.report())
    book.record(asked, exchange.message)

    # The caller stops the gateway: GoingAway, then the connection closed with GoingAway
    # (Section 3.5).
    seen = len(second.protocol.notices)
    say("ready-for-shutdown")
    await _wait_closed(second.protocol, 10.0)
    say("shutdown", notices=second.protocol.notices[seen:], closed=_closed(second.protocol))
    await second.close()

    # The caller starts it again on its state: the same epoch (Section 12), the lease still
    # live and renewable.
    if await read_line() != "restarted":
        return
    second_files = dict(files, cert=args.second_cert, key=args.second_key)
    again = Session(**second_files)
    hellos = await again.start()
    say("hello-after-restart", **hellos[-1].report())
    exchange = await again.send({"type": "list"})
    say("list-after-restart", **exchange.report())
    for info in (exchange.message or {}).get("leases") or []:
        exchange = await again.send({"type": "renew", "lease": info["lease"]})
        say("renew-after-restart", **exchange.report())
        book.record(None, exchange.message)
    await again.close()

    # The caller kills the gateway and starts it again on its state: the connection held
    # meanwhile draws a stateless reset at its next packet (Section 3.4), and the client
    # reconnects at once (Section 3.5) under the same epoch, its lease kept.
    say("crash", **await outlive_restart(second_files, book, "ready-for-crash", "crashed"))
    # The same, the gateway's lease state lost this time: the new epoch of its Welcome makes
    # the client open its lease again (Section 12).
    say("state-loss", **await outlive_restart(second_files, book, "ready-for-state-loss",
                                              "state-lost"))
    say("done")


class LeaseBook:
    """The leases the client holds (Section 12): each one's Open as first asked and the epoch
    it was last granted under."""

    def __init__(self):
        self.leases = {}

    def record(self, asked, answer):
        """Takes a Granted: of the Open `asked`, or of a Renew (`asked` None)."""
        if answer is None or answer["type"] != "granted":
            return
        held = self.leases.get(answer["lease"])
        asked = asked if asked is not None else held["asked"] if held is not None else None
        if asked is not None:
            self.leases[answer["lease"]] = {"asked": asked, "epoch": answer["epoch"]}

    def lost(self, epoch):
        """The leases granted under another epoch than `epoch`: the gateway has lost them."""
        return [(lease, held) for lease, held in self.leases.items() if held["epoch"] != epoch]

    async def reopen(self, session, epoch):
        """Section 12: each lease the gateway lost asked for again with a fresh Open of the
        opening as originally asked; its old id forgotten once a Granted replaces it."""
        exchanges = []
        for lease, held in self.lost(epoch):
            exchange = await session.send(held["asked"])
            exchanges.append(exchange.report())
            if exchange.message is not None and exchange.message["type"] == "granted":
                del self.leases[lease]
                self.record(held["asked"], exchange.message)
        return exchanges


async def outlive_restart(files, book, ready, told):
    """Says `ready` and holds a connection while the caller restarts the gateway (it says
    `told` when the gateway listens again), then sends List on it: the answer should be a
    stateless reset whose token is the one the gateway issued with the connection id in use.
    Reconnects at once, says Hello, re-opens the leases of another epoch (Section 12) and lists.
    Returns what it saw."""
    held = Session(**files)
    # The Welcome's timers are not taken up here (Section 3.4 would have the client connect
    # again with an idle timeout of M/8): the connection must outlive the gateway's restart for
    # its next packet to meet the new run, not time out before.
    await held.connect()
    await held.hello()
    epochs = [held.welcome["epoch"]] if held.welcome is not None else []
    say(ready, connection_ids=sorted(held.protocol.trace.used))
    if await read_line() != told:
        await held.close()
        return {}
    loop = asyncio.get_event_loop()
    exchange = await held.send({"type": "list"})
    trace = held.protocol.trace
    out = {"reset": held.protocol.reset, "list": exchange.report(),
           "issued": trace.tokens, "used": sorted(trace.used),
           "notices": list(held.protocol.notices)}
    # Section 3.5: after a stateless reset the gateway listens again; the client reconnects
    # at once, while aioquic winds the old connection down.
    closing = asyncio.ensure_future(held.close())
    reset_at = (out["reset"] or {}).get("at")
    out["reconnected_after"] = loop.time() - reset_at if reset_at is not None else None
    fresh = Session(**files)
    hellos = await fresh.start()
    out["hello"] = hellos[-1].report()
    if fresh.welcome is not None:
        epochs.append(fresh.welcome["epoch"])
        out["reopened"] = await book.reopen(fresh, fresh.welcome["epoch"])
    exchange = await fresh.send({"type": "list"})
    out["listed"] = exchange.report()
    # Notices, EpochChanged among them, that came on either connection; an EpochChanged, like
    # a Leases, whose epoch is not a lease's makes the client open that lease again.
    await asyncio.sleep(0.3)
    out["notices"] += fresh.protocol.notices
    announced = [n["notice"]["epoch"] for n in fresh.protocol.notices
                 if n.get("notice", {}).get("type") == "epoch-changed"]
    if exchange.message is not None and exchange.message["type"] == "leases":
        announced.append(exchange.message["epoch"])
    for epoch in announced:
        out.setdefault("reopened", []).extend(await book.reopen(fresh, epoch))
    out["epochs"] = epochs
    out["book"] = sorted(book.leases)
    await fresh.close()
    await closing
    return out


async def migrate(files):
    """Section 3.4: a gateway that sent disable_active_migration is not followed by a client
    that moves to another local address (here another UDP port) all the same: RFC 9000 Section 9
    has it drop what arrives on the new path, or validate the path and let the client move, and
    never answer it with a stateless reset or close the connection. Back on the handshake's path,
    the connection still works. Returns what was seen."""
    mover = Session(**files)
    await mover.connect()
    hello = await mover.hello()
    path = await mover.move()
    moved = await mover.send({"type": "list", "request_id": 7701})
    await asyncio.sleep(1.0)  # for a late reset or close
    out = {"disable_active_migration":
           mover.transport_parameters().get("disable_active_migration"),
           "welcome": (hello.message or {}).get("type"), "moved": moved.report(),
           "received_on_new_path": path.received, "closed_while_moved": _closed(mover.protocol),
           "reset": mover.protocol.reset}
    mover.move_back(path)
    out["back"] = (await mover.send({"type": "list", "request_id": 7702})).report()
    await mover.close()
    return out


FORM_CODES = {"malformed-request", "malformed-option", "unsupported-option",
              "lifetime-out-of-range", "unsupported-version"}


def _vector_type(vector):
    if "valid" in vector:
        return vector["valid"]["decoded"]["type"]
    try:
        item = cbor2.loads(bytes.fromhex(vector["hex"]))
        return codec.MESSAGE_TYPES.get(item.get(0)) if isinstance(item, dict) else None
    except Exception:  # not well-formed, or its key 0 not a number: sent as it is
        return None


async def send_vectors(session, files, directory):
    """Sends each request vector of `directory`; returns how many were sent and where the
    gateway's answer differs from the vector's outcome."""
    sent, differences = 0, []
    for name in sorted(n for n in os.listdir(directory) if n.endswith(".json")):
        with open(os.path.join(directory, name)) as file:
            vector = json.load(file)
        kind = _vector_type(vector)
        if kind is not None and kind not in codec.REQUESTS:
            continue  # answers and notices are the client's to decode
        data = bytes.fromhex(vector["hex"])
        if kind == "hello":
            own = Session(**files)
            await own.connect()
            exchange = await own.protocol.exchange(data)
            if vector.get("invalid", {}).get("error") == "unsupported-version":
                await _wait_closed(own.protocol, 3.0)  # VersionMismatch follows the Denied
            closed = _closed(own.protocol)
            await own.close()
        else:
            exchange = await session.protocol.exchange(data)
            closed = None
        sent += 1
        answer = exchange.message
        if answer is not None and answer["type"] == "granted":
            await session.send({"type": "release", "lease": answer["lease"]})
        invalid = vector.get("invalid")
        if invalid is not None and invalid["error"] == "too-large":
            got_ok = exchange.reset == MESSAGE_TOO_LARGE and exchange.raw is None
        elif invalid is not None:
            got_ok = (answer is not None and answer["type"] == "denied"
                      and answer["code"] == invalid["result_code"]
                      and answer["unsupported"] == invalid.get("unsupported", []))
            if invalid["error"] == "unsupported-version":
                got_ok = got_ok and closed is not None and closed["code"] == VERSION_MISMATCH
        else:
            got_ok = answer is not None and (answer["type"] != "denied"
                                             or answer["code"] not in FORM_CODES)
        violations = exchange.report().get("violations", [])
        if not got_ok or violations:
            differences.append({"vector": name, "expected": invalid or "accepted",
                                "got": exchange.report(), "closed": closed})
    return {"sent": sent, "differences": differences}


def _cbor_map(raw):
    return cbor2.loads(raw)


def _dumps(item):
    return cbor2.dumps(item, canonical=True)


def _hex(spaced_hex):
    return bytes.fromhex(spaced_hex.replace(" ", ""))


def _padded(item, size):
    """`item` with extension key 64 holding as many zero bytes as make it `size` bytes."""
    item[64] = b""
    for _ in range(4):
        item[64] = bytes(len(item[64]) + size - len(_dumps(item)))
    return item


def _closed_report(closed):
    return {"code": closed[0], "reason": closed[1], "application": closed[2]}


def _closed(protocol):
    if protocol is None or protocol.closed is None:
        return None
    return _closed_report(protocol.closed)


async def _wait_closed(protocol, limit):
    loop = asyncio.get_event_loop()
    deadline = loop.time() + limit
    while protocol.closed is None and loop.time() < deadline:
        await asyncio.sleep(0.05)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    vectors = commands.add_parser("vectors")
    vectors.add_argument("dir")
    run = commands.add_parser("drive")
    run.add_argument("--gateway", required=True)
    run.add_argument("--cert", required=True)
    run.add_argument("--key", required=True)
    run.add_argument("--ca", required=True)
    run.add_argument("--port", type=int, required=True)
    run.add_argument("--foreign-address", default="198.51.100.200")
    run.add_argument("--remote-prefix", default="192.0.2.0/26")
    run.add_argument("--vectors", help="the conformance vectors to send, spec/vectors")
    run.add_argument("--second-cert", required=True,
                     help="another certificate of the same identity, and its key")
    run.add_argument("--second-key", required=True)
    args = parser.parse_args()
    if args.command == "vectors":
        sys.exit(0 if check_vectors(args.dir) else 1)
    ipaddress.ip_address(args.foreign_address)
    ipaddress.ip_network(args.remote_prefix)
    asyncio.run(asyncio.wait_for(drive(args), 180))


if __name__ == "__main__":
    main()
