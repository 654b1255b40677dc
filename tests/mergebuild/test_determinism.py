"""Same spec, inputs and seed -> byte-identical shards; another seed changes DARE's masks."""

from __future__ import annotations

from pathlib import Path

from mergebuild_helpers import build_text

SPEC = (
    "method: merge\nbase: base\nexperts: [code, legal]\n"
    "parameters: {method: dare_ties, density: 0.5}\n"
)


def test_same_seed_same_bytes(models: Path, tmp_path: Path) -> None:
    a = build_text(models, tmp_path / "a", SPEC, seed=7)
    b = build_text(models, tmp_path / "b", SPEC, seed=7)
    c = build_text(models, tmp_path / "c", SPEC, seed=8)
    shard = "model.safetensors"
    assert a.files == b.files  # sha256 of every written file
    assert (a.out_dir / shard).read_bytes() == (b.out_dir / shard).read_bytes()
    assert a.files[shard] != c.files[shard]


def test_spec_seed_in_parameters_wins(models: Path, tmp_path: Path) -> None:
    text = SPEC.replace("density: 0.5", "density: 0.5, seed: 3")
    a = build_text(models, tmp_path / "a", text, seed=1)
    b = build_text(models, tmp_path / "b", text, seed=2)
    assert a.files == b.files


def test_calibrated_merge_is_deterministic(models: Path, tmp_path: Path) -> None:
    text = (
        "method: merge\nbase: base\nexperts: [code, legal]\n"
        "parameters: {method: expert_merging, steps: 3, seq_len: 32,"
        " calibration: [cal/code.txt, cal/legal.txt]}\n"
    )
    a = build_text(models, tmp_path / "a", text)
    b = build_text(models, tmp_path / "b", text)
    assert a.files["model.safetensors"] == b.files["model.safetensors"]


def test_spec_seed_is_the_default_build_seed(models: Path, tmp_path: Path) -> None:
    a = build_text(models, tmp_path / "a", SPEC + "seed: 5\n")
    b = build_text(models, tmp_path / "b", SPEC, seed=5)
    c = build_text(models, tmp_path / "c", SPEC + "seed: 5\n", seed=6)  # the argument wins
    assert a.files["model.safetensors"] == b.files["model.safetensors"]
    assert c.files["model.safetensors"] != a.files["model.safetensors"]
