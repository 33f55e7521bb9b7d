"""bettensor_ws: the real-time WebSocket link between Bettensor miners and validators.

The core (messages, codec, signing, replay guard, rate limiter, dispatch) is
sans-IO; the Trio runtime builds on it.
"""

from __future__ import annotations

from .codec import decode, encode
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
from .payloads import Confirmation, ConfirmationResult, TeamGame, TeamGamePrediction
from .ratelimit import TokenBucket
from .replay import ReplayGuard
from .signing import AuthInfo, build_auth, check_auth, sign, verify

__version__ = "0.1.0"

__all__ = [
    "AuthError",
    "AuthInfo",
    "Confirmation",
    "ConfirmationMessage",
    "ConfirmationResult",
    "DecodeError",
    "Dispatcher",
    "ErrorMessage",
    "GameUpdateMessage",
    "HeartbeatAckMessage",
    "HeartbeatMessage",
    "MessageTypeConflict",
    "PredictionMessage",
    "ReplayGuard",
    "TeamGame",
    "TeamGamePrediction",
    "TokenBucket",
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
