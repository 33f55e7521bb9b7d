"""The game-update peak seen from the miners: many of our ``MinerNode``s in one process.

    python benchmarks/swarm.py CONFIG_JSON      # or '-' to read the config from stdin

Config: ``url`` and ``server_pid`` of the validator under test (ours:
benchmarks/peakvalidator.py; the reference design: baseline.py --peak-games),
``connections`` miners (keys ``//BenchMiner{i}``, one SQLite store each in
``folder``), ``games`` per update, ``settle`` and ``timeout`` seconds.

Once every miner is connected (and ``settle`` s later), it sends the validator
SIGUSR1, which makes it store and broadcast ``games`` new games; each miner
predicts all of them (the favourite, wager 1), sends them (one batch to a
validator that offers ``batch``, single messages otherwise) and stores the
confirmations. Prints one JSON object: the time from the signal to the last
miner having the update (``update_last_ms``) and to the last miner having
stored a success confirmation for every game (``last_ms``, the figure of the
table), both on this process's clock.

With ``procs`` above 1 the miners are spread over that many child processes
(each runs this script on its share); this one waits until every child has
its miners connected, signals the validator, tells the children the time of
the signal and merges what they measured. Each real miner is a process on a
machine of its own: 256 nodes in one process share one GIL, one thread pool
and one garbage collector, which no subnet's miner does.
"""

from __future__ import annotations

import json
import math
import os
import resource
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import trio
from bittensor_wallet import Keypair
from common import VALIDATOR_URI, miner_uri

from bettensor_ws.node import MinerNode
from bettensor_ws.protocol.dispatch import Connection
from bettensor_ws.protocol.messages import ConfirmationMessage, WebSocketMessage

DEFAULTS: dict[str, Any] = {"connections": 256, "games": 40, "settle": 1.0, "timeout": 60.0, "procs": 1}


