"""Our nodes against refpeer in its reference modes (issue 13): the published
reference code, as refpeer reproduces it, on a real link.

a. A healthy link trades no error frames and our side logs no WARNING, each way:
   our CLI validator with a reference miner (``heartbeat_response``), our MinerNode
   with a reference validator (which calls any answer to its heartbeat unknown).
b. Every game our validator's simulated feed sends parses in the reference TeamGame.
c. A lost (or late) confirmation, the resend refused "Prediction <id> already exists
   in database": confirmed at our miner.
d. The reference's unsigned error frame: one WARNING at our miner, the link goes on.
e. A 300-prediction burst from a reference miner (no pacing, no resends) against our
   CLI validator's default rate limit: all 300 stored (backpressure, not refusals).

Plain synchronous tests: the reference peer runs under ``asyncio.run``, our miner
in a thread-hosted Trio loop, our validator as a ``bettensor-ws`` process.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sqlite3
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from bittensor_wallet import Keypair

from bettensor_ws.node import MinerNode

from ..test_cli import ALICE, CliProcess, future, game, start_validator
from .refpeer import (
    REFERENCE_BAD_FRAME,
    RefMiner,
    RefValidator,
    already_exists,
    reference_error_frame,
    verify_envelope,
)
from .test_runtime_interop import TrioService

STEP = 10.0  # bound on one exchange (or a process start) on a loaded machine
HEARTBEAT = 0.5  # our CLI validator's heartbeat interval in these tests
BEATS = 8  # heartbeats a reference miner answers before test a ends (about 4-5 s)
BURST = 300

REF_GAMES = [
    game("ref-1", team_a="Arsenal", team_b="Chelsea", team_a_odds=2.5, team_b_odds=2.0,
         tie_odds=3.0, can_tie=True, event_start_date=future(2)),
    game("ref-2", team_a="Lakers", team_b="Celtics", team_a_odds=1.6, team_b_odds=2.4,
         tie_odds=0.0, event_start_date=future(4)),
]

_identities = iter(range(1_000_000))


def fresh_miner() -> Keypair:
    """A miner identity no other test used (its daily wager total starts at 0)."""
    return Keypair.create_from_uri(f"//reference-behaviour-{next(_identities)}-{time.time_ns()}")


async def eventually(predicate: Any, what: str, timeout: float = STEP) -> None:  # noqa: ASYNC109
    """Poll ``predicate`` from asyncio until it is true; fail naming ``what``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name.startswith("bettensor_ws") and r.levelno >= logging.WARNING
    ]


@pytest.fixture(autouse=True)
def _log_bettensor_ws(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="bettensor_ws")


# --------------------------------------------------------------------------- our CLI validator


class Validator:
    def __init__(self, proc: CliProcess, url: str, db: Path) -> None:
        self.proc = proc
        self.url = url
        self.db = db

    def stored_by(self, miner_hotkey: str) -> int:
        """Predictions stored for that miner (read-only, beside the running node)."""
        db = sqlite3.connect(f"{self.db.resolve().as_uri()}?mode=ro", uri=True)
        try:
            row = db.execute(
                "SELECT COUNT(*) FROM predictions WHERE miner_hotkey=?", (miner_hotkey,)
            ).fetchone()
            return int(row[0])
        finally:
            db.close()


@contextlib.contextmanager
def cli_validator(tmp: Path, *extra: str) -> Iterator[Validator]:
    """``bettensor-ws validator`` with the simulated feed (the default) and ``extra``."""
    db = tmp / "v.db"
    proc, url = start_validator(tmp, "--port", "0", "--hotkey-uri", "//Alice", "--db", str(db), *extra)
    try:
        assert proc.read_line() == f"validator hotkey {ALICE}"
        yield Validator(proc, url, db)
        assert proc.proc.poll() is None, proc.stderr()
        assert proc.signal(signal.SIGTERM) == 0, proc.stderr()
        log = proc.stderr()
        assert "Traceback" not in log, log
        assert " ERROR " not in log, log
    finally:
        proc.close()


@pytest.fixture(scope="module")
def validator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Validator]:
    """Heartbeats every 0.5 s, a feed update every 0.5 s."""
    with cli_validator(
        tmp_path_factory.mktemp("reference-validator"),
        "--heartbeat-interval", str(HEARTBEAT), "--feed-interval", "0.5",
    ) as v:
        yield v


