"""The pipelined group commit: one group decided while the one before is written.

``ValidatorStore.decide`` and ``write`` split ``submit_many``; ``GroupCommitter``
with a write step runs them on two threads of its own. What must hold: answers
as if every group were submitted one after another; a resend decided before
the first copy is durable is answered as before; a failed write fails its
group and every group decided on top of it, and the next decision starts again
from the disk; the threads end with the committer's nursery.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import pytest
import trio

from bettensor_ws.node import store as store_mod
from bettensor_ws.node.committer import GroupCommitter
from bettensor_ws.node.dbthread import DbThread
from bettensor_ws.node.rules import DAILY_LIMIT
from bettensor_ws.node.store import PredictionResult, StaleBatch, ValidatorStore

from .test_committer import Answers
from .test_store import ACCEPTED, NOW, answer, prediction


def stored(store: ValidatorStore) -> list[tuple[str, str]]:
    return sorted(
        (r[0], r[1]) for r in store.db.execute("SELECT miner_hotkey, prediction_id FROM predictions")
    )


def test_a_resend_decided_before_the_first_copy_is_durable_is_answered_as_before(
    vstore: ValidatorStore,
) -> None:
    first = vstore.decide([("m", [prediction("p1")])], NOW)
    again = vstore.decide([("m", [prediction("p1"), prediction("p1", wager=5.0)])], NOW)
    assert [answer(r) for r in vstore.write(first)[0]] == [("p1", "success", ACCEPTED)]
    assert [answer(r) for r in vstore.write(again)[0]] == [
        ("p1", "success", ACCEPTED),
        ("p1", "error", "prediction_id already used for another prediction"),
    ]
    assert stored(vstore) == [("m", "p1")]


def test_wagers_decided_and_not_yet_durable_count_against_the_daily_limit(vstore: ValidatorStore) -> None:
    first = vstore.decide([("m", [prediction(f"a{i}", wager=100.0) for i in range(9)])], NOW)
    second = vstore.decide([("m", [prediction("b1", wager=100.0), prediction("b2", wager=100.0)])], NOW)
    vstore.write(first)
    results = vstore.write(second)[0]
    assert [r["status"] for r in results] == ["success", "error"]
    assert results[1]["message"] == DAILY_LIMIT


def test_a_failed_write_fails_the_groups_decided_on_top_and_the_next_starts_from_disk(
    vstore: ValidatorStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    vstore.submit_many([("m", [prediction("old", wager=100.0)])], NOW)
    first = vstore.decide([("m", [prediction("p1", wager=900.0)])], NOW)
    on_top = vstore.decide([("m", [prediction("p1", wager=900.0), prediction("p2", wager=50.0)])], NOW)
    # on top of the first: p1 answered as before, p2 over the limit with p1's wager counted
    assert [r["status"] for r in on_top.results[0]] == ["success", "error"]

    real = store_mod._insert_rows

    def full_disk(*args: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(store_mod, "_insert_rows", full_disk)
    with pytest.raises(OSError):
        vstore.write(first)
    monkeypatch.setattr(store_mod, "_insert_rows", real)
    with pytest.raises(StaleBatch):
        vstore.write(on_top)
    # decided afresh: p1 is new again, and only the stored wager (100) counts
    again = vstore.decide([("m", [prediction("p1", wager=900.0), prediction("p2", wager=50.0)])], NOW)
    assert [answer(r) for r in vstore.write(again)[0]] == [("p1", "success", ACCEPTED), ("p2", "error", DAILY_LIMIT)]
    assert stored(vstore) == [("m", "old"), ("m", "p1")]


def test_groups_decided_meanwhile_share_one_commit_and_a_stale_one_is_refused(
    vstore: ValidatorStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = vstore.decide([("m", [prediction("p1")])], NOW)
    second = vstore.decide([("n", [prediction("p1")]), ("m", [prediction("p2")])], NOW)
    commits = []
    real = store_mod.transaction

    def counted(db: Any) -> Any:
        commits.append(db)
        return real(db)

    monkeypatch.setattr(store_mod, "transaction", counted)
    outcomes = vstore.write_many([first, second])
    assert len(commits) == 1
    assert [[[answer(r) for r in job] for job in outcome] for outcome in outcomes] == [  # type: ignore[union-attr]
        [[("p1", "success", ACCEPTED)]],
        [[("p1", "success", ACCEPTED)], [("p2", "success", ACCEPTED)]],
    ]
    assert stored(vstore) == [("m", "p1"), ("m", "p2"), ("n", "p1")]
    # a write that fails makes the groups decided before it stale; later ones are written
    stale = vstore.decide([("m", [prediction("p3")])], NOW)
    monkeypatch.setattr(store_mod, "_insert_rows", lambda *args: (_ for _ in ()).throw(OSError("disk full")))
    doomed = vstore.decide([("m", [prediction("p4")])], NOW)
    assert isinstance(vstore.write_many([doomed])[0], OSError)
    monkeypatch.undo()
    fresh = vstore.decide([("m", [prediction("p5")])], NOW)
    outcomes = vstore.write_many([stale, fresh])
    assert isinstance(outcomes[0], StaleBatch) and not isinstance(outcomes[1], Exception)
    assert stored(vstore) == [("m", "p1"), ("m", "p2"), ("m", "p5"), ("n", "p1")]


def test_submit_many_is_decide_then_write(vstore: ValidatorStore) -> None:
    results = vstore.submit_many([("m", [prediction("p1")]), ("n", [prediction("p1")])], NOW)
    assert [[answer(r) for r in job] for job in results] == [[("p1", "success", ACCEPTED)]] * 2
    assert stored(vstore) == [("m", "p1"), ("n", "p1")]


# ---- the committer's threads ----------------------------------------------------------------


Jobs = Sequence[tuple[str, Sequence[dict[str, Any]]]]


async def test_pipelined_committer_answers_in_order_after_each_write(vstore: ValidatorStore) -> None:
    db = DbThread()
    committer = GroupCommitter(lambda jobs: vstore.decide(jobs, NOW), db, write=vstore.write_many)
    answers = Answers()
    async with trio.open_nursery() as nursery:
        await nursery.start(committer.run)
        for i in range(20):
            await committer.enqueue(f"m{i % 3}", [prediction(f"p{i}", wager=1.0)], answers.for_(f"m{i % 3}:p{i}"))
        await answers.wait(20)
        nursery.cancel_scope.cancel()
    assert [who for who, _ in answers.got] == [f"m{i % 3}:p{i}" for i in range(20)]
    assert all(r is not None and r[0]["status"] == "success" for _, r in answers.got)
    assert len(stored(vstore)) == 20 and committer.committed == 20


async def test_a_failed_write_fails_the_group_decided_meanwhile_then_the_committer_goes_on(
    vstore: ValidatorStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first write waits until the second group is decided, then fails on
    the disk: both groups are answered None (nothing stored), and a third is stored."""
    real = store_mod._insert_rows
    failing = True

    def insert_rows(*args: Any) -> None:
        if failing:
            raise OSError("disk full")
        real(*args)

    monkeypatch.setattr(store_mod, "_insert_rows", insert_rows)
    decided_once, decided_twice = threading.Event(), threading.Event()
    decisions = 0

    def decide(jobs: Jobs) -> Any:
        nonlocal decisions
        batch = vstore.decide(jobs, NOW)
        decisions += 1
        decided_once.set()
        if decisions == 2:
            decided_twice.set()
        return batch

    writes = 0

    def write(batches: Sequence[Any]) -> list[list[list[PredictionResult]] | Exception]:
        nonlocal writes, failing
        writes += 1
        if writes == 1:
            assert decided_twice.wait(10)
            try:
                return vstore.write_many(batches)
            finally:
                failing = False
        return vstore.write_many(batches)

    committer = GroupCommitter(decide, DbThread(), write=write)
    answers = Answers()
    async with trio.open_nursery() as nursery:
        await nursery.start(committer.run)
        await committer.enqueue("m", [prediction("p1")], answers.for_("first"))
        # the first group is decided (and its write waiting) before the second comes
        assert await trio.to_thread.run_sync(decided_once.wait, 10)
        await committer.enqueue("m", [prediction("p2")], answers.for_("second"))
        await answers.wait(2)
        await committer.enqueue("m", [prediction("p3")], answers.for_("third"))
        await answers.wait(3)
        nursery.cancel_scope.cancel()
    assert answers.got[:2] == [("first", None), ("second", None)]
    third = answers.got[2][1]
    assert third is not None and answer(third[0]) == ("p3", "success", ACCEPTED)
    assert stored(vstore) == [("m", "p3")]


async def test_the_committer_threads_end_with_its_nursery(vstore: ValidatorStore) -> None:
    before = set(threading.enumerate())
    committer = GroupCommitter(lambda jobs: vstore.decide(jobs, NOW), DbThread(), write=vstore.write_many)
    answers = Answers()
    async with trio.open_nursery() as nursery:
        await nursery.start(committer.run)
        await committer.enqueue("m", [prediction("p1")], answers.for_("m"))
        await answers.wait(1)
        for i in range(50):  # queued, some perhaps unanswered when cancelled: dropped
            committer.enqueue_nowait("m", [prediction(f"q{i}")], answers.for_("m"))
        nursery.cancel_scope.cancel()
    loops = [t for t in set(threading.enumerate()) - before if t.is_alive() and "_loop" in t.name]
    assert loops == []
