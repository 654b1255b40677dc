"""Streamed builds (blocks of rows read from disk, two workers, writes in place) write the same
files as main's build did: its layout, its ShardWriter and its whole-tensor merges (kept in
tests/merge/reference_dense.py)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest
import torch
from mergebuild_helpers import build_text

from composer.checkpoint import Checkpoint
from composer.merging import calibrated, streaming
from composer.tiny_models import make_tiny_llama, perturb_weights
from composer.writer import ShardFiles, ShardWriter, TensorSpec, partition
from merge import selection
from tests.merge import reference_dense as old

SPECS: dict[str, tuple[str, Any]] = {
    "linear": ("{method: linear, weight: [1.0, 2.0, 0.5]}",
               lambda b, e: old.linear(b, e, weights=[1.0, 2.0, 0.5])),
    "task_arithmetic": ("{method: task_arithmetic, lambda: 0.6}",
                        lambda b, e: old.task_arithmetic(b, e, lambda_=0.6)),
    "ties": ("{method: ties, density: 0.3}", lambda b, e: old.ties(b, e, density=0.3)),
    "dare_ties": ("{method: dare_ties, density: 0.5, seed: 5}",
                  None),  # the seed is per tensor name: see below
    "dare_linear": ("{method: dare_linear, density: [0.3, 1.0, 0.6], seed: 5}", None),
}  # fmt: skip


@pytest.fixture(scope="module")
def full(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A base with a 512k-entry embedding and three full fine-tunes (every tensor differs)."""
    root = tmp_path_factory.mktemp("streamed")
    make_tiny_llama(root / "base", seed=0, vocab_size=4096)
    for i in range(3):
        perturb_weights(root / "base", root / f"ft{i}", seed=i + 1, scale=0.01, relative=True)
    return root


def _old_files(full: Path, out: Path, method: str, tensor_fn: Any, max_bytes: int) -> dict:
    """What main's run_dense wrote: its layout and ShardWriter, merges on whole tensors."""
    base = Checkpoint(full / "base")
    experts = [Checkpoint(full / f"ft{i}") for i in range(3)]
    groups = streaming.group_tensors(
        ((k, *base.meta(k)) for k in base.tensor_names()), torch.float32
    )
    out.mkdir()
    writer = ShardWriter(out, partition(groups, max_bytes))
    for g in groups:
        for ts in g:
            b, es = base.read(ts.name), [e.read(ts.name) for e in experts]
            writer.write(ts.name, tensor_fn(ts.name, b, es).to(ts.dtype).contiguous())
    return writer.close()


def _reference_fn(method: str) -> Any:
    if method == "dare_ties":
        return lambda n, b, e: old.dare_ties(b, e, density=0.5, seed=5, name=n)
    if method == "dare_linear":
        return lambda n, b, e: old.dare_linear(b, e, density=[0.3, 1.0, 0.6], seed=5, name=n)
    fn = SPECS[method][1]
    return lambda n, b, e: fn(b, e)


