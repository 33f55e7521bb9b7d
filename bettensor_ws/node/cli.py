"""The ``bettensor-ws`` command: validator, miner, demo, status.

Bad input (unreadable files, missing wallets, a port in use, a bad URL) prints
one line on stderr and exits 2; a traceback means a bug.
"""

from __future__ import annotations

import argparse
import errno
import getpass
import logging
import math
import os
import signal
import sqlite3
import ssl
import sys
from collections.abc import Awaitable, Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple, NoReturn
from urllib.parse import urlsplit

import trio

from .. import __version__
from ..link.http import url_host
from ..protocol.identity import canonical_hotkey
from ..protocol.signing import Signer
from .logs import setup_logging
from .rules import DAILY_WAGER_LIMIT

__all__ = ["main"]

log = logging.getLogger("bettensor_ws.cli")


SWITCH_INTERVAL = 0.0005


class UsageError(Exception):
    """Something the operator can fix; printed as one line, exit 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message}")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows every default that is a value (not None, not an off switch)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or action.default == 0 and action.nargs == 0:
            return action.help
        return super()._get_help_string(action)


def _add_wallet(parser: argparse.ArgumentParser) -> None:
    # --wallet.hotkey and --wallet.path default to None so that giving any of them
    # with --hotkey-uri is seen (and refused); their real defaults are below.
    group = parser.add_argument_group("identity (one of --hotkey-uri or --wallet.*)")
    group.add_argument("--hotkey-uri", help="development key, e.g. //Alice (public: never on a real network)")
    group.add_argument("--wallet.name", dest="wallet_name", help="Bittensor wallet name")
    group.add_argument("--wallet.hotkey", dest="wallet_hotkey", help=f"hotkey name (default: {WALLET_HOTKEY})")
    group.add_argument("--wallet.path", dest="wallet_path", help=f"wallets folder (default: {WALLET_PATH})")


WALLET_HOTKEY = "default"
WALLET_PATH = "~/.bittensor/wallets/"


def _hotkey_password(hotkey_file: Path) -> str | None:
    """The password of an encrypted hotkey file: None when it is not encrypted or
    bittensor's ``BT_PW_...`` variable holds it; else asked on the terminal (the
    prompt on stderr, so stdout stays clean). Without a terminal: a usage error
    naming that variable."""
    from bittensor_wallet import Keyfile

    try:
        keyfile = Keyfile(path=str(hotkey_file))
        if not keyfile.is_encrypted():
            return None
        variable = keyfile.env_var_name()
    except Exception as exc:  # bittensor_wallet raises its own untyped errors
        raise UsageError(f"cannot read wallet hotkey {hotkey_file}: {exc}") from None
    if os.environ.get(variable):
        return None  # bittensor_wallet reads it itself
    if not sys.stdin.isatty():
        raise UsageError(
            f"hotkey {hotkey_file} is encrypted and there is no terminal to ask its password: "
            f"run in a terminal, or set {variable} (bittensor's saved-password variable for this "
            f"hotkey, see its save_password_to_env)"
        )
    return getpass.getpass(f"password for hotkey {hotkey_file}: ", stream=sys.stderr)


def load_keypair(args: argparse.Namespace) -> Signer:
    """The hotkey from ``--hotkey-uri`` or a real Bittensor wallet on disk."""
    from bittensor_wallet import Keypair, Wallet

    wallet_given = [
        name for name, value in (("--wallet.name", args.wallet_name), ("--wallet.hotkey", args.wallet_hotkey),
                                 ("--wallet.path", args.wallet_path)) if value is not None
    ]
    if args.hotkey_uri and wallet_given:
        raise UsageError(
            f"--hotkey-uri and {wallet_given[0]} name two identities: give --hotkey-uri "
            f"(development keys only) or --wallet.*, not both"
        )
    if args.hotkey_uri:
        try:
            keypair: Signer = Keypair.create_from_uri(args.hotkey_uri)
        except Exception as exc:
            raise UsageError(f"invalid --hotkey-uri {args.hotkey_uri!r}: {exc}") from None
        return keypair
    if not args.wallet_name:
        raise UsageError("no identity: give --hotkey-uri URI or --wallet.name NAME [--wallet.hotkey H]")
    hotkey_name = args.wallet_hotkey or WALLET_HOTKEY
    path = Path(args.wallet_path or WALLET_PATH).expanduser()
    hotkey_file = path / args.wallet_name / "hotkeys" / hotkey_name
    if not hotkey_file.is_file():
        raise UsageError(f"wallet hotkey not found: {hotkey_file}")
    if not os.access(hotkey_file, os.R_OK):
        raise UsageError(f"wallet hotkey {hotkey_file} is not readable by {_user()}")
    password = _hotkey_password(hotkey_file)
    try:
        wallet = Wallet(name=args.wallet_name, hotkey=hotkey_name, path=str(path))
        keypair = wallet.hotkey if password is None else wallet.get_hotkey(password)
    except Exception as exc:
        if password is not None and "password" in str(exc).lower():
            raise UsageError(f"wrong password for hotkey {hotkey_file}") from None
        raise UsageError(f"cannot load wallet hotkey {hotkey_file}: {exc}") from None
    return keypair


def _read_allow_file(path: str) -> list[str]:
    """One ss58 hotkey a line; ``#`` starts a comment. UsageError names every line
    that is not a hotkey (with its number)."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read allow file {path}: {exc}") from None
    hotkeys = []
    bad = []
    for number, line in enumerate(lines, 1):
        entry = line.split("#", 1)[0].strip()
        if not entry:
            continue
        if canonical_hotkey(entry) is None:
            bad.append(f"line {number}: {entry[:64]!r} is not an ss58 address")
        else:
            hotkeys.append(entry)
    if bad:
        more = f" (and {len(bad) - 5} more)" if len(bad) > 5 else ""
        raise UsageError(f"allow file {path}, " + "; ".join(bad[:5]) + more)
    return hotkeys


