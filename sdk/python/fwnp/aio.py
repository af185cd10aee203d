"""The asyncio client: the same names as the blocking one, awaited."""

from __future__ import annotations

import asyncio
import itertools
import os
import weakref
from collections.abc import AsyncIterator, Callable, Generator, Iterable
from datetime import timedelta
from types import TracebackType
from typing import Any

from . import _codec
from .client import (
    API_VERSION,
    DEFAULT_TIMEOUT,
    answer_error,
    apply,
    check_version,
    default_socket_path,
    request_frame,
    to_status,
    to_summaries,
)
from .errors import (
    AgentUnavailable,
    ConnectionClosed,
    FwnpError,
    ProtocolError,
    RequestTimeout,
    UnknownLocalLease,
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

__all__ = ["AsyncClient", "AsyncLease"]

_Entry = tuple[_LeaseState, "asyncio.Queue[LeaseEvent]"]


class _AsyncConnection:
    """The stream, the requests waiting and the leases' event queues, read by one task."""

    def __init__(
        self, path: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.path = path
        self.reader = reader
        self.writer = writer
        self.loop = asyncio.get_running_loop()
        self.ids = itertools.count(1)
        self.pending: dict[int, asyncio.Future[_codec.Message]] = {}
        # As in the blocking client: each lease id names the leases held under it.
        self.leases: dict[bytes, list[_Entry]] = {}
        # The state and event queue of each granted Open, by request id, for its opener.
        self.opened: dict[int, _Entry] = {}
        self.closed: FwnpError | None = None
        self.task = self.loop.create_task(self._read())

    async def _read(self) -> None:
        try:
            while True:
                try:
                    header = await self.reader.readexactly(_codec.HEADER_LEN)
                except asyncio.IncompleteReadError as e:
                    if e.partial:
                        raise ProtocolError(
                            "truncated-frame", "the agent closed inside a frame"
                        ) from None
                    raise ConnectionClosed() from None
                try:
                    body = await self.reader.readexactly(_codec.body_length(header))
                except asyncio.IncompleteReadError:
                    raise ProtocolError(
                        "truncated-frame", "the agent closed inside a frame"
                    ) from None
                try:
                    msg = _codec.decode_answer(body)
                except ProtocolError as e:
                    self._undecodable(body, e)
                    continue
                if msg is not None:
                    self._route(msg)
        except FwnpError as e:
            self._shut(e)
        except (OSError, asyncio.CancelledError) as e:
            self._shut(ConnectionClosed(str(e) or None))

    def _route(self, msg: _codec.Message) -> None:
        if isinstance(msg, _codec.EventMsg):
            if not 1 <= msg.kind <= 8:
                return
            event = LeaseEvent._from_message(msg)
            for entry in list(self.leases.get(msg.lease, ())):
                state, events = entry
                state.saw(event)
                if event.new_lease is not None:
                    held = self.leases.setdefault(event.new_lease, [])
                    if not any(e[0] is state for e in held):
                        held.append(entry)
                if event.terminal:
                    self.forget(state)
                events.put_nowait(event)
            return
        future = self.pending.get(msg.request_id or 0)
        if isinstance(msg, _codec.Granted) and future is not None and future.cancelled():
            # The opener stopped waiting (its timeout, or its task was cancelled): the lease it
            # was granted is released, not held with nobody to use it.
            self.pending.pop(msg.request_id or 0, None)
            abandoned = _LeaseState(msg.lease, msg.lifetime)
            self.leases.setdefault(msg.lease, []).append((abandoned, asyncio.Queue()))
            released = self.send_release(abandoned)
            if released is not None:
                released.add_done_callback(_ignore_outcome)
            return
        if isinstance(msg, _codec.Granted) and future is not None and not future.done():
            # Registered before the answer is handed over: the opener resumes only at a later
            # turn of the loop, after events that came with the Granted have been routed.
            granted: _Entry = (_LeaseState(msg.lease, msg.lifetime), asyncio.Queue())
            self.leases.setdefault(msg.lease, []).append(granted)
            self.opened[msg.request_id or 0] = granted
        future = self.pending.pop(msg.request_id or 0, None)
        if future is not None and not future.done():
            future.set_result(msg)

    def _undecodable(self, body: bytes, error: ProtocolError) -> None:
        """As in the blocking client: a frame that did not decode fails the request it names,
        if one is waiting, and is otherwise ignored; the connection stays."""
        rid = _codec.peek_request_id(body)
        if rid is None:
            return
        future = self.pending.pop(rid, None)
        if future is not None and not future.done():
            future.set_exception(error)

    def _shut(self, why: FwnpError) -> None:
        if self.closed is None:
            self.closed = why
        pending, self.pending = self.pending, {}
        leases, self.leases = self.leases, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(ConnectionClosed(str(why)))
        self.opened = {}
        seen = set()
        for state, events in [entry for held in leases.values() for entry in held]:
            if id(state) not in seen:
                seen.add(id(state))
                state.active = False
                events.put_nowait(
                    LeaseEvent(EventKind.DISCONNECTED, LeaseId(state.id), reason=str(why))
                )
        self.writer.close()

    def send(self, build: Callable[[int], _codec.Message]) -> asyncio.Future[_codec.Message]:
        return self.send_numbered(build)[1]

    def send_numbered(
        self, build: Callable[[int], _codec.Message]
    ) -> tuple[int, asyncio.Future[_codec.Message]]:
        """Sends the request ``build(request_id)``; its id and where its answer will be."""
        if self.closed is not None:
            raise ConnectionClosed(str(self.closed))
        rid = next(self.ids)
        frame = request_frame(build(rid))
        future: asyncio.Future[_codec.Message] = self.loop.create_future()
        self.pending[rid] = future
        self.writer.write(frame)
        return rid, future

    async def request(
        self, build: Callable[[int], _codec.Message], name: str, timeout: float
    ) -> _codec.Message:
        return await self.wait(self.send(build), name, timeout)

    @staticmethod
    async def wait(
        future: asyncio.Future[_codec.Message], name: str, timeout: float
    ) -> _codec.Message:
        try:
            return await asyncio.wait_for(future, timeout)
        except asyncio.TimeoutError:
            raise RequestTimeout(name, timeout) from None

    def send_release(self, state: _LeaseState) -> asyncio.Future[_codec.Message] | None:
        """Sends the Release of ``state``'s lease; None when nothing is to be sent: it is over
        already, or another lease of the connection has the same id, which keeps it held (the
        connection holds the lease once, spec/local-api.md Section 5.2)."""
        if self.closed is not None or not state.active:
            state.active = False
            return None
        self.forget(state)
        if self.leases.get(state.id):
            return None
        _, future = self.send_numbered(lambda rid: _codec.Release(rid, state.id))
        return future

    def forget(self, state: _LeaseState) -> None:
        state.active = False
        for lease_id in state.ids:
            held = [e for e in self.leases.get(lease_id, ()) if e[0] is not state]
            if held:
                self.leases[lease_id] = held
            else:
                self.leases.pop(lease_id, None)

    def release_unheld(self, state: _LeaseState) -> None:
        """Releases a lease collected without release; may run on any thread."""
        if not state.active or self.closed is not None or self.loop.is_closed():
            return

        def send() -> None:
            try:
                self.send_release(state)
            except FwnpError:
                pass

        try:
            self.loop.call_soon_threadsafe(send)
        except RuntimeError:  # the loop closed meanwhile: the connection is gone with it
            pass

    def close_soon(self) -> None:
        """Closes the connection from a finalizer, which may run on any thread: the loop's
        transports are only touched from the loop."""
        if self.loop.is_closed():
            return
        try:
            self.loop.call_soon_threadsafe(self.close)
        except RuntimeError:  # the loop closed meanwhile, and the connection with it
            pass

    def close(self) -> None:
        if self.closed is None:
            self._shut(ConnectionClosed("closed by the application"))
        if not self.loop.is_closed():
            self.task.cancel()


class AsyncLease(_LeaseBase):
    """A granted opening, held until :meth:`release`, the end of an ``async with`` block, or
    its collection; while it is held the agent renews it.

    >>> async with client.open(tcp(8080), lifetime=timedelta(minutes=5)) as lease:  # doctest: +SKIP
    ...     await serve()
    """

    def __init__(
        self,
        client: AsyncClient,
        granted: _codec.Granted,
        state: _LeaseState,
        events: asyncio.Queue[LeaseEvent],
    ) -> None:
        super().__init__(granted, state)
        self._client = client
        self._events = events
        self._finalizer = weakref.finalize(self, client._conn.release_unheld, state)

    async def release(self) -> None:
        """Releases the lease and waits until the agent has closed the opening. Does nothing
        when the lease is already over. As :meth:`fwnp.Lease.release`, it ends this lease
        only: another lease of the client with the same id keeps the opening.

        >>> await lease.release()  # doctest: +SKIP
        """
        self._finalizer.detach()
        state = self._state
        if not state.active:
            return
        conn = self._client._conn
        future = conn.send_release(state)
        if future is None:
            return
        try:
            answer = await conn.wait(future, "release", self._client.timeout)
        except ConnectionClosed:
            return
        if isinstance(answer, _codec.Released):
            return
        error = answer_error(answer, "release")
        if not isinstance(error, UnknownLocalLease):
            raise error

    async def next_event(self, timeout: float | None = None) -> LeaseEvent | None:
        """The next event, waiting at most ``timeout`` seconds; None when none came in time.

        >>> event = await lease.next_event(timeout=1.0)  # doctest: +SKIP
        """
        try:
            return await asyncio.wait_for(self._events.get(), timeout)
        except asyncio.TimeoutError:
            return None

    async def events(self, timeout: float | None = None) -> AsyncIterator[LeaseEvent]:
        """The lease's events as they come, ending after a terminal one (or when none comes
        within ``timeout`` seconds).

        >>> async for event in lease.events():  # doctest: +SKIP
        ...     print(event)
        """
        while True:
            event = await self.next_event(timeout)
            if event is None:
                return
            yield event
            if event.terminal:
                return

    async def __aenter__(self) -> AsyncLease:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.release()


class _OpenCall:
    """What :meth:`AsyncClient.open` returns: awaited, the lease; used with ``async with``,
    the lease released at the block's end."""

    def __init__(self, client: AsyncClient, opening: Opening) -> None:
        self._client = client
        self._opening = opening
        self._lease: AsyncLease | None = None

    def __await__(self) -> Generator[Any, None, AsyncLease]:
        return self._client._open(self._opening).__await__()

    async def __aenter__(self) -> AsyncLease:
        self._lease = await self._client._open(self._opening)
        return self._lease

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._lease is not None:
            await self._lease.release()


class AsyncClient:
    """The asyncio connection to the local FWNP host agent. Connects in ``async with`` (or
    :meth:`connect`), checking the agent's local API version as :class:`fwnp.Client` does.

    >>> async with AsyncClient() as client:  # doctest: +SKIP
    ...     async with client.open(tcp(8080), lifetime=timedelta(minutes=5)) as lease:
    ...         await serve()
    """

    #: The local API version this client needs.
    api_version_needed: int = API_VERSION

    def __init__(
        self, path: str | os.PathLike[str] | None = None, *, timeout: float = DEFAULT_TIMEOUT
    ) -> None:
        #: How long each request waits for its answer, in seconds.
        self.timeout = timeout
        self._path = os.fspath(path) if path is not None else default_socket_path()
        self._connection: _AsyncConnection | None = None
        #: The agent's status when the client connected.
        self.agent: AgentStatus | None = None

    @property
    def _conn(self) -> _AsyncConnection:
        if self._connection is None:
            raise ConnectionClosed(
                "not connected: use `async with AsyncClient()` or `await client.connect()`"
            )
        return self._connection

    @property
    def path(self) -> str:
        """The socket path.

        >>> AsyncClient("/tmp/agent.sock").path
        '/tmp/agent.sock'
        """
        return self._path

    async def connect(self) -> AsyncClient:
        """Connects, asks the agent's status and the events of this connection's leases.

        >>> client = await AsyncClient().connect()  # doctest: +SKIP
        """
        try:
            reader, writer = await asyncio.open_unix_connection(self._path)
        except OSError as e:
            raise AgentUnavailable(self._path, e) from None
        conn = _AsyncConnection(self._path, reader, writer)
        self._connection = conn
        weakref.finalize(self, conn.close_soon)
        try:
            status = conn.send(lambda rid: _codec.Status(rid))
            watching = conn.send(lambda rid: _codec.Watch(rid))
            self.agent = check_version(
                await conn.wait(status, "status", self.timeout), self.api_version_needed
            )
            answer = await conn.wait(watching, "watch", self.timeout)
            if not isinstance(answer, _codec.Watching):
                raise answer_error(answer, "watch")
        except BaseException:
            await self.close()
            raise
        return self

    def open(
        self,
        opening: Opening,
        *,
        lifetime: timedelta | None = None,
        remotes: Iterable[Remote] | None = None,
        addresses: Iterable[HostAddress] | None = None,
        family: Family | None = None,
        name: str | None = None,
    ) -> _OpenCall:
        """Asks for an opening: ``await`` it for the lease, or use it in ``async with``.

        >>> lease = await client.open(tcp(8080))  # doctest: +SKIP
        """
        return _OpenCall(self, apply(opening, lifetime, remotes, addresses, family, name))

    async def _open(self, opening: Opening) -> AsyncLease:
        conn = self._conn
        rid, future = conn.send_numbered(opening._message)
        try:
            answer = await conn.wait(future, "open", self.timeout)
        finally:
            # Its own state, even when another lease of this connection has the same id; if it
            # ended before the opener resumed, the state says so.
            entry = conn.opened.pop(rid, None)
        if not isinstance(answer, _codec.Granted):
            raise answer_error(answer, "open")
        if entry is None:
            entry = (_LeaseState(answer.lease, answer.lifetime), asyncio.Queue())
            entry[0].active = False
        return AsyncLease(self, answer, *entry)

    async def release(self, lease: bytes) -> None:
        """Releases a lease of this connection by its id, ending every lease of this client
        that has the id, as :meth:`fwnp.Client.release` does.

        >>> await client.release(lease.id)  # doctest: +SKIP
        """
        answer = await self._conn.request(
            lambda rid: _codec.Release(rid, bytes(lease)), "release", self.timeout
        )
        if not isinstance(answer, _codec.Released):
            raise answer_error(answer, "release")

    async def leases(self) -> list[LeaseSummary]:
        """Every live lease the agent holds for the host's applications.

        >>> await client.leases()  # doctest: +SKIP
        """
        return to_summaries(
            await self._conn.request(lambda rid: _codec.List(rid), "list", self.timeout)
        )

    async def status(self) -> AgentStatus:
        """How the agent is doing.

        >>> (await client.status()).connected  # doctest: +SKIP
        True
        """
        answer = await self._conn.request(lambda rid: _codec.Status(rid), "status", self.timeout)
        if not isinstance(answer, _codec.StatusAnswer):
            raise answer_error(answer, "status")
        return to_status(answer)

    async def close(self) -> None:
        """Closes the connection: the agent releases every lease opened through it.

        >>> await client.close()  # doctest: +SKIP
        """
        if self._connection is not None:
            self._connection.close()
            try:
                await self._connection.writer.wait_closed()
            except OSError:
                pass

    async def __aenter__(self) -> AsyncClient:
        return await self.connect()

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


def _ignore_outcome(future: asyncio.Future[_codec.Message]) -> None:
    """Takes the outcome of a request nobody awaits, so that asyncio does not report it."""
    if not future.cancelled():
        future.exception()
