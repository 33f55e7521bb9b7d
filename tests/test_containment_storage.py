"""Issue 12, scenarios 7 and 8: an outage across midnight, and storage faults.

7. The day a wager counts on is the prediction's own date (``rules.prediction_day``),
   clamped to [receipt - 24 h, receipt + 5 min], at the validator and at the miner
   alike; "game unknown" is not final when that validator itself sent the game.
8. Storage faults that pass (a lock held past busy_timeout, a full disk) do not kill
   a node; the first cause is the one reported; a database that cannot be written is
   refused at start with one line and exit 2.

The store-level tests inject ``now``; the node tests run on real loopback. Real time is
only spent where a real lock must outlast SQLite's 5 s busy_timeout.
"""

from __future__ import annotations

import logging
import os
import resource
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import trio
from bittensor_wallet import Keypair

import bettensor_ws.node.store as store_module
from bettensor_ws.node import MinerNode, ValidatorNode
from bettensor_ws.node.dbthread import DbThread
from bettensor_ws.node.guardstore import GuardKeeper
from bettensor_ws.node.rules import DAILY_LIMIT, UNKNOWN_GAME, prediction_day, utc_day
from bettensor_ws.node.store import MinerStore, ValidatorStore
from bettensor_ws.protocol.messages import now_iso
from bettensor_ws.protocol.replay import ReplayGuard
from tests.helpers import make_game
from tests.test_cli import (
    ALICE,
    STARTUP,
    _env,
    _validator_args,
    assert_one_line_error,
    run_cli,
    start_validator,
)
from tests.test_node import (
    WAIT,
    all_settled,
    close_all,
    eventually,
    make_miner,
    make_prediction,
    upcoming_games,
)

MINER = Keypair.create_from_uri("//ContainmentMiner").ss58_address
D = datetime(2030, 6, 14, tzinfo=UTC)
"""Midnight starting day D, in UTC (a fixed day: the store tests inject ``now``)."""
DAY = {n: utc_day(D + timedelta(days=n)) for n in range(-5, 3)}
"""Day D+n as the stores write it (``DAY[0]`` is D)."""

BUSY_TIMEOUT = 5.0
LOCK_HOLD = 7.0
"""Seconds a test holds a database lock: longer than the stores' busy_timeout."""


@pytest.fixture(scope="module")
def miner_key() -> Keypair:
    return Keypair.create_from_uri("//ContainmentMiner")


def games_starting(at: datetime, count: int = 4, prefix: str = "mid") -> list[dict[str, Any]]:
    return [{**make_game(i, prefix=prefix), "event_start_date": at.isoformat()} for i in range(count)]


def dated(pid: str, game: dict[str, Any], moment: datetime, wager: float = 50.0) -> dict[str, Any]:
    """A prediction on ``game`` whose own ``prediction_date`` is ``moment``."""
    return {**make_prediction(pid, game, wager), "prediction_date": moment.isoformat()}


def stored_days(store: ValidatorStore) -> dict[str, str]:
    return {r[0]: r[1] for r in store.db.execute("SELECT prediction_id, day FROM predictions")}


def day_totals(store: ValidatorStore, miner: str = MINER) -> dict[str, float]:
    return {
        r[0]: float(r[1])
        for r in store.db.execute(
            "SELECT day, SUM(wager) FROM predictions WHERE miner_hotkey=? GROUP BY day", (miner,)
        )
    }


def recorded_refusals(store: ValidatorStore) -> int:
    return int(store.db.execute("SELECT COUNT(*) FROM rejections").fetchone()[0])


async def holds(predicate: Callable[[], Any]) -> bool:
    await trio.lowlevel.checkpoint()
    return bool(predicate())


# ================================================================ 7. an outage across midnight


