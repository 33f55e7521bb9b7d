"""Independent asyncio reference peer for the Bettensor miner/validator wire format.

Written from the wire-format spec only (asyncio + ``websockets`` + stdlib ``json`` +
``bittensor_wallet.Keypair``). It deliberately does not import ``bettensor_ws`` so it can
be used to check interoperability of the Trio implementation.

Reference modes (all off by default) reproduce how the published reference code
behaves where it differs from the wire-format spec:

* ``RefMiner(reference=True)`` (or ``answer_heartbeats="heartbeat_response"``) answers a
  validator's heartbeat with a signed ``heartbeat_response`` (data ``{}``) from a
  background reader; ``heartbeat_interval`` sends its own heartbeats; ``check_games``
  parses every game update in the reference ``TeamGame`` model (see
  :func:`reference_game_problem`) and records the games that fail; :meth:`RefMiner.burst`
  sends predictions as fast as possible, never pacing and never resending.
* ``RefValidator(reference=True)`` answers a heartbeat with ``heartbeat_ack`` (data ``{}``)
  and any other type (``heartbeat_ack`` and ``heartbeat_response`` included) with a signed
  error ``Unknown message type: X``; refuses a prediction id it already holds with an error
  confirmation ``Prediction <id> already exists in database``; answers a frame that fails
  its signature/structure check with the unsigned :func:`reference_error_frame`. Test
  knobs: ``heartbeat_interval``, ``confirm_delay``, ``drop_confirmations``, ``mute``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import Callable, Iterable
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

REFERENCE_BAD_FRAME = "Invalid message signature or structure"

# The reference TeamGame (pydantic v2, every field required, extra keys ignored).
REFERENCE_GAME_FIELDS: dict[str, type] = {
    "game_id": str,
    "team_a": str,
    "team_b": str,
    "sport": str,
    "league": str,
    "create_date": str,
    "last_update_date": str,
    "event_start_date": str,
    "active": bool,
    "outcome": str,
    "team_a_odds": float,
    "team_b_odds": float,
    "tie_odds": float,
    "can_tie": bool,
}

__all__ = [
    "REFERENCE_BAD_FRAME",
    "REFERENCE_GAME_FIELDS",
    "RefMiner",
    "RefValidator",
    "already_exists",
    "make_auth",
    "new_nonce",
    "now_iso",
    "reference_error_frame",
    "reference_game_problem",
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


# --------------------------------------------------------------------------- reference quirks

_TRUE = {"1", "on", "t", "true", "y", "yes"}
_FALSE = {"0", "f", "false", "n", "no", "off"}


def _field_problem(value: Any, kind: type) -> str | None:
    """Why ``value`` does not validate as ``kind`` in pydantic v2's default (lax) mode."""
    if kind is str:
        # v2 does not turn numbers (or None) into strings
        return None if isinstance(value, str) else f"expected a string, got {value!r}"
    if kind is float:
        if isinstance(value, int | float):  # bool included, as pydantic takes it
            return None
        if isinstance(value, str):
            try:
                float(value)
            except ValueError:
                pass
            else:
                return None
        return f"expected a number, got {value!r}"
    if kind is bool:
        if isinstance(value, bool):
            return None
        if isinstance(value, int | float) and value in (0, 1):
            return None
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return None
        return f"expected a boolean, got {value!r}"
    raise AssertionError(kind)


def reference_game_problem(game: Any) -> str | None:
    """None if ``game`` parses in the reference ``TeamGame`` model, else why not."""
    if not isinstance(game, dict):
        return f"expected an object, got {type(game).__name__}"
    for key, kind in REFERENCE_GAME_FIELDS.items():
        if key not in game:
            return f"{key}: field required"
        problem = _field_problem(game[key], kind)
        if problem is not None:
            return f"{key}: {problem}"
    return None


def already_exists(prediction_id: Any) -> str:
    """The reference validator's refusal of a prediction id it already stored."""
    return f"Prediction {prediction_id} already exists in database"


def reference_error_frame() -> dict[str, Any]:
    """The reference validator's answer to a frame failing its signature/structure check:
    unsigned, with no sender, data, nonce or signature."""
    return {"type": "error", "message": REFERENCE_BAD_FRAME, "timestamp": now_iso()}


