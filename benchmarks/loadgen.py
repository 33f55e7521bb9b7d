"""Load generator: one asyncio ``websockets`` client process per scenario run.

    python benchmarks/loadgen.py CONFIG_JSON      # or '-' to read the config from stdin

prints one JSON object of results on stdout. Every frame (auth frames included)
is built and signed before the clock starts, in a small process pool, so the
generator is not the bottleneck; with ``"cache": PATH`` the frames are kept in
PATH and reused by the later runs of the same scenario while they are younger
than ``cache_max_age`` (the same frames for every contender; each run's server
is a fresh process with a fresh database, which never saw their nonces or ids).

Scenarios (``"scenario"``):

* ``throughput``: ``connections`` clients each keep ``inflight`` single-prediction
  messages in flight (a new one goes out per answer) for ``warmup`` +
  ``duration`` seconds; reports answers per second in the window;
* ``latency``: open loop at each offered rate of ``rates`` (predictions/s over
  all connections, sends scheduled in advance) for ``rate_duration`` s each;
  latency = receive time - scheduled send time; p50/p99 per rate; stops the
  sweep once p99 is over ``saturation_p99`` s;
* ``batched``: like throughput with ``batch_size`` predictions per message;
* ``scale``: ``connections`` authenticated idle clients: the server's RSS growth
  per connection and its CPU over ``cpu_window`` s (psutil on ``server_pid``);
* ``broadcast``: ``connections`` clients record when each game_update arrives;
  time from the update's ``data.timestamp`` to the last client having it;
* ``peak``: ``connections`` authenticated clients each send ``frames_per_conn``
  single-prediction frames at once (all connections together, as when a
  validator publishes new games); latency = answer received - that frame's
  send; p50/p99/max over every prediction, and the time to the last answer.

``"mode"`` says how answers are read: ``confirm`` (a validator: confirmations,
single or ``{"results": [...]}``, only ``status == "success"`` counts) or ``echo``
(the transport floor echoes each frame: every answer counts, matched in order).
"""

from __future__ import annotations

import asyncio
import gc
import json
import math
import os
import pickle
import statistics
import sys
import time
from collections import Counter, deque
from concurrent.futures import ProcessPoolExecutor
from typing import Any

from common import auth_wire, envelope_wire, make_prediction, miner_uri, parse_ts
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

DEFAULTS: dict[str, Any] = {
    "mode": "confirm",
    "connections": 8,
    "inflight": 16,
    "warmup": 1.0,
    "duration": 5.0,
    "max_extend": 20.0,
    "batch_size": 1,
    "frames_per_conn": 0,
    "rates": [250, 500, 1000, 2000, 4000],
    "rate_duration": 3.0,
    "saturation_p99": 1.0,
    "drain_timeout": 3.0,
    "wave": 100,
    "settle": 3.0,
    "cpu_window": 5.0,
    "hold": 7.5,
    "grace": 1.5,
    "features": ["batch"],
    "cache": None,
    "cache_max_age": 200.0,  # well inside the validators' 300 s timestamp window
    "workers": 2,
    "open_timeout": 30.0,
}


# --------------------------------------------------------------------------- frames


def _sign_chunk(
    indices: list[int], games: list[dict[str, Any]], frames_per_conn: int, batch_size: int,
    features: list[str] | None,
) -> list[tuple[bytes, list[bytes], list[list[str]]]]:
    """For each miner index: (auth frame, signed prediction frames, their prediction ids)."""
    from bittensor_wallet import Keypair

    out = []
    for index in indices:
        keypair = Keypair.create_from_uri(miner_uri(index))
        auth = auth_wire(keypair, features).encode()
        frames: list[bytes] = []
        ids: list[list[str]] = []
        for k in range(frames_per_conn):
            preds = [
                make_prediction(games[(index + k * batch_size + j) % len(games)], index)
                for j in range(batch_size)
            ]
            data = preds[0] if batch_size == 1 else {"predictions": preds}
            frames.append(envelope_wire(keypair, "prediction", data).encode())
            ids.append([p["prediction_id"] for p in preds])
        out.append((auth, frames, ids))
    return out


