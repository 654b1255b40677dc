"""Shared fixtures: registry databases (SQLite and a real PostgreSQL server) and the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.pg import PostgresServer, find_pg_bin

COMPOSER = [sys.executable, "-m", "cli.main"]
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PostgresServer]:
    bin_dir = find_pg_bin()
    if bin_dir is None:
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL binaries not found; .ci/run installs Debian's postgresql")
        pytest.skip("PostgreSQL binaries not found (apt-get install postgresql)")
    server = PostgresServer(bin_dir)
    server.start()
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'registry.db'}"
    server: PostgresServer = request.getfixturevalue("pg_server")
    return server.create_database(f"t_{uuid.uuid4().hex[:12]}")


@dataclass
class Cli:
    """Runs the real `composer` command in a subprocess against one registry."""

    home: Path
    db_url: str

    @property
    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "COMPOSER_HOME": str(self.home),
            "COMPOSER_DATABASE_URL": self.db_url,
            "PYTHONPATH": str(REPO),
        }

    def __call__(self, *args: str | Path, ok: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [*COMPOSER, *map(str, args)], env=self.env, capture_output=True, text=True, cwd=REPO
        )
        if ok and proc.returncode != 0:
            raise AssertionError(
                f"composer {' '.join(map(str, args))} exited {proc.returncode}\n"
                f"stdout: {proc.stdout}\nstderr: {proc.stderr}"
            )
        return proc

    def popen(self, *args: str | Path) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [*COMPOSER, *map(str, args)],
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )


@pytest.fixture
def cli(tmp_path: Path, db_url: str) -> Cli:
    c = Cli(home=tmp_path / "home", db_url=db_url)
    c("registry", "init")
    return c
