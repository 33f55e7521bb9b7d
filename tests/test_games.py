"""Game sources for a real validator (node/games.py) and the simulated feed's ids.

``--games FILE`` is re-read when it changes; ``--games-url URL`` is polled over
HTTP, tested against a real HTTP server on 127.0.0.1 started here (the network
is what is under test). A bad update is refused with a WARNING naming why, and
the last good list stays: checked on a validator's own database.
"""

from __future__ import annotations

import http.server
import json
import logging
import os
import threading
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import trio
from bittensor_wallet import Keypair

from bettensor_ws.node import ValidatorNode
from bettensor_ws.node.feed import SimulatedFeed
from bettensor_ws.node.games import GamesFile, GamesFollower, GamesUrl
from tests.helpers import make_game

Games = list[dict[str, Any]]


def games(*ns: int) -> Games:
    return [make_game(n, starts_in=timedelta(hours=2 + n)) for n in ns]


class Recorder:
    def __init__(self) -> None:
        self.updates: list[list[str]] = []

    async def __call__(self, update: Games) -> None:
        await trio.lowlevel.checkpoint()
        self.updates.append([str(g["game_id"]) for g in update])


# ---- the simulated feed --------------------------------------------------------------------


def test_simulated_game_ids_are_unique_per_validator() -> None:
    alice = Keypair.create_from_uri("//Alice").ss58_address
    bob = Keypair.create_from_uri("//Bob").ss58_address
    a = SimulatedFeed(20, seed=1, owner=alice)
    b = SimulatedFeed(20, seed=1, owner=bob)
    assert not set(a.games) & set(b.games)
    assert set(SimulatedFeed(20, seed=2, owner=alice).games) == set(a.games)  # stable for one validator
    first = next(iter(a.games))
    assert first.startswith("sim-") and first.endswith("-00001") and len(first) == len("sim-12345678-00001")
    assert next(iter(SimulatedFeed(1).games)) == "sim-00001"  # without an owner, as before


# ---- a file --------------------------------------------------------------------------------


def write(path: Path, content: str | Games) -> None:
    """Write, and move the mtime on (two writes within the clock's resolution look alike)."""
    path.write_text(content if isinstance(content, str) else json.dumps(content), encoding="utf-8")
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))


async def test_a_games_file_is_read_again_when_it_changes(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "games.json"
    write(path, games(1, 2))
    recorder = Recorder()
    follower = GamesFollower(GamesFile(path), recorder)
    caplog.set_level(logging.INFO)
    assert await follower.check() is True
    assert await follower.check() is None  # unchanged: not read again
    write(path, games(1, 2, 3))
    assert await follower.check() is True
    assert recorder.updates == [["game-1", "game-2"], ["game-1", "game-2", "game-3"]]
    assert "games reloaded from games file" in caplog.text and "3 games" in caplog.text
    assert await follower.check(force=True) is True  # SIGHUP: read even if unchanged
    assert len(recorder.updates) == 3


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        ("[{not json", "is not valid JSON"),
        ('{"games": []}', "must hold a JSON list of games"),
        (json.dumps([{k: v for k, v in make_game(1).items() if k != "team_a"}]), "games[0].team_a"),
        (None, "cannot read games file"),
    ],
    ids=["not-json", "not-a-list", "missing-field", "deleted"],
)
async def test_a_bad_games_file_is_refused_and_the_last_good_list_stays(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, content: str | None, reason: str
) -> None:
    path = tmp_path / "games.json"
    write(path, games(1, 2))
    validator = ValidatorNode(Keypair.create_from_uri("//Alice"), tmp_path / "v.db")
    try:
        follower = GamesFollower(GamesFile(path), validator.update_games)
        assert await follower.check() is True
        if content is None:
            path.unlink()
        else:
            write(path, content)
        with caplog.at_level(logging.WARNING):
            assert await follower.check() is False
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and reason in warnings[0].getMessage(), caplog.text
        assert "the last good list stays" in warnings[0].getMessage()
        # polled again, still bad: not one WARNING per poll
        assert await follower.check(force=True) is False
        assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1
        stored = await validator.db.run(validator.store.upcoming_games)
        assert sorted(g["game_id"] for g in stored) == ["game-1", "game-2"]
        # fixed: taken
        write(path, games(5))
        assert await follower.check() is True
        stored = await validator.db.run(validator.store.upcoming_games)
        assert "game-5" in {g["game_id"] for g in stored}
    finally:
        validator.close()


