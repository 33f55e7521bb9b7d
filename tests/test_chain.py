"""The metagraph from the chain (node/chain.py), read through the Bittensor SDK.

The chain is the SDK's own test seam (``Subtensor(substrate=...)``, see
tests/chain_fakes.py): the runtime record goes through the SDK's Subtensor,
its loop thread and its Metagraph parser, then through ``read_metagraph`` and
``ChainSource`` exactly as the CLI calls them. Reads run in worker threads, so
these tests use the real clock (an autojump clock would fire a read's timeout
while the thread works), except the hung-read test, where that is the point.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import bittensor
import pytest
import trio
from bittensor_wallet import Keypair

from bettensor_ws.node.chain import (
    ChainError,
    ChainSource,
    Neuron,
    SubnetGraph,
    load_snapshot,
    merged_validators,
    open_subtensor,
    read_metagraph,
    resolve_network,
    save_snapshot,
    snapshot_path,
)
from tests.chain_fakes import FakeSubstrate, Peer

ALICE = Keypair.create_from_uri("//Alice").ss58_address
BOB = Keypair.create_from_uri("//Bob").ss58_address
CHARLIE = Keypair.create_from_uri("//Charlie").ss58_address
DAVE = Keypair.create_from_uri("//Dave").ss58_address
EVE = Keypair.create_from_uri("//Eve").ss58_address

NETUID = 7


@pytest.fixture(autouse=True)
def sdk_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """The SDK caches token symbols under ~/.bittensor on connect: keep it in tmp."""
    monkeypatch.setenv("BTCLI_TOKEN_SYMBOLS_CACHE", str(tmp_path_factory.mktemp("sdk") / "token_symbols.json"))


PEERS = [
    Peer(ALICE, stake=5000.0, permit=True, ip="10.0.0.1", port=8091),  # a serving validator
    Peer(BOB, stake=2.5),  # a miner
    Peer(CHARLIE, stake=0.1, permit=True, ip="10.0.0.3", port=0),  # permit, port 0: not served
    Peer(DAVE, stake=900.0, permit=True),  # permit, ip 0.0.0.0: not served
    Peer(EVE, stake=10.0, permit=True, ip="2001:db8::5", port=9000),  # IPv6
]


@pytest.fixture
def chain() -> Iterator[tuple[FakeSubstrate, Any]]:
    fake = FakeSubstrate(NETUID, PEERS)
    subtensor = open_subtensor("test", None, substrate=fake)
    try:
        yield fake, subtensor
    finally:
        subtensor.close()


def source_for(fake: FakeSubstrate, db: Path, **kwargs: Any) -> ChainSource:
    """The CLI's source (ChainSource.open), on the fake chain."""
    source = ChainSource.open("test", None, NETUID, db, substrate=fake)
    for key, value in kwargs.items():
        setattr(source, key, value)
    return source


# ---- the SDK's metagraph as a plain value --------------------------------------------------


def test_the_sdk_metagraph_becomes_a_plain_value(chain: tuple[FakeSubstrate, Any]) -> None:
    fake, subtensor = chain
    graph = read_metagraph(subtensor, NETUID, "test")
    # one runtime call, the metagraph's, for our subnet
    assert fake.calls == [("SubnetInfoRuntimeApi", "get_metagraph", [NETUID])]
    assert (graph.netuid, graph.block, graph.network) == (NETUID, 1000, "test")
    assert graph.hotkeys == [ALICE, BOB, CHARLIE, DAVE, EVE]
    assert [n.uid for n in graph.neurons] == [0, 1, 2, 3, 4]
    assert graph.neurons[0] == Neuron(0, ALICE, 5000.0, True, "10.0.0.1:8091")
    assert graph.neurons[1] == Neuron(1, BOB, 2.5, False, None)
    assert graph.neurons[3].axon is None  # ip 0: the SDK says nothing is served
    assert graph.uid_of(BOB) == 1 and graph.uid_of("5NotAKey") is None
    assert "5 neurons, 4 with a validator permit, 2 of them serving an axon" in graph.describe()


def test_validators_to_dial_have_a_permit_and_a_served_axon(chain: tuple[FakeSubstrate, Any]) -> None:
    _, subtensor = chain
    graph = read_metagraph(subtensor, NETUID, "test")
    assert graph.validator_endpoints() == {
        ALICE: "ws://10.0.0.1:8091/ws",
        EVE: "ws://[2001:db8::5]:9000/ws",
    }
    # never ourselves
    assert graph.validator_endpoints(exclude=ALICE) == {EVE: "ws://[2001:db8::5]:9000/ws"}
    # the hand-made list is kept, and wins for a hotkey in both
    assert merged_validators([(EVE, "ws://127.0.0.1:1/ws")], graph, own=BOB) == {
        ALICE: "ws://10.0.0.1:8091/ws",
        EVE: "ws://127.0.0.1:1/ws",
    }
    assert merged_validators([(EVE, "ws://127.0.0.1:1/ws")], None, own=BOB) == {EVE: "ws://127.0.0.1:1/ws"}


