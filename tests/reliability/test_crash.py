"""Crash and restart with nothing lost: real ``bettensor-ws`` processes on loopback.

A validator process and N miner processes (``bettensor-ws validator`` /
``bettensor-ws miner``) stream predictions while the test kills them:

* the validator with SIGKILL, then restarted on the same database and port;
* the validator with SIGTERM (graceful), then restarted the same way;
* a miner with SIGKILL, then restarted on its database (its outbox resends).

The only way a CLI validator gets new games is its ``--games`` file, read at
start, so every validator restart brings a new *wave* of games: the miners get
them right after the Welcome and predict each once. Each fault is injected
while a wave is being delivered (the test polls the databases and strikes as
soon as the wave's first predictions land), so predictions are in flight: some
stored by the validator and not yet confirmed to the miner, some not yet sent.

At the end, with every process stopped, the databases must agree:

* every miner predicted every game of every wave (so each reconnected to every
  restarted validator: a wave's games reach a miner only over a new link) exactly once (no game predicted twice, even
  across a miner's restart), and nothing is pending or rejected;
* the validator stored exactly the union of the miners' predictions, each
  once (``count(*) == count(DISTINCT prediction_id)``), no (miner, game) twice,
  with the body the miner sent.

Short form (2 miners, one fault of each kind) runs in ``make test``; the long
form (8 miners, several rounds of each fault) is marked ``reliability``.
"""

from __future__ import annotations

import json
import signal
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from bittensor_wallet import Keypair

from bettensor_ws.node.store import canonical
from tests.test_cli import ALICE, CliProcess, port_of
from tests.test_node import upcoming_games

SETTLE = 60.0  # generous bound for a wave to be delivered after the last fault
RECONNECT_MAX = "1"  # seconds: the miners' longest reconnect wait (the base is 1 s)

Fault = str  # "validator-kill" | "validator-term" | "miner-kill"


def _ro(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=10)


