"""Network faults between miners and a validator: resets, half-open peers, cuts that heal.

In process, real time, real loopback sockets: a :class:`ValidatorNode` and
:class:`MinerNode`\\ s talk through a small trio TCP proxy the test controls:

* ``reset()``: every proxied connection is torn down with a TCP RST (SO_LINGER
  0): no WebSocket close frame, no FIN;
* ``blackhole()``: the proxy stops reading and writing in both directions while
  keeping every socket open, the half-open peer; new connections are accepted
  and then ignored the same way;
* ``refuse()``: new connections are reset as soon as they are accepted;
* ``heal()``: forward again.

Checked: both ends notice a half-open peer within ``connection_timeout`` (close
reason "connection timeout"); after any fault the miner reconnects and every
prediction, including those made while the link was down, ends confirmed
exactly once: the validator stores each once, the miner holds each as
confirmed, nothing pending.

Short forms run in ``make test``; the long form (``reliability``) streams
predictions from 4 miners through a few hundred faults.
"""

from __future__ import annotations

import functools
import random
import socket
import struct
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import trio
from bittensor_wallet import Keypair

from bettensor_ws.node import MinerNode, ValidatorNode
from tests.test_node import (
    assert_databases_agree,
    eventually,
    make_prediction,
    miner_counts,
    upcoming_games,
    validator_rows,
)

HEARTBEAT = 0.2
TIMEOUT = 1.0  # connection_timeout on both ends
DETECT_SLACK = 0.5  # scheduling slack on top of connection_timeout
WAIT = 30.0


