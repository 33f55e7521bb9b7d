"""``GET /health`` and ``GET /metrics`` (Prometheus text) for a validator or a miner.

Nothing here runs per frame: the link counters that already exist (the
manager's ``stats()``, each link's send queue) are read when Prometheus
scrapes, by a custom collector; the histograms are observed once per group
commit and once per confirmation message. Each node has its own
:class:`~prometheus_client.CollectorRegistry` (a process may hold many nodes).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import orjson
import trio
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ..link.http import HttpResponse, HttpRoute
from .store import PredictionResult


class _Node(Protocol):
    """What the metrics read of a node: described here, so that metrics need not
    import the nodes that own them."""

    @property
    def db(self) -> Any: ...
    @property
    def store(self) -> Any: ...
    def stats(self) -> dict[str, Any]: ...
    def send_queue_depths(self) -> list[int]: ...


class ValidatorNodeView(_Node, Protocol):
    @property
    def committer(self) -> Any: ...
    @property
    def committing(self) -> bool: ...
    @property
    def connected_hotkeys(self) -> list[str]: ...
    def pending_commits(self) -> int: ...


class MinerNodeView(_Node, Protocol):
    @property
    def connected_validators(self) -> Any: ...

__all__ = ["PREFIX", "MinerMetrics", "ValidatorMetrics"]

PREFIX = "bettensor_ws"

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
COMMIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

WRITE_CHECK_INTERVAL = 5.0
"""Seconds a /health answer about the database's writability is reused."""

WriteMany = Callable[[Sequence[Any]], list[list[list[PredictionResult]] | Exception]]


def _json(status: int, body: dict[str, Any]) -> HttpResponse:
    return status, "application/json", orjson.dumps(body) + b"\n"


