"""Where the registry lives: `$COMPOSER_HOME` (default ~/.composer) and the database URL."""

from __future__ import annotations

import os
from pathlib import Path


def composer_home() -> Path:
    return Path(os.environ.get("COMPOSER_HOME", "~/.composer")).expanduser()


def database_url() -> str:
    """`COMPOSER_DATABASE_URL` if set, else a SQLite file in `$COMPOSER_HOME`."""
    url = os.environ.get("COMPOSER_DATABASE_URL")
    if url:
        return url
    return f"sqlite:///{composer_home() / 'registry.db'}"


def blob_root() -> Path:
    return composer_home() / "blobs"
