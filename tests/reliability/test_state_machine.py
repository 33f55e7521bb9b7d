"""Stateful property test: a validator and three miners through sends, duplicates,
disconnects, reconnects, restarts and clock jumps (issue 6, item 4).

A hypothesis ``RuleBasedStateMachine`` drives one trio run per example. Trio runs
on a worker thread under a ``MockClock``; every rule is one command handed to it
with ``trio.from_thread.run``. While a command runs the clock autojumps (after a
short real-time threshold, so a SQLite call on a worker thread does not let
minutes of virtual time pass); between commands the clock is frozen.

Everything runs over in-memory stream pairs: a ``Net`` dials the validator's
``handle_stream`` in the validator's own nursery, so a validator restart (a new
``ValidatorNode`` on the same database file) ends every connection it served.

Invariants:
- no prediction is stored twice by the validator, and no two stored rows carry the
  same prediction (checked after every step);
- every prediction a miner holds as confirmed is stored by the validator, from that
  miner, with the same content (after every step);
- once the links are up and have settled, nothing is pending in any miner, every
  prediction made is confirmed (valid) or rejected (unknown game), and the validator
  stores exactly what the miners hold as confirmed (teardown);
- no task outlives its connection: with the validator gone the miners are back to
  their idle task count, and with everything stopped the run is back to its
  baseline (teardown);
- nothing is logged at ERROR by bettensor_ws.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import sqlite3
import tempfile
import threading
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trio
import trio.testing
from bittensor_wallet import Keypair
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from bettensor_ws import PredictionMessage
from bettensor_ws.node import MinerNode, ValidatorNode
from bettensor_ws.node.store import canonical
from tests.helpers import count_tasks, make_game

T = TypeVar("T")

N_MINERS = 3
URL = "ws://validator/ws"
AUTOJUMP_THRESHOLD = 0.005  # real seconds all tasks must sit blocked before the clock jumps
COMMAND_LIMIT = 3600.0  # virtual seconds any one command may take
SETTLE_LIMIT = 1200.0  # virtual seconds the links get to deliver everything at teardown

_KEYS: dict[str, Keypair] = {}


def key(uri: str) -> Keypair:
    if uri not in _KEYS:
        _KEYS[uri] = Keypair.create_from_uri(uri)
    return _KEYS[uri]


def make_prediction(game: dict[str, Any], uid: int) -> dict[str, Any]:
    favourite = game["team_a"] if game["team_a_odds"] < game["team_b_odds"] else game["team_b"]
    return {
        "prediction_id": str(uuid.uuid4()),
        "game_id": game["game_id"],
        "miner_uid": str(uid),
        "prediction_date": datetime.now(UTC).isoformat(),
        "predicted_outcome": favourite,
        "predicted_odds": min(game["team_a_odds"], game["team_b_odds"]),
        "team_a": game["team_a"],
        "team_b": game["team_b"],
        "wager": 1.0,
        "team_a_odds": game["team_a_odds"],
        "team_b_odds": game["team_b_odds"],
        "tie_odds": game["tie_odds"],
        "model_name": "state-machine",
        "confidence_score": 0.5,
        "outcome": "Unfinished",
        "payout": 0.0,
    }


def _rows(db: sqlite3.Connection, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    return [tuple(r) for r in db.execute(sql, args)]


class ErrorLog(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(self.format(record))


# ---- trio on a worker thread, one command at a time ------------------------------------------


class TrioThread:
    """One ``trio.run`` under a MockClock; ``call`` runs an async function in it and returns."""

    def __init__(self) -> None:
        self.clock = trio.testing.MockClock(rate=0, autojump_threshold=math.inf)
        self._ready = threading.Event()
        self.failure: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True, name="trio-state-machine")
        self._thread.start()
        self._ready.wait()
        if self.failure is not None:
            raise self.failure

    def _run(self) -> None:
        try:
            trio.run(self._main, clock=self.clock)
        except BaseException as exc:  # reported by call() / stop()
            self.failure = exc
        finally:
            self._ready.set()

    async def _main(self) -> None:
        self.token = trio.lowlevel.current_trio_token()
        self._stop = trio.Event()
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            self._ready.set()
            await self._stop.wait()
            nursery.cancel_scope.cancel()

    def call(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        async def command() -> T:
            self.clock.autojump_threshold = AUTOJUMP_THRESHOLD
            try:
                with trio.fail_after(COMMAND_LIMIT):
                    return await fn(*args)
            finally:
                self.clock.autojump_threshold = math.inf

        if self.failure is not None:
            raise AssertionError("the trio run failed") from self.failure
        try:
            return trio.from_thread.run(command, trio_token=self.token)
        except trio.RunFinishedError:
            self._thread.join()
            raise AssertionError("the trio run failed") from self.failure

    def stop(self) -> None:
        if self._thread.is_alive():
            try:
                trio.from_thread.run_sync(self._stop.set, trio_token=self.token)
            except trio.RunFinishedError:
                pass
            self._thread.join(30)
        if self.failure is not None:
            raise AssertionError("the trio run failed") from self.failure


# ---- the network and the hosts ---------------------------------------------------------------


class Host:
    """Runs one node in its own cancel scope inside the test nursery; ``stop`` waits it out."""

    def __init__(self) -> None:
        self.scope = trio.CancelScope()
        self.done = trio.Event()

    async def start(self, nursery: trio.Nursery, body: Callable[[trio.Nursery], Awaitable[None]]) -> None:
        async def host(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            try:
                with self.scope:
                    async with trio.open_nursery() as inner:
                        await body(inner)
                        task_status.started()
                        await trio.sleep_forever()
            finally:
                self.done.set()

        await nursery.start(host)

    async def stop(self) -> None:
        self.scope.cancel()
        await self.done.wait()


class Net:
    """Dials the validator in memory; a dial while it is down is refused."""

    def __init__(self) -> None:
        self.validator: ValidatorNode | None = None
        self.nursery: trio.Nursery | None = None
        self.streams: dict[int, trio.abc.Stream] = {}

    def opener(self, index: int) -> Callable[[str], Awaitable[trio.abc.Stream]]:
        async def open_stream(url: str) -> trio.abc.Stream:
            await trio.lowlevel.checkpoint()
            if self.validator is None or self.nursery is None:
                raise OSError(f"connection refused: {url}")
            client, server = trio.testing.memory_stream_pair()
            self.nursery.start_soon(self.validator.handle_stream, server)
            self.streams[index] = client
            return client

        return open_stream


# ---- the machine -----------------------------------------------------------------------------


class LinkMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp(prefix="bws-sm-"))
        self.errors = ErrorLog()
        logging.getLogger("bettensor_ws").addHandler(self.errors)
        self.trio = TrioThread()
        self.net = Net()
        self.validator_key = key("//Alice")
        self.miner_keys = [key(f"//SMMiner{i}") for i in range(N_MINERS)]
        self.validator: ValidatorNode | None = None
        self.validator_host: Host | None = None
        self.miners: list[MinerNode | None] = [None] * N_MINERS
        self.miner_hosts: list[Host | None] = [None] * N_MINERS
        self.games: list[dict[str, Any]] = []
        # what the test itself made each miner predict: pid -> (body, expected final state)
        self.made: list[dict[str, tuple[dict[str, Any], str]]] = [{} for _ in range(N_MINERS)]
        self.baseline = 0
        self.idle = 0
        self.torn_down = False

    # -- node lifecycle (inside trio) --

    async def _start_validator(self) -> None:
        validator = ValidatorNode(self.validator_key, self.tmp / "validator.db")
        host = Host()

        async def body(nursery: trio.Nursery) -> None:
            # what serve() does besides listening: the group committer beside the connections
            await nursery.start(validator._run_committer)
            self.net.validator, self.net.nursery = validator, nursery

        await host.start(self.trio.nursery, body)
        self.validator, self.validator_host = validator, host

    async def _stop_validator(self) -> None:
        assert self.validator is not None and self.validator_host is not None
        self.net.validator = self.net.nursery = None
        await self.validator_host.stop()
        self.validator.close()
        self.validator = self.validator_host = None

    async def _start_miner(self, i: int) -> None:
        miner = MinerNode(
            self.miner_keys[i],
            [(self.validator_key.ss58_address, URL)],
            self.tmp / f"miner{i}.db",
            reconnect_base_interval=1.0,
            max_reconnect_interval=5.0,
            stream_opener=self.net.opener(i),
        )
        host = Host()

        async def body(nursery: trio.Nursery) -> None:
            await nursery.start(miner.run)

        await host.start(self.trio.nursery, body)
        self.miners[i], self.miner_hosts[i] = miner, host

    async def _stop_miner(self, i: int) -> None:
        miner, host = self.miners[i], self.miner_hosts[i]
        assert miner is not None and host is not None
        await host.stop()
        miner.close()
        self.miners[i] = self.miner_hosts[i] = None

    async def _setup(self) -> None:
        await trio.testing.wait_all_tasks_blocked()
        self.baseline = count_tasks()
        for i in range(N_MINERS):  # the validator is not up yet: every miner is backing off
            await self._start_miner(i)
        await trio.sleep(0.1)
        await trio.testing.wait_all_tasks_blocked()
        self.idle = count_tasks()
        await self._start_validator()
        await self._wait_connected()

    async def _wait_connected(self) -> None:
        assert self.validator is not None
        for miner in self.miners:
            if miner is not None:
                await miner.wait_connected(self.validator.hotkey)

    @initialize()
    def setup(self) -> None:
        self.trio.call(self._setup)

    # -- rules --

    @rule()
    def add_game(self) -> None:
        """A new upcoming game: every connected miner predicts it (the strategy)."""
        game = make_game(len(self.games))
        self.games.append(game)

        async def go() -> None:
            if self.validator is not None:
                await self.validator.update_games([game])
            else:  # stored for when it is back: it sends upcoming games on connect
                store = ValidatorNode(self.validator_key, self.tmp / "validator.db")
                try:
                    store.store.upsert_games([game])
                finally:
                    store.close()

        self.trio.call(go)

    @precondition(lambda self: bool(self.games))
    @rule(miner=st.integers(0, N_MINERS - 1), game=st.integers(0, 1000), valid=st.booleans())
    def predict(self, miner: int, game: int, valid: bool) -> None:
        """The miner makes a prediction of its own (on an unknown game when not ``valid``)."""
        node = self.miners[miner]
        if node is None:
            return
        chosen = dict(self.games[game % len(self.games)])
        if not valid:
            chosen["game_id"] = f"unknown-{uuid.uuid4().hex[:8]}"
        prediction = make_prediction(chosen, miner)
        self.made[miner][prediction["prediction_id"]] = (prediction, "confirmed" if valid else "rejected")
        added = self.trio.call(node.submit_predictions, [prediction])
        assert added == [prediction["prediction_id"]]

    @precondition(lambda self: any(self.made))
    @rule(miner=st.integers(0, N_MINERS - 1), pick=st.integers(0, 1000), wire=st.booleans())
    def resend(self, miner: int, pick: int, wire: bool) -> None:
        """The same prediction again: through the outbox (a no-op) or straight on the wire."""
        node = self.miners[miner]
        if node is None or not self.made[miner]:
            return
        bodies = list(self.made[miner].values())
        prediction = bodies[pick % len(bodies)][0]
        if wire:
            message = PredictionMessage(sender=node.hotkey, data=dict(prediction))
            self.trio.call(node.send, message)
        else:
            assert self.trio.call(node.submit_predictions, [dict(prediction)]) == []

    @rule(miner=st.integers(0, N_MINERS - 1), side=st.sampled_from(["miner", "validator", "abort"]),
          code=st.sampled_from([1000, 1001, 1011, 4000]))
    def disconnect(self, miner: int, side: str, code: int) -> None:
        """Close one link: by the miner, by the validator, or by dropping the transport."""
        node = self.miners[miner]

        async def go() -> None:
            if node is None or self.validator is None:
                return
            if side == "miner":
                conn = node.connection(self.validator.hotkey)
            elif side == "validator":
                conn = self.validator.connection(node.hotkey)
            else:
                stream = self.net.streams.get(miner)
                if stream is not None:
                    await trio.aclose_forcefully(stream)
                return
            if conn is not None:
                conn.close(code, "test")
                await conn.closed.wait()

        self.trio.call(go)

    @rule(miner=st.integers(0, N_MINERS - 1))
    def restart_miner(self, miner: int) -> None:
        async def go() -> None:
            if self.miners[miner] is not None:
                await self._stop_miner(miner)
            await self._start_miner(miner)

        self.trio.call(go)

    @rule(down_for=st.sampled_from([0.0, 1.0, 30.0]))
    def restart_validator(self, down_for: float) -> None:
        async def go() -> None:
            if self.validator is not None:
                await self._stop_validator()
            await trio.sleep(down_for)
            await self._start_validator()

        self.trio.call(go)

    @rule(seconds=st.sampled_from([0.5, 5.0, 11.0, 61.0, 400.0]), jump=st.booleans())
    def time_passes(self, seconds: float, jump: bool) -> None:
        """Let the links run (``sleep``), or jump the clock at once past timers and timeouts."""

        async def go() -> None:
            if jump:
                self.trio.clock.jump(seconds)
                await trio.sleep(0.01)
            else:
                await trio.sleep(seconds)

        self.trio.call(go)

    # -- invariants --

    async def _validator_rows(self) -> list[tuple[Any, ...]]:
        # a reader of its own: the validator may be between restarts
        def read() -> list[tuple[Any, ...]]:
            db = sqlite3.connect(str(self.tmp / "validator.db"))
            try:
                return _rows(db, "SELECT prediction_id, miner_hotkey, body FROM predictions")
            finally:
                db.close()

        return await trio.to_thread.run_sync(read)

    async def _miner_deliveries(self, i: int) -> list[tuple[Any, ...]]:
        node = self.miners[i]
        if node is None:
            return []
        return await node.db.run(
            _rows, node.store.db,
            "SELECT p.prediction_id, p.body, d.state, d.reason FROM predictions p "
            "JOIN deliveries d USING (prediction_id) WHERE d.validator_hotkey=?",
            self.validator_key.ss58_address,
        )

    async def _snapshot(self) -> tuple[list[list[tuple[Any, ...]]], list[tuple[Any, ...]]]:
        # miners first: a miner records a confirmation only after the validator committed it
        deliveries = [await self._miner_deliveries(i) for i in range(N_MINERS)]
        return deliveries, await self._validator_rows()

    def _check_stored_once_and_confirmed_stored(
        self, deliveries: list[list[tuple[Any, ...]]], stored_rows: list[tuple[Any, ...]]
    ) -> dict[str, tuple[str, str]]:
        ids = [r[0] for r in stored_rows]
        assert len(ids) == len(set(ids)), "a prediction_id stored twice"
        bodies = [r[2] for r in stored_rows]
        assert len(bodies) == len(set(bodies)), "one prediction stored twice"
        stored = {pid: (miner, body) for pid, miner, body in stored_rows}
        for i, rows in enumerate(deliveries):
            for pid, body, state, _ in rows:
                if state == "confirmed":
                    assert pid in stored, f"miner {i} holds {pid} as confirmed; the validator lost it"
                    assert stored[pid] == (self.miner_keys[i].ss58_address, canonical(json.loads(body)))
        return stored

    @invariant()
    def stored_at_most_once_and_every_confirmed_stored(self) -> None:
        if self.torn_down or self.miners == [None] * N_MINERS:
            return
        deliveries, stored = self.trio.call(self._snapshot)
        self._check_stored_once_and_confirmed_stored(deliveries, stored)

    # -- teardown: bring everything up, settle, check, stop, count tasks --

    def _describe(self, i: int) -> str:
        miner, validator = self.miners[i], self.validator
        assert miner is not None and validator is not None
        conn = miner.connection(validator.hotkey)
        outbox = miner._outboxes.get(validator.hotkey)
        return (
            f"now={trio.current_time():.1f} miner connected={miner.connected_validators} "
            f"conn closed={conn.closed.is_set() if conn else None} last_error={miner.last_error} "
            f"stats={miner.stats()} outbox inflight={outbox.inflight if outbox else None} "
            f"validator connected={validator.connected_hotkeys} vstats={validator.stats()}"
        )

    async def _settle(self) -> None:
        if self.validator is None:
            await self._start_validator()
        for i in range(N_MINERS):
            if self.miners[i] is None:
                await self._start_miner(i)
        await self._wait_connected()

        game_ids = {g["game_id"] for g in self.games}

        async def everything_answered() -> bool:
            for i in range(N_MINERS):
                miner = self.miners[i]
                assert miner is not None
                # every game reaches every miner (on connect, at the latest), which predicts it
                if not game_ids <= await miner.db.run(miner.store.predicted_games):
                    return False
                if any(state == "pending" for _, _, state, _ in await self._miner_deliveries(i)):
                    return False
            return True

        with trio.move_on_after(SETTLE_LIMIT):
            while not await everything_answered():  # noqa: ASYNC110
                await trio.sleep(5.0)
        for i in range(N_MINERS):
            miner = self.miners[i]
            assert miner is not None
            missing = game_ids - await miner.db.run(miner.store.predicted_games)
            stored_games = {g["game_id"] for g in await miner.db.run(miner.store.games)}
            assert not missing, (
                f"miner {i} never predicted {sorted(missing)} (games it stored: "
                f"{sorted(missing & stored_games)}); {self._describe(i)}"
            )
        deliveries, stored_rows = await self._snapshot()
        stored = self._check_stored_once_and_confirmed_stored(deliveries, stored_rows)
        confirmed: dict[str, tuple[str, str]] = {}
        for i, rows in enumerate(deliveries):
            states = {pid: (state, reason) for pid, _, state, reason in rows}
            pending = [pid for pid, (state, _) in states.items() if state == "pending"]
            assert not pending, f"miner {i}: {len(pending)} predictions never answered; {self._describe(i)}"
            for pid, (_, expected) in self.made[i].items():
                assert pid in states, f"miner {i} lost its prediction {pid}"
                assert states[pid][0] == expected, (pid, states[pid], expected)
            for pid, body, state, reason in rows:
                if state == "confirmed":
                    confirmed[pid] = (self.miner_keys[i].ss58_address, canonical(json.loads(body)))
                else:
                    assert reason == "game unknown", (pid, reason)
        assert stored == confirmed, "the validator stores what the miners hold as confirmed, no more"

        # no task outlives its connection: validator gone -> miners idle; all gone -> baseline
        await self._stop_validator()
        await trio.sleep(1.0)
        await trio.testing.wait_all_tasks_blocked()
        assert all(m is not None and m.connected_validators == [] for m in self.miners)
        assert count_tasks() == self.idle, "tasks left over from closed connections"
        for i in range(N_MINERS):
            await self._stop_miner(i)
        await trio.testing.wait_all_tasks_blocked()
        assert count_tasks() == self.baseline

    def teardown(self) -> None:
        try:
            if self.trio.failure is None and not self.torn_down:
                self.torn_down = True
                self.trio.call(self._settle)
            assert self.errors.records == [], self.errors.records
        finally:
            self.torn_down = True
            logging.getLogger("bettensor_ws").removeHandler(self.errors)

            async def close_all() -> None:
                for i in range(N_MINERS):
                    if self.miners[i] is not None:
                        await self._stop_miner(i)
                if self.validator is not None:
                    await self._stop_validator()

            try:
                if self.trio.failure is None:
                    self.trio.call(close_all)
            finally:
                self.trio.stop()
                shutil.rmtree(self.tmp, ignore_errors=True)


def run_machine(max_examples: int, steps: int) -> None:
    run_state_machine_as_test(
        LinkMachine,
        settings=settings(
            max_examples=max_examples,
            stateful_step_count=steps,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        ),
    )


def test_link_state_machine() -> None:
    run_machine(max_examples=12, steps=15)


@pytest.mark.reliability
def test_link_state_machine_long() -> None:
    run_machine(max_examples=100, steps=30)


async def test_game_stored_but_not_predicted_is_predicted_on_resend(tmp_path: Path) -> None:
    """Found by the machine: a link that drops after the miner stored a game update but
    before it predicted on it must not leave that game unpredicted for ever (the resent
    update is "unchanged")."""
    game = make_game(0)
    net = Net()
    validator = ValidatorNode(key("//Alice"), tmp_path / "validator.db")
    miner = MinerNode(key("//SMMiner0"), [(validator.hotkey, URL)], tmp_path / "miner.db",
                      stream_opener=net.opener(0))
    try:
        validator.store.upsert_games([game])
        miner.store.upsert_games([game])  # stored by the update; the link dropped before predicting
        async with trio.open_nursery() as nursery:
            net.validator, net.nursery = validator, nursery
            await nursery.start(validator._run_committer)
            await nursery.start(miner.run)
            with trio.fail_after(20):  # real time: in memory this takes milliseconds
                while (await miner.db.run(miner.store.counts))["confirmed"] != 1:  # noqa: ASYNC110
                    await trio.sleep(0.02)
            assert await validator.db.run(validator.store.count_predictions) == 1
            nursery.cancel_scope.cancel()
    finally:
        validator.close()
        miner.close()
