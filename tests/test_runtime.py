"""The Trio runtime: ValidatorWebSocketManager, MinerWebSocketManager and their connections.

Timing cases (heartbeats, timeouts, backoff, slow consumers, shutdown) run over
in-memory stream pairs under trio's autojump clock: no real sleeps. Real
loopback sockets are used only where the network itself is under test.

The replay guard and message timestamps use wall-clock ``time.time()`` while
connection timing uses ``trio.current_time()`` (the mock clock): intended.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import ssl
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

import orjson
import pytest
import trio
import trio.testing
import trio_websocket
import trustme
from bittensor_wallet import Keypair as WalletKeypair
from trio_websocket import ConnectionClosed, ConnectionRejected, WebSocketConnection

from bettensor_ws import (
    ConfirmationMessage,
    Connection,
    ErrorMessage,
    GameUpdateMessage,
    HeartbeatAckMessage,
    HeartbeatMessage,
    MinerWebSocketManager,
    PredictionMessage,
    ValidatorWebSocketManager,
    WebSocketMessage,
    WelcomeMessage,
    build_auth,
    decode,
    encode,
    sign,
    verify,
)
from bettensor_ws.link.outbound import Frame, OutboundQueue
from bettensor_ws.protocol.backoff import Backoff
from bettensor_ws.protocol.signing import sign_dict
from tests.helpers import bare_refusal, count_tasks, prediction_data

Keypair = Any  # bittensor_wallet.Keypair (fixtures alice, bob, charlie)


@pytest.fixture(scope="module")
def dave() -> Keypair:
    return WalletKeypair.create_from_uri("//Dave")


# ---- helpers ---------------------------------------------------------------------------------


@asynccontextmanager
async def raw_client(
    validator: ValidatorWebSocketManager,
    *,
    path: str = "/ws",
    lockstep: bool = False,
    queue: int = 64,
    server_nursery: trio.Nursery | None = None,
) -> AsyncIterator[WebSocketConnection]:
    """A bare trio-websocket client on one end of an in-memory pair, the validator on the other.

    Leaving the block closes the client and waits for the validator's side to end
    (unless it runs in ``server_nursery``).
    """
    async with trio.open_nursery() as nursery:
        pair = trio.testing.lockstep_stream_pair if lockstep else trio.testing.memory_stream_pair
        client_stream, server_stream = pair()
        (server_nursery or nursery).start_soon(validator.handle_stream, server_stream)
        async with trio.open_nursery() as client_nursery:
            ws = await trio_websocket.wrap_client_stream(
                client_nursery,
                client_stream,  # type: ignore[arg-type]  # annotated for sockets; any trio Stream works
                "localhost",
                path,
                message_queue_size=queue,
            )
            try:
                yield ws
            finally:
                with trio.CancelScope(shield=True), trio.move_on_after(5):
                    await ws.aclose()
                # trio-websocket's reader can stay blocked on a full queue nobody reads
                client_nursery.cancel_scope.cancel()


async def authenticate(ws: WebSocketConnection, keypair: Keypair) -> WelcomeMessage:
    await ws.send_message(orjson.dumps(build_auth(keypair)).decode())
    welcome = decode(await ws.get_message())
    assert isinstance(welcome, WelcomeMessage)
    return welcome


def signed(message: WebSocketMessage, keypair: Keypair) -> str:
    return encode(sign(message, keypair))


def prediction(keypair: Keypair, prediction_id: str = "p1") -> PredictionMessage:
    return PredictionMessage(
        sender=keypair.ss58_address,
        data=prediction_data(prediction_id),
    )


def game_update(n: int) -> GameUpdateMessage:
    return GameUpdateMessage(sender="", data={"games": [], "n": n})


async def next_message(ws: WebSocketConnection) -> WebSocketMessage:
    return decode(await ws.get_message())


async def expect_close(ws: WebSocketConnection) -> tuple[int, str | None]:
    """Drain until the peer closes; the close code and reason it gave."""
    with pytest.raises(ConnectionClosed) as caught:
        while True:
            await ws.get_message()
    reason = caught.value.reason
    assert reason is not None
    return reason.code, reason.reason


def iso(offset_seconds: float) -> str:
    return (datetime.now(UTC) + timedelta(seconds=offset_seconds)).isoformat()


class Recorder:
    """A prediction handler that records what ran and confirms it."""

    def __init__(self) -> None:
        self.seen: list[PredictionMessage] = []
        self.hotkeys: list[str] = []

    async def __call__(self, websocket: Any, message: WebSocketMessage) -> None:
        assert isinstance(message, PredictionMessage)
        self.seen.append(message)
        self.hotkeys.append(websocket.hotkey)
        await websocket.send_json(
            {
                "type": "confirmation",
                "status": "success",
                "prediction_id": message.prediction.prediction_id,
                "message": "ok",
            }
        )


class Net:
    """An in-memory network: each dial starts ``handle_stream`` of the validator at that URL.

    ``down`` URLs refuse (OSError); ``hang`` URLs never answer (the miner's connect
    timeout has to fire). Dial times are recorded per URL.
    """

    def __init__(self) -> None:
        self.routes: dict[str, tuple[ValidatorWebSocketManager, trio.Nursery]] = {}
        self.down: set[str] = set()
        self.hang: set[str] = set()
        self.dials: defaultdict[str, list[float]] = defaultdict(list)

    def attach(self, url: str, validator: ValidatorWebSocketManager, nursery: trio.Nursery) -> None:
        self.routes[url] = (validator, nursery)
        self.down.discard(url)

    async def open(self, url: str) -> trio.abc.Stream:
        self.dials[url].append(trio.current_time())
        if url in self.hang:
            await trio.sleep_forever()
        await trio.lowlevel.checkpoint()
        if url in self.down or url not in self.routes:
            raise OSError(f"connection refused: {url}")
        validator, nursery = self.routes[url]
        client, server = trio.testing.memory_stream_pair()
        nursery.start_soon(validator.handle_stream, server)
        return client


async def wait_for(predicate: Callable[[], bool], step: float = 0.01) -> None:
    """Poll for state that has no event of its own (under the mock clock, steps cost no real time)."""
    while not predicate():  # noqa: ASYNC110
        await trio.sleep(step)


# ---- handshake -------------------------------------------------------------------------------


async def test_welcome_is_signed_by_the_validator(alice: Keypair, bob: Keypair, autojump_clock: Any) -> None:
    validator = ValidatorWebSocketManager(alice)
    async with raw_client(validator) as ws:
        welcome = await authenticate(ws, bob)
        assert welcome.sender == alice.ss58_address
        assert verify(welcome)
        assert welcome.data == {
            "message": "Connection established",
            "status": "success",
            "miner_hotkey": bob.ss58_address,
            "auth_nonce": welcome.data["auth_nonce"],
            "max_message_size": 1 << 20,
            "max_prediction_bytes": 4096,
        }
        assert validator.connected_hotkeys == [bob.ss58_address]
        conn = validator.connection(bob.ss58_address)
        assert isinstance(conn, Connection) and conn.hotkey == bob.ss58_address
    assert validator.connected_hotkeys == []
    assert validator.stats()["connections_total"] == 1
    assert validator.stats()["frames_out"]["welcome"] == 1


async def refused(validator: ValidatorWebSocketManager, first: str | bytes) -> tuple[Any, int, str | None]:
    """Send ``first`` as the auth frame; the validator's answer and its close code and reason."""
    async with raw_client(validator) as ws:
        await ws.send_message(first)
        reply = bare_refusal(await ws.get_message(), validator.hotkey)
        code, reason = await expect_close(ws)
    return reply, code, reason


def _auth_not_json(bob: Keypair) -> str:
    return "hello, validator"


def _auth_missing_fields(bob: Keypair) -> str:
    return json.dumps({"hotkey": bob.ss58_address})


def _auth_not_an_object(bob: Keypair) -> str:
    return json.dumps([build_auth(bob)])


def _auth_bad_timestamp(bob: Keypair) -> str:
    return json.dumps(build_auth(bob, timestamp="yesterday"))


def _auth_tampered(bob: Keypair) -> str:
    return json.dumps({**build_auth(bob), "nonce": "not-the-signed-nonce"})


def _auth_signed_by_other(bob: Keypair) -> str:
    other = WalletKeypair.create_from_uri("//Eve")
    auth = build_auth(other)
    return json.dumps({**auth, "hotkey": bob.ss58_address})


def _auth_stale(bob: Keypair) -> str:
    return json.dumps(build_auth(bob, timestamp=iso(-1000)))


def _auth_future(bob: Keypair) -> str:
    return json.dumps(build_auth(bob, timestamp=iso(+1000)))


