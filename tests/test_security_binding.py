"""Issue 11, the three attacks: each test shows one no longer works.

1. **Prediction-id squatting.** Miner Bob serves validators A (//Alice) and B
   (//Charlie); A's operator also holds a registered miner key (//Mallory). She
   sends Bob's prediction ids to B first, half as exact copies, half with the
   other pick. Predictions are now keyed by (miner, id): Bob's own are still
   his, stored with his content, and answered success.
2. **A relayed Welcome and relayed confirmations.** An impostor at the address
   Bob dials for B keeps its own session with B as Mallory and passes B's
   signed Welcome (and confirmations) on to Bob. The Welcome names the miner
   and the auth nonce it answers, a confirmation names its miner: Bob refuses
   both, never lists the link, records nothing.
3. **Auth replay across validators.** An auth frame names the validator it is
   for (its audience, under the signature): one made for A opens nothing at B.

Runtime cases run over in-memory streams under the autojump clock; cases whose
subject is a node (ValidatorNode, MinerNode, with SQLite and worker threads)
run on the real clock, over loopback as ``tests/test_node.py`` does, with
every wait bounded by ``trio.fail_after``.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import orjson
import pytest
import trio
import trio.testing
import trio_websocket
from bittensor_wallet import Keypair
from trio_websocket import ConnectionClosed, WebSocketConnection

from bettensor_ws import (
    ConfirmationMessage,
    HeartbeatAckMessage,
    HeartbeatMessage,
    MinerWebSocketManager,
    PredictionMessage,
    ValidatorWebSocketManager,
    WebSocketMessage,
    WelcomeMessage,
    build_auth,
    decode,
    encode,
    sign,
    verify,
)
from bettensor_ws.link.connection import LinkConnection
from bettensor_ws.node import MinerNode, ValidatorNode
from bettensor_ws.node.cli import UsageError, build_parser
from bettensor_ws.node.store import ValidatorStore, canonical, connect, migrate
from bettensor_ws.protocol.auth import check_answer
from bettensor_ws.protocol.errors import HandshakeRefused
from bettensor_ws.protocol.identity import canonical_hotkey, encode_address, public_key
from bettensor_ws.protocol.link import (
    MINER_HOTKEY,
    ConnectionSettings,
    Deliver,
    Frame,
    LinkProtocol,
    Refuse,
    Role,
)
from bettensor_ws.protocol.refusals import RefusalKind
from bettensor_ws.protocol.replay import ReplayGuard
from bettensor_ws.protocol.stats import Stats
from tests.helpers import bare_refusal
from tests.test_node import WAIT, eventually, make_prediction, upcoming_games, validator_rows
from tests.test_runtime import (
    Net,
    Recorder,
    authenticate,
    expect_close,
    next_message,
    prediction,
    raw_client,
    refused,
    signed,
    wait_for,
)

MALLORY = Keypair.create_from_uri("//Mallory")
"""The miner key held by validator A's operator."""

ACCEPTED = ValidatorStore.ACCEPTED
REUSED = "prediction_id already used for another prediction"
WRONG_AUDIENCE = "auth frame addressed to another validator"
NO_AUDIENCE = "auth frame names no audience; this validator requires one"
MADE_FOR_ANOTHER = "welcome not made for this handshake: made for another miner"
ANSWERS_ANOTHER = "welcome not made for this handshake: it answers another auth frame"


# ---- helpers ---------------------------------------------------------------------------------


def opposite_pick(data: dict[str, Any]) -> dict[str, Any]:
    """The same prediction id on the same game, the other team (with its odds)."""
    if data["predicted_outcome"] == data["team_a"]:
        outcome, odds = data["team_b"], data["team_b_odds"]
    else:
        outcome, odds = data["team_a"], data["team_a_odds"]
    return {**data, "predicted_outcome": outcome, "predicted_odds": odds}


