"""An upper bound for a validator on several cores: N worker processes on one port.

    python benchmarks/workers.py [--workers 2] VALIDATOR_OPTIONS...

takes the options of ``bettensor-ws validator`` and starts N workers, each
``bettensor-ws validator`` itself (``cli.main``) with one difference: it serves
its own listening socket, opened with SO_REUSEPORT on the shared port, so the
kernel spreads new connections over the workers (by a hash of the peer's
address and port, not by load). Once all listen it prints one
``listening on ws://HOST:PORT/ws`` line; SIGTERM or SIGINT stops them all.

Each worker has its OWN database, ``DB.w0``, ``DB.w1``...: nothing is shared,
so nothing costs coordination, and what this measures is an UPPER BOUND on
what N processes can buy. It is not a correct validator: the per-hotkey state
(replay guard, rate and handshake budgets, flood cooldown, the one link per
hotkey, the daily wager total) lives in each worker and its database, so a
miner that reconnects may land on another worker, with a fresh budget, a guard
that never saw its nonces and a second link. benchmarks/run.py runs it as the
hidden contender ``ours2`` (``--contenders ours,ours2``); its README has the
result.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
from typing import IO, Any, NoReturn

LISTENING = "listening on "


def _stop(signum: int, frame: Any) -> NoReturn:
    raise SystemExit(0)


def shared_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host:port`` with SO_REUSEPORT (not listening yet)."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(address)
    return sock


def worker(options: list[str]) -> int:
    """One worker: the CLI's validator, on its own SO_REUSEPORT socket."""
    import trio

    import bettensor_ws.node
    from bettensor_ws.node import ValidatorNode, cli

    args = cli.parse_args(["validator", *options])
    sock = shared_socket(args.host, args.port)
    sock.listen(0xFFFF)  # as trio.open_tcp_listeners: the kernel caps it at somaxconn

    class SharedPortNode(ValidatorNode):
        def __init__(self, *a: Any, **kw: Any) -> None:
            super().__init__(*a, listeners=[trio.SocketListener(trio.socket.from_stdlib_socket(sock))], **kw)

    # the one change to the CLI's path: run_validator builds this node instead
    bettensor_ws.node.ValidatorNode = SharedPortNode  # type: ignore[misc]
    return cli.main(["validator", *options])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ours, options = parser.parse_known_args()
    if ours.worker:
        return worker(options)

    from bettensor_ws.node import cli

    args = cli.parse_args(["validator", *options])
    # holds the port (0: picks one) until every worker has bound it
    placeholder = shared_socket(args.host, args.port)
    port = placeholder.getsockname()[1]
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, _stop)
    procs: list[subprocess.Popen[str]] = []
    try:
        for n in range(ours.workers):
            procs.append(subprocess.Popen(
                [sys.executable, __file__, "--worker", *options, "--port", str(port), "--db", f"{args.db}.w{n}"],
                stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
            ))
        url = ""
        for n, proc in enumerate(procs):
            assert proc.stdout is not None
            url = _wait_listening(proc.stdout)
            if not url:
                print(f"workers.py: worker {n} exited ({proc.wait()}) before listening", file=sys.stderr)
                return 1
            threading.Thread(target=_drain, args=(proc.stdout,), daemon=True).start()
        placeholder.close()
        print(f"{LISTENING}{url}", flush=True)
        print(f"{len(procs)} workers: pids {' '.join(str(p.pid) for p in procs)}, databases {args.db}.w*", flush=True)
        os.wait()  # until a signal (SystemExit), or until a worker ends
        return 1
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _wait_listening(out: IO[str]) -> str:
    """The URL of a worker's ``listening on`` line ("" if it ended first)."""
    for line in out:
        if line.startswith(LISTENING):
            return line[len(LISTENING):].strip()
    return ""


def _drain(out: IO[str]) -> None:
    for _ in out:
        pass


if __name__ == "__main__":
    sys.exit(main())