def _query(path: Path, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    """Read a database a live node writes (WAL): read-only, retried while it is busy."""
    for attempt in range(50):
        try:
            db = _ro(path)
            try:
                return [tuple(r) for r in db.execute(sql, args)]
            finally:
                db.close()
        except sqlite3.OperationalError:
            if attempt == 49 or not path.exists():
                raise
            time.sleep(0.02)
    raise AssertionError("unreachable")


def _scalar(path: Path, sql: str, *args: Any) -> int:
    return int(_query(path, sql, *args)[0][0])


def _poll(check: Callable[[], bool], limit: float, what: str, interval: float = 0.005) -> None:
    deadline = time.monotonic() + limit
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {limit}s waiting for {what}")
        time.sleep(interval)


class Cluster:
    """One validator process and ``n`` miner processes, each restartable on its database."""

    def __init__(self, tmp: Path, miners: int, games_per_wave: int) -> None:
        self.tmp = tmp
        self.games_per_wave = games_per_wave
        self.wave = 0
        self.vdb = tmp / "validator.db"
        self.games_file = tmp / "games.json"
        self.mdbs = [tmp / f"miner{i}.db" for i in range(miners)]
        self.hotkeys = [Keypair.create_from_uri(f"//CrashMiner{i}").ss58_address for i in range(miners)]
        self.validator: CliProcess | None = None
        self.miners: list[CliProcess | None] = [None] * miners
        self.port = 0
        self.starts = 0
        self.wave_base = 0  # predictions stored before the current wave began
        self.figures: dict[str, int] = {
            "validator_sigkill": 0,
            "validator_sigterm": 0,
            "miner_sigkill": 0,
            "in_flight_at_validator_faults": 0,  # predicted by miners, not yet stored
            "unconfirmed_at_validator_faults": 0,  # stored, or not, but still pending at a miner
            "pending_at_miner_kills": 0,
            "validator_faults_mid_stream": 0,
            # stored by the validator, confirmation not yet recorded by the miner: the resend
            # must be answered from the validator's idempotency, not stored twice
            "stored_unconfirmed_at_validator_faults": 0,
            "stored_unconfirmed_at_miner_kills": 0,
        }

    # ---- processes -----------------------------------------------------------------------------

    @property
    def total_games(self) -> int:
        return self.games_per_wave * (self.wave + 1)

    def _write_games(self) -> None:
        # every wave lists the earlier waves' games too (same ids), plus new ones
        games = upcoming_games(self.total_games, prefix="crash")
        self.games_file.write_text(json.dumps(games), encoding="utf-8")

    def start_validator(self) -> None:
        self._write_games()
        self.starts += 1
        proc = CliProcess(
            [
                "validator", "--host", "127.0.0.1", "--port", str(self.port), "--db", str(self.vdb),
                "--hotkey-uri", "//Alice", "--games", str(self.games_file),
            ],
            self.tmp / f"validator-{self.starts}.stderr",
        )
        self.validator = proc
        url = proc.expect_prefix("listening on ")
        port = port_of(url)
        assert self.port in (0, port)
        self.port = port

    def start_miner(self, i: int, wait: bool = True) -> None:
        self.starts += 1
        proc = CliProcess(
            [
                "miner", "--validator", f"ws://127.0.0.1:{self.port}/ws@{ALICE}", "--db", str(self.mdbs[i]),
                "--hotkey-uri", f"//CrashMiner{i}", "--wager", "0.1", "--reconnect-max", RECONNECT_MAX,
            ],
            self.tmp / f"miner{i}-{self.starts}.stderr",
        )
        self.miners[i] = proc
        if wait:
            self.wait_miner(i)

    def wait_miner(self, i: int) -> None:
        proc = self.miners[i]
        assert proc is not None
        assert proc.expect_prefix("miner hotkey ") == self.hotkeys[i]

    def stop_all(self) -> None:
        for proc in [self.validator, *self.miners]:
            if proc is not None:
                proc.close()

    def all_stderr(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in sorted(self.tmp.glob("*.stderr")))

    # ---- database views ------------------------------------------------------------------------

    def stored(self) -> int:
        return _scalar(self.vdb, "SELECT count(*) FROM predictions") if self.vdb.exists() else 0

    def predicted(self, i: int) -> int:
        return _scalar(self.mdbs[i], "SELECT count(*) FROM predictions") if self.mdbs[i].exists() else 0

    def pending(self, i: int) -> int:
        if not self.mdbs[i].exists():
            return 0
        return _scalar(self.mdbs[i], "SELECT count(*) FROM deliveries WHERE state='pending'")

    def stored_for(self, i: int) -> int:
        if not self.vdb.exists():
            return 0
        return _scalar(self.vdb, "SELECT count(*) FROM predictions WHERE miner_hotkey=?", self.hotkeys[i])

    def stored_but_pending(self, i: int) -> int:
        """Predictions the validator stored whose confirmation miner ``i`` has not recorded."""
        if not self.mdbs[i].exists():
            return 0
        pending = {r[0] for r in _query(self.mdbs[i], "SELECT prediction_id FROM deliveries WHERE state='pending'")}
        stored = {
            r[0] for r in _query(self.vdb, "SELECT prediction_id FROM predictions WHERE miner_hotkey=?", self.hotkeys[i])
        }
        return len(pending & stored)

    def in_flight(self) -> bool:
        """Some predictions are stored by the validator and their confirmations not yet recorded.

        The sharpest moment to kill: each resent prediction must be answered by the
        validator's idempotency rather than stored twice or refused.
        """
        return self.stored() > self.wave_base and any(
            self.stored_but_pending(i) > 0 for i in range(len(self.mdbs))
        )

    def settled(self) -> bool:
        return all(
            self.predicted(i) >= self.total_games and self.pending(i) == 0 for i in range(len(self.mdbs))
        )

    # ---- faults ----------------------------------------------------------------------------------

    def strike(self, fault: Fault, victim: int = 0) -> None:
        """Wait until the current wave is being delivered, inject ``fault``, restart, next wave."""
        if fault == "miner-kill":
            # Strike while the victim's wave is in flight: once the validator has stored some
            # of it, freeze the miner (SIGSTOP) so that confirmations of what it already sent
            # pile up unread, let the validator store some more, then SIGKILL: its resends
            # are then partly of predictions the validator already stored.
            base = self.stored_for(victim)
            _poll(
                lambda: self.predicted(victim) >= self.total_games
                and (self.stored_for(victim) > base or self.pending(victim) == 0),
                SETTLE, f"miner {victim}'s wave to reach the validator", interval=0.001,
            )
            proc = self.miners[victim]
            assert proc is not None
            proc.proc.send_signal(signal.SIGSTOP)
            deadline = time.monotonic() + 1.0
            while self.pending(victim) and not self.stored_but_pending(victim) and time.monotonic() < deadline:
                time.sleep(0.005)
            proc.proc.kill()
            proc.proc.wait(timeout=10)
            proc.close()
            self.figures["miner_sigkill"] += 1
            self.figures["pending_at_miner_kills"] += self.pending(victim)
            self.figures["stored_unconfirmed_at_miner_kills"] += self.stored_but_pending(victim)
            self.start_miner(victim)
            return
        # strike while the wave is in flight (or, if it slipped through, once it is delivered)
        _poll(lambda: self.in_flight() or self.settled(), SETTLE, "the wave to start", interval=0.001)
        proc = self.validator
        assert proc is not None
        if fault == "validator-kill":
            proc.proc.kill()
            proc.proc.wait(timeout=10)
            self.figures["validator_sigkill"] += 1
        else:
            assert proc.signal(signal.SIGTERM) == 0, proc.stderr()
            self.figures["validator_sigterm"] += 1
        proc.close()
        made = sum(self.predicted(i) for i in range(len(self.mdbs)))
        unconfirmed = sum(self.pending(i) for i in range(len(self.mdbs)))
        self.figures["in_flight_at_validator_faults"] += made - self.stored()
        self.figures["unconfirmed_at_validator_faults"] += unconfirmed
        self.figures["validator_faults_mid_stream"] += unconfirmed > 0
        self.figures["stored_unconfirmed_at_validator_faults"] += sum(
            self.stored_but_pending(i) for i in range(len(self.mdbs))
        )
        self.wave_base = self.stored()
        self.wave += 1
        self.start_validator()

    # ---- the verdict ---------------------------------------------------------------------------

    def verify(self) -> dict[str, int]:
        """Everything confirmed exactly once; returns the figures."""
        miner_preds: dict[str, tuple[str, str, str]] = {}  # pid -> (miner hotkey, game, body)
        for i, path in enumerate(self.mdbs):
            rows = _query(path, "SELECT prediction_id, game_id, body FROM predictions")
            games = [g for _, g, _ in rows]
            assert len(games) == len(set(games)), f"miner {i} predicted a game twice"
            assert len(rows) == self.total_games, (i, len(rows), self.total_games)
            states = dict(_query(path, "SELECT state, count(*) FROM deliveries GROUP BY state"))
            assert states == {"confirmed": self.total_games}, (i, states)
            for pid, game_id, body in rows:
                assert pid not in miner_preds, f"prediction id {pid} made twice"
                miner_preds[pid] = (self.hotkeys[i], game_id, canonical(json.loads(body)))

        total, distinct = _query(self.vdb, "SELECT count(*), count(DISTINCT prediction_id) FROM predictions")[0]
        assert total == distinct, "duplicate prediction rows in the validator"
        twice = _query(
            self.vdb,
            "SELECT miner_hotkey, game_id, count(*) FROM predictions GROUP BY miner_hotkey, game_id "
            "HAVING count(*) > 1",
        )
        assert twice == [], f"a miner's game stored twice: {twice[:5]}"
        stored = {
            pid: (hotkey, game_id, body)
            for pid, hotkey, game_id, body in _query(
                self.vdb, "SELECT prediction_id, miner_hotkey, game_id, body FROM predictions"
            )
        }
        lost = set(miner_preds) - set(stored)
        extra = set(stored) - set(miner_preds)
        assert not lost, f"{len(lost)} predictions lost"
        assert not extra, f"{len(extra)} predictions stored that no miner made"
        assert stored == miner_preds
        assert _scalar(self.vdb, "SELECT count(*) FROM rejections") == 0
        assert "Traceback" not in self.all_stderr(), self.all_stderr()[-3000:]
        return {**self.figures, "predictions_made": len(miner_preds), "stored": total, "lost": 0, "duplicates": 0}


@contextmanager
def cluster(tmp: Path, miners: int, games_per_wave: int) -> Iterator[Cluster]:
    c = Cluster(tmp, miners, games_per_wave)
    try:
        c.start_validator()
        for i in range(miners):
            c.start_miner(i, wait=False)
        for i in range(miners):
            c.wait_miner(i)
        yield c
    finally:
        c.stop_all()


def run_faults(tmp: Path, miners: int, games_per_wave: int, faults: list[tuple[Fault, int]]) -> dict[str, int]:
    with cluster(tmp, miners, games_per_wave) as c:
        for fault, victim in faults:
            c.strike(fault, victim)
        _poll(c.settled, SETTLE, "every prediction confirmed", interval=0.05)
        # stop gracefully, then judge the databases at rest
        procs = [c.validator, *c.miners]
        for proc in procs:
            assert proc is not None
            proc.proc.send_signal(signal.SIGTERM)
        for proc in procs:
            assert proc is not None
            assert proc.proc.wait(timeout=10) == 0, proc.stderr()
        figures = c.verify()
    print(figures)
    return figures


# ---- short forms: in `make test` --------------------------------------------------------------


def test_crash_validator_sigkill_short(tmp_path: Path) -> None:
    figures = run_faults(tmp_path, 2, 150, [("validator-kill", 0)])
    assert figures["validator_sigkill"] == 1
    assert figures["predictions_made"] == 2 * 300


def test_crash_miner_sigkill_short(tmp_path: Path) -> None:
    # miner 1 is killed in wave 1, frozen while the validator stores part of its batch
    figures = run_faults(tmp_path, 2, 150, [("validator-kill", 0), ("miner-kill", 1)])
    assert figures["miner_sigkill"] == 1
    assert figures["predictions_made"] == 2 * 300


def test_crash_validator_sigterm_short(tmp_path: Path) -> None:
    figures = run_faults(tmp_path, 2, 150, [("validator-term", 0)])
    assert figures["validator_sigterm"] == 1
    assert figures["predictions_made"] == 2 * 300


# ---- long form: `make test-reliability` ---------------------------------------------------------


@pytest.mark.reliability
def test_crash_long_eight_miners(tmp_path: Path) -> None:
    """8 miners; 4 rounds of: SIGKILL the validator, SIGKILL a miner, SIGTERM the validator."""
    miners, per_wave = 8, 150
    faults: list[tuple[Fault, int]] = []
    for r in range(4):
        faults += [("validator-kill", 0), ("miner-kill", (2 * r) % miners), ("validator-term", 0),
                   ("miner-kill", (2 * r + 1) % miners)]
    figures = run_faults(tmp_path, miners, per_wave, faults)
    waves = 1 + 8  # one per validator (re)start
    assert figures["validator_sigkill"] == 4
    assert figures["validator_sigterm"] == 4
    assert figures["miner_sigkill"] == 8
    assert figures["predictions_made"] == miners * per_wave * waves
    # the faults did land mid-stream: something was in flight at some of them
    assert figures["validator_faults_mid_stream"] > 0
    assert figures["pending_at_miner_kills"] > 0
    # some resends were of predictions already stored: idempotency, not a second row, answered them
    assert figures["stored_unconfirmed_at_validator_faults"] + figures["stored_unconfirmed_at_miner_kills"] > 0
