"""``bettensor-ws demo``: a validator and miners on loopback, a progress bar, a summary.

Halfway through, two miners' links are cut on purpose, to show reconnects and
resends (the demo says so when it does). The progress bar is drawn only when
stderr is a terminal; otherwise a line is printed at the start and the end.
The exit status is 0 only when every prediction made was confirmed or
rejected, and the validator stored exactly the confirmed ones.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import trio
from bittensor_wallet import Keypair

from . import MinerNode, ValidatorNode
from .feed import SimulatedFeed

__all__ = ["run_demo"]

_BAR = 30


def _bar_on() -> bool:
    """Carriage-return redraws only make sense on a terminal: in a log file or a pipe
    they are one endless line."""
    return sys.stderr.isatty()


class _DemoMiner(MinerNode):
    """A miner that can be told to stop predicting, so the demo can drain for good.

    Without the gate a game update still in flight when the drain finds
    nothing pending adds a prediction nobody waits for, and the summary
    counts it as lost.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.predicting = True
        self.busy = 0

    async def trigger_predictions_for_updated_games(
        self, games: Sequence[dict[str, Any]], validator_hotkey: str | None = None
    ) -> list[str]:
        if not self.predicting:
            return []
        self.busy += 1
        try:
            return await super().trigger_predictions_for_updated_games(games, validator_hotkey)
        finally:
            self.busy -= 1


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def run_demo(miners: int = 8, games: int = 20, duration: float = 20.0) -> int:
    with tempfile.TemporaryDirectory(prefix="bettensor-ws-demo-") as tmp:
        return await _demo(Path(tmp), miners, games, duration)


async def _demo(tmp: Path, n_miners: int, n_games: int, duration: float) -> int:
    validator = ValidatorNode(
        Keypair.create_from_uri("//Alice"), tmp / "validator.db", heartbeat_interval=5.0
    )
    feed = SimulatedFeed(n_games, owner=validator.hotkey)
    nodes: list[_DemoMiner] = []
    started = time.monotonic()
    async with trio.open_nursery() as nursery:
        port = await nursery.start(validator.serve)
        url = f"ws://127.0.0.1:{port}/ws"
        await validator.update_games(feed.tick(0))
        for i in range(n_miners):
            node = _DemoMiner(
                Keypair.create_from_uri(f"//Miner{i}"),
                [(validator.hotkey, url)],
                tmp / f"miner{i}.db",
                heartbeat_interval=5.0,
                reconnect_base_interval=0.2,
                max_reconnect_interval=2.0,
            )
            nodes.append(node)
            await nursery.start(node.run)
        print(f"demo: validator on {url}, {n_miners} miners, {n_games} games, {duration:g}s", file=sys.stderr)
        print("demo: halfway through, two miners' links are cut on purpose, to show that they "
              "reconnect and resend what was not confirmed", file=sys.stderr)
        deadline = trio.current_time() + duration
        cut = False
        next_game = trio.current_time() + 1.0
        while trio.current_time() < deadline:
            await trio.sleep(0.25)
            now = trio.current_time()
            if now >= next_game:
                feed.add_game()
                next_game = now + 1.0
            await validator.update_games(feed.tick())
            if not cut and now >= deadline - duration / 2:
                cut = True
                _say(f"cutting the links of {min(2, len(nodes))} miners on purpose (1012): "
                     "watch them reconnect and resend")
                for node in nodes[:2]:
                    conn = validator.connection(node.hotkey)
                    if conn is not None:
                        conn.close(1012, "demo: link cut")
            await _progress(nodes, duration - (deadline - now), duration)
        for node in nodes:
            node.predicting = False
        with trio.move_on_after(30):
            # Once no miner is inside its strategy, no new prediction can appear.
            while any(node.busy for node in nodes):  # noqa: ASYNC110
                await trio.sleep(0.05)
            while await _progress(nodes, duration, duration, draining=True):  # noqa: ASYNC110
                await trio.sleep(0.25)  # polls several databases: no single event to wait on
        if _bar_on():
            print(file=sys.stderr)
        elapsed = time.monotonic() - started
        nursery.cancel_scope.cancel()
    code = _summary(validator, nodes, elapsed)
    for node in nodes:
        node.close()
    validator.close()
    return code


def _say(text: str) -> None:
    """A line on stderr, below the bar if one is drawn."""
    print(("\n" if _bar_on() else "") + f"demo: {text}", file=sys.stderr, flush=True)


async def _progress(nodes: Sequence[MinerNode], done: float, total: float, draining: bool = False) -> int:
    """Redraw the bar (on a terminal only); returns how many deliveries are still pending."""
    counts: Counter[str] = Counter()
    for node in nodes:
        counts.update(await node.db.run(node.store.counts))
    if not _bar_on():
        return counts["pending"]
    filled = int(_BAR * min(1.0, done / total)) if total > 0 else _BAR
    label = "draining" if draining else f"{done:5.1f}s/{total:g}s"
    sys.stderr.write(
        f"\r[{'#' * filled}{' ' * (_BAR - filled)}] {label}  "
        f"confirmed {counts['confirmed']}  rejected {counts['rejected']}  pending {counts['pending']}   "
    )
    sys.stderr.flush()
    return counts["pending"]


def _summary(validator: ValidatorNode, nodes: Sequence[MinerNode], elapsed: float) -> int:
    made = confirmed = rejected = pending = 0
    reasons: Counter[str] = Counter()
    confirmed_ids: set[str] = set()
    latencies: list[float] = []
    reconnects = 0
    for node in nodes:
        counts = node.store.counts()
        made += sum(counts.values())
        confirmed += counts["confirmed"]
        rejected += counts["rejected"]
        pending += counts["pending"]
        for row in node.store.db.execute(
            "SELECT prediction_id, state, reason FROM deliveries WHERE state != 'pending'"
        ):
            if row[1] == "confirmed":
                confirmed_ids.add(row[0])
            else:
                reasons[row[2] or "unknown"] += 1
        latencies.extend(node.latencies)
        reconnects += node.stats()["reconnects"]
    stored = validator.store.prediction_ids()
    agree = stored == confirmed_ids
    lost = made - confirmed - rejected
    stats = validator.stats()
    frames = sum(stats["frames_in"].values()) + sum(stats["frames_out"].values())
    rows = [
        ("predictions made", str(made)),
        ("confirmed", str(confirmed)),
        ("rejected", str(rejected)),
        *[(f"  rejected: {reason}", str(n)) for reason, n in reasons.most_common()],
        ("pending (lost)", str(lost)),
        ("validator stored", f"{len(stored)} ({'matches' if agree else 'DOES NOT match'} confirmed)"),
        ("p50 confirmation latency", f"{_percentile(latencies, 0.50) * 1000:.1f} ms"),
        ("p99 confirmation latency", f"{_percentile(latencies, 0.99) * 1000:.1f} ms"),
        ("reconnects", str(reconnects)),
        ("frames/s (validator)", f"{frames / elapsed:.0f}"),
        ("mean latency", f"{statistics.fmean(latencies) * 1000:.1f} ms" if latencies else "n/a"),
    ]
    width = max(len(k) for k, _ in rows)
    print(f"| {'metric'.ljust(width)} | value |")
    print(f"| {'-' * width} | ----- |")
    for key, value in rows:
        print(f"| {key.ljust(width)} | {value} |")
    ok = lost == 0 and pending == 0 and agree
    print("nothing lost" if ok else "PREDICTIONS LOST OR DATABASES DISAGREE")
    return 0 if ok else 1
