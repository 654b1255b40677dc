"""Single server against `composer serve --replicas N` (Ray Serve) on one model: start time and
decode throughput through the HTTP endpoint, side by side.

Usage:
  python bench/serve_replicas.py [MODEL] [--replicas 2] [--requests 32] [--tokens 64]
      [--concurrency 16] [--rounds 2]

MODEL defaults to the demo's router-tuned build (.demo/avx2-refactor/builds/flexmix, only read).
Both servers run the real `composer serve` command without a registry (throughput does not
depend on policy), float32, the same vLLM arguments; the Ray one starts its own local cluster.
Start time is from launching the command until the endpoint answers a completion (for Ray:
until the command reports every replica running). Each round sends `requests` completions of
`tokens` tokens (ignore_eos), `concurrency` at a time, and counts completion tokens per second
of wall time; with Ray it also counts how many requests each replica answered.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
DEMO_BUILD = REPO / ".demo" / "avx2-refactor" / "builds" / "flexmix"
VLLM_ARGS = ["--max-model-len", "512", "--kv-cache-memory-bytes", str(256 << 20), "--seed", "0"]
PROMPTS = [
    "def parse_config(path):",
    "This licence grants you the right to",
    "NAME\n    grep - print lines that match patterns\nSYNOPSIS",
    "The capital of France is",
]


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(model: Path, replicas: int | None, log: Path, home: Path) -> tuple[Any, str, float]:
    """(process, base url, seconds until it serves)."""
    port = free_port()
    cmd = [sys.executable, "-m", "cli.main", "serve", str(model), "--port", str(port)]
    cmd += ["--served-model-name", "bench"]
    if replicas:
        cmd += ["--replicas", str(replicas)]
    cmd += ["--", *VLLM_ARGS]
    env = {**os.environ, "PYTHONPATH": str(REPO), "COMPOSER_HOME": str(home),
           "COMPOSER_DATABASE_URL": f"sqlite:///{home / 'none.db'}"}  # fmt: skip
    env.setdefault("RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S", "60")
    env.setdefault("RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S", "60")
    t0 = time.monotonic()
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"exited {proc.returncode}:\n{log.read_text()[-3000:]}")
        if time.monotonic() - t0 > 900:
            proc.kill()
            raise RuntimeError(f"not serving after 900 s:\n{log.read_text()[-3000:]}")
        ready = not replicas or "replicas of" in log.read_text(errors="replace")
        if ready:
            try:
                body = {"model": "bench", "prompt": "hi", "max_tokens": 1}
                if httpx.post(url + "/v1/completions", json=body, timeout=30).status_code == 200:
                    return proc, url, time.monotonic() - t0
            except httpx.HTTPError:
                pass
        time.sleep(1)


def stop(proc: Any) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


async def one_round(url: str, n: int, tokens: int, concurrency: int) -> tuple[float, Counter]:
    sem = asyncio.Semaphore(concurrency)
    replicas: Counter[str] = Counter()
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:

        async def one(i: int) -> int:
            body = {"model": "bench", "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": tokens,
                    "temperature": 0.0, "ignore_eos": True}  # fmt: skip
            async with sem:
                r = await client.post("/v1/completions", json=body)
            r.raise_for_status()
            replicas[r.headers.get("x-composer-replica", "-")] += 1
            return int(r.json()["usage"]["completion_tokens"])

        t0 = time.perf_counter()
        done = await asyncio.gather(*(one(i) for i in range(n)))
        return sum(done) / (time.perf_counter() - t0), replicas


def measure(
    model: Path, replicas: int | None, args: argparse.Namespace, work: Path
) -> dict[str, Any]:
    label = f"replicas={replicas}" if replicas else "single"
    print(f"[{label}] starting ...", flush=True)
    proc, url, started = start(model, replicas, work / f"{label}.log", work / "home")
    print(f"[{label}] serving after {started:.1f} s", flush=True)
    rates, spread = [], Counter()
    try:
        for r in range(args.rounds):
            rate, seen = asyncio.run(one_round(url, args.requests, args.tokens, args.concurrency))
            rates.append(rate)
            spread.update(seen)
            print(f"[{label}] round {r + 1}: {rate:.1f} tokens/s {dict(seen)}", flush=True)
    finally:
        stop(proc)
    return {"start_s": started, "tokens_s": statistics.median(rates), "spread": spread}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model", nargs="?", type=Path, default=DEMO_BUILD)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="serve-replicas-") as tmp:
        work = Path(tmp)
        (work / "home").mkdir()
        single = measure(args.model, None, args, work)
        many = measure(args.model, args.replicas, args, work)
    print(
        f"\n{args.model.name}: {args.requests} requests x {args.tokens} tokens, "
        f"{args.concurrency} at a time, median of {args.rounds} rounds, {os.cpu_count()} CPUs"
    )
    print(f"{'':24}{'single':>12}{f'replicas={args.replicas}':>14}{'ratio':>9}")
    for key, name in (("start_s", "start to serving (s)"), ("tokens_s", "decode tokens/s")):
        a, b = single[key], many[key]
        print(f"{name:24}{a:12.1f}{b:14.1f}{b / a:8.2f}x")
    print(f"requests per replica: {dict(many['spread'])}")


if __name__ == "__main__":
    main()
