"""Bad input: one-line error naming the problem and the file/field, exit 2, nothing changed."""

from __future__ import annotations

import shutil
import struct
from pathlib import Path

import pytest

from tests.registry.state import snapshot

ADD = ("registry", "add-expert")


def _expect_refusal(cli, args, *needles):
    before = snapshot(cli.db_url, cli.home)
    proc = cli(*args, ok=False)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ")
    for n in needles:
        assert str(n) in lines[0], (n, lines[0])
    assert proc.stdout == ""
    assert snapshot(cli.db_url, cli.home) == before
    return lines[0]


def _expert_args(path: Path, name: str = "x", **over: str) -> tuple[str, ...]:
    opts = {"--owner": "alice", "--base": "tiny", "--domain": "code", **over}
    return (*ADD, str(path), "--name", name, *[v for kv in opts.items() for v in kv])


def test_missing_path(registered, tmp_path):
    missing = tmp_path / "nope"
    _expect_refusal(registered, _expert_args(missing), missing, "path not found")


def test_folder_without_config(registered, tmp_path, ckpts):
    d = tmp_path / "noconfig"
    d.mkdir()
    shutil.copy(ckpts["ffn"] / "model.safetensors", d)
    _expect_refusal(registered, _expert_args(d), d, "no config.json")


def test_truncated_safetensors(registered, tmp_path, ckpts):
    d = tmp_path / "trunc"
    shutil.copytree(ckpts["ffn"], d)
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    _expect_refusal(registered, _expert_args(d), f, "truncated")


def test_corrupted_safetensors_header(registered, tmp_path, ckpts):
    d = tmp_path / "corrupt"
    shutil.copytree(ckpts["ffn"], d)
    f = d / "model.safetensors"
    data = bytearray(f.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    data[8 : 8 + 20] = b"\xff" * 20  # garbage in the JSON header
    f.write_bytes(bytes(data))
    _expect_refusal(registered, _expert_args(d), f, "corrupted safetensors file")


def test_garbage_header_length(registered, tmp_path, ckpts):
    d = tmp_path / "badlen"
    shutil.copytree(ckpts["ffn"], d)
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(struct.pack("<Q", 10**12) + data[8:])
    _expect_refusal(registered, _expert_args(d), f, "header length")


def test_shapes_do_not_fit_base(registered, ckpts):
    _expect_refusal(
        registered,
        _expert_args(ckpts["wrong_shape"]),
        "model.layers.0.mlp.down_proj.weight",
        "has shape [128, 192]",
        "[128, 256]",
    )


def test_ffn_expert_with_changed_shared_weights(registered, ckpts):
    _expect_refusal(
        registered,
        _expert_args(ckpts["anchor_mismatch"]),
        "model.layers.1.self_attn.q_proj.weight",
        "differs from the base",
    )


def test_lora_registered_as_ffn(registered, ckpts):
    _expect_refusal(registered, _expert_args(ckpts["lora"]), "--kind lora")


def test_unknown_owner(registered, ckpts):
    _expect_refusal(
        registered, _expert_args(ckpts["ffn2"], **{"--owner": "mallory"}), "--owner", "mallory"
    )


def test_unknown_base(registered, ckpts):
    _expect_refusal(registered, _expert_args(ckpts["ffn2"], **{"--base": "gpt5"}), "--base", "gpt5")


def test_unknown_kind(registered, ckpts):
    _expect_refusal(registered, _expert_args(ckpts["ffn2"], **{"--kind": "moe"}), "--kind", "moe")


def test_duplicate_name_at_version(registered, ckpts):
    args = _expert_args(ckpts["ffn2"], "code", **{"--version": "1"})
    _expect_refusal(registered, args, "code@1", "already exists")


def test_duplicate_base_and_owner(registered, ckpts):
    _expect_refusal(
        registered, ("registry", "add-base", ckpts["dense"], "--name", "tiny"), "base 'tiny'"
    )
    _expect_refusal(registered, ("registry", "add-owner", "alice"), "owner 'alice'")


def test_policy_change_by_non_owner(registered):
    _expect_refusal(
        registered, ("registry", "opt-out", "code", "--owner", "bob"), "'bob' does not own"
    )
    _expect_refusal(registered, ("registry", "opt-out", "code", "--owner", "eve"), "unknown owner")


@pytest.mark.parametrize(
    "args,needle",
    [
        (("registry", "show", "nosuch"), "unknown expert 'nosuch'"),
        (("registry", "show", "code@9"), "unknown version 'code@9'"),
        (("registry", "add-owner", "bad name"), "owner name: invalid value"),
        (("keys", "create", "k", "--allow", "nosuch"), "--allow: unknown expert 'nosuch'"),
    ],
)
def test_unknown_names(registered, args, needle):
    _expect_refusal(registered, args, needle)


def test_pickle_weights_refused(registered, tmp_path, ckpts):
    d = tmp_path / "pickled"
    shutil.copytree(ckpts["ffn"], d)
    (d / "pytorch_model.bin").write_bytes(b"not really a pickle")
    _expect_refusal(registered, _expert_args(d), "pytorch_model.bin", "pickle")


def test_same_files_again_under_the_same_name_are_refused(registered, ckpts):
    """Registering identical bytes again would be a silent duplicate (code@2 == code@1)."""
    for over in ({}, {"--version": "9"}):
        line = _expect_refusal(registered, _expert_args(ckpts["ffn"], "code", **over), "code@1")
        assert "already holds these files" in line and "nothing registered" in line
    _expect_refusal(
        registered,
        ("registry", "add-base", ckpts["base"], "--name", "tiny"),
        "base 'tiny' already holds these files",
    )


def test_unknown_refs_say_where_they_looked_and_how_to_register(registered, ckpts):
    line = _expect_refusal(registered, ("registry", "show", "nosuch"), "unknown expert 'nosuch'")
    assert f"COMPOSER_HOME={registered.home}" in line and "experts there: code" in line
    assert "the registry at postgresql" in line or f"the registry at {registered.db_url}" in line
    assert "`composer registry add-expert PATH --name nosuch --owner" in line
    line = _expect_refusal(registered, _expert_args(ckpts["ffn2"], "x", **{"--base": "gpt5"}))
    assert "--base: unknown base 'gpt5'" in line and "bases there: tiny" in line
    assert "`composer registry add-base PATH --name gpt5`" in line


@pytest.mark.parametrize(
    ("text", "where", "needles"),
    [
        (
            "method: upcycle\nname: up\nbase: smollm2\nnum_experts: 2\n",
            ":3: base: unknown base 'smollm2' in the registry at ",
            ("add-base PATH --name smollm2", "make demo", "bases there: tiny"),
        ),
        (
            "method: compose\nstyle: flexolmo\nbase: tiny\nexperts:\n  - code\n  - legal\n",
            ":6: experts[1]: unknown expert 'legal' in the registry at ",
            ("add-expert PATH --name legal", "experts there: code"),
        ),
    ],
)
def test_build_check_of_unregistered_names(registered, tmp_path, text, where, needles):
    spec = tmp_path / "s.yaml"
    spec.write_text(text)
    line = _expect_refusal(registered, ("build", spec, "--check"), f"{spec}{where}", *needles)
    assert f"COMPOSER_HOME={registered.home}" in line
