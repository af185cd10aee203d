"""Exceptions of the FWNP SDK: everything that can go wrong between an application and the
host agent, one class per refusal code, under one base class.

Refusals (a Denied answer from the agent or, through it, the gateway) raise a subclass of
:class:`Denied` named after its code (:class:`DeniedByPolicy`, :class:`PortNotOwned`...),
which carries the code, the reason given and the retry-after delay:

>>> from datetime import timedelta
>>> e = denied_error(10, "slow down", retry_after=3)
>>> isinstance(e, RateLimited), e.code, e.name, e.retry_after, e.transient
(True, 10, 'rate-limited', datetime.timedelta(seconds=3), True)
"""

from __future__ import annotations

from datetime import timedelta
from typing import ClassVar

__all__ = [
    "FwnpError",
    "AgentUnavailable",
    "AgentTooOld",
    "ConnectionClosed",
    "ProtocolError",
    "RequestTimeout",
    "InvalidOpening",
    "Denied",
    "UnsupportedVersion",
    "MalformedRequest",
    "UnsupportedOption",
    "MalformedOption",
    "NotAuthorized",
    "AddressMismatch",
    "DeniedByPolicy",
    "NoResources",
    "QuotaExceeded",
    "RateLimited",
    "UnknownLease",
    "LifetimeOutOfRange",
    "UnknownApplication",
    "HelloRequired",
    "AgentNotAuthorized",
    "PortNotOwned",
    "GatewayUnreachable",
    "UnknownLocalLease",
    "CODE_NAMES",
    "denied_error",
]

#: The name of every result code of FWNP/1 and of every local code of the local API.
CODE_NAMES: dict[int, str] = {
    1: "unsupported-version",
    2: "malformed-request",
    3: "unsupported-option",
    4: "malformed-option",
    5: "not-authorized",
    6: "address-mismatch",
    7: "denied-by-policy",
    8: "no-resources",
    9: "quota-exceeded",
    10: "rate-limited",
    11: "unknown-lease",
    12: "lifetime-out-of-range",
    13: "unknown-application",
    14: "hello-required",
    1024: "agent-not-authorized",
    1025: "port-not-owned",
    1026: "gateway-unreachable",
    1027: "unknown-local-lease",
}


class FwnpError(Exception):
    """The base of every exception this package raises.

    >>> try:
    ...     raise PortNotOwned(1025, "tcp/8080 is bound by pid 1234 (nginx), not by the caller")
    ... except FwnpError as e:
    ...     print(type(e).__name__, e.code)
    PortNotOwned 1025
    """


class AgentUnavailable(FwnpError):
    """The agent's socket could not be reached: it does not exist, nobody listens on it, or
    this user may not open it.

    >>> str(AgentUnavailable("/run/fwnp/agent.sock", FileNotFoundError(2, "No such file")))
    'cannot reach the FWNP host agent at /run/fwnp/agent.sock: [Errno 2] No such file (is fwnp-agent running? FWNP_AGENT_SOCKET overrides the socket path)'
    """

    def __init__(self, path: str, cause: OSError) -> None:
        self.path = path
        self.cause = cause
        super().__init__(
            f"cannot reach the FWNP host agent at {path}: {cause} "
            "(is fwnp-agent running? FWNP_AGENT_SOCKET overrides the socket path)"
        )


class AgentTooOld(FwnpError):
    """The agent implements an older version of the local API than this package needs.

    >>> e = AgentTooOld(1, 2)
    >>> (e.agent_version, e.needed)
    (1, 2)
    """

    def __init__(self, agent_version: int, needed: int) -> None:
        self.agent_version = agent_version
        self.needed = needed
        super().__init__(
            f"the host agent implements local API version {agent_version}; "
            f"this package needs version {needed} or later: upgrade fwnp-agent"
        )


class ConnectionClosed(FwnpError):
    """The connection to the agent is closed (the agent stopped, or the client was closed).
    Leases held through it are over: the agent releases them when the connection closes.

    >>> str(ConnectionClosed())
    'the connection to the host agent is closed'
    """

    def __init__(self, detail: str | None = None) -> None:
        text = "the connection to the host agent is closed"
        super().__init__(f"{text}: {detail}" if detail else text)


