"""Nodes on a subnet: a validator admits from the metagraph, miners discover validators
from their axons, and both follow the refreshes.

The metagraph comes through the CLI's code path (``ChainSource.open`` -> the SDK's
Subtensor -> ``client.subnets.metagraph``) from the SDK's own seam, a fake
``Substrate`` answering the runtime call with records (tests/chain_fakes.py).
Links are in-memory (``Net`` from test_runtime routes each axon URL to a
validator); the clock is real, since chain reads run in worker threads, and
every wait is for a condition, bounded by ``trio.fail_after``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import trio
from bittensor_wallet import Keypair

from bettensor_ws.node import MinerNode, ValidatorNode, favourite_strategy
from bettensor_ws.node.chain import ChainSource
from tests.chain_fakes import FakeSubstrate, Peer
from tests.helpers import make_game
from tests.test_runtime import Net, authenticate, expect_close, raw_client, refused

NETUID = 7
WAIT = 20.0
ALICE_URL = "ws://10.0.0.1:8091/ws"
DAVE_URL = "ws://10.0.0.4:8091/ws"
EVE_URL = "ws://10.0.0.5:8091/ws"


@pytest.fixture(autouse=True)
def sdk_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BTCLI_TOKEN_SYMBOLS_CACHE", str(tmp_path_factory.mktemp("sdk") / "token_symbols.json"))


@pytest.fixture(scope="module")
def dave() -> Keypair:
    return Keypair.create_from_uri("//Dave")


@pytest.fixture(scope="module")
def eve() -> Keypair:
    return Keypair.create_from_uri("//Eve")


@asynccontextmanager
async def chain_source(fake: FakeSubstrate, db: Path) -> AsyncIterator[ChainSource]:
    source = ChainSource.open("test", None, NETUID, db, substrate=fake)
    try:
        yield source
    finally:
        source.close()


async def until(predicate: Any, what: str = "") -> None:
    try:
        with trio.fail_after(WAIT):
            while not predicate():  # noqa: ASYNC110
                await trio.sleep(0.01)
    except trio.TooSlowError:
        raise AssertionError(f"timed out waiting for {what or predicate}") from None


# ---- the validator -------------------------------------------------------------------------


async def test_the_validator_admits_the_subnet_and_drops_who_leaves(
    tmp_path: Path, alice: Keypair, bob: Keypair, charlie: Keypair, caplog: pytest.LogCaptureFixture
) -> None:
    fake = FakeSubstrate(NETUID, [Peer(alice.ss58_address, 100, True), Peer(bob.ss58_address, 3.0)])
    validator = ValidatorNode(alice, tmp_path / "v.db")
    caplog.set_level(logging.INFO)
    try:
        async with chain_source(fake, tmp_path / "v.db") as source:
            validator.apply_metagraph(await source.start())
            async with trio.open_nursery() as server:
                # bob is registered (uid 1): admitted, and logged with his UID
                async with raw_client(validator, server_nursery=server) as ws_bob:
                    await authenticate(ws_bob, bob)
                    await until(lambda: validator.connected_hotkeys == [bob.ss58_address])
                    assert f"miner {bob.ss58_address} (uid 1) connected" in caplog.text
                    # charlie is not
                    reply, code, _ = await refused(validator, _auth(charlie))
                    assert (reply["message"], code) == ("hotkey not registered", 1008)
                    # charlie registers, bob leaves: the next refresh closes bob's link
                    fake.set([Peer(alice.ss58_address, 100, True), Peer(charlie.ss58_address, 1.0)])
                    graph = await source.refresh()
                    assert graph is not None
                    assert validator.apply_metagraph(graph) == [bob.ss58_address]
                    assert await expect_close(ws_bob) == (1008, "hotkey deregistered")
                async with raw_client(validator, server_nursery=server) as ws_charlie:
                    await authenticate(ws_charlie, charlie)
                    await until(lambda: validator.connected_hotkeys == [charlie.ss58_address])
                    assert f"miner {charlie.ss58_address} (uid 1) connected" in caplog.text
                server.cancel_scope.cancel()
    finally:
        validator.close()


def _auth(keypair: Keypair) -> str:
    import orjson

    from bettensor_ws import build_auth

    return orjson.dumps(build_auth(keypair)).decode()


async def test_min_stake_and_the_allow_list(
    tmp_path: Path, alice: Keypair, bob: Keypair, charlie: Keypair, dave: Keypair
) -> None:
    """--min-stake refuses registered hotkeys below it; the allow list is admitted
    besides the subnet, and replacing it (SIGHUP) closes who left it."""
    fake = FakeSubstrate(NETUID, [Peer(bob.ss58_address, 5.0), Peer(charlie.ss58_address, 0.5)])
    validator = ValidatorNode(alice, tmp_path / "v.db", [dave.ss58_address], min_stake=1.0)
    try:
        async with chain_source(fake, tmp_path / "v.db") as source:
            validator.apply_metagraph(await source.start())
            assert validator.is_registered(bob.ss58_address)
            assert not validator.is_registered(charlie.ss58_address)  # registered, but 0.5 < 1
            assert validator.is_registered(dave.ss58_address)  # not registered, but allowed
            reply, code, _ = await refused(validator, _auth(charlie))
            assert (reply["message"], code) == ("hotkey not registered", 1008)
            async with trio.open_nursery() as server:
                async with raw_client(validator, server_nursery=server) as ws_dave:
                    await authenticate(ws_dave, dave)
                    await until(lambda: validator.connected_hotkeys == [dave.ss58_address])
                    assert validator.set_allow_list([]) == [dave.ss58_address]
                    assert await expect_close(ws_dave) == (1008, "hotkey deregistered")
                server.cancel_scope.cancel()
            assert validator.is_registered(bob.ss58_address)
            # without a metagraph nor a list, anyone who proves a key is admitted (as before)
            validator.subnet = None
            validator.set_allow_list(None)
            assert validator.is_registered(charlie.ss58_address)
    finally:
        validator.close()


# ---- the miner -----------------------------------------------------------------------------


async def served_validator(keypair: Keypair, path: Path, games: list[dict[str, Any]]) -> ValidatorNode:
    validator = ValidatorNode(keypair, path)
    await validator.update_games(games)
    return validator


async def test_the_miner_dials_the_subnets_validators_and_follows_refreshes(
    tmp_path: Path, alice: Keypair, bob: Keypair, charlie: Keypair, dave: Keypair, eve: Keypair,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Bob mines. On the chain: alice (permit, axon), charlie (permit, port 0: not
    served), dave (permit, no axon yet), bob himself (permit, axon: never dialled).
    Eve is on bob's hand-made list and not on the chain at all."""
    caplog.set_level(logging.INFO)
    games = [make_game(i, starts_in=timedelta(hours=2 + i)) for i in range(3)]
    fake = FakeSubstrate(NETUID, [
        Peer(alice.ss58_address, 100, True, "10.0.0.1", 8091),
        Peer(bob.ss58_address, 1, True, "10.0.0.2", 8091),
        Peer(charlie.ss58_address, 100, True, "10.0.0.3", 0),
        Peer(dave.ss58_address, 100, True),
    ])
    net = Net()
    net.hang.add(ALICE_URL)  # alice never answers: what bob predicts for her stays pending
    validators = {
        "dave": await served_validator(dave, tmp_path / "dave.db", games),
        "eve": await served_validator(eve, tmp_path / "eve.db", games),
    }
    miner = MinerNode(
        bob, [(eve.ss58_address, EVE_URL)], tmp_path / "bob.db", stream_opener=net.open,
        reconnect_base_interval=0.05, max_reconnect_interval=0.2, strategy=favourite_strategy(1.0),
    )
    try:
        async with chain_source(fake, tmp_path / "bob.db") as source, trio.open_nursery() as nursery:
            for name, url in (("dave", DAVE_URL), ("eve", EVE_URL)):
                await nursery.start(validators[name].serve)
                net.attach(url, validators[name], nursery)
            added, removed = miner.apply_metagraph(await source.start())
            assert (added, removed) == ([alice.ss58_address], [])  # eve was already on the list
            assert miner.validators == {alice.ss58_address: ALICE_URL, eve.ss58_address: EVE_URL}
            assert f"validator {alice.ss58_address} (uid 0) at {ALICE_URL}: dialling" in caplog.text
            await nursery.start(miner.run)
            await miner.wait_connected(eve.ss58_address)
            await until(lambda: net.dials[ALICE_URL], "a dial to alice")
            # eve's games are predicted for eve alone; a prediction for every validator
            # stays pending for alice, who never answers
            made = await miner.submit_predictions(favourite_strategy(1.0)(games[:2]))
            assert len(made) == 2

            async def pending_for(hotkey: str) -> int:
                return int((await miner.db.run(miner.store.counts, hotkey))["pending"])

            await until(lambda: validators["eve"].connected_hotkeys == [bob.ss58_address], "eve serving bob")

            # refresh: alice loses her permit, dave serves an axon
            fake.set([
                Peer(alice.ss58_address, 100, False, "10.0.0.1", 8091),
                Peer(bob.ss58_address, 1, True, "10.0.0.2", 8091),
                Peer(charlie.ss58_address, 100, True, "10.0.0.3", 0),
                Peer(dave.ss58_address, 100, True, "10.0.0.4", 8091),
            ])
            graph = await source.refresh()
            assert graph is not None
            added, removed = miner.apply_metagraph(graph)
            assert (added, removed) == ([dave.ss58_address], [alice.ss58_address])
            assert miner.validators == {dave.ss58_address: DAVE_URL, eve.ss58_address: EVE_URL}
            await miner.wait_connected(dave.ss58_address)
            await until(lambda: dave.ss58_address in miner.connected_validators)
            # alice is no longer dialled ...
            dials = len(net.dials[ALICE_URL])
            await until(lambda: validators["dave"].connected_hotkeys == [bob.ss58_address])
            assert len(net.dials[ALICE_URL]) == dials
            assert f"validator {alice.ss58_address} left the subnet" in caplog.text
            # ... and what was pending for her is still pending, not lost
            assert await pending_for(alice.ss58_address) == 2
            # dave sent his games on connect: bob predicts all three for dave, confirmed
            with trio.fail_after(WAIT):
                while (await miner.db.run(miner.store.counts, dave.ss58_address))["confirmed"] < 3:  # noqa: ASYNC110
                    await trio.sleep(0.02)

            # alice comes back, serving: her pending predictions are delivered
            validators["alice"] = await served_validator(alice, tmp_path / "alice.db", games)
            await nursery.start(validators["alice"].serve)
            net.hang.discard(ALICE_URL)
            net.attach(ALICE_URL, validators["alice"], nursery)
            fake.set([
                Peer(alice.ss58_address, 100, True, "10.0.0.1", 8091),
                Peer(bob.ss58_address, 1, True, "10.0.0.2", 8091),
                Peer(dave.ss58_address, 100, True, "10.0.0.4", 8091),
            ])
            graph = await source.refresh()
            assert graph is not None
            assert miner.apply_metagraph(graph) == ([alice.ss58_address], [])
            await miner.wait_connected(alice.ss58_address)

            def states() -> set[str]:
                marks = ",".join("?" * len(made))
                return {r[0] for r in miner.store.db.execute(
                    f"SELECT state FROM deliveries WHERE validator_hotkey=? AND prediction_id IN ({marks})",
                    [alice.ss58_address, *made],
                )}

            with trio.fail_after(WAIT):
                while await miner.db.run(states) != {"confirmed"}:  # noqa: ASYNC110
                    await trio.sleep(0.02)
            nursery.cancel_scope.cancel()
    finally:
        miner.close()
        for validator in validators.values():
            validator.close()


