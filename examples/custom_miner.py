"""A complete miner with its own strategy: 0.5 on the underdog of every game.

    python examples/custom_miner.py ws://127.0.0.1:8765/ws@VALIDATOR_SS58 --hotkey-uri //Bob
    python examples/custom_miner.py wss://validator.example:8765/ws@VALIDATOR_SS58 \\
        --wallet.name miner --wallet.hotkey default

MinerNode does the rest: it stores every game update, asks the strategy about
new games, keeps each prediction on disk until the validator has answered it,
resends after a reconnect or a restart, and stays within the daily wager limit.
"""

from __future__ import annotations

import argparse
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import trio
from bittensor_wallet import Keypair, Wallet

from bettensor_ws.node import MinerNode


def underdog(games: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One prediction per game: the team with the longest odds, 0.5 wagered."""
    predictions = []
    for game in games:
        odds = {game["team_a"]: game.get("team_a_odds"), game["team_b"]: game.get("team_b_odds")}
        priced = {team: o for team, o in odds.items() if isinstance(o, int | float) and o > 0}
        if not priced:
            continue
        team = max(priced, key=lambda t: priced[t])
        predictions.append({
            "prediction_id": str(uuid.uuid4()),
            "game_id": str(game["game_id"]),
            "miner_uid": "0",
            "prediction_date": datetime.now(UTC).isoformat(),
            "predicted_outcome": team,
            "predicted_odds": float(priced[team]),
            "team_a": game["team_a"],
            "team_b": game["team_b"],
            "wager": 0.5,
            "team_a_odds": game.get("team_a_odds"),
            "team_b_odds": game.get("team_b_odds"),
            "tie_odds": game.get("tie_odds"),
            "model_name": "underdog",
            "confidence_score": None,
            "outcome": "Unfinished",
            "payout": 0.0,
        })
    return predictions


async def run(validator: str, keypair: Any, db: str) -> None:
    url, _, validator_hotkey = validator.rpartition("@")
    miner = MinerNode(keypair, [(validator_hotkey, url)], db, strategy=underdog)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(miner.run)  # reconnects by itself, with backoff
            await miner.wait_connected()
            print(f"connected to {url} as {miner.hotkey}", flush=True)
            while True:
                counts = await miner.db.run(miner.store.counts)
                print(" ".join(f"{state} {n}" for state, n in counts.items()), flush=True)
                await trio.sleep(1)
    finally:
        miner.close()


def main() -> None:
    parser = argparse.ArgumentParser(description="a miner betting on underdogs")
    parser.add_argument("validator", help="ws://HOST:PORT/ws@VALIDATOR_SS58")
    parser.add_argument("--hotkey-uri", help="development key, e.g. //Bob")
    parser.add_argument("--wallet.name", dest="wallet_name")
    parser.add_argument("--wallet.hotkey", dest="wallet_hotkey", default="default")
    parser.add_argument("--db", default="underdog.db")
    args = parser.parse_args()
    if args.hotkey_uri:
        keypair = Keypair.create_from_uri(args.hotkey_uri)
    else:
        keypair = Wallet(name=args.wallet_name, hotkey=args.wallet_hotkey).hotkey
    try:
        trio.run(run, args.validator, keypair, args.db)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
