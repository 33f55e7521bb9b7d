"""The soak's miners: N real MinerNodes in one process, predicting at a steady rate.

Run by tests/reliability/test_soak.py as ``python -m tests.reliability.soak_miners``
so that the validator (its own ``bettensor-ws validator`` process) shares its
event loop with nobody. Each miner predicts every game the validator's feed
lists when it connects, then, once nothing is pending, one more prediction a
second on those games (the miners take turns, so the load is even), each
stored in its outbox before it is sent, as ``bettensor-ws miner`` would.

Talks JSON lines on stdout: ``ready`` once everything first predicted is
confirmed; after ``go`` arrives on stdin (so that several such processes start
together), a ``sample`` every ``--interval`` seconds (latencies in ms since the
last sample, counts); and ``done`` after ``stop`` arrives on stdin and nothing
is pending any more (or 120 s passed). Logs at WARNING and above go to stderr.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any

import orjson
import trio
from bittensor_wallet import Keypair

from bettensor_ws.node import MinerNode
from bettensor_ws.node.cli import SWITCH_INTERVAL

WAGER = 0.1  # 10,000 predictions a miner a day under the daily limit of 1000


class ErrorCount(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1


def say(event: str, **fields: Any) -> None:
    sys.stdout.write(orjson.dumps({"event": event, **fields}).decode() + "\n")
    sys.stdout.flush()


async def totals(miners: list[MinerNode]) -> dict[str, int]:
    out = {"pending": 0, "confirmed": 0, "rejected": 0}
    for miner in miners:
        counts = await miner.db.run(miner.store.counts)
        for key in out:
            out[key] += counts[key]
    out["made"] = sum(out.values())
    return out


async def settled(miners: list[MinerNode]) -> None:
    """Until nothing is pending (the databases are the only record of it: polled)."""
    while (await totals(miners))["pending"]:  # noqa: ASYNC110
        await trio.sleep(0.2)


async def run(args: argparse.Namespace) -> None:
    errors = ErrorCount()
    logging.getLogger().addHandler(errors)
    validators = [(args.validator_hotkey, args.url)]
    miners = [
        MinerNode(
            Keypair.create_from_uri(f"//Soak{i}"), validators, Path(args.db_dir) / f"miner{i}.db",
            wager=WAGER, reconnect_base_interval=0.5, max_reconnect_interval=5.0,
        )
        for i in range(args.first, args.first + args.miners)
    ]
    going, stopping = trio.Event(), trio.Event()

    async def read_stdin() -> None:
        stdin = trio.lowlevel.FdStream(sys.stdin.fileno())
        buffered = b""
        while b"stop" not in buffered:
            if b"go" in buffered:
                going.set()
            chunk = await stdin.receive_some(64)
            if not chunk:
                break
            buffered += chunk
        going.set()
        stopping.set()

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_stdin)
            for miner in miners:
                await nursery.start(miner.run)
            with trio.fail_after(120):
                for miner in miners:
                    await miner.wait_connected(args.validator_hotkey)
                games: list[list[dict[str, Any]]] = []
                for miner in miners:
                    while not (known := await miner.db.run(miner.store.games)):  # noqa: ASYNC110
                        await trio.sleep(0.1)
                    games.append(known)
                await settled(miners)
            for miner in miners:
                miner.latencies.clear()  # the connect-time burst is not the steady state
            say("ready", **await totals(miners))
            await going.wait()

            async def predict() -> None:
                """One prediction a second per miner, the miners taking turns."""
                step = 1.0 / (args.rate * len(miners))
                deadline = trio.current_time()
                n = 0
                while not stopping.is_set():
                    i = n % len(miners)
                    game = games[i][(n // len(miners)) % len(games[i])]
                    await miners[i].submit_predictions(miners[i].strategy([game]))
                    n += 1
                    deadline += step
                    await trio.sleep_until(deadline)

            nursery.start_soon(predict)
            start = time.monotonic()
            while not stopping.is_set():
                with trio.move_on_after(args.interval):
                    await stopping.wait()
                window: list[float] = []
                for miner in miners:
                    window.extend(miner.latencies)
                    miner.latencies.clear()
                say(
                    "sample",
                    t=round(time.monotonic() - start, 3),
                    latencies_ms=[round(x * 1000, 2) for x in window],
                    reconnects=sum(m.stats()["reconnects"] for m in miners),
                    errors=errors.count,
                    **await totals(miners),
                )
            with trio.move_on_after(120):
                await settled(miners)
            say(
                "done",
                reconnects=sum(m.stats()["reconnects"] for m in miners),
                errors=errors.count,
                **await totals(miners),
            )
            nursery.cancel_scope.cancel()
    finally:
        for miner in miners:
            miner.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--url", required=True)
    parser.add_argument("--validator-hotkey", required=True)
    parser.add_argument("--db-dir", required=True)
    parser.add_argument("--miners", type=int, default=64)
    parser.add_argument("--first", type=int, default=0, help="index of the first miner's key")
    parser.add_argument("--rate", type=float, default=1.0, help="predictions a second per miner")
    parser.add_argument("--interval", type=float, default=10.0, help="seconds between samples")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # As the CLI validator does: every miner's database thread shares this process's GIL
    # with the event loop, which would otherwise wait up to 5 ms at each hand-back.
    sys.setswitchinterval(SWITCH_INTERVAL)
    trio.run(run, args)


if __name__ == "__main__":
    main()