async def test_a_miner_on_a_subnet_with_no_validator_to_dial_says_so(
    tmp_path: Path, bob: Keypair, caplog: pytest.LogCaptureFixture
) -> None:
    fake = FakeSubstrate(NETUID, [Peer(bob.ss58_address, 1, True, "10.0.0.2", 8091)])
    miner = MinerNode(bob, [], tmp_path / "bob.db")
    try:
        async with chain_source(fake, tmp_path / "bob.db") as source:
            with caplog.at_level(logging.WARNING):
                assert miner.apply_metagraph(await source.start()) == ([], [])
        assert "no validator to dial" in caplog.text
        assert miner.validators == {}
    finally:
        miner.close()


# ---- the link layer: a changing list of validators -----------------------------------------


async def test_set_validators_dials_redials_and_drops(alice: Keypair, bob: Keypair, autojump_clock: Any) -> None:
    from bettensor_ws import MinerWebSocketManager, ValidatorWebSocketManager

    validator = ValidatorWebSocketManager(alice)
    net = Net()
    old, new = "ws://10.0.0.1:1/ws", "ws://10.0.0.9:2/ws"
    miner = MinerWebSocketManager(bob, [(alice.ss58_address, old)], stream_opener=net.open)
    # before run(): the list only
    assert miner.set_validators([]) == ([], [alice.ss58_address])
    assert miner.set_validators([(alice.ss58_address, old)]) == ([alice.ss58_address], [])
    async with trio.open_nursery() as nursery:
        net.attach(old, validator, nursery)
        net.attach(new, validator, nursery)
        await nursery.start(miner.run)
        await miner.wait_connected(alice.ss58_address)
        assert miner.set_validators([(alice.ss58_address, old)]) == ([], [])  # unchanged: untouched
        # moved: dropped at the old URL, dialled at the new one
        assert miner.set_validators([(alice.ss58_address, new)]) == ([alice.ss58_address], [alice.ss58_address])
        await until(lambda: net.dials[new], "a dial to the new URL")
        await miner.wait_connected(alice.ss58_address)
        assert miner.connection(alice.ss58_address) is not None
        # gone: the link closes and nothing dials it again
        assert miner.set_validators([]) == ([], [alice.ss58_address])
        await until(lambda: miner.connected_validators == [] and validator.connected_hotkeys == [])
        dials = len(net.dials[new])
        await trio.sleep(600)  # mock time: many reconnect intervals
        assert len(net.dials[new]) == dials
        nursery.cancel_scope.cancel()


