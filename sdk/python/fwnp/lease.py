"""Leases, their events, and what the agent reports about itself."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

from . import _codec
from .errors import CODE_NAMES

__all__ = ["LeaseId", "EventKind", "LeaseEvent", "Grant", "AgentStatus", "LeaseSummary"]

Grant = _codec.Grant


class LeaseId(bytes):
    """A lease's id: 16 bytes chosen by the gateway, shown as 32 hexadecimal digits.

    >>> str(LeaseId(bytes(range(16))))
    '000102030405060708090a0b0c0d0e0f'
    """

    def __str__(self) -> str:
        return self.hex()

    def __repr__(self) -> str:
        return f"LeaseId('{self.hex()}')"


class EventKind(enum.IntEnum):
    """What happened to a lease (spec/local-api.md Section 6.3), and ``DISCONNECTED``, which
    this package reports when the connection to the agent closes.

    >>> EventKind.REVOKED.terminal, EventKind.RENEWED.terminal
    (True, False)
    """

    #: The connection to the agent closed: nobody renews the lease any more.
    DISCONNECTED = 0
    #: The agent renewed the lease (``expires_in`` is the new time left).
    RENEWED = 1
    #: The gateway revoked the lease; the opening is closed.
    REVOKED = 2
    #: Renewals failed until the expiry; the opening is closed.
    EXPIRED = 3
    #: The lease ended without being released: the gateway forgot it and opening it again
    #: was refused, or the port is no longer this process's (``code`` 1025).
    LOST = 4
    #: Released.
    RELEASED = 5
    #: The gateway lost the lease and the agent obtained a new one (``new_lease``).
    REOPENED = 6
    #: The agent lost its connection to the gateway; the lease stays valid until its expiry.
    GATEWAY_UNREACHABLE = 7
    #: The gateway refused to renew the lease; it stays valid until its expiry.
    RENEWAL_REFUSED = 8

    @property
    def terminal(self) -> bool:
        """Whether the lease is over after an event of this kind.

        >>> EventKind.DISCONNECTED.terminal
        True
        """
        return self in (
            EventKind.DISCONNECTED,
            EventKind.REVOKED,
            EventKind.EXPIRED,
            EventKind.LOST,
            EventKind.RELEASED,
        )


@dataclass(frozen=True)
class LeaseEvent:
    """Something that happened to a lease.

    >>> e = LeaseEvent(EventKind.RENEWED, LeaseId(bytes(16)), expires_in=timedelta(seconds=300))
    >>> str(e), e.terminal
    ('renewed, 300 s left', False)
    """

    #: What happened.
    kind: EventKind
    #: The lease, by the id the application knew it by before the event.
    lease: LeaseId
    #: Time left (renewed, reopened, renewal refused).
    expires_in: timedelta | None = None
    #: The explanation given.
    reason: str | None = None
    #: The code given (a result code, or 1025 port-not-owned).
    code: int | None = None
    #: The lease's new id (reopened).
    new_lease: LeaseId | None = None

    @property
    def terminal(self) -> bool:
        """Whether the lease is over.

        >>> LeaseEvent(EventKind.EXPIRED, LeaseId(bytes(16))).terminal
        True
        """
        return self.kind.terminal

    @property
    def code_name(self) -> str | None:
        """The name of :attr:`code`.

        >>> LeaseEvent(EventKind.LOST, LeaseId(bytes(16)), code=1025).code_name
        'port-not-owned'
        """
        return None if self.code is None else CODE_NAMES.get(self.code, f"code {self.code}")

    def __str__(self) -> str:
        text = self.kind.name.lower().replace("_", " ")
        if self.expires_in is not None:
            text += f", {int(self.expires_in.total_seconds())} s left"
        if self.new_lease is not None:
            text += f", now {self.new_lease}"
        if self.reason:
            text += f": {self.reason}"
        return text

    @staticmethod
    def _from_message(m: _codec.EventMsg) -> LeaseEvent:
        return LeaseEvent(
            EventKind(m.kind),
            LeaseId(m.lease),
            _milliseconds(m.expires_in_ms),
            m.reason,
            m.code,
            LeaseId(m.new_lease) if m.new_lease is not None else None,
        )


@dataclass(frozen=True)
class AgentStatus:
    """What the host agent says about itself (:meth:`fwnp.Client.status`).

    >>> s = AgentStatus("0.1.0", "gw:4433", True, 7, "enforce", "fwnp://host/web-01", 2, None, 1)
    >>> s.connected, s.api_version
    (True, 1)
    """

    #: The agent's version.
    agent_version: str
    #: The gateway's address, as the agent is configured with it.
    gateway: str
    #: Whether the agent's connection to the gateway is up.
    connected: bool
    #: The gateway's epoch, once known.
    epoch: int | None
    #: ``enforce``, ``monitor`` or ``off``.
    mirror_mode: str
    #: The host's identity as the gateway authenticated it, once known.
    identity: str | None
    #: How many leases the agent holds for applications.
    leases: int
    #: While not connected: why.
    last_error: str | None
    #: The local API version the agent implements (1 when it does not say).
    api_version: int


@dataclass(frozen=True)
class LeaseSummary:
    """One live lease of the host as :meth:`fwnp.Client.leases` lists it.

    >>> LeaseSummary(LeaseId(bytes(16)), (), timedelta(seconds=5), datetime.now(timezone.utc), None).name
    """

    #: The lease's id.
    id: LeaseId
    #: What it grants.
    grants: tuple[Grant, ...]
    #: Time left when the agent answered.
    remaining: timedelta
    #: Expiry on the gateway's clock.
    expires_at: datetime
    #: The application's label as the agent sent it to the gateway.
    name: str | None
    #: The executable, uid and pid of the application, as the agent found them.
    executable: str | None = None
    uid: int | None = None
    pid: int | None = None


class _LeaseState:
    """What a lease and the connection share: whether it is still held, its ids, and when it
    ends (this host's monotonic clock) as the last grant or event said."""

    def __init__(self, lease: bytes, lifetime: int) -> None:
        self.ids = [lease]
        self.active = True
        self.deadline = time.monotonic() + lifetime

    def saw(self, event: LeaseEvent) -> None:
        """Takes in what an event says about the lease's ids and its time left."""
        if event.new_lease is not None:
            self.ids.append(event.new_lease)
        if event.expires_in is not None:
            self.deadline = time.monotonic() + event.expires_in.total_seconds()
        if event.terminal:
            self.active = False

    @property
    def id(self) -> bytes:
        return self.ids[-1]


class _LeaseBase:
    """The granted lease's facts, common to :class:`fwnp.Lease` and
    :class:`fwnp.AsyncLease`."""

    def __init__(self, granted: _codec.Granted, state: _LeaseState) -> None:
        self._granted = granted
        self._state = state
        self._received = time.monotonic()

    @property
    def id(self) -> LeaseId:
        """The lease's id (its new one after a re-open).

        >>> print(lease.id)  # doctest: +SKIP
        0150a67c785e4accf8cf42a4d17fd099
        """
        return LeaseId(self._state.id)

    @property
    def grants(self) -> tuple[Grant, ...]:
        """What the gateway granted: one grant per host address, protocol and port range.

        >>> [str(g) for g in lease.grants]  # doctest: +SKIP
        ['tcp/8080 on 198.51.100.11', 'tcp/8080 on fd00:2::11']
        """
        return self._granted.grants

    @property
    def lifetime(self) -> timedelta:
        """The lifetime granted (the agent renews it while the lease is held).

        >>> lease.lifetime  # doctest: +SKIP
        datetime.timedelta(seconds=300)
        """
        return timedelta(seconds=self._granted.lifetime)

    @property
    def expires_in(self) -> timedelta:
        """The time left before the lease ends unless renewed, as of its grant or its last
        renewal (zero once over).

        >>> lease.expires_in  # doctest: +SKIP
        datetime.timedelta(seconds=299, microseconds=981022)
        """
        if not self._state.active:
            return timedelta(0)
        return timedelta(seconds=max(0.0, self._state.deadline - time.monotonic()))

    @property
    def expires_at(self) -> datetime:
        """The first expiry, on the gateway's clock.

        >>> lease.expires_at  # doctest: +SKIP
        datetime.datetime(2026, 12, 5, 23, 40, tzinfo=datetime.timezone.utc)
        """
        return datetime.fromtimestamp(self._granted.expires_ms / 1000, tz=timezone.utc)

    @property
    def renew_after(self) -> timedelta:
        """When the agent renews it.

        >>> lease.renew_after  # doctest: +SKIP
        datetime.timedelta(seconds=150)
        """
        return timedelta(seconds=self._granted.renew_after)

    @property
    def epoch(self) -> int:
        """The gateway's epoch when it was granted.

        >>> lease.epoch  # doctest: +SKIP
        6839071254581330945
        """
        return self._granted.epoch

    @property
    def narrowed(self) -> bool:
        """Whether the gateway granted less than was asked.

        >>> lease.narrowed  # doctest: +SKIP
        False
        """
        return self._granted.narrowed

    @property
    def active(self) -> bool:
        """Whether the lease is still held (not released, revoked, expired, lost, or cut off
        by the connection's end).

        >>> lease.active  # doctest: +SKIP
        True
        """
        return self._state.active

    def __repr__(self) -> str:
        grants = ", ".join(str(g) for g in self.grants)
        return f"<{type(self).__name__} {self.id} {grants}{'' if self.active else ' (ended)'}>"


def _milliseconds(ms: int | None) -> timedelta | None:
    """A time left in milliseconds; one beyond what a timedelta holds (the schema allows any
    unsigned 64-bit value) is the longest timedelta.

    >>> _milliseconds(1500)
    datetime.timedelta(seconds=1, microseconds=500000)
    >>> _milliseconds(2**64 - 1) == timedelta.max
    True
    """
    if ms is None:
        return None
    try:
        return timedelta(milliseconds=ms)
    except OverflowError:
        return timedelta.max
