"""Issue 12 (containment) at the validator: memory and disk one peer can take, and
rate budgets that survive reconnects.

Scenarios, each of which failed on the old code:

1. Memory an authenticated peer can pin: 900 KB heartbeat nonces (+126 MiB held for
   the replay window), 900 KB auth nonces (+95 MiB), 500 KB message types (+78 MiB
   kept after the peer left); every string a peer chooses is refused past its limit
   and cut in replies and logs; the memory one hostile peer holds at the documented
   limits is measured (tracemalloc, after gc) and printed (``pytest -s``).
2. A reconnect reset the rate limit (3,400-3,600 frames/s against 50/s): the frame
   budget now belongs to the hotkey, and handshakes are budgeted per hotkey too.
3. Disk a peer could fill (304 MB of refused predictions in 6 s, 900 KB of extra
   fields kept verbatim, 300,000 unknown game ids cached): refusals are recorded in
   bounded form and expire, a prediction is at most 4 KiB, every cache is bounded.

Plain managers run over in-memory streams under the autojump clock; a ValidatorNode
(the subject where the store or the committer matters) runs on real loopback with
SQLite in ``tmp_path``, waits bounded by ``trio.fail_after``. Memory is the Python
heap as tracemalloc sees it after ``gc.collect()``; it includes the in-process test
client (at most the frame it is sending, a few MiB), so the figures are upper bounds.
"""

from __future__ import annotations

import gc
import hashlib
import logging
import re
import sqlite3
import threading
import tracemalloc
import weakref
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import pytest
import trio
from bittensor_wallet import Keypair
from trio_websocket import ConnectionClosed, WebSocketConnection

from bettensor_ws import (
    ConfirmationMessage,
    ErrorMessage,
    HeartbeatMessage,
    ValidatorWebSocketManager,
    WebSocketMessage,
    decode,
    encode,
    sign,
)
from bettensor_ws.link.validator import HANDSHAKE_BURST
from bettensor_ws.node import ValidatorNode
from bettensor_ws.node import store as store_module
from bettensor_ws.node.committer import GroupCommitter
from bettensor_ws.node.rules import BAD_WAGER, UNKNOWN_GAME
from bettensor_ws.node.store import (
    REFUSAL_EXCERPT,
    REFUSAL_RETENTION,
    UNKNOWN_GAME_CACHE_SIZE,
    PredictionResult,
    ValidatorStore,
    canonical,
)
from bettensor_ws.node.validator import JOBS_PER_PEER
from bettensor_ws.protocol.auth import build_auth, check_answer
from bettensor_ws.protocol.errors import HandshakeRefused
from bettensor_ws.protocol.messages import MAX_PREDICTION_BYTES, message_types, new_nonce
from bettensor_ws.protocol.refusals import MAX_CLOSE_REASON, MAX_DETAIL, RefusalKind
from bettensor_ws.protocol.replay import MAX_NONCE, ReplayGuard
from tests.helpers import bare_refusal, make_game
from tests.reliability.test_hostile import client, serving
from tests.test_node import WAIT, eventually, make_prediction, upcoming_games
from tests.test_runtime import authenticate, expect_close, raw_client
from tests.test_security_replay import envelope

MiB = 1 << 20
ECHO_LIMIT = MAX_DETAIL  # 200: what of a peer's text an error may echo
ALREADY_USED = "prediction_id already used for another prediction"
OVER_4K = re.compile(r"prediction of \d+ bytes over the limit of 4096 bytes$")


# ---- helpers ---------------------------------------------------------------------------------


@contextmanager
def heap() -> Iterator[Callable[[], int]]:
    """Trace allocations for the block; the function returns the bytes held now, after gc."""
    started = not tracemalloc.is_tracing()
    if started:
        tracemalloc.start()

    def held() -> int:
        gc.collect()
        return tracemalloc.get_traced_memory()[0]

    try:
        yield held
    finally:
        if started:
            tracemalloc.stop()


def heartbeat(keypair: Keypair) -> str:
    return encode(sign(HeartbeatMessage(sender=keypair.ss58_address, data={}), keypair))


async def next_answer(ws: WebSocketConnection) -> WebSocketMessage:
    """The next error or confirmation (a game update or heartbeat may come between)."""
    with trio.fail_after(WAIT):
        while True:
            message = decode(await ws.get_message())
            if isinstance(message, ErrorMessage | ConfirmationMessage):
                return message


async def node_authenticate(ws: WebSocketConnection, keypair: Keypair, *, batch: bool = True) -> None:
    await ws.send_message(orjson.dumps(build_auth(keypair, features=["batch"] if batch else None)).decode())
    with trio.fail_after(WAIT):
        assert decode(await ws.get_message()).type == "welcome"


def sized(make: Callable[[int], str], limit: int = MiB) -> str:
    """``make(pad)`` with the largest pad that keeps the frame within ``limit`` bytes
    (``pad`` is a count of filler characters; the frame grows by about one a unit)."""
    pad = limit - len(make(0).encode())
    while True:
        frame = make(pad)
        size = len(frame.encode())
        if size <= limit:
            return frame
        pad -= size - limit


def db_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in (path, Path(f"{path}-wal")) if p.exists())


async def checkpointed_size(node: ValidatorNode, path: Path) -> int:
    """The database's size on disk with the WAL folded in (what the data takes, not how
    many transactions ran)."""

    def checkpoint() -> None:
        node.store.db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()

    await node.db.run(checkpoint)
    return db_bytes(path)


# ---- 1. memory an authenticated peer can pin ---------------------------------------------------


