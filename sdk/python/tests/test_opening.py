"""The opening builders: what they send, and what they refuse before sending."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest

from fwnp import InvalidOpening, _codec, app, tcp, udp

VECTORS = Path(__file__).resolve().parents[3] / "spec" / "vectors" / "local"


def frame_of(path: str) -> str:
    return str(json.loads((VECTORS / path).read_text())["valid"]["canonical_hex"])


def test_builders_write_the_vectors_frames() -> None:
    opening = tcp(8080, family=4, lifetime=timedelta(minutes=10))
    assert _codec.encode_frame(opening._message(1)).hex() == frame_of("001-open-tcp-ipv4.json")
    opening = udp(5000, 5100, remotes=["2001:db8:1::/48"], name="media-relay")
    assert _codec.encode_frame(opening._message(2)).hex() == frame_of(
        "002-open-udp-range-remotes-name.json"
    )
    opening = app("https", addresses=["192.0.2.10"], lifetime=timedelta(seconds=300))
    assert _codec.encode_frame(opening._message(3)).hex() == frame_of("003-open-app-address.json")


def test_lifetime_is_rounded_up_and_addresses_become_a_list() -> None:
    msg = tcp(
        22, lifetime=timedelta(seconds=1.2), addresses=["192.0.2.10", "2001:db8::10"]
    )._message(9)
    assert msg.lifetime == 2
    assert isinstance(msg.opening.host, tuple) and len(msg.opening.host) == 2
    assert msg.opening.family is None


@pytest.mark.parametrize(
    "build",
    [
        lambda: tcp(0),
        lambda: tcp(70000),
        lambda: udp(5100, 5000),
        lambda: app("HTTPS"),
        lambda: app(""),
        lambda: tcp(80, lifetime=timedelta(days=8)),
        lambda: tcp(80, remotes=["198.51.100.1/24"]),
        lambda: tcp(80, remotes=["::ffff:192.0.2.1/128"]),
        lambda: tcp(80, addresses=["192.0.2.10", "192.0.2.10"]),
        lambda: tcp(80, addresses=["192.0.2.10"], family=6),
        lambda: tcp(80, addresses=["192.0.2.10"], remotes=["2001:db8::/32"]),
        lambda: tcp(80, remotes=["2001:db8::/32", "198.51.100.0/24"]),
        lambda: tcp(80, family="ipx"),
        lambda: tcp(80, name="x" * 257),
        lambda: tcp(80, addresses=[f"192.0.2.{i}" for i in range(1, 18)]),
    ],
)
def test_mistakes_are_refused_before_sending(build: object) -> None:
    with pytest.raises(InvalidOpening):
        build()  # type: ignore[operator]


def test_replace_keeps_what_is_not_given() -> None:
    base = tcp(8080, remotes=["198.51.100.0/24"], lifetime=timedelta(minutes=1))
    changed = base.replace(lifetime=timedelta(minutes=5))
    assert changed.remotes == base.remotes and changed.lifetime == timedelta(minutes=5)
    with pytest.raises(InvalidOpening):
        base.replace(family=6)
