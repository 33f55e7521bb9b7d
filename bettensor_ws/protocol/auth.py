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
from .identity import canonical_hotkey
from .messages import WelcomeMessage, new_nonce, now_iso
from .ratelimit import FloodCooldown
from .refusals import Refusal, RefusalKind, bounded
from .replay import ReplayGuard, check_nonce, parse_timestamp, window_refusal
from .signing import Signer, sign_dict, verify, verify_dict

__all__ = [
    "AUDIENCE",
    "AUTH_KEYS",
    "AuthInfo",
    "build_auth",
    "check_auth",
    "check_answer",
    "cooldown_left",
    "read_features",
    "refusal_frame",
]

AUTH_KEYS = ("hotkey", "timestamp", "nonce", "signature")
AUDIENCE = "audience"
"""The auth frame's key naming the validator it is meant for (covered by the signature)."""

MAX_FEATURES = 16
"""Features read from a peer's list; a feature name is at most 64 characters."""


@attrs.frozen
class AuthInfo:
    """What an accepted auth frame established; ``hotkey`` is the canonical spelling."""

    hotkey: str
    nonce: str
    timestamp: str
    features: frozenset[str] = frozenset()
    audience: str | None = None


def build_auth(
    keypair: Signer,
    *,
    features: Iterable[str] | None = None,
    audience: str | None = None,
    timestamp: str | None = None,
    nonce: str | None = None,
) -> dict[str, Any]:
    """A client's first frame. ``features`` and ``audience`` (the validator's hotkey)
    are added as keys the signature covers: a frame made for one validator opens
    nothing at another."""
    frame: dict[str, Any] = {
        "hotkey": keypair.ss58_address,
        "timestamp": timestamp or now_iso(),
        "nonce": nonce or new_nonce(),
    }
    if features:
        frame["features"] = sorted(features)
    if audience is not None:
        frame[AUDIENCE] = audience
    return sign_dict(frame, keypair)


def read_features(raw: object) -> frozenset[str]:
    """The feature names a peer announced, bounded in number and length."""
    if not isinstance(raw, list):
        return frozenset()
    return frozenset(f for f in raw[:MAX_FEATURES] if isinstance(f, str) and len(f) <= 64)


def check_auth(
    frame: Any,
    *,
    guard: ReplayGuard | None = None,
    window: float = 300.0,
    now: float | None = None,
    mono: float | None = None,
    allowed: Callable[[str], bool] | None = None,
    audience: str | None = None,
    require_audience: bool = False,
) -> AuthInfo:
    """Accept an auth frame or raise :class:`AuthError` carrying the refusal.

    Order: shape, audience, timestamp, signature, registration, then the
    nonce, so a forged frame never spends a slot in the replay guard.
    ``audience`` is this validator's hotkey: a frame naming another is
    refused; one naming none (a reference miner) only if ``require_audience``.
    """
    if not isinstance(frame, dict) or any(not isinstance(frame.get(k), str) for k in AUTH_KEYS):
        raise AuthError(Refusal(RefusalKind.AUTH_MALFORMED, f"needs string fields {', '.join(AUTH_KEYS)}"))
    problem = check_nonce(frame["nonce"])
    if problem is not None:
        raise AuthError(Refusal(RefusalKind.AUTH_MALFORMED, problem.detail))
    hotkey = canonical_hotkey(frame["hotkey"])
    if hotkey is None:
        raise AuthError(Refusal(RefusalKind.AUTH_MALFORMED, "hotkey: not an ss58 address"))
    named = frame.get(AUDIENCE)
    if named is not None:
        if not isinstance(named, str) or (
            audience is not None and canonical_hotkey(named) != canonical_hotkey(audience)
        ):
            raise AuthError(Refusal(RefusalKind.WRONG_AUDIENCE))
    elif require_audience:
        raise AuthError(Refusal(RefusalKind.NO_AUDIENCE))
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
    if allowed is not None and not allowed(hotkey):
        raise AuthError(Refusal(RefusalKind.NOT_REGISTERED))
    if guard is not None:
        refusal = guard.check(hotkey, frame["nonce"], frame["timestamp"], now=now, mono=mono, scope="auth")
        if refusal is not None:
            raise AuthError(refusal)
    return AuthInfo(
        hotkey, frame["nonce"], frame["timestamp"], read_features(frame.get("features")), named
    )


def cooldown_left(frame: Any, cooldown: FloodCooldown, now: float) -> float | None:
    """Seconds of cooldown left for the hotkey an auth frame names, if it is cooling down.

    Read before the signature is checked: a refusal grants nothing, so the
    claim need not be proved, and a flooder costs no sr25519 verify.
    """
    hotkey = frame.get("hotkey") if isinstance(frame, dict) else None
    if not isinstance(hotkey, str):
        return None
    canonical = canonical_hotkey(hotkey)
    return None if canonical is None else cooldown.remaining(canonical, now)