async def test_heartbeats_with_900_kb_nonces_are_refused_and_pin_no_memory(
    alice: Keypair, bob: Keypair, autojump_clock: Any
) -> None:
    """Scenario 1a: 150 heartbeats with 900 KB nonces are refused naming the 128-character
    limit; the validator holds (almost) nothing more, with the peer connected and after it
    left (old: +126 MiB until the 300 s window passed)."""
    validator = ValidatorWebSocketManager(alice)
    template = envelope(bob, "heartbeat", {}, nonce="NONCE")
    with heap() as held:
        async with raw_client(validator) as ws:
            await authenticate(ws, bob)
            base = held()
            for i in range(150):
                nonce = f"{i:06d}" + "x" * 900_000
                await ws.send_message(template.replace("NONCE", nonce))
                reply = decode(await ws.get_message())
                assert isinstance(reply, ErrorMessage)
                assert reply.message == f"nonce: longer than {MAX_NONCE} characters (900006)"
                assert reply.data["refused_nonce"] == nonce[: ECHO_LIMIT - 3] + "..."
            connected = held() - base
            assert validator.connected_hotkeys == [bob.ss58_address]
        left = held() - base
    assert len(validator.guard) == 1  # the auth nonce alone
    assert validator.stats()["rejections"] == {"malformed": 150}
    print(f"\n150 heartbeats with 900 KB nonces: {connected / MiB:.2f} MiB held while connected, "
          f"{left / MiB:.2f} MiB after leaving")
    assert connected < 4 * MiB
    assert left < 4 * MiB


async def test_handshakes_with_900_kb_auth_nonces_are_refused_and_pin_no_memory(
    alice: Keypair, bob: Keypair, autojump_clock: Any
) -> None:
    """Scenario 1b: 100 handshakes whose (signed) auth frames carry 900 KB nonces are all
    refused "malformed auth frame: nonce: longer than 128 characters", 1008; nothing of
    them is kept (old: +95 MiB)."""
    validator = ValidatorWebSocketManager(alice)
    expected = f"malformed auth frame: nonce: longer than {MAX_NONCE} characters"
    with heap() as held:
        base = held()
        for i in range(100):
            frame = build_auth(bob, nonce=f"{i:06d}" + "x" * 900_000)
            async with raw_client(validator) as ws:
                await ws.send_message(orjson.dumps(frame).decode())
                answer = orjson.loads(await ws.get_message())
                assert "auth_nonce" not in answer  # an over-long nonce is not echoed
                assert bare_refusal(answer, alice.ss58_address) == {"status": "error", "message": expected}
                assert await expect_close(ws) == (1008, expected)
            del frame
        left = held() - base
    assert len(validator.guard) == 0 and validator.connected_hotkeys == []
    assert validator.stats()["rejections"] == {"malformed auth frame": 100}
    print(f"\n100 handshakes with 900 KB auth nonces: {left / MiB:.2f} MiB held afterwards")
    assert left < 4 * MiB


async def test_frames_with_unique_500_kb_types_are_refused_and_counted_by_kind(
    alice: Keypair, bob: Keypair, autojump_clock: Any
) -> None:
    """Scenario 1c: 150 frames with unique 500 KB message types are refused naming
    "type: longer than 128 characters"; statistics keep to the fixed set of kinds and
    registered types; nothing is held after the peer left (old: +78 MiB)."""
    validator = ValidatorWebSocketManager(alice)
    template = envelope(bob, "TYPE", {})
    with heap() as held:
        base = held()
        async with raw_client(validator) as ws:
            await authenticate(ws, bob)
            for i in range(150):
                await ws.send_message(template.replace('"TYPE"', f'"{i:06d}{"t" * 500_000}"'))
                reply = decode(await ws.get_message())
                assert isinstance(reply, ErrorMessage)
                assert reply.message == f"type: longer than {MAX_NONCE} characters (500006)"
            await ws.send_message(heartbeat(bob))  # the link still serves
            assert decode(await ws.get_message()).type == "heartbeat_ack"
            connected = held() - base
        left = held() - base
    stats = validator.stats()
    assert stats["rejections"] == {"malformed": 150}
    kinds = {kind.key for kind in RefusalKind}
    assert set(stats["rejections"]) <= kinds
    assert set(stats["frames_in"]) | set(stats["frames_out"]) <= set(message_types())
    print(f"\n150 frames with 500 KB types: {connected / MiB:.2f} MiB held while connected, "
          f"{left / MiB:.2f} MiB after leaving")
    assert connected < 4 * MiB
    assert left < 4 * MiB


def _hostile_frames(bob: Keypair, charlie: Keypair) -> list[tuple[str, str | bytes]]:
    """Frames carrying 500 KB of text the peer chose, each in a different place."""
    big = "q" * 500_000
    pred = make_prediction("p-echo", make_game(0))
    no_nonce = envelope(bob, "heartbeat", {}, nonce="NONCE")
    return [
        ("nonce", no_nonce.replace("NONCE", big)),
        ("type", envelope(bob, "TYPE", {}).replace('"TYPE"', f'"{big}"')),
        ("top-level key", no_nonce.replace("NONCE", "n-key")[:-1] + f',"{big}":1}}'),
        ("sender", envelope(charlie, "heartbeat", {}, sender=big)),
        ("signature", re.sub(r'"signature":"[^"]*"', f'"signature":"{big}"', envelope(bob, "heartbeat", {}))),
        ("timestamp", envelope(bob, "heartbeat", {}, timestamp=big)),
        ("data", no_nonce.replace('"data":{}', f'"data":"{big}"').replace("NONCE", "n-data")),
        ("wager", envelope(bob, "prediction", {**pred, "wager": big})),
        ("prediction_id", envelope(bob, "prediction", {**pred, "prediction_id": big})),
        ("extra field", envelope(bob, "prediction", {**pred, big: 1})),
        ("not json", "{" + big),
        ("binary", big.encode()),
    ]


