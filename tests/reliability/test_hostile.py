"""Hostile input against our validator over real loopback sockets (issue 6, item 3).

Every case states the answer the validator must give, checks that no handler
ran for the refused frame, and then checks that the server still serves a good
miner. The attack at scale (2,000 connections that never authenticate) and the
latency comparison (quiet run vs. flood + slowloris + garbage, attacker in its
own process) have a short form here and a long form marked ``reliability``.

Hostile peers are a bare trio-websocket client, or ``RawWS`` (hand-written
frames over a TCP stream) for what trio-websocket refuses to send: text frames
that are not UTF-8, and connections that stop after the HTTP upgrade.
"""

from __future__ import annotations

import base64
import contextlib
import gc
import os
import signal
import statistics
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
import psutil
import pytest
import trio
import trio_websocket
from bittensor_wallet import Keypair
from trio_websocket import ConnectionClosed, WebSocketConnection

from bettensor_ws import ValidatorWebSocketManager
from bettensor_ws.protocol.auth import build_auth
from bettensor_ws.protocol.codec import decode, encode
from bettensor_ws.protocol.messages import (
    ConfirmationMessage,
    ErrorMessage,
    PredictionMessage,
    WebSocketMessage,
    WelcomeMessage,
)
from bettensor_ws.protocol.signing import sign, sign_dict
from tests.helpers import bare_refusal, count_tasks

STEP = 10.0  # generous bound on any single exchange over loopback
MiB = 1 << 20


@pytest.fixture(scope="module")
def mallory() -> Keypair:
    return Keypair.create_from_uri("//Mallory")


# ---- the server under attack ------------------------------------------------------------------


class Handler:
    """A prediction handler that counts its calls and confirms each prediction."""

    def __init__(self) -> None:
        self.calls = 0
        self.ids: list[str] = []

    async def __call__(self, websocket: Any, message: WebSocketMessage) -> None:
        self.calls += 1
        pid = str(message.data.get("prediction_id"))
        self.ids.append(pid)
        await websocket.send_json(
            {"type": "confirmation", "status": "success", "prediction_id": pid, "message": "ok"}
        )


@asynccontextmanager
async def serving(validator: ValidatorWebSocketManager) -> AsyncIterator[int]:
    """Serve on 127.0.0.1, port 0; the port. Any error escaping ``serve`` fails the test."""
    async with trio.open_nursery() as nursery:
        port: int = await nursery.start(validator.serve)
        try:
            yield port
        finally:
            nursery.cancel_scope.cancel()


def make_validator(keypair: Keypair, **kwargs: Any) -> tuple[ValidatorWebSocketManager, Handler]:
    validator = ValidatorWebSocketManager(keypair, **kwargs)
    handler = Handler()
    validator.register_handler("prediction", handler)
    return validator, handler


# ---- clients ----------------------------------------------------------------------------------


def url(port: int) -> str:
    return f"ws://127.0.0.1:{port}/ws"


def iso(offset_seconds: float = 0.0) -> str:
    return (datetime.now(UTC) + timedelta(seconds=offset_seconds)).isoformat()


def prediction(keypair: Keypair, pid: str, **overrides: Any) -> PredictionMessage:
    data: dict[str, Any] = {
        "prediction_id": pid,
        "game_id": "g1",
        "miner_uid": 7,
        "predicted_outcome": "A",
        "predicted_odds": 1.8,
        "team_a": "A",
        "team_b": "B",
        "wager": 1.0,
    }
    data.update(overrides)
    return PredictionMessage(sender=keypair.ss58_address, data=data)


def signed(message: WebSocketMessage, keypair: Keypair) -> str:
    return encode(sign(message, keypair))


def envelope_text(keypair: Keypair, data_json: str, *, nonce: str = "n-raw") -> str:
    """An envelope written by hand around ``data_json`` (which need not be valid JSON)."""
    return (
        f'{{"type": "prediction", "sender": "{keypair.ss58_address}", "data": {data_json}, '
        f'"timestamp": "{iso()}", "nonce": "{nonce}", "signature": null}}'
    )


async def expect_close(ws: WebSocketConnection) -> tuple[int, str | None, list[str | bytes]]:
    """Drain until the server closes: (code, reason, what came before the close)."""
    got: list[str | bytes] = []
    with trio.fail_after(STEP):
        try:
            while True:
                got.append(await ws.get_message())
        except ConnectionClosed as closed:
            assert closed.reason is not None
            return closed.reason.code, closed.reason.reason, got


@asynccontextmanager
async def client(port: int) -> AsyncIterator[WebSocketConnection]:
    async with trio_websocket.open_websocket_url(url(port), max_message_size=16 * MiB) as ws:
        yield ws


