"""Message classes and the registry that maps a wire ``type`` to a class.

Every subclass that sets ``MESSAGE_TYPE`` registers itself when it is defined,
attrs-decorated or not, so the seed's plain ``class CustomMessage(WebSocketMessage)``
is decodable without further ceremony.
"""

from __future__ import annotations

import inspect
import os
import threading
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any, ClassVar

import attrs
import orjson

from .errors import DecodeError, MessageTypeConflict
from .payloads import (
    Confirmation,
    ConfirmationResult,
    TeamGame,
    TeamGamePrediction,
    check_payload,
    structure_payload,
)
from .refusals import bounded

__all__ = [
    "MAX_BATCH",
    "MAX_FIELDS",
    "MAX_ID",
    "MAX_PREDICTION_BYTES",
    "ConfirmationMessage",
    "ErrorMessage",
    "GameUpdateMessage",
    "HeartbeatAckMessage",
    "HeartbeatMessage",
    "HeartbeatResponseMessage",
    "PredictionMessage",
    "WebSocketMessage",
    "WelcomeMessage",
    "message_class",
    "message_types",
    "prediction_problem",
    "now_iso",
    "new_nonce",
    "new_uuid",
]

_REGISTRY: dict[str, type[WebSocketMessage]] = {}


def now_iso() -> str:
    """The current UTC time as the reference writes it (``isoformat`` with offset)."""
    return datetime.now(UTC).isoformat()


class _RandomPool:
    """Random bytes from the OS a page at a time, handed out 16 at a time.

    ``os.urandom`` gives up the GIL for its system call, and in a busy process
    every call then waits for it to come back: 256 miners in one process spent
    0.8 s of the loop's time in ``uuid4`` for one update of 40 games. One call
    per 256 ids keeps the OS's randomness and drops that wait. A forked child
    starts with an empty pool, so it never repeats its parent's ids.
    """

    _PAGE = 4096

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._lock = threading.Lock()
        self._page = b""
        self._at = 0

    def take16(self) -> bytes:
        with self._lock:
            at = self._at
            if at + 16 > len(self._page):
                self._page = os.urandom(self._PAGE)
                at = 0
            self._at = at + 16
            return self._page[at : at + 16]


_POOL = _RandomPool()
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_POOL.reset)


def new_uuid() -> uuid.UUID:
    """A random (version 4) UUID, as ``uuid.uuid4`` makes, from the shared pool."""
    return uuid.UUID(bytes=_POOL.take16(), version=4)


def new_nonce() -> str:
    """A fresh nonce; random, so restarts and clock steps never repeat one."""
    return new_uuid().hex


def message_types() -> Mapping[str, type[WebSocketMessage]]:
    """A read-only view of the registered message types."""
    return MappingProxyType(_REGISTRY)


def message_class(message_type: str) -> type[WebSocketMessage]:
    """The class registered for ``message_type``; DecodeError when there is none."""
    try:
        return _REGISTRY[message_type]
    except KeyError:
        raise DecodeError(f"unknown message type {message_type!r}") from None


@attrs.define
class WebSocketMessage:
    """A signed envelope: ``type`` comes from the class, the rest are fields.

    ``data`` stays the plain dict received, since the signature covers it as
    sent; typed views such as ``PredictionMessage.prediction`` sit beside it.
    """

    MESSAGE_TYPE: ClassVar[str] = "message"

    sender: str
    data: dict[str, Any]
    timestamp: str = attrs.field(factory=now_iso)
    nonce: str = attrs.field(factory=new_nonce)
    signature: str | None = None
    _view: Any = attrs.field(default=None, init=False, eq=False, repr=False)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "MESSAGE_TYPE" in cls.__dict__:
            _register(cls)

    @property
    def type(self) -> str:
        return type(self).MESSAGE_TYPE

    @classmethod
    def validate_data(cls, data: dict[str, Any]) -> Any:
        """Check ``data`` while decoding; raise DecodeError, or return a typed view to cache."""
        return None

    @classmethod
    def build_view(cls, data: dict[str, Any]) -> Any:
        """The typed view of ``data``, built on first use (by default: what validation returned)."""
        return cls.validate_data(data)

    def to_dict(self) -> dict[str, Any]:
        """The wire envelope, with exactly the reference's keys."""
        return {
            "type": self.type,
            "sender": self.sender,
            "data": self.data,
            "timestamp": self.timestamp,
            "nonce": self.nonce,
            "signature": self.signature,
        }

    def _typed(self) -> Any:
        if self._view is None:
            self._view = type(self).build_view(self.data)
        return self._view