async def test_echoed_and_logged_peer_text_stays_bounded(
    alice: Keypair, bob: Keypair, charlie: Keypair, autojump_clock: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Scenario 1d: whatever a peer puts in a frame or an auth frame (500 KB in each field),
    the error text and refused_nonce it gets back are at most 200 characters, a close
    reason at most 120, and no log line of ours carries more than a few hundred."""
    caplog.set_level(logging.DEBUG, logger="bettensor_ws")
    validator = ValidatorWebSocketManager(alice)
    answered: dict[str, str] = {}
    async with raw_client(validator) as ws:
        await authenticate(ws, bob)
        for name, frame in _hostile_frames(bob, charlie):
            await ws.send_message(frame)
            reply = decode(await ws.get_message())
            assert isinstance(reply, ErrorMessage), (name, reply)
            assert len(reply.message) <= ECHO_LIMIT, (name, len(reply.message))
            assert len(reply.data.get("refused_nonce", "")) <= ECHO_LIMIT, name
            answered[name] = reply.message
    assert answered["nonce"].startswith("nonce: longer than 128 characters")
    assert answered["type"].startswith("type: longer than 128 characters")
    assert answered["wager"].startswith("data.wager: expected a number, got 'qqq")
    assert answered["prediction_id"].startswith("data.prediction_id: longer than 128 characters")
    assert OVER_4K.search(answered["extra field"])

    big = "h" * 500_000
    auth_frames = {
        "nonce": build_auth(bob, nonce=big),
        "hotkey": {**build_auth(bob), "hotkey": big},
        "timestamp": {**build_auth(bob), "timestamp": big},
        "audience": build_auth(bob, audience=big),
        "signature": {**build_auth(bob), "signature": big},
        "extra key": {**build_auth(bob), big: big},
    }
    texts = {}
    for name, auth in auth_frames.items():
        async with raw_client(validator) as ws:
            await ws.send_message(orjson.dumps(auth).decode())
            answer = orjson.loads(await ws.get_message())
            refusal = bare_refusal(answer, alice.ss58_address)
            code, reason = await expect_close(ws)
        assert len(refusal["message"]) <= ECHO_LIMIT, name
        assert len(answer.get("auth_nonce", "")) <= MAX_NONCE, name
        assert code == 1008 and reason is not None and len(reason) <= MAX_CLOSE_REASON, name
        texts[name] = refusal["message"]
    # a frame signed by bob over a 500 KB extra key is refused for its signature
    assert texts["extra key"] == "bad signature"
    assert texts["audience"] == "auth frame addressed to another validator"

    ours = [r for r in caplog.records if r.name.startswith("bettensor_ws")]
    assert ours and max(len(r.getMessage()) for r in ours) <= 512


@pytest.mark.parametrize("field", ["wager", "prediction_id"])
async def test_batch_item_results_echo_at_most_200_characters(
    alice: Keypair, bob: Keypair, tmp_path: Path, field: str
) -> None:
    """Scenario 1d at the node: a batch item refused for its shape or size is answered
    with its own result; neither its message nor the prediction_id echoed may carry more
    than 200 characters of what the peer sent (docs/protocol.md: "Every string a peer
    chooses that is logged, echoed or kept is cut to 200 characters").

    Fails: ``PredictionMessage.item_problems`` passes the whole ``repr`` of a bad value
    ("data.predictions[1].wager: expected a number, got 'www...'", 300 KB), and
    ``ValidatorNode.handle_prediction`` echoes ``prediction_id_of(item)`` of an item
    refused for its size (300 KB) as it is."""
    node = ValidatorNode(alice, tmp_path / "v.db")
    games = upcoming_games(1)
    node.store.upsert_games(games)
    good = make_prediction("good", games[0])
    bad = {**make_prediction("bad", games[0]), field: "w" * 300_000}
    try:
        async with serving(node) as port, client(port) as ws:
            await node_authenticate(ws, bob)
            await ws.send_message(envelope(bob, "prediction", {"predictions": [good, bad]}))
            reply = await next_answer(ws)
            assert isinstance(reply, ConfirmationMessage)
            results = reply.data["results"]
            assert [r["status"] for r in results] == ["success", "error"]
            assert field == "wager" or "longer than 128 characters" in results[1]["message"]
            for result in results:
                assert len(result["message"]) <= ECHO_LIMIT, len(result["message"])
                assert len(str(result["prediction_id"])) <= ECHO_LIMIT, len(str(result["prediction_id"]))
    finally:
        node.close()


# ---- 1e. memory per hostile peer at the documented limits -------------------------------------


def _valid_batch(keypair: Keypair, games: Sequence[dict[str, Any]], batch: int, structure: str) -> str:
    """1,000 acceptable predictions (each under 4 KiB), the frame as close to 1 MiB as it
    goes. ``structure`` is how each is padded: ``"string"`` (one long model_name) or
    ``"nested"`` (an extra field ``[{}, {}, ...]``: 3 bytes of JSON, 64+ bytes of Python
    each: about the most a frame of this size can cost once decoded, ~15 MiB)."""
    base = [make_prediction(f"b{batch}-{i}", games[i % len(games)], wager=0.0001) for i in range(1000)]

    def make(pad: int) -> str:
        per = pad // 1000
        if structure == "string":
            items = [{**p, "model_name": "m" * per} for p in base]
        else:
            items = [{**p, "x": [{}] * (per // 3)} for p in base]
        return envelope(keypair, "prediction", {"predictions": items})

    frame = sized(make)
    first = orjson.loads(frame)["data"]["predictions"][0]
    assert len(orjson.dumps(first)) < MAX_PREDICTION_BYTES
    return frame


def _refused_kinds(bob: Keypair, charlie: Keypair, games: Sequence[dict[str, Any]]) -> dict[str, Callable[[], str | bytes]]:
    """A max-size (1 MiB) frame of every kind the validator refuses without closing,
    each made afresh (unique nonce) when called; and the answer each gets (a prefix)."""
    pred = make_prediction("p", games[0])
    return {
        "nonce: longer than 128 characters": lambda: sized(
            lambda pad: envelope(bob, "heartbeat", {}, nonce=new_nonce() + "n" * pad)),
        "type: longer than 128 characters": lambda: sized(
            lambda pad: envelope(bob, "TYPE", {}).replace('"TYPE"', f'"{new_nonce()}{"t" * pad}"')),
        "data: prediction of": lambda: sized(
            lambda pad: envelope(bob, "prediction", {**pred, "prediction_id": new_nonce(), "model_name": "m" * pad})),
        "results over the limit": lambda: sized(lambda pad: envelope(bob, "prediction", {"predictions": [
            {**pred, "prediction_id": new_nonce(), "model_name": "m" * (pad // 200)} for _ in range(200)]})),
        "bad signature": lambda: sized(lambda pad: re.sub(
            r'"signature":"', '"signature":"00', envelope(bob, "heartbeat", {"pad": "p" * pad}), count=1)),
        "unknown message type": lambda: sized(lambda pad: envelope(bob, "x-unknown", {"pad": "p" * pad})),
        "invalid JSON": lambda: "{" + "j" * (MiB - 1),
        "binary frames are not supported": lambda: b"\0" * MiB,
        "sender does not match": lambda: sized(lambda pad: envelope(charlie, "heartbeat", {"pad": "p" * pad})),
        "stale timestamp": lambda: sized(lambda pad: envelope(
            bob, "heartbeat", {"pad": "p" * pad}, timestamp="2020-01-01T00:00:00+00:00")),
    }


async def hostile_peer_memory(
    alice: Keypair, bob: Keypair, charlie: Keypair, tmp_path: Path, *, structure: str, rounds: int, samples: int
) -> dict[str, float]:
    """One authenticated peer sends ``rounds`` rounds of [a valid 1,000-prediction batch,
    then a 1 MiB frame of every refused kind, then a replay of one 1 MiB heartbeat] to a
    ValidatorNode whose commits are held, so that its JOBS_PER_PEER slots fill, its reader
    waits and the transport pushes back. The validator's heap is sampled while the peer is
    blocked, then the commits are released, the peer finishes and leaves. Returns MiB."""
    node = ValidatorNode(alice, tmp_path / f"{structure}.db")
    games = upcoming_games(10)
    node.store.upsert_games(games)
    gate = threading.Event()
    submit_many = node.store.submit_many

    def held_submit(jobs: Sequence[tuple[str, Sequence[dict[str, Any]]]]) -> list[list[PredictionResult]]:
        gate.wait(60)  # on the DB thread: every commit waits until the gate opens
        return submit_many(jobs)

    node.committer = GroupCommitter(held_submit, node.db)
    kinds = _refused_kinds(bob, charlie, games)
    replayed = sized(lambda pad: envelope(bob, "heartbeat", {"pad": "p" * pad}))
    tally: Counter[str] = Counter()
    expected = Counter({kind: rounds for kind in kinds})  # an error each
    expected.update({"results over the limit": rounds * 199,  # 200 results a frame
                     "success": rounds * 1000, "replayed nonce": rounds - 1, "heartbeat_ack": 1,
                     "game_update": 1})
    sent = 0
    figures: dict[str, float] = {}
    try:
        with heap() as held:
            async with serving(node) as port:
                base = held()
                async with client(port) as ws:
                    await node_authenticate(ws, bob)

                    async def drain() -> None:
                        while True:
                            message = decode(await ws.get_message())
                            if isinstance(message, ErrorMessage):
                                tally[next((k for k in kinds if message.message.startswith(k)),
                                           message.message[:40])] += 1
                            elif isinstance(message, ConfirmationMessage) and message.is_batch:
                                for result in message.data["results"]:
                                    over = "over the limit" in str(result["message"])
                                    tally["results over the limit" if over else result["status"]] += 1
                            else:
                                tally[message.type] += 1

                    async def send() -> None:
                        nonlocal sent
                        for batch in range(rounds):
                            await ws.send_message(_valid_batch(bob, games, batch, structure))
                            sent += 1
                            for make in kinds.values():
                                await ws.send_message(make())
                                sent += 1
                            await ws.send_message(replayed)
                            sent += 1

                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(drain)
                        nursery.start_soon(send)
                        with trio.fail_after(WAIT):
                            while True:  # slots full, one more frame waiting for a slot
                                conn = node.connection(bob.ss58_address)
                                slots = node._job_slots.get(conn) if conn is not None else None
                                if slots is not None and slots.value == 0 and slots.statistics().tasks_waiting:
                                    break
                                await trio.sleep(0.02)
                            last = -1
                            while sent != last:  # the peer's sends stop: the transport pushes back
                                last = sent
                                await trio.sleep(0.3)
                        samples_taken = []
                        for _ in range(samples):
                            samples_taken.append(held() - base)
                            await trio.sleep(0.1)
                        figures["frames sent while held"] = sent
                        figures["held while connected (slots full)"] = max(samples_taken) / MiB
                        gate.set()
                        await eventually(lambda: _true(tally == expected), what="every frame answered")
                        nursery.cancel_scope.cancel()
                await eventually(lambda: _true(not node.connected_hotkeys), what="the peer gone")
                figures["after leaving"] = (held() - base) / MiB
                # an honest miner's prediction: the committer's next group replaces its last
                async with client(port) as ws:
                    await node_authenticate(ws, charlie)
                    await ws.send_message(envelope(charlie, "prediction", make_prediction("honest", games[0])))
                    reply = await next_answer(ws)
                    assert isinstance(reply, ConfirmationMessage)
                await eventually(lambda: _true(not node.connected_hotkeys), what="the honest miner gone")
                figures["after leaving and the next commit"] = (held() - base) / MiB
    finally:
        gate.set()
        node.close()
    assert tally == expected  # every refused kind answered as such, every batch stored
    return figures


async def _true(value: bool) -> bool:
    await trio.lowlevel.checkpoint()
    return value


def _report(structure: str, figures: dict[str, float]) -> None:
    print(f"\nvalidator memory per hostile peer at the documented limits ({structure} padding, "
          f"JOBS_PER_PEER={JOBS_PER_PEER}, 1 MiB frames, tracemalloc after gc):")
    for label, value in figures.items():
        print(f"  {label:40s} {value:8.1f}{'' if label.startswith('frames') else ' MiB'}")


async def test_memory_per_hostile_peer_at_the_documented_limits(
    alice: Keypair, bob: Keypair, charlie: Keypair, tmp_path: Path
) -> None:
    """Scenario 1e: one peer at the documented limits (1 MiB frames of every refused kind
    and valid batches of 1,000 predictions under 4 KiB each, padded to cost the most
    memory once decoded) against a validator whose disk is held. What it pins while
    connected is bounded by its JOBS_PER_PEER (4) queued frames, one at its reader and
    trio-websocket's queue of 4 raw frames: measured ~18 MiB, asserted < 48 MiB (nested or
    numerous extra fields, which cost ten times their size once decoded, are refused per
    item). It drops back once it left and the committer moved on (< 4 MiB); "after
    leaving" alone is only printed."""
    figures = await hostile_peer_memory(alice, bob, charlie, tmp_path, structure="string", rounds=5, samples=2)
    _report("string", figures)
    assert figures["held while connected (slots full)"] < 48
    assert figures["after leaving and the next commit"] < 4


@pytest.mark.reliability
@pytest.mark.parametrize("structure", ["string"])
async def test_memory_per_hostile_peer_at_the_documented_limits_long(
    alice: Keypair, bob: Keypair, charlie: Keypair, tmp_path: Path, structure: str
) -> None:
    """Scenario 1e, long form: more rounds, more samples (~18 MiB held, asserted < 48)."""
    figures = await hostile_peer_memory(alice, bob, charlie, tmp_path, structure=structure, rounds=12, samples=10)
    _report(structure, figures)
    assert figures["held while connected (slots full)"] < 48
    assert figures["after leaving and the next commit"] < 4


async def test_a_departed_peer_is_not_kept_alive_by_the_committer(
    alice: Keypair, bob: Keypair, tmp_path: Path
) -> None:
    """Scenario 1e (after the peer left): once a miner's predictions are committed and
    answered and it has gone, nothing of it stays in the validator.

    Fails: ``GroupCommitter.run`` (bettensor_ws/node/committer.py) keeps ``first``,
    ``jobs`` and ``results`` of its last group bound while it waits for the next job; each
    ``_Job.answer`` is ``handle_prediction``'s closure over the LinkConnection, so the
    departed peer's link (its WebSocket, buffers, protocol) and its last group's decoded
    predictions (up to ~15 MiB a 1 MiB frame, see the test above) live on until another
    miner's prediction is committed."""
    node = ValidatorNode(alice, tmp_path / "v.db")
    games = upcoming_games(1)
    node.store.upsert_games(games)
    try:
        async with serving(node) as port:
            async with client(port) as ws:
                await node_authenticate(ws, bob)
                conn = node.connection(bob.ss58_address)
                assert conn is not None
                link = weakref.ref(conn)
                del conn
                await ws.send_message(envelope(bob, "prediction", make_prediction("p1", games[0])))
                reply = await next_answer(ws)
                assert isinstance(reply, ConfirmationMessage) and reply.results[0].status == "success"
            await eventually(lambda: _true(not node.connected_hotkeys), what="the peer gone")
            gc.collect()
            assert link() is None
    finally:
        node.close()


async def test_a_batch_from_a_peer_without_the_batch_feature_is_answered(
    alice: Keypair, bob: Keypair, tmp_path: Path
) -> None:
    """Found on the way (predates issue 12): a miner that did not announce ``batch`` sends
    a batch of 300 (under MAX_BATCH) to a serving ValidatorNode; every prediction is
    stored, and it must be told so.

    Fails: under ``serve`` the answer goes through ``LinkConnection.queue_results``, which
    for a peer without ``batch`` queues one confirmation per result with
    ``put_reply_nowait`` in one go; past ``send_queue_size`` (256) it ends the link 1008
    "slow consumer" before the peer could read anything (without ``serve``, the same
    batch gets one confirmation listing every result)."""
    node = ValidatorNode(alice, tmp_path / "v.db")
    games = upcoming_games(3)
    node.store.upsert_games(games)
    batch = [make_prediction(f"p{i}", games[i % 3], wager=0.01) for i in range(300)]
    try:
        async with serving(node) as port, client(port) as ws:
            await node_authenticate(ws, bob, batch=False)
            await ws.send_message(envelope(bob, "prediction", {"predictions": batch}))
            answered = 0
            while answered < len(batch):
                reply = await next_answer(ws)
                assert isinstance(reply, ConfirmationMessage)
                answered += len(reply.results)
        assert node.store.count_predictions() == len(batch)
    finally:
        node.close()


# ---- 2. a reconnect does not reset the rate limit ---------------------------------------------


async def burst(validator: ValidatorWebSocketManager, keypair: Keypair, frames: int) -> Counter[str]:
    """Connect as ``keypair``, send ``frames`` heartbeats at once; the answers by kind."""
    answers: Counter[str] = Counter()
    async with raw_client(validator, queue=frames + 8) as ws:
        await authenticate(ws, keypair)
        for _ in range(frames):
            await ws.send_message(heartbeat(keypair))
        for _ in range(frames):
            message = decode(await ws.get_message())
            answers[message.message if isinstance(message, ErrorMessage) else message.type] += 1
    return answers


async def test_reconnecting_does_not_refill_the_frame_budget(
    alice: Keypair, bob: Keypair, charlie: Keypair, autojump_clock: Any
) -> None:
    """Scenario 2: a hotkey that reconnects 30 times, a second apart, each time with a burst
    of 190 heartbeats, gets at most rate * elapsed + burst of them admitted overall (old:
    3,400-3,600 frames/s against 50/s); the rest wait (backpressure), none refused.
    Another hotkey's budget is its own."""
    rate, burst_size = 50.0, 200
    validator = ValidatorWebSocketManager(
        alice, rate_limit=rate, rate_burst=burst_size, flood_strikes=1_000_000, handshake_burst=1_000
    )
    start = trio.current_time()
    totals: Counter[str] = Counter()
    for _ in range(30):
        totals += await burst(validator, bob, 190)
        await trio.sleep(1.0)
    elapsed = trio.current_time() - start
    admitted = validator.stats()["frames_in"]["heartbeat"]
    assert admitted == totals["heartbeat_ack"] == 30 * 190, (admitted, totals)  # slowed, never refused
    assert validator.stats()["rejections"] == {}
    print(f"\n30 reconnects x 190 frames over {elapsed:.0f} s: {admitted} admitted "
          f"({admitted / elapsed:.0f}/s; bound {rate * elapsed + burst_size:.0f})")
    assert admitted <= rate * elapsed + burst_size
    # the first burst fitted; the others got about a second's worth each
    assert validator.stats()["connections_total"] == 30

    # another hotkey has its own budget
    assert await burst(validator, charlie, 190) == {"heartbeat_ack": 190}


async def test_flood_strikes_survive_reconnects_then_the_cooldown(
    alice: Keypair, bob: Keypair, autojump_clock: Any
) -> None:
    """Scenario 2: with the default budget (50/s, burst 200) and the reconnects coming at
    once, the second burst of 190 is slowed (10 at once, 180 paced), a connection that
    keeps pushing is closed 1008 "rate limit exceeded" after flood_after (here 5 s) of
    unbroken pacing, and the next handshake meets the flood cooldown."""
    validator = ValidatorWebSocketManager(alice, flood_after=5.0)
    assert await burst(validator, bob, 190) == {"heartbeat_ack": 190}
    assert await burst(validator, bob, 190) == {"heartbeat_ack": 190}
    async with raw_client(validator, queue=256) as ws:
        await authenticate(ws, bob)
        with suppress(ConnectionClosed):
            for _ in range(1000):
                await ws.send_message(heartbeat(bob))
        assert await expect_close(ws) == (1008, "rate limit exceeded")
    assert validator.stats()["rejections"] == {"flooding": 1}
    async with raw_client(validator) as ws:
        await ws.send_message(orjson.dumps(build_auth(bob)).decode())
        reply = bare_refusal(await ws.get_message(), alice.ss58_address)
        assert re.fullmatch(r"flood cooldown: retry in \d+ s", reply["message"]), reply
        assert await expect_close(ws) == (1008, reply["message"])


async def test_handshakes_are_budgeted_per_hotkey(
    alice: Keypair, bob: Keypair, charlie: Keypair, autojump_clock: Any
) -> None:
    """Scenario 2: past handshake_burst (20) quick reconnects a hotkey's handshake is
    refused "too many handshakes: retry in N s": a bare refusal signed by the validator for
    that auth frame, then 1008; the retry hint is honoured by our miner's check. Another
    hotkey still connects; after N s the first one does again."""
    validator = ValidatorWebSocketManager(alice)
    for _ in range(HANDSHAKE_BURST):
        async with raw_client(validator) as ws:
            await authenticate(ws, bob)
    frame = build_auth(bob)
    async with raw_client(validator) as ws:
        await ws.send_message(orjson.dumps(frame).decode())
        raw = await ws.get_message()
        answer = orjson.loads(raw)
        assert answer["auth_nonce"] == frame["nonce"]
        reply = bare_refusal(answer, alice.ss58_address)
        assert await expect_close(ws) == (1008, reply["message"])
    found = re.fullmatch(r"too many handshakes: retry in (\d+) s", reply["message"])
    assert reply["status"] == "error" and found, reply
    wait = int(found.group(1))
    assert 1 <= wait <= 2  # one handshake every 2 s
    with pytest.raises(HandshakeRefused) as caught:
        check_answer(raw, alice.ss58_address, guard=ReplayGuard(), max_size=MiB,
                     own_hotkey=bob.ss58_address, auth_nonce=frame["nonce"])
    assert caught.value.refusal.kind is RefusalKind.HANDSHAKE_RATE
    assert caught.value.refusal.retry_after == wait and caught.value.refusal.transient
    assert validator.stats()["rejections"] == {"handshake rate": 1}

    async with raw_client(validator) as ws:  # charlie's budget is his own
        await authenticate(ws, charlie)
    await trio.sleep(wait)
    async with raw_client(validator) as ws:
        await authenticate(ws, bob)
    assert validator.stats()["connections_total"] == HANDSHAKE_BURST + 2


# ---- 3. disk a peer can fill ------------------------------------------------------------------


async def test_oversized_predictions_are_refused_and_write_nothing(
    alice: Keypair, bob: Keypair, tmp_path: Path
) -> None:
    """Scenario 3a: 300 predictions of ~1 MB each (150 single frames, with the frame limit
    raised to 2 MiB, and 150 batches, each with one good small prediction beside) are
    refused naming "over the limit of 4096 bytes"; the database (+ WAL, checkpointed)
    grows by less than 1 MB and only the good ones are stored (old: 304 MB in 6 s)."""
    path = tmp_path / "v.db"
    node = ValidatorNode(alice, path, max_message_size=2 * MiB, rate_burst=1_000)
    games = upcoming_games(3)
    node.store.upsert_games(games)
    pad = "z" * 1_000_000
    try:
        async with serving(node) as port, client(port) as ws:
            await node_authenticate(ws, bob)
            before = await checkpointed_size(node, path)
            for i in range(150):
                nonce = new_nonce()
                await ws.send_message(envelope(
                    bob, "prediction", {**make_prediction(f"big-{i}", games[0]), "model_name": pad}, nonce=nonce))
                reply = await next_answer(ws)
                assert isinstance(reply, ErrorMessage)
                assert reply.message.startswith("data: ") and OVER_4K.search(reply.message), reply.message
                assert reply.data["refused_nonce"] == nonce
            for i in range(150):
                big = {**make_prediction(f"batched-big-{i}", games[1]), "extra": pad}
                good = make_prediction(f"good-{i}", games[2], wager=0.5)
                await ws.send_message(envelope(bob, "prediction", {"predictions": [big, good]}))
                reply = await next_answer(ws)
                assert isinstance(reply, ConfirmationMessage)
                first, second = reply.data["results"]
                assert first["status"] == "error" and first["message"].startswith("data.predictions[0]: ")
                assert OVER_4K.search(first["message"]), first["message"]
                assert (second["prediction_id"], second["status"]) == (f"good-{i}", "success")
            grown = await checkpointed_size(node, path) - before
        stored = node.store.prediction_ids()
        rejections = node.store.db.execute("SELECT COUNT(*) FROM rejections").fetchone()[0]
    finally:
        node.close()
    print(f"\n300 predictions of ~1 MB refused: the database grew by {grown / 1024:.0f} KiB")
    assert stored == {f"good-{i}" for i in range(150)}
    assert rejections == 0  # refused before the rules: nothing of them reaches the store
    assert grown < 1_000_000


def refused_prediction(pid: str, wager: float = -1.0, **extra: Any) -> dict[str, Any]:
    """Refused by the rules ("wager must be a positive finite number"), whatever the games."""
    return {"prediction_id": pid, "game_id": "game-0", "miner_uid": "1", "predicted_outcome": "Home0",
            "wager": wager, **extra}


def rejection_rows(store: ValidatorStore, miner: str | None = None) -> list[sqlite3.Row]:
    if miner is None:
        return list(store.db.execute("SELECT * FROM rejections ORDER BY prediction_id"))
    return list(store.db.execute(
        "SELECT * FROM rejections WHERE miner_hotkey=? ORDER BY prediction_id", (miner,)))


def answers(results: list[PredictionResult]) -> list[tuple[str | None, str, str]]:
    return [(r["prediction_id"], r["status"], r["message"]) for r in results]


@pytest.fixture
def vstore(tmp_path: Path) -> Iterator[ValidatorStore]:
    store = ValidatorStore(tmp_path / "store.db")
    store.upsert_games([make_game(0)])
    yield store
    store.close()


DAY = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)


