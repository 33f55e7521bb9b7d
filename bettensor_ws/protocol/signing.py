"""sr25519 signatures in the reference's format, for envelopes and auth frames.

The signed text is ``json.dumps(envelope_without_signature, sort_keys=True)``
with the standard library's default separators and ``ensure_ascii``: that exact
text is what reference peers sign and verify, so it is built with ``json`` here,
never with the faster codec used for the wire.
"""

from __future__ import annotations

import copy
import json
from functools import lru_cache
from typing import Any, Protocol

from .messages import WebSocketMessage, new_nonce, now_iso

__all__ = [
    "Signer",
    "sign",
    "sign_dict",
    "signed_text",
    "verify",
    "verify_dict",
]



class Signer(Protocol):
    """What signing needs of a ``bittensor_wallet.Keypair``."""

    @property
    def ss58_address(self) -> str: ...

    def sign(self, data: str | bytes) -> bytes: ...


_SIGNED_TEXT = json.JSONEncoder(sort_keys=True)
"""``json.dumps(..., sort_keys=True)``'s encoder, made once rather than per call."""


def signed_text(unsigned: dict[str, Any]) -> str:
    """The exact text a signature covers (reference-compatible)."""
    return _SIGNED_TEXT.encode(unsigned)


@lru_cache(maxsize=8192)
def _verifier(ss58_address: str) -> Any:
    from bittensor_wallet import Keypair

    return Keypair(ss58_address=ss58_address)


def _check(ss58_address: str, text: str, signature_hex: str) -> bool:
    if not isinstance(signature_hex, str) or not isinstance(ss58_address, str):
        return False
    try:
        signature = bytes.fromhex(signature_hex)  # no "0x": the reference would refuse it too
        if len(signature) != 64:
            return False
        return bool(_verifier(ss58_address).verify(text, signature))
    except Exception:  # malformed address or signature: simply not valid
        return False


def sign(message: WebSocketMessage, keypair: Signer) -> WebSocketMessage:
    """A signed copy of ``message``: sender, timestamp and nonce are set afresh."""
    signed = copy.copy(message)
    # attrs' slotted __getstate__ copies only the fields: keep the attributes a
    # plain subclass sets in its own __init__ (the seed's CustomMessage.priority).
    extra = getattr(message, "__dict__", None)
    if extra:
        signed.__dict__.update(extra)
    signed.sender = keypair.ss58_address
    signed.timestamp = now_iso()
    signed.nonce = new_nonce()
    envelope = signed.to_dict()
    del envelope["signature"]
    signed.signature = keypair.sign(signed_text(envelope)).hex()
    return signed


def verify(message: WebSocketMessage) -> bool:
    """True when the signature is the sender's over exactly these fields."""
    if not message.signature:
        return False
    envelope = message.to_dict()
    del envelope["signature"]
    return _check(message.sender, signed_text(envelope), message.signature)


def sign_dict(envelope: dict[str, Any], keypair: Signer) -> dict[str, Any]:
    """Sign a plain envelope or auth dict in place of its ``signature`` key."""
    unsigned = {k: v for k, v in envelope.items() if k != "signature"}
    return {**unsigned, "signature": keypair.sign(signed_text(unsigned)).hex()}


def verify_dict(frame: dict[str, Any], address_key: str = "sender") -> bool:
    """Verify a plain dict signed over all its keys but ``signature``."""
    unsigned = {k: v for k, v in frame.items() if k != "signature"}
    return _check(frame.get(address_key), signed_text(unsigned), frame.get("signature", ""))  # type: ignore[arg-type]
