"""A validator in the reference design, for comparison only (asyncio ``websockets``).

What the reference Bettensor validator does, with the same checks and the same
durability as ours:

* auth frame: shape, timestamp within 300 s, sr25519 signature over the sorted
  JSON, auth nonce not seen; a signed Welcome (no ``features``: the reference
  knows no batches);
* a task per inbound message (``asyncio.create_task``) that parses it, checks
  the sender, verifies the signature (``json.dumps(..., sort_keys=True)`` and
  ``Keypair.verify``), the replay nonce set and the timestamp;
* per prediction the same rules as ours (idempotency by prediction_id, missing
  data, wager positive and finite, daily limit of 1000 via ``SELECT SUM``, game
  known and not started, outcome valid, odds, confidence), then an INSERT and a
  COMMIT of its own (SQLite, WAL, ``synchronous=FULL``) on one database thread,
  as an async SQLite wrapper does;
* a signed confirmation per prediction. So the batched scenario compares
  fairly, a ``{"predictions": [...]}`` message is accepted too: each prediction
  is still checked and committed on its own, answered by one confirmation with
  ``results``.

``--broadcast N`` sends a signed N-game update every ``--interval`` s to every
connection, signed and encoded per connection and sent one after the other, as
the reference's broadcast loop does. ``--peak-games N`` instead stores N new
games and broadcasts them the same way on each SIGUSR1 (the game-update peak).

    python benchmarks/baseline.py --db PATH [--games FILE] [--broadcast 100 --interval 2] [--peak-games 40]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import signal
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from http import HTTPStatus
from pathlib import Path
from typing import Any

from bittensor_wallet import Keypair
from common import (
    AUTH_KEYS,
    ENVELOPE_KEYS,
    VALIDATOR_URI,
    envelope_wire,
    make_games,
    now_iso,
    parse_ts,
    signing_text,
    verify_text,
)
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

MAX_SKEW = 300.0
DAILY_LIMIT = 1000.0
ACCEPTED = "Prediction accepted"


class Store:
    """SQLite on one thread: a transaction and a COMMIT (an fsync) per prediction."""

    def __init__(self, path: str, games: list[dict[str, Any]]) -> None:
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.executescript(
            """
            CREATE TABLE IF NOT EXISTS games (game_id TEXT PRIMARY KEY, body TEXT NOT NULL);
            CREATE TABLE IF NOT EXISTS predictions (
                prediction_id TEXT PRIMARY KEY, miner_hotkey TEXT NOT NULL, game_id TEXT NOT NULL,
                wager REAL NOT NULL, predicted_outcome TEXT NOT NULL, body TEXT NOT NULL,
                day TEXT NOT NULL, received_at TEXT NOT NULL);
            CREATE INDEX IF NOT EXISTS predictions_miner_day ON predictions (miner_hotkey, day);
            """
        )
        self.db.execute("BEGIN")
        self.db.executemany(
            "INSERT OR REPLACE INTO games VALUES (?, ?)", [(g["game_id"], json.dumps(g)) for g in games]
        )
        self.db.execute("COMMIT")
        self.thread = ThreadPoolExecutor(1, thread_name_prefix="db")

    def add_games(self, games: list[dict[str, Any]]) -> None:
        self.db.execute("BEGIN")
        self.db.executemany(
            "INSERT OR REPLACE INTO games VALUES (?, ?)", [(g["game_id"], json.dumps(g)) for g in games]
        )
        self.db.execute("COMMIT")

    def submit(self, hotkey: str, data: dict[str, Any]) -> tuple[Any, str, str]:
        """Check and store one prediction in its own transaction: (id, status, message)."""
        pid = data.get("prediction_id", data.get("id"))
        body = json.dumps(data, sort_keys=True)
        now = datetime.now(UTC)
        day = now.date().isoformat()
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            old = db.execute(
                "SELECT miner_hotkey, body FROM predictions WHERE prediction_id=?", (pid,)
            ).fetchone()
            if old is not None:
                db.execute("COMMIT")
                if old == (hotkey, body):
                    return pid, "success", ACCEPTED
                return pid, "error", "prediction_id already used for another prediction"
            reason = self._check(db, hotkey, data, day, now)
            if reason is not None:
                db.execute("COMMIT")
                return pid, "error", reason
            db.execute(
                "INSERT INTO predictions VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (pid, hotkey, str(data["game_id"]), float(data["wager"]),
                 str(data["predicted_outcome"]), body, day, now.isoformat()),
            )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return pid, "success", ACCEPTED

    @staticmethod
    def _check(db: sqlite3.Connection, hotkey: str, data: dict[str, Any], day: str, now: datetime) -> str | None:
        if not isinstance(data.get("prediction_id", data.get("id")), str) or any(
            data.get(k) in (None, "") for k in ("game_id", "predicted_outcome", "wager")
        ):
            return "missing data"
        wager = data["wager"]
        if isinstance(wager, bool) or not isinstance(wager, int | float) or not math.isfinite(wager) or wager <= 0:
            return "wager must be a positive finite number"
        (wagered,) = db.execute(
            "SELECT COALESCE(SUM(wager), 0) FROM predictions WHERE miner_hotkey=? AND day=?",
            (hotkey, day),
        ).fetchone()
        if wagered + wager > DAILY_LIMIT + 1e-9:
            return "daily wager limit of 1000 exceeded"
        row = db.execute("SELECT body FROM games WHERE game_id=?", (str(data["game_id"]),)).fetchone()
        if row is None:
            return "game unknown"
        game = json.loads(row[0])
        starts = parse_ts(game.get("event_start_date"))
        if starts is None or starts <= now:
            return "game already started"
        outcome = str(data["predicted_outcome"]).strip().lower()
        key = {str(game["team_a"]).lower(): "team_a_odds", str(game["team_b"]).lower(): "team_b_odds"}.get(outcome)
        if key is None and outcome == "tie" and game.get("can_tie"):
            key = "tie_odds"
        if key is None:
            return "predicted_outcome must be team_a, team_b, or Tie where the game can tie"
        odds = game.get(key)
        if isinstance(odds, bool) or not isinstance(odds, int | float) or not odds > 0:
            return "odds for the predicted outcome missing or not positive"
        confidence = data.get("confidence_score")
        if confidence is not None and (
            isinstance(confidence, bool) or not isinstance(confidence, int | float) or not 0 <= confidence <= 1
        ):
            return "confidence_score must be within [0, 1]"
        return None


class Baseline:
    def __init__(self, store: Store) -> None:
        self.keypair = Keypair.create_from_uri(VALIDATOR_URI)
        self.store = store
        self.conns: set[ServerConnection] = set()
        self.auth_nonces: set[str] = set()
        self.tasks: set[asyncio.Task[None]] = set()

    @staticmethod
    def process_request(conn: ServerConnection, request: Request) -> Response | None:
        if request.path.split("?", 1)[0] != "/ws":
            return conn.respond(HTTPStatus.NOT_FOUND, "Not Found\n")
        return None

    async def send(self, ws: ServerConnection, type_: str, data: dict[str, Any]) -> None:
        await ws.send(envelope_wire(self.keypair, type_, data))

    def check_auth(self, frame: Any) -> tuple[str | None, Keypair | None]:
        if not isinstance(frame, dict) or not all(isinstance(frame.get(k), str) for k in AUTH_KEYS):
            return "Invalid authentication message", None
        ts = parse_ts(frame["timestamp"])
        if ts is None or abs((datetime.now(UTC) - ts).total_seconds()) > MAX_SKEW:
            return "Authentication timestamp expired", None
        try:
            peer = Keypair(ss58_address=frame["hotkey"])
        except Exception:
            return "Invalid hotkey", None
        if not verify_text(peer, signing_text(frame), frame["signature"]):
            return "Invalid signature", None
        if frame["nonce"] in self.auth_nonces:
            return "Nonce already used", None
        self.auth_nonces.add(frame["nonce"])
        return None, peer

    async def handler(self, ws: ServerConnection) -> None:
        try:
            async with asyncio.timeout(10):
                raw = await ws.recv()
            frame = json.loads(raw)
        except (TimeoutError, ValueError, ConnectionClosed):
            return
        reason, peer = self.check_auth(frame)
        if reason is not None or peer is None:
            await ws.send(json.dumps({"status": "error", "message": reason}))
            await ws.close(1008, str(reason))
            return
        hotkey = frame["hotkey"]
        seen: set[str] = set()
        self.conns.add(ws)
        try:
            await self.send(ws, "welcome", {"message": "Connection established", "status": "success"})
            async for raw in ws:
                task = asyncio.create_task(self.on_message(ws, hotkey, peer, seen, raw))
                self.tasks.add(task)
                task.add_done_callback(self.tasks.discard)
        except ConnectionClosed:
            pass
        finally:
            self.conns.discard(ws)

    async def on_message(
        self, ws: ServerConnection, hotkey: str, peer: Keypair, seen: set[str], raw: str | bytes
    ) -> None:
        try:
            try:
                env = json.loads(raw)
            except ValueError:
                await self.send(ws, "error", {"message": "Invalid JSON"})
                return
            if not isinstance(env, dict) or set(env) != ENVELOPE_KEYS or not isinstance(env["data"], dict):
                await self.send(ws, "error", {"message": "Invalid message"})
                return
            if env["sender"] != hotkey:
                await self.send(ws, "error", {"message": "Sender does not match authenticated hotkey"})
                return
            if not verify_text(peer, signing_text(env), env["signature"]):
                await self.send(ws, "error", {"message": "Invalid signature"})
                return
            ts = parse_ts(env["timestamp"])
            if not isinstance(env["nonce"], str) or env["nonce"] in seen:
                await self.send(ws, "error", {"message": "Nonce already used"})
                return
            if ts is None or abs(time.time() - ts.timestamp()) > MAX_SKEW:
                await self.send(ws, "error", {"message": "Stale timestamp"})
                return
            seen.add(env["nonce"])
            if env["type"] == "heartbeat":
                await self.send(ws, "heartbeat_ack", {"timestamp": now_iso()})
            elif env["type"] == "prediction":
                await self.on_prediction(ws, hotkey, env["data"])
        except ConnectionClosed:
            pass

    async def on_prediction(self, ws: ServerConnection, hotkey: str, data: dict[str, Any]) -> None:
        loop = asyncio.get_running_loop()
        batch = data.get("predictions")
        items = batch if isinstance(batch, list) else [data]
        results = []
        for item in items:
            if not isinstance(item, dict):
                results.append((None, "error", "missing data"))
                continue
            try:
                results.append(await loop.run_in_executor(self.store.thread, self.store.submit, hotkey, item))
            except Exception:
                results.append((item.get("prediction_id"), "error", "Internal server error"))
        if isinstance(batch, list):
            rows = [{"prediction_id": p, "status": s, "message": m} for p, s, m in results]
            await self.send(ws, "confirmation", {"results": rows, "timestamp": now_iso()})
        else:
            pid, status, message = results[0]
            await self.send(
                ws, "confirmation",
                {"prediction_id": pid, "status": status, "message": message, "timestamp": now_iso()},
            )

    async def broadcaster(self, count: int, interval: float) -> None:
        rows = make_games(count)
        while True:
            await asyncio.sleep(interval)
            await self.broadcast(rows)

    async def broadcast(self, rows: list[dict[str, Any]]) -> None:
        data = {"games": rows, "timestamp": now_iso()}
        for ws in list(self.conns):
            try:
                await self.send(ws, "game_update", data)
            except ConnectionClosed:
                pass

    async def publish(self, count: int, rounds: int) -> None:
        """New games: stored, then broadcast (the peak's trigger)."""
        rows = make_games(count, seed=rounds)
        for game in rows:
            game["game_id"] = f"peak{rounds}-{game['game_id']}"
        await asyncio.get_running_loop().run_in_executor(self.store.thread, self.store.add_games, rows)
        await self.broadcast(rows)


async def main(args: argparse.Namespace) -> None:
    games = make_games(args.broadcast) if args.broadcast else []
    if args.games:
        games = json.loads(Path(args.games).read_text(encoding="utf-8"))  # noqa: ASYNC240
    baseline = Baseline(Store(args.db, games))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    published: list[asyncio.Task[None]] = []
    if args.peak_games:
        loop.add_signal_handler(
            signal.SIGUSR1,
            lambda: published.append(asyncio.create_task(baseline.publish(args.peak_games, len(published) + 1))),
        )
    async with serve(
        baseline.handler, "127.0.0.1", 0, process_request=baseline.process_request,
        max_size=1 << 20, compression=None,
    ) as server:
        port = server.sockets[0].getsockname()[1]
        print(f"listening on ws://127.0.0.1:{port}/ws", flush=True)
        if args.broadcast:
            task = asyncio.create_task(baseline.broadcaster(args.broadcast, args.interval))
        await stop.wait()
        if args.broadcast:
            task.cancel()
        server.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--db", required=True)
    parser.add_argument("--games", help="JSON list of TeamGame dicts")
    parser.add_argument("--broadcast", type=int, default=0, help="games per periodic update (0: none)")
    parser.add_argument("--interval", type=float, default=2.0)
    parser.add_argument("--peak-games", type=int, default=0, help="new games per SIGUSR1 (0: none)")
    asyncio.run(main(parser.parse_args()))