def test_a_refusal_is_recorded_bounded_and_answers_resends(vstore: ValidatorStore) -> None:
    """Scenario 3b: a refused 1 MB prediction is recorded as its id, the reason, an
    excerpt of at most 200 characters and the hash of its body; a resend with the same
    content gets the same answer, other content "prediction_id already used"."""
    data = refused_prediction("r1", pad="y" * 1_000_000)
    assert answers(vstore.submit("5miner", [data], now=DAY)) == [("r1", "error", BAD_WAGER)]
    (row,) = rejection_rows(vstore)
    assert (row["prediction_id"], row["miner_hotkey"], row["message"]) == ("r1", "5miner", BAD_WAGER)
    assert len(row["body"]) <= REFUSAL_EXCERPT
    assert row["body_hash"] == hashlib.sha256(canonical(data).encode()).hexdigest()
    assert answers(vstore.submit("5miner", [dict(data)], now=DAY)) == [("r1", "error", BAD_WAGER)]
    other = refused_prediction("r1", pad="x" * 1_000_000)
    assert answers(vstore.submit("5miner", [other], now=DAY)) == [("r1", "error", ALREADY_USED)]
    assert len(rejection_rows(vstore)) == 1
    disk = vstore.db.execute("SELECT SUM(LENGTH(body)) FROM rejections").fetchone()[0]
    assert disk <= REFUSAL_EXCERPT


