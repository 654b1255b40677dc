"""Policy bound to registry ids, read the way the server reads it, against real registries
(SQLite and PostgreSQL) and real `composer build` outputs; and the reader's bounded waits.

No engine here: these are the decisions the server's middleware makes for every request.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from registry.composition import COMPOSITION_FILE, CompositionError
from registry.db import make_reader_engine
from registry.errors import ComposerError
from registry.keys import hash_key
from registry.policy_snapshot import read_policy_snapshot
from serve.policy import PolicyRefresher, load_bindings, permitted
from tests.conftest import Cli
from tests.pg import PostgresServer
from tests.serve.registry_builds import BTX_SPEC, SLOTS, build, guarded_build, set_policy


@dataclass
class Registered:
    cli: Cli
    guarded: Path  # the FlexOlmo build (pinned alpha@1, beta renamed b2)
    btx: Path  # the BTX build whose alpha@1 slot calls itself "public"

    def set_policy(self, ref: str, policy: str) -> None:
        set_policy(self.cli, ref, policy)

    def decide(self, out: Path | None = None, key: str | None = None) -> set[str]:
        """What a fresh server would let `key` (a secret) use of the build at `out`."""
        bindings = load_bindings(out or self.guarded, self.cli.db_url)
        refresher = PolicyRefresher.for_registry(self.cli.db_url, bindings, timeout=5.0)
        assert refresher.refresh(), refresher.status()
        return permitted(bindings, refresher.current(), hash_key(key) if key else None)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def reg(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Registered:
    """One registry per database kind, with both builds (made once: the CLI is slow)."""
    root = tmp_path_factory.mktemp(f"binding-{request.param}")
    url = f"sqlite:///{root / 'registry.db'}"
    if request.param == "postgresql":
        url = request.getfixturevalue("pg_server").create_database(f"b_{uuid.uuid4().hex[:12]}")
    cli = Cli(home=root / "home", db_url=url)
    cli("registry", "init")
    guarded = guarded_build(cli, root).out
    return Registered(cli, guarded, build(cli, root, BTX_SPEC, "named-public"))


@pytest.fixture
def fresh(reg: Registered) -> Iterator[Registered]:
    yield reg
    for name in ("alpha", "beta", "secret", "withdrawn"):
        reg.set_policy(name, "opt_in")


def _secret(cli: Cli, name: str, *allow: str) -> str:
    args = [a for e in allow for a in ("--allow", e)]
    return json.loads(cli("keys", "create", name, *args, "--json").stdout)["key"]


def test_policy_follows_registered_versions_not_display_names(fresh: Registered) -> None:
    assert fresh.decide() == set(SLOTS)
    # The spec renamed `beta` to `b2`: the owner's opt-out of `beta` still reaches that slot.
    fresh.set_policy("beta", "opt_out")
    assert fresh.decide() == set(SLOTS) - {"b2"}
    # The build pinned alpha@1: an opt-out of the newer alpha@2 does not touch it...
    fresh.set_policy("alpha@2", "opt_out")
    assert "alpha" in fresh.decide()
    # ...and an opt-out of alpha@1 does, although alpha@2 (the latest) is opted in again.
    fresh.set_policy("alpha@2", "opt_in")
    fresh.set_policy("alpha@1", "opt_out")
    assert "alpha" not in fresh.decide()


def test_restricted_experts_and_revoked_keys(fresh: Registered) -> None:
    cli = fresh.cli
    fresh.set_policy("secret", "restricted")
    lister = _secret(cli, "lister", "secret", "alpha")
    plain = _secret(cli, "plain")
    assert fresh.decide(key=lister) == {"public", "alpha", "secret"}  # scoped to its list
    assert fresh.decide(key=plain) == set(SLOTS) - {"secret"}
    cli("keys", "revoke", "lister")
    ids = [b.version_id for b in load_bindings(fresh.guarded, cli.db_url) if b.version_id]
    snap = read_policy_snapshot(make_reader_engine(cli.db_url), ids)
    assert hash_key(lister) not in snap.keys and hash_key(plain) in snap.keys
    assert fresh.decide(key=lister) == set(SLOTS) - {"secret"}  # as if it had no key
    again = cli("keys", "revoke", "lister", ok=False)
    assert again.returncode == 2 and "already revoked" in again.stderr
    listed = {k["name"]: k["revoked_at"] for k in json.loads(cli("keys", "list", "--json").stdout)}
    assert listed["lister"] and listed["plain"] is None


def test_an_expert_named_public_is_governed(fresh: Registered) -> None:
    assert fresh.decide(fresh.btx) == {"public", "beta"}
    fresh.set_policy("alpha@1", "opt_out")
    assert fresh.decide(fresh.btx) == {"beta"}


def test_a_build_the_registry_no_longer_knows_is_denied(fresh: Registered, tmp_path: Path) -> None:
    out = _copy(fresh.guarded, tmp_path / "tampered")
    doc = json.loads((out / COMPOSITION_FILE).read_text())
    doc["experts"][1]["registry_id"] = 999  # a version this registry never had
    doc["experts"][2]["sha256"] = "0" * 64  # the registry's bytes for beta are other bytes
    (out / COMPOSITION_FILE).write_text(json.dumps(doc))
    assert fresh.decide(out) == set(SLOTS) - {"alpha", "b2"}


def test_a_build_without_its_record_is_refused(fresh: Registered, tmp_path: Path) -> None:
    out = _copy(fresh.guarded, tmp_path / "renamed")
    doc = json.loads((out / COMPOSITION_FILE).read_text())
    doc["experts"][1]["name"] = "other"
    (out / COMPOSITION_FILE).write_text(json.dumps(doc))
    with pytest.raises(CompositionError, match="do not match the checkpoint"):
        load_bindings(out, fresh.cli.db_url)
    (out / COMPOSITION_FILE).unlink()
    with pytest.raises(ComposerError, match="composition.json is missing"):
        load_bindings(out, fresh.cli.db_url)
    assert [b.governed for b in load_bindings(out, None)] == [False] * len(SLOTS)  # no registry


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for name in ("config.json", COMPOSITION_FILE):
        shutil.copyfile(src / name, dst / name)
    return dst


# --- the reader's bounded waits (SQLite) -------------------------------------------------------


def _sqlite(tmp_path: Path) -> tuple[str, Path]:
    from registry.db import upgrade

    path = tmp_path / "r.db"
    url = f"sqlite:///{path}"
    upgrade(url)
    return url, path


def test_reads_take_no_write_lock_and_wait_for_no_writer(tmp_path: Path) -> None:
    url, path = _sqlite(tmp_path)
    writer = sqlite3.connect(path, isolation_level=None)
    writer.execute("BEGIN IMMEDIATE")  # a registry command in the middle of its transaction
    writer.execute("INSERT INTO owners (name, created_at) VALUES ('w', '2026-01-01')")
    t0 = time.monotonic()
    read_policy_snapshot(make_reader_engine(url, timeout_s=5.0), [1, 2])
    assert time.monotonic() - t0 < 2.0  # the old reader queued behind the writer for 30 s
    writer.execute("ROLLBACK")


def test_a_locked_or_missing_database_fails_within_the_timeout(tmp_path: Path) -> None:
    url, path = _sqlite(tmp_path)
    locker = sqlite3.connect(path, isolation_level=None)
    locker.execute("PRAGMA locking_mode=EXCLUSIVE")
    locker.execute("BEGIN EXCLUSIVE")
    locker.execute("INSERT INTO owners (name, created_at) VALUES ('l', '2026-01-01')")
    engine = make_reader_engine(url, timeout_s=0.5)
    t0 = time.monotonic()
    with pytest.raises(Exception, match="locked"):
        read_policy_snapshot(engine, [1])
    assert time.monotonic() - t0 < 3.0
    locker.execute("ROLLBACK")
    locker.close()
    read_policy_snapshot(engine, [1])
    gone = tmp_path / "gone.db"
    with pytest.raises(Exception, match="unable to open"):
        read_policy_snapshot(make_reader_engine(f"sqlite:///{gone}", timeout_s=0.5), [1])
    assert not gone.exists()  # a reader never creates an empty registry


@pytest.mark.postgres
def test_a_locked_postgresql_registry_fails_within_the_timeout(pg_server: PostgresServer) -> None:
    import psycopg

    from registry.db import upgrade

    url = pg_server.create_database(f"l_{uuid.uuid4().hex[:12]}")
    upgrade(url)
    dsn = url.replace("postgresql+psycopg", "postgresql")
    with psycopg.connect(dsn) as locker:
        locker.execute("LOCK TABLE api_keys IN ACCESS EXCLUSIVE MODE")  # held until rollback
        t0 = time.monotonic()
        with pytest.raises(Exception, match="lock timeout|statement timeout"):
            read_policy_snapshot(make_reader_engine(url, timeout_s=0.5), [1])
        assert time.monotonic() - t0 < 3.0
        locker.rollback()
    read_policy_snapshot(make_reader_engine(url, timeout_s=0.5), [1])
