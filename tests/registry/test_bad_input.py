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