@pytest.mark.parametrize("method", sorted(SPECS))
def test_streamed_build_writes_mains_bytes(
    full: Path, tmp_path: Path, method: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Small blocks and disk reads for everything over 64 KiB, so the 2 MiB embedding is
    # streamed in 32 blocks, its TIES selection sampled, and both workers busy.
    monkeypatch.setattr(streaming, "BLOCK_ENTRIES", 1 << 16)
    monkeypatch.setattr(streaming, "WHOLE_READ_BYTES", 1 << 16)
    text = (
        "method: merge\nbase: base\nexperts: [ft0, ft1, ft2]\n"
        f"parameters: {SPECS[method][0]}\noutput: {{max_shard_size: 1MB}}\n"
    )
    res = build_text(full, tmp_path / "new", text)
    want = _old_files(full, tmp_path / "old", method, _reference_fn(method), 1_000_000)
    got = {k: v for k, v in res.files.items() if k.startswith("model")}
    assert len(want) > 2  # several shards
    assert got == want
    for name in want:  # and the files really hold those bytes
        data = (res.out_dir / name).read_bytes()
        assert hashlib.sha256(data).hexdigest() == want[name]


def test_embedding_selection_was_sampled(full: Path) -> None:
    # The test above only covers the sampled bracket if the embedding is big enough for it.
    _, shape = Checkpoint(full / "base").meta("model.embed_tokens.weight")
    assert shape[0] * shape[1] > selection.EXACT_BELOW


def test_shard_files_equal_shard_writer_in_any_order(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    tensors = {
        "a": torch.randn(7, 5, generator=g),
        "b": torch.tensor(3.5),
        "c": torch.randint(0, 9, (4,), generator=g),
        "d": torch.randn(300, 2, generator=g).to(torch.bfloat16),
    }
    specs = [TensorSpec(k, tuple(v.shape), v.dtype) for k, v in tensors.items()]
    shards = partition([specs[:2], specs[2:]], 200)
    for d in ("seq", "pos", "empty"):
        (tmp_path / d).mkdir()
    seq = ShardWriter(tmp_path / "seq", shards)
    for s in specs:
        seq.write(s.name, tensors[s.name])
    files = ShardFiles(tmp_path / "pos", shards)
    files.write_rows("d", 100, tensors["d"][100:])
    files.write_rows("b", 0, tensors["b"])
    files.write_rows("c", 0, tensors["c"])
    files.write_rows("a", 3, tensors["a"][3:])
    files.write_rows("d", 0, tensors["d"][:100])
    with pytest.raises(RuntimeError, match="not .or over-. written"):
        ShardFiles(tmp_path / "empty", shards).close()  # nothing written
    files.write_rows("a", 0, tensors["a"][:3])
    assert files.close() == seq.close()


def _old_moe_files(models: Path, out: Path, spec_path: Path) -> dict[str, str]:
    """What main's run_moe_merge wrote: whole state dict, whole model, ShardWriter."""
    from transformers import AutoModelForCausalLM

    from composer.inputs import LocalPathResolver
    from composer.merging.plan import plan_merge
    from composer.spec_load import load_spec
    from merge.m_smoe import m_smoe_state_dict, uniform_merge_state_dict
    from merge.routing_stats import collect_routing_stats

    plan = plan_merge(load_spec(spec_path), LocalPathResolver(models))
    s, p = plan.settings, plan.settings.params
    top_k = int(plan.base_config["num_experts_per_tok"])
    ck = Checkpoint(plan.base.path)
    sd = {k: ck.read(k) for k in sorted(ck.keys())}  # noqa: SIM118
    if s.method == "m_smoe":
        vocab = int(plan.base_config["vocab_size"])
        batches = calibrated.calibration_batches(ck.path, s.calibration, vocab, s.tokens)
        model = AutoModelForCausalLM.from_pretrained(str(ck.path), dtype=torch.float32).eval()
        new_sd, _ = m_smoe_state_dict(sd, collect_routing_stats(model, batches, top_k), p, top_k)
    else:
        new_sd, _ = uniform_merge_state_dict(sd, p, top_k)
    groups = streaming.group_tensors(
        ((k, t.dtype, tuple(t.shape)) for k, t in new_sd.items()), torch.float32
    )
    out.mkdir()
    writer = ShardWriter(out, partition(groups, plan.max_shard_bytes))
    for g in groups:
        for ts in g:
            writer.write(ts.name, new_sd[ts.name].to(ts.dtype).contiguous())
    return writer.close()


@pytest.mark.parametrize(
    "params",
    [
        "{method: m_smoe, num_experts: 4, calibration: [cal/code.txt, cal/legal.txt], seq_len: 32,"
        " compress: low_rank, rank: 8}",
        "{method: uniform, num_experts: 2}",
    ],
    ids=["m_smoe_low_rank", "uniform"],
)
def test_streamed_moe_merge_writes_mains_bytes(
    models: Path, tmp_path: Path, params: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Layer by layer (statistics from a model holding one decoder layer, blocks merged and
    # written in turn) gives main's bytes; copied tensors go through small blocks.
    monkeypatch.setattr(streaming, "BLOCK_ENTRIES", 1 << 12)
    monkeypatch.setattr(streaming, "WHOLE_READ_BYTES", 1 << 12)
    text = f"method: moe_merge\nbase: moe8\nparameters: {params}\noutput: {{max_shard_size: 2MB}}\n"
    res = build_text(models, tmp_path / "new", text)
    spec_path = models / "spec-new.yaml"
    want = _old_moe_files(models, tmp_path / "old", spec_path)
    assert {k: v for k, v in res.files.items() if k.startswith("model")} == want


def test_layerwise_model_computes_the_loaded_models_logits_one_layer_at_a_time(
    models: Path,
) -> None:
    from transformers import AutoModelForCausalLM

    from composer.merging.layerwise import layerwise_model
    from merge.routing_stats import collect_routing_stats

    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    full = AutoModelForCausalLM.from_pretrained(str(models / "moe8"), dtype=torch.float32)
    want = collect_routing_stats(full.eval(), [ids], 2)
    resident = []
    with layerwise_model(Checkpoint(models / "moe8")) as model:
        layers = model.model.layers
        layers[1].register_forward_pre_hook(
            lambda *_: resident.append([p.device.type for p in layers.parameters()])
        )
        got = collect_routing_stats(model.model, [ids], 2)
        assert {p.device.type for p in layers.parameters()} == {"meta"}  # all dropped after
    # While layer 1 was about to run, layer 0 was already dropped (hooks run in order).
    n0 = len(list(layers[0].parameters()))
    assert set(resident[0][:n0]) == {"meta"}
    for i in want:
        assert torch.equal(got[i].logits, want[i].logits)
