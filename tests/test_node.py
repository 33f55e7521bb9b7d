"""The runnable node end to end: ValidatorNode and MinerNodes over real loopback sockets.

These are real-network tests (127.0.0.1, port 0, real time). Nothing here asserts
on timing: waits poll the databases until the expected state, under generous
``trio.fail_after`` limits, and then compare the two sides' databases.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import trio
from bittensor_wallet import Keypair

from bettensor_ws.node import MinerNode, ValidatorNode, favourite_strategy
from bettensor_ws.node.store import canonical
from tests.helpers import make_game

WAIT = 20.0  # seconds: a generous bound for anything that should take well under one


@pytest.fixture(scope="module")
def miner_keys() -> list[Keypair]:
    return [Keypair.create_from_uri(f"//Miner{i}") for i in range(4)]


def upcoming_games(count: int, *, prefix: str = "game", hours: float = 2.0) -> list[dict[str, Any]]:
    """Games starting ``hours`` from now, an hour apart; the favourite alternates between teams."""
    return [make_game(i, prefix=prefix, starts_in=timedelta(hours=hours + i)) for i in range(count)]


def favourite_of(game: dict[str, Any]) -> str:
    return str(game["team_a"] if game["team_a_odds"] < game["team_b_odds"] else game["team_b"])


def make_prediction(pid: str, game: dict[str, Any], wager: float = 1.0) -> dict[str, Any]:
    return {
        "prediction_id": pid,
        "game_id": game["game_id"],
        "miner_uid": "1",
        "prediction_date": datetime.now(UTC).isoformat(),
        "predicted_outcome": favourite_of(game),
        "predicted_odds": min(game["team_a_odds"], game["team_b_odds"]),
        "team_a": game["team_a"],
        "team_b": game["team_b"],
        "wager": wager,
        "team_a_odds": game["team_a_odds"],
        "team_b_odds": game["team_b_odds"],
        "tie_odds": game["tie_odds"],
        "model_name": None,
        "confidence_score": None,
        "outcome": "Unfinished",
        "payout": 0.0,
    }


def make_miner(keypair: Keypair, validator: ValidatorNode, port: int, path: Path, **kwargs: Any) -> MinerNode:
    return MinerNode(
        keypair,
        [(validator.hotkey, f"ws://127.0.0.1:{port}/ws")],
        path,
        reconnect_base_interval=0.05,
        max_reconnect_interval=0.2,
        **kwargs,
    )


async def eventually(check: Callable[[], Awaitable[bool]], limit: float = WAIT, what: str = "") -> None:
    """Poll ``check`` until it holds; fail after ``limit`` seconds.

    Polling, not an event: the state lives in several databases written from worker threads.
    """
    try:
        with trio.fail_after(limit):
            while not await check():  # noqa: ASYNC110
                await trio.sleep(0.02)
    except trio.TooSlowError:
        raise AssertionError(f"timed out waiting for {what or check}") from None


async def miner_counts(miner: MinerNode) -> dict[str, int]:
    return await miner.db.run(miner.store.counts)


def _rows(db: sqlite3.Connection, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    return [tuple(r) for r in db.execute(sql, args)]


async def miner_rows(miner: MinerNode, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    return await miner.db.run(_rows, miner.store.db, sql, *args)


async def validator_rows(validator: ValidatorNode, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    return await validator.db.run(_rows, validator.store.db, sql, *args)


async def all_settled(miners: Sequence[MinerNode], confirmed: int) -> bool:
    for miner in miners:
        counts = await miner_counts(miner)
        if counts != {"pending": 0, "confirmed": confirmed, "rejected": 0}:
            return False
    return True


async def assert_databases_agree(validator: ValidatorNode, miners: Sequence[MinerNode]) -> None:
    """The validator stored exactly the predictions the miners hold as confirmed, as sent."""
    stored = {
        pid: (miner, body)
        for pid, miner, body in await validator_rows(
            validator, "SELECT prediction_id, miner_hotkey, body FROM predictions"
        )
    }
    confirmed: dict[str, tuple[str, str]] = {}
    for miner in miners:
        assert (await miner_counts(miner))["pending"] == 0
        for pid, body in await miner_rows(
            miner,
            "SELECT p.prediction_id, p.body FROM predictions p JOIN deliveries d USING (prediction_id) "
            "WHERE d.state='confirmed' AND d.validator_hotkey=?",
            validator.hotkey,
        ):
            assert pid not in confirmed
            confirmed[pid] = (miner.hotkey, canonical(json.loads(body)))
    assert set(stored) == set(confirmed)
    assert stored == confirmed
    per_miner = {hotkey: count for hotkey, count, _ in await validator.db.run(validator.store.per_miner)}
    for miner in miners:
        counts = await miner_counts(miner)
        assert per_miner.get(miner.hotkey, 0) == counts["confirmed"]


def close_all(*nodes: ValidatorNode | MinerNode) -> None:
    for node in nodes:
        node.close()


# ---- a validator and 4 miners ---------------------------------------------------------------------


async def test_validator_and_four_miners_every_prediction_confirmed(
    alice: Keypair, miner_keys: list[Keypair], tmp_path: Path
) -> None:
    validator = ValidatorNode(alice, tmp_path / "validator.db")
    games = upcoming_games(6)
    miners: list[MinerNode] = []
    try:
        async with trio.open_nursery() as nursery:
            port = await nursery.start(validator.serve)
            for i, key in enumerate(miner_keys):
                miner = make_miner(key, validator, port, tmp_path / f"miner{i}.db")
                miners.append(miner)
                await nursery.start(miner.run)
            with trio.fail_after(WAIT):
                for miner in miners:
                    await miner.wait_connected(validator.hotkey)
            assert await validator.update_games(games) is not None
            await eventually(lambda: all_settled(miners, len(games)), what="every prediction confirmed")

            # once per game, on the favourite, with the built-in strategy's fixed wager
            for miner in miners:
                rows = await miner_rows(miner, "SELECT game_id, body FROM predictions")
                assert sorted(r[0] for r in rows) == sorted(g["game_id"] for g in games)
                by_game = {g["game_id"]: g for g in games}
                for game_id, body in rows:
                    data = json.loads(body)
                    assert data["predicted_outcome"] == favourite_of(by_game[game_id])
                    assert data["wager"] == 1.0
                assert len(miner.latencies) == len(games)
            await assert_databases_agree(validator, miners)
            assert sorted(await validator.db.run(validator.store.per_miner)) == sorted(
                (m.hotkey, len(games), float(len(games))) for m in miners
            )
            stats = validator.stats()
            assert stats["frames_in"]["prediction"] >= len(miners)
            assert not stats["rejections"]
            nursery.cancel_scope.cancel()
    finally:
        close_all(validator, *miners)


# ---- nothing lost: resend on reconnect ----------------------------------------------------------


async def test_reconnect_resends_pending_exactly_once(
    alice: Keypair, miner_keys: list[Keypair], tmp_path: Path
) -> None:
    """Confirmed before the outage, lost confirmations, and predictions made while the
    validator was down: after it restarts on the same port and database, each is
    confirmed and stored exactly once."""
    db_path = tmp_path / "validator.db"
    games = upcoming_games(4)
    first = ValidatorNode(alice, db_path)
    miner: MinerNode | None = None
    second: ValidatorNode | None = None
    try:
        async with trio.open_nursery() as nursery:
            async with trio.open_nursery() as serving:
                port = await serving.start(first.serve)
                miner = make_miner(miner_keys[0], first, port, tmp_path / "miner.db")
                await nursery.start(miner.run)
                with trio.fail_after(WAIT):
                    await miner.wait_connected(first.hotkey)
                await first.update_games(games)
                await eventually(lambda: all_settled([miner], len(games)), what="first predictions")
                serving.cancel_scope.cancel()
            first.close()
            await eventually(lambda: _false_when(miner.connected_validators), what="link down")

            # confirmations "lost": the validator committed, the miner never heard back
            await miner.db.run(miner.store.db.execute, "UPDATE deliveries SET state='pending', reason=NULL")
            # new predictions while the validator is away
            extra = [make_prediction(f"offline-{i}", games[i % len(games)]) for i in range(10)]
            assert await miner.submit_predictions(extra) == [p["prediction_id"] for p in extra]
            assert (await miner_counts(miner))["pending"] == len(games) + len(extra)

            second = ValidatorNode(alice, db_path, port=port)
            assert await nursery.start(second.serve) == port
            total = len(games) + len(extra)
            await eventually(lambda: all_settled([miner], total), what="resent predictions confirmed")
            assert await second.db.run(second.store.count_predictions) == total
            await assert_databases_agree(second, [miner])
            assert miner.stats()["reconnects"] >= 1
            nursery.cancel_scope.cancel()
    finally:
        close_all(*[n for n in (miner, second) if n is not None])
        if second is None:
            first.close()


async def _false_when(value: Any) -> bool:
    await trio.lowlevel.checkpoint()
    return not value


async def test_miner_started_before_validator_delivers_when_it_comes_up(
    alice: Keypair, miner_keys: list[Keypair], tmp_path: Path
) -> None:
    # find a free port, then let the miner dial it before anything listens there
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    for listener in listeners:
        await listener.aclose()
    validator = ValidatorNode(alice, tmp_path / "validator.db", port=port)
    games = upcoming_games(3)
    validator.store.upsert_games(games)
    miner = make_miner(miner_keys[1], validator, port, tmp_path / "miner.db")
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(miner.run)
            preds = [make_prediction(f"early-{i}", games[i % 3]) for i in range(5)]
            await miner.submit_predictions(preds)
            await eventually(lambda: _true_when(miner.last_error.get(validator.hotkey)), what="a failed dial")
            assert (await miner_counts(miner))["pending"] == 5
            assert await nursery.start(validator.serve) == port
            # the games sent after Welcome are all predicted on already: just the 5 go out
            await eventually(lambda: all_settled([miner], 5), what="delivery")
            assert await miner.db.run(miner.store.predicted_games) == {g["game_id"] for g in games}
            await assert_databases_agree(validator, [miner])
            nursery.cancel_scope.cancel()
    finally:
        close_all(*[n for n in (validator, miner) if n is not None])


async def _true_when(value: Any) -> bool:
    await trio.lowlevel.checkpoint()
    return bool(value)


# ---- once per game ------------------------------------------------------------------------------


async def test_miner_predicts_once_per_game(alice: Keypair, miner_keys: list[Keypair], tmp_path: Path) -> None:
    validator = ValidatorNode(alice, tmp_path / "validator.db")
    games = upcoming_games(3)
    miner: MinerNode | None = None
    try:
        async with trio.open_nursery() as nursery:
            port = await nursery.start(validator.serve)
            miner = make_miner(miner_keys[2], validator, port, tmp_path / "miner.db")
            triggered: list[tuple[list[str], list[str]]] = []
            calls = trio.Semaphore(0, max_value=100)
            original = miner.trigger_predictions_for_updated_games

            async def traced(changed: Sequence[dict[str, Any]], validator_hotkey: str | None = None) -> list[str]:
                result = await original(changed, validator_hotkey)
                triggered.append(([str(g["game_id"]) for g in changed], result))
                calls.release()
                return result

            miner.trigger_predictions_for_updated_games = traced  # type: ignore[method-assign,assignment]
            await nursery.start(miner.run)
            with trio.fail_after(WAIT):
                await miner.wait_connected(validator.hotkey)
            await validator.update_games(games)
            with trio.fail_after(WAIT):
                await calls.acquire()
            assert len(triggered[-1][1]) == len(games)
            await eventually(lambda: all_settled([miner], len(games)), what="first round")

            # the same games with moved odds: changed, so the strategy is asked, but nothing new
            moved = [{**g, "team_a_odds": g["team_a_odds"] + 0.1} for g in games]
            await validator.update_games(moved)
            with trio.fail_after(WAIT):
                await calls.acquire()
            assert triggered[-1] == (sorted(g["game_id"] for g in games), [])

            # a new game among known ones: exactly one new prediction
            newcomer = upcoming_games(1, prefix="new")[0]
            await validator.update_games([*moved, newcomer])
            with trio.fail_after(WAIT):
                await calls.acquire()
            assert triggered[-1][0] == [newcomer["game_id"]]
            assert len(triggered[-1][1]) == 1
            await eventually(lambda: all_settled([miner], len(games) + 1), what="the new game")

            # an identical update, and a reconnect (upcoming games resent after Welcome): nothing
            assert await validator.update_games([*moved, newcomer]) is None
            conn = validator.connection(miner.hotkey)
            assert conn is not None
            conn.close(1012, "test: cut the link")
            await eventually(lambda: _reconnected(validator, miner, conn), what="reconnect")
            # the resent games are unchanged, so the strategy is not even asked; a marker
            # update afterwards proves the resend was handled first (one handler at a time)
            marker = upcoming_games(1, prefix="marker")[0]
            await validator.update_games([marker])
            with trio.fail_after(WAIT):
                await calls.acquire()
            assert triggered[-1][0] == [marker["game_id"]]
            await eventually(lambda: all_settled([miner], len(games) + 2), what="the marker game")
            rows = await miner_rows(miner, "SELECT game_id, COUNT(*) FROM predictions GROUP BY game_id")
            assert all(count == 1 for _, count in rows)
            assert len(rows) == len(games) + 2
            await assert_databases_agree(validator, [miner])
            nursery.cancel_scope.cancel()
    finally:
        close_all(*[n for n in (validator, miner) if n is not None])


async def _reconnected(validator: ValidatorNode, miner: MinerNode, old: Any) -> bool:
    await trio.lowlevel.checkpoint()
    new = validator.connection(miner.hotkey)
    return new is not None and new is not old and validator.hotkey in miner.connected_validators


async def test_concurrent_updates_do_not_predict_a_game_twice(
    alice: Keypair, bob: Keypair, miner_keys: list[Keypair], tmp_path: Path
) -> None:
    """Two validators' updates of the same games handled at once: one prediction per game."""
    miner = MinerNode(
        miner_keys[3],
        [(alice.ss58_address, "ws://127.0.0.1:1/ws"), (bob.ss58_address, "ws://127.0.0.1:2/ws")],
        tmp_path / "miner.db",
    )
    games = upcoming_games(5)
    try:
        async with trio.open_nursery() as nursery:
            for _ in range(2):
                nursery.start_soon(miner.trigger_predictions_for_updated_games, games)
        rows = await miner_rows(miner, "SELECT game_id, COUNT(*) FROM predictions GROUP BY game_id")
        assert sorted(rows) == sorted((g["game_id"], 1) for g in games)
        # pending for both validators
        assert await miner_counts(miner) == {"pending": 2 * len(games), "confirmed": 0, "rejected": 0}
    finally:
        miner.close()


