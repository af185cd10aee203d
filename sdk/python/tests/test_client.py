"""The client's logic against a stand-in agent on a Unix socket in a temporary directory:
the version check at connect, answers mapped to leases and exceptions, releases on exit and
on collection, events, and the frame limits on what the agent sends."""

from __future__ import annotations

import asyncio
import gc
import socket
import threading
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import cbor2
import pytest

import fwnp
from fwnp import _codec

LEASE = bytes(range(16))
NEW_LEASE = bytes(range(16, 32))
GRANT = _codec.Grant(6, 8080, 8080, __import__("ipaddress").ip_address("192.0.2.10"))

Answer = Callable[[_codec.Message], list[bytes]]


class FakeAgent:
    """Answers each request with the frames ``answer`` gives, and records what it received."""

    def __init__(self, path: Path, api_version: int | None = None) -> None:
        self.path = str(path)
        self.api_version = api_version
        self.received: list[_codec.Message] = []
        self.got = threading.Condition()
        self.conn: socket.socket | None = None
        self.answer: Answer = self.default
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(self.path)
        self.server.listen(4)
        self.thread = threading.Thread(target=self.serve, daemon=True)
        self.thread.start()

    def default(self, m: _codec.Message) -> list[bytes]:
        if isinstance(m, _codec.Status):
            return [
                _codec.encode_frame(
                    _codec.StatusAnswer(
                        m.request_id,
                        "0.1.0",
                        "gw:4433",
                        True,
                        7,
                        "enforce",
                        "fwnp://host/a",
                        0,
                        None,
                        self.api_version,
                    )
                )
            ]
        if isinstance(m, _codec.Watch):
            return [_codec.encode_frame(_codec.Watching(m.request_id))]
        if isinstance(m, _codec.Open):
            return [
                _codec.encode_frame(_codec.Granted(m.request_id, LEASE, (GRANT,), 600, 1, 300, 7))
            ]
        if isinstance(m, _codec.Release):
            return [_codec.encode_frame(_codec.Released(m.request_id, m.lease))]
        return []

    def serve(self) -> None:
        try:
            conn, _ = self.server.accept()
        except OSError:
            return
        self.conn = conn
        buf = b""
        while True:
            try:
                data = conn.recv(65536)
            except OSError:
                return
            if not data:
                return
            buf += data
            while len(buf) >= 4 and len(buf) >= 4 + int.from_bytes(buf[:4], "big"):
                n = int.from_bytes(buf[:4], "big")
                msg = _codec.decode_body(buf[4 : 4 + n])
                buf = buf[4 + n :]
                with self.got:
                    self.received.append(msg)
                    self.got.notify_all()
                try:
                    for frame in self.answer(msg):
                        conn.sendall(frame)
                except OSError:
                    return

    def send(self, frame: bytes) -> None:
        assert self.conn is not None
        self.conn.sendall(frame)

    def wait_for(self, kind: type, within: float = 5.0) -> _codec.Message:
        with self.got:
            assert self.got.wait_for(
                lambda: any(isinstance(m, kind) for m in self.received), within
            ), f"no {kind.__name__} received: {self.received}"
            return next(m for m in self.received if isinstance(m, kind))

    def close(self) -> None:
        if self.conn is not None:
            try:
                self.conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self.conn.close()
        self.server.close()


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[FakeAgent]:
    a = FakeAgent(tmp_path / "agent.sock")
    yield a
    a.close()


