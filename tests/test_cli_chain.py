"""The ``bettensor-ws`` command on a subnet, run as an operator runs it: in a subprocess.

* the help shows the chain and game-source options;
* bad chain options, and no chain with no snapshot, print one line and exit 2;
* restarted while the chain is unreachable, a validator and a miner go on with
  their metagraph snapshots (and say so): the miner finds the validator's axon
  in its snapshot, the validator admits the miner and logs its UID;
* SIGHUP reloads (``--allow-file``, ``--games``, the metagraph) and never ends
  the process; a bad reload keeps the old state, with a WARNING;
* ``--games-url`` is polled (a real HTTP server on 127.0.0.1);
* a real wallet on the simulated feed is warned about.

The chain cannot be reached from here: the snapshots are written by the code the
nodes use, from the SDK's Metagraph built from records (tests/chain_fakes.py).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from bettensor_ws.node.chain import open_subtensor, read_metagraph, save_snapshot, snapshot_path
from tests.chain_fakes import FakeSubstrate, Peer
from tests.test_cli import (
    ALICE,
    BOB,
    CHARLIE,
    STARTUP,
    CliProcess,
    assert_one_line_error,
    game,
    port_of,
    run_cli,
    start_validator,
)
from tests.test_games import GamesServer

NETUID = 7


@pytest.fixture(autouse=True)
def sdk_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BTCLI_TOKEN_SYMBOLS_CACHE", str(tmp_path_factory.mktemp("sdk") / "token_symbols.json"))


def dead_endpoint() -> str:
    """A chain endpoint nobody answers at: the chain is unreachable."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"ws://127.0.0.1:{sock.getsockname()[1]}"


def write_snapshot(db: Path, network: str, peers: list[Peer]) -> Path:
    """The snapshot a node keeps beside ``db``, as it would have saved it from the chain."""
    fake = FakeSubstrate(NETUID, peers)
    subtensor = open_subtensor(network, None, substrate=fake)
    try:
        graph = read_metagraph(subtensor, NETUID, network)
    finally:
        subtensor.close()
    path = snapshot_path(db, NETUID)
    save_snapshot(path, graph)
    return path


def start_verbose(tmp: Path, *args: str, name: str = "validator") -> tuple[CliProcess, str]:
    """``bettensor-ws -v validator ARGS`` (INFO logs on stderr), with its ws:// URL."""
    proc = CliProcess(["-v", "validator", *args], tmp / f"{name}.stderr")
    return proc, proc.expect_prefix("listening on ")


def wait_stderr(proc: CliProcess, *needles: str, timeout: float = STARTUP) -> str:
    """Wait until the process's stderr holds every needle (its log lines)."""
    deadline = time.monotonic() + timeout
    while True:
        text = proc.stderr()
        if all(n in text for n in needles):
            return text
        if proc.proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"never logged {needles!r} (rc={proc.proc.poll()}); stderr: {text[-3000:]!r}")
        time.sleep(0.05)


def stored_games(db: Path) -> set[str]:
    ro = sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True)
    try:
        return {r[0] for r in ro.execute("SELECT game_id FROM games")}
    finally:
        ro.close()


def wait_games(db: Path, expected: set[str], timeout: float = STARTUP) -> None:
    deadline = time.monotonic() + timeout
    while stored_games(db) != expected:
        assert time.monotonic() < deadline, (stored_games(db), expected)
        time.sleep(0.05)


@pytest.fixture
def procs() -> Iterator[list[CliProcess]]:
    started: list[CliProcess] = []
    try:
        yield started
    finally:
        for proc in started:
            proc.close()


# --------------------------------------------------------------------------- help and bad input


def test_the_help_shows_the_chain_options() -> None:
    for command, options in (
        ("validator", ("--netuid", "--subtensor.network", "--subtensor.chain_endpoint", "--metagraph-refresh",
                       "--min-stake", "--games-url", "--games-poll", "finney, test, local", "default: 600")),
        ("miner", ("--netuid", "--subtensor.network", "--subtensor.chain_endpoint", "--metagraph-refresh")),
    ):
        result = run_cli(command, "--help")
        assert result.returncode == 0, result.stderr
        for option in options:
            assert option in result.stdout, (command, option)


def _validator(tmp: Path, *extra: str) -> list[str]:
    return ["validator", "--port", "0", "--hotkey-uri", "//Alice", "--db", str(tmp / "v.db"), *extra]