def build_frames(cfg: dict[str, Any]) -> tuple[list[tuple[bytes, list[bytes], list[list[str]]]], float, bool]:
    """Signed frames for every connection, from the cache when it fits; (conns, seconds, cached)."""
    started = time.perf_counter()
    key = [
        cfg["scenario"], cfg["connections"], cfg["frames_per_conn"], cfg["batch_size"],
        cfg["features"], [g["game_id"] for g in cfg["games"]],
    ]
    path = cfg.get("cache")
    if path and os.path.exists(path) and time.time() - os.path.getmtime(path) < cfg["cache_max_age"]:
        with open(path, "rb") as f:
            stored = pickle.load(f)
        if stored["key"] == key:
            return stored["conns"], time.perf_counter() - started, True
    n = cfg["connections"]
    workers = max(1, min(cfg["workers"], n))
    chunks = [list(range(w, n, workers)) for w in range(workers)]
    args = (cfg["games"], cfg["frames_per_conn"], cfg["batch_size"], cfg["features"] or None)
    if workers == 1:
        parts = [_sign_chunk(chunks[0], *args)]
    else:
        import multiprocessing

        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            parts = list(pool.map(_sign_chunk, chunks, *([a] * workers for a in args)))
    by_index: dict[int, tuple[bytes, list[bytes], list[list[str]]]] = {}
    for chunk, part in zip(chunks, parts, strict=True):
        by_index.update(zip(chunk, part, strict=True))
    conns = [by_index[i] for i in range(n)]
    if path:
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "wb") as f:
            pickle.dump({"key": key, "conns": conns}, f, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(tmp, path)
    return conns, time.perf_counter() - started, False


# --------------------------------------------------------------------------- connections


class Link:
    """One authenticated client connection and what it saw."""

    def __init__(self, ws: ClientConnection, welcome: dict[str, Any]) -> None:
        self.ws = ws
        self.welcome = welcome
        self.errors: Counter[str] = Counter()


async def open_link(url: str, auth: bytes, timeout: float) -> Link:  # noqa: ASYNC109
    ws = await connect(
        url, compression=None, proxy=None, ping_interval=None, open_timeout=timeout,
        close_timeout=2, max_size=16 << 20, max_queue=None,
    )
    try:
        await ws.send(auth, text=True)
        async with asyncio.timeout(timeout):
            welcome = json.loads(await ws.recv())
    except BaseException:
        await ws.close()
        raise
    if not isinstance(welcome, dict) or welcome.get("type") != "welcome":
        await ws.close()
        raise RuntimeError(f"auth refused: {str(welcome)[:200]}")
    return Link(ws, welcome)


async def open_links(cfg: dict[str, Any], auths: list[bytes]) -> list[Link]:
    """Connect and authenticate in waves of ``wave`` (no SYN backlog trouble)."""
    links: list[Link] = []
    wave = max(1, int(cfg["wave"]))
    for start in range(0, len(auths), wave):
        links += await asyncio.gather(
            *(open_link(cfg["url"], a, cfg["open_timeout"]) for a in auths[start : start + wave])
        )
    return links


async def close_links(links: list[Link]) -> None:
    async def close(link: Link) -> None:
        try:
            await link.ws.close()
        except Exception:
            pass

    try:
        async with asyncio.timeout(5):
            await asyncio.gather(*(close(lk) for lk in links))
    except TimeoutError:
        pass


def classify(raw: bytes | str, link: Link) -> list[tuple[Any, bool]] | None:
    """A validator's answer as [(prediction_id, success)]; None for frames that answer nothing."""
    try:
        msg = json.loads(raw)
    except ValueError:
        link.errors["unparseable frame"] += 1
        return [(None, False)]
    kind = msg.get("type") if isinstance(msg, dict) else None
    if kind == "confirmation":
        data = msg.get("data") or {}
        results = data["results"] if isinstance(data.get("results"), list) else [data]
        out = []
        for r in results:
            ok = r.get("status") == "success"
            if not ok:
                link.errors[f"confirmation error: {r.get('message')}"] += 1
            out.append((r.get("prediction_id"), ok))
        return out
    if kind == "error" or (isinstance(msg, dict) and msg.get("status") == "error"):
        message = (msg.get("data") or {}).get("message") or msg.get("message")
        link.errors[f"error: {message}"] += 1
        return [(None, False)]
    return None  # game_update, heartbeat, ...


# --------------------------------------------------------------------------- scenarios


async def closed_loop(cfg: dict[str, Any], links: list[Link], conns: list[Any]) -> dict[str, Any]:
    """throughput / batched: ``inflight`` frames per connection, one sent per frame answered.

    The window is ``duration`` s after ``warmup``, stretched (by at most
    ``max_extend`` s) until at least one pipeline's worth of frames
    (connections x inflight) was answered in it, so that a server answering in
    lumps (a slow one with batches) is not measured as zero.
    """
    echo = cfg["mode"] == "echo"
    batch = cfg["batch_size"]
    warmup, duration = cfg["warmup"], cfg["duration"]
    min_frames = cfg.get("min_window_frames") or len(links) * cfg["inflight"]
    t0 = time.perf_counter()
    start, end = t0 + warmup, t0 + warmup + duration
    give_up = end + cfg["max_extend"]
    stopped: list[float] = []  # when the window closed: the deadline, or frames ran out
    stop_now = asyncio.Event()
    in_window = 0
    logs: list[list[tuple[float, int]]] = [[] for _ in links]
    meter = CpuMeter(cfg)

    async def run(i: int) -> None:
        nonlocal in_window
        link, frames, log = links[i], conns[i][1], logs[i]
        ws = link.ws
        sent = 0
        for _ in range(min(cfg["inflight"], len(frames))):
            await ws.send(frames[sent], text=True)
            sent += 1
        while True:
            raw = await ws.recv(decode=False)
            now = time.perf_counter()
            if echo:
                done_frames, ok = 1, batch
            else:
                results = classify(raw, link)
                if results is None:
                    continue
                ok = sum(1 for _, s in results if s)
                done_frames = 1 if batch > 1 else len(results)
            log.append((now, ok))
            if now >= start:
                in_window += done_frames
            if now >= end and (in_window >= min_frames or now >= give_up):
                stopped.append(now)
                stop_now.set()
                return
            for _ in range(done_frames):
                if sent >= len(frames) and not echo:  # out of pre-signed frames: the window ends here
                    stopped.append(now)
                    stop_now.set()
                    return
                # the floor echoes without reading: it may have the same frames again
                await ws.send(frames[sent % len(frames)], text=True)
                sent += 1

    tasks = [asyncio.ensure_future(run(i)) for i in range(len(links))]
    waiter = asyncio.ensure_future(stop_now.wait())
    try:
        await asyncio.wait([waiter, *tasks], timeout=give_up - t0 + 30, return_when=asyncio.FIRST_COMPLETED)
        failed = [t for t in tasks if t.done() and t.exception() is not None]
        if failed:
            raise failed[0].exception()  # type: ignore[misc]
    finally:
        for task in [waiter, *tasks]:
            task.cancel()
        await asyncio.gather(waiter, *tasks, return_exceptions=True)
    if not stopped:
        raise TimeoutError("no answers: the server stopped answering")
    cpu = meter.read(sum(ok for log in logs for _, ok in log))
    stop = min(stopped)
    window = stop - start
    counted = sum(ok for log in logs for t, ok in log if start <= t <= stop)
    confirmed = sum(ok for log in logs for t, ok in log)
    return {
        "rate": counted / window if window > 0 else 0.0,
        "window": window,
        "counted": counted,
        "success_total": confirmed,  # every success answer received, in the window or not
        "frames_exhausted": stop < end,
        **cpu,
    }


def _pct(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]


async def open_loop(cfg: dict[str, Any], links: list[Link], conns: list[Any]) -> dict[str, Any]:
    """latency: each offered rate in turn, until one saturates (p99 over the limit)."""
    cursor = [0] * len(links)
    sweep: list[dict[str, Any]] = []
    for rate in cfg["rates"]:
        count = math.ceil(rate / len(links) * cfg["rate_duration"])
        if any(c + count > len(conn[1]) for c, conn in zip(cursor, conns, strict=True)):
            sweep.append({"rate": rate, "skipped": "not enough frames"})
            break
        point = await one_rate(cfg, links, conns, cursor, rate, count)
        sweep.append(point)
        cursor = [c + count for c in cursor]
        if point["p99_ms"] > cfg["saturation_p99"] * 1e3 or point["unanswered"]:
            point["saturated"] = True
            break
        await asyncio.sleep(0.3)
    return {"sweep": sweep, "success_total": sum(p.get("success_total", 0) for p in sweep)}


async def one_rate(
    cfg: dict[str, Any], links: list[Link], conns: list[Any], cursor: list[int], rate: float, count: int
) -> dict[str, Any]:
    """Open loop at ``rate``/s over all links: ``count`` frames each, sends scheduled in advance."""
    echo = cfg["mode"] == "echo"
    n = len(links)
    per_conn = rate / n
    latencies: list[float] = []
    errors = 0
    confirmed = 0
    pending: list[dict[str, float]] = [{} for _ in range(n)]
    fifo: list[deque[float]] = [deque() for _ in range(n)]
    remaining = [count] * n
    loop = asyncio.get_running_loop()
    base = loop.time() + 0.05

    async def sender(i: int) -> None:
        ws, frames, ids = links[i].ws, conns[i][1], conns[i][2]
        first = cursor[i]
        for k in range(count):
            sched = base + (i / n + k) / per_conn
            delay = sched - loop.time() - 0.0005  # epoll rounds its timeout up to 1 ms
            if delay > 0:
                await asyncio.sleep(delay)
            start = min(sched, loop.time())  # early by < 0.5 ms: time from the real send
            if echo:
                fifo[i].append(start)
            else:
                pending[i][ids[first + k][0]] = start
            await ws.send(frames[first + k], text=True)

    async def receiver(i: int) -> None:
        nonlocal errors, confirmed
        link = links[i]
        while remaining[i] > 0:
            raw = await link.ws.recv(decode=False)
            now = loop.time()
            if echo:
                latencies.append(now - fifo[i].popleft())
                remaining[i] -= 1
                continue
            results = classify(raw, link)
            if results is None:
                continue
            for pid, ok in results:
                remaining[i] -= 1
                sched = pending[i].pop(pid, None)
                if sched is None or not ok:
                    errors += 1
                else:
                    confirmed += 1
                if sched is not None:
                    latencies.append(now - sched)

    receivers = [asyncio.ensure_future(receiver(i)) for i in range(n)]
    meter = CpuMeter(cfg)
    async with asyncio.timeout(cfg["rate_duration"] + 60):
        await asyncio.gather(*(sender(i) for i in range(n)))
    sent_done = loop.time()
    _, unfinished = await asyncio.wait(receivers, timeout=max(cfg["drain_timeout"], 1.0))
    lost = 0
    if unfinished:
        for task in unfinished:
            task.cancel()
        await asyncio.gather(*unfinished, return_exceptions=True)
        now = loop.time()
        for i in range(n):  # unanswered: at least this late
            stale = list(fifo[i]) if echo else list(pending[i].values())
            lost += len(stale)
            latencies += [now - s for s in stale]
    return {
        "rate": rate,
        "sent": count * n,
        "p50_ms": _pct(latencies, 0.50) * 1e3,
        "p90_ms": _pct(latencies, 0.90) * 1e3,
        "p99_ms": _pct(latencies, 0.99) * 1e3,
        "max_ms": max(latencies) * 1e3 if latencies else math.nan,
        "errors": errors,
        "success_total": confirmed,
        "unanswered": lost,
        "drain_s": loop.time() - sent_done,
        **meter.read(count * n),
    }


def _server(pid: int | None) -> Any:
    if not pid:
        return None
    import psutil

    return psutil.Process(pid)


def _cpu(proc: Any) -> float:
    """CPU seconds of the server, its child processes included (benchmarks/workers.py)."""
    import psutil

    total = 0.0
    for p in (proc, *proc.children(recursive=True)):
        try:
            t = p.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += t.user + t.system
    return total


class CpuMeter:
    """The server's and this load generator's CPU over a stretch of a run: is either saturated?"""

    def __init__(self, cfg: dict[str, Any]) -> None:
        self.proc = _server(cfg.get("server_pid"))
        self.server0 = _cpu(self.proc) if self.proc is not None else math.nan
        self.client0 = time.process_time()
        self.wall0 = time.perf_counter()

    def read(self, predictions: int) -> dict[str, float]:
        wall = time.perf_counter() - self.wall0
        server = (_cpu(self.proc) - self.server0) if self.proc is not None else math.nan
        client = time.process_time() - self.client0
        return {
            "server_cpu_s": server,
            "server_cpu_us": server / max(1, predictions) * 1e6,
            "server_cpu_pct": server / wall * 100,  # of one core; above 100 on two workers
            "client_cpu_s": client,
            "client_cpu_pct": client / wall * 100,  # the load generator is one process, one core
        }


async def peak(cfg: dict[str, Any], links: list[Link], conns: list[Any]) -> dict[str, Any]:
    """peak: every connection sends all its frames at once; send-to-answer per prediction."""
    echo = cfg["mode"] == "echo"
    n = len(links)
    loop = asyncio.get_running_loop()
    latencies: list[float] = []
    pending: list[dict[str, float]] = [{} for _ in range(n)]
    fifo: list[deque[float]] = [deque() for _ in range(n)]
    remaining = [len(conns[i][1]) for i in range(n)]
    errors = confirmed = 0
    last_answer = 0.0

    async def sender(i: int) -> None:
        ws, frames, ids = links[i].ws, conns[i][1], conns[i][2]
        for frame, pids in zip(frames, ids, strict=True):
            now = loop.time()
            if echo:
                fifo[i].append(now)
            else:
                for pid in pids:
                    pending[i][pid] = now
            await ws.send(frame, text=True)

    async def receiver(i: int) -> None:
        nonlocal errors, confirmed, last_answer
        link = links[i]
        while remaining[i] > 0:
            raw = await link.ws.recv(decode=False)
            now = loop.time()
            if echo:
                latencies.append(now - fifo[i].popleft())
                remaining[i] -= 1
                last_answer = max(last_answer, now)
                continue
            results = classify(raw, link)
            if results is None:
                continue
            for pid, ok in results:
                remaining[i] -= 1
                sent = pending[i].pop(pid, None)
                if sent is None or not ok:
                    errors += 1
                else:
                    confirmed += 1
                if sent is not None:
                    latencies.append(now - sent)
            last_answer = max(last_answer, now)

    await asyncio.sleep(cfg["settle"])  # the connections' own setup work is over
    meter = CpuMeter(cfg)
    receivers = [asyncio.ensure_future(receiver(i)) for i in range(n)]
    start = loop.time()
    await asyncio.gather(*(sender(i) for i in range(n)))
    sent_s = loop.time() - start
    _, unfinished = await asyncio.wait(receivers, timeout=cfg["drain_timeout"])
    lost = 0
    if unfinished:
        for task in unfinished:
            task.cancel()
        await asyncio.gather(*unfinished, return_exceptions=True)
        now = loop.time()
        for i in range(n):  # unanswered: at least this late
            stale = list(fifo[i]) if echo else list(pending[i].values())
            lost += len(stale)
            latencies += [now - s for s in stale]
    return {
        "sent": sum(len(c[1]) for c in conns),
        "send_s": sent_s,
        # the server's CPU time (all its threads and processes) over the burst, per prediction
        **meter.read(sum(len(ids) for c in conns for ids in c[2])),
        "p50_ms": _pct(latencies, 0.50) * 1e3,
        "p99_ms": _pct(latencies, 0.99) * 1e3,
        "max_ms": max(latencies) * 1e3 if latencies else math.nan,
        "last_ms": ((last_answer - start) * 1e3) if last_answer and not lost else math.inf,
        "errors": errors,
        "success_total": confirmed,
        "unanswered": lost,
    }


async def _drain(link: Link) -> None:
    try:
        async for _ in link.ws:
            pass
    except ConnectionClosed:
        pass


async def scale(cfg: dict[str, Any], conns: list[Any]) -> dict[str, Any]:
    """scale: RSS per idle authenticated connection and idle CPU of the server."""
    proc = _server(cfg.get("server_pid"))
    if proc is None:
        raise RuntimeError("scale needs server_pid")
    await asyncio.sleep(1.0)
    rss0 = proc.memory_info().rss
    t = time.perf_counter()
    links = await open_links(cfg, [c[0] for c in conns])
    connect_s = time.perf_counter() - t
    drains = [asyncio.ensure_future(_drain(lk)) for lk in links]
    await asyncio.sleep(cfg["settle"])
    rss1 = proc.memory_info().rss
    c0, w0 = _cpu(proc), time.perf_counter()
    await asyncio.sleep(cfg["cpu_window"])
    c1, w1 = _cpu(proc), time.perf_counter()
    still_open = sum(1 for d in drains if not d.done())
    await close_links(links)
    for d in drains:
        d.cancel()
    await asyncio.gather(*drains, return_exceptions=True)
    return {
        "connections": len(links),
        "connect_s": connect_s,
        "rss_before_mib": rss0 / 2**20,
        "rss_after_mib": rss1 / 2**20,
        "rss_per_conn_kib": (rss1 - rss0) / len(links) / 1024,
        "idle_cpu_pct": (c1 - c0) / (w1 - w0) * 100,
        "still_open": still_open,
    }


async def broadcast(cfg: dict[str, Any], conns: list[Any]) -> dict[str, Any]:
    """broadcast: from an update's creation (data.timestamp) to the last client having it.

    Updates are told apart by their ``data.timestamp``. Only broadcasts count:
    created after every client was connected, and at least ``grace`` s before
    the end of the hold (so one still being delivered is not cut short); an
    update one client alone got (our validator's catch-up update right after
    each Welcome) is not a broadcast. One that some client never got counts as
    infinitely late.
    """
    links = await open_links(cfg, [c[0] for c in conns])
    all_connected = time.time()
    logs: list[list[tuple[float, bytes]]] = [[] for _ in links]

    async def record(i: int) -> None:
        ws, log = links[i].ws, logs[i]
        try:
            while True:
                raw = await ws.recv(decode=False)
                log.append((time.time(), raw))
        except ConnectionClosed:
            pass

    tasks = [asyncio.ensure_future(record(i)) for i in range(len(links))]
    await asyncio.sleep(cfg["hold"])
    hold_end = time.time()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    closed = sum(1 for lk in links if lk.ws.close_code is not None)
    await close_links(links)
    arrivals: dict[float, dict[int, float]] = {}
    for i, log in enumerate(logs):
        for t, raw in log:
            msg = json.loads(raw)
            if msg.get("type") != "game_update":
                continue
            created = parse_ts((msg.get("data") or {}).get("timestamp"))
            if created is None:
                continue
            arrivals.setdefault(created.timestamp(), {}).setdefault(i, t)
    n = len(links)
    updates = []
    singles = 0
    for created, got in sorted(arrivals.items()):
        if len(got) == 1 and n > 1:
            singles += 1
            continue
        if created <= all_connected or created > hold_end - cfg["grace"]:
            continue
        times = sorted(got.values())
        updates.append(
            {
                "received_by": len(got),
                "first_ms": (times[0] - created) * 1e3,
                "median_ms": (times[len(times) // 2] - created) * 1e3,
                "last_ms": (times[-1] - created) * 1e3 if len(got) == n else math.inf,
            }
        )
    lasts = [u["last_ms"] for u in updates]
    return {
        "connections": n,
        "updates": updates,
        "complete_updates": sum(1 for u in updates if u["received_by"] == n),
        "incomplete_updates": sum(1 for u in updates if u["received_by"] < n),
        "single_client_updates": singles,
        "last_ms": statistics.median(lasts) if lasts else math.nan,
        "median_client_ms": statistics.median(u["median_ms"] for u in updates) if updates else math.nan,
        "closed_during_hold": closed,
    }


# --------------------------------------------------------------------------- main


async def run(cfg: dict[str, Any], conns: list[Any]) -> dict[str, Any]:
    scenario = cfg["scenario"]
    if scenario == "scale":
        return await scale(cfg, conns)
    if scenario == "broadcast":
        return await broadcast(cfg, conns)
    links = await open_links(cfg, [c[0] for c in conns])
    try:
        if scenario in ("throughput", "batched"):
            out = await closed_loop(cfg, links, conns)
        elif scenario == "latency":
            out = await open_loop(cfg, links, conns)
        elif scenario == "peak":
            out = await peak(cfg, links, conns)
        else:
            raise ValueError(f"unknown scenario {scenario!r}")
        errors: Counter[str] = Counter()
        for lk in links:
            errors.update(lk.errors)
        out["errors"] = dict(errors.most_common(10))
        out["welcome_features"] = (links[0].welcome.get("data") or {}).get("features")
        return out
    finally:
        await close_links(links)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    raw = sys.stdin.read() if argv[1] == "-" else argv[1]
    cfg = {**DEFAULTS, **json.loads(raw)}
    if "games_file" in cfg and "games" not in cfg:
        with open(cfg["games_file"], encoding="utf-8") as f:
            cfg["games"] = json.load(f)
    cfg.setdefault("games", [])
    if cfg["scenario"] == "latency" and not cfg["frames_per_conn"]:
        cfg["frames_per_conn"] = sum(
            math.ceil(r / cfg["connections"] * cfg["rate_duration"]) for r in cfg["rates"]
        )
    conns, sign_s, cached = build_frames(cfg)
    gc.collect()
    gc.freeze()  # the pre-signed frames never need scanning
    gc.disable()  # and no collector pauses in the measurements
    result: dict[str, Any] = {"scenario": cfg["scenario"], "presign_s": sign_s, "cached": cached}
    try:
        result.update(asyncio.run(run(cfg, conns)))
        result["ok"] = True
    except BaseException as exc:  # report, never hang or traceback into the orchestrator
        result["ok"] = False
        result["error"] = f"{type(exc).__name__}: {exc}"[:500]
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
