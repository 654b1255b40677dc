"""Served tokens/s of `composer serve BASE --adapters ...`: no adapter, one adapter, and
adapters alternating across the requests of a batch, measured in the same run, side by side.

Usage:
  python bench/serve_adapters.py [--base DIR] [--adapters DIR] [--requests 8] [--tokens 64]
                                 [--rounds 5] [--work /tmp/lora-serve/bench]

A temporary registry (under --work) gets the base and three adapters; a real `composer serve`
subprocess serves them (keys off, float32 on CPUs without native bf16, as `composer serve`
chooses). Each round sends --requests concurrent /v1/completions of --tokens greedy tokens
(ignore_eos) over HTTP, in one of three modes, the modes rotating so machine load hits all
alike: `base` (no adapter), `adapter` (every request `code`), `alternating` (request i uses
adapter i mod 3). Adapters: the trained SmolLM2 adapters in /work/lora-adapters/{code,legal,
manuals} when /work/lora-adapters/READY exists, else seeded random rank-16 FFN adapters
(composer.tiny_models.make_tiny_lora) on the demo's public model export.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
DEMO_BASE = REPO / ".demo" / "avx2-refactor" / "models" / "smollm2"
TRAINED = Path("/work/lora-adapters")
NAMES = ["code", "legal", "manuals"]
MODES = ["base", "adapter", "alternating"]


def adapters_for(base: Path, trained: Path, work: Path) -> tuple[dict[str, Path], str]:
    if (trained / "READY").exists():
        return {n: trained / n for n in NAMES}, f"trained adapters from {trained}"
    from composer.tiny_models import make_tiny_lora

    folders = {}
    for seed, name in enumerate(NAMES, start=1):
        out = work / "adapters" / name
        folders[name] = (
            out if out.is_dir() else make_tiny_lora(base, out, seed, rank=16, scale=0.01)
        )
    return folders, "seeded random rank-16 FFN adapters (gate/up/down_proj)"


def register(base: Path, adapters: dict[str, Path], home: Path) -> str:
    from registry.service import RegistryService, init_registry

    url = f"sqlite:///{home / 'registry.db'}"
    if (home / "registry.db").exists():
        return url
    home.mkdir(parents=True, exist_ok=True)
    init_registry(url)
    service = RegistryService(url, home)
    try:
        service.add_owner("bench")
        service.add_base(base, "smollm2")
        for name, folder in adapters.items():
            service.add_expert(folder, name=name, owner="bench", base="smollm2", domain=name,
                               kind="lora")  # fmt: skip
    finally:
        service.close()
    return url


def start(home: Path, url: str, port: int, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "COMPOSER_HOME": str(home), "COMPOSER_DATABASE_URL": url,
           "PYTHONPATH": str(REPO)}  # fmt: skip
    cmd = [sys.executable, "-m", "cli.main", "serve", "smollm2", "--adapters", ",".join(NAMES),
           "--port", str(port), "--", "--max-model-len", "512", "--seed", "0",
           "--kv-cache-memory-bytes", str(1 << 30)]  # fmt: skip
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    t0 = time.monotonic()
    while time.monotonic() - t0 < 900:
        if proc.poll() is not None:
            raise SystemExit(f"server exited {proc.returncode}: see {log}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                print(f"server up after {time.monotonic() - t0:.0f} s", flush=True)
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(2)
    proc.terminate()
    raise SystemExit(f"server not healthy after 900 s: see {log}")


def model_of(mode: str, i: int) -> str:
    if mode == "base":
        return "smollm2"
    return "code" if mode == "adapter" else NAMES[i % len(NAMES)]


def one_round(port: int, mode: str, n: int, tokens: int, seed: int) -> float:
    rng = random.Random(seed)
    prompts = [[rng.randrange(100, 40000) for _ in range(32)] for _ in range(n)]

    def send(i: int) -> int:
        body = {"model": model_of(mode, i), "prompt": prompts[i], "max_tokens": tokens,
                "temperature": 0.0, "ignore_eos": True}  # fmt: skip
        r = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json=body, timeout=600)
        r.raise_for_status()
        return int(r.json()["usage"]["completion_tokens"])

    t0 = time.perf_counter()
    with ThreadPoolExecutor(n) as pool:
        done = sum(pool.map(send, range(n)))
    return done / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--base", type=Path, default=DEMO_BASE)
    parser.add_argument("--adapters", type=Path, default=TRAINED)
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--work", type=Path, default=Path("/tmp/lora-serve/bench"))
    args = parser.parse_args()

    args.work.mkdir(parents=True, exist_ok=True)
    adapters, what = adapters_for(args.base, args.adapters, args.work)
    home = args.work / "home"
    url = register(args.base, adapters, home)
    proc = start(home, url, args.port, args.work / "server.log")
    try:
        for mode in MODES:  # warm-up: first use loads each adapter
            one_round(args.port, mode, args.requests, 8, seed=-1)
        rates: dict[str, list[float]] = {m: [] for m in MODES}
        for r in range(args.rounds):
            for k in range(len(MODES)):
                mode = MODES[(r + k) % len(MODES)]
                rates[mode].append(one_round(args.port, mode, args.requests, args.tokens, seed=r))
            print(f"round {r + 1}/{args.rounds}: " + ", ".join(
                f"{m} {rates[m][-1]:.1f}" for m in MODES) + " tokens/s", flush=True)  # fmt: skip
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    base = statistics.median(rates["base"])
    print(f"\n{args.base.name}, {what}; {args.requests} concurrent requests x {args.tokens} "
          f"tokens, {args.rounds} rounds (medians)")  # fmt: skip
    print(f"{'mode':<12} {'tokens/s':>9} {'vs base':>8}")
    for mode in MODES:
        med = statistics.median(rates[mode])
        print(f"{mode:<12} {med:>9.1f} {med / base:>7.2f}x")
    paired = [a / b for a, b in zip(rates["adapter"], rates["base"], strict=True)]
    print(f"paired adapter/base per round: median {statistics.median(paired):.2f}x")


if __name__ == "__main__":
    main()
