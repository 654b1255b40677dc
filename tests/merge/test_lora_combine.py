"""merge.lora_combine against PEFT's own add_weighted_adapter on the same real adapters.

Same tensors where the definitions coincide (linear, cat, ties and, with PEFT's draws from a
generator seeded alike, the DARE ones); for the svd combinations the products B @ A (singular
vectors are only unique up to sign).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from composer.tiny_models import make_tiny_llama, make_tiny_lora
from merge.errors import MergeError
from merge.lora import LoraFactor, lora_factors
from merge.lora_combine import LORA_COMBINATIONS, LoraCombineParams, combine, output_rank

WEIGHTS = [0.7, -1.3]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("combine")
    base = make_tiny_llama(root / "base")
    return {
        "base": base,
        "a": make_tiny_lora(base, root / "a", seed=1),
        # same rank, another alpha and one module fewer (PEFT skips it for that adapter)
        "b": make_tiny_lora(base, root / "b", seed=2, alpha=4.0, targets=("gate_proj", "up_proj")),
        "c": make_tiny_lora(base, root / "c", seed=3, rank=6, alpha=6.0),  # another rank
    }


def _factors(folder: Path) -> dict[str, LoraFactor]:
    config = json.loads((folder / "adapter_config.json").read_text())
    return lora_factors(load_file(folder / "adapter_model.safetensors"), config)


def _peft(
    adapters: dict[str, Path], names: list[str], combination: str, seed: int | None = None, **kw
) -> dict:
    """{base weight name: (A, B)} of PEFT's merged adapter, in PEFT's module order; with
    ``seed``, torch's global generator is seeded once the new adapter is initialised (its
    random init draws from it too), just before PEFT's DARE draws."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(adapters["base"], dtype=torch.float32)
    peft = PeftModel.from_pretrained(model, adapters[names[0]], adapter_name=names[0])
    for n in names[1:]:
        peft.load_adapter(adapters[n], adapter_name=n)
    if seed is not None:
        lora_model, inject = peft.base_model, peft.base_model.inject_adapter

        def inject_then_seed(*args, **kwargs):
            inject(*args, **kwargs)
            torch.manual_seed(seed)

        lora_model.inject_adapter = inject_then_seed
    peft.add_weighted_adapter(names, WEIGHTS[: len(names)], "merged", combination, **kw)
    out = {}
    for key, mod in peft.base_model.model.named_modules():
        if hasattr(mod, "lora_A") and "merged" in mod.lora_A:
            out[f"{key}.weight"] = (
                mod.lora_A["merged"].weight.detach().clone(),
                mod.lora_B["merged"].weight.detach().clone(),
            )
    return out


def _ours(adapters, names, combination, gen=None, order=None, **kw) -> dict:
    fs = [_factors(adapters[n]) for n in names]
    rank = output_rank(combination, [max(f.rank for f in x.values()) for x in fs], kw.get("rank"))
    weights = sorted(set().union(*fs)) if order is None else order
    return {
        w: combine(
            [x.get(w) for x in fs], WEIGHTS[: len(names)], combination, rank,
            density=kw.get("density"), generator=gen, name=w,
        )
        for w in weights
    }  # fmt: skip


@pytest.mark.parametrize(
    ("combination", "names", "kw"),
    [
        ("linear", ["a", "b"], {}),
        ("cat", ["a", "c"], {}),
        ("cat", ["a", "b"], {}),
        ("ties", ["a", "b"], {"density": 0.5}),
    ],
)
def test_same_factors_as_peft(adapters, combination, names, kw):
    theirs = _peft(adapters, names, combination, **kw)
    ours = _ours(adapters, names, combination, **kw)
    assert sorted(ours) == sorted(theirs)
    for w, (a, b) in theirs.items():
        torch.testing.assert_close(ours[w][0], a, rtol=0, atol=0, msg=w)
        torch.testing.assert_close(ours[w][1], b, rtol=0, atol=0, msg=w)


def test_cat_is_the_exact_weighted_sum_of_deltas(adapters):
    fs = [_factors(adapters[n]) for n in ("a", "c")]
    for w, (a, b) in _ours(adapters, ["a", "c"], "cat").items():
        want = sum(wt * x[w].delta() for wt, x in zip(WEIGHTS, fs, strict=True))
        torch.testing.assert_close(b @ a, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("combination", "kw"),
    [("dare_linear", {"density": 0.6}), ("dare_ties", {"density": 0.6})],
)
def test_dare_draws_like_peft_from_the_same_seed(adapters, combination, kw):
    theirs = _peft(adapters, ["a", "b"], combination, seed=123, **kw)
    gen = torch.Generator().manual_seed(123)
    ours = _ours(adapters, ["a", "b"], combination, gen=gen, order=list(theirs), **kw)
    for w, (a, b) in theirs.items():
        torch.testing.assert_close(ours[w][0], a, rtol=0, atol=0, msg=w)
        torch.testing.assert_close(ours[w][1], b, rtol=0, atol=0, msg=w)
    dropped = (ours[next(iter(ours))][1] == 0).float().mean().item()
    assert 0.0 < dropped < 0.6  # some entries of B dropped in every input, not all


@pytest.mark.parametrize(
    ("combination", "names", "kw"),
    [
        ("svd", ["a", "c"], {"svd_rank": 3}),
        ("ties_svd", ["a", "b"], {"density": 0.5}),
    ],
)
def test_svd_products_match_peft(adapters, combination, names, kw):
    theirs = _peft(adapters, names, combination, **kw)
    ours = _ours(adapters, names, combination, rank=kw.get("svd_rank"), **kw)
    assert sorted(ours) == sorted(theirs)
    for w, (a, b) in theirs.items():
        assert ours[w][0].shape == a.shape and ours[w][1].shape == b.shape
        torch.testing.assert_close(ours[w][1] @ ours[w][0], b @ a, rtol=1e-4, atol=1e-6, msg=w)


def test_refusals(adapters):
    fa, fc = _factors(adapters["a"]), _factors(adapters["c"])
    with pytest.raises(MergeError, match="one rank"):
        output_rank("linear", [4, 6])
    w = next(iter(fa))
    with pytest.raises(MergeError, match="needs rank 4"):
        combine([fa[w], fc[w]], [1.0, 1.0], "ties", 4, density=0.5, name=w)
    with pytest.raises(MergeError, match="smaller side"):
        combine([fa[w]], [1.0], "svd", 10_000, name=w)
    with pytest.raises(MergeError, match="no adapter"):
        combine([None], [1.0], "cat", 4, name=w)
    for bad, msg in [
        ({"combination": "ties"}, "needs 'density'"),
        ({"combination": "cat", "density": 0.5}, "takes no 'density'"),
        ({"combination": "linear", "rank": 2}, "only used by svd"),
        ({"combination": "magnitude"}, "combination"),
    ]:
        with pytest.raises(ValueError, match=msg):
            LoraCombineParams.model_validate(bad)
    literal = LoraCombineParams.model_fields["combination"].annotation
    assert set(LORA_COMBINATIONS) == set(literal.__args__)
