"""The miner node settles a refused prediction frame by the refusal's kind, read once."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from bettensor_ws import ErrorMessage, RefusalKind
from bettensor_ws.node import MinerNode
from bettensor_ws.node.miner import _Outbox
from bettensor_ws.testing import MockWebSocket
from tests.test_node import make_prediction, miner_counts, upcoming_games

Keypair = Any

TRANSIENT_TEXTS = ["rate limited", "replayed nonce", "stale timestamp (301s old)",
                   "future timestamp (400s ahead)", "replay guard full", "Internal server error"]
FINAL_TEXTS = ["bad signature", "data.wager: expected a number, got 'abc'",
               "sender does not match the authenticated hotkey", "malformed timestamp"]


async def refuse_one(miner: MinerNode, validator: str, text: str) -> dict[str, int]:
    games = upcoming_games(1)
    [pid] = await miner.submit_predictions([make_prediction("p1", games[0])])
    outbox = _Outbox()
    outbox.by_nonce["n1"] = (0.0, [pid])
    outbox.inflight[pid] = 0.0
    miner._outboxes[validator] = outbox
    error = ErrorMessage(sender=validator, data={"message": text, "refused_nonce": "n1"})
    await miner.handle_error(MockWebSocket(hotkey=validator), error)
    return await miner_counts(miner)


@pytest.mark.parametrize(
    ("text", "settled"),
    [(t, {"pending": 1, "confirmed": 0, "rejected": 0}) for t in TRANSIENT_TEXTS]
    + [(t, {"pending": 0, "confirmed": 0, "rejected": 1}) for t in FINAL_TEXTS],
)
async def test_a_refusal_settles_the_prediction_by_its_kind(
    alice: Keypair, bob: Keypair, tmp_path: Path, text: str, settled: dict[str, int]
) -> None:
    """Transient: still pending, sent again later. Final: rejected with the reason."""
    miner = MinerNode(bob, [(alice.ss58_address, "ws://127.0.0.1:1/ws")], tmp_path / "m.db")
    try:
        assert await refuse_one(miner, alice.ss58_address, text) == settled
    finally:
        miner.close()


def test_the_texts_above_are_the_kinds_the_protocol_makes() -> None:
    from bettensor_ws import Refusal

    assert all(Refusal.parse(t).transient for t in TRANSIENT_TEXTS)
    assert not any(Refusal.parse(t).transient for t in FINAL_TEXTS)
    assert Refusal.parse("replayed nonce").kind is RefusalKind.REPLAYED_NONCE