def _miner(tmp: Path, *extra: str) -> list[str]:
    return ["miner", "--hotkey-uri", "//Bob", "--db", str(tmp / "m.db"), *extra]


def _with_foreign_snapshot(tmp: Path) -> list[str]:
    endpoint = dead_endpoint()
    write_snapshot(tmp / "v.db", "test", [Peer(BOB)])  # of another network
    return _validator(tmp, "--netuid", str(NETUID), "--subtensor.chain_endpoint", endpoint)


BAD_INPUT: dict[str, tuple[Any, tuple[str, ...]]] = {
    "unknown network": (
        lambda tmp: _validator(tmp, "--netuid", "7", "--subtensor.network", "nosuchnet"), ("nosuchnet",)),
    "endpoint not ws": (
        lambda tmp: _validator(tmp, "--netuid", "7", "--subtensor.chain_endpoint", "http://127.0.0.1:9944"),
        ("--subtensor.chain_endpoint",)),
    "network without netuid": (lambda tmp: _validator(tmp, "--subtensor.network", "test"), ("--netuid",)),
    "netuid out of range": (lambda tmp: _miner(tmp, "--netuid", "70000"), ("70000",)),
    "refresh zero": (lambda tmp: _validator(tmp, "--metagraph-refresh", "0"), ("--metagraph-refresh",)),
    "min stake negative": (lambda tmp: _validator(tmp, "--min-stake=-1"), ("--min-stake",)),
    "games poll zero": (lambda tmp: _validator(tmp, "--games-poll", "0"), ("--games-poll",)),
    "games and games-url": (
        lambda tmp: _validator(tmp, "--games", "g.json", "--games-url", "http://127.0.0.1:1/g"), ("not both",)),
    "games-url not http": (lambda tmp: _validator(tmp, "--games-url", "ftp://example.com/g"), ("--games-url",)),
    "miner without validators": (lambda tmp: _miner(tmp), ("--validator", "--netuid")),
    "validator: no chain, no snapshot": (
        lambda tmp: _validator(tmp, "--netuid", "7", "--subtensor.chain_endpoint", dead_endpoint()),
        ("netuid 7", "no snapshot", "v.db.metagraph-7.json")),
    "miner: no chain, no snapshot": (
        lambda tmp: _miner(tmp, "--netuid", "7", "--subtensor.chain_endpoint", dead_endpoint()),
        ("netuid 7", "no snapshot", "m.db.metagraph-7.json")),
    "snapshot of another network": (_with_foreign_snapshot, ("unusable", "network 'test'")),
    "allow file with bad lines": (
        lambda tmp: _validator(tmp, "--allow-file", _allow(tmp, f"{ALICE}  # me\nnope\n# fine\n5Bad  # x\n")),
        ("line 2: 'nope'", "line 4: '5Bad'")),
}


def _allow(tmp: Path, text: str) -> str:
    path = tmp / "allowed.txt"
    path.write_text(text, encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def bad_input_results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, subprocess.CompletedProcess[str]]:
    runs = []
    with pytest.MonkeyPatch.context() as env:  # the snapshots are written through the SDK
        env.setenv("BTCLI_TOKEN_SYMBOLS_CACHE", str(tmp_path_factory.mktemp("sdk") / "symbols.json"))
        for i, (build, _) in enumerate(BAD_INPUT.values()):
            tmp = tmp_path_factory.mktemp(f"badchain{i}")
            runs.append((tmp, build(tmp)))
    with ThreadPoolExecutor(max_workers=max(2, 2 * (os.cpu_count() or 1))) as pool:
        results = pool.map(lambda run: run_cli(*run[1], cwd=run[0], timeout=60), runs)
        return dict(zip(BAD_INPUT, results, strict=True))


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_chain_input_exits_2_with_one_line(
    bad_input_results: dict[str, subprocess.CompletedProcess[str]], case: str
) -> None:
    result = bad_input_results[case]
    assert_one_line_error(result, *BAD_INPUT[case][1])
    assert result.stdout == ""


# --------------------------------------------------------------------------- snapshots