def test_wagers_made_either_side_of_midnight_count_on_their_own_days(tmp_path: Path) -> None:
    """Scenario 7(a): 20 x 50 dated D 23:00 and 20 x 50 dated D+1 01:00, all received at
    D+1 02:00 (the validator was down across midnight): all 40 accepted, each stored on
    the day it was made; each day's budget is then spent, and still enforced."""
    store = ValidatorStore(tmp_path / "v.db")
    try:
        games = games_starting(D + timedelta(days=2))
        store.upsert_games(games)
        before = [dated(f"before-{i}", games[i % 4], D + timedelta(hours=23)) for i in range(20)]
        after = [dated(f"after-{i}", games[i % 4], D + timedelta(hours=25)) for i in range(20)]
        received = D + timedelta(hours=26)

        results = store.submit(MINER, before + after, now=received)

        assert [(r["status"], r["message"]) for r in results] == [("success", "Prediction accepted")] * 40
        days = stored_days(store)
        assert {days[p["prediction_id"]] for p in before} == {DAY[0]}
        assert {days[p["prediction_id"]] for p in after} == {DAY[1]}
        assert day_totals(store) == {DAY[0]: 1000.0, DAY[1]: 1000.0}
        assert recorded_refusals(store) == 0

        # the daily limit still holds, on each day
        late = received + timedelta(minutes=1)
        extra = [
            dated("before-extra", games[0], D + timedelta(hours=23, minutes=30)),
            dated("after-extra", games[1], D + timedelta(hours=25, minutes=30)),
        ]
        assert [r["message"] for r in store.submit(MINER, extra, now=late)] == [DAILY_LIMIT] * 2
        # another miner's budget is its own
        other = Keypair.create_from_uri("//Other").ss58_address
        assert store.submit(other, extra, now=late)[0]["status"] == "success"
    finally:
        store.close()


def test_back_dating_reaches_at_most_the_day_before(tmp_path: Path) -> None:
    """Scenario 7(b), back-dating: a prediction dated D-3 received on D (00:30) counts on
    D-1 (24 h before receipt); once D-1 is spent, dating further back (D-5) cannot reach an
    older day's budget: it is refused for the daily limit."""
    received = D + timedelta(minutes=30)
    assert prediction_day({"prediction_date": (D - timedelta(days=3)).isoformat()}, received) == DAY[-1]
    assert prediction_day({"prediction_date": (D - timedelta(days=300)).isoformat()}, received) == DAY[-1]
    # no date, an unreadable one, or not a string: the day of receipt
    for data in ({}, {"prediction_date": "yesterday"}, {"prediction_date": 1e9}, "not a dict"):
        assert prediction_day(data, received) == DAY[0], data

    store = ValidatorStore(tmp_path / "v.db")
    try:
        games = games_starting(D + timedelta(days=1))
        store.upsert_games(games)
        old = [dated(f"old-{i}", games[i % 4], D - timedelta(days=3)) for i in range(20)]
        assert {r["status"] for r in store.submit(MINER, old, now=received)} == {"success"}
        assert set(stored_days(store).values()) == {DAY[-1]}

        older = dated("older", games[0], D - timedelta(days=5))
        assert store.submit(MINER, [older], now=received) == [
            {"prediction_id": "older", "status": "error", "message": DAILY_LIMIT}
        ]
        today = dated("today", games[0], received)
        assert store.submit(MINER, [today], now=received)[0]["status"] == "success"
        assert day_totals(store) == {DAY[-1]: 1000.0, DAY[0]: 50.0}
    finally:
        store.close()


def test_future_dating_gains_at_most_five_minutes(tmp_path: Path) -> None:
    """Scenario 7(b), future-dating: dated 10 minutes ahead, a prediction counts on its
    receipt + at most 5 min. Received D 23:50 and dated D+1 00:00 it counts on D (so it
    cannot open tomorrow's budget early); received D 23:57 and dated D+1 00:07 it counts
    on D+1 (00:02 is within the 5 minutes)."""
    at_2350 = D + timedelta(hours=23, minutes=50)
    at_2357 = D + timedelta(hours=23, minutes=57)
    assert prediction_day({"prediction_date": (at_2350 + timedelta(minutes=10)).isoformat()}, at_2350) == DAY[0]
    assert prediction_day({"prediction_date": (at_2357 + timedelta(minutes=10)).isoformat()}, at_2357) == DAY[1]
    assert prediction_day({"prediction_date": (D + timedelta(days=30)).isoformat()}, at_2350) == DAY[0]

    store = ValidatorStore(tmp_path / "v.db")
    try:
        games = games_starting(D + timedelta(days=2))
        store.upsert_games(games)
        spent = [dated(f"spent-{i}", games[i % 4], at_2350 - timedelta(minutes=10)) for i in range(20)]
        assert {r["status"] for r in store.submit(MINER, spent, now=at_2350)} == {"success"}

        ahead = dated("ahead", games[0], at_2350 + timedelta(minutes=10))
        assert store.submit(MINER, [ahead], now=at_2350)[0]["message"] == DAILY_LIMIT

        near = dated("near", games[0], at_2357 + timedelta(minutes=10))
        assert store.submit(MINER, [near], now=at_2357)[0]["status"] == "success"
        assert stored_days(store)["near"] == DAY[1]
    finally:
        store.close()


