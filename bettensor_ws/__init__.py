"""bettensor_ws: the real-time WebSocket link between Bettensor miners and validators.

The core (messages, codec, signing, replay guard, rate limiter, dispatch) is
sans-IO; the Trio runtime builds on it.
"""

from __future__ import annotations

from .link.connection import Connection, LinkClosed
from .link.miner import MinerWebSocketManager
from .link.validator import ValidatorWebSocketManager
from .protocol.codec import decode, encode
from .protocol.dispatch import Dispatcher, echo_handler
from .protocol.errors import AuthError, DecodeError, MessageTypeConflict
from .protocol.messages import (
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
from .protocol.payloads import Confirmation, ConfirmationResult, TeamGame, TeamGamePrediction
from .protocol.ratelimit import TokenBucket
from .protocol.replay import ReplayGuard
from .protocol.signing import AuthInfo, build_auth, check_auth, sign, verify

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