def squatted(bobs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """What Mallory sends: Bob's ids, the first half as exact copies, the rest with the other pick."""
    half = len(bobs) // 2
    return [dict(p) for p in bobs[:half]] + [opposite_pick(p) for p in bobs[half:]]


def bob_predictions(games: Sequence[dict[str, Any]], count: int = 20) -> list[dict[str, Any]]:
    return [make_prediction(f"bob-{i:02d}", games[i % len(games)]) for i in range(count)]


def no_strategy(games: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """A miner that predicts only what the test gives it."""
    return []


async def answers_until_close(ws: WebSocketConnection) -> tuple[list[str | bytes], int, str | None]:
    """Every frame the peer sent before it closed, and its close code and reason."""
    answers: list[str | bytes] = []
    with pytest.raises(ConnectionClosed) as caught:
        while True:
            answers.append(await ws.get_message())
    reason = caught.value.reason
    assert reason is not None
    return answers, reason.code, reason.reason


async def next_of(ws: WebSocketConnection, kind: type[WebSocketMessage]) -> WebSocketMessage:
    """The next message of type ``kind``, skipping heartbeats and game updates."""
    while True:
        message = await next_message(ws)
        if isinstance(message, kind):
            return message


async def delivery_counts(node: MinerNode, validator_hotkey: str) -> dict[str, int]:
    return await node.db.run(node.store.counts, validator_hotkey)


async def settled(node: MinerNode, validator_hotkey: str, confirmed: int) -> bool:
    counts = await delivery_counts(node, validator_hotkey)
    return counts == {"pending": 0, "confirmed": confirmed, "rejected": 0}


async def holds(value: object) -> bool:
    await trio.lowlevel.checkpoint()
    return bool(value)


def miner_link(
    *, bound: bool, signer: Keypair, validator: Keypair, stats: Stats | None = None
) -> LinkProtocol:
    """The miner side of a link to ``validator``, handling confirmations."""
    return LinkProtocol(
        role=Role.MINER,
        signer=signer,
        peer_hotkey=canonical_hotkey(validator.ss58_address) or "",
        settings=ConnectionSettings(),
        guard=ReplayGuard(),
        stats=stats or Stats(),
        now=0.0,
        handled=frozenset({"confirmation"}),
        bound=bound,
    )


def validator_link(*, signer: Keypair, miner: str) -> LinkProtocol:
    """The validator side of a link to the miner ``miner``."""
    return LinkProtocol(
        role=Role.VALIDATOR,
        signer=signer,
        peer_hotkey=miner,
        settings=ConnectionSettings(),
        guard=ReplayGuard(),
        stats=Stats(),
        now=0.0,
        handled=frozenset({"prediction"}),
    )


def confirmation(**extra: Any) -> ConfirmationMessage:
    return ConfirmationMessage(
        sender="", data={"status": "success", "prediction_id": "bob-00", "message": ACCEPTED, **extra}
    )


# ---- 1. prediction-id squatting ----------------------------------------------------------------


async def test_squatted_ids_do_not_take_bobs_predictions_end_to_end(
    alice: Keypair, bob: Keypair, charlie: Keypair, tmp_path: Path
) -> None:
    """Scenario 1, end to end over loopback: ValidatorNodes A and B, Bob a MinerNode.

    Bob delivers 20 predictions to A; B does not admit him yet. Mallory (A's
    operator) reads Bob's ids from A's database and sends them to B first: 10
    exact copies, 10 with the other pick. Then B admits Bob, whose outbox sends
    his 20. On the old code (one row per prediction_id) Bob's copies were
    answered from Mallory's rows and his other 10 refused as "prediction_id
    already used"; now each miner's ids are its own.
    """
    games = upcoming_games(5, prefix="squat")
    validator_a = ValidatorNode(alice, tmp_path / "a.db")
    validator_b = ValidatorNode(charlie, tmp_path / "b.db", [MALLORY.ss58_address])
    for node in (validator_a, validator_b):
        node.store.upsert_games(games)
    bobs = bob_predictions(games)
    bob_ids = [p["prediction_id"] for p in bobs]
    bob_node: MinerNode | None = None
    try:
        async with trio.open_nursery() as nursery:
            port_a = await nursery.start(validator_a.serve)
            port_b = await nursery.start(validator_b.serve)
            bob_node = MinerNode(
                bob,
                [
                    (validator_a.hotkey, f"ws://127.0.0.1:{port_a}/ws"),
                    (validator_b.hotkey, f"ws://127.0.0.1:{port_b}/ws"),
                ],
                tmp_path / "bob.db",
                strategy=no_strategy,
                reconnect_base_interval=0.05,
                max_reconnect_interval=0.2,
            )
            seen_by_bob: list[tuple[str, ConfirmationMessage]] = []
            record_results = bob_node.handle_confirmation

            async def bob_spy(websocket: Any, message: WebSocketMessage) -> None:
                assert isinstance(message, ConfirmationMessage)
                seen_by_bob.append((websocket.hotkey, message))
                await record_results(websocket, message)

            bob_node.register_handler("confirmation", bob_spy)
            assert await bob_node.submit_predictions(bobs) == bob_ids
            await nursery.start(bob_node.run)

            # Bob's 20 reach A; B refuses him for now, so they stay pending there
            await eventually(lambda: settled(bob_node, validator_a.hotkey, 20), what="Bob's 20 at A")
            await eventually(
                lambda: holds(
                    bob_node.last_error.get(validator_b.hotkey)
                    == "validator refused auth: hotkey not registered"
                ),
                what="B refusing Bob",
            )
            assert (await delivery_counts(bob_node, validator_b.hotkey))["pending"] == 20

            # Mallory, A's operator, reads Bob's predictions from A's database ...
            rows = await validator_rows(
                validator_a,
                "SELECT prediction_id, body FROM predictions WHERE miner_hotkey=? ORDER BY prediction_id",
                bob.ss58_address,
            )
            assert [pid for pid, _ in rows] == bob_ids
            forged = squatted([json.loads(body) for _, body in rows])
            assert [canonical(p) for p in forged[:10]] == [canonical(p) for p in bobs[:10]]
            assert all(f["predicted_outcome"] != b["predicted_outcome"] for f, b in zip(forged[10:], bobs[10:], strict=True))

            # ... and sends them to B first, as her own
            mallory = MinerWebSocketManager(
                MALLORY, [(validator_b.hotkey, f"ws://127.0.0.1:{port_b}/ws")], reconnect_base_interval=0.05
            )
            seen_by_mallory: list[ConfirmationMessage] = []

            async def mallory_confirmation(websocket: Any, message: WebSocketMessage) -> None:
                assert isinstance(message, ConfirmationMessage)
                seen_by_mallory.append(message)

            async def ignore(websocket: Any, message: WebSocketMessage) -> None:
                await trio.lowlevel.checkpoint()

            mallory.register_handler("confirmation", mallory_confirmation)
            mallory.register_handler("game_update", ignore)
            await nursery.start(mallory.run)
            with trio.fail_after(WAIT):
                await mallory.wait_connected(validator_b.hotkey)
            for data in forged:
                sent = await mallory.send(
                    PredictionMessage(sender=MALLORY.ss58_address, data=data), validator_b.hotkey
                )
                assert sent == [validator_b.hotkey]
            with trio.fail_after(WAIT):
                await wait_for(lambda: len(seen_by_mallory) >= 20)
            # her own predictions, answered to her alone (single confirmations: no batch feature)
            assert {m.confirmation.prediction_id for m in seen_by_mallory} == set(bob_ids)
            for message in seen_by_mallory:
                assert not message.is_batch
                assert message.data[MINER_HOTKEY] == MALLORY.ss58_address
                assert (message.confirmation.status, message.confirmation.message) == ("success", ACCEPTED)

            # B admits Bob: his outbox delivers his 20
            assert validator_b.refresh_metagraph([MALLORY.ss58_address, bob.ss58_address]) == []
            await eventually(lambda: settled(bob_node, validator_b.hotkey, 20), what="Bob's 20 at B")

            # every answer Bob saw from B names Bob and says success, none refuses
            from_b = [m for hotkey, m in seen_by_bob if hotkey == validator_b.hotkey]
            assert from_b
            answers = {r.prediction_id: (r.status, r.message) for m in from_b for r in m.results}
            assert answers == dict.fromkeys(bob_ids, ("success", ACCEPTED))
            assert all(m.data[MINER_HOTKEY] == bob.ss58_address for m in from_b)
            assert all(m.is_batch for m in from_b)  # Bob and B both offer batches
            assert await bob_node.db.run(bob_node.store.latest_rejections) == []

            # B's store: Bob's rows under Bob with Bob's content, Mallory's under Mallory
            store = validator_b.store
            for mine, hers in zip(bobs, forged, strict=True):
                pid = mine["prediction_id"]
                row = await validator_b.db.run(store.prediction, pid, bob.ss58_address)
                assert row is not None, pid
                assert (row["miner_hotkey"], row["body"], row["status"]) == (
                    bob.ss58_address, canonical(mine), "success"
                )
                assert row["predicted_outcome"] == mine["predicted_outcome"]
                theirs = await validator_b.db.run(store.prediction, pid, MALLORY.ss58_address)
                assert theirs is not None, pid
                assert (theirs["miner_hotkey"], theirs["body"]) == (MALLORY.ss58_address, canonical(hers))
            assert sorted(await validator_b.db.run(store.per_miner)) == sorted(
                [(bob.ss58_address, 20, 20.0), (MALLORY.ss58_address, 20, 20.0)]
            )
            assert await validator_rows(validator_b, "SELECT * FROM rejections") == []
            # B refused Bob only while he was not registered, never a frame of his
            assert set(validator_b.stats()["rejections"]) <= {"hotkey not registered"}
            nursery.cancel_scope.cancel()
    finally:
        for closing in (validator_a, validator_b, bob_node):
            if closing is not None:
                closing.close()


def test_store_keeps_each_miners_prediction_ids_apart(bob: Keypair, tmp_path: Path) -> None:
    """Scenario 1 at the store: Mallory's 20 (10 copies, 10 other picks) first, then Bob's 20.

    Keyed by (miner_hotkey, prediction_id): Bob's are all accepted and stored
    under him with his content; Mallory's rows are hers and unchanged.
    Idempotency still holds per miner (a resend gets the first answer; Bob's
    own id with other content is "already used").
    """
    store = ValidatorStore(tmp_path / "validator.db")
    try:
        games = upcoming_games(5, prefix="store")
        store.upsert_games(games)
        bobs = bob_predictions(games)
        forged = squatted(bobs)
        mallory, owner = MALLORY.ss58_address, bob.ss58_address

        first = store.submit(mallory, forged)
        assert [(r["prediction_id"], r["status"]) for r in first] == [
            (p["prediction_id"], "success") for p in forged
        ]
        answers = store.submit(owner, bobs)
        assert [(r["prediction_id"], r["status"], r["message"]) for r in answers] == [
            (p["prediction_id"], "success", ACCEPTED) for p in bobs
        ]
        for mine, hers in zip(bobs, forged, strict=True):
            pid = mine["prediction_id"]
            row = store.prediction(pid, owner)
            assert row is not None and (row["miner_hotkey"], row["body"]) == (owner, canonical(mine))
            theirs = store.prediction(pid, mallory)
            assert theirs is not None and (theirs["miner_hotkey"], theirs["body"]) == (mallory, canonical(hers))
        assert store.count_predictions() == 40
        assert store.per_miner() == sorted([(owner, 20, 20.0), (mallory, 20, 20.0)])
        assert store.db.execute("SELECT COUNT(*) FROM rejections").fetchone()[0] == 0

        # idempotent per miner: resends get the first answers and store nothing
        assert store.submit(owner, bobs) == answers
        assert store.submit(mallory, forged) == first
        assert store.count_predictions() == 40
        # Bob's own id with other content is still his reuse, refused
        assert store.submit(owner, [opposite_pick(bobs[0])]) == [
            {"prediction_id": bobs[0]["prediction_id"], "status": "error", "message": REUSED}
        ]
        row = store.prediction(bobs[0]["prediction_id"], owner)
        assert row is not None and row["body"] == canonical(bobs[0])
    finally:
        store.close()


def test_v3_database_migrates_to_per_miner_prediction_ids(bob: Keypair, tmp_path: Path) -> None:
    """Scenario 1, an existing validator: a schema-3 database (prediction_id the only key).

    Opened by ValidatorStore it becomes version 4 with every row intact, keyed by
    (miner_hotkey, prediction_id): the migrated answers still hold for their
    owner, and another miner may now store the same prediction_id.
    """
    path = tmp_path / "v3.db"
    game = upcoming_games(1, prefix="mig")[0]
    ghost = {**upcoming_games(1, prefix="ghost")[0], "game_id": "ghost-game"}
    kept = [make_prediction(f"old-{i}", game) for i in range(2)]
    refused_data = make_prediction("old-bad", ghost)
    received = "2024-05-01T12:00:00+00:00"
    owner = bob.ss58_address

    db = connect(path)
    try:
        assert migrate(db, ValidatorStore.migrations[:3]) == 3
        assert db.execute("PRAGMA user_version").fetchone()[0] == 3
        db.execute("BEGIN IMMEDIATE")
        db.execute(
            "INSERT INTO games (game_id, team_a, team_b, sport, league, create_date, last_update_date, "
            "event_start_date, active, outcome, team_a_odds, team_b_odds, tie_odds, can_tie) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (game["game_id"], game["team_a"], game["team_b"], game["sport"], game["league"],
             game["create_date"], game["last_update_date"], game["event_start_date"], 1,
             game["outcome"], game["team_a_odds"], game["team_b_odds"], game["tie_odds"],
             int(game["can_tie"])),
        )
        for data in kept:
            db.execute(
                "INSERT INTO predictions (prediction_id, miner_hotkey, game_id, wager, predicted_outcome, "
                "body, received_at, day, status, message) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (data["prediction_id"], owner, data["game_id"], data["wager"], data["predicted_outcome"],
                 canonical(data), received, received[:10], "success", ACCEPTED),
            )
        db.execute(
            "INSERT INTO rejections (prediction_id, miner_hotkey, body, message, received_at) "
            "VALUES (?, ?, ?, ?, ?)",
            ("old-bad", owner, canonical(refused_data), "game unknown", received),
        )
        db.execute("COMMIT")
        before = {
            table: [dict(r) for r in db.execute(f"SELECT * FROM {table} ORDER BY prediction_id")]
            for table in ("predictions", "rejections")
        }
    finally:
        db.close()
    assert len(before["predictions"]) == 2 and len(before["rejections"]) == 1

    store = ValidatorStore(path)
    try:
        assert store.version == len(ValidatorStore.migrations) == 5
        assert store.db.execute("PRAGMA user_version").fetchone()[0] == 5
        after = {
            table: [dict(r) for r in store.db.execute(f"SELECT * FROM {table} ORDER BY prediction_id")]
            for table in ("predictions", "rejections")
        }
        for row in after["rejections"]:  # schema 5 adds the hash; old rows keep the whole body
            assert row.pop("body_hash") is None
        assert after == before
        for table in ("predictions", "rejections"):
            key = sorted(
                (r["pk"], r["name"]) for r in store.db.execute(f"PRAGMA table_info({table})") if r["pk"]
            )
            assert [name for _, name in key] == ["miner_hotkey", "prediction_id"], table
        names = {r[0] for r in store.db.execute("SELECT name FROM sqlite_master")}
        assert {"predictions_miner_day", "seen_nonces"} <= names

        # the owner's migrated answers hold: a resend gets them, nothing is stored again
        assert store.submit(owner, [*kept, refused_data]) == [
            {"prediction_id": "old-0", "status": "success", "message": ACCEPTED},
            {"prediction_id": "old-1", "status": "success", "message": ACCEPTED},
            {"prediction_id": "old-bad", "status": "error", "message": "game unknown"},
        ]
        # the same ids are now another miner's to use
        other = [opposite_pick(kept[0]), make_prediction("old-bad", game)]
        assert [r["status"] for r in store.submit(MALLORY.ss58_address, other)] == ["success", "success"]
        theirs = store.prediction("old-0", MALLORY.ss58_address)
        assert theirs is not None and theirs["body"] == canonical(other[0])
        mine = store.prediction("old-0", owner)
        assert mine is not None and mine["body"] == canonical(kept[0]) and mine["received_at"] == received
        assert store.count_predictions() == 4
        with pytest.raises(sqlite3.IntegrityError):  # still one row per (miner, id)
            store.db.execute(
                "INSERT INTO predictions (prediction_id, miner_hotkey, game_id, wager, predicted_outcome, "
                "body, received_at) VALUES ('old-0', ?, 'g', 1.0, 'x', '{}', ?)",
                (owner, received),
            )
    finally:
        store.close()


