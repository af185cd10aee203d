"""The framing and the codec against the local API's vectors (spec/vectors/local/): every
valid frame decodes to what the vector says and encodes back to its canonical bytes; every
invalid one is refused for the reason the vector gives."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from fwnp import ProtocolError, _codec

VECTORS = Path(__file__).resolve().parents[3] / "spec" / "vectors" / "local"
FILES = sorted(VECTORS.glob("*.json"))


def _lease(b: bytes | None) -> str | None:
    return None if b is None else b.hex()


def _grant(g: _codec.Grant) -> dict[str, Any]:
    return {
        "protocol": _codec.PROTOCOLS[g.protocol],
        "ports": {"first": g.first, "last": g.last},
        "host": str(g.host),
        "remotes": [str(r) for r in g.remotes],
        "app": g.app,
    }


def _app(a: _codec.AppInfo | None) -> dict[str, Any] | None:
    if a is None:
        return None
    return {"name": a.name, "executable": a.executable, "uid": a.uid, "pid": a.pid}


def render(m: _codec.Message) -> dict[str, Any]:
    """The JSON rendering of spec/vectors/README.md."""
    out: dict[str, Any] = {"request_id": m.request_id, "critical": list(m.critical)}
    if isinstance(m, _codec.Open):
        t = m.opening.target
        host = m.opening.host
        out.update(
            type="open",
            lifetime=m.lifetime,
            app_info=_app(m.app),
            opening={
                "protocol": _codec.PROTOCOLS[t.protocol] if t.protocol else None,
                "ports": {"first": t.first, "last": t.last} if t.app is None else None,
                "app": t.app,
                "host": (
                    [str(a) for a in host]
                    if isinstance(host, tuple)
                    else (str(host) if host else None)
                ),
                "family": _codec.FAMILIES[m.opening.family] if m.opening.family else None,
                "remotes": [str(r) for r in m.opening.remotes],
            },
        )
    elif isinstance(m, (_codec.Release, _codec.Released)):
        out.update(
            type="release" if isinstance(m, _codec.Release) else "released", lease=_lease(m.lease)
        )
    elif isinstance(m, _codec.List):
        out.update(type="list")
    elif isinstance(m, _codec.Granted):
        out.update(
            type="granted",
            lease=_lease(m.lease),
            grants=[_grant(g) for g in m.grants],
            lifetime=m.lifetime,
            expires_ms=m.expires_ms,
            renew_after=m.renew_after,
            epoch=m.epoch,
            narrowed=m.narrowed,
        )
    elif isinstance(m, _codec.DeniedMsg):
        out.update(
            type="denied",
            code=_codec_name(m.code),
            reason=m.reason,
            retry_after=m.retry_after,
            lease=_lease(m.lease),
            unsupported=list(m.unsupported),
        )
    elif isinstance(m, _codec.Leases):
        out.update(
            type="leases",
            epoch=m.epoch,
            leases=[
                {
                    "lease": _lease(i.lease),
                    "grants": [_grant(g) for g in i.grants],
                    "remaining": i.remaining,
                    "expires_ms": i.expires_ms,
                    "app_info": _app(i.app),
                }
                for i in m.leases
            ],
        )
    elif isinstance(m, _codec.Watch):
        out.update(type="watch", lease=_lease(m.lease))
    elif isinstance(m, (_codec.Watching, _codec.Status)):
        out.update(type="watching" if isinstance(m, _codec.Watching) else "status")
    elif isinstance(m, _codec.EventMsg):
        from fwnp import EventKind

        out.update(
            type="event",
            lease=_lease(m.lease),
            kind=EventKind(m.kind).name.lower().replace("_", "-"),
            expires_in_ms=m.expires_in_ms,
            reason=m.reason,
            code=_codec_name(m.code) if m.code is not None else None,
            new_lease=_lease(m.new_lease),
        )
    elif isinstance(m, _codec.StatusAnswer):
        out.update(
            type="status-answer",
            agent_version=m.agent_version,
            gateway=m.gateway,
            connected=m.connected,
            epoch=m.epoch,
            mirror_mode=m.mirror_mode,
            identity=m.identity,
            leases=m.leases,
            last_error=m.last_error,
            api_version=m.api_version,
        )
    return out


def _codec_name(code: int) -> str:
    from fwnp import CODE_NAMES

    return CODE_NAMES[code]


def test_there_are_vectors() -> None:
    assert len(FILES) >= 30, VECTORS


@pytest.mark.parametrize("path", FILES, ids=[p.stem for p in FILES])
def test_vector(path: Path) -> None:
    vector = json.loads(path.read_text())
    frame = bytes.fromhex(vector["hex"])
    if "valid" in vector:
        msg = _codec.decode_frame(frame)
        assert render(msg) == vector["valid"]["decoded"]
        assert _codec.encode_frame(msg).hex() == vector["valid"]["canonical_hex"]
    else:
        with pytest.raises(ProtocolError) as refused:
            _codec.decode_frame(frame)
        assert refused.value.kind == vector["invalid"]["error"]


def test_an_oversized_frame_is_not_sent() -> None:
    big = _codec.DeniedMsg(1, 2, reason="x" * 17000)
    with pytest.raises(ProtocolError) as refused:
        _codec.encode_frame(big)
    assert refused.value.kind == "frame-too-large"
    # The largest body allowed is read; one byte more is refused from the header alone.
    assert _codec.body_length((16384).to_bytes(4, "big")) == 16384
    with pytest.raises(ProtocolError):
        _codec.body_length((16385).to_bytes(4, "big"))


def test_tags_and_deep_nesting_are_refused() -> None:
    # {0: 67, 1: 1(1)}: a tag cbor2 would decode itself as a date.
    with pytest.raises(ProtocolError) as refused:
        _codec.decode_body(bytes.fromhex("a2001843 01c101".replace(" ", "")))
    assert refused.value.kind == "tag-not-allowed"
    # {0: 67, 1: 1, 20: [[[[[[[[0]]]]]]]]}: depth 9.
    with pytest.raises(ProtocolError) as refused:
        _codec.decode_body(bytes.fromhex("a3001843010114" + "81" * 8 + "00"))
    assert refused.value.kind == "nesting-too-deep"
    # Depth 8 is allowed, in an ignored key.
    assert isinstance(
        _codec.decode_body(bytes.fromhex("a3001843010114" + "81" * 7 + "00")), _codec.Status
    )
    # {0: 67, 1: 1, 1: 2}: a duplicate key.
    with pytest.raises(ProtocolError) as refused:
        _codec.decode_body(bytes.fromhex("a300184301010102"))
    assert refused.value.kind == "duplicate-key"