@pytest.mark.parametrize(
    ("make_frame", "expected"),
    [
        (_auth_not_json, "malformed auth frame: invalid JSON"),
        (_auth_missing_fields, "malformed auth frame: needs string fields hotkey, timestamp, nonce, signature"),
        (_auth_not_an_object, "malformed auth frame: needs string fields hotkey, timestamp, nonce, signature"),
        (_auth_bad_timestamp, "malformed auth frame: timestamp is not ISO-8601"),
        (_auth_tampered, "bad signature"),
        (_auth_signed_by_other, "bad signature"),
        (_auth_stale, "stale timestamp (1000s old)"),
        (_auth_future, "future timestamp (1000s ahead)"),
    ],
    ids=["not-json", "missing-fields", "not-an-object", "bad-timestamp", "tampered",
         "signed-by-other", "stale", "future"],
)
async def test_bad_auth_frame_gets_bare_error_and_1008(
    alice: Keypair, bob: Keypair, make_frame: Callable[[Keypair], str], expected: str, autojump_clock: Any
) -> None:
    validator = ValidatorWebSocketManager(alice)
    reply, code, reason = await refused(validator, make_frame(bob))
    assert set(reply) == {"status", "message"}
    assert reply["status"] == "error"
    if expected.startswith(("stale", "future")):
        # whole seconds of wall-clock time: allow the test's own second to tick
        kind = expected.split(" (")[0]
        match = re.fullmatch(re.escape(kind) + r" \((\d+)s (old|ahead)\)", reply["message"])
        assert match is not None and abs(int(match.group(1)) - 1000) <= 1
    else:
        assert reply["message"].startswith(expected)
    assert code == 1008
    assert reason == reply["message"][:120]
    assert validator.connected_hotkeys == []
    assert validator.stats()["connections_total"] == 0
    assert sum(validator.stats()["rejections"].values()) == 1


async def test_auth_frame_in_binary_is_malformed(alice: Keypair, bob: Keypair, autojump_clock: Any) -> None:
    validator = ValidatorWebSocketManager(alice)
    reply, code, _ = await refused(validator, b"\xff\x00")
    assert reply["status"] == "error" and reply["message"].startswith("malformed auth frame")
    assert code == 1008


async def test_replayed_auth_nonce_is_refused(alice: Keypair, bob: Keypair, autojump_clock: Any) -> None:
    validator = ValidatorWebSocketManager(alice)
    auth = json.dumps(build_auth(bob))
    async with raw_client(validator) as ws:
        await ws.send_message(auth)
        assert isinstance(await next_message(ws), WelcomeMessage)
    reply, code, reason = await refused(validator, auth)
    assert reply == {"status": "error", "message": "replayed nonce"}
    assert (code, reason) == (1008, "replayed nonce")
    assert validator.stats()["rejections"] == {"replayed nonce": 1}


@pytest.mark.parametrize("shape", ["list", "object"])
async def test_unregistered_hotkey_is_refused(
    alice: Keypair, bob: Keypair, charlie: Keypair, shape: str, autojump_clock: Any
) -> None:
    hotkeys = [charlie.ss58_address]
    metagraph: Any = hotkeys if shape == "list" else SimpleNamespace(hotkeys=hotkeys)
    validator = ValidatorWebSocketManager(alice, metagraph)
    reply, code, reason = await refused(validator, json.dumps(build_auth(bob)))
    assert reply == {"status": "error", "message": "hotkey not registered"}
    assert (code, reason) == (1008, "hotkey not registered")
    # the registered one is let in, through the same metagraph
    async with raw_client(validator) as ws:
        welcome = await authenticate(ws, charlie)
        assert welcome.sender == alice.ss58_address


async def test_auth_timeout(alice: Keypair, bob: Keypair, autojump_clock: Any) -> None:
    validator = ValidatorWebSocketManager(alice, auth_timeout=5.0)
    async with raw_client(validator) as ws:
        start = trio.current_time()
        reply = bare_refusal(await ws.get_message(), alice.ss58_address)
        assert 5.0 <= trio.current_time() - start <= 5.5  # auth_timeout plus up to 10% jitter
        assert reply == {"status": "error", "message": "auth timeout"}
        assert await expect_close(ws) == (1008, "auth timeout")
    assert validator.stats()["rejections"] == {"auth timeout": 1}


async def rejected_upgrade(
    validator: ValidatorWebSocketManager, path: str, server_nursery: trio.Nursery | None = None
) -> ConnectionRejected:
    """Ask for ``path``; the rejection trio-websocket raises (from its reader task)."""
    rejections: list[ConnectionRejected] = []
    try:
        async with raw_client(validator, path=path, server_nursery=server_nursery):
            pass  # pragma: no cover
    except* ConnectionRejected as group:
        rejections.extend(e for e in _leaves(group) if isinstance(e, ConnectionRejected))
    assert len(rejections) == 1
    return rejections[0]


def _leaves(group: BaseExceptionGroup[Any]) -> list[BaseException]:
    out: list[BaseException] = []
    for exc in group.exceptions:
        out.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return out


async def test_upgrade_to_another_path_is_refused_in_memory(alice: Keypair, autojump_clock: Any) -> None:
    validator = ValidatorWebSocketManager(alice)
    rejection = await rejected_upgrade(validator, "/other")
    assert rejection.status_code == 404
    assert rejection.body == b"not found: the endpoint is /ws\n"


async def test_newer_connection_replaces_older(alice: Keypair, bob: Keypair, autojump_clock: Any) -> None:
    validator = ValidatorWebSocketManager(alice)
    async with raw_client(validator) as old:
        await authenticate(old, bob)
        old_conn = validator.connection(bob.ss58_address)
        async with raw_client(validator) as new:
            await authenticate(new, bob)
            assert await expect_close(old) == (1000, "New connection established")
            assert old_conn is not None and old_conn.close_code == 1000
            new_conn = validator.connection(bob.ss58_address)
            assert new_conn is not None and new_conn is not old_conn
            assert validator.connected_hotkeys == [bob.ss58_address]
            # the newer one still serves
            await new.send_message(signed(HeartbeatMessage(sender="", data={}), bob))
            assert isinstance(await next_message(new), HeartbeatAckMessage)
        assert validator.connected_hotkeys == []
    assert validator.stats()["connections_total"] == 2


async def test_refresh_metagraph_closes_deregistered(
    alice: Keypair, bob: Keypair, charlie: Keypair, autojump_clock: Any
) -> None:
    validator = ValidatorWebSocketManager(alice, SimpleNamespace(hotkeys=[bob.ss58_address, charlie.ss58_address]))
    async with raw_client(validator) as ws_bob, raw_client(validator) as ws_charlie:
        await authenticate(ws_bob, bob)
        await authenticate(ws_charlie, charlie)
        dropped = validator.refresh_metagraph(SimpleNamespace(hotkeys=[charlie.ss58_address]))
        assert dropped == [bob.ss58_address]
        assert await expect_close(ws_bob) == (1008, "hotkey deregistered")
        await wait_for(lambda: validator.connected_hotkeys == [charlie.ss58_address])
        await ws_charlie.send_message(signed(HeartbeatMessage(sender="", data={}), charlie))
        assert isinstance(await next_message(ws_charlie), HeartbeatAckMessage)
        # bob can no longer come back
        reply, code, _ = await refused(validator, json.dumps(build_auth(bob)))
        assert (reply["message"], code) == ("hotkey not registered", 1008)


# ---- per-frame checks ------------------------------------------------------------------------


def _frame_not_json(bob: Keypair, charlie: Keypair) -> str | bytes:
    return "{not json"


def _frame_unknown_type(bob: Keypair, charlie: Keypair) -> str | bytes:
    return json.dumps({"type": "nope", "sender": bob.ss58_address, "data": {}, "timestamp": iso(0),
                       "nonce": "n", "signature": "00"})


def _frame_sender_mismatch(bob: Keypair, charlie: Keypair) -> str | bytes:
    return signed(prediction(charlie), charlie)


def _frame_bad_signature(bob: Keypair, charlie: Keypair) -> str | bytes:
    envelope = sign(prediction(bob), bob).to_dict()
    envelope["data"]["wager"] = 1000.0
    return json.dumps(envelope)


def _frame_unsigned(bob: Keypair, charlie: Keypair) -> str | bytes:
    envelope = prediction(bob).to_dict()
    return json.dumps(envelope)


def _frame_stale(bob: Keypair, charlie: Keypair) -> str | bytes:
    envelope = prediction(bob).to_dict()
    envelope["timestamp"] = iso(-1000)
    return json.dumps(sign_dict(envelope, bob))


def _frame_binary(bob: Keypair, charlie: Keypair) -> str | bytes:
    return signed(prediction(bob), bob).encode()


