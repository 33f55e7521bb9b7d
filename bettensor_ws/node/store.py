"""SQLite stores for validators and miners (WAL, synchronous=FULL, versioned schema).

The classes here are synchronous and single-threaded by design; the Trio side
drives each through one worker thread (:class:`DbThread`), so the event loop
never blocks on a disk sync and the rules see one consistent order.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import sqlite3
from collections import OrderedDict, deque
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson

from ..protocol.payloads import TeamGame, converter
from ..protocol.refusals import bounded
from .rules import (
    HEALABLE,
    check_prediction,
    game_start,
    prediction_day,
    prediction_days,
    prediction_id_of,
    utc_day,
)

__all__ = [
    "KNOWN_GAME_CACHE_SIZE",
    "UNKNOWN_GAME_CACHE_SIZE",
    "MinerStore",
    "WrongDatabase",
    "database_kind",
    "PredictionResult",
    "StaleBatch",
    "ValidatorStore",
    "canonical",
]

log = logging.getLogger("bettensor_ws.store")

UNKNOWN_GAME_CACHE_SIZE = 4_096
"""Most game ids a :class:`ValidatorStore` remembers as unknown, least recently used
forgotten first. Any miner can name any game id, so this cache must not grow with
what miners send; a forgotten id costs one query the next time it is named."""

KNOWN_GAME_CACHE_SIZE = 4_096
"""Most stored games a :class:`ValidatorStore` keeps in memory (LRU). Apart from the
unknown ids, so that a flood of made-up ids cannot push the real games out."""


GAME_COLUMNS = (
    "game_id",
    "team_a",
    "team_b",
    "sport",
    "league",
    "create_date",
    "last_update_date",
    "event_start_date",
    "active",
    "outcome",
    "team_a_odds",
    "team_b_odds",
    "tie_odds",
    "can_tie",
)
_GAMES_TABLE = """
CREATE TABLE IF NOT EXISTS games (
    game_id TEXT PRIMARY KEY, team_a TEXT NOT NULL, team_b TEXT NOT NULL,
    sport TEXT, league TEXT, create_date TEXT, last_update_date TEXT,
    event_start_date TEXT NOT NULL, active INTEGER, outcome TEXT,
    team_a_odds REAL, team_b_odds REAL, tie_odds REAL, can_tie INTEGER
)"""


REFUSAL_EXCERPT = 200
"""Characters of a refused prediction's body kept (with a hash of the whole, for resends)."""

REFUSAL_RETENTION = timedelta(days=3)
"""How long a refusal is remembered: a resend within it gets the same answer."""

WAL_CHECKPOINT_PAGES = 8000
"""WAL pages (4 KiB) after which a validator's commit copies the log into the database
(SQLite's default: 1,000). Under load every group commit rewrites the same index pages;
a longer log copies each of them once per checkpoint instead of once per few commits:
batched predictions/s +10-14%. The log file may grow to about 32 MiB."""

MAX_RECORDED_REFUSALS = 1000
"""Refusals recorded per miner per day; past it a refusal is answered, not kept,
and a resend is judged again. Bounds what a miner can write to the validator's disk."""


def _digest(body: str) -> str:
    return hashlib.sha256(body.encode("utf-8")).hexdigest()


def canonical(data: dict[str, Any]) -> str:
    """Key-sorted JSON: equal content gives equal text, for idempotency checks."""
    return orjson.dumps(data, option=orjson.OPT_SORT_KEYS).decode("utf-8")


def _now() -> datetime:
    return datetime.now(UTC)


def _stamp(moment: datetime) -> str:
    """A UTC moment as text that sorts as time does (fixed width, microseconds always)."""
    return moment.astimezone(UTC).isoformat(timespec="microseconds")


def connect(path: str | Path) -> sqlite3.Connection:
    """Open with the durability settings every store uses."""
    db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
    db.row_factory = sqlite3.Row
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("PRAGMA foreign_keys=ON")
    db.execute("PRAGMA busy_timeout=5000")
    return db


@contextmanager
def transaction(db: sqlite3.Connection) -> Iterator[None]:
    """One write transaction, committed, or rolled back if anything in it fails.

    The error raised is the first cause: a failed rollback (after a full disk
    or an I/O error SQLite may have ended the transaction itself) is not
    allowed to replace it with "cannot rollback - no transaction is active".
    """
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            try:
                db.execute("ROLLBACK")
            except sqlite3.Error as exc:
                log.warning("rollback failed after an earlier error: %s", exc)
        raise


def check_writable(db: sqlite3.Connection) -> None:
    """Write once at start, so a read-only, full or locked database is refused then,
    not found out at the first prediction."""
    with transaction(db):
        version = int(db.execute("PRAGMA user_version").fetchone()[0])
        db.execute(f"PRAGMA user_version={version}")


def migrate(db: sqlite3.Connection, migrations: Sequence[Sequence[str]]) -> int:
    """Bring the schema to ``len(migrations)`` using ``PRAGMA user_version``."""
    version = int(db.execute("PRAGMA user_version").fetchone()[0])
    if version > len(migrations):
        raise RuntimeError(
            f"database schema version {version} is newer than this program ({len(migrations)})"
        )
    for number in range(version, len(migrations)):
        with transaction(db):
            for statement in migrations[number]:
                db.execute(statement)
            db.execute(f"PRAGMA user_version={number + 1}")
    return len(migrations)


class WrongDatabase(RuntimeError):
    """A validator's database given to a miner's store, or the other way round."""


def database_kind(db: sqlite3.Connection) -> str | None:
    """``"validator"`` or ``"miner"`` by the tables in ``db``; None if neither (new)."""
    tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    if "deliveries" in tables:
        return "miner"
    if "predictions" in tables:
        columns = {r[1] for r in db.execute("PRAGMA table_info(predictions)")}
        if "miner_hotkey" in columns:
            return "validator"
    return None