def _register(cls: type[WebSocketMessage]) -> None:
    message_type = cls.__dict__["MESSAGE_TYPE"]
    if not isinstance(message_type, str) or not message_type:
        raise TypeError(f"{cls.__qualname__}.MESSAGE_TYPE must be a non-empty string")
    taken = _REGISTRY.get(message_type)
    if taken is not None and (taken.__module__, taken.__qualname__) != (
        cls.__module__,
        cls.__qualname__,
    ):
        raise MessageTypeConflict(
            f"message type {message_type!r} is already registered to "
            f"{taken.__module__}.{taken.__qualname__}"
        )
    _REGISTRY[message_type] = cls
    _INIT_PARAMS.pop(cls, None)


_ENVELOPE_FIELDS = ("sender", "data", "timestamp", "nonce", "signature")
_INIT_PARAMS: dict[type[WebSocketMessage], tuple[frozenset[str], bool]] = {}


def build_message(
    cls: type[WebSocketMessage],
    sender: str,
    data: dict[str, Any],
    timestamp: str,
    nonce: str,
    signature: str | None,
) -> WebSocketMessage:
    """Construct ``cls`` through its own ``__init__``, then set the envelope fields.

    A plain subclass may define ``__init__(self, sender, data)`` (the seed's
    CustomMessage); calling it keeps its extra attributes, such as ``priority``.
    """
    params = _INIT_PARAMS.get(cls)
    if params is None:
        params = _init_params(cls)
        _INIT_PARAMS[cls] = params
    accepted, takes_kwargs = params
    values: dict[str, Any] = {
        "sender": sender,
        "data": data,
        "timestamp": timestamp,
        "nonce": nonce,
        "signature": signature,
    }
    kwargs = values if takes_kwargs else {k: v for k, v in values.items() if k in accepted}
    message = cls(**kwargs)
    for name in _ENVELOPE_FIELDS:
        if name not in kwargs:
            setattr(message, name, values[name])
    return message


def _init_params(cls: type[WebSocketMessage]) -> tuple[frozenset[str], bool]:
    signature = inspect.signature(cls)
    names = frozenset(signature.parameters)
    takes_kwargs = any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values()
    )
    required = {
        name
        for name, p in signature.parameters.items()
        if p.default is inspect.Parameter.empty
        and p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    }
    unknown = required - set(_ENVELOPE_FIELDS)
    if unknown:
        raise TypeError(
            f"{cls.__qualname__}.__init__ requires {sorted(unknown)}; "
            "a message class may only require envelope fields"
        )
    return names, takes_kwargs


MAX_PREDICTION_BYTES = 4096
"""Largest prediction accepted, as compact JSON: a TeamGamePrediction is about 500
bytes; anything much larger is a peer storing its own data on the validator's disk."""

MAX_BATCH = 1000
"""Most predictions one batched frame may carry."""


MAX_ID = 128
"""Longest prediction id, in characters (ours are 36)."""

MAX_FIELDS = 32
"""Most fields one prediction may have (a TeamGamePrediction has 16)."""

_SCALARS = (str, int, float, bool, type(None))