@pytest.mark.parametrize(
    ("make_frame", "expected"),
    [
        (_frame_not_json, "invalid JSON"),
        (_frame_unknown_type, "unknown message type 'nope'"),
        (_frame_sender_mismatch, "sender does not match the authenticated hotkey"),
        (_frame_bad_signature, "bad signature"),
        (_frame_unsigned, "bad signature"),
        (_frame_stale, "stale timestamp ("),
        (_frame_binary, "binary frames are not supported; send JSON text"),
    ],
    ids=["not-json", "unknown-type", "sender-mismatch", "bad-signature", "unsigned", "stale", "binary"],
)
async def test_refused_frame_is_answered_never_dispatched_and_link_stays_open(
    alice: Keypair, bob: Keypair, charlie: Keypair,
    make_frame: Callable[[Keypair, Keypair], str | bytes], expected: str, autojump_clock: Any,
) -> None:
    validator = ValidatorWebSocketManager(alice)
    handler = Recorder()
    validator.register_handler("prediction", handler)
    async with raw_client(validator) as ws:
        await authenticate(ws, bob)
        await ws.send_message(make_frame(bob, charlie))
        error = await next_message(ws)
        assert isinstance(error, ErrorMessage)
        assert error.message.startswith(expected)
        assert error.sender == alice.ss58_address and verify(error)
        assert handler.seen == []
        # the connection is still open and serving
        await ws.send_message(signed(prediction(bob, "p2"), bob))
        reply = await next_message(ws)
        assert isinstance(reply, ConfirmationMessage)
        assert reply.confirmation.prediction_id == "p2"
        assert [m.prediction.prediction_id for m in handler.seen] == ["p2"]
        assert handler.hotkeys == [bob.ss58_address]
    assert sum(validator.stats()["rejections"].values()) == 1


async def test_replayed_frame_is_refused(alice: Keypair, bob: Keypair, autojump_clock: Any) -> None:
    validator = ValidatorWebSocketManager(alice)
    handler = Recorder()
    validator.register_handler("prediction", handler)
    async with raw_client(validator) as ws:
        await authenticate(ws, bob)
        text = signed(prediction(bob), bob)
        await ws.send_message(text)
        assert isinstance(await next_message(ws), ConfirmationMessage)
        await ws.send_message(text)
        error = await next_message(ws)
        assert isinstance(error, ErrorMessage) and error.message == "replayed nonce"
    assert len(handler.seen) == 1
    assert validator.stats()["rejections"] == {"replayed nonce": 1}


async def test_unhandled_type_is_named_in_an_error(alice: Keypair, bob: Keypair, autojump_clock: Any) -> None:
    validator = ValidatorWebSocketManager(alice)
    async with raw_client(validator) as ws:
        await authenticate(ws, bob)
        await ws.send_message(signed(prediction(bob), bob))
        error = await next_message(ws)
        assert isinstance(error, ErrorMessage)
        assert error.message == "No handler registered for message type 'prediction'"


async def test_rate_limited_then_flood_closed(alice: Keypair, bob: Keypair, autojump_clock: Any) -> None:
    """Over its rate a peer is slowed (backpressure), not refused: nothing is lost. A peer
    that keeps pushing past its strikes is closed 1008 "rate limit exceeded"."""
    validator = ValidatorWebSocketManager(alice, rate_limit=1.0, rate_burst=3)
    handler = Recorder()
    validator.register_handler("prediction", handler)
    async with raw_client(validator) as ws:
        await authenticate(ws, bob)
        # a burst of 3 goes at once, the 4th a token (a second) later: all confirmed
        start = trio.current_time()
        for i in range(4):
            await ws.send_message(signed(prediction(bob, f"p{i}"), bob))
        answers = [await next_message(ws) for _ in range(4)]
        assert [a.type for a in answers] == ["confirmation"] * 4
        assert 1.0 <= trio.current_time() - start < 1.5
        assert len(handler.seen) == 4
        # a peer that keeps the reader paced for flood_after (10 s) is closed
        for i in range(40):
            await ws.send_message(signed(prediction(bob, f"f{i}"), bob))
        confirmed = 0
        with pytest.raises(ConnectionClosed) as caught:
            while True:
                assert isinstance(await next_message(ws), ConfirmationMessage)
                confirmed += 1
        assert caught.value.reason is not None
        assert (caught.value.reason.code, caught.value.reason.reason) == (1008, "rate limit exceeded")
        assert 9 <= confirmed <= 12  # one a second for flood_after (10 s)
    assert validator.stats()["rejections"] == {"flooding": 1}


async def test_oversized_frame_closes_1009(alice: Keypair, bob: Keypair, autojump_clock: Any) -> None:
    validator = ValidatorWebSocketManager(alice, max_message_size=4096)
    handler = Recorder()
    validator.register_handler("prediction", handler)
    async with raw_client(validator) as ws:
        await authenticate(ws, bob)
        big = prediction(bob)
        big.data["model_name"] = "x" * 5000
        await ws.send_message(signed(big, bob))
        code, _ = await expect_close(ws)
        assert code == 1009
    assert handler.seen == []
    assert validator.connected_hotkeys == []


async def test_handler_error_answers_and_connection_keeps_serving(
    alice: Keypair, bob: Keypair, autojump_clock: Any
) -> None:
    validator = ValidatorWebSocketManager(alice)
    calls: list[str] = []

    async def handler(websocket: Any, message: WebSocketMessage) -> None:
        assert isinstance(message, PredictionMessage)
        calls.append(message.prediction.prediction_id)
        if message.prediction.prediction_id == "boom":
            raise RuntimeError("handler bug")
        await websocket.send_json({"type": "confirmation", "status": "success",
                                   "prediction_id": message.prediction.prediction_id, "message": "ok"})

    validator.register_handler("prediction", handler)
    async with raw_client(validator) as ws:
        await authenticate(ws, bob)
        await ws.send_message(signed(prediction(bob, "boom"), bob))
        reply = await next_message(ws)
        assert isinstance(reply, ConfirmationMessage)
        assert reply.data == {
            "status": "error",
            "message": "Internal server error",
            "prediction_id": "boom",
            "miner_hotkey": bob.ss58_address,
        }
        await ws.send_message(signed(prediction(bob, "fine"), bob))
        reply = await next_message(ws)
        assert isinstance(reply, ConfirmationMessage) and reply.confirmation.status == "success"
        assert validator.connected_hotkeys == [bob.ss58_address]
    assert calls == ["boom", "fine"]


@pytest.mark.parametrize("concurrency", [1, 3])
async def test_handler_concurrency(alice: Keypair, bob: Keypair, concurrency: int, autojump_clock: Any) -> None:
    validator = ValidatorWebSocketManager(alice, handler_concurrency=concurrency)
    active = 0
    peak = 0
    started: list[str] = []

    async def slow_handler(websocket: Any, message: WebSocketMessage) -> None:
        nonlocal active, peak
        assert isinstance(message, PredictionMessage)
        started.append(message.prediction.prediction_id)
        active += 1
        peak = max(peak, active)
        await trio.sleep(1.0)
        active -= 1
        await websocket.send_json({"type": "confirmation", "status": "success",
                                   "prediction_id": message.prediction.prediction_id, "message": ""})

    validator.register_handler("prediction", slow_handler)
    async with raw_client(validator) as ws:
        await authenticate(ws, bob)
        start = trio.current_time()
        ids = [f"p{i}" for i in range(6)]
        for pid in ids:
            await ws.send_message(signed(prediction(bob, pid), bob))
        replies = [await next_message(ws) for _ in ids]
        elapsed = trio.current_time() - start
    assert peak == concurrency
    assert elapsed == pytest.approx(6 / concurrency)
    assert sorted(r.data["prediction_id"] for r in replies) == ids
    if concurrency == 1:
        assert started == ids
        assert [r.data["prediction_id"] for r in replies] == ids


# ---- heartbeats and timeouts -----------------------------------------------------------------


async def test_validator_heartbeats_and_acks(alice: Keypair, bob: Keypair, autojump_clock: Any) -> None:
    validator = ValidatorWebSocketManager(alice, heartbeat_interval=10.0, connection_timeout=1000.0)
    async with raw_client(validator) as ws:
        await authenticate(ws, bob)
        start = trio.current_time()
        beat = await next_message(ws)
        assert trio.current_time() - start == pytest.approx(10.0)
        assert isinstance(beat, HeartbeatMessage)
        assert beat.sender == alice.ss58_address and verify(beat)
        # our heartbeat is acknowledged, signed
        await ws.send_message(signed(HeartbeatMessage(sender="", data={}), bob))
        ack = await next_message(ws)
        assert isinstance(ack, HeartbeatAckMessage)
        assert ack.sender == alice.ss58_address and verify(ack)
        # an ack from us is consumed silently
        await ws.send_message(signed(HeartbeatAckMessage(sender="", data={}), bob))
        beat = await next_message(ws)
        assert isinstance(beat, HeartbeatMessage)
        assert trio.current_time() - start == pytest.approx(20.0)
    stats = validator.stats()
    assert stats["frames_in"] == {"heartbeat": 1, "heartbeat_ack": 1}
    assert stats["frames_out"]["heartbeat_ack"] == 1
    assert stats["frames_out"]["heartbeat"] == 2


