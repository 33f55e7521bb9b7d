"""The miner node: predicts on game updates and never loses a prediction.

Each prediction is written, pending for every validator, before it is sent,
and resent until that validator has answered it: the wait before a resend
follows the validator's observed latency, doubles with each attempt (kept on
disk, across reconnects and restarts), and after ``max_attempts`` sends without
an answer the prediction is settled as rejected.
"""

from __future__ import annotations

import logging
import sqlite3
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
import trio

from ..link.connection import BATCH, LinkClosed, LinkConnection
from ..link.miner import MinerWebSocketManager
from ..link.outbound import Frame
from ..link.transport import plain_errors
from ..protocol.dispatch import INTERNAL_ERROR, Connection
from ..protocol.messages import (
    MAX_BATCH,
    ConfirmationMessage,
    GameUpdateMessage,
    PredictionMessage,
    WebSocketMessage,
    new_uuid,
    now_iso,
    prediction_problem,
)
from ..protocol.ratelimit import TokenBucket
from ..protocol.refusals import Refusal, bounded
from ..protocol.signing import Signer, sign
from .chain import SubnetGraph, merged_validators
from .dbthread import DbThread
from .guardstore import GuardKeeper
from .metrics import MinerMetrics
from .rules import DAILY_WAGER_LIMIT, HEALABLE, check_own_data, means_stored
from .store import MinerStore

__all__ = ["MinerNode", "Strategy", "favourite_strategy"]

log = logging.getLogger("bettensor_ws.node")


Strategy = Callable[[Sequence[dict[str, Any]]], list[dict[str, Any]]]