def test_a_our_validator_and_a_reference_miner_trade_no_errors(validator: Validator) -> None:
    """a: a reference miner answers each of our heartbeats with heartbeat_response and
    sends its own; for ~5 s no error frame comes back and our validator logs no WARNING."""
    log_from = len(validator.proc.stderr())

    async def main() -> RefMiner:
        async with RefMiner(
            fresh_miner(), validator.url, reference=True, heartbeat_interval=HEARTBEAT,
            check_games=True, open_timeout=STEP,
        ) as m:
            assert m.welcome is not None and m.welcome["type"] == "welcome", m.welcome
            # a real peer must run for a while: BEATS heartbeats, 0.5 s apart
            await eventually(lambda: m.heartbeats_answered >= BEATS, f"{BEATS} heartbeats", 4 * STEP)
            assert m.close_code is None, (m.close_code, m.close_reason)
            return m

    m = asyncio.run(main())
    beats = [f for f in m.frames if f.get("type") == "heartbeat"]
    assert all(verify_envelope(f) and f["sender"] == ALICE for f in beats)
    assert m.heartbeats_answered == len(beats) >= BEATS
    acks = [f for f in m.frames if f.get("type") == "heartbeat_ack"]
    assert len(acks) >= m.heartbeats_sent - 1 >= BEATS - 2, (len(acks), m.heartbeats_sent)
    assert m.error_frames == [], m.error_frames
    assert m.bad_games == [], m.bad_games
    log = validator.proc.stderr()[log_from:]
    assert "WARNING" not in log, log


def test_b_every_game_our_validator_sends_parses_in_the_reference_model(validator: Validator) -> None:
    """b: the first update and three feed ticks after it: every game is a reference TeamGame."""

    async def main() -> RefMiner:
        async with RefMiner(fresh_miner(), validator.url, check_games=True, open_timeout=STEP) as m:
            for _ in range(4):
                await m.expect("game_update", timeout=STEP)
            return m

    m = asyncio.run(main())
    assert m.game_updates >= 4
    assert m.games_checked >= 4 * 20, m.games_checked  # 20 games in the simulated feed
    assert m.bad_games == [], m.bad_games[:3]
    assert m.error_frames == []


# --------------------------------------------------------------------------- our miner node


def prediction(pid: str) -> dict[str, Any]:
    g = REF_GAMES[1]
    return {
        "prediction_id": pid,
        "game_id": g["game_id"],
        "miner_uid": "1",
        "prediction_date": datetime.now(UTC).isoformat(),
        "predicted_outcome": g["team_a"],
        "predicted_odds": g["team_a_odds"],
        "team_a": g["team_a"],
        "team_b": g["team_b"],
        "wager": 1.0,
        "team_a_odds": g["team_a_odds"],
        "team_b_odds": g["team_b_odds"],
        "tie_odds": g["tie_odds"],
        "model_name": "interop",
        "confidence_score": 0.6,
        "outcome": "Unfinished",
        "payout": 0.0,
    }


@contextlib.asynccontextmanager
async def our_node(
    bob: Keypair, rv: RefValidator, db: Path, **kwargs: Any
) -> AsyncIterator[tuple[MinerNode, TrioService]]:
    """Our MinerNode in a Trio thread, linked to ``rv``; stopped from a worker thread
    so the asyncio loop (and ``rv`` on it) keeps running meanwhile."""
    kwargs.setdefault("reconnect_base_interval", 0.05)
    kwargs.setdefault("max_reconnect_interval", 0.2)
    kwargs.setdefault("connect_timeout", 2.0)
    node = MinerNode(bob, [(rv.hotkey, rv.url)], db, **kwargs)
    try:
        service = TrioService(node.run)
        await asyncio.to_thread(service.start)
        try:
            await service.acall(node.wait_connected, rv.hotkey, timeout=STEP)
            yield node, service
        finally:
            await asyncio.to_thread(service.stop)
    finally:
        node.close()


async def delivery(node: MinerNode, svc: TrioService, pid: str, validator: str) -> Any:
    return await svc.acall(node.db.run, node.store.delivery, pid, validator)