async def test_dead_peer_closed_1011_after_connection_timeout(
    alice: Keypair, bob: Keypair, autojump_clock: Any
) -> None:
    validator = ValidatorWebSocketManager(alice, heartbeat_interval=10.0, connection_timeout=30.0)
    async with raw_client(validator) as ws:
        await authenticate(ws, bob)
        start = trio.current_time()
        beats = 0
        with pytest.raises(ConnectionClosed) as caught:
            while True:
                assert isinstance(await next_message(ws), HeartbeatMessage)
                beats += 1
        assert trio.current_time() - start == pytest.approx(30.0)
        assert caught.value.reason is not None
        assert (caught.value.reason.code, caught.value.reason.reason) == (1011, "connection timeout")
        assert beats == 2  # at 10 and 20; the one due at 30 loses to the timeout
    assert validator.stats()["rejections"] == {"connection timeout": 1}
    assert validator.connected_hotkeys == []


async def test_any_frame_keeps_a_peer_alive(alice: Keypair, bob: Keypair, autojump_clock: Any) -> None:
    validator = ValidatorWebSocketManager(alice, heartbeat_interval=1000.0, connection_timeout=30.0)
    async with raw_client(validator) as ws:
        await authenticate(ws, bob)
        start = trio.current_time()
        for _ in range(5):
            await trio.sleep(20.0)
            await ws.send_message(signed(HeartbeatMessage(sender="", data={}), bob))
            assert isinstance(await next_message(ws), HeartbeatAckMessage)
        # 100 s in, never 30 s silent: still connected; then silence ends it 30 s after the last frame
        assert validator.connected_hotkeys == [bob.ss58_address]
        assert await expect_close(ws) == (1011, "connection timeout")
        assert trio.current_time() - start == pytest.approx(130.0)


async def test_heartbeats_keep_an_idle_link_alive_both_ways(
    alice: Keypair, bob: Keypair, autojump_clock: Any
) -> None:
    net = Net()
    url = "ws://validator/ws"
    validator = ValidatorWebSocketManager(alice, heartbeat_interval=10.0, connection_timeout=25.0)
    miner = MinerWebSocketManager(bob, [(alice.ss58_address, url)], heartbeat_interval=10.0,
                                  connection_timeout=25.0, stream_opener=net.open)
    async with trio.open_nursery() as nursery:
        net.attach(url, validator, nursery)
        await nursery.start(miner.run)
        await miner.wait_connected(alice.ss58_address)
        link = miner.connection(alice.ss58_address)
        await trio.sleep(200.0)
        assert miner.connection(alice.ss58_address) is link
        assert link is not None and not link.closed.is_set()
        assert len(net.dials[url]) == 1
        v_stats, m_stats = validator.stats(), miner.stats()
        for stats in (v_stats, m_stats):
            assert stats["frames_in"]["heartbeat"] >= 19
            assert stats["frames_in"]["heartbeat_ack"] >= 19
            assert stats["rejections"] == {}
        assert m_stats["reconnects"] == 0
        nursery.cancel_scope.cancel()


async def test_miner_detects_a_silent_validator_and_reconnects(
    alice: Keypair, bob: Keypair, autojump_clock: Any
) -> None:
    net = Net()
    url = "ws://validator/ws"
    # the validator never heartbeats; the miner hears nothing and gives up after 30 s
    validator = ValidatorWebSocketManager(alice, heartbeat_interval=1e6, connection_timeout=1e6)
    miner = MinerWebSocketManager(bob, [(alice.ss58_address, url)], heartbeat_interval=1e6,
                                  connection_timeout=30.0, reconnect_base_interval=1.0,
                                  stream_opener=net.open)
    async with trio.open_nursery() as nursery:
        net.attach(url, validator, nursery)
        await nursery.start(miner.run)
        await miner.wait_connected()
        first = miner.connection(alice.ss58_address)
        assert first is not None
        start = trio.current_time()
        await first.closed.wait()
        assert trio.current_time() - start == pytest.approx(30.0)
        assert (first.close_code, first.close_reason) == (1011, "connection timeout")
        await wait_for(lambda: miner.connection(alice.ss58_address) not in (None, first))
        assert net.dials[url][1] - net.dials[url][0] == pytest.approx(31.0)  # 30 s, then 1 s backoff (reset)
        nursery.cancel_scope.cancel()


# ---- writer: priorities and slow consumers ---------------------------------------------------


def test_outbound_queue_replies_first() -> None:
    async def main() -> list[str]:
        queue = OutboundQueue(4, 2)
        for i in range(2):
            assert queue.put_broadcast_nowait(Frame("game_update", f"b{i}"))
        assert queue.broadcasts_full()
        assert not queue.put_broadcast_nowait(Frame("game_update", "b2"))
        await queue.put_reply(Frame("confirmation", "r0"))
        assert queue.put_reply_nowait(Frame("heartbeat_ack", "r1"))
        assert queue.pending() == 4
        out = []
        for _ in range(4):
            frame = await queue.get()
            assert frame is not None
            out.append(frame.text)
        assert not queue.broadcasts_full()
        queue.close()
        with pytest.raises(trio.ClosedResourceError):
            await queue.put_reply(Frame("x", "y"))
        return out

    assert trio.run(main) == ["r0", "r1", "b0", "b1"]


async def test_replies_go_ahead_of_broadcasts(alice: Keypair, bob: Keypair, autojump_clock: Any) -> None:
    validator = ValidatorWebSocketManager(alice, heartbeat_interval=1e6)
    async with raw_client(validator, lockstep=True, queue=1) as ws:
        await authenticate(ws, bob)
        # the peer stops reading: its client buffers one frame, the validator's writer blocks
        for n in range(8):
            assert await validator.broadcast(game_update(n)) == 1
        await trio.testing.wait_all_tasks_blocked()
        reply = ConfirmationMessage(sender="", data={"status": "success", "prediction_id": "r", "message": ""})
        assert await validator.send_to(bob.ss58_address, reply)
        assert not await validator.send_to("5NotConnected", reply)
        received = []
        for _ in range(9):
            message = await next_message(ws)
            received.append("reply" if message.type == "confirmation" else message.data["n"])
    at = received.index("reply")
    assert at <= 3  # only frames already in flight precede it
    assert received[:at] + received[at + 1:] == list(range(8))


async def test_slow_consumer_is_closed_and_others_see_no_delay(
    alice: Keypair, bob: Keypair, charlie: Keypair, autojump_clock: Any
) -> None:
    validator = ValidatorWebSocketManager(alice, send_timeout=10.0, heartbeat_interval=1e6,
                                          connection_timeout=1e6)
    arrivals: list[tuple[float, int]] = []

    async def read_all(ws: WebSocketConnection) -> None:
        with pytest.raises(ConnectionClosed):
            while True:
                message = await next_message(ws)
                arrivals.append((trio.current_time(), message.data["n"]))

    async with trio.open_nursery() as readers:
        async with raw_client(validator, lockstep=True, queue=1) as slow, raw_client(validator) as fast:
            await authenticate(slow, bob)
            await authenticate(fast, charlie)
            readers.start_soon(read_all, fast)
            slow_conn = validator.connection(bob.ss58_address)
            assert slow_conn is not None
            start = trio.current_time()
            for n in range(300):
                await validator.broadcast(game_update(n))
                assert trio.current_time() == start  # a broadcast never waits
                await trio.testing.wait_all_tasks_blocked()
            # the fast miner has every frame, at once
            assert [n for _, n in arrivals] == list(range(300))
            assert {t for t, _ in arrivals} == {start}
            await slow_conn.closed.wait()
            assert trio.current_time() - start == pytest.approx(10.0)
            assert (slow_conn.close_code, slow_conn.close_reason) == (1008, "slow consumer")
            await wait_for(lambda: validator.connected_hotkeys == [charlie.ss58_address])
            assert validator.stats()["rejections"] == {"slow consumer": 1}
            assert validator.stats()["dropped_broadcasts"] > 0
            # the fast one is unaffected
            sent_at = trio.current_time()
            assert await validator.broadcast(game_update(300)) == 1
            await wait_for(lambda: len(arrivals) == 301)
            assert arrivals[-1] == (sent_at, 300)


# ---- shutdown and task hygiene ---------------------------------------------------------------


