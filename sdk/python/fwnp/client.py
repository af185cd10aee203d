"""The blocking client: one connection to the host agent, read by a background thread that
routes each answer to its request and each event to its lease."""

from __future__ import annotations

import itertools
import os
import queue
import socket
import threading
import weakref
from collections.abc import Iterable, Iterator
from datetime import datetime, timedelta, timezone
from types import TracebackType
from typing import Any

from . import _codec
from .errors import (
    AgentTooOld,
    AgentUnavailable,
    ConnectionClosed,
    FwnpError,
    InvalidOpening,
    ProtocolError,
    RequestTimeout,
    UnknownLocalLease,
    denied_error,
)
from .lease import (
    AgentStatus,
    EventKind,
    LeaseEvent,
    LeaseId,
    LeaseSummary,
    _LeaseBase,
    _LeaseState,
)
from .opening import Family, HostAddress, Opening, Remote

__all__ = ["Client", "Lease", "default_socket_path", "API_VERSION", "DEFAULT_TIMEOUT"]

#: The local API version this package needs the agent to implement.
API_VERSION = 1
#: How long a request waits for its answer, in seconds: an Open waits for the gateway and for
#: the agent's grace period for binding the port.
DEFAULT_TIMEOUT = 60.0


def default_socket_path() -> str:
    """``$FWNP_AGENT_SOCKET`` when set and not empty, else ``/run/fwnp/agent.sock``.

    >>> import os
    >>> os.environ["FWNP_AGENT_SOCKET"] = "/tmp/agent.sock"
    >>> default_socket_path()
    '/tmp/agent.sock'
    >>> del os.environ["FWNP_AGENT_SOCKET"]
    >>> default_socket_path()
    '/run/fwnp/agent.sock'
    """
    return os.environ.get(_codec.SOCKET_ENV_VAR) or _codec.DEFAULT_SOCKET_PATH


def apply(
    opening: Opening,
    lifetime: timedelta | None,
    remotes: Any,
    addresses: Any,
    family: Family | None,
    name: str | None,
) -> Opening:
    """The opening with the keyword arguments of ``open`` applied."""
    return opening.replace(
        lifetime=lifetime, remotes=remotes, addresses=addresses, family=family, name=name
    )


def request_frame(msg: _codec.Message) -> bytes:
    """The frame of a request, an oversized one being the caller's mistake."""
    try:
        return _codec.encode_frame(msg)
    except ProtocolError as e:
        raise InvalidOpening(e.detail) from None


def answer_error(msg: _codec.Message, request: str) -> FwnpError:
    """The exception for an answer that is not the one expected."""
    if isinstance(msg, _codec.DeniedMsg):
        return denied_error(
            msg.code,
            msg.reason,
            retry_after=msg.retry_after,
            lease=LeaseId(msg.lease) if msg.lease else None,
            unsupported=msg.unsupported,
        )
    return ProtocolError("unexpected-answer", f"{type(msg).__name__} answered {request}")


def check_version(answer: _codec.Message, needed: int) -> AgentStatus:
    """The agent's status, or AgentTooOld when it implements an older local API."""
    if not isinstance(answer, _codec.StatusAnswer):
        raise answer_error(answer, "status")
    status = to_status(answer)
    if status.api_version < needed:
        raise AgentTooOld(status.api_version, needed)
    return status


def to_status(a: _codec.StatusAnswer) -> AgentStatus:
    return AgentStatus(
        a.agent_version,
        a.gateway,
        a.connected,
        a.epoch,
        a.mirror_mode,
        a.identity,
        a.leases,
        a.last_error,
        a.api_version if a.api_version is not None else 1,
    )


def to_summaries(answer: _codec.Message) -> list[LeaseSummary]:
    if not isinstance(answer, _codec.Leases):
        raise answer_error(answer, "list")
    return [
        LeaseSummary(
            LeaseId(i.lease),
            i.grants,
            timedelta(seconds=i.remaining),
            datetime.fromtimestamp(i.expires_ms / 1000, tz=timezone.utc),
            i.app.name if i.app else None,
            i.app.executable if i.app else None,
            i.app.uid if i.app else None,
            i.app.pid if i.app else None,
        )
        for i in answer.leases
    ]