async def authenticate(ws: WebSocketConnection, keypair: Keypair) -> None:
    await ws.send_message(orjson.dumps(build_auth(keypair)).decode())
    with trio.fail_after(STEP):
        welcome = decode(await ws.get_message())
    assert isinstance(welcome, WelcomeMessage)


async def answer(ws: WebSocketConnection) -> WebSocketMessage:
    with trio.fail_after(STEP):
        return decode(await ws.get_message())


async def expect_error(ws: WebSocketConnection, reason_prefix: str) -> ErrorMessage:
    """The next frame is a signed error starting with ``reason_prefix``; the link stays open."""
    reply = await answer(ws)
    assert isinstance(reply, ErrorMessage), reply
    assert reply.message.startswith(reason_prefix), reply.message
    return reply


async def auth_refused(port: int, first: str | bytes) -> tuple[dict[str, Any], int, str | None]:
    """Send ``first`` as the auth frame: the bare error reply and the close."""
    async with client(port) as ws:
        await ws.send_message(first)
        code, reason, got = await expect_close(ws)
    assert len(got) == 1, got
    return bare_refusal(got[0]), code, reason


_good = 0


async def assert_serves(port: int, keypair: Keypair, handler: Handler) -> None:
    """A good miner still authenticates and gets its prediction confirmed."""
    global _good
    _good += 1
    pid = f"good-{_good}"
    before = handler.calls
    async with client(port) as ws:
        await authenticate(ws, keypair)
        await ws.send_message(signed(prediction(keypair, pid), keypair))
        reply = await answer(ws)
        assert isinstance(reply, ConfirmationMessage), reply
        assert reply.data["prediction_id"] == pid and reply.data["status"] == "success"
    assert handler.calls == before + 1


