"""Operations (issue 15): strict options, TLS from the command line, /health and
/metrics, logs an operator can use, clear database errors, packaging.

The command line is run as an operator runs it (subprocesses); the HTTP endpoints
and the logs are checked in-process on real loopback sockets, where the network
itself is under test, and on in-memory streams under the mock clock otherwise.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import signal
import ssl
import subprocess
import sys
import time
import tomllib
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import orjson
import pytest
import trio
import trio.testing
import trio_websocket
import trustme
from bittensor_wallet import Keypair, Wallet

import bettensor_ws
from bettensor_ws import (
    MinerWebSocketManager,
    ValidatorWebSocketManager,
    WelcomeMessage,
    encode,
    sign,
)
from bettensor_ws.link.http import ReplayStream, plain_get, serve_http
from bettensor_ws.node import MinerNode, ValidatorNode
from bettensor_ws.node.cli import OPTION_RANGES, _HelpFormatter, build_parser, parse_args
from bettensor_ws.node.logs import JsonFormatter
from bettensor_ws.node.store import MinerStore, ValidatorStore, WrongDatabase

from .helpers import make_game
from .test_cli import (
    ALICE,
    BOB,
    CliProcess,
    _env,
    assert_one_line_error,
    run_cli,
    start_validator,
)

ROOT = Path(__file__).resolve().parents[1]
WAIT = 30.0  # generous bound for conditions on real sockets (a busy CI core)


# --------------------------------------------------------------------------- bad input


def _v(tmp: Path, *extra: str) -> list[str]:
    return ["validator", "--port", "0", "--hotkey-uri", "//Alice", "--db", str(tmp / "v.db"), *extra]


def _m(tmp: Path, *extra: str) -> list[str]:
    return ["miner", "--validator", f"ws://127.0.0.1:9/ws@{ALICE}", "--hotkey-uri", "//Bob",
            "--db", str(tmp / "m.db"), *extra]


def _validator_db(tmp: Path) -> str:
    ValidatorStore(tmp / "v.db").close()
    return str(tmp / "v.db")


def _miner_db(tmp: Path) -> str:
    MinerStore(tmp / "m.db").close()
    return str(tmp / "m.db")


def _encrypted_wallet(tmp: Path) -> list[str]:
    wallet = Wallet(name="w", hotkey="h", path=str(tmp / "wallets"))
    wallet.set_hotkey(Keypair.create_from_uri("//Eve"), encrypt=True, overwrite=True,
                      hotkey_password="correct horse battery")
    return ["validator", "--port", "0", "--db", str(tmp / "v.db"), "--wallet.name", "w",
            "--wallet.hotkey", "h", "--wallet.path", str(tmp / "wallets")]


BAD_OPS: dict[str, tuple[Callable[[Path], list[str]], tuple[str, ...]]] = {
    # the six of the issue: each started and then broke every connection, or spun
    "--rate-limit -5": (lambda t: _v(t, "--rate-limit", "-5"), ("--rate-limit", "more than 0")),
    "--rate-burst 0": (lambda t: _v(t, "--rate-burst", "0"), ("--rate-burst", "at least 1")),
    "--max-message-size 0": (lambda t: _v(t, "--max-message-size", "0"), ("--max-message-size", "at least")),
    "--connection-timeout 0": (lambda t: _v(t, "--connection-timeout", "0"), ("--connection-timeout",)),
    "--heartbeat-interval 0": (lambda t: _v(t, "--heartbeat-interval", "0"), ("--heartbeat-interval",)),
    "--feed-interval 0": (lambda t: _v(t, "--feed-interval", "0"), ("--feed-interval", "at least 0.1")),
    # nan and infinities, and the rest of the table
    "--rate-limit nan": (lambda t: _v(t, "--rate-limit", "nan"), ("--rate-limit", "nan")),
    "--heartbeat-interval inf": (lambda t: _v(t, "--heartbeat-interval", "inf"), ("--heartbeat-interval", "inf")),
    "--feed-games 0": (lambda t: _v(t, "--feed-games", "0"), ("--feed-games",)),
    "--flood-cooldown -1": (lambda t: _v(t, "--flood-cooldown", "-1"), ("--flood-cooldown must be at least 0",)),
    "--connection-timeout below the heartbeat": (
        lambda t: _v(t, "--connection-timeout", "30"), ("--connection-timeout", "--heartbeat-interval"),
    ),
    "miner --wager 0": (lambda t: _m(t, "--wager", "0"), ("--wager",)),
    "miner --wager nan": (lambda t: _m(t, "--wager", "nan"), ("--wager",)),
    "miner --reconnect-max 0.5": (lambda t: _m(t, "--reconnect-max", "0.5"), ("--reconnect-max",)),
    "miner --heartbeat-interval -1": (lambda t: _m(t, "--heartbeat-interval", "-1"), ("--heartbeat-interval",)),
    "miner --metrics-port 70000": (lambda t: _m(t, "--metrics-port", "70000"), ("70000",)),
    "demo --miners 0": (lambda t: ["demo", "--miners", "0"], ("--miners",)),
    "demo --duration 0": (lambda t: ["demo", "--duration", "0"], ("--duration",)),
    "demo --games -1": (lambda t: ["demo", "--games", "-1"], ("--games",)),
    # identity
    "--hotkey-uri with --wallet.name": (lambda t: _v(t, "--wallet.name", "w"), ("--hotkey-uri", "--wallet.name")),
    "--hotkey-uri with --wallet.path": (lambda t: _m(t, "--wallet.path", str(t)), ("--hotkey-uri", "--wallet.path")),
    "encrypted hotkey, no terminal": (_encrypted_wallet, ("encrypted", "BT_PW_")),
    # TLS
    "--ssl-keyfile alone": (lambda t: _v(t, "--ssl-keyfile", str(t / "k.pem")), ("--ssl-keyfile needs --ssl-certfile",)),
    "--ssl-certfile missing": (lambda t: _v(t, "--ssl-certfile", str(t / "c.pem")), ("c.pem", "TLS")),
    "--ssl-ca missing": (lambda t: _m(t, "--ssl-ca", str(t / "ca.pem")), ("ca.pem", "CA")),
    # databases
    "miner on a validator database": (
        lambda t: ["miner", "--validator", f"ws://127.0.0.1:9/ws@{ALICE}", "--hotkey-uri", "//Bob",
                   "--db", _validator_db(t)],
        ("is a validator database, not a miner database",),
    ),
    "validator on a miner database": (
        lambda t: ["validator", "--port", "0", "--hotkey-uri", "//Alice", "--db", _miner_db(t)],
        ("is a miner database, not a validator database",),
    ),
    "database folder missing": (
        lambda t: ["validator", "--port", "0", "--hotkey-uri", "//Alice", "--db", str(t / "nosuch" / "v.db")],
        ("the folder", "nosuch", "does not exist"),
    ),
}


@pytest.fixture(scope="module")
def bad_ops_results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, subprocess.CompletedProcess[str]]:
    runs = []
    for i, (build, _) in enumerate(BAD_OPS.values()):
        tmp = tmp_path_factory.mktemp(f"ops{i}")
        runs.append((tmp, build(tmp)))
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = pool.map(lambda run: run_cli(*run[1], cwd=run[0], timeout=60), runs)
        return dict(zip(BAD_OPS, results, strict=True))


@pytest.mark.parametrize("case", list(BAD_OPS))
def test_bad_operations_input_exits_2_with_one_line(
    bad_ops_results: dict[str, subprocess.CompletedProcess[str]], case: str
) -> None:
    result = bad_ops_results[case]
    assert_one_line_error(result, *BAD_OPS[case][1])
    assert "listening" not in result.stdout


def _commands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def test_every_numeric_option_is_in_the_range_table() -> None:
    numeric = set()
    for command in _commands().values():
        for action in command._actions:
            if action.type in (int, float) or getattr(action.type, "__name__", "") == "_port":
                numeric.add(action.dest)
    assert numeric <= set(OPTION_RANGES), numeric - set(OPTION_RANGES)


# --------------------------------------------------------------------------- the parser


def test_help_shows_every_default() -> None:
    commands = _commands()
    for name, command in commands.items():
        formatter = _HelpFormatter(prog=name)
        for action in command._actions:
            if action.default in (None, False, argparse.SUPPRESS) or action.dest == "help":
                continue
            shown = formatter._get_help_string(action) or ""
            assert "%(default)" in shown or "default:" in shown, (name, action.dest)
    text = commands["validator"].format_help()
    assert "(default: 127.0.0.1)" in text
    assert "default: default" in commands["miner"].format_help()  # --wallet.hotkey


def test_verbose_and_log_format_after_the_command() -> None:
    assert parse_args(["validator", "-v", "--hotkey-uri", "//Alice"]).verbose == 1
    assert parse_args(["-v", "validator", "-v"]).verbose == 2
    assert parse_args(["validator"]).verbose == 0
    assert parse_args(["validator", "--log-format", "json"]).log_format == "json"
    assert parse_args(["--log-format", "json", "miner", "--validator", "x"]).log_format == "json"
    assert parse_args(["status", "--db", "x"]).log_format == "text"


@pytest.mark.parametrize("module", ["bettensor_ws", "bettensor_ws.node.cli"])
def test_version(module: str) -> None:
    result = subprocess.run([sys.executable, "-m", module, "--version"], capture_output=True, text=True,
                            env=_env(), timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"bettensor-ws {bettensor_ws.__version__}"


def test_python_m_bettensor_ws_runs_the_command() -> None:
    result = subprocess.run([sys.executable, "-m", "bettensor_ws", "validator", "--rate-burst", "0"],
                            capture_output=True, text=True, env=_env(), timeout=30)
    assert_one_line_error(result, "--rate-burst")


# --------------------------------------------------------------------------- running processes


def _http_get(host: str, port: int, path: str, *, context: ssl.SSLContext | None = None) -> tuple[int, bytes]:
    """One GET with the standard library, as a monitoring probe would make it."""
    import http.client

    conn: http.client.HTTPConnection = (
        http.client.HTTPSConnection(host, port, context=context, timeout=10)
        if context is not None else http.client.HTTPConnection(host, port, timeout=10)
    )
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def test_ipv6_host_is_printed_in_brackets_and_serves_health(tmp_path: Path) -> None:
    proc = CliProcess(["validator", "--host", "::1", "--port", "0", "--hotkey-uri", "//Alice",
                       "--db", str(tmp_path / "v.db")], tmp_path / "v.stderr")
    try:
        url = proc.expect_prefix("listening on ")
        match = re.fullmatch(r"ws://\[::1\]:(\d+)/ws", url)
        assert match, url
        status, body = _http_get("::1", int(match.group(1)), "/health")
        assert status == 200
        assert json.loads(body)["status"] == "ok"
    finally:
        proc.close()


def test_second_process_on_one_database_is_refused_and_the_lock_dies_with_the_first(tmp_path: Path) -> None:
    db = str(tmp_path / "v.db")
    first = CliProcess(["validator", "--port", "0", "--hotkey-uri", "//Alice", "--db", db], tmp_path / "1.stderr")
    try:
        first.expect_prefix("listening on ")
        second = run_cli("validator", "--port", "0", "--hotkey-uri", "//Alice", "--db", db)
        line = assert_one_line_error(second, "v.db", "in use by another bettensor-ws process")
        assert f"process {first.proc.pid}" in line, line
        miner = run_cli("miner", "--validator", f"ws://127.0.0.1:9/ws@{ALICE}", "--hotkey-uri", "//Bob", "--db", db)
        assert_one_line_error(miner, "in use")
        first.proc.send_signal(signal.SIGKILL)  # no clean-up: the OS drops the lock
        first.proc.wait(timeout=10)
    finally:
        first.close()
    third, _ = start_validator(tmp_path, "--port", "0", "--hotkey-uri", "//Alice", "--db", db, name="third")
    try:
        assert third.signal(signal.SIGTERM) == 0
    finally:
        third.close()


@pytest.fixture
def certificates(tmp_path: Path) -> dict[str, str]:
    ca = trustme.CA()
    ca.issue_cert("127.0.0.1", "localhost").private_key_and_cert_chain_pem.write_to_path(tmp_path / "server.pem")
    ca.cert_pem.write_to_path(tmp_path / "ca.pem")
    trustme.CA().cert_pem.write_to_path(tmp_path / "other-ca.pem")
    return {name: str(tmp_path / f"{name}.pem") for name in ("server", "ca", "other-ca")}


def _json_lines(text: str) -> list[dict[str, Any]]:
    entries = [json.loads(line) for line in text.splitlines() if line.strip()]
    for entry in entries:
        assert {"time", "level", "logger", "message"} <= set(entry), entry
    return entries


def test_wss_validator_and_miner_from_the_cli_confirm_predictions(
    tmp_path: Path, certificates: dict[str, str]
) -> None:
    """TLS from the command line, trustme certificates; the logs as JSON lines."""
    validator = CliProcess(
        ["validator", "--port", "0", "--hotkey-uri", "//Alice", "--db", str(tmp_path / "v.db"),
         "--ssl-certfile", certificates["server"], "--feed-games", "3", "--feed-interval", "0.5",
         "--log-format", "json"],
        tmp_path / "v.stderr",
    )
    miners: list[CliProcess] = []
    try:
        url = validator.expect_prefix("listening on ")
        assert url.startswith("wss://127.0.0.1:"), url
        port = int(url.rsplit(":", 1)[1].removesuffix("/ws"))
        good = CliProcess(["miner", "--validator", f"{url}@{ALICE}", "--hotkey-uri", "//Bob",
                           "--db", str(tmp_path / "m.db"), "--ssl-ca", certificates["ca"]], tmp_path / "m.stderr")
        miners.append(good)
        wrong = CliProcess(["miner", "--validator", f"{url}@{ALICE}", "--hotkey-uri", "//Charlie",
                            "--db", str(tmp_path / "m2.db"), "--ssl-ca", certificates["other-ca"],
                            "--reconnect-max", "1"], tmp_path / "m2.stderr")
        miners.append(wrong)
        deadline = time.monotonic() + WAIT
        while True:
            status = run_cli("status", "--db", str(tmp_path / "m.db"))
            counts = dict(line.split(" ", 1) for line in status.stdout.splitlines()[:3]) if status.returncode == 0 else {}
            if counts.get("pending") == "0" and int(counts.get("confirmed", "0")) >= 3:
                break
            assert time.monotonic() < deadline, (status.stdout, status.stderr, good.stderr())
            time.sleep(0.2)
        # /health and /metrics answer on the wss port too
        context = ssl.create_default_context(cafile=certificates["ca"])
        code, body = _http_get("127.0.0.1", port, "/health", context=context)
        assert code == 200 and json.loads(body)["connected_miners"] == 1
        code, body = _http_get("127.0.0.1", port, "/metrics", context=context)
        assert code == 200 and _metric(body, "bettensor_ws_predictions_stored_total") >= 3
        # the miner with the wrong CA says what is wrong, once per backoff period
        while "certificate verification failed" not in wrong.stderr():
            assert time.monotonic() < deadline, wrong.stderr()
            time.sleep(0.1)
        said = [ln for ln in wrong.stderr().splitlines() if "certificate verification failed" in ln]
        assert f"for {url}" in said[0], said[0]
        assert "WARNING" in said[0]
        for proc in miners:
            assert proc.signal(signal.SIGTERM) == 0
        assert validator.signal(signal.SIGTERM) == 0
        entries = _json_lines(validator.stderr())
        connected = [e for e in entries if "connected from" in e["message"]]
        assert connected and connected[0]["level"] == "INFO" and connected[0]["hotkey"] == BOB
        assert connected[0]["peer"].startswith("127.0.0.1:")
        closed = [e for e in entries if "disconnected" in e["message"]]
        assert closed and "close_code" in closed[0]
    finally:
        for proc in [*miners, validator]:
            proc.close()


# --------------------------------------------------------------------------- health and metrics


async def _get(port: int, path: str, *, context: ssl.SSLContext | None = None,
               extra: bytes = b"") -> tuple[int, dict[str, str], bytes]:
    stream: trio.abc.Stream = (
        await trio.open_ssl_over_tcp_stream("127.0.0.1", port, ssl_context=context, https_compatible=True)
        if context is not None else await trio.open_tcp_stream("127.0.0.1", port)
    )
    async with stream:
        await stream.send_all(f"GET {path} HTTP/1.1\r\nHost: localhost\r\n".encode() + extra + b"\r\n")
        data = b""
        while chunk := await stream.receive_some():
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body


def _metric(text: bytes, name: str) -> float:
    for line in text.decode().splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{") and line.split(" ")[0] == name:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def _labelled(text: bytes, name: str, label: str) -> float:
    for line in text.decode().splitlines():
        if line.startswith(f"{name}{{{label}}} "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def _until(check: Callable[[], Awaitable[bool]], what: str) -> None:
    try:
        with trio.fail_after(WAIT):
            while not await check():  # noqa: ASYNC110  (state in databases written from threads)
                await trio.sleep(0.02)
    except trio.TooSlowError:
        raise AssertionError(f"timed out waiting for {what}") from None


async def _metrics_flow(tmp_path: Path, alice: Keypair, bob: Keypair, server_ctx: ssl.SSLContext | None,
                        client_ctx: ssl.SSLContext | None) -> None:
    validator = ValidatorNode(alice, tmp_path / "v.db", ssl_context=server_ctx)
    miner: MinerNode | None = None
    async with trio.open_nursery() as nursery:
        port = await nursery.start(validator.serve)
        status, headers, body = await _get(port, "/health", context=client_ctx)
        assert status == 200 and headers["content-type"] == "application/json"
        assert orjson.loads(body) == {"status": "ok", "role": "validator", "connected_miners": 0,
                                      "pending_commits": 0, "database_writable": True}
        status, headers, before = await _get(port, "/metrics", context=client_ctx)
        assert status == 200 and headers["content-type"].startswith("text/plain")
        assert _metric(before, "bettensor_ws_predictions_stored_total") == 0
        assert _metric(before, "bettensor_ws_connections") == 0
        assert (await _get(port, "/nothing", context=client_ctx))[0] == 404
        assert (await _get(port, "/ws", context=client_ctx))[0] == 426  # a GET without the upgrade
        # a WebSocket handshake on the same port still works (its bytes are replayed)
        miner = MinerNode(bob, [(alice.ss58_address, validator.url)], tmp_path / "m.db", ssl_context=client_ctx)
        await nursery.start(miner.run)
        await miner.wait_connected()
        await validator.update_games([make_game(1), make_game(2)])

        async def confirmed() -> bool:
            assert miner is not None
            return (await miner.db.run(miner.store.counts))["confirmed"] == 2

        await _until(confirmed, "two confirmations")
        _, _, after = await _get(port, "/metrics", context=client_ctx)
        assert _metric(after, "bettensor_ws_predictions_stored_total") == 2
        assert _metric(after, "bettensor_ws_connections") == 1
        assert _metric(after, "bettensor_ws_connections_opened_total") == 1
        assert _labelled(after, "bettensor_ws_frames_received_total", 'type="prediction"') >= 1
        assert _labelled(after, "bettensor_ws_frames_sent_total", 'type="confirmation"') >= 1
        assert _labelled(after, "bettensor_ws_frames_sent_total", 'type="game_update"') >= 1
        assert _metric(after, "bettensor_ws_confirmation_latency_seconds_count") >= 1
        assert _metric(after, "bettensor_ws_commit_seconds_count") >= 1
        assert _metric(after, "bettensor_ws_commit_groups_total") >= 1
        assert "bettensor_ws_send_queue_depth_max" in after.decode()
        _, _, health = await _get(port, "/health", context=client_ctx)
        assert orjson.loads(health)["connected_miners"] == 1
        # the miner's own endpoint
        miner_port = await nursery.start(serve_http, miner.metrics.routes(), "127.0.0.1", 0)
        _, _, mine = await _get(miner_port, "/metrics")
        assert _labelled(mine, "bettensor_ws_outbox_deliveries", 'state="confirmed"') == 2
        assert _labelled(mine, "bettensor_ws_outbox_deliveries", 'state="pending"') == 0
        assert _metric(mine, "bettensor_ws_confirmation_latency_seconds_count") == 2
        assert _metric(mine, "bettensor_ws_outbox_oldest_pending_seconds") == 0
        status, _, mine_health = await _get(miner_port, "/health")
        assert status == 200 and orjson.loads(mine_health)["connected_validators"] == 1
        nursery.cancel_scope.cancel()
    assert miner is not None
    miner.close()
    validator.close()


async def test_health_and_metrics_change_as_predictions_flow(tmp_path: Path, alice: Keypair, bob: Keypair) -> None:
    await _metrics_flow(tmp_path, alice, bob, None, None)


async def test_health_and_metrics_over_tls(tmp_path: Path, alice: Keypair, bob: Keypair) -> None:
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_ctx)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    await _metrics_flow(tmp_path, alice, bob, server_ctx, client_ctx)


async def test_miner_outbox_metrics_show_pending_and_its_age(tmp_path: Path, bob: Keypair) -> None:
    miner = MinerNode(bob, [(ALICE, "ws://127.0.0.1:9/ws")], tmp_path / "m.db")
    try:
        await miner.submit_predictions(miner.strategy([make_game(1)]))
        _, _, body = await miner.metrics.metrics()
        assert _labelled(body, "bettensor_ws_outbox_deliveries", 'state="pending"') == 1
        assert _metric(body, "bettensor_ws_outbox_oldest_pending_seconds") >= 0
        assert b"bettensor_ws_outbox_oldest_pending_seconds" in body
    finally:
        miner.close()


def test_each_node_has_its_own_registry(tmp_path: Path, alice: Keypair) -> None:
    first = ValidatorNode(alice, tmp_path / "a.db")
    second = ValidatorNode(alice, tmp_path / "b.db")
    try:
        assert first.metrics.registry is not second.metrics.registry
    finally:
        first.close()
        second.close()


async def test_health_says_degraded_when_the_database_cannot_be_written(tmp_path: Path, alice: Keypair) -> None:
    validator = ValidatorNode(alice, tmp_path / "v.db")
    try:
        validator.store.writable = lambda: False  # type: ignore[method-assign]
        status, content_type, body = await validator.metrics.health()
        assert status == 503 and content_type == "application/json"
        assert orjson.loads(body)["database_writable"] is False
        assert orjson.loads(body)["status"] == "degraded"
    finally:
        validator.close()


async def test_replay_stream_gives_back_what_was_read() -> None:
    left, right = trio.testing.memory_stream_pair()
    await left.send_all(b"tail")
    replay = ReplayStream(right, b"head-")
    assert await replay.receive_some(3) == b"hea"
    assert await replay.receive_some() == b"d-"
    assert await replay.receive_some() == b"tail"


def test_plain_get_tells_probes_from_upgrades() -> None:
    assert plain_get(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n") == "/health"
    assert plain_get(b"GET /metrics?x=1 HTTP/1.1\r\n\r\n") == "/metrics"
    assert plain_get(b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n") is None
    assert plain_get(b"GET /ws HTTP/1.1\r\nUpgrade: WebSocket\r\n\r\n") is None
    assert plain_get(b"POST /health HTTP/1.1\r\n\r\n") is None
    assert plain_get(b"GET /health HTTP/1.1\r\nHost: x") is None  # head not complete


# --------------------------------------------------------------------------- logs


class _Memory:
    """A validator reachable by URL over in-memory streams."""

    def __init__(self, serve: Callable[[trio.abc.Stream], Awaitable[None]], nursery: trio.Nursery) -> None:
        self._serve = serve
        self._nursery = nursery

    async def open(self, url: str) -> trio.abc.Stream:
        client, server = trio.testing.memory_stream_pair()
        self._nursery.start_soon(self._serve, server)
        return client


def _warnings(caplog: pytest.LogCaptureFixture, needle: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno >= logging.WARNING and needle in r.getMessage()]


async def test_a_url_without_ws_is_said_once_and_retried_at_the_longest_interval(
    alice: Keypair, bob: Keypair, autojump_clock: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, "bettensor_ws")
    validator = ValidatorWebSocketManager(alice)
    dials: list[float] = []
    async with trio.open_nursery() as nursery:
        net = _Memory(validator.handle_stream, nursery)

        async def opener(url: str) -> trio.abc.Stream:
            dials.append(trio.current_time())
            return await net.open(url)

        miner = MinerWebSocketManager(bob, [(alice.ss58_address, "ws://validator:8765/")], stream_opener=opener,
                                      max_reconnect_interval=8.0)
        await nursery.start(miner.run)
        await trio.sleep(100)
        nursery.cancel_scope.cancel()
    said = _warnings(caplog, "the URL path is wrong")
    assert len(said) == 1, [r.getMessage() for r in said]
    assert "404" in said[0].getMessage() and "ws://validator:8765/" in said[0].getMessage()
    gaps = [b - a for a, b in zip(dials, dials[1:], strict=False)]
    assert len(gaps) >= 5 and min(gaps) >= 8.0 - 1e-6, gaps


async def test_a_welcome_signed_by_another_key_names_that_key(
    alice: Keypair, bob: Keypair, charlie: Keypair, autojump_clock: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A validator that ignores the audience (as a reference one does) answers with
    its own key: the miner says which key it met and which it expected, once."""
    caplog.set_level(logging.INFO, "bettensor_ws")

    async def other_validator(stream: trio.abc.Stream) -> None:
        async with trio.open_nursery() as nursery:
            request = await trio_websocket.wrap_server_stream(nursery, stream)
            ws = await request.accept()
            await ws.get_message()
            await ws.send_message(encode(sign(WelcomeMessage(sender=alice.ss58_address, data={
                "message": "Connection established", "status": "success"}), alice)))
            with trio.move_on_after(5):
                try:
                    await ws.get_message()
                except trio_websocket.ConnectionClosed:
                    pass  # the miner closes 1008: expected

    async with trio.open_nursery() as nursery:
        net = _Memory(other_validator, nursery)
        miner = MinerWebSocketManager(bob, [(charlie.ss58_address, "ws://validator/ws")], stream_opener=net.open,
                                      max_reconnect_interval=4.0)
        await nursery.start(miner.run)
        await trio.sleep(60)
        nursery.cancel_scope.cancel()
    said = _warnings(caplog, "not signed by the expected validator hotkey")
    assert len(said) == 1
    text = said[0].getMessage()
    assert alice.ss58_address in text and charlie.ss58_address in text, text
    assert miner.last_error[charlie.ss58_address] == "welcome not signed by the expected validator hotkey"