def test_a_restart_without_the_chain_goes_on_with_the_snapshots(tmp_path: Path, procs: list[CliProcess]) -> None:
    """Alice validates, Bob mines, on netuid 7; the chain is down. Each goes on with its
    snapshot: Bob finds Alice's axon in his, Alice admits Bob (uid 1) from hers, and
    refuses Charlie, who is not registered."""
    endpoint = dead_endpoint()
    # the validator's snapshot: bob is registered; charlie is not
    write_snapshot(tmp_path / "v.db", endpoint, [Peer(ALICE, 100, True), Peer(BOB, 1.0)])
    validator, url = start_verbose(
        tmp_path, "--port", "0", "--hotkey-uri", "//Alice", "--db", str(tmp_path / "v.db"),
        "--netuid", str(NETUID), "--subtensor.chain_endpoint", endpoint,
    )
    procs.append(validator)
    wait_stderr(validator, "going on with the snapshot", "block 1000")
    # the miner's snapshot: alice serves an axon at the validator's port
    write_snapshot(tmp_path / "m.db", endpoint, [
        Peer(ALICE, 100, True, "127.0.0.1", port_of(url)),
        Peer(BOB, 1.0, True, "127.0.0.1", 1),  # bob himself: never dialled
    ])
    miner = CliProcess(
        ["-v", "miner", "--hotkey-uri", "//Bob", "--db", str(tmp_path / "m.db"), "--netuid", str(NETUID),
         "--subtensor.chain_endpoint", endpoint], tmp_path / "miner.stderr",
    )
    procs.append(miner)
    assert miner.expect_prefix("miner hotkey ") == BOB
    wait_stderr(miner, "going on with the snapshot", f"validator {ALICE} (uid 0) at {url}: dialling",
                f"connected to validator {ALICE}")
    wait_stderr(validator, f"miner {BOB} (uid 1) connected")
    # charlie (in neither snapshot) finds alice in bob's snapshot, is told he is not
    # registered, and alice refuses him
    (tmp_path / "c.db.metagraph-7.json").write_bytes((tmp_path / "m.db.metagraph-7.json").read_bytes())
    charlie = CliProcess(
        ["miner", "--hotkey-uri", "//Charlie", "--db", str(tmp_path / "c.db"), "--netuid", str(NETUID),
         "--subtensor.chain_endpoint", endpoint], tmp_path / "charlie.stderr",
    )
    procs.append(charlie)
    wait_stderr(charlie, f"this miner's hotkey {CHARLIE} is not registered on netuid 7: validators will refuse it",
                "hotkey not registered")
    assert "is not registered on netuid" not in validator.stderr() + miner.stderr()
    # SIGHUP: the refresh fails (no chain) and the old metagraph stays; nobody dies
    validator.proc.send_signal(signal.SIGHUP)
    miner.proc.send_signal(signal.SIGHUP)
    wait_stderr(validator, "SIGHUP: reloading the metagraph of netuid 7", "metagraph refresh failed",
                "keeping block 1000")
    wait_stderr(miner, "SIGHUP: reloading the metagraph of netuid 7", "metagraph refresh failed")
    assert validator.proc.poll() is None and miner.proc.poll() is None
    for proc in (charlie, miner, validator):
        assert proc.signal(signal.SIGTERM) == 0, proc.stderr()
        assert "Traceback" not in proc.stderr()


# --------------------------------------------------------------------------- SIGHUP and game sources


def test_sighup_reloads_the_allow_file_and_the_games(tmp_path: Path, procs: list[CliProcess]) -> None:
    allow = tmp_path / "allowed.txt"
    allow.write_text(f"# miners\n{BOB}\n", encoding="utf-8")
    games_file = tmp_path / "games.json"
    games_file.write_text(json.dumps([game("g1")]), encoding="utf-8")
    db = tmp_path / "v.db"
    validator, _ = start_verbose(
        tmp_path, "--port", "0", "--hotkey-uri", "//Alice", "--db", str(db),
        "--allow-file", str(allow), "--games", str(games_file), "--games-poll", "3600",
    )
    procs.append(validator)
    assert stored_games(db) == {"g1"}

    def hangup() -> None:
        validator.proc.send_signal(signal.SIGHUP)

    # a bad allow file: refused, naming the line; the old list stays
    allow.write_text(f"{BOB}\nnot-a-hotkey\n", encoding="utf-8")
    hangup()
    wait_stderr(validator, "allow file not reloaded", "line 2: 'not-a-hotkey'", "the old list stays")
    # a good one, and a bad games file
    allow.write_text(f"{BOB}\n{CHARLIE}  # a second miner\n", encoding="utf-8")
    games_file.write_text("[{not json", encoding="utf-8")
    hangup()
    wait_stderr(validator, f"allow file {allow} reloaded: 2 hotkeys", "games update refused",
                "is not valid JSON", "the last good list stays")
    assert stored_games(db) == {"g1"}
    # good games
    games_file.write_text(json.dumps([game("g1"), game("g2")]), encoding="utf-8")
    hangup()
    wait_games(db, {"g1", "g2"})
    wait_stderr(validator, f"games reloaded from games file {games_file}: 2 games")
    assert validator.proc.poll() is None
    assert validator.signal(signal.SIGTERM) == 0, validator.stderr()
    assert "Traceback" not in validator.stderr()


