"""Typed views of message payloads, with Bettensor's field names.

The wire keeps ``message.data`` a plain dict (the signature covers it as sent);
these classes are what a handler reads when it wants types. Structuring goes
through one strict cattrs converter: a string is never silently a number.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from functools import partial
from types import NoneType, UnionType
from typing import Any, Literal, Union, get_args, get_origin

import attrs
import cattrs
from cattrs.v import transform_error

from .errors import DecodeError

__all__ = [
    "Confirmation",
    "ConfirmationResult",
    "TeamGame",
    "TeamGamePrediction",
    "check_payload",
    "converter",
    "structure_payload",
    "wire_game",
]


@attrs.define(frozen=True)
class TeamGame:
    """A game as validators publish it."""

    game_id: str | int
    team_a: str
    team_b: str
    event_start_date: str
    sport: str = ""
    league: str = ""
    create_date: str = ""
    last_update_date: str = ""
    active: bool = True
    outcome: str = "Unfinished"
    team_a_odds: float | None = None
    team_b_odds: float | None = None
    tie_odds: float | None = None
    can_tie: bool = False


_REFERENCE_GAME_DEFAULTS: dict[str, Any] = {
    "sport": "",
    "league": "",
    "create_date": "",
    "last_update_date": "",
    "active": False,
    "outcome": "Unfinished",
    "team_a_odds": 0.0,
    "team_b_odds": 0.0,
    "tie_odds": 0.0,
    "can_tie": False,
}


def wire_game(row: dict[str, Any]) -> dict[str, Any]:
    """A game as every peer can read it: the reference ``TeamGame`` requires every
    field, odds as numbers (0.0 where there is none, as its validator sends for a
    game that cannot be drawn)."""
    game = dict(row)
    for key, default in _REFERENCE_GAME_DEFAULTS.items():
        if game.get(key) is None:
            game[key] = default
    game["game_id"] = str(game.get("game_id"))
    return game


@attrs.define(frozen=True)
class TeamGamePrediction:
    """A miner's prediction on one game.

    Only the id is required here: which other fields a validator needs is a
    rule (``missing data``) with its own reply, not a decoding failure.
    """

    prediction_id: str
    game_id: str | int | None = None
    miner_uid: str | int | None = None
    prediction_date: str | None = None
    predicted_outcome: str | None = None
    predicted_odds: float | None = None
    team_a: str | None = None
    team_b: str | None = None
    wager: float | None = None
    team_a_odds: float | None = None
    team_b_odds: float | None = None
    tie_odds: float | None = None
    model_name: str | None = None
    confidence_score: float | None = None
    outcome: str | None = None
    payout: float | None = None


@attrs.define(frozen=True)
class Confirmation:
    """A validator's answer to one prediction.

    The seed's error reply carries neither id nor timestamp, so both may be None.
    """

    status: Literal["success", "error"]
    prediction_id: str | None = None
    message: str = ""
    timestamp: str | None = None
    miner_stats: dict[str, Any] | None = None


@attrs.define(frozen=True)
class ConfirmationResult:
    """One entry of a batched confirmation's ``results``."""

    prediction_id: str
    status: Literal["success", "error"]
    message: str = ""


def _type_name(value: Any) -> str:
    """A peer's value as an error shows it: its repr, cut at 40 characters."""
    if isinstance(value, str | int | float | bool) or value is None:
        shown = repr(value)
        return shown if len(shown) <= 40 else shown[:37] + "..."
    return type(value).__name__


def _strict_float(value: Any, _: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"expected a number, got {_type_name(value)}")
    result = float(value)
    if not math.isfinite(result):
        raise ValueError(f"expected a finite number, got {value!r}")
    return result


