"""The validator node: a validator manager with a SQLite store and group commit.

It checks, stores and confirms predictions: a success confirmation leaves only
after its prediction is committed.
"""

from __future__ import annotations

import logging
import sqlite3
import weakref
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import trio

from ..link.connection import BATCH, LinkConnection
from ..link.transport import plain_errors
from ..link.validator import ValidatorWebSocketManager
from ..protocol.dispatch import INTERNAL_ERROR, Connection
from ..protocol.messages import (
    MAX_ID,
    PredictionMessage,
    WebSocketMessage,
    now_iso,
)
from ..protocol.payloads import TeamGame, converter
from ..protocol.signing import Signer
from .chain import SubnetGraph
from .committer import GroupCommitter
from .dbthread import DbThread
from .guardstore import GuardKeeper
from .metrics import ValidatorMetrics
from .rules import prediction_id_of
from .store import PredictionResult, ValidatorStore

__all__ = ["ValidatorNode"]

log = logging.getLogger("bettensor_ws.node")

JOBS_PER_PEER = 4
"""Prediction frames of one miner queued for the disk at once (each up to 1,000
predictions of 4 KiB); its next frame waits for a slot."""


class ValidatorNode(ValidatorWebSocketManager):
    """A validator manager with a SQLite store and the seed's prediction flow.

    Validate, store, confirm: a success confirmation leaves only after its
    prediction is committed. Batches (``{"predictions": [...]}``) are answered
    by one confirmation listing a result per prediction, in order.
    """

    def __init__(
        self, keypair: Signer, db_path: str | Path, metagraph: Any = None, *, min_stake: float = 0.0, **kwargs: Any
    ) -> None:
        """``metagraph`` is what the manager takes (a hotkey list, anything with
        ``.hotkeys``, or None). :meth:`apply_metagraph` and :meth:`set_allow_list`
        then admit the union of the subnet's hotkeys with ``min_stake`` and the list."""
        kwargs.setdefault("features", (BATCH,))
        super().__init__(keypair, metagraph, **kwargs)
        self.min_stake = min_stake
        self.subnet: SubnetGraph | None = None
        self.allow_list: frozenset[str] | None = None if metagraph is None else self._allowed
        self.store = ValidatorStore(db_path)
        self.db = DbThread()
        self.metrics = ValidatorMetrics(self)
        self.committer = GroupCommitter(
            self.store.decide, self.db, write=self.metrics.timed(self.store.write_many)
        )
        self.http_routes = {**self.metrics.routes(), **self.http_routes}
        self.guard_keeper = GuardKeeper(self.guard, self.store, self.db)
        self._job_slots: weakref.WeakKeyDictionary[LinkConnection, trio.Semaphore] = weakref.WeakKeyDictionary()
        self._committing = False
        self.register_handler("prediction", self.handle_prediction)
        self.on_connect(self.send_upcoming_games)

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve miners, with the group committer running beside the connections."""
        with plain_errors():
            async with trio.open_nursery() as nursery:
                await nursery.start(self.guard_keeper.run)
                await nursery.start(self._run_committer)
                port = await nursery.start(super().serve)
                task_status.started(port)

    async def save_guard(self) -> None:
        await self.guard_keeper.save()

    # ---- who may connect ----------------------------------------------------------------------

    def apply_metagraph(self, graph: SubnetGraph) -> list[str]:
        """Admit the subnet's hotkeys (with at least ``min_stake``) and the allow list;
        close the links of the others (1008 "hotkey deregistered"). Returns those."""
        self.subnet = graph
        return self._readmit()

    def set_allow_list(self, hotkeys: Iterable[str] | None) -> list[str]:
        """Replace the hand-made allow list (None: none); as :meth:`apply_metagraph`."""
        self.allow_list = None if hotkeys is None else frozenset(hotkeys)
        return self._readmit()

    def _readmit(self) -> list[str]:
        if self.subnet is None and self.allow_list is None:
            return self.refresh_metagraph(None)
        admitted: set[str] = set(self.allow_list or ())
        if self.subnet is not None:
            admitted |= self.subnet.admitted(self.min_stake)
        dropped = self.refresh_metagraph(admitted)
        for hotkey in dropped:
            log.info("miner %s left the subnet or the allow list: link closed", hotkey)
        return dropped

    def peer_label(self, hotkey: str) -> str:
        uid = self.subnet.uid_of(hotkey) if self.subnet is not None else None
        return hotkey if uid is None else f"{hotkey} (uid {uid})"

    async def _run_committer(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self._committing = True
        try:
            await self.committer.run(task_status=task_status)
        finally:
            self._committing = False

    async def handle_prediction(self, websocket: Connection, message: WebSocketMessage) -> None:
        """Validate, store, confirm: answers leave only once their group is committed.

        Under :meth:`serve` the handler only queues the predictions; the
        committer answers on the connection when their group is durable, so a
        miner's next frames are read meanwhile.
        """
        assert isinstance(message, PredictionMessage)
        items = message.raw_predictions()
        problems = message.item_problems()
        # a batch is judged item by item: a malformed item is answered with its
        # own error, and its neighbours are stored and confirmed
        predictions = [item for item, problem in zip(items, problems, strict=True) if problem is None]
        is_batch = message.is_batch

        def merged(results: list[PredictionResult] | None) -> list[PredictionResult]:
            good = iter(results or _internal_errors(predictions))
            return [
                next(good) if problem is None
                else PredictionResult(prediction_id=_echoable_id(item), status="error", message=problem)
                for item, problem in zip(items, problems, strict=True)
            ]

        if self._committing and isinstance(websocket, LinkConnection):
            conn = websocket
            if not predictions:  # nothing for the disk: every item is answered now
                conn.queue_results(merged([]), together=is_batch)
                await trio.lowlevel.checkpoint()
                return
            # At most JOBS_PER_PEER of one miner's frames wait for the disk: its
            # reader waits for the rest (backpressure), so what one peer holds in
            # memory is bounded whatever the committer's queue would take.
            slots = self._job_slots.get(conn)
            if slots is None:
                slots = self._job_slots[conn] = trio.Semaphore(JOBS_PER_PEER)
            # Without waiting when there is room (the reader yields for its next
            # frame anyway): each wait here is a scheduling round per frame.
            try:
                slots.acquire_nowait()
            except trio.WouldBlock:
                await slots.acquire()
            queued_at = trio.current_time()

            def answer(results: list[PredictionResult] | None) -> None:
                slots.release()
                self.metrics.confirmation_latency.observe(trio.current_time() - queued_at)
                conn.queue_results(merged(results), together=is_batch)

            try:
                if not self.committer.enqueue_nowait(websocket.hotkey, predictions, answer):
                    await self.committer.enqueue(websocket.hotkey, predictions, answer)
            except BaseException:
                slots.release()
                raise
            return
        if not predictions:
            results = merged([])
        else:
            try:  # without serve() (a handler test, a MockWebSocket): commit on its own
                results = merged(await self.db.run(self.store.submit, websocket.hotkey, predictions))
            except Exception:
                log.exception("storing %d predictions from %s failed", len(predictions), websocket.hotkey)
                results = merged(None)
        if isinstance(websocket, LinkConnection) and BATCH in websocket.features:
            await websocket.send_results(results)
        elif is_batch:
            await websocket.send_json({"type": "confirmation", "results": results, "timestamp": now_iso()})
        else:
            await websocket.send_json({"type": "confirmation", **results[0], "timestamp": now_iso()})

    async def send_upcoming_games(self, connection: LinkConnection) -> None:
        """Right after Welcome: every active game not yet started, as one update.

        A storage fault (a locked database) is retried with backoff, with a
        WARNING, for as long as the link lasts, rather than ending the link.
        """
        delay = 1.0
        while True:
            try:
                games = await self.db.run(self.store.upcoming_games)
                break
            except sqlite3.Error as exc:
                log.warning("reading games for %s failed (%s); retrying in %g s", connection.hotkey, exc, delay)
                await trio.sleep(delay)
                delay = min(delay * 2, 30.0)
        if games:
            await connection.send_message(self.game_update(games))

    async def update_games(self, games: Iterable[TeamGame | dict[str, Any]]) -> int | None:
        """Store games, then broadcast them; returns how many miners got the update."""
        rows = [converter.unstructure(g) if isinstance(g, TeamGame) else dict(g) for g in games]
        await self.db.run_exclusive(self.store.upsert_games, rows)  # decisions read the games
        return await self.broadcast_game_updates(rows)

    @property
    def committing(self) -> bool:
        """Whether the group committer runs (under :meth:`serve`)."""
        return self._committing

    def pending_commits(self) -> int:
        """Prediction frames queued for the disk and not yet answered."""
        return sum(JOBS_PER_PEER - slots.value for slots in list(self._job_slots.values()))

    def close(self) -> None:
        self.store.close()


def _echoable_id(item: Any) -> str:
    """A refused item's id, if it is one we would echo (not over ``MAX_ID``), else ""."""
    pid = prediction_id_of(item)
    return pid if pid is not None and len(pid) <= MAX_ID else ""


def _internal_errors(predictions: Sequence[dict[str, Any]]) -> list[PredictionResult]:
    """The answer when storing failed: the miner keeps these pending and resends."""
    return [
        PredictionResult(prediction_id=_echoable_id(p), status="error", message=INTERNAL_ERROR)
        for p in predictions
    ]


