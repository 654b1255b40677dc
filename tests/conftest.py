"""Shared fixtures: registry databases (SQLite and a real PostgreSQL server) and the CLI."""

from __future__ import annotations

import os
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


@pytest.fixture
def cli(tmp_path: Path, db_url: str) -> Cli:
    c = Cli(home=tmp_path / "home", db_url=db_url)
    c("registry", "init")
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