# ---- 2. relay: a false confirmation ------------------------------------------------------------


async def test_relayed_welcome_is_refused_and_no_confirmation_recorded(
    bob: Keypair, charlie: Keypair, autojump_clock: Any
) -> None:
    """Scenario 2 at runtime: an impostor answers Bob's dials for B with B's real Welcome
    made for Mallory, then B's real confirmation of Mallory's prediction.

    Before the binding, both were signed by B and Bob took them: a listed link
    and a recorded confirmation. Now the Welcome names Mallory and Mallory's
    auth nonce, so Bob refuses it ("welcome not made for this handshake"),
    lists nothing and reads no further frame, on every retry.
    """
    validator_b = ValidatorWebSocketManager(charlie)
    validator_b.register_handler("prediction", Recorder())
    bob_auths: list[dict[str, Any]] = []
    relayed_welcomes: list[WelcomeMessage] = []
    relayed_confirmations: list[ConfirmationMessage] = []
    bob_closes: list[tuple[int, str | None]] = []

    async def impostor(stream: trio.abc.Stream) -> None:
        async with trio.open_nursery() as nursery:
            request = await trio_websocket.wrap_server_stream(nursery, stream)
            to_bob = await request.accept()
            bob_auths.append(orjson.loads(await to_bob.get_message()))
            async with raw_client(validator_b) as to_b:  # its own session with B, as Mallory
                await to_b.send_message(json.dumps(build_auth(MALLORY, audience=validator_b.hotkey)))
                welcome_raw = await to_b.get_message()
                welcome = decode(welcome_raw)
                assert isinstance(welcome, WelcomeMessage)
                relayed_welcomes.append(welcome)
                await to_b.send_message(signed(prediction(MALLORY, f"relay-{len(bob_auths)}"), MALLORY))
                answer = await next_of(to_b, ConfirmationMessage)
                assert isinstance(answer, ConfirmationMessage)
                relayed_confirmations.append(answer)
                with contextlib.suppress(ConnectionClosed):
                    await to_bob.send_message(welcome_raw)
                    await to_bob.send_message(encode(answer))
                bob_closes.append(await expect_close(to_bob))

    listed: list[str] = []
    recorded: list[WebSocketMessage] = []

    async def on_link(conn: LinkConnection) -> None:
        listed.append(conn.hotkey)
        await trio.lowlevel.checkpoint()

    async def on_confirmation(websocket: Any, message: WebSocketMessage) -> None:
        recorded.append(message)
        await trio.lowlevel.checkpoint()

    async with trio.open_nursery() as nursery:

        async def open_stream(url: str) -> trio.abc.Stream:
            client, server = trio.testing.memory_stream_pair()
            nursery.start_soon(impostor, server)
            return client

        miner = MinerWebSocketManager(
            bob, [(validator_b.hotkey, "ws://validator-b/ws")], stream_opener=open_stream
        )
        miner.on_connect(on_link)
        miner.register_handler("confirmation", on_confirmation)
        await nursery.start(miner.run)
        with trio.fail_after(300):
            await wait_for(lambda: len(bob_closes) >= 3)
            for _ in range(3):
                assert miner.connected_validators == []
                await trio.sleep(0.5)

        # the relay worked as far as B: real, signed, fresh, made for Mallory
        for auth, welcome, answer in zip(bob_auths, relayed_welcomes, relayed_confirmations, strict=False):
            assert auth["hotkey"] == bob.ss58_address and auth["audience"] == validator_b.hotkey
            assert verify(welcome) and welcome.sender == validator_b.hotkey
            assert welcome.data[MINER_HOTKEY] == MALLORY.ss58_address
            assert welcome.data["auth_nonce"] != auth["nonce"]
            assert verify(answer) and answer.sender == validator_b.hotkey
            assert answer.data[MINER_HOTKEY] == MALLORY.ss58_address
        # ... and no further: Bob refused each Welcome, listed nothing, recorded nothing
        assert set(bob_closes) == {(1008, MADE_FOR_ANOTHER)}
        assert miner.last_error[validator_b.hotkey] == MADE_FOR_ANOTHER
        assert miner.connected_validators == []
        assert listed == [] and recorded == []
        stats = miner.stats()
        assert stats["connections_total"] == 0
        assert stats["frames_in"] == {}
        assert stats["rejections"].get("wrong session", 0) >= 3
        nursery.cancel_scope.cancel()


