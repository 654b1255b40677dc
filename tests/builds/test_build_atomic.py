"""Atomic builds: a failed build leaves neither the output folder nor its temporary folder."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from build_helpers import build_text, leftovers
from safetensors.torch import load_file, save_file

from composer.checkpoint import CheckpointError
from composer.errors import BuildError


def _split_expert(src: Path, dst: Path, late_layer: int) -> Path:
    """Copy an expert as two shards; the second holds only layer ``late_layer``'s FFN, so the
    build opens it only when it writes that layer's experts (after verify and routers)."""
    shutil.copytree(src, dst)
    sd = load_file(dst / "model.safetensors")
    (dst / "model.safetensors").unlink()
    late = {k for k in sd if k.startswith(f"model.layers.{late_layer}.mlp.")}
    names = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    save_file({k: v for k, v in sd.items() if k not in late}, dst / names[0], {"format": "pt"})
    save_file({k: sd[k] for k in late}, dst / names[1], {"format": "pt"})
    weight_map = {k: names[1] if k in late else names[0] for k in sd}
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    return dst


def _truncate(path: Path, keep: int) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - keep])


def test_failure_while_writing_leaves_nothing(models: Path, tmp_path: Path) -> None:
    work = tmp_path / "work"
    bad = _split_expert(models / "legal", tmp_path / "inputs" / "legal", late_layer=1)
    # The split copy is a valid input: it builds and gives the same bytes as the original.
    text = (
        "method: compose\nstyle: flexolmo\nbase: base\n"
        f"experts: [code, {bad}]\noutput: {{max_shard_size: 300KB}}\n"
    )
    good = build_text(models, work / "good", text)
    ref = build_text(models, work / "ref", text.replace(str(bad), "legal"))
    assert good.files == ref.files and len(good.files) > 3  # several output shards
    _truncate(bad / "model-00002-of-00002.safetensors", keep=1000)
    with pytest.raises(CheckpointError, match=r"model-00002-of-00002.safetensors: truncated"):
        build_text(models, work / "out", text)
    assert leftovers(work) == ["good", "ref"]  # no "out", no ".out.tmp-*"


def test_truncated_expert_leaves_nothing(models: Path, tmp_path: Path) -> None:
    bad = tmp_path / "inputs" / "code"
    shutil.copytree(models / "code", bad)
    _truncate(bad / "model.safetensors", keep=4)
    work = tmp_path / "work"
    text = f"method: compose\nstyle: flexolmo\nbase: base\nexperts: [{bad}, legal]\n"
    with pytest.raises(CheckpointError, match=r"truncated \(\d+ bytes, header promises \d+\)"):
        build_text(models, work / "out", text)
    assert leftovers(work) == []


def test_corrupt_header_leaves_nothing(models: Path, tmp_path: Path) -> None:
    bad = tmp_path / "inputs" / "code"
    shutil.copytree(models / "code", bad)
    data = bytearray((bad / "model.safetensors").read_bytes())
    data[8:16] = b"\x00garbage"
    (bad / "model.safetensors").write_bytes(bytes(data))
    work = tmp_path / "work"
    text = f"method: compose\nstyle: btx\nbase: base\nexperts: [{bad}, legal]\n"
    with pytest.raises(CheckpointError, match=r"corrupted header"):
        build_text(models, work / "out", text)
    assert leftovers(work) == []


def test_existing_output_is_refused_and_untouched(models: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    text = "method: upcycle\nbase: base\nnum_experts: 2\n"
    with pytest.raises(BuildError, match=r"output .*out already exists; choose a new folder"):
        build_text(models, out, text)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "mine"
    assert leftovers(tmp_path) == ["out"]
    # An empty folder counts as existing too.
    (out / "keep.txt").unlink()
    with pytest.raises(BuildError, match=r"already exists"):
        build_text(models, out, text)


def test_successful_build_leaves_only_the_output(models: Path, tmp_path: Path) -> None:
    text = "method: upcycle\nbase: base\nnum_experts: 2\n"
    res = build_text(models, tmp_path / "deep" / "er" / "out", text, spec_dir=tmp_path)
    assert res.out_dir == (tmp_path / "deep" / "er" / "out").absolute()
    assert [p.name for p in (tmp_path / "deep" / "er").iterdir()] == ["out"]
    names = {p.name for p in res.out_dir.iterdir()}
    assert names == {
        "config.json",
        "composition.json",
        "generation_config.json",
        "model.safetensors",
        "model.safetensors.index.json",
    }