async def test_cancelling_the_validator_closes_every_miner_1001_within_a_second(
    alice: Keypair, bob: Keypair, charlie: Keypair, dave: Keypair, autojump_clock: Any
) -> None:
    net = Net()
    url = "ws://validator/ws"
    validator = ValidatorWebSocketManager(alice)
    miners = [
        MinerWebSocketManager(kp, [(alice.ss58_address, url)], stream_opener=net.open)
        for kp in (bob, charlie, dave)
    ]
    async with trio.open_nursery() as outer:
        with trio.CancelScope() as validator_scope:
            async with trio.open_nursery() as server:
                net.attach(url, validator, server)
                for miner in miners:
                    await outer.start(miner.run)
                for miner in miners:
                    await miner.wait_connected(alice.ss58_address)
                links = [miner.connection(alice.ss58_address) for miner in miners]
                assert len(validator.connected_hotkeys) == 3
                net.down.add(url)
                start = trio.current_time()
                validator_scope.cancel()
        assert trio.current_time() - start <= 1.0
        for link in links:
            assert link is not None and link.closed.is_set()
            assert (link.close_code, link.close_reason) == (1001, "Going away")
        for miner in miners:
            await wait_for(lambda m=miner: m.connected_validators == [])  # type: ignore[misc]
        assert validator.connected_hotkeys == []
        outer.cancel_scope.cancel()


async def test_cancelling_the_miner_closes_its_links_1001(alice: Keypair, bob: Keypair, autojump_clock: Any) -> None:
    net = Net()
    url = "ws://validator/ws"
    validator = ValidatorWebSocketManager(alice)
    miner = MinerWebSocketManager(bob, [(alice.ss58_address, url)], stream_opener=net.open)
    async with trio.open_nursery() as server:
        net.attach(url, validator, server)
        with trio.CancelScope() as miner_scope:
            async with trio.open_nursery() as client:
                await client.start(miner.run)
                await miner.wait_connected()
                server_side = validator.connection(bob.ss58_address)
                start = trio.current_time()
                miner_scope.cancel()
        assert trio.current_time() - start <= 1.0
        assert server_side is not None
        await server_side.closed.wait()
        assert (server_side.close_code, server_side.close_reason) == (1001, "Going away")
        await wait_for(lambda: validator.connected_hotkeys == [])
        server.cancel_scope.cancel()


async def test_shutdown_during_the_handshake_says_going_away(
    alice: Keypair, bob: Keypair, autojump_clock: Any
) -> None:
    validator = ValidatorWebSocketManager(alice)
    closes: list[tuple[int, str | None]] = []
    auth_seen = trio.Event()

    async def mute_validator(stream: trio.abc.Stream) -> None:
        async with trio.open_nursery() as nursery:
            request = await trio_websocket.wrap_server_stream(nursery, stream)
            ws = await request.accept()
            await ws.get_message()
            auth_seen.set()
            closes.append(await expect_close(ws))

    async with trio.open_nursery() as outer:
        # validator side: a miner that has upgraded but not yet authenticated
        server_scope = trio.CancelScope()

        async def run_server(*, task_status: trio.TaskStatus[trio.Nursery]) -> None:
            with server_scope:
                async with trio.open_nursery() as server:
                    task_status.started(server)
                    await trio.sleep_forever()

        server = await outer.start(run_server)
        async with raw_client(validator, server_nursery=server) as ws:
            await trio.sleep(1.0)
            server_scope.cancel()
            assert await expect_close(ws) == (1001, "Going away")

        # miner side: a validator that never answers the auth frame
        async def open_stream(url: str) -> trio.abc.Stream:
            client, server_end = trio.testing.memory_stream_pair()
            outer.start_soon(mute_validator, server_end)
            return client

        miner = MinerWebSocketManager(bob, [(alice.ss58_address, "ws://mute/ws")], stream_opener=open_stream)
        miner_scope = trio.CancelScope()

        async def run_miner() -> None:
            with miner_scope:
                await miner.run()

        outer.start_soon(run_miner)
        await auth_seen.wait()
        miner_scope.cancel()
        await wait_for(lambda: bool(closes))
        assert closes == [(1001, "Going away")]


async def test_peer_close_and_abort_paths(alice: Keypair, bob: Keypair, autojump_clock: Any) -> None:
    validator = ValidatorWebSocketManager(alice)
    # a clean close by the peer: its code and reason are recorded
    async with raw_client(validator) as ws:
        await authenticate(ws, bob)
        conn = validator.connection(bob.ss58_address)
        assert conn is not None
        await ws.aclose(4000, "bye")
    assert conn.closed.is_set()
    assert (conn.close_code, conn.close_reason) == (4000, "bye")
    # the transport dropped without a close frame: 1006
    async with trio.open_nursery() as nursery:
        client_stream, server_stream = trio.testing.memory_stream_pair()
        nursery.start_soon(validator.handle_stream, server_stream)
        ws = await trio_websocket.wrap_client_stream(
            nursery, client_stream, "localhost", "/ws"  # type: ignore[arg-type]  # any trio Stream works
        )
        await authenticate(ws, bob)
        conn = validator.connection(bob.ss58_address)
        assert conn is not None
        await client_stream.aclose()
        await conn.closed.wait()
        assert conn.close_code == 1006
    assert validator.connected_hotkeys == []


async def test_no_task_left_after_connections_end(alice: Keypair, bob: Keypair, autojump_clock: Any) -> None:
    validator = ValidatorWebSocketManager(alice, heartbeat_interval=5.0, connection_timeout=12.0)
    validator.register_handler("prediction", Recorder())
    async with trio.open_nursery() as server:  # stays open, like serve()'s nursery
        await trio.testing.wait_all_tasks_blocked()
        baseline = count_tasks()

        # a normal session, closed by the peer
        async with raw_client(validator, server_nursery=server) as ws:
            await authenticate(ws, bob)
            await ws.send_message(signed(prediction(bob), bob))
            await next_message(ws)
            assert count_tasks() > baseline + 3  # reader, writer, heartbeat, transport...
        await wait_for(lambda: validator.connected_hotkeys == [])
        await trio.testing.wait_all_tasks_blocked()
        assert count_tasks() == baseline

        # refused handshake, dead peer, 404, aborted transport
        async with raw_client(validator, server_nursery=server) as ws:
            await ws.send_message("garbage")
            await expect_close(ws)
        async with raw_client(validator, server_nursery=server) as ws:
            await authenticate(ws, bob)
            await expect_close(ws)  # connection timeout
        assert (await rejected_upgrade(validator, "/nope", server)).status_code == 404
        client_stream, server_stream = trio.testing.memory_stream_pair()
        server.start_soon(validator.handle_stream, server_stream)
        await client_stream.send_all(b"GET /ws HTTP/1.1\r\n")
        await client_stream.aclose()
        await trio.sleep(30.0)
        await trio.testing.wait_all_tasks_blocked()
        assert count_tasks() == baseline
        server.cancel_scope.cancel()


async def test_no_task_left_on_the_miner_after_its_link_ends(
    alice: Keypair, bob: Keypair, autojump_clock: Any
) -> None:
    net = Net()
    url = "ws://validator/ws"
    validator = ValidatorWebSocketManager(alice)
    miner = MinerWebSocketManager(bob, [(alice.ss58_address, url)], stream_opener=net.open,
                                  reconnect_base_interval=1000.0, max_reconnect_interval=1000.0)
    async with trio.open_nursery() as outer:
        net.down.add(url)
        await outer.start(miner.run)
        await trio.sleep(1.0)  # first dial refused; the supervisor sleeps in its backoff
        await trio.testing.wait_all_tasks_blocked()
        idle = count_tasks()
        with trio.CancelScope() as validator_scope:
            async with trio.open_nursery() as server:
                net.attach(url, validator, server)
                await miner.wait_connected()
                assert count_tasks() > idle
                validator_scope.cancel()
        await wait_for(lambda: miner.connected_validators == [])
        await trio.testing.wait_all_tasks_blocked()
        assert count_tasks() == idle
        outer.cancel_scope.cancel()


async def test_a_failing_connect_hook_ends_only_that_connection(
    alice: Keypair, bob: Keypair, charlie: Keypair, autojump_clock: Any
) -> None:
    validator = ValidatorWebSocketManager(alice)

    async def hook(conn: Connection) -> None:
        if conn.hotkey == bob.ss58_address:
            raise RuntimeError("hook bug")

    validator.on_connect(hook)
    async with trio.open_nursery() as server:
        async with raw_client(validator, server_nursery=server) as ws:
            await ws.send_message(json.dumps(build_auth(bob)))
            assert await expect_close(ws) == (1011, "Internal error")
        await wait_for(lambda: validator.connected_hotkeys == [])
        async with raw_client(validator, server_nursery=server) as ws:
            await authenticate(ws, charlie)
            await ws.send_message(signed(HeartbeatMessage(sender="", data={}), charlie))
            assert isinstance(await next_message(ws), HeartbeatAckMessage)
        server.cancel_scope.cancel()


