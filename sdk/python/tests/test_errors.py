"""One exception class per code, all under one base, carrying code, reason and retry-after."""

from __future__ import annotations

from datetime import timedelta

import fwnp
from fwnp.errors import denied_error


def test_every_code_has_its_class() -> None:
    classes = {cls.CODE: cls for cls in fwnp.Denied.__subclasses__()}
    assert sorted(classes) == sorted(fwnp.CODE_NAMES)
    for code, name in fwnp.CODE_NAMES.items():
        e = denied_error(code, "why", retry_after=4, lease=bytes(16))
        assert type(e) is classes[code]
        assert isinstance(e, fwnp.Denied) and isinstance(e, fwnp.FwnpError)
        assert (e.code, e.name, e.reason, e.retry_after) == (
            code,
            name,
            "why",
            timedelta(seconds=4),
        )
        # Each class is exported under the name the spec gives its code.
        assert getattr(fwnp, "".join(part.capitalize() for part in name.split("-"))) is type(e)


def test_transient_codes() -> None:
    transient = {code for code in fwnp.CODE_NAMES if denied_error(code, None).transient}
    assert transient == {8, 10, 1026}


def test_unknown_code_is_a_plain_denied() -> None:
    e = denied_error(4000, None)
    assert type(e) is fwnp.Denied and e.name == "code 4000"