@pytest.mark.parametrize("bound", [False, True], ids=["unbound", "bound"])
def test_miner_link_refuses_a_confirmation_naming_another_miner(
    bob: Keypair, charlie: Keypair, bound: bool
) -> None:
    """Scenario 2 at the protocol: B's genuine confirmation of Mallory's prediction,
    relayed to Bob, is refused (MISADDRESSED), never delivered, bound or not."""
    stats = Stats()
    link = miner_link(bound=bound, signer=bob, validator=charlie, stats=stats)
    for_mallory = validator_link(signer=charlie, miner=MALLORY.ss58_address)
    single = for_mallory.sign(confirmation())
    batched = for_mallory.sign(
        ConfirmationMessage(sender="", data={"results": [{"prediction_id": "bob-00", "status": "success"}]})
    )
    for frame in (single, batched):
        message = decode(frame.text)
        assert verify(message) and message.data[MINER_HOTKEY] == MALLORY.ss58_address
        verdict = link.receive(frame.text, now=1.0, wall=time.time())
        assert isinstance(verdict, Refuse), verdict
        assert verdict.refusal.kind is RefusalKind.MISADDRESSED
        assert verdict.refusal.text() == f"addressed to another miner: {MALLORY.ss58_address}"
        assert verdict.frame is None  # a miner answers no refusal
    assert dict(stats.rejections) == {"misaddressed": 2}
    assert "confirmation" not in stats.frames_in