class TimedMiner(MinerNode):
    """A MinerNode that notes when the update came and when its last confirmation was stored."""

    def __init__(self, *args: Any, want: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.want = want
        self.stored = 0
        self.update_at: float | None = None
        self.sent_at_: float | None = None
        self.answered_at: float | None = None
        self.done_at: float | None = None
        self.all_done: Any = None  # set by the swarm: called once this miner is done

    async def handle_game_updates(self, websocket: Connection, message: WebSocketMessage) -> None:
        if self.update_at is None and message.data.get("games"):
            self.update_at = time.time()
        await super().handle_game_updates(websocket, message)

    async def _send(self, connection: Any, outbox: Any, predictions: Any, data: Any) -> None:
        await super()._send(connection, outbox, predictions, data)
        self.sent_at_ = time.time()  # the last send of the round: queued for the writer

    async def handle_confirmation(self, websocket: Connection, message: WebSocketMessage) -> None:
        self.answered_at = time.time()
        await super().handle_confirmation(websocket, message)  # stored when it returns
        assert isinstance(message, ConfirmationMessage)
        self.stored += sum(1 for r in message.results if r.status == "success")
        if self.done_at is None and self.stored >= self.want:
            self.done_at = time.time()
            self.all_done()


async def run(cfg: dict[str, Any]) -> dict[str, Any]:
    """Run miners ``first`` .. ``first + connections``; a child waits to be told the signal's time."""
    if cfg.get("switch_interval"):
        sys.setswitchinterval(cfg["switch_interval"])
    validator = Keypair.create_from_uri(VALIDATOR_URI).ss58_address
    folder = Path(cfg["folder"])
    n, first = cfg["connections"], cfg.get("first", 0)
    miners = [
        TimedMiner(Keypair.create_from_uri(miner_uri(i)), [(validator, cfg["url"])],
                   folder / f"miner-{i}.db", want=cfg["games"])
        for i in range(first, first + n)
    ]
    finished = trio.Event()
    left = n

    def one_done() -> None:
        nonlocal left
        left -= 1
        if left == 0:
            finished.set()

    for miner in miners:
        miner.all_done = one_done
    try:
        async with trio.open_nursery() as nursery:
            t = time.perf_counter()
            for miner in miners:
                await nursery.start(miner.run)
            with trio.fail_after(60):
                for miner in miners:
                    await miner.wait_connected()
            connect_s = time.perf_counter() - t
            if cfg.get("child"):
                print("ready", flush=True)
                line = await trio.to_thread.run_sync(sys.stdin.readline)
                cpu0 = time.process_time()
                start = float(line)
            else:
                await trio.sleep(cfg["settle"])
                cpu0 = time.process_time()
                start = time.time()
                os.kill(cfg["server_pid"], signal.SIGUSR1)
            with trio.move_on_after(cfg["timeout"]):
                await finished.wait()
            peak_cpu = time.process_time() - cpu0
            peak_wall = time.time() - start
            nursery.cancel_scope.cancel()
    finally:
        for miner in miners:
            miner.close()
    return {
        "connections": n,
        "connect_s": connect_s,
        "swarm_cpu_s": peak_cpu,
        "swarm_wall_s": peak_wall,
        "updates": [m.update_at - start for m in miners if m.update_at is not None],
        "dones": [m.done_at - start for m in miners if m.done_at is not None],
        "sends": [m.sent_at_ - start for m in miners if m.sent_at_ is not None],
        "answers": [m.answered_at - start for m in miners if m.answered_at is not None],
        "success_total": sum(m.stored for m in miners),
    }


def spread(cfg: dict[str, Any]) -> dict[str, Any]:
    """Run the miners in ``procs`` children, signal the validator once all are connected, merge."""
    procs, n = cfg["procs"], cfg["connections"]
    bounds = [n * k // procs for k in range(procs + 1)]
    children = [
        subprocess.Popen(
            [sys.executable, __file__, "-"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        for _ in range(procs)
    ]
    try:
        for k, proc in enumerate(children):
            assert proc.stdin is not None
            proc.stdin.write(json.dumps({**cfg, "procs": 1, "child": True, "first": bounds[k],
                                         "connections": bounds[k + 1] - bounds[k]}) + "\n")
            proc.stdin.flush()
        for proc in children:
            assert proc.stdout is not None
            line = proc.stdout.readline().strip()
            if line != "ready":  # its one JSON line says why
                raise RuntimeError(f"a swarm child failed before its miners were connected: {line[-300:]}")
        time.sleep(cfg["settle"])
        start = time.time()
        os.kill(cfg["server_pid"], signal.SIGUSR1)
        for proc in children:
            assert proc.stdin is not None
            proc.stdin.write(f"{start!r}\n")
            proc.stdin.flush()
        parts = []
        for proc in children:
            assert proc.stdout is not None
            part = json.loads(proc.stdout.read().strip().splitlines()[-1])
            if not part.get("ok"):
                raise RuntimeError(part.get("error", "a swarm child failed"))
            parts.append(part)
    finally:
        for proc in children:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
    merged: dict[str, Any] = {
        key: [v for part in parts for v in part[key]] for key in ("updates", "dones", "sends", "answers")
    }
    merged.update(
        connections=n,
        connect_s=max(part["connect_s"] for part in parts),
        swarm_cpu_s=sum(part["swarm_cpu_s"] for part in parts),
        swarm_wall_s=max(part["swarm_wall_s"] for part in parts),
        success_total=sum(part["success_total"] for part in parts),
    )
    return merged


def summary(cfg: dict[str, Any], raw: dict[str, Any]) -> dict[str, Any]:
    n = raw["connections"]
    updates, dones, sends, answers = raw["updates"], raw["dones"], raw["sends"], raw["answers"]
    return {
        "connections": n,
        "games": cfg["games"],
        "procs": cfg["procs"],
        "connect_s": raw["connect_s"],
        "update_last_ms": max(updates) * 1e3 if len(updates) == n else math.inf,
        "sent_last_ms": max(sends) * 1e3 if sends else math.nan,
        "sent_median_ms": statistics.median(sends) * 1e3 if sends else math.nan,
        "answer_last_ms": max(answers) * 1e3 if answers else math.nan,
        "answer_median_ms": statistics.median(answers) * 1e3 if answers else math.nan,
        "miners_done": len(dones),
        # the miners' own CPU (all threads, all processes) from the signal to the last one
        # done: each real miner has a machine of its own, here they share this one's cores
        "swarm_cpu_s": raw["swarm_cpu_s"],
        "swarm_cpu_per_miner_ms": raw["swarm_cpu_s"] / n * 1e3,
        "swarm_wall_s": raw["swarm_wall_s"],
        "median_ms": statistics.median(dones) * 1e3 if dones else math.nan,
        "last_ms": max(dones) * 1e3 if len(dones) == n else math.inf,
        "success_total": raw["success_total"],
    }


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    cfg = {**DEFAULTS, **json.loads(sys.stdin.readline() if argv[1] == "-" else argv[1])}
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 8 * cfg["connections"] + 256
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want if hard == resource.RLIM_INFINITY else min(want, hard), hard))
    result: dict[str, Any] = {"scenario": "gameupdate"}
    try:
        if cfg.get("child"):
            result.update(trio.run(run, cfg))
        elif cfg["procs"] > 1:
            result.update(summary(cfg, spread(cfg)))
        else:
            result.update(summary(cfg, trio.run(run, cfg)))
        result["ok"] = True
    except BaseException as exc:  # report, never hang or traceback into the orchestrator
        result["ok"] = False
        result["error"] = f"{type(exc).__name__}: {exc}"[:500]
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
