"""The ``bettensor-ws`` command, run as an operator runs it: in a subprocess.

* ``validator`` prints ``listening on ws://HOST:PORT/ws`` with the real port
  (also for ``--port 0``) once the port accepts connections, and SIGTERM or
  SIGINT shut it down with exit 0;
* bad input exits 2 with exactly one line on stderr and no traceback;
* the wallet flags read a real Bittensor wallet from disk;
* ``status`` reports a miner's and a validator's database;
* ``demo`` ends with "nothing lost".

The tests are plain synchronous functions (pytest-trio leaves them alone).
"""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any

import pytest
from bittensor_wallet import Keypair

from bettensor_ws.node.store import MinerStore, ValidatorStore

ALICE = Keypair.create_from_uri("//Alice").ss58_address
BOB = Keypair.create_from_uri("//Bob").ss58_address
CHARLIE = Keypair.create_from_uri("//Charlie").ss58_address

STARTUP = 20.0  # generous bound on interpreter start + imports + listen
SHUTDOWN = 5.0  # "promptly"


# --------------------------------------------------------------------------- harness


def cli_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "bettensor_ws.node.cli", *args]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    """Run ``bettensor-ws ARGS`` to completion."""
    return subprocess.run(
        cli_command(*args),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env=_env(),
        stdin=subprocess.DEVNULL,
    )


