"""Interop: our Trio runtime against the independent asyncio reference peer.

``tests/interop/refpeer.py`` was written from the wire format alone (asyncio
``websockets`` + ``bittensor_wallet``). Here our side (validator or miner) runs
under ``trio.run`` in a background thread while the reference peer is driven
with ``asyncio.run`` in the test's own thread, over real loopback sockets.

A. RefMiner -> our ValidatorWebSocketManager: handshake, Welcome, heartbeats,
   prediction/confirmation, and every handshake and per-frame error case.
B. Our MinerWebSocketManager -> RefValidator: handshake, game_update,
   prediction/confirmation, heartbeats, mutual authentication, reconnect.

The tests are plain synchronous functions (so pytest-trio leaves them alone).

Where the two differ (deliberately; not asserted here): reason texts
("bad signature" vs "Invalid signature", ...); our validator also refuses stale or
future per-frame timestamps, unknown types, binary frames after auth, integers of
magnitude >= 2**63 and lone surrogates, all of which RefValidator accepts or ignores.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any, Self

import pytest
import trio
from bittensor_wallet import Keypair
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from bettensor_ws import (
    MinerWebSocketManager,
    PredictionMessage,
    ValidatorWebSocketManager,
)
from tests.helpers import bare_refusal

from .refpeer import (
    RefMiner,
    RefValidator,
    make_auth,
    now_iso,
    sign_envelope,
    verify_envelope,
)

STEP = 5.0  # generous bound on any single exchange over loopback

# --------------------------------------------------------------------------- harness


class TrioService:
    """A Trio service (``validator.serve`` or ``miner.run``) in a background thread."""

    def __init__(self, start: Callable[..., Awaitable[Any]]) -> None:
        self._start = start
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._main, name="trio-service", daemon=True)
        self._scope: trio.CancelScope | None = None
        self.token: trio.lowlevel.TrioToken | None = None
        self.value: Any = None
        self.error: BaseException | None = None

    def _main(self) -> None:
        try:
            trio.run(self._run)
        except BaseException as exc:  # reported to the test on stop()
            self.error = exc
        finally:
            self._ready.set()

    async def _run(self) -> None:
        self.token = trio.lowlevel.current_trio_token()
        with trio.CancelScope() as scope:
            self._scope = scope
            async with trio.open_nursery() as nursery:
                self.value = await nursery.start(self._start)
                self._ready.set()

    def start(self) -> None:
        self._thread.start()
        if not self._ready.wait(STEP):
            raise TimeoutError("trio service did not start")
        if self.error is not None:
            raise self.error

    def stop(self) -> None:
        """Cancel the service (graceful shutdown) and join its thread; idempotent."""
        if self.token is not None and self._scope is not None and self._thread.is_alive():
            with contextlib.suppress(trio.RunFinishedError):
                trio.from_thread.run_sync(self._scope.cancel, trio_token=self.token)
        self._thread.join(STEP)
        assert not self._thread.is_alive(), "trio service did not stop"
        if self.error is not None:
            raise self.error

    def call(self, fn: Callable[..., Awaitable[Any]], *args: Any, timeout: float = STEP) -> Any:
        """Run ``await fn(*args)`` in the Trio thread (bounded by ``timeout``)."""

        async def bounded() -> Any:
            with trio.fail_after(timeout):
                return await fn(*args)

        assert self.token is not None
        return trio.from_thread.run(bounded, trio_token=self.token)

    def call_sync(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(*args)`` in the Trio thread (to read its state race-free)."""
        assert self.token is not None
        return trio.from_thread.run_sync(fn, *args, trio_token=self.token)

    async def acall(
        self,
        fn: Callable[..., Awaitable[Any]],
        *args: Any,
        timeout: float = STEP,  # noqa: ASYNC109  (bounds the Trio side, not this await)
    ) -> Any:
        """``call`` from asyncio code without blocking its event loop."""
        return await asyncio.to_thread(self.call, fn, *args, timeout=timeout)

    async def acall_sync(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.to_thread(self.call_sync, fn, *args)


@contextlib.contextmanager
def in_trio_thread(start: Callable[..., Awaitable[Any]]) -> Iterator[TrioService]:
    service = TrioService(start)
    service.start()
    try:
        yield service
    finally:
        service.stop()


async def eventually(predicate: Callable[[], Any], timeout: float = STEP) -> None:  # noqa: ASYNC109
    """Poll ``predicate`` from asyncio until it is true."""
    async with asyncio.timeout(timeout):
        while True:
            if predicate():
                return
            await asyncio.sleep(0.01)


@pytest.fixture(autouse=True)
def no_internal_errors(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Nothing in bettensor_ws may log an error (an internal failure) during a test."""
    caplog.set_level(logging.INFO, logger="bettensor_ws")
    yield
    failures = [
        r
        for r in caplog.records
        if r.name.startswith("bettensor_ws") and r.levelno >= logging.ERROR
    ]
    assert not failures, [r.getMessage() for r in failures]


def ago(seconds: float) -> str:
    return (datetime.now(UTC) - timedelta(seconds=seconds)).isoformat()


def prediction_data(pid: str = "p1") -> dict[str, Any]:
    return {
        "prediction_id": pid,
        "game_id": "g1",
        "miner_uid": 1,
        "prediction_date": "2030-01-01T00:00:00+00:00",
        "predicted_outcome": "A",
        "predicted_odds": 1.8,
        "team_a": "A",
        "team_b": "B",
        "wager": 1.0,
        "team_a_odds": 1.8,
        "team_b_odds": 2.1,
        "tie_odds": 3.0,
        "model_name": None,
        "confidence_score": 0.7,
        "outcome": "Unfinished",
        "payout": 0.0,
    }


GAME = {
    "game_id": "g1",
    "team_a": "A",
    "team_b": "B",
    "event_start_date": "2030-01-01T00:00:00+00:00",
    "sport": "soccer",
    "league": "L",
    "create_date": "2029-12-01T00:00:00+00:00",
    "last_update_date": "2029-12-01T00:00:00+00:00",
    "active": True,
    "outcome": "Unfinished",
    "team_a_odds": 1.8,
    "team_b_odds": 2.1,
    "tie_odds": 3.0,
    "can_tie": True,
}
GAME2 = {
    **GAME,
    "game_id": 2,
    "team_a": "S\u00e3o Paulo \u26bd",
    "team_b": "K\u00f6ln \u201cFC\u201d",
    "team_a_odds": 1e-7,
    "tie_odds": 1e16,
}

# --------------------------------------------------------------------------- A: RefMiner -> our validator


class OurValidator:
    """Our validator with the seed-style prediction handler, plus what it saw."""

    def __init__(self, keypair: Keypair, **kwargs: Any) -> None:
        self.manager = ValidatorWebSocketManager(keypair, **kwargs)
        self.handled: list[tuple[str, dict[str, Any]]] = []  # (connection hotkey, data)
        self.manager.register_handler("prediction", self._handle_prediction)

    async def _handle_prediction(self, websocket: Any, message: Any) -> None:
        self.handled.append((websocket.hotkey, dict(message.data)))
        await websocket.send_json(
            {
                "type": "confirmation",
                "status": "success",
                "prediction_id": message.data.get("prediction_id"),
            }
        )


@contextlib.contextmanager
def our_validator(
    keypair: Keypair, **kwargs: Any
) -> Iterator[tuple[OurValidator, TrioService, str]]:
    v = OurValidator(keypair, **kwargs)
    with in_trio_thread(v.manager.serve) as service:
        assert service.value == v.manager.port != 0
        yield v, service, f"ws://127.0.0.1:{v.manager.port}/ws"


def assert_signed_by(frame: dict[str, Any], keypair: Keypair, type_: str) -> dict[str, Any]:
    assert frame.get("type") == type_, frame
    assert verify_envelope(frame), f"signature does not verify: {frame}"
    assert frame["sender"] == keypair.ss58_address
    data: dict[str, Any] = frame["data"]
    return data


async def expect_error(m: RefMiner, validator: Keypair, contains: str) -> str:
    """The next signed "error" envelope; its message must contain ``contains``."""
    data = assert_signed_by(await m.expect("error", timeout=STEP), validator, "error")
    text = str(data.get("message"))
    assert contains in text, text
    return text


async def heartbeat_roundtrip(m: RefMiner, validator: Keypair) -> None:
    await m.send_signed("heartbeat", {})
    assert_signed_by(await m.expect("heartbeat_ack", timeout=STEP), validator, "heartbeat_ack")


def test_refminer_auth_welcome_heartbeats_and_prediction(alice: Keypair, bob: Keypair) -> None:
    with our_validator(alice, metagraph=[bob.ss58_address], heartbeat_interval=0.2) as (
        v,
        svc,
        url,
    ):

        async def scenario() -> None:
            async with RefMiner(bob, url, features=["batch"]) as m:
                assert m.welcome is not None
                data = assert_signed_by(m.welcome, alice, "welcome")
                assert data["message"] == "Connection established"
                assert data["status"] == "success"

                await heartbeat_roundtrip(m, alice)

                # our validator's own heartbeats, every 0.2 s, signed by its hotkey
                for _ in range(2):
                    beat = await m.expect("heartbeat", timeout=STEP)
                    assert_signed_by(beat, alice, "heartbeat")
                    await m.send_signed("heartbeat_ack", {"timestamp": now_iso()})

                pred = prediction_data("p-1")
                await m.send_signed("prediction", pred)
                conf = assert_signed_by(
                    await m.expect("confirmation", timeout=STEP), alice, "confirmation"
                )
                assert conf["status"] == "success"
                assert conf["prediction_id"] == "p-1"
                assert v.handled == [(bob.ss58_address, pred)]

                # non-ASCII text and awkward floats: the reference's signature still verifies
                odd = prediction_data("p-\u00e9-\u26bd") | {
                    "team_a": "S\u00e3o Paulo \u26bd \u2028",
                    "wager": 1e-7,
                    "payout": 1e16,
                    "confidence_score": 0.1 + 0.2,
                    "tie_odds": -0.0,
                }
                await m.send_signed("prediction", odd)
                conf = assert_signed_by(
                    await m.expect("confirmation", timeout=STEP), alice, "confirmation"
                )
                assert conf["prediction_id"] == "p-\u00e9-\u26bd"
                assert v.handled[-1] == (bob.ss58_address, odd)

                # an "id"-only prediction (as the seed reads it) is accepted too
                await m.send_signed("prediction", {"id": "p-2", "game_id": "g1"})
                conf = assert_signed_by(
                    await m.expect("confirmation", timeout=STEP), alice, "confirmation"
                )
                assert conf["status"] == "success"
                assert conf["prediction_id"] is None  # the seed handler reads only prediction_id
                assert v.handled[-1] == (bob.ss58_address, {"id": "p-2", "game_id": "g1"})

                # our broadcasts: signed once, verified by the reference (non-ASCII, odd floats)
                sent = await svc.acall(v.manager.broadcast_game_updates, [GAME, GAME2])
                assert sent == 1
                update = assert_signed_by(await m.expect("game_update"), alice, "game_update")
                # as the reference TeamGame reads them: game_id a string, odds numbers
                assert update["games"] == [{**g, "game_id": str(g["game_id"])} for g in (GAME, GAME2)]
                assert await svc.acall(v.manager.broadcast_game_updates, [GAME, GAME2]) is None
                assert await svc.acall(
                    v.manager.send_to, bob.ss58_address, {"type": "game_update", "games": []}
                )
                update = assert_signed_by(await m.expect("game_update"), alice, "game_update")
                assert update == {"games": []}
                assert not await svc.acall(v.manager.send_to, "5Nobody", {"type": "heartbeat"})

                # nothing the validator sent us was an error
                assert not [f for f in m.skipped if f.get("type") == "error"], m.skipped
                stats = await svc.acall_sync(v.manager.stats)
                assert stats["connections"] == 1
                assert stats["frames_in"]["prediction"] == 3
            await eventually(lambda: not v.manager.connected_hotkeys)

        asyncio.run(scenario())


HANDSHAKE_FAILURES = [
    pytest.param("malformed-json", "malformed auth frame", id="malformed-json"),
    pytest.param("binary-garbage", "malformed auth frame", id="binary-garbage"),
    pytest.param("not-an-object", "malformed auth frame", id="not-an-object"),
    pytest.param("missing-signature", "malformed auth frame", id="missing-signature"),
    pytest.param("missing-hotkey", "malformed auth frame", id="missing-hotkey"),
    pytest.param("wrong-key", "bad signature", id="signed-by-another-key"),
    pytest.param("tampered", "bad signature", id="tampered-after-signing"),
    pytest.param("stale", "stale timestamp (", id="stale-timestamp-10min"),
    pytest.param("future", "future timestamp (", id="future-timestamp-10min"),
    pytest.param("unregistered", "hotkey not registered", id="unregistered-hotkey"),
]


def _bad_auth(kind: str, bob: Keypair, charlie: Keypair) -> tuple[Keypair, Any]:
    """(who connects, the auth frame or raw text/bytes it sends) for each failure."""
    if kind == "malformed-json":
        return bob, '{"hotkey": "' + bob.ss58_address + '", '
    if kind == "binary-garbage":
        return bob, b"\x00\x01\xff"
    if kind == "not-an-object":
        return bob, json.dumps([make_auth(bob)])
    if kind == "missing-signature":
        frame = make_auth(bob)
        del frame["signature"]
        return bob, frame
    if kind == "missing-hotkey":
        frame = make_auth(bob)
        del frame["hotkey"]
        return bob, frame
    if kind == "wrong-key":  # claims to be bob, signed by charlie
        return bob, {**make_auth(charlie), "hotkey": bob.ss58_address}
    if kind == "tampered":
        return bob, {**make_auth(bob), "nonce": "f" * 32}
    if kind == "stale":
        return bob, make_auth(bob, timestamp=ago(600))
    if kind == "future":
        return bob, make_auth(bob, timestamp=ago(-600))
    if kind == "unregistered":
        return charlie, make_auth(charlie)
    raise AssertionError(kind)


def assert_bare_refusal(answer: dict[str, Any] | None, contains: str) -> str:
    """The reference's bare ``{"status": "error", "message": ...}`` (what a reference
    miner reads), with our signature keys beside it, checked."""
    assert answer is not None, "no answer to the auth frame"
    answer = bare_refusal(answer)
    assert set(answer) == {"status", "message"}, answer
    assert answer["status"] == "error"
    message = str(answer["message"])
    assert contains in message, message
    return message


async def refused_with(m: RefMiner, contains: str) -> str:
    """Answered with the bare error, then closed 1008 with the reason; nothing else."""
    reason = assert_bare_refusal(m.welcome, contains)
    assert await m.wait_closed(STEP) == (1008, reason[:120])
    assert not m.skipped, m.skipped
    return reason


@pytest.mark.parametrize(("kind", "contains"), HANDSHAKE_FAILURES)
def test_refminer_handshake_failure(
    alice: Keypair,
    bob: Keypair,
    charlie: Keypair,
    kind: str,
    contains: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    with our_validator(alice, metagraph=[bob.ss58_address]) as (v, svc, url):

        async def scenario() -> None:
            keypair, auth = _bad_auth(kind, bob, charlie)
            async with RefMiner(keypair, url, auth=auth) as m:
                reason = await refused_with(m, contains)
            assert v.manager.connected_hotkeys == []
            assert v.handled == []
            # the refusal is logged and counted
            assert any(reason in r.getMessage() for r in caplog.records), reason
            stats = await svc.acall_sync(v.manager.stats)
            assert sum(stats["rejections"].values()) == 1, stats["rejections"]
            assert stats["connections_total"] == 0
            # the validator is unaffected: a good miner still gets in
            async with RefMiner(bob, url) as good:
                assert good.welcome is not None
                assert_signed_by(good.welcome, alice, "welcome")

        asyncio.run(scenario())


def test_refminer_replayed_auth_nonce(alice: Keypair, bob: Keypair) -> None:
    with our_validator(alice) as (_v, _svc, url):

        async def scenario() -> None:
            auth = make_auth(bob)
            async with RefMiner(bob, url, auth=auth) as first:
                assert first.welcome is not None
                assert_signed_by(first.welcome, alice, "welcome")
                # replayed while the first connection is still up ...
                async with RefMiner(bob, url, auth=dict(auth)) as again:
                    await refused_with(again, "replayed nonce")
                await heartbeat_roundtrip(first, alice)  # ... which is not replaced
            # ... and after it has gone
            async with RefMiner(bob, url, auth=dict(auth)) as again:
                await refused_with(again, "replayed nonce")

        asyncio.run(scenario())


def test_refminer_auth_timeout(alice: Keypair) -> None:
    with our_validator(alice, auth_timeout=0.3) as (_v, _svc, url):

        async def scenario() -> None:
            async with connect(url, open_timeout=STEP) as ws:  # never sends auth
                async with asyncio.timeout(STEP):
                    answer = json.loads(await ws.recv())
                reason = assert_bare_refusal(answer, "auth timeout")
                with pytest.raises(ConnectionClosed) as info:
                    async with asyncio.timeout(STEP):
                        await ws.recv()
                assert info.value.rcvd is not None
                assert (info.value.rcvd.code, info.value.rcvd.reason) == (1008, reason)

        asyncio.run(scenario())


def test_refminer_wrong_path_is_404(alice: Keypair) -> None:
    with our_validator(alice) as (_v, _svc, url):

        async def scenario() -> None:
            for path in ("/", "/other", "/ws/extra"):
                with pytest.raises(InvalidStatus) as info:
                    async with connect(url.removesuffix("/ws") + path, open_timeout=STEP):
                        pass
                assert info.value.response.status_code == 404, path
            # /ws with a query string is still the endpoint
            async with RefMiner(Keypair.create_from_uri("//Dave"), url + "?v=1") as m:
                assert m.welcome is not None
                assert_signed_by(m.welcome, alice, "welcome")

        asyncio.run(scenario())


def test_refminer_per_frame_errors(alice: Keypair, bob: Keypair, charlie: Keypair) -> None:
    with our_validator(alice, metagraph=[bob.ss58_address]) as (v, svc, url):

        async def scenario() -> None:
            async with RefMiner(bob, url) as m:
                assert m.welcome is not None and m.welcome.get("type") == "welcome"

                # invalid JSON: a signed error naming the reason; the link stays open
                await m.send_raw("{this is not json")
                await expect_error(m, alice, "invalid JSON")
                await heartbeat_roundtrip(m, alice)

                # a JSON value that is not an envelope
                await m.send_json([1, 2, 3])
                await expect_error(m, alice, "expected a JSON object")
                await m.send_json({"type": "heartbeat", "sender": bob.ss58_address})
                await expect_error(m, alice, "missing field")

                # sender other than the authenticated hotkey (validly signed by charlie)
                await m.send_json(sign_envelope(charlie, "prediction", prediction_data("x1")))
                await expect_error(m, alice, "sender does not match the authenticated hotkey")

                # tampered data: the signature no longer covers it
                env = sign_envelope(bob, "prediction", prediction_data("x2"))
                env["data"]["wager"] = 1000.0
                await m.send_json(env)
                await expect_error(m, alice, "bad signature")

                # signature by the wrong key for the claimed sender
                env = sign_envelope(charlie, "prediction", prediction_data("x3"))
                env["sender"] = bob.ss58_address
                await m.send_json(env)
                await expect_error(m, alice, "bad signature")

                # replayed nonce: the same signed frame twice
                env = sign_envelope(bob, "heartbeat", {})
                await m.send_json(env)
                assert_signed_by(await m.expect("heartbeat_ack"), alice, "heartbeat_ack")
                await m.send_json(env)
                await expect_error(m, alice, "replayed nonce")

                # stale and future timestamps, validly signed
                await m.send_json(
                    sign_envelope(bob, "prediction", prediction_data("x4"), timestamp=ago(600))
                )
                await expect_error(m, alice, "stale timestamp")
                await m.send_json(
                    sign_envelope(bob, "prediction", prediction_data("x5"), timestamp=ago(-600))
                )
                await expect_error(m, alice, "future timestamp")

                # unknown type
                await m.send_signed("frobnicate", {"x": 1})
                await expect_error(m, alice, "frobnicate")

                # a binary frame
                await m.send_raw(b'{"type": "heartbeat"}')
                await expect_error(m, alice, "binary")

                # none of the refused predictions reached the handler; the link is fine
                await heartbeat_roundtrip(m, alice)
                assert v.handled == []
                await m.send_signed("prediction", prediction_data("ok"))
                conf = assert_signed_by(await m.expect("confirmation"), alice, "confirmation")
                assert conf["prediction_id"] == "ok"
                assert [d["prediction_id"] for _, d in v.handled] == ["ok"]
                assert not m.skipped, m.skipped
                assert v.manager.connected_hotkeys == [bob.ss58_address]

        asyncio.run(scenario())


def test_refminer_oversized_frame_closes_1009(alice: Keypair, bob: Keypair) -> None:
    with our_validator(alice, max_message_size=4096) as (v, _svc, url):

        async def scenario() -> None:
            async with RefMiner(bob, url) as m:
                assert m.welcome is not None and m.welcome.get("type") == "welcome"
                await m.send_signed("heartbeat", {"pad": "x" * 3000})  # under the limit
                assert_signed_by(await m.expect("heartbeat_ack"), alice, "heartbeat_ack")
                await m.send_signed("heartbeat", {"pad": "x" * 10_000})
                code, _reason = await m.wait_closed(STEP)
                assert code == 1009
                assert not [f for f in m.skipped if f.get("type") == "heartbeat_ack"]
            # the auth frame is held to the same limit
            async with RefMiner(bob, url, auth=make_auth(bob, extra={"pad": "x" * 10_000})) as m:
                assert m.welcome is None
                assert (await m.wait_closed(STEP))[0] == 1009
            await eventually(lambda: not v.manager.connected_hotkeys)

        asyncio.run(scenario())


def test_refminer_rate_limit_then_flood_closes_1008(alice: Keypair, bob: Keypair) -> None:
    """Over its rate a reference miner is slowed, not refused (it never resends: a
    refusal would lose the frame); a peer that keeps flooding is closed 1008."""
    with our_validator(alice, rate_limit=10.0, rate_burst=3, flood_after=1.0) as (v, svc, url):

        async def scenario() -> None:
            async with RefMiner(bob, url) as m:
                assert m.welcome is not None and m.welcome.get("type") == "welcome"
                # a burst just over the bucket: every frame answered, none refused
                for _ in range(5):
                    await m.send_signed("heartbeat", {})
                for _ in range(5):
                    await m.expect("heartbeat_ack")
                assert not [f for f in m.skipped if f.get("type") == "error"], m.skipped
                await asyncio.sleep(1.5)  # the bucket refills; unpaced frames pay strikes back
                await heartbeat_roundtrip(m, alice)

                # a peer that keeps flooding is closed with 1008, with no "rate limited" errors
                m.skipped.clear()
                with contextlib.suppress(ConnectionClosed):
                    for _ in range(200):
                        await m.send_signed("heartbeat", {})
                code, reason = await m.wait_closed(STEP)
                assert (code, reason) == (1008, "rate limit exceeded")
                assert not [f for f in m.skipped if f.get("type") == "error"], m.skipped
            await eventually(lambda: not v.manager.connected_hotkeys)
            stats = await svc.acall_sync(v.manager.stats)
            assert stats["rejections"].get("flooding") == 1, stats["rejections"]
            assert "rate limited" not in stats["rejections"], stats["rejections"]

        asyncio.run(scenario())


def test_refminer_replaced_connection_and_graceful_shutdown(alice: Keypair, bob: Keypair) -> None:
    with our_validator(alice) as (v, svc, url):

        async def scenario() -> None:
            async with RefMiner(bob, url) as first:
                assert first.welcome is not None
                earlier = await first.send_signed("heartbeat", {})
                await first.expect("heartbeat_ack")
                async with RefMiner(bob, url) as second:
                    assert second.welcome is not None
                    assert_signed_by(second.welcome, alice, "welcome")
                    assert await first.wait_closed(STEP) == (1000, "New connection established")
                    await heartbeat_roundtrip(second, alice)
                    # nonces are remembered across connections of the same hotkey
                    await second.send_json(earlier)
                    await expect_error(second, alice, "replayed nonce")
                    await shutdown_says_going_away(v, svc, second, bob)

        asyncio.run(scenario())


async def shutdown_says_going_away(
    v: OurValidator, svc: TrioService, m: RefMiner, miner: Keypair
) -> None:
    """Cancelling serve says goodbye with 1001 within about a second."""
    assert v.manager.connected_hotkeys == [miner.ss58_address]
    loop = asyncio.get_running_loop()
    started = loop.time()
    await asyncio.to_thread(svc.stop)
    assert await m.wait_closed(STEP) == (1001, "Going away")
    assert loop.time() - started < 2.0


def test_refminer_idle_timeout_and_deregistration(
    alice: Keypair, bob: Keypair, charlie: Keypair
) -> None:
    members = [bob.ss58_address, charlie.ss58_address]
    with our_validator(alice, metagraph=members, connection_timeout=0.6) as (v, svc, url):

        async def scenario() -> None:
            # a hotkey dropped from the metagraph is disconnected with 1008
            async with RefMiner(charlie, url) as m:
                assert m.welcome is not None and m.welcome.get("type") == "welcome"
                dropped = await svc.acall_sync(v.manager.refresh_metagraph, [bob.ss58_address])
                assert dropped == [charlie.ss58_address]
                assert await m.wait_closed(STEP) == (1008, "hotkey deregistered")
            async with RefMiner(charlie, url) as m:
                assert_bare_refusal(m.welcome, "hotkey not registered")

            # a miner that sends nothing for connection_timeout is closed with 1011
            async with RefMiner(bob, url) as m:
                assert m.welcome is not None and m.welcome.get("type") == "welcome"
                for _ in range(3):  # traffic keeps it alive
                    await asyncio.sleep(0.3)
                    await heartbeat_roundtrip(m, alice)
                loop = asyncio.get_running_loop()
                idle_from = loop.time()
                assert await m.wait_closed(STEP) == (1011, "connection timeout")
                assert 0.4 < loop.time() - idle_from < 3.0
            await eventually(lambda: not v.manager.connected_hotkeys)

        asyncio.run(scenario())


# --------------------------------------------------------------------------- B: our miner -> RefValidator


class OurMiner:
    """Our miner with confirmation / game_update / heartbeat_ack handlers that record."""

    def __init__(self, keypair: Keypair, validator_hotkey: str, url: str, **kwargs: Any) -> None:
        kwargs.setdefault("reconnect_base_interval", 0.05)
        kwargs.setdefault("max_reconnect_interval", 0.2)
        kwargs.setdefault("connect_timeout", 2.0)
        self.validator_hotkey = validator_hotkey
        self.manager = MinerWebSocketManager(
            keypair, validators=[(validator_hotkey, url)], **kwargs
        )
        self.confirmations: list[dict[str, Any]] = []
        self.games: list[list[Any]] = []
        self.acks: list[dict[str, Any]] = []
        self.manager.register_handler("confirmation", self._on_confirmation)
        self.manager.register_handler("game_update", self._on_games)
        self.manager.register_handler("heartbeat_ack", self._on_ack)

    async def _on_confirmation(self, websocket: Any, message: Any) -> None:
        assert websocket.hotkey == self.validator_hotkey
        self.confirmations.append(dict(message.data))

    async def _on_games(self, websocket: Any, message: Any) -> None:
        self.games.append(list(message.games))

    async def _on_ack(self, websocket: Any, message: Any) -> None:
        self.acks.append(dict(message.data))

    def connected(self) -> bool:
        return self.validator_hotkey in self.manager.connected_validators

    async def send_prediction(self, pid: str) -> list[str]:
        result: list[str] = await self.manager.send(
            PredictionMessage(sender="", data=prediction_data(pid))
        )
        return result


class RecordingRefValidator(RefValidator):
    """RefValidator that also records how each connection was closed (code, reason)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.closes: list[tuple[int | None, str | None]] = []

    async def __aenter__(self) -> Self:
        await super().__aenter__()
        return self

    async def _handler(self, ws: Any) -> None:
        try:
            await super()._handler(ws)
        finally:
            await ws.wait_closed()
            self.closes.append((ws.close_code, ws.close_reason))


@contextlib.asynccontextmanager
async def our_miner(
    keypair: Keypair, validator_hotkey: str, url: str, **kwargs: Any
) -> AsyncIterator[tuple[OurMiner, TrioService]]:
    """Our miner in a Trio thread, for use inside asyncio code.

    It is stopped from a worker thread so that the asyncio loop (and the
    RefValidator on it) keeps running and can answer the miner's close frame.
    """
    miner = OurMiner(keypair, validator_hotkey, url, **kwargs)
    service = TrioService(miner.manager.run)
    await asyncio.to_thread(service.start)
    try:
        yield miner, service
    finally:
        loop = asyncio.get_running_loop()
        started = loop.time()
        await asyncio.to_thread(service.stop)
        assert loop.time() - started < 1.5, "miner shutdown waited on its close handshake"


def test_our_miner_against_refvalidator(alice: Keypair, bob: Keypair) -> None:
    async def scenario() -> None:
        async with RecordingRefValidator(
            alice,
            allowed={bob.ss58_address},
            games=[GAME, GAME2],
            welcome_features=["batch", "unknown-feature"],
        ) as rv:
            async with our_miner(
                bob, alice.ss58_address, rv.url, heartbeat_interval=0.2, features=["batch"]
            ) as (miner, svc):
                await svc.acall(miner.manager.wait_connected, alice.ss58_address)
                assert rv.connected == {bob.ss58_address}
                [auth] = rv.auth_frames
                assert auth["hotkey"] == bob.ss58_address
                assert auth["features"] == ["batch"]  # signed with the auth frame

                def negotiated() -> frozenset[str]:
                    conn = miner.manager.connection(alice.ss58_address)
                    assert conn is not None
                    return conn.features

                assert await svc.acall_sync(negotiated) == {"batch"}

                # the game_update RefValidator sends right after the welcome
                await eventually(lambda: miner.games)
                [games] = miner.games
                assert [g.game_id for g in games] == ["g1", 2]
                assert games[0].team_a == "A" and games[0].team_a_odds == 1.8
                assert games[1].team_a == GAME2["team_a"] and games[1].tie_odds == 1e16

                # prediction -> RefValidator's confirmation reaches our handler
                delivered = await svc.acall(miner.send_prediction, "m-1")
                assert delivered == [alice.ss58_address]
                await eventually(lambda: miner.confirmations)
                [conf] = miner.confirmations
                assert conf["prediction_id"] == "m-1" and conf["status"] == "success"
                assert rv.predictions == [(bob.ss58_address, prediction_data("m-1"))]

                # non-ASCII text and awkward floats survive signing both ways
                delivered = await svc.acall(miner.send_prediction, "m-\u00e9-\u26bd")
                assert delivered == [alice.ss58_address]
                await eventually(lambda: len(miner.confirmations) == 2)
                assert miner.confirmations[1]["prediction_id"] == "m-\u00e9-\u26bd"

                # our heartbeats (every 0.2 s) get RefValidator's acks
                await eventually(lambda: len(miner.acks) >= 2)
                beats = [e for e in rv.received if e["type"] == "heartbeat"]
                assert len(beats) >= 2
                assert all(e["sender"] == bob.ss58_address for e in beats)

                # a validator broadcast arrives too
                assert await rv.broadcast("game_update", {"games": [], "timestamp": now_iso()}) == 1
                await eventually(lambda: len(miner.games) == 2)
                assert miner.games[1] == []

                # RefValidator found nothing wrong with anything we sent
                assert rv.errors == []
                assert miner.manager.last_error == {}
            # cancelling our miner closed its link with 1001
            await rv.wait_for(lambda: bool(rv.closes))
            assert rv.closes == [(1001, "Going away")]

    asyncio.run(scenario())


class ForgingRefValidator(RecordingRefValidator):
    """An impostor that claims ``claimed`` as sender but can only sign with its own key."""

    def __init__(self, keypair: Keypair, claimed: str, **kwargs: Any) -> None:
        super().__init__(keypair, **kwargs)
        self.claimed = claimed

    async def _send(self, ws: Any, type_: str, data: dict[str, Any]) -> None:
        env = sign_envelope(self.keypair, type_, data)
        env["sender"] = self.claimed
        await ws.send(json.dumps(env))


@pytest.mark.parametrize("forge", [False, True], ids=["other-key", "forged-sender"])
def test_our_miner_refuses_impostor_validator(
    alice: Keypair, bob: Keypair, charlie: Keypair, forge: bool
) -> None:
    async def scenario() -> None:
        # the peer at the URL signs with charlie's key, but we expect alice; it
        # either says it is charlie, or claims alice's hotkey with charlie's signature
        impostor = (
            ForgingRefValidator(charlie, alice.ss58_address, games=[GAME])
            if forge
            else RecordingRefValidator(charlie, games=[GAME])
        )
        async with impostor as rv:
            async with our_miner(bob, alice.ss58_address, rv.url) as (miner, svc):
                await eventually(lambda: alice.ss58_address in miner.manager.last_error)
                error = miner.manager.last_error[alice.ss58_address]
                assert "welcome" in error, error
                assert not await svc.acall_sync(miner.connected)
                assert await svc.acall(miner.send_prediction, "never") == []
                # it keeps retrying (with backoff) and keeps refusing
                await eventually(lambda: len(rv.auth_frames) >= 2)
                assert not await svc.acall_sync(miner.connected)
                # each time we hung up on it with 1008 right after its Welcome
                await rv.wait_for(lambda: len(rv.closes) >= 2)
                assert [code for code, _ in rv.closes[:2]] == [1008, 1008], rv.closes
                assert miner.games == [] and miner.confirmations == [] and miner.acks == []
            await rv.wait_for(lambda: not rv.connected)
            # nothing was sent to the impostor after the handshake
            assert rv.received == [] and rv.predictions == []

    asyncio.run(scenario())


def test_our_miner_refused_by_refvalidator(alice: Keypair, bob: Keypair, charlie: Keypair) -> None:
    async def scenario() -> None:
        async with RefValidator(alice, allowed={charlie.ss58_address}) as rv:
            async with our_miner(bob, alice.ss58_address, rv.url) as (miner, svc):
                await eventually(lambda: alice.ss58_address in miner.manager.last_error)
                error = miner.manager.last_error[alice.ss58_address]
                assert "Hotkey not registered" in error, error
                assert not await svc.acall_sync(miner.connected)
            assert (None, "Hotkey not registered") in rv.errors

    asyncio.run(scenario())


def test_our_miner_reconnects_after_refvalidator_restart(alice: Keypair, bob: Keypair) -> None:
    async def scenario() -> None:
        async with contextlib.AsyncExitStack() as first_life:
            rv1 = await first_life.enter_async_context(RefValidator(alice))
            port = rv1.port
            async with our_miner(bob, alice.ss58_address, rv1.url) as (miner, svc):
                await svc.acall(miner.manager.wait_connected, alice.ss58_address)
                assert await svc.acall(miner.send_prediction, "before") == [alice.ss58_address]
                await eventually(lambda: len(miner.confirmations) == 1)
                assert [d["prediction_id"] for _, d in rv1.predictions] == ["before"]

                await first_life.aclose()  # the validator goes away (closes with 1001)
                await eventually(lambda: not miner.connected())
                assert await svc.acall(miner.send_prediction, "lost") == []
                await asyncio.sleep(0.3)  # a few refused reconnect attempts

                async with RefValidator(alice, port=port) as rv2:
                    await svc.acall(miner.manager.wait_connected, alice.ss58_address)
                    await rv2.wait_for(lambda: rv2.connected == {bob.ss58_address})
                    assert await svc.acall(miner.send_prediction, "after") == [alice.ss58_address]
                    await eventually(lambda: len(miner.confirmations) == 2)
                    assert miner.confirmations[1]["prediction_id"] == "after"
                    assert [d["prediction_id"] for _, d in rv2.predictions] == ["after"]
                    assert rv2.errors == []
                    stats = await svc.acall_sync(miner.manager.stats)
                    assert stats["reconnects"] >= 1
                    assert stats["connections_total"] == 2
                await rv2.wait_for(lambda: not rv2.connected)

    asyncio.run(scenario())
