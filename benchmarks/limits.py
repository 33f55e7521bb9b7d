"""What the wire format and durable SQLite cost per prediction, before any code of ours.

    python benchmarks/limits.py [--frames 60] [--rows 20000]

Two ceilings for the batched scenario of issue 5, measured in tight loops on one
thread with nothing else of bettensor_ws involved (stdlib ``json``, ``orjson``,
``bittensor_wallet``, ``sqlite3``, as docs/protocol.md requires):

* **protocol work** for a 100-prediction message: parse the frame, rebuild the
  signed text (``json.dumps(..., sort_keys=True)``, the reference's format),
  verify one sr25519 signature, build each row, and sign and encode the one
  batched confirmation. No WebSocket framing, no payload or rule checks: the
  least any validator speaking this format in CPython must do.
* **durable insert**: rows like a validator's ``predictions`` table (uuid4
  primary key, miner/day index, the prediction's body), WAL and
  ``synchronous=FULL``, one commit per 100 and per 2,000 rows.

A validator that does both on one core cannot confirm more than
1 / (protocol + insert) predictions per second; with the insert on a second core
(SQLite gives up the GIL while it works), 1 / protocol at best.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import orjson
from bittensor_wallet import Keypair
from common import make_games, make_prediction, now_iso

BATCH = 100
TABLE = (
    "CREATE TABLE predictions (prediction_id TEXT PRIMARY KEY, miner_hotkey TEXT NOT NULL, "
    "game_id TEXT NOT NULL, wager REAL NOT NULL, predicted_outcome TEXT NOT NULL, body TEXT NOT NULL, "
    "received_at TEXT NOT NULL, day TEXT, status TEXT, message TEXT)"
)


def _frames(keypair: Keypair, count: int) -> list[str]:
    games = make_games(10)
    frames = []
    for i in range(count):
        env: dict[str, Any] = {
            "type": "prediction",
            "sender": keypair.ss58_address,
            "timestamp": now_iso(),
            "nonce": uuid.uuid4().hex,
            "data": {"predictions": [make_prediction(games[(i + k) % 10], 1) for k in range(BATCH)]},
        }
        env["signature"] = keypair.sign(json.dumps(env, sort_keys=True)).hex()
        frames.append(json.dumps(env))
    return frames


def protocol_work(frames: list[str], validator: Keypair) -> dict[str, float]:
    """Seconds per prediction for each step of answering a batch."""
    steps = dict.fromkeys(("parse", "signed text", "verify", "rows", "signed reply"), 0.0)
    clock = time.perf_counter
    verifiers: dict[str, Keypair] = {}
    for raw in frames:
        t0 = clock()
        obj = orjson.loads(raw)
        t1 = clock()
        signature = obj.pop("signature")
        text = json.dumps(obj, sort_keys=True)
        t2 = clock()
        sender = obj["sender"]
        verifier = verifiers.get(sender) or verifiers.setdefault(sender, Keypair(ss58_address=sender))
        if not verifier.verify(text, bytes.fromhex(signature)):
            raise SystemExit("a frame did not verify")
        t3 = clock()
        day = now_iso()
        rows = [
            (p["prediction_id"], sender, p["game_id"], p["wager"], p["predicted_outcome"],
             orjson.dumps(p, option=orjson.OPT_SORT_KEYS).decode(), day, day[:10], "success",
             "Prediction accepted")
            for p in obj["data"]["predictions"]
        ]
        t4 = clock()
        reply = {
            "type": "confirmation",
            "sender": validator.ss58_address,
            "timestamp": now_iso(),
            "nonce": uuid.uuid4().hex,
            "data": {
                "results": [{"prediction_id": r[0], "status": "success", "message": r[9]} for r in rows],
                "timestamp": now_iso(),
            },
        }
        reply["signature"] = validator.sign(json.dumps(reply, sort_keys=True)).hex()
        orjson.dumps(reply)
        t5 = clock()
        for key, spent in zip(steps, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4), strict=True):
            steps[key] += spent
    predictions = len(frames) * BATCH
    return {key: spent / predictions for key, spent in steps.items()}


def durable_insert(rows: int, per_commit: int, folder: Path) -> float:
    """Seconds per row, WAL + synchronous=FULL, one transaction per ``per_commit`` rows."""
    path = folder / f"insert-{per_commit}.db"
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute(TABLE)
    db.execute("CREATE INDEX predictions_miner_day ON predictions (miner_hotkey, day)")
    body = json.dumps(make_prediction(make_games(1)[0], 1), sort_keys=True)
    data = [
        (str(uuid.uuid4()), "5" + "F" * 47, "bench-00000", 0.0001, "Arsenal", body, now_iso(),
         "2026-11-26", "success", "Prediction accepted")
        for _ in range(rows)
    ]
    start = time.perf_counter()
    for first in range(0, rows, per_commit):
        db.execute("BEGIN IMMEDIATE")
        db.executemany("INSERT INTO predictions VALUES (?,?,?,?,?,?,?,?,?,?)", data[first : first + per_commit])
        db.execute("COMMIT")
    spent = time.perf_counter() - start
    db.close()
    return spent / rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--frames", type=int, default=60, help="100-prediction messages to answer")
    parser.add_argument("--rows", type=int, default=20_000, help="rows to insert per commit size")
    args = parser.parse_args()
    miner, validator = Keypair.create_from_uri("//BenchMiner0"), Keypair.create_from_uri("//Alice")
    frames = _frames(miner, args.frames)
    work = protocol_work(frames, validator)
    with tempfile.TemporaryDirectory(prefix="bettensor-limits-") as tmp:
        insert = {n: durable_insert(args.rows, n, Path(tmp)) for n in (BATCH, 2000)}
    total = sum(work.values())
    print(f"Per prediction, in a {BATCH}-prediction message ({args.frames} messages):\n")
    print("| step | us |\n|---|---:|")
    for key, spent in work.items():
        print(f"| {key} | {spent * 1e6:.2f} |")
    print(f"| **protocol work** | **{total * 1e6:.2f}** |")
    for n, spent in insert.items():
        print(f"| durable insert, commit per {n:,} rows | {spent * 1e6:.2f} |")
    best = insert[2000]
    print(
        f"\nceiling, one core: {1 / (total + best):,.0f} predictions/s; "
        f"with the insert on a second, idle core: {1 / max(total, best):,.0f} predictions/s"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