async def test_a_game_listed_twice_is_predicted_once(miner_keys: list[Keypair], tmp_path: Path) -> None:
    miner = MinerNode(miner_keys[3], [(miner_keys[0].ss58_address, "ws://127.0.0.1:1/ws")], tmp_path / "miner.db")
    games = upcoming_games(2)
    try:
        added = await miner.trigger_predictions_for_updated_games([games[0], games[1], games[0]])
        assert len(added) == 2
        assert await miner.trigger_predictions_for_updated_games(games) == []
        assert await miner.db.run(miner.store.predicted_games) == {g["game_id"] for g in games}
    finally:
        miner.close()


def test_favourite_strategy() -> None:
    games = upcoming_games(4)
    games.append({**upcoming_games(1, prefix="tie")[0], "team_a_odds": 4.0, "team_b_odds": 4.0, "tie_odds": 2.0, "can_tie": True})
    games.append({**upcoming_games(1, prefix="no-odds")[0], "team_a_odds": None, "team_b_odds": 0.0, "tie_odds": -1.0})
    predictions = favourite_strategy(wager=2.5, miner_uid="9", model_name="fav")(games)
    by_game = {p["game_id"]: p for p in predictions}
    assert set(by_game) == {g["game_id"] for g in games[:5]}  # no odds: no prediction
    for game in games[:4]:
        assert by_game[game["game_id"]]["predicted_outcome"] == favourite_of(game)
    assert by_game["tie-0"]["predicted_outcome"] == "Tie"
    assert all(p["wager"] == 2.5 and p["miner_uid"] == "9" and p["model_name"] == "fav" for p in predictions)
    assert len({p["prediction_id"] for p in predictions}) == len(predictions)


