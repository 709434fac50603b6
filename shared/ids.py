"""Opaque, time-ordered ids with a type prefix (`ds_`, `job_`, `key_`)."""

import os
import time

_ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"  # Crockford base32: sorts like the numbers


def _base32(number: int, width: int) -> str:
    digits = []
    for _ in range(width):
        number, remainder = divmod(number, 32)
        digits.append(_ALPHABET[remainder])
    return "".join(reversed(digits))


def new_id(prefix: str) -> str:
    """Ids sort by creation time (to the millisecond), so lists can page by id alone."""
    millis = time.time_ns() // 1_000_000
    randomness = int.from_bytes(os.urandom(10), "big")
    return f"{prefix}_{_base32(millis, 10)}{_base32(randomness, 16)}"