def test_bound_miner_link_refuses_a_confirmation_naming_no_miner(bob: Keypair, charlie: Keypair) -> None:
    """Scenario 2: once B's Welcome named Bob (bound), a B-signed confirmation naming
    no miner could be anyone's, so it is refused; unbound (a reference validator,
    whose confirmations never name one) it is delivered."""
    nameless = Frame.of(sign(confirmation(), charlie))
    assert MINER_HOTKEY not in decode(nameless.text).data

    bound = miner_link(bound=True, signer=bob, validator=charlie)
    verdict = bound.receive(nameless.text, now=1.0, wall=time.time())
    assert isinstance(verdict, Refuse), verdict
    assert verdict.refusal.kind is RefusalKind.MISADDRESSED
    assert verdict.refusal.text() == "addressed to another miner: no miner named"

    unbound = miner_link(bound=False, signer=bob, validator=charlie)
    assert isinstance(unbound.receive(nameless.text, now=1.0, wall=time.time()), Deliver)


@pytest.mark.parametrize("bound", [False, True], ids=["unbound", "bound"])
def test_miner_link_delivers_a_confirmation_naming_itself(bob: Keypair, charlie: Keypair, bound: bool) -> None:
    """Scenario 2, the honest case: B's confirmation naming Bob (in any spelling of
    his key) is delivered to Bob's handlers."""
    link = miner_link(bound=bound, signer=bob, validator=charlie)
    own = validator_link(signer=charlie, miner=bob.ss58_address).sign(confirmation())
    verdict = link.receive(own.text, now=1.0, wall=time.time())
    assert isinstance(verdict, Deliver), verdict
    assert verdict.message.data[MINER_HOTKEY] == bob.ss58_address

    key = public_key(bob.ss58_address)
    assert key is not None
    format0 = encode_address(key, 0)
    assert format0 != bob.ss58_address
    other_spelling = Frame.of(sign(confirmation(**{MINER_HOTKEY: format0}), charlie))
    assert isinstance(link.receive(other_spelling.text, now=2.0, wall=time.time()), Deliver)