def refusal_frame(refusal: Refusal, signer: Signer | None = None, auth_frame: Any = None) -> str:
    """The reference's bare handshake refusal, ``{"status": "error", "message"}``.

    With ``signer`` it also carries ``sender``, ``timestamp``, the ``auth_nonce``
    it answers (when the auth frame had a usable one) and a ``signature`` over
    all of them: reference miners read only ``status`` and ``message``, ours
    honour a retry hint only from a refusal signed by the validator they
    dialled, made for their own handshake.
    """
    frame: dict[str, Any] = {"status": "error", "message": refusal.text()}
    if signer is not None:
        frame["sender"] = signer.ss58_address
        frame["timestamp"] = now_iso()
        nonce = auth_frame.get("nonce") if isinstance(auth_frame, dict) else None
        if check_nonce(nonce) is None:
            frame["auth_nonce"] = nonce
        frame = sign_dict(frame, signer)
    return orjson.dumps(frame).decode()


def _signed_for(frame: dict[str, Any], expected_hotkey: str, auth_nonce: str | None) -> bool:
    """Whether a bare refusal is signed by ``expected_hotkey`` and answers ``auth_nonce``."""
    sender = frame.get("sender")
    return (
        isinstance(sender, str)
        and canonical_hotkey(sender) == canonical_hotkey(expected_hotkey)
        and (auth_nonce is None or frame.get("auth_nonce") == auth_nonce)
        and verify_dict(frame, "sender")
    )


def check_answer(
    raw: str | bytes,
    expected_hotkey: str,
    *,
    guard: ReplayGuard,
    max_size: int,
    now: float | None = None,
    mono: float | None = None,
    own_hotkey: str | None = None,
    auth_nonce: str | None = None,
) -> WelcomeMessage:
    """The validator's answer to our auth frame, accepted only as its own Welcome.

    Raises :class:`HandshakeRefused` carrying the refusal: the validator's
    own (parsed from its bare error; its retry hint kept only when the
    refusal is signed by ``expected_hotkey`` for this handshake), or ours of
    an answer that is not a Welcome signed by ``expected_hotkey`` (mutual
    authentication) and, when it names a miner, made for ``own_hotkey`` and
    echoing ``auth_nonce`` (session binding: a Welcome relayed from another
    miner's session is refused).
    """
    try:
        frame = loads_checked(raw, max_size=max_size)
    except DecodeError as exc:
        refusal = Refusal(RefusalKind.BAD_WELCOME, f"unreadable answer to auth: {exc}")
        raise HandshakeRefused(refusal.detail, refusal) from None
    if isinstance(frame, dict) and frame.get("status") == "error" and "type" not in frame:
        refusal = Refusal.parse(frame.get("message", ""))
        note = ""
        if refusal.retry_after is not None and not _signed_for(frame, expected_hotkey, auth_nonce):
            refusal = attrs.evolve(refusal, retry_after=None)
            note = " (unsigned: retry hint ignored)"
        raise HandshakeRefused(f"validator refused auth: {refusal.text()}{note}", refusal)
    try:
        welcome = decode(raw, max_size=max_size)
    except DecodeError as exc:
        refusal = Refusal(RefusalKind.BAD_WELCOME, f"unreadable welcome: {exc}")
        raise HandshakeRefused(refusal.detail, refusal) from None
    if not isinstance(welcome, WelcomeMessage):
        refusal = Refusal(RefusalKind.BAD_WELCOME, f"expected a welcome, got {welcome.type!r}")
        raise HandshakeRefused(refusal.detail, refusal)
    sender = canonical_hotkey(welcome.sender)
    if sender is None or sender != canonical_hotkey(expected_hotkey) or not verify(welcome):
        refusal = Refusal(RefusalKind.IMPOSTOR)
        # who it claims to be, for the operator: another key means a wrong address
        other = bounded(welcome.sender, 64) if sender != canonical_hotkey(expected_hotkey) else None
        raise HandshakeRefused(refusal.text(), refusal, signed_by=other)
    problem = _session_problem(welcome, own_hotkey, auth_nonce)
    if problem is not None:
        refusal = Refusal(RefusalKind.WRONG_SESSION, problem)
        raise HandshakeRefused(refusal.text(), refusal)
    problem_refusal = guard.check(sender, welcome.nonce, welcome.timestamp, now=now, mono=mono)
    if problem_refusal is not None:
        raise HandshakeRefused(f"welcome refused: {problem_refusal.text()}", problem_refusal)
    return welcome


def _session_problem(welcome: WelcomeMessage, own_hotkey: str | None, auth_nonce: str | None) -> str | None:
    """Why a Welcome that names a session does not name ours (None: it does, or names none).

    A reference validator names no session: its Welcome is taken as it is.
    """
    named, echoed = welcome.data.get("miner_hotkey"), welcome.data.get("auth_nonce")
    if named is None and echoed is None:
        return None
    if own_hotkey is not None and (
        not isinstance(named, str) or canonical_hotkey(named) != canonical_hotkey(own_hotkey)
    ):
        return "made for another miner"
    if auth_nonce is not None and echoed != auth_nonce:
        return "it answers another auth frame"
    return None
