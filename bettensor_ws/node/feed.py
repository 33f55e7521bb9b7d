"""A simulated game feed: upcoming games whose odds drift, so a demo needs nothing else."""

from __future__ import annotations

import hashlib
import json
import random
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from ..protocol.errors import DecodeError
from ..protocol.payloads import TeamGame, converter, structure_payload

__all__ = ["SimulatedFeed", "load_games_file", "parse_games"]

_TEAMS = [
    "Arsenal", "Chelsea", "Liverpool", "Everton", "Leeds", "Fulham", "Brentford", "Burnley",
    "Yankees", "Red Sox", "Mets", "Cubs", "Dodgers", "Giants", "Astros", "Padres",
    "Lakers", "Celtics", "Knicks", "Bulls", "Heat", "Suns", "Nets", "Hawks",
]


class SimulatedFeed:
    """Games starting within the next hours; ``tick()`` moves the odds of a few.

    With ``owner`` (the validator's hotkey) the game ids carry a tag of it:
    ``sim-1a2b3c4d-00001``. Two simulated validators then never issue the same
    id for different games, which a miner serving both would mix up."""

    def __init__(
        self, count: int = 20, *, seed: int | None = None, now: datetime | None = None, owner: str | None = None
    ) -> None:
        self._rng = random.Random(seed)
        self._now = now or datetime.now(UTC)
        self._prefix = "sim-" if owner is None else f"sim-{hashlib.sha256(owner.encode()).hexdigest()[:8]}-"
        self._next_id = 0
        self.games: dict[str, dict[str, Any]] = {}
        for _ in range(count):
            self.add_game()

    def add_game(self) -> dict[str, Any]:
        rng = self._rng
        self._next_id += 1
        team_a, team_b = rng.sample(_TEAMS, 2)
        soccer = rng.random() < 0.4
        stamp = self._now.isoformat()
        game_id = f"{self._prefix}{self._next_id:05d}"
        game: dict[str, Any] = {
            "game_id": game_id,
            "team_a": team_a,
            "team_b": team_b,
            "sport": "soccer" if soccer else "basketball",
            "league": "Simulated League",
            "create_date": stamp,
            "last_update_date": stamp,
            "event_start_date": (self._now + timedelta(hours=rng.uniform(1, 48))).isoformat(),
            "active": True,
            "outcome": "Unfinished",
            "team_a_odds": round(rng.uniform(1.3, 4.0), 2),
            "team_b_odds": round(rng.uniform(1.3, 4.0), 2),
            "tie_odds": round(rng.uniform(2.8, 4.5), 2) if soccer else 0.0,  # the reference's "no draw"
            "can_tie": soccer,
        }
        self.games[game_id] = game
        return game

    def tick(self, moves: int = 3) -> list[dict[str, Any]]:
        """Drift the odds of ``moves`` games; returns every game (the full update)."""
        stamp = datetime.now(UTC).isoformat()
        for game in self._rng.sample(list(self.games.values()), min(moves, len(self.games))):
            for key in ("team_a_odds", "team_b_odds"):
                game[key] = round(max(1.05, game[key] * self._rng.uniform(0.95, 1.05)), 2)
            game["last_update_date"] = stamp
        return list(self.games.values())


def load_games_file(path: str | Path) -> list[dict[str, Any]]:
    """Read a JSON list of TeamGame objects; ValueError names what is wrong."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read games file {path}: {exc.strerror or exc}") from None
    return parse_games(data, f"games file {path}")


def parse_games(data: bytes, source: str) -> list[dict[str, Any]]:
    """A JSON list of TeamGame objects (a file's or an HTTP body's bytes); ValueError
    names ``source`` and what is wrong."""
    try:
        raw = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise ValueError(f"{source} is not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{source} is not valid JSON: {exc}") from None
    if not isinstance(raw, list):
        raise ValueError(f"{source} must hold a JSON list of games")
    games = []
    for i, item in enumerate(raw):
        try:
            game: TeamGame = structure_payload(item, TeamGame, f"games[{i}]")
        except DecodeError as exc:
            raise ValueError(f"{source}: {exc}") from None
        games.append(converter.unstructure(game))
    return games