async def test_two_miners_with_one_hotkey_are_told_at_warning(
    alice: Keypair, bob: Keypair, autojump_clock: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "bettensor_ws")
    validator = ValidatorWebSocketManager(alice)
    async with trio.open_nursery() as nursery:
        net = _Memory(validator.handle_stream, nursery)
        first = MinerWebSocketManager(bob, [(alice.ss58_address, "ws://v/ws")], stream_opener=net.open)
        second = MinerWebSocketManager(bob, [(alice.ss58_address, "ws://v/ws")], stream_opener=net.open)
        await nursery.start(first.run)
        await first.wait_connected()
        await nursery.start(second.run)
        await second.wait_connected()
        while not _warnings(caplog, "another process with this miner's hotkey"):  # noqa: ASYNC110
            await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    said = _warnings(caplog, "another process with this miner's hotkey")[0]
    assert said.levelno == logging.WARNING and bob.ss58_address in said.getMessage()


async def test_connects_disconnects_and_refusals_at_info_with_hotkey_and_peer(
    alice: Keypair, bob: Keypair, charlie: Keypair, caplog: pytest.LogCaptureFixture
) -> None:
    """Real loopback: the peer address is the miner's socket."""
    caplog.set_level(logging.INFO, "bettensor_ws")
    validator = ValidatorWebSocketManager(alice, [bob.ss58_address])
    async with trio.open_nursery() as nursery:
        port = await nursery.start(validator.serve)
        url = f"ws://127.0.0.1:{port}/ws"
        welcome = MinerWebSocketManager(bob, [(alice.ss58_address, url)])
        refused = MinerWebSocketManager(charlie, [(alice.ss58_address, url)], reconnect_base_interval=30.0,
                                        max_reconnect_interval=30.0)
        async with trio.open_nursery() as miners:
            await miners.start(welcome.run)
            await miners.start(refused.run)
            await welcome.wait_connected()
            while alice.ss58_address not in refused.last_error:  # noqa: ASYNC110
                await trio.sleep(0.01)
            miners.cancel_scope.cancel()
        while not any("disconnected" in r.getMessage() for r in caplog.records):  # noqa: ASYNC110
            await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    records = [r for r in caplog.records if r.name == "bettensor_ws.validator"]

    def one(needle: str) -> logging.LogRecord:
        found = [r for r in records if needle in r.getMessage()]
        assert found, (needle, [r.getMessage() for r in records])
        return found[0]

    for record, hotkey in ((one("connected from"), bob), (one("refused miner"), charlie),
                           (one("disconnected"), bob)):
        assert record.levelno == logging.INFO
        assert hotkey.ss58_address in record.getMessage()
        assert re.search(r"127\.0\.0\.1:\d+", record.getMessage()), record.getMessage()
    assert "1001" in one("disconnected").getMessage()