def _check_prediction(raw: Any, path: str) -> None:
    if type(raw) is dict and "prediction_id" not in raw and "id" in raw:
        raw = {**raw, "prediction_id": raw["id"]}
    check_payload(raw, TeamGamePrediction, path)
    pid = raw.get("prediction_id")
    if isinstance(pid, str) and len(pid) > MAX_ID:
        raise DecodeError(f"{path}.prediction_id: longer than {MAX_ID} characters ({len(pid)})")
    size = len(orjson.dumps(raw))
    if size > MAX_PREDICTION_BYTES:
        raise DecodeError(f"{path}: prediction of {size} bytes over the limit of {MAX_PREDICTION_BYTES} bytes")
    # Every field of a prediction is a scalar, and there are few of them: nested
    # or numerous extras would cost the validator ten times their size in memory
    # while they wait for the disk.
    if len(raw) > MAX_FIELDS:
        raise DecodeError(f"{path}: {len(raw)} fields over the limit of {MAX_FIELDS}")
    for key, value in raw.items():
        if not isinstance(value, _SCALARS):
            raise DecodeError(f"{path}.{str(key)[:40]}: expected a number, string, boolean or null")


def prediction_problem(raw: Any, path: str = "prediction") -> str | None:
    """Why ``raw`` is not a prediction (its shape, its types, its size), or None.

    Judges one item alone: a batch is answered item by item, so one bad
    prediction costs only itself.
    """
    try:
        _check_prediction(raw, path)
    except DecodeError as exc:
        return bounded(str(exc))
    return None


def _prediction_view(raw: Any, path: str) -> TeamGamePrediction:
    if isinstance(raw, dict) and "prediction_id" not in raw and "id" in raw:
        raw = {**raw, "prediction_id": raw["id"]}
    result: TeamGamePrediction = structure_payload(raw, TeamGamePrediction, path)
    return result


@attrs.define
class PredictionMessage(WebSocketMessage):
    """A miner's prediction, or a batch of them as ``{"predictions": [...]}``.

    A single prediction may carry ``id`` instead of ``prediction_id`` (the seed
    reads ``.get("id")``); ``data`` keeps whichever the miner sent.
    """

    MESSAGE_TYPE: ClassVar[str] = "prediction"

    @classmethod
    def validate_data(cls, data: dict[str, Any]) -> None:
        """A single prediction is checked whole (a bad one refuses the frame); a
        batch only as a batch: its items are judged one by one (:meth:`item_problems`)."""
        batch = data.get("predictions")
        if isinstance(batch, list) and "prediction_id" not in data and "id" not in data:
            if not batch:
                raise DecodeError("data.predictions: a batch needs at least one prediction")
            if len(batch) > MAX_BATCH:
                raise DecodeError(
                    f"data.predictions: {len(batch)} predictions over the limit of {MAX_BATCH}"
                )
        else:
            _check_prediction(data, "data")
        return None

    @classmethod
    def build_view(cls, data: dict[str, Any]) -> list[TeamGamePrediction]:
        batch = data.get("predictions")
        if isinstance(batch, list) and "prediction_id" not in data and "id" not in data:
            return [
                _prediction_view(item, f"data.predictions[{i}]")
                for i, item in enumerate(batch)
                if prediction_problem(item, f"data.predictions[{i}]") is None
            ]
        return [_prediction_view(data, "data")]

    def item_problems(self) -> list[str | None]:
        """Per prediction carried, in order: why it is not one, or None."""
        if not self.is_batch:
            return [None]
        return [prediction_problem(item, f"data.predictions[{i}]") for i, item in enumerate(self.data["predictions"])]

    @property
    def is_batch(self) -> bool:
        return isinstance(self.data.get("predictions"), list) and not (
            "prediction_id" in self.data or "id" in self.data
        )

    @property
    def predictions(self) -> list[TeamGamePrediction]:
        """Every well-formed prediction this message carries (one, or a batch's good items)."""
        views: list[TeamGamePrediction] = self._typed()
        return views

    @property
    def prediction(self) -> TeamGamePrediction:
        """The single prediction; for a batch, the first."""
        return self.predictions[0]

    def raw_predictions(self) -> list[dict[str, Any]]:
        """The prediction dicts as the miner sent them."""
        if self.is_batch:
            return list(self.data["predictions"])
        return [self.data]