class RawWS:
    """A WebSocket client written by hand, to send what a library would not."""

    def __init__(self, stream: trio.SocketStream, buffered: bytes = b"") -> None:
        self.stream = stream
        self.buf = bytearray(buffered)

    @classmethod
    async def connect(cls, port: int, *, upgrade: bool = True) -> RawWS:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        if not upgrade:
            return cls(stream)
        key = base64.b64encode(os.urandom(16)).decode()
        await stream.send_all(
            (
                f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )
        raw = cls(stream)
        head = await raw._read_until(b"\r\n\r\n")
        assert head.split(b"\r\n", 1)[0].split(b" ")[1] == b"101", head
        return raw

    async def _fill(self) -> bool:
        chunk = await self.stream.receive_some(65536)
        self.buf += chunk
        return bool(chunk)

    async def _read_until(self, marker: bytes) -> bytes:
        while marker not in self.buf:
            if not await self._fill():
                raise EOFError
        head, _, rest = bytes(self.buf).partition(marker)
        self.buf = bytearray(rest)
        return head

    async def _read(self, n: int) -> bytes:
        while len(self.buf) < n:
            if not await self._fill():
                raise EOFError
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    async def send_frame(self, opcode: int, payload: bytes) -> None:
        n = len(payload)
        head = bytes([0x80 | opcode])
        if n < 126:
            head += bytes([0x80 | n])
        elif n < 1 << 16:
            head += bytes([0x80 | 126]) + n.to_bytes(2, "big")
        else:
            head += bytes([0x80 | 127]) + n.to_bytes(8, "big")
        # a zero masking key is legal and leaves the payload as it is
        await self.stream.send_all(head + b"\0\0\0\0" + payload)

    async def recv_frame(self) -> tuple[int, bytes]:
        b0, b1 = await self._read(2)
        n = b1 & 0x7F
        if n == 126:
            n = int.from_bytes(await self._read(2), "big")
        elif n == 127:
            n = int.from_bytes(await self._read(8), "big")
        return b0 & 0x0F, await self._read(n)

    async def until_close(self, within: float = STEP) -> tuple[int | None, str, list[bytes]]:
        """Frames until the close frame (code, reason); code None if the TCP stream just ended."""
        got: list[bytes] = []
        with trio.fail_after(within):
            while True:
                try:
                    opcode, payload = await self.recv_frame()
                except (EOFError, trio.BrokenResourceError):
                    return None, "", got
                if opcode == 0x8:
                    code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else None
                    return code, payload[2:].decode(), got
                got.append(payload)

    async def aclose(self) -> None:
        await trio.aclose_forcefully(self.stream)


def rss() -> int:
    gc.collect()
    return int(psutil.Process().memory_info().rss)


# ---- the handshake ----------------------------------------------------------------------------


async def test_forged_signature(alice: Keypair, bob: Keypair, charlie: Keypair) -> None:
    validator, handler = make_validator(alice)
    async with serving(validator) as port:
        # auth frame claiming bob's hotkey, signed by charlie: bare error, 1008
        forged = build_auth(charlie)
        forged["hotkey"] = bob.ss58_address
        assert await auth_refused(port, orjson.dumps(forged).decode()) == (
            {"status": "error", "message": "bad signature"},
            1008,
            "bad signature",
        )
        # auth frame tampered after signing
        tampered = build_auth(bob)
        tampered["nonce"] += "x"
        assert (await auth_refused(port, orjson.dumps(tampered).decode()))[0][
            "message"
        ] == "bad signature"
        # a prediction signed by someone else after a good handshake: error, link open
        async with client(port) as ws:
            await authenticate(ws, bob)
            message = sign(prediction(bob, "forged"), charlie)
            message.sender = bob.ss58_address
            await ws.send_message(encode(message))
            error = await expect_error(ws, "bad signature")
            assert error.data["refused_nonce"] == message.nonce
            # an unsigned one too
            await ws.send_message(
                envelope_text(bob, orjson.dumps(prediction(bob, "u").data).decode())
            )
            await expect_error(ws, "bad signature")
            await ws.send_message(signed(prediction(bob, "ok"), bob))
            assert isinstance(await answer(ws), ConfirmationMessage)
        assert handler.ids == ["ok"]
        await assert_serves(port, bob, handler)
    assert validator.stats()["rejections"]["bad signature"] == 4


async def test_replayed_nonce_same_connection_and_after_reconnect(
    alice: Keypair, bob: Keypair
) -> None:
    validator, handler = make_validator(alice)
    async with serving(validator) as port:
        frame = signed(prediction(bob, "once"), bob)
        auth = orjson.dumps(build_auth(bob)).decode()
        async with client(port) as ws:
            await ws.send_message(auth)
            assert isinstance(await answer(ws), WelcomeMessage)
            await ws.send_message(frame)
            assert isinstance(await answer(ws), ConfirmationMessage)
            await ws.send_message(frame)  # same connection
            await expect_error(ws, "replayed nonce")
        async with client(port) as ws:
            await authenticate(ws, bob)
            await ws.send_message(frame)  # after a reconnect
            await expect_error(ws, "replayed nonce")
        # the auth frame itself replayed on a new connection
        assert await auth_refused(port, auth) == (
            {"status": "error", "message": "replayed nonce"},
            1008,
            "replayed nonce",
        )
        assert handler.ids == ["once"]
        await assert_serves(port, bob, handler)


@pytest.mark.parametrize(
    "offset, reason", [(-600, "stale timestamp (600s old)"), (600, "future timestamp (600s ahead)")]
)
async def test_timestamp_ten_minutes_off(
    alice: Keypair, bob: Keypair, offset: int, reason: str
) -> None:
    validator, handler = make_validator(alice)
    async with serving(validator) as port:
        reply, code, close_reason = await auth_refused(
            port, orjson.dumps(build_auth(bob, timestamp=iso(offset))).decode()
        )
        assert (reply, code, close_reason) == ({"status": "error", "message": reason}, 1008, reason)
        async with client(port) as ws:
            await authenticate(ws, bob)
            envelope = sign(prediction(bob, "skewed"), bob).to_dict()
            envelope["timestamp"] = iso(offset)
            await ws.send_message(orjson.dumps(sign_dict(envelope, bob)).decode())
            await expect_error(ws, reason.split(" (")[0])
        assert handler.calls == 0
        await assert_serves(port, bob, handler)


async def test_sender_other_than_authenticated(
    alice: Keypair, bob: Keypair, charlie: Keypair
) -> None:
    validator, handler = make_validator(alice)
    async with serving(validator) as port:
        async with client(port) as ws:
            await authenticate(ws, bob)
            # properly signed by charlie, sent on bob's link
            await ws.send_message(signed(prediction(charlie, "theirs"), charlie))
            await expect_error(ws, "sender does not match the authenticated hotkey")
        assert handler.calls == 0
        await assert_serves(port, bob, handler)


async def test_unregistered_hotkey(alice: Keypair, bob: Keypair, charlie: Keypair) -> None:
    validator, handler = make_validator(alice, metagraph=[bob.ss58_address])
    async with serving(validator) as port:
        assert await auth_refused(port, orjson.dumps(build_auth(charlie)).decode()) == (
            {"status": "error", "message": "hotkey not registered"},
            1008,
            "hotkey not registered",
        )
        assert validator.connected_hotkeys == []
        assert handler.calls == 0
        await assert_serves(port, bob, handler)


# ---- frames after the handshake ---------------------------------------------------------------


async def test_frame_over_size_limit_closes_1009(alice: Keypair, bob: Keypair) -> None:
    validator, handler = make_validator(alice, max_message_size=64 * 1024)
    async with serving(validator) as port:
        for before_auth in (True, False):
            async with client(port) as ws:
                if not before_auth:
                    await authenticate(ws, bob)
                big = signed(prediction(bob, "big", model_name="x" * 70_000), bob)
                await ws.send_message(big)
                code, _, got = await expect_close(ws)
            assert code == 1009 and got == []
        assert handler.calls == 0
        await assert_serves(port, bob, handler)


async def test_binary_frame(alice: Keypair, bob: Keypair) -> None:
    validator, handler = make_validator(alice)
    async with serving(validator) as port:
        payload = signed(prediction(bob, "bin"), bob).encode()
        # a binary auth frame that is not JSON: malformed, 1008 (a binary frame holding a
        # valid auth frame is accepted, as the reference validator does)
        reply, code, _ = await auth_refused(port, b"\x00\x01binary")
        assert code == 1008 and reply["message"].startswith("malformed auth frame: invalid JSON")
        async with client(port) as ws:
            await authenticate(ws, bob)
            await ws.send_message(payload)  # a valid prediction, but binary
            await expect_error(ws, "binary frames are not supported; send JSON text")
            await ws.send_message(signed(prediction(bob, "after"), bob))
            assert isinstance(await answer(ws), ConfirmationMessage)
        assert handler.ids == ["after"]
        await assert_serves(port, bob, handler)


async def test_invalid_utf8(alice: Keypair, bob: Keypair) -> None:
    validator, handler = make_validator(alice)
    junk = b'{"type": "prediction", "data": "\xff\xfe\xc3\x28"}'
    async with serving(validator) as port:
        # as a binary frame: refused like any binary frame, link stays open
        async with client(port) as ws:
            await authenticate(ws, bob)
            await ws.send_message(junk)
            await expect_error(ws, "binary frames are not supported")
        # as raw bytes in a text frame: wsproto fails the frame (1007 invalid payload) and
        # trio-websocket then ends the TCP stream without sending a close frame
        for authenticated in (False, True):
            raw = await RawWS.connect(port)
            try:
                if authenticated:
                    await raw.send_frame(0x1, orjson.dumps(build_auth(bob)))
                    opcode, welcome = await raw.recv_frame()
                    assert isinstance(decode(welcome.decode()), WelcomeMessage)
                await raw.send_frame(0x1, junk)
                code, _, got = await raw.until_close()
            finally:
                await raw.aclose()
            assert code in (None, 1007) and got == []
        assert handler.calls == 0
        await assert_serves(port, bob, handler)


async def test_nesting_100000_deep(alice: Keypair, bob: Keypair) -> None:
    validator, handler = make_validator(alice)
    deep = "[" * 100_000 + "]" * 100_000
    async with serving(validator) as port:
        reply, code, _ = await auth_refused(port, deep)
        assert code == 1008 and reply["message"].startswith(
            "malformed auth frame: nesting too deep"
        )
        async with client(port) as ws:
            await authenticate(ws, bob)
            await ws.send_message(deep)
            await expect_error(ws, "nesting too deep (more than 32 levels)")
            await ws.send_message(envelope_text(bob, '{"x": ' + deep + "}"))
            await expect_error(ws, "nesting too deep (more than 32 levels)")
            await ws.send_message(envelope_text(bob, "{" + '"a":{' * 100_000 + "}" * 100_001))
            await expect_error(ws, "nesting too deep (more than 32 levels)")
        assert handler.calls == 0
        await assert_serves(port, bob, handler)


async def test_ten_megabyte_string(alice: Keypair, bob: Keypair) -> None:
    ten_mb = "x" * (10 * MiB)
    big_prediction = signed(prediction(bob, "huge", model_name=ten_mb), bob)
    # default 1 MiB limit: 1009 before anything is parsed
    validator, handler = make_validator(alice)
    async with serving(validator) as port:
        async with client(port) as ws:
            await authenticate(ws, bob)
            try:
                await ws.send_message(big_prediction)
            except ConnectionClosed:
                pass
            code, _, _ = await expect_close(ws)
        assert code == 1009
        assert handler.calls == 0
        await assert_serves(port, bob, handler)
    # raised limit: a bare 10 MB string is a clean decode error; a signed prediction carrying
    # one is handled like any other
    validator, handler = make_validator(alice, max_message_size=16 * MiB)
    async with serving(validator) as port:
        async with client(port) as ws:
            await authenticate(ws, bob)
            await ws.send_message(orjson.dumps(ten_mb).decode())
            await expect_error(ws, "expected a JSON object, got the string 'xxxx")
            await ws.send_message(envelope_text(bob, orjson.dumps({"s": ten_mb}).decode()))
            await expect_error(ws, "data.")  # fails the prediction's field check
            assert handler.calls == 0
            # a signed prediction carrying one is over the 4 KiB a prediction may be
            await ws.send_message(big_prediction)
            await expect_error(ws, "data: prediction of 10485")
            assert handler.calls == 0
        assert handler.calls == 0
        await assert_serves(port, bob, handler)


@pytest.mark.parametrize("literal", ["1e400", "-1e400", "NaN", "Infinity"])
async def test_non_finite_numbers(alice: Keypair, bob: Keypair, literal: str) -> None:
    validator, handler = make_validator(alice)
    async with serving(validator) as port:
        data = (
            orjson.dumps(prediction(bob, "nf").data)
            .decode()
            .replace('"wager":1.0', f'"wager":{literal}')
        )
        assert literal in data
        reply, code, _ = await auth_refused(port, '{"hotkey": "x", "n": ' + literal + "}")
        assert code == 1008 and reply["message"].startswith(
            "malformed auth frame: non-finite number"
        )
        async with client(port) as ws:
            await authenticate(ws, bob)
            await ws.send_message(envelope_text(bob, data))
            error = await expect_error(ws, "non-finite number")
            assert error.data["refused_nonce"] if "nonce" in error.data else True
            await ws.send_message(literal)
            await expect_error(ws, "non-finite number")
        assert handler.calls == 0
        await assert_serves(port, bob, handler)


# ---- connections that never authenticate ------------------------------------------------------


async def test_slowloris_auth_frame_never_sent(alice: Keypair, bob: Keypair) -> None:
    auth_timeout = 0.5
    validator, handler = make_validator(alice, auth_timeout=auth_timeout)
    async with serving(validator) as port:
        # upgraded, then silent: the bare error and 1008 "auth timeout" after auth_timeout
        start = trio.current_time()
        async with client(port) as ws:
            code, reason, got = await expect_close(ws)
        waited = trio.current_time() - start
        assert (code, reason, [bare_refusal(g) for g in got]) == (
            1008,
            "auth timeout",
            [{"status": "error", "message": "auth timeout"}],
        )
        assert auth_timeout * 0.9 <= waited <= auth_timeout + 2.0
        # TCP connected, never sends the HTTP upgrade: dropped within auth_timeout
        start = trio.current_time()
        raw = await RawWS.connect(port, upgrade=False)
        try:
            with trio.fail_after(auth_timeout + 2.0):
                try:
                    assert await raw.stream.receive_some(4096) == b""
                except trio.BrokenResourceError:
                    pass  # a reset is a drop too
        finally:
            await raw.aclose()
        assert trio.current_time() - start >= auth_timeout * 0.9
        # half an upgrade request, then silence: dropped too
        raw = await RawWS.connect(port, upgrade=False)
        try:
            await raw.stream.send_all(b"GET /ws HTTP/1.1\r\nHost: x\r\n")
            with trio.fail_after(auth_timeout + 2.0):
                try:
                    assert await raw.stream.receive_some(4096) == b""
                except trio.BrokenResourceError:
                    pass
        finally:
            await raw.aclose()
        assert validator.stats()["rejections"] == {"auth timeout": 1}
        assert handler.calls == 0
        await assert_serves(port, bob, handler)


async def never_authenticate(alice: Keypair, bob: Keypair, count: int) -> dict[str, float]:
    """``count`` upgraded connections that never send the auth frame, all at once.

    While they are open a good miner is served; they are all dropped by the auth
    timeout; the validator's tasks return to their number before, and RSS stays bounded.
    """
    auth_timeout = 3.0 if count <= 500 else 10.0
    validator, handler = make_validator(alice, auth_timeout=auth_timeout)
    async with serving(validator) as port:
        await assert_serves(port, bob, handler)  # warm up
        tasks_before, rss_before = count_tasks(), rss()
        raws: list[RawWS] = []
        try:
            async with trio.open_nursery() as nursery:
                limiter = trio.CapacityLimiter(100)

                async def open_one() -> None:
                    async with limiter:
                        raws.append(await RawWS.connect(port))

                for _ in range(count):
                    nursery.start_soon(open_one)
            opened_at = trio.current_time()
            tasks_peak, rss_peak = count_tasks(), rss()
            await assert_serves(port, bob, handler)  # served while they are all open
            # every one of them gets "auth timeout" and 1008
            closes: list[int | None] = []

            async def wait_close(raw: RawWS) -> None:
                # the bound asserted below; the last ones opened are refused only then
                code, _, _ = await raw.until_close(within=auth_timeout + 5.0)
                closes.append(code)

            async with trio.open_nursery() as nursery:
                for raw in raws:
                    nursery.start_soon(wait_close, raw)
            dropped_after = trio.current_time() - opened_at
        finally:
            for raw in raws:
                await raw.aclose()
        assert closes.count(1008) == count, {c: closes.count(c) for c in set(closes)}
        assert dropped_after <= auth_timeout + 5.0
        await trio.sleep(0.2)
        tasks_after, rss_after = count_tasks(), rss()
        assert validator.stats()["rejections"] == {"auth timeout": count}
        await assert_serves(port, bob, handler)
        assert handler.calls == 3
    per_connection = (rss_peak - rss_before) / count
    figures = {
        "connections": count,
        "tasks_before": tasks_before,
        "tasks_peak": tasks_peak,
        "tasks_after": tasks_after,
        "rss_before_mb": rss_before / MiB,
        "rss_peak_mb": rss_peak / MiB,
        "rss_after_mb": rss_after / MiB,
        "rss_per_connection_kb": per_connection / 1024,
        "dropped_after_s": dropped_after,
    }
    print("never-authenticating connections:", {k: round(v, 2) for k, v in figures.items()})
    assert tasks_after <= tasks_before + 2, figures
    assert per_connection < 64 * 1024, figures  # bounded per connection (client side included)
    # the allocator keeps freed arenas, so RSS need not fall back; what stays is bounded by
    # the same per-connection budget, and the task count (exact) is back to where it was
    assert rss_after - rss_before < max(32 * MiB, count * 64 * 1024), figures
    return figures


async def test_200_connections_that_never_authenticate(alice: Keypair, bob: Keypair) -> None:
    await never_authenticate(alice, bob, 200)


@pytest.mark.reliability
async def test_2000_connections_that_never_authenticate(alice: Keypair, bob: Keypair) -> None:
    await never_authenticate(alice, bob, 2000)


# ---- flooding ---------------------------------------------------------------------------------


async def flood(
    port: int, keypair: Keypair, frames: list[str], seconds: float
) -> tuple[Any, list[WebSocketMessage], float]:
    """Send ``frames`` over and over as fast as possible until the server closes, or ``seconds``.

    Returns (the close reason or None, the replies read, seconds until the close).
    """
    replies: list[WebSocketMessage] = []
    closed: Any = None
    async with client(port) as ws:
        await authenticate(ws, keypair)
        start = trio.current_time()
        with trio.move_on_after(seconds):
            async with trio.open_nursery() as nursery:

                async def send() -> None:
                    with contextlib.suppress(ConnectionClosed):
                        while True:
                            for text in frames:
                                await ws.send_message(text)

                nursery.start_soon(send)
                try:
                    while True:
                        replies.append(decode(await ws.get_message()))
                except ConnectionClosed as exc:
                    closed = exc.reason
                nursery.cancel_scope.cancel()
        elapsed = trio.current_time() - start
    return closed, replies, elapsed


async def flooder_cools_down(port: int, flooder: Keypair) -> None:
    """Right after its close the flooder is refused, held half the auth timeout, and told when to retry."""
    start = trio.current_time()
    reply, code, reason = await auth_refused(port, orjson.dumps(build_auth(flooder)).decode())
    assert reply["message"].startswith("flood cooldown: retry in ") and (code, reason) == (
        1008,
        reply["message"],
    )
    assert trio.current_time() - start >= 0.9 * 0.5  # auth_timeout 1 s: held 0.5 s


async def test_flood_over_rate_limit(alice: Keypair, bob: Keypair, charlie: Keypair) -> None:
    """Over the rate a flooder is slowed (backpressure: no refusals), then closed 1008
    "rate limit exceeded" once it has kept the reader paced for ``flood_after``; the burst is
    handled. Then the flooder cools down; others are served.
    """
    rate, burst = 10.0, 200
    validator, handler = make_validator(
        alice, rate_limit=rate, rate_burst=burst, flood_after=2.0, auth_timeout=1.0
    )
    frames = [signed(prediction(bob, f"f{i}"), bob) for i in range(1000)]
    async with serving(validator) as port:
        closed, replies, elapsed = await flood(port, bob, frames, STEP)
        assert closed is not None, "the flooder was never closed"
        assert (closed.code, closed.reason) == (1008, "rate limit exceeded")
        confirmed = [r for r in replies if isinstance(r, ConfirmationMessage)]
        assert not [r for r in replies if isinstance(r, ErrorMessage)]
        # only frames within the budget reached the handler, each confirmed once
        assert burst <= handler.calls <= burst + rate * elapsed + 1
        assert [r.data["prediction_id"] for r in confirmed] == handler.ids[: len(confirmed)]
        assert validator.stats()["rejections"]["flooding"] == 1
        await flooder_cools_down(port, bob)
        assert validator.stats()["rejections"]["flood cooldown"] == 1
        await assert_serves(port, charlie, handler)


async def test_flood_at_default_rate_is_closed(
    alice: Keypair, bob: Keypair, charlie: Keypair
) -> None:
    validator, handler = make_validator(alice, auth_timeout=1.0)  # rate_limit=50, rate_burst=200
    async with serving(validator) as port:
        closed, replies, elapsed = await flood(port, bob, ["{}"], 20.0)
        refused = validator.stats()["rejections"]
        print(
            f"default-rate flood: {len(replies)} replies in {elapsed:.1f}s, closed={closed}, {refused}"
        )
        assert handler.calls == 0
        await assert_serves(port, charlie, handler)
        assert closed is not None and (closed.code, closed.reason) == (1008, "rate limit exceeded")
        await flooder_cools_down(port, bob)


# ---- latency of good miners during an attack --------------------------------------------------

ATTACKER = r"""
import os, sys, trio, orjson, trio_websocket
from bittensor_wallet import Keypair
from bettensor_ws.protocol.auth import build_auth

port, slowloris, parts = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3].split(",")
flood_rate, garbage_rate = float(sys.argv[4]), float(sys.argv[5])
url = f"ws://127.0.0.1:{port}/ws"
ready = trio.Event()

async def flood(name, frames, rate):
    key = Keypair.create_from_uri("//" + name)
    while True:
        try:
            async with trio_websocket.open_websocket_url(url) as ws:
                await ws.send_message(orjson.dumps(build_auth(key)).decode())
                await ws.get_message()
                ready.set()
                async def drain():
                    while True:
                        await ws.get_message()
                async with trio.open_nursery() as n:
                    n.start_soon(drain)
                    # paced in 10 ms ticks; rate 0 = as fast as the socket takes them
                    per_tick = max(1, int(rate / 100)) if rate else len(frames)
                    i = 0
                    while True:
                        for _ in range(per_tick):
                            await ws.send_message(frames[i % len(frames)])
                            i += 1
                        if rate:
                            await trio.sleep(0.01)
        except Exception:  # closed for flooding (maybe inside a nursery's group): come back
            await trio.sleep(0.01)

async def loris():
    while True:
        try:
            s = await trio.open_tcp_stream("127.0.0.1", port)
            await s.send_all(b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                             b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
            while await s.receive_some(65536):
                pass
        except (OSError, trio.BrokenResourceError):
            await trio.sleep(0.01)

async def orphan_watch():
    # the test kills us in its finally; if the test itself is killed, stop on our own
    parent = os.getppid()
    while os.getppid() == parent:
        await trio.sleep(0.5)
    os._exit(0)

async def main():
    deep = "[" * 100_000 + "]" * 100_000
    garbage = ["x", b"\xff\xfe", deep, '{"a": NaN}', "[1e400]", '"' + "y" * 50_000 + '"', "{}"]
    async with trio.open_nursery() as n:
        n.start_soon(orphan_watch)
        if "flood" in parts:
            n.start_soon(flood, "Flooder", ["{}"], flood_rate)
        if "garbage" in parts:
            n.start_soon(flood, "Garbler", garbage, garbage_rate)
        if not {"flood", "garbage"} & set(parts):
            ready.set()
        for _ in range(slowloris):
            n.start_soon(loris)
        await ready.wait()
        print("ready", flush=True)

trio.run(main)
"""


async def good_miner_latencies(
    port: int, keypair: Keypair, n: int, pace: float, tag: str
) -> list[float]:
    """Send ``n`` predictions one at a time, ``pace`` apart; prediction->confirmation times."""
    latencies = []
    async with client(port) as ws:
        await authenticate(ws, keypair)
        for i in range(n):
            text = signed(prediction(keypair, f"{tag}-{i}"), keypair)
            start = trio.current_time()
            await ws.send_message(text)
            reply = await answer(ws)
            latencies.append(trio.current_time() - start)
            assert isinstance(reply, ConfirmationMessage), reply
            await trio.sleep(pace)
    return latencies


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


async def latency_under_attack(
    alice: Keypair,
    miners: int,
    per_miner: int,
    repeats: int,
    parts: str = "flood,garbage",
    slowloris: int = 50,
    flood_rate: float = 1000.0,
    garbage_rate: float = 100.0,
    auth_timeout: float = 10.0,
) -> dict[str, Any]:
    """p99 prediction->confirmation of good miners: quiet runs and attacked runs, interleaved.

    The attacker is its own process (so its CPU is not ours), stopped with SIGSTOP for
    the quiet runs and resumed with SIGCONT for the attacked ones; the verdict compares
    the medians of the per-run p99s.
    """
    keys = [Keypair.create_from_uri(f"//Good{i}") for i in range(miners)]
    validator, handler = make_validator(alice, auth_timeout=auth_timeout)
    run = 0

    async def measure() -> float:
        nonlocal run
        run += 1
        results: list[list[float]] = [[] for _ in keys]

        async def one(i: int) -> None:
            results[i] = await good_miner_latencies(port, keys[i], per_miner, 0.02, f"r{run}m{i}")

        async with trio.open_nursery() as nursery:
            for i in range(len(keys)):
                nursery.start_soon(one, i)
        return p99([x for r in results for x in r])

    quiet: list[float] = []
    attack: list[float] = []
    async with serving(validator) as port:
        await measure()  # warm up
        args = [str(port), str(slowloris), parts, str(flood_rate), str(garbage_rate)]
        proc = await trio.lowlevel.open_process(
            [sys.executable, "-c", ATTACKER, *args],
            stdout=subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": os.getcwd()},
        )
        try:
            assert proc.stdout is not None
            line = b""
            with trio.fail_after(30):
                while not line.endswith(b"\n"):
                    chunk = await proc.stdout.receive_some(64)
                    assert chunk, "the attacker died"
                    line += chunk
            assert line.strip() == b"ready", line
            for _ in range(repeats):
                proc.send_signal(signal.SIGSTOP)
                await trio.sleep(0.5)  # let what the attacker had in flight drain
                quiet.append(await measure())
                proc.send_signal(signal.SIGCONT)
                await trio.sleep(0.3)
                assert proc.poll() is None
                attack.append(await measure())
            stats = validator.stats()
        finally:
            proc.send_signal(signal.SIGCONT)
            proc.kill()
            with trio.CancelScope(shield=True):
                await proc.wait()
        await assert_serves(port, keys[0], handler)
    figures = {
        "p99_quiet_ms": [round(q * 1000, 2) for q in quiet],
        "p99_attack_ms": [round(a * 1000, 2) for a in attack],
        "median_quiet_ms": round(statistics.median(quiet) * 1000, 2),
        "median_attack_ms": round(statistics.median(attack) * 1000, 2),
        "rejections": stats["rejections"],
        "paced_frames": stats["paced_frames"],
    }
    print("latency under attack:", figures)
    # the attack really happened: floods closed, garbage refused, slowloris timed out
    if slowloris and auth_timeout < 2:
        assert stats["rejections"].get("auth timeout", 0) >= slowloris, figures
    if "flood" in parts:  # slowed by backpressure (closed for flooding if it never pauses)
        assert stats["paced_frames"] >= 100 or stats["rejections"].get("flooding", 0) >= 1, figures
    assert handler.calls == miners * per_miner * (2 * repeats + 1) + 1
    assert statistics.median(attack) <= 2 * statistics.median(quiet), figures
    return figures


@pytest.mark.reliability  # a timing comparison: kept out of `make test` on shared 2-core machines
async def test_latency_under_attack_short(alice: Keypair) -> None:
    """Flood (1,000 frames/s, 20x the limit) + garbage + 50 slowloris held open."""
    await latency_under_attack(alice, miners=4, per_miner=50, repeats=3, auth_timeout=10.0)


@pytest.mark.reliability
async def test_latency_under_attack(alice: Keypair) -> None:
    """The same attack, longer: 4 miners x 200 predictions, 5 quiet and 5 attacked runs."""
    await latency_under_attack(alice, miners=4, per_miner=200, repeats=5, auth_timeout=10.0)


@pytest.mark.reliability
@pytest.mark.xfail(
    strict=False,
    reason="finding: 50 slowloris peers reconnecting as soon as they are dropped (auth_timeout 1 s) "
    "cost ~2 ms of server CPU per drop + new upgrade, ~10% of a core; the good miners' p99 rose "
    "~2.4-3x on a 2-core host even with the auth-deadline jitter (no hotkey: no cooldown applies)",
)
async def test_latency_under_attack_with_slowloris_churn(alice: Keypair) -> None:
    await latency_under_attack(alice, miners=4, per_miner=200, repeats=5, auth_timeout=1.0)