def test_a_our_miner_sends_a_reference_validator_no_heartbeat_answer(
    alice: Keypair, bob: Keypair, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """a: a reference validator heartbeats every 0.1 s and errors on any answer (an unknown
    type to it); our miner answers none, predicts, heartbeats itself: 0 errors, no WARNING."""

    async def main() -> tuple[RefValidator, dict[str, Any]]:
        async with RefValidator(alice, games=REF_GAMES, reference=True, heartbeat_interval=0.1) as rv:
            async with our_node(bob, rv, tmp_path / "m.db", heartbeat_interval=0.2) as (node, svc):
                # a real peer must run for a while: 20 of its heartbeats, 10 of ours
                await eventually(lambda: rv.heartbeats_sent >= 20, "20 reference heartbeats")
                await eventually(
                    lambda: sum(e["type"] == "heartbeat" for e in rv.received) >= 10, "our heartbeats"
                )
                await eventually(lambda: len(rv.confirmations) == len(REF_GAMES), "predictions confirmed")
                stats = await svc.acall_sync(node.stats)
            await rv.wait_for(lambda: not rv.connected, STEP)
            return rv, stats

    rv, stats = asyncio.run(main())
    types = {e["type"] for e in rv.received}
    assert types == {"heartbeat", "prediction"}, types  # no heartbeat_ack / heartbeat_response
    assert rv.errors == [], rv.errors
    assert stats["reconnects"] == 0 and stats["connections_total"] == 1, stats
    assert warnings_of(caplog) == []


@pytest.mark.parametrize("lost", ["dropped", "late"])
def test_c_a_lost_confirmation_ends_confirmed(
    alice: Keypair, bob: Keypair, tmp_path: Path, lost: str
) -> None:
    """c: the first confirmation is lost (or comes after our resend); the resend is refused
    "Prediction <id> already exists in database": the prediction is confirmed at our miner."""
    pid = f"lost-{lost}"
    knobs: dict[str, Any] = {"drop_confirmations": 1} if lost == "dropped" else {"confirm_delay": 0.8}

    async def main() -> tuple[RefValidator, Any]:
        async with RefValidator(alice, reference=True, **knobs) as rv:
            async with our_node(bob, rv, tmp_path / "m.db", retry_after=0.3) as (node, svc):
                assert await svc.acall(node.submit_predictions, [prediction(pid)]) == [pid]
                await eventually(lambda: already_exists(pid) in [c["message"] for _, c in rv.confirmations],
                                 "the resend refused as already stored")

                def sent() -> int:
                    return sum(e["type"] == "prediction" for e in rv.received)

                # every prediction frame answered (or its answer dropped), then the verdict
                await eventually(lambda: len(rv.confirmations) + len(rv.dropped) >= sent(), "all answers")
                await eventually(lambda: bool(rv.confirmations), "an answer")
                state = None
                for _ in range(int(STEP / 0.05)):
                    state = await delivery(node, svc, pid, alice.ss58_address)
                    if state == ("confirmed", None):
                        break
                    await asyncio.sleep(0.05)
                assert sent() >= 2  # it went again
            return rv, state

    rv, state = asyncio.run(main())
    assert state == ("confirmed", None), state
    assert [d["prediction_id"] for _, d in rv.predictions] == [pid]  # stored once
    refusals = [c for _, c in rv.confirmations if c["status"] == "error"]
    assert refusals and all(c["message"] == already_exists(pid) for c in refusals), rv.confirmations


def test_d_the_reference_unsigned_error_frame_is_one_warning(
    alice: Keypair, bob: Keypair, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """d: {"type": "error", "message", "timestamp"}, unsigned, from a reference validator:
    our miner logs one WARNING and keeps the link (no reconnect); a prediction still goes."""

    async def main() -> tuple[RefValidator, dict[str, Any], Any]:
        async with RefValidator(alice, reference=True) as rv:
            async with our_node(bob, rv, tmp_path / "m.db") as (node, svc):
                assert warnings_of(caplog) == []
                assert await rv.send_raw_all(reference_error_frame()) == 1
                await eventually(lambda: warnings_of(caplog), "a WARNING")
                # the link goes on: a prediction sent after it is confirmed on it
                assert await svc.acall(node.submit_predictions, [prediction("after")]) == ["after"]
                await eventually(lambda: rv.confirmations, "the confirmation")
                state = await delivery(node, svc, "after", alice.ss58_address)
                for _ in range(int(STEP / 0.05)):
                    if state == ("confirmed", None):
                        break
                    await asyncio.sleep(0.05)
                    state = await delivery(node, svc, "after", alice.ss58_address)
                stats = await svc.acall_sync(node.stats)
                assert rv.connected == {bob.ss58_address}
            return rv, stats, state

    rv, stats, state = asyncio.run(main())
    warnings = warnings_of(caplog)
    assert len(warnings) == 1, warnings
    assert REFERENCE_BAD_FRAME in warnings[0], warnings
    assert state == ("confirmed", None), state
    assert stats["reconnects"] == 0 and stats["connections_total"] == 1, stats
    assert len(rv.auth_frames) == 1
    assert rv.errors == []


# --------------------------------------------------------------------------- e: the burst


def test_e_a_reference_burst_of_300_is_all_stored(tmp_path: Path) -> None:
    """e: 300 predictions back to back, each signed, never paced or resent, against the
    default rate limit (50/s, burst 200): the validator slows the sender, all 300 stored."""
    miner = fresh_miner()
    with cli_validator(tmp_path) as v:

        async def main() -> tuple[int, list[dict[str, Any]]]:
            async with RefMiner(miner, v.url, open_timeout=STEP) as m:
                update = await m.expect("game_update", timeout=STEP)
                g = update["data"]["games"][0]
                preds = []
                for i in range(BURST):
                    p = prediction(f"burst-{i}")
                    p.update(game_id=g["game_id"], predicted_outcome=g["team_a"],
                             predicted_odds=g["team_a_odds"], team_a=g["team_a"], team_b=g["team_b"],
                             team_a_odds=g["team_a_odds"], team_b_odds=g["team_b_odds"],
                             tie_odds=g["tie_odds"])
                    preds.append(p)
                sent = await m.burst(preds)
                answers = await m.collect(len(sent), timeout=3 * STEP)
                return len(sent), answers

        sent, answers = asyncio.run(main())
        stored = v.stored_by(miner.ss58_address)
    refused = [a["data"].get("message") for a in answers if a["type"] == "error"]
    rejected = [a["data"] for a in answers if a["type"] == "confirmation" and a["data"].get("status") != "success"]
    summary = (
        f"sent {sent}, answers {len(answers)}, stored {stored}, "
        f"refused {len(refused)} {sorted(set(map(str, refused)))[:3]}, rejected {len(rejected)}"
    )
    print(summary)
    assert sent == BURST, summary
    assert stored == BURST, summary