# ---- upcoming games right after Welcome --------------------------------------------------------------


async def test_late_miner_receives_upcoming_games_after_welcome(
    alice: Keypair, miner_keys: list[Keypair], tmp_path: Path
) -> None:
    validator = ValidatorNode(alice, tmp_path / "validator.db")
    games = upcoming_games(4)
    started = {**upcoming_games(1, prefix="started")[0], "event_start_date": (datetime.now(UTC) - timedelta(minutes=1)).isoformat()}
    inactive = {**upcoming_games(1, prefix="inactive")[0], "active": False}
    miner: MinerNode | None = None
    try:
        async with trio.open_nursery() as nursery:
            port = await nursery.start(validator.serve)
            assert await validator.update_games([*games, started, inactive]) == 0  # nobody connected yet
            miner = make_miner(miner_keys[0], validator, port, tmp_path / "miner.db")
            await nursery.start(miner.run)
            await eventually(lambda: all_settled([miner], len(games)), what="predictions on the sent games")
            stored = [g["game_id"] for g in await miner.db.run(miner.store.validator_games, validator.hotkey)]
            assert stored == sorted(g["game_id"] for g in games)
            assert validator.stats()["frames_out"]["game_update"] == 1
            await assert_databases_agree(validator, [miner])
            nursery.cancel_scope.cancel()
    finally:
        close_all(*[n for n in (validator, miner) if n is not None])