# --------------------------------------------------------------------------- miner


class RefMiner:
    """asyncio miner client: ``async with RefMiner(kp, url) as m: ...``.

    Reference options (off by default):

    * ``reference=True``: as the reference miner, answer each validator ``heartbeat``
      with a signed ``heartbeat_response`` (data ``{}``); same as
      ``answer_heartbeats="heartbeat_response"``.
    * ``answer_heartbeats=TYPE``: answer heartbeats with that type. This starts a
      background reader after the Welcome: frames are then read (and heartbeats
      answered) whether or not the test reads; ``recv_json``/``expect``/``wait_closed``
      take them from its queue.
    * ``heartbeat_interval``: send a signed ``heartbeat`` (data ``{}``) every so often,
      as the reference miner's heartbeat loop does (first one after one interval).
    * ``check_games``: parse each ``game_update``'s games in the reference ``TeamGame``
      model; ``games_checked`` counts them, ``bad_games`` holds ``(game, why)``.

    Every frame read is recorded in ``frames`` (``error_frames`` filters the errors);
    ``heartbeats_answered`` counts the answers sent.
    """

    def __init__(
        self,
        keypair: Keypair,
        url: str,
        *,
        auth: dict[str, Any] | str | bytes | None = None,
        features: list[str] | None = None,
        read_welcome: bool = True,
        open_timeout: float = 10.0,
        reference: bool = False,
        answer_heartbeats: str | None = None,
        heartbeat_interval: float | None = None,
        check_games: bool = False,
    ) -> None:
        self.keypair = keypair
        self.url = url
        self.auth_override = auth
        self.features = features
        self.read_welcome = read_welcome
        self.open_timeout = open_timeout
        if reference and answer_heartbeats is None:
            answer_heartbeats = "heartbeat_response"
        self.answer_heartbeats = answer_heartbeats
        self.heartbeat_interval = heartbeat_interval
        self.check_games = check_games
        self.ws: ClientConnection | None = None
        self.auth_sent: dict[str, Any] | str | bytes | None = None
        self.welcome: dict[str, Any] | None = None
        self.skipped: list[dict[str, Any]] = []
        self.close_code: int | None = None
        self.close_reason: str | None = None
        self.frames: list[Any] = []
        self.heartbeats_answered = 0
        self.heartbeats_sent = 0
        self.games_checked = 0
        self.game_updates = 0
        self.bad_games: list[tuple[Any, str]] = []
        self._inbox: asyncio.Queue[str | bytes | ConnectionClosed] | None = None
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def hotkey(self) -> str:
        return str(self.keypair.ss58_address)

    @property
    def error_frames(self) -> list[Any]:
        """Every frame read so far whose type is ``error`` (signed or not)."""
        return [f for f in self.frames if isinstance(f, dict) and f.get("type") == "error"]

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
        if self.answer_heartbeats is not None:
            self._inbox = asyncio.Queue()
            self._tasks.append(asyncio.create_task(self._reader()))
        if self.heartbeat_interval is not None:
            self._tasks.append(asyncio.create_task(self._heartbeats(self.heartbeat_interval)))
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._stop_tasks()
        await self.close()

    async def _stop_tasks(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, ConnectionClosed):
                await task
        self._tasks.clear()

    def _record_close(self, exc: ConnectionClosed) -> None:
        if exc.rcvd is not None:
            self.close_code, self.close_reason = exc.rcvd.code, exc.rcvd.reason
        else:
            self.close_code, self.close_reason = ABNORMAL_CLOSURE, ""

    def _conn(self) -> ClientConnection:
        if self.ws is None:
            raise RuntimeError("RefMiner is not connected")
        return self.ws

    def _note(self, raw: str | bytes) -> Any:
        """Record a frame read, and check its games if asked; returns it parsed (or None)."""
        try:
            frame = _loads(raw)
        except ValueError:
            self.frames.append({"raw": raw})
            return None
        self.frames.append(frame)
        if self.check_games and isinstance(frame, dict) and frame.get("type") == "game_update":
            self.game_updates += 1
            data = frame.get("data")
            games = data.get("games") if isinstance(data, dict) else None
            if not isinstance(games, list):
                self.bad_games.append((data, "game_update without a list of games"))
            else:
                for game in games:
                    self.games_checked += 1
                    problem = reference_game_problem(game)
                    if problem is not None:
                        self.bad_games.append((game, problem))
        return frame

    async def _reader(self) -> None:
        """Background reader (reference mode): answers heartbeats at once, queues all frames."""
        assert self._inbox is not None
        try:
            while True:
                raw = await self._conn().recv()
                frame = self._note(raw)
                self._inbox.put_nowait(raw)
                if (
                    isinstance(frame, dict)
                    and frame.get("type") == "heartbeat"
                    and self.answer_heartbeats is not None
                ):
                    await self.send_signed(self.answer_heartbeats, {})
                    self.heartbeats_answered += 1
        except ConnectionClosed as exc:
            self._record_close(exc)
            self._inbox.put_nowait(exc)

    async def _heartbeats(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            await self.send_signed("heartbeat", {})
            self.heartbeats_sent += 1

    async def _next_raw(self) -> str | bytes:
        if self._inbox is None:
            raw = await self._conn().recv()
            self._note(raw)
            return raw
        item = await self._inbox.get()
        if isinstance(item, ConnectionClosed):
            self._inbox.put_nowait(item)  # closed for every later read too
            raise item
        return item

    async def recv_json(self, timeout: float = 5.0) -> dict[str, Any]:  # noqa: ASYNC109
        """Next frame, parsed as JSON. Raises ConnectionClosed / TimeoutError."""
        try:
            async with asyncio.timeout(timeout):
                raw = await self._next_raw()
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

    async def burst(self, predictions: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
        """Send each prediction as its own signed envelope, back to back, as the reference
        miner does: no pacing, no waiting for answers, never a resend. Stops quietly if
        the link closes; returns the envelopes sent."""
        sent: list[dict[str, Any]] = []
        for data in predictions:
            try:
                sent.append(await self.send_signed("prediction", data))
            except ConnectionClosed:
                break
        return sent

    async def collect(
        self,
        count: int,
        types: Iterable[str] = ("confirmation", "error"),
        timeout: float = 10.0,  # noqa: ASYNC109
    ) -> list[dict[str, Any]]:
        """Read until ``count`` frames of ``types`` arrived (others go to ``skipped``), the
        link closed, or ``timeout`` passed; returns those frames (never raises for those)."""
        wanted = set(types)
        got: list[dict[str, Any]] = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while len(got) < count:
            left = deadline - loop.time()
            if left <= 0:
                break
            try:
                frame = await self.recv_json(timeout=left)
            except (ConnectionClosed, TimeoutError):
                break
            except ValueError:
                continue
            if isinstance(frame, dict) and frame.get("type") in wanted:
                got.append(frame)
            else:
                self.skipped.append(frame)
        return got

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
                    raw = await self._next_raw()
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
    """asyncio validator server on 127.0.0.1: ``async with RefValidator(kp) as v: ...``.

    Reference options (off by default):

    * ``reference=True`` turns on the three wire quirks below at once.
    * ``unknown_type_errors``: a heartbeat is answered ``heartbeat_ack`` with data ``{}``;
      any type but ``heartbeat`` and ``prediction`` (``heartbeat_ack`` and
      ``heartbeat_response`` included) gets a signed error ``Unknown message type: X``.
    * ``refuse_duplicates``: a prediction id already stored (for that miner) is answered
      by a confirmation with status ``error`` and :func:`already_exists` as message.
    * ``reference_errors``: a frame failing the signature/structure check (missing keys,
      sender mismatch, replayed nonce, bad signature) gets the unsigned
      :func:`reference_error_frame` instead of a signed error.

    Test knobs: ``heartbeat_interval`` (send a signed ``heartbeat``, data ``{}``, to every
    connection that often); ``confirm_delay`` (each confirmation is sent that many
    seconds later, without holding up the reader); ``drop_confirmations`` (the first N
    confirmations are never sent; counted in ``dropped``); ``mute`` (a validator whose
    sender loop died: after the Welcome and the first game_update it accepts and records
    frames but sends nothing; may be set at any time; ``muted`` counts what was held
    back). ``errors`` records every error sent, as ``(hotkey, message)``.
    """

    def __init__(
        self,
        keypair: Keypair,
        allowed: set[str] | list[str] | None = None,
        games: list[dict[str, Any]] | None = None,
        *,
        port: int = 0,
        welcome_features: list[str] | None = None,
        auth_timeout: float = 10.0,
        reference: bool = False,
        unknown_type_errors: bool = False,
        refuse_duplicates: bool = False,
        reference_errors: bool = False,
        heartbeat_interval: float | None = None,
        confirm_delay: float = 0.0,
        drop_confirmations: int = 0,
        mute: bool = False,
    ) -> None:
        self.keypair = keypair
        self.allowed = set(allowed) if allowed is not None else None
        self.games = games
        self.port = port
        self.welcome_features = welcome_features
        self.auth_timeout = auth_timeout
        self.unknown_type_errors = unknown_type_errors or reference
        self.refuse_duplicates = refuse_duplicates or reference
        self.reference_errors = reference_errors or reference
        self.heartbeat_interval = heartbeat_interval
        self.confirm_delay = confirm_delay
        self.drop_confirmations = drop_confirmations
        self.mute = mute
        self.server: Server | None = None
        self.conns: dict[ServerConnection, str] = {}
        self.received: list[dict[str, Any]] = []
        self.predictions: list[tuple[str, dict[str, Any]]] = []
        self.auth_frames: list[dict[str, Any]] = []
        self.errors: list[tuple[str | None, str]] = []  # (hotkey, message) of errors sent
        self.confirmations: list[tuple[str, dict[str, Any]]] = []  # (hotkey, data) sent
        self.dropped: list[tuple[str, dict[str, Any]]] = []  # confirmations never sent
        self.heartbeats_sent = 0
        self.muted = 0
        self._seen_nonces: dict[str, set[str]] = {}
        self._seen_auth_nonces: dict[str, set[str]] = {}
        self._pred_ids: dict[str, set[Any]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._live: set[ServerConnection] = set()  # past the Welcome (and first game_update)

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
        if self.heartbeat_interval is not None:
            self._spawn(self._heartbeats(self.heartbeat_interval))
        return self

    async def __aexit__(self, *exc: object) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, ConnectionClosed):
                await task
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @staticmethod
    def _process_request(conn: ServerConnection, request: Request) -> Response | None:
        if urlsplit(request.path).path != "/ws":
            return conn.respond(HTTPStatus.NOT_FOUND, "Not Found\n")
        return None

    async def _send(self, ws: ServerConnection, type_: str, data: dict[str, Any]) -> None:
        if self.mute and ws in self._live:
            self.muted += 1
            return
        await ws.send(json.dumps(sign_envelope(self.keypair, type_, data)))

    async def _send_unsigned(self, ws: ServerConnection, frame: dict[str, Any]) -> None:
        if self.mute and ws in self._live:
            self.muted += 1
            return
        await ws.send(json.dumps(frame))

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
            self._live.add(ws)
            async for raw in ws:
                await self._on_frame(ws, hotkey, raw)
        except ConnectionClosed:
            pass
        finally:
            self.conns.pop(ws, None)
            self._live.discard(ws)

    async def _bad_frame(self, ws: ServerConnection, hotkey: str, message: str) -> None:
        """A frame failing the signature/structure check."""
        if self.reference_errors:
            self.errors.append((hotkey, REFERENCE_BAD_FRAME))
            await self._send_unsigned(ws, reference_error_frame())
        else:
            await self._error(ws, hotkey, message)

    async def _on_frame(self, ws: ServerConnection, hotkey: str, raw: str | bytes) -> None:
        try:
            env = _loads(raw)
        except ValueError:
            await self._error(ws, hotkey, "Invalid JSON")
            return
        if not verify_envelope(env):
            await self._bad_frame(ws, hotkey, "Invalid signature")
            return
        if env["sender"] != hotkey:
            await self._bad_frame(ws, hotkey, "Sender does not match authenticated hotkey")
            return
        seen = self._seen_nonces.setdefault(hotkey, set())
        if not isinstance(env["nonce"], str) or env["nonce"] in seen:
            await self._bad_frame(ws, hotkey, "Nonce already used")
            return
        seen.add(env["nonce"])
        self.received.append(env)
        type_, data = env["type"], env["data"]
        if type_ == "heartbeat":
            ack: dict[str, Any] = {} if self.unknown_type_errors else {"timestamp": now_iso()}
            await self._send(ws, "heartbeat_ack", ack)
        elif type_ == "prediction":
            pid = data.get("prediction_id") or data.get("id")
            ids = self._pred_ids.setdefault(hotkey, set())
            duplicate = pid is not None and pid in ids
            if not duplicate:
                if pid is not None:
                    ids.add(pid)
                self.predictions.append((hotkey, data))
            if duplicate and self.refuse_duplicates:
                status, message = "error", already_exists(pid)
            else:
                status, message = "success", "Prediction received"
            confirmation = {
                "prediction_id": pid,
                "status": status,
                "message": message,
                "timestamp": now_iso(),
            }
            await self._confirm(ws, hotkey, confirmation)
        elif self.unknown_type_errors:
            await self._error(ws, hotkey, f"Unknown message type: {type_}")

    async def _confirm(self, ws: ServerConnection, hotkey: str, data: dict[str, Any]) -> None:
        if self.drop_confirmations > 0:
            self.drop_confirmations -= 1
            self.dropped.append((hotkey, data))
            return
        if self.confirm_delay > 0:
            self._spawn(self._confirm_later(ws, hotkey, data, self.confirm_delay))
            return
        self.confirmations.append((hotkey, data))
        await self._send(ws, "confirmation", data)

    async def _confirm_later(
        self, ws: ServerConnection, hotkey: str, data: dict[str, Any], delay: float
    ) -> None:
        await asyncio.sleep(delay)
        self.confirmations.append((hotkey, data))
        with contextlib.suppress(ConnectionClosed):
            await self._send(ws, "confirmation", data)

    async def _heartbeats(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            self.heartbeats_sent += await self.broadcast("heartbeat", {})

    async def send_raw_all(self, frame: Any) -> int:
        """Send ``frame`` as JSON, unsigned and as is (e.g. :func:`reference_error_frame`),
        to every authenticated connection; return count sent (``mute`` holds it back)."""
        sent = 0
        for ws in list(self.conns):
            try:
                await self._send_unsigned(ws, frame)
                sent += 1
            except ConnectionClosed:
                pass
        return sent

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
    await _selftest_reference(alice, bob)
    print("self-test OK")


async def _selftest_reference(alice: Keypair, bob: Keypair) -> None:
    """The reference modes against each other (the reference's own two halves disagree:
    its validator calls its miner's ``heartbeat_response`` an unknown type)."""
    good = {k: ("x" if t is str else 1.5 if t is float else True) for k, t in REFERENCE_GAME_FIELDS.items()}
    bad = {**good, "tie_odds": None}
    async with RefValidator(alice, games=[good, bad], reference=True, heartbeat_interval=0.05) as v:
        async with RefMiner(bob, v.url, reference=True, check_games=True) as m:
            await m.expect("game_update")
            print("bad games:", m.bad_games)
            assert m.games_checked == 2 and len(m.bad_games) == 1
            error = await m.expect("error")
            print("reference validator on heartbeat_response:", error["data"])
            assert error["data"] == {"message": "Unknown message type: heartbeat_response"}
            assert m.heartbeats_answered >= 1
            sent = await m.burst([{"prediction_id": "p1"}, {"prediction_id": "p1"}])
            assert len(sent) == 2
            confs = [f["data"] for f in await m.collect(2, types=("confirmation",))]
            print("burst confirmations:", [(c["status"], c["message"]) for c in confs])
            assert confs[1]["message"] == already_exists("p1")
            await m.send_json({**sent[0], "nonce": new_nonce()})  # signature no longer covers it
            frame = await m.expect("error")
            while "sender" in frame:
                frame = await m.expect("error")
            print("unsigned error:", frame)
            assert set(frame) == {"type", "message", "timestamp"}
    async with RefValidator(alice, mute=True) as v:
        async with RefMiner(bob, v.url) as m:
            assert m.welcome is not None and m.welcome["type"] == "welcome"
            await m.send_signed("heartbeat", {})
            try:
                raise AssertionError(f"mute validator answered: {await m.recv_json(timeout=0.3)}")
            except TimeoutError:
                print("mute validator: no answer")
            await v.wait_for(lambda: len(v.received) == 1)
            assert v.muted == 1


if __name__ == "__main__":
    asyncio.run(_selftest())
