"""The demo's last stage: `composer serve` of the composed build, asked with all experts, with
one excluded, and after its owner opts out (the server stops using it within its refresh)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console

console = Console()


def serve_and_ask(service: Any, dtype: str, log: Path, question: str) -> None:
    """Start `composer serve flexmix` (vLLM on CPU), ask with all experts and without 'code',
    then let the code owner opt out and show that the server stops using the expert."""
    import httpx

    port = _free_port()
    cmd = [
        str(Path(sys.executable).parent / "composer"), "serve", "flexmix", "--port", str(port),
        "--served-model-name", "flexmix", "--",
        "--dtype", dtype, "--max-model-len", "1024",
        "--kv-cache-memory-bytes", str(256 << 20), "--seed", "0",
    ]  # fmt: skip
    console.print("$ composer serve flexmix --port " + str(port) + f"   (log: {log})")
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=os.environ.copy())
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(proc, base, log)
        with httpx.Client(base_url=base, timeout=300) as client:
            _ask(client, question, "all experts", None)
            _ask(client, question, "code excluded", {"exclude": ["code"]})
            service.set_policy("code", owner="code-owner", policy="opt_out")
            console.print("[bold]code-owner opts out of 'code'[/bold] (composer registry opt-out)")
            time.sleep(2.5)  # the server re-reads policies every 2 s
            _ask(client, question, "all experts, after the opt-out", None)
            _ask(client, question, "asking for 'code' explicitly", {"include": ["code"]})
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def _ask(client: Any, question: str, label: str, experts: dict[str, list[str]] | None) -> None:
    body: dict[str, Any] = {
        "model": "flexmix",
        "messages": [{"role": "user", "content": question}],
        "max_tokens": 80,
        "temperature": 0,
    }
    if experts is not None:
        body["experts"] = experts
    r = client.post("/v1/chat/completions", json=body)
    console.print(f"[bold]{label}[/bold] {json.dumps(experts) if experts else ''}")
    if r.status_code != 200:
        console.print(f"  HTTP {r.status_code}: {r.json().get('error', r.text)}")
        return
    used = r.headers.get("x-composer-experts")
    answer = r.json()["choices"][0]["message"]["content"].strip()
    console.print(f"  experts used: {used}")
    console.print("  " + answer.replace("\n", "\n  "))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _wait_healthy(
    proc: subprocess.Popen[bytes], base: str, log: Path, timeout: float = 600.0
) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    with console.status("starting vLLM (CPU)..."):
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
    raise RuntimeError(f"server not healthy after {timeout:.0f} s; see {log}")
