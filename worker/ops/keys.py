"""API keys and who they are: each key has an id that owns what it submits.

``GENQ_API_KEYS`` and ``GENQ_ADMIN_KEYS`` are comma-separated, each entry ``name:key`` or a
bare key. The id of a named key is its name; a bare key's id is derived from its hash
(``key-<12 hex>``), so the key itself is never stored, logged or shown. Admin keys see and
cancel every tenant's work. ``GENQ_RAW_TOKEN_KEYS`` names the ids allowed to send
``raw_special_tokens``; ``GENQ_KEY_WEIGHTS`` gives ids a larger share of bulk admission.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass

from pydantic import SecretStr

from worker.ops.settings import Settings

NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


@dataclass(frozen=True)
class Principal:
    """An authenticated caller: ``id`` owns its requests and jobs."""

    id: str
    admin: bool = False
    raw_tokens: bool = False
    weight: int = 1


def key_id(entry: str) -> tuple[str, str]:
    """(id, secret) of one ``GENQ_API_KEYS`` entry: ``name:key`` or a bare key."""
    name, sep, secret = entry.partition(":")
    if sep and NAME.match(name) and secret:
        return name, secret
    return "key-" + hashlib.sha256(entry.encode()).hexdigest()[:12], entry


class KeyRing:
    """The configured keys; ``authenticate`` turns an ``Authorization`` header into a
    ``Principal`` (constant-time comparison against every key)."""

    def __init__(self, settings: Settings):
        self._keys: list[tuple[bytes, Principal]] = []
        for entries, admin in ((settings.api_keys, False), (settings.admin_keys, True)):
            for entry in entries:
                ident, secret = key_id(_plain(entry))
                principal = Principal(ident, admin=admin,
                                      raw_tokens=ident in settings.raw_token_keys,
                                      weight=settings.key_weights.get(ident, 1))
                self._keys.append((secret.encode(), principal))

    @property
    def enabled(self) -> bool:
        """Whether any key is configured (without keys every route is open and unowned)."""
        return bool(self._keys)

    def authenticate(self, header: str) -> Principal | None:
        """The caller of ``Authorization: Bearer <key>`` (scheme case-insensitive), or None."""
        scheme, _, token = header.partition(" ")
        given = token.strip().encode()
        found = None
        for secret, principal in self._keys:  # no early exit: timing does not tell which key
            if hmac.compare_digest(given, secret) and found is None:
                found = principal
        return found if scheme.lower() == "bearer" else None


def _plain(value: SecretStr | str) -> str:
    return value.get_secret_value() if isinstance(value, SecretStr) else value
