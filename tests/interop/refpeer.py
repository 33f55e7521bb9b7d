"""Independent asyncio reference peer for the Bettensor miner/validator wire format.

Written from the wire-format spec only (asyncio + ``websockets`` + stdlib ``json`` +
``bittensor_wallet.Keypair``). It deliberately does not import ``bettensor_ws`` so it can
be used to check interoperability of the Trio implementation.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from http import HTTPStatus
from typing import Any, Self
from urllib.parse import urlsplit

from bittensor_wallet import Keypair
from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

ENVELOPE_KEYS = ("type", "sender", "data", "timestamp", "nonce", "signature")
AUTH_KEYS = ("hotkey", "timestamp", "nonce", "signature")
AUTH_MAX_SKEW = 300.0  # seconds
POLICY_VIOLATION = 1008
ABNORMAL_CLOSURE = 1006

__all__ = [
    "RefMiner",
    "RefValidator",
    "make_auth",
    "new_nonce",
    "now_iso",
    "sign_envelope",
    "signing_text",
    "verify_auth",
    "verify_envelope",
]


# --------------------------------------------------------------------------- signing


def new_nonce() -> str:
    """Return a fresh random nonce."""
    return uuid.uuid4().hex


def now_iso() -> str:
    """Current UTC time as ISO-8601 (``+00:00`` suffix)."""
    return datetime.now(UTC).isoformat()


def signing_text(obj: dict[str, Any]) -> str:
    """Canonical text that is signed: sorted keys, default separators, ensure_ascii."""
    return json.dumps({k: v for k, v in obj.items() if k != "signature"}, sort_keys=True)


def _verify(ss58: Any, text: str, sig_hex: Any) -> bool:
    try:
        if not isinstance(ss58, str) or not isinstance(sig_hex, str):
            return False
        return bool(Keypair(ss58_address=ss58).verify(text, bytes.fromhex(sig_hex)))
    except Exception:
        return False


def sign_envelope(
    keypair: Keypair,
    type_: str,
    data: dict[str, Any],
    *,
    timestamp: str | None = None,
    nonce: str | None = None,
) -> dict[str, Any]:
    """Build and sign an envelope ``{type, sender, data, timestamp, nonce, signature}``."""
    env: dict[str, Any] = {
        "type": type_,
        "sender": keypair.ss58_address,
        "data": data,
        "timestamp": timestamp if timestamp is not None else now_iso(),
        "nonce": nonce if nonce is not None else new_nonce(),
    }
    env["signature"] = keypair.sign(signing_text(env)).hex()
    return env


def verify_envelope(env: dict[str, Any]) -> bool:
    """True if ``env`` has exactly the envelope keys and a valid signature by ``sender``."""
    if not isinstance(env, dict) or set(env) != set(ENVELOPE_KEYS):
        return False
    if not isinstance(env["data"], dict):
        return False
    return _verify(env["sender"], signing_text(env), env["signature"])


def make_auth(
    keypair: Keypair,
    *,
    timestamp: str | None = None,
    nonce: str | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Build a signed auth frame; ``extra`` keys (e.g. ``features``) are signed too."""
    frame: dict[str, Any] = dict(extra or {})
    frame.update(
        hotkey=keypair.ss58_address,
        timestamp=timestamp if timestamp is not None else now_iso(),
        nonce=nonce if nonce is not None else new_nonce(),
    )
    frame["signature"] = keypair.sign(signing_text(frame)).hex()
    return frame


def verify_auth(frame: dict[str, Any]) -> bool:
    """True if the auth frame's signature (over all other keys) is valid for ``hotkey``."""
    if not isinstance(frame, dict) or not all(k in frame for k in AUTH_KEYS):
        return False
    return _verify(frame["hotkey"], signing_text(frame), frame["signature"])