def test_miner_counts_its_budget_on_the_same_days_as_the_validator(tmp_path: Path) -> None:
    """Scenario 7(c): MinerStore.wagered_today uses rules.prediction_day, so the miner's
    budget per day equals what the validator stored on that day, for predictions made on
    D, after midnight, back-dated and future-dated, all delivered at D+1 02:00."""
    games = games_starting(D + timedelta(days=2))
    validator_hotkey = ALICE
    made: list[tuple[dict[str, Any], datetime]] = []  # (prediction, when the miner stored it)
    for i in range(19):
        moment = D + timedelta(hours=23)
        made.append((dated(f"before-{i}", games[i % 4], moment), moment))
    for i in range(10):
        moment = D + timedelta(hours=25)
        made.append((dated(f"after-{i}", games[i % 4], moment), moment))
    delivered = D + timedelta(hours=26)
    # dated three days back, stored at delivery time: counts on D 02:00 on both sides
    made.append((dated("backdated", games[0], D - timedelta(days=3), wager=30.0), delivered))
    # dated 10 min ahead of its storing: counts on D+1 (02:05) on both sides
    made.append((dated("ahead", games[1], delivered + timedelta(minutes=10), wager=20.0), delivered))

    miner = MinerStore(tmp_path / "m.db")
    validator = ValidatorStore(tmp_path / "v.db")
    try:
        miner.add_predictions([p for p, _ in made], [validator_hotkey])
        for prediction, moment in made:  # when the miner made each one
            miner.db.execute(
                "UPDATE predictions SET created_at=? WHERE prediction_id=?",
                (moment.isoformat(), prediction["prediction_id"]),
            )
        validator.upsert_games(games)
        results = validator.submit(MINER, [p for p, _ in made], now=delivered)
        assert {r["status"] for r in results} == {"success"}
        stored = day_totals(validator)
        assert stored == {DAY[0]: 19 * 50.0 + 30.0, DAY[1]: 10 * 50.0 + 20.0}

        on_d = D + timedelta(hours=23, minutes=59)
        on_d1 = delivered + timedelta(minutes=30)
        assert miner.wagered_today(now=on_d) == stored[DAY[0]]
        assert miner.wagered_today(now=on_d1) == stored[DAY[1]]
        assert miner.wagered_today(validator_hotkey, now=on_d1) == stored[DAY[1]]
        assert miner.wagered_today(Keypair.create_from_uri("//Nobody").ss58_address, now=on_d1) == 0.0
    finally:
        miner.close()
        validator.close()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_outage_across_midnight_end_to_end(alice: Keypair, miner_key: Keypair, tmp_path: Path) -> None:
    """Scenario 7(d): the validator is down while the miner makes 20 x 50 predictions dated
    yesterday and 20 x 50 dated now; once it comes up, all 40 are delivered and confirmed,
    none refused for the daily limit, each stored on its own day; the miner's budget for
    today agrees (1000 spent)."""
    now = datetime.now(UTC)
    midnight = now.replace(hour=0, minute=0, second=0, microsecond=0)
    if midnight + timedelta(days=1) - now < timedelta(minutes=2):
        pytest.skip("too close to a real midnight: 'yesterday' would move during the test")
    # yesterday, and within 24 h of now whatever the time of day
    yesterday = min(now - timedelta(hours=20), midnight - timedelta(seconds=1))
    port = _free_port()
    validator = ValidatorNode(alice, tmp_path / "validator.db", port=port)
    games = upcoming_games(4, prefix="outage")
    validator.store.upsert_games(games)
    miner = make_miner(miner_key, validator, port, tmp_path / "miner.db")
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(miner.run)
            old = [dated(f"yesterday-{i}", games[i % 4], yesterday) for i in range(20)]
            new = [dated(f"today-{i}", games[i % 4], now) for i in range(20)]
            assert len(await miner.submit_predictions(old + new)) == 40
            await eventually(lambda: holds(lambda: miner.last_error.get(validator.hotkey)), what="a failed dial")
            assert await miner.db.run(miner.store.counts) == {"pending": 40, "confirmed": 0, "rejected": 0}

            assert await nursery.start(validator.serve) == port
            await eventually(lambda: all_settled([miner], 40), what="all 40 confirmed")

            days = await validator.db.run(stored_days, validator.store)
            assert {days[p["prediction_id"]] for p in old} == {utc_day(yesterday)}
            assert {days[p["prediction_id"]] for p in new} == {utc_day(now)}
            assert await validator.db.run(day_totals, validator.store, miner.hotkey) == {
                utc_day(yesterday): 1000.0,
                utc_day(now): 1000.0,
            }
            assert await validator.db.run(recorded_refusals, validator.store) == 0
            assert await miner.db.run(miner.store.wagered_today, validator.hotkey) == 1000.0
            nursery.cancel_scope.cancel()
    finally:
        close_all(validator, miner)