def test_validator_link_names_its_miner_in_every_confirmation(bob: Keypair, charlie: Keypair) -> None:
    """Scenario 2, the validator's half: whatever a handler puts there, a confirmation
    it signs names the link's miner (single and batched), under its signature."""
    link = validator_link(signer=charlie, miner=bob.ss58_address)
    bodies = [
        confirmation(),
        confirmation(**{MINER_HOTKEY: MALLORY.ss58_address}),  # a handler cannot misaddress it
        ConfirmationMessage(sender="", data={"results": [{"prediction_id": "bob-00", "status": "success"}]}),
    ]
    for body in bodies:
        message = decode(link.sign(body).text)
        assert isinstance(message, ConfirmationMessage) and verify(message)
        assert message.sender == charlie.ss58_address
        assert message.data[MINER_HOTKEY] == bob.ss58_address


@pytest.mark.parametrize("mode", ["single", "batch", "batch-feature"])
async def test_validator_node_confirmations_name_the_miner(
    bob: Keypair, charlie: Keypair, tmp_path: Path, mode: str
) -> None:
    """Scenario 2, through a ValidatorNode's real handler and LinkConnection: a single
    prediction, a batch to a miner without the batch feature, and a batch to one with
    it are each answered by a confirmation naming the miner (and the Welcome names
    the miner and echoes its auth nonce). Real clock: the node stores on a thread."""
    node = ValidatorNode(charlie, tmp_path / "validator.db")
    games = upcoming_games(2, prefix="named")
    node.store.upsert_games(games)
    predictions = [make_prediction(f"named-{i}", games[i % 2]) for i in range(3)]
    try:
        with trio.fail_after(WAIT):
            async with raw_client(node) as ws:
                auth = build_auth(bob, features=["batch"] if mode == "batch-feature" else None,
                                  audience=node.hotkey)
                await ws.send_message(json.dumps(auth))
                welcome = await next_message(ws)
                assert isinstance(welcome, WelcomeMessage) and verify(welcome)
                assert welcome.data[MINER_HOTKEY] == bob.ss58_address
                assert welcome.data["auth_nonce"] == auth["nonce"]
                data = predictions[0] if mode == "single" else {"predictions": predictions}
                await ws.send_message(signed(PredictionMessage(sender=bob.ss58_address, data=data), bob))
                answer = await next_of(ws, ConfirmationMessage)
                assert isinstance(answer, ConfirmationMessage) and verify(answer)
                assert answer.sender == charlie.ss58_address
                assert answer.data[MINER_HOTKEY] == bob.ss58_address
                assert answer.is_batch == (mode != "single")
                expected = predictions[:1] if mode == "single" else predictions
                assert [(r.prediction_id, r.status) for r in answer.results] == [
                    (p["prediction_id"], "success") for p in expected
                ]
    finally:
        node.close()


