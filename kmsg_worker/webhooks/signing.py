"""Standard Webhooks signatures: https://github.com/standard-webhooks/standard-webhooks/blob/main/spec/standard-webhooks.md

A request carries ``webhook-id``, ``webhook-timestamp`` (Unix seconds) and ``webhook-signature``:
space-separated ``v1,<base64 HMAC-SHA256>`` entries, each over ``"<id>.<timestamp>.<body>"`` with
the key that the secret's base64 (after ``whsec_``) encodes. Several entries let a receiver keep
verifying while a secret is rotated.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
from collections.abc import Mapping, Sequence

__all__ = ["PREFIX", "SignatureError", "new_secret", "sign", "signature_header", "verify"]

#: Secrets are shown and stored as ``whsec_<base64 of the key>``.
PREFIX = "whsec_"
#: Key bytes of a new secret (the spec asks for 24 to 64).
KEY_BYTES = 32


class SignatureError(Exception):
    """A request whose signature headers are missing, stale or wrong."""


def new_secret() -> str:
    """A fresh random signing secret, ``whsec_...``."""
    return PREFIX + base64.b64encode(secrets.token_bytes(KEY_BYTES)).decode()


def _key(secret: str) -> bytes:
    raw = secret.removeprefix(PREFIX)
    try:
        return base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError):
        raise SignatureError("the signing secret is not whsec_ followed by base64") from None


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """One ``v1,<base64>`` signature entry."""
    signed = msg_id.encode() + b"." + str(timestamp).encode() + b"." + body
    digest = hmac.new(_key(secret), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def signature_header(secrets_: Sequence[str], msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` value: one entry per secret (current first)."""
    return " ".join(sign(s, msg_id, timestamp, body) for s in secrets_)


def verify(secret: str, headers: Mapping[str, str], body: bytes, *, now: float, tolerance: float = 300.0) -> str:
    """Check a request's Standard Webhooks headers; returns its ``webhook-id``.

    Args:
        secret: The ``whsec_`` secret the sender signs with.
        headers: The request headers (looked up lower-case).
        body: The raw body, as received.
        now: The current Unix time.
        tolerance: Seconds the timestamp may be away from ``now`` (replays of old requests are refused).

    Raises:
        SignatureError: A header is missing, the timestamp is too old or too new, or no entry matches.
    """
    lower = {k.lower(): v for k, v in headers.items()}
    msg_id, stamp, given = (lower.get(f"webhook-{n}") for n in ("id", "timestamp", "signature"))
    if not msg_id or not stamp or not given:
        raise SignatureError("missing webhook-id, webhook-timestamp or webhook-signature")
    try:
        timestamp = int(stamp)
    except ValueError:
        raise SignatureError("webhook-timestamp is not an integer") from None
    if abs(now - timestamp) > tolerance:
        raise SignatureError("webhook-timestamp is outside the tolerance")
    expected = sign(secret, msg_id, timestamp, body).encode()
    if not any(hmac.compare_digest(expected, entry.encode()) for entry in given.split()):
        raise SignatureError("no signature matches")
    return msg_id
