"""Identity is the public key: one spelling of each hotkey, whatever ss58 format it came in.

An ss58 address is a network prefix, a 32-byte public key and a checksum, in
base58. The same key under format 42 and format 0 is two strings but one
miner; everything that keys on a hotkey (connections, replacement, the wager
rules, storage, the replay guard) uses :func:`canonical_hotkey`, the key's
format-42 spelling (Bittensor's), so one key cannot pass for two miners.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache

__all__ = ["MAX_ADDRESS", "SS58_FORMAT", "canonical_hotkey", "encode_address", "public_key"]

SS58_FORMAT = 42
"""The format every hotkey is spelt in here (Bittensor's, and Substrate's generic one)."""

MAX_ADDRESS = 64
"""Longest text looked at as an address: a 32-byte key is 47 to 49 characters."""

_ALPHABET = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
_INDEX = {c: i for i, c in enumerate(_ALPHABET)}
_PREFIX = b"SS58PRE"


def _b58decode(text: str) -> bytes | None:
    number = 0
    for char in text:
        digit = _INDEX.get(char)
        if digit is None:
            return None
        number = number * 58 + digit
    zeros = len(text) - len(text.lstrip("1"))
    body = number.to_bytes((number.bit_length() + 7) // 8, "big") if number else b""
    return b"\0" * zeros + body


def _b58encode(data: bytes) -> str:
    number = int.from_bytes(data, "big")
    chars = []
    while number:
        number, digit = divmod(number, 58)
        chars.append(_ALPHABET[digit])
    zeros = len(data) - len(data.lstrip(b"\0"))
    return "1" * zeros + "".join(reversed(chars))


def _checksum(payload: bytes) -> bytes:
    return hashlib.blake2b(_PREFIX + payload, digest_size=64).digest()[:2]


@lru_cache(maxsize=16384)
def public_key(address: str) -> bytes | None:
    """The 32-byte public key an ss58 address spells, or None if it is not one."""
    if not isinstance(address, str) or not 0 < len(address) <= MAX_ADDRESS:
        return None
    raw = _b58decode(address)
    if raw is None or len(raw) not in (35, 36):
        return None
    prefix_len = 1 if raw[0] < 64 else 2
    if raw[0] >= 128 or len(raw) != prefix_len + 34:
        return None
    if _checksum(raw[:-2]) != raw[-2:]:
        return None
    return raw[prefix_len:-2]


def encode_address(key: bytes, ss58_format: int = SS58_FORMAT) -> str:
    """The ss58 address of a 32-byte public key under ``ss58_format`` (0 to 16383)."""
    if len(key) != 32 or not 0 <= ss58_format < 16384:
        raise ValueError("needs a 32-byte key and a format from 0 to 16383")
    if ss58_format < 64:
        prefix = bytes([ss58_format])
    else:
        prefix = bytes([
            ((ss58_format & 0b1111_1100) >> 2) | 0b0100_0000,
            (ss58_format >> 8) | ((ss58_format & 0b11) << 6),
        ])
    payload = prefix + key
    return _b58encode(payload + _checksum(payload))


@lru_cache(maxsize=16384)
def canonical_hotkey(address: str) -> str | None:
    """The format-42 spelling of the key ``address`` names, or None if it names none."""
    key = public_key(address)
    return None if key is None else encode_address(key)
