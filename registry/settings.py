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


def sqlite_path(url: str) -> Path | None:
    """The file of a SQLite URL (None for other databases and in-memory SQLite)."""
    if not url.startswith("sqlite"):
        return None
    path = url.split("///", 1)[-1]
    return Path(path) if path and path != ":memory:" else None
