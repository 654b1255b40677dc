"""Shared fixtures: registry databases (SQLite and a real PostgreSQL server) and the CLI."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


class RegistryTemplates:
    """Registries made once per session with the real CLI, then cloned for each test (the
    database and $COMPOSER_HOME copied), so a test's set-up costs file copies instead of one
    CLI process per command. What a stage holds is exactly what its commands made."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.made: dict[tuple[str, str], Cli] = {}

    def clone(self, stage: str, target: Cli, make: Callable[[Cli], None]) -> None:
        kind = "postgresql" if target.db_url.startswith("postgresql") else "sqlite"
        template = self.made.get((stage, kind))
        if template is None:
            folder = self.root / f"{stage}-{kind}"
            url = f"sqlite:///{folder / 'registry.db'}"
            if kind == "postgresql":
                url = _pg_database(target.db_url, f"tmpl_{stage}_{uuid.uuid4().hex[:8]}")
            template = Cli(home=folder / "home", db_url=url)
            make(template)
            self.made[stage, kind] = template
        if kind == "sqlite":
            src = template.db_url.split("///", 1)[1]
            with sqlite3.connect(src) as conn:  # fold the WAL into the file before copying it
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            shutil.copyfile(src, target.db_url.split("///", 1)[1])
        else:
            _pg_database(target.db_url, target.db_url.rsplit("/", 1)[1], template.db_url)
        shutil.rmtree(target.home, ignore_errors=True)
        if template.home.exists():
            shutil.copytree(template.home, target.home)


def _pg_database(url: str, name: str, template: str | None = None) -> str:
    """(Re)create database `name` on the server of `url`, empty or as a copy of `template`."""
    import psycopg
    from sqlalchemy.engine import make_url

    u = make_url(url)
    with psycopg.connect(host=u.host, port=u.port, user=u.username, dbname="postgres",
                         autocommit=True) as conn:  # fmt: skip
        conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
        copy = f' TEMPLATE "{make_url(template).database}"' if template else ""
        conn.execute(f'CREATE DATABASE "{name}"{copy}')
    return u.set(database=name).render_as_string(hide_password=False)


@pytest.fixture(scope="session")
def registry_templates(tmp_path_factory: pytest.TempPathFactory) -> RegistryTemplates:
    return RegistryTemplates(tmp_path_factory.mktemp("registry-templates"))


@pytest.fixture
def cli(tmp_path: Path, db_url: str, registry_templates: RegistryTemplates) -> Cli:
    """The real CLI against a registry that `composer registry init` made (a clone of it)."""
    c = Cli(home=tmp_path / "home", db_url=db_url)
    registry_templates.clone("initialised", c, lambda t: t("registry", "init"))
    return c


@pytest.fixture(autouse=True, scope="session")
def _float32_compute() -> Iterator[None]:
    """Test numerics must not depend on the CPU they run on: the precision chooser sees no
    native bf16 (COMPOSER_NATIVE_BF16=0, inherited by subprocesses), from the first
    session-scoped fixture on; tests of the chooser and of bf16 paths override the probe or
    set bf16 explicitly."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("COMPOSER_NATIVE_BF16", "0")
        yield


@pytest.fixture
def pretend(monkeypatch: pytest.MonkeyPatch) -> Callable[[bool], None]:
    """``pretend(native)``: the precision chooser's probe reports a CPU with (or without) native
    bf16, whatever this machine has."""
    from composer import precision

    def set_native(native: bool) -> None:
        def probe(device: str = "cpu") -> precision.Capability:
            return precision.Capability(device, native, "pretended")

        monkeypatch.setattr(precision, "probe", probe)
        precision._logged.clear()

    return set_native


@pytest.fixture
def autocast_seen() -> Iterator[set[Any]]:
    """The CPU autocast dtype (None: autocast off) every module forward ran under, recorded by a
    global forward hook: what the drivers actually did, not what they were asked to do."""
    import torch

    seen: set[Any] = set()

    def hook(module: Any, args: Any, out: Any) -> None:
        on = torch.is_autocast_enabled("cpu")
        seen.add(torch.get_autocast_dtype("cpu") if on else None)

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    yield seen
    handle.remove()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Files with slow tests first, each file's tests in their own order.

    `make test` runs `-n 2 --dist loadfile --no-loadscope-reorder`: xdist hands out whole files
    in this order, so the files that start engines and servers (minutes each) start first and
    the quick ones fill in at the end, and both workers finish together. (xdist's default
    reorder puts the files with the most tests first, which left the engine files to the end
    on one worker.)
    """
    slow: dict[Path, bool] = {}  # in order of first appearance
    for item in items:
        slow[item.path] = slow.get(item.path, False) or item.get_closest_marker("slow") is not None
    first = {file: i for i, file in enumerate(slow)}
    items.sort(key=lambda it: (not slow[it.path], first[it.path]))
