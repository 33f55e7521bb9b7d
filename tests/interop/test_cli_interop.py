"""Interop of the ``bettensor-ws`` command with the independent asyncio peer.

The issue's "Done when", in subprocesses over loopback:

A. An independent miner (``refpeer.RefMiner``) against ``bettensor-ws
   validator --games FILE``: Welcome, then at once a game_update with the
   upcoming games, then a signed confirmation for each prediction whose
   status and message follow Bettensor's rules (``bettensor_ws.node.rules``),
   idempotency included.
B. ``bettensor-ws miner`` against an independent validator
   (``refpeer.RefValidator``): it predicts on the validator's games, records
   the confirmations (``bettensor-ws status``), and resends after a restart
   what was never confirmed.

The tests are plain synchronous functions; each drives the reference peer
with ``asyncio.run``.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from bittensor_wallet import Keypair

from bettensor_ws.node import rules
from bettensor_ws.node.store import ValidatorStore

from ..test_cli import ALICE, BOB, CliProcess, future, game, run_cli, start_validator
from .refpeer import RefMiner, RefValidator, verify_envelope

STEP = 10.0  # bound on one exchange (or a process start) on a loaded machine
ACCEPTED = ValidatorStore.ACCEPTED

# The validator's games: three upcoming (one can tie, one lacks team_b's odds)
# and one that has already started.
UPCOMING = [
    game("up-tie", team_a="Arsenal", team_b="Chelsea", team_a_odds=2.4, team_b_odds=2.9,
         tie_odds=3.1, can_tie=True, event_start_date=future(3)),
    game("up-plain", team_a="Lakers", team_b="Celtics", sport="basketball", team_a_odds=1.7,
         team_b_odds=2.2, event_start_date=future(5)),
    game("up-noodds", team_a="Yankees", team_b="Mets", sport="baseball", team_a_odds=1.9,
         team_b_odds=None, event_start_date=future(7)),
]
STARTED = game("started", team_a="Heat", team_b="Suns", event_start_date=future(-1))


# --------------------------------------------------------------------------- A: RefMiner -> CLI validator


class Validator:
    def __init__(self, proc: CliProcess, url: str, db: Path) -> None:
        self.proc = proc
        self.url = url
        self.db = db

    def stored(self, prediction_id: str) -> dict[str, Any] | None:
        """The validator's row for ``prediction_id`` (read-only, beside the running node)."""
        db = sqlite3.connect(f"{self.db.resolve().as_uri()}?mode=ro", uri=True)
        try:
            db.row_factory = sqlite3.Row
            row = db.execute(
                "SELECT * FROM predictions WHERE prediction_id=?", (prediction_id,)
            ).fetchone()
            return dict(row) if row is not None else None
        finally:
            db.close()


@pytest.fixture(scope="module")
def validator(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Validator]:
    tmp = tmp_path_factory.mktemp("cli-validator")
    games_file = tmp / "games.json"
    games_file.write_text(json.dumps([*UPCOMING, STARTED]), encoding="utf-8")
    db = tmp / "v.db"
    proc, url = start_validator(
        tmp, "--port", "0", "--hotkey-uri", "//Alice", "--db", str(db), "--games", str(games_file)
    )
    try:
        assert proc.read_line() == f"validator hotkey {ALICE}"
        yield Validator(proc, url, db)
        assert proc.proc.poll() is None, proc.stderr()
        assert proc.signal(signal.SIGTERM) == 0, proc.stderr()
        log = proc.stderr()
        assert "Traceback" not in log, log
        assert " ERROR " not in log, log
    finally:
        proc.close()


_identities = iter(range(1_000_000))


def fresh_miner() -> Keypair:
    """A miner identity no other test used: its daily wager total starts at 0."""
    return Keypair.create_from_uri(f"//cli-interop-miner-{next(_identities)}-{time.time_ns()}")


