"""Group commit: one transaction and one fsync for every prediction waiting.

Connections hand their predictions to one committer task; while a commit is
on the disk, new submissions queue, and the next commit takes them all. The
group grows with the load by itself, so a quiet validator adds no delay and a
busy one pays one sync for many predictions. Each job's ``answer`` gets its
results only after its group is durable.

Given a separate ``write`` step, it is a two-stage pipeline: while one commit is
written (its insert and its fsync, mostly outside the GIL), the next groups are
decided (the rules, mostly Python) on a second thread, so the two overlap; the
groups decided meanwhile share the next commit.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

import attrs
import trio

from .dbthread import DbThread
from .store import PredictionResult, StaleBatch

__all__ = ["GroupCommitter", "SubmitMany"]

log = logging.getLogger("bettensor_ws.committer")

Jobs = Sequence[tuple[str, Sequence[dict[str, Any]]]]
SubmitMany = Callable[[Jobs], list[list[PredictionResult]]]
Write = Callable[[Sequence[Any]], list[list[list[PredictionResult]] | Exception]]
"""Stores decided groups (in one transaction); per group, its answers or why not."""


Answer = Callable[[list[PredictionResult] | None], None]
"""Called in the committer's task with a job's results, or None if its commit failed."""


@attrs.define(eq=False)
class _Job:
    hotkey: str
    predictions: Sequence[dict[str, Any]]
    answer: Answer


class GroupCommitter:
    """Runs ``submit_many`` on the DB thread for groups of jobs.

    With ``write``, ``submit_many`` only decides (on the DB thread's decision
    lane, returning a decided group) and ``write`` stores every group decided
    since the last commit, in order, and returns their answers (on the main lane). ``queue_size``
    bounds the jobs waiting (backpressure on the connections), ``max_group``
    the predictions in one transaction.
    """

    def __init__(
        self,
        submit_many: Callable[[Jobs], Any],
        db: DbThread,
        *,
        write: Write | None = None,
        queue_size: int = 4096,
        max_group: int = 5000,
    ) -> None:
        self._submit_many = submit_many
        self._write = write
        self._db = db
        self.max_group = max_group
        self._queue_size = queue_size
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
        """Commit groups until cancelled; a failed commit fails only its group
        (and, pipelined, the groups decided on top of it)."""
        if self._write is None:
            task_status.started()
            async for first in self._recv:
                # in a method of its own: once answered, nothing of the group (nor the
                # links its answers hold) is kept while waiting for the next one
                await self._commit_group(first)
                del first
            return
        await self._run_pipelined(task_status)

    def _take(self, first: _Job) -> tuple[list[_Job], int]:
        """The first job and those waiting behind it, up to ``max_group`` predictions."""
        jobs = [first]
        size = len(first.predictions)
        while size < self.max_group:
            try:
                job = self._recv.receive_nowait()
            except trio.WouldBlock:
                break
            jobs.append(job)
            size += len(job.predictions)
        return jobs, size

    async def _commit_group(self, first: _Job) -> None:
        jobs, size = self._take(first)
        try:
            results = await self._db.run(self._submit_many, [(job.hotkey, job.predictions) for job in jobs])
        except Exception:
            log.exception("group commit of %d predictions failed", size)
            self._fail(jobs)
            return
        self._done(jobs, size, results)

    # ---- pipelined: a decision thread and a write thread, owned by this task ----------------

    async def _run_pipelined(self, task_status: trio.TaskStatus[None]) -> None:
        """Jobs go to the decision thread, its groups to the write thread, answers
        back to the loop: a group reaches the disk without waiting for the loop
        to schedule anything, so a busy loop leaves no gaps between commits.

        Both threads run inside this task's nursery and end with it: on
        cancellation, what is queued is dropped unanswered (its links are closing
        too), and the group being written is finished first.
        """
        pipe = _Pipe(trio.lowlevel.current_trio_token(), self.max_group, self._queue_size)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._thread, self._decide_loop, pipe)
            nursery.start_soon(self._thread, self._write_loop, pipe)
            task_status.started()
            try:
                async for job in self._recv:
                    # at most queue_size jobs in the threads, as in the channel
                    await pipe.room.acquire()
                    pipe.put(job)
                    del job
            finally:
                pipe.stop()

    @staticmethod
    async def _thread(loop: Callable[[_Pipe], None], pipe: _Pipe) -> None:
        try:
            await trio.to_thread.run_sync(loop, pipe)  # not abandoned: it ends when the pipe stops
        finally:
            pipe.stop()  # one thread failing stops the other

    def _decide_loop(self, pipe: _Pipe) -> None:
        # each group in a call of its own: once it returns, nothing of a group (nor
        # the links its answers hold) stays bound while the thread waits for the next
        while self._decide_one(pipe):
            pass

    def _decide_one(self, pipe: _Pipe) -> bool:
        jobs = pipe.take()
        if jobs is None:
            return False
        size = sum(len(job.predictions) for job in jobs)
        try:
            with self._db.decision_lock:
                decided = self._submit_many([(job.hotkey, job.predictions) for job in jobs])
        except Exception:
            log.exception("deciding a group of %d predictions failed", size)
            pipe.post(self._fail, jobs)
        else:
            pipe.hand_over((jobs, size, decided))
        return True

    def _write_loop(self, pipe: _Pipe) -> None:
        while self._write_one(pipe):  # as above: a call per commit, nothing kept between
            pass

    def _write_one(self, pipe: _Pipe) -> bool:
        assert self._write is not None
        items = pipe.decided()
        if not items:
            return False
        try:
            with self._db.main_lock:
                outcomes = self._write([decided for _, _, decided in items])
        except Exception as exc:  # the write step's own contract is to return them
            outcomes = [exc] * len(items)
        logged: set[int] = set()
        for (jobs, size, _), outcome in zip(items, outcomes, strict=True):
            if isinstance(outcome, Exception):
                if isinstance(outcome, StaleBatch):
                    log.warning("group of %d predictions not stored: %s", size, outcome)
                elif id(outcome) not in logged:  # one failed commit, one log line
                    logged.add(id(outcome))
                    log.error("group commit of %d predictions failed", size, exc_info=outcome)
                pipe.post(self._fail, jobs)
            else:
                pipe.post(self._done, jobs, size, outcome)
        return True

    def _fail(self, jobs: list[_Job]) -> None:
        for job in jobs:
            self._answer(job, None)

    def _done(self, jobs: list[_Job], size: int, results: list[list[PredictionResult]]) -> None:
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



class _Pipe:
    """What the loop and a committer's two threads share: jobs for the decision
    thread, decided groups for the write thread, answers back to the loop. One
    condition guards it all; every wait also ends on :meth:`stop`."""

    def __init__(self, token: trio.lowlevel.TrioToken, max_group: int, queue_size: int) -> None:
        self._token = token
        self._max_group = max_group
        self.room = trio.Semaphore(queue_size)  # jobs in the threads, released as answered
        self._cv = threading.Condition()
        self._jobs: collections.deque[_Job] = collections.deque()
        self._decided: list[Any] = []
        self._stopped = False

    def put(self, job: _Job) -> None:
        with self._cv:
            self._jobs.append(job)
            self._cv.notify_all()

    def take(self) -> list[_Job] | None:
        """The decision thread's next group: every job waiting, up to ``max_group``
        predictions (at least one job); None once stopped."""
        with self._cv:
            while not self._jobs and not self._stopped:
                self._cv.wait()
            if self._stopped:
                return None
            jobs = [self._jobs.popleft()]
            size = len(jobs[0].predictions)
            while self._jobs and size < self._max_group:
                jobs.append(self._jobs.popleft())
                size += len(jobs[-1].predictions)
            return jobs

    def hand_over(self, item: Any) -> None:
        """Give the write thread a decided group: it takes every group waiting at
        its next commit (how far decisions run ahead is bounded by :attr:`room`)."""
        with self._cv:
            self._decided.append(item)
            self._cv.notify_all()

    def decided(self) -> list[Any]:
        """The write thread's next commit: every decided group waiting, in order
        (at least one); empty once stopped."""
        with self._cv:
            while not self._decided and not self._stopped:
                self._cv.wait()
            if self._stopped:
                return []
            items, self._decided = self._decided, []
            return items

    def post(self, fn: Callable[..., None], jobs: list[_Job], *args: Any) -> None:
        """Run ``fn(jobs, *args)`` on the loop (from a thread), then free the jobs' room."""

        def deliver() -> None:
            try:
                fn(jobs, *args)
            except Exception:  # raised in a run_sync_soon callback, it would end the whole run
                log.exception("answering a group of %d jobs failed", len(jobs))
            finally:
                for _ in jobs:
                    self.room.release()

        with contextlib.suppress(trio.RunFinishedError):
            self._token.run_sync_soon(deliver)

    def stop(self) -> None:
        with self._cv:
            self._stopped = True
            self._cv.notify_all()