# ---- miner -----------------------------------------------------------------------------------


async def test_miner_rejects_welcome_from_wrong_hotkey_and_backs_off(
    alice: Keypair, bob: Keypair, charlie: Keypair, autojump_clock: Any
) -> None:
    net = Net()
    url = "ws://validator/ws"
    validator = ValidatorWebSocketManager(alice)  # but the miner expects charlie there
    base, maximum = 1.0, 8.0
    miner = MinerWebSocketManager(bob, [(charlie.ss58_address, url)], stream_opener=net.open,
                                  reconnect_base_interval=base, max_reconnect_interval=maximum)
    async with trio.open_nursery() as nursery:
        net.attach(url, validator, nursery)
        await nursery.start(miner.run)
        await trio.sleep(120.0)
        assert miner.connected_validators == []
        # the auth frame names charlie: alice refuses it before any Welcome
        assert miner.last_error[charlie.ss58_address] == (
            "validator refused auth: auth frame addressed to another validator"
        )
        dials = net.dials[url]
        gaps = [b - a for a, b in zip(dials, dials[1:], strict=False)]
        assert len(gaps) >= 10
        for n, gap in enumerate(gaps):
            assert base - 1e-9 <= gap <= min(maximum, base * 2**n) + 1e-9, (n, gap)
        assert max(gaps) > 2.0  # it does back off
        assert miner.stats()["reconnects"] >= len(gaps) - 1
        # the validator refused each attempt, as addressed to another
        assert validator.stats()["connections_total"] == 0
        assert validator.stats()["rejections"] == {"wrong audience": len(dials)}
        nursery.cancel_scope.cancel()


async def test_miner_rejects_an_impostor_welcome(alice: Keypair, bob: Keypair, charlie: Keypair,
                                                 autojump_clock: Any) -> None:
    """A fake validator claims charlie's hotkey but cannot sign as charlie."""
    closes: list[tuple[int, str | None]] = []

    async def impostor(stream: trio.abc.Stream) -> None:
        async with trio.open_nursery() as nursery:
            request = await trio_websocket.wrap_server_stream(nursery, stream)
            ws = await request.accept()
            orjson.loads(await ws.get_message())  # the miner's auth
            welcome = sign(WelcomeMessage(sender="", data={"message": "Connection established",
                                                           "status": "success"}), alice)
            welcome.sender = charlie.ss58_address
            await ws.send_message(encode(welcome))
            closes.append(await expect_close(ws))

    async with trio.open_nursery() as nursery:
        async def open_stream(url: str) -> trio.abc.Stream:
            client, server = trio.testing.memory_stream_pair()
            nursery.start_soon(impostor, server)
            return client

        miner = MinerWebSocketManager(bob, [(charlie.ss58_address, "ws://impostor/ws")],
                                      stream_opener=open_stream, reconnect_base_interval=100.0,
                                      max_reconnect_interval=100.0)
        await nursery.start(miner.run)
        await wait_for(lambda: bool(closes))
        assert closes[0] == (1008, "welcome not signed by the expected validator hotkey")
        assert miner.connected_validators == []
        assert miner.last_error[charlie.ss58_address] == "welcome not signed by the expected validator hotkey"
        nursery.cancel_scope.cancel()


async def test_miner_reports_a_refused_auth(alice: Keypair, bob: Keypair, charlie: Keypair,
                                            autojump_clock: Any) -> None:
    net = Net()
    url = "ws://validator/ws"
    validator = ValidatorWebSocketManager(alice, [charlie.ss58_address])
    miner = MinerWebSocketManager(bob, [(alice.ss58_address, url)], stream_opener=net.open)
    async with trio.open_nursery() as nursery:
        net.attach(url, validator, nursery)
        await nursery.start(miner.run)
        await wait_for(lambda: alice.ss58_address in miner.last_error)
        assert miner.last_error[alice.ss58_address] == "validator refused auth: hotkey not registered"
        nursery.cancel_scope.cancel()


async def test_miner_reconnects_after_validator_restart_in_memory(
    alice: Keypair, bob: Keypair, autojump_clock: Any
) -> None:
    net = Net()
    url = "ws://validator/ws"
    miner = MinerWebSocketManager(bob, [(alice.ss58_address, url)], stream_opener=net.open,
                                  reconnect_base_interval=1.0, max_reconnect_interval=10.0,
                                  stable_after=30.0)
    connects: list[float] = []

    async def on_connect(conn: Connection) -> None:
        connects.append(trio.current_time())

    miner.on_connect(on_connect)
    async with trio.open_nursery() as outer:
        with trio.CancelScope() as first_life:
            async with trio.open_nursery() as server:
                net.attach(url, ValidatorWebSocketManager(alice), server)
                await outer.start(miner.run)
                await miner.wait_connected(alice.ss58_address)
                await trio.sleep(100.0)  # a stable link: the backoff resets
                net.down.add(url)
                went_away = trio.current_time()
                first_life.cancel()
        await wait_for(lambda: miner.connected_validators == [])
        await trio.sleep(60.0)  # down for a minute; the miner keeps retrying, backing off
        dials_while_down = [t for t in net.dials[url] if t > went_away]
        assert len(dials_while_down) >= 5
        gaps = [b - a for a, b in zip(dials_while_down, dials_while_down[1:], strict=False)]
        assert dials_while_down[0] - went_away == pytest.approx(1.0)  # reset: exactly the base
        assert all(1.0 - 1e-9 <= g <= 10.0 + 1e-9 for g in gaps)
        async with trio.open_nursery() as server:
            second = ValidatorWebSocketManager(alice)
            net.attach(url, second, server)
            back = trio.current_time()
            await miner.wait_connected(alice.ss58_address)
            assert trio.current_time() - back <= 10.0
            assert second.connected_hotkeys == [bob.ss58_address]
            await wait_for(lambda: len(connects) == 2)
            assert miner.stats()["reconnects"] >= len(dials_while_down)
            server.cancel_scope.cancel()
        outer.cancel_scope.cancel()


async def test_backoff_resets_only_after_a_stable_link(alice: Keypair, bob: Keypair, autojump_clock: Any) -> None:
    net = Net()
    url = "ws://validator/ws"
    validator = ValidatorWebSocketManager(alice)
    miner = MinerWebSocketManager(bob, [(alice.ss58_address, url)], stream_opener=net.open,
                                  reconnect_base_interval=2.0, max_reconnect_interval=60.0,
                                  stable_after=30.0)
    async with trio.open_nursery() as nursery:
        net.attach(url, validator, nursery)
        await nursery.start(miner.run)
        gaps = []
        for held in (100.0, 1.0, 1.0, 1.0):
            await miner.wait_connected()
            await trio.sleep(held)
            conn = validator.connection(bob.ss58_address)
            assert conn is not None
            conn.close(1000, "bye")
            dropped = trio.current_time()
            await wait_for(lambda: miner.connected_validators == [])
            await miner.wait_connected()
            gaps.append(net.dials[url][-1] - dropped)
        assert gaps[0] == pytest.approx(2.0)  # after 100 s up: back to the base
        assert 2.0 <= gaps[1] <= 4.0 + 1e-9
        assert 2.0 <= gaps[2] <= 8.0 + 1e-9
        assert 2.0 <= gaps[3] <= 16.0 + 1e-9
        assert miner.stats()["reconnects"] == 4
        assert miner.stats()["connections_total"] == 5
        nursery.cancel_scope.cancel()


async def test_unreachable_validator_does_not_hold_up_another(
    alice: Keypair, bob: Keypair, charlie: Keypair, dave: Keypair, autojump_clock: Any
) -> None:
    net = Net()
    good, hanging, refusing = "ws://good/ws", "ws://hanging/ws", "ws://refusing/ws"
    net.hang.add(hanging)
    validator = ValidatorWebSocketManager(alice)
    miner = MinerWebSocketManager(
        bob,
        [(charlie.ss58_address, hanging), (dave.ss58_address, refusing), (alice.ss58_address, good)],
        stream_opener=net.open, connect_timeout=10.0,
    )
    async with trio.open_nursery() as nursery:
        net.attach(good, validator, nursery)
        start = trio.current_time()
        await nursery.start(miner.run)
        await miner.wait_connected(alice.ss58_address)
        assert trio.current_time() == start
        assert miner.connected_validators == [alice.ss58_address]
        await trio.sleep(30.0)
        assert miner.last_error[charlie.ss58_address].startswith("TooSlowError"), miner.last_error
        assert miner.last_error[dave.ss58_address].startswith("OSError: connection refused")
        assert miner.connected_validators == [alice.ss58_address]
        assert len(net.dials[refusing]) > len(net.dials[hanging]) >= 2
        nursery.cancel_scope.cancel()


