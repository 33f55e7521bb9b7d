"""bettensor_ws: the real-time WebSocket link between Bettensor miners and validators.

Three layers, three packages: :mod:`bettensor_ws.protocol` (sans-IO: messages,
codec, signing, auth, refusals and the per-link protocol object),
:mod:`bettensor_ws.link` (the Trio shell: connections, the validator server
and the miner client) and :mod:`bettensor_ws.node` (the application: stores,
rules, outbox, command line). This module is the curated public API.
"""

from __future__ import annotations

from .link.connection import LinkClosed
from .link.miner import MinerWebSocketManager
from .link.validator import ValidatorWebSocketManager
from .protocol.auth import AuthInfo, build_auth, check_auth
from .protocol.codec import decode, encode
from .protocol.dispatch import Connection, Dispatcher, echo_handler
from .protocol.errors import AuthError, DecodeError, HandshakeRefused, MessageTypeConflict
from .protocol.link import ConnectionSettings
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
from .protocol.refusals import CloseCode, Refusal, RefusalKind
from .protocol.replay import ReplayGuard
from .protocol.signing import sign, verify

__version__ = "0.1.0"

__all__ = [
    "AuthError",
    "AuthInfo",
    "CloseCode",
    "Confirmation",
    "ConfirmationMessage",
    "ConfirmationResult",
    "Connection",
    "ConnectionSettings",
    "DecodeError",
    "Dispatcher",
    "ErrorMessage",
    "GameUpdateMessage",
    "HeartbeatAckMessage",
    "HandshakeRefused",
    "HeartbeatMessage",
    "LinkClosed",
    "MessageTypeConflict",
    "MinerWebSocketManager",
    "PredictionMessage",
    "Refusal",
    "RefusalKind",
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