def test_json_log_lines_carry_the_extra_fields() -> None:
    record = logging.LogRecord("bettensor_ws.validator", logging.INFO, __file__, 1, "miner %s connected",
                               (BOB,), None)
    record.hotkey = BOB
    record.peer = "127.0.0.1:5000"
    entry = json.loads(JsonFormatter().format(record))
    assert entry["level"] == "INFO" and entry["logger"] == "bettensor_ws.validator"
    assert entry["message"] == f"miner {BOB} connected"
    assert entry["hotkey"] == BOB and entry["peer"] == "127.0.0.1:5000"
    assert entry["time"].endswith("+00:00")


# --------------------------------------------------------------------------- databases


def test_stores_refuse_the_other_kind_of_database(tmp_path: Path) -> None:
    ValidatorStore(tmp_path / "v.db").close()
    MinerStore(tmp_path / "m.db").close()
    with pytest.raises(WrongDatabase, match="is a validator database, not a miner database"):
        MinerStore(tmp_path / "v.db")
    with pytest.raises(WrongDatabase, match="is a miner database, not a validator database"):
        ValidatorStore(tmp_path / "m.db")


def test_a_folder_that_is_not_writable_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """As root, permissions do not stop SQLite: the check itself is tested."""
    from bettensor_ws.node import cli

    folder = tmp_path / "ro"
    folder.mkdir()
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != folder)
    problem = cli.db_access_problem(str(folder / "v.db"))
    assert problem is not None and f"the folder {folder} is not writable by" in problem
    (folder / "v.db").write_bytes(b"")
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != folder / "v.db")
    problem = cli.db_access_problem(str(folder / "v.db"))
    assert problem is not None and "v.db is not readable and writable by" in problem