def _game_row(game: TeamGame | dict[str, Any]) -> tuple[Any, ...]:
    raw = converter.unstructure(game) if isinstance(game, TeamGame) else game
    values = []
    for column in GAME_COLUMNS:
        value = raw.get(column)
        if column == "game_id":
            value = str(value)
        elif column in ("active", "can_tie"):
            value = int(bool(value))
        values.append(value)
    return tuple(values)


def _game_dict(row: sqlite3.Row) -> dict[str, Any]:
    game = {column: row[column] for column in GAME_COLUMNS}
    game["active"] = bool(game["active"])
    game["can_tie"] = bool(game["can_tie"])
    return game


_SEEN_NONCES_TABLE = """
CREATE TABLE IF NOT EXISTS seen_nonces (
    sender TEXT NOT NULL, second INTEGER NOT NULL, digest INTEGER NOT NULL, expires REAL NOT NULL,
    PRIMARY KEY (sender, digest)) WITHOUT ROWID"""
_SEEN_NONCES_INDEX = "CREATE INDEX IF NOT EXISTS seen_nonces_expires ON seen_nonces (expires)"


class _Store:
    migrations: Sequence[Sequence[str]] = ()
    kind = ""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self.db = connect(path)
        found = database_kind(self.db)
        if found is not None and found != self.kind:
            self.db.close()
            raise WrongDatabase(f"{path} is a {found} database, not a {self.kind} database")
        self.version = migrate(self.db, self.migrations)
        check_writable(self.db)

    def close(self) -> None:
        self.db.close()

    def writable(self) -> bool:
        """Whether a write transaction commits now (for health checks)."""
        try:
            check_writable(self.db)
        except sqlite3.Error:
            return False
        return True

    def upsert_games(self, games: Iterable[TeamGame | dict[str, Any]]) -> list[str]:
        """Store games; returns the ids that are new or changed."""
        changed = []
        with transaction(self.db):
            for game in games:
                row = _game_row(game)
                old = self.db.execute("SELECT * FROM games WHERE game_id=?", (row[0],)).fetchone()
                if old is not None and tuple(_game_row(_game_dict(old))) == row:
                    continue
                self.db.execute(
                    f"INSERT OR REPLACE INTO games ({', '.join(GAME_COLUMNS)}) "
                    f"VALUES ({', '.join('?' * len(GAME_COLUMNS))})",
                    row,
                )
                changed.append(str(row[0]))
        return changed

    def save_nonces(self, rows: Sequence[tuple[str, int, int]], window: float, now: float) -> None:
        """Keep the replay guard's new entries (sender, second, digest), and forget
        the ones whose timestamps left the window, in one transaction."""
        with transaction(self.db):
            self.db.executemany(
                "INSERT OR REPLACE INTO seen_nonces (sender, second, digest, expires) VALUES (?, ?, ?, ?)",
                [(sender, second, digest, second + 1 + window) for sender, second, digest in rows],
            )
            self.db.execute("DELETE FROM seen_nonces WHERE expires <= ?", (now - window,))

    def load_nonces(self, now: float) -> list[tuple[str, int, int]]:
        """The stored guard entries that may still matter at ``now`` (the guard
        drops those whose timestamps left its window)."""
        return [
            (r[0], int(r[1]), int(r[2]))
            for r in self.db.execute(
                "SELECT sender, second, digest FROM seen_nonces WHERE expires > ?", (now,)
            )
        ]

    def game(self, game_id: str) -> dict[str, Any] | None:
        row = self.db.execute("SELECT * FROM games WHERE game_id=?", (str(game_id),)).fetchone()
        return _game_dict(row) if row is not None else None

    def games(self) -> list[dict[str, Any]]:
        return [_game_dict(r) for r in self.db.execute("SELECT * FROM games ORDER BY game_id")]

    def upcoming_games(self, now: datetime | None = None) -> list[dict[str, Any]]:
        """Active games that have not started: what a (re)connecting miner must see."""
        moment = (now or _now()).timestamp()
        result = []
        for game in self.games():
            try:
                starts = datetime.fromisoformat(game["event_start_date"])
            except (TypeError, ValueError):
                continue
            if starts.tzinfo is None:
                starts = starts.replace(tzinfo=UTC)
            if game["active"] and starts.timestamp() > moment:
                result.append(game)
        return result


class PredictionResult(dict[str, Any]):
    """``{"prediction_id", "status", "message"}`` as a batch confirmation lists it."""


