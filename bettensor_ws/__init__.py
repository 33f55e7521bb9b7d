"""bettensor_ws: the real-time WebSocket link between Bettensor miners and validators.

The core (messages, codec, signing, replay guard, rate limiter, dispatch) is
sans-IO; the Trio runtime builds on it.
"""

from __future__ import annotations

from .codec import decode, encode
from .connection import Connection, LinkClosed
from .dispatch import Dispatcher, echo_handler
from .errors import AuthError, DecodeError, MessageTypeConflict
from .messages import (
    ConfirmationMessage,
    ErrorMessage,
    GameUpdateMessage,
    HeartbeatAckMessage,
    HeartbeatMessage,
    PredictionMessage,
    WebSocketMessage,
    WelcomeMessage,
    message_types,
)
from .miner import MinerWebSocketManager
from .payloads import Confirmation, ConfirmationResult, TeamGame, TeamGamePrediction
from .ratelimit import TokenBucket
from .replay import ReplayGuard
from .signing import AuthInfo, build_auth, check_auth, sign, verify
from .validator import ValidatorWebSocketManager

__version__ = "0.1.0"

__all__ = [
    "AuthError",
    "AuthInfo",
    "Confirmation",
    "ConfirmationMessage",
    "ConfirmationResult",
    "Connection",
    "DecodeError",
    "Dispatcher",
    "ErrorMessage",
    "GameUpdateMessage",
    "HeartbeatAckMessage",
    "HeartbeatMessage",
    "LinkClosed",
    "MessageTypeConflict",
    "MinerWebSocketManager",
    "PredictionMessage",
    "ReplayGuard",
    "TeamGame",
    "TeamGamePrediction",
    "TokenBucket",
    "ValidatorWebSocketManager",
    "WebSocketMessage",
    "WelcomeMessage",
    "build_auth",
    "check_auth",
    "decode",
    "echo_handler",
    "encode",
    "message_types",
    "sign",
    "verify",
]
