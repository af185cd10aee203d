"""FWNP for Python: hold an inbound opening of the host's firewall for as long as a program
needs it, by asking the local FWNP host agent (``fwnp-agent``) over its Unix socket
(``spec/local-api.md``). The agent asks the gateway, mirrors the grant into the host's own
firewall, renews the lease while it is held and releases it when the program lets go of it,
exits or crashes. Pure Python; cbor2 is its only dependency.

>>> from datetime import timedelta
>>> import fwnp
>>> with fwnp.Client() as client:  # doctest: +SKIP
...     with client.open(fwnp.tcp(8080), lifetime=timedelta(minutes=5)) as lease:
...         print("open:", lease.grants)
...         serve_forever()

The asyncio variant has the same names:

>>> async with fwnp.AsyncClient() as client:  # doctest: +SKIP
...     async with client.open(fwnp.tcp(8080)) as lease:
...         await serve()
"""

from .aio import AsyncClient, AsyncLease
from .client import API_VERSION, DEFAULT_TIMEOUT, Client, Lease, default_socket_path
from .errors import (
    CODE_NAMES,
    AddressMismatch,
    AgentNotAuthorized,
    AgentTooOld,
    AgentUnavailable,
    ConnectionClosed,
    Denied,
    DeniedByPolicy,
    FwnpError,
    GatewayUnreachable,
    HelloRequired,
    InvalidOpening,
    LifetimeOutOfRange,
    MalformedOption,
    MalformedRequest,
    NoResources,
    NotAuthorized,
    PortNotOwned,
    ProtocolError,
    QuotaExceeded,
    RateLimited,
    RequestTimeout,
    UnknownApplication,
    UnknownLease,
    UnknownLocalLease,
    UnsupportedOption,
    UnsupportedVersion,
)
from .lease import AgentStatus, EventKind, Grant, LeaseEvent, LeaseId, LeaseSummary
from .opening import MAX_LIFETIME, Opening, app, sctp, tcp, udp, udplite

__version__ = "0.1.0"

__all__ = [
    "API_VERSION",
    "DEFAULT_TIMEOUT",
    "MAX_LIFETIME",
    "CODE_NAMES",
    "Client",
    "Lease",
    "AsyncClient",
    "AsyncLease",
    "default_socket_path",
    "Opening",
    "tcp",
    "udp",
    "sctp",
    "udplite",
    "app",
    "LeaseId",
    "Grant",
    "LeaseEvent",
    "EventKind",
    "AgentStatus",
    "LeaseSummary",
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
]