def test_check_answer_refuses_a_welcome_made_for_another_handshake(bob: Keypair, charlie: Keypair) -> None:
    """Scenario 2 at the handshake: a Welcome genuinely signed by B but made for
    another session (another miner, or echoing another auth nonce) is refused
    as WRONG_SESSION; one made for this handshake, or a reference Welcome naming
    no session, is accepted."""
    own_nonce = "bobs-auth-nonce"

    def welcome(**data: Any) -> str:
        body = {"message": "Connection established", "status": "success", **data}
        return encode(sign(WelcomeMessage(sender="", data=body), charlie))

    def check(raw: str) -> WelcomeMessage:
        return check_answer(
            raw, charlie.ss58_address, guard=ReplayGuard(), max_size=1 << 20,
            own_hotkey=bob.ss58_address, auth_nonce=own_nonce,
        )

    refused_cases = [
        (welcome(miner_hotkey=bob.ss58_address, auth_nonce="another-nonce"), ANSWERS_ANOTHER),
        (welcome(miner_hotkey=bob.ss58_address), ANSWERS_ANOTHER),
        (welcome(miner_hotkey=MALLORY.ss58_address, auth_nonce=own_nonce), MADE_FOR_ANOTHER),
        (welcome(miner_hotkey=MALLORY.ss58_address, auth_nonce="mallorys-nonce"), MADE_FOR_ANOTHER),
        (welcome(auth_nonce=own_nonce), MADE_FOR_ANOTHER),
    ]
    for raw, expected in refused_cases:
        with pytest.raises(HandshakeRefused) as caught:
            check(raw)
        assert str(caught.value) == expected
        assert caught.value.refusal.kind is RefusalKind.WRONG_SESSION
        assert caught.value.retry_after is None

    key = public_key(bob.ss58_address)
    assert key is not None
    accepted = [
        welcome(miner_hotkey=bob.ss58_address, auth_nonce=own_nonce),
        welcome(miner_hotkey=encode_address(key, 0), auth_nonce=own_nonce),
        welcome(),  # a reference validator names no session
    ]
    for raw in accepted:
        assert isinstance(check(raw), WelcomeMessage)


# ---- 3. auth replay across validators ----------------------------------------------------------


async def test_auth_frame_for_validator_a_is_refused_at_b(
    alice: Keypair, bob: Keypair, charlie: Keypair, autojump_clock: Any
) -> None:
    """Scenario 3: Bob's auth frame for A, sent to B while Bob is connected to B.

    Once any validator could replay a miner's auth frame at another one, and
    B would replace Bob's live link with the replayer's. Now B answers a bare
    refusal (signed, answering that frame) and closes 1008: no Welcome, and
    Bob's link is left alone and keeps working.
    """
    validator_b = ValidatorWebSocketManager(charlie)
    async with trio.open_nursery() as server:
        with trio.fail_after(60):
            async with raw_client(validator_b, server_nursery=server) as bob_ws:
                await bob_ws.send_message(json.dumps(build_auth(bob, audience=validator_b.hotkey)))
                assert isinstance(await next_message(bob_ws), WelcomeMessage)
                await wait_for(lambda: validator_b.connection(bob.ss58_address) is not None)
                before = validator_b.connection(bob.ss58_address)
                assert before is not None

                frame = build_auth(bob, audience=alice.ss58_address)
                async with raw_client(validator_b, server_nursery=server) as ws:
                    await ws.send_message(json.dumps(frame))
                    answers, code, reason = await answers_until_close(ws)
                assert len(answers) == 1  # the refusal alone: no Welcome
                answer = orjson.loads(answers[0])
                assert bare_refusal(answer, validator_b.hotkey) == {
                    "status": "error", "message": WRONG_AUDIENCE
                }
                assert answer["auth_nonce"] == frame["nonce"]
                assert (code, reason) == (1008, WRONG_AUDIENCE)

                assert validator_b.connection(bob.ss58_address) is before
                assert before.protocol.closing is None
                assert validator_b.connected_hotkeys == [bob.ss58_address]
                assert validator_b.guard.held_by(bob.ss58_address) == 1  # Bob's own auth only
                await bob_ws.send_message(signed(HeartbeatMessage(sender="", data={}), bob))
                assert isinstance(await next_of(bob_ws, HeartbeatAckMessage), HeartbeatAckMessage)

                stats = validator_b.stats()
                assert stats["rejections"] == {"wrong audience": 1}
                assert stats["frames_out"]["welcome"] == 1
                assert stats["connections_total"] == 1
        server.cancel_scope.cancel()


