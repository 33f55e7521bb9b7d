"""The fast decode-time check agrees with the cattrs structuring it stands in for."""

from __future__ import annotations

from typing import Any

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bettensor_ws import DecodeError
from bettensor_ws.protocol.payloads import (
    Confirmation,
    ConfirmationResult,
    TeamGame,
    TeamGamePrediction,
    check_payload,
    structure_payload,
)

values: st.SearchStrategy[Any] = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5) | st.just({}) | st.just([])


def _verdict(fn: Any, raw: Any, cls: type[Any]) -> str | None:
    try:
        fn(raw, cls, "data")
    except DecodeError as exc:
        return str(exc)
    return None


@pytest.mark.parametrize("cls", [TeamGamePrediction, TeamGame, Confirmation, ConfirmationResult])
@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_fast_check_gives_the_structuring_verdict(cls: type[Any], data: st.DataObject) -> None:
    names = [f.name for f in attrs.fields(cls)]
    raw = data.draw(st.dictionaries(st.sampled_from(names), values))
    fast = _verdict(check_payload, raw, cls)
    slow = _verdict(structure_payload, raw, cls)
    # both accept or both refuse; the first field named may differ only in order
    assert (fast is None) == (slow is None), (raw, fast, slow)