_Entry = tuple[_LeaseState, "queue.SimpleQueue[LeaseEvent]"]


class _Slot:
    def __init__(self) -> None:
        self.done = threading.Event()
        self.answer: _codec.Message | None = None
        self.error: FwnpError | None = None
        #: For a Granted answer: the new lease's state and event queue, its own.
        self.entry: _Entry | None = None
        #: For an Open: its caller stopped waiting, so a lease granted to it is released.
        self.abandoned = False


class _Connection:
    """The socket, the requests waiting for answers and the leases' event queues. Owned by
    the reader thread and by every Client and Lease using it; never refers back to them, so
    that they can be collected."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.connect(path)
        except OSError as e:
            self.sock.close()
            raise AgentUnavailable(path, e) from None
        self.ids = itertools.count(1)
        self.lock = threading.Lock()
        self.pending: dict[int, _Slot] = {}
        # Each lease id names the leases held under it: two Opens of the same opening are
        # granted the same id (the gateway merges them), as two leases whose events reach both.
        # The connection holds the lease once (spec/local-api.md Section 5.2): the last of them
        # to go releases it.
        self.leases: dict[bytes, list[_Entry]] = {}
        self.closed: FwnpError | None = None
        # Frames to send, and leases to release that nobody holds any more. Only the writer
        # thread writes to the socket; a lease's finalizer, which may run in any thread at any
        # allocation (also while this thread holds the lock), only puts into this queue, which
        # is safe there.
        self.outbox: queue.SimpleQueue[bytes | _LeaseState | None] = queue.SimpleQueue()
        self.reader = threading.Thread(target=self._read, name="fwnp-agent-reader", daemon=True)
        self.writer = threading.Thread(target=self._write, name="fwnp-agent-writer", daemon=True)
        self.reader.start()
        self.writer.start()

    def _write(self) -> None:
        while True:
            item = self.outbox.get()
            if item is None:
                return
            if isinstance(item, _LeaseState):
                # Nobody waits for the answer.
                frame = self._register_release(item, _Slot())
                if frame is None:
                    continue
                item = frame
            try:
                self.sock.sendall(item)
            except OSError as e:
                self._shut(ConnectionClosed(str(e)))
                return

    def _read_exact(self, n: int) -> bytes:
        data = bytearray()
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                if data:
                    raise ProtocolError("truncated-frame", "the agent closed inside a frame")
                raise ConnectionClosed()
            data += chunk
        return bytes(data)

    def _read(self) -> None:
        try:
            while True:
                header = self._read_exact(_codec.HEADER_LEN)
                body = self._read_exact(_codec.body_length(header))
                try:
                    msg = _codec.decode_answer(body)
                except ProtocolError as e:
                    self._undecodable(body, e)
                    continue
                if msg is not None:
                    self._route(msg)
        except FwnpError as e:
            self._shut(e)
        except OSError as e:
            self._shut(ConnectionClosed(str(e)))

    def _route(self, msg: _codec.Message) -> None:
        with self.lock:
            if isinstance(msg, _codec.EventMsg):
                if not 1 <= msg.kind <= 8:
                    return
                entries = list(self.leases.get(msg.lease, ()))
                event = LeaseEvent._from_message(msg)
                for entry in entries:
                    state, events = entry
                    state.saw(event)
                    if event.new_lease is not None:
                        held = self.leases.setdefault(event.new_lease, [])
                        if not any(e[0] is state for e in held):
                            held.append(entry)
                    if event.terminal:
                        self._unregister(state)
                    events.put(event)
                return
            slot = self.pending.pop(msg.request_id or 0, None)
            if isinstance(msg, _codec.Granted) and slot is not None:
                # Registered before the answer is handed over, so that no event that follows
                # the Granted at once is lost.
                slot.entry = (_LeaseState(msg.lease, msg.lifetime), queue.SimpleQueue())
                self.leases.setdefault(msg.lease, []).append(slot.entry)
                if slot.abandoned:
                    self.outbox.put(slot.entry[0])
        if slot is not None:
            slot.answer = msg
            slot.done.set()

    def _undecodable(self, body: bytes, error: ProtocolError) -> None:
        """A whole frame whose message did not decode: it fails the request it names, if one
        is waiting, and is otherwise ignored. The frames stay in step, so the connection, and
        the leases on it, are kept (spec/local-api.md Section 12.3)."""
        rid = _codec.peek_request_id(body)
        with self.lock:
            slot = self.pending.pop(rid, None) if rid is not None else None
        if slot is not None:
            slot.error = error
            slot.done.set()

    def _shut(self, why: FwnpError) -> None:
        with self.lock:
            if self.closed is None:
                self.closed = why
            pending, self.pending = self.pending, {}
            leases, self.leases = self.leases, {}
        for slot in pending.values():
            slot.error = ConnectionClosed(str(why))
            slot.done.set()
        seen = set()
        for state, events in [entry for held in leases.values() for entry in held]:
            if id(state) in seen:
                continue
            seen.add(id(state))
            state.active = False
            events.put(LeaseEvent(EventKind.DISCONNECTED, LeaseId(state.id), reason=str(why)))
        self.outbox.put(None)
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def send(self, build: Any) -> _Slot:
        """Sends the request ``build(request_id)`` and returns where its answer will be."""
        slot = _Slot()
        with self.lock:
            if self.closed is not None:
                raise ConnectionClosed(str(self.closed))
            rid = next(self.ids)
            frame = request_frame(build(rid))
            self.pending[rid] = slot
            self.outbox.put(frame)
        return slot

    def request(self, build: Any, name: str, timeout: float) -> _codec.Message:
        return self.wait(self.send(build), name, timeout)

    @staticmethod
    def wait(slot: _Slot, name: str, timeout: float) -> _codec.Message:
        if not slot.done.wait(timeout):
            raise RequestTimeout(name, timeout)
        if slot.error is not None:
            raise slot.error
        assert slot.answer is not None
        return slot.answer

    def abandon_open(self, slot: _Slot) -> None:
        """The caller of an Open stopped waiting for it: a lease granted already, or granted
        later, is released rather than held until the connection closes with nobody to use it."""
        with self.lock:
            slot.abandoned = True
            entry = slot.entry
        if entry is not None:
            self.outbox.put(entry[0])

    def send_release(self, state: _LeaseState) -> _Slot | None:
        """Sends the Release of ``state``'s lease; None when nothing is to be sent: it is over
        already, or another lease of the connection has the same id, which keeps it held."""
        slot = _Slot()
        frame = self._register_release(state, slot)
        if frame is None:
            return None
        self.outbox.put(frame)
        return slot

    def _register_release(self, state: _LeaseState, slot: _Slot) -> bytes | None:
        with self.lock:
            if self.closed is not None or not state.active:
                state.active = False
                return None
            self._unregister(state)
            state.active = False
            # The agent would end the connection's hold of the id, for the others too.
            if self.leases.get(state.id):
                return None
            rid = next(self.ids)
            self.pending[rid] = slot
            return request_frame(_codec.Release(rid, state.id))

    def _unregister(self, state: _LeaseState) -> None:
        """Takes ``state`` out of the leases of every id it has had (the lock held)."""
        for lease_id in state.ids:
            held = [e for e in self.leases.get(lease_id, ()) if e[0] is not state]
            if held:
                self.leases[lease_id] = held
            else:
                self.leases.pop(lease_id, None)

    def release_unheld(self, state: _LeaseState) -> None:
        """Releases a lease nobody holds any more (collected without release), without
        waiting for the answer. Runs as a finalizer: it only hands the lease to the writer."""
        if state.active and self.closed is None:
            self.outbox.put(state)

    def close(self) -> None:
        self._shut(ConnectionClosed("closed by the application"))
        self.sock.close()


class Lease(_LeaseBase):
    """A granted opening, held until :meth:`release`, the end of a ``with`` block, or its
    collection; while it is held the agent renews it.

    >>> from datetime import timedelta
    >>> from fwnp import Client, tcp
    >>> with Client() as client:  # doctest: +SKIP
    ...     with client.open(tcp(8080), lifetime=timedelta(minutes=5)) as lease:
    ...         print(lease.id, lease.grants)
    ...         serve_forever()
    """

    def __init__(
        self,
        client: Client,
        granted: _codec.Granted,
        state: _LeaseState,
        events: queue.SimpleQueue[LeaseEvent],
    ) -> None:
        super().__init__(granted, state)
        # The lease keeps the connection open: closing it would release the lease.
        self._client = client
        self._events = events
        self._finalizer = weakref.finalize(self, client._conn.release_unheld, state)

    def release(self) -> None:
        """Releases the lease and waits until the agent has closed the opening. Does nothing
        when the lease is already over.

        This ends this lease only. When another lease of the same client has the same id (the
        same opening opened twice: the gateway merged the Opens), the opening stays for that
        one and nothing is asked of the agent: the connection holds the lease once, until its
        last lease of the id goes. :meth:`Client.release` ends all of them.

        >>> first = client.open(tcp(8080))  # doctest: +SKIP
        >>> second = client.open(tcp(8080))  # doctest: +SKIP
        >>> first.release()  # doctest: +SKIP
        >>> second.active  # doctest: +SKIP
        True
        """
        self._finalizer.detach()
        state = self._state
        if not state.active:
            return
        conn = self._client._conn
        slot = conn.send_release(state)
        if slot is None:
            return  # the agent releases every lease of a closed connection
        try:
            answer = conn.wait(slot, "release", self._client.timeout)
        except ConnectionClosed:
            return
        if isinstance(answer, _codec.Released):
            return
        error = answer_error(answer, "release")
        if not isinstance(error, UnknownLocalLease):  # it ended meanwhile
            raise error

    def next_event(self, timeout: float | None = None) -> LeaseEvent | None:
        """The next event, waiting at most ``timeout`` seconds (None: until one comes);
        None when none came in time.

        >>> event = lease.next_event(timeout=1.0)  # doctest: +SKIP
        """
        try:
            return self._events.get(timeout=timeout)
        except queue.Empty:
            return None

    def events(self, timeout: float | None = None) -> Iterator[LeaseEvent]:
        """The lease's events as they come, ending after a terminal one (or when none comes
        within ``timeout`` seconds).

        >>> for event in lease.events():  # doctest: +SKIP
        ...     print(event)
        renewed, 299 s left
        revoked: operator
        """
        while True:
            event = self.next_event(timeout)
            if event is None:
                return
            yield event
            if event.terminal:
                return

    def __enter__(self) -> Lease:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()


class Client:
    """A connection to the local FWNP host agent, through which the application asks for
    openings. Connects at once: to ``path``, else ``$FWNP_AGENT_SOCKET``, else
    ``/run/fwnp/agent.sock``; asks the agent's status (raising :class:`fwnp.AgentTooOld` when
    it implements an older local API than this package needs) and for the events of this
    connection's leases. Closing it, or its collection once its leases are gone, makes the
    agent release every lease opened through it. Safe to share between threads.

    >>> from fwnp import Client, tcp, DeniedByPolicy
    >>> with Client() as client:  # doctest: +SKIP
    ...     try:
    ...         with client.open(tcp(8080), lifetime=timedelta(minutes=5)) as lease:
    ...             serve()
    ...     except DeniedByPolicy as e:
    ...         print("not allowed:", e.reason)
    """

    #: The local API version this client needs (:data:`API_VERSION`).
    api_version_needed: int = API_VERSION

    def __init__(
        self, path: str | os.PathLike[str] | None = None, *, timeout: float = DEFAULT_TIMEOUT
    ) -> None:
        #: How long each request waits for its answer, in seconds.
        self.timeout = timeout
        self._conn = _Connection(os.fspath(path) if path is not None else default_socket_path())
        self._finalizer = weakref.finalize(self, self._conn.close)
        try:
            status = self._conn.send(lambda rid: _codec.Status(rid))
            watching = self._conn.send(lambda rid: _codec.Watch(rid))
            #: The agent's status when the client connected.
            self.agent: AgentStatus = check_version(
                _Connection.wait(status, "status", timeout), self.api_version_needed
            )
            answer = _Connection.wait(watching, "watch", timeout)
            if not isinstance(answer, _codec.Watching):
                raise answer_error(answer, "watch")
        except BaseException:
            self.close()
            raise

    @property
    def path(self) -> str:
        """The socket path connected to.

        >>> Client().path  # doctest: +SKIP
        '/run/fwnp/agent.sock'
        """
        return self._conn.path

    def open(
        self,
        opening: Opening,
        *,
        lifetime: timedelta | None = None,
        remotes: Iterable[Remote] | None = None,
        addresses: Iterable[HostAddress] | None = None,
        family: Family | None = None,
        name: str | None = None,
    ) -> Lease:
        """Asks for an opening and returns the lease once the gateway granted it and the
        host's own firewall holds it. The keyword arguments replace those of ``opening``.
        Raises the :class:`fwnp.Denied` subclass of a refusal.

        >>> lease = client.open(tcp(8080), lifetime=timedelta(minutes=5))  # doctest: +SKIP
        """
        opening = apply(opening, lifetime, remotes, addresses, family, name)
        slot = self._conn.send(opening._message)
        try:
            answer = self._conn.wait(slot, "open", self.timeout)
        except RequestTimeout:
            self._conn.abandon_open(slot)
            raise
        if not isinstance(answer, _codec.Granted):
            raise answer_error(answer, "open")
        # Its own state, even when another lease of this connection has the same id; if it
        # ended before this thread took it, the state says so.
        entry = slot.entry or (_LeaseState(answer.lease, answer.lifetime), queue.SimpleQueue())
        return Lease(self, answer, *entry)

    def release(self, lease: bytes) -> None:
        """Releases a lease of this connection by its id: the connection's hold of it ends,
        and with it every lease of this client that has the id (two Opens of the same opening
        are granted the same id), each ending with a ``RELEASED`` event; the opening stays
        while another application holds the same lease (spec/local-api.md Sections 5.2 and
        9.1). Raises :class:`fwnp.UnknownLocalLease` when the connection does not hold it.

        >>> first = client.open(tcp(8080))  # doctest: +SKIP
        >>> second = client.open(tcp(8080))  # doctest: +SKIP
        >>> client.release(first.id)  # doctest: +SKIP
        >>> first.active, second.active  # doctest: +SKIP
        (False, False)
        """
        answer = self._conn.request(
            lambda rid: _codec.Release(rid, bytes(lease)), "release", self.timeout
        )
        if not isinstance(answer, _codec.Released):
            raise answer_error(answer, "release")

    def leases(self) -> list[LeaseSummary]:
        """Every live lease the agent holds for the host's applications.

        >>> for lease in client.leases():  # doctest: +SKIP
        ...     print(lease.id, lease.remaining)
        """
        return to_summaries(self._conn.request(lambda rid: _codec.List(rid), "list", self.timeout))

    def status(self) -> AgentStatus:
        """How the agent is doing.

        >>> client.status().connected  # doctest: +SKIP
        True
        """
        answer = self._conn.request(lambda rid: _codec.Status(rid), "status", self.timeout)
        if not isinstance(answer, _codec.StatusAnswer):
            raise answer_error(answer, "status")
        return to_status(answer)

    def close(self) -> None:
        """Closes the connection: the agent releases every lease opened through it.

        >>> client.close()  # doctest: +SKIP
        """
        self._finalizer()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
