"""Integrity: corrupted blobs, the append-only audit log, concurrent adds, migrations."""

from __future__ import annotations

import json
import os
import stat

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.exc import DBAPIError

from registry.db import downgrade, head_revision, upgrade
from tests.registry.state import blob_files


def test_verify_finds_changed_blob_and_names_expert(registered):
    cli = registered
    doc = json.loads(cli("registry", "show", "code@1", "--json").stdout)
    sha = next(f["sha256"] for f in doc["files"] if f["path"] == "model.safetensors")
    blob = cli.home / "blobs" / sha[:2] / sha[2:]
    assert not os.access(blob, os.W_OK) or os.geteuid() == 0  # stored read-only
    assert stat.S_IMODE(blob.stat().st_mode) == 0o444
    data = bytearray(blob.read_bytes())
    data[len(data) // 2] ^= 0x01  # one flipped bit
    os.chmod(blob, 0o644)
    blob.write_bytes(bytes(data))
    proc = cli("registry", "verify", ok=False)
    assert proc.returncode == 1
    assert "expert code@1" in proc.stderr and "model.safetensors" in proc.stderr
    out = json.loads(cli("registry", "verify", "code@1", "--json", ok=False).stdout)
    assert out["ok"] is False
    assert [(p["subject"], p["relpath"]) for p in out["problems"]] == [
        ("expert code@1", "model.safetensors")
    ]
    # The base shares no blob with the expert's weights, so it still verifies... but not a
    # verify of everything.
    assert cli("registry", "verify", ok=False).returncode == 1


def test_missing_blob_is_reported(registered):
    doc = json.loads(registered("registry", "show", "code", "--json").stdout)
    sha = next(f["sha256"] for f in doc["files"] if f["path"] == "config.json")
    (registered.home / "blobs" / sha[:2] / sha[2:]).unlink()
    proc = registered("registry", "verify", "code", ok=False)
    assert proc.returncode == 1 and "missing" in proc.stderr and "expert code@1" in proc.stderr


def test_policy_audit_log_is_append_only(registered):
    engine = create_engine(registered.db_url)
    try:
        for stmt in ("UPDATE policy_events SET actor = 'mallory'", "DELETE FROM policy_events"):
            with pytest.raises(DBAPIError, match="append-only"), engine.begin() as conn:
                conn.execute(text(stmt))
        with engine.connect() as conn:
            assert conn.execute(text("SELECT actor FROM policy_events")).scalars().all() == [
                "alice"
            ]
    finally:
        engine.dispose()


def _referenced_blobs(db_url: str) -> set[str]:
    engine = create_engine(db_url)
    with engine.connect() as conn:
        shas = set(conn.execute(text("SELECT blob_sha256 FROM artifact_files")).scalars())
    engine.dispose()
    return shas


def _assert_consistent(cli) -> None:
    """No orphan blobs, no dangling rows, and the database itself is sound."""
    assert blob_files(cli.home) == _referenced_blobs(cli.db_url)
    assert not list((cli.home / "blobs" / "staging").glob("*"))
    if cli.db_url.startswith("sqlite"):
        engine = create_engine(cli.db_url)
        with engine.connect() as conn:
            assert conn.execute(text("PRAGMA integrity_check")).scalar_one() == "ok"
        engine.dispose()
    assert cli("registry", "verify").returncode == 0


def _add(cli, path, name, version):
    return cli.popen("registry", "add-expert", path, "--name", name, "--version", version,
                     "--owner", "alice", "--base", "tiny", "--domain", "code")  # fmt: skip


def test_concurrent_adds_of_different_experts_both_succeed(registered, ckpts):
    procs = [_add(registered, ckpts["ffn2"], "a", "1"), _add(registered, ckpts["dense"], "b", "1")]
    results = [(p.wait(timeout=120), p.stderr.read()) for p in procs]
    # "dense" has different shared weights: as an ffn expert it is refused, cleanly.
    assert results[0][0] == 0, results[0][1]
    assert results[1][0] == 2 and "differs from the base" in results[1][1]
    procs = [_add(registered, ckpts["ffn2"], "c", "1"), _add(registered, ckpts["ffn"], "d", "1")]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    refs = [
        e["ref"] for e in json.loads(registered("registry", "list", "--json").stdout)["experts"]
    ]
    assert refs == ["a@1", "c@1", "code@1", "d@1"]
    _assert_consistent(registered)


def test_concurrent_adds_of_same_name_version(registered, ckpts):
    # Different bytes under the same NAME@VERSION: exactly one wins, the loser leaves no blobs.
    procs = [
        _add(registered, ckpts["ffn2"], "race", "1"),
        _add(registered, ckpts["ffn"], "race", "1"),
    ]
    codes = sorted(p.wait(timeout=120) for p in procs)
    errs = [p.stderr.read() for p in procs]
    assert codes == [0, 2], errs
    assert any("race@1' already exists" in e for e in errs), errs
    _assert_consistent(registered)


def test_downgrade_and_upgrade_round_trip(cli):
    assert downgrade(cli.db_url) == "base"
    engine = create_engine(cli.db_url)
    with engine.connect() as conn:
        names = set(conn.dialect.get_table_names(conn))
    engine.dispose()
    assert names <= {"alembic_version"}
    assert upgrade(cli.db_url) == head_revision(cli.db_url)
    cli("registry", "add-owner", "carol")