def _parse_validator_arg(value: str) -> tuple[str, str]:
    url, sep, hotkey = value.rpartition("@")
    parts = urlsplit(url)
    if not sep or not hotkey or parts.scheme not in ("ws", "wss") or not parts.hostname:
        raise UsageError(f"bad --validator {value!r}: expected ws://HOST:PORT/ws@SS58")
    try:
        parts.port  # noqa: B018  (raises on a malformed port)
    except ValueError:
        raise UsageError(f"bad --validator {value!r}: invalid port") from None
    if canonical_hotkey(hotkey) is None:
        raise UsageError(f"bad --validator {value!r}: {hotkey!r} is not an ss58 address")
    return hotkey, url


def _port(value: str) -> int:
    try:
        port = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid port {value!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port {port} is outside 0-65535")
    return port


def _add_chain_options(parser: argparse.ArgumentParser, role: str) -> None:
    """The subnet (both commands) and the game sources (the validator): issue 14."""
    from .chain import DEFAULT_REFRESH, NETWORKS

    group = parser.add_argument_group(
        "subnet (needs the SDK: pip install 'bettensor_ws[chain]')",
        "With --netuid the metagraph is read from the chain and kept beside --db "
        "(DB.metagraph-NETUID.json), so a restart while the chain is unreachable goes on with it. "
        "SIGHUP reads it again at once.",
    )
    group.add_argument("--netuid", type=int, help="the subnet's uid")
    group.add_argument(
        "--subtensor.network", dest="subtensor_network", metavar="NAME",
        help=f"{', '.join(NETWORKS)} (default: finney)",
    )
    group.add_argument(
        "--subtensor.chain_endpoint", dest="subtensor_chain_endpoint", metavar="URL",
        help="ws://HOST:PORT or wss://HOST:PORT of a subtensor node (overrides --subtensor.network)",
    )
    group.add_argument(
        "--metagraph-refresh", type=float, default=DEFAULT_REFRESH, metavar="SECONDS",
        help="seconds between metagraph reads (default: %(default)g)",
    )
    if role == "validator":
        from .games import DEFAULT_POLL

        group.add_argument(
            "--min-stake", type=float, default=0.0, metavar="STAKE",
            help="admit only miners with at least this total stake, in the subnet's units (default: 0)",
        )
        games = parser.add_argument_group("game sources (default: a simulated feed)")
        games.add_argument(
            "--games-url", metavar="URL",
            help="poll an HTTP(S) endpoint serving the JSON list of games --games takes",
        )
        games.add_argument(
            "--games-poll", type=float, default=DEFAULT_POLL, metavar="SECONDS",
            help="seconds between looks at --games (re-read when it changes) or --games-url "
            "(default: %(default)g); SIGHUP reads either at once",
        )


class Range(NamedTuple):
    """The values a numeric option takes: ``low`` to ``high``; with ``above``,
    ``low`` itself is refused."""

    low: float
    high: float
    above: bool = False
    unit: str = ""

    def allows(self, value: float) -> bool:
        return (value > self.low if self.above else value >= self.low) and value <= self.high

    def text(self) -> str:
        unit = f" {self.unit}" if self.unit else ""
        low = f"more than {_num(self.low)}" if self.above else f"at least {_num(self.low)}"
        return f"{low} and at most {_num(self.high)}{unit}"


def _num(value: float) -> str:
    """``1000000``, ``0.1``, ``nan``: a number as an operator typed it."""
    return str(int(value)) if math.isfinite(value) and float(value).is_integer() else f"{value:g}"


OPTION_RANGES: dict[str, Range] = {
    # every numeric option of every command, by its dest; checked before anything starts
    "port": Range(0, 65535),
    "metrics_port": Range(0, 65535),
    "heartbeat_interval": Range(0.1, 3600, unit="s"),
    "connection_timeout": Range(1, 86400, unit="s"),
    "max_message_size": Range(64 << 10, 1 << 30, unit="bytes"),
    "rate_limit": Range(0, 1_000_000, above=True, unit="frames/s"),
    "rate_burst": Range(1, 1_000_000, unit="frames"),
    "flood_cooldown": Range(0, 86400, unit="s (0: no cooldown)"),
    "feed_games": Range(1, 10_000, unit="games"),
    "feed_interval": Range(0.1, 86400, unit="s"),
    "wager": Range(0, DAILY_WAGER_LIMIT, above=True, unit="(the daily limit)"),
    "reconnect_max": Range(1, 3600, unit="s (the first reconnect waits 1 s)"),
    "miners": Range(1, 1000),
    "games": Range(1, 10_000),
    "duration": Range(0, 86400, above=True, unit="s"),
    "netuid": Range(0, 65535),
    "metagraph_refresh": Range(1, 7 * 86400, unit="s"),
    "min_stake": Range(0, 1e15, unit="(total stake)"),
    "games_poll": Range(0.1, 86400, unit="s"),
}


def check_ranges(args: argparse.Namespace) -> None:
    """Refuse any numeric option out of its range (nan and infinities included)."""
    for dest, limits in OPTION_RANGES.items():
        value = getattr(args, dest, None)
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue  # absent, or not a number here (the validator's --games is a file)
        if not (math.isfinite(value) and limits.allows(value)):
            raise UsageError(f"--{dest.replace('_', '-')} must be {limits.text()}, got {_num(value)}")
    heartbeat, timeout = getattr(args, "heartbeat_interval", None), getattr(args, "connection_timeout", None)
    if heartbeat is not None and timeout is not None and not timeout > heartbeat:
        raise UsageError(
            f"--connection-timeout ({_num(timeout)} s) must be longer than --heartbeat-interval "
            f"({_num(heartbeat)} s): a quiet link would be closed between two heartbeats"
        )


def _server_tls(certfile: str | None, keyfile: str | None) -> ssl.SSLContext | None:
    if certfile is None:
        if keyfile is not None:
            raise UsageError("--ssl-keyfile needs --ssl-certfile")
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(certfile, keyfile)
    except (OSError, ssl.SSLError) as exc:
        shown = certfile if keyfile is None else f"{certfile} / {keyfile}"
        raise UsageError(f"cannot load the TLS certificate and key {shown}: {exc}") from None
    return context


def _client_tls(cafile: str | None) -> ssl.SSLContext | None:
    if cafile is None:
        return None
    try:
        return ssl.create_default_context(cafile=cafile)
    except (OSError, ssl.SSLError) as exc:
        raise UsageError(f"cannot load the CA certificates {cafile}: {exc}") from None


def _user() -> str:
    try:
        import pwd

        return f"user {pwd.getpwuid(os.geteuid()).pw_name} (uid {os.geteuid()})"
    except (ImportError, KeyError):
        return f"uid {os.geteuid()}"


def db_access_problem(path: str) -> str | None:
    """The permission or path problem behind SQLite's "unable to open database file"
    or "readonly database", said plainly (None: none found)."""
    db = Path(path)
    folder = db.parent
    if not folder.is_dir():
        return f"the folder {folder} does not exist"
    if db.is_dir():
        return f"{db} is a folder"
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"the folder {folder} is not writable by {_user()} (SQLite writes its journal beside the database)"
    for side in (db, Path(f"{path}-wal"), Path(f"{path}-shm")):
        if side.exists() and not os.access(side, os.R_OK | os.W_OK):
            return f"{side} is not readable and writable by {_user()}"
    return None


@contextmanager
def database_lock(path: str) -> Iterator[bool]:
    """Hold an exclusive lock on ``<db>.lock`` while the node runs: a second process
    on the same database is refused. The OS drops the lock when the process dies.

    Yields False when the lock file cannot be made (its folder is missing or not
    writable): opening the database then says what is wrong."""
    import fcntl

    lock_path = f"{path}.lock"
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError:
        yield False
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            owner = os.read(fd, 32).decode("ascii", "replace").strip()
            by = f" (process {owner})" if owner.isdigit() else ""
            raise UsageError(
                f"database {path} is in use by another bettensor-ws process{by}: "
                f"one process per database (lock {lock_path})"
            ) from None
        try:  # who holds it, for the refusal above; only a courtesy (the disk may be full)
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        except OSError:
            pass
        yield True
    finally:
        os.close(fd)


def _add_common(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """-v and --log-format, accepted before and after the command."""
    suffix = "" if top else "_after"
    parser.add_argument(
        "-v", "--verbose", dest=f"verbose{suffix}", action="count", default=0,
        help="more logging: -v adds debug messages and every frame (the default shows "
        "connects, disconnects, refusals and warnings)",
    )
    parser.add_argument(
        "--log-format", dest=f"log_format{suffix}", choices=("text", "json"),
        default="text" if top else None,
        help="log lines as text or as one JSON object a line (for log shippers)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="bettensor-ws",
        description="The real-time link between Bettensor miners and validators. Bad input "
        "prints one line on stderr and exits 2.",
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"bettensor-ws {__version__}")
    _add_common(parser, top=True)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def command(name: str, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help, formatter_class=_HelpFormatter)
        _add_common(p, top=False)
        return p

    v = command("validator", "serve miners: check, store and confirm predictions")
    v.add_argument(
        "--host", default="127.0.0.1",
        help="address to listen on (0.0.0.0 or :: for every interface; the default takes "
        "only connections from this machine)",
    )
    v.add_argument("--port", type=_port, default=8765, help="port for miners (ws:// or wss://), /health and /metrics")
    v.add_argument("--db", default="validator.db", help="SQLite database (one process per database)")
    v.add_argument(
        "--games", help="JSON list of TeamGame objects, re-read when it changes and on SIGHUP "
        "(default: a simulated feed)",
    )
    v.add_argument(
        "--allow-file", help="allowed miner hotkeys, one ss58 a line, # comments; re-read on SIGHUP "
        "(default: any hotkey; with --netuid: admitted besides the subnet's)",
    )
    v.add_argument("--ssl-certfile", help="TLS certificate (PEM, with its chain): serve wss://")
    v.add_argument("--ssl-keyfile", help="TLS private key (PEM), if not in --ssl-certfile")
    v.add_argument("--heartbeat-interval", type=float, default=60.0, help="seconds between heartbeats")
    v.add_argument("--connection-timeout", type=float, default=300.0, help="seconds of silence before a link is closed")
    v.add_argument("--max-message-size", type=int, default=1 << 20, help="largest frame accepted, in bytes")
    v.add_argument("--rate-limit", type=float, default=50.0, help="frames a second each miner may send")
    v.add_argument("--rate-burst", type=int, default=200, help="frames a miner may send at once above its rate")
    v.add_argument(
        "--flood-cooldown", type=float, default=60.0,
        help="seconds a miner closed for flooding is refused before it may reconnect (0: none)",
    )
    v.add_argument(
        "--require-audience", action="store_true",
        help="refuse auth frames that do not name this validator (reference miners name none)",
    )
    v.add_argument("--feed-games", type=int, default=20, help="games in the simulated feed")
    v.add_argument("--feed-interval", type=float, default=5.0, help="seconds between simulated updates")
    _add_wallet(v)
    _add_chain_options(v, "validator")

    m = command("miner", "predict on game updates and deliver to validators")
    m.add_argument(
        "--validator", action="append", metavar="ws://HOST:PORT/ws@SS58",
        help="a validator's URL and hotkey (wss:// for TLS); repeat for several; with --netuid, "
        "dialled besides those found on the subnet",
    )
    m.add_argument("--db", default="miner.db", help="SQLite database (one process per database)")
    m.add_argument("--wager", type=float, default=1.0, help="wager on each prediction")
    m.add_argument("--ssl-ca", help="CA certificates (PEM) to verify wss:// validators with (default: the system's)")
    m.add_argument("--heartbeat-interval", type=float, default=60.0, help="seconds between heartbeats")
    m.add_argument("--connection-timeout", type=float, default=300.0, help="seconds of silence before a link is closed")
    m.add_argument(
        "--reconnect-max", type=float, default=60.0,
        help="longest wait between reconnect attempts, in seconds (at least 1)",
    )
    m.add_argument("--metrics-port", type=_port, help="serve GET /health and /metrics on this port (default: off)")
    m.add_argument("--metrics-host", default="127.0.0.1", help="address for --metrics-port")
    _add_wallet(m)
    _add_chain_options(m, "miner")

    d = command("demo", "a validator and miners on loopback, then a summary")
    d.add_argument("--miners", type=int, default=8, help="miners to run")
    d.add_argument("--games", type=int, default=20, help="games in the feed")
    d.add_argument("--duration", type=float, default=20.0, help="seconds of predicting before the drain")

    s = command("status", "counts from a miner or validator database")
    s.add_argument("--db", required=True, help="the database to read (read-only)")
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse and check: options given after the command merged with those before,
    every number in its range."""
    args = build_parser().parse_args(argv)
    args.verbose += args.verbose_after
    if args.log_format_after is not None:
        args.log_format = args.log_format_after
    try:
        check_ranges(args)
    except UsageError as exc:
        raise UsageError(f"bettensor-ws {args.command}: {exc}") from None
    return args


async def _until_signalled(nursery: trio.Nursery) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            log.info("received %s, shutting down", signal.Signals(signum).name)
            nursery.cancel_scope.cancel()
            return


async def _on_hangup(
    reload: Callable[[], Awaitable[None]], *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """SIGHUP reloads (never ends the process); started before the node announces itself."""
    with trio.open_signal_receiver(signal.SIGHUP) as signals:
        task_status.started()
        async for _ in signals:
            await reload()


def _chain_source(args: argparse.Namespace) -> Any:
    """The metagraph source for ``--netuid`` (None without); bad options are a UsageError."""
    if args.netuid is None:
        if args.subtensor_network or args.subtensor_chain_endpoint:
            raise UsageError("--subtensor.network and --subtensor.chain_endpoint need --netuid N")
        return None
    from .chain import ChainError, ChainSource

    try:
        return ChainSource.open(args.subtensor_network, args.subtensor_chain_endpoint, args.netuid, args.db)
    except (ChainError, ValueError) as exc:
        raise UsageError(str(exc)) from None


async def _first_metagraph(source: Any, hotkey: str, role: str) -> Any:
    """The first metagraph (the chain's, else the snapshot's); warns when our own hotkey
    is not on it, since the other side then refuses us (or never dials us)."""
    from .chain import ChainError

    try:
        graph = await source.start()
    except ChainError as exc:
        raise UsageError(str(exc)) from None
    if graph.uid_of(hotkey) is None:
        consequence = "miners will not find it" if role == "validator" else "validators will refuse it"
        log.warning("this %s's hotkey %s is not registered on netuid %d: %s", role, hotkey, graph.netuid, consequence)
    return graph


async def run_validator(args: argparse.Namespace) -> None:
    # The DB thread hands the GIL back and forth with a busy event loop on every
    # SQLite call; with the default 5 ms switch interval each hand-back can stall
    # a group commit for that long.
    sys.setswitchinterval(SWITCH_INTERVAL)
    from . import ValidatorNode
    from .games import GamesFile, GamesSource, GamesUrl

    if not args.flood_cooldown >= 0:  # also refuses nan
        raise UsageError("--flood-cooldown must be at least 0 (0: no cooldown)")
    ssl_context = _server_tls(args.ssl_certfile, args.ssl_keyfile)
    keypair = load_keypair(args)
    games: list[dict[str, Any]] | None = None
    if args.games and args.games_url:
        raise UsageError("give --games FILE or --games-url URL, not both")
    source: GamesSource | None = None
    if args.games:
        source = GamesFile(args.games)
        try:
            games = await source.fetch(True)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    elif args.games_url:
        try:
            source = GamesUrl(args.games_url)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
    allowed = _read_allow_file(args.allow_file) if args.allow_file else None
    with database_lock(args.db) as locked:
        chain = _chain_source(args)
        graph = await _first_metagraph(chain, keypair.ss58_address, "validator") if chain is not None else None
        node = _open_store(
            lambda: ValidatorNode(
                keypair, args.db, allowed, host=args.host, port=args.port,
                heartbeat_interval=args.heartbeat_interval, connection_timeout=args.connection_timeout,
                max_message_size=args.max_message_size, rate_limit=args.rate_limit,
                rate_burst=args.rate_burst, flood_cooldown=args.flood_cooldown,
                require_audience=args.require_audience, min_stake=args.min_stake,
                ssl_context=ssl_context,
            ),
            args.db, "validator",
        )
        _warn_unlocked(locked, args.db)
        if graph is not None:
            node.apply_metagraph(graph)
        await _serve_validator(node, args, games, source, chain)


async def _serve_validator(
    node: Any, args: argparse.Namespace, games: list[dict[str, Any]] | None, source: Any, chain: Any
) -> None:
    from .feed import SimulatedFeed
    from .games import GamesFollower, GamesUrl

    follower = GamesFollower(source, node.update_games) if source is not None else None

    async def reload() -> None:
        """SIGHUP: the allow file now; the games and the metagraph by their followers."""
        what = [f"the allow file {args.allow_file}"] if args.allow_file else []
        what += [f"the {follower.source.label}"] if follower is not None else []
        what += [f"the metagraph of netuid {args.netuid}"] if chain is not None else []
        log.info("SIGHUP: reloading %s", ", ".join(what) or "nothing (no --allow-file, --games, --games-url or --netuid)")
        if follower is not None:
            follower.poke()
        if chain is not None:
            chain.poke()
        if args.allow_file:
            try:
                hotkeys = await trio.to_thread.run_sync(_read_allow_file, args.allow_file)
            except UsageError as exc:
                log.warning("allow file not reloaded: %s; the old list stays", exc)
                return
            node.set_allow_list(hotkeys)
            log.info("allow file %s reloaded: %d hotkeys", args.allow_file, len(hotkeys))
        await trio.lowlevel.checkpoint()

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_until_signalled, nursery)
            await nursery.start(_on_hangup, reload)
            # Stored before the port opens: every miner gets them right after its
            # Welcome, and this first update is broadcast to nobody.
            feed = SimulatedFeed(args.feed_games, owner=node.hotkey) if source is None else None
            if feed is not None and args.wallet_name and not args.hotkey_uri:
                log.warning(
                    "wallet %s runs on the SIMULATED game feed: its games are made up; "
                    "give --games FILE or --games-url URL for real games", args.wallet_name,
                )
            if isinstance(source, GamesUrl):
                assert follower is not None
                await follower.check(force=True)  # a failure is a WARNING: the stored games stay
            try:
                if feed is not None or games is not None:
                    await node.update_games(games if feed is None else feed.tick(0))
            except sqlite3.Error as exc:
                raise UsageError(f"cannot write database {args.db}: {exc}") from None
            try:
                port = await nursery.start(node.serve)
            except* OSError as group:
                error = _leaf(group)
                if isinstance(error, OSError) and error.errno == errno.EADDRINUSE:
                    raise UsageError(f"port {args.port} on {args.host} is in use") from None
                raise UsageError(f"cannot listen on {args.host}:{args.port}: {error}") from None
            scheme = "wss" if node.ssl_context else "ws"
            print(f"listening on {scheme}://{url_host(args.host)}:{port}/ws", flush=True)
            print(f"validator hotkey {node.hotkey}", flush=True)
            if feed is not None:
                nursery.start_soon(_run_feed, node, feed, args.feed_interval)
            if follower is not None:
                nursery.start_soon(follower.follow, args.games_poll)
            if chain is not None:
                nursery.start_soon(chain.follow, node.apply_metagraph, args.metagraph_refresh)
    finally:
        node.close()


async def _run_feed(node: Any, feed: Any, interval: float) -> None:
    """Store and broadcast the feed's games every ``interval``; a storage fault (a
    locked or full disk) skips one update, with a WARNING, and the next one retries."""
    while True:
        await trio.sleep(interval)
        try:
            await node.update_games(feed.tick())
        except sqlite3.Error as exc:
            log.warning("storing the feed's games failed (%s); retrying in %g s", exc, interval)


def _open_store(factory: Any, path: str, kind: str) -> Any:
    """Open a node's store; a database the node cannot use is a usage error that
    names the problem (the wrong kind of database, a permission)."""
    from .store import WrongDatabase

    try:
        return factory()
    except ValueError as exc:  # a setting out of range, refused by ConnectionSettings
        name, _, rest = str(exc).partition(" ")
        raise UsageError(f"--{name.replace('_', '-')} {rest}") from None
    except WrongDatabase as exc:
        raise UsageError(f"{exc}: give this {kind} its own --db") from None
    except (sqlite3.Error, RuntimeError, OSError) as exc:
        problem = db_access_problem(path)
        if problem is not None:
            raise UsageError(f"cannot open database {path}: {problem} (SQLite: {exc})") from None
        raise UsageError(f"cannot open database {path}: {exc}") from None


def _warn_unlocked(locked: bool, path: str) -> None:
    if not locked:
        log.warning("cannot create %s.lock: a second process on this database would not be refused", path)


async def run_miner(args: argparse.Namespace) -> None:
    from . import MinerNode

    validators = [_parse_validator_arg(v) for v in args.validator or ()]
    if not validators and args.netuid is None:
        raise UsageError("no validator: give --validator ws://HOST:PORT/ws@SS58, or --netuid N to find them on the chain")
    if not 0 < args.wager <= DAILY_WAGER_LIMIT:
        raise UsageError(f"--wager must be a positive number, at most {DAILY_WAGER_LIMIT:g}")
    if not args.reconnect_max >= 1.0:  # also refuses nan
        raise UsageError("--reconnect-max must be at least 1 (the first reconnect waits 1 s)")
    ssl_context = _client_tls(args.ssl_ca)
    keypair = load_keypair(args)
    with database_lock(args.db) as locked:
        chain = _chain_source(args)
        graph = await _first_metagraph(chain, keypair.ss58_address, "miner") if chain is not None else None
        node = _open_store(
            lambda: MinerNode(
                keypair, validators, args.db, wager=args.wager,
                heartbeat_interval=args.heartbeat_interval, connection_timeout=args.connection_timeout,
                max_reconnect_interval=args.reconnect_max, ssl_context=ssl_context,
            ),
            args.db, "miner",
        )
        _warn_unlocked(locked, args.db)
        if graph is not None:
            node.apply_metagraph(graph)
        await _serve_miner(node, args, chain)


async def _serve_miner(node: Any, args: argparse.Namespace, chain: Any) -> None:
    from ..link.http import serve_http

    async def reload() -> None:
        if chain is None:
            log.info("SIGHUP: nothing to reload (no --netuid)")
            await trio.lowlevel.checkpoint()
            return
        log.info("SIGHUP: reloading the metagraph of netuid %d", args.netuid)
        chain.poke()

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_until_signalled, nursery)
            await nursery.start(_on_hangup, reload)
            print(f"miner hotkey {node.hotkey}", flush=True)
            if args.metrics_port is not None:
                try:
                    port = await nursery.start(serve_http, node.metrics.routes(), args.metrics_host, args.metrics_port)
                except* OSError as group:
                    error = _leaf(group)
                    raise UsageError(
                        f"cannot serve metrics on {args.metrics_host}:{args.metrics_port}: {error}"
                    ) from None
                print(f"metrics on http://{url_host(args.metrics_host)}:{port}/metrics", flush=True)
            await nursery.start(node.run)
            if chain is not None:
                nursery.start_soon(chain.follow, node.apply_metagraph, args.metagraph_refresh)
    finally:
        node.close()


def run_status(args: argparse.Namespace) -> None:
    from .store import MinerStore, ValidatorStore

    path = Path(args.db)
    if not path.is_file():
        raise UsageError(f"no database at {path}")
    try:
        probe = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        try:
            tables = {r[0] for r in probe.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            version = int(probe.execute("PRAGMA user_version").fetchone()[0])
        finally:
            probe.close()
    except sqlite3.Error as exc:
        raise UsageError(f"cannot read database {path}: {exc}") from None
    # Our stores stamp user_version; a file without it (say, another program's
    # "predictions" table) is not ours, and opening it as a store would migrate it.
    if version < 1 or "predictions" not in tables:
        raise UsageError(f"{path} is not a bettensor-ws database")
    try:
        if "deliveries" in tables:
            _miner_status(MinerStore(path))
        else:
            _validator_status(ValidatorStore(path))
    except (sqlite3.Error, RuntimeError) as exc:
        raise UsageError(f"cannot read database {path}: {exc}") from None


def _miner_status(miner: Any) -> None:
    try:
        totals = miner.counts()
        for state in ("pending", "confirmed", "rejected"):
            print(f"{state} {totals[state]}")
        for validator in miner.validators():
            counts = miner.counts(validator)
            line = f"validator {validator}: " + ", ".join(f"{k} {v}" for k, v in counts.items())
            oldest = miner.oldest_pending(validator)
            if oldest is not None:
                line += f", oldest pending {_age(oldest)}"
            print(line)
        rejections = miner.latest_rejections()
        if rejections:
            print("latest rejections:")
            for pid, validator, reason in rejections:
                print(f"  {pid} by {validator}: {reason}")
    finally:
        miner.close()


def _age(seconds: float) -> str:
    """``45s``, ``12m05s``, ``3h12m``, ``2d04h``: the two largest units."""
    whole = int(seconds)
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def _validator_status(validator_store: Any) -> None:
    try:
        rows = validator_store.per_miner()
        print(f"predictions {sum(n for _, n, _ in rows)}")
        for hotkey, count, wagered in rows:
            print(f"miner {hotkey}: predictions {count}, wagered {wagered:g}")
    finally:
        validator_store.close()


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = parse_args(argv)
    except UsageError as exc:
        print(str(exc), file=sys.stderr)
        return 2
    # validator and miner: connects, disconnects and refusals by default; the demo
    # and status print their own output
    quiet = args.command in ("demo", "status")
    base = logging.WARNING if quiet else logging.INFO
    setup_logging(logging.DEBUG if args.verbose else base, args.log_format)
    problem: str | None = None
    code = 0
    try:
        if args.command == "validator":
            trio.run(run_validator, args)
        elif args.command == "miner":
            trio.run(run_miner, args)
        elif args.command == "demo":
            from .demo import run_demo

            code = trio.run(run_demo, args.miners, args.games, args.duration)
        else:
            run_status(args)
    except* UsageError as group:
        problem = str(_leaf(group))
    except* KeyboardInterrupt:
        pass
    if problem is not None:
        print(f"bettensor-ws: {problem}", file=sys.stderr)
        return 2
    return code


def _leaf(error: BaseException) -> BaseException:
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    return error


if __name__ == "__main__":
    sys.exit(main())