def wait_for_same_utc_day(margin: float = 5.0) -> None:
    """Keep a daily-limit sequence within one UTC day (the limit is per day of receipt)."""
    now = datetime.now(UTC)
    midnight = (now + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    left = (midnight - now).total_seconds()
    if left < margin:
        time.sleep(left + 0.5)


def prediction(game_id: object = "up-plain", **fields: Any) -> dict[str, Any]:
    """A full TeamGamePrediction-style prediction, valid unless ``game_id`` or ``fields`` say otherwise.

    Any value goes, malformed ones included; ``_DROP`` leaves that key out.
    """
    g = next((x for x in [*UPCOMING, STARTED] if x["game_id"] == game_id), UPCOMING[1])
    data: dict[str, Any] = {
        "prediction_id": f"pred-{time.time_ns()}-{next(_identities)}",
        "game_id": game_id,
        "miner_uid": "7",
        "prediction_date": datetime.now(UTC).isoformat(),
        "predicted_outcome": g["team_a"],
        "predicted_odds": g["team_a_odds"],
        "team_a": g["team_a"],
        "team_b": g["team_b"],
        "wager": 1.0,
        "team_a_odds": g["team_a_odds"],
        "team_b_odds": g["team_b_odds"],
        "tie_odds": g["tie_odds"],
        "model_name": "interop",
        "confidence_score": 0.6,
        "outcome": "Unfinished",
        "payout": 0.0,
    }
    fields.setdefault("game_id", game_id)
    for key, value in fields.items():
        if value is _DROP:
            data.pop(key, None)
        else:
            data[key] = value
    return data


_DROP = object()


class Session:
    """One RefMiner connection: send predictions, read their signed confirmations."""

    def __init__(self, miner: RefMiner) -> None:
        self.miner = miner

    async def confirm(self, data: dict[str, Any]) -> dict[str, Any]:
        """Send one prediction; return the confirmation's data (signature checked)."""
        await self.miner.send_signed("prediction", data)
        frame = await self.miner.recv_json(timeout=STEP)
        assert frame.get("type") == "confirmation", frame
        assert verify_envelope(frame), frame
        assert frame["sender"] == ALICE
        result: dict[str, Any] = frame["data"]
        return result


def run_session(url: str, keypair: Keypair, steps: Any, features: list[str] | None = None) -> Any:
    """Connect as ``keypair``, skip Welcome and the game update, run ``steps(session)``."""

    async def main() -> Any:
        async with RefMiner(keypair, url, features=features, open_timeout=STEP) as miner:
            assert miner.welcome is not None and miner.welcome.get("type") == "welcome", miner.welcome
            update = await miner.recv_json(timeout=STEP)
            assert update.get("type") == "game_update", update
            return await steps(Session(miner))

    return asyncio.run(main())


def test_welcome_then_the_upcoming_games(validator: Validator) -> None:
    async def main() -> tuple[dict[str, Any], dict[str, Any]]:
        async with RefMiner(fresh_miner(), validator.url, features=["batch"], open_timeout=STEP) as m:
            assert m.welcome is not None
            update = await m.recv_json(timeout=STEP)  # the very next frame
            return m.welcome, update

    welcome, update = asyncio.run(main())
    assert welcome["type"] == "welcome" and verify_envelope(welcome), welcome
    assert welcome["sender"] == ALICE
    assert welcome["data"]["status"] == "success"
    assert set(welcome["data"].get("features", [])) <= {"batch"}

    assert update["type"] == "game_update" and verify_envelope(update), update
    assert update["sender"] == ALICE
    games = {g["game_id"]: g for g in update["data"]["games"]}
    assert set(games) == {g["game_id"] for g in UPCOMING}, "the started game must not be offered"
    for expected in UPCOMING:
        sent = games[expected["game_id"]]
        for key in ("team_a", "team_b", "event_start_date", "team_a_odds", "team_b_odds", "can_tie"):
            # odds we do not have go out as 0.0: the reference TeamGame requires a number
            assert sent[key] == (0.0 if expected[key] is None else expected[key]), (key, sent, expected)
    assert games["up-tie"]["tie_odds"] == 3.1


RULE_CASES: dict[str, tuple[dict[str, Any], str, str]] = {
    # name: (prediction, expected status, expected message)
    "valid": (prediction(), "success", ACCEPTED),
    "valid, outcome in another case": (prediction(predicted_outcome="lakers"), "success", ACCEPTED),
    "valid, Tie where the game can tie": (
        prediction("up-tie", predicted_outcome="Tie", predicted_odds=3.1), "success", ACCEPTED,
    ),
    "valid, tie in lower case": (prediction("up-tie", predicted_outcome="tie"), "success", ACCEPTED),
    "valid, without confidence": (prediction(confidence_score=None), "success", ACCEPTED),
    "valid, wager exactly the daily limit": (prediction(wager=1000), "success", ACCEPTED),
    "missing game_id": (prediction(game_id=_DROP), "error", rules.MISSING_DATA),
    "empty game_id": (prediction(game_id=""), "error", rules.MISSING_DATA),
    "missing predicted_outcome": (prediction(predicted_outcome=_DROP), "error", rules.MISSING_DATA),
    "missing wager": (prediction(wager=_DROP), "error", rules.MISSING_DATA),
    "null wager": (prediction(wager=None), "error", rules.MISSING_DATA),
    "wager 0": (prediction(wager=0), "error", rules.BAD_WAGER),
    "wager -1": (prediction(wager=-1), "error", rules.BAD_WAGER),
    "wager over the daily limit": (prediction(wager=1000.5), "error", rules.DAILY_LIMIT),
    "unknown game": (prediction("no-such-game"), "error", rules.UNKNOWN_GAME),
    "integer game_id unknown": (prediction(game_id=12345), "error", rules.UNKNOWN_GAME),
    "started game": (prediction("started"), "error", rules.GAME_STARTED),
    "bad outcome": (prediction(predicted_outcome="Nobody FC"), "error", rules.BAD_OUTCOME),
    "Tie on a game that can't tie": (prediction(predicted_outcome="Tie"), "error", rules.BAD_OUTCOME),
    "odds for the outcome missing": (
        prediction("up-noodds", predicted_outcome="Mets"), "error", rules.BAD_ODDS,
    ),
    "confidence 1.5": (prediction(confidence_score=1.5), "error", rules.BAD_CONFIDENCE),
    "confidence -0.1": (prediction(confidence_score=-0.1), "error", rules.BAD_CONFIDENCE),
    # The rules apply in order: the first one broken is the reason.
    "order: missing data before bad wager": (
        prediction(game_id=_DROP, wager=-1), "error", rules.MISSING_DATA,
    ),
    "order: bad wager before unknown game": (
        prediction("no-such-game", wager=-1), "error", rules.BAD_WAGER,
    ),
    "order: daily limit before unknown game": (
        prediction("no-such-game", wager=5000), "error", rules.DAILY_LIMIT,
    ),
    "order: started before bad outcome": (
        prediction("started", predicted_outcome="Nobody FC"), "error", rules.GAME_STARTED,
    ),
    "order: bad outcome before confidence": (
        prediction(predicted_outcome="Nobody FC", confidence_score=7), "error", rules.BAD_OUTCOME,
    ),
}

# Values of the wrong type never reach the rules: the payload is checked while
# decoding (issue 2), and the frame is refused with a signed "error" that names
# the field and carries the refused frame's nonce, so a miner can settle it.
WRONG_TYPE_CASES: dict[str, tuple[dict[str, Any], str]] = {
    'wager "0" (a string)': (prediction(wager="0"), "data.wager: expected a number, got '0'"),
    'wager "abc" (a string)': (prediction(wager="abc"), "data.wager: expected a number, got 'abc'"),
    "missing prediction_id": (prediction(prediction_id=_DROP), "data.prediction_id: required field missing"),
}


async def _refusal(s: Session, data: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    sent = await s.miner.send_signed("prediction", data)
    frame = await s.miner.recv_json(timeout=STEP)
    return sent, frame


def _check_rule(validator: Validator, data: dict[str, Any], status: str, message: str) -> None:
    assert message == ACCEPTED or message in rules.REASONS
    result = run_session(validator.url, fresh_miner(), lambda s: s.confirm(data))
    assert (result.get("status"), result.get("message")) == (status, message), result
    pid = rules.prediction_id_of(data)
    assert result.get("prediction_id") == pid
    if pid is not None:
        row = validator.stored(pid)
        if status == "success":
            # Confirmed only after it was committed: the row is there already.
            assert row is not None and row["status"] == "success"
            assert json.loads(row["body"]) == data
        else:
            assert row is None, "a rejected prediction was stored"


@pytest.mark.parametrize("case", list(RULE_CASES))
def test_rules(validator: Validator, case: str) -> None:
    _check_rule(validator, *RULE_CASES[case])


@pytest.mark.parametrize("case", list(WRONG_TYPE_CASES))
def test_values_of_the_wrong_type_are_refused_naming_the_field(validator: Validator, case: str) -> None:
    data, reason = WRONG_TYPE_CASES[case]
    sent, frame = run_session(validator.url, fresh_miner(), lambda s: _refusal(s, data))
    assert frame["type"] == "error" and verify_envelope(frame), frame
    assert frame["data"] == {"message": reason, "refused_nonce": sent["nonce"]}


def test_daily_limit_after_a_success(validator: Validator) -> None:
    wait_for_same_utc_day()

    async def steps(s: Session) -> list[dict[str, Any]]:
        return [
            await s.confirm(prediction(wager=1)),
            await s.confirm(prediction(wager=1000)),  # 1 + 1000 > 1000
            await s.confirm(prediction(wager=999)),  # 1 + 999 == 1000: allowed
            await s.confirm(prediction(wager=0.01)),
        ]

    results = run_session(validator.url, fresh_miner(), steps)
    assert [(r["status"], r["message"]) for r in results] == [
        ("success", ACCEPTED),
        ("error", rules.DAILY_LIMIT),
        ("success", ACCEPTED),
        ("error", rules.DAILY_LIMIT),
    ]


def test_daily_limit_exactly_1000_in_parts(validator: Validator) -> None:
    wait_for_same_utc_day()

    async def steps(s: Session) -> list[dict[str, Any]]:
        return [await s.confirm(prediction(wager=w)) for w in (400, 350.5, 249.5, 0.001)]

    results = run_session(validator.url, fresh_miner(), steps)
    assert [r["status"] for r in results] == ["success", "success", "success", "error"]
    assert results[-1]["message"] == rules.DAILY_LIMIT


def test_duplicate_prediction_id(validator: Validator) -> None:
    wait_for_same_utc_day()
    first = prediction(wager=1000)
    reordered = dict(reversed(list(first.items())))  # same content, other key order
    changed = {**first, "wager": 2.0}

    async def steps(s: Session) -> list[dict[str, Any]]:
        return [
            await s.confirm(first),
            # Same id, same content: the same success again, though a new 1000 now
            # breaks the daily limit (its wager already counts toward the day).
            await s.confirm(first),
            await s.confirm(reordered),
            # Same id, other content: an error, and the stored one is untouched.
            await s.confirm(changed),
        ]

    owner = fresh_miner()
    results = run_session(validator.url, owner, steps)
    pid = first["prediction_id"]
    assert [r["prediction_id"] for r in results] == [pid] * 4
    assert results[0] == {**results[1], "timestamp": results[0]["timestamp"]}
    assert [(r["status"], r["message"]) for r in results[:3]] == [("success", ACCEPTED)] * 3
    assert results[3]["status"] == "error"
    assert results[3]["message"] not in (ACCEPTED, *rules.REASONS)
    row = validator.stored(pid)
    assert row is not None and json.loads(row["body"]) == first

    # The same id from another miner is that miner's own prediction: ids are per
    # miner, so it takes nothing from the owner (see test_security.py).
    other_key = fresh_miner()
    other = run_session(validator.url, other_key, lambda s: s.confirm(first))
    assert other["status"] == "success" and other["prediction_id"] == pid
    assert other["miner_hotkey"] == other_key.ss58_address
    row = validator.stored(pid)
    assert row is not None and row["miner_hotkey"] == owner.ss58_address


def test_seed_id_key(validator: Validator) -> None:
    """The seed sends ``id``: it is the prediction's id in the confirmation."""
    data = prediction()
    data["id"] = data.pop("prediction_id")
    result = run_session(validator.url, fresh_miner(), lambda s: s.confirm(data))
    assert (result["status"], result["message"], result["prediction_id"]) == ("success", ACCEPTED, data["id"])


def test_batch_gets_one_result_per_prediction_in_order(validator: Validator) -> None:
    batch = [
        prediction(),
        prediction("started"),
        prediction("up-tie", predicted_outcome="Tie"),
        prediction(confidence_score=1.5),
    ]

    async def steps(s: Session) -> dict[str, Any]:
        return await s.confirm({"predictions": batch})

    result = run_session(validator.url, fresh_miner(), steps, features=["batch"])
    assert [(r["prediction_id"], r["status"], r["message"]) for r in result["results"]] == [
        (batch[0]["prediction_id"], "success", ACCEPTED),
        (batch[1]["prediction_id"], "error", rules.GAME_STARTED),
        (batch[2]["prediction_id"], "success", ACCEPTED),
        (batch[3]["prediction_id"], "error", rules.BAD_CONFIDENCE),
    ]


def test_batch_with_one_value_of_the_wrong_type_is_judged_item_by_item(validator: Validator) -> None:
    """One bad item costs only itself: it is answered with the field and what is wrong,
    and its neighbour is stored and confirmed, in order, in one confirmation."""
    good, bad = prediction(), prediction(wager="1")
    sent, frame = run_session(
        validator.url, fresh_miner(), lambda s: _refusal(s, {"predictions": [good, bad]}), features=["batch"]
    )
    assert frame["type"] == "confirmation" and verify_envelope(frame), frame
    results = frame["data"]["results"]
    assert [(r["prediction_id"], r["status"]) for r in results] == [
        (good["prediction_id"], "success"),
        (bad["prediction_id"], "error"),
    ]
    assert results[1]["message"] == "data.predictions[1].wager: expected a number, got '1'"
    assert validator.stored(good["prediction_id"]) is not None
    assert validator.stored(bad["prediction_id"]) is None


def test_sigterm_with_a_miner_connected(tmp_path: Path) -> None:
    """Graceful shutdown closes open links and exits 0 promptly."""
    proc, url = start_validator(tmp_path, "--port", "0", "--hotkey-uri", "//Alice", "--db", str(tmp_path / "v.db"))
    try:

        async def main() -> tuple[int | None, float]:
            async with RefMiner(fresh_miner(), url, open_timeout=STEP) as miner:
                assert miner.welcome is not None and miner.welcome["type"] == "welcome"
                started = time.monotonic()
                rc = await asyncio.to_thread(proc.signal, signal.SIGTERM)
                code, _ = await miner.wait_closed(STEP)
                assert code is not None
                return rc, time.monotonic() - started

        rc, elapsed = asyncio.run(main())
        assert rc == 0, proc.stderr()
        assert elapsed < 5.0
        assert "Traceback" not in proc.stderr()
    finally:
        proc.close()


# --------------------------------------------------------------------------- B: CLI miner -> RefValidator


PREDICTION_KEYS = {
    "prediction_id", "game_id", "miner_uid", "prediction_date", "predicted_outcome",
    "predicted_odds", "team_a", "team_b", "wager", "team_a_odds", "team_b_odds", "tie_odds",
    "model_name", "confidence_score", "outcome", "payout",
}
REF_GAMES = [
    game("ref-1", team_a="Arsenal", team_b="Chelsea", team_a_odds=2.5, team_b_odds=2.0,
         tie_odds=3.0, can_tie=True, event_start_date=future(2)),
    game("ref-2", team_a="Lakers", team_b="Celtics", team_a_odds=1.6, team_b_odds=2.4,
         event_start_date=future(4)),
    game("ref-3", team_a="Yankees", team_b="Mets", team_a_odds=3.5, team_b_odds=3.0,
         tie_odds=2.2, can_tie=True, event_start_date=future(6)),
]
FAVOURITE = {"ref-1": ("Chelsea", 2.0), "ref-2": ("Lakers", 1.6), "ref-3": ("Tie", 2.2)}


class SilentValidator(RefValidator):
    """A RefValidator that receives predictions but, while ``silent``, never confirms."""

    silent = True

    async def _send(self, ws: Any, type_: str, data: dict[str, Any]) -> None:
        if type_ == "confirmation" and self.silent:
            return
        await super()._send(ws, type_, data)


def _deliveries(db: Path) -> dict[str, int]:
    """State counts of the miner's deliveries, read beside the running miner."""
    if not db.exists():
        return {}
    conn = sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True)
    try:
        return dict(conn.execute("SELECT state, COUNT(*) FROM deliveries GROUP BY state").fetchall())
    except sqlite3.OperationalError:
        return {}  # the schema is not there yet
    finally:
        conn.close()


async def _eventually(predicate: Any, what: str, timeout: float = 2 * STEP) -> None:  # noqa: ASYNC109
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def _start_miner(tmp: Path, ref: RefValidator, name: str, *extra: str) -> CliProcess:
    return CliProcess(
        ["miner", "--validator", f"{ref.url}@{ref.hotkey}", "--hotkey-uri", "//Bob",
         "--db", str(tmp / "m.db"), *extra],
        tmp / f"{name}.stderr",
    )


def _status(db: Path) -> list[str]:
    result = run_cli("status", "--db", str(db))
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def test_cli_miner_predicts_on_a_reference_validators_games(tmp_path: Path) -> None:
    alice = Keypair.create_from_uri("//Alice")
    db = tmp_path / "m.db"

    async def main() -> tuple[RefValidator, int]:
        async with RefValidator(alice, games=REF_GAMES) as ref:
            miner = _start_miner(tmp_path, ref, "miner", "--wager", "2.5")
            try:
                await _eventually(lambda: len(ref.predictions) >= len(REF_GAMES), "a prediction per game")
                await _eventually(
                    lambda: _deliveries(db).get("confirmed") == len(REF_GAMES), "confirmations recorded"
                )
                await asyncio.sleep(0.3)  # nothing more should come
                rc = await asyncio.to_thread(miner.signal, signal.SIGTERM)
                assert "Traceback" not in miner.stderr(), miner.stderr()
                assert miner.expect_prefix("miner hotkey ", timeout=1) == BOB
                return ref, rc
            finally:
                miner.close()

    ref, rc = asyncio.run(main())
    assert rc == 0
    assert len(ref.predictions) == len(REF_GAMES), ref.predictions
    by_game = {}
    for hotkey, data in ref.predictions:
        assert hotkey == BOB
        assert set(data) >= PREDICTION_KEYS, sorted(PREDICTION_KEYS - set(data))
        by_game[data["game_id"]] = data
    assert set(by_game) == set(FAVOURITE)
    for game_id, (outcome, odds) in FAVOURITE.items():
        data = by_game[game_id]
        source = next(g for g in REF_GAMES if g["game_id"] == game_id)
        assert (data["predicted_outcome"], data["predicted_odds"]) == (outcome, odds)
        assert data["wager"] == 2.5
        assert (data["team_a"], data["team_b"]) == (source["team_a"], source["team_b"])
        assert data["outcome"] == "Unfinished"
    # Every prediction the miner sent was a verified, signed envelope from Bob.
    assert all(env["sender"] == BOB for env in ref.received)

    lines = _status(db)
    assert lines[:3] == ["pending 0", f"confirmed {len(REF_GAMES)}", "rejected 0"], lines
    assert any(ln.startswith(f"validator {ALICE}") for ln in lines), lines


def test_cli_miner_resends_after_a_restart_what_was_never_confirmed(tmp_path: Path) -> None:
    """Nothing lost: unanswered predictions survive a restart and go again, with the same ids."""
    alice = Keypair.create_from_uri("//Alice")
    db = tmp_path / "m.db"

    async def main() -> tuple[SilentValidator, list[str], list[str]]:
        async with SilentValidator(alice, games=REF_GAMES) as ref:
            first = _start_miner(tmp_path, ref, "first")
            try:
                await _eventually(lambda: len(ref.predictions) == len(REF_GAMES), "predictions")
                await _eventually(lambda: _deliveries(db).get("pending") == len(REF_GAMES), "pending rows")
                assert await asyncio.to_thread(first.signal, signal.SIGTERM) == 0, first.stderr()
            finally:
                first.close()
            pending = await asyncio.to_thread(_status, db)
            sent_first = [env["data"]["prediction_id"] for env in ref.received if env["type"] == "prediction"]

            ref.silent = False
            second = _start_miner(tmp_path, ref, "second")
            try:
                await _eventually(
                    lambda: _deliveries(db).get("confirmed") == len(REF_GAMES), "confirmations after restart"
                )
                assert await asyncio.to_thread(second.signal, signal.SIGTERM) == 0, second.stderr()
            finally:
                second.close()
            return ref, pending, sent_first

    ref, pending, sent_first = asyncio.run(main())
    assert pending[:3] == [f"pending {len(REF_GAMES)}", "confirmed 0", "rejected 0"], pending
    resent = [env["data"]["prediction_id"] for env in ref.received if env["type"] == "prediction"]
    # The second run resent the very same predictions and predicted nothing new.
    assert set(resent) == set(sent_first) and len(set(sent_first)) == len(REF_GAMES)
    assert len(ref.predictions) == len(REF_GAMES)
    assert _status(db)[:3] == ["pending 0", f"confirmed {len(REF_GAMES)}", "rejected 0"]