def _strict_str(value: Any, _: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {_type_name(value)}")
    return value


def _strict_bool(value: Any, _: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {_type_name(value)}")
    return value


def _str_or_int(value: Any, _: Any) -> str | int:
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise ValueError(f"expected a string or an integer, got {_type_name(value)}")
    return value


def _status(value: Any, _: Any) -> str:
    if value not in ("success", "error"):
        raise ValueError(f"expected 'success' or 'error', got {_type_name(value)}")
    return str(value)


def _plain_dict(value: Any, _: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError(f"expected an object, got {_type_name(value)}")
    return value


def _make_converter() -> cattrs.Converter:
    conv = cattrs.Converter(forbid_extra_keys=False)
    conv.register_structure_hook(float, _strict_float)
    conv.register_structure_hook(str, _strict_str)
    conv.register_structure_hook(bool, _strict_bool)
    exact: dict[Any, Callable[[Any, Any], Any]] = {
        str | int: _str_or_int,
        Literal["success", "error"]: _status,
        dict[str, Any]: _plain_dict,
    }
    for type_, hook in exact.items():
        conv.register_structure_hook_func(partial(operator.eq, type_), hook)

    def is_optional(type_: Any) -> bool:
        return get_origin(type_) in (Union, UnionType) and NoneType in get_args(type_)

    def optional_factory(type_: Any) -> Callable[[Any, Any], Any]:
        # Resolved once per type: rebuilding the inner type on every call
        # cost most of a prediction's decoding time.
        rest: Any = tuple(a for a in get_args(type_) if a is not NoneType)
        target: Any = rest[0] if len(rest) == 1 else Union[rest]  # noqa: UP007
        inner = conv.get_structure_hook(target)

        def optional(value: Any, _: Any) -> Any:
            return None if value is None else inner(value, target)

        return optional

    conv.register_structure_hook_factory(is_optional, optional_factory)
    return conv


converter = _make_converter()
"""The one converter all payloads go through; strict about scalar types."""


Check = Callable[[Any], str | None]


def _check_with(hook: Callable[[Any, Any], Any]) -> Check:
    def check(value: Any) -> str | None:
        try:
            hook(value, None)
        except ValueError as exc:
            return str(exc)
        return None

    return check


def _check_float(value: Any) -> str | None:
    # the hot path of every prediction: plain type tests before any call
    if type(value) is float:
        return None if math.isfinite(value) else f"expected a finite number, got {value!r}"
    if type(value) is int:
        return None
    return f"expected a number, got {_type_name(value)}"


def _check_str(value: Any) -> str | None:
    return None if type(value) is str else f"expected a string, got {_type_name(value)}"


_SCALAR_CHECKS: dict[Any, Check] = {
    float: _check_float,
    str: _check_str,
    bool: _check_with(_strict_bool),
    str | int: _check_with(_str_or_int),
    Literal["success", "error"]: _check_with(_status),
    dict[str, Any]: _check_with(_plain_dict),
}
_FIELD_TABLES: dict[type[Any], tuple[tuple[str, bool, bool, Check], ...]] = {}


def _field_table(cls: type[Any]) -> tuple[tuple[str, bool, bool, Check], ...]:
    """(name, required, nullable, check) per field, resolved once per class."""
    table = _FIELD_TABLES.get(cls)
    if table is None:
        rows = []
        for field in attrs.fields(attrs.resolve_types(cls)):
            type_ = field.type
            nullable = get_origin(type_) in (Union, UnionType) and NoneType in get_args(type_)
            if nullable:
                rest: Any = tuple(a for a in get_args(type_) if a is not NoneType)
                type_ = rest[0] if len(rest) == 1 else Union[rest]  # noqa: UP007
            rows.append((field.name, field.default is attrs.NOTHING, nullable, _SCALAR_CHECKS[type_]))
        table = _FIELD_TABLES[cls] = tuple(rows)
    return table


def check_payload(raw: Any, cls: type[Any], path: str) -> None:
    """Raise DecodeError unless ``raw`` would structure into ``cls``, without building it.

    Same verdicts and messages as :func:`structure_payload`, at a fraction of
    the cost: this runs for every prediction of every batch.
    """
    if type(raw) is not dict:
        raise DecodeError(f"{path}: expected an object, got {_type_name(raw)}")
    for name, required, nullable, check in _field_table(cls):
        if name not in raw:
            if required:
                raise DecodeError(f"{path}.{name}: required field missing")
            continue
        value = raw[name]
        if value is None and nullable:
            continue
        problem = check(value)
        if problem is not None:
            raise DecodeError(f"{path}.{name}: {problem}")


def structure_payload(raw: Any, cls: type[Any], path: str) -> Any:
    """Structure ``raw`` into ``cls`` or raise DecodeError naming the field, e.g.
    ``data.wager: expected a number, got 'abc'``."""
    if not isinstance(raw, dict):
        raise DecodeError(f"{path}: expected an object, got {_type_name(raw)}")
    try:
        return converter.structure(raw, cls)
    except Exception as exc:  # cattrs wraps every failure in its own group
        raise DecodeError(_first_reason(exc, path)) from None


def _first_reason(exc: BaseException, path: str) -> str:
    """Turn cattrs' error tree into one line: the first failing field and why."""
    try:
        lines = transform_error(exc, path=path, format_exception=_format_leaf)
    except Exception:
        lines = []
    if not lines:
        return f"{path}: {exc}"
    message, _, where = lines[0].rpartition(" @ ")
    return f"{where}: {message}" if message else lines[0]


def _format_leaf(exc: BaseException, type_: Any) -> str:
    if isinstance(exc, KeyError):
        return "required field missing"
    if isinstance(exc, ValueError | TypeError) and str(exc):
        return str(exc)
    return f"invalid value ({type(exc).__name__})"