class _LinkCollector(Collector):
    """The manager's counters and the links' send queues, read at scrape time."""

    def __init__(self, metrics: _NodeMetrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        node = self._metrics.node
        stats = node.stats()
        yield GaugeMetricFamily(f"{PREFIX}_connections", "Authenticated links open now", value=stats["connections"])
        yield CounterMetricFamily(
            f"{PREFIX}_connections_opened", "Links authenticated since start", value=stats["connections_total"]
        )
        frames_in = CounterMetricFamily(f"{PREFIX}_frames_received", "Frames received, by message type", labels=["type"])
        for kind, n in sorted(stats["frames_in"].items()):
            frames_in.add_metric([kind], n)
        yield frames_in
        frames_out = CounterMetricFamily(f"{PREFIX}_frames_sent", "Frames sent, by message type", labels=["type"])
        for kind, n in sorted(stats["frames_out"].items()):
            frames_out.add_metric([kind], n)
        yield frames_out
        refusals = CounterMetricFamily(f"{PREFIX}_refusals", "Refusals, by kind", labels=["kind"])
        for kind, n in sorted(stats["rejections"].items()):
            refusals.add_metric([kind], n)
        yield refusals
        yield CounterMetricFamily(f"{PREFIX}_reconnects", "Reconnect attempts (miner)", value=stats["reconnects"])
        yield CounterMetricFamily(
            f"{PREFIX}_dropped_broadcasts", "Broadcasts dropped for a full send queue",
            value=stats["dropped_broadcasts"],
        )
        yield CounterMetricFamily(
            f"{PREFIX}_paced_frames", "Frames read late: their peer was above its rate", value=stats["paced_frames"]
        )
        depths = node.send_queue_depths()
        yield GaugeMetricFamily(f"{PREFIX}_send_queue_depth_sum", "Frames queued to send, all links", value=sum(depths))
        yield GaugeMetricFamily(
            f"{PREFIX}_send_queue_depth_max", "Frames queued to send on the fullest link", value=max(depths, default=0)
        )
        yield GaugeMetricFamily(f"{PREFIX}_uptime_seconds", "Seconds since the node started", value=stats["uptime"])
        yield from self._metrics.extra()


class _NodeMetrics:
    def __init__(self, node: _Node) -> None:
        self.node = node
        self.registry = CollectorRegistry(auto_describe=False)
        self.confirmation_latency = Histogram(
            f"{PREFIX}_confirmation_latency_seconds",
            "Seconds from a prediction frame to its confirmation",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_LinkCollector(self))
        self._check_lock = trio.Lock()
        self._checked: tuple[float, bool] | None = None

    def extra(self) -> Iterator[Metric]:
        """The node's own families, from values taken before the scrape."""
        return iter(())

    def routes(self) -> dict[str, HttpRoute]:
        return {"/health": self.health, "/metrics": self.metrics}

    async def health(self) -> HttpResponse:
        raise NotImplementedError

    async def metrics(self) -> HttpResponse:
        await self.refresh()
        return 200, CONTENT_TYPE_LATEST, generate_latest(self.registry)

    async def refresh(self) -> None:
        """Read what the collector needs from the database (on the DB thread)."""

    async def _writable(self) -> bool:
        """Whether the database takes a write, tried at most once per
        ``WRITE_CHECK_INTERVAL``: the port is public, and each try is a commit."""
        async with self._check_lock:
            now = trio.current_time()
            if self._checked is None or now - self._checked[0] >= WRITE_CHECK_INTERVAL:
                self._checked = (now, await self.node.db.run(self.node.store.writable))
            return self._checked[1]


class ValidatorMetrics(_NodeMetrics):
    """The validator's metrics: the link counters, predictions stored and refused,
    commit time and confirmation latency."""

    node: ValidatorNodeView

    def __init__(self, node: ValidatorNodeView) -> None:
        super().__init__(node)
        self.commit_seconds = Histogram(
            f"{PREFIX}_commit_seconds",
            "Seconds one group commit (one transaction, one fsync) took",
            buckets=COMMIT_BUCKETS,
            registry=self.registry,
        )
        # written only by the DB thread, read by scrapes
        self.stored = 0
        self.refused = 0

    def timed(self, write_many: WriteMany) -> WriteMany:
        """``write_many`` that observes its commit time and counts the results of
        what it stored (it runs on the committer's write thread, once per commit)."""

        def run(batches: Sequence[Any]) -> list[list[list[PredictionResult]] | Exception]:
            started = time.perf_counter()
            outcomes = write_many(batches)
            self.commit_seconds.observe(time.perf_counter() - started)
            total = stored = 0
            for outcome in outcomes:
                if isinstance(outcome, Exception):
                    continue
                for group in outcome:
                    total += len(group)
                    stored += sum(1 for result in group if result.get("status") == "success")
            self.stored += stored
            self.refused += total - stored
            return outcomes

        return run

    def extra(self) -> Iterator[Metric]:
        node = self.node
        yield CounterMetricFamily(
            f"{PREFIX}_predictions_stored", "Predictions answered success after their commit", value=self.stored
        )
        yield CounterMetricFamily(
            f"{PREFIX}_predictions_refused", "Predictions answered with an error by the rules", value=self.refused
        )
        yield CounterMetricFamily(f"{PREFIX}_commit_groups", "Group commits", value=node.committer.groups)
        yield GaugeMetricFamily(
            f"{PREFIX}_pending_commits", "Prediction frames waiting for their group commit",
            value=node.pending_commits(),
        )

    async def health(self) -> HttpResponse:
        writable = await self._writable()
        ok = writable and self.node.committing
        return _json(200 if ok else 503, {
            "status": "ok" if ok else "degraded",
            "role": "validator",
            "connected_miners": len(self.node.connected_hotkeys),
            "pending_commits": self.node.pending_commits(),
            "database_writable": writable,
        })


class MinerMetrics(_NodeMetrics):
    """The miner's metrics: the link counters and its outbox."""

    node: MinerNodeView

    def __init__(self, node: MinerNodeView) -> None:
        super().__init__(node)
        self._counts: dict[str, int] = {"pending": 0, "confirmed": 0, "rejected": 0}
        self._oldest: float = 0.0

    async def refresh(self) -> None:
        self._counts, self._oldest = await self.node.db.run(self._read_outbox)

    def _read_outbox(self) -> tuple[dict[str, int], float]:
        store = self.node.store
        ages = [store.oldest_pending(v) for v in store.validators()]
        return store.counts(), max((a for a in ages if a is not None), default=0.0)

    def extra(self) -> Iterator[Metric]:
        outbox = GaugeMetricFamily(
            f"{PREFIX}_outbox_deliveries", "Deliveries (prediction, validator) by state", labels=["state"]
        )
        for state, n in sorted(self._counts.items()):
            outbox.add_metric([state], n)
        yield outbox
        yield GaugeMetricFamily(
            f"{PREFIX}_outbox_oldest_pending_seconds", "Age of the oldest prediction still pending (0: none)",
            value=self._oldest,
        )

    async def health(self) -> HttpResponse:
        writable = await self._writable()
        await self.refresh()
        return _json(200 if writable else 503, {
            "status": "ok" if writable else "degraded",
            "role": "miner",
            "connected_validators": len(self.node.connected_validators),
            "pending": self._counts["pending"],
            "oldest_pending_seconds": round(self._oldest, 3),
            "database_writable": writable,
        })