class FaultProxy:
    """A TCP proxy on loopback that can reset, blackhole, refuse and heal its links."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.mode = "open"  # "open" | "blackhole" | "refuse"
        self._flowing = trio.Event()
        self._flowing.set()
        self._links: set[trio.CancelScope] = set()
        self.accepted = 0
        self.resets = 0

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.serve_listeners, self._handle, listeners)
            task_status.started(self.port)

    # ---- controls ----------------------------------------------------------------------

    def reset(self) -> int:
        """RST every live link (no close frame); returns how many."""
        links = list(self._links)
        for scope in links:
            scope.cancel()
        self.resets += len(links)
        return len(links)

    def blackhole(self) -> None:
        self.mode = "blackhole"
        self._flowing = trio.Event()

    def refuse(self) -> None:
        self.mode = "refuse"

    def heal(self) -> None:
        self.mode = "open"
        self._flowing.set()

    @property
    def links(self) -> int:
        return len(self._links)

    # ---- the proxy -----------------------------------------------------------------------

    async def _handle(self, client: trio.SocketStream) -> None:
        self.accepted += 1
        if self.mode == "refuse":
            _abort(client)
            return
        try:
            server = await trio.open_tcp_stream("127.0.0.1", self.target_port)
        except OSError:
            _abort(client)
            return
        with trio.CancelScope() as scope:
            self._links.add(scope)
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(self._pump, client, server, nursery.cancel_scope)
                    nursery.start_soon(self._pump, server, client, nursery.cancel_scope)
            finally:
                self._links.discard(scope)
        # reset or one side ended: abort both, so neither sees an orderly close
        _abort(client)
        _abort(server)

    async def _pump(self, src: trio.SocketStream, dst: trio.SocketStream, scope: trio.CancelScope) -> None:
        try:
            while True:
                await self._flowing.wait()  # blackholed: neither read nor write
                data = await src.receive_some(65536)
                if not data:
                    break
                await self._flowing.wait()
                await dst.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass
        scope.cancel()


def _abort(stream: trio.SocketStream) -> None:
    """Close with a TCP RST rather than a FIN."""
    try:
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    stream.socket.close()


# ---- the nodes ----------------------------------------------------------------------------------


def no_strategy(games: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    return []  # the test makes every prediction itself


def make_validator(alice: Keypair, path: Path) -> ValidatorNode:
    return ValidatorNode(alice, path, heartbeat_interval=HEARTBEAT, connection_timeout=TIMEOUT)


def make_miner(key: Keypair, validator: ValidatorNode, proxy_port: int, path: Path) -> MinerNode:
    return MinerNode(
        key,
        [(validator.hotkey, f"ws://127.0.0.1:{proxy_port}/ws")],
        path,
        strategy=no_strategy,
        heartbeat_interval=HEARTBEAT,
        connection_timeout=TIMEOUT,
        connect_timeout=TIMEOUT,
        reconnect_base_interval=0.05,
        max_reconnect_interval=0.2,
        retry_after=2.0,
    )


class Predictor:
    """Makes predictions with fresh ids on the games, round robin."""

    def __init__(self, games: list[dict[str, Any]]) -> None:
        self.games = games
        self.made = 0

    async def make(self, miner: MinerNode, count: int) -> list[str]:
        preds = []
        for _ in range(count):
            game = self.games[self.made % len(self.games)]
            preds.append(make_prediction(f"p-{uuid.uuid4().hex}", game, wager=0.01))
            self.made += 1
        return await miner.submit_predictions(preds)


async def settled(miners: Sequence[MinerNode], made: dict[str, int]) -> bool:
    for miner in miners:
        counts = await miner_counts(miner)
        if counts != {"pending": 0, "confirmed": made[miner.hotkey], "rejected": 0}:
            return False
    return True


async def assert_exactly_once(validator: ValidatorNode, miners: Sequence[MinerNode], made: int) -> None:
    total, distinct = (await validator_rows(
        validator, "SELECT count(*), count(DISTINCT prediction_id) FROM predictions"
    ))[0]
    assert total == distinct == made, (total, distinct, made)
    await assert_databases_agree(validator, miners)


async def connected(miner: MinerNode, validator: ValidatorNode) -> bool:
    """Both ends hold an open connection to each other."""
    conns = [miner.connection(validator.hotkey), validator.connection(miner.hotkey)]
    return all(c is not None and not c.closed.is_set() for c in conns)


async def _true(value: bool) -> bool:
    return value


# ---- short forms: in `make test` --------------------------------------------------------------


async def test_abrupt_reset_reconnects_and_loses_nothing(alice: Keypair, tmp_path: Path) -> None:
    """Five RSTs while predictions flow: the miner reconnects each time, nothing lost or doubled."""
    validator = make_validator(alice, tmp_path / "v.db")
    games = upcoming_games(20)
    key = Keypair.create_from_uri("//NetMiner0")
    miner: MinerNode | None = None
    try:
        async with trio.open_nursery() as nursery:
            await validator.update_games(games)
            port = await nursery.start(validator.serve)
            proxy = FaultProxy(port)
            proxy_port = await nursery.start(proxy.serve)
            miner = make_miner(key, validator, proxy_port, tmp_path / "m.db")
            await nursery.start(miner.run)
            predictor = Predictor(games)
            for _ in range(5):
                await eventually(lambda: connected(miner, validator), what="connected")
                await eventually(lambda: _true(proxy.links == 1), what="one proxied link")
                v_conn = validator.connection(miner.hotkey)
                m_conn = miner.connection(validator.hotkey)
                assert v_conn is not None and m_conn is not None
                await predictor.make(miner, 30)
                await trio.sleep(0.005)  # let some of them be on the wire
                assert proxy.reset() == 1
                # both ends notice the reset at once (well before connection_timeout)
                with trio.fail_after(TIMEOUT / 2):
                    await v_conn.closed.wait()
                    await m_conn.closed.wait()
            await eventually(
                lambda: settled([miner], {miner.hotkey: predictor.made}), what="every prediction confirmed"
            )
            await assert_exactly_once(validator, [miner], predictor.made)
            assert proxy.resets == 5
            # the miner counts a reconnect once its backoff sleep is over: wait for it
            await eventually(
                lambda: _true(miner.stats()["reconnects"] >= 5), what="a reconnect after each reset"
            )
            nursery.cancel_scope.cancel()
    finally:
        validator.close()
        if miner is not None:
            miner.close()


async def test_half_open_peer_detected_within_connection_timeout(alice: Keypair, tmp_path: Path) -> None:
    """The proxy stops forwarding both ways without closing: both ends give up within connection_timeout."""
    validator = make_validator(alice, tmp_path / "v.db")
    games = upcoming_games(5)
    key = Keypair.create_from_uri("//NetMiner0")
    miner: MinerNode | None = None
    try:
        async with trio.open_nursery() as nursery:
            await validator.update_games(games)
            port = await nursery.start(validator.serve)
            proxy = FaultProxy(port)
            proxy_port = await nursery.start(proxy.serve)
            miner = make_miner(key, validator, proxy_port, tmp_path / "m.db")
            await nursery.start(miner.run)
            await eventually(lambda: connected(miner, validator), what="connected")
            # a few heartbeats go by on a healthy link: no timeout there
            await trio.sleep(TIMEOUT * 1.5)
            v_conn = validator.connection(miner.hotkey)
            m_conn = miner.connection(validator.hotkey)
            assert v_conn is not None and m_conn is not None
            assert not v_conn.closed.is_set() and not m_conn.closed.is_set()

            detected = await _time_half_open(proxy, v_conn, m_conn)
            for side, (elapsed, reason) in detected.items():
                assert reason == "connection timeout", (side, reason)
                assert elapsed <= TIMEOUT + DETECT_SLACK, (side, elapsed)

            # predictions made while the link is half-open wait in the outbox
            predictor = Predictor(games)
            await predictor.make(miner, 10)
            await trio.sleep(0.3)
            proxy.heal()
            await eventually(
                lambda: settled([miner], {miner.hotkey: predictor.made}), what="every prediction confirmed"
            )
            await assert_exactly_once(validator, [miner], predictor.made)
            nursery.cancel_scope.cancel()
    finally:
        validator.close()
        if miner is not None:
            miner.close()


async def _time_half_open(proxy: FaultProxy, *conns: Any) -> dict[str, tuple[float, str | None]]:
    """Blackhole the proxy; how long each connection took to close, and why."""
    proxy.blackhole()
    start = trio.current_time()
    detected: dict[str, tuple[float, str | None]] = {}

    async def watch(side: str, conn: Any) -> None:
        await conn.closed.wait()
        detected[side] = (trio.current_time() - start, conn.close_reason)

    with trio.move_on_after(TIMEOUT * 5):
        async with trio.open_nursery() as nursery:
            for side, conn in zip(("validator", "miner"), conns, strict=True):
                nursery.start_soon(watch, side, conn)
    assert set(detected) == {"validator", "miner"}, f"half-open link not detected: {detected}"
    return detected


async def test_cut_and_heal_resumes_with_nothing_lost(alice: Keypair, tmp_path: Path) -> None:
    """Cut (reset + refuse new connections), predict while cut, heal: each confirmed exactly once."""
    validator = make_validator(alice, tmp_path / "v.db")
    games = upcoming_games(10)
    keys = [Keypair.create_from_uri(f"//NetMiner{i}") for i in range(2)]
    miners: list[MinerNode] = []
    try:
        async with trio.open_nursery() as nursery:
            await validator.update_games(games)
            port = await nursery.start(validator.serve)
            proxy = FaultProxy(port)
            proxy_port = await nursery.start(proxy.serve)
            for i, key in enumerate(keys):
                miner = make_miner(key, validator, proxy_port, tmp_path / f"m{i}.db")
                miners.append(miner)
                await nursery.start(miner.run)
            predictor = Predictor(games)
            made = {m.hotkey: 0 for m in miners}
            for miner in miners:
                await eventually(functools.partial(connected, miner, validator), what="connected")
                made[miner.hotkey] += len(await predictor.make(miner, 20))
            proxy.refuse()
            proxy.reset()
            before = await validator.db.run(validator.store.count_predictions)
            for miner in miners:
                made[miner.hotkey] += len(await predictor.make(miner, 40))
            await trio.sleep(0.5)  # the miners retry against a refusing proxy
            for miner in miners:  # nothing gets through while cut
                assert (await miner_counts(miner))["pending"] >= 40
            assert proxy.links == 0
            assert await validator.db.run(validator.store.count_predictions) >= before
            proxy.heal()
            await eventually(lambda: settled(miners, made), what="every prediction confirmed")
            await assert_exactly_once(validator, miners, sum(made.values()))
            nursery.cancel_scope.cancel()
    finally:
        validator.close()
        for miner in miners:
            miner.close()


# ---- long form: `make test-reliability` --------------------------------------------------------


@pytest.mark.reliability
async def test_network_faults_long(alice: Keypair, tmp_path: Path) -> None:
    """4 miners streaming ~100 predictions/s each through 60 s of random resets, cuts and half-opens."""
    rng = random.Random(6)
    validator = make_validator(alice, tmp_path / "v.db")
    games = upcoming_games(50)
    keys = [Keypair.create_from_uri(f"//NetMiner{i}") for i in range(4)]
    miners: list[MinerNode] = []
    faults = {"reset": 0, "blackhole": 0, "cut": 0}
    detections: list[float] = []
    try:
        async with trio.open_nursery() as nursery:
            await validator.update_games(games)
            port = await nursery.start(validator.serve)
            proxy = FaultProxy(port)
            proxy_port = await nursery.start(proxy.serve)
            for i, key in enumerate(keys):
                miner = make_miner(key, validator, proxy_port, tmp_path / f"m{i}.db")
                miners.append(miner)
                await nursery.start(miner.run)
            predictor = Predictor(games)
            made = {m.hotkey: 0 for m in miners}
            stop = trio.Event()

            async def stream(miner: MinerNode) -> None:
                while not stop.is_set():
                    made[miner.hotkey] += len(await predictor.make(miner, 5))
                    await trio.sleep(0.05)

            async with trio.open_nursery() as streams:
                for miner in miners:
                    streams.start_soon(stream, miner)
                deadline = trio.current_time() + 60.0
                while trio.current_time() < deadline:
                    await trio.sleep(rng.uniform(0.1, 0.6))
                    kind = rng.choice(["reset", "reset", "blackhole", "cut"])
                    if kind == "reset":
                        proxy.reset()
                    elif kind == "cut":
                        proxy.refuse()
                        proxy.reset()
                        await trio.sleep(rng.uniform(0.2, 1.5))
                        proxy.heal()
                    else:
                        # only time the detection when every miner is up through the proxy
                        conns = [validator.connection(m.hotkey) for m in miners[:1]] + [
                            miners[0].connection(validator.hotkey)
                        ]
                        if all(c is not None and not c.closed.is_set() for c in conns):
                            detected = await _time_half_open(proxy, *conns)
                            for elapsed, reason in detected.values():
                                assert reason == "connection timeout"
                                detections.append(elapsed)
                        else:
                            proxy.blackhole()
                            await trio.sleep(TIMEOUT + DETECT_SLACK)
                        proxy.heal()
                    faults[kind] += 1
                stop.set()

            await eventually(lambda: settled(miners, made), limit=60, what="every prediction confirmed")
            total = sum(made.values())
            await assert_exactly_once(validator, miners, total)
            assert detections and max(detections) <= TIMEOUT + DETECT_SLACK, detections
            print(
                f"faults survived {faults}, RSTs {proxy.resets}, predictions made {total}, lost 0, "
                f"duplicates 0, half-open detection max {max(detections):.2f}s "
                f"(connection_timeout {TIMEOUT}s), miner reconnects "
                f"{sum(m.stats()['reconnects'] for m in miners)}"
            )
            nursery.cancel_scope.cancel()
    finally:
        validator.close()
        for miner in miners:
            miner.close()