def test_admitted_hotkeys_and_the_minimum_stake(chain: tuple[FakeSubstrate, Any]) -> None:
    _, subtensor = chain
    graph = read_metagraph(subtensor, NETUID, "test")
    assert graph.admitted() == {ALICE, BOB, CHARLIE, DAVE, EVE}
    assert graph.admitted(min_stake=10.0) == {ALICE, DAVE, EVE}


def test_a_hotkey_that_is_no_address_is_left_out(caplog: pytest.LogCaptureFixture) -> None:
    fake = FakeSubstrate(NETUID, [Peer(ALICE), Peer("5NotAnAddress" + "x" * 500)])
    subtensor = open_subtensor("test", None, substrate=fake)
    try:
        with caplog.at_level(logging.WARNING):
            graph = read_metagraph(subtensor, NETUID, "test")
    finally:
        subtensor.close()
    assert graph.hotkeys == [ALICE]
    assert "uid 1" in caplog.text and "not an ss58 address" in caplog.text
    assert "x" * 100 not in caplog.text  # bounded


def test_no_such_subnet_and_an_unreachable_chain_are_chain_errors(chain: tuple[FakeSubstrate, Any]) -> None:
    fake, subtensor = chain
    with pytest.raises(ChainError, match="subnet 8 does not exist on test"):
        read_metagraph(subtensor, 8, "test")
    fake.fail = bittensor.RpcConnectionError("could not connect to any endpoint: refused")
    with pytest.raises(ChainError, match="RpcConnectionError: could not connect"):
        read_metagraph(subtensor, NETUID, "test")


def test_network_names_are_the_sdks() -> None:
    assert resolve_network(None, None) == "finney"
    assert resolve_network("test", None) == "test"
    assert resolve_network("test", "ws://127.0.0.1:9955") == "ws://127.0.0.1:9955"  # the endpoint wins
    assert resolve_network(None, "ws://127.0.0.1:9944") == "local"  # the SDK knows that one
    with pytest.raises(ValueError, match="Unknown network 'nosuchnet'"):
        resolve_network("nosuchnet", None)
    with pytest.raises(ValueError, match="chain_endpoint"):
        resolve_network(None, "http://127.0.0.1:9944")


# ---- the snapshot --------------------------------------------------------------------------


def test_the_snapshot_round_trips_and_is_written_atomically(tmp_path: Path, chain: tuple[FakeSubstrate, Any]) -> None:
    fake, subtensor = chain
    path = snapshot_path(tmp_path / "v.db", NETUID)
    assert path == tmp_path / "v.db.metagraph-7.json"
    first = read_metagraph(subtensor, NETUID, "test")
    save_snapshot(path, first)
    assert load_snapshot(path, NETUID, "test") == first
    fake.set(PEERS[:2])
    second = read_metagraph(subtensor, NETUID, "test")
    save_snapshot(path, second)
    assert load_snapshot(path, NETUID, "test") == second
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.db.metagraph-7.json"]  # no temporary left


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        ("{not json", "not JSON"),
        ('{"version": 99}', "not a version 1"),
        ('{"version": 1, "netuid": 7}', "malformed"),
        ('{"version": 1, "netuid": 7, "block": 1, "neurons": [{"uid": 0, "hotkey": "5Nope", '
         '"stake": 1, "validator_permit": false}]}', "neurons[0].hotkey"),
        ('{"version": 1, "netuid": 8, "block": 1, "neurons": [], "network": "test"}', "netuid 8, not 7"),
        ('{"version": 1, "netuid": 7, "block": 1, "neurons": [], "network": "finney"}', "network 'finney'"),
    ],
)
def test_a_bad_snapshot_is_refused_with_its_reason(tmp_path: Path, content: str, reason: str) -> None:
    path = tmp_path / "s.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=reason.replace("[", r"\[").replace("]", r"\]")):
        load_snapshot(path, NETUID, "test")


# ---- the source: start, refresh, follow ----------------------------------------------------


async def test_start_reads_the_chain_and_keeps_a_snapshot(tmp_path: Path) -> None:
    fake = FakeSubstrate(NETUID, PEERS)
    source = source_for(fake, tmp_path / "v.db")
    try:
        graph = await source.start()
    finally:
        source.close()
    assert graph.hotkeys == [ALICE, BOB, CHARLIE, DAVE, EVE] and not source.from_snapshot
    saved = json.loads(source.snapshot.read_text())
    assert saved["netuid"] == NETUID and saved["block"] == 1000 and len(saved["neurons"]) == 5
    assert load_snapshot(source.snapshot, NETUID, "test") == graph


