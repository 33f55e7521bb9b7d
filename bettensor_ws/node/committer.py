"""Group commit: one transaction and one fsync for every prediction waiting.

Connections hand their predictions to one committer task; while a commit is
on the disk, new submissions queue, and the next commit takes them all. The
group grows with the load by itself, so a quiet validator adds no delay and a
busy one pays one sync for many predictions. Each job's ``answer`` gets its
results only after its group is durable.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import attrs
import trio

from .dbthread import DbThread
from .store import PredictionResult

__all__ = ["GroupCommitter", "SubmitMany"]

log = logging.getLogger("bettensor_ws.committer")

SubmitMany = Callable[[Sequence[tuple[str, Sequence[dict[str, Any]]]]], list[list[PredictionResult]]]


Answer = Callable[[list[PredictionResult] | None], None]
"""Called in the committer's task with a job's results, or None if its commit failed."""


@attrs.define(eq=False)
class _Job:
    hotkey: str
    predictions: Sequence[dict[str, Any]]
    answer: Answer


class GroupCommitter:
    """Runs ``submit_many`` on the DB thread for groups of jobs.

    ``queue_size`` bounds the jobs waiting (backpressure on the connections),
    ``max_group`` the predictions in one transaction.
    """

    def __init__(
        self, submit_many: SubmitMany, db: DbThread, *, queue_size: int = 4096, max_group: int = 5000
    ) -> None:
        self._submit_many = submit_many
        self._db = db
        self.max_group = max_group
        self._send, self._recv = trio.open_memory_channel[_Job](queue_size)
        self.groups = 0
        self.committed = 0

    async def enqueue(self, hotkey: str, predictions: Sequence[dict[str, Any]], answer: Answer) -> None:
        """Queue predictions; ``answer`` gets their results once they are committed.

        Returns as soon as the job is queued (waiting only while the queue is
        full), so a connection's reader goes straight on to its next frame:
        pipelining without a task per message. ``answer`` must not block.
        """
        await self._send.send(_Job(hotkey, predictions, answer))

    def enqueue_nowait(self, hotkey: str, predictions: Sequence[dict[str, Any]], answer: Answer) -> bool:
        """Like :meth:`enqueue` when the queue has room (True); False, and nothing queued, when full."""
        try:
            self._send.send_nowait(_Job(hotkey, predictions, answer))
        except trio.WouldBlock:
            return False
        return True

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Commit groups until cancelled; a failed commit fails only its group."""
        task_status.started()
        async for first in self._recv:
            # in a method of its own: once answered, nothing of the group (nor the
            # links its answers hold) is kept while waiting for the next one
            await self._commit_group(first)
            del first

    async def _commit_group(self, first: _Job) -> None:
        jobs = [first]
        size = len(first.predictions)
        while size < self.max_group:
            try:
                job = self._recv.receive_nowait()
            except trio.WouldBlock:
                break
            jobs.append(job)
            size += len(job.predictions)
        try:
            results = await self._db.run(self._submit_many, [(job.hotkey, job.predictions) for job in jobs])
        except Exception:
            log.exception("group commit of %d predictions failed", size)
            for job in jobs:
                self._answer(job, None)
            return
        self.groups += 1
        self.committed += size
        for job, result in zip(jobs, results, strict=True):
            self._answer(job, result)

    @staticmethod
    def _answer(job: _Job, results: list[PredictionResult] | None) -> None:
        try:
            job.answer(results)
        except Exception:  # one connection's reply failing must not stop the committer
            log.exception("answering %d predictions of %s failed", len(job.predictions), job.hotkey)