async def test_game_unknown_is_not_final_for_a_game_that_validator_sent(
    alice: Keypair, miner_key: Keypair, tmp_path: Path
) -> None:
    """Scenario 7(e): the validator restarts on a fresh database and no longer knows the
    games it sent; the miner's predictions on them, refused "game unknown", stay pending and
    go again; once the validator knows the games again they are accepted. A prediction on a
    game that validator never sent is recorded as rejected. The validator records neither."""
    games = upcoming_games(2, prefix="sent")
    stranger = upcoming_games(1, prefix="never-sent")[0]
    first = ValidatorNode(alice, tmp_path / "first.db")
    first.store.upsert_games(games)
    miner: MinerNode | None = None
    second: ValidatorNode | None = None
    try:
        async with trio.open_nursery() as nursery:
            async with trio.open_nursery() as serving:
                port = await serving.start(first.serve)
                miner = make_miner(miner_key, first, port, tmp_path / "miner.db", retry_after=0.3)
                await nursery.start(miner.run)
                # the games came with the Welcome: the strategy predicted on them
                await eventually(lambda: all_settled([miner], len(games)), what="predictions on the sent games")
                serving.cancel_scope.cancel()
            first.close()
            node = miner
            await eventually(lambda: holds(lambda: not node.connected_validators), what="link down")

            again = [make_prediction(f"again-{i}", games[i % 2]) for i in range(4)]
            foreign = make_prediction("foreign", stranger)
            await miner.submit_predictions([*again, foreign])

            answered: list[tuple[list[str], set[str]]] = []
            original = miner.store.games_sent_by

            def spy(validator_hotkey: str, prediction_ids: Any) -> set[str]:
                ids = list(prediction_ids)
                kept = original(validator_hotkey, ids)
                answered.append((ids, kept))
                return kept

            miner.store.games_sent_by = spy  # type: ignore[method-assign]
            # back on the same port, on a fresh database: it knows no game
            second = ValidatorNode(alice, tmp_path / "second.db", port=port)
            assert await nursery.start(second.serve) == port
            hotkey = second.hotkey
            again_ids = {p["prediction_id"] for p in again}

            def refused_twice() -> bool:
                times = [pid for ids, _ in answered for pid in ids if pid in again_ids]
                return all(times.count(pid) >= 2 for pid in again_ids)

            await eventually(lambda: holds(refused_twice), what="'game unknown' answered and resent")
            assert await miner.db.run(miner.store.delivery, "foreign", hotkey) == ("rejected", UNKNOWN_GAME)
            for pid in again_ids:
                assert await miner.db.run(miner.store.delivery, pid, hotkey) == ("pending", None)
            assert all(kept == set(ids) & again_ids for ids, kept in answered)
            assert await second.db.run(second.store.count_predictions) == 0

            await second.update_games(games)  # it learns its games again
            await eventually(
                lambda: _settled(node, hotkey, len(games) + len(again)),
                what="the resent predictions accepted",
            )
            assert await second.db.run(second.store.prediction_ids) == again_ids
            assert await second.db.run(recorded_refusals, second.store) == 0
            assert await miner.db.run(miner.store.counts) == {
                "pending": 0,
                "confirmed": len(games) + len(again),
                "rejected": 1,
            }
            nursery.cancel_scope.cancel()
    finally:
        close_all(*[n for n in (miner, second) if n is not None])
        if second is None:
            first.close()


async def _settled(miner: MinerNode, validator_hotkey: str, confirmed: int) -> bool:
    counts = await miner.db.run(miner.store.counts, validator_hotkey)
    return counts == {"pending": 0, "confirmed": confirmed, "rejected": 1}