async def test_an_unreachable_chain_at_start_goes_on_with_the_snapshot(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fake = FakeSubstrate(NETUID, PEERS)
    first = source_for(fake, tmp_path / "v.db")
    try:
        before = await first.start()
    finally:
        first.close()
    # a restart while the chain is down
    fake.fail = bittensor.RpcConnectionError("could not connect to any endpoint")
    source = source_for(fake, tmp_path / "v.db")
    try:
        with caplog.at_level(logging.WARNING):
            graph = await source.start()
    finally:
        source.close()
    assert graph == before and source.from_snapshot
    assert "going on with the snapshot" in caplog.text and "block 1000" in caplog.text
    assert "could not connect" in caplog.text


async def test_no_chain_and_no_snapshot_is_an_error_naming_both(tmp_path: Path) -> None:
    fake = FakeSubstrate(NETUID, PEERS)
    fake.fail = bittensor.RpcConnectionError("could not connect to any endpoint")
    source = source_for(fake, tmp_path / "v.db")
    try:
        with pytest.raises(ChainError, match="could not connect.*no snapshot at"):
            await source.start()
        (tmp_path / "v.db.metagraph-7.json").write_text("{torn")
        with pytest.raises(ChainError, match="snapshot .* is unusable: not JSON"):
            await source.start()
    finally:
        source.close()


async def test_a_failed_refresh_keeps_the_last_metagraph(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    fake = FakeSubstrate(NETUID, PEERS)
    source = source_for(fake, tmp_path / "v.db")
    try:
        await source.start()
        fake.set(PEERS[:2], block=1100)
        assert (await source.refresh() or pytest.fail("no graph")).block == 1100
        fake.fail = bittensor.RpcConnectionError("connection reset")
        with caplog.at_level(logging.WARNING):
            assert await source.refresh() is None
        assert "metagraph refresh failed" in caplog.text and "keeping block 1100" in caplog.text
        assert source.graph is not None and source.graph.block == 1100
        assert load_snapshot(source.snapshot, NETUID, "test").block == 1100
    finally:
        source.close()


async def test_follow_applies_each_refresh_and_a_poke_refreshes_at_once(tmp_path: Path) -> None:
    fake = FakeSubstrate(NETUID, PEERS)
    source = source_for(fake, tmp_path / "v.db")
    applied: list[SubnetGraph] = []
    changed = trio.Event()

    def apply(graph: SubnetGraph) -> None:
        applied.append(graph)
        changed.set()

    try:
        await source.start()
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                await nursery.start(source.follow, apply, 3600.0)  # the interval never comes
                fake.set(PEERS[1:], block=1200)
                source.poke()
                await changed.wait()
                nursery.cancel_scope.cancel()
    finally:
        source.close()
    assert [g.block for g in applied] == [1200]
    assert applied[0].hotkeys == [BOB, CHARLIE, DAVE, EVE]


async def until(predicate: Any) -> None:
    """Wait for a worker thread to get somewhere. The mock clock stands still meanwhile,
    so the bound is real time (30 s, for a thread that needs milliseconds)."""
    deadline = time.monotonic() + 30.0
    while not predicate():
        assert time.monotonic() < deadline, "the worker thread never got there"
        await trio.lowlevel.checkpoint()


async def test_follow_refreshes_every_interval(tmp_path: Path, mock_clock: trio.testing.MockClock) -> None:
    """The interval is mock time, moved by hand (the reads run in threads, which an
    autojump clock would jump over)."""
    graph = SubnetGraph(NETUID, 1, ())
    source = ChainSource(lambda: graph, tmp_path / "s.json", NETUID, "test", timeout=1e9)
    applied: list[float] = []
    async with trio.open_nursery() as nursery:
        await nursery.start(source.follow, lambda g: applied.append(trio.current_time()), 600.0)
        await trio.testing.wait_all_tasks_blocked()
        mock_clock.jump(599.0)
        await trio.testing.wait_all_tasks_blocked()
        assert applied == []
        for n in (1, 2, 3):
            mock_clock.jump(600.0 if n > 1 else 1.0)
            await until(lambda n=n: len(applied) == n)  # the read's thread returns at once
        nursery.cancel_scope.cancel()
    assert applied == [600.0, 1200.0, 1800.0]


async def test_a_hung_read_is_abandoned_and_not_piled_up(
    tmp_path: Path, mock_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    """A read that never returns fails after the timeout (mock time, moved by hand),
    its thread abandoned; the next refresh does not start a second thread behind it."""
    fake = FakeSubstrate(NETUID, PEERS)
    fake.hold = threading.Event()
    source = source_for(fake, tmp_path / "v.db", timeout=60.0)
    results: list[SubnetGraph | None] = []

    async def refresh() -> None:
        results.append(await source.refresh())

    try:
        with caplog.at_level(logging.WARNING):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(refresh)
                await until(lambda: len(fake.calls) == 1)  # the thread hangs in the chain call
                mock_clock.jump(60.0)
            assert results == [None]
            assert "no answer within 60 s" in caplog.text
            assert await source.refresh() is None
            assert "the previous read has not returned yet" in caplog.text
        assert len(fake.calls) == 1
    finally:
        fake.hold.set()
    # the abandoned thread returns; then reads work again
    await until(lambda: not source._busy)
    fake.hold = None
    try:
        graph = await source.refresh()
    finally:
        source.close()
    assert graph is not None and graph.block == 1000 and len(fake.calls) == 2