def favourite_strategy(wager: float = 1.0, miner_uid: str = "0", model_name: str | None = None) -> Strategy:
    """Wager ``wager`` on the favourite (lowest odds) of each game."""

    def predict(games: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        predictions = []
        for game in games:
            choices = [(game.get("team_a_odds"), game["team_a"]), (game.get("team_b_odds"), game["team_b"])]
            if game.get("can_tie"):
                choices.append((game.get("tie_odds"), "Tie"))
            valid = [(o, name) for o, name in choices if isinstance(o, int | float) and o > 0]
            if not valid:
                continue
            odds, outcome = min(valid, key=lambda c: c[0])
            predictions.append(
                {
                    "prediction_id": str(new_uuid()),
                    "game_id": str(game["game_id"]),
                    "miner_uid": miner_uid,
                    "prediction_date": now_iso(),
                    "predicted_outcome": outcome,
                    "predicted_odds": float(odds),
                    "team_a": game["team_a"],
                    "team_b": game["team_b"],
                    "wager": float(wager),
                    "team_a_odds": game.get("team_a_odds"),
                    "team_b_odds": game.get("team_b_odds"),
                    "tie_odds": game.get("tie_odds"),
                    "model_name": model_name,
                    "confidence_score": None,
                    "outcome": "Unfinished",
                    "payout": 0.0,
                }
            )
        return predictions

    return predict


DEFAULT_PEER_MAX_SIZE = 1 << 20
"""A validator that announces no limit (a reference one) is sent frames of at most 1 MiB."""

RESEND_FACTOR = 3.0
"""A resend waits at least this many times the validator's observed confirmation latency."""

MAX_BACKOFF = 3600.0
"""The longest wait between two sends of one prediction to one validator (seconds)."""

MAX_ATTEMPTS = 12
"""Sends of one prediction to one validator without an answer before it is settled as rejected."""

LATENCY_WEIGHT = 0.2
"""The weight of each new latency in a validator's moving average (EWMA)."""

IDLE_WAKE = 60.0
"""The longest an outbox sleeps with nothing due (a poke wakes it sooner)."""

ENVELOPE_ROOM = 2048
"""Bytes kept for the envelope around the predictions (type, sender, timestamp, nonce,
signature, the batch's own keys), with room to spare."""


class _Outbox:
    """One validator's in-flight window: what was sent and not yet answered."""

    def __init__(self) -> None:
        self.inflight: dict[str, float] = {}
        # which predictions each sent frame carried, so a refusal naming the
        # frame's nonce can settle them; expires with the in-flight window
        self.by_nonce: dict[str, tuple[float, list[str]]] = {}
        self.wake = trio.Event()

    def poke(self) -> None:
        self.wake.set()


class MinerNode(MinerWebSocketManager):
    """A miner manager with a SQLite store, the seed's handlers and a durable outbox.

    The outbox keeps at most ``window`` predictions in flight per validator,
    sends batches to validators that offer them, and paces single messages
    under the validator's default rate limit; anything unanswered, or refused
    as rate limited, is still pending and goes again. The wait before a resend
    is ``max(retry_after, resend_factor x`` the validator's average confirmation
    latency``)``, doubled at each attempt up to ``max_backoff``; after
    ``max_attempts`` sends without an answer the prediction is settled as
    rejected with the last reason heard.
    """

    def __init__(
        self,
        keypair: Signer,
        validators: Iterable[tuple[str, str]],
        db_path: str | Path,
        *,
        strategy: Strategy | None = None,
        wager: float = 1.0,
        window: int = 64,
        batch_size: int = 100,
        retry_after: float = 10.0,
        send_rate: float = 40.0,
        send_burst: int = 100,
        resend_factor: float = RESEND_FACTOR,
        max_backoff: float = MAX_BACKOFF,
        max_attempts: int = MAX_ATTEMPTS,
        **kwargs: Any,
    ) -> None:
        kwargs.setdefault("features", (BATCH,))
        validators = list(validators)
        super().__init__(keypair, validators, **kwargs)
        # the hand-made list (--validator): kept whatever the metagraph says
        self.manual_validators = list(self.validators.items())
        self.subnet: SubnetGraph | None = None
        self.store = MinerStore(db_path)
        self.db = DbThread()
        self.guard_keeper = GuardKeeper(self.guard, self.store, self.db)
        self.metrics = MinerMetrics(self)
        self.strategy = strategy or favourite_strategy(wager)
        self.window = window
        self.batch_size = batch_size
        self.retry_after = retry_after
        self.send_rate = send_rate
        self.send_burst = send_burst
        self.resend_factor = resend_factor
        self.max_backoff = max_backoff
        self.max_attempts = max_attempts
        # per validator, a moving average of its confirmation latency (send to answer)
        self.latency: dict[str, float] = {}
        self._clock_base: tuple[datetime, float] | None = None
        self._outboxes: dict[str, _Outbox] = {}
        # per validator, the last game update a storage fault kept out (one each)
        self._unstored_games: dict[str, list[dict[str, Any]]] = {}
        self.sent_at: dict[str, float] = {}
        # the last send of those of sent_at sent more than once: an answer may be to
        # any send, so the validator's latency is sampled from the last (a lower bound,
        # never inflated by our own backoff)
        self._resent: dict[str, float] = {}
        # the latest confirmation latencies (first send to answer), for the demo and metrics
        self.latencies: deque[float] = deque(maxlen=100_000)
        # one prediction round at a time: updates from several validators must not
        # both see a game as unpredicted and predict it twice
        self._predicting = trio.Lock()
        self.register_handler("confirmation", self.handle_confirmation)
        self.register_handler("game_update", self.handle_game_updates)
        self.register_handler("error", self.handle_error)
        self.on_connect(self.run_outbox)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Supervise the links, with the replay guard's entries kept on disk beside them."""
        with plain_errors():
            async with trio.open_nursery() as nursery:
                await nursery.start(self.guard_keeper.run)
                await nursery.start(super().run)
                task_status.started()

    async def save_guard(self) -> None:
        await self.guard_keeper.save()

    def apply_metagraph(self, graph: SubnetGraph) -> tuple[list[str], list[str]]:
        """Dial every validator of the subnet (a permit and a served axon) and the
        hand-made list; drop those that left. Returns ``(added, removed)``.

        A dropped validator's pending predictions stay in the store, pending: they
        go if it comes back."""
        self.subnet = graph
        wanted = merged_validators(self.manual_validators, graph, self.hotkey)
        added, removed = self.set_validators(wanted.items())
        for hotkey in added:
            uid = graph.uid_of(hotkey)
            log.info("validator %s%s at %s: dialling", hotkey, "" if uid is None else f" (uid {uid})", wanted[hotkey])
        for hotkey in removed:
            log.info("validator %s left the subnet (or moved): link dropped, its pending predictions kept", hotkey)
        if not wanted:
            log.warning("no validator to dial: none on netuid %d has a permit and a served axon", graph.netuid)
        return added, removed

    # ---- the seed's handlers --------------------------------------------------------------

    async def handle_confirmation(self, websocket: Connection, message: WebSocketMessage) -> None:
        assert isinstance(message, ConfirmationMessage)
        # "Internal server error" is the validator failing, not a verdict: the
        # prediction stays pending and goes again.
        # Neither is a refusal that can heal: "game unknown" on a game this very
        # validator sent us (it lost it, and will learn it again). Those stay
        # pending and go again when their backoff allows; on any other game it is final.
        # Those kept pending remember the reason, for the day they are given up on.
        results = [
            (r.prediction_id, "success" if means_stored(r.status, r.message) else r.status, r.message)
            for r in message.results
            if r.prediction_id
        ]
        kept = [(pid, text) for pid, status, text in results if status == "error" and text == INTERNAL_ERROR]
        healable = [pid for pid, status, text in results if status == "error" and text in HEALABLE]
        if healable:
            keep = await self.db.run(self.store.games_sent_by, websocket.hotkey, healable)
            kept += [(pid, text) for pid, _, text in results if pid in keep]
        if kept:
            held = {pid for pid, _ in kept}
            results = [r for r in results if r[0] not in held]
            await self.db.run(self.store.note_reason, websocket.hotkey, kept)
        await self.db.run(self.store.record_results, websocket.hotkey, results)
        outbox = self._outboxes.get(websocket.hotkey)
        now = trio.current_time()
        observe = self.metrics.confirmation_latency.observe
        for pid, status, _ in results:
            if outbox is not None:
                outbox.inflight.pop(pid, None)
            key = f"{websocket.hotkey}/{pid}"
            sent = self.sent_at.pop(key, None)
            last = self._resent.pop(key, None)
            if sent is not None:
                self.latencies.append(now - sent)
                observe(now - sent)
                self._observe_latency(websocket.hotkey, now - (sent if last is None else last))
            if status != "success":
                log.warning("prediction %s rejected by %s", pid, websocket.hotkey)
        if outbox is not None:
            outbox.poke()

    async def handle_error(self, websocket: Connection, message: WebSocketMessage) -> None:
        """A refused prediction frame: settle its predictions, unless the refusal is transient.

        Rate limits, clock skew and validator failures leave them pending (they
        go again when their backoff allows); a malformed prediction would be refused
        forever, so it is recorded as rejected with the validator's reason.
        """
        refusal = Refusal.parse(message.data.get("message", ""))  # the wire text, read once
        reason = refusal.text()
        nonce = message.data.get("refused_nonce")
        outbox = self._outboxes.get(websocket.hotkey)
        if outbox is None or not isinstance(nonce, str) or nonce not in outbox.by_nonce:
            log.warning("validator %s refused a frame: %s", websocket.hotkey, reason)
            return
        _, pids = outbox.by_nonce.pop(nonce)
        if refusal.transient:
            # still pending, and goes again when its backoff allows; remembered as
            # the reason should it be given up on
            await self.db.run(self.store.note_reason, websocket.hotkey, [(pid, reason) for pid in pids])
            return
        await self.db.run(
            self.store.record_results, websocket.hotkey, [(pid, "error", reason) for pid in pids]
        )
        for pid in pids:
            outbox.inflight.pop(pid, None)
            self._forget_sends(websocket.hotkey, pid)
        log.warning("validator %s refused %d predictions: %s", websocket.hotkey, len(pids), reason)
        outbox.poke()

    async def handle_game_updates(self, websocket: Connection, message: WebSocketMessage) -> None:
        assert isinstance(message, GameUpdateMessage)
        games = message.data.get("games", [])
        try:
            await self._take_games(websocket.hotkey, games)
        except sqlite3.Error as exc:
            # The validator sends an unchanged update only once: keep this one and
            # try again from the outbox loop, or these games are never predicted.
            self._unstored_games[websocket.hotkey] = games
            log.warning(
                "storing %d games from validator %s failed (%s); retrying",
                len(games), websocket.hotkey, exc,
            )
            outbox = self._outboxes.get(websocket.hotkey)
            if outbox is not None:
                outbox.poke()  # it may be asleep until something falls due: retry from now on
            return
        self._unstored_games.pop(websocket.hotkey, None)
        log.debug("received updates for %d games from validator %s", len(games), websocket.hotkey)

    async def _retry_unstored_games(self, validator_hotkey: str) -> None:
        """Store (and predict on) an update that a storage fault kept out, if any."""
        games = self._unstored_games.get(validator_hotkey)
        if games is None:
            return
        try:
            await self._take_games(validator_hotkey, games)
        except sqlite3.Error as exc:
            log.warning("storing games from validator %s failed again (%s)", validator_hotkey, exc)
            return
        if self._unstored_games.get(validator_hotkey) is games:
            del self._unstored_games[validator_hotkey]
        log.info("stored %d games from validator %s after a storage fault", len(games), validator_hotkey)

    async def _take_games(self, validator_hotkey: str, games: list[dict[str, Any]]) -> None:
        """Store one validator's games and predict on them, for that validator alone:
        a game id means that validator's game, and each validator has its own budget."""
        changed = await self.db.run(self.store.upsert_validator_games, validator_hotkey, games)
        # New or changed games, and any stored game still unpredicted: a link that
        # dropped (or a miner killed) between storing an update and predicting on it
        # would otherwise never predict that game, its resends being "unchanged".
        predicted = await self.db.run(self.store.predicted_games, validator_hotkey)
        wanted = set(changed) | {str(g["game_id"]) for g in games if str(g["game_id"]) not in predicted}
        if wanted:
            await self.trigger_predictions_for_updated_games(
                [g for g in games if str(g["game_id"]) in wanted], validator_hotkey
            )

    async def trigger_predictions_for_updated_games(
        self, games: Sequence[dict[str, Any]], validator_hotkey: str | None = None
    ) -> list[str]:
        """Ask the strategy about new or changed games; store what it predicts, then send.

        With ``validator_hotkey``, the games are that validator's: the predictions
        go to it alone, within its daily budget. Without, to every validator.
        """
        async with self._predicting:
            predicted = await self.db.run(self.store.predicted_games, validator_hotkey)
            # keyed by id: a game listed twice in one update is still predicted once
            fresh = list({str(g["game_id"]): g for g in games if str(g["game_id"]) not in predicted}.values())
            if not fresh:
                return []
            try:
                candidates = self.strategy(fresh)
            except Exception:
                log.exception("the strategy failed on %d games; none predicted this round", len(fresh))
                return []
            budget = DAILY_WAGER_LIMIT - await self.db.run(self.store.wagered_today, validator_hotkey)
            chosen = []
            for prediction in self._well_formed(candidates):
                wager = float(prediction["wager"])
                if wager <= budget:
                    chosen.append(prediction)
                    budget -= wager
            targets = [validator_hotkey] if validator_hotkey is not None else list(self.validators)
            return await self._store_predictions(chosen, targets)

    @staticmethod
    def _well_formed(predictions: Sequence[Any]) -> list[dict[str, Any]]:
        """The predictions a validator could accept as such; each other one is
        dropped alone, with a WARNING saying why, before it enters the outbox."""
        kept = []
        for prediction in predictions:
            problem = prediction_problem(prediction)
            if problem is None:
                problem = check_own_data(prediction)
            if problem is not None:
                game = prediction.get("game_id") if isinstance(prediction, dict) else None
                log.warning("dropped a prediction (game %s): %s", bounded(game, 64), problem)
                continue
            kept.append(prediction)
        return kept

    async def submit_predictions(self, predictions: Sequence[dict[str, Any]]) -> list[str]:
        """Store predictions as pending for every validator, then wake the outboxes.

        A malformed or oversize prediction is dropped alone, with a WARNING."""
        return await self._store_predictions(self._well_formed(predictions), list(self.validators))

    async def _store_predictions(self, predictions: list[dict[str, Any]], validators: list[str]) -> list[str]:
        if not predictions:
            return []
        added = await self.db.run(self.store.add_predictions, predictions, validators)
        for outbox in self._outboxes.values():
            outbox.poke()
        return added

    # ---- the outbox -----------------------------------------------------------------------

    def _observe_latency(self, validator_hotkey: str, latency: float) -> None:
        old = self.latency.get(validator_hotkey)
        self.latency[validator_hotkey] = (
            latency if old is None else old + LATENCY_WEIGHT * (latency - old)
        )

    def _forget_sends(self, validator_hotkey: str, pid: str) -> None:
        key = f"{validator_hotkey}/{pid}"
        self.sent_at.pop(key, None)
        self._resent.pop(key, None)

    def resend_wait(self, validator_hotkey: str) -> float:
        """Seconds a prediction sent to that validator is given to be answered before
        it may go again (the first time; each further attempt doubles it): at least
        ``retry_after``, and ``resend_factor`` times the validator's average latency."""
        return max(self.retry_after, self.resend_factor * self.latency.get(validator_hotkey, 0.0))

    def wall_now(self) -> datetime:
        """The wall clock (UTC) as the outbox keeps it: read once, then advanced by
        Trio's clock, so a mock clock drives resends and a step of the system clock
        does not."""
        if self._clock_base is None:
            self._clock_base = (datetime.now(UTC), trio.current_time())
        wall, mono = self._clock_base
        return wall + timedelta(seconds=trio.current_time() - mono)

    async def run_outbox(self, connection: LinkConnection) -> None:
        """Resend what is pending for this validator, then keep sending, until the link ends."""
        outbox = _Outbox()
        self._outboxes[connection.hotkey] = outbox
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._drain, connection, outbox)
                await connection.closed.wait()
                nursery.cancel_scope.cancel()
        finally:
            if self._outboxes.get(connection.hotkey) is outbox:
                del self._outboxes[connection.hotkey]

    async def _drain(self, connection: LinkConnection, outbox: _Outbox) -> None:
        hotkey = connection.hotkey
        batched = BATCH in connection.features
        bucket = TokenBucket(self.send_rate, self.send_burst, now=trio.current_time())
        while True:
            outbox.wake = trio.Event()
            await self._retry_unstored_games(hotkey)
            now = trio.current_time()
            expiry = self.resend_wait(hotkey)
            for pid, sent in list(outbox.inflight.items()):
                if now - sent >= expiry:
                    del outbox.inflight[pid]
            for nonce, (sent, _) in list(outbox.by_nonce.items()):
                if now - sent >= expiry:
                    del outbox.by_nonce[nonce]
            room = self.window - len(outbox.inflight)
            pending: list[dict[str, Any]] = []
            due: datetime | None = None
            wait = IDLE_WAKE
            try:
                given_up, pending, due = await self.db.run(
                    self._read_outbox, hotkey, room, list(outbox.inflight), self.wall_now()
                )
                for pid in given_up:
                    outbox.inflight.pop(pid, None)
                    self._forget_sends(hotkey, pid)
            except sqlite3.Error as exc:
                log.warning("reading the outbox for %s failed (%s); retrying", hotkey, exc)
                wait = 1.0
            sized: list[tuple[dict[str, Any], int]] = []
            if pending:
                sized = await self._settle_unfittable(connection, pending)
                if len(sized) < len(pending):
                    wait = 0.0  # settled some: the window has room for the next at once
                pending = [prediction for prediction, _ in sized]
            if pending:
                gone: list[str] = []
                if batched:
                    for chunk in self._chunks(connection, sized):
                        await self._send(connection, outbox, chunk, {"predictions": chunk})
                        gone += (str(p.get("prediction_id")) for p in chunk)
                else:
                    for prediction in pending:
                        if not bucket.take(trio.current_time()):
                            wait = 1.0 / self.send_rate
                            break
                        await self._send(connection, outbox, [prediction], prediction)
                        gone.append(str(prediction.get("prediction_id")))
                # one write for the round (a send cancelled before it is not counted,
                # and goes again at once: the old behaviour, never a flood)
                await self._record_sent(hotkey, gone)
            wait = min(wait, self._next_wake(hotkey, outbox, due))
            with trio.move_on_after(wait):
                await outbox.wake.wait()

    def _read_outbox(
        self, validator_hotkey: str, room: int, inflight: list[str], now: datetime
    ) -> tuple[list[str], list[dict[str, Any]], datetime | None]:
        """In the database thread: settle what ran out of attempts, read what is due
        (at most ``room``), and say when the next one other than those is due."""
        given_up = self.store.settle_exhausted(validator_hotkey, self.max_attempts, now)
        if given_up:
            log.warning(
                "validator %s never answered %d predictions in %d attempts; settled as rejected",
                validator_hotkey, len(given_up), self.max_attempts,
            )
        pending = self.store.pending(validator_hotkey, room, inflight, now) if room > 0 else []
        due = self.store.next_due(
            validator_hotkey, [*inflight, *(str(p.get("prediction_id")) for p in pending)]
        )
        return given_up, pending, due

    def _next_wake(self, validator_hotkey: str, outbox: _Outbox, due: datetime | None) -> float:
        """Seconds until the outbox has something to do unless poked: an in-flight
        prediction expiring, or, with room in the window, the next one falling due."""
        now = trio.current_time()
        wait = IDLE_WAKE
        if validator_hotkey in self._unstored_games:
            wait = self.retry_after
        expiry = self.resend_wait(validator_hotkey)
        if outbox.inflight:
            wait = min(wait, max(0.0, min(outbox.inflight.values()) + expiry - now))
        if due is not None and len(outbox.inflight) < self.window:
            wait = min(wait, max(0.0, (due - self.wall_now()).total_seconds()))
        return wait

    @staticmethod
    def _frame_room(connection: LinkConnection) -> int:
        """Bytes of predictions one frame to this validator may carry."""
        limit = connection.protocol.peer_limits.max_message_size or DEFAULT_PEER_MAX_SIZE
        return limit - ENVELOPE_ROOM

    async def _settle_unfittable(
        self, connection: LinkConnection, pending: list[dict[str, Any]]
    ) -> list[tuple[dict[str, Any], int]]:
        """Settle as rejected, with a WARNING, each prediction no frame to this
        validator can carry (over its frame or prediction limit); the rest go on,
        each with its size as JSON."""
        limits = connection.protocol.peer_limits
        room = self._frame_room(connection)
        if limits.max_prediction_bytes is not None:
            room = min(room, limits.max_prediction_bytes)
        fits: list[tuple[dict[str, Any], int]] = []
        refused = []
        for prediction in pending:
            size = len(orjson.dumps(prediction))
            if size <= room:
                fits.append((prediction, size))
            else:
                reason = f"prediction of {size} bytes over the limit of {room} bytes this validator accepts"
                refused.append((str(prediction.get("prediction_id")), "error", reason))
                log.warning("prediction %s never fits validator %s: %s",
                            bounded(prediction.get("prediction_id"), 64), connection.hotkey, reason)
        if refused:
            await self.db.run(self.store.record_results, connection.hotkey, refused)
        return fits

    def _chunks(
        self, connection: LinkConnection, sized: list[tuple[dict[str, Any], int]]
    ) -> list[list[dict[str, Any]]]:
        """Batches of at most ``batch_size`` (and ``MAX_BATCH``) predictions, given with
        their sizes, that each fit one frame."""
        room = self._frame_room(connection)
        most = min(self.batch_size, MAX_BATCH)
        chunks: list[list[dict[str, Any]]] = []
        chunk: list[dict[str, Any]] = []
        used = 0
        for prediction, length in sized:
            size = length + 1  # and its comma
            if chunk and (len(chunk) >= most or used + size > room):
                chunks.append(chunk)
                chunk, used = [], 0
            chunk.append(prediction)
            used += size
        if chunk:
            chunks.append(chunk)
        return chunks

    async def _record_sent(self, validator_hotkey: str, pids: list[str]) -> None:
        """Count an attempt for each prediction sent, and when it may go next."""
        if not pids:
            return
        try:
            await self.db.run(
                self.store.record_sent, validator_hotkey, pids, self.wall_now(),
                self.resend_wait(validator_hotkey), self.max_backoff,
            )
        except sqlite3.Error as exc:
            # sent all the same: until it is recorded, a resend waits on the window alone
            log.warning("recording sends to %s failed (%s)", validator_hotkey, exc)

    async def _send(
        self, connection: LinkConnection, outbox: _Outbox, predictions: list[dict[str, Any]], data: dict[str, Any]
    ) -> None:
        now = trio.current_time()
        pids = []
        for prediction in predictions:
            pid = str(prediction.get("prediction_id"))
            pids.append(pid)
            outbox.inflight[pid] = now
            key = f"{connection.hotkey}/{pid}"
            if key in self.sent_at:
                self._resent[key] = now
            else:
                self.sent_at[key] = now
        signed = sign(PredictionMessage(sender=self.hotkey, data=data), self.keypair)
        outbox.by_nonce[signed.nonce] = (now, pids)
        try:
            await connection.send_frame(Frame.of(signed))
        except LinkClosed:
            return

    def close(self) -> None:
        self.store.close()
