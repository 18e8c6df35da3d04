"""API keys: the key files (sha256 digests kept, never the keys), the ``Authorization: Bearer`` check of the
``/v1`` routes and of the ``/admin`` routes, and a stable non-secret id per key (memory namespaces, logs)."""

from __future__ import annotations

import hashlib
from pathlib import Path

from serve.errors import APIError


def key_id(key: str) -> str:
    """A stable, non-secret name for a key (memory namespaces, logs): never the key itself."""
    return "k" + hashlib.sha256(key.encode()).hexdigest()[:12]


def load_api_keys(path: str | Path) -> frozenset[str]:
    """sha256 hex digests of the keys in ``path`` (one per line; blank lines and ``#`` comments skipped)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"API key file {p} does not exist; write one key per line or drop --api-key-file")
    keys = [ln.strip() for ln in p.read_text().splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if not keys:
        raise ValueError(f"API key file {p} holds no keys; write one key per line")
    return frozenset(hashlib.sha256(k.encode()).hexdigest() for k in keys)


def authorize(header: str | None, key_hashes: frozenset[str]) -> str:
    """The caller's key id from ``Authorization: Bearer KEY``; ``"anon"`` when no keys are configured; else 401."""
    if not key_hashes:
        return "anon"
    if not header or not header.lower().startswith("bearer ") or not header[7:].strip():
        raise APIError(401, "missing API key: send 'Authorization: Bearer YOUR_KEY'", code="invalid_api_key")
    key = header[7:].strip()
    if hashlib.sha256(key.encode()).hexdigest() not in key_hashes:
        raise APIError(401, "invalid API key", code="invalid_api_key")
    return key_id(key)


def authorize_admin(header: str | None, admin_hashes: frozenset[str]) -> None:
    """An admin route's guard: 403 when no admin key is configured (the routes are off) or the key is not an admin
    key, 401 when no key is sent."""
    if not admin_hashes:
        raise APIError(
            403,
            "admin routes are off on this server; start it with serve.admin_key_file=FILE (one admin key per line)",
            code="admin_disabled",
        )
    if not header or not header.lower().startswith("bearer ") or not header[7:].strip():
        raise APIError(401, "missing admin key: send 'Authorization: Bearer ADMIN_KEY'", code="invalid_admin_key")
    if hashlib.sha256(header[7:].strip().encode()).hexdigest() not in admin_hashes:
        raise APIError(403, "this key is not an admin key", code="invalid_admin_key")