class ValidatorStore(_Store):
    """Games and the predictions a validator accepted, with the answer sent for each."""

    kind = "validator"

    migrations = (
        (
            _GAMES_TABLE,
            """CREATE TABLE IF NOT EXISTS predictions (
                prediction_id TEXT PRIMARY KEY, miner_hotkey TEXT NOT NULL,
                game_id TEXT NOT NULL, wager REAL NOT NULL, predicted_outcome TEXT NOT NULL,
                body TEXT NOT NULL, received_at TEXT NOT NULL)""",
        ),
        (
            "ALTER TABLE predictions ADD COLUMN day TEXT",
            "UPDATE predictions SET day = substr(received_at, 1, 10)",
            "ALTER TABLE predictions ADD COLUMN status TEXT NOT NULL DEFAULT 'success'",
            "ALTER TABLE predictions ADD COLUMN message TEXT NOT NULL DEFAULT 'Prediction accepted'",
            "CREATE INDEX IF NOT EXISTS predictions_miner_day ON predictions (miner_hotkey, day)",
        ),
        (
            # The refusal sent for each refused prediction, so that a resend gets
            # the same answer even when the rules would now say something else.
            """CREATE TABLE IF NOT EXISTS rejections (
                prediction_id TEXT PRIMARY KEY, miner_hotkey TEXT NOT NULL,
                body TEXT NOT NULL, message TEXT NOT NULL, received_at TEXT NOT NULL)""",
        ),
        (
            # A prediction id is the miner's own: keyed by (miner, id), so another
            # miner sending the same ids first takes nothing from their owner.
            """CREATE TABLE predictions_by_miner (
                prediction_id TEXT NOT NULL, miner_hotkey TEXT NOT NULL,
                game_id TEXT NOT NULL, wager REAL NOT NULL, predicted_outcome TEXT NOT NULL,
                body TEXT NOT NULL, received_at TEXT NOT NULL, day TEXT,
                status TEXT NOT NULL DEFAULT 'success',
                message TEXT NOT NULL DEFAULT 'Prediction accepted',
                PRIMARY KEY (miner_hotkey, prediction_id))""",
            """INSERT INTO predictions_by_miner (prediction_id, miner_hotkey, game_id, wager,
                predicted_outcome, body, received_at, day, status, message)
                SELECT prediction_id, miner_hotkey, game_id, wager, predicted_outcome, body,
                received_at, day, status, message FROM predictions""",
            "DROP TABLE predictions",
            "ALTER TABLE predictions_by_miner RENAME TO predictions",
            "CREATE INDEX predictions_miner_day ON predictions (miner_hotkey, day)",
            """CREATE TABLE rejections_by_miner (
                prediction_id TEXT NOT NULL, miner_hotkey TEXT NOT NULL,
                body TEXT NOT NULL, message TEXT NOT NULL, received_at TEXT NOT NULL,
                PRIMARY KEY (miner_hotkey, prediction_id))""",
            """INSERT INTO rejections_by_miner SELECT prediction_id, miner_hotkey, body, message,
                received_at FROM rejections""",
            "DROP TABLE rejections",
            "ALTER TABLE rejections_by_miner RENAME TO rejections",
            _SEEN_NONCES_TABLE,
            _SEEN_NONCES_INDEX,
        ),
        (
            # Refusals in bounded form (an excerpt and a hash of the body), expiring.
            "ALTER TABLE rejections ADD COLUMN body_hash TEXT",
            "CREATE INDEX rejections_received ON rejections (received_at)",
            "CREATE INDEX rejections_miner_received ON rejections (miner_hotkey, received_at)",
        ),
    )

    ACCEPTED = "Prediction accepted"

    def __init__(self, path: str | Path) -> None:
        super().__init__(path)
        self.db.execute(f"PRAGMA wal_autocheckpoint={WAL_CHECKPOINT_PAGES}")
        # The decision step's own connection: it reads while the previous group's
        # write holds ``db`` (WAL: readers never wait for the writer).
        self.reader = connect(path)
        # Read on every prediction, written only here: kept in memory so a group
        # commit makes no per-game or per-miner queries. Both game caches are LRUs
        # of bounded size (see _game_for); upsert_games keeps them current.
        # Everything below is the decision step's: only decide() (and upsert_games,
        # which a caller must not run beside it) touches it, on one thread at a time.
        self._known_games: OrderedDict[str, tuple[dict[str, Any], float]] = OrderedDict()
        self._unknown_games: OrderedDict[str, None] = OrderedDict()
        self._day_wagers: dict[tuple[str, str], float] = {}
        self._recorded_refusals: dict[tuple[str, str], int] = {}
        self._expired_on: str | None = None
        # Decided but not yet durable, per group: what the next decision must see
        # that the reader cannot yet. Each (miner, id) is decided once, in one group.
        self._undurable_groups: deque[tuple[int, dict[tuple[str, str], _Answer]]] = deque()
        self._decided_seq = 0
        self._cache_epoch = 0
        # Written by write() only (another thread): plain ints, read by decide().
        self._durable_seq = 0
        self._epoch = 0

    def close(self) -> None:
        self.reader.close()
        super().close()

    def upsert_games(self, games: Iterable[TeamGame | dict[str, Any]]) -> list[str]:
        rows = list(games)
        changed = super().upsert_games(rows)
        # Forget every id just stored, changed or not (another connection may have
        # written the row first): the next prediction on it reads the row afresh
        # and is never answered "game unknown" from a stale entry.
        for row in rows:
            game_id = str(_game_row(row)[0])
            self._known_games.pop(game_id, None)
            self._unknown_games.pop(game_id, None)
        return changed

    def _game_for(self, game_id: Any) -> tuple[dict[str, Any], float] | None:
        """The stored game ``game_id`` names and its start (epoch seconds), or None:
        from the caches, else one query."""
        if game_id is None:
            return None  # refused as missing data; caching it as "None" could hide a game so named
        key = str(game_id)
        known = self._known_games
        game = known.get(key)
        if game is not None:
            known.move_to_end(key)
            return game
        unknown = self._unknown_games
        if key in unknown:
            unknown.move_to_end(key)
            return None
        row = self.reader.execute("SELECT * FROM games WHERE game_id=?", (key,)).fetchone()
        if row is not None:
            game_row = _game_dict(row)
            game = known[key] = (game_row, game_start(game_row))
            if len(known) > KNOWN_GAME_CACHE_SIZE:
                known.popitem(last=False)
        else:
            game = None
            unknown[key] = None
            if len(unknown) > UNKNOWN_GAME_CACHE_SIZE:
                unknown.popitem(last=False)
        return game

    def submit(
        self, miner_hotkey: str, predictions: Sequence[dict[str, Any]], now: datetime | None = None
    ) -> list[PredictionResult]:
        """Check and store one miner's predictions in one transaction; a result each."""
        return self.submit_many([(miner_hotkey, predictions)], now)[0]

    def submit_many(
        self,
        jobs: Sequence[tuple[str, Sequence[dict[str, Any]]]],
        now: datetime | None = None,
    ) -> list[list[PredictionResult]]:
        """Check and store every job's predictions in ONE transaction (one fsync).

        Jobs are taken in order, as if submitted one after another, so group
        commit changes how often the disk syncs, never an answer.

        Idempotent per miner: a prediction already answered, with the same content
        from the same miner, is answered as before (accepted ones are not stored
        again); the same miner's prediction_id with other content is an error. A
        prediction id is the miner's own: another miner's use of it changes nothing.

        It is :meth:`decide` then :meth:`write`; a group committer runs the two on
        two threads, so that one group is decided while the one before is written.
        """
        return self.write(self.decide(jobs, now))

    def decide(
        self,
        jobs: Sequence[tuple[str, Sequence[dict[str, Any]]]],
        now: datetime | None = None,
    ) -> _Batch:
        """Answer every job's predictions, as :meth:`submit_many` would; nothing is
        stored until :meth:`write` takes the batch, which must be done in order.

        May run while the previous batch's :meth:`write` is in progress (not beside
        another decide, nor beside :meth:`upsert_games`): what earlier batches
        decided and did not yet make durable is kept in memory and counts as stored,
        and if one of their writes fails, every batch decided after it is refused
        by :meth:`write` too (:class:`StaleBatch`), since it was decided on top.

        The whole group costs a handful of SQLite calls (one lookup, one sum): each
        call releases the GIL, and on a busy event loop every re-acquisition can
        wait a whole switch interval.
        """
        epoch = self._epoch  # read once: a write failing from here on makes this batch stale
        self._settle(epoch)
        self._decided_seq += 1
        batch = _Batch(now or _now(), self._decided_seq, epoch)
        batch.answered = self._answered(
            [(hotkey, pid) for hotkey, predictions in jobs for pid in map(prediction_id_of, predictions) if pid]
        )
        # each prediction's day, read once: the wager sums to load, then the rules
        days = [prediction_days(predictions, batch.moment) for _, predictions in jobs]
        batch.wagered = self._wagered(
            {(hotkey, day) for (hotkey, _), job_days in zip(jobs, days, strict=True) for day in job_days}
        )
        batch.results = [
            self._decide(batch, hotkey, predictions, job_days)
            for (hotkey, predictions), job_days in zip(jobs, days, strict=True)
        ]
        self._plan_expiry(batch)
        self._day_wagers.update(batch.wagered)
        for hotkey, count in batch.recorded.items():
            self._recorded_refusals[(hotkey, batch.day)] = count
        if batch.decided:
            self._undurable_groups.append((batch.seq, batch.decided))
        return batch

    def write(self, batch: _Batch) -> list[list[PredictionResult]]:
        """Store what :meth:`decide` accepted and recorded, in one transaction; the
        batch's answers, once durable. Raises (and nothing of it is stored) if it
        fails, or if a batch decided before it failed (:class:`StaleBatch`)."""
        outcome = self.write_many([batch])[0]
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    def write_many(self, batches: Sequence[_Batch]) -> list[list[list[PredictionResult]] | Exception]:
        """:meth:`write` for batches decided one after another, in ONE transaction:
        when the disk is slower than the decisions, the batches decided meanwhile
        share one commit. Per batch, its answers or why it was not stored (all
        fail together; a batch decided on top of a failed write: :class:`StaleBatch`)."""
        epoch = self._epoch
        fresh = [batch for batch in batches if batch.epoch == epoch]
        outcomes: dict[int, list[list[PredictionResult]] | Exception] = {
            id(batch): StaleBatch("decided on top of a batch whose write failed")
            for batch in batches
            if batch.epoch != epoch
        }
        if fresh:
            try:
                with transaction(self.db):
                    _insert_rows(
                        self.db,
                        "predictions (prediction_id, miner_hotkey, game_id, wager, predicted_outcome, "
                        "body, received_at, day, status, message)",
                        [row for batch in fresh for row in batch.accepted],
                    )
                    _insert_rows(
                        self.db,
                        "rejections (prediction_id, miner_hotkey, body, message, received_at, body_hash)",
                        [row for batch in fresh for row in batch.refused],
                    )
                    for expiry in {batch.expire_before for batch in fresh} - {None}:
                        self.db.execute("DELETE FROM rejections WHERE received_at < ?", (expiry,))
            except Exception as exc:
                self._epoch += 1  # the next decide starts again from what is on disk
                outcomes.update((id(batch), exc) for batch in fresh)
            except BaseException:
                self._epoch += 1
                raise
            else:
                self._durable_seq = max(batch.seq for batch in fresh)
                outcomes.update((id(batch), batch.results) for batch in fresh)
        return [outcomes[id(batch)] for batch in batches]

    def _settle(self, epoch: int) -> None:
        """Before deciding: forget what a failed write left in memory, and the
        undurable entries of batches now on disk (the reader sees them)."""
        if self._cache_epoch != epoch:
            self._cache_epoch = epoch
            self._undurable_groups.clear()
            self._day_wagers.clear()
            self._recorded_refusals.clear()
            self._expired_on = None
        durable = self._durable_seq
        groups = self._undurable_groups
        while groups and groups[0][0] <= durable:
            groups.popleft()

    def _plan_expiry(self, batch: _Batch) -> None:
        """Once a day, the batch also forgets refusals older than :data:`REFUSAL_RETENTION`."""
        if batch.day == self._expired_on:
            return
        batch.expire_before = (batch.moment - REFUSAL_RETENTION).isoformat()
        self._expired_on = batch.day
        self._recorded_refusals = {k: v for k, v in self._recorded_refusals.items() if k[1] == batch.day}

    def _decide(
        self, batch: _Batch, miner_hotkey: str, predictions: Sequence[dict[str, Any]], days: Sequence[str]
    ) -> list[PredictionResult]:
        """Answer one job's predictions (each counting on its day) against what the
        group has seen so far."""
        results: list[PredictionResult] = []
        answered = batch.answered
        moment = batch.moment
        for data, day in zip(predictions, days, strict=True):
            pid = prediction_id_of(data)
            body = canonical(data)
            old = answered.get((miner_hotkey, pid)) if pid is not None else None
            if old is not None:
                # the same content: compared as text where the whole body is known,
                # else by digest (a recorded refusal keeps only an excerpt and a hash)
                if (old[3] == body) if old[3] is not None else (old[0] == _digest(body)):
                    results.append(_result(pid, old[1], old[2]))
                else:
                    results.append(
                        _result(pid, "error", "prediction_id already used for another prediction")
                    )
                continue
            wagered = batch.wagered.get((miner_hotkey, day), 0.0)
            found = self._game_for(data.get("game_id"))
            if found is None:
                reason = check_prediction(data, game=None, wagered_today=wagered, now=moment)
            else:
                reason = check_prediction(data, game=found[0], wagered_today=wagered, now=moment, starts=found[1])
            if reason is not None:
                if pid is not None and reason not in HEALABLE and self._may_record(batch, miner_hotkey):
                    digest = _digest(body)
                    batch.refused.append(
                        (pid, miner_hotkey, bounded(body, REFUSAL_EXCERPT), reason, batch.received_at, digest)
                    )
                    answered[(miner_hotkey, pid)] = batch.decided[(miner_hotkey, pid)] = (
                        digest, "error", reason, body
                    )
                results.append(_result(pid, "error", reason))
                continue
            assert pid is not None
            wager = float(data["wager"])
            batch.accepted.append(
                (pid, miner_hotkey, str(data.get("game_id")), wager, str(data["predicted_outcome"]), body,
                 batch.received_at, day, "success", self.ACCEPTED)
            )
            answered[(miner_hotkey, pid)] = batch.decided[(miner_hotkey, pid)] = (
                None, "success", self.ACCEPTED, body
            )
            batch.wagered[(miner_hotkey, day)] = wagered + wager
            results.append(_result(pid, "success", self.ACCEPTED))
        return results

    def _may_record(self, batch: _Batch, miner_hotkey: str) -> bool:
        """Whether this miner may have one more refusal recorded today (bounded disk)."""
        count = batch.recorded.get(miner_hotkey)
        if count is None:
            count = self._recorded_refusals.get((miner_hotkey, batch.day))
            if count is None:
                count = int(self.reader.execute(
                    "SELECT COUNT(*) FROM rejections WHERE miner_hotkey=? AND received_at >= ?",
                    (miner_hotkey, batch.day),
                ).fetchone()[0])
        if count >= MAX_RECORDED_REFUSALS:
            return False
        batch.recorded[miner_hotkey] = count + 1
        return True

    def _answered(self, keys: list[tuple[str, str]]) -> dict[tuple[str, str], _Answer]:
        """The answer already given to any of the (miner, id) ``keys`` (see :data:`_Answer`)."""
        # the undurable first: one whose write completes after this lookup and
        # before the query below is then found in one or the other
        found: dict[tuple[str, str], _Answer] = {}
        for _, decided in self._undurable_groups:
            found.update((key, decided[key]) for key in keys if key in decided)
        unique = [key for key in dict.fromkeys(keys) if key not in found]
        # one query for every miner of the group: each SQLite call hands the GIL
        # back to a busy event loop, and a group of 256 miners made 256 of them
        per_query = _MAX_PARAMS // 2
        for start in range(0, len(unique), per_query):
            chunk = unique[start : start + per_query]
            pairs = ",".join(["(?,?)"] * len(chunk))
            for row in self.reader.execute(
                f"WITH k(h, p) AS (VALUES {pairs}) "
                "SELECT r.miner_hotkey, r.prediction_id, r.body, 'error', r.message, r.body_hash "
                "FROM k JOIN rejections r ON r.miner_hotkey = k.h AND r.prediction_id = k.p UNION ALL "
                "SELECT t.miner_hotkey, t.prediction_id, t.body, t.status, t.message, NULL "
                "FROM k JOIN predictions t ON t.miner_hotkey = k.h AND t.prediction_id = k.p",
                [value for key in chunk for value in key],
            ):
                # a refusal keeps an excerpt and a hash (rows from before schema 5:
                # the whole body, no hash); a prediction keeps its whole body
                found[(row[0], row[1])] = (row[5], row[3], row[4], None if row[5] else row[2])
        return found

    def _wagered(self, pairs: set[tuple[str, str]]) -> dict[tuple[str, str], float]:
        """Each (miner, day)'s stored wagers; summed from disk once, then kept up to date."""
        totals = {pair: self._day_wagers[pair] for pair in pairs if pair in self._day_wagers}
        missing: dict[str, list[str]] = {}
        for hotkey, day in sorted(pairs - totals.keys()):
            missing.setdefault(day, []).append(hotkey)
        if missing and len(self._day_wagers) > 100_000 and not self._undurable_groups:
            self._day_wagers.clear()  # old days: forget rather than grow (not while a sum is undurable)
        for day, hotkeys in missing.items():
            totals.update(dict.fromkeys(((h, day) for h in hotkeys), 0.0))
            for start in range(0, len(hotkeys), _MAX_PARAMS - 1):
                chunk = hotkeys[start : start + _MAX_PARAMS - 1]
                marks = ",".join("?" * len(chunk))
                for hotkey, total in self.reader.execute(
                    "SELECT miner_hotkey, SUM(wager) FROM predictions "
                    f"WHERE day=? AND miner_hotkey IN ({marks}) GROUP BY miner_hotkey",
                    [day, *chunk],
                ):
                    totals[(hotkey, day)] = float(total)
        return totals

    def prediction(self, prediction_id: str, miner_hotkey: str | None = None) -> dict[str, Any] | None:
        """The stored prediction ``prediction_id`` of ``miner_hotkey`` (of any miner: the first)."""
        if miner_hotkey is None:
            row = self.db.execute(
                "SELECT * FROM predictions WHERE prediction_id=? ORDER BY received_at LIMIT 1",
                (prediction_id,),
            ).fetchone()
        else:
            row = self.db.execute(
                "SELECT * FROM predictions WHERE miner_hotkey=? AND prediction_id=?",
                (miner_hotkey, prediction_id),
            ).fetchone()
        return dict(row) if row is not None else None

    def count_predictions(self) -> int:
        return int(self.db.execute("SELECT COUNT(*) FROM predictions").fetchone()[0])

    def prediction_ids(self) -> set[str]:
        return {r[0] for r in self.db.execute("SELECT prediction_id FROM predictions")}

    def per_miner(self) -> list[tuple[str, int, float]]:
        return [
            (r[0], int(r[1]), float(r[2]))
            for r in self.db.execute(
                "SELECT miner_hotkey, COUNT(*), SUM(wager) FROM predictions "
                "GROUP BY miner_hotkey ORDER BY miner_hotkey"
            )
        ]


