"""Decode throughput of vLLM engines with and without per-request expert masks.

Usage:
  python bench/serve_overhead.py [--kind mixtral|flexolmo] [--requests 16] [--tokens 64]
  python bench/serve_overhead.py --compare-backends [--kind ...]

Builds a tiny composed MoE and runs rounds alternating between unmasked batches (the explicit
full mask the server sends when a request masks nothing) and batches where every request has
its own random mask (with its salt), so both are measured side by side under the same machine
load. Prints tokens/s per round, the medians and the overhead of masking. With
`--compare-backends` it starts one engine per MoE backend (`composer`, `vllm`) and alternates
between them too, printing each backend's throughput and the ratio of the default (`auto`) one
to the other: the evidence behind `serve.moe_backend.FASTEST`.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from composer.tiny_moe import DEFAULT_EXPERTS, make_tiny_moe
from serve.experts import engine_fields
from serve.moe_backend import BACKEND_ENV, BACKENDS, moe_backend

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


def engine(model: Path, backend: str | None) -> Any:
    from vllm import LLM

    if backend:
        os.environ[BACKEND_ENV] = backend  # read by the engine process at start
    return LLM(
        model=str(model), dtype="float32", max_model_len=256, enforce_eager=True,
        block_size=32, kv_cache_memory_bytes=256 << 20, enable_prefix_caching=True, seed=0,
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--kind", choices=["mixtral", "flexolmo"], default="mixtral")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--compare-backends", action="store_true")
    args = parser.parse_args()

    default, why = moe_backend()
    with tempfile.TemporaryDirectory() as tmp:
        model = make_tiny_moe(Path(tmp) / "model", args.kind)
        names = list(BACKENDS) if args.compare_backends else [default]
        engines = {name: engine(model, name) for name in names}
        for llm in engines.values():  # warm-up
            tokens_per_second(llm, False, args.requests, 8, seed=-1)
            tokens_per_second(llm, True, args.requests, 8, seed=-2)
        runs = [(b, m) for b in names for m in (False, True)]
        tps: dict[tuple[str, bool], list[float]] = {run: [] for run in runs}
        for r in range(args.rounds):
            # Rotate the order so drifts in machine load hit every run alike.
            for b, m in runs[r % len(runs) :] + runs[: r % len(runs)]:
                t = tokens_per_second(engines[b], m, args.requests, args.tokens, seed=r)
                tps[b, m].append(t)
                print(f"round {r} {b:8s} {'masked  ' if m else 'unmasked'} {t:8.1f} tokens/s")
        print(f"\n{args.kind}: {args.requests} concurrent requests x {args.tokens} tokens, "
              f"{args.rounds} rounds; default backend {default} ({why})")  # fmt: skip
        for b in names:
            plain, masked = tps[b, False], tps[b, True]
            p, m = statistics.median(plain), statistics.median(masked)
            paired = statistics.median(
                100 * (1 - y / x) for x, y in zip(plain, masked, strict=True)
            )
            print(f"{b:8s} unmasked median {p:8.1f} tokens/s, masked median {m:8.1f} tokens/s, "
                  f"masking overhead {100 * (p - m) / p:+.1f}% of medians, {paired:+.1f}% paired "
                  f"(target < 5%)")  # fmt: skip
        if args.compare_backends:
            other = next(b for b in names if b != default)
            for m in (False, True):
                ratios = [x / y for x, y in zip(tps[default, m], tps[other, m], strict=True)]
                print(f"{'masked' if m else 'unmasked'}: default {default} / {other} = "
                      f"{statistics.median(ratios):.2f}x (median of paired rounds)")  # fmt: skip
        for llm in engines.values():
            llm.llm_engine.engine_core.shutdown()


if __name__ == "__main__":
    main()
