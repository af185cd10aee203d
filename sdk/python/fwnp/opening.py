"""What to open: ports of a protocol or an application of the gateway's catalogue, with the
lifetime asked, the remote prefixes allowed, the host addresses and the family.

>>> from datetime import timedelta
>>> str(tcp(8080, lifetime=timedelta(minutes=5), remotes=["198.51.100.0/24"]))
'tcp/8080 from 198.51.100.0/24 for 300 s'
>>> str(udp(5000, 5100))
'udp/5000-5100'
>>> str(app("https", family=6))
'app https (ipv6)'
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Union

from . import _codec
from .errors import InvalidOpening

__all__ = ["Opening", "tcp", "udp", "sctp", "udplite", "app", "MAX_LIFETIME"]

#: The longest lifetime the protocol allows (seven days).
MAX_LIFETIME = timedelta(days=7)
_MAX_ADDRESSES = 16

Remote = Union[str, ipaddress.IPv4Network, ipaddress.IPv6Network]
HostAddress = Union[str, ipaddress.IPv4Address, ipaddress.IPv6Address]
Family = Union[int, str]


def _family(f: Family | None) -> int | None:
    if f is None:
        return None
    names = {4: 4, 6: 6, "4": 4, "6": 6, "ipv4": 4, "ipv6": 6, "inet": 4, "inet6": 6}
    if f not in names:
        raise InvalidOpening(f"family {f!r} is neither 4 (ipv4) nor 6 (ipv6)")
    return names[f]


def _remote(r: Remote) -> _codec.Network:
    if isinstance(r, (ipaddress.IPv4Network, ipaddress.IPv6Network)):
        return r
    try:
        return ipaddress.ip_network(r, strict=True)
    except ValueError as e:
        raise InvalidOpening(f"remote prefix {r!r}: {e}") from None


def _address(a: HostAddress) -> _codec.Address:
    if isinstance(a, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        return a
    try:
        return ipaddress.ip_address(a)
    except ValueError as e:
        raise InvalidOpening(f"host address {a!r}: {e}") from None


@dataclass(frozen=True)
class Opening:
    """An opening to ask for, built with :func:`tcp`, :func:`udp`, :func:`sctp`,
    :func:`udplite` or :func:`app`. Immutable; :meth:`replace` gives a changed copy. The
    rules of the protocol are checked when it is built, so that a mistake is reported here,
    not by a refusal.

    >>> opening = tcp(22, remotes=["203.0.113.9"])
    >>> opening.remotes
    (IPv4Network('203.0.113.9/32'),)
    >>> str(opening.replace(lifetime=timedelta(seconds=90)))
    'tcp/22 from 203.0.113.9/32 for 90 s'
    """

    #: The protocol number (6 tcp, 17 udp, 132 sctp, 136 udplite), or None for an application.
    protocol: int | None = None
    #: The first port, or None for an application.
    first: int | None = None
    #: The last port (equal to ``first`` for one port).
    last: int | None = None
    #: The application id of the gateway's catalogue, for an application opening.
    app: str | None = None
    #: The lifetime asked; None asks for the policy's default. The agent renews the lease for
    #: as long as it is held: this is how long the opening outlives a host that stops renewing.
    lifetime: timedelta | None = None
    #: Only these remote networks may connect; empty: any (as far as policy allows).
    remotes: tuple[_codec.Network, ...] = ()
    #: The host addresses to open; empty: every address the host may open, of the family
    #: asked (both by default), in one lease.
    addresses: tuple[_codec.Address, ...] = ()
    #: 4 or 6: only the host's addresses of this family.
    family: int | None = None
    #: The application's own label, sent to the gateway as its claim (at most 256 bytes).
    name: str | None = None

    def __post_init__(self) -> None:
        if self.app is not None:
            if not 1 <= len(self.app.encode()) <= 64 or any(
                c not in "abcdefghijklmnopqrstuvwxyz0123456789._-" for c in self.app
            ):
                raise InvalidOpening(
                    f"application id {self.app!r} is not 1 to 64 of a-z, 0-9, '.', '_', '-'"
                )
        else:
            if self.protocol not in _codec.PROTOCOLS:
                raise InvalidOpening(f"protocol {self.protocol} is not tcp, udp, sctp or udplite")
            for p in (self.first, self.last):
                if not isinstance(p, int) or not 0 <= p <= 65535:
                    raise InvalidOpening(f"port {p!r} is not a port")
                if p == 0:
                    raise InvalidOpening("port 0 is not a port")
            assert self.first is not None and self.last is not None
            if self.last < self.first:
                raise InvalidOpening(f"the range {self.first}-{self.last} is reversed")
        if self.lifetime is not None and not timedelta(0) <= self.lifetime <= MAX_LIFETIME:
            raise InvalidOpening(f"a lifetime of {self.lifetime} is not between 0 and 7 days")
        if self.name is not None and len(self.name.encode()) > 256:
            raise InvalidOpening("the name is over 256 bytes")
        if len(self.addresses) > _MAX_ADDRESSES:
            raise InvalidOpening(f"{len(self.addresses)} host addresses, over {_MAX_ADDRESSES}")
        if len(set(self.addresses)) != len(self.addresses):
            raise InvalidOpening("a host address is named twice")
        for a in (*self.addresses, *(r.network_address for r in self.remotes)):
            if isinstance(a, ipaddress.IPv6Address) and a.ipv4_mapped is not None:
                raise InvalidOpening(f"{a} is an IPv4-mapped address: name it as IPv4")
        if self.family not in (None, 4, 6):
            raise InvalidOpening(f"family {self.family} is neither 4 nor 6")
        for a in self.addresses:
            if self.family is not None and a.version != self.family:
                raise InvalidOpening(f"host address {a} is not of family {self.family}")
        families: set[int] = {a.version for a in self.addresses} or (
            {self.family} if self.family else set()
        )
        for r in self.remotes:
            if families and families != {r.version}:
                raise InvalidOpening(
                    f"remote prefix {r} is not of the family of every host address asked"
                )
            families = families or {r.version}

    def replace(
        self,
        *,
        lifetime: timedelta | None = None,
        remotes: Iterable[Remote] | None = None,
        addresses: Iterable[HostAddress] | None = None,
        family: Family | None = None,
        name: str | None = None,
    ) -> Opening:
        """A copy with the values given replaced (those not given are kept).

        >>> tcp(8080).replace(family="ipv6").family
        6
        """
        changes: dict[str, Any] = {}
        if lifetime is not None:
            changes["lifetime"] = lifetime
        if remotes is not None:
            changes["remotes"] = tuple(_remote(r) for r in remotes)
        if addresses is not None:
            changes["addresses"] = tuple(_address(a) for a in addresses)
        if family is not None:
            changes["family"] = _family(family)
        if name is not None:
            changes["name"] = name
        return dataclasses.replace(self, **changes)

    def _message(self, request_id: int) -> _codec.Open:
        """The Open request for this opening."""
        target = _codec.Target(self.protocol, self.first, self.last, self.app)
        host: _codec.Address | tuple[_codec.Address, ...] | None = None
        if len(self.addresses) == 1:
            host = self.addresses[0]
        elif self.addresses:
            host = self.addresses
        lifetime = None
        if self.lifetime is not None:
            lifetime = math.ceil(self.lifetime.total_seconds())
        info = _codec.AppInfo(name=self.name) if self.name is not None else None
        return _codec.Open(
            request_id,
            _codec.WireOpening(target, host, self.family, self.remotes),
            lifetime,
            info,
        )

    def __str__(self) -> str:
        if self.app is not None:
            text = f"app {self.app}"
        else:
            ports = str(self.first) if self.first == self.last else f"{self.first}-{self.last}"
            text = f"{_codec.PROTOCOLS[self.protocol or 0]}/{ports}"
        if self.addresses:
            text += " on " + ", ".join(str(a) for a in self.addresses)
        if self.family is not None and not self.addresses:
            text += f" (ipv{self.family})"
        if self.remotes:
            text += " from " + ", ".join(str(r) for r in self.remotes)
        if self.lifetime is not None:
            text += f" for {math.ceil(self.lifetime.total_seconds())} s"
        return text


def _ports(
    protocol: int,
    first: int,
    last: int | None,
    lifetime: timedelta | None,
    remotes: Iterable[Remote],
    addresses: Iterable[HostAddress],
    family: Family | None,
    name: str | None,
) -> Opening:
    return Opening(
        protocol=protocol,
        first=first,
        last=first if last is None else last,
        lifetime=lifetime,
        remotes=tuple(_remote(r) for r in remotes),
        addresses=tuple(_address(a) for a in addresses),
        family=_family(family),
        name=name,
    )


def tcp(
    first: int,
    last: int | None = None,
    *,
    lifetime: timedelta | None = None,
    remotes: Iterable[Remote] = (),
    addresses: Iterable[HostAddress] = (),
    family: Family | None = None,
    name: str | None = None,
) -> Opening:
    """A TCP port, or the range ``first``-``last``.

    >>> str(tcp(8000, 8010, addresses=["192.0.2.10"]))
    'tcp/8000-8010 on 192.0.2.10'
    """
    return _ports(6, first, last, lifetime, remotes, addresses, family, name)


def udp(
    first: int,
    last: int | None = None,
    *,
    lifetime: timedelta | None = None,
    remotes: Iterable[Remote] = (),
    addresses: Iterable[HostAddress] = (),
    family: Family | None = None,
    name: str | None = None,
) -> Opening:
    """A UDP port, or the range ``first``-``last``.

    >>> udp(5000, 5100).last
    5100
    """
    return _ports(17, first, last, lifetime, remotes, addresses, family, name)


def sctp(
    first: int,
    last: int | None = None,
    *,
    lifetime: timedelta | None = None,
    remotes: Iterable[Remote] = (),
    addresses: Iterable[HostAddress] = (),
    family: Family | None = None,
    name: str | None = None,
) -> Opening:
    """An SCTP port, or the range ``first``-``last``.

    >>> sctp(3868).protocol
    132
    """
    return _ports(132, first, last, lifetime, remotes, addresses, family, name)


def udplite(
    first: int,
    last: int | None = None,
    *,
    lifetime: timedelta | None = None,
    remotes: Iterable[Remote] = (),
    addresses: Iterable[HostAddress] = (),
    family: Family | None = None,
    name: str | None = None,
) -> Opening:
    """A UDP-Lite port, or the range ``first``-``last``.

    >>> udplite(9000).protocol
    136
    """
    return _ports(136, first, last, lifetime, remotes, addresses, family, name)


def app(
    app_id: str,
    *,
    lifetime: timedelta | None = None,
    remotes: Iterable[Remote] = (),
    addresses: Iterable[HostAddress] = (),
    family: Family | None = None,
    name: str | None = None,
) -> Opening:
    """An application of the gateway's catalogue (``https``, ``ssh``...): the gateway opens
    the ports it stands for, and the agent checks that this process binds each of them.

    >>> app("https").app
    'https'
    """
    return Opening(
        app=app_id,
        lifetime=lifetime,
        remotes=tuple(_remote(r) for r in remotes),
        addresses=tuple(_address(a) for a in addresses),
        family=_family(family),
        name=name,
    )
