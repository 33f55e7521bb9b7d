"""Shared pieces of the load benchmark: the wire format's signing, games, predictions.

Written against docs/protocol.md with the standard library's ``json`` and
``bittensor_wallet`` only (like tests/interop/refpeer.py), so the load generator,
the floor and the baseline share no code with the validator under test.
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from bittensor_wallet import Keypair

ENVELOPE_KEYS = frozenset(("type", "sender", "data", "timestamp", "nonce", "signature"))
AUTH_KEYS = ("hotkey", "timestamp", "nonce", "signature")
VALIDATOR_URI = "//Alice"
WAGER = 0.0001  # tiny: the daily wager limit of 1000 per miner never bites
LISTENING = "listening on "

_TEAMS = [
    "Arsenal", "Chelsea", "Liverpool", "Everton", "Leeds", "Fulham", "Brentford", "Burnley",
    "Yankees", "Red Sox", "Mets", "Cubs", "Dodgers", "Giants", "Astros", "Padres",
    "Lakers", "Celtics", "Knicks", "Bulls", "Heat", "Suns", "Nets", "Hawks",
]


def now_iso() -> str:
    return datetime.now(UTC).isoformat()


def new_nonce() -> str:
    return uuid.uuid4().hex


def miner_uri(index: int) -> str:
    return f"//BenchMiner{index}"


def signing_text(obj: dict[str, Any]) -> str:
    """The signed text: sorted keys, default separators, ensure_ascii, no ``signature``."""
    return json.dumps({k: v for k, v in obj.items() if k != "signature"}, sort_keys=True)


def _with_signature(text: str, signature: str) -> str:
    """Wire JSON: the signed text with the signature key appended (still valid JSON)."""
    return f'{text[:-1]}, "signature": "{signature}"}}'


def envelope_wire(keypair: Keypair, type_: str, data: dict[str, Any]) -> str:
    """A signed envelope, encoded for the wire."""
    env = {
        "type": type_,
        "sender": keypair.ss58_address,
        "data": data,
        "timestamp": now_iso(),
        "nonce": new_nonce(),
    }
    text = signing_text(env)
    return _with_signature(text, keypair.sign(text).hex())


def auth_wire(keypair: Keypair, features: list[str] | None = None) -> str:
    """A signed auth frame; ``features`` is covered by the signature like any other key."""
    frame: dict[str, Any] = {"features": list(features)} if features else {}
    frame.update(hotkey=keypair.ss58_address, timestamp=now_iso(), nonce=new_nonce())
    text = signing_text(frame)
    return _with_signature(text, keypair.sign(text).hex())


def verify_text(keypair: Keypair, text: str, signature: Any) -> bool:
    if not isinstance(signature, str):
        return False
    try:
        return bool(keypair.verify(text, bytes.fromhex(signature)))
    except Exception:
        return False


def parse_ts(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        ts = datetime.fromisoformat(value)
    except ValueError:
        return None
    return ts if ts.tzinfo is not None else ts.replace(tzinfo=UTC)


def make_games(count: int, *, seed: int = 7) -> list[dict[str, Any]]:
    """``count`` TeamGame dicts starting in a day or two, as the --games file holds them."""
    import random

    rng = random.Random(seed)
    now = datetime.now(UTC)
    stamp = now.isoformat()
    games = []
    for i in range(count):
        team_a, team_b = rng.sample(_TEAMS, 2)
        soccer = i % 3 == 0
        games.append(
            {
                "game_id": f"bench-{i:05d}",
                "team_a": team_a,
                "team_b": team_b,
                "sport": "soccer" if soccer else "basketball",
                "league": "Benchmark League",
                "create_date": stamp,
                "last_update_date": stamp,
                "event_start_date": (now + timedelta(days=1, hours=i % 24)).isoformat(),
                "active": True,
                "outcome": "Unfinished",
                "team_a_odds": round(rng.uniform(1.3, 4.0), 2),
                "team_b_odds": round(rng.uniform(1.3, 4.0), 2),
                "tie_odds": round(rng.uniform(2.8, 4.5), 2) if soccer else None,
                "can_tie": soccer,
            }
        )
    return games


def make_prediction(game: dict[str, Any], miner_uid: int) -> dict[str, Any]:
    """A valid TeamGamePrediction on ``game``: team_a, a tiny wager, a fresh uuid4."""
    return {
        "prediction_id": str(uuid.uuid4()),
        "game_id": game["game_id"],
        "miner_uid": miner_uid,
        "prediction_date": now_iso(),
        "predicted_outcome": game["team_a"],
        "predicted_odds": game["team_a_odds"],
        "team_a": game["team_a"],
        "team_b": game["team_b"],
        "wager": WAGER,
        "team_a_odds": game["team_a_odds"],
        "team_b_odds": game["team_b_odds"],
        "tie_odds": game["tie_odds"],
        "model_name": "bench",
        "confidence_score": None,
        "outcome": "Unfinished",
        "payout": 0.0,
    }
