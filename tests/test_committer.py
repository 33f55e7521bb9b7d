"""GroupCommitter: jobs waiting together share one call; a failed call fails only its group."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import trio

from bettensor_ws.node.committer import GroupCommitter
from bettensor_ws.node.dbthread import DbThread
from bettensor_ws.node.store import PredictionResult

Jobs = Sequence[tuple[str, Sequence[dict[str, Any]]]]


def _ok(jobs: Jobs) -> list[list[PredictionResult]]:
    return [
        [PredictionResult(prediction_id=p["prediction_id"], status="success", message=h) for p in preds]
        for h, preds in jobs
    ]


class Answers:
    """Collects answers; ``await wait(n)`` returns once n have arrived."""

    def __init__(self) -> None:
        self.got: list[tuple[str, list[PredictionResult] | None]] = []
        self._changed = trio.Event()

    def for_(self, hotkey: str) -> Any:
        def answer(results: list[PredictionResult] | None) -> None:
            self.got.append((hotkey, results))
            self._changed.set()

        return answer

    async def wait(self, n: int) -> None:
        with trio.fail_after(5):
            while len(self.got) < n:
                self._changed = trio.Event()
                await self._changed.wait()


async def test_jobs_queued_together_share_one_commit_and_keep_their_order() -> None:
    calls: list[int] = []

    def submit_many(jobs: Jobs) -> list[list[PredictionResult]]:
        calls.append(len(jobs))
        return _ok(jobs)

    committer = GroupCommitter(submit_many, DbThread())
    answers = Answers()
    async with trio.open_nursery() as nursery:
        for i in range(5):  # queued before the committer runs: one group
            await committer.enqueue(f"m{i}", [{"prediction_id": f"p{i}"}], answers.for_(f"m{i}"))
        await nursery.start(committer.run)
        await answers.wait(5)
        nursery.cancel_scope.cancel()
    assert calls == [5]
    assert [h for h, _ in answers.got] == ["m0", "m1", "m2", "m3", "m4"]
    assert all(r is not None and r[0]["message"] == h for h, r in answers.got)
    assert committer.groups == 1 and committer.committed == 5


async def test_a_failed_commit_answers_none_and_the_committer_goes_on() -> None:
    failures = [OSError("disk full")]

    def submit_many(jobs: Jobs) -> list[list[PredictionResult]]:
        if failures:
            raise failures.pop()
        return _ok(jobs)

    committer = GroupCommitter(submit_many, DbThread())
    answers = Answers()
    async with trio.open_nursery() as nursery:
        await nursery.start(committer.run)
        await committer.enqueue("m", [{"prediction_id": "a"}], answers.for_("a"))
        await answers.wait(1)
        await committer.enqueue("m", [{"prediction_id": "b"}], answers.for_("b"))
        await answers.wait(2)
        nursery.cancel_scope.cancel()
    assert answers.got[0] == ("a", None)
    second = answers.got[1][1]
    assert second is not None and second[0]["prediction_id"] == "b"