def _parse_ts(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        ts = datetime.fromisoformat(value)
    except ValueError:
        return None
    return ts if ts.tzinfo is not None else ts.replace(tzinfo=UTC)


def _loads(raw: str | bytes) -> Any:
    return json.loads(raw.decode() if isinstance(raw, bytes) else raw)


# --------------------------------------------------------------------------- miner


class RefMiner:
    """asyncio miner client: ``async with RefMiner(kp, url) as m: ...``."""

    def __init__(
        self,
        keypair: Keypair,
        url: str,
        *,
        auth: dict[str, Any] | str | bytes | None = None,
        features: list[str] | None = None,
        read_welcome: bool = True,
        open_timeout: float = 10.0,
    ) -> None:
        self.keypair = keypair
        self.url = url
        self.auth_override = auth
        self.features = features
        self.read_welcome = read_welcome
        self.open_timeout = open_timeout
        self.ws: ClientConnection | None = None
        self.auth_sent: dict[str, Any] | str | bytes | None = None
        self.welcome: dict[str, Any] | None = None
        self.skipped: list[dict[str, Any]] = []
        self.close_code: int | None = None
        self.close_reason: str | None = None

    @property
    def hotkey(self) -> str:
        return str(self.keypair.ss58_address)

    async def __aenter__(self) -> RefMiner:
        self.ws = await connect(self.url, open_timeout=self.open_timeout)
        if self.auth_override is not None:
            auth = self.auth_override
        else:
            extra = {"features": list(self.features)} if self.features is not None else None
            auth = make_auth(self.keypair, extra=extra)
        self.auth_sent = auth
        if isinstance(auth, dict):
            await self.send_json(auth)
        else:
            await self.send_raw(auth)
        if self.read_welcome:
            try:
                self.welcome = await self.recv_json(timeout=self.open_timeout)
            except ConnectionClosed:
                self.welcome = None
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _record_close(self, exc: ConnectionClosed) -> None:
        if exc.rcvd is not None:
            self.close_code, self.close_reason = exc.rcvd.code, exc.rcvd.reason
        else:
            self.close_code, self.close_reason = ABNORMAL_CLOSURE, ""

    def _conn(self) -> ClientConnection:
        if self.ws is None:
            raise RuntimeError("RefMiner is not connected")
        return self.ws

    async def recv_json(self, timeout: float = 5.0) -> dict[str, Any]:  # noqa: ASYNC109
        """Next frame, parsed as JSON. Raises ConnectionClosed / TimeoutError."""
        try:
            async with asyncio.timeout(timeout):
                raw = await self._conn().recv()
        except ConnectionClosed as exc:
            self._record_close(exc)
            raise
        obj: dict[str, Any] = _loads(raw)
        return obj

    async def send_raw(self, payload: str | bytes) -> None:
        try:
            await self._conn().send(payload)
        except ConnectionClosed as exc:
            self._record_close(exc)
            raise

    async def send_json(self, obj: Any) -> None:
        await self.send_raw(json.dumps(obj))

    async def send_signed(self, type_: str, data: dict[str, Any]) -> dict[str, Any]:
        """Sign and send an envelope; return it."""
        env = sign_envelope(self.keypair, type_, data)
        await self.send_json(env)
        return env

    async def expect(self, type_: str, timeout: float = 5.0) -> dict[str, Any]:  # noqa: ASYNC109
        """Read frames until one has ``"type" == type_``; others go to ``self.skipped``."""
        async with asyncio.timeout(timeout):
            while True:
                frame = await self.recv_json(timeout=timeout)
                if isinstance(frame, dict) and frame.get("type") == type_:
                    return frame
                self.skipped.append(frame)

    async def wait_closed(
        self,
        timeout: float = 5.0,  # noqa: ASYNC109
    ) -> tuple[int | None, str | None]:
        """Drain frames (into ``skipped``) until the peer closes; return (code, reason)."""
        if self.close_code is not None:
            return self.close_code, self.close_reason
        try:
            async with asyncio.timeout(timeout):
                while True:
                    raw = await self._conn().recv()
                    try:
                        self.skipped.append(_loads(raw))
                    except ValueError:
                        self.skipped.append({"raw": raw})
        except ConnectionClosed as exc:
            self._record_close(exc)
        return self.close_code, self.close_reason

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()


# --------------------------------------------------------------------------- validator


class RefValidator:
    """asyncio validator server on 127.0.0.1: ``async with RefValidator(kp) as v: ...``."""

    def __init__(
        self,
        keypair: Keypair,
        allowed: set[str] | list[str] | None = None,
        games: list[dict[str, Any]] | None = None,
        *,
        port: int = 0,
        welcome_features: list[str] | None = None,
        auth_timeout: float = 10.0,
    ) -> None:
        self.keypair = keypair
        self.allowed = set(allowed) if allowed is not None else None
        self.games = games
        self.port = port
        self.welcome_features = welcome_features
        self.auth_timeout = auth_timeout
        self.server: Server | None = None
        self.conns: dict[ServerConnection, str] = {}
        self.received: list[dict[str, Any]] = []
        self.predictions: list[tuple[str, dict[str, Any]]] = []
        self.auth_frames: list[dict[str, Any]] = []
        self.errors: list[tuple[str | None, str]] = []  # (hotkey, message) of errors sent
        self._seen_nonces: dict[str, set[str]] = {}
        self._seen_auth_nonces: dict[str, set[str]] = {}
        self._pred_ids: dict[str, set[Any]] = {}

    @property
    def hotkey(self) -> str:
        return str(self.keypair.ss58_address)

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    @property
    def connected(self) -> set[str]:
        return set(self.conns.values())

    async def __aenter__(self) -> Self:
        self.server = await serve(
            self._handler, "127.0.0.1", self.port, process_request=self._process_request
        )
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    @staticmethod
    def _process_request(conn: ServerConnection, request: Request) -> Response | None:
        if urlsplit(request.path).path != "/ws":
            return conn.respond(HTTPStatus.NOT_FOUND, "Not Found\n")
        return None

    async def _send(self, ws: ServerConnection, type_: str, data: dict[str, Any]) -> None:
        await ws.send(json.dumps(sign_envelope(self.keypair, type_, data)))

    async def _error(self, ws: ServerConnection, hotkey: str | None, message: str) -> None:
        self.errors.append((hotkey, message))
        await self._send(ws, "error", {"message": message})

    async def _reject(self, ws: ServerConnection, reason: str) -> None:
        self.errors.append((None, reason))
        try:
            await ws.send(json.dumps({"status": "error", "message": reason}))
            await ws.close(POLICY_VIOLATION, reason[:120])
        except ConnectionClosed:
            pass

    def _check_auth(self, frame: Any) -> str | None:
        """Return a rejection reason, or None if the auth frame is acceptable."""
        if not isinstance(frame, dict):
            return "Invalid authentication message"
        if not all(isinstance(frame.get(k), str) for k in AUTH_KEYS):
            return "Missing authentication fields"
        ts = _parse_ts(frame["timestamp"])
        if ts is None:
            return "Invalid timestamp"
        if abs((datetime.now(UTC) - ts).total_seconds()) > AUTH_MAX_SKEW:
            return "Authentication timestamp expired"
        if not verify_auth(frame):
            return "Invalid signature"
        hotkey = frame["hotkey"]
        if self.allowed is not None and hotkey not in self.allowed:
            return "Hotkey not registered"
        seen = self._seen_auth_nonces.setdefault(hotkey, set())
        if frame["nonce"] in seen:
            return "Nonce already used"
        seen.add(frame["nonce"])
        return None

    async def _handler(self, ws: ServerConnection) -> None:
        try:
            async with asyncio.timeout(self.auth_timeout):
                raw = await ws.recv()
        except TimeoutError:
            await self._reject(ws, "Authentication timeout")
            return
        except ConnectionClosed:
            return
        try:
            frame = _loads(raw)
        except ValueError:
            frame = None
        reason = self._check_auth(frame)
        if reason is not None:
            await self._reject(ws, reason)
            return
        hotkey: str = frame["hotkey"]
        self.auth_frames.append(frame)
        welcome: dict[str, Any] = {"message": "Connection established", "status": "success"}
        if self.welcome_features is not None:
            welcome["features"] = list(self.welcome_features)
        self.conns[ws] = hotkey
        try:
            await self._send(ws, "welcome", welcome)
            if self.games is not None:
                await self._send(ws, "game_update", {"games": self.games, "timestamp": now_iso()})
            async for raw in ws:
                await self._on_frame(ws, hotkey, raw)
        except ConnectionClosed:
            pass
        finally:
            self.conns.pop(ws, None)

    async def _on_frame(self, ws: ServerConnection, hotkey: str, raw: str | bytes) -> None:
        try:
            env = _loads(raw)
        except ValueError:
            await self._error(ws, hotkey, "Invalid JSON")
            return
        if not verify_envelope(env):
            await self._error(ws, hotkey, "Invalid signature")
            return
        if env["sender"] != hotkey:
            await self._error(ws, hotkey, "Sender does not match authenticated hotkey")
            return
        seen = self._seen_nonces.setdefault(hotkey, set())
        if not isinstance(env["nonce"], str) or env["nonce"] in seen:
            await self._error(ws, hotkey, "Nonce already used")
            return
        seen.add(env["nonce"])
        self.received.append(env)
        type_, data = env["type"], env["data"]
        if type_ == "heartbeat":
            await self._send(ws, "heartbeat_ack", {"timestamp": now_iso()})
        elif type_ == "prediction":
            pid = data.get("prediction_id") or data.get("id")
            ids = self._pred_ids.setdefault(hotkey, set())
            if pid is None or pid not in ids:
                if pid is not None:
                    ids.add(pid)
                self.predictions.append((hotkey, data))
            confirmation = {
                "prediction_id": pid,
                "status": "success",
                "message": "Prediction received",
                "timestamp": now_iso(),
            }
            await self._send(ws, "confirmation", confirmation)

    async def broadcast(self, type_: str, data: dict[str, Any]) -> int:
        """Send a signed envelope to every authenticated connection; return count sent."""
        sent = 0
        for ws in list(self.conns):
            try:
                await self._send(ws, type_, data)
                sent += 1
            except ConnectionClosed:
                pass
        return sent

    async def wait_for(
        self,
        predicate: Callable[[], bool],
        timeout: float = 5.0,  # noqa: ASYNC109
    ) -> None:
        """Poll ``predicate`` until true; raise TimeoutError after ``timeout``."""
        async with asyncio.timeout(timeout):
            while True:
                if predicate():
                    return
                await asyncio.sleep(0.01)


# --------------------------------------------------------------------------- self-test


async def _selftest() -> None:
    alice = Keypair.create_from_uri("//Alice")
    bob = Keypair.create_from_uri("//Bob")
    game = {"game_id": "g1", "team_a": "A", "team_b": "B", "sport": "soccer"}
    async with RefValidator(alice, allowed={bob.ss58_address}, games=[game]) as v:
        print("validator", v.url, v.hotkey)
        async with RefMiner(bob, v.url, features=["batch"]) as m:
            print("welcome:", m.welcome, "verified:", verify_envelope(m.welcome or {}))
            upd = await m.expect("game_update")
            print("game_update:", upd["data"], "verified:", verify_envelope(upd))
            await m.send_signed("heartbeat", {})
            print("heartbeat_ack:", (await m.expect("heartbeat_ack"))["data"])
            pred = {
                "prediction_id": "p1",
                "game_id": "g1",
                "miner_uid": 1,
                "wager": 1.0,
                "predicted_outcome": "A",
                "predicted_odds": 1.8,
            }
            await m.send_signed("prediction", pred)
            print("confirmation:", (await m.expect("confirmation"))["data"])
            await m.send_signed("prediction", pred)
            print("dup confirmation:", (await m.expect("confirmation"))["data"])
            env = await m.send_signed("heartbeat", {})
            await m.send_json(env)  # replayed nonce
            await m.expect("heartbeat_ack")
            print("replay ->", (await m.expect("error"))["data"])
            await v.broadcast("game_update", {"games": [], "timestamp": now_iso()})
            print("broadcast:", (await m.expect("game_update"))["data"])
            assert len(v.predictions) == 1 and v.connected == {bob.ss58_address}
        async with RefMiner(alice, v.url) as bad:  # not in allowed
            print("rejected:", bad.welcome, await bad.wait_closed(5.0))
        async with RefMiner(bob, v.url, auth={**make_auth(bob), "hotkey": alice.ss58_address}) as b:
            print("bad sig:", b.welcome, await b.wait_closed(5.0))
        await v.wait_for(lambda: not v.connected)
    print("self-test OK")


if __name__ == "__main__":
    asyncio.run(_selftest())