_MAX_PARAMS = 30_000
"""Bound parameters per statement, under SQLite's default limit of 32,766."""


def _insert_rows(db: sqlite3.Connection, target: str, rows: list[tuple[Any, ...]]) -> None:
    """Insert ``rows`` with as few statements as the parameter limit allows."""
    if not rows:
        return
    width = len(rows[0])
    per_statement = _MAX_PARAMS // width
    placeholder = "(" + ",".join("?" * width) + ")"
    for start in range(0, len(rows), per_statement):
        chunk = rows[start : start + per_statement]
        db.execute(
            f"INSERT INTO {target} VALUES {','.join([placeholder] * len(chunk))}",
            [value for row in chunk for value in row],
        )


_Answer = tuple[str | None, str, str, str | None]
"""(digest of the body, status, message, the whole body): what was answered to a
(miner, id); the body where known, else its digest (a recorded refusal's)."""


class StaleBatch(Exception):
    """A batch decided on top of one whose write failed: not written, answer it as failed."""


class _Batch:
    """One group's decisions: what it read once, its answers, and the rows to write."""

    def __init__(self, moment: datetime, seq: int = 0, epoch: int = 0) -> None:
        self.seq = seq
        self.epoch = epoch
        self.results: list[list[PredictionResult]] = []
        self.decided: dict[tuple[str, str], _Answer] = {}
        self.expire_before: str | None = None
        self.moment = moment
        self.day = utc_day(moment)
        self.received_at = moment.isoformat()
        self.wagered: dict[tuple[str, str], float] = {}
        self.answered: dict[tuple[str, str], _Answer] = {}
        self.recorded: dict[str, int] = {}
        self.accepted: list[tuple[Any, ...]] = []
        self.refused: list[tuple[Any, ...]] = []


