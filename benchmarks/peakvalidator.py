"""Our validator for the game-update peak: ``ValidatorNode`` as the CLI builds it, plus a trigger.

    python benchmarks/peakvalidator.py --db PATH --games-per-update 40 [CLI validator settings]

The CLI has no way to publish new games on command, so this builds the node
with the same settings the benchmark gives ``bettensor-ws validator`` (and the
same switch interval) and, on each SIGUSR1, stores and broadcasts
``--games-per-update`` new games through ``ValidatorNode.update_games``, the
call the CLI's feed makes. It starts with no games, so a miner's catch-up
update after its Welcome is empty and the broadcast is the only one.
"""

from __future__ import annotations

import argparse
import signal
import sys

import trio
from bittensor_wallet import Keypair
from common import VALIDATOR_URI, make_games

from bettensor_ws.node import ValidatorNode
from bettensor_ws.node.cli import SWITCH_INTERVAL


async def main(args: argparse.Namespace) -> None:
    sys.setswitchinterval(SWITCH_INTERVAL)
    node = ValidatorNode(
        Keypair.create_from_uri(VALIDATOR_URI), args.db, None, host="127.0.0.1", port=0,
        heartbeat_interval=args.heartbeat_interval, connection_timeout=300.0,
        rate_limit=args.rate_limit, rate_burst=args.rate_burst,
    )
    rounds = 0
    try:
        async with trio.open_nursery() as nursery:
            port = await nursery.start(node.serve)
            print(f"listening on ws://127.0.0.1:{port}/ws", flush=True)
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGUSR1) as signals:
                async for signum in signals:
                    if signum != signal.SIGUSR1:
                        nursery.cancel_scope.cancel()
                        break
                    rounds += 1  # new ids each time: every update is all new games
                    games = make_games(args.games_per_update, seed=rounds)
                    for game in games:
                        game["game_id"] = f"peak{rounds}-{game['game_id']}"
                    await node.update_games(games)
    finally:
        node.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", required=True)
    parser.add_argument("--games-per-update", type=int, default=40)
    parser.add_argument("--rate-limit", type=float, default=1_000_000.0)
    parser.add_argument("--rate-burst", type=int, default=1_000_000)
    parser.add_argument("--heartbeat-interval", type=float, default=30.0)
    trio.run(main, parser.parse_args())