# ================================================================ 8. storage faults


@contextmanager
def locked(path: Path) -> Iterator[sqlite3.Connection]:
    """Another connection holding an exclusive write lock on ``path`` until the block ends."""
    db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False, timeout=30)
    try:
        db.execute("BEGIN EXCLUSIVE")
        yield db
    finally:
        if db.in_transaction:
            db.execute("COMMIT")
        db.close()


@contextmanager
def disk_full_at(limit: int) -> Iterator[None]:
    """No file of this process may grow past ``limit`` bytes (writes past it fail with
    EFBIG, SIGXFSZ ignored), until the block ends: a disk that is full, then freed."""
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


def wal_size(store: ValidatorStore | MinerStore) -> int:
    """The size of a store's write-ahead log: a limit there makes its next commit fail."""
    return os.path.getsize(store.path + "-wal")


def read_only_connect(path: str | Path) -> sqlite3.Connection:
    """``store.connect`` for a database this process cannot write (we run as root, so
    file modes do not stop us: the URI's mode=ro does)."""
    db = sqlite3.connect(
        f"{Path(path).resolve().as_uri()}?mode=ro", uri=True, check_same_thread=False, isolation_level=None
    )
    db.row_factory = sqlite3.Row
    db.execute("PRAGMA busy_timeout=5000")
    return db


FULL_DISK_MAIN = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), resource.RLIM_INFINITY))
from bettensor_ws.node.cli import main
sys.exit(main(sys.argv[2:]))
"""
"""``bettensor-ws ARGS`` on a disk where no file may grow past argv[1] bytes."""

READ_ONLY_MAIN = """
import sqlite3, sys
from pathlib import Path
import bettensor_ws.node.store as store

def connect(path):
    db = sqlite3.connect(f"{Path(path).resolve().as_uri()}?mode=ro", uri=True,
                         check_same_thread=False, isolation_level=None)
    db.row_factory = sqlite3.Row
    db.execute("PRAGMA busy_timeout=5000")
    return db

