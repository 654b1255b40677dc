"""Engines, sessions and migrations for the registry database (SQLite or PostgreSQL)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, inspect
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import NullPool

from registry.errors import NotInitialisedError
from registry.settings import database_url, sqlite_path

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "alembic"
SQLITE_BUSY_TIMEOUT_MS = 30_000


def make_engine(url: str | None = None) -> Engine:
    url = url or database_url()
    if url.startswith("sqlite"):
        path = sqlite_path(url)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000})
        event.listen(engine, "connect", _sqlite_pragmas)
        # pysqlite's own transaction handling defers BEGIN; take the write lock at BEGIN instead
        # (BEGIN IMMEDIATE) so that concurrent writers queue on busy_timeout, not deadlock.
        event.listen(engine, "begin", lambda conn: conn.exec_driver_sql("BEGIN IMMEDIATE"))
        return engine
    return create_engine(url, pool_pre_ping=True)


def make_reader_engine(url: str, timeout_s: float = 2.0) -> Engine:
    """A read-only engine whose every wait is bounded by `timeout_s`: for a server that must
    answer while the registry is busy or down (serve/policy.py).

    SQLite: the file must exist (``mode=ro`` never creates one), reads take no write lock
    (deferred BEGIN, ``query_only``), and each read opens a fresh connection (NullPool), so a
    file that was replaced or removed is seen at once. PostgreSQL: connect, statement and lock
    timeouts, read-only transactions.
    """
    ms = max(1, int(timeout_s * 1000))
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        ro_url = f"sqlite:///file:{path}?mode=ro&uri=true"
        engine = create_engine(ro_url, poolclass=NullPool, connect_args={"timeout": timeout_s})

        @event.listens_for(engine, "connect")
        def _read_only(dbapi_conn: Any, _record: Any) -> None:
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            cur.execute(f"PRAGMA busy_timeout={ms}")
            cur.execute("PRAGMA query_only=ON")
            cur.close()

        event.listen(engine, "begin", lambda conn: conn.exec_driver_sql("BEGIN"))
        return engine
    options = f"-c statement_timeout={ms} -c lock_timeout={ms} -c default_transaction_read_only=on"
    connect_args = {"connect_timeout": max(1, round(timeout_s)), "options": options}
    return create_engine(url, poolclass=NullPool, connect_args=connect_args)


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    dbapi_conn.isolation_level = None  # let the "begin" listener issue BEGIN itself
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def alembic_config(url: str) -> Any:
    from alembic.config import Config

    if not (MIGRATIONS_DIR / "env.py").is_file():
        raise NotInitialisedError(f"{MIGRATIONS_DIR}: migrations not found (broken install?)")
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def upgrade(url: str | None = None, revision: str = "head") -> str:
    """Bring the database up to ``revision``; return the revision it is at afterwards."""
    return _migrate("upgrade", url, revision)


def downgrade(url: str | None = None, revision: str = "base") -> str:
    """Take the database down to ``revision`` (``base``: no registry tables)."""
    return _migrate("downgrade", url, revision)


def _migrate(direction: str, url: str | None, revision: str) -> str:
    from alembic import command

    url = url or database_url()
    engine = make_engine(url)
    try:
        with engine.begin() as conn:
            cfg = alembic_config(url)
            cfg.attributes["connection"] = conn
            getattr(command, direction)(cfg, revision)
        return current_revision(engine) or "base"
    finally:
        engine.dispose()


def current_revision(engine: Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def head_revision(url: str | None = None) -> str:
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(alembic_config(url or database_url()))
    return str(script.get_current_head())


class Registry:
    """A handle on one registry database: makes sessions, checks the schema is there."""

    def __init__(self, url: str | None = None) -> None:
        self.url = url or database_url()
        self.engine = make_engine(self.url)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @property
    def display_url(self) -> str:
        """The database URL with any password hidden, for messages."""
        return self.engine.url.render_as_string(hide_password=True)

    def check_initialised(self) -> None:
        """Refuse a database without the schema, or with an older one (a new column would fail
        later as an SQL error in the middle of a command)."""
        if not inspect(self.engine).has_table("alembic_version"):
            raise NotInitialisedError(
                f"registry database {self.display_url} is not initialised: run "
                "`composer registry init`"
            )
        have, want = current_revision(self.engine), head_revision(self.url)
        if have != want:
            raise NotInitialisedError(
                f"registry database {self.display_url} has schema {have}; this version of "
                f"composer needs {want}: run `composer registry init` (it migrates in place)"
            )

    @contextmanager
    def session(self) -> Iterator[Session]:
        """One transaction: committed on success, rolled back on any error."""
        with self._sessions() as s, s.begin():
            yield s

    def close(self) -> None:
        self.engine.dispose()
