"""Issue 11, scenarios 4 to 6: replay after a restart or a clock step, the replay
guard as a weapon, and one key spelt two ways.

Sans-IO parts (:class:`ReplayGuard`, :func:`check_auth`, :class:`LinkProtocol`)
are driven with explicit clocks: ``now``/``wall`` epoch seconds and ``mono`` a
monotonic time chosen by the test. The ValidatorNode cases run over real
loopback with SQLite in ``tmp_path`` (the node is the subject); plain managers
run over in-memory streams under the autojump clock. The memory figures are
printed (``pytest -s``).
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
import tracemalloc
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import orjson
import pytest
import trio
import trio_websocket
from bittensor_wallet import Keypair
from trio_websocket import WebSocketConnection

from bettensor_ws import (
    ConfirmationMessage,
    ErrorMessage,
    GameUpdateMessage,
    HeartbeatAckMessage,
    HeartbeatMessage,
    ValidatorWebSocketManager,
    WebSocketMessage,
    WelcomeMessage,
    decode,
)
from bettensor_ws.node import MinerNode, ValidatorNode
from bettensor_ws.node.rules import DAILY_LIMIT, DAILY_WAGER_LIMIT
from bettensor_ws.node.store import MinerStore, ValidatorStore
from bettensor_ws.protocol.auth import build_auth, check_auth
from bettensor_ws.protocol.errors import AuthError, DecodeError
from bettensor_ws.protocol.identity import canonical_hotkey, encode_address, public_key
from bettensor_ws.protocol.link import (
    Answer,
    ConnectionSettings,
    Deliver,
    LinkProtocol,
    Refuse,
    Role,
)
from bettensor_ws.protocol.messages import new_nonce, now_iso
from bettensor_ws.protocol.refusals import Refusal, RefusalKind
from bettensor_ws.protocol.replay import MAX_NONCE, PER_SENDER, ReplayGuard
from bettensor_ws.protocol.signing import sign_dict, verify
from bettensor_ws.protocol.stats import Stats
from tests.helpers import bare_refusal, prediction_data
from tests.test_node import make_prediction, upcoming_games
from tests.test_runtime import Net, authenticate, expect_close, raw_client, refused, wait_for

WAIT = 20.0  # seconds: a generous bound for loopback steps that take milliseconds
T0 = 1_725_000_000.0  # a fixed wall clock (epoch seconds), so no sans-IO test reads the clock
M0 = 5_000.0  # the monotonic clock at T0
WINDOW = 300.0
REPLAYED = Refusal(RefusalKind.REPLAYED_NONCE)

BOB_FORMAT_0 = "14E5nqKAp3oAJcmzgZhUD2RcptBeUBScxKHgJKU4HPNcKVf3"  # //Bob on Polkadot (published)
BOB_FORMAT_2 = "FoQJpPyadYccjavVdTWxpxU7rUEaYhfLCPwXgkfD6Zat9QP"  # //Bob on Kusama (published)


# ---- helpers ---------------------------------------------------------------------------------


def iso(seconds: float) -> str:
    """The ISO-8601 timestamp of epoch ``seconds``, as our peers write it."""
    return datetime.fromtimestamp(seconds, UTC).isoformat()


def format0(keypair: Keypair) -> str:
    """The same key as ``keypair.ss58_address``, spelt under ss58 format 0."""
    key = public_key(keypair.ss58_address)
    assert key is not None
    return encode_address(key, 0)


def envelope(
    keypair: Keypair,
    type_: str,
    data: dict[str, Any],
    *,
    sender: str | None = None,
    timestamp: str | None = None,
    nonce: str | None = None,
) -> str:
    """A message envelope signed by ``keypair``; ``sender`` may spell its key another way."""
    body = {
        "type": type_,
        "sender": sender if sender is not None else keypair.ss58_address,
        "data": data,
        "timestamp": timestamp if timestamp is not None else now_iso(),
        "nonce": nonce if nonce is not None else new_nonce(),
    }
    return orjson.dumps(sign_dict(body, keypair)).decode()


def auth_as(keypair: Keypair, hotkey: str, **extra: Any) -> str:
    """An auth frame naming ``hotkey`` (any spelling of ``keypair``'s key), signed by ``keypair``."""
    frame = {"hotkey": hotkey, "timestamp": now_iso(), "nonce": new_nonce(), **extra}
    return json.dumps(sign_dict(frame, keypair))


def validator_link(
    signer: Keypair, peer: Keypair, guard: ReplayGuard, *, handled: frozenset[str] = frozenset()
) -> LinkProtocol:
    """A validator-side LinkProtocol for ``peer``, created at monotonic M0."""
    return LinkProtocol(
        role=Role.VALIDATOR,
        signer=signer,
        peer_hotkey=peer.ss58_address,
        settings=ConnectionSettings(replay_window=guard.window),
        guard=guard,
        stats=Stats(),
        now=M0,
        handled=handled,
    )


@asynccontextmanager
async def dial(port: int) -> AsyncIterator[WebSocketConnection]:
    """A bare trio-websocket client on the node's loopback port."""
    async with trio_websocket.open_websocket_url(f"ws://127.0.0.1:{port}/ws") as ws:
        yield ws


async def answer(ws: WebSocketConnection) -> WebSocketMessage:
    """The next frame that answers us: game updates and heartbeats the node sends on its own are skipped."""
    while True:
        message = decode(await ws.get_message())
        if not isinstance(message, GameUpdateMessage | HeartbeatMessage):
            return message


async def refused_on(port: int, first: str, validator: str) -> tuple[dict[str, Any], int, str | None]:
    """Send ``first`` as the auth frame over loopback: the bare refusal (signed by
    ``validator``, checked and set aside), close code and reason."""
    async with dial(port) as ws:
        await ws.send_message(first)
        reply = bare_refusal(await ws.get_message(), validator)
        code, reason = await expect_close(ws)
    return reply, code, reason


def result_of(message: WebSocketMessage) -> tuple[str, str]:
    """(status, message) of a one-prediction confirmation."""
    assert isinstance(message, ConfirmationMessage), message
    assert verify(message)
    data = message.data
    results = data.get("results")
    if results:  # batch form, one result
        assert len(results) == 1
        data = results[0]
    return str(data["status"]), str(data["message"])


def rows(path: Path, sql: str) -> list[tuple[Any, ...]]:
    """Read a node's SQLite file directly (after the node has stopped)."""
    with sqlite3.connect(path) as db:
        return [tuple(r) for r in db.execute(sql)]


@contextmanager
def traced() -> Iterator[Callable[[], int]]:
    """Bytes allocated (and still held) since the block began, per tracemalloc."""
    started = not tracemalloc.is_tracing()
    if started:
        tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    try:
        yield lambda: tracemalloc.get_traced_memory()[0] - base
    finally:
        if started:
            tracemalloc.stop()


def bytes_per_entry(frames: Sequence[tuple[str, str, str]], now: float) -> tuple[float, ReplayGuard]:
    """Fill a default guard with ``frames`` (sender, nonce, timestamp); bytes per entry it holds."""
    with traced() as used:
        guard = ReplayGuard(WINDOW)
        for sender, nonce, timestamp in frames:
            assert guard.check(sender, nonce, timestamp, now=now, mono=M0) is None
        held = used()
    assert len(guard) == len(frames)
    return held / len(guard), guard


def spread(count: int, seconds: float) -> list[str]:
    """``count`` timestamps spread evenly over the ``seconds`` before T0 (the last inside the window)."""
    return [iso(T0 - seconds + 1 + (seconds - 1) * i / count) for i in range(count)]


def random_hotkeys(count: int) -> list[str]:
    return [encode_address(os.urandom(32)) for _ in range(count)]


# ---- 4a. replay after a restart ----------------------------------------------------------------


async def test_restart_keeps_auth_and_message_nonces(alice: Keypair, bob: Keypair, tmp_path: Path) -> None:
    """Scenario 4a: a ValidatorNode restarted on the same database still refuses Bob's
    auth frame and his prediction envelope from before the restart ("replayed nonce")."""
    db_path = tmp_path / "validator.db"
    games = upcoming_games(1)
    auth = json.dumps(build_auth(bob, audience=alice.ss58_address))
    auth_nonce = json.loads(auth)["nonce"]
    captured = envelope(bob, "prediction", make_prediction("p1", games[0]))
    captured_nonce = json.loads(captured)["nonce"]

    first = ValidatorNode(alice, db_path)
    try:
        with trio.fail_after(WAIT):
            async with trio.open_nursery() as nursery:
                port = await nursery.start(first.serve)
                await first.update_games(games)
                async with dial(port) as ws:
                    await ws.send_message(auth)
                    welcome = await answer(ws)
                    assert isinstance(welcome, WelcomeMessage) and verify(welcome)
                    assert welcome.data["auth_nonce"] == auth_nonce
                    await ws.send_message(captured)
                    assert result_of(await answer(ws)) == ("success", "Prediction accepted")
                nursery.cancel_scope.cancel()  # stop the node (the guard is saved on the way out)
        assert first.guard_keeper.saved >= 2
    finally:
        first.close()
    assert len(rows(db_path, "SELECT * FROM seen_nonces")) >= 2

    second = ValidatorNode(alice, db_path)
    try:
        with trio.fail_after(WAIT):
            async with trio.open_nursery() as nursery:
                port = await nursery.start(second.serve)
                assert second.guard.held_by(bob.ss58_address) >= 2  # loaded at start
                # the auth frame from before the restart: bare refusal, 1008
                reply, code, reason = await refused_on(port, auth, second.hotkey)
                assert reply == {"status": "error", "message": "replayed nonce"}
                assert (code, reason) == (1008, "replayed nonce")
                # Bob comes back with a fresh frame; the captured envelope is refused
                async with dial(port) as ws:
                    await ws.send_message(json.dumps(build_auth(bob, audience=alice.ss58_address)))
                    assert isinstance(await answer(ws), WelcomeMessage)
                    await ws.send_message(captured)
                    error = await answer(ws)
                    assert isinstance(error, ErrorMessage) and verify(error)
                    assert error.message == "replayed nonce"
                    assert error.data["refused_nonce"] == captured_nonce
                    # the link stays open and serves
                    await ws.send_message(envelope(bob, "heartbeat", {}))
                    assert isinstance(await answer(ws), HeartbeatAckMessage)
                assert second.stats()["rejections"] == {"replayed nonce": 2}
                assert await second.db.run(second.store.count_predictions) == 1
                nursery.cancel_scope.cancel()
    finally:
        second.close()


@pytest.mark.parametrize("store_class", [ValidatorStore, MinerStore])
def test_guard_entries_survive_a_restart_through_the_store(
    store_class: type[ValidatorStore] | type[MinerStore], alice: Keypair, bob: Keypair, tmp_path: Path
) -> None:
    """Scenario 4a at store level: ReplayGuard -> journal -> save_nonces -> a new store
    on the same file -> load_nonces -> a new guard refuses the old auth and envelope nonces
    (both the validator's and the miner's store have the seen_nonces table)."""
    path = tmp_path / "node.db"
    guard = ReplayGuard(WINDOW)
    guard.journal()
    frame = build_auth(bob, audience=alice.ss58_address, timestamp=iso(T0))
    info = check_auth(frame, guard=guard, now=T0, mono=M0, audience=alice.ss58_address)
    assert info.hotkey == bob.ss58_address
    assert guard.check(bob.ss58_address, "envelope-nonce", iso(T0 - 5), now=T0, mono=M0) is None
    journal = guard.take_journal()
    assert len(journal) == 2 and guard.take_journal() == []
    assert {second for _, second, _ in journal} == {int(T0), int(T0) - 5}

    store = store_class(path)
    store.save_nonces(journal, WINDOW, T0)
    store.close()
    assert rows(path, "SELECT name FROM sqlite_master WHERE name = 'seen_nonces'") == [("seen_nonces",)]

    reopened = store_class(path)
    try:
        stored = reopened.load_nonces(T0 + 10)
        assert sorted(stored) == sorted(journal)
        fresh = ReplayGuard(WINDOW)
        assert fresh.load(stored, now=T0 + 10, mono=1.0) == 2
        assert fresh.load(stored, now=T0 + 10, mono=1.0) == 0  # loading twice adds nothing
        with pytest.raises(AuthError) as caught:
            check_auth(frame, guard=fresh, now=T0 + 10, mono=1.0, audience=alice.ss58_address)
        assert caught.value.refusal == REPLAYED
        assert fresh.check(bob.ss58_address, "envelope-nonce", iso(T0 - 5), now=T0 + 10, mono=1.0) == REPLAYED
        # entries whose timestamps have left the window are not loaded (the timestamp refuses them)
        assert reopened.load_nonces(T0 + WINDOW + 1) == []
        assert ReplayGuard(WINDOW).load(stored, now=T0 + WINDOW + 1, mono=1.0) == 0
    finally:
        reopened.close()


async def test_miner_node_loads_stored_entries_at_start(alice: Keypair, bob: Keypair, tmp_path: Path) -> None:
    """Scenario 4a, miner side: a MinerNode started on a database holding a validator's
    Welcome nonce refuses that Welcome again (the guard is loaded before any link)."""
    path = tmp_path / "miner.db"
    now = time.time()
    welcome_ts = iso(now - 1)
    recorder = ReplayGuard(WINDOW)
    recorder.journal()
    assert recorder.check(alice.ss58_address, "welcome-nonce", welcome_ts, now=now) is None
    store = MinerStore(path)
    store.save_nonces(recorder.take_journal(), WINDOW, now)
    store.close()

    net = Net()  # nothing attached: every dial is refused, the node keeps backing off
    miner = MinerNode(
        bob, [(alice.ss58_address, "ws://validator/ws")], path,
        stream_opener=net.open, reconnect_base_interval=0.05, max_reconnect_interval=0.1,
    )
    try:
        with trio.fail_after(WAIT):
            async with trio.open_nursery() as nursery:
                await nursery.start(miner.run)
                assert miner.guard.held_by(alice.ss58_address) == 1
                assert miner.guard.check(alice.ss58_address, "welcome-nonce", welcome_ts) == REPLAYED
                nursery.cancel_scope.cancel()
    finally:
        miner.close()


# ---- 4b. replay after a clock step -------------------------------------------------------------


def test_clock_stepped_forward_then_back_does_not_reopen_frames() -> None:
    """Scenario 4b (guard): frames accepted at wall T; the wall clock steps 400 s forward
    (mono +1 s) and a fresh frame at the stepped clock prunes; then wall steps back to T+2:
    the captured frames are still refused "replayed nonce"."""
    guard = ReplayGuard(WINDOW)
    captured = [("bob", f"nonce-{i}", iso(T0)) for i in range(3)]
    for sender, nonce, timestamp in captured:
        assert guard.check(sender, nonce, timestamp, now=T0, mono=M0) is None
    # forward 400 s on the wall, 1 s on the monotonic clock; another sender's fresh frame prunes
    assert guard.check("carol", "fresh", iso(T0 + 400), now=T0 + 400, mono=M0 + 1) is None
    assert len(guard) == 4 and guard.held_by("bob") == 3
    # back to T+2: the captured frames are inside the window again, and still remembered
    for sender, nonce, timestamp in captured:
        assert guard.check(sender, nonce, timestamp, now=T0 + 2, mono=M0 + 2) == REPLAYED
    # pruning by a wall clock far ahead but a monotonic clock that barely moved forgets nothing
    guard.prune(T0 + 10_000, M0 + 3)
    assert len(guard) == 4


def test_clock_step_through_the_link_protocol(alice: Keypair, bob: Keypair) -> None:
    """Scenario 4b (LinkProtocol.receive): a prediction envelope accepted at wall T is
    refused "replayed nonce" after the wall clock stepped forward 400 s and back to T+2."""
    link = validator_link(alice, bob, ReplayGuard(WINDOW), handled=frozenset({"prediction"}))
    captured = envelope(bob, "prediction", prediction_data("p1"), timestamp=iso(T0))
    assert isinstance(link.receive(captured, now=M0, wall=T0), Deliver)
    fresh = envelope(bob, "heartbeat", {}, timestamp=iso(T0 + 400))
    assert isinstance(link.receive(fresh, now=M0 + 1, wall=T0 + 400), Answer)
    verdict = link.receive(captured, now=M0 + 2, wall=T0 + 2)
    assert isinstance(verdict, Refuse)
    assert verdict.refusal == REPLAYED
    assert verdict.nonce == json.loads(captured)["nonce"]
    assert verdict.frame is not None
    reply = decode(verdict.frame.text)
    assert isinstance(reply, ErrorMessage) and reply.message == "replayed nonce"


def test_clock_step_through_check_auth(alice: Keypair, bob: Keypair) -> None:
    """Scenario 4b (check_auth): an auth frame accepted at wall T is refused "replayed
    nonce" after the wall clock stepped forward 400 s (a fresh auth then) and back to T+2."""
    guard = ReplayGuard(WINDOW)
    audience = alice.ss58_address
    frame = build_auth(bob, audience=audience, timestamp=iso(T0))
    check_auth(frame, guard=guard, now=T0, mono=M0, audience=audience)
    later = build_auth(bob, audience=audience, timestamp=iso(T0 + 400))
    check_auth(later, guard=guard, now=T0 + 400, mono=M0 + 1, audience=audience)
    with pytest.raises(AuthError) as caught:
        check_auth(frame, guard=guard, now=T0 + 2, mono=M0 + 2, audience=audience)
    assert caught.value.refusal == REPLAYED
    assert caught.value.reason == "replayed nonce"


def test_memory_is_released_once_both_clocks_have_passed() -> None:
    """Scenario 4b (liveness): after the step forward and back, entries are forgotten once
    both clocks say their timestamps left the window, and not before."""
    guard = ReplayGuard(WINDOW)
    for i in range(3):
        assert guard.check("bob", f"nonce-{i}", iso(T0), now=T0, mono=M0) is None
    assert guard.check("carol", "fresh", iso(T0 + 400), now=T0 + 400, mono=M0 + 1) is None
    assert len(guard) == 4
    # wall back at T+2 and running normally again; one second short of expiry: all kept
    guard.prune(T0 + WINDOW, M0 + WINDOW)
    assert len(guard) == 4
    # the captured frames' second is out of the window by both clocks: released
    guard.prune(T0 + WINDOW + 1, M0 + WINDOW + 1)
    assert len(guard) == 1 and guard.held_by("bob") == 0 and guard.senders == 1
    # "fresh" (stamped T+400) is inside the window until wall T+701, whatever mono says
    guard.prune(T0 + 400 + WINDOW, M0 + 400 + WINDOW)
    assert len(guard) == 1
    guard.prune(T0 + 400 + WINDOW + 1, M0 + 400 + WINDOW + 1)
    assert len(guard) == 0 and guard.senders == 0
    # and what was forgotten is refused by its timestamp alone
    refusal = guard.check("bob", "nonce-0", iso(T0), now=T0 + 701, mono=M0 + 701)
    assert refusal is not None and refusal.kind is RefusalKind.STALE_TIMESTAMP


def test_an_honest_miner_is_not_refused_after_a_short_clock_step() -> None:
    """Scenario 4b (liveness, known failure): the validator's wall clock is 200 s fast for
    one second, then corrected. Bob, honest, at the validator's rate limit (50 frames a
    second), never holds more than 50 x 301 entries that matter: he must never be refused.
    Today the bucket stamped during the step sits at the top of the expiry heap for 200 s
    after the monotonic clock passed it, and nothing behind it is pruned meanwhile."""
    guard = ReplayGuard(WINDOW)
    rate = 50
    refusals: list[tuple[float, str]] = []
    for i in range(rate * 700):
        t = i / rate
        wall = T0 + t + (200.0 if 310 <= t < 311 else 0.0)
        refusal = guard.check("bob", f"b{i}", iso(T0 + t), now=wall, mono=M0 + t)
        if refusal is not None:
            refusals.append((t, refusal.text()))
    assert refusals == [], f"{len(refusals)} refused, first at t={refusals[0][0]} s: {refusals[0][1]}"


# ---- 5. the replay guard as a weapon -----------------------------------------------------------


@pytest.mark.parametrize("per_sender", [50, PER_SENDER])
def test_future_stamped_flood_fills_only_its_own_quota(per_sender: int) -> None:
    """Scenario 5: Mallory sends frames stamped 290 s ahead; once she holds per_sender
    entries she alone is refused "replay quota exceeded"; Bob is accepted the whole time."""
    guard = ReplayGuard(WINDOW, per_sender=per_sender)
    ahead = iso(T0 + 290)
    bob_frames = 0
    for i in range(per_sender):
        assert guard.check("mallory", f"m{i}", ahead, now=T0, mono=M0) is None
        if i % 16 == 0:
            assert guard.check("bob", f"b{i}", iso(T0), now=T0, mono=M0) is None
            bob_frames += 1
    assert guard.held_by("mallory") == per_sender
    for i in range(per_sender, per_sender + 20):
        refusal = guard.check("mallory", f"m{i}", ahead, now=T0 + i / per_sender, mono=M0)
        assert refusal == Refusal(RefusalKind.REPLAY_QUOTA, str(per_sender))
        assert refusal.text() == f"replay quota exceeded ({per_sender} frames in the window)"
        assert guard.check("bob", f"b-after-{i}", iso(T0), now=T0 + i / per_sender, mono=M0) is None
        bob_frames += 1
    assert guard.held_by("mallory") == per_sender and guard.held_by("bob") == bob_frames
    # a replay of her own frame is still named as one, not as a quota refusal
    assert guard.check("mallory", "m0", ahead, now=T0, mono=M0) == REPLAYED


async def test_future_stamped_flood_through_a_validator(
    alice: Keypair, bob: Keypair, charlie: Keypair, autojump_clock: Any
) -> None:
    """Scenario 5 through a validator (in memory): charlie's frames stamped 290 s ahead are
    answered "replay quota exceeded" once he holds per_sender entries (his auth frame is one);
    Bob, on his own link, gets every heartbeat acknowledged the whole time."""
    per_sender = 50
    validator = ValidatorWebSocketManager(alice)
    validator.guard = ReplayGuard(WINDOW, per_sender=per_sender)
    acks = quota = 0
    async with raw_client(validator) as mallory, raw_client(validator) as honest:
        await authenticate(mallory, charlie)
        await authenticate(honest, bob)
        for i in range(per_sender + 6):
            await mallory.send_message(envelope(charlie, "heartbeat", {}, timestamp=iso(time.time() + 290)))
            reply = decode(await mallory.get_message())
            if isinstance(reply, HeartbeatAckMessage):
                acks += 1
            else:
                assert isinstance(reply, ErrorMessage)
                assert reply.message == f"replay quota exceeded ({per_sender} frames in the window)"
                quota += 1
            if i % 2 == 0:  # Bob at half charlie's rate stays well inside his own quota
                await honest.send_message(envelope(bob, "heartbeat", {}))
                assert isinstance(decode(await honest.get_message()), HeartbeatAckMessage)
        assert (acks, quota) == (per_sender - 1, 7)  # the auth frame holds one of his entries
        assert validator.guard.held_by(charlie.ss58_address) == per_sender
        assert validator.guard.held_by(bob.ss58_address) == 1 + (per_sender + 6) // 2
        assert sorted(validator.connected_hotkeys) == sorted([bob.ss58_address, charlie.ss58_address])
    assert validator.stats()["rejections"] == {"replay quota": 7}


def test_long_nonce_and_type_are_refused_naming_the_limit(alice: Keypair, bob: Keypair) -> None:
    """Scenario 5: nonces and message types over 128 characters are refused naming the limit,
    by the codec, the guard and check_auth; exactly 128 is accepted."""
    assert MAX_NONCE == 128
    long_nonce, long_type = "n" * 129, "t" * 129
    with pytest.raises(DecodeError, match=r"^nonce: longer than 128 characters \(129\)$"):
        decode(envelope(bob, "heartbeat", {}, nonce=long_nonce))
    with pytest.raises(DecodeError, match=r"^type: longer than 128 characters \(129\)$"):
        decode(envelope(bob, long_type, {}))
    assert decode(envelope(bob, "heartbeat", {}, nonce="n" * 128)).nonce == "n" * 128
    with pytest.raises(DecodeError, match=r"^unknown message type 't{128}'$"):
        decode(envelope(bob, "t" * 128, {}))  # read as a type name, not refused for its length

    guard = ReplayGuard(WINDOW)
    refusal = guard.check("bob", long_nonce, iso(T0), now=T0, mono=T0)
    assert refusal == Refusal(RefusalKind.MALFORMED, "nonce: longer than 128 characters")
    assert len(guard) == 0
    assert guard.check("bob", "n" * 128, iso(T0), now=T0, mono=T0) is None

    frame = build_auth(bob, audience=alice.ss58_address, timestamp=iso(T0), nonce=long_nonce)
    with pytest.raises(AuthError) as caught:
        check_auth(frame, guard=guard, now=T0, mono=M0, audience=alice.ss58_address)
    assert caught.value.refusal.kind is RefusalKind.AUTH_MALFORMED
    assert caught.value.reason == "malformed auth frame: nonce: longer than 128 characters"
    assert len(guard) == 1  # only the 128-character nonce above


def test_900_kb_nonce_is_refused_without_being_stored(alice: Keypair, bob: Keypair) -> None:
    """Scenario 5: a validator-side LinkProtocol refuses a frame with a 900 KB nonce as
    malformed, keeps nothing of it, and answers with a bounded error (no 900 KB echo)."""
    guard = ReplayGuard(WINDOW)
    link = validator_link(alice, bob, guard, handled=frozenset({"prediction"}))
    huge = "x" * 900_000
    raw = envelope(bob, "prediction", prediction_data("p1"), timestamp=iso(T0), nonce=huge)
    assert len(raw) < link.settings.max_message_size  # refused for its nonce, not its size
    verdict = link.receive(raw, now=M0, wall=T0)
    assert isinstance(verdict, Refuse)
    assert verdict.refusal.kind is RefusalKind.MALFORMED
    assert verdict.refusal.text() == "nonce: longer than 128 characters (900000)"
    assert len(guard) == 0 and guard.senders == 0
    assert verdict.nonce is not None and len(verdict.nonce) <= 200
    assert verdict.frame is not None and len(verdict.frame.text) < 2_000
    # the link goes on: a normal frame is delivered
    ok = envelope(bob, "prediction", prediction_data("p2"), timestamp=iso(T0))
    assert isinstance(link.receive(ok, now=M0 + 1, wall=T0 + 1), Deliver)
    assert len(guard) == 1


def test_guard_memory_per_entry() -> None:
    """Scenario 5 (memory, tracemalloc): bytes per guard entry for 16,384 entries of one
    sender (uuid4 hex nonces, timestamps spread over the window) and for 100 senders x
    1,000 entries are under 200; 900 KB nonces cost nothing (refused, not kept)."""
    measured: dict[str, float] = {}
    one_sender = "5" + "x" * 47

    # 16,384 entries of one sender, timestamps over the 300 s window
    frames = list(zip([one_sender] * PER_SENDER, [uuid.uuid4().hex for _ in range(PER_SENDER)],
                      spread(PER_SENDER, WINDOW), strict=True))
    measured["1 sender x 16384, over 300 s"], _ = bytes_per_entry(frames, T0)
    # ... and over the whole acceptance range (-300 s to +300 s), 601 one-second buckets
    wide = [iso(T0 - WINDOW + 2 * WINDOW * i / PER_SENDER) for i in range(PER_SENDER)]
    frames = [(one_sender, uuid.uuid4().hex, ts) for ts in wide]
    measured["1 sender x 16384, over -300..+300 s"], _ = bytes_per_entry(frames, T0)

    # 100 senders x 1,000 entries (about 3.3 frames a second each, honest timestamps)
    senders = random_hotkeys(100)
    stamps = spread(1000, WINDOW)
    frames = [(s, uuid.uuid4().hex, ts) for s in senders for ts in stamps]
    measured["100 senders x 1000, over 300 s"], guard = bytes_per_entry(frames, T0)
    assert guard.senders == 100
    # ... and over the whole acceptance range (-300 s to +300 s)
    stamps = [iso(T0 - WINDOW + 2 * WINDOW * i / 1000) for i in range(1000)]
    frames = [(s, uuid.uuid4().hex, ts) for s in senders for ts in stamps]
    measured["100 senders x 1000, over -300..+300 s"], _ = bytes_per_entry(frames, T0)
    del frames

    # sparse senders: one entry per one-second bucket (the per-bucket overhead, undivided)
    frames = [(s, uuid.uuid4().hex, iso(T0 - 299 + i)) for s in senders for i in range(300)]
    measured["100 senders x 300, one per second"], _ = bytes_per_entry(frames, T0)

    # 900 KB nonces: refused, nothing kept (what tracemalloc shows is its own bookkeeping,
    # a few hundred bytes whatever the count)
    huge = [f"{i:06d}" + "x" * 900_000 for i in range(20)]
    stamp = iso(T0)
    malformed = 0
    with traced() as used:
        for nonce in huge:
            refusal = guard.check(senders[0], nonce, stamp, now=T0, mono=M0)
            malformed += refusal is not None and refusal.kind is RefusalKind.MALFORMED
        del refusal
        extra = used()
    assert malformed == len(huge)
    measured["20 nonces of 900 KB (bytes kept, total)"] = float(extra)
    assert len(guard) == 100 * 1000

    print("\nreplay guard memory (tracemalloc):")
    for label, value in measured.items():
        print(f"  {label:45s} {value:8.1f} B{'' if 'total' in label else '/entry'}")
    assert measured["1 sender x 16384, over 300 s"] < 200
    assert measured["1 sender x 16384, over -300..+300 s"] < 200
    assert measured["100 senders x 1000, over 300 s"] < 200
    # sparse buckets cost more per entry (a bucket list and an expiry-heap item per
    # sender-second): bounded, but above the dense figure
    assert measured["100 senders x 1000, over -300..+300 s"] < 400
    assert measured["100 senders x 300, one per second"] < 500
    assert extra < 4_096  # 18 MB of nonces offered


# ---- 6. one key, two miners ----------------------------------------------------------------------


@pytest.mark.parametrize("ss58_format", [0, 2, 42, 63, 64, 255, 16383])
def test_canonical_hotkey_round_trips_every_format(bob: Keypair, ss58_format: int) -> None:
    """Scenario 6 (unit): every ss58 spelling of Bob's key canonicalises to his format-42
    address, and decodes to the same 32 bytes."""
    key = public_key(bob.ss58_address)
    assert key is not None and key == bob.public_key
    address = encode_address(key, ss58_format)
    assert public_key(address) == key
    assert canonical_hotkey(address) == bob.ss58_address
    assert (address == bob.ss58_address) == (ss58_format == 42)
    assert canonical_hotkey(bob.ss58_address) == bob.ss58_address


def test_canonical_hotkey_known_spellings_and_junk(bob: Keypair) -> None:
    """Scenario 6 (unit): published format-0 and format-2 spellings of //Bob match ours;
    a bad checksum, junk, and over-long strings are not hotkeys (None)."""
    assert format0(bob) == BOB_FORMAT_0
    key = public_key(bob.ss58_address)
    assert key is not None and encode_address(key, 2) == BOB_FORMAT_2
    assert canonical_hotkey(BOB_FORMAT_0) == canonical_hotkey(BOB_FORMAT_2) == bob.ss58_address
    last = bob.ss58_address[-1]
    bad_checksum = bob.ss58_address[:-1] + ("2" if last != "2" else "3")
    for junk in [
        bad_checksum,
        BOB_FORMAT_0[:-1] + ("2" if BOB_FORMAT_0[-1] != "2" else "3"),
        "",
        "hello",
        "0OIl" * 12,  # not base58
        bob.ss58_address[:-2],
        "5" * 70,
        (bob.ss58_address * 2)[:70],
    ]:
        assert canonical_hotkey(junk) is None, junk
        assert public_key(junk) is None, junk
    with pytest.raises(ValueError):
        encode_address(key, 16384)
    with pytest.raises(ValueError):
        encode_address(key[:31])


async def test_one_key_under_two_formats_is_one_miner(alice: Keypair, bob: Keypair, tmp_path: Path) -> None:
    """Scenario 6 (ValidatorNode, loopback): Bob's format-0 auth frame replaces his
    format-42 link (1000), he is listed once under the canonical address, the daily wager
    limit counts both spellings together, envelopes in the other spelling are accepted,
    and what is stored names the format-42 address."""
    fmt0 = format0(bob)
    assert fmt0 != bob.ss58_address and canonical_hotkey(fmt0) == bob.ss58_address
    assert DAILY_WAGER_LIMIT == 1000
    games = upcoming_games(2)
    validator = ValidatorNode(alice, tmp_path / "validator.db")
    try:
        with trio.fail_after(WAIT):
            async with trio.open_nursery() as nursery:
                port = await nursery.start(validator.serve)
                await validator.update_games(games)
                async with dial(port) as ws42:
                    await ws42.send_message(json.dumps(build_auth(bob, audience=alice.ss58_address)))
                    first = await answer(ws42)
                    assert isinstance(first, WelcomeMessage)
                    assert first.data["miner_hotkey"] == bob.ss58_address
                    # 600 under format 42
                    await ws42.send_message(envelope(
                        bob, "prediction", make_prediction("p1", games[0], wager=600.0)
                    ))
                    assert result_of(await answer(ws42)) == ("success", "Prediction accepted")
                    # on the format-42 link, an envelope spelt in format 0: accepted
                    await ws42.send_message(envelope(bob, "heartbeat", {}, sender=fmt0))
                    assert isinstance(await answer(ws42), HeartbeatAckMessage)

                    async with dial(port) as ws0:
                        auth0 = auth_as(bob, fmt0)
                        await ws0.send_message(auth0)
                        second = await answer(ws0)
                        assert isinstance(second, WelcomeMessage) and verify(second)
                        assert second.data["miner_hotkey"] == bob.ss58_address
                        assert second.data["auth_nonce"] == json.loads(auth0)["nonce"]
                        # one miner: the older link is replaced
                        assert await expect_close(ws42) == (1000, "New connection established")
                        assert validator.connected_hotkeys == [bob.ss58_address]
                        # 600 under format 42 already; 600 more under format 0 is over the limit
                        await ws0.send_message(envelope(
                            bob, "prediction", make_prediction("p2", games[1], wager=600.0), sender=fmt0
                        ))
                        assert result_of(await answer(ws0)) == ("error", DAILY_LIMIT)
                        # on the format-0 link, an envelope spelt in format 42: accepted, up to the limit
                        await ws0.send_message(envelope(
                            bob, "prediction", make_prediction("p3", games[1], wager=400.0)
                        ))
                        assert result_of(await answer(ws0)) == ("success", "Prediction accepted")
                        stats = validator.stats()
                        assert "wrong sender" not in stats["rejections"]
                        assert stats["connections_total"] == 2
                        # one share of the replay guard, under the canonical name
                        assert validator.guard.held_by(fmt0) == 0
                        assert validator.guard.held_by(bob.ss58_address) == 6  # 2 auth, 4 envelopes
                nursery.cancel_scope.cancel()
        stored = await validator.db.run(
            lambda: sorted(tuple(r) for r in validator.store.db.execute(
                "SELECT prediction_id, miner_hotkey, wager FROM predictions"))
        )
        assert stored == [("p1", bob.ss58_address, 600.0), ("p3", bob.ss58_address, 400.0)]
        refused_rows = await validator.db.run(
            lambda: [tuple(r) for r in validator.store.db.execute(
                "SELECT prediction_id, miner_hotkey, message FROM rejections")]
        )
        assert refused_rows == [("p2", bob.ss58_address, DAILY_LIMIT)]
        assert await validator.db.run(validator.store.per_miner) == [(bob.ss58_address, 2, 1000.0)]
    finally:
        validator.close()


@pytest.mark.parametrize("listed_as", ["format 0", "format 42"])
@pytest.mark.parametrize("shape", ["list", "metagraph"])
async def test_allow_list_in_one_format_admits_the_other(
    alice: Keypair, bob: Keypair, charlie: Keypair, listed_as: str, shape: str, autojump_clock: Any
) -> None:
    """Scenario 6: an allow list or metagraph written in format 0 admits Bob's format-42
    auth frame, and one written in format 42 admits his format-0 frame; refreshing with
    the other spelling keeps his link; others stay out."""
    fmt0 = format0(bob)
    listed, other = (fmt0, bob.ss58_address) if listed_as == "format 0" else (bob.ss58_address, fmt0)
    hotkeys = [listed]
    metagraph: Any = hotkeys if shape == "list" else SimpleNamespace(hotkeys=hotkeys)
    validator = ValidatorWebSocketManager(alice, metagraph)
    assert validator.is_registered(fmt0) and validator.is_registered(bob.ss58_address)
    assert not validator.is_registered(charlie.ss58_address)
    async with raw_client(validator) as ws:
        await ws.send_message(auth_as(bob, other, audience=alice.ss58_address))
        welcome = decode(await ws.get_message())
        assert isinstance(welcome, WelcomeMessage)
        assert welcome.data["miner_hotkey"] == bob.ss58_address
        assert validator.connected_hotkeys == [bob.ss58_address]
        # a refresh listing the other spelling drops nobody
        assert validator.refresh_metagraph([other]) == []
        await ws.send_message(envelope(bob, "heartbeat", {}, sender=other))
        assert isinstance(decode(await ws.get_message()), HeartbeatAckMessage)
        # a refresh without Bob ends his link, under his canonical name
        assert validator.refresh_metagraph([charlie.ss58_address]) == [bob.ss58_address]
        assert await expect_close(ws) == (1008, "hotkey deregistered")
    await wait_for(lambda: validator.connected_hotkeys == [])
    reply, code, _ = await refused(validator, json.dumps(build_auth(bob)))
    assert (reply["message"], code) == ("hotkey not registered", 1008)
