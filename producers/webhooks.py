"""Webhook signatures (Standard Webhooks style): how aipipe signs a delivery, and how a
receiver checks one. Standard library only, so the slim ``producers`` install has it.

A delivery is a POST whose body is the event as on the wire, with three headers:
``webhook-id`` (the event's ``event_id``: the same on every retry), ``webhook-timestamp``
(unix seconds of this attempt) and ``webhook-signature``: ``v1,<base64 HMAC-SHA256>`` of
``"{webhook-id}.{webhook-timestamp}.{body}"`` under the shared secret, several of them
separated by spaces while a secret is being rotated. A secret ``whsec_<base64>`` is used as
the bytes it encodes (as Standard Webhooks libraries do); any other secret as its UTF-8
bytes.

``callback_allowed`` is the rule for where a delivery may go: admission refuses a
``callback_url`` outside the allowed prefixes, and the webhook sink checks it again.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import time
from collections.abc import Mapping
from urllib.parse import urlsplit

from aipipe.schemas.errors import AipipeError

ID, TIMESTAMP, SIGNATURE = "webhook-id", "webhook-timestamp", "webhook-signature"
DEFAULT_TOLERANCE_SECONDS = 300.0


class WebhookVerificationError(AipipeError):
    """A delivery's signature is missing, stale or not made with this secret."""


def secret_key(secret: str) -> bytes:
    """The HMAC key of ``secret``: the bytes a ``whsec_`` secret encodes, else its UTF-8."""
    if secret.startswith("whsec_"):
        try:
            return base64.b64decode(secret[6:], validate=True)
        except binascii.Error:
            raise WebhookVerificationError(
                "The webhook secret starts with whsec_ but the rest is not base64; use the "
                "secret exactly as configured in AIPIPE_WEBHOOK_SECRET.") from None
    return secret.encode()


def signature(secret: str, webhook_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` value for one delivery attempt."""
    signed = f"{webhook_id}.{timestamp}.".encode() + body
    digest = hmac.new(secret_key(secret), signed, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def signed_headers(secret: str, webhook_id: str, body: bytes, timestamp: int) -> dict[str, str]:
    """The three headers of one delivery attempt."""
    return {ID: webhook_id, TIMESTAMP: str(timestamp),
            SIGNATURE: signature(secret, webhook_id, timestamp, body)}


def verify_signature(
    secret: str,
    headers: Mapping[str, str],
    body: bytes,
    tolerance_seconds: float = DEFAULT_TOLERANCE_SECONDS,
    now: float | None = None,
) -> None:
    """Check a delivery; raise ``WebhookVerificationError`` (one sentence) unless it holds.

    ``headers`` may be any mapping (names are matched without regard to case); ``body`` must
    be the raw bytes received, before any JSON parsing. A timestamp more than
    ``tolerance_seconds`` away from ``now`` (this machine's clock) is refused, so a recorded
    delivery cannot be replayed later; deduplicate by ``webhook-id`` for the rest.
    """
    lower = {name.lower(): value for name, value in headers.items()}
    missing = [name for name in (ID, TIMESTAMP, SIGNATURE) if not lower.get(name)]
    if missing:
        raise WebhookVerificationError(f"Header {missing[0]!r} is missing; this is not an "
                                       "aipipe webhook delivery.")
    try:
        timestamp = int(lower[TIMESTAMP])
    except ValueError:
        raise WebhookVerificationError("Header 'webhook-timestamp' is not unix seconds.") from None
    now = time.time() if now is None else now
    if abs(now - timestamp) > tolerance_seconds:
        raise WebhookVerificationError(
            f"Header 'webhook-timestamp' is {now - timestamp:.0f} s from this clock, past the "
            f"{tolerance_seconds:g} s tolerance; refuse it (a replay, or a clock to fix).")
    expected = signature(secret, lower[ID], timestamp, body).encode()
    for candidate in lower[SIGNATURE].split():
        if hmac.compare_digest(candidate.encode(), expected):
            return
    raise WebhookVerificationError("No v1 signature in 'webhook-signature' matches this body "
                                   "under this secret.")


# -- where deliveries may go ---------------------------------------------------------

LOOPBACK_HOSTS = ("127.0.0.1", "localhost")


# in a callback's path: what a server or proxy on the way may turn into a step out of the
# prefix's path (an encoded dot, slash, backslash or percent sign; a backslash; a ";"
# parameter, as in "/in/..;/admin")
_CLIMBING = ("%2e", "%2f", "%5c", "%25", "\\", ";")


def callback_allowed(url: str, prefix: str) -> bool:
    """Whether ``url`` is under ``prefix``: the same scheme, host and port, and the prefix's
    path or one below it, segment by segment (so ``https://a.example`` never allows
    ``https://a.example.evil``, nor ``/in`` allow ``/inside``). Plain http only on loopback
    (tests, local receivers); no user or password in the URL, no ``.`` or ``..`` segment
    and nothing a server may decode into one (``_CLIMBING``)."""
    try:
        got, want = urlsplit(url), urlsplit(prefix)
        ports = got.port, want.port
    except ValueError:
        return False
    secure = got.scheme == "https" or (got.scheme == "http" and got.hostname in LOOPBACK_HOSTS)
    below = want.path if want.path.endswith("/") else want.path + "/"
    path = got.path.lower()
    return (secure and got.scheme == want.scheme and got.hostname == want.hostname
            and ports[0] == ports[1] and got.username is None and got.password is None
            and (got.path == want.path or got.path.startswith(below))
            and not any(part in path for part in _CLIMBING)
            and not {".", ".."} & set(path.split("/")))