async def test_fourteen_captured_frames_for_a_open_nothing_at_b(
    alice: Keypair, bob: Keypair, charlie: Keypair, autojump_clock: Any
) -> None:
    """Scenario 3, replayed in bulk: 14 frames Bob used at A (each A accepted) are
    sent to B: 14 refusals, 0 Welcomes, 14 "wrong audience", and not one spends
    a slot of B's replay guard."""
    validator_a = ValidatorWebSocketManager(alice)
    validator_b = ValidatorWebSocketManager(charlie)
    captured: list[str] = []
    with trio.fail_after(600):
        for _ in range(14):
            frame = json.dumps(build_auth(bob, audience=validator_a.hotkey))
            async with raw_client(validator_a) as ws:
                await ws.send_message(frame)
                assert isinstance(await next_message(ws), WelcomeMessage)  # good at A
            captured.append(frame)

        refusals = 0
        for frame in captured:
            async with raw_client(validator_b) as ws:
                await ws.send_message(frame)
                answers, code, reason = await answers_until_close(ws)
            assert [bare_refusal(a, validator_b.hotkey) for a in answers] == [
                {"status": "error", "message": WRONG_AUDIENCE}
            ]
            assert (code, reason) == (1008, WRONG_AUDIENCE)
            refusals += 1
    assert refusals == 14
    stats = validator_b.stats()
    assert stats["rejections"] == {"wrong audience": 14}
    assert stats["rejections"]["wrong audience"] == 14
    assert stats["frames_out"].get("welcome", 0) == 0
    assert stats["connections_total"] == 0
    assert validator_b.guard.held_by(bob.ss58_address) == 0
    assert validator_a.stats()["frames_out"]["welcome"] == 14


@pytest.mark.parametrize("require_audience", [False, True], ids=["default", "require-audience"])
async def test_a_frame_naming_no_audience(
    bob: Keypair, charlie: Keypair, require_audience: bool, autojump_clock: Any
) -> None:
    """Scenario 3, reference miners: their frames name no audience. A default validator
    accepts them; one run with require_audience refuses them (bare refusal, 1008),
    while our miners, whose frames name it, still connect."""
    validator_b = ValidatorWebSocketManager(charlie, require_audience=require_audience)
    with trio.fail_after(60):
        if not require_audience:
            async with raw_client(validator_b) as ws:
                welcome = await authenticate(ws, bob)  # build_auth(bob): no audience
                assert welcome.data[MINER_HOTKEY] == bob.ss58_address
            assert validator_b.stats()["rejections"] == {}
        else:
            reply, code, reason = await refused(validator_b, json.dumps(build_auth(bob)))
            assert reply == {"status": "error", "message": NO_AUDIENCE}
            assert (code, reason) == (1008, NO_AUDIENCE)
            assert validator_b.stats()["rejections"] == {"no audience": 1}
            assert validator_b.stats()["frames_out"].get("welcome", 0) == 0
            # a frame for another validator is still "wrong audience" there
            reply, code, _ = await refused(
                validator_b, json.dumps(build_auth(bob, audience=MALLORY.ss58_address))
            )
            assert reply == {"status": "error", "message": WRONG_AUDIENCE} and code == 1008

        # our miner names its validator: admitted either way
        net = Net()
        async with trio.open_nursery() as nursery:
            net.attach("ws://validator-b/ws", validator_b, nursery)
            miner = MinerWebSocketManager(
                bob, [(validator_b.hotkey, "ws://validator-b/ws")], stream_opener=net.open
            )
            await nursery.start(miner.run)
            await miner.wait_connected(validator_b.hotkey)
            assert validator_b.connected_hotkeys == [bob.ss58_address]
            nursery.cancel_scope.cancel()


def test_cli_parser_accepts_require_audience() -> None:
    """Scenario 3, operators: ``bettensor-ws validator --require-audience`` turns it on
    (off by default, for reference miners); it is a validator option only."""
    parser = build_parser()
    assert parser.parse_args(["validator", "--require-audience"]).require_audience is True
    assert parser.parse_args(["validator"]).require_audience is False
    with pytest.raises(UsageError):
        parser.parse_args(["miner", "--validator", "ws://127.0.0.1:1/ws@x", "--require-audience"])


async def test_cli_require_audience_reaches_the_validator(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Scenario 3, operators: the parsed flag is what the ValidatorNode is built with."""
    import bettensor_ws.node as node_package
    from bettensor_ws.node import cli

    built: dict[str, Any] = {}

    class Built(Exception):
        pass

    def fake_node(*args: Any, **kwargs: Any) -> Any:
        built.update(kwargs)
        raise Built

    monkeypatch.setattr(node_package, "ValidatorNode", fake_node)
    monkeypatch.setattr(sys, "setswitchinterval", lambda interval: None)
    for argv, expected in [([], False), (["--require-audience"], True)]:
        built.clear()
        args = build_parser().parse_args(
            ["validator", "--hotkey-uri", "//Alice", "--db", str(tmp_path / "v.db"), *argv]
        )
        with pytest.raises(Built):
            await cli.run_validator(args)
        assert built["require_audience"] is expected