class ProtocolError(FwnpError):
    """The agent sent something this package cannot read, or an answer of the wrong kind.
    ``kind`` names the rule broken, as the local API's test vectors do (``truncated-frame``,
    ``frame-too-large``, ``trailing-bytes``, ``wrong-type``...).

    >>> ProtocolError("frame-too-large", "a frame of 16385 bytes").kind
    'frame-too-large'
    """

    def __init__(self, kind: str, detail: str) -> None:
        self.kind = kind
        self.detail = detail
        super().__init__(f"the host agent broke the local API ({kind}): {detail}")


class RequestTimeout(FwnpError):
    """No answer came in time.

    >>> RequestTimeout("open", 60.0).request
    'open'
    """

    def __init__(self, request: str, after: float) -> None:
        self.request = request
        self.after = after
        super().__init__(f"the host agent did not answer the {request} request within {after} s")


class InvalidOpening(FwnpError, ValueError):
    """The opening was not sent: it breaks a rule of the protocol. Correct it.

    >>> from fwnp import tcp
    >>> try:
    ...     tcp(0)
    ... except InvalidOpening as e:
    ...     print(e)
    invalid opening: port 0 is not a port
    """

    def __init__(self, detail: str) -> None:
        self.detail = detail
        super().__init__(f"invalid opening: {detail}")


class Denied(FwnpError):
    """A refusal by the agent or the gateway. Each code has its own subclass; a code this
    package does not know raises :class:`Denied` itself.

    >>> e = denied_error(2000, None)
    >>> type(e).__name__, e.name, e.code
    ('Denied', 'code 2000', 2000)
    """

    #: The code of the subclass (0 on :class:`Denied` itself).
    CODE: ClassVar[int] = 0

    def __init__(
        self,
        code: int | None = None,
        reason: str | None = None,
        *,
        retry_after: int | None = None,
        lease: bytes | None = None,
        unsupported: tuple[int, ...] = (),
    ) -> None:
        #: The code, a result code of FWNP/1 or a local code (1024 and up); a subclass's own
        #: when not given.
        self.code: int = code if code is not None else self.CODE
        #: The explanation the agent or gateway gave.
        self.reason = reason
        #: How long to wait before trying again, when said.
        self.retry_after = timedelta(seconds=retry_after) if retry_after is not None else None
        #: The lease the request named, when said.
        self.lease = lease
        #: The critical keys that were not understood (unsupported-option).
        self.unsupported = unsupported
        text = f"denied ({self.name})"
        if retry_after is not None:
            text += f" (retry after {retry_after} s)"
        if reason:
            text += f": {reason}"
        super().__init__(text)

    @property
    def name(self) -> str:
        """The code's registered name.

        >>> DeniedByPolicy(7).name
        'denied-by-policy'
        """
        return CODE_NAMES.get(self.code, f"code {self.code}")

    @property
    def transient(self) -> bool:
        """Whether the same request may succeed later without change: rate limited, no
        resources, or the gateway unreachable from the agent.

        >>> RateLimited(10).transient, DeniedByPolicy(7).transient
        (True, False)
        """
        return self.code in (8, 10, 1026)


class UnsupportedVersion(Denied):
    """Result code 1: no protocol version in common.

    >>> UnsupportedVersion(1).name
    'unsupported-version'
    """

    CODE = 1


class MalformedRequest(Denied):
    """Result code 2: the request did not decode.

    >>> MalformedRequest(2).name
    'malformed-request'
    """

    CODE = 2


class UnsupportedOption(Denied):
    """Result code 3: a critical key was not understood (``unsupported`` lists them).

    >>> UnsupportedOption(3, unsupported=(70,)).unsupported
    (70,)
    """

    CODE = 3


class MalformedOption(Denied):
    """Result code 4: the opening breaks a rule of the protocol.

    >>> MalformedOption(4).name
    'malformed-option'
    """

    CODE = 4


