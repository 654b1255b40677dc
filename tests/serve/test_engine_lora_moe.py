"""`lora: shared` builds in vLLM (serve/lora_moe.py): the same greedy tokens as the materialised
build of the same spec, with and without per-request masks; masked equals the build without the
expert; a request without a mask gets the public expert only (fail closed).

Two engines in all (one per build), shared by the module's tests.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from composer.build import build
from composer.inputs import LocalPathResolver
from composer.spec_load import load_spec
from composer.tiny_models import make_tiny_llama, make_tiny_lora
from composer.tiny_moe import write_tiny_tokenizer
from router_train.biased_router import load_composed
from tests.serve.server_fixtures import offline_request, tiny_llm

pytestmark = pytest.mark.slow

PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12], [30, 31, 32, 33, 34, 35, 36, 37, 38, 39], [100, 101], [7]]
MAX_TOKENS = 12
SPEC = "method: compose\nstyle: flexolmo\nbase: base\nexperts: [{experts}]\ntop_k: 2\n"


def _expert_file(folder: Path, seed: int, bias: float) -> None:
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(seed)
    t = {}
    for i in range(2):
        t[f"model.layers.{i}.domain_embedding"] = torch.randn(128, generator=gen)
        t[f"model.layers.{i}.router_bias"] = torch.tensor(bias)
    save_file(t, folder / "composer_expert.safetensors", metadata={"layers": "0,1"})


def _build(root: Path, name: str, experts: str, extra: str = "") -> Path:
    spec_path = root / f"{name}.yaml"
    spec_path.write_text(f"name: {name}\n" + SPEC.format(experts=experts) + extra)
    spec = load_spec(spec_path)
    return build(spec, root / name, LocalPathResolver(root), progress=False).out_dir


@pytest.fixture(scope="module")
def builds(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("lora_moe")
    make_tiny_llama(root / "base", seed=0)
    write_tiny_tokenizer(root / "base")  # builds copy it; vLLM needs one
    # Large factors, so the experts change the greedy tokens (and masks matter).
    make_tiny_lora(root / "base", root / "code", seed=1, rank=4, scale=0.3)
    make_tiny_lora(root / "base", root / "legal", seed=2, rank=8, scale=0.3)
    _expert_file(root / "code", seed=3, bias=-0.5)
    _expert_file(root / "legal", seed=4, bias=0.5)
    out: dict[str, Any] = {
        "shared": _build(root, "shared", "code, legal", "lora: shared\n"),
        "mat": _build(root, "mat", "code, legal"),
        "pruned": _build(root, "pruned", "code"),
    }
    out["engines"] = {k: tiny_llm(out[k]) for k in ("shared", "mat")}
    yield out
    for llm in out["engines"].values():
        llm.llm_engine.engine_core.shutdown()
    shutil.rmtree(root, ignore_errors=True)


def _generate(llm: Any, allowed: list[str] | None, salted: bool = True) -> list[list[int]]:
    inputs, params = [], []
    for ids in PROMPTS:
        prompt, param = offline_request(
            llm, ids, allowed, salted, max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True
        )
        inputs.append(prompt)
        params.append(param)
    return [list(o.outputs[0].token_ids) for o in llm.generate(inputs, params, use_tqdm=False)]


@torch.no_grad()
def _hf_greedy(folder: Path) -> list[list[int]]:
    model = load_composed(folder)
    out = []
    for ids in PROMPTS:
        gen = model.generate(
            torch.tensor([ids]), max_new_tokens=MAX_TOKENS, do_sample=False, min_new_tokens=12
        )
        out.append(gen[0, len(ids) :].tolist())
    return out


@pytest.mark.parametrize("allowed", [None, ["public", "code"], ["public"], ["legal"]])
def test_shared_gives_the_materialised_tokens(builds: dict[str, Any], allowed: Any) -> None:
    shared, mat = builds["engines"]["shared"], builds["engines"]["mat"]
    assert _generate(shared, allowed) == _generate(mat, allowed)


def test_masked_equals_built_without_the_expert(builds: dict[str, Any]) -> None:
    shared = builds["engines"]["shared"]
    masked = _generate(shared, ["public", "code"])
    assert masked == _hf_greedy(builds["pruned"])
    assert masked != _generate(shared, None)  # the mask matters


def test_no_mask_gets_the_public_expert_only(builds: dict[str, Any]) -> None:
    from vllm import SamplingParams

    shared = builds["engines"]["shared"]
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    bare = shared.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
    assert [list(o.outputs[0].token_ids) for o in bare] == _generate(shared, ["public"])
