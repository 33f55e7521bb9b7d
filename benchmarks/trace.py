"""Where one prediction's time goes inside our validator, step by step.

    python benchmarks/trace.py [--rate 1000] [--seconds 3] [--connections 8] [--batch] [--peak]

Runs a ``ValidatorNode`` in this process (built as the CLI builds it, with the
CLI's switch interval), timestamps every prediction at each step of its path
through the validator, drives it with benchmarks/loadgen.py (its own process:
the latency scenario at ``--rate`` predictions/s, or with ``--peak`` the peak
scenario (a): 256 connections x 40 predictions at once), and prints, for each
step, the p50/p90/p99/max of the time since the previous one, in ms:

* ``ws reader``: trio-websocket's reader task has the whole frame (it hands
  it to ours through its channel);
* ``our reader``: our reader task took it (``get_message`` returned);
* ``admitted``: parsed, checked and its signature verified (``LinkProtocol.receive``);
* ``queued``: the handler queued it for the group commit;
* ``decided``: the committer's decision thread has answered its group (the
  rules, against what is stored and what earlier groups decided);
* ``db start`` / ``db done``: the write thread started / finished the commit
  that took the group (insert, COMMIT with its fsync; every group decided while
  the commit before was written shares it), while the next groups are decided;
* ``answered``: back on the loop, the committer handed the results to the link;
* ``sent``: the confirmation's bytes were handed to the socket (signed on the
  way, by the committer for a peer without ``batch``, by the writer for one with
  it; a burst of answers to one peer goes out in one write).

The hooks wrap methods of this process's classes; they cost a few µs per step,
so the totals run a little above ``run.py``'s. ``--batch`` makes the clients
announce ``batch`` (single predictions all the same, confirmed in batched
results); without it they are reference-format peers, one confirmation each.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from collections import defaultdict, deque
from pathlib import Path
from typing import Any

import orjson
import trio
import trio_websocket
from bittensor_wallet import Keypair
from common import LISTENING, VALIDATOR_URI, make_games

from bettensor_ws.link import connection as connection_mod
from bettensor_ws.node import ValidatorNode
from bettensor_ws.node import committer as committer_mod
from bettensor_ws.node.cli import SWITCH_INTERVAL
from bettensor_ws.protocol import link as link_mod

HERE = Path(__file__).resolve().parent
STEPS = ("ws reader", "our reader", "admitted", "queued", "decided", "db start", "db done", "answered", "sent")
clock = time.perf_counter


class Tracer:
    """Timestamps per prediction id, and per connection for frames not yet parsed."""

    def __init__(self) -> None:
        self.frames: dict[int, deque[float]] = defaultdict(deque)  # id(ws) -> frame completions
        self.ws_of: dict[int, Any] = {}  # id(protocol) -> ws
        self.marks: dict[str, dict[str, float]] = {}

    def mark(self, pids: Any, step: str, at: float | None = None) -> None:
        at = clock() if at is None else at
        for pid in pids:
            self.marks.setdefault(pid, {}).setdefault(step, at)

    def sent(self, message: str | bytes, at: float) -> None:
        try:
            data = orjson.loads(message).get("data") or {}
        except orjson.JSONDecodeError:
            return
        results = data.get("results") if isinstance(data.get("results"), list) else [data]
        self.mark([r.get("prediction_id") for r in results if isinstance(r, dict)], "sent", at)

    def install(self) -> None:
        tracer = self
        ws_cls = trio_websocket.WebSocketConnection
        handle_message = ws_cls._handle_message_event
        send_message = ws_cls.send_message

        async def traced_handle_message(self: Any, event: Any) -> None:
            if event.message_finished:
                tracer.frames[id(self)].append(clock())
            await handle_message(self, event)

        async def traced_send_message(self: Any, message: str | bytes) -> None:
            await send_message(self, message)
            tracer.sent(message, clock())

        send_messages = connection_mod.send_messages

        async def traced_send_messages(ws: Any, texts: Any) -> None:
            if len(texts) == 1:
                await ws.send_message(texts[0])  # the traced send_message
                return
            await send_messages(ws, texts)
            now = clock()
            for text in texts:
                tracer.sent(text, now)

        ws_cls._handle_message_event = traced_handle_message  # type: ignore[method-assign]
        ws_cls.send_message = traced_send_message  # type: ignore[method-assign]
        connection_mod.send_messages = traced_send_messages  # type: ignore[assignment]

        conn_cls = connection_mod.LinkConnection
        conn_init = conn_cls.__init__

        def traced_conn_init(self: Any, ws: Any, protocol: Any, dispatcher: Any) -> None:
            conn_init(self, ws, protocol, dispatcher)
            tracer.ws_of[id(protocol)] = ws
            tracer.frames[id(ws)].clear()  # the auth frame was read by the handshake

        conn_cls.__init__ = traced_conn_init  # type: ignore[method-assign]

        proto_cls = link_mod.LinkProtocol
        receive = proto_cls.receive

        def traced_receive(self: Any, raw: str | bytes, *, now: float, wall: float) -> Any:
            got = clock()
            ws = tracer.ws_of.get(id(self))
            fifo = tracer.frames.get(id(ws)) if ws is not None else None
            arrived = fifo.popleft() if fifo else None
            verdict = receive(self, raw, now=now, wall=wall)
            if isinstance(verdict, link_mod.Deliver) and verdict.message.type == "prediction":
                pids = [p.get("prediction_id") for p in verdict.message.raw_predictions()]
                if arrived is not None:
                    tracer.mark(pids, "ws reader", arrived)
                tracer.mark(pids, "our reader", got)
                tracer.mark(pids, "admitted")
            return verdict

        proto_cls.receive = traced_receive  # type: ignore[method-assign]

        gc_cls = committer_mod.GroupCommitter
        enqueue = gc_cls.enqueue

        async def traced_enqueue(self: Any, hotkey: str, predictions: Any, answer: Any) -> None:
            pids = [p.get("prediction_id") for p in predictions]
            tracer.mark(pids, "queued")

            def traced_answer(results: Any) -> None:
                tracer.mark(pids, "answered")
                answer(results)

            await enqueue(self, hotkey, predictions, traced_answer)

        enqueue_nowait = gc_cls.enqueue_nowait

        def traced_enqueue_nowait(self: Any, hotkey: str, predictions: Any, answer: Any) -> bool:
            pids = [p.get("prediction_id") for p in predictions]
            tracer.mark(pids, "queued")

            def traced_answer(results: Any) -> None:
                tracer.mark(pids, "answered")
                answer(results)

            return enqueue_nowait(self, hotkey, predictions, traced_answer)

        gc_cls.enqueue = traced_enqueue  # type: ignore[method-assign]
        gc_cls.enqueue_nowait = traced_enqueue_nowait  # type: ignore[method-assign]
        gc_init = gc_cls.__init__

        def traced_gc_init(self: Any, submit_many: Any, *args: Any, write: Any = None, **kwargs: Any) -> None:
            def traced_submit_many(jobs: Any) -> Any:
                pids = [p.get("prediction_id") for _, predictions in jobs for p in predictions]
                try:
                    return submit_many(jobs)
                finally:
                    tracer.mark(pids, "decided")
                    if write is None:  # one step: decided and written together
                        tracer.mark(pids, "db start")
                        tracer.mark(pids, "db done")

            def traced_write(batches: Any) -> Any:
                pids = [r.get("prediction_id") for batch in batches for results in batch.results for r in results]
                tracer.mark(pids, "db start")
                try:
                    return write(batches)
                finally:
                    tracer.mark(pids, "db done")

            gc_init(self, traced_submit_many, *args, write=None if write is None else traced_write, **kwargs)

        gc_cls.__init__ = traced_gc_init  # type: ignore[method-assign]

    def report(self) -> tuple[str, int]:
        deltas: dict[str, list[float]] = {step: [] for step in STEPS[1:]}
        total: list[float] = []
        complete = 0
        for marks in self.marks.values():
            if not all(step in marks for step in STEPS):
                continue
            complete += 1
            for before, step in zip(STEPS, STEPS[1:], strict=False):
                deltas[step].append(marks[step] - marks[before])
            total.append(marks["sent"] - marks["ws reader"])
        lines = ["| step (time since the previous one) | p50 ms | p90 ms | p99 ms | max ms |",
                 "|---|---:|---:|---:|---:|"]
        for step, values in [*deltas.items(), ("**frame received to confirmation sent**", total)]:
            cells = " | ".join(f"{_pct(values, q) * 1e3:.2f}" for q in (0.5, 0.9, 0.99, 1.0))
            lines.append(f"| {step} | {cells} |")
        return "\n".join(lines), complete


def _pct(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]


async def main(args: argparse.Namespace) -> None:
    sys.setswitchinterval(SWITCH_INTERVAL)
    tracer = Tracer()
    tracer.install()
    tmp = Path(tempfile.mkdtemp(prefix="bettensor-trace-"))
    games = make_games(10)
    node = ValidatorNode(
        Keypair.create_from_uri(VALIDATOR_URI), tmp / "validator.db", None, host="127.0.0.1", port=0,
        heartbeat_interval=30.0, connection_timeout=300.0, rate_limit=1_000_000.0, rate_burst=1_000_000,
    )
    await node.update_games(games)
    if args.peak:
        cfg: dict[str, Any] = {"scenario": "peak", "connections": 256, "frames_per_conn": 40, "wave": 64,
                               "settle": 1.0, "drain_timeout": 60.0}
    else:
        cfg = {"scenario": "latency", "connections": args.connections, "rates": [args.rate],
               "rate_duration": args.seconds}
    cfg.update(games=games, features=["batch"] if args.batch else [])
    try:
        async with trio.open_nursery() as nursery:
            port = await nursery.start(node.serve)
            print(f"{LISTENING}ws://127.0.0.1:{port}/ws (tracing)", file=sys.stderr)
            cfg["url"] = f"ws://127.0.0.1:{port}/ws"
            done = await trio.run_process(
                [sys.executable, str(HERE / "loadgen.py"), "-"], stdin=json.dumps(cfg).encode(),
                capture_stdout=True, capture_stderr=True, check=False,
            )
            nursery.cancel_scope.cancel()
    finally:
        node.close()
    try:
        result = json.loads(done.stdout.decode().strip().splitlines()[-1])
    except (IndexError, ValueError):
        raise SystemExit(f"loadgen failed: {done.stderr.decode()[-500:]}") from None
    text, complete = tracer.report()
    if args.peak:
        client = f"client p50 {result.get('p50_ms', math.nan):.1f} / p99 {result.get('p99_ms', math.nan):.1f} ms"
        load = "peak (a): 256 connections x 40 predictions at once"
    else:
        point = (result.get("sweep") or [{}])[0]
        client = f"client p50 {point.get('p50_ms', math.nan):.2f} / p99 {point.get('p99_ms', math.nan):.2f} ms"
        load = f"{args.rate:,}/s over {args.connections} connections for {args.seconds:g} s"
    print(f"{load}, {'batch' if args.batch else 'reference-format'} peers: {complete:,} predictions "
          f"traced; {client} (send to answer, as run.py measures)\n")
    print(text)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=int, default=1000, help="predictions/s (open loop)")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--batch", action="store_true", help="clients announce batch")
    parser.add_argument("--peak", action="store_true", help="peak scenario (a) instead of a rate")
    trio.run(main, parser.parse_args())
