"""Group commit: one transaction and one fsync for every prediction waiting.

Connections hand their predictions to one committer task; while a commit is
on the disk, new submissions queue, and the next commit takes them all. The
group grows with the load by itself, so a quiet validator adds no delay and a
busy one pays one sync for many predictions. Each submitter is woken with its
own results only after its group is durable.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import attrs
import trio

from .store import DbThread, PredictionResult

__all__ = ["GroupCommitter", "SubmitMany"]

log = logging.getLogger("bettensor_ws.committer")

SubmitMany = Callable[[Sequence[tuple[str, Sequence[dict[str, Any]]]]], list[list[PredictionResult]]]


@attrs.define(eq=False)
class _Job:
    hotkey: str
    predictions: Sequence[dict[str, Any]]
    done: trio.Event = attrs.field(factory=trio.Event)
    results: list[PredictionResult] | None = None
    error: BaseException | None = None


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

    async def submit(self, hotkey: str, predictions: Sequence[dict[str, Any]]) -> list[PredictionResult]:
        """Results for ``predictions``, returned once they are committed.

        Raises what the store raised, so the caller answers with an error and
        the miner keeps the predictions pending.
        """
        job = _Job(hotkey, predictions)
        await self._send.send(job)
        await job.done.wait()
        if job.error is not None:
            raise RuntimeError("commit failed") from job.error
        assert job.results is not None
        return job.results

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Commit groups until cancelled; a failed commit fails only its group."""
        task_status.started()
        async for first in self._recv:
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
                results = await self._db.run(
                    self._submit_many, [(job.hotkey, job.predictions) for job in jobs]
                )
            except Exception as exc:
                log.exception("group commit of %d predictions failed", size)
                for job in jobs:
                    job.error = exc
                    job.done.set()
                continue
            self.groups += 1
            self.committed += size
            for job, result in zip(jobs, results, strict=True):
                job.results = result
                job.done.set()