@attrs.define
class ConfirmationMessage(WebSocketMessage):
    """A validator's answer: one confirmation, or ``{"results": [...]}`` for a batch."""

    MESSAGE_TYPE: ClassVar[str] = "confirmation"

    @classmethod
    def validate_data(cls, data: dict[str, Any]) -> Any:
        results = data.get("results")
        if isinstance(results, list) and "status" not in data:
            if not results:
                raise DecodeError("data.results: a batch confirmation needs at least one result")
            return [
                structure_payload(item, ConfirmationResult, f"data.results[{i}]")
                for i, item in enumerate(results)
            ]
        return structure_payload(data, Confirmation, "data")

    @property
    def is_batch(self) -> bool:
        return isinstance(self.data.get("results"), list) and "status" not in self.data

    @property
    def confirmation(self) -> Confirmation:
        """The single confirmation (for a batch, the first result as a Confirmation)."""
        view = self._typed()
        if isinstance(view, list):
            first: ConfirmationResult = view[0]
            return Confirmation(
                status=first.status,
                prediction_id=first.prediction_id,
                message=first.message,
                timestamp=self.data.get("timestamp"),
            )
        result: Confirmation = view
        return result

    @property
    def results(self) -> list[ConfirmationResult]:
        """Every (prediction_id, status, message) this message answers."""
        view = self._typed()
        if isinstance(view, list):
            return view
        return [ConfirmationResult(view.prediction_id or "", view.status, view.message)]


@attrs.define
class GameUpdateMessage(WebSocketMessage):
    """Games pushed by a validator: ``{"games": [...], "timestamp": ...}``."""

    MESSAGE_TYPE: ClassVar[str] = "game_update"

    @classmethod
    def validate_data(cls, data: dict[str, Any]) -> list[TeamGame]:
        games = data.get("games", [])
        if not isinstance(games, list):
            raise DecodeError("data.games: expected a list")
        return [structure_payload(g, TeamGame, f"data.games[{i}]") for i, g in enumerate(games)]

    @property
    def games(self) -> list[TeamGame]:
        views: list[TeamGame] = self._typed()
        return views


@attrs.define
class HeartbeatMessage(WebSocketMessage):
    MESSAGE_TYPE: ClassVar[str] = "heartbeat"


@attrs.define
class HeartbeatAckMessage(WebSocketMessage):
    MESSAGE_TYPE: ClassVar[str] = "heartbeat_ack"


@attrs.define
class HeartbeatResponseMessage(WebSocketMessage):
    """The reference miner's answer to a heartbeat (ours answer ``heartbeat_ack``)."""

    MESSAGE_TYPE: ClassVar[str] = "heartbeat_response"


@attrs.define
class WelcomeMessage(WebSocketMessage):
    """Sent by a validator once a miner has authenticated; lists its ``features``."""

    MESSAGE_TYPE: ClassVar[str] = "welcome"

    @property
    def features(self) -> frozenset[str]:
        raw = self.data.get("features")
        return frozenset(f for f in raw if isinstance(f, str)) if isinstance(raw, list) else frozenset()


@attrs.define
class ErrorMessage(WebSocketMessage):
    """A refusal that names what was wrong in ``data["message"]``."""

    MESSAGE_TYPE: ClassVar[str] = "error"

    @classmethod
    def validate_data(cls, data: dict[str, Any]) -> None:
        if not isinstance(data.get("message", ""), str):
            raise DecodeError("data.message: expected a string")
        return None

    @property
    def message(self) -> str:
        return str(self.data.get("message", ""))