# ---- the outbox under the validator's rate limit --------------------------------------------------------


@pytest.mark.parametrize("batched", [False, True], ids=["single-messages", "batches"])
async def test_outbox_delivers_hundreds_pending(
    alice: Keypair, miner_keys: list[Keypair], tmp_path: Path, batched: bool
) -> None:
    count = 300
    features = ("batch",) if batched else ()
    validator = ValidatorNode(alice, tmp_path / "validator.db", features=features)
    games = upcoming_games(5)
    validator.store.upsert_games(games)
    miner: MinerNode | None = None
    try:
        async with trio.open_nursery() as nursery:
            port = await nursery.start(validator.serve)
            miner = make_miner(miner_keys[1], validator, port, tmp_path / "miner.db")
            # pending before the miner ever connects: all of it goes out on connect
            preds = [make_prediction(f"bulk-{i:03d}", games[i % len(games)]) for i in range(count)]
            await miner.submit_predictions(preds)
            await nursery.start(miner.run)
            await eventually(
                lambda: all_settled([miner], count), limit=30, what="the backlog"
            )
            stats = validator.stats()
            assert stats["rejections"].get("rate limited", 0) == 0, stats["rejections"]
            assert "flooding" not in stats["rejections"]
            assert await validator.db.run(validator.store.count_predictions) == count
            if batched:
                assert stats["frames_in"]["prediction"] < 30
            else:
                assert stats["frames_in"]["prediction"] >= count
            await assert_databases_agree(validator, [miner])
            nursery.cancel_scope.cancel()
    finally:
        close_all(*[n for n in (validator, miner) if n is not None])