def test_recorded_refusals_are_capped_per_miner_per_day(
    vstore: ValidatorStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Scenario 3b: at most MAX_RECORDED_REFUSALS (here 5) refusals are recorded per miner
    per UTC day, across submits and a restart; past it a refusal is answered, not kept,
    and a resend of it is judged again. Each miner and each day has its own count."""
    monkeypatch.setattr(store_module, "MAX_RECORDED_REFUSALS", 5)
    results = vstore.submit("5miner", [refused_prediction(f"a{i}") for i in range(8)], now=DAY)
    assert {r["message"] for r in results} == {BAD_WAGER}
    assert len(rejection_rows(vstore, "5miner")) == 5
    vstore.submit("5miner", [refused_prediction(f"b{i}") for i in range(3)], now=DAY + timedelta(hours=1))
    assert len(rejection_rows(vstore, "5miner")) == 5
    recorded = {row["prediction_id"] for row in rejection_rows(vstore, "5miner")}
    assert recorded == {f"a{i}" for i in range(5)}
    # not recorded: another content under that id is judged afresh, not "already used"
    assert answers(vstore.submit("5miner", [refused_prediction("a7", wager=-2.0)], now=DAY)) == [
        ("a7", "error", BAD_WAGER)]
    assert answers(vstore.submit("5miner", [refused_prediction("a0", wager=-2.0)], now=DAY)) == [
        ("a0", "error", ALREADY_USED)]
    # another miner has its own count
    vstore.submit("5other", [refused_prediction(f"c{i}") for i in range(7)], now=DAY)
    assert len(rejection_rows(vstore, "5other")) == 5
    # a restart counts what is on disk
    reopened = ValidatorStore(vstore.path)
    try:
        reopened.submit("5miner", [refused_prediction(f"d{i}") for i in range(3)], now=DAY + timedelta(hours=2))
        assert len(rejection_rows(reopened, "5miner")) == 5
        # the next day, five more
        reopened.submit("5miner", [refused_prediction(f"e{i}") for i in range(8)], now=DAY + timedelta(days=1))
        assert len(rejection_rows(reopened, "5miner")) == 10
    finally:
        reopened.close()


def test_refusals_expire_on_the_first_submit_of_a_day_past_retention(vstore: ValidatorStore) -> None:
    """Scenario 3b: refusals older than REFUSAL_RETENTION (3 days) are deleted on the first
    submit of a day (once a day); until then a resend gets its recorded answer, after it
    the id is judged afresh."""
    assert REFUSAL_RETENTION == timedelta(days=3)
    vstore.submit("5miner", [refused_prediction("old")], now=DAY)
    other = refused_prediction("old", wager=-2.0)
    almost = DAY + REFUSAL_RETENTION - timedelta(hours=1)  # the first submit that day: kept
    assert answers(vstore.submit("5miner", [other], now=almost)) == [("old", "error", ALREADY_USED)]
    later = DAY + REFUSAL_RETENTION + timedelta(hours=1)  # past retention, same day: once a day
    assert answers(vstore.submit("5miner", [other], now=later)) == [("old", "error", ALREADY_USED)]
    assert [row["prediction_id"] for row in rejection_rows(vstore)] == ["old"]
    next_day = (DAY + REFUSAL_RETENTION + timedelta(days=1)).replace(hour=0, minute=1)
    unknown = {**refused_prediction("u1", wager=1.0), "game_id": "nowhere"}  # "game unknown": not recorded
    assert answers(vstore.submit("5someone", [unknown], now=next_day)) == [("u1", "error", UNKNOWN_GAME)]
    assert rejection_rows(vstore) == []
    assert answers(vstore.submit("5miner", [other], now=next_day)) == [("old", "error", BAD_WAGER)]


def test_300000_unknown_game_ids_stay_bounded_and_unrecorded(vstore: ValidatorStore) -> None:
    """Scenario 3c: 300,000 distinct unknown game ids (batches of 1,000) leave at most
    UNKNOWN_GAME_CACHE_SIZE ids cached and write no rejection ("game unknown" can heal);
    once the game is known, the same prediction is accepted."""
    for batch in range(300):
        predictions = [
            {"prediction_id": f"p{batch}-{i}", "game_id": f"nowhere-{batch}-{i}", "miner_uid": "1",
             "predicted_outcome": "Home0", "wager": 0.001}
            for i in range(1_000)
        ]
        results = vstore.submit("5miner", predictions)
        assert {r["message"] for r in results} == {UNKNOWN_GAME}
        assert len(vstore._unknown_games) <= UNKNOWN_GAME_CACHE_SIZE
    assert len(vstore._unknown_games) == UNKNOWN_GAME_CACHE_SIZE
    assert vstore.db.execute("SELECT COUNT(*) FROM rejections").fetchone()[0] == 0
    late = {**make_game(1), "game_id": "nowhere-299-999", "team_a": "Home0"}
    vstore.upsert_games([late])
    resend = {"prediction_id": "p299-999", "game_id": "nowhere-299-999", "miner_uid": "1",
              "predicted_outcome": "Home0", "wager": 0.001}
    assert answers(vstore.submit("5miner", [resend])) == [("p299-999", "success", ValidatorStore.ACCEPTED)]
