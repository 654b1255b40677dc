"""Same spec, inputs and seed -> byte-identical folder; the seed moves only random routers."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from build_helpers import bit_equal, build_text, load_model, tensors
from safetensors import safe_open

from composer.spec import parse_size

UPCYCLE = (
    "method: upcycle\nbase: base\nnum_experts: 4\ntop_k: 2\n"
    "output: {max_shard_size: 1MB}\nseed: 1\n"
)
BTX = "method: compose\nstyle: btx\nbase: base\nexperts: [ft1, ft2]\nseed: 1\n"


def _folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("text", [UPCYCLE, BTX], ids=["upcycle", "btx"])
def test_same_seed_same_bytes_other_seed_other_routers(
    models: Path, tmp_path: Path, text: str
) -> None:
    a = build_text(models, tmp_path / "a", text)
    b = build_text(models, tmp_path / "b", text)
    c = build_text(models, tmp_path / "c", text, seed=2)
    # BuildResult.files is the sha256 of every weight file, and it is right.
    for name, sha in a.files.items():
        assert hashlib.sha256((a.out_dir / name).read_bytes()).hexdigest() == sha, name
    assert a.files == b.files
    # The whole folder (config, manifest, shards, index) is reproducible: no timestamps.
    assert _folder_bytes(a.out_dir) == _folder_bytes(b.out_dir)

    ta, tc = tensors(a.out_dir), tensors(c.out_dir)
    assert ta.keys() == tc.keys()
    routers = {k for k in ta if k.endswith("block_sparse_moe.gate.weight")}
    assert len(routers) == 2
    for k in ta:
        assert bit_equal(ta[k], tc[k]) == (k not in routers), k
    assert a.files != c.files
    assert json.loads((c.out_dir / "composition.json").read_text())["seed"] == 2


def test_seed_argument_overrides_the_spec(models: Path, tmp_path: Path) -> None:
    a = build_text(models, tmp_path / "a", UPCYCLE.replace("seed: 1", "seed: 7"))
    b = build_text(models, tmp_path / "b", UPCYCLE, seed=7)
    c = build_text(models, tmp_path / "c", UPCYCLE.replace("seed: 1", "seed: 7"), seed=7)
    assert a.files == b.files == c.files
    for r in (a, b):
        assert json.loads((r.out_dir / "composition.json").read_text())["seed"] == 7
    # The spec itself differs (its seed field), so its hash does too.
    assert a.spec_sha256 != b.spec_sha256 and a.spec_sha256 == c.spec_sha256


def test_non_random_routers_ignore_the_seed(models: Path, tmp_path: Path) -> None:
    text = "method: compose\nstyle: flexolmo\nbase: base\nexperts: [code, legal]\n"
    a = build_text(models, tmp_path / "a", text)
    b = build_text(models, tmp_path / "b", text, seed=123)
    shards = {k: v for k, v in a.files.items() if k.endswith(".safetensors")}
    assert shards == {k: v for k, v in b.files.items() if k.endswith(".safetensors")}


def test_shards_respect_the_size_limit_and_load(models: Path, tmp_path: Path) -> None:
    res = build_text(models, tmp_path / "sharded", UPCYCLE)
    one = build_text(models, tmp_path / "one", UPCYCLE.replace("1MB", "2GB"))
    limit = parse_size("1MB")
    index = json.loads((res.out_dir / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3
    assert shards == [
        f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, 1 + len(shards))
    ]
    total = 0
    for name in shards:
        with safe_open(str(res.out_dir / name), "pt") as f:
            data = sum(f.get_tensor(k).numel() * 4 for k in f.keys())  # noqa: SIM118
        assert 0 < data <= limit, name
        total += data
    assert index["metadata"]["total_size"] == total
    assert sorted(one.files) == ["model.safetensors", "model.safetensors.index.json"]
    # Same tensors whatever the sharding, and transformers reads the sharded folder.
    ts, t1 = tensors(res.out_dir), tensors(one.out_dir)
    assert ts.keys() == t1.keys() and all(bit_equal(ts[k], t1[k]) for k in ts)
    model = load_model(res.out_dir)
    got = dict(model.state_dict())
    key = "model.layers.1.self_attn.q_proj.weight"
    assert torch.equal(got[key], t1[key])