def test_a_games_file_is_followed_without_sighup(tmp_path: Path, procs: list[CliProcess]) -> None:
    games_file = tmp_path / "games.json"
    games_file.write_text(json.dumps([game("g1")]), encoding="utf-8")
    db = tmp_path / "v.db"
    validator, _ = start_validator(
        tmp_path, "--port", "0", "--hotkey-uri", "//Alice", "--db", str(db),
        "--games", str(games_file), "--games-poll", "0.1",
    )
    procs.append(validator)
    games_file.write_text(json.dumps([game("g1"), game("g3")]), encoding="utf-8")
    os.utime(games_file, ns=(time.time_ns(), time.time_ns() + 2_000_000_000))
    wait_games(db, {"g1", "g3"})
    assert validator.signal(signal.SIGTERM) == 0, validator.stderr()


def test_a_validator_polls_a_games_url(tmp_path: Path, procs: list[CliProcess]) -> None:
    server = GamesServer()
    server.thread.start()
    try:
        server.serve([game("u1")])
        db = tmp_path / "v.db"
        validator, _ = start_validator(
            tmp_path, "--port", "0", "--hotkey-uri", "//Alice", "--db", str(db),
            "--games-url", server.url, "--games-poll", "0.1",
        )
        procs.append(validator)
        assert stored_games(db) == {"u1"}  # fetched before the port opened
        server.serve([game("u1"), game("u2")])
        wait_games(db, {"u1", "u2"})
        server.serve(b"<html>oops</html>")
        wait_stderr(validator, "games update refused", "is not valid JSON")
        assert stored_games(db) == {"u1", "u2"}
        assert validator.signal(signal.SIGTERM) == 0, validator.stderr()
        assert "Traceback" not in validator.stderr()
    finally:
        server.httpd.shutdown()
        server.httpd.server_close()


def test_a_miner_lives_through_sighup(tmp_path: Path, procs: list[CliProcess]) -> None:
    miner = CliProcess(
        ["-v", "miner", "--validator", f"ws://127.0.0.1:1/ws@{ALICE}", "--hotkey-uri", "//Bob",
         "--db", str(tmp_path / "m.db")], tmp_path / "miner.stderr",
    )
    procs.append(miner)
    assert miner.expect_prefix("miner hotkey ") == BOB
    miner.proc.send_signal(signal.SIGHUP)
    wait_stderr(miner, "SIGHUP: nothing to reload")
    assert miner.proc.poll() is None
    assert miner.signal(signal.SIGTERM) == 0, miner.stderr()


def test_a_real_wallet_on_the_simulated_feed_is_warned_about(tmp_path: Path, procs: list[CliProcess]) -> None:
    from bittensor_wallet import Wallet

    wallets = tmp_path / "wallets"
    Wallet(name="w", hotkey="h", path=str(wallets)).create_new_hotkey(use_password=False, overwrite=True, suppress=True)
    validator, _ = start_validator(
        tmp_path, "--wallet.name", "w", "--wallet.hotkey", "h", "--wallet.path", str(wallets),
        "--port", "0", "--db", str(tmp_path / "v.db"),
    )
    procs.append(validator)
    text = wait_stderr(validator, "WARNING", "SIMULATED game feed")
    assert "--games FILE or --games-url URL" in text
    assert validator.signal(signal.SIGTERM) == 0
    # a development key on the simulated feed (the demo's case) is not warned about
    dev, _ = start_validator(tmp_path, "--hotkey-uri", "//Alice", "--port", "0", "--db", str(tmp_path / "d.db"),
                             name="dev")
    procs.append(dev)
    assert dev.signal(signal.SIGTERM) == 0
    assert "SIMULATED" not in dev.stderr()