class NotAuthorized(Denied):
    """Result code 5: the host may not make this request.

    >>> NotAuthorized(5).name
    'not-authorized'
    """

    CODE = 5


class AddressMismatch(Denied):
    """Result code 6: a host address asked is not this host's, or the host holds no address
    of the family asked.

    >>> AddressMismatch(6).name
    'address-mismatch'
    """

    CODE = 6


class DeniedByPolicy(Denied):
    """Result code 7: the gateway's policy does not allow this opening; the reason names the
    rule.

    >>> e = DeniedByPolicy(reason="no rule allows tcp/7000")
    >>> e.code, e.reason
    (7, 'no rule allows tcp/7000')
    """

    CODE = 7


class NoResources(Denied):
    """Result code 8: the gateway or the agent is out of room; retry later.

    >>> NoResources(8).transient
    True
    """

    CODE = 8


class QuotaExceeded(Denied):
    """Result code 9: the host holds as many leases as the policy allows.

    >>> QuotaExceeded(9).name
    'quota-exceeded'
    """

    CODE = 9


class RateLimited(Denied):
    """Result code 10: too many requests; retry after ``retry_after``.

    >>> RateLimited(10, retry_after=5).retry_after
    datetime.timedelta(seconds=5)
    """

    CODE = 10


class UnknownLease(Denied):
    """Result code 11: the gateway does not know the lease.

    >>> UnknownLease(11).name
    'unknown-lease'
    """

    CODE = 11


class LifetimeOutOfRange(Denied):
    """Result code 12: the lifetime asked is above the protocol's maximum.

    >>> LifetimeOutOfRange(12).name
    'lifetime-out-of-range'
    """

    CODE = 12


class UnknownApplication(Denied):
    """Result code 13: the gateway's catalogue has no such application.

    >>> UnknownApplication(13).name
    'unknown-application'
    """

    CODE = 13


class HelloRequired(Denied):
    """Result code 14: a request came before Hello (between the agent and the gateway).

    >>> HelloRequired(14).name
    'hello-required'
    """

    CODE = 14


class AgentNotAuthorized(Denied):
    """Local code 1024: the agent does not let this user (uid and groups) use it.

    >>> AgentNotAuthorized(1024).name
    'agent-not-authorized'
    """

    CODE = 1024


class PortNotOwned(Denied):
    """Local code 1025: the port is bound by another process (the reason names it), or by
    nobody; bind it first, from this process or one of its children.

    >>> PortNotOwned(1025).name
    'port-not-owned'
    """

    CODE = 1025


class GatewayUnreachable(Denied):
    """Local code 1026: the agent has no connection to the gateway and could not ask; retry
    later.

    >>> GatewayUnreachable(1026).transient
    True
    """

    CODE = 1026


class UnknownLocalLease(Denied):
    """Local code 1027: a release names a lease this connection does not hold.

    >>> UnknownLocalLease(1027).name
    'unknown-local-lease'
    """

    CODE = 1027


_BY_CODE: dict[int, type[Denied]] = {
    cls.CODE: cls
    for cls in (
        UnsupportedVersion,
        MalformedRequest,
        UnsupportedOption,
        MalformedOption,
        NotAuthorized,
        AddressMismatch,
        DeniedByPolicy,
        NoResources,
        QuotaExceeded,
        RateLimited,
        UnknownLease,
        LifetimeOutOfRange,
        UnknownApplication,
        HelloRequired,
        AgentNotAuthorized,
        PortNotOwned,
        GatewayUnreachable,
        UnknownLocalLease,
    )
}


def denied_error(
    code: int,
    reason: str | None,
    *,
    retry_after: int | None = None,
    lease: bytes | None = None,
    unsupported: tuple[int, ...] = (),
) -> Denied:
    """The exception for a Denied answer: the subclass of its code, or :class:`Denied`.

    >>> type(denied_error(1025, "nobody listens on tcp/8080")).__name__
    'PortNotOwned'
    """
    cls = _BY_CODE.get(code, Denied)
    return cls(code, reason, retry_after=retry_after, lease=lease, unsupported=unsupported)