async def test_rate_limited_predictions_stay_pending_and_go_again(
    alice: Keypair, miner_keys: list[Keypair], tmp_path: Path
) -> None:
    """A miner sending faster than a strict validator allows: slowed by backpressure, not
    refused; nothing lost."""
    count = 60
    validator = ValidatorNode(alice, tmp_path / "validator.db", features=(), rate_limit=30.0, rate_burst=20)
    games = upcoming_games(3)
    validator.store.upsert_games(games)
    miner: MinerNode | None = None
    try:
        async with trio.open_nursery() as nursery:
            port = await nursery.start(validator.serve)
            miner = make_miner(
                miner_keys[2], validator, port, tmp_path / "miner.db", send_rate=60.0, send_burst=30, retry_after=0.3
            )
            await miner.submit_predictions([make_prediction(f"fast-{i:03d}", games[i % 3]) for i in range(count)])
            await nursery.start(miner.run)
            await eventually(lambda: all_settled([miner], count), limit=30, what="the backlog")
            assert validator.stats()["rejections"].get("rate limited", 0) == 0
            assert await validator.db.run(validator.store.count_predictions) == count
            await assert_databases_agree(validator, [miner])
            nursery.cancel_scope.cancel()
    finally:
        close_all(*[n for n in (validator, miner) if n is not None])


@pytest.mark.parametrize("batched", [False, True], ids=["single-messages", "batches"])
async def test_a_malformed_prediction_is_settled_as_rejected_not_resent_forever(
    alice: Keypair, miner_keys: list[Keypair], tmp_path: Path, batched: bool
) -> None:
    """The validator refuses the frame naming its nonce (or, in a batch, the item);
    the miner records the reason. Our miner now drops such a prediction before it
    is stored; here it is already in the outbox, as an older version left it."""
    validator = ValidatorNode(alice, tmp_path / "validator.db", features=("batch",) if batched else ())
    games = upcoming_games(1)
    validator.store.upsert_games(games)
    miner: MinerNode | None = None
    try:
        async with trio.open_nursery() as nursery:
            port = await nursery.start(validator.serve)
            miner = make_miner(miner_keys[3], validator, port, tmp_path / "miner.db", retry_after=0.2)
            bad = {**make_prediction("bad-wager", games[0]), "wager": "1"}
            await miner.db.run(miner.store.add_predictions, [bad], [validator.hotkey])
            await nursery.start(miner.run)
            await eventually(
                lambda: _true_when(miner.store.delivery("bad-wager", validator.hotkey) == (
                    "rejected",
                    f"data{'.predictions[0]' if batched else ''}.wager: expected a number, got '1'",
                )),
                what="the refusal to be recorded",
            )
            assert await validator.db.run(validator.store.count_predictions) == 0
            nursery.cancel_scope.cancel()
    finally:
        close_all(*[n for n in (validator, miner) if n is not None])
