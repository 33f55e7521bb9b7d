"""The handshake as decisions: the auth frame, the validator's checks of it,
the miner's checks of the answer, and the flood cooldown.

Everything here is a pure function of the frame and a ``now`` passed in; the
Trio shell only reads, waits and writes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

import attrs
import orjson

from .codec import decode, loads_checked
from .errors import AuthError, DecodeError, HandshakeRefused
from .messages import WelcomeMessage, new_nonce, now_iso
from .ratelimit import FloodCooldown
from .refusals import Refusal, RefusalKind
from .replay import ReplayGuard, parse_timestamp, window_refusal
from .signing import Signer, sign_dict, verify, verify_dict

__all__ = [
    "AUTH_KEYS",
    "AuthInfo",
    "build_auth",
    "check_auth",
    "check_answer",
    "cooldown_left",
    "refusal_frame",
]

AUTH_KEYS = ("hotkey", "timestamp", "nonce", "signature")


@attrs.frozen
class AuthInfo:
    """What an accepted auth frame established."""

    hotkey: str
    nonce: str
    timestamp: str
    features: frozenset[str] = frozenset()


def build_auth(
    keypair: Signer,
    *,
    features: Iterable[str] | None = None,
    timestamp: str | None = None,
    nonce: str | None = None,
) -> dict[str, Any]:
    """A client's first frame. ``features`` is added as a key the signature covers."""
    frame: dict[str, Any] = {
        "hotkey": keypair.ss58_address,
        "timestamp": timestamp or now_iso(),
        "nonce": nonce or new_nonce(),
    }
    if features:
        frame["features"] = sorted(features)
    return sign_dict(frame, keypair)


def check_auth(
    frame: Any,
    *,
    guard: ReplayGuard | None = None,
    window: float = 300.0,
    now: float | None = None,
    allowed: Callable[[str], bool] | None = None,
) -> AuthInfo:
    """Accept an auth frame or raise :class:`AuthError` carrying the refusal.

    Order: shape, timestamp, signature, registration, then the nonce, so a
    forged frame never spends a slot in the replay guard.
    """
    if not isinstance(frame, dict) or any(not isinstance(frame.get(k), str) for k in AUTH_KEYS):
        raise AuthError(Refusal(RefusalKind.AUTH_MALFORMED, f"needs string fields {', '.join(AUTH_KEYS)}"))
    now = time.time() if now is None else now
    try:
        sent_at = parse_timestamp(frame["timestamp"])
    except (ValueError, OverflowError):
        raise AuthError(Refusal(RefusalKind.AUTH_MALFORMED, "timestamp is not ISO-8601")) from None
    refusal = window_refusal(sent_at, now, guard.window if guard is not None else window)
    if refusal is not None:
        raise AuthError(refusal)
    if not verify_dict(frame, "hotkey"):
        raise AuthError(Refusal(RefusalKind.BAD_SIGNATURE))
    hotkey = frame["hotkey"]
    if allowed is not None and not allowed(hotkey):
        raise AuthError(Refusal(RefusalKind.NOT_REGISTERED))
    if guard is not None:
        refusal = guard.check(hotkey, "auth:" + frame["nonce"], frame["timestamp"], now=now)
        if refusal is not None:
            raise AuthError(refusal)
    raw = frame.get("features")
    features = frozenset(f for f in raw if isinstance(f, str)) if isinstance(raw, list) else frozenset()
    return AuthInfo(hotkey, frame["nonce"], frame["timestamp"], features)


def cooldown_left(frame: Any, cooldown: FloodCooldown, now: float) -> float | None:
    """Seconds of cooldown left for the hotkey an auth frame names, if it is cooling down.

    Read before the signature is checked: a refusal grants nothing, so the
    claim need not be proved, and a flooder costs no sr25519 verify.
    """
    hotkey = frame.get("hotkey") if isinstance(frame, dict) else None
    if not isinstance(hotkey, str):
        return None
    return cooldown.remaining(hotkey, now)


def refusal_frame(refusal: Refusal) -> str:
    """The reference's bare, unsigned handshake refusal."""
    return orjson.dumps({"status": "error", "message": refusal.text()}).decode()


def check_answer(
    raw: str | bytes,
    expected_hotkey: str,
    *,
    guard: ReplayGuard,
    max_size: int,
    now: float | None = None,
) -> WelcomeMessage:
    """The validator's answer to our auth frame, accepted only as its own Welcome.

    Raises :class:`HandshakeRefused` carrying the refusal: the validator's
    own (parsed from its bare error), or ours of an answer that is not a
    Welcome signed by ``expected_hotkey`` (mutual authentication).
    """
    try:
        frame = loads_checked(raw, max_size=max_size)
    except DecodeError as exc:
        refusal = Refusal(RefusalKind.BAD_WELCOME, f"unreadable answer to auth: {exc}")
        raise HandshakeRefused(refusal.detail, refusal) from None
    if isinstance(frame, dict) and frame.get("status") == "error" and "type" not in frame:
        refusal = Refusal.parse(frame.get("message", ""))
        raise HandshakeRefused(f"validator refused auth: {refusal.text()}", refusal)
    try:
        welcome = decode(raw, max_size=max_size)
    except DecodeError as exc:
        refusal = Refusal(RefusalKind.BAD_WELCOME, f"unreadable welcome: {exc}")
        raise HandshakeRefused(refusal.detail, refusal) from None
    if not isinstance(welcome, WelcomeMessage):
        refusal = Refusal(RefusalKind.BAD_WELCOME, f"expected a welcome, got {welcome.type!r}")
        raise HandshakeRefused(refusal.detail, refusal)
    if welcome.sender != expected_hotkey or not verify(welcome):
        refusal = Refusal(RefusalKind.IMPOSTOR)
        raise HandshakeRefused(refusal.text(), refusal)
    problem = guard.check(welcome.sender, welcome.nonce, welcome.timestamp, now=now)
    if problem is not None:
        raise HandshakeRefused(f"welcome refused: {problem.text()}", problem)
    return welcome