async def test_following_a_file_polls_it_and_a_poke_reads_it_at_once(tmp_path: Path, autojump_clock: Any) -> None:
    path = tmp_path / "games.json"
    write(path, games(1))
    recorder = Recorder()
    follower = GamesFollower(GamesFile(path), recorder)
    async with trio.open_nursery() as nursery:
        await nursery.start(follower.follow, 10.0)
        while not recorder.updates:  # noqa: ASYNC110
            await trio.sleep(1.0)
        write(path, games(1, 2))
        while len(recorder.updates) < 2:  # noqa: ASYNC110
            await trio.sleep(1.0)
        follower.poke()  # unchanged, but read all the same
        while len(recorder.updates) < 3:  # noqa: ASYNC110
            await trio.sleep(0.01)
        nursery.cancel_scope.cancel()
    assert recorder.updates == [["game-1"], ["game-1", "game-2"], ["game-1", "game-2"]]


# ---- an HTTP endpoint ----------------------------------------------------------------------


class GamesServer:
    """A real HTTP server on 127.0.0.1 serving ``body`` (with ``status``) at /games."""

    def __init__(self) -> None:
        self.body = b"[]"
        self.status = 200
        self.requests = 0
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                owner.requests += 1
                if self.path != "/games":
                    self.send_error(404)
                    return
                self.send_response(owner.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(owner.body)))
                self.end_headers()
                self.wfile.write(owner.body)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/games"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def serve(self, content: bytes | Games, status: int = 200) -> None:
        self.body = content if isinstance(content, bytes) else json.dumps(content).encode()
        self.status = status


@pytest.fixture
def server() -> Iterator[GamesServer]:
    server = GamesServer()
    server.thread.start()
    try:
        yield server
    finally:
        server.httpd.shutdown()
        server.httpd.server_close()
        server.thread.join(10)


async def test_a_games_url_is_polled(server: GamesServer, caplog: pytest.LogCaptureFixture) -> None:
    server.serve(games(1, 2))
    recorder = Recorder()
    follower = GamesFollower(GamesUrl(server.url), recorder)
    caplog.set_level(logging.INFO)
    assert await follower.check() is True
    assert await follower.check() is None  # the same body: nothing to do
    server.serve(games(1, 2, 3))
    assert await follower.check() is True
    assert recorder.updates == [["game-1", "game-2"], ["game-1", "game-2", "game-3"]]
    assert server.requests == 3
    assert f"games reloaded from games URL {server.url}: 3 games" in caplog.text


@pytest.mark.parametrize(
    ("serve", "reason"),
    [
        ((b"[{not json", 200), "is not valid JSON"),
        ((b'{"games": []}', 200), "must hold a JSON list"),
        ((b"oops", 500), "answered HTTP 500"),
        ((b"[" + b" " * 2000 + b"]", 200), "sent more than 1000 bytes"),
    ],
    ids=["not-json", "not-a-list", "http-500", "too-big"],
)
async def test_a_bad_games_url_update_is_refused_and_the_last_good_list_stays(
    tmp_path: Path, server: GamesServer, caplog: pytest.LogCaptureFixture, serve: tuple[bytes, int], reason: str
) -> None:
    validator = ValidatorNode(Keypair.create_from_uri("//Alice"), tmp_path / "v.db")
    try:
        server.serve(games(1, 2))
        follower = GamesFollower(GamesUrl(server.url, max_body=1000), validator.update_games)
        assert await follower.check() is True
        server.serve(*serve)
        with caplog.at_level(logging.WARNING):
            assert await follower.check() is False
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and reason in warnings[0], warnings
        stored = await validator.db.run(validator.store.upcoming_games)
        assert sorted(g["game_id"] for g in stored) == ["game-1", "game-2"]
    finally:
        validator.close()


async def test_an_unreachable_games_url_is_refused(caplog: pytest.LogCaptureFixture) -> None:
    import socket

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        dead = sock.getsockname()[1]
    follower = GamesFollower(GamesUrl(f"http://127.0.0.1:{dead}/games"), Recorder())
    with caplog.at_level(logging.WARNING):
        assert await follower.check() is False
    assert "cannot fetch games URL" in caplog.text and "ConnectError" in caplog.text


def test_a_games_url_must_be_http() -> None:
    for bad in ("ftp://example.com/games", "example.com/games", "http:///games"):
        with pytest.raises(ValueError, match="bad --games-url"):
            GamesUrl(bad)