def _result(prediction_id: str | None, status: str, message: str) -> PredictionResult:
    """A result; a prediction without a usable id is named "" (a batch's results must
    all parse: a null id would make the whole confirmation unreadable)."""
    return PredictionResult(prediction_id=prediction_id or "", status=status, message=message)


class MinerStore(_Store):
    """A miner's games, its predictions, and each one's delivery state per validator."""

    kind = "miner"

    migrations = (
        (
            _GAMES_TABLE,
            """CREATE TABLE IF NOT EXISTS predictions (
                prediction_id TEXT PRIMARY KEY, game_id TEXT NOT NULL,
                body TEXT NOT NULL, created_at TEXT NOT NULL)""",
            """CREATE TABLE IF NOT EXISTS deliveries (
                prediction_id TEXT NOT NULL REFERENCES predictions(prediction_id),
                validator_hotkey TEXT NOT NULL,
                state TEXT NOT NULL CHECK (state IN ('pending', 'confirmed', 'rejected')),
                reason TEXT, updated_at TEXT NOT NULL,
                PRIMARY KEY (prediction_id, validator_hotkey))""",
            "CREATE INDEX IF NOT EXISTS deliveries_pending ON deliveries (validator_hotkey, state)",
        ),
        (_SEEN_NONCES_TABLE, _SEEN_NONCES_INDEX),
        (
            # A game id means that validator's game: each validator's games apart.
            """CREATE TABLE validator_games (
                validator_hotkey TEXT NOT NULL, game_id TEXT NOT NULL, body TEXT NOT NULL,
                updated_at TEXT NOT NULL, PRIMARY KEY (validator_hotkey, game_id)) WITHOUT ROWID""",
        ),
        (
            # Resends back off and are bounded, across restarts: how many times each
            # delivery was sent, when it may go next, and the last reason heard.
            "ALTER TABLE deliveries ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0",
            "ALTER TABLE deliveries ADD COLUMN next_at TEXT",
            "ALTER TABLE deliveries ADD COLUMN last_reason TEXT",
        ),
    )

    def upsert_validator_games(self, validator_hotkey: str, games: Iterable[dict[str, Any]]) -> list[str]:
        """Store one validator's games; returns the ids that are new or changed there.

        Another validator's game of the same id is another game: a validator that
        renames the teams of a game id changes nothing of what another said.
        """
        changed = []
        now = _now().isoformat()
        with transaction(self.db):
            for game in games:
                game_id = str(game.get("game_id"))
                body = canonical(game)
                old = self.db.execute(
                    "SELECT body FROM validator_games WHERE validator_hotkey=? AND game_id=?",
                    (validator_hotkey, game_id),
                ).fetchone()
                if old is not None and old[0] == body:
                    continue
                self.db.execute(
                    "INSERT OR REPLACE INTO validator_games (validator_hotkey, game_id, body, updated_at) "
                    "VALUES (?, ?, ?, ?)",
                    (validator_hotkey, game_id, body, now),
                )
                changed.append(game_id)
        return changed

    def games_sent_by(self, validator_hotkey: str, prediction_ids: Iterable[str]) -> set[str]:
        """Which of ``prediction_ids`` are on a game that validator itself sent us."""
        ids = list(prediction_ids)
        found: set[str] = set()
        for start in range(0, len(ids), _MAX_PARAMS - 1):
            chunk = ids[start : start + _MAX_PARAMS - 1]
            marks = ",".join("?" * len(chunk))
            found.update(
                r[0]
                for r in self.db.execute(
                    "SELECT p.prediction_id FROM predictions p JOIN validator_games g "
                    "ON g.game_id = p.game_id AND g.validator_hotkey = ? "
                    f"WHERE p.prediction_id IN ({marks})",
                    [validator_hotkey, *chunk],
                )
            )
        return found

    def validator_games(self, validator_hotkey: str) -> list[dict[str, Any]]:
        return [
            json.loads(r[0])
            for r in self.db.execute(
                "SELECT body FROM validator_games WHERE validator_hotkey=? ORDER BY game_id", (validator_hotkey,)
            )
        ]

    def add_predictions(
        self, predictions: Sequence[dict[str, Any]], validators: Iterable[str]
    ) -> list[str]:
        """Record predictions as pending for every validator before anything is sent."""
        created_at = _now().isoformat()
        targets = list(validators)
        added = []
        with transaction(self.db):
            for data in predictions:
                pid = prediction_id_of(data)
                if pid is None:
                    raise ValueError("a prediction needs a prediction_id")
                cursor = self.db.execute(
                    "INSERT OR IGNORE INTO predictions (prediction_id, game_id, body, created_at) "
                    "VALUES (?, ?, ?, ?)",
                    (pid, str(data.get("game_id")), json.dumps(data), created_at),
                )
                if cursor.rowcount:
                    added.append(pid)
                self.db.executemany(
                    "INSERT OR IGNORE INTO deliveries (prediction_id, validator_hotkey, state, "
                    "updated_at) VALUES (?, ?, 'pending', ?)",
                    [(pid, v, created_at) for v in targets],
                )
        return added

    def pending(
        self,
        validator_hotkey: str,
        limit: int,
        exclude: Iterable[str] = (),
        now: datetime | None = None,
    ) -> list[dict[str, Any]]:
        """Oldest pending predictions for one validator whose next attempt has come
        (never sent, or ``next_at`` reached), skipping ids already in flight."""
        skip = set(exclude)
        rows = self.db.execute(
            "SELECT p.prediction_id, p.body FROM deliveries d JOIN predictions p "
            "USING (prediction_id) WHERE d.validator_hotkey=? AND d.state='pending' "
            "AND (d.next_at IS NULL OR d.next_at <= ?) "
            "ORDER BY p.created_at, p.prediction_id LIMIT ?",
            (validator_hotkey, _stamp(now or _now()), limit + len(skip)),
        ).fetchall()
        bodies = [json.loads(r["body"]) for r in rows if r["prediction_id"] not in skip]
        return bodies[:limit]

    def next_due(self, validator_hotkey: str, exclude: Iterable[str] = ()) -> datetime | None:
        """When the first pending delivery to that validator, other than ``exclude``,
        may go (a never-sent one: the epoch, at once); None when none is pending."""
        skip = set(exclude)
        rows = self.db.execute(
            "SELECT prediction_id, next_at FROM deliveries WHERE validator_hotkey=? AND state='pending' "
            "ORDER BY COALESCE(next_at, '') LIMIT ?",
            (validator_hotkey, len(skip) + 1),
        ).fetchall()
        for pid, next_at in rows:
            if pid not in skip:
                return datetime.fromisoformat(next_at) if next_at else datetime.min.replace(tzinfo=UTC)
        return None

    def record_sent(
        self,
        validator_hotkey: str,
        prediction_ids: Iterable[str],
        now: datetime,
        base: float,
        max_backoff: float,
    ) -> None:
        """Count one more attempt for each pending delivery sent; its next attempt may
        go ``min(base * 2**(attempts - 1), max_backoff)`` seconds from ``now``."""
        with transaction(self.db):
            for pid in prediction_ids:
                row = self.db.execute(
                    "SELECT attempts FROM deliveries WHERE prediction_id=? AND validator_hotkey=? "
                    "AND state='pending'",
                    (pid, validator_hotkey),
                ).fetchone()
                if row is None:
                    continue
                attempts = int(row[0]) + 1
                gap = min(base * 2.0 ** min(attempts - 1, 62), max_backoff)
                self.db.execute(
                    "UPDATE deliveries SET attempts=?, next_at=? WHERE prediction_id=? AND validator_hotkey=?",
                    (attempts, _stamp(now + timedelta(seconds=gap)), pid, validator_hotkey),
                )

    def note_reason(self, validator_hotkey: str, reasons: Iterable[tuple[str, str]]) -> None:
        """Keep (prediction_id, reason) as the last reason heard for pending deliveries
        (a transient refusal: they stay pending and go again)."""
        with transaction(self.db):
            self.db.executemany(
                "UPDATE deliveries SET last_reason=? "
                "WHERE prediction_id=? AND validator_hotkey=? AND state='pending'",
                [(reason, pid, validator_hotkey) for pid, reason in reasons],
            )

    def settle_exhausted(self, validator_hotkey: str, max_attempts: int, now: datetime | None = None) -> list[str]:
        """Settle as rejected each pending delivery sent ``max_attempts`` times whose
        last wait has run out unanswered, with the last reason heard; returns their ids."""
        moment = now or _now()
        rows = self.db.execute(
            "SELECT prediction_id, last_reason FROM deliveries WHERE validator_hotkey=? AND state='pending' "
            "AND attempts >= ? AND next_at <= ?",
            (validator_hotkey, max_attempts, _stamp(moment)),
        ).fetchall()
        if not rows:
            return []
        with transaction(self.db):
            for pid, last_reason in rows:
                reason = (
                    f"{last_reason} (gave up after {max_attempts} attempts)"
                    if last_reason
                    else f"no answer after {max_attempts} attempts"
                )
                self.db.execute(
                    "UPDATE deliveries SET state='rejected', reason=?, updated_at=? "
                    "WHERE prediction_id=? AND validator_hotkey=? AND state='pending'",
                    (reason, moment.isoformat(), pid, validator_hotkey),
                )
        return [r[0] for r in rows]

    def attempts(self, prediction_id: str, validator_hotkey: str) -> tuple[int, datetime | None, str | None] | None:
        """(attempts, next_at, last_reason) of one delivery, or None."""
        row = self.db.execute(
            "SELECT attempts, next_at, last_reason FROM deliveries WHERE prediction_id=? AND validator_hotkey=?",
            (prediction_id, validator_hotkey),
        ).fetchone()
        if row is None:
            return None
        return int(row[0]), datetime.fromisoformat(row[1]) if row[1] else None, row[2]

    def oldest_pending(self, validator_hotkey: str, now: datetime | None = None) -> float | None:
        """Seconds since the oldest prediction still pending for that validator was
        made (stored), or None when nothing is pending."""
        row = self.db.execute(
            "SELECT MIN(p.created_at) FROM deliveries d JOIN predictions p USING (prediction_id) "
            "WHERE d.validator_hotkey=? AND d.state='pending'",
            (validator_hotkey,),
        ).fetchone()
        if row is None or row[0] is None:
            return None
        return max(0.0, ((now or _now()) - datetime.fromisoformat(row[0])).total_seconds())

    def record_results(
        self, validator_hotkey: str, results: Iterable[tuple[str, str, str]]
    ) -> int:
        """Apply (prediction_id, status, message) answers; returns how many changed state.

        Only a pending delivery changes: a late duplicate answer cannot flip
        a prediction that was already settled.
        """
        now = _now().isoformat()
        changed = 0
        with transaction(self.db):
            for pid, status, message in results:
                state = "confirmed" if status == "success" else "rejected"
                cursor = self.db.execute(
                    "UPDATE deliveries SET state=?, reason=?, updated_at=? "
                    "WHERE prediction_id=? AND validator_hotkey=? AND state='pending'",
                    (state, None if state == "confirmed" else message, now, pid, validator_hotkey),
                )
                changed += cursor.rowcount
        return changed

    def predicted_games(self, validator_hotkey: str | None = None) -> set[str]:
        """Game ids predicted on (for that validator, when given)."""
        if validator_hotkey is None:
            return {r[0] for r in self.db.execute("SELECT game_id FROM predictions")}
        return {
            r[0]
            for r in self.db.execute(
                "SELECT DISTINCT p.game_id FROM predictions p JOIN deliveries d USING (prediction_id) "
                "WHERE d.validator_hotkey=?",
                (validator_hotkey,),
            )
        }

    def wagered_today(self, validator_hotkey: str | None = None, now: datetime | None = None) -> float:
        """Wagers counting on today (by each prediction's own date, as the validator
        counts them), sent to that validator when given, else all."""
        moment = now or _now()
        day = utc_day(moment)
        since = (moment - timedelta(days=2)).isoformat()
        if validator_hotkey is None:
            rows = self.db.execute(
                "SELECT body, created_at FROM predictions WHERE created_at >= ?", (since,)
            )
        else:
            rows = self.db.execute(
                "SELECT p.body, p.created_at FROM predictions p JOIN deliveries d USING (prediction_id) "
                "WHERE d.validator_hotkey=? AND p.created_at >= ?",
                (validator_hotkey, since),
            )
        total = 0.0
        for body, created_at in rows:
            data = json.loads(body)
            if prediction_day(data, datetime.fromisoformat(created_at)) != day:
                continue
            wager = data.get("wager", 0)
            if isinstance(wager, int | float) and not isinstance(wager, bool) and math.isfinite(wager):
                total += float(wager)
        return total

    def counts(self, validator_hotkey: str | None = None) -> dict[str, int]:
        where, args = ("WHERE validator_hotkey=?", (validator_hotkey,)) if validator_hotkey else ("", ())
        counts = {"pending": 0, "confirmed": 0, "rejected": 0}
        for state, n in self.db.execute(
            f"SELECT state, COUNT(*) FROM deliveries {where} GROUP BY state", args
        ):
            counts[state] = int(n)
        return counts

    def validators(self) -> list[str]:
        return [r[0] for r in self.db.execute(
            "SELECT DISTINCT validator_hotkey FROM deliveries ORDER BY validator_hotkey"
        )]

    def latest_rejections(self, limit: int = 10) -> list[tuple[str, str, str]]:
        return [
            (r[0], r[1], r[2] or "")
            for r in self.db.execute(
                "SELECT prediction_id, validator_hotkey, reason FROM deliveries "
                "WHERE state='rejected' ORDER BY updated_at DESC LIMIT ?",
                (limit,),
            )
        ]

    def delivery(self, prediction_id: str, validator_hotkey: str) -> tuple[str, str | None] | None:
        row = self.db.execute(
            "SELECT state, reason FROM deliveries WHERE prediction_id=? AND validator_hotkey=?",
            (prediction_id, validator_hotkey),
        ).fetchone()
        return (row[0], row[1]) if row is not None else None