def test_connect_uses_the_environment_and_asks_status_and_watch(
    agent: FakeAgent, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FWNP_AGENT_SOCKET", agent.path)
    with fwnp.Client() as client:
        assert client.path == agent.path
        assert client.agent.api_version == 1  # key 11 absent: version 1
        assert client.agent.identity == "fwnp://host/a"
    kinds = [type(m) for m in agent.received]
    assert kinds[:2] == [_codec.Status, _codec.Watch]


def test_agent_unavailable(tmp_path: Path) -> None:
    with pytest.raises(fwnp.AgentUnavailable) as e:
        fwnp.Client(tmp_path / "nobody.sock")
    assert e.value.path == str(tmp_path / "nobody.sock")


@pytest.mark.parametrize(
    "agent_version,needed,raises",
    [(None, 1, False), (None, 2, True), (1, 2, True), (2, 2, False), (3, 2, False)],
)
def test_version_check(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    agent_version: int | None,
    needed: int,
    raises: bool,
) -> None:
    a = FakeAgent(tmp_path / "agent.sock", api_version=agent_version)
    monkeypatch.setattr(fwnp.Client, "api_version_needed", needed)
    try:
        if raises:
            with pytest.raises(fwnp.AgentTooOld) as e:
                fwnp.Client(a.path)
            assert (e.value.agent_version, e.value.needed) == (agent_version or 1, needed)
        else:
            fwnp.Client(a.path).close()
    finally:
        a.close()


def test_async_version_check(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    a = FakeAgent(tmp_path / "agent.sock")
    monkeypatch.setattr(fwnp.AsyncClient, "api_version_needed", 2)

    async def main() -> None:
        with pytest.raises(fwnp.AgentTooOld):
            async with fwnp.AsyncClient(a.path):
                pass

    try:
        asyncio.run(main())
    finally:
        a.close()


def test_lease_released_on_exit(agent: FakeAgent) -> None:
    with fwnp.Client(agent.path) as client:
        with client.open(fwnp.tcp(8080), lifetime=timedelta(minutes=5)) as lease:
            assert lease.id == LEASE and lease.active
            assert lease.grants == (GRANT,) and lease.lifetime == timedelta(seconds=600)
            opened = agent.wait_for(_codec.Open)
            assert isinstance(opened, _codec.Open) and opened.lifetime == 300
            assert not any(isinstance(m, _codec.Release) for m in agent.received)
        released = agent.wait_for(_codec.Release)
        assert isinstance(released, _codec.Release) and released.lease == LEASE
        assert not lease.active


def test_lease_released_on_collection(agent: FakeAgent) -> None:
    client = fwnp.Client(agent.path)
    lease = client.open(fwnp.tcp(8080))
    del lease
    gc.collect()
    released = agent.wait_for(_codec.Release)
    assert isinstance(released, _codec.Release) and released.lease == LEASE
    client.close()


def test_refusals_raise_their_class(agent: FakeAgent) -> None:
    def refuse(m: _codec.Message) -> list[bytes]:
        if isinstance(m, _codec.Open):
            return [
                _codec.encode_frame(
                    _codec.DeniedMsg(m.request_id, 1025, "tcp/8080 is bound by pid 1")
                )
            ]
        return agent.default(m)

    agent.answer = refuse
    with fwnp.Client(agent.path) as client:
        with pytest.raises(fwnp.PortNotOwned) as e:
            client.open(fwnp.tcp(8080))
        assert e.value.reason == "tcp/8080 is bound by pid 1"


def test_events_reach_their_lease_and_end_with_a_terminal_one(agent: FakeAgent) -> None:
    with fwnp.Client(agent.path) as client:
        lease = client.open(fwnp.tcp(8080))
        agent.send(_codec.encode_frame(_codec.EventMsg(None, LEASE, 1, 599_000)))
        agent.send(
            _codec.encode_frame(_codec.EventMsg(None, LEASE, 6, 600_000, new_lease=NEW_LEASE))
        )
        # An event kind this version does not know: ignored, as the spec asks.
        agent.send(
            _codec.encode_frame(_codec.EventMsg(None, NEW_LEASE, 7)).replace(
                b"\x04\x07", b"\x04\x09"
            )
        )
        agent.send(_codec.encode_frame(_codec.EventMsg(None, NEW_LEASE, 2, reason="operator")))
        events = list(lease.events(timeout=5))
        assert [e.kind for e in events] == [
            fwnp.EventKind.RENEWED,
            fwnp.EventKind.REOPENED,
            fwnp.EventKind.REVOKED,
        ]
        assert events[0].expires_in == timedelta(seconds=599)
        assert lease.expires_in == timedelta(0)  # over
        assert lease.id == NEW_LEASE and not lease.active
        assert events[2].reason == "operator"
        lease.release()  # over already: nothing is sent
    assert not any(isinstance(m, _codec.Release) for m in agent.received)


def test_connection_loss_is_an_event_and_an_error(agent: FakeAgent) -> None:
    client = fwnp.Client(agent.path)
    lease = client.open(fwnp.tcp(8080))
    agent.close()
    event = lease.next_event(timeout=5)
    assert event is not None and event.kind is fwnp.EventKind.DISCONNECTED
    with pytest.raises(fwnp.ConnectionClosed):
        client.status()


def test_an_oversized_frame_from_the_agent_closes_the_connection(agent: FakeAgent) -> None:
    client = fwnp.Client(agent.path)
    lease = client.open(fwnp.tcp(8080))
    agent.send((16385).to_bytes(4, "big"))
    event = lease.next_event(timeout=5)
    assert event is not None and event.kind is fwnp.EventKind.DISCONNECTED
    assert event.reason is not None and "frame-too-large" in event.reason


def test_an_oversized_request_is_not_sent(agent: FakeAgent) -> None:
    remotes = [f"2001:db8:{i:x}::/48" for i in range(1, 1000)]
    with fwnp.Client(agent.path) as client:
        with pytest.raises(fwnp.InvalidOpening):
            client.open(fwnp.tcp(8080), remotes=remotes)
    assert not any(isinstance(m, _codec.Open) for m in agent.received)


def test_async_client_opens_and_releases(agent: FakeAgent) -> None:
    async def main() -> None:
        async with fwnp.AsyncClient(agent.path) as client:
            async with client.open(fwnp.udp(5000, 5100)) as lease:
                assert lease.id == LEASE
                agent.send(_codec.encode_frame(_codec.EventMsg(None, LEASE, 1, 1000)))
                event = await lease.next_event(timeout=5)
                assert event is not None and event.kind is fwnp.EventKind.RENEWED
            assert not lease.active
            await asyncio.get_running_loop().run_in_executor(None, agent.wait_for, _codec.Release)

    asyncio.run(main())
    opened = agent.wait_for(_codec.Open)
    assert isinstance(opened, _codec.Open) and opened.opening.target.last == 5100


def granted_then_renewed(agent: FakeAgent) -> Answer:
    def answer(m: _codec.Message) -> list[bytes]:
        frames = agent.default(m)
        if isinstance(m, _codec.Open):
            # The event right behind the Granted, in the same write.
            frames = [frames[0] + _codec.encode_frame(_codec.EventMsg(None, LEASE, 1, 42_000))]
        return frames

    return answer


def test_an_event_right_after_the_grant_reaches_the_lease(agent: FakeAgent) -> None:
    agent.answer = granted_then_renewed(agent)
    with fwnp.Client(agent.path) as client:
        lease = client.open(fwnp.tcp(8080))
        event = lease.next_event(timeout=5)
        assert event is not None and event.expires_in == timedelta(seconds=42)
        # The renewal said 42 s left, where the grant had said 600.
        assert timedelta(seconds=40) < lease.expires_in <= timedelta(seconds=42)


def test_async_an_event_right_after_the_grant_reaches_the_lease(agent: FakeAgent) -> None:
    agent.answer = granted_then_renewed(agent)

    async def main() -> None:
        async with fwnp.AsyncClient(agent.path) as client:
            lease = await client.open(fwnp.tcp(8080))
            event = await lease.next_event(timeout=5)
            assert event is not None and event.expires_in == timedelta(seconds=42)

    asyncio.run(main())


def test_async_lease_released_on_collection(agent: FakeAgent) -> None:
    async def main() -> None:
        async with fwnp.AsyncClient(agent.path) as client:
            lease = await client.open(fwnp.tcp(8080))
            del lease
            gc.collect()
            loop = asyncio.get_running_loop()
            released = await loop.run_in_executor(None, agent.wait_for, _codec.Release)
            assert isinstance(released, _codec.Release) and released.lease == LEASE

    asyncio.run(main())


def test_status_and_leases(agent: FakeAgent) -> None:
    info = _codec.LeaseInfo(
        LEASE, (GRANT,), 540, 1_795_000_540_000, _codec.AppInfo("srv", None, 1000, 4242)
    )

    def answer(m: _codec.Message) -> list[bytes]:
        if isinstance(m, _codec.List):
            return [_codec.encode_frame(_codec.Leases(m.request_id, (info,), 7))]
        return agent.default(m)

    agent.answer = answer
    with fwnp.Client(agent.path) as client:
        status = client.status()
        assert (status.connected, status.mirror_mode, status.epoch) == (True, "enforce", 7)
        (summary,) = client.leases()
        assert summary.id == LEASE and summary.remaining == timedelta(seconds=540)
        assert (summary.name, summary.uid, summary.pid) == ("srv", 1000, 4242)
        assert summary.expires_at.timestamp() == 1_795_000_540


def test_release_by_id_of_a_lease_not_held(agent: FakeAgent) -> None:
    def answer(m: _codec.Message) -> list[bytes]:
        if isinstance(m, _codec.Release):
            return [_codec.encode_frame(_codec.DeniedMsg(m.request_id, 1027, lease=m.lease))]
        return agent.default(m)

    agent.answer = answer
    with fwnp.Client(agent.path) as client:
        with pytest.raises(fwnp.UnknownLocalLease) as e:
            client.release(NEW_LEASE)
        assert e.value.lease == NEW_LEASE


def _unknown_denial(request_id: int, code: int, reason: str) -> bytes:
    """A Denied with ``code``, which this version does not know, as a newer agent sends it:
    the encoder here would refuse it, so it is written with cbor2 as the agent would."""
    body: bytes = cbor2.dumps({0: 17, 1: request_id, 3: code, 4: reason, 5: 30})
    return len(body).to_bytes(4, "big") + body


def test_a_refusal_with_an_unknown_code_keeps_its_number_and_reason(agent: FakeAgent) -> None:
    refused: list[_codec.Message] = []

    def refuse_first(m: _codec.Message) -> list[bytes]:
        if isinstance(m, _codec.Open) and not refused:
            refused.append(m)
            return [_unknown_denial(m.request_id or 0, 1099, "maintenance until 18:00")]
        return agent.default(m)

    agent.answer = refuse_first
    with fwnp.Client(agent.path) as client:
        with pytest.raises(fwnp.Denied) as e:
            client.open(fwnp.tcp(8080))
        assert type(e.value) is fwnp.Denied
        assert (e.value.code, e.value.name) == (1099, "code 1099")
        assert e.value.reason == "maintenance until 18:00"
        assert not e.value.transient
        # The connection stays: the next open is granted on it.
        with client.open(fwnp.tcp(8080)) as lease:
            assert lease.id == LEASE


def test_async_a_refusal_with_an_unknown_code_keeps_its_number_and_reason(
    agent: FakeAgent,
) -> None:
    def refuse(m: _codec.Message) -> list[bytes]:
        if isinstance(m, _codec.Open):
            return [_unknown_denial(m.request_id or 0, 1099, "maintenance until 18:00")]
        return agent.default(m)

    agent.answer = refuse

    async def story() -> None:
        async with fwnp.AsyncClient(agent.path) as client:
            with pytest.raises(fwnp.Denied) as e:
                await client.open(fwnp.tcp(8080))
            assert (e.value.code, e.value.reason) == (1099, "maintenance until 18:00")
            assert (await client.status()).connected

    asyncio.run(story())


def _frame(item: dict[int, object]) -> bytes:
    body: bytes = cbor2.dumps(item)
    return len(body).to_bytes(4, "big") + body


def test_frames_of_unknown_types_are_ignored_and_the_connection_kept(agent: FakeAgent) -> None:
    """spec/local-api.md Section 12.3: a frame of a message type the client does not know, or
    one it cannot decode, that names no request it waits for is ignored; one that names a
    request fails that request; neither closes the connection, nor ends the leases on it."""
    state = {"opens": 0}

    def answer(m: _codec.Message) -> list[bytes]:
        if isinstance(m, _codec.Open):
            state["opens"] += 1
            if state["opens"] == 2:
                # A type of a later version, answering the second Open.
                return [_frame({0: 69, 1: m.request_id or 0})]
            return (
                [_frame({0: 69, 9: 1}), _frame({0: 32, 3: LEASE})]
                + agent.default(m)
                # A time left longer than a timedelta holds, which the schema allows.
                + [_frame({0: 66, 3: LEASE, 4: 1, 5: 2**64 - 1})]
            )
        return agent.default(m)

    agent.answer = answer
    with fwnp.Client(agent.path) as client:
        lease = client.open(fwnp.tcp(8080))
        renewed = lease.next_event(timeout=5)
        assert renewed is not None and renewed.expires_in == timedelta.max
        with pytest.raises(fwnp.ProtocolError):
            client.open(fwnp.tcp(8081))
        assert client.status().connected
        assert lease.active
        lease.release()


def test_async_frames_of_unknown_types_are_ignored_and_the_connection_kept(
    agent: FakeAgent,
) -> None:
    def answer(m: _codec.Message) -> list[bytes]:
        if isinstance(m, _codec.Open):
            return [_frame({0: 69, 1: m.request_id or 0})]
        if isinstance(m, _codec.Status):
            return [_frame({0: 69, 9: 1}), _frame({0: 33, 3: 7})] + agent.default(m)
        return agent.default(m)

    agent.answer = answer

    async def story() -> None:
        async with fwnp.AsyncClient(agent.path) as client:
            with pytest.raises(fwnp.ProtocolError):
                await client.open(fwnp.tcp(8080))
            assert (await client.status()).connected
            assert (await client.status()).connected

    asyncio.run(story())


def hold_opens(agent: FakeAgent) -> list[_codec.Open]:
    """Makes ``agent`` leave every Open unanswered; returns where they are kept."""
    held: list[_codec.Open] = []

    def answer(m: _codec.Message) -> list[bytes]:
        if isinstance(m, _codec.Open):
            held.append(m)
            return []
        return agent.default(m)

    agent.answer = answer
    return held


def test_a_lease_granted_after_its_open_timed_out_is_released(agent: FakeAgent) -> None:
    """An Open whose caller stopped waiting: the lease granted later is released, not held
    until the connection closes with nobody to use it."""
    held = hold_opens(agent)
    with fwnp.Client(agent.path, timeout=0.3) as client:
        with pytest.raises(fwnp.RequestTimeout):
            client.open(fwnp.tcp(8080))
        agent.send(agent.default(held[0])[0])
        release = agent.wait_for(_codec.Release)
        assert isinstance(release, _codec.Release) and release.lease == LEASE


def test_async_a_lease_granted_after_its_open_timed_out_is_released(agent: FakeAgent) -> None:
    held = hold_opens(agent)

    async def story() -> None:
        async with fwnp.AsyncClient(agent.path, timeout=0.3) as client:
            with pytest.raises(fwnp.RequestTimeout):
                await client.open(fwnp.tcp(8080))
            agent.send(agent.default(held[0])[0])
            release = await asyncio.to_thread(agent.wait_for, _codec.Release)
            assert isinstance(release, _codec.Release) and release.lease == LEASE

    asyncio.run(story())


def released_with_its_event(agent: FakeAgent) -> Answer:
    """As the agent answers a Release: the Released event of the id, then the answer."""

    def answer(m: _codec.Message) -> list[bytes]:
        if isinstance(m, _codec.Release):
            return [_codec.encode_frame(_codec.EventMsg(None, m.lease, 5))] + agent.default(m)
        return agent.default(m)

    return answer


def releases(agent: FakeAgent) -> list[_codec.Message]:
    return [m for m in agent.received if isinstance(m, _codec.Release)]


def test_two_opens_granted_the_same_id_are_one_hold_released_with_the_last(
    agent: FakeAgent,
) -> None:
    """The default answer grants LEASE to every Open, as the gateway merges identical openings:
    the connection holds that lease once (spec/local-api.md Section 5.2), so releasing the
    first lease sends nothing the agent would take as the end of both; the last one's release
    sends the Release."""
    agent.answer = released_with_its_event(agent)
    with fwnp.Client(agent.path) as client:
        first = client.open(fwnp.tcp(8080))
        second = client.open(fwnp.tcp(8080))
        assert first.id == second.id == LEASE
        # An event of the id reaches both.
        agent.send(_codec.encode_frame(_codec.EventMsg(None, LEASE, 1, 120_000)))
        for lease in (first, second):
            event = lease.next_event(timeout=5)
            assert event is not None and event.kind is fwnp.EventKind.RENEWED
        first.release()
        assert not first.active and second.active
        client.status()  # what was sent before it has arrived
        assert releases(agent) == []
        # The second is still held: a renewal reaches it, and its release is sent.
        agent.send(_codec.encode_frame(_codec.EventMsg(None, LEASE, 1, 60_000)))
        event = second.next_event(timeout=5)
        assert event is not None and event.kind is fwnp.EventKind.RENEWED
        second.release()
        assert not second.active
    assert len(releases(agent)) == 1, releases(agent)


def test_a_release_by_id_ends_every_lease_of_the_id(agent: FakeAgent) -> None:
    agent.answer = released_with_its_event(agent)
    with fwnp.Client(agent.path) as client:
        first = client.open(fwnp.tcp(8080))
        second = client.open(fwnp.tcp(8080))
        client.release(LEASE)
        for lease in (first, second):
            event = lease.next_event(timeout=5)
            assert event is not None and event.kind is fwnp.EventKind.RELEASED
            assert not lease.active
        second.release()  # over already: nothing more is sent
        client.status()
    assert len(releases(agent)) == 1, releases(agent)


def test_async_two_opens_granted_the_same_id_are_one_hold_released_with_the_last(
    agent: FakeAgent,
) -> None:
    agent.answer = released_with_its_event(agent)

    async def main() -> None:
        async with fwnp.AsyncClient(agent.path) as client:
            first = await client.open(fwnp.tcp(8080))
            second = await client.open(fwnp.tcp(8080))
            assert first.id == second.id == LEASE
            agent.send(_codec.encode_frame(_codec.EventMsg(None, LEASE, 1, 120_000)))
            for lease in (first, second):
                event = await lease.next_event(timeout=5)
                assert event is not None and event.kind is fwnp.EventKind.RENEWED
            await first.release()
            assert not first.active and second.active
            await client.status()
            assert releases(agent) == []
            # Still routed to: a renewal reaches it.
            agent.send(_codec.encode_frame(_codec.EventMsg(None, LEASE, 1, 60_000)))
            event = await second.next_event(timeout=5)
            assert event is not None and event.kind is fwnp.EventKind.RENEWED
            await second.release()
            assert not second.active

    asyncio.run(main())
    assert len(releases(agent)) == 1, releases(agent)


def test_async_a_release_by_id_ends_every_lease_of_the_id(agent: FakeAgent) -> None:
    agent.answer = released_with_its_event(agent)

    async def main() -> None:
        async with fwnp.AsyncClient(agent.path) as client:
            first = await client.open(fwnp.tcp(8080))
            second = await client.open(fwnp.tcp(8080))
            await client.release(LEASE)
            for lease in (first, second):
                event = await lease.next_event(timeout=5)
                assert event is not None and event.kind is fwnp.EventKind.RELEASED
                assert not lease.active
            await second.release()
            await client.status()

    asyncio.run(main())
    assert len(releases(agent)) == 1, releases(agent)
