"""Expert Merging / ++ on tiny Llama checkpoints (real safetensors, real transformers model)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from composer.tiny_models import TINY_DIMS, make_tiny_llama, perturb_ffn
from merge.dense import task_arithmetic
from merge.errors import MergeError
from merge.expert_merging import (
    ExpertMergingParams,
    ExpertMergingPlusParams,
    expert_merging,
    expert_merging_plus,
)


@dataclass
class Setup:
    model: LlamaForCausalLM
    base: dict[str, torch.Tensor]
    experts: list[dict[str, torch.Tensor]]
    calibration: list[list[torch.Tensor]]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Setup:
    root = Path(tmp_path_factory.mktemp("em"))
    make_tiny_llama(root / "base")
    # Expert 0 changed layer 0's FFN, expert 1 layer 1's (FlexOlmo-style: shared weights equal).
    for i in range(2):
        perturb_ffn(root / "base", root / f"e{i}", seed=i + 1, scale=0.05, layers=[i])
    base = load_file(root / "base" / "model.safetensors")
    experts = [load_file(root / f"e{i}" / "model.safetensors") for i in range(2)]
    g = torch.Generator().manual_seed(0)
    calibration = [[torch.randint(0, 256, (2, 12), generator=g)] for _ in range(2)]
    return Setup(LlamaForCausalLM(LlamaConfig(**TINY_DIMS)), base, experts, calibration)


def _ta(s: Setup, lambda_: float) -> dict[str, torch.Tensor]:
    return {
        k: task_arithmetic(s.base[k], [e[k] for e in s.experts], lambda_=lambda_) for k in s.base
    }


@pytest.mark.parametrize("frozen", [{"steps": 0}, {"steps": 3, "lr": 0.0}])
def test_frozen_at_init_is_task_arithmetic_exactly(setup: Setup, frozen: dict) -> None:
    p = ExpertMergingParams(**{"lambda": 0.4, **frozen})
    result = expert_merging(setup.model, setup.base, setup.experts, setup.calibration, p)
    ta = _ta(setup, 0.4)
    assert set(result.state_dict) == set(ta)
    for k in ta:
        assert torch.equal(result.state_dict[k], ta[k]), k
    # Only tensors some expert changed get coefficients: the 6 FFN matrices here.
    assert len(result.coefficients) == 6 and all(".mlp." in k for k in result.coefficients)


def test_learning_reduces_the_alignment_loss(setup: Setup) -> None:
    p = ExpertMergingParams(steps=12, lr=0.1)
    result = expert_merging(setup.model, setup.base, setup.experts, setup.calibration, p)
    assert result.final_alignment < 0.9 * result.initial_alignment
    c = result.coefficients
    # Expert 0 only touched layer 0: its coefficient there grows from 0.3 toward 1, while the
    # coefficient of expert 1 (zero task vector in layer 0) gets no gradient and stays put.
    up0 = c["model.layers.0.mlp.up_proj.weight"]
    assert up0[0] > 0.5
    assert up0[1] == pytest.approx(0.3, abs=1e-6)
    assert all(0.0 < float(v) < 1.0 for t in c.values() for v in t.reshape(-1))


def test_deterministic_for_a_seed(setup: Setup) -> None:
    p = ExpertMergingParams(steps=4, lr=0.1, seed=3)
    a = expert_merging(setup.model, setup.base, setup.experts, setup.calibration, p)
    b = expert_merging(setup.model, setup.base, setup.experts, setup.calibration, p)
    assert a.losses == b.losses
    for k in a.state_dict:
        assert torch.equal(a.state_dict[k], b.state_dict[k])


def test_plus_without_stage_two_equals_stage_one(setup: Setup) -> None:
    p1 = ExpertMergingParams(steps=4, lr=0.1)
    one = expert_merging(setup.model, setup.base, setup.experts, setup.calibration, p1)
    p2 = ExpertMergingPlusParams(steps=4, lr=0.1, steps_stage2=0, chunks=4, top_fraction=0.5)
    plus = expert_merging_plus(setup.model, setup.base, setup.experts, setup.calibration, p2)
    assert len(plus.chunked) == 3
    for k in plus.chunked:
        assert plus.coefficients[k].shape == (2, 4)
    for k in one.state_dict:  # chunks start from stage 1's values: same merged model
        assert torch.equal(one.state_dict[k], plus.state_dict[k]), k


def test_plus_learns_chunk_coefficients(setup: Setup) -> None:
    p = ExpertMergingPlusParams(steps=6, lr=0.1, steps_stage2=6, chunks=4, top_fraction=0.5)
    plus = expert_merging_plus(setup.model, setup.base, setup.experts, setup.calibration, p)
    assert plus.final_alignment < plus.initial_alignment
    assert len(plus.losses) == 12
    chunk_coefs = plus.coefficients[plus.chunked[0]]
    assert chunk_coefs.shape == (2, 4)
    assert chunk_coefs.max(1).values.sub(chunk_coefs.min(1).values).max() > 0  # chunks differ


def test_bad_inputs_are_named(setup: Setup) -> None:
    run = expert_merging
    with pytest.raises(MergeError, match="initial coefficient .* expert #0 is 1.5"):
        run(
            setup.model,
            setup.base,
            setup.experts,
            setup.calibration,
            ExpertMergingParams(**{"lambda": 1.5}),
        )
    with pytest.raises(MergeError, match="1 calibration sets for 2 experts"):
        run(setup.model, setup.base, setup.experts, setup.calibration[:1])
    with pytest.raises(MergeError, match="'hidden_layers' entry 9 is out of range"):
        run(
            setup.model,
            setup.base,
            setup.experts,
            setup.calibration,
            ExpertMergingParams(steps=0, hidden_layers=[9]),
        )
    bad = dict(setup.experts[1])
    bad["model.layers.0.mlp.up_proj.weight"] = torch.zeros(3, 3)
    with pytest.raises(MergeError, match=r"'model.layers.0.mlp.up_proj.weight': expert #1 has"):
        run(setup.model, setup.base, [setup.experts[0], bad], setup.calibration)
    with pytest.raises(MergeError, match="every expert equals the base"):
        run(setup.model, setup.base, [setup.base], setup.calibration[:1])