async def test_miner_wait_connected_and_send(alice: Keypair, bob: Keypair, charlie: Keypair,
                                             dave: Keypair, autojump_clock: Any) -> None:
    net = Net()
    v1 = ValidatorWebSocketManager(alice)
    v2 = ValidatorWebSocketManager(charlie)
    r1, r2 = Recorder(), Recorder()
    v1.register_handler("prediction", r1)
    v2.register_handler("prediction", r2)
    confirmations: list[tuple[str, str]] = []

    async def on_confirmation(websocket: Any, message: WebSocketMessage) -> None:
        assert isinstance(message, ConfirmationMessage)
        confirmations.append((websocket.hotkey, message.confirmation.prediction_id or ""))

    miner = MinerWebSocketManager(bob, [(alice.ss58_address, "ws://v1/ws"), (charlie.ss58_address, "ws://v2/ws")],
                                  stream_opener=net.open)
    miner.register_handler("confirmation", on_confirmation)
    async with trio.open_nursery() as nursery:
        net.attach("ws://v1/ws", v1, nursery)
        net.down.add("ws://v2/ws")
        await nursery.start(miner.run)
        await miner.wait_connected()  # any
        assert miner.connected_validators == [alice.ss58_address]
        with trio.move_on_after(5.0) as waited:
            await miner.wait_connected(charlie.ss58_address)
        assert waited.cancelled_caught  # v2 is still down
        net.attach("ws://v2/ws", v2, nursery)
        await miner.wait_connected(charlie.ss58_address)
        assert sorted(miner.connected_validators) == sorted([alice.ss58_address, charlie.ss58_address])

        # to one
        assert await miner.send(prediction(bob, "one"), alice.ss58_address) == [alice.ss58_address]
        assert await miner.send(prediction(bob, "nobody"), dave.ss58_address) == []
        await wait_for(lambda: len(confirmations) == 1)
        assert [m.prediction.prediction_id for m in r1.seen] == ["one"] and r2.seen == []
        assert confirmations == [(alice.ss58_address, "one")]
        # to all; the identity is the authenticated one
        delivered = await miner.send(prediction(bob, "all"))
        assert sorted(delivered) == sorted([alice.ss58_address, charlie.ss58_address])
        await wait_for(lambda: len(confirmations) == 3)
        assert [m.prediction.prediction_id for m in r2.seen] == ["all"]
        assert set(r1.hotkeys + r2.hotkeys) == {bob.ss58_address}
        # a flat dict works too
        assert await miner.send({"type": "prediction", "data": prediction(bob, "flat").data},
                                alice.ss58_address) == [alice.ss58_address]
        await wait_for(lambda: len(confirmations) == 4)
        stats = miner.stats()
        assert stats["connections"] == 2
        assert stats["frames_in"]["confirmation"] == 4
        assert stats["frames_out"]["prediction"] == 4
        assert v1.stats()["frames_in"]["prediction"] == 3
        nursery.cancel_scope.cancel()


async def test_validator_broadcast_and_game_updates_reach_miners(
    alice: Keypair, bob: Keypair, charlie: Keypair, autojump_clock: Any
) -> None:
    net = Net()
    url = "ws://validator/ws"
    validator = ValidatorWebSocketManager(alice)
    got: defaultdict[str, list[list[str]]] = defaultdict(list)

    def handler_for(name: str) -> Any:
        async def on_games(websocket: Any, message: GameUpdateMessage) -> None:
            assert websocket.hotkey == alice.ss58_address
            got[name].append([str(g.game_id) for g in message.games])
        return on_games

    miners = []
    for name, kp in (("bob", bob), ("charlie", charlie)):
        miner = MinerWebSocketManager(kp, [(alice.ss58_address, url)], stream_opener=net.open)
        miner.register_handler("game_update", handler_for(name))
        miners.append(miner)
    game = {"game_id": "g1", "team_a": "A", "team_b": "B", "event_start_date": "2024-01-01T00:00:00+00:00"}
    async with trio.open_nursery() as nursery:
        net.attach(url, validator, nursery)
        for miner in miners:
            await nursery.start(miner.run)
            await miner.wait_connected()
        assert await validator.broadcast_game_updates([game]) == 2
        assert await validator.broadcast_game_updates([dict(game)]) is None  # identical: skipped
        assert await validator.broadcast_game_updates([{**game, "outcome": "Home"}]) == 2
        await wait_for(lambda: len(got["bob"]) == 2 and len(got["charlie"]) == 2)
        assert got["bob"] == got["charlie"] == [["g1"], ["g1"]]
        assert await validator.send_to(bob.ss58_address, {"type": "game_update", "data": {"games": []}})
        await wait_for(lambda: len(got["bob"]) == 3)
        assert len(got["charlie"]) == 2
        nursery.cancel_scope.cancel()


async def test_miner_refuses_bad_frames_from_its_validator_silently(
    alice: Keypair, bob: Keypair, charlie: Keypair, autojump_clock: Any
) -> None:
    """A validator's frames are checked like a miner's; the miner counts refusals and never answers."""
    sent_after_welcome: list[str] = []
    heard: list[str] = []
    done = trio.Event()

    async def fake_validator(stream: trio.abc.Stream) -> None:
        async with trio.open_nursery() as nursery:
            request = await trio_websocket.wrap_server_stream(nursery, stream)
            ws = await request.accept()
            await ws.get_message()  # auth
            await ws.send_message(signed(WelcomeMessage(sender="", data={"message": "Connection established",
                                                                         "status": "success"}), alice))
            tampered = sign(game_update(1), alice).to_dict()
            tampered["data"]["n"] = 2
            good = sign(game_update(3), alice)
            for text in (
                "{broken",
                json.dumps(tampered),
                signed(game_update(4), charlie),  # someone else's frame
                encode(good),
                encode(good),  # replayed
            ):
                await ws.send_message(text)
                sent_after_welcome.append(text)
            # anything the miner says back (it should say nothing but its own heartbeats)
            with trio.move_on_after(5.0):
                while True:
                    heard.append(decode(await ws.get_message()).type)
            done.set()
            await ws.aclose()

    async def on_games(websocket: Any, message: WebSocketMessage) -> None:
        got.append(message.data["n"])

    got: list[int] = []
    async with trio.open_nursery() as nursery:
        async def open_stream(url: str) -> trio.abc.Stream:
            client, server = trio.testing.memory_stream_pair()
            nursery.start_soon(fake_validator, server)
            return client

        miner = MinerWebSocketManager(bob, [(alice.ss58_address, "ws://fake/ws")], stream_opener=open_stream,
                                      heartbeat_interval=1e6)
        miner.register_handler("game_update", on_games)
        await nursery.start(miner.run)
        await done.wait()
        assert got == [3]
        assert heard == []
        rejections = miner.stats()["rejections"]
        assert rejections == {"malformed": 1, "bad signature": 1,
                              "wrong sender": 1, "replayed nonce": 1}
        nursery.cancel_scope.cancel()


async def test_debug_log_shows_every_frame_truncated(
    alice: Keypair, bob: Keypair, caplog: pytest.LogCaptureFixture, autojump_clock: Any
) -> None:
    validator = ValidatorWebSocketManager(alice)
    validator.register_handler("prediction", Recorder())
    caplog.set_level(logging.DEBUG, logger="bettensor_ws")
    async with raw_client(validator) as ws:
        await authenticate(ws, bob)
        big = prediction(bob)
        big.data["model_name"] = "m" * 2000
        await ws.send_message(signed(big, bob))
        await next_message(ws)
    frames = [r.getMessage() for r in caplog.records if r.name == "bettensor_ws.connection"
              and r.getMessage().startswith(("<- ", "-> "))]
    inbound = [f for f in frames if f.startswith("<- ")]
    outbound = [f for f in frames if f.startswith("-> ")]
    assert len(inbound) == 1 and len(outbound) == 2  # the prediction; the welcome and confirmation
    assert all(len(f) < 400 for f in frames)
    assert inbound[0].endswith("...")
    assert any('"type":"welcome"' in f for f in outbound)


async def test_stats_shape(alice: Keypair, bob: Keypair, autojump_clock: Any) -> None:
    validator = ValidatorWebSocketManager(alice)
    async with raw_client(validator) as ws:
        await authenticate(ws, bob)
        await ws.send_message("nope")
        await next_message(ws)
        stats = validator.stats()
        assert stats["connections"] == 1
        assert stats["connections_total"] == 1
        assert stats["frames_in"] == {}
        assert stats["frames_out"] == {"welcome": 1, "error": 1}
        assert stats["rejections"] == {"malformed": 1}
        assert stats["reconnects"] == 0 and stats["dropped_broadcasts"] == 0
        assert stats["uptime"] >= 0.0


