"""Micro-benchmark of the sans-IO core's hot path (issue 2, item 10).

Measures, for a typical prediction message:

* encode+sign: ``encode(sign(message, keypair))``, what a miner does per prediction;
* decode+verify: ``verify(decode(wire))``, what a validator does per frame;
* dispatch: ``await dispatcher.dispatch(ws, message)`` to a no-op handler;

plus a breakdown (sign, verify, encode, decode alone) for information.
Each figure is the median over ROUNDS rounds of ITERATIONS calls, in
microseconds per call. Exits 1 when encode+sign or decode+verify is over the
target (150 us).

    python benchmarks/micro.py [--iterations 2000] [--rounds 5] [--json PATH]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import trio
from bittensor_wallet import Keypair

import bettensor_ws
from bettensor_ws import (
    Dispatcher,
    PredictionMessage,
    WebSocketMessage,
    decode,
    encode,
    sign,
    verify,
)

TARGET_US = 150.0
GATED = ("encode+sign", "decode+verify")


def typical_prediction() -> PredictionMessage:
    """A full TeamGamePrediction-style payload, as a miner sends it."""
    return PredictionMessage(
        sender="placeholder",
        data={
            "prediction_id": str(uuid.uuid4()),
            "game_id": "b2c5a0f4-6d1e-4c7e-9a43-5f0e6f1d2a11",
            "miner_uid": 117,
            "prediction_date": "2025-06-01T12:00:00.123456+00:00",
            "predicted_outcome": "Arsenal",
            "predicted_odds": 1.85,
            "team_a": "Arsenal",
            "team_b": "Tottenham Hotspur",
            "wager": 12.5,
            "team_a_odds": 1.85,
            "team_b_odds": 4.2,
            "tie_odds": 3.6,
            "model_name": "gradient-boost-v3",
            "confidence_score": 0.73,
            "outcome": "Unfinished",
            "payout": 0.0,
        },
    )


class NullSocket:
    """Swallows replies; the no-op handler sends none anyway."""

    async def send_json(self, obj: Any) -> None:
        return None


def time_sync(fn: Callable[[], object], iterations: int, rounds: int) -> list[float]:
    """Microseconds per call, one figure per round (after one warm-up round)."""
    results = []
    for r in range(rounds + 1):
        start = time.perf_counter()
        for _ in range(iterations):
            fn()
        elapsed = time.perf_counter() - start
        if r:  # round 0 warms caches (keypair, imports, branch predictors)
            results.append(elapsed / iterations * 1e6)
    return results


def time_async(fn: Callable[[], Awaitable[object]], iterations: int, rounds: int) -> list[float]:
    async def main() -> list[float]:
        results = []
        for r in range(rounds + 1):
            start = time.perf_counter()
            for _ in range(iterations):
                await fn()
            elapsed = time.perf_counter() - start
            if r:
                results.append(elapsed / iterations * 1e6)
        return results

    return trio.run(main)


def run(iterations: int, rounds: int) -> dict[str, Any]:
    keypair = Keypair.create_from_uri("//Alice")
    message = typical_prediction()
    signed = sign(message, keypair)
    wire = encode(signed)
    decoded = decode(wire)
    assert verify(decoded), "benchmark message does not verify"

    dispatcher = Dispatcher()

    async def noop(websocket: Any, msg: WebSocketMessage) -> None:
        return None

    dispatcher.register_handler("prediction", noop)
    socket = NullSocket()

    def encode_sign() -> str:
        return encode(sign(message, keypair))

    def decode_verify() -> bool:
        return verify(decode(wire))

    async def dispatch() -> bool:
        return await dispatcher.dispatch(socket, decoded)

    cases: list[tuple[str, str, Callable[[], Any] | None, Callable[[], Awaitable[Any]] | None]] = [
        ("encode+sign", "encode(sign(message, keypair))", encode_sign, None),
        ("decode+verify", "verify(decode(wire))", decode_verify, None),
        ("dispatch", "await dispatcher.dispatch(ws, message), no-op handler", None, dispatch),
        ("sign", "sign(message, keypair) alone", lambda: sign(message, keypair), None),
        ("verify", "verify(message) alone", lambda: verify(decoded), None),
        ("encode", "encode(signed) alone", lambda: encode(signed), None),
        ("decode", "decode(wire) alone, payload validated", lambda: decode(wire), None),
    ]
    results: dict[str, Any] = {}
    gc_was_enabled = gc.isenabled()
    gc.disable()  # as timeit does: collections would land in random rounds
    try:
        for name, what, sync_fn, async_fn in cases:
            if sync_fn is not None:
                per_round = time_sync(sync_fn, iterations, rounds)
            else:
                assert async_fn is not None
                per_round = time_async(async_fn, iterations, rounds)
            results[name] = {
                "what": what,
                "median_us": statistics.median(per_round),
                "min_us": min(per_round),
                "max_us": max(per_round),
                "rounds_us": per_round,
                "gated": name in GATED,
            }
    finally:
        if gc_was_enabled:
            gc.enable()
    return {
        "benchmarks": results,
        "target_us": TARGET_US,
        "iterations": iterations,
        "rounds": rounds,
        "wire_bytes": len(wire.encode("utf-8")),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "bettensor_ws": bettensor_ws.__version__,
    }


def table(report: dict[str, Any]) -> str:
    lines = [
        f"Typical prediction message: {report['wire_bytes']} bytes on the wire; "
        f"median of {report['rounds']} rounds x {report['iterations']} calls.",
        "",
        "| operation | median (us) | min (us) | max (us) | target |",
        "|---|---:|---:|---:|---|",
    ]
    for name, r in report["benchmarks"].items():
        if r["gated"]:
            verdict = "ok" if r["median_us"] <= report["target_us"] else "**OVER**"
            target = f"<= {report['target_us']:.0f} us {verdict}"
        else:
            target = ""
        lines.append(
            f"| {name} | {r['median_us']:.1f} | {r['min_us']:.1f} | {r['max_us']:.1f} | {target} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--iterations", type=int, default=2000, help="calls per round (2000)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds; the median is reported (5)")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    args = parser.parse_args(argv)
    if args.iterations < 1 or args.rounds < 1:
        parser.error("--iterations and --rounds must be positive")

    report = run(args.iterations, args.rounds)
    print(table(report))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
    over = [n for n in GATED if report["benchmarks"][n]["median_us"] > TARGET_US]
    if over:
        print(f"\nover the {TARGET_US:.0f} us target: {', '.join(over)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
