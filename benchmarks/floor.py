"""The transport floor: a bare trio-websocket server with no protocol work at all.

It answers the auth frame with a fixed welcome text and then echoes every frame
back unchanged, so the load generator's clients and frames measure what the
transport alone costs. With ``--broadcast N`` it instead sends one 100-game
update (encoded and signed once, the same bytes to every connection) every
``--interval`` seconds.

    python benchmarks/floor.py [--broadcast 100 --interval 2]

Prints ``listening on ws://127.0.0.1:PORT/ws`` once accepting; stops on SIGTERM.
"""

from __future__ import annotations

import argparse
import signal
from typing import Any

import trio
from trio_websocket import ConnectionClosed, WebSocketRequest, serve_websocket

WELCOME = (
    '{"type": "welcome", "sender": "floor", "data": {"message": "Connection established", '
    '"status": "success", "features": ["batch"]}, "timestamp": "", "nonce": "", "signature": null}'
)


class Floor:
    def __init__(self) -> None:
        self.connections: set[Any] = set()

    async def handler(self, request: WebSocketRequest) -> None:
        if request.path.split("?", 1)[0] != "/ws":
            await request.reject(404)
            return
        ws = await request.accept()
        try:
            await ws.get_message()  # the auth frame: not even parsed
            self.connections.add(ws)
            await ws.send_message(WELCOME)
            while True:
                await ws.send_message(await ws.get_message())
        except ConnectionClosed:
            pass
        finally:
            self.connections.discard(ws)

    async def broadcaster(self, games: int, interval: float) -> None:
        from bittensor_wallet import Keypair
        from common import VALIDATOR_URI, envelope_wire, make_games, now_iso

        keypair = Keypair.create_from_uri(VALIDATOR_URI)
        rows = make_games(games)
        while True:
            await trio.sleep(interval)
            wire = envelope_wire(keypair, "game_update", {"games": rows, "timestamp": now_iso()})
            async with trio.open_nursery() as nursery:
                for ws in list(self.connections):
                    nursery.start_soon(_send_quietly, ws, wire)


async def _send_quietly(ws: Any, wire: str) -> None:
    try:
        await ws.send_message(wire)
    except ConnectionClosed:
        pass


async def main(args: argparse.Namespace) -> None:
    floor = Floor()
    async with trio.open_nursery() as nursery:
        server = await nursery.start(
            lambda task_status: serve_websocket(
                floor.handler, "127.0.0.1", 0, ssl_context=None,
                message_queue_size=4, max_message_size=1 << 20, task_status=task_status,
            )
        )
        print(f"listening on ws://127.0.0.1:{server.port}/ws", flush=True)
        if args.broadcast:
            nursery.start_soon(floor.broadcaster, args.broadcast, args.interval)
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for _ in signals:
                nursery.cancel_scope.cancel()
                break


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--broadcast", type=int, default=0, help="games per periodic update (0: echo)")
    parser.add_argument("--interval", type=float, default=2.0)
    trio.run(main, parser.parse_args())
