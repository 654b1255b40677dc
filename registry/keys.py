"""API key secrets: how they are made and hashed (only the hash is ever stored)."""

from __future__ import annotations

import hashlib
import secrets

KEY_PREFIX = "ck_"


def new_secret() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(24)


def hash_key(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()