store.connect = connect
from bettensor_ws.node.cli import main
sys.exit(main(sys.argv[1:]))
"""
"""``bettensor-ws ARGS`` with every database opened read-only."""


def run_python(code: str, *args: str, timeout: float = 20.0) -> subprocess.CompletedProcess[str]:
    env = _env()
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        stdin=subprocess.DEVNULL,
    )


def _feed_odds(db: Path) -> list[tuple[Any, ...]]:
    ro = sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True, timeout=10)
    try:
        return sorted(tuple(r) for r in ro.execute("SELECT game_id, team_a_odds, team_b_odds FROM games"))
    finally:
        ro.close()


async def _miner_gets_confirmed(key: Keypair, url: str, db: Path, games: int) -> dict[str, Any]:
    miner = MinerNode(key, [(ALICE, url)], db, reconnect_base_interval=0.05, max_reconnect_interval=0.2)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(miner.run)
            await eventually(lambda: all_settled([miner], games), what="the feed's games predicted and confirmed")
            nursery.cancel_scope.cancel()
        return miner.stats()
    finally:
        miner.close()


def test_cli_validator_keeps_serving_through_a_locked_database(tmp_path: Path, miner_key: Keypair) -> None:
    """Scenario 8(a): the CLI validator with its simulated feed while another connection
    holds an exclusive lock on its database for 7 s (past busy_timeout): it keeps running
    and logs a WARNING naming the feed; once the lock is gone the feed moves again, a miner
    is served, and SIGTERM exits 0 without a traceback."""
    db = tmp_path / "v.db"
    proc, url = start_validator(
        tmp_path, "--port", "0", "--hotkey-uri", "//Alice", "--db", str(db),
        "--feed-games", "3", "--feed-interval", "0.5",
    )
    try:
        assert proc.expect_prefix("validator hotkey ") == ALICE
        with locked(db):
            taken = time.monotonic()
            deadline = taken + LOCK_HOLD + STARTUP
            while "storing the feed's games failed" not in proc.stderr():
                assert proc.proc.poll() is None, proc.stderr()
                assert time.monotonic() < deadline, f"no WARNING about the feed: {proc.stderr()!r}"
                time.sleep(0.1)
            odds_during = _feed_odds(db)  # readers are not blocked (WAL)
            time.sleep(max(0.0, taken + LOCK_HOLD - time.monotonic()))
            assert proc.proc.poll() is None, proc.stderr()
        warning = next(ln for ln in proc.stderr().splitlines() if "storing the feed's games failed" in ln)
        assert "WARNING" in warning and "database is locked" in warning, warning

        deadline = time.monotonic() + WAIT
        while _feed_odds(db) == odds_during:
            assert time.monotonic() < deadline, "the feed never resumed after the lock"
            time.sleep(0.1)
        stats = trio.run(_miner_gets_confirmed, miner_key, url, tmp_path / "m.db", 3)
        assert stats["reconnects"] == 0
        assert proc.signal(signal.SIGTERM) == 0, proc.stderr()
        assert "Traceback" not in proc.stderr()
    finally:
        proc.close()


# ---- start-up on a database that cannot be written: one line, exit 2


def _fresh_validator_db(tmp: Path) -> Path:
    path = tmp / "v.db"
    ValidatorStore(path).close()
    return path


def _fresh_miner_db(tmp: Path) -> Path:
    path = tmp / "m.db"
    MinerStore(path).close()
    return path


def _miner_args(db: Path) -> list[str]:
    return ["miner", "--validator", f"ws://127.0.0.1:9/ws@{ALICE}", "--hotkey-uri", "//Bob", "--db", str(db)]


def _locked_start(args: Callable[[Path], list[str]], make_db: Callable[[Path], Path]) -> Any:
    def run(tmp: Path) -> subprocess.CompletedProcess[str]:
        db = make_db(tmp)
        with locked(db):
            return run_cli(*args(db), timeout=20.0)

    return run


def _immutable_start(tmp: Path) -> subprocess.CompletedProcess[str] | None:
    """On a file marked immutable (chattr +i: even root cannot write it), where supported."""
    db = _fresh_validator_db(tmp)
    try:
        marked = subprocess.run(["chattr", "+i", str(db)], capture_output=True).returncode == 0
    except OSError:
        marked = False
    if not marked:
        return None
    try:
        return run_cli(*_validator_args(tmp), timeout=20.0)
    finally:
        subprocess.run(["chattr", "-i", str(db)], capture_output=True)


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path


def _full_disk_first_update(tmp: Path) -> subprocess.CompletedProcess[str]:
    """The store opens (its one-page write fits), the first feed update of 200 games does not."""
    _fresh_validator_db(tmp)
    return run_python(FULL_DISK_MAIN, "40000", *_validator_args(tmp, "--feed-games", "200"))


START_FAULTS: dict[str, tuple[Callable[[Path], subprocess.CompletedProcess[str] | None], tuple[str, ...]]] = {
    "validator, locked": (
        _locked_start(lambda db: _validator_args(db.parent), _fresh_validator_db),
        ("cannot open database", "v.db", "database is locked"),
    ),
    "miner, locked": (
        _locked_start(_miner_args, _fresh_miner_db),
        ("cannot open database", "m.db", "database is locked"),
    ),
    "validator, read-only": (
        lambda tmp: (_fresh_validator_db(tmp), run_python(READ_ONLY_MAIN, *_validator_args(tmp)))[1],
        ("cannot open database", "v.db", "readonly"),
    ),
    "miner, read-only": (
        lambda tmp: run_python(READ_ONLY_MAIN, *_miner_args(_fresh_miner_db(tmp))),
        ("cannot open database", "m.db", "readonly"),
    ),
    "validator, immutable file": (_immutable_start, ("cannot open database", "v.db", "readonly")),
    "validator, directory missing": (
        lambda tmp: run_cli(*_validator_args(tmp / "nosuch"), timeout=20.0),
        ("cannot open database", "nosuch", "unable to open database file"),
    ),
    "validator, db is a directory": (
        lambda tmp: run_cli(*_validator_args(_mkdir(tmp / "v.db").parent), timeout=20.0),
        ("cannot open database", "v.db", "unable to open database file"),
    ),
    "validator, full disk": (
        lambda tmp: run_python(FULL_DISK_MAIN, "0", *_validator_args(tmp)),
        ("cannot open database", "v.db"),
    ),
    "miner, full disk": (
        lambda tmp: run_python(FULL_DISK_MAIN, "0", *_miner_args(tmp / "m.db")),
        ("cannot open database", "m.db"),
    ),
    "validator, full disk at the first update": (
        _full_disk_first_update,
        ("cannot write database", "v.db"),
    ),
}


@pytest.fixture(scope="module")
def start_fault_results(
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, subprocess.CompletedProcess[str] | None]:
    """Every START_FAULTS case, run concurrently (the locked ones wait out busy_timeout)."""
    dirs = [tmp_path_factory.mktemp(f"start{i}") for i in range(len(START_FAULTS))]

    def outcome(
        case: tuple[Callable[[Path], subprocess.CompletedProcess[str] | None], tuple[str, ...]], tmp: Path
    ) -> subprocess.CompletedProcess[str] | None:
        try:
            return case[0](tmp)
        except subprocess.TimeoutExpired as exc:  # it started and kept running
            return subprocess.CompletedProcess(
                exc.cmd, -1, _text(exc.stdout), _text(exc.stderr) + f"(still running after {exc.timeout:g} s)"
            )

    with ThreadPoolExecutor(max_workers=len(START_FAULTS)) as pool:
        runs = pool.map(outcome, START_FAULTS.values(), dirs)
        return dict(zip(START_FAULTS, runs, strict=True))


def _text(output: str | bytes | None) -> str:
    return output.decode("utf-8", "replace") if isinstance(output, bytes) else output or ""


@pytest.mark.parametrize("case", list(START_FAULTS))
def test_start_on_a_database_that_cannot_be_written(
    start_fault_results: dict[str, subprocess.CompletedProcess[str] | None], case: str
) -> None:
    """Scenario 8(b): starting on a locked, read-only or full database (or a path that
    cannot be one): one line on stderr starting "bettensor-ws:", exit 2, no traceback."""
    result = start_fault_results[case]
    if result is None:
        pytest.skip("chattr +i is not available here")
    line = assert_one_line_error(result, *START_FAULTS[case][1])
    assert line.startswith("bettensor-ws: "), line
    assert "cannot rollback" not in line
    if "full disk" in case:
        assert "disk I/O error" in line or "database or disk is full" in line, line
    assert "listening" not in result.stdout


@pytest.mark.parametrize("store_class", [ValidatorStore, MinerStore])
def test_a_read_only_database_is_refused_at_open(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, store_class: type[ValidatorStore] | type[MinerStore]
) -> None:
    """Scenario 8(b), in process: a store opened on a database it cannot write raises
    OperationalError ("readonly") at open, not at its first prediction."""
    path = tmp_path / "store.db"
    store_class(path).close()
    monkeypatch.setattr(store_module, "connect", read_only_connect)
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        store_class(path)


def _write_ops(tmp: Path) -> dict[str, tuple[Any, Callable[[], Any], Callable[[Any], None]]]:
    """name -> (store, a write that grows the database, a check that it took effect)."""
    games = upcoming_games(3, prefix="disk")
    validator = ValidatorStore(tmp / "v.db")
    validator.upsert_games(games)
    miner = MinerStore(tmp / "m.db")
    predictions = [make_prediction(f"disk-{i}", games[i % 3]) for i in range(30)]
    more_games = upcoming_games(200, prefix="more")
    return {
        "ValidatorStore.submit": (
            validator,
            lambda: validator.submit(MINER, predictions),
            lambda result: None if {r["status"] for r in result} == {"success"} else pytest.fail(str(result)),
        ),
        "ValidatorStore.upsert_games": (
            validator,
            lambda: validator.upsert_games(more_games),
            lambda result: None if len(result) == 200 else pytest.fail(str(result)),
        ),
        "MinerStore.add_predictions": (
            miner,
            lambda: miner.add_predictions(predictions, [ALICE]),
            lambda result: None if len(result) == 30 else pytest.fail(str(result)),
        ),
    }


@pytest.mark.parametrize("operation", ["ValidatorStore.submit", "ValidatorStore.upsert_games", "MinerStore.add_predictions"])
def test_a_full_disk_reports_the_first_cause_and_heals(tmp_path: Path, operation: str) -> None:
    """Scenario 8(c): a full disk during a write raises OperationalError naming the real
    cause ("disk I/O error" / "database or disk is full"), never "cannot rollback - no
    transaction is active"; nothing of it is stored; once space returns the same write works."""
    ops = _write_ops(tmp_path)
    try:
        store, write, check = ops[operation]
        with disk_full_at(wal_size(store)), pytest.raises(sqlite3.OperationalError) as caught:
            write()
        message = str(caught.value)
        assert "cannot rollback" not in message
        assert message in ("disk I/O error", "database or disk is full"), message
        assert not store.db.in_transaction
        assert store.db.execute("SELECT COUNT(*) FROM predictions").fetchone()[0] == 0
        check(write())  # space is back
    finally:
        for store, _, _ in {id(op[0]): op for op in ops.values()}.values():
            store.close()