class CliProcess:
    """A long-running ``bettensor-ws`` subprocess whose stdout is read line by line."""

    def __init__(self, args: Sequence[str], stderr_path: Path, cwd: Path | None = None) -> None:
        self.stderr_path = stderr_path
        self._stderr: IO[str] = open(stderr_path, "w+", encoding="utf-8")  # noqa: SIM115
        self.proc = subprocess.Popen(
            cli_command(*args),
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            stdin=subprocess.DEVNULL,
            text=True,
            cwd=cwd,
            env=_env(),
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.stdout: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def read_line(self, timeout: float = STARTUP) -> str:  # noqa: ASYNC109
        """The next stdout line; fails the test on timeout or end of output."""
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            pytest.fail(f"no output within {timeout}s; stderr: {self.stderr()!r}")
        if line is None:
            self.lines.put(None)
            pytest.fail(f"process ended (rc={self.proc.poll()}); stderr: {self.stderr()!r}")
        self.stdout.append(line)
        return line

    def expect_prefix(self, prefix: str, timeout: float = STARTUP) -> str:
        """Read lines until one starts with ``prefix``; return the rest of it."""
        deadline = time.monotonic() + timeout
        while True:
            line = self.read_line(max(0.01, deadline - time.monotonic()))
            if line.startswith(prefix):
                return line[len(prefix) :]

    def stderr(self) -> str:
        self._stderr.flush()
        return self.stderr_path.read_text(encoding="utf-8", errors="replace")

    def signal(self, signum: int) -> int:
        """Send ``signum`` and wait (promptly) for the exit status."""
        self.proc.send_signal(signum)
        try:
            return self.proc.wait(timeout=SHUTDOWN)
        except subprocess.TimeoutExpired:
            pytest.fail(f"no exit within {SHUTDOWN}s of {signal.Signals(signum).name}")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._stderr.close()


def start_validator(tmp: Path, *args: str, name: str = "validator") -> tuple[CliProcess, str]:
    """Start ``bettensor-ws validator`` and return it with its ws:// URL."""
    proc = CliProcess(["validator", *args], tmp / f"{name}.stderr")
    url = proc.expect_prefix("listening on ")
    return proc, url


def port_of(url: str) -> int:
    assert url.startswith("ws://127.0.0.1:") and url.endswith("/ws"), url
    return int(url.removeprefix("ws://127.0.0.1:").removesuffix("/ws"))


def future(hours: float) -> str:
    return (datetime.now(UTC) + timedelta(hours=hours)).isoformat()


def game(game_id: str, **fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "game_id": game_id,
        "team_a": "Arsenal",
        "team_b": "Chelsea",
        "sport": "soccer",
        "league": "Test League",
        "create_date": future(-1),
        "last_update_date": future(-1),
        "event_start_date": future(6),
        "active": True,
        "outcome": "Unfinished",
        "team_a_odds": 1.8,
        "team_b_odds": 2.2,
        "tie_odds": None,
        "can_tie": False,
    }
    base.update(fields)
    return base


def assert_one_line_error(result: subprocess.CompletedProcess[str], *needles: str) -> str:
    """Exit 2, exactly one line on stderr, no traceback; returns the line."""
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, lines
    line = lines[0]
    assert line.strip(), "the error line is empty"
    for needle in needles:
        assert needle in line, (needle, line)
    return line


@pytest.fixture
def validator(tmp_path: Path) -> Iterator[tuple[CliProcess, str]]:
    proc, url = start_validator(
        tmp_path, "--port", "0", "--hotkey-uri", "//Alice", "--db", str(tmp_path / "v.db")
    )
    try:
        yield proc, url
    finally:
        proc.close()


# --------------------------------------------------------------------------- validator


def test_validator_prints_its_url_and_the_port_accepts(validator: tuple[CliProcess, str]) -> None:
    proc, url = validator
    port = port_of(url)
    assert port != 0
    # "once it accepts connections": no retry needed right after the line.
    with socket.create_connection(("127.0.0.1", port), timeout=5):
        pass
    assert proc.read_line() == f"validator hotkey {ALICE}"
    assert proc.proc.poll() is None


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_validator_signal_exits_zero(tmp_path: Path, signum: int) -> None:
    proc, url = start_validator(
        tmp_path, "--port", "0", "--hotkey-uri", "//Alice", "--db", str(tmp_path / "v.db")
    )
    try:
        proc.read_line()  # validator hotkey ...
        # An idle TCP connection (no handshake yet) must not hold up the shutdown.
        with socket.create_connection(("127.0.0.1", port_of(url)), timeout=5):
            started = time.monotonic()
            assert proc.signal(signum) == 0, proc.stderr()
            assert time.monotonic() - started < SHUTDOWN
        assert "Traceback" not in proc.stderr()
        # The database was closed cleanly and is readable by `status`.
        status = run_cli("status", "--db", str(tmp_path / "v.db"))
        assert status.returncode == 0, status.stderr
        assert status.stdout.splitlines()[0] == "predictions 0"
    finally:
        proc.close()


def test_validator_with_the_simulated_feed(tmp_path: Path) -> None:
    """Without --games a simulated feed runs: its games are stored before the URL is printed."""
    db = tmp_path / "v.db"
    proc, _ = start_validator(
        tmp_path, "--port", "0", "--hotkey-uri", "//Alice", "--db", str(db),
        "--feed-games", "3", "--feed-interval", "0.1",
    )
    try:
        ro = sqlite3.connect(f"{db.resolve().as_uri()}?mode=ro", uri=True)
        try:
            assert ro.execute("SELECT COUNT(*) FROM games").fetchone()[0] == 3
            first = sorted(ro.execute("SELECT game_id, team_a_odds, team_b_odds FROM games"))
            deadline = time.monotonic() + STARTUP
            while sorted(ro.execute("SELECT game_id, team_a_odds, team_b_odds FROM games")) == first:
                assert time.monotonic() < deadline, "the feed never moved the odds"
                time.sleep(0.1)
        finally:
            ro.close()
        assert proc.signal(signal.SIGTERM) == 0, proc.stderr()
        assert "Traceback" not in proc.stderr()
    finally:
        proc.close()


def test_miner_without_reachable_validator_keeps_running_then_exits_zero(tmp_path: Path) -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        dead = sock.getsockname()[1]
    proc = CliProcess(
        ["miner", "--validator", f"ws://127.0.0.1:{dead}/ws@{ALICE}", "--hotkey-uri", "//Bob",
         "--db", str(tmp_path / "m.db")],
        tmp_path / "miner.stderr",
    )
    try:
        assert proc.expect_prefix("miner hotkey ") == BOB
        time.sleep(1.0)  # a few failed connection attempts
        assert proc.proc.poll() is None, proc.stderr()
        assert proc.signal(signal.SIGTERM) == 0, proc.stderr()
        assert "Traceback" not in proc.stderr()
    finally:
        proc.close()


# --------------------------------------------------------------------------- bad input


def _write(path: Path, text: str | bytes) -> str:
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return str(path)


def _validator_args(tmp: Path, *extra: str) -> list[str]:
    return ["validator", "--port", "0", "--hotkey-uri", "//Alice", "--db", str(tmp / "v.db"), *extra]


def _miner_args(tmp: Path, validator: str) -> list[str]:
    return ["miner", "--validator", validator, "--hotkey-uri", "//Bob", "--db", str(tmp / "m.db")]


def _games_case(content: str | bytes | None) -> Any:
    def build(tmp: Path) -> list[str]:
        path = tmp / "games.json"
        if content is not None:
            _write(path, content)
        return _validator_args(tmp, "--games", str(path))

    return build


BAD_INPUT: dict[str, tuple[Any, tuple[str, ...]]] = {
    # settings out of range are refused by ConnectionSettings before anything starts
    "negative rate limit": (lambda tmp: _validator_args(tmp, "--rate-limit", "-5"), ("--rate-limit",)),
    "zero rate burst": (lambda tmp: _validator_args(tmp, "--rate-burst", "0"), ("--rate-burst",)),
    "zero message size": (lambda tmp: _validator_args(tmp, "--max-message-size", "0"), ("--max-message-size",)),
    "zero heartbeat": (lambda tmp: _validator_args(tmp, "--heartbeat-interval", "0"), ("--heartbeat-interval",)),
    "games file missing": (_games_case(None), ("games.json",)),
    "games file not JSON": (_games_case("[{not json"), ("games.json", "JSON")),
    "games file not UTF-8": (_games_case(b"\xff\xfe[]"), ("games.json",)),
    "games file not a list": (_games_case('{"games": []}'), ("games.json", "list")),
    "game missing team_a": (
        _games_case(json.dumps([game("g1"), {k: v for k, v in game("g2").items() if k != "team_a"}])),
        ("games.json", "games[1].team_a"),
    ),
    "wallet missing": (
        lambda tmp: ["validator", "--port", "0", "--db", str(tmp / "v.db"),
                     "--wallet.name", "nosuch", "--wallet.path", str(tmp)],
        ("nosuch",),
    ),
    "no identity": (lambda tmp: ["validator", "--port", "0", "--db", str(tmp / "v.db")], ()),
    "allow file missing": (
        lambda tmp: _validator_args(tmp, "--allow-file", str(tmp / "allowed.txt")),
        ("allowed.txt",),
    ),
    "allow file with a bad line": (
        lambda tmp: _validator_args(
            tmp, "--allow-file", _write(tmp / "allowed.txt", f"# miners\n{ALICE}\n5NotAnAddress\n")
        ),
        ("allowed.txt", "line 3", "5NotAnAddress"),
    ),
    "db is not sqlite": (
        lambda tmp: ["validator", "--port", "0", "--hotkey-uri", "//Alice",
                     "--db", _write(tmp / "v.db", "hello, not a database\n" * 100)],
        ("v.db",),
    ),
    "port out of range": (
        lambda tmp: ["validator", "--port", "70000", "--hotkey-uri", "//Alice", "--db", str(tmp / "v.db")],
        ("70000",),
    ),
    "validator url without @": (lambda tmp: _miner_args(tmp, "ws://127.0.0.1:8765/ws"), ()),
    "validator url http scheme": (lambda tmp: _miner_args(tmp, f"http://127.0.0.1:8765/ws@{ALICE}"), ()),
    "validator url bad ss58": (lambda tmp: _miner_args(tmp, "ws://127.0.0.1:8765/ws@5NotAnAddress"), ()),
    "wager infinite": (
        lambda tmp: _miner_args(tmp, f"ws://127.0.0.1:8765/ws@{ALICE}") + ["--wager", "inf"],
        ("wager",),
    ),
    "unknown subcommand": (lambda tmp: ["frobnicate"], ("frobnicate",)),
    "unknown flag": (lambda tmp: _validator_args(tmp, "--frobnicate"), ("--frobnicate",)),
    "status on a missing db": (lambda tmp: ["status", "--db", str(tmp / "nosuch.db")], ("nosuch.db",)),
    "status on a text file": (
        lambda tmp: ["status", "--db", _write(tmp / "notes.db", "hello, not a database\n" * 100)],
        ("notes.db",),
    ),
}


@pytest.fixture(scope="module")
def bad_input_results(
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, subprocess.CompletedProcess[str]]:
    """Every BAD_INPUT case, run concurrently (each is an interpreter start)."""
    runs = []
    for i, (build, _) in enumerate(BAD_INPUT.values()):
        tmp = tmp_path_factory.mktemp(f"bad{i}")
        runs.append((tmp, build(tmp)))
    with ThreadPoolExecutor(max_workers=max(2, 2 * (os.cpu_count() or 1))) as pool:
        results = pool.map(lambda run: run_cli(*run[1], cwd=run[0], timeout=60), runs)
        return dict(zip(BAD_INPUT, results, strict=True))


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_exits_2_with_one_line(
    bad_input_results: dict[str, subprocess.CompletedProcess[str]], case: str
) -> None:
    result = bad_input_results[case]
    assert_one_line_error(result, *BAD_INPUT[case][1])
    assert result.stdout == ""


def test_port_in_use_exits_2(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        result = run_cli(
            "validator", "--host", "127.0.0.1", "--port", str(port), "--hotkey-uri", "//Alice",
            "--db", str(tmp_path / "v.db"),
        )
    line = assert_one_line_error(result, str(port))
    assert "in use" in line, line
    assert "listening" not in result.stdout


def _sqlite(path: Path, *statements: str) -> str:
    with sqlite3.connect(path) as db:
        for statement in statements:
            db.execute(statement)
    db.close()
    return str(path)


@pytest.mark.parametrize(
    "statements",
    [
        ("CREATE TABLE notes (id INTEGER PRIMARY KEY, body TEXT)",),
        # Another program's database with a "predictions" table (the original
        # Bettensor validator has one): not ours, and status must not touch it.
        ("CREATE TABLE predictions (prediction_id TEXT, foo TEXT)",),
        ("CREATE TABLE predictions (prediction_id TEXT, foo TEXT)",
         "CREATE TABLE deliveries (prediction_id TEXT)"),
    ],
    ids=["other-tables", "foreign-predictions", "foreign-deliveries"],
)
def test_status_on_a_non_bettensor_sqlite_file(tmp_path: Path, statements: tuple[str, ...]) -> None:
    path = tmp_path / "other.db"
    _sqlite(path, *statements)
    before = path.read_bytes()
    result = run_cli("status", "--db", str(path))
    assert_one_line_error(result, "other.db")
    assert path.read_bytes() == before, "status modified a database that is not its own"


def test_status_on_a_newer_schema_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "m.db"
    MinerStore(path).close()
    _sqlite(path, "PRAGMA user_version=99")
    result = run_cli("status", "--db", str(path))
    assert_one_line_error(result, "m.db", "99")


# --------------------------------------------------------------------------- wallet


def test_validator_reads_a_real_wallet_from_disk(tmp_path: Path) -> None:
    from bittensor_wallet import Wallet

    wallets = tmp_path / "wallets"
    wallet = Wallet(name="w", hotkey="h", path=str(wallets))
    wallet.create_new_hotkey(use_password=False, overwrite=True, suppress=True)
    expected = wallet.hotkey.ss58_address
    assert (wallets / "w" / "hotkeys" / "h").is_file()

    proc, url = start_validator(
        tmp_path, "--wallet.name", "w", "--wallet.hotkey", "h", "--wallet.path", str(wallets),
        "--port", "0", "--db", str(tmp_path / "v.db"),
    )
    try:
        assert proc.expect_prefix("validator hotkey ") == expected
        assert expected not in (ALICE, BOB)
        assert proc.signal(signal.SIGTERM) == 0, proc.stderr()
    finally:
        proc.close()

    # The same wallet for a miner, with a wrong hotkey name: one line, exit 2.
    result = run_cli(
        "miner", "--validator", f"{url}@{ALICE}", "--db", str(tmp_path / "m.db"),
        "--wallet.name", "w", "--wallet.hotkey", "other", "--wallet.path", str(wallets),
    )
    assert_one_line_error(result, "other")


# --------------------------------------------------------------------------- status


def _parse_counts(line: str) -> dict[str, int]:
    """``validator X: pending 1, confirmed 2, rejected 0`` -> {"pending": 1, ...}
    (an ``oldest pending 3h12m`` part after them is not a count)."""
    _, _, rest = line.partition(": ")
    counts = {}
    for part in rest.split(", "):
        if part.startswith("oldest pending "):
            continue
        key, _, value = part.partition(" ")
        counts[key] = int(value)
    return counts


def _prediction(pid: str, game_id: str = "g1", wager: float = 1.0) -> dict[str, Any]:
    return {
        "prediction_id": pid,
        "game_id": game_id,
        "miner_uid": "0",
        "predicted_outcome": "Arsenal",
        "wager": wager,
    }


def test_status_on_a_miner_database(tmp_path: Path) -> None:
    path = tmp_path / "m.db"
    store = MinerStore(path)
    try:
        store.add_predictions([_prediction(f"p{i}") for i in range(5)], [ALICE, CHARLIE])
        store.record_results(
            ALICE,
            [("p0", "success", "ok"), ("p1", "success", "ok"), ("p2", "error", "game already started")],
        )
        store.record_results(CHARLIE, [("p3", "error", "daily wager limit of 1000 exceeded")])
    finally:
        store.close()

    result = run_cli("status", "--db", str(path))
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    lines = result.stdout.splitlines()
    # Totals first, over both validators: 10 deliveries.
    assert lines[:3] == ["pending 6", "confirmed 2", "rejected 2"]
    per_validator = {ln.split()[1].rstrip(":"): _parse_counts(ln) for ln in lines[3:5]}
    assert all(ln.startswith("validator ") for ln in lines[3:5]), lines
    assert per_validator == {
        ALICE: {"pending": 2, "confirmed": 2, "rejected": 1},
        CHARLIE: {"pending": 4, "confirmed": 0, "rejected": 1},
    }
    # Then the latest rejections, with their reasons.
    assert lines[5].startswith("latest rejections"), lines
    rejections = lines[6:]
    assert len(rejections) == 2, lines
    assert any("p2" in ln and ALICE in ln and "game already started" in ln for ln in rejections)
    assert any("p3" in ln and CHARLIE in ln and "daily wager limit" in ln for ln in rejections)


def test_status_on_an_empty_miner_database(tmp_path: Path) -> None:
    path = tmp_path / "m.db"
    MinerStore(path).close()
    result = run_cli("status", "--db", str(path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[:3] == ["pending 0", "confirmed 0", "rejected 0"]
    assert "latest rejections" not in result.stdout


def test_status_on_a_validator_database(tmp_path: Path) -> None:
    path = tmp_path / "v.db"
    store = ValidatorStore(path)
    try:
        store.upsert_games([game("g1")])
        bob = store.submit(BOB, [_prediction("b1", wager=2.5), _prediction("b2", wager=1.0)])
        charlie = store.submit(CHARLIE, [_prediction("c1", wager=4.0), _prediction("c2", "nosuch")])
        assert [r["status"] for r in bob + charlie] == ["success", "success", "success", "error"]
    finally:
        store.close()

    result = run_cli("status", "--db", str(path))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "predictions 3"
    per_miner = [ln for ln in lines if ln.startswith("miner ")]
    assert len(per_miner) == 2, lines
    bob_line = next(ln for ln in per_miner if BOB in ln)
    charlie_line = next(ln for ln in per_miner if CHARLIE in ln)
    assert "predictions 2" in bob_line and "3.5" in bob_line
    assert "predictions 1" in charlie_line and "4" in charlie_line


def test_status_while_the_validator_runs(tmp_path: Path, validator: tuple[CliProcess, str]) -> None:
    """status reads a database a running node holds open (WAL) without disturbing it."""
    proc, _ = validator
    result = run_cli("status", "--db", str(tmp_path / "v.db"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0] == "predictions 0"
    assert proc.proc.poll() is None


# --------------------------------------------------------------------------- demo


def test_demo_ends_with_nothing_lost(tmp_path: Path) -> None:
    result = run_cli("demo", "--miners", "2", "--games", "4", "--duration", "4", cwd=tmp_path, timeout=60)
    assert result.returncode == 0, (result.stdout, result.stderr[-2000:])
    assert "Traceback" not in result.stderr
    out = result.stdout
    for row in ("predictions made", "confirmed", "rejected", "p50", "p99", "reconnects", "frames/s"):
        assert row in out, (row, out)
    assert out.strip().splitlines()[-1] == "nothing lost"
    made = int(next(ln for ln in out.splitlines() if "predictions made" in ln).split("|")[2])
    confirmed = int(next(ln for ln in out.splitlines() if ln.startswith("| confirmed")).split("|")[2])
    assert made >= 4 * 2  # every miner predicts every starting game
    assert confirmed == made
    assert list(tmp_path.iterdir()) == [], "the demo left files behind"