# --------------------------------------------------------------------------- packaging


def test_license_is_an_spdx_string_and_the_file_exists() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert project["license"] == "MIT"
    assert "LICENSE" in project["license-files"]
    assert "MIT License" in (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert any(d.startswith("prometheus-client") for d in project["dependencies"])


def test_grafana_dashboard_reads_metrics_that_exist() -> None:
    dashboard = json.loads((ROOT / "docs" / "grafana-dashboard.json").read_text(encoding="utf-8"))
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert exprs
    names = set(re.findall(r"bettensor_ws_[a-z_]+", " ".join(exprs)))
    known = {
        "bettensor_ws_connections", "bettensor_ws_connections_opened_total", "bettensor_ws_frames_received_total",
        "bettensor_ws_frames_sent_total", "bettensor_ws_refusals_total", "bettensor_ws_reconnects_total",
        "bettensor_ws_dropped_broadcasts_total", "bettensor_ws_paced_frames_total",
        "bettensor_ws_send_queue_depth_sum", "bettensor_ws_send_queue_depth_max", "bettensor_ws_uptime_seconds",
        "bettensor_ws_predictions_stored_total", "bettensor_ws_predictions_refused_total",
        "bettensor_ws_commit_groups_total", "bettensor_ws_pending_commits",
        "bettensor_ws_confirmation_latency_seconds_bucket", "bettensor_ws_commit_seconds_bucket",
        "bettensor_ws_outbox_deliveries", "bettensor_ws_outbox_oldest_pending_seconds",
    }
    assert names <= known, names - known


def test_demo_draws_no_bar_when_not_on_a_terminal(tmp_path: Path) -> None:
    result = run_cli("demo", "--miners", "2", "--games", "2", "--duration", "2", cwd=tmp_path, timeout=60)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "\r" not in result.stderr
    assert "on purpose" in result.stderr



# --------------------------------------------------------------------------- the README's miner


def test_the_readme_miner_example_is_the_file_and_confirms_predictions(tmp_path: Path) -> None:
    example = ROOT / "examples" / "custom_miner.py"
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert f"```python\n{example.read_text(encoding='utf-8')}```" in readme
    validator, url = start_validator(tmp_path, "--port", "0", "--hotkey-uri", "//Alice",
                                     "--db", str(tmp_path / "v.db"), "--feed-games", "3")
    miner = subprocess.Popen(
        [sys.executable, str(example), f"{url}@{ALICE}", "--hotkey-uri", "//Bob", "--db", str(tmp_path / "u.db")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True, env=_env(),
    )
    try:
        assert miner.stdout is not None
        seen = []
        for line in miner.stdout:
            seen.append(line)
            if line.startswith("pending 0 confirmed 3 "):
                break
        else:
            pytest.fail(f"the example ended: {seen[-20:]}")
        assert seen[0] == f"connected to {url} as {BOB}\n", seen[:3]
    finally:
        miner.kill()
        miner.wait(timeout=10)
        if miner.stdout is not None:
            miner.stdout.close()
        validator.close()
    rows = sqlite3_rows(tmp_path / "v.db", "SELECT body FROM predictions")
    assert len(rows) == 3 and all(json.loads(body)["model_name"] == "underdog" for (body,) in rows)


def sqlite3_rows(path: Path, query: str) -> list[tuple[Any, ...]]:
    import sqlite3

    db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    try:
        return list(db.execute(query))
    finally:
        db.close()