def predicted_on_disk(path: Path) -> set[str]:
    """The game ids a miner's database holds predictions on, read by a connection of our own."""
    ro = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=10)
    try:
        return {r[0] for r in ro.execute("SELECT game_id FROM predictions")}
    finally:
        ro.close()


async def test_miner_predicts_on_a_game_update_that_arrived_while_its_database_was_locked(
    alice: Keypair, miner_key: Keypair, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Scenario 8(d): a game update arrives while the miner's database is locked by another
    connection (7 s, past busy_timeout): a WARNING, the update is kept; once the lock is
    released the games are predicted and confirmed with no new update from the validator,
    over the same link (no reconnect)."""
    caplog.set_level(logging.INFO, logger="bettensor_ws.node")
    validator = ValidatorNode(alice, tmp_path / "validator.db")
    games = upcoming_games(3, prefix="locked")
    miner_db = tmp_path / "miner.db"
    miner: MinerNode | None = None
    try:
        async with trio.open_nursery() as nursery:
            port = await nursery.start(validator.serve)
            miner = make_miner(miner_key, validator, port, miner_db, retry_after=0.5)
            node = miner
            await nursery.start(miner.run)
            with trio.fail_after(WAIT):
                await miner.wait_connected(validator.hotkey)
            link = validator.connection(miner.hotkey)
            assert link is not None

            held = threading.Event()
            release = threading.Event()

            def hold_lock() -> None:
                with locked(miner_db):
                    held.set()
                    release.wait(LOCK_HOLD + WAIT)

            locker = threading.Thread(target=hold_lock, daemon=True)
            locker.start()
            try:
                await trio.to_thread.run_sync(held.wait)
                taken = trio.current_time()
                assert await validator.update_games(games) == 1

                def warned() -> bool:
                    return any(
                        r.levelno == logging.WARNING and "storing 3 games from validator" in r.getMessage()
                        for r in caplog.records
                    )

                await eventually(lambda: holds(warned), limit=BUSY_TIMEOUT + WAIT, what="a WARNING")
                assert miner.stats()["frames_in"].get("game_update") == 1
                # read beside the miner (its one DB thread waits on the lock): nothing predicted yet
                assert predicted_on_disk(miner_db) == set()
                await trio.sleep(max(0.0, taken + LOCK_HOLD - trio.current_time()))  # the lock outlasts a retry
                assert predicted_on_disk(miner_db) == set()
            finally:
                release.set()
                await trio.to_thread.run_sync(locker.join)

            await eventually(lambda: all_settled([node], len(games)), what="predictions after the lock")
            assert await miner.db.run(miner.store.predicted_games) == {g["game_id"] for g in games}
            assert miner.stats()["frames_in"].get("game_update") == 1  # no new update was needed
            assert validator.connection(miner.hotkey) is link
            assert miner.stats()["reconnects"] == 0
            assert any("after a storage fault" in r.getMessage() for r in caplog.records)
            nursery.cancel_scope.cancel()
    finally:
        close_all(*[n for n in (validator, miner) if n is not None])


def test_replay_guard_entries_from_a_storage_fault_are_saved_once_it_passes(tmp_path: Path) -> None:
    """Scenario 8, the replay guard: entries recorded while the disk is full (an auth nonce
    the validator means to have on disk before its Welcome, validator.py "the nonce is on
    disk ... before the Welcome leaves") are saved once space returns, so a restart cannot
    make those frames usable again. Today the failed save is logged and its rows are gone."""
    store = ValidatorStore(tmp_path / "v.db")
    try:
        guard = ReplayGuard(300.0)
        guard.journal()
        keeper = GuardKeeper(guard, store, DbThread())
        assert guard.check(MINER, "auth-nonce-during-the-fault", now_iso(), scope="auth") is None
        with disk_full_at(wal_size(store)):
            trio.run(keeper.save)  # fails (logged); the node goes on
        assert keeper.saved == 0
        trio.run(keeper.save)  # space is back
        assert len(store.load_nonces(time.time())) == 1
    finally:
        store.close()
