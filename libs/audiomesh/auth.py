"""API keys, principals and request rate limits.

Keys are configured hashed: ``AUDIOMESH_API_KEYS="alice=sha256:<hex>,bob=sha256:<hex>"``
(``audiomesh hash-key`` prints an entry). A request's ``authorization: Bearer <key>`` is
hashed and compared in constant time; the matching name is the request's principal, which
owns the jobs it creates. No keys configured = open mode: one anonymous principal, announced
in the log at start. Services call each other with a shared service token,
``AUDIOMESH_SERVICE_TOKEN``, which API keys make mandatory: a worker without it would answer
anyone who reaches its port (``audiomesh.launcher.auth_policy`` refuses to start instead).
"""

from __future__ import annotations

import contextvars
import hashlib
import hmac
import re
import secrets
import time
from dataclasses import dataclass, field

from audiomesh import errors

ANONYMOUS = ""
SERVICE_TOKEN_HEADER = "x-audiomesh-service-token"
# A principal name becomes one segment of object keys (uploads/<principal>/…): it starts with a
# letter or digit, so "." and ".." cannot be names.
_ENTRY = re.compile(r"^(?:(?P<name>[A-Za-z0-9][A-Za-z0-9_.@-]{0,63})=)?sha256:(?P<hex>[0-9a-f]{64})$")

# The principal of the request being served (set by the auth interceptor).
current_principal: contextvars.ContextVar[str] = contextvars.ContextVar("principal", default=ANONYMOUS)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    return "am_" + secrets.token_urlsafe(32)


def parse_key_entries(entries: list[str]) -> dict[str, str]:
    """``name=sha256:<hex>`` entries → {hex digest: principal}; ValueError names a bad entry."""
    table: dict[str, str] = {}
    for entry in entries:
        m = _ENTRY.match(entry.strip())
        if not m:
            shown = entry if entry.startswith("sha256:") or "=sha256:" in entry else entry[:4] + "…"
            raise ValueError(
                f"entry {shown!r} is not NAME=sha256:<64 hex digits> (store hashes, not keys: audiomesh hash-key)"
            )
        digest = m.group("hex")
        table[digest] = m.group("name") or f"key-{digest[:8]}"
    return table


@dataclass
class KeyRing:
    """Known key hashes → principals. Empty = open mode."""

    digests: dict[str, str] = field(default_factory=dict)

    @property
    def open_mode(self) -> bool:
        return not self.digests

    def principal(self, authorization: str | None) -> str:
        """The principal for an ``authorization`` header value; Unauthenticated otherwise."""
        if self.open_mode:
            return ANONYMOUS
        if not authorization:
            raise errors.Unauthenticated("missing API key: send 'authorization: Bearer <key>'")
        scheme, _, key = authorization.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise errors.Unauthenticated("the authorization header must be 'Bearer <key>'")
        digest = hash_key(key.strip())
        found = None
        for known, name in self.digests.items():
            if hmac.compare_digest(known, digest):
                found = name
        if found is None:
            raise errors.Unauthenticated("invalid API key")
        return found


class RateLimiter:
    """A token bucket per principal: ``per_minute`` requests, bursts up to the same number."""

    def __init__(self, per_minute: int) -> None:
        self.rate = per_minute / 60.0
        self.capacity = float(per_minute)
        self._buckets: dict[str, tuple[float, float]] = {}

    def check(self, principal: str) -> None:
        if self.rate <= 0:
            return
        now = time.monotonic()
        tokens, last = self._buckets.get(principal, (self.capacity, now))
        tokens = min(self.capacity, tokens + (now - last) * self.rate)
        if tokens < 1.0:
            self._buckets[principal] = (tokens, now)
            wait = (1.0 - tokens) / self.rate
            raise errors.ResourceExhausted(
                f"rate limit of {int(self.capacity)} requests per minute reached; retry in {wait:.1f} s",
                retry_after=wait,
            )
        self._buckets[principal] = (tokens - 1.0, now)
