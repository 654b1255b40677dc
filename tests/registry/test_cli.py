"""Every registry and keys command, through the real `composer` CLI, on SQLite and PostgreSQL."""

from __future__ import annotations

import hashlib
import json

from sqlalchemy import create_engine, text

from registry.db import head_revision
from registry.models import Base


def _json(proc):
    """--json must print exactly one JSON document on stdout and nothing else there."""
    return json.loads(proc.stdout)


def test_init_is_idempotent_and_reaches_head(cli):
    doc = _json(cli("registry", "init", "--json"))
    assert doc["revision"] == head_revision(cli.db_url)
    again = _json(cli("registry", "init", "--json"))
    assert again["revision"] == doc["revision"]
    engine = create_engine(cli.db_url)
    with engine.connect() as conn:
        tables = set(Base.metadata.tables)
        for t in tables:
            conn.execute(text(f"SELECT count(*) FROM {t}")).scalar_one()
    engine.dispose()


def test_command_before_init_says_so(tmp_path):
    from tests.conftest import Cli

    c = Cli(home=tmp_path / "h", db_url=f"sqlite:///{tmp_path / 'fresh.db'}")
    proc = c("registry", "list", ok=False)
    assert proc.returncode == 2
    assert "not initialised: run `composer registry init`" in proc.stderr


def test_add_owner_base_expert_and_list(registered, ckpts):
    cli = registered
    doc = _json(cli("registry", "list", "--json"))
    assert [o["name"] for o in doc["owners"]] == ["alice", "bob"]
    (base,) = doc["bases"]
    assert base["name"] == "tiny" and base["architecture"] == "LlamaForCausalLM"
    assert len(base["fingerprint"]) == 64
    (expert,) = doc["experts"]
    assert expert["ref"] == "code@1"
    assert expert["owner"] == "alice" and expert["domain"] == "code" and expert["kind"] == "ffn"
    assert expert["policy"] == "opt_in"
    assert expert["base_fingerprint"] == base["fingerprint"]
    human = cli("registry", "list").stdout
    assert "code@1" in human and "tiny" in human


def test_versions_auto_and_explicit(registered, ckpts):
    cli = registered
    add = ("registry", "add-expert", ckpts["ffn2"], "--name", "code", "--owner", "alice",
           "--base", "tiny", "--domain", "code")  # fmt: skip
    assert _json(cli(*add, "--json"))["ref"] == "code@2"
    add = (*add[:2], ckpts["ffn3"], *add[3:])  # other files: the same ones again are refused
    assert _json(cli(*add, "--version", "2024-11", "--json"))["ref"] == "code@2024-11"
    assert _json(cli("registry", "show", "code", "--json"))["version"] == "2024-11"
    assert _json(cli("registry", "show", "code@1", "--json"))["version"] == "1"


def test_dense_and_lora_experts(registered, ckpts):
    cli = registered
    common = ("--owner", "bob", "--base", "tiny", "--domain", "chat", "--json")
    dense = _json(cli("registry", "add-expert", ckpts["dense"], "--name", "ft", "--kind", "dense",
                      *common))  # fmt: skip
    assert dense["kind"] == "dense"
    lora = _json(cli("registry", "add-expert", ckpts["lora"], "--name", "ad", "--kind", "lora",
                     *common))  # fmt: skip
    assert lora["kind"] == "lora"
    shown = _json(cli("registry", "show", "ad", "--json"))
    assert {f["path"] for f in shown["files"]} == {
        "adapter_config.json",
        "adapter_model.safetensors",
    }


def test_show_lists_files_with_hashes(registered, ckpts):
    doc = _json(registered("registry", "show", "code@1", "--json"))
    files = {f["path"]: f for f in doc["files"]}
    data = (ckpts["ffn"] / "model.safetensors").read_bytes()
    assert files["model.safetensors"]["sha256"] == hashlib.sha256(data).hexdigest()
    assert files["model.safetensors"]["size"] == len(data)
    assert doc["policy_history"][0]["to"] == "opt_in"


def test_opt_out_and_opt_in_by_owner_are_audited(registered, ckpts):
    cli = registered
    cli("registry", "add-expert", ckpts["ffn2"], "--name", "code", "--owner", "alice",
        "--base", "tiny", "--domain", "code")  # fmt: skip
    # One version only.
    out = _json(cli("registry", "opt-out", "code@1", "--owner", "alice", "--json"))
    assert [d["policy"] for d in out] == ["opt_out"]
    assert _json(cli("registry", "show", "code@2", "--json"))["policy"] == "opt_in"
    # Every version.
    out = _json(cli("registry", "opt-out", "code", "--owner", "alice", "--json"))
    assert [d["policy"] for d in out] == ["opt_out", "opt_out"]
    cli("registry", "opt-in", "code@1", "--owner", "alice")
    doc = _json(cli("registry", "show", "code@1", "--json"))
    assert doc["policy"] == "opt_in"
    assert [(e["from"], e["to"], e["actor"]) for e in doc["policy_history"]] == [
        (None, "opt_in", "alice"), ("opt_in", "opt_out", "alice"), ("opt_out", "opt_in", "alice"),
    ]  # fmt: skip
    cli("registry", "restrict", "code@1", "--owner", "alice")
    assert _json(cli("registry", "show", "code@1", "--json"))["policy"] == "restricted"


def test_verify_clean_registry(registered):
    doc = _json(registered("registry", "verify", "--json"))
    assert doc["ok"] is True and doc["checked_blobs"] >= 4 and doc["problems"] == []
    assert _json(registered("registry", "verify", "code@1", "--json"))["ok"] is True


def test_keys_create_stores_only_a_hash(registered):
    cli = registered
    doc = _json(cli("keys", "create", "svc", "--allow", "code", "--json"))
    assert doc["allow"] == ["code"] and doc["key"].startswith("ck_")
    listed = _json(cli("keys", "list", "--json"))
    assert listed == [
        {"name": "svc", "prefix": doc["key"][:8], "allow": ["code"], "revoked_at": None}
    ]
    engine = create_engine(cli.db_url)
    with engine.connect() as conn:
        (stored,) = conn.execute(text("SELECT key_sha256 FROM api_keys")).one()
        dump = json.dumps([list(map(str, r)) for r in conn.execute(text("SELECT * FROM api_keys"))])
    engine.dispose()
    assert stored == hashlib.sha256(doc["key"].encode()).hexdigest()
    assert doc["key"] not in dump
    no_allow = _json(cli("keys", "create", "open", "--json"))
    assert no_allow["allow"] == []
