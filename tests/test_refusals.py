"""Refusals as values: one kind per decision, wire text made and read in one place."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bettensor_ws import CloseCode, Refusal, RefusalKind
from bettensor_ws.protocol.refusals import MAX_CLOSE_REASON, MAX_DETAIL, LinkClose

# Written out on purpose: flipping one kind's flag must break a test, since the
# miner keeps a prediction pending (and resends it) exactly for these.
TRANSIENT = {
    RefusalKind.RATE_LIMITED, RefusalKind.STALE_TIMESTAMP, RefusalKind.FUTURE_TIMESTAMP,
    RefusalKind.REPLAYED_NONCE, RefusalKind.REPLAY_GUARD_FULL, RefusalKind.REPLAY_QUOTA,
    RefusalKind.INTERNAL_ERROR,
    RefusalKind.AUTH_TIMEOUT, RefusalKind.FLOOD_COOLDOWN, RefusalKind.HANDSHAKE_RATE,
    RefusalKind.CONNECT_FAILED,
    RefusalKind.FLOODING, RefusalKind.SLOW_CONSUMER, RefusalKind.CONNECTION_TIMEOUT,
}

# The wire texts of docs/protocol.md, which peers read: they must not change.
WIRE = {
    "rate limited": RefusalKind.RATE_LIMITED,
    "binary frames are not supported; send JSON text": RefusalKind.BINARY,
    "sender does not match the authenticated hotkey": RefusalKind.WRONG_SENDER,
    "bad signature": RefusalKind.BAD_SIGNATURE,
    "malformed timestamp": RefusalKind.MALFORMED_TIMESTAMP,
    "stale timestamp (400s old)": RefusalKind.STALE_TIMESTAMP,
    "future timestamp (301s ahead)": RefusalKind.FUTURE_TIMESTAMP,
    "replayed nonce": RefusalKind.REPLAYED_NONCE,
    "replay guard full": RefusalKind.REPLAY_GUARD_FULL,
    "No handler registered for message type 'x'": RefusalKind.NO_HANDLER,
    "Internal server error": RefusalKind.INTERNAL_ERROR,
    "malformed auth frame: timestamp is not ISO-8601": RefusalKind.AUTH_MALFORMED,
    "auth timeout": RefusalKind.AUTH_TIMEOUT,
    "hotkey not registered": RefusalKind.NOT_REGISTERED,
    "flood cooldown: retry in 42 s": RefusalKind.FLOOD_COOLDOWN,
    "data.wager: expected a number, got 'abc'": RefusalKind.MALFORMED,
    "missing field 'sender'": RefusalKind.MALFORMED,
    "replay quota exceeded (16384 frames in the window)": RefusalKind.REPLAY_QUOTA,
    "addressed to another miner: 5F": RefusalKind.MISADDRESSED,
    "auth frame addressed to another validator": RefusalKind.WRONG_AUDIENCE,
    "auth frame names no audience; this validator requires one": RefusalKind.NO_AUDIENCE,
    "welcome not made for this handshake: made for another miner": RefusalKind.WRONG_SESSION,
    "hotkey deregistered": RefusalKind.DEREGISTERED,
    "too many handshakes: retry in 3 s": RefusalKind.HANDSHAKE_RATE,
}


def test_transient_kinds_are_exactly_these() -> None:
    assert {kind for kind in RefusalKind if kind.transient} == TRANSIENT


@pytest.mark.parametrize("text", sorted(WIRE))
def test_wire_texts_parse_to_their_kind_and_back(text: str) -> None:
    refusal = Refusal.parse(text)
    assert refusal.kind is WIRE[text]
    assert refusal.text() == text
    assert refusal.transient == (WIRE[text] in TRANSIENT)


def test_a_cooldown_carries_its_retry_hint() -> None:
    assert Refusal.parse("flood cooldown: retry in 42 s").retry_after == 42.0
    assert Refusal.parse("too many handshakes: retry in 3 s").retry_after == 3.0
    assert Refusal.cooldown(41.2).text() == "flood cooldown: retry in 42 s"


@pytest.mark.parametrize("kind", list(RefusalKind))
def test_every_kind_round_trips(kind: RefusalKind) -> None:
    refusal = Refusal(kind, "12" if kind.has_detail else "")
    assert Refusal.parse(refusal.text()).kind is kind


@given(st.text(max_size=5000))
def test_any_text_parses_to_a_bounded_refusal(text: str) -> None:
    refusal = Refusal.parse(text)
    assert len(refusal.detail) <= MAX_DETAIL
    assert len(refusal.text()) <= MAX_DETAIL + 60
    assert refusal.key in {k.key for k in RefusalKind}


def test_close_reasons_are_bounded() -> None:
    close = LinkClose(CloseCode.POLICY, "x" * 10_000)
    assert len(close.reason) <= MAX_CLOSE_REASON
    assert CloseCode(1008) is CloseCode.POLICY