# ---- the CLI's wiring, in-process, on a live (fake) chain ----------------------------------


async def test_the_cli_nodes_follow_the_chain(
    tmp_path: Path, alice: Keypair, bob: Keypair, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture,
) -> None:
    """``run_validator`` and ``run_miner`` as ``bettensor-ws`` runs them, on one chain
    that changes under them (refreshed every second): the miner finds the validator's
    axon, the validator admits the miner by its UID, drops it when it deregisters and
    admits it again when it is back; the miner drops the validator when its axon goes."""
    import sys

    from bettensor_ws.node import chain as chain_module
    from bettensor_ws.node.cli import build_parser, run_miner, run_validator

    fake = FakeSubstrate(NETUID, [Peer(alice.ss58_address, 100, True), Peer(bob.ss58_address, 1.0)])
    real_open = chain_module.open_subtensor
    monkeypatch.setattr(
        chain_module, "open_subtensor",
        lambda network, endpoint, substrate=None: real_open(network, endpoint, substrate=fake),
    )
    monkeypatch.setattr(sys, "setswitchinterval", lambda interval: None)  # the validator's, process-wide
    caplog.set_level(logging.INFO)
    chain = ["--netuid", str(NETUID), "--subtensor.network", "test", "--metagraph-refresh", "1"]
    validator_args = build_parser().parse_args(
        ["validator", "--port", "0", "--hotkey-uri", "//Alice", "--db", str(tmp_path / "v.db"), *chain]
    )
    miner_args = build_parser().parse_args(
        ["miner", "--hotkey-uri", "//Bob", "--db", str(tmp_path / "m.db"), *chain, "--reconnect-max", "1"]
    )
    out = ""

    async def logged(text: str) -> None:
        await until(lambda: text in caplog.text, text)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(run_validator, validator_args)

        def listening() -> bool:
            nonlocal out
            out += capsys.readouterr().out
            return "listening on " in out

        await until(listening, "the validator's URL")
        url = out.split("listening on ", 1)[1].split()[0]
        port = int(url.rsplit(":", 1)[1].removesuffix("/ws"))
        registered = [Peer(alice.ss58_address, 100, True, "127.0.0.1", port), Peer(bob.ss58_address, 1.0)]
        fake.set(registered)
        nursery.start_soon(run_miner, miner_args)
        await logged(f"validator {alice.ss58_address} (uid 0) at {url}: dialling")
        await logged(f"miner {bob.ss58_address} (uid 1) connected")
        # bob deregisters: the validator's next refresh closes his link
        fake.set(registered[:1])
        await logged("ended (1008 hotkey deregistered)")
        await logged("hotkey not registered")  # and his reconnects are refused
        # bob is back: admitted again at a reconnect
        fake.set(registered)
        caplog.clear()
        await logged(f"miner {bob.ss58_address} (uid 1) connected")
        # alice stops serving: the miner drops her
        fake.set([Peer(alice.ss58_address, 100, True), Peer(bob.ss58_address, 1.0)])
        await logged(f"validator {alice.ss58_address} left the subnet")
        await until(
            lambda: re.search(rf"miner {bob.ss58_address} \(uid 1\) \(\S+\) disconnected: 1001", caplog.text),
            "bob's link closed 1001",
        )
        nursery.cancel_scope.cancel()
