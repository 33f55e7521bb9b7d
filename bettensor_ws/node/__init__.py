"""The application: SQLite stores, the group committer, the miner's outbox, the
rules, the game feed, :class:`ValidatorNode` / :class:`MinerNode`, the command
line and the demo. It builds on :mod:`bettensor_ws.link` and may block only in
its DB thread.
"""

from __future__ import annotations

from .miner import MinerNode, Strategy, favourite_strategy
from .validator import ValidatorNode

__all__ = ["MinerNode", "Strategy", "ValidatorNode", "favourite_strategy"]