def test_backoff_bounds_and_reset() -> None:
    import random

    backoff = Backoff(1.0, 10.0, rng=random.Random(7))
    for n in range(40):
        assert 1.0 <= backoff.next_delay() <= min(10.0, 2.0**n)
    backoff.reset()
    assert backoff.next_delay() == 1.0
    with pytest.raises(ValueError):
        Backoff(0.0, 1.0)
    with pytest.raises(ValueError):
        Backoff(2.0, 1.0)


# ---- real sockets ----------------------------------------------------------------------------


@asynccontextmanager
async def serving(validator: ValidatorWebSocketManager) -> AsyncIterator[trio.Nursery]:
    async with trio.open_nursery() as nursery:
        port = await nursery.start(validator.serve)
        assert port == validator.port and port > 0
        assert validator.listening.is_set()
        yield nursery
        nursery.cancel_scope.cancel()


async def test_end_to_end_over_loopback(alice: Keypair, bob: Keypair) -> None:
    validator = ValidatorWebSocketManager(alice, heartbeat_interval=0.05)
    validator.register_handler("prediction", Recorder())
    with trio.fail_after(10):
        async with serving(validator) as nursery:
            confirmed = trio.Event()

            async def on_confirmation(websocket: Any, message: WebSocketMessage) -> None:
                assert isinstance(message, ConfirmationMessage)
                assert message.confirmation.prediction_id == "p1"
                confirmed.set()

            miner = MinerWebSocketManager(bob, [(alice.ss58_address, f"ws://127.0.0.1:{validator.port}/ws")],
                                          heartbeat_interval=0.05)
            miner.register_handler("confirmation", on_confirmation)
            await nursery.start(miner.run)
            await miner.wait_connected(alice.ss58_address)
            assert await miner.send(prediction(bob)) == [alice.ss58_address]
            await confirmed.wait()
            await wait_for(lambda: miner.stats()["frames_in"].get("heartbeat_ack", 0) >= 1)
            assert validator.connected_hotkeys == [bob.ss58_address]


async def test_other_path_is_404_over_loopback(alice: Keypair) -> None:
    validator = ValidatorWebSocketManager(alice)
    with trio.fail_after(10):
        async with serving(validator):
            with pytest.raises(ConnectionRejected) as caught:
                async with trio_websocket.open_websocket_url(f"ws://127.0.0.1:{validator.port}/other"):
                    pass  # pragma: no cover
            assert caught.value.status_code == 404
            assert b"/ws" in (caught.value.body or b"")


async def test_cancelling_serve_closes_1001_over_loopback(alice: Keypair, bob: Keypair) -> None:
    validator = ValidatorWebSocketManager(alice)
    with trio.fail_after(10):
        async with trio.open_nursery() as outer:
            with trio.CancelScope() as scope:
                async with trio.open_nursery() as nursery:
                    await nursery.start(validator.serve)
                    async with trio_websocket.open_websocket_url(
                        f"ws://127.0.0.1:{validator.port}/ws"
                    ) as ws:
                        await authenticate(ws, bob)
                        scope.cancel()
                        with trio.fail_after(1.0):
                            assert await expect_close(ws) == (1001, "Going away")
            del outer


async def test_garbage_peers_never_reach_the_server(alice: Keypair, bob: Keypair) -> None:
    validator = ValidatorWebSocketManager(alice, auth_timeout=0.2)
    with trio.fail_after(10):
        async with serving(validator):
            # not HTTP at all: a 400 and the socket closed
            stream = await trio.open_tcp_stream("127.0.0.1", validator.port)
            await stream.send_all(b"\x16\x03\x01 hello\r\n\r\n")
            answer = b""
            while chunk := await stream.receive_some():
                answer += chunk
            assert answer.startswith(b"HTTP/1.1 400")
            await stream.aclose()
            # connects and hangs up at once; half an upgrade; silence
            for data in (b"", b"GET /ws HTTP/1.1\r\nHost: x\r\n", None):
                stream = await trio.open_tcp_stream("127.0.0.1", validator.port)
                if data is None:
                    await trio.sleep(0.3)  # auth_timeout passes without an upgrade
                elif data:
                    await stream.send_all(data)
                await stream.aclose()
            # the server is still accepting and serving
            async with trio_websocket.open_websocket_url(f"ws://127.0.0.1:{validator.port}/ws") as ws:
                await authenticate(ws, bob)
                await ws.send_message(signed(HeartbeatMessage(sender="", data={}), bob))
                assert isinstance(await next_message(ws), HeartbeatAckMessage)


async def test_miner_reconnects_after_validator_restart_on_same_port(alice: Keypair, bob: Keypair) -> None:
    first = ValidatorWebSocketManager(alice)
    with trio.fail_after(15):
        async with trio.open_nursery() as outer:
            with trio.CancelScope() as life:
                async with trio.open_nursery() as nursery:
                    await nursery.start(first.serve)
                    port = first.port
                    miner = MinerWebSocketManager(bob, [(alice.ss58_address, f"ws://127.0.0.1:{port}/ws")],
                                                  reconnect_base_interval=0.05, max_reconnect_interval=0.2)
                    await outer.start(miner.run)
                    await miner.wait_connected()
                    link = miner.connection(alice.ss58_address)
                    life.cancel()
            assert link is not None
            await link.closed.wait()
            assert link.close_code == 1001
            # refused dials while it is down
            await wait_for(lambda: "OSError" in miner.last_error.get(alice.ss58_address, ""))
            second = ValidatorWebSocketManager(alice, port=port)
            await outer.start(second.serve)
            assert second.port == port
            await wait_for(lambda: miner.connection(alice.ss58_address) not in (None, link))
            assert second.connected_hotkeys == [bob.ss58_address]
            assert miner.stats()["reconnects"] >= 1
            outer.cancel_scope.cancel()


async def test_two_validators_serve_one_port_from_premade_listeners(alice: Keypair, bob: Keypair) -> None:
    """``listeners=``: each serves its own SO_REUSEPORT socket on one port (benchmarks/workers.py)."""
    import socket

    port = 0
    validators = []
    for _ in range(2):
        sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        await sock.bind(("127.0.0.1", port))
        port = sock.getsockname()[1]  # the second binds the first's port
        sock.listen()
        validators.append(ValidatorWebSocketManager(alice, listeners=[trio.SocketListener(sock)]))
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            for validator in validators:
                assert await nursery.start(validator.serve) == port
                assert validator.url == f"ws://127.0.0.1:{port}/ws"
            async with trio_websocket.open_websocket_url(f"ws://127.0.0.1:{port}/ws") as ws:
                await authenticate(ws, bob)
                assert sorted(len(v.connected_hotkeys) for v in validators) == [0, 1]
            nursery.cancel_scope.cancel()


def _tls_contexts() -> tuple[ssl.SSLContext, ssl.SSLContext]:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(server)
    client = ssl.create_default_context()
    ca.configure_trust(client)
    return server, client


async def test_wss_over_loopback_with_trustme(alice: Keypair, bob: Keypair) -> None:
    server_ctx, client_ctx = _tls_contexts()
    validator = ValidatorWebSocketManager(alice, ssl_context=server_ctx)
    recorder = Recorder()
    validator.register_handler("prediction", recorder)
    with trio.fail_after(10):
        async with serving(validator) as nursery:
            confirmed = trio.Event()

            async def on_confirmation(websocket: Any, message: WebSocketMessage) -> None:
                confirmed.set()

            url = f"wss://127.0.0.1:{validator.port}/ws"
            miner = MinerWebSocketManager(bob, [(alice.ss58_address, url)], ssl_context=client_ctx)
            miner.register_handler("confirmation", on_confirmation)
            await nursery.start(miner.run)
            await miner.wait_connected()
            await miner.send(prediction(bob))
            await confirmed.wait()
            assert recorder.hotkeys == [bob.ss58_address]
            # a client that does not trust the CA never gets in, and the server carries on
            untrusting = MinerWebSocketManager(bob, [(alice.ss58_address, url)],
                                               ssl_context=ssl.create_default_context(),
                                               reconnect_base_interval=10.0, max_reconnect_interval=10.0)
            await nursery.start(untrusting.run)
            await wait_for(lambda: alice.ss58_address in untrusting.last_error)
            assert "SSL" in untrusting.last_error[alice.ss58_address] or "certificate" in (
                untrusting.last_error[alice.ss58_address]
            )
            assert miner.connected_validators == [alice.ss58_address]
            # a plain-text upgrade against the wss:// port is hung up on at once
            stream = await trio.open_tcp_stream("127.0.0.1", validator.port)
            await stream.send_all(b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\r\n")
            with trio.fail_after(1.0):
                with contextlib.suppress(trio.BrokenResourceError):
                    while await stream.receive_some():
                        pass
            await stream.aclose()
            await miner.send(prediction(bob, "again"))
            await wait_for(lambda: len(recorder.seen) == 2)
